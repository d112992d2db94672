"""The benchmark harness: a registry of per-op benchmarks, timing, derived figures, results rows.

An op's benchmark (``bench/bench_<op>.py``) registers a :class:`Benchmark`: its providers, its
cases and how to build one timed step. :func:`run` measures every runnable provider on every case,
round-robin on the same inputs, and yields one results row per (provider, case).
"""
from __future__ import annotations

import contextlib
import ctypes
import datetime
import functools
import importlib
import os
import platform
import re
import socket
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

MODES = ("fwd", "bwd", "fwd+bwd", "step")
MIN_REPEATS = 15
CPU_PASSES = 5
# Each module registers its benchmarks on import; later ops append theirs here.
BENCH_MODULES = ("fastcore.bench.bench_norm", "fastcore.bench.bench_attention", "fastcore.bench.bench_adamw",
                 "fastcore.bench.bench_data_parallel", "fastcore.bench.bench_train", "fastcore.bench.bench_patch")
EAGER = "torch"  # the provider fastcore speedups are measured against, unless a benchmark names another
RESULTS_FORMAT = 1  # bump when the results file changes shape


@dataclass(frozen=True)
class Case:
    """One input configuration: ``shape`` and ``dtype`` name it, ``size`` is its x on the plots."""

    shape: tuple[int, ...]
    dtype: torch.dtype
    mode: str
    size: int
    tag: str = ""  # extra words for the label, e.g. "causal"

    @property
    def label(self) -> str:
        dims = "x".join(str(d) for d in self.shape)
        tag = f" {self.tag}" if self.tag else ""
        return f"{dims} {str(self.dtype).removeprefix('torch.')}{tag} {self.mode}"


@dataclass(frozen=True)
class Benchmark:
    op: str
    # device -> {provider name: callable, or a string saying why it cannot run}
    providers: Callable[[str], dict]
    # (device, quick) -> cases
    cases: Callable[[str, bool], list]
    # (provider callable, case, device) -> a step that runs the case once and returns its outputs
    setup: Callable[[Callable, Case, str], Callable[[], object]]
    # case -> ("bytes", n): the fewest bytes the op must move; or ("flops", n)
    work: Callable[[Case], tuple]
    size_name: str = "size"
    baseline: str = EAGER  # the provider fastcore's speedups (and so the gate) are measured against


def step_from_provider(make: Callable, case: Case, device: str) -> Callable:
    """The setup of a benchmark whose providers build the whole step themselves: ``make(case, device)``."""
    return make(case, device)


def peer(name: str, load: Callable[[], Callable]) -> Callable | str:
    """A peer library's provider from ``load()``, or why it cannot run: not installed, or a build
    for another torch/CUDA that fails to import in some other way."""
    try:
        return load()
    except ModuleNotFoundError as exc:
        if exc.name and "." not in exc.name and exc.name.replace("_", "-") in name.replace("_", "-"):
            return f"{name} is not installed"
        return f"{name} does not import: {type(exc).__name__}: {exc}"
    except Exception as exc:  # e.g. ImportError: undefined symbol, from a build for another torch
        return f"{name} does not import: {type(exc).__name__}: {exc}"


def fastcore_providers(op: str, device: str, make: Callable[[str], Callable]) -> dict:
    """One provider per fastcore backend, ``make(backend)``, or the reason it is not timed."""
    import fastcore

    out = {}
    for backend in fastcore.BACKENDS:
        reason = fastcore.backends.why_unavailable(backend, device, op=op)
        if backend == "reference":
            reason = "the float64 ground truth, not a contender"
        elif backend == "triton" and device == "cpu" and reason is None:
            reason = "Triton on CPU runs only in its interpreter, a correctness tool"
        out[f"fastcore-{backend}"] = reason or make(backend)
    return out


_REGISTRY: dict[str, Benchmark] = {}


def register(bench: Benchmark) -> Benchmark:
    _REGISTRY[bench.op] = bench
    return bench


def unregister(op: str) -> None:
    _REGISTRY.pop(op, None)


def registered() -> dict[str, Benchmark]:
    for module in BENCH_MODULES:
        importlib.import_module(module)
    return dict(_REGISTRY)


def attention_flops(batch: int, heads: int, q_len: int, k_len: int, head_dim: int, causal: bool, mode: str) -> float:
    """FlashAttention's count: 4*B*H*Tq*Tk*D for the forward (two matmuls), halved when causal;
    the backward does 2.5 times the forward's work."""
    fwd = 4 * batch * heads * q_len * k_len * head_dim / (2 if causal else 1)
    return {"fwd": fwd, "bwd": 2.5 * fwd, "fwd+bwd": 3.5 * fwd}[mode]


# ---------------------------------------------------------------- timing
clock = time.perf_counter  # the CPU timer; tests substitute a fake one here


def time_cpu(steps: dict[str, Callable], repeats: int, warmup: int = 3,
             failed: dict[str, Exception] | None = None) -> dict[str, list[float]]:
    """Milliseconds per call, ``repeats`` samples each, taking the providers round-robin so that
    drift on a shared machine hits them alike. With ``failed``, a provider that raises is dropped
    from the rotation and its exception recorded there; without it, the exception propagates."""
    live = dict(steps)
    samples: dict[str, list[float]] = {name: [] for name in steps}
    for i in range(warmup + repeats):
        for name, step in list(live.items()):
            start = clock()
            try:
                step()
            except Exception as exc:
                if failed is None:
                    raise
                failed[name] = exc
                del live[name], samples[name]
                continue
            if i >= warmup:
                samples[name].append((clock() - start) * 1e3)
    return samples


def time_cuda(step: Callable) -> tuple[float, float]:
    """(median ms, interquartile range ms) from CUDA events; do_bench flushes L2 between calls.

    do_bench's windows are milliseconds, not calls: a 50 ms training step would get 1-3 samples in
    its default 100 ms. So the window is widened to at least MIN_REPEATS calls, timed from one call
    after a first that may compile."""
    import triton.testing

    step()
    torch.cuda.synchronize()
    start = time.perf_counter()
    step()
    torch.cuda.synchronize()
    once = (time.perf_counter() - start) * 1e3
    q25, q50, q75 = triton.testing.do_bench(step, warmup=max(25.0, 2 * once), rep=max(100.0, MIN_REPEATS * once),
                                            quantiles=[0.25, 0.5, 0.75])
    return q50, q75 - q25


def median_iqr(samples: list[float]) -> tuple[float, float]:
    q = statistics.quantiles(samples, n=4, method="inclusive")
    return statistics.median(samples), q[2] - q[0]


def peak_memory(step: Callable, device: str) -> int | None:
    """The most bytes one call holds at once on top of what was live before it (inputs excluded)."""
    if device == "cuda":
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        step()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - before
    # CPU has no allocator statistics; the profiler's allocation events give the timeline.
    from torch.profiler import ProfilerActivity, profile

    try:
        with _silence_stderr(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            step()
        events = prof.profiler.kineto_results.events()
    except (AttributeError, RuntimeError):
        return None
    allocs = sorted((e.start_ns(), e.nbytes()) for e in events if e.name() == "[memory]")
    live = peak = 0
    for _, nbytes in allocs:
        live += nbytes
        peak = max(peak, live)
    return peak


@contextlib.contextmanager
def _silence_stderr():
    """Kineto prints a line to fd 2 each time a profiler starts and stops; keep the table readable."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


# ---------------------------------------------------------------- machine
def _cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def _git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "describe", "--always", "--dirty", "--abbrev=10"], capture_output=True,
                             text=True, cwd=Path(__file__).parent, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


def device_slug(device: str, name: str | None = None, threads: int | None = None) -> str:
    """A file-name-safe machine class: ``nvidia-h100-80gb-hbm3`` or ``cpu-amd-epyc-2core``."""
    if device == "cuda":
        return re.sub(r"[^a-z0-9]+", "-", (name or torch.cuda.get_device_name(0)).lower()).strip("-")
    model = name or _cpu_model()
    model = re.sub(r"\((r|tm)\)|\bcpu\b|\bprocessor\b|@.*|\b\d+-core\b", " ", model, flags=re.I)
    model = re.sub(r"[^a-z0-9]+", "-", model.lower()).strip("-")
    return f"cpu-{model}-{threads or torch.get_num_threads()}core"


def machine(device: str) -> dict:
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    cpu = _cpu_model()
    name = torch.cuda.get_device_name(0) if device == "cuda" else cpu
    return {
        "device": name,
        "slug": device_slug(device, name),
        "cpu": cpu,
        "threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "triton": triton_version,
        "cuda": torch.version.cuda,
        "commit": _git_commit(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def copy_bandwidth(device: str) -> float:
    """GB/s of a large tensor copy (read + write): the practical floor of a memory-bound op."""
    numel = (256 if device == "cuda" else 32) << 20  # well past the last-level cache
    src = torch.randn(numel, device=device)
    dst = torch.empty_like(src)
    step = lambda: dst.copy_(src)  # noqa: E731
    ms = time_cuda(step)[0] if device == "cuda" else median_iqr(time_cpu({"copy": step}, MIN_REPEATS)["copy"])[0]
    return 2 * src.nbytes / (ms * 1e-3) / 1e9


def matmul_rate(device: str) -> float:
    """TFLOP/s of a large matmul in the compute dtype attention uses: the compute floor."""
    n, dtype = (8192, torch.bfloat16) if device == "cuda" else (2048, torch.float32)
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    step = lambda: a @ b  # noqa: E731
    ms = time_cuda(step)[0] if device == "cuda" else median_iqr(time_cpu({"mm": step}, MIN_REPEATS)["mm"])[0]
    return 2 * n**3 / (ms * 1e-3) / 1e12


def keep_freed_memory_in_the_heap() -> None:
    """Serve repeated large CPU allocations from glibc's heap instead of fresh mmap pages.

    Every provider allocates its outputs on each call; on small VMs the page faults of fresh
    pages (about 2.5 us each) dominate and swamp the kernels. Applies to all providers alike.
    """
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL("libc.so.6")
        # glibc caps the mmap threshold at 32 MiB on 64-bit unless it accepts more; mallopt says which.
        if not libc.mallopt(-3, 1 << 30):  # M_MMAP_THRESHOLD
            libc.mallopt(-3, 32 << 20)
        libc.mallopt(-1, (1 << 31) - 1)    # M_TRIM_THRESHOLD


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now, for a process group's rendezvous."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def park_openmp_workers() -> None:
    """Stop this process's idle OpenMP workers until its next parallel region.

    Under OMP_WAIT_POLICY=ACTIVE (set by ``fastcore bench``) they spin on a core each even when the
    process runs single-threaded, which a benchmark of several processes sharing the cores cannot afford.
    """
    pause = _omp_pause()
    if pause is not None:
        pause(1)  # omp_pause_soft


@functools.lru_cache(maxsize=1)
def _omp_pause():
    """omp_pause_resource_all of the libgomp torch loaded (wheels may ship it under a hashed name,
    else the system's), looked up once: parking runs inside timed steps. None without libgomp."""
    path = "libgomp.so.1"
    with contextlib.suppress(OSError), open("/proc/self/maps") as maps:
        path = next((p for p in (line.split()[-1] for line in maps) if os.path.basename(p).startswith("libgomp")), path)
    with contextlib.suppress(OSError, AttributeError):
        return ctypes.CDLL(path).omp_pause_resource_all
    return None


# ---------------------------------------------------------------- running
@dataclass
class Run:
    """What :func:`run` produced: rows as they were measured, and the providers it skipped."""

    device: str
    machine: dict
    rows: list = field(default_factory=list)
    skipped: list = field(default_factory=list)
    size_names: dict = field(default_factory=dict)
    interrupted: bool = False  # stopped before its last case: the rows are those it finished

    def to_json(self) -> dict:
        data = {"format": RESULTS_FORMAT, "machine": self.machine, "results": self.rows, "skipped": self.skipped,
                "size_names": self.size_names}
        return {**data, "interrupted": True} if self.interrupted else data


def _skip(run: Run, op: str, provider: str, reason: str, case: str | None = None) -> None:
    entry = {"op": op, "provider": provider, "reason": reason}
    if case is not None:
        entry["case"] = case
    run.skipped.append(entry)


def _failure(exc: Exception) -> str:
    return f"{type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else 'no detail'}"


def _setup(bench: Benchmark, case: Case, fns: dict, device: str, run: Run) -> dict:
    """provider -> step, each run once; a provider failing one case must not sink the others."""
    steps = {}
    for name, fn in fns.items():
        try:
            step = bench.setup(fn, case, device)
            step()  # compiles, builds and warms up outside the timed region
            steps[name] = step
        except Exception as exc:
            _skip(run, bench.op, name, f"failed: {_failure(exc)}", case.label)
    return steps


def _guarded(name: str, failed: dict, fn: Callable, *args):
    """``fn(*args)``, or None with the exception recorded under ``name`` in ``failed``."""
    try:
        return fn(*args)
    except Exception as exc:
        failed[name] = exc
        return None


def _runnable(bench: Benchmark, device: str, no_compile: bool, run: Run) -> dict:
    """The providers that can run; the others are recorded as skipped, with their reason."""
    fns = {}
    for name, fn in bench.providers(device).items():
        if no_compile and "compile" in name:
            fn = "skipped by --no-compile"
        if isinstance(fn, str):
            _skip(run, bench.op, name, fn)
        else:
            fns[name] = fn
    return fns


def check_args(ops: list[str] | None, device: str, repeats: int) -> list[str]:
    """The ops to run; ValueError naming the argument when one is wrong."""
    benches = registered()
    ops = list(dict.fromkeys(ops or benches))  # naming an op twice runs it once
    unknown = [op for op in ops if op not in benches]
    if unknown:
        raise ValueError(f"ops: unknown benchmark(s) {', '.join(unknown)}; registered: {', '.join(sorted(benches))}")
    if device not in ("cpu", "cuda"):
        raise ValueError(f"device: expected 'cpu' or 'cuda', got {device!r}")
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("device: 'cuda' was asked for, but no CUDA GPU is available")
    if device == "cpu" and repeats < MIN_REPEATS:
        raise ValueError(f"repeats: expected at least {MIN_REPEATS} on CPU (medians of fewer are noise), got {repeats}")
    return ops


def _compile_config():
    """Every case gets its own compiled graph: past dynamo's default of 8 recompiles per function it
    would quietly run eager and the `torch.compile` rows would measure eager. Should a limit still be
    hit, fail loudly, so that the provider is skipped with the reason instead."""
    import torch._dynamo.config as cfg

    wanted = {"recompile_limit": 1024, "accumulated_recompile_limit": 4096, "fail_on_recompile_limit_hit": True,
              "suppress_errors": False}  # a swallowed compile error would also run eager
    return cfg.patch(**{k: v for k, v in wanted.items() if hasattr(cfg, k)})


def run(ops: list[str] | None = None, *, device: str = "cpu", quick: bool = False, repeats: int = 25,
        no_compile: bool = False, on_row: Callable[[dict], None] | None = None,
        on_progress: Callable[[str], None] | None = None) -> Run:
    """Measure the registered benchmarks of ``ops`` (all when None) on ``device``.

    On CPU the repeats of every case are spread over CPU_PASSES passes through all the cases, so
    that each median samples the whole run rather than one second of a machine whose speed drifts.
    Rows are final, and reach ``on_row``, in the last pass; ``on_progress`` hears of the others.
    """
    ops = check_args(ops, device, repeats)
    benches = registered()
    if device == "cpu":
        keep_freed_memory_in_the_heap()
    result = Run(device, machine(device))
    plan = []  # (benchmark, case, providers)
    for op in ops:
        bench = benches[op]
        result.size_names[op] = bench.size_name
        fns = _runnable(bench, device, no_compile, result)
        cases = bench.cases(device, quick)
        labels = [case.label for case in cases]
        if len(set(labels)) != len(labels):
            raise ValueError(f"{op}: its cases must have distinct labels (the gate keys on them): {labels}")
        plan += [(bench, case, fns) for case in cases]
    try:
        _measure(plan, result, device, repeats, on_row, on_progress)
    except KeyboardInterrupt:  # a time limit (timeout -s INT): the rows measured so far are kept
        result.interrupted = True
    return result


def _measure(plan: list, result: Run, device: str, repeats: int, on_row: Callable[[dict], None] | None,
             on_progress: Callable[[str], None] | None) -> None:
    """Time every (benchmark, case, providers) of ``plan`` into ``result``."""
    passes = CPU_PASSES if device == "cpu" else 1
    samples: list[dict] = [{} for _ in plan]
    peaks: list[dict] = [{} for _ in plan]
    with _compile_config():
        for p in range(passes):
            if 0 < p < passes - 1 and on_progress:
                on_progress(f"pass {p + 1}/{passes}")
            for i, (bench, case, fns) in enumerate(plan):
                if p == 0 and passes > 1 and on_progress:  # the pass that compiles and builds
                    on_progress(f"pass 1/{passes}: {bench.op} {case.label}")
                steps = _setup(bench, case, fns if p == 0 else {n: fns[n] for n in samples[i]}, device, result)
                for name in set(samples[i]) - set(steps):  # failed in a later pass: no row from part of the samples
                    del samples[i][name]
                # A provider that fails while measured loses this case's row; the others keep theirs.
                failed: dict[str, Exception] = {}
                if device == "cuda":
                    on_gpu = {name: _guarded(name, failed, time_cuda, step) for name, step in steps.items()}
                else:
                    for name, s in time_cpu(steps, -(-repeats // passes), warmup=2, failed=failed).items():
                        samples[i].setdefault(name, []).extend(s)
                if p == 0:
                    peaks[i] = {name: _guarded(name, failed, peak_memory, step, device) for name, step in steps.items()
                                if name not in failed}
                # A step may report figures of its own (data parallel: the overlap fraction).
                extras = {name: _guarded(name, failed, step.extras) for name, step in steps.items()
                          if p == passes - 1 and hasattr(step, "extras") and name not in failed}
                for name, exc in failed.items():
                    _skip(result, bench.op, name, f"failed while measured: {_failure(exc)}", case.label)
                    samples[i].pop(name, None)
                    steps.pop(name)
                if device == "cuda":
                    timings = {name: (*on_gpu[name], None) for name in steps}
                else:
                    timings = {name: (*median_iqr(s), len(s)) for name, s in samples[i].items() if name in steps}
                if p == passes - 1:
                    for row in _rows(bench, case, timings, peaks[i], result, extras):
                        if on_row:
                            on_row(row)
                del steps  # free this case's inputs before the next case allocates its own


def _rows(bench: Benchmark, case: Case, timings: dict, peaks: dict, result: Run, extras: dict) -> list[dict]:
    kind, amount = bench.work(case)
    unit = "gbps" if kind == "bytes" else "tflops"
    floor_key = "copy_gbps" if unit == "gbps" else "matmul_tflops"
    if floor_key not in result.machine:
        result.machine[floor_key] = copy_bandwidth(result.device) if unit == "gbps" else matmul_rate(result.device)
    eager = timings.get(bench.baseline)
    rows = []
    for name, (median, iqr, repeats) in timings.items():
        rate = amount / (median * 1e-3) / (1e9 if unit == "gbps" else 1e12)
        row = {"op": bench.op, "provider": name, "case": case.label, "mode": case.mode,
               "shape": list(case.shape), "dtype": str(case.dtype).removeprefix("torch."), "size": case.size,
               "median_ms": median, "iqr_ms": iqr, "repeats": repeats, unit: rate, "floor_frac": rate / result.machine[floor_key],
               "peak_mem_bytes": peaks.get(name)}
        if name.startswith("fastcore-") and eager is not None:
            row["speedup"] = eager[0] / median
            row["speedup_over"] = bench.baseline
        row.update(extras.get(name, {}))
        if "tokens_per_step" in row:  # training: throughput and MFU from the same median as the speedup
            row["tokens_per_s"] = row["tokens_per_step"] / (median * 1e-3)
            peak = row.get("peak_flops")
            row["mfu"] = row["tokens_per_s"] * row["flops_per_token"] / peak if peak else None
        rows.append(row)
    result.rows += rows
    return rows


def fmt_bytes(n: int | None) -> str:
    if n is None:
        return "-"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)
