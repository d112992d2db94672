"""Causal self-attention with a fused QKV projection, on ``fastcore.attention``."""
from __future__ import annotations

import torch
from torch import nn

from fastcore.ops.attention import HEAD_DIMS, attention


class CausalSelfAttention(nn.Module):
    """Multi-head (or grouped-query) causal self-attention for a GPT-style block.

    One ``qkv`` Linear produces the ``n_heads`` query heads and ``n_kv_heads`` key and value heads
    in a single matmul; ``proj`` maps the heads back to ``d_model``. Input and output are
    ``(batch, length, d_model)``. ``rope_base`` (e.g. 10000) rotates queries and keys by their
    position (rotary embeddings, the half-split form of GPT-NeoX and Llama); None leaves them as they are.
    """

    def __init__(self, d_model: int, n_heads: int, n_kv_heads: int | None = None, *, bias: bool = True,
                 rope_base: float | None = None, backend: str = "auto", device=None, dtype=None):
        super().__init__()
        n_kv_heads = n_heads if n_kv_heads is None else n_kv_heads
        if d_model <= 0 or n_heads <= 0 or d_model % n_heads:
            raise ValueError(f"CausalSelfAttention: d_model ({d_model}) must be a positive multiple of n_heads ({n_heads})")
        if n_kv_heads <= 0 or n_heads % n_kv_heads:
            raise ValueError(f"CausalSelfAttention: n_heads ({n_heads}) must be a multiple of n_kv_heads ({n_kv_heads})")
        self.n_heads, self.n_kv_heads, self.head_dim = n_heads, n_kv_heads, d_model // n_heads
        if self.head_dim not in HEAD_DIMS:
            raise ValueError(f"CausalSelfAttention: head dim d_model / n_heads = {self.head_dim} must be one of {HEAD_DIMS}")
        if rope_base is not None and not rope_base > 1:
            raise ValueError(f"CausalSelfAttention: rope_base must be > 1 or None, got {rope_base}")
        self.d_model, self.backend, self.rope_base = d_model, backend, rope_base
        factory = dict(device=device, dtype=dtype)
        self.qkv = nn.Linear(d_model, (n_heads + 2 * n_kv_heads) * self.head_dim, bias=bias, **factory)
        self.proj = nn.Linear(d_model, d_model, bias=bias, **factory)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not isinstance(x, torch.Tensor) or x.dim() != 3 or x.shape[-1] != self.d_model:
            got = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"CausalSelfAttention: x must be (batch, length, d_model={self.d_model}), got {got}")
        b, t, _ = x.shape
        q, k, v = self.qkv(x).split([self.n_heads * self.head_dim, self.n_kv_heads * self.head_dim,
                                     self.n_kv_heads * self.head_dim], dim=-1)
        # (B, T, H, D) -> (B, H, T, D): strided views, which the kernels take without copying.
        q, k, v = (z.view(b, t, -1, self.head_dim).transpose(1, 2) for z in (q, k, v))
        if self.rope_base is not None:
            q, k = self._rotate(q), self._rotate(k)
        y = self._attend(q, k, v)
        return self.proj(y.transpose(1, 2).reshape(b, t, -1))

    def _attend(self, q, k, v):
        return attention(q, k, v, causal=True, backend=self.backend)

    def _rotate(self, x: torch.Tensor) -> torch.Tensor:
        # Angles in fp32 whatever the activations' or the module's dtype: positions up to ~1e5 stay
        # exact. The frequencies are made here, not kept in a buffer, which .to(bf16) would narrow
        # and a meta-device build (to_empty) would leave unset.
        d = self.head_dim
        inv_freq = self.rope_base ** (-torch.arange(0, d, 2, device=x.device, dtype=torch.float32) / d)
        angles = torch.outer(torch.arange(x.shape[-2], device=x.device, dtype=torch.float32), inv_freq)
        cos, sin = angles.cos().to(x.dtype), angles.sin().to(x.dtype)
        x1, x2 = x.chunk(2, dim=-1)
        return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)

    def extra_repr(self) -> str:
        rope = "" if self.rope_base is None else f", rope_base={self.rope_base}"
        return f"n_heads={self.n_heads}, n_kv_heads={self.n_kv_heads}, head_dim={self.head_dim}{rope}, backend={self.backend!r}"
