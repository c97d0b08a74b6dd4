"""Multi-fidelity against single-fidelity search at equal wall-clock (issue 29).

The shared ResNet-56 at budget 0.2 of the FLOPs, searched for ``--timeout`` seconds each (no new
trial starts after it; the one running ends):

* ``single``: every trial fine-tunes the top rung's epochs (``--epochs`` = the last of ``--rungs``);
* ``continue``: ``--rungs`` with ASHA promotions (``--eta``), a promoted plan going on from its
  weights at the rung below (``--promote continue``);
* ``rerun``: the same, a promoted plan retraining its rung's epochs from the decomposed model.

Per run, at the top fidelity only (the rungs' front is the highest rung reached): the best
validation accuracy within the budget, its test accuracy, the front's hypervolume (reference:
0 accuracy, FLOPs 1) and the number of plans tried; then, per mode, the mean and the worst over
the seeds of the lead over ``single`` (target: +1 point on the mean, never below 0).

CPU sizes (bench_quality's): 10,000 training, 2,000 validation and 2,000 test images, batch
128, 128 calibration and 512 recalibration images. ``--mode gpu`` (scripts/gpu_check.sh): the
full splits, batch 512, peak learning rate 0.05, 1-epoch top rungs.

    python scripts/bench_fidelity.py [--seeds 0,1,2] [--timeout 1200] [--rungs 0,0.05,0.2] [--modes single,continue,rerun]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import time
from dataclasses import dataclass

import torch

from _bench_common import checkpoint, cifar_dir, trial_sizes
from fga_search.engine._config import RunConfig
from fga_search.engine._search import run_search
from fga_search.runs._pareto import front_rows, hypervolume
from fga_search.runs._records import TrialRecord, read_records

MODES = ("single", "continue", "rerun")


@dataclass
class Run:
    mode: str
    seed: int
    best_val: float | None
    best_test: float | None
    flops: float | None
    hv: float
    plans: int
    trials: int
    top_rung: int | None
    seconds: float


def run_one(args: argparse.Namespace, mode: str, seed: int) -> Run:
    out = os.path.join(args.out, f"{mode}-s{seed}")
    shutil.rmtree(out, ignore_errors=True)
    gpu = args.mode == "gpu"
    rungs = args.rungs or ("0,0.1,1" if gpu else "0,0.05,0.2")
    fidelity = (
        {"epochs": float(rungs.split(",")[-1])}
        if mode == "single"
        else {"rungs": rungs, "eta": args.eta, "promote": mode}
    )
    config = RunConfig(
        out=out,
        model="resnet56",
        weights=checkpoint("resnet56_cifar10.pt"),
        dataset="imagefolder",
        data_dir=args.data_dir or cifar_dir(),
        budget=0.2,
        trials=100_000,  # the timeout ends the run
        timeout=args.timeout,
        seed=seed,
        device=args.device,
        **trial_sizes(gpu=gpu, limit=args.limit),  # type: ignore[arg-type]
        front_latency_runs=0,
        quiet=True,
        **fidelity,  # type: ignore[arg-type]
    )
    start = time.perf_counter()
    result = run_search(config)
    seconds = time.perf_counter() - start
    records = read_records(os.path.join(out, "trials.parquet"), TrialRecord)
    front = front_rows(records, costs=config.costs)  # the top fidelity's (the highest rung reached)
    best = result.best
    finished = [r for r in records if r.state == "COMPLETE"]
    return Run(
        mode=mode,
        seed=seed,
        best_val=best.val_acc if best else None,
        best_test=best.test_acc if best else None,
        flops=best.flops_ratio if best else None,
        hv=hypervolume([r.val_acc for r in front], [r.flops_ratio for r in front]),
        plans=sum(1 for r in finished if not r.rung),
        trials=len(finished),
        top_rung=max((r.rung for r in front if r.rung is not None), default=None),
        seconds=seconds,
    )


def pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.2f} %"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mode", choices=["cpu", "gpu"], default="cpu")
    parser.add_argument("--seeds", type=lambda t: [int(s) for s in t.split(",")], default=[0, 1, 2])
    parser.add_argument("--timeout", type=float, default=1200.0, help="seconds of search per run")
    parser.add_argument("--rungs", help="fine-tuning epochs per rung (default 0,0.05,0.2; gpu 0,0.1,1)")
    parser.add_argument("--eta", type=int, default=3)
    parser.add_argument("--modes", type=lambda t: t.split(","), default=list(MODES))
    parser.add_argument("--device", default=None)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--out", default="runs/bench-fidelity")
    parser.add_argument("--limit", type=int, help="cap every split at this many images (a quick dry run)")
    args = parser.parse_args()
    if not args.modes or set(args.modes) - set(MODES):  # the leads need single's runs (or split runs)
        parser.error(f"--modes takes any of single, continue, rerun; got {','.join(args.modes)}")
    torch.set_num_threads(args.threads)
    runs: list[Run] = []
    for seed in args.seeds:
        for mode in args.modes:
            run = run_one(args, mode, seed)
            runs.append(run)
            print(
                f"{mode:<8} seed {seed}: best val {pct(run.best_val)} (test {pct(run.best_test)}, FLOPs "
                f"{run.flops if run.flops is None else round(run.flops, 3)}), HV {run.hv:.4f}, {run.plans} plans "
                f"({run.trials} trials, top rung {run.top_rung}), {run.seconds:.0f} s",
                flush=True,
            )
    print(
        "\n| mode | seed | best val acc (top fidelity) | its test acc | HV | plans (trials) | top rung | wall |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for r in runs:
        print(
            f"| {r.mode} | {r.seed} | {pct(r.best_val)} | {pct(r.best_test)} | {r.hv:.4f} | {r.plans} ({r.trials}) | "
            f"{'-' if r.top_rung is None else r.top_rung} | {r.seconds:.0f} s |"
        )
    single = {r.seed: r for r in runs if r.mode == "single"}
    for mode in args.modes:
        if mode == "single":
            continue
        leads = [
            100 * ((r.best_val or 0.0) - (single[r.seed].best_val or 0.0))
            for r in runs
            if r.mode == mode and r.seed in single
        ]
        if leads:
            print(
                f"{mode} vs single, best val within budget: {', '.join(f'{v:+.2f}' for v in leads)} "
                f"(mean {statistics.mean(leads):+.2f}, worst {min(leads):+.2f}) points"
            )


if __name__ == "__main__":
    main()
