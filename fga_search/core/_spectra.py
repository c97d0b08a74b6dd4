"""Data-free approximation errors from the trained weights' per-group singular values."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from ._group_svd import group_singular_values

__all__ = ["SpectralTable"]


class SpectralTable:
    """Relative squared weight error of every (layer, groups, rank), computed lazily and cached.

    ``error2(name, g)[r]`` is ||W - W_r||^2 / ||W||^2 when every group of layer ``name`` keeps
    rank r (Eckart-Young: the tail energy of each group's singular values); index 0 is 1.0.
    """

    def __init__(self, model: nn.Module) -> None:
        self._weights = {
            name: m.weight.detach().cpu() for name, m in model.named_modules() if isinstance(m, nn.Conv2d)
        }
        self._groups = {name: m.groups for name, m in model.named_modules() if isinstance(m, nn.Conv2d)}
        self._cache: dict[tuple[str, int], np.ndarray] = {}

    def error2(self, name: str, groups: int) -> np.ndarray:
        key = (name, groups)
        if key not in self._cache:
            s = group_singular_values(self._weights[name], base_groups=self._groups[name], groups=groups)
            energy = (s**2).reshape(-1, s.shape[-1])  # (G*g, m)
            total = float(energy.sum())
            kept = torch.cumsum(energy.sum(0), 0)  # energy of the first r values, over all groups
            kept = torch.cat([torch.zeros(1, dtype=kept.dtype), kept])
            tail = (total - kept).clamp_min(0) / total if total > 0 else torch.zeros_like(kept)
            self._cache[key] = tail.numpy()
        return self._cache[key]

    def relative_error(self, name: str, groups: int, rank: int) -> float:
        e = self.error2(name, groups)
        return float(np.sqrt(e[min(rank, len(e) - 1)]))
