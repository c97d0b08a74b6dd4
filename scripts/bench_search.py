"""The search on the shared ResNet-56 and JPEG CIFAR-10, against the uniform plan at the same budget.

10k training images and 2k validation images (stratified subsets), budget 0.2 of the FLOPs,
--epochs 0.05 of fine-tuning per trial, for --minutes on this machine's CPU (2 threads).
Prints trials per minute, the feasibility rate, the best validation accuracy within budget
and the zero-cost proxy accuracy of the same plan; then the same figures for the uniform plans
(the same group count and rank fraction in every layer) that match the budget.

    python scripts/bench_search.py [--minutes 10] [--out runs/bench-search]
"""

from __future__ import annotations

import argparse
import shutil
import time

import pyarrow.parquet as pq
import torch

from _bench_common import checkpoint, cifar_dir
from fga_search.engine._config import RunConfig
from fga_search.engine._search import run_search
from fga_search.engine._setup import make_runner, prepare
from fga_search.engine._strategies import uniform_plan


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--epochs", type=float, default=0.05)
    parser.add_argument("--budget", type=float, default=0.2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default="runs/bench-search")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    shutil.rmtree(args.out, ignore_errors=True)
    config = RunConfig(
        out=args.out,
        model="resnet56",
        weights=checkpoint("resnet56_cifar10.pt"),
        dataset="imagefolder",
        data_dir=cifar_dir(),
        budget=args.budget,
        trials=100_000,
        epochs=args.epochs,
        timeout=args.minutes * 60,
        train_limit=10_000,
        val_limit=2_000,
        device=args.device,
        quiet=True,
    )
    start = time.perf_counter()
    result = run_search(config)
    minutes = (time.perf_counter() - start) / 60
    trials = pq.read_table(f"{args.out}/trials.parquet").to_pylist()
    done = [r for r in trials if r["state"] == "COMPLETE"]
    feasible = sum(bool(r["within_budget"]) for r in trials) / max(1, len(trials))
    raw = sum(bool(r["proposal_within_budget"]) for r in trials) / max(1, len(trials))
    best = result.best
    print(
        f"search: {len(trials)} trials in {minutes:.1f} min = {len(trials) / minutes:.2f} trials/min (device {args.device}, {args.threads} threads)"
    )
    print(f"  feasibility: {feasible:.1%} of trials within budget after repair ({raw:.1%} of raw proposals)")
    if best:
        print(
            f"  best within budget: trial {best['trial']}: val {best['val_acc']:.4f}, proxy (before fine-tuning) "
            f"{best['proxy_acc']:.4f}, FLOPs {best['flops_ratio']:.3f}, test {best.get('test_acc') or float('nan'):.4f}"
        )
    print(f"  completed {len(done)}, failed {sum(r['state'] == 'FAIL' for r in trials)}")

    setup = prepare(config, log=False)
    runner = make_runner(setup)
    searched = {layer.name for layer in setup.space.layers}
    skip = {info.name for info in setup.profile.layers if info.name not in searched}
    print(f"uniform plans at budget {args.budget} (same groups and rank fraction in every searched layer):")
    for groups in (1, 2, 4, 8):
        plan = uniform_plan(setup.profile, budget=args.budget, groups=groups, skip=skip)
        t = time.perf_counter()
        out = runner.run(plan, seed=0)
        print(
            f"  g={groups}: val {out.val_acc:.4f}, proxy {out.proxy_acc:.4f}, FLOPs {setup.profile.ratio(plan):.3f}, "
            f"{60 / (time.perf_counter() - t):.2f} trials/min, feasible 100%"
        )


if __name__ == "__main__":
    main()
