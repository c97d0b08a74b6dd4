"""Datasets, held in memory as uint8 tensors: train / validation / test splits.

* ``digits``: scikit-learn's bundled 8x8 digits (1 channel), the one dataset needing no download;
  a fixed stratified 20 % is the test split.
* ``cifar10`` / ``cifar100``: torchvision's own format under ``data_dir`` (downloaded only when asked).
* ``imagefolder``: a tree ``train/<class>/*`` plus ``val/<class>/*`` or ``test/<class>/*``.
  Decoded images are cached in the user's cache folder, keyed by the tree's files.

The validation split is a stratified fraction of the *training* data, fixed by the seed; the
test split is only for final numbers.
"""

from __future__ import annotations

import hashlib
import os
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from ._atomic import atomic_write
from ._errors import first_line, shorten

__all__ = [
    "DATASETS",
    "DataBundle",
    "Split",
    "cache_dir",
    "load_dataset",
    "stratified_split",
]

DATASETS = ("digits", "cifar10", "cifar100", "imagefolder")
_CACHE_FORMAT = 2  # the decoded-dataset cache's layout and key; older entries are not read
_IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".ppm", ".pgm", ".tif", ".tiff", ".webp")


def cache_dir() -> str:
    """The user's cache folder for fga-search (``$XDG_CACHE_HOME/fga-search`` or ``~/.cache/fga-search``)."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "fga-search")


@dataclass
class Split:
    """Images as uint8 (N, C, H, W) and labels as int64 (N,)."""

    images: torch.Tensor
    labels: torch.Tensor

    def __post_init__(self) -> None:
        assert self.images.dtype == torch.uint8 and self.images.ndim == 4
        assert self.labels.dtype == torch.int64 and self.labels.shape == (self.images.shape[0],)

    def __len__(self) -> int:
        return int(self.images.shape[0])

    def subset(self, index: torch.Tensor) -> Split:
        return Split(self.images[index], self.labels[index])


@dataclass
class DataBundle:
    name: str
    classes: list[str]
    train: Split
    val: Split
    test: Split
    flip: bool  # horizontal flips are label-preserving
    crop_pad: int  # random-crop padding for augmentation, in pixels

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
        }


def stratified_split(
    labels: torch.Tensor, fraction: float, *, seed: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices (rest, held_out) with ``fraction`` of each class held out, fixed by ``seed``."""
    gen = torch.Generator().manual_seed(seed)
    rest, held = [], []
    for cls in torch.unique(labels).tolist():
        idx = torch.nonzero(labels == cls).flatten()
        idx = idx[torch.randperm(len(idx), generator=gen)]
        k = round(fraction * len(idx))
        held.append(idx[:k])
        rest.append(idx[k:])
    return torch.sort(torch.cat(rest)).values, torch.sort(torch.cat(held)).values


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


def _list_folder(root: str) -> tuple[list[str], list[tuple[str, int]]]:
    classes = sorted(e.name for e in os.scandir(root) if e.is_dir())
    if not classes:
        raise ValueError(f"{root} has no class folders")
    files = []
    for i, cls in enumerate(classes):
        found = []
        for dirpath, _, names in sorted(os.walk(os.path.join(root, cls))):
            found += [
                (os.path.join(dirpath, n), i) for n in sorted(names) if n.lower().endswith(_IMAGE_EXTENSIONS)
            ]
        if not found:
            raise ValueError(f"class folder {os.path.join(root, cls)} has no image files")
        files += found
    if len(classes) < 2:  # a classifier of one class is always right: nothing to search for
        raise ValueError(f"{root} has one class folder ({classes[0]!r}); a classifier needs at least 2")
    return classes, files


_GRAY_MODES = ("1", "L", "LA", "I", "I;16", "F")


def _decode(path: str, image_size: int | None) -> np.ndarray:
    """An image file as uint8 (C, H, W): 1 channel for a grayscale file, else 3 (RGB). Any
    failure to read it (a corrupt file, a decompression bomb) is a ``ValueError`` naming it."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            return _decode_image(path, image_size)
    except Exception as exc:
        raise ValueError(f"cannot read image {path}: {shorten(first_line(exc), 160)}") from None


def _decode_image(path: str, image_size: int | None) -> np.ndarray:
    with Image.open(path) as source:
        img = source.convert("L" if source.mode in _GRAY_MODES else "RGB")
        if image_size is not None and img.size != (image_size, image_size):
            w, h = img.size
            scale = image_size / min(w, h)
            img = img.resize(
                (max(image_size, round(w * scale)), max(image_size, round(h * scale))),
                Image.Resampling.BILINEAR,
            )
            w, h = img.size
            left, top = (w - image_size) // 2, (h - image_size) // 2
            img = img.crop((left, top, left + image_size, top + image_size))
        arr = np.asarray(img, dtype=np.uint8)
    return arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1)


def _load_folder(root: str, image_size: int | None, max_bytes: int, workers: int) -> tuple[list[str], Split]:
    classes, files = _list_folder(root)
    stats = [os.stat(p) for p, _ in files]
    # every file with its class, size and time: moving an image to another class changes the key
    listing = hashlib.sha256()
    for (path, label), st in zip(files, stats):
        listing.update(
            repr((os.path.relpath(path, root), classes[label], st.st_size, st.st_mtime_ns)).encode()
        )
    key = hashlib.sha256(
        repr((_CACHE_FORMAT, os.path.abspath(root), listing.hexdigest(), image_size)).encode()
    ).hexdigest()[:24]
    cache = os.path.join(cache_dir(), "datasets", f"{key}.pt")
    if os.path.isfile(cache):
        try:
            blob = torch.load(cache, weights_only=True)
            return list(blob["classes"]), Split(blob["images"], blob["labels"])
        except Exception:  # a broken cache entry is rebuilt
            pass
    try:
        with Image.open(files[0][0]) as first:
            size = first.size
    except Exception as exc:
        raise ValueError(f"cannot read image {files[0][0]}: {shorten(first_line(exc), 160)}") from None
    estimate = len(files) * 3 * (image_size or max(size)) ** 2
    if estimate > max_bytes:
        raise ValueError(
            f"{root}: {len(files)} images need about {estimate / 2**30:.1f} GiB in memory; pass a smaller --image-size"
        )
    with ThreadPoolExecutor(max_workers=workers or min(8, os.cpu_count() or 1)) as pool:
        arrays = list(pool.map(lambda f: _decode(f[0], image_size), files, chunksize=256))
    if any(a.shape[0] == 3 for a in arrays):  # grayscale files among colour ones: as RGB
        arrays = [np.repeat(a, 3, axis=0) if a.shape[0] == 1 else a for a in arrays]
    shapes = {a.shape for a in arrays}
    if len(shapes) != 1:
        raise ValueError(f"{root}: images have different sizes {sorted(shapes)[:3]}; pass --image-size")
    images = torch.from_numpy(np.stack(arrays))
    labels = torch.tensor([label for _, label in files], dtype=torch.int64)
    os.makedirs(os.path.dirname(cache), exist_ok=True)
    blob = {"classes": classes, "images": images, "labels": labels}
    try:
        atomic_write(cache, lambda tmp: torch.save(blob, tmp))
    except OSError:  # a cache that cannot be written (a full disk) is only a cache
        pass
    return classes, Split(images, labels)


def _imagefolder(
    data_dir: str | None, image_size: int | None, max_bytes: int, workers: int
) -> tuple[list[str], Split, Split]:
    if not data_dir:
        raise ValueError("dataset 'imagefolder' needs --data-dir (a folder with train/ and val/ or test/)")
    if not os.path.isdir(data_dir):
        raise ValueError(f"data dir not found: {data_dir}")
    train_dir = os.path.join(data_dir, "train")
    test_dir = next(
        (os.path.join(data_dir, d) for d in ("test", "val") if os.path.isdir(os.path.join(data_dir, d))), None
    )
    if not os.path.isdir(train_dir) or test_dir is None:
        found = sorted(e.name for e in os.scandir(data_dir) if e.is_dir())
        raise ValueError(
            f"data dir {data_dir} must hold train/ and val/ or test/ folders; found: {found or 'none'}"
        )
    classes, train = _load_folder(train_dir, image_size, max_bytes, workers)
    test_classes, test = _load_folder(test_dir, image_size, max_bytes, workers)
    if test_classes != classes:
        raise ValueError(f"{test_dir} has classes {test_classes[:5]}... but train/ has {classes[:5]}...")
    if train.images.shape[1:] != test.images.shape[1:]:
        raise ValueError("train and test images differ in shape; pass --image-size")
    return classes, train, test


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
) -> DataBundle:
    """Load a dataset into memory and split off a stratified validation set from its training data.

    ``*_limit`` keep a stratified subset of each split (for quick runs and benchmarks).
    """
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; valid datasets: {', '.join(DATASETS)}")
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    if image_size is not None and image_size < 1:
        raise ValueError(f"image_size must be >= 1, got {image_size}")
    if name == "digits":
        classes, train, test = _digits()
        flip, pad = False, 1
    elif name in ("cifar10", "cifar100"):
        classes, train, test = _cifar(name, data_dir, download)
        flip, pad = True, 4
    else:
        classes, train, test = _imagefolder(data_dir, image_size, max_bytes, workers)
        flip, pad = True, max(1, train.images.shape[-1] // 8)
    rest, held = stratified_split(train.labels, val_fraction, seed=seed)
    if len(held) == 0 or len(rest) == 0:
        raise ValueError(
            f"--val-fraction {val_fraction:g} of the {len(train)} training images of dataset {name!r} leaves "
            f"{len(held)} for validation and {len(rest)} for training; both need images "
            "(more images, or another --val-fraction)"
        )
    if len(test) == 0:
        raise ValueError(f"dataset {name!r} has no test images")
    bundle = DataBundle(
        name=name,
        classes=classes,
        train=_limit(train.subset(rest), train_limit, seed),
        val=_limit(train.subset(held), val_limit, seed),
        test=_limit(test, test_limit, seed),
        flip=flip,
        crop_pad=pad,
    )
    return bundle
