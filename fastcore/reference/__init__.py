"""Plain PyTorch references in float64: the ground truth for tests, and the fallback backend."""
from fastcore.reference.adamw import adamw_step
from fastcore.reference.attention import attention
from fastcore.reference.norm import layer_norm, rms_norm
from fastcore.reference.pack import pack

__all__ = ["adamw_step", "attention", "layer_norm", "pack", "rms_norm"]
