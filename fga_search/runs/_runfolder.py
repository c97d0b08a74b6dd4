"""The run folder: run.json, study.db, trials.parquet, pareto.parquet, models/ and reports.

``run.json`` records the exact command, versions, the baseline and the run's *identity* (model,
weights, data, budget, space, ...). Rerunning with the same ``--out`` resumes the run only if
the identity matches. It also records the study's name (``_study.new_study_name``), which does not
depend on the folder's path: a run folder moved, copied or reached through a symlink resumes its
own study (with ``--storage``, copies share one study).
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Any

from fga_search._util._atomic import atomic_write_json

__all__ = ["RunFolder", "file_digest"]

IDENTITY_KEYS = (
    "model",
    "dataset",
    "data_dir",
    "budget",
    "budget_metric",
    "objective",
    "space",
    "strategy",
    "epochs",
    "rungs",  # absent (None) from a single-fidelity run's identity, as from runs made before it
    "eta",
    "seed",
    "val_fraction",
    "train_limit",
    "val_limit",
    "image_size",
    "backend",
    "weights_sha256",
    "space_sha256",
)
# keys added after runs were recorded without them: compared only where the run has one
ADDED_KEYS = ("space_sha256",)


def file_digest(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


class RunFolder:
    def __init__(self, path: str) -> None:
        self.path = os.path.abspath(path)

    def file(self, name: str) -> str:
        return os.path.join(self.path, name)

    @property
    def run_json(self) -> str:
        return self.file("run.json")

    @property
    def study_db(self) -> str:
        return self.file("study.db")

    @property
    def trials_parquet(self) -> str:
        return self.file("trials.parquet")

    @property
    def pareto_parquet(self) -> str:
        return self.file("pareto.parquet")

    @property
    def models_dir(self) -> str:
        return self.file("models")

    def checkpoint(self, trial: int) -> str:
        return os.path.join(self.models_dir, f"trial_{trial:05d}.pt")

    def exists(self) -> bool:
        return os.path.isfile(self.run_json)

    def read(self) -> dict[str, Any]:
        try:
            with open(self.run_json) as f:
                data = json.load(f)
        except (OSError, json.JSONDecodeError) as exc:
            raise ValueError(f"run folder {self.path}: cannot read run.json ({exc})") from None
        if not isinstance(data, dict) or "identity" not in data:
            raise ValueError(f"run folder {self.path}: run.json is not an fga-search run record")
        return data

    def check_new_or_matching(self, identity: dict[str, Any]) -> bool:
        """True if the folder holds this run already (resume); raise if it holds another run or
        other files; False if it is new or empty."""
        if self.exists():
            old = self.read()["identity"]
            for key in IDENTITY_KEYS:
                if key in ADDED_KEYS and key not in old:
                    continue
                if old.get(key) != identity.get(key):
                    if key == "space_sha256":
                        raise ValueError(
                            f"run folder {self.path} was searched with another content of space "
                            f"{identity.get('space')} (it was edited since); restore it or use another --out"
                        )
                    raise ValueError(
                        f"run folder {self.path} was created with {key}={old.get(key)!r}, not {identity.get(key)!r}; "
                        "use another --out"
                    )
            return True
        if os.path.isdir(self.path) and set(os.listdir(self.path)) - {".lock"}:
            raise ValueError(f"--out {self.path} exists and is not an fga-search run folder")
        if os.path.exists(self.path) and not os.path.isdir(self.path):
            raise ValueError(f"--out {self.path} exists and is not a folder")
        return False

    def check_writable(self) -> None:
        parent = self.path
        while not os.path.exists(parent):
            parent = os.path.dirname(parent)
        if not os.access(parent, os.W_OK):
            raise ValueError(f"--out {self.path}: cannot write in {parent}")

    def write_json(self, name: str, data: dict[str, Any]) -> None:
        atomic_write_json(self.file(name), data)

    def read_json(self, name: str, default: Any = None) -> Any:
        try:
            with open(self.file(name)) as f:
                return json.load(f)
        except (OSError, json.JSONDecodeError):
            return default

    def create(self, record: dict[str, Any]) -> None:
        os.makedirs(self.models_dir, exist_ok=True)
        self.write_json("run.json", record)
