"""The package's layers, read from the imports: every import goes down, and no module imports
itself back through others (issue: the house by layer)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
# Lowest first: a module may import its own layer and those below it, never one above.
LAYERS = [
    ("storage", ["capkv.storage"]),
    ("models", ["capkv.models"]),
    ("engine", ["capkv.engine"]),
    ("methods", ["capkv.cap", "capkv.capacity", "baselines", "capkv.interop", "capkv"]),
    ("analysis", ["capkv.analysis"]),
    ("tasks", ["capkv.tasks"]),
    ("results", ["capkv.results"]),
    ("harness", ["capkv.harness"]),
    ("figures", ["capkv.figures"]),
]


def layer_of(module: str) -> int:
    """The rank of ``module``'s layer: its longest matching prefix in :data:`LAYERS`."""
    matches = [
        (len(prefix), rank)
        for rank, (_, prefixes) in enumerate(LAYERS)
        for prefix in prefixes
        if module == prefix or module.startswith(prefix + ".")
    ]
    return max(matches)[1]


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def project_modules() -> dict[str, Path]:
    paths = [*ROOT.glob("capkv/**/*.py"), *ROOT.glob("baselines/**/*.py")]
    return {module_name(path): path for path in paths}


def imports_of(path: Path, modules: dict[str, Path]) -> set[str]:
    """The project modules ``path`` imports, at module level or inside functions."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [f"{node.module}.{alias.name}" for alias in node.names] + [node.module]
        else:
            continue
        for name in names:
            while name and name not in modules:
                name = name.rpartition(".")[0]
            if name:
                found.add(name)
    return found


def graph() -> dict[str, set[str]]:
    modules = project_modules()
    return {name: imports_of(path, modules) - {name} for name, path in modules.items()}


def test_every_module_has_a_layer() -> None:
    for name in project_modules():
        layer_of(name)  # raises ValueError (max of nothing) for a module outside every layer


def test_imports_only_go_down() -> None:
    upward = [
        f"{module} ({LAYERS[layer_of(module)][0]}) imports {target} ({LAYERS[layer_of(target)][0]})"
        for module, targets in graph().items()
        for target in targets
        if layer_of(target) > layer_of(module) and target != "capkv"
    ]
    assert upward == []


def test_no_import_circle() -> None:
    edges = {
        module: {t for t in targets if t != "capkv" and not module.startswith(t + ".")}
        for module, targets in graph().items()
    }
    state: dict[str, int] = {}
    circles = []

    def visit(module: str, path: list[str]) -> None:
        state[module] = 1
        for target in sorted(edges.get(module, ())):
            if state.get(target) == 1:
                circles.append(" -> ".join([*path[path.index(target) :], target]))
            elif target not in state:
                visit(target, [*path, target])
        state[module] = 2

    for module in sorted(edges):
        if module not in state:
            visit(module, [module])
    assert circles == []


@pytest.mark.parametrize("folder", ["engine", "harness", "storage", "results", "analysis"])
def test_each_layer_says_what_it_is(folder: str) -> None:
    docstring = ast.get_docstring(ast.parse((ROOT / "capkv" / folder / "__init__.py").read_text()))
    assert docstring and "import" in docstring
