"""pack: copy, scale and cast many tensors in one launch, every backend against the float64 reference."""
import pytest
import torch

import fastcore
from fastcore import reference
from conftest import assert_close, device_backends

SHAPES = [(1,), (3,), (37, 19), (1000,), (70_001,)]  # the last spans several chunks of every backend
PAIRS = [(torch.float32, torch.float32), (torch.float32, torch.bfloat16), (torch.bfloat16, torch.float32),
         (torch.float32, torch.float16), (torch.float16, torch.float32), (torch.bfloat16, torch.bfloat16)]


def sources(dtype, device, shapes=SHAPES):
    gen = torch.Generator().manual_seed(0)
    return [(torch.randn(s, generator=gen) * 3).to(device=device, dtype=dtype) for s in shapes]


def flat_bucket(srcs, dtype):
    """A flat bucket poisoned with NaN, and its per-tensor flat views."""
    bucket = torch.full((sum(s.numel() for s in srcs),), float("nan"), dtype=dtype, device=srcs[0].device)
    views, offset = [], 0
    for s in srcs:
        views.append(bucket[offset:offset + s.numel()])
        offset += s.numel()
    return bucket, views


@pytest.mark.parametrize("src_dtype,dst_dtype", PAIRS)
@pytest.mark.parametrize("device,backend", device_backends("pack"))
def test_pack_and_unpack_match_the_reference(device, backend, src_dtype, dst_dtype):
    srcs = sources(src_dtype, device)
    bucket, views = flat_bucket(srcs, dst_dtype)
    fastcore.ops.pack(srcs, views, 1 / 3, backend=backend)
    expect = [torch.empty_like(v) for v in views]
    reference.pack(srcs, expect, 1 / 3)
    for got, want in zip(views, expect):
        assert_close(got, want, dst_dtype if dst_dtype != torch.float32 else src_dtype)
    # Unpack the bucket back into shaped tensors, scaling by 3.
    outs = [torch.full(s.shape, float("nan"), dtype=src_dtype, device=device) for s in srcs]
    fastcore.ops.pack(views, outs, 3.0, backend=backend)
    for out, src in zip(outs, srcs):
        assert_close(out, src, torch.bfloat16 if torch.bfloat16 in (src_dtype, dst_dtype) or
                     torch.float16 in (src_dtype, dst_dtype) else torch.float32)


@pytest.mark.parametrize("device,backend", device_backends("pack"))
def test_narrowing_rounds_to_nearest_even_like_torch(device, backend):
    """An exact scale (0.5) leaves only the cast: bit-for-bit torch's round-to-nearest-even."""
    srcs = sources(torch.float32, device)
    srcs.append(torch.tensor([1 + 2**-8, 1 + 3 * 2**-8, -(1 + 2**-8), float("inf"), float("nan")], device=device))
    for dtype in (torch.bfloat16, torch.float16):
        bucket, views = flat_bucket(srcs, dtype)
        fastcore.ops.pack(srcs, views, 0.5, backend=backend)
        want = torch.cat([(s * 0.5).reshape(-1).to(dtype) for s in srcs])
        assert torch.equal(bucket.isnan(), want.isnan())
        assert torch.equal(bucket[~want.isnan()], want[~want.isnan()])


@pytest.mark.parametrize("device,backend", device_backends("pack"))
def test_non_contiguous_sources_and_empty_lists(device, backend):
    srcs = [torch.randn(9, 14, device=device).t(), torch.randn(0, device=device), torch.randn(5, device=device)]
    bucket, views = flat_bucket(srcs, torch.float32)
    fastcore.ops.pack(srcs, views, 2.0, backend=backend)
    assert torch.equal(bucket, torch.cat([s.reshape(-1) * 2 for s in srcs]))
    fastcore.ops.pack([], [], backend=backend)  # nothing to do, no error


@pytest.mark.parametrize("srcs,dsts,scale,error,match", [
    ([torch.zeros(3)], [], 1.0, ValueError, "srcs has 1 tensors but dsts has 0"),
    ([torch.zeros(3)], [torch.zeros(4)], 1.0, ValueError, r"srcs\[0\] has 3 elements but dsts\[0\] has 4"),
    ([torch.zeros(3, dtype=torch.int32)], [torch.zeros(3)], 1.0, TypeError, "floating point"),
    ([torch.zeros(2), torch.zeros(2, dtype=torch.float64)], [torch.zeros(2), torch.zeros(2)], 1.0, TypeError,
     "share one dtype"),
    ([torch.zeros(4)], [torch.zeros(2, 2).t()], 1.0, ValueError, "contiguous"),
    ([torch.zeros(4)], [torch.zeros(4)], float("inf"), ValueError, "scale must be a finite number"),
    ([torch.zeros(4)], [torch.zeros(4)], "2", ValueError, "scale must be a finite number"),
    (None, [torch.zeros(1)], 1.0, TypeError, "srcs must be a list or tuple of tensors, got NoneType"),
    ([torch.zeros(2, 2).to_sparse()], [torch.zeros(4)], 1.0, ValueError, r"srcs\[0\] must be a dense tensor"),
    ([torch.zeros(4)], [torch._neg_view(torch.zeros(4))], 1.0, ValueError, "not a negative view"),
])
def test_bad_input(srcs, dsts, scale, error, match):
    with pytest.raises(error, match=match):
        fastcore.ops.pack(srcs, dsts, scale)


@pytest.mark.parametrize("case", ["shifted copy", "two destinations"])
def test_a_destination_overlapping_another_tensor_is_refused(case):
    buf = torch.arange(20.0)
    srcs, dsts, match = {
        "shifted copy": ([buf[0:5]], [buf[1:6]], r"srcs\[0\] and dsts\[0\]"),
        "two destinations": ([torch.zeros(3), torch.zeros(3)], [buf[0:3], buf[2:5]], r"dsts\[0\] and dsts\[1\]"),
    }[case]
    before = buf.clone()
    with pytest.raises(ValueError, match=match + " share memory"):
        fastcore.ops.pack(srcs, dsts)
    assert torch.equal(buf, before)


def test_in_place_and_strided_sources_are_allowed():
    x = torch.ones(4)
    fastcore.ops.pack([x], [x], 2.0)                      # in place, element by element
    assert x.tolist() == [2.0] * 4
    buf = torch.arange(20.0)
    want = buf.view(4, 5)[:, 0] * 1.0
    fastcore.ops.pack([buf.view(4, 5)[:, 0]], [buf[1:5]])  # read through a copy before any write
    assert buf[1:5].tolist() == want.tolist()


def test_sources_may_share_memory():
    buf = torch.arange(5.0)
    out = [torch.empty(5), torch.empty(5)]
    fastcore.ops.pack([buf, buf[0:5]], out, 2.0)
    assert torch.equal(out[0], buf * 2) and torch.equal(out[1], buf * 2)


@pytest.mark.parametrize("device,backend", device_backends("pack"))
def test_a_negative_view_source_packs_its_values(device, backend):
    x = torch.arange(1.0, 5.0, device=device)
    out = torch.empty(4, device=device)
    fastcore.ops.pack([torch._neg_view(x)], [out], 2.0, backend=backend)
    assert out.tolist() == [-2.0, -4.0, -6.0, -8.0]


def test_auto_falls_back_to_the_reference_for_destinations_no_fused_backend_takes():
    x = torch.randn(10)
    got, want = torch.empty(10, dtype=torch.float8_e4m3fn), torch.empty(10, dtype=torch.float8_e4m3fn)
    fastcore.ops.pack([x], [got], 0.5)
    reference.pack([x], [want], 0.5)
    assert torch.equal(got.view(torch.uint8), want.view(torch.uint8))


def test_float64_destinations_refuse_triton():
    if "triton" not in fastcore.available_backends("pack", "cpu"):
        pytest.skip("triton cannot run here")
    with pytest.raises(RuntimeError, match="float64"):
        fastcore.ops.pack([torch.zeros(4)], [torch.zeros(4, dtype=torch.float64)], backend="triton")

