"""Repair: bring a plan over budget within it, losing as little approximation quality as possible.

Greedy, data-free: repeatedly lower the rank (by about 10 %, at least 1) of the decomposed layer
whose step costs the least relative squared weight error per unit of cost saved (MACs,
parameters or estimated milliseconds, as the budget's ``CostModel`` says), until the plan fits.
If every decomposed layer is at rank 1, the most expensive kept layer of the space is
decomposed too. The result depends only on the plan and the trained weights.

Under a latency budget, cost is not monotone in the choice: a grouped pair can be slower than the
dense conv at any rank, and a pair of another group count faster. There a layer may also switch
to its fastest option (dense, or a group count at its smallest rank) when that saves time, with
the same error-per-saving priority (switching back to dense loses no approximation quality).
"""

from __future__ import annotations

import heapq

from fga_search.core._plan import KEEP, Plan
from fga_search.core._spectra import SpectralTable

from ._cost import CostModel
from ._space import ResolvedSpace

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

    latency = cost.metric == "latency"

    def error2(name: str, choice: tuple[int, int] | str) -> float:
        if isinstance(choice, str):  # dense: no approximation error
            return 0.0
        return float(spectra.error2(name, choice[0])[choice[1]])

    fastest: dict[str, tuple[int, int] | str] = {}  # per layer, from the latency table, once

    def fastest_choice(name: str) -> tuple[int, int] | str:
        if name not in fastest:
            assert cost.latency is not None
            layer = by_name[name]
            fastest[name] = cost.latency.fastest_choice(name, layer.groups, layer.lowest_ranks())
        return fastest[name]

    def step(name: str) -> tuple[float, tuple[int, int] | str, float] | None:
        choice = plan[name]
        moves: list[tuple[int, int] | str] = []
        if choice != KEEP:
            assert isinstance(choice, tuple)
            g, r = choice
            lower = by_name[name].lower_rank(g, r)  # only the space's layers are ever pushed
            if lower is not None:
                moves.append((g, lower))
        if latency and name in by_name:
            moves.append(fastest_choice(name))
        best = None
        for new in moves:
            saved = cost.saving(name, choice, new)
            if saved > 0:
                priority = (error2(name, new) - error2(name, choice)) / saved
                if best is None or priority < best[0]:
                    best = (priority, new, saved)
        return best

    heap: list[tuple[float, str, int, tuple[int, int] | str, float, tuple[int, int] | str]] = []
    pushed = 0  # breaks ties between entries of one layer

    def push(name: str) -> None:
        nonlocal pushed
        s = step(name)
        if s is not None:
            pushed += 1
            heapq.heappush(heap, (s[0], name, pushed, s[1], s[2], plan[name]))

    for name, choice in plan.items():
        if name in by_name and (choice != KEEP or latency):
            push(name)
    while total > limit:
        if not heap:
            kept = [n for n in by_name if plan.get(n, KEEP) == KEEP]
            if latency or not kept:
                break  # infeasible: the caller records the constraint violation
            name = max(kept, key=lambda n: cost.layer(n, KEEP))
            layer = by_name[name]
            g = layer.groups[len(layer.groups) // 2]
            pair = (g, layer.rank_for(g, layer.rank.low))
            total -= cost.saving(name, KEEP, pair)
            plan[name] = pair
            push(name)
            continue
        _, name, _, new, saved, was = heapq.heappop(heap)
        if plan[name] != was:
            continue  # stale entry: the layer has moved since
        plan[name] = new
        total -= saved
        push(name)
    return plan
