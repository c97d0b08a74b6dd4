"""Repair: bring a plan over budget within it, losing as little approximation quality as possible.

Greedy, data-free: repeatedly lower the rank (by about 10 %, at least 1) of the decomposed layer
whose step costs the least relative squared weight error per unit of cost saved (MACs,
parameters or estimated milliseconds, as the budget's ``CostModel`` says), until the plan fits. If every decomposed layer is at rank 1, the most expensive kept layer of the space is
decomposed too. The result depends only on the plan and the trained weights.
"""

from __future__ import annotations

import heapq

from ._cost import CostModel
from ._plan import KEEP, Plan
from ._space import ResolvedSpace
from ._spectra import SpectralTable

__all__ = ["repair"]


def repair(
    plan: Plan,
    *,
    cost: CostModel,
    spectra: SpectralTable,
    space: ResolvedSpace,
    budget: float,
) -> Plan:
    """Return ``plan`` if it fits ``budget`` (a ratio of the original's cost), else a repaired copy."""
    limit = budget * cost.base
    plan = dict(plan)
    total = cost.total(plan)
    if total <= limit:
        return plan
    by_name = {layer.name: layer for layer in space.layers}

    def step(name: str) -> tuple[float, tuple[int, int], float] | None:
        choice = plan[name]
        assert isinstance(choice, tuple)
        g, r = choice
        if r <= 1:
            return None
        new_r = max(1, min(r - 1, int(r * 0.9)))
        saved = cost.saving(name, choice, (g, new_r))
        if saved <= 0:
            return None
        err = spectra.error2(name, g)
        return (float(err[new_r] - err[r]) / saved, (g, new_r), saved)

    heap: list[tuple[float, str, tuple[int, int], float]] = []

    def push(name: str) -> None:
        s = step(name)
        if s is not None:
            heapq.heappush(heap, (s[0], name, s[1], s[2]))

    for name, choice in plan.items():
        if choice != KEEP and name in by_name:
            push(name)
    while total > limit:
        if not heap:
            kept = [n for n in by_name if plan.get(n, KEEP) == KEEP]
            if not kept:
                break  # infeasible: the caller records the constraint violation
            name = max(kept, key=lambda n: cost.layer(n, KEEP))
            layer = by_name[name]
            g = layer.groups[len(layer.groups) // 2]
            new = (g, layer.rank_for(g, layer.rank.low))
            total -= cost.saving(name, KEEP, new)
            plan[name] = new
            push(name)
            continue
        _, name, new, saved = heapq.heappop(heap)
        current = plan[name]
        assert isinstance(current, tuple)
        if new[0] != current[0] or new[1] >= current[1]:
            continue  # stale entry
        plan[name] = new
        total -= saved
        push(name)
    return plan
