"""fastcore.patch / unpatch on plain PyTorch and Hugging Face models built from small random configs:
the same loss and gradients as unpatched, the report's counts, state_dict keys, fallbacks, undo."""
import copy
import importlib
import importlib.util
import sys

import pytest
import torch
from torch import nn

import fastcore
from conftest import HAS_GPU, TOLERANCE, assert_close, without_key_bias
from fastcore import patching as patch_module
from fastcore.optim import FusedAdamW

# The Hugging Face tests need transformers (in the test extras); the plain-PyTorch ones run without it.
# An installed but broken transformers fails here rather than skipping.
transformers = importlib.import_module("transformers") if importlib.util.find_spec("transformers") else None
hf = pytest.mark.skipif(transformers is None, reason="transformers is not installed (it is in the test extras)")


class Plain(nn.Module):
    def __init__(self, d=32):
        super().__init__()
        self.emb = nn.Embedding(50, d)
        self.ln = nn.LayerNorm(d)
        self.rms = nn.RMSNorm(d, eps=1e-6)
        self.ln_no_bias = nn.LayerNorm(d, bias=False)
        self.mid = nn.Linear(d, d)
        self.head = nn.Linear(d, 50)

    def forward(self, x):
        h = self.ln(self.emb(x))
        h = self.rms(torch.relu(self.mid(h)) + h)
        return self.head(self.ln_no_bias(h))


def loss_and_grads(model, x, **kwargs):
    model.zero_grad(set_to_none=True)
    if transformers is not None and isinstance(model, transformers.PreTrainedModel):
        loss = model(x, labels=x, **kwargs).loss
    else:
        loss = nn.functional.cross_entropy(model(x).flatten(0, 1), x.flatten())
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def assert_same_training(patched, original, x, **kwargs):
    (la, ga), (lb, gb) = loss_and_grads(patched, x, **kwargs), loss_and_grads(original, x, **kwargs)
    assert_close(la, lb, torch.float32, "loss")
    assert ga.keys() == gb.keys()
    for name in ga:
        assert_close(ga[name], gb[name], torch.float32, f"grad of {name}")


def gpt2(layers=2, **extra):
    cfg = transformers.GPT2Config(n_layer=layers, n_embd=64, n_head=4, vocab_size=100, n_positions=64,
                                  attn_pdrop=0.0, resid_pdrop=0.0, embd_pdrop=0.0, bos_token_id=0, eos_token_id=0,
                                  **extra)
    return transformers.GPT2LMHeadModel(cfg)


def llama(layers=2):
    cfg = transformers.LlamaConfig(num_hidden_layers=layers, hidden_size=64, intermediate_size=128,
                                   num_attention_heads=4, num_key_value_heads=2,    # GQA
                                   vocab_size=100, max_position_embeddings=64, bos_token_id=0, eos_token_id=0)
    return transformers.LlamaForCausalLM(cfg)


@pytest.fixture
def calls(monkeypatch):
    """How many times fastcore.attention ran inside a patched model."""
    seen = []

    def spy(*args, **kwargs):
        seen.append(args[0].shape)
        return fastcore.attention(*args, **kwargs)
    monkeypatch.setattr(patch_module, "attention", spy)
    return seen


# ---- plain PyTorch --------------------------------------------------------------------------------

def test_plain_model_norms_are_swapped_in_place():
    torch.manual_seed(0)
    model = Plain()
    original = copy.deepcopy(model)
    params = [id(p) for p in model.parameters()]
    keys = list(model.state_dict())
    report = fastcore.patch(model)
    assert (report["layer_norm"], report["rms_norm"], report["attention"]) == (2, 1, 0)
    assert type(model.ln) is fastcore.nn.LayerNorm and type(model.rms) is fastcore.nn.RMSNorm
    assert [id(p) for p in model.parameters()] == params          # an optimizer built before stays valid
    assert list(model.state_dict()) == keys
    assert_same_training(model, original, torch.randint(0, 50, (4, 12)))
    if transformers is not None:
        assert report["notes"] == []


def test_patch_is_idempotent_and_unpatch_restores():
    model = Plain()
    first = dict(fastcore.patch(model))
    again = fastcore.patch(model)
    assert {k: again[k] for k in ("layer_norm", "rms_norm")} == {k: first[k] for k in ("layer_norm", "rms_norm")}
    # Another backend on a patched model would leave the norms on the first: refused, by name.
    with pytest.raises(ValueError, match="already patched with backend='auto'; call fastcore.unpatch"):
        fastcore.patch(model, backend="reference")
    assert model.ln.backend == "auto"
    assert fastcore.unpatch(model) == {"layer_norm": 2, "rms_norm": 1}
    assert type(model.ln) is nn.LayerNorm and type(model.rms) is nn.RMSNorm
    assert not hasattr(model.ln, "backend") and not hasattr(model.ln, "_fastcore_original")
    assert fastcore.unpatch(model) == {}
    assert fastcore.patch(model, backend="reference")["backend"] == "reference"  # after unpatch it may change
    assert model.ln.backend == "reference"


def test_kinds_can_be_left_out_and_subclasses_are_skipped():
    class MyNorm(nn.LayerNorm):
        def forward(self, x):
            return super().forward(x) * 2

    model = nn.Sequential(nn.LayerNorm(8), MyNorm(8), nn.RMSNorm(8))
    report = fastcore.patch(model, rms_norm=False)
    assert report["layer_norm"] == 1 and report["rms_norm"] == 0
    assert report["skipped"] == {"MyNorm": 1, "RMSNorm": 1}
    assert type(model[1]) is MyNorm


def test_backend_is_passed_down(monkeypatch):
    torch.manual_seed(0)
    model = Plain()
    original = copy.deepcopy(model)
    fastcore.patch(model, backend="reference")
    assert model.ln.backend == "reference"
    ran = []
    real = fastcore.reference.layer_norm
    monkeypatch.setattr(fastcore.reference, "layer_norm", lambda *a, **k: ran.append(1) or real(*a, **k))
    assert_same_training(model, original, torch.randint(0, 50, (2, 8)))
    assert len(ran) == 2                                           # both LayerNorms ran on the reference


@pytest.mark.parametrize("bad,match", [(dict(model="not a model"), "model must be a torch.nn.Module"),
                                       (dict(backend="fast"), "unknown backend 'fast'; expected 'auto' or one of")])
def test_bad_input(bad, match):
    with pytest.raises((TypeError, ValueError), match=match):
        fastcore.patch(bad.get("model", Plain()), **{k: v for k, v in bad.items() if k != "model"})


def test_compile_a_patched_plain_model():
    torch.manual_seed(0)
    model = Plain()
    fastcore.patch(model)
    x = torch.randint(0, 50, (2, 8))
    compiled = torch.compile(model)
    assert_close(compiled(x), model(x), torch.float32)


def test_without_transformers_plain_patching_still_works(monkeypatch):
    monkeypatch.setitem(sys.modules, "transformers", None)
    monkeypatch.setattr(patch_module.importlib.util, "find_spec", lambda name: None)
    model = Plain()
    report = fastcore.patch(model)
    assert report["layer_norm"] == 2 and report["rms_norm"] == 1
    assert report["notes"] == ["transformers is not installed: Hugging Face attention not patched"]


# ---- Hugging Face ---------------------------------------------------------------------------------

@hf
@pytest.mark.parametrize("make,norm_kind,norm_class", [(gpt2, "layer_norm", "LayerNorm"),
                                                       (llama, "rms_norm", "FastcoreLlamaRMSNorm")])
def test_hf_model_trains_alike(make, norm_kind, norm_class, calls):
    torch.manual_seed(0)
    model = make()
    original = copy.deepcopy(model)
    keys = list(model.state_dict())
    report = fastcore.patch(model)
    layers = model.config.num_hidden_layers
    assert report[norm_kind] == 2 * layers + 1 and report["attention"] == layers
    assert report["skipped"] == {} and model.config._attn_implementation == "fastcore"
    assert {type(m).__name__ for m in model.modules() if "Norm" in type(m).__name__} == {norm_class}
    assert list(model.state_dict()) == keys
    x = torch.randint(0, 100, (2, 24))
    assert_same_training(model, original, x)
    assert len(calls) == layers and not report["attention_fallbacks"]    # fastcore attention, every layer
    restored = fastcore.unpatch(model)
    assert restored == {norm_kind: 2 * layers + 1, "attention": layers}
    assert model.config._attn_implementation == original.config._attn_implementation
    assert {type(m) for m in model.modules()} == {type(m) for m in original.modules()}


@hf
def test_llama_rmsnorm_keeps_its_bf16_numerics():
    """Llama rounds the normalised activations to bf16 before the weight multiply; so must we."""
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    torch.manual_seed(0)
    norm = LlamaRMSNorm(64).to(torch.bfloat16)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
    x = torch.randn(64, 64, dtype=torch.bfloat16) * 3
    expect = norm(x)
    fastcore.patch(nn.Sequential(norm))
    got = norm(x)
    assert got.dtype == expect.dtype == torch.bfloat16
    # Bit-equal but where the fp32 sum order of mean(x^2) tips a rounding: then one bf16 ulp apart.
    # (Multiplying the weight before rounding, as a fused kernel would, differs on ~25% of elements.)
    same = got == expect
    assert same.float().mean() >= 0.97, same.float().mean()
    ulp = expect.float().abs() * 2 ** -7
    assert ((got.float() - expect.float()).abs() <= ulp)[~same].all()


@hf
def test_padding_mask_falls_back_and_is_counted(calls):
    torch.manual_seed(0)
    model = llama()
    original = copy.deepcopy(model)
    report = fastcore.patch(model)
    x = torch.randint(0, 100, (2, 16))
    mask = torch.ones(2, 16, dtype=torch.long)
    mask[0, :5] = 0                                                # left padding
    with torch.no_grad():
        got, expect = model(x, attention_mask=mask).logits, original(x, attention_mask=mask).logits
    assert_close(got, expect, torch.float32, "logits with padding")
    assert report["attention_fallbacks"] == {"attention_mask": 2} and calls == []


@hf
def test_generation_with_a_kv_cache_matches(calls):
    torch.manual_seed(0)
    model = gpt2().eval()
    original = copy.deepcopy(model)
    fastcore.patch(model)
    prompt = torch.randint(0, 100, (1, 6))
    out = model.generate(prompt, max_new_tokens=8, do_sample=False, pad_token_id=0)
    assert torch.equal(out, original.generate(prompt, max_new_tokens=8, do_sample=False, pad_token_id=0))
    assert any(q[2] == 1 for q in calls)                           # the cached one-query steps ran on fastcore


@hf
def test_dropout_in_training_falls_back():
    cfg = transformers.GPT2Config(n_layer=1, n_embd=64, n_head=4, vocab_size=100, n_positions=32, attn_pdrop=0.1)
    model = transformers.GPT2LMHeadModel(cfg).train()
    report = fastcore.patch(model)
    model(torch.randint(0, 100, (1, 8)))
    assert report["attention_fallbacks"] == {"dropout": 1}
    model.eval()(torch.randint(0, 100, (1, 8)))
    assert report["attention_fallbacks"] == {"dropout": 1}           # no dropout in eval: fastcore again


# ---- the optimizer with Hugging Face --------------------------------------------------------------

def _hf_trainer_run(tmp_path, make_opt):
    torch.manual_seed(0)
    model = gpt2(1)
    fastcore.patch(model)
    data = [{"input_ids": torch.randint(0, 100, (16,), generator=torch.Generator().manual_seed(i))} for i in range(8)]
    for d in data:
        d["labels"] = d["input_ids"]
    args = transformers.TrainingArguments(output_dir=str(tmp_path), max_steps=4, per_device_train_batch_size=2,
                                          learning_rate=1e-3, lr_scheduler_type="constant", report_to=[],
                                          use_cpu=True, save_strategy="no", logging_strategy="no", seed=0)
    opt = make_opt(model.parameters())
    transformers.Trainer(model=model, args=args, train_dataset=data, optimizers=(opt, None)).train()
    return without_key_bias({n: p.detach().clone() for n, p in model.named_parameters()}, "attn.c_attn.bias")


@hf
def test_fused_adamw_in_the_hf_trainer(tmp_path):
    ours = _hf_trainer_run(tmp_path / "a", lambda ps: FusedAdamW(ps, lr=1e-3, weight_decay=0.01))
    torchs = _hf_trainer_run(tmp_path / "b", lambda ps: torch.optim.AdamW(ps, lr=1e-3, weight_decay=0.01))
    for name in ours:
        assert_close(ours[name], torchs[name], torch.float32, name)


@hf
def test_fused_adamw_in_a_plain_loop_on_a_patched_model():
    torch.manual_seed(0)
    a = llama(1)
    b = copy.deepcopy(a)
    fastcore.patch(a)
    oa, ob = FusedAdamW(a.parameters(), lr=1e-3), torch.optim.AdamW(b.parameters(), lr=1e-3)
    for step in range(5):
        x = torch.randint(0, 100, (2, 16), generator=torch.Generator().manual_seed(step))
        for model, opt in ((a, oa), (b, ob)):
            model(x, labels=x).loss.backward()
            opt.step()
            opt.zero_grad()
    for (name, p), q in zip(a.named_parameters(), b.parameters()):
        assert_close(p, q, torch.float32, name)


@hf
@pytest.mark.gpu
@pytest.mark.skipif(not HAS_GPU, reason="needs a CUDA GPU")
@pytest.mark.parametrize("make", [gpt2, llama])
def test_gpu_bf16_training_curves_agree(make):
    torch.manual_seed(0)
    a = make(4).cuda().to(torch.bfloat16)
    b = copy.deepcopy(a)
    report = fastcore.patch(a)
    oa, ob = FusedAdamW(a.parameters(), lr=1e-3), torch.optim.AdamW(b.parameters(), lr=1e-3, fused=True)
    curves = ([], [])
    for step in range(20):
        x = torch.randint(0, 100, (8, 64), device="cuda", generator=torch.Generator("cuda").manual_seed(step))
        for curve, model, opt in zip(curves, (a, b), (oa, ob)):
            loss = model(x, labels=x).loss
            loss.backward()
            opt.step()
            opt.zero_grad()
            curve.append(loss.item())
    assert not report["attention_fallbacks"]
    for la, lb in zip(*curves):
        assert abs(la - lb) <= TOLERANCE[torch.bfloat16] * abs(lb), curves
    assert curves[0][-1] < curves[0][0]


@hf
def test_eager_models_keep_their_attention():
    """fastcore takes over only from SDPA: eager (chosen, or needed for softcap/dropout quirks) stays."""
    torch.manual_seed(0)
    model = gpt2(attn_implementation="eager")
    original = copy.deepcopy(model)
    report = fastcore.patch(model)
    assert report["attention"] == 0 and model.config._attn_implementation == "eager"
    assert "GPT2LMHeadModel runs attention ['eager']" in report["notes"][0]
    assert report["layer_norm"] == 5
    x = torch.randint(0, 100, (2, 12))
    mask = torch.ones(2, 12, dtype=torch.long)
    mask[0, :3] = 0
    with torch.no_grad():
        assert_close(model(x, attention_mask=mask).logits, original(x, attention_mask=mask).logits, torch.float32)


@hf
@pytest.mark.parametrize("arch", ["Mistral", "Qwen2"])
def test_mistral_and_qwen2(arch, calls):
    cfg = getattr(transformers, f"{arch}Config")(num_hidden_layers=2, hidden_size=64, intermediate_size=128,
                                                num_attention_heads=4, num_key_value_heads=2, vocab_size=100,
                                                max_position_embeddings=64, bos_token_id=0, eos_token_id=0)
    torch.manual_seed(0)
    model = getattr(transformers, f"{arch}ForCausalLM")(cfg)
    original = copy.deepcopy(model)
    report = fastcore.patch(model)
    assert report["rms_norm"] == 5 and report["attention"] == 2
    assert_same_training(model, original, torch.randint(0, 100, (2, 20)))
    assert len(calls) == 2 and not report["attention_fallbacks"]


@hf
def test_a_sliding_window_shorter_than_the_keys_falls_back():
    cfg = transformers.MistralConfig(num_hidden_layers=1, hidden_size=64, intermediate_size=128, num_attention_heads=4,
                                     num_key_value_heads=2, vocab_size=100, sliding_window=8, bos_token_id=0,
                                     eos_token_id=0)
    torch.manual_seed(0)
    model = transformers.MistralForCausalLM(cfg)
    original = copy.deepcopy(model)
    report = fastcore.patch(model)
    x = torch.randint(0, 100, (2, 20))
    with torch.no_grad():
        assert_close(model(x).logits, original(x).logits, torch.float32)
    assert report["attention_fallbacks"] == {"attention_mask": 1}     # SDPA's rules make the window a mask


@hf
def test_a_wrapped_model_and_a_shared_config(calls):
    torch.manual_seed(0)
    inner = llama()
    twin = llama()
    twin.config = inner.config                                     # two models, one config object
    for m in twin.modules():
        if hasattr(m, "config"):
            m.config = inner.config
    wrapper = nn.ModuleDict({"lm": inner})
    report = fastcore.patch(wrapper)
    assert report["attention"] == 2 and report["rms_norm"] == 5
    x = torch.randint(0, 100, (1, 8))
    inner(x)
    assert len(calls) == 2
    assert twin.config._attn_implementation == "fastcore"         # the shared config routes it too
    assert fastcore.unpatch(wrapper) == {"rms_norm": 5, "attention": 2}
    assert inner.config._attn_implementation == twin.config._attn_implementation == "sdpa"


@hf
def test_padded_generation_matches_and_counts_fallbacks():
    torch.manual_seed(0)
    model = llama().eval()
    original = copy.deepcopy(model)
    report = fastcore.patch(model)
    x = torch.randint(1, 100, (2, 6))
    mask = torch.ones_like(x)
    mask[1, :2] = 0
    kw = dict(attention_mask=mask, max_new_tokens=5, do_sample=False, pad_token_id=0)
    assert torch.equal(model.generate(x, **kw), original.generate(x, **kw))
    assert report["attention_fallbacks"]["attention_mask"] >= 2 * 5


@hf
def test_save_and_load_a_patched_model(tmp_path):
    torch.manual_seed(0)
    model = llama()
    fastcore.patch(model)
    torch.save(model, tmp_path / "m.pt")
    loaded = torch.load(tmp_path / "m.pt", weights_only=False)
    assert type(loaded.model.norm).__name__ == "FastcoreLlamaRMSNorm"
    x = torch.randint(0, 100, (1, 8))
    with torch.no_grad():
        assert torch.equal(loaded(x).logits, model(x).logits)
    assert fastcore.unpatch(loaded)["rms_norm"] == 5
    assert type(loaded.model.norm).__name__ == "LlamaRMSNorm"


def test_unpatch_rejects_a_non_module():
    with pytest.raises(TypeError, match="unpatch: model must be a torch.nn.Module"):
        fastcore.unpatch("model")


def test_a_backend_that_cannot_run_an_op_is_refused():
    with pytest.raises(ValueError, match="patch: layer_norm: backend 'cuda' cannot run here"):
        fastcore.patch(Plain(), backend="cuda")


def test_a_backend_is_checked_only_for_the_kinds_the_model_has():
    # No Hugging Face attention to patch: the attention backend is not asked for ('cuda' has none yet).
    model = nn.Sequential(nn.Linear(8, 8), nn.LayerNorm(8))
    report = fastcore.patch(model, backend="cuda", layer_norm=False, rms_norm=False)
    assert (report["layer_norm"], report["attention"], report["backend"]) == (0, 0, "cuda")


@pytest.mark.parametrize("copy_how", ["deepcopy", "save and load"])
def test_a_copy_of_a_patched_model_reports_what_it_runs(tmp_path, copy_how):
    torch.manual_seed(0)
    model = llama()
    fastcore.patch(model, backend="reference")
    if copy_how == "deepcopy":
        other = copy.deepcopy(model)
    else:
        torch.save(model, tmp_path / "m.pt")
        other = torch.load(tmp_path / "m.pt", weights_only=False)
    with pytest.raises(ValueError, match="already patched with backend='reference'"):
        fastcore.patch(other, backend="auto")  # its norms would keep 'reference'
    report = fastcore.patch(other, backend="reference")
    assert (report["rms_norm"], report["attention"], report["backend"]) == (5, 2, "reference")


def test_value_heads_narrower_than_query_heads_fall_back_to_sdpa(calls):
    cfg = transformers.DeepseekV3Config(
        num_hidden_layers=2, hidden_size=64, intermediate_size=128, moe_intermediate_size=32, num_attention_heads=4,
        num_key_value_heads=4, q_lora_rank=None, kv_lora_rank=32, qk_nope_head_dim=48, qk_rope_head_dim=16,
        v_head_dim=32, n_routed_experts=4, num_experts_per_tok=2, n_group=1, topk_group=1, first_k_dense_replace=1,
        vocab_size=100, max_position_embeddings=64)
    torch.manual_seed(0)
    model = transformers.DeepseekV3ForCausalLM(cfg).eval()
    x = torch.randint(1, 100, (2, 12))
    with torch.no_grad():
        want = model(x).logits
        report = fastcore.patch(model)
        got = model(x).logits
    assert_close(got, want, torch.float32)
    assert report["attention_fallbacks"]["head_dim"] == 2 and not calls


def test_fullgraph_compile_of_a_patched_model_at_several_lengths(calls):
    torch.manual_seed(0)
    model = llama(layers=1)
    fastcore.patch(model)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")  # lengths become dynamic on the second
    for t in (12, 10, 9):
        x = torch.randint(1, 100, (2, t))
        with torch.no_grad():
            assert_close(compiled(x).logits, model(x).logits, torch.float32)
