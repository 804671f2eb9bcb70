"""Shared fixtures: small models, seeded images, a real local Ray cluster."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

# Small backbones and a narrow decoder keep every test a few hundred milliseconds.
SMALL_BACKBONES = ("resnet18", "convnext_atto")
TEST_SIZE = 64
TEST_DECODER_WIDTH = 128


# The smallest pre-training spec the API accepts (one epoch, no evaluation): what the API
# tests submit when the job's content does not matter.
TINY_SPEC: dict[str, Any] = {
    "name": "tiny",
    "model": {"backbone": "resnet18", "input_size": 64},
    "spark": {"decoder_width": 64},
    "data": {"train": {"kind": "synthetic", "count": 32, "size": 64, "classes": 2}},
    "optim": {"global_batch_size": 16, "epochs": 1, "warmup_epochs": 0},
    "resources": {"num_workers": 1},
    "evaluation": {"method": "none"},
}


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.fixture(autouse=True)
def _mlflow_fluent_state_per_test() -> Iterator[None]:
    """A test that points MLflow's fluent API somewhere (to load a model) leaves it, and the
    environment every later test and subprocess inherits, as it found them."""
    from orchestrator.tracking import fluent_state_kept

    with fluent_state_kept():
        yield


@pytest.fixture(params=SMALL_BACKBONES)
def backbone(request: pytest.FixtureRequest) -> str:
    return request.param


def perturb_norms_and_biases_(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Add noise to every 1-D parameter (biases, norm affines, layer scales), in place.

    A fresh timm ConvNeXt has all of them at 0 (layer scales at 1e-6), so a layer that
    forgets to re-mask its output still writes exact zeros at masked positions; sparse
    correctness is only tested once they are not trivial.
    """
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            if param.ndim == 1:
                param.add_(0.1 * torch.randn(param.shape, generator=g))
    return model


def make_images(batch: int = 4, size: int = TEST_SIZE, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 3, size, size, generator=g)


@pytest.fixture(scope="module")
def single_thread() -> Iterator[None]:
    """Tiny tensors gain nothing from intra-op threads, and OpenMP's spinning makes them
    orders of magnitude slower when other processes hold the cores; restored afterwards."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def dataset_files(root: Path) -> dict[str, bytes]:
    """Every PNG under ``root`` by relative path, with its bytes."""
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*.png"))}


def ridge_accuracy(features: np.ndarray, labels: np.ndarray, num_classes: int) -> float:
    """Held-out accuracy of a one-vs-rest ridge classifier (train on even, test on odd)."""
    train = np.arange(len(labels)) % 2 == 0
    mu, sd = features[train].mean(0), features[train].std(0) + 1e-6
    design = np.c_[(features - mu) / sd, np.ones(len(features))]
    onehot = np.eye(num_classes)[labels]
    gram = design[train].T @ design[train] + np.eye(design.shape[1])
    weights = np.linalg.solve(gram, design[train].T @ onehot[train])
    return float(((design[~train] @ weights).argmax(1) == labels[~train]).mean())


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass(frozen=True)
class RayTestCluster:
    """A real local Ray cluster (token auth on) and the settings that point at it."""

    cluster: Any
    settings: Any
    token_path: Path
    dashboard_url: str

    @property
    def address(self) -> str:
        return self.cluster.address

    def env(self) -> dict[str, str]:
        """Environment for a subprocess that joins this cluster as another driver."""
        import os

        return {
            **os.environ,
            "RAY_ADDRESS": self.address,
            "RAY_AUTH_MODE": "token",
            "RAY_AUTH_TOKEN_PATH": str(self.token_path),
            "SPARKORCH_HOME": str(self.settings.home),
            "SPARKORCH_DATA_ROOTS": json.dumps([str(p) for p in self.settings.allowed_data_roots]),
        }


def actor_count(class_name: str) -> int:
    """How many actors of ``class_name`` the cluster has seen."""
    from ray.util.state import list_actors

    filters = [("class_name", "=", class_name)]
    return len(list_actors(filters=filters, limit=10_000, raise_on_missing_output=False))


def checkpoint_registered(cluster: RayTestCluster, job_id: str) -> bool:
    """Ray Train's controller has recorded at least one checkpoint of the job (the snapshot
    it restores from), not merely a worker having written one."""
    snapshot = Path(cluster.settings.storage_path) / job_id / "checkpoint_manager_snapshot.json"
    try:
        return "epoch-0" in snapshot.read_text()
    except OSError:
        return False


@pytest.fixture(scope="session")
def ray_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RayTestCluster]:
    """One Ray head for the whole session, on free ports (6379 is Redis's here).

    4 logical CPUs on this 2-core machine: 2 training workers plus an evaluation task.
    The dashboard is on: Ray Train's clean-up actor and the state API need it.
    """
    import ray
    from ray.cluster_utils import Cluster

    from orchestrator.cluster import TRIAL_DRIVER_RESOURCE, TRIAL_DRIVER_SLOTS, configure_ray_auth
    from orchestrator.settings import OrchestratorSettings

    home = tmp_path_factory.mktemp("sparkorch-home")
    (home / "data").mkdir()
    settings = OrchestratorSettings(home=home, ray_address=None)
    token = configure_ray_auth(settings)
    dashboard_port = free_port()
    cluster = Cluster(
        initialize_head=True,
        connect=True,
        head_node_args={
            "num_cpus": 4,
            "resources": {TRIAL_DRIVER_RESOURCE: TRIAL_DRIVER_SLOTS},
            "gcs_server_port": free_port(),
            "include_dashboard": True,
            "dashboard_host": "127.0.0.1",
            "dashboard_port": dashboard_port,
            # Not Ray's default 52365: another Ray on this machine (the rehearsal's) would
            # otherwise find its agent port taken.
            "dashboard_agent_listen_port": free_port(),
            "object_store_memory": 256 * 1024 * 1024,
        },
    )
    dashboard_url = f"http://127.0.0.1:{dashboard_port}"
    settings = OrchestratorSettings(
        home=home, ray_address=cluster.address, ray_dashboard_url=dashboard_url
    )
    try:
        yield RayTestCluster(cluster, settings, token, dashboard_url)
    finally:
        ray.shutdown()
        cluster.shutdown()


POSTGRES_ADMIN_URL = "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"


@pytest.fixture
def postgres_url() -> Iterator[str]:
    """A fresh PostgreSQL database (127.0.0.1:5432) for one test, dropped afterwards."""
    import uuid

    import sqlalchemy as sa

    name = f"sparkorch_test_{uuid.uuid4().hex[:12]}"
    admin = sa.create_engine(POSTGRES_ADMIN_URL, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(sa.text(f'CREATE DATABASE "{name}"'))
    try:
        yield f"postgresql+psycopg://postgres@127.0.0.1:5432/{name}"
    finally:
        with admin.connect() as conn:
            conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


@pytest.fixture(params=["sqlite", "postgresql"])
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """The job store on both backends the service supports."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'jobs.db'}"
    return request.getfixturevalue("postgres_url")


class ApiServer:
    """The real REST app served by uvicorn on a free loopback port, in a thread."""

    def __init__(self, settings: Any, *, reconcile: bool = True) -> None:
        import uvicorn

        from api.app import create_app

        self.settings = settings
        self.app = create_app(settings, reconcile=reconcile)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        config = uvicorn.Config(
            self.app, host="127.0.0.1", port=self.port, log_level="warning", lifespan="on"
        )
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> ApiServer:
        import time

        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            assert time.monotonic() < deadline, "the API did not start"
            assert self.thread.is_alive(), "the API thread died while starting"
            time.sleep(0.05)
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)

    def client(self, token: str | None) -> Any:
        import httpx

        headers = {"Authorization": f"Bearer {token}"} if token else {}
        return httpx.Client(base_url=self.url, headers=headers, timeout=30)
