"""spark_core's LAMB computes what timm's Lamb (the reference's optimizer) computes."""

from __future__ import annotations

import pytest
import torch
from timm.optim import Lamb as TimmLamb
from torch import nn

from spark_core.optim import Lamb


def _net() -> nn.Module:
    torch.manual_seed(0)
    # No BN right after a biased conv: that bias would get a zero gradient, and Adam-style
    # updates of pure rounding noise are not comparable between implementations.
    return nn.Sequential(
        nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Flatten(), nn.LayerNorm(8 * 36), nn.Linear(8 * 36, 5)
    )


def _groups(net: nn.Module) -> list[dict]:
    decay = [p for p in net.parameters() if p.ndim > 1]
    no_decay = [p for p in net.parameters() if p.ndim <= 1]
    return [{"params": decay, "weight_decay": 0.05}, {"params": no_decay, "weight_decay": 0.0}]


def _run(optimizer_cls, steps: int = 5, **kwargs) -> list[torch.Tensor]:
    net = _net()
    optimizer = optimizer_cls(_groups(net), lr=1e-2, betas=(0.9, 0.95), **kwargs)
    g = torch.Generator().manual_seed(1)
    for step in range(steps):
        for group in optimizer.param_groups:  # per-iteration schedules, as in the engine
            group["lr"] = 1e-2 * (step + 1) / steps
            if group["weight_decay"]:
                group["weight_decay"] = 0.05 + 0.01 * step
        x = torch.randn(4, 3, 8, 8, generator=g)
        net(x).square().mean().backward()
        optimizer.step()
        optimizer.zero_grad()
    return [p.detach().clone() for p in net.parameters()]


def test_eager_update_matches_timm() -> None:
    ours = _run(Lamb)
    theirs = _run(TimmLamb, max_grad_norm=None, foreach=False)
    for a, b in zip(ours, theirs, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_state_dict_round_trip_continues_identically() -> None:
    net = _net()
    optimizer = Lamb(_groups(net), lr=1e-2)
    net(torch.randn(2, 3, 8, 8)).sum().backward()
    optimizer.step()
    state = optimizer.state_dict()
    clone = Lamb(_groups(_net()), lr=1e-2)
    clone.load_state_dict(state)
    assert clone.param_groups[0]["adapt"] is True and clone.param_groups[1]["adapt"] is False
    first = next(iter(clone.state.values()))
    assert float(first["step"]) == 1.0


@pytest.mark.slow
def test_compiled_update_matches_eager() -> None:
    eager = _run(Lamb)
    compiled = _run(Lamb, compile=True)
    for a, b in zip(eager, compiled, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_bad_hyper_parameters_are_rejected() -> None:
    with pytest.raises(ValueError, match="betas"):
        Lamb(_net().parameters(), betas=(0.9, 1.0))
    with pytest.raises(ValueError, match="lr"):
        Lamb(_net().parameters(), lr=-1.0)
