"""Seconds to build an FGA ResNet-56 and ResNet-50 from a plan at FLOPs ratio 0.2.

Each figure is the median of several builds, SVD only and with data-driven refinement on 256
calibration images (asymmetric mode). ResNet-56 uses the shared trained weights and CIFAR-size
inputs; ResNet-50 (torchvision, random weights: timing does not depend on them) uses 224x224.

    python scripts/bench_decompose.py [--repeats 3] [--threads 2]
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch
import torchvision

from fga_search import ModelProfile, build_model, decompose
from fga_search.engine._strategies import uniform_plan

SHARED = Path(__file__).resolve().parents[1].parent / "shared"


def median_seconds(fn, repeats: int) -> float:  # type: ignore[no-untyped-def]
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--calibration", type=int, default=256)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    weights = SHARED / "models" / "resnet56_cifar10.pt"
    cases = [
        ("ResNet-56", build_model("resnet56", num_classes=10, weights=weights), (3, 32, 32), {"conv1"}),
        ("ResNet-50", torchvision.models.resnet50(num_classes=1000).eval(), (3, 224, 224), {"conv1"}),
    ]
    print(f"threads={args.threads} repeats={args.repeats} calibration={args.calibration} images")
    print(
        f"{'model':<10} {'FLOPs ratio':>11} {'layers':>6} {'SVD only s':>11} {'refined s':>10} {'refine/SVD':>10}"
    )
    for name, model, shape, skip in cases:
        profile = ModelProfile(model, input_shape=shape)
        plan = uniform_plan(profile, budget=0.2, groups=4, skip=skip)
        calib = torch.randn(args.calibration, *shape)
        svd = median_seconds(lambda: decompose(model, plan), args.repeats)  # noqa: B023
        refined = median_seconds(lambda: decompose(model, plan, calib), args.repeats)  # noqa: B023
        print(
            f"{name:<10} {profile.ratio(plan):>11.3f} {sum(v != 'keep' for v in plan.values()):>6} "
            f"{svd:>11.2f} {refined:>10.2f} {refined / svd:>10.1f}"
        )


if __name__ == "__main__":
    main()
