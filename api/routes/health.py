"""``/livez`` and ``/readyz`` (no authentication: for load balancers and orchestrators)."""

from __future__ import annotations

import logging

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from api.models import Health

router = APIRouter(tags=["health"])
logger = logging.getLogger(__name__)


@router.get("/livez", response_model=Health, summary="The process is up")
def livez() -> Health:
    return Health(status="ok")


@router.get(
    "/readyz",
    response_model=Health,
    responses={503: {"model": Health, "description": "a dependency is unreachable"}},
    summary="Database, Ray and MLflow are reachable",
)
def readyz(request: Request) -> JSONResponse:
    service = request.app.state.service
    checks: dict[str, str] = {}
    for name, probe in (
        ("database", service.store.ping),
        ("ray", service.ray_jobs.ping),
        ("mlflow", lambda: _ping_mlflow(service.settings.tracking_uri)),
    ):
        try:
            probe()
            checks[name] = "ok"
        except Exception as error:
            logger.warning("readiness: %s unreachable: %s", name, error)
            checks[name] = f"unreachable: {type(error).__name__}"
    ok = all(v == "ok" for v in checks.values())
    body = Health(status="ok" if ok else "unavailable", checks=checks)
    return JSONResponse(body.model_dump(), status_code=200 if ok else 503)


def _ping_mlflow(tracking_uri: str) -> None:
    # A server answers /health at once; the MLflow client would retry for minutes.
    if tracking_uri.startswith(("http://", "https://")):
        import httpx

        httpx.get(f"{tracking_uri.rstrip('/')}/health", timeout=3).raise_for_status()
        return
    from orchestrator.tracking import client_for

    client_for(tracking_uri).search_experiments(max_results=1)
