from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import optuna
import pytest

from fga_search import search
from fga_search.engine._latency_aim import AIM_MIN_TRIALS, AIM_WINDOW, estimate_bias, latency_aim
from helpers import rows


def measured(trial: int, estimate: float, ratio: float, **extra: Any) -> dict[str, Any]:
    return {
        "trial": trial,
        "status": "infeasible" if ratio > 0.7 else "ok",
        "latency_estimate_ratio": estimate,
        "latency_ratio": ratio,
        "duplicate_of": None,
        **extra,
    }


def test_the_aim_stays_at_the_budget_until_enough_trials_are_measured() -> None:
    assert AIM_MIN_TRIALS == 3 and AIM_WINDOW == 10
    two = [measured(0, 0.6, 0.9), measured(1, 0.6, 0.8)]
    assert estimate_bias(two) is None and latency_aim(0.7, two) == 0.7
    three = [*two, measured(2, 0.65, 0.75)]
    bias = estimate_bias(three)
    assert bias is not None and bias[0] == pytest.approx(0.2) and bias[1] == 3  # median of 0.3, 0.2, 0.1
    assert latency_aim(0.7, three) == pytest.approx(0.5)


def test_only_trials_whose_own_model_was_measured_count() -> None:
    rows_ = [
        measured(0, 0.6, 0.9),
        measured(1, 0.6, 0.9),
        measured(2, 0.6, 0.9, duplicate_of=0),  # a duplicate reuses trial 0's measurement
        # never built (over the budget by its estimate), a failed trial, no estimate
        {"trial": 3, "status": "infeasible", "latency_estimate_ratio": 0.8, "latency_ratio": None},
        {"trial": 4, "status": "failed", "latency_estimate_ratio": 0.6, "latency_ratio": 0.9},
        {"trial": 5, "status": "ok", "latency_estimate_ratio": None, "latency_ratio": 0.9},
    ]
    assert estimate_bias(rows_) is None and latency_aim(0.7, rows_) == 0.7
    bias = estimate_bias([*rows_, measured(6, 0.5, 0.6)])
    assert bias is not None and bias[0] == pytest.approx(0.3) and bias[1] == 3


def test_the_aim_follows_the_most_recent_trials_and_only_tightens() -> None:
    early = [measured(i, 0.6, 1.0) for i in range(10)]  # 0.4 over the estimate
    late = [measured(10 + i, 0.6, 0.65) for i in range(10)]  # the machine changed: 0.05 over
    assert latency_aim(0.7, early) == pytest.approx(0.3)
    assert latency_aim(0.7, list(reversed(early + late))) == pytest.approx(0.65)  # by trial number
    assert latency_aim(0.7, early + late, window=20) == pytest.approx(0.475)  # median of 0.4 and 0.05
    faster = [measured(i, 0.6, 0.4) for i in range(5)]  # the estimate was pessimistic
    assert latency_aim(0.7, faster) == 0.7
    assert latency_aim(0.3, early) == 0.0  # never below zero
    with pytest.raises(ValueError, match="window and min_trials must be >= 1, got 0 and 3"):
        latency_aim(0.7, early, window=0)


@pytest.mark.slow
def test_a_latency_search_aims_its_repair_by_the_measured_bias(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A table that promises far more speed than the built models measure (its calibration
    scaled up fivefold): after three measured trials the repair aims below the budget by their
    median bias, every later proposal records that aim and is repaired to it, and a trial
    measured over the budget is infeasible to the sampler too (its constraint is the excess)."""
    from fga_search.latency import LatencyModel

    def optimistic(self: LatencyModel, plan: object, measured_ms: float) -> float:
        self.scale = 5.0
        return self.scale

    monkeypatch.setattr(LatencyModel, "calibrate", optimistic)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    run = tmp_path / "run"
    budget = 0.9
    search(
        out=str(run),
        model="helpers:wide_cnn",
        dataset="digits",
        budget=budget,
        budget_metric="latency",
        objective="accuracy,latency",
        target="cpu:2",
        target_batch=8,
        trials=10,
        epochs=0,
        quiet=True,
    )
    trials = sorted(rows(run / "trials.parquet"), key=lambda r: r["trial"])
    assert len(trials) == 10
    built = [r for r in trials if r["latency_ratio"] is not None and r["duplicate_of"] is None]
    assert len(built) >= AIM_MIN_TRIALS
    for i, r in enumerate(trials):  # each proposal's aim is what the trials before it measured
        assert r["latency_aim"] == pytest.approx(latency_aim(budget, trials[:i]))
    bias = estimate_bias(built[:AIM_MIN_TRIALS])
    assert bias is not None and bias[0] > 0  # a fivefold scale is optimistic on any machine
    later = trials[built[AIM_MIN_TRIALS - 1]["trial"] + 1 :]
    assert later and all(r["latency_aim"] < budget for r in later)
    for r in later:  # repaired to the aim (the optimistic table reaches any aim)
        assert r["latency_estimate_ratio"] <= r["latency_aim"] + 1e-9

    name = json.loads((run / "run.json").read_text())["study_name"]  # recorded at creation
    study = optuna.load_study(study_name=name, storage=f"sqlite:///{run}/study.db")
    for t in study.get_trials(deepcopy=False):
        r = next(row for row in trials if row["trial"] == t.number)
        if r["within_budget"]:
            expected = 0.0
        elif r["latency_ratio"] is None:  # over the budget by its estimate: never built
            expected = 1.0
        else:  # built, and measured over the budget
            expected = r["latency_ratio"] - budget
            assert expected > 0
        assert t.user_attrs["constraint"] == pytest.approx(expected)
