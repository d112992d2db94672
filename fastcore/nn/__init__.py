"""Drop-in modules: same constructor arguments and state_dict keys as the PyTorch classes they replace."""
from fastcore.nn.attention import CausalSelfAttention
from fastcore.nn.norm import LayerNorm, RMSNorm

__all__ = ["CausalSelfAttention", "LayerNorm", "RMSNorm"]
