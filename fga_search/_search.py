"""The multi-objective search with the embedded Optuna backend.

Each trial's parameters become a plan (``_space``), which is repaired into the budget
analytically (``_setup.propose``) before any model is built; plans still over budget are
recorded as infeasible and never fine-tuned. Feasible plans run as a ``TrialRunner`` trial. The
study lives in ``study.db`` (or ``--storage``); ``trials.parquet`` is rewritten after every trial.
"""

from __future__ import annotations

import dataclasses
import fcntl
import os
import shutil
import signal
import sys
import time
import types
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, overload

import optuna
import torch
from optuna.trial import TrialState

from ._atomic import atomic_write
from ._baseline_cache import BaselineCache, accuracy_key
from ._checkpoint import cpu_state_dict
from ._config import RunConfig
from ._pareto import best_row, front_rows
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
from ._records import rows_to_table, write_parquet
from ._runfolder import RunFolder
from ._setup import Proposal, SearchSetup, make_runner, prepare
from ._storage import open_storage, redact_command, redact_url
from ._study import (
    check_resumable,
    count_finished,
    make_sampler,
    new_study_name,
    open_study,
    recover_interrupted,
    run_study_name,
    set_budget_constraint,
    trial_row,
)
from ._trial import OverBudget, TrialOutcome, TrialRunner

__all__ = ["SearchResult", "run_search", "search"]


@overload
def search(config: RunConfig, /, **overrides: Any) -> SearchResult: ...


@overload
def search(
    config: None = None,
    /,
    *,
    out: str,
    model: str | None = None,
    weights: str | None = None,
    dataset: str = "digits",
    data_dir: str | None = None,
    budget: float = 0.2,
    trials: int = 40,
    epochs: float = 1.0,
    **options: Any,
) -> SearchResult: ...


def search(config: RunConfig | None = None, /, **options: Any) -> SearchResult:
    """Run (or resume) a search, and return its front and best trial.

    ``search(RunConfig(out="runs/x", model="resnet56", ...))`` runs a :class:`RunConfig`'s
    settings; ``search(out="runs/x", model="resnet56", ...)`` builds one from keyword arguments
    named as its fields (the command line's options, with underscores for dashes);
    ``search(config, trials=80)`` runs a copy of ``config`` with those fields changed. An unknown
    name or a bad value raises ``ValueError`` naming it, before anything is written."""
    unknown = set(options) - set(RunConfig.field_names())
    if unknown:
        raise ValueError(
            f"unknown search option(s) {sorted(unknown)}; valid options: {RunConfig.field_names()}"
        )
    if config is None:
        if "out" not in options:
            raise TypeError("search() needs a RunConfig or out= (the run folder)")
        config = RunConfig(**options)
    elif not isinstance(config, RunConfig):
        raise TypeError(f"search() takes a RunConfig, got config={config!r}")
    elif options:
        config = dataclasses.replace(config, **options)
    return run_search(config)


@contextmanager
def _locked(folder: RunFolder) -> Iterator[None]:
    """Hold the run folder's lock; a folder this process creates is removed again (with the
    parents it created, where empty) if the run fails before its run.json is written."""
    made = []  # the folders this process creates: the run folder first, then its parents
    missing = folder.path
    while not os.path.exists(missing):
        made.append(missing)
        missing = os.path.dirname(missing)
    for path in reversed(made):
        try:
            os.mkdir(path)
        except FileExistsError:  # another process made it in between: not ours
            made.remove(path)
    with open(folder.file(".lock"), "a") as handle:  # "a": a lock held by another is left untouched
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise ValueError(f"run folder {folder.path} is in use by another fga-search process") from None
        try:
            yield
        except BaseException:
            if folder.path in made and not folder.exists():  # nothing of a run was kept
                shutil.rmtree(folder.path, ignore_errors=True)
                for path in made[1:]:
                    try:
                        os.rmdir(path)
                    except OSError:
                        break
            raise


class _Interrupted(Exception):
    pass


@dataclass
class _Result:
    status: str  # ok, infeasible, duplicate, failed, interrupted
    values: list[float] | None  # objective values to tell, None for a failed trial
    extra: dict[str, Any]  # recorded beside the proposal
    outcome: TrialOutcome | None = None


def _raise_interrupted(signum: int, frame: types.FrameType | None) -> None:
    raise _Interrupted(signal.Signals(signum).name)


def _original_accuracy(setup: SearchSetup, runner: TrialRunner, split: str) -> float:
    """The original model's accuracy on a split, from the on-disk cache when this model and these
    images were scored before (see _baseline_cache)."""
    key = accuracy_key(
        runner.model,
        setup.data.val if split == "val" else setup.data.test,
        normalization=setup.normalization.to_dict(),
        device=runner.device,
        amp_dtype=runner.amp,
    )
    cache = BaselineCache()
    accuracy = cache.get(key)
    if accuracy is None:
        accuracy = runner.evaluate(runner.model, split=split)
        cache.put(key, accuracy)
    return accuracy


def _baseline(setup: SearchSetup, runner: TrialRunner) -> dict[str, Any]:
    p = setup.profile
    return {
        "val_acc": _original_accuracy(setup, runner, "val"),
        "test_acc": _original_accuracy(setup, runner, "test"),
        "macs": p.base_macs,
        "params": p.base_params,
        "flops_ratio": 1.0,
        "latency_ms": setup.latency.base_ms if setup.latency is not None else None,
        "latency_ratio": 1.0 if setup.latency is not None else None,
    }


def objective_values(config: RunConfig, accuracy: float, record: dict[str, Any]) -> list[float]:
    """What the sampler sees: validation accuracy, then the objective's cost ratios (a latency not
    measured, for a plan that was never built, is the lookup table's estimate)."""

    def cost(column: str) -> float:
        value = record.get(column)
        if value is None and column == "latency_ratio":
            value = record.get("latency_estimate_ratio")
        return float(value)  # type: ignore[arg-type]

    return [accuracy, *(cost(c) for c in config.costs)]


class _OptunaSearch:
    def __init__(self, setup: SearchSetup, folder: RunFolder, runner: TrialRunner) -> None:
        self.setup = setup
        self.config = setup.config
        self.folder = folder
        self.runner = runner
        self.study_name = run_study_name(folder, setup.config)

    # -- storage -------------------------------------------------------------------------
    def open(self) -> optuna.Study:
        c = self.config
        storage = c.storage or f"sqlite:///{self.folder.study_db}"
        name = self.study_name
        probe = open_study(
            storage=storage, name=name, sampler=optuna.samplers.RandomSampler(), costs=len(c.costs)
        )
        existing = len(probe.get_trials(deepcopy=False))
        # A resumed sampler gets a fresh seed so that it does not replay the first run's proposals.
        kind = "random" if c.strategy in ("random", "uniform", "error-alloc") else c.sampler
        sampler = make_sampler(kind, seed=c.seed + existing, population=c.population, trials=c.trials)
        study = open_study(storage=storage, name=name, sampler=sampler, costs=len(c.costs))
        if existing == 0:
            enqueue_initial_plans(self.setup, study)
        return study

    def rows(self, study: optuna.Study) -> list[dict[str, Any]]:
        return [trial_row(t) for t in study.get_trials(deepcopy=False)]

    def save(self, study: optuna.Study) -> list[dict[str, Any]]:
        rows = self.rows(study)
        write_parquet(rows_to_table(rows), self.folder.trials_parquet)
        return rows

    # -- checkpoints ---------------------------------------------------------------------
    def keep_front_checkpoints(
        self, rows: list[dict[str, Any]], model: torch.nn.Module | None, number: int
    ) -> None:
        front = {int(r["trial"]) for r in front_rows(rows, costs=self.config.costs)}
        if model is not None and number in front:
            path = self.folder.checkpoint(number)
            state = cpu_state_dict(model)
            atomic_write(path, lambda tmp: torch.save(state, tmp))
        for name in os.listdir(self.folder.models_dir):
            if name.startswith("trial_") and name.endswith(".pt") and int(name[6:11]) not in front:
                os.remove(os.path.join(self.folder.models_dir, name))

    # -- one trial -----------------------------------------------------------------------
    def step(self, study: optuna.Study) -> tuple[optuna.trial.Trial, dict[str, Any], Proposal]:
        """Ask for a trial, turn its parameters into a repaired plan and record the proposal."""
        trial = study.ask()
        setup = self.setup
        params = setup.space.suggest(trial)
        prop = setup.propose(setup.space.to_plan(params))
        requeued = trial.user_attrs.get("requeued_from")
        number = requeued if requeued is not None else trial.number
        record = proposal_record(setup, prop, number=number, backend="optuna")
        record["source"] = trial.user_attrs.get("source", "requeued" if requeued is not None else "sampler")
        record.update(alloc_attrs(trial.user_attrs))
        trial.set_user_attr("record", record)  # one write: each is a database commit
        return trial, record, prop

    def run(self) -> SearchResult:
        c = self.config
        study = self.open()
        recovered = recover_interrupted(study)
        rows = self.rows(study)
        finished = count_finished(study.get_trials(deepcopy=False))
        progress = Progress(total=c.trials, done=finished, quiet=c.quiet)
        if recovered:
            progress.note(f"resuming: trial(s) {recovered} were interrupted and are re-queued")
        if finished:
            progress.note(f"resuming {self.folder.path}: {finished}/{c.trials} trials finished")
        known = {
            r["plan"]: r
            for r in rows
            if r["state"] == "COMPLETE" and r.get("status") == "ok" and r.get("plan")
        }
        deadline = time.monotonic() + c.timeout if c.timeout else None
        total = c.trials
        if c.strategy in ("uniform", "error-alloc"):
            waiting = len(study.get_trials(deepcopy=False, states=(TrialState.WAITING,)))
            total = min(c.trials, finished + waiting)
            if total < c.trials:
                progress.note(
                    f"strategy {c.strategy} has {total} distinct plans: running {total} trials, not {c.trials}"
                )
        rng = mutation_rng(c, finished)
        update_latency_aim(self.setup, rows, progress)
        while finished < total and (deadline is None or time.monotonic() < deadline):
            maybe_enqueue_mutation(self.setup, study, rows, rng)
            trial, record, prop = self.step(study)
            result = self.execute(trial, record, prop, known)
            if result.status == "interrupted":
                self.save(study)
                raise KeyboardInterrupt
            trial.set_user_attr("record", {**record, **result.extra})
            trial.set_user_attr("status", result.status)
            # set once, here (Optuna keeps the first value set), so that it can be a measured excess
            set_budget_constraint(trial, trial_constraint(record, {"status": result.status, **result.extra}))
            if result.values is None:
                study.tell(trial, state=TrialState.FAIL)
            else:
                study.tell(trial, result.values)
            finished += 1
            rows = self.save(study)
            update_latency_aim(self.setup, rows, progress)
            if finished % REPORT_EVERY == 0:
                refresh_report(self.folder.path)
            if result.status == "ok":
                known[prop.key] = next(r for r in rows if r["trial"] == trial.number)
            outcome = result.outcome
            self.keep_front_checkpoints(rows, outcome.model if outcome is not None else None, trial.number)
            best = best_row(rows, costs=c.costs)
            progress.update(
                done=finished,
                number=trial.number,
                status="done" if result.status == "ok" else result.status,
                val_acc=result.values[0] if result.values and result.status != "infeasible" else None,
                ratio=prop.flops_ratio,
                seconds=outcome.seconds["total"] if outcome is not None else None,
                best=(best["trial"], best["val_acc"], best["flops_ratio"]) if best else None,
            )
        if deadline is not None and finished < c.trials:
            progress.note(f"--timeout reached after {finished}/{c.trials} trials")
        return self.finish(study)

    def execute(
        self,
        trial: optuna.trial.Trial,
        record: dict[str, Any],
        prop: Proposal,
        known: dict[str, dict[str, Any]],
    ) -> _Result:
        if not prop.within_budget:
            reason = "plan exceeds the budget even after repair"
            return _Result("infeasible", objective_values(self.config, 0.0, record), {"fail_reason": reason})
        source = known.get(prop.key)
        if source is not None:  # the same plan again: reuse its result instead of recomputing it
            keys = ("val_acc", "proxy_acc", "macs_measured", "finetune_steps", "latency_ms", "latency_ratio")
            extra = {k: source.get(k) for k in keys}
            extra["duplicate_of"] = source["trial"]
            return _Result(
                "duplicate", objective_values(self.config, source["val_acc"], {**record, **extra}), extra
            )
        old = signal.signal(signal.SIGTERM, _raise_interrupted)
        try:
            outcome = self.runner.run(prop.plan, seed=record["seed"])
        except (KeyboardInterrupt, _Interrupted):
            self.interrupt(trial, record)
            return _Result("interrupted", None, {})
        except OverBudget as exc:  # measured over a latency budget: never fine-tuned
            extra = {
                "latency_ms": exc.latency_ms,
                "latency_ratio": exc.ratio,
                "fail_reason": str(exc),
                "within_budget": False,
            }
            return _Result("infeasible", objective_values(self.config, 0.0, {**record, **extra}), extra)
        except Exception as exc:  # a failed trial is recorded and the search goes on
            if isinstance(exc, torch.cuda.OutOfMemoryError):
                torch.cuda.empty_cache()
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
            return _Result("failed", None, {"fail_reason": f"{type(exc).__name__}: {first}"[:500]})
        finally:
            signal.signal(signal.SIGTERM, old)
        metrics = outcome.metrics()
        return _Result(
            "ok", objective_values(self.config, outcome.val_acc, {**record, **metrics}), metrics, outcome
        )

    def interrupt(self, trial: optuna.trial.Trial, record: dict[str, Any]) -> None:
        study = trial.study
        study.enqueue_trial(dict(trial.params), user_attrs={"requeued_from": trial.number})
        trial.set_user_attr("record", {**record, "fail_reason": "interrupted by the user"})
        trial.set_user_attr("status", "interrupted")
        study.tell(trial, state=TrialState.FAIL)

    # -- results -------------------------------------------------------------------------
    def finish(self, study: optuna.Study) -> SearchResult:
        rows = self.save(study)
        return finalize(self.setup, self.folder, self.runner, rows)


def create_run(setup: SearchSetup, folder: RunFolder, runner: TrialRunner) -> None:
    """Measure the original model and write run.json (a new run only)."""
    config = setup.config
    baseline = _baseline(setup, runner)
    folder.create(
        {
            "command": redact_command(sys.argv),
            "config": {**config.to_dict(), "storage": redact_url(config.storage) if config.storage else None},
            "identity": setup.identity(),
            # the study's name, which does not depend on where the folder lies (see new_study_name)
            "study_name": config.study_name or new_study_name(setup.identity()),
            "versions": setup.versions(),
            "baseline": baseline,
            "model": setup.spec.to_dict(),
            "normalization": setup.normalization.to_dict(),
            "input_shape": list(setup.data.input_shape),
            "num_classes": setup.data.num_classes,
            "classes": setup.data.classes,
            "data": setup.data.describe(),
            "space": {
                "name": setup.space.space.name,
                "source": setup.space.space.source,
                "layers": len(setup.space.layers),
            },
            "device": str(setup.device),
            "latency": _latency_record(setup),
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }
    )
    if not config.quiet:
        print(
            f"baseline {setup.spec.name}: val accuracy {baseline['val_acc']:.4f}, test {baseline['test_acc']:.4f}, "
            f"{setup.profile.base_macs / 1e6:.2f} M MACs, {setup.profile.base_params / 1e6:.3f} M params; "
            f"searching {len(setup.space.layers)} layers on {setup.device}",
            file=sys.stderr,
        )


def _latency_record(setup: SearchSetup) -> dict[str, Any] | None:
    lat = setup.latency
    if lat is None:
        return None
    return {
        "target": lat.table.target.to_dict(),
        "target_key": lat.table.key,
        "baseline_ms": lat.base_ms,
        "baseline_p10_ms": lat.baseline.p10_ms,
        "baseline_p90_ms": lat.baseline.p90_ms,
        "rest_ms": lat.rest_ms,
        "pinned_layers": list(setup.pinned),
        "table": lat.table.path,
    }


def run_search(config: RunConfig) -> SearchResult:
    """Prepare (checking every input before writing anything), then run or resume the search."""
    folder = RunFolder(config.out)
    folder.check_writable()
    if folder.exists():  # before anything is written: a study that lost finished trials is refused
        check_resumable(folder, config)
    setup = prepare(config, log=not config.quiet, latency_floor_check=not folder.exists())
    resuming = folder.check_new_or_matching(setup.identity())
    if config.storage is not None:  # opened before the run folder is made: a bad one writes nothing
        open_storage(config.storage)
    with _locked(folder):
        runner = make_runner(setup)
        if not resuming:
            create_run(setup, folder, runner)
        if config.backend == "ray":
            from ._ray_backend import RaySearch

            return RaySearch(setup, folder, runner).run()
        return _OptunaSearch(setup, folder, runner).run()
