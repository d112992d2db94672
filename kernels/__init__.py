"""Triton kernels, installed as ``fastcore.kernels``. Host launchers take and return tensors; no autograd here."""

if __name__ == "kernels":
    # A process started in fastcore's checkout (python -m, python -c) has this folder's parent on
    # sys.path, so a plain `import kernels` lands here. That name is Hugging Face's kernel-hub
    # package, which transformers imports: hand the import over to it, or fail as if we were absent.
    import importlib.machinery
    import importlib.util
    import os
    import sys

    _checkout = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    _spec = importlib.machinery.PathFinder.find_spec(
        __name__, [p for p in sys.path if os.path.abspath(p or os.curdir) != _checkout])
    if _spec is None:
        del sys.modules[__name__]
        raise ModuleNotFoundError("No module named 'kernels' (the folder of that name in fastcore's checkout is "
                                  "fastcore.kernels)", name=__name__)
    _module = importlib.util.module_from_spec(_spec)
    sys.modules[__name__] = _module  # the import statement returns what sys.modules holds at the end
    _spec.loader.exec_module(_module)
