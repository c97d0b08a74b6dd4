"""The Optuna study behind a run: storage, sampler, crash recovery and trial rows."""

from __future__ import annotations

import logging
import math
import threading
from collections.abc import Sequence
from typing import Any, Literal

import optuna
from optuna.trial import FrozenTrial, TrialState

__all__ = [
    "constraints",
    "count_finished",
    "make_sampler",
    "open_study",
    "recover_interrupted",
    "set_budget_constraint",
    "trial_row",
]


# Optuna >= 5 reads constraints set on the trial; older versions take a constraints_func.
_TRIAL_CONSTRAINTS = hasattr(optuna.trial.Trial, "set_constraint")


def constraints(trial: FrozenTrial) -> Sequence[float]:
    """Optuna constraint: <= 0 when the trial's plan fits the budget."""
    return [float(trial.user_attrs.get("constraint", 1.0))]


def set_budget_constraint(trial: optuna.trial.Trial, value: float) -> None:
    """Record the budget constraint (<= 0: within budget) where the sampler reads it."""
    trial.set_user_attr("constraint", value)
    if _TRIAL_CONSTRAINTS:
        trial.set_constraint("budget", value)


class _NSGAIISampler(optuna.samplers.NSGAIISampler):  # type: ignore[misc]
    """NSGA-II that survives pickling: Optuna >= 5.1 gives its genetic samplers a thread lock,
    which cannot be pickled, and Ray Tune pickles its searcher (and with it the study's sampler)
    when it builds a Tuner and when it saves the searcher's state."""

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        if "_thread_lock" in state:
            state["_thread_lock"] = None
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        if "_thread_lock" in state:
            self._thread_lock = threading.Lock()


def make_sampler(name: str, *, seed: int, population: int | None, trials: int) -> optuna.samplers.BaseSampler:
    """The named sampler (nsga2, tpe or random), seeded; every one can be pickled."""
    func = None if _TRIAL_CONSTRAINTS else constraints
    if name == "nsga2":
        size = population or max(4, min(50, trials // 4))
        return _NSGAIISampler(population_size=size, seed=seed, constraints_func=func)
    if name == "tpe":
        return optuna.samplers.TPESampler(
            seed=seed, constraints_func=func, n_startup_trials=max(5, trials // 10)
        )
    if name == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    raise ValueError(f"unknown sampler {name!r}; valid samplers: nsga2, tpe, random")


def open_study(
    *,
    storage: str | optuna.storages.BaseStorage,
    name: str,
    sampler: optuna.samplers.BaseSampler,
    costs: int = 1,
) -> optuna.Study:
    """Create or load the study: maximise accuracy, minimise each of ``costs`` cost ratios."""
    optuna.logging.set_verbosity(logging.WARNING)
    directions: list[Literal["maximize", "minimize"]] = ["maximize"]
    directions += ["minimize"] * costs
    try:
        return optuna.create_study(
            storage=storage,
            study_name=name,
            directions=directions,
            sampler=sampler,
            load_if_exists=True,
        )
    except (ValueError, ImportError, optuna.exceptions.StorageInternalError) as exc:
        raise ValueError(f"cannot open the Optuna storage {storage!r}: {exc}") from None


def is_finished(trial: FrozenTrial) -> bool:
    if trial.state == TrialState.COMPLETE:
        return True
    return trial.state == TrialState.FAIL and trial.user_attrs.get("status") != "interrupted"


def count_finished(trials: Sequence[FrozenTrial]) -> int:
    return sum(1 for t in trials if is_finished(t))


def recover_interrupted(
    study: optuna.Study,
    *,
    requeue: bool = True,
    reason: str = "interrupted: the process stopped mid-trial",
) -> list[int]:
    """Mark trials left RUNNING by a killed process as failed ('interrupted', with ``reason``)
    and, with ``requeue``, re-queue their parameters, once, where they were all drawn (the trial
    had recorded its plan: one killed mid-suggestion had only some). Returns the recovered trial
    numbers."""
    trials = study.get_trials(deepcopy=False)
    requeued = {t.user_attrs.get("requeued_from") for t in trials}
    recovered = []
    # Private API, kept: Optuna has no public way to update a trial that another (killed) process
    # left RUNNING. Study.tell can fail it by number, but the reason must be recorded first and a
    # trial's user attributes can be set only through a Trial of this process or the storage, by
    # the id that FrozenTrial keeps as _trial_id; tell would also run the sampler's after_trial.
    storage = study._storage
    for t in trials:
        if t.state != TrialState.RUNNING:
            continue
        if requeue and t.number not in requeued and t.params and "record" in t.user_attrs:
            study.enqueue_trial(dict(t.params), user_attrs={"requeued_from": t.number})
        storage.set_trial_user_attr(t._trial_id, "status", "interrupted")
        storage.set_trial_user_attr(t._trial_id, "fail_reason", reason)
        storage.set_trial_state_values(t._trial_id, state=TrialState.FAIL)
        recovered.append(t.number)
    return recovered


def _num(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def trial_row(t: FrozenTrial) -> dict[str, Any]:
    """One Parquet row (see ``TRIAL_SCHEMA``) from an Optuna trial."""
    a = t.user_attrs
    merged = {**a.get("record", {}), **{k: v for k, v in a.items() if k != "record"}}
    row: dict[str, Any] = {k: _num(v) for k, v in merged.items()}
    row.update(
        trial=t.number,
        state=t.state.name,
        status=a.get("status", "running" if t.state == TrialState.RUNNING else t.state.name.lower()),
        datetime_start=t.datetime_start.isoformat() if t.datetime_start else None,
        datetime_complete=t.datetime_complete.isoformat() if t.datetime_complete else None,
    )
    return row
