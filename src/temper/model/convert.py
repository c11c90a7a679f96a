"""Hugging Face <-> temper: configs, weights, and checkpoint directories in the HF layout.

Twenty-six architectures: GPT-2 (`GPT2LMHeadModel`), Llama 2/3/3.1/3.2 (`LlamaForCausalLM`), Mistral
(`MistralForCausalLM`: a sliding window), Qwen2/2.5 (`Qwen2ForCausalLM`: q/k/v biases), Qwen3 (`Qwen3ForCausalLM`: q/k
norms, wide heads), Gemma (`GemmaForCausalLM`: GeGLU, (1 + w) RMSNorm, scaled embeddings, wide heads), Gemma 2
(`Gemma2ForCausalLM`: Gemma's parts, norms on the sublayers' outputs, windowed layers alternating with global ones,
capped attention scores and logits), Gemma 3's text model (`Gemma3ForCausalLM`: Gemma 2's parts without the caps, q/k
norms, windowed layers with their own RoPE base; also read out of the image-text `Gemma3ForConditionalGeneration`
checkpoints of the 4B, 12B and 27B, without their vision tower), Phi-3, Phi-3.5 and Phi-4-mini (`Phi3ForCausalLM`:
fused qkv and gate_up projections, LongRoPE, partial rotary), OLMo 2 (`Olmo2ForCausalLM`: norms on the sublayers'
outputs only, q/k norms over all heads at once), OLMo 3 (`Olmo3ForCausalLM`: OLMo 2's blocks, three windowed layers to
one global, YaRN on the global ones), Mixtral (`MixtralForCausalLM`: Mistral with a mixture of experts in every MLP),
Qwen3-MoE (`Qwen3MoeForCausalLM`: Qwen3 with one), GPT-OSS (`GptOssForCausalLM`: attention sinks, biases everywhere,
experts with clamped SwiGLU stored stacked, in MXFP4 as published), SmolLM3 (`SmolLM3ForCausalLM`: Llama with a layer
without positions, NoPE, after every three), GLM-4 (`Glm4ForCausalLM`: sandwich norms, half of each head rotated in
adjacent pairs), Granite (`GraniteForCausalLM`: Llama with multipliers of the embeddings, the sublayers' outputs, the
attention scores and the logits), Qwen2-MoE (`Qwen2MoeForCausalLM`: Qwen2's attention, 60 experts beside a gated
shared one), OLMoE (`OlmoeForCausalLM`: Llama's blocks, q/k norms over all heads, 64 experts), GLM-4.5
(`Glm4MoeForCausalLM`: DeepSeek-V3's routing, with sigmoid scores, a choice bias and groups of experts, beside a
shared expert, after dense first layers; half of each head rotated, in halves), DeepSeek-V3 (`DeepseekV3ForCausalLM`:
that routing behind multi-head latent attention, its rotated dims in adjacent pairs; R1 and Kimi K2 too; their
published FP8 weights are dequantized as they load), Seed-OSS
(`SeedOssForCausalLM`: Llama with q/k/v biases) and EXAONE 4 (`Exaone4ForCausalLM`: OLMo 2's post-norm blocks with
per-head q/k norms, three windowed layers with RoPE to one global without), Qwen3.5 (`Qwen3_5ForCausalLM`: three Gated
DeltaNet linear attention layers to one of gated attention with a quarter of each head rotated, (1 + w) norms) and
Qwen3.5-MoE (`Qwen3_5MoeForCausalLM`: with Qwen2-MoE's experts), also read out of their published image-text
`*ForConditionalGeneration` checkpoints without the vision tower, and Qwen3-Next (`Qwen3NextForCausalLM`: Qwen3.5-MoE's
layers, each linear layer's projections fused and grouped by key head). Reading a config maps its fields onto
`ModelConfig` fields; anything temper cannot reproduce exactly fails with the reason. The weights of each architecture
are described once, as a list of rules (HF tensor = these temper tensors concatenated, maybe transposed), which serve
both directions.

Loading builds the model on the meta device, allocates it once in the asked dtype and reads each
tensor straight into its parameter, so a model is never held twice. Directories hold
`config.json` + `model.safetensors` or shards with `model.safetensors.index.json`, named and their
symlinks followed by `temper.files.checkpoint_file` (so a `huggingface_hub` snapshot reads as it is,
and an index cannot name a file outside the directory); pickled `pytorch_model*.bin` files are read
only when asked, with `torch.load(weights_only=True)`. Every fault of the input is a CheckpointError
naming the file (and the key or tensor).

It does not read or write tokenizer files beyond copying `tokenizer.json` (data/tokenizer.py does),
and it does not need `transformers` (only the tests import it, to prove both directions).
"""

from __future__ import annotations

import json
import math
import mmap
import os
import shutil
import struct
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from temper.errors import InputError
from temper.files import (
    UnsafePath,
    atomic_write_json,
    check_remote_code,
    checkpoint_file,
    fsync_dir,
    read_json_object,
    safe_join,
    save_safetensors,
)
from temper.model.config import ROPE_OPTIONAL_KEYS, ModelConfig, last_of_every
from temper.model.transformer import Transformer

GPT2, LLAMA, MISTRAL, QWEN2, QWEN3, GEMMA, GEMMA2, GEMMA3, PHI3, OLMO2, OLMO3, MIXTRAL, QWEN3_MOE, GPT_OSS = (
    "GPT2LMHeadModel", "LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM",
    "GemmaForCausalLM", "Gemma2ForCausalLM", "Gemma3ForCausalLM", "Phi3ForCausalLM", "Olmo2ForCausalLM",
    "Olmo3ForCausalLM", "MixtralForCausalLM", "Qwen3MoeForCausalLM", "GptOssForCausalLM",
)
SMOLLM3, GRANITE, QWEN2_MOE, OLMOE, SEED_OSS, EXAONE4, GLM4, GLM4_MOE, DEEPSEEK_V3 = (
    "SmolLM3ForCausalLM", "GraniteForCausalLM", "Qwen2MoeForCausalLM", "OlmoeForCausalLM", "SeedOssForCausalLM",
    "Exaone4ForCausalLM", "Glm4ForCausalLM", "Glm4MoeForCausalLM", "DeepseekV3ForCausalLM")
QWEN3_5, QWEN3_5_MOE, QWEN3_NEXT = "Qwen3_5ForCausalLM", "Qwen3_5MoeForCausalLM", "Qwen3NextForCausalLM"
SUPPORTED_ARCHITECTURES = (GPT2, LLAMA, MISTRAL, QWEN2, QWEN3, GEMMA, GEMMA2, GEMMA3, PHI3, OLMO2, OLMO3, MIXTRAL,
                           QWEN3_MOE, GPT_OSS, SMOLLM3, GRANITE, QWEN2_MOE, OLMOE, SEED_OSS, EXAONE4, GLM4, GLM4_MOE,
                           DEEPSEEK_V3, QWEN3_5, QWEN3_5_MOE, QWEN3_NEXT)
HYBRID = (QWEN3_5, QWEN3_5_MOE, QWEN3_NEXT)  # Gated DeltaNet layers between gated attention ones, (1 + w) norms
SANDWICH = (GEMMA2, GEMMA3, GLM4)  # norms on the sublayers' inputs and outputs
GLM = (GLM4, GLM4_MOE)  # half of each head rotated (partial_rotary_factor), q/k/v biases (attention_bias)
GEMMAS = (GEMMA, GEMMA2, GEMMA3)
OLMOS = (OLMO2, OLMO3)  # norms on the sublayers' outputs only, q/k norms over all heads
POST_NORM = (*OLMOS, EXAONE4)  # norms on the sublayers' outputs only
LOCAL_GLOBAL = (GEMMA2, GEMMA3, OLMO3, GPT_OSS, EXAONE4)  # windowed layers between global ones
MOE_ARCHITECTURES = (MIXTRAL, QWEN3_MOE, GPT_OSS, QWEN2_MOE, OLMOE, GLM4_MOE, DEEPSEEK_V3, QWEN3_5_MOE, QWEN3_NEXT)
SHARED_GATED = (QWEN2_MOE, QWEN3_5_MOE, QWEN3_NEXT)  # a shared expert beside the routed ones, gated
SIGMOID_MOE = (GLM4_MOE, DEEPSEEK_V3)  # DeepSeek-V3's routing, shared experts and dense first layers
WHOLE_QK_NORM = (OLMO2, OLMO3, OLMOE)  # one q norm over all heads' values, one k norm
GEMMA3_IMAGE_TEXT = "Gemma3ForConditionalGeneration"
IMAGE_TEXT = {GEMMA3_IMAGE_TEXT: GEMMA3, "Qwen3_5ForConditionalGeneration": QWEN3_5,
              "Qwen3_5MoeForConditionalGeneration": QWEN3_5_MOE}
"""Image-text checkpoints read as their text model (the vision tower left out)."""
_MODEL_TYPES = {"gpt2": GPT2, "llama": LLAMA, "mistral": MISTRAL, "qwen2": QWEN2, "qwen3": QWEN3, "gemma": GEMMA,
                "gemma2": GEMMA2, "gemma3_text": GEMMA3, "phi3": PHI3, "gemma3": GEMMA3_IMAGE_TEXT, "olmo2": OLMO2,
                "olmo3": OLMO3, "mixtral": MIXTRAL, "gpt_oss": GPT_OSS,
                "qwen3_moe": QWEN3_MOE, "smollm3": SMOLLM3, "granite": GRANITE,
                "qwen2_moe": QWEN2_MOE, "olmoe": OLMOE, "seed_oss": SEED_OSS,
                "exaone4": EXAONE4, "glm4": GLM4, "glm4_moe": GLM4_MOE, "deepseek_v3": DEEPSEEK_V3,
                "qwen3_5_text": QWEN3_5, "qwen3_5": "Qwen3_5ForConditionalGeneration", "qwen3_5_moe_text": QWEN3_5_MOE,
                "qwen3_5_moe": "Qwen3_5MoeForConditionalGeneration", "qwen3_next": QWEN3_NEXT}
# transformers' Gemma3TextConfig defaults: the text_config of a Gemma 3 image-text checkpoint gives only what differs.
_GEMMA3_TEXT_DEFAULTS = {
    "vocab_size": 262208, "hidden_size": 2304, "intermediate_size": 9216, "num_hidden_layers": 26,
    "num_attention_heads": 8, "num_key_value_heads": 4, "head_dim": 256, "hidden_activation": "gelu_pytorch_tanh",
    "max_position_embeddings": 131072, "rms_norm_eps": 1e-6, "rope_theta": 1e6, "rope_local_base_freq": 1e4,
    "query_pre_attn_scalar": 256, "sliding_window": 4096, "sliding_window_pattern": 6,
}
_GEMMA3_TEXT_PREFIXES = {"language_model.model.": "model.", "model.language_model.": "model.",
                         "language_model.lm_head.": "lm_head."}
"""Where an image-text checkpoint keeps the text model's tensors (as published; as transformers 5 names them)."""
_GEMMA3_VISION = ("vision_tower.", "multi_modal_projector.", "model.vision_tower.", "model.multi_modal_projector.")
_QWEN3_5_SKIPPED = ("model.visual.", "mtp.")  # the vision tower, and the multi-token-prediction layers (not built)
_WRAPPER_PREFIXES = ("_orig_mod.", "module.", "_checkpoint_wrapped_module.")  # compile / DDP / checkpointing
MAX_SHARD_BYTES = 5 << 30
_SLICE_BYTES = 16 << 20  # a tensor cast on loading is read in slices of about this size  # transformers' default shard size: a file per ~5 GB


class CheckpointError(InputError):
    """A checkpoint directory or file that cannot be read as it is: the message names the file."""


# ---- configs ------------------------------------------------------------------------------------


def _architecture(d: dict[str, Any]) -> str:
    """The causal-LM architecture of a config: a `*ForSequenceClassification` (reward model) checkpoint
    holds the same decoder, with a score head instead of the language-model head."""
    archs = d.get("architectures") or []
    arch = archs[0] if archs else _MODEL_TYPES.get(d.get("model_type", ""), "<none given>")
    if isinstance(arch, str) and arch.endswith(SEQ_CLS_SUFFIX):
        causal = {v: k for k, v in _SEQ_CLS_NAMES.items()}
        return causal.get(arch, arch.removesuffix(SEQ_CLS_SUFFIX) + "ForCausalLM")
    return arch


SEQ_CLS_SUFFIX = "ForSequenceClassification"
_SEQ_CLS_NAMES = {GPT2: "GPT2ForSequenceClassification", GEMMA3: "Gemma3TextForSequenceClassification"}
"""The reward-model architectures not named by swapping ForCausalLM for ForSequenceClassification."""
SCORE = "score.weight"
"""The one-label head of a `*ForSequenceClassification` checkpoint: (1, hidden) scores the last real token."""


def sequence_classification_architecture(cfg: ModelConfig) -> str:
    """`LlamaForCausalLM` -> `LlamaForSequenceClassification` (`GPT2LMHeadModel` -> `GPT2ForSequenceClassification`)."""
    arch = hf_architecture(cfg)
    return _SEQ_CLS_NAMES.get(arch, arch.removesuffix("ForCausalLM") + SEQ_CLS_SUFFIX)


# The type of every config.json field temper reads (None allowed only where the code falls back
# to a default on a null), so that "hidden_size": "64" fails naming the key, not deep in a model.
_INT, _FLOAT, _BOOL, _STR = (int,), (int, float), (bool,), (str,)
_FIELD_TYPES: dict[str, tuple[type, ...]] = {
    **dict.fromkeys(("vocab_size", "n_positions", "n_embd", "n_layer", "n_head", "hidden_size", "num_attention_heads",
                     "intermediate_size", "max_position_embeddings", "num_hidden_layers", "num_local_experts",
                     "num_experts", "num_experts_per_tok", "moe_intermediate_size", "decoder_sparse_step",
                     "original_max_position_embeddings", "shared_expert_intermediate_size", "n_routed_experts",
                     "n_shared_experts", "first_k_dense_replace", "n_group", "topk_group",
                     "num_nextn_predict_layers", "kv_lora_rank", "qk_rope_head_dim", "qk_nope_head_dim",
                     "moe_layer_freq", "full_attention_interval", "linear_conv_kernel_dim", "linear_key_head_dim",
                     "linear_value_head_dim", "linear_num_key_heads", "linear_num_value_heads"), _INT),
    **dict.fromkeys(("q_lora_rank", "v_head_dim"), (*_INT, type(None))),
    **dict.fromkeys(("topk_method", "scoring_func"), _STR),
    **dict.fromkeys(("router_aux_loss_coef", "router_jitter_noise", "embedding_multiplier", "residual_multiplier",
                     "attention_multiplier", "logits_scaling", "routed_scaling_factor"), _FLOAT),
    "mlp_only_layers": (list, type(None)), "clip_qkv": (*_FLOAT, type(None)), "no_rope_layers": (list, type(None)),
    "no_rope_layer_interval": _INT,
    **dict.fromkeys(("n_inner", "head_dim", "num_key_value_heads", "sliding_window"), (*_INT, type(None))),
    **dict.fromkeys(("layer_norm_epsilon", "rms_norm_eps", "initializer_range", "partial_rotary_factor",
                     "rope_local_base_freq"), _FLOAT),
    "query_pre_attn_scalar": _INT,
    **dict.fromkeys(("final_logit_softcapping", "attn_logit_softcapping"), (*_FLOAT, type(None))),
    "sliding_window_pattern": (*_INT, *_STR),
    "layer_types": (list, type(None)),
    "use_bidirectional_attention": (bool, type(None)),
    "rope_theta": (*_FLOAT, type(None)),
    **dict.fromkeys(("tie_word_embeddings", "attention_bias", "mlp_bias", "use_sliding_window", "scale_attn_weights",
                     "scale_attn_by_inverse_layer_idx", "norm_topk_prob", "output_router_logits", "use_qk_norm",
                     "rope_interleave"), _BOOL),
    **dict.fromkeys(("activation_function", "hidden_act", "model_type"), _STR),
    "hidden_activation": (*_STR, type(None)),
    "architectures": (list, type(None)),
    **dict.fromkeys(("rope_scaling", "rope_parameters"), (dict, type(None))),
}
_ROPE_FIELD_TYPES: dict[str, tuple[type, ...]] = {
    "rope_type": _STR, "type": _STR, "low_freq_factor": _FLOAT, "high_freq_factor": _FLOAT,
    "original_max_position_embeddings": _INT, "rope_theta": _FLOAT, "partial_rotary_factor": _FLOAT,
    **dict.fromkeys(("factor", "attention_factor", "beta_fast", "beta_slow", "mscale", "mscale_all_dim"),
                    (*_FLOAT, type(None))),  # YaRN's (a null factor: DeepSeek-V3's ratio of lengths)
    "truncate": _BOOL, "short_factor": (list,), "long_factor": (list,),  # LongRoPE's
}
_TYPE_NAMES = {_INT: "an integer", _FLOAT: "a number", _BOOL: "true or false", _STR: "a string",
               (*_FLOAT, type(None)): "a number or null"}


def _check_types(d: dict[str, Any], types: dict[str, tuple[type, ...]], prefix: str = "") -> None:
    for key, allowed in types.items():
        value = d.get(key)
        if key not in d or isinstance(value, allowed) and not (isinstance(value, bool) and bool not in allowed):
            continue
        want = _TYPE_NAMES.get(allowed) or " or ".join("null" if t is type(None) else t.__name__ for t in allowed)
        raise ValueError(f"key {prefix + key!r} must be {want}, got {value!r}")


def from_hf_config(d: dict[str, Any]) -> ModelConfig:
    """The ModelConfig of a Hugging Face `config.json`; anything temper cannot reproduce exactly fails."""
    if not isinstance(d, dict):
        raise ValueError(f"a config must be a JSON object, got {type(d).__name__}")
    _check_types(d, _FIELD_TYPES)
    if not all(isinstance(a, str) for a in d.get("architectures") or []):
        raise ValueError(f"key 'architectures' must be a list of strings, got {d['architectures']!r}")
    if _architecture(d) in IMAGE_TEXT:  # its text model, as a *ForCausalLM (the vision tower is left out)
        text, arch = d.get("text_config") or {}, IMAGE_TEXT[_architecture(d)]
        if not isinstance(text, dict):
            raise ValueError(f"key 'text_config' must be an object, got {text!r}")
        if arch == GEMMA3:
            tied = d.get("tie_word_embeddings", True)
            return from_hf_config({**_GEMMA3_TEXT_DEFAULTS, "tie_word_embeddings": tied, **text, "architectures": [arch]})
        tied = d.get("tie_word_embeddings", text.get("tie_word_embeddings", False))  # Qwen3_5Config's top-level key
        return from_hf_config({**text, "tie_word_embeddings": tied, "architectures": [arch]})
    for key in ("rope_scaling", "rope_parameters"):
        _check_types(d.get(key) or {}, _ROPE_FIELD_TYPES, prefix=f"{key}.")
    arch = _architecture(d)
    quant = d.get("quantization_config")
    quant = quant.get("quant_method") if isinstance(quant, dict) else quant
    if quant and not (arch == GPT_OSS and quant == "mxfp4") and not _fp8_block_shape(d):
        raise ValueError(f"quantization_config {quant!r} is not supported (temper reads 16- and 32-bit weights, "
                         "GPT-OSS's MXFP4 experts and block-scaled FP8 (DeepSeek's)); load the unquantized checkpoint, "
                         "then QLoRA or quantize in temper")
    if arch == GPT2:
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
            init_std=d.get("initializer_range", 0.02), hf_architecture=GPT2,
        )
    if arch not in SUPPORTED_ARCHITECTURES:
        raise ValueError(f"unsupported architecture {arch!r}; temper reads {', '.join(SUPPORTED_ARCHITECTURES)}")
    return _from_llama_like(d, arch)


def _from_llama_like(d: dict[str, Any], arch: str) -> ModelConfig:
    """Llama and the architectures that differ from it by a few fields."""
    name = arch.removesuffix("ForCausalLM")
    if arch in HYBRID:  # Qwen3_5TextConfig's defaults of what a config may leave out
        d = {"head_dim": 256, "linear_conv_kernel_dim": 4, "linear_key_head_dim": 128, "linear_value_head_dim": 128,
             "linear_num_key_heads": 16, "linear_num_value_heads": 32, **d}
    act = d.get("hidden_activation") or d.get("hidden_act", "silu")
    gemma = arch in GEMMAS
    if gemma:  # "gelu" is a legacy spelling of the tanh approximation, as transformers reads it
        if act not in ("gelu", "gelu_pytorch_tanh", "gelu_new"):
            raise ValueError(f"Gemma hidden_act {act!r} is not supported (temper uses tanh GELU)")
    elif act != "silu":
        raise ValueError(f"{name} hidden_act {act!r} is not supported (temper uses SwiGLU)")
    dim, n_heads = d["hidden_size"], d["num_attention_heads"]
    head_dim = d.get("head_dim") or dim // n_heads
    latent = _latent_attention(d) if arch == DEEPSEEK_V3 else {}
    if latent:  # its config's head_dim is the rotated part's
        head_dim = latent.pop("head_dim")
    window = d.get("sliding_window") if arch in (MISTRAL, PHI3, MIXTRAL) else None
    every = local_theta = None
    if arch == GEMMA3:
        window, every, theta, local_theta, scaling = _gemma3_layers(d)
        rope = {}
    elif arch == OLMO3:  # its windowed layers take the global layers' base, unscaled
        window, every, theta, local_theta, scaling = _local_global_rope(d, "OLMo 3", 4, 500000.0, None, None)
        rope = {}
    elif arch == GPT_OSS and not (d.get("rope_scaling") or d.get("rope_parameters")):
        theta, scaling, rope = _rope(d | {"rope_parameters": _GPT_OSS_ROPE})  # GptOssConfig's default
    else:
        theta, scaling, rope = _rope(d, phi3=arch == PHI3)
    if arch in (GEMMA2, GPT_OSS):  # one RoPE; the windowed layers alternate with global ones
        window, every = _window_layers(d, "Gemma 2" if arch == GEMMA2 else "GPT-OSS", 2)
    if arch == EXAONE4:  # windowed layers with RoPE between global ones without (NoPE)
        window, every = _window_layers(d | {"sliding_window_pattern": _exaone_pattern(d)}, "EXAONE 4", 4)
    glm = arch in GLM
    partial = d.get("partial_rotary_factor", rope.get("partial_rotary_factor", 0.5 if glm else 0.25 if arch in HYBRID
                                                                                     else 1.0))
    if partial != 1.0 and (arch not in (PHI3, *GLM, *HYBRID) or not 0 < partial <= 1):  # the others: whole heads
        raise ValueError(f"{name} partial_rotary_factor={partial} is not supported (temper reads it for Phi-3's and "
                         "GLM-4's and Qwen3.5's architectures, between 0 and 1)")
    rope_dim = int(head_dim * partial) if partial != 1.0 else latent.pop("rope_dim", None)  # as transformers rounds
    nope_every = _nope_layers(d) if arch == SMOLLM3 else every if arch == EXAONE4 else None
    bias = qkv_bias = False
    if arch in (LLAMA, GRANITE):
        bias = bool(d.get("attention_bias", False))
        if bias != bool(d.get("mlp_bias", False)):
            raise ValueError(f"{name} attention_bias and mlp_bias must agree (temper's `bias` covers both)")
    elif glm:  # attention_bias: q, k and v's (Glm4Config's default: on; Glm4MoeConfig's: off)
        qkv_bias = bool(d.get("attention_bias", arch == GLM4))
    elif arch == SEED_OSS:  # its q/k/v biases (attention_bias), o_proj's and the MLP's apart
        flags = tuple(bool(d.get(key, default)) for key, default in (
            ("attention_bias", True), ("attention_out_bias", False), ("mlp_bias", False)))
        if flags not in ((True, False, False), (False, False, False), (True, True, True)):
            raise ValueError(f"SeedOss attention_bias, attention_out_bias, mlp_bias = {flags} is not supported (temper "
                             "has biases on q, k and v alone, or on every layer)")
        qkv_bias, bias = flags[0] and not flags[1], flags[1]
    elif arch in (QWEN2, QWEN3, QWEN3_MOE, QWEN2_MOE):
        qkv_bias = arch == QWEN2 or arch == QWEN2_MOE and bool(d.get("qkv_bias", True))
        if d.get("use_sliding_window"):
            raise ValueError(f"{name} use_sliding_window=true is not supported (its window covers only some layers)")
        if arch in (QWEN3, QWEN3_MOE) and d.get("attention_bias"):  # on q, k, v and o, not the MLP: `bias` is all
            raise ValueError(f"{name} attention_bias=true is not supported")
    elif arch == GPT_OSS:  # its experts and router always have biases: temper's `bias` is every layer's
        bias = True
        if not d.get("attention_bias", True):
            raise ValueError("GptOss attention_bias=false is not supported (its experts and router have biases; "
                             "temper's `bias` covers every layer)")
    elif d.get("attention_bias"):
        raise ValueError(f"{name} attention_bias=true is not supported")
    # Gemma 2 and 3 scale scores by query_pre_attn_scalar ** -0.5 (their config classes' default: 256), Granite by
    # attention_multiplier
    scalar = (d.get("query_pre_attn_scalar", 256) if arch in (GEMMA2, GEMMA3)
              else _scale_dim(d.get("attention_multiplier", 1.0)) if arch == GRANITE else head_dim)
    return ModelConfig(
        vocab_size=d["vocab_size"], dim=dim, n_layers=d["num_hidden_layers"], n_heads=n_heads,
        head_size=None if head_dim * n_heads == dim else head_dim,
        n_kv_heads=d.get("num_key_value_heads") or n_heads, ffn_dim=d["intermediate_size"],
        max_seq_len=d.get("max_position_embeddings", 2048), mlp="geglu" if gemma else "swiglu",
        norm="rmsnorm", norm_eps=d.get("rms_norm_eps", 1e-6), norm_unit_offset=gemma or arch in HYBRID,
        pos="rope", rope_theta=float(theta), rope_scaling=scaling, rope_dim=rope_dim, sliding_window=window,
        global_every=every, nope_every=nope_every,
        rope_local_theta=None if local_theta is None else float(local_theta), bias=bias, qkv_bias=qkv_bias,
        qk_norm=arch in (QWEN3, GEMMA3, QWEN3_MOE, EXAONE4, *WHOLE_QK_NORM, *HYBRID) or arch == GLM4_MOE and bool(
            d.get("use_qk_norm", False)), qk_norm_whole=arch in WHOLE_QK_NORM,
        tie_embeddings=d.get("tie_word_embeddings", gemma), scale_embeddings=gemma,
        sandwich_norm=arch in (*SANDWICH, *POST_NORM), pre_norm=arch not in POST_NORM,
        norm_cast_after=arch in (*OLMOS, GPT_OSS), rope_float32=arch in OLMOS, dropout=0.0,
        init_std=d.get("initializer_range", 0.02),
        attn_scale_dim=None if scalar == head_dim else int(scalar),
        hf_architecture=arch, **(_experts(d, arch) if arch in MOE_ARCHITECTURES else {}), **latent,
        **(_softcaps(d, arch) if arch in (GEMMA2, GEMMA3) else {}),
        **({"attn_sinks": True, "swiglu_limit": float(d.get("swiglu_limit", 7.0)),
            "swiglu_alpha": float(d.get("swiglu_alpha", 1.702))} if arch == GPT_OSS else {}),
        **(_multipliers(d) if arch == GRANITE else {}), **(_linear_layers(d) if arch in HYBRID else {}),
    )


def _linear_layers(d: dict[str, Any]) -> dict[str, Any]:
    """Qwen3.5's hybrid layers: three Gated DeltaNet layers to one of gated attention (full_attention_interval, or
    layer_types written out in that pattern), and the linear layers' heads."""
    n, every = d["num_hidden_layers"], d.get("full_attention_interval", 4)
    types = d.get("layer_types")
    if types is not None:
        full = [i for i, t in enumerate(types) if t == "full_attention"]
        every = full[0] + 1 if full else n + 1
        if types != ["full_attention" if last_of_every(i, every) else "linear_attention" for i in range(n)]:
            raise ValueError(f"layer_types {types} is not supported: temper's hybrid models have num_hidden_layers "
                             f"({n}) entries, \"full_attention\" at the last of every full_attention_interval layers, "
                             "\"linear_attention\" elsewhere")
    if every < 1:
        raise ValueError(f"full_attention_interval must be positive, got {every}")
    return {"attn_output_gate": True, "full_attention_every": every,
            "linear_key_heads": d["linear_num_key_heads"], "linear_value_heads": d["linear_num_value_heads"],
            "linear_key_size": d["linear_key_head_dim"], "linear_value_size": d["linear_value_head_dim"],
            "linear_conv_size": d["linear_conv_kernel_dim"]}


def _multipliers(d: dict[str, Any]) -> dict[str, float | None]:
    """Granite's multipliers of the embeddings, the sublayers' outputs and (dividing) the logits; 1 is None."""
    values = {ours: float(d.get(theirs, 1.0)) for ours, theirs in (
        ("embed_multiplier", "embedding_multiplier"), ("residual_multiplier", "residual_multiplier"),
        ("logit_divisor", "logits_scaling"))}
    return {k: None if v == 1.0 else v for k, v in values.items()}


def _scale_dim(multiplier: float) -> int:
    """attn_scale_dim of Granite's attention_multiplier m: the whole number d with d ** -0.5 == m exactly (the
    published ones are 1/64 and 1/128)."""
    dim = round(multiplier ** -2) if multiplier > 0 else 0
    if dim < 1 or dim ** -0.5 != multiplier:
        raise ValueError(f"Granite attention_multiplier={multiplier} is not supported (temper scales scores by "
                         "d ** -0.5 for a whole number d)")
    return dim


_GPT_OSS_ROPE = {"rope_type": "yarn", "rope_theta": 150000.0, "factor": 32.0, "beta_fast": 32.0, "beta_slow": 1.0,
                 "truncate": False, "original_max_position_embeddings": 4096}
"""GptOssConfig's RoPE when a config gives none."""


def _experts(d: dict[str, Any], arch: str) -> dict[str, Any]:
    """The ModelConfig fields of a mixture-of-experts config (Mixtral: experts of intermediate_size, the top k's
    probabilities always renormalised; Qwen3-MoE: moe_intermediate_size, norm_topk_prob). The load-balancing loss
    (router_aux_loss_coef with output_router_logits) is a training choice, not the model's: it is not read."""
    name = arch.removesuffix("ForCausalLM")
    if arch in SIGMOID_MOE:
        return _sigmoid_experts(d, arch)
    n = d.get("num_local_experts", d.get("num_experts"))  # transformers 5 writes either spelling
    if not n or n <= 0:
        raise ValueError(f"{name} needs a positive num_local_experts (or num_experts), got {n!r}")
    k = d.get("num_experts_per_tok", 2)
    if not 1 <= k <= n:
        raise ValueError(f"{name} num_experts_per_tok={k} must be between 1 and the {n} experts")
    if d.get("router_jitter_noise"):
        raise ValueError(f"{name} router_jitter_noise={d['router_jitter_noise']} is not supported (temper's router "
                         "takes its input as it is)")
    if arch == MIXTRAL:
        return {"n_experts": n, "experts_per_token": k, "renormalize_experts": True, "expert_weights_float32": True}
    if arch == OLMOE:  # experts of intermediate_size, as Mixtral's; norm_topk_prob as Qwen3-MoE's
        if d.get("clip_qkv") is not None:
            raise ValueError(f"Olmoe clip_qkv={d['clip_qkv']} is not supported (temper does not clamp q, k and v)")
        return {"n_experts": n, "experts_per_token": k, "renormalize_experts": bool(d.get("norm_topk_prob", False))}
    if arch == GPT_OSS:  # a softmax over the top k's logits: the renormalised top k of a softmax over all
        return {"n_experts": n, "experts_per_token": k, "renormalize_experts": True}
    if arch in (QWEN3_5_MOE, QWEN3_NEXT):  # experts beside a gated shared one, the top k renormalised (Qwen3-Next:
        # norm_topk_prob)
        if d.get("decoder_sparse_step", 1) != 1 or d.get("mlp_only_layers"):
            raise ValueError(f"{name} decoder_sparse_step={d.get('decoder_sparse_step', 1)} with mlp_only_layers="
                             f"{d.get('mlp_only_layers') or []} is not supported (temper puts experts in every layer)")
        return {"n_experts": n, "experts_per_token": k, "renormalize_experts": bool(d.get("norm_topk_prob", True)),
                "expert_ffn_dim": d.get("moe_intermediate_size", 512),
                "shared_expert_ffn_dim": d.get("shared_expert_intermediate_size", 512), "shared_expert_gate": True}
    if d.get("decoder_sparse_step", 1) != 1 or d.get("mlp_only_layers"):
        raise ValueError(f"{name} decoder_sparse_step={d.get('decoder_sparse_step', 1)} with mlp_only_layers="
                         f"{d.get('mlp_only_layers') or []} is not supported (temper puts experts in every layer)")
    fields = {"n_experts": n, "experts_per_token": k, "renormalize_experts": bool(d.get("norm_topk_prob", False)),
              "expert_ffn_dim": d.get("moe_intermediate_size", 1408 if arch == QWEN2_MOE else 768)}
    if arch == QWEN2_MOE:  # Qwen2MoeConfig's defaults
        fields |= {"shared_expert_ffn_dim": d.get("shared_expert_intermediate_size", 5632), "shared_expert_gate": True}
    return fields


_SIGMOID_MOE_DEFAULTS = {  # Glm4MoeConfig's and DeepseekV3Config's
    GLM4_MOE: {"n_routed_experts": 128, "n_group": 1, "topk_group": 1, "first_k_dense_replace": 1,
               "moe_intermediate_size": 1408, "routed_scaling_factor": 1.0},
    DEEPSEEK_V3: {"n_routed_experts": 256, "n_group": 8, "topk_group": 4, "first_k_dense_replace": 3,
                  "moe_intermediate_size": 2048, "routed_scaling_factor": 2.5},
}


def _sigmoid_experts(d: dict[str, Any], arch: str) -> dict[str, Any]:
    """DeepSeek-V3's routing (GLM-4.5 takes it too): sigmoid scores, a choice bias, groups of experts, scaled weights,
    shared experts beside the routed ones (n_shared_experts of them, one MLP that wide) and dense first layers.
    Multi-token-prediction layers (num_nextn_predict_layers) are not read: their tensors, after the last layer's, are
    skipped on loading (as transformers skips them). DeepSeek's own keys say the same routing or are refused."""
    name = arch.removesuffix("ForCausalLM")
    d = _SIGMOID_MOE_DEFAULTS[arch] | {k: v for k, v in d.items() if v is not None}
    for key, want in (("scoring_func", "sigmoid"), ("topk_method", "noaux_tc"), ("moe_layer_freq", 1)):
        if d.get(key, want) != want:
            raise ValueError(f"{name} {key}={d[key]!r} is not supported (temper reads DeepSeek-V3's {want!r})")
    n, k = d["n_routed_experts"], d.get("num_experts_per_tok", 8)
    groups, per_token, dense = d["n_group"], d["topk_group"], d["first_k_dense_replace"]
    width, shared = d["moe_intermediate_size"], d.get("n_shared_experts", 1)
    if not 1 <= k <= n:
        raise ValueError(f"{name} num_experts_per_tok={k} must be between 1 and the n_routed_experts={n}")
    if not 0 <= dense < d["num_hidden_layers"]:
        raise ValueError(f"{name} first_k_dense_replace={dense} must leave a layer with experts of the "
                         f"{d['num_hidden_layers']} layers")
    if groups < 1 or n % groups or not 1 <= per_token <= groups or (groups > 1 and n // groups < 2):
        raise ValueError(f"{name} n_group={groups} with topk_group={per_token} is not supported (the "
                         f"n_routed_experts={n} split in groups of 2 or more, topk_group of them kept)")
    if shared < 1:
        raise ValueError(f"{name} n_shared_experts={shared} is not supported (temper reads 1 or more)")
    return {"n_experts": n, "experts_per_token": k, "renormalize_experts": bool(d.get("norm_topk_prob", True)),
            "expert_ffn_dim": width, "shared_expert_ffn_dim": width * shared, "router_scores": "sigmoid",
            "expert_choice_bias": True, "expert_groups": groups, "expert_groups_per_token": per_token,
            "expert_weights_float32": True,
            "routed_scaling": float(d["routed_scaling_factor"]), "dense_layers": dense}


def _latent_attention(d: dict[str, Any]) -> dict[str, Any]:
    """The ModelConfig fields of DeepSeek-V3's latent attention (DeepseekV3Config's defaults), with head_dim: the
    unrotated and rotated dims of a query or key head."""
    nope, rope = d.get("qk_nope_head_dim", 128), d.get("qk_rope_head_dim", 64)
    if not d.get("rope_interleave", True):
        raise ValueError("DeepseekV3 rope_interleave=false is not supported (temper reads DeepSeek's interleaved "
                         "rotary layout, as its checkpoints are published)")
    if d.get("attention_bias"):
        raise ValueError("DeepseekV3 attention_bias=true is not supported (temper's latent attention has no biases)")
    if d.get("num_key_value_heads") not in (None, d["num_attention_heads"]):
        raise ValueError(f"DeepseekV3 num_key_value_heads={d['num_key_value_heads']} must equal num_attention_heads "
                         f"({d['num_attention_heads']}): latent attention expands keys and values for every head")
    v = d.get("v_head_dim", 128)
    return {"head_dim": nope + rope, "rope_dim": rope, "kv_lora_rank": d.get("kv_lora_rank", 512),
            "q_lora_rank": d.get("q_lora_rank", 1536),
            "v_head_size": None if v in (None, nope + rope) else v}


def _softcaps(d: dict[str, Any], arch: str) -> dict[str, float | None]:
    """Gemma 2's (and, where set, Gemma 3's) capped attention scores and logits, with their config classes'
    defaults (Gemma 2: 50 and 30; Gemma 3: none)."""
    defaults = (50.0, 30.0) if arch == GEMMA2 else (None, None)
    caps = [d.get(key, default) for key, default in zip(("attn_logit_softcapping", "final_logit_softcapping"),
                                                          defaults, strict=True)]
    return {"attn_softcap": caps[0] and float(caps[0]), "logit_softcap": caps[1] and float(caps[1])}


def _window_layers(d: dict[str, Any], name: str, default_every: int) -> tuple[int | None, int | None]:
    """(sliding_window, global_every) of a config whose `layer_types` (or older `sliding_window_pattern`; else
    every `default_every`-th layer global) say which layers attend within the window and which to everything.
    temper lays them out as the last of every `global_every` layers global, Gemma 2's and 3's pattern. (None,
    None): every layer global; (window, None): every layer within the window."""
    n, window = d["num_hidden_layers"], d.get("sliding_window")
    every_nth = lambda every: ["full_attention" if last_of_every(i, every) else "sliding_attention"  # noqa: E731
                               for i in range(n)]
    types = d.get("layer_types") or every_nth(d.get("sliding_window_pattern", default_every))
    if len(types) != n or set(types) - {"full_attention", "sliding_attention"}:
        raise ValueError(f"key 'layer_types' must name 'full_attention' or 'sliding_attention' for each of the {n} "
                         f"layers, got {types!r}")
    full = [i for i, t in enumerate(types) if t == "full_attention"]
    if window is None or len(full) == n:
        return None, None
    if not full:
        return window, None
    if types != every_nth(full[0] + 1):
        raise ValueError(f"{name} layer_types {types!r} are not supported (temper makes the last of every N layers "
                         f"global)")
    return window, full[0] + 1


def _exaone_pattern(d: dict[str, Any]) -> int:
    """EXAONE 4's `sliding_window_pattern` as a group size: an int, or "LLLG" (local layers, then a global one)."""
    pattern = d.get("sliding_window_pattern", 4)
    if isinstance(pattern, str):
        if len(pattern) < 2 or pattern.upper() != "L" * (len(pattern) - 1) + "G":
            raise ValueError(f"EXAONE 4 sliding_window_pattern={pattern!r} is not supported (temper makes the last of "
                             "every N layers global: 'LLLG')")
        return len(pattern)
    return pattern


def _nope_layers(d: dict[str, Any]) -> int | None:
    """nope_every of a SmolLM3 config: its `no_rope_layers` (1: the layer rotates, 0: NoPE), else a NoPE layer at the
    end of every `no_rope_layer_interval` (4) layers. temper lays NoPE layers out as the last of every N."""
    n = d["num_hidden_layers"]
    if d.get("use_sliding_window"):
        raise ValueError("SmolLM3 use_sliding_window=true is not supported (its window covers only the NoPE layers)")
    interval = d.get("no_rope_layer_interval", 4)
    if interval < 1:
        raise ValueError(f"key 'no_rope_layer_interval' must be a positive number of layers, got {interval}")
    flags = d.get("no_rope_layers") or [int((i + 1) % interval != 0) for i in range(n)]
    if len(flags) < n or set(flags[:n]) - {0, 1}:
        raise ValueError(f"key 'no_rope_layers' must give 1 (RoPE) or 0 (NoPE) for each of the {n} layers, got "
                         f"{flags!r}")
    nope = [i for i in range(n) if not flags[i]]
    every = nope[0] + 1 if nope else None
    if [i for i in range(n) if last_of_every(i, every)] != nope:
        raise ValueError(f"SmolLM3 no_rope_layers {flags[:n]!r} are not supported (temper makes the last of every N "
                         "layers NoPE)")
    return every


def _gemma3_layers(d: dict[str, Any]) -> tuple[int | None, int | None, float, float | None, dict | None]:
    """`_local_global_rope` of a Gemma 3 config: its windowed layers' own base is `rope_local_base_freq`."""
    if d.get("use_bidirectional_attention"):
        raise ValueError("Gemma 3 use_bidirectional_attention=true is not supported (temper's decoder is causal)")
    return _local_global_rope(d, "Gemma 3", 6, 1e6, "rope_local_base_freq", 1e4)


def _local_global_rope(d: dict[str, Any], name: str, default_every: int, default_theta: float,
                       local_key: str | None, local_default: float | None
                       ) -> tuple[int | None, int | None, float, float | None, dict | None]:
    """(sliding_window, global_every, rope_theta, rope_local_theta, rope_scaling) of a config whose windowed layers
    (`_window_layers`) have a RoPE of their own (Gemma 3, OLMo 3): `rope_parameters` per layer type (transformers
    5), or `rope_theta`, `rope_scaling` (the global layers') and the local base `local_key` (None: rope_theta, as
    OLMo 3's windowed layers take it, unscaled). rope_local_theta is None where both kinds rotate alike."""
    window, every = _window_layers(d, name, default_every)
    params = d.get("rope_parameters") or {}
    theta = d.get("rope_theta", default_theta)
    if "full_attention" in params or "sliding_attention" in params:  # transformers 5: one set per layer type
        spellings = {kind: dict(params.get(kind) or {}) for kind in ("full_attention", "sliding_attention")}
    else:
        local = d.get(local_key, local_default) if local_key else theta
        spellings = {"full_attention": {**(d.get("rope_scaling") or {}), "rope_theta": theta},
                     "sliding_attention": {"rope_theta": local}}
    for kind, values in spellings.items():
        _check_types(values, _ROPE_FIELD_TYPES, prefix=f"rope_parameters.{kind}.")
    length = {"max_position_embeddings": d.get("max_position_embeddings", 2048)}  # YaRN's default original length
    (theta, scaling, _), (local, local_scaling, _) = (_rope({"rope_parameters": spellings[k], **length})
                                                      for k in ("full_attention", "sliding_attention"))
    if window is None:  # every layer global
        return None, None, theta, None, scaling
    if every is None:  # every layer within the window: one RoPE, the local one
        return window, None, local, None, local_scaling
    if local_scaling:
        raise ValueError(f"{name} RoPE scaling of the sliding-window layers is not supported")
    return window, every, theta, None if local == theta and not scaling else local, scaling


def _rope(d: dict[str, Any], phi3: bool = False) -> tuple[float, dict | None, dict]:
    """(theta, temper's rope_scaling, the raw dict) from either spelling: transformers 4.x
    `rope_theta` + `rope_scaling`, or 5.x `rope_parameters`. phi3: Phi3Config's readings (below)."""
    rope = dict(d.get("rope_scaling") or d.get("rope_parameters") or {})
    theta = d.get("rope_theta") or rope.get("rope_theta") or 10000.0
    kind = rope.get("rope_type", rope.get("type", "default"))
    if phi3 and kind in ("su", "yarn"):  # Phi3Config reads both as LongRoPE (its early name, "su")
        kind = "longrope"
    max_len = d.get("max_position_embeddings", 2048)
    # The original length of Llama 3.1's, YaRN's and LongRoPE's scaling: as transformers standardises it, a top-level
    # key (Phi-3's configs keep it there, and Phi3Config defaults it to 4096) over the scaling's, else the model's.
    old_len = (d.get("original_max_position_embeddings", 4096 if phi3 else None)
               or rope.get("original_max_position_embeddings") or max_len)
    if kind == "llama3":
        keys = ("factor", "low_freq_factor", "high_freq_factor")
        scaling = {"rope_type": "llama3", **{k: rope[k] for k in keys}, "original_max_position_embeddings": old_len}
        return theta, scaling, rope
    if kind == "linear":
        return theta, {"rope_type": "linear", "factor": rope["factor"]}, rope
    if kind in ("yarn", "longrope"):  # without a factor (DeepSeek-V3, Phi-3) the ratio of the two lengths
        optional = {k: rope[k] for k in ROPE_OPTIONAL_KEYS[kind] if rope.get(k) is not None}
        tables = {k: rope[k] for k in ("short_factor", "long_factor") if k in rope} if kind == "longrope" else {}
        return theta, {"rope_type": kind, **tables, "factor": rope.get("factor") or max_len / old_len,
                       "original_max_position_embeddings": old_len, **optional}, rope
    if kind in (None, "default"):
        return theta, None, rope
    raise ValueError(f"rope type {kind!r} is not supported (temper reads default, linear, llama3, yarn and longrope)")


def hf_architecture(cfg: ModelConfig) -> str:
    """The architecture to export `cfg` as: the one it was loaded from, else the one its fields match."""
    arch = cfg.hf_architecture
    if arch is None:
        if cfg.pos == "learned" and cfg.norm == "layernorm" and cfg.mlp == "gelu":
            arch = GPT2
        elif cfg.pos == "rope" and cfg.norm == "rmsnorm" and cfg.mlp == "geglu":
            arch = GEMMA3 if cfg.qk_norm else GEMMA2 if cfg.sandwich_norm else GEMMA
        elif cfg.full_attention_every is not None:
            arch = QWEN3_5_MOE if cfg.n_experts else QWEN3_5
        elif cfg.pos == "rope" and cfg.norm == "rmsnorm" and cfg.mlp == "swiglu" and not cfg.pre_norm:
            arch = EXAONE4 if not cfg.qk_norm_whole else OLMO3 if cfg.sliding_window else OLMO2
        elif cfg.pos == "rope" and cfg.norm == "rmsnorm" and cfg.mlp == "swiglu" and cfg.n_experts:
            arch = (GPT_OSS if cfg.attn_sinks else DEEPSEEK_V3 if cfg.kv_lora_rank
                    else GLM4_MOE if cfg.router_scores == "sigmoid" else QWEN2_MOE if cfg.shared_expert_ffn_dim
                    else OLMOE if cfg.qk_norm_whole else QWEN3_MOE if cfg.qk_norm else MIXTRAL)
        elif cfg.pos == "rope" and cfg.norm == "rmsnorm" and cfg.mlp == "swiglu" and cfg.sandwich_norm:
            arch = GLM4
        elif cfg.pos == "rope" and cfg.norm == "rmsnorm" and cfg.mlp == "swiglu":
            granite = cfg.embed_multiplier or cfg.residual_multiplier or cfg.logit_divisor
            arch = (QWEN3 if cfg.qk_norm else QWEN2 if cfg.qkv_bias and not cfg.bias else MISTRAL if cfg.sliding_window
                    else SMOLLM3 if cfg.nope_every else GRANITE if granite else LLAMA)
        else:
            raise ValueError(
                f"no Hugging Face architecture matches pos={cfg.pos!r}, norm={cfg.norm!r}, mlp={cfg.mlp!r}: "
                "GPT2LMHeadModel needs learned/layernorm/gelu, the others rope/rmsnorm/swiglu (geglu: Gemma)")
    why = _cannot_express(arch, cfg)
    if why:
        raise ValueError(f"{arch} cannot express this model: {why}")
    return arch


def _cannot_express(arch: str, cfg: ModelConfig) -> str | None:
    """Why `arch` cannot hold `cfg` exactly, or None."""
    if arch not in SUPPORTED_ARCHITECTURES:
        return f"temper writes {', '.join(SUPPORTED_ARCHITECTURES)}"
    gemma_parts = (cfg.mlp == "geglu", cfg.norm_unit_offset, cfg.scale_embeddings)
    if arch == GPT2:
        if (cfg.pos, cfg.norm, cfg.mlp) != ("learned", "layernorm", "gelu"):
            return "it needs learned positions, LayerNorm and a GELU MLP"
        if cfg.kv_heads != cfg.n_heads or cfg.head_dim * cfg.n_heads != cfg.dim:
            return "it has no grouped-query attention or head_size"
        return "it has no sliding window" if cfg.sliding_window else None
    if (cfg.pos, cfg.norm) != ("rope", "rmsnorm"):
        return "it needs RoPE and RMSNorm"
    if arch in GEMMAS:
        if not all(gemma_parts) or not cfg.tie_embeddings:
            return "it needs mlp='geglu', norm_unit_offset, scale_embeddings and tied embeddings"
    elif arch in HYBRID:
        if (cfg.mlp, cfg.norm_unit_offset, cfg.scale_embeddings) != ("swiglu", True, False):
            return "it needs mlp='swiglu' and norm_unit_offset, without scale_embeddings"
    elif any(gemma_parts) or cfg.mlp != "swiglu":
        return "it needs mlp='swiglu' without norm_unit_offset or scale_embeddings"
    hybrid = (cfg.full_attention_every is not None, cfg.attn_output_gate)
    if arch in HYBRID and not all(hybrid):
        return "it has linear attention layers (full_attention_every) and gated attention (attn_output_gate)"
    if arch not in HYBRID and any(hybrid):
        return "it has neither linear attention layers nor gated attention (Qwen3_5ForCausalLM has both)"
    if arch in (LLAMA, GPT_OSS, GRANITE) and cfg.qkv_bias and not cfg.bias:
        return "its attention_bias also covers o_proj: q/k/v-only biases are Qwen2's"
    if arch == QWEN2 and (cfg.bias or not cfg.qkv_bias):
        return "it has biases on q, k and v only"
    if arch in (QWEN2_MOE, *GLM) and cfg.bias:
        return "it has biases on q, k and v at most"
    unbiased = (MISTRAL, QWEN3, *GEMMAS, PHI3, *POST_NORM, MIXTRAL, QWEN3_MOE, SMOLLM3, OLMOE)
    if arch in unbiased and (cfg.bias or cfg.qkv_bias):
        return "it has no biases"
    normed = (QWEN3, GEMMA3, QWEN3_MOE, EXAONE4, *WHOLE_QK_NORM, *HYBRID)
    if bool(cfg.kv_lora_rank) != (arch == DEEPSEEK_V3):
        return ("its attention is latent (kv_lora_rank), with experts" if arch == DEEPSEEK_V3
                else "it has no latent attention (DeepseekV3ForCausalLM has)")
    if cfg.qk_norm != (arch in normed) and arch != GLM4_MOE:  # GLM-4.5's are optional (use_qk_norm)
        return "it has q/k norms" if arch in normed else "it has no q/k norms (Qwen3, Qwen3-MoE, Gemma 3, OLMo 2 do)"
    if cfg.qk_norm_whole != (arch in WHOLE_QK_NORM):
        return ("its q/k norms span all heads" if arch in WHOLE_QK_NORM
                else "it normalises each head's query and key (OLMo 2 and 3 and OLMoE normalise all heads at once)")
    if cfg.pre_norm != (arch not in POST_NORM):
        return ("its blocks normalise only the sublayers' outputs" if arch in POST_NORM
                else "it normalises each sublayer's input (OLMo 2 and 3 and EXAONE 4 do not)")
    if bool(cfg.n_experts) != (arch in MOE_ARCHITECTURES):
        return ("its MLPs are mixtures of experts (n_experts)" if arch in MOE_ARCHITECTURES
                else "its MLP is dense (MixtralForCausalLM and Qwen3MoeForCausalLM have experts)")
    # (expert_weights_float32 is not checked: either rounding is a 16-bit model's last bit, and equal in float32.)
    if arch in (MIXTRAL, GPT_OSS) and (not cfg.renormalize_experts or cfg.expert_hidden_dim != cfg.hidden_dim):
        return "it renormalises the chosen experts' weights, and its experts are ffn_dim wide"
    if arch == QWEN3_5_MOE and not cfg.renormalize_experts:  # (Qwen3-Next's: norm_topk_prob)
        return "it renormalises the chosen experts' weights"
    if arch == OLMOE and cfg.expert_hidden_dim != cfg.hidden_dim:
        return "its experts are ffn_dim wide (intermediate_size)"
    if (cfg.shared_expert_ffn_dim is not None, cfg.shared_expert_gate) != (arch in (*SHARED_GATED, *SIGMOID_MOE),
                                                                            arch in SHARED_GATED):
        return ("its experts have a gated shared expert beside them" if arch in SHARED_GATED
                else "its experts have shared ones beside them, ungated" if arch in SIGMOID_MOE
                else "it has no shared expert (Qwen2MoeForCausalLM has one, gated)")
    deepseek = (cfg.router_scores == "sigmoid", cfg.expert_choice_bias)
    if arch in SIGMOID_MOE and (not all(deepseek) or cfg.shared_expert_ffn_dim % cfg.expert_hidden_dim):
        return ("it scores experts by sigmoids, chooses them with a bias, and its shared experts are a whole number of "
                "experts wide")
    if arch not in SIGMOID_MOE and (any(deepseek) or cfg.expert_groups != 1 or cfg.routed_scaling != 1.0
                                    or cfg.dense_layers):
        return ("it routes by a softmax, without a choice bias, groups of experts, scaling or dense layers "
                "(Glm4MoeForCausalLM has them)")
    if cfg.sandwich_norm != (arch in (*SANDWICH, *POST_NORM)):
        return ("it has norms on the sublayers' outputs" if arch in (*SANDWICH, *POST_NORM)
                else "it has no norms on the sublayers' outputs (Gemma 2 and 3 and OLMo 2 and 3 do)")
    if cfg.attn_scale_dim is not None and arch not in (GEMMA2, GEMMA3, GRANITE):
        return ("it scales attention scores by head_dim ** -0.5 (Gemma 2 and 3 have query_pre_attn_scalar, Granite "
                "attention_multiplier)")
    if (cfg.embed_multiplier or cfg.residual_multiplier or cfg.logit_divisor) and arch != GRANITE:
        return "it has no embedding, residual or logit multipliers (GraniteForCausalLM has)"
    if cfg.global_every and arch not in LOCAL_GLOBAL:
        return "it has no global layers between windowed ones (Gemma 2 and 3 and OLMo 3 do)"
    if cfg.rope_local_theta and not (arch == GEMMA3 or arch == OLMO3 and cfg.rope_local_theta == cfg.rope_theta):
        return ("its windowed layers share the global layers' RoPE base (Gemma3ForCausalLM has "
                "rope_local_base_freq)")
    if (cfg.attn_softcap or cfg.logit_softcap) and arch not in (GEMMA2, GEMMA3):
        return "it caps neither attention scores nor logits (Gemma 2 and 3 do)"
    oss_parts = (cfg.attn_sinks, cfg.swiglu_limit is not None)
    if arch == GPT_OSS and not (all(oss_parts) and cfg.bias):
        return "it has attention sinks, clamped SwiGLU experts and biases on every layer"
    if arch != GPT_OSS and any(oss_parts):
        return "it has no attention sinks or clamped SwiGLU (GptOssForCausalLM does)"
    windowed = any(cfg.window_of(i) for i in range(cfg.n_layers))
    if arch in (GEMMA3, OLMO3) and windowed and cfg.rope_scaling and cfg.rope_local_theta is None:
        return "its sliding-window layers take no RoPE scaling: give them rope_local_theta"
    if arch == PHI3 and cfg.rope_scaling and cfg.rope_scaling["rope_type"] != "longrope":
        return "its RoPE scaling is LongRoPE's (Phi3Config reads no other)"
    if cfg.rope_dim is not None and arch not in (PHI3, *GLM, DEEPSEEK_V3, *HYBRID):
        return "it rotates whole heads (Phi3ForCausalLM and Glm4ForCausalLM have partial_rotary_factor)"
    if (cfg.rope_dim is not None and arch != DEEPSEEK_V3
            and int(cfg.head_dim * (cfg.rope_dim / cfg.head_dim)) != cfg.rope_dim):
        return f"partial_rotary_factor cannot say rope_dim={cfg.rope_dim} of head_dim={cfg.head_dim} exactly"
    if arch == GPT_OSS and cfg.expert_weights_float32:
        return "it rounds the routing weights before it weighs the experts' outputs"
    if cfg.nope_every and arch not in (SMOLLM3, EXAONE4):
        return "it rotates every layer (SmolLM3ForCausalLM has NoPE layers)"
    if arch == EXAONE4 and cfg.nope_every != cfg.global_every:
        return "its global layers, and they alone, take no positions (nope_every = global_every)"
    if cfg.sliding_window and arch not in (MISTRAL, PHI3, *LOCAL_GLOBAL, MIXTRAL):
        return "it has no sliding window"
    return None


def to_hf_config(cfg: ModelConfig) -> dict[str, Any]:
    """A `config.json` that `transformers.AutoConfig` reads as the architecture `hf_architecture` picks."""
    arch = hf_architecture(cfg)
    if arch == GPT2:
        return {
            "architectures": [GPT2], "model_type": "gpt2",
            "vocab_size": cfg.vocab_size, "n_positions": cfg.max_seq_len, "n_embd": cfg.dim,
            "n_layer": cfg.n_layers, "n_head": cfg.n_heads, "n_inner": cfg.hidden_dim,
            "activation_function": "gelu_new",  # the tanh approximation, as GPT-2 was trained
            "layer_norm_epsilon": cfg.norm_eps, "initializer_range": cfg.init_std,
            "resid_pdrop": cfg.dropout, "embd_pdrop": cfg.dropout, "attn_pdrop": cfg.dropout,
            "scale_attn_weights": True, "scale_attn_by_inverse_layer_idx": False,
            "reorder_and_upcast_attn": False, "tie_word_embeddings": cfg.tie_embeddings,
            "bos_token_id": None, "eos_token_id": None, "use_cache": True,
        }
    d = {
        "architectures": [arch], "model_type": next(k for k, v in _MODEL_TYPES.items() if v == arch),
        "vocab_size": cfg.vocab_size, "hidden_size": cfg.dim, "intermediate_size": cfg.hidden_dim,
        "num_hidden_layers": cfg.n_layers, "num_attention_heads": cfg.n_heads,
        "num_key_value_heads": cfg.kv_heads, "head_dim": cfg.head_dim,
        "hidden_act": "gelu_pytorch_tanh" if arch in GEMMAS else "silu",
        "max_position_embeddings": cfg.max_seq_len, "rms_norm_eps": cfg.norm_eps,
        # The rope_theta / rope_scaling spelling of the published configs: transformers 4.x reads
        # it as is and 5.x converts it to `rope_parameters`.
        "rope_theta": cfg.rope_theta, "rope_scaling": dict(cfg.rope_scaling) if cfg.rope_scaling else None,
        "attention_dropout": cfg.dropout, "initializer_range": cfg.init_std,
        "tie_word_embeddings": cfg.tie_embeddings, "bos_token_id": None, "eos_token_id": None,
        "pad_token_id": None, "use_cache": True,  # token ids come from generation_config (save_hf)
    }
    if arch == LLAMA:
        d |= {"attention_bias": cfg.bias, "mlp_bias": cfg.bias, "pretraining_tp": 1}
    elif arch == GRANITE:
        d |= {"attention_bias": cfg.bias, "mlp_bias": cfg.bias, "embedding_multiplier": cfg.embed_multiplier or 1.0,
              "residual_multiplier": cfg.residual_multiplier or 1.0, "logits_scaling": cfg.logit_divisor or 1.0,
              "attention_multiplier": (cfg.attn_scale_dim or cfg.head_dim) ** -0.5}
    elif arch in (MISTRAL, PHI3, MIXTRAL):
        d["sliding_window"] = cfg.sliding_window
        if arch == PHI3:  # its original length at the top, where transformers reads it first
            d |= {"original_max_position_embeddings": (cfg.rope_scaling or {}).get("original_max_position_embeddings",
                                                                                    cfg.max_seq_len),
                  "resid_pdrop": cfg.dropout, "embd_pdrop": cfg.dropout,
                  "partial_rotary_factor": cfg.rotary_dim / cfg.head_dim}
    elif arch in GLM:
        d |= {"attention_bias": cfg.qkv_bias, "partial_rotary_factor": cfg.rotary_dim / cfg.head_dim}
    elif arch == EXAONE4:
        d |= {"sliding_window": cfg.sliding_window, "sliding_window_pattern": cfg.global_every or 0,
              "layer_types": _layer_types(cfg)}
    elif arch == SEED_OSS:
        d |= {"attention_bias": cfg.bias or cfg.qkv_bias, "attention_out_bias": cfg.bias, "mlp_bias": cfg.bias,
              "residual_dropout": cfg.dropout}
    elif arch == SMOLLM3:
        d |= {"no_rope_layers": [int(not last_of_every(i, cfg.nope_every)) for i in range(cfg.n_layers)],
              "no_rope_layer_interval": cfg.nope_every or 4, "use_sliding_window": False, "sliding_window": None,
              "attention_bias": False, "mlp_bias": False}
    elif arch in (QWEN2, QWEN3, QWEN3_MOE, QWEN2_MOE):
        d |= {"use_sliding_window": False, "sliding_window": None, "max_window_layers": cfg.n_layers}
        if arch in (QWEN3, QWEN3_MOE):
            d["attention_bias"] = False
    elif arch == GEMMA:
        d |= {"attention_bias": False, "hidden_activation": "gelu_pytorch_tanh"}
    elif arch in HYBRID:  # the rotated share written out: Qwen3_5TextConfig takes a missing one for 0.25
        (key_heads, value_heads), (key_size, value_size) = cfg.linear_heads, cfg.linear_sizes
        partial = cfg.rotary_dim / cfg.head_dim
        d |= {"attention_bias": False, "full_attention_interval": cfg.full_attention_every,
              "layer_types": ["linear_attention" if cfg.is_linear(i) else "full_attention" for i in range(cfg.n_layers)],
              "linear_conv_kernel_dim": cfg.linear_conv_size, "linear_key_head_dim": key_size,
              "linear_value_head_dim": value_size, "linear_num_key_heads": key_heads,
              "linear_num_value_heads": value_heads, "partial_rotary_factor": partial, "rope_scaling": None,
              "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta, "partial_rotary_factor": partial,
                                  **(cfg.rope_scaling or {})}}
    elif arch == OLMO2:
        d["attention_bias"] = False
    elif arch == OLMO3:  # one RoPE per layer type, written out: transformers 5 would give a flat config's windowed
        # layers Olmo3Config's default base, not rope_theta
        d |= {"attention_bias": False, "sliding_window": cfg.sliding_window,
              "layer_types": _layer_types(cfg),
              "rope_scaling": None,
              "rope_parameters": {"full_attention": {"rope_type": "default", "rope_theta": cfg.rope_theta,
                                                     **(cfg.rope_scaling or {})},
                                  "sliding_attention": {"rope_type": "default",
                                                        "rope_theta": cfg.rope_local_theta or cfg.rope_theta}}}
    elif arch in (GEMMA2, GEMMA3):  # Gemma 3: rope_theta and rope_scaling above are the global layers'
        d |= {"attention_bias": False, "hidden_activation": "gelu_pytorch_tanh",
              "query_pre_attn_scalar": cfg.attn_scale_dim or cfg.head_dim,
              "sliding_window": cfg.sliding_window,
              "layer_types": _layer_types(cfg),
              "final_logit_softcapping": cfg.logit_softcap, "attn_logit_softcapping": cfg.attn_softcap}
        if arch == GEMMA3:
            d |= {"rope_local_base_freq": cfg.rope_local_theta or cfg.rope_theta, "use_bidirectional_attention": False}
    if arch == GPT_OSS:  # one RoPE, written out: GptOssConfig would take a missing one for its YaRN default
        d |= {"attention_bias": True, "sliding_window": cfg.sliding_window,
              "layer_types": _layer_types(cfg),
              "num_local_experts": cfg.n_experts, "num_experts_per_tok": cfg.experts_per_token,
              "swiglu_limit": cfg.swiglu_limit, "swiglu_alpha": cfg.swiglu_alpha, "output_router_logits": False,
              "rope_scaling": None,
              "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta, **(cfg.rope_scaling or {})}}
    if arch == DEEPSEEK_V3:  # its rotated dims in adjacent pairs, as DeepSeek publishes them (`rope_pair_rows`)
        d |= {"head_dim": cfg.rotary_dim, "qk_rope_head_dim": cfg.rotary_dim, "kv_lora_rank": cfg.kv_lora_rank,
              "qk_nope_head_dim": cfg.head_dim - cfg.rotary_dim, "q_lora_rank": cfg.q_lora_rank,
              "v_head_dim": cfg.v_head_dim, "rope_interleave": True, "attention_bias": False,
              "rope_scaling": None, "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta,
                                                        **(cfg.rope_scaling or {})}}
    if arch in SIGMOID_MOE:  # no multi-token-prediction layers: temper trains none
        d |= {"n_routed_experts": cfg.n_experts, "num_experts_per_tok": cfg.experts_per_token,
              "moe_intermediate_size": cfg.expert_hidden_dim, "norm_topk_prob": cfg.renormalize_experts,
              "n_shared_experts": cfg.shared_expert_ffn_dim // cfg.expert_hidden_dim,
              "routed_scaling_factor": cfg.routed_scaling, "n_group": cfg.expert_groups,
              "topk_group": cfg.expert_groups_per_token, "first_k_dense_replace": cfg.dense_layers,
              "num_nextn_predict_layers": 0, "output_router_logits": False}
        if arch == GLM4_MOE:
            d["use_qk_norm"] = cfg.qk_norm
    elif arch == MIXTRAL:  # its experts are intermediate_size wide
        d |= {"num_local_experts": cfg.n_experts, "num_experts_per_tok": cfg.experts_per_token,
              "router_jitter_noise": 0.0, "output_router_logits": False}
    elif arch == OLMOE:
        d |= {"num_experts": cfg.n_experts, "num_experts_per_tok": cfg.experts_per_token, "clip_qkv": None,
              "norm_topk_prob": cfg.renormalize_experts, "attention_bias": False, "output_router_logits": False}
    elif arch in (QWEN3_5_MOE, QWEN3_NEXT):
        d |= {"num_experts": cfg.n_experts, "num_experts_per_tok": cfg.experts_per_token,
              "moe_intermediate_size": cfg.expert_hidden_dim, "shared_expert_intermediate_size": cfg.shared_expert_ffn_dim,
              "output_router_logits": False}
        if arch == QWEN3_NEXT:
            d |= {"norm_topk_prob": cfg.renormalize_experts, "decoder_sparse_step": 1, "mlp_only_layers": []}
    elif arch in (QWEN3_MOE, QWEN2_MOE):
        d |= {"num_experts": cfg.n_experts, "num_experts_per_tok": cfg.experts_per_token,
              "moe_intermediate_size": cfg.expert_hidden_dim, "norm_topk_prob": cfg.renormalize_experts,
              "decoder_sparse_step": 1, "mlp_only_layers": [], "output_router_logits": False}
        if arch == QWEN2_MOE:
            d |= {"qkv_bias": cfg.qkv_bias, "shared_expert_intermediate_size": cfg.shared_expert_ffn_dim}
    return d


def _layer_types(cfg: ModelConfig) -> list[str]:
    """transformers' `layer_types`: which layers attend within the sliding window."""
    return ["sliding_attention" if cfg.window_of(i) else "full_attention" for i in range(cfg.n_layers)]


# ---- weights: one list of rules per architecture, read both ways ------------------------------------


@dataclass(frozen=True)
class _Rule:
    """One Hugging Face tensor: temper's `parts` concatenated along dim 0, transposed if asked
    (GPT-2's Conv1D stores (in, out)). Fused projections (GPT-2 c_attn, Phi-3 qkv_proj and
    gate_up_proj) have several parts. `stacked`: the parts are every expert's (GPT-OSS), stacked as `_STACKED` says.
    `rope_pairs` (head_dim, first rotated row, rotated dims): rows of query or key heads whose rotated dims the
    checkpoint keeps as adjacent pairs (GLM-4's and DeepSeek's interleaved RoPE) and temper as two halves
    (`rope_pair_rows`). `groups` (G, block sizes): the parts' rows are blocks of G * size rows, which the checkpoint
    interleaves group by group (Qwen3-Next's in_proj_qkvz: `group_rows`)."""

    hf: str
    parts: tuple[str, ...]
    transpose: bool = False
    stacked: str = ""
    rope_pairs: tuple[int, int, int] | None = None
    groups: tuple[int, tuple[int, ...]] | None = None

    def hf_rows(self, t: torch.Tensor, to_hf: bool) -> torch.Tensor:
        """Rows of this tensor (or of an adapter's B, a DoRA magnitude) in the checkpoint's order (to_hf) or temper's."""
        if self.rope_pairs:
            return rope_pair_rows(t, self.rope_pairs, to_hf)
        return group_rows(t, self.groups, to_hf) if self.groups else t


def rope_pair_rows(t: torch.Tensor, pairs: tuple[int, int, int], to_hf: bool) -> torch.Tensor:
    """Rows (heads * head_dim, ...) with the r rotated rows of each head, from row `start` on, reordered between the
    two RoPE layouts: adjacent pairs (x0, x1), (x2, x3), ... (the checkpoint's) and halves x0, x2, ..., x1, x3, ...
    (temper's), which rotate alike; q . k is the same sum in either order. Moving the rows once, at load and export,
    keeps one RoPE kernel. GLM-4 rotates each head's first rows; DeepSeek's latent attention its last (and the rotated
    key part after the latent, as one head)."""
    head_dim, start, r = pairs
    heads = t.reshape(-1, head_dim, *t.shape[1:])  # (H, D, ...)
    rot = heads[:, start:start + r]
    rot = (torch.stack((rot[:, : r // 2], rot[:, r // 2:]), dim=2).flatten(1, 2) if to_hf
           else torch.cat((rot[:, 0::2], rot[:, 1::2]), dim=1))
    return torch.cat((heads[:, :start], rot, heads[:, start + r:]), dim=1).reshape(t.shape)


def group_rows(t: torch.Tensor, groups: tuple[int, tuple[int, ...]], to_hf: bool) -> torch.Tensor:
    """Rows reordered between temper's blocks (each G * size rows: every group's rows of one kind, as q, k, v and z
    of all heads) and the checkpoint's groups (each group's rows of every block: Qwen3-Next's in_proj_qkvz holds, per
    key head, its q, k, the values and the gates of the value heads it serves)."""
    G, sizes = groups
    if to_hf:
        blocks = t.split([G * size for size in sizes])
        return torch.cat([b.reshape(G, size, *t.shape[1:]) for b, size in zip(blocks, sizes, strict=True)],
                         dim=1).reshape(t.shape)
    per_group = t.reshape(G, sum(sizes), *t.shape[1:]).split(list(sizes), dim=1)
    return torch.cat([b.reshape(G * size, *t.shape[1:]) for b, size in zip(per_group, sizes, strict=True)])


def _interleave(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """(F, ...) gate and up rows -> (2F, ...) rows gate_0, up_0, gate_1, ... (GPT-OSS's gate_up layout)."""
    return torch.stack((gate, up), dim=1).flatten(0, 1)


_STACKED: dict[str, tuple[Any, Any]] = {
    # name: (temper parts -> the HF tensor, the HF tensor -> temper parts). GPT-OSS stacks its experts, (in, out)
    # each, gate and up interleaved by columns: gate_up_proj (E, D, 2F), down_proj (E, F, D), and their biases.
    "gate_up": (lambda ps: torch.stack([_interleave(g, u).t() for g, u in zip(ps[::2], ps[1::2], strict=True)]),
                lambda t: [w for e in t for w in (e[:, 0::2].t(), e[:, 1::2].t())]),
    "gate_up_bias": (lambda ps: torch.stack([_interleave(g, u) for g, u in zip(ps[::2], ps[1::2], strict=True)]),
                     lambda t: [b for e in t for b in (e[0::2], e[1::2])]),
    "down": (lambda ps: torch.stack([w.t() for w in ps]), lambda t: [e.t() for e in t]),
    "down_bias": (lambda ps: torch.stack(ps), lambda t: list(t)),
}


def hf_rules(cfg: ModelConfig) -> list[_Rule]:
    """Every tensor of the Hugging Face checkpoint of `cfg`, in the architecture's order."""
    arch = hf_architecture(cfg)
    keys = _native_keys(cfg)
    rules: list[_Rule] = []
    if arch == GPT2:
        # GPT-2 always has biases: a temper model without them is exported with zero ones.
        add = lambda hf, *parts, t=False: rules.append(_Rule("transformer." + hf, parts, t))
        add("wte.weight", "tok_emb.weight")
        add("wpe.weight", "pos_emb.weight")
        for i in range(cfg.n_layers):
            p, h = f"layers.{i}.", f"h.{i}."
            for hf_norm, norm in (("ln_1", "attn_norm"), ("ln_2", "mlp_norm")):
                add(f"{h}{hf_norm}.weight", f"{p}{norm}.weight")
                add(f"{h}{hf_norm}.bias", f"{p}{norm}.bias")
            for t in ("weight", "bias"):
                add(f"{h}attn.c_attn.{t}", *(f"{p}attn.{n}_proj.{t}" for n in "qkv"), t=t == "weight")
                add(f"{h}attn.c_proj.{t}", f"{p}attn.o_proj.{t}", t=t == "weight")
                add(f"{h}mlp.c_fc.{t}", f"{p}mlp.up_proj.{t}", t=t == "weight")
                add(f"{h}mlp.c_proj.{t}", f"{p}mlp.down_proj.{t}", t=t == "weight")
        add("ln_f.weight", "norm.weight")
        add("ln_f.bias", "norm.bias")
    else:
        add = lambda hf, *parts: rules.append(_Rule(hf, parts))
        add("model.embed_tokens.weight", "tok_emb.weight")
        for i in range(cfg.n_layers):
            p, h = f"layers.{i}.", f"model.layers.{i}."
            # Gemma 2's and 3's post_attention_layernorm is the attention output's norm; Llama's is the MLP's input norm.
            norms = (("input_layernorm", "attn_norm"), ("post_attention_layernorm", "mlp_norm"))
            if arch in (GEMMA2, GEMMA3):
                norms = (("input_layernorm", "attn_norm"), ("post_attention_layernorm", "attn_out_norm"),
                         ("pre_feedforward_layernorm", "mlp_norm"), ("post_feedforward_layernorm", "mlp_out_norm"))
            elif arch in POST_NORM:  # the outputs' norms only
                norms = (("post_attention_layernorm", "attn_out_norm"), ("post_feedforward_layernorm", "mlp_out_norm"))
            elif arch == GLM4:  # sandwich norms under its own names
                norms = (("input_layernorm", "attn_norm"), ("post_self_attn_layernorm", "attn_out_norm"),
                         ("post_attention_layernorm", "mlp_norm"), ("post_mlp_layernorm", "mlp_out_norm"))
            for theirs, ours in norms:
                add(f"{h}{theirs}.weight", f"{p}{ours}.weight")
            if cfg.is_linear(i):  # Gated DeltaNet, under Qwen3.5's names
                fused = ()
                if arch == QWEN3_NEXT:  # q, k, v and z fused, b and a fused, each interleaved by key head
                    (hk, hv), (dk, dv) = cfg.linear_heads, cfg.linear_sizes
                    r = hv // hk
                    for hf, parts, sizes in (("in_proj_qkvz", ("qkv", "z"), (dk, dk, r * dv, r * dv)),
                                             ("in_proj_ba", ("b", "a"), (r, r))):
                        rules.append(_Rule(f"{h}linear_attn.{hf}.weight", tuple(f"{p}attn.in_proj_{x}.weight"
                                                                                  for x in parts), groups=(hk, sizes)))
                    fused = ("in_proj_qkv.weight", "in_proj_z.weight", "in_proj_b.weight", "in_proj_a.weight")
                for n in ("in_proj_qkv.weight", "in_proj_z.weight", "in_proj_b.weight", "in_proj_a.weight",
                          "conv1d.weight", "A_log", "dt_bias", "norm.weight", "out_proj.weight"):
                    if n not in fused:
                        add(f"{h}linear_attn.{n}", f"{p}attn.{n}")
            if arch == PHI3:
                add(h + "self_attn.qkv_proj.weight", *(f"{p}attn.{n}_proj.weight" for n in "qkv"))
                add(h + "self_attn.o_proj.weight", p + "attn.o_proj.weight")
                add(h + "mlp.gate_up_proj.weight", p + "mlp.gate_proj.weight", p + "mlp.up_proj.weight")
                add(h + "mlp.down_proj.weight", p + "mlp.down_proj.weight")
                continue
            if arch == DEEPSEEK_V3:  # latent attention: q through its latent or not, k and v through theirs
                for n in ("q_proj", "q_a_proj", "q_a_layernorm", "q_b_proj", "kv_a_proj_with_mqa", "kv_a_layernorm",
                          "kv_b_proj", "o_proj"):
                    if f"{p}attn.{n}.weight" in keys:  # rotated dims last in each head, and after the latent
                        rows = (cfg.kv_lora_rank + cfg.rotary_dim, cfg.kv_lora_rank, cfg.rotary_dim) if n.startswith(
                            "kv_a_proj") else (cfg.head_dim, cfg.head_dim - cfg.rotary_dim, cfg.rotary_dim)
                        rules.append(_Rule(f"{h}self_attn.{n}.weight", (f"{p}attn.{n}.weight",), rope_pairs=rows
                                           if n in ("q_proj", "q_b_proj", "kv_a_proj_with_mqa") else None))
            else:
                pairs = (cfg.head_dim, 0, cfg.rotary_dim) if arch == GLM4 else None  # its q and k rows in RoPE's pairs
                for n in "qkvo":
                    for t in ("weight", "bias"):
                        if f"{p}attn.{n}_proj.{t}" in keys:
                            rules.append(_Rule(f"{h}self_attn.{n}_proj.{t}", (f"{p}attn.{n}_proj.{t}",),
                                               rope_pairs=pairs if n in "qk" else None))
            if arch == GLM4:  # gate and up fused, as Phi-3's
                add(h + "mlp.gate_up_proj.weight", p + "mlp.gate_proj.weight", p + "mlp.up_proj.weight")
                add(h + "mlp.down_proj.weight", p + "mlp.down_proj.weight")
                continue
            for n in ("q_norm", "k_norm"):
                if f"{p}attn.{n}.weight" in keys:
                    add(f"{h}self_attn.{n}.weight", f"{p}attn.{n}.weight")
            if arch == GPT_OSS:  # the experts stacked (`_STACKED`), the router with its bias, a sink per head
                add(f"{h}self_attn.sinks", f"{p}attn.sinks")
                add(f"{h}mlp.router.weight", f"{p}mlp.router.weight")
                add(f"{h}mlp.router.bias", f"{p}mlp.router.bias")
                experts = range(cfg.n_experts)
                for name, parts in (("gate_up_proj", ("gate", "up")), ("down_proj", ("down",))):
                    for t, suffix in (("weight", ""), ("bias", "_bias")):
                        rules.append(_Rule(f"{h}mlp.experts.{name}{suffix}", tuple(
                            f"{p}mlp.experts.{j}.{n}_proj.{t}" for j in experts for n in parts),
                            stacked=name.removesuffix("_proj") + suffix))
            elif f"{p}mlp.router.weight" in keys:  # transformers 5 fuses the experts in memory but reads and writes
                # them one by one
                moe = f"{h}block_sparse_moe." if arch == MIXTRAL else f"{h}mlp."
                add(f"{moe}gate.weight", f"{p}mlp.router.weight")
                if cfg.expert_choice_bias:
                    add(f"{moe}gate.e_score_correction_bias", f"{p}mlp.choice_bias")
                names = ("w1", "w3", "w2") if arch == MIXTRAL else ("gate_proj", "up_proj", "down_proj")
                for j in range(cfg.n_experts):
                    for theirs, ours in zip(names, ("gate", "up", "down"), strict=True):
                        add(f"{moe}experts.{j}.{theirs}.weight", f"{p}mlp.experts.{j}.{ours}_proj.weight")
                if cfg.shared_expert_ffn_dim:  # Qwen2-MoE's, under the same names; GLM-4.5's, plural
                    shared = "shared_experts" if arch in SIGMOID_MOE else "shared_expert"
                    for n in ("gate_proj", "up_proj", "down_proj"):
                        add(f"{moe}{shared}.{n}.weight", f"{p}mlp.shared_expert.{n}.weight")
                    if cfg.shared_expert_gate:
                        add(f"{moe}shared_expert_gate.weight", f"{p}mlp.shared_expert_gate.weight")
            for n in ("gate", "up", "down"):
                for t in ("weight", "bias"):
                    if f"{p}mlp.{n}_proj.{t}" in keys:
                        add(f"{h}mlp.{n}_proj.{t}", f"{p}mlp.{n}_proj.{t}")
        add("model.norm.weight", "norm.weight")
    if not cfg.tie_embeddings:
        rules.append(_Rule("lm_head.weight", ("head.weight",)))
    return rules


def _ignored(name: str, cfg: ModelConfig) -> bool:
    """HF tensors that carry nothing to load: recomputed buffers, a tied head saved anyway, the vision tower of a
    Gemma 3 or Qwen3.5 image-text checkpoint, and multi-token-prediction layers (DeepSeek-V3's, GLM-4.5's, Qwen3.5's)."""
    return (name.endswith(("rotary_emb.inv_freq", ".attn.bias", ".attn.masked_bias"))
            or (cfg.hf_architecture in SIGMOID_MOE and _layer_index(name) >= cfg.n_layers)  # multi-token prediction
            or (name in ("lm_head.weight", "language_model.lm_head.weight") and cfg.tie_embeddings)
            or (cfg.hf_architecture == GEMMA3 and name.startswith(_GEMMA3_VISION))
            or (cfg.hf_architecture in HYBRID and name.startswith(_QWEN3_5_SKIPPED)))


def _layer_index(name: str) -> int:
    """i of a "model.layers.{i}." tensor; -1 for others."""
    parts = name.split(".")
    return int(parts[2]) if parts[:2] == ["model", "layers"] and len(parts) > 2 and parts[2].isdigit() else -1


def _canonical(name: str, arch: str) -> str:
    """A bare `GPT2Model` checkpoint names its tensors without the `transformer.` prefix; a Gemma 3 or Qwen3.5
    image-text one keeps its text model's under `language_model.`."""
    if arch == GPT2 and not name.startswith(("transformer.", "lm_head.")):
        return "transformer." + name
    if arch in (GEMMA3, *HYBRID):
        for prefix, to in _GEMMA3_TEXT_PREFIXES.items():
            if name.startswith(prefix):
                return to + name[len(prefix):]
    return name


def _native_keys(cfg: ModelConfig) -> set[str]:
    with torch.device("meta"):
        return set(Transformer(cfg).state_dict().keys())


def _to_hf(rule: _Rule, sd: dict[str, torch.Tensor]) -> torch.Tensor:
    parts = []
    for p in rule.parts:
        if p in sd:
            parts.append(sd[p])
        else:  # a bias temper leaves out (GPT-2 export): zeros, the same function
            w = sd[p.removesuffix(".bias") + ".weight"]
            parts.append(torch.zeros(w.shape[0], dtype=w.dtype, device=w.device))
    if rule.stacked:
        return _STACKED[rule.stacked][0](parts)
    t = rule.hf_rows(torch.cat(parts) if len(parts) > 1 else parts[0], to_hf=True)
    return t.t() if rule.transpose else t


def _read_into(f: SafetensorsFile | _PickledFile, name: str, rule: _Rule, outs: list[torch.Tensor],
               scratch: torch.Tensor) -> torch.Tensor:
    """Fill temper's tensors `outs` from checkpoint tensor `name`, cast and moved on the way, read
    in slices of rows through `scratch` (returned, grown if it had to be): one buffer of about
    _SLICE_BYTES for the whole load, since temporaries allocated per tensor fragment the heap
    (~25% more memory at the peak, measured on GPT-2)."""
    dtype, shape, _, _ = f.entries[name]
    row_bytes = max(1, math.prod(shape[1:]) * dtype.itemsize)
    step = max(1, _SLICE_BYTES // row_bytes)
    if scratch.numel() < min(step, shape[0]) * row_bytes:
        scratch = torch.empty(min(step, shape[0]) * row_bytes, dtype=torch.uint8)
    ends = [0]
    for out in outs:  # where each part starts along the split axis (rows, or columns when transposed)
        ends.append(ends[-1] + out.shape[0])
    for r in range(0, shape[0], step):
        chunk = f.read(name, slice(r, r + step), scratch)  # (k, ...) rows r.. of the checkpoint's tensor
        for out, lo, hi in zip(outs, ends, ends[1:], strict=False):
            if rule.transpose:  # checkpoint (in, sum(out)): these rows are columns r.. of every part
                out[:, r:r + len(chunk)].copy_(chunk[:, lo:hi].t())
            elif lo < r + len(chunk) and hi > r:  # the rows of this part inside the slice
                a, b = max(lo, r), min(hi, r + len(chunk))
                out[a - lo:b - lo].copy_(chunk[a - r:b - r])
    return scratch


def _to_temper(rule: _Rule, t: torch.Tensor, sizes: list[int]) -> list[torch.Tensor]:
    if rule.stacked:
        return _STACKED[rule.stacked][1](t)
    t = rule.hf_rows(t.t() if rule.transpose else t, to_hf=False)
    return list(t.split(sizes)) if len(sizes) > 1 else [t]


def to_hf_state_dict(cfg: ModelConfig, sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """temper state dict -> Hugging Face names and layouts (contiguous, ready for safetensors)."""
    sd = _strip_wrappers(sd)
    _check_keys(sd, _native_keys(cfg), "temper state dict")
    return {r.hf: _to_hf(r, sd).detach().contiguous() for r in hf_rules(cfg)}


def from_hf_state_dict(cfg: ModelConfig, sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Hugging Face state dict (in memory) -> temper names and layouts."""
    arch = hf_architecture(cfg)
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in Transformer(cfg).state_dict().items()}
    rules = {r.hf: r for r in hf_rules(cfg)}
    out: dict[str, torch.Tensor] = {}
    if arch in MOE_ARCHITECTURES and arch != GPT_OSS:
        sd = _unfused_experts(sd, arch)
    for name, t in sd.items():
        if _ignored(name, cfg):
            continue
        rule = rules.get(_canonical(name, arch))
        if rule is None:
            raise KeyError(f"unexpected {arch} weight {name!r}")
        _check_shape(rule, t.shape, shapes, "state dict")
        out |= dict(zip(rule.parts, _to_temper(rule, t, [shapes[p][0] for p in rule.parts]), strict=True))
    _check_keys(out, set(shapes), "Hugging Face checkpoint")
    return {k: v.contiguous() for k, v in out.items()}


_FUSED_EXPERTS = (".mlp.experts.gate_up_proj", ".mlp.experts.down_proj")
"""transformers 5's in-memory experts: (E, 2F, D) gate and up stacked, (E, D, F) down."""


def _unfused_experts(sd: dict[str, torch.Tensor], arch: str) -> dict[str, torch.Tensor]:
    """A transformers 5 model's own state dict (`model.state_dict()`, experts stacked as `_FUSED_EXPERTS`) in the
    per-expert names its `save_pretrained` writes, which the rules describe; other names pass unchanged."""
    out = {}
    moe, (gate, up, down) = ((".block_sparse_moe.", ("w1", "w3", "w2")) if arch == MIXTRAL
                             else (".mlp.", ("gate_proj", "up_proj", "down_proj")))
    for name, t in sd.items():
        if name.endswith(_FUSED_EXPERTS[0]):
            stem = name.removesuffix(_FUSED_EXPERTS[0]) + moe + "experts."
            for j, (g, u) in enumerate(zip(*t.chunk(2, dim=1), strict=True)):
                out[f"{stem}{j}.{gate}.weight"], out[f"{stem}{j}.{up}.weight"] = g, u
        elif name.endswith(_FUSED_EXPERTS[1]):
            stem = name.removesuffix(_FUSED_EXPERTS[1]) + moe + "experts."
            out |= {f"{stem}{j}.{down}.weight": w for j, w in enumerate(t)}
        elif name.endswith(".mlp.gate.weight"):
            out[name.removesuffix(".mlp.gate.weight") + moe + "gate.weight"] = t
        else:
            out[name] = t
    return out


def _check_shape(rule: _Rule, got: torch.Size | tuple, shapes: dict[str, torch.Size], where: str) -> None:
    first = shapes[rule.parts[0]]
    expected = (sum(shapes[p][0] for p in rule.parts), *first[1:])
    if rule.transpose:
        expected = expected[::-1]
    if rule.stacked:  # what the stacking makes of the parts' shapes, worked out on the meta device
        expected = tuple(_STACKED[rule.stacked][0]([torch.empty(shapes[p], device="meta") for p in rule.parts]).shape)
    if tuple(got) != tuple(expected):
        raise CheckpointError(f"{where}: {rule.hf} has shape {list(got)}, expected {list(expected)} "
                              f"(temper {', '.join(rule.parts)})")


def _check_keys(got: dict[str, torch.Tensor], expected: set[str], what: str) -> None:
    missing, unexpected = sorted(expected - got.keys()), sorted(got.keys() - expected)
    if missing or unexpected:
        raise KeyError(f"{what}: missing {missing[:8]}{'...' if len(missing) > 8 else ''}, "
                       f"unexpected {unexpected[:8]}{'...' if len(unexpected) > 8 else ''}")


def _strip_wrappers(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = {}
    for k, v in sd.items():
        for prefix in _WRAPPER_PREFIXES:
            k = k.replace(prefix, "")
        out[k] = v
    return out


# ---- weight files ------------------------------------------------------------------------------------

_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}


MAX_HEADER_BYTES = 100 << 20  # the safetensors reader's own limit: a bigger header is an attack, not a model


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """json's object hook that refuses a key given twice (json.loads would keep the last silently)."""
    out = dict(pairs)
    if len(out) != len(pairs):
        seen: set[str] = set()
        twice = next(k for k, _ in pairs if k in seen or seen.add(k))
        raise ValueError(f"key {twice!r} appears twice")
    return out


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _header_entry(path: Path, name: str, e: Any, data: int) -> tuple[torch.dtype, tuple[int, ...], int, int]:
    """(dtype, shape, begin, end) of one header entry, checked against a data section of `data` bytes."""
    where = f"{path}: tensor {name!r}"
    if not isinstance(e, dict):
        raise CheckpointError(f"{where}: header entry must be an object, got {e!r}")
    if not isinstance(e.get("dtype"), str) or e["dtype"] not in _DTYPES:
        raise CheckpointError(f"{where}: unknown dtype {e.get('dtype')!r} (temper reads {', '.join(_DTYPES)})")
    shape, offsets = e.get("shape"), e.get("data_offsets")
    if not isinstance(shape, list) or not all(_is_int(s) and s >= 0 for s in shape):
        raise CheckpointError(f"{where}: shape must be a list of non-negative integers, got {shape!r}")
    if not isinstance(offsets, list) or len(offsets) != 2 or not all(_is_int(o) for o in offsets):
        raise CheckpointError(f"{where}: data_offsets must be two integers [begin, end], got {offsets!r}")
    dtype, (begin, end) = _DTYPES[e["dtype"]], offsets
    if not 0 <= begin <= end <= data:
        raise CheckpointError(f"{where} has out-of-range offsets [{begin}, {end}] (data section {data} bytes)")
    nbytes = math.prod(shape) * dtype.itemsize
    if end - begin != nbytes:
        raise CheckpointError(f"{where}: offsets [{begin}, {end}] hold {end - begin} bytes, but {e['dtype']} "
                              f"shape {shape} needs {nbytes}")
    return dtype, tuple(shape), begin, end


def _check_no_overlap(path: Path, entries: dict[str, tuple[torch.dtype, tuple[int, ...], int, int]]) -> None:
    """Two tensors whose bytes overlap would alias each other once mapped: refuse the file."""
    spans = sorted((begin, end, name) for name, (_, _, begin, end) in entries.items() if end > begin)
    for (prev_begin, prev_end, prev), (begin, end, name) in zip(spans, spans[1:], strict=False):
        if begin < prev_end:  # sorted by begin: any overlap shows up between neighbours
            raise CheckpointError(f"{path}: tensor {name!r} (offsets [{begin}, {end}]) overlaps tensor {prev!r} "
                                  f"([{prev_begin}, {prev_end}])")


class SafetensorsFile:
    """A safetensors file read tensor by tensor: memory-mapped, or copied out with plain reads.

    Written here rather than taken from `safetensors.safe_open` for two reasons: its tensors are
    copies out of a memory map whose touched pages count again towards the process's memory (a
    loaded model would be held ~twice at the peak), and a damaged header is reported here by file
    and tensor. A tensor used as it is stored is a copy-on-write view of the file (`mapped`): no
    copy, and its pages are read on first use. The format: an 8-byte little-endian header size, a
    JSON header {name: {dtype, shape, data_offsets: [begin, end]}} and the data, offsets relative
    to its start.

    Every entry is checked as the format's own reader checks it: a header of at
    most 100 MiB, a known dtype, a shape of non-negative integers, integer offsets inside the data
    section that hold exactly dtype x shape bytes, and no two tensors sharing bytes (overlapping
    offsets would alias one tensor's memory as another's).
    """

    def __init__(self, path: Path):
        self.path = path
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise CheckpointError(f"{path}: not a safetensors file ({size} bytes)")
            (n,) = struct.unpack("<Q", head)
            if n > MAX_HEADER_BYTES:
                raise CheckpointError(f"{path}: corrupt safetensors header (declares {n} bytes, over the "
                                      f"{MAX_HEADER_BYTES >> 20} MiB limit)")
            if n > size - 8:
                raise CheckpointError(f"{path}: corrupt safetensors header (declares {n} bytes, file has {size})")
            try:
                header = json.loads(f.read(n), object_pairs_hook=_no_duplicates)
            except (json.JSONDecodeError, UnicodeDecodeError, ValueError) as e:
                raise CheckpointError(f"{path}: corrupt safetensors header ({e})") from None
        if not isinstance(header, dict):
            raise CheckpointError(f"{path}: corrupt safetensors header (not a JSON object)")
        header.pop("__metadata__", None)
        self.start, data = 8 + n, size - 8 - n
        self.entries: dict[str, tuple[torch.dtype, tuple[int, ...], int, int]] = {
            name: _header_entry(path, name, e, data) for name, e in header.items()}
        _check_no_overlap(path, self.entries)
        self._map: mmap.mmap | None = None

    def mapped(self, name: str) -> torch.Tensor | None:
        """Tensor `name` as a copy-on-write view of the file (writes stay in memory), or None when
        its bytes are not aligned to its dtype."""
        dtype, shape, begin, _ = self.entries[name]
        offset = self.start + begin
        if offset % dtype.itemsize or not math.prod(shape):
            return None
        if self._map is None:
            with open(self.path, "rb") as f:
                self._map = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
        with warnings.catch_warnings():  # "non-writable buffer": ACCESS_COPY is writable, copy on write
            warnings.simplefilter("ignore", UserWarning)
            return torch.frombuffer(self._map, dtype=dtype, count=math.prod(shape), offset=offset).view(shape)

    def read(self, name: str, rows: slice = slice(None), scratch: torch.Tensor | None = None) -> torch.Tensor:
        """Tensor `name` (or some of its rows) copied with plain reads into a new CPU tensor, or
        into the bytes of `scratch` (uint8, big enough) when given."""
        dtype, shape, begin, _ = self.entries[name]
        start, stop, _ = rows.indices(shape[0])
        row_bytes = math.prod(shape[1:]) * dtype.itemsize
        nbytes = (stop - start) * row_bytes
        if scratch is None:
            out = torch.empty((stop - start, *shape[1:]), dtype=dtype)
        else:
            out = scratch[:nbytes].view(dtype).view(stop - start, *shape[1:])
        if nbytes:
            with open(self.path, "rb") as f:
                f.seek(self.start + begin + start * row_bytes)
                if f.readinto(memoryview(out.view(-1).view(torch.uint8).numpy())) != nbytes:
                    raise CheckpointError(f"{self.path}: truncated while reading {name!r}")
        return out


class _PickledFile:
    """A `pytorch_model*.bin` file, read with torch.load(weights_only=True): no code runs."""

    def __init__(self, path: Path):
        self.path = path
        try:
            sd = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except Exception as e:  # torch raises many kinds for a damaged or unsafe pickle
            raise CheckpointError(f"{path}: cannot be read with torch.load(weights_only=True) ({e})") from None
        if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
            raise CheckpointError(f"{path}: not a state dict of tensors")
        self.tensors = sd
        self.entries = {k: (v.dtype, tuple(v.shape), 0, 0) for k, v in sd.items()}

    def mapped(self, name: str) -> torch.Tensor | None:
        return self.tensors[name]  # already a map of the file (loaded with mmap=True)

    def read(self, name: str, rows: slice = slice(None), scratch: torch.Tensor | None = None) -> torch.Tensor:
        return self.tensors[name][rows]


def _member(root: Path, name: str) -> Path:
    """`checkpoint_file` (the one rule for names and symlinks in a checkpoint directory), its
    errors as CheckpointError."""
    try:
        return checkpoint_file(root, name)
    except InputError as e:
        raise CheckpointError(str(e)) from None


def _index_members(root: Path, index: Path) -> list[Path]:
    """The files an index's weight_map names, each refused when its name leaves the directory."""
    weight_map = read_json_object(index, CheckpointError).get("weight_map")
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise CheckpointError(f"{index}: not a weight index (weight_map must map tensor names to file names)")
    for tensor, name in weight_map.items():
        try:
            checkpoint_file(root, name)
        except UnsafePath:
            raise CheckpointError(f"{index}: tensor {tensor!r} is mapped to {name!r}, which escapes {root}") from None
    return [_member(root, n) for n in sorted(set(weight_map.values()))]


def _weight_files(root: Path, allow_pickle: bool) -> list[SafetensorsFile | _PickledFile]:
    """The weight files of a checkpoint directory, safetensors first."""
    for single, index, kind in (("model.safetensors", "model.safetensors.index.json", SafetensorsFile),
                                ("pytorch_model.bin", "pytorch_model.bin.index.json", _PickledFile)):
        names: list[Path] = []
        if _member(root, single).is_file():
            names = [root / single]
        elif _member(root, index).is_file():
            names = _index_members(root, root / index)
        if not names:
            continue
        if kind is _PickledFile and not allow_pickle:
            raise CheckpointError(
                f"{root}: only pickled weights ({names[0].name}); pass allow_pickle=True (--allow-pickle) to read "
                "them with torch.load(weights_only=True), or convert them to safetensors")
        missing = [p.name for p in names if not p.is_file()]
        if missing:
            raise CheckpointError(f"{root}: the index names missing files {missing[:3]}")
        return [kind(p) for p in names]
    found = sorted(p.name for p in root.iterdir()) if root.is_dir() else []
    raise CheckpointError(f"{root}: no model.safetensors, model.safetensors.index.json or pytorch_model.bin "
                            f"(found {found[:10]})")


def read_hf_config(path: str | Path) -> ModelConfig:
    """The ModelConfig of a checkpoint directory's config.json; any fault is a CheckpointError
    naming the file (and the key)."""
    return _read_config(Path(path))[0]


def _read_config(root: Path) -> tuple[ModelConfig, tuple[int, int] | None]:
    """(`read_hf_config`, the FP8 weights' block shape or None)."""
    config_path = _member(root, "config.json")
    if not config_path.is_file():
        raise CheckpointError(f"{root}: no config.json")
    d = read_json_object(config_path, CheckpointError)
    try:
        return from_hf_config(d), _fp8_block_shape(d)
    except KeyError as e:
        raise CheckpointError(f"{config_path}: missing key {e}") from None
    except ValueError as e:  # a field of the wrong type, an architecture or option temper cannot reproduce
        raise CheckpointError(f"{config_path}: {e}") from None


def _fp8_block_shape(d: dict[str, Any]) -> tuple[int, int] | None:
    """The (rows, columns) of a block of the FP8 weights that a config's `quantization_config` declares (transformers'
    fine-grained FP8, as DeepSeek-V3, R1 and Kimi K2 are published: float8_e4m3fn weights, a float32
    `weight_scale_inv` per block), or None where it declares none; another FP8 layout raises, naming the key."""
    q = d.get("quantization_config")
    if not isinstance(q, dict) or q.get("quant_method") != "fp8":
        return None
    blocks, fmt = q.get("weight_block_size"), q.get("fmt", "e4m3")
    if fmt != "e4m3" or not (isinstance(blocks, list) and len(blocks) == 2
                             and all(_is_int(b) and b > 0 for b in blocks)):
        raise ValueError(f"quantization_config fp8 with fmt={fmt!r}, weight_block_size={blocks!r} is not supported "
                         "(temper reads e4m3 weights scaled per block of [rows, columns])")
    return blocks[0], blocks[1]


def load_hf(
    path: str | Path, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
    allow_pickle: bool = False, trust_remote_code: bool = False, revision: str | None = None,
) -> tuple[Transformer, ModelConfig]:
    """Build a Transformer (in eval mode) from a Hugging Face checkpoint directory.

    No code of the checkpoint ever runs: `trust_remote_code` is taken only to refuse True without a
    pinned `revision` (`temper.files.check_remote_code`), as every loader does.

    The model is built on the meta device and given its weights: on the CPU, a tensor stored as
    temper uses it is a copy-on-write map of the file (no copy at all); any other is read into a
    new tensor of its final device and dtype (through one temporary when it must be split,
    transposed or cast). The weights are never held twice. Quantized weights as published (GPT-OSS's MXFP4 experts,
    DeepSeek-V3's block-scaled FP8) are dequantized one tensor at a time, into the asked dtype.
    """
    try:
        check_remote_code(trust_remote_code, revision)
    except InputError as e:
        raise CheckpointError(f"{path}: {e}") from None
    root = Path(path)
    cfg, fp8 = _read_config(root)
    arch = hf_architecture(cfg)
    device = torch.device(device)
    with torch.device("meta"):
        model = Transformer(cfg).to(dtype)  # the dtype of each tensor: a few stay float32 (`MoE._apply`)
    shapes = {k: v.shape for k, v in model.state_dict().items()}
    dtypes = {k: v.dtype for k, v in model.state_dict().items()}
    rules = {r.hf: r for r in hf_rules(cfg)}
    seen: dict[str, Path] = {}
    sd: dict[str, torch.Tensor] = {}
    mxfp4: dict[str, dict[str, torch.Tensor]] = {}  # a quantized tensor's blocks or scales, until both are read
    scaled: dict[str, dict[str, torch.Tensor]] = {}  # an FP8 weight or its scales, until both are read
    scratch = torch.empty(0, dtype=torch.uint8)
    with torch.no_grad():
        for f in _weight_files(root, allow_pickle):
            for name, (src_dtype, shape, _, _) in f.entries.items():
                if _ignored(name, cfg):
                    continue
                whole = None  # a tensor read whole: the stacked experts (GPT-OSS), dequantized from MXFP4 or FP8
                if arch == GPT_OSS and name.endswith(("_blocks", "_scales")):
                    name, half = name.rsplit("_", 1)
                    if half in mxfp4.get(name, {}):
                        raise CheckpointError(f"{f.path}: tensor {name + '_' + half!r} is in two files")
                    mxfp4.setdefault(name, {})[half] = f.read(f"{name}_{half}")
                    if len(mxfp4[name]) < 2:
                        continue
                    whole = _dequantize_mxfp4(mxfp4[name].pop("blocks"), mxfp4.pop(name)["scales"], f.path, name)
                    shape = whole.shape
                elif fp8 and (name.endswith(".weight_scale_inv") or src_dtype == torch.float8_e4m3fn):
                    half = "scales" if name.endswith("_scale_inv") else "weight"
                    name = name.removesuffix("_scale_inv")
                    if half in scaled.get(name, {}):
                        raise CheckpointError(f"{f.path}: tensor {name + ('_scale_inv' if half == 'scales' else '')!r}"
                                              " is in two files")
                    scaled.setdefault(name, {})[half] = f.read(name + ("_scale_inv" if half == "scales" else ""))
                    if len(scaled[name]) < 2:
                        continue
                    parts = scaled.pop(name)
                    whole = _dequantize_fp8(parts["weight"], parts["scales"], fp8, f.path, name)
                    shape = whole.shape
                if whole is None and src_dtype in (torch.float8_e4m3fn, torch.float8_e5m2):
                    raise CheckpointError(f"{f.path}: tensor {name!r} is {src_dtype} but config.json declares no FP8 "
                                          "quantization_config to scale it by; temper reads fine-grained FP8 "
                                          "(quant_method fp8, weight_block_size)")
                key = _canonical(name, arch)
                rule = rules.get(key)
                if rule is None:
                    fused = (" (experts stacked in one tensor, as save_pretrained(save_original_format=False) "
                             "writes them: save with the default to write them one by one)"
                             if name.endswith(_FUSED_EXPERTS) else "")
                    raise CheckpointError(f"{f.path}: unexpected tensor {name!r} for {arch}{fused}")
                if key in seen:
                    raise CheckpointError(f"{f.path}: tensor {name!r} is also in {seen[key]}")
                seen[key] = f.path
                _check_shape(rule, shape, shapes, str(f.path))
                if whole is not None or rule.stacked or rule.rope_pairs or rule.groups:  # whole: dequantized,
                    # every expert's part copied out, or rows moved
                    whole = f.read(name) if whole is None else whole
                    parts = _to_temper(rule, whole, [shapes[p][0] for p in rule.parts])
                    sd |= {p: t.to(device, dtypes[p], copy=True).contiguous()
                           for p, t in zip(rule.parts, parts, strict=True)}
                    continue
                if (len(rule.parts) == 1 and not rule.transpose and src_dtype == dtypes[rule.parts[0]]
                        and device.type == "cpu"):
                    view = f.mapped(name)
                    if view is not None:
                        sd[rule.parts[0]] = view
                        continue
                outs = [torch.empty(shapes[p], dtype=dtypes[p], device=device) for p in rule.parts]
                sd.update(zip(rule.parts, outs, strict=True))
                scratch = _read_into(f, name, rule, outs, scratch)
    if mxfp4:
        name, half = next((n, next(iter(h))) for n, h in mxfp4.items())
        raise CheckpointError(f"{root}: {name}_{half} has no {'scales' if half == 'blocks' else 'blocks'} tensor")
    if scaled:
        name, half = next((n, next(iter(h))) for n, h in scaled.items())
        raise CheckpointError(f"{root}: FP8 {name} has no weight_scale_inv tensor" if half == "weight"
                              else f"{root}: {name}_scale_inv scales no FP8 weight")
    missing = [r.hf for r in rules.values() if r.hf not in seen]
    if missing:
        raise CheckpointError(f"{root}: missing tensors {missing[:8]}{'...' if len(missing) > 8 else ''}")
    model.load_state_dict(sd, strict=True, assign=True)
    model.init_buffers(device)
    return model.eval(), cfg


_FP4_E2M1 = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)


def _dequantize_fp8(weight: torch.Tensor, scales: torch.Tensor, block: tuple[int, int], path: Path, name: str
                    ) -> torch.Tensor:
    """A fine-grained FP8 weight in float32: each (rows, columns) block of the float8_e4m3fn (out, in) weight times its
    float32 scale (`weight_scale_inv`, (ceil(out / rows), ceil(in / columns))), as DeepSeek's `weight_dequant` and
    its fp8_cast_bf16.py compute it; the caller rounds it to the model's dtype."""
    rows, cols = block
    if weight.dtype != torch.float8_e4m3fn or weight.dim() != 2 or scales.shape != (
            -(-weight.shape[0] // rows), -(-weight.shape[1] // cols)):
        raise CheckpointError(f"{path}: {name} {list(weight.shape)} ({weight.dtype}) and its weight_scale_inv "
                              f"{list(scales.shape)} are not FP8 in blocks of {rows} x {cols}")
    full = scales.float().repeat_interleave(rows, 0)[: weight.shape[0]].repeat_interleave(cols, 1)[:, : weight.shape[1]]
    return weight.float() * full  # (out, in)


def _dequantize_mxfp4(blocks: torch.Tensor, scales: torch.Tensor, path: Path, name: str) -> torch.Tensor:
    """GPT-OSS's MXFP4 experts (the OCP microscaling format): blocks (E, out, G, 16) uint8, two FP4 (E2M1) values a
    byte, low nibble first; scales (E, out, G) uint8, a power of two biased by 127 for each 32 values. Returns the
    (E, in = 32 G, out) weights in bf16, which holds every such value exactly; one expert at a time, since the
    index tensors are 4 bytes a value."""
    if blocks.dtype != torch.uint8 or scales.dtype != torch.uint8 or blocks.shape[-1:] != (16,) or (
            blocks.shape[:-1] != scales.shape or blocks.dim() != 4):
        raise CheckpointError(f"{path}: {name}_blocks {list(blocks.shape)} ({blocks.dtype}) and _scales "
                              f"{list(scales.shape)} ({scales.dtype}) are not MXFP4 (uint8 (E, out, G, 16) and "
                              "(E, out, G))")
    lut = torch.tensor(_FP4_E2M1, dtype=torch.bfloat16)
    E, out, G, _ = blocks.shape
    weights = torch.empty(E, out, G * 32, dtype=torch.bfloat16)
    for e in range(E):
        values = torch.stack((lut[(blocks[e] & 0x0F).int()], lut[(blocks[e] >> 4).int()]), dim=-1)  # (out, G, 16, 2)
        exponents = scales[e].int()[..., None] - 127  # (out, G, 1)
        weights[e] = torch.ldexp(values.view(out, G, 32), exponents).view(out, G * 32)
    return weights.transpose(1, 2)  # (E, in, out)


def load_score_hf(path: str | Path, dtype: torch.dtype = torch.float32) -> tuple[Transformer, torch.Tensor, ModelConfig]:
    """(decoder, score weight (1, dim), config) of a one-label `*ForSequenceClassification` checkpoint
    (a reward model, from temper's `save_hf(..., score=...)` or from transformers), on the CPU.

    Such a checkpoint has no language-model head; an untied decoder gets a zero one, which nothing
    reads (the score head replaces it)."""
    root = Path(path)
    cfg = read_hf_config(root)
    arch = hf_architecture(cfg)
    sd: dict[str, torch.Tensor] = {}
    score = None
    for f in _weight_files(root, allow_pickle=False):
        for name in f.entries:
            if name == SCORE:
                score = f.read(name).to(dtype)
            elif not _ignored(name, cfg) and name != "lm_head.weight":
                sd[_canonical(name, arch)] = f.read(name).to(dtype)
    if score is None or score.shape != (1, cfg.dim):
        raise CheckpointError(f"{root}: not a one-label sequence-classification checkpoint: "
                              f"{'no ' + SCORE if score is None else f'{SCORE} has shape {tuple(score.shape)}'}")
    if not cfg.tie_embeddings:
        sd["lm_head.weight"] = torch.zeros(cfg.vocab_size, cfg.dim, dtype=dtype)
    model = Transformer(cfg)
    try:
        model.load_state_dict(from_hf_state_dict(cfg, sd), strict=True)
    except (KeyError, RuntimeError, ValueError) as e:
        raise CheckpointError(f"{root}: {e}") from None
    return model.eval(), score, cfg


def save_hf(
    model_or_state: nn.Module | dict[str, torch.Tensor], cfg: ModelConfig, out_dir: str | Path, *,
    tokenizer_json: str | Path | None = None, generation_config: dict[str, Any] | None = None,
    max_shard_bytes: int = MAX_SHARD_BYTES, score: torch.Tensor | None = None,
) -> Path:
    """Write `config.json`, the weights, `generation_config.json` (and `tokenizer.json`) to out_dir.

    score: (1, dim) weight of a reward model's head: the checkpoint is then a one-label
    `*ForSequenceClassification` (`score.weight` in place of the language-model head), which
    transformers scores at each row's last token that is not `pad_token_id` (give it in generation_config).

    Weights above `max_shard_bytes` are split into `model-0000k-of-0000n.safetensors` files with a
    `model.safetensors.index.json`, as transformers writes them; weight files of an earlier save
    that the new one does not use are removed. generation_config's bos/eos/pad token ids are also
    written into config.json, where some readers look for them. Every file is written to a
    temporary name and renamed into place.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    sd = model_or_state.state_dict() if isinstance(model_or_state, nn.Module) else model_or_state
    tensors = {k: v.cpu() for k, v in to_hf_state_dict(cfg, sd).items()}
    if score is not None:
        tensors.pop("lm_head.weight", None)
        tensors[SCORE] = score.detach().reshape(1, cfg.dim).cpu().contiguous()
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, t in tensors.items():
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = t
        size += nbytes
    names = ["model.safetensors"] if len(shards) == 1 else [
        f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    for name, shard in zip(names, shards, strict=True):
        target = safe_join(out_dir, name)
        tmp = target.with_name(f".{name}.tmp")
        save_safetensors(shard, tmp, metadata={"format": "pt"})  # "format" is required by transformers
        os.replace(tmp, target)
    index = out_dir / "model.safetensors.index.json"
    if len(shards) > 1:
        total = sum(t.numel() * t.element_size() for t in tensors.values())
        weight_map = {k: n for n, shard in zip(names, shards, strict=True) for k in shard}
        atomic_write_json(index, {"metadata": {"total_size": total}, "weight_map": weight_map})
    stale = [p for p in out_dir.glob("model*.safetensors") if p.name not in names]
    for old in stale + ([index] if len(shards) == 1 else []):
        old.unlink(missing_ok=True)
    fsync_dir(out_dir)
    gen = dict(generation_config or {})
    hf_cfg = to_hf_config(cfg)
    hf_cfg |= {k: gen[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id") if k in gen}
    hf_cfg["torch_dtype"] = str(next(iter(tensors.values())).dtype).removeprefix("torch.")
    if score is not None:
        hf_cfg |= {"architectures": [sequence_classification_architecture(cfg)], "num_labels": 1,
                   "id2label": {"0": "LABEL_0"}, "label2id": {"LABEL_0": 0}}
    atomic_write_json(safe_join(out_dir, "config.json"), hf_cfg)
    atomic_write_json(safe_join(out_dir, "generation_config.json"), gen)
    if tokenizer_json is not None:
        target = safe_join(out_dir, "tokenizer.json")
        if Path(tokenizer_json).resolve() != target:
            tmp_tok = target.with_name(".tokenizer.json.tmp")
            shutil.copyfile(tokenizer_json, tmp_tok)
            os.replace(tmp_tok, target)
    return out_dir

