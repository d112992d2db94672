"""Compile every Triton kernel of fastcore for a GPU, on a machine without one.

    python -m fastcore.bench.compile_check [--all] [--arch 90] [--json FILE]

The interpreter that runs the kernels on CPU checks what they compute, not whether they compile:
it accepts dot shapes, layouts and resource needs that the GPU compiler refuses. This runs each
kernel's host launcher on CPU tensors with Triton's driver replaced by one that only compiles (for
sm_<arch>, with Triton's own ptxas), so every kernel is built with the arguments, specialisation and
configs its launcher picks on a GPU. Nothing is launched.

For each kernel it prints registers, spilled bytes (ptxas) and shared memory. It fails when a kernel
does not compile or needs more shared memory than the architecture has (which only a launch would
otherwise show). Spills are reported, not failed: how much a config spills depends on the Triton
version. By default it compiles a quick set (the attention configs the trainer uses, and each
norm, AdamW and pack kernel); ``--all`` compiles every table entry of every kernel.

It takes over the process's Triton driver, and must run without TRITON_INTERPRET.
"""
from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Iterable, Iterator

import torch

from fastcore.backends import triton_interpreting
from fastcore.files import write_text_atomic

# Shared memory one block may opt into, in bytes (CUDA's per-architecture limits).
SHARED_LIMIT = {80: 163 * 1024, 86: 99 * 1024, 89: 99 * 1024, 90: 227 * 1024}
HEAD_DIMS = (16, 32, 64, 80, 96, 128, 256)
DTYPES = (torch.bfloat16, torch.float16, torch.float32)


_compiled: dict[int, list] = {}  # arch -> what _compile_only records


def _compile_only(arch: int) -> list:
    """Make Triton compile for sm_<arch> without a GPU, and compile instead of launching: the
    launchers' ``kernel[grid](...)`` then returns the compiled kernel. Returns the list that each
    compile is appended to, as (kernel name, compiled kernel or why it failed, seconds). Once per process."""
    if _compiled:
        if arch not in _compiled:
            raise RuntimeError(f"compile_check: this process already compiles for sm_{next(iter(_compiled))}")
        return _compiled[arch]
    import triton
    from triton.backends import DriverBase
    from triton.backends.compiler import GPUTarget
    from triton.runtime import driver
    from triton.runtime.jit import JITFunction

    class CompileOnly(DriverBase):
        @classmethod
        def is_active(cls):
            return False

        def get_current_target(self):
            return GPUTarget("cuda", arch, 32)

        def get_current_device(self):
            return 0

        def get_current_stream(self, device=None):
            return 0

        def get_active_torch_device(self):
            return torch.device("cpu")

        def get_device_interface(self):
            return None

        def get_benchmarker(self):
            return None

        def map_python_to_cpp_type(self, ty):
            return ty

    driver.set_active(CompileOnly())
    compiled = _compiled.setdefault(arch, [])
    run = JITFunction.run

    def compile_instead(self, *args, grid, warmup, **kwargs):
        start = time.perf_counter()
        try:
            kernel = run(self, *args, grid=grid, warmup=True, **kwargs)
        except Exception as exc:  # a compile error: recorded (as text: it holds compiler objects)
            compiled.append((self.__name__, _reason(exc), time.perf_counter() - start))
            raise
        compiled.append((self.__name__, kernel, time.perf_counter() - start))
        return kernel

    JITFunction.run = compile_instead
    # The attention launcher picks its configs (and the interpreter's workarounds) by the tensors'
    # device: here CPU tensors stand in for GPU ones.
    from fastcore.kernels import attention

    attention._on_gpu = lambda t: True
    triton.set_allocator(lambda size, alignment, stream: torch.empty(size, dtype=torch.int8))
    return compiled


def _reason(exc: BaseException) -> str:
    """The innermost cause of a failure, in one line: a CompilationError's own text is the source."""
    while exc.__cause__ is not None:
        exc = exc.__cause__
    lines = [line for line in str(exc).splitlines() if line.strip()]
    return f"{type(exc).__name__}: {lines[-1].strip()[:300] if lines else ''}"


def _ptxas_usage(ptx: str, arch: int) -> tuple[int | None, int | None]:
    """(registers, spill-store bytes) that ptxas reports for the kernel, or Nones without ptxas."""
    try:  # the ptxas Triton itself assembles with for this architecture
        from triton.backends.nvidia.compiler import get_ptxas

        ptxas = get_ptxas(arch).path
    except (ImportError, AttributeError, RuntimeError):
        return None, None
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "k.ptx"
        src.write_text(ptx)
        gpu = f"sm_{arch}a" if arch >= 90 else f"sm_{arch}"
        out = subprocess.run([ptxas, "-v", f"--gpu-name={gpu}", str(src), "-o", str(Path(tmp) / "k.o")],
                             capture_output=True, text=True)
    log = out.stdout + out.stderr
    regs = re.search(r"Used (\d+) registers", log)
    spill = re.search(r"(\d+) bytes spill stores", log)
    return (int(regs.group(1)) if regs else None), (int(spill.group(1)) if spill else None)


# ---------------------------------------------------------------- the launches


def _attention(head_dim: int, causal: bool, dtype: torch.dtype, tma: bool = False, deterministic: bool = True) -> None:
    from fastcore.kernels import attention as kernels

    # As the benchmark's: a length that is a multiple of 16 and as many kv heads as query heads, on
    # both of which Triton specialises (a GQA group of 1 drops dK/dV's loop over the group).
    q = torch.randn(2, 4, 256, head_dim, dtype=dtype)
    k = torch.randn(2, 4, 256, head_dim, dtype=dtype)
    # The TMA forward: the table's config, through tensor descriptors.
    tma_fwd = (*kernels._FWD_CONFIGS[(kernels._block_d(head_dim), causal, dtype)][:4], True) if tma else None
    with kernels.block_configs(fwd=tma_fwd):
        o, lse = kernels.attention_fwd(q, k, k, causal, head_dim ** -0.5)
        if not tma:
            kernels.attention_bwd(o, q, k, k, o, lse, causal, head_dim ** -0.5, deterministic)


def _norm(is_rms: bool, dtype: torch.dtype, hidden: int) -> None:
    from fastcore.kernels import norm as kernels

    x = torch.randn(4, hidden, dtype=dtype)
    w, b = torch.randn(hidden, dtype=dtype), torch.randn(hidden, dtype=dtype)
    if is_rms:
        _, rstd = kernels.rms_norm_fwd(x, w, 1e-6)
        kernels.rms_norm_bwd(x, x, w, rstd)
    else:
        _, mean, rstd = kernels.layer_norm_fwd(x, w, b, 1e-5)
        kernels.layer_norm_bwd(x, x, w, mean, rstd, True)


def _adamw(dtype: torch.dtype, master: bool, amsgrad: bool, scaler: bool) -> None:
    from fastcore.kernels import adamw as kernels

    meta, hparams, chunks = torch.zeros(1, 8, dtype=torch.int64), torch.zeros(1, 2, dtype=torch.float64), \
        torch.zeros(1, 2, dtype=torch.int32)
    scale = torch.ones(1) if scaler else None
    kernels.adamw_step(meta, hparams, chunks, dtype, beta1=0.9, beta2=0.95, eps=1e-8, amsgrad=amsgrad,
                       has_master=master, maximize=False, decoupled=True, grad_scale=scale,
                       found_inf=torch.zeros(1) if scaler else None)


def _pack(src: torch.dtype, dst: torch.dtype) -> None:
    from fastcore.kernels import pack as kernels

    kernels.pack(torch.zeros(1, 3, dtype=torch.int64), torch.zeros(1, 2, dtype=torch.int32), src, dst, 0.5)


def _name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def launches(everything: bool) -> Iterator[tuple[str, Callable[[], None]]]:
    """(case, launch) pairs: the quick set, or every table entry of every kernel."""
    attn = ([(d, c, dt) for dt in DTYPES for d in HEAD_DIMS for c in (False, True)] if everything
            else [(64, True, torch.bfloat16), (128, True, torch.bfloat16), (128, False, torch.bfloat16)])
    for d, causal, dt in attn:
        yield f"attention D={d} {'causal' if causal else 'full'} {_name(dt)}", lambda a=(d, causal, dt): _attention(*a)
    for d in (HEAD_DIMS if everything else (128,)):
        yield f"attention D={d} causal bfloat16 TMA fwd", lambda d=d: _attention(d, True, torch.bfloat16, tma=True)
        yield (f"attention D={d} causal bfloat16 atomic dq",
               lambda d=d: _attention(d, True, torch.bfloat16, deterministic=False))
    # Hidden sizes that take each block width and warp count, and rows wider than one block.
    for is_rms in (False, True):
        for dt in (DTYPES if everything else (torch.bfloat16,)):
            for hidden in ((768, 4096, 16384, 20000) if everything else (768, 20000)):
                yield (f"{'rms_norm' if is_rms else 'layer_norm'} hidden={hidden} {_name(dt)}",
                       lambda a=(is_rms, dt, hidden): _norm(*a))
    optims = ([(dt, m, a, s) for dt in DTYPES for m in (False, True) for a in (False, True) for s in (False, True)
               if dt != torch.float32 or not m] if everything
              else [(torch.float32, False, False, False), (torch.bfloat16, True, True, True)])
    for dt, master, amsgrad, scaler in optims:
        yield (f"adamw {_name(dt)}{' master' if master else ''}{' amsgrad' if amsgrad else ''}"
               f"{' grad-scaler' if scaler else ''}", lambda a=(dt, master, amsgrad, scaler): _adamw(*a))
    pairs = ([(s, d) for s in DTYPES for d in DTYPES] if everything
             else [(torch.float32, torch.float32), (torch.float32, torch.bfloat16), (torch.bfloat16, torch.float32)])
    for src, dst in pairs:
        yield f"pack {_name(src)} -> {_name(dst)}", lambda a=(src, dst): _pack(*a)


# ---------------------------------------------------------------- the check


def check(cases: Iterable[tuple[str, Callable[[], None]]], arch: int,
          log: Callable[[str], None] = print) -> list[dict]:
    """Compile each launch's kernels (``launches()``' pairs); one row per distinct kernel built, and
    one for each launch that failed, with "error"."""
    compiled = _compile_only(arch)
    rows, seen = [], set()
    for case, launch in cases:
        before = len(compiled)
        try:
            launch()
            failure = None
        except Exception as exc:
            failure = compiled[-1][1] if len(compiled) > before and isinstance(compiled[-1][1], str) else _reason(exc)
        for name, kernel, seconds in compiled[before:]:
            if isinstance(kernel, str):  # its failure is the launch's
                continue
            md = kernel.metadata
            if (name, md.hash) in seen:  # the same specialisation reached from another case
                continue
            seen.add((name, md.hash))
            regs, spill = _ptxas_usage(kernel.asm["ptx"], arch)
            row = {"case": case, "kernel": name, "num_warps": md.num_warps, "num_stages": md.num_stages,
                   "shared_bytes": md.shared, "registers": regs, "spill_bytes": spill,
                   "compile_s": round(seconds, 2)}
            if md.shared > SHARED_LIMIT[arch]:
                row["error"] = (f"needs {md.shared / 1024:.0f} KiB of shared memory; sm_{arch} has "
                                f"{SHARED_LIMIT[arch] // 1024} KiB")
            rows.append(row)
            log(_format(row))
        if failure is not None:
            row = {"case": case, "kernel": compiled[-1][0] if len(compiled) > before else None, "error": failure}
            rows.append(row)
            log(_format(row))
    return rows


def _format(row: dict) -> str:
    head = f"{row['case']:<42} {row['kernel'] or '?':<30}"
    if "registers" not in row:
        return f"{head} FAILED: {row['error']}"
    spill = "?" if row["spill_bytes"] is None else row["spill_bytes"]
    text = (f"{head} warps {row['num_warps']:>2} stages {row['num_stages']}  regs {row['registers'] or '?':>3}  "
            f"spill {spill:>4} B  shared {row['shared_bytes'] / 1024:6.1f} KiB  {row['compile_s']:5.1f} s")
    return text + (f"  FAILED: {row['error']}" if "error" in row else "")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m fastcore.bench.compile_check", description=__doc__.split("\n\n")[0])
    p.add_argument("--all", action="store_true", help="every table entry of every kernel (minutes), not the quick set")
    p.add_argument("--arch", type=int, choices=sorted(SHARED_LIMIT), default=90, help="compute capability x10 (90: H100/H200)")
    p.add_argument("--json", type=Path, help="write the rows here")
    a = p.parse_args(argv)
    if triton_interpreting():
        print("compile_check: TRITON_INTERPRET=1 makes the kernels interpreted; run it without", file=sys.stderr)
        return 2
    try:
        import triton
    except ImportError:
        print("compile_check: needs triton", file=sys.stderr)
        return 2
    if a.json is not None and not a.json.parent.is_dir():
        p.error(f"--json: {a.json.parent} is not a directory")
    print(f"Triton {triton.__version__}, compiling for sm_{a.arch} ({'every table entry' if a.all else 'quick set'})",
          flush=True)
    start = time.perf_counter()
    rows = check(launches(a.all), a.arch, log=lambda line: print(line, flush=True))
    failed = [r for r in rows if "error" in r]
    spilled = [r for r in rows if r.get("spill_bytes")]
    print(f"{len(rows) - len(failed)} kernels compiled, {len(failed)} failed, {len(spilled)} spill registers; "
          f"{time.perf_counter() - start:.0f} s")
    if a.json is not None:
        write_text_atomic(a.json, json.dumps({"triton": triton.__version__, "arch": a.arch, "rows": rows}, indent=1) + "\n")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
