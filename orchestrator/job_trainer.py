"""The trainer a job's driver builds: Ray Train's ``DataParallelTrainer``, less what these jobs
do not use.

On a 2-core VM each helper actor's process costs 1.5-3 s of CPU just when the workers import
their code, delaying the first step:

* Ray Train starts a dataset manager actor for every run, to hand out shards of Ray Data
  datasets. These jobs read their images themselves (a PyTorch ``DataLoader`` per worker).
* It also starts a detached placement-group cleaner, which removes the run's placement group
  should the controller die while the job goes on. A trainer built in a job's driver needs
  none: the controller's death fails ``fit``, the driver ends, and Ray removes the job's
  placement groups with the job. A sweep's trials build theirs in Tune's trial actors, whose
  job outlives them: they keep it.

Only the driver imports this module: the controller and the workers never see the class
(they get its callbacks and its backend, :class:`orchestrator.torch_backend.TorchProcessGroup`).
"""

from __future__ import annotations

from typing import Any

import ray
from ray.train.v2._internal.callbacks.datasets import DatasetsCallback
from ray.train.v2._internal.callbacks.placement_group_callback import (
    PlacementGroupCleanerCallback,
)
from ray.train.v2.api.data_parallel_trainer import DataParallelTrainer


def built_in_driver() -> bool:
    """Whether this process is a job's driver (not an actor, such as a Tune trial)."""
    return ray.get_runtime_context().get_actor_id() is None


class JobTrainer(DataParallelTrainer):
    """``DataParallelTrainer`` without the dataset manager when the run has no Ray Data
    datasets, and without the placement-group cleaner when built in a job's driver (tests
    check that a job's run starts neither, and that a sweep's trials keep the cleaner)."""

    def _create_default_callbacks(self) -> list[Any]:
        callbacks = super()._create_default_callbacks()
        unused: list[type] = []
        if not self.datasets:
            unused.append(DatasetsCallback)
        if built_in_driver():
            unused.append(PlacementGroupCleanerCallback)
        return [c for c in callbacks if not isinstance(c, tuple(unused))]
