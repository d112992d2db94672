"""Search the attention kernels' block sizes on this GPU, for the tables in ``kernels/attention.py``.

    python -m fastcore.bench.tune_attention [--head-dims 64 128] [--causal both] [--lengths 1024 4096 16384]
                                            [--dtype bfloat16] [--json FILE]

For each head dim and causal flag it times every forward candidate, then every dK/dV candidate with
dQ at the table's config, then every dQ candidate with the best dK/dV. The shapes are the benchmark's:
batch x length = 16k tokens, hidden 2048 (``bench_attention``). A config's score is its geometric mean
TFLOP/s over the lengths. A candidate that does not compile or launch (shared memory, registers), or
whose output on a short odd-length sequence differs from the float64 reference, is skipped with its
reason. It prints the winners as table entries and writes every timing as JSON. One (head dim, causal)
pair compiles up to 84 kernels (the forward's twice on sm_90: plain and through TMA), so a per-call
time limit may need one head dim or one causal flag per call.
"""
from __future__ import annotations

import argparse
import itertools
import json
import math
import sys
import time
from pathlib import Path
from typing import Callable

import torch

from fastcore import reference
from fastcore.files import write_text_atomic
from fastcore.reference.attention import causal_keep
from fastcore.bench.bench_attention import HIDDEN, TOKENS, tensors
from fastcore.bench.harness import attention_flops, device_slug

KINDS = ("fwd", "dkdv", "dq")
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16}
TOLERANCE = 1e-2  # relative error of 16-bit results: the tests' bound for bf16 and fp16
CHECK_LENGTH = 257  # the correctness check's sequence: not a multiple of any block, and small for float64


# fp32 values a thread may keep live across a kernel's loop (accumulators and score tiles): of its 255
# registers the rest hold operands and addresses. Compiled ahead of time for sm_90 (Triton 3.9, the
# launchers' own arguments and specialisation, bf16), the candidates over this bound were those that
# spilled: 26 of 84 at head dim 128 and 8 of 84 at 64, all but two spills of 8-16 bytes, and the 6
# over it that did not spill used 246-255 registers.
MAX_LIVE_FP32 = 160


def live_fp32(kind: str, block_m: int, block_n: int, num_warps: int, head_dim: int) -> float:
    """fp32 values per thread that a config keeps live: the forward's output block and scores, dK/dV's
    two accumulators and two score tiles, dQ's accumulator and two score tiles."""
    from fastcore.kernels import attention as kernels

    d = kernels._block_d(head_dim)  # padded, as the kernels pad it
    held = {"fwd": block_m * (d + block_n), "dkdv": 2 * block_n * (d + block_m), "dq": block_m * (d + 2 * block_n)}
    return held[kind] / (32 * num_warps)


def candidates(kind: str, head_dim: int) -> list[tuple]:
    """(BLOCK_M, BLOCK_N, num_warps, num_stages) to try. The forward keeps a 128-row query block, dK/dV
    a long key block and dQ a long query block (see the tables); head dim 256 keeps to the smaller
    tiles that fit shared memory (its dK/dV table entry, 64 keys, spilled in the sm_90 compile; 32 did
    not), and configs that would spill registers (``live_fp32``) are left out.
    On sm_90 each forward config is also tried through TMA (a fifth element, True); those take more
    shared memory (each key loop keeps its own ring of tiles), so the long key blocks with deep
    pipelines are expected to be skipped as out of resources."""
    ms, ns, stages = {"fwd": ((64 if head_dim >= 256 else 128,), (32, 64, 128), (2, 3, 4)),
                      "dkdv": ((16, 32, 64), (32, 64) if head_dim >= 256 else (64, 128), (2, 3)),
                      "dq": ((64, 128), (16, 32, 64), (2, 3))}[kind]
    plain = [(m, n, warps, s) for m, n, warps, s in itertools.product(ms, ns, (4, 8), stages)
             if (head_dim < 256 or m * n <= 64 * 64) and live_fp32(kind, m, n, warps, head_dim) <= MAX_LIVE_FP32]
    hopper = torch.cuda.is_available() and torch.cuda.get_device_capability()[0] >= 9
    return plain + [(*c, True) for c in plain] if kind == "fwd" and hopper else plain  # and through TMA


def inputs(length: int, head_dim: int, dtype: torch.dtype, device: str, tokens: int = TOKENS,
           hidden: int = HIDDEN) -> tuple:
    return tensors((max(1, tokens // length), hidden // head_dim, length, head_dim), dtype, device, seed=length)


def run(kind: str, cfg: tuple, q, k, v, do, causal: bool) -> Callable[[], object]:
    """A call of one kernel family with ``cfg`` forced; the backward's inputs come from the table's forward."""
    from fastcore.kernels import attention as kernels

    scale = q.shape[-1] ** -0.5
    if kind == "fwd":
        def call():
            with kernels.block_configs(fwd=cfg):
                return kernels.attention_fwd(q, k, v, causal, scale)
        return call
    o, lse = kernels.attention_fwd(q, k, v, causal, scale)

    def call():
        with kernels.block_configs(**{kind: cfg}):
            return kernels.attention_bwd(do, q, k, v, o, lse, causal, scale)
    return call


def check(kind: str, out, q, k, v, do, causal: bool) -> str | None:
    """Why ``out`` (the forward's (o, lse), or the backward's (dq, dk, dv)) is wrong against the float64
    reference, or None. The inputs have as many key heads as query heads."""
    scale = q.shape[-1] ** -0.5
    leaves = [t.detach().double().requires_grad_() for t in (q, k, v)]
    o = reference.attention(*leaves, causal=causal, scale=scale)
    if kind == "fwd":
        scores = leaves[0] @ leaves[1].transpose(-1, -2) * scale
        if causal:
            scores = scores.masked_fill(~causal_keep(q.shape[-2], k.shape[-2], q.device), float("-inf"))
        names, want = ("o", "lse"), (o, torch.logsumexp(scores, dim=-1))
    else:
        names, want = ("dq", "dk", "dv"), torch.autograd.grad(o, leaves, do.double())
    for name, g, w in zip(names, out, want):
        err = ((g.double() - w).norm() / w.norm().clamp_min(1e-30)).item()
        if not err <= TOLERANCE:
            return f"{name}: relative error {err:.2e} > {TOLERANCE}"
    return None


def cuda_ms(fn: Callable) -> float:
    import triton.testing

    return triton.testing.do_bench(fn, warmup=10, rep=50)


def host_ms(fn: Callable) -> float:
    """For the interpreter (tests): median wall time of a few calls."""
    times = []
    for _ in range(3):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return sorted(times)[1]


def search(kind: str, head_dim: int, causal: bool, lengths: list[int], dtype: torch.dtype, device: str,
           cands: list[tuple], base: dict, timer: Callable = cuda_ms, check_length: int = CHECK_LENGTH,
           **shape) -> dict:
    """Every candidate of ``kind`` at every length, with the other kernels at ``base``'s configs:
    {"best": cfg or None, "tried": [{"config", "tflops" or "skipped"}]}."""
    from fastcore.kernels import attention as kernels

    sets = [inputs(t, head_dim, dtype, device, **shape) for t in lengths]
    small = inputs(check_length, head_dim, dtype, device, tokens=2 * check_length, hidden=2 * head_dim)
    mode = "fwd" if kind == "fwd" else "bwd"
    tried = []
    for cfg in cands:
        entry: dict = {"config": list(cfg)}
        try:
            with kernels.block_configs(**{k: v for k, v in base.items() if k != kind}):
                why = check(kind, run(kind, cfg, *small, causal)(), *small, causal)
                if why:
                    entry["skipped"] = why
                else:
                    rates = []
                    for (q, k, v, do), t in zip(sets, lengths):
                        ms = timer(run(kind, cfg, q, k, v, do, causal))
                        rates.append(attention_flops(q.shape[0], q.shape[1], t, t, head_dim, causal, mode) / ms / 1e9)
                    entry["tflops"] = rates
                    entry["score"] = math.exp(sum(map(math.log, rates)) / len(rates))
        except Exception as exc:  # out of shared memory or registers, a compile failure
            if "CUDA error" in str(exc):  # the context is lost: every later candidate would fail alike
                raise
            entry["skipped"] = f"{type(exc).__name__}: {str(exc)[:200]}"
        tried.append(entry)
        print(f"  {kind} {entry['config']}: " + (f"{entry['score']:.1f} TFLOP/s" if "score" in entry
                                                 else f"skipped ({entry['skipped']})"), flush=True)
    scored = [e for e in tried if "score" in e]
    best = tuple(max(scored, key=lambda e: e["score"])["config"]) if scored else None
    return {"best": best, "tried": tried}


def table(head_dim: int, causal: bool, dtype: torch.dtype, device: str) -> dict:
    """The configs the kernels use now for these inputs: the table's on a GPU, the interpreter's on CPU."""
    from fastcore.kernels import attention as kernels

    probe = torch.empty(1, 1, 1, head_dim, dtype=dtype, device=device)
    dkdv, dq = kernels._bwd_configs(probe, causal)
    return {"fwd": kernels._fwd_config(probe, causal), "dkdv": dkdv, "dq": dq}


def tune(head_dim: int, causal: bool, lengths: list[int], dtype: torch.dtype, device: str = "cuda",
         timer: Callable = cuda_ms, cands: Callable = candidates, **shape) -> dict:
    """The best forward, dK/dV and dQ configs for one (head dim, causal, dtype), each kind searched
    with the others at the best found so far (at first the table's, or the interpreter's); the
    table's own entry is always among the candidates."""
    base = table(head_dim, causal, dtype, device)
    out = {}
    for kind in KINDS:
        tried = [tuple(c) for c in cands(kind, head_dim)]
        tried = tried if tuple(base[kind]) in tried else [tuple(base[kind]), *tried]  # the table's entry competes
        out[kind] = search(kind, head_dim, causal, lengths, dtype, device, tried, base, timer, **shape)
        if out[kind]["best"] is not None:
            base[kind] = out[kind]["best"]
    out["table"] = {kind: list(base[kind]) for kind in KINDS}
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m fastcore.bench.tune_attention", description=__doc__.split("\n\n")[0])
    p.add_argument("--head-dims", type=int, nargs="+", default=[64, 128])
    p.add_argument("--causal", choices=["both", "yes", "no"], default="both")
    p.add_argument("--lengths", type=int, nargs="+", default=[1024, 4096, 16384])
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bfloat16")
    p.add_argument("--json", type=Path, help="every timing (default: bench/results/<device-slug>/attention-tune.json)")
    a = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("tune_attention: needs a CUDA GPU (block sizes are a property of the GPU)", file=sys.stderr)
        return 2
    bad = [d for d in a.head_dims if d not in (16, 32, 64, 80, 96, 128, 256)]
    if bad or any(t < 1 for t in a.lengths):
        p.error(f"head dims must be among 16, 32, 64, 80, 96, 128, 256 and lengths >= 1; got {a.head_dims}, {a.lengths}")
    flags = {"both": (False, True), "yes": (True,), "no": (False,)}[a.causal]
    path = a.json or Path("bench/results") / device_slug("cuda") / "attention-tune.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    results = []
    for head_dim, causal in itertools.product(a.head_dims, flags):
        print(f"D={head_dim} causal={causal} {a.dtype}:", flush=True)
        found = tune(head_dim, causal, a.lengths, DTYPES[a.dtype])
        results.append({"head_dim": head_dim, "causal": causal, "dtype": a.dtype, "lengths": a.lengths, **found})
        for kind in KINDS:
            best = max((e["score"] for e in found[kind]["tried"] if "score" in e), default=None)
            print(f"D={head_dim} causal={causal} {kind}: " + (f"{found['table'][kind]} at {best:.0f} TFLOP/s"
                  if best is not None else f"no candidate passed; the table's {found['table'][kind]} stays"), flush=True)
        # Written after each slice, so a run stopped by a time limit keeps what it finished.
        write_text_atomic(path, json.dumps({"device": torch.cuda.get_device_name(), "torch": torch.__version__,
                                            "results": results}, indent=1) + "\n")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
