"""The report's plots: accuracy against each cost for every trial, and the front's hypervolume."""

from __future__ import annotations

import io
from collections.abc import Sequence
from typing import Any

from fga_search.runs._pareto import hypervolume, is_finished, top_fidelity
from fga_search.runs._records import TrialRecord
from fga_search.runs._runview import RunView

from ._report_doc import ReportFigure, missing

__all__ = ["hypervolume_plot", "hypervolume_series", "scatter_plot"]

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


def scatter_plot(
    view: RunView, key: str, label: str, *, budget: float | None, name: str, title: str, caption: str
) -> ReportFigure:
    base = view.baseline
    fig = _new_figure()
    ax = fig.add_subplot()
    usable = [r for r in view.usable if not missing(getattr(r, key))]
    front = [r for r in view.front if not missing(getattr(r, key))]
    front_ids = {r.trial for r in front}
    others = [r for r in usable if r.trial not in front_ids]
    infeasible = [r for r in view.rows if r.status == "infeasible" and not missing(getattr(r, key))]
    failed = [r for r in view.rows if r.state == "FAIL" and not missing(getattr(r, key))]
    accs = [r.val_acc for r in usable if r.val_acc is not None]  # usable: all of them
    base_acc = base.get("val_acc")
    if base_acc is not None and not missing(base_acc):
        accs.append(base_acc)
    lo, hi = (min(accs), max(accs)) if accs else (0.0, 1.0)
    span = max(hi - lo, 0.01)
    ax.set_ylim(lo - 0.16 * span, hi + 0.1 * span)
    ax.yaxis.set_major_formatter(lambda v, _: f"{100 * v:.1f} %" if v >= lo - 0.02 * span else "")
    xs = [getattr(r, key) for r in [*usable, *infeasible, *failed]]
    _ratio_axis(ax, xs)
    ax.grid(True, which="major", color="#e6e6e6", lw=0.8)
    ax.set_axisbelow(True)
    if others:
        ax.scatter(
            [getattr(r, key) for r in others],
            [r.val_acc for r in others],
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
    for marked, y, marker, kind, legend in (
        (infeasible, 0.035, "x", "infeasible", "infeasible (over budget, not trained)"),
        (failed, 0.07, "v", "failed", "failed (no accuracy)"),
    ):
        if marked:  # along the bottom strip, at their cost
            ax.scatter(
                [getattr(r, key) for r in marked],
                [y] * len(marked),
                transform=strip,
                marker=marker,
                s=30,
                color=_COLORS[kind],
                label=legend,
                zorder=3,
            )
    if front:
        ordered = sorted(front, key=lambda r: getattr(r, key))
        ax.step(
            [getattr(r, key) for r in ordered],
            [r.val_acc for r in ordered],
            where="post",
            color=_COLORS["front"],
            lw=1.4,
            alpha=0.8,
            zorder=3,
        )
        ax.scatter(
            [getattr(r, key) for r in ordered],
            [r.val_acc for r in ordered],
            s=46,
            color=_COLORS["front"],
            edgecolor="white",
            linewidth=0.8,
            label="Pareto front",
            zorder=4,
        )
        for tag, marker, color in (("is_knee", "D", _COLORS["knee"]), ("is_best", "*", _COLORS["best"])):
            pick = next((r for r in front if getattr(r, tag)), None)
            if pick is None:
                continue
            ax.scatter(
                [getattr(pick, key)],
                [pick.val_acc],
                s=190 if marker == "*" else 90,
                marker=marker,
                facecolor="none",
                edgecolor=color,
                linewidth=1.6,
                zorder=5,
                label=("best within budget" if tag == "is_best" else "knee") + f" (trial {pick.trial})",
            )
    if not missing(base_acc):
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
    return ReportFigure(name, title, caption, _png(fig))


def hypervolume_series(view: RunView) -> tuple[list[int], list[float]]:
    """The front's hypervolume (accuracy, FLOPs) after each finished trial; with --rungs, of the
    highest rung reached so far (fidelities are never mixed)."""
    counts, values = [], []
    done: list[TrialRecord] = []
    for row in view.rows:
        if not is_finished(row):
            continue
        done.append(row)
        top = top_fidelity(done, costs=["flops_ratio"])
        counts.append(len(done))
        values.append(
            hypervolume(
                [float(r.val_acc or 0) for r in top], [float(r.flops_ratio or 1) for r in top], ref=(0.0, 1.0)
            )
        )
    return counts, values


def hypervolume_plot(view: RunView) -> ReportFigure:
    counts, values = hypervolume_series(view)
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
    return ReportFigure("hypervolume", title, caption, _png(fig))
