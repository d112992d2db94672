"""LayerNorm and RMSNorm modules backed by fastcore's fused kernels.

They subclass the PyTorch classes, so constructor arguments, parameters,
``state_dict`` keys and ``isinstance`` checks are unchanged; only ``forward`` differs.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

from fastcore.ops.norm import layer_norm, rms_norm


def _flatten_normalized(module: torch.nn.Module, x: Tensor) -> tuple[Tensor, tuple[int, ...]]:
    """Fold the normalised trailing dims into one, so the ops normalise over a single last dim."""
    shape = tuple(module.normalized_shape)
    if x.dim() < len(shape) or tuple(x.shape[x.dim() - len(shape):]) != shape:
        raise ValueError(f"{type(module).__name__}: expected input whose trailing dims are {shape}, "
                         f"got shape {tuple(x.shape)}")
    return x.reshape(*x.shape[: x.dim() - len(shape)], math.prod(shape)), x.shape  # not -1: 0 rows are fine


def _flat(t: Tensor | None) -> Tensor | None:
    return None if t is None else t.reshape(-1)


class LayerNorm(torch.nn.LayerNorm):
    """``torch.nn.LayerNorm`` with fused kernels; ``backend`` picks one (default ``"auto"``)."""

    def __init__(self, normalized_shape, eps: float = 1e-5, elementwise_affine: bool = True,
                 bias: bool = True, device=None, dtype=None, *, backend: str = "auto"):
        super().__init__(normalized_shape, eps, elementwise_affine, bias, device, dtype)
        self.backend = backend

    def forward(self, x: Tensor) -> Tensor:
        rows, shape = _flatten_normalized(self, x)
        y = layer_norm(rows, _flat(self.weight), _flat(self.bias), self.eps, backend=self.backend)
        return y.reshape(shape)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, backend={self.backend!r}"


class RMSNorm(torch.nn.RMSNorm):
    """``torch.nn.RMSNorm`` with fused kernels; ``backend`` picks one (default ``"auto"``)."""

    def __init__(self, normalized_shape, eps: float | None = None, elementwise_affine: bool = True,
                 device=None, dtype=None, *, backend: str = "auto"):
        super().__init__(normalized_shape, eps, elementwise_affine, device, dtype)
        self.backend = backend

    def forward(self, x: Tensor) -> Tensor:
        rows, shape = _flatten_normalized(self, x)
        return rms_norm(rows, _flat(self.weight), self.eps, backend=self.backend).reshape(shape)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, backend={self.backend!r}"
