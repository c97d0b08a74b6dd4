"""fga_search.compress gives the model a trial builds before fine-tuning (issue 28, item 4)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import fga_search
from fga_search import compress, load_plan
from fga_search.engine._config import RunConfig
from fga_search.engine._setup import prepare
from fga_search.models._loader import DeviceSplit, Normalization
from fga_search.runs._records import read_table
from fga_search.train._evaluate import evaluate


def test_compress_reproduces_a_recorded_trials_proxy_accuracy(run_dir: Path) -> None:
    """From the run folder's records alone: the run's config, its normalization and a trial's plan."""
    run = json.loads((run_dir / "run.json").read_text())
    config = RunConfig(**{**run["config"], "out": str(run_dir), "quiet": True})
    setup = prepare(config, log=False, latency_floor_check=False, time_latency=False)
    rows = [
        r
        for r in read_table(str(run_dir / "trials.parquet")).to_pylist()
        if r["status"] == "ok" and r["layers_decomposed"] and r["proxy_acc"] is not None
    ]
    assert len(rows) >= 3  # the run has decomposed trials to reproduce
    normalization = Normalization.from_dict(run["normalization"])
    before = {k: v.clone() for k, v in setup.model.state_dict().items()}
    for row in rows[:3]:
        model = compress(
            setup.model, load_plan(row["plan"]), setup.data, normalization=normalization, seed=config.seed
        )
        val = DeviceSplit(setup.data.val, device="cpu", normalization=normalization)
        acc = evaluate(model, val, batch_size=setup.settings.eval_batch)
        assert acc == pytest.approx(row["proxy_acc"], abs=1e-9), row["trial"]
        assert any(type(m).__name__ == "FGAConv2d" for m in model.modules())
    after = setup.model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # the trained model is untouched
    assert fga_search.compress is compress and "compress" in fga_search.__all__


def test_compress_checks_its_counts(run_dir: Path) -> None:
    data = fga_search.load_dataset("digits")
    model = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.Flatten())
    with pytest.raises(ValueError, match="calibration must be >= 1, got 0"):
        compress(model, {}, data, normalization=Normalization(mean=(0.5,), std=(0.25,)), calibration=0)
