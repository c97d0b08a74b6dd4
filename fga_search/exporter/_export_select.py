"""Export stage 1, select: the run folder's pick (best, knee or a trial id) as a row and a plan,
and the run's settings to rebuild it with."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from fga_search.core._geometry import LayerInfo
from fga_search.core._plan import Plan, load_plan, plan_to_json
from fga_search.latency import Target
from fga_search.runs._pareto import is_usable
from fga_search.runs._records import TrialRecord
from fga_search.runs._runview import RunView

from ._export_spec import FILES, SPEC_FORMAT, is_int, is_number

if TYPE_CHECKING:
    from fga_search.engine._config import RunConfig
    from fga_search.engine._setup import SearchSetup

__all__ = [
    "ExportOptions",
    "Picked",
    "check_formats",
    "check_options",
    "check_pick",
    "check_same_inputs",
    "cpu_target",
    "in_model_order",
    "model_fields",
    "run_config",
    "run_target",
    "select",
]


@dataclass(frozen=True)
class Picked:
    """The chosen trial: its row, how it was picked, and the trial that holds its model."""

    row: TrialRecord  # trials.parquet's row of the chosen trial
    how: str  # "best", "knee" or "trial"
    source: TrialRecord  # the row that holds the model: the trial, or the one a duplicate reused
    plan: Plan

    @property
    def trial(self) -> int:
        return int(self.row["trial"])

    @property
    def seed(self) -> int:
        return int(self.source["seed"])


@dataclass(frozen=True)
class ExportOptions:
    """export()'s arguments, checked (:func:`check_options`)."""

    pick: str | int
    formats: tuple[str, ...]
    finetune_epochs: float
    finetune_lr: float | None
    finetune_batch_size: int | None
    latency_runs: int
    quiet: bool


def check_options(
    *,
    pick: object,
    formats: Sequence[str] | str,
    finetune_epochs: object,
    finetune_lr: object,
    finetune_batch_size: object,
    latency_runs: object,
    quiet: bool,
) -> ExportOptions:
    """export()'s arguments, each checked (``ValueError`` naming the first bad one)."""
    chosen = check_pick(pick)
    kinds = check_formats(formats)
    if not (
        isinstance(latency_runs, int) and is_int(latency_runs) and (latency_runs == 0 or latency_runs >= 10)
    ):
        raise ValueError(f"latency_runs must be 0 (skip) or an integer >= 10, got {latency_runs!r}")
    if not (
        isinstance(finetune_epochs, (int, float)) and is_number(finetune_epochs) and finetune_epochs >= 0
    ):
        raise ValueError(f"finetune_epochs must be a number >= 0, got {finetune_epochs!r}")
    if finetune_lr is not None and not (
        isinstance(finetune_lr, (int, float)) and is_number(finetune_lr) and finetune_lr > 0
    ):
        raise ValueError(f"finetune_lr must be a number > 0, got {finetune_lr!r}")
    if finetune_batch_size is not None and not (
        isinstance(finetune_batch_size, int) and is_int(finetune_batch_size) and finetune_batch_size >= 1
    ):
        raise ValueError(f"finetune_batch_size must be an integer >= 1, got {finetune_batch_size!r}")
    epochs = float(finetune_epochs)
    return ExportOptions(chosen, kinds, epochs, finetune_lr, finetune_batch_size, latency_runs, quiet)


def check_formats(formats: Sequence[str] | str) -> tuple[str, ...]:
    if isinstance(formats, str):
        formats = [f for f in formats.split(",") if f.strip()]
    out: list[str] = []
    for f in formats:
        name = str(f).strip().lower()
        if name not in FILES:
            raise ValueError(f"unknown export format {f!r}; valid formats: {', '.join(FILES)}")
        if name not in out:
            out.append(name)
    return tuple(out)


def check_pick(pick: object) -> str | int:
    if isinstance(pick, bool):
        raise ValueError(f"pick must be 'best', 'knee' or a trial id, got {pick!r}")
    if isinstance(pick, int):
        return pick
    if isinstance(pick, str):
        text = pick.strip()
        if text in ("best", "knee"):
            return text
        if text.isdigit():
            return int(text)
    raise ValueError(f"pick must be 'best', 'knee' or a trial id, got {pick!r}")


def _row(view: RunView, pick: str | int) -> tuple[TrialRecord, str]:
    usable = view.usable
    if not usable:
        raise ValueError(f"run folder {view.path} has no finished trials")
    if pick == "best":
        best = view.best
        if best is None:
            raise ValueError(f"run folder {view.path} has no finished trial within the budget")
        return view.row(int(best["trial"])) or best, "best"
    if pick == "knee":
        knee = view.knee
        if knee is None:
            raise ValueError(f"run folder {view.path} has no Pareto front, hence no knee")
        return view.row(int(knee["trial"])) or knee, "knee"
    assert isinstance(pick, int)
    row = view.row(pick)
    if row is None:
        ids = [r["trial"] for r in view.rows]
        raise ValueError(
            f"trial {pick} does not exist in run folder {view.path} (trials {min(ids)}..{max(ids)})"
            if ids
            else f"trial {pick} does not exist in run folder {view.path} (no trials)"
        )
    if not is_usable(row):
        reason = f": {row['fail_reason']}" if row.get("fail_reason") else ""
        raise ValueError(
            f"trial {pick} is not a finished trial (state {row.get('state')}, status {row.get('status')}{reason}); "
            f"finished trials: {', '.join(str(r['trial']) for r in usable[:20])}{' ...' if len(usable) > 20 else ''}"
        )
    return row, "trial"


def _weights_source(view: RunView, row: TrialRecord) -> TrialRecord:
    """A duplicate trial reused an earlier trial's result: that trial holds the model."""
    if row.get("status") == "duplicate" and row.get("duplicate_of") is not None:
        source = view.row(int(row["duplicate_of"]))
        if source is not None and is_usable(source):
            return source
    return row


def select(view: RunView, pick: str | int) -> Picked:
    """The trial that ``pick`` (checked by :func:`check_pick`) names in the run (``ValueError``
    if there is none)."""
    row, how = _row(view, pick)
    source = _weights_source(view, row)
    return Picked(row=row, how=how, source=source, plan=load_plan(source["plan"]))


def in_model_order(plan: Plan, layers: Sequence[LayerInfo]) -> Plan:
    order = {info.name: i for i, info in enumerate(layers)}
    return dict(sorted(plan.items(), key=lambda kv: order.get(kv[0], len(order))))


def model_fields(view: RunView, setup: SearchSetup, plan: Plan) -> dict[str, Any]:
    """spec.json's fields that say what the model of ``plan`` is and what it takes."""
    import json

    import torch

    from fga_search._version import __version__

    return {
        "format": SPEC_FORMAT,
        "fga_search_version": __version__,
        "torch_version": torch.__version__,
        "model": dict(view.record.get("model") or setup.spec.to_dict()),
        "plan": json.loads(plan_to_json(in_model_order(plan, setup.profile.layers))),
        "input_shape": list(setup.data.input_shape),
        "input": "float32 (N, C, H, W) images scaled to [0, 1], then (x - mean) / std per channel",
        "normalization": setup.normalization.to_dict(),
        "num_classes": setup.data.num_classes,
        "classes": list(setup.data.classes),
    }


def run_config(view: RunView, device: str | None) -> RunConfig:
    """The run's options as run.json recorded them, to rebuild its set-up on ``device``."""
    from fga_search.engine._config import RunConfig, needs_latency

    stored = dict(view.record.get("config") or {})
    if not stored:
        raise ValueError(f"run folder {view.path}: run.json has no config to rebuild the run from")
    known = {k: v for k, v in stored.items() if k in RunConfig.field_names()}
    data_dir = (view.record.get("identity") or {}).get("data_dir")
    if data_dir:
        known["data_dir"] = data_dir  # absolute, whatever the working folder was
    known.update(device=device, quiet=True, out=view.path)
    # a target that runs made before it was refused there went unused
    if not needs_latency(str(known.get("objective", "")), str(known.get("budget_metric", ""))):
        for key in ("target", "target_batch", "target_dtype", "target_memory_format"):
            known.pop(key, None)
    return RunConfig(**known)


def check_same_inputs(view: RunView, setup: SearchSetup) -> None:
    """The model and weights file are those the run was made with (``ValueError`` if not)."""
    from fga_search.runs._runfolder import file_digest

    identity = view.record.get("identity") or {}
    if identity.get("model") not in (None, setup.spec.name):
        raise ValueError(
            f"run folder {view.path} was made with model {identity.get('model')!r}, not {setup.spec.name!r}"
        )
    digest = identity.get("weights_sha256")
    if digest and digest != "quickstart" and setup.weights and file_digest(setup.weights) != digest:
        raise ValueError(
            f"weights file {setup.weights} changed since the run (its sha256 differs from run.json's)"
        )


def run_target(view: RunView, config: RunConfig) -> dict[str, Any]:
    """The latency target the run's trials were timed on, as its options named it."""
    target = config.latency_target()
    return {
        "target": config.target,
        "batch": config.target_batch,
        "dtype": config.target_dtype,
        "memory_format": None if target is None else "channels_last" if target.channels_last else "nchw",
        "key": (view.record.get("identity") or {}).get("target"),  # hardware, dtype, batch, layout, torch
    }


def cpu_target(config: RunConfig) -> Target:
    """Where the export times its CPU choices and latencies: the run's ``cpu[:N]`` latency target
    (its threads, batch, dtype and memory format), else this CPU at PyTorch's threads, batch 1,
    float32, NCHW."""
    target = config.latency_target()
    return target if target is not None and target.device == "cpu" else Target("cpu")
