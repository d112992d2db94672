"""pytest-benchmark suite for the CPU norm kernels, on the harness's quick cases.

    python -m pytest tests/bench --benchmark-autosave                       # record
    python -m pytest tests/bench --benchmark-compare --benchmark-compare-fail=median:25%

Each test times one provider (fastcore's `cpu` backend or PyTorch eager); fastcore's results are
then checked against the float64 reference, so a fast wrong kernel fails here too. (PyTorch's are
not: its CPU bf16 layer_norm weight gradient misses the reference by about 5% at 4096 rows.)
The CI gate on speedups is `fastcore bench compare`; this suite is for pytest-benchmark users.
"""
import pytest
import torch

pytest.importorskip("pytest_benchmark", reason="the pytest-benchmark plugin is not installed")

import fastcore  # noqa: E402
from fastcore import reference  # noqa: E402
from fastcore.bench import bench_norm, harness  # noqa: E402
from conftest import assert_close  # noqa: E402

PROVIDERS = ["fastcore-cpu", "torch"]
CASES = [(op, case) for op in ("layer_norm", "rms_norm") for case in bench_norm.cases("cpu", quick=True)]


def _reference(op):
    """The float64 reference, cast back to the input dtype so it slots in as a provider."""
    def fn(x, w, b):
        d = [None if t is None else t.double() for t in (x, w, b)]
        y = reference.layer_norm(*d, bench_norm.EPS) if op == "layer_norm" else reference.rms_norm(d[0], d[1], bench_norm.EPS)
        return y.to(x.dtype)
    return fn


@pytest.mark.skipif("cpu" not in fastcore.available_backends("layer_norm", "cpu"), reason="the C++ extension cannot build here")
@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("op,case", CASES, ids=[f"{op}-{c.label.replace(' ', '-')}" for op, c in CASES])
def test_norm_speed(benchmark, op, case, provider):
    fn = bench_norm.providers(op, "cpu")[provider]
    step = bench_norm.setup(op, fn, case, "cpu")
    benchmark.group = f"{op} {case.label}"
    benchmark.extra_info["bytes"] = bench_norm.min_bytes(op, case)
    out = benchmark.pedantic(step, rounds=harness.MIN_REPEATS, warmup_rounds=2)
    if provider == "torch":
        return
    want = bench_norm.setup(op, _reference(op), case, "cpu")()
    out, want = (out,) if torch.is_tensor(out) else out, (want,) if torch.is_tensor(want) else want
    assert len(out) == len(want)
    for i, (got, ref) in enumerate(zip(out, want)):
        assert_close(got, ref, case.dtype, f"{op} {case.label} {provider} output {i}")
