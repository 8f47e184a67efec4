"""The packages import each other without circles: every import counts, at the top of a module,
inside a function, or under TYPE_CHECKING, so no circle hides behind an import on first use."""

from __future__ import annotations

import ast
from pathlib import Path

from tests.paths import ROOT

PACKAGES = ("replicas", "cluster", "router", "protos")


def module_files(root: Path = ROOT) -> dict[str, Path]:
    """{dotted module name: file} of our packages (generated protobuf modules left out)."""
    mods = {}
    for package in PACKAGES:
        for path in (root / package).rglob("*.py"):
            if path.name.endswith(("_pb2.py", "_pb2_grpc.py")):
                continue
            parts = path.relative_to(root).with_suffix("").parts
            if parts[-1] == "__init__":
                parts = parts[:-1]
            mods[".".join(parts)] = path
    return mods


def import_graph(mods: dict[str, Path]) -> dict[str, set[str]]:
    """{module: the modules of ours it imports anywhere in its text}."""

    def ours(name: str) -> str | None:
        while name and name not in mods:
            name = name.rpartition(".")[0]
        return name or None

    graph: dict[str, set[str]] = {m: set() for m in mods}
    for module, path in mods.items():
        package = module if path.name == "__init__.py" else module.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:  # relative: from the package, up level - 1
                    up = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                    base = ".".join([*up, base] if base else up)
                names = [base, *(f"{base}.{a.name}" for a in node.names)]
            else:
                continue
            for name in names:
                target = ours(name)
                if target is not None and target != module:
                    graph[module].add(target)
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_cycle_finder_finds_a_circle_through_a_function_local_import(tmp_path):
    (tmp_path / "replicas").mkdir()
    (tmp_path / "replicas" / "a.py").write_text("from replicas.b import f\n")
    (tmp_path / "replicas" / "b.py").write_text("def f():\n    from replicas import a\n")
    (tmp_path / "replicas" / "c.py").write_text("from . import a\n")
    for package in PACKAGES[1:]:
        (tmp_path / package).mkdir()
    graph = import_graph(module_files(tmp_path))
    assert graph["replicas.c"] == {"replicas.a"}
    assert cycles(graph) == [["replicas.a", "replicas.b"]]


def test_our_packages_import_each_other_without_circles():
    found = cycles(import_graph(module_files()))
    assert not found, "import circles (each a set of modules that import each other): " + "; ".join(
        " <-> ".join(c) for c in found
    )


FORBIDDEN = (
    # (modules under this prefix, may not import modules under this one, because)
    ("replicas.kernels", "replicas.model", "kernels serve the model; they know no model code"),
    ("replicas.kernels", "replicas.engine", "kernels know no engine"),
    ("replicas.model", "replicas.engine", "the model runs without an engine"),
    ("replicas.model", "replicas.prefix_cache", "the model knows no cache"),
    (
        "replicas.engine",
        "replicas.prefix_cache",
        "the engine gets its prefix cache through an interface (replicas.engine.prefix_interface)",
    ),
    ("replicas", "cluster", "the compute plane knows no Serve deployment"),
    ("replicas", "router", "the compute plane knows no request plane"),
    ("router", "cluster", "the request plane knows no Serve deployment"),
)
"""Edges that would turn the layers of docs/architecture.md upside down."""

MODEL_ONLY = ("replicas.model.exaone_moe", "replicas.model.layers", "replicas.model.moe")
"""The model's own modules, which import no loader."""


def layer_violations(graph: dict[str, set[str]]) -> list[str]:
    def under(module: str, prefix: str) -> bool:
        return module == prefix or module.startswith(prefix + ".")

    found = []
    for module, targets in sorted(graph.items()):
        for target in sorted(targets):
            for importer, forbidden, why in FORBIDDEN:
                if under(module, importer) and under(target, forbidden):
                    found.append(f"{module} imports {target} ({why})")
            if module in MODEL_ONLY and target == "replicas.model.loader":
                found.append(f"{module} imports {target} (the model imports no loader)")
    return found


def test_the_layer_check_names_an_upside_down_import():
    graph = {"replicas.engine.engine": {"replicas.prefix_cache.manager"}, "replicas.a": set()}
    [violation] = layer_violations(graph)
    assert violation.startswith("replicas.engine.engine imports replicas.prefix_cache.manager")


def test_every_layer_imports_only_the_ones_below_it():
    found = layer_violations(import_graph(module_files()))
    assert not found, "\n".join(found)
