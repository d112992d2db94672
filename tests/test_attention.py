"""Attention: every backend that can run, against the float64 reference."""
import math

import pytest
import torch

import fastcore
from fastcore import reference
from fastcore.reference.attention import causal_keep
from conftest import assert_close, device_backends

# (batch, q heads, kv heads, Tq, Tk, head dim, causal). Lengths off every block size, GQA, MQA,
# Tq < Tk and Tq > Tk (whose first queries see no key when causal), single tokens.
CASES = [
    (1, 2, 2, 17, 17, 32, False),
    (1, 2, 2, 17, 17, 32, True),
    (2, 4, 2, 100, 100, 64, True),    # GQA
    (1, 4, 1, 33, 57, 16, True),      # MQA, Tq < Tk
    (1, 2, 1, 40, 17, 64, True),      # Tq > Tk: 23 queries see nothing
    (1, 2, 2, 1, 1, 16, True),
    (1, 2, 2, 1, 100, 32, False),
    (1, 1, 1, 257, 257, 16, True),
    (2, 2, 2, 100, 37, 128, False),
]
# The Triton interpreter runs a few programs per second: a subset of the shapes above.
INTERPRETER_CASES = [CASES[i] for i in (1, 3, 4, 5)] + [(1, 2, 1, 20, 33, 32, False)]
HEAD_DIMS = (16, 32, 64, 80, 96, 128, 256)


def _pairs(cases):
    out = []
    for device, backend in device_backends("attention"):
        chosen = INTERPRETER_CASES if (backend == "triton" and device == "cpu") else cases
        out += [(device, backend, c) for c in chosen]
    return out


def make_qkv(b, hq, hkv, tq, tk, d, dtype, device, layout="contiguous"):
    def one(h, t):
        if layout == "transposed":  # a (B, T, H, D) projection viewed as (B, H, T, D)
            return torch.randn(b, t, h, d, device=device).to(dtype).transpose(1, 2)
        return torch.randn(b, h, t, d, device=device).to(dtype)
    return [one(hq, tq).requires_grad_(), one(hkv, tk).requires_grad_(), one(hkv, tk).requires_grad_()]


def check(device, backend, case, dtype=torch.float32, layout="contiguous", scale=None, deterministic=True):
    b, hq, hkv, tq, tk, d, causal = case
    q, k, v = make_qkv(b, hq, hkv, tq, tk, d, dtype, device, layout)
    check_inputs(q, k, v, backend, causal, scale, deterministic, f"{backend} {case} {dtype}")


def check_inputs(q, k, v, backend, causal=False, scale=None, deterministic=True, what="attention"):
    """Output and the gradients of q, k and v (leaves of q's dtype) against the float64 reference."""
    dtype = q.dtype
    out = fastcore.attention(q, k, v, causal=causal, scale=scale, backend=backend, deterministic=deterministic)
    assert out.shape == q.shape and out.dtype == dtype
    do = torch.randn_like(out)
    dq, dk, dv = torch.autograd.grad(out, (q, k, v), do)
    leaves = [t.detach().double().requires_grad_() for t in (q, k, v)]
    ref = reference.attention(*leaves, causal=causal, scale=scale)
    rq, rk, rv = torch.autograd.grad(ref, leaves, do.double())
    assert_close(out, ref, dtype, f"{what} out")
    for name, got, want in (("dq", dq, rq), ("dk", dk, rk), ("dv", dv, rv)):
        assert got.shape == want.shape and got.dtype == dtype, f"{what} {name}: shape or dtype"
        assert_close(got, want, dtype, f"{what} {name}")


@pytest.mark.parametrize("device,backend,case", _pairs(CASES))
def test_matches_reference(device, backend, case):
    check(device, backend, case)


@pytest.mark.parametrize("device,backend", device_backends("attention"))
@pytest.mark.parametrize("d", HEAD_DIMS)
def test_head_dims(device, backend, d):
    check(device, backend, (1, 2, 1, 19, 23, d, True))


@pytest.mark.parametrize("device,backend", device_backends("attention"))
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision(device, backend, dtype):
    check(device, backend, (1, 4, 2, 37, 37, 64, True), dtype)
    check(device, backend, (1, 2, 2, 20, 45, 32, False), dtype)


@pytest.mark.parametrize("device,backend", device_backends("attention"))
def test_non_contiguous_inputs_and_custom_scale(device, backend):
    check(device, backend, (2, 4, 2, 21, 21, 32, True), layout="transposed")
    check(device, backend, (1, 2, 2, 18, 30, 64, False), scale=0.3)


@pytest.mark.parametrize("device,backend", device_backends("attention"))
@pytest.mark.parametrize("case,dtype", [
    ((2, 4, 2, 100, 100, 64, True), torch.float32),     # GQA: two query heads add into each dq
    ((1, 4, 1, 33, 57, 16, True), torch.bfloat16),      # MQA, Tq < Tk
    ((1, 2, 1, 40, 17, 80, True), torch.float32),       # Tq > Tk (rows that see nothing), padded head dim
    ((1, 2, 2, 20, 45, 32, False), torch.float16),
])
def test_nondeterministic_backward_matches_reference(device, backend, case, dtype):
    """deterministic=False: the triton backward adds dq up with atomics from the dK/dV kernel."""
    if backend == "triton" and device == "cpu" and case[3] == 100:
        case = (1, 4, 2, 37, 37, 64, True)  # the interpreter runs a few programs per second
    check(device, backend, case, dtype, deterministic=False)


@pytest.mark.parametrize("device,backend", [p for p in device_backends("attention") if p[1] == "triton"])
def test_nondeterministic_backward_with_very_negative_scores_in_fp16(device, backend):
    """Every score near -22, so exp(-lse) overflows fp16: the padded keys of a partial key block must
    not turn that into NaN in dq (non-causal, Tk not a multiple of any key block)."""
    gen = torch.Generator(device=device).manual_seed(0)
    q = (2 + 0.1 * torch.randn(1, 2, 20, 32, device=device, generator=gen)).half().requires_grad_()
    k = (-2 + 0.1 * torch.randn(1, 2, 45, 32, device=device, generator=gen)).half().requires_grad_()
    v = torch.randn(1, 2, 45, 32, device=device, generator=gen).half().requires_grad_()
    check_inputs(q, k, v, backend, deterministic=False, what="atomic, scores near -22")


@pytest.mark.parametrize("device,backend", [p for p in device_backends("attention") if p[1] == "triton"])
def test_nondeterministic_backward_skips_the_dq_kernel(device, backend, monkeypatch):
    from fastcore.kernels import attention as kernels

    class NotLaunched:
        def __getitem__(self, grid):
            raise AssertionError("the dQ kernel was launched on the atomic path")
    monkeypatch.setattr(kernels, "_attn_bwd_dq_kernel", NotLaunched())
    check(device, backend, (1, 2, 1, 19, 23, 16, True), deterministic=False)


def test_reference_against_the_definition():
    """The reference itself, element by element, for a bottom-right causal mask with Tq > Tk."""
    torch.manual_seed(0)
    q, k, v = torch.randn(1, 2, 5, 16), torch.randn(1, 1, 3, 16), torch.randn(1, 1, 3, 16)
    out = reference.attention(q, k, v, causal=True)
    for h in range(2):
        for i in range(5):
            seen = [j for j in range(3) if j <= i + (3 - 5)]
            if not seen:
                assert out[0, h, i].abs().max() == 0
                continue
            s = torch.tensor([q[0, h, i].double() @ k[0, 0, j].double() / 4.0 for j in seen])
            p = torch.softmax(s, 0)
            want = sum(p[n] * v[0, 0, j].double() for n, j in enumerate(seen))
            assert torch.allclose(out[0, h, i].double(), want, atol=1e-6)
    assert causal_keep(3, 3).equal(torch.ones(3, 3, dtype=torch.bool).tril())


@pytest.mark.parametrize("device,backend", device_backends("attention"))
def test_fully_masked_rows_have_zero_finite_gradients(device, backend):
    q, k, v = make_qkv(1, 2, 2, 6, 2, 16, torch.float32, device)
    out = fastcore.attention(q, k, v, causal=True, backend=backend)
    out.sum().backward()
    assert out[:, :, :4].abs().max() == 0 and torch.isfinite(q.grad).all()
    assert q.grad[:, :, :4].abs().max() == 0


@pytest.mark.parametrize("device,backend", device_backends("attention"))
def test_stride_zero_output_gradient(device, backend):
    """out.sum() hands the backward an expanded (stride-0) gradient; the kernels read it as is."""
    q, k, v = make_qkv(1, 4, 2, 19, 23, 32, torch.float32, device)
    fastcore.attention(q, k, v, causal=True, backend=backend).sum().backward()
    leaves = [t.detach().double().requires_grad_() for t in (q, k, v)]
    reference.attention(*leaves, causal=True).sum().backward()
    for got, want in zip((q, k, v), leaves):
        assert_close(got.grad, want.grad, torch.float32, f"{backend} stride-0 do")


def test_gradcheck_float64_cpu():
    q, k, v = (t.double().detach().requires_grad_() for t in make_qkv(1, 2, 1, 5, 7, 16, torch.float32, "cpu"))
    for causal in (False, True):
        assert torch.autograd.gradcheck(lambda a, b, c: fastcore.attention(a, b, c, causal=causal, backend="cpu"),
                                        (q, k, v))


def test_numpy_bool_causal():
    import numpy as np

    q, k, v = make_qkv(1, 2, 2, 5, 5, 16, torch.float32, "cpu")
    assert torch.equal(fastcore.attention(q, k, v, causal=np.bool_(True)), fastcore.attention(q, k, v, causal=True))


def test_auto_and_availability():
    assert fastcore.available_backends("attention", "cpu")[0] == "cpu"
    q, k, v = make_qkv(1, 2, 2, 4, 4, 16, torch.float32, "cpu")
    with pytest.raises(RuntimeError, match="no CUDA C.. attention kernel yet"):
        fastcore.attention(q, k, v, backend="cuda")
    # The cpu backend delegates to PyTorch's SDPA: it needs no compiler.
    assert fastcore.backends.why_unavailable("cpu", "cpu", op="attention") is None


@pytest.mark.parametrize("device,backend", device_backends("attention"))
def test_torch_compile_fullgraph_with_backward(device, backend):
    q, k, v = make_qkv(1, 4, 2, 9, 13, 32, torch.float32, device)
    fn = torch.compile(lambda a, b, c: fastcore.attention(a, b, c, causal=True, backend=backend), fullgraph=True,
                       backend="aot_eager")
    out = fn(q, k, v)
    grads = torch.autograd.grad(out.square().sum(), (q, k, v))
    leaves = [t.detach().double().requires_grad_() for t in (q, k, v)]
    ref = reference.attention(*leaves, causal=True)
    want = torch.autograd.grad(ref.square().sum(), leaves)
    assert_close(out, ref, torch.float32, "compiled")
    for got, w in zip(grads, want):
        assert_close(got, w, torch.float32, "compiled grad")


@pytest.mark.parametrize("device,backend", device_backends("attention"))
def test_autocast_casts_the_inputs_as_sdpa_does(device, backend):
    """Under autocast, fp32 and mixed-dtype inputs run in the autocast dtype (bf16), as SDPA's do;
    the gradients come back in each input's own dtype."""
    q, k, v = make_qkv(1, 2, 1, 9, 13, 32, torch.float32, device)
    v = v.detach().to(torch.bfloat16).requires_grad_()
    with torch.autocast(device, torch.bfloat16):
        out = fastcore.attention(q, k, v, causal=True, backend=backend)
        sdpa = torch.nn.functional.scaled_dot_product_attention(q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1),
                                                                 is_causal=True)
    assert out.dtype == sdpa.dtype == torch.bfloat16
    want = fastcore.attention(*(t.detach().to(torch.bfloat16) for t in (q, k, v)), causal=True, backend=backend)
    assert torch.equal(out, want)
    dq, dk, dv = torch.autograd.grad(out.float().sum(), (q, k, v))
    assert (dq.dtype, dk.dtype, dv.dtype) == (torch.float32, torch.float32, torch.bfloat16)
    leaves = [t.detach().double().requires_grad_() for t in (q, k, v)]
    ref = reference.attention(*leaves, causal=True)
    assert_close(out, ref, torch.bfloat16, f"{backend} autocast out")
    for got, w in zip((dq, dk, dv), torch.autograd.grad(ref.sum(), leaves)):
        assert_close(got, w, torch.bfloat16, f"{backend} autocast grad")


@pytest.mark.parametrize("device,backend", [p for p in device_backends("attention") if p[1] == "triton"])
def test_triton_double_backward_is_refused_clearly(device, backend):
    q, k, v = make_qkv(1, 2, 2, 5, 5, 16, torch.float32, device)
    out = fastcore.attention(q, k, v, backend=backend)
    (dq,) = torch.autograd.grad(out.square().sum(), (q,), create_graph=True)
    with pytest.raises(RuntimeError, match="triton backend has no double backward.*backend='reference'"):
        torch.autograd.grad(dq.sum(), (q,))


@pytest.mark.parametrize("kwargs,exc,match", [
    (dict(k=torch.randn(1, 2, 8, 32), v=torch.randn(1, 2, 8, 32)), ValueError, "same head dim"),
    (dict(q=torch.randn(1, 3, 8, 16)), ValueError, r"q's heads \(3\) must be a multiple of k/v's heads \(2\)"),
    (dict(q=torch.randn(2, 8, 16)), ValueError, "q must be 4-D"),
    (dict(v=torch.randn(1, 2, 9, 16)), ValueError, "k and v must have the same shape"),
    (dict(q=torch.randn(1, 2, 8, 48), k=torch.randn(1, 2, 8, 48), v=torch.randn(1, 2, 8, 48)), ValueError,
     r"head dim must be one of \(16, 32, 64, 80, 96, 128, 256\), got 48"),
    (dict(k=torch.randn(1, 2, 8, 16, dtype=torch.float64)), TypeError, "share one dtype"),
    (dict(k=torch.randn(1, 2, 9, 16)), ValueError, "k and v must have the same shape"),
    (dict(q=torch.randn(2, 2, 8, 16)), ValueError, "same batch size"),
    (dict(q=torch.zeros(1, 2, 8, 16, dtype=torch.int32)), TypeError, "floating-point dtype"),
    (dict(q=[1.0]), TypeError, "q must be a torch.Tensor"),
    (dict(causal=1), TypeError, "causal must be a bool"),
    (dict(deterministic="no"), TypeError, "deterministic must be a bool"),
    (dict(scale=-1.0), ValueError, "scale must be a finite number > 0"),
    (dict(scale=math.inf), ValueError, "scale must be a finite number > 0"),
    (dict(backend="nope"), ValueError, "unknown backend 'nope'"),
    (dict(q=torch.randn(1, 2, 0, 16)), ValueError, "lengths must be >= 1, got Tq=0"),
    (dict(k=torch.randn(1, 2, 0, 16), v=torch.randn(1, 2, 0, 16)), ValueError, "lengths must be >= 1"),
    (dict(k=torch.randn(1, 0, 8, 16), v=torch.randn(1, 0, 8, 16)), ValueError, "must be a multiple of k/v's heads"),
    (dict(k=torch.randn(1, 2, 8, 16, device="meta")), ValueError, "must be on one device"),
])
def test_bad_input(kwargs, exc, match):
    args = dict(q=torch.randn(1, 2, 8, 16), k=torch.randn(1, 2, 8, 16), v=torch.randn(1, 2, 8, 16))
    args.update(kwargs)
    q, k, v = args.pop("q"), args.pop("k"), args.pop("v")
    with pytest.raises(exc, match=match):
        fastcore.attention(q, k, v, **args)


# ---------------------------------------------------------------- the module
def test_causal_self_attention_module():
    torch.manual_seed(0)
    m = fastcore.nn.CausalSelfAttention(64, 4, 2)
    x = torch.randn(2, 11, 64, requires_grad=True)
    y = m(x)
    q, k, v = m.qkv(x).split([64, 32, 32], dim=-1)
    q, k, v = (z.view(2, 11, -1, 16).transpose(1, 2) for z in (q, k, v))
    want = m.proj(reference.attention(q, k, v, causal=True).transpose(1, 2).reshape(2, 11, 64))
    assert_close(y, want, torch.float32, "module")
    y.sum().backward()
    assert torch.isfinite(x.grad).all() and m.qkv.weight.grad.abs().sum() > 0
    assert set(m.state_dict()) == {"qkv.weight", "qkv.bias", "proj.weight", "proj.bias"}
    # Causal: the first position's output ignores later tokens.
    x2 = x.detach().clone()
    x2[:, 5:] = torch.randn(2, 6, 64)
    assert torch.allclose(m(x2)[:, :5], y[:, :5], atol=1e-6)


@pytest.mark.parametrize("args,match", [((64, 5), "multiple of n_heads"), ((64, 4, 3), "multiple of n_kv_heads"),
                                        ((512, 64), "head dim d_model / n_heads = 8 must be one of")])
def test_module_rejects_bad_shapes(args, match):
    with pytest.raises(ValueError, match=match):
        fastcore.nn.CausalSelfAttention(*args)


@pytest.mark.parametrize("shape", [(5, 64), (2, 5, 32), (1, 2, 5, 64)])
def test_module_rejects_bad_input(shape):
    with pytest.raises(ValueError, match=r"x must be \(batch, length, d_model=64\), got"):
        fastcore.nn.CausalSelfAttention(64, 4)(torch.randn(shape))


# ---------------------------------------------------------------- GPU
@pytest.mark.gpu
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("deterministic", [True, False])
def test_gpu_long_sequence_bf16(causal, deterministic):
    check("cuda", "triton", (1, 4, 2, 8192, 8192, 64, causal), torch.bfloat16, deterministic=deterministic)


@pytest.mark.gpu
def test_gpu_memory_grows_linearly():
    peaks = []
    for t in (4096, 8192):
        q, k, v = make_qkv(1, 8, 8, t, t, 64, torch.bfloat16, "cuda")
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fastcore.attention(q, k, v, causal=True, backend="triton").sum().backward()
        torch.cuda.synchronize()
        peaks.append(torch.cuda.max_memory_allocated() - before)
    assert peaks[1] < 2.5 * peaks[0], f"extra memory {peaks} grows faster than linearly in T"


@pytest.mark.parametrize("device,backend", [p for p in device_backends("attention") if p[1] == "triton"])
def test_triton_backward_is_deterministic(device, backend):
    """Meaningful on a GPU, where thread scheduling varies; the interpreter is deterministic anyway."""
    q, k, v = make_qkv(1, 4, 1, 37, 45, 32, torch.float32, device)   # MQA: four heads sum into one dk/dv
    do = torch.randn(1, 4, 37, 32, device=device)
    runs = [torch.autograd.grad(fastcore.attention(q, k, v, causal=True, backend=backend), (q, k, v), do)
            for _ in range(2)]
    for a, b in zip(*runs):
        assert torch.equal(a, b)


@pytest.mark.parametrize("device,backend", [p for p in device_backends("attention") if p[1] == "triton"])
def test_triton_custom_op_under_compile_and_opcheck(device, backend):
    q, k, v = make_qkv(1, 2, 1, 9, 13, 16, torch.float32, device)
    fn = torch.compile(lambda a, b, c: fastcore.attention(a, b, c, causal=True, backend=backend), fullgraph=True,
                       backend="eager")
    assert_close(fn(q, k, v), reference.attention(q, k, v, causal=True), torch.float32, "compiled triton")
    checks = ("test_schema", "test_faketensor", "test_autograd_registration", "test_aot_dispatch_dynamic")
    for deterministic in (True, False):
        torch.library.opcheck(torch.ops.fastcore.attention_fwd.default, (q, k, v, True, 0.25, deterministic),
                              test_utils=checks)
        o, lse = torch.ops.fastcore.attention_fwd(q, k, v, True, 0.25, deterministic)
        do = torch.randn_like(o)
        torch.library.opcheck(torch.ops.fastcore.attention_bwd.default,
                              tuple(t.detach() for t in (do, q, k, v, o, lse)) + (True, 0.25, deterministic),
                              test_utils=("test_schema", "test_faketensor"))


@pytest.mark.parametrize("device,backend", [p for p in device_backends("attention") if p[1] == "triton"])
def test_block_size_search_times_checked_candidates_and_skips_the_rest(device, backend):
    """The tuner (bench/tune_attention.py) on small shapes: forced configs compute the right answer,
    a config that cannot compile is skipped with its reason, the table's entry competes, and each
    kind's winner is the best one it timed."""
    from fastcore.bench import tune_attention as tune

    from fastcore.kernels import attention as kernels

    bad = (24, 16, 4, 1)  # tl.arange needs power-of-two blocks
    cands = {"fwd": [(16, 16, 4, 1), (16, 32, 4, 1), bad], "dkdv": [(32, 32, 4, 1), (24, 32, 4, 1)],
             "dq": [(16, 16, 4, 1), (24, 16, 4, 1)]}
    table = tune.table(16, True, torch.float16, device)
    if device == "cpu":
        assert table == {"fwd": kernels._INTERPRET_FWD, "dkdv": kernels._INTERPRET_BWD[0],
                         "dq": kernels._INTERPRET_BWD[1]}
    found = tune.tune(16, True, [33], torch.float16, device, timer=tune.host_ms if device == "cpu" else tune.cuda_ms,
                      cands=lambda kind, d: cands[kind], check_length=17, tokens=66, hidden=32)
    for kind, good in (("fwd", {(16, 16, 4, 1), (16, 32, 4, 1)}), ("dkdv", {(32, 32, 4, 1)}), ("dq", {(16, 16, 4, 1)})):
        good = good | {tuple(table[kind])}  # the table's entry competes, first
        tried = {tuple(e["config"]): e for e in found[kind]["tried"]}
        assert list(tried) == list(dict.fromkeys([tuple(table[kind]), *cands[kind]])), (kind, list(tried))
        assert all("score" in tried[c] for c in good), (kind, tried)
        assert found[kind]["best"] == max(good, key=lambda c: tried[c]["score"]), (kind, tried)
        assert all("skipped" in e and "score" not in e for c, e in tried.items() if c not in good), (kind, tried)
        assert found["table"][kind] == list(found[kind]["best"])
    assert kernels._forced == {}  # every forced config was put back
    # The check itself: wrong outputs are named, right ones pass.
    q, k, v, do = tune.inputs(17, 16, torch.float16, device, tokens=34, hidden=32)
    o, lse = kernels.attention_fwd(q, k, v, True, 0.25)
    assert tune.check("fwd", (o, lse), q, k, v, do, True) is None
    assert tune.check("fwd", (o.flip(-2), lse), q, k, v, do, True).startswith("o: relative error")
    assert tune.check("fwd", (o, lse + 1), q, k, v, do, True).startswith("lse: relative error")
    grads = kernels.attention_bwd(do, q, k, v, o, lse, True, 0.25)
    assert tune.check("dkdv", grads, q, k, v, do, True) is None
    assert tune.check("dq", (grads[0], grads[1] * 2, grads[2]), q, k, v, do, True).startswith("dk: relative error")
    if not torch.cuda.is_available():
        assert tune.main([]) == 2  # the search itself needs a GPU: it says so instead of timing the interpreter


def test_block_size_candidates_leave_out_configs_that_would_spill_registers():
    """At head dim 128 the bound drops the 4-warp tiles that spilled when compiled for sm_90 and keeps
    the 8-warp ones that did not (see tune_attention.MAX_LIVE_FP32)."""
    from fastcore.bench import tune_attention as tune

    spilled = {"fwd": (128, 64, 4, 3), "dkdv": (32, 128, 4, 2), "dq": (128, 32, 4, 2)}
    kept = {"fwd": (128, 64, 8, 3), "dkdv": (32, 128, 8, 2), "dq": (128, 32, 8, 2)}
    for kind in tune.KINDS:
        cands = tune.candidates(kind, 128)
        assert spilled[kind] not in cands and kept[kind] in cands, (kind, cands)
        assert all(tune.live_fp32(kind, *c[:3], 128) <= tune.MAX_LIVE_FP32 for c in cands)
    assert tune.live_fp32("fwd", 128, 64, 8, 80) == tune.live_fp32("fwd", 128, 64, 8, 128)  # padded head dim


@pytest.mark.parametrize("device,backend", [p for p in device_backends("attention") if p[1] == "triton"])
@pytest.mark.parametrize("case,dtype,layout", [
    ((1, 2, 1, 33, 33, 16, True), torch.float16, "contiguous"),       # MQA, one partial block
    ((2, 4, 2, 17, 57, 80, True), torch.bfloat16, "contiguous"),      # Tq < Tk, padded head dim
    ((1, 2, 2, 100, 37, 64, False), torch.float32, "transposed"),     # Tq > Tk, a (B, T, H, D) view
    ((1, 2, 1, 19, 23, 80, True), torch.float32, "contiguous"),       # fp32, padded head dim
])
def test_forward_through_tensor_descriptors(device, backend, case, dtype, layout, monkeypatch):
    """The forward's TMA path (sm_90, forced as the tuner does): output and gradients against the
    reference, from a launch that took it; tensors it cannot describe are refused."""
    from fastcore.kernels import attention as kernels

    if device == "cuda" and torch.cuda.get_device_capability()[0] < 9:
        pytest.skip("tensor descriptors need sm_90")
    launched = []
    kernel = kernels._attn_fwd_kernel

    class Spy:
        def __getitem__(self, grid):
            def launch(*args, **kw):
                launched.append(kw["TMA"])
                return kernel[grid](*args, **kw)
            return launch
    monkeypatch.setattr(kernels, "_attn_fwd_kernel", Spy())
    with kernels.block_configs(fwd=(32, 16, 4, 1, True) if device == "cpu" else (64, 64, 4, 2, True)):
        check(device, backend, case, dtype, layout)
        assert launched and all(launched)
        q = torch.randn(1, 2, 24, 16, device=device)
        k = torch.randn(1, 2, 16, 24, device=device).transpose(-1, -2)  # (1, 2, 24, 16), strided last dim
        with pytest.raises(ValueError, match="TMA path needs a contiguous last dim.*k has strides"):
            fastcore.attention(q, k, q, backend=backend)
    if device == "cpu":  # a table entry that asks for TMA: tensors it cannot describe take the plain path
        monkeypatch.setattr(kernels, "_INTERPRET_FWD", (32, 16, 4, 1, True))
        launched.clear()
        out = fastcore.attention(q, k, q, backend=backend)
        assert launched == [False]
        assert_close(out, reference.attention(q, k, q), torch.float32, "TMA table entry, plain fallback")
