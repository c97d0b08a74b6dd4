"""The report's sections on the front: the two picks, the plots, the members and their plans."""

from __future__ import annotations

import shlex
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import pandas as pd

from fga_search.core._plan import KEEP, load_plan
from fga_search.runs._fidelity import rung_summary
from fga_search.runs._pareto import knee_cost, slower_than_original
from fga_search.runs._records import FrontRecord
from fga_search.runs._runview import RunView

from ._report_doc import (
    Doc,
    fmt_acc,
    fmt_count,
    fmt_delta,
    fmt_ms,
    fmt_pct,
    missing,
    natural_key,
)
from ._report_plots import hypervolume_plot, scatter_plot

__all__ = ["Facts", "layers_section", "members_section", "picks_section", "plots_section", "rungs_section"]

_COST_NAMES = {"flops_ratio": "FLOPs", "latency_ratio": "latency"}
_LOWER = {"flops_ratio": "fewer FLOPs", "latency_ratio": "lower latency"}


@dataclass(frozen=True)
class Facts:
    """What the sections share: the run and how its latency was measured."""

    view: RunView
    latency: bool  # measured on the run's target during the search
    cpu_latency: bool  # without a target: the front timed on this CPU after the search
    cpu_timing: dict[str, Any]  # front_latency.json
    budget: float
    metric: str  # the budget's metric: flops, params or latency


def _cost_names(costs: Sequence[str]) -> str:
    return " and ".join(_COST_NAMES.get(c, c) for c in costs)


def picks_section(doc: Doc, facts: Facts) -> None:
    view, base = facts.view, facts.view.baseline
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
            ("trial", str(row.trial)),
            ("accuracy", f"val {fmt_acc(row.val_acc)}, test {fmt_acc(row.test_acc)}"),
            (
                "vs original",
                f"val {fmt_delta(row.val_acc, base.get('val_acc'))}, test {fmt_delta(row.test_acc, base.get('test_acc'))}",
            ),
            ("FLOPs", f"{fmt_pct(row.flops_ratio)} ({fmt_count(row.macs)} MACs)"),
        ]
        if facts.latency:
            items.append(("latency", f"{fmt_ms(row.latency_ms)} ({fmt_pct(row.latency_ratio)})"))
        if facts.cpu_latency:
            items.append(("CPU latency", f"{fmt_ms(row.cpu_latency_ms)} ({fmt_pct(row.cpu_latency_ratio)})"))
        slow = slower_than_original(row)
        if slow is not None:
            items.append(("speed", f"**slower than the original {slow.where}** ({slow.times} its latency)"))
        items += [
            ("params", f"{fmt_pct(row.params_ratio)} ({fmt_count(row.params)})"),
            ("export", f"`fga-search export {run_arg} --pick {pick} --out exported`"),
        ]
        cards.append((heading, items))
    doc.cards(cards)
    costs = view.costs
    ties = ", then ".join(_LOWER.get(c, f"lower {c}") for c in costs)
    doc.text(
        f"**Best**: the highest validation accuracy within the budget (ties: {ties}). **Knee**: the "
        "front member farthest from the line joining the front's two ends, where accuracy stops paying "
        f"for {_cost_names([knee_cost(costs)])}."
    )


def plots_section(doc: Doc, facts: Facts) -> None:
    view = facts.view
    doc.heading("Pareto front", "front")
    plots = [
        (
            "flops_ratio",
            "FLOPs",
            "flops",
            "Every trial; the front (red) is the non-dominated feasible trials. Infeasible and "
            "failed trials have no accuracy and are marked along the bottom at their FLOPs.",
        ),
        (
            "params_ratio",
            "parameters",
            "params",
            "The same trials against their parameter count; the front members (red) are those of "
            f"the {_cost_names(view.costs)} front.",
        ),
    ]
    if any(not missing(r.latency_ratio) for r in view.rows):
        plots.append(("latency_ratio", "latency", "latency", "The trials whose latency was measured."))
    for key, what, metric, caption in plots:
        doc.figure(
            scatter_plot(
                view,
                key,
                f"{what} (% of the original, log scale)",
                budget=facts.budget if facts.metric == metric else None,
                name=f"pareto-{metric}",
                title=f"Validation accuracy vs {what}",
                caption=caption,
            )
        )
    doc.figure(hypervolume_plot(view))


def _member_label(row: FrontRecord) -> str:
    return ", ".join(m for m, marked in (("best", row.is_best), ("knee", row.is_knee)) if marked)


def members_section(doc: Doc, facts: Facts) -> None:
    view, base, cpu_timing = facts.view, facts.view.baseline, facts.cpu_timing
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
            *(["latency", "latency %"] if facts.latency else []),
            *(["CPU latency", "CPU latency %"] if facts.cpu_latency else []),
            "params",
            "params #",
            "epochs",
            "steps",
        )
    }
    for row in view.front:
        members["trial"].append(str(row.trial))
        members["pick"].append(_member_label(row))
        members["val acc"].append(fmt_acc(row.val_acc))
        members["test acc"].append(fmt_acc(row.test_acc))
        members["Δ val"].append(fmt_delta(row.val_acc, base.get("val_acc")))
        members["Δ test"].append(fmt_delta(row.test_acc, base.get("test_acc")))
        members["FLOPs"].append(fmt_pct(row.flops_ratio))
        members["MACs"].append(fmt_count(row.macs))
        if facts.latency:
            members["latency"].append(fmt_ms(row.latency_ms))
            members["latency %"].append(fmt_pct(row.latency_ratio))
        if facts.cpu_latency:
            members["CPU latency"].append(fmt_ms(row.cpu_latency_ms))
            members["CPU latency %"].append(fmt_pct(row.cpu_latency_ratio))
        members["params"].append(fmt_pct(row.params_ratio))
        members["params #"].append(fmt_count(row.params))
        members["epochs"].append(
            "—" if row.epochs is None or missing(row.epochs) else f"{float(row.epochs):g}"
        )
        steps = row.finetune_steps
        members["steps"].append("—" if steps is None or missing(steps) else str(int(steps)))
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
            if facts.cpu_latency
            else ""
        )
    )


def _layer_rows(view: RunView) -> list[tuple[str, str, float | None]]:
    """(layer, shape, share of the original MACs) in model order, from the base architecture when it
    can be built, else the plans' layer names in natural order."""
    names: set[str] = set()
    for row in view.front:
        if row.plan:
            names.update(load_plan(row.plan))
    try:
        from fga_search.core._flops import ModelProfile
        from fga_search.models._zoo import build_model

        model = build_model(view.record["model"]["name"], num_classes=int(view.record["num_classes"]))
        profile = ModelProfile(model, input_shape=view.record["input_shape"])
    except Exception:
        return [(name, "", None) for name in sorted(names, key=natural_key)]
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


def layers_section(doc: Doc, facts: Facts) -> None:
    view = facts.view
    doc.heading("Where the network was compressed", "layers-section")
    layers = _layer_rows(view)
    plans = {r.trial: (load_plan(r.plan) if r.plan else {}) for r in view.front}
    table: dict[str, list[str]] = {"layer": [name for name, _, _ in layers]}
    if any(shape for _, shape, _ in layers):
        table["in→out, kernel"] = [shape for _, shape, _ in layers]
        table["share of FLOPs"] = [fmt_pct(share) for _, _, share in layers]
    for row in view.front:
        plan = plans[row.trial]
        label = f"#{row.trial}" + (f" {_member_label(row)}" if _member_label(row) else "")
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
            f"Measured on {target}: the original model takes {fmt_ms(lat.get('baseline_ms'))} per batch. "
            f"{len(pinned)} layer(s) are kept dense because every FGA candidate (each group count at its "
            "smallest rank, the fastest it can be) is slower than the dense layer on this target"
            + (": " + ", ".join(f"`{name}`" for name in pinned) + "." if pinned else ".")
        )


def rungs_section(doc: Doc, facts: Facts) -> None:
    """A multi-fidelity run (``--rungs``): each rung's trials and how its order agrees with the
    rung below's."""
    config = facts.view.config
    if not config.get("rungs"):
        return
    epochs = [float(e) for e in str(config["rungs"]).split(",")]
    summary = rung_summary([r.to_row() for r in facts.view.rows], epochs)
    reached = max((s.rung for s in summary if s.ok), default=0)
    doc.heading("Rungs of fidelity", "rungs")
    table = pd.DataFrame(
        {
            "rung": [s.rung for s in summary],
            "fine-tuning epochs": [f"{s.epochs:g}" + (" (proxy)" if s.epochs == 0 else "") for s in summary],
            "trials": [s.trials for s in summary],
            "trained": [s.ok for s in summary],
            "device time": [f"{s.seconds:.0f} s" for s in summary],
            "Kendall tau with the rung below": [
                "—"
                if s.rung == 0
                else ("—" if s.tau is None else f"{s.tau:+.3f}")
                + f" ({s.pairs} plan{'' if s.pairs == 1 else 's'})"
                for s in summary
            ],
        }
    )
    doc.table(table, "rungs")
    doc.text(
        f"Every plan entered at rung 0; the best 1/{config.get('eta', 3)} of a rung's trials (feasible "
        "first, non-dominated sorting of accuracy and cost, then crowding distance) moved up, "
        f"promoted plans {'continuing from their weights' if config.get('promote') == 'continue' else 'rerun'}. "
        f"The front, the knee and the best use rung {reached} only, the highest reached: scores of "
        "different fine-tuning lengths are never compared. Kendall's tau compares the validation "
        "accuracies, at both rungs, of the plans promoted into a rung."
    )
