"""Downstream evaluation of a job's final encoder, run as a Ray task with the job's resources."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from orchestrator.datasets import evaluation_loaders
from orchestrator.specs import PretrainSpec, ship, unship
from spark_core import SparK, build_spark
from spark_core.checkpoint import CHECKPOINT_FILE, build_spark_from_checkpoint
from spark_core.evaluate import evaluate_encoder


def final_model(spec: PretrainSpec, checkpoint: Any | None) -> SparK:
    """The model of a Ray Train checkpoint, or the seeded initial model when there is none
    (``optim.epochs: 0``: the random-initialisation baseline)."""
    if checkpoint is None:
        torch.manual_seed(spec.seed)
        return build_spark(**spec.build_kwargs())
    with checkpoint.as_directory() as folder:
        model, _ = build_spark_from_checkpoint(Path(folder) / CHECKPOINT_FILE)
    return model


def evaluate_final(shipped: dict[str, Any], cache: str, checkpoint: Any | None) -> dict[str, float]:
    """``{"<method>_top1": percent}`` for the spec's evaluation method (empty for none)."""
    spec: PretrainSpec = unship(shipped)
    if spec.evaluation.method == "none":
        return {}
    device = torch.device("cuda" if spec.derived().use_gpu and torch.cuda.is_available() else "cpu")
    torch.set_num_threads(max(int(spec.resources.cpus_per_worker), 1))
    model = final_model(spec, checkpoint).to(device)
    train_loader, val_loader = evaluation_loaders(spec, Path(cache))
    return evaluate_encoder(
        model,
        train_loader,
        val_loader,
        methods=(spec.evaluation.method,),
        device=device,
        seed=spec.seed,
    )


def run_evaluation(
    spec: PretrainSpec, data_roots: list[str], cache: str, checkpoint: Any | None
) -> dict[str, float]:
    """Evaluate on the cluster, reserving what one training worker reserves."""
    import ray

    task = ray.remote(evaluate_final).options(
        num_cpus=spec.resources.cpus_per_worker,
        num_gpus=spec.resources.gpus_per_worker,
        max_retries=1,
        # Inside a sweep trial the caller holds a placement group with only the driver's
        # custom resource; the evaluation must be scheduled outside it.
        scheduling_strategy="DEFAULT",
    )
    return ray.get(task.remote(ship(spec, data_roots), cache, checkpoint))
