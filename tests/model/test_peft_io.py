"""PEFT's adapter format both ways, with PEFT itself as the reference: an adapter saved by temper and
loaded by `PeftModel.from_pretrained` onto temper's Hugging Face export gives temper's logits, and an
adapter made by `get_peft_model(...).save_pretrained` and read by `load_peft` gives PEFT's (fp32,
1e-4), for six architectures (fused GPT-2 c_attn and Phi-3 qkv/gate_up included), plain LoRA,
rsLoRA and DoRA; bad adapter files fail naming the key."""

import json
from dataclasses import replace

import pytest
import torch
from safetensors.torch import load_file, save_file

from temper.model.config import PRESETS
from temper.model.convert import save_hf
from temper.model.lora import ALL_LINEAR_TARGETS, LoRALinear, apply_lora
from temper.model.peft_io import load_peft, save_peft
from temper.model.transformer import Transformer

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

_LLAMA = replace(PRESETS["debug-llama"], vocab_size=101, tie_embeddings=False)  # GQA: 4 query, 2 kv heads
CONFIGS = {
    "llama": replace(_LLAMA, hf_architecture="LlamaForCausalLM"),
    "qwen2": replace(_LLAMA, qkv_bias=True, hf_architecture="Qwen2ForCausalLM"),  # q/k/v biases
    "gemma": replace(_LLAMA, mlp="geglu", norm_unit_offset=True, scale_embeddings=True, tie_embeddings=True,
                     head_size=32, n_kv_heads=1, hf_architecture="GemmaForCausalLM"),  # tied: no head adapter
    "mistral": replace(_LLAMA, sliding_window=8, hf_architecture="MistralForCausalLM"),
    "phi3": replace(_LLAMA, sliding_window=8, hf_architecture="Phi3ForCausalLM"),  # fused qkv_proj, gate_up_proj
    "gpt2": replace(PRESETS["debug"], vocab_size=97, tie_embeddings=False, hf_architecture="GPT2LMHeadModel"),
}
HF_TARGETS = {  # PEFT's target_modules for every linear layer of each architecture
    "gpt2": ["c_attn", "c_proj", "c_fc"],
    "phi3": ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"],
}
VARIANTS = {"plain": {}, "rslora": {"rslora": True}, "dora": {"dora": True}}


def _model(case: str) -> Transformer:
    torch.manual_seed(0)
    model = Transformer(CONFIGS[case]).eval()
    with torch.no_grad():  # large random weights everywhere, so no mismatch hides behind init
        for p in model.parameters():
            p.normal_(0.0, 0.2)
    return model


def _hf(model: Transformer, tmp_path):
    """The transformers model of temper's export of `model` (before any adapter)."""
    return transformers.AutoModelForCausalLM.from_pretrained(save_hf(model, model.cfg, tmp_path / "base")).eval()


def _targets(case: str) -> tuple[str, ...]:
    linears = tuple(t for t in ALL_LINEAR_TARGETS if case != "gpt2" or t != "gate_proj")
    return linears + (() if CONFIGS[case].tie_embeddings else ("head",))


def _randomize_adapters(params) -> None:
    """A trained-looking update: A and B random, DoRA's magnitude moved off ||W||."""
    torch.manual_seed(1)
    with torch.no_grad():
        for name, p in params:
            if "magnitude" in name:
                p.mul_(1 + 0.2 * torch.randn_like(p))
            else:
                p.normal_(0.0, 0.1)


def _x(model: Transformer) -> torch.Tensor:
    torch.manual_seed(2)
    return torch.randint(0, model.cfg.vocab_size, (2, 24))  # longer than the sliding windows


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("case", CONFIGS)
def test_save_peft_loads_in_peft_with_the_same_logits(tmp_path, case, variant):
    model = _model(case)
    hf = _hf(model, tmp_path)
    apply_lora(model, rank=4, alpha=8, targets=_targets(case), **VARIANTS[variant])
    _randomize_adapters((n, p) for n, p in model.named_parameters() if p.requires_grad)
    out = save_peft(model, model.cfg, tmp_path / "adapter", base_model_name_or_path="org/tiny")
    config = json.loads((out / "adapter_config.json").read_text())
    fused = case in ("gpt2", "phi3")  # q, k, v stacked in one adapter of rank 3 * 4
    assert config["r"] == (12 if fused else 4) and config["use_dora"] == (variant == "dora")
    theirs = peft.PeftModel.from_pretrained(hf, out).eval()
    x = _x(model)
    with torch.no_grad():
        ours = model(x)
        torch.testing.assert_close(theirs(x).logits, ours, rtol=0, atol=1e-4)
        with theirs.disable_adapter():
            assert (ours - theirs(x).logits).abs().max() > 0.1  # ... and the adapter matters
        back = _model(case)  # and temper reads its own file back
        load_peft(back, back.cfg, out)
        torch.testing.assert_close(back(x), ours, rtol=0, atol=1e-5)


@pytest.mark.parametrize("case, targets", [
    ("phi3", ("q_proj", "v_proj", "up_proj")),  # parts of fused layers: zero blocks and g = 1 for k and gate
    ("gpt2", ("k_proj", "o_proj")),  # part of c_attn, and attn.c_proj but not mlp.c_proj
])
def test_save_peft_of_some_parts_of_fused_layers(tmp_path, case, targets):
    model = _model(case)
    hf = _hf(model, tmp_path)
    apply_lora(model, rank=2, alpha=3, targets=targets, dora=True)
    _randomize_adapters((n, p) for n, p in model.named_parameters() if p.requires_grad)
    out = save_peft(model, model.cfg, tmp_path / "adapter")
    theirs = peft.PeftModel.from_pretrained(hf, out).eval()
    x = _x(model)
    with torch.no_grad():
        torch.testing.assert_close(theirs(x).logits, model(x), rtol=0, atol=1e-4)
    if case == "gpt2":
        assert json.loads((out / "adapter_config.json").read_text())["target_modules"] == ["attn.c_attn",
                                                                                         "attn.c_proj"]


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("case", CONFIGS)
def test_load_peft_reads_what_peft_saves(tmp_path, case, variant):
    model = _model(case)
    hf = _hf(model, tmp_path)
    targets = HF_TARGETS.get(case, ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    config = peft.LoraConfig(
        r=4, lora_alpha=8, lora_dropout=0.1, target_modules=targets + ([] if model.cfg.tie_embeddings else ["lm_head"]),
        use_rslora=variant == "rslora", use_dora=variant == "dora", fan_in_fan_out=case == "gpt2")
    theirs = peft.get_peft_model(hf, config)
    _randomize_adapters((n, p) for n, p in theirs.named_parameters() if p.requires_grad)
    theirs.save_pretrained(tmp_path / "adapter")
    swapped = load_peft(model, model.cfg, tmp_path / "adapter")
    assert len(swapped) == len(_targets(case)) * 2 - (not model.cfg.tie_embeddings)  # every layer, head once
    assert all(isinstance(model.get_submodule(n), LoRALinear) for n in swapped)
    x = _x(model)
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(x), theirs.eval()(x).logits, rtol=0, atol=1e-4)


def _adapter(tmp_path):
    """A Llama model and a PEFT adapter for it (q and v), saved by temper."""
    model = _model("llama")
    apply_lora(model, rank=2, alpha=4, targets=("q_proj", "v_proj"))
    out = save_peft(model, model.cfg, tmp_path / "adapter")
    return out, load_file(out / "adapter_model.safetensors"), json.loads((out / "adapter_config.json").read_text())


def test_bad_adapters_fail_naming_the_key(tmp_path):
    out, tensors, config = _adapter(tmp_path)
    weights, config_path = out / "adapter_model.safetensors", out / "adapter_config.json"
    key = "base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight"

    def fails(match: str) -> None:
        model = _model("llama")
        with pytest.raises((ValueError, FileNotFoundError), match=match):
            load_peft(model, model.cfg, out)
        assert not any(isinstance(m, LoRALinear) for m in model.modules())  # the model is left as it was
        save_file(tensors, weights)
        config_path.write_text(json.dumps(config))

    config_path.write_text(json.dumps(config | {"peft_type": "IA3"}))
    fails("peft_type 'IA3' is not supported")
    config_path.write_text(json.dumps(config | {"rank_pattern": {"q_proj": 8}}))
    fails("rank_pattern")
    save_file(tensors | {key: torch.zeros(32, 3)}, weights)
    fails(rf"{key} has shape \[32, 3\], expected \[32, 2\]")
    save_file({k: v for k, v in tensors.items() if k != key}, weights)
    fails(f"missing tensor '{key}'")
    absent = "base_model.model.model.layers.2.self_attn.q_proj.lora_A.weight"  # the model has 2 layers
    save_file(tensors | {absent: torch.zeros(2, 64)}, weights)
    fails(f"'{absent}' adapts 'model.layers.2.self_attn.q_proj', which is not a linear layer of this "
          "LlamaForCausalLM model")
    embedding = "base_model.model.model.embed_tokens.lora_embedding_A"
    save_file(tensors | {embedding: torch.zeros(2, 101)}, weights)
    fails(f"unexpected tensor '{embedding}'")
    one_layer = {k: v for k, v in tensors.items() if "layers.1." not in k}
    save_file(one_layer, weights)
    fails(r"no adapter for \['model.layers.1.self_attn.q_proj'")
    weights.unlink()
    fails("adapter_model.safetensors: no such adapter weights file")


def test_save_peft_refuses_what_one_peft_config_cannot_hold(tmp_path):
    model = _model("llama")
    with pytest.raises(ValueError, match="no LoRA adapters"):
        save_peft(model, model.cfg, tmp_path)
    apply_lora(model, rank=2, alpha=4, targets=("q_proj",))
    apply_lora(model, rank=4, alpha=4, targets=("v_proj",))
    with pytest.raises(ValueError, match=r"one \(rank, alpha, rslora, dora, dropout\)"):
        save_peft(model, model.cfg, tmp_path)
