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
from fastcore.ops.adamw import adamw_step, check_param, state_dtype

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
                 master_weights: bool = False, backend: str = "auto") -> None:
        name = type(self).__name__
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
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, amsgrad=amsgrad, maximize=maximize)
        super().__init__(params, defaults)

    def __setstate__(self, state: dict) -> None:
        super().__setstate__(state)
        for group in self.param_groups:
            group.setdefault("amsgrad", False)
            group.setdefault("maximize", False)

    def add_param_group(self, param_group: dict) -> None:
        params = param_group["params"]
        for i, p in enumerate([params] if isinstance(params, Tensor) else list(params)):
            check_param(p, f"{type(self).__name__}: parameter {i} of a param group")
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
        if self.master_weights and p.dtype in _LOW and "master_param" not in state:
            state["master_param"] = p.detach().float().contiguous()
        return state

    @torch.no_grad()
    def step(self, closure: Optional[Callable[[], float]] = None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        grad_scale = getattr(self, "grad_scale", None)
        found_inf = getattr(self, "found_inf", None)
        launches: dict[tuple, dict[str, list]] = {}
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            key = (float(beta1), float(beta2), float(group["eps"]), bool(group["amsgrad"]), bool(group["maximize"]))
            lists = launches.setdefault(key, {k: [] for k in ("params", "grads", "m", "v", "vmax", "master",
                                                              "steps", "lr", "wd")})
            lr, wd = float(group["lr"]), float(group["weight_decay"])
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError(f"{type(self).__name__} does not support sparse gradients")
                state = self._init_state(p, group)
                lists["params"].append(p)
                lists["grads"].append(p.grad)
                lists["m"].append(state["exp_avg"])
                lists["v"].append(state["exp_avg_sq"])
                lists["vmax"].append(state.get("max_exp_avg_sq"))
                lists["master"].append(state.get("master_param"))
                lists["steps"].append(state["step"])
                lists["lr"].append(lr)
                lists["wd"].append(wd)
        for (beta1, beta2, eps, amsgrad, maximize), lists in launches.items():
            if not lists["params"]:
                continue
            masters = lists["master"] if any(m is not None for m in lists["master"]) else None
            adamw_step(lists["params"], lists["grads"], lists["m"], lists["v"], lists["steps"], lr=lists["lr"],
                       beta1=beta1, beta2=beta2, eps=eps, weight_decay=lists["wd"],
                       max_exp_avg_sqs=lists["vmax"] if amsgrad else None, master_params=masters,
                       maximize=maximize, decoupled=self._decoupled, grad_scale=grad_scale, found_inf=found_inf,
                       backend=self.backend)
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
            if "master_param" in saved:
                state["master_param"] = saved["master_param"].to(device=p.device, dtype=torch.float32,
                                                                 copy=True).contiguous()
            if "step" in saved:
                state["step"] = torch.as_tensor(saved["step"]).to(device=p.device, dtype=torch.float32,
                                                                  copy=True).reshape(())


class FusedAdam(FusedAdamW):
    """``torch.optim.Adam``'s maths (L2 weight decay added to the gradient), on FusedAdamW's kernels."""

    _decoupled = False

    def __init__(self, params: Iterable, lr: Union[float, Tensor] = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 0.0, amsgrad: bool = False, maximize: bool = False, *,
                 master_weights: bool = False, backend: str = "auto") -> None:
        super().__init__(params, lr, betas, eps, weight_decay, amsgrad, maximize, master_weights=master_weights,
                         backend=backend)
