"""Ray Train's PyTorch process group, set up without importing PyTorch outside the workers.

``ray.train.torch.TorchTrainer`` is Ray Train's ``DataParallelTrainer`` with a ``TorchConfig``,
and ``TorchConfig``'s module imports PyTorch. So the job's driver imports PyTorch to build
the trainer, and Ray Train's controller imports it again to unpickle the config, both
before the first worker process exists: on a 2-core VM, 2.7 s each on the path from
submission to the first step, for a library neither process uses. :class:`TorchProcessGroup`
does what ``TorchConfig`` does for this service's jobs, with every use of PyTorch in the
functions below, which run on the workers:

* the process group over ``env://``, on the address and a free port of rank 0's node:
  ``gloo`` without GPUs, ``nccl`` with them (then ``TORCH_NCCL_ASYNC_ERROR_HANDLING=1``
  unless the blocking-wait mode is set, so that a hung collective fails the run);
* the ranks' environment (``RANK``, ``LOCAL_RANK``, ``WORLD_SIZE``, ``LOCAL_WORLD_SIZE``,
  ``NODE_RANK``) before the group starts, as ``torchrun`` sets it;
* every worker on a node sees the GPUs Ray gave the run there (``share_cuda_visible_devices``,
  so NCCL can use peer-to-peer copies), and trains on its own (``torch.cuda.set_device``);
* the group is destroyed when the worker group stops.

Only ``ray`` and this module load in the controller; a test keeps PyTorch out of both.
The trainer that carries it is :class:`orchestrator.job_trainer.JobTrainer`.
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import ray
from ray.exceptions import GetTimeoutError
from ray.train.backend import Backend, BackendConfig

logger = logging.getLogger(__name__)

NCCL_ASYNC_ERROR_HANDLING = "TORCH_NCCL_ASYNC_ERROR_HANDLING"
NCCL_BLOCKING_WAIT = "TORCH_NCCL_BLOCKING_WAIT"
# How long a stopping worker group may take to destroy its process group (Ray's own bound).
SHUTDOWN_TIMEOUT_S = 30.0


@dataclass
class TorchProcessGroup(BackendConfig):
    """The ``backend_config`` of a data-parallel PyTorch job (see the module docstring).

    Args:
        backend: ``gloo`` or ``nccl``; :meth:`for_devices` picks it.
        timeout_s: seconds a collective may wait before the run fails.
    """

    backend: str = "gloo"
    timeout_s: int = 1800

    @classmethod
    def for_devices(cls, use_gpu: bool) -> TorchProcessGroup:
        return cls(backend="nccl" if use_gpu else "gloo")

    @property
    def backend_cls(self) -> type[Backend]:
        return _TorchProcessGroupBackend

    @property
    def train_func_context(self) -> Any:
        return on_own_cuda_device

    def to_dict(self) -> dict[str, Any]:
        return {"backend": self.backend, "timeout_s": self.timeout_s}


class _TorchProcessGroupBackend(Backend):
    """Runs in Ray Train's controller: hands all the work to the workers."""

    share_cuda_visible_devices = True

    def on_start(self, worker_group: Any, backend_config: TorchProcessGroup) -> None:
        address, port = worker_group.execute_single(0, node_address_and_free_port)
        world_size = len(worker_group)
        ray.get(
            [
                worker_group.execute_single_async(
                    rank,
                    join_process_group,
                    address=address,
                    port=port,
                    world_rank=rank,
                    world_size=world_size,
                    backend=backend_config.backend,
                    timeout_s=backend_config.timeout_s,
                )
                for rank in range(world_size)
            ]
        )

    def on_shutdown(self, worker_group: Any, backend_config: TorchProcessGroup) -> None:
        futures = worker_group.execute_async(leave_process_group, destroy=len(worker_group) > 1)
        try:
            ray.get(futures, timeout=SHUTDOWN_TIMEOUT_S)
        except GetTimeoutError:
            logger.warning(
                "the workers did not destroy their process group within %.0f s",
                SHUTDOWN_TIMEOUT_S,
            )


def node_address_and_free_port() -> tuple[str, int]:
    """This node's address and a port free on it now (for rank 0's rendezvous)."""
    address = ray.util.get_node_ip_address()
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.bind(("", 0))
        return address, int(probe.getsockname()[1])


def rank_environment(address: str, port: int) -> dict[str, str]:
    """The ``torchrun`` variables of this worker (read from Ray Train's context)."""
    context = ray.train.get_context()
    return {
        "MASTER_ADDR": address,
        "MASTER_PORT": str(port),
        "RANK": str(context.get_world_rank()),
        "LOCAL_RANK": str(context.get_local_rank()),
        "WORLD_SIZE": str(context.get_world_size()),
        "LOCAL_WORLD_SIZE": str(context.get_local_world_size()),
        "NODE_RANK": str(context.get_node_rank()),
    }


def join_process_group(
    *,
    address: str,
    port: int,
    world_rank: int,
    world_size: int,
    backend: str,
    timeout_s: float,
) -> None:
    """Worker side of :meth:`_TorchProcessGroupBackend.on_start`."""
    import torch.distributed as dist

    os.environ.update(rank_environment(address, port))
    if backend == "nccl" and NCCL_BLOCKING_WAIT not in os.environ:
        os.environ.setdefault(NCCL_ASYNC_ERROR_HANDLING, "1")
    dist.init_process_group(
        backend=backend,
        init_method="env://",
        rank=world_rank,
        world_size=world_size,
        timeout=dt.timedelta(seconds=timeout_s),
    )


def leave_process_group(destroy: bool) -> None:
    """Worker side of :meth:`_TorchProcessGroupBackend.on_shutdown` (a single worker keeps
    its group, as Ray's own backend does)."""
    import torch
    import torch.distributed as dist

    if destroy and dist.is_initialized():
        dist.destroy_process_group()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


@contextmanager
def on_own_cuda_device() -> Iterator[None]:
    """Around the training function: a worker with a GPU makes it the current device."""
    import torch

    if torch.cuda.is_available():
        import ray.train.torch

        device = ray.train.torch.get_device()
        if device.type == "cuda":
            torch.cuda.set_device(device)
    yield
