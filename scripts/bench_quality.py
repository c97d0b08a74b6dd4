"""Search quality: every strategy at the same trial count and fine-tuning budget, side by side.

Strategies (``--strategy`` of fga-search): ``uniform``, ``error-alloc``, ``random`` and ``search``
(warm-started from the uniform and error-allocation plans and the allocation's cost-slack
variants, then mostly mutations of the best allocation, the rest NSGA-II). Cases: the shared
ResNet-56 at budgets 0.2 and 0.35 of the FLOPs, and the shared VGG-16 at 0.2. For each, prints
the best validation accuracy within budget, its test accuracy, the hypervolume of the front
(reference point: 0 accuracy, FLOPs ratio 1) and the wall time.

Two modes:

* ``--mode cpu`` (proxy): no fine-tuning. A trial is SVD + refinement (128 calibration images)
  + BN recalibration (512 images), scored on 2,000 validation images; test accuracy on 2,000
  test images. Fits in about 20 minutes on 2 CPU cores with ``--trials 12``. No strategy's run
  times its front on the CPU after the search (``front_latency_runs=0``): nothing here reports it.
* ``--mode gpu``: short fine-tunes (``--epochs``, default 1, batch 512) on the full training
  split, validation 5,000 and test 10,000 images; the best ResNet-56 and VGG-16 within budget
  0.2 each get a final distillation fine-tune (``--final-epochs``, default 15), right after that
  model's runs, and are scored on the test split.

    python scripts/bench_quality.py --mode cpu [--trials 12] [--seeds 0,1,2] [--data-seeds 0,101] [--markdown results.md]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import time
from dataclasses import dataclass

import torch

from _bench_common import checkpoint, cifar_dir, trial_sizes
from fga_search.engine._config import RunConfig
from fga_search.engine._search import run_search
from fga_search.runs._pareto import hypervolume

STRATEGIES = ("uniform", "error-alloc", "random", "search")
CASES = (
    ("resnet56", "resnet56_cifar10.pt", 0.2),
    ("resnet56", "resnet56_cifar10.pt", 0.35),
    ("vgg16_cifar", "vgg16_cifar10.pt", 0.2),
)


@dataclass
class Row:
    model: str
    budget: float
    strategy: str
    seed: int
    data_seed: int | None
    trials: int
    best_val: float | None
    best_test: float | None
    flops: float | None
    params: float | None
    hv: float
    seconds: float
    epochs: float
    device: str
    run: str
    plan: str | None


def run_case(
    args: argparse.Namespace,
    model: str,
    weights: str,
    budget: float,
    strategy: str,
    seed: int,
    data_seed: int | None = None,
) -> Row:
    out = os.path.join(args.out, f"{model}-b{budget:g}-{strategy}" + (f"-s{seed}" if seed else ""))
    out += "" if data_seed is None else f"-d{data_seed}"
    shutil.rmtree(out, ignore_errors=True)
    gpu = args.mode == "gpu"
    config = RunConfig(
        out=out,
        model=model,
        weights=checkpoint(weights),
        dataset="imagefolder",
        data_dir=args.data_dir or cifar_dir(),
        budget=budget,
        trials=args.trials,
        epochs=args.epochs if gpu else 0.0,
        strategy=strategy,
        seed=seed,
        data_seed=data_seed,
        device=args.device,
        **trial_sizes(gpu=gpu, limit=args.limit),  # type: ignore[arg-type]
        # The benchmark prints no latency: skip timing each front member on this CPU after the
        # search (a report for users, 17-38 s a ResNet-56 run on these machines, growing with the
        # front's size rather than with what the strategy costs).
        front_latency_runs=0,
        quiet=True,
    )
    start = time.perf_counter()
    result = run_search(config)
    seconds = time.perf_counter() - start
    front = result.front
    best = result.best
    hv = hypervolume([r["val_acc"] for r in front], [r["flops_ratio"] for r in front])
    return Row(
        model=model,
        budget=budget,
        strategy=strategy,
        seed=seed,
        data_seed=data_seed,
        trials=result.finished,
        best_val=best["val_acc"] if best else None,
        best_test=best.get("test_acc") if best else None,
        flops=best["flops_ratio"] if best else None,
        params=best["params_ratio"] if best else None,
        hv=hv,
        seconds=seconds,
        epochs=config.epochs,
        device=str(result.front[0]["device"]) if front else "?",
        run=out,
        plan=best["plan"] if best else None,
    )


def fmt(x: float | None, pct: bool = True) -> str:
    return "-" if x is None else (f"{100 * x:.2f} %" if pct else f"{x:.4f}")


Final = tuple[str, str, dict, dict, float]


def final_finetune(args: argparse.Namespace, rows: list[Row], model: str) -> Final | None:
    """The final distillation fine-tune of the most accurate run of ``model`` at budget 0.2 (gpu
    mode), scored on the test split."""
    from fga_search.exporter._export import export

    best = max(
        (r for r in rows if r.model == model and r.budget == 0.2 and r.best_val is not None),
        key=lambda r: r.best_val or 0.0,
        default=None,
    )
    if best is None:
        return None
    start = time.perf_counter()
    res = export(
        best.run,
        pick="best",
        out=os.path.join(args.out, f"export-{model}"),
        finetune_epochs=args.final_epochs,
        finetune_lr=args.final_lr,
        finetune_batch_size=args.final_batch,
        device=args.device,
    )
    spec = res.spec
    base = json.load(open(os.path.join(best.run, "run.json")))["baseline"]
    acc, recipe = spec["accuracy"], spec["finetune"]["recipe"]
    print(
        f"final fine-tune {model} ({best.strategy}, {args.final_epochs:g} epochs, batch "
        f"{recipe['batch_size']}, peak lr {recipe['lr']:g}): test {100 * acc['test']:.2f} % "
        f"vs the original's {100 * base['test_acc']:.2f} % ({100 * (acc['test'] - base['test_acc']):+.2f} points), "
        f"in {time.perf_counter() - start:.0f} s",
        flush=True,
    )
    return model, best.strategy, spec, base, time.perf_counter() - start


def run_model(
    args: argparse.Namespace,
    rows: list[Row],
    finals: list[Final],
    gains: dict[tuple[str, float, int | None], list[float]],
    model: str,
    weights: str,
    budget: float,
    strategies: list[str],
    seed: int,
    data_seed: int | None,
    seeds: list[int],
) -> None:
    """Every strategy on one case, and the search's gain over the better rule-based plan."""
    for strategy in strategies:
        row = run_case(args, model, weights, budget, strategy, seed, data_seed)
        rows.append(row)
        print(
            f"{model:<12} budget {budget:<5g} {strategy:<12} seed {seed}{'' if data_seed is None else f' data {data_seed}'} trials {row.trials:>3}  best val {fmt(row.best_val)}"
            f"  test {fmt(row.best_test)}  FLOPs {fmt(row.flops)}  HV {row.hv:.4f}  {row.seconds:.0f} s",
            flush=True,
        )
    by = {
        r.strategy: r
        for r in rows
        if (r.model, r.budget, r.seed, r.data_seed) == (model, budget, seed, data_seed)
    }
    if "search" in by and ("uniform" in by or "error-alloc" in by):
        rivals = [by[s].best_val or 0.0 for s in ("uniform", "error-alloc") if s in by]
        gain = 100 * ((by["search"].best_val or 0.0) - max(rivals))
        gains.setdefault((model, budget, data_seed), []).append(gain)
        print(
            f"  -> search vs the better of uniform and error-alloc: {gain:+.2f} points of validation accuracy",
            flush=True,
        )
    if args.mode == "gpu" and args.final_epochs > 0 and budget == 0.2 and seed == seeds[-1]:
        # right after the model's runs, so that a call cut short by its time limit keeps it
        final = final_finetune(args, rows, model)
        if final is not None:
            finals.append(final)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mode", choices=["cpu", "gpu"], default="cpu")
    parser.add_argument("--trials", type=int, default=12)
    parser.add_argument("--epochs", type=float, default=1.0, help="fine-tuning epochs per trial (gpu mode)")
    parser.add_argument(
        "--final-epochs", type=float, default=15.0, help="final fine-tune of the best (gpu mode)"
    )
    parser.add_argument("--final-lr", type=float, help="its peak learning rate (default: the trials', 0.05)")
    parser.add_argument("--final-batch", type=int, help="its batch size (default: the trials', 512)")
    parser.add_argument(
        "--cases", default="all", help="comma-separated case indices (0: R56@0.2, 1: R56@0.35, 2: VGG@0.2)"
    )
    parser.add_argument("--strategies", default=",".join(STRATEGIES))
    parser.add_argument(
        "--seeds", default="0", help="comma-separated seeds; each runs every case (default: 0)"
    )
    parser.add_argument(
        "--data-seeds",
        default="",
        help="comma-separated data seeds (--data-seed: the validation split and subsets); each runs "
        "every seed and case (default: none, the data follow each run's seed)",
    )
    parser.add_argument("--device", default=None)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--out", default="runs/bench-quality")
    parser.add_argument("--markdown", help="also write the results table to this Markdown file")
    parser.add_argument("--limit", type=int, help="cap every split at this many images (a quick dry run)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    cases = CASES if args.cases == "all" else tuple(CASES[int(i)] for i in args.cases.split(","))
    strategies = [s for s in args.strategies.split(",") if s]
    seeds = [int(s) for s in args.seeds.split(",") if s]
    data_seeds: list[int | None] = [int(s) for s in args.data_seeds.split(",") if s] or [None]
    rows: list[Row] = []
    finals: list[Final] = []
    gains: dict[tuple[str, float, int | None], list[float]] = {}
    started = time.perf_counter()
    print(f"mode {args.mode}, {args.trials} trials per strategy, seeds {seeds}", flush=True)
    for data_seed in data_seeds:
        for seed in seeds:
            for model, weights, budget in cases:
                run_model(
                    args, rows, finals, gains, model, weights, budget, strategies, seed, data_seed, seeds
                )
    print(f"wall time of all runs: {(time.perf_counter() - started) / 60:.1f} min", flush=True)
    for (model, budget, data_seed), values in gains.items():
        print(
            f"search's gain over the better of uniform and error-alloc, {model} @{budget:g}, data seed "
            f"{'= seed' if data_seed is None else data_seed}, seeds {seeds}: {', '.join(f'{v:+.2f}' for v in values)} "
            f"(mean {sum(values) / len(values):+.2f}, worst {min(values):+.2f}) points",
            flush=True,
        )
    lines = [
        "| model | budget | strategy | seed | data seed | trials | best val acc | its test acc | FLOPs % | params % | HV | fine-tune epochs / trial | device | wall s |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r.model} | {r.budget:g} | {r.strategy} | {r.seed} | {'=' if r.data_seed is None else r.data_seed} | {r.trials} | {fmt(r.best_val)} | {fmt(r.best_test)} | {fmt(r.flops)} | "
            f"{fmt(r.params)} | {r.hv:.4f} | {r.epochs:g} | {r.device} | {r.seconds:.0f} |"
        )
    for model, strategy, spec, base, seconds in finals:
        acc = spec["accuracy"]
        lines.append(
            f"| {model}, final fine-tune | 0.2 | {strategy} | {seeds[0]} | | 1 | - | {fmt(acc['test'])} (original {fmt(base['test_acc'])}, "
            f"{100 * (acc['test'] - base['test_acc']):+.2f} pp) | {fmt(spec['flops']['ratio'])} | | | {args.final_epochs:g} | "
            f"{args.device} | {seconds:.0f} |"
        )
    table = "\n".join(lines)
    print(table)
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(table + "\n")


if __name__ == "__main__":
    main()
