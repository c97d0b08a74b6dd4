"""Model surgery: replace the convs a plan names by FGA pairs."""

from __future__ import annotations

import copy
from collections.abc import Iterable, Mapping

import torch
from torch import nn

from ._fga import FGAConv2d
from ._geometry import decomposable_layers
from ._plan import KEEP, Plan, validate_plan
from ._refine import refine

__all__ = ["apply_plan_structure", "check_plan", "decompose"]


def _set_submodule(root: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child, module)


def check_plan(model: nn.Module, plan: Mapping[str, object]) -> Plan:
    """Validate ``plan`` against ``model``; a name that is a module but not a Conv2d is named as such."""
    modules = dict(model.named_modules())
    for name in plan:
        module = modules.get(name) if isinstance(name, str) else None
        if module is not None and not isinstance(module, nn.Conv2d):
            valid = ", ".join(info.name for info in decomposable_layers(model))
            raise ValueError(
                f"plan names layer {name!r}, which is a {type(module).__name__}, not a Conv2d; "
                f"decomposable Conv2d layers are: {valid}"
            )
    return validate_plan(plan, decomposable_layers(model))


def decompose(
    model: nn.Module,
    plan: Mapping[str, object],
    calibration: torch.Tensor | Iterable[object] | None = None,
    *,
    mode: str = "asymmetric",
    max_samples: int = 32768,
    ridge: float = 1e-3,
    seed: int = 0,
) -> nn.Module:
    """Return a copy of ``model`` in which every conv named by ``plan`` is an :class:`FGAConv2d`.

    ``plan`` maps conv names to ``(groups, rank)`` or ``"keep"``. The FGA layers are initialised
    by per-group truncated SVD of the trained weights. With ``calibration`` (a batch of model
    inputs, or an iterable of batches or ``(input, label)`` pairs), each layer's 1x1 conv is then
    refitted by least squares (see :func:`fga_search.refine`). ``model`` is never modified.
    """
    norm = check_plan(model, plan)
    new = copy.deepcopy(model)
    for name, choice in norm.items():
        if choice == KEEP:
            continue
        assert isinstance(choice, tuple)
        conv = new.get_submodule(name)
        assert isinstance(conv, nn.Conv2d)
        _set_submodule(new, name, FGAConv2d.from_conv(conv, groups=choice[0], rank=choice[1]))
    if calibration is not None:
        refine(new, model, calibration, mode=mode, max_samples=max_samples, ridge=ridge, seed=seed)
    return new


def apply_plan_structure(model: nn.Module, plan: Mapping[str, object]) -> nn.Module:
    """Replace, in place, the planned convs by untrained FGA layers of the right shapes.

    Used to rebuild a decomposed model before loading its state_dict.
    """
    norm = check_plan(model, plan)
    for name, choice in norm.items():
        if choice == KEEP:
            continue
        assert isinstance(choice, tuple)
        conv = model.get_submodule(name)
        assert isinstance(conv, nn.Conv2d)
        layer = FGAConv2d.shaped_like(conv, groups=choice[0], rank=choice[1])
        _set_submodule(model, name, layer)
    return model
