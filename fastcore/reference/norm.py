"""LayerNorm and RMSNorm as the maths reads, in float64, differentiable by autograd."""
from __future__ import annotations

import torch


def layer_norm(x: torch.Tensor, weight=None, bias=None, eps: float = 1e-5) -> torch.Tensor:
    """(x - mean) / sqrt(var + eps) * weight + bias over the last dim; var is the biased variance."""
    xd = x.double()
    mean = xd.mean(-1, keepdim=True)
    var = (xd - mean).square().mean(-1, keepdim=True)
    y = (xd - mean) * torch.rsqrt(var + eps)
    if weight is not None:
        y = y * weight.double()
    if bias is not None:
        y = y + bias.double()
    return y.to(x.dtype)


def default_rms_eps(dtype: torch.dtype) -> float:
    """PyTorch's rms_norm default: the machine eps of the compute dtype (float32 for 16-bit inputs)."""
    return torch.finfo(torch.float64 if dtype == torch.float64 else torch.float32).eps


def rms_norm(x: torch.Tensor, weight=None, eps: float | None = None) -> torch.Tensor:
    """x / sqrt(mean(x^2) + eps) * weight over the last dim; eps=None as in torch.nn.functional.rms_norm."""
    if eps is None:
        eps = default_rms_eps(x.dtype)
    xd = x.double()
    y = xd * torch.rsqrt(xd.square().mean(-1, keepdim=True) + eps)
    if weight is not None:
        y = y * weight.double()
    return y.to(x.dtype)
