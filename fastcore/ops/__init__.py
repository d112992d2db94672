"""Public functional ops: argument checks, backend dispatch, autograd and torch.compile registration."""
from fastcore.ops.adamw import adamw_step
from fastcore.ops.attention import attention
from fastcore.ops.norm import layer_norm, rms_norm
from fastcore.ops.pack import pack

__all__ = ["adamw_step", "attention", "layer_norm", "pack", "rms_norm"]
