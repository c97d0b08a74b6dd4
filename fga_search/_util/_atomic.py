"""The one way fga-search writes a file: whole or not at all.

``atomic_write`` writes into a temporary file beside the target and renames it over the target;
on any failure (a full disk, an interrupt) the temporary file is removed and the target is left
as it was. A reader never sees half a file and a failed write leaves nothing behind.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from typing import Any

__all__ = ["atomic_write", "atomic_write_bytes", "atomic_write_json"]


def _commit(tmp: str, path: str) -> None:
    os.replace(tmp, path)


def atomic_write(path: str, write: Callable[[str], object]) -> None:
    """Call ``write(tmp)`` to fill a temporary file, then rename it to ``path`` atomically."""
    tmp = f"{path}.{os.getpid()}.tmp"
    try:
        write(tmp)
        _commit(tmp, path)
    except BaseException:
        try:
            os.remove(tmp)
        except OSError:
            pass
        raise


def atomic_write_bytes(path: str, data: bytes) -> None:
    def write(tmp: str) -> None:
        with open(tmp, "wb") as f:
            f.write(data)

    atomic_write(path, write)


def atomic_write_json(path: str, data: Any, *, indent: int | None = 2) -> None:
    """``data`` as JSON (sorted keys, a final newline), written atomically."""
    atomic_write_bytes(path, (json.dumps(data, indent=indent, sort_keys=True) + "\n").encode())
