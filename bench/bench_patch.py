"""``fastcore.patch`` on Hugging Face models: a training step of a patched GPT-2 and a patched Llama
(GQA) against the same model unpatched, on the same tokens in the same run; tokens/s and peak memory.

    fastcore bench patch [--device cuda]

One call is a training step: forward (bf16 autocast on GPU, fp32 on CPU), backward, and
``torch.optim.AdamW(fused=True)`` for both, so the difference is what ``patch`` swaps in: the norms
and attention. The issue's target (GPU): the Llama config at T=2048 in bf16 trains at >= 1.15x the
unpatched tokens/s, or with >= 20% less peak memory. What patch can win is bounded: norms and
attention are a minority of a step's FLOPs at these widths (the matmuls of the projections and the
MLP dominate), and the unpatched model already runs PyTorch's SDPA (FlashAttention-2 on Hopper).
There is no quick case: transformers' model construction alone takes seconds.
"""
from __future__ import annotations

import contextlib
import functools

import torch

import fastcore
from fastcore.bench.harness import Benchmark, Case, register, step_from_provider

LR = 1e-4
# device -> {name: (config kwargs, batch, sequence length)}
MODELS = {
    "cuda": {
        "gpt2-124m": (dict(n_layer=12, n_embd=768, n_head=12, vocab_size=50257, n_positions=1024), 8, 1024),
        # 0.25B parameters, GQA 16:4, head dim 64.
        "llama-0.3b": (dict(num_hidden_layers=16, hidden_size=1024, intermediate_size=2816, num_attention_heads=16,
                            num_key_value_heads=4, vocab_size=32000, max_position_embeddings=2048), 4, 2048),
    },
    "cpu": {
        "gpt2-tiny": (dict(n_layer=2, n_embd=128, n_head=4, vocab_size=1024, n_positions=256), 4, 256),
        "llama-tiny": (dict(num_hidden_layers=2, hidden_size=128, intermediate_size=256, num_attention_heads=4,
                            num_key_value_heads=2, vocab_size=1024, max_position_embeddings=256), 4, 256),
    },
}


def providers(device: str) -> dict:
    try:
        __import__("transformers")
    except ImportError:
        reason = "transformers is not installed (pip install transformers)"
        return {"fastcore-patched": reason, "torch": reason}
    return {"fastcore-patched": functools.partial(Step, True), "torch": functools.partial(Step, False)}


def cases(device: str, quick: bool) -> list[Case]:
    if quick:
        return []
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    return [Case((batch, t), dtype, "step", size=batch * t, tag=name) for name, (_, batch, t) in MODELS[device].items()]


def build(case: Case, device: str):
    import transformers as tf

    kwargs = next(models[case.tag][0] for models in MODELS.values() if case.tag in models)
    dropout = dict(attn_pdrop=0.0, resid_pdrop=0.0, embd_pdrop=0.0) if case.tag.startswith("gpt2") else {}
    config = (tf.GPT2Config if case.tag.startswith("gpt2") else tf.LlamaConfig)(
        **kwargs, **dropout, bos_token_id=0, eos_token_id=0)
    torch.manual_seed(0)
    model_cls = tf.GPT2LMHeadModel if case.tag.startswith("gpt2") else tf.LlamaForCausalLM
    return model_cls(config).to(device), config.vocab_size


class Step:
    """A freshly seeded model (patched or not), fused AdamW and fixed tokens; each call is one step."""

    def __init__(self, patched: bool, case: Case, device: str):
        self.model, vocab = build(case, device)
        self.report: dict = {}
        if patched:
            report = fastcore.patch(self.model)
            if report["attention"] == 0:
                raise RuntimeError(f"patch routed no attention layer: {report['notes']}")
            self.report = report
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=LR, fused=True)
        gen = torch.Generator(device=device).manual_seed(1)
        self.x = torch.randint(vocab, case.shape, device=device, generator=gen)
        self.autocast = (torch.autocast("cuda", dtype=torch.bfloat16) if device == "cuda"
                         else contextlib.nullcontext())
        self.tokens = case.shape[0] * case.shape[1]

    def __call__(self) -> torch.Tensor:
        with self.autocast:
            loss = self.model(self.x, labels=self.x).loss
        loss.backward()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        return loss

    def extras(self) -> dict:
        # The harness turns tokens_per_step into tokens_per_s from the row's median.
        fallbacks = dict(self.report.get("attention_fallbacks", {}))
        return {"tokens_per_step": self.tokens, "flops_per_token": None, "peak_flops": None,
                "attention_fallbacks": fallbacks}


def work(case: Case):
    # Model FLOPs per step: 6 per parameter (all of them, embeddings included) per token plus 6·L·C·T.
    with torch.device("meta"):
        model, _ = build(case, "meta")
    cfg = model.config
    n = sum(p.numel() for p in model.parameters())
    layers, width, t = cfg.num_hidden_layers, cfg.hidden_size, case.shape[1]
    return "flops", (6 * n + 6 * layers * width * t) * case.shape[0] * t


register(Benchmark(op="patch", providers=providers, cases=cases, setup=step_from_provider, work=work,
                   size_name="tokens per step", baseline="torch"))
