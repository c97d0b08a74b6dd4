"""Pareto fronts, hypervolume and the knee point (accuracy up, cost down)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    import pandas as pd

__all__ = ["best_row", "front_rows", "hypervolume", "knee_index", "pareto_front", "pareto_mask"]


def pareto_mask(acc: Sequence[float], *costs: Sequence[float]) -> np.ndarray:
    """True for the non-dominated points: higher accuracy, lower cost(s). Of identical points the
    first is kept."""
    a = np.asarray(acc, dtype=float)
    c = np.stack([np.asarray(x, dtype=float) for x in costs], axis=1) if costs else np.zeros((len(a), 0))
    n = len(a)
    keep = np.ones(n, dtype=bool)
    for i in range(n):
        no_worse = (a >= a[i]) & np.all(c <= c[i], axis=1)
        better = (a > a[i]) | np.any(c < c[i], axis=1)
        dominated = no_worse & better
        same = no_worse & ~better
        same[i:] = False  # an identical earlier point takes precedence
        keep[i] = not (dominated.any() or same.any())
    return keep


def hypervolume(
    acc: Sequence[float], cost: Sequence[float], *, ref: tuple[float, float] = (0.0, 1.0)
) -> float:
    """Area dominated by the points in (accuracy, cost) space, bounded by ``ref`` = (min accuracy,
    max cost). Points outside the reference box add nothing."""
    pts = [(float(a), float(c)) for a, c in zip(acc, cost) if a > ref[0] and c < ref[1]]
    if not pts:
        return 0.0
    pts.sort(key=lambda p: p[1])  # by cost, ascending
    area, best = 0.0, ref[0]
    for i, (a, c) in enumerate(pts):
        best = max(best, a)
        next_c = pts[i + 1][1] if i + 1 < len(pts) else ref[1]
        area += (best - ref[0]) * (next_c - c)
    return area


def knee_index(acc: Sequence[float], cost: Sequence[float]) -> int:
    """Index of the front point farthest from the line joining its two extremes (both axes
    scaled to [0, 1]); for fronts of one or two points, the most accurate."""
    a = np.asarray(acc, dtype=float)
    c = np.asarray(cost, dtype=float)
    if len(a) == 0:
        raise ValueError("knee_index needs at least one point")
    if len(a) <= 2:
        return int(np.argmax(a))
    an = (a - a.min()) / max(float(np.ptp(a)), 1e-12)
    cn = (c - c.min()) / max(float(np.ptp(c)), 1e-12)
    lo, hi = int(np.argmin(cn)), int(np.argmax(cn))
    p, q = np.array([cn[lo], an[lo]]), np.array([cn[hi], an[hi]])
    d = q - p
    norm = float(np.hypot(*d)) or 1.0
    dist = np.abs(d[0] * (an - p[1]) - d[1] * (cn - p[0])) / norm
    return int(np.argmax(dist))


def front_rows(rows: list[dict[str, Any]], *, costs: list[str] | None = None) -> list[dict[str, Any]]:
    """Non-dominated rows among finished trials within budget: validation accuracy up, each cost
    column down (default: the FLOPs ratio; a latency search adds ``latency_ratio``)."""
    costs = costs or ["flops_ratio"]
    ok = [
        r
        for r in rows
        if r.get("state") == "COMPLETE"
        and r.get("status") in ("ok", "duplicate")
        and r.get("within_budget")
        and r.get("val_acc") is not None
        and all(r.get(c) is not None for c in costs)
    ]
    if not ok:
        return []
    mask = pareto_mask([r["val_acc"] for r in ok], *[[r[c] for r in ok] for c in costs])
    front = sorted((r for r, m in zip(ok, mask) if m), key=lambda r: r["flops_ratio"])
    return front


def best_row(rows: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The highest validation accuracy within budget, ties broken by fewer FLOPs."""
    front = front_rows(rows)
    if not front:
        return None
    return max(front, key=lambda r: (r["val_acc"], -r["flops_ratio"]))


def pareto_front(run_dir: str) -> pd.DataFrame:
    """The Pareto front of a run folder as a DataFrame (one row per member, by FLOPs ratio)."""
    import os

    from ._records import read_table

    path = os.path.join(run_dir, "pareto.parquet")
    if not os.path.isfile(path):
        raise ValueError(f"{run_dir} has no pareto.parquet (is it an fga-search run folder?)")
    return read_table(path).to_pandas()
