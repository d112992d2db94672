"""Fused multi-tensor AdamW / Adam in Triton: one launch over a table of tensors.

The step reads p, g, m, v and writes p, m, v once per element: it is memory-bound, and a good
kernel moves those bytes at bandwidth in as few launches as possible. Program ``i`` reads row ``i``
of ``chunks`` (tensor ``t``, chunk ``k``), the addresses of tensor ``t`` from ``meta`` (cast from
int64 to typed pointers) and its lr and weight decay from ``hparams``, then updates elements
``[k*CHUNK, (k+1)*CHUNK)`` of that tensor, ``BLOCK`` at a time. See fastcore/ops/adamw.py for the
tables. Offsets are int64, so tensors past 2^31 elements work.

Scalars reach a GPU kernel as fp32, so ``1 - beta`` is formed on the host in double (in fp32 from a
rounded 0.999 it is off by 1e-5), and bias corrections ``1 - beta**step`` come from an accurate
expm1 (a Taylor series near zero), since ``1 - exp2(step*log2(beta))`` in fp32 loses five digits.
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from fastcore.backends import triton_interpreting
from fastcore.kernels.rounding import store_rounded

# The interpreter runs each program in numpy: small blocks keep CPU tests quick.
BLOCK = 256 if triton_interpreting() else 1024
CHUNK = 2 * BLOCK if triton_interpreting() else 8 * BLOCK
NUM_WARPS = 4

_TL_DTYPES = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}


@triton.jit
def _one_minus_pow(log_beta, step):
    """1 - beta**step = -expm1(step * ln(beta)), accurate to fp32 rounding for step >= 1."""
    y = step * log_beta
    series = y * (1 + y / 2 * (1 + y / 3 * (1 + y / 4 * (1 + y / 5 * (1 + y / 6 * (1 + y / 7 * (1 + y / 8)))))))
    return tl.where(y > -0.35, -series, 1 - tl.exp(y))


@triton.jit
def _adamw_kernel(meta, hparams, chunks, grad_scale, found_inf, beta1, beta2, one_minus_beta1, one_minus_beta2,
                  eps, log_beta1, log_beta2,
                  P_DTYPE: tl.constexpr, AMSGRAD: tl.constexpr, MASTER: tl.constexpr, MAXIMIZE: tl.constexpr,
                  DECOUPLED: tl.constexpr, HAS_SCALE: tl.constexpr, HAS_INF: tl.constexpr,
                  CHUNK: tl.constexpr, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    t = tl.load(chunks + 2 * pid).to(tl.int64)
    k = tl.load(chunks + 2 * pid + 1).to(tl.int64)
    row = meta + 8 * t
    p_ptr = tl.load(row).to(tl.pointer_type(P_DTYPE))
    g_ptr = tl.load(row + 1).to(tl.pointer_type(P_DTYPE))
    m_ptr = tl.load(row + 2).to(tl.pointer_type(tl.float32))
    v_ptr = tl.load(row + 3).to(tl.pointer_type(tl.float32))
    step = tl.load(tl.load(row + 6).to(tl.pointer_type(tl.float32)))
    numel = tl.load(row + 7)
    lr = tl.load(hparams + 2 * t).to(tl.float32)
    wd = tl.load(hparams + 2 * t + 1).to(tl.float32)

    grad_mul = 1.0
    if HAS_SCALE:
        grad_mul = 1.0 / tl.load(grad_scale)
    if MAXIMIZE:
        grad_mul = -grad_mul
    if HAS_INF:  # an inf makes every element masked: a no-op without an early return
        numel = tl.where(tl.load(found_inf) == 0, numel, 0)
    decay = 1.0
    l2 = 0.0
    if DECOUPLED:
        decay = 1.0 - lr * wd
    else:
        l2 = wd
    step_size = lr / _one_minus_pow(log_beta1, step)
    bc2_sqrt = tl.sqrt(_one_minus_pow(log_beta2, step))

    start = k * CHUNK
    for off in range(0, CHUNK, BLOCK):
        idx = start + off + tl.arange(0, BLOCK)
        mask = idx < numel
        g = tl.load(g_ptr + idx, mask=mask, other=0.0).to(tl.float32) * grad_mul
        if MASTER:
            w_ptr = tl.load(row + 5).to(tl.pointer_type(tl.float32))
            x = tl.load(w_ptr + idx, mask=mask, other=0.0)
        else:
            x = tl.load(p_ptr + idx, mask=mask, other=0.0).to(tl.float32)
        x = x * decay
        g = g + l2 * x
        m = beta1 * tl.load(m_ptr + idx, mask=mask, other=0.0) + one_minus_beta1 * g
        v = beta2 * tl.load(v_ptr + idx, mask=mask, other=0.0) + one_minus_beta2 * g * g
        tl.store(m_ptr + idx, m, mask=mask)
        tl.store(v_ptr + idx, v, mask=mask)
        v_hat = v
        if AMSGRAD:
            vmax_ptr = tl.load(row + 4).to(tl.pointer_type(tl.float32))
            v_hat = tl.maximum(tl.load(vmax_ptr + idx, mask=mask, other=0.0), v)
            tl.store(vmax_ptr + idx, v_hat, mask=mask)
        x = x - step_size * m / (tl.sqrt(v_hat) / bc2_sqrt + eps)
        if MASTER:
            tl.store(w_ptr + idx, x, mask=mask)
        store_rounded(p_ptr, idx, x, mask, P_DTYPE)


def adamw_step(meta: torch.Tensor, hparams: torch.Tensor, chunks: torch.Tensor, param_dtype: torch.dtype, *,
               beta1: float, beta2: float, eps: float, amsgrad: bool, has_master: bool, maximize: bool,
               decoupled: bool, grad_scale: torch.Tensor | None, found_inf: torch.Tensor | None) -> None:
    """Run one step over the launch tables (built with chunk size ``CHUNK``); everything in place."""
    if param_dtype not in _TL_DTYPES:
        raise TypeError(f"adamw: the triton backend takes float32, bfloat16 or float16 parameters, got {param_dtype}")
    n_chunks = chunks.shape[0]
    if n_chunks == 0:
        return
    # Any tensor stands in for an absent pointer; the constexpr flags keep it unread.
    _adamw_kernel[(n_chunks,)](
        meta, hparams, chunks, meta if grad_scale is None else grad_scale, meta if found_inf is None else found_inf,
        beta1, beta2, 1.0 - beta1, 1.0 - beta2, eps,
        math.log(beta1) if beta1 > 0 else -math.inf, math.log(beta2) if beta2 > 0 else -math.inf,
        P_DTYPE=_TL_DTYPES[param_dtype], AMSGRAD=amsgrad, MASTER=has_master, MAXIMIZE=maximize,
        DECOUPLED=decoupled, HAS_SCALE=grad_scale is not None, HAS_INF=found_inf is not None,
        CHUNK=CHUNK, BLOCK=BLOCK, num_warps=NUM_WARPS)
