"""Plain PyTorch references in float64: the ground truth for tests, and the fallback backend."""
from fastcore.reference.norm import layer_norm, rms_norm

__all__ = ["layer_norm", "rms_norm"]
