"""Helpers shared by the command-line tests."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from fga_search.runs._records import read_table


def cli_env(home: Path, *, session_cache: bool = False) -> dict[str, str]:
    """A subprocess's environment with its own HOME. Its cache is the HOME's (a first use: the
    quickstart model is trained there), or with ``session_cache`` the test session's own cache
    (conftest's; the quickstart model trained once for the session), for tests about other things."""
    env = dict(os.environ)
    env["HOME"] = str(home)
    if not session_cache:
        env.pop("XDG_CACHE_HOME", None)
    env["PYTHONUNBUFFERED"] = "1"
    return env


def run_cli(
    args: list[str], *, home: Path, cwd: Path | None = None, timeout: float = 600, session_cache: bool = False
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "fga_search._cli", *args],
        cwd=cwd or home,
        env=cli_env(home, session_cache=session_cache),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def rows(path: Path) -> list[dict]:
    return read_table(str(path)).to_pylist()


def digits_trial(trial: int, plan: dict | None, **fields: object) -> dict:
    """A trials.parquet row for the quickstart's digits CNN, priced by the analytic FLOPs count."""
    from fga_search import build_model
    from fga_search.core._flops import ModelProfile

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
    from fga_search.runs._records import rows_to_table, write_parquet

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


def wide_cnn_latency(pair_ms, *, dense_ms: float = 0.1):  # type: ignore[no-untyped-def]
    """``wide_cnn`` on 1x8x8 inputs, its default space and a latency model on one CPU thread
    whose table is written by hand: every dense layer ``dense_ms``, each FGA candidate
    ``pair_ms(info, g, r)``; only the whole original is measured. Set XDG_CACHE_HOME first."""
    from fga_search import KEEP, ModelProfile
    from fga_search.engine._space import load_space
    from fga_search.latency import LatencyModel, LatencyTable, Target

    model = wide_cnn()
    profile = ModelProfile(model, input_shape=(1, 8, 8))
    space = load_space("default").resolve(profile.layers)
    table = LatencyTable(Target.parse("cpu:1"))
    for info in profile.layers:
        hw = profile.in_hw[info.name]
        table.entries[table.entry_key(info, hw, KEEP)] = dense_ms
        for g in info.valid_groups:
            for r in range(1, info.exact_rank(g) + 1):
                table.entries[table.entry_key(info, hw, (g, r))] = pair_ms(info, g, r)
    lat = LatencyModel(model, profile, table, repeats=5)
    assert table.measured == 0  # every layer time came from the table
    return model, profile, space, lat


def linear_heavy_cnn(num_classes: int = 10):  # type: ignore[no-untyped-def]
    """A digits model whose FLOPs are almost all in linear layers: no FLOPs budget far under 1 fits."""
    from torch import nn

    return nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(512, 256),
        nn.ReLU(),
        nn.Linear(256, num_classes),
    )


def aux_head_cnn(num_classes: int = 10):  # type: ignore[no-untyped-def]
    """A digits model that, like torchvision's GoogLeNet, returns a namedtuple with auxiliary
    logits in training mode (and the logits alone in eval mode)."""
    from collections import namedtuple

    from torch import nn

    outputs = namedtuple("Outputs", ["logits", "aux_logits"])

    class AuxHead(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.features = nn.Sequential(
                nn.Conv2d(1, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU(),
                nn.Conv2d(16, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU(),
            )  # fmt: skip
            self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, num_classes))
            self.aux = nn.Sequential(nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(64, num_classes))

        def forward(self, x):  # type: ignore[no-untyped-def]
            h = self.features(x)
            logits = self.head(h)
            return outputs(logits, self.aux(h)) if self.training else logits

    return AuxHead()


def odd_pool_cnn(num_classes: int = 10, *, pool: str = "avg"):  # type: ignore[no-untyped-def]
    """A digits model with adaptive pooling from 8x8 to 3x3 (an output size that does not divide
    the input's), which ONNX's TorchScript-based exporter refuses: for average pooling the export
    writes the equivalent fixed linear map instead; max pooling has none."""
    from torch import nn

    return nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(16, 16, 3, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(3) if pool == "avg" else nn.AdaptiveMaxPool2d(3),
        nn.Flatten(),
        nn.Linear(144, num_classes),
    )


def odd_max_pool_cnn(num_classes: int = 10):  # type: ignore[no-untyped-def]
    return odd_pool_cnn(num_classes, pool="max")


def small_aux_cnn(num_classes: int = 10):  # type: ignore[no-untyped-def]
    """Like ``aux_head_cnn``, but its auxiliary head, run in training mode only, needs images of
    at least 9x9 (as Inception v3's needs about 150x150): 8x8 digits fail only when training."""
    from torch import nn

    model = aux_head_cnn(num_classes)
    model.aux = nn.Sequential(nn.Conv2d(16, 4, 9), nn.Flatten(), nn.Linear(4, num_classes))
    return model
