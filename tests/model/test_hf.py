"""Hugging Face parity for eight architectures, both directions: logits (fp32, 1e-4) and greedy
generations equal (wherever a step is not a near-tie: tests/greedy.py); checkpoint directories
(sharded, pickled, hub snapshots) and their bad input."""

import json
import math
import os
import struct
import subprocess
import sys
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from temper.infer.engine import generate
from temper.model.config import PRESETS, ModelConfig
from temper.model.hf.checkpoint import load_hf, save_hf
from temper.model.hf.config import SUPPORTED_ARCHITECTURES, from_hf_config, hf_architecture, to_hf_config
from temper.model.hf.files import CheckpointError
from temper.model.hf.weights import from_hf_state_dict
from temper.model.rope import rope_attention_factor
from temper.model.transformer import Transformer
from tests.greedy import assert_greedy_agrees, next_token_logits

transformers = pytest.importorskip("transformers")

LLAMA3_SCALING = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                  "original_max_position_embeddings": 16}  # short, so 40-token inputs use the scaled band
WINDOW = 8  # sliding windows shorter than the inputs, so the window is exercised
LONGROPE = {"type": "longrope", "short_factor": [1.0, 1.3, 2.1, 3.7], "long_factor": [1.5, 4.0, 9.0, 20.0]}


def _randomize(model: torch.nn.Module, std: float = 0.2) -> None:
    """Large random weights everywhere (biases and norms too), so no mismatch hides behind init."""
    torch.manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, std)


def _hf(config_cls: str, model_cls: str, **kw):
    cfg = getattr(transformers, config_cls)(**kw)
    model = getattr(transformers, model_cls)(cfg).eval()
    _randomize(model)
    model.generation_config.eos_token_id = None  # generate the full length
    model.generation_config.pad_token_id = 0
    return model


def _with_buffers(model, suffix: str, draw):
    """`model` with its buffers named `...suffix` drawn anew by `draw`: `_randomize` leaves buffers as built."""
    torch.manual_seed(2)
    with torch.no_grad():
        for name, b in model.named_buffers():
            if name.endswith(suffix):
                draw(b)
    return model


def _with_choice_bias(model):
    """DeepSeek-V3's choice bias, zero as built: values that move choices."""
    return _with_buffers(model, "e_score_correction_bias", lambda b: b.normal_(0.0, 0.2))


def _with_layer_scalars(model):
    """Gemma 4's layer scalars, one as built: each layer its own."""
    return _with_buffers(model, "layer_scalar", lambda b: b.uniform_(0.5, 1.5))


_SMALL = dict(vocab_size=101, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=128, rms_norm_eps=1e-5, bos_token_id=0, eos_token_id=0)

_QWEN3_5 = dict(_SMALL | {"num_hidden_layers": 4}, head_dim=32, linear_num_key_heads=2, linear_num_value_heads=4,
                linear_key_head_dim=16, linear_value_head_dim=8, full_attention_interval=2, tie_word_embeddings=False,
                pad_token_id=0)

# Gemma 4: windowed layers (16-wide heads, their own RoPE base) alternating with global ones (32-wide heads, a
# quarter of each head's pairs turning); no per-layer embeddings.
_GEMMA4 = dict(_SMALL | {"num_hidden_layers": 4}, head_dim=16, global_head_dim=32, sliding_window=WINDOW, pad_token_id=0,
               layer_types=["sliding_attention", "full_attention"] * 2, hidden_size_per_layer_input=0,
               final_logit_softcapping=3.0,
               rope_parameters={"sliding_attention": {"rope_type": "default", "rope_theta": 100.0},
                                "full_attention": {"rope_type": "proportional", "partial_rotary_factor": 0.25,
                                                   "rope_theta": 50000.0}})

# Llama 4: RoPE (llama3-scaled) in adjacent pairs, a layer without positions after every one here (interval 2), whose
# queries take a temperature (floor 4, so that 40-token inputs step it), the others attending within chunks of 8 with
# weightless q/k norms; a dense MLP (96 wide) and, in every other layer, 4 experts of 40 weighing their inputs, top 2.
_LLAMA4 = dict(_SMALL | {"num_hidden_layers": 4, "intermediate_size": 40}, intermediate_size_mlp=96, head_dim=16,
               num_local_experts=4, num_experts_per_tok=2, interleave_moe_layer_step=2, attention_chunk_size=WINDOW,
               no_rope_layer_interval=2, floor_scale=4, attn_scale=0.5, pad_token_id=0,
               rope_parameters={"rope_theta": 500000.0, **LLAMA3_SCALING})

_FALCON = dict(vocab_size=101, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=128,
               bos_token_id=0, eos_token_id=0)

CASES = {
    "gpt2": lambda: _hf("GPT2Config", "GPT2LMHeadModel", vocab_size=97, n_positions=64, n_embd=32, n_layer=2,
                        n_head=4, bos_token_id=0, eos_token_id=0),
    "gpt2-untied": lambda: _hf("GPT2Config", "GPT2LMHeadModel", vocab_size=97, n_positions=64, n_embd=32, n_layer=2,
                               n_head=4, tie_word_embeddings=False),
    # A copy of the scaling: transformers writes rope_theta into the dict it is given.
    "llama3-gqa-untied": lambda: _hf("LlamaConfig", "LlamaForCausalLM", **_SMALL, rope_theta=500000.0,
                                     rope_scaling=dict(LLAMA3_SCALING), tie_word_embeddings=False),
    "llama2-tied-bias-linear-rope": lambda: _hf("LlamaConfig", "LlamaForCausalLM", **_SMALL | {"num_key_value_heads": 4},
                                                tie_word_embeddings=True, attention_bias=True, mlp_bias=True,
                                                rope_scaling={"rope_type": "linear", "factor": 2.0}),
    "mistral-window-wide-heads": lambda: _hf("MistralConfig", "MistralForCausalLM", **_SMALL, head_dim=24,
                                             sliding_window=WINDOW, tie_word_embeddings=False),
    # Cohere (Command R, Aya): attention beside the MLP on one LayerNorm without biases, RoPE in adjacent pairs,
    # scaled logits, tied; Cohere2 (Command R7B, Command A): three windowed layers with RoPE to one global without.
    "cohere-parallel-pairs": lambda: _hf("CohereConfig", "CohereForCausalLM", **_SMALL, logit_scale=0.125,
                                         rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 5000.0}),
    "cohere2-window-nope": lambda: _hf("Cohere2Config", "Cohere2ForCausalLM", **_SMALL | {"num_hidden_layers": 4},
                                       sliding_window=WINDOW, logit_scale=0.25, tie_word_embeddings=False),
    # LFM2: short convolutions (in_proj into three gates, a causal depthwise convolution of 3 taps, out_proj) around an
    # attention layer with q/k norms; its MLP's width from Lfm2MLP's rule (2/3 of 100, rounded up to 24s: 72).
    "lfm2-short-conv": lambda: _hf("Lfm2Config", "Lfm2ForCausalLM", **_SMALL | {"num_hidden_layers": 4,
                                                                               "intermediate_size": 100},
                                   layer_types=["conv", "full_attention", "conv", "conv"], block_multiple_of=24,
                                   tie_word_embeddings=False),
    # LFM2-MoE: those layers, a dense first MLP, then 4 experts chosen by sigmoid scores plus a bias, 2 per token,
    # renormalised and scaled.
    "lfm2-moe-sigmoid-bias": lambda: _with_buffers(_hf(
        "Lfm2MoeConfig", "Lfm2MoeForCausalLM", **_SMALL | {"num_hidden_layers": 4}, moe_intermediate_size=40,
        num_experts=4, num_experts_per_tok=2, num_dense_layers=1, routed_scaling_factor=2.0,
        layer_types=["conv", "full_attention", "conv", "conv"], tie_word_embeddings=False),
        "expert_bias", lambda b: b.normal_(0.0, 0.2)),
    # Granite 4.0-H: Mamba 2 layers (8 heads of 16 in 2 groups of B and C, a state of 16) around an attention layer
    # without positions, experts beside a shared MLP, Granite's multipliers; and its dense form, with RoPE.
    "granite4-mamba2-moe-nope": lambda: _hf(
        "GraniteMoeHybridConfig", "GraniteMoeHybridForCausalLM", **_SMALL | {"num_hidden_layers": 4},
        layer_types=["mamba", "attention", "mamba", "mamba"], mamba_n_heads=8, mamba_n_groups=2, mamba_d_state=16,
        mamba_d_head=16, mamba_chunk_size=16, num_local_experts=4, num_experts_per_tok=2, shared_intermediate_size=72,
        embedding_multiplier=3.0, residual_multiplier=0.5, logits_scaling=2.0, attention_multiplier=0.125,
        tie_word_embeddings=True),
    "granite4-mamba2-dense-rope": lambda: _hf(
        "GraniteMoeHybridConfig", "GraniteMoeHybridForCausalLM", **_SMALL | {"num_hidden_layers": 3},
        layer_types=["attention", "mamba", "attention"], mamba_n_heads=4, mamba_n_groups=1, mamba_d_state=8,
        mamba_d_head=32, mamba_d_conv=3, num_local_experts=0, shared_intermediate_size=80,
        position_embedding_type="rope", tie_word_embeddings=False),
    # Bamba: Mamba 2 layers (8 heads of 16 in 2 groups, a state of 16) around an attention layer named by index, whose
    # RoPE turns the first half of each head; SwiGLU MLPs, no multipliers.
    "bamba-mamba2-half-rope": lambda: _hf(
        "BambaConfig", "BambaForCausalLM", **_SMALL | {"num_hidden_layers": 4}, attn_layer_indices=[1],
        mamba_n_heads=8, mamba_n_groups=2, mamba_d_state=16, mamba_d_head=16, mamba_chunk_size=16,
        tie_word_embeddings=False),
    # Nemotron 3 (Nano 30B-A3B's layers): the mixers each followed by a mixture of 8 squared-ReLU experts, 2 per token
    # chosen by sigmoid scores plus a bias among the 2 of 4 groups whose two best score highest, scaled, beside a shared
    # expert; a mixer alone between them.
    "nemotron3-mamba2-experts": lambda: _with_choice_bias(_hf(
        "NemotronHConfig", "NemotronHForCausalLM", **{k: v for k, v in _SMALL.items() if k != "rms_norm_eps"},
        layer_norm_epsilon=1e-5, head_dim=16, hybrid_override_pattern="MEM*EME", mamba_num_heads=8, mamba_head_dim=16,
        n_groups=2, ssm_state_size=16, chunk_size=16, n_routed_experts=8, num_experts_per_tok=2,
        moe_intermediate_size=40, moe_shared_expert_intermediate_size=56, n_group=4, topk_group=2,
        routed_scaling_factor=2.5, tie_word_embeddings=False)),
    # Mamba 2 alone (Mamba-Codestral): every layer a mixer after its norm, no attention, no MLP; tied embeddings.
    "mamba2-mixers-alone": lambda: _hf("Mamba2Config", "Mamba2ForCausalLM", vocab_size=101, hidden_size=64,
                                       num_hidden_layers=3, num_heads=8, head_dim=16, n_groups=2, state_size=16,
                                       chunk_size=16, tie_word_embeddings=True, bos_token_id=0, eos_token_id=0),
    # Mamba (1) alone (state-spaces' mamba-*-hf): 128 channels, each with 8 state values decaying at their own rates,
    # steps of rank 6; tied embeddings. FalconMamba: its steps, B and C RMS-normalised; untied.
    "mamba-mixers-alone": lambda: _hf("MambaConfig", "MambaForCausalLM", vocab_size=101, hidden_size=64,
                                      num_hidden_layers=3, state_size=8, time_step_rank=6, bos_token_id=0,
                                      eos_token_id=0, pad_token_id=0),
    "falcon-mamba-normed-steps": lambda: _hf("FalconMambaConfig", "FalconMambaForCausalLM", vocab_size=101,
                                             hidden_size=64, num_hidden_layers=3, state_size=8, mixer_rms_eps=1e-3,
                                             tie_word_embeddings=False, bos_token_id=0, eos_token_id=0,
                                             pad_token_id=0),
    # Jamba: Mamba layers (128 channels, a state of 8, steps of rank 6), their steps, B and C normalised with weights,
    # around attention layers without positions (layers 1 and 4: a period of 3); SwiGLU MLPs, a mixture of 2 of 4
    # experts weighed by their softmax unrenormalised in every other block (1, 3, 5); and its dense form.
    "jamba-mamba-experts": lambda: _hf(
        "JambaConfig", "JambaForCausalLM", **_SMALL | {"num_hidden_layers": 6}, attn_layer_period=3,
        attn_layer_offset=1, expert_layer_period=2, expert_layer_offset=1, num_experts=4, num_experts_per_tok=2,
        mamba_d_state=8, mamba_dt_rank=6, pad_token_id=0),
    "jamba-dense": lambda: _hf("JambaConfig", "JambaForCausalLM", **_SMALL | {"num_hidden_layers": 3},
                               attn_layer_period=3, attn_layer_offset=0, num_experts=1, mamba_d_state=8,
                               mamba_d_conv=3, tie_word_embeddings=True, pad_token_id=0),
    # Granite 3.0's mixtures: experts alone (1B-A400M, 3B-A800M), and beside a shared MLP.
    "granitemoe-experts": lambda: _hf("GraniteMoeConfig", "GraniteMoeForCausalLM", **_SMALL, num_local_experts=4,
                                      num_experts_per_tok=2, embedding_multiplier=3.0, residual_multiplier=0.5,
                                      logits_scaling=2.0, attention_multiplier=0.125, tie_word_embeddings=True),
    "granitemoeshared-experts": lambda: _hf("GraniteMoeSharedConfig", "GraniteMoeSharedForCausalLM", **_SMALL,
                                            num_local_experts=4, num_experts_per_tok=2, shared_intermediate_size=48,
                                            residual_multiplier=0.5, tie_word_embeddings=False),
    # Nemotron-H: Mamba 2 layers (8 heads of 16 in 2 groups, a state of 16), attention without positions and
    # squared-ReLU MLPs, one sublayer per layer: two mixers in a row make a block without an MLP.
    "nemotron-h-mamba2-relu2": lambda: _hf(
        "NemotronHConfig", "NemotronHForCausalLM", **{k: v for k, v in _SMALL.items() if k != "rms_norm_eps"},
        layer_norm_epsilon=1e-5, head_dim=16, hybrid_override_pattern="M-MM*-M-", mamba_num_heads=8, mamba_head_dim=16,
        n_groups=2, ssm_state_size=16, chunk_size=16, tie_word_embeddings=False),
    "qwen2-qkv-bias-tied": lambda: _hf("Qwen2Config", "Qwen2ForCausalLM", **_SMALL, tie_word_embeddings=True),
    "qwen3-qk-norm-wide-heads": lambda: _hf("Qwen3Config", "Qwen3ForCausalLM", **_SMALL, head_dim=24,
                                            tie_word_embeddings=False),
    "gemma": lambda: _hf("GemmaConfig", "GemmaForCausalLM", **_SMALL | {"num_key_value_heads": 1}, head_dim=32,
                         hidden_act="gelu_pytorch_tanh"),
    # Local (windowed) and global layers alternating, each kind with its RoPE base, the global one scaled.
    "gemma3-local-global": lambda: _hf("Gemma3TextConfig", "Gemma3ForCausalLM", **_SMALL | {"num_hidden_layers": 4},
                                       head_dim=32, query_pre_attn_scalar=24, sliding_window=WINDOW,  # 27B's way
                                       sliding_window_pattern=2, rope_theta=50000.0, rope_local_base_freq=100.0,
                                       rope_scaling={"rope_type": "linear", "factor": 2.0}),
    # Gemma 2: windowed layers alternating with global ones, one RoPE; scores and logits capped low enough that
    # the caps bend most of them (the published 50 and 30 would barely touch these tiny models').
    "gemma2-softcap-local-global": lambda: _hf("Gemma2Config", "Gemma2ForCausalLM", **_SMALL | {"num_hidden_layers": 4},
                                               head_dim=32, query_pre_attn_scalar=24, sliding_window=WINDOW,
                                               attn_logit_softcapping=2.0, final_logit_softcapping=3.0),
    # Gemma 4 31B's attention: its global layers' values are their keys' projection, with one kv head of their own
    "gemma4-global-keys-are-values": lambda: _with_layer_scalars(_hf(
        "Gemma4TextConfig", "Gemma4ForCausalLM", **_GEMMA4, attention_k_eq_v=True, num_global_key_value_heads=1)),
    "gemma4-global-wide-heads": lambda: _with_layer_scalars(_hf("Gemma4TextConfig", "Gemma4ForCausalLM", **_GEMMA4)),
    # Gemma 4 26B-A4B's layers: the dense MLP beside 2 of 4 experts, each normalised apart, the router's input scaled
    "gemma4-experts-beside-mlp": lambda: _with_layer_scalars(_hf(
        "Gemma4TextConfig", "Gemma4ForCausalLM", **_GEMMA4, enable_moe_block=True, num_experts=4, top_k_experts=2,
        moe_intermediate_size=40)),
    # Gemma 4 E2B's and E4B's layers: per-layer embeddings; the last 3 layers take the keys and values of the last
    # earlier layer of their kind, their MLPs twice as wide
    "gemma4-per-layer-shared-kv": lambda: _with_layer_scalars(_hf(
        "Gemma4TextConfig", "Gemma4ForCausalLM", **_GEMMA4 | {"num_hidden_layers": 6, "layer_types": [
            "sliding_attention", "full_attention"] * 3, "hidden_size_per_layer_input": 8},
        vocab_size_per_layer_input=128, num_kv_shared_layers=3, use_double_wide_mlp=True)),
    # ERNIE 4.5: Llama with biases everywhere, RoPE in float32 in adjacent pairs over the whole head
    "ernie4.5-pairs-bias": lambda: _hf("Ernie4_5Config", "Ernie4_5ForCausalLM", **_SMALL, head_dim=24, use_bias=True,
                                       tie_word_embeddings=False),
    # ERNIE 4.5's mixture: a float32 softmax router choosing with a bias, 2 of 4 experts beside 2 shared ones, after a
    # dense layer
    "ernie4.5-moe-biased-softmax": lambda: _hf(
        "Ernie4_5_MoeConfig", "Ernie4_5_MoeForCausalLM", **_SMALL | {"num_hidden_layers": 3}, moe_num_experts=4, moe_k=2,
        moe_intermediate_size=40, moe_num_shared_experts=2, moe_layer_start_index=1),
    # Hunyuan: q/k norms after RoPE, whose base its NTK alpha stretches (1000: 10000 -> 1.9e7 at 24-wide heads)
    "hunyuan-norms-after-rope-alpha": lambda: _hf(
        "HunYuanDenseV1Config", "HunYuanDenseV1ForCausalLM", **_SMALL, head_dim=24,
        rope_parameters={"rope_type": "dynamic", "alpha": 1000.0, "factor": 1.0, "rope_theta": 10000.0}),
    # its mixture: 2 of 4 experts of the MLP's width by a float32 softmax, beside a shared one
    "hunyuan-moe-shared": lambda: _hf("HunYuanMoEV1Config", "HunYuanMoEV1ForCausalLM", **_SMALL, head_dim=16,
                                      num_experts=4, moe_topk=2),
    "phi3-window": lambda: _hf("Phi3Config", "Phi3ForCausalLM", **_SMALL, sliding_window=WINDOW,
                               tie_word_embeddings=False, pad_token_id=0),
    # Phi-4-mini's way: half of each head rotated, LongRoPE with an original length short enough that 40-token inputs
    # take the long table (and greedy generation crosses to it), embeddings tied.
    "phi4mini-partial-longrope": lambda: _hf("Phi3Config", "Phi3ForCausalLM", **_SMALL, partial_rotary_factor=0.5,
                                             tie_word_embeddings=True, pad_token_id=0,
                                             original_max_position_embeddings=16, rope_scaling=dict(LONGROPE)),
    # SmolLM3: a layer without positions (NoPE) after every RoPE one here (the published models: after every three).
    "smollm3-nope": lambda: _hf("SmolLM3Config", "SmolLM3ForCausalLM", **_SMALL | {"num_hidden_layers": 4},
                                no_rope_layer_interval=2, tie_word_embeddings=True, pad_token_id=0),
    # Granite: the embeddings, each sublayer's output, the attention scores and the logits scaled (milder than the
    # published 12, 0.22, 1/128 and 16, so that each changes these tiny models' logits), biases everywhere.
    "granite-multipliers": lambda: _hf("GraniteConfig", "GraniteForCausalLM", **_SMALL, embedding_multiplier=4.0,
                                       residual_multiplier=0.5, attention_multiplier=0.03125, logits_scaling=2.0,
                                       attention_bias=True, mlp_bias=True, tie_word_embeddings=True),
    # Granite SWA: Granite's multipliers, a sink per head, three windowed layers to one global (the first of four); its
    # RoPE bases per layer: 0 (no positions) on the global layers, or another base on the windowed ones
    "granite-swa-first-global-sinks": lambda: _hf(
        "GraniteSWAConfig", "GraniteSWAForCausalLM", **_SMALL | {"num_hidden_layers": 4}, sliding_window=WINDOW,
        embedding_multiplier=4.0, residual_multiplier=0.5, attention_multiplier=0.03125, logits_scaling=2.0),
    "granite-swa-nope-global": lambda: _hf(
        "GraniteSWAConfig", "GraniteSWAForCausalLM", **_SMALL | {"num_hidden_layers": 8}, sliding_window=WINDOW,
        layer_rope_theta=[0.0, 100.0, 100.0, 100.0] * 2, tie_word_embeddings=False),
    "granite-swa-local-base": lambda: _hf(
        "GraniteSWAConfig", "GraniteSWAForCausalLM", **_SMALL | {"num_hidden_layers": 4}, sliding_window=WINDOW,
        layer_rope_theta=[10000.0, 50.0, 50.0, 50.0], attention_bias=True, mlp_bias=True),
    # Nemotron-4 / Minitron: LayerNorms scaling by 1 + weight (LayerNorm1P), a squared-ReLU MLP, half of each head
    # rotated; with biases on every linear layer
    "nemotron-layernorm1p-partial": lambda: _hf("NemotronConfig", "NemotronForCausalLM", **{
        k: v for k, v in _SMALL.items() if k != "rms_norm_eps"}, norm_eps=1e-5),
    "nemotron-biases": lambda: _hf("NemotronConfig", "NemotronForCausalLM", **{
        k: v for k, v in _SMALL.items() if k != "rms_norm_eps"}, attention_bias=True, mlp_bias=True,
        tie_word_embeddings=True),
    # DBRX: LayerNorms without biases, q, k and v fused and clamped, 2 of 4 SwiGLU experts in every layer stacked in
    # three tensors, chosen by a softmax and renormalised
    "dbrx-clip-experts": lambda: _hf("DbrxConfig", "DbrxForCausalLM", vocab_size=101, d_model=64, n_heads=4,
                                     n_layers=2, max_seq_len=128, rope_parameters={"rope_type": "default",
                                                                                   "rope_theta": 500000.0},
                                     attn_config={"kv_n_heads": 2, "clip_qkv": 0.5, "rope_theta": 500000.0},
                                     ffn_config={"ffn_hidden_size": 48, "moe_num_experts": 4, "moe_top_k": 2}),
    # CWM (Meta's Code World Model): Llama with three windowed layers after every global one (its default layout),
    # Llama 3.1's scaling
    "cwm-first-global-llama3": lambda: _hf("CwmConfig", "CwmForCausalLM", **_SMALL | {"num_hidden_layers": 4},
                                           head_dim=16, sliding_window=WINDOW,
                                           rope_parameters={"rope_theta": 1e6, **LLAMA3_SCALING}),
    # Solar Open: Llama's attention (q/k/v biases here) with GLM-4.5's routing (sigmoid scores, a choice bias, groups,
    # scaled weights) beside a shared expert, in every layer
    "solar-open-sigmoid-groups": lambda: _with_choice_bias(_hf(
        "SolarOpenConfig", "SolarOpenForCausalLM", **_SMALL, head_dim=16, moe_intermediate_size=32, n_routed_experts=8,
        num_experts_per_tok=2, n_group=4, topk_group=2, routed_scaling_factor=2.5, attention_bias=True)),
    # Granite MoE SWA: Granite SWA's attention (sinks, windows, a base per layer) with GraniteMoeShared's experts
    "granitemoe-swa-shared": lambda: _hf(
        "GraniteMoeSWAConfig", "GraniteMoeSWAForCausalLM", **_SMALL | {"num_hidden_layers": 4, "intermediate_size": 32},
        sliding_window=WINDOW, num_local_experts=4, num_experts_per_tok=2, shared_intermediate_size=48,
        embedding_multiplier=4.0, residual_multiplier=0.5, attention_multiplier=0.03125, logits_scaling=2.0,
        layer_rope_theta=[0.0, 100.0, 100.0, 100.0]),
    # InternLM3: Llama with its biases named qkv_bias and bias, run by transformers 5 as LlamaForCausalLM
    "internlm3-biases": lambda: _hf("InternLM3Config", "LlamaForCausalLM", **_SMALL, head_dim=16, qkv_bias=True,
                                    bias=True),
    # HyperCLOVA X: Granite's multipliers (muP) with norms on the sublayers' outputs too (Peri-LN), its logits
    # multiplied; without the output norms, with biases
    "hyperclovax-peri-ln-mup": lambda: _hf(
        "HyperCLOVAXConfig", "HyperCLOVAXForCausalLM", **_SMALL, embedding_multiplier=4.0, residual_multiplier=0.5,
        attention_multiplier=0.03125, logits_scaling=0.25, tie_word_embeddings=False),
    "hyperclovax-biases-no-post-norm": lambda: _hf(
        "HyperCLOVAXConfig", "HyperCLOVAXForCausalLM", **_SMALL, use_post_norm=False, attention_bias=True,
        mlp_bias=True, residual_multiplier=0.5),
    # Dynamic NTK: the base grows past max_position_embeddings alone, so the plain RoPE within it (kept, to be written
    # back); InternLM3's, read as the Llama it is (its biases named qkv_bias and bias)
    "llama-dynamic-ntk": lambda: _hf("LlamaConfig", "LlamaForCausalLM", **_SMALL, tie_word_embeddings=False,
                                     rope_parameters={"rope_type": "dynamic", "factor": 6.0, "rope_theta": 5e7}),
    # Seed-OSS: Llama with q/k/v biases (attention_bias; o_proj's attention_out_bias and the MLP's off), wide heads.
    "seed-oss-qkv-bias": lambda: _hf("SeedOssConfig", "SeedOssForCausalLM", **_SMALL, head_dim=24,
                                     tie_word_embeddings=False),
    # EXAONE 4: OLMo 2's post-norm blocks with per-head q/k norms; windowed layers with RoPE alternating with global
    # ones without (NoPE).
    "exaone4-local-global-nope": lambda: _hf("Exaone4Config", "Exaone4ForCausalLM", **_SMALL | {"num_hidden_layers": 4},
                                             sliding_window=WINDOW, sliding_window_pattern=2, tie_word_embeddings=False),
    # GLM-4: norms on the sublayers' inputs and outputs, q/k/v biases, half of each head rotated in adjacent pairs
    # (interleaved RoPE), gate and up fused.
    "glm4-sandwich-interleaved-rope": lambda: _hf("Glm4Config", "Glm4ForCausalLM", **_SMALL, head_dim=32, pad_token_id=0,
                                                  tie_word_embeddings=False),
    # VaultGemma: Gemma 2's parts (capped scores and logits, windowed layers alternating with global ones, scores
    # scaled by query_pre_attn_scalar) without norms on the sublayers' outputs
    "vaultgemma-no-post-norms": lambda: _hf("VaultGemmaConfig", "VaultGemmaForCausalLM", **_SMALL | {
        "num_hidden_layers": 4, "num_key_value_heads": 1}, head_dim=32, query_pre_attn_scalar=24, sliding_window=WINDOW,
        attn_logit_softcapping=3.0, final_logit_softcapping=2.0, pad_token_id=0),
    # Ministral-8B: Mistral's layers, the first of every four global, the others within the window
    "ministral-first-global": lambda: _hf("MinistralConfig", "MinistralForCausalLM", **_SMALL | {"num_hidden_layers": 4},
                                          head_dim=16, sliding_window=WINDOW,
                                          layer_types=["full_attention"] + ["sliding_attention"] * 3),
    # Helium: Llama with RoPE in adjacent pairs, norms that scale before rounding, q/k/v biases
    "helium-pairs-qkv-bias": lambda: _hf("HeliumConfig", "HeliumForCausalLM", **_SMALL, head_dim=16,
                                         attention_bias=True),
    # Jais 2: Llama's attention with LayerNorms and a squared-ReLU MLP, biases everywhere but the head (or none)
    "jais2-layernorm-relu2": lambda: _hf("Jais2Config", "Jais2ForCausalLM", **{
        k: v for k, v in _SMALL.items() if k != "rms_norm_eps"}),
    "jais2-without-biases": lambda: _hf("Jais2Config", "Jais2ForCausalLM", **{
        k: v for k, v in _SMALL.items() if k != "rms_norm_eps"}, attention_bias=False, mlp_bias=False),
    # Apertus: Llama's attention with per-head q/k norms, an MLP of xIELU (learned scalars per layer), not gated;
    # Llama 3.1's scaling (its default). The second: biases on attention's q, k, v and o, and a beta of its own.
    "apertus-xielu-qk-norm": lambda: _hf("ApertusConfig", "ApertusForCausalLM", **_SMALL, tie_word_embeddings=False,
                                         rope_parameters={"rope_theta": 12000000.0, **LLAMA3_SCALING}),
    "apertus-attention-bias-beta": lambda: _with_buffers(_hf(
        "ApertusConfig", "ApertusForCausalLM", **_SMALL, attention_bias=True, tie_word_embeddings=True,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0}), "act_fn.beta", lambda b: b.fill_(0.375)),
    # GLM-4-9B (GlmForCausalLM): GLM-4-0414's parts without its sandwich norms
    "glm-interleaved-rope": lambda: _hf("GlmConfig", "GlmForCausalLM", **_SMALL, head_dim=32, pad_token_id=0,
                                        tie_word_embeddings=False),
    # OLMo 2: norms on the sublayers' outputs only, q/k norms over all heads at once.
    "olmo2-post-norm": lambda: _hf("Olmo2Config", "Olmo2ForCausalLM", **_SMALL, tie_word_embeddings=False),
    # OLMo 3: OLMo 2's blocks, three windowed layers to one global; YaRN on the global layers only (its original
    # length short, so 40-token inputs use the stretched band).
    "olmo3-yarn-local-global": lambda: _hf("Olmo3Config", "Olmo3ForCausalLM", **_SMALL | {"num_hidden_layers": 4},
                                           sliding_window=WINDOW, tie_word_embeddings=False, pad_token_id=0,
                                           rope_scaling={"rope_type": "yarn", "factor": 4.0, "beta_fast": 16,
                                                         "original_max_position_embeddings": 16}),
    # YaRN (Qwen2.5's and Qwen3's long contexts) with DeepSeek's attention factor from mscale and mscale_all_dim.
    "qwen2-yarn": lambda: _hf("Qwen2Config", "Qwen2ForCausalLM", **_SMALL, tie_word_embeddings=False,
                              rope_scaling={"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16,
                                            "mscale": 0.707, "mscale_all_dim": 1.0}),
    # GPT-OSS: a sink per head, 8-token windows alternating with global layers, YaRN, biases everywhere, 4 experts
    # with clamped SwiGLU (gate and up interleaved, stacked), 2 per token.
    "gpt-oss-sinks-experts": lambda: _hf("GptOssConfig", "GptOssForCausalLM", **_SMALL | {"intermediate_size": 32},
                                         head_dim=32, sliding_window=WINDOW, num_local_experts=4,
                                         num_experts_per_tok=2, rope_parameters={
                                             "rope_type": "yarn", "rope_theta": 150000.0, "factor": 4.0,
                                             "truncate": False, "original_max_position_embeddings": 16}),
    # Mixtures of experts: 4 experts, each token to 2 (Mixtral's weights renormalised over the 2, Qwen3-MoE's
    # not: norm_topk_prob off, as its config class defaults), the router's choices differing token by token.
    "mixtral-experts-window": lambda: _hf("MixtralConfig", "MixtralForCausalLM", **_SMALL, num_local_experts=4,
                                          num_experts_per_tok=2, sliding_window=WINDOW),
    # Qwen2-MoE: Qwen2's q/k/v biases, 4 experts, 2 per token (not renormalised), and a shared expert gated by a
    # sigmoid, every token's.
    "qwen2-moe-shared-expert": lambda: _hf("Qwen2MoeConfig", "Qwen2MoeForCausalLM", **_SMALL, moe_intermediate_size=40,
                                           shared_expert_intermediate_size=72, num_experts=4, num_experts_per_tok=2,
                                           tie_word_embeddings=False),
    # OLMoE: Llama's blocks with q/k norms over all heads, 4 experts of intermediate_size, 2 per token.
    "olmoe-experts": lambda: _hf("OlmoeConfig", "OlmoeForCausalLM", **_SMALL, num_experts=4, num_experts_per_tok=2,
                                 tie_word_embeddings=False),
    "olmoe-experts-clip": lambda: _hf("OlmoeConfig", "OlmoeForCausalLM", **_SMALL, num_experts=4,  # after its norms
                                      num_experts_per_tok=2, clip_qkv=0.1, tie_word_embeddings=False),
    # GLM-4.5: DeepSeek-V3's routing (sigmoid scores, a choice bias, 2 of 4 groups of experts kept, weights scaled) with
    # a shared expert, a dense first layer, per-head q/k norms, q/k/v biases, half of each head rotated (in halves).
    "glm4-moe-sigmoid-groups": lambda: _with_choice_bias(_hf(
        "Glm4MoeConfig", "Glm4MoeForCausalLM", **_SMALL | {"num_hidden_layers": 3}, head_dim=32,
        moe_intermediate_size=40, n_routed_experts=8, num_experts_per_tok=2, n_group=4, topk_group=2,
        routed_scaling_factor=2.5, use_qk_norm=True, attention_bias=True, tie_word_embeddings=False, pad_token_id=0)),
    # FlexOlmo: OLMo 2's blocks (norms on the sublayers' outputs alone, q/k norms over all heads) with OLMoE's experts
    "flex-olmo-post-norm-experts": lambda: _hf("FlexOlmoConfig", "FlexOlmoForCausalLM", **_SMALL | {
        "intermediate_size": 48}, num_experts=4, num_experts_per_tok=2, pad_token_id=0),
    # Youtu-LLM: DeepSeek-V3's latent attention (queries through a latent, narrower values, pairs rotated) beside dense
    # MLPs, tied
    "youtu-latent-dense": lambda: _hf("YoutuConfig", "YoutuForCausalLM", **_SMALL | {"num_key_value_heads": 4},
                                      kv_lora_rank=16, q_lora_rank=24, qk_rope_head_dim=8, qk_nope_head_dim=16,
                                      v_head_dim=12),
    # K-EXAONE: EXAONE 4's attention (windowed RoPE layers, global ones without positions, per-head q/k norms) in
    # pre-norm blocks, DeepSeek-V3's routing beside a shared expert after a dense layer; its choice bias saved beside the
    # router, not under it
    "exaone-moe-window-nope-experts": lambda: _with_choice_bias(_hf(
        "ExaoneMoeConfig", "ExaoneMoeForCausalLM", **_SMALL | {"num_hidden_layers": 4}, head_dim=16,
        sliding_window=WINDOW, sliding_window_pattern=2, moe_intermediate_size=40, num_experts=8, num_experts_per_tok=2,
        num_shared_experts=1, n_group=4, topk_group=2, first_k_dense_replace=1, routed_scaling_factor=2.5,
        pad_token_id=0)),
    # dots.llm1: Qwen3's attention (per-head q/k norms) and DeepSeek-V3's routing, 2 shared experts, a dense first layer
    "dots1-qk-norm-sigmoid-groups": lambda: _with_choice_bias(_hf(
        "Dots1Config", "Dots1ForCausalLM", **_SMALL | {"num_hidden_layers": 3}, head_dim=16, moe_intermediate_size=40,
        n_routed_experts=8, num_experts_per_tok=2, n_shared_experts=2, n_group=4, topk_group=2,
        first_k_dense_replace=1, norm_topk_prob=True, routed_scaling_factor=2.5, pad_token_id=0)),
    # DeepSeek-V3: latent attention (queries through a latent too; values narrower than queries and keys; rotated dims
    # in adjacent pairs, scores scaled by YaRN's mscale_all_dim) and GLM-4.5's routing, after a dense layer.
    "deepseek-v3-latent-attention": lambda: _with_choice_bias(_hf(
        "DeepseekV3Config", "DeepseekV3ForCausalLM", **_SMALL | {"num_hidden_layers": 3, "num_key_value_heads": 4},
        kv_lora_rank=24, q_lora_rank=40, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=12,
        moe_intermediate_size=40, n_routed_experts=8, num_experts_per_tok=2, n_group=4, topk_group=2,
        first_k_dense_replace=1, routed_scaling_factor=2.5, tie_word_embeddings=False, pad_token_id=0,
        rope_scaling={"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16, "beta_fast": 32.0,
                      "beta_slow": 1.0, "mscale": 1.0, "mscale_all_dim": 0.8})),
    # DeepSeek-V3's attention with one q_proj (no query latent) and values as wide as queries and keys (SDPA's fused
    # kernel on a CPU), unscaled RoPE.
    "deepseek-v3-plain-q": lambda: _with_choice_bias(_hf(
        "DeepseekV3Config", "DeepseekV3ForCausalLM", **_SMALL | {"num_hidden_layers": 2, "num_key_value_heads": 4},
        kv_lora_rank=24, q_lora_rank=None, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=24,
        moe_intermediate_size=40, n_routed_experts=4, num_experts_per_tok=2, n_group=1, topk_group=1,
        first_k_dense_replace=1, routed_scaling_factor=1.0, tie_word_embeddings=False, pad_token_id=0)),
    # DeepSeek-V2: latent attention (a query latent, narrower values, YaRN with DeepSeek-V2's mscale) and a float32
    # softmax router choosing 3 among the 2 of 4 groups whose best expert scores highest, its weights unnormalised and
    # scaled, beside 2 shared experts, after a dense layer.
    "deepseek-v2-group-limited": lambda: _hf(
        "DeepseekV2Config", "DeepseekV2ForCausalLM", **_SMALL | {"num_hidden_layers": 3, "num_key_value_heads": 4},
        kv_lora_rank=24, q_lora_rank=40, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=12,
        moe_intermediate_size=40, n_routed_experts=8, num_experts_per_tok=3, n_shared_experts=2,
        topk_method="group_limited_greedy", n_group=4, topk_group=2, first_k_dense_replace=1,
        routed_scaling_factor=2.0, norm_topk_prob=False, tie_word_embeddings=False, pad_token_id=0,
        rope_scaling={"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16, "beta_fast": 32.0,
                      "beta_slow": 1.0, "mscale": 0.707, "mscale_all_dim": 0.707}),
    # DeepSeek-V2-Lite's: one q_proj, the top 2 of 4 experts chosen greedily.
    "deepseek-v2-lite-greedy": lambda: _hf(
        "DeepseekV2Config", "DeepseekV2ForCausalLM", **_SMALL | {"num_key_value_heads": 4},
        kv_lora_rank=24, q_lora_rank=None, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=24,
        moe_intermediate_size=40, n_routed_experts=4, num_experts_per_tok=2, n_shared_experts=1,
        first_k_dense_replace=1, tie_word_embeddings=False, pad_token_id=0),
    # GLM-4.7-Flash: DeepSeek-V3's attention and routing (here 2 of 4 groups kept), its dense first layer named by
    # mlp_layer_types (its default).
    "glm4-moe-lite-latent": lambda: _with_choice_bias(_hf(
        "Glm4MoeLiteConfig", "Glm4MoeLiteForCausalLM", **_SMALL | {"num_hidden_layers": 3, "num_key_value_heads": 4},
        kv_lora_rank=24, q_lora_rank=40, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=12,
        moe_intermediate_size=40, n_routed_experts=8, num_experts_per_tok=2, n_group=4, topk_group=2,
        routed_scaling_factor=1.8, tie_word_embeddings=False, pad_token_id=0)),
    # MiniMax-M2: Mixtral's experts chosen by sigmoid scores plus a bias, q/k norms over all heads, half of each head
    # rotated (rotary_dim, as its published configs spell it).
    "minimax-m2-sigmoid-partial": lambda: _with_choice_bias(_hf(
        "MiniMaxM2Config", "MiniMaxM2ForCausalLM", **_SMALL, head_dim=32, rotary_dim=16, num_local_experts=4,
        num_experts_per_tok=2, tie_word_embeddings=False)),
    "qwen3-moe-experts": lambda: _hf("Qwen3MoeConfig", "Qwen3MoeForCausalLM", **_SMALL, head_dim=24,
                                     moe_intermediate_size=40, num_experts=4, num_experts_per_tok=2,
                                     norm_topk_prob=False),
    # its sparse step and dense layers: experts where (layer + 1) % 2 == 0 but layer 3 (mlp_only_layers): layer 1 alone
    "qwen3-moe-sparse-step": lambda: _hf("Qwen3MoeConfig", "Qwen3MoeForCausalLM", **_SMALL | {"num_hidden_layers": 4},
                                         moe_intermediate_size=40, num_experts=4, num_experts_per_tok=2,
                                         decoder_sparse_step=2, mlp_only_layers=[3], tie_word_embeddings=False),
    # GPT-NeoX (Pythia): LayerNorms and an exact-GELU MLP with biases, attention beside the MLP on two norms, a quarter
    # of each head rotated, q, k and v fused head by head; and its sequential form with tanh GELU, half of each rotated
    "gpt-neox-parallel-partial": lambda: _hf(
        "GPTNeoXConfig", "GPTNeoXForCausalLM", vocab_size=101, hidden_size=64, intermediate_size=96,
        num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=128, rotary_pct=0.25, bos_token_id=0,
        eos_token_id=0),
    "gpt-neox-sequential-tanh": lambda: _hf(
        "GPTNeoXConfig", "GPTNeoXForCausalLM", vocab_size=101, hidden_size=64, intermediate_size=96,
        num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=128, rotary_pct=0.5,
        use_parallel_residual=False, hidden_act="gelu_new", rotary_emb_base=500.0, tie_word_embeddings=True,
        bos_token_id=0, eos_token_id=0),
    # nanochat (Karpathy's GPT): norms without weights (one on the embeddings), q/k norms after RoPE, which turns the
    # other way, a squared-ReLU MLP, logits capped by tanh (lower than its 15, so that the cap bends these logits)
    "nanochat": lambda: _hf("NanoChatConfig", "NanoChatForCausalLM", **_SMALL, final_logit_softcapping=1.5),
    # Phi-2: attention beside a tanh-GELU MLP on one LayerNorm, biases everywhere (the head's too), 0.4 of each head
    # rotated
    "phi2-parallel-head-bias": lambda: _hf(
        "PhiConfig", "PhiForCausalLM", **{k: v for k, v in _SMALL.items() if k != "rms_norm_eps"}, layer_norm_eps=1e-5,
        partial_rotary_factor=0.4, tie_word_embeddings=False),
    # Ministral 3: Mistral with YaRN and Llama 4's query temperature past the original length (16 here, so that 40-token
    # inputs take it), a sliding window
    "ministral3-yarn-temperature": lambda: _hf(
        "Ministral3Config", "Ministral3ForCausalLM", **_SMALL, head_dim=16, sliding_window=WINDOW,
        rope_parameters={"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0,
                         "original_max_position_embeddings": 16, "beta_fast": 32.0, "beta_slow": 1.0,
                         "mscale": 1.0, "mscale_all_dim": 1.0, "llama_4_scaling_beta": 0.5}),
    # StableLM 2: LayerNorms with biases beside linear layers without (but q, k and v's here), a quarter of each head
    # rotated; and its parallel form, attention beside the MLP on one norm
    "stablelm-qkv-bias": lambda: _hf("StableLmConfig", "StableLmForCausalLM", **{
        k: v for k, v in _SMALL.items() if k != "rms_norm_eps"}, use_qkv_bias=True, tie_word_embeddings=False),
    "stablelm-parallel": lambda: _hf("StableLmConfig", "StableLmForCausalLM", **{
        k: v for k, v in _SMALL.items() if k != "rms_norm_eps"}, use_parallel_residual=True, partial_rotary_factor=0.5),
    # OLMo (1): Llama's blocks with LayerNorms without weights or biases, q, k and v clamped (low, so that it bites)
    "olmo-weightless-clip": lambda: _hf("OlmoConfig", "OlmoForCausalLM", **_SMALL, clip_qkv=0.5),
    # Arcee (AFM-4.5B): Llama with a squared-ReLU MLP, not gated; YaRN
    "arcee-relu2-yarn": lambda: _hf("ArceeConfig", "ArceeForCausalLM", **_SMALL, tie_word_embeddings=False,
                                    rope_parameters={"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0,
                                                     "original_max_position_embeddings": 16}),
    # StarCoder2: GPT-2's LayerNorms and MLP (tanh GELU, not gated) with biases everywhere, RoPE, GQA, a sliding window
    "starcoder2-window-biases": lambda: _hf(
        "Starcoder2Config", "Starcoder2ForCausalLM", **{k: v for k, v in _SMALL.items() if k != "rms_norm_eps"},
        norm_epsilon=1e-5, sliding_window=WINDOW, tie_word_embeddings=False,
        rope_parameters={"rope_type": "default", "rope_theta": 100000.0}),
    # Falcon: LayerNorms with biases, an exact-GELU MLP, q, k and v fused by kv group; Falcon-7B's one kv head and
    # attention beside the MLP on one norm; 40B's new architecture (two norms, 2 kv heads); Falcon 2's (one norm); and
    # attention then the MLP, as many kv heads as heads, tanh GELU, biases everywhere, an untied head
    "falcon-7b-multi-query": lambda: _hf("FalconConfig", "FalconForCausalLM", **_FALCON),
    "falcon-40b-two-norms": lambda: _hf("FalconConfig", "FalconForCausalLM", **_FALCON, new_decoder_architecture=True,
                                        num_kv_heads=2, rope_theta=500.0),
    "falcon2-one-norm": lambda: _hf("FalconConfig", "FalconForCausalLM", **_FALCON, new_decoder_architecture=True,
                                    num_kv_heads=2, num_ln_in_parallel_attn=1),
    "falcon-sequential-biases": lambda: _hf("FalconConfig", "FalconForCausalLM", **_FALCON, multi_query=False,
                                            parallel_attn=False, bias=True, activation="gelu_new",
                                            tie_word_embeddings=False),
    # GPTBigCode (StarCoder, SantaCoder): GPT-2's blocks with one kv head fused beside the queries, or q, k and v
    # fused head by head
    "gpt-bigcode-multi-query": lambda: _hf("GPTBigCodeConfig", "GPTBigCodeForCausalLM", vocab_size=101, n_positions=128,
                                           n_embd=64, n_layer=2, n_head=4, bos_token_id=0, eos_token_id=0),
    "gpt-bigcode-heads": lambda: _hf("GPTBigCodeConfig", "GPTBigCodeForCausalLM", vocab_size=101, n_positions=128,
                                     n_embd=64, n_layer=2, n_head=4, multi_query=False, tie_word_embeddings=False,
                                     bos_token_id=0, eos_token_id=0),
    # GPT-J: attention without biases beside a tanh-GELU MLP with them on one LayerNorm, a head with a bias, the first
    # 8 dims of each head rotated in adjacent pairs
    "gptj-partial-pairs": lambda: _hf("GPTJConfig", "GPTJForCausalLM", vocab_size=101, n_positions=128, n_embd=64,
                                      n_layer=2, n_head=4, rotary_dim=8, bos_token_id=0, eos_token_id=0),
    "llama4-chunked-nope-experts": lambda: _hf("Llama4TextConfig", "Llama4ForCausalLM", **_LLAMA4),
    # and Scout's layout otherwise: experts (top 1) in every layer, three chunked layers to one without positions, no
    # temperature, no q/k norms, tied
    "llama4-scout-layout": lambda: _hf("Llama4TextConfig", "Llama4ForCausalLM", **_LLAMA4 | {
        "interleave_moe_layer_step": 1, "num_experts_per_tok": 1, "no_rope_layer_interval": 4,
        "attn_temperature_tuning": False, "use_qk_norm": False, "tie_word_embeddings": True}),
    # Qwen3.5: Gated DeltaNet layers (2 key heads serving 4 value heads, narrower values) between gated attention
    # layers (a quarter of each head rotated, (1 + w) q/k norms), one in two.
    "qwen3.5-hybrid": lambda: _hf("Qwen3_5TextConfig", "Qwen3_5ForCausalLM", **_QWEN3_5),
    # Qwen3.5-MoE: the same layers, with 4 experts and a gated shared expert in every MLP.
    "qwen3.5-moe-hybrid": lambda: _hf("Qwen3_5MoeTextConfig", "Qwen3_5MoeForCausalLM", **_QWEN3_5,
                                      moe_intermediate_size=40, shared_expert_intermediate_size=72, num_experts=4,
                                      num_experts_per_tok=2),
    # Qwen3-Next: Qwen3.5-MoE's layers, q, k, v and z in one projection (b and a in another), grouped by key head;
    # the top k's weights unnormalised here.
    "qwen3-next-hybrid": lambda: _hf("Qwen3NextConfig", "Qwen3NextForCausalLM", **_QWEN3_5, moe_intermediate_size=40,
                                     shared_expert_intermediate_size=72, num_experts=4, num_experts_per_tok=2,
                                     norm_topk_prob=False),
}


def _hf_to_temper(hf) -> Transformer:
    cfg = from_hf_config(hf.config.to_dict())
    model = Transformer(cfg).eval()
    model.load_state_dict(from_hf_state_dict(cfg, hf.state_dict()))
    return model


@pytest.mark.parametrize("case", CASES)
def test_hf_to_temper_logits_and_greedy_generation(case):
    hf = CASES[case]()
    model = _hf_to_temper(hf)
    assert model.cfg.hf_architecture == hf.config.architectures[0] if hf.config.architectures else True
    x = torch.randint(0, hf.config.vocab_size, (2, 40))
    with torch.no_grad():
        torch.testing.assert_close(model(x), hf(x).logits, rtol=0, atol=1e-4)
        prompt = torch.randint(0, hf.config.vocab_size, (1, 6))
        ours = generate(model, prompt.tolist(), max_new_tokens=26, temperature=0.0)[0]
        theirs = hf.generate(prompt, max_new_tokens=26, do_sample=False, attention_mask=torch.ones_like(prompt))
    # Equal tokens wherever the step is decisive (top two logits further apart than the logits' 1e-4).
    assert_greedy_agrees(ours, theirs[0, 6:].tolist(), next_token_logits(model, prompt[0].tolist(), ours), tol=1e-4)


def test_variant_features_are_exercised():
    """Each family's parity above would fail without its feature (guards against vacuous tests)."""
    x = torch.randint(0, 101, (1, 40))
    for case, off in [("llama3-gqa-untied", {"rope_scaling": None}), ("mistral-window-wide-heads", {"sliding_window": None}),
                      ("gemma", {"scale_embeddings": False}), ("llama2-tied-bias-linear-rope", {"rope_scaling": None}),
                      ("qwen3-qk-norm-wide-heads", {"qk_norm": False}), ("gemma3-local-global", {"sandwich_norm": False}),
                      ("gemma3-local-global", {"rope_local_theta": 50000.0}),  # the global base everywhere
                      ("gemma3-local-global", {"attn_scale_dim": None}),  # 1 / sqrt(head_dim)
                      ("gemma3-local-global", {"global_every": None, "rope_local_theta": None}),  # all windowed
                      ("gemma2-softcap-local-global", {"attn_softcap": None}),
                      ("gemma2-softcap-local-global", {"logit_softcap": None}),
                      ("gemma2-softcap-local-global", {"global_every": None}),  # all windowed
                      ("olmo3-yarn-local-global", {"rope_local_theta": None}),  # the windowed layers stretched too
                      ("olmo3-yarn-local-global", {"sliding_window": None, "global_every": None,
                                                   "rope_local_theta": None, "rope_scaling": None}),
                      ("qwen2-yarn", {"rope_scaling": None}),
                      ("qwen2-yarn", {"rope_scaling": {"rope_type": "yarn", "factor": 4.0,
                                                       "original_max_position_embeddings": 16}}),  # 0.1 ln 4 + 1
                      ("phi4mini-partial-longrope", {"rope_scaling": None}),
                      ("phi4mini-partial-longrope", {"rope_scaling": {  # the short table at every length
                          "rope_type": "longrope", "short_factor": LONGROPE["short_factor"], "factor": 8.0,
                          "long_factor": LONGROPE["short_factor"], "original_max_position_embeddings": 16}}),
                      ("phi4mini-partial-longrope", {"rope_dim": None, "rope_scaling": {  # whole heads rotated
                          "rope_type": "longrope", "short_factor": LONGROPE["short_factor"] * 2, "factor": 8.0,
                          "long_factor": LONGROPE["long_factor"] * 2, "original_max_position_embeddings": 16}}),
                      ("smollm3-nope", {"nope_every": None}), ("smollm3-nope", {"nope_every": 4}),
                      *(("granite-multipliers", {k: None}) for k in ("embed_multiplier", "residual_multiplier",
                                                                      "logit_divisor", "attn_scale_dim")),
                      ("gpt-oss-sinks-experts", {"attn_sinks": False}),
                      ("granite-swa-first-global-sinks", {"attn_sinks": False}),
                      ("hyperclovax-peri-ln-mup", {"sandwich_norm": False}),
                      ("granitemoe-swa-shared", {"attn_sinks": False}),
                      ("granitemoe-swa-shared", {"global_first": False}),  # the last of the four global
                      ("solar-open-sigmoid-groups", {"expert_choice_bias": False}),
                      ("dbrx-clip-experts", {"qkv_clip": None}),
                      ("dbrx-clip-experts", {"experts_per_token": 1}),
                      ("cwm-first-global-llama3", {"global_first": False}),  # the last of the four global
                      ("nemotron-layernorm1p-partial", {"norm_unit_offset": False}),
                      ("nemotron-layernorm1p-partial", {"rope_dim": None}),  # whole heads rotated
                      ("solar-open-sigmoid-groups", {"qkv_bias": False}),
                      ("hyperclovax-peri-ln-mup", {"logit_divisor": 0.25}),  # divided by logits_scaling, as Granite
                      ("granite-swa-first-global-sinks", {"global_first": False}),  # the last of the four global
                      ("granite-swa-nope-global", {"nope_every": None}),  # RoPE on the global layers too
                      ("granite-swa-local-base", {"rope_local_theta": None}),  # the global layers' base everywhere
                      ("gpt-oss-sinks-experts", {"swiglu_limit": None}),  # plain SwiGLU
                      ("gpt-oss-sinks-experts", {"swiglu_limit": 0.1}),  # clamped harder
                      ("mixtral-experts-window", {"experts_per_token": 1}),
                      ("olmoe-experts", {"qk_norm_whole": False, "qk_norm": False}),
                      ("glm4-sandwich-interleaved-rope", {"rope_dim": None}),  # whole heads rotated
                      ("glm4-sandwich-interleaved-rope", {"sandwich_norm": False}),
                      ("glm-interleaved-rope", {"rope_dim": None}), ("glm-interleaved-rope", {"qkv_bias": False}),
                      ("helium-pairs-qkv-bias", {"qkv_bias": False}),
                      ("apertus-xielu-qk-norm", {"qk_norm": False}), ("apertus-attention-bias-beta", {"mlp": "relu2"}),
                      ("ministral-first-global", {"global_first": False}),  # the last of the four global
                      ("vaultgemma-no-post-norms", {"attn_softcap": None}),
                      ("exaone-moe-window-nope-experts", {"nope_every": None}),  # RoPE on the global layers too
                      ("exaone-moe-window-nope-experts", {"expert_choice_bias": False}),
                      ("vaultgemma-no-post-norms", {"global_every": None}),  # all windowed
                      ("dots1-qk-norm-sigmoid-groups", {"qk_norm": False}),
                      ("flex-olmo-post-norm-experts", {"renormalize_experts": True}),
                      ("dots1-qk-norm-sigmoid-groups", {"expert_choice_bias": False}),
                      ("jais2-without-biases", {"norm_bias": None}),  # LayerNorms without biases
                      ("exaone4-local-global-nope", {"nope_every": None}),  # RoPE on the global layers too
                      ("exaone4-local-global-nope", {"global_every": None, "nope_every": None}),  # all windowed
                      ("qwen2-moe-shared-expert", {"shared_expert_gate": False}),
                      ("qwen2-moe-shared-expert", {"shared_expert_gate": False, "shared_expert_ffn_dim": None}),
                      ("qwen3-moe-experts", {"renormalize_experts": True}),
                      ("starcoder2-window-biases", {"sliding_window": None}),
                      ("gpt-neox-parallel-partial", {"rope_dim": None}),
                      ("phi2-parallel-head-bias", {"head_bias": False}),
                      ("olmo-weightless-clip", {"qkv_clip": None}),
                      ("stablelm-qkv-bias", {"norm_bias": False}),
                      ("ministral3-yarn-temperature", {"query_scale_beta": 0.0}),
                      ("nanochat", {"rope_reversed": False}), ("nanochat", {"embed_norm": False}),
                      ("nanochat", {"logit_softcap": None}),
                      ("gpt-neox-parallel-partial", {"parallel_mlp_norm": False}),
                      ("glm4-moe-sigmoid-groups", {"expert_choice_bias": False}),
                      ("glm4-moe-sigmoid-groups", {"expert_groups": 1, "expert_groups_per_token": 1}),
                      ("glm4-moe-sigmoid-groups", {"routed_scaling": 1.0}),
                      ("glm4-moe-sigmoid-groups", {"rope_dim": None}),
                      ("minimax-m2-sigmoid-partial", {"rope_dim": None}),  # whole heads rotated
                      ("minimax-m2-sigmoid-partial", {"expert_choice_bias": False}),
                      ("minimax-m2-sigmoid-partial", {"qk_norm_whole": False, "qk_norm": False}),
                      ("deepseek-v2-group-limited", {"expert_group_best": 2}),  # groups scored as DeepSeek-V3's
                      ("deepseek-v2-group-limited", {"expert_groups": 1, "expert_groups_per_token": 1}),
                      ("deepseek-v2-group-limited", {"renormalize_experts": True}),
                      ("deepseek-v2-group-limited", {"routed_scaling": 1.0}),
                      ("qwen3.5-hybrid", {"rope_dim": None}), ("qwen3.5-hybrid", {"norm_unit_offset": False}),
                      ("gemma4-global-keys-are-values", {"value_norm": False}),
                      ("gemma4-global-keys-are-values", {"layer_scalar": False}),
                      ("gemma4-global-keys-are-values", {"rope_scaling": None}),  # every pair of the global heads turns
                      ("gemma4-global-keys-are-values", {"attn_scale_dim": None}),  # 1 / sqrt(head_dim)
                      ("gemma4-global-wide-heads", {"rope_local_theta": 50000.0}),
                      ("gemma4-experts-beside-mlp", {"router_input_norm": False}),
                      ("gemma4-experts-beside-mlp", {"experts_per_token": 1}),
                      ("gemma4-per-layer-shared-kv", {"per_layer_input_size": None, "per_layer_vocab_size": None}),
                      ("ernie4.5-moe-biased-softmax", {"expert_choice_bias": False}),
                      ("ernie4.5-moe-biased-softmax", {"renormalize_experts": False}),
                      ("hunyuan-norms-after-rope-alpha", {"qk_norm_after_rope": False}),
                      ("hunyuan-norms-after-rope-alpha", {"rope_theta": 10000.0}),  # alpha unread
                      ("hunyuan-moe-shared", {"shared_expert_ffn_dim": None}),
                      ("cohere-parallel-pairs", {"logit_divisor": None}),
                      ("cohere-parallel-pairs", {"rope_scaling": None}),
                      ("cohere2-window-nope", {"nope_every": None}),  # RoPE on the global layers too
                      ("cohere2-window-nope", {"global_every": None, "nope_every": None}),  # all windowed
                      ("lfm2-short-conv", {"qk_norm": False}),
                      ("lfm2-moe-sigmoid-bias", {"expert_choice_bias": False}),
                      ("lfm2-moe-sigmoid-bias", {"routed_scaling": 1.0}),
                      ("granite4-mamba2-moe-nope", {"nope_every": None}),  # RoPE on its attention layer
                      ("granite4-mamba2-dense-rope", {"nope_every": 1}),
                      ("bamba-mamba2-half-rope", {"rope_dim": None}),  # whole heads rotated
                      ("nemotron-h-mamba2-relu2", {"nope_every": None}),  # RoPE on its attention layer
                      ("nemotron3-mamba2-experts", {"expert_choice_bias": False}),
                      ("nemotron3-mamba2-experts", {"expert_groups": 1, "expert_groups_per_token": 1}),
                      ("nemotron3-mamba2-experts", {"routed_scaling": 1.0}),
                      ("falcon-mamba-normed-steps", {"linear_bcdt_eps": None}),
                      ("jamba-mamba-experts", {"linear_bcdt_weights": False}),  # FalconMamba's weightless norms
                      ("jamba-mamba-experts", {"renormalize_experts": True}),
                      ("jamba-mamba-experts", {"nope_every": None}),  # RoPE on its attention layers
                      ("gptj-partial-pairs", {"rope_dim": None}), ("gptj-partial-pairs", {"head_bias": False}),
                      ("falcon-40b-two-norms", {"parallel_mlp_norm": False}),  # one norm for both
                      ("falcon-sequential-biases", {"parallel_block": True}),
                      ("falcon-7b-multi-query", {"norm_bias": None}),  # LayerNorms without biases
                      ("llama4-chunked-nope-experts", {"window_chunked": False}),  # a sliding window instead
                      ("llama4-chunked-nope-experts", {"qk_l2_norm": False}),
                      ("llama4-chunked-nope-experts", {"nope_query_scale": None}),
                      ("llama4-chunked-nope-experts", {"expert_input_weights": False}),  # weighing their outputs
                      ("llama4-scout-layout", {"window_chunked": False, "sliding_window": None, "global_every": None})]:
        hf = CASES[case]()
        model = _hf_to_temper(hf)
        other = Transformer(replace(model.cfg, **off)).eval()
        missing, _ = other.load_state_dict(model.state_dict(), strict=False)  # without q/k norms: fewer tensors
        assert not missing
        with torch.no_grad():
            assert (other(x) - hf(x).logits).abs().max() > 1e-3, (case, off)


@pytest.mark.parametrize("case", CASES)
def test_temper_export_loads_in_transformers(tmp_path, case):
    hf = CASES[case]()
    model = _hf_to_temper(hf)
    out = save_hf(model, model.cfg, tmp_path / "hf", generation_config={"eos_token_id": 3})
    back_hf = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    assert type(back_hf).__name__ == type(hf).__name__
    x = torch.randint(0, model.cfg.vocab_size, (2, 30))
    with torch.no_grad():
        ref = model(x)
        torch.testing.assert_close(back_hf(x).logits, ref, rtol=0, atol=1e-4)
        back, back_cfg = load_hf(out)
        assert back_cfg == model.cfg
        ours = model.state_dict()
        assert all(torch.equal(t, ours[k]) for k, t in back.state_dict().items())  # every tensor read back exactly
        # The logits to a rounding: a weight mapped from the file sits at the file's alignment (8 bytes), where BLAS
        # may take another kernel than for a fresh allocation's 64 (1e-7 apart, measured on one expert's product).
        torch.testing.assert_close(back(x), ref, rtol=0, atol=1e-5)


@pytest.mark.parametrize("name", ["debug", "debug-llama"])
def test_presets_export_as_the_architecture_their_fields_match(tmp_path, name):
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
    hf = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    assert type(hf).__name__ == {"debug": "GPT2LMHeadModel", "debug-llama": "LlamaForCausalLM"}[name]
    x = torch.randint(0, 120, (2, 30))
    with torch.no_grad():
        torch.testing.assert_close(hf(x).logits, model(x), rtol=0, atol=1e-5)
        back, back_cfg = load_hf(out)
        assert back_cfg == replace(cfg, ffn_dim=cfg.hidden_dim, hf_architecture=type(hf).__name__)
        torch.testing.assert_close(back(x), model(x), rtol=0, atol=0)


def test_architecture_is_chosen_by_fields():
    llama = PRESETS["debug-llama"]
    assert hf_architecture(llama) == "LlamaForCausalLM"
    assert hf_architecture(replace(llama, sliding_window=16)) == "MistralForCausalLM"
    assert hf_architecture(replace(llama, qkv_bias=True)) == "Qwen2ForCausalLM"
    assert hf_architecture(replace(llama, qk_norm=True)) == "Qwen3ForCausalLM"
    with pytest.raises(ValueError, match="Qwen3ForCausalLM cannot express this model: it has no biases"):
        to_hf_config(replace(llama, qk_norm=True, qkv_bias=True))
    with pytest.raises(ValueError, match="LlamaForCausalLM cannot express this model: it has no q/k norms"):
        to_hf_config(replace(llama, qk_norm=True, hf_architecture="LlamaForCausalLM"))
    gemma = replace(llama, mlp="geglu", norm_unit_offset=True, scale_embeddings=True, tie_embeddings=True)
    assert hf_architecture(gemma) == "GemmaForCausalLM"
    with pytest.raises(ValueError, match="GemmaForCausalLM cannot express this model: it needs mlp='geglu'"):
        to_hf_config(replace(gemma, tie_embeddings=False))
    with pytest.raises(ValueError, match="Qwen2ForCausalLM cannot express this model"):
        to_hf_config(replace(llama, hf_architecture="Qwen2ForCausalLM"))
    experts = replace(llama, n_experts=4)
    assert hf_architecture(experts) == "MixtralForCausalLM"
    assert hf_architecture(replace(experts, qk_norm=True)) == "Qwen3MoeForCausalLM"
    with pytest.raises(ValueError, match="LlamaForCausalLM cannot express this model: its MLP is dense"):
        to_hf_config(replace(experts, hf_architecture="LlamaForCausalLM"))
    with pytest.raises(ValueError, match="MixtralForCausalLM cannot express this model: it renormalises"):
        to_hf_config(replace(experts, renormalize_experts=False))
    assert hf_architecture(replace(llama, nope_every=4)) == "SmolLM3ForCausalLM"
    assert hf_architecture(replace(llama, residual_multiplier=0.5)) == "GraniteForCausalLM"
    with pytest.raises(ValueError, match="MistralForCausalLM cannot express this model: it has no embedding, residual"):
        to_hf_config(replace(llama, logit_divisor=8.0, sliding_window=16))
    with pytest.raises(ValueError, match="MistralForCausalLM cannot express this model: it rotates every layer"):
        to_hf_config(replace(llama, nope_every=4, sliding_window=16))
    lfm2 = replace(llama, qk_norm=True, attention_layers=(1,), linear_layer="short_conv", linear_conv_size=3)
    assert hf_architecture(lfm2) == "Lfm2ForCausalLM"
    lfm2_moe = replace(lfm2, n_experts=4, router_scores="sigmoid", router_float32=True, dense_layers=1)
    assert hf_architecture(lfm2_moe) == "Lfm2MoeForCausalLM"
    with pytest.raises(ValueError, match="Lfm2MoeForCausalLM cannot express this model: it scores experts by sigmoids"):
        to_hf_config(replace(lfm2_moe, router_scores="softmax"))
    with pytest.raises(ValueError, match="Qwen3_5ForCausalLM cannot express this model: it has Gated DeltaNet layers"):
        to_hf_config(replace(lfm2, norm_unit_offset=True, hf_architecture="Qwen3_5ForCausalLM"))
    with pytest.raises(ValueError, match="Qwen3ForCausalLM cannot express this model: it has neither linear"):
        to_hf_config(replace(lfm2, hf_architecture="Qwen3ForCausalLM"))
    granite4 = replace(llama, attention_layers=(1,), linear_layer="mamba2", linear_key_heads=1, linear_value_heads=4,
                       linear_value_size=32)
    assert hf_architecture(granite4) == hf_architecture(replace(granite4, n_experts=4, shared_expert_ffn_dim=48,
                                                                nope_every=1)) == "GraniteMoeHybridForCausalLM"
    nemotron = replace(granite4, mlp="relu2", norm_cast_after=True, nope_every=1, no_mlp_layers=(0,))
    assert hf_architecture(nemotron) == "NemotronHForCausalLM"
    with pytest.raises(ValueError, match="NemotronHForCausalLM cannot express this model: it needs mlp='relu2'"):
        to_hf_config(replace(nemotron, norm_cast_after=False))
    nemotron3 = replace(nemotron, n_experts=4, shared_expert_ffn_dim=48, router_scores="sigmoid", router_float32=True,
                        expert_choice_bias=True)
    assert to_hf_config(nemotron3)["hybrid_override_pattern"] == "M*E"
    with pytest.raises(ValueError, match="NemotronHForCausalLM cannot express this model: its mixtures are in every "
                                         "MLP, choosing experts by float32 sigmoid scores"):
        to_hf_config(replace(nemotron3, expert_choice_bias=False))
    with pytest.raises(ValueError, match="GraniteMoeHybridForCausalLM cannot express this model: every block has an "
                                         "MLP"):
        to_hf_config(replace(granite4, no_mlp_layers=(0,)))
    granite3 = replace(llama, n_experts=4, residual_multiplier=0.5)
    assert hf_architecture(granite3) == "GraniteMoeForCausalLM"
    assert hf_architecture(replace(granite3, shared_expert_ffn_dim=48)) == "GraniteMoeSharedForCausalLM"
    with pytest.raises(ValueError, match="GraniteMoeForCausalLM cannot express this model: its experts' chosen weights "
                                         "are renormalised, beside no shared MLP"):
        to_hf_config(replace(granite3, shared_expert_ffn_dim=48, hf_architecture="GraniteMoeForCausalLM"))
    with pytest.raises(ValueError, match="GraniteMoeHybridForCausalLM cannot express this model: its experts' chosen "
                                         "weights are renormalised"):
        to_hf_config(replace(granite4, n_experts=4, renormalize_experts=False))
    with pytest.raises(ValueError, match="GraniteMoeHybridForCausalLM cannot express this model: its linear layers are "
                                         "Mamba 2's"):
        to_hf_config(replace(lfm2, qk_norm=False, hf_architecture="GraniteMoeHybridForCausalLM"))
    with pytest.raises(ValueError, match="heads filling a whole multiple of dim"):
        to_hf_config(replace(granite4, linear_value_size=24))
    with pytest.raises(ValueError, match="its attention layers all take RoPE or none do"):
        to_hf_config(replace(granite4, nope_every=2))
    mamba2 = replace(granite4, attention_layers=(), no_mlp_layers=(0, 1))
    assert hf_architecture(mamba2) == "Mamba2ForCausalLM"
    with pytest.raises(ValueError, match="Mamba2ForCausalLM cannot express this model: every layer is a Mamba 2 mixer"):
        to_hf_config(replace(mamba2, no_mlp_layers=(0,), hf_architecture="Mamba2ForCausalLM"))
    mamba = replace(mamba2, linear_layer="mamba", linear_key_heads=1, linear_value_heads=128, linear_value_size=1)
    assert hf_architecture(mamba) == "MambaForCausalLM"
    assert hf_architecture(replace(mamba, linear_bcdt_eps=1e-6)) == "FalconMambaForCausalLM"
    with pytest.raises(ValueError, match="MambaForCausalLM cannot express this model: every layer is a Mamba mixer "
                                         "alone"):  # Jamba's pattern: Mamba layers around attention
        to_hf_config(replace(mamba, attention_layers=(1,), no_mlp_layers=()))
    assert "expand" not in to_hf_config(replace(mamba, linear_value_heads=96))  # channels not a multiple: theirs alone
    with pytest.raises(ValueError, match="MambaForCausalLM cannot express this model: .* its steps, B and C not "
                                         "normalised .FalconMambaForCausalLM"):
        to_hf_config(replace(mamba, linear_bcdt_eps=1e-6, hf_architecture="MambaForCausalLM"))
    jamba = replace(mamba, attention_layers=(1,), no_mlp_layers=(), nope_every=1, linear_bcdt_eps=llama.norm_eps,
                    linear_bcdt_weights=True, n_experts=4, renormalize_experts=False, expert_layers=(1,))
    assert hf_architecture(jamba) == "JambaForCausalLM"
    assert to_hf_config(replace(jamba, n_layers=6, attention_layers=(1, 4), expert_layers=(1, 3, 5)))[
        "attn_layer_period"] == 3
    for fields, why in (({"attention_layers": (1, 2, 4)}, "its attention layers are those whose index leaves one "
                                                          r"remainder by one period \(attn_layer_period\), not \[1, 2, 4\]"),
                        ({"expert_layers": (0, 1)}, "its expert layers are those"),
                        ({"linear_bcdt_eps": 1e-6}, "its linear layers are Mamba's .* the model's norm_eps"),
                        ({"nope_every": None}, "its attention takes no positions"),
                        ({"renormalize_experts": True}, "not renormalised")):
        with pytest.raises(ValueError, match="JambaForCausalLM cannot express this model: .*" + why):
            to_hf_config(replace(jamba, n_layers=5, **fields))
    with pytest.raises(ValueError, match="MixtralForCausalLM cannot express this model: its mixtures fill every block "
                                         "after the dense first ones"):
        to_hf_config(replace(llama, n_experts=4, expert_layers=(1,)))
    bamba = replace(granite4, rope_dim=llama.head_dim // 2)
    assert hf_architecture(bamba) == "BambaForCausalLM"
    with pytest.raises(ValueError, match="BambaForCausalLM cannot express this model: its attention layers turn the "
                                         "first half of each head"):
        to_hf_config(replace(bamba, rope_dim=llama.head_dim // 4))
    assert hf_architecture(replace(llama, mlp="relu2")) == "ArceeForCausalLM"  # (Nemotron-H's: Mamba 2, cast after)
    nanochat = replace(llama, mlp="relu2", norm_weightless=True, embed_norm=True, rope_reversed=True, qk_norm=True,
                       qk_norm_after_rope=True, logit_softcap=15.0)
    assert hf_architecture(nanochat) == "NanoChatForCausalLM"
    with pytest.raises(ValueError, match="NanoChatForCausalLM cannot express this model: its norms have no weights, one "
                                         "normalises the embeddings"):
        to_hf_config(replace(nanochat, embed_norm=False))
    with pytest.raises(ValueError, match="LlamaForCausalLM cannot express this model: its norms have weights"):
        to_hf_config(replace(llama, norm_weightless=True, hf_architecture="LlamaForCausalLM"))
    stablelm = replace(llama, norm="layernorm", norm_bias=True, qkv_bias=True, rope_dim=4)
    assert hf_architecture(stablelm) == hf_architecture(replace(stablelm, parallel_block=True)) == "StableLmForCausalLM"
    with pytest.raises(ValueError, match="StableLmForCausalLM cannot express this model: its LayerNorms have "
                                         "biases and its linear layers none but q, k and v's"):
        to_hf_config(replace(stablelm, bias=True))
    with pytest.raises(ValueError, match="LlamaForCausalLM cannot express this model: it needs RoPE and "
                                         "norm='rmsnorm'"):
        to_hf_config(replace(stablelm, hf_architecture="LlamaForCausalLM"))
    olmo = replace(llama, norm="layernorm", norm_weightless=True, qkv_clip=8.0)
    assert hf_architecture(olmo) == "OlmoForCausalLM"
    with pytest.raises(ValueError, match="OlmoForCausalLM cannot express this model: its LayerNorms have neither "
                                         "weights nor biases .norm_weightless., their epsilon fixed at 1e-5"):
        to_hf_config(replace(olmo, norm_eps=1e-6))
    with pytest.raises(ValueError, match="LlamaForCausalLM cannot express this model: it does not clamp queries"):
        to_hf_config(replace(llama, qkv_clip=8.0))
    ministral3 = replace(llama, query_scale_beta=0.1, rope_scaling={"rope_type": "yarn", "factor": 4.0,
                                                                    "original_max_position_embeddings": 64})
    assert hf_architecture(ministral3) == "Ministral3ForCausalLM"
    with pytest.raises(ValueError, match="MistralForCausalLM cannot express this model: its queries take no "
                                         "temperature"):
        to_hf_config(replace(ministral3, sliding_window=16, hf_architecture="MistralForCausalLM"))
    with pytest.raises(ValueError, match="ArceeForCausalLM cannot express this model: it needs mlp='relu2'"):
        to_hf_config(replace(llama, hf_architecture="ArceeForCausalLM"))
    starcoder2 = replace(llama, norm="layernorm", mlp="gelu", bias=True, sliding_window=16)
    assert hf_architecture(starcoder2) == "Starcoder2ForCausalLM"
    phi = replace(starcoder2, sliding_window=None, parallel_block=True, head_bias=True, rope_dim=4,
                  tie_embeddings=False)
    assert hf_architecture(phi) == "PhiForCausalLM"
    with pytest.raises(ValueError, match="PhiForCausalLM cannot express this model: its head has a bias"):
        to_hf_config(replace(phi, head_bias=False))
    with pytest.raises(ValueError, match="Starcoder2ForCausalLM cannot express this model: its head has no bias"):
        to_hf_config(replace(starcoder2, head_bias=True, tie_embeddings=False, hf_architecture="Starcoder2ForCausalLM"))
    neox = replace(starcoder2, sliding_window=None, n_kv_heads=None, gelu_exact=True, rope_dim=4)
    assert hf_architecture(neox) == hf_architecture(replace(neox, gelu_exact=False, rope_dim=None, parallel_block=True,
                                                            parallel_mlp_norm=True)) == "GPTNeoXForCausalLM"
    for fields, why in (({"parallel_block": True}, "its attention and MLP sit side by side on two norms"),
                        ({"n_kv_heads": 2}, "without grouped-query attention"),
                        ({"sliding_window": 16}, "it has no sliding window")):
        with pytest.raises(ValueError, match="GPTNeoXForCausalLM cannot express this model: .*" + why):
            to_hf_config(replace(neox, hf_architecture="GPTNeoXForCausalLM", **fields))
    with pytest.raises(ValueError, match="Starcoder2ForCausalLM cannot express this model: its GELU is the tanh "):
        to_hf_config(replace(neox, rope_dim=None, hf_architecture="Starcoder2ForCausalLM"))
    with pytest.raises(ValueError, match="GPT2LMHeadModel cannot express this model: its GELU is the tanh"):
        to_hf_config(replace(PRESETS["debug"], gelu_exact=True))
    with pytest.raises(ValueError, match="Starcoder2ForCausalLM cannot express this model: it needs mlp='gelu' .GPT-2's "
                                         "MLP. and biases on every layer and norm"):
        to_hf_config(replace(starcoder2, bias=False, hf_architecture="Starcoder2ForCausalLM"))
    with pytest.raises(ValueError, match="FalconForCausalLM cannot express this model: it has no .*sliding_window=16"):
        to_hf_config(replace(starcoder2, bias=False))  # without linear biases: Falcon's fields, but a window
    cohere = replace(llama, norm="layernorm", bias=False, parallel_block=True, rope_float32=True)
    assert hf_architecture(cohere) == "CohereForCausalLM"
    assert hf_architecture(replace(cohere, sliding_window=16, global_every=4, nope_every=4)) == "Cohere2ForCausalLM"
    with pytest.raises(ValueError, match="Cohere2ForCausalLM cannot express this model: its global layers, and they "
                                         "alone, take no positions"):
        to_hf_config(replace(cohere, sliding_window=16, global_every=4))
    with pytest.raises(ValueError, match="LlamaForCausalLM cannot express this model: it needs RoPE and norm='rms"):
        to_hf_config(replace(cohere, hf_architecture="LlamaForCausalLM"))
    with pytest.raises(ValueError, match="CohereForCausalLM cannot express this model: its attention and MLP sit side"):
        to_hf_config(replace(cohere, parallel_block=False, hf_architecture="CohereForCausalLM"))
    v2 = PRESETS["deepseek-v2-lite"]
    assert (hf_architecture(v2), hf_architecture(PRESETS["deepseek-v3"])) == ("DeepseekV2ForCausalLM",
                                                                            "DeepseekV3ForCausalLM")
    with pytest.raises(ValueError, match="DeepseekV2ForCausalLM cannot express this model: its groups of experts "
                                         "score their best expert"):
        to_hf_config(replace(v2, expert_groups=8, expert_groups_per_token=3, expert_group_best=2))
    with pytest.raises(ValueError, match="DeepseekV2ForCausalLM cannot express this model: it scores experts by a "
                                         "softmax, without a choice bias"):
        to_hf_config(replace(v2, expert_choice_bias=True, hf_architecture="DeepseekV2ForCausalLM"))


def _reads_its_text_model(hf, tmp_path, arch: str, x: torch.Tensor) -> ModelConfig:
    """`hf`, an image-text model, saved: temper reads its text model with its logits for the text `x`, and exports it
    as `arch`, which transformers runs to the same logits. Returns the config read."""
    hf.save_pretrained(tmp_path / "it")
    model, cfg = load_hf(tmp_path / "it")
    assert cfg.hf_architecture == arch
    with torch.no_grad():
        ref = hf(input_ids=x).logits
        torch.testing.assert_close(model(x), ref, rtol=0, atol=1e-4)
        back = transformers.AutoModelForCausalLM.from_pretrained(save_hf(model, cfg, tmp_path / "text")).eval()
        assert type(back).__name__ == arch
        torch.testing.assert_close(back(x).logits, ref, rtol=0, atol=1e-4)
    return cfg


def test_gemma3_image_text_checkpoints_give_their_text_model(tmp_path):
    """Gemma 3 4B, 12B and 27B are published as Gemma3ForConditionalGeneration: temper reads the text model (its
    sparse text_config over Gemma3TextConfig's defaults, its tensors under language_model.) with transformers'
    logits for text, leaves the vision tower out, and exports a text-only Gemma3ForCausalLM."""
    text = dict(vocab_size=300, hidden_size=64, intermediate_size=96, num_hidden_layers=4, num_attention_heads=4,
                num_key_value_heads=1, head_dim=32, query_pre_attn_scalar=32, sliding_window=WINDOW,
                sliding_window_pattern=2, max_position_embeddings=128, rope_scaling={"rope_type": "linear", "factor": 8.0})
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, image_size=28,
                  patch_size=14)
    hf = _hf("Gemma3Config", "Gemma3ForConditionalGeneration", text_config=text, vision_config=vision,
             mm_tokens_per_image=4, image_token_index=299, boi_token_index=297, eoi_token_index=298)
    x = torch.randint(0, 290, (2, 40))  # below the image tokens
    cfg = _reads_its_text_model(hf, tmp_path, "Gemma3ForCausalLM", x)
    assert cfg.global_every == 2 and cfg.rope_local_theta == 1e4
    published = {  # google/gemma-3-4b-it: its text_config names only what differs from the defaults
        "architectures": ["Gemma3ForConditionalGeneration"], "boi_token_index": 255999, "eoi_token_index": 256000,
        "eos_token_id": [1, 106], "image_token_index": 262144, "initializer_range": 0.02, "mm_tokens_per_image": 256,
        "model_type": "gemma3", "text_config": {"hidden_size": 2560, "intermediate_size": 10240,
                                                "model_type": "gemma3_text", "num_hidden_layers": 34,
                                                "rope_scaling": {"factor": 8.0, "rope_type": "linear"},
                                                "sliding_window": 1024},
        "torch_dtype": "bfloat16", "transformers_version": "4.50.0.dev0",
    }
    assert from_hf_config(published) == replace(
        PRESETS["gemma3-1b"], vocab_size=262208, dim=2560, n_layers=34, n_heads=8, n_kv_heads=4, ffn_dim=10240,
        max_seq_len=131072, sliding_window=1024, rope_scaling={"rope_type": "linear", "factor": 8.0},
        hf_architecture="Gemma3ForCausalLM")
    with pytest.raises(ValueError, match="text_config"):
        from_hf_config(published | {"text_config": [1]})


@pytest.mark.parametrize("text_type", ["ministral3", "mistral"])
def test_mistral3_image_text_checkpoints_give_their_text_model(tmp_path, text_type):
    """Ministral 3 and Mistral Small 3.1 are published as Mistral3ForConditionalGeneration (the text model under
    model.language_model., a Pixtral vision tower): temper reads the text model, Ministral 3's or Mistral's by the
    text_config's model_type, with transformers' logits for text, and exports a text-only *ForCausalLM."""
    text = {k: v for k, v in _SMALL.items() if k not in ("bos_token_id", "eos_token_id")} | {
        "model_type": text_type, "head_dim": 16, "sliding_window": None}
    if text_type == "ministral3":
        text["rope_parameters"] = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "beta_fast": 32.0,
                                   "beta_slow": 1.0, "original_max_position_embeddings": 16, "mscale": 1.0,
                                   "mscale_all_dim": 1.0, "llama_4_scaling_beta": 0.5}
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, image_size=28,
                  patch_size=14, head_dim=16)
    hf = _hf("Mistral3Config", "Mistral3ForConditionalGeneration", text_config=text, vision_config=vision,
             image_token_index=100)
    x = torch.randint(0, 96, (2, 40))  # below the image token
    arch = "Ministral3ForCausalLM" if text_type == "ministral3" else "MistralForCausalLM"
    cfg = _reads_its_text_model(hf, tmp_path, arch, x)
    assert (cfg.query_scale_beta is not None) == (text_type == "ministral3")


def test_llama4_image_text_checkpoints_give_their_text_model(tmp_path):
    """Llama 4 Scout and Maverick are published as Llama4ForConditionalGeneration (the text model under
    language_model., a vision model and its projector): temper reads the text model with transformers' logits for
    text, leaves the vision out, and exports a text-only Llama4ForCausalLM."""
    text = {k: v for k, v in _LLAMA4.items() if k not in ("bos_token_id", "eos_token_id", "pad_token_id")}
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, image_size=28,
                  patch_size=14, vision_output_dim=64, projector_input_dim=64, projector_output_dim=64)
    hf = _hf("Llama4Config", "Llama4ForConditionalGeneration", text_config=text, vision_config=vision,
             image_token_index=100, boi_token_index=98, eoi_token_index=99)
    x = torch.randint(0, 96, (2, 40))  # below the image tokens
    cfg = _reads_its_text_model(hf, tmp_path, "Llama4ForCausalLM", x)
    assert (cfg.window_chunked, cfg.expert_layers, cfg.nope_query_scale) == (True, (1, 3), 0.5)


@pytest.mark.parametrize("key, value", [
    ("hidden_act", "gelu"), ("attention_bias", True), ("router_jitter_noise", 0.1), ("interleave_moe_layer_step", 0),
    ("moe_layers", [3, 1]), ("moe_layers", [0, 4]), ("num_experts_per_tok", 5), ("no_rope_layers", [1, 0, 0, 1]),
    ("no_rope_layer_interval", 0), ("attention_chunk_size", 0), ("floor_scale", 0), ("floor_scale", "4"),
    ("layer_types", ["full_attention"] * 4), ("attn_temperature_tuning", "yes"), ("intermediate_size_mlp", None)])
def test_llama4_configs_temper_cannot_build_are_refused_by_name(key, value):
    with pytest.raises(ValueError, match=key):
        from_hf_config({**_LLAMA4, "architectures": ["Llama4ForCausalLM"], key: value})


@pytest.mark.parametrize("key, value", [
    ("alibi", True), ("apply_residual_connection_post_layernorm", True), ("activation", "relu"),
    ("num_attention_heads", 5), ("num_ln_in_parallel_attn", 3), ("multi_query", "yes")])
def test_falcon_configs_temper_cannot_build_are_refused_by_name(key, value):
    d = {**_FALCON, "architectures": ["FalconForCausalLM"], "new_decoder_architecture": True, key: value}
    with pytest.raises(ValueError, match=key):
        from_hf_config(d)


@pytest.mark.parametrize("arch, key, value", [
    ("HeliumForCausalLM", "hidden_act", "gelu"), ("HeliumForCausalLM", "mlp_bias", True),
    ("HeliumForCausalLM", "head_dim", 32), ("Jais2ForCausalLM", "hidden_act", "silu"),
    ("Jais2ForCausalLM", "mlp_bias", False), ("Jais2ForCausalLM", "num_attention_heads", 0),
    ("LlamaForCausalLM", "num_attention_heads", 0), ("Llama4ForCausalLM", "num_attention_heads", 0),
    ("ApertusForCausalLM", "hidden_act", "silu"), ("ApertusForCausalLM", "mlp_bias", True),
    ("ApertusForCausalLM", "num_attention_heads", 0), ("GraniteSWAForCausalLM", "hidden_act", "gelu"),
    ("GraniteSWAForCausalLM", "layer_rope_theta", [0.0, 0.0]),  # windowed layers without positions
    ("GraniteSWAForCausalLM", "layer_rope_theta", [1e4]),  # not one per layer
    ("GraniteSWAForCausalLM", "layer_rope_theta", 1e4), ("GraniteSWAForCausalLM", "layer_rope_theta", [1e4, "x"]),
    ("GraniteSWAForCausalLM", "layer_rope_theta", [1e4, -1.0]),
    ("GraniteSWAForCausalLM", "layer_types", ["sliding_attention", "sliding_attention", "full_attention"]),
    ("GraniteSWAForCausalLM", "attention_multiplier", 0.3), ("HyperCLOVAXForCausalLM", "logits_scaling", 0.0),
    ("HyperCLOVAXForCausalLM", "hidden_act", "gelu")])
def test_helium_jais2_apertus_granite_swa_and_headless_configs_are_refused_by_name(arch, key, value):
    with pytest.raises(ValueError, match=key):
        from_hf_config({**_SMALL, "head_dim": 16, "architectures": [arch], key: value})


@pytest.mark.parametrize("key, value", [("max_window_layers", 1), ("n_routed_experts", None),
                                        ("n_shared_experts", None), ("scoring_func", "softmax")])
def test_dots1_configs_temper_cannot_build_are_refused_by_name(key, value):
    d = {**_SMALL, "architectures": ["Dots1ForCausalLM"], "head_dim": 16, "moe_intermediate_size": 40,
         "n_routed_experts": 8, "num_experts_per_tok": 2, "n_shared_experts": 2, "sliding_window": 8, key: value}
    with pytest.raises(ValueError, match=key):
        from_hf_config({k: v for k, v in d.items() if v is not None})


def test_ministral_reads_its_layer_types_and_places_global_layers_first():
    """Ministral's layer_types: none global (MinistralConfig's default), the first of every N (Ministral-8B's) or the
    last; any other pattern is refused by name. Llama's layers with global ones export as Ministral; another
    architecture refuses global layers first."""
    d = {**_SMALL, "num_hidden_layers": 8, "head_dim": 16, "architectures": ["MinistralForCausalLM"], "sliding_window": 8}
    assert [from_hf_config(d).window_of(i) for i in range(8)] == [8] * 8
    for types, every, first in ((["full_attention"] + ["sliding_attention"] * 3, 4, True),
                                (["sliding_attention"] + ["full_attention"], 2, False)):
        cfg = from_hf_config(d | {"layer_types": types * (8 // len(types))})
        assert (cfg.global_every, cfg.global_first) == (every, first)
        assert hf_architecture(replace(cfg, hf_architecture=None)) == "MinistralForCausalLM"
    with pytest.raises(ValueError, match="Ministral layer_types .* are not supported"):
        from_hf_config(d | {"layer_types": ["full_attention", "sliding_attention", "full_attention"] + [
            "sliding_attention"] * 5})
    with pytest.raises(ValueError, match="Gemma3ForCausalLM cannot express this model: its global layers are the last"):
        to_hf_config(replace(PRESETS["gemma3-1b"], global_first=True))


def test_exaone_moe_is_chosen_by_fields():
    """A mixture with DeepSeek-V3's routing beside EXAONE 4's global layers without positions is K-EXAONE's."""
    cfg = replace(_hf_to_temper(CASES["exaone-moe-window-nope-experts"]()).cfg, hf_architecture=None)
    assert hf_architecture(cfg) == "ExaoneMoeForCausalLM"
    assert hf_architecture(replace(cfg, nope_every=None, sliding_window=None, global_every=None)) == "Glm4MoeForCausalLM"


def test_apertus_is_chosen_by_fields_and_refuses_what_its_config_cannot_say():
    cfg = replace(PRESETS["debug-llama"], mlp="xielu", qk_norm=True)
    assert hf_architecture(cfg) == "ApertusForCausalLM" == to_hf_config(cfg)["architectures"][0]
    assert hf_architecture(replace(cfg, attn_bias=True)) == "ApertusForCausalLM"  # q, k, v and o's biases
    for field, value in (("qk_norm", False), ("bias", True), ("norm_cast_after", True), ("sliding_window", 8)):
        with pytest.raises(ValueError, match=f"ApertusForCausalLM cannot express this model: it has no {field}="):
            hf_architecture(replace(cfg, **{field: value}))
    # Without a RoPE in its config, ApertusConfig's own: Llama 3.1's scaling of a 12M base
    read = from_hf_config({**_SMALL, "architectures": ["ApertusForCausalLM"]})
    assert (read.rope_theta, read.rope_scaling["rope_type"], read.mlp, read.qk_norm) == (12e6, "llama3", "xielu", True)


def test_granite_swa_is_chosen_by_fields_and_refuses_what_its_config_cannot_say():
    cfg = replace(PRESETS["debug-llama"], n_layers=4, attn_sinks=True, sliding_window=8, global_every=4,
                  global_first=True, embed_multiplier=2.0)
    assert hf_architecture(cfg) == "GraniteSWAForCausalLM" == to_hf_config(cfg)["architectures"][0]
    assert to_hf_config(cfg)["layer_types"][:2] == ["full_attention", "sliding_attention"]
    for field, value in (("qk_norm", True), ("rope_local_theta", 100.0)):  # (no base of their own under scaling)
        over = {field: value, "rope_scaling": LLAMA3_SCALING if field == "rope_local_theta" else None}
        with pytest.raises(ValueError, match="GraniteSWAForCausalLM cannot express this model"):
            hf_architecture(replace(cfg, **over))
    with pytest.raises(ValueError, match="layer_rope_theta"):  # two bases among the windowed layers
        from_hf_config(to_hf_config(cfg) | {"layer_rope_theta": [0.0, 1e4, 1e4, 5e4]})
    nope = from_hf_config(to_hf_config(cfg) | {"layer_rope_theta": [0.0, 1e4, 1e4, 1e4]})  # on the global layers
    assert [nope.is_nope(i) for i in range(4)] == [True, False, False, False] and nope.nope_every == 4
    # Without layer_types or layer_rope_theta: the first of every four layers global, one base everywhere
    read = from_hf_config({**_SMALL, "num_hidden_layers": 8, "architectures": ["GraniteSWAForCausalLM"],
                           "rope_theta": 5e4})
    assert (read.global_every, read.global_first, read.sliding_window, read.rope_theta) == (4, True, 128, 5e4)


@pytest.mark.parametrize("published", [False, True], ids=["as-saved", "as-published"])
def test_exaone3_checkpoints_read_as_llama_and_export_as_it(tmp_path, published):
    """EXAONE 3.0 and 3.5 are Llama under other names (transformers 5 runs them as LlamaForCausalLM): their tensors
    (transformer.h.N.attn.attention.q_proj, mlp.c_fc_0, ...) and config keys (num_layers, layer_norm_epsilon,
    activation_function) read as Llama's, as saved by transformers and as published; exported as LlamaForCausalLM."""
    config = transformers.ExaoneConfig(**{k: v for k, v in _SMALL.items() if k not in ("bos_token_id", "eos_token_id")},
                                       rope_parameters={"rope_theta": 1e6, **LLAMA3_SCALING})
    hf = transformers.AutoModelForCausalLM.from_config(config).eval()
    _randomize(hf)
    hf.save_pretrained(tmp_path / "exaone")
    names = load_file(tmp_path / "exaone" / "model.safetensors")
    assert "transformer.h.1.mlp.c_fc_0.weight" in names  # the original names, as transformers writes them back
    if published:  # the published config.json: its class and its own keys
        d = json.loads((tmp_path / "exaone" / "config.json").read_text())
        d = {{"num_hidden_layers": "num_layers", "rms_norm_eps": "layer_norm_epsilon",
              "hidden_act": "activation_function"}.get(k, k): v for k, v in d.items()}
        (tmp_path / "exaone" / "config.json").write_text(json.dumps(d | {"architectures": ["ExaoneForCausalLM"]}))
    model, cfg = load_hf(tmp_path / "exaone")
    assert (cfg.hf_architecture, cfg.n_layers, cfg.rope_theta, cfg.rope_scaling["rope_type"]) == (
        "LlamaForCausalLM", 2, 1e6, "llama3")
    x = torch.randint(0, 101, (2, 40))
    with torch.no_grad():
        torch.testing.assert_close(model(x), hf(x).logits, rtol=0, atol=1e-4)
        back = transformers.AutoModelForCausalLM.from_pretrained(save_hf(model, cfg, tmp_path / "llama")).eval()
        assert type(back).__name__ == "LlamaForCausalLM" and back.config.model_type == "llama"
        torch.testing.assert_close(back(x).logits, hf(x).logits, rtol=0, atol=1e-4)
    with pytest.raises(ValueError, match="num_layers"):
        from_hf_config({"architectures": ["ExaoneForCausalLM"], "num_layers": 2, "num_hidden_layers": 3})


def test_internlm3_configs_read_as_llama():
    """InternLM3 is Llama with its biases named qkv_bias and bias (transformers 5 runs it as LlamaForCausalLM): its
    published config (InternLM3ForCausalLM, dynamic NTK RoPE) reads as Llama's (its checkpoints load: CASES)."""
    published = {"architectures": ["InternLM3ForCausalLM"], "model_type": "internlm3", "hidden_size": 64,
                 "num_attention_heads": 4, "num_hidden_layers": 2, "qkv_bias": False, "bias": False,
                 "rope_theta": 5e7, "rope_scaling": {"rope_type": "dynamic", "factor": 6.0}}
    cfg = from_hf_config(published)
    assert (cfg.hf_architecture, cfg.n_kv_heads, cfg.head_dim, cfg.hidden_dim, cfg.max_seq_len, cfg.bias) == (
        "LlamaForCausalLM", 2, 128, 10240, 32768, False)
    assert cfg.rope_scaling == {"rope_type": "dynamic", "factor": 6.0} and cfg.rope_theta == 5e7
    assert from_hf_config(published | {"qkv_bias": True, "bias": True}).bias
    with pytest.raises(ValueError, match="attention_bias and mlp_bias must agree"):
        from_hf_config(published | {"qkv_bias": True})
    with pytest.raises(ValueError, match="'bias' and 'mlp_bias' both"):
        from_hf_config(published | {"mlp_bias": False})


def test_hyperclovax_is_chosen_by_fields():
    cfg = replace(PRESETS["debug-llama"], sandwich_norm=True, residual_multiplier=0.5, logit_divisor=4.0)
    assert hf_architecture(cfg) == "HyperCLOVAXForCausalLM" == to_hf_config(cfg)["architectures"][0]
    assert to_hf_config(cfg)["logits_scaling"] == 0.25  # a product, where Granite's is a divisor
    assert hf_architecture(replace(cfg, sandwich_norm=False)) == "GraniteForCausalLM"


def test_iquest_coder_reads_as_llama_with_its_config_class_defaults():
    cfg = from_hf_config({"architectures": ["IQuestCoderForCausalLM"], "model_type": "iquestcoder",
                          "rope_theta": 5e5})
    assert (cfg.hf_architecture, cfg.dim, cfg.n_layers, cfg.n_kv_heads, cfg.head_dim, cfg.vocab_size) == (
        "LlamaForCausalLM", 5120, 80, 8, 128, 76800)
    assert from_hf_config({"model_type": "iquestcoder", "num_hidden_layers": 2}).n_layers == 2  # by its model_type


def test_cwm_reads_its_config_class_defaults_and_refuses_a_bias():
    cfg = from_hf_config({"architectures": ["CwmForCausalLM"], "num_hidden_layers": 8})
    assert (cfg.global_every, cfg.global_first, cfg.sliding_window, cfg.rope_theta, cfg.rope_scaling["factor"]) == (
        4, True, 8192, 1e6, 16.0)
    assert [cfg.window_of(i) for i in range(4)] == [None, 8192, 8192, 8192]
    with pytest.raises(ValueError, match="attention_bias"):
        from_hf_config({"architectures": ["CwmForCausalLM"], "attention_bias": True})


def test_dbrx_is_chosen_by_fields_and_refuses_what_it_cannot_say():
    cfg = replace(PRESETS["debug-llama"], norm="layernorm", bias=False, n_experts=4, experts_per_token=2,
                  expert_ffn_dim=48, ffn_dim=48, renormalize_experts=True, qkv_clip=8.0, tie_embeddings=False)
    assert hf_architecture(cfg) == "DbrxForCausalLM" == to_hf_config(cfg)["architectures"][0]
    with pytest.raises(ValueError, match="DbrxForCausalLM cannot express this model: it has no renormalize_experts"):
        hf_architecture(replace(cfg, renormalize_experts=False))
    published = {"architectures": ["DbrxForCausalLM"], "d_model": 64, "n_heads": 4, "n_layers": 2,
                 "attn_config": {"kv_n_heads": 2, "rope_theta": 500000.0}, "ffn_config": {"moe_top_k": 2}}
    assert from_hf_config(published).rope_theta == 500000.0  # (its published configs keep it in attn_config)
    for key, value, named in (("ffn_config", {"moe_normalize_expert_weights": 2.0}, "moe_normalize_expert_weights"),
                              ("ffn_config", {"ffn_act_fn": {"name": "gelu"}}, "ffn_act_fn"),
                              ("tie_word_embeddings", True, "tie_word_embeddings"),
                              ("attn_config", "x", "attn_config")):
        with pytest.raises(ValueError, match=named):
            from_hf_config(published | {key: value})


@pytest.mark.parametrize("name", ["Apertus", "GraniteSWA", "HyperCLOVAX", "SolarOpen", "Cwm", "Nemotron", "Dbrx",
                                  "Exaone", "InternLM3", "IQuestCoder", "GraniteMoeSWA"])
def test_a_config_of_class_defaults_reads_as_the_defaults_temper_fills_in(name):
    """What a config leaves out, temper fills in as its config class would: the class's defaults, written out by
    transformers, read as the same model as a config naming only its architecture."""
    written = getattr(transformers, f"{name}Config")().to_dict()
    bare = from_hf_config({"architectures": [f"{name}ForCausalLM"]})
    assert replace(from_hf_config(written), init_std=bare.init_std) == bare


@pytest.mark.parametrize("case", ["granitemoe-swa-shared", "dbrx-clip-experts", "apertus-attention-bias-beta",
                                  "nemotron-biases", "solar-open-sigmoid-groups", "hyperclovax-peri-ln-mup",
                                  "cwm-first-global-llama3", "granite-swa-nope-global", "internlm3-biases"])
def test_files_transformers_saves_load(tmp_path, case):
    """The names a checkpoint's files use (transformers' `save_pretrained`: stacked experts, scalars, fused q/k/v), not
    only the in-memory ones the parity above reads."""
    hf = CASES[case]()
    hf.save_pretrained(tmp_path)
    model, _ = load_hf(tmp_path)
    x = torch.randint(0, 101, (2, 30))
    with torch.no_grad():
        torch.testing.assert_close(model(x), hf(x).logits, rtol=0, atol=1e-4)


def test_jais2_is_chosen_by_fields():
    cfg = replace(PRESETS["debug-llama"], norm="layernorm", mlp="relu2", bias=True)
    assert hf_architecture(cfg) == "Jais2ForCausalLM" == to_hf_config(cfg)["architectures"][0]
    assert hf_architecture(replace(cfg, norm="rmsnorm", bias=False)) == "ArceeForCausalLM"


def test_exaone4_5_image_text_checkpoints_give_their_text_model(tmp_path):
    """EXAONE 4.5 is published as Exaone4_5_ForConditionalGeneration (EXAONE 4's text model under
    model.language_model., a vision tower): temper reads the text model and exports a text-only Exaone4ForCausalLM."""
    text = {k: v for k, v in _SMALL.items() if k not in ("bos_token_id", "eos_token_id")} | {
        "model_type": "exaone4", "sliding_window": WINDOW, "sliding_window_pattern": 2}
    vision = dict(depth=1, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64, patch_size=14)
    hf = _hf("Exaone4_5_Config", "Exaone4_5_ForConditionalGeneration", text_config=text, vision_config=vision)
    cfg = _reads_its_text_model(hf, tmp_path, "Exaone4ForCausalLM", torch.randint(0, 96, (2, 40)))
    assert (cfg.sliding_window, cfg.global_every) == (WINDOW, 2)


@pytest.mark.parametrize("key, value", [("activation_function", "relu"), ("tie_word_embeddings", True),
                                        ("rotary_dim", 3), ("rotary_dim", 0), ("n_head", 5)])
def test_gptj_configs_temper_cannot_build_are_refused_by_name(key, value):
    d = {"architectures": ["GPTJForCausalLM"], "vocab_size": 101, "n_embd": 64, "n_layer": 2, "n_head": 4,
         "rotary_dim": 8, key: value}
    with pytest.raises(ValueError, match=key):
        from_hf_config(d)


@pytest.mark.parametrize("key, value", [("activation_function", "relu"), ("scale_attn_weights", False),
                                        ("add_cross_attention", True), ("n_head", 5)])
def test_gpt_bigcode_configs_temper_cannot_build_are_refused_by_name(key, value):
    d = {"architectures": ["GPTBigCodeForCausalLM"], "vocab_size": 101, "n_embd": 64, "n_layer": 2, "n_head": 4,
         key: value}
    with pytest.raises(ValueError, match=key):
        from_hf_config(d)


def test_gpt2_blocks_with_one_kv_head_are_gpt_bigcode():
    """GPT-2's blocks with one kv head export as GPTBigCode (StarCoder's); grouped kv heads neither holds."""
    cfg = replace(PRESETS["debug"], n_kv_heads=1)
    assert hf_architecture(cfg) == "GPTBigCodeForCausalLM" and to_hf_config(cfg)["multi_query"]
    with pytest.raises(ValueError, match="GPT2LMHeadModel cannot express this model: it has no grouped-query"):
        to_hf_config(replace(cfg, n_kv_heads=2))
    with pytest.raises(ValueError, match="GPTBigCodeForCausalLM cannot express this model: it has no n_kv_heads=2"):
        to_hf_config(replace(cfg, n_kv_heads=2, hf_architecture="GPTBigCodeForCausalLM"))


def test_attention_without_biases_beside_biased_layers_is_gptj_alone():
    """attn_bias=false beside biased layers is GPT-J's (chosen by it, and its RoPE base 10000 fixed); another
    architecture refuses it by name."""
    cfg = replace(from_hf_config({"architectures": ["GPTJForCausalLM"], "vocab_size": 101, "n_embd": 64, "n_layer": 2,
                                  "n_head": 4, "rotary_dim": 8}), hf_architecture=None)
    assert hf_architecture(cfg) == "GPTJForCausalLM" and cfg.attn_bias is False and cfg.head_bias
    with pytest.raises(ValueError, match="GPTJForCausalLM cannot express this model: it has no rope_theta=500.0"):
        to_hf_config(replace(cfg, rope_theta=500.0))
    with pytest.raises(ValueError, match="PhiForCausalLM cannot express this model: its attention has biases"):
        to_hf_config(replace(cfg, hf_architecture="PhiForCausalLM"))


def test_falcon_is_chosen_by_fields_and_refuses_what_its_config_cannot_say():
    """A model of LayerNorms, RoPE and a GELU MLP without linear biases exports as Falcon, in Falcon-7B's layout where
    it fits (one kv head, one norm) and the new architecture's otherwise; a layout Falcon has no config for (grouped kv
    heads with attention then the MLP, part of each head rotated) is refused naming the field."""
    cfg = replace(from_hf_config({**_FALCON, "architectures": ["FalconForCausalLM"]}), hf_architecture=None)
    assert hf_architecture(cfg) == "FalconForCausalLM" and not to_hf_config(cfg)["new_decoder_architecture"]
    assert to_hf_config(replace(cfg, n_kv_heads=2))["new_decoder_architecture"]
    for off, named in (({"n_kv_heads": 2, "parallel_block": False}, "n_kv_heads=2"), ({"rope_dim": 8}, "rope_dim=8")):
        with pytest.raises(ValueError, match=f"FalconForCausalLM cannot express this model: it has no .*{named}"):
            to_hf_config(replace(cfg, **off))


def test_llama4_export_refuses_what_its_config_cannot_say():
    """Llama4ForCausalLM holds what its config, written and read back, gives again: anything else is named."""
    cfg = replace(from_hf_config({**_LLAMA4, "architectures": ["Llama4ForCausalLM"]}), hf_architecture=None)
    assert hf_architecture(cfg) == "Llama4ForCausalLM"
    # the same model spelled otherwise (widths written out, all layers' experts named) is the same config
    same = replace(cfg, head_size=16, n_kv_heads=2, expert_layers=None, n_experts=4, rope_dim=16)
    assert to_hf_config(same)["moe_layers"] == [0, 1, 2, 3] and from_hf_config(to_hf_config(same)).head_dim == 16
    for off, named in (({"qk_norm": True}, "it has no qk_norm=True"),
                       ({"renormalize_experts": True}, "it has no renormalize_experts=True"),
                       ({"shared_expert_ffn_dim": 24}, "it has no shared_expert_ffn_dim=24"),  # (the experts')
                       ({"global_every": None}, r"Llama4 layer_types .* \(temper chunks the layers with RoPE")):
        with pytest.raises(ValueError, match=f"Llama4ForCausalLM cannot express this model: {named}"):
            to_hf_config(replace(cfg, **off))
    llama = replace(PRESETS["debug-llama"], hf_architecture="LlamaForCausalLM")
    for field in ({"sliding_window": 8, "window_chunked": True}, {"qk_l2_norm": True}):
        with pytest.raises(ValueError, match="no chunked attention"):
            to_hf_config(replace(llama, **field))


@pytest.mark.parametrize("name, arch", [("Qwen2_5_VL", "Qwen2ForCausalLM"), ("Qwen2VL", "Qwen2ForCausalLM"),
                                        ("Qwen3VL", "Qwen3ForCausalLM")])
def test_qwen_vl_image_text_checkpoints_give_their_text_model(tmp_path, name, arch):
    """Qwen2-VL, Qwen2.5-VL and Qwen3-VL are published as *ForConditionalGeneration (the text model under
    model.language_model., a vision tower): temper reads the text model with transformers' logits for text (M-RoPE's
    three position streams are equal there, which is RoPE), and exports a text-only Qwen2ForCausalLM or
    Qwen3ForCausalLM. Qwen2.5-VL's published config keeps the text model's keys at the top, its M-RoPE as a type."""
    text = {k: v for k, v in _SMALL.items() if k not in ("bos_token_id", "eos_token_id")} | {
        "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]}}
    if name == "Qwen3VL":
        text["head_dim"] = 16
    vision = dict(depth=1, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64, patch_size=14)
    if name == "Qwen3VL":
        vision |= dict(num_position_embeddings=16, deepstack_visual_indexes=[0])
    if name == "Qwen2VL":
        vision = dict(depth=1, embed_dim=32, hidden_size=64, num_heads=2, patch_size=14)
    hf = _hf(f"{name}Config", f"{name}ForConditionalGeneration", text_config=text, vision_config=vision,
             image_token_id=100, video_token_id=99, vision_start_token_id=98, vision_end_token_id=97)
    x = torch.randint(0, 96, (2, 40))  # below the vision tokens
    cfg = _reads_its_text_model(hf, tmp_path, arch, x)
    assert cfg.qk_norm == (name == "Qwen3VL") and cfg.qkv_bias == (name != "Qwen3VL")
    published = {  # Qwen/Qwen2.5-VL-7B-Instruct's, its vision_config cut short
        "architectures": ["Qwen2_5_VLForConditionalGeneration"], "attention_dropout": 0.0, "bos_token_id": 151643,
        "eos_token_id": 151645, "hidden_act": "silu", "hidden_size": 3584, "image_token_id": 151655,
        "initializer_range": 0.02, "intermediate_size": 18944, "max_position_embeddings": 128000,
        "max_window_layers": 28, "model_type": "qwen2_5_vl", "num_attention_heads": 28, "num_hidden_layers": 28,
        "num_key_value_heads": 4, "rms_norm_eps": 1e-06, "rope_scaling": {"mrope_section": [16, 24, 24],
                                                                           "rope_type": "default", "type": "default"},
        "rope_theta": 1000000.0, "sliding_window": 32768, "tie_word_embeddings": False, "use_cache": True,
        "use_sliding_window": False, "vision_config": {"depth": 32, "hidden_size": 1280}, "vocab_size": 152064}
    seven = from_hf_config(published)
    assert (seven.dim, seven.n_layers, seven.kv_heads, seven.rope_theta, seven.rope_scaling, seven.hf_architecture) == (
        3584, 28, 4, 1e6, None, "Qwen2ForCausalLM")
    assert from_hf_config(published | {"rope_scaling": {"type": "mrope", "mrope_section": [16, 24, 24]}}) == seven


_MISTRAL4 = dict(vocab_size=101, hidden_size=64, intermediate_size=96, moe_intermediate_size=40, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=4, n_routed_experts=8, num_experts_per_tok=2,
                 n_shared_experts=1, n_group=4, topk_group=2, first_k_dense_replace=1, kv_lora_rank=16, q_lora_rank=24,
                 qk_rope_head_dim=8, qk_nope_head_dim=16, v_head_dim=12, max_position_embeddings=128,
                 routed_scaling_factor=2.0, pad_token_id=0, bos_token_id=0, eos_token_id=0,
                 rope_parameters={"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "beta_fast": 32.0,
                                  "beta_slow": 1.0, "mscale_all_dim": 1.0, "mscale": 1.0,
                                  "original_max_position_embeddings": 16, "llama_4_scaling_beta": 0.5})


def test_mistral4_reads_decodes_and_exports_exactly(tmp_path):
    """Mistral Small 4 (Mistral4ForCausalLM): DeepSeek-V3's latent attention, its whole query (not the rotated part
    alone) scaled by Llama 4's temperature past YaRN's original length (16 here, so 40-token inputs take it); a
    softmax router over groups scored by their two best experts, renormalised and scaled, its experts stored stacked as
    transformers holds them. temper reads it with transformers' logits, decodes through its latent cache (the absorbed
    form) to transformers' tokens, and exports it back exactly (transformers' auto classes do not map a text-only
    Mistral 4: Mistral4ForCausalLM reads it). Each of the fields moves the logits."""
    hf = _hf("Mistral4Config", "Mistral4ForCausalLM", **_MISTRAL4)
    hf.save_pretrained(tmp_path / "hf")
    model, cfg = load_hf(tmp_path / "hf")
    assert (cfg.hf_architecture, cfg.query_scale_beta, cfg.router_scores, cfg.expert_group_best) == (
        "Mistral4ForCausalLM", 0.5, "softmax", 2)
    assert hf_architecture(replace(cfg, hf_architecture=None)) == "Mistral4ForCausalLM"  # by its temperature
    x = torch.randint(0, 101, (2, 40))
    with torch.no_grad():
        ref = hf(x).logits
        torch.testing.assert_close(model(x), ref, rtol=0, atol=1e-4)
        prompt = torch.randint(0, 101, (1, 6))
        ours = generate(model, prompt.tolist(), max_new_tokens=26, temperature=0.0)[0]
        theirs = hf.generate(prompt, max_new_tokens=26, do_sample=False, attention_mask=torch.ones_like(prompt))
        assert_greedy_agrees(ours, theirs[0, 6:].tolist(), next_token_logits(model, prompt[0].tolist(), ours), tol=1e-4)
        back = transformers.Mistral4ForCausalLM.from_pretrained(save_hf(model, cfg, tmp_path / "out")).eval()
        torch.testing.assert_close(back(x).logits, ref, rtol=0, atol=1e-4)
        for off in ({"query_scale_beta": None}, {"expert_group_best": 1}):
            other = Transformer(replace(cfg, **off)).eval()
            other.load_state_dict(model.state_dict())
            assert (other(x) - ref).abs().max() > 1e-3, off


def test_mistral_small_4_image_text_checkpoints_give_their_text_model(tmp_path):
    """Mistral Small 4 is published as Mistral3ForConditionalGeneration whose text_config is Mistral 4's: temper reads
    the text model by that model_type, without the vision tower."""
    text = {k: v for k, v in _MISTRAL4.items() if k not in ("pad_token_id", "bos_token_id", "eos_token_id")}
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, image_size=28,
                  patch_size=14, head_dim=16)
    hf = _hf("Mistral3Config", "Mistral3ForConditionalGeneration", text_config=text | {"model_type": "mistral4"},
             vision_config=vision, image_token_index=100)
    hf.save_pretrained(tmp_path / "it")
    model, cfg = load_hf(tmp_path / "it")
    x = torch.randint(0, 96, (2, 40))
    assert cfg.hf_architecture == "Mistral4ForCausalLM"
    with torch.no_grad():
        torch.testing.assert_close(model(x), hf(input_ids=x).logits, rtol=0, atol=1e-4)


@pytest.mark.parametrize("moe", [False, True], ids=["dense", "moe"])
def test_qwen3_5_image_text_checkpoints_give_their_text_model(tmp_path, moe):
    """Qwen3.5 and Qwen3.5-MoE are published as *ForConditionalGeneration (the text model under
    model.language_model., a vision tower, multi-token-prediction layers): temper reads the text model, with
    transformers' logits for text (M-RoPE's three position streams are equal there, which is RoPE), and exports a
    text-only *ForCausalLM."""
    text = {k: v for k, v in _QWEN3_5.items() if k not in ("bos_token_id", "eos_token_id", "pad_token_id")}
    text["rope_parameters"] = {"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.25,
                               "mrope_section": [1, 1, 2], "mrope_interleaved": True}
    if moe:
        text |= dict(moe_intermediate_size=40, shared_expert_intermediate_size=72, num_experts=4, num_experts_per_tok=2)
    vision = dict(depth=1, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64, patch_size=14,
                  num_position_embeddings=16)
    name = "Qwen3_5Moe" if moe else "Qwen3_5"
    hf = _hf(f"{name}Config", f"{name}ForConditionalGeneration", text_config=text, vision_config=vision,
             image_token_id=100, video_token_id=99, vision_start_token_id=98, vision_end_token_id=97)
    x = torch.randint(0, 96, (2, 40))  # below the vision tokens
    cfg = _reads_its_text_model(hf, tmp_path, f"{name}ForCausalLM", x)
    assert cfg.full_attention_every == 2 and cfg.rope_dim == 8 and cfg.n_experts == (4 if moe else 0)
    with pytest.raises(ValueError, match="layer_types"):
        from_hf_config({**_QWEN3_5, "architectures": ["Qwen3_5ForCausalLM"], "hidden_act": "silu",
                        "layer_types": ["linear_attention", "full_attention", "full_attention", "linear_attention"]})


def test_gemma4_image_text_checkpoints_give_their_text_model(tmp_path):
    """Gemma 4 is published as Gemma4ForConditionalGeneration (the text model under model.language_model., a vision
    tower, an audio tower on E2B and E4B): temper reads the text model (here with E2B's per-layer embeddings and shared
    keys and values) with transformers' logits for text, leaves the towers out, and exports a text-only
    Gemma4ForCausalLM. Its published configs' spelling of the global layers
    (global_head_dim, num_global_key_value_heads) and transformers 5.25's (per_layer_config) read alike."""
    text = {k: v for k, v in _GEMMA4.items() if k not in ("bos_token_id", "eos_token_id")}
    text |= {"vocab_size": 300, "attention_k_eq_v": True, "num_global_key_value_heads": 1, "num_hidden_layers": 6,
             "layer_types": ["sliding_attention", "full_attention"] * 3, "hidden_size_per_layer_input": 8,
             "vocab_size_per_layer_input": 300, "num_kv_shared_layers": 2}  # E2B's parts too
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                  num_key_value_heads=2, head_dim=16, patch_size=4, position_embedding_size=64)
    audio = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, subsampling_conv_channels=[8, 4],
                 output_proj_dims=32)
    hf = _with_layer_scalars(_hf("Gemma4Config", "Gemma4ForConditionalGeneration", text_config=text,
                                 vision_config=vision, audio_config=audio, image_token_id=299, boi_token_id=297,
                                 eoi_token_id=298, video_token_id=296, audio_token_id=295, boa_token_id=294,
                                 eoa_token_index=293))
    x = torch.randint(0, 290, (2, 40))  # below the image and audio tokens
    cfg = _reads_its_text_model(hf, tmp_path, "Gemma4ForCausalLM", x)
    assert (cfg.global_every, cfg.global_shape, cfg.global_values_are_keys) == (2, (1, 32), True)
    assert (cfg.per_layer_input_size, cfg.kv_shared_layers) == (8, 2)
    published = {k: v for k, v in hf.config.text_config.to_dict().items() if k != "per_layer_config"}
    assert "global_head_dim" not in published  # transformers 5.25 writes per_layer_config instead
    published |= {"global_head_dim": 32, "num_global_key_value_heads": 1}
    assert from_hf_config(published) == cfg


@pytest.mark.parametrize("name, kv_heads, global_kv_heads, experts", [("gemma-4-31b", 16, 4, None),
                                                                        ("gemma-4-26b-a4b", 8, 2, 128)])
def test_gemma4_presets_write_the_config_transformers_reads_as_them(name, kv_heads, global_kv_heads, experts):
    """A Gemma 4 preset's config.json reads back as the preset, and transformers reads it with the global layers'
    shape temper builds (every sixth layer: fewer kv heads of 512, values from the keys' projection) and its
    experts."""
    cfg = PRESETS[name]
    d = to_hf_config(cfg)
    assert from_hf_config(d) == replace(cfg, hf_architecture="Gemma4ForCausalLM")
    theirs = transformers.Gemma4TextConfig.from_dict(d)
    assert theirs.layer_types[5] == "full_attention" and theirs.layer_types[4] == "sliding_attention"
    global_layer, windowed_layer = theirs.per_layer_config[5], theirs.per_layer_config[4]
    assert (global_layer.head_dim, global_layer.num_key_value_heads) == (512, global_kv_heads)
    assert (windowed_layer.head_dim, windowed_layer.num_key_value_heads) == (256, kv_heads)
    assert (theirs.attention_k_eq_v, theirs.hidden_size_per_layer_input, theirs.final_logit_softcapping) == (True, 0, 30.0)
    assert (theirs.enable_moe_block, theirs.num_experts) == (experts is not None, experts)


@pytest.mark.parametrize("key, value", [("num_kv_shared_layers", 4),  # every layer: none makes keys and values
                                        ("vocab_size_per_layer_input", 0), ("enable_moe_block", True),  # no sizes
                                        ("use_bidirectional_attention", "all")])
def test_gemma4_configs_temper_cannot_build_are_refused_by_name(key, value):
    """A Gemma 4 config whose layers all take others' keys and values, whose per-layer table or experts have no size,
    or whose attention is bidirectional fails naming its key, rather than loading into a model that computes something
    else."""
    d = {**_GEMMA4, "architectures": ["Gemma4ForCausalLM"], "hidden_size_per_layer_input": 8, key: value}
    with pytest.raises(ValueError, match=key):
        from_hf_config(d)
    with pytest.raises(ValueError, match="per_layer_config"):  # global layers shaped unlike each other
        from_hf_config({**_GEMMA4, "architectures": ["Gemma4ForCausalLM"],
                        "per_layer_config": {"1": {"head_dim": 32}, "3": {"head_dim": 64}}})


@pytest.mark.parametrize("arch, key, value", [("Cohere", "use_qk_norm", True),  # Command R+'s per-head LayerNorms
                                               ("Cohere2", "sliding_window", None),  # no layer would rotate
                                               ("Cohere", "logit_scale", 0.0), ("Cohere2", "logit_scale", -0.25),
                                               ("Cohere", "attention_bias", True)])
def test_cohere_configs_temper_cannot_build_are_refused_by_name(arch, key, value):
    d = {**_SMALL, "architectures": [f"{arch}ForCausalLM"], "sliding_window": WINDOW, key: value}
    with pytest.raises(ValueError, match=key):
        from_hf_config(d)


@pytest.mark.parametrize("arch, key, value, named", [
    ("Lfm2", "conv_bias", True, "conv_bias"), ("Lfm2", "layer_types", ["conv", "mamba"], "layer_types"),
    ("Lfm2", "layer_types", ["full_attention", "full_attention"], "without conv layers"),
    ("Lfm2", "full_attn_idxs", [1, 7], "full_attn_idxs"),  # a layer the model does not have
    ("Lfm2Moe", "num_experts_per_tok", None, "num_experts_per_tok")])
def test_lfm2_configs_temper_cannot_build_are_refused_by_name(arch, key, value, named):
    with pytest.raises(ValueError, match=named):
        from_hf_config({**_SMALL, "architectures": [f"{arch}ForCausalLM"], "layer_types": ["conv", "full_attention"],
                        key: value})


@pytest.mark.parametrize("key, value", [
    ("layer_types", ["mamba", "conv"]), ("layer_types", ["mamba"]),  # a kind temper lacks; not one per layer
    ("mamba_conv_bias", False), ("mamba_proj_bias", True), ("time_step_limit", [0.0, 100.0]),
    ("mamba_d_head", 12), ("mamba_d_head", "64"), ("mamba_n_heads", 0), ("mamba_n_groups", 3), ("num_local_experts", -1), ("num_experts_per_tok", 9),
    ("attention_bias", True)])
def test_granite4_configs_temper_cannot_build_are_refused_by_name(key, value):
    d = {**_SMALL, "architectures": ["GraniteMoeHybridForCausalLM"], "layer_types": ["mamba", "attention"],
         "mamba_n_heads": 8, "mamba_d_state": 16, "num_local_experts": 4, key: value}
    with pytest.raises(ValueError, match=key):
        from_hf_config(d)


@pytest.mark.parametrize("key, value", [
    ("attn_layer_indices", [4]), ("attn_layer_indices", ["1"]), ("mamba_conv_bias", False), ("mamba_d_head", 12),
    ("time_step_limit", [0.0, 100.0]), ("z_loss_coefficient", 1e-4), ("mlp_bias", True), ("attention_bias", True),
    ("rope_parameters", {"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0}), ("mamba_d_state", 0)])
def test_bamba_configs_temper_cannot_build_are_refused_by_name(key, value):
    d = {**_SMALL, "architectures": ["BambaForCausalLM"], "attn_layer_indices": [1], "mamba_n_heads": 8,
         "mamba_d_state": 16, key: value}
    with pytest.raises(ValueError, match=key):
        from_hf_config(d)


@pytest.mark.parametrize("key, value", [
    ("use_bias", True), ("use_conv_bias", False), ("hidden_act", "gelu"), ("time_step_limit", [0.0, 100.0]),
    ("num_heads", 6), ("n_groups", 3), ("head_dim", "16"), ("state_size", 0), ("conv_kernel", 0)])
def test_mamba2_configs_temper_cannot_build_are_refused_by_name(key, value):
    d = {"architectures": ["Mamba2ForCausalLM"], "vocab_size": 101, "hidden_size": 64, "num_hidden_layers": 2,
         "num_heads": 8, "head_dim": 16, "n_groups": 2, "state_size": 16, key: value}
    with pytest.raises(ValueError, match=key):
        from_hf_config(d)


@pytest.mark.parametrize("arch", ["MambaForCausalLM", "FalconMambaForCausalLM"])
@pytest.mark.parametrize("key, value", [
    ("use_bias", True), ("use_conv_bias", False), ("hidden_act", "gelu"), ("time_step_rank", "half"),
    ("time_step_rank", 0), ("state_size", 0), ("conv_kernel", 0), ("expand", 0), ("intermediate_size", -1),
    ("mixer_rms_eps", "1e-6")])  # a key of the wrong type, whichever architecture reads it
def test_mamba_configs_temper_cannot_build_are_refused_by_name(arch, key, value):
    d = {"architectures": [arch], "vocab_size": 101, "hidden_size": 64, "num_hidden_layers": 2, key: value}
    with pytest.raises(ValueError, match=key):
        from_hf_config(d)


@pytest.mark.parametrize("key, value", [
    ("mamba_conv_bias", False), ("mamba_proj_bias", True), ("mamba_d_state", 0), ("mamba_d_conv", 0),
    ("mamba_expand", 0), ("mamba_dt_rank", "half"), ("mamba_dt_rank", -1), ("attn_layer_offset", 8),
    ("expert_layer_offset", -1), ("num_experts", 0), ("num_experts_per_tok", 17), ("hidden_act", "gelu")])
def test_jamba_configs_temper_cannot_build_are_refused_by_name(key, value):
    with pytest.raises(ValueError, match=key):
        from_hf_config({**_SMALL, "architectures": ["JambaForCausalLM"], key: value})


def test_jamba_reads_its_defaults_and_a_dense_or_attention_free_pattern():
    """JambaConfig's defaults are Jamba-v0.1's shape (its step rank "auto": hidden / 16); one expert is a dense MLP
    everywhere; a period longer than the layers places no attention layer."""
    v01 = replace(from_hf_config({"architectures": ["JambaForCausalLM"], "mamba_dt_rank": 256}), hf_architecture=None)
    assert v01 == PRESETS["jamba-v0.1"]
    assert from_hf_config({"architectures": ["JambaForCausalLM"]}).dt_rank == 256
    dense = from_hf_config({**_SMALL, "architectures": ["JambaForCausalLM"], "num_experts": 1, "attn_layer_period": 4,
                            "attn_layer_offset": 3})
    assert (dense.n_experts, dense.expert_layers, dense.attention_layers) == (0, None, ())
    assert to_hf_config(dense)["attn_layer_period"] == 3  # none of 2 layers: (3, 2), the shortest


def test_falcon_mamba_refuses_a_non_positive_mixer_epsilon_and_mamba_reads_its_defaults():
    with pytest.raises(ValueError, match="FalconMamba mixer_rms_eps=0.0 is not supported"):
        from_hf_config({"architectures": ["FalconMambaForCausalLM"], "hidden_size": 64, "mixer_rms_eps": 0.0})
    cfg = from_hf_config({"architectures": ["MambaForCausalLM"]})  # MambaConfig's: mamba-130m's shape, 32 layers
    assert (cfg.dim, cfg.n_layers, cfg.vocab_size, cfg.linear_heads[1], cfg.linear_sizes[0], cfg.dt_rank,
            cfg.linear_conv_size, cfg.tie_embeddings, cfg.linear_bcdt_eps) == (768, 32, 50280, 1536, 16, 48, 4, True,
                                                                               None)


def test_granite4_reads_its_spellings_and_defaults():
    """Granite 4.0's published layer kinds ("mamba", "attention") and transformers 5's ("linear_attention",
    "full_attention"), or the older layers_block_type, read alike; mamba_d_head "auto" is mamba_expand * hidden_size /
    mamba_n_heads; no position_embedding_type means no positions; num_local_experts 0 a dense shared MLP alone; all
    attention layers (Granite 4.0 Micro) no Mamba 2 at all."""
    base = {**_SMALL, "architectures": ["GraniteMoeHybridForCausalLM"], "mamba_n_heads": 8, "mamba_d_state": 16,
            "num_local_experts": 0, "shared_intermediate_size": 80}
    cfgs = [from_hf_config(base | layers) for layers in ({"layer_types": ["mamba", "attention"]},
                                                         {"layer_types": ["linear_attention", "full_attention"]},
                                                         {"layers_block_type": ["mamba", "attention"]})]
    assert cfgs[0] == cfgs[1] == cfgs[2]
    cfg = cfgs[0]
    assert (cfg.attention_layers, cfg.linear_layer, cfg.linear_heads, cfg.linear_sizes) == ((1,), "mamba2", (1, 8),
                                                                                          (16, 16))
    assert (cfg.nope_every, cfg.n_experts, cfg.ffn_dim, cfg.tie_embeddings) == (1, 0, 80, False)
    micro = from_hf_config(base | {"layer_types": ["attention"] * 2, "position_embedding_type": "rope"})
    assert (micro.has_linear_layers, micro.nope_every) == (False, None)
    for arch in ("GraniteMoeForCausalLM", "GraniteMoeSharedForCausalLM"):  # Granite 3.0's have experts always
        with pytest.raises(ValueError, match="num_local_experts=0"):
            from_hf_config({**_SMALL, "architectures": [arch], "num_local_experts": 0})


@pytest.mark.parametrize("key, value, named", [
    ("hybrid_override_pattern", "M-E*-", "hybrid_override_pattern"),  # Nemotron 3's experts
    ("hybrid_override_pattern", "-M*", "an MLP after no mixer"), ("hybrid_override_pattern", "M--*", "after no mixer"),
    ("mlp_hidden_act", "silu", "mlp_hidden_act"), ("residual_in_fp32", True, "residual_in_fp32"),
    ("mamba_proj_bias", True, "mamba_proj_bias"), ("n_groups", 3, "n_groups"), ("time_step_limit", [0.0, 1.0],
                                                                                 "time_step_limit"),
    ("hybrid_override_pattern", "M-ME*-", "not both kinds of MLP"), ("moe_latent_size", 32, "moe_latent_size"),
    ("n_group", 3, "n_group=3"), ("n_group", 0, "n_group=0"), ("num_experts_per_tok", 9, "num_experts_per_tok=9"), ("ssm_state_size", 0,
                                                                                     "ssm_state_size"),
    ("moe_intermediate_size", 0, "moe_intermediate_size")])
def test_nemotron_h_configs_temper_cannot_build_are_refused_by_name(key, value, named):
    d = {**_SMALL, "architectures": ["NemotronHForCausalLM"], "hybrid_override_pattern": "M-*-", "mamba_num_heads": 8,
         **({"hybrid_override_pattern": "MEME"} if key in ("n_group", "num_experts_per_tok", "moe_intermediate_size")
            else {}), key: value}
    with pytest.raises(ValueError, match=named):
        from_hf_config(d)


def test_nemotron_h_reads_its_pattern_in_either_spelling_as_blocks():
    """hybrid_override_pattern (published) and layers_block_type (transformers 5) read alike: a mixer and the MLP
    after it are one block, consecutive mixers blocks without one; the export writes the pattern back."""
    base = {**_SMALL, "architectures": ["NemotronHForCausalLM"], "mamba_num_heads": 8, "n_groups": 2}
    cfg = from_hf_config(base | {"hybrid_override_pattern": "M-MM*-M-"})
    assert cfg == from_hf_config(base | {"layers_block_type": ["mamba", "mlp", "mamba", "mamba", "attention", "mlp",
                                                               "mamba", "mlp"]})
    assert (cfg.n_layers, cfg.attention_layers, cfg.no_mlp_layers, cfg.mlp) == (5, (3,), (1, 2), "relu2")
    assert to_hf_config(cfg)["hybrid_override_pattern"] == "M-MM*-M-"


_JAMBA_V01 = {
    "architectures": ["JambaForCausalLM"], "attention_dropout": 0.0, "attn_layer_offset": 4, "attn_layer_period": 8,
    "bos_token_id": 1, "eos_token_id": 2, "expert_layer_offset": 1, "expert_layer_period": 2, "hidden_act": "silu",
    "hidden_size": 4096, "initializer_range": 0.02, "intermediate_size": 14336, "mamba_conv_bias": True,
    "mamba_d_conv": 4, "mamba_d_state": 16, "mamba_dt_rank": 256, "mamba_expand": 2, "mamba_proj_bias": False,
    "max_position_embeddings": 262144, "model_type": "jamba", "num_attention_heads": 32, "num_experts": 16,
    "num_experts_per_tok": 2, "num_hidden_layers": 32, "num_key_value_heads": 8, "num_logits_to_keep": 1,
    "output_router_logits": False, "pad_token_id": 0, "rms_norm_eps": 1e-06, "router_aux_loss_coef": 0.001,
    "sliding_window": None, "tie_word_embeddings": False, "torch_dtype": "bfloat16", "use_cache": True,
    "use_mamba_kernels": True, "vocab_size": 65536}

_PYTHIA_160M = {
    "architectures": ["GPTNeoXForCausalLM"], "bos_token_id": 0, "eos_token_id": 0, "hidden_act": "gelu",
    "hidden_size": 768, "initializer_range": 0.02, "intermediate_size": 3072, "layer_norm_eps": 1e-05,
    "max_position_embeddings": 2048, "model_type": "gpt_neox", "num_attention_heads": 12, "num_hidden_layers": 12,
    "rotary_emb_base": 10000, "rotary_pct": 0.25, "tie_word_embeddings": False, "torch_dtype": "float16",
    "transformers_version": "4.24.0", "use_cache": True, "use_parallel_residual": True, "vocab_size": 50304}

_LLAMA4_SCOUT = {
    "architectures": ["Llama4ForConditionalGeneration"], "boi_token_index": 200080, "eoi_token_index": 200081,
    "image_token_index": 200092, "model_type": "llama4", "tie_word_embeddings": False, "text_config": {
        "attention_bias": False, "attention_chunk_size": 8192, "attention_dropout": 0.0, "attn_scale": 0.1,
        "attn_temperature_tuning": 4, "bos_token_id": 200000, "eos_token_id": [200001, 200007, 200008],
        "floor_scale": 8192, "for_llm_compressor": False, "head_dim": 128, "hidden_act": "silu", "hidden_size": 5120,
        "initializer_range": 0.02, "interleave_moe_layer_step": 1, "intermediate_size": 8192,
        "intermediate_size_mlp": 16384, "max_position_embeddings": 262144, "model_type": "llama4_text",
        "moe_layers": list(range(48)), "no_rope_layers": [int((i + 1) % 4 != 0) for i in range(48)],
        "num_attention_heads": 40, "num_experts_per_tok": 1, "num_hidden_layers": 48, "num_key_value_heads": 8,
        "num_local_experts": 16, "output_router_logits": False, "pad_token_id": 200018, "rms_norm_eps": 1e-05,
        "rope_scaling": {"factor": 8.0, "high_freq_factor": 4.0, "low_freq_factor": 1.0,
                         "original_max_position_embeddings": 8192, "rope_type": "llama3"},
        "rope_theta": 500000.0, "router_aux_loss_coef": 0.001, "router_jitter_noise": 0.0, "torch_dtype": "bfloat16",
        "use_cache": True, "use_qk_norm": True, "vocab_size": 202048}}

_FALCON_7B = {
    "alibi": False, "apply_residual_connection_post_layernorm": False, "architectures": ["FalconForCausalLM"],
    "attention_dropout": 0.0, "bias": False, "bos_token_id": 11, "eos_token_id": 11, "hidden_dropout": 0.0,
    "hidden_size": 4544, "initializer_range": 0.02, "layer_norm_epsilon": 1e-05, "model_type": "falcon",
    "multi_query": True, "new_decoder_architecture": False, "num_attention_heads": 71, "num_hidden_layers": 32,
    "parallel_attn": True, "torch_dtype": "bfloat16", "transformers_version": "4.27.4", "use_cache": True,
    "vocab_size": 65024}

# Published config.json fields of models with a preset, and their parameter counts (the published sizes).
PUBLISHED = {
    # NVIDIA-Nemotron-Nano-9B-v2: 8.89B
    "nemotron-nano-9b-v2": ({
        "architectures": ["NemotronHForCausalLM"], "vocab_size": 131072, "hidden_size": 4480,
        "intermediate_size": 15680, "num_attention_heads": 40, "num_key_value_heads": 8, "head_dim": 128,
        "hybrid_override_pattern": "M-M-M-MM-M-M-M*-M-M-M*-M-M-M-M*-M-M-M-M*-M-MM-M-M-M-M-M-", "ssm_state_size": 128,
        "conv_kernel": 4, "n_groups": 8, "mamba_num_heads": 128, "mamba_head_dim": 80, "mamba_hidden_act": "silu",
        "mlp_hidden_act": "relu2", "max_position_embeddings": 131072, "layer_norm_epsilon": 1e-5,
        "residual_in_fp32": False, "use_conv_bias": True, "use_bias": False, "tie_word_embeddings": False},
        8_888_227_328),
    # NVIDIA-Nemotron-3-Nano-30B-A3B: 31.6B
    "nemotron-3-nano-30b-a3b": ({
        "architectures": ["NemotronHForCausalLM"], "vocab_size": 131072, "hidden_size": 2688, "intermediate_size": 1856,
        "num_attention_heads": 32, "num_key_value_heads": 2, "head_dim": 128,
        "hybrid_override_pattern": "MEMEM*EMEMEM*EMEMEM*EMEMEM*EMEMEM*EMEMEMEM*EMEMEMEME", "ssm_state_size": 128,
        "conv_kernel": 4, "n_groups": 8, "mamba_num_heads": 64, "mamba_head_dim": 64, "mamba_hidden_act": "silu",
        "mlp_hidden_act": "relu2", "max_position_embeddings": 262144, "layer_norm_epsilon": 1e-5, "norm_eps": 1e-5,
        "n_routed_experts": 128, "n_shared_experts": 1, "num_experts_per_tok": 6, "moe_intermediate_size": 1856,
        "moe_shared_expert_intermediate_size": 3712, "n_group": 1, "topk_group": 1, "norm_topk_prob": True,
        "routed_scaling_factor": 2.5, "residual_in_fp32": False, "use_conv_bias": True, "use_bias": False,
        "mlp_bias": False, "mamba_proj_bias": False, "tie_word_embeddings": False},
        31_577_937_344),
    # Mamba-Codestral-7B-v0.1: 7.29B
    "mamba-codestral-7b": ({
        "architectures": ["Mamba2ForCausalLM"], "vocab_size": 32768, "hidden_size": 4096, "num_hidden_layers": 64,
        "num_heads": 128, "head_dim": 64, "n_groups": 8, "state_size": 128, "expand": 2, "conv_kernel": 4,
        "chunk_size": 256, "layer_norm_epsilon": 1e-5, "residual_in_fp32": True, "use_bias": False,
        "use_conv_bias": True, "hidden_act": "silu", "tie_word_embeddings": False, "initializer_range": 0.02},
        7_285_403_648),
    # state-spaces/mamba-130m-hf: 129M (MambaConfig's defaults besides these)
    "mamba-130m": ({
        "architectures": ["MambaForCausalLM"], "vocab_size": 50280, "hidden_size": 768, "num_hidden_layers": 24,
        "intermediate_size": 1536, "state_size": 16, "expand": 2, "conv_kernel": 4, "time_step_rank": 48,
        "layer_norm_epsilon": 1e-5, "residual_in_fp32": True, "use_bias": False, "use_conv_bias": True,
        "hidden_act": "silu", "tie_word_embeddings": True}, 129_135_360),
    # tiiuae/falcon-mamba-7b: 7.27B; its expand (16) disagrees with its intermediate_size, which transformers reads
    "falcon-mamba-7b": ({
        "architectures": ["FalconMambaForCausalLM"], "bos_token_id": 0, "conv_kernel": 4, "eos_token_id": 11,
        "expand": 16, "hidden_act": "silu", "hidden_size": 4096, "initializer_range": 0.1, "intermediate_size": 8192,
        "layer_norm_epsilon": 1e-05, "model_type": "falcon_mamba", "num_hidden_layers": 64, "pad_token_id": 11,
        "rescale_prenorm_residual": False, "residual_in_fp32": True, "state_size": 16, "tie_word_embeddings": False,
        "time_step_floor": 0.0001, "time_step_init_scheme": "random", "time_step_max": 0.1, "time_step_min": 0.001,
        "time_step_rank": 256, "time_step_scale": 1.0, "torch_dtype": "bfloat16", "use_bias": False,
        "use_cache": True, "use_conv_bias": True, "vocab_size": 65024}, 7_272_665_088),
    # ai21labs/Jamba-v0.1: 51.6B ("52B total"); AI21-Jamba-1.5-Large: 398B, its dims and layers apart (its steps
    # of rank 256, as v0.1's: "auto" would make 398.56B)
    "jamba-v0.1": (_JAMBA_V01, 51_570_323_328),
    "jamba-1.5-large": (_JAMBA_V01 | {"hidden_size": 8192, "intermediate_size": 24576, "num_attention_heads": 64,
                                      "num_hidden_layers": 72}, 398_026_647_264),
    # meta-llama/Llama-4-Scout-17B-16E (its text model: 109B with the vision tower) and Llama-4-Maverick-17B-128E
    "llama-4-scout": (_LLAMA4_SCOUT, 107_769_861_120),
    "llama-4-maverick": (_LLAMA4_SCOUT | {"text_config": _LLAMA4_SCOUT["text_config"] | {
        "interleave_moe_layer_step": 2, "num_local_experts": 128, "max_position_embeddings": 1048576,
        "rope_scaling": None, "use_qk_norm": False, "moe_layers": None, "no_rope_layers": None}}, 400_711_848_960),
    # THUDM/glm-4-9b-chat-hf: 9.40B
    "glm-4-9b": ({
        "architectures": ["GlmForCausalLM"], "attention_bias": True, "attention_dropout": 0.0,
        "eos_token_id": [151329, 151336, 151338], "head_dim": 128, "hidden_act": "silu", "hidden_size": 4096,
        "initializer_range": 0.02, "intermediate_size": 13696, "max_position_embeddings": 131072, "model_type": "glm",
        "num_attention_heads": 32, "num_hidden_layers": 40, "num_key_value_heads": 2, "pad_token_id": 151329,
        "partial_rotary_factor": 0.5, "rms_norm_eps": 1.5625e-07, "rope_theta": 10000.0, "tie_word_embeddings": False,
        "vocab_size": 151552}, 9_399_951_360),
    # tiiuae/falcon-7b and falcon-40b (their safetensors count lm_head again: 7.22B and 41.8B)
    "falcon-7b": (_FALCON_7B, 6_921_720_704),
    "falcon-40b": (_FALCON_7B | {"hidden_size": 8192, "num_attention_heads": 128, "num_hidden_layers": 60,
                                 "new_decoder_architecture": True, "num_kv_heads": 8}, 41_303_293_952),
    # EleutherAI/pythia-160m, pythia-1.4b, pythia-6.9b: the Pythia paper's totals
    "pythia-160m": (_PYTHIA_160M, 162_322_944),
    "pythia-1.4b": (_PYTHIA_160M | {"hidden_size": 2048, "intermediate_size": 8192, "num_attention_heads": 16,
                                    "num_hidden_layers": 24}, 1_414_647_808),
    "pythia-6.9b": (_PYTHIA_160M | {"hidden_size": 4096, "intermediate_size": 16384, "num_attention_heads": 32,
                                    "num_hidden_layers": 32, "vocab_size": 50432}, 6_857_302_016),
    # Granite 4.0-H-350M: 340M
    "granite-4.0-h-350m": ({
        "architectures": ["GraniteMoeHybridForCausalLM"], "attention_bias": False, "attention_multiplier": 0.015625,
        "embedding_multiplier": 12, "hidden_size": 768, "intermediate_size": 2048, "logits_scaling": 3,
        "layer_types": ["attention" if i in (10, 13, 17, 27) else "mamba" for i in range(32)], "mamba_conv_bias": True,
        "mamba_d_conv": 4, "mamba_d_head": 32, "mamba_d_state": 128,
        "mamba_n_groups": 1, "mamba_n_heads": 48, "mamba_proj_bias": False, "max_position_embeddings": 32768,
        "num_attention_heads": 12, "num_experts_per_tok": 0, "num_hidden_layers": 32, "num_key_value_heads": 4,
        "num_local_experts": 0, "position_embedding_type": "nope", "residual_multiplier": 0.246, "rms_norm_eps": 1e-05,
        "rope_theta": 10000, "shared_intermediate_size": 2048, "tie_word_embeddings": True, "vocab_size": 100352},
        340_332_224),
}


@pytest.mark.parametrize("name", PUBLISHED)
def test_published_configs_read_as_their_presets(name):
    """A model's published config.json is its preset, of its published parameter count; the preset's export reads
    back as it."""
    fields, params = PUBLISHED[name]
    cfg = from_hf_config(fields)
    assert replace(cfg, hf_architecture=None) == PRESETS[name]
    assert from_hf_config(to_hf_config(PRESETS[name])) == cfg
    with torch.device("meta"):
        assert Transformer(replace(cfg, max_seq_len=16)).num_params() == params


def test_configs_without_a_rope_base_take_their_config_class_default():
    """CohereConfig's default base is 500000, Lfm2Config's 1e6, Cohere2Config's the usual 10000; a base given in
    either spelling wins."""
    def theta(arch, **kw):
        layers = {"layer_types": ["conv", "full_attention"]} if arch.startswith("Lfm2") else {}
        return from_hf_config({**_SMALL, "architectures": [arch], "sliding_window": WINDOW, **layers, **kw}).rope_theta
    assert (theta("CohereForCausalLM"), theta("Cohere2ForCausalLM"), theta("Lfm2ForCausalLM")) == (
        500000.0, 10000.0, 1000000.0)
    assert theta("CohereForCausalLM", rope_parameters={"rope_type": "default", "rope_theta": 5000.0}) == 5000.0
    assert theta("Lfm2ForCausalLM", rope_theta=8000.0) == 8000.0


def test_lfm2_reads_its_older_spellings_and_mlp_rule():
    """LFM2-1.2B's config spells the MLP's width block_ff_dim (12288, made 8192 by Lfm2MLP's rule) and lists its
    attention layers in full_attn_idxs."""
    cfg = from_hf_config({"architectures": ["Lfm2ForCausalLM"], "vocab_size": 65536, "hidden_size": 2048,
                          "num_hidden_layers": 16, "num_attention_heads": 32, "num_key_value_heads": 8,
                          "block_ff_dim": 12288, "full_attn_idxs": [2, 5, 8, 10, 12, 14], "tie_embedding": True})
    assert (cfg.ffn_dim, cfg.attention_layers, cfg.rope_theta, cfg.tie_embeddings) == (
        8192, (2, 5, 8, 10, 12, 14), 1000000.0, True)
    assert replace(cfg, hf_architecture=None, dropout=PRESETS["lfm2-1.2b"].dropout) == PRESETS["lfm2-1.2b"]
    with torch.device("meta"):
        assert Transformer(replace(cfg, max_seq_len=16)).num_params() == 1_170_340_608  # LFM2-1.2B's 1.17B


def test_cohere_parallel_block_is_exercised():
    """Cohere's parity would fail with its MLP after attention, even one whose norm equals attention's."""
    hf = CASES["cohere-parallel-pairs"]()
    model = _hf_to_temper(hf)
    sequential = Transformer(replace(model.cfg, parallel_block=False)).eval()
    missing, _ = sequential.load_state_dict(model.state_dict(), strict=False)
    assert missing == [f"layers.{i}.mlp_norm.weight" for i in range(model.cfg.n_layers)]
    with torch.no_grad():
        for block in sequential.layers:
            block.mlp_norm.weight.copy_(block.attn_norm.weight)
        x = torch.randint(0, 101, (1, 40))
        assert (sequential(x) - hf(x).logits).abs().max() > 1e-3


@pytest.mark.parametrize("name, arch", [("ernie-4.5-0.3b", "Ernie4_5ForCausalLM"),
                                        ("ernie-4.5-21b-a3b", "Ernie4_5_MoeForCausalLM")])
def test_ernie_presets_are_transformers_defaults(name, arch):
    """transformers' Ernie4_5Config and Ernie4_5_MoeConfig default to baidu/ERNIE-4.5-0.3B-PT and -21B-A3B-PT: they read
    as the presets, which export as those architectures."""
    config = getattr(transformers, arch.replace("ForCausalLM", "Config"))()
    assert from_hf_config(config.to_dict() | {"architectures": [arch]}) == replace(PRESETS[name], hf_architecture=arch)
    assert hf_architecture(PRESETS[name]) == arch


def test_hunyuan_reads_its_fixed_ntk_alpha_in_either_spelling_and_a_length_dependent_one_as_dynamic():
    """Hunyuan's checkpoints label their RoPE "dynamic" with an alpha, a fixed stretch of the base that transformers
    computes once: temper reads it from transformers 5's rope_parameters and from the published rope_scaling alike
    (the parity above holds the base to transformers'); a "dynamic" RoPE without an alpha stretches with the length,
    past max_position_embeddings alone: read as dynamic NTK."""
    d = CASES["hunyuan-norms-after-rope-alpha"]().config.to_dict()
    ours = from_hf_config(d)
    published = {k: v for k, v in d.items() if k != "rope_parameters"} | {
        "rope_theta": 10000.0, "rope_scaling": {"alpha": 1000.0, "type": "dynamic", "factor": 1.0}}
    assert from_hf_config(published) == ours and ours.rope_theta == 10000.0 * 1000.0 ** (24 / 22)
    dynamic = from_hf_config(d | {"rope_parameters": {"rope_type": "dynamic", "factor": 2.0, "rope_theta": 10000.0}})
    assert dynamic.rope_scaling == {"rope_type": "dynamic", "factor": 2.0} and dynamic.rope_theta == 10000.0


def test_gemma4_per_layer_table_defaults_as_transformers_builds_it():
    """A Gemma 4 config with per-layer embeddings but no vocab_size_per_layer_input gets Gemma4TextConfig's 262144
    rows, whatever its vocab_size, as transformers builds the table."""
    d = _GEMMA4 | {"architectures": ["Gemma4ForCausalLM"], "hidden_size_per_layer_input": 8}
    assert from_hf_config(d).per_layer_vocab_size == transformers.Gemma4TextConfig(**_GEMMA4 | {
        "hidden_size_per_layer_input": 8}).vocab_size_per_layer_input == 262144


def test_gemma4_reads_past_the_unused_key_weights_of_its_shared_layers():
    """Gemma 4 E2B's and E4B's published files keep key and value weights for the layers that take another's keys and
    values; transformers ignores them on load, and so does temper, while a stray weight elsewhere still fails."""
    hf = CASES["gemma4-per-layer-shared-kv"]()
    cfg = from_hf_config(hf.config.to_dict())
    sd = dict(hf.state_dict())
    for n in ("k_proj", "v_proj", "k_norm", "v_norm"):  # layer 4: a windowed layer taking layer 2's
        sd[f"model.layers.4.self_attn.{n}.weight"] = torch.ones(1)
    ours = from_hf_state_dict(cfg, sd)
    assert ours.keys() == from_hf_state_dict(cfg, hf.state_dict()).keys()
    with pytest.raises(KeyError, match="layers.2.self_attn.v_norm"):  # layer 2 makes its own: v_norm has no weight
        from_hf_state_dict(cfg, sd | {"model.layers.2.self_attn.v_norm.weight": torch.ones(1)})


def test_gpt2_without_biases_exports_zero_biases(tmp_path):
    cfg = replace(PRESETS["debug"], vocab_size=50, bias=False)
    model = Transformer(cfg).eval()
    _randomize(model)
    hf = transformers.AutoModelForCausalLM.from_pretrained(save_hf(model, cfg, tmp_path)).eval()
    x = torch.randint(0, 50, (1, 16))
    with torch.no_grad():
        torch.testing.assert_close(hf(x).logits, model(x), rtol=0, atol=1e-5)


def test_sharded_export_reads_back_everywhere_and_a_single_file_replaces_it(tmp_path):
    hf = CASES["llama3-gqa-untied"]()
    model = _hf_to_temper(hf)
    out = save_hf(model, model.cfg, tmp_path / "hf", max_shard_bytes=60_000)
    shards = sorted(p.name for p in out.glob("model-*.safetensors"))
    assert len(shards) > 2 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == set(shards)
    x = torch.randint(0, 101, (1, 20))
    with torch.no_grad():
        torch.testing.assert_close(transformers.AutoModelForCausalLM.from_pretrained(out)(x).logits, model(x),
                                   rtol=0, atol=1e-4)
        torch.testing.assert_close(load_hf(out)[0](x), model(x), rtol=0, atol=0)
    save_hf(model, model.cfg, out)  # unsharded now: the old shards and index must not linger
    assert sorted(p.name for p in out.glob("model*")) == ["model.safetensors"]


ROUNDING = {  # case -> the fields that say where its reference rounds to bf16 (read from the architecture)
    "mixtral-experts-window": ("expert_weights_float32",),  # float32 routing weights, their sum rounded once
    "qwen3-moe-experts": ("expert_weights_float32",),  # the weights rounded first
    "glm4-moe-sigmoid-groups": ("expert_weights_float32",),  # float32 routing weights (its router float32 too)
    "deepseek-v3-latent-attention": ("expert_weights_float32",),  # the same routing
    "glm4-moe-lite-latent": ("expert_weights_float32",),  # DeepSeek-V3's
    "deepseek-v2-group-limited": ("expert_weights_float32", "rope_float32"),  # (from a float32 router) RoPE's too
    "olmo2-post-norm": ("norm_cast_after", "rope_float32"),  # norms scale, then round; RoPE in float32
    "gemma4-global-keys-are-values": ("norm_cast_after",),  # its norms scale by w (not 1 + w), then round
    "ernie4.5-pairs-bias": ("rope_float32",),  # RoPE in float32, rounded after
    "llama4-chunked-nope-experts": ("rope_float32", "router_rounded"),  # and its sigmoid of the rounded logits
}


@pytest.mark.parametrize("case", list(ROUNDING))
def test_bf16_logits_round_where_their_reference_rounds(tmp_path, case):
    """In bf16 each reference rounds at its own points; temper rounds at the same ones (its fields, read from the
    architecture), where the other choice moves logits by a few bf16 steps."""
    CASES[case]().save_pretrained(tmp_path)
    theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.bfloat16).eval()
    ours, cfg = load_hf(tmp_path, dtype=torch.bfloat16)
    assert all(getattr(cfg, f) == (case != "qwen3-moe-experts") for f in ROUNDING[case])
    other = Transformer(replace(cfg, **{f: not getattr(cfg, f) for f in ROUNDING[case]})).to(torch.bfloat16)
    other.load_state_dict(ours.state_dict())
    x = torch.randint(0, 101, (4, 40))
    with torch.no_grad():
        ref = theirs(x).logits.float()
        # Relative to the other rounding's error, not pinned: another CPU's bf16 kernels may round a sum differently
        # on both sides (0.0 here; the other rounding: a few bf16 steps).
        assert (ours(x).float() - ref).abs().max() * 4 < (other.eval()(x).float() - ref).abs().max()


@pytest.mark.parametrize("case", ["qwen3.5-hybrid", "qwen3.5-moe-hybrid", "gemma4-experts-beside-mlp",
                                  "gemma4-per-layer-shared-kv", "ernie4.5-moe-biased-softmax", "hunyuan-moe-shared",
                                  "cohere-parallel-pairs", "cohere2-window-nope", "lfm2-short-conv",
                                  "granite4-mamba2-dense-rope", "llama4-scout-layout", "apertus-attention-bias-beta"])
def test_bf16_logits_equal_transformers(tmp_path, case):
    """In bf16, Gated DeltaNet rounds where transformers' reference does: the convolution once, the rule in float32,
    the gated norm's product after the weight; Mamba 2 its step before the float32 rule; Gemma 4's router, experts and per-layer inputs too, ERNIE 4.5's float32
    router, Hunyuan's, Cohere's RoPE (tables rounded, the rotation in float32: rope_tables_rounded) (0.0 apart on the
    machine that wrote this; a step of the largest logit allowed for other CPUs' bf16 kernels)."""
    CASES[case]().save_pretrained(tmp_path)
    theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.bfloat16).eval()
    ours, _ = load_hf(tmp_path, dtype=torch.bfloat16)
    x = torch.randint(0, 101, (4, 80))  # two chunks of the rule
    with torch.no_grad():
        ref = theirs(x).logits.float()
        assert (ours(x).float() - ref).abs().max() <= ref.abs().max() * 2 ** -7


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
def test_gemma2_bf16_scores_are_capped_where_its_reference_caps_them(tmp_path):
    """Gemma 2's eager reference caps the scores in bf16, then takes a float32 softmax; temper's written-out
    attention does the same. FlexAttention (the GPU's path) caps them in float32 inside its kernel: a few bf16 steps
    away, the measure of the other rounding."""
    CASES["gemma2-softcap-local-global"]().save_pretrained(tmp_path)
    theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.bfloat16).eval()
    ours = load_hf(tmp_path, dtype=torch.bfloat16)[0].eval()
    x = torch.randint(0, 101, (4, 40))
    with torch.no_grad():
        ref = theirs(x).logits.float()
        error = (ours(x).float() - ref).abs().max()
        ours.attn_impl = "flex"
        assert error * 4 < (ours(x).float() - ref).abs().max()


def test_gpt_oss_mxfp4_experts_load_as_transformers_dequantizes_them(tmp_path):
    """GPT-OSS is published with its experts in MXFP4 (`*_blocks`: two FP4 values a byte, `*_scales`: a power of two
    per 32): temper dequantizes them to transformers' values (its own `convert_moe_packed_tensors`), so the logits
    equal those of the model holding the dequantized weights; a half without the other fails naming it."""
    from safetensors.torch import save_file
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors

    hf = CASES["gpt-oss-sinks-experts"]()
    g = torch.Generator().manual_seed(0)
    sd = {k: v.contiguous() for k, v in hf.state_dict().items()}
    for name in [k for k in sd if k.endswith(("experts.gate_up_proj", "experts.down_proj"))]:
        E, d_in, d_out = sd[name].shape
        blocks = torch.randint(0, 256, (E, d_out, d_in // 32, 16), generator=g, dtype=torch.uint8)
        scales = torch.randint(121, 128, (E, d_out, d_in // 32), generator=g, dtype=torch.uint8)  # 2^-6 .. 2^0
        sd.pop(name)
        sd[f"{name}_blocks"], sd[f"{name}_scales"] = blocks, scales
        hf.get_parameter(name).data.copy_(convert_moe_packed_tensors(blocks, scales).float())
    save_file(sd, tmp_path / "model.safetensors", metadata={"format": "pt"})
    config = hf.config.to_dict() | {"quantization_config": {"quant_method": "mxfp4"}}
    (tmp_path / "config.json").write_text(json.dumps(config))
    model, cfg = load_hf(tmp_path)
    x = torch.randint(0, 101, (2, 30))
    with torch.no_grad():
        torch.testing.assert_close(model(x), hf(x).logits, rtol=0, atol=1e-4)
    sd.pop("model.layers.1.mlp.experts.down_proj_scales")
    save_file(sd, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match="down_proj_blocks has no scales tensor"):
        load_hf(tmp_path)


def _fp8_blocks(w: torch.Tensor, block: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(float8_e4m3fn weight, float32 scale per block, its dequantized float32 weight): DeepSeek's quantization,
    absmax / 448 per block; the blocks at the right and bottom edges cut short."""
    rows, cols = block
    blocks = F.pad(w, (0, -w.shape[1] % cols, 0, -w.shape[0] % rows)).unflatten(0, (-1, rows)).unflatten(2, (-1, cols))
    scales = blocks.abs().amax(dim=(1, 3)).clamp(min=1e-12) / 448.0  # (out / rows, in / cols)
    full = scales.repeat_interleave(rows, 0)[: w.shape[0]].repeat_interleave(cols, 1)[:, : w.shape[1]]
    q = (w / full).to(torch.float8_e4m3fn)
    return q, scales, q.float() * full


def test_fp8_checkpoints_load_dequantized_block_by_block(tmp_path):
    """DeepSeek-V3, R1 and Kimi K2 are published in fine-grained FP8: float8_e4m3fn linear weights with a float32
    scale per block (`weight_scale_inv`; 128 x 128 there, 16 x 16 here, which the tiny widths do not divide). temper
    dequantizes each weight as it loads it (DeepSeek's `weight_dequant`: the float32 product, rounded once to the
    model's dtype): every tensor equals the dequantized checkpoint's, in float32 and in bf16; a weight without its
    scales, scales that do not fit it and another FP8 layout fail naming them."""
    hf = CASES["deepseek-v3-latent-attention"]()
    hf.save_pretrained(tmp_path / "full")
    full = load_file(tmp_path / "full" / "model.safetensors")
    fp8, dequantized = {}, {}
    for name, w in full.items():
        if w.dim() == 2 and name.startswith("model.layers.") and not name.endswith("mlp.gate.weight"):  # the linears
            fp8[name], fp8[name + "_scale_inv"], dequantized[name] = _fp8_blocks(w, (16, 16))
        else:
            fp8[name] = dequantized[name] = w
    config = json.loads((tmp_path / "full" / "config.json").read_text())
    quant = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic", "weight_block_size": [16, 16]}
    for name, tensors, extra in (("fp8", fp8, {"quantization_config": quant}), ("ref", dequantized, {})):
        (tmp_path / name).mkdir()
        save_file(tensors, tmp_path / name / "model.safetensors", metadata={"format": "pt"})
        (tmp_path / name / "config.json").write_text(json.dumps(config | extra))
    assert sum(t.dtype == torch.float8_e4m3fn for t in fp8.values()) > 20
    for dtype in (torch.float32, torch.bfloat16):
        ours, ref = load_hf(tmp_path / "fp8", dtype=dtype)[0].state_dict(), load_hf(tmp_path / "ref", dtype=dtype)[0]
        assert all(torch.equal(t, ours[k]) for k, t in ref.state_dict().items())
        x = torch.randint(0, 101, (2, 30))
        with torch.no_grad():  # and the quantization mattered: the logits moved from the full-precision model's
            assert (ref(x).float() - hf(x).logits).abs().max() > 1e-3
    bad = {"no scales": ({k: v for k, v in fp8.items() if k != "model.layers.1.self_attn.o_proj.weight_scale_inv"},
                         quant, "FP8 model.layers.1.self_attn.o_proj.weight has no weight_scale_inv tensor"),
           "misfit": (fp8, quant | {"weight_block_size": [8, 8]}, "are not FP8 in blocks of 8 x 8"),
           "e5m2": (fp8, quant | {"fmt": "e5m2"}, "fp8 with fmt='e5m2', weight_block_size=.* is not supported"),
           "no config": ({k: v for k, v in fp8.items() if not k.endswith("_scale_inv")}, None,
                         r"is torch.float8_e4m3fn but config.json declares no FP8 quantization_config")}
    for tensors, q, match in bad.values():
        save_file(tensors, tmp_path / "fp8" / "model.safetensors", metadata={"format": "pt"})
        (tmp_path / "fp8" / "config.json").write_text(json.dumps(config | ({"quantization_config": q} if q else {})))
        with pytest.raises(CheckpointError, match=match):
            load_hf(tmp_path / "fp8")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_load_in_low_precision(tmp_path, dtype):
    hf = CASES["qwen2-qkv-bias-tied"]()
    model = _hf_to_temper(hf)
    save_hf(model, model.cfg, tmp_path)
    low, _ = load_hf(tmp_path, dtype=dtype)
    assert {p.dtype for p in low.parameters()} == {dtype}
    x = torch.randint(0, 101, (1, 20))
    with torch.no_grad():
        ref = model(x)
        assert (low(x).float() - ref).abs().max() < 0.05 * ref.abs().max()
        # A bf16 checkpoint read as bf16 goes straight into place: the same values.
        save_hf(low, low.cfg, tmp_path / "low")
        again, _ = load_hf(tmp_path / "low", dtype=dtype)
        assert all(torch.equal(a, b) for a, b in zip(again.state_dict().values(), low.state_dict().values()))


def test_apertus_scalars_read_from_every_checkpoint_kind(tmp_path):
    """xIELU's beta and eps are scalars (no rows to read in slices): read from safetensors into another dtype and from
    a pickled state dict, with the checkpoint's values."""
    hf = CASES["apertus-attention-bias-beta"]()
    hf.save_pretrained(tmp_path / "st")
    hf.config.save_pretrained(tmp_path / "bin")
    torch.save(hf.state_dict(), tmp_path / "bin" / "pytorch_model.bin")
    for model in (load_hf(tmp_path / "st", dtype=torch.float64)[0], load_hf(tmp_path / "bin", allow_pickle=True)[0]):
        act = model.layers[1].mlp.act
        assert act.beta.shape == () and act.beta.item() == 0.375 and act.eps.item() == pytest.approx(-1e-6)


def test_pickled_weights_only_when_allowed_and_never_code(tmp_path):
    hf = CASES["mistral-window-wide-heads"]()
    hf.config.save_pretrained(tmp_path / "bin")  # an older checkpoint: config + pickled state dict
    torch.save(hf.state_dict(), tmp_path / "bin" / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="allow_pickle"):
        load_hf(tmp_path / "bin")
    model, _ = load_hf(tmp_path / "bin", allow_pickle=True)
    x = torch.randint(0, 101, (1, 20))
    with torch.no_grad():
        torch.testing.assert_close(model(x), hf(x).logits, rtol=0, atol=1e-4)

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {tmp_path / 'pwned'}",))

    torch.save({"model.embed_tokens.weight": Evil()}, tmp_path / "bin" / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="weights_only"):
        load_hf(tmp_path / "bin", allow_pickle=True)
    assert not (tmp_path / "pwned").exists()


def test_reads_a_hub_snapshot_of_symlinks(tmp_path):
    """The layout huggingface_hub.snapshot_download writes: snapshots/<rev>/<file> -> ../../blobs/<hash>."""
    hf = CASES["gemma"]()
    model = _hf_to_temper(hf)
    src = save_hf(model, model.cfg, tmp_path / "src", max_shard_bytes=100_000)
    repo = tmp_path / "models--org--tiny"
    (repo / "blobs").mkdir(parents=True)
    snap = repo / "snapshots" / "abc123"
    snap.mkdir(parents=True)
    for i, f in enumerate(sorted(src.iterdir())):
        blob = repo / "blobs" / f"blob{i}"
        os.replace(f, blob)
        (snap / f.name).symlink_to(os.path.relpath(blob, snap))
    x = torch.randint(0, 101, (1, 20))
    with torch.no_grad():
        torch.testing.assert_close(load_hf(snap)[0](x), model(x), rtol=0, atol=0)


def _llama_dir(tmp_path, **over):
    hf = CASES["llama3-gqa-untied"]()
    hf.save_pretrained(tmp_path)
    return tmp_path, {k: v.clone() for k, v in hf.state_dict().items()}


def test_bad_checkpoints_fail_clearly(tmp_path):
    with pytest.raises(ValueError, match=", ".join(SUPPORTED_ARCHITECTURES)):
        from_hf_config({"architectures": ["BertForMaskedLM"]})
    llama = to_hf_config(PRESETS["debug-llama"])
    with pytest.raises(ValueError, match="rope type 'ntk-by-parts'"):
        from_hf_config(llama | {"rope_scaling": {"rope_type": "ntk-by-parts", "factor": 2.0}})
    with pytest.raises(ValueError, match=r"rope_scaling is missing \['short_factor', 'long_factor'\]"):
        from_hf_config(llama | {"rope_scaling": {"rope_type": "longrope", "factor": 2.0}})
    with pytest.raises(ValueError, match="rope_scaling.long_factor must be 8 positive numbers"):
        from_hf_config(llama | {"rope_scaling": {"rope_type": "longrope", "short_factor": [1.0] * 8,
                                                 "long_factor": [1.0] * 7}})
    with pytest.raises(ValueError, match="key 'rope_scaling.short_factor' must be list, got 'x'"):
        from_hf_config(llama | {"rope_scaling": {"rope_type": "longrope", "short_factor": "x"}})
    with pytest.raises(ValueError, match="Llama partial_rotary_factor=0.5 is not supported"):
        from_hf_config(llama | {"partial_rotary_factor": 0.5})
    with pytest.raises(ValueError, match="LlamaForCausalLM cannot express this model: it rotates whole heads"):
        to_hf_config(replace(PRESETS["debug-llama"], rope_dim=8))
    with pytest.raises(ValueError, match=r"SeedOss attention_bias, attention_out_bias, mlp_bias = \(False, False, True\)"):
        from_hf_config(to_hf_config(PRESETS["debug-llama"]) | {"architectures": ["SeedOssForCausalLM"],
                                                               "mlp_bias": True})
    exaone = to_hf_config(replace(PRESETS["debug-llama"], n_layers=4, sliding_window=8, global_every=2, nope_every=2,
                                  qk_norm=True, pre_norm=False, sandwich_norm=True))
    assert exaone["architectures"] == ["Exaone4ForCausalLM"]
    del exaone["layer_types"]
    assert from_hf_config(exaone | {"sliding_window_pattern": "LG"}).global_every == 2
    with pytest.raises(ValueError, match="EXAONE 4 sliding_window_pattern='LGL' is not supported"):
        from_hf_config(exaone | {"sliding_window_pattern": "LGL"})
    with pytest.raises(ValueError, match="Granite attention_multiplier=0.3 is not supported"):
        from_hf_config(to_hf_config(replace(PRESETS["debug-llama"], residual_multiplier=0.5))
                       | {"attention_multiplier": 0.3})
    smol = to_hf_config(replace(PRESETS["debug-llama"], n_layers=4, nope_every=2))
    assert from_hf_config(smol).nope_every == 2
    with pytest.raises(ValueError, match=r"SmolLM3 no_rope_layers \[1, 0, 0, 1\] are not supported"):
        from_hf_config(smol | {"no_rope_layers": [1, 0, 0, 1]})
    with pytest.raises(ValueError, match="key 'no_rope_layer_interval' must be a positive number of layers, got 0"):
        from_hf_config({k: v for k, v in smol.items() if k != "no_rope_layers"} | {"no_rope_layer_interval": 0})
    with pytest.raises(ValueError, match="SmolLM3 use_sliding_window=true is not supported"):
        from_hf_config(smol | {"use_sliding_window": True, "sliding_window": 8})
    with pytest.raises(ValueError, match="key 'rope_scaling.beta_fast' must be a number or null, got '32'"):
        from_hf_config(to_hf_config(PRESETS["debug-llama"]) | {"rope_scaling": {"rope_type": "yarn", "beta_fast": "32"}})
    with pytest.raises(ValueError, match="no Hugging Face architecture"):
        to_hf_config(ModelConfig(pos="learned", norm="rmsnorm", mlp="gelu"))  # (rope, layernorm, gelu: StarCoder2)

    root, sd = _llama_dir(tmp_path / "a")
    weights = root / "model.safetensors"
    name = "model.layers.1.mlp.up_proj.weight"
    save_file({k: v for k, v in sd.items() if k != name}, weights, metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=f"missing tensors \\['{name}'\\]"):
        load_hf(root)
    save_file(sd | {"model.layers.0.extra.weight": torch.zeros(2)}, weights, metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match="unexpected tensor 'model.layers.0.extra.weight' for LlamaForCausalLM"):
        load_hf(root)
    save_file(sd | {name: torch.zeros(96, 63)}, weights, metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=rf"{name} has shape \[96, 63\], expected \[96, 64\]"):
        load_hf(root)

    good = weights.read_bytes()
    (n,) = struct.unpack("<Q", good[:8])
    weights.write_bytes(struct.pack("<Q", 10**12) + good[8:])
    with pytest.raises(CheckpointError, match="model.safetensors: corrupt safetensors header"):
        load_hf(root)
    weights.write_bytes(good[:8] + b"{not json" + good[17:])
    with pytest.raises(CheckpointError, match="corrupt safetensors header"):
        load_hf(root)
    header = json.loads(good[8:8 + n])
    first = next(k for k in header if k != "__metadata__")
    header[first]["data_offsets"] = [0, 10**9]
    body = json.dumps(header).encode()
    weights.write_bytes(struct.pack("<Q", len(body)) + body + good[8 + n:])
    with pytest.raises(CheckpointError, match=f"tensor '{first}' has out-of-range offsets"):
        load_hf(root)

    (root / "config.json").write_text("{broken")
    with pytest.raises(CheckpointError, match="config.json: invalid JSON"):
        load_hf(root)


def test_sharded_index_refuses_escaping_names(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(to_hf_config(PRESETS["debug"])))
    (tmp_path / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {"transformer.wte.weight": "../../etc/passwd.safetensors"}}))
    with pytest.raises(CheckpointError, match="escapes"):
        load_hf(tmp_path)


def test_published_configs_map_to_presets():
    """config.json of meta-llama/Llama-3.2-1B, openai-community/gpt2 and Qwen/Qwen3-0.6B, as published on the Hub."""
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
    preset = replace(PRESETS["llama-3.2-1b"], hf_architecture="LlamaForCausalLM")
    assert from_hf_config(llama) == preset
    assert from_hf_config(to_hf_config(PRESETS["llama-3.2-1b"])) == preset
    gpt2 = {"activation_function": "gelu_new", "architectures": ["GPT2LMHeadModel"], "n_ctx": 1024, "n_embd": 768,
            "n_head": 12, "n_layer": 12, "n_positions": 1024, "layer_norm_epsilon": 1e-05, "vocab_size": 50257,
            "model_type": "gpt2", "resid_pdrop": 0.1}
    assert from_hf_config(gpt2) == replace(PRESETS["gpt2-124m"], vocab_size=50257, ffn_dim=3072,
                                           hf_architecture="GPT2LMHeadModel")
    qwen3 = {  # Qwen/Qwen3-0.6B
        "architectures": ["Qwen3ForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
        "bos_token_id": 151643, "eos_token_id": 151645, "head_dim": 128, "hidden_act": "silu", "hidden_size": 1024,
        "initializer_range": 0.02, "intermediate_size": 3072, "max_position_embeddings": 40960,
        "max_window_layers": 28, "model_type": "qwen3", "num_attention_heads": 16, "num_hidden_layers": 28,
        "num_key_value_heads": 8, "rms_norm_eps": 1e-06, "rope_scaling": None, "rope_theta": 1000000,
        "sliding_window": None, "tie_word_embeddings": True, "torch_dtype": "bfloat16",
        "transformers_version": "4.51.0", "use_cache": True, "use_sliding_window": False, "vocab_size": 151936,
    }
    preset = replace(PRESETS["qwen3-0.6b"], hf_architecture="Qwen3ForCausalLM")
    assert from_hf_config(qwen3) == preset
    assert from_hf_config(to_hf_config(PRESETS["qwen3-0.6b"])) == preset
    with pytest.raises(ValueError, match="Qwen3 attention_bias=true is not supported"):
        from_hf_config(qwen3 | {"attention_bias": True})
    gemma3 = {  # google/gemma-3-1b-it
        "architectures": ["Gemma3ForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
        "attn_logit_softcapping": None, "bos_token_id": 2, "cache_implementation": "hybrid", "eos_token_id": [1, 106],
        "final_logit_softcapping": None, "head_dim": 256, "hidden_activation": "gelu_pytorch_tanh", "hidden_size": 1152,
        "initializer_range": 0.02, "intermediate_size": 6912, "max_position_embeddings": 32768,
        "model_type": "gemma3_text", "num_attention_heads": 4, "num_hidden_layers": 26, "num_key_value_heads": 1,
        "pad_token_id": 0, "query_pre_attn_scalar": 256, "rms_norm_eps": 1e-06, "rope_local_base_freq": 10000,
        "rope_scaling": None, "rope_theta": 1000000, "sliding_window": 512, "sliding_window_pattern": 6,
        "torch_dtype": "bfloat16", "transformers_version": "4.50.0.dev0", "use_cache": True, "vocab_size": 262144,
    }
    preset = replace(PRESETS["gemma3-1b"], hf_architecture="Gemma3ForCausalLM")
    assert from_hf_config(gemma3) == preset
    assert from_hf_config(to_hf_config(PRESETS["gemma3-1b"])) == preset
    # transformers 5 writes the layer types out and one RoPE per type: the same model.
    new = transformers.Gemma3TextConfig(**{k: v for k, v in gemma3.items() if k != "architectures"}).to_dict()
    assert "layer_types" in new and "full_attention" in new["rope_parameters"]
    assert from_hf_config(new | {"architectures": ["Gemma3ForCausalLM"]}) == preset
    assert from_hf_config(gemma3 | {"query_pre_attn_scalar": 168}).attn_scale_dim == 168  # Gemma 3 27B's
    gemma2 = {  # google/gemma-2-2b
        "architectures": ["Gemma2ForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
        "attn_logit_softcapping": 50.0, "bos_token_id": 2, "cache_implementation": "hybrid", "eos_token_id": 1,
        "final_logit_softcapping": 30.0, "head_dim": 256, "hidden_act": "gelu_pytorch_tanh",
        "hidden_activation": "gelu_pytorch_tanh", "hidden_size": 2304, "initializer_range": 0.02,
        "intermediate_size": 9216, "max_position_embeddings": 8192, "model_type": "gemma2", "num_attention_heads": 8,
        "num_hidden_layers": 26, "num_key_value_heads": 4, "pad_token_id": 0, "query_pre_attn_scalar": 256,
        "rms_norm_eps": 1e-06, "rope_theta": 10000.0, "sliding_window": 4096, "torch_dtype": "float32",
        "transformers_version": "4.42.4", "use_cache": True, "vocab_size": 256000,
    }
    preset = replace(PRESETS["gemma-2-2b"], hf_architecture="Gemma2ForCausalLM")
    assert from_hf_config(gemma2) == preset
    assert from_hf_config(to_hf_config(PRESETS["gemma-2-2b"])) == preset
    new = transformers.Gemma2Config(**{k: v for k, v in gemma2.items() if k != "architectures"}).to_dict()
    assert new["layer_types"][:2] == ["sliding_attention", "full_attention"]  # transformers 5 writes them out
    assert from_hf_config(new | {"architectures": ["Gemma2ForCausalLM"]}) == preset
    # Gemma 2 27B scales by query_pre_attn_scalar = 144; absent keys take Gemma2Config's defaults (50, 30, 256).
    assert from_hf_config(gemma2 | {"query_pre_attn_scalar": 144}).attn_scale_dim == 144
    bare = {k: v for k, v in gemma2.items() if k not in ("attn_logit_softcapping", "final_logit_softcapping",
                                                         "query_pre_attn_scalar")}
    assert from_hf_config(bare) == preset
    assert from_hf_config(gemma2 | {"attn_logit_softcapping": None}).attn_softcap is None
    # Qwen's long-context recipe adds YaRN to the published config; the attention factor is 0.1 ln(factor) + 1.
    yarn = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768}
    long = from_hf_config(qwen3 | {"rope_scaling": yarn})
    assert long.rope_scaling == yarn and rope_attention_factor(long) == pytest.approx(1 + 0.1 * math.log(4))
    assert from_hf_config(qwen3 | {"rope_scaling": {"type": "yarn", "factor": None}}).rope_scaling == {
        "rope_type": "yarn", "factor": 1.0, "original_max_position_embeddings": 40960}  # transformers' defaults
    # OLMo 3 as published (transformers 4.57's spelling: rope_theta, and rope_scaling for the global layers) and as
    # transformers 5 writes it (one RoPE per layer type): one model, its windowed layers at the base, unscaled.
    olmo3 = {"architectures": ["Olmo3ForCausalLM"], "hidden_size": 4096, "intermediate_size": 11008,
             "num_attention_heads": 32, "num_key_value_heads": 32, "num_hidden_layers": 32,
             "max_position_embeddings": 65536, "rms_norm_eps": 1e-06, "rope_theta": 500000, "sliding_window": 4096,
             "rope_scaling": {"attention_factor": 1.2079441541679836, "beta_fast": 32, "beta_slow": 1, "factor": 8.0,
                              "original_max_position_embeddings": 8192, "rope_type": "yarn"},
             "tie_word_embeddings": False, "vocab_size": 100278, "model_type": "olmo3"}
    cfg = from_hf_config(olmo3)
    assert (cfg.sliding_window, cfg.global_every, cfg.rope_local_theta) == (4096, 4, 500000.0)
    assert cfg.rope_scaling["rope_type"] == "yarn" and cfg.window_of(3) is None and cfg.window_of(2) == 4096
    new = transformers.Olmo3Config(**{k: v for k, v in olmo3.items() if k != "architectures"}).to_dict()
    assert from_hf_config(new | {"architectures": ["Olmo3ForCausalLM"]}) == cfg == from_hf_config(to_hf_config(cfg))
    with pytest.raises(ValueError, match="OLMo 3 layer_types .* not supported"):
        from_hf_config(olmo3 | {"layer_types": ["full_attention"] + ["sliding_attention"] * 31})
    with pytest.raises(ValueError, match="Olmo3ForCausalLM cannot express this model: its windowed layers share"):
        to_hf_config(replace(cfg, rope_local_theta=10000.0))
    mixtral = {  # mistralai/Mixtral-8x7B-v0.1
        "architectures": ["MixtralForCausalLM"], "attention_dropout": 0.0, "bos_token_id": 1, "eos_token_id": 2,
        "hidden_act": "silu", "hidden_size": 4096, "initializer_range": 0.02, "intermediate_size": 14336,
        "max_position_embeddings": 32768, "model_type": "mixtral", "num_attention_heads": 32, "num_experts_per_tok": 2,
        "num_hidden_layers": 32, "num_key_value_heads": 8, "num_local_experts": 8, "output_router_logits": False,
        "rms_norm_eps": 1e-05, "rope_theta": 1e6, "router_aux_loss_coef": 0.02, "sliding_window": None,
        "tie_word_embeddings": False, "torch_dtype": "bfloat16", "transformers_version": "4.36.0.dev0",
        "use_cache": True, "vocab_size": 32000,
    }
    qwen3_moe = {  # Qwen/Qwen3-30B-A3B
        "architectures": ["Qwen3MoeForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
        "bos_token_id": 151643, "decoder_sparse_step": 1, "eos_token_id": 151645, "head_dim": 128,
        "hidden_act": "silu", "hidden_size": 2048, "initializer_range": 0.02, "intermediate_size": 6144,
        "max_position_embeddings": 40960, "max_window_layers": 48, "mlp_only_layers": [], "model_type": "qwen3_moe",
        "moe_intermediate_size": 768, "norm_topk_prob": True, "num_attention_heads": 32, "num_experts": 128,
        "num_experts_per_tok": 8, "num_hidden_layers": 48, "num_key_value_heads": 4, "output_router_logits": False,
        "rms_norm_eps": 1e-06, "rope_scaling": None, "rope_theta": 1000000.0, "router_aux_loss_coef": 0.001,
        "sliding_window": None, "tie_word_embeddings": False, "torch_dtype": "bfloat16",
        "transformers_version": "4.51.0", "use_cache": True, "use_sliding_window": False, "vocab_size": 151936,
    }
    gpt_oss = {  # openai/gpt-oss-20b (its experts in MXFP4: `test_gpt_oss_mxfp4_experts_...`)
        "architectures": ["GptOssForCausalLM"], "attention_bias": True, "attention_dropout": 0.0,
        "eos_token_id": 200002, "experts_per_token": 4, "head_dim": 64, "hidden_act": "silu", "hidden_size": 2880,
        "initial_context_length": 4096, "initializer_range": 0.02, "intermediate_size": 2880,
        "layer_types": ["sliding_attention", "full_attention"] * 12, "max_position_embeddings": 131072,
        "model_type": "gpt_oss", "num_attention_heads": 64, "num_experts_per_tok": 4, "num_hidden_layers": 24,
        "num_key_value_heads": 8, "num_local_experts": 32, "output_router_logits": False, "pad_token_id": 199999,
        "quantization_config": {"modules_to_not_convert": ["model.layers.*.self_attn", "model.layers.*.mlp.router",
                                                           "model.embed_tokens", "lm_head"], "quant_method": "mxfp4"},
        "rms_norm_eps": 1e-05, "rope_scaling": {"beta_fast": 32.0, "beta_slow": 1.0, "factor": 32.0,
                                                "original_max_position_embeddings": 4096, "rope_type": "yarn",
                                                "truncate": False},
        "rope_theta": 150000, "router_aux_loss_coef": 0.9, "sliding_window": 128, "swiglu_limit": 7.0,
        "tie_word_embeddings": False, "transformers_version": "4.55.0.dev0", "use_cache": True, "vocab_size": 201088,
    }
    glm45_air = {  # zai-org/GLM-4.5-Air (its multi-token-prediction layer skipped: num_nextn_predict_layers)
        "architectures": ["Glm4MoeForCausalLM"], "attention_bias": True, "attention_dropout": 0.0,
        "pad_token_id": 151329, "eos_token_id": [151329, 151336, 151338], "head_dim": 128, "hidden_act": "silu",
        "hidden_size": 4096, "partial_rotary_factor": 0.5, "initializer_range": 0.02, "intermediate_size": 10944,
        "max_position_embeddings": 131072, "model_type": "glm4_moe", "moe_intermediate_size": 1408, "n_group": 1,
        "n_routed_experts": 128, "n_shared_experts": 1, "norm_topk_prob": True, "num_attention_heads": 96,
        "num_experts_per_tok": 8, "num_hidden_layers": 46, "num_key_value_heads": 8, "num_nextn_predict_layers": 1,
        "rms_norm_eps": 1e-05, "rope_scaling": None, "rope_theta": 1000000, "routed_scaling_factor": 1.0,
        "tie_word_embeddings": False, "topk_group": 1, "torch_dtype": "bfloat16", "transformers_version": "4.54.0",
        "use_cache": True, "use_qk_norm": False, "vocab_size": 151552, "first_k_dense_replace": 1,
    }
    deepseek_v3 = {  # deepseek-ai/DeepSeek-V3
        "architectures": ["DeepseekV3ForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
        "aux_loss_alpha": 0.001, "bos_token_id": 0, "eos_token_id": 1, "ep_size": 1, "first_k_dense_replace": 3,
        "hidden_act": "silu", "hidden_size": 7168, "initializer_range": 0.02, "intermediate_size": 18432,
        "kv_lora_rank": 512, "max_position_embeddings": 163840, "model_type": "deepseek_v3",
        "moe_intermediate_size": 2048, "moe_layer_freq": 1, "n_group": 8, "n_routed_experts": 256,
        "n_shared_experts": 1, "norm_topk_prob": True, "num_attention_heads": 128, "num_experts_per_tok": 8,
        "num_hidden_layers": 61, "num_key_value_heads": 128, "num_nextn_predict_layers": 1, "q_lora_rank": 1536,
        "qk_nope_head_dim": 128, "qk_rope_head_dim": 64, "rms_norm_eps": 1e-06,
        "quantization_config": {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
                                "weight_block_size": [128, 128]},
        "rope_scaling": {"beta_fast": 32, "beta_slow": 1, "factor": 40, "mscale": 1.0, "mscale_all_dim": 1.0,
                         "original_max_position_embeddings": 4096, "type": "yarn"},
        "rope_theta": 10000, "routed_scaling_factor": 2.5, "scoring_func": "sigmoid", "seq_aux": True,
        "tie_word_embeddings": False, "topk_group": 4, "topk_method": "noaux_tc", "torch_dtype": "bfloat16",
        "transformers_version": "4.33.1", "use_cache": True, "v_head_dim": 128, "vocab_size": 129280,
    }
    minimax_m2 = {  # MiniMaxAI/MiniMax-M2's shape, in its published spelling (rotary_dim; keys transformers ignores)
        "architectures": ["MiniMaxM2ForCausalLM"], "model_type": "minimax_m2", "head_dim": 128, "hidden_act": "silu",
        "hidden_size": 3072, "intermediate_size": 1536, "max_position_embeddings": 196608, "num_attention_heads": 48,
        "num_experts_per_tok": 8, "num_hidden_layers": 62, "num_key_value_heads": 8, "num_local_experts": 256,
        "qk_norm_type": "per_layer", "rms_norm_eps": 1e-06, "rope_theta": 5000000, "rotary_dim": 64,
        "scoring_func": "sigmoid", "shared_intermediate_size": 0, "tie_word_embeddings": False, "use_qk_norm": True,
        "use_routing_bias": True, "vocab_size": 200064,
    }
    assert from_hf_config(minimax_m2) == replace(PRESETS["minimax-m2"], hf_architecture="MiniMaxM2ForCausalLM")
    assert from_hf_config(to_hf_config(PRESETS["minimax-m2"])) == replace(PRESETS["minimax-m2"],
                                                                          hf_architecture="MiniMaxM2ForCausalLM")
    glm47_flash = {"architectures": ["Glm4MoeLiteForCausalLM"], "model_type": "glm4_moe_lite", "hidden_size": 64,
                   "num_hidden_layers": 3, "num_attention_heads": 4, "vocab_size": 101, "intermediate_size": 96}
    assert [from_hf_config(glm47_flash | {"mlp_layer_types": kinds}).dense_layers
            for kinds in (None, ["dense", "dense", "sparse"])] == [1, 2]
    deepseek_v2_lite = {  # deepseek-ai/DeepSeek-V2-Lite
        "architectures": ["DeepseekV2ForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
        "aux_loss_alpha": 0.001, "bos_token_id": 100000, "eos_token_id": 100001, "first_k_dense_replace": 1,
        "hidden_act": "silu", "hidden_size": 2048, "initializer_range": 0.02, "intermediate_size": 10944,
        "kv_lora_rank": 512, "max_position_embeddings": 163840, "model_type": "deepseek_v2",
        "moe_intermediate_size": 1408, "moe_layer_freq": 1, "n_group": 1, "n_routed_experts": 64,
        "n_shared_experts": 2, "norm_topk_prob": False, "num_attention_heads": 16, "num_experts_per_tok": 6,
        "num_hidden_layers": 27, "num_key_value_heads": 16, "pretraining_tp": 1, "q_lora_rank": None,
        "qk_nope_head_dim": 128, "qk_rope_head_dim": 64, "rms_norm_eps": 1e-06,
        "rope_scaling": {"beta_fast": 32, "beta_slow": 1, "factor": 40, "mscale": 0.707, "mscale_all_dim": 0.707,
                         "original_max_position_embeddings": 4096, "type": "yarn"},
        "rope_theta": 10000, "routed_scaling_factor": 1.0, "scoring_func": "softmax", "seq_aux": True,
        "tie_word_embeddings": False, "topk_group": 1, "topk_method": "greedy", "torch_dtype": "bfloat16",
        "transformers_version": "4.33.1", "use_cache": True, "v_head_dim": 128, "vocab_size": 102400,
    }
    with pytest.raises(ValueError, match="quantization_config fp8 with fmt='e4m3', weight_block_size=None is not"):
        from_hf_config(deepseek_v3 | {"quantization_config": {"quant_method": "fp8", "fmt": "e4m3"}})
    with pytest.raises(ValueError, match="quantization_config 'gptq' is not supported"):
        from_hf_config(qwen3 | {"quantization_config": {"quant_method": "gptq", "bits": 4}})
    for published, name in ((mixtral, "mixtral-8x7b"), (qwen3_moe, "qwen3-30b-a3b"), (gpt_oss, "gpt-oss-20b"),
                            (glm45_air, "glm-4.5-air"), (deepseek_v3, "deepseek-v3"),
                            (deepseek_v2_lite, "deepseek-v2-lite")):
        preset = replace(PRESETS[name], hf_architecture=published["architectures"][0])
        assert from_hf_config(published) == preset
        assert from_hf_config(to_hf_config(PRESETS[name])) == preset
    for bad, match in [(mixtral | {"router_jitter_noise": 0.1}, "Mixtral router_jitter_noise=0.1 is not supported"),
                       (mixtral | {"num_experts_per_tok": 9}, "num_experts_per_tok=9 must be between 1 and the 8"),
                       (qwen3_moe | {"decoder_sparse_step": 0}, "decoder_sparse_step=0 .* is not supported"),
                       (qwen3_moe | {"mlp_only_layers": [48]}, r"mlp_only_layers=\[48\] is not supported"),
                       (qwen3_moe | {"decoder_sparse_step": 49}, "places experts in no layer"),
                       ({**_SMALL, "architectures": ["Qwen3_5MoeForCausalLM"], "num_experts": 4,
                         "decoder_sparse_step": 2},
                        "Qwen3_5Moe decoder_sparse_step=2 with mlp_only_layers=.. is not supported"),
                       ({**_SMALL, "architectures": ["NanoChatForCausalLM"], "attention_bias": True},
                        "NanoChat attention_bias=true is not supported"),
                       ({**_SMALL, "architectures": ["NanoChatForCausalLM"], "hidden_act": "silu"},
                        "NanoChat hidden_act 'silu' is not supported"),
                       ({**_SMALL, "architectures": ["Ministral3ForCausalLM"], "rope_parameters": {
                           "rope_type": "yarn", "rope_theta": 1e6, "factor": 16.0,
                           "original_max_position_embeddings": 16384}}, "Ministral3 rope_parameters=.* is not supported"),
                       ({**_SMALL, "architectures": ["Ministral3ForCausalLM"], "rope_parameters": {
                           "rope_type": "default", "rope_theta": 1e6, "llama_4_scaling_beta": 0.1}},
                        "Ministral3 rope_parameters=.* is not supported"),
                       ({**_SMALL, "architectures": ["StableLmForCausalLM"], "qk_layernorm": True},
                        "StableLm qk_layernorm=true is not supported"),
                       ({**_SMALL, "architectures": ["PhiForCausalLM"], "qk_layernorm": True},
                        "Phi qk_layernorm=true is not supported"),
                       ({**_SMALL, "architectures": ["Starcoder2ForCausalLM"], "use_bias": False},
                        "Starcoder2 use_bias=false is not supported"),
                       ({**_SMALL, "architectures": ["Starcoder2ForCausalLM"], "hidden_act": "gelu"},
                        "Starcoder2 hidden_act 'gelu' is not supported"),
                       (qwen3_moe | {"num_experts": "128"}, "key 'num_experts' must be an integer"),
                       (glm45_air | {"first_k_dense_replace": 46}, "first_k_dense_replace=46 must leave a layer"),
                       (glm45_air | {"n_group": 3, "topk_group": 2}, "n_group=3 with topk_group=2 is not supported"),
                       (glm45_air | {"n_shared_experts": 0}, "n_shared_experts=0 is not supported"),
                       (glm45_air | {"routed_scaling_factor": "2.5"}, "'routed_scaling_factor' must be a number"),
                       (deepseek_v3 | {"topk_method": "greedy"}, "topk_method='greedy' is not supported"),
                       (deepseek_v3 | {"scoring_func": "softmax"}, "scoring_func='softmax' is not supported"),
                       (deepseek_v3 | {"rope_interleave": False}, "rope_interleave=false is not supported"),
                       (deepseek_v3 | {"num_key_value_heads": 8}, "num_key_value_heads=8 must equal"),
                       (deepseek_v2_lite | {"topk_method": "noaux_tc"}, "topk_method='noaux_tc' is not supported"),
                       (deepseek_v2_lite | {"scoring_func": "sigmoid"}, "scoring_func='sigmoid' is not supported"),
                       (deepseek_v2_lite | {"num_experts_per_tok": None}, "DeepseekV2 needs num_experts_per_tok"),
                       (deepseek_v2_lite | {"topk_method": "group_limited_greedy", "n_group": 3, "topk_group": 2},
                        "n_group=3 with topk_group=2 is not supported"),
                       (minimax_m2 | {"use_routing_bias": False}, "use_routing_bias=False is not supported"),
                       (minimax_m2 | {"shared_intermediate_size": 512}, "shared_intermediate_size=512 is not"),
                       (minimax_m2 | {"qk_norm_type": "per_head"}, "qk_norm_type='per_head' is not supported"),
                       (glm47_flash | {"mlp_layer_types": ["sparse", "dense", "sparse"]},
                        r"Glm4MoeLite mlp_layer_types=\['sparse', 'dense', 'sparse'\] is not supported")]:
        with pytest.raises(ValueError, match=match):
            from_hf_config(bad)
    assert from_hf_config(qwen3_moe | {"decoder_sparse_step": 2, "mlp_only_layers": [47]}).expert_layers == tuple(
        range(1, 47, 2))  # experts in every second layer, the last dense
    assert from_hf_config(gemma3 | {"final_logit_softcapping": 30.0}).logit_softcap == 30.0  # read where set
    for bad, why in [({"layer_types": ["full_attention"] + ["sliding_attention"] * 25}, "Gemma 3 layer_types .* not"),
                     ({"attn_logit_softcapping": -1.0}, "attn_softcap must be positive")]:
        with pytest.raises(ValueError, match=why):
            from_hf_config(gemma3 | bad)
    with pytest.raises(ValueError, match="Gemma 2 layer_types .* not supported"):
        from_hf_config(gemma2 | {"layer_types": ["full_attention", "sliding_attention"] * 13})
    with pytest.raises(ValueError, match="Qwen3MoeForCausalLM cannot express this model: it routes without groups"):
        to_hf_config(replace(PRESETS["qwen3-30b-a3b"], routed_scaling=2.5, hf_architecture="Qwen3MoeForCausalLM"))
    with pytest.raises(ValueError, match="Glm4MoeForCausalLM cannot express this model: it scores experts by sigmoids"):
        to_hf_config(replace(PRESETS["glm-4.5-air"], expert_choice_bias=False))
    with pytest.raises(ValueError, match="LlamaForCausalLM cannot express this model: it caps neither"):
        to_hf_config(replace(PRESETS["debug-llama"], logit_softcap=30.0, hf_architecture="LlamaForCausalLM"))


_PEAK = """
import sys, torch
from temper.model.hf.checkpoint import load_hf
def rss(): return int(open("/proc/self/statm").read().split()[1]) * 4096
dtype = getattr(torch, sys.argv[2])
load_hf(sys.argv[3], dtype=dtype)[0](torch.zeros(1, 2, dtype=torch.long))  # one-time set-up and code pages
base = rss()
model, cfg = load_hf(sys.argv[1], dtype=dtype)
with torch.no_grad():
    for p in model.parameters():  # a memory-mapped weight is resident once it is read
        p.sum()
# VmHWM, not ru_maxrss: the latter keeps the parent's peak across fork + exec.
peak = next(int(line.split()[1]) * 1024 for line in open("/proc/self/status") if line.startswith("VmHWM"))
weights = sum(p.numel() * p.element_size() for p in model.parameters())
print((peak - base) / weights)
"""


@pytest.mark.slow
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])  # mapped as stored; cast on the way
def test_loading_holds_the_weights_once(tmp_path, dtype):
    """Peak memory of load_hf, then reading every weight, over the weights' size, in a fresh
    process (~200 MB of float32 weights)."""
    cfg = replace(PRESETS["debug-llama"], vocab_size=32000, dim=512, n_layers=8, n_heads=8, n_kv_heads=4,
                  ffn_dim=1536, tie_embeddings=False)
    with torch.device("meta"):
        model = Transformer(cfg)
    model.to_empty(device="cpu")
    save_hf(model, cfg, tmp_path / "big")
    del model
    tiny = replace(PRESETS["debug-llama"], vocab_size=300)
    save_hf(Transformer(tiny), tiny, tmp_path / "tiny")
    out = subprocess.run([sys.executable, "-c", _PEAK, str(tmp_path / "big"), dtype, str(tmp_path / "tiny")],
                         capture_output=True, text=True, check=True)
    ratio = float(out.stdout.strip())
    assert ratio < 1.2, f"peak memory of loading is {ratio:.2f}x the weights"
