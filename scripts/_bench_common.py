"""Shared set-up for the benchmarks: the shared CIFAR-10 JPEGs and checkpoints."""

from __future__ import annotations

import os
import tarfile
import tempfile
from pathlib import Path

# ../shared beside the checkout, or FGA_SHARED_DIR (the GPU check carries a copy in .gpu/shared)
SHARED = Path(os.environ.get("FGA_SHARED_DIR") or Path(__file__).resolve().parents[1].parent / "shared")
# the shared trained models: zoo name -> checkpoint file in SHARED / "models"
WEIGHTS = {"resnet56": "resnet56_cifar10.pt", "vgg16_cifar": "vgg16_cifar10.pt"}


def cifar_dir() -> str:
    """The shared JPEG CIFAR-10, extracted once into the temp folder (not the repository)."""
    out = Path(tempfile.gettempdir()) / "fga-search-bench" / "cifar10"
    if not (out / "test").is_dir():
        out.mkdir(parents=True, exist_ok=True)
        with tarfile.open(SHARED / "data" / "cifar10-jpeg.tar.gz") as tar:
            tar.extractall(out, filter="data")
    return str(out)


def checkpoint(name: str) -> str:
    path = SHARED / "models" / name
    if not path.is_file():
        raise SystemExit(f"missing shared checkpoint {path}")
    return os.fspath(path)


def trial_sizes(*, gpu: bool, limit: int | None = None) -> dict[str, object]:
    """RunConfig's trial settings of the quality benchmarks (docs/method.md, the benchmarks'
    recipe): on a CPU 10,000 training, 2,000 validation and 2,000 test images, batch 128, 128
    calibration and 512 recalibration images; on a GPU the full splits, batch 512, peak learning
    rate 0.05, 256 and 1,024 images. ``limit`` caps every split (a dry run)."""
    return {
        "batch_size": 512 if gpu else 128,
        "lr": 0.05 if gpu else 0.02,
        "calibration": 256 if gpu else 128,
        "recalibration": 1024 if gpu else 512,
        "train_limit": limit or (None if gpu else 10_000),
        "val_limit": limit or (None if gpu else 2000),
        "test_limit": limit or (None if gpu else 2000),
    }
