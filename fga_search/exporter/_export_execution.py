"""Export stage 4, choose execution: how the exported model runs on a CPU, by measurement there.

First how each FGA layer runs (``_cpu_execution``: grouped, block-diagonal or folded dense, kept
only where the whole model is faster), then whether the batch norms that follow convs are folded
into them (``_bn_fold``, kept only if the whole model is faster folded). Both are timed on the
export's CPU target; spec.json records them, and :func:`~fga_search.load_exported` applies them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from fga_search.core._bn_fold import conv_bn_pairs, folded_copy
from fga_search.core._flops import measure_macs
from fga_search.deploy._cpu_execution import choose_cpu_execution
from fga_search.latency import Target, measure_side_by_side

__all__ = ["ExecutionChoice", "choose_execution"]


@dataclass(frozen=True)
class ExecutionChoice:
    """What the export chose and measured: spec.json's ``cpu_execution`` and ``bn_fold``."""

    cpu_execution: dict[str, Any] | None = None  # None: not measured (``latency_runs=0``)
    bn_fold: dict[str, Any] | None = None  # None: not measured, or no batch norm after a conv

    @property
    def folded(self) -> bool:
        """The batch norms are folded as loaded."""
        return bool((self.bn_fold or {}).get("kept"))

    def count(self, way: str) -> int:
        """How many FGA layers run ``way`` (``"block_diagonal"`` or ``"dense"``) on a CPU."""
        return list(((self.cpu_execution or {}).get("layers") or {}).values()).count(way)

    def spec_fields(self) -> dict[str, Any]:
        """The fields of spec.json that ``load_exported`` applies."""
        fields: dict[str, Any] = {}
        if self.cpu_execution is not None:
            fields["cpu_execution"] = self.cpu_execution
        if self.bn_fold is not None:
            fields["bn_fold"] = self.bn_fold
        return fields


def _choose_bn_fold(
    loaded: nn.Module, *, input_shape: Sequence[int], target: Target, runs: int
) -> dict[str, Any] | None:
    """Fold the batch norms that follow convs (``_bn_fold``) into a copy of ``loaded``, time both
    side by side on this CPU, and keep the fold only if the whole model is faster."""
    pairs = conv_bn_pairs(loaded)
    if not pairs:
        return None
    folded = folded_copy(loaded, pairs)
    ms = measure_side_by_side(
        {"unfolded": loaded, "folded": folded},
        input_shape=input_shape,
        target=target,
        rounds=max(1, runs // 10),
        repeats=10,
    )
    return {
        "pairs": pairs,
        "kept": ms["folded"] < ms["unfolded"],
        "before_ms": ms["unfolded"],
        "after_ms": ms["folded"],
        "runs": runs,
    }


def choose_execution(
    loaded: nn.Module, *, input_shape: Sequence[int], target: Target, runs: int
) -> ExecutionChoice:
    """Choose, timed on the CPU ``target`` (``runs`` runs; 0: nothing chosen), how ``loaded`` (the
    model as a user loads it, before any choice; modified: its FGA layers take their execution)
    runs: its FGA layers' CPU execution, then the batch-norm fold on top of it."""
    if not runs:
        return ExecutionChoice()
    cpu_execution = choose_cpu_execution(loaded, input_shape=input_shape, target=target, runs=runs)
    if cpu_execution["kept"]:  # block-diagonal and dense convs spend more FLOPs to take less time
        with torch.no_grad():
            cpu_execution["executed_macs"] = measure_macs(loaded, input_shape=input_shape)
    bn_fold = _choose_bn_fold(loaded, input_shape=input_shape, target=target, runs=runs)
    return ExecutionChoice(cpu_execution=cpu_execution, bn_fold=bn_fold)
