"""A GPT-style decoder built from fastcore's ops, and its presets.

Pre-norm blocks (LayerNorm or RMSNorm, causal ``fastcore.attention`` with a fused QKV projection,
a GELU MLP), learned positions or RoPE, and an LM head tied to the token embedding.
``kernels="torch"`` builds the same model from PyTorch's modules (``nn.LayerNorm``/``nn.RMSNorm``,
``scaled_dot_product_attention``): the baseline of the benchmarks and the parity tests.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

import fastcore.nn as fnn
from fastcore.ops.attention import HEAD_DIMS


@dataclass
class GPTConfig:
    vocab_size: int = 257
    block_size: int = 128
    n_layer: int = 2
    n_head: int = 4
    n_embd: int = 128
    norm: str = "layer"      # "layer" | "rms"
    pos: str = "learned"     # "learned" | "rope"
    bias: bool = True

    def __post_init__(self):
        for name in ("vocab_size", "block_size", "n_layer", "n_head", "n_embd"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"GPTConfig: {name} must be a positive int, got {value!r}")
        if self.n_embd % self.n_head:
            raise ValueError(f"GPTConfig: n_embd ({self.n_embd}) must be a multiple of n_head ({self.n_head})")
        if self.n_embd // self.n_head not in HEAD_DIMS:
            raise ValueError(f"GPTConfig: the head dim n_embd / n_head = {self.n_embd // self.n_head} must be one of "
                             f"{HEAD_DIMS} (fastcore.attention's)")
        if self.norm not in ("layer", "rms"):
            raise ValueError(f"GPTConfig: norm must be 'layer' or 'rms', got {self.norm!r}")
        if self.pos not in ("learned", "rope"):
            raise ValueError(f"GPTConfig: pos must be 'learned' or 'rope', got {self.pos!r}")

    @property
    def padded_vocab(self) -> int:
        """The embedding's rows: the vocabulary rounded up to 64, for matmul-friendly LM-head shapes."""
        return -(-self.vocab_size // 64) * 64


# Model shape and the training defaults that suit it; every value can be overridden by flag.
PRESETS: dict[str, dict] = {
    # ~0.45M parameters with the byte tokenizer: learns visibly in a couple of minutes on 2 CPU cores.
    "tiny": dict(n_layer=2, n_head=4, n_embd=128, block_size=128,
                 batch_size=16, grad_accum=1, lr=3e-3, warmup=50, steps=1500),
    # ~10.9M parameters with the byte tokenizer (nanoGPT's character-level Shakespeare size).
    "small": dict(n_layer=6, n_head=6, n_embd=384, block_size=256,
                  batch_size=32, grad_accum=1, lr=1e-3, warmup=100, steps=5000),
    # GPT-2 small (124M parameters with a 50257-token BPE vocabulary); 0.5M tokens per step.
    "gpt2-124m": dict(n_layer=12, n_head=12, n_embd=768, block_size=1024,
                      batch_size=16, grad_accum=32, lr=6e-4, warmup=700, steps=19073),
}
MODEL_KEYS = tuple(f.name for f in dataclasses.fields(GPTConfig))


class MLP(nn.Module):
    def __init__(self, c: GPTConfig):
        super().__init__()
        self.fc = nn.Linear(c.n_embd, 4 * c.n_embd, bias=c.bias)
        self.proj = nn.Linear(4 * c.n_embd, c.n_embd, bias=c.bias)

    def forward(self, x):
        return self.proj(F.gelu(self.fc(x), approximate="tanh"))


class _TorchAttention(fnn.CausalSelfAttention):
    """The same module attending with PyTorch's SDPA: the baseline."""

    def _attend(self, q, k, v):
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)


def _norm(c: GPTConfig, kernels: str) -> nn.Module:
    if c.norm == "rms":
        return (fnn.RMSNorm if kernels == "fastcore" else nn.RMSNorm)(c.n_embd, eps=1e-5)
    return (fnn.LayerNorm if kernels == "fastcore" else nn.LayerNorm)(c.n_embd, bias=c.bias)


class Block(nn.Module):
    def __init__(self, c: GPTConfig, kernels: str):
        super().__init__()
        attn = fnn.CausalSelfAttention if kernels == "fastcore" else _TorchAttention
        self.ln_1 = _norm(c, kernels)
        self.attn = attn(c.n_embd, c.n_head, bias=c.bias, rope_base=10000.0 if c.pos == "rope" else None)
        self.ln_2 = _norm(c, kernels)
        self.mlp = MLP(c)

    def forward(self, x):
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    def __init__(self, config: GPTConfig, *, kernels: str = "fastcore"):
        super().__init__()
        if kernels not in ("fastcore", "torch"):
            raise ValueError(f"GPT: kernels must be 'fastcore' or 'torch', got {kernels!r}")
        self.config, c = config, config
        self.wte = nn.Embedding(c.padded_vocab, c.n_embd)
        self.wpe = nn.Embedding(c.block_size, c.n_embd) if c.pos == "learned" else None
        self.blocks = nn.ModuleList(Block(c, kernels) for _ in range(c.n_layer))
        self.ln_f = _norm(c, kernels)
        self.apply(self._init)
        # GPT-2's init: residual projections scaled down by depth.
        for name, p in self.named_parameters():
            if name.endswith("proj.weight"):
                nn.init.normal_(p, 0.0, 0.02 / math.sqrt(2 * c.n_layer))

    @staticmethod
    def _init(m: nn.Module):
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, 0.0, 0.02)
        if isinstance(m, nn.Linear) and m.bias is not None:
            nn.init.zeros_(m.bias)

    def num_params(self, embedding: bool = True) -> int:
        """Parameters; ``embedding=False`` leaves out the position table (it does no matmul)."""
        n = sum(p.numel() for p in self.parameters())
        return n - (self.wpe.weight.numel() if self.wpe is not None and not embedding else 0)

    def flops_per_token(self) -> int:
        """Training FLOPs per token: 6N for the weights' matmuls (forward and backward) plus
        6·L·C·T for the attention scores and their weighted sum, causal halving included."""
        c = self.config
        return 6 * self.num_params(embedding=False) + 6 * c.n_layer * c.n_embd * c.block_size

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None):
        """Logits ``(B, T, padded_vocab)`` and, given targets, the mean cross-entropy (in fp32)."""
        t = idx.shape[1]
        if t > self.config.block_size:
            raise ValueError(f"GPT: sequence length {t} exceeds block_size {self.config.block_size}")
        x = self.wte(idx)
        if self.wpe is not None:
            x = x + self.wpe(torch.arange(t, device=idx.device))
        for block in self.blocks:
            x = block(x)
        logits = F.linear(self.ln_f(x), self.wte.weight)
        if targets is None:
            return logits, None
        return logits, F.cross_entropy(logits.float().view(-1, logits.shape[-1]), targets.reshape(-1))

    @torch.no_grad()
    def generate(self, idx: torch.Tensor, tokens: int, *, temperature: float = 1.0, top_k: int | None = None,
                 generator: torch.Generator | None = None) -> torch.Tensor:
        """Append ``tokens`` sampled tokens to ``idx`` ``(B, T)``; temperature 0 is greedy."""
        for _ in range(tokens):
            logits, _ = self(idx[:, -self.config.block_size:])
            logits = logits[:, -1, : self.config.vocab_size].float()
            if temperature < torch.finfo(logits.dtype).tiny:  # 0, or too small to divide by: greedy
                nxt = logits.argmax(-1, keepdim=True)
            else:
                # Shifted first: a tiny temperature then sends the rest to -inf, not the maximum to inf (nan).
                logits = (logits - logits.amax(-1, keepdim=True)) / temperature
                if top_k is not None and top_k < logits.shape[-1]:
                    kth = torch.topk(logits, top_k).values[:, -1:]
                    logits = logits.masked_fill(logits < kth, -math.inf)
                nxt = torch.multinomial(logits.softmax(-1), 1, generator=generator)
            idx = torch.cat((idx, nxt), dim=1)
        return idx
