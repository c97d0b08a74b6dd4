"""Evaluation throughput by batch size on this machine's CPU: why trials evaluate in batches of
64 on CPUs (and 512 on GPUs).

For each model (the shared ResNet-56 and VGG-16 by default), the original and its
error-allocation FGA model at 20 % of the FLOPs are scored on 2,000 validation images of the
shared CIFAR-10 at several batch sizes; every batch size is timed side by side, round by round,
and the medians are printed with their ratio to batch 512.

    python scripts/bench_eval.py [--rounds 3] [--threads 2] [--models resnet56,vgg16_cifar]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from _bench_common import WEIGHTS, checkpoint, cifar_dir
from fga_search.engine._config import RunConfig
from fga_search.engine._setup import make_runner, prepare
from fga_search.engine._strategies import error_alloc_plan
from fga_search.train._evaluate import evaluate

BATCHES = (32, 64, 128, 256, 512)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument(
        "--models", default=",".join(WEIGHTS), help=f"comma-separated, of {', '.join(WEIGHTS)}"
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    names = [name for name in args.models.split(",") if name]
    for name in names:
        if name not in WEIGHTS:
            parser.error(f"unknown model {name!r}; choose from {', '.join(WEIGHTS)}")
    for name in names:
        bench(name, args)


def bench(model_name: str, args: argparse.Namespace) -> None:
    config = RunConfig(
        out="runs/bench-eval",
        model=model_name,
        weights=checkpoint(WEIGHTS[model_name]),
        dataset="imagefolder",
        data_dir=cifar_dir(),
        train_limit=2_000,
        val_limit=2_000,
        test_limit=100,
        device="cpu",
        calibration=128,
        recalibration=512,
        quiet=True,
    )
    setup = prepare(config, log=False)
    runner = make_runner(setup)
    plan = error_alloc_plan(setup.space, setup.cost, setup.spectra, budget=0.2)
    assert plan is not None
    models = {"original": setup.model, "FGA @0.2": runner.build(plan, seed=0).eval()}
    times: dict[tuple[str, int], list[float]] = {}
    for _ in range(args.rounds):
        for name, model in models.items():
            for batch in BATCHES:
                start = time.perf_counter()
                evaluate(model, runner.val, batch_size=batch)
                times.setdefault((name, batch), []).append(time.perf_counter() - start)
    print(
        f"{model_name}: evaluation of {len(runner.val)} images, {args.threads} CPU threads, medians of {args.rounds}:"
    )
    for name in models:
        ref = statistics.median(times[(name, 512)])
        cells = ", ".join(
            f"batch {b}: {statistics.median(times[(name, b)]):.2f} s ({statistics.median(times[(name, b)]) / ref:.2f}x)"
            for b in BATCHES
        )
        print(f"  {name}: {cells}")


if __name__ == "__main__":
    main()
