"""The job kinds: one registry entry each, holding everything that differs between kinds.

The REST service (the ``kind`` enum, JSON Schemas, admission and quotas, progress and
results), the scheduler (entrypoint module, resubmission policy), ``sparkctl`` (spec-file
detection, one local verb per kind, live views, result text) and the Ray Jobs entrypoints
all read :data:`JOB_KINDS`; none of them branches on a kind's name. A new kind is one entry
here, plus its spec class, its runner and its three-line ``jobs/<name>.py``.

Torch-free: the REST service imports this module. Runners (which need torch) are imported
by name when a job runs.
"""

from __future__ import annotations

import csv
import importlib
import io
import tempfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any

from pydantic import BaseModel

from orchestrator.lifecycle import JobCancelled, cancel_on_sigterm
from orchestrator.settings import OrchestratorSettings
from orchestrator.specs import (
    FinetuneSpec,
    PretrainSpec,
    SpecError,
    SweepSpec,
    parse_document,
    read_spec_file,
)

# What a live view redraws, and what reads it: ``live_view(spec, ref)()`` -> text.
LiveView = Callable[[], str]


@dataclass(frozen=True)
class JobSize:
    """What a job holds on the cluster at once: ``copies`` runs of ``workers`` Ray Train
    workers (a sweep's concurrent trials), and the spec fields that set each number."""

    workers: int
    gpus: float
    copies: int
    workers_field: str
    gpus_field: str
    copies_field: str | None

    @property
    def total_workers(self) -> int:
        return self.workers * self.copies

    @property
    def total_gpus(self) -> float:
        return self.gpus * self.copies


def _one(spec: Any) -> int:
    return 1


def _no_details(spec: Any) -> dict[str, Any]:
    return {}


@dataclass(frozen=True)
class JobKind:
    """Everything the service, the scheduler, the CLI and the entrypoints need of one kind.

    Attributes:
        name: the kind's name (REST ``kind``, ``sparkctl <name>``, ``jobs.<name>``).
        spec_type: its pydantic spec class (validation, JSON Schema).
        summary: one line for help texts and API docs.
        run_label: what its MLflow record is called in messages ("run", "parent run").
        runner: ``"module:function"`` that runs a validated spec to the end in this process
            (``function(spec, *, job_id, settings, on_run_open)``).
        marker_keys: top-level keys that only this kind's spec documents have (how
            ``sparkctl`` tells a spec file's kind).
        section: where, in the spec, the section with ``resources`` and ``failures`` sits
            (``()`` for the spec itself, ``("base",)`` for a sweep's base spec).
        later_sections: optional sections with ``resources`` that each copy runs after
            ``section`` (a sweep's ``finetune``); admission counts the largest.
        copies: how many runs of that section's resources it holds at once.
        copies_field: the spec field that sets ``copies``, for quota errors.
        describe: ``sparkctl validate``'s words about a valid spec (after "valid ").
        details: more fields of ``sparkctl validate --json`` (derived values).
        poll_s: seconds between redraws of the live view (MLflow reads per redraw).
        result_text: ``sparkctl <name>``'s report of a finished job (result, MLflow link).
        live_view: ``"module:function"`` giving ``function(spec, ref)`` -> a callable that
            returns the text ``sparkctl`` redraws while the job runs.
        progress_extra: fields added to ``GET /progress`` (stored spec document, run ref).
        results_extra: fields added to ``GET /results`` (MLflow client, run id, artifacts).
    """

    name: str
    spec_type: type[BaseModel]
    summary: str
    run_label: str
    runner: str
    marker_keys: frozenset[str]
    describe: Callable[[Any], str]
    result_text: Callable[[Any, str], str]
    live_view: str
    details: Callable[[Any], dict[str, Any]] = _no_details
    poll_s: float = 2.0
    section: tuple[str, ...] = ()
    later_sections: tuple[tuple[str, ...], ...] = ()
    copies: Callable[[Any], int] = _one
    copies_field: str | None = None
    progress_extra: Callable[[Mapping[str, Any], Any], dict[str, Any]] | None = None
    results_extra: Callable[[Any, str, list[str]], dict[str, Any]] | None = None

    @property
    def entrypoint_module(self) -> str:
        """The fixed Ray Jobs entrypoint: ``python -m jobs.<name> --job-id <uuid>``."""
        return f"jobs.{self.name}"

    def parse(
        self, data: Any, *, data_roots: Sequence[str | Path] | None, source: str = "spec"
    ) -> Any:
        """Validate a spec document of this kind (:class:`SpecError` names the fields)."""
        return parse_document(self.spec_type, data, data_roots=data_roots, source=source)

    def load(self, path: str | Path, *, data_roots: Sequence[str | Path] | None) -> Any:
        """Read and validate a YAML/JSON spec file of this kind."""
        return self.parse(read_spec_file(path), data_roots=data_roots, source=str(path))

    def json_schema(self) -> dict[str, Any]:
        return self.spec_type.model_json_schema()

    def size(self, spec: Any) -> JobSize:
        """What the job holds at once (what admission checks against the quotas): for each
        copy, the largest of the sections it runs one after the other (a sweep trial's
        pre-training, then its fine-tuning)."""
        held = []
        for path in (self.section, *self.later_sections):
            section = _attribute(spec, path)
            if section is None:
                continue
            prefix = "".join(f"{part}." for part in path)
            resources = section.resources
            workers = resources.num_workers
            held.append((workers, workers * resources.gpus_per_worker, prefix))
        workers, _, workers_prefix = max(held, key=lambda h: h[0])
        _, gpus, gpus_prefix = max(held, key=lambda h: h[1])
        return JobSize(
            workers=workers,
            gpus=gpus,
            copies=self.copies(spec),
            workers_field=f"{workers_prefix}resources.num_workers",
            gpus_field=f"{gpus_prefix}resources.gpus_per_worker",
            copies_field=self.copies_field,
        )

    def resubmit_on_loss(self, document: Mapping[str, Any]) -> bool:
        """The stored spec's ``failures.resubmit_on_loss`` (default true)."""
        node: Any = document
        for part in (*self.section, "failures"):
            node = node.get(part, {}) if isinstance(node, Mapping) else {}
        return bool(node.get("resubmit_on_loss", True))

    def run(
        self,
        spec: Any,
        *,
        job_id: str | None,
        settings: OrchestratorSettings,
        on_run_open: Callable[[str, Any], None] | None = None,
        startup: Any = None,
    ) -> Any:
        """Run a job to the end in this process; SIGTERM raises :class:`JobCancelled`.

        ``startup``: the driver's :class:`orchestrator.startup.StartupClock`, whose marks
        rank 0 logs after the first step (None: no startup metrics)."""
        with cancel_on_sigterm():
            return _named(self.runner)(
                spec, job_id=job_id, settings=settings, on_run_open=on_run_open, startup=startup
            )

    def follow(self, spec: Any, ref: Any) -> LiveView:
        """What ``sparkctl`` redraws while the job runs."""
        return _named(self.live_view)(spec, ref)


def _attribute(obj: Any, path: Sequence[str]) -> Any:
    for part in path:
        obj = getattr(obj, part)
    return obj


def _named(target: str) -> Any:
    module, _, name = target.partition(":")
    return getattr(importlib.import_module(module), name)


# ------------------------------------------------------------------------------ pretrain


def _describe_pretrain(spec: PretrainSpec) -> str:
    derived = spec.derived()
    return (
        f"({spec.model.backbone}, {spec.optim.epochs} epochs, "
        f"{spec.resources.num_workers} worker(s) x batch {derived.per_worker_batch}, "
        f"peak lr {derived.peak_lr:.3g})"
    )


def _pretrain_details(spec: PretrainSpec) -> dict[str, Any]:
    # What omitted fields stand for, beside the values derived from the spec.
    effective = {"model.drop_path_rate": spec.model.effective_drop_path_rate()}
    return {"derived": spec.derived().__dict__, "effective": effective}


def _pretrain_result_text(result: Any, link: str) -> str:
    metrics = "  ".join(f"{k} {v:.4g}" for k, v in result.metrics.items())
    return (
        f"{result.status}: job {result.job_id}, {result.epochs} epochs, {result.steps} steps "
        f"in {result.wall_time_s:.0f} s\n{metrics}\n"
        f"MLflow run {result.run_id} (experiment {result.experiment_id}, "
        f"{result.tracking_uri})\n  {link}\n"
        f"encoder weights: sparkctl export {result.run_id} OUT.safetensors"
    )


# ------------------------------------------------------------------------------ finetune


def _describe_finetune(spec: FinetuneSpec) -> str:
    recipe, row = spec.effective_recipe()
    table = row if row == spec.model.backbone else f"{row}'s row: no row of its own"
    return (
        f"({spec.model.backbone} at {spec.model.input_size} px from {spec.weights.kind}, "
        f"{recipe.epochs} epochs, {recipe.optimizer}, batch {recipe.batch_size}, recipe of "
        f"{table})"
    )


def _finetune_details(spec: FinetuneSpec) -> dict[str, Any]:
    recipe, row = spec.effective_recipe()
    return {
        "recipe": recipe.__dict__,
        "recipe_row": row,
        "peak_lr": recipe.peak_lr(),
    }


def _finetune_result_text(result: Any, link: str) -> str:
    metrics = result.metrics
    return (
        f"{result.status}: job {result.job_id}, {result.epochs} epochs, {result.steps} steps in "
        f"{result.wall_time_s:.0f} s, from {result.source}\n"
        f"finetune_top1 {metrics.get('finetune_top1', float('nan')):.2f} (best of model "
        f"{metrics.get('best_model_top1', float('nan')):.2f} and EMA "
        f"{metrics.get('best_ema_top1', float('nan')):.2f}, epoch "
        f"{metrics.get('best_epoch', 0):.0f})\n"
        f"MLflow run {result.run_id} (experiment {result.experiment_id}, "
        f"{result.tracking_uri})\n  {link}\nmodel: {result.model_uri}"
    )


# --------------------------------------------------------------------------------- sweep


def _describe_sweep(sweep: SweepSpec) -> str:
    return (
        f"sweep ({', '.join(sweep.search) or 'no search'}; {len(sweep.variants)} variant(s); "
        f"{len(sweep.seeds)} seed(s); {sweep.trial_count()} trial(s), "
        f"{sweep.concurrent_trials()} at once; metric {sweep.metric} ({sweep.mode}))"
    )


def _sweep_result_text(result: Any, link: str) -> str:
    from orchestrator.sweeps import to_markdown

    return (
        f"{result.status}: sweep {result.job_id} in {result.wall_time_s:.0f} s\n\n"
        f"{to_markdown(result.columns, result.records)}\n"
        f"best: {result.best or {}}\nMLflow parent run {result.run_id}: {link}"
    )


def _sweep_progress(document: Mapping[str, Any], ref: Any) -> dict[str, Any]:
    from orchestrator.progress import read_trials

    return {"trials": read_trials(ref, list(document.get("search", {})))}


SWEEP_TABLE_ARTIFACT = "results/table.csv"


def _sweep_results(client: Any, run_id: str, artifacts: list[str]) -> dict[str, Any]:
    if SWEEP_TABLE_ARTIFACT not in artifacts:
        return {}
    with tempfile.TemporaryDirectory(prefix="sparkorch-results-") as folder:
        local = client.download_artifacts(run_id, SWEEP_TABLE_ARTIFACT, folder)
        reader = csv.DictReader(io.StringIO(Path(local).read_text()))
        rows = list(reader)
    return {"rows": rows, "columns": list(reader.fieldnames or [])}


# ------------------------------------------------------------------------------ registry

JOB_KINDS: Mapping[str, JobKind] = MappingProxyType(
    {
        kind.name: kind
        for kind in (
            JobKind(
                name="pretrain",
                spec_type=PretrainSpec,
                summary="one SparK pre-training run (Ray Train)",
                run_label="run",
                runner="orchestrator.pretrain:run_pretrain",
                marker_keys=frozenset({"data"}),
                describe=_describe_pretrain,
                details=_pretrain_details,
                result_text=_pretrain_result_text,
                live_view="orchestrator.progress:progress_line_view",
            ),
            JobKind(
                name="finetune",
                spec_type=FinetuneSpec,
                summary="fine-tuning with the paper's downstream protocol (Ray Train)",
                run_label="run",
                runner="orchestrator.finetune:run_finetune",
                marker_keys=frozenset({"data", "weights"}),
                describe=_describe_finetune,
                details=_finetune_details,
                result_text=_finetune_result_text,
                live_view="orchestrator.progress:progress_line_view",
            ),
            JobKind(
                name="sweep",
                spec_type=SweepSpec,
                summary="an ablation sweep of pre-training runs (Ray Tune)",
                run_label="parent run",
                runner="orchestrator.sweeps:run_sweep",
                marker_keys=frozenset({"base"}),
                describe=_describe_sweep,
                result_text=_sweep_result_text,
                live_view="orchestrator.progress:trial_table_view",
                poll_s=5.0,
                section=("base",),
                later_sections=(("finetune",),),
                copies=SweepSpec.concurrent_trials,
                copies_field="max_concurrent_trials",
                progress_extra=_sweep_progress,
                results_extra=_sweep_results,
            ),
        )
    }
)
KIND_NAMES: tuple[str, ...] = tuple(JOB_KINDS)


def spec_types() -> dict[str, type[BaseModel]]:
    """Every kind's spec class by class name (what :func:`orchestrator.specs.unship` reads)."""
    return {kind.spec_type.__name__: kind.spec_type for kind in JOB_KINDS.values()}


def get_kind(name: str) -> JobKind:
    try:
        return JOB_KINDS[name]
    except KeyError:
        raise ValueError(f"unknown job kind {name!r}: use one of {', '.join(JOB_KINDS)}") from None


def detect_kind(document: Any, source: str = "spec") -> JobKind:
    """The kind of a spec document, from its top-level keys.

    The kind whose marker keys are all present wins, the one with most of them if several
    (a fine-tune spec has ``data`` and ``weights``, a pre-training spec ``data``); failing
    that, the one sharing most keys. A document with no kind's keys is taken as the first
    kind (``pretrain``), so that its validation errors say what is missing.

    Raises:
        SpecError: two kinds fit equally well (name the kind with ``--kind``).
    """
    keys = set(document) if isinstance(document, Mapping) else set()

    def fit(kind: JobKind) -> tuple[bool, int]:
        return kind.marker_keys <= keys, len(kind.marker_keys & keys)

    best = max((fit(kind) for kind in JOB_KINDS.values()), default=(False, 0))
    if best[1] == 0:
        # Nothing to tell by: validate as the first kind, whose errors name what is missing.
        return next(iter(JOB_KINDS.values()))
    matches = [kind for kind in JOB_KINDS.values() if fit(kind) == best]
    if len(matches) == 1:
        return matches[0]
    hints = "; ".join(f"{k.name}: {', '.join(sorted(k.marker_keys))}" for k in JOB_KINDS.values())
    found = " and ".join(k.name for k in matches)
    raise SpecError(
        [("", f"cannot tell the job kind (keys of {found}); each kind's keys are {hints}")],
        source,
    )


__all__ = [
    "JOB_KINDS",
    "KIND_NAMES",
    "JobCancelled",
    "JobKind",
    "JobSize",
    "detect_kind",
    "get_kind",
    "spec_types",
]
