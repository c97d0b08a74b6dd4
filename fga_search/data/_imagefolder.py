"""ImageFolder trees decoded into uint8 splits, cached in the user's cache folder, keyed by the
tree's files (a file's path, class, size and time)."""

from __future__ import annotations

import hashlib
import os
import warnings
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
from PIL import Image

from fga_search._util._atomic import atomic_write
from fga_search._util._errors import first_line, shorten

from ._split import Split, cache_dir

__all__ = ["imagefolder", "matching_folder"]

_CACHE_FORMAT = 2  # the decoded-dataset cache's layout and key; older entries are not read
_IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".ppm", ".pgm", ".tif", ".tiff", ".webp")


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


def imagefolder(
    data_dir: str | None, image_size: int | None, max_bytes: int, workers: int
) -> tuple[list[str], Split, Split, Split | None]:
    """(classes, train, test, val): ``val`` is the ``val/`` folder where ``test/`` is there too."""
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
    test = matching_folder(test_dir, classes, train, image_size, max_bytes, workers)
    val_dir = os.path.join(data_dir, "val")
    val = None
    if os.path.basename(test_dir) == "test" and os.path.isdir(val_dir):
        val = matching_folder(val_dir, classes, train, image_size, max_bytes, workers)
    return classes, train, test, val


def matching_folder(
    root: str, classes: list[str], train: Split, image_size: int | None, max_bytes: int, workers: int
) -> Split:
    """An ImageFolder that must have train/'s classes and image shape."""
    found, split = _load_folder(root, image_size, max_bytes, workers)
    if found != classes:
        missing, extra = sorted(set(classes) - set(found)), sorted(set(found) - set(classes))
        raise ValueError(
            f"{root} has other classes than the training images: missing {missing[:5]}, extra {extra[:5]}"
            if missing or extra
            else f"{root} has the training classes in another order"
        )
    if split.images.shape[1:] != train.images.shape[1:]:
        raise ValueError(
            f"{root}: images of shape {tuple(split.images.shape[1:])} but the training images are "
            f"{tuple(train.images.shape[1:])}; pass --image-size"
        )
    return split
