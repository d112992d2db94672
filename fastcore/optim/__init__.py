"""Drop-in optimizers: the constructor arguments and state_dict format of the PyTorch class they replace."""
from fastcore.optim.adamw import FusedAdam, FusedAdamW

__all__ = ["FusedAdam", "FusedAdamW"]
