"""Data parallelism on torch.distributed: bucketed, overlapped gradient all-reduce.

Gradients live in flat buckets. Each bucket's all-reduce starts, asynchronously, as soon as the
last of its gradients has been accumulated (a hook on its gradient accumulator), so communication overlaps
the rest of the backward pass; buckets start in the same order on every rank, so the collectives
match. The collectives are PyTorch's (NCCL on GPUs, gloo on CPU); what is ours is the bucketing, the
overlap and the fused packing (``fastcore.ops.pack``: copy, scale and cast many gradients in one launch).
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
import os
import time
import weakref
from collections.abc import Mapping
from datetime import timedelta
from typing import Optional

import torch
import torch.distributed as dist
from torch import Tensor, nn

from fastcore.distributed.buckets import Bucket, assign_buckets
from fastcore.ops.pack import pack_unchecked  # DataParallel builds valid arguments itself

_COMPRESS = {None: None, "bf16": torch.bfloat16, "fp16": torch.float16}
_EAGER_COPY_BYTES = 1 << 20  # a copy this large costs far more than its own launch


def init_from_env(timeout: timedelta = timedelta(minutes=10)) -> tuple[int, int, torch.device]:
    """Join the process group described by ``torchrun``'s environment; (rank, world size, device).

    NCCL with one GPU per local rank when CUDA is available, gloo on CPU otherwise. ``timeout``
    bounds every collective, so a rank that dies makes the others fail instead of hang.
    """
    missing = [k for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
    if missing:
        raise RuntimeError(f"init_from_env: {', '.join(missing)} not set; launch with torchrun "
                           "(e.g. torchrun --nproc-per-node 2 ...)")
    if torch.cuda.is_available():
        local = int(os.environ.get("LOCAL_RANK", 0))
        if local >= torch.cuda.device_count():
            raise RuntimeError(f"init_from_env: LOCAL_RANK {local} has no GPU of its own; this machine shows "
                               f"{torch.cuda.device_count()} (start at most that many processes per node)")
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
        backend = "nccl"
    else:
        device, backend = torch.device("cpu"), "gloo"
    if not dist.is_initialized():
        dist.init_process_group(backend, timeout=timeout)
    return dist.get_rank(), dist.get_world_size(), device


def _dense(t: Tensor) -> bool:
    """Whether ``t`` covers a block of memory exactly once: contiguous up to an order of its dims."""
    expected = 1
    for stride, size in sorted((st, sz) for sz, st in zip(t.shape, t.stride()) if sz != 1):
        if stride != expected:
            return False
        expected *= size
    return True


def _same_layout(t: Tensor, view: Tensor) -> bool:
    return _dense(t) and all(st == vs for sz, st, vs in zip(t.shape, t.stride(), view.stride()) if sz != 1)


def _memory(t: Tensor, view: Tensor) -> Tensor:
    """``t``'s elements as a 1-D tensor in the memory order of ``view`` (a bucket view of its shape)."""
    if t.stride() != view.stride() and not _same_layout(t, view):  # a gradient set by hand in another layout
        t = torch.empty_like(view, dtype=t.dtype).copy_(t)
    return t.as_strided((t.numel(),), (1,))


class _HostClock:
    """Wall time. A gloo all-reduce's end is polled from the gradient hooks (a Python callback on its
    future, run in gloo's thread, cost ~4% of a step in GIL contention), good to one hook's spacing."""

    def now(self) -> float:
        return time.perf_counter()

    def end_of(self, work) -> None:
        return None  # polled

    def ms(self, a: float, b: float) -> float:
        return (b - a) * 1e3


class _GpuClock:
    """The GPU's timeline: events on the current stream. An NCCL all-reduce's end is an event on a side
    stream that waits for it and nothing else, so it fires when the collective finishes."""

    def __init__(self, device: torch.device) -> None:
        self.side = torch.cuda.Stream(device)

    def now(self):
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def end_of(self, work):
        with torch.cuda.stream(self.side):
            work.wait()  # makes the current (side) stream wait; the host does not block
            return self.now()

    def ms(self, a, b) -> float:
        b.synchronize()
        return a.elapsed_time(b)


def _find_tensors(out, depth: int = 0) -> list[Tensor]:
    """The tensors of a forward's output, as DDP finds them: in tuples, lists, mappings (a Hugging Face
    ModelOutput) and dataclasses, and here also in the attributes of a plain output object."""
    if isinstance(out, Tensor):
        return [out]
    if depth > 8 or isinstance(out, (nn.Module, str, bytes)):
        return []
    if isinstance(out, (list, tuple)):
        items = out
    elif isinstance(out, Mapping):
        items = out.values()
    elif dataclasses.is_dataclass(out) and not isinstance(out, type):
        items = [getattr(out, f.name) for f in dataclasses.fields(out)]
    elif hasattr(out, "__dict__") and not isinstance(out, type):
        items = vars(out).values()
    else:
        return []
    return [t for item in items for t in _find_tensors(item, depth + 1)]


# Hooks hold the wrapper weakly: a dropped wrapper is freed, with its buckets, and its hooks removed.
# torch.compile leaves them to eager mode: they start collectives and queue callbacks.
@torch.compiler.disable
def _output_grad(ref, grad) -> None:
    dp = ref()
    # The end of this (outer) pass is queued here; the pass itself starts with its first parameter
    # gradient, so one that reaches no parameter (autograd.grad with respect to the inputs, a frozen
    # module such as a GAN's discriminator in the generator's step) reduces nothing.
    if dp is not None and not dp._in_backward and not dp._queued:
        dp._queued = True
        dp._t_outputs = dp._clock.now()  # the module's backward starts here, before any parameter's gradient
        torch.autograd.Variable._execution_engine.queue_callback(dp._finish_backward)


@torch.compiler.disable
def _param_grad(ref, i: int, grad_inputs, grad_outputs) -> None:
    dp = ref()
    if dp is not None:
        dp._on_grad(i)


def _remove(handles: list) -> None:
    for h in handles:
        h.remove()


class DataParallel(nn.Module):
    """Wraps ``module`` like ``torch.nn.parallel.DistributedDataParallel``: after ``backward()`` every
    parameter's ``.grad`` holds the average over the ranks of ``process_group``.

    - Buckets: up to ``bucket_cap_mb`` each (the first ``first_bucket_mb``), per (dtype, device),
      in reverse parameter order at first, rebuilt once after the first iteration in the order
      autograd produced the gradients (rank 0's order, broadcast).
    - ``gradient_as_bucket_view``: gradients are views into the buckets, with the strides of a dense
      parameter (channels_last, transposed), so no copy is made. A gradient that is not a view
      (after ``zero_grad(set_to_none=True)``) is copied in and scaled: from its own hook when it
      has 1 MiB or more, so autograd's tensor is freed at once, otherwise with the other small
      ones of its bucket in one fused launch.
    - ``compress="bf16"`` or ``"fp16"`` sends each bucket in half precision, divided by the world
      size before sending so that the sum cannot overflow, then widens the result.
    - Unused parameters raise an error naming them, unless ``find_unused_parameters=True``:
      then a parameter unused on some ranks takes part with zeros there, and one no rank used
      keeps its gradient (None stays None), as in DDP.
    - A reducing forward (outside ``no_sync()``, with grad enabled) arms the next backward. The
      first gradient of an output tensor (in tuples, lists, mappings, dataclasses, objects) queues
      the end of the pass in the outer backward; the first parameter gradient starts it, so a
      backward that reaches no parameter reduces nothing. Buffers are broadcast from rank 0 before
      each reducing forward only, so evaluation under ``torch.no_grad()`` never waits.
    - ``stats`` after each step: bucket count and bytes, communication and backward time, and the
      fraction of the all-reduce time that overlapped the backward pass.
    """

    def __init__(self, module: nn.Module, *, process_group=None, bucket_cap_mb: float = 25,
                 first_bucket_mb: float = 1, compress: Optional[str] = None, gradient_as_bucket_view: bool = True,
                 find_unused_parameters: bool = False, broadcast_buffers: bool = True) -> None:
        super().__init__()
        if compress not in _COMPRESS:
            raise ValueError(f"DataParallel: compress must be None, 'bf16' or 'fp16', got {compress!r}")
        for name, mb in (("bucket_cap_mb", bucket_cap_mb), ("first_bucket_mb", first_bucket_mb)):
            if isinstance(mb, bool) or not isinstance(mb, (int, float)) or not 2**-20 <= mb < math.inf:
                raise ValueError(f"DataParallel: {name} must be a finite number of MiB, at least one byte "
                                 f"(2**-20), got {mb!r}")
        if not isinstance(module, nn.Module):
            raise TypeError(f"DataParallel: module must be a torch.nn.Module, got {type(module).__name__}")
        if not dist.is_available() or not dist.is_initialized():
            raise RuntimeError("DataParallel: torch.distributed is not initialised; call "
                               "fastcore.distributed.init_from_env() (under torchrun) first")
        self.module = module
        self.process_group = process_group or dist.group.WORLD
        self.world_size = dist.get_world_size(self.process_group)
        self._src = dist.get_global_rank(self.process_group, 0) if process_group is not None else 0
        self.compress = compress
        self.gradient_as_bucket_view = gradient_as_bucket_view
        self.find_unused_parameters = find_unused_parameters
        self.broadcast_buffers = broadcast_buffers
        self._caps = (int(bucket_cap_mb * 2**20), int(first_bucket_mb * 2**20))
        devices = {t.device for t in [*module.parameters(), *module.buffers()]}
        if len(devices) > 1:
            raise ValueError(f"DataParallel: the module's tensors must be on one device, got {sorted(map(str, devices))}")
        complex_ = [n for n, p in module.named_parameters() if p.requires_grad and p.is_complex()]
        if complex_:
            raise ValueError(f"DataParallel: complex parameters are not supported: {', '.join(complex_)}; "
                             "keep them as real tensors (torch.view_as_real) in the module")
        sparse = [n or type(module).__name__ for n, m in module.named_modules() if getattr(m, "sparse", False) is True]
        if sparse:
            raise ValueError(f"DataParallel: modules with sparse gradients are not supported: {', '.join(sparse)}; "
                             "build them with sparse=False")
        self._check_ranks_agree(module)
        with torch.no_grad():  # every parameter, frozen ones too, and every buffer: rank 0's values
            for t in [*module.parameters(), *module.buffers()]:
                self._broadcast(t)
        self._attach()

    def _broadcast(self, t: Tensor) -> None:
        """Rank 0's values into ``t``; through a dense copy when ``t`` is not dense, since a collective
        on such a tensor leaves the receiving ranks' values as they were, with no error."""
        if t.is_contiguous():
            dist.broadcast(t, self._src, group=self.process_group)
        elif _dense(t):  # a transposed weight, say: NCCL refuses it, but its memory in 1-D is the same block
            dist.broadcast(t.as_strided((t.numel(),), (1,)), self._src, group=self.process_group)
        else:
            dense = t.contiguous()
            dist.broadcast(dense, self._src, group=self.process_group)
            t.copy_(dense)

    def _attach(self) -> None:
        """Buckets, gradient hooks and the clock: all a copy (deepcopy, unpickling) rebuilds. No collective."""
        named = [(n, p) for n, p in self.module.named_parameters() if p.requires_grad]
        self._names = [n for n, _ in named]
        self._params = [p for _, p in named]
        self._build(list(reversed(range(len(self._params)))))
        self._rebuilt = False
        self._sync = True
        self._in_backward = False
        self._armed = False  # a reducing forward ran and its backward has not finished
        self._early: list = []  # (graph task, parameter) whose gradient came before the pass started
        self._queued = False  # the end-of-backward callback is queued
        self._t_outputs = None  # when the outputs got their first gradient in the pass under way
        # Hooks on the gradient accumulators, as DDP's: they run after the parameters' own hooks, which
        # see the local gradient. Kept here, since a parameter holds its accumulator weakly.
        with torch.enable_grad():
            self._grad_accs = [p.view_as(p).grad_fn.next_functions[0][0] for p in self._params]
        ref = weakref.ref(self)
        self._handles = [acc.register_hook(functools.partial(_param_grad, ref, i))
                         for i, acc in enumerate(self._grad_accs)]
        weakref.finalize(self, _remove, self._handles)
        blocking = any(os.environ.get(k, "0") not in ("0", "")
                       for k in ("TORCH_NCCL_BLOCKING_WAIT", "NCCL_BLOCKING_WAIT"))
        on_gpu = self._bucket_data and self._bucket_data[0].is_cuda and dist.get_backend(self.process_group) == "nccl"
        self._clock = _GpuClock(self._bucket_data[0].device) if on_gpu and not blocking else _HostClock()
        self._stats: dict = {}
        self._pending_stats = None

    # Rebuilt by _attach; a process group cannot be pickled.
    _RUNTIME = ("process_group", "_names", "_params", "_buckets", "_bucket_of", "_views", "_flats", "_bucket_data",
                "_wire", "_wire_slices", "_grad_accs", "_handles", "_clock", "_stats", "_pending_stats", "_works", "_ready",
                "_scaled", "_order_seen", "_pending", "_next", "_t_backward", "_t_outputs", "_in_backward", "_armed", "_early", "_queued")

    def __getstate__(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if k not in self._RUNTIME}

    def __setstate__(self, state: dict) -> None:
        """A copy reduces over the default process group, as DDP's does."""
        super().__setstate__(state)
        if not dist.is_available() or not dist.is_initialized():
            raise RuntimeError("DataParallel: torch.distributed must be initialised to copy or unpickle a DataParallel")
        self.process_group = dist.group.WORLD
        self.world_size, self._src = dist.get_world_size(), 0
        self._attach()

    def _check_ranks_agree(self, module: nn.Module) -> None:
        """Every rank must hold the same parameters and buffers, in the same memory layout, because the
        broadcast and the buckets move memory. Each rank compares every rank's list with rank 0's, so
        all of them raise together and none is left waiting in a collective."""
        def entry(name, t):
            strides = tuple(st if size != 1 else None for size, st in zip(t.shape, t.stride()))
            return name, tuple(t.shape), strides, str(t.dtype), t.requires_grad

        mine = [entry(*nt) for nt in [*module.named_parameters(), *module.named_buffers()]]
        everyone: list = [None] * self.world_size
        dist.all_gather_object(everyone, mine, group=self.process_group)
        for rank, theirs in enumerate(everyone):
            if theirs == everyone[0]:
                continue
            first = everyone[0]
            k = next((k for k, (a, b) in enumerate(zip(theirs, first)) if a != b), min(len(theirs), len(first)))
            got, want = (t[k] if k < len(t) else "nothing" for t in (theirs, first))
            raise ValueError(f"DataParallel: the module differs between ranks: tensor {k} (name, shape, strides, dtype, "
                             f"requires_grad) is {got} on rank {rank} but {want} on rank 0; build the same "
                             "module, in the same memory format, on every rank")

    # ------------------------------------------------------------ buckets
    def _build(self, order: list[int]) -> None:
        """Assign buckets, allocate their buffers and (with views) point each gradient into them."""
        self._buckets: list[Bucket] = assign_buckets(self._params, order, *self._caps)
        self._bucket_of = [0] * len(self._params)
        self._views: list[Optional[Tensor]] = [None] * len(self._params)
        self._flats: list[Optional[Tensor]] = [None] * len(self._params)  # each view as 1-D memory
        self._bucket_data = []
        for b, bucket in enumerate(self._buckets):
            buffer = torch.zeros(bucket.numel, dtype=bucket.dtype, device=bucket.device)
            self._bucket_data.append(buffer)
            for i, offset in zip(bucket.params, bucket.offsets):
                self._bucket_of[i] = b
                p = self._params[i]
                flat = self._flats[i] = buffer[offset:offset + p.numel()]
                # The parameter's own layout (channels_last, a transposed weight) when it is dense, as
                # autograd lays out its gradients; so gradients accumulate into the view in place.
                self._views[i] = flat.as_strided(p.shape, p.stride()) if _dense(p) else flat.view_as(p)
        if self.gradient_as_bucket_view:  # existing gradients move into the new views; None stays None
            with torch.no_grad():
                for p, view in zip(self._params, self._views):
                    if p.grad is not None:
                        view.copy_(p.grad)
                        p.grad = view
        wire = _COMPRESS[self.compress]
        self._wire = [buf if wire is None or buf.dtype == wire else torch.empty(buf.numel(), dtype=wire,
                                                                                device=buf.device)
                      for buf in self._bucket_data]
        # Each bucket's parameters as 1-D slices of what goes on the wire (the buffer itself unless compressing).
        self._wire_slices = [[self._flats[i] for i in bucket.params] if w is buf else
                             [w[o:o + self._params[i].numel()] for i, o in zip(bucket.params, bucket.offsets)]
                             for bucket, buf, w in zip(self._buckets, self._bucket_data, self._wire)]

    # ------------------------------------------------------------ the backward pass
    def _on_grad(self, i: int) -> None:
        if not self._in_backward:
            if not (self._armed or self._queued):
                # A backward through a forward taken under no_sync() or without grad; or a parameter
                # used after the forward, whose gradient came before the outputs' hook in a later pass.
                self._early.append((torch._C._current_graph_task_id(), i))
                return
            # A parameter used after the forward (a learnable temperature in the loss) can come
            # before the outputs' hook, and an output the hook cannot see never fires it.
            self._start_backward()
        if self._params[i].grad.layout != torch.strided:
            raise RuntimeError(f"DataParallel: parameter {self._names[i]!r} got a {self._params[i].grad.layout} "
                               "gradient; only dense gradients are supported")
        if self._ready[i]:
            raise RuntimeError(f"DataParallel: parameter {self._names[i]!r} got its gradient twice in one backward "
                               "pass (reentrant backward or several backward calls without no_sync())")
        self._ready[i] = True
        self._order_seen.append(i)
        self._poll()
        b = self._bucket_of[i]
        p, view = self._params[i], self._views[i]
        if (self.gradient_as_bucket_view and self._wire[b] is self._bucket_data[b] and p.grad.data_ptr() != view.data_ptr()
                and p.grad.numel() * p.grad.element_size() >= _EAGER_COPY_BYTES):
            # A large gradient that is not a view (after zero_grad(set_to_none=True)) goes into its bucket
            # now, scaled, so that autograd's tensor is freed at once instead of when the bucket fills.
            # One tensor gains nothing from pack's launch table: ATen's multiply is the one launch.
            torch.mul(_memory(p.grad, view), 1.0 / self.world_size, out=self._flats[i])
            p.grad = view
            self._scaled[i] = True
        self._pending[b] -= 1
        if self._pending[b] == 0:
            self._launch_ready()

    def _start_backward(self) -> None:
        if torch.is_grad_enabled():  # the same on every rank, and before any collective: no rank waits
            raise RuntimeError("DataParallel: backward(create_graph=True) (double backward) is not supported; "
                               "run it on the wrapped module under no_sync() and reduce the gradients yourself")
        self._in_backward = True
        self._ready = [False] * len(self._params)
        self._scaled = [False] * len(self._params)
        self._order_seen: list[int] = []
        self._pending = [len(b.params) for b in self._buckets]
        self._next = 0
        self._works: list = []
        self._t_backward = self._clock.now() if self._t_outputs is None else self._t_outputs
        if not self._queued:
            self._queued = True
            torch.autograd.Variable._execution_engine.queue_callback(self._finish_backward)
        task, early, self._early = torch._C._current_graph_task_id(), self._early, []
        for i in dict.fromkeys(i for t, i in early if t == task):  # came earlier in this same pass
            self._on_grad(i)

    def _launch_ready(self) -> None:
        """Start every bucket whose gradients are all in, in bucket order (the same on every rank)."""
        while self._next < len(self._buckets) and self._pending[self._next] == 0:
            self._launch(self._next)
            self._next += 1

    def _launch(self, b: int) -> None:
        bucket, buffer, wire = self._buckets[b], self._bucket_data[b], self._wire[b]
        params = [self._params[i] for i in bucket.params]
        views = [self._views[i] for i in bucket.params]
        scale = 1.0 / self.world_size
        slices = self._wire_slices[b]
        if wire is buffer:
            # The small gradients that are not views are copied in and scaled in one fused launch, the
            # views scaled in place (the large ones came in scaled from their hook): one read of each.
            stray = [k for k, (p, v) in enumerate(zip(params, views)) if p.grad.data_ptr() != v.data_ptr()]
            # At world size 1 the views need no pass at all.
            done = set(stray) | {k for k, i in enumerate(bucket.params) if self._scaled[i]}
            if not done:
                if scale != 1.0:
                    buffer.mul_(scale)
            else:
                if stray:
                    pack_unchecked([_memory(params[k].grad, views[k]) for k in stray], [slices[k] for k in stray],
                                   scale)
                in_place = [s for k, s in enumerate(slices) if k not in done]
                if in_place and scale != 1.0:
                    torch._foreach_mul_(in_place, scale)
                if self.gradient_as_bucket_view:
                    for k in stray:
                        params[k].grad = views[k]
        else:
            # Compressing: every gradient scaled and narrowed into the wire buffer in one launch.
            pack_unchecked([_memory(p.grad, v) for p, v in zip(params, views)], slices, scale)
        start = self._clock.now()
        work = dist.all_reduce(wire, group=self.process_group, async_op=True)
        self._works.append((b, work, {"bucket": b, "start": start, "end": self._clock.end_of(work)}))

    @torch.compiler.disable
    def _finish_backward(self) -> None:
        self._queued, self._t_outputs = False, None
        if not self._in_backward:
            return  # the pass reached no parameter
        self._in_backward = self._armed = False
        t_end = self._clock.now()
        unready = [i for i, ok in enumerate(self._ready) if not ok]
        had_none = [i for i in unready if self._params[i].grad is None]
        with torch.no_grad():
            # A parameter without a gradient in this backward still takes part, so that every rank
            # issues the same collectives: its gradient so far (accumulated under no_sync, or from
            # an earlier backward), or zeros.
            for i in unready:
                p = self._params[i]
                if p.grad is None:
                    p.grad = self._views[i].zero_() if self.gradient_as_bucket_view else torch.zeros_like(p)
                self._ready[i] = True
                self._pending[self._bucket_of[i]] -= 1
        self._launch_ready()
        self._poll()
        for b, work, record in self._works:
            work.wait()
            if record["end"] is None:
                record["end"] = self._clock.now()
            if self._wire[b] is not self._bucket_data[b] or not self.gradient_as_bucket_view:
                self._unpack(b)
        if self.find_unused_parameters:
            self._forget_unused(had_none)
        self._record_stats(t_end)
        if not self._rebuilt:
            self._rebuild()
        if unready and not self.find_unused_parameters:
            # Raised after every collective of this pass, so the other ranks are not left waiting.
            names = ", ".join(self._names[i] for i in unready)
            raise RuntimeError(f"DataParallel: these parameters got no gradient in this backward pass: {names}. "
                               "Make every parameter take part in the loss, or pass "
                               "find_unused_parameters=True to reduce zeros for them.")

    def _forget_unused(self, had_none: list[int]) -> None:
        """As DDP: a parameter that no rank used since the last reduction, under no_sync() included,
        keeps its gradient None, so an optimizer leaves it alone; where any rank has a gradient for it,
        every rank keeps the average. Every rank sums the flags (one small collective a pass)."""
        used = torch.ones(len(self._params), dtype=torch.int32, device=self._bucket_data[0].device)
        used[had_none] = 0
        dist.all_reduce(used, group=self.process_group)
        for i in had_none:
            if used[i] == 0:
                self._params[i].grad = None

    def _poll(self) -> None:
        now = None
        for _, work, record in self._works:
            if record["end"] is None and work.is_completed():
                record["end"] = now = now or self._clock.now()

    def _unpack(self, b: int) -> None:
        """The reduced bucket into the gradients: views are already there unless compressing."""
        bucket = self._buckets[b]
        params = [self._params[i] for i in bucket.params]
        views = [self._views[i] for i in bucket.params]
        if self.gradient_as_bucket_view:
            for p, v in zip(params, views):
                p.grad = v
        grads = [p.grad for p in params]
        srcs = self._wire_slices[b]
        same = [_same_layout(g, v) for g, v in zip(grads, views)]
        pack_unchecked([s for s, ok in zip(srcs, same) if ok],
                       [_memory(g, v) for g, v, ok in zip(grads, views, same) if ok])
        for src, g, v, ok in zip(srcs, grads, views, same):
            if not ok:  # a gradient set by hand in another layout than its parameter's
                g.copy_(src.as_strided(v.shape, v.stride()))

    def _record_stats(self, t_end) -> None:
        # Worked out when read: on a GPU that waits for the events, which the step is not made to do.
        clock, origin, records = self._clock, self._t_backward, [r for _, _, r in self._works]
        layout = {"buckets": len(self._buckets), "bucket_bytes": [b.nbytes for b in self._buckets]}
        rebuilt = self._rebuilt

        def stats() -> dict:
            backward = clock.ms(origin, t_end)
            comm = overlap = 0.0
            for r in records:
                start, end = clock.ms(origin, r["start"]), clock.ms(origin, r["end"])
                comm += end - start
                overlap += max(0.0, min(end, backward) - start)
            return {**layout, "comm_ms": comm, "backward_ms": backward,
                    "overlap": overlap / comm if comm > 0 else 0.0, "rebuilt": rebuilt}
        self._pending_stats = stats

    @property
    def stats(self) -> dict:
        """The last reducing backward pass: bucket count and bytes, the time its all-reduces were in
        flight, the backward's time (from the outputs' first gradient), and the fraction of the former
        that overlapped the latter."""
        if self._pending_stats is not None:
            self._stats, self._pending_stats = self._pending_stats(), None
        return self._stats

    def _rebuild(self) -> None:
        """Once, after the first iteration: buckets in the order autograd produced the gradients.
        Ranks can see different orders, so rank 0's is broadcast and used everywhere."""
        seen = list(self._order_seen)
        seen += [i for i in reversed(range(len(self._params))) if i not in set(seen)]
        order = [seen]
        dist.broadcast_object_list(order, src=self._src, group=self.process_group)
        self._rebuilt = True
        if order[0] != [i for b in self._buckets for i in b.params]:
            self._build(order[0])  # moves any gradient that is a view into the new buckets

    # ------------------------------------------------------------ the module
    def forward(self, *args, **kwargs):
        inside = torch._C._current_graph_task_id() != -1  # recomputed in a backward (checkpointing around us)
        if inside and (self._in_backward or self._queued):
            return self.module(*args, **kwargs)  # non-reentrant: the pass under way reduces it
        if not inside:  # (reentrant: the nested backward through this forward is the one to reduce)
            if self._in_backward:
                self._abandon()
            self._queued, self._t_outputs = False, None  # a pass that raised never ran its callback
        sync = self._sync and torch.is_grad_enabled()  # whether to reduce is decided here, as in DDP
        if sync and self.broadcast_buffers and not inside:  # not when evaluating: ranks may run different numbers of batches
            with torch.no_grad():
                for t in self.module.buffers():
                    self._broadcast(t)
        out = self.module(*args, **kwargs)
        if torch.is_grad_enabled():  # an evaluation forward between a forward and its backward changes nothing
            self._armed, self._early = self._sync, []
        # Leaves (a returned parameter) are left to their accumulator's hook: a hook on them would stay.
        outputs = [t for t in _find_tensors(out) if t.requires_grad and t.grad_fn is not None] if sync else []
        if outputs:
            # The first output gradient queues the end of the pass, before any of the module's backward:
            # the callback then belongs to the outer pass, also when activation checkpointing runs
            # nested backward passes. The outputs themselves are left alone.
            torch.autograd.graph.register_multi_grad_hook(outputs, functools.partial(_output_grad, weakref.ref(self)),
                                                          mode="any")
        return out

    def _abandon(self) -> None:
        """A backward pass raised midway. Its all-reduces still run (every rank issued the same ones,
        in bucket order): wait for them, so that they cannot write into the next step's gradients."""
        for _, work, _ in self._works:
            with contextlib.suppress(Exception):
                work.wait()
        self._in_backward = False

    @contextlib.contextmanager
    def no_sync(self):
        """Skip communication for the backward passes inside: gradients accumulate locally, and the
        first backward after the block reduces the sum."""
        previous, self._sync = self._sync, False
        try:
            yield
        finally:
            self._sync = previous
