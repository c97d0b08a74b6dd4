"""The Ray Tune backend: the same search as Ray Tune trials on a (local or remote) Ray cluster.

* Trials come from Ray's ``OptunaSearch`` with the same define-by-run space, sampler, budget
  constraint, repair and seed as the Optuna backend; its study lives in the run folder's
  ``study.db`` as well.
* The trained model and the dataset go into Ray's object store once (``tune.with_parameters``);
  each worker process builds its ``TrialRunner`` once and reuses it for later trials
  (``reuse_actors``), teacher-logit cache included.
* Each trial uses the GPU Ray assigned to it (``CUDA_VISIBLE_DEVICES``), or the CPU.
* A worker killed mid-trial is retried once (``FailureConfig(max_failures=1)``), then recorded as
  failed. A killed driver is resumed by rerunning the same command: a new Tune experiment goes
  on from the study's finished trials (not ``Tuner.restore``: see ``RaySearch.run``).
* A local Ray instance listens on 127.0.0.1 only and starts no dashboard unless asked.
"""

from __future__ import annotations

import contextlib
import copy
import datetime as dt
import glob
import json
import os
import random
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import ray
import torch
from ray import tune
from ray.tune.search.optuna import OptunaSearch

from ._checkpoint import cpu_state_dict
from ._data import DataBundle, Split
from ._errors import first_line
from ._loader import Normalization
from ._pareto import best_row
from ._plan import load_plan
from ._policy import (
    REPORT_EVERY,
    SearchResult,
    alloc_attrs,
    enqueue_initial_plans,
    finalize,
    maybe_enqueue_mutation,
    mutation_rng,
    proposal_record,
    refresh_report,
    trial_constraint,
    update_latency_aim,
)
from ._progress import Progress
from ._records import NOT_RECORDED, TrialRecord, read_table, rows_to_table, write_parquet
from ._runfolder import RunFolder
from ._setup import SearchSetup
from ._study import count_finished, make_sampler, open_study, run_study_name, set_budget_constraint
from ._trial import OverBudget, TrialRunner, TrialSettings
from .latency import Target

__all__ = ["RaySearch"]

EXPERIMENT = "ray"
_RUNNERS: dict[str, TrialRunner] = {}  # per worker process: built once, reused across trials


@dataclass
class _Payload:
    """What every worker needs, shipped once through the object store (numpy arrays: zero-copy)."""

    key: str
    model: torch.nn.Module
    splits: dict[str, tuple[np.ndarray, np.ndarray]]
    name: str
    classes: list[str]
    flip: bool
    crop_pad: int
    normalization: Normalization
    settings: TrialSettings
    device: str | None
    seed: int

    def bundle(self) -> DataBundle:
        def split(name: str) -> Split:
            images, labels = self.splits[name]
            return Split(torch.tensor(images), torch.tensor(labels))

        return DataBundle(
            name=self.name,
            classes=self.classes,
            train=split("train"),
            val=split("val"),
            test=split("test"),
            flip=self.flip,
            crop_pad=self.crop_pad,
        )


def _worker_device(requested: str | None) -> torch.device:
    if requested is not None and requested != "cuda" and not requested.startswith("cuda"):
        return torch.device(requested)
    if ray.get_gpu_ids() and torch.cuda.is_available():
        return torch.device("cuda:0")  # Ray restricted CUDA_VISIBLE_DEVICES to this trial's GPU(s)
    return torch.device("cpu")


def _runner(payload: _Payload) -> TrialRunner:
    device = _worker_device(payload.device)
    key = f"{payload.key}:{device}"
    if key not in _RUNNERS:
        _RUNNERS.clear()
        _RUNNERS[key] = TrialRunner(
            model=payload.model,
            data=payload.bundle(),
            normalization=payload.normalization,
            device=device,
            settings=payload.settings,
            seed=payload.seed,
        )
    return _RUNNERS[key]


def _trainable(config: dict[str, Any], payload: _Payload) -> None:
    meta = {
        "started_at": time.time(),  # Tune's own timestamp is in whole seconds
        "node_id": ray.get_runtime_context().get_node_id(),
        "node_ip": ray.util.get_node_ip_address(),
        "gpu_ids": json.dumps([str(g) for g in ray.get_gpu_ids()]),
        "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES", ""),
        "pid": os.getpid(),
    }
    costs = {"flops_ratio": config["flops_ratio"], "latency_ratio": config.get("latency_estimate_ratio")}
    if not config["within_budget"]:
        tune.report({"val_acc": 0.0, **costs, "status": "infeasible", **meta, "ended_at": time.time()})
        return
    runner = _runner(payload)
    try:
        outcome = runner.run(load_plan(config["plan"]), seed=config["seed"])
    except OverBudget as exc:  # measured over a latency budget: never fine-tuned
        tune.report(
            {
                "val_acc": 0.0,
                **costs,
                "latency_ms": exc.latency_ms,
                "latency_ratio": exc.ratio,
                "status": "infeasible",
                **meta,
                "ended_at": time.time(),
            }
        )
        return
    metrics = {
        **outcome.metrics(),
        "flops_ratio": config["flops_ratio"],
        "status": "ok",
        "device": str(runner.device),
        **meta,
        "ended_at": time.time(),
    }
    with tempfile.TemporaryDirectory() as folder:
        state = cpu_state_dict(outcome.model)
        torch.save(state, os.path.join(folder, "model.pt"))
        tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(folder))


def _trial_name(trial: Any) -> str:
    return f"trial_{int(trial.config.get('number', -1)):05d}_{trial.trial_id}"


def trial_resources(cpus: float | None, gpus: float, target: Target | None) -> dict[str, float]:
    """What each trial asks Ray for: ``cpus`` (None: 1, or the N of a ``cpu:N`` latency target, so
    that the trials a node runs side by side leave each one the threads it times) and ``gpus``."""
    if cpus is None:
        cpus = (
            float(target.threads) if target is not None and target.device == "cpu" and target.threads else 1.0
        )
    return {"cpu": cpus, "gpu": gpus}


def latency_contention(resources: Mapping[str, float], target: Target | None) -> str | None:
    """Why trials running side by side would skew each other's latency on ``target``, or None."""
    if target is None:
        return None
    if target.device == "cpu" and target.threads and resources["cpu"] < target.threads:
        return (
            f"each trial times --target cpu:{target.threads} with {resources['cpu']:g} CPU(s) reserved: "
            "trials side by side on a node share its cores and skew each other's latency "
            f"(use --cpus-per-trial {target.threads})"
        )
    if target.device != "cpu" and 0 < resources["gpu"] < 1:
        return (
            f"trials share a GPU (--gpus-per-trial {resources['gpu']:g}): a trial's latency on "
            f"{target.device} is timed while others fine-tune on it (use --gpus-per-trial 1)"
        )
    return None


def _init_ray(setup: SearchSetup) -> None:
    """Join ``--ray-address`` or start a local instance bound to 127.0.0.1 with no dashboard."""
    c = setup.config
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("TUNE_GLOBAL_CHECKPOINT_S", "0")  # save experiment state at every step
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    local = c.ray_address is None
    if local:
        # Ray then takes 127.0.0.1 as the node address and binds its servers to loopback only.
        os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
        # Private API, kept: Ray reads that variable once, when ray is imported (here, or earlier
        # in the same process), into this constant, and ray.init has no public option that keeps
        # a local instance on loopback.
        import ray._private.ray_constants as constants

        constants.ENABLE_RAY_CLUSTER = False
    if ray.is_initialized():
        return
    try:
        if local:
            # address="local": always a new instance, never an existing cluster found on this machine
            ray.init(
                address="local",
                include_dashboard=c.ray_dashboard,
                log_to_driver=False,
                configure_logging=False,
            )
        else:
            ray.init(address=c.ray_address, log_to_driver=False, configure_logging=False)
    except (ConnectionError, RuntimeError) as exc:
        first = first_line(exc)
        raise ValueError(
            f"cannot reach the Ray cluster at {c.ray_address or 'a local instance'}: {first}"
        ) from None


_SETUPS: dict[str, SearchSetup] = {}  # the driver's setups, looked up by the pickled space below


class _Space:
    """OptunaSearch's define-by-run space. Ray pickles the searcher at every experiment
    checkpoint, so this holds only a key: the setup (model, data) stays in the driver."""

    def __init__(self, key: str) -> None:
        self.key = key

    def __call__(self, trial: Any) -> dict[str, Any]:
        setup = _SETUPS[self.key]
        params = setup.space.suggest(trial)
        prop = setup.propose(setup.space.to_plan(params))
        requeued = trial.user_attrs.get("requeued_from")  # an interrupted trial's plan and seed
        number = requeued if requeued is not None else trial.number
        record = proposal_record(setup, prop, number=number, backend="ray")
        record["source"] = trial.user_attrs.get("source", "requeued" if requeued is not None else "sampler")
        if requeued is not None:
            record["requeued_from"] = requeued
        record.update(alloc_attrs(trial.user_attrs))
        trial.set_user_attr("record", record)  # the constraint is set when the trial ends
        return {"number": trial.number, **record}


def _study_rows(study: Any, costs: list[str]) -> list[dict[str, Any]]:
    """The searcher's finished trials as rows (record, accuracy, costs) for mutation parents."""
    from optuna.trial import TrialState

    from ._study import trial_row as study_row

    rows = []
    for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
        if "record" not in t.user_attrs or t.values is None:
            continue
        # Tune tells the study the metrics only: accuracy and costs come from the trial's values
        row = {**study_row(t), "status": "ok", "val_acc": t.values[0]}
        row.update(zip(costs, t.values[1:]))
        rows.append(row)
    return rows


class _MutatingSearch(OptunaSearch):  # type: ignore[misc]
    """Ray's OptunaSearch with the Optuna backend's local moves: before each new trial it may
    queue a mutation of the best error allocation so far (same rule and random stream).

    Private API, kept: it reads OptunaSearch's ``_ot_study``, ``_ot_trials`` and
    ``_completed_trials``. OptunaSearch creates and owns the study and maps Tune's trial ids to
    Optuna trials with no public accessor to either, and the budget constraint has to be set on
    the Optuna trial before OptunaSearch tells it (Optuna keeps the first value). A public route
    would be a Tune Searcher of our own around an Optuna study; tests/test_ray.py pins the
    attributes' behaviour for the installed Ray."""

    def __init__(self, *, key: str, rng: random.Random, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.key = key
        self.rng = rng

    def suggest(self, trial_id: str) -> dict[str, Any] | None:
        study = self._ot_study
        if trial_id not in self._ot_trials and self.key in _SETUPS and study is not None:
            setup = _SETUPS[self.key]
            if setup.config.budget_metric == "latency":  # aim by what the trials measured so far
                measured = recorded_rows(RunFolder(self.key).trials_parquet).values()
                update_latency_aim(setup, list(measured), None)
            maybe_enqueue_mutation(setup, study, _study_rows(study, setup.config.costs), self.rng)
        return super().suggest(trial_id)  # type: ignore[no-any-return]

    def on_trial_complete(
        self, trial_id: str, result: dict[str, Any] | None = None, error: bool = False
    ) -> None:
        """Set the constraint the sampler sees before Optuna is told: the plan's estimate, or the
        excess a trial measured over a latency budget (Optuna keeps the first value set). Keep
        the reported metrics in the study too."""
        ot_trial = self._ot_trials.get(trial_id)
        if ot_trial is not None and trial_id not in self._completed_trials:
            record = ot_trial.user_attrs.get("record", {})
            set_budget_constraint(ot_trial, trial_constraint(record, result))
            if result:  # the study then holds the trial's row, should the driver die before
                ot_trial.set_user_attr("result", row_metrics(result, times=True))  # it is written
        super().on_trial_complete(trial_id, result=result, error=error)


_ROW_METRICS = frozenset(
    {
        "val_acc",
        "proxy_acc",
        "macs_measured",
        "finetune_steps",
        "status",
        "device",
        "node_id",
        "node_ip",
        "gpu_ids",
        "latency_ms",
        "latency_ratio",
    }
)


def row_metrics(metrics: dict[str, Any], *, times: bool = False) -> dict[str, Any]:
    """The reported metrics a trial's row keeps (with ``times``, also when it started and ended)."""
    extra = ("started_at", "ended_at") if times else ()
    return {k: v for k, v in metrics.items() if k in _ROW_METRICS or k in extra or k.startswith("seconds_")}


def trial_row(config: dict[str, Any], metrics: dict[str, Any], error: str | None) -> dict[str, Any]:
    """A Ray trial as a row of the common schema."""
    # the config holds the sampler's parameters (g:LAYER, r:LAYER: the plan column records them)
    # beside the trial's record
    row: dict[str, Any] = {k: v for k, v in config.items() if k in TrialRecord.columns() or k in NOT_RECORDED}
    row["trial"] = int(config["number"])
    row.update(row_metrics(metrics))
    if error is not None:
        row.update(state="FAIL", status="failed", fail_reason=str(error).strip().splitlines()[-1][:500])
    elif metrics:
        row["state"] = "COMPLETE"
    else:
        row.update(state="RUNNING", status="running")
    if "started_at" in metrics and "ended_at" in metrics:
        row["datetime_start"] = dt.datetime.fromtimestamp(metrics["started_at"]).isoformat()
        row["datetime_complete"] = dt.datetime.fromtimestamp(metrics["ended_at"]).isoformat()
    elif metrics.get("timestamp") is not None:
        end, total = metrics["timestamp"], float(metrics.get("time_total_s") or 0.0)
        row["datetime_complete"] = dt.datetime.fromtimestamp(end).isoformat()
        row["datetime_start"] = dt.datetime.fromtimestamp(end - total).isoformat()
    row["backend"] = "ray"
    return row


class _Progress(tune.Callback):
    """Prints a progress line as each trial ends and keeps trials.parquet current. Small when
    pickled (Tune saves its callbacks with the experiment)."""

    live: dict[int, dict[str, Any]]

    def __init__(self, parquet: str, total: int, quiet: bool, costs: list[str]) -> None:
        self.parquet = parquet
        self.costs = costs
        self.total = total
        self.quiet = quiet
        self.live = {}
        self.pid: int | None = None

    def on_trial_complete(self, iteration: int, trials: list[Any], trial: Any, **info: Any) -> None:
        self.ended(trial, error=None)

    def on_trial_error(self, iteration: int, trials: list[Any], trial: Any, **info: Any) -> None:
        self.ended(trial, error=getattr(trial, "error_msg", None) or "the trial raised an error")

    def ended(self, trial: Any, *, error: str | None) -> None:
        if "number" not in trial.config:
            return
        if self.pid != os.getpid():
            # a resumed driver: keep what the previous one recorded, which this callback (as
            # pickled with Tune's experiment state, possibly before those trials ended) lacks
            self.pid = os.getpid()
            for number, old in recorded_rows(self.parquet).items():
                self.live.setdefault(number, old)
        row = trial_row(trial.config, trial.last_result or {}, error)
        self.live[row["trial"]] = row
        rows = sorted(self.live.values(), key=lambda r: r["trial"])
        write_parquet(rows_to_table(rows), self.parquet)
        if len(rows) % REPORT_EVERY == 0:
            refresh_report(os.path.dirname(self.parquet))
        best = best_row(rows, costs=self.costs)
        Progress(total=self.total, done=0, quiet=self.quiet).update(
            done=len(rows),
            number=row["trial"],
            status="done" if row["status"] == "ok" else row["status"],
            val_acc=row.get("val_acc") if row["status"] == "ok" else None,
            ratio=row.get("flops_ratio"),
            seconds=row.get("seconds_total"),
            best=(best["trial"], best["val_acc"], best["flops_ratio"]) if best else None,
        )


def _tune_state_readable(experiment: str) -> bool:
    """Whether the newest experiment state Tune wrote in ``experiment`` parses."""
    states = sorted(
        (
            os.path.join(experiment, name)
            for name in os.listdir(experiment)
            if name.startswith("experiment_state-")
        ),
        key=os.path.getmtime,
    )
    if not states:
        return False
    try:
        with open(states[-1]) as f:
            json.load(f)
    except (OSError, ValueError):
        return False
    return True


def recorded_rows(parquet: str) -> dict[int, dict[str, Any]]:
    """The trials a run's trials.parquet records as ended (COMPLETE or FAIL), by number."""
    if not os.path.isfile(parquet):
        return {}
    try:
        table = read_table(parquet)
    except (OSError, ValueError):
        return {}
    return {int(r["trial"]): r for r in table.to_pylist() if r.get("state") in ("COMPLETE", "FAIL")}


def merge_recorded(rows: list[dict[str, Any]], recorded: dict[int, dict[str, Any]]) -> list[dict[str, Any]]:
    """This driver's rows plus the ended trials a previous driver recorded that they lack, or
    that they have as not ended: a resumed driver's Tune experiment holds only its own trials;
    the study keeps the earlier ones, and so does trials.parquet."""
    by = {int(r["trial"]): r for r in rows}
    for number, old in recorded.items():
        new = by.get(number)
        if new is None or (old["state"] == "COMPLETE" and new.get("state") != "COMPLETE"):
            by[number] = old
    return sorted(by.values(), key=lambda r: r["trial"])


@contextlib.contextmanager
def _pending_trials(count: int | None) -> Iterator[None]:
    """Let Tune keep `count` trials pending while it fits. For a custom searcher without a
    concurrency limit Tune keeps one, so with short trials and reused actors every trial ran on
    the first node; a limit would also cap the running trials, which an autoscaling cluster does
    not want. A value the user set in the environment is kept."""
    name = "TUNE_MAX_PENDING_TRIALS_PG"
    if count is None or name in os.environ:
        yield
        return
    os.environ[name] = str(count)
    try:
        yield
    finally:
        del os.environ[name]


class RaySearch:
    def __init__(self, setup: SearchSetup, folder: RunFolder, runner: TrialRunner) -> None:
        self.setup = setup
        self.config = setup.config
        self.folder = folder
        self.runner = runner
        self.study_name = run_study_name(folder, setup.config)

    # -- the searcher ---------------------------------------------------------------------
    def searcher(self, finished: int) -> Any:
        import optuna
        from ray.tune.search import ConcurrencyLimiter

        c = self.config
        kind = "random" if c.strategy in ("random", "uniform", "error-alloc") else c.sampler
        sampler = make_sampler(kind, seed=c.seed, population=c.population, trials=c.trials)
        storage = optuna.storages.RDBStorage(c.storage or f"sqlite:///{self.folder.study_db}")
        name = self.study_name
        study = open_study(storage=storage, name=name, sampler=sampler, costs=len(c.costs))
        if not study.get_trials(deepcopy=False):  # a new run: the warm start, as the Optuna backend's
            enqueue_initial_plans(self.setup, study)
        alg = _MutatingSearch(
            key=self.folder.path,
            rng=mutation_rng(c, finished),
            space=_Space(self.folder.path),
            metric=["val_acc", *c.costs],
            mode=["max", *(["min"] * len(c.costs))],
            sampler=sampler,
            storage=storage,
            study_name=name,
            seed=c.seed,
        )
        return ConcurrencyLimiter(alg, max_concurrent=c.max_concurrent) if c.max_concurrent else alg

    def slots(self) -> int:
        """How many trials the cluster's resources run at once now (at least one)."""
        have = ray.cluster_resources()
        need = self.resources()
        fits = [
            int(have.get(key, 0.0) / need[unit] + 1e-9)
            for key, unit in (("CPU", "cpu"), ("GPU", "gpu"))
            if need[unit] > 0
        ]
        return max(1, min(fits, default=1))

    def payload(self) -> _Payload:
        s = self.setup
        splits = {
            name: (getattr(s.data, name).images.numpy(), getattr(s.data, name).labels.numpy())
            for name in ("train", "val", "test")
        }
        return _Payload(
            key=f"{self.folder.path}:{os.getpid()}",
            model=copy.deepcopy(s.model).cpu(),
            splits=splits,
            name=s.data.name,
            classes=s.data.classes,
            flip=s.data.flip,
            crop_pad=s.data.crop_pad,
            normalization=s.normalization,
            settings=s.settings,
            device=self.config.device,
            seed=self.config.seed,
        )

    def resources(self) -> dict[str, float]:
        gpus = self.config.gpus_per_trial
        if gpus is None:
            gpus = 1.0 if ray.cluster_resources().get("GPU", 0) > 0 else 0.0
        return trial_resources(self.config.cpus_per_trial, gpus, self.setup.settings.latency_target)

    # -- records -------------------------------------------------------------------------
    def collect(self, results: Any) -> list[dict[str, Any]]:
        rows = []
        for result in results:
            if not result.config or "number" not in result.config:
                continue
            error = None if result.error is None else (str(result.error) or type(result.error).__name__)
            row = trial_row(result.config, result.metrics or {}, error)
            rows.append(row)
            if row["status"] == "ok" and result.checkpoint is not None:
                row["_checkpoint"] = result.checkpoint
        return sorted(rows, key=lambda r: r["trial"])

    def study(self) -> Any:
        """The run's study, opened without the search's sampler (to read it or mark trials)."""
        import optuna

        from ._study import open_study

        c = self.config
        return open_study(
            storage=c.storage or f"sqlite:///{self.folder.study_db}",
            name=self.study_name,
            sampler=optuna.samplers.RandomSampler(),
            costs=len(c.costs),
        )

    def orphans(self, *, requeue: bool = False) -> list[dict[str, Any]]:
        """Study trials left RUNNING, recorded as failed ('interrupted'): when a driver resumes,
        those the killed one had asked for (their plans are queued again, as the Optuna backend
        does); at the end of a run, those Tune never started."""
        from optuna.trial import TrialState

        from ._study import recover_interrupted
        from ._study import trial_row as study_row

        study = self.study()
        running = study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
        reason = (
            "interrupted: the driver stopped before the trial ended"
            if requeue
            else "interrupted: the driver stopped before the trial ran"
        )
        recover_interrupted(study, requeue=requeue, reason=reason)
        out = []
        for t in running:
            row = study_row(t)
            row.update(state="FAIL", status="interrupted", fail_reason=reason)
            out.append(row)
        return out

    def unrecorded(self, recorded: dict[int, dict[str, Any]]) -> list[dict[str, Any]]:
        """Rows of the trials the study holds as finished and trials.parquet lacks (the driver
        was killed between Optuna's tell and the row's write), from the metrics the searcher
        kept in the study."""
        from optuna.trial import TrialState

        out = []
        for t in self.study().get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
            if t.number in recorded or not isinstance(t.user_attrs.get("result"), dict):
                continue
            config = {**t.user_attrs.get("record", {}), "number": t.number}
            out.append(trial_row(config, t.user_attrs["result"], None))
        return out

    def keep_front_checkpoints(self, rows: list[dict[str, Any]], experiment: str) -> None:
        """Copy the front's trained weights into the run folder: from this driver's results, or
        for a trial an earlier driver ran, from its Tune experiment kept aside."""
        from ._pareto import front_rows

        front = {int(r["trial"]) for r in front_rows(rows, costs=self.config.costs)}
        for row in rows:
            ckpt = row.pop("_checkpoint", None)
            target = self.folder.checkpoint(row["trial"])
            if row["trial"] not in front or os.path.isfile(target):
                continue
            if ckpt is not None:
                with ckpt.as_directory() as folder:
                    shutil.copyfile(os.path.join(folder, "model.pt"), target)
                continue
            pattern = f"{glob.escape(experiment)}.*/trial_{int(row['trial']):05d}_*/checkpoint_*/model.pt"
            earlier = sorted(glob.glob(pattern), key=os.path.getmtime)
            if earlier and row.get("status") == "ok":
                shutil.copyfile(earlier[-1], target)

    # -- the run -------------------------------------------------------------------------
    def run(self) -> SearchResult:
        from optuna.trial import TrialState

        c = self.config
        _init_ray(self.setup)
        storage_path = os.path.abspath(c.storage_path or self.folder.path)
        experiment = os.path.join(storage_path, EXPERIMENT)
        resources = self.resources()
        trainable = tune.with_resources(tune.with_parameters(_trainable, payload=self.payload()), resources)
        _SETUPS[self.folder.path] = self.setup
        contention = latency_contention(resources, self.setup.settings.latency_target)
        if contention is not None and not c.quiet:
            print(f"warning: {contention}", file=sys.stderr)
        recorded = recorded_rows(self.folder.trials_parquet)
        callback = _Progress(self.folder.trials_parquet, c.trials, c.quiet, c.costs)
        trials = self.study().get_trials(deepcopy=False)
        finished = count_finished(trials)
        interrupted: list[dict[str, Any]] = []
        running = any(t.state == TrialState.RUNNING for t in trials)
        if tune.Tuner.can_restore(experiment) and (finished < c.trials or running):
            # a killed driver's experiment. Tune's own restore is not used: its state is three
            # files written one after another, and a kill between them restored a searcher that
            # lost trials or asked for more (or, mid-write, an unreadable state). The study and
            # trials.parquet keep every finished trial, so the search goes on from them in a new
            # Tune experiment, up to the same trial count; the old one is kept aside.
            readable = _tune_state_readable(experiment)
            kind = "resumed" if readable else "unreadable"
            aside = f"{experiment}.{kind}-{time.strftime('%Y%m%d-%H%M%S')}"
            os.replace(experiment, aside)
            Progress(total=c.trials, done=0, quiet=c.quiet).note(
                f"resuming the Ray experiment in {experiment} from the study's finished trials "
                f"(Tune's state moved to {aside})"
                if readable
                else f"Ray's experiment state in {experiment} is unreadable (moved to {aside}); "
                "resuming from the study's finished trials"
            )
            interrupted = self.orphans(requeue=True) + self.unrecorded(recorded)
            finished = count_finished(self.study().get_trials(deepcopy=False))
        results: Any = []
        if finished < c.trials:
            tuner = tune.Tuner(
                trainable,
                tune_config=tune.TuneConfig(
                    search_alg=self.searcher(finished),
                    num_samples=c.trials - finished,
                    reuse_actors=True,
                    trial_name_creator=_trial_name,
                    trial_dirname_creator=_trial_name,
                    time_budget_s=c.timeout,
                ),
                run_config=tune.RunConfig(
                    name=EXPERIMENT,
                    storage_path=storage_path,
                    failure_config=tune.FailureConfig(max_failures=1),
                    checkpoint_config=tune.CheckpointConfig(num_to_keep=1),
                    callbacks=[callback],
                    verbose=0,
                ),
            )
            with _pending_trials(None if c.max_concurrent else self.slots()):
                results = tuner.fit()
        rows = merge_recorded(self.collect(results) + interrupted + self.orphans(), recorded)
        self.keep_front_checkpoints(rows, experiment)
        write_parquet(rows_to_table(rows), self.folder.trials_parquet)
        return finalize(self.setup, self.folder, self.runner, rows)
