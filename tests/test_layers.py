"""The package's layers import one way, top to bottom, with no cycle and no import hidden in a function.

``experiment``/``cli`` -> ``attacks``/``export``/``command_line`` -> ``defense`` -> ``models`` -> ``checkpoints``/``routing`` ->
``nets``/``losses``/``data`` -> utilities (``errors``, ``registry``, ``files``, ``progress``, ``tracking``).
A module may import its own layer or lower ones. Checked on the source (every import statement, module
level or not), and once by importing every module in a fresh interpreter.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from graphlib import CycleError, TopologicalSorter
from pathlib import Path

import pytest

from tests.helpers.files import REPO_ROOT

PACKAGE = REPO_ROOT / "edm_lightning"

LAYERS = [
    {"errors", "registry", "files", "progress", "tracking", "optim", "protocol", "seeding"},
    {"data", "nets", "losses"},
    {"checkpoints", "routing"},
    {"models"},
    {"defense"},
    {"attacks", "export", "command_line"},  # command_line: reading and writing configs for the CLIs above
    {"experiment", "cli", "serve"},
    {"__main__"},  # the edm-lightning command: dispatches to the CLI, the runner and the data tool
]


def layer_of(module: str) -> int:
    top = module.split(".")[1]
    for index, names in enumerate(LAYERS):
        if top in names:
            return index
    raise AssertionError(f"{module} belongs to no layer: add edm_lightning.{top} to LAYERS")


def modules() -> dict[str, Path]:
    found = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(REPO_ROOT).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        found[name] = path
    return found


def imports(path: Path, package: str) -> list[tuple[str, int, bool, str]]:
    """``(imported module, line, inside a function, source line)`` for every package import in ``path``."""
    tree = ast.parse(path.read_text())
    lines = path.read_text().splitlines()
    found = []

    def visit(node: ast.AST, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            nested = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef))
            targets: list[str] = []
            if isinstance(child, ast.Import):
                targets = [alias.name for alias in child.names]
            elif isinstance(child, ast.ImportFrom):
                if child.level:  # relative import: resolve against this package
                    base = package.rsplit(".", child.level - 1)[0] if child.level > 1 else package
                    targets = [f"{base}.{child.module}" if child.module else base]
                else:
                    targets = [child.module or ""]
                targets = [f"{targets[0]}.{alias.name}" for alias in child.names]  # "from pkg import mod" names pkg.mod
            for target in targets:
                found.append((target, child.lineno, in_function, lines[child.lineno - 1]))
            visit(child, nested)

    visit(tree, False)
    return found


def package_of(name: str, path: Path) -> str:
    return name if path.name == "__init__.py" else name.rsplit(".", 1)[0]


def test_every_module_imports_only_its_own_layer_or_lower():
    upward = []
    for name, path in modules().items():
        for target, line, _, _ in imports(path, package_of(name, path)):
            if target.startswith("edm_lightning.") and layer_of(target) > layer_of(name):
                upward.append(f"{path.relative_to(REPO_ROOT)}:{line} imports {target}")
    assert not upward, "imports that point up the layers:\n" + "\n".join(upward)


def test_no_import_hides_in_a_function_except_commented_optional_dependencies():
    hidden = []
    for name, path in modules().items():
        for target, line, in_function, source in imports(path, package_of(name, path)):
            if not in_function:
                continue
            if target.startswith("edm_lightning") or "#" not in source:
                hidden.append(f"{path.relative_to(REPO_ROOT)}:{line}: {source.strip()}")
    why = "function-local imports (package modules, or third-party ones without a comment saying why):\n"
    assert not hidden, why + "\n".join(hidden)


def test_module_level_imports_form_no_cycle():
    graph: dict[str, set[str]] = {}
    known = modules()
    for name, path in known.items():
        deps = set()
        for target, _, in_function, _ in imports(path, package_of(name, path)):
            if in_function or not target.startswith("edm_lightning"):
                continue
            while target not in known and "." in target:  # "from pkg.mod import name" names pkg.mod
                target = target.rsplit(".", 1)[0]
            if target != name:
                deps.add(target)
        graph[name] = deps
    try:
        order = list(TopologicalSorter(graph).static_order())
    except CycleError as err:
        pytest.fail(f"import cycle: {' -> '.join(err.args[1])}")
    assert set(order) >= set(known)


def test_every_module_imports_in_a_fresh_interpreter_most_dependent_first():
    """Importing the top of each chain first is the order in which a cycle breaks an import."""
    names = [name for name in modules() if not name.endswith("__main__")]
    names.sort(key=lambda name: (-layer_of(name) if "." in name else 0, name))
    code = f"import importlib\nfor name in {names!r}:\n    importlib.import_module(name)\n"
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]


def test_the_layer_table_covers_the_whole_package():
    for name in modules():
        if name != "edm_lightning":
            layer_of(name)
