"""Exact attention without the T x T matrix: the public function, its checks and its backends.

``cpu`` delegates to PyTorch's CPU ``scaled_dot_product_attention`` (with an explicit mask when
causal attention is bottom-right aligned and Tq != Tk); ``triton`` runs fastcore's FlashAttention-2
kernels through the custom ops ``fastcore::attention_fwd`` / ``fastcore::attention_bwd``.
"""
from __future__ import annotations

import math
import numbers
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from fastcore import reference
from fastcore.backends import resolve_backend, triton_device
from fastcore.reference.attention import causal_keep

HEAD_DIMS = (16, 32, 64, 80, 96, 128, 256)


def attention(q: Tensor, k: Tensor, v: Tensor, *, causal: bool = False, scale: Optional[float] = None,
              backend: str = "auto", deterministic: bool = True) -> Tensor:
    """``softmax(q k^T * scale + mask) v`` for q ``(B, Hq, Tq, D)`` and k, v ``(B, Hkv, Tk, D)``.

    The layout of ``torch.nn.functional.scaled_dot_product_attention``. ``Hq`` must be a multiple
    of ``Hkv`` (grouped-query and multi-query attention); query head ``h`` reads kv head
    ``h // (Hq // Hkv)``. ``scale`` defaults to ``1/sqrt(D)``. ``causal=True`` masks key ``j`` for
    query ``i`` when ``j > i + (Tk - Tq)``: aligned to the bottom-right as in FlashAttention, which
    equals SDPA's ``is_causal=True`` when ``Tq == Tk``. A query that sees no key outputs zeros.
    Under ``torch.autocast`` every backend follows SDPA's rule: inputs other than float64 are cast
    to the autocast dtype first. ``deterministic=False`` lets the triton backward add dq up with
    atomics (two fewer matmuls per score tile, as FlashAttention's backward does), so its last bits
    vary from run to run; the other backends are deterministic either way.
    """
    q, k, v = _autocast(q, k, v)
    _check_args(q, k, v, causal, scale, deterministic)
    causal, deterministic = bool(causal), bool(deterministic)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    name = resolve_backend("attention", backend, q.device, q.dtype)
    if name == "reference":
        return reference.attention(q, k, v, causal, scale)
    if name == "cpu":
        return _sdpa(q, k, v, causal, scale)
    return torch.ops.fastcore.attention_fwd(q, k, v, causal, scale, deterministic)[0]


def _autocast(q, k, v) -> tuple:
    if not isinstance(q, Tensor) or q.device.type not in ("cpu", "cuda") or not torch.is_autocast_enabled(q.device.type):
        return q, k, v
    dtype = torch.get_autocast_dtype(q.device.type)
    return tuple(t.to(dtype) if isinstance(t, Tensor) and t.is_floating_point() and t.dtype != torch.float64 else t
                 for t in (q, k, v))


def _check_args(q, k, v, causal, scale, deterministic) -> None:
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, Tensor):
            raise TypeError(f"attention: {name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(f"attention: {name} must be 4-D (batch, heads, length, head_dim), got shape {tuple(t.shape)}")
        if not t.is_floating_point():
            raise TypeError(f"attention: {name} must have a floating-point dtype, got {t.dtype}")
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"attention: q, k and v must share one dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"attention: q, k and v must be on one device, got {q.device}, {k.device}, {v.device}")
    if k.shape != v.shape:
        raise ValueError(f"attention: k and v must have the same shape, got {tuple(k.shape)} and {tuple(v.shape)}")
    if q.shape[0] != k.shape[0]:
        raise ValueError(f"attention: q and k must have the same batch size, got {q.shape[0]} and {k.shape[0]}")
    if q.shape[-1] != k.shape[-1]:
        raise ValueError(f"attention: q and k must have the same head dim, got {q.shape[-1]} and {k.shape[-1]}")
    if q.shape[-1] not in HEAD_DIMS:
        raise ValueError(f"attention: head dim must be one of {HEAD_DIMS}, got {q.shape[-1]}")
    if k.shape[1] == 0 or q.shape[1] % k.shape[1] != 0:
        raise ValueError(f"attention: q's heads ({q.shape[1]}) must be a multiple of k/v's heads ({k.shape[1]})")
    if q.shape[2] == 0 or k.shape[2] == 0:
        raise ValueError(f"attention: lengths must be >= 1, got Tq={q.shape[2]} and Tk={k.shape[2]}")
    for name, flag in (("causal", causal), ("deterministic", deterministic)):
        if not isinstance(flag, (bool, np.bool_)):
            raise TypeError(f"attention: {name} must be a bool, got {type(flag).__module__}.{type(flag).__name__}")
    if scale is not None:
        if isinstance(scale, bool) or not isinstance(scale, numbers.Real):
            raise TypeError(f"attention: scale must be a float or None, got {type(scale).__name__}")
        if not (0 < scale < math.inf):
            raise ValueError(f"attention: scale must be a finite number > 0, got {scale}")


def _sdpa(q, k, v, causal, scale) -> Tensor:
    """PyTorch's CPU kernel. Its is_causal is top-left aligned, so Tq != Tk takes an explicit mask;
    rows that see no key get an all-true mask (finite maths) and are zeroed afterwards."""
    gqa = dict(enable_gqa=True) if q.shape[1] != k.shape[1] else {}
    if not causal or q.shape[2] == k.shape[2]:
        return F.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=scale, **gqa)
    keep = causal_keep(q.shape[2], k.shape[2], q.device)
    seen = keep.any(-1, keepdim=True)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=keep | ~seen, scale=scale, **gqa)
    return out * seen.to(out.dtype) if q.shape[2] > k.shape[2] else out


# ---------------------------------------------------------------- the triton backend, as custom ops
def _fwd_impl(q: Tensor, k: Tensor, v: Tensor, causal: bool, scale: float,
              deterministic: bool) -> tuple[Tensor, Tensor]:
    """``deterministic`` is the backward's, kept here for it (see _setup_context)."""
    from fastcore.kernels import attention as kernels

    with triton_device(q.device):
        return kernels.attention_fwd(q, k, v, causal, scale)


_fwd = torch.library.custom_op("fastcore::attention_fwd", _fwd_impl, mutates_args=())


@_fwd.register_fake
def _(q, k, v, causal, scale, deterministic):
    b, h, t, _ = q.shape
    return torch.empty_like(q, memory_format=torch.contiguous_format), q.new_empty((b, h, t), dtype=torch.float32)


def _bwd_impl(do: Tensor, q: Tensor, k: Tensor, v: Tensor, o: Tensor, lse: Tensor, causal: bool,
              scale: float, deterministic: bool) -> tuple[Tensor, Tensor, Tensor]:
    from fastcore.kernels import attention as kernels

    with triton_device(q.device):
        return kernels.attention_bwd(do, q, k, v, o, lse, causal, scale, deterministic)


_bwd = torch.library.custom_op("fastcore::attention_bwd", _bwd_impl, mutates_args=())


@_bwd.register_fake
def _(do, q, k, v, o, lse, causal, scale, deterministic):
    return (torch.empty_like(q, memory_format=torch.contiguous_format),
            torch.empty_like(k, memory_format=torch.contiguous_format),
            torch.empty_like(v, memory_format=torch.contiguous_format))


def _setup_context(ctx, inputs, output):
    q, k, v, causal, scale, deterministic = inputs
    o, lse = output
    ctx.save_for_backward(q, k, v, o, lse)
    ctx.causal, ctx.scale, ctx.deterministic = causal, scale, deterministic
    ctx.mark_non_differentiable(lse)


def _backward(ctx, do, _dlse):
    q, k, v, o, lse = ctx.saved_tensors
    # Any strides: the kernels take them (a .sum() gives a stride-0 do, which a copy would blow up).
    dq, dk, dv = torch.ops.fastcore.attention_bwd(do, q, k, v, o, lse, ctx.causal, ctx.scale, ctx.deterministic)
    return dq, dk, dv, None, None, None


_fwd.register_autograd(_backward, setup_context=_setup_context)


def _no_double_backward(ctx, *grads):
    raise RuntimeError("attention: the triton backend has no double backward (a gradient of a gradient taken "
                       "with create_graph=True); use backend='reference' for that")


_bwd.register_autograd(_no_double_backward)
