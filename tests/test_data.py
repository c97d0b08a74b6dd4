from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from fga_search import load_dataset
from fga_search.data._data import cache_dir, stratified_split


def test_digits_splits_are_stratified_and_fixed() -> None:
    a = load_dataset("digits", seed=0)
    b = load_dataset("digits", seed=1)
    assert a.input_shape == (1, 8, 8) and a.num_classes == 10
    assert len(a.train) + len(a.val) + len(a.test) == 1797
    assert (len(a.train), len(a.val), len(a.test)) == (1295, 143, 359)  # per-class rounding of 10 % and 20 %
    assert torch.equal(a.test.labels, b.test.labels)  # the test split never moves
    assert not torch.equal(a.val.images, b.val.images)  # the validation split follows the seed
    counts = torch.bincount(a.val.labels, minlength=10)
    assert counts.min() >= 13 and counts.max() <= 16
    assert a.train.images.dtype == torch.uint8 and int(a.train.images.max()) == 255
    assert not a.flip


def test_stratified_split_counts() -> None:
    labels = torch.arange(10).repeat_interleave(50)
    rest, held = stratified_split(labels, 0.2, seed=3)
    assert len(held) == 100 and len(rest) == 400
    assert torch.bincount(labels[held]).tolist() == [10] * 10
    assert not set(rest.tolist()) & set(held.tolist())


def make_tree(
    root: Path, classes: int = 3, per_class: int = 6, size: int = 10, splits=("train", "test")
) -> Path:
    rng = np.random.default_rng(0)
    for split in splits:
        for c in range(classes):
            folder = root / split / f"class{c}"
            folder.mkdir(parents=True)
            for i in range(per_class):
                pixels = rng.integers(0, 255, (size, size, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(folder / f"{i}.png")
    return root


def test_imagefolder_loads_and_caches(tmp_path: Path) -> None:
    root = make_tree(tmp_path / "tree")
    data = load_dataset("imagefolder", data_dir=str(root), val_fraction=0.34)
    assert data.classes == ["class0", "class1", "class2"]
    assert data.input_shape == (3, 10, 10)
    assert len(data.train) + len(data.val) == 18 and len(data.test) == 18
    assert torch.bincount(data.val.labels).tolist() == [2, 2, 2]
    pixel = np.asarray(Image.open(root / "test" / "class1" / "0.png"))
    idx = int(torch.nonzero(data.test.labels == 1)[0])
    assert torch.equal(data.test.images[idx], torch.from_numpy(pixel).permute(2, 0, 1))
    cached = os.listdir(os.path.join(cache_dir(), "datasets"))
    assert len(cached) >= 2
    again = load_dataset("imagefolder", data_dir=str(root), val_fraction=0.34)
    assert torch.equal(again.test.images, data.test.images)


def test_imagefolder_resizes_on_request(tmp_path: Path) -> None:
    root = make_tree(tmp_path / "tree", size=12)
    data = load_dataset("imagefolder", data_dir=str(root), image_size=8)
    assert data.input_shape == (3, 8, 8)


@pytest.mark.slow
def test_limits_keep_stratified_subsets(cifar) -> None:  # type: ignore[no-untyped-def]
    assert len(cifar.train) == 45_000 and len(cifar.val) == 5_000 and len(cifar.test) == 10_000
    assert torch.bincount(cifar.val.labels).tolist() == [500] * 10


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (
            dict(name="mnist"),
            "unknown dataset 'mnist'; valid datasets: digits, cifar10, cifar100, imagefolder",
        ),
        (dict(name="imagefolder"), "needs --data-dir"),
        (dict(name="imagefolder", data_dir="/nonexistent/x"), "data dir not found: /nonexistent/x"),
        (dict(name="cifar10"), "needs --data-dir"),
        (dict(name="digits", val_fraction=1.5), r"val_fraction must be in \(0, 1\)"),
    ],
)
def test_bad_dataset_arguments(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        load_dataset(**kwargs)


def test_imagefolder_without_expected_folders(tmp_path: Path) -> None:
    root = make_tree(tmp_path / "tree", splits=("train",))
    with pytest.raises(ValueError, match=r"must hold train/ and val/ or test/ folders; found: \['train'\]"):
        load_dataset("imagefolder", data_dir=str(root))
    (tmp_path / "empty" / "train").mkdir(parents=True)
    (tmp_path / "empty" / "val").mkdir()
    with pytest.raises(ValueError, match="has no class folders"):
        load_dataset("imagefolder", data_dir=str(tmp_path / "empty"))


def test_cifar_torchvision_format_missing(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="has no cifar10 in torchvision's format; pass --download"):
        load_dataset("cifar10", data_dir=str(tmp_path))
