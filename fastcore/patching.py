"""``fastcore.patch(model)``: fastcore's norms and attention in an existing model, in place.

Norms change class in place (``module.__class__``), so parameters, hooks, ``state_dict`` keys and an
optimizer built beforehand all stay valid, and ``unpatch`` swaps the class back:

- ``torch.nn.LayerNorm`` / ``torch.nn.RMSNorm`` (exactly those classes; a subclass may have its own
  forward) become ``fastcore.nn.LayerNorm`` / ``RMSNorm``.
- Hugging Face's Llama-style RMSNorm (Llama, Mistral, Qwen2, ... : any class whose ``forward`` is
  Llama's, recognised by its code) keeps its numerics: normalise in fp32, round to the input's dtype,
  then multiply by the weight.

Attention in Hugging Face models goes through ``transformers``' attention registry: fastcore registers
an implementation named ``"fastcore"`` and sets it on each model (also one wrapped in another module)
that runs ``"sdpa"``: fastcore keeps SDPA's mask rules, and a call that needs what ``fastcore.attention``
does not do (a padding mask, dropout, a sliding window shorter than the keys, a soft cap, an
unsupported head dim) runs SDPA instead, counted in the report. Models on another implementation
(eager, flex, flash: often for features SDPA lacks) keep it.
"""
from __future__ import annotations

import importlib.util
import inspect
import sys
import types
import weakref
from collections import Counter

import torch
from torch import nn

from fastcore import nn as fnn
from fastcore.backends import resolve_backend
from fastcore.ops.attention import HEAD_DIMS, attention
from fastcore.ops.norm import rms_norm

IMPLEMENTATION = "fastcore"
# Per patched model: the live report, found from any of its modules by the attention function.
_reports: "weakref.WeakKeyDictionary[nn.Module, dict]" = weakref.WeakKeyDictionary()


def _rebuild(original: type, state: dict) -> nn.Module:
    """Unpickle a patched Hugging Face norm: its generated class is rebuilt from the original. (A
    fresh process must call ``patch`` on the loaded model to register the attention implementation.)"""
    module = original.__new__(original)
    module.__setstate__(state)
    module.__class__ = _hf_patched_class(original)
    return module


class _HFRMSNorm:
    """Mixed into a Hugging Face Llama-style RMSNorm class: the same maths on fastcore's kernel."""

    def __reduce_ex__(self, protocol):
        return _rebuild, (self._fastcore_original, self.__dict__)

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
    """The code object of Llama's RMSNorm.forward; None when transformers is not loaded (then the
    model holds no Hugging Face module, and importing it would cost seconds)."""
    if sys.modules.get("transformers") is None:
        return None
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    return _code(LlamaRMSNorm.forward)


def _code(fn):
    """The code object of ``fn`` under its decorators (transformers wraps some forwards, for instance
    to deprecate an argument), or None."""
    return getattr(inspect.unwrap(fn), "__code__", None) if callable(fn) else None


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
            and _same_code(_code(cls.forward), llama_code)):
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
    SDPA (``attention_fallbacks``, by reason); ``notes`` say what was not patched and why. Calling it
    again patches what is new and returns the same report; ``unpatch`` undoes it.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"patch: model must be a torch.nn.Module, got {type(model).__name__}")
    _check_backend(model, backend, layer_norm, rms_norm, attention)
    fresh = model not in _reports  # also a copy or a reload of a patched model: its report stayed behind
    report = _reports.get(model) or {"layer_norm": 0, "rms_norm": 0, "attention": 0, "skipped": Counter(),
                                      "attention_fallbacks": Counter(), "notes": [], "backend": _backend_of(model)}
    report["backend"] = report["backend"] or backend
    if report["backend"] != backend:  # the patched norms keep theirs: the report would misstate it
        raise ValueError(f"patch: the model is already patched with backend={report['backend']!r}; "
                         f"call fastcore.unpatch(model) before patching with backend={backend!r}")
    report["skipped"].clear()
    llama_code = _llama_rms_code()
    for module in model.modules():
        _reports[module] = report  # how the attention function finds the live report
        if _is_fastcore(module):
            original = module.__dict__.get("_fastcore_original")
            if fresh and original is not None:
                report["layer_norm" if issubclass(original, nn.LayerNorm) else "rms_norm"] += 1
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
        _patch_hf_attention(model, report, fresh)
    return report


def _backend_of(model: nn.Module) -> str | None:
    """The backend of the modules already patched in ``model`` (a copy or a reload of a patched one)."""
    for module in model.modules():
        if "_fastcore_original" in module.__dict__:
            return module.__dict__.get("backend", module.__dict__.get("fastcore_backend"))
    return None


def _check_backend(model: nn.Module, backend: str, layer_norm: bool, rms: bool, attn: bool) -> None:
    """Refuse, now and with the reason, a backend that cannot run a patched op on the model's device."""
    param = next(model.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    attn = attn and bool(_hf_models(model))  # fastcore patches only Hugging Face attention
    for op, wanted in (("layer_norm", layer_norm), ("rms_norm", rms), ("attention", attn)):
        if wanted:
            try:
                resolve_backend(op, backend, device)
            except (ValueError, RuntimeError) as exc:
                raise ValueError(f"patch: {exc}") from None


def unpatch(model: nn.Module) -> dict:
    """Undo ``patch``: every module back to its class, each patched Hugging Face model back to SDPA
    (the only implementation fastcore takes over). Returns the counts restored per kind."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"unpatch: model must be a torch.nn.Module, got {type(model).__name__}")
    restored = Counter()
    for module in model.modules():
        _reports.pop(module, None)
        original = module.__dict__.pop("_fastcore_original", None)
        if original is None:
            continue
        kind = "layer_norm" if issubclass(original, nn.LayerNorm) else "rms_norm"
        module.__dict__.pop("backend", None)
        module.__dict__.pop("fastcore_backend", None)
        module.__class__ = original
        restored[kind] += 1
    for hf in _hf_models(model):
        if any(_implementation(c) == IMPLEMENTATION for c in _configs(hf)):
            hf.set_attn_implementation("sdpa")
            restored["attention"] += _count_attention_layers(hf)
    return dict(restored)


def _note(report: dict, text: str) -> None:
    if text not in report["notes"]:
        report["notes"].append(text)


def _hf_models(model: nn.Module) -> list:
    """The outermost Hugging Face models in ``model`` (itself, or wrapped in other modules)."""
    if sys.modules.get("transformers") is None:
        return []
    from transformers import PreTrainedModel

    found, covered = [], set()
    for module in model.modules():  # pre-order: an outer model comes before the models inside it
        if isinstance(module, PreTrainedModel) and id(module) not in covered:
            found.append(module)
            covered.update(id(m) for m in module.modules())
    return found


def _configs(hf) -> list:
    """A model's config and its sub-configs, at any depth."""
    out, todo = [], [hf.config]
    while todo:
        config = todo.pop()
        out.append(config)
        todo += [getattr(config, k) for k in getattr(config, "sub_configs", {}) if getattr(config, k, None) is not None]
    return out


def _implementation(config) -> str | None:
    return getattr(config, "_attn_implementation", None)


def _routes_through_registry(module: nn.Module) -> bool:
    code = _code(getattr(type(module), "forward", None))
    return code is not None and "get_interface" in code.co_names


def _count_attention_layers(hf: nn.Module) -> int:
    return sum(1 for m in hf.modules() if _routes_through_registry(m))


def _patch_hf_attention(model: nn.Module, report: dict, fresh: bool) -> None:
    if sys.modules.get("transformers") is None and importlib.util.find_spec("transformers") is None:
        _note(report, "transformers is not installed: Hugging Face attention not patched")
        return
    models = _hf_models(model)
    if not models:
        return
    try:
        from transformers import AttentionInterface
        from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
    except ImportError:
        _note(report, "this transformers has no attention registry: attention not patched")
        return
    AttentionInterface.register(IMPLEMENTATION, _hf_attention)
    AttentionMaskInterface.register(IMPLEMENTATION, sdpa_mask)  # SDPA's masks: none when causal without padding
    for hf in models:
        name = type(hf).__name__
        implementations = {_implementation(c) for c in _configs(hf)}
        if implementations == {IMPLEMENTATION}:  # patched before (or shares a patched model's config)
            report["attention"] += _count_attention_layers(hf) if fresh else 0
            continue
        if implementations != {"sdpa"}:
            _note(report, f"{name} runs attention {sorted(map(str, implementations))}: fastcore takes over only from "
                          "'sdpa', so its attention is left as it is")
            continue
        if not hasattr(hf, "set_attn_implementation") or not hf._can_set_attn_implementation():
            _note(report, f"{name} does not dispatch through the attention registry: attention not patched")
            continue
        hf.set_attn_implementation(IMPLEMENTATION)
        report["attention"] += _count_attention_layers(hf)


def _hf_attention(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None,
                  is_causal=None, **kwargs):
    """``transformers``' attention-function signature on ``fastcore.attention``: q ``(B, Hq, T, D)``,
    k/v ``(B, Hkv, S, D)``; returns ``((B, T, Hq, D), None)``. What it cannot do goes to SDPA."""
    report = _reports.get(module)
    causal = bool(is_causal if is_causal is not None else getattr(module, "is_causal", True))
    reason = _unsupported(query, key, value, attention_mask, dropout, causal, kwargs)
    if reason is not None:
        if report is not None:
            report["attention_fallbacks"][reason] += 1
        from transformers import AttentionInterface

        return AttentionInterface()["sdpa"](module, query, key, value, attention_mask, dropout=dropout,
                                             scaling=scaling, is_causal=is_causal, **kwargs)
    # One query row (decoding with a cache) sees every key; longer blocks are bottom-right causal.
    # The shape test comes first and is made a bool: under dynamic shapes it is symbolic.
    causal = bool(query.shape[2] > 1) and causal
    out = attention(query, key, value, causal=causal, scale=scaling,
                    backend=report["backend"] if report else "auto")
    return out.transpose(1, 2).contiguous(), None


def _unsupported(query, key, value, attention_mask, dropout, causal, kwargs) -> str | None:
    if attention_mask is not None:
        return "attention_mask"
    if dropout:
        return "dropout"
    window = kwargs.get("sliding_window")
    if window is not None and key.shape[2] > window:
        return "sliding_window"
    for name in ("softcap", "position_bias", "s_aux"):
        if kwargs.get(name) is not None:
            return name
    if kwargs.get("output_attentions"):
        return "output_attentions"
    if query.device.type not in ("cpu", "cuda"):
        return "device"
    if query.shape[-1] not in HEAD_DIMS or key.shape[-1] != query.shape[-1] or value.shape != key.shape:
        return "head_dim"  # (DeepSeek's value heads are narrower than its query/key heads)
    if causal and 1 < query.shape[2] != key.shape[2]:
        return "chunked_prefill"
    return None
