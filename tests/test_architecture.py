"""The dependency rule of docs/architecture.md, checked from the source: the core (the MoE layer, the models, the
data) never imports the layers built on it (training, checkpoints, studies, commands), so each can be used and
tested alone; checkpoints know models and data, not training; and no two modules import each other, directly or
round a circle. Every import counts, also those inside functions; type-only ones (`if TYPE_CHECKING:`) do not.
And no function grows past 80 lines."""

import ast
from pathlib import Path

import pytest

import limoe

PACKAGE = Path(limoe.__file__).parent
# The foundation: errors, old names kept working, config checks, optional dependencies, locks, output paths,
# embedding-space evaluation, the process group, device mesh and collectives.
FOUNDATION = {"errors", "deprecation", "checks", "extras", "locks", "outputs", "evaluate", "parallel.world",
              "parallel.mesh", "parallel.collectives"}
# All the foundation may import of limoe; these two themselves import nothing of it.
FOUNDATION_BASE = {"errors", "deprecation"}
# Packages that span two layers: each module is a component of its own (parallel: the foundation's process group,
# mesh and collectives beside the strategies built on the model).
SPLIT = {"parallel"}
ALLOWED = {  # component -> the components it may import (besides itself and the foundation)
    **{name: set() for name in FOUNDATION},
    "moe": set(),
    "model": {"moe"},
    "data": set(),
    "checkpoint": {"moe", "model", "data"},
}
KNOWN_CIRCLES: list[set[str]] = []  # none left; a new one must be broken, not listed


def component(module: str) -> str | None:
    parts = module.split(".")
    if parts[0] != "limoe" or len(parts) < 2:
        return None
    return f"{parts[1]}.{parts[2]}" if parts[1] in SPLIT and len(parts) > 2 else parts[1]


def _import_nodes(tree: ast.AST):
    """Every import statement of a module, in functions too, but not those under `if TYPE_CHECKING:`."""
    for node in ast.iter_child_nodes(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            yield from (n for child in node.orelse for n in _import_nodes(child))
            continue
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        yield from _import_nodes(node)


def imported_modules(path: Path) -> set[str]:
    """The limoe modules `path` imports; `from limoe.x import y` is module limoe.x.y when y is a module."""
    found = set()
    for node in _import_nodes(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").startswith("limoe"):
            for alias in node.names:
                sub = f"{node.module}.{alias.name}"
                found.add(sub if sub in MODULES or node.module == "limoe" else node.module)
        elif isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names if alias.name.startswith("limoe")}
    return found


def imports(path: Path) -> set[str]:
    """The limoe components `path` imports, `from limoe import x` counted as component x."""
    return {component(module) for module in imported_modules(path) if component(module)}


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module_name(path): path for path in PACKAGE.rglob("*.py")}


def circles(graph: dict[str, set[str]]) -> list[set[str]]:
    """The strongly connected components of more than one module (Tarjan's algorithm): the import circles."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for target in graph.get(node, ()):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            members = {stack.pop()}
            while node not in members:
                members.add(stack.pop())
            if len(members) > 1:
                found.append(members)

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_the_core_never_imports_the_layers_built_on_it():
    violations = []
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE)
        name = component(_module_name(path))
        if name not in ALLOWED:
            continue
        allowed = {name} | ALLOWED[name] | (FOUNDATION if name not in FOUNDATION
                                            else set() if name in FOUNDATION_BASE else FOUNDATION_BASE)
        for target in sorted(imports(path) - allowed):
            violations.append(f"{rel.as_posix()} imports limoe.{target}")
    assert not violations, "a module imports a layer above it:\n" + "\n".join(violations)


def test_no_import_circle_inside_the_package():
    graph = {name: imported_modules(path) & set(MODULES) - {name, "limoe"} for name, path in MODULES.items()}
    found = circles(graph)
    assert [c for c in found if c not in KNOWN_CIRCLES] == [], "modules that import each other"
    assert [c for c in KNOWN_CIRCLES if c not in found] == [], "a known circle is gone: drop it from KNOWN_CIRCLES"


@pytest.mark.parametrize("graph, expected", [
    ({"a": {"b"}, "b": {"c"}, "c": set()}, []),
    ({"a": {"b"}, "b": {"a"}, "c": {"a"}}, [{"a", "b"}]),
    ({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"d", "e"}, "e": {"d"}}, [{"a", "b", "c"}, {"d", "e"}]),
])
def test_circles_are_found(graph, expected):
    assert sorted(map(sorted, circles(graph))) == sorted(map(sorted, expected))


def test_the_rule_sees_imports_inside_functions(tmp_path):
    source = tmp_path / "m.py"
    source.write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from limoe.analysis import x\n"
                      "def f():\n    from limoe.train import train\n    import limoe.checkpoint\n"
                      "from limoe import moe\n")
    assert imports(source) == {"train", "checkpoint", "moe"}


MAX_FUNCTION_LINES = 80  # a function longer than this does several things: split it


def test_no_function_is_longer_than_a_screen():
    long = [f"{path.relative_to(PACKAGE).as_posix()}:{node.lineno} {node.name} ({node.end_lineno - node.lineno + 1})"
            for path in sorted(PACKAGE.rglob("*.py"))
            for node in ast.walk(ast.parse(path.read_text(encoding="utf-8")))
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
            and node.end_lineno - node.lineno + 1 > MAX_FUNCTION_LINES]
    assert not long, f"functions over {MAX_FUNCTION_LINES} lines:\n" + "\n".join(long)
