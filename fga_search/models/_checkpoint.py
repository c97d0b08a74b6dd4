"""Loading weights safely: always ``weights_only=True``, with clear messages when they do not fit."""

from __future__ import annotations

import os
import pickle
import warnings
import zipfile
from collections import OrderedDict
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from fga_search._util._errors import first_line, shorten

__all__ = ["WeightsError", "cpu_state_dict", "load_state_dict_file", "load_weights"]

_WRAPPER_KEYS = ("state_dict", "model_state_dict", "model", "weights")


class WeightsError(ValueError):
    """Weights that cannot be read or do not fit the model."""


def cpu_state_dict(model: nn.Module, *, clone: bool = False) -> OrderedDict[str, torch.Tensor]:
    """``model.state_dict()`` as detached CPU tensors (cloned and contiguous with ``clone``), with
    its ``_metadata``: the per-module versions that some modules' loaders require (torchvision's
    MNASNet refuses a state_dict without them)."""
    state = model.state_dict()
    out: OrderedDict[str, torch.Tensor] = OrderedDict()
    for key, value in state.items():
        value = value.detach().cpu()
        out[key] = value.clone().contiguous() if clone else value
    metadata = getattr(state, "_metadata", None)
    if metadata is not None:
        out._metadata = metadata  # type: ignore[attr-defined]
    return out


def _strip_prefix(key: str) -> str:
    return key[7:] if key.startswith("module.") else key


def _reason(exc: Exception) -> str:
    """Why torch could not read a file, without torch's advice to load it with
    ``weights_only=False``: that would run code from the file, which fga-search never does."""
    if isinstance(exc, pickle.UnpicklingError) or "weights_only" in str(exc):
        return "it holds objects other than tensors, or is not a PyTorch file"
    if isinstance(exc, (zipfile.BadZipFile, RuntimeError)):
        return "not a readable PyTorch archive: " + shorten(first_line(exc).split(". ")[0], 120)
    return f"not a PyTorch file ({type(exc).__name__} while reading it)"


def load_state_dict_file(path: str | os.PathLike[str]) -> dict[str, torch.Tensor]:
    """Read a state_dict of tensors with ``torch.load(weights_only=True)``.

    Accepts a bare state_dict or one wrapped under a 'state_dict'/'model' key, and strips a
    'module.' prefix left by DataParallel.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise WeightsError(f"weights file not found: {path}")
    try:
        with warnings.catch_warnings():  # e.g. on a pickle protocol: the one line below says it all
            warnings.simplefilter("ignore")
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except (
        Exception
    ) as exc:  # torch's reader fails on random bytes with any error (IndexError, KeyError, ...)
        raise WeightsError(
            f"cannot read weights file {path} (corrupt, or not a weights-only checkpoint): {_reason(exc)}"
        ) from None
    if isinstance(obj, Mapping):
        for key in _WRAPPER_KEYS:
            inner = obj.get(key)
            if (
                isinstance(inner, Mapping)
                and inner
                and all(isinstance(v, torch.Tensor) for v in inner.values())
            ):
                obj = inner
                break
    if not isinstance(obj, Mapping) or not obj:
        raise WeightsError(f"weights file {path} does not hold a state_dict (a mapping of names to tensors)")
    out: OrderedDict[str, torch.Tensor] = OrderedDict()
    for key, value in obj.items():
        if not isinstance(value, torch.Tensor):
            raise WeightsError(
                f"weights file {path}: entry {key!r} is a {type(value).__name__}, not a tensor"
            )
        out[_strip_prefix(key)] = value
    metadata = getattr(obj, "_metadata", None)
    if isinstance(metadata, Mapping):  # module versions, kept for the modules' own loaders
        wrapped = "module" in metadata  # DataParallel's: "" is the wrapper, "module" the model
        out._metadata = OrderedDict(  # type: ignore[attr-defined]
            ("" if k == "module" else _strip_prefix(k), v)
            for k, v in metadata.items()
            if not (wrapped and k == "")
        )
    return out


def _mismatch_message(model: nn.Module, state: Mapping[str, torch.Tensor], what: str) -> str | None:
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    shapes = [
        f"{k} (checkpoint {tuple(state[k].shape)} vs model {tuple(expected[k].shape)})"
        for k in expected
        if k in state and state[k].shape != expected[k].shape
    ]
    if not (missing or unexpected or shapes):
        return None

    def head(items: list[str]) -> str:
        return ", ".join(items[:3]) + (f" and {len(items) - 3} more" if len(items) > 3 else "")

    parts = []
    if shapes:
        parts.append(f"shape mismatch: {head(shapes)}")
    if missing:
        parts.append(f"missing keys: {head(missing)}")
    if unexpected:
        parts.append(f"unexpected keys: {head(unexpected)}")
    return f"weights do not fit {what}: " + "; ".join(parts)


def load_weights(
    model: nn.Module, state: Mapping[str, torch.Tensor], *, what: str = "the model"
) -> nn.Module:
    """Load ``state`` into ``model`` strictly, after checking names, shapes and finiteness."""
    message = _mismatch_message(model, state, what)
    if message:
        raise WeightsError(message)
    for key, value in state.items():
        if value.is_floating_point() and not torch.isfinite(value).all():
            raise WeightsError(f"weights for {what} have non-finite values (NaN or inf) in {key!r}")
    if getattr(state, "_metadata", None) is None:
        # a state_dict saved without module versions (a plain dict): take the model's own, as if
        # it had been saved from this model (some modules' loaders refuse none)
        own: Any = OrderedDict(state)
        own._metadata = getattr(model.state_dict(), "_metadata", None)
        state = own
    model.load_state_dict(state, strict=True)
    return model
