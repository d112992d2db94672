"""DataParallel on gloo: several processes on 127.0.0.1 (tests/dist_worker.py), each run under a timeout,
against one process on the global batch; and bucket assignment by hand."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from conftest import free_port
from fastcore.distributed import DataParallel, assign_buckets, init_from_env

WORKER = Path(__file__).with_name("dist_worker.py")
TIMEOUT_S = 120


def run_ranks(scenario: str, world: int, tmp_path, **opts) -> list:
    """Each rank's JSON result (None for a rank that wrote none); fails the test on a hang."""
    out, port = tmp_path / scenario, free_port()
    env = dict(os.environ, OMP_NUM_THREADS="1")
    procs = [subprocess.Popen([sys.executable, str(WORKER), scenario, str(r), str(world), str(port), str(out),
                               json.dumps(opts)], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for r in range(world)]
    logs = []
    try:
        for p in procs:
            logs.append(p.communicate(timeout=TIMEOUT_S))
    except subprocess.TimeoutExpired:
        for p in procs:
            p.kill()
        pytest.fail(f"{scenario}: a rank hung past {TIMEOUT_S} s")
    results = []
    for r, (p, (_, err)) in enumerate(zip(procs, logs)):
        path = Path(f"{out}.{r}")
        results.append(json.loads(path.read_text()) if path.exists() else None)
        if scenario != "die":
            assert p.returncode == 0, f"rank {r}: {err[-3000:]}"
    return results


@pytest.mark.parametrize("world,dp", [
    (1, {}),                                                       # no scaling pass at all
    (1, {"bucket_cap_mb": 0.001, "eager_copy_bytes": 0}),
    (2, {}),                                                       # default caps: one bucket
    (3, {}),
    (2, {"bucket_cap_mb": 0.0005, "first_bucket_mb": 0.0002}),     # many tiny buckets
    (2, {"bucket_cap_mb": 100, "first_bucket_mb": 100}),           # a single bucket
    (2, {"gradient_as_bucket_view": False, "bucket_cap_mb": 0.001}),
    (2, {"bucket_cap_mb": 0.001, "eager_copy_bytes": 0}),          # every fresh gradient copied from its hook
])
def test_parity_with_one_process_on_the_global_batch(tmp_path, world, dp):
    dp = dict(dp)
    eager = {"eager_copy_bytes": dp.pop("eager_copy_bytes")} if "eager_copy_bytes" in dp else {}
    results = run_ranks("parity", world, tmp_path, dp=dp, **eager)
    assert results[0]["err"] <= 1e-5, results[0]["err"]
    for r in results:
        assert r["buckets"] == results[0]["buckets"]  # the rebuilt layout is rank 0's everywhere
        assert [s["rebuilt"] for s in r["stats"]] == [False] + [True] * 4
        for s in r["stats"]:
            assert s["buckets"] == len(s["bucket_bytes"]) and 0.0 <= s["overlap"] <= 1.0
            assert s["comm_ms"] > 0 and s["backward_ms"] > 0


def test_no_sync_accumulation_parity(tmp_path):
    results = run_ranks("parity", 2, tmp_path, micro=3, dp={"bucket_cap_mb": 0.001})
    assert results[0]["err"] <= 1e-5, results[0]["err"]


def test_rebuild_follows_the_order_autograd_produced(tmp_path):
    """Net registers head, shared, embed, norm: the first layout (reverse registration) puts embed before
    shared before head, while autograd produces head's gradients first and embed's last."""
    results = run_ranks("parity", 2, tmp_path, dp={"bucket_cap_mb": 0.0005, "first_bucket_mb": 0.0002})
    names = [n for n, _ in _net().named_parameters()]
    position = {names[i]: k for k, i in enumerate(i for bucket in results[0]["buckets"] for i in bucket)}
    assert position["head.weight"] < position["shared.weight"] < position["embed.weight"], position


@pytest.mark.parametrize("compress", ["bf16", "fp16"])
def test_compressed_buckets_stay_close_to_fp32(tmp_path, compress):
    results = run_ranks("compress", 2, tmp_path, compress=compress)
    assert results[0]["err"] <= 1e-2, results[0]["err"]
    assert results[0]["dtypes"] == ["torch.float32"]  # gradients come back in the parameters' dtype


@pytest.mark.parametrize("dp,eager", [
    ({}, [0, 0, 0]),                               # every gradient under 1 MiB: one fused copy per bucket
    ({"eager_copy_bytes": 0}, [5, 5, 1]),          # each from its own hook (step 2: only the one set by hand)
    ({"eager_copy_bytes": 200}, [1, 1, 1]),        # the conv weight (432 bytes) alone: both paths in one bucket
    ({"gradient_as_bucket_view": False}, [0, 0, 0]),
    ({"compress": "bf16"}, [0, 0, 0]),
])
def test_channels_last_and_transposed_parameters_keep_their_gradient_layout(tmp_path, dp, eager):
    """Gradients are bucket views with the parameter's strides (as autograd lays them out), also after
    zero_grad(set_to_none=True) and after a gradient set by hand in another layout."""
    for r in run_ranks("layouts", 2, tmp_path, **dp):
        assert r["err"] <= (1e-2 if dp.get("compress") else 1e-5), r["err"]
        assert r["eager"] == eager
        if dp.get("gradient_as_bucket_view", True):
            assert r["strides"] == [True, True, True] and r["views"] == [True, True, True]
        else:  # the gradients stay autograd's own tensors
            assert r["strides"][:2] == [True, True] and r["views"] == [False, False, False]


def test_parameters_in_another_memory_format_on_one_rank_are_refused_on_every_rank(tmp_path):
    for r in run_ranks("mismatch", 2, tmp_path):
        assert "differs between ranks" in r["error"] and "conv.weight" in r["error"] and "rank 1" in r["error"]


@pytest.mark.gpu
def test_nccl_at_world_size_one_reduces_and_times_on_the_gpu_timeline():
    """One NCCL rank: gradients as without DataParallel, and the all-reduces timed by CUDA events."""
    code = f"""if True:
        import copy, json, torch, torch.distributed as dist
        from torch import nn
        from fastcore.distributed import DataParallel
        dist.init_process_group("nccl", init_method="tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
        torch.manual_seed(0)
        model = nn.Sequential(*[nn.Linear(1024, 1024) for _ in range(8)]).cuda()
        ref = copy.deepcopy(model)
        dp = DataParallel(model, bucket_cap_mb=4, first_bucket_mb=1)
        x = torch.randn(64, 1024, device="cuda")
        for _ in range(3):
            model.zero_grad(set_to_none=False)
            dp(x).square().mean().backward()
        ref(x).square().mean().backward()
        err = max((p.grad - q.grad).abs().max().item() for p, q in zip(model.parameters(), ref.parameters()))
        s = dp.stats
        print(json.dumps({{"err": err, "clock": type(dp._clock).__name__,
                          **{{k: s[k] for k in ("buckets", "comm_ms", "backward_ms", "overlap")}}}}))
        dist.destroy_process_group()
    """
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=TIMEOUT_S)
    assert out.returncode == 0, out.stderr[-3000:]
    r = json.loads(out.stdout.strip().splitlines()[-1])
    assert r["err"] <= 1e-6 and r["clock"] == "_GpuClock"
    assert r["buckets"] >= 2 and r["comm_ms"] > 0 and r["backward_ms"] > 0 and 0 <= r["overlap"] <= 1, r


def test_stats_backward_time_counts_from_the_outputs_gradient(tmp_path):
    """Parameter-free work inside the module before its first parameter gradient (a compiled graph's
    whole backward) is part of the backward that the all-reduces should overlap."""
    for r in run_ranks("backward_time", 2, tmp_path):
        assert r["backward_ms"] >= r["slow_ms"], r


def test_the_wrapper_is_a_module_whose_state_is_the_wrapped_ones(tmp_path):
    [r] = run_ranks("module", 1, tmp_path)
    assert r["same"] and r["loaded"] == 0.0
    assert r["buffers"] == ["module.1.running_mean", "module.1.running_var", "module.1.num_batches_tracked"]


@pytest.mark.parametrize("dp", [{}, {"bucket_cap_mb": 1e-5, "first_bucket_mb": 1e-5}])
def test_outputs_reach_the_loss_in_every_way_ddp_allows(tmp_path, dp):
    """A dataclass or dict-subclass output, an in-place op on the output, two forwards before one
    backward, a parameter used after the forward: gradients are the global batch's."""
    results = run_ranks("outputs", 2, tmp_path, **dp)
    from dist_worker import TOWER_CASES

    for case in TOWER_CASES:
        assert isinstance(results[0][case], float) and results[0][case] <= 1e-5, (case, results[0][case])
        assert results[1][case] is None, (case, results[1][case])
    assert results[0]["unused output got a gradient"] == [] == results[1]["unused output got a gradient"]


@pytest.mark.parametrize("dp", [{}, {"bucket_cap_mb": 1e-5, "first_bucket_mb": 1e-5}])
def test_the_parameters_own_hooks_see_the_local_gradient(tmp_path, dp):
    for r in run_ranks("user_hooks", 2, tmp_path, **dp):
        assert r["err"] <= 1e-6, r


def test_a_backward_that_raised_midway_leaves_the_next_steps_right(tmp_path):
    for r in run_ranks("interrupted", 2, tmp_path):
        assert r["errors"] == ["boom"]
        assert len(r["errs"]) == 2 and max(r["errs"]) <= 1e-5, r["errs"]
        assert r["frozen grads untouched"] and r["pre has a gradient"]


def test_ranks_evaluating_different_numbers_of_batches_do_not_wait_for_each_other(tmp_path):
    results = run_ranks("evaluate", 2, tmp_path)
    assert results[0]["grad"] == pytest.approx(results[1]["grad"], rel=1e-6)


def test_copies_of_the_wrapper_train_and_average_like_the_original(tmp_path):
    results = run_ranks("copies", 2, tmp_path)
    for r in results:
        for name in ("deepcopy", "pickle"):
            assert r[name] == pytest.approx(results[0]["reference"], rel=1e-5, abs=1e-6), name
            assert not r[name + " shares the original's parameters"]


def test_a_dropped_wrapper_is_freed_and_what_it_cannot_reduce_is_refused(tmp_path):
    [r] = run_ranks("lifecycle", 1, tmp_path)
    assert r["freed"]
    assert "complex parameters are not supported: w" in r["complex"]
    assert "sparse gradients are not supported: Embedding" in r["sparse"] and "sparse=False" in r["sparse"]


def test_double_backward_is_refused_on_every_rank(tmp_path):
    for r in run_ranks("double_backward", 2, tmp_path):
        assert "create_graph=True" in r["error"] and "not supported" in r["error"]
        assert r["grads"]


def test_unused_parameters_are_named_or_reduced_as_zeros_or_left_alone(tmp_path):
    refused = run_ranks("unused", 2, tmp_path, find=False)
    for r in refused:
        assert "unused.weight" in r["error"] and "unused.bias" in r["error"]
        assert "find_unused_parameters=True" in r["error"]
    allowed = run_ranks("unused", 2, tmp_path, find=True)
    assert all(r["unused everywhere keeps None"] and r["used on one rank"] for r in allowed), allowed


@pytest.mark.parametrize("mode", ["checkpoint", "unused_nosync", "unused_nosync_rank0"])
def test_checkpointing_and_gradients_kept_from_no_sync(tmp_path, mode):
    """Reentrant activation checkpointing runs nested backward passes; a parameter used only under
    no_sync (on every rank, or on rank 0 alone) keeps its accumulated gradient, which is averaged,
    the same on every rank, as DDP's. Frozen weights are rank 0's everywhere."""
    results = run_ranks("grads", 2, tmp_path, mode=mode)
    assert results[0]["err"] <= 1e-5, results[0]["err"]
    assert results[0]["frozen"] == results[1]["frozen"]
    assert results[0]["branch_grad"] is not None and results[0]["branch_grad"] == results[1]["branch_grad"]


def test_parameters_and_buffers_that_are_not_dense_take_rank_0s_values(tmp_path):
    r0, r1 = run_ranks("nondense", 2, tmp_path)
    assert r0 == r1 and r0["at_start"] == r0["after_forward"]


def test_an_unused_parameter_on_one_rank_raises_there_without_hanging_the_others(tmp_path):
    results = run_ranks("grads", 2, tmp_path, mode="one_rank_unused")
    assert "branch.weight" in results[1]["error"] and "error" not in results[0]


def test_a_dead_rank_makes_the_others_fail_not_hang(tmp_path):
    results = run_ranks("die", 2, tmp_path)
    assert results[1] is None  # it died before writing anything
    assert results[0]["error"], "the surviving rank finished as if nothing happened"


# ---------------------------------------------------------------- bucket assignment, in-process
def _net():
    sys.path.insert(0, str(WORKER.parent))
    from dist_worker import Net

    return Net()


def test_buckets_respect_caps_and_never_split_a_tensor():
    params = [torch.zeros(n) for n in (10, 20, 30, 5, 100, 7)]  # float32: 4 bytes each
    buckets = assign_buckets(params, list(reversed(range(6))), bucket_cap_bytes=4 * 40, first_bucket_bytes=4 * 10)
    assert [b.params for b in buckets] == [[5], [4], [3, 2], [1, 0]]  # first cap 10 elements, then 40
    assert [b.offsets for b in buckets] == [[0], [0], [0, 5], [0, 20]]
    assert [b.numel for b in buckets] == [7, 100, 35, 30]  # the 100-element tensor alone, over the cap
    for b in buckets:
        assert b.nbytes == 4 * b.numel


def test_buckets_separate_dtypes_and_follow_the_order():
    params = [torch.zeros(4), torch.zeros(4, dtype=torch.bfloat16), torch.zeros(4), torch.zeros(4, dtype=torch.bfloat16)]
    buckets = assign_buckets(params, [3, 2, 1, 0], bucket_cap_bytes=1 << 20, first_bucket_bytes=1 << 20)
    assert [(b.dtype, b.params) for b in buckets] == [(torch.bfloat16, [3, 1]), (torch.float32, [2, 0])]


def test_bucket_assignment_rejects_bad_arguments():
    params = [torch.zeros(3), torch.zeros(3)]
    with pytest.raises(ValueError, match="order must list every parameter"):
        assign_buckets(params, [0, 0], 100, 100)
    with pytest.raises(ValueError, match="bucket caps must be > 0"):
        assign_buckets(params, [0, 1], 0, 100)


@pytest.mark.parametrize("kwargs,error,match", [
    (dict(compress="int8"), ValueError, "compress must be None, 'bf16' or 'fp16'"),
    (dict(bucket_cap_mb=0), ValueError, r"bucket_cap_mb must be a finite number of MiB, at least one byte"),
    (dict(first_bucket_mb=-1), ValueError, "first_bucket_mb must be a finite number of MiB"),
    (dict(bucket_cap_mb=float("inf")), ValueError, "bucket_cap_mb must be a finite number of MiB"),
    (dict(first_bucket_mb=1e-9), ValueError, r"first_bucket_mb must be .* at least one byte \(2\*\*-20\), got 1e-09"),
    (dict(), RuntimeError, "torch.distributed is not initialised"),
])
def test_data_parallel_rejects_bad_arguments(kwargs, error, match):
    with pytest.raises(error, match=match):
        DataParallel(nn.Linear(2, 2), **kwargs)


def test_init_from_env_needs_torchrun(monkeypatch):
    for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(k, raising=False)
    with pytest.raises(RuntimeError, match="torchrun"):
        init_from_env()
