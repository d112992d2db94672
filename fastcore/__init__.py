"""fastcore: fused kernels for training transformer language models.

Every op has the backends ``reference`` (float64 PyTorch, the ground truth),
``cpu`` (C++ extension), ``triton`` and ``cuda``; ``backend="auto"`` picks the
fastest that can run on the input's device.
"""
__version__ = "0.1.0"

from fastcore.backends import BACKENDS, available_backends, resolve_backend
from fastcore.ops.adamw import adamw_step
from fastcore.ops.attention import attention
from fastcore.ops.norm import layer_norm, rms_norm
from fastcore import nn, optim
from fastcore.patching import patch, unpatch

__all__ = ["BACKENDS", "available_backends", "resolve_backend", "adamw_step", "attention", "layer_norm", "rms_norm",
           "nn", "optim", "patch", "unpatch"]
