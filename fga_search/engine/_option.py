"""A dataclass field's command-line option, carried in the field's metadata: how
:class:`fga_search.RunConfig` is the one definition of ``fga-search``'s options."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import MISSING, Field, dataclass, field, fields
from typing import Any

__all__ = ["Option", "flag_of", "option", "option_of", "options_doc"]


@dataclass(frozen=True)
class Option:
    """A field's command-line option: ``--NAME`` (dashes for underscores; a bool field that
    defaults to True is ``--no-NAME``), typed as the field, with the field's default.

    ``help`` may name ``{default}`` and ``{quickstart}``; ``group``: its heading in ``--help``;
    ``quickstart``: the value without ``--model`` (the quickstart) where it differs from the
    default, which then applies only with a ``--model``."""

    help: str
    group: str
    choices: Sequence[str] | None = None
    metavar: str | None = None
    quickstart: object = None

    def text(self, default: object) -> str:
        return self.help.format(default=default, quickstart=self.quickstart)


def option(default: Any = MISSING, *, help: str, group: str, **cli: Any) -> Any:
    """A dataclass field with this default and command-line option."""
    return field(default=default, metadata={"cli": Option(help, group, **cli)})


def option_of(f: Field[Any]) -> Option | None:
    """A field's command-line option, or None for a field the API alone sets
    (``field(metadata={"cli": None})``); a field with neither is a ``KeyError``."""
    return f.metadata["cli"]


def flag_of(f: Field[Any]) -> str:
    """The field's command-line flag: ``--NAME``, or ``--no-NAME`` for a bool that defaults to True."""
    return f"--{'no-' if f.default is True else ''}{f.name.replace('_', '-')}"


def options_doc(cls: type) -> str:
    """Each field of the dataclass ``cls``, by its option's group: its default, flag, choices and help."""
    lines, group = [], None
    for f in fields(cls):
        cli = option_of(f)
        if cli is None:
            continue
        if cli.group != group:
            group = cli.group
            lines.append(f"\n    {group}:\n")
        default = "required" if f.default is MISSING else f"{f.default!r}"
        choices = f", one of {', '.join(cli.choices)}" if cli.choices else ""
        lines.append(f"    * ``{f.name}`` = {default} (``{flag_of(f)}``{choices}): {cli.text(f.default)}.")
    return "\n".join(lines)
