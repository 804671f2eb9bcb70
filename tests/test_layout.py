"""Project layout rules: spark_core depends on nothing above it."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FORBIDDEN_IN_CORE = (
    "ray",
    "mlflow",
    "fastapi",
    "pydantic",
    "pydantic_settings",
    "sqlalchemy",
    "uvicorn",
    "orchestrator",
    "api",
    "jobs",
)


def _imported_roots(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    roots = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            roots.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            roots.add(node.module.split(".")[0])
    return roots


def test_spark_core_imports_no_orchestration_library() -> None:
    for path in sorted((ROOT / "spark_core").rglob("*.py")):
        bad = _imported_roots(path) & set(FORBIDDEN_IN_CORE)
        assert not bad, f"{path.relative_to(ROOT)} imports {sorted(bad)}"


def test_importing_spark_core_loads_none_of_them() -> None:
    code = (
        "import sys, pkgutil, importlib, spark_core\n"
        "for m in pkgutil.iter_modules(spark_core.__path__):\n"
        "    importlib.import_module('spark_core.' + m.name)\n"
        f"bad = [m for m in {FORBIDDEN_IN_CORE!r} if m in sys.modules]\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)


def test_spark_core_has_no_print_and_no_module_level_mutable_state() -> None:
    for path in sorted((ROOT / "spark_core").rglob("*.py")):
        tree = ast.parse(path.read_text())
        for node in tree.body:
            targets = (
                node.targets if isinstance(node, ast.Assign) else [getattr(node, "target", None)]
            )
            names = {t.id for t in targets if isinstance(t, ast.Name)}
            if isinstance(node, (ast.Assign, ast.AnnAssign)) and names != {"__all__"}:
                value = node.value
                mutable = (ast.List, ast.Set, ast.Dict, ast.ListComp, ast.SetComp, ast.DictComp)
                assert not isinstance(value, mutable), (
                    f"{path.name}:{node.lineno} module-level mutable container"
                )
            if isinstance(node, ast.Global):
                raise AssertionError(f"{path.name}:{node.lineno} uses 'global'")
        for node in ast.walk(tree):
            assert not isinstance(node, ast.Global), f"{path.name}:{node.lineno} uses 'global'"
