"""PEFT's adapter format both ways, with PEFT itself as the reference: an adapter saved by temper and
loaded by `PeftModel.from_pretrained` onto temper's Hugging Face export gives temper's logits, and an
adapter made by `get_peft_model(...).save_pretrained` and read by `load_peft` gives PEFT's (fp32,
1e-4), for fifty architectures (fused GPT-2 c_attn and Phi-3 qkv/gate_up, mixtures of experts included), plain
LoRA, rsLoRA and DoRA; bad adapter files fail naming the key. The same both ways for prefix tuning on the
RoPE architectures (GQA, Gemma's head_dim, Qwen3's q/k norms, Phi-3), greedy generation included (equal wherever a
step is not a near-tie: tests/greedy.py); GPT-2's learned positions and sliding windows are
refused, and the test shows why."""

import json
from dataclasses import replace

import pytest
import torch
from safetensors.torch import load_file, save_file

from temper.infer.engine import generate
from temper.model.config import PRESETS
from temper.model.hf.checkpoint import save_hf
from temper.model.hf.peft import (
    load_peft,
    load_peft_prefix,
    peft_lora_refusal,
    peft_prefix_refusal,
    save_peft,
    save_peft_prefix,
)
from temper.model.lora import (
    ALL_LINEAR_TARGETS,
    ATTENTION_TARGETS,
    IN_OUT_PROJ_TARGETS,
    LATENT_ATTENTION_TARGETS,
    LINEAR_ATTENTION_TARGETS,
    LoRALinear,
    apply_lora,
)
from temper.model.prefix import apply_prefix, set_prefix
from temper.model.transformer import Transformer
from tests.greedy import assert_greedy_agrees, next_token_logits

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

_LLAMA = replace(PRESETS["debug-llama"], vocab_size=101, tie_embeddings=False)  # GQA: 4 query, 2 kv heads
_QWEN3_5 = replace(_LLAMA, n_layers=4, qk_norm=True, norm_unit_offset=True, rope_dim=4, attn_output_gate=True,
                   full_attention_every=2, linear_key_heads=2, linear_value_heads=4, linear_key_size=8,
                   linear_value_size=8, hf_architecture="Qwen3_5ForCausalLM")
CONFIGS = {
    "llama": replace(_LLAMA, hf_architecture="LlamaForCausalLM"),
    "qwen2": replace(_LLAMA, qkv_bias=True, hf_architecture="Qwen2ForCausalLM"),  # q/k/v biases
    "qwen3": replace(_LLAMA, qk_norm=True, head_size=24, hf_architecture="Qwen3ForCausalLM"),  # q/k norms, wide heads
    "gemma": replace(_LLAMA, mlp="geglu", norm_unit_offset=True, scale_embeddings=True, tie_embeddings=True,
                     head_size=32, n_kv_heads=1, hf_architecture="GemmaForCausalLM"),  # tied: no head adapter
    "gemma3": replace(_LLAMA, mlp="geglu", norm_unit_offset=True, scale_embeddings=True, tie_embeddings=True,
                      head_size=32, n_kv_heads=1, qk_norm=True, sandwich_norm=True, sliding_window=8, global_every=2,
                      rope_local_theta=100.0, hf_architecture="Gemma3ForCausalLM"),  # a local then a global layer
    "gemma2": replace(_LLAMA, mlp="geglu", norm_unit_offset=True, scale_embeddings=True, tie_embeddings=True,
                      head_size=32, sandwich_norm=True, sliding_window=8, global_every=2, attn_softcap=5.0,
                      logit_softcap=3.0, hf_architecture="Gemma2ForCausalLM"),  # capped scores and logits
    # Gemma 4: a windowed layer, then a global one with wider heads, one kv head, values from k_proj (no v_proj)
    "gemma4": replace(_LLAMA, mlp="geglu", norm_cast_after=True, scale_embeddings=True, tie_embeddings=True,
                      head_size=16, qk_norm=True, sandwich_norm=True, sliding_window=8, global_every=2,
                      rope_local_theta=100.0, rope_scaling={"rope_type": "proportional", "partial_rotary_factor": 0.25},
                      global_head_size=32, global_kv_heads=1, global_values_are_keys=True, value_norm=True,
                      layer_scalar=True, attn_scale_dim=1, hf_architecture="Gemma4ForCausalLM"),
    # Gemma 4 E2B's layers: per-layer embeddings; the last two take the keys and values of the first two (no k_proj)
    "gemma4_e2b": replace(_LLAMA, n_layers=4, mlp="geglu", norm_cast_after=True, scale_embeddings=True,
                          tie_embeddings=True, head_size=16, qk_norm=True, sandwich_norm=True, sliding_window=8,
                          global_every=2, rope_local_theta=100.0, global_head_size=32, value_norm=True,
                          layer_scalar=True, attn_scale_dim=1, kv_shared_layers=2, kv_shared_wide_mlp=True,
                          per_layer_input_size=8, hf_architecture="Gemma4ForCausalLM"),
    # Gemma 4 26B-A4B's layers: its dense MLP (as a shared expert) beside 4 experts, each normalised apart
    "gemma4_moe": replace(_LLAMA, mlp="geglu", norm_cast_after=True, scale_embeddings=True, tie_embeddings=True,
                          head_size=16, qk_norm=True, sandwich_norm=True, sliding_window=8, global_every=2,
                          rope_local_theta=100.0, global_head_size=32, value_norm=True, layer_scalar=True,
                          attn_scale_dim=1, n_experts=4, expert_ffn_dim=40, shared_expert_ffn_dim=96,
                          experts_own_norms=True, router_input_norm=True, expert_weights_float32=True,
                          hf_architecture="Gemma4ForCausalLM"),
    # ERNIE 4.5: biases everywhere, q and k rows in RoPE's adjacent pairs (an adapter's B rows move alike)
    "ernie4_5": replace(_LLAMA, bias=True, rope_float32=True, hf_architecture="Ernie4_5ForCausalLM"),
    # its mixture: a float32 softmax router choosing with a bias, beside a shared expert, after a dense layer
    "ernie4_5_moe": replace(_LLAMA, n_layers=3, rope_float32=True, n_experts=4, expert_ffn_dim=40,
                            shared_expert_ffn_dim=80, router_float32=True, expert_choice_bias=True, dense_layers=1,
                            hf_architecture="Ernie4_5_MoeForCausalLM"),
    # Hunyuan: q/k norms after RoPE; its mixture: experts of the MLP's width beside a shared one, a float32 router
    "hunyuan": replace(_LLAMA, qk_norm=True, qk_norm_after_rope=True, hf_architecture="HunYuanDenseV1ForCausalLM"),
    "hunyuan_moe": replace(_LLAMA, qk_norm=True, qk_norm_after_rope=True, n_experts=4, shared_expert_ffn_dim=192,
                           router_float32=True, expert_weights_float32=True, hf_architecture="HunYuanMoEV1ForCausalLM"),
    # Cohere2: attention beside the MLP on one LayerNorm, q and k rows in RoPE's adjacent pairs, a windowed layer with
    # RoPE then a global one without, scaled logits
    "cohere2": replace(_LLAMA, norm="layernorm", bias=False, parallel_block=True, rope_float32=True,
                       rope_tables_rounded=True, sliding_window=8, global_every=2, nope_every=2, logit_divisor=4.0,
                       hf_architecture="Cohere2ForCausalLM"),
    # LFM2: a short convolution (in_proj, out_proj: adapted as linear attention's) then an attention layer, q/k norms
    "lfm2": replace(_LLAMA, qk_norm=True, attention_layers=(1,), linear_layer="short_conv", linear_conv_size=3,
                    hf_architecture="Lfm2ForCausalLM"),
    # LFM2-MoE: those layers with 4 experts after a dense layer, chosen by sigmoid scores plus a bias, scaled
    "lfm2_moe": replace(_LLAMA, n_layers=3, qk_norm=True, attention_layers=(1,), linear_layer="short_conv", linear_conv_size=3,
                        n_experts=4, expert_ffn_dim=40, router_scores="sigmoid", router_float32=True,
                        expert_choice_bias=True, routed_scaling=2.0, dense_layers=1,
                        hf_architecture="Lfm2MoeForCausalLM"),
    # Granite 4.0-H: a Mamba 2 layer (in_proj, out_proj) then an attention layer, the shared MLP's gate and up fused;
    # and its mixture: 4 experts beside that MLP, no positions, Granite's multipliers
    "granite4": replace(_LLAMA, attention_layers=(1,), linear_layer="mamba2", linear_key_heads=1, linear_value_heads=4,
                        linear_key_size=8, linear_value_size=32, embed_multiplier=4.0, residual_multiplier=0.5,
                        logit_divisor=2.0, attn_scale_dim=1024, hf_architecture="GraniteMoeHybridForCausalLM"),
    "granite4_moe": replace(_LLAMA, attention_layers=(1,), linear_layer="mamba2", linear_key_heads=2,
                            linear_value_heads=8, linear_key_size=8, linear_value_size=16, nope_every=1, n_experts=4,
                            expert_ffn_dim=40, shared_expert_ffn_dim=48, hf_architecture="GraniteMoeHybridForCausalLM"),
    # Granite MoE SWA: a sink per head, the first of two layers global, 4 experts beside a shared MLP
    "granitemoe_swa": replace(_LLAMA, attn_sinks=True, sliding_window=8, global_every=2, global_first=True,
                              n_experts=4, expert_ffn_dim=40, shared_expert_ffn_dim=48, renormalize_experts=True,
                              residual_multiplier=0.5, hf_architecture="GraniteMoeSWAForCausalLM"),
    # Bamba: a Mamba 2 layer then an attention layer turning half of each head, SwiGLU MLPs named feed_forward
    "bamba": replace(_LLAMA, attention_layers=(1,), linear_layer="mamba2", linear_key_heads=2, linear_value_heads=4,
                     linear_key_size=8, linear_value_size=16, rope_dim=8, hf_architecture="BambaForCausalLM"),
    # Nemotron 3: Mamba 2 and attention layers each followed by a mixture of 4 squared-ReLU experts (DeepSeek-V3's
    # routing) beside a shared one
    "nemotron_h_moe": replace(_LLAMA, attention_layers=(1,), linear_layer="mamba2", linear_key_heads=2,
                              linear_value_heads=4, linear_key_size=8, linear_value_size=16, mlp="relu2",
                              norm_cast_after=True, nope_every=1, n_experts=4, expert_ffn_dim=40,
                              shared_expert_ffn_dim=56, router_scores="sigmoid", router_float32=True,
                              expert_choice_bias=True, expert_groups=2, routed_scaling=2.5,
                              hf_architecture="NemotronHForCausalLM"),
    # Mamba2ForCausalLM: Mamba 2 mixers alone (PEFT refuses out_proj adapters on it, as on Nemotron-H)
    "mamba2": replace(_LLAMA, attention_layers=(), no_mlp_layers=(0, 1), linear_layer="mamba2", linear_key_heads=2,
                      linear_value_heads=4, linear_key_size=8, linear_value_size=32, hf_architecture="Mamba2ForCausalLM"),
    # MambaForCausalLM and FalconMambaForCausalLM: Mamba mixers alone (PEFT refuses their out_proj too)
    "mamba": replace(_LLAMA, attention_layers=(), no_mlp_layers=(0, 1), linear_layer="mamba", linear_key_heads=1,
                     linear_value_heads=128, linear_key_size=8, linear_value_size=1, linear_dt_rank=4,
                     hf_architecture="MambaForCausalLM"),
    "falcon_mamba": replace(_LLAMA, attention_layers=(), no_mlp_layers=(0, 1), linear_layer="mamba",
                            linear_key_heads=1, linear_value_heads=128, linear_key_size=8, linear_value_size=1,
                            linear_dt_rank=4, linear_bcdt_eps=1e-6, hf_architecture="FalconMambaForCausalLM"),
    # Jamba: a Mamba layer (its step, B and C norms with weights) then attention without positions; and with a mixture
    # of 4 experts after the attention layer (the router a parameter, adapted as Granite's). PEFT takes its out_proj.
    "jamba": replace(_LLAMA, attention_layers=(1,), linear_layer="mamba", linear_key_heads=1, linear_value_heads=128,
                     linear_key_size=8, linear_value_size=1, linear_dt_rank=4, linear_bcdt_eps=1e-5,
                     linear_bcdt_weights=True, nope_every=1, hf_architecture="JambaForCausalLM"),
    "jamba_moe": replace(_LLAMA, attention_layers=(1,), linear_layer="mamba", linear_key_heads=1,
                         linear_value_heads=128, linear_key_size=8, linear_value_size=1, linear_dt_rank=4,
                         linear_bcdt_eps=1e-5, linear_bcdt_weights=True, nope_every=1, n_experts=4,
                         renormalize_experts=False, expert_layers=(1,), hf_architecture="JambaForCausalLM"),
    # GPT-J: attention without biases (out_proj), the MLP (fc_in, fc_out) and the head with them, pairs rotated
    "gptj": replace(_LLAMA, n_kv_heads=None, norm="layernorm", mlp="gelu", bias=True, attn_bias=False, head_bias=True,
                    parallel_block=True, rope_dim=8, hf_architecture="GPTJForCausalLM"),
    # Helium: Llama with q/k/v biases, RoPE in adjacent pairs (adapters' rows too); Jais 2: LayerNorms, relu2, biases
    "helium": replace(_LLAMA, qkv_bias=True, norm_cast_after=True, hf_architecture="HeliumForCausalLM"),
    "jais2": replace(_LLAMA, norm="layernorm", mlp="relu2", bias=True, hf_architecture="Jais2ForCausalLM"),
    # Granite SWA: a sink per head, the first layer of two global, the other windowed, Granite's multipliers
    "granite_swa": replace(_LLAMA, attn_sinks=True, sliding_window=8, global_every=2, global_first=True,
                           embed_multiplier=2.0, residual_multiplier=0.5, hf_architecture="GraniteSWAForCausalLM"),
    # HyperCLOVA X: Granite's multipliers, norms on the sublayers' outputs too
    "hyperclovax": replace(_LLAMA, sandwich_norm=True, residual_multiplier=0.5, logit_divisor=4.0,
                           hf_architecture="HyperCLOVAXForCausalLM"),
    # Nemotron-4 / Minitron: LayerNorm1P, a squared-ReLU MLP, half of each head rotated
    "nemotron": replace(_LLAMA, norm="layernorm", norm_unit_offset=True, norm_bias=True, mlp="relu2", rope_dim=8,
                        hf_architecture="NemotronForCausalLM"),
    # DBRX: q, k and v fused (Wqkv) and clamped, experts stacked in three tensors
    "dbrx": replace(_LLAMA, norm="layernorm", bias=False, n_experts=4, experts_per_token=2, expert_ffn_dim=40,
                    ffn_dim=40, renormalize_experts=True, qkv_clip=0.5, hf_architecture="DbrxForCausalLM"),
    # Apertus: per-head q/k norms, attention biases, an MLP of xIELU (its scalars trained apart from the adapters)
    "apertus": replace(_LLAMA, mlp="xielu", qk_norm=True, attn_bias=True, hf_architecture="ApertusForCausalLM"),
    # Falcon-40B's layout: q, k and v fused kv group by kv group (adapters' rows too), attention beside the MLP on two
    # LayerNorms with biases, linear layers without
    "falcon": replace(_LLAMA, norm="layernorm", norm_bias=True, mlp="gelu", gelu_exact=True, parallel_block=True,
                      parallel_mlp_norm=True, hf_architecture="FalconForCausalLM"),
    # Llama 4: a chunked layer (weightless q/k norms) then one without positions (its queries' temperature), experts
    # weighing their inputs beside a shared one, stacked (in, out): adapters of attention and the head go to PEFT
    "llama4": replace(_LLAMA, rope_float32=True, sliding_window=5, window_chunked=True, global_every=2, nope_every=2,
                      qk_l2_norm=True, nope_query_scale=0.5, nope_query_floor=3, n_experts=4, experts_per_token=2, expert_ffn_dim=40,
                      shared_expert_ffn_dim=40, router_scores="sigmoid", router_rounded=True, renormalize_experts=False,
                      expert_input_weights=True, hf_architecture="Llama4ForCausalLM"),
    # Nemotron-H: a Mamba 2 layer with its squared-ReLU MLP, then attention alone (no MLP), one sublayer per HF layer
    "nemotron_h": replace(_LLAMA, attention_layers=(1,), linear_layer="mamba2", linear_key_heads=2, linear_value_heads=4,
                          linear_key_size=8, linear_value_size=16, mlp="relu2", norm_cast_after=True, nope_every=1,
                          no_mlp_layers=(1,), hf_architecture="NemotronHForCausalLM"),
    "mistral": replace(_LLAMA, sliding_window=8, hf_architecture="MistralForCausalLM"),
    # GPT-NeoX (Pythia): q, k and v fused head by head (an adapter's B rows move alike), attention beside the MLP on
    # two norms, exact GELU, a quarter of each head rotated; its untied head named embed_out
    "gpt_neox": replace(_LLAMA, n_kv_heads=None, norm="layernorm", mlp="gelu", gelu_exact=True, bias=True, rope_dim=4,
                        parallel_block=True, parallel_mlp_norm=True, hf_architecture="GPTNeoXForCausalLM"),
    "arcee": replace(_LLAMA, mlp="relu2", hf_architecture="ArceeForCausalLM"),  # a squared-ReLU MLP, not gated
    # Ministral 3: Mistral with YaRN and the queries' temperature past an original length shorter than the inputs
    "ministral3": replace(_LLAMA, sliding_window=8, query_scale_beta=0.5, rope_scaling={
        "rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16},
        hf_architecture="Ministral3ForCausalLM"),
    # StableLM 2: biased LayerNorms beside unbiased linear layers but q, k and v, a quarter of each head rotated
    "stablelm": replace(_LLAMA, norm="layernorm", norm_bias=True, qkv_bias=True, rope_dim=4,
                        hf_architecture="StableLmForCausalLM"),
    # OLMo (1): LayerNorms without weights or biases, q, k and v clamped
    "olmo": replace(_LLAMA, norm="layernorm", norm_weightless=True, qkv_clip=0.3, hf_architecture="OlmoForCausalLM"),
    # Phi-2: attention beside the MLP (fc1, fc2) on one LayerNorm, biases everywhere (the head's too: LoRA beside it)
    "phi": replace(_LLAMA, norm="layernorm", mlp="gelu", bias=True, parallel_block=True, head_bias=True, rope_dim=8,
                   hf_architecture="PhiForCausalLM"),
    # nanochat: weightless norms (one on the embeddings), q/k norms after its reversed RoPE, capped logits
    "nanochat": replace(_LLAMA, mlp="relu2", norm_weightless=True, embed_norm=True, rope_reversed=True, qk_norm=True,
                        qk_norm_after_rope=True, logit_softcap=15.0, hf_architecture="NanoChatForCausalLM"),
    # StarCoder2: GPT-2's LayerNorms and MLP (c_fc, c_proj) with biases, RoPE, GQA, a sliding window
    "starcoder2": replace(_LLAMA, norm="layernorm", mlp="gelu", bias=True, sliding_window=8,
                          hf_architecture="Starcoder2ForCausalLM"),
    "phi3": replace(_LLAMA, sliding_window=8, hf_architecture="Phi3ForCausalLM"),  # fused qkv_proj, gate_up_proj
    "olmo2": replace(_LLAMA, pre_norm=False, sandwich_norm=True, qk_norm=True, qk_norm_whole=True,
                     hf_architecture="Olmo2ForCausalLM"),  # post-norms only, q/k norms over all heads
    "olmo3": replace(_LLAMA, pre_norm=False, sandwich_norm=True, qk_norm=True, qk_norm_whole=True, sliding_window=8,
                     global_every=2, rope_local_theta=10000.0, rope_scaling={
                         "rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 8},
                     hf_architecture="Olmo3ForCausalLM"),  # a windowed layer, then a global one under YaRN
    "gpt2": replace(PRESETS["debug"], vocab_size=97, tie_embeddings=False, hf_architecture="GPT2LMHeadModel"),
    # GPTBigCode (StarCoder): GPT-2's blocks in nn.Linear layers, one kv head fused beside the queries
    "gpt_bigcode": replace(PRESETS["debug"], vocab_size=97, n_kv_heads=1, hf_architecture="GPTBigCodeForCausalLM"),
    # Mixtures of experts: attention and head adapters here, experts' below (test_expert_adapters_...).
    "mixtral": replace(_LLAMA, n_experts=4, sliding_window=8, hf_architecture="MixtralForCausalLM"),
    "smollm3": replace(_LLAMA, nope_every=2, hf_architecture="SmolLM3ForCausalLM"),  # layer 1 of 2 without RoPE
    "glm4": replace(_LLAMA, qkv_bias=True, rope_dim=8, sandwich_norm=True, hf_architecture="Glm4ForCausalLM"),
    "glm": replace(_LLAMA, qkv_bias=True, rope_dim=8, hf_architecture="GlmForCausalLM"),  # GLM-4-9B
    "granite": replace(_LLAMA, embed_multiplier=4.0, residual_multiplier=0.5, logit_divisor=2.0, attn_scale_dim=1024,
                       hf_architecture="GraniteForCausalLM"),
    "phi4mini-longrope": replace(_LLAMA, rope_dim=8, hf_architecture="Phi3ForCausalLM", rope_scaling={
        "rope_type": "longrope", "short_factor": [1.0, 1.3, 2.1, 3.7], "long_factor": [1.5, 4.0, 9.0, 20.0],
        "factor": 8.0, "original_max_position_embeddings": 16}),
    "qwen3_moe": replace(_LLAMA, n_experts=4, qk_norm=True, expert_ffn_dim=40, renormalize_experts=False,
                         hf_architecture="Qwen3MoeForCausalLM"),
    "qwen2_moe": replace(_LLAMA, n_experts=4, qkv_bias=True, renormalize_experts=False, shared_expert_ffn_dim=48,
                         shared_expert_gate=True, hf_architecture="Qwen2MoeForCausalLM"),  # a gated shared expert
    "olmoe": replace(_LLAMA, n_experts=4, qk_norm=True, qk_norm_whole=True, renormalize_experts=False,
                     hf_architecture="OlmoeForCausalLM"),  # q/k norms over all heads
    # GLM-4.5: a dense layer, then one of 4 sigmoid-scored experts in 2 groups beside a shared one; half of each head
    # rotated, q/k/v biases
    "glm4_moe": replace(_LLAMA, n_experts=4, qkv_bias=True, rope_dim=8, expert_ffn_dim=40, shared_expert_ffn_dim=40,
                        router_scores="sigmoid", expert_choice_bias=True, expert_groups=2, routed_scaling=2.5,
                        dense_layers=1, expert_weights_float32=True, hf_architecture="Glm4MoeForCausalLM"),
    # DeepSeek-V3: latent attention (its rotated rows in adjacent pairs in the checkpoint) and GLM-4.5's routing
    "deepseek_v3": replace(_LLAMA, n_kv_heads=None, head_size=24, rope_dim=8, kv_lora_rank=16, q_lora_rank=24,
                           v_head_size=12, n_experts=4, expert_ffn_dim=40, shared_expert_ffn_dim=40,
                           router_scores="sigmoid", expert_choice_bias=True, expert_groups=2, routed_scaling=2.5,
                           dense_layers=1, expert_weights_float32=True, hf_architecture="DeepseekV3ForCausalLM"),
    # dots.llm1: GLM-4.5's routing behind Qwen3's per-head q/k norms; Youtu-LLM: latent attention beside dense MLPs;
    # FlexOlmo: OLMo 2's post-norm blocks with OLMoE's experts
    # Solar Open: Llama's attention with q/k/v biases, GLM-4.5's routing in every layer
    "solar_open": replace(_LLAMA, n_experts=4, qkv_bias=True, expert_ffn_dim=40, shared_expert_ffn_dim=40,
                          router_scores="sigmoid", expert_choice_bias=True, expert_groups=2, routed_scaling=2.5,
                          expert_weights_float32=True, hf_architecture="SolarOpenForCausalLM"),
    "dots1": replace(_LLAMA, n_experts=4, qk_norm=True, expert_ffn_dim=40, shared_expert_ffn_dim=40,
                     router_scores="sigmoid", expert_choice_bias=True, expert_groups=2, routed_scaling=2.5,
                     dense_layers=1, expert_weights_float32=True, hf_architecture="Dots1ForCausalLM"),
    "youtu": replace(_LLAMA, n_kv_heads=None, head_size=24, rope_dim=8, kv_lora_rank=16, q_lora_rank=24,
                     v_head_size=12, hf_architecture="YoutuForCausalLM"),
    "flex_olmo": replace(_LLAMA, n_experts=4, sandwich_norm=True, pre_norm=False, qk_norm=True, qk_norm_whole=True,
                         norm_cast_after=True, rope_float32=True, renormalize_experts=False,
                         hf_architecture="FlexOlmoForCausalLM"),
    # GLM-4.7-Flash: DeepSeek-V3's architecture under another name, its dense layers named by mlp_layer_types
    "glm4_moe_lite": replace(_LLAMA, n_kv_heads=None, head_size=24, rope_dim=8, kv_lora_rank=16, q_lora_rank=24,
                             v_head_size=12, n_experts=4, expert_ffn_dim=40, shared_expert_ffn_dim=40,
                             router_scores="sigmoid", expert_choice_bias=True, expert_groups=2, routed_scaling=1.8,
                             dense_layers=1, expert_weights_float32=True, hf_architecture="Glm4MoeLiteForCausalLM"),
    # DeepSeek-V2: that attention, with a float32 softmax router choosing 2 of 4 experts in the best of 2 groups
    "deepseek_v2": replace(_LLAMA, n_kv_heads=None, head_size=24, rope_dim=8, kv_lora_rank=16, q_lora_rank=None,
                           v_head_size=12, n_experts=4, expert_ffn_dim=40, shared_expert_ffn_dim=80,
                           renormalize_experts=False, router_float32=True, expert_groups=2, expert_group_best=1,
                           routed_scaling=2.0, dense_layers=1, expert_weights_float32=True, rope_float32=True,
                           hf_architecture="DeepseekV2ForCausalLM"),
    # MiniMax-M2: Mixtral's experts chosen by sigmoid scores plus a bias, q/k norms over all heads, partial RoPE
    "minimax_m2": replace(_LLAMA, n_experts=4, qk_norm=True, qk_norm_whole=True, rope_dim=8, router_scores="sigmoid",
                          expert_choice_bias=True, expert_weights_float32=True, hf_architecture="MiniMaxM2ForCausalLM"),
    "gpt_oss": replace(_LLAMA, n_experts=4, bias=True, attn_sinks=True, swiglu_limit=7.0, norm_cast_after=True,
                       sliding_window=8, global_every=2, hf_architecture="GptOssForCausalLM"),  # attention adapters
    # Qwen3.5: Gated DeltaNet layers (2 key heads, 4 value heads) then gated attention (a quarter of each head rotated)
    "qwen3_5": _QWEN3_5,
    "qwen3_5_moe": replace(_QWEN3_5, n_experts=4, expert_ffn_dim=40, shared_expert_ffn_dim=48, shared_expert_gate=True,
                           hf_architecture="Qwen3_5MoeForCausalLM"),  # and a gated shared expert beside 4
    # Qwen3-Next: in_proj_qkvz and in_proj_ba fused, their rows grouped by key head (an adapter's B rows move alike)
    "qwen3_next": replace(_QWEN3_5, n_experts=4, expert_ffn_dim=40, shared_expert_ffn_dim=48, shared_expert_gate=True,
                          hf_architecture="Qwen3NextForCausalLM"),
}
HF_TARGETS = {  # PEFT's target_modules for every linear layer of each architecture (a mixture's: outside experts)
    "gpt2": ["c_attn", "c_proj", "c_fc"],
    "gpt_bigcode": ["c_attn", "c_proj", "c_fc"],
    "starcoder2": ["q_proj", "k_proj", "v_proj", "o_proj", "c_fc", "c_proj"],
    "arcee": ["q_proj", "k_proj", "v_proj", "o_proj", "up_proj", "down_proj"],
    "nanochat": ["q_proj", "k_proj", "v_proj", "o_proj", "fc1", "fc2"],
    "phi": ["q_proj", "k_proj", "v_proj", "dense", "fc1", "fc2"],
    "gpt_neox": ["query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"],
    "falcon": ["query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"],
    "gptj": ["q_proj", "k_proj", "v_proj", "out_proj", "fc_in", "fc_out"],
    "helium": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    "jais2": ["q_proj", "k_proj", "v_proj", "o_proj", "up_proj", "down_proj"],
    "phi3": ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"],
    "lfm2": ["q_proj", "k_proj", "v_proj", "out_proj", "in_proj", "w1", "w3", "w2"],  # out_proj: attention's and conv's
    "lfm2_moe": ["q_proj", "k_proj", "v_proj", "out_proj", "in_proj"],
    "granite4": ["q_proj", "k_proj", "v_proj", "o_proj", "in_proj", "out_proj", "input_linear", "output_linear"],
    "granite4_moe": ["q_proj", "k_proj", "v_proj", "o_proj", "in_proj", "out_proj"],
    "granitemoe_swa": ["q_proj", "k_proj", "v_proj", "o_proj"],
    "nemotron_h": ["q_proj", "k_proj", "v_proj", "o_proj", "in_proj", "up_proj", "down_proj"],
    "bamba": ["q_proj", "k_proj", "v_proj", "o_proj", "in_proj", "out_proj", "gate_proj", "up_proj", "down_proj"],
    "mamba2": ["in_proj"],
    "mamba": ["in_proj", "x_proj"], "falcon_mamba": ["in_proj", "x_proj"],
    "jamba": ["q_proj", "k_proj", "v_proj", "o_proj", "in_proj", "x_proj", "out_proj", "gate_proj", "up_proj",
              "down_proj"],
    "jamba_moe": ["q_proj", "k_proj", "v_proj", "o_proj", "in_proj", "x_proj", "out_proj"],
    "nemotron_h_moe": ["q_proj", "k_proj", "v_proj", "o_proj", "in_proj"],
    "phi4mini-longrope": ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"],
    "glm4": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_up_proj", "down_proj"],
    "glm": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_up_proj", "down_proj"],
    "mixtral": ["q_proj", "k_proj", "v_proj", "o_proj"],
    "qwen3_moe": ["q_proj", "k_proj", "v_proj", "o_proj"],
    "qwen2_moe": ["q_proj", "k_proj", "v_proj", "o_proj"],
    "olmoe": ["q_proj", "k_proj", "v_proj", "o_proj"],
    "glm4_moe": ["q_proj", "k_proj", "v_proj", "o_proj"],
    "deepseek_v3": ["q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj"],
    "deepseek_v2": ["q_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj"],
    "glm4_moe_lite": ["q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj"],
    "minimax_m2": ["q_proj", "k_proj", "v_proj", "o_proj"],
    "gemma4_moe": ["q_proj", "k_proj", "v_proj", "o_proj"],
    "ernie4_5_moe": ["q_proj", "k_proj", "v_proj", "o_proj"],
    "hunyuan_moe": ["q_proj", "k_proj", "v_proj", "o_proj"],
    "gpt_oss": ["q_proj", "k_proj", "v_proj", "o_proj"],
    "dots1": ["q_proj", "k_proj", "v_proj", "o_proj"],
    "solar_open": ["q_proj", "k_proj", "v_proj", "o_proj"],
    "dbrx": ["Wqkv", "out_proj"],
    "youtu": ["q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj"],
    "flex_olmo": ["q_proj", "k_proj", "v_proj", "o_proj"],
    "llama4": ["q_proj", "k_proj", "v_proj", "o_proj"],
    "qwen3_5": [*ATTENTION_TARGETS, *LINEAR_ATTENTION_TARGETS, "gate_proj", "up_proj", "down_proj"],
    "qwen3_5_moe": [*ATTENTION_TARGETS, *LINEAR_ATTENTION_TARGETS],
    "qwen3_next": [*ATTENTION_TARGETS, "in_proj_qkvz", "in_proj_ba", "out_proj"],
}
VARIANTS = {"plain": {}, "rslora": {"rslora": True}, "dora": {"dora": True}}
# Prefix tuning: the RoPE architectures without a sliding window match PEFT; the others are refused.
PREFIX_CASES = {"llama": CONFIGS["llama"], "qwen2": CONFIGS["qwen2"], "qwen3": CONFIGS["qwen3"], "gemma": CONFIGS["gemma"],
                "phi3-no-window": replace(CONFIGS["phi3"], sliding_window=None),
                "phi4mini-partial-no-window": replace(CONFIGS["phi3"], sliding_window=None, rope_dim=8),  # 8 of 16 rotate
                "smollm3": CONFIGS["smollm3"],  # its NoPE layers' prefix keys are not rotated
                "glm4": CONFIGS["glm4"],  # its prefix keys' rotated dims in adjacent pairs
                "cohere": replace(CONFIGS["cohere2"], sliding_window=None, global_every=None, nope_every=None,
                                  hf_architecture="CohereForCausalLM")}  # beside the MLP, in adjacent pairs


def _model(case: str) -> Transformer:
    torch.manual_seed(0)
    model = Transformer((CONFIGS | PREFIX_CASES)[case]).eval()
    with torch.no_grad():  # large random weights everywhere, so no mismatch hides behind init
        for p in model.parameters():
            p.normal_(0.0, 0.2)
    return model


def _hf(model: Transformer, tmp_path):
    """The transformers model of temper's export of `model` (before any adapter)."""
    return transformers.AutoModelForCausalLM.from_pretrained(save_hf(model, model.cfg, tmp_path / "base")).eval()


def _targets(case: str) -> tuple[str, ...]:
    linears = tuple(t for t in ALL_LINEAR_TARGETS if CONFIGS[case].mlp != "gelu" or t != "gate_proj")  # not gated
    linears = ATTENTION_TARGETS if CONFIGS[case].n_experts else linears
    if CONFIGS[case].kv_lora_rank:  # latent attention's projections (one q_proj without a query latent)
        latent = LATENT_ATTENTION_TARGETS if CONFIGS[case].q_lora_rank else ("q_proj", *LATENT_ATTENTION_TARGETS[2:])
        linears = (*latent, "o_proj")
    if CONFIGS[case].attention_layers == ():  # Mamba 2 mixers alone: no attention, no MLP
        linears = ()
    if CONFIGS[case].has_linear_layers:  # the linear layers' too (not a Mamba out_proj of Nemotron-H or Mamba 2: PEFT
        # refuses it)
        linears = (*linears, *(LINEAR_ATTENTION_TARGETS if CONFIGS[case].linear_layer == "gated_deltanet"
                               else ("in_proj",) if case in ("nemotron_h", "nemotron_h_moe", "mamba2")
                               else ("in_proj", "x_proj", "out_proj") if case.startswith("jamba")
                               else ("in_proj", "x_proj") if CONFIGS[case].linear_layer == "mamba"
                               else IN_OUT_PROJ_TARGETS))
    if CONFIGS[case].mlp in ("relu2", "xielu"):  # not gated
        linears = tuple(t for t in linears if t != "gate_proj")
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
    # q, k, v stacked in one adapter of rank 3 * 4 (GLM-4: gate and up, 2 * 4)
    fused = {"gpt2": 12, "gpt_bigcode": 12, "gpt_neox": 12, "falcon": 12, "phi3": 12, "phi4mini-longrope": 12,
             "dbrx": 12, "glm4": 8, "glm": 8, "qwen3_next": 8, "granite4": 8}  # Granite: shared_mlp.input_linear
    assert config["r"] == fused.get(case, 4) and config["use_dora"] == (variant == "dora")
    # Gemma 4's small logits (norms on every sublayer's output and on the values) move less: 0.085 here
    _assert_peft_and_temper_read(model, hf, out, case, matters=0.05 if case.startswith("gemma4") else 0.1)


def _assert_peft_and_temper_read(model: Transformer, hf, out, case: str, matters: float) -> None:
    """PEFT loads temper's adapter directory `out` onto `hf` with `model`'s logits (and without it, logits at least
    `matters` away), and temper reads its own file back."""
    theirs = peft.PeftModel.from_pretrained(hf, out).eval()
    x = _x(model)
    with torch.no_grad():
        ours = model(x)
        torch.testing.assert_close(theirs(x).logits, ours, rtol=0, atol=1e-4)
        with theirs.disable_adapter():
            assert (ours - theirs(x).logits).abs().max() > matters  # ... and the adapter matters
        back = _model(case)
        load_peft(back, back.cfg, out)
        # To a rounding, as PEFT's: each part of a fused layer reads back the fused adapter (rank 2r, B zero in the
        # other part's columns), the same sums in another order (1.7e-5 apart under AVX2 kernels for Qwen3-Next's)
        torch.testing.assert_close(back(x), ours, rtol=0, atol=1e-4)


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
    layers = {n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n.split(".")[-1] in _targets(case)}
    swapped = load_peft(model, model.cfg, tmp_path / "adapter")
    assert set(swapped) == layers  # every targeted layer, the head once
    assert all(isinstance(model.get_submodule(n), LoRALinear) for n in swapped)
    x = _x(model)
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(x), theirs.eval()(x).logits, rtol=0, atol=1e-4)


MOE_TARGETS = {  # temper's targets -> PEFT's target_modules for the same layers (transformers 5 names)
    "minimax_m2": ["q_proj", "w1", "w2", "w3"],
    "mixtral": ["q_proj", "w1", "w2", "w3"],
    "qwen3_moe": ["q_proj", "gate_proj", "up_proj", "down_proj"],
    "qwen2_moe": ["q_proj", "gate_proj", "up_proj", "down_proj"],  # the shared expert's too
    "olmoe": ["q_proj", "gate_proj", "up_proj", "down_proj"],
    "glm4_moe": ["q_proj", "gate_proj", "up_proj", "down_proj"],  # the dense layer's and shared expert's too
    "deepseek_v3": ["q_b_proj", "gate_proj", "up_proj", "down_proj"],
    "deepseek_v2": ["q_proj", "gate_proj", "up_proj", "down_proj"],
    "glm4_moe_lite": ["q_b_proj", "gate_proj", "up_proj", "down_proj"],
    "ernie4_5_moe": ["q_proj", "gate_proj", "up_proj", "down_proj"],
    "hunyuan_moe": ["q_proj", "gate_proj", "up_proj", "down_proj"],
}


@pytest.mark.parametrize("targets", [("q_proj", "gate_proj", "up_proj", "down_proj", "router"), ("down_proj",),
                                     ("up_proj",)])  # up alone: gate_up_proj's gate rows stay zero
@pytest.mark.parametrize("case", ["mixtral", "qwen3_moe", "qwen2_moe", "glm4_moe", "deepseek_v3", "deepseek_v2",
                                  "glm4_moe_lite", "minimax_m2", "qwen3_5_moe", "ernie4_5_moe", "hunyuan_moe",
                                  "lfm2_moe", "granite4_moe", "jamba_moe"])
def test_expert_adapters_go_to_peft_fused_over_the_experts(tmp_path, case, targets):
    """LoRA on each expert's projections (and the router) is written as PEFT adapts transformers 5's stacked experts:
    one adapter per stacked parameter (gate_up_proj of rank 2r, down_proj), PEFT loads it with temper's logits, and
    temper reads its own file back."""
    model = _model(case)
    hf = _hf(model, tmp_path)
    # GLM-4.5: not its dense layer's or shared expert's MLP, which PEFT cannot adapt (test_glm45_dense_and_shared_...)
    only = {n for n, _ in model.named_modules() if ".mlp." not in n or ".experts." in n or n.endswith("router")}
    if model.cfg.q_lora_rank:  # latent attention's queries, through their latent
        targets = tuple("q_b_proj" if t == "q_proj" else t for t in targets)
    apply_lora(model, rank=2, alpha=3, targets=targets, rslora=case == "mixtral",
               only=only if case in ("glm4_moe", "deepseek_v3", "deepseek_v2", "glm4_moe_lite", "ernie4_5_moe",
                                     "hunyuan_moe") else None)
    _randomize_adapters((n, p) for n, p in model.named_parameters() if p.requires_grad)
    out = save_peft(model, model.cfg, tmp_path / "adapter")
    config = json.loads((out / "adapter_config.json").read_text())
    stacked = {"up_proj": "gate_up_proj", "down_proj": "down_proj",  # PEFT's parameters
               "router": "router.weight" if case in ("granite4_moe", "jamba_moe") else "gate.weight"}
    if case == "hunyuan_moe":  # its router is a plain linear layer (gate.wg), adapted by module name
        del stacked["router"]
    assert set(config["target_parameters"]) == {stacked[t] for t in targets if t in stacked}
    _assert_peft_and_temper_read(model, hf, out, case, matters=1e-2)


@pytest.mark.parametrize("all_linear", [False, True])  # "all-linear": the router ("gate") too
@pytest.mark.parametrize("case", ["mixtral", "qwen3_moe", "olmoe", "glm4_moe", "deepseek_v3", "deepseek_v2",
                                  "glm4_moe_lite", "minimax_m2", "ernie4_5_moe", "hunyuan_moe"])  # (not LFM2-MoE: PEFT
# maps no module names onto its experts' parameters; its target_parameters do, as test_expert_adapters_... writes)
def test_load_peft_reads_peft_expert_adapters(tmp_path, case, all_linear):
    model = _model(case)
    hf = _hf(model, tmp_path)
    targets = "all-linear" if all_linear else MOE_TARGETS[case]
    theirs = peft.get_peft_model(hf, peft.LoraConfig(r=4, lora_alpha=8, target_modules=targets))
    _randomize_adapters((n, p) for n, p in theirs.named_parameters() if p.requires_grad)
    theirs.save_pretrained(tmp_path / "adapter")
    swapped = load_peft(model, model.cfg, tmp_path / "adapter")
    layers = model.cfg.n_layers - model.cfg.dense_layers  # with experts
    assert sum(".experts." in n for n in swapped) == layers * 4 * 3  # 4 experts x gate, up, down
    assert sum(n.endswith("mlp.router") for n in swapped) == (layers if all_linear else 0)
    assert all(p.requires_grad for m in model.modules() if isinstance(m, LoRALinear) for p in (m.lora_a, m.lora_b))
    x = _x(model)
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(x), theirs.eval()(x).logits, rtol=0, atol=1e-4)


@pytest.mark.parametrize("layer", ["0.mlp.down_proj", "1.mlp.shared_expert.up_proj"])
def test_glm45_dense_and_shared_expert_adapters_are_refused_by_name(tmp_path, layer):
    """PEFT takes GLM-4.5's gate_proj, up_proj and down_proj module names for its routed experts' stacked parameters,
    though its dense layers and shared experts have linear layers of those names: their adapters, which no PEFT file
    can hold, are refused naming the layer, and nothing is written."""
    model = _model("glm4_moe")
    apply_lora(model, rank=2, alpha=4, targets=("q_proj", "gate_proj", "up_proj", "down_proj"),
               only={n for n, _ in model.named_modules() if n.endswith(("q_proj", "experts.0.up_proj", layer))})
    with pytest.raises(ValueError, match=rf"layers.{layer} and 0 more adapt Glm4MoeForCausalLM's dense or shared"):
        save_peft(model, model.cfg, tmp_path / "adapter")
    assert not (tmp_path / "adapter").exists()


@pytest.mark.parametrize("case", ["qwen2_moe", "gemma4_moe"])
@pytest.mark.parametrize("targets", ["all-linear", ["q_proj", "gate_proj", "up_proj", "down_proj"]])
def test_peft_module_names_reach_a_shared_expert_not_the_routed_ones(tmp_path, targets, case):
    """Qwen2-MoE under PEFT: module names adapt its shared expert (and, all-linear, its gate); its routed experts,
    stacked parameters in transformers 5, are adapted only where PEFT turns those names into target_parameters (PEFT
    0.22 does for Qwen2-MoE, 0.21 did not); Gemma 4's dense MLP, temper's shared expert, alike. temper reads such a
    file with PEFT's logits, adapting the routed experts' projections of the same names exactly where the file does."""
    model = _model(case)
    hf = _hf(model, tmp_path)
    theirs = peft.get_peft_model(hf, peft.LoraConfig(r=4, lora_alpha=8, target_modules=targets))
    _randomize_adapters((n, p) for n, p in theirs.named_parameters() if p.requires_grad)
    theirs.save_pretrained(tmp_path / "adapter")
    routed = bool(json.loads((tmp_path / "adapter" / "adapter_config.json").read_text()).get("target_parameters"))
    swapped = load_peft(model, model.cfg, tmp_path / "adapter")
    assert sum(".experts." in n for n in swapped) == (model.cfg.n_layers * model.cfg.n_experts * 3 if routed else 0)
    assert sum(".shared_expert." in n for n in swapped) == 2 * 3
    gated = targets == "all-linear" and case == "qwen2_moe"
    assert sum(n.endswith("shared_expert_gate") for n in swapped) == (2 if gated else 0)
    x = _x(model)
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(x), theirs.eval()(x).logits, rtol=0, atol=1e-4)


def test_gemma4_router_and_dense_mlp_adapters_go_to_peft_by_module_name(tmp_path):
    """Gemma 4's router (router.proj) and dense MLP are plain linear layers under PEFT, adapted by module name: temper
    writes its adapters of them (the router, and the shared expert that holds the dense MLP) so that PEFT loads them
    with temper's logits, and reads them back."""
    model = _model("gemma4_moe")
    hf = _hf(model, tmp_path)
    dense = {n for n, _ in model.named_modules() if ".mlp.shared_expert." in n or n.endswith((".mlp.router", "q_proj"))}
    apply_lora(model, rank=4, alpha=8, targets=("q_proj", "router", "gate_proj", "up_proj", "down_proj"), only=dense)
    _randomize_adapters((n, p) for n, p in model.named_parameters() if p.requires_grad)
    assert peft_lora_refusal(model) is None
    out = save_peft(model, model.cfg, tmp_path / "adapter", base_model_name_or_path="org/tiny")
    assert set(json.loads((out / "adapter_config.json").read_text())["target_modules"]) >= {"router.proj", "mlp.gate_proj"}
    _assert_peft_and_temper_read(model, hf, out, "gemma4_moe", matters=0.05)


def test_gemma4_per_layer_projections_adapt_both_ways(tmp_path):
    """PEFT's all-linear adapts Gemma 4 E2B's per-layer projections too (per_layer_model_projection, each layer's
    per_layer_input_gate and per_layer_projection): temper reads such a file with PEFT's logits, and writes its own
    adapters of them so that PEFT loads them with temper's."""
    model = _model("gemma4_e2b")
    hf = _hf(model, tmp_path)
    theirs = peft.get_peft_model(hf, peft.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    _randomize_adapters((n, p) for n, p in theirs.named_parameters() if p.requires_grad)
    theirs.save_pretrained(tmp_path / "theirs")
    swapped = load_peft(model, model.cfg, tmp_path / "theirs")
    assert {n.rsplit(".", 1)[-1] for n in swapped} >= {"per_layer_proj", "per_layer_gate", "per_layer_out"}
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(_x(model)), theirs.eval()(_x(model)).logits, rtol=0, atol=1e-4)
    ours = _model("gemma4_e2b")
    apply_lora(ours, rank=4, alpha=8, targets=("q_proj", "per_layer_proj", "per_layer_gate", "per_layer_out"))
    _randomize_adapters((n, p) for n, p in ours.named_parameters() if p.requires_grad)
    out = save_peft(ours, ours.cfg, tmp_path / "ours", base_model_name_or_path="org/tiny")
    _assert_peft_and_temper_read(ours, _hf(_model("gemma4_e2b"), tmp_path / "fresh"), out, "gemma4_e2b", matters=0.05)


def test_dora_on_experts_is_refused_by_name(tmp_path):
    """PEFT adapts stacked experts as parameters, where it has no DoRA: refused naming the layer, nothing written."""
    model = _model("qwen3_moe")
    apply_lora(model, rank=2, alpha=4, targets=("q_proj", "down_proj"), dora=True)
    assert "layers.0.mlp.experts.0.down_proj and 7 more are DoRA adapters" in peft_lora_refusal(model)
    with pytest.raises(ValueError, match="which PEFT adapts as parameters, without DoRA"):
        save_peft(model, model.cfg, tmp_path / "adapter")
    assert not (tmp_path / "adapter").exists()


@pytest.mark.parametrize("case, more", [("nemotron_h", 0), ("mamba2", 1), ("mamba", 1)])
def test_mamba_out_proj_adapters_are_refused_by_name(tmp_path, case, more):
    """PEFT refuses LoRA on a Mamba out_proj of Nemotron-H, Mamba2ForCausalLM and MambaForCausalLM (its fused kernels
    read the weight directly): temper writes no file with one, nothing written; without it the file is written
    (test_save_peft_loads_in_peft_...)."""
    model = _model(case)
    apply_lora(model, rank=2, alpha=4, targets=("in_proj", "out_proj"))
    assert (f"layers.0.attn.out_proj and {more} more adapt {model.cfg.hf_architecture}'s Mamba out_proj"
            in peft_lora_refusal(model))
    with pytest.raises(ValueError, match="PEFT refuses on that model"):
        save_peft(model, model.cfg, tmp_path / "adapter")
    assert not (tmp_path / "adapter").exists()


def test_mamba_dt_proj_adapters_are_refused_by_name(tmp_path):
    """transformers' Mamba multiplies dt_proj's weight itself, past any adapter PEFT puts there (measured: 3e-3 from
    temper's logits): temper writes no PEFT file with one, nothing written."""
    for case, arch, more in (("falcon_mamba", "FalconMambaForCausalLM", 1), ("jamba", "JambaForCausalLM", 0)):
        model = _model(case)
        apply_lora(model, rank=2, alpha=4, targets=("in_proj", "dt_proj"))
        with pytest.raises(ValueError, match=f"layers.0.attn.dt_proj and {more} more adapt {arch}'s dt_proj"):
            save_peft(model, model.cfg, tmp_path / case)
        assert not (tmp_path / case).exists()


@pytest.mark.parametrize("case, arch, experts, first", [("gpt_oss", "GptOssForCausalLM", "mlp.experts", "gate"),
                                                        ("gemma4_moe", "Gemma4ForCausalLM", "experts", "gate"),
                                                        ("nemotron_h_moe", "NemotronHForCausalLM", "mixer.experts", "up"),
                                                        ("llama4", "Llama4ForCausalLM", "feed_forward.experts", "gate")])
def test_stacked_expert_adapters_are_refused_by_name(tmp_path, case, arch, experts, first):
    """GPT-OSS, Gemma 4 and Llama 4 store their experts stacked (GPT-OSS's (in, out), gate and up interleaved; Llama
    4's (in, out), gate and up in halves), and transformers holds Nemotron 3's stacked without a gate: temper writes no PEFT form for adapters there (their attention adapters
    are written, above), and reads none: both refused, nothing written."""
    model = _model(case)
    apply_lora(model, rank=2, alpha=4, targets=("q_proj", f"{first}_proj"))
    assert f"layers.0.mlp.experts.0.{first}_proj and 7 more adapt {arch}'s experts" in peft_lora_refusal(model)
    with pytest.raises(ValueError, match="stacked in a layout"):
        save_peft(model, model.cfg, tmp_path / "adapter")
    assert not (tmp_path / "adapter").exists()
    out = tmp_path / "theirs"
    out.mkdir()
    (out / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "r": 2, "lora_alpha": 4, "target_modules": ["q_proj"],
        "target_parameters": [f"{experts}.{'up_proj' if first == 'up' else 'gate_up_proj'}"]}))
    save_file({"base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight": torch.zeros(2, 64)},
              out / "adapter_model.safetensors")
    with pytest.raises(ValueError, match="stacked"):
        load_peft(_model(case), model.cfg, out)


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


P = 5  # virtual tokens


@pytest.mark.parametrize("hidden", [None, 16], ids=["slots", "mlp"])
@pytest.mark.parametrize("case", PREFIX_CASES)
def test_save_peft_prefix_loads_in_peft_with_the_same_logits(tmp_path, case, hidden):
    model = _model(case)
    hf = _hf(model, tmp_path)
    torch.manual_seed(1)
    apply_prefix(model, P, hidden=hidden, init_std=0.5)  # random slots, or an MLP's output
    out = save_peft_prefix(model, model.cfg, tmp_path / "adapter", base_model_name_or_path="org/tiny")
    config = json.loads((out / "adapter_config.json").read_text())
    c = model.cfg
    assert config["num_attention_heads"] == c.kv_heads and config["token_dim"] == c.kv_heads * c.head_dim
    assert load_file(out / "adapter_model.safetensors")["prompt_embeddings"].shape == (P, c.n_layers * 2 * c.kv_heads
                                                                                       * c.head_dim)
    theirs = peft.PeftModel.from_pretrained(hf, out).eval()
    x = _x(model)
    with torch.no_grad():
        ours = model(x)
        torch.testing.assert_close(theirs(x).logits, ours, rtol=0, atol=1e-4)
        with theirs.disable_adapter():
            assert (ours - theirs(x).logits).abs().max() > 0.1  # ... and the prefix matters
        back = _model(case)  # and temper reads its own file back
        load_peft_prefix(back, back.cfg, out)
        torch.testing.assert_close(back(x), ours, rtol=0, atol=1e-5)
    if case == "llama" and hidden is None:  # cached generation: PEFT's cache positions agree with temper's
        # PEFT's greedy tokens by its forward, recomputed for each token: PEFT 0.21's generate() loses the
        # prefix on transformers 5 (it passes past_key_values, which generate's own cache replaces).
        for prompt in x[:, :6].tolist():
            ours = generate(model, [prompt], max_new_tokens=10, temperature=0.0)[0]
            new = list(prompt)
            with torch.no_grad():
                for _ in range(10):
                    new.append(int(theirs(torch.tensor([new])).logits[0, -1].argmax()))
            assert_greedy_agrees(ours, new[6:], next_token_logits(model, prompt, ours), tol=1e-4)


@pytest.mark.parametrize("projection", [False, True], ids=["slots", "projection"])
@pytest.mark.parametrize("case", PREFIX_CASES)
def test_load_peft_prefix_reads_what_peft_saves(tmp_path, case, projection):
    model = _model(case)
    hf = _hf(model, tmp_path)
    config = peft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=P, prefix_projection=projection,
                                     encoder_hidden_size=24)
    theirs = peft.get_peft_model(hf, config)
    _randomize_adapters(theirs.prompt_encoder.named_parameters())
    theirs.save_pretrained(tmp_path / "adapter")  # with a projection: its output, evaluated
    assert len(load_peft_prefix(model, model.cfg, tmp_path / "adapter")) == model.cfg.n_layers
    x = _x(model)
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(x), theirs.eval()(x).logits, rtol=0, atol=1e-4)


@pytest.mark.parametrize("case", ["gpt2", "mistral", "phi4mini-longrope"])
def test_peft_prefix_is_refused_where_peft_computes_something_else(tmp_path, case):
    """PEFT puts the input at positions P..P+T-1, after the prefix: GPT-2's learned positions move with
    it (PEFT's logits are temper's with the input at P.., not temper's), Mistral's window then
    hides the prefix from later queries, and LongRoPE switches tables P tokens earlier."""
    model = _model(case)
    hf = _hf(model, tmp_path)
    theirs = peft.get_peft_model(hf, peft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=P))
    _randomize_adapters(theirs.prompt_encoder.named_parameters())
    theirs.save_pretrained(tmp_path / "adapter")
    match = {"gpt2": "learned position embeddings", "mistral": "sliding_window=8", "phi4mini-longrope": "LongRoPE"}[case]
    with pytest.raises(ValueError, match=match):
        load_peft_prefix(model, model.cfg, tmp_path / "adapter")
    apply_prefix(model, P)
    with pytest.raises(ValueError, match=match):
        save_peft_prefix(model, model.cfg, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    if case == "gpt2":  # PEFT's layout read by hand (no RoPE: nothing to rotate), to show the cause
        c = model.cfg
        emb = load_file(tmp_path / "adapter" / "adapter_model.safetensors")["prompt_embeddings"]
        ours = _model(case)
        set_prefix(ours, emb.view(P, c.n_layers, 2, c.kv_heads, c.head_dim).permute(1, 2, 3, 0, 4))
        x = _x(model)
        with torch.no_grad():
            peft_logits = theirs.eval()(x).logits
            shifted = ours(x, positions=torch.arange(P, P + x.shape[1]).expand_as(x))
            torch.testing.assert_close(shifted, peft_logits, rtol=0, atol=1e-4)
            assert (ours(x) - peft_logits).abs().max() > 0.1


def test_prefix_tuning_is_refused_on_latent_attention(tmp_path):
    """Latent attention caches a latent per token, not keys and values: no prefix of keys and values fits it."""
    model = _model("deepseek_v3")
    with pytest.raises(ValueError, match="latent attention .* does not cache: use LoRA"):
        apply_prefix(model, P)
    assert peft_prefix_refusal(model.cfg).startswith("latent attention (DeepSeek-V3) caches one latent per token")


def test_bad_peft_prefixes_fail_naming_the_key(tmp_path):
    model = _model("llama")
    apply_prefix(model, P)
    out = save_peft_prefix(model, model.cfg, tmp_path / "adapter")
    weights, config_path = out / "adapter_model.safetensors", out / "adapter_config.json"
    tensors, config = load_file(weights), json.loads(config_path.read_text())

    def fails(match: str, reader=load_peft_prefix) -> None:
        fresh = _model("llama")
        with pytest.raises((ValueError, FileNotFoundError), match=match):
            reader(fresh, fresh.cfg, out)
        assert not any(hasattr(layer.attn, "prefix") for layer in fresh.layers)  # the model is left as it was
        save_file(tensors, weights)
        config_path.write_text(json.dumps(config))

    fails("peft_type 'PREFIX_TUNING' is not supported here, 'LORA' is;.* load_peft_prefix", reader=load_peft)
    config_path.write_text(json.dumps(config | {"peft_type": "PROMPT_TUNING"}))
    fails("peft_type 'PROMPT_TUNING' is not supported here, 'PREFIX_TUNING' is")
    config_path.write_text(json.dumps(config | {"num_layers": 3}))
    fails(r"adapter_config.json: num_layers=3, this model needs 2")
    config_path.write_text(json.dumps(config | {"token_dim": 64, "num_attention_heads": 4}))
    fails(r"token_dim=64, this model needs 32 \(n_layers 2, n_kv_heads 2 x head_dim 16\)")
    config_path.write_text(json.dumps(config | {"task_type": "SEQ_2_SEQ_LM"}))
    fails("task_type='SEQ_2_SEQ_LM'")
    save_file({"prompt_embeddings": torch.zeros(P, 64)}, weights)
    fails(r"prompt_embeddings has shape \[5, 64\], expected \[5, 128\]")
    save_file(tensors | {"prompt_encoder.weight": torch.zeros(1)}, weights)
    fails(r"expected the one tensor 'prompt_embeddings', found \['prompt_embeddings', 'prompt_encoder.weight'\]")
    weights.unlink()
    fails("adapter_model.safetensors: no such adapter weights file")
