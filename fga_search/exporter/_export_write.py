"""The export's files: the ``--out`` folder's safety rules, the formats, and moving them into place.

Every file is written to a staging folder beside ``--out`` first; :func:`move_into_place` puts
them there at the end, spec.json last: the marker that makes a folder an export of ours. A
failure before then leaves ``--out`` as it was.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import sys
import tempfile
import warnings
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import nn

from fga_search._util._errors import first_line
from fga_search._util._paths import check_out_path
from fga_search.deploy._runtime_latency import onnx_files_latency, write_onnx
from fga_search.latency import Target

from ._export_spec import FILES, OWN_FILES, SPEC_FORMAT

__all__ = [
    "ExportFormatError",
    "check_out",
    "earlier_export",
    "exporting",
    "file_entry",
    "has_onnxruntime",
    "move_into_place",
    "write_json",
    "write_onnx_graph",
    "write_torchscript",
]


class ExportFormatError(ValueError):
    """The model cannot be written in a requested format (an operator the exporter lacks...)."""


# -- the --out folder ------------------------------------------------------------------------
def _nearest_existing(path: str) -> str:
    parent = path
    while not os.path.lexists(parent):
        parent = os.path.dirname(parent)
    return parent


def earlier_export(target: str) -> dict[str, Any]:
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
    for name in OWN_FILES:
        p = os.path.join(target, name)
        if os.path.lexists(p) and (os.path.isdir(p) or not os.path.isfile(p)):
            raise refuse(f"{name} there is not a file")
    return spec


def check_out(out: object) -> tuple[str, str]:
    """The export folder (absolute) and the existing folder above it to stage the files in."""
    if not isinstance(out, (str, os.PathLike)) or not os.fspath(out):
        raise ValueError(f"out must be a folder path, got {out!r}")
    check_out_path(out)  # creatable: no file on the way, no name or path over the limits
    target = os.path.abspath(os.fspath(out))
    if os.path.lexists(target):
        if not os.path.isdir(target):
            raise ValueError(f"--out {target} exists and is not a folder")
        if os.listdir(target):
            earlier_export(target)
    anchor = _nearest_existing(os.path.dirname(target))  # a folder: check_out_path saw to it
    try:  # a real probe: permissions alone say little (root, read-only file systems)
        os.rmdir(tempfile.mkdtemp(prefix=".fga-export-probe-", dir=anchor))
    except OSError as exc:
        raise ValueError(f"--out {target}: cannot write in {anchor} ({exc.strerror or exc})") from None
    return target, anchor


def move_into_place(staging: str, target: str, names: Sequence[str]) -> None:
    """Put the export's files (``names``, in ``staging``) in ``target``. A new or empty folder:
    the staging folder is renamed into place (all at once). An earlier export of ours: checked
    again, then its files are replaced one by one (``os.replace``, spec.json last) and the files it
    listed that this export does not write are removed; nothing else in the folder is touched."""
    parent = os.path.dirname(target)
    os.makedirs(parent, exist_ok=True)
    if not (os.path.isdir(target) and os.listdir(target)):
        os.replace(staging, target)  # also over an empty folder
        return
    old = earlier_export(target)
    files = old.get("files")
    listed: dict[str, Any] = files if isinstance(files, dict) else {}
    for name in names:
        if name != "spec.json":
            os.replace(os.path.join(staging, name), os.path.join(target, name))
    for name in FILES.values():  # the earlier export's files that this one does not write
        path = os.path.join(target, name)
        if name in listed and name not in names and os.path.isfile(path):
            os.remove(path)
    os.replace(os.path.join(staging, "spec.json"), os.path.join(target, "spec.json"))


def file_entry(path: str) -> dict[str, Any]:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return {"bytes": os.path.getsize(path), "sha256": h.hexdigest()}


def write_json(path: str, data: dict[str, Any]) -> None:
    """Write ``data`` to ``path`` whole or not at all (a temporary file beside it, then renamed)."""
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump(data, f, indent=2)
        f.write("\n")
    os.replace(tmp, path)


# -- the formats -----------------------------------------------------------------------------
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
def exporting(fmt: str, hint: str) -> Iterator[None]:
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


TORCHSCRIPT_HINT = "export without it"
ONNX_HINT = "export without onnx (model.pt and TorchScript do not need it)"


def write_torchscript(model: nn.Module, example: torch.Tensor, path: str) -> None:
    """Trace ``model`` as it runs (its chosen CPU execution) and save it."""
    with exporting("TorchScript", TORCHSCRIPT_HINT), torch.no_grad():
        torch.jit.trace(model, example).save(path)


def _write_onnx_checked(model: nn.Module, example: torch.Tensor, path: str) -> None:
    with exporting("ONNX", ONNX_HINT):
        write_onnx(model, example, path)
    try:
        import onnx

        onnx.checker.check_model(path)
    except ImportError:
        pass


def has_onnxruntime() -> bool:
    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        return False
    return True


def write_onnx_graph(
    loaded: nn.Module,
    grouped: nn.Module,
    cpu_execution: dict[str, Any] | None,
    *,
    example: torch.Tensor,
    path: str,
    target: Target,
    runs: int,
) -> dict[str, Any] | None:
    """Write the ONNX file; return how its graph was chosen (None: grouped, not timed). ONNX
    Runtime picks its own kernels, so the FGA layers are exported as grouped convs, unless the
    export kept another CPU execution for PyTorch (block-diagonal or folded convs) and ONNX Runtime
    runs that graph faster, timed side by side (``runs`` runs; 0: not timed, grouped). ``grouped``
    is ``loaded`` with every FGA layer grouped."""
    if not (runs and cpu_execution and cpu_execution.get("kept") and has_onnxruntime()):
        _write_onnx_checked(grouped, example, path)
        return None
    folder = os.path.dirname(path)
    graphs = {"grouped": grouped, "cpu_execution": loaded}
    paths = {name: os.path.join(folder, f".{name}.onnx") for name in graphs}
    for name, model in graphs.items():
        _write_onnx_checked(model, example, paths[name])
    input_shape = tuple(example.shape[1:])
    ms = onnx_files_latency(paths, input_shape=input_shape, target=target, runs=runs)
    chosen = "cpu_execution" if ms["cpu_execution"] < ms["grouped"] else "grouped"
    os.replace(paths[chosen], path)
    for name in graphs:
        if name != chosen:
            os.remove(paths[name])
    return {
        "graph": chosen,
        "onnxruntime_ms": ms,
        "runs": runs,
        "measured": f"ONNX Runtime, batch {target.batch}, side by side in the exporting process, medians",
    }
