"""Ablation sweeps: Ray Tune over Ray Train (the V2 pattern), one MLflow parent run per sweep.

Each Tune trial runs a small driver function that builds the trial's
:class:`~orchestrator.specs.PretrainSpec` (base + variant + searched values + seed) and runs
it with :func:`~orchestrator.pretrain.run_pretrain`: its own Ray Train trainer and its own
MLflow run, nested under the sweep's parent run. Rank 0's per-epoch reports reach Tune
through ``TuneReportCallback`` (so ASHA can stop a trial on its pre-training loss); the
trial's final metric is reported when it ends. The trial driver holds one unit of a custom
resource, never a CPU, so on a small cluster it cannot starve its own workers.

At the end the parent run gets the results table (one row per variant x searched values,
mean and std over seeds) as an MLflow table (``results/table.json``, the UI's table view),
CSV and Markdown, a plot, and the best trial's spec and encoder. Each trial's run carries
its searched values as params under their dotted spec paths (``spark.mask_ratio``: the same
names in every trial, for MLflow's compare view) and, in a sweep with variants, the variant
as ``sweep.variant``.
Running the same sweep job id again restores the Tuner: finished trials are not re-run.
"""

from __future__ import annotations

import csv
import io
import logging
import math
import statistics
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from orchestrator.cluster import TRIAL_DRIVER_RESOURCE, ray_session
from orchestrator.lifecycle import check_job_id, derived_job_id, new_job_id
from orchestrator.pretrain import fit_interruptibly, run_pretrain
from orchestrator.settings import OrchestratorSettings
from orchestrator.specs import (
    FINETUNE_METRIC,
    Distribution,
    PretrainSpec,
    SweepSpec,
    flatten,
    ship,
    unship,
)
from orchestrator.tracking import (
    RunRef,
    client_for,
    find_children,
    log_file,
    log_metrics,
    mark_stopped,
    open_run,
    run_ended_by_outcome,
)

logger = logging.getLogger(__name__)

VARIANT_KEY = "variant"
SEED_KEY = "seed"
TRIAL_TAG = "sparkorch.trial_id"
VARIANT_TAG = "sparkorch.variant"
VARIANT_PARAM = "sweep.variant"
TABLE_ARTIFACT = "results/table.json"


# ----------------------------------------------------------------------------- trials


def _tune_domain(distribution: Distribution) -> Any:
    from ray import tune

    kind = distribution.kind
    value = getattr(distribution, kind)
    if kind == "grid":
        return tune.grid_search(list(value))
    if kind == "choice":
        return tune.choice(list(value))
    if kind == "quniform":
        return tune.quniform(*value)
    return {"uniform": tune.uniform, "loguniform": tune.loguniform, "randint": tune.randint}[kind](
        *value
    )


def param_space(sweep: SweepSpec) -> dict[str, Any]:
    """Tune's search space: one key per searched path, plus variant and seed."""
    from ray import tune

    space: dict[str, Any] = {}
    if sweep.cross_variants or not sweep.variants:
        space.update({path: _tune_domain(d) for path, d in sweep.search.items()})
    if sweep.variants:
        space[VARIANT_KEY] = tune.grid_search(list(sweep.variants))
    space[SEED_KEY] = tune.grid_search(sweep.seeds) if len(sweep.seeds) > 1 else sweep.seeds[0]
    return space


def _epoch_reporter(metric: str) -> Any:
    """Forwards rank 0's per-epoch reports to Tune. The sweep's metric only exists once the
    trial has been evaluated, but a search algorithm (Optuna) reads it from every report:
    epoch reports carry it as NaN until then."""
    from ray.tune.integration.ray_train import TuneReportCallback

    class EpochReporter(TuneReportCallback):
        def after_report(self, run_context: Any, metrics: list[dict], checkpoint: Any) -> None:
            metrics = [{metric: math.nan, **m} for m in metrics]
            super().after_report(run_context, metrics, checkpoint)

    return EpochReporter()


def run_trial(config: dict[str, Any], context: dict[str, Any]) -> None:
    """One trial (runs inside Tune's trial actor): pre-train, evaluate, report."""
    from ray import tune

    settings = OrchestratorSettings(**context["settings"])
    sweep: SweepSpec = unship(context["spec"])
    roots = context["spec"]["data_roots"]
    params = {k: v for k, v in config.items() if k not in (VARIANT_KEY, SEED_KEY)}
    variant = config.get(VARIANT_KEY)
    spec = sweep.trial_spec(params, variant, int(config[SEED_KEY]), {"data_roots": roots})
    trial_id = tune.get_context().get_trial_id()
    result = run_pretrain(
        spec,
        job_id=derived_job_id(context["job_id"], trial_id),
        settings=settings,
        parent_run_id=context["parent_run_id"],
        extra_tags={TRIAL_TAG: trial_id, VARIANT_TAG: variant or ""},
        extra_params={VARIANT_PARAM: variant} if sweep.variants else None,
        trainer_callbacks=[_epoch_reporter(sweep.metric)],
    )
    final_loss = result.metrics.get("final/loss", math.nan)
    if sweep.finetune is not None:
        finetuned = _finetune_trial(sweep, spec, result, settings, roots)
        final_metrics = {FINETUNE_METRIC: finetuned.metrics["finetune_top1"]}
        final_metrics["finetune_run_id"] = finetuned.run_id
    else:
        final_metrics = {}
    final = {
        "loss": final_loss,  # the scheduler's metric must be in every report
        "final_loss": final_loss,
        "epoch": result.epochs,
        "trial_run_id": result.run_id,
        "trial_wall_time_s": result.wall_time_s,
        "trial_done": 1,
    }
    for key, value in result.metrics.items():
        if key.startswith("eval/"):
            final[key.removeprefix("eval/")] = value
    final.update(final_metrics)
    tune.report(final)


def _finetune_trial(
    sweep: SweepSpec,
    trial: PretrainSpec,
    pretrained: Any,
    settings: OrchestratorSettings,
    roots: list[str],
) -> Any:
    """Fine-tune the trial's encoder with the sweep's protocol section, in a run nested under
    the trial's; a trial without pre-training (``optim.epochs: 0``) fine-tunes from scratch."""
    from orchestrator.finetune import run_finetune

    assert sweep.finetune is not None
    weights = (
        {"kind": "mlflow_run", "run_id": pretrained.run_id}
        if trial.optim.epochs > 0
        else {"kind": "none"}
    )
    spec = sweep.finetune.trial_spec(trial, weights=weights, context={"data_roots": roots})
    result = run_finetune(
        spec,
        job_id=derived_job_id(pretrained.job_id, "ft"),
        settings=settings,
        parent_run_id=pretrained.run_id,
    )
    # On the trial's run too: the sweep's live table shows its trials' eval/ metrics.
    trial_ref = RunRef(pretrained.tracking_uri, pretrained.experiment_id, pretrained.run_id)
    log_metrics(trial_ref, {f"eval/{FINETUNE_METRIC}": result.metrics["finetune_top1"]})
    return result


# ------------------------------------------------------------------------------ table


@dataclass
class Row:
    variant: str
    params: dict[str, Any]
    values: list[float] = field(default_factory=list)
    epochs: list[int] = field(default_factory=list)
    wall_time_s: list[float] = field(default_factory=list)
    statuses: list[str] = field(default_factory=list)
    run_ids: list[str] = field(default_factory=list)

    @property
    def mean(self) -> float:
        finite = [v for v in self.values if math.isfinite(v)]
        return statistics.fmean(finite) if finite else math.nan

    @property
    def std(self) -> float:
        finite = [v for v in self.values if math.isfinite(v)]
        return statistics.stdev(finite) if len(finite) > 1 else 0.0

    @property
    def status(self) -> str:
        return "/".join(sorted(set(self.statuses)))


class SweepFailed(RuntimeError):
    """Every trial of the sweep failed: there is no result to compare."""


def check_some_trial_finished(rows: Sequence[Row]) -> None:
    """Raise :class:`SweepFailed` when no trial of any row ended FINISHED or STOPPED."""
    if rows and all(set(row.statuses) <= {"FAILED"} for row in rows):
        raise SweepFailed(
            f"all {sum(len(r.statuses) for r in rows)} trials failed; the table is logged, "
            "and each trial's error is in its MLflow run and the job's log"
        )


def _trial_status(result: Any) -> str:
    if result.error is not None:
        return "FAILED"
    if (result.metrics or {}).get("trial_done"):
        return "FINISHED"
    return "STOPPED"  # ended early by the scheduler


def build_rows(sweep: SweepSpec, results: Any) -> list[Row]:
    """Group trials by (variant, searched values); seeds become mean and std."""
    rows: dict[tuple, Row] = {}
    for result in results:
        config = result.config or {}
        params = {path: config.get(path) for path in sweep.search if path in config}
        variant = config.get(VARIANT_KEY) or ""
        key = (variant, tuple(sorted((k, repr(v)) for k, v in params.items())))
        row = rows.setdefault(key, Row(variant, params))
        metrics = result.metrics or {}
        row.values.append(float(metrics.get(sweep.metric, math.nan)))
        row.epochs.append(int(metrics.get("epoch", 0) or 0))
        row.wall_time_s.append(float(metrics.get("time_total_s", 0.0) or 0.0))
        row.statuses.append(_trial_status(result))
        if metrics.get("trial_run_id"):
            row.run_ids.append(str(metrics["trial_run_id"]))
    return sorted(rows.values(), key=lambda r: (r.variant, sorted(map(repr, r.params.items()))))


def table_columns(sweep: SweepSpec) -> list[str]:
    columns = ["variant"] if sweep.variants else []
    columns += list(sweep.search)
    return [
        *columns,
        sweep.metric,
        f"{sweep.metric}_std",
        "seeds",
        "epochs",
        "wall_time_s",
        "status",
    ]


def table_records(sweep: SweepSpec, rows: Sequence[Row]) -> list[dict[str, Any]]:
    records = []
    for row in rows:
        record: dict[str, Any] = {"variant": row.variant} if sweep.variants else {}
        record.update({path: row.params.get(path, "") for path in sweep.search})
        record.update(
            {
                sweep.metric: round(row.mean, 4),
                f"{sweep.metric}_std": round(row.std, 4),
                "seeds": len(row.values),
                "epochs": max(row.epochs, default=0),
                "wall_time_s": round(sum(row.wall_time_s), 1),
                "status": row.status,
            }
        )
        records.append(record)
    return records


def to_csv(columns: Sequence[str], records: Sequence[dict[str, Any]]) -> str:
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=list(columns), lineterminator="\n")
    writer.writeheader()
    writer.writerows(records)
    return out.getvalue()


def to_markdown(columns: Sequence[str], records: Sequence[dict[str, Any]]) -> str:
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(str(r.get(c, "")) for c in columns) + " |" for r in records]
    return "\n".join(lines) + "\n"


def plot_rows(sweep: SweepSpec, rows: Sequence[Row], path: Path) -> Path:
    """Metric against the first searched axis (mask ratio first when searched), one line per
    value of the second (decoder depth first), error bars = std over seeds; or a bar chart of
    the variants when nothing numeric is searched."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    axes = sorted(sweep.search, key=lambda p: (p != "spark.mask_ratio", p != "spark.decoder_depth"))
    figure, ax = plt.subplots(figsize=(6.4, 4.2), dpi=120)
    numeric = [
        p
        for p in axes
        if all(isinstance(r.params.get(p), int | float) for r in rows if p in r.params)
    ]
    if numeric:
        x_axis = numeric[0]
        series: dict[str, list[Row]] = {}
        for row in rows:
            label = ", ".join(
                [row.variant] * bool(row.variant)
                + [f"{p}={row.params[p]}" for p in axes if p != x_axis and p in row.params]
            )
            series.setdefault(label, []).append(row)
        for label, members in sorted(series.items()):
            members = sorted(members, key=lambda r: r.params.get(x_axis, 0))
            ax.errorbar(
                [r.params.get(x_axis) for r in members],
                [r.mean for r in members],
                yerr=[r.std for r in members],
                marker="o",
                capsize=3,
                label=label or sweep.metric,
            )
        ax.set_xlabel(x_axis)
        if len(series) > 1 or next(iter(series)):
            ax.legend(fontsize=8)
    else:
        labels = [
            ", ".join([r.variant] * bool(r.variant) + [f"{k}={v}" for k, v in r.params.items()])
            or "base"
            for r in rows
        ]
        ax.bar(range(len(rows)), [r.mean for r in rows], yerr=[r.std for r in rows], capsize=3)
        ax.set_xticks(range(len(rows)), labels, rotation=30, ha="right", fontsize=8)
    ax.set_ylabel(sweep.metric)
    ax.set_title(f"{sweep.name}: {sweep.metric} ({sweep.mode})")
    ax.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)
    return path


# ----------------------------------------------------------------------------- driver


@dataclass
class SweepResult:
    job_id: str
    run_id: str
    experiment_id: str
    tracking_uri: str
    status: str
    columns: list[str]
    records: list[dict[str, Any]]
    best: dict[str, Any] | None
    wall_time_s: float

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def _tuner(sweep: SweepSpec, job_id: str, ref: RunRef, settings: OrchestratorSettings):
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler

    context = {
        "spec": ship(sweep, settings.allowed_data_roots),
        "job_id": job_id,
        "parent_run_id": ref.run_id,
        "settings": settings.model_dump(mode="json"),
    }
    trainable = tune.with_resources(
        tune.with_parameters(run_trial, context=context), {TRIAL_DRIVER_RESOURCE: 1}
    )
    path = f"{settings.storage_path.rstrip('/')}/{job_id}"
    if tune.Tuner.can_restore(path):
        logger.info("sweep %s ran before: restoring its trials from %s", job_id, path)
        return tune.Tuner.restore(path, trainable=trainable, resume_errored=True)
    scheduler = None
    if sweep.scheduler.kind == "asha":
        scheduler = ASHAScheduler(
            time_attr="epoch",
            metric="loss",
            mode="min",
            # Past the last epoch: at max_t ASHA stops every trial, which would cut off the
            # trial's evaluation and final report.
            max_t=sweep.base.optim.epochs + 1,
            grace_period=sweep.scheduler.grace_period,
            reduction_factor=sweep.scheduler.reduction_factor,
        )
    search_alg = None
    if sweep.algorithm == "optuna":
        from ray.tune.search.optuna import OptunaSearch

        search_alg = OptunaSearch(metric=sweep.metric, mode=sweep.mode, seed=sweep.seeds[0])
    return tune.Tuner(
        trainable,
        param_space=param_space(sweep),
        tune_config=tune.TuneConfig(
            num_samples=sweep.num_samples,
            max_concurrent_trials=sweep.max_concurrent_trials or None,
            scheduler=scheduler,
            search_alg=search_alg,
        ),
        run_config=tune.RunConfig(
            name=job_id,
            storage_path=settings.storage_path,
            failure_config=tune.FailureConfig(max_failures=sweep.max_failures_per_trial),
            verbose=0,
        ),
    )


def _close_orphan_children(ref: RunRef) -> None:
    """Trials stopped by the scheduler (or lost) never ended their own runs: end them."""
    client = client_for(ref.tracking_uri)
    for child in find_children(ref):
        # A trial's fine-tune run is nested under the trial's run.
        nested = find_children(RunRef(ref.tracking_uri, ref.experiment_id, child.info.run_id))
        for run in (child, *nested):
            if run.info.status in ("RUNNING", "SCHEDULED"):
                mark_stopped(client, run.info.run_id, "sweep ended")


def _mark_stopped_trials(ref: RunRef, results: Any) -> None:
    """A trial the scheduler stopped was interrupted mid-run (its run may read FAILED or
    RUNNING): it was stopped on purpose, so its run ends KILLED."""
    stopped = {
        (r.metrics or {}).get("trial_id")
        for r in results
        if _trial_status(r) == "STOPPED" and (r.metrics or {}).get("trial_id")
    }
    if not stopped:
        return
    client = client_for(ref.tracking_uri)
    for child in find_children(ref):
        if child.data.tags.get(TRIAL_TAG) in stopped:
            mark_stopped(client, child.info.run_id, "scheduler")


def _best(sweep: SweepSpec, rows: Sequence[Row]) -> Row | None:
    scored = [r for r in rows if math.isfinite(r.mean) and r.run_ids]
    if not scored:
        return None
    return (max if sweep.mode == "max" else min)(scored, key=lambda r: r.mean)


def _log_table(sweep: SweepSpec, ref: RunRef, rows: Sequence[Row]) -> tuple[list, list]:
    columns = table_columns(sweep)
    records = table_records(sweep, rows)
    client = client_for(ref.tracking_uri)
    client.log_text(ref.run_id, to_csv(columns, records), "results/table.csv")
    client.log_text(ref.run_id, to_markdown(columns, records), "results/table.md")
    log_results_table(client, ref.run_id, columns, records)
    with tempfile.TemporaryDirectory(prefix="sparkorch-sweep-") as folder:
        if rows:
            log_file(ref, plot_rows(sweep, rows, Path(folder) / "metric.png"), "results")
    return columns, records


def log_results_table(
    client: Any, run_id: str, columns: Sequence[str], records: Sequence[dict[str, Any]]
) -> None:
    """The table as an MLflow table (``MlflowClient.log_table``: ``results/table.json`` in
    pandas' "split" layout, listed in the run's ``mlflow.loggedArtifacts`` tag so that the UI
    shows it as a table). ``log_table`` appends to a file that exists, so a sweep run again
    rewrites the file in the same layout instead of doubling its rows. Column names are
    :func:`table_column`'s."""
    rows = [[_json_value(r.get(c)) for c in columns] for r in records]
    names = [table_column(c) for c in columns]
    folder = TABLE_ARTIFACT.rsplit("/", 1)[0]
    if TABLE_ARTIFACT in {a.path for a in client.list_artifacts(run_id, folder)}:
        client.log_dict(run_id, {"columns": names, "data": rows}, TABLE_ARTIFACT)
    else:
        table = {name: [row[i] for row in rows] for i, name in enumerate(names)}
        client.log_table(run_id, table, TABLE_ARTIFACT)


def table_column(column: str) -> str:
    """A column's name in the MLflow table: a spec path with ``/`` for ``.``
    (``spark/mask_ratio``), since the UI's table view reads a dotted name as a path into
    nested objects and shows its cells empty."""
    return column.replace(".", "/")


def _json_value(value: Any) -> Any:
    """A table cell as JSON has it: a NaN or infinite mean (no finished seed) is null."""
    return None if isinstance(value, float) and not math.isfinite(value) else value


def _log_best(sweep: SweepSpec, ref: RunRef, best: Row) -> dict[str, Any]:
    client = client_for(ref.tracking_uri)
    run_id = best.run_ids[0]
    with tempfile.TemporaryDirectory(prefix="sparkorch-best-") as folder:
        for artifact in ("spec", "encoder"):
            local = client.download_artifacts(run_id, artifact, folder)
            for item in sorted(Path(local).iterdir()):
                log_file(ref, item, f"best/{artifact}")
    log_metrics(ref, {f"best/{sweep.metric}": best.mean})
    client.set_tag(ref.run_id, "sparkorch.best_run_id", run_id)
    return {
        "variant": best.variant,
        "params": best.params,
        sweep.metric: best.mean,
        "run_id": run_id,
    }


def run_sweep(
    sweep: SweepSpec,
    *,
    job_id: str | None = None,
    settings: OrchestratorSettings | None = None,
    on_run_open: Any = None,
    startup: Any = None,
) -> SweepResult:
    """Run (or resume) a sweep to the end; the parent run ends FINISHED, FAILED or KILLED.

    ``startup`` (the driver's clock) is not used: a sweep has no step of its own, and its
    trials start whenever Tune schedules them."""
    settings = settings or OrchestratorSettings()
    job_id = check_job_id(job_id or new_job_id())
    ref, _ = open_run(
        settings,
        job_id=job_id,
        experiment=settings.experiment_for(sweep.base),
        run_name=sweep.name,
        tags={**sweep.tags, "sparkorch.kind": "sweep", "sparkorch.metric": sweep.metric},
        params=flatten(sweep.model_dump(mode="json", exclude={"tags", "base"})),
        document=sweep.model_dump(mode="json"),
        document_name="sweep",
    )
    if on_run_open is not None:
        on_run_open(job_id, ref)
    start = time.perf_counter()
    with run_ended_by_outcome(ref, on_unfinished=lambda: _close_orphan_children(ref)):
        with ray_session(settings):
            results = fit_interruptibly(_tuner(sweep, job_id, ref, settings))
        _close_orphan_children(ref)
        _mark_stopped_trials(ref, results)
        rows = build_rows(sweep, results)
        columns, records = _log_table(sweep, ref, rows)
        check_some_trial_finished(rows)
        best_row = _best(sweep, rows)
        best = _log_best(sweep, ref, best_row) if best_row is not None else None
        return SweepResult(
            job_id,
            ref.run_id,
            ref.experiment_id,
            ref.tracking_uri,
            "FINISHED",
            columns,
            records,
            best,
            time.perf_counter() - start,
        )
