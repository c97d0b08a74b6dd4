"""A split of a dataset as uint8 tensors, stratified splitting, and the user's cache folder."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

__all__ = ["Split", "cache_dir", "stratified_split"]


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
