"""Shared test protocol: the tolerance table, error metric, device/backend matrix and output poisoning."""
import os

import torch

# Triton runs on CPU only through its interpreter, which must be chosen before triton is imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

import fastcore  # noqa: E402
from fastcore.bench import harness  # noqa: E402

free_port = harness.free_port  # the tests' rendezvous ports, as the benchmarks take theirs

HAS_GPU = torch.cuda.is_available()

# Relative error ||out - ref|| / ||ref|| allowed per input dtype. Written once; never loosened.
TOLERANCE = {
    torch.float64: 1e-10,
    torch.float32: 1e-5,
    torch.bfloat16: 1e-2,
    torch.float16: 1e-2,
}


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.detach().double().cpu(), ref.detach().double().cpu()
    assert out.shape == ref.shape, f"shape {tuple(out.shape)} != reference {tuple(ref.shape)}"
    assert torch.isfinite(out).all(), "non-finite values in the output (an unwritten, poisoned element?)"
    denom = ref.norm().item()
    return (out - ref).norm().item() / (denom if denom > 0 else 1.0)


def assert_close(out: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype, what: str = "output"):
    err = rel_err(out, ref)
    assert err <= TOLERANCE[dtype], f"{what}: relative error {err:.3e} > {TOLERANCE[dtype]:.0e} ({dtype})"


def poison(*shapes_dtypes, device):
    """Fill freed memory of the output sizes with NaN, so that an element a kernel leaves
    unwritten shows up as NaN when the allocator hands the block back (reliable on CUDA's
    caching allocator; best effort on CPU malloc)."""
    junk = [torch.full(shape, float("nan"), dtype=dtype, device=device) for shape, dtype in shapes_dtypes]
    del junk


def device_backends(op: str):
    """(device, backend) pairs that can run here, excluding the reference itself."""
    pairs = [("cpu", b) for b in fastcore.available_backends(op, "cpu") if b != "reference"]
    if HAS_GPU:
        pairs += [("cuda", b) for b in fastcore.available_backends(op, "cuda") if b != "reference"]
    return pairs


@pytest.hookimpl(tryfirst=True)  # before `-m gpu` deselects
def pytest_collection_modifyitems(config, items):
    if HAS_GPU:
        # A case parametrized onto the GPU is a GPU test: `pytest -m gpu` runs every kernel on the
        # device against the reference, not only the tests written for the GPU alone.
        for item in items:
            callspec = getattr(item, "callspec", None)
            if callspec is not None and callspec.params.get("device") == "cuda":
                item.add_marker(pytest.mark.gpu)
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def without_key_bias(params: dict, suffix: str) -> dict:
    """``params`` with the key third of each fused-QKV bias (names ending in ``suffix``) cut out.
    Without rotary positions that slice's gradient is exactly zero (softmax ignores a per-query
    constant), so Adam(W) turns the rounding noise of two correct computations into full-size steps."""
    out = dict(params)
    for name, t in params.items():
        if name.endswith(suffix):
            c = t.numel() // 3
            out[name] = torch.cat((t[:c], t[2 * c:]))
    return out
