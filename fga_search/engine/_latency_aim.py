"""Aim the repair under a latency budget by what the trials measured.

The lookup table's estimate of a plan's latency can be far off the built model's measurement:
on ResNet-56 with 2 vCPUs (batch 1, eager PyTorch), 40 of 40 trials repaired to an estimated
0.654-0.660 of the original measured 0.78-1.41, and none was within the 0.66 budget. Every trial
under a latency budget is built and measured on the target before it is fine-tuned, so each one
says how far off the estimate was. The median of (measured - estimated) over the last
``AIM_WINDOW`` measured trials, once there are ``AIM_MIN_TRIALS``, is the estimate's bias; the
repair then aims at ``budget - bias``, so that later plans are more likely to measure within the
budget. The aim only tightens (a bias below zero leaves it at the budget, where a plan's estimate
still has to fit), it follows the machine's state as it drifts (the window), and the measurement
still decides whether a model is within the budget.
"""

from __future__ import annotations

import statistics
from collections.abc import Iterable, Mapping
from typing import Any

__all__ = ["AIM_MIN_TRIALS", "AIM_WINDOW", "estimate_bias", "latency_aim"]

AIM_WINDOW = 10  # measured trials, the most recent
AIM_MIN_TRIALS = 3  # measured trials before the aim moves


def _measured(row: Mapping[str, Any]) -> bool:
    """A trial whose own built model was measured (not a duplicate's reused measurement)."""
    return (
        row.get("status") in ("ok", "infeasible")
        and row.get("duplicate_of") is None
        and row.get("latency_ratio") is not None
        and row.get("latency_estimate_ratio") is not None
    )


def estimate_bias(
    rows: Iterable[Mapping[str, Any]], *, window: int = AIM_WINDOW, min_trials: int = AIM_MIN_TRIALS
) -> tuple[float, int] | None:
    """The median of (measured - estimated latency ratio) over the last ``window`` measured
    trials (by trial number), and how many it took; None with fewer than ``min_trials``."""
    if window < 1 or min_trials < 1:
        raise ValueError(f"window and min_trials must be >= 1, got {window} and {min_trials}")
    measured = sorted((int(r["trial"]), r) for r in rows if _measured(r))
    recent = [float(r["latency_ratio"]) - float(r["latency_estimate_ratio"]) for _, r in measured[-window:]]
    if len(recent) < min_trials:
        return None
    return statistics.median(recent), len(recent)


def latency_aim(
    budget: float,
    rows: Iterable[Mapping[str, Any]],
    *,
    window: int = AIM_WINDOW,
    min_trials: int = AIM_MIN_TRIALS,
) -> float:
    """What the repair aims at under a latency ``budget`` (a ratio of the original's latency):
    the budget less the estimate's measured bias (``estimate_bias``), never above the budget nor
    below zero."""
    bias = estimate_bias(rows, window=window, min_trials=min_trials)
    if bias is None:
        return budget
    return max(0.0, budget - max(0.0, bias[0]))
