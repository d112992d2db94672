"""One rank of a data-parallel test: ``python dist_worker.py SCENARIO RANK WORLD PORT OUT [JSON options]``.

Every rank joins a gloo group on 127.0.0.1 (20 s collective timeout), runs the scenario and writes its
result as JSON to ``OUT.<rank>``. Rank 0 also computes the single-process reference on the global batch.
"""
import contextlib
import copy
import dataclasses
import gc
import json
import os
import pickle
import sys
import time
import weakref
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.utils.checkpoint
from torch import nn

from fastcore.distributed import DataParallel, data_parallel

GLOBAL_BATCH = 12  # divides by 2 and 3 ranks


class Net(nn.Module):
    """Layers registered in an order other than their use, and one layer used twice."""

    def __init__(self):
        super().__init__()
        self.head = nn.Linear(16, 3)
        self.shared = nn.Linear(16, 16)
        self.embed = nn.Linear(5, 16)
        self.norm = nn.LayerNorm(16)
        self.unused = nn.Linear(2, 2)

    def forward(self, x, use_unused=False):
        h = torch.tanh(self.shared(torch.tanh(self.shared(self.embed(x)))))
        out = self.head(self.norm(h))
        return out + self.unused(torch.zeros(1, 2)).sum() * 0 if use_unused else out


def data(step, n=GLOBAL_BATCH):
    gen = torch.Generator().manual_seed(100 + step)
    return torch.randn(n, 5, generator=gen), torch.randn(n, 3, generator=gen)


def shard(t, rank, world):
    per = t.shape[0] // world
    return t[rank * per:(rank + 1) * per]


def loss_fn(model, x, y, **kw):
    return nn.functional.mse_loss(model(x, **kw), y)


def make_model():
    torch.manual_seed(0)
    return Net()


def rel_err(a, b):
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def train_parity(rank, world, opts, micro=1, steps=5):
    """DataParallel over shards against one process on the whole batch, micro-batches accumulated."""
    torch.manual_seed(0 if rank == 0 else 1000 + rank)  # other ranks start elsewhere: the broadcast must fix it
    model = Net()
    dp = DataParallel(model, **opts)
    # Plain SGD: unlike Adam it does not cancel a wrong scale, so a sum instead of an average shows.
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    stats = []
    for step in range(steps):
        for m in range(micro):
            x, y = data(step * micro + m)
            with dp.no_sync() if m < micro - 1 else contextlib.nullcontext():
                (loss_fn(dp, shard(x, rank, world), shard(y, rank, world), use_unused=True) / micro).backward()
        opt.step()
        opt.zero_grad(set_to_none=step % 2 == 0)  # both: gradients re-adopted into buckets, and zeroed in place
        stats.append(dp.stats)
    result = {"stats": stats, "buckets": [b.params for b in dp._buckets]}
    if rank == 0:
        ref = make_model()
        ref_opt = torch.optim.SGD(ref.parameters(), lr=0.1)
        for step in range(steps):
            for m in range(micro):
                x, y = data(step * micro + m)
                (loss_fn(ref, x, y, use_unused=True) / micro).backward()
            ref_opt.step()
            ref_opt.zero_grad()
        result["err"] = max(rel_err(p.detach(), q.detach()) for p, q in zip(model.parameters(), ref.parameters()))
    return result


def compress(rank, world, opts):
    model = make_model()
    dp = DataParallel(model, compress=opts["compress"], bucket_cap_mb=0.001, first_bucket_mb=0.0005)
    x, y = data(0)
    loss_fn(dp, shard(x, rank, world), shard(y, rank, world), use_unused=True).backward()
    result = {}
    if rank == 0:
        ref = make_model()
        loss_fn(ref, x, y, use_unused=True).backward()
        result["err"] = max(rel_err(p.grad, q.grad) for p, q in zip(model.parameters(), ref.parameters())
                            if q.grad is not None)
        result["dtypes"] = sorted({str(p.grad.dtype) for p in model.parameters() if p.grad is not None})
    return result


def unused(rank, world, opts):
    model = make_model()
    dp = DataParallel(model, find_unused_parameters=opts["find"])
    x, y = data(0)
    try:
        loss_fn(dp, shard(x, rank, world), shard(y, rank, world)).backward()
    except RuntimeError as exc:
        return {"error": str(exc)}
    unused_everywhere = model.unused.weight.grad is None
    model.zero_grad()
    # Used on rank 0 only: reduced with zeros from the others (its gradient here is zero too: x 0).
    loss_fn(dp, shard(x, rank, world), shard(y, rank, world), use_unused=rank == 0).backward()
    return {"unused everywhere keeps None": unused_everywhere,
            "used on one rank": model.unused.weight.grad is not None and not model.unused.weight.grad.any()}


def double_backward(rank, world, opts):
    """create_graph=True is refused on every rank before any collective, then a plain step still works."""
    model = make_model()
    dp = DataParallel(model, find_unused_parameters=True)
    x, y = data(0)
    try:
        loss_fn(dp, shard(x, rank, world), shard(y, rank, world)).backward(create_graph=True)
    except RuntimeError as exc:
        error = str(exc)
    model.zero_grad(set_to_none=True)
    loss_fn(dp, shard(x, rank, world), shard(y, rank, world), use_unused=True).backward()
    return {"error": error, "grads": all(p.grad is not None for p in model.parameters() if p.requires_grad)}


def die(rank, world, opts):
    model = make_model()
    dp = DataParallel(model)
    if rank == world - 1:
        os._exit(3)  # a rank that dies mid-run, without a word
    x, y = data(0)
    try:
        loss_fn(dp, shard(x, rank, world), shard(y, rank, world), use_unused=True).backward()
        dist.barrier()
    except Exception as exc:  # gloo reports the lost peer or the timeout
        return {"error": f"{type(exc).__name__}: {exc}"[:500]}
    return {"error": None}


class Blocks(nn.Module):
    """Three blocks under reentrant activation checkpointing, plus a branch used only on request."""

    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList(nn.Sequential(nn.Linear(5, 5), nn.Tanh()) for _ in range(3))
        self.branch = nn.Linear(5, 5)
        self.frozen = nn.Linear(5, 5).requires_grad_(False)

    def forward(self, x, use_branch=True):
        for block in self.blocks:
            x = torch.utils.checkpoint.checkpoint(block, x, use_reentrant=True) if x.requires_grad else block(x)
        x = self.frozen(x)
        return self.branch(x) if use_branch else x


def nondense(rank, world, opts):
    """A parameter and a buffer that are strided slices (not dense): rank 0's values on every rank,
    at construction and, for the buffer, before each training forward."""
    torch.manual_seed(rank)
    model = nn.Linear(6, 4)
    model.weight = nn.Parameter(torch.randn(4, 12)[:, ::2])
    model.register_buffer("running", torch.randn(3, 8)[:, ::2])
    dp = DataParallel(model)
    result = {"weight": model.weight.tolist(), "at_start": model.running.tolist()}
    with torch.no_grad():
        model.running.add_(rank)
    dp(torch.randn(2, 6)).sum().backward()
    result["after_forward"] = model.running.tolist()
    return result


def grads(rank, world, opts):
    """Gradients after DataParallel against one process on the global batch, for the awkward cases."""
    mode = opts["mode"]
    torch.manual_seed(0 if rank == 0 else 7 + rank)
    model = Blocks()
    dp = DataParallel(model, find_unused_parameters=mode.startswith("unused_nosync"))
    branch_in_no_sync = (lambda r: r == 0) if mode == "unused_nosync_rank0" else (lambda r: True)
    x, y = data(0)
    x, y = x.requires_grad_(), y[:, :1].expand(-1, 5).contiguous()
    result = {"frozen": model.frozen.weight.sum().item()}
    if mode == "checkpoint":
        loss_fn(dp, shard(x, rank, world), shard(y, rank, world)).backward()
    elif mode.startswith("unused_nosync"):  # the branch takes part only in the no_sync micro-batch (of rank 0)
        with dp.no_sync():
            (loss_fn(dp, shard(x, rank, world)[:3], shard(y, rank, world)[:3],
                     use_branch=branch_in_no_sync(rank)) / 2).backward()
        (loss_fn(dp, shard(x, rank, world)[3:], shard(y, rank, world)[3:], use_branch=False) / 2).backward()
    elif mode == "one_rank_unused":  # rank 1 leaves the branch out: it alone raises, nobody hangs
        try:
            loss_fn(dp, shard(x, rank, world), shard(y, rank, world), use_branch=rank != 1).backward()
        except RuntimeError as exc:
            result["error"] = str(exc)
        return result
    if rank == 0:
        torch.manual_seed(0)
        ref = Blocks()
        xs = [shard(x, r, world) for r in range(world)]
        ys = [shard(y, r, world) for r in range(world)]
        for r in range(world):
            if mode == "checkpoint":
                (loss_fn(ref, xs[r], ys[r]) / world).backward()
            else:
                (loss_fn(ref, xs[r][:3], ys[r][:3], use_branch=branch_in_no_sync(r)) / 2 / world).backward()
                (loss_fn(ref, xs[r][3:], ys[r][3:], use_branch=False) / 2 / world).backward()
        result["err"] = max(rel_err(p.grad, q.grad) for p, q in zip(model.parameters(), ref.parameters())
                            if q.grad is not None)
    g = model.branch.weight.grad
    result["branch_grad"] = None if g is None else g.reshape(-1).tolist()
    return result


class Layouts(nn.Module):
    """Parameters that are dense but not contiguous: a channels_last conv weight, a transposed matrix."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.proj = nn.Parameter(torch.randn(5, 4).t())  # (4, 5) with strides (1, 4)
        self.out = nn.Linear(5, 2)

    def forward(self, x):
        return self.out(torch.tanh(self.conv(x)).mean((2, 3)) @ self.proj)


def layouts(rank, world, opts):
    """Three SGD steps against one process on the global batch: fresh gradients, gradients set to
    None, then zeroed in place with one set by hand in the contiguous layout. Gradients keep their
    parameter's strides; ``eager`` counts those copied into their bucket from their own hook."""
    def build(seed=0):
        torch.manual_seed(seed)
        return Layouts().to(memory_format=torch.channels_last)

    def batch(step):
        gen = torch.Generator().manual_seed(200 + step)
        x = torch.randn(GLOBAL_BATCH, 3, 6, 6, generator=gen).to(memory_format=torch.channels_last)
        return x, torch.randn(GLOBAL_BATCH, 2, generator=gen)

    model, ref = build(0 if rank == 0 else 5 + rank), build()  # the broadcast must bring rank 0's weights
    dp = DataParallel(model, **opts)
    opt, ref_opt = torch.optim.SGD(model.parameters(), lr=0.1), torch.optim.SGD(ref.parameters(), lr=0.1)
    result = {"err": 0.0, "strides": [], "views": [], "eager": []}
    for step in range(3):
        x, y = batch(step)
        if step == 2:  # the same on every rank, so the average keeps it whole
            by_hand = torch.randn(model.conv.weight.shape, generator=torch.Generator().manual_seed(3))
            model.conv.weight.grad, ref.conv.weight.grad = by_hand, by_hand.clone()  # contiguous: not the weight's layout
        nn.functional.mse_loss(dp(shard(x, rank, world)), shard(y, rank, world)).backward()
        result["eager"].append(sum(dp._scaled))
        nn.functional.mse_loss(ref(x), y).backward()
        result["err"] = max(result["err"], *(rel_err(p.grad, q.grad) for p, q in zip(model.parameters(),
                                                                                     ref.parameters())))
        result["strides"].append(all(p.grad.stride() == p.stride() for p in model.parameters()))
        buffers = [(b.data_ptr(), b.data_ptr() + b.numel() * b.element_size()) for b in dp._bucket_data]
        result["views"].append(all(any(lo <= p.grad.data_ptr() < hi for lo, hi in buffers)
                                   for p in model.parameters()))
        opt.step()
        ref_opt.step()
        opt.zero_grad(set_to_none=step == 0)
        ref_opt.zero_grad()
    return result


def mismatch(rank, world, opts):
    """Rank 1 builds the model in another memory format: every rank refuses it, before any broadcast."""
    model = Layouts()
    if rank == 0:
        model = model.to(memory_format=torch.channels_last)
    try:
        DataParallel(model)
    except ValueError as exc:
        return {"error": str(exc)}
    return {"error": None}


@dataclasses.dataclass
class Pair:
    a: torch.Tensor
    b: torch.Tensor


class AttrDict(dict):
    """A dict subclass, as EasyDict-style outputs are; torch's pytree does not look inside it."""


class Towers(nn.Module):
    """Two towers and a learnable temperature, for the ways a forward's output reaches the loss."""

    def __init__(self):
        super().__init__()
        self.img, self.txt = nn.Linear(5, 4), nn.Linear(5, 4)
        self.logit_scale = nn.Parameter(torch.tensor(0.5))

    def forward(self, x, kind):
        if kind in ("img", "txt"):
            return getattr(self, kind)(x)
        a, b = self.img(x), self.txt(x)
        if kind == "pair":  # logit_scale is left to the loss
            return a, b
        b = b * self.logit_scale
        return {"dataclass": Pair(a, b), "dict subclass": AttrDict(a=a, b=b), "sum": a + b}[kind]


def _towers_loss(case, m, x, seen, scale=1.0):
    temperature = getattr(m, "module", m).logit_scale  # used after the forward in some cases
    if case in ("dataclass", "dict subclass"):
        out = m(x, case)
        a, b = (out.a, out.b) if case == "dataclass" else (out["a"], out["b"])
        return (a * b).sum()
    if case == "in-place on the output":
        return m(x, "sum").mul_(2).relu_().square().sum()
    if case == "two forwards, one backward":
        return (m(x, "img") * m(x, "txt")).sum() * temperature
    if case == "a gradient penalty through autograd.grad":  # reaches no parameter: reduces nothing
        x = x.clone().requires_grad_()
        out = m(x, "sum")
        (dx,) = torch.autograd.grad(out.square().sum(), x, create_graph=True)
        return out.sum() + dx.square().sum()
    if case.endswith("checkpointing around the wrapper"):  # its forward runs again inside the backward
        reentrant = case.startswith("reentrant")
        x = x.clone().requires_grad_() if reentrant else x  # reentrant checkpointing needs one
        return torch.utils.checkpoint.checkpoint(m, x, "sum", use_reentrant=reentrant).square().sum()
    a, b = m(x, "pair")
    if case == "an evaluation forward before the backward":
        with torch.no_grad():
            m(x, "sum")
    if case == "a second loss through kept outputs":  # two passes, each averaged
        ((a * b).sum() * temperature.exp() * scale).backward(retain_graph=True)
        return (a * b).square().sum() * temperature
    if case in ("parameter used after the forward", "an evaluation forward before the backward"):
        return (a * b).sum() * temperature.exp()
    b.register_hook(lambda g: seen.append(case))  # "an unused output": no gradient may reach it
    return a.sum() * temperature


TOWER_CASES = ("dataclass", "dict subclass", "in-place on the output", "two forwards, one backward",
               "parameter used after the forward", "an unused output", "a gradient penalty through autograd.grad",
               "reentrant checkpointing around the wrapper", "non-reentrant checkpointing around the wrapper",
               "an evaluation forward before the backward",
               "a second loss through kept outputs")


def outputs(rank, world, opts):
    """Each case's gradients after one backward against one process on the global batch."""
    x = data(0)[0]
    result, seen = {}, []
    for case in TOWER_CASES:
        torch.manual_seed(0)
        model = Towers()
        dp = DataParallel(model, find_unused_parameters=case == "an unused output", **opts)
        try:
            _towers_loss(case, dp, shard(x, rank, world), seen).backward()
        except RuntimeError as e:
            result[case] = str(e)[:300]
            continue
        result[case] = None  # rank 0 puts the error against the reference here
        if rank == 0:
            torch.manual_seed(0)
            ref = Towers()
            for r in range(world):
                (_towers_loss(case, ref, shard(x, r, world), [], 1 / world) / world).backward()
            result[case] = max(rel_err(p.grad, q.grad) for (n, p), q in zip(model.named_parameters(), ref.parameters())
                               if not (case == "an unused output" and n.startswith("txt.")))
    result["unused output got a gradient"] = seen
    return result


class _Boom(torch.autograd.Function):
    """Identity whose backward raises once: a backward pass that stops midway."""
    armed = True

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g):
        if _Boom.armed:
            _Boom.armed = False
            raise ValueError("boom")
        return g


def interrupted(rank, world, opts):
    """A backward that raised midway (some buckets already in flight), then normal steps: each one's
    gradients are the global batch's, and a frozen wrapped module in the loss starts no reduction."""
    torch.manual_seed(0)
    model, pre = Net(), nn.Linear(5, 5)
    ref = copy.deepcopy(model)
    dp = DataParallel(model, bucket_cap_mb=1e-4, first_bucket_mb=1e-4)
    errors, errs = [], []
    for step in range(3):
        x, y = data(step)
        xs, ys = shard(x, rank, world), shard(y, rank, world)
        try:
            loss_fn(dp, _Boom.apply(xs.clone().requires_grad_()), ys, use_unused=True).backward()  # raises last
        except ValueError as e:
            errors.append(str(e))
            model.zero_grad()
            continue
        for r in range(world):
            (loss_fn(ref, shard(x, r, world), shard(y, r, world), use_unused=True) / world).backward()
        errs.append(max(rel_err(p.grad, q.grad) for p, q in zip(model.parameters(), ref.parameters())))
        model.zero_grad(set_to_none=False)
        ref.zero_grad()
    model.requires_grad_(False)  # frozen, as a GAN's discriminator in the generator's step
    loss_fn(dp, pre(xs), ys, use_unused=True).backward()
    return {"errors": errors, "errs": errs,
            "frozen grads untouched": all(p.grad is None or not p.grad.any() for p in model.parameters()),
            "pre has a gradient": pre.weight.grad is not None}


def evaluate(rank, world, opts):
    """Ranks evaluate different numbers of batches without grad, then train a step: nothing waits."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 4), nn.BatchNorm1d(4), nn.Linear(4, 3))
    dp = DataParallel(model)
    with torch.no_grad():
        for step in range(3 - rank):
            dp(data(step)[0])
    loss_fn(dp, *data(5)).backward()
    return {"grad": model[0].weight.grad.sum().item()}


def copies(rank, world, opts):
    """A deepcopy and an unpickled copy of the wrapper train on their own, averaging over the ranks."""
    torch.manual_seed(0)
    dp = DataParallel(Net())
    x, y = data(0)
    result = {}
    for name, twin in (("deepcopy", copy.deepcopy(dp)), ("pickle", pickle.loads(pickle.dumps(dp)))):
        loss_fn(twin, shard(x, rank, world), shard(y, rank, world), use_unused=True).backward()
        result[name] = [p.grad.sum().item() for p in twin.module.parameters() if p.grad is not None]
        result[name + " shares the original's parameters"] = any(
            p is q for p, q in zip(twin.module.parameters(), dp.module.parameters()))
    if rank == 0:
        torch.manual_seed(0)
        ref = Net()
        loss_fn(ref, x, y, use_unused=True).backward()
        result["reference"] = [p.grad.sum().item() for p in ref.parameters() if p.grad is not None]
    return result


def lifecycle(rank, world, opts):
    """A dropped wrapper is freed with its hooks; what it cannot reduce is refused with the reason."""
    model = nn.Linear(4, 4)
    dp = DataParallel(model)
    gone = weakref.ref(dp)
    del dp
    gc.collect()
    result = {"freed": gone() is None}
    for name, bad in (("complex", nn.Module()), ("sparse", nn.Embedding(4, 2, sparse=True))):
        if name == "complex":
            bad.w = nn.Parameter(torch.zeros(2, dtype=torch.complex64))
        try:
            DataParallel(bad)
            result[name] = "accepted"
        except ValueError as e:
            result[name] = str(e)
    return result


def user_hooks(rank, world, opts):
    """Hooks the user puts on parameters after wrapping see this rank's own gradient, as under DDP."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3))
    local = copy.deepcopy(model)
    dp = DataParallel(model, **opts)
    seen = {}
    for n, p in model.named_parameters():
        p.register_post_accumulate_grad_hook(lambda p, n=n: seen.__setitem__(n, p.grad.clone()))
    x, y = (shard(t, rank, world) for t in data(0))
    loss_fn(dp, x, y).backward()
    loss_fn(local, x, y).backward()
    return {"err": max(rel_err(seen[n], p.grad) for n, p in local.named_parameters())}


def module(rank, world, opts):
    """The wrapper is a module like DDP's: its state_dict, buffers and load_state_dict go to the wrapped one."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 4), nn.BatchNorm1d(4), nn.Linear(4, 3))
    dp = DataParallel(model)
    loss_fn(dp, *data(0)).backward()
    state = dp.state_dict()
    expected = {"module." + k: v for k, v in model.state_dict().items()}
    same = state.keys() == expected.keys() and all(torch.equal(state[k], expected[k]) for k in state)
    dp.load_state_dict({k: torch.zeros_like(v) if k.endswith("running_mean") else v for k, v in state.items()})
    return {"same": same, "buffers": [n for n, _ in dp.named_buffers()],
            "loaded": model[1].running_mean.abs().sum().item()}


class _SlowBackward(torch.autograd.Function):
    """The identity, whose backward takes SLOW_S with no parameter of its own: as a compiled graph's
    backward, which computes everything before it hands out the parameters' gradients."""
    SLOW_S = 0.2

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g):
        time.sleep(_SlowBackward.SLOW_S)
        return g


class _Slow(nn.Module):
    def forward(self, x):
        return _SlowBackward.apply(x)


def backward_time(rank, world, opts):
    """stats' backward time counts from the outputs' first gradient, not from the first parameter's."""
    dp = DataParallel(nn.Sequential(nn.Linear(5, 3), _Slow()))
    for step in range(2):
        x, y = data(step)
        loss_fn(dp, x, y).backward()
    return {"backward_ms": dp.stats["backward_ms"], "slow_ms": _SlowBackward.SLOW_S * 1e3}


SCENARIOS = {"module": module, "outputs": outputs, "evaluate": evaluate, "copies": copies, "lifecycle": lifecycle,
             "user_hooks": user_hooks, "interrupted": interrupted,
             "parity": lambda r, w, o: train_parity(r, w, o.get("dp", {}), o.get("micro", 1)),
             "compress": compress, "unused": unused, "die": die, "grads": grads, "double_backward": double_backward,
             "layouts": layouts, "mismatch": mismatch, "nondense": nondense, "backward_time": backward_time}


def main():
    scenario, rank, world, port, out = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
    opts = json.loads(sys.argv[6]) if len(sys.argv) > 6 else {}
    if "eager_copy_bytes" in opts:  # so that the tests' small gradients take the large ones' path
        data_parallel._EAGER_COPY_BYTES = opts.pop("eager_copy_bytes")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=20))
    result = SCENARIOS[scenario](rank, world, opts)
    with open(f"{out}.{rank}", "w") as f:
        json.dump(result, f)
    if scenario != "die":
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
