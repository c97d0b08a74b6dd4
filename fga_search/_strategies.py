"""Rule-based plans: the uniform baseline (and, later, error allocation and random plans)."""

from __future__ import annotations

from collections.abc import Collection

from ._flops import ModelProfile
from ._geometry import LayerInfo
from ._plan import KEEP, Plan

__all__ = ["rank_for_fraction", "uniform_plan"]


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
