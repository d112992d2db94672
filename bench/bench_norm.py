"""Benchmark LayerNorm and RMSNorm: every fastcore backend against PyTorch eager, torch.compile and liger-kernel.

    python bench/bench_norm.py --quick                 # 4096 x 1024, fp32 and bf16
    python bench/bench_norm.py --device cuda --json bench/results/h100/norm.json

Reports the median time, the interquartile range, GB/s over the fewest bytes the op must
move (each input read once, each output written once) and, for fastcore, the speedup over
PyTorch eager measured on the same inputs in the same run.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

# OpenMP workers that sleep between kernels take milliseconds to wake on small VMs, which
# swamps fwd+bwd timings of every provider alike; spinning keeps them measuring kernels.
# Must be set before torch loads the OpenMP runtime.
os.environ.setdefault("OMP_WAIT_POLICY", "ACTIVE")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import fastcore  # noqa: E402

HIDDEN = [256, 512, 1024, 2048, 4096, 8192, 16384]
MODES = ["fwd", "bwd", "fwd+bwd"]


# ---------------------------------------------------------------- providers
def providers(op: str, device: str) -> dict:
    """name -> callable(x, w, b) -> y, or a string saying why it is skipped."""
    out = {}
    for backend in fastcore.available_backends(op, device):
        if backend == "reference":
            continue  # float64 ground truth, not a contender
        if backend == "triton" and device == "cpu":
            out["fastcore-triton"] = "skipped: the Triton interpreter is a correctness tool, not a CPU kernel"
            continue
        out[f"fastcore-{backend}"] = _fastcore(op, backend)
    torch_fn = _torch_eager(op)
    out["torch"] = torch_fn
    out["torch.compile"] = torch.compile(torch_fn, dynamic=False)
    out["liger"] = _liger(op, device)
    return out


def _fastcore(op, backend):
    if op == "layer_norm":
        return lambda x, w, b: fastcore.layer_norm(x, w, b, 1e-5, backend=backend)
    return lambda x, w, b: fastcore.rms_norm(x, w, 1e-5, backend=backend)


def _torch_eager(op):
    if op == "layer_norm":
        return lambda x, w, b: F.layer_norm(x, (x.shape[-1],), w, b, 1e-5)
    return lambda x, w, b: F.rms_norm(x, (x.shape[-1],), w, 1e-5)


def _liger(op, device):
    if device != "cuda":
        return "skipped: liger-kernel runs on GPU only"
    try:
        if op == "layer_norm":
            from liger_kernel.ops.layer_norm import LigerLayerNormFunction as Fn

            return lambda x, w, b: Fn.apply(x, w, b, 1e-5)
        from liger_kernel.ops.rms_norm import LigerRMSNormFunction as Fn

        return lambda x, w, b: Fn.apply(x, w, 1e-5)
    except ImportError:
        return "skipped: liger-kernel is not installed"


# ---------------------------------------------------------------- timing
def min_bytes(op: str, mode: str, rows: int, hidden: int, dtype: torch.dtype) -> int:
    e = torch.finfo(dtype).bits // 8
    params = (2 if op == "layer_norm" else 1) * hidden * e
    fwd = 2 * rows * hidden * e + params            # read x, write y, read w/b
    bwd = 3 * rows * hidden * e + 2 * params        # read x and dy, write dx; read w, write dw/db
    return {"fwd": fwd, "bwd": bwd, "fwd+bwd": fwd + bwd}[mode]


def make_step(fn, op, mode, rows, hidden, dtype, device):
    """A closure running one `mode` of `fn` on fixed inputs (the same inputs for every provider)."""
    gen = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(rows, hidden, device=device, dtype=dtype, generator=gen)
    w = torch.randn(hidden, device=device, dtype=dtype, generator=gen)
    b = torch.randn(hidden, device=device, dtype=dtype, generator=gen) if op == "layer_norm" else None
    dy = torch.randn(rows, hidden, device=device, dtype=dtype, generator=gen)
    leaves = [t.requires_grad_() for t in (x, w, b) if t is not None]
    if mode == "fwd":
        def step():
            with torch.no_grad():
                fn(x, w, b)
    elif mode == "bwd":
        y = fn(x, w, b)
        def step():
            torch.autograd.grad(y, leaves, dy, retain_graph=True)
    else:
        def step():
            torch.autograd.grad(fn(x, w, b), leaves, dy)
    step()  # compile / build outside the timed region
    return step


def measure(steps: dict, device: str, repeats: int) -> dict:
    """name -> (median ms, interquartile range ms, peak bytes or None).

    GPU: CUDA events via triton's do_bench, which flushes L2 between runs. CPU: the providers
    are timed round-robin, so drift on a shared machine hits them alike.
    """
    out = {}
    if device == "cuda":
        import triton.testing

        for name, step in steps.items():
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            qs = triton.testing.do_bench(step, warmup=25, rep=100, quantiles=[0.25, 0.5, 0.75])
            out[name] = (qs[1], qs[2] - qs[0], torch.cuda.max_memory_allocated())
        return out
    samples = {name: [] for name in steps}
    for _ in range(3):
        for step in steps.values():
            step()
    for _ in range(repeats):
        for name, step in steps.items():
            start = time.perf_counter()
            step()
            samples[name].append((time.perf_counter() - start) * 1e3)
    for name, ts in samples.items():
        q = statistics.quantiles(ts, n=4)
        out[name] = (statistics.median(ts), q[2] - q[0], None)
    return out


# ---------------------------------------------------------------- machine identity
def machine(device: str) -> dict:
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                cwd=Path(__file__).parent, timeout=10).stdout.strip() or None
    except OSError:
        commit = None
    cpu = platform.processor()
    try:
        cpu = next(l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return {
        "device": torch.cuda.get_device_name(0) if device == "cuda" else cpu,
        "cpu": cpu, "threads": torch.get_num_threads(),
        "torch": torch.__version__, "triton": triton_version, "cuda": torch.version.cuda,
        "commit": commit, "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def keep_freed_memory_in_the_heap() -> None:
    """Serve repeated large allocations from glibc's heap instead of fresh mmap pages.

    Every provider allocates its outputs each call; on small VMs the page faults of fresh
    pages dominate and swamp the kernels' times. Applies to all providers alike.
    """
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, 1 << 30)   # M_MMAP_THRESHOLD
        libc.mallopt(-1, (1 << 31) - 1)  # M_TRIM_THRESHOLD
    except (OSError, AttributeError):
        pass


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--ops", nargs="+", default=["layer_norm", "rms_norm"], choices=["layer_norm", "rms_norm"])
    parser.add_argument("--quick", action="store_true", help="4096 x 1024 only, fewer repeats")
    parser.add_argument("--rows", type=int, default=4096)
    parser.add_argument("--hidden", type=int, nargs="+", default=HIDDEN)
    parser.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"], choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--modes", nargs="+", default=MODES, choices=MODES)
    parser.add_argument("--repeats", type=int, default=25)
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile provider")
    parser.add_argument("--json", type=Path, help="write {machine, results} here")
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA GPU is available")
    if args.device == "cpu":
        keep_freed_memory_in_the_heap()
    hidden = [1024] if args.quick else args.hidden
    repeats = 15 if args.quick else args.repeats

    results = []
    print(f"{'op':<11}{'case':<24}{'mode':<9}{'provider':<17}{'median ms':>10}{'iqr':>8}{'GB/s':>8}{'speedup':>9}")
    for op in args.ops:
        provs = providers(op, args.device)
        if args.no_compile:
            provs["torch.compile"] = "skipped: --no-compile"
        for dtype_name in args.dtypes:
            dtype = getattr(torch, dtype_name)
            for n in hidden:
                for mode in args.modes:
                    case = f"{args.rows}x{n} {dtype_name}"
                    base = {"op": op, "case": case, "mode": mode, "shape": [args.rows, n], "dtype": dtype_name}
                    runnable = {name: fn for name, fn in provs.items() if not isinstance(fn, str)}
                    steps = {name: make_step(fn, op, mode, args.rows, n, dtype, args.device)
                             for name, fn in runnable.items()}
                    timings = measure(steps, args.device, repeats)
                    eager_ms = timings["torch"][0]
                    for name, fn in provs.items():
                        row = dict(base, provider=name)
                        if isinstance(fn, str):
                            results.append(dict(row, skipped=fn))
                            continue
                        median, iqr, peak = timings[name]
                        gbps = min_bytes(op, mode, args.rows, n, dtype) / (median * 1e-3) / 1e9
                        row.update(median_ms=median, iqr_ms=iqr, gbps=gbps, peak_mem_bytes=peak)
                        if name.startswith("fastcore"):
                            row["speedup"] = eager_ms / median
                        results.append(row)
                        speed = f"{row['speedup']:.2f}x" if "speedup" in row else ""
                        print(f"{op:<11}{case:<24}{mode:<9}{name:<17}{median:>10.3f}{iqr:>8.3f}{gbps:>8.1f}{speed:>9}",
                              flush=True)
    for name in {r["provider"]: r for r in results if "skipped" in r}.values():
        print(f"{name['provider']}: {name['skipped']}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"machine": machine(args.device), "results": results}, indent=1))
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
