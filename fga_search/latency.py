"""Latency on the deployment target: whole models and single layers, with an on-disk lookup table.

FLOPs are not speed: an FGA pair at a fifth of a conv's FLOPs can run slower than the conv. This
module measures what a target actually does.

* ``Target``: where and how a model runs: ``cpu`` with N threads or ``cuda``, batch size, dtype
  (float32, bf16, fp16) and memory format (channels_last).
* ``measure_latency``: warm-up, then repeated timed forward passes; the median. On CUDA it
  times with CUDA events, with ``cudnn.benchmark`` on.
* ``LatencyTable``: per-layer latencies (a dense conv, or an FGA pair) cached on disk, keyed by
  the target (device name, dtype, batch, memory format) and the layer's geometry (c, n, kernel,
  stride, padding, dilation, conv groups, input size, g, r), so a search measures each candidate
  once. A table file belongs to one target: a file written for another device is ignored.
* ``LatencyModel``: a whole-model estimate for any plan = the measured original model plus the
  plan's per-layer changes from the table (a plan's layer minus the dense conv it replaces),
  scaled by one factor that ``calibrate`` fits to one measured whole plan (the search calibrates
  on its fastest plan). Ranks between measured anchors are interpolated.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import os
import platform
import statistics
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass

import torch
from torch import nn

from ._atomic import atomic_write_json
from ._bn_fold import folded_copy
from ._data import cache_dir
from ._fga import FGAConv2d, with_cpu_execution
from ._flops import ModelProfile
from ._geometry import LayerInfo
from ._plan import KEEP

__all__ = [
    "LatencyModel",
    "LatencyStats",
    "LatencyTable",
    "Target",
    "as_deployed",
    "block_diagonal_copy",
    "cpu_cores",
    "measure_as_exported",
    "measure_latency",
    "measure_side_by_side",
    "measure_side_by_side_as_exported",
]

DTYPES = {"float32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


# smallest change of the original's latency, in the table or measured (a share of it), to calibrate on
MIN_CALIBRATION_CHANGE = 0.2


def cpu_cores() -> int:
    """The cores this process may run on (its CPU affinity where the platform tells it)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


@dataclass(frozen=True)
class Target:
    """Where latency is measured. ``threads`` applies to the CPU (None: PyTorch's default)."""

    device: str = "cpu"
    threads: int | None = None
    batch: int = 1
    dtype: str = "float32"
    channels_last: bool = False

    def __post_init__(self) -> None:
        if self.dtype not in DTYPES:
            raise ValueError(f"target dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")
        if self.batch < 1:
            raise ValueError(f"target batch must be >= 1, got {self.batch}")
        if self.threads is not None and self.threads < 1:
            raise ValueError(f"target threads must be >= 1, got {self.threads}")
        if not (self.device == "cpu" or self.device == "cuda" or self.device.startswith("cuda:")):
            raise ValueError(f"target device must be cpu or cuda[:N], got {self.device!r}")

    @classmethod
    def parse(
        cls, spec: str, *, batch: int = 1, dtype: str = "float32", channels_last: bool | None = None
    ) -> Target:
        """``cpu``, ``cpu:THREADS``, ``cuda`` or ``cuda:INDEX``."""
        kind, _, arg = spec.partition(":")
        if kind == "cpu":
            if arg and not arg.isdigit():
                raise ValueError(f"--target {spec!r}: cpu:THREADS needs a thread count, e.g. cpu:2")
            if arg and int(arg) < 1:
                raise ValueError(f"--target {spec!r}: cpu:THREADS needs at least 1 thread")
            return cls("cpu", int(arg) if arg else None, batch, dtype, bool(channels_last))
        if kind == "cuda":
            if arg and not arg.isdigit():
                raise ValueError(f"--target {spec!r}: cuda:INDEX needs a device index, e.g. cuda:0")
            return cls(spec, None, batch, dtype, True if channels_last is None else channels_last)
        raise ValueError(f"--target {spec!r}: use cpu, cpu:THREADS, cuda or cuda:INDEX")

    @property
    def torch_device(self) -> torch.device:
        return torch.device(self.device)

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    def hardware(self) -> str:
        if self.device == "cpu":
            threads = self.threads or torch.get_num_threads()
            return f"{_cpu_name()} ({threads} threads)"
        if not torch.cuda.is_available():
            raise ValueError(f"target {self.device!r} asked for, but CUDA is not available here")
        return torch.cuda.get_device_name(self.torch_device)

    def oversubscribed(self) -> str | None:
        """Why this target's CPU latencies would mislead, or None: a thread count above the cores
        this process may run on times an oversubscribed CPU, not the deployment."""
        cores = cpu_cores()
        if self.device == "cpu" and self.threads is not None and self.threads > cores:
            return (
                f"--target cpu:{self.threads} asks for {self.threads} threads, but this process has "
                f"{cores} core(s): latencies are measured oversubscribed"
            )
        return None

    def key(self) -> str:
        """The lookup-table key of this target: hardware, dtype, batch and memory format."""
        layout = "channels_last" if self.channels_last else "nchw"
        return f"{self.hardware()}|{self.dtype}|batch {self.batch}|{layout}|torch {torch.__version__}"

    def to_dict(self) -> dict[str, object]:
        return {**asdict(self), "hardware": self.hardware()}


@contextlib.contextmanager
def _threads(n: int | None) -> Iterator[None]:
    old = torch.get_num_threads()
    if n is not None:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


@dataclass(frozen=True)
class LatencyStats:
    median_ms: float
    p10_ms: float
    p90_ms: float
    runs: int


def _prepare(module: nn.Module, target: Target) -> nn.Module:
    m = copy.deepcopy(module).eval().to(device=target.torch_device, dtype=target.torch_dtype)
    if target.channels_last:
        m = m.to(memory_format=torch.channels_last)
    return m


def _input(input_shape: Sequence[int], target: Target) -> torch.Tensor:
    # drawn from a generator of its own: timing a trial's model must not move the global RNG that
    # its fine-tuning draws from (dropout), or a trial re-run without timing would train otherwise
    gen = torch.Generator().manual_seed(0)
    x = torch.randn((target.batch, *input_shape), generator=gen).to(target.torch_device, target.torch_dtype)
    return x.contiguous(memory_format=torch.channels_last) if target.channels_last else x


def _timings_ms(
    model: nn.Module, x: torch.Tensor, target: Target, *, warmup: int, repeats: int
) -> list[float]:
    """Forward times (ms) of a model already on the target (``_prepare``), after warm-up."""
    if target.device == "cpu":
        times: list[float] = []
        with _threads(target.threads):
            for _ in range(warmup):
                model(x)
            for _ in range(repeats):
                start = time.perf_counter()
                model(x)
                times.append((time.perf_counter() - start) * 1e3)
        return times
    old = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = True
    try:
        for _ in range(max(warmup, 3)):
            model(x)
        torch.cuda.synchronize(target.torch_device)
        pairs = [
            (torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
            for _ in range(repeats)
        ]
        for begin, end in pairs:
            begin.record()
            model(x)
            end.record()
        torch.cuda.synchronize(target.torch_device)
        return [begin.elapsed_time(end) for begin, end in pairs]
    finally:
        torch.backends.cudnn.benchmark = old


@torch.inference_mode()
def measure_latency(
    module: nn.Module,
    *,
    input_shape: Sequence[int],
    target: Target,
    warmup: int = 10,
    repeats: int = 50,
) -> LatencyStats:
    """Median forward latency of ``module`` (a copy of it, on the target) for one batch."""
    if repeats < 1 or warmup < 0:
        raise ValueError(f"repeats must be >= 1 and warmup >= 0, got {repeats} and {warmup}")
    times = _timings_ms(
        _prepare(module, target), _input(input_shape, target), target, warmup=warmup, repeats=repeats
    )
    ordered = sorted(times)
    return LatencyStats(
        median_ms=statistics.median(times),
        p10_ms=ordered[int(0.1 * (len(ordered) - 1))],
        p90_ms=ordered[int(0.9 * (len(ordered) - 1))],
        runs=len(times),
    )


@torch.inference_mode()
def measure_side_by_side(
    models: Mapping[str, nn.Module],
    *,
    input_shape: Sequence[int],
    target: Target,
    rounds: int = 5,
    repeats: int = 10,
) -> dict[str, float]:
    """Median latency (ms) of each model, measured round by round in turn (``repeats`` timed
    passes each per round after 3 warm-up passes, the median of the rounds' medians), so that
    drift of the machine hits all of them alike: their ratios are what to read. Each model is
    copied to the target once, and all of them take the same input."""
    if rounds < 1:
        raise ValueError(f"rounds must be >= 1, got {rounds}")
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    prepared = {name: _prepare(model, target) for name, model in models.items()}
    x = _input(input_shape, target)
    times: dict[str, list[float]] = {name: [] for name in models}
    for _ in range(rounds):
        for name, model in prepared.items():
            times[name].append(statistics.median(_timings_ms(model, x, target, warmup=3, repeats=repeats)))
    return {name: statistics.median(values) for name, values in times.items()}


def block_diagonal_copy(module: nn.Module) -> nn.Module | None:
    """A copy of ``module`` whose FGA layers all run their grouped convs block-diagonal on CPU
    inputs, or None when none can."""
    if not any(isinstance(m, FGAConv2d) and m.can_run_block_diagonal for m in module.modules()):
        return None
    return with_cpu_execution(module, "block_diagonal")


def as_deployed(module: nn.Module, target: Target) -> nn.Module:
    """``module`` as the export runs it on a CPU target: its batch norms folded into the convs
    and FGA pairs before them (``fga_search._bn_fold``). Other targets: ``module`` itself."""
    return folded_copy(module) if target.device == "cpu" else module


def measure_side_by_side_as_exported(
    models: Mapping[str, nn.Module], *, input_shape: Sequence[int], target: Target, rounds: int = 5
) -> dict[str, float]:
    """``measure_side_by_side``, each model as deployed (``as_deployed``: on a CPU target, batch
    norms folded, the original's alike), where on a CPU target each model with FGA layers is also
    timed with its grouped convs run block-diagonal, and the faster of its two timings counts."""
    deployed = {name: as_deployed(module, target) for name, module in models.items()}
    timed: dict[str, nn.Module] = dict(deployed)
    alternative: dict[str, str] = {}
    for name, module in deployed.items():
        fast = block_diagonal_copy(module) if target.device == "cpu" else None
        if fast is not None:
            alternative[name] = f"{name}, block-diagonal"
            timed[alternative[name]] = fast
    ms = measure_side_by_side(timed, input_shape=input_shape, target=target, rounds=rounds)
    return {name: min(ms[name], ms.get(alternative.get(name, name), ms[name])) for name in models}


def measure_as_exported(
    module: nn.Module, *, input_shape: Sequence[int], target: Target, repeats: int = 50, warmup: int = 10
) -> float:
    """Median ms of ``module`` on ``target``, as deployed (``as_deployed``). On a CPU target, a
    model with FGA layers is also timed with its grouped convs run block-diagonal, side by side,
    and the faster counts: the export runs each layer the faster way
    (``fga_search._cpu_execution``)."""
    module = as_deployed(module, target)
    fast = block_diagonal_copy(module) if target.device == "cpu" else None
    if fast is None:
        return measure_latency(
            module, input_shape=input_shape, target=target, warmup=warmup, repeats=repeats
        ).median_ms
    ms = measure_side_by_side(
        {"grouped": module, "block_diagonal": fast},
        input_shape=input_shape,
        target=target,
        rounds=max(1, repeats // 10),
    )
    return min(ms.values())


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
