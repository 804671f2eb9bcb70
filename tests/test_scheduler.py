"""How the reconciler reads Ray's answers (the paths with a live Ray are in test_api_ray.py
and the rehearsal): only a real 404 means "Ray does not know this submission"; a connection
error whose text happens to hold "404" must never make a running job look lost."""

from __future__ import annotations

from dataclasses import replace

from orchestrator.control.scheduler import RayUnavailable, _not_found, submission_id, submission_ids
from orchestrator.control.store import new_job


def test_only_a_404_status_means_not_found() -> None:
    assert _not_found(RuntimeError("Request failed with status code 404: Job x does not exist."))
    assert not _not_found(RuntimeError("Request failed with status code 500: boom."))
    url_with_404 = "Max retries exceeded with url: /api/jobs/3f404a1c-0000 (status code 404?)"
    assert not _not_found(RayUnavailable(url_with_404))


def test_each_submission_has_its_own_ray_id() -> None:
    job = new_job(
        job_id="10000000-0000-4000-8000-000000000001",
        kind="pretrain",
        name="n",
        owner="o",
        spec={},
        num_workers=1,
        num_gpus=0,
    )
    assert job.submissions == 0 and submission_ids(job) == []
    first, third = replace(job, submissions=1), replace(job, submissions=3)
    assert submission_id(first) == job.id and submission_ids(first) == [job.id]
    assert submission_id(third) == f"{job.id}-3"
    assert submission_ids(third) == [job.id, f"{job.id}-2", f"{job.id}-3"]
