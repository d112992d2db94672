"""The training loop of ``fastcore train``: one GPU, the CPU, or several ranks under ``torchrun``.

The batch of step ``s`` is a pure function of (seed, s): ``grad_accum`` micro-batches of random
windows, the same set whatever the world size (rank r takes its share). So ``--resume`` continues
exactly, and N ranks train as one rank on the same global batch.
"""
from __future__ import annotations

import contextlib
import dataclasses
import itertools
import json
import math
import os
import pickle
import queue
import random
import shutil
import sys
import threading
import time
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.distributed as dist

from fastcore.files import write_text_atomic
from fastcore.optim import FusedAdamW
from fastcore.train import checkpoint, data
from fastcore.train.model import GPT, MODEL_KEYS, PRESETS, GPTConfig
from fastcore.train.progress import Progress


class TrainError(ValueError):
    """A setting or input the run cannot use; the CLI prints it as one line."""


@dataclass
class TrainConfig:
    preset: str = "tiny"
    data: list[str] = field(default_factory=list)   # empty: the embedded default corpus
    out: str = "runs/fastcore"
    steps: Optional[int] = None                      # None: the preset's
    batch_size: Optional[int] = None                 # sequences per micro-batch, per rank
    grad_accum: Optional[int] = None                 # micro-batches per step, over all ranks
    lr: Optional[float] = None
    min_lr_ratio: float = 0.1
    warmup: Optional[int] = None
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    seed: int = 0
    resume: bool = False
    eval_every: Optional[int] = None                 # None: a fifth of the run
    eval_iters: int = 20
    ckpt_every: Optional[int] = None                 # None: with every evaluation
    keep_ckpts: int = 3
    compile: bool = False
    precision: Optional[str] = None                  # None: bf16 on GPU, fp32 on CPU
    device: Optional[str] = None
    tensorboard: Optional[bool] = None               # None: when the tensorboard package is installed
    progress: bool = True
    # Model overrides (None: the preset's); vocab_size comes from the data.
    n_layer: Optional[int] = None
    n_head: Optional[int] = None
    n_embd: Optional[int] = None
    block_size: Optional[int] = None
    norm: Optional[str] = None
    pos: Optional[str] = None

    def resolved(self, world: int = 1) -> "TrainConfig":
        """A copy with the preset's values filled in and every setting checked; the preset's
        ``grad_accum`` is rounded up to a multiple of the ``world`` ranks."""
        if self.preset not in PRESETS:
            raise TrainError(f"--preset: unknown preset {self.preset!r}; choose one of {', '.join(PRESETS)}")
        filled = {k: (PRESETS[self.preset][k] if getattr(self, k) is None else getattr(self, k))
                  for k in ("steps", "batch_size", "grad_accum", "lr", "warmup")}
        if self.grad_accum is None:
            filled["grad_accum"] = -(-filled["grad_accum"] // world) * world
        if self.warmup is None:  # the preset's warmup, shortened to fit a shorter run
            filled["warmup"] = min(filled["warmup"], filled["steps"] // 10)
        c = dataclasses.replace(self, **filled)
        for name in ("steps", "batch_size", "grad_accum", "eval_iters", "keep_ckpts"):
            if getattr(c, name) < 1:
                raise TrainError(f"--{name.replace('_', '-')}: must be >= 1, got {getattr(c, name)}")
        for name in ("eval_every", "ckpt_every", "n_layer", "n_head", "n_embd", "block_size"):
            if getattr(c, name) is not None and getattr(c, name) < 1:
                raise TrainError(f"--{name.replace('_', '-')}: must be >= 1, got {getattr(c, name)}")
        if not c.lr > 0 or not math.isfinite(c.lr):
            raise TrainError(f"--lr: must be a finite number > 0, got {c.lr}")
        if not 0 <= c.min_lr_ratio <= 1:
            raise TrainError(f"--min-lr-ratio: must be between 0 and 1, got {c.min_lr_ratio}")
        for name in ("weight_decay", "grad_clip"):
            if not 0 <= getattr(c, name) < math.inf:
                raise TrainError(f"--{name.replace('_', '-')}: must be a finite number >= 0, got {getattr(c, name)}")
        if c.grad_accum % world:
            raise TrainError(f"--grad-accum ({c.grad_accum}) must be a multiple of the number of ranks ({world})")
        if not 0 <= c.warmup <= c.steps:
            raise TrainError(f"--warmup: must be between 0 and --steps ({c.steps}), got {c.warmup}")
        if not data.valid_seed(c.seed):
            raise TrainError(f"--seed: must be a whole number, 0 <= seed < 2**64, got {c.seed}")
        if c.precision not in (None, "bf16", "fp32"):
            raise TrainError(f"--precision: must be bf16 or fp32, got {c.precision!r}")
        return c

    def model_config(self, vocab_size: int) -> GPTConfig:
        shape = {k: getattr(self, k, None) if getattr(self, k, None) is not None else PRESETS[self.preset].get(k)
                 for k in MODEL_KEYS if k != "vocab_size"}
        try:
            return GPTConfig(vocab_size=vocab_size, **{k: v for k, v in shape.items() if v is not None})
        except ValueError as exc:
            raise TrainError(str(exc)) from None


def lr_at(step: int, c: TrainConfig) -> float:
    """Linear warmup over ``warmup`` steps, then cosine decay to ``min_lr_ratio * lr`` at ``steps``."""
    if step < c.warmup:
        return c.lr * (step + 1) / c.warmup
    progress = (step - c.warmup) / max(1, c.steps - c.warmup)
    return c.lr * (c.min_lr_ratio + (1 - c.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


# Dense bf16 and TF32 tensor-core peaks (FLOP/s) by device-name fragment, most specific first.
PEAK_FLOPS = [
    ("H100 PCIe", 756e12, 378e12), ("H100 NVL", 835e12, 418e12), ("H100", 989e12, 495e12),
    ("H200", 989e12, 495e12), ("A100", 312e12, 156e12),
    ("L40S", 362e12, 183e12), ("L40", 181e12, 90.5e12), ("L4", 121e12, 60e12), ("RTX 4090", 165e12, 83e12),
]


def peak_flops(device: torch.device, precision: str) -> Optional[float]:
    """The device's peak for the precision (fp32 runs use TF32 tensor cores), or None where unknown
    (the CPU, an unlisted GPU)."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for fragment, bf16, tf32 in PEAK_FLOPS:
        if fragment in name:
            return bf16 if precision == "bf16" else tf32
    return None


def _mix(seed: int, step: int) -> int:
    """The seed of one step's draw: distinct per (seed, step), and within torch's 64-bit range."""
    return (seed * 1_000_003 + step) % (1 << 64)


def windows(tokens: np.ndarray, starts, length: int) -> torch.Tensor:
    """``(len(starts), length + 1)`` int64: each window and the token after it (inputs and targets)."""
    return torch.from_numpy(np.stack([tokens[s:s + length + 1] for s in starts]).astype(np.int64))


class Batches:
    """This rank's micro-batches of each step, sampled from a memmap and prefetched by a thread.

    Step ``s`` draws ``grad_accum * batch_size`` window starts from a generator seeded by
    ``(seed, s)``; rank r takes micro-batches ``[r*K/W, (r+1)*K/W)``. Windows are copied to pinned
    memory off the main thread and moved with a non-blocking copy, so the device does not wait.
    """

    def __init__(self, tokens: np.ndarray, c: TrainConfig, block_size: int, rank: int, world: int,
                 device: torch.device, start_step: int, depth: int = 3):
        self.tokens, self.c, self.t, self.device = tokens, c, block_size, device
        self.local = c.grad_accum // world
        self.first = rank * self.local
        self.pin = device.type == "cuda"
        self._queue: queue.Queue = queue.Queue(depth)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._fill, args=(start_step,), daemon=True)
        self._thread.start()

    def windows(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(x, y), each ``(local micro-batches, batch_size, block_size)`` int64, for ``step``."""
        g = torch.Generator().manual_seed(_mix(self.c.seed, step))
        b = self.c.batch_size
        starts = torch.randint(len(self.tokens) - self.t, (self.c.grad_accum * b,), generator=g)
        starts = starts[self.first * b:(self.first + self.local) * b].numpy()
        both = windows(self.tokens, starts, self.t).view(self.local, b, self.t + 1)
        x, y = both[..., :-1].contiguous(), both[..., 1:].contiguous()
        # Pinned (page-locked) and contiguous, so the copy to the GPU is a true asynchronous DMA.
        return (x.pin_memory(), y.pin_memory()) if self.pin else (x, y)

    def _fill(self, step: int) -> None:
        try:
            while not self._stop.is_set():
                item = self.windows(step)
                while not self._stop.is_set():
                    try:
                        self._queue.put(item, timeout=0.1)
                        break
                    except queue.Full:
                        continue
                step += 1
        except BaseException as exc:  # surfaces in next(): never a silent hang
            self._queue.put(exc)

    def next(self) -> tuple[torch.Tensor, torch.Tensor, float]:
        """The next step's (x, y) on the device, and the milliseconds spent waiting for them."""
        t0 = time.perf_counter()
        item = self._queue.get()
        wait_ms = (time.perf_counter() - t0) * 1e3
        if isinstance(item, BaseException):
            raise item
        x, y = item
        return x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True), wait_ms

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)


PREPARE_TIMEOUT = timedelta(hours=24)  # how long other ranks wait for rank 0 to prepare --data
_PREPARED = itertools.count()  # a key per call: the same sequence on every rank


def _resolve_data(c: TrainConfig, rank: int, world: int) -> Path:
    """A prepared data directory: the default corpus, a prepared directory given by --data, or
    raw inputs prepared (byte tokenizer) into ``OUT/data`` and reused while they are unchanged.
    Rank 0 prepares; the others wait for it, and stop with its error if it fails."""
    if len(c.data) == 1 and (Path(c.data[0]) / "meta.json").is_file():
        return Path(c.data[0])
    target, error = Path(c.out) / "data", None
    if rank == 0:
        try:
            if c.data:
                _prepare_inputs(c, target)
            else:
                target = data.default_data_dir()
        except (TrainError, data.DataError) as exc:
            error = exc
    if world > 1:  # rank 0's error reaches every rank, so each stops with the same line
        # Preparing a large corpus can outlast the timeout that bounds every collective: the others
        # wait on the process group's key-value store instead. If rank 0 exits, torchrun stops them
        # (or, without its agent, the store rank 0 serves closes and their wait fails at once).
        store, key = dist.distributed_c10d._get_default_store(), f"fastcore/prepared/{next(_PREPARED)}"
        if rank == 0:
            store.set(key, pickle.dumps(error))
        else:
            store.wait([key], PREPARE_TIMEOUT)
            error = pickle.loads(store.get(key))
    if error is not None:
        raise error
    if rank != 0 and not c.data:
        target = data.default_data_dir()  # rank 0 prepared it: a lookup
    return target


def _prepare_inputs(c: TrainConfig, target: Path) -> None:
    sources = [os.path.abspath(p) for p in c.data]
    files = data.resolve_inputs(sources)
    stats = [f.stat() for f in files]
    fingerprint = {"sources": sources, "files": [[str(f), st.st_size, st.st_mtime_ns] for f, st in zip(files, stats)]}
    stamp = target / "inputs.json"
    if (target / "meta.json").is_file() and stamp.is_file() and json.loads(stamp.read_text()) == fingerprint:
        return
    # Only a directory this code wrote (its stamp) or an empty one is (re)written: never a user's own.
    if target.exists() and not (target.is_dir() and (stamp.is_file() or not any(target.iterdir()))):
        raise TrainError(f"{target} exists and is not a data directory fastcore prepared; move it or choose another --out")
    target.mkdir(parents=True, exist_ok=True)
    stamp.write_text("{}")  # ours from here on, and matching no inputs until prepared
    data.prepare(sources, target, progress=c.progress, files=files)  # no second walk of the inputs
    stamp.write_text(json.dumps(fingerprint))


def _split(data_dir: Path, split: str, block_size: int) -> np.ndarray:
    tokens = data.open_split(data_dir, split)
    if len(tokens) < block_size + 1:
        hint = "prepare it with a larger --val-fraction, " if split == "val" else ""
        raise TrainError(f"the {split} split of {data_dir} has {len(tokens)} tokens, fewer than block_size + 1 "
                         f"= {block_size + 1}; {hint}use a shorter --block-size or more data")
    return tokens


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay on matrices (linear weights, embeddings) only, not on norms or biases."""
    params = [p for p in model.parameters() if p.requires_grad]
    return [{"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
            {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]


def _rng_state(device: torch.device) -> dict:
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def _set_rng_state(state: dict, device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def _summary_writer(tensorboard: Optional[bool]):
    """TensorBoard's SummaryWriter, or None when it is not asked for or, unasked, not installed."""
    if tensorboard is False:
        return None
    try:
        from torch.utils.tensorboard import SummaryWriter
    except Exception as exc:  # not installed, or installed but broken: optional unless asked for
        if tensorboard:
            raise TrainError(f"--tensorboard: cannot use tensorboard ({type(exc).__name__}: {exc}); "
                             "pip install tensorboard") from None
        return None
    return SummaryWriter


class _Log:
    """metrics.jsonl (one object per train step and per evaluation) and optional TensorBoard, rank 0 only."""

    def __init__(self, out: Path, start_step: int, writer):
        self.path = out / "metrics.jsonl"
        kept = []
        if start_step and self.path.exists():  # keep the records up to the checkpoint we resume from
            for line in self.path.read_text().splitlines():
                try:
                    if json.loads(line)["step"] <= start_step:
                        kept.append(line)
                except (ValueError, KeyError, TypeError):  # a line torn by the interruption
                    continue
        write_text_atomic(self.path, "".join(ln + "\n" for ln in kept))
        self.file = open(self.path, "a")
        self.tb = None if writer is None else writer(str(out / "tensorboard"))

    def write(self, record: dict) -> None:
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        if self.tb is not None:
            for k, v in record.items():
                if k != "step" and v is not None:
                    self.tb.add_scalar(k, v, record["step"])

    def close(self) -> None:
        self.file.close()
        if self.tb is not None:
            self.tb.close()


def resolve_device(name: Optional[str]) -> torch.device:
    """``--device``: cpu or cuda[:N], checked; None picks CUDA when available."""
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError):
        device = None
    if device is None or device.type not in ("cpu", "cuda"):
        raise TrainError(f"--device: expected cpu, cuda or cuda:N, got {name!r}")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise TrainError(f"--device {name}: CUDA is not available here (torch {torch.__version__})")
    if device.index is not None and device.index >= torch.cuda.device_count():
        raise TrainError(f"--device {name}: there are {torch.cuda.device_count()} GPUs")
    return device


def _world_size() -> int:
    """torchrun's rank count (1 without it)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def _distributed() -> tuple[int, int, Optional[torch.device]]:
    if _world_size() <= 1:
        return 0, 1, None
    from fastcore.distributed import init_from_env

    return init_from_env()


def train(config: TrainConfig) -> dict:
    """Train as ``config`` says; returns a summary (final step, losses, tokens/s, output directory)."""
    c = config.resolved(_world_size())
    device = resolve_device(c.device)
    joined = _world_size() > 1 and not dist.is_initialized()  # a group we start, we end
    rank, world, dist_device = _distributed()
    if dist_device is not None and c.device is not None and dist_device.type != device.type:
        raise TrainError(f"--device {c.device}: under torchrun each rank takes {dist_device.type} "
                         f"(one GPU per rank when CUDA is available, else the CPU); drop --device")
    device = dist_device or device
    # Every rank checks an explicit --tensorboard, so that all of them stop on it before any collective.
    writer = _summary_writer(c.tensorboard) if rank == 0 or c.tensorboard else None
    precision = c.precision or ("bf16" if device.type == "cuda" else "fp32")
    if device.type == "cuda" and precision == "fp32":
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True  # the MFU peak is TF32's
    out, main = Path(c.out), rank == 0
    data.make_dir(out, "--out", TrainError)

    data_dir = _resolve_data(c, rank, world)
    data.load_tokenizer(data_dir)  # a BPE run whose tokenizer.json is missing could not be sampled
    meta, data_id = data.load_meta(data_dir), data.identity(data_dir)
    mc = c.model_config(meta["tokenizer"]["vocab_size"])
    train_tokens = _split(data_dir, "train", mc.block_size)
    val_tokens = _split(data_dir, "val", mc.block_size)

    torch.manual_seed(c.seed)
    raw = GPT(mc).to(device)
    opt = FusedAdamW(param_groups(raw, c.weight_decay), lr=c.lr, betas=(0.9, 0.95), eps=1e-8)
    start, ckpt_dir = 0, out / "ckpt"
    earlier = checkpoint.checkpoints(ckpt_dir)
    if c.resume and earlier:
        start = _restore(earlier[-1], raw, opt, mc, c, device, data_id)
    elif main:
        if c.resume:
            print(f"fastcore train: no checkpoint in {ckpt_dir}; starting from step 0", file=sys.stderr)
        elif earlier:  # a fresh run must not leave an older run's checkpoints to resume into
            print(f"fastcore train: starting over in {out}: removing the {len(earlier)} checkpoints of an earlier run "
                  "(--resume continues it instead)", file=sys.stderr)
        shutil.rmtree(ckpt_dir, ignore_errors=True)
    if main:
        for name in ("meta.json", "tokenizer.json"):  # `fastcore sample --ckpt OUT` decodes with these
            if (data_dir / name).exists() and data_dir.resolve() != out.resolve():
                shutil.copyfile(data_dir / name, out / name)

    if c.compile and world > 1:
        # Block by block: each block's gradients then arrive as its backward ends, so DataParallel's
        # all-reduces overlap the rest, where one whole-model graph hands them all over at its end.
        for block in raw.blocks:
            block.compile()
    model = torch.compile(raw) if c.compile and world == 1 else raw
    if world > 1:
        from fastcore.distributed import DataParallel

        model = DataParallel(model)
    autocast = (torch.autocast(device.type, dtype=torch.bfloat16) if precision == "bf16"
                else contextlib.nullcontext())
    eval_every = c.eval_every or max(1, c.steps // 5)
    ckpt_every = c.ckpt_every or eval_every
    tokens_per_step = c.grad_accum * c.batch_size * mc.block_size   # over all ranks
    flops_per_token, peak = raw.flops_per_token(), peak_flops(device, precision)
    peak = peak * world if peak else None

    def evaluate() -> float:
        raw.eval()
        g = torch.Generator().manual_seed((c.seed + 7_777_777) % (1 << 64))
        total = torch.zeros((), dtype=torch.float64, device=device)
        with torch.no_grad():
            for i in range(c.eval_iters):
                starts = torch.randint(len(val_tokens) - mc.block_size, (c.batch_size,), generator=g).numpy()
                if i % world != rank:
                    continue
                rows = windows(val_tokens, starts, mc.block_size)
                with autocast:
                    total += raw(rows[:, :-1].to(device), rows[:, 1:].to(device))[1].double()
        if world > 1:
            dist.all_reduce(total)
        raw.train()
        return total.item() / c.eval_iters

    log = _Log(out, start, writer) if main else None
    batches = Batches(train_tokens, c, mc.block_size, rank, world, device, start)
    bar = Progress(c.steps, "train", "step", enabled=main and c.progress, initial=start)
    loss_value, val_loss, rate = math.nan, None, 0.0
    try:
        for step in range(start, c.steps):
            t0 = time.perf_counter()
            lr = lr_at(step, c)
            for group in opt.param_groups:
                group["lr"] = lr
            x, y, wait_ms = batches.next()
            loss_sum = torch.zeros((), device=device)
            for m in range(batches.local):
                sync = world == 1 or m == batches.local - 1
                with (contextlib.nullcontext() if sync else model.no_sync()), autocast:
                    _, loss = model(x[m], y[m])
                (loss / batches.local).backward()
                loss_sum += loss.detach()
            if c.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(raw.parameters(), c.grad_clip)
            opt.step()
            opt.zero_grad(set_to_none=world == 1)  # zeroing in place keeps DataParallel's bucket views
            if world > 1:
                dist.all_reduce(loss_sum)
            loss_value = loss_sum.item() / c.grad_accum   # also the step's synchronisation point
            if not math.isfinite(loss_value):
                raise TrainError(f"the loss became {loss_value} at step {step + 1}; lower --lr or check the data")
            dt = time.perf_counter() - t0
            rate = tokens_per_step / dt
            mfu = flops_per_token * rate / peak if peak else None
            done = step + 1
            if main:
                log.write({"step": done, "loss": loss_value, "lr": lr, "tokens_per_s": rate, "mfu": mfu,
                           "data_wait_ms": wait_ms, **_reduction_stats(model, world)})
                bar.update(1, loss=f"{loss_value:.4f}", tok_s=f"{rate:,.0f}", **({"mfu": f"{100 * mfu:.1f}%"} if mfu else {}))
            if done % eval_every == 0 or done == c.steps:
                val_loss = evaluate()
                if main:
                    log.write({"step": done, "val_loss": val_loss, "val_ppl": math.exp(min(val_loss, 700))})
                    bar.set_postfix(val_loss=f"{val_loss:.4f}")
            if main and (done % ckpt_every == 0 or done == c.steps):
                checkpoint.save(ckpt_dir, done, {
                    "step": done, "model": raw.state_dict(), "optimizer": opt.state_dict(),
                    "scheduler": {"lr": c.lr, "min_lr_ratio": c.min_lr_ratio, "warmup": c.warmup, "steps": c.steps},
                    "rng": _rng_state(device), "data": {"next_step": done, "seed": c.seed, "world_size": world, **data_id},
                    "config": {"model": dataclasses.asdict(mc), "train": dataclasses.asdict(c)},
                }, c.keep_ckpts)
    finally:
        batches.close()
        bar.close()
        if log is not None:
            log.close()
        if joined:  # NCCL warns at exit about a group left standing, whose last work may be unfinished
            dist.destroy_process_group()
    return {"steps": c.steps, "start_step": start, "loss": loss_value, "val_loss": val_loss,
            "tokens_per_s": rate, "out": str(out), "params": raw.num_params(), "world_size": world}


def _reduction_stats(model, world: int) -> dict:
    """DataParallel's figures for the step's reducing backward (rank 0's): bucket count, all-reduce
    time in flight, backward time and the fraction of the former that overlapped the latter."""
    if world == 1:
        return {}
    s = model.stats
    return {"dp_buckets": s["buckets"], "dp_comm_ms": s["comm_ms"], "dp_backward_ms": s["backward_ms"],
            "dp_overlap": s["overlap"]}


# Settings that shape the batches or the updates: changing them on --resume breaks exactness.
RESUME_KEYS = ("batch_size", "grad_accum", "seed", "lr", "min_lr_ratio", "warmup", "steps", "weight_decay", "grad_clip")


def _restore(path: Path, raw: GPT, opt: FusedAdamW, mc: GPTConfig, c: TrainConfig, device: torch.device,
             data_id: dict) -> int:
    state = checkpoint.load(path)
    saved_data = state.get("data", {}) if isinstance(state.get("data"), dict) else {}
    if saved_data.get("tokenizer", data_id["tokenizer"]) != data_id["tokenizer"]:
        raise checkpoint.CheckpointError(f"checkpoint {path} was trained with another tokenizer than this run's data, "
                                         "so its token ids would mean other text; resume with the data it was "
                                         "trained on, or start a new run in another --out")
    try:
        saved = state["config"]["model"]
        if saved != dataclasses.asdict(mc):
            diff = ", ".join(f"{k}: {saved.get(k)!r} in the checkpoint, {v!r} now"
                             for k, v in dataclasses.asdict(mc).items() if saved.get(k) != v)
            raise checkpoint.CheckpointError(f"checkpoint {path} was written for another model ({diff})")
        raw.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        _set_rng_state(state["rng"], device)
        step = int(state["step"])
    except (KeyError, RuntimeError, TypeError, ValueError) as exc:
        if isinstance(exc, checkpoint.CheckpointError):
            raise
        raise checkpoint.CheckpointError(f"checkpoint {path} does not fit this run ({checkpoint.describe(exc)})") from None
    if step >= c.steps:
        raise TrainError(f"--resume: checkpoint {path} is at step {step}, already at --steps ({c.steps}); raise --steps")
    saved_train = state["config"].get("train", {})
    changed = [f"--{k.replace('_', '-')} {saved_train[k]} -> {getattr(c, k)}" for k in RESUME_KEYS
               if k in saved_train and saved_train[k] != getattr(c, k)]
    if saved_data.get("meta", data_id["meta"]) != data_id["meta"]:
        changed.append("--data: other data (its meta.json differs)")
    if changed:
        print(f"fastcore train: note: resuming {path} with changed settings ({', '.join(changed)}); "
              "the run continues, but not as an uninterrupted run would", file=sys.stderr)
    opt.param_groups[0]["weight_decay"] = c.weight_decay  # the matrices' decay comes from the flags, as lr does
    return step
