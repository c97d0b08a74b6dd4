"""Export a run's chosen model: ``model.pt`` + ``spec.json``, optionally TorchScript and ONNX.

``model.pt`` is a state_dict of plain tensors and ``spec.json`` says how to rebuild the module:
the base architecture by name and the plan. :func:`load_exported` rebuilds it with
``build_model`` + ``apply_plan_structure`` and loads the weights with ``weights_only=True``; no
pickled class is involved. Every written format is checked against the PyTorch model on a random
batch, and the FLOPs are measured with ``FlopCounterMode`` on the model loaded back from disk.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import hashlib
import io
import json
import math
import os
import shutil
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from ._bn_fold import conv_bn_pairs, fold_batchnorms, folded_copy
from ._checkpoint import cpu_state_dict
from ._cpu_execution import apply_cpu_execution, choose_cpu_execution
from ._errors import first_line, shorten
from ._fga import with_cpu_execution
from ._pareto import is_usable
from ._paths import check_out_path
from ._plan import Plan, load_plan, normalize_plan, plan_to_json
from ._records import TrialRecord
from ._runtime_latency import export_latency, write_onnx
from ._runview import RunView, read_run
from .latency import Target, measure_side_by_side

if TYPE_CHECKING:
    from ._config import RunConfig

__all__ = ["FORMATS", "TOLERANCE", "ExportResult", "ExportVerificationError", "export", "load_exported"]

FORMATS = ("torchscript", "onnx")
TOLERANCE = 1e-4  # max abs difference of any exported format's outputs, x max(1, max |output|)
SPEC_FORMAT = "fga-search-export/1"
_FILES = {"torchscript": "model.torchscript.pt", "onnx": "model.onnx"}


class ExportVerificationError(RuntimeError):
    """An exported file does not reproduce the PyTorch model (or its measured FLOPs differ)."""


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


# -- loading ---------------------------------------------------------------------------------
def _read_spec(folder: str) -> dict[str, Any]:
    path = os.path.join(folder, "spec.json")
    if not os.path.isfile(path):
        raise ValueError(f"{folder} is not an fga-search export (no spec.json)")
    try:
        with open(path) as f:
            spec = json.load(f)
    except (OSError, json.JSONDecodeError) as exc:
        raise ValueError(f"cannot read {path}: {exc}") from None
    if not isinstance(spec, dict) or spec.get("format") != SPEC_FORMAT:
        raise ValueError(f"{path} is not an fga-search export spec (format {SPEC_FORMAT!r})")
    _check_spec_fields(spec, path)
    return spec


def _check_spec_fields(spec: dict[str, Any], path: str) -> None:
    """The fields a model is rebuilt from, each of its type (``ValueError`` naming the field)."""

    def bad(field: str, why: str, value: object) -> ValueError:
        return ValueError(f"{path}: {field} {why}, got {shorten(repr(value), 80)}")

    model = spec.get("model")
    if not isinstance(model, dict) or not isinstance(model.get("name"), str) or not model["name"]:
        raise bad("model", "must be a mapping with a model 'name'", model)
    classes = spec.get("num_classes")
    if not (isinstance(classes, int) and _is_int(classes) and 1 <= classes <= 1_000_000):
        raise bad("num_classes", "must be an integer in [1, 1000000]", classes)
    if not isinstance(spec.get("plan"), dict):
        raise bad("plan", "must be a mapping of layer names to choices", spec.get("plan"))
    for field in ("bn_fold", "cpu_execution"):
        value = spec.get(field)
        if value is not None and not isinstance(value, dict):
            raise bad(field, "must be a mapping", value)
    layers = (spec.get("cpu_execution") or {}).get("layers")
    if layers is not None and not (
        isinstance(layers, dict) and all(isinstance(v, str) for v in layers.values())
    ):
        raise bad("cpu_execution.layers", "must map layer names to executions", layers)


def _base_model(
    spec: dict[str, Any], *, model_factory: Callable[..., nn.Module] | None, trust_model_code: bool
) -> nn.Module:
    """The base architecture that spec.json names: built by ``model_factory`` if given, else from
    the zoo or torchvision by name (their registries: nothing is imported from the name). A
    ``module:factory`` name is imported and called only with ``trust_model_code``."""
    from ._zoo import build_model, resolve_model

    name, num_classes = spec["model"]["name"], spec["num_classes"]  # checked by _read_spec
    if model_factory is not None:
        model = model_factory(num_classes=num_classes)
        if not isinstance(model, nn.Module):
            raise ValueError(f"model_factory returned a {type(model).__name__}, not an nn.Module")
        return model
    source = resolve_model(name)  # where the name comes from; imports nothing the name names
    if source.source == "factory" and not trust_model_code:
        raise ValueError(
            f"spec.json names the model {name!r}, a user factory that loading would import and call: "
            "pass model_factory=<the function that builds it>, or trust_model_code=True if you trust "
            "the code it names"
        )
    return build_model(source, num_classes=num_classes)


def _build(
    spec: dict[str, Any],
    weights: str,
    *,
    fold_batchnorm: bool = True,
    model_factory: Callable[..., nn.Module] | None = None,
    trust_model_code: bool = False,
) -> nn.Module:
    from ._surgery import apply_plan_structure

    model = _base_model(spec, model_factory=model_factory, trust_model_code=trust_model_code)
    apply_plan_structure(model, normalize_plan(spec["plan"]))
    try:
        state = torch.load(weights, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ValueError(f"cannot read weights {weights}: {exc}") from None
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()[0]
        raise ValueError(f"weights {weights} do not fit the model described by spec.json: {first}") from None
    bn_fold = spec.get("bn_fold") or {}
    if fold_batchnorm and bn_fold.get("kept"):
        pairs = bn_fold.get("pairs")
        if not isinstance(pairs, dict) or not all(isinstance(v, str) for v in pairs.values()):
            raise ValueError(f"spec.json: bn_fold.pairs must map conv names to BN names, got {pairs!r}")
        fold_batchnorms(model, pairs)
    layers = (spec.get("cpu_execution") or {}).get("layers") or {}
    if layers:
        apply_cpu_execution(model, layers)
    return model.eval()


def load_exported(
    path: str | os.PathLike[str],
    *,
    fold_batchnorm: bool = True,
    model_factory: Callable[..., nn.Module] | None = None,
    trust_model_code: bool = False,
) -> nn.Module:
    """Rebuild an exported model (a folder written by :func:`export`, or its ``spec.json``).

    The base architecture is built by the name spec.json gives: a zoo or torchvision name from
    their registries. Loading imports and calls nothing that spec.json names: a user model
    (``pkg.module:factory``) is built by ``model_factory(num_classes=K)``, which the caller passes,
    or, only with ``trust_model_code=True``, by importing and calling the factory spec.json names
    (else ``ValueError``). Its planned convs are replaced by FGA layers, and ``model.pt`` is loaded
    with ``weights_only=True`` (plain tensors: no pickled object is run).
    The FGA layers that the export measured faster on the CPU another way (the grouped conv as a
    block-diagonal dense conv, or the pair folded into one dense conv) run so on CPU inputs without
    gradients (``spec["cpu_execution"]``). The batch norms that the export measured faster
    folded into the convs before them are folded (``spec["bn_fold"]``; they become
    ``nn.Identity``), unless ``fold_batchnorm=False``: keep them to fine-tune the model further.
    Returns the module in eval mode, on the CPU.
    """
    if not isinstance(trust_model_code, bool):
        raise ValueError(f"trust_model_code must be True or False, got {trust_model_code!r}")
    if model_factory is not None and not callable(model_factory):
        raise ValueError(f"model_factory must be callable (factory(num_classes=K)), got {model_factory!r}")
    folder = os.fspath(path)
    if os.path.isfile(folder) and os.path.basename(folder) == "spec.json":
        folder = os.path.dirname(folder) or "."
    if not os.path.isdir(folder):
        raise ValueError(f"path {folder!r} is not an exported model folder")
    spec = _read_spec(folder)
    weights = os.path.join(folder, "model.pt")
    if not os.path.isfile(weights):
        raise ValueError(f"{folder} has spec.json but no model.pt")
    return _build(
        spec,
        weights,
        fold_batchnorm=fold_batchnorm,
        model_factory=model_factory,
        trust_model_code=trust_model_code,
    )


# -- checks at the boundary ------------------------------------------------------------------
def _is_int(value: object) -> bool:
    """An int, not a bool."""
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: object) -> bool:
    """A finite int or float, not a bool."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _check_formats(formats: Sequence[str] | str) -> tuple[str, ...]:
    if isinstance(formats, str):
        formats = [f for f in formats.split(",") if f.strip()]
    out: list[str] = []
    for f in formats:
        name = str(f).strip().lower()
        if name not in FORMATS:
            raise ValueError(f"unknown export format {f!r}; valid formats: {', '.join(FORMATS)}")
        if name not in out:
            out.append(name)
    return tuple(out)


def _check_pick(pick: object) -> str | int:
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


def _nearest_existing(path: str) -> str:
    parent = path
    while not os.path.lexists(parent):
        parent = os.path.dirname(parent)
    return parent


_OWN_FILES = ("model.pt", "spec.json", *_FILES.values())  # every file an export writes


def _earlier_export(target: str) -> dict[str, Any]:
    """The spec.json of the export of ours that the non-empty folder ``target`` holds: a spec.json
    in our format beside a model.pt, and no folder where an export writes a file. Anything else
    is refused (``ValueError``): an export replaces only the files an earlier export wrote."""

    def refuse(why: str) -> ValueError:
        return ValueError(
            f"--out {target} exists, is not empty and holds no earlier export ({why}); "
            "nothing was changed: choose a new or empty folder"
        )

    path = os.path.join(target, "spec.json")
    if not os.path.isfile(path):
        raise refuse("no spec.json")
    try:
        with open(path) as f:
            spec = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        raise refuse("its spec.json cannot be read as JSON") from None
    if not isinstance(spec, dict) or spec.get("format") != SPEC_FORMAT:
        raise refuse(f"its spec.json is not an export spec of fga-search, format {SPEC_FORMAT!r}")
    if not os.path.isfile(os.path.join(target, "model.pt")):
        raise refuse("spec.json without a model.pt")
    for name in _OWN_FILES:
        p = os.path.join(target, name)
        if os.path.lexists(p) and (os.path.isdir(p) or not os.path.isfile(p)):
            raise refuse(f"{name} there is not a file")
    return spec


def _check_out(out: object) -> tuple[str, str]:
    """The export folder (absolute) and the existing folder above it to stage the files in."""
    if not isinstance(out, (str, os.PathLike)) or not os.fspath(out):
        raise ValueError(f"out must be a folder path, got {out!r}")
    check_out_path(out)  # creatable: no file on the way, no name or path over the limits
    target = os.path.abspath(os.fspath(out))
    if os.path.lexists(target):
        if not os.path.isdir(target):
            raise ValueError(f"--out {target} exists and is not a folder")
        if os.listdir(target):
            _earlier_export(target)
    anchor = _nearest_existing(os.path.dirname(target))  # a folder: check_out_path saw to it
    try:  # a real probe: permissions alone say little (root, read-only file systems)
        os.rmdir(tempfile.mkdtemp(prefix=".fga-export-probe-", dir=anchor))
    except OSError as exc:
        raise ValueError(f"--out {target}: cannot write in {anchor} ({exc.strerror or exc})") from None
    return target, anchor


def _select(view: RunView, pick: str | int) -> tuple[TrialRecord, str]:
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


def _in_model_order(plan: Plan, layers: Sequence[Any]) -> Plan:
    order = {info.name: i for i, info in enumerate(layers)}
    return dict(sorted(plan.items(), key=lambda kv: order.get(kv[0], len(order))))


def _weights_source(view: RunView, row: TrialRecord) -> TrialRecord:
    """A duplicate trial reused an earlier trial's result: that trial holds the model."""
    if row.get("status") == "duplicate" and row.get("duplicate_of") is not None:
        source = view.row(int(row["duplicate_of"]))
        if source is not None and is_usable(source):
            return source
    return row


def _run_config(view: RunView, device: str | None) -> RunConfig:
    from ._config import RunConfig, needs_latency

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


def _check_same_inputs(view: RunView, setup: Any) -> None:
    from ._runfolder import file_digest

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


# -- building the model ----------------------------------------------------------------------
def _full_training_split(setup: Any, runner: Any) -> Any:
    from ._data import Split
    from ._loader import DeviceSplit

    data = setup.data
    full = Split(
        torch.cat([data.train.images, data.val.images]), torch.cat([data.train.labels, data.val.labels])
    )
    return DeviceSplit(
        full, device=runner.device, normalization=setup.normalization, channels_last=runner.channels_last
    )


def _final_finetune(
    model: nn.Module,
    setup: Any,
    runner: Any,
    *,
    epochs: float,
    seed: int,
    lr: float | None = None,
    batch_size: int | None = None,
    quiet: bool,
) -> dict[str, Any]:
    """Fine-tune longer on train + validation with distillation from the original model (run on
    every batch, since random crops make cached logits useless). ``lr`` and ``batch_size``
    default to the run's trial settings. Unless ``quiet``, a line per epoch goes to stderr."""
    from ._finetune import FinetuneProgress, finetune
    from ._progress import format_seconds
    from ._recalibrate import recalibrate_bn

    data = setup.data
    split = _full_training_split(setup, runner)
    config = dataclasses.replace(
        setup.settings.finetune,
        epochs=float(epochs),
        crop=True,
        flip=True,
        lr=setup.settings.finetune.lr if lr is None else float(lr),
        batch_size=setup.settings.finetune.batch_size if batch_size is None else int(batch_size),
    )

    def report(p: FinetuneProgress) -> None:
        eta = p.seconds / p.step * (p.steps - p.step)
        print(
            f"final fine-tune: epoch {p.epochs_done:.4g}/{config.epochs:g} (step {p.step}/{p.steps})  "
            f"loss {p.loss:.4f}  {format_seconds(p.seconds)} | ETA {format_seconds(eta)}",
            file=sys.stderr,
            flush=True,
        )

    if not quiet:
        print(
            f"final fine-tune: {config.epochs:g} epochs on {len(split)} train+val images, batch "
            f"{config.batch_size}, peak learning rate {config.lr:g}, the original as teacher",
            file=sys.stderr,
            flush=True,
        )
    stats = finetune(
        model,
        split,
        config=config,
        teacher=runner.model,
        allow_flip=data.flip,
        crop_pad=data.crop_pad,
        seed=seed,
        on_epoch=None if quiet else report,
    )
    if stats.steps < setup.settings.recalibrate_after_steps:
        recalibrate_bn(model, split, images=setup.settings.recalibration, seed=seed, amp_dtype=runner.amp)
    return {
        "epochs": float(epochs),
        "data": "train+val",
        "images": len(split),
        "steps": stats.steps,
        "final_loss": None if math.isnan(stats.final_loss) else stats.final_loss,
        "teacher": "the original model, run on every batch",
        "augment": {"crop_pad": data.crop_pad if config.crop else 0, "flip": bool(config.flip and data.flip)},
        "recipe": config.to_dict(),
    }


def _trained_model(
    view: RunView, setup: Any, runner: Any, row: TrialRecord, plan: Plan, *, quiet: bool
) -> tuple[nn.Module, bool]:
    from ._surgery import apply_plan_structure

    path = view.folder.checkpoint(int(row["trial"]))
    if os.path.isfile(path):
        model = apply_plan_structure(copy.deepcopy(setup.model).cpu(), plan)
        try:
            model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
        except Exception as exc:
            first = first_line(exc)
            raise ValueError(f"cannot load {path}: {first}") from None
        model = model.to(runner.device).eval()
        if runner.channels_last:
            model = model.to(memory_format=torch.channels_last)
        return model, False
    # Only the front's members keep their weights: re-run the trial, deterministically.
    if not quiet:
        print(f"re-running trial {int(row['trial'])} from its plan and seed", file=sys.stderr, flush=True)
    outcome = runner.run(plan, seed=int(row["seed"]))
    return outcome.model.eval(), True


# -- writing and verifying -------------------------------------------------------------------
def _max_diff(a: Any, b: Any) -> float:
    return float((torch.as_tensor(a).float() - torch.as_tensor(b).float()).abs().max())


def _check(name: str, diff: float, limit: float) -> float:
    if not math.isfinite(diff) or diff > limit:
        raise ExportVerificationError(
            f"verification failed: {name} differs from the PyTorch model by {diff:.3g} (max abs), "
            f"over {limit:.3g} ({TOLERANCE:g} x max(1, max |output|))"
        )
    return diff


class ExportFormatError(ValueError):
    """The model cannot be written in a requested format (an operator the exporter lacks...)."""


@contextlib.contextmanager
def _muted() -> Iterator[None]:
    """Send stdout and stderr, Python's and the C++ side's (file descriptors 1 and 2), to a sink."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = (os.dup(1), os.dup(2))
    try:
        with (
            tempfile.TemporaryFile() as sink,
            contextlib.redirect_stdout(io.StringIO()),
            contextlib.redirect_stderr(io.StringIO()),
        ):
            os.dup2(sink.fileno(), 1)
            os.dup2(sink.fileno(), 2)
            yield
    finally:
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        os.close(saved[0])
        os.close(saved[1])


@contextlib.contextmanager
def _exporting(fmt: str, hint: str) -> Iterator[None]:
    """Turn an exporter's failure into one line naming the format; what it prints (the ONNX
    exporter dumps its whole graph on failure) is muted."""
    try:
        with warnings.catch_warnings(), _muted():
            warnings.simplefilter("ignore")
            yield
    except Exception as exc:
        first = first_line(exc)
        first = first.split(" Please feel free to request support")[0].rstrip(" .")
        raise ExportFormatError(f"cannot export the model to {fmt}: {first[:400]}; {hint}") from None


def _export_torchscript(model: nn.Module, example: torch.Tensor, path: str, reference: torch.Tensor) -> float:
    with _exporting("TorchScript", "export without it"), torch.no_grad():  # the chosen CPU execution
        traced = torch.jit.trace(model, example)
        traced.save(path)
        loaded = torch.jit.load(path, map_location="cpu")
    with torch.no_grad():
        return _max_diff(loaded(example), reference)


def _export_onnx(model: nn.Module, example: torch.Tensor, path: str, reference: torch.Tensor) -> float | None:
    with _exporting("ONNX", "export without onnx (model.pt and TorchScript do not need it)"):
        write_onnx(model, example, path)
    try:
        import onnx

        onnx.checker.check_model(path)
    except ImportError:
        pass
    try:
        import onnxruntime
    except ImportError:
        return None
    session = onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"])
    (out,) = session.run(["logits"], {"input": example.numpy()})
    return _max_diff(out, reference)


def _onnx_graph(
    loaded: nn.Module,
    grouped: nn.Module,
    cpu_execution: dict[str, Any] | None,
    *,
    example: torch.Tensor,
    path: str,
    reference: torch.Tensor,
    target: Target,
    runs: int,
) -> tuple[float | None, dict[str, Any] | None]:
    """Write the ONNX file; return its max |diff| to ``reference`` (None: onnxruntime is not
    installed) and how its graph was chosen. ONNX Runtime picks its own kernels, so the FGA layers
    are exported as grouped convs, unless the export kept another CPU execution for PyTorch
    (block-diagonal or folded convs) and ONNX Runtime runs that graph faster, timed side by side
    (``runs`` runs; 0: not timed, grouped). ``grouped`` is ``loaded`` with every FGA layer grouped."""
    if not (runs and cpu_execution and cpu_execution.get("kept") and _has_onnxruntime()):
        return _export_onnx(grouped, example, path, reference), None
    from ._runtime_latency import onnx_files_latency

    folder = os.path.dirname(path)
    graphs = {"grouped": grouped, "cpu_execution": loaded}
    paths = {name: os.path.join(folder, f".{name}.onnx") for name in graphs}
    diffs = {name: _export_onnx(m, example, paths[name], reference) for name, m in graphs.items()}
    input_shape = tuple(example.shape[1:])
    ms = onnx_files_latency(paths, input_shape=input_shape, target=target, runs=runs)
    chosen = "cpu_execution" if ms["cpu_execution"] < ms["grouped"] else "grouped"
    os.replace(paths[chosen], path)
    for name in graphs:
        if name != chosen:
            os.remove(paths[name])
    return diffs[chosen], {
        "graph": chosen,
        "onnxruntime_ms": ms,
        "runs": runs,
        "measured": f"ONNX Runtime, batch {target.batch}, side by side in the exporting process, medians",
    }


def _choose_bn_fold(
    loaded: nn.Module, *, input_shape: Sequence[int], target: Target, runs: int
) -> dict[str, Any] | None:
    """Fold the batch norms that follow convs (``_bn_fold``) into a copy of ``loaded``, time both
    side by side on this CPU, and keep the fold only if the whole model is faster."""
    pairs = conv_bn_pairs(loaded)
    if not pairs:
        return None
    folded = folded_copy(loaded, pairs)
    ms = measure_side_by_side(
        {"unfolded": loaded, "folded": folded},
        input_shape=input_shape,
        target=target,
        rounds=max(1, runs // 10),
        repeats=10,
    )
    return {
        "pairs": pairs,
        "kept": ms["folded"] < ms["unfolded"],
        "before_ms": ms["unfolded"],
        "after_ms": ms["folded"],
        "runs": runs,
    }


def _has_onnxruntime() -> bool:
    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        return False
    return True


def _file_entry(path: str) -> dict[str, Any]:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return {"bytes": os.path.getsize(path), "sha256": h.hexdigest()}


def _write_json(path: str, data: dict[str, Any]) -> None:
    with open(path, "w") as f:
        json.dump(data, f, indent=2)
        f.write("\n")


def _move_into_place(staging: str, target: str, names: Sequence[str]) -> None:
    """Put the export's files (``names``, in ``staging``) in ``target``. A new or empty folder:
    the staging folder is renamed into place (all at once). An earlier export of ours: checked
    again, then its files are replaced one by one (``os.replace``, spec.json last) and the files it
    listed that this export does not write are removed; nothing else in the folder is touched."""
    parent = os.path.dirname(target)
    os.makedirs(parent, exist_ok=True)
    if not (os.path.isdir(target) and os.listdir(target)):
        os.replace(staging, target)  # also over an empty folder
        return
    old = _earlier_export(target)
    files = old.get("files")
    listed: dict[str, Any] = files if isinstance(files, dict) else {}
    for name in names:
        if name != "spec.json":
            os.replace(os.path.join(staging, name), os.path.join(target, name))
    for name in _FILES.values():  # the earlier export's files that this one does not write
        path = os.path.join(target, name)
        if name in listed and name not in names and os.path.isfile(path):
            os.remove(path)
    os.replace(os.path.join(staging, "spec.json"), os.path.join(target, "spec.json"))


def _run_target(view: RunView, config: RunConfig) -> dict[str, Any]:
    """The latency target the run's trials were timed on, as its options named it."""
    target = config.latency_target()
    return {
        "target": config.target,
        "batch": config.target_batch,
        "dtype": config.target_dtype,
        "memory_format": None if target is None else "channels_last" if target.channels_last else "nchw",
        "key": (view.record.get("identity") or {}).get("target"),  # hardware, dtype, batch, layout, torch
    }


def _cpu_target(config: RunConfig) -> Target:
    """Where the export times its CPU choices and latencies: the run's ``cpu[:N]`` latency target
    (its threads, batch, dtype and memory format), else this CPU at PyTorch's threads, batch 1,
    float32, NCHW."""
    target = config.latency_target()
    return target if target is not None and target.device == "cpu" else Target("cpu")


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
    ``latency_runs`` (>= 10; 0: skip) times the exported and the original model side by side on
    this machine's CPU, in eager PyTorch and, with ``"onnx"``, in ONNX Runtime
    (``spec["latency_at_export"]``), and chooses by the same timings how the FGA layers run on a
    CPU and whether batch norms are folded: at the threads, batch, dtype and memory format of the
    run's ``cpu[:N]`` latency target, else at PyTorch's threads, batch 1, float32, NCHW.
    Unless ``quiet``, the long steps (re-running a trial, each epoch of the final fine-tune with
    an ETA) are reported on stderr.

    Needs the run's inputs (weights, data). ``ValueError`` on bad input; nothing is written then.
    A new (or empty) export folder appears complete or not at all. Over an earlier export (a
    spec.json of ours beside its model.pt) only the files an export writes are replaced, one by one,
    and nothing else in the folder is touched; any other non-empty folder is refused (``ValueError``).
    """
    from ._flops import measure_macs
    from ._setup import make_runner, prepare
    from ._version import __version__
    from ._zoo import _factory as _zoo_factory

    chosen = _check_pick(pick)
    kinds = _check_formats(formats)
    if not (_is_int(latency_runs) and (latency_runs == 0 or latency_runs >= 10)):
        raise ValueError(f"latency_runs must be 0 (skip) or an integer >= 10, got {latency_runs!r}")
    if not (_is_number(finetune_epochs) and finetune_epochs >= 0):
        raise ValueError(f"finetune_epochs must be a number >= 0, got {finetune_epochs!r}")
    if finetune_lr is not None and not (_is_number(finetune_lr) and finetune_lr > 0):
        raise ValueError(f"finetune_lr must be a number > 0, got {finetune_lr!r}")
    if finetune_batch_size is not None and not (_is_int(finetune_batch_size) and finetune_batch_size >= 1):
        raise ValueError(f"finetune_batch_size must be an integer >= 1, got {finetune_batch_size!r}")
    target, anchor = _check_out(out)
    view = read_run(run_dir)
    if target in (view.path, view.folder.models_dir):
        raise ValueError(f"--out {target} must not be the run folder or its models/ folder")
    row, how = _select(view, chosen)
    source = _weights_source(view, row)
    plan = load_plan(source["plan"])
    config = _run_config(view, device)
    cpu_target = _cpu_target(config)
    setup = prepare(config, log=False, latency_floor_check=False, time_latency=False)
    _check_same_inputs(view, setup)
    runner = make_runner(setup)
    # the run's own model, which prepare already built: reload the export with it, not by its name
    own_factory = _zoo_factory(setup.spec) if setup.spec.source == "factory" else None
    try:
        staging = tempfile.mkdtemp(prefix=".fga-export-", dir=anchor)
    except OSError as exc:
        raise ValueError(f"--out {target}: cannot write in {anchor} ({exc.strerror or exc})") from None
    try:
        model, rebuilt = _trained_model(view, setup, runner, source, plan, quiet=quiet)
        finetuned = None
        if finetune_epochs > 0:
            finetuned = _final_finetune(
                model,
                setup,
                runner,
                epochs=finetune_epochs,
                seed=int(source["seed"]),
                lr=finetune_lr,
                batch_size=finetune_batch_size,
                quiet=quiet,
            )
        val_acc = runner.evaluate(model, split="val")
        test_acc = runner.evaluate(model, split="test")
        model = model.cpu().to(memory_format=torch.contiguous_format).eval()

        record, base = view.record, view.baseline
        weights = os.path.join(staging, "model.pt")
        torch.save(cpu_state_dict(model, clone=True), weights)
        cost = setup.profile.count(plan)
        base_macs = int(base.get("macs") or setup.profile.base_macs)
        base_params = int(base.get("params") or setup.profile.base_params)
        spec: dict[str, Any] = {
            "format": SPEC_FORMAT,
            "fga_search_version": __version__,
            "torch_version": torch.__version__,
            "model": dict(record.get("model") or setup.spec.to_dict()),
            "plan": json.loads(plan_to_json(_in_model_order(plan, setup.profile.layers))),
            "input_shape": list(setup.data.input_shape),
            "input": "float32 (N, C, H, W) images scaled to [0, 1], then (x - mean) / std per channel",
            "normalization": setup.normalization.to_dict(),
            "num_classes": setup.data.num_classes,
            "classes": list(setup.data.classes),
        }
        spec_path = os.path.join(staging, "spec.json")
        _write_json(spec_path, spec)
        loaded = load_exported(
            staging, model_factory=own_factory
        )  # the numbers below are measured on what a user loads
        cpu_execution = None
        if latency_runs:
            # how each FGA layer runs on this CPU: measured, kept only where the whole model is faster
            cpu_execution = choose_cpu_execution(
                loaded, input_shape=setup.data.input_shape, target=cpu_target, runs=latency_runs
            )
            if cpu_execution["kept"]:  # block-diagonal and dense convs spend more FLOPs to take less time
                with torch.no_grad():
                    executed = measure_macs(loaded, input_shape=setup.data.input_shape)
                cpu_execution["executed_macs"] = executed
            spec["cpu_execution"] = cpu_execution
            _write_json(spec_path, spec)
            loaded = load_exported(staging, model_factory=own_factory)
            # then batch norms folded into the convs before them: kept only if measured faster
            bn_fold = _choose_bn_fold(
                loaded, input_shape=setup.data.input_shape, target=cpu_target, runs=latency_runs
            )
            if bn_fold is not None:
                spec["bn_fold"] = bn_fold
                _write_json(spec_path, spec)
                loaded = load_exported(staging, model_factory=own_factory)
        # the model's FLOPs: its FGA layers as grouped convs, however they run on a CPU
        grouped = with_cpu_execution(loaded, "grouped")
        macs = measure_macs(grouped, input_shape=setup.data.input_shape)
        params = sum(p.numel() for p in model.parameters())  # as trained: batch norms unfolded
        if macs != cost.macs or params != cost.params:
            raise ExportVerificationError(
                f"verification failed: the exported model has {macs} MACs and {params} params, "
                f"the plan's analytic count is {cost.macs} MACs and {cost.params} params"
            )
        gen = torch.Generator().manual_seed(0)
        example = torch.randn(8, *setup.data.input_shape, generator=gen)
        with torch.no_grad():
            reference = model(example)
            # relative to the outputs' scale: an untrained net's logits can reach thousands
            scale = float(reference.abs().max())
            limit = TOLERANCE * max(1.0, scale)
            verification: dict[str, float | None] = {
                "model.pt": _check("model.pt", _max_diff(loaded(example), reference), limit)
            }
        for kind in kinds:
            path = os.path.join(staging, _FILES[kind])
            if kind == "torchscript":
                verification[kind] = _check(
                    kind, _export_torchscript(loaded, example, path, reference), limit
                )
            else:
                diff, onnx_graph = _onnx_graph(
                    loaded,
                    grouped,
                    cpu_execution,
                    example=example,
                    path=path,
                    reference=reference,
                    target=cpu_target,
                    runs=latency_runs,
                )
                verification[kind] = None if diff is None else _check(kind, diff, limit)
                spec["onnx_graph"] = onnx_graph
        at_export = None
        if latency_runs:
            folded_original = None
            if (spec.get("bn_fold") or {}).get("kept"):  # the original with its batch norms folded alike
                folded_original = folded_copy(copy.deepcopy(setup.model).cpu().eval())
            at_export = export_latency(
                loaded,
                setup.model,
                folded_original=folded_original,
                input_shape=setup.data.input_shape,
                target=cpu_target,
                runs=latency_runs,
                onnx="onnx" in kinds,
                onnx_file=os.path.join(staging, _FILES["onnx"]) if "onnx" in kinds else None,
                scratch=staging,
            )
        spec.update(
            accuracy={"val": val_acc, "test": test_acc, "val_held_out": finetuned is None},
            flops={
                "macs": macs,
                "flops": 2 * macs,
                "ratio": macs / base_macs,
                "analytic_macs": cost.macs,
                "original_macs": base_macs,
                "counted_with": "torch.utils.flop_counter.FlopCounterMode, per image",
            },
            params={"count": params, "ratio": params / base_params, "original": base_params},
            latency=(
                None
                if source.get("latency_ms") is None
                else {
                    "ms": source["latency_ms"],
                    "ratio": source.get("latency_ratio"),
                    "measured": "during the search, on the trial's device",
                    "target": _run_target(view, config),
                }
            ),
            latency_at_export=at_export,
            original={k: base.get(k) for k in ("val_acc", "test_acc", "macs", "params")},
            source={
                "run_dir": view.path,
                "trial": int(row["trial"]),
                "weights_from_trial": int(source["trial"]),
                "pick": how,
                "seed": int(source["seed"]),
                "weights": "re-run" if rebuilt else "checkpoint",
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
            finetune=finetuned,
            verification={
                "tolerance": limit,
                "rule": f"max abs diff <= {TOLERANCE:g} x max(1, max |output|)",
                "max_abs_output": scale,
                "max_abs_diff": verification,
                "batch": list(example.shape),
            },
            files={
                name: _file_entry(os.path.join(staging, name))
                for name in ["model.pt", *(_FILES[k] for k in kinds)]
            },
            exported=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        )
        _write_json(spec_path, spec)
        os.chmod(staging, 0o755)
        names = ["model.pt", "spec.json", *(_FILES[k] for k in kinds)]
        _move_into_place(staging, target, names)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return ExportResult(
        out=target,
        trial=int(row["trial"]),
        pick=how,
        files=tuple(os.path.join(target, n) for n in names),
        spec=spec,
        verification=verification,
        rebuilt=rebuilt,
    )
