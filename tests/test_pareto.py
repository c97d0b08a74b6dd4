from __future__ import annotations

import json
from pathlib import Path

import pytest

from fga_search.runs._pareto import hypervolume, knee_index, pareto_mask


def test_pareto_mask() -> None:
    acc = [0.9, 0.8, 0.95, 0.7, 0.9, 0.95]
    cost = [0.5, 0.2, 0.9, 0.3, 0.5, 0.95]
    assert pareto_mask(acc, cost).tolist() == [True, True, True, False, False, False]


def test_pareto_mask_three_objectives() -> None:
    assert pareto_mask([0.9, 0.9], [0.5, 0.6], [1.0, 0.5]).tolist() == [True, True]


def test_hypervolume() -> None:
    assert hypervolume([0.5], [0.5]) == pytest.approx(0.25)
    assert hypervolume([0.5, 0.8], [0.2, 0.6]) == pytest.approx(0.5 * 0.4 + 0.8 * 0.4)
    assert hypervolume([0.5, 0.4], [0.2, 0.6]) == pytest.approx(0.5 * 0.8)  # a dominated point adds nothing
    assert hypervolume([], []) == 0.0
    assert hypervolume([0.9], [1.2]) == 0.0


def test_knee() -> None:
    acc = [0.2, 0.85, 0.9, 0.92]
    cost = [0.05, 0.1, 0.3, 0.6]
    assert knee_index(acc, cost) == 1
    assert knee_index([0.5, 0.6], [0.1, 0.2]) == 1
    with pytest.raises(ValueError):
        knee_index([], [])


# -- one front, best and knee, by the run's objective --------------------------------------------
# A latency-budget run: (val_acc, flops_ratio, latency_ratio). By latency the front's elbow is
# trial 2; by FLOPs it is trial 1. Trial 4 ties trial 3's accuracy with fewer FLOPs but more
# latency: the best by FLOPs, dominated by latency.
LATENCY_RUN = [
    (0, 0.50, 0.10, 0.30),
    (1, 0.80, 0.20, 0.31),
    (2, 0.85, 0.50, 0.32),
    (3, 0.86, 0.90, 0.80),
    (4, 0.86, 0.85, 0.85),
]


def _latency_rows() -> list[dict]:
    from helpers import digits_trial

    rows = [
        digits_trial(
            t,
            None,
            val_acc=acc,
            flops_ratio=flops,
            params_ratio=flops,
            latency_ratio=lat,
            latency_ms=lat,
            within_budget=True,
            budget=0.9,
            budget_metric="latency",
        )
        for t, acc, flops, lat in LATENCY_RUN
    ]
    rows.append(digits_trial(5, None, state="FAIL", status="failed", fail_reason="boom"))
    rows.append(
        digits_trial(6, None, status="infeasible", within_budget=False, val_acc=0.0, latency_ratio=0.95)
    )
    return rows


def test_front_best_and_knee_follow_the_objective() -> None:
    from fga_search.runs._pareto import best_row, front_rows, is_usable, knee_row

    rows = _latency_rows()
    assert [r["trial"] for r in rows if is_usable(r)] == [0, 1, 2, 3, 4]  # not failed, nor infeasible
    by_latency = front_rows(rows, costs=["latency_ratio"])
    by_flops = front_rows(rows, costs=["flops_ratio"])
    assert [r["trial"] for r in by_latency] == [0, 1, 2, 3]  # by FLOPs ratio
    assert [r["trial"] for r in by_flops] == [0, 1, 2, 4]
    assert knee_row(by_latency, costs=["latency_ratio"])["trial"] == 2
    assert knee_row(by_flops, costs=["flops_ratio"])["trial"] == 1
    assert best_row(rows, costs=["latency_ratio"])["trial"] == 3
    assert best_row(rows, costs=["flops_ratio"])["trial"] == 4
    # two costs: the front is three-dimensional, the knee trades accuracy for the last one
    both = front_rows(rows, costs=["flops_ratio", "latency_ratio"])
    assert [r["trial"] for r in both] == [0, 1, 2, 4, 3]
    assert knee_row(both, costs=["flops_ratio", "latency_ratio"])["trial"] == 2
    assert best_row(rows, costs=["flops_ratio", "latency_ratio"])["trial"] == 4
    assert (
        front_rows(rows[5:], costs=["flops_ratio"]) == []
        and best_row(rows[5:], costs=["flops_ratio"]) is None
    )
    assert knee_row([], costs=["flops_ratio"]) is None


def test_a_latency_runs_knee_is_the_same_in_every_reader(tmp_path: Path) -> None:
    """The knee (and best) that finalize writes to pareto.parquet is the one the run view computes
    from trials.parquet alone (the report while a search runs, or a front that is older than the
    trials), the export picks and the command line marks. The run view ranked by FLOPs only."""
    from types import SimpleNamespace

    import optuna

    from fga_search.engine._views import finalize
    from fga_search.exporter._export_select import _row as pick
    from fga_search.runs._runfolder import RunFolder
    from fga_search.runs._runview import read_run
    from helpers import fake_run, rows

    run = fake_run(tmp_path / "run", _latency_rows())
    record = json.loads((run / "run.json").read_text())
    record["config"].update(objective="accuracy,latency", budget_metric="latency", budget=0.9)
    (run / "run.json").write_text(json.dumps(record))
    config = SimpleNamespace(costs=["latency_ratio"], front_latency_runs=0)
    setup = SimpleNamespace(config=config, latency=object())  # measured on a target: no CPU timing
    study = optuna.create_study(directions=["maximize", "minimize"])
    result = finalize(setup, RunFolder(str(run)), SimpleNamespace(), _latency_rows(), study=study)  # type: ignore[arg-type]

    written = rows(run / "pareto.parquet")
    knees = [r["trial"] for r in written if r["is_knee"]]
    bests = [r["trial"] for r in written if r["is_best"]]
    assert knees == [2] and bests == [3]  # by latency, the objective
    assert [r["trial"] for r in result.front if r["is_knee"]] == knees and result.best["trial"] == 3
    flops_front = [r for r in written if r["trial"] in (0, 1, 2, 4)]  # what ranking by FLOPs finds
    assert (
        flops_front[knee_index([r["val_acc"] for r in flops_front], [r["flops_ratio"] for r in flops_front])][
            "trial"
        ]
        == 1
    )

    finished = read_run(str(run))
    assert finished.front_source == "pareto.parquet" and finished.knee["trial"] == 2
    (run / "pareto.parquet").unlink()  # the front as the view computes it from trials.parquet
    live = read_run(str(run))
    assert live.front_source == "trials.parquet"
    assert live.knee is not None and live.knee["trial"] == 2  # was 1: ranked by FLOPs
    assert live.best is not None and live.best["trial"] == 3
    assert [r["trial"] for r in live.front] == [r["trial"] for r in written]
    assert pick(live, "knee")[0]["trial"] == 2 and pick(live, "best")[0]["trial"] == 3
    assert pick(finished, "knee")[0]["trial"] == 2 and pick(finished, "best")[0]["trial"] == 3


def test_slower_than_original() -> None:
    """A pick is slower when its latency ratio is above 1: the one measured on the run's --target if
    it has one, else the one timed on this CPU after the search; unknown is not slower."""
    from fga_search.runs._pareto import Slowdown, slower_than_original
    from fga_search.runs._records import FrontRecord

    cpu = slower_than_original(FrontRecord(trial=0, cpu_latency_ratio=1.25))
    assert cpu == Slowdown(1.25, "cpu") and cpu.where == "on this CPU" and cpu.times == "1.25x"
    target = slower_than_original({"trial": 1, "latency_ratio": 1.5, "cpu_latency_ratio": 0.5})
    assert target == Slowdown(1.5, "target") and target.where == "on the target"
    # the target's measurement decides: faster there is not slower, whatever this CPU says
    assert slower_than_original(FrontRecord(trial=2, latency_ratio=0.8, cpu_latency_ratio=1.3)) is None
    assert slower_than_original(FrontRecord(trial=3, cpu_latency_ratio=0.7)) is None
    assert slower_than_original(FrontRecord(trial=4, cpu_latency_ratio=1.0)) is None  # as fast
    assert slower_than_original(FrontRecord(trial=5)) is None  # not timed
    assert slower_than_original({"trial": 6, "cpu_latency_ratio": 1.001}) == Slowdown(1.001, "cpu")
    assert Slowdown(1.001, "cpu").times == "1.001x"  # not "1.00x"
