"""``--storage`` URLs: checked before anything is written, and never recorded with a password."""

from __future__ import annotations

import os
from typing import Any

from ._errors import first_line, shorten

__all__ = ["check_storage_url", "open_storage", "redact_command", "redact_url"]


def _parse(url: str) -> Any:
    from sqlalchemy.engine import make_url

    try:
        return make_url(url)
    except Exception:
        return None


def redact_url(url: str) -> str:
    """``url`` with its password replaced by ``***`` (a URL that cannot be parsed: hidden whole
    when it may hold credentials)."""
    parsed = _parse(url)
    if parsed is None:
        return "<unparseable URL>" if "@" in url else url
    return str(parsed.render_as_string(hide_password=True))


def check_storage_url(url: str) -> None:
    """Refuse a ``--storage`` that is not an SQLAlchemy URL of an installed database driver, or a
    SQLite file in a folder that does not exist (``ValueError``). Connects to nothing."""
    shown = shorten(redact_url(url))
    parsed = _parse(url) if isinstance(url, str) else None
    if parsed is None:
        raise ValueError(
            f"--storage {shown!r} is not a database URL (such as sqlite:///path/study.db or "
            "postgresql://user@host/db)"
        )
    try:
        parsed.get_dialect()
    except Exception:
        raise ValueError(
            f"--storage {shown!r}: no database driver for {parsed.drivername!r} is installed"
        ) from None
    if parsed.get_backend_name() == "sqlite":
        database = parsed.database
        if not database or database == ":memory:":
            raise ValueError(
                f"--storage {shown!r} names no SQLite file (an in-memory study cannot be resumed)"
            )
        folder = os.path.dirname(os.path.abspath(database))
        if not os.path.isdir(folder):
            raise ValueError(f"--storage {shown!r}: folder {folder} does not exist")
        if os.path.isdir(database):
            raise ValueError(f"--storage {shown!r}: {database} is a folder")


def open_storage(url: str) -> Any:
    """Optuna's storage for ``url``, opened (and its schema created) before the run folder is
    made, so that a storage that cannot be used writes no run folder (``ValueError``)."""
    import optuna

    check_storage_url(url)
    try:
        return optuna.storages.RDBStorage(url)
    except Exception as exc:
        message = first_line(exc)
        parsed = _parse(url)
        if parsed is not None and parsed.password:
            message = message.replace(str(parsed.password), "***")
        raise ValueError(f"cannot open --storage {shorten(redact_url(url))!r}: {message}") from None


def redact_command(argv: list[str]) -> list[str]:
    """A command line with the password of its ``--storage`` URL (if any) redacted."""
    out = list(argv)
    for i, arg in enumerate(out):
        if arg.startswith("--storage="):
            out[i] = "--storage=" + redact_url(arg[len("--storage=") :])
        elif arg == "--storage" and i + 1 < len(out):
            out[i + 1] = redact_url(out[i + 1])
    return out
