"""The search driver: the one ask/tell loop over the run's Optuna study, which holds all of the
search's policy; executors (``_search``'s in-process loop, ``_ray_backend``'s Tune searcher) only
run the trials it hands out.

The study is the only source of truth. A run (new, resumed, or resumed after a killed driver)
opens it with a sampler seeded by ``seed + trials so far``, marks the trials a killed process left
running as interrupted and queues their plans again. Each trial the study is told about rewrites
trials.parquet from the study; nothing reads that file back to decide what to run.

``next_trial`` asks the study for a trial, repairs its plan, records the proposal and tells the
study itself about plans that need no run (over the budget after repair; the same plan as a trial
that already ran); ``complete`` tells it a trial's result, keeps the front's weights and prints
progress; ``finish`` ends the run (``finalize``).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import optuna
import torch
from optuna.trial import TrialState

from fga_search._util._atomic import atomic_write
from fga_search._util._errors import first_line
from fga_search._util._progress import Progress
from fga_search.core._plan import Plan
from fga_search.models._checkpoint import cpu_state_dict
from fga_search.runs._pareto import best_row, front_rows
from fga_search.runs._records import rows_to_table, write_parquet
from fga_search.runs._runfolder import RunFolder
from fga_search.train._trial import OverBudget, TrialRunner

from ._driver_rungs import RungsMixin
from ._policy import (
    REPORT_EVERY,
    SearchResult,
    alloc_attrs,
    enqueue_initial_plans,
    maybe_enqueue_mutation,
    mutation_rng,
    proposal_record,
    refresh_report,
    trial_constraint,
    update_latency_aim,
)
from ._rungs import Fidelity, rung_of
from ._setup import SearchSetup
from ._study import (
    count_finished,
    make_sampler,
    open_study,
    recover_interrupted,
    requeue,
    run_study_name,
    set_budget_constraint,
    trial_row,
)
from ._views import finalize

__all__ = ["PendingTrial", "SearchDriver", "TrialResult", "objective_values", "run_trial"]

SaveModel = Callable[[str], None]  # writes the trial's trained weights (a state dict) to a path


@dataclass
class TrialResult:
    """What running a trial gave: ``status`` ok, infeasible (measured over a latency budget) or
    failed; ``metrics`` are recorded beside the proposal (``fail_reason`` for a failed trial);
    ``save_model`` writes its trained weights, where it has them."""

    status: str
    metrics: dict[str, Any]
    save_model: SaveModel | None = None


@dataclass
class PendingTrial:
    """A trial the driver handed out to run: its study trial, number, plan, seed and record."""

    trial: optuna.trial.Trial
    plan: Plan
    record: dict[str, Any]
    fidelity: Fidelity | None = None  # with --rungs: how it trains

    @property
    def number(self) -> int:
        return int(self.trial.number)

    @property
    def seed(self) -> int:
        return int(self.record["seed"])


def run_trial(runner: TrialRunner, plan: Plan, *, seed: int, fidelity: Fidelity | None = None) -> TrialResult:
    """Run one trial (every executor's way): a model measured over a latency budget is
    infeasible, never fine-tuned; an exception (a NaN loss, out of memory) fails the trial only.
    KeyboardInterrupt and other BaseExceptions propagate. A rung's trial (``fidelity``) goes on
    from the weights of the rung below where their file is at hand (``continued``), else it
    trains its rung's epochs from the decomposed model."""
    kwargs: dict[str, Any] = {}
    if fidelity is not None:
        state = None
        if fidelity.init is not None and os.path.isfile(fidelity.init):
            state = torch.load(fidelity.init, map_location="cpu", weights_only=True)
        start = fidelity.start if state is not None else 0.0
        kwargs = {"epochs": fidelity.epochs - start, "init_state": state}
        kwargs["measure_latency"] = fidelity.measure_latency
    try:
        outcome = runner.run(plan, seed=seed, **kwargs)
    except OverBudget as exc:
        return TrialResult(
            "infeasible",
            {
                "latency_ms": exc.latency_ms,
                "latency_ratio": exc.ratio,
                "fail_reason": str(exc),
                "within_budget": False,
            },
        )
    except Exception as exc:
        if isinstance(exc, torch.cuda.OutOfMemoryError):
            torch.cuda.empty_cache()
        reason = f"{type(exc).__name__}: {first_line(exc) if str(exc).strip() else ''}"
        return TrialResult("failed", {"fail_reason": reason[:500]})
    model = outcome.model

    def save(path: str) -> None:
        state = cpu_state_dict(model)
        atomic_write(path, lambda tmp: torch.save(state, tmp))

    metrics = outcome.metrics()
    if fidelity is not None:
        if fidelity.init is not None:  # a promotion set to continue: did it find the weights?
            metrics["continued"] = kwargs["init_state"] is not None
        if not fidelity.measure_latency:  # the rung below's measurement stands
            metrics.pop("latency_ms"), metrics.pop("latency_ratio")
    return TrialResult("ok", metrics, save)


def objective_values(costs: list[str], accuracy: float, record: dict[str, Any]) -> list[float]:
    """What the sampler sees: validation accuracy, then the objective's cost ratios (a latency not
    measured, for a plan that was never built, is the lookup table's estimate)."""

    def cost(column: str) -> float:
        value = record.get(column)
        if value is None and column == "latency_ratio":
            value = record.get("latency_estimate_ratio")
        return float(value)  # type: ignore[arg-type]

    return [accuracy, *(cost(c) for c in costs)]


_DUPLICATE_KEYS = ("val_acc", "proxy_acc", "macs_measured", "finetune_steps", "latency_ms", "latency_ratio")


@dataclass
class SearchDriver(RungsMixin):
    setup: SearchSetup
    folder: RunFolder
    runner: TrialRunner
    backend: str
    study: optuna.Study = field(init=False)
    running: dict[int, PendingTrial] = field(init=False, default_factory=dict)

    def __post_init__(self) -> None:
        c = self.setup.config
        self.costs = list(c.costs)
        storage = c.storage or f"sqlite:///{self.folder.study_db}"
        name = run_study_name(self.folder, c)
        probe = open_study(
            storage=storage, name=name, sampler=optuna.samplers.RandomSampler(), costs=len(c.costs)
        )
        existing = len(probe.get_trials(deepcopy=False))
        # A resumed sampler gets a fresh seed so that it does not replay the first run's proposals.
        kind = "random" if c.strategy in ("random", "uniform", "error-alloc") else c.sampler
        sampler = make_sampler(kind, seed=c.seed + existing, population=c.population, trials=c.trials)
        self.study = open_study(storage=storage, name=name, sampler=sampler, costs=len(c.costs))
        if existing == 0:
            enqueue_initial_plans(self.setup, self.study)
        # trials a killed driver (or worker) left running: failed as interrupted, their plans queued again
        recovered = recover_interrupted(self.study)
        trials = self.study.get_trials(deepcopy=False)
        self.finished = count_finished(trials)
        self.rungs = c.rung_schedule()
        # with --rungs, --trials counts plans: the trials of rung 0 (promotions carry their rung)
        plans = [t for t in trials if not rung_of(t.user_attrs)]
        done = self.finished if self.rungs is None else count_finished(plans)
        self.progress = Progress(total=c.trials, done=done, quiet=c.quiet)
        if recovered:
            self.progress.note(f"resuming: trial(s) {recovered} were interrupted and are re-queued")
        if self.finished:
            what = (
                "trials finished" if self.rungs is None else f"plans finished ({self.finished} trials in all)"
            )
            self.progress.note(f"resuming {self.folder.path}: {done}/{c.trials} {what}")
        self.total = c.trials
        if c.strategy in ("uniform", "error-alloc"):
            waiting = sum(1 for t in plans if t.state == TrialState.WAITING)
            self.total = min(c.trials, done + waiting)
            if self.total < c.trials:
                self.progress.note(
                    f"strategy {c.strategy} has {self.total} distinct plans: running {self.total} trials, "
                    f"not {c.trials}"
                )
        self.deadline = time.monotonic() + c.timeout if c.timeout else None
        self.rng = mutation_rng(c, self.finished)
        self.rows = self.save()
        self.known = {
            (r["plan"], rung_of(r)): r
            for r in self.rows
            if r["state"] == "COMPLETE" and r.get("status") == "ok" and r.get("plan")
        }
        update_latency_aim(self.setup, self.rows, self.progress)

    # -- the loop -----------------------------------------------------------------------
    def wants_more(self) -> bool:
        """Whether trials are left to hand out (the trial count, and --timeout, allow more). With
        --rungs the count is of plans (trials at the lowest rung); promotions come on top of it,
        while any plan has earned one."""
        if self.deadline is not None and time.monotonic() >= self.deadline:
            return False
        if self.rungs is None:
            return self.finished + len(self.running) < self.total
        return self.entered() < self.total or bool(self.waiting_promotions()) or self.promotion() is not None

    def next_trial(self) -> PendingTrial | None:
        """The next trial to run, or None when no more are to be handed out. Plans that need no
        run (infeasible, or a duplicate of a finished trial) are told here, and the loop goes on."""
        setup = self.setup
        while self.wants_more():
            trial = self.ask_promotion() if self.rungs is not None else None
            if trial is None:
                if self.rungs is not None and self.entered() >= self.total:
                    return None  # no plan left to enter, no promotion due: wait for those running
                maybe_enqueue_mutation(setup, self.study, self.rows, self.rng)
                trial = self.study.ask()
            if self.rungs is not None and trial.user_attrs.get("rung"):
                pending = PendingTrial(trial, *self.promotion_job(trial))
                self.running[pending.number] = pending
                return pending
            prop = setup.propose(setup.space.to_plan(setup.space.suggest(trial)))
            requeued = trial.user_attrs.get("requeued_from")
            number = requeued if requeued is not None else trial.number  # an interrupted trial's seed
            record = proposal_record(setup, prop, number=number, backend=self.backend)
            record["source"] = trial.user_attrs.get(
                "source", "requeued" if requeued is not None else "sampler"
            )
            record.update(alloc_attrs(trial.user_attrs))
            fidelity = None
            if self.rungs is not None:
                record.update(rung=0, epochs=self.rungs.epochs[0])
                fidelity = Fidelity(epochs=self.rungs.epochs[0])
            trial.set_user_attr("record", record)  # one write: each is a database commit
            pending = PendingTrial(trial, prop.plan, record, fidelity)
            if not prop.within_budget:
                reason = "plan exceeds the budget even after repair"
                self.tell(pending, "infeasible", {"fail_reason": reason})
                continue
            source = self.known.get((prop.key, 0))
            if source is not None:  # the same plan again: reuse its result instead of recomputing it
                extra = {k: source.get(k) for k in _DUPLICATE_KEYS}
                self.tell(pending, "duplicate", {**extra, "duplicate_of": source["trial"]})
                continue
            self.running[pending.number] = pending
            return pending
        if self.deadline is not None and time.monotonic() >= self.deadline and not self.running:
            if self.finished < self.setup.config.trials:
                self.progress.note(
                    f"--timeout reached after {self.finished}/{self.setup.config.trials} trials"
                )
        return None

    def complete(self, pending: PendingTrial, result: TrialResult) -> None:
        """Tell the study a trial's result, keep the front's weights, print progress."""
        self.running.pop(pending.number, None)
        self.tell(pending, result.status, result.metrics)
        # a front member's weights, after the tell: a full disk or a kill in between loses no
        # finished trial (the export re-runs a member without weights from its plan and seed)
        if result.status == "ok" and result.save_model is not None and pending.trial.number in self.front():
            result.save_model(self.folder.checkpoint(pending.trial.number))
        if self.rungs is not None and self.setup.config.promote == "continue":
            rung = int(pending.record.get("rung") or 0)
            keep = rung < self.rungs.top and self.rungs.epochs[rung] > 0  # a promotion may go on from it
            if result.status == "ok" and result.save_model is not None and keep:
                os.makedirs(os.path.dirname(self.rung_weights(pending.number)), exist_ok=True)
                result.save_model(self.rung_weights(pending.number))
            self.prune_rung_weights()

    def interrupt(self, pending: PendingTrial, reason: str) -> None:
        """A trial stopped before its end: failed as interrupted, its plan queued again (with its seed)."""
        self.running.pop(pending.number, None)
        trial = pending.trial
        requeue(self.study, trial)
        trial.set_user_attr("record", {**pending.record, "fail_reason": reason})
        trial.set_user_attr("status", "interrupted")
        self.study.tell(trial, state=TrialState.FAIL)
        self.rows = self.save()

    def tell(self, pending: PendingTrial, status: str, metrics: dict[str, Any]) -> None:
        trial, record = pending.trial, pending.record
        trial.set_user_attr("record", {**record, **metrics})
        trial.set_user_attr("status", status)
        # set once, here (Optuna keeps the first value set), so that it can be a measured excess
        set_budget_constraint(trial, trial_constraint(record, {"status": status, **metrics}))
        if status == "failed":
            self.study.tell(trial, state=TrialState.FAIL)
            values = None
        else:
            accuracy = 0.0 if status == "infeasible" else float(metrics["val_acc"])
            values = objective_values(self.costs, accuracy, {**record, **metrics})
            self.study.tell(trial, values)
        self.finished += 1
        self.rows = self.save()
        update_latency_aim(self.setup, self.rows, self.progress)
        if self.finished % REPORT_EVERY == 0:
            refresh_report(self.folder.path)
        if status == "ok":
            self.known[(record["plan"], rung_of(record))] = next(
                r for r in self.rows if r["trial"] == trial.number
            )
        self.keep_front_checkpoints()
        best = best_row(self.rows, costs=self.costs)
        done = "done" if status == "ok" else status
        self.progress.update(
            done=self.finished if self.rungs is None else self.entered(),
            number=trial.number,
            status=done if self.rungs is None else f"{done} at rung {rung_of(record)}",
            val_acc=values[0] if values and status != "infeasible" else None,
            ratio=record["flops_ratio"],
            seconds=metrics.get("seconds_total"),
            best=(best["trial"], best["val_acc"], best["flops_ratio"]) if best else None,
        )

    # -- the study's views ----------------------------------------------------------------
    def save(self) -> list[dict[str, Any]]:
        """trials.parquet, rewritten from the study; returns its rows."""
        rows = [trial_row(t) for t in self.study.get_trials(deepcopy=False)]
        write_parquet(rows_to_table(rows), self.folder.trials_parquet)
        return rows

    def front(self) -> set[int]:
        """The trial numbers of the front's members, by the run's objective."""
        return {int(r["trial"]) for r in front_rows(self.rows, costs=self.costs)}

    def keep_front_checkpoints(self) -> None:
        """Keep the weights of the front's members only."""
        front = self.front()
        for name in os.listdir(self.folder.models_dir):
            if name.startswith("trial_") and name.endswith(".pt") and int(name[6:11]) not in front:
                os.remove(os.path.join(self.folder.models_dir, name))

    def finish(self, reason: str = "interrupted: the driver stopped before the trial ran") -> SearchResult:
        """End the run: trials handed out and never run are interrupted (queued again for a
        resumed run); then the front's test accuracy, knee and best, pareto.parquet, the report."""
        for pending in list(self.running.values()):
            self.interrupt(pending, reason)
        self.rows = self.save()
        return finalize(self.setup, self.folder, self.runner, self.rows, study=self.study)
