"""Adaptive average pooling that the ONNX exporter accepts at any input size.

The TorchScript-based ONNX exporter refuses ``AdaptiveAvgPool2d`` when the output size does not
divide the input size, e.g. a torchvision VGG (pool to 7x7) or AlexNet (6x6) run on CIFAR-size
images, whose last feature map is 1x1 or 2x2. For the fixed input size of an export, adaptive
average pooling is a linear map per axis: output cell i averages input cells
floor(i * H / h) .. ceil((i + 1) * H / h) - 1. :func:`onnx_ready` returns a copy of a model in
which each such pool is that map (two small matmuls), exact for the example's input size.
"""

from __future__ import annotations

import copy
import math

import torch
from torch import nn

__all__ = ["FixedAdaptiveAvgPool2d", "onnx_ready"]


def _pool_matrix(size_in: int, size_out: int) -> torch.Tensor:
    """(size_out, size_in) matrix of adaptive average pooling along one axis."""
    m = torch.zeros(size_out, size_in)
    for i in range(size_out):
        start = (i * size_in) // size_out
        end = math.ceil((i + 1) * size_in / size_out)
        m[i, start:end] = 1.0 / (end - start)
    return m


class FixedAdaptiveAvgPool2d(nn.Module):
    """``AdaptiveAvgPool2d(output)`` for inputs of spatial size ``input_hw`` only."""

    def __init__(self, input_hw: tuple[int, int], output_hw: tuple[int, int]) -> None:
        super().__init__()
        self.input_hw = input_hw
        self.output_hw = output_hw
        self.register_buffer("rows", _pool_matrix(input_hw[0], output_hw[0]))
        self.register_buffer("cols", _pool_matrix(input_hw[1], output_hw[1]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows, cols = self.rows, self.cols
        assert isinstance(rows, torch.Tensor) and isinstance(cols, torch.Tensor)
        rows, cols = rows.to(x.dtype), cols.to(x.dtype)
        return torch.matmul(torch.matmul(rows, x), cols.T)  # (h, H) @ (.., H, W) @ (W, w)

    def extra_repr(self) -> str:
        return f"input_hw={self.input_hw}, output_hw={self.output_hw}"


def _output_pair(pool: nn.AdaptiveAvgPool2d) -> tuple[int | None, int | None]:
    size = pool.output_size
    return (size, size) if isinstance(size, int) or size is None else (size[0], size[1])


def _output_hw(pool: nn.AdaptiveAvgPool2d, hw: tuple[int, int]) -> tuple[int, int]:
    pair = _output_pair(pool)
    return (pair[0] or hw[0], pair[1] or hw[1])  # None keeps that axis's input size


def onnx_ready(model: nn.Module, example: torch.Tensor) -> nn.Module:
    """``model`` itself when every ``AdaptiveAvgPool2d`` it runs on ``example`` pools to a divisor
    of its input size; otherwise a copy in which those that do not are
    :class:`FixedAdaptiveAvgPool2d` for the input size they saw (a pool called at several input
    sizes is left as it is)."""
    pools = {
        name: m
        for name, m in model.named_modules()
        # a pool to 1 (or None: the input's size) on both axes divides every input: no forward pass
        if type(m) is nn.AdaptiveAvgPool2d and any(size not in (1, None) for size in _output_pair(m))
    }
    if not pools:
        return model
    seen: dict[str, set[tuple[int, int]]] = {name: set() for name in pools}

    def record(name: str):  # type: ignore[no-untyped-def]
        def hook(module, inputs, output):  # type: ignore[no-untyped-def]
            seen[name].add((int(inputs[0].shape[-2]), int(inputs[0].shape[-1])))

        return hook

    handles = [m.register_forward_hook(record(name)) for name, m in pools.items()]
    try:
        with torch.no_grad():
            model(example)
    finally:
        for h in handles:
            h.remove()
    swaps: dict[str, tuple[tuple[int, int], tuple[int, int]]] = {}
    for name, pool in pools.items():
        if len(seen[name]) != 1:
            continue
        (hw,) = seen[name]
        out = _output_hw(pool, hw)
        if hw[0] % out[0] or hw[1] % out[1]:
            swaps[name] = (hw, out)
    if not swaps:
        return model
    new = copy.deepcopy(model)
    for name, (hw, out) in swaps.items():
        parent_name, _, child = name.rpartition(".")
        parent = new.get_submodule(parent_name) if parent_name else new
        setattr(parent, child, FixedAdaptiveAvgPool2d(hw, out).to(device=example.device, dtype=example.dtype))
    return new
