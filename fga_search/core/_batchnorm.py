"""Batch-norm running statistics: the reset that BN recalibration and the refinement share (torch only)."""

from __future__ import annotations

from torch import nn

__all__ = ["start_bn_recalibration"]


def start_bn_recalibration(model: nn.Module) -> list[tuple[nn.Module, float | None]]:
    """Reset every batch-norm layer's running statistics and put it in train mode with a
    cumulative average, so that the next forward passes re-estimate them. Returns the layers with
    their momentum, to restore afterwards."""
    saved: list[tuple[nn.Module, float | None]] = []
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm) and module.track_running_stats:
            saved.append((module, module.momentum))
            module.reset_running_stats()
            module.momentum = None
            module.train()
    return saved
