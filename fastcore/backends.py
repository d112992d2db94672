"""Which backend runs an op: availability checks, ``auto`` selection and clear refusals."""
from __future__ import annotations

import contextlib
import functools
import importlib.util
import os

import torch

BACKENDS = ("reference", "cpu", "triton", "cuda")

# Op name -> backends it implements.
OPS: dict[str, tuple[str, ...]] = {
    "layer_norm": BACKENDS,
    "rms_norm": BACKENDS,
    "attention": BACKENDS,
    "adamw": BACKENDS,
    "pack": BACKENDS,
}

# Ops whose `cpu` backend delegates to a PyTorch CPU kernel instead of the C++ extension.
CPU_DELEGATES: dict[str, str] = {"attention": "torch.nn.functional.scaled_dot_product_attention"}

# (op, backend) pairs that exist by name but have no kernel yet, with the reason.
NOT_YET: dict[tuple[str, str], str] = {
    ("attention", "cuda"): "fastcore has no CUDA C++ attention kernel yet; backend='triton' (auto's choice on GPU) runs it",
}

# Input dtypes each backend computes; the reference takes any floating dtype.
_LOW = (torch.float32, torch.float16, torch.bfloat16)
DTYPES: dict[str, tuple[torch.dtype, ...] | None] = {
    "reference": None,
    "cpu": _LOW + (torch.float64,),
    "triton": _LOW,
    "cuda": _LOW,
}

# `auto` takes the first available backend in this order, per device type.
# CPU: the C++ kernels beat PyTorch's CPU norms (`fastcore bench`, README); the
# float64 reference is the fallback when no compiler is present.
# CUDA: order to be confirmed by GPU measurements (bench/results/); Triton first.
AUTO_ORDER: dict[str, tuple[str, ...]] = {
    "cpu": ("cpu", "reference"),
    "cuda": ("triton", "cuda", "reference"),
}


@functools.lru_cache(maxsize=None)
def _triton_importable() -> bool:
    return importlib.util.find_spec("triton") is not None


def triton_interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _as_device(device) -> torch.device:
    if isinstance(device, torch.Tensor):
        return device.device
    return torch.device(device)


def why_unavailable(backend: str, device, dtype: torch.dtype | None = None, op: str | None = None) -> str | None:
    """None when ``backend`` can run on ``device`` (for ``dtype`` and ``op`` when given), else the reason it cannot."""
    from fastcore import extension

    device = _as_device(device)
    if (op, backend) in NOT_YET:
        return NOT_YET[op, backend]
    supported = DTYPES.get(backend)
    if dtype is not None and supported is not None and dtype not in supported:
        names = ", ".join(str(d).replace("torch.", "") for d in supported)
        return f"it computes {names}, not {str(dtype).replace('torch.', '')}"
    if backend == "reference":
        return None
    if backend == "cpu":
        if device.type != "cpu":
            return f"the 'cpu' backend runs on CPU tensors, got a {device.type} tensor"
        return None if op in CPU_DELEGATES else extension.why_unavailable()
    if backend == "triton":
        if not _triton_importable():
            return "triton is not installed (pip install triton; Linux x86-64 only)"
        if device.type == "cuda":
            return None if torch.cuda.is_available() else "no CUDA GPU is available"
        if device.type == "cpu":
            if triton_interpreting():
                return None
            return "triton needs a CUDA GPU; on CPU it runs only under TRITON_INTERPRET=1 (set before importing triton)"
        return f"triton does not run on {device.type} tensors"
    if backend == "cuda":
        if device.type != "cuda":
            return f"the 'cuda' backend runs on CUDA tensors, got a {device.type} tensor"
        if not torch.cuda.is_available():
            return "no CUDA GPU is available"
        reason = extension.why_unavailable()
        if reason is None and not extension.has_cuda():
            return extension.cuda_error() or ("the C++ extension builds without CUDA here (torch has no CUDA support, or no CUDA toolkit "
                    "with its headers was found: set CUDA_HOME)")
        return reason
    return f"unknown backend {backend!r}"


def available_backends(op: str, device="cpu", dtype: torch.dtype | None = None) -> list[str]:
    """The backends of ``op`` that can run on ``device`` (and ``dtype``), in ``auto``'s order of preference."""
    backends = _op_backends(op)
    device = _as_device(device)
    order = AUTO_ORDER.get(device.type, ("reference",))
    ranked = [b for b in order if b in backends] + [b for b in backends if b not in order]
    return [b for b in ranked if why_unavailable(b, device, dtype, op) is None]


@torch.compiler.assume_constant_result
def resolve_backend(op: str, backend: str, device, dtype: torch.dtype | None = None) -> str:
    """Turn ``backend`` (a name or ``"auto"``) into a backend that can run, or raise why not.

    torch.compile runs this once while tracing and keeps its answer as a constant.
    """
    backends = _op_backends(op)
    device = _as_device(device)
    if backend == "auto":
        from fastcore import extension

        for name in AUTO_ORDER.get(device.type, ("reference",)):
            if name in backends and why_unavailable(name, device, dtype, op) is None:
                if name in ("cpu", "cuda") and op not in CPU_DELEGATES and not extension.try_load():
                    continue  # the build failed; try_load warned once
                if name == "cuda" and not extension.has_cuda():
                    continue  # its CUDA kernels failed to build: the extension loaded for CPU alone
                return name
        return "reference"
    if not isinstance(backend, str) or backend not in BACKENDS:
        raise ValueError(f"{op}: unknown backend {backend!r}; expected 'auto' or one of {', '.join(BACKENDS)}")
    if backend not in backends:
        raise ValueError(f"{op}: backend {backend!r} is not implemented for this op; it has {', '.join(backends)}")
    reason = why_unavailable(backend, device, dtype, op)
    if reason is None and backend == "cuda":
        from fastcore import extension

        with contextlib.suppress(RuntimeError):  # a failed build is the reason below
            extension.load()  # its CUDA kernels may fail to build, leaving it for CPU alone
        reason = why_unavailable(backend, device, dtype, op)
    if reason is not None:
        raise RuntimeError(f"{op}: backend {backend!r} cannot run here: {reason}")
    return backend


def _op_backends(op: str) -> tuple[str, ...]:
    try:
        return OPS[op]
    except KeyError:
        raise ValueError(f"unknown op {op!r}; fastcore has {', '.join(sorted(OPS))}") from None


def triton_device(device: torch.device):
    """A context in which Triton launches on ``device``: it takes the current CUDA device, not its
    tensors', so tensors on another GPU would be read through the wrong one."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()
