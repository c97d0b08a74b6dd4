"""Trial records: one row per trial, the same for every backend, written as Parquet.

``TrialRecord`` is the one definition of a trial's row: its fields are the columns of
trials.parquet, and ``TRIAL_SCHEMA`` is derived from their types. ``FrontRecord`` adds what
pareto.parquet holds for each member of the front (``FRONT_SCHEMA``).
"""

from __future__ import annotations

import dataclasses
import json
import typing
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

import pyarrow as pa
import pyarrow.parquet as pq

from fga_search._util._atomic import atomic_write

__all__ = [
    "FRONT_SCHEMA",
    "NOT_RECORDED",
    "TRIAL_SCHEMA",
    "FrontRecord",
    "TrialRecord",
    "read_records",
    "read_table",
    "records_of",
    "rows_to_table",
    "schema_of",
    "write_parquet",
]

# What the search keeps in the study beside a trial's row, not in trials.parquet: the allocation a
# mutation starts from (``_policy.alloc_attrs``), the budget constraint the sampler saw, and the
# metrics Ray's searcher keeps until the row is written (``result``: the row's own columns).
NOT_RECORDED = frozenset({"alloc_weights", "alloc_slack", "constraint", "result"})


@dataclass(frozen=True, kw_only=True)
class TrialRecord(Mapping[str, Any]):
    """One trial: its proposal (plan, analytic cost, budget), its outcome and its timings.

    Read as attributes (``record.val_acc``); a record also reads as a read-only mapping of its
    columns (``record["val_acc"]``, ``record.get("val_acc")``), as the rows did before it. A
    column a trial lacks is None."""

    trial: int
    state: str | None = None  # COMPLETE, FAIL, RUNNING, WAITING
    status: str | None = None  # ok, infeasible, failed, duplicate, interrupted, running
    fail_reason: str | None = None
    val_acc: float | None = None
    proxy_acc: float | None = None
    flops_ratio: float | None = None
    params_ratio: float | None = None
    macs: int | None = None
    macs_measured: int | None = None
    params: int | None = None
    latency_ms: float | None = None
    latency_ratio: float | None = None
    latency_estimate_ratio: float | None = None  # the lookup table's estimate, before the model is built
    latency_aim: float | None = None  # latency budgets: what the repair aimed at (_latency_aim)
    within_budget: bool | None = None
    proposal_within_budget: bool | None = None
    budget_metric: str | None = None
    budget: float | None = None
    layers_decomposed: int | None = None
    plan: str | None = None  # JSON
    source: str | None = None  # sampler, requeued, or the rule that made the plan (warm start, strategy)
    epochs: float | None = None  # fine-tuning epochs: the trial's fidelity (its rung's, with --rungs)
    rung: int | None = None  # with --rungs: the rung (0: where every plan enters)
    promoted_from: int | None = None  # with --rungs: the trial of the rung below that earned this one
    continued: bool | None = None  # a promotion that went on from that trial's weights (--promote continue)
    finetune_steps: int | None = None
    seed: int | None = None
    device: str | None = None
    backend: str | None = None
    node_id: str | None = None
    node_ip: str | None = None
    gpu_ids: str | None = None
    seconds_decompose: float | None = None
    seconds_latency: float | None = None  # measuring the built model on the latency target
    seconds_recalibrate: float | None = None
    seconds_proxy: float | None = None
    seconds_finetune: float | None = None
    seconds_eval: float | None = None
    seconds_flops: float | None = None
    seconds_total: float | None = None
    duplicate_of: int | None = None
    requeued_from: int | None = None
    datetime_start: str | None = None
    datetime_complete: str | None = None

    @classmethod
    def columns(cls) -> tuple[str, ...]:
        return tuple(f.name for f in dataclasses.fields(cls))

    @classmethod
    def from_row(cls: type[R], row: Mapping[str, Any], *, unknown: str = "error") -> R:
        """A record from a row: dicts and lists are stored as JSON (the plan), a missing column is
        None, ``NOT_RECORDED`` keys are left out. A key that is no column raises ``ValueError``
        (``unknown="error"``, for what is written) or is left out (``unknown="ignore"``, for what
        is read: a file written by a later version)."""
        columns = cls.columns()
        extra = sorted(k for k in row if k not in columns and k not in NOT_RECORDED)
        if extra and unknown == "error":
            raise ValueError(f"unknown {cls.__name__} column(s): {', '.join(map(str, extra))}")
        values = {k: row[k] for k in columns if k in row}
        for k, v in values.items():
            if isinstance(v, (dict, list)):
                values[k] = json.dumps(v)
        return cls(**values)

    def to_row(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in self.columns()}

    # the read-only mapping of the columns
    def __getitem__(self, key: str) -> Any:
        if key not in self.columns():
            raise KeyError(key)
        return getattr(self, key)

    def __iter__(self) -> Iterator[str]:
        return iter(self.columns())

    def __len__(self) -> int:
        return len(self.columns())


R = TypeVar("R", bound=TrialRecord)


@dataclass(frozen=True, kw_only=True)
class FrontRecord(TrialRecord):
    """A member of the Pareto front (pareto.parquet): the trial's record, its test accuracy and
    whether it is the knee and the best within the budget (``_pareto.mark_front``)."""

    test_acc: float | None = None
    is_knee: bool | None = None
    is_best: bool | None = None
    # without a latency target: the member timed on this CPU after the search (front_latency.json)
    cpu_latency_ms: float | None = None
    cpu_latency_ratio: float | None = None


_ARROW = {int: pa.int64(), float: pa.float64(), str: pa.string(), bool: pa.bool_()}


def schema_of(record: type[TrialRecord]) -> pa.Schema:
    """The Arrow schema of a record class: one nullable column per field, in field order."""
    hints = typing.get_type_hints(record)
    out = []
    for f in dataclasses.fields(record):
        hint = hints[f.name]  # ``T | None``, or ``T`` for a column never null (the trial number)
        (kind,) = [t for t in typing.get_args(hint) or (hint,) if t is not type(None)]
        out.append(pa.field(f.name, _ARROW[kind]))
    return pa.schema(out)


TRIAL_SCHEMA = schema_of(TrialRecord)
FRONT_SCHEMA = schema_of(FrontRecord)


def rows_to_table(rows: Iterable[Mapping[str, Any]], record: type[TrialRecord] = TrialRecord) -> pa.Table:
    """The table of the rows, each through ``record.from_row``: a key that is no column of
    ``record`` raises ``ValueError`` (it would otherwise be lost)."""
    records = [r if type(r) is record else record.from_row(r) for r in rows]
    schema = schema_of(record)
    columns = {f.name: pa.array([getattr(r, f.name) for r in records], type=f.type) for f in schema}
    return pa.table(columns, schema=schema)


def records_of(table: pa.Table, record: type[R]) -> list[R]:
    """The table's rows as records, by trial number. A column the table lacks (a file written
    before it was added) reads as None; one the record lacks is left out."""
    rows = (record.from_row(row, unknown="ignore") for row in table.to_pylist())
    return sorted(rows, key=lambda r: r.trial)


def read_records(path: str, record: type[R]) -> list[R]:
    """trials.parquet (``TrialRecord``) or pareto.parquet (``FrontRecord``) as records."""
    return records_of(read_table(path), record)


def write_parquet(table: pa.Table, path: str) -> None:
    """Write atomically: a reader never sees a half-written file."""
    atomic_write(path, lambda tmp: pq.write_table(table, tmp))


def read_table(path: str) -> pa.Table:
    """Read a table another process may be replacing (``write_parquet``) at the same time.

    ``pq.read_table(path)`` looks the file up more than once (its size, then its pages), so a
    replace in between makes it read the new file at the old file's offsets ("Couldn't deserialize
    thrift"). One open handle reads the file it opened, whole, into memory (trial tables are
    small). ``ParquetFile.read`` rather than ``pq.read_table``: after the latter read an empty
    table, pyarrow 26 aborted processes at exit ("terminate called without an active exception")
    on a busy machine; seen often under load, not reproducible when idle."""
    with open(path, "rb") as f:
        data = f.read()
    return pq.ParquetFile(pa.BufferReader(data)).read()
