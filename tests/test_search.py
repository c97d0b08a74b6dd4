from __future__ import annotations

import json
import re
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest

from fga_search import search
from helpers import cli_env, rows

ARGS = ["--budget", "0.25", "--trials", "6", "--epochs", "12", "--seed", "3"]


def finished_rows(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    return [
        r
        for r in rows(path)
        if r["state"] == "COMPLETE" or (r["state"] == "FAIL" and r["status"] != "interrupted")
    ]


@pytest.mark.slow
def test_resume_after_sigkill_loses_and_repeats_nothing(tmp_path: Path) -> None:
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "fga_search._cli", *ARGS, "--out", str(run)]
    proc = subprocess.Popen(
        cmd,
        cwd=tmp_path,
        env=cli_env(tmp_path, session_cache=True),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 300
    try:
        while len(finished_rows(run / "trials.parquet")) < 3:
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline
            time.sleep(0.05)
        time.sleep(0.3)  # into the next trial's fine-tuning
    finally:  # a failed wait leaves no search running on
        proc.send_signal(signal.SIGKILL)
    proc.wait()
    before = {r["trial"]: r for r in finished_rows(run / "trials.parquet")}
    with sqlite3.connect(run / "study.db") as db:
        running = [n for (n,) in db.execute("select number from trials where state = 'RUNNING'")]
    assert len(before) >= 3 and len(running) == 1

    result = subprocess.run(
        cmd,
        cwd=tmp_path,
        env=cli_env(tmp_path, session_cache=True),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr
    assert f"trial(s) {running} were interrupted and are re-queued" in result.stderr
    after = rows(run / "trials.parquet")
    numbers = [r["trial"] for r in after]
    assert len(numbers) == len(set(numbers))
    done = [
        r
        for r in after
        if r["state"] == "COMPLETE" or (r["state"] == "FAIL" and r["status"] != "interrupted")
    ]
    assert len(done) == 6
    for number, old in before.items():  # no finished trial lost or changed
        new = next(r for r in after if r["trial"] == number)
        assert (new["state"], new["val_acc"], new["plan"]) == (old["state"], old["val_acc"], old["plan"])
    interrupted = next(r for r in after if r["trial"] == running[0])
    assert interrupted["state"] == "FAIL" and interrupted["status"] == "interrupted"
    requeued = [r for r in after if r["requeued_from"] == running[0]]
    assert len(requeued) == 1 and requeued[0]["state"] == "COMPLETE"
    name = json.loads((run / "run.json").read_text())["study_name"]  # recorded at creation
    study = optuna.load_study(study_name=name, storage=f"sqlite:///{run / 'study.db'}")
    by_number = {t.number: t for t in study.trials}
    assert by_number[requeued[0]["trial"]].params == by_number[running[0]].params
    assert requeued[0]["seed"] == interrupted["seed"]  # the re-run repeats the interrupted trial exactly
    assert not any(r["state"] == "RUNNING" for r in after)


def test_python_api_search_and_failed_trials(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A trial that raises is recorded as failed with its reason, and the search goes on."""
    from fga_search.train import _trial

    calls = {"n": 0}
    real = _trial.TrialRunner.run

    def flaky(self, plan, *, seed, on_phase=None):  # type: ignore[no-untyped-def]
        calls["n"] += 1
        if calls["n"] == 2:
            raise FloatingPointError("non-finite loss at step 3 of 10")
        return real(self, plan, seed=seed, on_phase=on_phase)

    monkeypatch.setattr(_trial.TrialRunner, "run", flaky)
    result = search(out=str(tmp_path / "run"), budget=0.3, trials=6, epochs=0.5, quiet=True, sampler="random")
    trials = rows(tmp_path / "run" / "trials.parquet")
    failed = [r for r in trials if r["state"] == "FAIL"]
    assert (
        len(failed) == 1 and failed[0]["fail_reason"] == "FloatingPointError: non-finite loss at step 3 of 10"
    )
    assert result.finished == 6 and len(trials) == 6
    assert result.front and all(r["flops_ratio"] <= 0.3 for r in result.front)
    with pytest.raises(ValueError, match=r"unknown search option\(s\) \['budgett'\]"):
        search(out=str(tmp_path / "x"), budgett=0.3)


def test_front_latency_can_be_skipped(tmp_path: Path) -> None:
    """--front-latency-runs 0: no CPU timing of the front after the search, and the report says so."""
    result = search(
        out=str(tmp_path / "run"), budget=0.3, trials=4, epochs=0.0, quiet=True, front_latency_runs=0
    )
    assert result.finished == 4 and result.front
    assert not (tmp_path / "run" / "front_latency.json").exists()
    front = rows(tmp_path / "run" / "pareto.parquet")
    assert len(front) == len(result.front)
    assert all(r["cpu_latency_ms"] is None and r["cpu_latency_ratio"] is None for r in front)
    assert all(r["test_acc"] is not None for r in front)  # the rest of the front's finishing still runs
    report = (tmp_path / "run" / "report.md").read_text()
    assert "not measured (--front-latency-runs 0)" in report and "CPU latency %" not in report
    for runs in (5, -1, 1.5, True):
        with pytest.raises(ValueError, match=r"--front-latency-runs must be 0 \(skip\) or an integer >= 10"):
            search(out=str(tmp_path / "x"), front_latency_runs=runs)
    assert not (tmp_path / "x").exists()


def test_trials_evaluate_in_batches_sized_for_the_device(tmp_path: Path) -> None:
    """64 on a CPU (0.55-0.63x the time of 512 for FGA models there, 0.70-0.91x that of 256:
    scripts/bench_eval.py); 512 on a GPU."""
    from fga_search.engine._config import RunConfig
    from fga_search.engine._setup import prepare

    setup = prepare(RunConfig(out=str(tmp_path / "run"), device="cpu", quiet=True), log=False)
    assert setup.device.type == "cpu"
    assert setup.settings.eval_batch == 64
    assert not (tmp_path / "run").exists()  # preparing writes no run folder


def test_mutations_of_a_slack_allocation_move_its_slack_or_its_thresholds(tmp_path: Path) -> None:
    import random

    from fga_search.engine._config import RunConfig
    from fga_search.engine._policy import SLACK_RANGE, SLACK_STEP, propose_mutation
    from fga_search.engine._setup import prepare
    from fga_search.engine._strategies import error_alloc_plan

    setup = prepare(RunConfig(out=str(tmp_path / "run"), device="cpu", quiet=True, budget=0.3), log=False)
    parent_plan = error_alloc_plan(setup.space, setup.cost, setup.spectra, budget=0.3, slack=0.1)
    assert parent_plan is not None
    parent = {"trial": 4, "state": "COMPLETE", "status": "ok", "within_budget": True, "val_acc": 0.9,
              "flops_ratio": setup.cost.ratio(parent_plan), "plan": json.dumps(parent_plan),
              "alloc_weights": {}, "alloc_slack": 0.1}  # fmt: skip
    names = {layer.name for layer in setup.space.layers}
    moves = [propose_mutation(setup, [parent], random.Random(i)) for i in range(40)]
    slack_moves = weight_moves = at_budget = below = 0
    for move in moves:
        assert move is not None
        label, plan, weights, slack = move
        assert label.startswith("mutation of trial 4") and weights is not None and set(weights) == names
        if slack != 0.1:  # the slack moved, the thresholds stayed
            slack_moves += 1
            assert all(w == 1.0 for w in weights.values())
            assert (
                max(SLACK_RANGE[0], 0.1 * SLACK_STEP[0]) <= slack <= min(SLACK_RANGE[1], 0.1 * SLACK_STEP[1])
            )
        else:  # three thresholds moved, the slack stayed
            weight_moves += 1
            assert sorted(w for w in weights.values() if w != 1.0) in (
                [0.8] * 3,
                [0.8] * 2 + [1.25],
                [0.8] + [1.25] * 2,
                [1.25] * 3,
            )
        if label == "mutation of trial 4":  # re-allocated at the budget
            at_budget += 1
            assert plan == error_alloc_plan(
                setup.space, setup.cost, setup.spectra, budget=0.3, weights=weights, slack=slack
            )
        else:  # one move in five: below it, so that the front spans the costs
            below += 1
            assert re.fullmatch(r"mutation of trial 4 at \d+% of the budget", label)
            assert setup.cost.ratio(plan) <= 0.3 * 0.955
    assert slack_moves >= 10 and weight_moves >= 10  # half and half, drawn
    assert at_budget >= 20 and below >= 2  # about four in five and one in five
    # a parent with no slack (the plain allocation) only moves its thresholds
    plain = {**parent, "alloc_slack": 0.0}
    assert all(
        m is not None and m[3] == 0.0
        for m in (propose_mutation(setup, [plain], random.Random(i)) for i in range(10))
    )


def test_a_mutation_repaired_back_to_a_plan_the_study_holds_is_not_queued(tmp_path: Path) -> None:
    """Under a binding aim the repair can bring a mutation back to its parent's plan (bench_speed
    run 10: 20 of 40 trials). Such a move is dropped and the sampler proposes instead."""
    import random

    from optuna.trial import TrialState, create_trial

    from fga_search.engine._config import RunConfig
    from fga_search.engine._policy import MUTATION_RATE, maybe_enqueue_mutation, propose_mutation
    from fga_search.engine._setup import prepare
    from fga_search.engine._strategies import error_alloc_plan

    setup = prepare(RunConfig(out=str(tmp_path / "run"), device="cpu", quiet=True, budget=0.3), log=False)
    parent_plan = error_alloc_plan(setup.space, setup.cost, setup.spectra, budget=0.3)
    assert parent_plan is not None
    parent = {"trial": 0, "state": "COMPLETE", "status": "ok", "within_budget": True, "val_acc": 0.9,
              "flops_ratio": setup.cost.ratio(parent_plan), "plan": json.dumps(parent_plan),
              "alloc_weights": {}, "alloc_slack": 0.0}  # fmt: skip
    seeds = [i for i in range(200) if random.Random(i).random() < MUTATION_RATE][:8]
    assert len(seeds) == 8
    for seed in seeds:
        rng = random.Random(seed)
        rng.random()
        move = propose_mutation(setup, [parent], rng)
        assert move is not None
        key = setup.propose(move[1]).key

        def study_holding(plan: str) -> optuna.Study:
            study = optuna.create_study()
            done = create_trial(state=TrialState.COMPLETE, value=0.9, user_attrs={"record": {"plan": plan}})
            study.add_trial(done)
            return study

        other = study_holding(json.dumps({"nothing": "alike"}))
        maybe_enqueue_mutation(setup, other, [parent], random.Random(seed))
        waiting = other.get_trials(states=(TrialState.WAITING,))
        assert len(waiting) == 1 and waiting[0].user_attrs["source"] == move[0]
        same = study_holding(key)
        maybe_enqueue_mutation(setup, same, [parent], random.Random(seed))
        assert same.get_trials(states=(TrialState.WAITING,)) == []
