"""The run report: ``report.html`` (one self-contained file) and ``report.md`` (+ ``report_files/``).

The HTML file opens offline: its plots are inline PNGs (base64 data URIs) and its style is inline;
it references nothing outside itself. The Markdown file holds the same tables and links the same
plots, written as PNG files to ``report_files/`` beside it.
"""

from __future__ import annotations

import base64
import html
import io
import math
import os
import re
import shlex
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import pandas as pd

from ._atomic import atomic_write_bytes
from ._pareto import hypervolume
from ._plan import KEEP, load_plan
from ._runview import RunView, is_usable, read_run

__all__ = ["write_report"]

_COLORS = {
    "trial": "#7aa6d6",
    "front": "#d1495b",
    "infeasible": "#e09f3e",
    "failed": "#555555",
    "original": "#1b1b1b",
    "budget": "#2a9d8f",
    "knee": "#6a4c93",
    "best": "#d1495b",
}


# -- formatting ------------------------------------------------------------------------------
def _missing(v: Any) -> bool:
    return v is None or (isinstance(v, float) and math.isnan(v))


def _acc(v: Any) -> str:
    return "—" if _missing(v) else f"{100 * float(v):.2f} %"


def _pct(v: Any, digits: int = 1) -> str:
    return "—" if _missing(v) else f"{100 * float(v):.{digits}f} %"


def _delta(v: Any, base: Any) -> str:
    return "—" if _missing(v) or _missing(base) else f"{100 * (float(v) - float(base)):+.2f} pp"


def _count(v: Any) -> str:
    if _missing(v):
        return "—"
    v = float(v)
    for scale, unit in ((1e9, " G"), (1e6, " M"), (1e3, " k")):
        if abs(v) >= scale:
            return f"{v / scale:.3g}{unit}"
    return f"{v:.0f}"


def _ms(v: Any) -> str:
    return "—" if _missing(v) else f"{float(v):.3g} ms"


def _seconds(v: float) -> str:
    v = float(v)
    if v < 59.95:
        return f"{v:.1f} s"
    minutes, s = divmod(round(v), 60)
    if minutes < 60:
        return f"{minutes} min {s:02d} s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min"


def _command(record: dict[str, Any]) -> str:
    argv = [str(a) for a in record.get("command") or []]
    if not argv:
        return "—"
    if os.path.basename(argv[0]) in ("fga-search", "_cli.py", "__main__.py") or argv[0].endswith(
        "fga_search"
    ):
        argv[0] = "fga-search"
    return shlex.join(argv)


def _natural(name: str) -> list[Any]:
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name)]


# -- tables ----------------------------------------------------------------------------------
def markdown_table(df: pd.DataFrame) -> str:
    """A GitHub-flavoured Markdown table of a DataFrame's (already formatted) cells."""

    def cell(v: Any) -> str:
        text = "—" if _missing(v) else str(v)
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
class _Figure:
    name: str  # file stem in report_files/
    title: str
    caption: str
    png: bytes


@dataclass
class _Doc:
    """The report as a list of blocks, rendered to HTML and to Markdown."""

    blocks: list[tuple[str, Any]]

    def heading(self, text: str, anchor: str) -> None:
        self.blocks.append(("h2", (text, anchor)))

    def text(self, text: str) -> None:
        self.blocks.append(("p", text))

    def table(self, df: pd.DataFrame, table_id: str, classes: str = "data", *, header: bool = True) -> None:
        self.blocks.append(("table", (df, table_id, classes, header)))

    def figure(self, fig: _Figure) -> None:
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


def _render_html(doc: _Doc, *, title: str, subtitle: str, footer: str) -> str:
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


def _render_markdown(doc: _Doc, *, title: str, subtitle: str, footer: str, files: str) -> str:
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


# -- plots -----------------------------------------------------------------------------------
def _new_figure(width: float = 7.6, height: float = 4.4) -> Any:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=110, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _png(fig: Any) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", facecolor="white")
    return buf.getvalue()


def _ratio_axis(ax: Any, values: Sequence[float]) -> None:
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    lo = max(min([*values, 1.0]) * 0.8, 1e-4)
    ax.set_xscale("log")
    ax.set_xlim(lo, 1.25)
    ticks = [t for t in (0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.3, 0.5, 1.0) if lo <= t <= 1.25]
    ax.set_xticks(ticks)
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{100 * v:g} %"))
    ax.xaxis.set_minor_locator(LogLocator(subs="all"))
    ax.xaxis.set_minor_formatter(NullFormatter())


def _scatter_plot(
    view: RunView, key: str, label: str, *, budget: float | None, name: str, title: str, caption: str
) -> _Figure:
    base = view.baseline
    fig = _new_figure()
    ax = fig.add_subplot()
    usable = [r for r in view.usable if not _missing(r.get(key))]
    front = [r for r in view.front if not _missing(r.get(key))]
    front_ids = {r["trial"] for r in front}
    others = [r for r in usable if r["trial"] not in front_ids]
    infeasible = [r for r in view.rows if r.get("status") == "infeasible" and not _missing(r.get(key))]
    failed = [r for r in view.rows if r.get("state") == "FAIL" and not _missing(r.get(key))]
    accs = [r["val_acc"] for r in usable]
    base_acc = base.get("val_acc")
    if not _missing(base_acc):
        accs.append(base_acc)
    lo, hi = (min(accs), max(accs)) if accs else (0.0, 1.0)
    span = max(hi - lo, 0.01)
    ax.set_ylim(lo - 0.16 * span, hi + 0.1 * span)
    ax.yaxis.set_major_formatter(lambda v, _: f"{100 * v:.1f} %" if v >= lo - 0.02 * span else "")
    xs = [r[key] for r in [*usable, *infeasible, *failed]]
    _ratio_axis(ax, xs)
    ax.grid(True, which="major", color="#e6e6e6", lw=0.8)
    ax.set_axisbelow(True)
    if others:
        ax.scatter(
            [r[key] for r in others],
            [r["val_acc"] for r in others],
            s=22,
            color=_COLORS["trial"],
            alpha=0.75,
            label="trial (dominated)",
            zorder=2,
        )
    strip = ax.get_xaxis_transform()
    if infeasible or failed:
        from matplotlib.patches import Rectangle

        ax.add_patch(Rectangle((0, 0), 1, 0.1, transform=ax.transAxes, color="#f1f1f1", lw=0, zorder=0))
        ax.text(0.005, 0.1, "no accuracy", transform=ax.transAxes, fontsize=7, color="#777", va="bottom")
    if infeasible:
        ax.scatter(
            [r[key] for r in infeasible],
            [0.035] * len(infeasible),
            transform=strip,
            marker="x",
            s=30,
            color=_COLORS["infeasible"],
            label="infeasible (over budget, not trained)",
            zorder=3,
        )
    if failed:
        ax.scatter(
            [r[key] for r in failed],
            [0.07] * len(failed),
            transform=strip,
            marker="v",
            s=30,
            color=_COLORS["failed"],
            label="failed (no accuracy)",
            zorder=3,
        )
    if front:
        ordered = sorted(front, key=lambda r: r[key])
        ax.step(
            [r[key] for r in ordered],
            [r["val_acc"] for r in ordered],
            where="post",
            color=_COLORS["front"],
            lw=1.4,
            alpha=0.8,
            zorder=3,
        )
        ax.scatter(
            [r[key] for r in ordered],
            [r["val_acc"] for r in ordered],
            s=46,
            color=_COLORS["front"],
            edgecolor="white",
            linewidth=0.8,
            label="Pareto front",
            zorder=4,
        )
        for tag, marker, color in (("is_knee", "D", _COLORS["knee"]), ("is_best", "*", _COLORS["best"])):
            pick = next((r for r in front if r.get(tag)), None)
            if pick is None:
                continue
            ax.scatter(
                [pick[key]],
                [pick["val_acc"]],
                s=190 if marker == "*" else 90,
                marker=marker,
                facecolor="none",
                edgecolor=color,
                linewidth=1.6,
                zorder=5,
                label=("best within budget" if tag == "is_best" else "knee") + f" (trial {pick['trial']})",
            )
    if not _missing(base_acc):
        ax.scatter(
            [1.0], [base_acc], marker="*", s=170, color=_COLORS["original"], zorder=5, label="original"
        )
        ax.annotate(
            "original", (1.0, base_acc), textcoords="offset points", xytext=(-8, 7), ha="right", fontsize=8
        )
    if budget is not None:
        ax.axvline(
            budget, color=_COLORS["budget"], ls="--", lw=1.3, label=f"budget {100 * budget:g} %", zorder=1
        )
    ax.set_xlabel(label)
    ax.set_ylabel("validation accuracy")
    ax.set_title(title, fontsize=11, loc="left")
    ax.legend(loc="lower right", fontsize=8, framealpha=0.92)
    return _Figure(name, title, caption, _png(fig))


def _hypervolume_series(view: RunView) -> tuple[list[int], list[float]]:
    counts, values = [], []
    acc: list[float] = []
    cost: list[float] = []
    n = 0
    for row in view.rows:
        if row.get("state") not in ("COMPLETE", "FAIL") or row.get("status") == "interrupted":
            continue
        n += 1
        if is_usable(row) and row.get("within_budget") and not _missing(row.get("flops_ratio")):
            acc.append(float(row["val_acc"]))
            cost.append(float(row["flops_ratio"]))
        counts.append(n)
        values.append(hypervolume(acc, cost, ref=(0.0, 1.0)))
    return counts, values


def _hypervolume_plot(view: RunView) -> _Figure:
    counts, values = _hypervolume_series(view)
    fig = _new_figure(7.6, 3.0)
    ax = fig.add_subplot()
    ax.step(counts, values, where="post", color=_COLORS["front"], lw=1.6)
    ax.fill_between(counts, values, step="post", color=_COLORS["front"], alpha=0.12)
    ax.grid(True, color="#e6e6e6", lw=0.8)
    ax.set_axisbelow(True)
    ax.set_xlabel("trials finished")
    ax.set_ylabel("hypervolume")
    if values:
        ax.set_ylim(min(values) * 0.98 if min(values) > 0 else 0, max(values) * 1.02 + 1e-9)
        ax.set_xlim(0.5, max(counts) + 0.5)
    title = "Hypervolume of the front over the trials"
    ax.set_title(title, fontsize=11, loc="left")
    caption = (
        "Area dominated by the feasible trials so far in (validation accuracy, FLOPs ratio), "
        "from the reference point (0 accuracy, FLOPs ratio 1); it grows as the front improves."
    )
    return _Figure("hypervolume", title, caption, _png(fig))


# -- sections --------------------------------------------------------------------------------
def _layer_rows(view: RunView) -> list[tuple[str, str, float | None]]:
    """(layer, shape, share of the original MACs) in model order, from the base architecture when it
    can be built, else the plans' layer names in natural order."""
    names: set[str] = set()
    for row in view.front:
        if row.get("plan"):
            names.update(load_plan(row["plan"]))
    try:
        from ._flops import ModelProfile
        from ._zoo import build_model

        model = build_model(view.record["model"]["name"], num_classes=int(view.record["num_classes"]))
        profile = ModelProfile(model, input_shape=view.record["input_shape"])
    except Exception:
        return [(name, "", None) for name in sorted(names, key=_natural)]
    out: list[tuple[str, str, float | None]] = []
    for info in profile.layers:
        cost = profile.layer_cost(info, KEEP)
        if info.name not in names and info.depthwise:
            continue
        kh, kw = info.kernel_size
        groups = f", groups {info.base_groups}" if info.base_groups > 1 else ""
        shape = f"{info.in_channels}→{info.out_channels}, {kh}×{kw}{groups}"
        out.append((info.name, shape, cost.macs / profile.base_macs))
    return out


def _choice_text(choice: Any) -> str:
    if choice == KEEP or choice is None:
        return "kept"
    g, r = choice
    return f"{g}×{r}"


def _member_label(row: dict[str, Any]) -> str:
    marks = [m for m, tag in (("best", "is_best"), ("knee", "is_knee")) if row.get(tag)]
    return ", ".join(marks)


def _has_latency(view: RunView) -> bool:
    return any(not _missing(r.get("latency_ms")) for r in view.rows) or not _missing(
        view.baseline.get("latency_ms")
    )


def _build(view: RunView) -> tuple[_Doc, str, str, str]:
    record, base = view.record, view.baseline
    rows = view.rows
    model = record.get("model", {})
    data = record.get("data", {})
    config = record.get("config", {})
    latency = _has_latency(view)
    # without a latency target: the front's members timed on the CPU after the search
    cpu_timing = view.folder.read_json("front_latency.json") or {}
    cpu_latency = (
        not latency and bool(cpu_timing) and any(not _missing(r.get("cpu_latency_ms")) for r in view.front)
    )
    budget = float(config.get("budget", record.get("identity", {}).get("budget", 1.0)))
    metric = config.get("budget_metric", "flops")
    doc = _Doc([])

    # The run
    usable = view.usable
    duplicates = sum(r.get("status") == "duplicate" for r in usable)
    infeasible = sum(r.get("status") == "infeasible" for r in rows)
    failed = sum(r.get("state") == "FAIL" and r.get("status") != "interrupted" for r in rows)
    interrupted = sum(r.get("status") == "interrupted" for r in rows)
    running = sum(r.get("state") in ("RUNNING", "WAITING") for r in rows)
    finished = len(view.finished)
    starts = [r["datetime_start"] for r in rows if r.get("datetime_start")]
    ends = [r["datetime_complete"] for r in rows if r.get("datetime_complete")]
    wall = None
    if starts and ends:
        wall = (pd.Timestamp(max(ends)) - pd.Timestamp(min(starts))).total_seconds()
    device_seconds = sum(float(r["seconds_total"]) for r in rows if not _missing(r.get("seconds_total")))
    trials_text = f"{finished} finished of {config.get('trials', '?')} asked: {len(usable)} trained"
    if duplicates:
        trials_text += f" ({duplicates} of them repeated an earlier plan and reused its result)"
    trials_text += f", {infeasible} infeasible, {failed} failed"
    if interrupted:
        trials_text += f", {interrupted} interrupted and re-queued"
    if running:
        trials_text += f", {running} running"
    devices = sorted({str(r["device"]) for r in rows if r.get("device")}) or [str(record.get("device", "—"))]
    versions = record.get("versions", {})
    dataset = str(data.get("name", config.get("dataset", "—")))
    sizes = ", ".join(f"{data[k]} {k}" for k in ("train", "val", "test") if k in data)
    shape = "×".join(str(s) for s in record.get("input_shape", []))
    _, hv = _hypervolume_series(view)
    run_table = pd.DataFrame(
        [
            ("command", _command(record)),
            ("model", f"{model.get('name', '—')} ({model.get('source', '—')})"),
            ("dataset", f"{dataset}: {sizes}; input {shape}; {record.get('num_classes', '—')} classes"),
            (
                "budget",
                f"{100 * budget:g} % of the original's "
                + {"flops": "FLOPs", "params": "parameters"}.get(str(metric), str(metric)),
            ),
            (
                "search",
                f"{config.get('sampler', '—')} sampler, {config.get('epochs', '—')} fine-tuning epochs per trial, "
                f"seed {config.get('seed', '—')}, backend {config.get('backend', 'optuna')}",
            ),
            ("trials", trials_text),
            ("wall time", _seconds(wall) if wall is not None else "—"),
            (
                "device time",
                f"{_seconds(device_seconds)} (sum of the trials' seconds_total) on {', '.join(devices)}",
            ),
            ("hypervolume", f"{hv[-1]:.4f}" if hv else "—"),
            ("front", f"{len(view.front)} models (from {view.front_source})"),
            *_latency_rows(latency, cpu_latency, cpu_timing, config),
            ("created", str(record.get("created", "—"))),
            (
                "versions",
                ", ".join(
                    f"{k} {versions[k]}" for k in ("fga_search", "torch", "optuna", "python") if k in versions
                ),
            ),
        ],
        columns=["", "value"],
    )
    doc.heading("The run", "run")
    doc.table(run_table, "run", "kv", header=False)

    # The original model
    doc.heading("The original model", "baseline")
    base_cols: dict[str, list[str]] = {
        "model": [str(model.get("name", "—"))],
        "val acc": [_acc(base.get("val_acc"))],
        "test acc": [_acc(base.get("test_acc"))],
        "MACs": [_count(base.get("macs"))],
        "FLOPs": [_count(2 * base["macs"]) if not _missing(base.get("macs")) else "—"],
    }
    if latency:
        base_cols["latency"] = [_ms(base.get("latency_ms"))]
    if cpu_latency:
        base_cols["CPU latency"] = [_ms(cpu_timing.get("original_ms"))]
    base_cols["params"] = [_count(base.get("params"))]
    doc.table(pd.DataFrame(base_cols), "baseline")
    doc.text("Per image; FLOPs = 2 × MACs (multiply-accumulates), as `torch.utils.flop_counter` counts them.")

    # Picks
    doc.heading("Which model to ship", "picks")
    run_arg = shlex.quote(view.path)
    cards = []
    for heading, row, pick in (
        ("Best within the budget", view.best, "best"),
        ("Knee of the front", view.knee, "knee"),
    ):
        if row is None:
            cards.append((heading, [("trial", "none yet")]))
            continue
        items = [
            ("trial", str(row["trial"])),
            ("accuracy", f"val {_acc(row.get('val_acc'))}, test {_acc(row.get('test_acc'))}"),
            (
                "vs original",
                f"val {_delta(row.get('val_acc'), base.get('val_acc'))}, test {_delta(row.get('test_acc'), base.get('test_acc'))}",
            ),
            ("FLOPs", f"{_pct(row.get('flops_ratio'))} ({_count(row.get('macs'))} MACs)"),
        ]
        if latency:
            items.append(("latency", f"{_ms(row.get('latency_ms'))} ({_pct(row.get('latency_ratio'))})"))
        if cpu_latency:
            items.append(
                ("CPU latency", f"{_ms(row.get('cpu_latency_ms'))} ({_pct(row.get('cpu_latency_ratio'))})")
            )
        items += [
            ("params", f"{_pct(row.get('params_ratio'))} ({_count(row.get('params'))})"),
            ("export", f"`fga-search export {run_arg} --pick {pick} --out exported`"),
        ]
        cards.append((heading, items))
    doc.cards(cards)
    doc.text(
        "**Best**: the highest validation accuracy within the budget (ties: fewer FLOPs). **Knee**: the "
        "front member farthest from the line joining the front's two ends, where accuracy stops paying "
        "for FLOPs."
    )

    # Plots
    doc.heading("Pareto front", "front")
    doc.figure(
        _scatter_plot(
            view,
            "flops_ratio",
            "FLOPs (% of the original, log scale)",
            budget=budget if metric == "flops" else None,
            name="pareto-flops",
            title="Validation accuracy vs FLOPs",
            caption="Every trial; the front (red) is the non-dominated feasible trials. Infeasible and "
            "failed trials have no accuracy and are marked along the bottom at their FLOPs.",
        )
    )
    doc.figure(
        _scatter_plot(
            view,
            "params_ratio",
            "parameters (% of the original, log scale)",
            budget=budget if metric == "params" else None,
            name="pareto-params",
            title="Validation accuracy vs parameters",
            caption="The same trials against their parameter count; the front members (red) are those of "
            "the FLOPs front.",
        )
    )
    if any(not _missing(r.get("latency_ratio")) for r in rows):
        doc.figure(
            _scatter_plot(
                view,
                "latency_ratio",
                "latency (% of the original, log scale)",
                budget=budget if metric == "latency" else None,
                name="pareto-latency",
                title="Validation accuracy vs latency",
                caption="The trials whose latency was measured.",
            )
        )
    doc.figure(_hypervolume_plot(view))

    # Members
    doc.heading("Front members", "members-section")
    members: dict[str, list[Any]] = {
        k: []
        for k in (
            "trial",
            "pick",
            "val acc",
            "test acc",
            "Δ val",
            "Δ test",
            "FLOPs",
            "MACs",
            *(["latency", "latency %"] if latency else []),
            *(["CPU latency", "CPU latency %"] if cpu_latency else []),
            "params",
            "params #",
            "epochs",
            "steps",
        )
    }
    for row in view.front:
        members["trial"].append(str(row["trial"]))
        members["pick"].append(_member_label(row))
        members["val acc"].append(_acc(row.get("val_acc")))
        members["test acc"].append(_acc(row.get("test_acc")))
        members["Δ val"].append(_delta(row.get("val_acc"), base.get("val_acc")))
        members["Δ test"].append(_delta(row.get("test_acc"), base.get("test_acc")))
        members["FLOPs"].append(_pct(row.get("flops_ratio")))
        members["MACs"].append(_count(row.get("macs")))
        if latency:
            members["latency"].append(_ms(row.get("latency_ms")))
            members["latency %"].append(_pct(row.get("latency_ratio")))
        if cpu_latency:
            members["CPU latency"].append(_ms(row.get("cpu_latency_ms")))
            members["CPU latency %"].append(_pct(row.get("cpu_latency_ratio")))
        members["params"].append(_pct(row.get("params_ratio")))
        members["params #"].append(_count(row.get("params")))
        members["epochs"].append("—" if _missing(row.get("epochs")) else f"{float(row['epochs']):g}")
        members["steps"].append(
            "—" if _missing(row.get("finetune_steps")) else str(int(row["finetune_steps"]))
        )
    doc.table(pd.DataFrame(members), "members")
    doc.text(
        "Accuracy deltas are in percentage points against the original model; FLOPs and params are "
        "percentages of the original's. `epochs`/`steps`: the trial's fine-tuning."
        + (
            f" CPU latency: no latency target was given, so the search optimised FLOPs; after it, each "
            f"member and the original were timed side by side on {cpu_timing.get('device', '?')} "
            f"(batch 1, float32, {cpu_timing.get('runtime', 'eager PyTorch')}, medians of "
            f"{cpu_timing.get('runs', '?')} runs). FLOPs are not speed: search with `--objective "
            "accuracy,latency --target cpu:N` (or `cuda`) to optimise the latency of the device you deploy on."
            if cpu_latency
            else ""
        )
    )

    # Per-layer plans
    doc.heading("Where the network was compressed", "layers-section")
    layers = _layer_rows(view)
    plans = {r["trial"]: (load_plan(r["plan"]) if r.get("plan") else {}) for r in view.front}
    table: dict[str, list[str]] = {"layer": [name for name, _, _ in layers]}
    if any(shape for _, shape, _ in layers):
        table["in→out, kernel"] = [shape for _, shape, _ in layers]
        table["share of FLOPs"] = [_pct(share) for _, _, share in layers]
    for row in view.front:
        plan = plans[row["trial"]]
        label = f"#{row['trial']}" + (f" {_member_label(row)}" if _member_label(row) else "")
        table[label] = [_choice_text(plan.get(name, KEEP)) for name, _, _ in layers]
    doc.table(pd.DataFrame(table), "layers")
    doc.text(
        "Each cell is the layer's choice in that member's plan: `g×r` = FGA with g filter groups of rank r "
        "(a grouped conv of g·r filters then a 1×1 conv), or `kept` (the dense conv); `#N` is trial N. "
        "Members are ordered by FLOPs, cheapest first; the share is the layer's part of the original's FLOPs."
    )
    lat = view.record.get("latency") or {}
    if lat:
        doc.heading("Latency on the target", "latency-section")
        pinned = list(lat.get("pinned_layers") or [])
        target = lat.get("target_key", "?")
        doc.text(
            f"Measured on {target}: the original model takes {_ms(lat.get('baseline_ms'))} per batch. "
            f"{len(pinned)} layer(s) are kept dense because every FGA candidate (each group count at its "
            "smallest rank, the fastest it can be) is slower than the dense layer on this target"
            + (": " + ", ".join(f"`{name}`" for name in pinned) + "." if pinned else ".")
        )

    title = f"fga-search report: {model.get('name', '?')} on {dataset}"
    subtitle = f"Run folder {view.path}"
    footer = (
        f"Written by fga-search {versions.get('fga_search', '')} on {time.strftime('%Y-%m-%d %H:%M:%S')} "
        f"from run.json, trials.parquet and {view.front_source}."
    )
    return doc, title, subtitle, footer


def _write_atomic(path: str, data: bytes) -> None:
    atomic_write_bytes(path, data)


def _check_out(out: str) -> str:
    path = os.path.abspath(out)
    parent = path
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        raise ValueError(f"out {out!r}: {parent} is not a folder")
    if not os.access(parent, os.W_OK):
        raise ValueError(f"out {out!r}: cannot write in {parent}")
    return path


def write_report(run_dir: str, *, out: str | None = None) -> tuple[str, str]:
    """Write ``report.html`` (self-contained) and ``report.md`` (+ ``report_files/*.png``) for a run
    folder, into ``out`` (default: the run folder). Returns the two paths.

    Works on a finished run and on one still running (the front is then recomputed from
    ``trials.parquet``). ``ValueError`` if ``run_dir`` is not a run folder or no trial has finished.
    """
    view = read_run(run_dir)
    if not view.finished:
        raise ValueError(f"run folder {view.path} has no finished trials yet")
    target = _check_out(out if out is not None else view.path)
    doc, title, subtitle, footer = _build(view)
    figures = [v for kind, v in doc.blocks if kind == "figure"]
    files_dir = os.path.join(target, "report_files")
    os.makedirs(files_dir, exist_ok=True)
    for fig in figures:
        _write_atomic(os.path.join(files_dir, f"{fig.name}.png"), fig.png)
    md_path = os.path.join(target, "report.md")
    html_path = os.path.join(target, "report.html")
    _write_atomic(
        md_path,
        _render_markdown(doc, title=title, subtitle=subtitle, footer=footer, files="report_files").encode(),
    )
    _write_atomic(html_path, _render_html(doc, title=title, subtitle=subtitle, footer=footer).encode())
    return html_path, md_path


def _latency_rows(
    latency: bool, cpu_latency: bool, cpu_timing: dict[str, Any], config: dict[str, Any]
) -> list[tuple[str, str]]:
    """The run table's line on how latency was measured, or why it was not."""
    if latency:
        return []
    if cpu_latency:
        return [
            (
                "latency",
                f"the front's members and the original timed side by side on this CPU after the search "
                f"({cpu_timing.get('device', '—')}, batch 1, as exported, medians of {cpu_timing.get('runs', '—')} "
                "runs): the CPU latency columns",
            )
        ]
    if config.get("front_latency_runs") == 0:
        return [
            (
                "latency",
                "not measured (--front-latency-runs 0); `fga-search export` times the exported model "
                "against the original on this CPU",
            )
        ]
    return []
