"""The orchestrator's settings: one pydantic-settings class, read from ``SPARKORCH_*``.

Embedded defaults put everything under ``$SPARKORCH_HOME`` (default ``./.sparkorch``):
the MLflow store (``mlflow.db``, SQLite) and its artifacts, Ray Train's storage, generated
datasets and the Ray token of a local cluster. ``MLFLOW_TRACKING_URI`` and ``RAY_ADDRESS``
point at a server and a cluster instead.
"""

from __future__ import annotations

import json
import os
from functools import cached_property
from pathlib import Path
from typing import Annotated, Any

from pydantic import AliasChoices, Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict


class OrchestratorSettings(BaseSettings):
    """Where runs are stored, tracked and executed (not what they compute: that is the spec)."""

    model_config = SettingsConfigDict(
        env_prefix="SPARKORCH_",
        extra="ignore",
        frozen=True,
        validate_by_name=True,
        validate_by_alias=True,
    )

    home: Path = Field(default=Path(".sparkorch"), description="root of all embedded state")
    data_roots: Annotated[list[Path], NoDecode] = Field(
        default_factory=list,
        description="folders that image_folder data paths must lie under "
        "(default: $SPARKORCH_HOME/data); in the environment a JSON list or "
        "':'-separated paths",
    )
    mlflow_tracking_uri: str | None = Field(
        default=None,
        validation_alias=AliasChoices("SPARKORCH_MLFLOW_TRACKING_URI", "MLFLOW_TRACKING_URI"),
        description="MLflow tracking URI (default: sqlite:///$SPARKORCH_HOME/mlflow.db)",
    )
    mlflow_experiment: str = Field(default="spark-pretrain", min_length=1, max_length=128)
    mlflow_ui_url: str | None = Field(
        default=None, description="base URL of the MLflow UI, for links in CLI output"
    )
    ray_address: str | None = Field(
        default=None,
        validation_alias=AliasChoices("SPARKORCH_RAY_ADDRESS", "RAY_ADDRESS"),
        description="Ray cluster to join (default: start a local one)",
    )
    ray_storage: str | None = Field(
        default=None,
        description="Ray Train storage: a folder or a pyarrow URI such as s3://bucket/ray "
        "(default: $SPARKORCH_HOME/ray)",
    )
    ray_auth_token_path: Path | None = Field(
        default=None,
        validation_alias=AliasChoices("SPARKORCH_RAY_AUTH_TOKEN_PATH", "RAY_AUTH_TOKEN_PATH"),
        description="Ray token file (default: RAY_AUTH_TOKEN_PATH, else "
        "$SPARKORCH_HOME/ray-auth-token, created for a local cluster)",
    )
    ray_num_cpus: int | None = Field(
        default=None, ge=1, description="logical CPUs of a local Ray cluster (default: all)"
    )
    ray_dashboard_url: str = Field(
        default="http://127.0.0.1:8265",
        description="Ray dashboard (Job Submission API) the REST service submits jobs to",
    )
    database_url: str | None = Field(
        default=None,
        description="job store: a SQLAlchemy URL such as postgresql+psycopg://user@host/db "
        "(default: sqlite:///$SPARKORCH_HOME/jobs.db)",
    )
    mlflow_ui_port: int = Field(
        default=5000, ge=1, le=65535, description="port of the MLflow UI `make run` starts"
    )
    api_host: str = Field(default="127.0.0.1", description="address the REST service binds")
    api_port: int = Field(default=8000, ge=1, le=65535)
    api_tokens_file: Path | None = Field(
        default=None,
        description="JSON {owner: sha256 hex of the token} (default: "
        "$SPARKORCH_HOME/api-tokens.json)",
    )
    api_url: str = Field(
        default="http://127.0.0.1:8000", description="the REST service sparkctl's remote verbs use"
    )
    token: SecretStr | None = Field(
        default=None, description="API token for sparkctl's remote verbs (SPARKORCH_TOKEN)"
    )
    api_tokens: dict[str, str] = Field(
        default_factory=dict,
        description="JSON {owner: sha256 hex of the token}, added to the tokens file's",
    )
    forward_driver_env: bool = Field(
        default=True,
        description="pass the store, MLflow and data settings to Ray job drivers (embedded "
        "stack); false when the Ray nodes carry them in their own environment",
    )
    api_max_body_bytes: int = Field(default=256 * 1024, ge=1024)
    api_rate_limit_per_s: float = Field(
        default=50.0, gt=0, description="sustained requests per second per owner"
    )
    api_rate_burst: int = Field(default=100, ge=1)
    quota_active_jobs: int = Field(
        default=4, ge=1, description="jobs one owner may have queued or running at once"
    )
    quota_workers_per_job: int = Field(default=16, ge=1)
    quota_gpus_per_job: float = Field(default=16, ge=0)
    max_submissions: int = Field(
        default=3, ge=1, description="times a job is submitted to Ray when Ray loses it"
    )
    reconcile_interval_s: float = Field(default=2.0, gt=0)
    job_python: str | None = Field(
        default=None,
        description="Python interpreter of Ray job drivers (default: the service's own)",
    )

    @field_validator("data_roots", mode="before")
    @classmethod
    def _split_roots(cls, value: object) -> object:
        if isinstance(value, str):
            text = value.strip()
            if text.startswith("["):
                return json.loads(text)
            return [part for part in text.split(os.pathsep) if part]
        return value

    @field_validator("home")
    @classmethod
    def _absolute_home(cls, value: Path) -> Path:
        return value.expanduser().resolve()

    @cached_property
    def allowed_data_roots(self) -> tuple[Path, ...]:
        roots = self.data_roots or [self.home / "data"]
        return tuple(Path(root).expanduser().resolve() for root in roots)

    @property
    def tracking_uri(self) -> str:
        return self.mlflow_tracking_uri or f"sqlite:///{self.home / 'mlflow.db'}"

    def experiment_for(self, spec: Any) -> str:
        """The MLflow experiment of a job whose spec (a sweep: its base) is ``spec``: the
        spec's own ``tracking.experiment``, else ``mlflow_experiment``."""
        return spec.tracking.experiment or self.mlflow_experiment

    @property
    def artifact_root(self) -> Path:
        """Artifact folder of experiments created on the embedded SQLite store."""
        return self.home / "mlartifacts"

    @property
    def storage_path(self) -> str:
        return self.ray_storage or str(self.home / "ray")

    @property
    def dataset_cache(self) -> Path:
        """Where synthetic datasets are generated (on each node that needs them)."""
        return self.home / "datasets"

    @property
    def job_store_url(self) -> str:
        return self.database_url or f"sqlite:///{self.home / 'jobs.db'}"

    @property
    def tokens_file(self) -> Path:
        return (self.api_tokens_file or self.home / "api-tokens.json").expanduser().resolve()

    @property
    def token_path(self) -> Path:
        return (self.ray_auth_token_path or self.home / "ray-auth-token").expanduser().resolve()


def describe_settings_error(error: Exception) -> list[tuple[str, str]]:
    """``(environment variable, problem)`` pairs for a settings failure."""
    from pydantic import ValidationError

    if not isinstance(error, ValidationError):
        return [("SPARKORCH_*", str(error))]
    return [
        (
            "SPARKORCH_" + "_".join(str(part) for part in e["loc"][:1]).upper(),
            f"{e['msg']} (got {e.get('input')!r})",
        )
        for e in error.errors()
    ]


def mlflow_run_route(experiment_id: str, run_id: str) -> str:
    """A run's page in the MLflow UI, from its ``#/``: in the UI's model-training view (the
    UI's own default is its GenAI view, whatever the experiment's kind)."""
    return f"#/experiments/{experiment_id}/runs/{run_id}?workflowType=machine_learning"
