"""Scaled dot-product attention, forward and backward, as Triton kernels (FlashAttention-2).

q is (B, Hq, Tq, D), k and v are (B, Hkv, Tk, D) with Hq a multiple of Hkv: query head h reads
kv head h // (Hq // Hkv) (GQA; MQA when Hkv == 1).  Inputs may have any strides; every kernel
takes all four strides of every tensor.  Outputs are new contiguous tensors.

    o = softmax(q k^T * scale + mask) v

Causal masking is bottom-right aligned, as in FlashAttention: query i may see key j iff
j <= i + (Tk - Tq).  With Tq > Tk the first Tq - Tk queries see nothing; they output 0, get
lse = +inf and receive zero gradients.

Forward (grid: B*Hq x query blocks; batch x heads on axis 0, whose limit is 2^31 - 1, not 65535)
    A program keeps its (BLOCK_M, D) block of q in registers and streams k/v blocks through
    the online softmax: with s the scaled scores of a key block,
        m' = max(m, rowmax(s)),  alpha = 2^(m - m'),  p = 2^(s - m')
        l' = l * alpha + rowsum(p),  acc' = acc * alpha + p v.
    Scores are kept in the base-2 domain (scale is pre-multiplied by log2(e)) so each
    exponential is a single exp2.  o = acc / l, and lse = (m + log2(l)) * ln(2) is saved (fp32,
    natural log, (B, Hq, Tq)) so the backward can rebuild p without another softmax.
    The key loop has two phases: blocks that every row of the query block sees in full run
    without any elementwise mask, and the few remaining ones (crossing the causal diagonal,
    or the last partial key block) apply it.  Causal blocks entirely above the diagonal are
    never visited.

Backward
    With p = exp(s - lse), dp = dO v^T and delta = rowsum(O * dO) (= rowsum(p * dp)):
        dv = p^T dO,   ds = p * (dp - delta),   dk = scale * ds^T q,   dq = scale * ds k.
    1. a small kernel computes delta (fp32, (B, Hq, Tq));
    2. dK/dV (grid: B*Hkv x key blocks): a program holds its k/v block and accumulates dk/dv
       over every query head of its GQA group and every query block that can see it;
    3. dQ (grid: B*Hq x query blocks): a program holds q/dO and loops over key blocks.
    Each output element is owned by exactly one program, so there are no atomics and the
    gradients are bit-for-bit reproducible.  p is recomputed twice (in 2 and 3): the price of
    dropping atomics.  deterministic=False pays the other price instead: 2 also adds
    scale * ds k into an fp32 dq with atomics, and 3 does not run.

Numerics: all dot products accumulate in fp32 and the softmax statistics are fp32.  fp32
inputs are multiplied in true fp32 (input_precision="ieee", never tf32); 16-bit inputs round
p and ds to the input dtype before their products, as FlashAttention does.

Head dims that are not a power of two (80, 96) are padded to the next power of two in
registers; padded lanes load as zero, so they add nothing to any dot product.

Offsets: batch/head bases and the start of each sequence block are formed in int64; offsets
inside a block stay int32.

TMA (sm_90): with TMA=True the forward reads q, k and v tiles through tensor descriptors, which
zero-fill past T and the head dim as the masked loads do.  Only a forced config (block_configs,
the tuner) takes it until a GPU run shows it faster; the interpreter runs it too.

Warp specialisation: not used.  Triton 3.9's automatic form (tl.range(..., warp_specialize=True))
targets Blackwell; compiled ahead of time for sm_90, the forward's key loop gave PTX identical to
the plain loop at 8 warps and failed in the warp-specialisation pass at 4 warps, with and without
TMA.  Hopper's explicit form is Gluon, a separate kernel language.
"""

import contextlib
import math

import torch
import triton
import triton.language as tl

_LOG2E = math.log2(math.e)

# (BLOCK_M, BLOCK_N, num_warps, num_stages), keyed on (padded head dim, causal, dtype).
# Starting points for H100, not autotuned.  fp32 tiles take twice the shared memory and
# registers of 16-bit ones, hence the smaller blocks: the fp32 entries are the largest that
# compiled for sm_90 without spilling (Triton 3.6 and 3.9; bench/compile_check.py), but at
# D=256, where the smallest tried still spill 60 bytes (forward) and 1.6-3.8 KB (dK/dV).
_H16 = {16: (128, 64, 4, 3), 32: (128, 64, 4, 3), 64: (128, 64, 4, 3),
        128: (128, 64, 8, 3), 256: (64, 32, 4, 2)}
_H32 = {16: (64, 64, 4, 2), 32: (64, 64, 4, 2), 64: (64, 32, 8, 2),
        128: (32, 16, 4, 2), 256: (32, 16, 4, 2)}
_FWD_CONFIGS = {(d, causal, dt): cfg
                for dt, table in ((torch.float16, _H16), (torch.bfloat16, _H16), (torch.float32, _H32))
                for d, cfg in table.items() for causal in (False, True)}
# dK/dV wants a long key block (it is reused across the whole query loop) and dQ a long
# query block; both keep two (block, D) fp32 accumulators or q/dO tiles in registers.
_B16 = {16: ((32, 128, 4, 3), (128, 32, 4, 3)), 32: ((32, 128, 4, 3), (128, 32, 4, 3)),
        64: ((32, 128, 4, 3), (128, 32, 4, 3)), 128: ((32, 128, 8, 2), (128, 32, 8, 2)),
        256: ((32, 64, 8, 2), (64, 32, 8, 2))}
_B32 = {16: ((16, 64, 8, 1), (64, 16, 8, 1)), 32: ((16, 64, 8, 1), (64, 16, 8, 1)),
        64: ((16, 64, 8, 1), (64, 16, 8, 1)), 128: ((16, 64, 8, 1), (64, 16, 8, 1)),
        256: ((16, 32, 4, 1), (32, 16, 4, 1))}
# Value: (dK/dV config, dQ config), each (BLOCK_M, BLOCK_N, num_warps, num_stages).
_BWD_CONFIGS = {(d, causal, dt): cfg
                for dt, table in ((torch.float16, _B16), (torch.bfloat16, _B16), (torch.float32, _B32))
                for d, cfg in table.items() for causal in (False, True)}
# The interpreter runs every program in Python: small, unequal blocks keep it quick and make
# even short test sequences span several blocks, partial edges and diagonal crossings.
_INTERPRET_FWD = (32, 16, 4, 1)
_INTERPRET_BWD = ((16, 32, 4, 1), (32, 16, 4, 1))
# Block of the delta preprocess kernel (a plain row reduction).
_DELTA_BLOCK_M = 64


# --------------------------------------------------------------------------
# Kernels
# --------------------------------------------------------------------------


@triton.jit
def _load_tile(ptrs, r_ok, c_ok, CHECK_R: tl.constexpr, CHECK_C: tl.constexpr):
    # Masks only what can be out of range: unmasked loads vectorise better.
    if CHECK_R and CHECK_C:
        t = tl.load(ptrs, mask=r_ok[:, None] & c_ok[None, :], other=0.0)
    elif CHECK_R:
        t = tl.load(ptrs, mask=r_ok[:, None], other=0.0)
    elif CHECK_C:
        t = tl.load(ptrs, mask=c_ok[None, :], other=0.0)
    else:
        t = tl.load(ptrs)
    return t


@triton.jit
def _load_block(ptr, b, h, start, stride_b, stride_h, stride_t, stride_d, T,
                HEAD_DIM: tl.constexpr, BLOCK: tl.constexpr, BLOCK_D: tl.constexpr):
    # Rows start..start+BLOCK of head (b, h) of a (B, H, T, D) tensor; zeros past T and HEAD_DIM.
    # The head base and the block start are int64, offsets inside the block int32.
    rows = tl.arange(0, BLOCK)
    offs_d = tl.arange(0, BLOCK_D)
    base = ptr + b * stride_b + h * stride_h + tl.cast(start, tl.int64) * stride_t
    return _load_tile(base + rows[:, None] * stride_t + offs_d[None, :] * stride_d,
                      start + rows < T, offs_d < HEAD_DIM, True, BLOCK_D != HEAD_DIM)


@triton.jit
def _store_block(ptr, x, b, h, start, stride_b, stride_h, stride_t, stride_d, T,
                 HEAD_DIM: tl.constexpr, BLOCK: tl.constexpr, BLOCK_D: tl.constexpr):
    # _load_block's inverse: rows past T and columns past HEAD_DIM are not written.
    rows = tl.arange(0, BLOCK)
    offs_d = tl.arange(0, BLOCK_D)
    base = ptr + b * stride_b + h * stride_h + tl.cast(start, tl.int64) * stride_t
    tl.store(base + rows[:, None] * stride_t + offs_d[None, :] * stride_d, x.to(ptr.dtype.element_ty),
             mask=(start + rows < T)[:, None] & (offs_d < HEAD_DIM)[None, :])


@triton.jit
def _query_block(H, GROUP, Tq, BLOCK_M: tl.constexpr):
    # This program's query block: (batch x head, batch, head, kv head, first row, rows, rows < Tq).
    bh = tl.program_id(0)  # batch x heads on axis 0: CUDA caps axes 1 and 2 at 65535
    start_m = tl.program_id(1) * BLOCK_M
    b = tl.cast(bh // H, tl.int64)
    h = tl.cast(bh % H, tl.int64)
    offs_m = start_m + tl.arange(0, BLOCK_M)
    return bh, b, h, h // GROUP, start_m, offs_m, offs_m < Tq


@triton.jit
def _mma(a, b, acc, DOT_F32: tl.constexpr):
    # fp32 accumulation always; fp32 operands in true fp32 ("ieee": never tf32).  DOT_F32
    # widens 16-bit operands first, which is exact; it is only set under the interpreter,
    # whose dot multiplies bf16 tensors as their raw uint16 bits.
    if DOT_F32:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    return tl.dot(a, b, acc, input_precision="ieee")


@triton.jit
def _load_t_block(head, start_n, stride_t, stride_d, T, MASKED: tl.constexpr,
                  HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    # Rows start_n..start_n+BLOCK_N of one head, read transposed as (D, BLOCK_N), so that
    # q @ kT needs no register shuffle; rows past T are masked only when MASKED.
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    ptrs = head + tl.cast(start_n, tl.int64) * stride_t + offs_n[None, :] * stride_t + offs_d[:, None] * stride_d
    return _load_tile(ptrs, offs_d < HEAD_DIM, start_n + offs_n < T, BLOCK_D != HEAD_DIM, MASKED)


@triton.jit
def _scores(q, kT, start_n, offs_m, Tk, causal_off, qk_scale, MASKED: tl.constexpr, CAUSAL: tl.constexpr,
            BLOCK_N: tl.constexpr, DOT_F32: tl.constexpr):
    # q kT in log2 units; keys past Tk (and above the diagonal when causal) are -inf.
    s = _mma(q, kT, None, DOT_F32) * qk_scale
    if MASKED:
        offs_n = start_n + tl.arange(0, BLOCK_N)
        keep = (offs_n < Tk)[None, :]
        if CAUSAL:
            keep = keep & (offs_n[None, :] <= offs_m[:, None] + causal_off)
        s = tl.where(keep, s, float("-inf"))
    return s


@triton.jit
def _fwd_inner(
    acc, l_i, m_i, q, K_head, V_head,
    stride_kt, stride_kd, stride_vt, stride_vd,
    offs_m, lo, hi, Tk, causal_off, qk_scale,
    MASKED: tl.constexpr, CAUSAL: tl.constexpr, HEAD_DIM: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, DOT_F32: tl.constexpr, TMA: tl.constexpr,
):
    # With TMA, K_head and V_head are tensor descriptors of the head: the copy engine fetches whole
    # tiles, zero past Tk and HEAD_DIM.
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    for start_n in range(lo, hi, BLOCK_N):
        n64 = tl.cast(start_n, tl.int64)
        n_ok = start_n + offs_n < Tk
        if TMA:
            kT = tl.trans(K_head.load([start_n, 0]))
        else:
            kT = _load_t_block(K_head, start_n, stride_kt, stride_kd, Tk, MASKED, HEAD_DIM, BLOCK_N, BLOCK_D)
        s = _scores(q, kT, start_n, offs_m, Tk, causal_off, qk_scale, MASKED, CAUSAL, BLOCK_N, DOT_F32)
        # m_i starts finite (see caller), so a row whose keys so far are all masked gets
        # p = 2^(-inf) = 0 and alpha = 1 instead of NaN from (-inf) - (-inf).
        m_new = tl.maximum(m_i, tl.max(s, 1))
        p = tl.exp2(s - m_new[:, None])
        alpha = tl.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        if TMA:
            v = V_head.load([start_n, 0])
        else:
            v_ptrs = V_head + n64 * stride_vt + offs_n[:, None] * stride_vt + offs_d[None, :] * stride_vd
            v = _load_tile(v_ptrs, n_ok, d_ok, MASKED, BLOCK_D != HEAD_DIM)
        acc = acc * alpha[:, None]
        acc = _mma(p.to(v.dtype), v, acc, DOT_F32)
        m_i = m_new
    return acc, l_i, m_i


@triton.jit
def _key_range(start_m, Tk, causal_off, CAUSAL: tl.constexpr,
               BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    # Key blocks [0, mid) are seen in full by every row of the query block starting at
    # start_m; [mid, hi) need the elementwise mask.  Row i sees keys j <= i + causal_off, so
    # the block's first row sees j < start_m + causal_off + 1 and its last row
    # j < start_m + BLOCK_M + causal_off.  Clamping at 0 before dividing keeps the integer
    # division on non-negative values (the interpreter floors, compiled code truncates).
    if CAUSAL:
        hi = tl.maximum(tl.minimum(start_m + BLOCK_M + causal_off, Tk), 0)
        mid = tl.maximum(tl.minimum(start_m + causal_off + 1, Tk), 0) // BLOCK_N * BLOCK_N
    else:
        hi = Tk
        mid = Tk // BLOCK_N * BLOCK_N
    return mid, hi


@triton.jit
def _attn_fwd_kernel(
    Q, K, V, O, LSE,
    stride_qb, stride_qh, stride_qt, stride_qd,
    stride_kb, stride_kh, stride_kt, stride_kd,
    stride_vb, stride_vh, stride_vt, stride_vd,
    stride_ob, stride_oh, stride_ot, stride_od,
    H, GROUP, Tq, Tk, qk_scale,
    CAUSAL: tl.constexpr, HEAD_DIM: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    DOT_F32: tl.constexpr, TMA: tl.constexpr,
):
    bh, b, h, hk, start_m, offs_m, m_ok = _query_block(H, GROUP, Tq, BLOCK_M)
    if TMA:  # sm_90's tensor memory accelerator; attention_fwd checks the strides it needs
        q = tl.make_tensor_descriptor(Q + b * stride_qb + h * stride_qh, shape=[Tq, HEAD_DIM], strides=[stride_qt, 1],
                                      block_shape=[BLOCK_M, BLOCK_D]).load([start_m, 0])
        K_head = tl.make_tensor_descriptor(K + b * stride_kb + hk * stride_kh, shape=[Tk, HEAD_DIM],
                                           strides=[stride_kt, 1], block_shape=[BLOCK_N, BLOCK_D])
        V_head = tl.make_tensor_descriptor(V + b * stride_vb + hk * stride_vh, shape=[Tk, HEAD_DIM],
                                           strides=[stride_vt, 1], block_shape=[BLOCK_N, BLOCK_D])
    else:
        q = _load_block(Q, b, h, start_m, stride_qb, stride_qh, stride_qt, stride_qd, Tq, HEAD_DIM, BLOCK_M, BLOCK_D)
        K_head = K + b * stride_kb + hk * stride_kh
        V_head = V + b * stride_vb + hk * stride_vh

    causal_off = Tk - Tq
    mid, hi = _key_range(start_m, Tk, causal_off, CAUSAL, BLOCK_M, BLOCK_N)
    # Finite start for the running max: see _fwd_inner.  Real scores never get near it.
    m_i = tl.full([BLOCK_M], -1.0e30, dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, K_head, V_head,
                               stride_kt, stride_kd, stride_vt, stride_vd,
                               offs_m, 0, mid, Tk, causal_off, qk_scale,
                               False, CAUSAL, HEAD_DIM, BLOCK_N, BLOCK_D, DOT_F32, TMA)
    acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, K_head, V_head,
                               stride_kt, stride_kd, stride_vt, stride_vd,
                               offs_m, mid, hi, Tk, causal_off, qk_scale,
                               True, CAUSAL, HEAD_DIM, BLOCK_N, BLOCK_D, DOT_F32, TMA)

    # A row that saw no key has l == 0 and acc == 0: output 0, lse = +inf (so the backward
    # rebuilds p = exp(s - inf) = 0 for it).
    empty = l_i == 0.0
    l_safe = tl.where(empty, 1.0, l_i)
    o = acc / l_safe[:, None]
    lse = tl.where(empty, float("inf"), (m_i + tl.log2(l_safe)) * 0.6931471805599453)
    _store_block(O, o, b, h, start_m, stride_ob, stride_oh, stride_ot, stride_od, Tq, HEAD_DIM, BLOCK_M, BLOCK_D)
    tl.store(LSE + tl.cast(bh, tl.int64) * Tq + offs_m, lse, mask=m_ok)


@triton.jit
def _attn_bwd_delta_kernel(
    O, DO, Delta,
    stride_ob, stride_oh, stride_ot, stride_od,
    stride_dob, stride_doh, stride_dot, stride_dod,
    H, Tq,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
):
    bh = tl.program_id(0)  # batch x heads on axis 0: CUDA caps axes 1 and 2 at 65535
    start_m = tl.program_id(1) * BLOCK_M
    b = tl.cast(bh // H, tl.int64)
    h = tl.cast(bh % H, tl.int64)
    rows = tl.arange(0, BLOCK_M)
    m_ok = start_m + rows < Tq
    o = _load_block(O, b, h, start_m, stride_ob, stride_oh, stride_ot, stride_od, Tq,
                    HEAD_DIM, BLOCK_M, BLOCK_D).to(tl.float32)
    do = _load_block(DO, b, h, start_m, stride_dob, stride_doh, stride_dot, stride_dod, Tq,
                     HEAD_DIM, BLOCK_M, BLOCK_D).to(tl.float32)
    tl.store(Delta + tl.cast(bh, tl.int64) * Tq + start_m + rows, tl.sum(o * do, 1), mask=m_ok)


@triton.jit
def _dkdv_inner(
    dk, dv, k, v, Q_head, DO_head, LSE_head, Delta_head, DQ_head,
    stride_qt, stride_qd, stride_dot, stride_dod,
    offs_n, n_ok, lo, hi, Tq, causal_off, qk_scale, scale,
    MASKED: tl.constexpr, HEAD_DIM: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, DOT_F32: tl.constexpr, ATOMIC_DQ: tl.constexpr,
):
    # Works on transposed tiles, (BLOCK_N, BLOCK_M), so dk/dv come out as (keys, D) directly.
    # With ATOMIC_DQ this key block also adds its share of dq, scale * ds k, into DQ_head (fp32,
    # (Tq, HEAD_DIM) contiguous) with atomics: the nondeterministic path, which needs no dQ kernel.
    rows = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    for start_m in range(lo, hi, BLOCK_M):
        m64 = tl.cast(start_m, tl.int64)
        offs_m = start_m + rows
        m_ok = offs_m < Tq
        # Rows past Tq load q = dO = delta = 0 and lse = +inf, so their p and ds are exactly
        # 0: no extra mask is needed for the last partial query block.
        qT_ptrs = Q_head + m64 * stride_qt + rows[None, :] * stride_qt + offs_d[:, None] * stride_qd
        qT = _load_tile(qT_ptrs, d_ok, m_ok, BLOCK_D != HEAD_DIM, True)
        lse = tl.load(LSE_head + offs_m, mask=m_ok, other=float("inf")) * 1.4426950408889634
        sT = _mma(k, qT, None, DOT_F32) * qk_scale
        if MASKED:
            sT = tl.where(offs_n[:, None] <= offs_m[None, :] + causal_off, sT, float("-inf"))
        pT = tl.exp2(sT - lse[None, :])
        do_ptrs = DO_head + m64 * stride_dot + rows[:, None] * stride_dot + offs_d[None, :] * stride_dod
        do = _load_tile(do_ptrs, m_ok, d_ok, True, BLOCK_D != HEAD_DIM)
        dv = _mma(pT.to(do.dtype), do, dv, DOT_F32)
        delta = tl.load(Delta_head + offs_m, mask=m_ok, other=0.0)
        dpT = _mma(v, tl.trans(do), None, DOT_F32)
        dsT = (pT * (dpT - delta[None, :])).to(qT.dtype)
        dk = _mma(dsT, tl.trans(qT), dk, DOT_F32)
        if ATOMIC_DQ:
            # Keys past Tk (zeros in k) have finite junk ds, which a 16-bit cast can make inf: zeroed,
            # or inf * 0 would put NaN into every dq row.
            dq = _mma(tl.trans(tl.where(n_ok[:, None], dsT, 0.0)), k, None, DOT_F32) * scale
            dq_ptrs = DQ_head + m64 * HEAD_DIM + rows[:, None] * HEAD_DIM + offs_d[None, :]
            tl.atomic_add(dq_ptrs, dq, mask=m_ok[:, None] & d_ok[None, :], sem="relaxed")
    return dk, dv


@triton.jit
def _attn_bwd_dkdv_kernel(
    Q, K, V, DO, LSE, Delta, DK, DV, DQ,
    stride_qb, stride_qh, stride_qt, stride_qd,
    stride_kb, stride_kh, stride_kt, stride_kd,
    stride_vb, stride_vh, stride_vt, stride_vd,
    stride_dob, stride_doh, stride_dot, stride_dod,
    stride_dkb, stride_dkh, stride_dkt, stride_dkd,
    stride_dvb, stride_dvh, stride_dvt, stride_dvd,
    H, HKV, GROUP, Tq, Tk, qk_scale, scale,
    CAUSAL: tl.constexpr, HEAD_DIM: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    DOT_F32: tl.constexpr, ATOMIC_DQ: tl.constexpr,
):
    bhk = tl.program_id(0)
    start_n = tl.program_id(1) * BLOCK_N
    b = tl.cast(bhk // HKV, tl.int64)
    hk = tl.cast(bhk % HKV, tl.int64)
    offs_n = start_n + tl.arange(0, BLOCK_N)
    n_ok = offs_n < Tk
    # Keys past Tk load as 0.  Their dk/dv rows may hold junk, but each row only depends on
    # its own key, and they are never stored.
    k = _load_block(K, b, hk, start_n, stride_kb, stride_kh, stride_kt, stride_kd, Tk, HEAD_DIM, BLOCK_N, BLOCK_D)
    v = _load_block(V, b, hk, start_n, stride_vb, stride_vh, stride_vt, stride_vd, Tk, HEAD_DIM, BLOCK_N, BLOCK_D)
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)

    # Query blocks [lo, mid) cross the diagonal for this key block and need the causal mask;
    # [mid, Tq) see it in full.  Query i sees key j iff i >= j - causal_off, so the first
    # query that sees any key of the block is start_n - causal_off and the first that sees
    # all of them is start_n + BLOCK_N - 1 - causal_off (clamped at 0 before dividing).
    causal_off = Tk - Tq
    if CAUSAL:
        lo = tl.maximum(start_n - causal_off, 0) // BLOCK_M * BLOCK_M
        mid = tl.minimum(tl.cdiv(tl.maximum(start_n + BLOCK_N - 1 - causal_off, 0), BLOCK_M) * BLOCK_M, Tq)
    else:
        lo = 0
        mid = 0
    # The group's query heads are summed here, in a fixed order: no atomics across programs.
    for g in range(0, GROUP):
        h = hk * GROUP + g
        bh = b * H + h
        Q_head = Q + b * stride_qb + h * stride_qh
        DO_head = DO + b * stride_dob + h * stride_doh
        LSE_head = LSE + bh * Tq
        Delta_head = Delta + bh * Tq
        DQ_head = DQ + bh * Tq * HEAD_DIM
        dk, dv = _dkdv_inner(dk, dv, k, v, Q_head, DO_head, LSE_head, Delta_head, DQ_head,
                             stride_qt, stride_qd, stride_dot, stride_dod,
                             offs_n, n_ok, lo, mid, Tq, causal_off, qk_scale, scale,
                             True, HEAD_DIM, BLOCK_M, BLOCK_D, DOT_F32, ATOMIC_DQ)
        dk, dv = _dkdv_inner(dk, dv, k, v, Q_head, DO_head, LSE_head, Delta_head, DQ_head,
                             stride_qt, stride_qd, stride_dot, stride_dod,
                             offs_n, n_ok, mid, Tq, Tq, causal_off, qk_scale, scale,
                             False, HEAD_DIM, BLOCK_M, BLOCK_D, DOT_F32, ATOMIC_DQ)

    # ds was formed from unscaled scores' softmax; the chain rule through s = scale * q k^T
    # puts one factor of scale on dk (and on dq).
    dk = dk * scale
    _store_block(DK, dk, b, hk, start_n, stride_dkb, stride_dkh, stride_dkt, stride_dkd, Tk, HEAD_DIM, BLOCK_N, BLOCK_D)
    _store_block(DV, dv, b, hk, start_n, stride_dvb, stride_dvh, stride_dvt, stride_dvd, Tk, HEAD_DIM, BLOCK_N, BLOCK_D)


@triton.jit
def _dq_inner(
    dq, q, do, lse, delta, K_head, V_head,
    stride_kt, stride_kd, stride_vt, stride_vd,
    offs_m, lo, hi, Tk, causal_off, qk_scale,
    MASKED: tl.constexpr, CAUSAL: tl.constexpr, HEAD_DIM: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, DOT_F32: tl.constexpr,
):
    for start_n in range(lo, hi, BLOCK_N):
        kT = _load_t_block(K_head, start_n, stride_kt, stride_kd, Tk, MASKED, HEAD_DIM, BLOCK_N, BLOCK_D)
        vT = _load_t_block(V_head, start_n, stride_vt, stride_vd, Tk, MASKED, HEAD_DIM, BLOCK_N, BLOCK_D)
        s = _scores(q, kT, start_n, offs_m, Tk, causal_off, qk_scale, MASKED, CAUSAL, BLOCK_N, DOT_F32)
        p = tl.exp2(s - lse[:, None])
        dp = _mma(do, vT, None, DOT_F32)
        ds = p * (dp - delta[:, None])
        dq = _mma(ds.to(kT.dtype), tl.trans(kT), dq, DOT_F32)
    return dq


@triton.jit
def _attn_bwd_dq_kernel(
    Q, K, V, DO, LSE, Delta, DQ,
    stride_qb, stride_qh, stride_qt, stride_qd,
    stride_kb, stride_kh, stride_kt, stride_kd,
    stride_vb, stride_vh, stride_vt, stride_vd,
    stride_dob, stride_doh, stride_dot, stride_dod,
    stride_dqb, stride_dqh, stride_dqt, stride_dqd,
    H, GROUP, Tq, Tk, qk_scale, scale,
    CAUSAL: tl.constexpr, HEAD_DIM: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    DOT_F32: tl.constexpr,
):
    bh, b, h, hk, start_m, offs_m, m_ok = _query_block(H, GROUP, Tq, BLOCK_M)
    q = _load_block(Q, b, h, start_m, stride_qb, stride_qh, stride_qt, stride_qd, Tq, HEAD_DIM, BLOCK_M, BLOCK_D)
    do = _load_block(DO, b, h, start_m, stride_dob, stride_doh, stride_dot, stride_dod, Tq, HEAD_DIM, BLOCK_M, BLOCK_D)
    # Rows past Tq get lse = +inf, hence p = 0: they stay finite and are not stored.
    lse = tl.load(LSE + tl.cast(bh, tl.int64) * Tq + offs_m, mask=m_ok, other=float("inf")) * 1.4426950408889634
    delta = tl.load(Delta + tl.cast(bh, tl.int64) * Tq + offs_m, mask=m_ok, other=0.0)
    K_head = K + b * stride_kb + hk * stride_kh
    V_head = V + b * stride_vb + hk * stride_vh

    causal_off = Tk - Tq
    mid, hi = _key_range(start_m, Tk, causal_off, CAUSAL, BLOCK_M, BLOCK_N)
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    dq = _dq_inner(dq, q, do, lse, delta, K_head, V_head,
                   stride_kt, stride_kd, stride_vt, stride_vd,
                   offs_m, 0, mid, Tk, causal_off, qk_scale,
                   False, CAUSAL, HEAD_DIM, BLOCK_N, BLOCK_D, DOT_F32)
    dq = _dq_inner(dq, q, do, lse, delta, K_head, V_head,
                   stride_kt, stride_kd, stride_vt, stride_vd,
                   offs_m, mid, hi, Tk, causal_off, qk_scale,
                   True, CAUSAL, HEAD_DIM, BLOCK_N, BLOCK_D, DOT_F32)
    dq = dq * scale
    _store_block(DQ, dq, b, h, start_m, stride_dqb, stride_dqh, stride_dqt, stride_dqd, Tq, HEAD_DIM, BLOCK_M, BLOCK_D)


# --------------------------------------------------------------------------
# Host launchers
# --------------------------------------------------------------------------


def _block_d(head_dim):
    # tl.dot needs every dim >= 16.
    return max(16, triton.next_power_of_2(head_dim))


def _on_gpu(t):
    # Anything not on a GPU can only run under TRITON_INTERPRET=1.
    return t.device.type == "cuda"


def _dot_f32(q):
    # See _mma: a workaround for the interpreter's bf16 dot, a no-op on GPUs.
    return not _on_gpu(q) and q.dtype == torch.bfloat16


# Configs forced by block_configs(), in place of the tables' (and the interpreter's).
_forced: dict = {}


@contextlib.contextmanager
def block_configs(fwd=None, dkdv=None, dq=None):
    """Run the kernels with these (BLOCK_M, BLOCK_N, num_warps, num_stages) while inside; for the
    block-size search (``python -m fastcore.bench.tune_attention``). A fifth element True in ``fwd``
    takes the forward's TMA path (tensor descriptors, sm_90), which the tables do not use yet."""
    saved = dict(_forced)
    _forced.update({k: tuple(v) for k, v in (("fwd", fwd), ("dkdv", dkdv), ("dq", dq)) if v is not None})
    try:
        yield
    finally:
        _forced.clear()
        _forced.update(saved)


def _fwd_config(q, causal):
    if "fwd" in _forced:
        return _forced["fwd"]
    if not _on_gpu(q):
        return _INTERPRET_FWD
    return _FWD_CONFIGS[(_block_d(q.shape[-1]), causal, q.dtype)]


def _bwd_configs(q, causal):
    dkdv, dq = _INTERPRET_BWD if not _on_gpu(q) else _BWD_CONFIGS[(_block_d(q.shape[-1]), causal, q.dtype)]
    return _forced.get("dkdv", dkdv), _forced.get("dq", dq)


def _check_shapes(q, k, v):
    assert q.dim() == 4 and k.dim() == 4 and k.shape == v.shape
    assert q.shape[0] == k.shape[0] and q.shape[3] == k.shape[3]
    assert q.shape[1] % k.shape[1] == 0
    assert q.dtype == k.dtype == v.dtype
    assert q.shape[2] >= 1 and k.shape[2] >= 1


def attention_fwd(q, k, v, causal: bool, scale: float):
    """Forward attention: (o, lse).

    o is a new contiguous (B, Hq, Tq, D) tensor in q.dtype; lse is the fp32 (B, Hq, Tq)
    natural-log log-sum-exp of each row's scaled, masked scores (+inf for a row that sees
    no key).  q/k/v may have any strides.
    """
    _check_shapes(q, k, v)
    B, H, Tq, D = q.shape
    HKV, Tk = k.shape[1], k.shape[2]
    o = torch.empty((B, H, Tq, D), dtype=q.dtype, device=q.device)
    lse = torch.empty((B, H, Tq), dtype=torch.float32, device=q.device)
    block_m, block_n, num_warps, num_stages, *tma = _fwd_config(q, causal)
    tma = bool(tma and tma[0])
    if tma:
        why = _why_no_tma(q, k, v)
        if why and "fwd" in _forced:
            raise ValueError(f"attention: the TMA path needs {why}")
        tma = why is None  # a table entry falls back to the plain path for tensors it cannot describe
        if tma and q.is_cuda:
            # Device-side descriptors live in global memory; this replaces any allocator set before.
            triton.set_allocator(_descriptor_scratch)
    grid = (B * H, triton.cdiv(Tq, block_m))
    _attn_fwd_kernel[grid](
        q, k, v, o, lse,
        *q.stride(), *k.stride(), *v.stride(), *o.stride(),
        H, H // HKV, Tq, Tk, scale * _LOG2E,
        CAUSAL=causal, HEAD_DIM=D,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=_block_d(D), DOT_F32=_dot_f32(q), TMA=tma,
        num_warps=num_warps, num_stages=num_stages,
    )
    return o, lse


def _why_no_tma(*tensors):
    """What the forward's tensor descriptors need and these tensors lack, or None: a contiguous last
    dim and 16-byte aligned bases and strides (unchecked on the device: a bad one is read wrongly)."""
    for name, t in zip("qkv", tensors):
        size = t.element_size()
        if t.stride(-1) != 1 or t.data_ptr() % 16 or any(st * size % 16 for st in t.stride()[:-1]):
            return (f"a contiguous last dim and 16-byte aligned strides; {name} has strides {t.stride()} "
                    f"of {t.dtype}")
    return None


def _descriptor_scratch(size: int, alignment: int, stream):
    return torch.empty(size, dtype=torch.int8, device="cuda")


def attention_bwd(do, q, k, v, o, lse, causal: bool, scale: float, deterministic: bool = True):
    """Gradients of attention_fwd: (dq, dk, dv), new contiguous tensors shaped and typed like q, k, v.

    o and lse are attention_fwd's outputs; do may have any strides.  dk/dv of a kv head
    shared by several query heads (GQA/MQA) are the sums over those heads.  With
    deterministic=False the dK/dV kernel also adds each key block's share of dq into an fp32
    buffer with atomics, in no fixed order, and the dQ kernel (which recomputes the scores and dP)
    does not run: 5 matmuls per score tile instead of 7.
    """
    _check_shapes(q, k, v)
    assert do.shape == q.shape and o.shape == q.shape
    B, H, Tq, D = q.shape
    HKV, Tk = k.shape[1], k.shape[2]
    dev = q.device
    lse = lse.contiguous()
    block_d = _block_d(D)

    delta = torch.empty((B, H, Tq), dtype=torch.float32, device=dev)
    _attn_bwd_delta_kernel[(B * H, triton.cdiv(Tq, _DELTA_BLOCK_M))](
        o, do, delta, *o.stride(), *do.stride(), H, Tq,
        HEAD_DIM=D, BLOCK_M=_DELTA_BLOCK_M, BLOCK_D=block_d, num_warps=4,
    )

    dk = torch.empty((B, HKV, Tk, D), dtype=k.dtype, device=dev)
    dv = torch.empty((B, HKV, Tk, D), dtype=v.dtype, device=dev)
    (m1, n1, w1, s1), (m2, n2, w2, s2) = _bwd_configs(q, causal)
    qk_scale = scale * _LOG2E
    # The atomic path's fp32 sum; the deterministic one passes any tensor, unread.
    dq_sum = delta if deterministic else torch.zeros((B, H, Tq, D), dtype=torch.float32, device=dev)

    _attn_bwd_dkdv_kernel[(B * HKV, triton.cdiv(Tk, n1))](
        q, k, v, do, lse, delta, dk, dv, dq_sum,
        *q.stride(), *k.stride(), *v.stride(), *do.stride(), *dk.stride(), *dv.stride(),
        H, HKV, H // HKV, Tq, Tk, qk_scale, scale,
        CAUSAL=causal, HEAD_DIM=D, BLOCK_M=m1, BLOCK_N=n1, BLOCK_D=block_d, DOT_F32=_dot_f32(q),
        ATOMIC_DQ=not deterministic, num_warps=w1, num_stages=s1,
    )
    if not deterministic:
        return dq_sum.to(q.dtype), dk, dv
    dq = torch.empty((B, H, Tq, D), dtype=q.dtype, device=dev)
    _attn_bwd_dq_kernel[(B * H, triton.cdiv(Tq, m2))](
        q, k, v, do, lse, delta, dq,
        *q.stride(), *k.stride(), *v.stride(), *do.stride(), *dq.stride(),
        H, H // HKV, Tq, Tk, qk_scale, scale,
        CAUSAL=causal, HEAD_DIM=D, BLOCK_M=m2, BLOCK_N=n2, BLOCK_D=block_d, DOT_F32=_dot_f32(q),
        num_warps=w2, num_stages=s2,
    )
    return dq, dk, dv
