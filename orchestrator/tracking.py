"""MLflow records of training jobs: one run per job, tagged with its job id.

The driver owns the run's life (creates or reopens it, logs the spec, the datasets it reads,
the final artifacts, the model and the evaluation, and ends it FINISHED, FAILED or KILLED);
rank 0 of the Ray Train workers logs the training metrics and reconstruction pictures into it
through :class:`MetricsLogger` (sent from a background thread, so that no training step waits
on the tracking server) and the machine's system metrics through :func:`system_metrics`.

It follows MLflow 3's own conventions: experiments are tagged as model development
(``mlflow.experimentKind``), datasets are run inputs (the run's "Datasets" panel), models
are logged models with a signature (``runs:/<run>/<name>`` and ``models:/`` load them).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import platform
import queue
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from mlflow.entities import Dataset, DatasetInput, InputTag, Metric, Param, RunStatus, RunTag
from mlflow.tracking import MlflowClient
from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT, MLFLOW_RUN_NAME

from orchestrator.settings import OrchestratorSettings
from orchestrator.specs import JOB_ID_TAG, DataSource, PretrainSpec, SyntheticData, is_reserved_tag

logger = logging.getLogger(__name__)

TOTAL_STEPS_TAG = "sparkorch.total_steps"
# One point per checkpoint restore (value = the global step it resumed at).
RESUMED_AT_STEP = "train/resumed_at_step"
GLOBAL_BATCH_TAG = "sparkorch.global_batch_size"
# Set on a run stopped from outside (a sweep's scheduler) just before it is ended KILLED.
STOPPED_TAG = "sparkorch.stopped"
ACTIVE_STATUSES = frozenset({"RUNNING", "SCHEDULED"})
_BATCH_LIMIT = 100  # MLflow's log_batch accepts at most 100 params / 1000 metrics per call
MONITOR_STOP_TIMEOUT_S = 15.0  # the longest wait for the system-metrics monitor to stop
_METRIC_BATCH_LIMIT = 1000
# The MLflow UI opens an experiment of this kind in its model-training view (the tag and
# value the UI itself writes when a user picks "Machine learning"; mlflow has no constant).
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
CUSTOM_MODEL_DEVELOPMENT = "custom_model_development"
# Seconds between system-metric samples on rank 0 (CPU, memory, disk, network; GPU with the
# optional nvidia-ml-py); read by system_metrics_interval() only. 0 turns them off.
SYSTEM_METRICS_INTERVAL_ENV = "SPARKORCH_SYSTEM_METRICS_INTERVAL_S"
DEFAULT_SYSTEM_METRICS_INTERVAL_S = 10.0
# Rank 0 of a pre-training job looks its run up by the job id (the driver opens it while Ray
# Train starts): every RUN_LOOKUP_POLL_S, for at most RUN_LOOKUP_TIMEOUT_S (the driver opens
# it in seconds; when the driver dies, Ray stops the workers long before this).
RUN_LOOKUP_POLL_S = 0.5
RUN_LOOKUP_TIMEOUT_S = 300.0


@dataclass(frozen=True)
class RunRef:
    tracking_uri: str
    experiment_id: str
    run_id: str


class RunNotFoundError(RuntimeError):
    """The job's MLflow run did not appear in time (see :func:`locate_run`)."""


def locate_run(run: Mapping[str, str], timeout_s: float = RUN_LOOKUP_TIMEOUT_S) -> RunRef:
    """Rank 0's MLflow run, from what its driver shipped.

    ``run`` holds a :class:`RunRef`'s fields when the driver opened the run before starting
    the trainer (fine-tuning), or ``tracking_uri``, ``experiment`` (a name) and ``job_id``
    when it opens the run while Ray Train starts (pre-training: the controller and workers
    take seconds to start, which the driver spends on MLflow). Then the run is looked up by
    its job id until it exists (a run reopened for a job submitted again is the same run).

    Raises:
        RunNotFoundError: no such run within ``timeout_s``.
    """
    if run.get("run_id"):
        return RunRef(run["tracking_uri"], run["experiment_id"], run["run_id"])
    client = client_for(run["tracking_uri"])
    deadline = time.monotonic() + timeout_s
    while True:
        experiment = client.get_experiment_by_name(run["experiment"])
        if experiment is not None:
            run_id = find_job_run(client, experiment.experiment_id, run["job_id"])
            if run_id is not None:
                return RunRef(run["tracking_uri"], experiment.experiment_id, run_id)
        if time.monotonic() >= deadline:
            raise RunNotFoundError(
                f"no MLflow run of job {run['job_id']} in experiment {run['experiment']!r} "
                f"at {run['tracking_uri']} after {timeout_s:.0f} s: its driver did not open it "
                "(see the job's logs)"
            )
        time.sleep(RUN_LOOKUP_POLL_S)


def client_for(tracking_uri: str) -> MlflowClient:
    return MlflowClient(tracking_uri=tracking_uri)


def _is_local_store(tracking_uri: str) -> bool:
    return tracking_uri.startswith("sqlite:") or "://" not in tracking_uri


def ensure_experiment(client: MlflowClient, name: str, settings: OrchestratorSettings) -> str:
    """The id of experiment ``name``, created when missing.

    On the embedded SQLite store its artifacts go under ``$SPARKORCH_HOME/mlartifacts``
    (MLflow would otherwise use ``./mlruns`` of whatever folder the process started in); a
    tracking server decides for itself.
    """
    experiment = client.get_experiment_by_name(name)
    if experiment is not None:
        return _mark_model_development(client, experiment)
    location = None
    if _is_local_store(settings.tracking_uri):
        settings.artifact_root.mkdir(parents=True, exist_ok=True)
        location = (settings.artifact_root / name).as_uri()
    try:
        kind = {EXPERIMENT_KIND_TAG: CUSTOM_MODEL_DEVELOPMENT}
        return client.create_experiment(name, artifact_location=location, tags=kind)
    except Exception:  # created concurrently by another job: use it
        experiment = client.get_experiment_by_name(name)
        if experiment is None:
            raise
        return _mark_model_development(client, experiment)


def _mark_model_development(client: MlflowClient, experiment: Any) -> str:
    """Tag an experiment that has no kind yet (one made before the tag, or by someone else)
    as model development; a kind someone chose is left alone. Returns its id."""
    if EXPERIMENT_KIND_TAG not in experiment.tags:
        client.set_experiment_tag(
            experiment.experiment_id, EXPERIMENT_KIND_TAG, CUSTOM_MODEL_DEVELOPMENT
        )
    return experiment.experiment_id


def find_job_run(client: MlflowClient, experiment_id: str, job_id: str) -> str | None:
    runs = client.search_runs(
        [experiment_id], filter_string=f"tags.{JOB_ID_TAG} = '{job_id}'", max_results=1
    )
    return runs[0].info.run_id if runs else None


def git_commit() -> str | None:
    """The source tree's commit, when it is a git checkout."""
    root = Path(__file__).resolve().parent.parent
    if not (root / ".git").exists():
        return None
    try:
        out = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            timeout=5,
            check=True,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


def environment_tags(spec: PretrainSpec) -> dict[str, str]:
    """The run's environment tags, as the driver sees it (the version of timm from its
    installed distribution, and PyTorch's from rank 0, :func:`worker_tags`: the driver
    imports neither before its workers start)."""
    from importlib.metadata import version

    import mlflow
    import ray

    resources = spec.resources
    device = "cuda" if resources.gpus_per_worker > 0 else "cpu"
    tags = {
        "sparkorch.version.timm": version("timm"),
        "sparkorch.version.ray": ray.__version__,
        "sparkorch.version.mlflow": mlflow.__version__,
        "sparkorch.version.python": platform.python_version(),
        "sparkorch.device": device,
        "sparkorch.num_workers": str(resources.num_workers),
        "sparkorch.host": platform.node(),
    }
    commit = git_commit()
    if commit:
        tags["mlflow.source.git.commit"] = commit
    return tags


def worker_tags() -> dict[str, str]:
    """Tags rank 0 adds: the PyTorch that trains (its build too: ``2.14.1+cu130``)."""
    import torch

    return {"sparkorch.version.torch": torch.__version__}


def open_run(
    settings: OrchestratorSettings,
    *,
    job_id: str,
    experiment: str,
    run_name: str,
    tags: Mapping[str, str],
    params: Mapping[str, str],
    document: dict[str, Any],
    document_name: str = "spec",
) -> tuple[RunRef, bool]:
    """Create the run of ``job_id``, or reopen it when the job ran before.

    Returns ``(run, reopened)``. A new run gets ``tags``, ``params`` and the document as
    ``<document_name>/<document_name>.yaml`` and ``.json`` artifacts.
    """
    client = client_for(settings.tracking_uri)
    experiment_id = ensure_experiment(client, experiment, settings)
    run_id = find_job_run(client, experiment_id, job_id)
    if run_id is not None:
        if STOPPED_TAG in client.get_run(run_id).data.tags:
            client.delete_tag(run_id, STOPPED_TAG)  # runs again: no longer stopped
        client.update_run(run_id, status="RUNNING")
        return RunRef(settings.tracking_uri, experiment_id, run_id), True
    # The service's own tags last, so that no caller's tag (a spec's) replaces the job id the
    # resume lookup above searches by, or the run name (MLflow refuses a differing one).
    own = {JOB_ID_TAG: job_id, MLFLOW_RUN_NAME: run_name}
    run = client.create_run(experiment_id, run_name=run_name, tags={**tags, **own})
    run_id = run.info.run_id
    items = [Param(k, v) for k, v in params.items()]
    for start in range(0, len(items), _BATCH_LIMIT):
        client.log_batch(run_id, params=items[start : start + _BATCH_LIMIT])
    text = yaml.safe_dump(document, sort_keys=False)
    client.log_text(run_id, text, f"{document_name}/{document_name}.yaml")
    client.log_dict(run_id, document, f"{document_name}/{document_name}.json")
    return RunRef(settings.tracking_uri, experiment_id, run_id), False


def open_job_run(
    spec: PretrainSpec,
    job_id: str,
    settings: OrchestratorSettings,
    *,
    parent_run_id: str | None = None,
    extra_tags: Mapping[str, str] | None = None,
    extra_params: Mapping[str, str] | None = None,
) -> tuple[RunRef, bool]:
    """The MLflow run of a training job (nested under ``parent_run_id`` in a sweep).

    ``extra_params`` join the spec's params of a new run (a sweep's trial: its variant); a
    reopened run keeps the params it has (MLflow refuses to change a param's value)."""
    tags = {**_spec_tags(spec), **environment_tags(spec), **(extra_tags or {})}
    if parent_run_id:
        tags["mlflow.parentRunId"] = parent_run_id
    return open_run(
        settings,
        job_id=job_id,
        experiment=settings.experiment_for(spec),
        run_name=spec.name,
        tags=tags,
        params={**spec.flat_params(), **(extra_params or {})},
        document=spec.model_dump(mode="json"),
    )


def _spec_tags(spec: PretrainSpec) -> dict[str, str]:
    """The spec's tags less the keys the service writes itself.

    Putting the service's tags last is not enough: some it sets only at times (a parent run
    id in a sweep, the stop mark, the step counts at training start), and a spec's tag of
    such a name would stand in for it meanwhile. Validation refuses these keys; this keeps
    a spec that skipped it from redirecting the run.
    """
    reserved = [k for k in spec.tags if is_reserved_tag(k)]
    if reserved:
        logger.warning("spec %s: dropped reserved tag keys %s", spec.name, sorted(reserved))
    return {k: v for k, v in spec.tags.items() if k not in reserved}


def end_run(ref: RunRef, status: str) -> None:
    """End the run as FINISHED, FAILED or KILLED (never left RUNNING).

    A run someone else already ended KILLED (a sweep whose scheduler stopped the trial, a
    cancel) is not turned FAILED: that failure is the stop's echo, e.g. a stopped trial's
    driver winding down after its sweep has marked it. The two run in different processes,
    so the check alone can race with the stop (checked, then stopped, then written FAILED);
    :func:`mark_stopped` tags the run before ending it, and a FAILED written after that
    tag is put back to KILLED here. Every interleaving thus ends KILLED.
    """
    RunStatus.from_string(status)  # rejects unknown names
    client = client_for(ref.tracking_uri)
    if status == "FAILED" and client.get_run(ref.run_id).info.status == "KILLED":
        logger.info("MLflow run %s was already ended KILLED: left so, not FAILED", ref.run_id)
        return
    client.set_terminated(ref.run_id, status=status)
    if status == "FAILED" and STOPPED_TAG in client.get_run(ref.run_id).data.tags:
        logger.info("MLflow run %s was stopped meanwhile: ended KILLED, not FAILED", ref.run_id)
        client.set_terminated(ref.run_id, status="KILLED")


@contextmanager
def run_ended_by_outcome(
    ref: RunRef, on_unfinished: Callable[[], None] | None = None
) -> Iterator[None]:
    """End the run as the block ends: FINISHED when it completes, KILLED when a cancel
    (:class:`~orchestrator.lifecycle.JobCancelled`, Ctrl-C, ``SystemExit``) leaves it,
    FAILED on any other error, which is re-raised like the cancel. ``on_unfinished`` runs
    first when the block did not complete (a sweep closes its trials' runs)."""
    from orchestrator.lifecycle import JobCancelled

    status = "FAILED"
    try:
        yield
        status = "FINISHED"
    except (JobCancelled, KeyboardInterrupt, SystemExit):
        status = "KILLED"
        raise
    finally:
        if status != "FINISHED" and on_unfinished is not None:
            on_unfinished()
        end_run(ref, status)


def mark_stopped(client: MlflowClient, run_id: str, reason: str) -> None:
    """End a run KILLED from outside its job (e.g. the trial a scheduler stopped); see
    :func:`end_run` for why the tag goes first."""
    client.set_tag(run_id, STOPPED_TAG, reason)
    client.set_terminated(run_id, status="KILLED")


def log_metrics(ref: RunRef, metrics: Mapping[str, float], step: int = 0) -> None:
    now = int(time.time() * 1000)
    batch = [Metric(k, float(v), now, step) for k, v in metrics.items()]
    client_for(ref.tracking_uri).log_batch(ref.run_id, metrics=batch)


def set_tags(ref: RunRef, tags: Mapping[str, str]) -> None:
    client_for(ref.tracking_uri).log_batch(
        ref.run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()]
    )


def log_file(ref: RunRef, path: str | Path, artifact_path: str | None = None) -> None:
    client_for(ref.tracking_uri).log_artifact(ref.run_id, str(path), artifact_path)


# ------------------------------------------------------------------------------ datasets


@dataclass(frozen=True)
class DataSplit:
    """One part (``"train"`` or ``"val"``) of the seeded, stratified train/validation split
    of a source that a job makes (``spark_core.data.split_train_val``)."""

    part: str
    val_fraction: float
    seed: int


def dataset_input(source: DataSource, context: str, split: DataSplit | None = None) -> DatasetInput:
    """An MLflow dataset input (name, digest, source, profile) for ``source`` used as
    ``context`` (``"training"``, ``"validation"``, ``"evaluation"``).

    The digest is cheap and changes with the data: for a folder, of its image files' sorted
    relative paths and sizes (listed, never read); for generated images, of the generator's
    settings; for a split, of those plus the split. The source is the folder (type
    ``local``) or ``synthetic://<style>?count=..`` (type ``synthetic``).
    """
    name, digest, source_type, uri, profile = _describe_source(source)
    if split is not None:
        name = f"{name}:{split.part}"
        text = f"{digest}|{split.part}|{split.val_fraction!r}|{split.seed}"
        digest = hashlib.sha256(text.encode()).hexdigest()[:16]
        profile = {**profile, "split": split.part, "val_fraction": split.val_fraction,
                   "split_seed": split.seed}  # fmt: skip
    dataset = Dataset(
        name=name,
        digest=digest,
        source_type=source_type,
        source=json.dumps({"uri": uri}),
        profile=json.dumps(profile),
    )
    return DatasetInput(dataset, tags=[InputTag(MLFLOW_DATASET_CONTEXT, context)])


def _describe_source(source: DataSource) -> tuple[str, str, str, str, dict[str, Any]]:
    """(name, digest, source type, uri, profile) of a data source."""
    if isinstance(source, SyntheticData):
        settings = source.model_dump(mode="json")
        text = json.dumps(settings, sort_keys=True)
        name = (
            f"synthetic-{source.style}-n{source.count}-s{source.size}-c{source.classes}-"
            f"seed{source.seed}"
        )
        query = "&".join(f"{k}={v}" for k, v in settings.items() if k not in ("kind", "style"))
        uri = f"synthetic://{source.style}?{query}"
        digest = hashlib.sha256(text.encode()).hexdigest()[:16]
        return name, digest, "synthetic", uri, {"source_images": source.count}
    root = Path(source.path)
    name = "/".join(root.parts[-2:])
    try:
        files = _image_files(root)
    except OSError as error:  # not visible from the driver: the workers will say more
        logger.warning("dataset %s: not listed (%s); its digest names the path only", root, error)
        return name, hashlib.sha256(str(root).encode()).hexdigest()[:16], "local", str(root), {}
    text = "\n".join(f"{path}\t{size}" for path, size in files)
    digest = hashlib.sha256(text.encode()).hexdigest()[:16]
    profile = {"source_images": len(files), "bytes": sum(size for _, size in files)}
    return name, digest, "local", str(root), profile


def _image_files(root: Path) -> list[tuple[str, int]]:
    """``(relative path, size)`` of the image files under ``root``, sorted: the files the
    image folder dataset reads (:func:`spark_core.data.scan_images`)."""
    from spark_core.data import scan_images

    if not root.is_dir():
        raise FileNotFoundError(f"no folder {root}")
    return [(p.relative_to(root).as_posix(), p.stat().st_size) for p in scan_images(root)]


def log_datasets(ref: RunRef, inputs: Sequence[DatasetInput]) -> None:
    """Log the run's dataset inputs (MLflow keeps one per dataset name and digest, so a job
    run again adds none unless its data changed)."""
    client_for(ref.tracking_uri).log_inputs(ref.run_id, datasets=list(inputs))


# -------------------------------------------------------------------------------- models


def log_model_once(
    ref: RunRef,
    build: Callable[[], Any],
    *,
    name: str,
    input_size: int,
    uri_tag: str,
    registered_model_name: str | None = None,
) -> str:
    """Log ``build()`` (a torch module taking ``(B, 3, input_size, input_size)`` images) as
    the run's MLflow model ``name``; returns its ``models:/<model id>`` URI.

    MLflow's ``pt2`` format: a ``torch.export`` program (loading it unpickles nothing),
    traced on a batch of 2 so that the batch dimension is dynamic, with the input signature
    and the versions of torch and timm. The model lands in the run's experiment (MLflow
    would otherwise use the process's active one, "Default"); with
    ``registered_model_name`` it also becomes a version of that registered model, whose
    source is the logged model. The URI is kept in the run's tag ``uri_tag``: a job run
    again after it finished logs no second model (nor version) and builds nothing.
    """
    logged = client_for(ref.tracking_uri).get_run(ref.run_id).data.tags.get(uri_tag)
    if logged:
        return logged
    import mlflow
    import timm
    import torch
    from mlflow.models import infer_signature

    model = build().eval()
    example = torch.zeros(2, 3, input_size, input_size)
    with torch.no_grad():
        output = model(example)
    signature = infer_signature(example.numpy(), output.numpy())
    with _fluent_target(ref):
        info = mlflow.pytorch.log_model(
            model,
            name=name,
            signature=signature,
            input_example=example.numpy(),
            run_id=ref.run_id,
            pip_requirements=[
                f"torch=={torch.__version__.split('+')[0]}",
                f"timm=={timm.__version__}",
            ],
            registered_model_name=registered_model_name,
        )
    set_tags(ref, {uri_tag: info.model_uri})
    return info.model_uri


MLFLOW_FLUENT_ENV = ("MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_ID")


@contextmanager
def fluent_state_kept() -> Iterator[None]:
    """Put MLflow's fluent tracking URI and experiment back as the block found them.

    MLflow keeps both in the process's environment (``MLFLOW_TRACKING_URI``,
    ``MLFLOW_EXPERIMENT_ID``) for its subprocesses to inherit: left set, they would send a
    later job or test of the same process, and every process it starts, to another store.
    """
    import mlflow

    saved = {key: os.environ.get(key) for key in MLFLOW_FLUENT_ENV}
    try:
        yield
    finally:
        mlflow.set_tracking_uri(saved["MLFLOW_TRACKING_URI"])
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


@contextmanager
def _fluent_target(ref: RunRef) -> Iterator[None]:
    """Point MLflow's fluent API at the run's store and experiment for the block (a logged
    model goes to the active experiment, else "Default"); see :func:`fluent_state_kept`."""
    import mlflow

    with fluent_state_kept():
        mlflow.set_tracking_uri(ref.tracking_uri)
        mlflow.set_experiment(experiment_id=ref.experiment_id)
        yield


class BackgroundMetricWriter:
    """Sends metric batches to one MLflow run from a daemon thread: :meth:`submit` returns at
    once, so a training step never waits on the tracking server.

    The thread sends what has queued up since its last request in one ``log_batch`` (at
    most 1000 metrics each), so a slow server gets fewer, larger requests rather than a
    growing backlog. A failed request is retried ``attempts`` times with growing pauses; a
    batch that still fails is dropped and logged at ERROR with its size (:attr:`dropped`
    counts them), never silently. The queue is bounded (``max_batches``): only a server
    that has fallen that far behind makes :meth:`submit` wait.
    """

    def __init__(
        self,
        client: MlflowClient,
        run_id: str,
        *,
        max_batches: int = 10_000,
        attempts: int = 2,  # on top of MLflow's own HTTP retries (MLFLOW_HTTP_REQUEST_MAX_RETRIES)
        retry_delay_s: float = 1.0,
    ) -> None:
        self.client = client
        self.run_id = run_id
        self.attempts = attempts
        self.retry_delay_s = retry_delay_s
        self.sent = 0
        self.dropped = 0
        self._submitted = 0
        self._queue: queue.Queue[list[Metric] | None] = queue.Queue(maxsize=max_batches)
        self._settled = threading.Condition()
        self._thread = threading.Thread(
            target=self._run, name=f"mlflow-metrics-{run_id[:8]}", daemon=True
        )
        self._thread.start()

    def submit(self, metrics: Sequence[Metric]) -> None:
        """Queue ``metrics`` for sending; returns at once unless the queue is full."""
        if not metrics:
            return
        with self._settled:
            self._submitted += len(metrics)
        try:
            self._queue.put_nowait(list(metrics))
        except queue.Full:
            logger.warning(
                "MLflow run %s: %d metric batches wait for the tracking server; the training "
                "step waits for room",
                self.run_id,
                self._queue.qsize(),
            )
            self._queue.put(list(metrics))

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until everything submitted so far was sent (or dropped after its retries);
        False when ``timeout`` seconds passed first."""
        with self._settled:
            target = self._submitted
            return self._settled.wait_for(lambda: self.sent + self.dropped >= target, timeout)

    def close(self, timeout: float | None = None) -> bool:
        """Flush, then stop the thread. What is still unsent after ``timeout`` is logged at
        ERROR (the thread keeps trying while the process lives). Returns whether all was
        delivered."""
        settled = self.flush(timeout)
        with self._settled:
            pending = self._submitted - self.sent - self.dropped
        if not settled:
            logger.error(
                "MLflow run %s: %d metrics not yet sent after %s s; the tracking server is "
                "unreachable or slow",
                self.run_id,
                pending,
                timeout,
            )
            return False
        self._queue.put(None)
        self._thread.join(timeout=10)
        if self.dropped:
            logger.error("MLflow run %s: %d metrics were dropped", self.run_id, self.dropped)
        return self.dropped == 0

    def _run(self) -> None:
        while True:
            batch, stop = self._take()
            for start in range(0, len(batch), _METRIC_BATCH_LIMIT):
                self._send(batch[start : start + _METRIC_BATCH_LIMIT])
            if stop:
                return

    def _take(self) -> tuple[list[Metric], bool]:
        """The next batch (waiting for one) joined with everything queued behind it; and
        whether the stop mark came."""
        item = self._queue.get()
        if item is None:
            return [], True
        batch = item
        while True:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                return batch, False
            if item is None:
                return batch, True
            batch.extend(item)

    def _send(self, metrics: list[Metric]) -> None:
        for attempt in range(1, self.attempts + 1):
            try:
                self.client.log_batch(self.run_id, metrics=metrics)
            except Exception as error:  # a transient server error must not stop training
                if attempt < self.attempts:
                    logger.warning(
                        "MLflow run %s: sending %d metrics failed (attempt %d of %d): %s",
                        self.run_id, len(metrics), attempt, self.attempts, error,
                    )  # fmt: skip
                    time.sleep(self.retry_delay_s * 2 ** (attempt - 1))
                    continue
                logger.error(
                    "MLflow run %s: dropped %d metrics (steps %d..%d) after %d attempts: %s",
                    self.run_id, len(metrics), min(m.step for m in metrics),
                    max(m.step for m in metrics), self.attempts, error,
                )  # fmt: skip
                self._settle(dropped=len(metrics))
                return
            self._settle(sent=len(metrics))
            return

    def _settle(self, *, sent: int = 0, dropped: int = 0) -> None:
        with self._settled:
            self.sent += sent
            self.dropped += dropped
            self._settled.notify_all()


class MetricsLogger:
    """An engine callback for rank 0: step and epoch metrics, and reconstruction pictures.

    Step metrics arrive in windows of ``log_every`` steps and are handed to a
    :class:`BackgroundMetricWriter` (the very first step at once, so that the run shows it
    as soon as it happened); the step loop never waits on the tracking server. At each
    epoch's end everything is flushed (waiting at most ``epoch_flush_timeout_s``); use the
    logger as a context manager, or call :meth:`close`, to deliver the rest.

    Names: ``train/loss``, ``train/lr``, ``train/weight_decay``, ``train/grad_norm``,
    ``train/images_per_sec``, ``train/epoch`` (fractional), ``train/step`` (step = global
    step); ``epoch/loss``, ``epoch/time_s``, ``epoch/images_per_sec`` (step = epoch).
    """

    def __init__(
        self,
        ref: RunRef,
        *,
        log_every: int,
        reconstruction: ReconstructionPreview | None = None,
        epoch_flush_timeout_s: float = 60.0,
        close_timeout_s: float = 120.0,
    ) -> None:
        self.client = client_for(ref.tracking_uri)
        self.run_id = ref.run_id
        self.log_every = log_every
        self.reconstruction = reconstruction
        self.epoch_flush_timeout_s = epoch_flush_timeout_s
        self.close_timeout_s = close_timeout_s
        self.writer = BackgroundMetricWriter(client_for(ref.tracking_uri), ref.run_id)
        self._pending: list[Metric] = []
        self._first_submitted = False
        self._behind = False  # an epoch's flush timed out: later epochs do not wait again

    def __enter__(self) -> MetricsLogger:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def on_step(self, m: Any) -> None:
        now = int(time.time() * 1000)
        values = {
            "train/loss": m.loss,
            "train/lr": m.lr,
            "train/weight_decay": m.weight_decay,
            "train/grad_norm": m.grad_norm,
            "train/images_per_sec": m.images_per_sec,
            "train/epoch": m.epoch + m.epoch_progress,
            "train/step": m.step + 1,
        }
        self._pending.extend(Metric(k, float(v), now, m.step) for k, v in values.items())
        window_full = len(self._pending) >= self.log_every * len(values)
        if window_full or not self._first_submitted or m.epoch_progress >= 1.0:
            self._submit()

    def _submit(self) -> None:
        if self._pending:
            self.writer.submit(self._pending)
            self._pending = []
            self._first_submitted = True

    def flush(self, timeout: float | None = None) -> bool:
        """Hand over the pending window and wait until all was sent (at most ``timeout``)."""
        self._submit()
        return self.writer.flush(timeout)

    def close(self) -> bool:
        """Deliver everything (waiting at most ``close_timeout_s``) and stop the thread."""
        self._submit()
        return self.writer.close(self.close_timeout_s)

    def on_epoch_end(self, engine: Any, m: Any) -> None:
        now = int(time.time() * 1000)
        values = {
            "epoch/loss": m.loss,
            "epoch/time_s": m.epoch_time,
            "epoch/images_per_sec": m.images_per_sec,
        }
        self._pending.extend(Metric(k, float(v), now, m.epoch) for k, v in values.items())
        # Once the server has fallen behind, waiting at every epoch would stall training
        # (and every rank with it) for the timeout each time: check, do not wait, until the
        # writer has caught up.
        timeout = 0.0 if self._behind else self.epoch_flush_timeout_s
        settled = self.flush(timeout)
        if not settled and not self._behind:
            logger.warning(
                "MLflow run %s: epoch %d's metrics are not all sent after %s s; training "
                "goes on without waiting for the tracking server until it has caught up",
                self.run_id,
                m.epoch,
                self.epoch_flush_timeout_s,
            )
        self._behind = not settled
        if self.reconstruction is not None and self.reconstruction.due(m.epoch):
            image = self.reconstruction.render(engine.model)
            self.client.log_image(self.run_id, image, key="reconstruction", step=m.epoch)


def system_metrics_interval() -> float:
    """Seconds between system-metric samples: ``$SPARKORCH_SYSTEM_METRICS_INTERVAL_S``, else
    10 (0 = none)."""
    value = os.environ.get(SYSTEM_METRICS_INTERVAL_ENV, "")
    try:
        return max(float(value), 0.0) if value.strip() else DEFAULT_SYSTEM_METRICS_INTERVAL_S
    except ValueError:
        logger.warning("%s=%r is not a number: using %s s", SYSTEM_METRICS_INTERVAL_ENV, value,
                       DEFAULT_SYSTEM_METRICS_INTERVAL_S)  # fmt: skip
        return DEFAULT_SYSTEM_METRICS_INTERVAL_S


@contextmanager
def system_metrics(ref: RunRef, interval_s: float | None = None) -> Iterator[Any]:
    """MLflow's system metrics (``system/cpu_utilization_percentage``,
    ``system/system_memory_usage_megabytes``, disk, network; ``system/gpu_0_utilization_percentage``
    and GPU memory when ``nvidia-ml-py`` is installed) for the run while the block runs, one
    point every ``interval_s`` seconds (default :func:`system_metrics_interval`).

    The monitor writes to ``ref.tracking_uri`` (never the process's global URI) and carries
    on the run's ``system/`` steps when it was restarted. On leaving, it stops and logs the
    samples of the last, partial interval too, so even a job shorter than one interval has a
    point; an error leaving the block is not masked.
    """
    from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

    interval = system_metrics_interval() if interval_s is None else interval_s
    if interval <= 0:
        yield None
        return
    monitor = SystemMetricsMonitor(
        ref.run_id, sampling_interval=interval, resume_logging=True, tracking_uri=ref.tracking_uri
    )
    monitor.start()
    try:
        yield monitor
    finally:
        _stop_monitor(monitor)


def _stop_monitor(monitor: Any, timeout_s: float = MONITOR_STOP_TIMEOUT_S) -> None:
    """Stop the monitor, then publish the samples it took since its last point.

    MLflow's ``finish`` joins the monitor's thread without a limit, and that thread may be
    inside a request to an unreachable server (minutes of HTTP retries): it is waited for at
    most ``timeout_s``, so a failing job is not held up by its bookkeeping."""
    stopper = threading.Thread(target=monitor.finish, name="system-metrics-stop", daemon=True)
    stopper.start()
    stopper.join(timeout_s)
    if stopper.is_alive():
        logger.warning("system metrics monitor still busy after %s s: left behind", timeout_s)
        return
    try:
        last = monitor.aggregate_metrics()
        if last:
            monitor.publish_metrics(last)
            monitor.mlflow_logger.flush()
    except Exception as error:  # bookkeeping at the end: never the job's failure
        logger.error("last system metrics not logged: %s", error)


class ReconstructionPreview:
    """Fixed images and masks, drawn as input | masked | reconstruction every N epochs."""

    def __init__(self, images: Any, every: int, seed: int) -> None:
        import torch

        self.images = images
        self.every = every
        self.generator_seed = seed
        self._torch = torch

    def due(self, epoch: int) -> bool:
        """Whether to draw after 0-based ``epoch`` (every ``every`` epochs, counting from 1)."""
        return self.every > 0 and (epoch + 1) % self.every == 0

    def render(self, model: Any) -> Any:
        from spark_core.viz import reconstruction_grid

        device = next(model.parameters()).device
        images = self.images.to(device)
        generator = self._torch.Generator(device=device).manual_seed(self.generator_seed)
        active = model.generate_mask(images.shape[0], generator=generator, device=device)
        inputs, masked, recon = model.reconstruct(images, active)
        return reconstruction_grid(inputs.cpu(), masked.cpu(), recon.cpu(), active=active.cpu())


def export_encoder_artifact(tracking_uri: str, run_id: str, out: Path) -> Path:
    """Copy the run's ``encoder/*.safetensors`` to ``out`` (a file, or an existing folder)."""
    import shutil

    from mlflow.exceptions import MlflowException

    client = client_for(tracking_uri)
    try:
        files = [a.path for a in client.list_artifacts(run_id, "encoder")]
    except MlflowException as error:
        raise ValueError(f"run {run_id!r}: {error.message}") from None
    weights = [f for f in files if f.endswith(".safetensors")]
    if not weights:
        raise FileNotFoundError(
            f"run {run_id!r} has no encoder weights (it did not finish, or is not a "
            "pre-training run)"
        )
    target = out / Path(weights[0]).name if out.is_dir() else out
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="sparkorch-export-") as folder:
        local = client.download_artifacts(run_id, weights[0], folder)
        shutil.move(local, target)
    return target


def find_children(ref: RunRef) -> list[Any]:
    """The runs nested under ``ref`` (a sweep's trials)."""
    client = client_for(ref.tracking_uri)
    return client.search_runs(
        [ref.experiment_id],
        filter_string=f"tags.mlflow.parentRunId = '{ref.run_id}'",
        max_results=5000,
    )
