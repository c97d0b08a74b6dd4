"""Speed: latency-aware search on the target, the latency lookup table's accuracy, and GPU trials.

``cpu`` (these machines: 2 threads, batch 1, float32), on the shared ResNet-56:

1. the lookup table's whole-model estimate vs the measured model, for uniform and searched plans
   of ResNet-56 and VGG-16 (mean and max absolute error of the latency ratio);
2. ``fga-search --budget-metric latency --budget 0.6 --target cpu:2``: the exported best model's
   latency vs the original's, measured in this process (medians of --runs runs, at least 50),
   and its accuracy;
3. the best FLOPs-only model at budget 0.2: its latency ratio on the same target;
4. batch-norm folding: the export folds BNs into the convs before them where measured faster;
   each exported model is also timed against the original with its BNs folded alike (the search
   itself times every model, and the original, with BNs folded on CPU targets);
5. stability: the exported models re-timed against the folded original in --stability-blocks
   more blocks, since these machines' speed drifts over minutes and the ratios with it.

``gpu`` (an H100/H200; run by scripts/gpu_check.sh), on the shared ResNet-56 and CIFAR-10,
batch 512, bf16 autocast, channels_last:

1. fine-tuning throughput (images/s) of the original and of an FGA ResNet-56 at budget 0.2, in
   fga-search's loop (data resident on the GPU, augmentation on the GPU, cached teacher logits)
   vs a plain PyTorch loop on synthetic data already on the GPU, measured in the same run;
2. seconds per 1-epoch trial (decomposition, refinement, BN recalibration, proxy evaluation,
   fine-tuning, evaluation), median of 3 after a warm-up trial;
3. a latency search on the GPU target (batch 512, bf16): the best model's latency vs the original;
4. torch.compile: compile seconds and throughput for the FGA model.

Every ratio is measured side by side in one run; figures are medians.

    python scripts/bench_speed.py cpu [--trials 40] [--runs 100] [--table-only] [--searches latency,flops]
    python scripts/bench_speed.py gpu --data-dir DIR --weights resnet56_cifar10.pt
    python scripts/bench_speed.py deploy [--cases resnet50,vgg16]   # where the model ships: ONNX
        # Runtime latency searches and exports (scripts/_bench_deploy.py)
    python scripts/bench_speed.py ranks [--cases vgg16,resnet56,resnet50]   # does rank_multiple
        # make whole models faster in ONNX Runtime? (scripts/_bench_ranks.py)
    python scripts/bench_speed.py gpu --device cpu --limit 512 --batch 64 ...   # a dry run of the
        # gpu part's code paths at toy sizes (scripts/gpu_check.sh --dry-run): no measurement
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import shutil
import statistics
import time
from typing import Any

import torch
from torch import nn

from _bench_common import checkpoint, cifar_dir
from fga_search import ModelProfile, build_model, export, load_exported
from fga_search.core._bn_fold import folded_copy
from fga_search.core._spectra import SpectralTable
from fga_search.core._surgery import apply_plan_structure
from fga_search.engine._config import RunConfig
from fga_search.engine._cost import CostModel
from fga_search.engine._search import run_search
from fga_search.engine._setup import LatencyBudgetError, calibrate_latency
from fga_search.engine._space import load_space
from fga_search.engine._strategies import error_alloc_plan, uniform_plan
from fga_search.latency import (
    LatencyModel,
    LatencyTable,
    Target,
    measure_side_by_side,
    measure_side_by_side_as_exported,
)


def side_by_side(
    models: dict[str, nn.Module], *, shape: tuple[int, ...], target: Target, runs: int
) -> dict[str, float]:
    """Median latency of each model, interleaved round by round so that drift hits all alike."""
    return measure_side_by_side(models, input_shape=shape, target=target, rounds=max(1, runs // 10))


def lut_accuracy(name: str, weights: str, target: Target, runs: int) -> None:
    model = build_model(name, num_classes=10, weights=checkpoint(weights))
    profile = ModelProfile(model, input_shape=(3, 32, 32))
    lat = LatencyModel(model, profile, LatencyTable(target))
    space = load_space("resnet_cifar" if name.startswith("resnet") else "vgg_cifar").resolve(profile.layers)
    cost = CostModel(profile, "flops")
    skip = {i.name for i in profile.layers} - {layer.name for layer in space.layers}
    plans = {f"uniform g={g}": uniform_plan(profile, budget=0.2, groups=g, skip=skip) for g in (1, 2, 4, 8)}
    alloc = error_alloc_plan(space, cost, SpectralTable(model), budget=0.2)
    if alloc is not None:
        plans["error-alloc"] = alloc
    # as the search does: calibrate the table on the fastest plan of the space, measured whole
    raw = {label: lat.ratio(plan) for label, plan in plans.items()}
    calibrate_latency(lat, model, space)
    print(f"  {name}: table scale fitted on the fastest plan: {lat.scale:.3f} (1: not calibrated)")
    errors: dict[str, list[float]] = {"raw": [], "calibrated": []}
    for label, plan in plans.items():
        built = apply_plan_structure(copy.deepcopy(model), plan)
        # as the table and the export time it: the faster execution on a CPU
        measured = measure_side_by_side_as_exported(
            {"o": model, "p": built}, input_shape=(3, 32, 32), target=target, rounds=max(1, runs // 10)
        )
        ratio = measured["p"] / measured["o"]
        est = lat.ratio(plan)
        errors["raw"].append(abs(raw[label] - ratio))
        errors["calibrated"].append(abs(est - ratio))
        print(
            f"  {name} {label:<12} FLOPs {profile.ratio(plan):.3f}  latency ratio: table {raw[label]:.3f}, "
            f"calibrated {est:.3f}, measured {ratio:.3f}"
        )
    for kind, errs in errors.items():
        print(
            f"  {name}: {kind} estimate vs measured latency ratio (held-out plans): mean abs error "
            f"{statistics.mean(errs):.3f}, max {max(errs):.3f}"
        )


def rows(run_dir: str) -> list[dict[str, Any]]:
    import pyarrow.parquet as pq

    return pq.read_table(os.path.join(run_dir, "trials.parquet")).to_pylist()  # type: ignore[no-any-return]


def cpu(args: argparse.Namespace) -> None:
    torch.set_num_threads(2)
    target = Target.parse("cpu:2")
    print(f"target {target.key()}")
    print("1. lookup table vs measured whole model (batch 1, float32, 2 threads):")
    lut_accuracy("resnet56", "resnet56_cifar10.pt", target, args.runs)
    lut_accuracy("vgg16_cifar", "vgg16_cifar10.pt", target, args.runs)
    if args.table_only:
        return

    common = dict(
        model="resnet56",
        weights=checkpoint("resnet56_cifar10.pt"),
        dataset="imagefolder",
        data_dir=cifar_dir(),
        trials=args.trials,
        epochs=args.epochs,
        train_limit=10_000,
        val_limit=2_000,
        test_limit=2_000,
        device="cpu",
        quiet=True,
    )
    runs = {}
    latency = dict(budget_metric="latency", objective="accuracy,latency", target="cpu:2")
    searches = (
        ("latency", dict(budget=args.latency_budget, **latency)),
        ("flops", dict(budget=0.2)),
    )
    for label, extra in (s for s in searches if s[0] in args.searches):
        out = os.path.join(args.out, f"r56-{label}")
        shutil.rmtree(out, ignore_errors=True)
        start = time.perf_counter()
        try:
            result = run_search(RunConfig(out=out, **common, **extra))  # type: ignore[arg-type]
        except LatencyBudgetError as exc:  # out of reach on this machine: say so, then search above it
            budget = min(1.0, round(exc.floor + 0.05, 2))
            print(f"  latency budget {args.latency_budget}: refused: {exc}")
            print(
                f"  searching at latency budget {budget} instead (the fastest plan's estimate + 0.05, at most 1)"
            )
            label = f"latency@{budget}"
            out = os.path.join(args.out, "r56-latency-reachable")
            shutil.rmtree(out, ignore_errors=True)
            result = run_search(RunConfig(out=out, **common, **{**extra, "budget": budget}))  # type: ignore[arg-type]
        if extra.get("budget_metric") == "latency":  # how the trials measured, and where the repair aimed
            done = rows(out)
            timed = [r for r in done if r.get("latency_ratio") is not None and r.get("duplicate_of") is None]
            within = [r for r in timed if r.get("within_budget")]
            aims = [float(r["latency_aim"]) for r in done if r.get("latency_aim") is not None]
            print(
                f"  {label} search: {len(done)} trials, {len(timed)} built and measured, {len(within)} of them "
                "within the budget"
                + (
                    f"; the repair's aim went from {aims[0]:.3f} to {aims[-1]:.3f} (lowest {min(aims):.3f})"
                    if aims
                    else ""
                )
            )
        if result.best is None:  # every trial over the budget (as measured): nothing to export
            ratios = sorted(
                float(r["latency_ratio"]) for r in rows(out) if r.get("latency_ratio") is not None
            )
            print(
                f"  the {label} search found no model within its budget in {result.finished} trials "
                f"({(time.perf_counter() - start) / 60:.1f} min); measured latency ratios of its built models: "
                + (f"{ratios[0]:.3f} to {ratios[-1]:.3f}" if ratios else "none")
            )
            continue
        ex = export(out, pick="best", out=os.path.join(out, "export"))
        runs[label] = (result, ex, time.perf_counter() - start)
    original = build_model("resnet56", num_classes=10, weights=checkpoint("resnet56_cifar10.pt"))
    models = {"original": original}
    for label, (_, ex, _) in runs.items():
        models[label] = load_exported(ex.out)  # batch norms folded where the export measured it faster
        models[f"{label}, BNs unfolded"] = load_exported(ex.out, fold_batchnorm=False)
    models["original+bnfold"] = folded_copy(original.eval())  # as the export folds them
    ms = side_by_side(models, shape=(3, 32, 32), target=target, runs=args.runs)
    base = ms["original"]
    print(
        f"2./3. exported best models, latency measured in this process ({args.runs} runs, medians; original {base:.3f} ms):"
    )
    for label, (result, ex, seconds) in runs.items():
        spec = ex.spec
        folded = (spec.get("bn_fold") or {}).get("kept", False)
        print(
            f"  best of the {label} search ({result.finished} trials, {seconds / 60:.1f} min): latency ratio {ms[label] / base:.3f} "
            f"(BNs {'folded' if folded else 'unfolded'} by the export; {ms[label] / ms['original+bnfold']:.3f} against the "
            f"original with its BNs folded alike), "
            f"FLOPs ratio {spec['flops']['ratio']:.3f}, val {spec['accuracy']['val']:.4f}, test {spec['accuracy']['test']:.4f} "
            f"(original test {result.baseline['test_acc']:.4f})"
        )
    print(
        "4. batch-norm folding (the export's, fga_search.core._bn_fold), latency ratio vs the same model unfolded:"
    )
    print(f"  original: {ms['original+bnfold'] / base:.3f}")
    for label in runs:
        print(f"  {label}: {ms[label] / ms[f'{label}, BNs unfolded']:.3f}")
    # these machines' speed drifts over minutes (the original at about 3.8 ms for a while, about
    # 7 ms for another): the ratios move with it, so show them block by block
    blocks = args.stability_blocks
    print(
        f"5. stability: {blocks} more blocks of {args.runs} runs each, side by side; per block the original's "
        "ms and each exported model's ratio to the original with its BNs folded alike:"
    )
    pair = {"original+bnfold": models["original+bnfold"], **{label: models[label] for label in runs}}
    per_block: dict[str, list[float]] = {label: [] for label in runs}
    for i in range(blocks):
        block = side_by_side(pair, shape=(3, 32, 32), target=target, runs=args.runs)
        cells = []
        for label in runs:
            per_block[label].append(block[label] / block["original+bnfold"])
            cells.append(f"{label} {per_block[label][-1]:.3f}")
        print(f"  block {i + 1}: original+bnfold {block['original+bnfold']:.3f} ms; " + ", ".join(cells))
    for label, ratios in per_block.items():
        if ratios:
            print(
                f"  {label}: median {statistics.median(ratios):.3f}, min {min(ratios):.3f}, max {max(ratios):.3f}"
            )


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def plain_loop(
    model: nn.Module,
    *,
    batch: int,
    steps: int,
    shape: tuple[int, ...],
    device: torch.device,
    warmup: int = 10,
) -> float:
    """Images/s of a bare SGD + cross-entropy loop on synthetic data already on the device."""
    model = copy.deepcopy(model).to(device).to(memory_format=torch.channels_last).train()
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, nesterov=True)
    x = torch.randn(batch, *shape, device=device).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (batch,), device=device)

    def step() -> None:
        with torch.autocast(device.type, dtype=torch.bfloat16):
            loss = nn.functional.cross_entropy(model(x).float(), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    for _ in range(warmup):
        step()
    _sync(device)
    start = time.perf_counter()
    for _ in range(steps):
        step()
    _sync(device)
    return batch * steps / (time.perf_counter() - start)


def gpu(args: argparse.Namespace) -> None:
    from fga_search.engine._setup import prepare
    from fga_search.train._finetune import FinetuneConfig, finetune
    from fga_search.train._trial import TrialRunner

    device = torch.device(args.device)
    if device.type == "cuda":
        assert torch.cuda.is_available(), "the gpu benchmark needs CUDA (or --device cpu for a dry run)"
        print(f"device {torch.cuda.get_device_name()}, torch {torch.__version__}")
    else:  # a dry run of this part's code paths, at toy sizes: its figures mean nothing
        print(f"dry run on {device} (figures are not measurements), torch {torch.__version__}")
    batch = args.batch
    config = RunConfig(
        out=os.path.join(args.out, "gpu-setup"),
        model="resnet56",
        weights=args.weights or checkpoint("resnet56_cifar10.pt"),
        dataset="imagefolder",
        data_dir=args.data_dir or cifar_dir(),
        batch_size=batch,
        lr=0.05,
        epochs=1.0,
        device=args.device,
        train_limit=args.limit,
        val_limit=args.limit,
        test_limit=args.limit,
        quiet=True,
    )
    start = time.perf_counter()
    setup = prepare(config, log=False)
    print(f"setup (data decode or cache, model, space): {time.perf_counter() - start:.1f} s")
    runner = TrialRunner(
        model=setup.model, data=setup.data, normalization=setup.normalization, device=setup.device,
        settings=setup.settings, seed=0, profile=setup.profile,
    )  # fmt: skip
    plan = uniform_plan(setup.profile, budget=0.2, groups=1, skip={"conv1"})
    fga = runner.build(plan, seed=0)
    print(
        f"1. throughput, batch {batch}, bf16, channels_last (FGA plan: uniform g=1, FLOPs {setup.profile.ratio(plan):.3f}):"
    )
    for label, model in (("original", runner.model), ("FGA 0.2", fga)):
        plain = plain_loop(
            model, batch=batch, steps=args.plain_steps, shape=setup.data.input_shape, device=device,
            warmup=min(10, args.plain_steps),
        )  # fmt: skip
        student = copy.deepcopy(model)
        cfg = FinetuneConfig(epochs=1.0, batch_size=batch, lr=0.01)
        finetune(
            student, runner.train, config=cfg, teacher=runner.teacher, allow_flip=True, seed=0
        )  # warm-up, fills the teacher cache
        stats = finetune(student, runner.train, config=cfg, teacher=runner.teacher, allow_flip=True, seed=1)
        ours = stats.images / stats.seconds
        print(
            f"  {label:<9} plain loop on synthetic data {plain:>8.0f} img/s; fga-search loop on CIFAR-10 {ours:>8.0f} img/s = {ours / plain:.2f} of plain"
        )
    print(
        "2. 1-epoch trials (decompose + refine + BN recalibration + proxy eval + 1 epoch KD fine-tune + eval):"
    )
    times = []
    for i, groups in enumerate((1, 2, 1, 4)):
        p = uniform_plan(setup.profile, budget=0.2, groups=groups, skip={"conv1"})
        out = runner.run(p, seed=i)
        phases = ", ".join(f"{k} {v:.2f}" for k, v in out.seconds.items())
        print(f"  trial {i} (g={groups}): {out.seconds['total']:.2f} s, val {out.val_acc:.4f} ({phases})")
        if i:
            times.append(out.seconds["total"])
    print(
        f"  seconds per 1-epoch trial: median {statistics.median(times):.2f} s (after a warm-up trial); target < 6 s on an H100"
    )
    target_name = "cuda" if device.type == "cuda" else "cpu:2"
    print(f"3. latency search on the target {target_name} (batch {args.target_batch}, bf16, channels_last):")
    out_dir = os.path.join(args.out, "gpu-latency")
    shutil.rmtree(out_dir, ignore_errors=True)
    lat_config = RunConfig(
        **{**config.to_dict(), "out": out_dir, "objective": "accuracy,latency", "budget_metric": "latency", "budget": args.gpu_latency_budget,
           "target": target_name, "target_batch": args.target_batch, "target_dtype": "bf16", "trials": args.gpu_trials,
           "epochs": 0.5}
    )  # fmt: skip
    start = time.perf_counter()
    result = run_search(lat_config)
    if result.best is not None:
        best = result.best
        target = Target.parse(target_name, batch=args.target_batch, dtype="bf16")
        original = runner.model
        from fga_search.core._plan import load_plan

        built = apply_plan_structure(copy.deepcopy(original), load_plan(best["plan"]))
        ms = side_by_side(
            {"original": original, "best": built}, shape=setup.data.input_shape, target=target, runs=50
        )
        record = json.load(open(os.path.join(out_dir, "run.json")))
        pinned = record["latency"]["pinned_layers"]
        fastest = min((r["latency_ratio"] for r in result.front if r.get("latency_ratio")), default=None)
        print(
            f"  {result.finished} trials in {time.perf_counter() - start:.0f} s; {len(pinned)} of {len(setup.space.layers)} layers kept "
            f"dense (every FGA candidate slower on this target); best within latency budget {args.gpu_latency_budget}: "
            f"val {best['val_acc']:.4f}, FLOPs {best['flops_ratio']:.3f}, latency ratio {ms['best'] / ms['original']:.3f} "
            f"(original {ms['original']:.3f} ms per batch of {args.target_batch}); fastest front member's ratio {fastest}"
        )
    else:
        measured = ", ".join(
            f"{r.get('status')} {r.get('latency_ratio') or float('nan'):.3f}" for r in rows(out_dir)
        )
        print(
            f"  no trial within the latency budget {args.gpu_latency_budget} in {result.finished} trials "
            f"(status and measured latency ratio of each: {measured})"
        )
    if args.skip_compile:
        print("4. torch.compile: skipped (--skip-compile)")
        return
    print("4. torch.compile (FGA model, 1 epoch):")
    student = copy.deepcopy(fga)
    start = time.perf_counter()
    stats = finetune(
        student,
        runner.train,
        config=FinetuneConfig(epochs=1.0, batch_size=batch, lr=0.01, compile=True),
        teacher=runner.teacher,
        seed=0,
    )
    first = time.perf_counter() - start
    stats2 = finetune(
        student,
        runner.train,
        config=FinetuneConfig(epochs=1.0, batch_size=batch, lr=0.01, compile=True),
        teacher=runner.teacher,
        seed=1,
    )
    print(
        f"  first compiled epoch {first:.1f} s (compile included), next {stats2.seconds:.1f} s = {stats2.images / stats2.seconds:.0f} img/s; "
        f"a 1-epoch trial pays for compiling only if compile time < the epoch time saved"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("mode", choices=["cpu", "gpu", "deploy", "ranks"])
    parser.add_argument("--trials", type=int, default=40, help="trials per CPU search")
    parser.add_argument("--epochs", type=float, default=0.05, help="fine-tuning epochs per CPU trial")
    parser.add_argument("--runs", type=int, default=100, help="latency runs per model (>= 50)")
    parser.add_argument("--latency-budget", type=float, default=0.6, help="CPU latency search budget")
    parser.add_argument(
        "--stability-blocks", type=int, default=5, help="cpu: blocks of --runs runs that re-time the exports"
    )
    parser.add_argument("--gpu-trials", type=int, default=12)
    parser.add_argument("--gpu-latency-budget", type=float, default=1.0)
    parser.add_argument("--device", default="cuda", help="gpu: the device (cpu: a dry run of the code paths)")
    parser.add_argument("--batch", type=int, default=512, help="gpu: fine-tuning batch size")
    parser.add_argument("--target-batch", type=int, default=512, help="gpu: the latency target's batch size")
    parser.add_argument("--plain-steps", type=int, default=60, help="gpu: timed steps of the plain loop")
    parser.add_argument("--limit", type=int, help="gpu: cap every split at this many images (a dry run)")
    parser.add_argument("--skip-compile", action="store_true", help="gpu: skip part 4 (torch.compile)")
    parser.add_argument("--data-dir")
    parser.add_argument("--weights")
    parser.add_argument("--out", default="runs/bench-speed")
    parser.add_argument("--table-only", action="store_true", help="cpu: only part 1 (the lookup table)")
    parser.add_argument(
        "--searches",
        type=lambda text: text.split(","),
        default=["latency", "flops"],
        help="cpu: which searches of parts 2-3 run (latency, flops; default both)",
    )
    parser.add_argument(
        "--cases", type=lambda t: t.split(","), default=["resnet50", "vgg16"], help="deploy: resnet50, vgg16"
    )
    parser.add_argument("--deploy-trials", type=int, default=8, help="deploy: trials per latency search")
    parser.add_argument("--deploy-budget", type=float, help="deploy: latency budget (default 0.5 / 0.40)")
    parser.add_argument(
        "--finetune-epochs", type=float, default=10.0, help="deploy: vgg16's export fine-tune"
    )
    parser.add_argument(
        "--finetune-lr", type=float, default=None, help="deploy: its peak learning rate (default: the run's)"
    )
    parser.add_argument("--repeats", type=int, default=3, help="deploy, ranks: side-by-side repetitions")
    parser.add_argument(
        "--rank-budgets", type=lambda t: [float(b) for b in t.split(",")], default=[0.2, 0.4],
        help="ranks: FLOPs budgets of the error-allocation plans (cases: vgg16, resnet56, resnet50)",
    )  # fmt: skip
    args = parser.parse_args()
    if args.mode == "deploy":
        from _bench_deploy import deploy

        return deploy(args)
    if args.mode == "ranks":
        from _bench_ranks import ranks

        return ranks(args)
    if not args.searches or set(args.searches) - {"latency", "flops"}:
        parser.error(f"--searches takes latency, flops or both, got {','.join(args.searches)}")
    if args.runs < 50:
        parser.error("--runs must be at least 50")
    cpu(args) if args.mode == "cpu" else gpu(args)


if __name__ == "__main__":
    main()
