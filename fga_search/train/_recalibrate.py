"""Batch-norm recalibration: re-estimate running statistics after the weights changed."""

from __future__ import annotations

import torch
from torch import nn

from fga_search.core._batchnorm import start_bn_recalibration
from fga_search.models._loader import DeviceSplit

from ._evaluate import autocast

__all__ = ["recalibrate_bn"]


@torch.no_grad()
def recalibrate_bn(
    model: nn.Module,
    data: DeviceSplit,
    *,
    images: int = 1024,
    batch_size: int = 256,
    seed: int = 0,
    amp_dtype: torch.dtype | None = None,
) -> int:
    """Reset every batch-norm layer's running statistics and re-estimate them (cumulative average)
    over ``images`` random training images. Other layers stay in eval mode. Returns the BN count."""
    was = model.training
    model.eval()
    saved = start_bn_recalibration(model)
    if not saved:
        model.train(was)
        return 0
    gen = torch.Generator().manual_seed(seed)
    try:
        for batch in data.batches(batch_size, shuffle=True, generator=gen, limit=images):
            with autocast(data.device, amp_dtype):
                model(batch.x)
    finally:
        for bn, momentum in saved:
            bn.momentum = momentum  # type: ignore[assignment]
        model.train(was)
    return len(saved)
