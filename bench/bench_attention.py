"""Attention: fastcore against PyTorch's SDPA (each backend that runs), torch.compile of the math
version, and flash-attn when importable.

    fastcore bench attention --device cuda

TFLOP/s use FlashAttention's count (``harness.attention_flops``). The floor is compute: at
bf16 an H100 SXM peaks near 990 dense TFLOP/s, and FlashAttention-2 reaches about 310 TFLOP/s
forward+backward at D=128, causal, 8k.
"""
from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F

import fastcore
from fastcore.bench.harness import Benchmark, Case, fastcore_providers, attention_flops, peer, register

TOKENS, HIDDEN = 16384, 2048  # batch x length and heads x head_dim, as in FlashAttention's benchmarks
GPU_LENGTHS = (512, 1024, 2048, 4096, 8192, 16384)
CPU_LENGTHS = (256, 1024)
MODES = ("fwd", "bwd", "fwd+bwd")


def providers(device: str) -> dict:
    out = fastcore_providers("attention", device, _fastcore)
    # The backward that adds dq up with atomics (deterministic=False), as SDPA's flash backward does.
    triton = out["fastcore-triton"]
    out["fastcore-triton-atomic"] = triton if isinstance(triton, str) else _fastcore("triton", deterministic=False)
    out["torch"] = _sdpa(None)
    for name in ("flash", "efficient", "cudnn"):
        out[f"torch-sdpa-{name}"] = _sdpa(name) if device == "cuda" else "SDPA's fused GPU backends run on GPU only"
    out["torch.compile"] = torch.compile(_math, dynamic=False)
    out["flash-attn"] = _flash_attn(device)
    return out


def _fastcore(backend, deterministic=True):
    return lambda q, k, v, causal: fastcore.attention(q, k, v, causal=causal, backend=backend,
                                                      deterministic=deterministic)


def _sdpa(name):
    """PyTorch's default dispatch, or one SDPA backend forced (a case it cannot run is skipped)."""
    def ctx():
        if name is None:
            return contextlib.nullcontext()
        from torch.nn.attention import SDPBackend, sdpa_kernel

        return sdpa_kernel({"flash": SDPBackend.FLASH_ATTENTION, "efficient": SDPBackend.EFFICIENT_ATTENTION,
                            "cudnn": SDPBackend.CUDNN_ATTENTION}[name])

    def fn(q, k, v, causal):
        with ctx():
            return F.scaled_dot_product_attention(q, k, v, is_causal=causal)
    return fn


def _math(q, k, v, causal):
    scores = q @ k.transpose(-1, -2) * q.shape[-1] ** -0.5
    if causal:
        t = q.shape[-2]
        scores = scores.masked_fill(torch.ones(t, t, dtype=torch.bool, device=q.device).triu(1), float("-inf"))
    return torch.softmax(scores.float(), dim=-1).to(q.dtype) @ v


def _flash_attn(device):
    if device != "cuda":
        return "flash-attn runs on GPU only"

    def load():
        from flash_attn import flash_attn_func

        # flash-attn takes (B, T, H, D): transposed views of the same tensors.
        return lambda q, k, v, causal: flash_attn_func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                                       causal=causal).transpose(1, 2)
    return peer("flash-attn", load)


def cases(device: str, quick: bool) -> list[Case]:
    if device == "cpu":
        # CPU attention is PyTorch's own kernel behind our checks; the full set shows their cost.
        if quick:
            return []
        return [Case((1, 8, t, 64), torch.float32, mode, size=t, tag="causal" if causal else "")
                for causal in (False, True) for t in CPU_LENGTHS for mode in MODES]
    lengths = (2048,) if quick else GPU_LENGTHS
    return [Case((TOKENS // t, HIDDEN // d, t, d), torch.bfloat16, mode, size=t, tag="causal" if causal else "")
            for d in (64, 128) for causal in (False, True) for t in lengths for mode in MODES]


def tensors(shape: tuple, dtype: torch.dtype, device: str, seed: int = 0) -> tuple:
    """q, k, v and the output gradient, (B, H, T, D) each, seeded (also for the block-size search)."""
    gen = torch.Generator(device=device).manual_seed(seed)
    return tuple(torch.randn(shape, device=device, dtype=dtype, generator=gen) for _ in range(4))


def setup(fn, case: Case, device: str):
    causal = case.tag == "causal"
    q, k, v, do = tensors(case.shape, case.dtype, device)
    leaves = [z.requires_grad_() for z in (q, k, v)]
    if case.mode == "fwd":
        def step():
            with torch.no_grad():
                return fn(q, k, v, causal)
    elif case.mode == "bwd":
        o = fn(q, k, v, causal)

        def step():
            return torch.autograd.grad(o, leaves, do, retain_graph=True)
    else:
        def step():
            return torch.autograd.grad(fn(q, k, v, causal), leaves, do)
    return step


def work(case: Case):
    b, h, t, d = case.shape
    return "flops", attention_flops(b, h, t, t, d, case.tag == "causal", case.mode)


register(Benchmark(op="attention", providers=providers, cases=cases, setup=setup, work=work,
                   size_name="sequence length (batch x length = 16k, hidden 2048)"))
