"""FusedAdamW / FusedAdam: trajectories against torch.optim.AdamW / Adam for every backend that runs,
state_dict both ways, GradScaler, mixed precision, and refusals of bad input."""
import copy
import pickle

import pytest
import torch

import fastcore
from fastcore import reference
from fastcore.bench import bench_adamw
from fastcore.optim import FusedAdam, FusedAdamW
from conftest import assert_close, device_backends

# Odd shapes: size 1, tiny, a non-power-of-two matrix, and one spanning several chunks of the
# interpreter's Triton kernel (512 elements).
SHAPES = [(1,), (3,), (37, 19), (1000,)]
STEPS = 25
BACKENDS = [("cpu", "reference")] + device_backends("adamw")


def make_params(shapes, dtype=torch.float32, device="cpu", seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(s, generator=gen).to(device=device, dtype=dtype)) for s in shapes]


def grads_for(params, step, dtype=None):
    """Fresh gradients, the same for every optimizer under test; a parameter skips some steps."""
    gen = torch.Generator().manual_seed(1000 + step)
    out = []
    for i, p in enumerate(params):
        g = torch.randn(p.shape, generator=gen)
        out.append(None if (i == 1 and step % 3 == 2) else g.to(device=p.device, dtype=dtype or p.dtype))
    return out


def groups(params, lr):
    """Two param groups with their own lr and weight decay."""
    return [{"params": params[:2], "lr": lr, "weight_decay": 0.0}, {"params": params[2:], "weight_decay": 0.3}]


def run(opt, params, steps, start=0, grad_dtype=None):
    for step in range(start, start + steps):
        for p, g in zip(params, grads_for(params, step, grad_dtype)):
            p.grad = g
        opt.step()


# name -> (fastcore class, torch class, constructor kwargs)
CONFIGS = {
    "adamw": (FusedAdamW, torch.optim.AdamW, dict(lr=3e-2, weight_decay=0.1)),
    "amsgrad": (FusedAdamW, torch.optim.AdamW, dict(lr=3e-2, amsgrad=True)),
    "maximize": (FusedAdamW, torch.optim.AdamW, dict(lr=3e-2, maximize=True, betas=(0.8, 0.99))),
    "no-decay": (FusedAdamW, torch.optim.AdamW, dict(lr=3e-2, weight_decay=0.0, eps=1e-6)),
    "tensor-lr": (FusedAdamW, torch.optim.AdamW, dict(lr=torch.tensor(2e-2), weight_decay=0.05)),
    "adam-l2": (FusedAdam, torch.optim.Adam, dict(lr=3e-2, weight_decay=0.2, amsgrad=True)),
    "adam-decoupled": (FusedAdam, torch.optim.Adam, dict(lr=3e-2, weight_decay=0.2, decoupled_weight_decay=True)),
}


@pytest.mark.parametrize("config", list(CONFIGS))
@pytest.mark.parametrize("device,backend", BACKENDS)
def test_trajectory_matches_torch(device, backend, config):
    ours_cls, torch_cls, kwargs = CONFIGS[config]
    kwargs = dict(kwargs)
    lr = kwargs.pop("lr")  # the first group's; the second takes the default, 0.01
    ours_p, torch_p = make_params(SHAPES, device=device), make_params(SHAPES, device=device)
    ours = ours_cls(groups(ours_p, lr), lr=0.01, backend=backend, **kwargs)
    theirs = torch_cls(groups(torch_p, lr), lr=0.01, foreach=False, **kwargs)
    run(ours, ours_p, STEPS)
    run(theirs, torch_p, STEPS)
    for i, (a, b) in enumerate(zip(ours_p, torch_p)):
        assert_close(a, b, torch.float32, f"param {i}")
        sa, sb = ours.state[a], theirs.state[b]
        assert sa["step"].item() == sb["step"].item()
        for key in ("exp_avg", "exp_avg_sq", "max_exp_avg_sq"):
            assert (key in sa) == (key in sb), key
            if key in sa:
                assert_close(sa[key], sb[key], torch.float32, f"{key} {i}")
    # The parameter that skipped steps also skipped its step count.
    assert ours.state[ours_p[1]]["step"].item() == STEPS - len(range(2, STEPS, 3))


@pytest.mark.parametrize("device,backend", BACKENDS)
def test_bf16_params_keep_fp32_state(device, backend):
    """bf16 parameters against AdamW on the same bf16 parameters; our moments stay fp32."""
    ours_p, torch_p = make_params(SHAPES, torch.bfloat16, device), make_params(SHAPES, torch.bfloat16, device)
    ours = FusedAdamW(ours_p, lr=1e-2, backend=backend)
    theirs = torch.optim.AdamW(torch_p, lr=1e-2, foreach=False)
    run(ours, ours_p, STEPS)
    run(theirs, torch_p, STEPS)
    for a, b in zip(ours_p, torch_p):
        assert a.dtype == torch.bfloat16 and ours.state[a]["exp_avg"].dtype == torch.float32
        assert_close(a, b, torch.bfloat16)
        assert_close(ours.state[a]["exp_avg"], theirs.state[b]["exp_avg"], torch.bfloat16)


@pytest.mark.parametrize("device,backend", BACKENDS)
def test_master_weights_follow_the_fp32_trajectory(device, backend):
    """With master weights, bf16 parameters lose nothing: the fp32 copy follows fp32 AdamW, and
    the parameter is that copy rounded to nearest."""
    shapes = SHAPES + [(5, 3)]
    ours_p = make_params(shapes, torch.bfloat16, device)
    fp32_p = make_params(shapes, torch.float32, device)  # a second fp32 parameter, for dtype mixing
    torch_p = [torch.nn.Parameter(p.detach().float()) for p in ours_p]
    ours = FusedAdamW(ours_p + fp32_p[-1:], lr=1e-3, weight_decay=0.1, master_weights=True, backend=backend)
    theirs = torch.optim.AdamW(torch_p, lr=1e-3, weight_decay=0.1, foreach=False)
    for step in range(STEPS):
        for p, q, g in zip(ours_p, torch_p, grads_for(ours_p, step)):
            p.grad, q.grad = g, None if g is None else g.float()
        fp32_p[-1].grad = torch.randn_like(fp32_p[-1])
        ours.step()
        theirs.step()
    for a, b in zip(ours_p, torch_p):
        master = ours.state[a]["master_param"]
        assert_close(master, b, torch.float32, "master")
        assert torch.equal(a.detach(), master.to(torch.bfloat16))
    assert "master_param" not in ours.state[fp32_p[-1]]


def test_master_weights_keep_updates_bf16_would_lose():
    """An update far below a bf16 ulp: plain bf16 parameters never move, master weights accumulate it."""
    p_plain = torch.nn.Parameter(torch.full((64,), 1.0, dtype=torch.bfloat16))
    p_master = torch.nn.Parameter(torch.full((64,), 1.0, dtype=torch.bfloat16))
    plain = FusedAdamW([p_plain], lr=1e-4, weight_decay=0.0)
    master = FusedAdamW([p_master], lr=1e-4, weight_decay=0.0, master_weights=True)
    for _ in range(100):
        p_plain.grad = torch.ones_like(p_plain)
        p_master.grad = torch.ones_like(p_master)
        plain.step()
        master.step()
    assert torch.all(p_plain == 1.0)  # each step moves 1e-4, below half an ulp (2**-8) at 1.0
    assert torch.allclose(master.state[p_master]["master_param"], torch.full((64,), 1.0 - 100 * 1e-4), rtol=1e-5)
    assert torch.all(p_master < 1.0)


@pytest.mark.parametrize("device,backend", BACKENDS)
def test_multi_chunk_and_non_contiguous_parameters(device, backend):
    """A tensor past the CPU chunk (32768) and a transposed (non-contiguous) parameter."""
    big = 32768 * 2 + 5 if backend in ("cpu", "reference", "cuda") else 1100
    def build():
        gen = torch.Generator().manual_seed(3)
        a = torch.nn.Parameter(torch.randn(big, generator=gen).to(device))
        b = torch.nn.Parameter(torch.randn(9, 14, generator=gen).to(device).t())
        return [a, b]
    ours_p, torch_p = build(), build()
    assert not ours_p[1].is_contiguous()
    ours = FusedAdamW(ours_p, lr=1e-2, backend=backend)
    theirs = torch.optim.AdamW(torch_p, lr=1e-2, foreach=False)
    for step in range(5):
        gen = torch.Generator().manual_seed(step)
        for p, q in zip(ours_p, torch_p):
            g = torch.randn(p.shape, generator=gen).to(device)
            p.grad, q.grad = g, g.clone()
        ours.step()
        theirs.step()
    for a, b in zip(ours_p, torch_p):
        assert_close(a, b, torch.float32)
    assert ours_p[1].stride() == (1, 14)


def test_float64_parameters_on_the_cpu_backend():
    if "cpu" not in fastcore.available_backends("adamw", "cpu"):
        pytest.skip("no C++ toolchain here")
    ours_p = make_params(SHAPES, torch.float64)
    ref_p = make_params(SHAPES, torch.float64)
    ours = FusedAdamW(ours_p, lr=1e-2, amsgrad=True, backend="cpu")
    ref = FusedAdamW(ref_p, lr=1e-2, amsgrad=True, backend="reference")
    run(ours, ours_p, STEPS)
    run(ref, ref_p, STEPS)
    for a, b in zip(ours_p, ref_p):
        assert ours.state[a]["exp_avg"].dtype == torch.float64
        assert_close(a, b, torch.float64)


@pytest.mark.parametrize("device,backend", BACKENDS)
def test_state_dict_loads_both_ways(device, backend):
    """torch AdamW -> FusedAdamW and FusedAdamW -> torch AdamW, then 10 more steps that still match
    an uninterrupted torch run."""
    steady_p = make_params(SHAPES, device=device)
    steady = torch.optim.AdamW(groups(steady_p, 1e-2), lr=2e-2, amsgrad=True, foreach=False)
    run(steady, steady_p, 20)

    first_p = make_params(SHAPES, device=device)
    first = torch.optim.AdamW(groups(first_p, 1e-2), lr=2e-2, amsgrad=True, foreach=False)
    run(first, first_p, 5)
    ours_p = [torch.nn.Parameter(p.detach().clone()) for p in first_p]
    ours = FusedAdamW(groups(ours_p, 1e-2), lr=2e-2, amsgrad=True, backend=backend)
    ours.load_state_dict(copy.deepcopy(first.state_dict()))
    run(ours, ours_p, 10, start=5)

    back_p = [torch.nn.Parameter(p.detach().clone()) for p in ours_p]
    back = torch.optim.AdamW(groups(back_p, 1e-2), lr=2e-2, amsgrad=True, foreach=False)
    saved = ours.state_dict()
    assert set(saved["state"][0]) == set(first.state_dict()["state"][0])  # exactly AdamW's keys
    back.load_state_dict(copy.deepcopy(saved))
    run(back, back_p, 5, start=15)
    for a, b in zip(back_p, steady_p):
        assert_close(a, b, torch.float32)
    assert back.state[back_p[0]]["step"].item() == 20


def test_bf16_state_survives_a_round_trip():
    """PyTorch's loader casts state to the parameter dtype; ours keeps the saved fp32 values."""
    p = make_params([(300,)], torch.bfloat16)
    opt = FusedAdamW(p, lr=1e-2, master_weights=True)
    run(opt, p, 3)
    q = [torch.nn.Parameter(p[0].detach().clone())]
    opt2 = FusedAdamW(q, lr=1e-2, master_weights=True)
    opt2.load_state_dict(copy.deepcopy(opt.state_dict()))
    for key in ("exp_avg", "exp_avg_sq", "master_param"):
        assert opt2.state[q[0]][key].dtype == torch.float32
        assert torch.equal(opt2.state[q[0]][key], opt.state[p[0]][key])


@pytest.mark.parametrize("device,backend", BACKENDS)
def test_grad_scaler_skips_a_step_with_an_inf(device, backend):
    """A real GradScaler: the scaled step matches torch's fused AdamW, and an injected inf skips
    the step, leaving parameters, state and step count untouched."""
    def model():
        torch.manual_seed(0)
        return torch.nn.Sequential(torch.nn.Linear(7, 13), torch.nn.Tanh(), torch.nn.Linear(13, 1)).to(device)

    ours_m, torch_m = model(), model()
    ours = FusedAdamW(ours_m.parameters(), lr=1e-2, backend=backend)
    theirs = torch.optim.AdamW(torch_m.parameters(), lr=1e-2, foreach=False)
    scalers = [torch.amp.GradScaler(device, init_scale=2.0**10), torch.amp.GradScaler(device, init_scale=2.0**10)]
    for step in range(6):
        gen = torch.Generator().manual_seed(step)
        x, y = torch.randn(16, 7, generator=gen).to(device), torch.randn(16, 1, generator=gen).to(device)
        before = None
        for m, opt, scaler in ((ours_m, ours, scalers[0]), (torch_m, theirs, scalers[1])):
            opt.zero_grad()
            scaler.scale(torch.nn.functional.mse_loss(m(x), y)).backward()
            if step == 3:
                m[0].weight.grad[2, 3] = float("inf")
                if opt is ours:
                    before = ([p.detach().clone() for p in m.parameters()],
                              [{k: v.clone() for k, v in opt.state[p].items()} for p in m.parameters()])
            scaler.step(opt)
            scaler.update()
        if before is not None:
            for p, old, old_state in zip(ours_m.parameters(), *before):
                assert torch.equal(p.detach(), old)
                for k, v in ours.state[p].items():
                    assert torch.equal(v, old_state[k]), k
            assert scalers[0].get_scale() == 2.0**9
    for a, b in zip(ours_m.parameters(), torch_m.parameters()):
        assert_close(a, b, torch.float32)
        assert ours.state[a]["step"].item() == 5


@pytest.mark.parametrize("device,backend", BACKENDS)
def test_functional_step_matches_the_reference(device, backend):
    """fastcore.adamw_step over a list, per-tensor lr and weight decay, against the float64 reference."""
    params = [p.detach() for p in make_params(SHAPES, device=device)]
    grads = [torch.randn_like(p) for p in params]
    state = [[torch.rand_like(p) for p in params] for _ in range(2)]
    steps = [torch.tensor(float(i + 3), device=device) for i in range(len(params))]
    lrs, wds = [1e-2, 2e-2, 3e-2, 4e-2], [0.0, 0.1, 0.2, 0.3]
    expect = [t.clone() for t in params], [[t.clone() for t in s] for s in state]
    for i in range(len(params)):
        reference.adamw_step(expect[0][i], grads[i], expect[1][0][i], expect[1][1][i], steps[i].item() + 1,
                             lr=lrs[i], beta1=0.9, beta2=0.99, eps=1e-8, weight_decay=wds[i])
    fastcore.adamw_step(params, grads, state[0], state[1], steps, lr=lrs, beta1=0.9, beta2=0.99,
                        weight_decay=wds, backend=backend)
    for i in range(len(params)):
        assert_close(params[i], expect[0][i], torch.float32)
        assert_close(state[0][i], expect[1][0][i], torch.float32)
        assert_close(state[1][i], expect[1][1][i], torch.float32)
        assert steps[i].item() == i + 4


def test_params_without_grad_get_no_state_and_zero_grad_works():
    ps = make_params(SHAPES)
    opt = FusedAdamW(ps, lr=1e-2)
    ps[0].grad = torch.randn_like(ps[0])
    untouched = ps[1].detach().clone()
    opt.step()
    assert ps[0] in opt.state and ps[1] not in opt.state
    assert torch.equal(ps[1].detach(), untouched)
    opt.zero_grad()
    assert all(p.grad is None for p in ps)


def test_generator_param_groups_and_copies_keep_working():
    model = torch.nn.Linear(4, 3)
    opt = FusedAdamW([{"params": model.parameters(), "lr": 1e-2}])
    opt.add_param_group({"params": (p for p in [torch.nn.Parameter(torch.randn(2))])})
    assert [len(g["params"]) for g in opt.param_groups] == [2, 1]
    before = model.weight.detach().clone()
    model(torch.randn(5, 4)).sum().backward()
    opt.step()
    assert not torch.equal(model.weight.detach(), before)
    for clone in (copy.deepcopy(opt), pickle.loads(pickle.dumps(opt))):
        assert (clone.master_weights, clone.backend) == (opt.master_weights, opt.backend)
        for p in clone.param_groups[0]["params"]:
            p.grad = torch.ones_like(p)
        clone.step()


def test_a_compiled_training_step_runs_the_optimizer_eagerly():
    def build():
        torch.manual_seed(0)
        model = torch.nn.Linear(6, 2)
        return model, FusedAdamW(model.parameters(), lr=1e-2)

    def train_step(model, opt, x):
        loss = model(x).square().mean()
        loss.backward()
        opt.step()
        opt.zero_grad()
        return loss

    eager, compiled = build(), build()
    step = torch.compile(train_step, backend="eager")
    for i in range(3):
        x = torch.randn(4, 6, generator=torch.Generator().manual_seed(i))
        train_step(*eager, x)
        step(*compiled, x)
    for a, b in zip(eager[0].parameters(), compiled[0].parameters()):
        assert_close(b, a, torch.float32)
    assert compiled[1].state[compiled[0].weight]["step"].item() == 3


def test_param_group_keys_are_adamw_s():
    p = make_params([(3,)])
    ours, theirs = FusedAdamW(p), torch.optim.AdamW(make_params([(3,)]))
    assert set(ours.state_dict()["param_groups"][0]) == set(theirs.state_dict()["param_groups"][0])
    assert FusedAdam(p).param_groups[0]["decoupled_weight_decay"] is False


def test_a_refused_launch_steps_nothing():
    """fp32 and fp64 parameters on triton: fp64 is refused before the fp32 tensor has stepped."""
    if "triton" not in fastcore.available_backends("adamw", "cpu"):
        pytest.skip("triton cannot run here")
    ps = [torch.nn.Parameter(torch.randn(3)), torch.nn.Parameter(torch.randn(3, dtype=torch.float64))]
    before = [p.detach().clone() for p in ps]
    opt = FusedAdamW(ps, backend="triton")
    for p in ps:
        p.grad = torch.ones_like(p)
    with pytest.raises(RuntimeError, match="float64"):
        opt.step()
    assert all(torch.equal(p.detach(), b) for p, b in zip(ps, before))
    assert all(opt.state[p]["step"].item() == 0 for p in ps)


def test_an_outside_write_reseeds_the_master_copy():
    """model.load_state_dict after some steps: the next step starts from the loaded weights."""
    model = torch.nn.Linear(8, 8).to(torch.bfloat16)
    opt = FusedAdamW(model.parameters(), lr=1e-3, master_weights=True)
    for _ in range(3):
        model(torch.randn(2, 8, dtype=torch.bfloat16)).float().sum().backward()
        opt.step()
    model.load_state_dict({k: torch.zeros_like(v) for k, v in model.state_dict().items()})
    model(torch.randn(2, 8, dtype=torch.bfloat16)).float().sum().backward()
    opt.step()
    assert model.weight.abs().max().item() < 2e-2  # one 1e-3 step from zero, not the old weights


def test_a_master_copy_is_dropped_when_loading_into_fp32_params():
    p16 = make_params([(5,)], torch.bfloat16)
    opt16 = FusedAdamW(p16, master_weights=True)
    run(opt16, p16, 2)
    p32 = make_params([(5,)])
    opt32 = FusedAdamW(p32, master_weights=True)
    opt32.load_state_dict(copy.deepcopy(opt16.state_dict()))
    assert "master_param" not in opt32.state[p32[0]]
    run(opt32, p32, 2, start=2)


def test_a_master_copy_is_dropped_when_the_optimizer_keeps_none():
    """A master_weights=True checkpoint into master_weights=False: its stale copy must not be used
    (it would undo writes to the parameter that only master_weights=True tracks)."""
    p = make_params([(5,)], torch.bfloat16)
    src = FusedAdamW(p, master_weights=True)
    run(src, p, 2)
    q = make_params([(5,)], torch.bfloat16)
    dst = FusedAdamW(q, lr=1e-3, weight_decay=0.0)
    dst.load_state_dict(copy.deepcopy(src.state_dict()))
    assert "master_param" not in dst.state[q[0]]
    with torch.no_grad():
        q[0].zero_()
    q[0].grad = torch.zeros_like(q[0])
    dst.step()
    assert q[0].abs().max().item() < 1e-2


def test_named_parameters_are_taken_as_torch_takes_them():
    model = torch.nn.Linear(3, 2)
    ours = FusedAdamW(model.named_parameters(), lr=1e-2)
    theirs = torch.optim.AdamW(torch.nn.Linear(3, 2).named_parameters(), lr=1e-2)
    assert ours.param_groups[0]["param_names"] == theirs.param_groups[0]["param_names"] == ["weight", "bias"]
    model(torch.randn(4, 3)).sum().backward()
    ours.step()
    assert ours.state[model.weight]["step"].item() == 1


def test_loading_adam_keeps_its_decoupled_weight_decay():
    p, q = make_params(SHAPES), make_params(SHAPES)
    theirs = torch.optim.Adam(q, lr=1e-2, weight_decay=0.5, decoupled_weight_decay=True, foreach=False)
    run(theirs, q, 3)
    ours = FusedAdam(p, lr=1e-2, weight_decay=0.5)
    with torch.no_grad():
        for a, b in zip(p, q):
            a.copy_(b)
    ours.load_state_dict(theirs.state_dict())
    assert ours.param_groups[0]["decoupled_weight_decay"] is True
    run(ours, p, 3, start=3)
    run(theirs, q, 3, start=3)
    for a, b in zip(p, q):
        assert_close(a, b, torch.float32, "after loading Adam(decoupled_weight_decay=True)")
    assert FusedAdamW(make_params([(3,)])).param_groups[0]["decoupled_weight_decay"] is True


# ---------------------------------------------------------------- bad input
@pytest.mark.parametrize("device,backend", device_backends("adamw"))
@pytest.mark.parametrize("change", ["resized", "cast", "loaded"])
def test_state_that_does_not_fit_its_parameter_is_refused(device, backend, change):
    """The kernels run each state tensor for its parameter's numel and dtype: a state left from
    before the parameter was resized or cast in place, or loaded from another model's optimizer,
    must be refused (it crashed or hung the process)."""
    model = torch.nn.Linear(4, 4, device=device)
    opt = FusedAdamW(model.parameters(), lr=1e-3, backend=backend)
    model(torch.randn(2, 4, device=device)).sum().backward()
    opt.step()
    if change == "resized":
        model.weight.data = torch.randn(64, 4, device=device)
        model.weight.grad = torch.randn(64, 4, device=device)
    elif change == "cast":
        model.double()
        model.weight.grad, model.bias.grad = model.weight.grad.double(), model.bias.grad.double()
    else:  # a resized model (a bigger vocabulary, say) resumed from the old one's optimizer
        saved, bigger = opt.state_dict(), torch.nn.Linear(4, 64, device=device)
        opt = FusedAdamW(bigger.parameters(), lr=1e-3, backend=backend)
        opt.load_state_dict(saved)
        bigger(torch.randn(2, 4, device=device)).sum().backward()
    before = [p.detach().clone() for p in (opt.param_groups[0]["params"])]
    # Only the C++ CPU kernels step float64 parameters; the GPU backends refuse them by name.
    cast_refused = backend != "cpu" and change == "cast"
    refused = (RuntimeError, "not float64") if cast_refused else (ValueError, "does not fit")
    with pytest.raises(refused[0], match=refused[1]):
        opt.step()
    for b, p in zip(before, opt.param_groups[0]["params"]):
        assert torch.equal(b, p)  # refused before anything stepped


def test_a_parameter_listed_twice_is_refused():
    p = make_params([(3,)])
    with pytest.raises(ValueError, match="parameter 1 of a param group is listed twice"):
        FusedAdamW([p[0], p[0]])


# ---------------------------------------------------------------- bad input
def test_bad_constructor_arguments():
    p = make_params([(3,)])
    for kwargs, match in ((dict(lr=-1.0), "lr"), (dict(eps=-1e-8), "eps"), (dict(betas=(1.0, 0.9)), "betas"),
                          (dict(weight_decay=-0.1), "weight_decay"), (dict(backend="gpu"), "backend"),
                          (dict(lr=torch.ones(2)), "lr"), (dict(capturable=True), "capturable"),
                          (dict(differentiable=True), "differentiable")):
        with pytest.raises(ValueError, match=match):
            FusedAdamW(p, **kwargs)
    with pytest.raises(TypeError, match="complex"):
        FusedAdamW([torch.nn.Parameter(torch.randn(3, dtype=torch.complex64))])
    with pytest.raises(TypeError, match="floating point"):
        FusedAdamW([torch.zeros(3, dtype=torch.int64)])


def test_sparse_gradients_are_refused():
    emb = torch.nn.Embedding(10, 4, sparse=True)
    opt = FusedAdamW(emb.parameters())
    emb(torch.tensor([1, 2])).sum().backward()
    with pytest.raises(RuntimeError, match="sparse"):
        opt.step()


def test_unavailable_backend_says_why():
    p = make_params([(3,)])
    p[0].grad = torch.randn(3)
    opt = FusedAdamW(p, backend="cuda")
    with pytest.raises(RuntimeError, match="adamw: backend 'cuda' cannot run here"):
        opt.step()


def _functional_args():
    params = [torch.randn(4), torch.randn(2, 3)]
    return dict(params=params, grads=[torch.randn_like(p) for p in params],
                exp_avgs=[torch.zeros_like(p) for p in params], exp_avg_sqs=[torch.zeros_like(p) for p in params],
                steps=[torch.tensor(0.0) for _ in params])


@pytest.mark.parametrize("change,error,match", [
    (lambda a: a["grads"].pop(), ValueError, "grads has 1 entries for 2 params"),
    (lambda a: a["grads"].__setitem__(1, torch.randn(3, 2)), ValueError, r"grads\[1\] must match"),
    (lambda a: a["grads"].__setitem__(0, torch.randn(4, dtype=torch.float64)), ValueError, r"grads\[0\] must match"),
    (lambda a: a["exp_avgs"].__setitem__(0, torch.zeros(4, dtype=torch.bfloat16)), ValueError, r"exp_avgs\[0\]"),
    (lambda a: a["exp_avg_sqs"].__setitem__(1, torch.zeros(6)), ValueError, r"exp_avg_sqs\[1\]"),
    (lambda a: a["steps"].__setitem__(0, torch.tensor(0, dtype=torch.int64)), ValueError, r"steps\[0\]"),
    (lambda a: a["params"].__setitem__(0, torch.zeros(4, dtype=torch.int32)), TypeError, "floating point"),
    (lambda a: a["grads"].__setitem__(0, torch.randn(4).to_sparse()), RuntimeError, "sparse"),
    (lambda a: a.update(lr=[1e-3]), ValueError, "lr has 1 values for 2 parameters"),
    (lambda a: a.update(lr=float("nan")), ValueError, "lr must be a finite number"),
    (lambda a: a.update(beta1=1.0), ValueError, "beta1 must be in"),
    (lambda a: a.update(eps=-1.0), ValueError, "eps must be"),
    (lambda a: a.update(weight_decay="0.1"), TypeError, "weight_decay must be"),
    (lambda a: a.update(found_inf=torch.zeros(2)), TypeError, "found_inf must be"),
    (lambda a: a.update(master_params=[torch.zeros(4), None]), ValueError, "16-bit parameters"),
    (lambda a: a.update(backend="tpu"), ValueError, "unknown backend"),
    (lambda a: a["params"].__setitem__(1, a["params"][0]) or a["grads"].__setitem__(1, torch.randn(4))
     or a["exp_avgs"].__setitem__(1, torch.zeros(4)) or a["exp_avg_sqs"].__setitem__(1, torch.zeros(4)),
     ValueError, r"params\[0\] and params\[1\] share memory"),
    (lambda a: a["exp_avg_sqs"].__setitem__(0, a["exp_avgs"][0]), ValueError, r"exp_avgs\[0\] and exp_avg_sqs\[0\] share"),
    (lambda a: a["exp_avgs"].__setitem__(0, torch._neg_view(torch.zeros(4))), ValueError, "not a negative view"),
])
def test_functional_bad_input(change, error, match):
    args = _functional_args()
    args.setdefault("lr", 1e-3)
    change(args)
    params, grads, m, v, steps = (args.pop(k) for k in ("params", "grads", "exp_avgs", "exp_avg_sqs", "steps"))
    before = [p.clone() for p in params]
    with pytest.raises(error, match=match):
        fastcore.adamw_step(params, grads, m, v, steps, **args)
    assert all(torch.equal(a, b) for a, b in zip(params, before))  # refused before touching anything


@pytest.mark.parametrize("backend", [b for _, b in BACKENDS])
def test_negative_views_step_as_their_values(backend):
    """torch marks some tensors negated without changing their memory (x.conj().imag); the kernels
    read memory, so a negated parameter or gradient must be stepped as the values it shows."""
    args = _functional_args()
    want = [p.clone() for p in args["params"]]
    fastcore.adamw_step(want, args["grads"], [m.clone() for m in args["exp_avgs"]],
                        [v.clone() for v in args["exp_avg_sqs"]], [s.clone() for s in args["steps"]], lr=0.1,
                        backend="reference")
    # The same values, negated memory: the first parameter and the second gradient (both would cancel).
    params = [torch._neg_view(p.neg()) if i == 0 else p for i, p in enumerate(args["params"])]
    grads = [torch._neg_view(g.neg()) if i == 1 else g for i, g in enumerate(args["grads"])]
    fastcore.adamw_step(params, grads, args["exp_avgs"], args["exp_avg_sqs"], args["steps"], lr=0.1, backend=backend)
    for got, w in zip(params, want):
        assert_close(got.resolve_neg(), w, torch.float32)


# ---------------------------------------------------------------- GPU
@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_gpt2_small_on_gpu_matches_torch_fused(backend):
    shapes = bench_adamw.gpt2_small_shapes()
    assert len(shapes) == 148 and 124e6 < sum(torch.Size(s).numel() for s in shapes) < 125e6
    ours_p, torch_p = make_params(shapes, device="cuda"), make_params(shapes, device="cuda")
    ours = FusedAdamW(ours_p, lr=1e-3, weight_decay=0.1, backend=backend)
    theirs = torch.optim.AdamW(torch_p, lr=1e-3, weight_decay=0.1, fused=True)
    for step in range(5):
        gen = torch.Generator(device="cuda").manual_seed(step)
        for p, q in zip(ours_p, torch_p):
            p.grad = torch.randn(p.shape, device="cuda", generator=gen)
            q.grad = p.grad.clone()
        ours.step()
        theirs.step()
    for a, b in zip(ours_p, torch_p):
        assert_close(a, b, torch.float32)
        for key in ("exp_avg", "exp_avg_sq"):  # tight enough to see a float-rounded 1 - beta2
            assert_close(ours.state[a][key], theirs.state[b][key], torch.float32, key)
