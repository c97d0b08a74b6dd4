"""Pick, by measurement, how each FGA layer runs on this CPU.

``FGAConv2d.set_cpu_execution("block_diagonal")`` runs a grouped conv as one dense conv with a
block-diagonal weight: g times the FLOPs, the same output, and on small inputs often faster,
because PyTorch sends small dense convs to its own im2col + GEMM path and grouped ones to
oneDNN (``scripts/bench_cpu_kernels.py``). ``"dense"`` folds the whole pair into one dense conv
with the original layer's geometry: the same function at the original's FLOPs, for layers where
two small convs cost more than one (per-call overhead dominates small layers at batch 1). Each
eligible layer is timed every way it can run, alone, side by side; the fastest is kept; then the
whole model is timed before and after, side by side, and the change is kept only if the whole
model is faster: the per-layer picks, or every pair dense, whichever is faster as a whole.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from fga_search.core._fga import CPU_EXECUTIONS, FGAConv2d
from fga_search.latency import Target, measure_side_by_side

__all__ = ["apply_cpu_execution", "choose_cpu_execution", "cpu_target"]


def cpu_target(target: Target | None) -> Target:
    """``target``, which must be a CPU target; None: this CPU at PyTorch's threads, batch 1,
    float32, NCHW."""
    if target is None:
        return Target("cpu")
    if target.device != "cpu":
        raise ValueError(f"target must be a CPU target, got {target.device!r}")
    return target


def _executions(layer: FGAConv2d, allowed: Sequence[str]) -> list[str]:
    """The ways ``layer`` can run on CPU inputs among ``allowed``, grouped first."""
    return ["grouped", *(way for way in CPU_EXECUTIONS[1:] if way in allowed and layer.can_run(way))]


def _eligible(model: nn.Module, allowed: Sequence[str]) -> dict[str, FGAConv2d]:
    return {
        name: m
        for name, m in model.named_modules()
        if isinstance(m, FGAConv2d) and len(_executions(m, allowed)) > 1
    }


def apply_cpu_execution(model: nn.Module, layers: dict[str, str]) -> None:
    """Set the recorded execution of each named FGA layer (``ValueError`` for another name)."""
    for name, execution in layers.items():
        try:
            module = model.get_submodule(name)
        except AttributeError:
            module = None
        if not isinstance(module, FGAConv2d):
            raise ValueError(f"cpu_execution names {name!r}, which is not an FGA layer of the model")
        module.set_cpu_execution(execution)


def _geometry(
    layer: FGAConv2d, shape: tuple[int, ...], executions: Sequence[str], target: Target
) -> tuple[object, ...]:
    """What a layer's timing depends on: its structure and input size, the ways allowed, the
    target (threads, batch, dtype, memory format)."""
    return (
        layer.in_channels,
        layer.out_channels,
        tuple(layer.kernel_size),
        tuple(layer.grouped.stride),
        tuple(layer.grouped.padding),  # type: ignore[arg-type]
        tuple(layer.grouped.dilation),
        layer.base_groups,
        layer.groups,
        layer.rank,
        layer.pointwise.bias is not None,
        shape,
        tuple(_executions(layer, executions)),
        target,
    )


@torch.inference_mode()
def _layer_inputs(
    model: nn.Module, names: Sequence[str], input_shape: Sequence[int]
) -> dict[str, tuple[int, ...]]:
    shapes: dict[str, tuple[int, ...]] = {}
    hooks = [
        model.get_submodule(name).register_forward_pre_hook(
            lambda _m, args, name=name: shapes.__setitem__(name, tuple(args[0].shape[1:]))
        )
        for name in names
    ]
    try:
        model(torch.zeros(1, *input_shape))
    finally:
        for h in hooks:
            h.remove()
    return shapes


def choose_cpu_execution(
    model: nn.Module,
    *,
    input_shape: Sequence[int],
    target: Target | None = None,
    runs: int = 50,
    executions: Sequence[str] = CPU_EXECUTIONS,
    memo: dict[tuple[object, ...], str] | None = None,
) -> dict[str, Any]:
    """Time each eligible FGA layer of ``model`` on the CPU ``target`` (its threads, batch, dtype
    and memory format; None: PyTorch's threads, batch 1, float32, NCHW) every way it can
    run (grouped, block-diagonal, dense) and pick the fastest; then time the whole model as it was,
    with those picks, with every grouped conv block-diagonal and with every pair dense, side by
    side, and keep the fastest of the last three only if it beats the first. Modifies ``model``;
    returns what was chosen and measured: ``layers`` (name -> ``"block_diagonal"`` or ``"dense"``,
    the layers changed; empty if none was kept), ``before_ms``, ``after_ms`` (the kept option, or
    the fastest one), ``per_layer_ms``, ``all_block_diagonal_ms``, ``all_dense_ms`` and ``kept``.
    ``executions`` limits the ways tried (``"grouped"`` is always one). Layers of one geometry
    (channels, kernel, stride, padding, dilation, groups, rank, bias, input size) take the way
    timed for the first of them; ``memo`` (a dict, filled here) carries those picks over to
    later calls, e.g. for the members of one Pareto front."""
    if isinstance(runs, bool) or not isinstance(runs, int) or runs < 10:
        raise ValueError(f"runs must be an integer >= 10, got {runs!r}")
    if isinstance(executions, str) or any(way not in CPU_EXECUTIONS for way in executions):
        raise ValueError(f"executions must be a sequence of {', '.join(CPU_EXECUTIONS)}, got {executions!r}")
    target = cpu_target(target)
    model = model.eval()
    eligible = _eligible(model, executions)
    result: dict[str, Any] = {"layers": {}, "candidates": len(eligible), "kept": False, "runs": runs}
    if not eligible:
        return result
    shapes = _layer_inputs(model, list(eligible), input_shape)
    rounds = max(1, runs // 10)
    # Timings depend on a layer's geometry, not on its weights: each geometry is timed once (a
    # ResNet-56 plan has a few distinct ones among its 55 layers), and across calls with ``memo``.
    fastest_of = memo if memo is not None else {}
    chosen: dict[str, str] = {}
    for name, layer in eligible.items():
        if name not in shapes:  # not reached by the forward pass
            continue
        key = _geometry(layer, shapes[name], executions, target)
        if key not in fastest_of:
            ways: dict[str, nn.Module] = {"grouped": layer}
            for execution in _executions(layer, executions)[1:]:
                way = copy.deepcopy(layer)
                way.set_cpu_execution(execution)
                ways[execution] = way
            ms = measure_side_by_side(ways, input_shape=shapes[name], target=target, rounds=rounds)
            fastest_of[key] = min(ms, key=ms.__getitem__)
        if fastest_of[key] != "grouped":
            chosen[name] = fastest_of[key]
    # Layers cost more inside the model than alone, so the whole model decides, side by side:
    # the per-layer picks, every grouped conv block-diagonal (what a trial's measurement takes
    # when it is faster: the export must not lose it) and every pair folded dense (about the
    # original's time), as far as allowed.
    options: dict[str, dict[str, str]] = {"after": chosen} if chosen else {}
    if "block_diagonal" in executions:
        block = {
            name: "block_diagonal"
            for name, layer in eligible.items()
            if layer.can_run_block_diagonal and name in shapes
        }
        if block and block != chosen:
            options["all block-diagonal"] = block
    if "dense" in executions:
        dense = {name: "dense" for name, layer in eligible.items() if layer.can_run_dense and name in shapes}
        if dense:
            options["all dense"] = dense
    if not options:
        return result
    timed: dict[str, nn.Module] = {"before": model}
    for label, layers in options.items():
        timed[label] = copy.deepcopy(model)
        apply_cpu_execution(timed[label], layers)
    ms = measure_side_by_side(timed, input_shape=input_shape, target=target, rounds=rounds)
    best = min(options, key=ms.__getitem__)
    result.update(
        before_ms=ms["before"],
        after_ms=ms[best],
        per_layer_ms=ms.get("after"),
        all_block_diagonal_ms=ms.get("all block-diagonal"),
        all_dense_ms=ms.get("all dense"),
    )
    if ms[best] < ms["before"]:
        apply_cpu_execution(model, options[best])
        result.update(layers=options[best], kept=True)
    return result
