"""Errors shown to users: one line each."""

from __future__ import annotations

import errno
import os

__all__ = ["first_line", "os_error_line", "shorten"]


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message, or its type's name when it has none."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def shorten(value: object, limit: int = 80) -> str:
    """``str(value)``, cut to ``limit`` characters with the count of those left out: for messages
    that show a user's value, which may be huge."""
    text = value if isinstance(value, str) else repr(value)
    if len(text) <= limit:
        return text
    return f"{text[:limit]}... ({len(text) - limit} more characters)"


_OS_ERRORS = {
    errno.ENOSPC: "no space left on the device",
    errno.EDQUOT: "disk quota exceeded",
    errno.EROFS: "read-only file system",
    errno.ENAMETOOLONG: "file name too long",
}


def os_error_line(exc: OSError) -> str:
    """One line for an ``OSError``: what the file system refused, and where."""
    what = _OS_ERRORS.get(exc.errno or 0) or exc.strerror or first_line(exc)
    where = exc.filename if exc.filename is not None else None
    if where is None:
        return what
    if isinstance(where, bytes):
        where = os.fsdecode(where)
    return f"{what}: {shorten(str(where), 200)}"
