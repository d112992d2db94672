"""Data parallelism on torch.distributed: bucketed, overlapped gradient all-reduce (NCCL on GPUs, gloo on CPU)."""
from fastcore.distributed.buckets import Bucket, assign_buckets
from fastcore.distributed.data_parallel import DataParallel, init_from_env

__all__ = ["Bucket", "DataParallel", "assign_buckets", "init_from_env"]
