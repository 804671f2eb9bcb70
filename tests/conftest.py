"""Shared fixtures: small models, seeded images."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

# Small backbones and a narrow decoder keep every test a few hundred milliseconds.
SMALL_BACKBONES = ("resnet18", "convnext_atto")
TEST_SIZE = 64
TEST_DECODER_WIDTH = 128


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.fixture(params=SMALL_BACKBONES)
def backbone(request: pytest.FixtureRequest) -> str:
    return request.param


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
