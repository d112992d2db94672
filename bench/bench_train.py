"""Training throughput: one optimizer step of the trainer's GPT with fastcore's kernels against the same
model from PyTorch's modules (``nn.LayerNorm``, SDPA, ``torch.optim.AdamW(fused=True)``), each eager and
under ``torch.compile``, on the same tokens in the same run.

    fastcore bench train [--device cuda]

One call is the trainer's step: forward (bf16 autocast on GPU, fp32 on CPU), backward, gradient clipping
at 1.0, AdamW (betas 0.9/0.95, lr 6e-4, weight decay 0.1 on matrices) and ``zero_grad``. Speedups (and so
the gate) are over the eager PyTorch model. The cases are ``gpt2-124m`` at 16 x 1024 tokens on GPU and
the ``small`` preset (byte vocabulary, 10.9M parameters) at 8 x 256 on CPU. Each row adds
``tokens_per_s`` and ``mfu`` (model FLOPs over the device's dense bf16 peak; null on CPU), from the
same median step time as the speedup, and ``first_step_s``: the first call, which for the compiled
providers is the compile.

The floor is compute: ``GPT.flops_per_token()`` = 6N + 6·L·C·T FLOPs per token (N without the
position table). GPT-2 124M at T=1024 does 6·123.7M + 6·12·768·1024 = 0.799 GFLOP per token; an
H100 SXM's 989 TFLOP/s dense bf16 peak gives 1.24M tokens/s at 100% MFU, so the target of 50% MFU
is 619k tokens/s: a 16 x 1024 step in 26.5 ms. ``small`` does 68.2 MFLOP per token, 140 GFLOP per
8 x 256 step: about 1.0 s at the ~140 GFLOP/s fp32 matmul rate of the 2-core CI VM (2,050 tokens/s).
There is no quick case: its four providers (two of them compiling) would add about 4 minutes to the CI gate.
"""
from __future__ import annotations

import contextlib
import functools
import time

import torch

import fastcore
from fastcore.bench.harness import Benchmark, Case, register
from fastcore.optim import FusedAdamW
from fastcore.train.loop import TrainConfig, param_groups, peak_flops
from fastcore.train.model import GPT, PRESETS, GPTConfig

LR, BETAS, WEIGHT_DECAY, GRAD_CLIP = 6e-4, (0.9, 0.95), 0.1, 1.0
VOCAB = {"tiny": 257, "small": 257, "gpt2-124m": 50257}  # the byte tokenizer's, GPT-2's BPE
# device -> (preset, batch): the sequence length is the preset's block_size.
CASES = {"cpu": ("small", 8), "cuda": ("gpt2-124m", 16)}
PROVIDERS = {"fastcore-eager": ("fastcore", False), "fastcore-compile": ("fastcore", True),
             "torch": ("torch", False), "torch.compile": ("torch", True)}
FASTCORE_OPS = ("layer_norm", "attention", "adamw")


def providers(device: str) -> dict:
    reason = _why_no_fastcore(device)
    return {name: reason if reason and kernels == "fastcore" else functools.partial(TrainStep, kernels, compiled)
            for name, (kernels, compiled) in PROVIDERS.items()}


def _why_no_fastcore(device: str) -> str | None:
    """A reason when one of the model's ops would fall back to the float64 reference here."""
    for op in FASTCORE_OPS:
        if fastcore.available_backends(op, device) in ([], ["reference"]):
            why = fastcore.backends.why_unavailable("cpu" if device == "cpu" else "cuda", device, op=op)
            return f"fastcore's {op} has only its float64 reference here ({why})"
    return None


def config(case: Case) -> GPTConfig:
    return TrainConfig(preset=case.tag, block_size=case.shape[1]).model_config(VOCAB[case.tag])


def cases(device: str, quick: bool) -> list[Case]:
    if quick:  # a step of `small` takes 1.3 s on 2 cores, each compile 25-35 s more
        return []
    preset, batch = CASES[device]
    t = PRESETS[preset]["block_size"]
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    return [Case((batch, t), dtype, "step", size=batch * t, tag=preset)]


class TrainStep:
    """A freshly seeded model, its optimizer and a fixed batch of random tokens; each call is one step."""

    def __init__(self, kernels: str, compiled: bool, case: Case, device: str):
        c = config(case)
        torch.manual_seed(0)
        self.raw = GPT(c, kernels=kernels).to(device)
        groups = param_groups(self.raw, WEIGHT_DECAY)
        if kernels == "fastcore":
            self.opt = FusedAdamW(groups, lr=LR, betas=BETAS)
        else:
            self.opt = torch.optim.AdamW(groups, lr=LR, betas=BETAS, fused=True)
        self.model = torch.compile(self.raw, dynamic=False) if compiled else self.raw
        gen = torch.Generator(device=device).manual_seed(1)
        self.x, self.y = torch.randint(c.vocab_size, (2, *case.shape), device=device, generator=gen)
        self.autocast = (torch.autocast("cuda", dtype=torch.bfloat16) if device == "cuda"
                         else contextlib.nullcontext())
        self.device, self.tokens = device, case.shape[0] * case.shape[1]
        self.flops_per_token = self.raw.flops_per_token()
        self.peak = peak_flops(torch.device(device), "bf16")
        self.first_step_s = None

    def __call__(self) -> torch.Tensor:
        if self.first_step_s is not None:
            return self.step()
        start = time.perf_counter()  # the first call: for the compiled providers, the compile
        loss = self.step()
        if self.device == "cuda":
            torch.cuda.synchronize()
        self.first_step_s = time.perf_counter() - start
        return loss

    def step(self) -> torch.Tensor:
        with self.autocast:
            _, loss = self.model(self.x, self.y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.raw.parameters(), GRAD_CLIP)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        return loss

    def extras(self) -> dict:
        # The harness turns these into tokens_per_s and mfu from the row's median.
        return {"first_step_s": self.first_step_s, "tokens_per_step": self.tokens,
                "flops_per_token": self.flops_per_token, "peak_flops": self.peak}


# On CPU the harness sets up every case once per pass; the steps are kept so that a compiled model
# compiles once, and so that its first call (the compile) stays in `first_step_s`.
_kept: dict = {}


def setup(make: functools.partial, case: Case, device: str):
    if device != "cpu":
        return make(case, device)
    key = (make, case.label)
    if key not in _kept:
        _kept[key] = make(case, device)
    return _kept[key]


def work(case: Case):
    with torch.device("meta"):
        flops_per_token = GPT(config(case)).flops_per_token()
    return "flops", flops_per_token * case.shape[0] * case.shape[1]


register(Benchmark(op="train", providers=providers, cases=cases, setup=setup, work=work,
                   size_name="tokens per step", baseline="torch"))
