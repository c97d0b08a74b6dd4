"""Loading weights safely: always ``weights_only=True``, with clear messages when they do not fit."""

from __future__ import annotations

import os
import pickle
import zipfile
from collections.abc import Mapping

import torch
from torch import nn

__all__ = ["WeightsError", "load_state_dict_file", "load_weights"]

_WRAPPER_KEYS = ("state_dict", "model_state_dict", "model", "weights")


class WeightsError(ValueError):
    """Weights that cannot be read or do not fit the model."""


def load_state_dict_file(path: str | os.PathLike[str]) -> dict[str, torch.Tensor]:
    """Read a state_dict of tensors with ``torch.load(weights_only=True)``.

    Accepts a bare state_dict or one wrapped under a 'state_dict'/'model' key, and strips a
    'module.' prefix left by DataParallel.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise WeightsError(f"weights file not found: {path}")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, zipfile.BadZipFile, ValueError, OSError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise WeightsError(
            f"cannot read weights file {path} (corrupt, or not a weights-only checkpoint): {first}"
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
    out: dict[str, torch.Tensor] = {}
    for key, value in obj.items():
        if not isinstance(value, torch.Tensor):
            raise WeightsError(
                f"weights file {path}: entry {key!r} is a {type(value).__name__}, not a tensor"
            )
        out[key[7:] if key.startswith("module.") else key] = value
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
    model.load_state_dict(state, strict=True)
    return model
