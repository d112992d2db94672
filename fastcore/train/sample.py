"""``fastcore sample``: continue a prompt with a trained checkpoint."""
from __future__ import annotations

import math
from pathlib import Path
from typing import Optional

import torch

from fastcore.train import checkpoint, data
from fastcore.train.loop import TrainError, resolve_device
from fastcore.train.model import GPT, GPTConfig


def _tokenizer_dir(ckpt: Path) -> Path:
    # A run directory holds meta.json (and tokenizer.json) beside ckpt/.
    for d in (ckpt.parent, ckpt.parent.parent):
        if (d / "meta.json").is_file():
            return d
    raise checkpoint.CheckpointError(f"no meta.json (the tokenizer) beside checkpoint {ckpt} or in its run directory")


def load_model(path: str | Path, device: str | torch.device = "cpu") -> tuple[GPT, Path]:
    """The model of a checkpoint (file or run directory), in eval mode, and the checkpoint file."""
    ckpt = checkpoint.resolve(path)
    state = checkpoint.load(ckpt)
    try:
        model = GPT(GPTConfig(**state["config"]["model"]))
        model.load_state_dict(state["model"])
    except (KeyError, TypeError, ValueError, RuntimeError) as exc:
        raise checkpoint.CheckpointError(f"checkpoint {ckpt} holds no usable model ({type(exc).__name__})") from None
    return model.to(device).eval(), ckpt


def sample(path: str | Path, prompt: str, tokens: int, *, temperature: float = 0.8, top_k: Optional[int] = 50,
           seed: int = 0, device: Optional[str] = None) -> str:
    """``prompt`` followed by ``tokens`` sampled tokens, decoded."""
    if tokens < 0:
        raise TrainError(f"--tokens: must be >= 0, got {tokens}")
    if not 0 <= temperature < math.inf:
        raise TrainError(f"--temperature: must be a finite number >= 0, got {temperature}")
    if top_k is not None and top_k < 0:
        raise TrainError(f"--top-k: must be >= 0 (0: no top-k), got {top_k}")
    if not data.valid_seed(seed):
        raise TrainError(f"--seed: must be a whole number, 0 <= seed < 2**64, got {seed}")
    top_k = top_k or None
    device = resolve_device(device)
    model, ckpt = load_model(path, device)
    tok = data.load_tokenizer(_tokenizer_dir(ckpt))
    try:
        ids = tok.encode(prompt) or [tok.eot]
    except ValueError as exc:
        raise TrainError(f"--prompt: {exc}; on the command line, pass UTF-8") from None
    idx = torch.tensor([ids], dtype=torch.long, device=device)
    g = torch.Generator(device=device).manual_seed(seed)
    out = model.generate(idx, tokens, temperature=temperature, top_k=top_k, generator=g)
    return prompt + tok.decode(out[0, len(ids) if prompt else 1:].tolist())
