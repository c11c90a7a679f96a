"""Hugging Face parity: HF model -> temper and temper -> HF directory give the same logits (fp32, 1e-5)."""

import json
from dataclasses import replace

import pytest
import torch

from temper.model.config import PRESETS, ModelConfig
from temper.model.convert import (
    from_hf_config,
    from_hf_state_dict,
    load_hf,
    save_hf,
    to_hf_config,
)
from temper.model.transformer import Transformer

transformers = pytest.importorskip("transformers")

LLAMA3_SCALING = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                  "original_max_position_embeddings": 16}  # short, so 40-token inputs use the scaled band


def _randomize(model: torch.nn.Module, std: float = 0.2) -> None:
    """Large random weights everywhere (biases and norms too), so no mismatch hides behind init."""
    torch.manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, std)


def _hf_gpt2(**over):
    cfg = transformers.GPT2Config(vocab_size=97, n_positions=64, n_embd=32, n_layer=2, n_head=4,
                                  bos_token_id=0, eos_token_id=0, **over)
    model = transformers.GPT2LMHeadModel(cfg).eval()
    _randomize(model)
    return model


def _hf_llama(**over):
    kw = dict(vocab_size=101, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=128, rms_norm_eps=1e-5, bos_token_id=0, eos_token_id=0)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**(kw | over))).eval()
    _randomize(model)
    return model


def _hf_to_temper(hf) -> Transformer:
    cfg = from_hf_config(hf.config.to_dict())
    model = Transformer(cfg).eval()
    model.load_state_dict(from_hf_state_dict(cfg, hf.state_dict()))
    return model


CASES = {
    "gpt2": lambda: _hf_gpt2(),
    "gpt2-untied": lambda: _hf_gpt2(tie_word_embeddings=False),
    # A copy: transformers writes rope_theta into the dict it is given.
    "llama-gqa-untied-llama3": lambda: _hf_llama(rope_theta=500000.0, rope_scaling=dict(LLAMA3_SCALING),
                                                 tie_word_embeddings=False),
    "llama-tied-bias": lambda: _hf_llama(num_key_value_heads=4, tie_word_embeddings=True,
                                         attention_bias=True, mlp_bias=True),
}


@pytest.mark.parametrize("case", CASES)
def test_hf_to_temper_logits(case):
    hf = CASES[case]()
    model = _hf_to_temper(hf)
    x = torch.randint(0, hf.config.vocab_size, (2, 40))
    with torch.no_grad():
        torch.testing.assert_close(model(x), hf(x).logits, rtol=0, atol=1e-5)


def test_llama3_scaling_is_exercised():
    """The llama3 case above would fail if the scaling were ignored (guards against a vacuous test)."""
    hf = CASES["llama-gqa-untied-llama3"]()
    model = _hf_to_temper(hf)
    unscaled = Transformer(replace(model.cfg, rope_scaling=None)).eval()
    unscaled.load_state_dict(model.state_dict())
    x = torch.randint(0, 101, (1, 40))
    with torch.no_grad():
        assert (unscaled(x) - hf(x).logits).abs().max() > 1e-3


@pytest.mark.parametrize("name", ["debug", "debug-llama"])
def test_temper_to_hf_directory_round_trip(tmp_path, name):
    cfg = replace(PRESETS[name], vocab_size=120, tie_embeddings=name == "debug")
    if name == "debug-llama":  # untied, GQA and llama3 scaling, written in the rope_scaling spelling
        cfg = replace(cfg, rope_theta=500000.0, rope_scaling=LLAMA3_SCALING)
    model = Transformer(cfg).eval()
    _randomize(model)
    tok = tmp_path / "tok.json"
    tok.write_text('{"fake": "tokenizer"}')
    out = save_hf(model, cfg, tmp_path / "hf", tokenizer_json=tok, generation_config={"eos_token_id": 3})
    assert sorted(p.name for p in out.iterdir()) == [
        "config.json", "generation_config.json", "model.safetensors", "tokenizer.json"]
    assert json.loads((out / "generation_config.json").read_text())["eos_token_id"] == 3
    hf = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    assert type(hf).__name__ == to_hf_config(cfg)["architectures"][0]
    x = torch.randint(0, 120, (2, 30))
    with torch.no_grad():
        ref = model(x)
        torch.testing.assert_close(hf(x).logits, ref, rtol=0, atol=1e-5)
        back, back_cfg = load_hf(out)
        assert back_cfg == replace(cfg, ffn_dim=cfg.hidden_dim)  # the default resolved, nothing else lost
        torch.testing.assert_close(back(x), ref, rtol=0, atol=0)


def test_gpt2_without_biases_exports_zero_biases(tmp_path):
    cfg = replace(PRESETS["debug"], vocab_size=50, bias=False)
    model = Transformer(cfg).eval()
    _randomize(model)
    hf = transformers.AutoModelForCausalLM.from_pretrained(save_hf(model, cfg, tmp_path)).eval()
    x = torch.randint(0, 50, (1, 16))
    with torch.no_grad():
        torch.testing.assert_close(hf(x).logits, model(x), rtol=0, atol=1e-5)


def test_unsupported_inputs_fail_clearly(tmp_path):
    with pytest.raises(ValueError, match="GPT2LMHeadModel, LlamaForCausalLM"):
        from_hf_config({"architectures": ["BertForMaskedLM"]})
    with pytest.raises(ValueError, match="rope type 'yarn'"):
        from_hf_config(to_hf_config(PRESETS["debug-llama"]) | {"rope_scaling": {"rope_type": "yarn", "factor": 2.0}})
    with pytest.raises(ValueError, match="no Hugging Face architecture"):
        to_hf_config(ModelConfig(pos="rope", norm="layernorm", mlp="gelu"))
    (tmp_path / "config.json").write_text(json.dumps(to_hf_config(PRESETS["debug"])))
    (tmp_path / "pytorch_model.bin").write_bytes(b"not read")
    with pytest.raises(FileNotFoundError, match="never read"):
        load_hf(tmp_path)


def test_sharded_index_refuses_escaping_names(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(to_hf_config(PRESETS["debug"])))
    (tmp_path / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {"transformer.wte.weight": "../../etc/passwd.safetensors"}}))
    with pytest.raises(ValueError, match="escapes"):
        load_hf(tmp_path)


def test_published_configs_map_to_presets():
    """config.json of meta-llama/Llama-3.2-1B and openai-community/gpt2, as published on the Hub."""
    llama = {
        "architectures": ["LlamaForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
        "bos_token_id": 128000, "eos_token_id": 128001, "head_dim": 64, "hidden_act": "silu",
        "hidden_size": 2048, "initializer_range": 0.02, "intermediate_size": 8192,
        "max_position_embeddings": 131072, "mlp_bias": False, "model_type": "llama", "num_attention_heads": 32,
        "num_hidden_layers": 16, "num_key_value_heads": 8, "pretraining_tp": 1, "rms_norm_eps": 1e-05,
        "rope_scaling": {"factor": 32.0, "high_freq_factor": 4.0, "low_freq_factor": 1.0,
                         "original_max_position_embeddings": 8192, "rope_type": "llama3"},
        "rope_theta": 500000.0, "tie_word_embeddings": True, "torch_dtype": "bfloat16", "use_cache": True,
        "vocab_size": 128256,
    }
    assert from_hf_config(llama) == PRESETS["llama-3.2-1b"]
    assert from_hf_config(to_hf_config(PRESETS["llama-3.2-1b"])) == PRESETS["llama-3.2-1b"]
    gpt2 = {"activation_function": "gelu_new", "architectures": ["GPT2LMHeadModel"], "n_ctx": 1024, "n_embd": 768,
            "n_head": 12, "n_layer": 12, "n_positions": 1024, "layer_norm_epsilon": 1e-05, "vocab_size": 50257,
            "model_type": "gpt2", "resid_pdrop": 0.1}
    assert from_hf_config(gpt2) == replace(PRESETS["gpt2-124m"], vocab_size=50257, ffn_dim=3072)
