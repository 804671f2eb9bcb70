"""The job-kind registry (orchestrator.kinds) is the one place a kind is described: the REST
enum, the schemas, admission and quotas, the scheduler's entrypoint and resubmission policy,
and sparkctl's verbs and spec detection all follow it; nothing else branches on a kind."""

from __future__ import annotations

import ast
import importlib
import json
from pathlib import Path
from typing import Any

import httpx
import pytest
from conftest import ApiServer

from api.auth import issue_token
from orchestrator.cli import EXIT_BAD_INPUT, main
from orchestrator.kinds import JOB_KINDS, detect_kind, get_kind
from orchestrator.settings import OrchestratorSettings
from orchestrator.specs import SpecError, parse_sweep

ROOT = Path(__file__).resolve().parents[1]
PRETRAIN: dict[str, Any] = {
    "name": "kinds-tiny",
    "model": {"backbone": "resnet18", "input_size": 64},
    "data": {"train": {"kind": "synthetic", "count": 32, "size": 64, "classes": 2}},
    "optim": {"global_batch_size": 16, "epochs": 2, "warmup_epochs": 0},
    "resources": {"num_workers": 2},
    "evaluation": {"method": "none"},
}
SWEEP: dict[str, Any] = {
    "name": "kinds-sweep",
    "base": PRETRAIN,
    "search": {"spark.mask_ratio": {"grid": [0.4, 0.6]}},
    "variants": {"reference": {}, "dense": {"spark.sparse": False}},
    "seeds": [0, 1],
    "metric": "final_loss",
}
FINETUNE: dict[str, Any] = {
    "name": "kinds-finetune",
    "model": {"backbone": "resnet18", "input_size": 64},
    "weights": {"kind": "none"},
    "data": {"train": {"kind": "synthetic", "count": 32, "size": 64, "classes": 2}},
}


def _constants(node: ast.AST) -> set[object]:
    """Constants of an expression, looking into tuples, lists and sets."""
    if isinstance(node, ast.Constant):
        return {node.value}
    if isinstance(node, ast.Tuple | ast.List | ast.Set):
        return set().union(*(_constants(e) for e in node.elts)) if node.elts else set()
    return set()


def _kind_branches(tree: ast.AST) -> list[int]:
    """Lines that compare with, match on, or key a mapping by a kind's name."""
    names = set(JOB_KINDS)
    lines = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Compare):
            found = set().union(*(_constants(o) for o in [node.left, *node.comparators]))
        elif isinstance(node, ast.MatchValue):
            found = _constants(node.value)
        elif isinstance(node, ast.Dict):
            found = set().union(*(_constants(k) for k in node.keys if k is not None))
        else:
            continue
        if found & names:
            lines.append(node.lineno)
    return lines


def test_no_code_outside_the_registry_branches_on_a_kind_name() -> None:
    for package in ("orchestrator", "api", "jobs"):
        for path in sorted((ROOT / package).rglob("*.py")):
            if path.name == "kinds.py":
                continue
            lines = _kind_branches(ast.parse(path.read_text()))
            assert not lines, f"{path.relative_to(ROOT)}:{lines} branches on a kind name"


@pytest.mark.parametrize(
    "code",
    [
        "if kind == 'sweep': pass",
        "if kind in ('pretrain', 'x'): pass",
        "match kind:\n    case 'sweep': pass",
        "RUNNERS = {'pretrain': run}",
    ],
)
def test_the_branch_detector_sees_the_usual_forms(code: str) -> None:
    assert _kind_branches(ast.parse(code))


@pytest.mark.parametrize("name", list(JOB_KINDS))
def test_each_kind_has_its_entrypoint_module(name: str) -> None:
    kind = get_kind(name)
    module = importlib.import_module(kind.entrypoint_module)
    source = Path(module.__file__).read_text()
    assert f'main("{name}")' in source
    assert kind.json_schema()["title"] == kind.spec_type.__name__


def test_unknown_kind_names_the_known_ones() -> None:
    with pytest.raises(ValueError, match="use one of pretrain, finetune, sweep"):
        get_kind("finetune-ish")


def test_spec_documents_are_recognised_by_their_keys() -> None:
    assert detect_kind(PRETRAIN).name == "pretrain"
    assert detect_kind(SWEEP).name == "sweep"
    # A fine-tune spec has data too: the kind with all of its marker keys present wins.
    assert detect_kind(FINETUNE).name == "finetune"
    assert detect_kind({"weights": {"kind": "none"}}).name == "finetune"
    assert detect_kind({}).name == "pretrain"  # validated as the first kind: names what's missing
    with pytest.raises(SpecError, match="cannot tell the job kind"):
        detect_kind({**PRETRAIN, "base": PRETRAIN})


def test_sweep_size_counts_what_tune_runs_at_once() -> None:
    sweep = parse_sweep(SWEEP, data_roots=[])
    assert sweep.trial_count() == 2 * 2 * 2  # grid values x variants x seeds
    size = get_kind("sweep").size(sweep)
    assert (size.workers, size.copies, size.total_workers) == (2, 8, 16)  # 0 = all at once
    capped = get_kind("sweep").size(
        parse_sweep({**SWEEP, "max_concurrent_trials": 3}, data_roots=[])
    )
    assert (capped.copies, capped.total_workers) == (3, 6)
    only_variants = parse_sweep({**SWEEP, "cross_variants": False}, data_roots=[])
    assert only_variants.trial_count() == 2 * 2  # the search is not crossed with variants
    assert size.workers_field == "base.resources.num_workers"
    # A trial fine-tunes after pre-training: admission counts the larger of the two.
    tuned = {
        **SWEEP,
        "metric": "finetune_top1",
        "finetune": {
            "data": {"train": {"kind": "synthetic", "classes": 2}},
            "resources": {"num_workers": 3, "gpus_per_worker": 1},
        },
    }
    size = get_kind("sweep").size(parse_sweep(tuned, data_roots=[]))
    assert (size.workers, size.gpus, size.total_workers) == (3, 3, 24)
    assert size.workers_field == "finetune.resources.num_workers"
    assert size.gpus_field == "finetune.resources.gpus_per_worker"


def test_resubmission_policy_is_read_where_the_kind_keeps_it() -> None:
    off = {"failures": {"resubmit_on_loss": False}}
    assert get_kind("pretrain").resubmit_on_loss({}) is True
    assert get_kind("pretrain").resubmit_on_loss(off) is False
    assert get_kind("sweep").resubmit_on_loss({"base": off}) is False
    assert get_kind("sweep").resubmit_on_loss(off) is True  # a sweep's own key is not it


# ------------------------------------------------------------------------------ over HTTP


@pytest.fixture
def alice(tmp_path: Path):
    home = tmp_path / "home"
    (home / "data").mkdir(parents=True)
    settings = OrchestratorSettings(
        home=home,
        ray_dashboard_url="http://127.0.0.1:9",
        quota_workers_per_job=4,
        api_rate_limit_per_s=1000,
        api_rate_burst=1000,
    )
    token = issue_token(settings.tokens_file, "alice")
    with ApiServer(settings, reconcile=False) as server, server.client(token) as client:
        yield client


def test_rest_kind_enum_and_schemas_come_from_the_registry(alice: httpx.Client) -> None:
    openapi = alice.get("/openapi.json").json()
    enum = openapi["components"]["schemas"]["JobCreate"]["properties"]["kind"]["enum"]
    assert enum == list(JOB_KINDS)
    assert set(alice.get("/v1/specs/schema").json()) == set(JOB_KINDS)


def test_unlimited_concurrent_trials_count_against_the_quota(alice: httpx.Client) -> None:
    """max_concurrent_trials 0 lets Tune run all 8 trials at once: 16 workers > quota 4."""
    body = alice.post("/v1/jobs", json={"kind": "sweep", "spec": SWEEP}).json()
    assert body["status"] == 422
    fields = {error["field"]: error["message"] for error in body["errors"]}
    assert "16 workers at once" in fields["spec.base.resources.num_workers"]
    assert "at most 2" in fields["spec.max_concurrent_trials"]
    fits = alice.post(
        "/v1/jobs", json={"kind": "sweep", "spec": {**SWEEP, "max_concurrent_trials": 2}}
    )
    assert fits.status_code == 202, fits.text
    assert (fits.json()["num_workers"], fits.json()["num_gpus"]) == (4, 0)


def test_reserved_tag_keys_are_refused(alice: httpx.Client) -> None:
    for key in ("job_id", "mlflow.user", "sparkorch.kind"):
        spec = {**PRETRAIN, "tags": {key: "x"}}
        body = alice.post("/v1/jobs", json={"kind": "pretrain", "spec": spec}).json()
        assert body["status"] == 422, body
        assert body["errors"][0]["field"].startswith(f"spec.tags.{key}")
        assert "reserved" in body["errors"][0]["message"]
    ok = alice.post(
        "/v1/jobs", json={"kind": "pretrain", "spec": {**PRETRAIN, "tags": {"team": "x"}}}
    )
    assert ok.status_code == 202


# ----------------------------------------------------------------------------- sparkctl


def test_sparkctl_schema_of_every_kind(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["schema", "all"]) == 0
    schemas = json.loads(capsys.readouterr().out)
    assert {name: s["title"] for name, s in schemas.items()} == {
        name: kind.spec_type.__name__ for name, kind in JOB_KINDS.items()
    }
    assert main(["schema", "sweep"]) == 0
    assert json.loads(capsys.readouterr().out)["title"] == "SweepSpec"


def test_sparkctl_validate_tells_the_kind(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("SPARKORCH_HOME", str(tmp_path / "home"))
    path = tmp_path / "sweep.json"
    path.write_text(json.dumps(SWEEP))
    assert main(["validate", "--json", str(path)]) == 0
    assert json.loads(capsys.readouterr().out)["kind"] == "sweep"
    assert main(["validate", "--json", "--kind", "pretrain", str(path)]) == EXIT_BAD_INPUT
    errors = json.loads(capsys.readouterr().out)["errors"]
    assert {"field": "base", "message": "Extra inputs are not permitted"} in errors
