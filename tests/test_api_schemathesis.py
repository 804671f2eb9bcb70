"""Schemathesis (its CLI, in a subprocess) against the service's own OpenAPI document, over
real HTTP with Ray, the job store and MLflow up: no server error, and no status code,
content type or body that the document does not declare, on every operation."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ApiServer, RayTestCluster

from api.auth import issue_token
from orchestrator.settings import OrchestratorSettings

CHECKS = (
    "not_a_server_error,status_code_conformance,content_type_conformance,"
    "response_schema_conformance,response_headers_conformance"
)


@pytest.mark.slow
def test_openapi_conformance(ray_cluster: RayTestCluster, tmp_path: Path) -> None:
    home = tmp_path / "home"
    (home / "data").mkdir(parents=True)
    settings = OrchestratorSettings(
        home=home,
        ray_dashboard_url=ray_cluster.dashboard_url,  # ready: /readyz answers 200
        api_rate_limit_per_s=10_000,
        api_rate_burst=10_000,
    )
    token = issue_token(settings.tokens_file, "fuzzer")
    with ApiServer(settings, reconcile=False) as server:
        run = subprocess.run(
            [
                str(Path(sys.executable).with_name("schemathesis")),
                "run",
                f"{server.url}/openapi.json",
                "--checks",
                CHECKS,
                "--header",
                f"Authorization: Bearer {token}",
                "--max-examples",
                "30",
                "--seed",
                "1",
                "--no-color",
            ],
            capture_output=True,
            text=True,
            timeout=600,
            cwd=tmp_path,
        )
    assert run.returncode == 0, run.stdout[-6000:] + run.stderr[-2000:]
    assert "No issues found" in run.stdout or "passed" in run.stdout.lower(), run.stdout[-3000:]
