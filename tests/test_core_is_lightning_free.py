"""The core must work with torch alone: no module under lightning_compress/core imports lightning."""

import ast
import pathlib
import subprocess
import sys

CORE = pathlib.Path(__file__).resolve().parents[1] / "lightning_compress" / "core"


def test_no_lightning_import_in_core_sources():
    offenders = []
    for path in CORE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            offenders += [f"{path.name}: {n}" for n in names if n.split(".")[0] in ("lightning", "pytorch_lightning")]
    assert not offenders


def test_core_imports_without_lightning_loaded():
    code = (
        "import sys, lightning_compress.core.functional, lightning_compress.core.pruner;"
        "assert not any(m.split('.')[0] in ('lightning', 'pytorch_lightning') for m in sys.modules), 'lightning loaded'"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_every_public_module_imports_first_in_a_fresh_interpreter():
    """Importing a module first must not meet a cycle (`lightning_compress.checkpoint` and the callbacks import each
    other's names)."""
    modules = ["lightning_compress.checkpoint", "lightning_compress.callbacks", "lightning_compress.export"]
    for module in modules:
        subprocess.run([sys.executable, "-c", f"import {module}"], check=True)


def test_the_lazily_imported_callbacks_are_listed_by_dir_without_importing_lightning():
    """Trial DB: `dir(lightning_compress)` listed `Any` and `TYPE_CHECKING` but not the callbacks (lazy imports)."""
    code = (
        "import sys, lightning_compress as lc; names = dir(lc);"
        "assert {'IterativePruning', 'QuantizationAwareTraining', 'CompressionMonitor', 'load_qat_checkpoint',"
        " 'prune_', 'QuantConfig'} <= set(names), names;"
        "assert not {'Any', 'TYPE_CHECKING', 'annotations'} & set(names), names;"
        "assert not any(m.split('.')[0] in ('lightning', 'pytorch_lightning') for m in sys.modules), 'lightning loaded'"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
