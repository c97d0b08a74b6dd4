"""Rule-based plans: the baselines a search must beat, and its warm start.

* ``uniform``: every searched layer gets the same group count and the same rank fraction, the
  largest fraction whose plan fits the budget; also the hand-set per-stage group sizes that FGA
  reimplementations use (group size 4 for 16- and 32-channel layers, 8 for wider ones).
* ``error-alloc``: data-free allocation in the spirit of ALDS (Liebenwein et al., NeurIPS 2021).
  The relative approximation error of every layer, group count and rank follows from the trained
  weights' singular values; bisection finds the smallest common error threshold for which the
  cheapest choice of every layer under it fits the budget (the budget's own metric: FLOPs,
  parameters or latency). This minimises the largest per-layer error. With a cost slack (the
  search's variant, never the baseline's), each layer takes, among its choices under the
  threshold that cost at most (1 + slack) times the cheapest, the one with the most groups.
* ``blend``: per-layer mixtures of two plans, repaired into the budget.
"""

from __future__ import annotations

import bisect
import math
import random
import re
from collections.abc import Callable, Collection, Mapping

from fga_search.core._flops import ModelProfile
from fga_search.core._geometry import LayerInfo
from fga_search.core._plan import KEEP, Plan
from fga_search.core._spectra import SpectralTable

from ._config import STRATEGIES
from ._cost import CostModel
from ._repair import repair
from ._space import LayerSpace, ResolvedSpace

__all__ = [
    "SEARCH_SLACKS",
    "alloc_label",
    "alloc_slack",
    "blend",
    "error_alloc_plan",
    "grow_ranks",
    "mutate_weights",
    "rank_for_fraction",
    "stage_groups",
    "strategy_plans",
    "uniform_plan",
    "uniform_space_plan",
]


def _nearest_group(info: LayerInfo, groups: int) -> int:
    return min(info.valid_groups, key=lambda g: (abs(g - groups), g))


def rank_for_fraction(info: LayerInfo, groups: int, fraction: float) -> int:
    """``round(fraction * exact rank)``, clamped to 1..exact rank."""
    top = info.exact_rank(groups)
    return max(1, min(top, round(fraction * top)))


def uniform_plan(
    profile: ModelProfile,
    *,
    budget: float,
    groups: int | dict[int, int] = 1,
    skip: Collection[str] = (),
    metric: str = "flops",
) -> Plan:
    """The same group count and rank fraction in every decomposable layer, the largest fraction
    whose plan fits ``budget`` (a ratio of the original's FLOPs or params).

    ``groups`` is one group count, or a map from input channels to group count (hand-set
    per-stage groups); layers where it is not valid use the nearest valid count. Depthwise
    layers and those in ``skip`` are kept.
    """
    if not 0.0 < budget <= 1.0:
        raise ValueError(f"budget must be in (0, 1], got {budget}")
    layers = [info for info in profile.layers if not info.depthwise and info.name not in skip]

    def choose(info: LayerInfo) -> int:
        g = groups.get(info.in_channels // info.base_groups, 1) if isinstance(groups, dict) else groups
        return _nearest_group(info, g)

    def plan_at(fraction: float) -> Plan:
        plan: Plan = {}
        for info in layers:
            g = choose(info)
            plan[info.name] = (g, rank_for_fraction(info, g, fraction))
        return plan

    lo, hi = 0.0, 1.0
    for _ in range(40):
        mid = (lo + hi) / 2
        if profile.ratio(plan_at(mid), metric=metric) <= budget:
            lo = mid
        else:
            hi = mid
    plan = plan_at(lo)
    if profile.ratio(plan, metric=metric) > budget:
        raise ValueError(f"no uniform plan fits budget {budget}: the smallest ranks cost more")
    # Layers where the FGA pair costs more than the dense conv are better kept.
    for info in layers:
        cost = profile.layer_cost(info, plan[info.name])
        if cost.macs >= cost.dense_macs and cost.params >= cost.dense_params:
            plan[info.name] = KEEP
    return plan


# -- within a search space ---------------------------------------------------------------


def _rank_range(layer: LayerSpace, g: int) -> tuple[int, int]:
    """The ranks a space's rank fractions can express for group count ``g``."""
    return layer.rank_for(g, layer.rank.low), layer.rank_for(g, layer.rank.high)


def stage_groups(layer: LayerSpace) -> int:
    """Hand-set group size: 4 channels per group up to 32 input channels, 8 above."""
    channels = layer.info.in_channels // layer.info.base_groups
    size = 4 if channels <= 32 else 8
    wanted = max(1, channels // size)
    return min(layer.groups, key=lambda g: (abs(g - wanted), g))


def uniform_space_plan(
    space: ResolvedSpace, cost: CostModel, *, budget: float, groups: int | Callable[[LayerSpace], int]
) -> Plan | None:
    """The uniform plan within the space (group counts it allows, rank fractions in its range),
    the largest common fraction that fits the budget; None if even the smallest does not fit."""

    def group_of(layer: LayerSpace) -> int:
        g = groups(layer) if callable(groups) else groups
        return g if g in layer.groups else min(layer.groups, key=lambda h: (abs(h - g), h))

    def plan_at(fraction: float) -> Plan:
        plan: Plan = {}
        for layer in space.layers:
            g = group_of(layer)
            lo, hi = _rank_range(layer, g)
            plan[layer.name] = (g, min(hi, max(lo, layer.rank_for(g, fraction))))
        return plan

    lo, hi = 0.0, 1.0
    if cost.ratio(plan_at(lo)) > budget:
        return None
    for _ in range(30):
        mid = (lo + hi) / 2
        if cost.ratio(plan_at(mid)) <= budget:
            lo = mid
        else:
            hi = mid
    return plan_at(lo)


_ErrorTable = list[tuple[int, int, int, list[float]]]  # (g, lowest rank, highest rank, -errors²)


def _error_table(layer: LayerSpace, spectra: SpectralTable) -> _ErrorTable:
    """Per group count of ``layer``: its allowed ranks and squared relative errors by rank,
    negated so that bisect finds the smallest rank at or under a threshold."""
    return [(g, *_rank_range(layer, g), [-e for e in spectra.error2(layer.name, g)]) for g in layer.groups]


def _choice(
    layer: LayerSpace, table: _ErrorTable, eps: float, *, cost: CostModel, slack: float
) -> tuple[float, tuple[int, int] | str]:
    """A layer's (cost, choice) under the error threshold ``eps``: the cheapest choice, or with
    ``slack`` > 0 the one with the most groups among those that cost at most ``1 + slack``
    times it (keeping the layer dense counts as the most; ties: the cheaper)."""
    keep = cost.layer(layer.name, KEEP)
    best: tuple[float, tuple[int, int] | str] = (keep, KEEP)
    under: list[tuple[float, tuple[int, int]]] = []  # per group count: its cheapest under eps
    for g, lo, hi, neg_err in table:
        r = max(lo, bisect.bisect_left(neg_err, -(eps * eps)))
        if r <= hi:
            c = cost.layer(layer.name, (g, r))
            under.append((c, (g, r)))
            if c < best[0]:
                best = (c, (g, r))
    if slack == 0.0 or best[1] == KEEP:
        return best
    # (a calibrated latency cost is the layer's share of the estimate and can be below zero)
    bound = best[0] + abs(best[0]) * slack
    if keep <= bound:
        return keep, KEEP
    return max((o for o in under if o[0] <= bound), key=lambda o: (o[1][0], -o[0]))


def error_alloc_plan(
    space: ResolvedSpace,
    cost: CostModel,
    spectra: SpectralTable,
    *,
    budget: float,
    weights: Mapping[str, float] | None = None,
    slack: float = 0.0,
) -> Plan | None:
    """Minimise the largest per-layer relative weight error subject to the budget (see module doc).

    ``weights`` scale each layer's error threshold (default 1: equal errors); the search's
    mutations move them. ``slack`` > 0: a layer takes, among its choices under the threshold
    that cost at most ``1 + slack`` times the cheapest, the one with the most groups: the
    widest input for the data-driven refinement of its 1x1 conv, which recovers more of the
    layer's output (measured: ResNet-56 and VGG-16, see docs/results.md). None if even the
    cheapest choice of every searched layer does not fit."""
    if not (slack >= 0.0 and math.isfinite(slack)):
        raise ValueError(f"slack must be a finite number >= 0, got {slack!r}")
    limit = budget * cost.base
    outside = cost.total({}) - sum(cost.layer(layer.name, KEEP) for layer in space.layers)
    tables = [_error_table(layer, spectra) for layer in space.layers]

    def plan_for(eps: float) -> tuple[float, Plan]:
        total, plan = outside, {}
        for layer, table in zip(space.layers, tables):
            scaled = eps * (weights.get(layer.name, 1.0) if weights else 1.0)
            c, ch = _choice(layer, table, scaled, cost=cost, slack=slack)
            total += c
            plan[layer.name] = ch
        return total, plan

    lo, hi = 0.0, 1.0 / min(weights.values(), default=1.0) if weights else 1.0
    total, plan = plan_for(hi)
    if total > limit:
        return None
    for _ in range(30):
        mid = (lo + hi) / 2
        t, p = plan_for(mid)
        if t <= limit:
            hi, plan = mid, p
        else:
            lo = mid
    return plan


def mutate_weights(
    parent: Mapping[str, float], *, names: list[str], rng: random.Random, layers: int = 3
) -> dict[str, float]:
    """A child of an allocation: ``layers`` random layers' error thresholds scaled by 0.8 or 1.25."""
    child = {name: float(parent.get(name, 1.0)) for name in names}
    for name in rng.sample(names, min(layers, len(names))):
        child[name] *= rng.choice((0.8, 1.25))
    return child


def grow_ranks(space: ResolvedSpace, plan: Plan, *, rng: random.Random, layers: int = 3) -> Plan:
    """A child of any plan: ``layers`` random decomposed layers' ranks raised by a quarter (at
    least 1, at most the space's highest rank). It may exceed the budget: the repair takes the
    cost back from the layers where that loses the least approximation quality."""
    child = dict(plan)
    grown = [layer for layer in space.layers if isinstance(child.get(layer.name), (tuple, list))]
    for layer in rng.sample(grown, min(layers, len(grown))):
        choice = child[layer.name]
        assert not isinstance(choice, str)
        g, r = int(choice[0]), int(choice[1])
        top = layer.rank_for(g, layer.rank.high)
        step = max(1, layer.rank_multiple)  # one multiple up at least: rounding must not undo it
        child[layer.name] = (g, layer.round_rank(g, min(top, max(r + step, round(r * 1.25)))))
    return child


def blend(
    space: ResolvedSpace,
    a: Plan,
    b: Plan,
    *,
    weight: float,
    seed: int,
    cost: CostModel,
    spectra: SpectralTable,
    budget: float,
) -> Plan:
    """Each layer takes ``b``'s choice with probability ``weight``, else ``a``'s; then repaired."""
    rng = random.Random(seed)
    plan = {layer.name: (b if rng.random() < weight else a).get(layer.name, KEEP) for layer in space.layers}
    return repair(plan, cost=cost, spectra=spectra, space=space, budget=budget)


SEARCH_SLACKS = (0.1, 0.05)  # the search's error allocations with a cost slack (fractions)
_ALLOC_LABEL = re.compile(r"error-alloc(?: with (\d+)% cost slack)? at 100% of the budget$")


def alloc_label(scale: float, slack: float) -> str:
    """The label of an error allocation at ``scale`` of the budget (``slack``: see
    :func:`error_alloc_plan`)."""
    extra = f" with {slack:.0%} cost slack" if slack else ""
    return f"error-alloc{extra} at {scale:.0%} of the budget"


def alloc_slack(label: str) -> float | None:
    """The cost slack of an error allocation at the full budget, from its label; None for any
    other plan. Such allocations are the parents of the search's mutations."""
    match = _ALLOC_LABEL.match(label)
    if match is None:
        return None
    return int(match.group(1)) / 100 if match.group(1) else 0.0


def strategy_plans(
    strategy: str,
    *,
    space: ResolvedSpace,
    cost: CostModel,
    spectra: SpectralTable,
    budget: float,
    count: int,
    seed: int = 0,
) -> list[tuple[str, Plan]]:
    """Up to ``count`` labelled plans of a rule-based strategy, or the search's warm start.

    ``uniform``: each group count of the space and the hand-set per-stage groups at the budget,
    then the same at 90 %, 80 %, ... of it; ``error-alloc``: the allocation at the budget, 95 %,
    90 %, ...; ``search``: the error allocation and its 10 % slack variant, every uniform plan at
    the budget from the smallest mean weight error up, and blends of each with the allocation.
    """
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown strategy {strategy!r}; valid strategies: {', '.join(STRATEGIES)}")
    group_counts = (
        sorted(set.intersection(*(set(layer.groups) for layer in space.layers))) if space.layers else []
    )

    def uniforms(scale: float) -> list[tuple[str, Plan]]:
        out = []
        for g in group_counts:
            plan = uniform_space_plan(space, cost, budget=budget * scale, groups=g)
            if plan is not None:
                out.append((f"uniform g={g} at {scale:.0%} of the budget", plan))
        plan = uniform_space_plan(space, cost, budget=budget * scale, groups=stage_groups)
        if plan is not None:
            out.append((f"uniform per-stage group size at {scale:.0%} of the budget", plan))
        return out

    def allocs(scale: float, slack: float = 0.0) -> list[tuple[str, Plan]]:
        plan = error_alloc_plan(space, cost, spectra, budget=budget * scale, slack=slack)
        return [] if plan is None else [(alloc_label(scale, slack), plan)]

    out: list[tuple[str, Plan]] = []
    if strategy == "random":
        return out
    if strategy == "uniform":
        scale = 1.0
        while len(out) < count and scale > 0.05:
            out += uniforms(scale)
            scale -= 0.1
    elif strategy == "error-alloc":
        scale = 1.0
        while len(out) < count and scale > 0.05:
            out += allocs(scale)
            scale -= 0.05
    else:
        # the error allocation first, then the uniform plans from the smallest mean weight error up
        def mean_error(plan: Plan) -> float:
            errs = [spectra.relative_error(n, *c) if c != KEEP else 0.0 for n, c in plan.items()]  # type: ignore[misc]
            return sum(errs) / max(1, len(errs))

        seeds = sorted(uniforms(1.0), key=lambda item: mean_error(item[1]))
        alloc = allocs(1.0)
        slacked = [item for slack in SEARCH_SLACKS for item in allocs(1.0, slack)]
        # the allocation, its 10 % slack variant, every uniform plan (which group count suits a
        # model varies: g=1 has VGG-16's smallest weight error, g=4 its best accuracy), the rest
        out += alloc + slacked[:1] + seeds + slacked[1:]
        if alloc:
            for i, (label, plan) in enumerate(seeds):
                mixed = blend(
                    space,
                    plan,
                    alloc[0][1],
                    weight=0.5,
                    seed=seed + i,
                    cost=cost,
                    spectra=spectra,
                    budget=budget,
                )
                out.append((f"blend of {label.split(' at ')[0]} and error-alloc", mixed))
    unique: list[tuple[str, Plan]] = []
    seen: set[tuple[tuple[str, object], ...]] = set()
    for label, plan in out:
        key = tuple(sorted(plan.items()))
        if key not in seen:
            seen.add(key)
            unique.append((label, plan))
    return unique[:count]
