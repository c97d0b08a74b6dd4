"""Export stage 7, time: the exported model's latency against the original's on the export's CPU
target (``spec["latency_at_export"]``), in eager PyTorch and, with ONNX, in ONNX Runtime.

What the search already measured is not measured again. Without a latency target the search
times each front member on this CPU (batch 1, float32, NCHW) as the export runs it, side by side
with the original (``_policy._front_cpu_latency``: pareto.parquet's ``cpu_latency_ms`` and
``cpu_latency_ratio``, front_latency.json). When the exported model is what the search timed
there (a front member, not fine-tuned further, on the same CPU, threads and torch, with the same
CPU execution and its batch norms folded), those figures are its PyTorch latency, marked as the
search's; only what the search did not time (ONNX Runtime) is measured.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from fga_search.core._bn_fold import folded_copy
from fga_search.deploy._runtime_latency import export_latency
from fga_search.latency import Target
from fga_search.runs._runview import RunView

from ._export_execution import ExecutionChoice
from ._export_spec import is_int, is_number

__all__ = ["FRONT_TARGET", "SearchTiming", "search_timing", "time_export"]

FRONT_TARGET = Target("cpu", None, 1, "float32", False)  # where the search times its front
SEARCH_MEASURED = (
    "by the search after its trials (front_latency.json): this front member as exported, against "
    "the original with its batch norms folded alike, side by side; not timed again"
)


@dataclass(frozen=True)
class SearchTiming:
    """A front member's CPU latency as the search measured it."""

    trial: int
    ms: float
    original_ms: float  # the original, its batch norms folded (as deployed)
    ratio: float
    runs: int

    def entry(self) -> dict[str, Any]:
        """``latency_at_export["pytorch"]``: the search's figures, verbatim, and whose they are."""
        return {
            "ms": self.ms,
            "original_ms": self.original_ms,
            "ratio": self.ratio,
            "runs": self.runs,
            "measured_by": "search",
            "measured": SEARCH_MEASURED,
        }


def search_timing(
    view: RunView, trial: int, *, finetuned: bool, target: Target, execution: ExecutionChoice
) -> SearchTiming | None:
    """The search's CPU latency of front member ``trial``, if the exported model is the one it
    timed: not ``finetuned`` (a fine-tune changes the weights, whose timing the search did not
    see), timed on ``target`` (the search's front target, on this CPU with as many threads, in
    this torch), and run as ``execution`` runs it (as many block-diagonal and dense FGA layers,
    its batch norms folded); else None."""
    if finetuned or target != FRONT_TARGET or execution.cpu_execution is None:
        return None
    row = next((r for r in view.front if int(r["trial"]) == trial), None)
    record = view.folder.read_json("front_latency.json", None)
    if row is None or not isinstance(record, dict):
        return None
    ms, ratio, key = row.get("cpu_latency_ms"), row.get("cpu_latency_ratio"), str(trial)
    same_place = (
        record.get("device") == target.hardware()
        and record.get("runtime") == f"eager PyTorch {torch.__version__}"
        and record.get("batch") == target.batch
        and record.get("dtype") == target.dtype
    )
    same_execution = (
        (record.get("block_diagonal_layers") or {}).get(key) == execution.count("block_diagonal")
        and (record.get("dense_layers") or {}).get(key) == execution.count("dense")
        and (execution.folded or execution.bn_fold is None)  # the search folds every BN it can
    )
    original_ms, runs = record.get("original_ms"), record.get("runs")
    figures = (ms, original_ms, ratio)
    if not (same_place and same_execution and all(is_number(v) for v in figures) and is_int(runs)):
        return None
    if (record.get("trials") or {}).get(key) != ms:  # pareto.parquet and front_latency.json agree
        return None
    assert ms is not None and original_ms is not None and ratio is not None and runs is not None
    return SearchTiming(trial=trial, ms=ms, original_ms=original_ms, ratio=ratio, runs=runs)


def time_export(
    loaded: nn.Module,
    original: nn.Module,
    *,
    execution: ExecutionChoice,
    reused: SearchTiming | None,
    input_shape: Sequence[int],
    target: Target,
    runs: int,
    onnx_file: str | None,
    scratch: str,
) -> dict[str, Any] | None:
    """``latency_at_export`` (None: ``runs`` is 0, nothing timed): ``loaded`` against
    ``original`` on the CPU ``target``, in eager PyTorch (the search's figures when ``reused``,
    else timed here; with the batch norms folded, also against the original folded alike) and, with
    ``onnx_file``, in ONNX Runtime."""
    if not runs:
        return None
    folded = execution.folded and reused is None  # the search's original: folded alike already
    out = export_latency(
        loaded,
        original,
        folded_original=folded_copy(copy.deepcopy(original).cpu().eval()) if folded else None,
        input_shape=input_shape,
        target=target,
        runs=runs,
        onnx=onnx_file is not None,
        onnx_file=onnx_file,
        scratch=scratch,
        pytorch=None if reused is None else {"pytorch": reused.entry()},
    )
    if reused is not None:
        out["runs"] = runs if onnx_file is not None else reused.runs
        out["measured"] = f"PyTorch {SEARCH_MEASURED}" + (
            "; ONNX Runtime side by side in the exporting process, medians" if onnx_file is not None else ""
        )
    return out
