"""Bucket assignment for data-parallel gradient reduction: flat buckets per (dtype, device), filled in
the order the gradients are expected, a small first bucket so communication starts early, and a
tensor never split across buckets."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class Bucket:
    dtype: torch.dtype
    device: torch.device
    params: list[int] = field(default_factory=list)   # indices into the parameter list, in fill order
    offsets: list[int] = field(default_factory=list)  # element offset of each parameter in the flat buffer
    numel: int = 0

    @property
    def nbytes(self) -> int:
        return self.numel * self.dtype.itemsize


def assign_buckets(params: list[torch.Tensor], order: list[int], bucket_cap_bytes: int,
                   first_bucket_bytes: int) -> list[Bucket]:
    """Buckets over ``params`` taken in ``order`` (indices). Each (dtype, device) fills its own
    buckets: the first holds up to ``first_bucket_bytes``, later ones up to ``bucket_cap_bytes``; a
    tensor larger than the cap gets a bucket of its own. Buckets are returned in the order their
    first tensor comes in ``order``, which is the order they are reduced in."""
    if sorted(order) != list(range(len(params))):
        raise ValueError("order must list every parameter index exactly once")
    if bucket_cap_bytes <= 0 or first_bucket_bytes <= 0:
        raise ValueError(f"bucket caps must be > 0 bytes, got {bucket_cap_bytes} and {first_bucket_bytes}")
    buckets: list[Bucket] = []
    open_bucket: dict[tuple, Bucket] = {}
    filled: dict[tuple, int] = {}  # buckets already closed per key, for the first-bucket cap
    for i in order:
        p = params[i]
        key = (p.dtype, p.device)
        cap = first_bucket_bytes if filled.get(key, 0) == 0 else bucket_cap_bytes
        bucket = open_bucket.get(key)
        size = p.numel() * p.dtype.itemsize
        if bucket is not None and bucket.params and bucket.nbytes + size > cap:
            filled[key] = filled.get(key, 0) + 1
            bucket = None
        if bucket is None:
            bucket = open_bucket[key] = Bucket(p.dtype, p.device)
            buckets.append(bucket)
        bucket.params.append(i)
        bucket.offsets.append(bucket.numel)
        bucket.numel += p.numel()
    return buckets
