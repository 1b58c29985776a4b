"""The package's folders are its layers, and each layer imports only the layers below it; imports sit at the top of
modules (but for a few heavy libraries one option needs), and no import, function-local or not, closes a loop.

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


# Libraries only one export format or option needs, imported where it is used (each with a comment saying why):
# the rest of fraqat runs without their import cost, and Lightning stays out of eval and export.
LAZY_LIBRARIES = {"onnx", "onnxruntime", "onnxscript", "ml_dtypes", "torchao", "gguf", "lightning"}
# The two modules that run before a command's heavy imports: the console scripts' entry (`--help` without torch or
# Hydra) and the Hydra callbacks that refuse a bad argument before diffusers is imported.
BEFORE_THE_COMMAND = {"fraqat_cli.entry": {"hydra", "omegaconf", "yaml"},
                      "fraqat_cli.cli": {"diffusers", "transformers"}}


def import_graph() -> dict[str, set[str]]:
    """Every fraqat_cli module -> the fraqat_cli modules it imports, function-local imports included."""
    return {m: {i for i in imports_of(p) if i in MODULES and i != m} for m, p in MODULES.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, str] = {}

    def visit(module: str, trail: list[str]) -> list[str] | None:
        state[module] = "open"
        for imported in sorted(graph[module]):
            if state.get(imported) == "open":
                return trail[trail.index(imported):] + [imported]
            if imported not in state and (cycle := visit(imported, trail + [imported])):
                return cycle
        state[module] = "done"
        return None

    for module in sorted(graph):
        if module not in state and (cycle := visit(module, [module])):
            return cycle
    return None


def test_imports_have_no_cycle_counting_function_local_ones():
    cycle = find_cycle(import_graph())
    assert cycle is None, f"import cycle: {' -> '.join(cycle)}"


def function_local_imports(path: Path) -> list[tuple[int, str, bool]]:
    """(line, imported module, whether a comment says why) of each import below a module's top level."""
    source = path.read_text()
    tree, lines = ast.parse(source), source.splitlines()
    top = {id(node) for node in tree.body}
    found = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.Import, ast.ImportFrom)) and id(node) not in top:
            name = node.names[0].name if isinstance(node, ast.Import) else node.module or ""
            commented = "#" in lines[node.lineno - 1] or lines[node.lineno - 2].strip().startswith("#")
            found.append((node.lineno, name, commented))
    return found


@pytest.mark.parametrize("module", sorted(MODULES))
def test_imports_sit_at_the_top_but_for_lazy_libraries_with_a_reason(module):
    for line, name, commented in function_local_imports(MODULES[module]):
        allowed = LAZY_LIBRARIES | BEFORE_THE_COMMAND.get(module, set())
        assert name.split(".")[0] in allowed, \
            f"{module}:{line} imports {name} inside a function; allowed there: {sorted(allowed)}"
        assert commented, f"{module}:{line} imports {name} inside a function without a comment saying why"


def test_the_checks_see_a_cycle_and_a_hidden_import(tmp_path):
    """The checks themselves can fail: a loop through a function-local import, and a hidden import."""
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None
    hidden = tmp_path / "hidden.py"
    hidden.write_text("def f():\n    import numpy\n\n\ndef g():\n    import onnx  # format=onnx only\n")
    assert function_local_imports(hidden) == [(2, "numpy", False), (6, "onnx", True)]


def test_the_check_sees_an_upward_import(tmp_path):
    """The check itself can fail: a models module importing the trainer is reported."""
    fake = tmp_path / "fraqat_cli" / "models" / "bad.py"
    fake.parent.mkdir(parents=True)
    fake.write_text("def f():\n    from fraqat_cli.train.command import train\n")
    assert imports_of(fake) == {"fraqat_cli.train.command"}
    assert LAYERS.index(layer_of("fraqat_cli.train.command")) > LAYERS.index(layer_of("fraqat_cli.models.bad"))
