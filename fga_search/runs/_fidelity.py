"""A multi-fidelity run's rungs as its trials record them (``--rungs``): how many plans reached
each rung and how well consecutive rungs agree on their order (the report reads it)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

__all__ = ["RungSummary", "rung_of", "rung_summary"]


def rung_of(row: Mapping[str, Any]) -> int:
    """A trial's rung (0 for a single-fidelity trial)."""
    return int(row.get("rung") or 0)


@dataclass(frozen=True)
class RungSummary:
    """One rung: its fine-tuning epochs, the trials that ran there (ok: with a validation
    accuracy), their seconds, and Kendall's tau-b between the validation accuracies of the plans
    promoted into it at the rung below and here (None with fewer than 3 such pairs, or no spread)."""

    rung: int
    epochs: float
    trials: int
    ok: int
    seconds: float
    tau: float | None
    pairs: int


def _kendall(x: Sequence[float], y: Sequence[float]) -> float | None:
    if len(x) < 3 or len(set(x)) < 2 or len(set(y)) < 2:
        return None
    try:
        from scipy.stats import kendalltau  # scipy comes with scikit-learn, a dependency
    except ImportError:  # a bare environment (the GPU check's) reports the rest of the table
        return None
    return float(kendalltau(x, y).statistic)


def rung_summary(rows: Sequence[Mapping[str, Any]], epochs: Sequence[float]) -> list[RungSummary]:
    """Each rung of ``epochs`` (the run's ``--rungs``), from its trials' rows."""
    ended = [r for r in rows if r.get("state") in ("COMPLETE", "FAIL") and r.get("status") != "interrupted"]
    acc = {int(r["trial"]): r.get("val_acc") for r in ended if r.get("status") == "ok"}
    out = []
    for k, e in enumerate(epochs):
        here = [r for r in ended if rung_of(r) == k]
        pairs: list[tuple[float, float]] = []
        for r in here:
            below = acc.get(int(r["promoted_from"])) if r.get("promoted_from") is not None else None
            there = acc.get(int(r["trial"]))
            if below is not None and there is not None:
                pairs.append((float(below), float(there)))
        out.append(
            RungSummary(
                rung=k,
                epochs=float(e),
                trials=len(here),
                ok=sum(1 for r in here if r.get("status") == "ok"),
                seconds=sum(float(r.get("seconds_total") or 0.0) for r in here),
                tau=_kendall([p[0] for p in pairs], [p[1] for p in pairs]) if k else None,
                pairs=len(pairs),
            )
        )
    return out
