"""The multi-objective search with the embedded Optuna backend.

Each trial's parameters become a plan (``_space``), which is repaired into the budget
analytically (``_setup.propose``) before any model is built; plans still over budget are
recorded as infeasible and never fine-tuned. Feasible plans run as a ``TrialRunner`` trial. The
study lives in ``study.db`` (or ``--storage``); ``trials.parquet`` is rewritten after every trial.
"""

from __future__ import annotations

import copy
import fcntl
import os
import random
import shutil
import signal
import sys
import time
import types
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import optuna
import pyarrow as pa
import torch
from optuna.trial import TrialState

from ._atomic import atomic_write
from ._baseline_cache import BaselineCache, accuracy_key
from ._checkpoint import cpu_state_dict
from ._config import RunConfig
from ._latency_aim import estimate_bias, latency_aim
from ._pareto import knee_index, pareto_mask
from ._plan import Plan, load_plan
from ._progress import Progress
from ._records import TRIAL_SCHEMA, rows_to_table, write_parquet
from ._runfolder import RunFolder
from ._setup import Proposal, SearchSetup, make_runner, prepare
from ._storage import open_storage, redact_command, redact_url
from ._strategies import alloc_slack, error_alloc_plan, grow_ranks, mutate_weights, strategy_plans
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
from ._surgery import apply_plan_structure
from ._trial import OverBudget, TrialOutcome, TrialRunner

__all__ = ["SearchResult", "best_row", "finalize", "front_rows", "proposal_record", "run_search", "search"]


@dataclass(frozen=True)
class SearchResult:
    run_dir: str
    trials: int
    finished: int
    front: list[dict[str, Any]]
    best: dict[str, Any] | None
    baseline: dict[str, Any]


def search(
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
) -> SearchResult:
    """Run (or resume) a search; keyword arguments mirror the command line's options."""
    unknown = set(options) - set(RunConfig.field_names())
    if unknown:
        raise ValueError(
            f"unknown search option(s) {sorted(unknown)}; valid options: {RunConfig.field_names()}"
        )
    config = RunConfig(
        out=out,
        model=model,
        weights=weights,
        dataset=dataset,
        data_dir=data_dir,
        budget=budget,
        trials=trials,
        epochs=epochs,
        **options,
    )
    return run_search(config)


def trial_seed(config: RunConfig, number: int) -> int:
    """Every trial of a run uses the same seed (common random numbers): the same BN-recalibration
    images, refinement samples and fine-tuning order, so that trials differ by their plans only."""
    del number
    return config.seed % (2**31)


def initial_plans(setup: SearchSetup) -> list[tuple[str, Plan]]:
    """The plans a new run starts with: a rule-based strategy's plans, or the search's warm start
    (uniform plans, the error allocation and blends of them)."""
    c = setup.config
    if c.strategy == "random" or (c.strategy == "search" and not c.warm_start):
        return []
    # the search keeps three quarters of its trials for its own proposals
    count = c.trials if c.strategy != "search" else max(2, c.trials // 4)
    return strategy_plans(
        c.strategy,
        space=setup.space,
        cost=setup.cost,
        spectra=setup.spectra,
        budget=c.budget,
        count=count,
        seed=c.seed,
    )


MUTATION_RATE = 0.9  # share of the search's own proposals that mutate the best allocation so far
SPREAD_RATE = 0.2  # share of mutations re-allocated below the budget, to fill the front
SLACK_MOVE_RATE = 0.5  # share of the moves from a slack allocation that move its slack instead
SLACK_STEP = (0.7, 1.5)  # the factor of such a move, drawn uniformly
SLACK_RANGE = (0.02, 0.3)  # the slack it stays in
SPREAD_SCALES = (0.5, 0.95)  # their budget scale, drawn uniformly (fraction of the budget)
ALLOC_ATTRS = ("alloc_weights", "alloc_slack")  # what makes a trial a parent of allocation moves


def alloc_attrs(user_attrs: Mapping[str, Any]) -> dict[str, Any]:
    """The allocation a queued trial came from (its thresholds' weights and cost slack), for its
    record: both backends keep it, and mutations read it back from the rows."""
    return {key: user_attrs[key] for key in ALLOC_ATTRS if key in user_attrs}


def enqueue_initial_plans(setup: SearchSetup, study: optuna.Study) -> None:
    """Queue a new run's initial plans; the equal-threshold error allocation is marked as a
    parent for mutations (its allocation weights are all 1)."""
    for label, plan in initial_plans(setup):
        attrs: dict[str, Any] = {"source": label}
        slack = alloc_slack(label)
        if slack is not None:
            attrs["alloc_weights"] = {}  # equal error thresholds: a parent for mutations
            attrs["alloc_slack"] = slack
        study.enqueue_trial(setup.space.to_params(plan), user_attrs=attrs)


def mutation_rng(config: RunConfig, finished: int) -> random.Random:
    """The random stream that decides between mutations and sampler proposals: the same in both
    backends for a new run (a resumed Optuna run continues on a stream of its own)."""
    return random.Random(config.seed * 7919 + finished)


def maybe_enqueue_mutation(
    setup: SearchSetup, study: optuna.Study, rows: list[dict[str, Any]], rng: random.Random
) -> None:
    """Before each ask of a search: with probability MUTATION_RATE, and when no trial is already
    waiting, queue a mutation of the best error allocation so far, unless the repair brings it
    back to a plan the study already holds (then the sampler proposes instead: a repeat would
    only reuse the earlier trial's result)."""
    if setup.config.strategy != "search" or rng.random() >= MUTATION_RATE:
        return
    if study.get_trials(deepcopy=False, states=(TrialState.WAITING,)):
        return
    move = propose_mutation(setup, rows, rng)
    if move is not None:
        label, plan, weights, slack = move
        if setup.propose(plan).key in tried_plans(study):
            return
        attrs: dict[str, Any] = {"source": label}
        if weights is not None:
            attrs["alloc_weights"] = weights
            attrs["alloc_slack"] = slack
        study.enqueue_trial(setup.space.to_params(plan), user_attrs=attrs)


def tried_plans(study: optuna.Study) -> set[str]:
    """The repaired plans of every trial the study has asked for, finished or running."""
    plans = set()
    for t in study.get_trials(deepcopy=False):
        record = t.user_attrs.get("record")
        if isinstance(record, dict) and record.get("plan"):
            plans.add(str(record["plan"]))
    return plans


def propose_mutation(
    setup: SearchSetup, rows: list[dict[str, Any]], rng: random.Random
) -> tuple[str, Plan, dict[str, float] | None, float] | None:
    """A local move from the most accurate trial on the front.

    If it came from an error allocation, its per-layer error thresholds are perturbed (or, for
    a share SLACK_MOVE_RATE of the moves from an allocation with a cost slack, that slack) and
    the plan is re-allocated at the budget, or (a share SPREAD_RATE of the moves) at a fraction of
    it, so that the front spans the costs. Otherwise (a uniform plan, a blend, a sampler's
    plan) three of its layers get a quarter more rank and the repair takes the cost back from
    the layers where it loses the least approximation quality."""
    front = front_rows(rows, costs=setup.config.costs)
    if not front:
        return None
    parent = max(front, key=lambda r: r["val_acc"])
    label = f"mutation of trial {parent['trial']}"
    if not isinstance(parent.get("alloc_weights"), dict):
        return label, grow_ranks(setup.space, load_plan(parent["plan"]), rng=rng), None, 0.0
    names = [layer.name for layer in setup.space.layers]
    slack = float(parent.get("alloc_slack") or 0.0)
    if slack > 0 and rng.random() < SLACK_MOVE_RATE:
        weights = {name: float(parent["alloc_weights"].get(name, 1.0)) for name in names}
        slack = min(SLACK_RANGE[1], max(SLACK_RANGE[0], slack * rng.uniform(*SLACK_STEP)))
    else:
        weights = mutate_weights(parent["alloc_weights"], names=names, rng=rng)
    scale = rng.uniform(*SPREAD_SCALES) if rng.random() < SPREAD_RATE else 1.0
    plan = error_alloc_plan(
        setup.space,
        setup.cost,
        setup.spectra,
        budget=setup.repair_budget * scale,
        weights=weights,
        slack=slack,
    )
    if plan is None:
        return None
    return (label if scale == 1.0 else f"{label} at {scale:.0%} of the budget"), plan, weights, slack


def trial_constraint(record: dict[str, Any], result: dict[str, Any] | None) -> float:
    """The budget constraint the sampler sees (<= 0: within the budget), from the trial's record
    and its outcome (``status``, ``latency_ratio``): 1 for a plan over the budget after repair,
    the measured excess for one the target measured over a latency budget, else 0."""
    if not record.get("within_budget", False):
        return 1.0
    measured = (result or {}).get("latency_ratio")
    if (result or {}).get("status") == "infeasible" and measured is not None:
        return float(measured) - float(record["budget"])
    return 0.0


def objective_values(config: RunConfig, accuracy: float, record: dict[str, Any]) -> list[float]:
    """What the sampler sees: validation accuracy, then the objective's cost ratios (a latency not
    measured, for a plan that was never built, is the lookup table's estimate)."""

    def cost(column: str) -> float:
        value = record.get(column)
        if value is None and column == "latency_ratio":
            value = record.get("latency_estimate_ratio")
        return float(value)  # type: ignore[arg-type]

    return [accuracy, *(cost(c) for c in config.costs)]


def proposal_record(setup: SearchSetup, prop: Proposal, *, number: int, backend: str) -> dict[str, Any]:
    """What a trial records before it runs: the repaired plan, its analytic cost, seed, budget."""
    c = setup.config
    return {
        "plan": prop.key,
        "flops_ratio": prop.flops_ratio,
        "params_ratio": prop.params_ratio,
        "macs": prop.macs,
        "params": prop.params,
        "within_budget": prop.within_budget,
        "proposal_within_budget": prop.proposal_within_budget,
        "budget": c.budget,
        "budget_metric": c.budget_metric,
        "layers_decomposed": prop.layers_decomposed,
        "epochs": c.epochs,
        "seed": trial_seed(c, number),
        "device": str(setup.device),
        "backend": backend,
        "latency_estimate_ratio": setup.latency.ratio(prop.plan) if setup.latency is not None else None,
        "latency_aim": setup.repair_budget if c.budget_metric == "latency" else None,
    }


def update_latency_aim(setup: SearchSetup, rows: list[dict[str, Any]], progress: Progress | None) -> None:
    """Under a latency budget: aim the repair by what the trials measured (``_latency_aim``),
    and say so when the aim moves."""
    c = setup.config
    if c.budget_metric != "latency":
        return
    before = setup.repair_budget
    setup.aim = latency_aim(c.budget, rows)
    if progress is None or abs(setup.aim - before) < 0.01:
        return
    bias = estimate_bias(rows)
    assert bias is not None  # the aim moves only once enough trials are measured, and they stay
    progress.note(
        f"latency: the last {bias[1]} measured trials ran {bias[0]:+.2f} of the original's latency "
        f"against the table's estimate; the repair now aims at {setup.aim:.2f} (budget {c.budget:g})"
    )


def front_rows(rows: list[dict[str, Any]], *, costs: list[str] | None = None) -> list[dict[str, Any]]:
    """Non-dominated rows among finished trials within budget: validation accuracy up, each cost
    column down (default: the FLOPs ratio; a latency search adds ``latency_ratio``)."""
    costs = costs or ["flops_ratio"]
    ok = [
        r
        for r in rows
        if r.get("state") == "COMPLETE"
        and r.get("status") in ("ok", "duplicate")
        and r.get("within_budget")
        and r.get("val_acc") is not None
        and all(r.get(c) is not None for c in costs)
    ]
    if not ok:
        return []
    mask = pareto_mask([r["val_acc"] for r in ok], *[[r[c] for r in ok] for c in costs])
    front = sorted((r for r, m in zip(ok, mask) if m), key=lambda r: r["flops_ratio"])
    return front


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


def _rebuild(setup: SearchSetup, folder: RunFolder, row: dict[str, Any]) -> torch.nn.Module | None:
    path = folder.checkpoint(int(row["trial"]))
    if not os.path.isfile(path):
        return None
    model = apply_plan_structure(copy.deepcopy(setup.model).cpu(), load_plan(row["plan"]))
    model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    return model.eval()


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
            best = best_row(rows)
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


def best_row(rows: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The highest validation accuracy within budget, ties broken by fewer FLOPs."""
    front = front_rows(rows)
    if not front:
        return None
    return max(front, key=lambda r: (r["val_acc"], -r["flops_ratio"]))


PARETO_SCHEMA = (
    TRIAL_SCHEMA.append(pa.field("test_acc", pa.float64()))
    .append(pa.field("is_knee", pa.bool_()))
    .append(pa.field("is_best", pa.bool_()))
    # without a latency target: the member timed on this CPU after the search (front_latency.json)
    .append(pa.field("cpu_latency_ms", pa.float64()))
    .append(pa.field("cpu_latency_ratio", pa.float64()))
)


def _front_cpu_latency(setup: SearchSetup, folder: RunFolder, front: list[dict[str, Any]]) -> None:
    """Without a latency target, time each front member and the original on this CPU (batch 1,
    float32, eager PyTorch), side by side, so that the report shows FLOPs and latency side by side
    even for a FLOPs-only search. Latency does not depend on the weights: the plans' structures
    are timed, each with the CPU execution its export would choose (``choose_cpu_execution``) and
    its batch norms folded, the original's alike (``as_deployed``). Each model runs
    ``front_latency_runs`` times (rounds of 10, side by side; 0 skips the step)."""
    runs = setup.config.front_latency_runs // 10 * 10
    if setup.latency is not None or not front or runs == 0:
        return
    from ._cpu_execution import choose_cpu_execution
    from .latency import Target, as_deployed, measure_side_by_side

    target = Target("cpu", None, 1, "float32", False)
    base = copy.deepcopy(setup.model).cpu().eval()
    models = {"original": as_deployed(base, target)}
    block_diagonal: dict[str, int] = {}
    dense: dict[str, int] = {}
    memo: dict[tuple[object, ...], str] = {}  # members share most layer geometries: time each once
    for row in front:
        member = apply_plan_structure(copy.deepcopy(base), load_plan(row["plan"])).eval()
        # as the export will run it on this CPU
        chosen = choose_cpu_execution(
            member, input_shape=setup.data.input_shape, target=target, runs=runs, memo=memo
        )
        ways = list(chosen["layers"].values())
        block_diagonal[str(row["trial"])] = ways.count("block_diagonal")
        dense[str(row["trial"])] = ways.count("dense")
        models[str(row["trial"])] = as_deployed(member, target)
    ms = measure_side_by_side(
        models, input_shape=setup.data.input_shape, target=target, rounds=runs // 10, repeats=10
    )
    for row in front:
        row["cpu_latency_ms"] = ms[str(row["trial"])]
        row["cpu_latency_ratio"] = ms[str(row["trial"])] / ms["original"]
    folder.write_json(
        "front_latency.json",
        {
            "device": target.hardware(),
            "batch": 1,
            "dtype": "float32",
            "runtime": f"eager PyTorch {torch.__version__}",
            "runs": runs,
            "original_ms": ms["original"],
            "trials": {str(row["trial"]): ms[str(row["trial"])] for row in front},
            "block_diagonal_layers": block_diagonal,  # grouped convs run block-diagonal (as exported)
            "dense_layers": dense,  # pairs folded into one dense conv (as exported)
            "batch_norms": "folded into the convs before them, the original's alike (as exported)",
            "measured": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        },
    )


def finalize(
    setup: SearchSetup, folder: RunFolder, runner: TrialRunner, rows: list[dict[str, Any]]
) -> SearchResult:
    """Measure the front's test accuracy (once per member), mark the knee and the best, and write
    pareto.parquet. Shared by both backends."""
    costs = setup.config.costs
    front = front_rows(rows, costs=costs)
    cache: dict[str, float] = folder.read_json("test_acc.json", {}) or {}
    for row in front:
        key = str(row["trial"])
        if key not in cache:
            model = _rebuild(setup, folder, row)
            if model is not None:
                model = model.to(runner.device)
                if runner.channels_last:
                    model = model.to(memory_format=torch.channels_last)
                cache[key] = runner.evaluate(model, split="test")
        row["test_acc"] = cache.get(key)
    folder.write_json("test_acc.json", cache)
    best = best_row(rows)
    knee = knee_index([r["val_acc"] for r in front], [r[costs[-1]] for r in front]) if front else None
    for i, row in enumerate(front):
        row["is_knee"] = i == knee
        row["is_best"] = best is not None and row["trial"] == best["trial"]
    _front_cpu_latency(setup, folder, front)
    write_parquet(rows_to_table(front, PARETO_SCHEMA), folder.pareto_parquet)
    refresh_report(folder.path)
    finished = sum(
        1
        for r in rows
        if r["state"] == "COMPLETE" or (r["state"] == "FAIL" and r.get("status") != "interrupted")
    )
    return SearchResult(
        run_dir=folder.path,
        trials=len(rows),
        finished=finished,
        front=front,
        best=next((r for r in front if r.get("is_best")), None),
        baseline=folder.read().get("baseline", {}),
    )


REPORT_EVERY = 10  # trials between refreshes of report.html / report.md during a search


def refresh_report(run_dir: str) -> None:
    """Rewrite the run's report; a report that cannot be written yet (no finished trial) is skipped."""
    from ._report import write_report

    try:
        write_report(run_dir)
    except ValueError:
        pass


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
