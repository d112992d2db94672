"""LayerNorm and RMSNorm: every fastcore backend against PyTorch eager, torch.compile, apex and liger-kernel.

    fastcore bench layer_norm rms_norm [--quick] [--device cuda]

The floor is memory: forward reads x and writes y, backward reads x and dy and writes dx,
each once, plus the weight (and bias) and their gradients. At 4096 x 1024 fp32 that is 32 MiB
forward and 48 MiB backward; at the copy bandwidth of the machine the op cannot beat that.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

import fastcore
from fastcore.bench.harness import Benchmark, Case, fastcore_providers, peer, register

ROWS = 4096
HIDDEN = (256, 512, 1024, 2048, 4096, 8192, 16384)
QUICK_HIDDEN = (1024,)
DTYPES = (torch.float32, torch.bfloat16)
MODES = ("fwd", "bwd", "fwd+bwd")
EPS = 1e-5


def providers(op: str, device: str) -> dict:
    out = fastcore_providers(op, device, lambda backend: _fastcore(op, backend))
    # PyTorch's eager layer_norm is its fused kernel; rms_norm is fused only where aten has one.
    out["torch"] = _eager(op)
    out["torch.compile"] = torch.compile(_eager(op), dynamic=False)
    out["torch-fused"] = _torch_fused(op, device)
    out["apex"] = _apex(op, device)
    out["liger"] = _liger(op, device)
    return out


def _fastcore(op, backend):
    if op == "layer_norm":
        return lambda x, w, b: fastcore.layer_norm(x, w, b, EPS, backend=backend)
    return lambda x, w, b: fastcore.rms_norm(x, w, EPS, backend=backend)


def _eager(op):
    if op == "layer_norm":
        return lambda x, w, b: F.layer_norm(x, (x.shape[-1],), w, b, EPS)
    return lambda x, w, b: F.rms_norm(x, (x.shape[-1],), w, EPS)


def _torch_fused(op, device):
    if op == "layer_norm":
        return "the eager provider is PyTorch's fused layer_norm"
    if not hasattr(torch.ops.aten, "_fused_rms_norm"):
        return f"torch {torch.__version__} has no aten._fused_rms_norm"
    if device == "cpu":
        return "aten._fused_rms_norm is composite on CPU, the same ops as eager"
    return lambda x, w, b: torch.ops.aten._fused_rms_norm(x, [x.shape[-1]], w, EPS)[0]


def _apex(op, device):
    if device != "cuda":
        return "apex's fused norms run on GPU only"

    def load():
        from apex.normalization.fused_layer_norm import fused_layer_norm_affine, fused_rms_norm_affine

        if op == "layer_norm":
            return lambda x, w, b: fused_layer_norm_affine(x, w, b, (x.shape[-1],), EPS)
        return lambda x, w, b: fused_rms_norm_affine(x, w, (x.shape[-1],), EPS)
    return peer("apex", load)


def _liger(op, device):
    if device != "cuda":
        return "liger-kernel runs on GPU only"

    def load():
        if op == "layer_norm":
            from liger_kernel.ops.layer_norm import LigerLayerNormFunction

            return lambda x, w, b: LigerLayerNormFunction.apply(x, w, b, EPS)
        from liger_kernel.ops.rms_norm import LigerRMSNormFunction

        # offset 0, casting mode "llama", and not in place: in place would overwrite the shared dy.
        return lambda x, w, b: LigerRMSNormFunction.apply(x, w, EPS, 0.0, "llama", False)
    return peer("liger-kernel", load)


def cases(device: str, quick: bool) -> list[Case]:
    hidden = QUICK_HIDDEN if quick else HIDDEN
    return [Case((ROWS, n), dtype, mode, size=n) for dtype in DTYPES for n in hidden for mode in MODES]


def min_bytes(op: str, case: Case) -> int:
    rows, hidden = case.shape
    e = case.dtype.itemsize
    affine = 2 if op == "layer_norm" else 1
    fwd = (2 * rows + affine) * hidden * e        # read x, write y; read w (and b)
    bwd = (3 * rows + 1 + affine) * hidden * e    # read x and dy, write dx; read w, write dw (and db)
    return {"fwd": fwd, "bwd": bwd, "fwd+bwd": fwd + bwd}[case.mode]


def setup(op: str, fn, case: Case, device: str):
    """A step running ``case.mode`` of ``fn`` on inputs seeded alike for every provider."""
    rows, hidden = case.shape
    gen = torch.Generator(device=device).manual_seed(0)
    x, w, b, dy = (torch.randn(*shape, device=device, dtype=case.dtype, generator=gen)
                   for shape in ((rows, hidden), (hidden,), (hidden,), (rows, hidden)))
    if op == "rms_norm":
        b = None
    leaves = [t.requires_grad_() for t in (x, w, b) if t is not None]
    if case.mode == "fwd":
        def step():
            with torch.no_grad():
                return fn(x, w, b)
    elif case.mode == "bwd":
        y = fn(x, w, b)

        def step():
            return torch.autograd.grad(y, leaves, dy, retain_graph=True)
    else:
        def step():
            return torch.autograd.grad(fn(x, w, b), leaves, dy)
    return step


for _op in ("layer_norm", "rms_norm"):
    register(Benchmark(
        op=_op,
        providers=lambda device, op=_op: providers(op, device),
        cases=cases,
        setup=lambda fn, case, device, op=_op: setup(op, fn, case, device),
        work=lambda case, op=_op: ("bytes", min_bytes(op, case)),
        size_name="hidden size (4096 rows)",
    ))
