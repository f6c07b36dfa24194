"""The package's layers: the format imports neither gymnasium nor TensorFlow, and every module
imports only its own layer and the layers below it (no import hidden inside a function to dodge a
loop)."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
import textwrap

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PACKAGE = os.path.join(ROOT, "oxe_envlogger")

# Floors from the bottom; a module may import its own floor and any floor below it.
FLOORS = [
    {"errors"},
    {"format"},
    {"datasets"},
    {"spaces", "collect", "options"},
    {"envlogger", "rlds_logger", "vector", "dm_env_logger", "data_type", "envs"},
    {"cli"},
]
# The datasets' tfds summary is itself a command line program, sharing the CLI helpers.
ALLOWED = {("datasets.tfds_summary", "cli")}


def _floor(part: str) -> int:
    return next(i for i, names in enumerate(FLOORS) if part in names)


def _modules() -> list[tuple[str, str]]:
    out = []
    for dirpath, _, files in os.walk(PACKAGE):
        for f in files:
            path = os.path.join(dirpath, f)
            if not f.endswith(".py") or path == os.path.join(PACKAGE, "__init__.py"):
                continue  # (the package's lazy __init__ names every public module)
            rel = os.path.relpath(path, PACKAGE)[:-3].removesuffix("/__init__")
            out.append((rel.replace(os.sep, "."), path))
    return sorted(out)


def _imports(path: str) -> list[tuple[str, bool]]:
    """``(oxe_envlogger submodule, imported inside a function)`` of every import in a file."""
    tree = ast.parse(open(path).read())
    found = []

    def visit(node, nested):
        for child in ast.iter_child_nodes(node):
            inner = nested or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef))
            if isinstance(child, ast.ImportFrom) and child.module and child.level == 0:
                if child.module == "oxe_envlogger":
                    found.extend((a.name, inner) for a in child.names)
                elif child.module.startswith("oxe_envlogger."):
                    found.append((child.module.removeprefix("oxe_envlogger."), inner))
            elif isinstance(child, ast.Import):
                found.extend((a.name.removeprefix("oxe_envlogger."), inner) for a in child.names
                             if a.name.startswith("oxe_envlogger."))
            visit(child, inner)

    visit(tree, False)
    return found


@pytest.mark.parametrize("module, path", _modules(), ids=[m for m, _ in _modules()])
def test_each_module_imports_only_its_floor_and_below(module, path):
    own = _floor(module.split(".")[0])
    for target, nested in _imports(path):
        top = target.split(".")[0]
        if top not in set().union(*FLOORS):  # a public name of the package (lazy __init__)
            assert own >= _floor("envlogger"), f"{module} imports oxe_envlogger.{target}"
            continue
        if (module, top) in ALLOWED:
            continue
        assert _floor(top) <= own, f"{module} (floor {own}) imports {target} (floor {_floor(top)})"
        # Within the same floor, a function-level import would be one dodging a loop.
        assert not (nested and top == module.split(".")[0] and target != module), (
            f"{module} imports {target} inside a function")


@pytest.mark.parametrize("module", ["oxe_envlogger.format.reader", "oxe_envlogger.format.stats",
                                    "oxe_envlogger.format.layout", "oxe_envlogger.format.record",
                                    "oxe_envlogger.format.specs", "oxe_envlogger.format.codecs",
                                    "oxe_envlogger.format.provenance",
                                    "oxe_envlogger.datasets.recovery"])
def test_the_format_imports_neither_gymnasium_nor_tensorflow(module):
    code = textwrap.dedent(f"""
        import sys
        import {module}
        heavy = ("gymnasium", "tensorflow", "tensorflow_datasets", "jax", "dm_env", "envlogger")
        print(sorted(m for m in sys.modules if m.split(".")[0] in heavy))
    """)
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                         timeout=120, env=dict(os.environ, PYTHONPATH=ROOT))
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "[]", out.stdout
