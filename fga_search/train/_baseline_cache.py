"""The original model's accuracy, cached on disk by content.

Every run scores the original model on its validation and test images, a few seconds per split
on a CPU. A rerun on the same model and data (another budget, strategy or seed) finds the figure
here instead. The key is a digest of what decides the number: the model's structure and every
tensor of its state, the split's images and labels, the normalization, the device type, the
autocast dtype and the PyTorch version. Anything that differs gives another key, so a stale
entry is never read.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from typing import Any

import torch
from torch import nn

from fga_search.data._data import Split, cache_dir

__all__ = ["BaselineCache", "accuracy_key"]


def _update_tensor(h: Any, tensor: torch.Tensor) -> None:
    t = tensor.detach().cpu().contiguous().reshape(-1)
    h.update(f"{tensor.dtype}{tuple(tensor.shape)}".encode())
    h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")


def accuracy_key(
    model: nn.Module,
    split: Split,
    *,
    normalization: dict[str, Any],
    device: torch.device,
    amp_dtype: torch.dtype | None,
) -> str:
    """A digest of everything that decides ``model``'s accuracy on ``split``."""
    h = hashlib.sha256()
    h.update(repr(model).encode())
    for name, tensor in model.state_dict().items():
        h.update(name.encode())
        _update_tensor(h, tensor)
    _update_tensor(h, split.images)
    _update_tensor(h, split.labels)
    h.update(json.dumps(normalization, sort_keys=True).encode())
    h.update(f"{device.type}|{amp_dtype}|{torch.__version__}".encode())
    return h.hexdigest()


class BaselineCache:
    """A JSON file of accuracies by key, in the user's cache folder (``path`` overrides)."""

    def __init__(self, path: str | None = None) -> None:
        self.path = path or os.path.join(cache_dir(), "baseline-accuracy.json")

    def _read(self) -> dict[str, float]:
        try:
            with open(self.path) as f:
                data = json.load(f)
        except (OSError, ValueError):
            return {}
        return {k: float(v) for k, v in data.items()} if isinstance(data, dict) else {}

    def get(self, key: str) -> float | None:
        return self._read().get(key)

    def put(self, key: str, accuracy: float) -> None:
        """Add one entry; the file is replaced atomically, so a reader never sees half of it."""
        data = self._read()
        data[key] = float(accuracy)
        folder = os.path.dirname(self.path)
        os.makedirs(folder, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=folder, suffix=".tmp")
        try:
            with os.fdopen(fd, "w") as f:
                json.dump(data, f)
            os.replace(tmp, self.path)
        except BaseException:
            if os.path.exists(tmp):
                os.unlink(tmp)
            raise
