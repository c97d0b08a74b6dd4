"""A finished (or running) run folder read back: run.json, the trials and the Pareto front.

Shared by the report and the export. ``pareto.parquet`` is used as the front when it is at least
as new as ``trials.parquet`` (the search writes it last, at the end); while a search is running
the front is computed from ``trials.parquet`` the way the search computes it (``mark_front``, by
the run's objective).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

from ._pareto import is_finished, is_usable, mark_front, run_costs
from ._records import FrontRecord, TrialRecord, read_records
from ._runfolder import RunFolder

__all__ = ["RunView", "read_run"]


@dataclass(frozen=True)
class RunView:
    folder: RunFolder
    record: dict[str, Any]  # run.json
    rows: list[TrialRecord]  # trials.parquet, by trial number
    front: list[FrontRecord]  # by FLOPs ratio, with test_acc, is_knee and is_best
    front_source: str  # "pareto.parquet" or "trials.parquet"

    @property
    def path(self) -> str:
        return self.folder.path

    @property
    def baseline(self) -> dict[str, Any]:
        return dict(self.record.get("baseline") or {})

    @property
    def config(self) -> dict[str, Any]:
        return dict(self.record.get("config") or {})

    @property
    def costs(self) -> list[str]:
        """The run's objective's costs (``run_costs``): what its front trades accuracy for."""
        return run_costs(self.config)

    @property
    def usable(self) -> list[TrialRecord]:
        return [r for r in self.rows if is_usable(r)]

    @property
    def finished(self) -> list[TrialRecord]:
        return [r for r in self.rows if is_finished(r)]

    @property
    def best(self) -> FrontRecord | None:
        return next((r for r in self.front if r.is_best), None)

    @property
    def knee(self) -> FrontRecord | None:
        return next((r for r in self.front if r.is_knee), None)

    def row(self, trial: int) -> TrialRecord | None:
        return next((r for r in self.rows if r.trial == trial), None)


def _mtime(path: str) -> int:
    return os.stat(path).st_mtime_ns


def read_run(run_dir: str) -> RunView:
    """Read a run folder; ``ValueError`` if ``run_dir`` is not one or has no trials recorded yet."""
    if not isinstance(run_dir, (str, os.PathLike)) or not str(run_dir):
        raise ValueError(f"run_dir must be a path, got {run_dir!r}")
    folder = RunFolder(os.fspath(run_dir))
    if not os.path.isdir(folder.path):
        raise ValueError(f"run folder {folder.path} does not exist")
    if not folder.exists():
        raise ValueError(f"{folder.path} is not an fga-search run folder (no run.json)")
    record = folder.read()
    if not os.path.isfile(folder.trials_parquet):
        raise ValueError(f"run folder {folder.path} has no finished trials (no trials.parquet yet)")
    try:
        rows = read_records(folder.trials_parquet, TrialRecord)
    except Exception as exc:
        raise ValueError(f"run folder {folder.path}: cannot read trials.parquet ({exc})") from None
    front: list[FrontRecord] | None = None
    source = "trials.parquet"
    pareto = folder.pareto_parquet
    if os.path.isfile(pareto) and _mtime(pareto) >= _mtime(folder.trials_parquet):
        try:
            front = sorted(read_records(pareto, FrontRecord), key=lambda r: r.flops_ratio or 0.0)
            source = "pareto.parquet"
        except Exception:
            front = None
        known = {r.trial for r in rows if is_usable(r)}
        if front is not None and not all(r.trial in known for r in front):
            front, source = None, "trials.parquet"
    if front is None:
        costs = run_costs(record.get("config") or {})
        front = mark_front(rows, costs=costs, test_acc=folder.read_json("test_acc.json", {}) or {})
    return RunView(folder=folder, record=record, rows=rows, front=front, front_source=source)
