"""Trial records: one row per trial, the same schema for every backend, written as Parquet."""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from ._atomic import atomic_write

__all__ = ["TRIAL_SCHEMA", "read_table", "rows_to_table", "write_parquet"]

TRIAL_SCHEMA = pa.schema(
    [
        ("trial", pa.int64()),
        ("state", pa.string()),  # COMPLETE, FAIL, RUNNING, WAITING
        ("status", pa.string()),  # ok, infeasible, failed, duplicate, interrupted
        ("fail_reason", pa.string()),
        ("val_acc", pa.float64()),
        ("proxy_acc", pa.float64()),
        ("flops_ratio", pa.float64()),
        ("params_ratio", pa.float64()),
        ("macs", pa.int64()),
        ("macs_measured", pa.int64()),
        ("params", pa.int64()),
        ("latency_ms", pa.float64()),
        ("latency_ratio", pa.float64()),
        ("latency_estimate_ratio", pa.float64()),  # the lookup table's estimate, before the model is built
        ("latency_aim", pa.float64()),  # latency budgets: what the repair aimed at (_latency_aim)
        ("within_budget", pa.bool_()),
        ("proposal_within_budget", pa.bool_()),
        ("budget_metric", pa.string()),
        ("budget", pa.float64()),
        ("layers_decomposed", pa.int64()),
        ("plan", pa.string()),  # JSON
        ("source", pa.string()),  # sampler, requeued, or the rule that made the plan (warm start, strategy)
        ("epochs", pa.float64()),
        ("finetune_steps", pa.int64()),
        ("seed", pa.int64()),
        ("device", pa.string()),
        ("backend", pa.string()),
        ("node_id", pa.string()),
        ("node_ip", pa.string()),
        ("gpu_ids", pa.string()),
        ("seconds_decompose", pa.float64()),
        ("seconds_recalibrate", pa.float64()),
        ("seconds_proxy", pa.float64()),
        ("seconds_finetune", pa.float64()),
        ("seconds_eval", pa.float64()),
        ("seconds_flops", pa.float64()),
        ("seconds_total", pa.float64()),
        ("duplicate_of", pa.int64()),
        ("requeued_from", pa.int64()),
        ("datetime_start", pa.string()),
        ("datetime_complete", pa.string()),
    ]
)


def rows_to_table(rows: Iterable[Mapping[str, Any]], schema: pa.Schema = TRIAL_SCHEMA) -> pa.Table:
    rows = list(rows)
    columns = {}
    for f in schema:
        values = []
        for row in rows:
            v = row.get(f.name)
            if isinstance(v, (dict, list)):
                v = json.dumps(v)
            values.append(v)
        columns[f.name] = pa.array(values, type=f.type)
    return pa.table(columns, schema=schema)


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
