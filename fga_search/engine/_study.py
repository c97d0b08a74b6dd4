"""The Optuna study behind a run: storage, sampler, crash recovery and trial rows."""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import sqlite3
import threading
import uuid
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, Literal

import optuna
from optuna.trial import FrozenTrial, TrialState

from fga_search._util._errors import first_line
from fga_search._util._storage import redact_url

if TYPE_CHECKING:
    from fga_search.runs._runfolder import RunFolder

    from ._config import RunConfig

__all__ = [
    "RUNG_ATTRS",
    "SAMPLERS",
    "ask_waiting",
    "check_resumable",
    "constraints",
    "count_finished",
    "make_sampler",
    "new_study_name",
    "open_study",
    "recover_interrupted",
    "requeue",
    "run_study_name",
    "set_budget_constraint",
    "trial_row",
]


# what a re-queued trial keeps of the one that was interrupted, beside its parameters: its rung
RUNG_ATTRS = ("rung", "promoted_from")


def requeue(study: optuna.Study, trial: FrozenTrial | optuna.trial.Trial) -> None:
    """Queue an interrupted trial's parameters again, with its rung and ``requeued_from``."""
    carried = {k: trial.user_attrs[k] for k in RUNG_ATTRS if k in trial.user_attrs}
    study.enqueue_trial(dict(trial.params), user_attrs={**carried, "requeued_from": trial.number})


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


def _nsga2(*, seed: int, population: int | None, trials: int) -> optuna.samplers.BaseSampler:
    size = population or max(4, min(50, trials // 4))
    func = None if _TRIAL_CONSTRAINTS else constraints
    return _NSGAIISampler(population_size=size, seed=seed, constraints_func=func)


def _tpe(*, seed: int, population: int | None, trials: int) -> optuna.samplers.BaseSampler:
    func = None if _TRIAL_CONSTRAINTS else constraints
    return optuna.samplers.TPESampler(seed=seed, constraints_func=func, n_startup_trials=max(5, trials // 10))


def _random(*, seed: int, population: int | None, trials: int) -> optuna.samplers.BaseSampler:
    return optuna.samplers.RandomSampler(seed=seed)


# The samplers, by the name --sampler takes: the one list of them (RunConfig's choices come from it).
SAMPLERS: dict[str, Callable[..., optuna.samplers.BaseSampler]] = {
    "nsga2": _nsga2,
    "tpe": _tpe,
    "random": _random,
}


def make_sampler(name: str, *, seed: int, population: int | None, trials: int) -> optuna.samplers.BaseSampler:
    """The named sampler (one of ``SAMPLERS``), seeded; every one can be pickled."""
    factory = SAMPLERS.get(name)
    if factory is None:
        raise ValueError(f"unknown sampler {name!r}; valid samplers: {', '.join(SAMPLERS)}")
    return factory(seed=seed, population=population, trials=trials)


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
        shown = redact_url(storage) if isinstance(storage, str) else type(storage).__name__
        raise ValueError(f"cannot open the Optuna storage {shown!r}: {first_line(exc)}") from None


def is_finished(trial: FrozenTrial) -> bool:
    if trial.state == TrialState.COMPLETE:
        return True
    return trial.state == TrialState.FAIL and trial.user_attrs.get("status") != "interrupted"


def count_finished(trials: Sequence[FrozenTrial]) -> int:
    return sum(1 for t in trials if is_finished(t))


def recover_interrupted(study: optuna.Study) -> list[int]:
    """Mark trials left RUNNING by a killed process (a driver, or the trials it had handed to
    workers) as failed ('interrupted') and re-queue their parameters, once, where they were all
    drawn (the trial had recorded its plan: one killed mid-suggestion had only some). Returns the
    recovered trial numbers."""
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
        if t.number not in requeued and t.params and "record" in t.user_attrs:
            requeue(study, t)
        storage.set_trial_user_attr(t._trial_id, "status", "interrupted")
        storage.set_trial_user_attr(t._trial_id, "fail_reason", "interrupted: the process stopped mid-trial")
        storage.set_trial_state_values(t._trial_id, state=TrialState.FAIL)
        recovered.append(t.number)
    return recovered


def ask_waiting(study: optuna.Study, trial: FrozenTrial) -> optuna.trial.Trial | None:
    """Hand out this waiting trial now, ahead of those queued before it (``Study.ask`` takes the
    oldest): a promotion of a multi-fidelity search. None if another worker took it first.
    Private API, as ``Study.ask`` itself does it (``_pop_waiting_trial_id``): Optuna has no public
    way to ask for one queued trial; ``Trial()`` runs the sampler's ``before_trial``."""
    try:
        if not study._storage.set_trial_state_values(trial._trial_id, state=TrialState.RUNNING):
            return None
    except optuna.exceptions.UpdateFinishedTrialError:
        return None
    study._thread_local.cached_all_trials = None
    return optuna.trial.Trial(study, trial._trial_id)


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


# -- which study is the run's ----------------------------------------------------------------
def new_study_name(identity: Mapping[str, Any]) -> str:
    """A new run's study name: a digest of its identity and a random run id, recorded in run.json
    at creation. Nothing in it depends on where the run folder lies, so a run folder that is moved,
    copied or reached through a symlink opens the same study. (A copy with its own study.db goes on
    with its own copy of the study; copies of a run whose study is in a shared ``--storage`` share
    that study.)"""
    digest = hashlib.sha256(json.dumps(dict(identity), sort_keys=True, default=str).encode()).hexdigest()
    return f"fga-search:{digest[:16]}:{uuid.uuid4().hex}"


def _legacy_name(folder: RunFolder) -> str:
    """The name runs created before run.json recorded their study gave it: the folder's path."""
    return f"fga-search:{folder.path}"


def _unreadable(folder: RunFolder, why: str) -> ValueError:
    return ValueError(
        f"run folder {folder.path}: study.db {why}; nothing was changed. Restore study.db from a "
        "backup, or start a new run with another --out"
    )


def _sqlite_trials(folder: RunFolder) -> dict[str, list[tuple[int, str]]]:
    """Each study's trials (number, state) in the run folder's study.db, read without writing
    (sqlite read-only; a hot journal is rolled back first): {} for no file or an empty one. ``ValueError`` if it is no SQLite
    database, or a damaged one."""
    path = folder.study_db
    if not os.path.isfile(path) or os.path.getsize(path) == 0:
        return {}
    try:
        with open(path, "rb"):  # an unreadable file: one line, not sqlite's "unable to open"
            pass
        # A writer killed mid-transaction (SIGKILL) leaves a hot journal, which SQLite rolls back
        # on the next open, back to the last commit: its own crash recovery, which Optuna's open
        # would do too, and which needs write access. Only then is the file opened for writing.
        hot = os.path.isfile(path + "-journal") and os.path.getsize(path + "-journal") > 0
        db = sqlite3.connect(path if hot else f"file:{path}?mode=ro", uri=not hot)
        try:
            check = db.execute("PRAGMA quick_check").fetchall()
            if check != [("ok",)]:
                raise _unreadable(folder, f"is damaged (sqlite integrity check: {check[0][0]})")
            tables = {n for (n,) in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
            if not tables:
                return {}
            if not {"studies", "trials"} <= tables:
                raise _unreadable(folder, "is an SQLite database but not an Optuna study")
            studies: dict[str, list[tuple[int, str]]] = {
                name: [] for (name,) in db.execute("SELECT study_name FROM studies")
            }
            query = "SELECT s.study_name, t.number, t.state FROM trials t JOIN studies s USING (study_id)"
            for name, number, state in db.execute(query):
                studies[name].append((int(number), str(state)))
            return studies
        finally:
            db.close()
    except OSError as exc:
        raise _unreadable(folder, f"cannot be read ({exc.strerror or exc})") from None
    except sqlite3.Error as exc:
        raise _unreadable(folder, f"is not a readable Optuna study ({exc})") from None


def run_study_name(folder: RunFolder, config: RunConfig) -> str:
    """The run's study name: ``--study-name``, else the one run.json records (``new_study_name``),
    else (a run created before run.json recorded it) the only study in the run's own study.db, or
    the study named after the folder's path as those runs named it."""
    if config.study_name:
        return config.study_name
    record = folder.read() if folder.exists() else {}
    recorded = record.get("study_name")
    if isinstance(recorded, str) and recorded:
        return recorded
    legacy = _legacy_name(folder)
    if config.storage is not None:
        return legacy
    names = sorted(_sqlite_trials(folder))
    if len(names) == 1:
        return names[0]
    if not names or legacy in names:
        return legacy
    raise ValueError(
        f"run folder {folder.path}: study.db holds {len(names)} studies ({', '.join(names)}) and "
        "run.json does not say which is this run's; pass it as --study-name"
    )


def _recorded_numbers(folder: RunFolder) -> list[int]:
    """The trials trials.parquet records as finished (COMPLETE, or FAIL but not interrupted)."""
    from fga_search.runs._pareto import is_finished as row_finished
    from fga_search.runs._records import read_table

    if not os.path.isfile(folder.trials_parquet):
        return []
    try:
        rows = read_table(folder.trials_parquet).to_pylist()
    except (OSError, ValueError):
        return []
    return sorted(int(r["trial"]) for r in rows if row_finished(r))


def check_resumable(folder: RunFolder, config: RunConfig) -> str:
    """Before a run folder is resumed (and before anything is written to it): its study must be
    readable and hold every trial trials.parquet records as finished, else ``ValueError`` (an
    emptied, truncated or replaced study.db would start the search over and overwrite
    trials.parquet). Returns the run's study name (``run_study_name``)."""
    name = run_study_name(folder, config)
    recorded = _recorded_numbers(folder)
    if config.storage is None:
        studies = _sqlite_trials(folder)
        held = {number for number, _ in studies.get(name, [])}
        where = "study.db"
    else:
        try:
            storage = optuna.storages.get_storage(config.storage)
            study_id = storage.get_study_id_from_name(name)
        except KeyError:
            held = set()
        except Exception as exc:
            raise ValueError(
                f"cannot open the Optuna storage {redact_url(config.storage)!r}: {first_line(exc)}"
            ) from None
        else:
            held = {t.number for t in storage.get_all_trials(study_id, deepcopy=False)}
        where = f"the study {name!r} in --storage"
    missing = [n for n in recorded if n not in held]
    if missing:
        what = "is empty" if not held else f"lacks {len(missing)} of them (e.g. trial {missing[0]})"
        if config.storage is None:
            raise _unreadable(
                folder,
                f"does not hold the run's study: trials.parquet records {len(recorded)} finished "
                f"trial(s) and the study {what}",
            )
        raise ValueError(
            f"run folder {folder.path}: trials.parquet records {len(recorded)} finished trial(s) and "
            f"{where} {what}; nothing was changed (check --storage and --study-name)"
        )
    return name
