"""The report as a document: its number formats, its blocks (headings, text, tables, figures,
cards) and their rendering to one self-contained HTML page and to Markdown."""

from __future__ import annotations

import base64
import html
import math
import os
import re
import shlex
from dataclasses import dataclass
from typing import Any

import pandas as pd

__all__ = [
    "Doc",
    "ReportFigure",
    "fmt_acc",
    "fmt_command",
    "fmt_count",
    "fmt_delta",
    "fmt_ms",
    "fmt_pct",
    "fmt_seconds",
    "markdown_table",
    "missing",
    "natural_key",
    "render_html",
    "render_markdown",
]


# -- formatting ------------------------------------------------------------------------------
def missing(v: Any) -> bool:
    return v is None or (isinstance(v, float) and math.isnan(v))


def fmt_acc(v: Any) -> str:
    return "—" if missing(v) else f"{100 * float(v):.2f} %"


def fmt_pct(v: Any, digits: int = 1) -> str:
    return "—" if missing(v) else f"{100 * float(v):.{digits}f} %"


def fmt_delta(v: Any, base: Any) -> str:
    return "—" if missing(v) or missing(base) else f"{100 * (float(v) - float(base)):+.2f} pp"


def fmt_count(v: Any) -> str:
    if missing(v):
        return "—"
    v = float(v)
    for scale, unit in ((1e9, " G"), (1e6, " M"), (1e3, " k")):
        if abs(v) >= scale:
            return f"{v / scale:.3g}{unit}"
    return f"{v:.0f}"


def fmt_ms(v: Any) -> str:
    return "—" if missing(v) else f"{float(v):.3g} ms"


def fmt_seconds(v: float) -> str:
    v = float(v)
    if v < 59.95:
        return f"{v:.1f} s"
    minutes, s = divmod(round(v), 60)
    if minutes < 60:
        return f"{minutes} min {s:02d} s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min"


def fmt_command(record: dict[str, Any]) -> str:
    argv = [str(a) for a in record.get("command") or []]
    if not argv:
        return "—"
    if os.path.basename(argv[0]) in ("fga-search", "_cli.py", "__main__.py") or argv[0].endswith(
        "fga_search"
    ):
        argv[0] = "fga-search"
    return shlex.join(argv)


def natural_key(name: str) -> list[Any]:
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name)]


# -- tables ----------------------------------------------------------------------------------
def markdown_table(df: pd.DataFrame) -> str:
    """A GitHub-flavoured Markdown table of a DataFrame's (already formatted) cells."""

    def cell(v: Any) -> str:
        text = "—" if missing(v) else str(v)
        return text.replace("|", "\\|").replace("\n", " ")

    cols = [cell(c) for c in df.columns]
    lines = ["| " + " | ".join(cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    for values in df.itertuples(index=False):
        lines.append("| " + " | ".join(cell(v) for v in values) + " |")
    return "\n".join(lines)


def _html_table(df: pd.DataFrame, table_id: str, classes: str = "data", header: bool = True) -> str:
    return df.to_html(
        index=False, header=header, border=0, classes=classes, table_id=table_id, na_rep="—", escape=True
    )


@dataclass(frozen=True)
class ReportFigure:
    name: str  # file stem in report_files/
    title: str
    caption: str
    png: bytes


@dataclass
class Doc:
    """The report as a list of blocks, rendered to HTML and to Markdown."""

    blocks: list[tuple[str, Any]]

    def heading(self, text: str, anchor: str) -> None:
        self.blocks.append(("h2", (text, anchor)))

    def text(self, text: str) -> None:
        self.blocks.append(("p", text))

    def table(self, df: pd.DataFrame, table_id: str, classes: str = "data", *, header: bool = True) -> None:
        self.blocks.append(("table", (df, table_id, classes, header)))

    def figure(self, fig: ReportFigure) -> None:
        self.blocks.append(("figure", fig))

    def cards(self, cards: list[tuple[str, list[tuple[str, str]]]]) -> None:
        self.blocks.append(("cards", cards))


_INLINE = re.compile(r"`([^`]+)`|\*\*([^*]+)\*\*")


def _inline_html(text: str) -> str:
    """Markdown's `code` and **bold** in a paragraph, the rest escaped."""
    out, pos = [], 0
    for m in _INLINE.finditer(text):
        out.append(html.escape(text[pos : m.start()]))
        if m.group(1) is not None:
            out.append(f"<code>{html.escape(m.group(1))}</code>")
        else:
            out.append(f"<strong>{html.escape(m.group(2))}</strong>")
        pos = m.end()
    out.append(html.escape(text[pos:]))
    return "".join(out)


_CSS = """
:root { --ink: #1d2330; --muted: #5d6677; --line: #e3e6ec; --accent: #d1495b; --bg: #f6f7f9; }
* { box-sizing: border-box; }
body { margin: 0; background: var(--bg); color: var(--ink);
       font: 15px/1.5 -apple-system, "Segoe UI", Roboto, "Helvetica Neue", Arial, sans-serif; }
main { max-width: 1120px; margin: 0 auto; padding: 28px 28px 48px; }
header { border-bottom: 3px solid var(--accent); margin-bottom: 8px; padding-bottom: 10px; }
h1 { font-size: 26px; margin: 0 0 4px; }
h2 { font-size: 19px; margin: 30px 0 10px; padding-bottom: 4px; border-bottom: 1px solid var(--line); }
.sub { color: var(--muted); margin: 0; word-break: break-all; }
p { margin: 8px 0; }
code { font: 13px/1.4 "SFMono-Regular", Menlo, Consolas, monospace; background: #eceef2;
       padding: 1px 5px; border-radius: 4px; word-break: break-word; }
table { border-collapse: collapse; background: #fff; margin: 8px 0 4px; font-size: 14px;
        box-shadow: 0 1px 2px rgba(0,0,0,.06); }
th, td { padding: 5px 11px; border-bottom: 1px solid var(--line); text-align: right; white-space: nowrap; }
th { background: #eef0f4; font-weight: 600; }
td:first-child, th:first-child { text-align: left; }
tbody tr:hover { background: #fbf3f4; }
table.kv td { white-space: normal; text-align: left; }
table.kv td:first-child { color: var(--muted); width: 190px; }
.scroll { overflow-x: auto; }
.cards { display: flex; gap: 16px; flex-wrap: wrap; margin: 8px 0; }
.card { flex: 1 1 300px; background: #fff; border-radius: 8px; padding: 12px 16px;
        border-top: 4px solid var(--accent); box-shadow: 0 1px 3px rgba(0,0,0,.08); }
.card h3 { margin: 0 0 6px; font-size: 16px; }
.card dl { display: grid; grid-template-columns: auto 1fr; gap: 2px 14px; margin: 0; }
.card dt { color: var(--muted); }
.card dd { margin: 0; }
figure { margin: 10px 0 6px; background: #fff; border-radius: 8px; padding: 10px;
         box-shadow: 0 1px 3px rgba(0,0,0,.08); }
figure img { display: block; max-width: 100%; height: auto; margin: 0 auto; }
figcaption { color: var(--muted); font-size: 13px; margin-top: 6px; }
table#layers th, table#layers td { padding: 5px 8px; }
footer { margin-top: 36px; color: var(--muted); font-size: 13px; }
"""


def render_html(doc: Doc, *, title: str, subtitle: str, footer: str) -> str:
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        '<link rel="icon" href="data:,">',
        f"<title>{html.escape(title)}</title>",
        f"<style>{_CSS}</style>",
        "</head><body><main>",
        f'<header><h1>{html.escape(title)}</h1><p class="sub">{html.escape(subtitle)}</p></header>',
    ]
    for kind, value in doc.blocks:
        if kind == "h2":
            text, anchor = value
            parts.append(f'<h2 id="{anchor}">{html.escape(text)}</h2>')
        elif kind == "p":
            parts.append(f"<p>{_inline_html(value)}</p>")
        elif kind == "table":
            df, table_id, classes, header = value
            parts.append(f'<div class="scroll">{_html_table(df, table_id, classes, header)}</div>')
        elif kind == "figure":
            data = base64.b64encode(value.png).decode("ascii")
            parts.append(
                f'<figure><img id="plot-{value.name}" alt="{html.escape(value.title)}" '
                f'src="data:image/png;base64,{data}">'
                f"<figcaption>{_inline_html(value.caption)}</figcaption></figure>"
            )
        elif kind == "cards":
            parts.append('<div class="cards">')
            for heading, items in value:
                rows = "".join(f"<dt>{html.escape(k)}</dt><dd>{_inline_html(v)}</dd>" for k, v in items)
                parts.append(f'<div class="card"><h3>{html.escape(heading)}</h3><dl>{rows}</dl></div>')
            parts.append("</div>")
    parts.append(f"<footer>{html.escape(footer)}</footer></main></body></html>")
    return "\n".join(parts) + "\n"


def render_markdown(doc: Doc, *, title: str, subtitle: str, footer: str, files: str) -> str:
    parts = [f"# {title}", "", subtitle, ""]
    for kind, value in doc.blocks:
        if kind == "h2":
            parts += [f"## {value[0]}", ""]
        elif kind == "p":
            parts += [value, ""]
        elif kind == "table":
            parts += [markdown_table(value[0]), ""]
        elif kind == "figure":
            parts += [f"![{value.title}]({files}/{value.name}.png)", "", f"*{value.caption}*", ""]
        elif kind == "cards":
            for heading, items in value:
                parts += [f"**{heading}**", ""]
                parts += [f"* {k}: {v}" for k, v in items]
                parts.append("")
    parts += ["---", "", footer, ""]
    return "\n".join(parts)
