"""Hugging Face <-> temper: configs, state dicts, and checkpoint directories in the HF layout.

One function pair per family: GPT-2 (`GPT2LMHeadModel`: learned positions, LayerNorm, GELU) and
Llama (`LlamaForCausalLM`: RoPE, RMSNorm, SwiGLU, GQA). The family is chosen from config fields,
never from a model's name. Directories hold `config.json` + `model.safetensors` (or a sharded
safetensors index); pickled weights (`pytorch_model.bin`) are never read.

It does not touch tokenizers beyond copying `tokenizer.json`, and it does not need `transformers`
(only the tests import it, to prove that both directions give the same logits).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from temper.files import atomic_write_json, fsync_dir, safe_join
from temper.model.config import ModelConfig
from temper.model.transformer import Transformer

SUPPORTED_ARCHITECTURES = ("GPT2LMHeadModel", "LlamaForCausalLM")
_WRAPPER_PREFIXES = ("_orig_mod.", "module.", "_checkpoint_wrapped_module.")  # compile / DDP / checkpointing


def hf_family(cfg: ModelConfig) -> str:
    """"gpt2" or "llama": which Hugging Face architecture can express `cfg` exactly."""
    if cfg.pos == "learned" and cfg.norm == "layernorm" and cfg.mlp == "gelu" and cfg.kv_heads == cfg.n_heads:
        return "gpt2"
    if cfg.pos == "rope" and cfg.norm == "rmsnorm" and cfg.mlp == "swiglu":
        return "llama"
    raise ValueError(
        f"no Hugging Face architecture matches pos={cfg.pos!r}, norm={cfg.norm!r}, mlp={cfg.mlp!r}, "
        f"n_kv_heads={cfg.n_kv_heads}: GPT2LMHeadModel needs learned/layernorm/gelu without GQA, "
        "LlamaForCausalLM needs rope/rmsnorm/swiglu"
    )


# ---- configs ------------------------------------------------------------------------------------


def to_hf_config(cfg: ModelConfig) -> dict[str, Any]:
    """A `config.json` that `transformers.AutoConfig` reads as GPT2LMHeadModel or LlamaForCausalLM."""
    if hf_family(cfg) == "gpt2":
        return {
            "architectures": ["GPT2LMHeadModel"], "model_type": "gpt2",
            "vocab_size": cfg.vocab_size, "n_positions": cfg.max_seq_len, "n_embd": cfg.dim,
            "n_layer": cfg.n_layers, "n_head": cfg.n_heads, "n_inner": cfg.hidden_dim,
            "activation_function": "gelu_new",  # the tanh approximation, as GPT-2 was trained
            "layer_norm_epsilon": cfg.norm_eps, "initializer_range": cfg.init_std,
            "resid_pdrop": cfg.dropout, "embd_pdrop": cfg.dropout, "attn_pdrop": cfg.dropout,
            "scale_attn_weights": True, "scale_attn_by_inverse_layer_idx": False,
            "reorder_and_upcast_attn": False, "tie_word_embeddings": cfg.tie_embeddings,
            "bos_token_id": None, "eos_token_id": None, "use_cache": True,
        }
    return {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "vocab_size": cfg.vocab_size, "hidden_size": cfg.dim, "intermediate_size": cfg.hidden_dim,
        "num_hidden_layers": cfg.n_layers, "num_attention_heads": cfg.n_heads,
        "num_key_value_heads": cfg.kv_heads, "head_dim": cfg.head_dim, "hidden_act": "silu",
        "max_position_embeddings": cfg.max_seq_len, "rms_norm_eps": cfg.norm_eps,
        # The rope_theta / rope_scaling spelling of Meta's published configs: transformers 4.x reads
        # it as is and 5.x converts it to `rope_parameters`.
        "rope_theta": cfg.rope_theta, "rope_scaling": dict(cfg.rope_scaling) if cfg.rope_scaling else None,
        "attention_bias": cfg.bias, "mlp_bias": cfg.bias, "attention_dropout": cfg.dropout,
        "initializer_range": cfg.init_std, "tie_word_embeddings": cfg.tie_embeddings,
        "pretraining_tp": 1, "bos_token_id": None, "eos_token_id": None, "use_cache": True,
    }


def _architecture(d: dict[str, Any]) -> str:
    archs = d.get("architectures") or []
    if archs:
        return archs[0]
    return {"gpt2": "GPT2LMHeadModel", "llama": "LlamaForCausalLM"}.get(d.get("model_type", ""), "<none given>")


def from_hf_config(d: dict[str, Any]) -> ModelConfig:
    """The ModelConfig of a Hugging Face `config.json`; anything temper cannot reproduce exactly fails."""
    arch = _architecture(d)
    if arch == "GPT2LMHeadModel":
        act = d.get("activation_function", "gelu_new")
        if act not in ("gelu_new", "gelu_pytorch_tanh"):
            raise ValueError(f"GPT-2 activation_function {act!r} is not supported (temper uses tanh GELU)")
        if d.get("scale_attn_by_inverse_layer_idx") or not d.get("scale_attn_weights", True):
            raise ValueError("GPT-2 configs with non-standard attention scaling are not supported")
        n_embd = d.get("n_embd", 768)
        return ModelConfig(
            vocab_size=d.get("vocab_size", 50257), dim=n_embd, n_layers=d.get("n_layer", 12),
            n_heads=d.get("n_head", 12), ffn_dim=d.get("n_inner") or 4 * n_embd,
            max_seq_len=d.get("n_positions", 1024), mlp="gelu", norm="layernorm",
            norm_eps=d.get("layer_norm_epsilon", 1e-5), pos="learned", bias=True,
            tie_embeddings=d.get("tie_word_embeddings", True), dropout=0.0,
            init_std=d.get("initializer_range", 0.02),
        )
    if arch == "LlamaForCausalLM":
        if d.get("hidden_act", "silu") != "silu":
            raise ValueError(f"Llama hidden_act {d['hidden_act']!r} is not supported (temper uses SwiGLU)")
        dim, n_heads = d["hidden_size"], d["num_attention_heads"]
        if d.get("head_dim") not in (None, dim // n_heads):
            raise ValueError(f"head_dim={d['head_dim']} != hidden_size/num_attention_heads is not supported")
        attention_bias, mlp_bias = bool(d.get("attention_bias", False)), bool(d.get("mlp_bias", False))
        if attention_bias != mlp_bias:
            raise ValueError("attention_bias and mlp_bias must agree (temper's `bias` covers both)")
        rope = dict(d.get("rope_scaling") or d.get("rope_parameters") or {})  # 4.x / 5.x spellings
        theta = d.get("rope_theta") or rope.get("rope_theta") or 10000.0
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type == "llama3":
            scaling = {"rope_type": "llama3", **{k: rope[k] for k in
                       ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")}}
        elif rope_type in (None, "default"):
            scaling = None
        else:
            raise ValueError(f"rope type {rope_type!r} is not supported (temper reads default and llama3)")
        return ModelConfig(
            vocab_size=d["vocab_size"], dim=dim, n_layers=d["num_hidden_layers"], n_heads=n_heads,
            n_kv_heads=d.get("num_key_value_heads") or n_heads, ffn_dim=d["intermediate_size"],
            max_seq_len=d.get("max_position_embeddings", 2048), mlp="swiglu", norm="rmsnorm",
            norm_eps=d.get("rms_norm_eps", 1e-6), pos="rope", rope_theta=float(theta), rope_scaling=scaling,
            bias=attention_bias, tie_embeddings=d.get("tie_word_embeddings", False), dropout=0.0,
            init_std=d.get("initializer_range", 0.02),
        )
    raise ValueError(f"unsupported architecture {arch!r}; temper reads {', '.join(SUPPORTED_ARCHITECTURES)}")


# ---- state dicts --------------------------------------------------------------------------------


def _check_keys(got: dict[str, torch.Tensor], expected: set[str], what: str) -> None:
    missing, unexpected = sorted(expected - got.keys()), sorted(got.keys() - expected)
    if missing or unexpected:
        raise KeyError(f"{what}: missing {missing[:8]}{'...' if len(missing) > 8 else ''}, "
                       f"unexpected {unexpected[:8]}{'...' if len(unexpected) > 8 else ''}")


def _native_keys(cfg: ModelConfig) -> set[str]:
    with torch.device("meta"):
        return set(Transformer(cfg).state_dict().keys())


def gpt2_to_hf(cfg: ModelConfig, sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """temper -> GPT2LMHeadModel. HF GPT-2 uses Conv1D, whose weights are (in, out): transposed.

    A temper model without biases gets zero biases, which GPT-2 always has (the same function).
    """
    C = cfg.dim

    def b(key: str, n: int) -> torch.Tensor:
        ref = sd["tok_emb.weight"]
        return sd[key] if key in sd else torch.zeros(n, dtype=ref.dtype, device=ref.device)

    out = {"transformer.wte.weight": sd["tok_emb.weight"], "transformer.wpe.weight": sd["pos_emb.weight"],
           "transformer.ln_f.weight": sd["norm.weight"], "transformer.ln_f.bias": b("norm.bias", C)}
    for i in range(cfg.n_layers):
        p, h = f"layers.{i}.", f"transformer.h.{i}."
        qkv = torch.cat([sd[p + f"attn.{n}_proj.weight"] for n in "qkv"])  # (3C, C)
        out |= {
            h + "ln_1.weight": sd[p + "attn_norm.weight"], h + "ln_1.bias": b(p + "attn_norm.bias", C),
            h + "attn.c_attn.weight": qkv.t(),
            h + "attn.c_attn.bias": torch.cat([b(p + f"attn.{n}_proj.bias", C) for n in "qkv"]),
            h + "attn.c_proj.weight": sd[p + "attn.o_proj.weight"].t(), h + "attn.c_proj.bias": b(p + "attn.o_proj.bias", C),
            h + "ln_2.weight": sd[p + "mlp_norm.weight"], h + "ln_2.bias": b(p + "mlp_norm.bias", C),
            h + "mlp.c_fc.weight": sd[p + "mlp.up_proj.weight"].t(), h + "mlp.c_fc.bias": b(p + "mlp.up_proj.bias", cfg.hidden_dim),
            h + "mlp.c_proj.weight": sd[p + "mlp.down_proj.weight"].t(), h + "mlp.c_proj.bias": b(p + "mlp.down_proj.bias", C),
        }
    if not cfg.tie_embeddings:
        out["lm_head.weight"] = sd["head.weight"]
    return out


def gpt2_from_hf(cfg: ModelConfig, sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """GPT2LMHeadModel (or bare GPT2Model) -> temper; splits c_attn into q, k, v and un-transposes Conv1D."""
    sd = {k.removeprefix("transformer."): v for k, v in sd.items()
          if not k.endswith((".attn.bias", ".attn.masked_bias"))}  # causal-mask buffers of old checkpoints
    C = cfg.dim
    out = {"tok_emb.weight": sd.pop("wte.weight"), "pos_emb.weight": sd.pop("wpe.weight"),
           "norm.weight": sd.pop("ln_f.weight"), "norm.bias": sd.pop("ln_f.bias")}
    for i in range(cfg.n_layers):
        p, h = f"layers.{i}.", f"h.{i}."
        qkv_w, qkv_b = sd.pop(h + "attn.c_attn.weight").t(), sd.pop(h + "attn.c_attn.bias")  # (3C, C), (3C,)
        for j, n in enumerate("qkv"):
            out[p + f"attn.{n}_proj.weight"] = qkv_w[j * C : (j + 1) * C]
            out[p + f"attn.{n}_proj.bias"] = qkv_b[j * C : (j + 1) * C]
        out |= {
            p + "attn_norm.weight": sd.pop(h + "ln_1.weight"), p + "attn_norm.bias": sd.pop(h + "ln_1.bias"),
            p + "attn.o_proj.weight": sd.pop(h + "attn.c_proj.weight").t(), p + "attn.o_proj.bias": sd.pop(h + "attn.c_proj.bias"),
            p + "mlp_norm.weight": sd.pop(h + "ln_2.weight"), p + "mlp_norm.bias": sd.pop(h + "ln_2.bias"),
            p + "mlp.up_proj.weight": sd.pop(h + "mlp.c_fc.weight").t(), p + "mlp.up_proj.bias": sd.pop(h + "mlp.c_fc.bias"),
            p + "mlp.down_proj.weight": sd.pop(h + "mlp.c_proj.weight").t(), p + "mlp.down_proj.bias": sd.pop(h + "mlp.c_proj.bias"),
        }
    head = sd.pop("lm_head.weight", None)
    if not cfg.tie_embeddings:
        if head is None:
            raise KeyError("untied GPT-2 checkpoint without lm_head.weight")
        out["head.weight"] = head
    if sd:
        raise KeyError(f"unexpected GPT-2 weights: {sorted(sd)[:8]}")
    return out


_LLAMA_LAYER = {  # temper name -> HF name, inside layer i
    "attn_norm.weight": "input_layernorm.weight", "mlp_norm.weight": "post_attention_layernorm.weight",
    **{f"attn.{n}_proj.{t}": f"self_attn.{n}_proj.{t}" for n in "qkvo" for t in ("weight", "bias")},
    **{f"mlp.{n}_proj.{t}": f"mlp.{n}_proj.{t}" for n in ("gate", "up", "down") for t in ("weight", "bias")},
}


def _llama_names(cfg: ModelConfig) -> dict[str, str]:
    names = {"tok_emb.weight": "model.embed_tokens.weight", "norm.weight": "model.norm.weight",
             "head.weight": "lm_head.weight"}
    for i in range(cfg.n_layers):
        names |= {f"layers.{i}.{k}": f"model.layers.{i}.{v}" for k, v in _LLAMA_LAYER.items()}
    return names


def llama_to_hf(cfg: ModelConfig, sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """temper -> LlamaForCausalLM: a renaming (temper uses HF's half-split RoPE layout, so no permutation)."""
    names = _llama_names(cfg)
    return {names[k]: v for k, v in sd.items()}


def llama_from_hf(cfg: ModelConfig, sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """LlamaForCausalLM -> temper; a tied checkpoint's lm_head.weight (if saved) is dropped."""
    back = {v: k for k, v in _llama_names(cfg).items()}
    out = {}
    for k, v in sd.items():
        if k.endswith("rotary_emb.inv_freq") or (k == "lm_head.weight" and cfg.tie_embeddings):
            continue  # a recomputed buffer, or the tied head that is tok_emb
        if k not in back:
            raise KeyError(f"unexpected Llama weight {k!r}")
        out[back[k]] = v
    return out


def to_hf_state_dict(cfg: ModelConfig, sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """temper state dict -> Hugging Face names and layouts (contiguous, ready for safetensors)."""
    sd = _strip_wrappers(sd)
    _check_keys(sd, _native_keys(cfg), "temper state dict")
    out = gpt2_to_hf(cfg, sd) if hf_family(cfg) == "gpt2" else llama_to_hf(cfg, sd)
    return {k: v.detach().contiguous() for k, v in out.items()}


def from_hf_state_dict(cfg: ModelConfig, sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Hugging Face state dict -> temper names and layouts (contiguous, so `assign=True` loads are fast)."""
    out = gpt2_from_hf(cfg, sd) if hf_family(cfg) == "gpt2" else llama_from_hf(cfg, sd)
    _check_keys(out, _native_keys(cfg), "Hugging Face checkpoint")
    return {k: v.contiguous() for k, v in out.items()}


def _strip_wrappers(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = {}
    for k, v in sd.items():
        for prefix in _WRAPPER_PREFIXES:
            k = k.replace(prefix, "")
        out[k] = v
    return out


# ---- directories --------------------------------------------------------------------------------


def save_hf(
    model_or_state: nn.Module | dict[str, torch.Tensor], cfg: ModelConfig, out_dir: str | Path, *,
    tokenizer_json: str | Path | None = None, generation_config: dict[str, Any] | None = None,
) -> Path:
    """Write `config.json`, `model.safetensors`, `generation_config.json` (and `tokenizer.json`) to out_dir.

    generation_config's bos/eos/pad token ids are also written into config.json, where some
    readers look for them. Every file is written to a temporary name and renamed into place.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    sd = model_or_state.state_dict() if isinstance(model_or_state, nn.Module) else model_or_state
    tensors = {k: v.cpu() for k, v in to_hf_state_dict(cfg, sd).items()}
    weights = safe_join(out_dir, "model.safetensors")
    tmp = weights.with_name(".model.safetensors.tmp")
    save_file(tensors, str(tmp), metadata={"format": "pt"})  # "format" is required by transformers
    os.replace(tmp, weights)
    fsync_dir(out_dir)
    gen = dict(generation_config or {})
    hf_cfg = to_hf_config(cfg)
    hf_cfg |= {k: gen[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id") if k in gen}
    hf_cfg["torch_dtype"] = str(next(iter(tensors.values())).dtype).removeprefix("torch.")
    atomic_write_json(safe_join(out_dir, "config.json"), hf_cfg)
    atomic_write_json(safe_join(out_dir, "generation_config.json"), gen)
    if tokenizer_json is not None:
        target = safe_join(out_dir, "tokenizer.json")
        if Path(tokenizer_json).resolve() != target:
            tmp_tok = target.with_name(".tokenizer.json.tmp")
            shutil.copyfile(tokenizer_json, tmp_tok)
            os.replace(tmp_tok, target)
    return out_dir


def _weight_files(root: Path) -> list[Path]:
    single = safe_join(root, "model.safetensors")
    if single.is_file():
        return [single]
    index = safe_join(root, "model.safetensors.index.json")
    if index.is_file():
        names = sorted(set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values()))
        bad = [n for n in names if not n.endswith(".safetensors")]
        if bad:
            raise ValueError(f"{index}: weight_map names non-safetensors files {bad[:3]}")
        return [safe_join(root, n) for n in names]  # safe_join refuses '../' and absolute names
    found = sorted(p.name for p in root.iterdir()) if root.is_dir() else []
    raise FileNotFoundError(
        f"{root}: no model.safetensors or model.safetensors.index.json (found {found[:10]}); "
        "pickled weights (.bin, .pt) are never read: convert them to safetensors first"
    )


def load_hf(
    path: str | Path, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32
) -> tuple[Transformer, ModelConfig]:
    """Build a Transformer (in eval mode) from a Hugging Face directory of config.json + safetensors.

    The model is built on the meta device and the loaded tensors are assigned, so the weights are
    held in memory once.
    """
    root = Path(path)
    config_path = safe_join(root, "config.json")
    if not config_path.is_file():
        raise FileNotFoundError(f"{root}: no config.json")
    cfg = from_hf_config(json.loads(config_path.read_text(encoding="utf-8")))
    hf_sd: dict[str, torch.Tensor] = {}
    for f in _weight_files(root):
        hf_sd.update(load_file(str(f), device=str(device)))
    sd = {k: v.to(dtype) for k, v in from_hf_state_dict(cfg, hf_sd).items()}
    with torch.device("meta"):
        model = Transformer(cfg)
    model.load_state_dict(sd, strict=True, assign=True)
    model.init_buffers(device)
    return model.eval(), cfg
