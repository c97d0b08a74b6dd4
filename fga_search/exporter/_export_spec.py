"""An export's ``spec.json``: its format marker, its checked fields, and the model rebuilt from it.

``spec.json`` says how to rebuild the module: the base architecture by name and the plan, the
CPU execution and the batch-norm fold the export chose. :func:`build_exported` rebuilds it with
``build_model`` + ``apply_plan_structure`` and loads a state_dict of plain tensors; no pickled
class is involved. The export builds what a user loads with the same function.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn

from fga_search._util._errors import shorten
from fga_search.core._bn_fold import fold_batchnorms
from fga_search.core._plan import normalize_plan
from fga_search.deploy._cpu_execution import apply_cpu_execution

__all__ = [
    "FILES",
    "OWN_FILES",
    "SPEC_FORMAT",
    "build_exported",
    "is_int",
    "is_number",
    "load_exported",
    "load_weights",
    "read_spec",
]

SPEC_FORMAT = "fga-search-export/1"
FILES = {"torchscript": "model.torchscript.pt", "onnx": "model.onnx"}  # format -> file
OWN_FILES = ("model.pt", "spec.json", *FILES.values())  # every file an export writes


def is_int(value: object) -> bool:
    """An int, not a bool."""
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value: object) -> bool:
    """A finite int or float, not a bool."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def read_spec(folder: str) -> dict[str, Any]:
    """The checked spec.json of the export in ``folder`` (``ValueError`` if it is not one)."""
    path = os.path.join(folder, "spec.json")
    if not os.path.isfile(path):
        raise ValueError(f"{folder} is not an fga-search export (no spec.json)")
    try:
        with open(path) as f:
            spec = json.load(f)
    except (OSError, json.JSONDecodeError) as exc:
        raise ValueError(f"cannot read {path}: {exc}") from None
    if not isinstance(spec, dict) or spec.get("format") != SPEC_FORMAT:
        raise ValueError(f"{path} is not an fga-search export spec (format {SPEC_FORMAT!r})")
    check_spec_fields(spec, path)
    return spec


def check_spec_fields(spec: dict[str, Any], path: str) -> None:
    """The fields a model is rebuilt from, each of its type (``ValueError`` naming the field)."""

    def bad(field: str, why: str, value: object) -> ValueError:
        return ValueError(f"{path}: {field} {why}, got {shorten(repr(value), 80)}")

    model = spec.get("model")
    if not isinstance(model, dict) or not isinstance(model.get("name"), str) or not model["name"]:
        raise bad("model", "must be a mapping with a model 'name'", model)
    classes = spec.get("num_classes")
    if not (isinstance(classes, int) and is_int(classes) and 1 <= classes <= 1_000_000):
        raise bad("num_classes", "must be an integer in [1, 1000000]", classes)
    if not isinstance(spec.get("plan"), dict):
        raise bad("plan", "must be a mapping of layer names to choices", spec.get("plan"))
    for field in ("bn_fold", "cpu_execution"):
        value = spec.get(field)
        if value is not None and not isinstance(value, dict):
            raise bad(field, "must be a mapping", value)
    layers = (spec.get("cpu_execution") or {}).get("layers")
    if layers is not None and not (
        isinstance(layers, dict) and all(isinstance(v, str) for v in layers.values())
    ):
        raise bad("cpu_execution.layers", "must map layer names to executions", layers)


def _base_model(
    spec: dict[str, Any], *, model_factory: Callable[..., nn.Module] | None, trust_model_code: bool
) -> nn.Module:
    """The base architecture that spec.json names: built by ``model_factory`` if given, else from
    the zoo or torchvision by name (their registries: nothing is imported from the name). A
    ``module:factory`` name is imported and called only with ``trust_model_code``."""
    from fga_search.models._zoo import build_model, resolve_model

    name, num_classes = spec["model"]["name"], spec["num_classes"]  # checked by check_spec_fields
    if model_factory is not None:
        model = model_factory(num_classes=num_classes)
        if not isinstance(model, nn.Module):
            raise ValueError(f"model_factory returned a {type(model).__name__}, not an nn.Module")
        return model
    source = resolve_model(name)  # where the name comes from; imports nothing the name names
    if source.source == "factory" and not trust_model_code:
        raise ValueError(
            f"spec.json names the model {name!r}, a user factory that loading would import and call: "
            "pass model_factory=<the function that builds it>, or trust_model_code=True if you trust "
            "the code it names"
        )
    return build_model(source, num_classes=num_classes)


def load_weights(path: str) -> Mapping[str, torch.Tensor]:
    """``model.pt``: a state_dict of plain tensors (``weights_only``; ``ValueError`` if unreadable)."""
    try:
        state: Mapping[str, torch.Tensor] = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ValueError(f"cannot read weights {path}: {exc}") from None
    return state


def build_exported(
    spec: dict[str, Any],
    state: Mapping[str, torch.Tensor],
    *,
    weights: str,
    fold_batchnorm: bool = True,
    model_factory: Callable[..., nn.Module] | None = None,
    trust_model_code: bool = False,
) -> nn.Module:
    """The model that ``spec`` (checked) describes, with the weights ``state`` (from ``weights``,
    named in errors), its batch norms folded as recorded (unless ``fold_batchnorm=False``) and its
    FGA layers set to their recorded CPU execution; in eval mode, on the CPU."""
    from fga_search.core._surgery import apply_plan_structure

    model = _base_model(spec, model_factory=model_factory, trust_model_code=trust_model_code)
    apply_plan_structure(model, normalize_plan(spec["plan"]))
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()[0]
        raise ValueError(f"weights {weights} do not fit the model described by spec.json: {first}") from None
    bn_fold = spec.get("bn_fold") or {}
    if fold_batchnorm and bn_fold.get("kept"):
        pairs = bn_fold.get("pairs")
        if not isinstance(pairs, dict) or not all(isinstance(v, str) for v in pairs.values()):
            raise ValueError(f"spec.json: bn_fold.pairs must map conv names to BN names, got {pairs!r}")
        fold_batchnorms(model, pairs)
    layers = (spec.get("cpu_execution") or {}).get("layers") or {}
    if layers:
        apply_cpu_execution(model, layers)
    return model.eval()


def load_exported(
    path: str | os.PathLike[str],
    *,
    fold_batchnorm: bool = True,
    model_factory: Callable[..., nn.Module] | None = None,
    trust_model_code: bool = False,
) -> nn.Module:
    """Rebuild an exported model (a folder written by :func:`export`, or its ``spec.json``).

    The base architecture is built by the name spec.json gives: a zoo or torchvision name from
    their registries. Loading imports and calls nothing that spec.json names: a user model
    (``pkg.module:factory``) is built by ``model_factory(num_classes=K)``, which the caller passes,
    or, only with ``trust_model_code=True``, by importing and calling the factory spec.json names
    (else ``ValueError``). Its planned convs are replaced by FGA layers, and ``model.pt`` is loaded
    with ``weights_only=True`` (plain tensors: no pickled object is run).
    The FGA layers that the export measured faster on the CPU another way (the grouped conv as a
    block-diagonal dense conv, or the pair folded into one dense conv) run so on CPU inputs without
    gradients (``spec["cpu_execution"]``). The batch norms that the export measured faster
    folded into the convs before them are folded (``spec["bn_fold"]``; they become
    ``nn.Identity``), unless ``fold_batchnorm=False``: keep them to fine-tune the model further.
    Returns the module in eval mode, on the CPU.
    """
    if not isinstance(trust_model_code, bool):
        raise ValueError(f"trust_model_code must be True or False, got {trust_model_code!r}")
    if model_factory is not None and not callable(model_factory):
        raise ValueError(f"model_factory must be callable (factory(num_classes=K)), got {model_factory!r}")
    folder = os.fspath(path)
    if os.path.isfile(folder) and os.path.basename(folder) == "spec.json":
        folder = os.path.dirname(folder) or "."
    if not os.path.isdir(folder):
        raise ValueError(f"path {folder!r} is not an exported model folder")
    spec = read_spec(folder)
    weights = os.path.join(folder, "model.pt")
    if not os.path.isfile(weights):
        raise ValueError(f"{folder} has spec.json but no model.pt")
    return build_exported(
        spec,
        load_weights(weights),
        weights=weights,
        fold_batchnorm=fold_batchnorm,
        model_factory=model_factory,
        trust_model_code=trust_model_code,
    )
