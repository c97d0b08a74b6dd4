"""Pareto fronts, hypervolume and the knee point (accuracy up, cost down).

The one definition of a run's front, its best within the budget, its knee and of a usable trial,
each by the run's objective (its costs: ``flops_ratio`` and/or ``latency_ratio``): the search
(``_policy.finalize``, pareto.parquet), the run view (report, export) and the command line use them.
Also the one test of a pick that runs slower than the original (``slower_than_original``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, Literal, NamedTuple, TypeVar

import numpy as np

if TYPE_CHECKING:
    import pandas as pd

    from ._records import FrontRecord

__all__ = [
    "Slowdown",
    "best_row",
    "front_rows",
    "hypervolume",
    "is_feasible",
    "is_finished",
    "is_usable",
    "knee_cost",
    "knee_index",
    "knee_row",
    "mark_front",
    "objective_costs",
    "pareto_front",
    "pareto_mask",
    "run_costs",
    "slower_than_original",
    "top_fidelity",
]


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


# -- the one definition of the front, the best, the knee and a usable trial -------------------
Row = Mapping[str, Any]  # a trial's row: a ``TrialRecord``, or a dict of its columns
USABLE = ("ok", "duplicate")  # the statuses of a trial with a trained model


def objective_costs(objective: str) -> list[str]:
    """The cost columns an objective minimises: ``accuracy,flops,latency`` ->
    ``[flops_ratio, latency_ratio]``."""
    return [f"{name}_ratio" for name in objective.split(",")[1:]]


def run_costs(config: Mapping[str, Any]) -> list[str]:
    """A run's costs from its recorded config (run.json's ``config``; runs recorded without an
    objective optimised FLOPs)."""
    return objective_costs(str(config.get("objective") or "accuracy,flops"))


def knee_cost(costs: Sequence[str]) -> str:
    """The cost the knee trades accuracy for: the objective's last (latency when it has it)."""
    return costs[-1]


def is_usable(row: Row) -> bool:
    """A trial with a trained model and a validation accuracy: COMPLETE with status ok or duplicate."""
    return row.get("state") == "COMPLETE" and row.get("status") in USABLE and row.get("val_acc") is not None


def is_finished(row: Row) -> bool:
    """A trial that ended: complete (ok, duplicate, infeasible) or failed (not interrupted)."""
    return row.get("state") == "COMPLETE" or (
        row.get("state") == "FAIL" and row.get("status") != "interrupted"
    )


def is_feasible(row: Row, costs: Sequence[str]) -> bool:
    """A usable trial within the budget whose costs are all known: a candidate for the front."""
    return is_usable(row) and bool(row.get("within_budget")) and all(row.get(c) is not None for c in costs)


R = TypeVar("R", bound=Row)


def top_fidelity(rows: Sequence[R], *, costs: Sequence[str]) -> list[R]:
    """The feasible trials at the run's top fidelity: with ``--rungs``, those of the highest rung a
    feasible trial reached (scores of different fine-tuning lengths are never mixed), else all."""
    ok = [r for r in rows if is_feasible(r, costs)]
    rungs = [int(r["rung"]) for r in ok if r.get("rung") is not None]
    if not rungs:
        return ok
    top = max(rungs)
    return [r for r in ok if r.get("rung") == top]


def front_rows(rows: Sequence[R], *, costs: Sequence[str]) -> list[R]:
    """The Pareto front: the non-dominated feasible trials, validation accuracy up and each of the
    run's costs down (``RunConfig.costs``, ``run_costs``), by FLOPs ratio. Of identical trials the
    first is kept. With ``--rungs``, from the highest rung reached only (``top_fidelity``)."""
    ok = top_fidelity(rows, costs=costs)
    if not ok:
        return []
    mask = pareto_mask([r["val_acc"] for r in ok], *[[r[c] for r in ok] for c in costs])
    return sorted((r for r, m in zip(ok, mask) if m), key=lambda r: r["flops_ratio"])


def best_row(rows: Sequence[R], *, costs: Sequence[str]) -> R | None:
    """The best within the budget: the highest validation accuracy of the feasible trials, ties
    broken by the lower costs (in the objective's order), then by the earlier trial. It is on the
    front (so, with ``--rungs``, at the highest rung reached)."""
    ok = top_fidelity(rows, costs=costs)
    if not ok:
        return None
    return max(ok, key=lambda r: (r["val_acc"], *(-r[c] for c in costs), -r["trial"]))


def knee_row(front: Sequence[R], *, costs: Sequence[str]) -> R | None:
    """The knee of a front (``front_rows``): ``knee_index`` in (validation accuracy, ``knee_cost``)."""
    if not front:
        return None
    cost = knee_cost(costs)
    return front[knee_index([r["val_acc"] for r in front], [r[cost] for r in front])]


class Slowdown(NamedTuple):
    """A model slower than the original: its latency ratio to the original's (> 1) and where that
    was measured (``slower_than_original``)."""

    ratio: float
    on: Literal["target", "cpu"]  # the run's --target during the search, or this CPU after it

    @property
    def where(self) -> str:
        return "on the target" if self.on == "target" else "on this CPU"

    @property
    def times(self) -> str:
        """The ratio as ``1.25x`` (three decimals where two would read ``1.00x``)."""
        return f"{self.ratio:.2f}x" if self.ratio >= 1.005 else f"{self.ratio:.3f}x"


def slower_than_original(row: Row) -> Slowdown | None:
    """How much slower than the original a trial's model runs, or None when it is not slower or its
    latency is unknown: its ``latency_ratio`` (measured on the run's --target) if it has one, else
    its ``cpu_latency_ratio`` (a front member of a run without a target, timed side by side with
    the original on this CPU after the search)."""
    measured: tuple[tuple[str, Literal["target", "cpu"]], ...] = (
        ("latency_ratio", "target"),
        ("cpu_latency_ratio", "cpu"),
    )
    for column, on in measured:
        ratio = row.get(column)
        if ratio is not None:
            return Slowdown(float(ratio), on) if ratio > 1.0 else None
    return None


def mark_front(
    rows: Sequence[Row], *, costs: Sequence[str], test_acc: Mapping[str, float] | None = None
) -> list[FrontRecord]:
    """The front as pareto.parquet records it: each member with its test accuracy (``test_acc``,
    by trial number as a string: test_acc.json), the knee and the best within the budget marked."""
    from ._records import FrontRecord

    front = front_rows(rows, costs=costs)
    best, knee = best_row(front, costs=costs), knee_row(front, costs=costs)
    tests = test_acc or {}
    return [
        FrontRecord.from_row(
            {
                **row,
                "test_acc": row.get("test_acc", tests.get(str(row["trial"]))),
                "is_knee": row is knee,
                "is_best": row is best,
            }
        )
        for row in front
    ]


def pareto_front(run_dir: str) -> pd.DataFrame:
    """The Pareto front of a run folder as a DataFrame (one row per member, by FLOPs ratio)."""
    import os

    from ._records import read_table

    path = os.path.join(run_dir, "pareto.parquet")
    if not os.path.isfile(path):
        raise ValueError(f"{run_dir} has no pareto.parquet (is it an fga-search run folder?)")
    return read_table(path).to_pandas()
