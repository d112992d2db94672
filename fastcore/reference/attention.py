"""Scaled dot-product attention as the maths reads, in float64, differentiable by autograd."""
from __future__ import annotations

import torch


def causal_keep(q_len: int, k_len: int, device=None) -> torch.Tensor:
    """(q_len, k_len) bool, True where query i may see key j: j <= i + (k_len - q_len).

    Aligned to the bottom-right, as FlashAttention: the last query sees every key. With
    q_len == k_len this is the usual lower triangle (SDPA's is_causal=True).
    """
    i = torch.arange(q_len, device=device)[:, None]
    j = torch.arange(k_len, device=device)[None, :]
    return j <= i + (k_len - q_len)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = False,
              scale: float | None = None) -> torch.Tensor:
    """softmax(q k^T * scale + mask) v for q (B, Hq, Tq, D), k/v (B, Hkv, Tk, D); Hq % Hkv == 0.

    A query that may see no key at all (causal with Tq > Tk) outputs zeros, with zero gradients.
    """
    qd, kd, vd = q.double(), k.double(), v.double()
    group = q.shape[1] // k.shape[1]
    kd, vd = kd.repeat_interleave(group, dim=1), vd.repeat_interleave(group, dim=1)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    scores = qd @ kd.transpose(-1, -2) * scale
    if causal:
        keep = causal_keep(q.shape[-2], k.shape[-2], q.device)
        seen = keep.any(-1, keepdim=True)
        # A fully masked row gets finite scores, so softmax and its gradient stay finite; it is zeroed below.
        scores = scores.masked_fill(~keep & seen, float("-inf"))
        p = torch.softmax(scores, dim=-1) * seen
    else:
        p = torch.softmax(scores, dim=-1)
    return (p @ vd).to(q.dtype)
