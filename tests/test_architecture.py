"""The dependency rule of docs/architecture.md, checked from the source: the core (the MoE layer, the models, the
data) never imports the layers built on it (training, checkpoints, studies, commands), so each can be used and
tested alone. Every import counts, also those inside functions."""

import ast
from pathlib import Path

import limoe

PACKAGE = Path(limoe.__file__).parent
# Modules that import nothing of limoe but each other: errors, config checks, optional dependencies, locks,
# output paths, embedding-space evaluation, process-group collectives.
FOUNDATION = {"errors", "checks", "extras", "locks", "outputs", "evaluate", "distributed"}
ALLOWED = {  # component -> the components it may import (besides itself and the foundation)
    **{name: set() for name in FOUNDATION},
    "moe": set(),
    "model": {"moe"},
    "data": set(),
}
# Known today, removed by issue 28's checkpoint package: the registry loads a trained model itself.
EXCEPTIONS = {("model/registry.py", "checkpoint")}


def component(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if parts[0] == "limoe" and len(parts) > 1 else None


def imports(path: Path) -> set[str]:
    """The limoe components `path` imports, `from limoe import x` counted as component x."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            if node.module == "limoe":
                found |= {alias.name for alias in node.names}
            elif component(node.module):
                found.add(component(node.module))
        elif isinstance(node, ast.Import):
            found |= {component(alias.name) for alias in node.names if component(alias.name)}
    return found


def test_the_core_never_imports_the_layers_built_on_it():
    violations = []
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE)
        name = rel.parts[0].removesuffix(".py")
        if name not in ALLOWED:
            continue
        allowed = {name} | ALLOWED[name] | (FOUNDATION if name not in FOUNDATION else {"errors"})
        for target in sorted(imports(path) - allowed):
            if (rel.as_posix(), target) not in EXCEPTIONS:
                violations.append(f"{rel.as_posix()} imports limoe.{target}")
    assert not violations, "the core imports a layer above it:\n" + "\n".join(violations)


def test_the_rule_sees_imports_inside_functions(tmp_path):
    source = tmp_path / "m.py"
    source.write_text("def f():\n    from limoe.train import train\n    import limoe.checkpoint\n"
                      "from limoe import moe\n")
    assert imports(source) == {"train", "checkpoint", "moe"}
