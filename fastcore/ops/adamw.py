"""Fused AdamW and Adam: one step over many tensors, one launch per (device, dtype) of parameters.

:func:`adamw_step` is the functional form, in the shape of ``torch.optim.adamw.adamw``;
:class:`fastcore.optim.FusedAdamW` calls it. Every backend reads the same launch tables:

- ``meta``, int64 ``(n, 8)``: the addresses of param, grad, exp_avg, exp_avg_sq, max_exp_avg_sq
  (0 without amsgrad), the fp32 master copy (0 without), the float32 step count, then numel;
- ``hparams``, float64 ``(n, 2)``: lr and weight_decay of each tensor, so that param groups with
  their own values share a launch;
- ``chunks``, int32 ``(c, 2)``: (tensor, chunk); one program or block per chunk, whatever the
  tensors' sizes and count.

The step counts are incremented before the launch and, as in PyTorch's fused optimizers,
decremented again by ``found_inf``, so that a skipped step leaves everything as it was without the
host ever reading a GPU value.
"""
from __future__ import annotations

import dataclasses
import math
import numbers
from typing import Optional, Sequence, Union

import torch
from torch import Tensor

from fastcore import reference
from fastcore.backends import resolve_backend, triton_device
from fastcore.ops import launch_table

Scalar = Union[float, Tensor]
META_COLS = 8


def state_dtype(param_dtype: torch.dtype) -> torch.dtype:
    """Optimizer state is float32 for 16-bit and float32 parameters, float64 for float64 ones."""
    return torch.float64 if param_dtype == torch.float64 else torch.float32


@torch.no_grad()
def adamw_step(params: Sequence[Tensor], grads: Sequence[Tensor], exp_avgs: Sequence[Tensor],
               exp_avg_sqs: Sequence[Tensor], steps: Sequence[Tensor], *,
               lr: Union[Scalar, Sequence[float]], beta1: float = 0.9, beta2: float = 0.999, eps: float = 1e-8,
               weight_decay: Union[float, Sequence[float]] = 0.0,
               max_exp_avg_sqs: Optional[Sequence[Tensor]] = None,
               master_params: Optional[Sequence[Optional[Tensor]]] = None,
               maximize: bool = False, decoupled: bool = True,
               grad_scale: Optional[Tensor] = None, found_inf: Optional[Tensor] = None,
               backend: str = "auto") -> None:
    """One AdamW (``decoupled=True``) or Adam (L2 weight decay) step, in place, over every tensor.

    The maths is ``torch.optim.AdamW``'s (``torch.optim.Adam``'s with ``decoupled=False``).
    ``steps`` are float32 scalar tensors on the parameters' device, incremented here. ``exp_avgs``,
    ``exp_avg_sqs`` and ``max_exp_avg_sqs`` (amsgrad when given) have the dtype of
    :func:`state_dtype`. A ``master_params`` entry is an fp32 copy of a 16-bit parameter that the
    step updates, rounding the parameter from it; None where there is none. ``lr`` and
    ``weight_decay`` are one value or one per tensor. ``grad_scale`` divides the gradients and a
    nonzero ``found_inf`` skips the step, as ``torch.amp.GradScaler`` passes them.
    """
    n = _check_lists(params, grads, exp_avgs, exp_avg_sqs, steps, max_exp_avg_sqs, master_params)
    lrs = _per_tensor("lr", lr, n)
    wds = _per_tensor("weight_decay", weight_decay, n)
    _check_hyper(beta1, beta2, eps)
    for name, t in (("grad_scale", grad_scale), ("found_inf", found_inf)):
        if t is not None and (not isinstance(t, Tensor) or t.numel() != 1 or not t.is_floating_point()):
            raise TypeError(f"adamw_step: {name} must be None or a one-element floating-point tensor")
    opts = dict(beta1=float(beta1), beta2=float(beta2), eps=float(eps), maximize=bool(maximize),
                decoupled=bool(decoupled))
    run(plan(params, grads, exp_avgs, exp_avg_sqs, steps, lrs, wds, max_exp_avg_sqs, master_params, opts, backend),
        grad_scale, found_inf)


@dataclasses.dataclass
class Launch:
    """One kernel launch: tensors of one device and dtype, with resolved backend."""

    backend: str
    device: torch.device
    dtype: torch.dtype
    cols: list  # params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs | None, masters | None, steps
    lrs: list
    wds: list
    opts: dict
    checked: Optional[dict] = None  # FusedAdamW's: the tables whose state was last found to fit


def plan(params, grads, exp_avgs, exp_avg_sqs, steps, lrs, wds, max_exp_avg_sqs, master_params, opts,
         backend, checked: Optional[dict] = None) -> list[Launch]:
    """Group the tensors into launches and resolve each one's backend, touching nothing, so that a
    refusal (say, float64 on triton) comes before any tensor has stepped. No argument checks here:
    ``adamw_step`` checks everything first; FusedAdamW passes ``checked``, and a launch whose
    tensors differ from the last ones checked has its state checked against its parameters."""
    buckets: dict[tuple, list[int]] = {}
    if master_params is None:
        for i, p in enumerate(params):
            buckets.setdefault((p.get_device(), p.dtype, False), []).append(i)  # get_device: an int, cheap
    else:
        for i, p in enumerate(params):
            buckets.setdefault((p.get_device(), p.dtype, master_params[i] is not None), []).append(i)
    launches = []
    for (_, dtype, has_master), idx in buckets.items():
        device = params[idx[0]].device
        name = resolve_backend("adamw", backend, device, dtype)
        cols = [params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, master_params if has_master else None, steps]
        if len(buckets) == 1:
            launches.append(Launch(name, device, dtype, cols, lrs, wds, opts, checked))
        else:
            cols = [None if col is None else [col[i] for i in idx] for col in cols]
            launches.append(Launch(name, device, dtype, cols, [lrs[i] for i in idx], [wds[i] for i in idx], opts,
                                   checked))
    return launches


def run(launches: list[Launch], grad_scale: Optional[Tensor], found_inf: Optional[Tensor]) -> None:
    if any(launch.device.type == "cuda" for launch in launches) and torch.cuda.is_current_stream_capturing():
        raise RuntimeError("adamw: the fused step builds its launch table on the host each step, so it cannot be "
                           "captured in a CUDA graph")
    for launch in launches:
        _step_bucket(launch, _on(grad_scale, launch.device), _on(found_inf, launch.device))


def _on(t: Optional[Tensor], device: torch.device) -> Optional[Tensor]:
    return None if t is None else t.to(device=device, dtype=torch.float32).reshape(())


def _step_bucket(launch: Launch, grad_scale, found_inf) -> None:
    backend, lrs, wds, opts = launch.backend, launch.lrs, launch.wds, launch.opts
    params, grads, exp_avgs, exp_avg_sqs, max_sqs, masters, steps = launch.cols
    # The C++ CPU launcher counts the steps itself (a foreach over 0-d tensors costs ~4 us each).
    counted_in_kernel = backend == "cpu"
    if not counted_in_kernel:
        torch._foreach_add_(steps, 1)
    if backend == "reference":
        if found_inf is None or found_inf.item() == 0:
            scale = None if grad_scale is None else grad_scale.item()
            for i, p in enumerate(params):
                reference.adamw_step(p, grads[i], exp_avgs[i], exp_avg_sqs[i], steps[i].item(), lr=lrs[i],
                                     weight_decay=wds[i], max_exp_avg_sq=None if max_sqs is None else max_sqs[i],
                                     master=None if masters is None else masters[i], grad_scale=scale, **opts)
    else:
        _launch(launch, grad_scale, found_inf)
    if found_inf is not None and not counted_in_kernel:
        torch._foreach_sub_(steps, [found_inf] * len(steps))


def _launch(launch: Launch, grad_scale, found_inf) -> None:
    """Build the launch tables, run one kernel, and copy back any parameter staged as contiguous."""
    backend, device, dtype, cols = launch.backend, launch.device, launch.dtype, launch.cols
    params, grads = cols[0], cols[1]
    # The kernels go through addresses: a non-contiguous or negative-view parameter is stepped as a
    # plain copy and written back; such gradients are read through one.
    staged = [(i, p) for i, p in enumerate(params) if not p.is_contiguous() or p.is_neg()]
    if staged:
        params = list(params)
        for i, p in staged:
            params[i] = p.resolve_neg().contiguous()
    if not all(g.is_contiguous() and not g.is_neg() for g in grads):
        grads = [g.resolve_neg().contiguous() for g in grads]  # kept alive here until the kernel is queued
    cols = [params, grads, *cols[2:]]
    n = len(params)
    numels = [p.numel() for p in params]
    addresses = [launch_table.addresses(col, n) for col in cols]
    if launch.checked is not None:
        # Every tensor's address and size, taken for the table anyway: a new checkpoint's state or a
        # parameter cast or resized in place changes them, and only then is the state checked.
        key, signature = (str(device), dtype, cols[5] is not None, *launch.opts.values()), (addresses, numels)
        if launch.checked.get(key) != signature:
            _check_fits(cols)
            launch.checked[key] = signature
    chunk = launch_table.chunk_size("adamw", backend, device)
    meta = launch_table.table(addresses + [numels], device)
    hparams = launch_table.table([launch.lrs, launch.wds], device, torch.float64)
    chunks = launch_table.chunk_table(tuple(numels), chunk, device)
    flags = dict(amsgrad=cols[4] is not None, has_master=cols[5] is not None, **launch.opts)
    if backend == "triton":
        from fastcore.kernels import adamw as kernels

        # Triton launches on the current device; the tables alone do not tell it which.
        with triton_device(device):
            kernels.adamw_step(meta, hparams, chunks, dtype, grad_scale=grad_scale, found_inf=found_inf, **flags)
    else:
        from fastcore import extension

        extension.load().adamw_step(meta, hparams, chunks, chunk, dtype, flags["beta1"], flags["beta2"],
                                    flags["eps"], flags["amsgrad"], flags["has_master"], flags["maximize"],
                                    flags["decoupled"], grad_scale, found_inf)
    for i, p in staged:
        p.copy_(params[i])


def _check_fits(cols) -> None:
    """The kernels read and write each state tensor through its address for its parameter's numel."""
    params, _, exp_avgs, exp_avg_sqs, max_sqs, masters, steps = cols
    for i, p in enumerate(params):
        named = [("exp_avg", exp_avgs[i], state_dtype(p.dtype)), ("exp_avg_sq", exp_avg_sqs[i], state_dtype(p.dtype))]
        if max_sqs is not None:
            named.append(("max_exp_avg_sq", max_sqs[i], state_dtype(p.dtype)))
        if masters is not None and masters[i] is not None:
            named.append(("master_param", masters[i], torch.float32))
        try:
            for name, t, dtype in named:
                _check_state(t, p, dtype, name)
            _check_step(steps[i], p, "step")
        except ValueError as exc:
            raise ValueError(f"{exc}: the optimizer state does not fit this {p.dtype} parameter of shape "
                             f"{tuple(p.shape)} (a state dict saved for other parameters, or a parameter "
                             "resized or cast in place after its first step)") from None


def _per_tensor(name: str, value, n: int) -> list[float]:
    if isinstance(value, Tensor):
        if value.numel() != 1:
            raise ValueError(f"adamw_step: {name} as a tensor must have one element, got shape {tuple(value.shape)}")
        value = value.item()
    if isinstance(value, numbers.Real) and not isinstance(value, bool):
        values = [float(value)] * n
    elif isinstance(value, (list, tuple)):
        if len(value) != n:
            raise ValueError(f"adamw_step: {name} has {len(value)} values for {n} parameters")
        values = [float(v) for v in value]
    else:
        raise TypeError(f"adamw_step: {name} must be a float, a one-element tensor or one float per parameter, "
                        f"got {type(value).__name__}")
    for v in values:
        if not 0.0 <= v < math.inf:
            raise ValueError(f"adamw_step: {name} must be a finite number >= 0, got {v}")
    return values


def _check_hyper(beta1, beta2, eps) -> None:
    for name, b in (("beta1", beta1), ("beta2", beta2)):
        if not 0.0 <= float(b) < 1.0:
            raise ValueError(f"adamw_step: {name} must be in [0, 1), got {b}")
    if not 0.0 <= float(eps) < math.inf:
        raise ValueError(f"adamw_step: eps must be a finite number >= 0, got {eps}")


def _check_lists(params, grads, exp_avgs, exp_avg_sqs, steps, max_exp_avg_sqs, master_params) -> int:
    n = len(params)
    named = {"grads": grads, "exp_avgs": exp_avgs, "exp_avg_sqs": exp_avg_sqs, "steps": steps}
    if max_exp_avg_sqs is not None:
        named["max_exp_avg_sqs"] = max_exp_avg_sqs
    if master_params is not None:
        named["master_params"] = master_params
    for name, col in named.items():
        if len(col) != n:
            raise ValueError(f"adamw_step: {name} has {len(col)} entries for {n} params")
    for i, p in enumerate(params):
        check_param(p, f"params[{i}]")
        g = grads[i]
        if not isinstance(g, Tensor):
            raise TypeError(f"adamw_step: grads[{i}] must be a tensor, got {type(g).__name__}")
        if g.is_sparse:
            raise RuntimeError(f"adamw_step: grads[{i}] is sparse; fused AdamW supports dense gradients only")
        if g.shape != p.shape or g.dtype != p.dtype or g.device != p.device:
            raise ValueError(f"adamw_step: grads[{i}] must match its parameter's shape, dtype and device "
                             f"({tuple(p.shape)}, {p.dtype}, {p.device}), got ({tuple(g.shape)}, {g.dtype}, {g.device})")
        states = [("exp_avgs", exp_avgs[i])] + [("exp_avg_sqs", exp_avg_sqs[i])]
        if max_exp_avg_sqs is not None:
            states.append(("max_exp_avg_sqs", max_exp_avg_sqs[i]))
        for name, s in states:
            _check_state(s, p, state_dtype(p.dtype), f"{name}[{i}]")
        if master_params is not None and master_params[i] is not None:
            if p.dtype not in (torch.bfloat16, torch.float16):
                raise ValueError(f"adamw_step: master_params[{i}] is for 16-bit parameters; params[{i}] is {p.dtype}")
            _check_state(master_params[i], p, torch.float32, f"master_params[{i}]")
        _check_step(steps[i], p, f"steps[{i}]")
    _check_disjoint([params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, master_params])
    return n


def _check_disjoint(cols) -> None:
    """A parameter listed twice, or state shared between parameters, would be stepped by two
    chunks at once."""
    params, grads, exp_avgs, exp_avg_sqs, max_sqs, masters = cols[:6]
    writes = {"params": params, "exp_avgs": exp_avgs, "exp_avg_sqs": exp_avg_sqs}
    writes.update({k: v for k, v in (("max_exp_avg_sqs", max_sqs), ("master_params", masters)) if v is not None})
    launch_table.check_disjoint("adamw_step", {"grads": grads}, writes)


def _check_state(s, p: Tensor, dtype: torch.dtype, name: str) -> None:
    if not isinstance(s, Tensor) or s.shape != p.shape or s.dtype != dtype or s.device != p.device:
        got = f"({tuple(s.shape)}, {s.dtype}, {s.device})" if isinstance(s, Tensor) else type(s).__name__
        raise ValueError(f"adamw_step: {name} must be a {dtype} tensor of its parameter's shape "
                         f"{tuple(p.shape)} on {p.device}, got {got}")
    if not s.is_contiguous() or s.is_neg():
        raise ValueError(f"adamw_step: {name} must be contiguous and not a negative view (optimizer state "
                         "is updated in place through its address)")


def _check_step(s, p: Tensor, name: str) -> None:
    if not isinstance(s, Tensor) or s.numel() != 1 or s.dtype != torch.float32 or s.device != p.device:
        raise ValueError(f"adamw_step: {name} must be a one-element float32 tensor on {p.device}")


def check_param(p, name: str) -> None:
    """Parameters the fused step takes: real floating-point tensors."""
    if not isinstance(p, Tensor):
        raise TypeError(f"adamw_step: {name} must be a tensor, got {type(p).__name__}")
    if p.is_complex():
        raise TypeError(f"adamw_step: {name} is complex ({p.dtype}); fused AdamW supports real floating-point "
                        "parameters only (view complex ones with torch.view_as_real)")
    if not p.is_floating_point():
        raise TypeError(f"adamw_step: {name} must be floating point, got {p.dtype}")
