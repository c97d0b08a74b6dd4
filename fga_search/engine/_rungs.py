"""Rungs of fidelity and asynchronous multi-objective promotion (issue 29).

A plan enters at the lowest rung (``Rungs.epochs[0]`` fine-tuning epochs; 0: the zero-cost proxy)
and moves up as in ASHA (Li et al., 2020): once it is among the top ``1/eta`` of the plans that
finished at its rung, it may be promoted, and nobody waits for a rung to fill. Neither Optuna
(no pruning with several objectives) nor Ray Tune's schedulers (one metric) rank by two
objectives, so the order is ours: feasible plans first, then non-dominated sorting of (accuracy
up, cost down) with ``pareto_mask``, the run's one definition of domination, and within a front
the crowding distance of NSGA-II (boundary points first), ties by the earlier plan.

Pure functions over scores: the driver keeps the results and asks ``next_promotion``.
"""

from __future__ import annotations

import math
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from fga_search.runs._fidelity import rung_of
from fga_search.runs._pareto import is_feasible, knee_cost, pareto_mask

__all__ = [
    "Fidelity",
    "RungScore",
    "Rungs",
    "crowding_distance",
    "next_promotion",
    "promotion_order",
    "promotions",
    "rung_of",
    "rung_scores",
]


@dataclass(frozen=True)
class Rungs:
    """Fine-tuning epochs per rung (strictly increasing, >= 0; 0 is the zero-cost proxy) and the
    promotion ratio ``eta`` (>= 2): the top ``1/eta`` of a rung may move up."""

    epochs: tuple[float, ...]
    eta: int = 3

    def __post_init__(self) -> None:
        shown = ",".join(f"{e:g}" for e in self.epochs)
        if len(self.epochs) < 2:
            raise ValueError(f"--rungs must name at least two fidelities, got {shown or 'none'!r}")
        if any(not (math.isfinite(e) and e >= 0) for e in self.epochs):
            raise ValueError(f"--rungs must be finite epochs >= 0, got {shown!r}")
        if any(b <= a for a, b in zip(self.epochs, self.epochs[1:])):
            raise ValueError(f"--rungs must be strictly increasing, got {shown!r}")
        if isinstance(self.eta, bool) or not isinstance(self.eta, int) or self.eta < 2:
            raise ValueError(f"--eta must be an integer >= 2, got {self.eta!r}")

    @classmethod
    def parse(cls, text: str, *, eta: int = 3) -> Rungs:
        """``"0,0.1,0.3,1"`` -> Rungs; ``ValueError`` naming the text when it is not numbers."""
        try:
            epochs = tuple(float(part) for part in text.split(","))
        except ValueError:
            raise ValueError(f"--rungs must be comma-separated epochs, got {text!r}") from None
        return cls(epochs, eta)

    @property
    def top(self) -> int:
        return len(self.epochs) - 1


@dataclass(frozen=True)
class RungScore:
    """One plan's result at one rung: its validation accuracy, its cost (the budget's metric, as a
    ratio to the original) and whether it fits the budget."""

    plan: int
    accuracy: float
    cost: float
    feasible: bool = True


def crowding_distance(points: Sequence[tuple[float, float]]) -> list[float]:
    """NSGA-II's crowding distance of each (accuracy, cost) point within one front: infinite at
    either end of each objective, else the normalised gap between its neighbours, summed."""
    n = len(points)
    distance = [0.0] * n
    if n <= 2:
        return [math.inf] * n
    for k in range(2):
        order = sorted(range(n), key=lambda i: (points[i][k], i))
        lo, hi = points[order[0]][k], points[order[-1]][k]
        distance[order[0]] = distance[order[-1]] = math.inf
        if hi == lo:
            continue
        for j in range(1, n - 1):
            i = order[j]
            distance[i] += (points[order[j + 1]][k] - points[order[j - 1]][k]) / (hi - lo)
    return distance


def promotion_order(scores: Sequence[RungScore]) -> list[int]:
    """The plans of one rung, best first: the feasible by non-dominated sorting of (accuracy,
    cost), within a front by crowding distance (larger first), ties by the earlier plan; then the
    infeasible by accuracy."""
    feasible = [s for s in scores if s.feasible]
    order: list[int] = []
    left = list(feasible)
    while left:
        mask = pareto_mask([s.accuracy for s in left], [s.cost for s in left])
        front = [s for s, keep in zip(left, mask) if keep]
        distance = crowding_distance([(s.accuracy, s.cost) for s in front])
        ranked = sorted(zip(front, distance), key=lambda p: (-p[1], p[0].plan))
        order += [s.plan for s, _ in ranked]
        left = [s for s, keep in zip(left, mask) if not keep]
    infeasible = sorted((s for s in scores if not s.feasible), key=lambda s: (-s.accuracy, s.plan))
    return order + [s.plan for s in infeasible]


def promotions(scores: Sequence[RungScore], *, eta: int, promoted: Collection[int] = ()) -> list[int]:
    """ASHA's candidates at one rung: the feasible plans among the top ``floor(n / eta)`` of the
    ``n`` finished there, not yet promoted, best first."""
    feasible = {s.plan for s in scores if s.feasible}
    top = promotion_order(scores)[: len(scores) // eta]
    return [plan for plan in top if plan in feasible and plan not in promoted]


def next_promotion(
    by_rung: Sequence[Sequence[RungScore]], *, eta: int, promoted: Sequence[Collection[int]]
) -> tuple[int, int] | None:
    """The next job ASHA gives a free worker, if it is a promotion: ``(plan, rung it enters)``,
    from the highest rung below the top down; None when no plan has earned one (then a new plan
    enters at the lowest rung). ``by_rung[k]``: the results finished at rung k (the top rung's
    included); ``promoted[k]``: the plans already moved up from rung k."""
    for k in range(len(by_rung) - 2, -1, -1):
        candidates = promotions(by_rung[k], eta=eta, promoted=promoted[k])
        if candidates:
            return candidates[0], k + 1
    return None


@dataclass(frozen=True)
class Fidelity:
    """How a trial of a multi-fidelity search trains: to ``epochs`` (its rung's), from the
    weights in ``init`` (a promotion that continues; they had ``start`` epochs) where that file
    exists, else from the decomposed model; ``measure_latency=False`` for a plan measured at the
    rung below."""

    epochs: float
    start: float = 0.0
    init: str | None = None
    measure_latency: bool = True


def rung_scores(
    rows: Sequence[Mapping[str, Any]], *, rungs: Rungs, costs: Sequence[str]
) -> tuple[list[list[RungScore]], list[set[int]]]:
    """From a run's trial rows: the results finished at each rung (``RungScore`` by trial number:
    ok or measured over the budget; the cost is the objective's knee cost) and, per rung, the trials
    already promoted from it (queued, running or finished at the rung above)."""
    by_rung: list[list[RungScore]] = [[] for _ in rungs.epochs]
    promoted: list[set[int]] = [set() for _ in rungs.epochs]
    cost = knee_cost(costs)
    for r in rows:
        k = rung_of(r)
        if not 0 <= k <= rungs.top:
            continue
        if k > 0 and r.get("promoted_from") is not None:
            promoted[k - 1].add(int(r["promoted_from"]))
        if r.get("state") == "COMPLETE" and r.get("status") in ("ok", "infeasible"):
            feasible = is_feasible(r, costs)
            accuracy = float(r.get("val_acc") or 0.0)
            by_rung[k].append(
                RungScore(int(r["trial"]), accuracy, float(r[cost]) if feasible else math.inf, feasible)
            )
    return by_rung, promoted
