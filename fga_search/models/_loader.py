"""Batches from in-memory uint8 splits, normalised and augmented on the target device.

The uint8 images move to the device once (``DeviceSplit``); each batch is converted to float,
normalised, and optionally augmented (random crop with reflect padding, horizontal flip) there,
with no DataLoader workers: on a GPU the whole input pipeline stays on the GPU. A split larger
than ``max_device_bytes`` stays in pinned host memory instead; its batches are gathered on the
host one step ahead and copied asynchronously.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from fga_search.data._data import Split

__all__ = ["Augment", "Batch", "DeviceSplit", "Normalization"]


@dataclass(frozen=True)
class Normalization:
    """Per-channel ``(x / 255 - mean) / std`` applied to uint8 images."""

    mean: tuple[float, ...]
    std: tuple[float, ...]

    def __post_init__(self) -> None:
        if len(self.mean) != len(self.std) or not self.mean:
            raise ValueError(
                f"mean and std must have the same non-zero length, got {self.mean} and {self.std}"
            )
        if min(self.std) <= 0:
            raise ValueError(f"std must be positive, got {self.std}")

    def to_dict(self) -> dict[str, list[float]]:
        return {"mean": list(self.mean), "std": list(self.std)}

    @classmethod
    def from_dict(cls, data: dict[str, list[float]]) -> Normalization:
        """The inverse of ``to_dict`` (a run's ``run.json`` records its model's normalization)."""
        return cls(mean=tuple(data["mean"]), std=tuple(data["std"]))

    def apply(self, images: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        if images.shape[1] != len(self.mean):
            raise ValueError(
                f"images have {images.shape[1]} channels but the normalization has {len(self.mean)}"
            )
        mean = torch.tensor(self.mean, device=images.device, dtype=torch.float32).view(1, -1, 1, 1)
        std = torch.tensor(self.std, device=images.device, dtype=torch.float32).view(1, -1, 1, 1)
        return ((images.float() / 255.0 - mean) / std).to(dtype)


@dataclass(frozen=True)
class Augment:
    crop_pad: int = 0
    flip: bool = False

    @property
    def active(self) -> bool:
        return self.crop_pad > 0 or self.flip


@dataclass
class Batch:
    x: torch.Tensor  # normalised float images
    y: torch.Tensor  # labels
    index: torch.Tensor  # rows of the split
    flipped: torch.Tensor  # bool per row: mirrored horizontally


def _random_crop(x: torch.Tensor, pad: int, gen: torch.Generator) -> torch.Tensor:
    n, c, h, w = x.shape
    padded = F.pad(x, (pad, pad, pad, pad), mode="reflect")
    dy = torch.randint(0, 2 * pad + 1, (n,), generator=gen).to(x.device)
    dx = torch.randint(0, 2 * pad + 1, (n,), generator=gen).to(x.device)
    rows = (dy[:, None] + torch.arange(h, device=x.device))[:, None, :, None]
    cols = (dx[:, None] + torch.arange(w, device=x.device))[:, None, None, :]
    batch = torch.arange(n, device=x.device)[:, None, None, None]
    chans = torch.arange(c, device=x.device)[None, :, None, None]
    return padded[batch, chans, rows, cols]


class DeviceSplit:
    """A split's uint8 images held on ``device``, served as normalised float batches."""

    def __init__(
        self,
        split: Split,
        *,
        device: torch.device | str,
        normalization: Normalization,
        channels_last: bool = False,
        max_device_bytes: int | None = None,
    ) -> None:
        self.device = torch.device(device)
        cuda = self.device.type == "cuda"
        self.resident = not (
            cuda and max_device_bytes is not None and split.images.numel() > max_device_bytes
        )
        images = split.images.pin_memory() if cuda else split.images
        self.images = images.to(self.device, non_blocking=cuda) if self.resident else images
        self.labels = split.labels.to(self.device)
        self.normalization = normalization
        self.channels_last = channels_last

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def _gather(self, idx: torch.Tensor) -> torch.Tensor:
        if self.resident:
            return self.images[idx]
        rows = self.images[idx.cpu()].pin_memory()
        return rows.to(self.device, non_blocking=True)

    def take(
        self, index: torch.Tensor | Sequence[int], *, dtype: torch.dtype = torch.float32
    ) -> torch.Tensor:
        """Normalised images at ``index`` (no augmentation)."""
        idx = torch.as_tensor(index, device=self.device)
        x = self.normalization.apply(self._gather(idx), dtype)
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x

    def batches(
        self,
        batch_size: int,
        *,
        shuffle: bool = False,
        augment: Augment | None = None,
        generator: torch.Generator | None = None,
        limit: int | None = None,
        drop_last: bool = False,
    ) -> Iterator[Batch]:
        """Yield batches over the split (or its first ``limit`` rows after shuffling)."""
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        n = len(self)
        gen = generator if generator is not None else torch.Generator().manual_seed(0)
        order = torch.randperm(n, generator=gen) if shuffle else torch.arange(n)
        if limit is not None:
            order = order[: max(0, min(limit, n))]
        order = order.to(self.device)
        total = len(order)
        stop = total - total % batch_size if drop_last and total >= batch_size else total
        for start in range(0, stop, batch_size):
            idx = order[start : start + batch_size]
            x = self.normalization.apply(self._gather(idx))
            flipped = torch.zeros(len(idx), dtype=torch.bool, device=self.device)
            if augment is not None and augment.crop_pad > 0:
                x = _random_crop(x, augment.crop_pad, gen)
            if augment is not None and augment.flip:
                flipped = (torch.rand(len(idx), generator=gen) < 0.5).to(self.device)
                x = torch.where(flipped[:, None, None, None], x.flip(3), x)
            if self.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            yield Batch(x=x, y=self.labels[idx], index=idx, flipped=flipped)
