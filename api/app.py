"""The REST service: ``create_app(settings)`` builds it; ``python -m api`` serves it."""

from __future__ import annotations

import logging
import threading
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI

from api.auth import ReloadingTokenRegistry
from api.limits import BodySizeLimit, RateLimiter
from api.problems import install_problem_handlers
from api.routes import health, jobs, specs
from orchestrator.control.scheduler import RayJobs, Reconciler
from orchestrator.control.service import JobService
from orchestrator.control.store import JobStore
from orchestrator.settings import OrchestratorSettings

logger = logging.getLogger(__name__)

DESCRIPTION = """
Submit SparK pre-training jobs and ablation sweeps, follow them, cancel them and fetch their
results. Jobs run on Ray (Ray Train per run, Ray Tune per sweep) and are tracked in MLflow.

Authenticate with `Authorization: Bearer <token>`. Errors are `application/problem+json`
(RFC 9457) with the failing field paths in `errors`.
"""


def create_app(settings: OrchestratorSettings | None = None, *, reconcile: bool = True) -> FastAPI:
    """The FastAPI app. ``reconcile=False`` leaves the reconciler off (schema tooling)."""
    settings = settings or OrchestratorSettings()
    store = JobStore(settings.job_store_url)
    ray_jobs = RayJobs(settings)
    reconciler = Reconciler(store, ray_jobs, settings)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        store.migrate()
        # In the background: the service answers at once, and is quick once warm.
        threading.Thread(target=service.warm_up, name="warm-up", daemon=True).start()
        if reconcile:
            reconciler.start()
        logger.info("job store %s ready; Ray at %s", store.safe_url, settings.ray_dashboard_url)
        try:
            yield
        finally:
            reconciler.stop()
            store.engine.dispose()

    app = FastAPI(
        title="SparK orchestrator",
        version="1.0.0",
        description=DESCRIPTION,
        lifespan=lifespan,
    )
    app.state.settings = settings
    app.state.tokens = ReloadingTokenRegistry(settings.tokens_file, settings.api_tokens)
    app.state.rate_limiter = RateLimiter(settings.api_rate_limit_per_s, settings.api_rate_burst)
    service = JobService(store, ray_jobs, reconciler, settings)
    app.state.service = service
    install_problem_handlers(app)
    for router in (health.router, jobs.router, specs.router):
        app.include_router(router)
    app.add_middleware(BodySizeLimit, max_bytes=settings.api_max_body_bytes)
    return app
