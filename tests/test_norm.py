"""LayerNorm and RMSNorm: every backend that can run, against the float64 reference."""
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import fastcore
from fastcore import reference
from conftest import assert_close, device_backends, poison

OPS = ["layer_norm", "rms_norm"]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]

# (shape, how the input is laid out). Hidden sizes cover 1, non-powers of two,
# just past the block sizes the kernels use (1024, 4096) and the wide-row loop (65537).
SHAPES = [
    ((1, 1), "contiguous"),
    ((3, 1), "contiguous"),
    ((7, 13), "contiguous"),
    ((5, 1000), "contiguous"),
    ((4, 1025), "contiguous"),
    ((2, 3, 257), "contiguous"),
    ((3, 4097), "contiguous"),
    ((2, 65537), "contiguous"),
    ((6, 100), "transposed"),   # a (B, T, H)-style permute: last dim not unit-stride
    ((5, 300), "row-sliced"),   # rows with a stride larger than the hidden size
]


def make_input(shape, layout, dtype, device):
    if layout == "transposed":
        base = torch.randn(shape[-1], *shape[:-1], dtype=torch.float32, device=device) * 3 + 0.5
        return base.to(dtype).movedim(0, -1)
    if layout == "row-sliced":
        base = torch.randn(*shape[:-1], shape[-1] + 37, dtype=torch.float32, device=device) * 3 + 0.5
        return base.to(dtype)[..., 3:3 + shape[-1]]
    return (torch.randn(shape, dtype=torch.float32, device=device) * 3 + 0.5).to(dtype)


def call(op, x, w, b, backend, eps):
    if op == "layer_norm":
        return fastcore.layer_norm(x, w, b, eps, backend=backend)
    return fastcore.rms_norm(x, w, eps, backend=backend)


def call_reference(op, x, w, b, eps):
    if op == "layer_norm":
        return reference.layer_norm(x, w, b, eps)
    return reference.rms_norm(x, w, eps)


def check_against_reference(op, device, backend, shape, layout, dtype, affine=(True, True), eps=1e-5):
    x = make_input(shape, layout, dtype, device).requires_grad_()
    n = shape[-1]
    if n <= (2 if op == "layer_norm" else 1):
        # Degenerate rows: xhat is fixed up to eps (1 element for RMSNorm, 2 for LayerNorm), so
        # dx ~ w*dy*eps*rstd^3 is pure cancellation in any float32 code unless eps is comparable
        # to the variance; pick such an eps so the test measures the kernel, not the cancellation.
        eps = 1.0
    w = (torch.randn(n, device=device) * 0.5 + 1).to(dtype).requires_grad_() if affine[0] else None
    b = (torch.randn(n, device=device) * 0.5).to(dtype).requires_grad_() if affine[1] and op == "layer_norm" else None
    dy = torch.randn(shape, device=device).to(dtype)

    poison((shape, dtype), device=device)
    out = call(op, x, w, b, backend, eps)
    assert out.dtype == dtype and out.shape == x.shape
    out.backward(dy)

    rx, rw, rb = (None if t is None else t.detach().double().requires_grad_() for t in (x, w, b))
    ref = call_reference(op, rx, rw, rb, eps)
    ref.backward(dy.double())

    assert_close(out, ref, dtype, f"{op} y")
    for name, got, want in (("dx", x, rx), ("dw", w, rw), ("db", b, rb)):
        if got is None:
            continue
        assert got.grad is not None and got.grad.dtype == got.dtype, f"{name}: missing or wrong dtype"
        assert_close(got.grad, want.grad, dtype, f"{op} {name}")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape,layout", SHAPES, ids=lambda v: str(v))
@pytest.mark.parametrize("device,backend", device_backends("layer_norm"))
@pytest.mark.parametrize("op", OPS)
def test_matches_reference(op, device, backend, shape, layout, dtype):
    check_against_reference(op, device, backend, shape, layout, dtype)


@pytest.mark.parametrize("affine", [(False, False), (True, False), (False, True)], ids=["none", "weight", "bias"])
@pytest.mark.parametrize("device,backend", device_backends("layer_norm"))
@pytest.mark.parametrize("op", OPS)
def test_without_weight_or_bias(op, device, backend, affine):
    check_against_reference(op, device, backend, (9, 130), "contiguous", torch.float32, affine=affine)


@pytest.mark.parametrize("negated", ["x", "weight", "dy"])
@pytest.mark.parametrize("device,backend", device_backends("layer_norm"))
@pytest.mark.parametrize("op", OPS)
def test_negative_views_are_read_as_their_values(op, device, backend, negated):
    """torch marks some tensors negated without changing their memory (x.conj().imag); the kernels
    read memory, so x, weight and dy must be taken as the values they show (one at a time: two
    negations would cancel)."""
    x, w, dy = (torch.randn(s, device=device) for s in ((6, 5), (5,), (6, 5)))
    neg = [(torch._neg_view(t.neg()) if name == negated else t.clone()).requires_grad_(name != "dy")
           for name, t in zip(("x", "weight", "dy"), (x, w, dy))]
    plain = [t.clone().requires_grad_(t is not dy) for t in (x, w, dy)]
    fn = getattr(fastcore, op)
    outs = [fn(a, b, backend=backend) for a, b, _ in (neg, plain)]
    want = getattr(reference, op)(x.double(), w.double())
    for out, (a, b, g) in zip(outs, (neg, plain)):
        assert_close(out, want.float(), torch.float32)
        out.backward(g)
    assert_close(neg[0].grad, plain[0].grad, torch.float32)
    assert_close(neg[1].grad, plain[1].grad, torch.float32)


@pytest.mark.parametrize("device,backend", device_backends("layer_norm"))
@pytest.mark.parametrize("op", OPS)
def test_large_offset_and_eps(op, device, backend):
    """Rows far from zero need two-pass statistics; a large eps must reach the kernel."""
    x = torch.randn(6, 300, device=device) + 100.0
    for eps in (1e-5, 0.5):
        out = call(op, x, None, None, backend, eps)
        assert_close(out, call_reference(op, x.double(), None, None, eps), torch.float32, f"{op} eps={eps}")


@pytest.mark.parametrize("device,backend", device_backends("layer_norm"))
@pytest.mark.parametrize("op", OPS)
def test_an_outlier_element_keeps_full_precision(op, device, backend):
    """An outlier channel (first in its row, or elsewhere) must not cancel the variance away:
    a one-pass E[x^2] - E[x]^2 shifted by the first element lost 5e-4 here."""
    torch.manual_seed(0)
    x = torch.randn(4, 4096, device=device)
    x[:2, 0] = 1000.0
    x[2:, 7] = 1000.0
    x.requires_grad_()
    w = (torch.randn(4096, device=device) * 0.5 + 1).requires_grad_()
    dy = torch.randn(4, 4096, device=device)
    out = call(op, x, w, None, backend, 1e-5)
    out.backward(dy)
    rx, rw = (t.detach().double().requires_grad_() for t in (x, w))
    ref = call_reference(op, rx, rw, None, 1e-5)
    ref.backward(dy.double())
    for name, got, want in (("y", out, ref), ("dx", x.grad, rx.grad), ("dw", w.grad, rw.grad)):
        assert_close(got, want, torch.float32, f"{op} {name}")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("device,backend", device_backends("layer_norm") + [("cpu", "reference")])
def test_rms_norm_default_eps_matches_torch(device, backend, dtype):
    """eps=None is PyTorch's default: float32's eps for 16-bit inputs, not finfo(x.dtype).eps."""
    x = (torch.randn(4, 64, device=device) * 1e-3).to(dtype)  # small enough that eps matters
    out = fastcore.rms_norm(x, backend=backend)
    expected = torch.nn.functional.rms_norm(x.double(), (64,), eps=torch.finfo(torch.float32).eps)
    assert_close(out, expected, dtype)
    assert_close(out, torch.nn.functional.rms_norm(x.float(), (64,)), dtype, "vs torch's own default")


@pytest.mark.parametrize("device,backend", device_backends("layer_norm"))
def test_weight_in_other_dtype(device, backend):
    """A float32 weight and bias on bfloat16 activations: cast to bf16 for the kernel, while their
    gradients are reduced in float32 and rounded once, to float32, so they keep float32 accuracy."""
    x = torch.randn(8, 96, device=device).to(torch.bfloat16).requires_grad_()
    w = torch.randn(96, device=device, requires_grad=True)
    b = torch.randn(96, device=device, requires_grad=True)
    dy = torch.randn(8, 96, device=device).to(torch.bfloat16)
    out = fastcore.layer_norm(x, w, b, backend=backend)
    out.backward(dy)
    assert out.dtype == torch.bfloat16 and w.grad.dtype == b.grad.dtype == torch.float32
    rw = w.detach().to(torch.bfloat16).double().requires_grad_()
    rb = b.detach().to(torch.bfloat16).double().requires_grad_()
    reference.layer_norm(x.detach().double(), rw, rb).backward(dy.double())
    assert_close(w.grad, rw.grad, torch.float32, "dw")
    assert_close(b.grad, rb.grad, torch.float32, "db")


@pytest.mark.parametrize("device,backend", device_backends("layer_norm"))
def test_empty_batch(device, backend):
    x = torch.randn(0, 3, 16, device=device, requires_grad=True)
    out = fastcore.layer_norm(x, torch.ones(16, device=device), backend=backend)
    assert out.shape == (0, 3, 16)
    out.sum().backward()
    assert x.grad.shape == x.shape
    for module in (fastcore.nn.LayerNorm((3, 16)), fastcore.nn.RMSNorm(16)):  # as torch's modules, also via patch()
        module.backend = backend
        assert module.to(device)(x).shape == (0, 3, 16)


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
@pytest.mark.parametrize("device,backend", device_backends("layer_norm"))
@pytest.mark.parametrize("op", OPS)
def test_double_backward_raises_instead_of_dropping_terms(op, device, backend, compiled):
    """A gradient penalty through the kernels' gradient must raise: it used to come back as a
    constant, and the penalty's term was silently missing from the weight's gradient."""
    x = torch.randn(4, 16, device=device, requires_grad=True)
    w = torch.randn(16, device=device, requires_grad=True)
    fn = (lambda a, b: call(op, a, b, None, backend, 1e-5))
    fn = torch.compile(fn, backend="aot_eager", fullgraph=True) if compiled else fn
    (gx,) = torch.autograd.grad(fn(x, w).pow(3).sum(), (x,), create_graph=True)
    message = "does not currently support double backward" if compiled else "layer_norm/rms_norm: no double backward"
    with pytest.raises(RuntimeError, match=message):
        torch.autograd.grad(fn(x, w).sum() + gx.pow(2).sum(), (w,))
    rx, rw = (t.detach().double().requires_grad_() for t in (x, w))  # the reference backend does it
    (rgx,) = torch.autograd.grad(call_reference(op, rx, rw, None, 1e-5).pow(3).sum(), (rx,), create_graph=True)
    assert torch.autograd.grad(call_reference(op, rx, rw, None, 1e-5).sum() + rgx.pow(2).sum(), (rw,))[0].abs().sum() > 0


@pytest.mark.parametrize("backend", [b for b in ("reference", "cpu") if b in fastcore.available_backends("layer_norm", "cpu")])
@pytest.mark.parametrize("op", OPS)
def test_gradcheck_float64(op, backend):
    x = torch.randn(4, 11, dtype=torch.float64, requires_grad=True)
    w = torch.randn(11, dtype=torch.float64, requires_grad=True)
    b = torch.randn(11, dtype=torch.float64, requires_grad=True)
    if op == "layer_norm":
        assert torch.autograd.gradcheck(lambda x, w, b: fastcore.layer_norm(x, w, b, backend=backend), (x, w, b))
    else:
        assert torch.autograd.gradcheck(lambda x, w: fastcore.rms_norm(x, w, 1e-6, backend=backend), (x, w))


@pytest.mark.parametrize("device,backend", device_backends("layer_norm"))
def test_weight_grads_are_deterministic(device, backend):
    x = torch.randn(257, 300, device=device, requires_grad=True)
    w = torch.randn(300, device=device, requires_grad=True)
    b = torch.randn(300, device=device, requires_grad=True)
    dy = torch.randn(257, 300, device=device)
    grads = []
    for _ in range(3):
        x.grad = w.grad = b.grad = None
        fastcore.layer_norm(x, w, b, backend=backend).backward(dy)
        grads.append((w.grad.clone(), b.grad.clone()))
    for gw, gb in grads[1:]:
        assert torch.equal(gw, grads[0][0]) and torch.equal(gb, grads[0][1])


def test_cpu_backend_results_do_not_depend_on_thread_count():
    if "cpu" not in fastcore.available_backends("layer_norm", "cpu"):
        pytest.skip("the C++ extension cannot be built here")
    x = torch.randn(300, 200, requires_grad=True)
    w = torch.randn(200, requires_grad=True)
    dy = torch.randn(300, 200)
    before = torch.get_num_threads()
    results = []
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            x.grad = w.grad = None
            y = fastcore.layer_norm(x, w, backend="cpu")
            y.backward(dy)
            results.append((y.detach(), x.grad.clone(), w.grad.clone()))
    finally:
        torch.set_num_threads(before)
    assert all(torch.equal(a, b) for a, b in zip(*results))


@pytest.mark.parametrize("op", OPS)
def test_cpu_backend_large_misaligned_output(op):
    """An 8.6 MB output (more than L2 holds) with 1025 columns, so most rows are misaligned."""
    if "cpu" not in fastcore.available_backends(op, "cpu"):
        pytest.skip("the C++ extension cannot be built here")
    check_against_reference(op, "cpu", "cpu", (2100, 1025), "contiguous", torch.float32)


@settings(max_examples=25, deadline=None)
@given(rows=st.integers(1, 40), hidden=st.integers(1, 700), dtype=st.sampled_from(DTYPES + [torch.float64]),
       op=st.sampled_from(OPS))
def test_cpu_backend_fuzzed_shapes(rows, hidden, dtype, op):
    if "cpu" not in fastcore.available_backends(op, "cpu"):
        pytest.skip("the C++ extension cannot be built here")
    check_against_reference(op, "cpu", "cpu", (rows, hidden), "contiguous", dtype)


# ---------------------------------------------------------------- GPU
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize("hidden", [768, 4096, 8192, 65536])
@pytest.mark.parametrize("backend", ["triton", "cuda"])
@pytest.mark.parametrize("op", OPS)
def test_gpu_large_shapes(op, backend, hidden, dtype):
    if backend not in fastcore.available_backends(op, "cuda"):
        pytest.fail(f"backend {backend} should run on this GPU machine: "
                    f"{fastcore.backends.why_unavailable(backend, 'cuda', dtype)}")
    rows = max(1, 2 ** 25 // hidden)
    check_against_reference(op, "cuda", backend, (rows, hidden), "contiguous", dtype)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_gpu_64bit_indexing(backend):
    """More than 2**31 elements: row offsets must not overflow 32-bit arithmetic."""
    rows, hidden = 2 ** 31 // 4096 + 3, 4096
    x = torch.randn(rows, hidden, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(hidden, device="cuda", dtype=torch.bfloat16)
    y = fastcore.layer_norm(x, w, backend=backend)
    tail = slice(rows - 5, rows)
    assert_close(y[tail], reference.layer_norm(x[tail].double(), w.double()), torch.bfloat16, "last rows")
