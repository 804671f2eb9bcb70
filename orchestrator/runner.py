"""One registry of job kinds: how each is validated, run and sized (for quotas).

The Ray Jobs entrypoints, ``sparkctl`` and the REST service all go through it, so a new kind
of job is one entry in :data:`JOB_KINDS`, not a new branch in each of them.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from orchestrator.lifecycle import JobCancelled, cancel_on_sigterm
from orchestrator.settings import OrchestratorSettings
from orchestrator.specs import (
    PretrainSpec,
    SweepSpec,
    load_spec,
    load_sweep,
    parse_spec,
    parse_sweep,
)

logger = logging.getLogger(__name__)

Spec = PretrainSpec | SweepSpec


def _run_pretrain(spec: Any, **kwargs: Any) -> Any:
    from orchestrator.pretrain import run_pretrain

    return run_pretrain(spec, **kwargs)


def _run_sweep(spec: Any, **kwargs: Any) -> Any:
    from orchestrator.sweeps import run_sweep

    return run_sweep(spec, **kwargs)


def _pretrain_size(spec: PretrainSpec) -> tuple[int, float]:
    resources = spec.resources
    return resources.num_workers, resources.num_workers * resources.gpus_per_worker


def _sweep_size(spec: SweepSpec) -> tuple[int, float]:
    workers, gpus = _pretrain_size(spec.base)
    concurrent = spec.max_concurrent_trials or 1
    return workers * concurrent, gpus * concurrent


@dataclass(frozen=True)
class JobKind:
    """What the service needs to know about one kind of job."""

    name: str
    spec_type: type
    parse: Callable[..., Any]
    load: Callable[..., Any]
    run: Callable[..., Any]
    size: Callable[[Any], tuple[int, float]]
    run_label: str

    def module(self) -> str:
        """The fixed Ray Jobs entrypoint module of this kind."""
        return f"jobs.{self.name}"


JOB_KINDS: dict[str, JobKind] = {
    "pretrain": JobKind(
        "pretrain", PretrainSpec, parse_spec, load_spec, _run_pretrain, _pretrain_size, "run"
    ),
    "sweep": JobKind(
        "sweep", SweepSpec, parse_sweep, load_sweep, _run_sweep, _sweep_size, "parent run"
    ),
}


def get_kind(name: str) -> JobKind:
    try:
        return JOB_KINDS[name]
    except KeyError:
        raise ValueError(f"unknown job kind {name!r}: use one of {', '.join(JOB_KINDS)}") from None


def parse_job_spec(kind: str, data: Any, data_roots: Sequence[str | Path]) -> Spec:
    """Validate a spec document of ``kind`` (raises SpecError naming the fields)."""
    return get_kind(kind).parse(data, data_roots=data_roots)


def run_job(
    kind: str,
    spec: Spec,
    *,
    job_id: str | None,
    settings: OrchestratorSettings,
    on_run_open: Callable[[str, Any], None] | None = None,
) -> Any:
    """Run a job to the end in this process; SIGTERM raises :class:`JobCancelled`."""
    with cancel_on_sigterm():
        return get_kind(kind).run(spec, job_id=job_id, settings=settings, on_run_open=on_run_open)


__all__ = ["JOB_KINDS", "JobCancelled", "JobKind", "get_kind", "parse_job_spec", "run_job"]
