"""The factors of an FGA layer: per-group truncated SVD of a conv weight, and the geometry it needs.

A conv weight W of shape (n, c/G, kh, kw) (G = the conv's own ``groups``) split into g groups of
input channels inside each conv group has G*g slices; each, reshaped to an (n/G) x
(c/(G*g)*kh*kw) matrix, is exact at rank min(n/G, c/(G*g)*kh*kw) (``exact_rank``), and its best
rank-r approximation (Eckart-Young) is its SVD truncated to r (``group_svd``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

__all__ = ["GroupSVD", "exact_rank", "group_svd", "validate_geometry"]


def exact_rank(
    *, in_channels: int, out_channels: int, kernel_size: tuple[int, int], base_groups: int, groups: int
) -> int:
    """The rank above which the per-group factorisation is exact: min(n/G, c/(G*g)*kh*kw)."""
    return min(
        out_channels // base_groups,
        in_channels // (base_groups * groups) * kernel_size[0] * kernel_size[1],
    )


def validate_geometry(
    *,
    in_channels: int,
    out_channels: int,
    kernel_size: tuple[int, int],
    base_groups: int,
    groups: int,
    rank: int,
) -> None:
    """``ValueError`` unless ``groups`` divides the input channels of each conv group and ``rank``
    is in 1..``exact_rank``."""
    if isinstance(groups, bool) or not isinstance(groups, int) or groups < 1:
        raise ValueError(f"groups must be a positive int, got {groups!r}")
    if isinstance(rank, bool) or not isinstance(rank, int):
        raise ValueError(f"rank must be an int, got {rank!r}")
    per_group = in_channels // base_groups
    if per_group % groups != 0:
        valid = [d for d in range(1, per_group + 1) if per_group % d == 0]
        raise ValueError(
            f"groups={groups} does not divide the {per_group} input channels per conv group "
            f"(in_channels={in_channels}, conv groups={base_groups}); valid group counts: {valid}"
        )
    top = exact_rank(
        in_channels=in_channels,
        out_channels=out_channels,
        kernel_size=kernel_size,
        base_groups=base_groups,
        groups=groups,
    )
    if rank < 1 or rank > top:
        raise ValueError(f"rank={rank} is out of range for groups={groups}: valid ranks are 1..{top}")


@dataclass(frozen=True)
class GroupSVD:
    """Per-group SVD factors of a conv weight, in float64.

    ``u``: (G, g, n/G, m), ``s``: (G, g, m), ``vh``: (G, g, m, c/(G*g)*kh*kw) with m the full rank.
    """

    u: torch.Tensor
    s: torch.Tensor
    vh: torch.Tensor

    def tail_energy(self, rank: int) -> torch.Tensor:
        """Squared Frobenius error of the rank-``rank`` truncation, per group (Eckart-Young)."""
        return (self.s[..., rank:] ** 2).sum(-1)

    def relative_error(self, rank: int) -> float:
        """Relative Frobenius error of the whole weight after truncating every group to ``rank``."""
        total = float((self.s**2).sum())
        if total == 0.0:
            return 0.0
        return math.sqrt(float(self.tail_energy(rank).sum()) / total)


def _group_slices(weight: torch.Tensor, base_groups: int, groups: int) -> torch.Tensor:
    n, cg, kh, kw = weight.shape
    if cg % groups != 0:
        raise ValueError(f"groups={groups} does not divide the {cg} input channels per conv group")
    w = weight.detach().to(torch.float64)
    # (n, c/G, kh, kw) -> (G, n/G, g, c/(G*g)*kh*kw) -> (G, g, n/G, c/(G*g)*kh*kw)
    return w.reshape(base_groups, n // base_groups, groups, (cg // groups) * kh * kw).transpose(1, 2)


def group_svd(weight: torch.Tensor, *, base_groups: int, groups: int) -> GroupSVD:
    """SVD of every (conv group, input group) slice of a conv weight, computed in float64."""
    u, s, vh = torch.linalg.svd(_group_slices(weight, base_groups, groups), full_matrices=False)
    return GroupSVD(u=u, s=s, vh=vh)


def group_singular_values(weight: torch.Tensor, *, base_groups: int, groups: int) -> torch.Tensor:
    """``group_svd(...).s`` alone, (G, g, m) in float64: without the factors, up to 2x faster."""
    return torch.linalg.svdvals(_group_slices(weight, base_groups, groups))
