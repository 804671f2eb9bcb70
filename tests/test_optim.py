"""spark_core's LAMB computes what timm's Lamb (the reference's optimizer) computes."""

from __future__ import annotations

import pytest
import torch
from timm.optim import Lamb as TimmLamb
from torch import nn

from spark_core.optim import Lamb, clip_factor


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


def _run(
    optimizer_cls, steps: int = 5, clip_in_step: float | None = None, **kwargs
) -> list[torch.Tensor]:
    """Parameters after ``steps`` steps; ``clip_in_step`` clips through ``grad_scale``."""
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
        if clip_in_step is None:
            optimizer.step()
        else:
            norm = torch.nn.utils.get_total_norm([p.grad for p in net.parameters()])
            optimizer.step(grad_scale=clip_factor(norm, clip_in_step))
        optimizer.zero_grad()
    return [p.detach().clone() for p in net.parameters()]


def test_eager_update_matches_timm() -> None:
    ours = _run(Lamb)
    theirs = _run(TimmLamb, max_grad_norm=None, foreach=False)
    for a, b in zip(ours, theirs, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_clipping_through_grad_scale_matches_timms_clipping() -> None:
    # 0.05 is well below this net's gradient norms, so every step clips.
    ours = _run(Lamb, clip_in_step=0.05)
    theirs = _run(TimmLamb, max_grad_norm=0.05, foreach=False)
    unclipped = _run(Lamb)
    for a, b in zip(ours, theirs, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert any(not torch.allclose(a, b) for a, b in zip(ours, unclipped, strict=True))


def test_grad_scale_leaves_stored_gradients_alone() -> None:
    net = _net()
    optimizer = Lamb(_groups(net), lr=1e-2)
    net(torch.randn(2, 3, 8, 8)).sum().backward()
    grads = [p.grad.clone() for p in net.parameters()]
    optimizer.step(grad_scale=torch.tensor(0.5))
    for p, g in zip(net.parameters(), grads, strict=True):
        torch.testing.assert_close(p.grad, g, rtol=0, atol=0)


def test_clip_factor_matches_torch() -> None:
    tensors = [torch.randn(3, 4), torch.randn(7), torch.randn(2, 2, 2, 2)]
    norm = torch.nn.utils.get_total_norm(tensors)
    for max_norm in (float(norm) * 10, 0.5):
        clipped = [nn.Parameter(t.clone()) for t in tensors]
        for p, t in zip(clipped, tensors, strict=True):
            p.grad = t.clone()
        torch.nn.utils.clip_grads_with_norm_(clipped, max_norm, norm)
        factor = clip_factor(norm, max_norm)
        for p, t in zip(clipped, tensors, strict=True):
            torch.testing.assert_close(t * factor, p.grad)
    assert float(clip_factor(norm, float(norm) * 10)) == 1.0


def test_a_parameter_without_gradient_neither_restarts_nor_skips_the_count() -> None:
    """timm counts steps per group; a step where the group's first parameter has no
    gradient must still advance the others' bias corrections."""

    def run(optimizer_cls) -> list[torch.Tensor]:
        torch.manual_seed(0)
        first, second = nn.Parameter(torch.randn(4, 3)), nn.Parameter(torch.randn(5, 3))
        group = {"params": [first, second], "weight_decay": 0.05}
        optimizer = optimizer_cls([group], lr=1e-2, betas=(0.9, 0.95))
        for step in range(4):
            grads = {"first": torch.randn(4, 3), "second": torch.randn(5, 3)}
            first.grad = None if step in (0, 1) else grads["first"]
            second.grad = grads["second"]
            optimizer.step()
        return [first.detach().clone(), second.detach().clone()]

    ours = run(Lamb)
    theirs = run(lambda groups, **kw: TimmLamb(groups, max_grad_norm=None, foreach=False, **kw))
    for a, b in zip(ours, theirs, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_compiled_update_falls_back_to_eager_at_the_recompile_limit(caplog) -> None:
    import torch._dynamo

    with torch._dynamo.config.patch(recompile_limit=1), caplog.at_level("WARNING"):
        eager = _run(Lamb)
        compiled = _run(Lamb, compile=True)  # this net's shapes: a new cache entry
        other = [nn.Parameter(torch.randn(2, 2)), nn.Parameter(torch.randn(6))]
        for p in other:
            p.grad = torch.randn_like(p)
        Lamb([{"params": other, "weight_decay": 0.05}], compile=True).step()  # over the limit
    assert "recompile limit" in caplog.text
    for a, b in zip(eager, compiled, strict=True):
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
@pytest.mark.parametrize("clip_in_step", [None, 0.05])
def test_compiled_update_matches_eager(clip_in_step: float | None) -> None:
    # Compiled, the update runs tensor by tensor in two passes (compiled_lamb_update), eager with
    # foreach kernels: two writings of one update.
    eager = _run(Lamb, clip_in_step=clip_in_step)
    compiled = _run(Lamb, clip_in_step=clip_in_step, compile=True)
    for a, b in zip(eager, compiled, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_bad_hyper_parameters_are_rejected() -> None:
    with pytest.raises(ValueError, match="betas"):
        Lamb(_net().parameters(), betas=(0.9, 1.0))
    with pytest.raises(ValueError, match="lr"):
        Lamb(_net().parameters(), lr=-1.0)
