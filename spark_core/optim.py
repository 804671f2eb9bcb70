"""LAMB with the update math of timm's ``Lamb`` (the reference's optimizer), built to fuse.

Differences from timm's class are in *how* it runs, not what it computes:

* learning rate, weight decay and the step count live in 0-dim tensors on the
  parameters' device, so changing them every iteration neither reads back from the
  device nor recompiles a compiled update;
* ``compile=True`` runs the per-group update through ``torch.compile``: the dozen
  element-wise passes of the eager update fuse into a few (on a 2-core CPU, 36 M
  parameters: ~280 ms -> ~70 ms per step, after a one-off compile of about a minute).

Layer-wise adaptation (the trust ratio ``||w|| / ||update||``) applies to groups with
``adapt=True`` (timm: groups whose weight decay is non-zero); gradient clipping is left
to the caller (``torch.nn.utils.clip_grads_with_norm_``), as the engine reports the norm.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch


def lamb_update_(
    params: list[torch.Tensor],
    grads: list[torch.Tensor],
    exp_avgs: list[torch.Tensor],
    exp_avg_sqs: list[torch.Tensor],
    lr: torch.Tensor,
    weight_decay: torch.Tensor,
    step: torch.Tensor,
    beta1: float,
    beta2: float,
    eps: float,
    adapt: bool,
) -> None:
    """One LAMB update of a parameter group, in place (all tensor lists on one device)."""
    bias_correction1 = 1.0 - beta1**step
    bias_correction2 = 1.0 - beta2**step
    torch._foreach_lerp_(exp_avgs, grads, 1.0 - beta1)
    torch._foreach_mul_(exp_avg_sqs, beta2)
    torch._foreach_addcmul_(exp_avg_sqs, grads, grads, value=1.0 - beta2)
    denom = torch._foreach_sqrt(exp_avg_sqs)
    torch._foreach_div_(denom, bias_correction2.sqrt())
    torch._foreach_add_(denom, eps)
    updates = torch._foreach_div(exp_avgs, denom)
    torch._foreach_div_(updates, bias_correction1)
    if adapt:
        torch._foreach_add_(updates, torch._foreach_mul(params, weight_decay))
        weight_norms = torch._foreach_norm(params)
        update_norms = torch._foreach_norm(updates)
        ratios = [
            torch.where((w > 0) & (u > 0), w / u, torch.ones_like(w))
            for w, u in zip(weight_norms, update_norms, strict=True)
        ]
        torch._foreach_mul_(updates, ratios)
    torch._foreach_mul_(updates, lr)
    torch._foreach_sub_(params, updates)


class Lamb(torch.optim.Optimizer):
    """LAMB (You et al. 2019) as timm computes it, with device-resident hyper-parameters.

    Args:
        params: parameters or groups; a group may set ``adapt`` (trust ratio on/off).
        lr, betas, eps, weight_decay: as in timm's ``Lamb``; change ``group["lr"]`` and
            ``group["weight_decay"]`` freely between steps.
        compile: fuse the update with ``torch.compile`` (worth it for long CPU runs).
    """

    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[dict[str, Any]],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-6,
        weight_decay: float = 0.0,
        *,
        compile: bool = False,
    ) -> None:
        if lr < 0 or eps < 0 or weight_decay < 0:
            raise ValueError(f"lr={lr}, eps={eps}, weight_decay={weight_decay}: must be >= 0")
        if not all(0.0 <= b < 1.0 for b in betas):
            raise ValueError(f"betas={betas}: each must lie in [0, 1)")
        defaults = {"lr": lr, "betas": betas, "eps": eps, "weight_decay": weight_decay}
        super().__init__(params, defaults)
        for group in self.param_groups:
            group.setdefault("adapt", group["weight_decay"] != 0)
        self._update: Callable[..., None] = (
            torch.compile(lamb_update_, fullgraph=True, dynamic=False) if compile else lamb_update_
        )
        self._scalars: dict[tuple[int, str], torch.Tensor] = {}

    def _scalar(self, index: int, name: str, value: float, device: torch.device) -> torch.Tensor:
        # fill_ with a Python number is a kernel argument, not a host-to-device copy.
        key = (index, name)
        tensor = self._scalars.get(key)
        if tensor is None or tensor.device != device:
            tensor = torch.zeros((), dtype=torch.float32, device=device)
            self._scalars[key] = tensor
        return tensor.fill_(value)

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for index, group in enumerate(self.param_groups):
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            device = params[0].device
            first = self.state[params[0]]
            step = first.get("step")
            if step is None:
                step = torch.zeros((), dtype=torch.float32, device=device)
            step = step.add_(1)  # one counter per group, shared by its parameters' states
            exp_avgs, exp_avg_sqs = [], []
            for p in params:
                state = self.state[p]
                if "exp_avg" not in state:
                    state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["step"] = step
                exp_avgs.append(state["exp_avg"])
                exp_avg_sqs.append(state["exp_avg_sq"])
            beta1, beta2 = group["betas"]
            self._update(
                params,
                [p.grad for p in params],
                exp_avgs,
                exp_avg_sqs,
                self._scalar(index, "lr", group["lr"], device),
                self._scalar(index, "wd", group["weight_decay"], device),
                step,
                beta1,
                beta2,
                group["eps"],
                group["adapt"],
            )
        return loss
