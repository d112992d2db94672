"""LayerNorm and RMSNorm, forward and backward, as Triton kernels.

Both norms act on the last dim of a 2-D (M, N) input whose rows may be
strided (``stride(1) == 1``, any ``stride(0) >= N``).  All statistics are
kept in fp32 whatever the storage dtype; only the final store rounds down.

Forward (one program per row)
    Pass 1 reads the row block by block and builds its statistics.  For
    LayerNorm each block's mean and sum of squared deviations are merged
    into the running ones with Chan's parallel formula,
        delta = mean_b - mean,   n = n_a + n_b
        mean += delta * n_b / n
        m2   += m2_b + delta^2 * n_a * n_b / n
    which avoids the cancellation of E[x^2] - E[x]^2 for rows with a large
    mean.  RMSNorm only needs sum(x^2), which has no cancellation.
    Pass 2 reads the row again and writes y = xhat * w + b.  When the row
    fits in one block the second read is served from cache.

Backward
    With xhat = (x - mean) * rstd (or x * rstd) and wdy = w * dy,
        dx = rstd * (wdy - (xhat * c1 + c2)),
        c1 = mean_row(wdy * xhat),  c2 = mean_row(wdy)   (c2 = 0 for RMS)
        dw = sum_rows(dy * xhat),   db = sum_rows(dy).
    dx needs whole-row reductions (c1, c2) while dw/db need whole-column
    ones.  The main kernel runs on a fixed (G, C) grid: program (g, c) owns
    column block c and the rows g, g + G, g + 2G, ...; it writes dx for
    those rows and keeps its dw/db partial sums in registers, storing them
    once into a (G, N) fp32 buffer.  A second tiny kernel sums that buffer
    over G in a fixed order.  No atomics or locks are involved, so dw/db
    are bit-for-bit reproducible.
    If a row fits in one block (C == 1) c1/c2 come from the block already
    in registers, so x and dy are read exactly once.  Wider rows first run
    a per-row kernel that stores c1/c2 to small (M,) buffers, i.e. the
    backward makes two passes over x and dy, just like the forward.

Row offsets are formed in int64 so tensors with more than 2**31 elements
are addressed correctly; offsets inside a row stay int32.

Precision note: when wdy is nearly parallel to xhat (always true for N == 1)
the RMSNorm dx is a small difference, rstd * wdy * (1 - xhat^2) ~ eps / x^2.
fp32 maths cannot resolve it (nor can the fp32 rstd, since the backward
gets no eps), so at N == 1, eps = 1e-5 dx is only good to ~1e-3..2e-2
relative.  LayerNorm at N == 1 gives an exact zero.
"""

import torch
import triton
import triton.language as tl

# Widest block a program holds in registers; wider rows loop over blocks.
_MAX_BLOCK_N = 8192
# Column block of the kernel that reduces dw/db partials over row groups.
_REDUCE_BLOCK_N = 1024


# --------------------------------------------------------------------------
# Kernels
# --------------------------------------------------------------------------


@triton.jit
def _norm_fwd_kernel(
    X, Y, W, B, Mean, Rstd,
    stride_x_row, N, eps,
    IS_RMS: tl.constexpr, HAS_W: tl.constexpr, HAS_B: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    row = tl.cast(tl.program_id(0), tl.int64)
    x_row = X + row * stride_x_row
    y_row = Y + row * N
    cols = tl.arange(0, BLOCK_N)

    # Pass 1: row statistics.
    if IS_RMS:
        # Accumulate per lane and reduce once at the end: cheaper than a
        # tree reduction per block and no less accurate for a plain sum.
        sq = tl.zeros([BLOCK_N], dtype=tl.float32)
        for off in range(0, N, BLOCK_N):
            mask = off + cols < N
            x = tl.load(x_row + off + cols, mask=mask, other=0.0).to(tl.float32)
            sq += x * x
        var = tl.sum(sq, axis=0) / N
    else:
        mean = 0.0
        m2 = 0.0
        count = 0.0
        for off in range(0, N, BLOCK_N):
            mask = off + cols < N
            x = tl.load(x_row + off + cols, mask=mask, other=0.0).to(tl.float32)
            n_b = tl.sum(mask.to(tl.float32), axis=0)
            mean_b = tl.sum(x, axis=0) / n_b
            d = tl.where(mask, x - mean_b, 0.0)  # padded lanes must not count
            m2_b = tl.sum(d * d, axis=0)
            # Chan et al. merge of (count, mean, m2) with the block's stats.
            n = count + n_b
            delta = mean_b - mean
            mean += delta * (n_b / n)
            m2 += m2_b + delta * delta * (count * n_b / n)
            count = n
        var = m2 / N
        tl.store(Mean + row, mean)
    rstd = 1.0 / tl.sqrt(var + eps)
    tl.store(Rstd + row, rstd)

    # Pass 2: normalise, scale, shift.
    for off in range(0, N, BLOCK_N):
        mask = off + cols < N
        x = tl.load(x_row + off + cols, mask=mask, other=0.0).to(tl.float32)
        if IS_RMS:
            y = x * rstd
        else:
            y = (x - mean) * rstd
        if HAS_W:
            y = y * tl.load(W + off + cols, mask=mask, other=0.0).to(tl.float32)
        if HAS_B:
            y = y + tl.load(B + off + cols, mask=mask, other=0.0).to(tl.float32)
        tl.store(y_row + off + cols, y.to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _norm_bwd_row_coeffs_kernel(
    DY, X, W, Mean, Rstd, C1, C2,
    stride_dy_row, stride_x_row, N,
    IS_RMS: tl.constexpr, HAS_W: tl.constexpr, BLOCK_N: tl.constexpr,
):
    # Only used when a row spans several blocks: the main backward kernel
    # then sees one column block per program and cannot form c1/c2 itself.
    row = tl.cast(tl.program_id(0), tl.int64)
    x_row = X + row * stride_x_row
    dy_row = DY + row * stride_dy_row
    rstd = tl.load(Rstd + row)
    if not IS_RMS:
        mean = tl.load(Mean + row)
    cols = tl.arange(0, BLOCK_N)
    acc1 = tl.zeros([BLOCK_N], dtype=tl.float32)
    acc2 = tl.zeros([BLOCK_N], dtype=tl.float32)
    for off in range(0, N, BLOCK_N):
        mask = off + cols < N
        x = tl.load(x_row + off + cols, mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(dy_row + off + cols, mask=mask, other=0.0).to(tl.float32)
        if IS_RMS:
            xhat = x * rstd
        else:
            xhat = (x - mean) * rstd
        if HAS_W:
            wdy = dy * tl.load(W + off + cols, mask=mask, other=0.0).to(tl.float32)
        else:
            wdy = dy
        # Padded lanes have dy == 0, hence wdy == 0: no extra masking needed.
        acc1 += wdy * xhat
        acc2 += wdy
    tl.store(C1 + row, tl.sum(acc1, axis=0) / N)
    if not IS_RMS:
        tl.store(C2 + row, tl.sum(acc2, axis=0) / N)


@triton.jit
def _norm_bwd_kernel(
    DY, X, W, Mean, Rstd, C1, C2, DX, DW_part, DB_part,
    stride_dy_row, stride_x_row, M, N, G,
    IS_RMS: tl.constexpr, HAS_W: tl.constexpr, HAS_B: tl.constexpr,
    ROW_FITS: tl.constexpr, BLOCK_N: tl.constexpr,
):
    group = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = cols < N
    if HAS_W:
        w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
    dw = tl.zeros([BLOCK_N], dtype=tl.float32)
    db = tl.zeros([BLOCK_N], dtype=tl.float32)

    # Strided row assignment: every group gets rows whenever G <= M, and the
    # order in which a group visits its rows is fixed, so dw/db are too.
    for r in range(group, M, G):
        row = tl.cast(r, tl.int64)
        x = tl.load(X + row * stride_x_row + cols, mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(DY + row * stride_dy_row + cols, mask=mask, other=0.0).to(tl.float32)
        rstd = tl.load(Rstd + row)
        if IS_RMS:
            xhat = x * rstd
        else:
            xhat = (x - tl.load(Mean + row)) * rstd
        if HAS_W:
            wdy = w * dy
        else:
            wdy = dy
        # Padded lanes have dy == 0, so they add nothing to c1/c2 or dw/db.
        if ROW_FITS:
            c1 = tl.sum(wdy * xhat, axis=0) / N
            if not IS_RMS:
                c2 = tl.sum(wdy, axis=0) / N
        else:
            c1 = tl.load(C1 + row)
            if not IS_RMS:
                c2 = tl.load(C2 + row)
        if IS_RMS:
            dx = (wdy - xhat * c1) * rstd
        else:
            dx = (wdy - (xhat * c1 + c2)) * rstd
        tl.store(DX + row * N + cols, dx.to(DX.dtype.element_ty), mask=mask)
        if HAS_W:
            dw += dy * xhat
        if HAS_B:
            db += dy

    part = tl.cast(group, tl.int64) * N
    if HAS_W:
        tl.store(DW_part + part + cols, dw, mask=mask)
    if HAS_B:
        tl.store(DB_part + part + cols, db, mask=mask)


@triton.jit
def _sum_rows_kernel(P, Out, G, N, BLOCK_N: tl.constexpr):
    # Sums the (G, N) partial buffer over G, always in the order 0..G-1.
    cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = cols < N
    acc = tl.zeros([BLOCK_N], dtype=tl.float32)
    for g in range(0, G):
        acc += tl.load(P + tl.cast(g, tl.int64) * N + cols, mask=mask, other=0.0)
    tl.store(Out + cols, acc, mask=mask)


# --------------------------------------------------------------------------
# Host launchers
# --------------------------------------------------------------------------


def _block_n(n):
    return min(triton.next_power_of_2(n), _MAX_BLOCK_N)


def _num_warps(block_n):
    # Roughly 8-16 elements per thread; more warps for wider blocks keeps
    # register use per thread bounded.
    if block_n >= 8192:
        return 16
    if block_n >= 2048:
        return 8
    return 4


def _num_programs(device):
    # Target number of resident backward programs.  The interpreter runs
    # each program in Python, so keep it small there.
    if device.type == "cuda":
        return 2 * torch.cuda.get_device_properties(device).multi_processor_count
    return 4


def _check_rows(name, t):
    if t.dim() != 2:
        raise ValueError(f"{name} must be 2-D, got shape {tuple(t.shape)}")
    if t.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise TypeError(f"{name} must be float32/float16/bfloat16, got {t.dtype}")
    if t.shape[1] == 0:
        raise ValueError(f"{name}: the normalised dim must be non-empty")
    if t.stride(1) != 1 and t.shape[1] > 1:
        raise ValueError(f"{name} needs unit column stride, got strides {t.stride()}")


def _check_param(name, p, x):
    if p is None:
        return
    if p.shape != (x.shape[1],) or p.dtype != x.dtype or not p.is_contiguous():
        raise ValueError(f"{name} must be a contiguous ({x.shape[1]},) {x.dtype} tensor, "
                         f"got {tuple(p.shape)} {p.dtype}")


def _norm_fwd(x, weight, bias, eps, is_rms):
    _check_rows("x", x)
    _check_param("weight", weight, x)
    _check_param("bias", bias, x)
    M, N = x.shape
    y = torch.empty((M, N), dtype=x.dtype, device=x.device)
    mean = None if is_rms else torch.empty(M, dtype=torch.float32, device=x.device)
    rstd = torch.empty(M, dtype=torch.float32, device=x.device)
    if M == 0:
        return y, mean, rstd
    block_n = _block_n(N)
    # Unused pointer slots get any valid tensor; their constexpr flag is off.
    _norm_fwd_kernel[(M,)](
        x, y,
        weight if weight is not None else x,
        bias if bias is not None else x,
        mean if mean is not None else rstd,
        rstd,
        x.stride(0), N, eps,
        IS_RMS=is_rms, HAS_W=weight is not None, HAS_B=bias is not None,
        BLOCK_N=block_n, num_warps=_num_warps(block_n),
    )
    return y, mean, rstd


def _norm_bwd(dy, x, weight, mean, rstd, has_bias, is_rms):
    _check_rows("x", x)
    _check_rows("dy", dy)
    _check_param("weight", weight, x)
    if dy.shape != x.shape or dy.dtype != x.dtype:
        raise ValueError(f"dy must match x: got {tuple(dy.shape)} {dy.dtype}, "
                         f"x is {tuple(x.shape)} {x.dtype}")
    M, N = x.shape
    dev = x.device
    has_w = weight is not None
    dx = torch.empty((M, N), dtype=x.dtype, device=dev)
    if M == 0:
        dw = torch.zeros(N, dtype=torch.float32, device=dev) if has_w else None
        db = torch.zeros(N, dtype=torch.float32, device=dev) if has_bias else None
        return dx, dw, db

    block_n = _block_n(N)
    num_warps = _num_warps(block_n)
    n_col_blocks = triton.cdiv(N, block_n)
    row_fits = n_col_blocks == 1
    # Keep roughly _num_programs programs in flight in total; each one owns
    # a (G, N) partial row, so more groups also means a bigger final sum.
    G = max(1, min(M, _num_programs(dev) // n_col_blocks))

    c1 = c2 = rstd  # placeholders, never read when the row fits one block
    if not row_fits:
        c1 = torch.empty(M, dtype=torch.float32, device=dev)
        c2 = c1 if is_rms else torch.empty(M, dtype=torch.float32, device=dev)
        _norm_bwd_row_coeffs_kernel[(M,)](
            dy, x, weight if has_w else x, mean if mean is not None else rstd,
            rstd, c1, c2,
            dy.stride(0), x.stride(0), N,
            IS_RMS=is_rms, HAS_W=has_w, BLOCK_N=block_n, num_warps=num_warps,
        )

    dw_part = torch.empty((G, N), dtype=torch.float32, device=dev) if has_w else None
    db_part = torch.empty((G, N), dtype=torch.float32, device=dev) if has_bias else None
    _norm_bwd_kernel[(G, n_col_blocks)](
        dy, x, weight if has_w else x, mean if mean is not None else rstd,
        rstd, c1, c2, dx,
        dw_part if has_w else rstd, db_part if has_bias else rstd,
        dy.stride(0), x.stride(0), M, N, G,
        IS_RMS=is_rms, HAS_W=has_w, HAS_B=has_bias,
        ROW_FITS=row_fits, BLOCK_N=block_n, num_warps=num_warps,
    )

    def reduce(part):
        if part is None:
            return None
        out = torch.empty(N, dtype=torch.float32, device=dev)
        _sum_rows_kernel[(triton.cdiv(N, _REDUCE_BLOCK_N),)](
            part, out, G, N, BLOCK_N=_REDUCE_BLOCK_N, num_warps=4)
        return out

    return dx, reduce(dw_part), reduce(db_part)


def layer_norm_fwd(x, weight, bias, eps):
    """y = (x - mean) * rstd * weight + bias over the last dim of a 2-D x.

    Returns (y, mean, rstd): y is a new contiguous tensor in x.dtype, mean
    and rstd are fp32 (M,) tensors for the backward.
    """
    return _norm_fwd(x, weight, bias, eps, is_rms=False)


def layer_norm_bwd(dy, x, weight, mean, rstd, has_bias):
    """Gradients of layer_norm_fwd: (dx, dw, db).

    dx is in x.dtype; dw/db are fp32 (N,) (None without weight / bias).
    """
    return _norm_bwd(dy, x, weight, mean, rstd, has_bias, is_rms=False)


def rms_norm_fwd(x, weight, eps):
    """y = x * rstd * weight, rstd = 1 / sqrt(mean(x^2) + eps). Returns (y, rstd)."""
    y, _, rstd = _norm_fwd(x, weight, None, eps, is_rms=True)
    return y, rstd


def rms_norm_bwd(dy, x, weight, rstd):
    """Gradients of rms_norm_fwd: (dx, dw); dw is fp32 (N,) or None."""
    dx, dw, _ = _norm_bwd(dy, x, weight, None, rstd, False, is_rms=True)
    return dx, dw
