"""``/v1/jobs``: submit, list, inspect and cancel jobs."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Annotated, Any

from fastapi import APIRouter, Header, Query, Request, Response
from fastapi.responses import StreamingResponse

from api.deps import Owner, Service
from api.models import (
    JobCreate,
    JobKindName,
    JobLinks,
    JobList,
    JobOut,
    JobState,
    LogsOut,
    ProgressOut,
    ResultsOut,
)
from api.problems import ProblemException
from api.routes import AUTH_PROBLEMS, problems
from orchestrator.control.scheduler import RayUnavailable
from orchestrator.control.service import (
    JobFinished,
    JobNotFound,
    JobNotHeld,
    QueueFull,
    QuotaExceeded,
)
from orchestrator.control.states import JOBS_PAGE_DEFAULT, JOBS_PAGE_MAX
from orchestrator.control.store import IdempotencyConflict, Job
from orchestrator.specs import SpecError

router = APIRouter(prefix="/v1/jobs", tags=["jobs"])

IDEMPOTENCY_KEY = Annotated[
    str | None,
    Header(
        alias="Idempotency-Key",
        max_length=200,
        pattern=r"^[A-Za-z0-9._:-]{1,200}$",
        description="same key + same body returns the same job; a different body is a 409",
    ),
]


def job_links(request: Request, service: Any, job: Job) -> JobLinks:
    base = str(request.base_url).rstrip("/") + f"/v1/jobs/{job.id}"
    settings = service.settings
    return JobLinks(
        self=base,
        logs=f"{base}/logs",
        progress=f"{base}/progress",
        results=f"{base}/results",
        cancel=f"{base}/cancel",
        mlflow_run=service.mlflow_link(job),
        mlflow_ui=settings.mlflow_ui_url,
        ray_dashboard=settings.ray_dashboard_url,
    )


def job_out(request: Request, service: Any, job: Job) -> JobOut:
    fields = {k: getattr(job, k) for k in JobOut.model_fields if k != "links"}
    return JobOut(**fields, links=job_links(request, service, job))


# How the service's domain errors answer over HTTP (one table for every route).
DOMAIN_ERRORS: dict[type[Exception], int] = {
    JobNotFound: 404,
    JobFinished: 409,
    JobNotHeld: 409,
    IdempotencyConflict: 409,
}


@contextmanager
def domain_errors() -> Iterator[None]:
    try:
        yield
    except tuple(DOMAIN_ERRORS) as error:
        raise ProblemException(DOMAIN_ERRORS[type(error)], str(error)) from None
    except RayUnavailable as error:
        raise ProblemException(503, f"Ray is unavailable: {error}") from None


def _get(service: Service, owner: str, job_id: str) -> Job:
    with domain_errors():
        return service.get(owner, job_id)


@router.post(
    "",
    status_code=202,
    response_model=JobOut,
    responses={200: {"model": JobOut, "description": "the job of an Idempotency-Key seen before"}}
    | problems(400, 409, 422, *AUTH_PROBLEMS),
    summary="Submit a pre-training job or a sweep",
)
def create_job(
    body: JobCreate,
    request: Request,
    response: Response,
    owner: Owner,
    service: Service,
    idempotency_key: IDEMPOTENCY_KEY = None,
) -> JobOut:
    try:
        with domain_errors():
            job, created = service.create(
                owner, body.kind, body.spec, idempotency_key, hold=body.hold
            )
    except SpecError as error:
        raise ProblemException(422, "the spec does not validate", errors=error.errors) from None
    except QuotaExceeded as error:
        raise ProblemException(422, str(error), errors=error.errors) from None
    except QueueFull as error:
        raise ProblemException(429, str(error), headers={"Retry-After": "60"}) from None
    if not created:
        response.status_code = 200
    response.headers["Location"] = f"/v1/jobs/{job.id}"
    return job_out(request, service, job)


@router.get(
    "",
    response_model=JobList,
    responses=problems(422, *AUTH_PROBLEMS),
    summary="List your jobs, newest first",
)
def list_jobs(
    request: Request,
    owner: Owner,
    service: Service,
    state: Annotated[list[JobState] | None, Query(description="repeat to match several")] = None,
    kind: JobKindName | None = None,
    name: Annotated[str | None, Query(max_length=128)] = None,
    limit: Annotated[int, Query(ge=1, le=JOBS_PAGE_MAX)] = JOBS_PAGE_DEFAULT,
    cursor: Annotated[str | None, Query(max_length=200)] = None,
) -> JobList:
    try:
        page = service.list(
            owner, states=state or [], kind=kind, name=name, limit=limit, cursor=cursor
        )
    except ValueError as error:
        raise ProblemException(422, str(error), errors=[("cursor", str(error))]) from None
    return JobList(
        items=[job_out(request, service, job) for job in page.jobs], next_cursor=page.next_cursor
    )


@router.get(
    "/{job_id}",
    response_model=JobOut,
    responses=problems(404, 422, *AUTH_PROBLEMS),
    summary="One job",
)
def get_job(job_id: str, request: Request, owner: Owner, service: Service) -> JobOut:
    return job_out(request, service, _get(service, owner, job_id))


@router.post(
    "/{job_id}/cancel",
    response_model=JobOut,
    status_code=202,
    responses=problems(404, 409, 422, 503, *AUTH_PROBLEMS),
    summary="Cancel a job (idempotent; a finished job answers 409)",
)
def cancel_job(job_id: str, request: Request, owner: Owner, service: Service) -> JobOut:
    with domain_errors():
        job = service.cancel(owner, job_id)
    return job_out(request, service, job)


@router.post(
    "/{job_id}/release",
    response_model=JobOut,
    status_code=202,
    responses=problems(404, 409, 422, *AUTH_PROBLEMS),
    summary="Queue a job submitted with hold=true (409 when it is not held)",
)
def release_job(job_id: str, request: Request, owner: Owner, service: Service) -> JobOut:
    with domain_errors():
        job = service.release(owner, job_id)
    return job_out(request, service, job)


@router.get(
    "/{job_id}/logs",
    response_model=LogsOut,
    responses={200: {"content": {"text/plain": {"schema": {"type": "string"}}}}}
    | problems(404, 422, 503, *AUTH_PROBLEMS),
    summary="The job driver's log: the last lines, or followed as text/plain (follow=true)",
)
def job_logs(
    job_id: str,
    owner: Owner,
    service: Service,
    tail: Annotated[int, Query(ge=1, le=10_000)] = 200,
    follow: bool = False,
) -> Any:
    job = _get(service, owner, job_id)
    if follow:
        if job.submissions == 0:
            raise ProblemException(404, f"job {job_id} has not started yet; no log to follow")
        return StreamingResponse(_follow(service, job), media_type="text/plain")
    with domain_errors():
        return LogsOut(job_id=job.id, lines=service.logs(job, tail))


async def _follow(service: Service, job: Job) -> Any:
    try:
        async for chunk in service.follow_logs(job):
            yield chunk
    except (RuntimeError, OSError, asyncio.CancelledError):
        return


@router.get(
    "/{job_id}/progress",
    response_model=ProgressOut,
    responses=problems(404, 422, *AUTH_PROBLEMS),
    summary="Epoch, step, loss, images/s and ETA (sweeps: every trial) from MLflow",
)
def job_progress(job_id: str, owner: Owner, service: Service) -> ProgressOut:
    return ProgressOut(**service.progress(_get(service, owner, job_id)))


@router.get(
    "/{job_id}/results",
    response_model=ResultsOut,
    responses=problems(404, 422, *AUTH_PROBLEMS),
    summary="Final metrics and artifacts (sweeps: the results table)",
)
def job_results(job_id: str, request: Request, owner: Owner, service: Service) -> ResultsOut:
    job = _get(service, owner, job_id)
    return ResultsOut(**service.results(job), links=job_links(request, service, job))
