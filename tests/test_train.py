"""The trainer: the model against its PyTorch twin, learning, exact resume, torchrun parity,
checkpoints, sampling, metrics and the one-line errors of the CLI."""
import importlib.util
import inspect
import json
import math
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import assert_close, free_port, without_key_bias
from fastcore import cli
from fastcore.train import checkpoint, data, loop
from fastcore.train.loop import Batches, TrainConfig, TrainError, lr_at, peak_flops, train
from fastcore.train.model import GPT, PRESETS, GPTConfig
from fastcore.train.sample import sample

SMALL = dict(preset="tiny", n_layer=1, n_embd=64, n_head=2, block_size=32, batch_size=4, progress=False, device="cpu")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    """~150 KB of the stdlib's source (argparse, random, textwrap), prepared with the byte tokenizer."""
    import argparse, inspect, random, textwrap  # noqa: E401 (sources to train on)

    src = tmp_path_factory.mktemp("src")
    for m in (argparse, random, textwrap):
        (src / f"{m.__name__}.py").write_text(inspect.getsource(m))
    out = tmp_path_factory.mktemp("data")
    data.prepare([str(src)], out, val_fraction=0.1, progress=False)
    return out


def records(run: Path) -> tuple[list[dict], list[dict]]:
    lines = [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines()]
    return [r for r in lines if "loss" in r], [r for r in lines if "val_loss" in r]


# ---- the model ------------------------------------------------------------------------------------

@pytest.mark.parametrize("norm,pos", [("layer", "learned"), ("rms", "learned"), ("layer", "rope"), ("rms", "rope")])
def test_model_matches_its_pytorch_twin(norm, pos):
    """fastcore's norms and attention against nn.LayerNorm/nn.RMSNorm and SDPA: loss and every gradient."""
    c = GPTConfig(vocab_size=100, block_size=24, n_layer=2, n_head=2, n_embd=64, norm=norm, pos=pos)
    torch.manual_seed(0)
    ours, twin = GPT(c), GPT(c, kernels="torch")
    twin.load_state_dict(ours.state_dict())
    x = torch.randint(0, 100, (3, 24), generator=torch.Generator().manual_seed(1))
    y = torch.randint(0, 100, (3, 24), generator=torch.Generator().manual_seed(2))
    la, lb = ours(x, y)[1], twin(x, y)[1]
    la.backward()
    lb.backward()
    assert_close(la, lb, torch.float32, "loss")
    for (name, p), q in zip(ours.named_parameters(), twin.parameters()):
        assert_close(p.grad, q.grad, torch.float32, f"grad of {name}")


def test_model_loss_is_cross_entropy_and_vocab_is_padded():
    c = GPTConfig(vocab_size=257, block_size=16, n_layer=1, n_head=2, n_embd=32)
    model = GPT(c)
    assert model.wte.weight.shape == (320, 32)                  # padded to a multiple of 64
    assert model.num_params() == sum(p.numel() for p in model.parameters())
    x, y = torch.randint(0, 257, (2, 2, 16), generator=torch.Generator().manual_seed(0))
    logits, loss = model(x, y)
    assert logits.shape == (2, 16, 320)
    ref = torch.nn.functional.cross_entropy(logits.double().reshape(-1, 320), y.reshape(-1))
    assert abs(loss.item() - ref.item()) < 1e-5
    # Freshly initialised, the model is near-uniform: loss ~ ln(padded vocab).
    assert abs(loss.item() - math.log(320)) < 0.1


def test_flops_per_token_counts_6n_plus_6lct():
    c = GPTConfig(vocab_size=50257, block_size=1024, n_layer=12, n_head=12, n_embd=768)
    model = GPT(c)
    n = model.num_params(embedding=False)
    assert n == model.num_params() - 1024 * 768
    assert 123e6 < model.num_params() < 125e6                    # GPT-2 small: 124M (tied head)
    assert model.flops_per_token() == 6 * n + 6 * 12 * 768 * 1024


def test_rope_scores_depend_only_on_the_offset():
    from fastcore.nn import CausalSelfAttention

    m = CausalSelfAttention(32, 1, rope_base=10000.0)
    q = torch.randn(1, 1, 1, 32).expand(1, 1, 12, 32)          # the same vector at every position
    k = torch.randn(1, 1, 1, 32).expand(1, 1, 12, 32)
    rq, rk = m._rotate(q), m._rotate(k)
    assert torch.allclose(rq.norm(dim=-1), q.norm(dim=-1), atol=1e-5)   # a rotation
    s = rq[0, 0] @ rk[0, 0].T
    for off in range(-3, 4):
        diag = torch.diagonal(s, off)
        assert torch.allclose(diag, diag[0].expand_as(diag), atol=1e-4)
    with pytest.raises(ValueError, match="rope_base"):
        CausalSelfAttention(32, 1, rope_base=0.5)


def _rotation_float64(x, base):
    """Pair (i, i + D/2) at position p turned by p * base^(-2i/D), as a complex number."""
    d, t = x.shape[-1], x.shape[-2]
    z = torch.complex(x[..., : d // 2].double(), x[..., d // 2:].double())
    angles = torch.arange(t, dtype=torch.float64)[:, None] * base ** (-torch.arange(0, d, 2, dtype=torch.float64) / d)
    expect = z * torch.polar(torch.ones_like(angles), angles)
    return torch.cat((expect.real, expect.imag), dim=-1)


def test_rope_against_a_float64_complex_rotation():
    from fastcore.nn import CausalSelfAttention

    m = CausalSelfAttention(16, 1, rope_base=10000.0)
    x = torch.randn(2, 1, 9, 16)
    assert_close(m._rotate(x), _rotation_float64(x, 10000.0), torch.float32)


@pytest.mark.parametrize("made", ["to_bf16", "dtype_bf16", "meta_then_load"])
def test_rope_angles_stay_fp32_however_the_module_is_made(made):
    """.to(bf16) must not narrow the frequencies (a bf16 angle is off by radians at position 500), and
    a module built on the meta device then loaded must rotate as the one it was loaded from."""
    from fastcore.nn import CausalSelfAttention

    torch.manual_seed(0)
    d, t, base = 16, 512, 10000.0
    ref = CausalSelfAttention(d, 1, rope_base=base)
    if made == "meta_then_load":
        m = CausalSelfAttention(d, 1, rope_base=base, device="meta").to_empty(device="cpu")
        m.load_state_dict(ref.state_dict())
        x = torch.randn(1, t, d)
        assert_close(m(x), ref(x), torch.float32, "meta-built module")
        dtype = torch.float32
    else:
        m = ref.to(torch.bfloat16) if made == "to_bf16" else CausalSelfAttention(d, 1, rope_base=base, dtype=torch.bfloat16)
        dtype = torch.bfloat16
    x = torch.randn(1, 1, t, d).to(dtype)
    assert_close(m._rotate(x), _rotation_float64(x, base).to(dtype), dtype, made)


def test_generate_crops_to_block_size_and_greedy_is_argmax():
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=50, block_size=8, n_layer=1, n_head=2, n_embd=32)).eval()
    idx = torch.randint(0, 50, (1, 5))
    out = model.generate(idx, 6, temperature=0)
    assert out.shape == (1, 11) and torch.equal(out[:, :5], idx)
    with torch.no_grad():
        expect = model(out[:, -9:-1][:, -8:])[0][0, -1, :50].argmax()
    assert out[0, -1] == expect
    sampled = model.generate(idx, 20, temperature=1.0, top_k=3, generator=torch.Generator().manual_seed(0))
    assert int(sampled.max()) < 50                                # never a padding id


@pytest.mark.parametrize("bad", [dict(vocab_size=0), dict(n_embd=30, n_head=4), dict(norm="batch"), dict(pos="alibi"),
                                 dict(n_layer=True)])
def test_model_config_errors(bad):
    with pytest.raises(ValueError, match="GPTConfig: " + next(iter(bad))[:5]):
        GPTConfig(**bad)


# ---- schedule, MFU table and the loader -----------------------------------------------------------

def test_lr_warmup_then_cosine_to_min():
    c = TrainConfig(steps=110, warmup=10, lr=1.0, min_lr_ratio=0.1).resolved()
    assert lr_at(0, c) == pytest.approx(0.1) and lr_at(4, c) == pytest.approx(0.5)
    assert lr_at(9, c) == pytest.approx(1.0) and lr_at(10, c) == pytest.approx(1.0)
    assert lr_at(60, c) == pytest.approx(0.55)                    # half way: (1 + 0.1) / 2
    assert lr_at(110, c) == pytest.approx(0.1) and lr_at(500, c) == pytest.approx(0.1)
    lrs = [lr_at(s, c) for s in range(10, 111)]
    assert all(a >= b for a, b in zip(lrs, lrs[1:]))


def test_peak_flops_table(monkeypatch):
    assert peak_flops(torch.device("cpu"), "bf16") is None
    for name, bf16 in [("NVIDIA H100 80GB HBM3", 989e12), ("NVIDIA H100 PCIe", 756e12), ("NVIDIA H200", 989e12),
                       ("NVIDIA A100-SXM4-80GB", 312e12), ("Some Future GPU", None)]:
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda d=None, n=name: n)
        assert peak_flops(torch.device("cuda", 0), "bf16") == bf16
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda d=None: "NVIDIA H100 80GB HBM3")
    assert peak_flops(torch.device("cuda", 0), "fp32") == 495e12   # TF32


def test_batches_are_a_function_of_the_step_split_over_ranks():
    tokens = np.arange(10_000, dtype=np.uint16)
    c = TrainConfig(batch_size=3, grad_accum=4, seed=5).resolved()
    one = Batches(tokens, c, 16, 0, 1, torch.device("cpu"), start_step=7)
    x1, y1, wait = one.next()
    one.close()
    assert x1.shape == (4, 3, 16) and x1.dtype == torch.int64 and wait >= 0
    assert torch.equal(y1, x1 + 1)                                # targets are the next tokens
    assert torch.equal(x1, one.windows(7)[0]) and not torch.equal(x1, one.windows(8)[0])
    halves = []
    for rank in range(2):
        b = Batches(tokens, c, 16, rank, 2, torch.device("cpu"), start_step=7)
        halves.append(b.next()[0])
        b.close()
    assert torch.equal(torch.cat(halves), x1)


# ---- training end to end --------------------------------------------------------------------------

def unigram_entropy(data_dir) -> float:
    """The best loss a model without context can reach on the train split, in nats."""
    p = np.bincount(np.asarray(data.open_split(data_dir, "train"))).astype(float)
    p = p[p > 0] / p.sum()
    return float(-(p * np.log(p)).sum())


def test_tiny_preset_learns_beyond_unigram_statistics(tmp_path):
    stdlib = tmp_path / "stdlib"
    data.prepare([str(p) for p in data.default_corpus()], stdlib, progress=False)
    result = train(TrainConfig(data=[str(stdlib)], out=str(tmp_path / "run"), preset="tiny", steps=60,
                               eval_every=60, progress=False))
    steps, evals = records(tmp_path / "run")
    unigram = unigram_entropy(stdlib)
    assert [r["step"] for r in steps] == list(range(1, 61))
    assert abs(steps[0]["loss"] - math.log(320)) < 0.3           # starts uniform over the padded vocab
    assert result["val_loss"] == evals[-1]["val_loss"] < unigram - 0.2, (evals, unigram)
    assert np.mean([r["loss"] for r in steps[-5:]]) < unigram


def test_metrics_records(corpus, tmp_path):
    train(TrainConfig(data=[str(corpus)], out=str(tmp_path), steps=6, eval_every=3, **SMALL))
    steps, evals = records(tmp_path)
    c = TrainConfig(steps=6, **SMALL).resolved()
    for r in steps:
        assert set(r) == {"step", "loss", "lr", "tokens_per_s", "mfu", "data_wait_ms"}
        assert r["lr"] == pytest.approx(lr_at(r["step"] - 1, c)) and r["tokens_per_s"] > 0
        assert r["mfu"] is None and r["data_wait_ms"] >= 0        # no known peak on a CPU
    assert [e["step"] for e in evals] == [3, 6]
    for e in evals:
        assert set(e) == {"step", "val_loss", "val_ppl"} and e["val_ppl"] == pytest.approx(math.exp(e["val_loss"]))
    assert (tmp_path / "meta.json").is_file()                   # for `fastcore sample`


def _interrupt_at(step, monkeypatch):
    """Kill the run as it starts 0-based ``step``, after the records of the steps before it."""
    lr_at = loop.lr_at

    def lr_or_die(s, c):
        if s == step:
            raise KeyboardInterrupt
        return lr_at(s, c)
    monkeypatch.setattr(loop, "lr_at", lr_or_die)


def test_resume_continues_exactly(corpus, tmp_path, monkeypatch):
    cfg = dict(data=[str(corpus)], steps=12, ckpt_every=3, eval_every=6, **SMALL)
    whole = train(TrainConfig(out=str(tmp_path / "a"), **cfg))
    with monkeypatch.context() as m:
        _interrupt_at(8, m)   # 8 steps logged, the last checkpoint at step 6
        with pytest.raises(KeyboardInterrupt):
            train(TrainConfig(out=str(tmp_path / "b"), **cfg))
    metrics = tmp_path / "b" / "metrics.jsonl"
    assert [r["step"] for r in records(tmp_path / "b")[0]] == list(range(1, 9))
    metrics.write_text(metrics.read_text() + '{"step": 9, "lo')     # a line torn by the kill
    resumed = train(TrainConfig(out=str(tmp_path / "b"), resume=True, **cfg))
    assert resumed["start_step"] == 6
    assert resumed["loss"] == whole["loss"] and resumed["val_loss"] == whole["val_loss"]
    (sa, ea), (sb, eb) = records(tmp_path / "a"), records(tmp_path / "b")
    assert [(r["step"], r["loss"], r["lr"]) for r in sa] == [(r["step"], r["loss"], r["lr"]) for r in sb]
    assert ea == eb
    a, b = (checkpoint.load(checkpoint.resolve(tmp_path / d)) for d in "ab")
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    assert len(checkpoint.checkpoints(tmp_path / "b" / "ckpt")) == 3   # keep the last 3


def test_default_corpus_is_the_stdlib(tmp_path, monkeypatch):
    monkeypatch.setenv("FASTCORE_CACHE_DIR", str(tmp_path / "cache"))
    result = train(TrainConfig(out=str(tmp_path / "run"), steps=2, **SMALL))
    meta = data.load_meta(data.default_data_dir())
    assert meta["tokenizer"]["kind"] == "byte" and meta["train_tokens"] > 5_000_000
    assert result["steps"] == 2 and math.isfinite(result["loss"])


def test_raw_inputs_are_prepared_into_the_run(tmp_path):
    text = tmp_path / "a.txt"
    text.write_text("the quick brown fox jumps over the lazy dog. " * 200)
    train(TrainConfig(data=[str(text)], out=str(tmp_path / "run"), steps=2, **SMALL))
    meta = data.load_meta(tmp_path / "run" / "data")
    assert meta["sources"] == [str(text)]
    assert meta["train_tokens"] + meta["val_tokens"] == len(text.read_bytes()) + 1   # bytes + end-of-text


def torchrun(*options: str) -> list[str]:
    """The command that starts 2 local ranks, up to the script to run."""
    return [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", *options,
            "--master-addr", "127.0.0.1", "--master-port", str(free_port())]


@pytest.mark.parametrize("compiled", [False, True])
def test_torchrun_two_gloo_ranks_match_one_rank(corpus, tmp_path, compiled):
    # 4 micro-batches: each rank accumulates 2, the first under no_sync. Compiled, the ranks compile
    # block by block (so that the all-reduces overlap) and still match one eager process step by step;
    # their parameters are compared only when eager, since compiled kernels round differently and
    # AdamW's normalisation lifts that to ~1e-5 in the smallest gradients' weights after 5 steps.
    args = ["train", "--data", str(corpus), "--steps", "5", "--grad-accum", "4", "--batch-size", "2", "--device", "cpu",
            "--n-layer", "1", "--n-embd", "64", "--n-head", "2", "--block-size", "32", "--eval-every", "5",
            "--no-progress"]
    assert cli.main(args + ["--out", str(tmp_path / "one")]) == 0
    env = dict(os.environ, OMP_NUM_THREADS="1")
    run = subprocess.run([*torchrun(), "-m", "fastcore", *args,
                          "--out", str(tmp_path / "two"), *(["--compile"] if compiled else [])],
                         env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    (s1, e1), (s2, e2) = records(tmp_path / "one"), records(tmp_path / "two")
    assert len(s2) == 5 and len(e2) == 1                          # rank 0 alone logs
    for a, b in zip(s1, s2):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5)
        # DataParallel's figures of the step's reducing backward; one process logs none.
        assert b["dp_buckets"] >= 1 and b["dp_comm_ms"] > 0 and b["dp_backward_ms"] > 0 and 0 <= b["dp_overlap"] <= 1
        assert "dp_overlap" not in a
    assert e2[0]["val_loss"] == pytest.approx(e1[0]["val_loss"], rel=1e-5)
    p1, p2 = (without_key_bias(checkpoint.load(checkpoint.resolve(tmp_path / d))["model"], "attn.qkv.bias")
              for d in ("one", "two"))
    assert p1.keys() == p2.keys()  # no compile or wrapper prefix
    if not compiled:
        for k in p1:
            assert_close(p2[k], p1[k], torch.float32, k)


@pytest.mark.parametrize("bad", ["data", "tensorboard"])
def test_torchrun_bad_input_is_one_line_from_every_rank(tmp_path, bad):
    """Checks that run on rank 0 alone (preparing --data) or only there (--tensorboard) must stop
    every rank with the same line, not leave the others to fail in a collective with a traceback."""
    empty, stub = tmp_path / "empty", tmp_path / "stub" / "tensorboard"
    empty.mkdir()
    stub.mkdir(parents=True)
    (stub / "__init__.py").write_text("raise ImportError('broken on purpose')\n")  # installed or not
    extra = ["--data", str(empty)] if bad == "data" else ["--tensorboard"]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join([str(stub.parent), *sys.path]))
    # A slow monitor: torchrun stops the other ranks once one has failed; give them time to print.
    run = subprocess.run([*torchrun("--monitor-interval", "3"), "-m", "fastcore", "train",
                          "--steps", "2", "--no-progress", "--out", str(tmp_path / "run"), *extra],
                         env=env, capture_output=True, text=True, timeout=180)
    lines = [ln for ln in run.stderr.splitlines() if ln.startswith("fastcore train:")]
    assert len(lines) == 2 and lines[0] == lines[1], run.stderr[-3000:]
    assert ("no text files found" if bad == "data" else "--tensorboard: cannot use tensorboard") in lines[0]
    assert "[rank" not in run.stderr and "exitcode: 2" in run.stderr, run.stderr[-3000:]


def test_torchrun_ranks_wait_for_rank_0_to_prepare_longer_than_the_collective_timeout(tmp_path):
    """Rank 0 prepares --data while the others wait: a large corpus can take longer than the timeout
    that bounds every collective (10 min by default; 10 s here, against 25 s of preparing)."""
    script = tmp_path / "slow_prepare.py"
    script.write_text(textwrap.dedent("""
        import sys, time
        from datetime import timedelta
        import fastcore.distributed
        from fastcore import cli
        from fastcore.train import loop

        join = fastcore.distributed.init_from_env
        fastcore.distributed.init_from_env = lambda timeout=None: join(timedelta(seconds=10))
        prepare = loop._prepare_inputs
        loop._prepare_inputs = lambda *a: (time.sleep(25), prepare(*a))
        sys.exit(cli.main(sys.argv[1:]))
    """))
    raw = tmp_path / "raw"
    raw.mkdir()
    (raw / "text.py").write_text(inspect.getsource(textwrap))
    env = dict(os.environ, OMP_NUM_THREADS="1")
    run = subprocess.run([*torchrun(), str(script), "train",
                          "--data", str(raw), "--steps", "2", "--batch-size", "2", "--device", "cpu", "--n-layer", "1",
                          "--n-embd", "32", "--n-head", "2", "--block-size", "16", "--eval-every", "2", "--no-progress", "--no-tensorboard",
                          "--out", str(tmp_path / "run")], env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert len(records(tmp_path / "run")[0]) == 2


# ---- checkpoints ----------------------------------------------------------------------------------

def test_interrupted_checkpoint_write_leaves_the_previous_one(tmp_path, monkeypatch):
    first = checkpoint.save(tmp_path, 1, {"x": torch.ones(3)}, keep=3)

    def torn(obj, f):
        Path(f).write_bytes(b"PK\x03\x04 half a checkpoint")
        raise OSError("disk full")
    monkeypatch.setattr(torch, "save", torn)
    with pytest.raises(OSError, match="disk full"):
        checkpoint.save(tmp_path, 2, {"x": torch.zeros(3)}, keep=3)
    assert checkpoint.resolve(tmp_path) == first
    assert sorted(p.name for p in tmp_path.iterdir()) == [first.name]    # no temporary file left behind
    assert torch.equal(checkpoint.load(first)["x"], torch.ones(3))


def test_keep_last_k_checkpoints(tmp_path):
    for s in (5, 10, 15, 20):
        checkpoint.save(tmp_path, s, {"s": s}, keep=2)
    assert [p.name for p in checkpoint.checkpoints(tmp_path)] == ["step_00000015.pt", "step_00000020.pt"]


def test_corrupt_and_incompatible_checkpoints_name_the_file(corpus, tmp_path, capsys):
    cfg = dict(data=[str(corpus)], out=str(tmp_path), steps=4, ckpt_every=2, **SMALL)
    train(TrainConfig(**cfg))
    latest = checkpoint.resolve(tmp_path)
    with pytest.raises(checkpoint.CheckpointError, match="another model.*n_embd: 64 in the checkpoint, 128 now"):
        train(TrainConfig(**{**cfg, "n_embd": 128, "steps": 6, "resume": True}))
    with pytest.raises(TrainError, match="raise --steps"):
        train(TrainConfig(**{**cfg, "resume": True}))
    latest.write_bytes(latest.read_bytes()[:100])                 # truncated
    with pytest.raises(checkpoint.CheckpointError, match=str(latest)):
        train(TrainConfig(**{**cfg, "steps": 6, "resume": True}))
    torch.save({"format": 1, "step": 2}, latest)                   # readable, but incomplete
    with pytest.raises(checkpoint.CheckpointError, match="does not fit this run"):
        train(TrainConfig(**{**cfg, "steps": 6, "resume": True}))


def _bpe_data(root: Path, name: str, letters: str) -> Path:
    """A BPE directory with all 300 ids used: enough distinct words, from ``letters``, for 43 merges."""
    rng = np.random.default_rng(0)
    words = ["".join(rng.choice(list(letters), size=rng.integers(3, 9))) for _ in range(200)]
    (root / name).mkdir(parents=True, exist_ok=True)
    for i in range(20):
        (root / name / f"{i}.txt").write_text(" ".join(rng.choice(words, size=200)))
    data.prepare([str(root / name)], root / f"{name}-bpe", tokenizer="bpe", vocab=300, val_fraction=0.2,
                 progress=False)
    return root / f"{name}-bpe"


def test_resume_refuses_another_tokenizer_and_notes_other_data(corpus, tmp_path, capsys):
    a = _bpe_data(tmp_path, "a", "abcdefgh")
    b = _bpe_data(tmp_path, "b", "stuvwxyz")
    assert data.load_meta(a)["tokenizer"]["vocab_size"] == data.load_meta(b)["tokenizer"]["vocab_size"] == 300
    cfg = dict(out=str(tmp_path / "run"), steps=2, **SMALL)
    train(TrainConfig(data=[str(a)], **cfg))
    saved = (tmp_path / "run" / "tokenizer.json").read_bytes()
    with pytest.raises(checkpoint.CheckpointError, match="trained with another tokenizer than this run's data"):
        train(TrainConfig(data=[str(b)], **{**cfg, "steps": 3, "resume": True}))
    assert (tmp_path / "run" / "tokenizer.json").read_bytes() == saved   # `sample` still decodes the run

    # The byte tokenizer is one tokenizer: other data continues, with a note.
    other = tmp_path / "other"
    data.prepare([str(tmp_path / "a")], other, val_fraction=0.5, progress=False)   # a's files, byte-tokenized
    train(TrainConfig(data=[str(corpus)], **{**cfg, "out": str(tmp_path / "byte")}))
    capsys.readouterr()
    train(TrainConfig(data=[str(other)], **{**cfg, "out": str(tmp_path / "byte"), "steps": 3, "resume": True}))
    assert "--data: other data (its meta.json differs)" in capsys.readouterr().err


def test_a_bpe_directory_without_its_tokenizer_is_refused(tmp_path):
    a = _bpe_data(tmp_path, "a", "abcdefgh")
    (a / "tokenizer.json").unlink()
    with pytest.raises(data.DataError, match=r"tokenizer\.json not found: the BPE tokenizer of .* is missing"):
        train(TrainConfig(data=[str(a)], out=str(tmp_path / "run"), steps=1, **SMALL))
    assert not (tmp_path / "run" / "ckpt").exists()


def test_an_empty_val_split_says_how_to_prepare_one(tmp_path):
    (tmp_path / "a.txt").write_text("some text to learn from. " * 100)
    data.prepare([str(tmp_path / "a.txt")], tmp_path / "d", val_fraction=0, progress=False)
    with pytest.raises(TrainError, match=r"the val split of .* has 0 tokens.*a larger --val-fraction"):
        train(TrainConfig(data=[str(tmp_path / "d")], out=str(tmp_path / "run"), steps=1, **SMALL))


def test_the_largest_seed_trains(corpus, tmp_path):
    result = train(TrainConfig(data=[str(corpus)], out=str(tmp_path), steps=1, seed=2**64 - 1, **SMALL))
    assert math.isfinite(result["loss"])


def test_checkpoint_is_loaded_weights_only(tmp_path):
    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned",))
    path = tmp_path / "step_00000001.pt"
    torch.save({"format": 1, "payload": Evil()}, path)
    with pytest.raises(checkpoint.CheckpointError, match="cannot be read"):
        checkpoint.load(path)


# ---- sampling -------------------------------------------------------------------------------------

def test_sample_continues_the_prompt(corpus, tmp_path, capsys):
    train(TrainConfig(data=[str(corpus)], out=str(tmp_path), steps=3, **SMALL))
    text = sample(tmp_path, "def ", 20, temperature=0.8, seed=1)
    assert text.startswith("def ") and text == sample(tmp_path, "def ", 20, temperature=0.8, seed=1)
    model = checkpoint.load(checkpoint.resolve(tmp_path))
    assert model["config"]["model"]["vocab_size"] == 257
    greedy = sample(tmp_path, "import ", 10, temperature=0)
    from fastcore.train.sample import load_model
    gpt, _ = load_model(tmp_path)
    ids = gpt.generate(torch.tensor([list(b"import ")]), 10, temperature=0)[0, 7:].tolist()
    assert greedy == "import " + data.load_tokenizer(tmp_path).decode(ids)
    assert cli.main(["sample", "--ckpt", str(tmp_path), "--prompt", "x = ", "--tokens", "5"]) == 0
    assert capsys.readouterr().out.startswith("x = ")
    # A temperature so small that logits / temperature overflows is still a (near-)greedy draw.
    assert sample(tmp_path, "import ", 10, temperature=1e-40) == greedy
    assert sample(tmp_path, "import ", 10, temperature=1e-300) == greedy  # 0 as a float32
    for flag, value, message in (("--temperature", "nan", "--temperature: must be a finite number >= 0"),
                                 ("--temperature", "inf", "--temperature: must be a finite number >= 0"),
                                 ("--seed", "-1", "--seed: must be a whole number, 0 <= seed < 2**64"),
                                 ("--prompt", "ab\udcff", "--prompt: text is not valid Unicode")):
        assert cli.main(["sample", "--ckpt", str(tmp_path), "--tokens", "2", flag, value]) == 2
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1, err


# ---- bad input: one line, no traceback ------------------------------------------------------------

@pytest.mark.parametrize("extra,message", [
    (["--data", "/no/such/path"], "/no/such/path"),
    (["--batch-size", "0"], "--batch-size: must be >= 1"),
    (["--grad-accum", "0"], "--grad-accum: must be >= 1"),
    (["--steps", "5", "--warmup", "9"], "--warmup: must be between 0 and --steps"),
    (["--block-size", "100000"], "fewer than block_size + 1"),
    (["--lr", "-1"], "--lr: must be a finite number > 0"),
    (["--n-embd", "66"], "n_embd (66) must be a multiple of n_head"),
    (["--preset", "tiny", "--out", "/dev/null"], "--out: /dev/null exists and is not a directory"),
    (["--n-embd", "96", "--n-head", "4"], "head dim n_embd / n_head = 24 must be one of"),
    (["--device", "tpu"], "--device: expected cpu, cuda or cuda:N, got 'tpu'"),
    (["--min-lr-ratio", "2"], "--min-lr-ratio: must be between 0 and 1"),
    (["--grad-clip", "-1"], "--grad-clip: must be a finite number >= 0"),
    (["--weight-decay", "nan"], "--weight-decay: must be a finite number >= 0"),
    (["--seed", "-1"], "--seed: must be a whole number, 0 <= seed < 2**64, got -1"),
    (["--seed", str(2**64)], "--seed: must be a whole number"),
    (["--out", "/dev/null/run"], "--out: cannot create the directory /dev/null/run"),
])
def test_bad_train_input_is_one_line(corpus, tmp_path, capsys, extra, message):
    args = ["train", "--out", str(tmp_path / "run"), "--no-progress", "--data", str(corpus), *extra]
    assert cli.main(args) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1 and err.startswith("fastcore train: ")


@pytest.mark.parametrize("extra,message", [
    (["--seed", "-1"], "seed=-1: expected a whole number"),
    (["--out", "/dev/null/prepared"], "out: cannot create the directory /dev/null/prepared"),
])
def test_bad_data_prepare_input_is_one_line(tmp_path, capsys, extra, message):
    (tmp_path / "a.txt").write_text("text")
    assert cli.main(["data", "prepare", "--input", str(tmp_path / "a.txt"), "--out", str(tmp_path / "d"), *extra]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1 and err.startswith("fastcore data: ")


def test_empty_corpus_and_missing_checkpoint_are_one_line(tmp_path, capsys):
    (tmp_path / "empty.txt").write_text("  \n")
    assert cli.main(["train", "--data", str(tmp_path / "empty.txt"), "--out", str(tmp_path / "r"), "--no-progress"]) == 2
    assert len(capsys.readouterr().err.strip().splitlines()) == 1
    assert cli.main(["sample", "--ckpt", str(tmp_path / "nothing")]) == 2
    assert "no checkpoint found" in capsys.readouterr().err


def test_cli_error_has_no_traceback(tmp_path):
    run = subprocess.run([sys.executable, "-m", "fastcore", "train", "--data", str(tmp_path / "missing"),
                          "--out", str(tmp_path / "r")], capture_output=True, text=True, timeout=120)
    assert run.returncode == 2 and "Traceback" not in run.stderr
    assert len(run.stderr.strip().splitlines()) == 1 and "missing" in run.stderr


def test_presets_match_the_issue():
    assert {k: PRESETS["gpt2-124m"][k] for k in ("n_layer", "n_head", "n_embd", "block_size")} == \
        dict(n_layer=12, n_head=12, n_embd=768, block_size=1024)
    tiny = GPT(GPTConfig(vocab_size=257, **{k: PRESETS["tiny"][k] for k in ("n_layer", "n_head", "n_embd", "block_size")}))
    assert 1e5 < tiny.num_params() < 1e6                          # "a few hundred thousand parameters"


def test_compile_trains_like_eager(corpus, tmp_path):
    cfg = dict(data=[str(corpus)], steps=3, **SMALL)
    eager = train(TrainConfig(out=str(tmp_path / "eager"), **cfg))
    compiled = train(TrainConfig(out=str(tmp_path / "compiled"), compile=True, **cfg))
    for a, b in zip(records(tmp_path / "eager")[0], records(tmp_path / "compiled")[0]):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5)
    assert compiled["val_loss"] == pytest.approx(eager["val_loss"], rel=1e-5)


@pytest.mark.gpu
def test_gpu_bf16_run_learns_and_reports_mfu(tmp_path):
    stdlib = tmp_path / "stdlib"
    data.prepare([str(p) for p in data.default_corpus()], stdlib, progress=False)
    result = train(TrainConfig(data=[str(stdlib)], out=str(tmp_path / "run"), preset="small", steps=100,
                               batch_size=16, eval_every=100, device="cuda", progress=False))
    steps, evals = records(tmp_path / "run")
    assert steps[0]["loss"] > 5 and result["val_loss"] < unigram_entropy(stdlib) - 0.5, (steps[0], evals)
    known = loop.peak_flops(torch.device("cuda"), "bf16") is not None
    assert all((r["mfu"] is not None) == known for r in steps)
    if known:
        print(f"MFU at step 100: {steps[-1]['mfu']:.1%}, {steps[-1]['tokens_per_s']:,.0f} tokens/s")


def test_grad_accum_default_rounds_up_to_the_ranks():
    assert TrainConfig(preset="tiny").resolved(world=2).grad_accum == 2
    assert TrainConfig(preset="gpt2-124m").resolved(world=3).grad_accum == 33
    with pytest.raises(TrainError, match=r"--grad-accum \(2\) must be a multiple of the number of ranks \(3\)"):
        TrainConfig(grad_accum=2).resolved(world=3)


@pytest.mark.parametrize("users", ["corpus", "corpus and a meta.json", "a file"])
def test_raw_inputs_never_clobber_a_users_directory(tmp_path, users):
    text = tmp_path / "corpus.txt"
    text.write_text("some text to learn from. " * 400)
    (tmp_path / "run").mkdir()
    if users == "a file":
        (tmp_path / "run" / "data").write_text("mine")
    else:
        (tmp_path / "run" / "data").mkdir()
        shutil.copy(text, tmp_path / "run" / "data" / "corpus.txt")
        if users == "corpus and a meta.json":
            (tmp_path / "run" / "data" / "meta.json").write_text("{}")
    before = sorted((p.name, p.read_bytes()) for p in (tmp_path / "run").rglob("*") if p.is_file())
    with pytest.raises(TrainError, match="data exists and is not a data directory fastcore prepared"):
        train(TrainConfig(data=[str(text)], out=str(tmp_path / "run"), steps=1, **SMALL))
    assert sorted((p.name, p.read_bytes()) for p in (tmp_path / "run").rglob("*") if p.is_file()) == before


def test_raw_inputs_are_reused_until_they_change(tmp_path, capsys):
    text = tmp_path / "a.txt"
    text.write_text("the quick brown fox jumps over the lazy dog. " * 200)
    cfg = dict(data=[str(text)], out=str(tmp_path / "run"), steps=1, **SMALL)
    train(TrainConfig(**cfg))
    meta_file = tmp_path / "run" / "data" / "meta.json"
    first = meta_file.stat().st_mtime_ns
    train(TrainConfig(**cfg))
    assert meta_file.stat().st_mtime_ns == first                       # unchanged inputs: reused
    text.write_text("a different corpus, longer than before. " * 300)
    train(TrainConfig(**cfg))
    meta = data.load_meta(tmp_path / "run" / "data")
    assert meta["train_tokens"] + meta["val_tokens"] == len(text.read_bytes()) + 1
    assert "removing the 1 checkpoints of an earlier run" in capsys.readouterr().err


def test_tensorboard_flag(corpus, tmp_path):
    cfg = dict(data=[str(corpus)], out=str(tmp_path), steps=1, tensorboard=True, **SMALL)
    if importlib.util.find_spec("tensorboard") is None:
        with pytest.raises(TrainError, match="--tensorboard: cannot use tensorboard"):
            train(TrainConfig(**cfg))
    else:
        train(TrainConfig(**cfg))
        assert any((tmp_path / "tensorboard").iterdir())
