"""The trainer a job's driver builds: Ray Train's ``DataParallelTrainer``, less what these jobs
do not use.

Ray Train starts a dataset manager actor for every run, to hand out shards of Ray Data
datasets. These jobs read their images themselves (a PyTorch ``DataLoader`` per worker), and
the actor's process cost 3 s of CPU on a 2-core VM just when the workers import their code,
delaying the first step. Only the driver imports this module: the controller and the
workers never see the class (they get its callbacks and its backend,
:class:`orchestrator.torch_backend.TorchProcessGroup`).
"""

from __future__ import annotations

from typing import Any

from ray.train.v2._internal.callbacks.datasets import DatasetsCallback
from ray.train.v2.api.data_parallel_trainer import DataParallelTrainer


class JobTrainer(DataParallelTrainer):
    """``DataParallelTrainer`` without the dataset manager when the run has no Ray Data
    datasets (a test checks that a job's run starts none)."""

    def _create_default_callbacks(self) -> list[Any]:
        callbacks = super()._create_default_callbacks()
        if self.datasets:
            return callbacks
        return [c for c in callbacks if not isinstance(c, DatasetsCallback)]
