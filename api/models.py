"""Request and response bodies of the REST API (the storage model is orchestrator.control.store)."""

from __future__ import annotations

import datetime as dt
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

JobKindName = Literal["pretrain", "sweep"]
JobState = Literal[
    "HELD", "QUEUED", "SUBMITTING", "PENDING", "RUNNING", "SUCCEEDED", "FAILED", "CANCELLED"
]


class JobCreate(BaseModel):
    """A job to run: the same spec documents ``sparkctl validate`` accepts."""

    model_config = ConfigDict(extra="forbid")

    kind: JobKindName = Field(description="pretrain: one PretrainSpec; sweep: one SweepSpec")
    spec: dict[str, Any] = Field(
        description="the spec document (see GET /v1/specs/schema for both JSON Schemas)"
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
