"""The package's folders are its layers, and each layer imports only the layers below it.

base (cli, files, cache, checks, errors, stored_config) < quant < models < data < student < train < plan < export
< evaluate. Every import
counts, function-local ones too: a lazy import upwards is still a dependency a reader has to follow.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "fraqat_cli"
LAYERS = ["base", "quant", "models", "data", "student", "train", "plan", "export", "evaluate"]


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def layer_of(module: str) -> str:
    """`fraqat_cli.<folder>...` is the folder's layer; a top-level module is the base."""
    parts = module.split(".")
    if len(parts) > 2 or (len(parts) == 2 and (PACKAGE / parts[1]).is_dir()):
        return parts[1]
    return "base"


def imports_of(path: Path, top_level_only: bool = False) -> set[str]:
    """The fraqat_cli modules `path` imports (a `from package import name` counts as the package)."""
    tree = ast.parse(path.read_text())
    nodes = tree.body if top_level_only else ast.walk(tree)
    found = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names if alias.name.startswith("fraqat_cli")}
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("fraqat_cli"):
            found.add(node.module)
    return found


MODULES = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def test_every_folder_is_a_known_layer():
    folders = {p.name for p in PACKAGE.iterdir() if p.is_dir() and (p / "__init__.py").is_file()} - {"conf"}
    assert folders == set(LAYERS) - {"base"}
    assert {layer_of(m) for m in MODULES} == set(LAYERS)


@pytest.mark.parametrize("module", sorted(MODULES))
def test_a_module_imports_no_layer_above_its_own(module):
    rank = LAYERS.index(layer_of(module))
    upward = sorted(imported for imported in imports_of(MODULES[module])
                    if LAYERS.index(layer_of(imported)) > rank)
    assert not upward, f"{module} ({layer_of(module)}) imports from a layer above it: {upward}"


def test_the_quantization_core_imports_only_torch_and_itself():
    stdlib = set(sys.stdlib_module_names) | {"__future__"}
    for module, path in MODULES.items():
        if layer_of(module) != "quant" or module.endswith(".schedules"):
            continue
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else (
                [node.module] if isinstance(node, ast.ImportFrom) and node.module else [])
            for name in names:
                top = name.split(".")[0]
                assert top in stdlib or top == "torch" or name.startswith("fraqat_cli.quant"), \
                    f"{module} imports {name}: the core must lift out with torch alone"


def test_module_level_imports_have_no_cycle():
    graph = {m: {i for i in imports_of(p, top_level_only=True) if i in MODULES and i != m} for m, p in MODULES.items()}
    state: dict[str, str] = {}

    def visit(module: str, trail: list[str]) -> None:
        state[module] = "open"
        for imported in graph[module]:
            if state.get(imported) == "open":
                cycle = trail[trail.index(imported):] + [imported] if imported in trail else [module, imported]
                pytest.fail(f"import cycle: {' -> '.join(cycle)}")
            if imported not in state:
                visit(imported, trail + [imported])
        state[module] = "done"

    for module in graph:
        if module not in state:
            visit(module, [module])


def test_the_check_sees_an_upward_import(tmp_path):
    """The check itself can fail: a models module importing the trainer is reported."""
    fake = tmp_path / "fraqat_cli" / "models" / "bad.py"
    fake.parent.mkdir(parents=True)
    fake.write_text("def f():\n    from fraqat_cli.train.command import train\n")
    assert imports_of(fake) == {"fraqat_cli.train.command"}
    assert LAYERS.index(layer_of("fraqat_cli.train.command")) > LAYERS.index(layer_of("fraqat_cli.models.bad"))
