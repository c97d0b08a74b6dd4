"""The search's policy rules (its initial plans, the mutations of the best allocation so far,
the budget constraint the sampler sees, what a trial records) and the end of a run
(``finalize``: the front's test accuracy, knee and best, pareto.parquet, the report).

The search driver (``_driver``) applies them, once for both executors.
"""

from __future__ import annotations

import random
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import optuna
from optuna.trial import TrialState

from fga_search._util._progress import Progress
from fga_search.core._plan import Plan, load_plan
from fga_search.runs._pareto import front_rows
from fga_search.runs._records import FrontRecord
from fga_search.train._compress import trial_seed_of

from ._config import RunConfig
from ._latency_aim import estimate_bias, latency_aim
from ._setup import Proposal, SearchSetup
from ._strategies import (
    alloc_slack,
    error_alloc_plan,
    grow_ranks,
    mutate_weights,
    strategy_plans,
)

__all__ = [
    "MUTATION_RATE",
    "REPORT_EVERY",
    "SearchResult",
    "alloc_attrs",
    "enqueue_initial_plans",
    "maybe_enqueue_mutation",
    "mutation_rng",
    "proposal_record",
    "propose_mutation",
    "refresh_report",
    "trial_constraint",
    "trial_seed",
    "update_latency_aim",
]


@dataclass(frozen=True)
class SearchResult:
    """What ``search`` returns: the run folder, how many trials it holds (``finished``: those that
    ran to an end), the Pareto front's rows (pareto.parquet), the best member's row (the highest
    validation accuracy within the budget) and the original model's figures (``baseline``)."""

    run_dir: str
    trials: int
    finished: int
    front: list[FrontRecord]
    best: FrontRecord | None
    baseline: dict[str, Any]


def trial_seed(config: RunConfig, number: int) -> int:
    """Every trial of a run uses the same seed (common random numbers): the same BN-recalibration
    images, refinement samples and fine-tuning order, so that trials differ by their plans only."""
    del number
    return trial_seed_of(config.seed)


def initial_plans(setup: SearchSetup) -> list[tuple[str, Plan]]:
    """The plans a new run starts with: a rule-based strategy's plans, or the search's warm start
    (uniform plans, the error allocation and blends of them)."""
    c = setup.config
    if c.strategy == "random" or (c.strategy == "search" and not c.warm_start):
        return []
    # the search keeps half of its trials for its own proposals
    count = c.trials if c.strategy != "search" else max(2, c.trials // 2)
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
    backends for a new run (a resumed run continues on a stream of its own)."""
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


REPORT_EVERY = 10  # trials between refreshes of report.html / report.md during a search


def refresh_report(run_dir: str) -> None:
    """Rewrite the run's report; a report that cannot be written yet (no finished trial) is skipped."""
    from fga_search.report._report import write_report

    try:
        write_report(run_dir)
    except ValueError:
        pass
