"""Latency of an exported model vs the original, in each runtime a user ships it with.

FLOPs are not speed, and one runtime's speed is not another's: on 2 CPU cores at batch 1, ONNX
Runtime runs the original ResNet-56 about 2.4-2.8x faster than eager PyTorch and ranks FGA models
differently (a uniform g = 8 plan at 18 % of the FLOPs: 1.49x the original in PyTorch, 1.23x in
ONNX Runtime; ``scripts/bench_cpu_kernels.py``). The export measures both models in the same
process, side by side (round by round, so that the machine's drift hits both alike), in eager
PyTorch and, when it writes ONNX and onnxruntime is installed, in ONNX Runtime with its default
session options (graph optimisations and thread spinning on, as a deployment would run it).
"""

from __future__ import annotations

import copy
import os
import statistics
import tempfile
import time
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from fga_search.latency import Target, measure_side_by_side
from fga_search.latency._runtimes import export_onnx

from ._cpu_execution import cpu_target

__all__ = [
    "export_latency",
    "interleaved",
    "onnx_files_latency",
    "write_onnx",
]


def interleaved(fns: dict[str, Callable[[], object]], runs: int) -> dict[str, float]:
    """Median ms of each function, run ``runs`` times round by round (10 per round)."""
    times: dict[str, list[float]] = {k: [] for k in fns}
    for fn in fns.values():
        for _ in range(5):
            fn()
    for _ in range(max(1, runs // 10)):
        for name, fn in fns.items():
            for _ in range(10):
                start = time.perf_counter()
                fn()
                times[name].append((time.perf_counter() - start) * 1e3)
    return {k: statistics.median(v) for k, v in times.items()}


def write_onnx(model: nn.Module, example: torch.Tensor, path: str) -> None:
    """Write ``model`` to ``path`` as the export writes ``model.onnx`` (``export_onnx``: the
    latency target's ONNX Runtime measurements export the same way)."""
    export_onnx(model, example, path)


def _onnx_session(model: nn.Module, example: torch.Tensor, path: str, threads: int) -> Any:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        write_onnx(model, example, path)  # as model.onnx is written, so both compare alike
    return _file_session(path, threads)


def _file_session(path: str, threads: int) -> Any:
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    return onnxruntime.InferenceSession(path, options, providers=["CPUExecutionProvider"])


def onnx_files_latency(
    paths: dict[str, str], *, input_shape: Sequence[int], target: Target | None = None, runs: int = 50
) -> dict[str, float]:
    """Median ms of each ONNX file in ONNX Runtime (default session options) on the CPU
    ``target``'s threads and batch (None: PyTorch's threads, batch 1), float32 input, side by side,
    round by round. Each file's input is named ``input``."""
    target = cpu_target(target)
    threads = target.threads or torch.get_num_threads()
    feed = {"input": torch.zeros(target.batch, *input_shape).numpy()}
    sessions = {name: _file_session(path, threads) for name, path in paths.items()}

    def runner(name: str) -> Callable[[], object]:
        return lambda: sessions[name].run(None, feed)

    return interleaved({name: runner(name) for name in sessions}, runs)


def _entry(ms: float, original_ms: float) -> dict[str, float]:
    return {"ms": ms, "original_ms": original_ms, "ratio": ms / original_ms}


def _header(target: Target, runs: int) -> dict[str, Any]:
    """Where and how ``latency_at_export`` was measured: the CPU ``target`` (its hardware,
    threads, batch, dtype and memory format) and the runs."""
    return {
        "device": target.hardware(),
        "threads": target.threads or torch.get_num_threads(),
        "batch": target.batch,
        "dtype": target.dtype,
        "memory_format": "channels_last" if target.channels_last else "nchw",
        "runs": runs,
        "measured": "side by side in the exporting process, medians",
    }


def _check_runs(runs: object) -> None:
    if isinstance(runs, bool) or not isinstance(runs, int) or runs < 10:
        raise ValueError(f"latency runs must be an integer >= 10, got {runs!r}")


def _pytorch_latency(
    model: nn.Module,
    original: nn.Module,
    *,
    folded_original: nn.Module | None = None,
    input_shape: Sequence[int],
    target: Target,
    runs: int,
) -> dict[str, dict[str, float]]:
    """``latency_at_export``'s eager PyTorch entries: ``model`` against ``original`` (and against
    ``folded_original``, when given), side by side on the CPU ``target``, medians of ``runs``."""
    timed = {"model": model, "original": original}
    if folded_original is not None:
        timed["folded original"] = folded_original
    ms = measure_side_by_side(timed, input_shape=input_shape, target=target, rounds=runs // 10, repeats=10)
    out = {"pytorch": _entry(ms["model"], ms["original"])}
    if folded_original is not None:
        out["pytorch_vs_folded_original"] = _entry(ms["model"], ms["folded original"])
    return out


def _onnxruntime_latency(
    model: nn.Module,
    original: nn.Module,
    *,
    input_shape: Sequence[int],
    target: Target,
    runs: int,
    onnx_file: str | None = None,
    scratch: str | None = None,
) -> dict[str, Any] | None:
    """``latency_at_export``'s ONNX Runtime entry (None: onnxruntime is not installed): at the
    CPU ``target``'s threads and batch, in float32 (the ONNX file's precision), ``onnx_file`` if
    given (the file a user ships), else ``model`` exported, against ``original`` exported to a
    temporary folder under ``scratch`` (removed), side by side, medians of ``runs``."""
    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        return None
    threads = target.threads or torch.get_num_threads()
    example = torch.zeros(target.batch, *input_shape)  # float32: the ONNX file's precision
    with tempfile.TemporaryDirectory(prefix=".fga-latency-", dir=scratch) as tmp:
        # the file a user ships, if given; else the model exported here, as the original is
        exported = {"original": original} if onnx_file is not None else {"model": model, "original": original}
        sessions = {
            name: _onnx_session(
                copy.deepcopy(m).cpu().eval(), example, os.path.join(tmp, f"{name}.onnx"), threads
            )
            for name, m in exported.items()
        }
        if onnx_file is not None:
            sessions["model"] = _file_session(onnx_file, threads)
        feed = {"input": example.numpy()}

        def runner(name: str) -> Callable[[], object]:
            return lambda: sessions[name].run(None, feed)

        ort_ms = interleaved({name: runner(name) for name in sessions}, runs)
    return {**_entry(ort_ms["model"], ort_ms["original"]), "dtype": "float32"}


def export_latency(
    model: nn.Module,
    original: nn.Module,
    *,
    folded_original: nn.Module | None = None,
    input_shape: Sequence[int],
    target: Target | None = None,
    runs: int = 50,
    onnx: bool = False,
    onnx_file: str | None = None,
    scratch: str | None = None,
    pytorch: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """CPU latency of ``model`` and ``original`` on ``target`` (a CPU target: its threads, batch,
    dtype and memory format; None: PyTorch's threads, batch 1, float32, NCHW), measured side by
    side: in eager PyTorch (:func:`_pytorch_latency`), and in ONNX Runtime
    (:func:`_onnxruntime_latency`) when ``onnx``. Medians of ``runs`` runs. ``folded_original``
    (the original with its batch norms folded, when the export folded the model's): also timed in
    PyTorch, so that the gain of the fold itself is not credited to the compression
    (``"pytorch_vs_folded_original"``); ONNX Runtime folds batch norms in both graphs itself.
    ``pytorch``: the PyTorch entries measured already (by the search), taken instead of timing."""
    _check_runs(runs)
    target = cpu_target(target)
    out = _header(target, runs)
    out.update(
        pytorch
        if pytorch is not None
        else _pytorch_latency(
            model,
            original,
            folded_original=folded_original,
            input_shape=input_shape,
            target=target,
            runs=runs,
        )
    )
    if onnx:
        out["onnxruntime"] = _onnxruntime_latency(
            model,
            original,
            input_shape=input_shape,
            target=target,
            runs=runs,
            onnx_file=onnx_file,
            scratch=scratch,
        )
    return out
