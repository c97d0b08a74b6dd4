"""The quickstart's model: a small CNN trained on scikit-learn's digits on first use, then cached."""

from __future__ import annotations

import os

import torch

from fga_search._util._atomic import atomic_write
from fga_search.data._data import DataBundle, cache_dir
from fga_search.models._checkpoint import load_state_dict_file
from fga_search.models._loader import DeviceSplit
from fga_search.models._zoo import DIGITS, build_model
from fga_search.train._finetune import FinetuneConfig, finetune

__all__ = ["QUICKSTART_MODEL", "quickstart_weights"]

QUICKSTART_MODEL = "digits_cnn"
_RECIPE = FinetuneConfig(
    epochs=40, batch_size=64, lr=0.05, weight_decay=5e-4, kd_alpha=0.0, flip=False, crop=True
)
_VERSION = 1


def quickstart_weights(data: DataBundle, *, log: bool = True) -> str:
    """Path of the trained digits CNN's state_dict, training it (about 10 s on 2 cores) if not cached."""
    path = os.path.join(cache_dir(), "models", f"{QUICKSTART_MODEL}-v{_VERSION}.pt")
    if os.path.isfile(path):
        try:
            load_state_dict_file(path)
            return path
        except ValueError:
            pass  # a broken cache entry is retrained
    if log:
        print(
            f"training the quickstart model ({QUICKSTART_MODEL} on digits) once; cached at {path}", flush=True
        )
    torch.manual_seed(0)
    model = build_model(QUICKSTART_MODEL, num_classes=data.num_classes)
    train = DeviceSplit(data.train, device="cpu", normalization=DIGITS)
    finetune(model, train, config=_RECIPE, crop_pad=data.crop_pad, seed=0)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    state = model.state_dict()
    atomic_write(path, lambda tmp: torch.save(state, tmp))
    return path
