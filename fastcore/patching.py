"""``fastcore.patch(model)``: fastcore's norms and attention in an existing model, in place.

Norms change class in place (``module.__class__``), so parameters, hooks, ``state_dict`` keys and an
optimizer built beforehand all stay valid, and ``unpatch`` swaps the class back:

- ``torch.nn.LayerNorm`` / ``torch.nn.RMSNorm`` (exactly those classes; a subclass may have its own
  forward) become ``fastcore.nn.LayerNorm`` / ``RMSNorm``.
- Hugging Face's Llama-style RMSNorm (Llama, Mistral, Qwen2, ... : any class whose ``forward`` is
  Llama's, recognised by its code) keeps its numerics: normalise in fp32, round to the input's dtype,
  then multiply by the weight.

Attention in Hugging Face models goes through ``transformers``' attention registry: fastcore registers
an implementation named ``"fastcore"`` and sets it on the model. A call that uses what
``fastcore.attention`` does not do (a padding mask, dropout, a sliding window, a soft cap, an
unsupported head dim) runs the model's previous implementation instead, counted in the report.
"""
from __future__ import annotations

import importlib.util
import sys
import types
import weakref
from collections import Counter

import torch
from torch import nn

from fastcore import nn as fnn
from fastcore.ops.attention import HEAD_DIMS, attention
from fastcore.ops.norm import rms_norm

IMPLEMENTATION = "fastcore"
# Per patched model: the live report, found from any of its modules by the attention function.
_reports: "weakref.WeakKeyDictionary[nn.Module, dict]" = weakref.WeakKeyDictionary()


class _HFRMSNorm:
    """Mixed into a Hugging Face Llama-style RMSNorm class: the same maths on fastcore's kernel."""

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        shape = hidden_states.shape
        normed = rms_norm(hidden_states.reshape(-1, shape[-1]), None, self.variance_epsilon,
                          backend=self.fastcore_backend)
        return self.weight * normed.reshape(shape)


_hf_classes: dict[type, type] = {}


def _hf_patched_class(cls: type) -> type:
    if cls not in _hf_classes:
        _hf_classes[cls] = type(f"Fastcore{cls.__name__}", (_HFRMSNorm, cls), {"_fastcore_original": cls})
    return _hf_classes[cls]


def _llama_rms_code():
    """The code object of Llama's RMSNorm.forward, or None without transformers."""
    if importlib.util.find_spec("transformers") is None:
        return None
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    return LlamaRMSNorm.forward.__code__


def _same_code(a, b) -> bool:
    return a.co_code == b.co_code and a.co_consts == b.co_consts and a.co_names == b.co_names


def _norm_target(module: nn.Module, layer_norm: bool, rms: bool, llama_code) -> tuple[str, type] | None:
    """(kind, fastcore class) for a norm patch() replaces, or None."""
    cls = type(module)
    if layer_norm and cls is nn.LayerNorm:
        return "layer_norm", fnn.LayerNorm
    if rms and cls is nn.RMSNorm:
        return "rms_norm", fnn.RMSNorm
    if (rms and llama_code is not None and isinstance(getattr(cls, "forward", None), types.FunctionType)
            and hasattr(module, "variance_epsilon") and isinstance(getattr(module, "weight", None), nn.Parameter)
            and _same_code(cls.forward.__code__, llama_code)):
        return "rms_norm", _hf_patched_class(cls)
    return None


def _is_fastcore(module: nn.Module) -> bool:
    """Patched, or a fastcore module from the start."""
    return isinstance(module, (fnn.LayerNorm, fnn.RMSNorm, _HFRMSNorm))


def patch(model: nn.Module, *, layer_norm: bool = True, rms_norm: bool = True, attention: bool = True,
          backend: str = "auto") -> dict:
    """Swap fastcore's kernels into ``model`` in place; returns the report of what is patched.

    The report counts, per kind, the modules now running fastcore (``layer_norm``, ``rms_norm``,
    ``attention``: Hugging Face attention layers routed through ``fastcore.attention``), the norm-like
    modules left alone (``skipped``, by class name) and, live, the attention calls that fell back to
    the model's own implementation (``attention_fallbacks``, by reason). Calling it again patches
    what is new and returns the same kind of report; ``unpatch`` undoes it.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"patch: model must be a torch.nn.Module, got {type(model).__name__}")
    from fastcore.backends import BACKENDS

    if backend != "auto" and backend not in BACKENDS:
        raise ValueError(f"patch: backend must be 'auto' or one of {BACKENDS}, got {backend!r}")
    report = _reports.get(model) or {"layer_norm": 0, "rms_norm": 0, "attention": 0, "skipped": Counter(),
                                      "attention_fallbacks": Counter(), "notes": [], "backend": backend}
    report["skipped"].clear()
    llama_code = _llama_rms_code()
    for module in model.modules():
        if _is_fastcore(module):
            continue
        target = _norm_target(module, layer_norm, rms_norm, llama_code)
        if target is None:
            if "norm" in type(module).__name__.lower():
                report["skipped"][type(module).__name__] += 1
            continue
        kind, cls = target
        original = type(module)
        module.__class__ = cls
        module._fastcore_original = original
        if cls in (fnn.LayerNorm, fnn.RMSNorm):
            module.backend = backend
        else:
            module.fastcore_backend = backend
        report[kind] += 1
    if attention:
        _patch_hf_attention(model, report)
    _reports[model] = report
    for module in model.modules():
        _reports.setdefault(module, report)
    return report


def unpatch(model: nn.Module) -> dict:
    """Undo ``patch``: every module back to its class, the attention implementation back to the
    model's previous one. Returns the counts restored per kind."""
    restored = Counter()
    for module in model.modules():
        original = module.__dict__.pop("_fastcore_original", None)
        if original is None:
            continue
        kind = "layer_norm" if issubclass(original, nn.LayerNorm) else "rms_norm"
        module.__dict__.pop("backend", None)
        module.__dict__.pop("fastcore_backend", None)
        module.__class__ = original
        restored[kind] += 1
    previous = model.__dict__.pop("_fastcore_attn_previous", None)
    if previous is not None:
        model.set_attn_implementation(previous)
        restored["attention"] = _count_attention_layers(model)
    for module in model.modules():
        _reports.pop(module, None)
    return dict(restored)


def _count_attention_layers(model: nn.Module) -> int:
    return sum(1 for m in model.modules() if type(m).__name__.endswith("Attention") and hasattr(m, "config"))


def _patch_hf_attention(model: nn.Module, report: dict) -> None:
    if importlib.util.find_spec("transformers") is None:
        if "transformers is not installed: Hugging Face attention not patched" not in report["notes"]:
            report["notes"].append("transformers is not installed: Hugging Face attention not patched")
        return
    from transformers import PreTrainedModel

    if not isinstance(model, PreTrainedModel):
        return
    try:
        from transformers import AttentionInterface
        from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
    except ImportError:
        report["notes"].append("this transformers has no attention registry: attention not patched")
        return
    AttentionInterface.register(IMPLEMENTATION, _hf_attention)
    AttentionMaskInterface.register(IMPLEMENTATION, sdpa_mask)  # no mask at all when causal without padding
    current = model.config._attn_implementation
    if current == IMPLEMENTATION:
        return
    if not hasattr(model, "set_attn_implementation") or not model._can_set_attn_implementation():
        report["notes"].append(f"{type(model).__name__} does not dispatch through the attention registry: "
                               "attention not patched")
        return
    model.set_attn_implementation(IMPLEMENTATION)
    model._fastcore_attn_previous = current
    report["fallback_to"] = current
    report["attention"] = _count_attention_layers(model)


def _hf_attention(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None,
                  is_causal=None, **kwargs):
    """``transformers``' attention-function signature on ``fastcore.attention``: q ``(B, Hq, T, D)``,
    k/v ``(B, Hkv, S, D)``; returns ``((B, T, Hq, D), None)``."""
    report = _reports.get(module)
    reason = _unsupported(module, query, key, attention_mask, dropout, kwargs)
    if reason is not None:
        if report is not None:
            report["attention_fallbacks"][reason] += 1
        from transformers import AttentionInterface

        previous = report.get("fallback_to", "sdpa") if report else "sdpa"
        if previous == "eager":  # each model file has its own eager function, outside the registry
            fallback = sys.modules[type(module).__module__].eager_attention_forward
        else:
            fallback = AttentionInterface()[previous]
        return fallback(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                        is_causal=is_causal, **kwargs)
    causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    # One query row (decoding with a cache) sees every key; longer blocks are bottom-right causal.
    out = attention(query, key, value, causal=bool(causal) and query.shape[2] > 1, scale=scaling,
                    backend=report["backend"] if report else "auto")
    return out.transpose(1, 2).contiguous(), None


def _unsupported(module, query, key, attention_mask, dropout, kwargs) -> str | None:
    if attention_mask is not None:
        return "attention_mask"
    if dropout:
        return "dropout"
    for name in ("sliding_window", "softcap", "position_bias", "s_aux"):
        if kwargs.get(name) is not None:
            return name
    if kwargs.get("output_attentions"):
        return "output_attentions"
    if query.shape[-1] not in HEAD_DIMS or key.shape[-1] != query.shape[-1]:
        return "head_dim"
    if query.shape[2] > 1 and query.shape[2] != key.shape[2]:
        return "chunked_prefill"
    return None
