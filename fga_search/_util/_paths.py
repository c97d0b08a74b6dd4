"""Checks of the paths a command will write to, made before anything is written."""

from __future__ import annotations

import os

from ._errors import shorten

__all__ = ["check_out_path"]


def _limits(path: str) -> tuple[int, int]:
    """(longest name, longest path) on the file system that would hold ``path``."""
    parent = path
    while not os.path.isdir(parent) and os.path.dirname(parent) != parent:
        parent = os.path.dirname(parent)
    try:
        return os.pathconf(parent, "PC_NAME_MAX"), os.pathconf(parent, "PC_PATH_MAX")
    except (OSError, ValueError, AttributeError):
        return 255, 4096


def check_out_path(out: str | os.PathLike[str], *, option: str = "--out") -> None:
    """Refuse an output path that no file system can create: empty, with a NUL byte, a name in
    it longer than the file system allows, or too long as a whole (``ValueError``)."""
    if isinstance(out, os.PathLike):
        out = os.fspath(out)
    if not isinstance(out, str) or not out.strip():
        raise ValueError(f"{option} must be a folder path, got {out!r}")
    if "\0" in out:
        raise ValueError(f"{option} {shorten(out)!r} holds a NUL byte")
    path = os.path.abspath(out)
    existing = path
    while not os.path.lexists(existing):
        existing = os.path.dirname(existing)
    if existing != path and not os.path.isdir(existing):
        raise ValueError(f"{option} {path}: cannot create it, {existing} is not a folder")
    name_max, path_max = _limits(path)
    for name in path.split(os.sep):
        size = len(os.fsencode(name))
        if size > name_max:
            raise ValueError(
                f"{option} {shorten(out)!r}: the name {shorten(name)!r} is {size} bytes long, over the "
                f"file system's limit of {name_max}"
            )
    size = len(os.fsencode(path))
    if size >= path_max:
        raise ValueError(
            f"{option} {shorten(out)!r} is {size} bytes long, over the file system's limit of {path_max}"
        )
