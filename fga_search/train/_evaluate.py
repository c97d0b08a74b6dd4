"""Accuracy of a model on a split."""

from __future__ import annotations

import contextlib
from collections.abc import Mapping

import torch
from torch import nn

from fga_search.models._loader import DeviceSplit

__all__ = ["autocast", "evaluate", "main_logits", "predict_logits"]


def autocast(device: torch.device, dtype: torch.dtype | None) -> contextlib.AbstractContextManager[object]:
    """bf16/fp16 autocast on the device, or nothing for float32."""
    if dtype is None or dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def main_logits(out: object) -> torch.Tensor:
    """The logits in a model's output: the tensor itself, or the main logits of a structured
    output (``.logits`` of torchvision's GoogLeNet / Inception training outputs, a ``"logits"``
    key, or the first element of a tuple, as with auxiliary heads)."""
    if isinstance(out, torch.Tensor):
        return out
    inner = out.get("logits") if isinstance(out, Mapping) else getattr(out, "logits", None)
    if isinstance(inner, torch.Tensor):
        return inner
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
        return out[0]
    raise TypeError(
        f"the model returned a {type(out).__name__}; expected a tensor of logits, or an output "
        "with a 'logits' tensor, or a tuple whose first element is the logits"
    )


@torch.no_grad()
def predict_logits(
    model: nn.Module,
    data: DeviceSplit,
    *,
    batch_size: int = 512,
    amp_dtype: torch.dtype | None = None,
    limit: int | None = None,
) -> torch.Tensor:
    """Float32 logits for the (first ``limit``) rows of a split, in order."""
    was = model.training
    model.eval()
    outs = []
    try:
        for batch in data.batches(batch_size, limit=limit):
            with autocast(data.device, amp_dtype):
                outs.append(main_logits(model(batch.x)).float())
    finally:
        model.train(was)
    return torch.cat(outs)


@torch.no_grad()
def evaluate(
    model: nn.Module,
    data: DeviceSplit,
    *,
    batch_size: int = 512,
    amp_dtype: torch.dtype | None = None,
    limit: int | None = None,
) -> float:
    """Top-1 accuracy in [0, 1]."""
    logits = predict_logits(model, data, batch_size=batch_size, amp_dtype=amp_dtype, limit=limit)
    labels = data.labels[: len(logits)]
    return float((logits.argmax(1) == labels).float().mean())
