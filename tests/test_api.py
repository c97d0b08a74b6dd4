"""The public surface: ``import fga_search`` is lazy, and every public name resolves."""

from __future__ import annotations

import ast
import importlib
import inspect
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import fga_search

REPO = Path(__file__).resolve().parents[1]
HEAVY = ("optuna", "pandas", "pyarrow", "ray", "torchvision", "torch")


def _python(code: str) -> dict:
    """Run ``code`` in a fresh interpreter on this checkout; it prints one JSON line."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_import_is_lazy() -> None:
    out = _python(
        "import json, sys; import fga_search; "
        f"print(json.dumps({{'file': fga_search.__file__, 'loaded': [m for m in {HEAVY!r} if m in sys.modules], "
        "'private': sorted(m for m in sys.modules if m.startswith('fga_search.'))}))"
    )
    assert Path(out["file"]).resolve() == REPO / "fga_search" / "__init__.py"
    assert out["loaded"] == []
    assert out["private"] == ["fga_search._util", "fga_search._util._lazy", "fga_search._version"]  # no torch


def test_first_use_imports_only_what_the_name_needs() -> None:
    out = _python(
        "import json, sys; import fga_search; fga_search.Normalization; "
        f"print(json.dumps([m for m in {HEAVY!r} if m in sys.modules]))"
    )
    assert "optuna" not in out and "pandas" not in out and "ray" not in out
    assert "torch" in out  # _loader needs it: the name did resolve


def test_every_public_name_resolves() -> None:
    assert len(fga_search.__all__) == len(set(fga_search.__all__))
    assert set(fga_search.__all__) == {"__version__", *fga_search._LAZY}
    for name in fga_search.__all__:
        value = getattr(fga_search, name)
        assert value is not None, name
        if inspect.isclass(value) or inspect.isfunction(value):  # not KEEP, Plan (an alias), __version__
            assert value.__module__.startswith("fga_search."), (name, value.__module__)
    assert set(fga_search.__all__) <= set(dir(fga_search))
    namespace: dict = {}
    exec("from fga_search import *", namespace)
    assert set(fga_search.__all__) <= set(namespace)


def test_unknown_name_is_an_attribute_error() -> None:
    with pytest.raises(AttributeError, match="has no attribute 'no_such_name'"):
        fga_search.no_such_name  # noqa: B018
    assert not hasattr(fga_search, "_search_internal")


def test_errors_and_normalization_are_public() -> None:
    from fga_search.engine._setup import LatencyBudgetError
    from fga_search.exporter._export import ExportFormatError, ExportVerificationError
    from fga_search.models._checkpoint import WeightsError
    from fga_search.models._loader import Normalization

    assert fga_search.LatencyBudgetError is LatencyBudgetError
    assert fga_search.ExportVerificationError is ExportVerificationError
    assert fga_search.ExportFormatError is ExportFormatError
    assert fga_search.WeightsError is WeightsError
    assert fga_search.Normalization is Normalization
    for error in (LatencyBudgetError, ExportFormatError, WeightsError):
        assert issubclass(error, ValueError)
    assert issubclass(ExportVerificationError, RuntimeError)
    assert fga_search.Normalization(mean=(0.5,), std=(0.25,)).to_dict() == {"mean": [0.5], "std": [0.25]}


def test_type_checking_imports_match_the_lazy_table() -> None:
    """The names type checkers see (the ``TYPE_CHECKING`` block) are the lazy table's, from the same
    modules: neither can drift from the other."""
    tree = ast.parse((REPO / "fga_search" / "__init__.py").read_text())
    block = next(
        node for node in tree.body if isinstance(node, ast.If) and ast.unparse(node.test) == "TYPE_CHECKING"
    )
    seen = {
        alias.name: f".{node.module}"
        for node in block.body
        if isinstance(node, ast.ImportFrom)
        for alias in node.names
    }
    assert seen == fga_search._LAZY


def test_run_config_documents_every_option() -> None:
    from fga_search import RunConfig

    doc = RunConfig.__doc__ or ""
    assert [f for f in RunConfig.field_names() if f"``{f}``" not in doc] == []
    with pytest.raises(TypeError):
        RunConfig("runs/x")  # type: ignore[misc]  # keyword-only
    with pytest.raises(
        ValueError, match=r"^--budget-metric must be one of flops, params, latency, got 'macs'$"
    ):
        RunConfig(out="runs/x", budget_metric="macs")


@pytest.mark.slow
def test_search_takes_a_run_config(tmp_path: Path) -> None:
    from fga_search import RunConfig, search

    config = RunConfig(
        out=str(tmp_path / "run"), budget=0.3, trials=2, epochs=0.0, quiet=True, front_latency_runs=0
    )
    result = search(config)
    assert result.run_dir == config.out and result.finished == 2 and result.trials == 2
    assert result.front and all(r["flops_ratio"] <= 0.3 for r in result.front)
    recorded = json.loads((tmp_path / "run" / "run.json").read_text())["config"]
    assert recorded == config.to_dict()
    resumed = search(config, trials=3)  # a copy of config with trials=3: the run resumes to 3
    assert resumed.finished == 3 and resumed.trials == 3
    assert config.trials == 2  # the caller's config is unchanged

    for bad, error, message in [
        ((), TypeError, r"needs a RunConfig or out="),
        ((str(tmp_path / "y"),), TypeError, r"takes a RunConfig, got config='.*y'"),
    ]:
        with pytest.raises(error, match=message):
            search(*bad)
    with pytest.raises(ValueError, match=r"^--trials must be >= 1, got 0$"):
        search(RunConfig(out=str(tmp_path / "z")), trials=0)
    with pytest.raises(ValueError, match=r"unknown search option\(s\) \['budgett'\]"):
        search(RunConfig(out=str(tmp_path / "z")), budgett=0.3)
    assert not (tmp_path / "y").exists() and not (tmp_path / "z").exists()


def test_no_public_name_is_a_subpackage() -> None:
    """Importing a subpackage binds its name on the package: a subpackage named like a public
    function (``fga_search.search``, ``fga_search.export``) would replace that function."""
    subpackages = {p.name for p in (REPO / "fga_search").iterdir() if (p / "__init__.py").is_file()}
    assert {"core", "engine", "exporter"} <= subpackages
    assert not subpackages & set(fga_search.__all__)
    importlib.import_module("fga_search.engine._search")
    importlib.import_module("fga_search.exporter._export")
    assert callable(fga_search.search) and callable(fga_search.export)
