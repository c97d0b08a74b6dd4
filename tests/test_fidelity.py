"""Multi-fidelity search (--rungs, issue 29): asynchronous promotion with two workers, the front
from the top rung only, resume after a SIGKILL mid-rung, and bad input."""

from __future__ import annotations

import json
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fga_search._cli import main
from fga_search.runs._pareto import best_row, front_rows
from helpers import cli_env, rows


def test_the_front_and_the_best_use_the_top_rung_only() -> None:
    def row(trial: int, rung: int, acc: float, flops: float) -> dict:
        return {
            "trial": trial,
            "state": "COMPLETE",
            "status": "ok",
            "val_acc": acc,
            "flops_ratio": flops,
            "within_budget": True,
            "rung": rung,
        }

    # rung 0 (the proxy) scores higher on its own scale than rung 1 does: never mixed
    results = [row(0, 0, 0.95, 0.2), row(1, 0, 0.90, 0.1), row(2, 1, 0.80, 0.2), row(3, 1, 0.85, 0.15)]
    front = front_rows(results, costs=["flops_ratio"])
    assert [r["trial"] for r in front] == [3]
    best = best_row(results, costs=["flops_ratio"])
    assert best is not None and best["trial"] == 3
    # a rung-2 result, however poor, is the front once a plan reached it
    results.append(row(4, 2, 0.70, 0.2))
    assert [r["trial"] for r in front_rows(results, costs=["flops_ratio"])] == [4]
    # an infeasible trial at a higher rung does not hide the feasible ones
    results.append({**row(5, 3, 0.99, 0.3), "within_budget": False})
    assert [r["trial"] for r in front_rows(results, costs=["flops_ratio"])] == [4]
    # single-fidelity rows (no rung) are all one fidelity
    single = [{**r, "rung": None} for r in results[:4]]
    assert [r["trial"] for r in front_rows(single, costs=["flops_ratio"])] == [1, 0]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--rungs", "0,0.3,0.1"], "--rungs must be strictly increasing, got '0,0.3,0.1'"),
        (["--rungs=-0.1,0.2"], "--rungs must be finite epochs >= 0, got '-0.1,0.2'"),
        (
            ["--rungs", "0,0.1", "--epochs", "1"],
            "--rungs gives each rung's fine-tuning epochs: drop --epochs 1",
        ),
        (["--rungs", "0,0.1", "--eta", "1"], "--eta must be an integer >= 2, got 1"),
        (["--eta", "2"], "--eta and --promote need --rungs"),
        (["--promote", "continue"], "--eta and --promote need --rungs"),
        (["--rungs", "0.5"], "--rungs must name at least two fidelities, got '0.5'"),
        (["--rungs", "0,x"], "--rungs must be comma-separated epochs, got '0,x'"),
    ],
)
def test_bad_rungs_are_one_line_and_write_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], args: list[str], message: str
) -> None:
    out = tmp_path / "run"
    code = main([*args, "--out", str(out)])
    err = capsys.readouterr().err
    assert code == 2
    assert err.count("\n") == 1 and err.startswith("fga-search: error: ") and message in err, err
    assert not out.exists()


def test_two_workers_promote_asynchronously(tmp_path: Path) -> None:
    """Two workers share one driver, as the Ray executor's do: neither waits for a rung to fill,
    a promotion is handed out as soon as a plan has earned it, and a continued promotion trains
    only the epochs its rung adds, from the weights of the rung below."""
    from fga_search.engine._config import RunConfig
    from fga_search.engine._driver import SearchDriver, run_trial
    from fga_search.engine._search import create_run
    from fga_search.engine._setup import make_runner, prepare
    from fga_search.report._report import write_report
    from fga_search.runs._runfolder import RunFolder

    config = RunConfig(
        out=str(tmp_path / "run"),
        rungs="0,0.2,0.5",
        eta=2,
        promote="continue",
        trials=4,
        seed=1,
        quiet=True,
        front_latency_runs=0,
    )
    folder = RunFolder(config.out)
    setup = prepare(config, log=False, latency_floor_check=True)
    runner = make_runner(setup)
    create_run(setup, folder, runner)
    driver = SearchDriver(setup, folder, runner, backend="optuna")

    def finish(pending) -> None:  # type: ignore[no-untyped-def]
        driver.complete(
            pending, run_trial(runner, pending.plan, seed=pending.seed, fidelity=pending.fidelity)
        )

    a, b = driver.next_trial(), driver.next_trial()  # worker 1 and worker 2 take a plan each
    assert a is not None and b is not None and a.record["rung"] == b.record["rung"] == 0
    finish(b)  # worker 2 ends first: one result at rung 0 earns no promotion (eta 2) ...
    c = driver.next_trial()  # ... and it takes a new plan instead of waiting
    assert c is not None and c.record["rung"] == 0
    finish(a)  # two results at rung 0: the better moves up, while c still runs
    d = driver.next_trial()
    assert d is not None and d.record["rung"] == 1 and d.record["promoted_from"] in (a.number, b.number)
    assert d.fidelity is not None and d.fidelity.init is None  # from the proxy rung: the decomposed model
    while (pending := driver.next_trial()) is not None:  # worker 1 goes on alone; c is still out
        finish(pending)
    finish(c)
    while (pending := driver.next_trial()) is not None:
        finish(pending)
    finish(d)
    while (pending := driver.next_trial()) is not None:
        finish(pending)
    driver.finish()

    trials = [r for r in rows(folder.trials_parquet) if r["state"] == "COMPLETE"]
    by_rung = {k: [r for r in trials if r["rung"] == k] for k in (0, 1, 2)}
    assert [len(by_rung[k]) for k in (0, 1, 2)] == [4, 2, 1]  # 4 plans; floor(4/2), floor(2/2) moved up
    assert all(r["epochs"] == e for k, e in enumerate((0.0, 0.2, 0.5)) for r in by_rung[k])
    assert all(r["finetune_steps"] == 0 for r in by_rung[0]) and all(
        r["finetune_steps"] > 0 for r in by_rung[1]
    )
    (top,) = by_rung[2]
    below = next(r for r in by_rung[1] if r["trial"] == top["promoted_from"])
    assert top["continued"] is True and below["continued"] is False
    # it went on for the 0.3 epochs rung 2 adds, not the 0.5 of a rerun: 3/2 of rung 1's steps
    assert abs(top["finetune_steps"] - 1.5 * below["finetune_steps"]) <= 1
    assert all(r["seconds_total"] > 0 for r in trials)
    pareto = rows(Path(folder.path) / "pareto.parquet")
    assert [r["trial"] for r in pareto] == [top["trial"]]  # the front: the top rung's only
    write_report(folder.path)
    report = (Path(folder.path) / "report.md").read_text()
    assert "## Rungs of fidelity" in report and "| 2 | 0.5 | 1 | 1 |" in report
    assert "use rung 2 only" in report

    # without its kept weights, the export rebuilds the continued trial as it was trained: its
    # source's 0.2 epochs from the decomposed model, then 0.3 more from there
    from fga_search.exporter._export import export

    (Path(folder.path) / "models" / f"trial_{top['trial']:05d}.pt").unlink()
    exported = export(folder.path, pick="best", out=str(tmp_path / "exported"), latency_runs=0, quiet=True)
    assert exported.spec["source"]["trial"] == top["trial"] and exported.spec["source"]["weights"] == "re-run"
    assert exported.val_acc == top["val_acc"]


def _running_at_rung(db: Path, rung: int) -> list[int]:
    """The trials running now at this rung (a promotion's)."""
    if not db.is_file():
        return []
    query = (
        "select t.number from trials t join trial_user_attributes a on a.trial_id = t.trial_id "
        "where t.state = 'RUNNING' and a.key = 'rung' and cast(a.value_json as integer) = ?"
    )
    try:
        with sqlite3.connect(db, timeout=1) as conn:
            return [n for (n,) in conn.execute(query, (rung,))]
    except sqlite3.OperationalError:  # locked or not yet created
        return []


@pytest.mark.slow
def test_a_sigkill_mid_rung_loses_and_repeats_no_rung_result(tmp_path: Path) -> None:
    run = tmp_path / "run"
    args = ["--budget", "0.25", "--trials", "4", "--rungs", "0,1,6", "--eta", "2", "--seed", "3"]
    args += ["--promote", "continue"]  # the path with rung weights to keep and find again
    cmd = [sys.executable, "-m", "fga_search._cli", *args, "--out", str(run), "--front-latency-runs", "0"]
    env = cli_env(tmp_path, session_cache=True)  # the session's quickstart model
    proc = subprocess.Popen(
        cmd, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    deadline = time.monotonic() + 300
    try:
        while not (killed := _running_at_rung(run / "study.db", 2)):  # 6 epochs: time to kill it
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline
            time.sleep(0.05)
        time.sleep(0.3)  # into its fine-tuning
    finally:  # a failed wait leaves no search running on
        proc.send_signal(signal.SIGKILL)
    proc.wait()
    before = {r["trial"]: r for r in rows(run / "trials.parquet") if r["state"] == "COMPLETE"}

    result = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    assert f"trial(s) {killed} were interrupted and are re-queued" in result.stderr
    after = rows(run / "trials.parquet")
    for number, old in before.items():  # no finished rung result lost or changed
        new = next(r for r in after if r["trial"] == number)
        assert (new["state"], new["val_acc"], new["rung"]) == (old["state"], old["val_acc"], old["rung"])
    done = [r for r in after if r["state"] == "COMPLETE"]
    moves = [(r["promoted_from"], r["rung"]) for r in done if r["rung"]]
    assert len(moves) == len(set(moves))  # no promotion ran twice
    assert sum(1 for r in done if r["rung"] == 0) == 4  # the plans asked for, each once
    for r in done:  # each promotion comes from a finished result of the rung below
        if r["rung"]:
            assert next(s for s in done if s["trial"] == r["promoted_from"])["rung"] == r["rung"] - 1
    interrupted = next(r for r in after if r["trial"] == killed[0])
    assert interrupted["status"] == "interrupted"
    (rerun,) = [r for r in after if r["requeued_from"] == killed[0]]
    assert rerun["state"] == "COMPLETE"
    assert (rerun["rung"], rerun["promoted_from"]) == (interrupted["rung"], interrupted["promoted_from"])
    assert max(r["rung"] for r in done) == 2
    run_json = json.loads((run / "run.json").read_text())
    assert run_json["identity"]["rungs"] == "0,1,6" and run_json["config"]["epochs"] == 6.0
