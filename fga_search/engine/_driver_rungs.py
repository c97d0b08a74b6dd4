"""The search driver's rungs of fidelity (``--rungs``): ASHA's asynchronous promotions over the
run's study (``_rungs`` ranks; this decides, queues and prepares them).

How the study holds them: one Optuna trial per (plan, rung). A plan enters at rung 0 as any
trial; a promotion is a new trial of the same parameters, queued with the user attributes
``rung`` and ``promoted_from`` (the trial of the rung below). Every rung's result is told to the
study, so the sampler sees a plan at each rung it reached: its promoted trial, trained longer,
dominates its own lower-rung one. Nothing else is kept: a resumed run (even after a SIGKILL)
reads the promotions back from the study.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

import optuna
from optuna.trial import TrialState

from fga_search.core._plan import Plan, load_plan
from fga_search.runs._pareto import is_finished

from ._policy import alloc_attrs
from ._rungs import Fidelity, Rungs, next_promotion, promotion_order, rung_of, rung_scores
from ._study import ask_waiting

if TYPE_CHECKING:
    from fga_search.runs._runfolder import RunFolder

    from ._driver import PendingTrial
    from ._setup import SearchSetup

__all__ = ["RungsMixin"]

# what a promoted trial takes over from the trial it was promoted from: its plan, cost and latency
_PROPOSAL_KEYS = (
    *("plan", "flops_ratio", "params_ratio", "macs", "params", "within_budget", "proposal_within_budget"),
    *("budget", "budget_metric", "layers_decomposed", "seed", "device", "latency_estimate_ratio"),
    *("latency_aim", "latency_ms", "latency_ratio"),
)


class RungsMixin:
    """The ``SearchDriver``'s promotions (its ``rungs``, study, rows and running trials)."""

    rungs: Rungs | None
    study: optuna.Study
    rows: list[dict[str, Any]]
    running: dict[int, PendingTrial]
    costs: list[str]
    setup: SearchSetup
    folder: RunFolder
    backend: str

    def save(self) -> list[dict[str, Any]]:
        raise NotImplementedError

    def entered(self) -> int:
        """Plans that entered the lowest rung: its trials finished or running."""
        running = sum(1 for p in self.running.values() if not p.record.get("rung"))
        return running + sum(1 for r in self.rows if not rung_of(r) and is_finished(r))

    def waiting(self) -> list[optuna.trial.FrozenTrial]:
        """The trials queued in the study and not yet handed out (read from the study: the rows
        are rewritten only when a trial ends)."""
        return self.study.get_trials(deepcopy=False, states=(TrialState.WAITING,))

    def waiting_promotions(self) -> list[optuna.trial.FrozenTrial]:
        """The promotions queued and not yet handed out (re-queued after an interruption, or
        queued by ``ask_promotion`` just before it asks for them)."""
        return [t for t in self.waiting() if rung_of(t.user_attrs) > 0]

    def promotion(self) -> tuple[int, int] | None:
        """ASHA's next promotion (``_rungs.next_promotion``): (trial, rung it enters), or None."""
        assert self.rungs is not None
        by_rung, promoted = rung_scores(self.rows, rungs=self.rungs, costs=self.costs)
        for p in self.running.values():  # handed out since the rows were last read
            if p.record.get("promoted_from") is not None:
                promoted[int(p.record["rung"]) - 1].add(int(p.record["promoted_from"]))
        return next_promotion(by_rung, eta=self.rungs.eta, promoted=promoted)

    def ask_promotion(self) -> optuna.trial.Trial | None:
        """A promotion's trial, handed out ahead of any other queued trial: one queued already
        (re-queued after an interruption), else the next one due (queued, then asked). None when
        no plan has earned one."""
        waiting = self.waiting_promotions()
        if not waiting:
            move = self.promotion()
            if move is None:
                return None
            number, rung = move
            source = self.study.get_trials(deepcopy=False)[number]
            attrs: dict[str, Any] = alloc_attrs(source.user_attrs)  # a parent of mutations stays one
            attrs.update(rung=rung, promoted_from=number, source=f"promoted from trial {number}")
            self.study.enqueue_trial(dict(source.params), user_attrs=attrs)
            waiting = self.waiting_promotions()
        return ask_waiting(self.study, waiting[0])

    def rung_weights(self, number: int) -> str:
        """Where a rung's trial keeps its weights for a promotion that continues from them."""
        return os.path.join(self.folder.models_dir, "rungs", f"trial_{number:05d}.pt")

    def promotion_job(self, trial: optuna.trial.Trial) -> tuple[Plan, dict[str, Any], Fidelity]:
        """What a promotion's trial runs: the plan, cost and latency (its record) of the trial
        it was promoted from, trained to its new rung's epochs (``--promote``)."""
        assert self.rungs is not None
        rung, number = int(trial.user_attrs["rung"]), int(trial.user_attrs["promoted_from"])
        self.setup.space.suggest(trial)  # its queued parameters, recorded on the trial for the sampler
        source = next(r for r in self.rows if r["trial"] == number)
        record = {k: source.get(k) for k in _PROPOSAL_KEYS}
        requeued = trial.user_attrs.get("requeued_from")
        record.update(
            epochs=self.rungs.epochs[rung],
            rung=rung,
            promoted_from=number,
            continued=False,  # run_trial says True when it goes on from the rung below's weights
            source="requeued" if requeued is not None else trial.user_attrs.get("source"),
            backend=self.backend,
            **alloc_attrs(trial.user_attrs),
        )
        # a proxy rung (0 epochs) leaves the decomposed model itself: nothing to continue from
        continued = self.setup.config.promote == "continue" and self.rungs.epochs[rung - 1] > 0
        fidelity = Fidelity(
            epochs=self.rungs.epochs[rung],
            start=self.rungs.epochs[rung - 1] if continued else 0.0,
            init=self.rung_weights(number) if continued else None,
            measure_latency=False,
        )
        trial.set_user_attr("record", record)
        return load_plan(str(record["plan"])), record, fidelity

    def prune_rung_weights(self) -> None:
        """Keep a rung's weights only while a continuing promotion may still need them: not yet
        promoted (or promoted and still to run), and within twice the rung's promotion quota."""
        folder = os.path.join(self.folder.models_dir, "rungs")
        if self.rungs is None or not os.path.isdir(folder):
            return
        by_rung, promoted = rung_scores(self.rows, rungs=self.rungs, costs=self.costs)
        keep: set[int] = set()
        done = {
            int(r["promoted_from"])
            for r in self.rows
            if r.get("promoted_from") is not None and is_finished(r)
        }
        for k, scores in enumerate(by_rung[:-1]):
            order = promotion_order(scores)[: 2 * (len(scores) // self.rungs.eta + 1)]
            keep |= {n for n in order if n not in done} | (promoted[k] - done)
        for name in os.listdir(folder):
            if name.startswith("trial_") and int(name[6:11]) not in keep:
                os.remove(os.path.join(folder, name))
