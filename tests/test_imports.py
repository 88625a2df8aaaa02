"""The package's modules import each other without circles, and only downwards through its layers
(function-level imports included)."""

from __future__ import annotations

import ast
from pathlib import Path

import kprune_cli

PACKAGE = Path(kprune_cli.__file__).resolve().parent


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(path: Path, modules: set[str]) -> set[str]:
    """The package's modules that ``path`` imports anywhere in its code (``from a.b import c`` counts
    ``a.b.c`` when that is a module, else ``a.b``)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found |= {f"{node.module}.{alias.name}" if f"{node.module}.{alias.name}" in modules else node.module
                      for alias in node.names}
    return found & modules


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import circle of ``graph`` as a list of modules, or ``None``."""
    state: dict[str, str] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = "open"
        stack.append(node)
        for target in sorted(graph[node]):
            if state.get(target) == "open":
                return stack[stack.index(target):] + [target]
            if target not in state and (cycle := visit(target)):
                return cycle
        state[node] = "done"
        stack.pop()
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_find_cycle_finds_one():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_the_package_has_no_import_circles():
    paths = sorted(PACKAGE.rglob("*.py"))
    modules = {module_name(path) for path in paths}
    graph = {module_name(path): imported_modules(path, modules) - {module_name(path)} for path in paths}
    assert find_cycle(graph) is None


LAYERS = {
    "runtime": 0,   # job infrastructure: no ML
    "tasks": 1,     # task specs, data, metrics, the calibration sample
    "config": 2,    # Hydra glue (light: no torch at import)
    "models": 2,    # families, masks, slicing, checkpoints, FLOPs
    "deploy": 2,    # ONNX export and ONNX Runtime
    "pruners": 3,   # the methods
    "core": 4,      # the pipeline's stages
    "sweeps": 5,    # many runs at once
    "cli": 6,       # the commands
    "__main__": 7,
}
"""Each subpackage's rank: a module imports only from its own subpackage or from lower ranks."""


def layer(module: str) -> str:
    return module.split(".")[1]


def upward_imports(graph: dict[str, set[str]]) -> list[tuple[str, str]]:
    """The imports of ``graph`` that go to a layer of the same or a higher rank (other subpackage)."""
    return sorted((source, target) for source, targets in graph.items() if source != "kprune_cli"
                  for target in targets if target != "kprune_cli" and layer(source) != layer(target)
                  and LAYERS[layer(target)] >= LAYERS[layer(source)])


def test_upward_imports_are_found():
    graph = {"kprune_cli.runtime.console": {"kprune_cli.models.masks"}, "kprune_cli.models.masks": {"kprune_cli.runtime.errors"}}
    assert upward_imports(graph) == [("kprune_cli.runtime.console", "kprune_cli.models.masks")]


def test_every_subpackage_has_a_layer_and_a_docstring_naming_its_job():
    for path in sorted(PACKAGE.glob("*/__init__.py")):
        assert path.parent.name in LAYERS, f"{path.parent.name}/ has no rank in LAYERS"
        assert ast.get_docstring(ast.parse(path.read_text())), f"{path} has no docstring"


def test_imports_go_down_the_layers_only():
    paths = sorted(PACKAGE.rglob("*.py"))
    modules = {module_name(path) for path in paths}
    graph = {module_name(path): imported_modules(path, modules) - {module_name(path)} for path in paths}
    assert upward_imports(graph) == []
