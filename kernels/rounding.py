"""Rounding helpers shared by the Triton kernels."""
import triton
import triton.language as tl


@triton.jit
def bf16_bits(x):
    """fp32 -> bf16 bits, rounded to nearest even (NaN stays NaN). Explicit, because the interpreter's
    cast truncates: the tests must run the rounding the GPU runs."""
    u = x.to(tl.uint32, bitcast=True)
    rounded = (u + 0x7FFF + ((u >> 16) & 1)) >> 16
    return tl.where((u & 0x7FFFFFFF) > 0x7F800000, (u >> 16) | 0x40, rounded).to(tl.uint16)


@triton.jit
def store_rounded(ptr, offsets, x, mask, DTYPE: tl.constexpr):
    """Store fp32 ``x`` as DTYPE, rounded to nearest even on GPU and interpreter alike."""
    if DTYPE == tl.bfloat16:
        tl.store(ptr.to(tl.pointer_type(tl.uint16)) + offsets, bf16_bits(x), mask=mask)
    else:
        tl.store(ptr + offsets, x.to(DTYPE), mask=mask)
