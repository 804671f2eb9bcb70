"""Layering rules, as allow-lists: what each package may import, and what the API process
loads; and the facts that specs declare apart from spark_core (so that validating a spec
needs no torch) agree with spark_core's.

    spark_core   torch, torchvision, timm, numpy, PIL, safetensors (its declared dependencies)
    orchestrator anything of the runtime dependencies but the HTTP layer (never api)
    jobs         orchestrator only
    api          HTTP (fastapi, starlette, uvicorn, httpx, pydantic) and orchestrator; ray
                 only for the local stack launcher; never torch, timm or spark_core
"""

from __future__ import annotations

import ast
import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("spark_core", "orchestrator", "jobs", "api")
ALLOWED: dict[str, frozenset[str]] = {
    "spark_core": frozenset({"torch", "torchvision", "timm", "numpy", "PIL", "safetensors"}),
    "orchestrator": frozenset(
        {
            "spark_core",
            "torch",
            "timm",
            "ray",
            "mlflow",
            "matplotlib",
            "pydantic",
            "pydantic_core",
            "pydantic_settings",
            "yaml",
            "sqlalchemy",
            "alembic",
            "httpx",
            "psutil",
        }
    ),
    "jobs": frozenset({"orchestrator"}),
    "api": frozenset(
        {"orchestrator", "fastapi", "starlette", "uvicorn", "httpx", "pydantic", "ray"}
    ),
}
# Modules of api/ that may import ray: the local stack launcher owns a Ray cluster.
API_RAY_MODULES = frozenset({"api/stack.py"})
NEVER_IN_API_PROCESS = ("torch", "timm", "torchvision", "spark_core")


def _imports(path: Path) -> set[str]:
    """Top-level names of every absolute import in a file (function-level ones too)."""
    roots = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            roots.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            roots.add(node.module.split(".")[0])
    return roots


@pytest.mark.parametrize("package", PACKAGES)
def test_each_package_imports_only_its_allow_list(package: str) -> None:
    allowed = ALLOWED[package] | {package} | set(sys.stdlib_module_names)
    for path in sorted((ROOT / package).rglob("*.py")):
        name = path.relative_to(ROOT).as_posix()
        extra = _imports(path) - allowed
        assert not extra, f"{name} imports {sorted(extra)}, outside {package}'s allow-list"
        if package == "api" and name not in API_RAY_MODULES:
            assert "ray" not in _imports(path), f"{name}: only {API_RAY_MODULES} may import ray"


def test_the_allow_lists_are_real_rules() -> None:
    # What the layering forbids, said once more: no upward arrows, no torch in the API.
    assert "api" not in ALLOWED["orchestrator"]
    assert not {"orchestrator", "api", "jobs", "ray", "mlflow"} & ALLOWED["spark_core"]
    assert not set(NEVER_IN_API_PROCESS) & ALLOWED["api"]


def test_importing_spark_core_loads_no_orchestration_library() -> None:
    code = (
        "import sys, pkgutil, importlib, spark_core\n"
        "for m in pkgutil.iter_modules(spark_core.__path__):\n"
        "    importlib.import_module('spark_core.' + m.name)\n"
        "bad = [m for m in ('ray', 'mlflow', 'fastapi', 'pydantic', 'sqlalchemy', 'orchestrator',"
        " 'api', 'jobs') if m in sys.modules]\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)


API_PROCESS = """
import json, sys, tempfile
from pathlib import Path
from fastapi.testclient import TestClient
from api.app import create_app
from api.auth import issue_token
from orchestrator.settings import OrchestratorSettings

home = Path(tempfile.mkdtemp())
(home / "data").mkdir()
settings = OrchestratorSettings(home=home, ray_address=None)
token = issue_token(settings.tokens_file, "alice")
spec = {"name": "probe", "model": {"backbone": "resnet18", "input_size": 64},
        "optim": {"global_batch_size": 8, "epochs": 1}, "data": {"train": {"count": 64}}}
app = create_app(settings, reconcile=False)
with TestClient(app) as client:
    app.state.service.warm_up()  # what the app imports in the background, done here first
    auth = {"Authorization": f"Bearer {token}"}
    created = client.post("/v1/jobs", json={"kind": "pretrain", "spec": spec}, headers=auth)
    job = created.json()["id"]
    bad = client.post("/v1/jobs", json={"kind": "pretrain",
                      "spec": {**spec, "model": {"backbone": "resnet9000"}}}, headers=auth)
    sweep = client.post("/v1/jobs", json={"kind": "sweep", "spec": {"base": spec,
                        "search": {"spark.mask_ratio": {"grid": [0.4, 0.6]}},
                        "metric": "final_loss"}}, headers=auth)
    answers = [created.status_code, bad.status_code, sweep.status_code,
               client.get(f"/v1/jobs/{sweep.json()['id']}/progress", headers=auth).status_code,
               client.get(f"/v1/jobs/{job}/results", headers=auth).status_code,
               client.get("/v1/specs/schema", headers=auth).status_code,
               client.get("/v1/jobs", headers=auth).status_code,
               client.get(f"/v1/jobs/{job}/progress", headers=auth).status_code,
               client.post(f"/v1/jobs/{job}/cancel", headers=auth).status_code]
print(json.dumps({"answers": answers,
                  "loaded": sorted(m for m in %r if m in sys.modules)}))
"""


def test_the_api_process_never_imports_torch_timm_or_spark_core() -> None:
    out = subprocess.run(
        [sys.executable, "-c", API_PROCESS % (NEVER_IN_API_PROCESS,)],
        check=True,
        cwd=ROOT,
        capture_output=True,
        text=True,
    ).stdout
    report = json.loads(out.strip().splitlines()[-1])
    # Validated (202, 422 for a bad backbone, a sweep 202), inspected, listed, cancelled.
    assert report["answers"] == [202, 422, 202, 200, 200, 200, 200, 200, 202]
    assert report["loaded"] == []


# ------------------------------------------------ facts specs declare apart from spark_core


def test_spec_spark_section_defaults_are_the_library_defaults() -> None:
    from orchestrator.specs import SparkSpec
    from spark_core import SparKConfig

    library = {f.name: f.default for f in dataclasses.fields(SparKConfig)}
    # Every switch of the library is in the spec's spark section (the model section has the
    # backbone, the input size and the drop path), with the same default.
    assert set(SparkSpec.model_fields) == set(library) - {
        "backbone",
        "input_size",
        "drop_path_rate",
    }
    for name, field in SparkSpec.model_fields.items():
        assert field.default == library[name], f"spark.{name}: spec and library disagree"


def test_spec_bounds_are_the_library_bounds() -> None:
    from orchestrator import specs
    from spark_core import gpu_input, model

    assert specs.PATCH_STRIDE == model.PATCH_STRIDE
    assert specs.MAX_HIERARCHY == model.MAX_HIERARCHY
    assert specs.MAX_DECODER_DEPTH == model.MAX_DECODER_DEPTH
    assert specs.DENSIFY_NORMS == model.DENSIFY_NORMS
    assert tuple(gpu_input.INPUT_DECODERS) == specs.DECODERS
    # Every value the spec accepts, the library accepts, and the first one past each bound
    # is refused by both.
    base = {"optim": {"global_batch_size": 8}, "data": {"train": {"count": 64}}}
    probes = {
        "hierarchy": (1, specs.MAX_HIERARCHY, specs.MAX_HIERARCHY + 1, 0),
        "decoder_depth": (1, specs.MAX_DECODER_DEPTH, specs.MAX_DECODER_DEPTH + 1, 0),
        "decoder_width": (32, 64, 48, 0),
        "densify_norm": (*specs.DENSIFY_NORMS, "group"),
    }
    for name, values in probes.items():
        for value in values:
            spec_ok = _spec_accepts(specs, base, name, value)
            config = model.SparKConfig("resnet18", (64, 64), **{name: value})
            try:
                model.validate_config(config)
                library_ok = True
            except ValueError:
                library_ok = False
            assert spec_ok == library_ok, (
                f"spark.{name}={value!r}: spec {spec_ok}, lib {library_ok}"
            )


def _spec_accepts(specs, base, name, value) -> bool:
    try:
        specs.parse_spec({**base, "spark": {name: value}}, data_roots=[])
    except specs.SpecError:
        return False
    return True


def test_spec_visible_patch_rule_is_the_library_rule() -> None:
    from orchestrator import specs
    from spark_core import masking

    for h in range(1, 8):
        for w in range(1, 8):
            for step in range(1, 100):
                ratio = step / 100
                assert specs.num_visible((h, w), ratio) == masking.num_visible((h, w), ratio)
                assert specs.mask_ratio_problem((h, w), ratio) == masking.mask_ratio_problem(
                    (h, w), ratio
                )


def test_backbone_catalog_is_what_timm_and_spark_core_say() -> None:
    """The generated catalog the API validates backbones with; after a timm upgrade or a
    change of spark_core's families, run scripts/update_backbone_catalog.py."""
    sys.path.insert(0, str(ROOT / "scripts"))
    try:
        from update_backbone_catalog import catalog
    finally:
        sys.path.remove(str(ROOT / "scripts"))
    from orchestrator import backbone_catalog

    expected = catalog()
    fix = "regenerate it: .venv/bin/python scripts/update_backbone_catalog.py"
    assert expected["TIMM_VERSION"] == backbone_catalog.TIMM_VERSION, fix
    assert dict(backbone_catalog.FAMILY_PREFIXES) == expected["FAMILY_PREFIXES"], fix
    assert expected["FAMILIES_TEXT"] == backbone_catalog.FAMILIES_TEXT, fix
    assert frozenset(expected["NAMES"]) == backbone_catalog.NAMES, fix


@pytest.mark.parametrize(
    "backbone", ["resnet50", "resnet50.a1_in1k", "convnext_atto", "resnet9000", "vit_base"]
)
def test_spec_backbone_check_agrees_with_spark_core(backbone: str) -> None:
    from orchestrator.specs import check_backbone
    from spark_core import resolve_family

    def outcome(check) -> str:
        try:
            check(backbone)
        except ValueError as error:
            return str(error)
        return "ok"

    assert outcome(check_backbone) == outcome(resolve_family)


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
