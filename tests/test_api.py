"""The public surface: backend selection, argument errors, nn modules, torch.compile, the extension, the CLI."""
import os
import subprocess
import sys

import pytest
import torch

import fastcore
from fastcore import backends, reference
from conftest import assert_close

HAS_CPP = "cpu" in fastcore.available_backends("layer_norm", "cpu")


# ---------------------------------------------------------------- backends
def test_available_backends_on_cpu():
    names = fastcore.available_backends("layer_norm", "cpu")
    assert names[0] != "reference" or not HAS_CPP, "auto should prefer a kernel to the float64 reference"
    assert "reference" in names and "cuda" not in names
    assert ("triton" in names) == (os.environ.get("TRITON_INTERPRET") == "1")
    assert fastcore.available_backends("rms_norm", torch.device("cpu")) == names


def test_auto_picks_the_first_available_backend():
    x = torch.randn(2, 8)
    assert fastcore.resolve_backend("layer_norm", "auto", x.device, x.dtype) == \
        fastcore.available_backends("layer_norm", "cpu")[0]
    # float64 on a GPU-only kernel set would fall back to the reference; on CPU the C++ path takes it
    assert fastcore.resolve_backend("layer_norm", "auto", "cpu", torch.float64) in ("cpu", "reference")


def test_unknown_op_and_backend_are_refused():
    with pytest.raises(ValueError, match="unknown op 'softmax'"):
        fastcore.available_backends("softmax", "cpu")
    with pytest.raises(ValueError, match="unknown backend 'fast'"):
        fastcore.layer_norm(torch.randn(2, 4), backend="fast")


def test_unavailable_backend_says_why():
    with pytest.raises(RuntimeError, match="'cuda' backend runs on CUDA tensors"):
        fastcore.layer_norm(torch.randn(2, 4), backend="cuda")
    assert "float64" in backends.why_unavailable("triton", "cpu", torch.float64)


# ---------------------------------------------------------------- bad input
BAD_INPUTS = [
    (lambda: fastcore.layer_norm(torch.randn(3, 8), torch.ones(7)), ValueError, r"weight must have shape \(8,\)"),
    (lambda: fastcore.layer_norm(torch.randn(3, 8), None, torch.ones(9)), ValueError, r"bias must have shape \(8,\)"),
    (lambda: fastcore.rms_norm(torch.randn(3, 8), torch.ones(2, 4)), ValueError, r"weight must have shape \(8,\)"),
    (lambda: fastcore.layer_norm(torch.arange(8).view(2, 4)), TypeError, "x must have a floating-point dtype"),
    (lambda: fastcore.rms_norm(torch.randn(2, 4), torch.ones(4, dtype=torch.int32)), TypeError, "weight must have a floating"),
    (lambda: fastcore.layer_norm([1.0, 2.0]), TypeError, "x must be a torch.Tensor"),
    (lambda: fastcore.layer_norm(torch.randn(3, 8), eps=-1e-5), ValueError, "eps must be a finite number >= 0"),
    (lambda: fastcore.rms_norm(torch.randn(3, 8), eps=float("nan")), ValueError, "eps must be a finite number >= 0"),
    (lambda: fastcore.layer_norm(torch.randn(3, 8), eps="1e-5"), TypeError, "eps must be a float"),
    (lambda: fastcore.layer_norm(torch.tensor(1.0)), ValueError, "non-empty last dimension"),
    (lambda: fastcore.layer_norm(torch.randn(3, 0)), ValueError, "non-empty last dimension"),
    (lambda: fastcore.layer_norm(torch.randn(3, 8), torch.ones(8, device="meta")), ValueError, "on one device"),
]


def test_eps_accepts_any_real_number():
    import numpy as np

    x = torch.randn(3, 8)
    expected = torch.nn.functional.layer_norm(x, (8,), eps=1e-3)
    assert_close(fastcore.layer_norm(x, eps=np.float32(1e-3)), expected.double(), torch.float32)
    assert_close(fastcore.layer_norm(x, eps=1), torch.nn.functional.layer_norm(x, (8,), eps=1.0).double(),
                 torch.float32)


@pytest.mark.parametrize("case", range(len(BAD_INPUTS)))
def test_bad_input_raises_a_clear_error(case):
    fn, exc, message = BAD_INPUTS[case]
    with pytest.raises(exc, match=message):
        fn()


# ---------------------------------------------------------------- nn modules
@pytest.mark.parametrize("kwargs", [{}, {"elementwise_affine": False}, {"bias": False}, {"eps": 1e-3}])
def test_layer_norm_module_is_a_drop_in(kwargs):
    torch.manual_seed(0)
    ours, theirs = fastcore.nn.LayerNorm((4, 6), **kwargs), torch.nn.LayerNorm((4, 6), **kwargs)
    assert isinstance(ours, torch.nn.LayerNorm)
    assert list(ours.state_dict()) == list(theirs.state_dict())
    for p in theirs.parameters():
        torch.nn.init.normal_(p)
    ours.load_state_dict(theirs.state_dict())
    x = torch.randn(3, 5, 4, 6)
    assert_close(ours(x), theirs.double()(x.double()), torch.float32)


@pytest.mark.parametrize("eps", [None, 1e-6])
def test_rms_norm_module_is_a_drop_in(eps):
    ours, theirs = fastcore.nn.RMSNorm(48, eps=eps), torch.nn.RMSNorm(48, eps=eps)
    assert isinstance(ours, torch.nn.RMSNorm)
    assert list(ours.state_dict()) == list(theirs.state_dict())
    torch.nn.init.normal_(theirs.weight)
    ours.load_state_dict(theirs.state_dict())
    x = torch.randn(2, 7, 48, requires_grad=True)
    ours(x).sum().backward()
    dx = x.grad.clone()
    x.grad = None
    theirs(x).sum().backward()
    assert_close(ours(x), theirs(x), torch.float32)
    assert_close(dx, x.grad, torch.float32, "dx")
    assert_close(ours.weight.grad, theirs.weight.grad, torch.float32, "dw")


def test_module_rejects_wrong_trailing_shape():
    with pytest.raises(ValueError, match=r"trailing dims are \(4, 6\)"):
        fastcore.nn.LayerNorm((4, 6))(torch.randn(2, 6, 4))


def test_module_backend_is_reported():
    assert "backend='reference'" in repr(fastcore.nn.RMSNorm(8, backend="reference"))


# ---------------------------------------------------------------- torch.compile
class TinyBlock(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.ln = fastcore.nn.LayerNorm(32)
        self.proj = torch.nn.Linear(32, 32)
        self.rms = fastcore.nn.RMSNorm(32)

    def forward(self, x):
        return self.rms(x + self.proj(self.ln(x)))


def test_torch_compile_fullgraph_traces_the_ops():
    torch.manual_seed(0)
    model = TinyBlock()
    x = torch.randn(4, 5, 32)
    eager_out = model(x)
    eager_out.sum().backward()
    eager_grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    compiled = torch.compile(model, fullgraph=True)
    out = compiled(x)
    out.sum().backward()
    assert_close(out, eager_out.detach().double(), torch.float32)
    for got, want in zip([p.grad for p in model.parameters()], eager_grads):
        assert_close(got, want, torch.float32, "grad")


@pytest.mark.parametrize("centered", [True, False], ids=["layer_norm", "rms_norm"])
def test_custom_ops_pass_opcheck(centered):
    """Schema, fake implementation and autograd registration of the ops torch.compile traces."""
    backend = fastcore.available_backends("layer_norm", "cpu")[0]
    if backend == "reference":
        pytest.skip("the reference backend does not go through the custom ops")
    x = torch.randn(3, 5, 16, requires_grad=True)
    w = torch.randn(16, requires_grad=True)
    b = torch.randn(16, requires_grad=True) if centered else None
    torch.library.opcheck(torch.ops.fastcore.norm_fwd.default, (x, w, b, 1e-5, centered, backend))
    y, mean, rstd = torch.ops.fastcore.norm_fwd(x, w, b, 1e-5, centered, backend)
    dy = torch.randn_like(y)
    torch.library.opcheck(torch.ops.fastcore.norm_bwd.default,
                          (dy, x.detach(), w.detach(), mean, rstd, b is not None, centered, backend))
    # The registered autograd formula, in eager, against the reference.
    y.backward(dy)
    rx, rw = x.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    ref = reference.layer_norm(rx, rw, b.detach().double()) if centered else reference.rms_norm(rx, rw, 1e-5)
    ref.backward(dy.double())
    assert_close(x.grad, rx.grad, torch.float32, "dx")
    assert_close(w.grad, rw.grad, torch.float32, "dw")


def test_torch_compile_dynamic_shapes_and_eps():
    """Dynamic shapes make eps a symbolic float; the argument checks must still trace."""
    norm = fastcore.nn.LayerNorm(8)
    compiled = torch.compile(norm, fullgraph=True, dynamic=True)
    for rows in (3, 5):
        x = torch.randn(rows, 2, 8)
        assert_close(compiled(x), torch.nn.functional.layer_norm(x.double(), (8,)), torch.float32)
    fn = torch.compile(lambda x, e: fastcore.rms_norm(x, eps=e), fullgraph=True)
    x = torch.randn(4, 8)
    for eps in (1e-5, 1e-3):
        assert_close(fn(x, eps), torch.nn.functional.rms_norm(x.double(), (8,), eps=eps), torch.float32)


# ---------------------------------------------------------------- CLI
def test_info_reports_the_environment():
    proc = subprocess.run([sys.executable, "-m", "fastcore", "info"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    for field in ("fastcore", "torch", "triton", "CUDA", "GPU", "compiler", "extension", "layer_norm", "rms_norm"):
        assert field in proc.stdout
    assert f"torch         {torch.__version__}" in proc.stdout


# ---------------------------------------------------------------- the name `kernels`
def test_the_checkouts_kernels_folder_leaves_the_name_kernels_to_pypi():
    """A process started in the checkout has its root on sys.path, which made `import kernels` (Hugging
    Face's kernel hub, which transformers imports) load our Triton folder. It must reach the real package,
    or fail as if the folder were not there; fastcore.kernels is unaffected."""
    from importlib import metadata

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    code = ("import sys\ntry:\n    import kernels\n    print('found', kernels.__file__)\n"
            "except ModuleNotFoundError as exc:\n    print('absent', exc.name)\n"
            "from fastcore.kernels import attention\nprint(attention.__name__)\n")
    out = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    first, second = out.stdout.split("\n")[:2]
    try:
        metadata.distribution("kernels")
        installed = True
    except metadata.PackageNotFoundError:
        installed = False
    if installed:
        assert first.startswith("found ") and not first[6:].startswith(os.path.join(root, "kernels")), first
    else:
        assert first == "absent kernels", first
    assert second == "fastcore.kernels.attention"


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs: the tensors on one, the other current")
def test_triton_launches_on_the_tensors_gpu_not_the_current_one():
    """Triton launches on the current device: the ops must switch to their tensors' GPU first."""
    torch.manual_seed(0)
    x = torch.randn(64, 256, device="cuda:1", requires_grad=True)
    w = torch.randn(256, device="cuda:1", requires_grad=True)
    q = torch.randn(1, 2, 64, 64, device="cuda:1", requires_grad=True)
    with torch.cuda.device(0):
        y = fastcore.rms_norm(x, w, backend="triton")
        o = fastcore.attention(q, q, q, causal=True, backend="triton")
        (y.square().sum() + o.square().sum()).backward()
    leaves = [t.detach().double().requires_grad_() for t in (x, w, q)]
    ry, ro = reference.rms_norm(leaves[0], leaves[1]), reference.attention(*[leaves[2]] * 3, causal=True)
    (ry.square().sum() + ro.square().sum()).backward()
    assert_close(y, ry, torch.float32, "rms_norm on cuda:1")
    assert_close(o, ro, torch.float32, "attention on cuda:1")
    for got, want in zip((x, w, q), leaves):
        assert_close(got.grad, want.grad, torch.float32, "gradient on cuda:1")
