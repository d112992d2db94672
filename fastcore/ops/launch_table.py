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


def check_disjoint(op: str, reads: dict, writes: dict) -> None:
    """No tensor a kernel writes may share memory with any other tensor it reads or writes: the
    kernels run in no set order, so the result would depend on the backend and the run. ``reads``
    and ``writes`` map an argument's name to its list of tensors (None entries are absent ones)."""
    spans = []  # (start, end, written, name, index): each tensor's address range, a stride's gaps included
    for written, named in ((False, reads), (True, writes)):
        for name, tensors in named.items():
            for i, t in enumerate(tensors):
                # A non-contiguous tensor is read or stepped through a contiguous copy, so it cannot
                # collide; meta tensors have no memory.
                if t is not None and t.numel() and t.data_ptr() and t.is_contiguous():
                    last = sum((size - 1) * stride for size, stride in zip(t.shape, t.stride()))
                    spans.append((t.data_ptr(), t.data_ptr() + (last + 1) * t.element_size(), written, name, i))
    spans.sort(key=lambda span: span[:2])
    reach = {False: None, True: None}  # of each kind so far, the span that ends last
    for span in spans:
        start, _, written, name, i = span
        for kind in ((False, True) if written else (True,)):
            other = reach[kind]
            # A source that is exactly its destination is an in-place elementwise pass: safe.
            same = other is not None and other[:2] == span[:2] and other[2] != written
            if other is not None and other[1] > start and not same:
                raise ValueError(f"{op}: {other[3]}[{other[4]}] and {name}[{i}] share memory; a tensor the "
                                 "kernel writes must not overlap another")
        if reach[written] is None or span[1] > reach[written][1]:
            reach[written] = span
