"""Helpers shared by the command-line tests."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq


def cli_env(home: Path) -> dict[str, str]:
    env = dict(os.environ)
    env["HOME"] = str(home)
    env.pop("XDG_CACHE_HOME", None)
    env["PYTHONUNBUFFERED"] = "1"
    return env


def run_cli(
    args: list[str], *, home: Path, cwd: Path | None = None, timeout: float = 600
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "fga_search._cli", *args],
        cwd=cwd or home,
        env=cli_env(home),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def rows(path: Path) -> list[dict]:
    return pq.read_table(path).to_pylist()
