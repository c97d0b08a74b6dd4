"""Pick, by measurement, how each FGA layer's grouped conv runs on this CPU.

``FGAConv2d.set_cpu_execution("block_diagonal")`` runs a grouped conv as one dense conv with a
block-diagonal weight: g times the FLOPs, the same output, and on small inputs often faster,
because PyTorch sends small dense convs to its own im2col + GEMM path and grouped ones to
oneDNN (``scripts/bench_cpu_kernels.py``). Each eligible layer is timed both ways, alone, side by
side; the faster is kept; then the whole model is timed before and after, side by side, and the
change is kept only if the whole model is faster.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from ._fga import FGAConv2d
from .latency import Target, measure_side_by_side

__all__ = ["apply_cpu_execution", "choose_cpu_execution"]


def _eligible(model: nn.Module) -> dict[str, FGAConv2d]:
    return {
        name: m for name, m in model.named_modules() if isinstance(m, FGAConv2d) and m.can_run_block_diagonal
    }


def apply_cpu_execution(model: nn.Module, layers: dict[str, str]) -> None:
    """Set the recorded execution of each named FGA layer (``ValueError`` for another name)."""
    for name, execution in layers.items():
        try:
            module = model.get_submodule(name)
        except AttributeError:
            module = None
        if not isinstance(module, FGAConv2d):
            raise ValueError(f"cpu_execution names {name!r}, which is not an FGA layer of the model")
        module.set_cpu_execution(execution)


@torch.inference_mode()
def _layer_inputs(
    model: nn.Module, names: Sequence[str], input_shape: Sequence[int]
) -> dict[str, tuple[int, ...]]:
    shapes: dict[str, tuple[int, ...]] = {}
    hooks = [
        model.get_submodule(name).register_forward_pre_hook(
            lambda _m, args, name=name: shapes.__setitem__(name, tuple(args[0].shape[1:]))
        )
        for name in names
    ]
    try:
        model(torch.zeros(1, *input_shape))
    finally:
        for h in hooks:
            h.remove()
    return shapes


def choose_cpu_execution(
    model: nn.Module, *, input_shape: Sequence[int], threads: int | None = None, runs: int = 50
) -> dict[str, Any]:
    """Time each eligible FGA layer of ``model`` (on the CPU, batch 1, float32) grouped and
    block-diagonal, set the faster, and keep the change only if the whole model, timed before and
    after side by side, is faster. Modifies ``model``; returns what was chosen and measured:
    ``layers`` (name -> ``"block_diagonal"``, the layers changed; empty if none was kept),
    ``before_ms``, ``after_ms`` and ``kept``."""
    if isinstance(runs, bool) or not isinstance(runs, int) or runs < 10:
        raise ValueError(f"runs must be an integer >= 10, got {runs!r}")
    model = model.eval()
    target = Target("cpu", threads, 1, "float32", False)
    eligible = _eligible(model)
    result: dict[str, Any] = {"layers": {}, "candidates": len(eligible), "kept": False, "runs": runs}
    if not eligible:
        return result
    shapes = _layer_inputs(model, list(eligible), input_shape)
    rounds = max(1, runs // 10)
    chosen: dict[str, str] = {}
    for name, layer in eligible.items():
        if name not in shapes:  # not reached by the forward pass
            continue
        fast = copy.deepcopy(layer)
        fast.set_cpu_execution("block_diagonal")
        ms = measure_side_by_side(
            {"grouped": layer, "block_diagonal": fast}, input_shape=shapes[name], target=target, rounds=rounds
        )
        if ms["block_diagonal"] < ms["grouped"]:
            chosen[name] = "block_diagonal"
    if not chosen:
        return result
    after = copy.deepcopy(model)
    apply_cpu_execution(after, chosen)
    ms = measure_side_by_side(
        {"before": model, "after": after}, input_shape=input_shape, target=target, rounds=rounds
    )
    result.update(before_ms=ms["before"], after_ms=ms["after"])
    if ms["after"] < ms["before"]:
        apply_cpu_execution(model, chosen)
        result.update(layers=chosen, kept=True)
    return result
