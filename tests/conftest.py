"""Shared fixtures: small models, seeded images."""

from __future__ import annotations

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
