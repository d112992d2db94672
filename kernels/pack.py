"""Copy, scale and cast many tensors in one Triton launch: dst_t = DST(src_t * scale).

Data-parallel training packs gradients into a flat bucket (scaled by 1/world size, optionally narrowed
to bf16) and unpacks them. Program ``i`` reads (tensor, chunk) row ``i`` of ``chunks`` and the
tensor's source and destination addresses from ``meta``; see fastcore/ops/pack.py for the tables.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from fastcore.backends import triton_interpreting
from fastcore.kernels.rounding import store_rounded

BLOCK = 256 if triton_interpreting() else 1024
CHUNK = 2 * BLOCK if triton_interpreting() else 16 * BLOCK
NUM_WARPS = 4

_TL_DTYPES = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}


@triton.jit
def _pack_kernel(meta, chunks, scale, SRC: tl.constexpr, DST: tl.constexpr, CHUNK: tl.constexpr,
                 BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    t = tl.load(chunks + 2 * pid).to(tl.int64)
    start = tl.load(chunks + 2 * pid + 1).to(tl.int64) * CHUNK
    src = tl.load(meta + 3 * t).to(tl.pointer_type(SRC))
    dst = tl.load(meta + 3 * t + 1).to(tl.pointer_type(DST))
    numel = tl.load(meta + 3 * t + 2)
    for off in range(0, CHUNK, BLOCK):
        idx = start + off + tl.arange(0, BLOCK)
        mask = idx < numel
        x = tl.load(src + idx, mask=mask, other=0.0).to(tl.float32) * scale
        store_rounded(dst, idx, x, mask, DST)


def pack(meta: torch.Tensor, chunks: torch.Tensor, src_dtype: torch.dtype, dst_dtype: torch.dtype,
         scale: float) -> None:
    """Run the table (built with chunk size ``CHUNK``); writes every destination in place."""
    for name, dtype in (("source", src_dtype), ("destination", dst_dtype)):
        if dtype not in _TL_DTYPES:
            raise TypeError(f"pack: the triton backend takes float32, bfloat16 or float16 {name}s, got {dtype}")
    if chunks.shape[0]:
        _pack_kernel[(chunks.shape[0],)](meta, chunks, scale, SRC=_TL_DTYPES[src_dtype], DST=_TL_DTYPES[dst_dtype],
                                         CHUNK=CHUNK, BLOCK=BLOCK, num_warps=NUM_WARPS)
