"""Helpers shared by the command-line tests."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from fga_search._records import read_table


def cli_env(home: Path) -> dict[str, str]:
    env = dict(os.environ)
    env["HOME"] = str(home)
    env.pop("XDG_CACHE_HOME", None)
    env["PYTHONUNBUFFERED"] = "1"
    return env


def run_cli(
    args: list[str], *, home: Path, cwd: Path | None = None, timeout: float = 600
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "fga_search._cli", *args],
        cwd=cwd or home,
        env=cli_env(home),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def rows(path: Path) -> list[dict]:
    return read_table(str(path)).to_pylist()


def digits_trial(trial: int, plan: dict | None, **fields: object) -> dict:
    """A trials.parquet row for the quickstart's digits CNN, priced by the analytic FLOPs count."""
    from fga_search import build_model
    from fga_search._flops import ModelProfile

    row: dict = {"trial": trial, "state": "COMPLETE", "status": "ok", "seed": trial, "epochs": 1.0}
    if plan is not None:
        profile = ModelProfile(build_model("digits_cnn", num_classes=10), input_shape=(1, 8, 8))
        cost = profile.count(plan)
        row.update(
            plan=json.dumps(plan),
            macs=cost.macs,
            params=cost.params,
            flops_ratio=cost.macs / profile.base_macs,
            params_ratio=cost.params / profile.base_params,
            within_budget=cost.macs / profile.base_macs <= 0.2,
            budget=0.2,
            budget_metric="flops",
        )
    row.update(fields)
    return row


def fake_run(path: Path, trials: list[dict]) -> Path:
    """A run folder written by hand, without training: run.json of a quickstart run and the given
    trials.parquet rows (see ``digits_trial``). Enough for the report and the export's input checks."""
    from fga_search._records import rows_to_table, write_parquet

    path.mkdir(parents=True)
    (path / "models").mkdir()
    config = {"out": str(path), "budget": 0.2, "budget_metric": "flops", "trials": len(trials), "epochs": 1.0}
    record = {
        "command": ["fga-search", "--budget", "0.2"],
        "config": config,
        "identity": {
            "model": "digits_cnn",
            "dataset": "digits",
            "budget": 0.2,
            "weights_sha256": "quickstart",
        },
        "versions": {"fga_search": "0.1.0"},
        "baseline": {"val_acc": 0.99, "test_acc": 0.98, "macs": 1779328, "params": 70330, "flops_ratio": 1.0},
        "model": {"source": "zoo", "name": "digits_cnn", "space": "default"},
        "normalization": {"mean": [0.3058], "std": [0.3763]},
        "input_shape": [1, 8, 8],
        "num_classes": 10,
        "classes": [str(i) for i in range(10)],
        "data": {
            "name": "digits",
            "classes": 10,
            "input_shape": [1, 8, 8],
            "train": 1295,
            "val": 143,
            "test": 359,
        },
        "device": "cpu",
        "created": "2026-01-01T00:00:00+0000",
    }
    (path / "run.json").write_text(json.dumps(record, indent=2))
    write_parquet(rows_to_table(trials), str(path / "trials.parquet"))
    return path


def wide_cnn(num_classes: int = 10):  # type: ignore[no-untyped-def]
    """A small model for 1x8x8 digits whose wide 3x3 convs an FGA pair can run faster on a CPU."""
    from torch import nn

    def block(c_in: int, c_out: int) -> list[nn.Module]:
        return [nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU()]

    return nn.Sequential(
        *block(1, 128),
        *block(128, 128),
        *block(128, 128),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(128, num_classes),
    )
