"""Launch tables of the multi-tensor kernels (AdamW, pack): one row of addresses per tensor, one
(tensor, chunk) row per chunk, so that one grid covers any mix of tensor sizes and counts."""
from __future__ import annotations

import functools
import importlib

import torch
from torch import Tensor


def table(columns: list, device: torch.device, dtype: torch.dtype = torch.int64) -> Tensor:
    """An (n, len(columns)) table on ``device`` from per-tensor columns (lists of ints or floats)."""
    t = torch.tensor(columns, dtype=dtype).T.contiguous()
    if device.type != "cpu":
        with torch.cuda.device(device):  # queue the copy on the stream the kernel runs on
            t = t.pin_memory().to(device, non_blocking=True)
    return t


def addresses(tensors: list[Tensor] | None, n: int) -> list[int]:
    """A column of data addresses; zeros for an absent column."""
    return [0] * n if tensors is None else [t.data_ptr() for t in tensors]


@functools.lru_cache(maxsize=32)
def chunk_table(numels: tuple[int, ...], chunk: int, device: torch.device) -> Tensor:
    """(tensor, chunk) rows: a function of the sizes alone, so a training run builds it once."""
    counts = -(-torch.tensor(numels, dtype=torch.int64) // chunk)
    tensor = torch.repeat_interleave(torch.arange(len(numels)), counts)
    first = torch.repeat_interleave(torch.cumsum(counts, 0) - counts, counts)
    return torch.stack([tensor, torch.arange(len(tensor)) - first], 1).to(device=device, dtype=torch.int32)


def chunk_size(op: str, backend: str, device: torch.device) -> int:
    """Elements per chunk row that ``op``'s kernel for ``backend`` on ``device`` is built for."""
    if backend == "triton":
        return importlib.import_module(f"fastcore.kernels.{op}").CHUNK
    from fastcore import extension

    return getattr(extension.load(), f"{op.upper()}_CHUNK_{'CPU' if device.type == 'cpu' else 'CUDA'}")
