"""A plan's cost in the budget's metric: FLOPs, parameters or estimated latency on a target."""

from __future__ import annotations

from collections.abc import Mapping

from fga_search.core._flops import ModelProfile
from fga_search.latency import LatencyModel

__all__ = ["METRICS", "CostModel"]

METRICS = ("flops", "params", "latency")


class CostModel:
    """Per-layer and whole-model cost of plans, and the original model's, in one metric."""

    def __init__(self, profile: ModelProfile, metric: str, *, latency: LatencyModel | None = None) -> None:
        if metric not in METRICS:
            raise ValueError(f"metric must be one of {', '.join(METRICS)}, got {metric!r}")
        if metric == "latency" and latency is None:
            raise ValueError("the latency metric needs a LatencyModel (a --target to measure on)")
        self.profile = profile
        self.metric = metric
        self.latency = latency

    @property
    def base(self) -> float:
        if self.metric == "flops":
            return float(self.profile.base_macs)
        if self.metric == "params":
            return float(self.profile.base_params)
        assert self.latency is not None
        return self.latency.base_ms

    def layer(self, name: str, choice: tuple[int, int] | str) -> float:
        if self.metric == "latency":
            assert self.latency is not None
            return self.latency.calibrated_layer_ms(name, choice)
        cost = self.profile.layer_cost(self.profile.by_name[name], choice)
        return float(cost.macs if self.metric == "flops" else cost.params)

    def total(self, plan: Mapping[str, tuple[int, int] | str]) -> float:
        if self.metric == "latency":
            assert self.latency is not None
            return self.latency.estimate_ms(plan)
        count = self.profile.count(plan, validate=False)
        return float(count.macs if self.metric == "flops" else count.params)

    def ratio(self, plan: Mapping[str, tuple[int, int] | str]) -> float:
        return self.total(plan) / self.base

    def saving(self, name: str, old: tuple[int, int] | str, new: tuple[int, int] | str) -> float:
        return self.layer(name, old) - self.layer(name, new)
