"""The package's import structure, by static analysis of its import statements (no module is run).

Every ``import`` and ``from ... import`` of a ``fga_search`` module counts, at module level and
inside functions (a lazy import is still an import: it runs on first use); imports under
``if TYPE_CHECKING:`` run only in a type checker, so they count for the layers but not for cycles.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "fga_search"

# The layers, lowest first: a module may import from its own layer and the ones before it, never
# from a later one. A layer is a list of units: a subpackage (everything below it) or a top-level
# module. Every unit must be listed, so a new subpackage or top-level module is placed on purpose.
LAYERS: dict[str, tuple[str, ...]] = {
    "util": ("_version", "_util"),  # atomic writes, paths, errors, progress lines, storage URLs
    "core": ("core",),  # FGA layer, geometry, plan, surgery, refinement, FLOPs, spectra, BN: torch only
    "data": ("data",),  # datasets as uint8 tensors
    "models": ("models",),  # the zoo, checkpoints, normalization and device-resident splits
    "latency": ("latency",),  # targets, lookup tables, timing (the public fga_search.latency)
    "train": ("train",),  # fine-tune, evaluate, recalibrate, one trial
    "deploy": ("deploy",),  # CPU execution choices, ONNX, runtime latency
    "runs": ("runs",),  # the run folder, its records, front/best/knee, read-only views
    "report": ("report",),  # the HTML report: only reads a run folder
    "engine": (
        "engine",
    ),  # the search engine: space, cost, repair, strategies, driver, executors, config, set-up
    "exporter": ("exporter",),  # export a run's pick: rebuild, fine-tune, write, verify, time
    "cli": ("_cli", "_cli_commands"),
    "api": ("",),  # the package itself (fga_search/__init__.py)
}


def unit(module: str) -> str:
    """The LAYERS unit of a module: the first name below fga_search ("" for the package)."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def _module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def import_graph(root: Path) -> tuple[dict[str, set[str]], dict[str, set[str]]]:
    """``(runtime, type_only)``: for each module of the package at ``root``, the package's modules
    it imports (at any depth: module level, functions, methods), and those it imports only under
    ``if TYPE_CHECKING:``."""
    paths = {_module_name(p, root): p for p in sorted(root.rglob("*.py"))}
    packages = {_module_name(p, root) for p in paths.values() if p.name == "__init__.py"}
    top = root.name
    runtime: dict[str, set[str]] = {name: set() for name in paths}
    type_only: dict[str, set[str]] = {name: set() for name in paths}

    def target(name: str) -> str | None:
        while name and name not in paths:  # a name inside a module: the module
            name = name.rpartition(".")[0]
        return name or None

    def visit(module: str, node: ast.AST, typing_only: bool) -> None:
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            for child in node.body:
                visit(module, child, True)
            for child in node.orelse:
                visit(module, child, typing_only)
            return
        found: list[str] = []
        if isinstance(node, ast.Import):
            found = [alias.name for alias in node.names if alias.name.split(".")[0] == top]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = module if module in packages else module.rpartition(".")[0]
                for _ in range(node.level - 1):
                    base = base.rpartition(".")[0]
                source = f"{base}.{node.module}" if node.module else base
            else:
                source = node.module or ""
            if source.split(".")[0] == top:
                # ``from PKG import name``: the submodule PKG.name if there is one, else PKG
                found = [f"{source}.{alias.name}" for alias in node.names] or [source]
        for name in found:
            dep = target(name)
            if dep is not None and dep != module:
                (type_only if typing_only else runtime)[module].add(dep)
        for child in ast.iter_child_nodes(node):
            visit(module, child, typing_only)

    for name, path in paths.items():
        visit(name, ast.parse(path.read_text(), filename=str(path)), False)
    for name in paths:
        type_only[name] -= runtime[name]
    return runtime, type_only


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Import cycles (``a -> b -> ... -> a``): in each strongly connected component of the graph,
    shortest ones until every module of the component is on one."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[set[str]] = []

    def strongconnect(v: str) -> None:  # Tarjan's algorithm
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                strongconnect(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = set()
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.add(w)
                if w == v:
                    break
            if len(component) > 1 or v in graph.get(v, ()):
                components.append(component)

    for v in sorted(graph):
        if v not in index:
            strongconnect(v)
    cycles = []
    for component in components:
        covered: set[str] = set()
        for start in sorted(component):  # shortest cycles until each module of it is on one
            if start not in covered:
                cycles.append(_shortest_cycle(graph, component, start))
                covered.update(cycles[-1])
    return cycles


def _shortest_cycle(graph: dict[str, set[str]], component: set[str], start: str) -> list[str]:
    """Breadth-first from ``start`` back to it, inside its strongly connected component."""
    parents: dict[str, str] = {}
    frontier = [start]
    while start not in parents:
        nxt = []
        for v in frontier:
            for w in sorted(graph[v] & component):
                if w not in parents:
                    parents[w] = v
                    nxt.append(w)
        frontier = nxt
    path = [start]  # backwards: start, the module importing start, the one importing that, ...
    v = parents[start]
    while v != start:
        path.append(v)
        v = parents[v]
    return [start, *reversed(path[1:]), start]


def _format(cycle: list[str]) -> str:
    return " -> ".join(cycle)


@pytest.fixture(scope="module")
def graphs() -> tuple[dict[str, set[str]], dict[str, set[str]]]:
    return import_graph(PACKAGE)


def test_the_analysis_sees_every_kind_of_import(graphs: tuple[dict, dict]) -> None:
    """Not vacuous: it finds module-level, relative, lazy (in a function) and type-only imports."""
    runtime, type_only = graphs
    assert len(runtime) >= 40
    assert "fga_search.core._fga" in runtime["fga_search.core._surgery"]  # module level
    assert "fga_search.engine._ray_backend" in runtime["fga_search.engine._search"]  # inside run_search
    assert "fga_search.report._report" in runtime["fga_search.engine._policy"]  # inside refresh_report
    assert (
        "fga_search.engine._config" in type_only["fga_search.exporter._export"]
        or "fga_search.engine._config" in (runtime["fga_search.exporter._export"])
    )
    assert "fga_search.models._loader" in type_only["fga_search"]  # __init__'s TYPE_CHECKING block
    # the lazy package imports nothing else
    assert runtime["fga_search"] == {"fga_search._version", "fga_search._util._lazy"}


def test_cycle_finder_reports_a_planted_cycle(tmp_path: Path) -> None:
    pkg = tmp_path / "fga_search"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "_a.py").write_text("from ._b import x\n")
    (pkg / "_b.py").write_text("def f():\n    from fga_search._c import y\n")
    (pkg / "_c.py").write_text(
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from ._d import z\n"
        "def g():\n    if True:\n        from . import _a\n"
    )
    (pkg / "_d.py").write_text("from ._c import w\n")
    runtime, type_only = import_graph(pkg)
    assert runtime["fga_search._c"] == {"fga_search._a"}
    assert type_only["fga_search._c"] == {"fga_search._d"}
    assert find_cycles(runtime) == [["fga_search._a", "fga_search._b", "fga_search._c", "fga_search._a"]]


def test_no_import_cycles(graphs: tuple[dict, dict]) -> None:
    runtime, _ = graphs
    cycles = find_cycles(runtime)
    assert not cycles, "import cycles:\n" + "\n".join(_format(c) for c in cycles)


def test_every_module_has_a_layer(graphs: tuple[dict, dict]) -> None:
    runtime, _ = graphs
    listed = [u for names in LAYERS.values() for u in names]
    assert len(listed) == len(set(listed)), "a unit is in two layers"
    units = {unit(m) for m in runtime}
    assert sorted(units) == sorted(listed), (
        f"not in LAYERS: {sorted(units - set(listed))}; listed but missing: {sorted(set(listed) - units)}"
    )


def test_imports_point_down_the_layers(graphs: tuple[dict, dict]) -> None:
    runtime, type_only = graphs
    by_unit = {u: (i, layer) for i, (layer, names) in enumerate(LAYERS.items()) for u in names}
    rank = {m: by_unit[unit(m)] for m in runtime}
    wrong = [
        f"{module} ({rank[module][1]}) imports {dep} ({rank[dep][1]})"
        for graph in (runtime, type_only)
        for module, deps in sorted(graph.items())
        for dep in sorted(deps)
        if rank[dep][0] > rank[module][0]
    ]
    assert not wrong, "imports against the layers:\n" + "\n".join(wrong)


def test_no_module_over_400_lines() -> None:
    long = {
        str(p.relative_to(PACKAGE.parent)): n
        for p in sorted(PACKAGE.rglob("*.py"))
        if (n := len(p.read_text().splitlines())) > 400
    }
    assert len(list(PACKAGE.rglob("*.py"))) >= 40
    assert not long, f"modules over 400 lines: {long}"
