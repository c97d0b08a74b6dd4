"""The run report: ``report.html`` (one self-contained file) and ``report.md`` (+ ``report_files/``).

The HTML file opens offline: its plots are inline PNGs (base64 data URIs) and its style is inline;
it references nothing outside itself. The Markdown file holds the same tables and links the same
plots, written as PNG files to ``report_files/`` beside it. The document and its rendering are in
``_report_doc``, the plots in ``_report_plots``, the sections on the front in ``_report_sections``.
"""

from __future__ import annotations

import os
import time

import pandas as pd

from fga_search._util._atomic import atomic_write_bytes
from fga_search.data._data import TRAIN_VALIDATION_WARNING, validation_flatters
from fga_search.runs._pareto import Slowdown, slower_than_original
from fga_search.runs._records import FrontRecord
from fga_search.runs._runview import RunView, read_run

from ._report_doc import (
    Doc,
    fmt_acc,
    fmt_command,
    fmt_count,
    fmt_ms,
    fmt_pct,
    fmt_seconds,
    missing,
    render_html,
    render_markdown,
)
from ._report_plots import hypervolume_series
from ._report_sections import (
    Facts,
    layers_section,
    members_section,
    picks_section,
    plots_section,
    rungs_section,
)

__all__ = ["write_report"]


def _has_latency(view: RunView) -> bool:
    return any(not missing(r.latency_ms) for r in view.rows) or not missing(view.baseline.get("latency_ms"))


def _facts(view: RunView) -> Facts:
    record, config = view.record, view.config
    latency = _has_latency(view)
    # without a latency target: the front's members timed on the CPU after the search
    cpu_timing = view.folder.read_json("front_latency.json") or {}
    return Facts(
        view=view,
        latency=latency,
        cpu_latency=(
            not latency and bool(cpu_timing) and any(not missing(r.cpu_latency_ms) for r in view.front)
        ),
        cpu_timing=cpu_timing,
        budget=float(config.get("budget", record.get("identity", {}).get("budget", 1.0))),
        metric=config.get("budget_metric", "flops"),
    )


def _trials_text(view: RunView) -> str:
    rows, usable = view.rows, view.usable
    duplicates = sum(r.status == "duplicate" for r in usable)
    infeasible = sum(r.status == "infeasible" for r in rows)
    failed = sum(r.state == "FAIL" and r.status != "interrupted" for r in rows)
    interrupted = sum(r.status == "interrupted" for r in rows)
    running = sum(r.state in ("RUNNING", "WAITING") for r in rows)
    asked = view.config.get("trials", "?")
    if view.config.get("rungs"):  # --trials counts plans; promotions come on top
        plans = sum(1 for r in view.finished if not r.rung)
        text = f"{len(view.finished)} finished, {plans} plans of {asked} asked and their promotions: {len(usable)} trained"
    else:
        text = f"{len(view.finished)} finished of {asked} asked: {len(usable)} trained"
    if duplicates:
        text += f" ({duplicates} of them repeated an earlier plan and reused its result)"
    text += f", {infeasible} infeasible, {failed} failed"
    if interrupted:
        text += f", {interrupted} interrupted and re-queued"
    if running:
        text += f", {running} running"
    return text


_VALIDATION = {  # where the validation images that rank the trials came from (DataBundle.val_source)
    "train": "a stratified part of the training split",
    "val/": "the data's val/ folder (held out)",
    "val-dir": "--val-dir (held out)",
    "test": "a stratified part of the test split (--val-from test); the test figures use the rest",
}


def _run_section(doc: Doc, facts: Facts) -> None:
    view = facts.view
    record, rows, config = view.record, view.rows, view.config
    model, data = record.get("model", {}), record.get("data", {})
    starts = [r.datetime_start for r in rows if r.datetime_start]
    ends = [r.datetime_complete for r in rows if r.datetime_complete]
    wall = None
    if starts and ends:
        wall = (pd.Timestamp(max(ends)) - pd.Timestamp(min(starts))).total_seconds()
    device_seconds = sum(
        float(r.seconds_total) for r in rows if r.seconds_total is not None and not missing(r.seconds_total)
    )
    devices = sorted({str(r.device) for r in rows if r.device}) or [str(record.get("device", "—"))]
    versions = record.get("versions", {})
    dataset = str(data.get("name", config.get("dataset", "—")))
    sizes = ", ".join(f"{data[k]} {k}" for k in ("train", "val", "test") if k in data)
    shape = "×".join(str(s) for s in record.get("input_shape", []))
    _, hv = hypervolume_series(view)
    run_table = pd.DataFrame(
        [
            ("command", fmt_command(record)),
            ("model", f"{model.get('name', '—')} ({model.get('source', '—')})"),
            ("dataset", f"{dataset}: {sizes}; input {shape}; {record.get('num_classes', '—')} classes"),
            (
                "budget",
                f"{100 * facts.budget:g} % of the original's "
                + {"flops": "FLOPs", "params": "parameters"}.get(str(facts.metric), str(facts.metric)),
            ),
            (
                "search",
                f"{config.get('sampler', '—')} sampler, "
                + (
                    f"rungs of {config['rungs']} fine-tuning epochs (eta {config.get('eta')}), "
                    if config.get("rungs")
                    else f"{config.get('epochs', '—')} fine-tuning epochs per trial, "
                )
                + f"seed {config.get('seed', '—')}, backend {config.get('backend', 'optuna')}",
            ),
            ("trials", _trials_text(view)),
            ("validation", _VALIDATION.get(str(data.get("val_source", "train")), "—")),
            ("wall time", fmt_seconds(wall) if wall is not None else "—"),
            (
                "device time",
                f"{fmt_seconds(device_seconds)} (sum of the trials' seconds_total) on {', '.join(devices)}",
            ),
            ("hypervolume", f"{hv[-1]:.4f}" if hv else "—"),
            ("front", f"{len(view.front)} models (from {view.front_source})"),
            *_latency_rows(facts),
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
    slower = _slower_text(facts)
    if slower is not None:
        doc.text(slower)
    doc.table(run_table, "run", "kv", header=False)
    source = str(data.get("val_source", "train"))  # runs made before held-out validation: train
    if validation_flatters(source, model=config.get("model"), weights=config.get("weights")):
        doc.text(f"Validation: {TRAIN_VALIDATION_WARNING}.")


def _slower_text(facts: Facts) -> str | None:
    """The report's first words when the best or the knee runs slower than the original (where
    fewer FLOPs did not make it faster), or None."""
    view = facts.view
    best, knee = view.best, view.knee
    if knee is not None and best is not None and knee.trial == best.trial:
        knee = None  # one model: said once, as the best
    picks = [("best model", best), ("knee", knee)]
    slow = [(name, row, s) for name, row in picks if row is not None and (s := slower_than_original(row))]
    if not slow:
        return None
    name, row, first = slow[0]
    also = " (also the knee)" if name == "best model" and view.knee is not None and knee is None else ""
    text = f"**The {name}{also} is slower than the original {first.where}**: {_slowdown(row, first, facts)}"
    if len(slow) == 2:
        text += f"; so is the knee: {_slowdown(slow[1][1], slow[1][2], facts, where=False)}"
    elif name == "knee" and best is not None:
        text += "; the best model is not"
    fewer = any(r.flops_ratio is not None and r.flops_ratio < 1 for _, r, _ in slow)
    search = "`--budget-metric latency --target cpu`" if first.on == "cpu" else "`--budget-metric latency`"
    return (
        text
        + (". Fewer FLOPs are not faster here" if fewer else "")
        + f". To search for speed, use {search}"
        + (" with the same `--target`" if first.on == "target" else "")
        + "."
    )


def _slowdown(row: FrontRecord, slow: Slowdown, facts: Facts, *, where: bool = True) -> str:
    """``1.25x the original's latency (batch 1, the device), at 19.0 % of the FLOPs``; without
    the batch and the device when not ``where``."""
    if slow.on == "cpu":
        batch, device = facts.cpu_timing.get("batch", 1), facts.cpu_timing.get("device")
    else:
        target = (facts.view.record.get("latency") or {}).get("target") or {}
        batch, device = target.get("batch", "?"), target.get("hardware")
    text = f"{slow.times} the original's latency"
    if where:
        text += f" (batch {batch}" + (f", {device})" if device else ")")
    if row.flops_ratio is not None and row.flops_ratio < 1:
        text += f", at {fmt_pct(row.flops_ratio)} of the FLOPs"
    return text


def _latency_rows(facts: Facts) -> list[tuple[str, str]]:
    """The run table's line on how latency was measured, or why it was not."""
    if facts.latency:
        return []
    cpu_timing = facts.cpu_timing
    if facts.cpu_latency:
        return [
            (
                "latency",
                f"the front's members and the original timed side by side on this CPU after the search "
                f"({cpu_timing.get('device', '—')}, batch 1, as exported, medians of {cpu_timing.get('runs', '—')} "
                "runs): the CPU latency columns",
            )
        ]
    if facts.view.config.get("front_latency_runs") == 0:
        return [
            (
                "latency",
                "not measured (--front-latency-runs 0); `fga-search export` times the exported model "
                "against the original on this CPU",
            )
        ]
    return []


def _baseline_section(doc: Doc, facts: Facts) -> None:
    base, model = facts.view.baseline, facts.view.record.get("model", {})
    doc.heading("The original model", "baseline")
    base_cols: dict[str, list[str]] = {
        "model": [str(model.get("name", "—"))],
        "val acc": [fmt_acc(base.get("val_acc"))],
        "test acc": [fmt_acc(base.get("test_acc"))],
        "MACs": [fmt_count(base.get("macs"))],
        "FLOPs": [fmt_count(2 * base["macs"]) if not missing(base.get("macs")) else "—"],
    }
    if facts.latency:
        base_cols["latency"] = [fmt_ms(base.get("latency_ms"))]
    if facts.cpu_latency:
        base_cols["CPU latency"] = [fmt_ms(facts.cpu_timing.get("original_ms"))]
    base_cols["params"] = [fmt_count(base.get("params"))]
    doc.table(pd.DataFrame(base_cols), "baseline")
    doc.text("Per image; FLOPs = 2 × MACs (multiply-accumulates), as `torch.utils.flop_counter` counts them.")


def _build(view: RunView) -> tuple[Doc, str, str, str]:
    facts = _facts(view)
    doc = Doc([])
    for section in (
        _run_section,
        _baseline_section,
        rungs_section,
        picks_section,
        plots_section,
        members_section,
        layers_section,
    ):
        section(doc, facts)
    record = view.record
    dataset = str(record.get("data", {}).get("name", view.config.get("dataset", "—")))
    title = f"fga-search report: {record.get('model', {}).get('name', '?')} on {dataset}"
    subtitle = f"Run folder {view.path}"
    footer = (
        f"Written by fga-search {record.get('versions', {}).get('fga_search', '')} on "
        f"{time.strftime('%Y-%m-%d %H:%M:%S')} from run.json, trials.parquet and {view.front_source}."
    )
    return doc, title, subtitle, footer


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
        atomic_write_bytes(os.path.join(files_dir, f"{fig.name}.png"), fig.png)
    md_path = os.path.join(target, "report.md")
    html_path = os.path.join(target, "report.html")
    atomic_write_bytes(
        md_path,
        render_markdown(doc, title=title, subtitle=subtitle, footer=footer, files="report_files").encode(),
    )
    atomic_write_bytes(html_path, render_html(doc, title=title, subtitle=subtitle, footer=footer).encode())
    return html_path, md_path
