"""The job service: admission (validation, quotas, queue limit, idempotency), cancel,
release, and what a job's progress, results and logs are; no HTTP.

Raises the domain errors below; ``api/routes`` turns them into HTTP problems. Everything
that differs between job kinds comes from :mod:`orchestrator.kinds`.
"""

from __future__ import annotations

import logging
import uuid
from dataclasses import dataclass
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
from orchestrator.kinds import JobSize, get_kind
from orchestrator.settings import OrchestratorSettings, mlflow_run_route
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

    def warm_up(self) -> None:
        """Import what the lazy paths need (Ray's job client, MLflow's), so that the first
        ``/readyz``, progress or results call does not pay seconds of imports."""
        import ray.job_submission  # noqa: F401

        import orchestrator.progress  # noqa: F401  (MLflow's client)

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
        job_kind = get_kind(kind)
        try:
            spec = job_kind.parse(spec_document, data_roots=self.settings.allowed_data_roots)
        except SpecError as error:
            raise SpecError(
                [(f"spec.{path}" if path else "spec", msg) for path, msg in error.errors]
            ) from None
        size = job_kind.size(spec)
        self._check_quota(size)
        if self.store.count_active(owner, ["HELD", "QUEUED"]) >= MAX_QUEUED_PER_OWNER:
            raise QueueFull(f"{MAX_QUEUED_PER_OWNER} jobs are already queued for {owner}")
        job = new_job(
            job_id=str(uuid.uuid4()),
            kind=kind,
            name=spec.name,
            owner=owner,
            spec=spec.model_dump(mode="json"),
            num_workers=size.total_workers,
            num_gpus=size.total_gpus,
            idempotency_key=idempotency_key,
            submitted_document=spec_document,
            hold=hold,
        )
        stored, created = self.store.create(job)
        if created:
            self.reconciler.wake()
        return stored, created

    def _check_quota(self, size: JobSize) -> None:
        """Per-job quotas on what the job holds at once (a sweep: all its concurrent trials)."""
        s = self.settings
        at_once = f" ({size.copies} runs at once, {size.copies_field})" if size.copies > 1 else ""
        errors = []
        if size.total_workers > s.quota_workers_per_job:
            errors.append(
                (
                    f"spec.{size.workers_field}",
                    f"the job needs {size.total_workers} workers at once{at_once}; the quota is "
                    f"{s.quota_workers_per_job} per job",
                )
            )
        if size.total_gpus > s.quota_gpus_per_job:
            errors.append(
                (
                    f"spec.{size.gpus_field}",
                    f"the job needs {size.total_gpus:g} GPUs at once{at_once}; the quota is "
                    f"{s.quota_gpus_per_job:g} per job",
                )
            )
        fits = min(
            s.quota_workers_per_job // size.workers,
            int(s.quota_gpus_per_job // size.gpus) if size.gpus else size.copies,
        )
        if errors and size.copies_field and 1 <= fits < size.copies:
            errors.append(
                (
                    f"spec.{size.copies_field}",
                    f"{size.copies} runs at once exceed the per-job quota; set it to at most "
                    f"{fits} (0 runs every trial at once)",
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
        from orchestrator.progress import read_progress

        out: dict[str, Any] = {"job_id": job.id, "state": job.state}
        ref = self.run_ref(job)
        if ref is None:
            return out
        progress = read_progress(ref).to_dict()
        out["mlflow_status"] = progress.pop("status")
        out.update(progress)
        extra = get_kind(job.kind).progress_extra
        if extra is not None:
            out.update(extra(job.spec, ref))
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
        extra = get_kind(job.kind).results_extra
        if extra is not None:
            out.update(extra(client, ref.run_id, out["artifacts"]))
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
        return f"{base.rstrip('/')}/{mlflow_run_route(job.mlflow_experiment_id, job.mlflow_run_id)}"


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
