from __future__ import annotations

import os
import threading
from pathlib import Path

import pytest

from fga_search.runs._records import TRIAL_SCHEMA, read_table, rows_to_table, write_parquet


def table_of(n: int) -> object:
    return rows_to_table(
        [{"trial": i, "state": "COMPLETE", "plan": {"conv": [2, 4 + n]}, "val_acc": 0.5} for i in range(n)]
    )


def test_rows_round_trip_with_the_schema_and_json_plans(tmp_path: Path) -> None:
    path = str(tmp_path / "trials.parquet")
    write_parquet(table_of(3), path)
    table = read_table(path)
    assert table.schema.equals(TRIAL_SCHEMA)
    got = table.to_pylist()
    assert [r["trial"] for r in got] == [0, 1, 2]
    assert got[2]["plan"] == '{"conv": [2, 7]}' and got[0]["latency_ms"] is None
    assert os.listdir(tmp_path) == ["trials.parquet"]  # no temporary file left behind


@pytest.mark.parametrize("sizes", [(1, 40), (5, 7, 60)])
def test_reads_while_another_writer_replaces_the_file_see_whole_tables(
    tmp_path: Path, sizes: tuple[int, ...]
) -> None:
    # What `fga-search report` (or a test) does while a search rewrites trials.parquet after each
    # trial. pq.read_table(path) failed here on about a third of the reads ("Couldn't deserialize
    # thrift") when the file was replaced between its size lookup and its page reads.
    path = str(tmp_path / "trials.parquet")
    tables = [table_of(n) for n in sizes]
    write_parquet(tables[0], path)
    stop = threading.Event()

    def writer() -> None:
        i = 0
        while not stop.is_set():
            i += 1
            write_parquet(tables[i % len(tables)], path)

    thread = threading.Thread(target=writer)
    thread.start()
    seen: list[int] = []
    errors: list[str] = []
    try:
        for _ in range(600):
            try:
                seen.append(read_table(path).num_rows)
            except OSError as e:
                errors.append(str(e))
    finally:
        stop.set()
        thread.join()
    assert errors == []
    assert set(seen) <= set(sizes) and len(set(seen)) >= 2  # the file did change under the reader


def test_the_schema_is_the_records_fields() -> None:
    import dataclasses

    import pyarrow as pa

    from fga_search.runs._records import FRONT_SCHEMA, FrontRecord, TrialRecord

    assert (
        TRIAL_SCHEMA.names == [f.name for f in dataclasses.fields(TrialRecord)] == list(TrialRecord.columns())
    )
    assert len(TRIAL_SCHEMA) == 45  # one column per field, none written twice
    types = dict(zip(TRIAL_SCHEMA.names, TRIAL_SCHEMA.types))
    assert types["trial"] == pa.int64() and types["val_acc"] == pa.float64()
    assert types["within_budget"] == pa.bool_() and types["plan"] == pa.string()
    assert FRONT_SCHEMA.names == [
        *TRIAL_SCHEMA.names,
        "test_acc",
        "is_knee",
        "is_best",
        "cpu_latency_ms",
        "cpu_latency_ratio",
    ]
    assert FRONT_SCHEMA.field("is_knee").type == pa.bool_()
    assert list(FrontRecord.columns()) == FRONT_SCHEMA.names


def test_records_convert_and_read_as_mappings() -> None:
    from fga_search.runs._records import TrialRecord

    row = {
        "trial": 3,
        "state": "COMPLETE",
        "val_acc": 0.9,
        "plan": {"conv": [2, 4]},
        "alloc_weights": {"conv": 1.0},
    }
    record = TrialRecord.from_row(row)
    assert record.trial == 3 and record.val_acc == 0.9 and record.plan == '{"conv": [2, 4]}'
    assert record.latency_ms is None and record["val_acc"] == 0.9 and record.get("test_acc") is None
    assert dict(record) == record.to_row() and len(record.to_row()) == len(TRIAL_SCHEMA)
    assert "alloc_weights" not in record.to_row()  # kept in the study, not in trials.parquet
    assert TrialRecord.from_row(record.to_row()) == record
    with pytest.raises(KeyError):
        record["alloc_weights"]


def test_an_unknown_column_is_an_error_not_dropped(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unknown TrialRecord column.*seconds_warmup"):
        rows_to_table([{"trial": 0, "state": "COMPLETE"}, {"trial": 1, "seconds_warmup": 1.5}])
    # what each trial measures is a column: the latency phase's seconds were dropped before
    table = rows_to_table([{"trial": 0, "seconds_latency": 0.25, "constraint": 0.0}])
    assert table.to_pylist()[0]["seconds_latency"] == 0.25


def test_an_old_file_without_newer_columns_reads_them_as_none(tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    from fga_search.runs._records import FrontRecord, TrialRecord, read_records

    old = pa.table({"trial": pa.array([2, 1], pa.int64()), "val_acc": [0.5, 0.75], "old_column": ["x", "y"]})
    path = str(tmp_path / "trials.parquet")
    pq.write_table(old, path)
    records = read_records(path, TrialRecord)
    assert [r.trial for r in records] == [1, 2]  # by trial number
    assert (
        records[0].val_acc == 0.75 and records[0].latency_aim is None and records[0].seconds_latency is None
    )
    front = read_records(path, FrontRecord)
    assert front[1].is_knee is None and front[1].cpu_latency_ms is None
    # and a rewrite has the current schema, the unknown column left out
    write_parquet(rows_to_table(records), path)
    assert read_table(path).schema.equals(TRIAL_SCHEMA)
