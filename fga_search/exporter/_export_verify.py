"""Verify an export: its FLOPs and params against the plan's count, and each written file's
outputs against the PyTorch model on a random batch."""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from fga_search.core._flops import FlopCount, measure_macs

from ._export_spec import FILES
from ._export_write import ONNX_HINT, TORCHSCRIPT_HINT, exporting, has_onnxruntime

__all__ = ["TOLERANCE", "ExportVerificationError", "Verification", "check", "example_batch", "verify"]

TOLERANCE = 1e-4  # max abs difference of any exported format's outputs, x max(1, max |output|)


class ExportVerificationError(RuntimeError):
    """An exported file does not reproduce the PyTorch model (or its measured FLOPs differ)."""


@dataclass(frozen=True)
class Verification:
    """What the verify stage measured on the written files."""

    macs: int  # FlopCounterMode on the loaded model, its FGA layers grouped, per image
    params: int  # of the model as trained (batch norms unfolded)
    max_abs_diff: dict[str, float | None]  # file -> max abs difference (None: not checked)
    tolerance: float
    max_abs_output: float
    batch: tuple[int, ...]

    def to_spec(self) -> dict[str, Any]:
        return {
            "tolerance": self.tolerance,
            "rule": f"max abs diff <= {TOLERANCE:g} x max(1, max |output|)",
            "max_abs_output": self.max_abs_output,
            "max_abs_diff": self.max_abs_diff,
            "batch": list(self.batch),
        }


def example_batch(input_shape: Sequence[int]) -> torch.Tensor:
    """The random batch that the formats are traced with and checked on (the same every call)."""
    return torch.randn(8, *input_shape, generator=torch.Generator().manual_seed(0))


def _max_diff(a: object, b: object) -> float:
    return float((torch.as_tensor(a).float() - torch.as_tensor(b).float()).abs().max())


def check(name: str, diff: float, limit: float) -> float:
    if not math.isfinite(diff) or diff > limit:
        raise ExportVerificationError(
            f"verification failed: {name} differs from the PyTorch model by {diff:.3g} (max abs), "
            f"over {limit:.3g} ({TOLERANCE:g} x max(1, max |output|))"
        )
    return diff


def _file_outputs(kind: str, path: str, example: torch.Tensor) -> torch.Tensor | None:
    """The outputs of the written file of format ``kind`` on ``example`` (None: ONNX without
    onnxruntime installed)."""
    if kind == "torchscript":
        with exporting("TorchScript", TORCHSCRIPT_HINT):
            scripted = torch.jit.load(path, map_location="cpu")
        with torch.no_grad():
            out: torch.Tensor = scripted(example)
        return out
    if not has_onnxruntime():
        return None
    import onnxruntime

    with exporting("ONNX", ONNX_HINT):
        session = onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"])
    (logits,) = session.run(["logits"], {"input": example.numpy()})
    return torch.from_numpy(logits)


def verify(
    model: nn.Module,
    loaded: nn.Module,
    grouped: nn.Module,
    *,
    cost: FlopCount,
    input_shape: Sequence[int],
    folder: str,
    formats: Sequence[str],
) -> Verification:
    """``loaded`` (what a user loads from ``folder``) and ``grouped`` (it with its FGA layers
    grouped) against ``model`` (as trained, on the CPU): the MACs of ``grouped`` and the params of
    ``model`` equal the plan's count ``cost``, and the outputs of ``loaded`` and of each written
    format's file (``formats``) are within the tolerance of ``model``'s
    (:class:`ExportVerificationError` otherwise)."""
    macs = measure_macs(grouped, input_shape=input_shape)
    params = sum(p.numel() for p in model.parameters())  # as trained: batch norms unfolded
    if macs != cost.macs or params != cost.params:
        raise ExportVerificationError(
            f"verification failed: the exported model has {macs} MACs and {params} params, "
            f"the plan's analytic count is {cost.macs} MACs and {cost.params} params"
        )
    example = example_batch(input_shape)
    with torch.no_grad():
        reference = model(example)
        # relative to the outputs' scale: an untrained net's logits can reach thousands
        scale = float(reference.abs().max())
        limit = TOLERANCE * max(1.0, scale)
        diffs: dict[str, float | None] = {
            "model.pt": check("model.pt", _max_diff(loaded(example), reference), limit)
        }
    for kind in formats:
        out = _file_outputs(kind, os.path.join(folder, FILES[kind]), example)
        diffs[kind] = None if out is None else check(kind, _max_diff(out, reference), limit)
    return Verification(
        macs=macs,
        params=params,
        max_abs_diff=diffs,
        tolerance=limit,
        max_abs_output=scale,
        batch=tuple(example.shape),
    )
