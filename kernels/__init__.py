"""Triton kernels, installed as ``fastcore.kernels``. Host launchers take and return tensors; no autograd here."""
