"""Copy, scale and cast many tensors in one launch: ``dsts[i] = (srcs[i] * scale).to(dsts[i].dtype)``.

Data-parallel training packs gradients into a flat bucket (scaled by 1/world size, narrowed to
bf16/fp16 when compressing) and unpacks the reduced bucket into the gradients; each is one call.
Every backend reads one launch table: int64 ``(n, 3)`` rows of (source address, destination
address, numel), and int32 (tensor, chunk) rows, one per chunk.
"""
from __future__ import annotations

import math
import numbers
from typing import Sequence

import torch
from torch import Tensor

from fastcore import reference
from fastcore.backends import resolve_backend, triton_device, why_unavailable
from fastcore.ops import launch_table


@torch.no_grad()
def pack(srcs: Sequence[Tensor], dsts: Sequence[Tensor], scale: float = 1.0, *, backend: str = "auto") -> None:
    """Write ``srcs[i] * scale``, cast to the destination's dtype, into ``dsts[i]``, for every i.

    Pairs must have equal numel (shapes may differ: a gradient and a flat slice of a bucket). All
    sources share one dtype and device, all destinations share one dtype and that device, and
    destinations must be contiguous; non-contiguous sources are read through a contiguous copy.
    The maths is float32 (float64 when either side is float64), rounded once to nearest even.
    """
    _check(srcs, dsts, scale)
    pack_unchecked(srcs, dsts, scale, backend)


@torch.no_grad()
def pack_unchecked(srcs: Sequence[Tensor], dsts: Sequence[Tensor], scale: float = 1.0, backend: str = "auto") -> None:
    """``pack`` for callers that build valid arguments themselves (DataParallel, every step)."""
    if not srcs:
        return
    device, src_dtype, dst_dtype = srcs[0].device, srcs[0].dtype, dsts[0].dtype
    name = resolve_backend("pack", backend, device, src_dtype)
    if dst_dtype != src_dtype:
        if backend == "auto" and why_unavailable(name, device, dst_dtype, "pack") is not None:
            name = "reference"  # the fused backend takes the sources' dtype but not the destinations'
        else:
            resolve_backend("pack", name, device, dst_dtype)
    if name == "reference":
        reference.pack(srcs, dsts, scale)
        return
    # Kept alive until the kernel is queued. A negative view's memory holds the values negated.
    srcs = [s if s.is_contiguous() and not s.is_neg() else s.resolve_neg().contiguous() for s in srcs]
    numels = [s.numel() for s in srcs]
    chunk = launch_table.chunk_size("pack", name, device)
    meta = launch_table.table([launch_table.addresses(srcs, len(srcs)), launch_table.addresses(list(dsts), len(dsts)),
                               numels], device)
    chunks = launch_table.chunk_table(tuple(numels), chunk, device)
    if name == "triton":
        from fastcore.kernels import pack as kernels

        with triton_device(device):
            kernels.pack(meta, chunks, src_dtype, dst_dtype, float(scale))
    else:
        from fastcore import extension

        extension.load().pack(meta, chunks, chunk, src_dtype, dst_dtype, float(scale))


def _check(srcs, dsts, scale) -> None:
    for name, seq in (("srcs", srcs), ("dsts", dsts)):
        if not isinstance(seq, (list, tuple)):
            raise TypeError(f"pack: {name} must be a list or tuple of tensors, got {type(seq).__name__}")
    if len(srcs) != len(dsts):
        raise ValueError(f"pack: srcs has {len(srcs)} tensors but dsts has {len(dsts)}")
    if isinstance(scale, bool) or not isinstance(scale, numbers.Real) or not math.isfinite(scale):
        raise ValueError(f"pack: scale must be a finite number, got {scale!r}")
    for i, (s, d) in enumerate(zip(srcs, dsts)):
        for name, t in (("srcs", s), ("dsts", d)):
            if not isinstance(t, Tensor):
                raise TypeError(f"pack: {name}[{i}] must be a tensor, got {type(t).__name__}")
            if not t.is_floating_point():
                raise TypeError(f"pack: {name}[{i}] must be floating point, got {t.dtype}")
        if s.numel() != d.numel():
            raise ValueError(f"pack: srcs[{i}] has {s.numel()} elements but dsts[{i}] has {d.numel()}")
        if s.dtype != srcs[0].dtype or d.dtype != dsts[0].dtype:
            raise TypeError(f"pack: all srcs must share one dtype and all dsts another; pair {i} is "
                            f"{s.dtype} -> {d.dtype}, pair 0 is {srcs[0].dtype} -> {dsts[0].dtype}")
        if s.device != srcs[0].device or d.device != srcs[0].device:
            raise ValueError(f"pack: every tensor must be on {srcs[0].device}; pair {i} is on {s.device} -> {d.device}")
        for name, t in (("srcs", s), ("dsts", d)):
            if t.layout != torch.strided:
                raise ValueError(f"pack: {name}[{i}] must be a dense tensor, got layout {t.layout}")
        if not d.is_contiguous() or d.is_neg():
            raise ValueError(f"pack: dsts[{i}] must be contiguous and not a negative view "
                             "(it is written through its address)")
    launch_table.check_disjoint("pack", {"srcs": srcs}, {"dsts": dsts})
