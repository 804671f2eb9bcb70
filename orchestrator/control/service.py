"""What the routes do, without HTTP: create, list, cancel and inspect jobs.

Raises the domain errors below; ``api/routes`` turns them into HTTP problems.
"""

from __future__ import annotations

import csv
import io
import logging
import tempfile
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from orchestrator.control.scheduler import RayJobs, Reconciler, submission_id, submission_ids
from orchestrator.control.store import (
    ACTIVE_STATES,
    TERMINAL_STATES,
    Job,
    JobFilter,
    JobPage,
    JobStore,
    new_job,
)
from orchestrator.runner import get_kind, parse_job_spec
from orchestrator.settings import OrchestratorSettings
from orchestrator.specs import SpecError

logger = logging.getLogger(__name__)

MAX_QUEUED_PER_OWNER = 100


class JobNotFound(LookupError):
    pass


class JobFinished(RuntimeError):
    """The job already ended: it cannot be cancelled."""


class JobNotHeld(RuntimeError):
    pass


class QuotaExceeded(RuntimeError):
    def __init__(self, message: str, errors: list[tuple[str, str]] | None = None) -> None:
        super().__init__(message)
        self.errors = errors or []


class QueueFull(RuntimeError):
    pass


@dataclass
class JobService:
    store: JobStore
    ray_jobs: RayJobs
    reconciler: Reconciler
    settings: OrchestratorSettings

    # ------------------------------------------------------------ writes

    def create(
        self,
        owner: str,
        kind: str,
        spec_document: dict[str, Any],
        idempotency_key: str | None,
        *,
        hold: bool = False,
    ) -> tuple[Job, bool]:
        """Validate and store a job (QUEUED); the reconciler submits it.
        Raises SpecError (paths prefixed ``spec.``), QuotaExceeded, QueueFull,
        IdempotencyConflict."""
        try:
            spec = parse_job_spec(kind, spec_document, self.settings.allowed_data_roots)
        except SpecError as error:
            raise SpecError(
                [(f"spec.{path}" if path else "spec", msg) for path, msg in error.errors]
            ) from None
        workers, gpus = get_kind(kind).size(spec)
        self._check_quota(kind, workers, gpus)
        if self.store.count_active(owner, ["HELD", "QUEUED"]) >= MAX_QUEUED_PER_OWNER:
            raise QueueFull(f"{MAX_QUEUED_PER_OWNER} jobs are already queued for {owner}")
        job = new_job(
            job_id=str(uuid.uuid4()),
            kind=kind,
            name=spec.name,
            owner=owner,
            spec=spec.model_dump(mode="json"),
            num_workers=workers,
            num_gpus=gpus,
            idempotency_key=idempotency_key,
            submitted_document=spec_document,
            hold=hold,
        )
        stored, created = self.store.create(job)
        if created:
            self.reconciler.wake()
        return stored, created

    def _check_quota(self, kind: str, workers: int, gpus: float) -> None:
        s = self.settings
        where = "spec.resources" if kind == "pretrain" else "spec.base.resources"
        errors = []
        if workers > s.quota_workers_per_job:
            errors.append(
                (
                    f"{where}.num_workers",
                    f"the job needs {workers} workers at once; the quota is "
                    f"{s.quota_workers_per_job} per job",
                )
            )
        if gpus > s.quota_gpus_per_job:
            errors.append(
                (
                    f"{where}.gpus_per_worker",
                    f"the job needs {gpus:g} GPUs at once; the quota is "
                    f"{s.quota_gpus_per_job:g} per job",
                )
            )
        if errors:
            raise QuotaExceeded("the job is larger than the per-job quota", errors)

    def cancel(self, owner: str, job_id: str) -> Job:
        """Idempotent: cancelling a cancelling job returns it again."""
        job = self.get(owner, job_id)
        if job.state in TERMINAL_STATES:
            if job.state == "CANCELLED":
                return job
            raise JobFinished(f"job {job_id} already ended {job.state}")
        if job.state in ("HELD", "QUEUED") and self.store.update(
            job_id,
            expect_states=["HELD", "QUEUED"],
            state="CANCELLED",
            cancel_requested=True,
            message="cancelled before it was submitted",
        ):
            return self.get(owner, job_id)
        self.store.update(job_id, expect_states=ACTIVE_STATES, cancel_requested=True)
        # Re-read: the reconciler may have (re)submitted the job meanwhile. A job still
        # SUBMITTING is left to the reconciler, which stops what it submitted.
        job = self.get(owner, job_id)
        if job.state in ("PENDING", "RUNNING"):
            ray_id = submission_id(job)
            if not self.ray_jobs.stop(ray_id) and self.ray_jobs.status(ray_id) is None:
                self.store.update(job_id, expect_states=[job.state], state="CANCELLED")
        self.reconciler.wake()
        return self.get(owner, job_id)

    def release(self, owner: str, job_id: str) -> Job:
        """HELD -> QUEUED; releasing a job that is no longer held raises JobNotHeld."""
        self.get(owner, job_id)
        if not self.store.update(job_id, expect_states=["HELD"], state="QUEUED", message=None):
            raise JobNotHeld(f"job {job_id} is not held")
        self.reconciler.wake()
        return self.get(owner, job_id)

    # ------------------------------------------------------------ reads

    def get(self, owner: str, job_id: str) -> Job:
        job = self.store.get(job_id, owner=owner) if _is_uuid(job_id) else None
        if job is None:
            raise JobNotFound(f"no job {job_id}")
        return job

    def list(
        self,
        owner: str,
        *,
        states: list[str],
        kind: str | None,
        name: str | None,
        limit: int,
        cursor: str | None,
    ) -> JobPage:
        return self.store.list(
            JobFilter(owner=owner, states=states, kind=kind, name=name), limit=limit, cursor=cursor
        )

    def logs(self, job: Job, tail: int) -> list[str]:
        """The last ``tail`` lines of the drivers' logs, every submission in order."""
        lines: list[str] = []
        for number, ray_id in enumerate(submission_ids(job), start=1):
            if number > 1:
                lines.append(f"--- submission {number} (Ray submission {ray_id}) ---")
            lines += self.ray_jobs.logs(ray_id).splitlines()
        return lines[-tail:]

    def follow_logs(self, job: Job) -> Any:
        """The latest submission's log as it is written (an async iterator of text)."""
        return self.ray_jobs.tail(submission_id(job))

    def progress(self, job: Job) -> dict[str, Any]:
        from orchestrator.progress import read_progress, read_trials

        out: dict[str, Any] = {"job_id": job.id, "state": job.state}
        ref = self.run_ref(job)
        if ref is None:
            return out
        progress = read_progress(ref).to_dict()
        out["mlflow_status"] = progress.pop("status")
        out.update(progress)
        if job.kind == "sweep":
            out["trials"] = read_trials(ref, list(job.spec.get("search", {})))
        return out

    def results(self, job: Job) -> dict[str, Any]:
        from orchestrator.tracking import client_for

        out: dict[str, Any] = {"job_id": job.id, "kind": job.kind, "state": job.state}
        ref = self.run_ref(job)
        if ref is None:
            return out
        client = client_for(ref.tracking_uri)
        run = client.get_run(ref.run_id)
        out["mlflow_run_id"] = ref.run_id
        out["metrics"] = {k: v for k, v in run.data.metrics.items() if not k.startswith("train/")}
        out["artifacts"] = _artifact_paths(client, ref.run_id)
        if job.kind == "sweep" and "results/table.csv" in out["artifacts"]:
            with tempfile.TemporaryDirectory(prefix="sparkorch-results-") as folder:
                local = client.download_artifacts(ref.run_id, "results/table.csv", folder)
                reader = csv.DictReader(io.StringIO(Path(local).read_text()))
                out["rows"] = list(reader)
                out["columns"] = list(reader.fieldnames or [])
        return out

    def run_ref(self, job: Job) -> Any:
        from orchestrator.tracking import RunRef

        if not (job.mlflow_run_id and job.mlflow_experiment_id):
            return None
        return RunRef(self.settings.tracking_uri, job.mlflow_experiment_id, job.mlflow_run_id)

    def mlflow_link(self, job: Job) -> str | None:
        base = self.settings.mlflow_ui_url
        if not (base and job.mlflow_run_id and job.mlflow_experiment_id):
            return None
        return (
            f"{base.rstrip('/')}/#/experiments/{job.mlflow_experiment_id}/runs/{job.mlflow_run_id}"
        )


def _is_uuid(value: str) -> bool:
    try:
        return str(uuid.UUID(value)) == value
    except ValueError:
        return False


def _artifact_paths(client: Any, run_id: str, path: str | None = None, depth: int = 2) -> list[str]:
    paths: list[str] = []
    for item in client.list_artifacts(run_id, path):
        if item.is_dir and depth > 0:
            paths += _artifact_paths(client, run_id, item.path, depth - 1)
        elif not item.is_dir:
            paths.append(item.path)
    return paths
