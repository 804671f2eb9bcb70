"""Request and response bodies of the REST API (the storage model is orchestrator.control.store)."""

from __future__ import annotations

import datetime as dt
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from orchestrator.control.states import JOB_STATES
from orchestrator.kinds import JOB_KINDS

# The enums come from where the facts live: the kind registry and the job store's states.
JobKindName = Literal[tuple(JOB_KINDS)]  # type: ignore[valid-type]
JobState = Literal[JOB_STATES]  # type: ignore[valid-type]
KINDS_HELP = "; ".join(f"{name}: {kind.summary}" for name, kind in JOB_KINDS.items())


class JobCreate(BaseModel):
    """A job to run: the same spec documents ``sparkctl validate`` accepts."""

    model_config = ConfigDict(extra="forbid")

    kind: JobKindName = Field(description=KINDS_HELP)
    spec: dict[str, Any] = Field(
        description="the spec document of that kind (GET /v1/specs/schema has every kind's "
        "JSON Schema)"
    )
    hold: bool = Field(
        False, description="store the job HELD: it runs after POST /v1/jobs/{id}/release"
    )


class JobLinks(BaseModel):
    self: str
    logs: str
    progress: str
    results: str
    cancel: str
    mlflow_run: str | None = Field(None, description="the job's MLflow run in the MLflow UI")
    mlflow_ui: str | None = None
    ray_dashboard: str | None = None


class JobOut(BaseModel):
    id: str = Field(description="job id (UUID); also the Ray submission id and MLflow job_id tag")
    kind: JobKindName
    name: str
    state: JobState
    owner: str
    spec: dict[str, Any] = Field(description="the validated spec, defaults filled in")
    message: str | None = Field(None, description="why the job failed or is waiting")
    submissions: int = Field(description="times the job was submitted to Ray")
    num_workers: int = Field(
        description="Ray Train workers the job holds at once (a sweep: all concurrent trials)"
    )
    num_gpus: float = Field(description="GPUs the job holds at once")
    cancel_requested: bool
    mlflow_run_id: str | None = None
    created_at: dt.datetime
    updated_at: dt.datetime
    started_at: dt.datetime | None = None
    finished_at: dt.datetime | None = None
    links: JobLinks


class JobList(BaseModel):
    items: list[JobOut]
    next_cursor: str | None = Field(None, description="pass as ?cursor= for the next page")


class ProgressOut(BaseModel):
    job_id: str
    state: JobState
    mlflow_status: str | None = Field(None, description="the MLflow run's status")
    epoch: float | None = None
    step: int | None = None
    total_steps: int | None = None
    loss: float | None = None
    images_per_sec: float | None = None
    eta_s: float | None = None
    trials: list[dict[str, Any]] | None = Field(
        None, description="sweeps: one row per trial (state, searched values, metrics)"
    )


class ResultsOut(BaseModel):
    job_id: str
    kind: JobKindName
    state: JobState
    mlflow_run_id: str | None = None
    metrics: dict[str, float] = Field(default_factory=dict)
    artifacts: list[str] = Field(default_factory=list, description="artifact paths in the run")
    columns: list[str] | None = Field(None, description="sweeps: the results table's columns")
    rows: list[dict[str, Any]] | None = Field(None, description="sweeps: one row per variant")
    links: JobLinks


class LogsOut(BaseModel):
    job_id: str
    lines: list[str] = Field(description="the last lines of the job driver's log")


class Health(BaseModel):
    status: Literal["ok", "unavailable"]
    checks: dict[str, str] = Field(default_factory=dict)
