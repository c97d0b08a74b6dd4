"""A finished (or running) run folder read back: run.json, the trials and the Pareto front.

Shared by the report and the export. ``pareto.parquet`` is used as the front when it is at least
as new as ``trials.parquet`` (the search writes it last, at the end); while a search is running
the front is recomputed from ``trials.parquet`` the way the search computes it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

from ._pareto import best_row, front_rows, knee_index
from ._records import read_table
from ._runfolder import RunFolder

__all__ = ["RunView", "is_finished", "is_usable", "read_run"]

USABLE = ("ok", "duplicate")


def is_usable(row: dict[str, Any]) -> bool:
    """A trial with a trained model and a validation accuracy: COMPLETE with status ok or duplicate."""
    return row.get("state") == "COMPLETE" and row.get("status") in USABLE and row.get("val_acc") is not None


def is_finished(row: dict[str, Any]) -> bool:
    """A trial that ended: complete (ok, duplicate, infeasible) or failed (not interrupted)."""
    return row.get("state") == "COMPLETE" or (
        row.get("state") == "FAIL" and row.get("status") != "interrupted"
    )


@dataclass(frozen=True)
class RunView:
    folder: RunFolder
    record: dict[str, Any]  # run.json
    rows: list[dict[str, Any]]  # trials.parquet, by trial number
    front: list[dict[str, Any]]  # by FLOPs ratio, with test_acc, is_knee and is_best
    front_source: str  # "pareto.parquet" or "trials.parquet"

    @property
    def path(self) -> str:
        return self.folder.path

    @property
    def baseline(self) -> dict[str, Any]:
        return dict(self.record.get("baseline") or {})

    @property
    def usable(self) -> list[dict[str, Any]]:
        return [r for r in self.rows if is_usable(r)]

    @property
    def finished(self) -> list[dict[str, Any]]:
        return [r for r in self.rows if is_finished(r)]

    @property
    def best(self) -> dict[str, Any] | None:
        return next((r for r in self.front if r.get("is_best")), None)

    @property
    def knee(self) -> dict[str, Any] | None:
        return next((r for r in self.front if r.get("is_knee")), None)

    def row(self, trial: int) -> dict[str, Any] | None:
        return next((r for r in self.rows if r["trial"] == trial), None)


def _mtime(path: str) -> int:
    return os.stat(path).st_mtime_ns


def _computed_front(folder: RunFolder, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    front = [dict(r) for r in front_rows(rows)]
    cache = folder.read_json("test_acc.json", {}) or {}
    best = best_row(rows)
    knee = knee_index([r["val_acc"] for r in front], [r["flops_ratio"] for r in front]) if front else None
    for i, row in enumerate(front):
        row.setdefault("test_acc", cache.get(str(row["trial"])))
        row["is_knee"] = i == knee
        row["is_best"] = best is not None and row["trial"] == best["trial"]
    return front


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
        rows = sorted(read_table(folder.trials_parquet).to_pylist(), key=lambda r: r["trial"])
    except Exception as exc:
        raise ValueError(f"run folder {folder.path}: cannot read trials.parquet ({exc})") from None
    front: list[dict[str, Any]] | None = None
    source = "trials.parquet"
    pareto = folder.pareto_parquet
    if os.path.isfile(pareto) and _mtime(pareto) >= _mtime(folder.trials_parquet):
        try:
            front = sorted(read_table(pareto).to_pylist(), key=lambda r: r["flops_ratio"])
            source = "pareto.parquet"
        except Exception:
            front = None
        known = {r["trial"] for r in rows if is_usable(r)}
        if front is not None and not all(r["trial"] in known for r in front):
            front, source = None, "trials.parquet"
    if front is None:
        front = _computed_front(folder, rows)
    return RunView(folder=folder, record=record, rows=rows, front=front, front_source=source)
