"""Every name a benchmark or example script takes from the package exists: they run for minutes and outside CI, so a
renamed function broke one unseen (``file_breakdown.py`` read ``export.compressed.write_container`` after it moved)."""

from __future__ import annotations

import ast
import importlib
import pathlib
import types

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
SCRIPTS = sorted([*(ROOT / "benchmarks").glob("*.py"), *(ROOT / "examples").glob("*.py")])


def _package_names(tree: ast.Module) -> tuple[list[tuple[str, str]], dict[str, types.ModuleType]]:
    """``(module, name)`` for every ``from lightning_compress... import name``, and the package modules bound to a
    name (``import lightning_compress.x as y``, ``from lightning_compress import x`` where ``x`` is a module)."""
    wanted: list[tuple[str, str]] = []
    modules: dict[str, types.ModuleType] = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "lightning_compress":
            for alias in node.names:
                wanted.append((node.module, alias.name))
                value = getattr(importlib.import_module(node.module), alias.name, None)
                if isinstance(value, types.ModuleType):
                    modules[alias.asname or alias.name] = value
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == "lightning_compress" and alias.asname:
                    modules[alias.asname] = importlib.import_module(alias.name)
    return wanted, modules


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_the_names_a_script_takes_from_the_package_exist(script: pathlib.Path) -> None:
    tree = ast.parse(script.read_text(), filename=str(script))
    wanted, modules = _package_names(tree)
    missing = []
    for module, name in wanted:
        found = importlib.import_module(module)
        if not hasattr(found, name) and importlib.util.find_spec(f"{module}.{name}") is None:
            missing.append(f"{module}.{name}")
    for node in ast.walk(tree):
        if not (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name)):
            continue
        bound = modules.get(node.value.id)
        if bound is not None and not hasattr(bound, node.attr):
            missing.append(f"{bound.__name__}.{node.attr}")
    assert not missing, f"{script.name} uses names the package does not have: {missing}"


def test_a_name_that_moved_is_found() -> None:
    """The check itself: the read that broke ``file_breakdown.py`` is reported."""
    tree = ast.parse("from lightning_compress.export import compressed\nwrite = compressed.write_container\n")
    _, modules = _package_names(tree)
    assert "compressed" in modules and not hasattr(modules["compressed"], "write_container")
