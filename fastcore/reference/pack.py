"""Copy, scale and cast many tensors, as the maths reads: dst_i = (src_i * scale) in float64, rounded once."""
from __future__ import annotations

import torch


@torch.no_grad()
def pack(srcs: list[torch.Tensor], dsts: list[torch.Tensor], scale: float = 1.0) -> None:
    for src, dst in zip(srcs, dsts):
        dst.copy_((src.double() * scale).reshape(dst.shape))
