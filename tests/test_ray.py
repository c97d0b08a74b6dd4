"""The Ray Tune backend against a real two-node Ray cluster on this machine (logical GPUs).

The nodes use the loopback addresses 127.0.0.3 (head) and 127.0.0.2: Ray rewrites 127.0.0.1 to
the machine's outward address, and two nodes on one machine need two addresses.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from fga_search.runs._records import TRIAL_SCHEMA
from helpers import cli_env, rows

pytestmark = pytest.mark.slow

RAY = str(Path(sys.executable).with_name("ray"))
HEAD_IP, WORKER_IP = "127.0.0.3", "127.0.0.2"


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HEAD_IP, 0))
        return int(s.getsockname()[1])


class Cluster:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.home = root / "home"
        self.home.mkdir()
        token = secrets.token_hex(32)  # the cluster's authentication token, known to this test only
        self.env = {
            **cli_env(self.home, session_cache=True),
            "RAY_AUTH_MODE": "token",
            "RAY_AUTH_TOKEN": token,
            "RAY_USAGE_STATS_ENABLED": "0",
        }
        self.port = free_port()
        self.address = f"{HEAD_IP}:{self.port}"
        self.nodes: list[subprocess.Popen[bytes]] = []

    def start_node(self, *args: str) -> None:
        log = open(self.root / f"node{len(self.nodes)}.log", "wb")
        proc = subprocess.Popen(
            [RAY, "start", "--block", "--num-cpus=1", "--num-gpus=1", "--disable-usage-stats", *args],
            env=self.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
        self.nodes.append(proc)

    def alive_nodes(self) -> int:
        out = subprocess.run(
            [RAY, "status", f"--address={self.address}"], env=self.env, capture_output=True, text=True
        )
        return out.stdout.count(" node_")

    def start(self) -> None:
        self.start_node(
            "--head", f"--port={self.port}", f"--node-ip-address={HEAD_IP}", "--include-dashboard=false"
        )
        self.wait_for(1)
        self.start_node(f"--address={self.address}", f"--node-ip-address={WORKER_IP}")
        self.wait_for(2)

    def wait_for(self, count: int) -> None:
        deadline = time.monotonic() + 90
        while self.alive_nodes() < count:
            for proc in self.nodes:
                assert proc.poll() is None, (self.root / "node0.log").read_text()
            assert time.monotonic() < deadline, "the Ray cluster did not come up"
            time.sleep(1)

    def processes(self) -> list[int]:
        """This cluster's processes: each node's `ray start --block` leads a session of its own."""
        sessions = {proc.pid for proc in self.nodes}
        out = subprocess.run(["ps", "-eo", "pid=,sid=,stat="], capture_output=True, text=True).stdout
        return [
            int(pid)
            for pid, sid, stat in (line.split() for line in out.splitlines())
            if int(sid) in sessions and not stat.startswith("Z")  # a zombie is dead, only not yet reaped
        ]

    def stop(self) -> None:
        """Stop only the processes this cluster started, by their ids."""
        # SIGKILL at once: a test cluster keeps nothing worth a graceful shutdown, and its raylets
        # ignored SIGTERM for the whole 10 s grace (15 s of every test run)
        for sig, grace in ((signal.SIGKILL, 10.0),):
            for pid in self.processes():
                try:
                    os.kill(pid, sig)
                except ProcessLookupError:
                    pass
            deadline = time.monotonic() + grace
            while self.processes() and time.monotonic() < deadline:
                time.sleep(0.2)
        for proc in self.nodes:
            proc.wait(timeout=10)
        assert not self.processes()

    def cli(self, args: list[str], **kwargs) -> subprocess.Popen[str]:  # type: ignore[no-untyped-def]
        return subprocess.Popen(
            [sys.executable, "-m", "fga_search._cli", "--ray-address", self.address, *args],
            cwd=self.root, env=self.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kwargs,
        )  # fmt: skip


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    c = Cluster(tmp_path_factory.mktemp("ray"))
    try:
        c.start()
        yield c
    finally:
        c.stop()


def wait(proc: subprocess.Popen[str], timeout: float = 400) -> tuple[str, str]:
    out, err = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, err[-3000:]
    return out, err


def done(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    return [r for r in rows(path) if r["state"] in ("COMPLETE", "FAIL")]


def test_trials_run_on_both_nodes_with_one_logical_gpu_each(cluster: Cluster) -> None:
    """Half a logical GPU a trial, on two nodes; the trials are rungs of fidelity (--rungs):
    promotions run on Ray as any trial does."""
    run = cluster.root / "two-nodes"
    args = ["--gpus-per-trial", "0.5", "--trials", "4", "--rungs", "0,2,10", "--eta", "2"]
    out, err = wait(cluster.cli([*args, "--out", str(run)]))
    table = pq.read_table(run / "trials.parquet")
    assert table.schema.equals(TRIAL_SCHEMA)  # the Optuna backend's schema
    trials = table.to_pylist()
    assert sorted(r["trial"] for r in trials) == list(range(len(trials)))
    assert all(r["state"] == "COMPLETE" and r["backend"] == "ray" for r in trials)
    assert [r["rung"] for r in trials].count(0) == 4  # 4 plans, and the promotions they earned
    assert max(r["rung"] for r in trials) == 2 and all(r["epochs"] == (0, 2, 10)[r["rung"]] for r in trials)
    for r in trials:
        if r["rung"]:
            assert next(s for s in trials if s["trial"] == r["promoted_from"])["rung"] == r["rung"] - 1
    assert {r["node_ip"] for r in trials} == {HEAD_IP, WORKER_IP}
    assert len({r["node_id"] for r in trials}) == 2
    for r in trials:
        gpu_ids = json.loads(r["gpu_ids"])
        assert len(gpu_ids) == 1 and gpu_ids[0] in ("0",)  # each node has one logical GPU, id 0
        assert r["device"] == "cpu"  # logical GPUs: the trials compute on the CPU
    front = rows(run / "pareto.parquet")
    assert front and all(r["flops_ratio"] <= 0.2 and r["rung"] == 2 for r in front)  # the top rung's
    assert all((run / "models" / f"trial_{r['trial']:05d}.pt").is_file() for r in front)
    assert "best model: trial" in out


def test_tune_keeps_as_many_trials_pending_as_fit_only_while_it_fits(monkeypatch: pytest.MonkeyPatch) -> None:
    from fga_search.engine._ray_backend import _pending_trials

    name = "TUNE_MAX_PENDING_TRIALS_PG"
    monkeypatch.delenv(name, raising=False)
    with _pending_trials(2):
        assert os.environ[name] == "2"
    assert name not in os.environ
    with _pending_trials(None):  # --max-concurrent set: its limiter decides
        assert name not in os.environ
    monkeypatch.setenv(name, "7")  # the user's own value is kept
    with _pending_trials(2):
        assert os.environ[name] == "7"
    assert os.environ[name] == "7"


@pytest.mark.parametrize(
    ("cpus", "gpus", "target", "asked", "warning"),
    [
        (None, 0.0, None, {"cpu": 1.0, "gpu": 0.0}, None),
        (None, 0.0, "cpu:2", {"cpu": 2.0, "gpu": 0.0}, None),  # the threads it times
        (None, 0.0, "cpu", {"cpu": 1.0, "gpu": 0.0}, None),  # PyTorch's threads: not known here
        (3.0, 1.0, "cpu:2", {"cpu": 3.0, "gpu": 1.0}, None),
        (
            1.0,
            0.0,
            "cpu:2",
            {"cpu": 1.0, "gpu": 0.0},
            "each trial times --target cpu:2 with 1 CPU(s) reserved",
        ),
        (None, 0.25, "cuda", {"cpu": 1.0, "gpu": 0.25}, "trials share a GPU (--gpus-per-trial 0.25)"),
        (None, 1.0, "cuda", {"cpu": 1.0, "gpu": 1.0}, None),
        (None, 0.25, None, {"cpu": 1.0, "gpu": 0.25}, None),  # no latency: sharing is what fractions are for
    ],
)
def test_trials_reserve_the_threads_their_latency_target_times(
    cpus: float | None, gpus: float, target: str | None, asked: dict[str, float], warning: str | None
) -> None:
    from fga_search.engine._ray_backend import latency_contention, trial_resources
    from fga_search.latency import Target

    parsed = None if target is None else Target.parse(target)
    resources = trial_resources(cpus, gpus, parsed)
    assert resources == asked
    said = latency_contention(resources, parsed)
    assert (said is None) == (warning is None) and (warning is None or warning in str(said)), said


def worker_pids() -> list[int]:
    out = subprocess.run(["ps", "-eo", "pid,args"], capture_output=True, text=True).stdout
    return [int(line.split()[0]) for line in out.splitlines() if "ray::ImplicitFunc" in line]


def test_a_killed_worker_is_retried_and_the_search_finishes(cluster: Cluster) -> None:
    run = cluster.root / "worker-killed"
    before = set(worker_pids())
    proc = cluster.cli(["--gpus-per-trial", "0.5", "--trials", "3", "--epochs", "30", "--out", str(run)])
    deadline = time.monotonic() + 120
    victims: list[int] = []
    while not victims:
        assert proc.poll() is None and time.monotonic() < deadline
        victims = [p for p in worker_pids() if p not in before]
        time.sleep(0.2)
    time.sleep(3)  # well into the trial
    os.kill(victims[0], signal.SIGKILL)
    wait(proc)
    trials = rows(run / "trials.parquet")
    assert sorted(r["trial"] for r in trials) == [0, 1, 2]
    assert all(r["state"] == "COMPLETE" for r in trials)  # FailureConfig(max_failures=1) retried it


def tune_state_whole(experiment: Path) -> bool:
    """Whether the newest experiment state Tune wrote in ``experiment`` parses as JSON."""
    states = sorted(experiment.glob("experiment_state-*.json"), key=lambda p: p.stat().st_mtime)
    try:
        json.loads(states[-1].read_text())
    except (IndexError, OSError, ValueError):
        return False
    return True


DRIVER_ARGS = ["--gpus-per-trial", "0.5", "--trials", "6", "--epochs", "12"]


@pytest.fixture(scope="module")
def killed_driver(cluster: Cluster) -> Path:
    """A run whose driver was SIGKILLed once four of its six trials were recorded and Tune's newest
    experiment state was whole (the ``unreadable`` case damages it, on purpose). Each case below
    resumes its own copy of the folder, taken once the killed driver's trials had stopped."""
    run = cluster.root / "driver-killed"
    proc = cluster.cli([*DRIVER_ARGS, "--out", str(run)])
    deadline = time.monotonic() + 300
    while len(done(run / "trials.parquet")) < 4 or not tune_state_whole(run / "ray"):
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline
        time.sleep(0.1)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    # the killed driver's job ends with it: its trials stop and write nothing more
    deadline = time.monotonic() + 60
    while worker_pids():
        assert time.monotonic() < deadline, "the killed driver's trials still run"
        time.sleep(0.2)
    return run


@pytest.mark.parametrize("tune_state", ["kept", "unreadable", "study-only"])
def test_a_killed_driver_resumes_without_losing_or_repeating_trials(
    cluster: Cluster, killed_driver: Path, tune_state: str
) -> None:
    """The study is the only source of truth: whatever the killed driver left of Tune's
    experiment and of trials.parquet, the resumed run goes on from the study. ``kept``: killed
    between the study's tell and the row's write (trials.parquet lacks the last finished trial).
    ``unreadable``: Tune's experiment state was half-written (seen once in CI, when Tune's own
    restore was used). ``study-only``: Tune's experiment folder and trials.parquet are gone."""
    run = cluster.root / f"driver-killed-{tune_state}"
    shutil.copytree(killed_driver, run, symlinks=True)
    args = [*DRIVER_ARGS, "--out", str(run)]
    before = {r["trial"]: r for r in done(run / "trials.parquet")}
    if tune_state == "unreadable":
        states = sorted((run / "ray").glob("experiment_state-*.json"))
        assert states
        for path in states:
            path.write_text("")
    if tune_state == "kept":  # as if killed between Optuna's tell and the row's write
        from fga_search.runs._records import rows_to_table, write_parquet

        last = max(before)
        kept = [r for r in rows(run / "trials.parquet") if r["trial"] != last]
        write_parquet(rows_to_table(kept), str(run / "trials.parquet"))
    if tune_state == "study-only":
        shutil.rmtree(run / "ray")
        (run / "trials.parquet").unlink()
    out, err = wait(cluster.cli(args))
    aside = list(run.glob("ray.resumed-*"))  # the killed driver's experiment, kept aside, never restored
    if tune_state != "study-only":
        assert "resuming the Ray experiment" in err and len(aside) == 1, err
    else:
        assert not aside
    assert re.search(r"resuming: trial\(s\) \[[\d, ]+\] were interrupted and are re-queued", err), err
    after = rows(run / "trials.parquet")
    numbers = [r["trial"] for r in after]
    assert sorted(numbers) == list(range(len(numbers)))  # every trial number exactly once
    complete = [r for r in after if r["state"] == "COMPLETE"]
    assert len(complete) == 6  # the trial count holds
    # a trial the killed driver had asked for but not started is recorded as interrupted, never lost silently
    assert all(r["status"] == "interrupted" for r in after if r["state"] != "COMPLETE")
    with sqlite3.connect(run / "study.db") as db:
        assert db.execute("select count(*) from trials where state = 'RUNNING'").fetchone() == (0,)
    for number, old in before.items():
        new = next(r for r in after if r["trial"] == number)
        assert (new["val_acc"], new["plan"], new["seed"]) == (old["val_acc"], old["plan"], old["seed"])
    # an interrupted trial's plan runs again, with its seed
    by_number = {r["trial"]: r for r in after}
    requeued = {r["requeued_from"]: r for r in after if r.get("requeued_from") is not None}
    assert set(requeued) == {r["trial"] for r in after if r["status"] == "interrupted" and r.get("plan")}
    for number, r in requeued.items():
        old = by_number[number]
        assert (r["source"], r["seed"], r["state"]) == ("requeued", old["seed"], "COMPLETE")
    # the front keeps its weights, those of trials the killed driver ran included
    front = [r["trial"] for r in rows(run / "pareto.parquet")]
    assert front and all((run / "models" / f"trial_{n:05d}.pt").is_file() for n in front)


def descends_from(pid: int, ancestor: int) -> bool:
    while pid > 1:
        if pid == ancestor:
            return True
        try:
            with open(f"/proc/{pid}/stat") as f:
                pid = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            return False
    return False


def test_local_backend_matches_optuna_and_listens_on_loopback_only(tmp_path: Path, run_dir: Path) -> None:
    """`--backend ray` starts its own instance: same first proposals as the Optuna backend (the
    session's shared run, 8 trials of 1 epoch at budget 0.2), comparable fronts, and no server on
    a non-loopback address."""
    env = {**cli_env(tmp_path, session_cache=True), "RAY_USAGE_STATS_ENABLED": "0"}
    common = ["--budget", "0.2", "--trials", "8", "--epochs", "1", "--quiet"]
    optuna_run, ray_run = run_dir, tmp_path / "ray"
    proc = subprocess.Popen(
        [sys.executable, "-m", "fga_search._cli", *common, "--backend", "ray", "--max-concurrent", "1", "--out", str(ray_run)],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    listening: set[str] = set()
    while proc.poll() is None:
        ss = subprocess.run(["ss", "-ltnpH"], capture_output=True, text=True).stdout
        for line in ss.splitlines():
            pids = [int(p) for p in re.findall(r"pid=(\d+)", line)]
            if any(descends_from(p, proc.pid) for p in pids):  # the CLI's own Ray processes
                listening.add(line.split()[3].rsplit(":", 1)[0])
        time.sleep(0.5)
    out, err = proc.communicate()
    assert proc.returncode == 0, err[-3000:]
    assert listening and listening <= {"127.0.0.1", "[::1]", "[::ffff:127.0.0.1]"}, listening
    a = {r["trial"]: r for r in rows(optuna_run / "trials.parquet")}
    b = {r["trial"]: r for r in rows(ray_run / "trials.parquet")}
    assert len(a) == len(b) == 8
    for number in range(4):  # the warm start (half of 8 trials): the same plans
        assert a[number]["plan"] == b[number]["plan"] and a[number]["seed"] == b[number]["seed"]
        assert abs(a[number]["val_acc"] - b[number]["val_acc"]) <= 0.03
    from fga_search.runs._pareto import hypervolume

    fronts = [rows(run / "pareto.parquet") for run in (optuna_run, ray_run)]
    hv = [hypervolume([r["val_acc"] for r in f], [r["flops_ratio"] for r in f]) for f in fronts]
    print(f"\nhypervolume: optuna {hv[0]:.4f}, ray {hv[1]:.4f}")
    assert abs(hv[0] - hv[1]) <= 0.05


def test_the_searcher_tells_the_sampler_a_measured_excess_over_a_latency_budget(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Tune's searcher hands each trial's end to the driver, which sets its constraint: 0 within
    the budget, 1 for a plan over it after repair (told without running: Tune never sees it), and
    for a trial the target measured over a latency budget its excess. The study is told, and
    trials.parquet is written from it."""
    import dataclasses

    import optuna

    from fga_search.engine._config import RunConfig
    from fga_search.engine._driver import SearchDriver
    from fga_search.engine._ray_backend import _DriverSearcher
    from fga_search.engine._setup import prepare
    from fga_search.runs._runfolder import RunFolder

    config = RunConfig(
        out=str(tmp_path / "run"), device="cpu", quiet=True, budget=0.7, strategy="random", trials=4
    )
    setup = prepare(config, log=False)
    folder = RunFolder(config.out)
    os.makedirs(folder.models_dir)
    propose, within = setup.propose, iter([True, False, True, True])
    monkeypatch.setattr(
        setup, "propose", lambda plan: dataclasses.replace(propose(plan), within_budget=next(within))
    )
    searcher = _DriverSearcher(SearchDriver(setup, folder, None, backend="ray"))  # type: ignore[arg-type]
    results = [
        {"val_acc": 0.8, "latency_ratio": 0.66, "status": "ok", "time_total_s": 1.0},
        {"val_acc": 0.0, "latency_ratio": 0.83, "status": "infeasible"},  # measured over 0.7
        None,  # the trial's worker failed twice
    ]
    suggested = []
    for i, result in enumerate(results):
        config_ = searcher.suggest(f"t{i}")
        assert isinstance(config_, dict)
        suggested.append(config_["number"])
        searcher.on_trial_complete(f"t{i}", result=result, error=result is None)
    assert suggested == [0, 2, 3]  # trial 1, over the budget after repair, never ran
    assert searcher.suggest("t3") == "FINISHED"
    study = optuna.load_study(
        study_name=searcher.driver.study.study_name, storage=f"sqlite:///{folder.study_db}"
    )
    trials = study.get_trials(deepcopy=False)
    assert [t.state.name for t in trials] == ["COMPLETE", "COMPLETE", "COMPLETE", "FAIL"]
    assert [t.user_attrs["constraint"] for t in trials] == pytest.approx([0.0, 1.0, 0.13, 0.0])
    table = rows(Path(folder.trials_parquet))
    assert [r["status"] for r in table] == ["ok", "infeasible", "infeasible", "failed"]
    assert table[0]["val_acc"] == 0.8 and table[2]["latency_ratio"] == 0.83
    assert table[3]["fail_reason"] == "the trial's Ray worker failed twice (retried once)"


def test_a_resumed_ray_run_reseeds_its_sampler_and_prints_a_real_eta(
    tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    """Drift bugs of the old Ray backend: a resumed run replayed the first run's sampler
    proposals (its sampler kept the run's seed), and each progress line built a fresh ETA clock,
    so the ETA was always about 0 s. One local Ray instance for both runs."""
    import optuna
    import ray

    from fga_search import search

    run = tmp_path / "run"
    common = {"out": str(run), "backend": "ray", "strategy": "random", "epochs": 0.2, "max_concurrent": 1}
    try:
        search(**common, trials=3, front_latency_runs=0)
        first = capfd.readouterr().err
        search(**common, trials=6, front_latency_runs=0)
        second = capfd.readouterr().err
    finally:
        ray.shutdown()
    for err, total in ((first, 3), (second, 6)):
        lines = re.findall(r"^\[(\d+)/(\d+)\] trial \d+ done .*\| ETA (\S+)$", err, re.MULTILINE)
        assert len(lines) == 3 and all(int(t) == total for _, t, _ in lines), err
        for done_, _, eta in lines:  # while trials remain, the ETA is what they would take: not 0
            assert (eta == "0s") == (int(done_) == total), err
    name = json.loads((run / "run.json").read_text())["study_name"]
    trials = optuna.load_study(study_name=name, storage=f"sqlite:///{run / 'study.db'}").trials
    assert [t.number for t in trials] == list(range(6)) and all(t.state.name == "COMPLETE" for t in trials)
    params = [t.params for t in trials]
    assert all(a != b for a, b in zip(params[:3], params[3:])), params  # not a replay of the first run
