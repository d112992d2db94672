"""One AdamW (or Adam, with L2 weight decay) step for one tensor, as the maths reads, in float64.

It updates ``param`` and the state in place, rounding once to each tensor's own dtype at the end.
``step`` is the step count including this step (1 on the first).
"""
from __future__ import annotations

import math

import torch


@torch.no_grad()
def adamw_step(param: torch.Tensor, grad: torch.Tensor, exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor,
               step: float, *, lr: float, beta1: float, beta2: float, eps: float, weight_decay: float,
               max_exp_avg_sq: torch.Tensor | None = None, master: torch.Tensor | None = None,
               maximize: bool = False, decoupled: bool = True, grad_scale: float | None = None) -> None:
    g = grad.double()
    if grad_scale is not None:
        g = g / grad_scale
    if maximize:
        g = -g
    x = (master if master is not None else param).double()
    if weight_decay != 0:
        if decoupled:
            x = x * (1 - lr * weight_decay)
        else:
            g = g + weight_decay * x
    m = beta1 * exp_avg.double() + (1 - beta1) * g
    v = beta2 * exp_avg_sq.double() + (1 - beta2) * g * g
    bias_correction1 = 1 - beta1**step
    bias_correction2_sqrt = math.sqrt(1 - beta2**step)
    if max_exp_avg_sq is not None:
        v_hat = torch.maximum(max_exp_avg_sq.double(), v)
        max_exp_avg_sq.copy_(v_hat)
    else:
        v_hat = v
    x = x - (lr / bias_correction1) * m / (v_hat.sqrt() / bias_correction2_sqrt + eps)
    exp_avg.copy_(m)
    exp_avg_sq.copy_(v)
    if master is not None:
        master.copy_(x)
    param.copy_(x)
