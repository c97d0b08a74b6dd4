"""FLOPs and parameters, analytic (from geometry and a plan) and measured (FlopCounterMode).

Counts are per image (batch 1). ``macs`` are multiply-accumulates; ``flops = 2 * macs``, the
convention of ``torch.utils.flop_counter.FlopCounterMode``. Biases are not counted as FLOPs.
"""

from __future__ import annotations

import copy
import functools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from ._geometry import LayerInfo, decomposable_layers
from ._plan import KEEP, Plan, validate_plan

__all__ = ["FlopCount", "LayerCost", "ModelProfile", "count_flops", "measure_macs"]


@dataclass(frozen=True)
class LayerCost:
    name: str
    macs: int
    params: int
    dense_macs: int
    dense_params: int
    choice: tuple[int, int] | str


@dataclass(frozen=True)
class FlopCount:
    """Whole-model cost per image. ``layers`` holds the convs' costs by name."""

    macs: int
    params: int
    layers: dict[str, LayerCost] = field(default_factory=dict)

    @property
    def flops(self) -> int:
        return 2 * self.macs


def _param_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _check_shape(input_shape: Sequence[int]) -> tuple[int, ...]:
    shape = tuple(int(s) for s in input_shape)
    if len(shape) != 3 or min(shape) < 1:
        raise ValueError(f"input_shape must be (channels, height, width), got {tuple(input_shape)}")
    return shape


def _example(model: nn.Module, shape: tuple[int, ...]) -> torch.Tensor:
    param = next(iter(model.parameters()), None)
    device = param.device if param is not None else torch.device("cpu")
    dtype = param.dtype if param is not None and param.is_floating_point() else torch.float32
    return torch.zeros((1, *shape), device=device, dtype=dtype)


@torch.no_grad()
def measure_macs(model: nn.Module, *, input_shape: Sequence[int]) -> int:
    """MACs per image counted by ``FlopCounterMode`` on one forward pass (eval mode)."""
    shape = _check_shape(input_shape)
    was = model.training
    model.eval()
    try:
        with FlopCounterMode(display=False) as counter:
            model(_example(model, shape))
    finally:
        model.train(was)
    total = counter.get_total_flops()
    assert total % 2 == 0
    return total // 2


class ModelProfile:
    """A model's geometry, measured once, from which any plan's cost follows by arithmetic.

    One forward pass at ``input_shape`` records each conv's output size and each linear's rows.
    ``other_macs`` is what ``FlopCounterMode`` counts outside convs and linears (matmuls in
    attention, say); it is 0 for plain CNNs and does not change with a plan.
    """

    def __init__(self, model: nn.Module, *, input_shape: Sequence[int]) -> None:
        self.input_shape = _check_shape(input_shape)
        self.layers: list[LayerInfo] = decomposable_layers(model)
        names = {info.name for info in self.layers}
        self.out_pixels: dict[str, int] = {}
        self.in_hw: dict[str, tuple[int, int]] = {}  # input height and width at the first call
        linear_macs: dict[str, int] = {}
        hooks = []
        for name, module in model.named_modules():
            if name in names:
                hooks.append(module.register_forward_hook(self._conv_hook(name)))
            elif isinstance(module, nn.Linear):
                hooks.append(module.register_forward_hook(self._linear_hook(name, linear_macs)))
        try:
            measured = measure_macs(model, input_shape=self.input_shape)
        finally:
            for h in hooks:
                h.remove()
        self.linear_macs = sum(linear_macs.values())
        self.base_params = _param_count(model)
        conv_macs = sum(self.out_pixels.get(i.name, 0) * i.dense_macs_per_pixel for i in self.layers)
        self.other_macs = measured - conv_macs - self.linear_macs
        self.base_macs = measured

    def _conv_hook(self, name: str):  # type: ignore[no-untyped-def]
        def hook(module, inputs, output):  # type: ignore[no-untyped-def]
            self.out_pixels[name] = self.out_pixels.get(name, 0) + int(output.shape[-1] * output.shape[-2])
            self.in_hw.setdefault(name, (int(inputs[0].shape[-2]), int(inputs[0].shape[-1])))

        return hook

    @staticmethod
    def _linear_hook(name: str, store: dict[str, int]):  # type: ignore[no-untyped-def]
        def hook(module, inputs, output):  # type: ignore[no-untyped-def]
            rows = output.numel() // module.out_features
            store[name] = store.get(name, 0) + rows * module.in_features * module.out_features

        return hook

    @functools.cached_property
    def by_name(self) -> dict[str, LayerInfo]:
        return {info.name: info for info in self.layers}

    def layer_cost(self, info: LayerInfo, choice: tuple[int, int] | str) -> LayerCost:
        pixels = self.out_pixels.get(info.name, 0)
        dense_macs = pixels * info.dense_macs_per_pixel
        if choice == KEEP:
            return LayerCost(info.name, dense_macs, info.dense_params, dense_macs, info.dense_params, KEEP)
        assert isinstance(choice, tuple)
        g, r = choice
        return LayerCost(
            info.name,
            pixels * info.fga_macs_per_pixel(g, r),
            info.fga_params(g, r),
            dense_macs,
            info.dense_params,
            choice,
        )

    def count(self, plan: Mapping[str, object], *, validate: bool = True) -> FlopCount:
        """Analytic cost of the model decomposed by ``plan`` (no model is built)."""
        norm: Plan = validate_plan(plan, self.layers) if validate else dict(plan)  # type: ignore[arg-type]
        layers = {info.name: self.layer_cost(info, norm.get(info.name, KEEP)) for info in self.layers}
        conv_macs = sum(c.macs for c in layers.values())
        params = self.base_params + sum(c.params - c.dense_params for c in layers.values())
        return FlopCount(macs=conv_macs + self.linear_macs + self.other_macs, params=params, layers=layers)

    def ratio(self, plan: Mapping[str, object], *, metric: str = "flops") -> float:
        """The plan's cost relative to the original model: ``metric`` is 'flops' or 'params'."""
        cost = self.count(plan, validate=False)
        if metric == "flops":
            return cost.macs / self.base_macs
        if metric == "params":
            return cost.params / self.base_params
        raise ValueError(f"metric must be 'flops' or 'params', got {metric!r}")


def count_flops(
    model: nn.Module,
    *,
    input_shape: Sequence[int],
    plan: Mapping[str, object] | None = None,
    method: str = "analytic",
) -> FlopCount:
    """MACs and parameters per image of ``model``, or of ``model`` decomposed by ``plan``.

    ``method="analytic"`` computes them from the layers' geometry without building the
    decomposed model; ``method="measured"`` builds it (untrained) and counts with
    ``FlopCounterMode`` (per-layer costs are then not reported). Both agree exactly for convs and linears.
    """
    if method == "analytic":
        return ModelProfile(model, input_shape=input_shape).count(plan or {})
    if method != "measured":
        raise ValueError(f"method must be 'analytic' or 'measured', got {method!r}")
    target = model
    if plan:
        from ._surgery import apply_plan_structure

        target = apply_plan_structure(copy.deepcopy(model), plan)
    return FlopCount(macs=measure_macs(target, input_shape=input_shape), params=_param_count(target))
