"""Fused AdamW: fastcore's backends against torch.optim.AdamW (foreach and fused), its compiled step,
and apex's FusedAdam when importable.

    fastcore bench adamw [--quick] [--device cuda]

The floor is memory: a step reads p, g, m and v and writes p, m and v, 28 bytes per fp32
parameter, once. GPT-2 small (124M parameters) moves 3.5 GB per step: about 1.1 ms at an H100's
~3 TB/s copy bandwidth; the 12M-parameter CPU list moves 330 MB, about 7 ms at the CI VM's ~50 GB/s.
Speedups (and so the gate) are over ``torch.optim.AdamW(fused=True)``, the fastest PyTorch has.
"""
from __future__ import annotations

import torch

from fastcore.bench.harness import Benchmark, Case, fastcore_providers, peer, register
from fastcore.optim import FusedAdamW

LR, WEIGHT_DECAY = 1e-3, 0.1
BYTES_PER_PARAM = 28  # fp32: read p, g, m, v; write p, m, v


def gpt2_small_shapes(d: int = 768, layers: int = 12, vocab: int = 50257, context: int = 1024) -> list[tuple]:
    """GPT-2 small's 148 parameter tensors (124M parameters, LM head tied to the embedding)."""
    shapes = [(vocab, d), (context, d)]
    for _ in range(layers):
        shapes += [(d,), (d,), (d, 3 * d), (3 * d,), (d, d), (d,), (d,), (d,), (d, 4 * d), (4 * d,), (4 * d, d), (d,)]
    return shapes + [(d,), (d,)]


def param_lists(device: str) -> dict[str, list[tuple]]:
    """The three lists: GPT-2 small's shapes, one large tensor, and 10k small tensors. On CPU the
    first two shrink to ~12M parameters (GPT-2 small's 148 tensors at width 256, vocab 8192)."""
    if device == "cpu":
        return {"gpt2-small-12m": gpt2_small_shapes(256, 12, 8192, 1024), "one-tensor": [(10_000_000,)],
                "10k-small": [(1000,)] * 10_000}
    return {"gpt2-small": gpt2_small_shapes(), "one-tensor": [(100_000_000,)], "10k-small": [(1000,)] * 10_000}


def providers(device: str) -> dict:
    out = fastcore_providers("adamw", device, lambda backend: lambda ps: FusedAdamW(
        ps, LR, weight_decay=WEIGHT_DECAY, backend=backend))
    out["torch"] = lambda ps: torch.optim.AdamW(ps, LR, weight_decay=WEIGHT_DECAY, foreach=True)
    out["torch-fused"] = lambda ps: torch.optim.AdamW(ps, LR, weight_decay=WEIGHT_DECAY, fused=True)
    out["torch.compile"] = _compiled
    out["apex"] = _apex(device)
    return out


class _compiled:
    """torch.optim.AdamW (foreach) with its step compiled, as PyTorch's compiled-optimizer recipe does."""

    MAX_TENSORS = 1000

    def __init__(self, ps):
        if len(ps) > self.MAX_TENSORS:
            # Inductor unrolls the foreach step over every tensor: 148 tensors compile in ~50 s on 2 cores.
            raise ValueError(f"compiling a step over {len(ps)} tensors takes too long to benchmark "
                             f"(limit {self.MAX_TENSORS})")
        self.opt = torch.optim.AdamW(ps, LR, weight_decay=WEIGHT_DECAY, foreach=True)
        self.step = torch.compile(self.opt.step, dynamic=False)


def _apex(device):
    if device != "cuda":
        return "apex's FusedAdam runs on GPU only"

    def load():
        from apex.optimizers import FusedAdam

        return lambda ps: FusedAdam(ps, LR, weight_decay=WEIGHT_DECAY, adam_w_mode=True)
    return peer("apex", load)


def cases(device: str, quick: bool) -> list[Case]:
    lists = param_lists(device)
    if quick:  # the CPU target: >= 1.0x torch fused on the 12M GPT-2 list
        lists = {name: shapes for name, shapes in lists.items() if name.startswith("gpt2")}
    return [Case((len(shapes), _numel(shapes)), torch.float32, "step", size=_numel(shapes), tag=name)
            for name, shapes in lists.items()]


def _numel(shapes) -> int:
    return sum(torch.Size(s).numel() for s in shapes)


def setup(make, case: Case, device: str):
    """An optimizer over freshly seeded parameters whose gradients stay set; each call is one step."""
    gen = torch.Generator(device=device).manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(s, device=device, generator=gen)) for s in param_lists(device)[case.tag]]
    for p in params:
        p.grad = torch.randn(p.shape, device=device, generator=gen)
    return make(params).step


def work(case: Case):
    return "bytes", BYTES_PER_PARAM * case.shape[1]


register(Benchmark(op="adamw", providers=providers, cases=cases, setup=setup, work=work,
                   size_name="parameters (fp32)", baseline="torch-fused"))
