"""FusedAdamW and FusedAdam: drop-ins for torch.optim.AdamW and torch.optim.Adam, one launch per step.

Parameters of every group are updated together: one launch per (device, dtype) and per distinct
(betas, eps, amsgrad, maximize); each tensor carries its own group's lr and weight decay in the
launch table. The state and its ``state_dict`` have exactly PyTorch's keys (``step``, ``exp_avg``,
``exp_avg_sq``, ``max_exp_avg_sq``), so checkpoints load both ways.
"""
from __future__ import annotations

import itertools
import math
from typing import Callable, Iterable, Optional, Union

import torch
from torch import Tensor

from fastcore.backends import BACKENDS
from fastcore.ops.adamw import check_param, plan, run, state_dtype

_LOW = (torch.bfloat16, torch.float16)
_STATE_KEYS = ("exp_avg", "exp_avg_sq", "max_exp_avg_sq")


class FusedAdamW(torch.optim.Optimizer):
    """``torch.optim.AdamW``'s maths and arguments, stepped by fastcore's fused multi-tensor kernels.

    Beyond AdamW:

    - bf16/fp16 parameters keep fp32 ``exp_avg``/``exp_avg_sq`` (AdamW keeps them in the
      parameter's dtype);
    - ``master_weights=True`` also keeps an fp32 copy of each bf16/fp16 parameter (state key
      ``master_param``); the step updates the copy and rounds the parameter from it, so that
      updates smaller than a bf16 ulp are not lost;
    - ``backend`` picks the kernels: ``auto`` (the C++ ``cpu`` backend on CPU, ``triton`` on GPU),
      ``cpu``, ``triton``, ``cuda`` or ``reference`` (float64 PyTorch).

    ``lr`` may be a float or a one-element tensor, read at each step. Under ``torch.amp.GradScaler``
    the kernel unscales the gradients and skips the step when an inf was found, with no host sync.
    """

    _decoupled = True
    _step_supports_amp_scaling = True  # GradScaler passes grad_scale / found_inf as attributes

    def __init__(self, params: Iterable, lr: Union[float, Tensor] = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 1e-2, amsgrad: bool = False, maximize: bool = False, *,
                 foreach: Optional[bool] = None, capturable: bool = False, differentiable: bool = False,
                 fused: Optional[bool] = None, master_weights: bool = False, backend: str = "auto") -> None:
        name = type(self).__name__
        # AdamW's own switches: foreach and fused are accepted (every step here is fused); the others are refused.
        if capturable:
            raise ValueError(f"{name}: capturable=True is not supported (the step builds its launch table on the host)")
        if differentiable:
            raise ValueError(f"{name}: differentiable=True is not supported (the kernels are not autograd-traced)")
        if isinstance(lr, Tensor) and lr.numel() != 1:
            raise ValueError(f"{name}: lr as a tensor must have one element, got shape {tuple(lr.shape)}")
        if not 0.0 <= float(lr) < math.inf:
            raise ValueError(f"{name}: lr must be a finite number >= 0, got {lr}")
        if not 0.0 <= eps < math.inf:
            raise ValueError(f"{name}: eps must be a finite number >= 0, got {eps}")
        if len(betas) != 2 or not all(0.0 <= float(b) < 1.0 for b in betas):
            raise ValueError(f"{name}: betas must be two numbers in [0, 1), got {betas}")
        if not 0.0 <= weight_decay < math.inf:
            raise ValueError(f"{name}: weight_decay must be a finite number >= 0, got {weight_decay}")
        if backend != "auto" and backend not in BACKENDS:
            raise ValueError(f"{name}: unknown backend {backend!r}; expected 'auto' or one of {', '.join(BACKENDS)}")
        self.master_weights = bool(master_weights)
        self.backend = backend
        # Parameter version and address after our last step: a change means an outside write (see step).
        self._written: dict[Tensor, tuple[int, int]] = {}
        self._checked: dict = {}  # per launch, the tensors whose state was last checked (ops.adamw.plan)
        # Every key of torch.optim.AdamW's param groups, so that state dicts load into it unchanged.
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, amsgrad=amsgrad, maximize=maximize,
                        foreach=foreach, capturable=False, differentiable=False, fused=fused,
                        decoupled_weight_decay=self._decoupled)
        super().__init__(params, defaults)

    def __getstate__(self) -> dict:
        state = {k: v for k, v in super().__getstate__().items() if k not in ("_written", "_checked")}
        return {**state, "master_weights": self.master_weights, "backend": self.backend}

    def __setstate__(self, state: dict) -> None:
        # load_state_dict passes only state and param_groups: keep the settings this optimizer has.
        self.master_weights = state.pop("master_weights", getattr(self, "master_weights", False))
        self.backend = state.pop("backend", getattr(self, "backend", "auto"))
        self._written, self._checked = {}, {}
        super().__setstate__(state)
        for group in self.param_groups:
            group.setdefault("amsgrad", False)
            group.setdefault("maximize", False)
            if type(self)._decoupled or "decoupled_weight_decay" not in group:  # AdamW's is always True
                group["decoupled_weight_decay"] = self._decoupled

    def add_param_group(self, param_group: dict) -> None:
        params = param_group["params"]
        if not isinstance(params, (Tensor, set)):
            params = param_group["params"] = list(params)  # a generator is read once, here
        tensors = [params] if isinstance(params, Tensor) else [p[1] if isinstance(p, tuple) else p for p in params]
        for i, p in enumerate(tensors):  # (name, tensor) pairs, as named_parameters() gives, are taken too
            check_param(p, f"{type(self).__name__}: parameter {i} of a param group")
        if len(set(tensors)) != len(tensors):
            i = next(i for i, p in enumerate(tensors) if any(p is q for q in tensors[:i]))
            raise ValueError(f"{type(self).__name__}: parameter {i} of a param group is listed twice; the fused "
                             "step would update it twice at once (torch.optim only warns)")
        super().add_param_group(param_group)

    def _init_state(self, p: Tensor, group: dict) -> dict:
        state = self.state[p]
        if not state:
            # The step sits with the parameter, as in PyTorch's fused optimizers: the kernels read it there.
            state["step"] = torch.zeros((), dtype=torch.float32, device=p.device)
            zeros = dict(dtype=state_dtype(p.dtype), device=p.device)
            state["exp_avg"] = torch.zeros(p.shape, **zeros)
            state["exp_avg_sq"] = torch.zeros(p.shape, **zeros)
        if group["amsgrad"] and "max_exp_avg_sq" not in state:
            state["max_exp_avg_sq"] = torch.zeros(p.shape, dtype=state_dtype(p.dtype), device=p.device)
        if self.master_weights and p.dtype in _LOW:
            # A parameter written from outside since our last step (a model.load_state_dict, a
            # re-initialisation) re-seeds its master copy; otherwise the step would undo the write.
            if "master_param" not in state or self._written.get(p, (p._version, p.data_ptr())) != (
                    p._version, p.data_ptr()):
                state["master_param"] = p.detach().float().contiguous()
        return state

    @torch.compiler.disable  # the table holds addresses: run eagerly, one graph break, inside torch.compile
    @torch.no_grad()
    def step(self, closure: Optional[Callable[[], float]] = None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        grad_scale = getattr(self, "grad_scale", None)
        found_inf = getattr(self, "found_inf", None)
        launches: dict[tuple, list[list]] = {}
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            amsgrad = bool(group["amsgrad"])
            key = (float(beta1), float(beta2), float(group["eps"]), amsgrad, bool(group["maximize"]),
                   bool(group["decoupled_weight_decay"]))
            # params, grads, exp_avg, exp_avg_sq, max_exp_avg_sq, master_param, step, lr, weight_decay
            cols = launches.setdefault(key, [[] for _ in range(9)])
            lr, wd = float(group["lr"]), float(group["weight_decay"])
            # Per-parameter Python cost is the step's overhead with many small tensors: keep this loop lean.
            plain = not amsgrad and not self.master_weights
            for p in group["params"]:
                grad = p.grad
                if grad is None:
                    continue
                if grad.is_sparse:
                    raise RuntimeError(f"{type(self).__name__} does not support sparse gradients")
                state = self.state[p]
                if not (plain and len(state) == 3):
                    state = self._init_state(p, group)
                cols[0].append(p)
                cols[1].append(grad)
                cols[2].append(state["exp_avg"])
                cols[3].append(state["exp_avg_sq"])
                cols[4].append(state.get("max_exp_avg_sq"))
                cols[5].append(state.get("master_param"))
                cols[6].append(state["step"])
                cols[7].append(lr)
                cols[8].append(wd)
        planned = []  # every launch is checked and resolved before any tensor steps
        for (beta1, beta2, eps, amsgrad, maximize, decoupled), cols in launches.items():
            if not cols[0]:
                continue
            # No per-gradient shape/dtype/device check here: torch's `.grad` setter and autograd enforce them.
            masters = cols[5] if any(m is not None for m in cols[5]) else None
            opts = dict(beta1=beta1, beta2=beta2, eps=eps, maximize=maximize, decoupled=decoupled)
            planned += plan(cols[0], cols[1], cols[2], cols[3], cols[6], cols[7], cols[8],
                            cols[4] if amsgrad else None, masters, opts, self.backend, self._checked)
        run(planned, grad_scale, found_inf)
        if self.master_weights:
            for launch in planned:
                if launch.cols[5] is not None:
                    self._written.update((p, (p._version, p.data_ptr())) for p in launch.cols[0])
        return loss

    def load_state_dict(self, state_dict: dict) -> None:
        """Load a FusedAdamW/FusedAdam or torch.optim.AdamW/Adam state dict.

        PyTorch's loader casts the moments to the parameter's dtype; for 16-bit parameters this
        takes them back to fp32 from the saved tensors, so nothing is lost in a round trip.
        """
        super().load_state_dict(state_dict)
        saved_ids = itertools.chain.from_iterable(g["params"] for g in state_dict["param_groups"])
        params = itertools.chain.from_iterable(g["params"] for g in self.param_groups)
        for saved_id, p in zip(saved_ids, params):
            saved = state_dict["state"].get(saved_id)
            if saved is None:
                continue
            state = self.state[p]
            for key in _STATE_KEYS:
                if key in saved:
                    state[key] = saved[key].to(device=p.device, dtype=state_dtype(p.dtype), copy=True).contiguous()
            if "master_param" in saved and p.dtype in _LOW and self.master_weights:  # none for fp32 parameters
                state["master_param"] = saved["master_param"].to(device=p.device, dtype=torch.float32,
                                                                 copy=True).contiguous()
            elif "master_param" in state:
                del state["master_param"]
            if "step" in saved:
                state["step"] = torch.as_tensor(saved["step"]).to(device=p.device, dtype=torch.float32,
                                                                  copy=True).reshape(())


class FusedAdam(FusedAdamW):
    """``torch.optim.Adam``'s maths (L2 weight decay added to the gradient, or AdamW's decoupled decay
    with ``decoupled_weight_decay=True``), on FusedAdamW's kernels."""

    _decoupled = False

    def __init__(self, params: Iterable, lr: Union[float, Tensor] = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 0.0, amsgrad: bool = False, maximize: bool = False, *,
                 foreach: Optional[bool] = None, capturable: bool = False, differentiable: bool = False,
                 fused: Optional[bool] = None, decoupled_weight_decay: bool = False, master_weights: bool = False,
                 backend: str = "auto") -> None:
        self._decoupled = bool(decoupled_weight_decay)  # the groups' default; a loaded state dict's groups keep theirs
        super().__init__(params, lr, betas, eps, weight_decay, amsgrad, maximize, foreach=foreach,
                         capturable=capturable, differentiable=differentiable, fused=fused,
                         master_weights=master_weights, backend=backend)
