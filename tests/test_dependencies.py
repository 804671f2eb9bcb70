"""Shipped code imports only the standard library and declared runtime dependencies.

`pip install .` installs ``[project.dependencies]`` and what they require, nothing else: a
package that only the ``dev`` extra (or the developer's virtualenv) provides is missing
there. The imports are read from the source (ast), so no shipped module is imported here.
"""

from __future__ import annotations

import ast
import importlib.metadata as metadata
import re
import sys
import tomllib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

import pytest
from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parents[1]
SHIPPED_PACKAGES = ("spark_core", "orchestrator", "jobs", "api")


@dataclass(frozen=True)
class Import:
    """One absolute import statement: where it is and the top-level module it needs."""

    path: Path
    line: int
    module: str

    @property
    def top(self) -> str:
        return self.module.split(".")[0]

    def where(self) -> str:
        path = self.path.relative_to(ROOT) if self.path.is_relative_to(ROOT) else self.path
        return f"{path}:{self.line}: import {self.module}"


def normalise(name: str) -> str:
    """A distribution name as PEP 503 compares them (``PyYAML`` == ``pyyaml``)."""
    return re.sub(r"[-_.]+", "-", name).lower()


def imports_in(path: Path) -> Iterator[Import]:
    """Every absolute import in ``path``, at any depth (function bodies, try blocks)."""
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield Import(path, node.lineno, alias.name)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            yield Import(path, node.lineno, node.module)


def shipped_files() -> list[Path]:
    """Every module of the packages the wheel ships."""
    return sorted(path for pkg in SHIPPED_PACKAGES for path in (ROOT / pkg).rglob("*.py"))


def pyproject() -> dict[str, Any]:
    """pyproject.toml, parsed."""
    with (ROOT / "pyproject.toml").open("rb") as handle:
        return tomllib.load(handle)


def runtime_requirements() -> list[Requirement]:
    return [Requirement(entry) for entry in pyproject()["project"]["dependencies"]]


def dev_requirements() -> list[Requirement]:
    extras = pyproject()["project"].get("optional-dependencies", {})
    return [Requirement(entry) for entry in extras.get("dev", [])]


def _applies(requirement: Requirement, extras: Iterable[str]) -> bool:
    """Whether this environment installs ``requirement`` when its parent is asked for
    ``extras``; a marker without ``extra`` is checked once, with the empty extra."""
    if requirement.marker is None:
        return True
    return any(requirement.marker.evaluate({"extra": extra}) for extra in ("", *extras))


def installed_closure(roots: Iterable[Requirement]) -> set[str]:
    """Normalised names of ``roots`` and of everything they require, transitively.

    A distribution is revisited when reached with extras not seen before (``ray`` is
    reached bare through several packages and with ``[default,train,tune]`` from us).
    """
    seen_extras: dict[str, set[str]] = {}
    pending = [req for req in roots if _applies(req, ())]
    while pending:
        req = pending.pop()
        name = normalise(req.name)
        extras = {normalise(e) for e in req.extras}
        if name in seen_extras and extras <= seen_extras[name]:
            continue
        seen_extras.setdefault(name, set()).update(extras)
        try:
            requires = metadata.requires(req.name) or []
        except metadata.PackageNotFoundError:
            pytest.fail(f"{req.name} is required (via pyproject.toml) but not installed: run make")
        pending.extend(r for r in map(Requirement, requires) if _applies(r, extras))
    return set(seen_extras)


@cache
def runtime_distributions() -> frozenset[str]:
    """What `pip install .` brings, less the dev extra's packages: shipped code must not
    import those even where some runtime dependency happens to pull one in today."""
    dev = {normalise(r.name) for r in dev_requirements()}
    return frozenset(installed_closure(runtime_requirements()) - dev)


@cache
def module_owners() -> dict[str, frozenset[str]]:
    """Top-level module -> normalised names of the installed distributions providing it."""
    return {
        module: frozenset(normalise(d) for d in dists)
        for module, dists in metadata.packages_distributions().items()
    }


def problems(imports: Iterable[Import], allowed: frozenset[str]) -> list[str]:
    """One line per import that an install of ``allowed`` distributions cannot satisfy."""
    found = []
    for imp in imports:
        if imp.top in sys.stdlib_module_names or imp.top in SHIPPED_PACKAGES:
            continue
        owners = module_owners().get(imp.top)
        if not owners:
            found.append(f"{imp.where()}: no installed distribution provides {imp.top!r}")
        elif not owners & allowed:
            # Several distributions may ship one module (mlflow, mlflow-skinny): one is enough.
            found.append(
                f"{imp.where()}: {imp.top!r} comes from {', '.join(sorted(owners))}, "
                "which is not a runtime dependency (pyproject.toml [project.dependencies])"
            )
    return found


def test_shipped_code_imports_only_stdlib_and_runtime_dependencies() -> None:
    files = shipped_files()
    assert len(files) > 20, "the shipped packages were not found"
    imports = [imp for path in files for imp in imports_in(path)]
    found = problems(imports, runtime_distributions())
    assert not found, "\n".join(found)


@pytest.mark.parametrize(
    ("source", "expected"),
    [
        ("import pytest\n", "'pytest' comes from pytest, which is not a runtime dependency"),
        ("def f():\n    from ruff import x\n", "'ruff' comes from ruff"),
        ("import schemathesis.core\n", "'schemathesis' comes from schemathesis"),
        ("try:\n    import not_a_module_xyz\nexcept ImportError:\n    pass\n", "no installed"),
    ],
)
def test_checker_rejects_dev_only_and_missing_modules(
    tmp_path: Path, source: str, expected: str
) -> None:
    # Guards the checker itself: the real test passes vacuously if it can't see a problem.
    module = tmp_path / "shipped.py"
    module.write_text(source)
    found = problems(imports_in(module), runtime_distributions())
    assert len(found) == 1
    assert expected in found[0]
    assert "shipped.py:" in found[0]


def test_checker_accepts_stdlib_own_and_transitive_runtime_imports(tmp_path: Path) -> None:
    module = tmp_path / "shipped.py"
    # starlette only through fastapi, aiohttp only through ray[default]: both ship with us.
    module.write_text(
        "from __future__ import annotations\nimport json\nfrom . import sibling\n"
        "import orchestrator.settings\nimport yaml\nimport starlette\nimport aiohttp\n"
    )
    assert problems(imports_in(module), runtime_distributions()) == []


def test_extras_and_markers_decide_what_is_required() -> None:
    bare = installed_closure([Requirement("ray==2.60.0")])
    with_default = installed_closure([Requirement("ray[default]==2.60.0")])
    assert "aiohttp" not in bare
    assert "aiohttp" in with_default
    assert installed_closure([Requirement('ray; python_version < "3"')]) == set()


def test_dev_extra_does_not_repeat_a_runtime_dependency() -> None:
    runtime = {normalise(r.name) for r in runtime_requirements()}
    repeated = sorted(normalise(r.name) for r in dev_requirements() if normalise(r.name) in runtime)
    assert not repeated, f"in both [project.dependencies] and the dev extra: {repeated}"
