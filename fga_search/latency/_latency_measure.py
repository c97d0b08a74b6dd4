"""Timing models on a ``Target``: one model (``measure_latency``), several side by side, and each
as the export runs it (batch norms folded on CPUs, FGA pairs run block-diagonal where faster)."""

from __future__ import annotations

import contextlib
import copy
import statistics
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from fga_search.core._bn_fold import folded_copy
from fga_search.core._fga import FGAConv2d, with_cpu_execution

from ._latency_target import Target
from ._runtimes import runner

__all__ = [
    "LatencyStats",
    "as_deployed",
    "block_diagonal_copy",
    "measure_as_exported",
    "measure_latency",
    "measure_side_by_side",
    "measure_side_by_side_as_exported",
]


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


def _timings_ms(fn: Callable[[], object], target: Target, *, warmup: int, repeats: int) -> list[float]:
    """Times (ms) of ``fn``, one forward pass in the target's runtime (``_runtimes.runner``) of a
    model already on the target (``_prepare``), after warm-up."""
    if target.device == "cpu":
        times: list[float] = []
        with _threads(target.threads):
            for _ in range(warmup):
                fn()
            for _ in range(repeats):
                start = time.perf_counter()
                fn()
                times.append((time.perf_counter() - start) * 1e3)
        return times
    old = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = True
    try:
        for _ in range(max(warmup, 3)):
            fn()
        torch.cuda.synchronize(target.torch_device)
        pairs = [
            (torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
            for _ in range(repeats)
        ]
        for begin, end in pairs:
            begin.record()
            fn()
            end.record()
        torch.cuda.synchronize(target.torch_device)
        return [begin.elapsed_time(end) for begin, end in pairs]
    finally:
        torch.backends.cudnn.benchmark = old


def _runner(module: nn.Module, x: torch.Tensor, target: Target) -> Callable[[], object]:
    with _threads(target.threads):  # a TorchScript or ONNX model is built on the target's threads
        return runner(module, x, target)


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
    x = _input(input_shape, target)
    times = _timings_ms(_runner(_prepare(module, target), x, target), target, warmup=warmup, repeats=repeats)
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
    x = _input(input_shape, target)
    fns = {name: _runner(_prepare(model, target), x, target) for name, model in models.items()}
    times: dict[str, list[float]] = {name: [] for name in models}
    for _ in range(rounds):
        for name, fn in fns.items():
            times[name].append(statistics.median(_timings_ms(fn, target, warmup=3, repeats=repeats)))
    return {name: statistics.median(values) for name, values in times.items()}


def block_diagonal_copy(module: nn.Module) -> nn.Module | None:
    """A copy of ``module`` whose FGA layers all run their grouped convs block-diagonal on CPU
    inputs, or None when none can."""
    if not any(isinstance(m, FGAConv2d) and m.can_run_block_diagonal for m in module.modules()):
        return None
    return with_cpu_execution(module, "block_diagonal")


def as_deployed(module: nn.Module, target: Target) -> nn.Module:
    """``module`` as the export runs it on a CPU target: its batch norms folded into the convs
    and FGA pairs before them (``fga_search.core._bn_fold``). Other targets: ``module`` itself."""
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
    (``fga_search.deploy._cpu_execution``)."""
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
