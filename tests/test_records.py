from __future__ import annotations

import os
import threading
from pathlib import Path

import pytest

from fga_search._records import TRIAL_SCHEMA, read_table, rows_to_table, write_parquet


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
