"""Data parallelism: fastcore's DataParallel against torch's DistributedDataParallel, with the same
bucket sizes, on the same model and data, in the same run.

    fastcore bench data_parallel [--quick]

Two gloo ranks on CPU: this process is rank 0 and times the steps; a follower process (rank 1) runs
the same step for each one, on a command broadcast by rank 0 (both providers pay that broadcast).
Each rank has one thread. A step is forward + backward + the gradient all-reduce of a ~10M-parameter
MLP; ``stats`` of the last fastcore step give the overlap of communication with the backward pass.
Two cases: gradients zeroed in place (they stay bucket views, nothing is copied) and set to None
(``zero_grad()``'s default: each fresh gradient is copied into its bucket, scaled on the way).
The floor is the all-reduce itself: 2 ranks move ~40 MB of fp32 gradients through gloo per step.

    fastcore bench data_parallel_overhead

World size 1: the trainer's step alone, wrapped in DataParallel, and wrapped in DDP (gloo on CPU, NCCL
on a GPU), on bench_train's case. Speedups are over the plain step, so 1/speedup - 1 is the overhead.
"""
from __future__ import annotations

import atexit
import functools
import os
import subprocess
import sys
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import nn

from fastcore.bench import bench_train
from fastcore.bench.harness import (Benchmark, Case, free_port, keep_freed_memory_in_the_heap, park_openmp_workers,
                                    register, step_from_provider)
from fastcore.distributed import DataParallel

WORLD = 2
WIDTH, DEPTH, BATCH = 1152, 2, 16  # 2 blocks of 1152 -> 2304 -> 1152: 10.6M parameters
PROVIDERS = ("fastcore-cpu", "torch")
_STOP, _SETUP, _STEP = 0, 1, 2
TO_NONE = "zero_grad to None"
# The harness visits this benchmark once per pass, with every other benchmark in between: the follower
# waits that long for its next command.
TIMEOUT = timedelta(hours=2)


def model() -> nn.Module:
    torch.manual_seed(0)
    layers = []
    for _ in range(DEPTH):
        layers += [nn.Linear(WIDTH, WIDTH * 2), nn.GELU(), nn.Linear(WIDTH * 2, WIDTH)]
    return nn.Sequential(*layers)


def wrap(provider: str, module: nn.Module) -> nn.Module:
    if provider == "torch":
        # Views too, as fastcore does: DDP's default (False) copies each gradient and runs slower.
        return nn.parallel.DistributedDataParallel(module, bucket_cap_mb=25, gradient_as_bucket_view=True)
    return DataParallel(module, bucket_cap_mb=25, first_bucket_mb=1)


def _train_step(net: nn.Module, x: torch.Tensor, to_none: bool):
    """One forward and backward, after gradients are zeroed in place or set to None."""
    for p in net.parameters():
        if to_none:
            p.grad = None
        elif p.grad is not None:
            p.grad.zero_()
    net(x).square().mean().backward()


class _Group:
    """Rank 0 of a 2-rank gloo group, with the follower process as rank 1."""

    def __init__(self):
        port = free_port()
        env = dict(os.environ, OMP_NUM_THREADS="1", OMP_WAIT_POLICY="PASSIVE")  # one thread, none spinning
        self.follower = subprocess.Popen([sys.executable, "-m", "fastcore.bench.bench_data_parallel", str(port)], env=env)
        atexit.register(self.close)
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=WORLD,
                                timeout=TIMEOUT)
        self.solo = dist.new_group([0])  # every rank creates it; only rank 0 uses it (world size 1)
        self.nets: dict = {}

    def command(self, op: int, provider: int = 0, to_none: bool = False) -> None:
        dist.broadcast(torch.tensor([op, provider, int(to_none)]), 0)

    def close(self) -> None:
        try:
            if dist.is_initialized():
                self.command(_STOP)
                dist.destroy_process_group()
            self.follower.wait(timeout=60)
        except Exception:  # never leave the follower behind
            self.follower.kill()


_group: _Group | None = None


def _single_threaded(fn):
    def run(*args):
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        park_openmp_workers()  # a spinning worker of this process would take the follower's core
        try:
            return fn(*args)
        finally:
            torch.set_num_threads(threads)
    return run


def setup(make: functools.partial, case: Case, device: str):
    global _group
    provider = make.args[0]
    if _group is None:
        _group = _Group()
    index, to_none = PROVIDERS.index(provider), case.tag.endswith(TO_NONE)
    _group.command(_SETUP, index)
    net = _group.nets[provider] = make(model())
    x = torch.randn(BATCH, WIDTH, generator=torch.Generator().manual_seed(1))

    @_single_threaded
    def step():
        _group.command(_STEP, index, to_none)
        _train_step(net, x, to_none)
    step.extras = lambda: _overlap(net)
    return step


def _overlap(net) -> dict:
    """fastcore's own measure, from the last step; DDP exposes none."""
    stats = getattr(net, "stats", None)
    return {"overlap": stats["overlap"], "buckets": stats["buckets"]} if stats else {}


def providers(device: str) -> dict:
    if device != "cpu":
        return {name: "the GPU run needs NCCL and several GPUs; not written yet" for name in PROVIDERS}
    return {name: functools.partial(wrap, name) for name in PROVIDERS}


def cases(device: str, quick: bool) -> list[Case]:
    shape = (WORLD, sum(p.numel() for p in model().parameters()))
    return [] if quick else [Case(shape, torch.float32, "step", size=WIDTH, tag=tag)
                             for tag in ("gloo mlp", f"gloo mlp, {TO_NONE}")]


def _follower(port: int) -> None:
    keep_freed_memory_in_the_heap()  # as the harness does in rank 0
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=1, world_size=WORLD,
                            timeout=TIMEOUT)
    dist.new_group([0])  # rank 0's world-size-1 group: creating it takes every rank
    nets = {}
    x = torch.randn(BATCH, WIDTH, generator=torch.Generator().manual_seed(2))
    while True:
        cmd = torch.zeros(3, dtype=torch.int64)
        dist.broadcast(cmd, 0)
        op, provider, to_none = int(cmd[0]), PROVIDERS[int(cmd[1])], bool(cmd[2])
        if op == _STOP:
            break
        if op == _SETUP:
            nets[provider] = wrap(provider, model())
        else:
            _train_step(nets[provider], x, to_none)
    dist.destroy_process_group()


register(Benchmark(op="data_parallel", providers=providers, cases=cases, setup=setup,
                   work=lambda case: ("bytes", 4 * case.shape[1]), size_name="hidden width (2 gloo ranks)",
                   baseline="torch"))


# ---------------------------------------------------------------- world size 1: what the wrapper costs
# The trainer's step (bench_train's: fastcore kernels, clipping, AdamW, zero_grad to None) on its own,
# wrapped in DataParallel and wrapped in DDP, each over a process group of this process alone: gloo
# on CPU, NCCL on a GPU. The target is an overhead of at most 2% of a GPT-2-small step on one GPU.
OVERHEAD = ("plain", "fastcore-DataParallel", "torch-DDP")


def _solo_group(device: str):
    global _group
    if device == "cpu":
        if _group is None:
            _group = _Group()
        return _group.solo
    if not dist.is_initialized():
        dist.init_process_group("nccl", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1,
                                timeout=TIMEOUT)
        atexit.register(dist.destroy_process_group)
    if dist.get_world_size() != 1:
        raise RuntimeError(f"data_parallel_overhead measures world size 1; this process is one of "
                           f"{dist.get_world_size()} ranks (run it without torchrun)")
    return dist.group.WORLD


def _wrapped_train_step(provider: str, case: Case, device: str):
    step = bench_train.TrainStep("fastcore", False, case, device)
    if provider != "plain":
        group = _solo_group(device)
        step.model = (DataParallel(step.raw, process_group=group) if provider.startswith("fastcore") else
                      nn.parallel.DistributedDataParallel(step.raw, process_group=group, bucket_cap_mb=25,
                                                          gradient_as_bucket_view=True))
    return step


def overhead_providers(device: str) -> dict:
    reason = bench_train._why_no_fastcore(device)
    return {name: reason or functools.partial(_wrapped_train_step, name) for name in OVERHEAD}


register(Benchmark(op="data_parallel_overhead", providers=overhead_providers, cases=bench_train.cases,
                   setup=step_from_provider, work=bench_train.work,
                   size_name="tokens per step (world size 1)", baseline="plain"))

if __name__ == "__main__":
    _follower(int(sys.argv[1]))
