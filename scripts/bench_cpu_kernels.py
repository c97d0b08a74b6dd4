"""Why FGA pairs are not faster on these CPUs at batch 1: the convolution kernels PyTorch picks.

For the three ResNet-56 stage geometries (16 channels at 32x32, 32 at 16x16, 64 at 8x8), times
one forward (batch 1, float32, --threads threads, inference mode) of: the dense 3x3 conv, the FGA
pair's grouped 3x3 conv (g groups, rank r chosen for ~18 % of the dense FLOPs), the same conv run
as one dense conv with a block-diagonal weight (g times the FLOPs, the same result), and the 1x1
conv. Then whole models: the original ResNet-56 and its error-allocation plan at FLOPs 0.2, with
grouped and with block-diagonal execution. Last, the original and uniform plans (g = 1, 2, 4, 8 at
~18 % of the FLOPs) in eager PyTorch, frozen TorchScript and ONNX Runtime, each against the
original in the same runtime. Last, the export's per-layer choice of execution
(``fga_search.deploy._cpu_execution``) on the error-allocation plan and the uniform plans: with
block-diagonal execution only, and with folding pairs into one dense conv as well; and what a
folded FGA layer costs per call beyond the nn.Conv2d it computes. All timed side by side, round by
round; medians, and ratios to the dense conv / the original model.

    python scripts/bench_cpu_kernels.py [--threads 2] [--runs 200]
"""

from __future__ import annotations

import argparse
import copy
from collections.abc import Callable
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn

from _bench_common import checkpoint
from fga_search import ModelProfile, build_model
from fga_search.core._fga import FGAConv2d
from fga_search.core._spectra import SpectralTable
from fga_search.core._surgery import apply_plan_structure
from fga_search.deploy._runtime_latency import interleaved
from fga_search.engine._cost import CostModel
from fga_search.engine._space import load_space
from fga_search.engine._strategies import error_alloc_plan, uniform_plan


def block_diagonal(conv: nn.Conv2d) -> torch.Tensor:
    """The grouped conv's weight as one dense conv's weight (zeros between the groups)."""
    w, groups = conv.weight.detach(), conv.groups
    per_out, per_in = w.shape[0] // groups, w.shape[1]
    full = w.new_zeros(w.shape[0], per_in * groups, *w.shape[2:])
    for i in range(groups):
        full[i * per_out : (i + 1) * per_out, i * per_in : (i + 1) * per_in] = w[
            i * per_out : (i + 1) * per_out
        ]
    return full


class BlockDiagonalFGA(nn.Module):
    """An FGA pair whose grouped conv runs as a dense conv with a block-diagonal weight."""

    def __init__(self, fga: FGAConv2d) -> None:
        super().__init__()
        g = fga.grouped
        self.stride, self.padding, self.dilation = g.stride, g.padding, g.dilation
        self.register_buffer("weight", block_diagonal(g))
        self.pointwise = fga.pointwise

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.conv2d(x, self.weight, None, self.stride, self.padding, self.dilation)  # type: ignore[arg-type]
        return self.pointwise(y)


def block_diagonal_model(model: nn.Module) -> nn.Module:
    out = copy.deepcopy(model)
    for name, module in list(out.named_modules()):
        if isinstance(module, FGAConv2d):
            parent = out.get_submodule(name.rpartition(".")[0]) if "." in name else out
            setattr(parent, name.rpartition(".")[2], BlockDiagonalFGA(module))
    return out


def side_by_side(fns: dict[str, Callable[[], object]], runs: int) -> dict[str, float]:
    """Median µs of each function, run round by round (10 runs each per round)."""
    return {k: v * 1e3 for k, v in interleaved(fns, runs).items()}


@torch.inference_mode()
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--runs", type=int, default=200)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(
        f"batch 1, float32, {args.threads} threads, medians of {args.runs} runs (µs; ratio to the dense conv)"
    )
    for c, hw in ((16, 32), (32, 16), (64, 8)):
        x = torch.randn(1, c, hw, hw)
        fns: dict[str, Callable[[], object]] = {}
        dense = nn.Conv2d(c, c, 3, padding=1, bias=False).eval()
        fns["dense"] = partial(dense, x)
        for g in (1, 2, 4, 8):
            r = max(1, round(0.18 * 9 * c * c / (9 * c + g * c)))
            grouped = nn.Conv2d(c, g * r, 3, padding=1, groups=g, bias=False).eval()
            weight = block_diagonal(grouped)
            torch.testing.assert_close(F.conv2d(x, weight, padding=1), grouped(x), rtol=1e-4, atol=1e-4)
            pointwise = nn.Conv2d(g * r, c, 1, bias=False).eval()
            y = grouped(x)
            fns[f"g{g} r{r} grouped"] = partial(grouped, x)
            if g > 1:
                fns[f"g{g} r{r} block-diagonal"] = partial(F.conv2d, x, weight, padding=1)
            fns[f"g{g} r{r} 1x1"] = partial(pointwise, y)
        us = side_by_side(fns, args.runs)
        cells = ", ".join(f"{k} {v:.0f} ({v / us['dense']:.2f})" for k, v in us.items())
        print(f"  {c} channels at {hw}x{hw}: {cells}")

    model = build_model("resnet56", num_classes=10, weights=checkpoint("resnet56_cifar10.pt")).eval()
    profile = ModelProfile(model, input_shape=(3, 32, 32))
    space = load_space("resnet_cifar").resolve(profile.layers)
    plan = error_alloc_plan(space, CostModel(profile, "flops"), SpectralTable(model), budget=0.2)
    assert plan is not None
    fga = apply_plan_structure(copy.deepcopy(model), plan).eval()
    blockdiag = block_diagonal_model(fga).eval()
    x = torch.randn(1, 3, 32, 32)
    torch.testing.assert_close(blockdiag(x), fga(x), rtol=1e-3, atol=1e-3)
    models = {"original": model, "FGA grouped": fga, "FGA block-diagonal": blockdiag}
    us = side_by_side({k: partial(m, x) for k, m in models.items()}, args.runs)
    print(f"ResNet-56, error-allocation plan at FLOPs {profile.ratio(plan):.3f}, batch 1:")
    for k, v in us.items():
        print(f"  {k}: {v / 1e3:.2f} ms ({v / us['original']:.2f}x the original)")
    runtimes(model, profile, args.runs)
    export_choice(model, profile, plan, args.runs)
    folded_overhead(args.runs)


def runtimes(model: nn.Module, profile: ModelProfile, runs: int) -> None:
    """The original and uniform plans (every 3x3 conv but the stem, ~18 % of the FLOPs) in three
    runtimes, each against the original in the same runtime: eager PyTorch, TorchScript frozen
    (batch norms folded) and ONNX Runtime (default graph optimisations)."""
    import tempfile
    import warnings

    import onnxruntime

    skip = {"conv1"}
    models = {"original": model}
    for g in (1, 2, 4, 8):
        plan = uniform_plan(profile, budget=0.18, groups=g, skip=skip)
        models[f"g={g} (FLOPs {profile.ratio(plan):.3f})"] = apply_plan_structure(
            copy.deepcopy(model), plan
        ).eval()
    x = torch.randn(1, 3, 32, 32)
    engines: dict[str, dict[str, Callable[[], object]]] = {"eager PyTorch": {}, "TorchScript frozen": {}}
    engines["ONNX Runtime"] = {}
    with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for i, (label, m) in enumerate(models.items()):
            engines["eager PyTorch"][label] = partial(m, x)
            frozen = torch.jit.freeze(torch.jit.trace(m, x))
            engines["TorchScript frozen"][label] = partial(frozen, x)
            path = f"{tmp}/{i}.onnx"
            torch.onnx.export(m, (x,), path, dynamo=False, input_names=["x"])
            options = onnxruntime.SessionOptions()
            options.intra_op_num_threads = torch.get_num_threads()
            options.inter_op_num_threads = 1
            session = onnxruntime.InferenceSession(path, options, providers=["CPUExecutionProvider"])
            engines["ONNX Runtime"][label] = partial(session.run, None, {"x": x.numpy()})
        print(
            "ResNet-56, uniform plans at ~18 % of the FLOPs, batch 1, each runtime against its own original:"
        )
        for engine, fns in engines.items():
            us = side_by_side(fns, runs)
            cells = ", ".join(f"{k} {v / us['original']:.2f}x" for k, v in us.items() if k != "original")
            print(f"  {engine}: original {us['original'] / 1e3:.2f} ms; {cells}")


def export_choice(model: nn.Module, profile: ModelProfile, alloc: dict, runs: int) -> None:
    """Each plan as the export runs it: every FGA layer timed each way it can run, the fastest
    kept (then the whole model must be faster), with and without the dense (folded) execution."""
    from fga_search.deploy._cpu_execution import choose_cpu_execution

    plans = {f"error-alloc (FLOPs {profile.ratio(alloc):.3f})": alloc}
    for g in (1, 2, 4, 8):
        plan = uniform_plan(profile, budget=0.18, groups=g, skip={"conv1"})
        plans[f"uniform g={g} (FLOPs {profile.ratio(plan):.3f})"] = plan
    x = torch.randn(1, 3, 32, 32)
    print("ResNet-56 plans as the export runs them (ratios to the original, side by side):")
    for label, plan in plans.items():
        grouped = apply_plan_structure(copy.deepcopy(model), plan).eval()
        models: dict[str, nn.Module] = {"original": model, "grouped": grouped}
        chosen = {}
        for key, ways in (("+block-diagonal", ("block_diagonal",)), ("+block-diagonal+dense", None)):
            m = copy.deepcopy(grouped)
            kwargs = {} if ways is None else {"executions": ("grouped", *ways)}
            chosen[key] = choose_cpu_execution(m, input_shape=(3, 32, 32), runs=runs, **kwargs)
            models[key] = m
        with torch.no_grad():
            ref = grouped(x)
            for key in chosen:
                torch.testing.assert_close(models[key](x), ref, rtol=1e-3, atol=1e-3)
        us = side_by_side({k: partial(m, x) for k, m in models.items()}, runs)
        counts = "; ".join(
            f"{key}: "
            + ", ".join(f"{list(c['layers'].values()).count(w)} {w}" for w in ("block_diagonal", "dense"))
            for key, c in chosen.items()
        )
        cells = ", ".join(f"{k} {v / us['original']:.2f}x" for k, v in us.items() if k != "original")
        print(f"  {label}: original {us['original'] / 1e3:.2f} ms; {cells} ({counts})")


def folded_overhead(runs: int) -> None:
    """What an FGA layer run folded costs beyond the dense conv it computes: a chain of 20 small
    layers (16 channels at 8x8, batch 1), as nn.Conv2d and as FGA layers with dense execution."""
    torch.manual_seed(0)
    layers = [
        FGAConv2d.from_conv(nn.Conv2d(16, 16, 3, padding=1), groups=2, rank=4).eval() for _ in range(20)
    ]
    convs = nn.Sequential(*[layer.to_dense() for layer in layers]).eval()
    for layer in layers:
        layer.set_cpu_execution("dense")
    folded = nn.Sequential(*layers).eval()
    x = torch.randn(1, 16, 8, 8)
    torch.testing.assert_close(folded(x), convs(x), rtol=1e-4, atol=1e-4)
    us = side_by_side({"nn.Conv2d": partial(convs, x), "FGA, folded": partial(folded, x)}, runs)
    print(
        "Per layer, 16 channels at 8x8 (a chain of 20): "
        + ", ".join(f"{k} {v / 20:.1f} µs" for k, v in us.items())
        + f" ({(us['FGA, folded'] - us['nn.Conv2d']) / 20:+.1f} µs per layer)"
    )


if __name__ == "__main__":
    main()
