"""Per-layer latencies on a target kept in an on-disk table (``LatencyTable``), and whole-model
estimates for plans built from them (``LatencyModel``)."""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping, Sequence

from torch import nn

from fga_search._util._atomic import atomic_write_json
from fga_search.core._fga import FGAConv2d
from fga_search.core._flops import ModelProfile
from fga_search.core._geometry import LayerInfo
from fga_search.core._plan import KEEP
from fga_search.data._data import cache_dir

from ._latency_measure import as_deployed, measure_as_exported, measure_latency
from ._latency_target import Target

__all__ = ["MIN_CALIBRATION_CHANGE", "LatencyModel", "LatencyTable", "layer_module"]

# smallest change of the original's latency, in the table or measured (a share of it), to calibrate on
MIN_CALIBRATION_CHANGE = 0.2


def _geometry(info: LayerInfo, in_hw: tuple[int, int]) -> str:
    kh, kw = info.kernel_size
    return (
        f"c{info.in_channels}-n{info.out_channels}-k{kh}x{kw}-s{info.stride[0]}x{info.stride[1]}"
        f"-p{info.padding if isinstance(info.padding, str) else 'x'.join(map(str, info.padding))}"
        f"-d{info.dilation[0]}x{info.dilation[1]}-G{info.base_groups}-b{int(info.bias)}-{info.padding_mode}"
        f"-hw{in_hw[0]}x{in_hw[1]}"
    )


def layer_module(info: LayerInfo, choice: tuple[int, int] | str) -> nn.Module:
    """A stand-alone module with the layer's geometry (random weights): the dense conv or the FGA pair."""
    conv = nn.Conv2d(
        info.in_channels,
        info.out_channels,
        info.kernel_size,
        stride=info.stride,
        padding=info.padding,  # type: ignore[arg-type]
        dilation=info.dilation,
        groups=info.base_groups,
        bias=info.bias,
        padding_mode=info.padding_mode,  # type: ignore[arg-type]
    )
    if choice == KEEP:
        return conv
    assert isinstance(choice, tuple)
    return FGAConv2d.shaped_like(conv, groups=choice[0], rank=choice[1])


class LatencyTable:
    """Per-layer latencies on one target, measured on demand and kept in a JSON file."""

    def __init__(
        self, target: Target, *, path: str | None = None, repeats: int = 30, warmup: int = 5
    ) -> None:
        self.target = target
        self.key = target.key()
        digest = hashlib.sha256(self.key.encode()).hexdigest()[:16]
        self.path = path or os.path.join(cache_dir(), "latency", f"{digest}.json")
        self.repeats = repeats
        self.warmup = warmup
        self.entries: dict[str, float] = {}
        self.measured = 0  # measurements made by this object (not loaded from disk)
        try:
            with open(self.path) as f:
                data = json.load(f)
            if data.get("target") == self.key:  # a table for another device is ignored
                self.entries = {str(k): float(v) for k, v in data.get("entries", {}).items()}
        except (OSError, ValueError):
            pass

    def save(self) -> None:
        os.makedirs(os.path.dirname(self.path) or ".", exist_ok=True)
        atomic_write_json(self.path, {"target": self.key, "entries": self.entries}, indent=0)

    def entry_key(self, info: LayerInfo, in_hw: tuple[int, int], choice: tuple[int, int] | str) -> str:
        tail = "dense" if choice == KEEP else f"g{choice[0]}-r{choice[1]}"
        if choice != KEEP and self.target.device == "cpu":
            tail += "-fastest"  # the faster of grouped and block-diagonal execution
        return f"{_geometry(info, in_hw)}|{tail}"

    def measure(self, info: LayerInfo, in_hw: tuple[int, int], choice: tuple[int, int] | str) -> float:
        """The layer's median latency in ms, measured once per key (then read from the table)."""
        key = self.entry_key(info, in_hw, choice)
        if key not in self.entries:
            module = layer_module(info, choice)
            self.entries[key] = measure_as_exported(
                module,
                input_shape=(info.in_channels, *in_hw),
                target=self.target,
                warmup=self.warmup,
                repeats=self.repeats,
            )
            self.measured += 1
            self.save()
        return self.entries[key]

    def estimate(self, info: LayerInfo, in_hw: tuple[int, int], choice: tuple[int, int] | str) -> float:
        """The layer's latency, interpolated linearly in the rank between measured anchor ranks
        (1, 1/8, 1/4, 1/2 and all of the exact rank) unless this exact choice was measured."""
        if choice == KEEP:
            return self.measure(info, in_hw, KEEP)
        assert isinstance(choice, tuple)
        g, r = choice
        exact = self.entries.get(self.entry_key(info, in_hw, choice))
        if exact is not None:
            return exact
        top = info.exact_rank(g)
        anchors = sorted({1, max(1, top // 8), max(1, top // 4), max(1, top // 2), top})
        lo = max(a for a in anchors if a <= r)
        hi = min(a for a in anchors if a >= r)
        t_lo = self.measure(info, in_hw, (g, lo))
        if hi == lo:
            return t_lo
        t_hi = self.measure(info, in_hw, (g, hi))
        return t_lo + (t_hi - t_lo) * (r - lo) / (hi - lo)


class LatencyModel:
    """Whole-model latency estimates for plans, from the measured original and a ``LatencyTable``."""

    def __init__(
        self, model: nn.Module, profile: ModelProfile, table: LatencyTable, *, repeats: int = 50
    ) -> None:
        self.profile = profile
        self.table = table
        self.input_shape = profile.input_shape
        # the original as deployed, like every model the search times (batch norms folded on CPUs)
        self.baseline = measure_latency(
            as_deployed(model, table.target),
            input_shape=self.input_shape,
            target=table.target,
            repeats=repeats,
        )
        self.dense = {
            info.name: table.measure(info, profile.in_hw[info.name], KEEP)
            for info in profile.layers
            if info.name in profile.in_hw
        }
        self.rest_ms = self.baseline.median_ms - sum(self.dense.values())
        # set by calibrate(): measured whole-model change / the table's sum of per-layer changes
        self.scale = 1.0

    @property
    def base_ms(self) -> float:
        return self.baseline.median_ms

    def _table_change_ms(self, plan: Mapping[str, tuple[int, int] | str]) -> float:
        return sum(self.layer_ms(n, c) - self.dense.get(n, 0.0) for n, c in plan.items() if c != KEEP)

    def calibrate(self, plan: Mapping[str, tuple[int, int] | str], measured_ms: float) -> float:
        """Scale the table's per-layer changes so that ``plan``'s estimate equals ``measured_ms``,
        its whole model's measured latency on the target, and return the scale.

        Layers timed one at a time miss what a whole model shares (warm caches, one thread pool,
        the memory traffic between layers): on 2 CPU cores the raw table overestimated every
        VGG-16 plan's latency ratio by about 0.2-0.3. The table is also kept on disk, and a
        machine's speed drifts: entries timed while it ran fast, beside an original timed now
        while it runs 2-3x slower, shrink every plan's change, and so pull its estimated ratio
        towards 1 (on ResNet-56: a table whose dense layers sum to 5.2 ms, an original at
        15.8 ms, the fastest plan estimated at 0.87 where the same table gives 0.67 beside an
        original at 6.5 ms). A plan that changes the original's latency by under 20 %, both in
        the table and as measured (the measurement's noise, a few percent, would then swing the
        scale by a quarter or more: on ResNet-56, whose fastest plan changed it by 3-9 %, fits
        gave scales from 0.82 to 2.67 and worse estimates), or a scale outside 0.1-10 (the
        table and the measurement disagree on the sign), leaves the estimates as they were
        (scale 1)."""
        if not measured_ms > 0:
            raise ValueError(f"measured_ms must be positive, got {measured_ms}")
        change = self._table_change_ms(plan)
        self.scale = 1.0
        if (
            change != 0
            and max(abs(change), abs(measured_ms - self.base_ms)) >= MIN_CALIBRATION_CHANGE * self.base_ms
        ):
            scale = (measured_ms - self.base_ms) / change
            if 0.1 <= scale <= 10.0:
                self.scale = scale
        return self.scale

    def layer_ms(self, name: str, choice: tuple[int, int] | str) -> float:
        """The layer's latency with ``choice`` as the table has it (not calibrated)."""
        if choice == KEEP:
            return self.dense.get(name, 0.0)
        info = self.profile.by_name[name]
        return self.table.estimate(info, self.profile.in_hw[name], choice)

    def calibrated_layer_ms(self, name: str, choice: tuple[int, int] | str) -> float:
        """The layer's share of ``estimate_ms``: its dense latency plus the calibrated change of
        ``choice``, so that per-layer costs (what the repair and the error allocation weigh) add
        up to the whole-model estimate that the budget is checked against."""
        dense = self.dense.get(name, 0.0)
        return dense + self.scale * (self.layer_ms(name, choice) - dense)

    def estimate_ms(self, plan: Mapping[str, tuple[int, int] | str]) -> float:
        return self.baseline.median_ms + self.scale * self._table_change_ms(plan)

    def ratio(self, plan: Mapping[str, tuple[int, int] | str]) -> float:
        return self.estimate_ms(plan) / self.baseline.median_ms

    def fastest_choice(
        self, name: str, groups: Sequence[int], min_rank: Mapping[int, int]
    ) -> tuple[int, int] | str:
        """The layer's fastest option on this target: dense (``KEEP``: every FGA candidate, each
        group count at its smallest rank, is slower), or a group count at its smallest rank."""
        info, hw = self.profile.by_name[name], self.profile.in_hw[name]
        best: tuple[int, int] | str = KEEP
        best_ms = self.dense.get(name, 0.0)
        for g in groups:
            ms = self.table.measure(info, hw, (g, min_rank[g]))
            if ms < best_ms:
                best, best_ms = (g, min_rank[g]), ms
        return best
