"""Datasets, held in memory as uint8 tensors: train / validation / test splits.

* ``digits``: scikit-learn's bundled 8x8 digits (1 channel), the one dataset needing no download;
  a fixed stratified 20 % is the test split.
* ``cifar10`` / ``cifar100``: torchvision's own format under ``data_dir`` (downloaded only when asked).
* ``imagefolder``: a tree ``train/<class>/*`` plus ``val/<class>/*`` or ``test/<class>/*``.
  Decoded images are cached in the user's cache folder, keyed by the tree's files.

Validation, which ranks the search's trials, comes from images the trained model did not learn
from whenever there are some (``DataBundle.val_source``):

* ``"val/"``: an ImageFolder's ``val/`` beside ``train/`` and ``test/``;
* ``"val-dir"``: a folder of the same classes given as ``val_dir`` (``--val-dir``);
* ``"test"``: a stratified ``val_fraction`` of the test split, only when asked (``val_from="test"``,
  ``--val-from test``); the test figures then come from the rest of it;
* ``"train"``: otherwise, a stratified ``val_fraction`` of the training data, fixed by the seed.
  A model trained on all of it has learned those images by heart, so its scores there flatter
  (``TRAIN_VALIDATION_WARNING``).

The test split is only for final numbers. With ``train/`` and ``val/`` alone, ``val/`` is the test
split (the ImageNet convention) and validation comes from the training data.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch

from ._imagefolder import imagefolder, matching_folder
from ._split import Split, cache_dir, stratified_split

__all__ = [
    "DATASETS",
    "TRAIN_VALIDATION_WARNING",
    "DataBundle",
    "Split",
    "ValSource",
    "cache_dir",
    "load_dataset",
    "stratified_split",
    "validation_flatters",
]

DATASETS = ("digits", "cifar10", "cifar100", "imagefolder")


ValSource = Literal["train", "val/", "val-dir", "test"]

TRAIN_VALIDATION_WARNING = (
    "validation images come from the training split: a model trained on them scores higher there "
    "than on new images, and the scores may favour plans that keep memorised examples "
    "(give held-out images: a val/ folder beside train/, --val-dir, or --val-from test)"
)


def validation_flatters(val_source: str, *, model: str | None, weights: str | None) -> bool:
    """Whether validation images may be ones the user's trained model learned from: taken from
    the training split of a model given with its weights (the quickstart's model is trained
    without its validation images, and an untrained model learned nothing)."""
    return val_source == "train" and model is not None and weights is not None


@dataclass
class DataBundle:
    name: str
    classes: list[str]
    train: Split
    val: Split
    test: Split
    flip: bool  # horizontal flips are label-preserving
    crop_pad: int  # random-crop padding for augmentation, in pixels
    val_source: ValSource = "train"  # where the validation images come from (see the module docstring)

    def final_training_split(self) -> Split:
        """What a final fine-tune may train on: the training images, with the validation images
        unless they were taken from the test split."""
        if self.val_source == "test":
            return self.train
        return Split(
            torch.cat([self.train.images, self.val.images]), torch.cat([self.train.labels, self.val.labels])
        )

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def input_shape(self) -> tuple[int, int, int]:
        _, c, h, w = self.train.images.shape
        return (int(c), int(h), int(w))

    def channel_stats(self) -> tuple[tuple[float, ...], tuple[float, ...]]:
        """Per-channel mean and std of the training images, scaled to [0, 1]."""
        x = self.train.images.float().div_(255)
        return tuple(x.mean((0, 2, 3)).tolist()), tuple(x.std((0, 2, 3)).clamp_min(1e-3).tolist())

    def describe(self) -> dict[str, object]:
        return {
            "name": self.name,
            "classes": len(self.classes),
            "input_shape": list(self.input_shape),
            "train": len(self.train),
            "val": len(self.val),
            "test": len(self.test),
            "val_source": self.val_source,
        }


def _limit(split: Split, limit: int | None, seed: int) -> Split:
    if limit is None or limit >= len(split):
        return split
    if limit < 1:
        raise ValueError(f"subset limits must be >= 1, got {limit}")
    _, keep = stratified_split(split.labels, limit / len(split), seed=seed)
    return split.subset(keep)


def _digits() -> tuple[list[str], Split, Split]:
    from sklearn.datasets import load_digits

    bunch = load_digits()
    images = torch.from_numpy(np.rint(bunch.images * (255.0 / 16.0)).astype(np.uint8)).unsqueeze(1)
    labels = torch.from_numpy(bunch.target.astype(np.int64))
    rest, test = stratified_split(labels, 0.2, seed=0)  # fixed test split, independent of the run's seed
    full = Split(images.contiguous(), labels)
    return [str(i) for i in range(10)], full.subset(rest), full.subset(test)


def _cifar(name: str, data_dir: str | None, download: bool) -> tuple[list[str], Split, Split]:
    import torchvision

    if not data_dir:
        raise ValueError(
            f"dataset {name!r} needs --data-dir (torchvision's CIFAR format; add --download to fetch it)"
        )
    cls = torchvision.datasets.CIFAR10 if name == "cifar10" else torchvision.datasets.CIFAR100
    splits = []
    for train in (True, False):
        try:
            ds = cls(data_dir, train=train, download=download)
        except RuntimeError:
            raise ValueError(
                f"data dir {data_dir} has no {name} in torchvision's format; pass --download to fetch it"
            ) from None
        images = torch.from_numpy(np.ascontiguousarray(ds.data)).permute(0, 3, 1, 2).contiguous()
        splits.append(Split(images, torch.tensor(ds.targets, dtype=torch.int64)))
    return list(ds.classes), splits[0], splits[1]


def load_dataset(
    name: str,
    *,
    data_dir: str | None = None,
    download: bool = False,
    val_fraction: float = 0.1,
    seed: int = 0,
    image_size: int | None = None,
    train_limit: int | None = None,
    val_limit: int | None = None,
    test_limit: int | None = None,
    max_bytes: int = 8 * 2**30,
    workers: int = 0,
    val_dir: str | None = None,
    val_from: Literal["train", "test"] | None = None,
) -> DataBundle:
    """Load a dataset into memory with its validation split (see the module docstring for where it
    comes from: ``val_dir``, an ImageFolder's ``val/``, ``val_from="test"``, or the training data;
    ``val_from="train"`` always takes it from the training data).

    ``*_limit`` keep a stratified subset of each split (for quick runs and benchmarks).
    """
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; valid datasets: {', '.join(DATASETS)}")
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    if image_size is not None and image_size < 1:
        raise ValueError(f"image_size must be >= 1, got {image_size}")
    if val_from not in (None, "train", "test"):
        raise ValueError(f"val_from must be 'train' or 'test', got {val_from!r}")
    if val_dir is not None and val_from is not None:
        raise ValueError(
            f"val_dir and val_from exclude each other, got val_dir={val_dir!r} and val_from={val_from!r}"
        )
    if val_dir is not None and not os.path.isdir(val_dir):
        raise ValueError(f"val dir not found: {val_dir}")
    folder_val = None
    if name == "digits":
        classes, train, test = _digits()
        flip, pad = False, 1
    elif name in ("cifar10", "cifar100"):
        classes, train, test = _cifar(name, data_dir, download)
        flip, pad = True, 4
    else:
        classes, train, test, folder_val = imagefolder(data_dir, image_size, max_bytes, workers)
        flip, pad = True, max(1, train.images.shape[-1] // 8)
    if len(test) == 0:
        raise ValueError(f"dataset {name!r} has no test images")
    source: ValSource
    if val_dir is not None:
        source, val = "val-dir", matching_folder(val_dir, classes, train, image_size, max_bytes, workers)
    elif folder_val is not None and val_from is None:
        source, val = "val/", folder_val
    elif val_from == "test":
        source, (test, val) = "test", _held_out(test, val_fraction, seed, name=name, split="test")
    else:
        source, (train, val) = "train", _held_out(train, val_fraction, seed, name=name, split="training")
    return DataBundle(
        name=name,
        classes=classes,
        train=_limit(train, train_limit, seed),
        val=_limit(val, val_limit, seed),
        test=_limit(test, test_limit, seed),
        flip=flip,
        crop_pad=pad,
        val_source=source,
    )


def _held_out(images: Split, fraction: float, seed: int, *, name: str, split: str) -> tuple[Split, Split]:
    """(rest, held): a stratified ``fraction`` of a split's images, held out for validation."""
    rest, held = stratified_split(images.labels, fraction, seed=seed)
    if len(held) == 0 or len(rest) == 0:
        use = "training" if split == "training" else "testing"
        raise ValueError(
            f"--val-fraction {fraction:g} of the {len(images)} {split} images of dataset {name!r} leaves "
            f"{len(held)} for validation and {len(rest)} for {use}; both need images "
            "(more images, or another --val-fraction)"
        )
    return images.subset(rest), images.subset(held)
