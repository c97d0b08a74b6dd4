"""Export a run's chosen model: ``model.pt`` + ``spec.json``, optionally TorchScript and ONNX.

The export runs in stages, each a small typed function, in order: **select** the pick
(``_export_select``) → **rebuild** its model and **fine-tune** it further (``_export_build``) →
**choose** how it runs on a CPU (``_export_execution``) → **write** the files
(``_export_write``) → **verify** them (``_export_verify``) → **time** the model
(``_export_time``, which takes the search's figures where it timed this model already). Every
file goes to a staging folder; ``spec.json`` is written once, at the end, and moved into place
last (``_export_write.move_into_place``). ``model.pt`` is a state_dict of plain tensors and
``spec.json`` says how to rebuild the module (``_export_spec``); :func:`load_exported` rebuilds
it, and the export measures what that returns.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from fga_search.core._fga import with_cpu_execution
from fga_search.latency import Target
from fga_search.models._checkpoint import cpu_state_dict
from fga_search.runs._runview import RunView, read_run

from ._export_build import Trained, trained_model
from ._export_execution import choose_execution
from ._export_select import (
    ExportOptions,
    Picked,
    check_options,
    check_same_inputs,
    cpu_target,
    model_fields,
    run_config,
    run_target,
    select,
)
from ._export_spec import FILES, build_exported, load_exported, load_weights
from ._export_time import search_timing, time_export
from ._export_verify import (
    TOLERANCE,
    ExportVerificationError,
    Verification,
    example_batch,
    verify,
)
from ._export_write import (
    ExportFormatError,
    check_out,
    file_entry,
    move_into_place,
    write_json,
    write_onnx_graph,
    write_torchscript,
)

if TYPE_CHECKING:
    from fga_search.engine._config import RunConfig
    from fga_search.engine._setup import SearchSetup
    from fga_search.train._trial import TrialRunner

__all__ = [
    "FORMATS",
    "TOLERANCE",
    "ExportFormatError",
    "ExportResult",
    "ExportVerificationError",
    "export",
    "load_exported",
]

FORMATS = tuple(FILES)


@dataclass(frozen=True)
class ExportResult:
    out: str  # the export folder
    trial: int
    pick: str  # "best", "knee" or "trial"
    files: tuple[str, ...]  # absolute paths
    spec: dict[str, Any]  # the content of spec.json
    verification: dict[str, float | None]  # format -> max abs difference (None: not checked)
    rebuilt: bool  # True: the weights were reproduced by re-running the trial

    @property
    def val_acc(self) -> float:
        return float(self.spec["accuracy"]["val"])

    @property
    def test_acc(self) -> float:
        return float(self.spec["accuracy"]["test"])

    @property
    def macs(self) -> int:
        return int(self.spec["flops"]["macs"])

    @property
    def params(self) -> int:
        return int(self.spec["params"]["count"])


# -- the state the stages pass on ------------------------------------------------------------
@dataclass(frozen=True)
class _Context:
    """The run the export works on, rebuilt from its folder."""

    view: RunView
    config: RunConfig
    setup: SearchSetup
    runner: TrialRunner
    target: Target  # where the CPU choices and latencies are timed
    own_factory: Callable[..., nn.Module] | None  # the run's user model: the export reloads with it
    options: ExportOptions
    staging: str  # the folder the files are written to before they move into place

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.setup.data.input_shape)

    def load(self, fields: dict[str, Any], state: Mapping[str, torch.Tensor], weights: str) -> nn.Module:
        """The model as a user loads it from ``fields`` (spec.json's) and ``state``."""
        return build_exported(fields, state, weights=weights, model_factory=self.own_factory)


@dataclass(frozen=True)
class _Written:
    """Stage 5: the files written to the staging folder, and the model loaded back from them."""

    fields: dict[str, Any]  # spec.json's fields that rebuild the model
    loaded: nn.Module  # as a user loads it: its CPU execution and batch-norm fold applied
    grouped: nn.Module  # ``loaded`` with every FGA layer grouped (the FLOPs the plan counts)
    names: tuple[str, ...]  # the files, spec.json among them (written last)
    onnx_graph: dict[str, Any] | None


def _context(view: RunView, device: str | None, options: ExportOptions, anchor: str, target: str) -> _Context:
    """The run's set-up, rebuilt as its search made it, and a staging folder beside ``target``."""
    from fga_search.engine._setup import make_runner, prepare
    from fga_search.models._zoo import _factory as _zoo_factory

    config = run_config(view, device)
    setup = prepare(config, log=False, latency_floor_check=False, time_latency=False)
    check_same_inputs(view, setup)
    runner = make_runner(setup)
    # the run's own model, which prepare already built: reload the export with it, not by its name
    own_factory = _zoo_factory(setup.spec) if setup.spec.source == "factory" else None
    try:
        staging = tempfile.mkdtemp(prefix=".fga-export-", dir=anchor)
    except OSError as exc:
        raise ValueError(f"--out {target}: cannot write in {anchor} ({exc.strerror or exc})") from None
    return _Context(view, config, setup, runner, cpu_target(config), own_factory, options, staging)


# -- the stages ------------------------------------------------------------------------------
def _write_files(ctx: _Context, fields: dict[str, Any], state: Mapping[str, torch.Tensor]) -> _Written:
    """Stage 5: ``model.pt`` and each format to the staging folder; the formats are written from
    the model loaded back from ``model.pt``, as it runs on a CPU."""
    weights = os.path.join(ctx.staging, "model.pt")
    torch.save(dict(state), weights)
    loaded = ctx.load(fields, load_weights(weights), weights)
    grouped = with_cpu_execution(loaded, "grouped")
    example = example_batch(ctx.input_shape)
    onnx_graph = None
    for kind in ctx.options.formats:
        path = os.path.join(ctx.staging, FILES[kind])
        if kind == "torchscript":
            write_torchscript(loaded, example, path)
        else:
            onnx_graph = write_onnx_graph(
                loaded,
                grouped,
                fields.get("cpu_execution"),
                example=example,
                path=path,
                target=ctx.target,
                runs=ctx.options.latency_runs,
            )
    names = ("model.pt", "spec.json", *(FILES[k] for k in ctx.options.formats))
    return _Written(fields, loaded, grouped, names, onnx_graph)


def _spec(
    ctx: _Context,
    picked: Picked,
    trained: Trained,
    written: _Written,
    checked: Verification,
    latency: dict[str, Any] | None,
) -> dict[str, Any]:
    """spec.json: the model's fields, then what each stage measured."""
    view, setup, source, row = ctx.view, ctx.setup, picked.source, picked.row
    record, base = view.record, view.baseline
    cost = setup.profile.count(picked.plan)
    base_macs = int(base.get("macs") or setup.profile.base_macs)
    base_params = int(base.get("params") or setup.profile.base_params)
    spec = dict(written.fields)
    if "onnx" in ctx.options.formats:
        spec["onnx_graph"] = written.onnx_graph
    spec.update(
        accuracy={"val": trained.val_acc, "test": trained.test_acc, "val_held_out": trained.finetune is None},
        flops={
            "macs": checked.macs,
            "flops": 2 * checked.macs,
            "ratio": checked.macs / base_macs,
            "analytic_macs": cost.macs,
            "original_macs": base_macs,
            "counted_with": "torch.utils.flop_counter.FlopCounterMode, per image",
        },
        params={"count": checked.params, "ratio": checked.params / base_params, "original": base_params},
        latency=(
            None
            if source.get("latency_ms") is None
            else {
                "ms": source["latency_ms"],
                "ratio": source.get("latency_ratio"),
                "measured": "during the search, on the trial's device",
                "target": run_target(view, ctx.config),
            }
        ),
        latency_at_export=latency,
        original={k: base.get(k) for k in ("val_acc", "test_acc", "macs", "params")},
        source={
            "run_dir": view.path,
            "trial": picked.trial,
            "weights_from_trial": int(source["trial"]),
            "pick": picked.how,
            "seed": picked.seed,
            "weights": "re-run" if trained.rebuilt else "checkpoint",
            "trial_val_acc": row.get("val_acc"),
            "trial_test_acc": next(
                (r.get("test_acc") for r in view.front if r["trial"] in (row["trial"], source["trial"])),
                None,
            ),
            "trial_epochs": row.get("epochs"),
            "dataset": record.get("data"),
            "budget": (record.get("config") or {}).get("budget"),
            "budget_metric": (record.get("config") or {}).get("budget_metric"),
        },
        finetune=trained.finetune,
        verification=checked.to_spec(),
        files={
            name: file_entry(os.path.join(ctx.staging, name)) for name in written.names if name != "spec.json"
        },
        exported=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    )
    return spec


def export(
    run_dir: str,
    *,
    pick: str | int = "best",
    out: str,
    finetune_epochs: float = 0.0,
    finetune_lr: float | None = None,
    finetune_batch_size: int | None = None,
    formats: Sequence[str] = (),
    device: str | None = None,
    latency_runs: int = 50,
    quiet: bool = False,
) -> ExportResult:
    """Export one model of a run folder to ``out``: ``model.pt``, ``spec.json`` and ``formats``.

    ``pick``: ``"best"`` (the highest validation accuracy within the budget, ties: fewer FLOPs),
    ``"knee"`` (the front's knee) or a finished trial's id. The trial's weights come from the run
    folder (front members) or from re-running the trial with its seed. ``finetune_epochs > 0``
    fine-tunes further, with distillation, on the training and validation images, at peak learning
    rate ``finetune_lr`` and batch ``finetune_batch_size`` (None: the run's trial settings). ``formats``:
    any of ``"torchscript"``, ``"onnx"``. Accuracies are measured on the final model, FLOPs with
    ``FlopCounterMode`` on the model loaded back from ``out``, and each format is checked against
    the PyTorch model (max abs difference <= 1e-4 x max(1, max |output|), else
    :class:`ExportVerificationError`).
    ``latency_runs`` (>= 10; 0: skip) chooses how the FGA layers run on a CPU and whether batch
    norms are folded, by timings at the threads, batch, dtype and memory format of the run's
    ``cpu[:N]`` latency target, else at PyTorch's threads, batch 1, float32, NCHW; and times the
    exported and the original model side by side there, in eager PyTorch and, with ``"onnx"``, in
    ONNX Runtime (``spec["latency_at_export"]``). A front member that the search already timed on
    this CPU as exported (not fine-tuned further) takes the search's PyTorch figures, marked
    ``"measured_by": "search"``, instead of being timed again.
    Unless ``quiet``, the long steps (re-running a trial, each epoch of the final fine-tune with
    an ETA) are reported on stderr.

    Needs the run's inputs (weights, data). ``ValueError`` on bad input; nothing is written then.
    A new (or empty) export folder appears complete or not at all. Over an earlier export (a
    spec.json of ours beside its model.pt) only the files an export writes are replaced, one by one,
    and nothing else in the folder is touched; any other non-empty folder is refused (``ValueError``).
    """
    options = check_options(
        pick=pick,
        formats=formats,
        finetune_epochs=finetune_epochs,
        finetune_lr=finetune_lr,
        finetune_batch_size=finetune_batch_size,
        latency_runs=latency_runs,
        quiet=quiet,
    )
    target, anchor = check_out(out)
    view = read_run(run_dir)
    if target in (view.path, view.folder.models_dir):
        raise ValueError(f"--out {target} must not be the run folder or its models/ folder")
    picked = select(view, options.pick)  # 1. select
    ctx = _context(view, device, options, anchor, target)
    try:
        trained = trained_model(view, ctx.setup, ctx.runner, picked, options)  # 2. rebuild, 3. fine-tune
        state = cpu_state_dict(trained.model, clone=True)
        fields = model_fields(view, ctx.setup, picked.plan)
        execution = choose_execution(  # 4. choose execution, on the model as a user loads it
            ctx.load(fields, state, "model.pt"),
            input_shape=ctx.input_shape,
            target=ctx.target,
            runs=options.latency_runs,
        )
        written = _write_files(ctx, {**fields, **execution.spec_fields()}, state)  # 5. write files
        checked = verify(  # 6. verify
            trained.model,
            written.loaded,
            written.grouped,
            cost=ctx.setup.profile.count(picked.plan),
            input_shape=ctx.input_shape,
            folder=ctx.staging,
            formats=options.formats,
        )
        latency = time_export(  # 7. time: what the search did not measure already
            written.loaded,
            ctx.setup.model,
            execution=execution,
            reused=search_timing(
                view,
                picked.trial,
                finetuned=trained.finetune is not None,
                target=ctx.target,
                execution=execution,
            ),
            input_shape=ctx.input_shape,
            target=ctx.target,
            runs=options.latency_runs,
            onnx_file=os.path.join(ctx.staging, FILES["onnx"]) if "onnx" in options.formats else None,
            scratch=ctx.staging,
        )
        spec = _spec(ctx, picked, trained, written, checked, latency)
        write_json(os.path.join(ctx.staging, "spec.json"), spec)  # once, at the end
        os.chmod(ctx.staging, 0o755)
        move_into_place(ctx.staging, target, written.names)
    finally:
        shutil.rmtree(ctx.staging, ignore_errors=True)
    return ExportResult(
        out=target,
        trial=picked.trial,
        pick=picked.how,
        files=tuple(os.path.join(target, n) for n in written.names),
        spec=spec,
        verification=checked.max_abs_diff,
        rebuilt=trained.rebuilt,
    )
