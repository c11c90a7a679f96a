"""Hugging Face `config.json` <-> temper's `ModelConfig`: the architectures' names and families, the reading of a
config and the writing of one.

Seventy-seven architectures: GPT-2 (`GPT2LMHeadModel`), Llama 2/3/3.1/3.2 (`LlamaForCausalLM`; EXAONE 3.0 and 3.5's
`ExaoneForCausalLM`, InternLM3's `InternLM3ForCausalLM` and IQuest-Coder's `IQuestCoderForCausalLM` are Llama under
other names, read as it), Llama 4's text model (`Llama4ForCausalLM`, also read out of `Llama4ForConditionalGeneration`:
Llama's blocks with RoPE in adjacent pairs, attention within chunks, weightless q/k norms after RoPE, a layer without
positions after every three whose queries take a temperature, experts weighing their inputs beside a shared one, in
every layer or every other; read by `_llama4`, written by `_llama4_config`), Falcon (`FalconForCausalLM`: LayerNorms
with biases beside linear layers with or without, an exact-GELU MLP beside attention on one or two norms or after it,
one kv head, grouped ones or as many as heads, fused with the queries by group; read by `_falcon`), GPT-J
(`GPTJForCausalLM`: attention without biases beside a tanh-GELU MLP with them on one LayerNorm, a head with a bias, part
of each head rotated in adjacent pairs: `attn_bias`; read by `_gptj`), GPTBigCode (`GPTBigCodeForCausalLM`, StarCoder
and SantaCoder: GPT-2's blocks with one kv head, q, k and v fused; read by `_gpt_bigcode`), Helium (`HeliumForCausalLM`:
Llama with RoPE in adjacent pairs and norms that scale before they round), Jais 2 (`Jais2ForCausalLM`: Llama's attention
with LayerNorms and a squared-ReLU MLP), Apertus (`ApertusForCausalLM`: Llama's attention with per-head q/k norms, an
MLP of xIELU with learned scalars), Granite SWA (`GraniteSWAForCausalLM`: Granite with a sink per head, windowed layers
around global ones, RoPE bases per layer), Granite MoE SWA (`GraniteMoeSWAForCausalLM`: that attention with
GraniteMoeShared's experts), HyperCLOVA X (`HyperCLOVAXForCausalLM`: Granite's multipliers with norms on the sublayers'
outputs too, its logits multiplied), Solar Open (`SolarOpenForCausalLM`: Llama's attention with GLM-4.5's routing in
every layer), CWM (`CwmForCausalLM`: Ministral-8B's layout, Llama 3.1's RoPE), Nemotron-4 and Minitron
(`NemotronForCausalLM`: LayerNorms scaling by 1 + weight, a squared-ReLU MLP, half of each head rotated), DBRX
(`DbrxForCausalLM`: LayerNorms without biases, q, k and v fused and clamped, SwiGLU experts in every layer stacked in
three tensors; read by `_dbrx`), dots.llm1 (`Dots1ForCausalLM`: Qwen3's attention with DeepSeek-V3's routing, shared
experts and dense first layers), Youtu-LLM (`YoutuForCausalLM`: DeepSeek-V3's latent attention beside dense MLPs),
FlexOlmo (`FlexOlmoForCausalLM`: OLMo 2's post-norm blocks with OLMoE's experts), Mistral Small 4
(`Mistral4ForCausalLM`, also read out of `Mistral3ForConditionalGeneration` by its text_config's model_type:
DeepSeek-V3's latent attention, the whole query taking Llama 4's temperature, a softmax router over groups scored by
their two best experts, the experts stored stacked), VaultGemma (`VaultGemmaForCausalLM`: Gemma 2 without norms on the
sublayers' outputs), K-EXAONE (`ExaoneMoeForCausalLM`: EXAONE 4's attention in pre-norm blocks with DeepSeek-V3's
routing), Mistral (`MistralForCausalLM`: a sliding window), Ministral-8B (`MinistralForCausalLM`: Mistral's layers, the
first of every four global: `global_first`), Ministral 3 (`Ministral3ForCausalLM`: Mistral with YaRN and Llama 4's
temperature of the queries, `query_scale_beta`; both also read out of `Mistral3ForConditionalGeneration`, by its
text_config's model_type, without the vision tower), Qwen2/2.5 (`Qwen2ForCausalLM`: q/k/v biases), Qwen3
(`Qwen3ForCausalLM`: q/k norms, wide heads; both also read out of Qwen2-VL's, Qwen2.5-VL's and Qwen3-VL's image-text
checkpoints, their M-RoPE read as the RoPE it is for text), Gemma (`GemmaForCausalLM`: GeGLU, (1 + w) RMSNorm, scaled
embeddings, wide heads), Gemma 2 (`Gemma2ForCausalLM`: Gemma's parts, norms on the sublayers' outputs, windowed layers
alternating with global ones, capped attention scores and logits), Gemma 3's text model (`Gemma3ForCausalLM`: Gemma 2's
parts without the caps, q/k norms, windowed layers with their own RoPE base; also read out of the image-text
`Gemma3ForConditionalGeneration` checkpoints of the 4B, 12B and 27B, without their vision tower), Gemma 4's text model
(`Gemma4ForCausalLM`, also read out of `Gemma4ForConditionalGeneration`: Gemma 3's parts with w-scaled norms, global
layers shaped apart (wider heads, their own kv heads, values made by the keys' projection, proportional RoPE), value
norms, layer scalars, unscaled scores; 26B-A4B's dense MLP beside its experts; E2B's and E4B's per-layer embeddings and
layers sharing keys and values), Phi-1, 1.5 and 2 (`PhiForCausalLM`: attention beside a tanh-GELU MLP on one LayerNorm,
biases everywhere, the head's too: `head_bias`), Phi-3, Phi-3.5 and Phi-4-mini (`Phi3ForCausalLM`: fused qkv and gate_up
projections, LongRoPE, partial rotary), OLMo (`OlmoForCausalLM`: Llama's blocks with LayerNorms without weights or
biases, q, k and v clamped: `qkv_clip`, as OLMoE's), StableLM 2 (`StableLmForCausalLM`: LayerNorms with biases beside
linear layers without, `norm_bias`), OLMo 2 (`Olmo2ForCausalLM`: norms on the sublayers' outputs only, q/k norms over
all heads at once), OLMo 3 (`Olmo3ForCausalLM`: OLMo 2's blocks, three windowed layers to one global, YaRN on the global
ones), Mixtral (`MixtralForCausalLM`: Mistral with a mixture of experts in every MLP), Qwen3-MoE (`Qwen3MoeForCausalLM`:
Qwen3 with one, dense layers where decoder_sparse_step and mlp_only_layers say: `expert_layers`), GPT-OSS
(`GptOssForCausalLM`: attention sinks, biases everywhere, experts with clamped SwiGLU stored stacked, in MXFP4 as
published), SmolLM3 (`SmolLM3ForCausalLM`: Llama with a layer without positions, NoPE, after every three), GLM-4-9B
(`GlmForCausalLM`: Llama with q/k/v biases, gate and up fused, half of each head rotated in adjacent pairs), GLM-4-0414
(`Glm4ForCausalLM`: those and sandwich norms), Granite (`GraniteForCausalLM`: Llama with multipliers of the embeddings,
the sublayers' outputs, the attention scores and the logits), Qwen2-MoE (`Qwen2MoeForCausalLM`: Qwen2's attention, 60
experts beside a gated shared one), OLMoE (`OlmoeForCausalLM`: Llama's blocks, q/k norms over all heads, 64 experts),
GLM-4.5 (`Glm4MoeForCausalLM`: DeepSeek-V3's routing, with sigmoid scores, a choice bias and groups of experts, beside a
shared expert, after dense first layers; half of each head rotated, in halves), DeepSeek-V3 (`DeepseekV3ForCausalLM`:
that routing behind multi-head latent attention, its rotated dims in adjacent pairs; R1 and Kimi K2 too; their published
FP8 weights are dequantized as they load), DeepSeek-V2 and V2-Lite (`DeepseekV2ForCausalLM`: that attention, with a
float32 softmax router choosing greedily or among the groups whose best expert scores highest), GLM-4.7-Flash
(`Glm4MoeLiteForCausalLM`: DeepSeek-V3's attention and routing, its dense layers named by mlp_layer_types), MiniMax-M2
(`MiniMaxM2ForCausalLM`: Mixtral's experts chosen by sigmoid scores plus a bias, q/k norms over all heads, partial
RoPE), Arcee (`ArceeForCausalLM`, AFM-4.5B: Llama with a squared-ReLU MLP, not gated), nanochat (`NanoChatForCausalLM`:
Arcee's MLP, norms without weights, one on the embeddings, q/k norms after RoPE turning the other way, capped logits),
StarCoder2 (`Starcoder2ForCausalLM`: GPT-2's LayerNorms and tanh-GELU MLP with biases everywhere, RoPE, GQA, a sliding
window), GPT-NeoX (`GPTNeoXForCausalLM`, Pythia: LayerNorms and an exact-GELU MLP with biases, attention beside the MLP
on two norms, q/k/v fused head by head, partial RoPE; read by `_gpt_neox`), Seed-OSS (`SeedOssForCausalLM`: Llama with
q/k/v biases), ERNIE 4.5 (`Ernie4_5ForCausalLM`: Llama with RoPE in float32, in adjacent pairs, and
`Ernie4_5_MoeForCausalLM`: a float32 softmax router choosing with a bias, beside shared experts, after dense first
layers), Hunyuan (`HunYuanDenseV1ForCausalLM`: Llama with q/k norms after RoPE, whose base its fixed NTK alpha
stretches, and `HunYuanMoEV1ForCausalLM`: experts of the MLP's width beside a shared one, a float32 router), Cohere
(`CohereForCausalLM`, Command R and Aya: attention beside the MLP on one LayerNorm without biases, RoPE in float32 in
adjacent pairs, scaled logits; `Cohere2ForCausalLM`, Command R7B and Command A: three windowed layers with RoPE to one
global without), LFM2 (`Lfm2ForCausalLM`: gated short convolutions around attention layers placed irregularly;
`Lfm2MoeForCausalLM`: with experts chosen by sigmoid scores plus a bias after dense first layers), Granite 3.0's
mixtures (`GraniteMoeForCausalLM`, `GraniteMoeSharedForCausalLM`: Granite's multipliers, experts stacked, alone or
beside an ungated shared MLP), Granite 4.0 (`GraniteMoeHybridForCausalLM`: those, or that MLP alone, with Mamba 2 layers
around attention layers with or without RoPE), Nemotron-H (`NemotronHForCausalLM`: Mamba 2 layers, attention without
positions and squared-ReLU MLPs or mixtures of them (Nemotron 3), each a layer of its own, read as blocks of a mixer and
the MLP after it or the mixer alone), Bamba (`BambaForCausalLM`: Granite 4.0-H's dense layers without multipliers, its
attention turning half of each head), Mamba 2 alone (`Mamba2ForCausalLM`, Mamba-Codestral: Nemotron-H's mixer blocks
without attention or MLPs), Mamba and FalconMamba (`MambaForCausalLM`, `FalconMambaForCausalLM`: Mamba (1) mixers alone,
FalconMamba's steps, B and C normalised), Jamba (`JambaForCausalLM`: Mamba layers with weighted norms of their steps, B
and C around attention without positions, mixtures of experts in every other block: `expert_layers`) and EXAONE 4
(`Exaone4ForCausalLM`, also read out of `Exaone4_5_ForConditionalGeneration`: OLMo 2's post-norm blocks with per-head
q/k norms, three windowed layers with RoPE to one global without), Qwen3.5 (`Qwen3_5ForCausalLM`: three Gated DeltaNet
linear attention layers to one of gated attention with a quarter of each head rotated, (1 + w) norms) and Qwen3.5-MoE
(`Qwen3_5MoeForCausalLM`: with Qwen2-MoE's experts), also read out of their published image-text
`*ForConditionalGeneration` checkpoints without the vision tower, and Qwen3-Next (`Qwen3NextForCausalLM`: Qwen3.5-MoE's
layers, each linear layer's projections fused and grouped by key head). Reading a config maps its fields onto
`ModelConfig` fields; anything temper cannot reproduce exactly fails with the reason. Writing one takes the architecture
a model was read as, else the one its fields match (`hf_architecture`), and refuses what that architecture cannot hold
exactly.

It does not read or write files or weights: checkpoint.py reads and writes a directory's config.json, weights.py maps
the tensors of the architectures named here.
"""

from __future__ import annotations

from dataclasses import fields, replace
from typing import Any

from temper.model.config import ROPE_OPTIONAL_KEYS, ModelConfig, last_of_every
from temper.model.hf.files import _is_int

GPT2, LLAMA, MISTRAL, QWEN2, QWEN3, GEMMA, GEMMA2, GEMMA3, PHI3, OLMO2, OLMO3, MIXTRAL, QWEN3_MOE, GPT_OSS = (
    "GPT2LMHeadModel", "LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM",
    "GemmaForCausalLM", "Gemma2ForCausalLM", "Gemma3ForCausalLM", "Phi3ForCausalLM", "Olmo2ForCausalLM",
    "Olmo3ForCausalLM", "MixtralForCausalLM", "Qwen3MoeForCausalLM", "GptOssForCausalLM",
)
SMOLLM3, GRANITE, QWEN2_MOE, OLMOE, SEED_OSS, EXAONE4, GLM4, GLM4_MOE, DEEPSEEK_V2, DEEPSEEK_V3 = (
    "SmolLM3ForCausalLM", "GraniteForCausalLM", "Qwen2MoeForCausalLM", "OlmoeForCausalLM", "SeedOssForCausalLM",
    "Exaone4ForCausalLM", "Glm4ForCausalLM", "Glm4MoeForCausalLM", "DeepseekV2ForCausalLM", "DeepseekV3ForCausalLM")
QWEN3_5, QWEN3_5_MOE, QWEN3_NEXT = "Qwen3_5ForCausalLM", "Qwen3_5MoeForCausalLM", "Qwen3NextForCausalLM"
GLM4_MOE_LITE, MINIMAX_M2 = "Glm4MoeLiteForCausalLM", "MiniMaxM2ForCausalLM"
GEMMA4 = "Gemma4ForCausalLM"
ERNIE4_5, ERNIE4_5_MOE = "Ernie4_5ForCausalLM", "Ernie4_5_MoeForCausalLM"
HUNYUAN, HUNYUAN_MOE = "HunYuanDenseV1ForCausalLM", "HunYuanMoEV1ForCausalLM"
COHERE, COHERE2 = "CohereForCausalLM", "Cohere2ForCausalLM"
LFM2, LFM2_MOE = "Lfm2ForCausalLM", "Lfm2MoeForCausalLM"
LFM2S = (LFM2, LFM2_MOE)  # gated short convolutions around attention layers with q/k norms, under LFM2's names
GRANITE_MOE, GRANITE_MOE_SHARED, GRANITE_HYBRID = (
    "GraniteMoeForCausalLM", "GraniteMoeSharedForCausalLM", "GraniteMoeHybridForCausalLM")
GRANITE_MOE_SWA = "GraniteMoeSWAForCausalLM"
# experts stacked under block_sparse_moe, a router named router, a shared MLP named shared_mlp (Granite 4.0: Mamba 2
# layers too; Granite MoE SWA: a sink per head, windowed layers)
GRANITE_MOES = (GRANITE_MOE, GRANITE_MOE_SHARED, GRANITE_HYBRID, GRANITE_MOE_SWA)
GRANITES = (GRANITE, *GRANITE_MOES)  # Granite's multipliers of the embeddings, sublayers, scores and logits
NEMOTRON_H = "NemotronHForCausalLM"
BAMBA = "BambaForCausalLM"
MAMBA2 = "Mamba2ForCausalLM"
MAMBA, FALCON_MAMBA = "MambaForCausalLM", "FalconMambaForCausalLM"
MAMBAS = (MAMBA, FALCON_MAMBA)  # Mamba (1) mixers alone; FalconMamba normalises their steps, B and C
MIXERS_ALONE = (MAMBA2, *MAMBAS)  # every layer x + mixer(norm(x)), under backbone.*
JAMBA = "JambaForCausalLM"
STARCODER2 = "Starcoder2ForCausalLM"
GPT_NEOX = "GPTNeoXForCausalLM"
ARCEE = "ArceeForCausalLM"
NANOCHAT = "NanoChatForCausalLM"
PHI = "PhiForCausalLM"
OLMO = "OlmoForCausalLM"
MINISTRAL3 = "Ministral3ForCausalLM"
STABLELM = "StableLmForCausalLM"
LLAMA4 = "Llama4ForCausalLM"
FALCON = "FalconForCausalLM"
GPTJ = "GPTJForCausalLM"
GPT_BIGCODE = "GPTBigCodeForCausalLM"
GLM1 = "GlmForCausalLM"
HELIUM = "HeliumForCausalLM"
JAIS2 = "Jais2ForCausalLM"
DOTS1 = "Dots1ForCausalLM"
MISTRAL4 = "Mistral4ForCausalLM"
YOUTU = "YoutuForCausalLM"
FLEX_OLMO = "FlexOlmoForCausalLM"
MINISTRAL = "MinistralForCausalLM"
VAULTGEMMA = "VaultGemmaForCausalLM"
EXAONE_MOE = "ExaoneMoeForCausalLM"
APERTUS = "ApertusForCausalLM"
GRANITE_SWA = "GraniteSWAForCausalLM"
HYPERCLOVAX = "HyperCLOVAXForCausalLM"
SOLAR_OPEN = "SolarOpenForCausalLM"
CWM = "CwmForCausalLM"
NEMOTRON = "NemotronForCausalLM"
DBRX = "DbrxForCausalLM"
EXAONES = (EXAONE4, EXAONE_MOE)  # windowed layers with RoPE between global ones without, per-head q/k norms
MISTRALS = (MISTRAL, MINISTRAL3)  # also read out of a Mistral3ForConditionalGeneration checkpoint, its vision left out
SUPPORTED_ARCHITECTURES = (GPT2, LLAMA, MISTRAL, QWEN2, QWEN3, GEMMA, GEMMA2, GEMMA3, PHI3, OLMO2, OLMO3, MIXTRAL,
                           QWEN3_MOE, GPT_OSS, SMOLLM3, GRANITE, QWEN2_MOE, OLMOE, SEED_OSS, EXAONE4, GLM4, GLM4_MOE,
                           DEEPSEEK_V2, DEEPSEEK_V3, GLM4_MOE_LITE, MINIMAX_M2, QWEN3_5, QWEN3_5_MOE, QWEN3_NEXT,
                           GEMMA4, ERNIE4_5, ERNIE4_5_MOE, HUNYUAN, HUNYUAN_MOE, COHERE, COHERE2, LFM2, LFM2_MOE,
                           *GRANITE_MOES, NEMOTRON_H, BAMBA, MAMBA2, *MAMBAS, JAMBA, STARCODER2, GPT_NEOX, ARCEE,
                           NANOCHAT, PHI, OLMO, MINISTRAL3, STABLELM, LLAMA4, FALCON, GPTJ, GPT_BIGCODE,
                           GLM1, HELIUM, JAIS2, DOTS1, MISTRAL4, YOUTU, FLEX_OLMO, MINISTRAL,
                           VAULTGEMMA, EXAONE_MOE, APERTUS, GRANITE_SWA, HYPERCLOVAX, SOLAR_OPEN, CWM, NEMOTRON,
                           DBRX)
MAMBA2_HYBRIDS = (GRANITE_HYBRID, NEMOTRON_H, BAMBA)  # Mamba 2 layers around attention layers
HYBRID = (QWEN3_5, QWEN3_5_MOE, QWEN3_NEXT)  # Gated DeltaNet layers between gated attention ones, (1 + w) norms
SANDWICH = (GEMMA2, GEMMA3, GEMMA4, GLM4)  # norms on the sublayers' inputs and outputs
GLM = (GLM1, GLM4, GLM4_MOE)  # half of each head rotated (partial_rotary_factor), q/k/v biases (attention_bias)
ERNIES = (ERNIE4_5, ERNIE4_5_MOE)  # RoPE in float32, in adjacent pairs (GLM-4's layout, over the whole head)
HUNYUANS = (HUNYUAN, HUNYUAN_MOE)  # q/k norms after RoPE, named query_layernorm and key_layernorm
COHERES = (COHERE, COHERE2)  # attention beside the MLP (parallel_block), LayerNorm without biases, RoPE in adjacent
# pairs in float32, scaled logits
GEMMAS = (GEMMA, GEMMA2, GEMMA3, GEMMA4, VAULTGEMMA)
CAPPED = (GEMMA2, GEMMA3, GEMMA4, VAULTGEMMA)  # capped scores or logits, scores scaled by query_pre_attn_scalar
OLMOS = (OLMO2, OLMO3)  # norms on the sublayers' outputs only, q/k norms over all heads
POST_NORM = (*OLMOS, EXAONE4, FLEX_OLMO)  # norms on the sublayers' outputs only
# windowed layers between global ones
LOCAL_GLOBAL = (GEMMA2, GEMMA3, GEMMA4, OLMO3, GPT_OSS, *EXAONES, COHERE2, MINISTRAL, VAULTGEMMA, CWM)
MOE_ARCHITECTURES = (MIXTRAL, QWEN3_MOE, GPT_OSS, QWEN2_MOE, OLMOE, GLM4_MOE, DEEPSEEK_V2, DEEPSEEK_V3, GLM4_MOE_LITE,
                     MINIMAX_M2, QWEN3_5_MOE, QWEN3_NEXT, ERNIE4_5_MOE, HUNYUAN_MOE, LFM2_MOE, DOTS1,
                     MISTRAL4, FLEX_OLMO, EXAONE_MOE, SOLAR_OPEN, DBRX)
SPARSE_STEP = (QWEN2_MOE, QWEN3_MOE, QWEN3_NEXT)  # dense MLPs where mlp_only_layers and decoder_sparse_step say
SHARED_GATED = (QWEN2_MOE, QWEN3_5_MOE, QWEN3_NEXT)  # a shared expert beside the routed ones, gated
# DeepSeek's: shared experts, groups, scaling, dense first layers
DEEPSEEK_MOE = (GLM4_MOE, DEEPSEEK_V2, DEEPSEEK_V3, GLM4_MOE_LITE, DOTS1, MISTRAL4, EXAONE_MOE, SOLAR_OPEN)
# of those, DeepSeek-V3's routing: sigmoid scores, a choice bias
SIGMOID_MOE = (GLM4_MOE, DEEPSEEK_V3, GLM4_MOE_LITE, DOTS1, EXAONE_MOE, SOLAR_OPEN)
BIASED_SIGMOID = (*SIGMOID_MOE, MINIMAX_M2)  # sigmoid scores and a choice bias (MiniMax-M2: without DeepSeek's rest)
MIXTRAL_NAMES = (MIXTRAL, MINIMAX_M2)  # experts named block_sparse_moe.experts.j.w1, w3, w2
LATENT = (DEEPSEEK_V2, DEEPSEEK_V3, GLM4_MOE_LITE, MISTRAL4, YOUTU)  # multi-head latent attention (Youtu's: with dense
# MLPs)
WHOLE_QK_NORM = (OLMO2, OLMO3, OLMOE, MINIMAX_M2, FLEX_OLMO)  # one q norm over all heads' values, one k norm
GEMMA3_IMAGE_TEXT = "Gemma3ForConditionalGeneration"
IMAGE_TEXT = {GEMMA3_IMAGE_TEXT: GEMMA3, "Qwen3_5ForConditionalGeneration": QWEN3_5,
              "Qwen3_5MoeForConditionalGeneration": QWEN3_5_MOE, "Gemma4ForConditionalGeneration": GEMMA4,
              "Mistral3ForConditionalGeneration": MINISTRAL3,  # (or Mistral's: Mistral Small 3.1's text_config)
              "Llama4ForConditionalGeneration": LLAMA4, "Qwen2VLForConditionalGeneration": QWEN2,
              "Qwen2_5_VLForConditionalGeneration": QWEN2, "Qwen3VLForConditionalGeneration": QWEN3,
              "Exaone4_5_ForConditionalGeneration": EXAONE4}
"""Image-text checkpoints read as their text model (the vision tower left out)."""
_MODEL_TYPES = {"gpt2": GPT2, "llama": LLAMA, "mistral": MISTRAL, "qwen2": QWEN2, "qwen3": QWEN3, "gemma": GEMMA,
                "gemma2": GEMMA2, "gemma3_text": GEMMA3, "phi3": PHI3, "gemma3": GEMMA3_IMAGE_TEXT, "olmo2": OLMO2,
                "olmo3": OLMO3, "mixtral": MIXTRAL, "gpt_oss": GPT_OSS,
                "qwen3_moe": QWEN3_MOE, "smollm3": SMOLLM3, "granite": GRANITE,
                "qwen2_moe": QWEN2_MOE, "olmoe": OLMOE, "seed_oss": SEED_OSS,
                "exaone4": EXAONE4, "glm4": GLM4, "glm4_moe": GLM4_MOE, "deepseek_v2": DEEPSEEK_V2,
                "deepseek_v3": DEEPSEEK_V3, "glm4_moe_lite": GLM4_MOE_LITE, "minimax_m2": MINIMAX_M2,
                "qwen3_5_text": QWEN3_5, "qwen3_5": "Qwen3_5ForConditionalGeneration", "qwen3_5_moe_text": QWEN3_5_MOE,
                "qwen3_5_moe": "Qwen3_5MoeForConditionalGeneration", "qwen3_next": QWEN3_NEXT, "gemma4_text": GEMMA4,
                "gemma4": "Gemma4ForConditionalGeneration", "ernie4_5": ERNIE4_5, "ernie4_5_moe": ERNIE4_5_MOE,
                "hunyuan_v1_dense": HUNYUAN, "hunyuan_v1_moe": HUNYUAN_MOE, "cohere": COHERE, "cohere2": COHERE2,
                "lfm2": LFM2, "lfm2_moe": LFM2_MOE, "granitemoe": GRANITE_MOE,
                "granitemoeshared": GRANITE_MOE_SHARED, "granitemoehybrid": GRANITE_HYBRID, "nemotron_h": NEMOTRON_H,
                "bamba": BAMBA, "mamba2": MAMBA2, "mamba": MAMBA, "falcon_mamba": FALCON_MAMBA,
                "jamba": JAMBA, "starcoder2": STARCODER2, "gpt_neox": GPT_NEOX,
                "arcee": ARCEE, "nanochat": NANOCHAT, "phi": PHI,
                "olmo": OLMO, "ministral3": MINISTRAL3, "stablelm": STABLELM,
                "mistral3": "Mistral3ForConditionalGeneration", "llama4_text": LLAMA4, "falcon": FALCON, "gptj": GPTJ,
                "gpt_bigcode": GPT_BIGCODE, "glm": GLM1, "qwen2_vl": "Qwen2VLForConditionalGeneration",
                "qwen2_5_vl": "Qwen2_5_VLForConditionalGeneration", "qwen3_vl": "Qwen3VLForConditionalGeneration",
                "helium": HELIUM, "jais2": JAIS2, "dots1": DOTS1, "mistral4": MISTRAL4, "youtu": YOUTU,
                "flex_olmo": FLEX_OLMO, "ministral": MINISTRAL, "vaultgemma": VAULTGEMMA, "exaone_moe": EXAONE_MOE,
                "apertus": APERTUS, "granite_swa": GRANITE_SWA, "hyperclovax": HYPERCLOVAX, "solar_open": SOLAR_OPEN,
                "cwm": CWM, "nemotron": NEMOTRON, "dbrx": DBRX, "granitemoe_swa": GRANITE_MOE_SWA,
                "exaone": "ExaoneForCausalLM",
                "internlm3": "InternLM3ForCausalLM",
                "iquestcoder": "IQuestCoderForCausalLM", "exaone4_5": "Exaone4_5_ForConditionalGeneration",
                "llama4": "Llama4ForConditionalGeneration"}


def hf_mlp(arch: str) -> str:
    """The name of a decoder layer's MLP (or mixture) module in transformers' models of the architecture (what PEFT's
    keys and an in-memory state dict name; Mixtral's checkpoints keep their older block_sparse_moe; the Granite
    mixtures' is their block_sparse_moe, their dense MLP the shared_mlp beside it)."""
    return ("feed_forward" if arch in (*LFM2S, BAMBA, JAMBA, LLAMA4) else "block_sparse_moe" if arch in GRANITE_MOES
            else "mlp")


# transformers' Gemma3TextConfig defaults: the text_config of a Gemma 3 image-text checkpoint gives only what differs.
_GEMMA3_TEXT_DEFAULTS = {
    "vocab_size": 262208, "hidden_size": 2304, "intermediate_size": 9216, "num_hidden_layers": 26,
    "num_attention_heads": 8, "num_key_value_heads": 4, "head_dim": 256, "hidden_activation": "gelu_pytorch_tanh",
    "max_position_embeddings": 131072, "rms_norm_eps": 1e-6, "rope_theta": 1e6, "rope_local_base_freq": 1e4,
    "query_pre_attn_scalar": 256, "sliding_window": 4096, "sliding_window_pattern": 6,
}
# transformers' Gemma4TextConfig defaults of what a config may leave out (its per-layer embeddings on: 256 wide).
_GEMMA4_TEXT_DEFAULTS = {
    "vocab_size": 262144, "hidden_size": 2304, "intermediate_size": 9216, "num_hidden_layers": 30,
    "num_attention_heads": 8, "num_key_value_heads": 4, "head_dim": 256, "global_head_dim": 512,
    "hidden_activation": "gelu_pytorch_tanh", "max_position_embeddings": 131072, "rms_norm_eps": 1e-6,
    "tie_word_embeddings": True, "sliding_window": 512, "hidden_size_per_layer_input": 256,
    "vocab_size_per_layer_input": 262144,
    "rope_parameters": {"sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                        "full_attention": {"rope_type": "proportional", "partial_rotary_factor": 0.25,
                                           "rope_theta": 1000000.0}},
}


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
                     "num_experts", "moe_intermediate_size", "decoder_sparse_step",
                     "original_max_position_embeddings", "shared_expert_intermediate_size", "n_routed_experts",
                     "n_shared_experts", "first_k_dense_replace",
                     "kv_lora_rank", "qk_rope_head_dim", "qk_nope_head_dim",
                     "moe_layer_freq", "full_attention_interval", "linear_conv_kernel_dim", "linear_key_head_dim",
                     "linear_value_head_dim", "linear_num_key_heads", "linear_num_value_heads"), _INT),
    **dict.fromkeys(("moe_num_experts", "moe_k", "moe_num_shared_experts", "moe_layer_start_index",
                     "moe_layer_end_index", "moe_layer_interval", "num_mtp_layers", "num_nextn_predict_layers"),
                    (*_INT, type(None))),
    "moe_norm_min": (*_FLOAT, type(None)), "use_bias": (bool, type(None)), "moe_topk": (*_INT, list),
    **dict.fromkeys(("q_lora_rank", "v_head_dim"), (*_INT, type(None))),
    # DeepseekV2Config leaves these null (its defaults: n_group 1, topk_group 1; num_experts_per_tok needed)
    **dict.fromkeys(("num_experts_per_tok", "n_group", "topk_group"), (*_INT, type(None))),
    "topk_method": (*_STR, type(None)), "scoring_func": _STR, "norm_topk_prob": (bool, type(None)),
    "qk_norm_type": _STR, "rotary_dim": (*_INT, type(None)),
    **dict.fromkeys(("router_aux_loss_coef", "router_jitter_noise", "embedding_multiplier", "residual_multiplier",
                     "attention_multiplier", "logits_scaling", "routed_scaling_factor", "logit_scale",
                     "layer_norm_eps"), _FLOAT),
    "mlp_only_layers": (list, type(None)), "mlp_layer_types": (list, type(None)), "clip_qkv": (*_FLOAT, type(None)),
    "no_rope_layers": (list, type(None)),
    "no_rope_layer_interval": _INT,
    **dict.fromkeys(("intermediate_size_mlp", "interleave_moe_layer_step", "floor_scale"), _INT),
    "moe_layers": (list, type(None)), "attention_chunk_size": (*_INT, type(None)), "attn_scale": _FLOAT,
    "attn_temperature_tuning": (bool, int),  # (Llama 4 Scout's config writes 4)
    **dict.fromkeys(("num_kv_heads", "num_ln_in_parallel_attn", "ffn_hidden_size", "n_embed"), (*_INT, type(None))),
    **dict.fromkeys(("alibi", "new_decoder_architecture", "multi_query", "parallel_attn", "bias",
                     "apply_residual_connection_post_layernorm"), (bool, type(None))),
    "activation": (*_STR, type(None)), "layer_norm_epsilon": (*_FLOAT, type(None)),
    **dict.fromkeys(("conv_L_cache", "block_multiple_of", "block_ff_dim", "num_dense_layers"), _INT),
    **dict.fromkeys(("shared_intermediate_size", "mamba_n_heads", "mamba_n_groups", "mamba_d_state", "mamba_d_conv",
                     "mamba_expand", "mamba_chunk_size"), _INT),
    "mamba_d_head": (*_INT, *_STR), **dict.fromkeys(("mamba_conv_bias", "mamba_proj_bias"), _BOOL),
    "position_embedding_type": (*_STR, type(None)), "layers_block_type": (list, type(None)),
    "time_step_limit": (list, type(None)), "mamba_dt_limit": (list, type(None)),
    "time_step_rank": (*_INT, *_STR), "mixer_rms_eps": _FLOAT, "mamba_dt_rank": (*_INT, *_STR),
    "rotary_pct": _FLOAT, "rotary_emb_base": _FLOAT, "use_parallel_residual": _BOOL,
    **dict.fromkeys(("attn_layer_period", "attn_layer_offset", "expert_layer_period", "expert_layer_offset"), _INT),
    **dict.fromkeys(("mamba_num_heads", "mamba_head_dim", "ssm_state_size", "n_groups", "conv_kernel", "chunk_size",
                     "expand", "num_heads", "state_size"), _INT),
    **dict.fromkeys(("use_conv_bias", "residual_in_fp32"), _BOOL),
    **dict.fromkeys(("moe_shared_expert_intermediate_size", "n_shared_experts"), _INT),
    "moe_latent_size": (*_INT, type(None)),
    **dict.fromkeys(("hybrid_override_pattern", "mlp_hidden_act", "mamba_hidden_act"), _STR),
    **dict.fromkeys(("conv_bias", "block_auto_adjust_ff_dim", "tie_embedding", "use_expert_bias"), _BOOL),
    "norm_eps": _FLOAT, "block_ffn_dim_multiplier": (*_FLOAT, type(None)), "full_attn_idxs": (list, type(None)),
    **dict.fromkeys(("n_inner", "head_dim", "num_key_value_heads", "sliding_window"), (*_INT, type(None))),
    **dict.fromkeys(("layer_norm_epsilon", "rms_norm_eps", "initializer_range", "partial_rotary_factor",
                     "rope_local_base_freq"), _FLOAT),
    "query_pre_attn_scalar": _INT,
    **dict.fromkeys(("final_logit_softcapping", "attn_logit_softcapping"), (*_FLOAT, type(None))),
    "sliding_window_pattern": (*_INT, *_STR),
    "layer_types": (list, type(None)),
    "use_bidirectional_attention": (bool, str, type(None)),  # Gemma 4: "vision" or "all"
    **dict.fromkeys(("global_head_dim", "num_kv_shared_layers"), _INT),
    "top_k_experts": (*_INT, type(None)),
    **dict.fromkeys(("num_global_key_value_heads", "hidden_size_per_layer_input"), (*_INT, type(None))),
    **dict.fromkeys(("attention_k_eq_v", "enable_moe_block", "use_double_wide_mlp"), _BOOL),
    "attn_layer_indices": (list, type(None)), "z_loss_coefficient": (*_FLOAT, type(None)),
    "rope_theta": (*_FLOAT, type(None)),
    **dict.fromkeys(("tie_word_embeddings", "attention_bias", "mlp_bias", "use_sliding_window", "scale_attn_weights",
                     "scale_attn_by_inverse_layer_idx", "output_router_logits", "use_qk_norm",
                     "rope_interleave"), _BOOL),
    **dict.fromkeys(("activation_function", "hidden_act", "model_type"), _STR),
    "hidden_activation": (*_STR, type(None)),
    "architectures": (list, type(None)),
    **dict.fromkeys(("rope_scaling", "rope_parameters", "per_layer_config"), (dict, type(None))),
}
_ROPE_FIELD_TYPES: dict[str, tuple[type, ...]] = {
    "rope_type": _STR, "type": _STR, "low_freq_factor": _FLOAT, "high_freq_factor": _FLOAT,
    "original_max_position_embeddings": _INT, "rope_theta": _FLOAT, "partial_rotary_factor": _FLOAT,
    **dict.fromkeys(("factor", "attention_factor", "beta_fast", "beta_slow", "mscale", "mscale_all_dim"),
                    (*_FLOAT, type(None))),  # YaRN's (a null factor: DeepSeek-V3's ratio of lengths)
    "truncate": _BOOL, "short_factor": (list,), "long_factor": (list,),  # LongRoPE's
    "llama_4_scaling_beta": _FLOAT,  # Ministral 3's query temperature
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
    if _architecture(d) == GEMMA4:  # Gemma4TextConfig writes its experts' keys null where it has none
        d = {k: v for k, v in d.items() if v is not None or k not in ("num_experts", "moe_intermediate_size",
                                                                        "top_k_experts")}
    _check_types(d, _FIELD_TYPES)
    if not all(isinstance(a, str) for a in d.get("architectures") or []):
        raise ValueError(f"key 'architectures' must be a list of strings, got {d['architectures']!r}")
    if _architecture(d) in _AS_LLAMA:  # Llama under other names: read (and written) as the Llama it is
        return from_hf_config(_as_llama(d, _architecture(d)))
    if _architecture(d) in IMAGE_TEXT:  # its text model, as a *ForCausalLM (the vision tower is left out)
        arch = IMAGE_TEXT[_architecture(d)]
        # (Qwen2-VL's and Qwen2.5-VL's published configs keep their text model's keys at the top)
        text = d.get("text_config") or ({k: v for k, v in d.items() if k != "vision_config"} if arch in (QWEN2, QWEN3)
                                        else {})
        if not isinstance(text, dict):
            raise ValueError(f"key 'text_config' must be an object, got {text!r}")
        if arch == MINISTRAL3:  # by its text model: Ministral 3's, Mistral Small 4's, else Mistral's (Mistral3Config's
            # default: Mistral Small 3.1's)
            arch = {"ministral3": MINISTRAL3, "mistral4": MISTRAL4}.get(text.get("model_type", "mistral"), MISTRAL)
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
    readers = {GPT_NEOX: _gpt_neox, **{name: read for name, (read, _) in _READ_APART.items()}}  # apart from Llama's
    return readers[arch](d) if arch in readers else _from_llama_like(d, arch)


def _query_scale_beta(rope: dict[str, Any], scaling: dict | None) -> float:
    """Ministral 3's temperature of the queries (rope_parameters' llama_4_scaling_beta), which it takes past its RoPE
    scaling's original length: a config without either makes transformers' Ministral3 fail, and is refused here."""
    if rope.get("llama_4_scaling_beta") is None or "original_max_position_embeddings" not in (scaling or {}):
        raise ValueError(f"Ministral3 rope_parameters={rope!r} is not supported (temper reads a scaled RoPE, YaRN's, "
                         "with its llama_4_scaling_beta)")
    return float(rope["llama_4_scaling_beta"])


_MISTRAL4_DEFAULTS = {"vocab_size": 131072, "hidden_size": 4096, "intermediate_size": 12288, "num_hidden_layers": 36,
                      "num_attention_heads": 32, "max_position_embeddings": 1048576, "rms_norm_eps": 1e-6,
                      "kv_lora_rank": 256, "tie_word_embeddings": False}
"""Mistral4Config's defaults of what a config may leave out (Mistral Small 4's shape; its experts':
`_DEEPSEEK_MOE_DEFAULTS`, its attention's: `_LATENT_DEFAULTS`)."""
_MISTRAL4_ROPE = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 128.0, "original_max_position_embeddings": 8192,
                  "beta_fast": 32.0, "beta_slow": 1.0, "mscale_all_dim": 1.0, "mscale": 1.0, "llama_4_scaling_beta": 0.1}
"""Mistral4Config's RoPE where a config gives none."""

_MINISTRAL3_ROPE = {"rope_type": "yarn", "rope_theta": 1000000.0, "factor": 16.0,
                    "original_max_position_embeddings": 16384, "beta_fast": 32.0, "beta_slow": 1.0,
                    "mscale_all_dim": 1.0, "mscale": 1.0, "llama_4_scaling_beta": 0.1}
"""Ministral3Config's RoPE where a config gives none."""

_GPT_NEOX_DEFAULTS = {"vocab_size": 50432, "hidden_size": 6144, "num_hidden_layers": 44, "num_attention_heads": 64,
                      "intermediate_size": 24576, "hidden_act": "gelu", "max_position_embeddings": 2048,
                      "layer_norm_eps": 1e-5, "use_parallel_residual": True, "attention_bias": True,
                      "tie_word_embeddings": False, "rotary_pct": 0.25, "rotary_emb_base": 10000}
"""GPTNeoXConfig's defaults of what a config may leave out (GPT-NeoX-20B's shape)."""


def _gpt_neox(d: dict[str, Any]) -> ModelConfig:
    """GPT-NeoX (EleutherAI's GPT-NeoX-20B, Pythia): LayerNorms and a GELU MLP with biases everywhere (exact GELU,
    "gelu"; its tanh approximation, "gelu_new" or "gelu_fast", GPT-NeoX-20B's), RoPE on the first rotary_pct of each
    head, attention and the MLP side by side on two norms of the block's input (use_parallel_residual), or one after the
    other."""
    d = {**_GPT_NEOX_DEFAULTS, **d}
    act = d["hidden_act"]
    if act not in ("gelu", "gelu_new", "gelu_fast", "gelu_pytorch_tanh"):
        raise ValueError(f"GPTNeoX hidden_act {act!r} is not supported (temper reads GELU, exact or tanh's)")
    if not d["attention_bias"]:
        raise ValueError("GPTNeoX attention_bias=false is not supported (its MLP and LayerNorms keep their biases; "
                         "temper's `bias` covers every layer)")
    theta, scaling, rope = _rope(d, default_theta=d["rotary_emb_base"])
    partial = rope.get("partial_rotary_factor", d["rotary_pct"])
    dim, n_heads = d["hidden_size"], d["num_attention_heads"]
    head_dim = dim // n_heads if n_heads > 0 else 0
    rope_dim = int(head_dim * partial)  # as transformers rounds
    if not (0 < partial <= 1 and rope_dim > 0 and rope_dim % 2 == 0):
        raise ValueError(f"GPTNeoX rotary_pct={partial} is not supported (a share of the {head_dim}-wide heads that "
                         "rotates an even number of dims)")
    parallel = bool(d["use_parallel_residual"])
    return ModelConfig(
        vocab_size=d["vocab_size"], dim=dim, n_layers=d["num_hidden_layers"], n_heads=n_heads,
        ffn_dim=d["intermediate_size"], max_seq_len=d["max_position_embeddings"], mlp="gelu",
        gelu_exact=act == "gelu", norm="layernorm", norm_eps=d["layer_norm_eps"], pos="rope", rope_theta=float(theta),
        rope_scaling=scaling, rope_dim=None if rope_dim == head_dim else rope_dim, bias=True,
        tie_embeddings=d["tie_word_embeddings"], parallel_block=parallel, parallel_mlp_norm=parallel, dropout=0.0,
        init_std=d.get("initializer_range", 0.02), hf_architecture=GPT_NEOX)


_LLAMA4_DEFAULTS = {"vocab_size": 202048, "hidden_size": 5120, "intermediate_size": 8192,
                    "intermediate_size_mlp": 16384, "num_hidden_layers": 48, "num_attention_heads": 40,
                    "num_key_value_heads": 8, "head_dim": 128, "hidden_act": "silu", "max_position_embeddings": 131072,
                    "rms_norm_eps": 1e-5,
                    "tie_word_embeddings": False, "num_experts_per_tok": 1, "num_local_experts": 16,
                    "interleave_moe_layer_step": 1, "use_qk_norm": True, "no_rope_layer_interval": 4,
                    "attention_chunk_size": 8192, "attn_temperature_tuning": True, "floor_scale": 8192,
                    "attn_scale": 0.1}
"""Llama4TextConfig's defaults of what a config may leave out (Llama 4 Scout's shape)."""


def _llama4(d: dict[str, Any]) -> ModelConfig:
    """Llama 4's text model (Scout, Maverick): Llama's blocks with RoPE in adjacent pairs (moved to halves on loading,
    `rope_pair_rows`), in float32, a layer without positions after every three (no_rope_layers), whose queries take a
    temperature (attn_temperature_tuning: `nope_query_scale`), the others attending within chunks of
    attention_chunk_size tokens (`window_chunked`) with their rotated queries and keys normalised without weights
    (use_qk_norm); MLPs dense
    (intermediate_size_mlp wide) or, in moe_layers (every interleave_moe_layer_step-th), num_local_experts of
    intermediate_size chosen by the top k of their sigmoid scores (of logits in the model's dtype), each weighing its
    input, beside a shared expert of that width."""
    d = {**_LLAMA4_DEFAULTS, **d}
    if d["hidden_act"] != "silu":
        raise ValueError(f"Llama4 hidden_act {d['hidden_act']!r} is not supported (temper uses SwiGLU)")
    for key in ("attention_bias", "router_jitter_noise"):
        if d.get(key):
            raise ValueError(f"Llama4 {key}={d[key]} is not supported (temper's `bias` covers every layer; its router "
                             "takes its input as it is)")
    n, step, experts, k = (d["num_hidden_layers"], d["interleave_moe_layer_step"], d["num_local_experts"],
                           d["num_experts_per_tok"])
    moe = d.get("moe_layers")
    if moe is None and step < 1:
        raise ValueError(f"Llama4 interleave_moe_layer_step={step} is not supported (a positive step)")
    moe = list(range(step - 1, n, step)) if moe is None else moe
    if not (isinstance(moe, list) and moe == sorted(set(moe)) and all(_is_int(i) and 0 <= i < n for i in moe)):
        raise ValueError(f"Llama4 moe_layers={moe!r} is not supported (layers of the {n}, once each, in order)")
    if moe and not (_is_int(experts) and _is_int(k) and 1 <= k <= experts):
        raise ValueError(f"Llama4 num_local_experts={experts!r} with num_experts_per_tok={k!r} is not supported (k "
                         "between 1 and the experts)")
    nope_every = _nope_layers(d, "Llama4")
    chunk = d["attention_chunk_size"]
    if chunk is not None and chunk <= 0:
        raise ValueError(f"Llama4 attention_chunk_size={chunk} is not supported (a positive number of tokens, or null)")
    chunked = chunk is not None and nope_every != 1  # (every layer without positions: none attends in chunks)
    types = ["full_attention" if chunk is None or last_of_every(i, nope_every) else "chunked_attention"
             for i in range(n)]
    if d.get("layer_types") not in (None, types):
        raise ValueError(f"Llama4 layer_types {d['layer_types']!r} are not supported (temper chunks the layers with "
                         f"RoPE: {types!r})")
    theta, scaling, _ = _rope(d, default_theta=500000.0)
    mixture = {"n_experts": experts, "experts_per_token": k, "expert_ffn_dim": d["intermediate_size"],
               "shared_expert_ffn_dim": d["intermediate_size"], "router_scores": "sigmoid", "router_rounded": True,
               "renormalize_experts": False, "expert_input_weights": True,
               "expert_layers": None if len(moe) == n else tuple(moe)} if moe else {}
    dim, n_heads, head_dim = _heads(d, "Llama4")
    tuned = bool(d["attn_temperature_tuning"]) and nope_every is not None
    if tuned and d["floor_scale"] <= 0:
        raise ValueError(f"Llama4 floor_scale={d['floor_scale']} is not supported (a positive number of positions)")
    return ModelConfig(
        vocab_size=d["vocab_size"], dim=dim, n_layers=n, n_heads=n_heads,
        head_size=None if head_dim * n_heads == dim else head_dim, n_kv_heads=d.get("num_key_value_heads") or n_heads,
        ffn_dim=d["intermediate_size_mlp"], max_seq_len=d["max_position_embeddings"], mlp="swiglu", norm="rmsnorm",
        norm_eps=d["rms_norm_eps"], pos="rope", rope_theta=float(theta), rope_scaling=scaling, rope_float32=True,
        sliding_window=chunk if chunked else None, window_chunked=chunked,
        global_every=nope_every if chunked else None, nope_every=nope_every, qk_l2_norm=bool(d["use_qk_norm"]),
        nope_query_scale=float(d["attn_scale"]) if tuned else None,
        nope_query_floor=d["floor_scale"] if tuned else 8192, bias=False, tie_embeddings=d["tie_word_embeddings"],
        dropout=0.0, init_std=d.get("initializer_range", 0.02), hf_architecture=LLAMA4, **mixture)


def _llama4_config(cfg: ModelConfig) -> dict[str, Any]:
    """The Llama4TextConfig of `cfg`: its layers without positions, chunked ones and mixtures named one by one."""
    n = cfg.n_layers
    return {
        "architectures": [LLAMA4], "model_type": "llama4_text", **_llama_shape(cfg),
        "intermediate_size": cfg.expert_hidden_dim if cfg.n_experts else cfg.hidden_dim,
        "intermediate_size_mlp": cfg.hidden_dim, "hidden_act": "silu", "rms_norm_eps": cfg.norm_eps,
        "attention_bias": False, "num_local_experts": cfg.n_experts or 1, "num_experts_per_tok": cfg.experts_per_token,
        "moe_layers": [i for i in range(n) if cfg.has_experts(i)], "interleave_moe_layer_step": 1,
        "router_jitter_noise": 0.0, "output_router_logits": False, "router_aux_loss_coef": 0.0,
        "use_qk_norm": cfg.qk_l2_norm, "no_rope_layers": [int(not last_of_every(i, cfg.nope_every)) for i in range(n)],
        "no_rope_layer_interval": cfg.nope_every or n + 1, "attention_chunk_size": cfg.sliding_window,
        "layer_types": ["chunked_attention" if cfg.window_of(i) else "full_attention" for i in range(n)],
        "attn_temperature_tuning": cfg.nope_query_scale is not None, "floor_scale": cfg.nope_query_floor,
        "attn_scale": cfg.nope_query_scale if cfg.nope_query_scale is not None else 0.1,
    }


_FALCON_DEFAULTS = {"vocab_size": 65024, "hidden_size": 4544, "num_hidden_layers": 32, "num_attention_heads": 71,
                    "layer_norm_epsilon": 1e-5, "max_position_embeddings": 2048, "multi_query": True,
                    "parallel_attn": True, "new_decoder_architecture": False, "bias": False, "activation": "gelu",
                    "tie_word_embeddings": True}
"""FalconConfig's defaults of what a config may leave out (Falcon-7B's shape)."""


def _falcon(d: dict[str, Any]) -> ModelConfig:
    """Falcon (TII's Falcon-7B, 40B, 180B, Falcon 2): LayerNorms with biases, linear layers with or without them
    (bias), a GELU MLP (exact, "gelu"; its tanh approximation), RoPE over whole heads; attention beside the MLP on one
    norm (parallel_attn; Falcon-7B), on two (new_decoder_architecture, num_ln_in_parallel_attn 2: 40B, 180B) or one
    after the other; one kv head (multi_query), as many as heads, or num_kv_heads (the new architecture). Its q, k and
    v are fused kv group by kv group (`group_rows`), which covers all three."""
    d = _filled(d, _FALCON_DEFAULTS)
    if d.get("n_embed") is not None:  # FalconConfig's older spelling of hidden_size
        d["hidden_size"] = d["n_embed"]
    for key in ("alibi", "apply_residual_connection_post_layernorm"):
        if d.get(key):
            raise ValueError(f"Falcon {key}=true is not supported (temper reads Falcon's RoPE models with pre-norm "
                             "residuals)")
    act = d["activation"]
    if act not in ("gelu", "gelu_new", "gelu_pytorch_tanh", "gelu_fast"):
        raise ValueError(f"Falcon activation {act!r} is not supported (temper reads GELU, exact or tanh's)")
    dim, n_heads, new = d["hidden_size"], d["num_attention_heads"], bool(d["new_decoder_architecture"])
    kv = (d.get("num_kv_heads") or n_heads) if new else 1 if d["multi_query"] else n_heads
    norms = (d.get("num_ln_in_parallel_attn") or 2) if new else 1
    if not (n_heads > 0 and dim % n_heads == 0 and kv > 0 and n_heads % kv == 0 and norms in (1, 2)):
        raise ValueError(f"Falcon num_attention_heads={n_heads}, num_kv_heads={kv}, num_ln_in_parallel_attn={norms} "
                         f"are not supported (heads dividing hidden_size={dim}, kv heads dividing them, 1 or 2 norms)")
    parallel = new or bool(d["parallel_attn"])
    theta, scaling, _ = _rope(d)
    bias = bool(d["bias"])
    return ModelConfig(
        vocab_size=d["vocab_size"], dim=dim, n_layers=d["num_hidden_layers"], n_heads=n_heads, n_kv_heads=kv,
        ffn_dim=d.get("ffn_hidden_size") or 4 * dim, max_seq_len=d["max_position_embeddings"], mlp="gelu",
        gelu_exact=act == "gelu", norm="layernorm", norm_eps=d["layer_norm_epsilon"], norm_bias=None if bias else True,
        pos="rope", rope_theta=float(theta), rope_scaling=scaling, bias=bias, tie_embeddings=d["tie_word_embeddings"],
        parallel_block=parallel, parallel_mlp_norm=new and norms == 2, dropout=0.0,
        init_std=d.get("initializer_range", 0.02), hf_architecture=FALCON)


def _falcon_config(cfg: ModelConfig) -> dict[str, Any]:
    """The FalconConfig of `cfg`: Falcon-7B's layout (parallel_attn, multi_query) where it holds one, else the new
    architecture's (two norms, or grouped kv heads beside one), or attention then the MLP."""
    new = cfg.parallel_mlp_norm or cfg.parallel_block and 1 < cfg.kv_heads < cfg.n_heads
    return {
        "architectures": [FALCON], "model_type": "falcon", "vocab_size": cfg.vocab_size, "hidden_size": cfg.dim,
        "num_hidden_layers": cfg.n_layers, "num_attention_heads": cfg.n_heads, "num_kv_heads": cfg.kv_heads,
        "new_decoder_architecture": new, "multi_query": cfg.kv_heads == 1, "parallel_attn": cfg.parallel_block,
        "num_ln_in_parallel_attn": (2 if cfg.parallel_mlp_norm else 1) if new else None, "alibi": False,
        "bias": cfg.bias, "ffn_hidden_size": cfg.hidden_dim, "activation": "gelu" if cfg.gelu_exact else "gelu_new",
        "layer_norm_epsilon": cfg.norm_eps, "max_position_embeddings": cfg.max_seq_len, "rope_theta": cfg.rope_theta,
        "rope_scaling": dict(cfg.rope_scaling) if cfg.rope_scaling else None, "attention_dropout": cfg.dropout,
        "hidden_dropout": cfg.dropout, "initializer_range": cfg.init_std, "tie_word_embeddings": cfg.tie_embeddings,
        "bos_token_id": None, "eos_token_id": None, "pad_token_id": None, "use_cache": True,
    }


_GPTJ_DEFAULTS = {"vocab_size": 50400, "n_positions": 2048, "n_embd": 4096, "n_layer": 28, "n_head": 16,
                  "rotary_dim": 64, "activation_function": "gelu_new", "layer_norm_epsilon": 1e-5,
                  "tie_word_embeddings": False}
"""GPTJConfig's defaults of what a config may leave out (GPT-J-6B's shape)."""


def _gptj(d: dict[str, Any]) -> ModelConfig:
    """GPT-J (EleutherAI's GPT-J-6B; Wang and Komatsuzaki 2021): attention beside a tanh-GELU MLP on one LayerNorm,
    biases on the MLP, the LayerNorms and the head but not on attention (`attn_bias`), RoPE of base 10000 on the first
    rotary_dim dims of each head in adjacent pairs (moved to halves on loading, `rope_pair_rows`)."""
    d = _filled(d, _GPTJ_DEFAULTS)
    if d["activation_function"] not in ("gelu_new", "gelu_pytorch_tanh", "gelu_fast"):
        raise ValueError(f"GPTJ activation_function {d['activation_function']!r} is not supported (temper reads tanh "
                         "GELU)")
    if d["tie_word_embeddings"]:
        raise ValueError("GPTJ tie_word_embeddings=true is not supported (its head has a bias: temper's head_bias is "
                         "an untied head's)")
    dim, n_heads, rotary = d["n_embd"], d["n_head"], d["rotary_dim"]
    head_dim = dim // n_heads if n_heads > 0 else 0
    if not (n_heads > 0 and dim % n_heads == 0 and _is_int(rotary) and 0 < rotary <= head_dim and rotary % 2 == 0):
        raise ValueError(f"GPTJ n_head={n_heads} with rotary_dim={rotary} is not supported (heads dividing "
                         f"n_embd={dim}, an even number of each head's dims rotated)")
    return ModelConfig(
        vocab_size=d["vocab_size"], dim=dim, n_layers=d["n_layer"], n_heads=n_heads,
        ffn_dim=d.get("n_inner") or 4 * dim, max_seq_len=d["n_positions"], mlp="gelu", norm="layernorm",
        norm_eps=d["layer_norm_epsilon"], pos="rope", rope_dim=None if rotary == head_dim else rotary, bias=True,
        attn_bias=False, head_bias=True, tie_embeddings=False, parallel_block=True, dropout=0.0,
        init_std=d.get("initializer_range", 0.02), hf_architecture=GPTJ)


def _gptj_config(cfg: ModelConfig) -> dict[str, Any]:
    """The GPTJConfig of `cfg`."""
    return {"architectures": [GPTJ], "model_type": "gptj", "vocab_size": cfg.vocab_size, "n_positions": cfg.max_seq_len,
            "n_embd": cfg.dim, "n_layer": cfg.n_layers, "n_head": cfg.n_heads, "rotary_dim": cfg.rotary_dim,
            "n_inner": cfg.hidden_dim, "activation_function": "gelu_new", "layer_norm_epsilon": cfg.norm_eps,
            "resid_pdrop": cfg.dropout, "embd_pdrop": cfg.dropout, "attn_pdrop": cfg.dropout,
            "initializer_range": cfg.init_std, "tie_word_embeddings": False, "bos_token_id": None,
            "eos_token_id": None, "pad_token_id": None, "use_cache": True}


_GPT_BIGCODE_DEFAULTS = {"vocab_size": 50257, "n_positions": 1024, "n_embd": 768, "n_layer": 12, "n_head": 12,
                         "activation_function": "gelu_pytorch_tanh", "layer_norm_epsilon": 1e-5,
                         "scale_attn_weights": True, "multi_query": True, "tie_word_embeddings": True}
"""GPTBigCodeConfig's defaults of what a config may leave out."""


def _gpt_bigcode(d: dict[str, Any]) -> ModelConfig:
    """GPTBigCode (StarCoder, StarCoderBase, SantaCoder, WizardCoder, SQLCoder): GPT-2's blocks (learned positions,
    LayerNorms, a GELU MLP, biases everywhere) with one kv head (multi_query) or as many as heads, q, k and v fused in
    one linear layer (the queries, then the key and the value; without multi_query, head by head: `group_rows`)."""
    d = _filled(d, _GPT_BIGCODE_DEFAULTS)
    act = d["activation_function"]
    if act not in ("gelu_pytorch_tanh", "gelu_new", "gelu_fast", "gelu"):
        raise ValueError(f"GPTBigCode activation_function {act!r} is not supported (temper reads GELU, exact or "
                         "tanh's)")
    if not d["scale_attn_weights"] or d.get("add_cross_attention"):
        raise ValueError("GPTBigCode scale_attn_weights=false or add_cross_attention=true is not supported (temper's "
                         "attention scales by head_dim ** -0.5, a decoder's alone)")
    dim, n_heads = d["n_embd"], d["n_head"]
    if not (n_heads > 0 and dim % n_heads == 0):
        raise ValueError(f"GPTBigCode n_head={n_heads} is not supported (heads dividing n_embd={dim})")
    return ModelConfig(
        vocab_size=d["vocab_size"], dim=dim, n_layers=d["n_layer"], n_heads=n_heads,
        n_kv_heads=1 if d["multi_query"] else None, ffn_dim=d.get("n_inner") or 4 * dim, max_seq_len=d["n_positions"],
        mlp="gelu", gelu_exact=act == "gelu", norm="layernorm", norm_eps=d["layer_norm_epsilon"], pos="learned",
        bias=True, tie_embeddings=d["tie_word_embeddings"], dropout=0.0, init_std=d.get("initializer_range", 0.02),
        hf_architecture=GPT_BIGCODE)


def _gpt_bigcode_config(cfg: ModelConfig) -> dict[str, Any]:
    """The GPTBigCodeConfig of `cfg`."""
    return {"architectures": [GPT_BIGCODE], "model_type": "gpt_bigcode", "vocab_size": cfg.vocab_size,
            "n_positions": cfg.max_seq_len, "n_embd": cfg.dim, "n_layer": cfg.n_layers, "n_head": cfg.n_heads,
            "n_inner": cfg.hidden_dim, "multi_query": cfg.kv_heads == 1,
            "activation_function": "gelu" if cfg.gelu_exact else "gelu_pytorch_tanh",
            "layer_norm_epsilon": cfg.norm_eps, "scale_attn_weights": True, "attention_softmax_in_fp32": True,
            "scale_attention_softmax_in_fp32": True, "resid_pdrop": cfg.dropout, "embd_pdrop": cfg.dropout,
            "attn_pdrop": cfg.dropout, "initializer_range": cfg.init_std, "tie_word_embeddings": cfg.tie_embeddings,
            "bos_token_id": None, "eos_token_id": None, "pad_token_id": None, "use_cache": True}


_HELIUM_DEFAULTS = {"vocab_size": 48000, "hidden_size": 2560, "intermediate_size": 7040, "num_hidden_layers": 24,
                    "num_attention_heads": 20, "num_key_value_heads": 20, "head_dim": 128, "hidden_act": "silu",
                    "max_position_embeddings": 4096, "rms_norm_eps": 1e-8, "tie_word_embeddings": False}
"""HeliumConfig's defaults of what a config may leave out (Helium-1's shape)."""


def _helium(d: dict[str, Any]) -> ModelConfig:
    """Helium (Kyutai's Helium-1): Llama with RoPE in adjacent pairs (moved to halves on loading, `rope_pair_rows`),
    RMSNorms that scale in float32 before they round (`norm_cast_after`), biases on q, k and v at most
    (attention_bias; o_proj never has one)."""
    d = _filled(d, _HELIUM_DEFAULTS)
    if d["hidden_act"] != "silu" or d.get("mlp_bias"):
        raise ValueError(f"Helium hidden_act={d['hidden_act']!r}, mlp_bias={d.get('mlp_bias')} is not supported (temper "
                         "reads SwiGLU without MLP biases)")
    theta, scaling, _ = _rope(d, default_theta=100000.0)
    dim, n_heads, head_dim = _heads(d, "Helium")
    if head_dim * n_heads != dim:  # (its o_proj is hidden_size wide on both sides)
        raise ValueError(f"Helium head_dim={head_dim} is not supported (num_attention_heads={n_heads} heads of it must "
                         f"fill hidden_size={dim})")
    return ModelConfig(
        vocab_size=d["vocab_size"], dim=dim, n_layers=d["num_hidden_layers"], n_heads=n_heads,
        head_size=None if head_dim * n_heads == dim else head_dim, n_kv_heads=d.get("num_key_value_heads") or n_heads,
        ffn_dim=d["intermediate_size"], max_seq_len=d["max_position_embeddings"], mlp="swiglu", norm="rmsnorm",
        norm_eps=d["rms_norm_eps"], norm_cast_after=True, pos="rope", rope_theta=float(theta), rope_scaling=scaling,
        bias=False, qkv_bias=bool(d.get("attention_bias", False)), tie_embeddings=d["tie_word_embeddings"],
        dropout=0.0, init_std=d.get("initializer_range", 0.02), hf_architecture=HELIUM)


def _helium_config(cfg: ModelConfig) -> dict[str, Any]:
    """The HeliumConfig of `cfg`."""
    return {"architectures": [HELIUM], "model_type": "helium", **_llama_shape(cfg), "hidden_act": "silu",
            "rms_norm_eps": cfg.norm_eps, "attention_bias": cfg.qkv_bias, "mlp_bias": False}


_JAIS2_DEFAULTS = {"vocab_size": 150272, "hidden_size": 3328, "intermediate_size": 26624, "num_hidden_layers": 32,
                   "num_attention_heads": 26, "hidden_act": "relu2", "max_position_embeddings": 8192,
                   "attention_bias": True, "mlp_bias": True, "layer_norm_eps": 1e-5, "tie_word_embeddings": False}
"""Jais2Config's defaults of what a config may leave out (Jais-2-8B's shape)."""


def _squared_relu_layernorm(d: dict[str, Any], name: str, **fields: Any) -> ModelConfig:
    """Llama's attention with LayerNorms and a squared-ReLU MLP, not gated, biases on every linear layer but the
    head or on none (attention_bias and mlp_bias agree): what Jais 2 and Nemotron share; `fields`, their own."""
    if d["hidden_act"] != "relu2" or bool(d["attention_bias"]) != bool(d["mlp_bias"]):
        raise ValueError(f"{name} hidden_act={d['hidden_act']!r}, attention_bias={d['attention_bias']}, mlp_bias="
                         f"{d['mlp_bias']} is not supported (temper reads relu2, and one `bias` for every layer)")
    theta, scaling, _ = _rope(d)
    dim, n_heads, head_dim = _heads(d, name)
    bias = bool(d["attention_bias"])
    return ModelConfig(
        vocab_size=d["vocab_size"], dim=dim, n_layers=d["num_hidden_layers"], n_heads=n_heads,
        head_size=None if head_dim * n_heads == dim else head_dim, n_kv_heads=d.get("num_key_value_heads") or n_heads,
        ffn_dim=d["intermediate_size"], max_seq_len=d["max_position_embeddings"], mlp="relu2", norm="layernorm",
        norm_bias=None if bias else True, pos="rope", rope_theta=float(theta), rope_scaling=scaling, bias=bias,
        tie_embeddings=d["tie_word_embeddings"], dropout=0.0, **fields)


def _jais2(d: dict[str, Any]) -> ModelConfig:
    """Jais 2 (Inception's Jais-2): Llama's attention with LayerNorms (with biases, always) and Arcee's squared-ReLU
    MLP, not gated; biases on every linear layer but the head, or on none (attention_bias and mlp_bias agree)."""
    d = _filled(d, _JAIS2_DEFAULTS)
    return _squared_relu_layernorm(d, "Jais2", norm_eps=d["layer_norm_eps"], init_std=d.get("initializer_range", 0.02),
                                   hf_architecture=JAIS2)


def _jais2_config(cfg: ModelConfig) -> dict[str, Any]:
    """The Jais2Config of `cfg`."""
    return {"architectures": [JAIS2], "model_type": "jais2", **_llama_shape(cfg), "hidden_act": "relu2",
            "layer_norm_eps": cfg.norm_eps, "attention_bias": cfg.bias, "mlp_bias": cfg.bias}


_APERTUS_DEFAULTS = {"vocab_size": 131072, "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
                     "num_attention_heads": 32, "hidden_act": "xielu", "max_position_embeddings": 65536,
                     "rms_norm_eps": 1e-5, "attention_bias": False, "tie_word_embeddings": False,
                     "rope_parameters": {"rope_type": "llama3", "rope_theta": 12000000.0, "factor": 8.0,
                                         "original_max_position_embeddings": 8192, "low_freq_factor": 1.0,
                                         "high_freq_factor": 4.0}}
"""ApertusConfig's defaults of what a config may leave out (its RoPE: Llama 3.1's scaling of a 12M base)."""


def _apertus(d: dict[str, Any]) -> ModelConfig:
    """Apertus (Swiss AI's Apertus-8B and 70B): Llama's attention with Qwen3's q/k norms per head before RoPE, an MLP
    of xIELU (`XIELU`: learned scalars per layer), not gated, without biases; biases on q, k, v and o where
    attention_bias says (`attn_bias`)."""
    d = _filled(d, _APERTUS_DEFAULTS)  # (its RoPE too, where a config gives none: a rope_scaling is read first)
    if d["hidden_act"] != "xielu" or d.get("mlp_bias"):
        raise ValueError(f"Apertus hidden_act={d['hidden_act']!r}, mlp_bias={d.get('mlp_bias')} is not supported "
                         "(temper reads xIELU without MLP biases)")
    theta, scaling, _ = _rope(d, default_theta=12000000.0)
    dim, n_heads, head_dim = _heads(d, "Apertus")
    return ModelConfig(
        vocab_size=d["vocab_size"], dim=dim, n_layers=d["num_hidden_layers"], n_heads=n_heads,
        head_size=None if head_dim * n_heads == dim else head_dim, n_kv_heads=d.get("num_key_value_heads") or n_heads,
        ffn_dim=d["intermediate_size"], max_seq_len=d["max_position_embeddings"], mlp="xielu", norm="rmsnorm",
        norm_eps=d["rms_norm_eps"], qk_norm=True, pos="rope", rope_theta=float(theta), rope_scaling=scaling,
        bias=False, attn_bias=True if d["attention_bias"] else None, tie_embeddings=d["tie_word_embeddings"],
        dropout=0.0, init_std=d.get("initializer_range", 0.02), hf_architecture=APERTUS)


def _apertus_config(cfg: ModelConfig) -> dict[str, Any]:
    """The ApertusConfig of `cfg`: its RoPE as rope_parameters, which ApertusConfig would otherwise fill with its
    own scaling."""
    shape = {k: v for k, v in _llama_shape(cfg).items() if k not in ("rope_theta", "rope_scaling")}
    return {"architectures": [APERTUS], "model_type": "apertus", **shape, "hidden_act": "xielu",
            "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta, **(cfg.rope_scaling or {})},
            "rms_norm_eps": cfg.norm_eps, "attention_bias": bool(cfg.attn_bias)}


_GRANITE_SWA_DEFAULTS = {"vocab_size": 100352, "hidden_size": 2560, "intermediate_size": 8192, "num_hidden_layers": 24,
                         "num_attention_heads": 20, "num_key_value_heads": 4, "hidden_act": "silu",
                         "max_position_embeddings": 8192, "rms_norm_eps": 1e-5, "tie_word_embeddings": True,
                         "sliding_window": 128, "attention_bias": False, "mlp_bias": False}
"""GraniteSWAConfig's defaults of what a config may leave out."""


def _granite_swa(d: dict[str, Any]) -> ModelConfig:
    """Granite SWA: Granite's multipliers and layers, three windowed layers to one global (the first of every four,
    unless layer_types says otherwise), GPT-OSS's sink per head, and a RoPE base per layer (layer_rope_theta; 0: no
    positions). temper reads the bases one for the global layers (0 on them: `nope_every`), one for the windowed ones
    (`rope_local_theta`, which no RoPE scaling stretches)."""
    d = _filled(d, _GRANITE_SWA_DEFAULTS)
    if d["hidden_act"] != "silu" or bool(d["attention_bias"]) != bool(d["mlp_bias"]):
        raise ValueError(f"GraniteSWA hidden_act={d['hidden_act']!r}, attention_bias={d['attention_bias']}, mlp_bias="
                         f"{d['mlp_bias']} is not supported (temper reads SwiGLU, and one `bias` for every layer)")
    n = d["num_hidden_layers"]
    types = d.get("layer_types") or ["full_attention" if i % 4 == 0 else "sliding_attention" for i in range(n)]
    window, every, first = _window_layers(d | {"layer_types": types}, "GraniteSWA", None, first_ok=True)
    theta, scaling, _ = _rope(d)
    thetas = d.get("layer_rope_theta") or [theta] * n
    if not (isinstance(thetas, list) and len(thetas) == n
            and all((_is_int(t) or isinstance(t, float)) and t >= 0 for t in thetas)):
        raise ValueError(f"GraniteSWA key 'layer_rope_theta' must give each of the {n} layers a RoPE base (0: none), "
                         f"got {thetas!r}")
    full_bases, local_bases = ({float(t) for t, kind in zip(thetas, types, strict=True) if kind == k}
                               for k in ("full_attention", "sliding_attention"))
    full = full_bases.pop() if len(full_bases) == 1 else None
    local = local_bases.pop() if len(local_bases) == 1 else None
    nope = full == 0 and window is not None and every is not None  # the global layers
    if (full_bases or local_bases or local == 0 or (full == 0 and not nope)
            or (scaling and local not in (None, full))):  # (a set left non-empty held two bases or more)
        raise ValueError(f"GraniteSWA layer_rope_theta={thetas!r} is not supported (temper reads one base for the "
                         "global layers, or 0 on them, and one for the windowed ones, unscaled)")
    global_theta = (local if nope else full) or local
    dim, n_heads, head_dim = _heads(d, "GraniteSWA")
    scale_dim = _scale_dim(d.get("attention_multiplier", 1.0))
    return ModelConfig(
        vocab_size=d["vocab_size"], dim=dim, n_layers=n, n_heads=n_heads,
        head_size=None if head_dim * n_heads == dim else head_dim, n_kv_heads=d.get("num_key_value_heads") or n_heads,
        ffn_dim=d["intermediate_size"], max_seq_len=d["max_position_embeddings"], mlp="swiglu", norm="rmsnorm",
        norm_eps=d["rms_norm_eps"], pos="rope", rope_theta=global_theta, rope_scaling=scaling,
        rope_local_theta=local if every and not nope and local != full else None, nope_every=every if nope else None,
        sliding_window=window, global_every=every, global_first=first, attn_sinks=True,
        attn_scale_dim=None if scale_dim == head_dim else scale_dim, bias=bool(d["attention_bias"]),
        tie_embeddings=d["tie_word_embeddings"], dropout=0.0, init_std=d.get("initializer_range", 0.02),
        hf_architecture=GRANITE_SWA, **_multipliers(d))


_GRANITE_MOE_SWA_DEFAULTS = {"vocab_size": 32000, "hidden_size": 4096, "intermediate_size": 11008,
                             "num_hidden_layers": 32, "num_attention_heads": 32, "hidden_act": "silu",
                             "max_position_embeddings": 2048, "rms_norm_eps": 1e-6, "tie_word_embeddings": False,
                             "sliding_window": 128, "attention_bias": False, "num_local_experts": 8,
                             "num_experts_per_tok": 2, "shared_intermediate_size": 0}
"""GraniteMoeSWAConfig's defaults of what a config may leave out."""


def _granite_moe_swa(d: dict[str, Any]) -> ModelConfig:
    """Granite MoE SWA: Granite SWA's attention (`_granite_swa`) with GraniteMoeShared's experts beside an optional
    shared MLP (`_granite_moe`), in every layer; no biases (its experts have none)."""
    d = _filled(d, _GRANITE_MOE_SWA_DEFAULTS)
    if d["attention_bias"]:
        raise ValueError("GraniteMoeSWA attention_bias=true is not supported (its experts have no biases; temper's "
                         "`bias` covers every layer)")
    _, experts = _granite_moe(d, GRANITE_MOE_SHARED)
    kv_heads = d.get("num_key_value_heads") or d["num_attention_heads"]  # (not Granite SWA's default)
    return replace(_granite_swa(d | {"mlp_bias": False, "num_key_value_heads": kv_heads}), **experts,
                   hf_architecture=GRANITE_MOE_SWA)


def _granite_moe_swa_config(cfg: ModelConfig) -> dict[str, Any]:
    """The GraniteMoeSWAConfig of `cfg`."""
    d = {k: v for k, v in _granite_swa_config(cfg).items() if k != "mlp_bias"}
    return d | {"architectures": [GRANITE_MOE_SWA], "model_type": "granitemoe_swa", "num_local_experts": cfg.n_experts,
                "num_experts_per_tok": cfg.experts_per_token, "intermediate_size": cfg.expert_hidden_dim,
                "shared_intermediate_size": cfg.shared_expert_ffn_dim or 0, "output_router_logits": False}


def _granite_swa_config(cfg: ModelConfig) -> dict[str, Any]:
    """The GraniteSWAConfig of `cfg`: its layers' kinds and RoPE bases named one by one."""
    shape = {k: v for k, v in _llama_shape(cfg).items() if k not in ("rope_theta", "rope_scaling")}
    bases = [0.0 if cfg.is_nope(i) else cfg.rope_local_theta if cfg.window_of(i) and
             cfg.rope_local_theta else cfg.rope_theta for i in range(cfg.n_layers)]
    return {"architectures": [GRANITE_SWA], "model_type": "granite_swa", **shape, "hidden_act": "silu",
            "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta, **(cfg.rope_scaling or {})},
            "rms_norm_eps": cfg.norm_eps, "attention_bias": cfg.bias, "mlp_bias": cfg.bias,
            "embedding_multiplier": cfg.embed_multiplier or 1.0, "residual_multiplier": cfg.residual_multiplier or 1.0,
            "logits_scaling": cfg.logit_divisor or 1.0,
            "attention_multiplier": (cfg.attn_scale_dim or cfg.head_dim) ** -0.5,
            "sliding_window": cfg.sliding_window, "layer_types": _layer_types(cfg), "layer_rope_theta": bases}


_CWM_DEFAULTS = {"vocab_size": 128256, "hidden_size": 6144, "intermediate_size": 21504, "num_hidden_layers": 64,
                 "num_attention_heads": 48, "num_key_value_heads": 8, "head_dim": 128,
                 "max_position_embeddings": 131072, "rms_norm_eps": 1e-5, "sliding_window": 8192,
                 "tie_word_embeddings": False}
"""CwmConfig's defaults of what a config may leave out (Meta's Code World Model, CWM 32B)."""
_CWM_ROPE = {"rope_type": "llama3", "rope_theta": 1000000.0, "factor": 16.0, "high_freq_factor": 4.0,
             "low_freq_factor": 1.0, "original_max_position_embeddings": 8192}

_SOLAR_OPEN_DEFAULTS = {"vocab_size": 196608, "hidden_size": 4096, "num_hidden_layers": 48, "num_attention_heads": 64,
                        "num_key_value_heads": 8, "head_dim": 128, "max_position_embeddings": 131072,
                        "rms_norm_eps": 1e-5, "tie_word_embeddings": False}
"""SolarOpenConfig's defaults of what a config may leave out (Solar-Open-100B's shape)."""

_NEMOTRON_DEFAULTS = {"vocab_size": 256000, "hidden_size": 6144, "intermediate_size": 24576, "num_hidden_layers": 32,
                      "num_attention_heads": 48, "hidden_act": "relu2", "max_position_embeddings": 4096,
                      "norm_eps": 1e-5, "tie_word_embeddings": False, "attention_bias": False, "mlp_bias": False}
"""NemotronConfig's defaults of what a config may leave out (Nemotron-4 15B's shape)."""


def _nemotron(d: dict[str, Any]) -> ModelConfig:
    """Nemotron-4 and Minitron (`NemotronForCausalLM`): LayerNorms scaling by (1 + weight), with biases
    (LayerNorm1P: `norm_unit_offset`), a squared-ReLU MLP, not gated, half of each head rotated; biases on every linear
    layer or on none (attention_bias and mlp_bias agree)."""
    d = _filled(d, _NEMOTRON_DEFAULTS)
    _, _, rope = _rope(d)
    head_dim = _heads(d, "Nemotron")[2]
    partial = d.get("partial_rotary_factor", rope.get("partial_rotary_factor", 0.5))
    rope_dim = int(head_dim * partial)  # as transformers rounds it
    if not (0 < partial <= 1 and rope_dim % 2 == 0):
        raise ValueError(f"Nemotron partial_rotary_factor={partial} is not supported (a share of each head in (0, 1] "
                         "that rotates an even number of dims)")
    return _squared_relu_layernorm(d, "Nemotron", norm_unit_offset=True, norm_eps=d["norm_eps"],
                                   rope_dim=None if rope_dim == head_dim else rope_dim,
                                   init_std=d.get("initializer_range", 0.0134), hf_architecture=NEMOTRON)


def _nemotron_config(cfg: ModelConfig) -> dict[str, Any]:
    """The NemotronConfig of `cfg`: its share of each head rotated in its RoPE, written out."""
    shape = {k: v for k, v in _llama_shape(cfg).items() if k not in ("rope_theta", "rope_scaling")}
    partial = cfg.rotary_dim / cfg.head_dim
    return {"architectures": [NEMOTRON], "model_type": "nemotron", **shape, "hidden_act": "relu2",
            "norm_eps": cfg.norm_eps, "attention_bias": cfg.bias, "mlp_bias": cfg.bias,
            "partial_rotary_factor": partial,
            "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta, **(cfg.rope_scaling or {}),
                                "partial_rotary_factor": partial}}


def _dbrx(d: dict[str, Any]) -> ModelConfig:
    """DBRX (Databricks): LayerNorms without biases, q, k and v fused and clamped (clip_qkv: OLMo's `qkv_clip`), in
    every layer a mixture of SwiGLU experts chosen by a softmax router, the top k renormalised by their sum
    (moe_normalize_expert_weights=1, the L1 norm), their weights stacked in three (E * F, D) tensors. Its router's
    jitter (moe_jitter_eps) is noise on the router's input in training alone: not applied, and written back as none."""
    attn, ffn = d.get("attn_config") or {}, d.get("ffn_config") or {}
    if not (isinstance(attn, dict) and isinstance(ffn, dict)):
        raise ValueError("Dbrx attn_config and ffn_config must be objects")
    if d.get("tie_word_embeddings"):
        raise ValueError("Dbrx tie_word_embeddings=true is not supported (DbrxConfig refuses it)")
    act = (ffn.get("ffn_act_fn") or {"name": "silu"}).get("name", "silu")
    norm = ffn.get("moe_normalize_expert_weights", 1.0)
    if act != "silu" or norm not in (1, 1.0):
        raise ValueError(f"Dbrx ffn_act_fn={act!r}, moe_normalize_expert_weights={norm!r} is not supported (temper "
                         "reads SwiGLU experts, their top k renormalised by their sum: 1)")
    dim, n_heads = d.get("d_model", 2048), d.get("n_heads", 16)
    if n_heads <= 0 or dim % n_heads:
        raise ValueError(f"Dbrx n_heads={n_heads} must divide d_model={dim}")
    n, k, width = ffn.get("moe_num_experts", 4), ffn.get("moe_top_k", 1), ffn.get("ffn_hidden_size", 3584)
    if not (_is_int(n) and _is_int(k) and 1 <= k <= n):
        raise ValueError(f"Dbrx moe_num_experts={n!r}, moe_top_k={k!r} must be integers, 1 <= moe_top_k <= experts")
    rope = d.get("rope_parameters") or {}
    theta = rope.get("rope_theta") or attn.get("rope_theta") or 10000.0
    if rope.get("rope_type", "default") != "default":
        raise ValueError(f"Dbrx rope_parameters={rope!r} is not supported (temper reads DBRX's plain RoPE)")
    clip = attn.get("clip_qkv")
    return ModelConfig(
        vocab_size=d.get("vocab_size", 32000), dim=dim, n_layers=d.get("n_layers", 24), n_heads=n_heads,
        n_kv_heads=attn.get("kv_n_heads", 1), ffn_dim=width, max_seq_len=d.get("max_seq_len", 2048), mlp="swiglu",
        norm="layernorm", norm_eps=1e-5, pos="rope", rope_theta=float(theta), bias=False,
        qkv_clip=None if clip is None else float(clip), n_experts=n, experts_per_token=k, expert_ffn_dim=width,
        renormalize_experts=True, tie_embeddings=False, dropout=0.0,
        init_std=d.get("initializer_range", 0.02), hf_architecture=DBRX)


def _dbrx_config(cfg: ModelConfig) -> dict[str, Any]:
    """The DbrxConfig of `cfg`: its attention's and experts' settings in their own objects."""
    return {"architectures": [DBRX], "model_type": "dbrx", "vocab_size": cfg.vocab_size, "d_model": cfg.dim,
            "n_heads": cfg.n_heads, "n_layers": cfg.n_layers, "max_seq_len": cfg.max_seq_len,
            "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta},
            "attn_config": {"kv_n_heads": cfg.kv_heads, "clip_qkv": cfg.qkv_clip, "attn_pdrop": cfg.dropout,
                            "rope_theta": cfg.rope_theta},  # (as published; transformers' attention reads it too)
            "ffn_config": {"ffn_act_fn": {"name": "silu"}, "ffn_hidden_size": cfg.expert_hidden_dim,
                           "moe_num_experts": cfg.n_experts, "moe_top_k": cfg.experts_per_token,
                           "moe_jitter_eps": None, "moe_normalize_expert_weights": 1.0},
            "resid_pdrop": cfg.dropout, "emb_pdrop": cfg.dropout, "initializer_range": cfg.init_std,
            "tie_word_embeddings": cfg.tie_embeddings, "output_router_logits": False, "bos_token_id": None,
            "eos_token_id": None, "pad_token_id": None, "use_cache": True}


_HYPERCLOVAX_DEFAULTS = {"vocab_size": 32000, "hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32,
                         "num_attention_heads": 32, "hidden_act": "silu", "max_position_embeddings": 2048,
                         "rms_norm_eps": 1e-6, "tie_word_embeddings": False, "attention_bias": False, "mlp_bias": False,
                         "use_post_norm": True, "logits_scaling": 1.0}
"""HyperCLOVAXConfig's defaults of what a config may leave out (GraniteConfig's, and its own)."""


def _hyperclovax(d: dict[str, Any]) -> ModelConfig:
    """HyperCLOVA X (Naver's HyperCLOVAX-SEED): Granite's multipliers of the embeddings, the sublayers' outputs and the
    scores (muP), norms on the sublayers' outputs as well as their inputs (Peri-LN, use_post_norm: `sandwich_norm`),
    and the logits multiplied by logits_scaling, where Granite divides by it (temper divides by its reciprocal, as for
    Cohere's logit_scale)."""
    d = _filled(d, _HYPERCLOVAX_DEFAULTS)
    if d["hidden_act"] != "silu" or bool(d["attention_bias"]) != bool(d["mlp_bias"]):
        raise ValueError(f"HyperCLOVAX hidden_act={d['hidden_act']!r}, attention_bias={d['attention_bias']}, mlp_bias="
                         f"{d['mlp_bias']} is not supported (temper reads SwiGLU, and one `bias` for every layer)")
    scale = float(d["logits_scaling"])
    if not (scale > 0 and 1 / (1 / scale) == scale):
        raise ValueError(f"HyperCLOVAX logits_scaling={scale} is not supported (temper needs a positive scale that the "
                         "reciprocal of its reciprocal gives back)")
    theta, scaling, _ = _rope(d)
    dim, n_heads, head_dim = _heads(d, "HyperCLOVAX")
    scale_dim = _scale_dim(d.get("attention_multiplier") or head_dim ** -0.5)
    return ModelConfig(
        vocab_size=d["vocab_size"], dim=dim, n_layers=d["num_hidden_layers"], n_heads=n_heads,
        head_size=None if head_dim * n_heads == dim else head_dim, n_kv_heads=d.get("num_key_value_heads") or n_heads,
        ffn_dim=d["intermediate_size"], max_seq_len=d["max_position_embeddings"], mlp="swiglu", norm="rmsnorm",
        norm_eps=d["rms_norm_eps"], pos="rope", rope_theta=float(theta), rope_scaling=scaling,
        sandwich_norm=bool(d["use_post_norm"]), attn_scale_dim=None if scale_dim == head_dim else scale_dim,
        bias=bool(d["attention_bias"]), tie_embeddings=d["tie_word_embeddings"], dropout=0.0,
        init_std=d.get("initializer_range", 0.02), hf_architecture=HYPERCLOVAX,
        **_multipliers(d) | {"logit_divisor": None if scale == 1.0 else 1 / scale})


def _hyperclovax_config(cfg: ModelConfig) -> dict[str, Any]:
    """The HyperCLOVAXConfig of `cfg`."""
    shape = {k: v for k, v in _llama_shape(cfg).items() if k not in ("rope_theta", "rope_scaling")}
    return {"architectures": [HYPERCLOVAX], "model_type": "hyperclovax", **shape, "hidden_act": "silu",
            "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta, **(cfg.rope_scaling or {})},
            "rms_norm_eps": cfg.norm_eps, "attention_bias": cfg.bias, "mlp_bias": cfg.bias,
            "embedding_multiplier": cfg.embed_multiplier or 1.0, "residual_multiplier": cfg.residual_multiplier or 1.0,
            "logits_scaling": 1 / cfg.logit_divisor if cfg.logit_divisor else 1.0,
            "attention_multiplier": (cfg.attn_scale_dim or cfg.head_dim) ** -0.5, "use_post_norm": cfg.sandwich_norm}


_AS_LLAMA = {
    # EXAONE 3.0 and 3.5 (LG AI Research): its own names for the layers, the norms' epsilon and the activation
    "ExaoneForCausalLM": ({"num_layers": "num_hidden_layers", "layer_norm_epsilon": "rms_norm_eps",
                           "activation_function": "hidden_act"},
                          {"vocab_size": 102400, "hidden_size": 4096, "intermediate_size": 14336,
                           "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8,
                           "max_position_embeddings": 4096, "rms_norm_eps": 1e-5, "rope_theta": 500000.0,
                           "hidden_act": "silu"}),
    # InternLM3 (Shanghai AI Lab): its biases named qkv_bias and bias
    "InternLM3ForCausalLM": ({"qkv_bias": "attention_bias", "bias": "mlp_bias"},
                             {"vocab_size": 128512, "hidden_size": 4096, "intermediate_size": 10240,
                              "num_hidden_layers": 48, "num_attention_heads": 32, "num_key_value_heads": 2,
                              "head_dim": 128, "max_position_embeddings": 32768, "rms_norm_eps": 1e-5,
                              "hidden_act": "silu", "tie_word_embeddings": False}),
    # IQuest-Coder (IQuestLab): Llama itself, its config class's defaults its own
    "IQuestCoderForCausalLM": ({}, {"vocab_size": 76800, "hidden_size": 5120, "intermediate_size": 27648,
                                    "num_hidden_layers": 80, "num_attention_heads": 40, "num_key_value_heads": 8,
                                    "head_dim": 128, "max_position_embeddings": 131072, "rms_norm_eps": 1e-5,
                                    "hidden_act": "silu", "tie_word_embeddings": False}),
}
"""Architectures that are Llama under other names, as transformers 5 runs them (LlamaForCausalLM): their config keys
as Llama's, and their config classes' defaults of what a config may leave out. Their weights' names are read by
`canonical_name` (EXAONE 3's own; InternLM3's are Llama's)."""


def _as_llama(d: dict[str, Any], arch: str) -> dict[str, Any]:
    """The LlamaConfig that config `d` of `arch` (an `_AS_LLAMA` architecture) is."""
    keys, defaults = _AS_LLAMA[arch]
    both = sorted(k for k in keys if k in d and keys[k] in d)
    if both:
        raise ValueError(f"{arch.removesuffix('ForCausalLM')} config names {both[0]!r} and {keys[both[0]]!r} both")
    renamed = {keys.get(k, k): v for k, v in d.items() if v is not None}
    rope_given = renamed.get("rope_theta") or (renamed.get("rope_parameters") or {}).get("rope_theta")
    defaults = {k: v for k, v in defaults.items() if k != "rope_theta" or not rope_given}
    return {**defaults, **renamed, "architectures": [LLAMA], "model_type": "llama"}


def _filled(d: dict[str, Any], defaults: dict[str, Any]) -> dict[str, Any]:
    """Config `d` with `defaults` (its config class's) for the keys it leaves out or gives as null."""
    return {**defaults, **{k: v for k, v in d.items() if v is not None}}


def _heads(d: dict[str, Any], name: str) -> tuple[int, int, int]:
    """(hidden_size, num_attention_heads, the head width: head_dim, else hidden_size / heads) of a Llama-style config;
    no heads refused by the key, not by a division by zero."""
    dim, n_heads = d["hidden_size"], d["num_attention_heads"]
    if n_heads <= 0:
        raise ValueError(f"{name} num_attention_heads={n_heads} is not supported (a positive number of heads)")
    return dim, n_heads, d.get("head_dim") or dim // n_heads


def _llama_shape(cfg: ModelConfig) -> dict[str, Any]:
    """The keys Llama's config and its relatives name the shape, RoPE and training settings by."""
    return {"vocab_size": cfg.vocab_size, "hidden_size": cfg.dim, "intermediate_size": cfg.hidden_dim,
            "num_hidden_layers": cfg.n_layers, "num_attention_heads": cfg.n_heads, "num_key_value_heads": cfg.kv_heads,
            "head_dim": cfg.head_dim, "max_position_embeddings": cfg.max_seq_len, "rope_theta": cfg.rope_theta,
            "rope_scaling": dict(cfg.rope_scaling) if cfg.rope_scaling else None, "attention_dropout": cfg.dropout,
            "initializer_range": cfg.init_std, "tie_word_embeddings": cfg.tie_embeddings, "bos_token_id": None,
            "eos_token_id": None, "pad_token_id": None, "use_cache": True}


_READ_APART = {LLAMA4: (_llama4, _llama4_config), FALCON: (_falcon, _falcon_config), GPTJ: (_gptj, _gptj_config),
               GPT_BIGCODE: (_gpt_bigcode, _gpt_bigcode_config), HELIUM: (_helium, _helium_config),
               JAIS2: (_jais2, _jais2_config), APERTUS: (_apertus, _apertus_config),
               GRANITE_SWA: (_granite_swa, _granite_swa_config), HYPERCLOVAX: (_hyperclovax, _hyperclovax_config),
               NEMOTRON: (_nemotron, _nemotron_config), DBRX: (_dbrx, _dbrx_config),
               GRANITE_MOE_SWA: (_granite_moe_swa, _granite_moe_swa_config)}
"""The architectures read and written by a function pair of their own, which `_cannot_round_trip` checks by."""


def _cannot_round_trip(arch: str, cfg: ModelConfig) -> str | None:
    """Why `arch` (read and written by `_READ_APART`'s pair) cannot hold `cfg`: the fields its config, written and read
    back, does not give again (each side `_resolved`, so that two spellings of one model agree)."""
    read, write = _READ_APART[arch]
    try:
        back = _resolved(read(write(cfg)))
    except ValueError as e:
        return str(e)
    ours = _resolved(cfg)
    differ = [f.name for f in fields(ModelConfig) if getattr(back, f.name) != getattr(ours, f.name)]
    return (f"it has no {', '.join(f'{name}={getattr(ours, name)!r}' for name in differ)} (it reads them as "
            f"{', '.join(f'{name}={getattr(back, name)!r}' for name in differ)})" if differ else None)


def _resolved(cfg: ModelConfig) -> ModelConfig:
    """`cfg` with every width a None stands for written out, and what no layer reads (the experts' settings of a dense
    model, the dense MLP's width of one with experts in every layer, a temperature's step without the temperature, the
    training settings) at ModelConfig's defaults."""
    default = ModelConfig()
    dense = any(not cfg.has_experts(i) for i in range(cfg.n_layers))  # (a layer's MLP of ffn_dim)
    c = replace(cfg, head_size=cfg.head_dim, n_kv_heads=cfg.kv_heads, ffn_dim=cfg.hidden_dim if dense else None,
                rope_dim=cfg.rotary_dim if cfg.pos == "rope" else None,
                norm_bias=(cfg.bias if cfg.norm_bias is None else cfg.norm_bias) if cfg.norm == "layernorm" else None,
                attn_bias=cfg.bias if cfg.attn_bias is None else cfg.attn_bias,
                expert_ffn_dim=cfg.expert_hidden_dim if cfg.n_experts else None, hf_architecture=None,
                init_std=default.init_std, dropout=default.dropout)
    if c.n_experts and c.expert_layers == tuple(range(c.n_layers)):
        c = replace(c, expert_layers=None)
    if not c.n_experts:
        c = replace(c, **{k: getattr(default, k) for k in ("experts_per_token", "renormalize_experts",
                                                           "expert_weights_float32")})
    return c if c.nope_query_scale is not None else replace(c, nope_query_floor=default.nope_query_floor)


def _from_llama_like(d: dict[str, Any], arch: str) -> ModelConfig:
    """Llama and the architectures that differ from it by a few fields."""
    name = arch.removesuffix("ForCausalLM")
    if arch == GEMMA4:
        d = {**_GEMMA4_TEXT_DEFAULTS, **d}
    if arch == ERNIE4_5:  # Ernie4_5Config's head width when a config leaves it out (its MoE's: hidden / heads)
        d = {"head_dim": 128, **d}
    if arch == MINISTRAL3:  # Ministral3Config's head width and RoPE (YaRN, the queries' temperature) where left out
        d = {"head_dim": 128, "rms_norm_eps": 1e-5, "max_position_embeddings": 262144, **d}
        if not (d.get("rope_parameters") or d.get("rope_scaling")):
            d["rope_parameters"] = dict(_MINISTRAL3_ROPE)
    if arch == YOUTU:  # YoutuConfig's tied embeddings and initialisation (2 / sqrt(5 dim)) where left out
        d = _filled(d, {"tie_word_embeddings": True})
        d.setdefault("initializer_range", 2.0 / (5.0 * d["hidden_size"]) ** 0.5)
    if arch == CWM:  # CwmConfig's shape and RoPE where left out; the first of every four layers global
        d = _filled(d, _CWM_DEFAULTS)
        if not (d.get("rope_parameters") or d.get("rope_scaling")):
            d["rope_parameters"] = dict(_CWM_ROPE)
        d.setdefault("layer_types", ["full_attention" if i % 4 == 0 else "sliding_attention"
                                     for i in range(d["num_hidden_layers"])])
    if arch == SOLAR_OPEN:  # SolarOpenConfig's shape where left out; experts in every layer, whatever a config says
        d = _filled(d, _SOLAR_OPEN_DEFAULTS) | {"first_k_dense_replace": 0}
        d.setdefault("intermediate_size", d.get("moe_intermediate_size", 1280))  # (no dense MLP: none of its own)
    if arch == MISTRAL4:  # Mistral4Config's shape and RoPE where left out
        d = _filled(d, _MISTRAL4_DEFAULTS)
        if not (d.get("rope_parameters") or d.get("rope_scaling")):
            d["rope_parameters"] = dict(_MISTRAL4_ROPE)
    if arch in HUNYUANS:
        d = _hunyuan_rope(d)
    if arch in COHERES:
        d = _cohere(d, arch)
    linear = {}
    if arch in LFM2S:
        d, linear = _lfm2(d, arch)
    if arch in GRANITE_MOES:
        d, linear = _granite_moe(d, arch)
    if arch == NEMOTRON_H:
        d, linear = _nemotron_h(d)
    if arch == BAMBA:
        d, linear = _bamba(d)
    if arch == MAMBA2:
        d, linear = _mamba2(d)
    if arch in MAMBAS:
        d, linear = _mamba(d, arch)
    if arch == JAMBA:
        d, linear = _jamba(d)
    if arch in HYBRID:  # Qwen3_5TextConfig's defaults of what a config may leave out
        d = {"head_dim": 256, "linear_conv_kernel_dim": 4, "linear_key_head_dim": 128, "linear_value_head_dim": 128,
             "linear_num_key_heads": 16, "linear_num_value_heads": 32, **d}
    default_act = ("gelu_pytorch_tanh" if arch == STARCODER2 else "gelu_new" if arch == PHI
                   else "relu2" if arch in (ARCEE, NANOCHAT) else "silu")
    act = d.get("hidden_activation") or d.get("hidden_act", default_act)  # (the config class's default)
    gemma = arch in GEMMAS
    if gemma:  # "gelu" is a legacy spelling of the tanh approximation, as transformers reads it
        if act not in ("gelu", "gelu_pytorch_tanh", "gelu_new"):
            raise ValueError(f"Gemma hidden_act {act!r} is not supported (temper uses tanh GELU)")
    elif arch in (ARCEE, NANOCHAT):  # Llama (nanochat: its GPT) with a squared-ReLU MLP, not gated
        if act != "relu2":
            raise ValueError(f"{name} hidden_act {act!r} is not supported (temper reads relu2)")
    elif arch == STABLELM and d.get("qk_layernorm"):
        raise ValueError("StableLm qk_layernorm=true is not supported (temper's q/k norms are RMSNorms shared by the "
                         "heads; StableLM-2-12B's are LayerNorms per head)")
    elif arch in (STARCODER2, PHI):  # GPT-2's MLP: tanh GELU, not gated
        if act not in ("gelu_pytorch_tanh", "gelu_new", "gelu_fast"):
            raise ValueError(f"{name} hidden_act {act!r} is not supported (temper uses tanh GELU)")
        if arch == PHI and d.get("qk_layernorm"):
            raise ValueError("Phi qk_layernorm=true is not supported (temper's q/k norms are RMSNorms)")
        if arch == STARCODER2 and not d.get("use_bias", True):
            raise ValueError("Starcoder2 use_bias=false is not supported (its LayerNorms keep their biases where its "
                             "linear layers drop theirs; temper's `bias` covers both)")
    elif act != "silu":
        raise ValueError(f"{name} hidden_act {act!r} is not supported (temper uses SwiGLU)")
    dim, n_heads, head_dim = _heads(d, name)
    latent = _latent_attention(d, arch) if arch in LATENT else {}
    if latent:  # its config's head_dim is the rotated part's
        head_dim = latent.pop("head_dim")
    window = d.get("sliding_window") if arch in (MISTRAL, PHI3, MIXTRAL, STARCODER2, MINISTRAL3) else None
    every, first = None, False
    if arch in (MINISTRAL, CWM):
        window, every, first = _window_layers(d, name, None, first_ok=True)
    if arch == DOTS1:  # Dots1Config windows the layers from max_window_layers on: none in its published configs
        n = d["num_hidden_layers"]
        types = d.get("layer_types") or ["sliding_attention" if d.get("sliding_window") is not None
                                         and i >= d.get("max_window_layers", n) else "full_attention" for i in range(n)]
        if set(types) != {"full_attention"}:
            raise ValueError(f"Dots1 layer_types={types!r} (max_window_layers={d.get('max_window_layers')}) is not "
                             "supported (temper reads dots.llm1's layout: every layer attending to all tokens)")
    local_theta = None
    if arch == GEMMA3:
        window, every, theta, local_theta, scaling = _gemma3_layers(d)
        rope = {}
    elif arch == GEMMA4:
        window, every, theta, local_theta, scaling = _gemma4_layers(d)
        rope = {}
    elif arch == OLMO3:  # its windowed layers take the global layers' base, unscaled
        window, every, theta, local_theta, scaling = _local_global_rope(d, "OLMo 3", 4, 500000.0, None, None)
        rope = {}
    elif arch == GPT_OSS and not (d.get("rope_scaling") or d.get("rope_parameters")):
        theta, scaling, rope = _rope(d | {"rope_parameters": _GPT_OSS_ROPE})  # GptOssConfig's default
    else:
        theta, scaling, rope = _rope(d, phi3=arch == PHI3, default_theta=_DEFAULT_THETA.get(arch, 10000.0))
    if arch in (GEMMA2, GPT_OSS, VAULTGEMMA):  # one RoPE; the windowed layers alternate with global ones
        window, every, _ = _window_layers(d, {GEMMA2: "Gemma 2", GPT_OSS: "GPT-OSS"}.get(arch, name), 2)
    if arch in EXAONES:  # windowed layers with RoPE between global ones without (NoPE)
        window, every, _ = _window_layers(d | {"sliding_window_pattern": _exaone_pattern(d)}, name, 4)
    if arch == COHERE2:  # the same layers, the pattern in Gemma 3's spelling
        window, every, _ = _window_layers(d, "Cohere2", 4)
    glm = arch in GLM
    partial = d.get("partial_rotary_factor", rope.get("partial_rotary_factor", 0.5 if glm or arch == PHI
                                                      else 0.25 if arch in (*HYBRID, STABLELM) else 1.0))
    if arch == MINIMAX_M2 and d.get("rotary_dim") is not None:  # its published configs' spelling
        partial = d["rotary_dim"] / head_dim
    if arch == BAMBA:  # BambaConfig fixes it
        partial = 0.5
    if latent:  # qk_rope_head_dim says it (Mistral4Config also writes its share of the head, in rope_parameters)
        partial = 1.0
    if partial != 1.0 and (arch not in (PHI3, PHI, *GLM, *HYBRID, MINIMAX_M2, BAMBA, STABLELM) or not 0 < partial <= 1):
        raise ValueError(f"{name} partial_rotary_factor={partial} is not supported (temper reads it for Phi-3's, "
                         "GLM-4's, Qwen3.5's and MiniMax-M2's architectures, between 0 and 1)")
    rope_dim = int(head_dim * partial) if partial != 1.0 else latent.pop("rope_dim", None)  # as transformers rounds
    nope_every = _nope_layers(d, "SmolLM3") if arch == SMOLLM3 else every if arch in (*EXAONES, COHERE2) else None
    if (arch == GRANITE_HYBRID and d.get("position_embedding_type") != "rope") or arch in (NEMOTRON_H, JAMBA):  # NoPE
        nope_every = 1
    bias = qkv_bias = False
    if arch in (LLAMA, GRANITE, ARCEE):
        bias = bool(d.get("attention_bias", False))
        if bias != bool(d.get("mlp_bias", False)):
            raise ValueError(f"{name} attention_bias and mlp_bias must agree (temper's `bias` covers both)")
    elif glm:  # attention_bias: q, k and v's (Glm4Config's default: on; Glm4MoeConfig's: off)
        qkv_bias = bool(d.get("attention_bias", arch in (GLM1, GLM4)))
    elif arch == SOLAR_OPEN:  # Llama's attention with attention_bias on q, k and v alone (its o_proj has none)
        qkv_bias = bool(d.get("attention_bias", False))
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
    elif arch in ERNIES:  # use_bias: every linear layer's (the MoE's experts have none: refused there)
        bias = bool(d.get("use_bias") or False)
        if bias and arch == ERNIE4_5_MOE:
            raise ValueError("Ernie4_5_Moe use_bias=true is not supported (its experts have no biases where its other "
                             "layers do; temper's `bias` covers every layer)")
    elif arch == GPT_OSS:  # its experts and router always have biases: temper's `bias` is every layer's
        bias = True
        if not d.get("attention_bias", True):
            raise ValueError("GptOss attention_bias=false is not supported (its experts and router have biases; "
                             "temper's `bias` covers every layer)")
    elif arch in (STARCODER2, PHI):  # use_bias (Phi: always): every linear layer's and LayerNorm's
        bias = True
    elif arch == STABLELM:  # biases on q, k and v at most (use_qkv_bias), and on its LayerNorms always (norm_bias)
        qkv_bias = bool(d.get("use_qkv_bias", False))
    elif arch in (NANOCHAT, OLMO) and d.get("attention_bias"):
        raise ValueError(f"{name} attention_bias=true is not supported (its MLP has no biases; temper's `bias` covers "
                         "every layer)")
    elif d.get("attention_bias"):
        raise ValueError(f"{name} attention_bias=true is not supported")
    # Gemma 2 and 3 scale scores by query_pre_attn_scalar ** -0.5 (their config classes' default: 256), Granite by
    # attention_multiplier
    # Gemma 4 leaves its scores unscaled (its q/k norms bound them): scale dim 1
    scalar = (d.get("query_pre_attn_scalar", 256) if arch in (GEMMA2, GEMMA3, VAULTGEMMA) else 1 if arch == GEMMA4
              else _scale_dim(d.get("attention_multiplier", 1.0)) if arch in GRANITES else head_dim)
    return ModelConfig(
        vocab_size=d["vocab_size"], dim=dim, n_layers=d["num_hidden_layers"], n_heads=n_heads,
        head_size=None if head_dim * n_heads == dim else head_dim,
        n_kv_heads=d.get("num_key_value_heads") or n_heads, ffn_dim=d["intermediate_size"],
        max_seq_len=d.get("max_position_embeddings", 2048),
        mlp=("geglu" if gemma else "relu2" if arch in (NEMOTRON_H, ARCEE, NANOCHAT)
             else "gelu" if arch in (STARCODER2, PHI) else "swiglu"),
        norm="layernorm" if arch in (*COHERES, STARCODER2, PHI, OLMO, STABLELM) else "rmsnorm",
        norm_bias=True if arch == STABLELM else None,
        norm_weightless=arch in (OLMO, NANOCHAT),
        norm_eps=(d.get("layer_norm_eps", 1e-5) if arch in (*COHERES, PHI, STABLELM)
                  else 1e-5 if arch == OLMO  # (OLMo's fixed)
                  else d.get("norm_epsilon", 1e-5) if arch == STARCODER2 else d.get("rms_norm_eps", 1e-6)),
        norm_unit_offset=gemma and arch != GEMMA4 or arch in HYBRID,
        pos="rope", rope_theta=float(theta), rope_scaling=scaling, rope_dim=rope_dim, sliding_window=window,
        global_every=every, global_first=first, nope_every=nope_every,
        rope_local_theta=None if local_theta is None else float(local_theta), bias=bias, qkv_bias=qkv_bias,
        qk_norm=arch in (QWEN3, GEMMA3, GEMMA4, QWEN3_MOE, *EXAONES, *WHOLE_QK_NORM, *HYBRID, *HUNYUANS, *LFM2S)
        or arch == GLM4_MOE and bool(d.get("use_qk_norm", False)) or arch in (NANOCHAT, DOTS1),
        qk_norm_whole=arch in WHOLE_QK_NORM, qk_norm_after_rope=arch in (*HUNYUANS, NANOCHAT),
        tie_embeddings=d.get("tie_word_embeddings", gemma or arch in (*ERNIES, *COHERES)), scale_embeddings=gemma,
        parallel_block=arch in (*COHERES, PHI) or arch == STABLELM and bool(d.get("use_parallel_residual", False)),
        head_bias=arch == PHI,
        sandwich_norm=arch in (*SANDWICH, *POST_NORM), pre_norm=arch not in POST_NORM,
        norm_cast_after=arch in (*OLMOS, FLEX_OLMO, GPT_OSS, GEMMA4, NEMOTRON_H),
        rope_float32=arch in (*OLMOS, FLEX_OLMO, DEEPSEEK_V2, *ERNIES, *COHERES), rope_tables_rounded=arch in COHERES,
        dropout=0.0,
        init_std=d.get("initializer_range", 0.02),
        attn_scale_dim=None if scalar == head_dim else int(scalar),
        hf_architecture=arch, **(_experts(d, arch) if arch in MOE_ARCHITECTURES else {}), **latent,
        **(_softcaps(d, arch) if arch in CAPPED else {}),
        **(_gemma4_fields(d, head_dim) if arch == GEMMA4 else {}),
        **({"attn_sinks": True, "swiglu_limit": float(d.get("swiglu_limit", 7.0)),
            "swiglu_alpha": float(d.get("swiglu_alpha", 1.702))} if arch == GPT_OSS else {}),
        **(_multipliers(d) if arch in GRANITES else {}),
        **({"logit_divisor": None if d["logit_scale"] == 1.0 else 1 / d["logit_scale"]} if arch in COHERES else {}),
        **(_linear_layers(d) if arch in HYBRID else {}), **linear, **(_nanochat(d) if arch == NANOCHAT else {}),
        qkv_clip=None if d.get("clip_qkv") is None or arch not in (OLMO, OLMOE) else float(d["clip_qkv"]),
        query_scale_beta=(_query_scale_beta(rope, scaling) if arch == MINISTRAL3 or arch == MISTRAL4
                          and rope.get("llama_4_scaling_beta") is not None else None),
    )


def _nanochat(d: dict[str, Any]) -> dict[str, Any]:
    """The ModelConfig fields of nanochat's GPT (Karpathy 2025) beside Llama's, its q/k norms after RoPE and its norms
    without weights: a norm of the embeddings, RoPE turning the other way, and logits capped by tanh (15; null: none)."""
    cap = d.get("final_logit_softcapping", 15.0)
    return {"embed_norm": True, "rope_reversed": True, "logit_softcap": None if cap is None else float(cap)}


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


_DEFAULT_THETA = {COHERE: 500000.0, LFM2: 1000000.0, LFM2_MOE: 1000000.0, FLEX_OLMO: 500000.0,
                  SOLAR_OPEN: 1000000.0}
"""The RoPE base of the config classes whose default is not 10000 (their `default_theta`), for a config without one."""


def _lfm2(d: dict[str, Any], arch: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """(`d` with Lfm2Config's (Lfm2MoeConfig's) defaults and older spellings read, in the keys the reading shares: its
    MLP's width as transformers computes it (block_auto_adjust_ff_dim; the MoE's dense layers take intermediate_size as
    it is), norm_eps as rms_norm_eps; the ModelConfig fields of its layers: which attend (layer_types, or
    full_attn_idxs), the others short convolutions of conv_L_cache taps)."""
    if d.get("conv_bias"):
        raise ValueError("Lfm2 conv_bias=true is not supported (temper's short convolutions have no biases)")
    ffn = d.get("intermediate_size", d.get("block_ff_dim", 12288 if arch == LFM2 else 7168))
    if arch == LFM2 and d.get("block_auto_adjust_ff_dim", True):  # Lfm2MLP's rule
        ffn = int(2 * ffn / 3)
        if d.get("block_ffn_dim_multiplier", 1.0) is not None:
            multiple = d.get("block_multiple_of", 256)
            ffn = multiple * -(-int(d.get("block_ffn_dim_multiplier", 1.0) * ffn) // multiple)
    n = d["num_hidden_layers"]
    full = d.get("full_attn_idxs")
    if full is not None and not all(_is_int(i) and 0 <= i < n for i in full):
        raise ValueError(f"key 'full_attn_idxs' must list layers of the {n}, got {full!r}")
    types = d.get("layer_types") or ["full_attention" if full is None or i in full else "conv" for i in range(n)]
    if len(types) != n or set(types) - {"full_attention", "conv"}:
        raise ValueError(f"key 'layer_types' must name 'full_attention' or 'conv' for each of the {n} layers, got "
                         f"{types!r}")
    attention = tuple(i for i, t in enumerate(types) if t == "full_attention")
    if len(attention) == n:
        raise ValueError("an Lfm2 config without conv layers is not supported (temper reads LFM2's hybrids)")
    d = {"max_position_embeddings": 128000, "norm_eps": 1e-5, **d, "intermediate_size": ffn,
         "tie_word_embeddings": d.get("tie_word_embeddings", d.get("tie_embedding", True))}
    d["rms_norm_eps"] = d["norm_eps"]
    return d, {"attention_layers": attention, "linear_layer": "short_conv", "linear_conv_size": d.get("conv_L_cache", 3)}


def _granite_moe(d: dict[str, Any], arch: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """(`d` with its MLP's width in intermediate_size, as the reading shares it; the ModelConfig fields of the Granite
    mixtures' layers): Granite 3.0's experts (GraniteMoe), beside an ungated shared MLP (GraniteMoeShared, where
    shared_intermediate_size > 0), and Granite 4.0's (GraniteMoeHybrid: that MLP alone where num_local_experts is 0, and
    Mamba 2 layers, `_mamba2_layers`). The experts' weights are a softmax over the chosen ones' logits: the
    renormalised top k of a softmax over all."""
    name = arch.removesuffix("ForCausalLM")
    fields = _mamba2_layers(d, "GraniteMoeHybrid") if arch == GRANITE_HYBRID else {}
    experts = d.get("num_local_experts", 8)
    shared = 0 if arch == GRANITE_MOE else d.get("shared_intermediate_size", 1024 if arch == GRANITE_HYBRID else 0)
    if not (experts > 0 or experts == 0 and arch == GRANITE_HYBRID and shared > 0) or shared < 0:
        raise ValueError(f"{name} num_local_experts={experts} with shared_intermediate_size={shared} is not supported "
                         "(experts, or GraniteMoeHybrid's shared MLP alone: num_local_experts 0)")
    if experts:
        k = d.get("num_experts_per_tok", 2)
        if not (_is_int(k) and 1 <= k <= experts):
            raise ValueError(f"{name} num_experts_per_tok={k} must be between 1 and the {experts} experts")
        fields |= {"n_experts": experts, "experts_per_token": k, "expert_ffn_dim": d["intermediate_size"],
                   "shared_expert_ffn_dim": shared or None, "renormalize_experts": True}
    return {**d, "intermediate_size": d["intermediate_size"] if experts else shared}, fields


_NEMOTRON_KINDS = {"M": "linear_attention", "*": "full_attention", "-": "mlp", "E": "moe"}
"""Nemotron-H's hybrid_override_pattern letters -> transformers 5's layers_block_type names."""


def _nemotron_h(d: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(`d` in the keys the reading shares, with num_hidden_layers temper's block count; the ModelConfig fields of
    Nemotron-H's layers). Its checkpoint's layers are each one sublayer, a Mamba 2 layer ("M", "linear_attention"),
    attention without positions ("*", "full_attention"), a squared-ReLU MLP ("-", "mlp") or a mixture of them ("E",
    "moe": Nemotron 3), each x + f(norm(x)): a mixer and the MLP after it are one temper block, and a mixer followed by
    another mixer a block without an MLP (`no_mlp_layers`). A mixture (`_nemotron_h_experts`) is every MLP's or none."""
    pattern = d.get("hybrid_override_pattern")
    types = d.get("layers_block_type", d.get("layer_types"))
    if types is None and isinstance(pattern, str) and set(pattern) <= set(_NEMOTRON_KINDS):
        types = [_NEMOTRON_KINDS[c] for c in pattern]
    aliases = {"mamba": "linear_attention", "attention": "full_attention"}
    types = [aliases.get(t, t) for t in types] if isinstance(types, list) else types
    if not (isinstance(types, list) and types and set(types) <= {"linear_attention", "full_attention", "mlp", "moe"}
            and {"mlp", "moe"} - set(types)):
        raise ValueError(f"NemotronH layers_block_type={types!r} (hybrid_override_pattern={pattern!r}) is not supported "
                         "(temper reads Mamba 2 'M', attention '*' and MLP '-' or mixture 'E' layers, not both kinds of "
                         "MLP in one model)")
    attention, no_mlp, block = [], [], -1
    for k, kind in enumerate(types):
        if kind in ("mlp", "moe"):
            if block < 0 or k and types[k - 1] in ("mlp", "moe"):
                raise ValueError(f"NemotronH layer {k} is an MLP after no mixer (layers_block_type={types!r}): temper's "
                                 "blocks are a mixer, then at most one MLP")
            continue
        block += 1
        if kind == "full_attention":
            attention.append(block)
        if k + 1 == len(types) or types[k + 1] not in ("mlp", "moe"):
            no_mlp.append(block)
    for key, want in (("mlp_hidden_act", "relu2"), ("mamba_hidden_act", "silu"), ("use_bias", False),
                      ("mlp_bias", False), ("attention_bias", False), ("use_conv_bias", True), ("mamba_proj_bias", False),
                      ("residual_in_fp32", False), ("sliding_window", None), ("num_nextn_predict_layers", 0),
                      ("moe_latent_size", None)):
        if d.get(key, want) != want:
            raise ValueError(f"NemotronH {key}={d[key]!r} is not supported (temper reads {want!r})")
    _check_time_steps("NemotronH", d.get("time_step_limit", d.get("mamba_dt_limit")))
    _check_sizes("NemotronH", d, {"ssm_state_size": 128, "conv_kernel": 4, "mamba_head_dim": 64})
    heads, groups = d.get("mamba_num_heads", 128), d.get("n_groups", d.get("mamba_n_groups", 8))
    if not (heads > 0 and groups > 0 and heads % groups == 0):
        raise ValueError(f"NemotronH mamba_num_heads={heads} in n_groups={groups} is not supported (groups that divide "
                         "the heads)")
    fields = {"no_mlp_layers": tuple(no_mlp), **(_nemotron_h_experts(d) if "moe" in types else {})}
    if len(attention) <= block:  # Mamba 2 layers
        fields |= {"attention_layers": tuple(attention), "linear_layer": "mamba2", "linear_key_heads": groups,
                   "linear_value_heads": heads, "linear_key_size": d.get("ssm_state_size", 128),
                   "linear_value_size": d.get("mamba_head_dim", 64),
                   "linear_conv_size": d.get("conv_kernel", d.get("mamba_d_conv", 4))}
    d = {"vocab_size": 131072, "hidden_size": 4096, "num_attention_heads": 32, "num_key_value_heads": 8,
         "head_dim": 128, "max_position_embeddings": 4096, "intermediate_size": 21504, **d,
         "num_hidden_layers": block + 1, "rms_norm_eps": d.get("layer_norm_epsilon", 1e-5),
         "hidden_act": "silu"}  # (its MLP's activation is mlp_hidden_act, checked above)
    return d, fields


def _nemotron_h_experts(d: dict[str, Any]) -> dict[str, Any]:
    """The ModelConfig fields of Nemotron 3's mixtures ("E" layers): squared-ReLU experts, ungated as its dense MLPs,
    chosen by DeepSeek-V3's routing (float32 sigmoid scores plus a choice bias, among the n_group groups whose two best
    experts score highest, the top k renormalised with norm_topk_prob and scaled by routed_scaling_factor), beside one
    shared expert of moe_shared_expert_intermediate_size. Its reference adds 1e-20 to the renormalising sum, which
    temper leaves out (as for DeepSeek-V3's)."""
    _check_sizes("NemotronH", d, {"moe_intermediate_size": 7688, "moe_shared_expert_intermediate_size": 7688})
    defaults = {"num_experts_per_tok": 2, "n_group": 1, "topk_group": 1}  # NemotronHConfig's, also for a null
    k, groups, per = (default if d.get(key) is None else d[key] for key, default in defaults.items())
    experts = d.get("n_routed_experts", 8)
    if not (experts > 0 and 1 <= k <= experts and groups > 0 and experts % groups == 0 and 1 <= per <= groups):
        raise ValueError(f"NemotronH n_routed_experts={experts}, num_experts_per_tok={k}, n_group={groups}, "
                         f"topk_group={per} are not supported (k of the experts, in groups that divide them)")
    return {"n_experts": experts, "experts_per_token": k, "expert_ffn_dim": d.get("moe_intermediate_size", 7688),
            "shared_expert_ffn_dim": d.get("moe_shared_expert_intermediate_size", 7688), "router_scores": "sigmoid",
            "router_float32": True, "expert_choice_bias": True, "expert_groups": groups, "expert_groups_per_token": per,
            "routed_scaling": float(d.get("routed_scaling_factor", 1.0)),
            "renormalize_experts": d.get("norm_topk_prob") is not False}


_MAMBA2_DEFAULTS = {"num_heads": 128, "head_dim": 64, "vocab_size": 32768, "hidden_size": 4096, "state_size": 128,
                    "num_hidden_layers": 64, "layer_norm_epsilon": 1e-5, "expand": 2, "conv_kernel": 4, "n_groups": 8}
"""Mamba2Config's defaults of what a config may leave out."""


def _mamba2(d: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(`d` in the keys the reading shares; the ModelConfig fields of Mamba2ForCausalLM: every layer a Mamba 2 mixer
    after its norm, x + mixer(norm(x)), with no attention and no MLP: blocks without an MLP (`no_mlp_layers`), as
    Nemotron-H's. Its attention fields are placeholders that no layer reads.

    residual_in_fp32 (its default) is read and written back as it is: temper's residual stream is float32 wherever the
    weights are (autocast training); a model loaded in bf16 rounds it there as the weights' dtype."""
    d = {**_MAMBA2_DEFAULTS, **d}
    for key, want in (("use_bias", False), ("use_conv_bias", True), ("hidden_act", "silu")):
        if d.get(key, want) != want:
            raise ValueError(f"Mamba2 {key}={d[key]!r} is not supported (temper reads {want!r})")
    _check_time_steps("Mamba2", d.get("time_step_limit"))
    _check_sizes("Mamba2", d, {"state_size": 128, "conv_kernel": 4})
    heads, head, groups, dim = d["num_heads"], d["head_dim"], d["n_groups"], d["hidden_size"]
    if not (heads > 0 and groups > 0 and heads % groups == 0 and head > 0 and heads * head == d["expand"] * dim):
        raise ValueError(f"Mamba2 num_heads={heads}, head_dim={head}, n_groups={groups} are not supported (heads of "
                         "head_dim filling expand * hidden_size, in groups that divide them)")
    n = d["num_hidden_layers"]
    fields = {"attention_layers": (), "no_mlp_layers": tuple(range(n)), "linear_layer": "mamba2",
              "linear_key_heads": groups, "linear_value_heads": heads, "linear_key_size": d["state_size"],
              "linear_value_size": head, "linear_conv_size": d["conv_kernel"]}
    # no positions: max_seq_len bounds nothing a layer holds (a Mamba 2 state is fixed-size); Mamba-Codestral's 256k
    return {**d, "num_attention_heads": 1, "num_key_value_heads": 1, "head_dim": None, "intermediate_size": dim,
            "max_position_embeddings": 262144, "rms_norm_eps": d["layer_norm_epsilon"]}, fields


_MAMBA_DEFAULTS = {"vocab_size": 50280, "hidden_size": 768, "state_size": 16, "num_hidden_layers": 32,
                   "layer_norm_epsilon": 1e-5, "expand": 2, "conv_kernel": 4, "time_step_rank": "auto",
                   "tie_word_embeddings": True, "mixer_rms_eps": 1e-6, "initializer_range": 0.1}
"""MambaConfig's and FalconMambaConfig's defaults of what a config may leave out (mixer_rms_eps: FalconMamba's)."""


def _mamba(d: dict[str, Any], arch: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """(`d` in the keys the reading shares; the ModelConfig fields of MambaForCausalLM or FalconMambaForCausalLM: every
    layer a Mamba mixer after its norm, x + mixer(norm(x)), as Mamba2ForCausalLM's (`_mamba2`); FalconMamba's mixers
    also RMS-normalise their steps, B and C (mixer_rms_eps). residual_in_fp32 is read as Mamba 2's is.

    The channels are intermediate_size where a config writes it, as transformers reads it, else expand * hidden_size:
    FalconMamba-7B's config writes expand 16 beside intermediate_size 8192, twice its hidden size."""
    name = arch.removesuffix("ForCausalLM")
    d = {**_MAMBA_DEFAULTS, **d}
    for key, want in (("use_bias", False), ("use_conv_bias", True), ("hidden_act", "silu")):
        if d.get(key, want) != want:
            raise ValueError(f"{name} {key}={d[key]!r} is not supported (temper reads {want!r})")
    _check_sizes(name, d, {"state_size": 16, "conv_kernel": 4, "expand": 2, "hidden_size": 768,
                           "intermediate_size": 1536})
    dim, rank = d["hidden_size"], d["time_step_rank"]
    inner = d.get("intermediate_size") or d["expand"] * dim
    rank = None if rank == "auto" else rank  # ModelConfig.dt_rank's rule
    if isinstance(rank, str) or rank is not None and rank <= 0:
        raise ValueError(f"{name} time_step_rank={rank!r} is not supported (a positive width, or \"auto\")")
    if arch == FALCON_MAMBA and d["mixer_rms_eps"] <= 0:
        raise ValueError(f"{name} mixer_rms_eps={d['mixer_rms_eps']} is not supported (a positive epsilon)")
    n = d["num_hidden_layers"]
    fields = {"attention_layers": (), "no_mlp_layers": tuple(range(n)), "linear_layer": "mamba", "linear_key_heads": 1,
              "linear_value_heads": inner, "linear_key_size": d["state_size"], "linear_value_size": 1,
              "linear_conv_size": d["conv_kernel"], "linear_dt_rank": rank,
              "linear_bcdt_eps": float(d["mixer_rms_eps"]) if arch == FALCON_MAMBA else None}
    # no positions: max_seq_len bounds nothing a layer holds (a Mamba state is fixed-size)
    return {**d, "num_attention_heads": 1, "num_key_value_heads": 1, "head_dim": None, "intermediate_size": dim,
            "max_position_embeddings": 262144, "rms_norm_eps": d["layer_norm_epsilon"]}, fields


_JAMBA_DEFAULTS = {"vocab_size": 65536, "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
                   "num_attention_heads": 32, "num_key_value_heads": 8, "rms_norm_eps": 1e-6,
                   "max_position_embeddings": 262144, "tie_word_embeddings": False, "num_experts": 16,
                   "num_experts_per_tok": 2, "expert_layer_period": 2, "expert_layer_offset": 1, "attn_layer_period": 8,
                   "attn_layer_offset": 4, "mamba_d_state": 16, "mamba_d_conv": 4, "mamba_expand": 2,
                   "mamba_dt_rank": "auto"}
"""JambaConfig's defaults of what a config may leave out."""


def _jamba(d: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(`d` with JambaConfig's defaults; the ModelConfig fields of Jamba's layers). Jamba (AI21's Jamba-v0.1, 1.5 and
    1.6) puts an attention layer without positions where layer % attn_layer_period == attn_layer_offset and Mamba
    layers elsewhere, their steps, B and C RMS-normalised with weights (rms_norm_eps); every block's MLP is SwiGLU, a
    mixture of num_experts where layer % expert_layer_period == expert_layer_offset, chosen by the top k of a softmax
    and weighed by it unrenormalised (none where num_experts is 1). Its Mamba layers' channels are mamba_expand *
    hidden_size (JambaConfig has no intermediate width for them)."""
    d = {**_JAMBA_DEFAULTS, **d}
    for key, want in (("mamba_conv_bias", True), ("mamba_proj_bias", False)):
        if d.get(key, want) != want:
            raise ValueError(f"Jamba {key}={d[key]} is not supported (temper's Mamba layers have a convolution bias "
                             "and projections without biases)")
    _check_sizes("Jamba", d, {"mamba_d_state": 16, "mamba_d_conv": 4, "mamba_expand": 2})
    n = d["num_hidden_layers"]
    chosen = {}
    for kind in ("attn", "expert"):
        period, offset = d[f"{kind}_layer_period"], d[f"{kind}_layer_offset"]
        if not 0 <= offset < period:
            raise ValueError(f"Jamba {kind}_layer_period={period} and {kind}_layer_offset={offset} are not supported "
                             "(the offset below the period)")
        chosen[kind] = _periodic(n, period, offset)
    rank, experts, k = d["mamba_dt_rank"], d["num_experts"], d["num_experts_per_tok"]
    rank = None if rank == "auto" else rank  # ModelConfig.dt_rank's rule
    if isinstance(rank, str) or rank is not None and rank <= 0:
        raise ValueError(f"Jamba mamba_dt_rank={rank!r} is not supported (a positive width, or \"auto\")")
    if not (experts >= 1 and (experts == 1 or _is_int(k) and 1 <= k <= experts)):
        raise ValueError(f"Jamba num_experts={experts!r} with num_experts_per_tok={k!r} is not supported (1 expert, "
                         "a dense MLP, or k of several)")
    mixture = {"n_experts": experts, "experts_per_token": k, "renormalize_experts": False,
               "expert_layers": chosen["expert"]} if experts > 1 and chosen["expert"] else {}
    fields = {"attention_layers": chosen["attn"], "linear_layer": "mamba", "linear_key_heads": 1,
              "linear_value_heads": d["mamba_expand"] * d["hidden_size"], "linear_key_size": d["mamba_d_state"],
              "linear_value_size": 1, "linear_conv_size": d["mamba_d_conv"], "linear_dt_rank": rank,
              "linear_bcdt_eps": float(d["rms_norm_eps"]), "linear_bcdt_weights": True, **mixture}
    return d, fields


def _check_sizes(name: str, d: dict[str, Any], defaults: dict[str, int]) -> None:
    """Refuse a width of the keys `defaults` names (their config class's defaults) that is not positive, naming the key:
    ModelConfig's own check would name temper's field."""
    for key, default in defaults.items():
        if d.get(key, default) <= 0:
            raise ValueError(f"{name} {key}={d[key]} is not supported (a positive width)")


def _check_time_steps(name: str, limit: Any) -> None:
    """Refuse a Mamba 2 time_step_limit other than (0, inf): temper does not clamp the steps."""
    # transformers 5 writes its infinity as {"__float__": "Infinity"}
    bounds = [t["__float__"] if isinstance(t, dict) and set(t) == {"__float__"} else t for t in limit or []]
    if limit is not None and bounds != [0.0, float("inf")] and bounds != [0.0, "Infinity"]:
        raise ValueError(f"{name} time_step_limit={limit} is not supported (temper does not clamp Mamba 2's steps)")


def _mamba2_layers(d: dict[str, Any], name: str) -> dict[str, Any]:
    """The ModelConfig fields of Granite 4.0's and Bamba's layers (`name` their config's): which attend (layer_types, or
    the older layers_block_type; "attention" or "full_attention"), the others Mamba 2 layers ("mamba" or
    "linear_attention"); none where every layer attends (Granite 4.0 Micro)."""
    n = d["num_hidden_layers"]
    types = d.get("layer_types", d.get("layers_block_type")) or ["linear_attention"] * n
    kinds = {"mamba": True, "linear_attention": True, "attention": False, "full_attention": False}
    if len(types) != n or not all(t in kinds for t in types):
        raise ValueError(f"key 'layer_types' must name 'mamba' or 'attention' for each of the {n} layers, got {types!r}")
    for key, want in (("mamba_conv_bias", True), ("mamba_proj_bias", False)):
        if d.get(key, want) != want:
            raise ValueError(f"{name} {key}={d[key]} is not supported (temper's Mamba 2 layers have a convolution bias "
                             "and projections without biases)")
    _check_time_steps(name, d.get("time_step_limit"))
    _check_sizes(name, d, {"mamba_d_state": 256, "mamba_d_conv": 4})
    heads, groups, expand = d.get("mamba_n_heads", 128), d.get("mamba_n_groups", 1), d.get("mamba_expand", 2)
    head = d.get("mamba_d_head", "auto")
    if not (_is_int(head) or head == "auto") or heads <= 0:
        raise ValueError(f"{name} mamba_d_head={head!r} with mamba_n_heads={heads} is not supported (a whole number or "
                         "'auto', over a positive number of heads)")
    head = expand * d["hidden_size"] // heads if head == "auto" else head
    if not (heads > 0 and groups > 0 and heads % groups == 0 and head > 0 and heads * head == expand * d["hidden_size"]):
        raise ValueError(f"{name} mamba_n_heads={heads}, mamba_n_groups={groups}, mamba_d_head={head} are not supported "
                         "(heads of mamba_d_head filling mamba_expand * hidden_size, in groups that divide them)")
    attention = tuple(i for i, t in enumerate(types) if not kinds[t])
    if len(attention) == n:
        return {}
    return {"attention_layers": attention, "linear_layer": "mamba2", "linear_key_heads": groups,
            "linear_value_heads": heads, "linear_key_size": d.get("mamba_d_state", 256), "linear_value_size": head,
            "linear_conv_size": d.get("mamba_d_conv", 4)}


_BAMBA_DEFAULTS = {"vocab_size": 128000, "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
                   "num_attention_heads": 32, "num_key_value_heads": 8, "rms_norm_eps": 1e-5,
                   "max_position_embeddings": 262144, "tie_word_embeddings": False}
"""BambaConfig's defaults of what a config may leave out (its Mamba 2 ones are Granite 4.0's: `_mamba2_layers`)."""


def _bamba(d: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(`d` with BambaConfig's defaults; the ModelConfig fields of Bamba's layers). Bamba (IBM's Bamba-9B) is Granite
    4.0-H's dense form without Granite's multipliers: Mamba 2 layers around the attention layers attn_layer_indices
    names, whose RoPE turns the first half of each head (BambaConfig fixes partial_rotary_factor at 0.5), each followed
    by a SwiGLU MLP."""
    d = {**_BAMBA_DEFAULTS, **d}
    n, indices = d["num_hidden_layers"], d.get("attn_layer_indices") or []
    if not all(_is_int(i) and 0 <= i < n for i in indices):
        raise ValueError(f"key 'attn_layer_indices' must be layer numbers below num_hidden_layers={n}, got {indices!r}")
    for key, why in (("mlp_bias", "its MLP has no biases"), ("z_loss_coefficient", "it adds no z-loss to the loss")):
        if d.get(key):
            raise ValueError(f"Bamba {key}={d[key]!r} is not supported (temper reads none: {why})")
    rope = d.get("rope_parameters") or d.get("rope_scaling") or {}
    if rope.get("rope_type", rope.get("type", "default")) != "default":
        raise ValueError(f"Bamba rope_parameters={rope!r} is not supported (temper reads Bamba's unscaled RoPE)")
    types = ["attention" if i in indices else "mamba" for i in range(n)]
    return d, _mamba2_layers({**d, "layer_types": types}, "Bamba")


def _lfm2_experts(d: dict[str, Any]) -> dict[str, Any]:
    """LFM2-MoE's mixture: after num_dense_layers dense ones, experts of moe_intermediate_size chosen by sigmoid scores
    (plus a float32 choice bias with use_expert_bias), the top k renormalised (norm_topk_prob) and scaled
    (routed_scaling_factor). Its reference adds 1e-6 to the renormalising sum, which temper leaves out: 5e-7 of a weight
    at most (the sum of k sigmoids), below float32's rounding of the logits it moves."""
    n, k = d.get("num_experts", 32), d.get("num_experts_per_tok", 4)
    dense = d.get("num_dense_layers", 2)
    if not (_is_int(k) and 1 <= k <= n and 0 <= dense < d["num_hidden_layers"]):
        raise ValueError(f"Lfm2Moe num_experts={n}, num_experts_per_tok={k} and num_dense_layers={dense} are not "
                         "supported (k between 1 and the experts, fewer dense layers than layers)")
    return {"n_experts": n, "experts_per_token": k, "expert_ffn_dim": d.get("moe_intermediate_size", 1792),
            "renormalize_experts": bool(d.get("norm_topk_prob", True)), "router_scores": "sigmoid",
            "router_float32": True, "expert_choice_bias": bool(d.get("use_expert_bias", True)),
            "routed_scaling": float(d.get("routed_scaling_factor", 1.0)), "dense_layers": dense}


def _cohere(d: dict[str, Any], arch: str) -> dict[str, Any]:
    """`d` with CohereConfig's and Cohere2Config's defaults of what a config may leave out, and what temper cannot
    build refused by name. Cohere2Config makes head_dim hidden_size / num_attention_heads whatever a config says."""
    name = arch.removesuffix("ForCausalLM")
    d = {"logit_scale": 0.0625, **d}
    if arch == COHERE2:
        d["head_dim"] = d["hidden_size"] // d["num_attention_heads"]
        if d.get("sliding_window") is None:  # its layers rotate only within the window: none would
            raise ValueError("Cohere2 sliding_window=null is not supported (no layer would take positions)")
    if arch == COHERE and d.get("use_qk_norm"):
        raise ValueError("Cohere use_qk_norm=true is not supported (temper's q/k norms are RMSNorms, Command R+'s are "
                         "LayerNorms with a weight per head)")
    scale = d["logit_scale"]
    # temper divides the logits by 1 / logit_scale (Granite's logit_divisor): exactly the product for the published
    # powers of two (0.0625, 0.125, 0.25), within the last bit for others; the export writes 1 / that back.
    if not (scale > 0 and 1 / (1 / scale) == scale):
        raise ValueError(f"{name} logit_scale={scale} is not supported (temper needs a positive scale that the "
                         "reciprocal of its reciprocal gives back)")
    return d


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
    if arch == EXAONE_MOE:  # its expert counts under DeepSeek's names
        d = {**d, "n_routed_experts": d.get("num_experts", 64), "n_shared_experts": d.get("num_shared_experts", 1)}
    if arch in DEEPSEEK_MOE:
        return _deepseek_experts(d, arch)
    if arch == ERNIE4_5_MOE:
        return _ernie_experts(d)
    if arch == LFM2_MOE:
        return _lfm2_experts(d)
    if arch == HUNYUAN_MOE:
        return _hunyuan_experts(d)
    if arch == FLEX_OLMO:  # FlexOlmoConfig's experts where left out
        d = {"num_experts": 7, "num_experts_per_tok": 5, **d}
    n = d.get("num_local_experts", d.get("num_experts"))  # transformers 5 writes either spelling
    if not n or n <= 0:
        raise ValueError(f"{name} needs a positive num_local_experts (or num_experts), got {n!r}")
    k = d.get("num_experts_per_tok", 2)
    if k is None or not 1 <= k <= n:
        raise ValueError(f"{name} num_experts_per_tok={k} must be between 1 and the {n} experts")
    if d.get("router_jitter_noise"):
        raise ValueError(f"{name} router_jitter_noise={d['router_jitter_noise']} is not supported (temper's router "
                         "takes its input as it is)")
    if arch == MIXTRAL:
        return {"n_experts": n, "experts_per_token": k, "renormalize_experts": True, "expert_weights_float32": True}
    if arch == MINIMAX_M2:  # Mixtral's experts, chosen by sigmoid scores plus a bias, the top k renormalised
        if not d.get("use_qk_norm", True) or d.get("qk_norm_type", "per_layer") != "per_layer":
            raise ValueError(f"{name} use_qk_norm={d.get('use_qk_norm', True)} with qk_norm_type="
                             f"{d.get('qk_norm_type', 'per_layer')!r} is not supported (temper reads q/k norms over all "
                             "heads, as transformers' MiniMaxM2ForCausalLM)")
        for key, want in (("scoring_func", "sigmoid"), ("use_routing_bias", True), ("shared_intermediate_size", 0)):
            if d.get(key, want) != want:  # the keys of its published config that transformers does not read
                raise ValueError(f"{name} {key}={d[key]!r} is not supported (temper reads {want!r})")
        return {"n_experts": n, "experts_per_token": k, "renormalize_experts": True, "expert_weights_float32": True,
                "router_scores": "sigmoid", "expert_choice_bias": True}
    if arch in (OLMOE, FLEX_OLMO):  # experts of intermediate_size, as Mixtral's; norm_topk_prob as Qwen3-MoE's
        return {"n_experts": n, "experts_per_token": k, "renormalize_experts": bool(d.get("norm_topk_prob", False))}
    if arch == GPT_OSS:  # a softmax over the top k's logits: the renormalised top k of a softmax over all
        return {"n_experts": n, "experts_per_token": k, "renormalize_experts": True}
    if arch in (QWEN3_5_MOE, QWEN3_NEXT):  # experts beside a gated shared one, the top k renormalised (Qwen3-Next:
        # norm_topk_prob)
        return {"n_experts": n, "experts_per_token": k, "renormalize_experts": bool(d.get("norm_topk_prob", True)),
                "expert_ffn_dim": d.get("moe_intermediate_size", 512),
                "shared_expert_ffn_dim": d.get("shared_expert_intermediate_size", 512), "shared_expert_gate": True,
                **_sparse_layers(d, name, arch == QWEN3_NEXT)}
    fields = {"n_experts": n, "experts_per_token": k, "renormalize_experts": bool(d.get("norm_topk_prob", False)),
              "expert_ffn_dim": d.get("moe_intermediate_size", 1408 if arch == QWEN2_MOE else 768),
              **_sparse_layers(d, name, arch in (QWEN2_MOE, QWEN3_MOE))}
    if arch == QWEN2_MOE:  # Qwen2MoeConfig's defaults
        fields |= {"shared_expert_ffn_dim": d.get("shared_expert_intermediate_size", 5632), "shared_expert_gate": True}
    return fields


def _sparse_layers(d: dict[str, Any], name: str, read: bool) -> dict[str, Any]:
    """expert_layers of Qwen2-MoE's, Qwen3-MoE's and Qwen3-Next's decoder_sparse_step and mlp_only_layers (`read`):
    layer i has experts when (i + 1) % decoder_sparse_step == 0 and it is not in mlp_only_layers, a dense MLP of
    intermediate_size otherwise; {} where every layer has experts. Another architecture's keys are refused unless they
    place experts everywhere."""
    n, step, only = d["num_hidden_layers"], d.get("decoder_sparse_step", 1), d.get("mlp_only_layers") or []
    if (step, only) == (1, []):
        return {}
    if not read:
        raise ValueError(f"{name} decoder_sparse_step={step} with mlp_only_layers={only} is not supported (temper "
                         "puts experts in every layer)")
    if not (_is_int(step) and step >= 1 and all(_is_int(i) and 0 <= i < n for i in only)):
        raise ValueError(f"{name} decoder_sparse_step={step!r} with mlp_only_layers={only!r} is not supported (a "
                         f"positive step, layers below num_hidden_layers={n})")
    layers = tuple(i for i in range(n) if i not in only and (i + 1) % step == 0)
    if not layers:
        raise ValueError(f"{name} decoder_sparse_step={step} with mlp_only_layers={only} places experts in no layer "
                         "(read it as the dense architecture)")
    return {} if len(layers) == n else {"expert_layers": layers}


_DEEPSEEK_MOE_DEFAULTS = {  # Glm4MoeConfig's, DeepseekV2Config's and DeepseekV3Config's
    GLM4_MOE: {"n_routed_experts": 128, "n_group": 1, "topk_group": 1, "first_k_dense_replace": 1,
               "moe_intermediate_size": 1408, "routed_scaling_factor": 1.0, "num_experts_per_tok": 8,
               "n_shared_experts": 1, "norm_topk_prob": True},
    DEEPSEEK_V2: {"n_routed_experts": 64, "n_group": 1, "topk_group": 1, "first_k_dense_replace": 0,
                  "moe_intermediate_size": 1407, "routed_scaling_factor": 1.0, "n_shared_experts": 2,
                  "norm_topk_prob": False, "topk_method": "greedy"},
    DEEPSEEK_V3: {"n_routed_experts": 256, "n_group": 8, "topk_group": 4, "first_k_dense_replace": 3,
                  "moe_intermediate_size": 2048, "routed_scaling_factor": 2.5, "num_experts_per_tok": 8,
                  "n_shared_experts": 1, "norm_topk_prob": True},
    GLM4_MOE_LITE: {"n_routed_experts": 64, "n_group": 1, "topk_group": 1, "moe_intermediate_size": 1536,
                    "routed_scaling_factor": 1.8, "num_experts_per_tok": 4, "n_shared_experts": 1,
                    "norm_topk_prob": True},
    EXAONE_MOE: {"n_group": 1, "topk_group": 1, "first_k_dense_replace": 1, "moe_intermediate_size": 1024,
                 "routed_scaling_factor": 2.5, "num_experts_per_tok": 8, "norm_topk_prob": True},
    MISTRAL4: {"n_routed_experts": 128, "n_group": 1, "topk_group": 1, "first_k_dense_replace": 0,
               "moe_intermediate_size": 2048, "routed_scaling_factor": 1.0, "num_experts_per_tok": 4,
               "n_shared_experts": 1, "norm_topk_prob": True},
    DOTS1: {"n_group": 1, "topk_group": 1, "first_k_dense_replace": 0, "moe_intermediate_size": 1408,
            "routed_scaling_factor": 1.0, "norm_topk_prob": False},  # (its expert counts: no defaults)
    SOLAR_OPEN: {"n_routed_experts": 128, "n_group": 1, "topk_group": 1, "moe_intermediate_size": 1280,
                 "routed_scaling_factor": 1.0, "num_experts_per_tok": 8, "n_shared_experts": 1, "norm_topk_prob": True},
}


def _hunyuan_rope(d: dict[str, Any]) -> dict[str, Any]:
    """`d` with Hunyuan's fixed NTK-alpha RoPE (its checkpoints' "dynamic" type with an `alpha`, which transformers
    reads as a static stretch of the base: theta * alpha ** (D / (D - 2))) written as the default RoPE of that base,
    computed as transformers computes it; a "dynamic" type without an alpha (stretched by the length) is left for
    `_rope` to refuse."""
    rope = dict(d.get("rope_parameters") or d.get("rope_scaling") or {})
    if rope.get("rope_type", rope.get("type")) != "dynamic" or not rope.get("alpha"):
        return d
    dim = d.get("head_dim") or d["hidden_size"] // d["num_attention_heads"]
    theta = (rope.get("rope_theta") or d.get("rope_theta") or 10000.0) * rope["alpha"] ** (dim / (dim - 2))
    return {**d, "rope_theta": theta, "rope_scaling": None, "rope_parameters": {"rope_type": "default", "rope_theta": theta}}


def _hunyuan_experts(d: dict[str, Any]) -> dict[str, Any]:
    """Hunyuan's mixture: in every layer, experts of intermediate_size beside one shared MLP of that width, ungated,
    chosen by a float32 softmax router, the top k renormalised (one expert count and k for all layers)."""
    n, k = d.get("num_experts", 1), d.get("moe_topk", 1)
    if isinstance(k, list):  # a k per layer: temper's is one for all
        k = k[0] if k and len(set(k)) == 1 else k
    if not (_is_int(n) and _is_int(k) and 1 <= k <= n):
        raise ValueError(f"HunYuanMoEV1 num_experts={n!r} and moe_topk={d.get('moe_topk')!r} are not supported "
                         "(temper takes one expert count and one k, between 1 and it, for every layer)")
    return {"n_experts": n, "experts_per_token": k, "renormalize_experts": True, "router_float32": True,
            "shared_expert_ffn_dim": d["intermediate_size"], "expert_weights_float32": True}


def _ernie_experts(d: dict[str, Any]) -> dict[str, Any]:
    """ERNIE 4.5's mixture: a float32 softmax router whose choice adds a bias (moe_statics), the top k renormalised
    (over at least moe_norm_min, which the sum of k softmax probabilities always passes here), beside
    moe_num_shared_experts ungated shared experts, in every layer from moe_layer_start_index on (temper's dense first
    layers). Its multi-token-prediction layer (num_mtp_layers) is not built: its tensors are skipped."""
    n, k = d.get("moe_num_experts", d.get("num_experts", 64)), d.get("moe_k", d.get("num_experts_per_tok", 6))
    width, shared = d.get("moe_intermediate_size", 1536), d.get("moe_num_shared_experts", 2) or 0
    layers = d["num_hidden_layers"]
    start, end, every = (d.get("moe_layer_start_index", 1), d.get("moe_layer_end_index", -1),
                         d.get("moe_layer_interval", 1))
    if not (_is_int(n) and _is_int(k) and 1 <= k <= n and _is_int(width) and width > 0 and _is_int(shared)
            and shared >= 0):
        raise ValueError(f"Ernie4_5_Moe moe_num_experts={n!r}, moe_k={k!r}, moe_intermediate_size={width!r} and "
                         f"moe_num_shared_experts={shared!r} must be positive integers, moe_k at most the experts")
    if every != 1 or end not in (-1, layers - 1) or not 0 <= start < layers:
        raise ValueError(f"Ernie4_5_Moe moe_layer_start_index={start}, moe_layer_end_index={end}, moe_layer_interval="
                         f"{every} are not supported (temper puts experts in every layer after dense first ones)")
    if (d.get("moe_norm_min") or 0.0) >= k / n:
        raise ValueError(f"Ernie4_5_Moe moe_norm_min={d['moe_norm_min']} is not supported (temper renormalises the top "
                         "k by their sum, which a floor that large could replace)")
    return {"n_experts": n, "experts_per_token": k, "expert_ffn_dim": width, "renormalize_experts": True,
            "shared_expert_ffn_dim": shared * width or None, "router_float32": True, "expert_choice_bias": True,
            "dense_layers": start}


def _deepseek_experts(d: dict[str, Any], arch: str) -> dict[str, Any]:
    """DeepSeek's mixtures: shared experts beside the routed ones (n_shared_experts of them, one MLP that wide), dense
    first layers, groups of experts and scaled weights. DeepSeek-V3 (GLM-4.5 too) scores by sigmoids and chooses with a
    bias; DeepSeek-V2 by a float32 softmax, greedily or among the groups whose best expert scores highest
    (topk_method). Multi-token-prediction layers (num_nextn_predict_layers) are not read: their tensors, after the last
    layer's, are skipped on loading (as transformers skips them). DeepSeek's own keys say the same routing or are
    refused."""
    name = arch.removesuffix("ForCausalLM")
    d = _filled(d, _DEEPSEEK_MOE_DEFAULTS[arch])
    v2 = arch == DEEPSEEK_V2
    methods = ("greedy", "group_limited_greedy") if v2 else ("noaux_tc",)
    if d.get("topk_method", methods[0]) not in methods:
        raise ValueError(f"{name} topk_method={d['topk_method']!r} is not supported (temper reads "
                         f"{' or '.join(map(repr, methods))})")
    for key, want in (("scoring_func", "softmax" if v2 else "sigmoid"), ("moe_layer_freq", 1)):
        if d.get(key, want) != want:
            raise ValueError(f"{name} {key}={d[key]!r} is not supported (temper reads {want!r})")
    for key in ("num_experts_per_tok", "n_routed_experts", "n_shared_experts"):
        if key not in d:
            raise ValueError(f"{name} needs {key} (the experts each token is routed to, the experts, the shared ones)")
    n, k = d["n_routed_experts"], d["num_experts_per_tok"]
    grouped = not v2 or d["topk_method"] == "group_limited_greedy"  # DeepSeek-V2's greedy routing ignores n_group
    groups, per_token = (d["n_group"], d["topk_group"]) if grouped else (1, 1)
    dense = (_dense_layers(d, name) if arch == GLM4_MOE_LITE or arch == EXAONE_MOE and d.get("mlp_layer_types")
             else d["first_k_dense_replace"])
    width, shared = d["moe_intermediate_size"], d["n_shared_experts"]
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
    routing = ({"router_scores": "softmax", "router_float32": True, "expert_group_best": 1} if v2
               else {"router_scores": "softmax"} if arch == MISTRAL4  # (its groups scored by their two best)
               else {"router_scores": "sigmoid", "expert_choice_bias": True})
    return {"n_experts": n, "experts_per_token": k, "renormalize_experts": bool(d["norm_topk_prob"]),
            "expert_ffn_dim": width, "shared_expert_ffn_dim": width * shared, **routing, "expert_groups": groups,
            "expert_groups_per_token": per_token, "expert_weights_float32": arch != MISTRAL4,
            "routed_scaling": float(d["routed_scaling_factor"]), "dense_layers": dense}


def _dense_layers(d: dict[str, Any], name: str) -> int:
    """GLM-4.7-Flash's dense first layers, from mlp_layer_types ("dense" layers, then "sparse" ones; null: one)."""
    kinds, n = d.get("mlp_layer_types"), d["num_hidden_layers"]
    if kinds is None:
        return 1
    dense = next((i for i, kind in enumerate(kinds) if kind != "dense"), len(kinds))
    if len(kinds) != n or kinds[dense:] != ["sparse"] * (n - dense):
        raise ValueError(f"{name} mlp_layer_types={kinds} is not supported (temper reads dense layers first, then "
                         f"sparse ones, one per layer of the {n})")
    return dense


_LATENT_DEFAULTS = {DEEPSEEK_V2: (128, 64, 128, 1536), DEEPSEEK_V3: (128, 64, 128, 1536),
                    GLM4_MOE_LITE: (192, 64, 256, 768), MISTRAL4: (64, 64, 128, 1024), YOUTU: (128, 64, 128, 1536)}
"""Their config classes' qk_nope_head_dim, qk_rope_head_dim, v_head_dim and q_lora_rank."""


def _latent_attention(d: dict[str, Any], arch: str) -> dict[str, Any]:
    """The ModelConfig fields of DeepSeek-V2's and V3's latent attention (their config classes' defaults), with
    head_dim: the unrotated and rotated dims of a query or key head."""
    name = arch.removesuffix("ForCausalLM")
    nope, rope, v, q_rank = _LATENT_DEFAULTS[arch]
    nope, rope = d.get("qk_nope_head_dim", nope), d.get("qk_rope_head_dim", rope)
    if not d.get("rope_interleave", True):  # (DeepSeek-V2's are always interleaved)
        raise ValueError(f"{name} rope_interleave=false is not supported (temper reads DeepSeek's interleaved "
                         "rotary layout, as its checkpoints are published)")
    if d.get("attention_bias"):
        raise ValueError(f"{name} attention_bias=true is not supported (temper's latent attention has no biases)")
    if d.get("num_key_value_heads") not in (None, d["num_attention_heads"]):
        raise ValueError(f"{name} num_key_value_heads={d['num_key_value_heads']} must equal num_attention_heads "
                         f"({d['num_attention_heads']}): latent attention expands keys and values for every head")
    v = d.get("v_head_dim", v)
    return {"head_dim": nope + rope, "rope_dim": rope, "kv_lora_rank": d.get("kv_lora_rank", 512),
            "q_lora_rank": d.get("q_lora_rank", q_rank),
            "v_head_size": None if v in (None, nope + rope) else v}


def _softcaps(d: dict[str, Any], arch: str) -> dict[str, float | None]:
    """Gemma 2's (and, where set, Gemma 3's) capped attention scores and logits, with their config classes'
    defaults (Gemma 2: 50 and 30; Gemma 3: none)."""
    defaults = (50.0, 30.0) if arch in (GEMMA2, VAULTGEMMA) else (None, None)
    caps = [d.get(key, default) for key, default in zip(("attn_logit_softcapping", "final_logit_softcapping"),
                                                          defaults, strict=True)]
    return {"attn_softcap": caps[0] and float(caps[0]), "logit_softcap": caps[1] and float(caps[1])}


def _window_layers(d: dict[str, Any], name: str, default_every: int | None, first_ok: bool = False
                   ) -> tuple[int | None, int | None, bool]:
    """(sliding_window, global_every, global_first) of a config whose `layer_types` (or older `sliding_window_pattern`;
    else every `default_every`-th layer global, none where it is None) say which layers attend within the window and
    which to everything. temper lays them out as the last of every `global_every` layers global, Gemma 2's and 3's
    pattern, or, where the architecture allows it (`first_ok`), the first (Ministral-8B's). (None, None, False): every
    layer global; (window, None, False): every layer within the window."""
    n, window = d["num_hidden_layers"], d.get("sliding_window")
    types = d.get("layer_types") or ["full_attention" if last_of_every(i, d.get("sliding_window_pattern", default_every))
                                     else "sliding_attention" for i in range(n)]
    if len(types) != n or set(types) - {"full_attention", "sliding_attention"}:
        raise ValueError(f"key 'layer_types' must name 'full_attention' or 'sliding_attention' for each of the {n} "
                         f"layers, got {types!r}")
    full = [i for i, t in enumerate(types) if t == "full_attention"]
    if window is None or len(full) == n:
        return None, None, False
    if not full:
        return window, None, False
    for first in (False, True) if first_ok else (False,):
        every = (full[1] if len(full) > 1 else n) if first else full[0] + 1
        if every >= 2 and full == [i for i in range(n) if (i % every == 0 if first else last_of_every(i, every))]:
            return window, every, first
    raise ValueError(f"{name} layer_types {types!r} are not supported (temper makes the "
                     f"{'first or the ' if first_ok else ''}last of every N layers global)")


def _exaone_pattern(d: dict[str, Any]) -> int:
    """EXAONE 4's `sliding_window_pattern` as a group size: an int, or "LLLG" (local layers, then a global one)."""
    pattern = d.get("sliding_window_pattern", 4)
    if isinstance(pattern, str):
        if len(pattern) < 2 or pattern.upper() != "L" * (len(pattern) - 1) + "G":
            raise ValueError(f"EXAONE 4 sliding_window_pattern={pattern!r} is not supported (temper makes the last of "
                             "every N layers global: 'LLLG')")
        return len(pattern)
    return pattern


def _nope_layers(d: dict[str, Any], name: str) -> int | None:
    """nope_every of a SmolLM3 or Llama 4 config (`name`): its `no_rope_layers` (1: the layer rotates, 0: NoPE), else a
    NoPE layer at the end of every `no_rope_layer_interval` (4) layers. temper lays NoPE layers out as the last of
    every N."""
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
        raise ValueError(f"{name} no_rope_layers {flags[:n]!r} are not supported (temper makes the last of every N "
                         "layers NoPE)")
    return every


def _gemma3_layers(d: dict[str, Any]) -> tuple[int | None, int | None, float, float | None, dict | None]:
    """`_local_global_rope` of a Gemma 3 config: its windowed layers' own base is `rope_local_base_freq`."""
    if d.get("use_bidirectional_attention"):
        raise ValueError("Gemma 3 use_bidirectional_attention=true is not supported (temper's decoder is causal)")
    return _local_global_rope(d, "Gemma 3", 6, 1e6, "rope_local_base_freq", 1e4)


def _gemma4_layers(d: dict[str, Any]) -> tuple[int | None, int | None, float, float | None, dict | None]:
    """`_local_global_rope` of a Gemma 4 config: its layer_types (by default five windowed layers to one global),
    the last layer always global as Gemma4TextConfig makes it, and a RoPE per layer type (the global layers'
    proportional); the windowed layers' base is kept even where it equals the global one, their heads being another
    width."""
    if d.get("use_bidirectional_attention") == "all":
        raise ValueError("Gemma 4 use_bidirectional_attention='all' is not supported (temper's decoder is causal)")
    window, every, theta, local, scaling = _local_global_rope(d | {"layer_types": _gemma4_layer_types(d)}, "Gemma 4",
                                                              6, 1e6, None, None)
    if every is None:
        raise ValueError("Gemma 4 configs without both windowed and global layers are not supported (its global "
                         "layers' own head width needs windowed ones beside them)")
    return window, every, theta, theta if local is None else local, scaling  # None: the global layers' base


def _gemma4_layer_types(d: dict[str, Any]) -> list[str]:
    """A Gemma 4 config's layer_types as Gemma4TextConfig reads them: by default five windowed layers to one global,
    and the last layer global whatever they say."""
    types = list(d.get("layer_types") or ["full_attention" if last_of_every(i, 6) else "sliding_attention"
                                         for i in range(d["num_hidden_layers"])])
    return types[:-1] + ["full_attention"] if types else types


def _gemma4_fields(d: dict[str, Any], head_dim: int) -> dict[str, Any]:
    """Gemma 4's attention beyond Gemma 3's: global layers with their own head width and kv heads (its published
    configs' global_head_dim and, with attention_k_eq_v, num_global_key_value_heads; transformers 5.25 writes them
    out per layer, per_layer_config), and with attention_k_eq_v values made by their keys' projection; value norms
    and each layer's scalar; 26B-A4B's experts beside the dense MLP; E2B's and E4B's per-layer embeddings and last
    layers taking earlier ones' keys and values (their MLPs twice as wide, with use_double_wide_mlp)."""
    n, shared = d["num_hidden_layers"], d.get("num_kv_shared_layers", 0)
    if not 0 <= shared < n:
        raise ValueError(f"Gemma 4 num_kv_shared_layers={shared} must leave some of the {n} layers making their own keys "
                         "and values")
    per_layer = d.get("hidden_size_per_layer_input") or None
    per_layer_vocab = d["vocab_size_per_layer_input"]
    if per_layer and not (_is_int(per_layer_vocab) and per_layer_vocab > 0):
        raise ValueError(f"key 'vocab_size_per_layer_input' must be a positive integer, got {per_layer_vocab!r}")
    per_layer_fields = {"kv_shared_layers": shared, "kv_shared_wide_mlp": bool(shared and d.get("use_double_wide_mlp")),
                        "per_layer_input_size": per_layer,
                        "per_layer_vocab_size": per_layer_vocab if per_layer and per_layer_vocab != d["vocab_size"]
                        else None}
    values_are_keys = bool(d.get("attention_k_eq_v", False))
    kv_heads = d.get("num_key_value_heads") or d["num_attention_heads"]
    global_head = d.get("global_head_dim", 512)
    global_kv = (d.get("num_global_key_value_heads") if values_are_keys else None) or kv_heads
    if d.get("per_layer_config") is not None:
        global_head, global_kv = _gemma4_per_layer(d, head_dim, kv_heads)
    experts = {}
    if d.get("enable_moe_block"):  # 26B-A4B: its dense MLP (intermediate_size) as a shared expert beside them
        count, k, width = d.get("num_experts"), d.get("top_k_experts"), d.get("moe_intermediate_size")
        if not (_is_int(count) and _is_int(k) and _is_int(width) and 1 <= k <= count and width > 0):
            raise ValueError(f"Gemma 4 enable_moe_block needs num_experts, top_k_experts (between 1 and num_experts) "
                             f"and moe_intermediate_size, got {count!r}, {k!r}, {width!r}")
        experts = {"n_experts": count, "experts_per_token": k, "expert_ffn_dim": width,
                   "shared_expert_ffn_dim": d["intermediate_size"], "experts_own_norms": True,
                   "router_input_norm": True, "expert_weights_float32": True}
    return {"global_head_size": None if global_head == head_dim else global_head,
            "global_kv_heads": None if global_kv == kv_heads else global_kv,
            "global_values_are_keys": values_are_keys, "value_norm": True, "layer_scalar": True, **experts,
            **per_layer_fields}


def _gemma4_per_layer(d: dict[str, Any], head_dim: int, kv_heads: int) -> tuple[int, int]:
    """(head width, kv heads) of the global layers from transformers 5.25's per_layer_config ({layer: {"head_dim",
    "num_key_value_heads"}}): the same for every global layer, and nothing for the windowed ones."""
    per_layer, types = d["per_layer_config"], _gemma4_layer_types(d)
    wanted = None
    for i in range(d["num_hidden_layers"]):
        got = per_layer.get(str(i), per_layer.get(i)) or {}
        if not isinstance(got, dict) or set(got) - {"head_dim", "num_key_value_heads"}:
            raise ValueError(f"key 'per_layer_config.{i}' must be an object of head_dim and num_key_value_heads, got "
                             f"{got!r}")
        if types[i] == "full_attention":
            wanted = got if wanted is None else wanted
            if got != wanted:
                raise ValueError(f"Gemma 4 per_layer_config {per_layer!r} is not supported (temper shapes every global "
                                 "layer alike)")
        elif got:
            raise ValueError(f"Gemma 4 per_layer_config.{i} {got!r} is not supported (temper shapes only the global "
                             "layers apart)")
    wanted = wanted or {}
    return wanted.get("head_dim", head_dim), wanted.get("num_key_value_heads", kv_heads)


def _local_global_rope(d: dict[str, Any], name: str, default_every: int, default_theta: float,
                       local_key: str | None, local_default: float | None
                       ) -> tuple[int | None, int | None, float, float | None, dict | None]:
    """(sliding_window, global_every, rope_theta, rope_local_theta, rope_scaling) of a config whose windowed layers
    (`_window_layers`) have a RoPE of their own (Gemma 3, OLMo 3): `rope_parameters` per layer type (transformers
    5), or `rope_theta`, `rope_scaling` (the global layers') and the local base `local_key` (None: rope_theta, as
    OLMo 3's windowed layers take it, unscaled). rope_local_theta is None where both kinds rotate alike."""
    window, every, _ = _window_layers(d, name, default_every)
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


def _rope(d: dict[str, Any], phi3: bool = False, default_theta: float = 10000.0) -> tuple[float, dict | None, dict]:
    """(theta, temper's rope_scaling, the raw dict) from either spelling: transformers 4.x
    `rope_theta` + `rope_scaling`, or 5.x `rope_parameters`. phi3: Phi3Config's readings (below). default_theta: the
    config class's, where a config gives none."""
    rope = dict(d.get("rope_scaling") or d.get("rope_parameters") or {})
    theta = d.get("rope_theta") or rope.get("rope_theta") or default_theta
    kind = rope.get("rope_type", rope.get("type", "default"))
    if kind == "mrope":  # Qwen2-VL's M-RoPE: its three position streams are equal for text, which is RoPE
        kind = "default"
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
    if kind in ("linear", "dynamic"):  # (dynamic: the plain RoPE up to max_position_embeddings, which temper keeps)
        return theta, {"rope_type": kind, "factor": rope["factor"]}, rope
    if kind in ("yarn", "longrope"):  # without a factor (DeepSeek-V3, Phi-3) the ratio of the two lengths
        optional = {k: rope[k] for k in ROPE_OPTIONAL_KEYS[kind] if rope.get(k) is not None}
        tables = {k: rope[k] for k in ("short_factor", "long_factor") if k in rope} if kind == "longrope" else {}
        return theta, {"rope_type": kind, **tables, "factor": rope.get("factor") or max_len / old_len,
                       "original_max_position_embeddings": old_len, **optional}, rope
    if kind == "proportional":  # Gemma 4's global layers
        factor = {"factor": float(rope["factor"])} if rope.get("factor") not in (None, 1.0) else {}
        return theta, {"rope_type": kind, "partial_rotary_factor": rope.get("partial_rotary_factor", 1.0),
                       **factor}, rope
    if kind in (None, "default"):
        return theta, None, rope
    raise ValueError(f"rope type {kind!r} is not supported (temper reads default, linear, dynamic, llama3, yarn, "
                     "longrope and proportional)")


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


def hf_architecture(cfg: ModelConfig) -> str:
    """The architecture to export `cfg` as: the one it was loaded from, else the one its fields match."""
    arch = cfg.hf_architecture
    if arch is None:
        if cfg.window_chunked or cfg.qk_l2_norm or cfg.nope_query_scale is not None or cfg.expert_input_weights:
            arch = LLAMA4
        elif cfg.has_linear_layers and cfg.linear_layer == "mamba":
            arch = JAMBA if cfg.linear_bcdt_weights else FALCON_MAMBA if cfg.linear_bcdt_eps is not None else MAMBA
        elif cfg.attention_layers == () and len(set(cfg.no_mlp_layers)) == cfg.n_layers:
            arch = MAMBA2
        elif cfg.embed_norm or cfg.rope_reversed or cfg.norm_weightless and cfg.norm == "rmsnorm":
            arch = NANOCHAT
        elif cfg.mlp == "xielu":
            arch = APERTUS
        elif cfg.mlp == "relu2":  # (Arcee: Llama's blocks with it)
            arch = ((NEMOTRON if cfg.norm_unit_offset else JAIS2) if cfg.norm == "layernorm"
                    else NEMOTRON_H if cfg.norm_cast_after or cfg.has_linear_layers else ARCEE)
        elif (cfg.pos, cfg.norm, cfg.mlp) == ("rope", "layernorm", "swiglu") and cfg.norm_bias:
            arch = STABLELM
        elif (cfg.pos, cfg.norm, cfg.mlp) == ("rope", "layernorm", "gelu") and not cfg.bias and not cfg.qkv_bias:
            arch = FALCON  # (GPT-NeoX, StarCoder2 and Phi have biases everywhere)
        elif (cfg.pos, cfg.norm, cfg.mlp) == ("rope", "layernorm", "gelu") and cfg.attn_bias is False and cfg.bias:
            arch = GPTJ
        elif (cfg.pos, cfg.norm, cfg.mlp) == ("rope", "layernorm", "gelu"):
            arch = (PHI if cfg.head_bias or cfg.parallel_block and not cfg.parallel_mlp_norm
                    else GPT_NEOX if cfg.parallel_block or cfg.gelu_exact or cfg.rope_dim is not None else STARCODER2)
        elif cfg.parallel_block:
            arch = COHERE2 if cfg.sliding_window else COHERE
        elif (cfg.pos, cfg.norm, cfg.mlp) == ("rope", "layernorm", "swiglu"):
            arch = DBRX if cfg.n_experts else OLMO
        elif cfg.has_linear_layers and cfg.linear_layer != "gated_deltanet":
            bamba = cfg.rope_dim is not None  # (Granite 4.0 rotates whole heads)
            arch = ((BAMBA if bamba else GRANITE_HYBRID) if cfg.linear_layer == "mamba2" else LFM2_MOE if cfg.n_experts
                    else LFM2)
        elif cfg.pos == "learned" and cfg.norm == "layernorm" and cfg.mlp == "gelu":
            arch = GPT_BIGCODE if cfg.kv_heads == 1 < cfg.n_heads else GPT2  # (StarCoder's one kv head)
        elif cfg.pos == "rope" and cfg.norm == "rmsnorm" and cfg.mlp == "geglu":
            gemma4 = (cfg.global_shaped or cfg.value_norm or cfg.layer_scalar or cfg.experts_own_norms
                      or cfg.kv_shared_layers or cfg.per_layer_input_size)
            arch = (GEMMA4 if gemma4 else GEMMA3 if cfg.qk_norm else GEMMA2 if cfg.sandwich_norm
                    else VAULTGEMMA if cfg.attn_softcap or cfg.logit_softcap or cfg.sliding_window else GEMMA)
        elif cfg.full_attention_every is not None:
            arch = QWEN3_5_MOE if cfg.n_experts else QWEN3_5
        elif cfg.pos == "rope" and cfg.norm == "rmsnorm" and cfg.mlp == "swiglu" and not cfg.pre_norm:
            arch = (FLEX_OLMO if cfg.n_experts else EXAONE4 if not cfg.qk_norm_whole else OLMO3 if cfg.sliding_window
                    else OLMO2)
        elif cfg.pos == "rope" and cfg.norm == "rmsnorm" and cfg.mlp == "swiglu" and cfg.n_experts:
            latent = (MISTRAL4 if cfg.query_scale_beta is not None  # (the queries' temperature: Mistral 4's alone)
                      else DEEPSEEK_V3 if cfg.router_scores == "sigmoid" else DEEPSEEK_V2)
            granite = cfg.embed_multiplier or cfg.residual_multiplier or cfg.logit_divisor
            arch = (GPT_OSS if cfg.attn_sinks and cfg.swiglu_limit is not None  # (sinks beside clamped SwiGLU)
                    else GRANITE_MOE_SWA if cfg.attn_sinks else latent if cfg.kv_lora_rank
                    else (GRANITE_MOE_SHARED if cfg.shared_expert_ffn_dim else GRANITE_MOE) if granite
                    else HUNYUAN_MOE if cfg.qk_norm_after_rope
                    else ERNIE4_5_MOE if cfg.router_scores == "softmax" and cfg.expert_choice_bias
                    else MINIMAX_M2 if cfg.router_scores == "sigmoid" and cfg.shared_expert_ffn_dim is None
                    else EXAONE_MOE if cfg.router_scores == "sigmoid" and cfg.nope_every  # (its global layers' NoPE)
                    else GLM4_MOE if cfg.router_scores == "sigmoid" else QWEN2_MOE if cfg.shared_expert_ffn_dim
                    else OLMOE if cfg.qk_norm_whole else QWEN3_MOE if cfg.qk_norm else MIXTRAL)
        elif cfg.pos == "rope" and cfg.norm == "rmsnorm" and cfg.mlp == "swiglu" and cfg.sandwich_norm:
            granite = cfg.embed_multiplier or cfg.residual_multiplier or cfg.logit_divisor
            arch = HYPERCLOVAX if granite else GLM4  # (Granite's multipliers with Peri-LN's norms: HyperCLOVA X's)
        elif cfg.pos == "rope" and cfg.norm == "rmsnorm" and cfg.mlp == "swiglu":
            granite = cfg.embed_multiplier or cfg.residual_multiplier or cfg.logit_divisor
            arch = (YOUTU if cfg.kv_lora_rank  # (latent attention beside dense MLPs)
                    else GRANITE_SWA if cfg.attn_sinks  # (GPT-OSS's sinks beside dense MLPs)
                    else MINISTRAL3 if cfg.query_scale_beta is not None
                    else HUNYUAN if cfg.qk_norm_after_rope else QWEN3 if cfg.qk_norm
                    else GLM1 if cfg.qkv_bias and not cfg.bias and cfg.rope_dim is not None  # (partial RoPE)
                    else QWEN2 if cfg.qkv_bias and not cfg.bias else MINISTRAL if cfg.global_every
                    else MISTRAL if cfg.sliding_window
                    else SMOLLM3 if cfg.nope_every else GRANITE if granite else ERNIE4_5 if cfg.rope_float32 else LLAMA)
        else:
            raise ValueError(
                f"no Hugging Face architecture matches pos={cfg.pos!r}, norm={cfg.norm!r}, mlp={cfg.mlp!r}: "
                "GPT2LMHeadModel needs learned/layernorm/gelu, Starcoder2ForCausalLM and GPTNeoXForCausalLM "
                "rope/layernorm/gelu, the others "
                "rope/rmsnorm/swiglu (geglu: Gemma)")
    why = _cannot_express(arch, cfg)
    if why:
        raise ValueError(f"{arch} cannot express this model: {why}")
    return arch


def _cannot_express(arch: str, cfg: ModelConfig) -> str | None:
    """Why `arch` cannot hold `cfg` exactly, or None."""
    if arch not in SUPPORTED_ARCHITECTURES:
        return f"temper writes {', '.join(SUPPORTED_ARCHITECTURES)}"
    if arch in _READ_APART:
        return _cannot_round_trip(arch, cfg)
    if cfg.attn_bias is not None and cfg.attn_bias != cfg.bias:
        return "its attention has biases where its other layers do (GPTJForCausalLM's has none beside them: attn_bias)"
    if cfg.window_chunked or cfg.qk_l2_norm or cfg.nope_query_scale is not None or cfg.expert_input_weights:
        return ("it has no chunked attention, weightless q/k norms after RoPE, temperature of the queries without "
                "positions or experts weighing their inputs (Llama4ForCausalLM has)")
    gemma_parts = (cfg.mlp == "geglu", cfg.norm_unit_offset, cfg.scale_embeddings)
    if arch == GPT2:
        if (cfg.pos, cfg.norm, cfg.mlp) != ("learned", "layernorm", "gelu"):
            return "it needs learned positions, LayerNorm and a GELU MLP"
        if cfg.kv_heads != cfg.n_heads or cfg.head_dim * cfg.n_heads != cfg.dim:
            return "it has no grouped-query attention or head_size"
        if cfg.gelu_exact:
            return "its GELU is the tanh approximation (GPTNeoXForCausalLM's may be exact)"
        return "it has no sliding window" if cfg.sliding_window else None
    norm = "layernorm" if arch in (*COHERES, STARCODER2, GPT_NEOX, PHI, OLMO, STABLELM) else "rmsnorm"
    if (cfg.pos, cfg.norm) != ("rope", norm):
        return f"it needs RoPE and norm={norm!r}"
    if arch == GPT_NEOX and (cfg.parallel_block != cfg.parallel_mlp_norm or cfg.kv_heads != cfg.n_heads
                             or cfg.head_dim * cfg.n_heads != cfg.dim):
        return ("its attention and MLP sit side by side on two norms (parallel_mlp_norm) or one after the other, its "
                "heads hidden_size / num_attention_heads wide, without grouped-query attention")
    if cfg.parallel_block != (arch in (*COHERES, PHI)) and arch not in (GPT_NEOX, STABLELM):
        return ("its attention and MLP sit side by side (parallel_block)" if arch in (*COHERES, PHI)
                else "its MLP follows its attention (CohereForCausalLM has them side by side: parallel_block)")
    if cfg.parallel_mlp_norm and arch != GPT_NEOX:
        return "its parallel MLP reads attention's norm (GPTNeoXForCausalLM's has its own: parallel_mlp_norm)"
    if arch == STABLELM and (cfg.bias or cfg.norm_bias is not True or cfg.parallel_mlp_norm):
        return ("its LayerNorms have biases and its linear layers none but q, k and v's (bias=false, norm_bias=true), "
                "a parallel MLP reading attention's norm")
    if cfg.norm_bias is not None and cfg.norm_bias != cfg.bias and arch != STABLELM:
        return "its LayerNorms have biases where its linear layers do (StableLmForCausalLM's alone: norm_bias)"
    if cfg.gelu_exact and arch != GPT_NEOX:
        return "its GELU is the tanh approximation (GPTNeoXForCausalLM's may be exact)"
    if cfg.head_bias != (arch == PHI):
        return ("its head has a bias (head_bias)" if arch == PHI
                else "its head has no bias (PhiForCausalLM's has: head_bias)")
    if arch == COHERE2 and cfg.head_dim * cfg.n_heads != cfg.dim:
        return "its heads are hidden_size / num_attention_heads wide (Cohere2Config sets head_dim so)"
    if arch == GEMMA4:
        if (cfg.mlp, cfg.norm_unit_offset, cfg.norm_cast_after, cfg.scale_embeddings, cfg.tie_embeddings) != (
                "geglu", False, True, True, True):
            return ("it needs mlp='geglu', norm_cast_after without norm_unit_offset, scale_embeddings and tied "
                    "embeddings")
        if not (cfg.value_norm and cfg.layer_scalar and cfg.attn_scale_dim == 1 and cfg.rope_local_theta):
            return "it has value norms, layer scalars, unscaled attention scores (attn_scale_dim=1) and rope_local_theta"
        if cfg.global_kv_heads not in (None, cfg.kv_heads) and not cfg.global_values_are_keys:
            return "its global layers have kv heads of their own only with their values made by the keys' projection"
    elif arch in GEMMAS:
        if not all(gemma_parts) or not cfg.tie_embeddings:
            return "it needs mlp='geglu', norm_unit_offset, scale_embeddings and tied embeddings"
    elif arch in HYBRID:
        if (cfg.mlp, cfg.norm_unit_offset, cfg.scale_embeddings) != ("swiglu", True, False):
            return "it needs mlp='swiglu' and norm_unit_offset, without scale_embeddings"
    elif arch == NEMOTRON_H:
        if (cfg.mlp, cfg.norm_unit_offset, cfg.scale_embeddings, cfg.norm_cast_after, cfg.nope_every) != (
                "relu2", False, False, True, 1):
            return ("it needs mlp='relu2', norms that scale before rounding (norm_cast_after) and attention without "
                    "positions (nope_every=1)")
        if cfg.n_experts and not (cfg.router_scores == "sigmoid" and cfg.expert_choice_bias and cfg.router_float32
                                  and cfg.shared_expert_ffn_dim and not cfg.shared_expert_gate
                                  and cfg.expert_group_best == 2 and not cfg.dense_layers):
            return ("its mixtures are in every MLP, choosing experts by float32 sigmoid scores plus a choice bias "
                    "(groups scored by their two best), beside an ungated shared expert")
    elif arch in (ARCEE, NANOCHAT):
        if any(gemma_parts) or cfg.mlp != "relu2":
            return "it needs mlp='relu2' (a squared-ReLU MLP, not gated)"
    elif arch in (STARCODER2, GPT_NEOX, PHI):
        if any(gemma_parts) or cfg.mlp != "gelu" or not cfg.bias:
            return "it needs mlp='gelu' (GPT-2's MLP) and biases on every layer and norm"
    elif any(gemma_parts) or cfg.mlp != "swiglu":
        return "it needs mlp='swiglu' without norm_unit_offset or scale_embeddings"
    if arch == NANOCHAT and not (cfg.norm_weightless and cfg.embed_norm and cfg.rope_reversed
                                 and cfg.head_dim * cfg.n_heads == cfg.dim):
        return ("its norms have no weights, one normalises the embeddings, its RoPE turns the other way "
                "(norm_weightless, embed_norm, rope_reversed), its heads hidden_size / num_attention_heads wide")
    if arch == OLMO and not (cfg.norm_weightless and cfg.norm_eps == 1e-5):
        return "its LayerNorms have neither weights nor biases (norm_weightless), their epsilon fixed at 1e-5"
    if cfg.norm_weightless and arch not in (NANOCHAT, OLMO):
        return "its norms have weights (NanoChatForCausalLM's and OlmoForCausalLM's have none: norm_weightless)"
    if (cfg.embed_norm or cfg.rope_reversed) and arch != NANOCHAT:
        return ("it does not normalise its embeddings, and its RoPE turns the usual way (NanoChatForCausalLM's: "
                "embed_norm, rope_reversed)")
    if (cfg.query_scale_beta is not None and arch not in (MINISTRAL3, MISTRAL4)
            or cfg.query_scale_beta is None and arch == MINISTRAL3):
        return ("its queries take Llama 4's temperature (query_scale_beta)" if arch == MINISTRAL3
                else "its queries take no temperature (Ministral3ForCausalLM's and Mistral4ForCausalLM's do: "
                "query_scale_beta)")
    if cfg.qkv_clip is not None and arch not in (OLMO, OLMOE):
        return "it does not clamp queries, keys and values (OLMo and OLMoE do: qkv_clip)"
    if cfg.no_mlp_layers and arch not in (NEMOTRON_H, *MIXERS_ALONE):
        return "every block has an MLP (NemotronHForCausalLM has blocks without: no_mlp_layers)"
    gemma4_parts = (cfg.global_shaped, cfg.value_norm, cfg.layer_scalar, cfg.experts_own_norms, cfg.kv_shared_layers,
                    cfg.per_layer_input_size)
    if arch != GEMMA4 and any(gemma4_parts):
        return ("its global layers are shaped as the others, with no value norms, layer scalars, experts normalised "
                "apart, shared keys and values or per-layer embeddings (Gemma4ForCausalLM has them)")
    if arch == GEMMA4 and cfg.n_experts and not (cfg.experts_own_norms and cfg.router_input_norm
                                                  and cfg.renormalize_experts and not cfg.shared_expert_gate):
        return ("its experts sit beside its dense MLP (an ungated shared expert), normalised apart, routed through "
                "scales of the router's input and of each expert (router_input_norm), their weights renormalised")
    if arch != GEMMA4 and (cfg.rope_scaling or {}).get("rope_type") == "proportional":
        return "it has no proportional RoPE (Gemma4ForCausalLM has)"
    hybrid = (cfg.full_attention_every is not None, cfg.attn_output_gate)
    if arch in HYBRID and not (all(hybrid) and cfg.attention_layers is None and cfg.linear_layer == "gated_deltanet"):
        return ("it has Gated DeltaNet layers between softmax ones in a regular pattern (full_attention_every) and "
                "gated attention (attn_output_gate)")
    if arch in LFM2S and (cfg.linear_layer, cfg.attn_output_gate, cfg.head_dim * cfg.n_heads) != (
            "short_conv", False, cfg.dim):
        return ("its linear layers are short convolutions (linear_layer='short_conv'), its attention ungated, its heads "
                "hidden_size / num_attention_heads wide")
    if arch == NEMOTRON_H and (cfg.attn_output_gate or cfg.has_linear_layers and cfg.linear_layer != "mamba2"):
        return "its linear layers are Mamba 2's (linear_layer='mamba2'), its attention ungated"
    if arch in (GRANITE_HYBRID, BAMBA, MAMBA2) and (cfg.attn_output_gate or cfg.has_linear_layers and (
            cfg.linear_layer != "mamba2" or cfg.linear_heads[1] * cfg.linear_sizes[1] % cfg.dim)):
        return ("its linear layers are Mamba 2's (linear_layer='mamba2'), their heads filling a whole multiple of dim "
                "(mamba_expand), its attention ungated")
    if arch == MAMBA2 and not (cfg.linear_layer == "mamba2" and cfg.attention_layers == ()
                               and len(set(cfg.no_mlp_layers)) == cfg.n_layers and not cfg.norm_cast_after):
        return ("every layer is a Mamba 2 mixer alone (linear_layer='mamba2', attention_layers=(), every block in "
                "no_mlp_layers), its norms rounding before they scale")
    if arch == BAMBA and (cfg.rotary_dim != cfg.head_dim // 2 or cfg.nope_every or cfg.rope_scaling):
        return "its attention layers turn the first half of each head by unscaled RoPE (BambaConfig fixes the share)"
    if arch in MAMBAS and not (cfg.linear_layer == "mamba" and cfg.attention_layers == ()
                               and len(set(cfg.no_mlp_layers)) == cfg.n_layers and not cfg.norm_cast_after
                               and (cfg.linear_bcdt_eps is not None) == (arch == FALCON_MAMBA)):
        return ("every layer is a Mamba mixer alone (linear_layer='mamba', attention_layers=(), every block in "
                "no_mlp_layers), its norms rounding before they scale, "
                + ("its steps, B and C normalised (linear_bcdt_eps)" if arch == FALCON_MAMBA
                   else "its steps, B and C not normalised (FalconMambaForCausalLM normalises them)"))
    if arch == JAMBA:
        why = _jamba_cannot_express(cfg)
        if why:
            return why
    if arch not in (*HYBRID, *LFM2S, *MAMBA2_HYBRIDS, *MIXERS_ALONE, JAMBA) and (any(hybrid) or cfg.has_linear_layers):
        return "it has neither linear attention layers nor gated attention (Qwen3_5ForCausalLM has both)"
    if arch in (LLAMA, GPT_OSS, GRANITE, *ERNIES, ARCEE) and cfg.qkv_bias and not cfg.bias:
        return "its attention_bias also covers o_proj: q/k/v-only biases are Qwen2's"
    if arch == QWEN2 and (cfg.bias or not cfg.qkv_bias):
        return "it has biases on q, k and v only"
    if arch in (QWEN2_MOE, *GLM, SOLAR_OPEN) and cfg.bias:
        return "it has biases on q, k and v at most"
    unbiased = (MISTRAL, QWEN3, *GEMMAS, PHI3, *POST_NORM, MIXTRAL, QWEN3_MOE, SMOLLM3, OLMOE, MINIMAX_M2, ERNIE4_5_MOE,
                *HUNYUANS, *COHERES, *LFM2S, *GRANITE_MOES, *MAMBA2_HYBRIDS, *MIXERS_ALONE, JAMBA, NANOCHAT, OLMO,
                MINISTRAL3, MINISTRAL, CWM)
    if arch in unbiased and (cfg.bias or cfg.qkv_bias):
        return "it has no biases"
    normed = (QWEN3, GEMMA3, GEMMA4, QWEN3_MOE, *EXAONES, *WHOLE_QK_NORM, *HYBRID, *HUNYUANS, *LFM2S, NANOCHAT, DOTS1)
    if cfg.qk_norm_after_rope != (arch in (*HUNYUANS, NANOCHAT)):
        return ("its q/k norms come after RoPE" if arch in (*HUNYUANS, NANOCHAT)
                else "its q/k norms come before RoPE (HunYuanDenseV1ForCausalLM normalises after)")
    if bool(cfg.kv_lora_rank) != (arch in LATENT):
        return ("its attention is latent (kv_lora_rank), with experts" if arch in LATENT
                else "it has no latent attention (DeepseekV2ForCausalLM and DeepseekV3ForCausalLM have)")
    if cfg.qk_norm != (arch in normed) and arch != GLM4_MOE:  # GLM-4.5's are optional (use_qk_norm)
        return "it has q/k norms" if arch in normed else "it has no q/k norms (Qwen3, Qwen3-MoE, Gemma 3, OLMo 2 do)"
    if cfg.qk_norm_whole != (arch in WHOLE_QK_NORM):
        return ("its q/k norms span all heads" if arch in WHOLE_QK_NORM
                else "it normalises each head's query and key (OLMo 2 and 3 and OLMoE normalise all heads at once)")
    if cfg.pre_norm != (arch not in POST_NORM):
        return ("its blocks normalise only the sublayers' outputs" if arch in POST_NORM
                else "it normalises each sublayer's input (OLMo 2 and 3 and EXAONE 4 do not)")
    if bool(cfg.n_experts) != (arch in (*MOE_ARCHITECTURES, GRANITE_MOE, GRANITE_MOE_SHARED)) and arch not in (
            GEMMA4, GRANITE_HYBRID, NEMOTRON_H, JAMBA):
        return ("its MLPs are mixtures of experts (n_experts)" if arch in MOE_ARCHITECTURES
                else "its MLP is dense (MixtralForCausalLM and Qwen3MoeForCausalLM have experts)")
    # (expert_weights_float32 is not checked: either rounding is a 16-bit model's last bit, and equal in float32.)
    if cfg.expert_layers is not None and arch not in (JAMBA, *SPARSE_STEP):
        return ("its mixtures fill every block after the dense first ones (JambaForCausalLM's alternate, Qwen3-MoE's "
                "may skip some: expert_layers)")
    if arch in (*MIXTRAL_NAMES, GPT_OSS) and (not cfg.renormalize_experts or cfg.expert_hidden_dim != cfg.hidden_dim):
        return "it renormalises the chosen experts' weights, and its experts are ffn_dim wide"
    if arch == QWEN3_5_MOE and not cfg.renormalize_experts:  # (Qwen3-Next's: norm_topk_prob)
        return "it renormalises the chosen experts' weights"
    if arch in (OLMOE, FLEX_OLMO) and cfg.expert_hidden_dim != cfg.hidden_dim:
        return "its experts are ffn_dim wide (intermediate_size)"
    if arch == HUNYUAN_MOE and (cfg.shared_expert_gate or cfg.shared_expert_ffn_dim != cfg.hidden_dim
                                or cfg.expert_hidden_dim != cfg.hidden_dim
                                or not (cfg.router_float32 and cfg.renormalize_experts)):
        return ("its experts and the shared one beside them are ffn_dim wide, ungated, chosen by a float32 router that "
                "renormalises their weights")
    if arch == ERNIE4_5_MOE and (cfg.shared_expert_gate or (cfg.shared_expert_ffn_dim or 0) % cfg.expert_hidden_dim
                                 or not (cfg.router_float32 and cfg.renormalize_experts)):
        return ("its shared experts are ungated, a whole number of experts wide, and its float32 router renormalises "
                "the chosen experts' weights")
    if (cfg.shared_expert_ffn_dim is not None, cfg.shared_expert_gate) != (arch in (*SHARED_GATED, *DEEPSEEK_MOE),
                                                                            arch in SHARED_GATED) and arch not in (
                                                                                GEMMA4, ERNIE4_5_MOE, HUNYUAN_MOE,
                                                                                *GRANITE_MOES, NEMOTRON_H):
        return ("its experts have a gated shared expert beside them" if arch in SHARED_GATED
                else "its experts have shared ones beside them, ungated" if arch in DEEPSEEK_MOE
                else "it has no shared expert (Qwen2MoeForCausalLM has one, gated)")
    if arch in GRANITE_MOES and cfg.n_experts and (cfg.shared_expert_gate or not cfg.renormalize_experts
                                                   or arch == GRANITE_MOE and cfg.shared_expert_ffn_dim):
        return ("its experts' chosen weights are renormalised, beside no shared MLP" if arch == GRANITE_MOE else
                "its experts' chosen weights are renormalised, beside an ungated shared MLP or none")
    if arch in DEEPSEEK_MOE and cfg.shared_expert_ffn_dim % cfg.expert_hidden_dim:
        return "its shared experts are a whole number of experts wide"
    deepseek = (cfg.router_scores == "sigmoid", cfg.expert_choice_bias)
    if arch in BIASED_SIGMOID and not all(deepseek):
        return "it scores experts by sigmoids and chooses them with a bias"
    if arch == ERNIE4_5_MOE and deepseek != (False, True):
        return "it scores experts by a softmax and chooses them with a bias"
    if arch == LFM2_MOE and not (deepseek[0] and cfg.router_float32 and cfg.shared_expert_ffn_dim is None):
        return "it scores experts by sigmoids in float32 (a choice bias optional), with no shared expert"
    if arch not in (*BIASED_SIGMOID, ERNIE4_5_MOE, LFM2_MOE, NEMOTRON_H) and any(deepseek):
        return "it scores experts by a softmax, without a choice bias (DeepseekV3ForCausalLM has them)"
    if arch in DEEPSEEK_MOE and cfg.expert_groups > 1 and cfg.expert_group_best != (1 if arch == DEEPSEEK_V2 else 2):
        return f"its groups of experts score their {'best expert' if arch == DEEPSEEK_V2 else 'two best experts'}"
    if arch not in (*DEEPSEEK_MOE, NEMOTRON_H) and (cfg.expert_groups != 1 or cfg.routed_scaling != 1.0
                                                    and arch != LFM2_MOE or cfg.dense_layers
                                                    and arch not in (ERNIE4_5_MOE, LFM2_MOE)):
        return ("it routes without groups of experts, scaling or dense layers (DeepseekV2ForCausalLM, "
                "DeepseekV3ForCausalLM and Glm4MoeForCausalLM have them)")
    if cfg.sandwich_norm != (arch in (*SANDWICH, *POST_NORM)):
        return ("it has norms on the sublayers' outputs" if arch in (*SANDWICH, *POST_NORM)
                else "it has no norms on the sublayers' outputs (Gemma 2 and 3 and OLMo 2 and 3 do)")
    if cfg.attn_scale_dim is not None and arch not in (*CAPPED, *GRANITES):
        return ("it scales attention scores by head_dim ** -0.5 (Gemma 2 and 3 have query_pre_attn_scalar, Granite "
                "attention_multiplier)")
    logit_divisor = cfg.logit_divisor and arch not in COHERES  # Cohere's logit_scale
    if (cfg.embed_multiplier or cfg.residual_multiplier or logit_divisor) and arch not in GRANITES:
        return "it has no embedding, residual or logit multipliers (GraniteForCausalLM has)"
    if cfg.global_first and arch not in (MINISTRAL, CWM):
        return "its global layers are the last of each group (MinistralForCausalLM's may be the first: global_first)"
    if cfg.global_every and arch not in LOCAL_GLOBAL:
        return "it has no global layers between windowed ones (Gemma 2 and 3 and OLMo 3 do)"
    if cfg.rope_local_theta and not (arch in (GEMMA3, GEMMA4)
                                     or arch == OLMO3 and cfg.rope_local_theta == cfg.rope_theta):
        return ("its windowed layers share the global layers' RoPE base (Gemma3ForCausalLM has "
                "rope_local_base_freq)")
    if (cfg.attn_softcap or cfg.logit_softcap and arch != NANOCHAT) and arch not in CAPPED:
        return "it caps neither attention scores nor logits (Gemma 2 and 3 do)"
    if arch == GEMMA4 and cfg.attn_softcap:
        return "it does not cap attention scores"
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
    if cfg.rope_dim is not None and arch not in (PHI3, PHI, *GLM, *LATENT, *HYBRID, MINIMAX_M2, BAMBA, GPT_NEOX,
                                                 STABLELM):
        return "it rotates whole heads (Phi3ForCausalLM and Glm4ForCausalLM have partial_rotary_factor)"
    if (cfg.rope_dim is not None and arch not in LATENT
            and int(cfg.head_dim * (cfg.rope_dim / cfg.head_dim)) != cfg.rope_dim):
        return f"partial_rotary_factor cannot say rope_dim={cfg.rope_dim} of head_dim={cfg.head_dim} exactly"
    if arch == GPT_OSS and cfg.expert_weights_float32:
        return "it rounds the routing weights before it weighs the experts' outputs"
    if cfg.nope_every and arch not in (SMOLLM3, *EXAONES, COHERE2, NEMOTRON_H, JAMBA) and not (
            arch == GRANITE_HYBRID and cfg.nope_every == 1):
        return ("it rotates every layer (SmolLM3ForCausalLM has NoPE layers)" if arch != GRANITE_HYBRID
                else "its attention layers all take RoPE or none do (nope_every=1)")
    if arch in (*EXAONES, COHERE2) and cfg.nope_every != cfg.global_every:
        return "its global layers, and they alone, take no positions (nope_every = global_every)"
    if arch == COHERE2 and not cfg.sliding_window:
        return "its layers that take positions attend within a sliding window"
    if cfg.sliding_window and arch not in (MISTRAL, PHI3, *LOCAL_GLOBAL, MIXTRAL, STARCODER2, MINISTRAL3):
        return "it has no sliding window"
    return None


def _jamba_cannot_express(cfg: ModelConfig) -> str | None:
    """Why JambaForCausalLM cannot hold `cfg` exactly, or None: the parts of Jamba that the other architectures'
    checks do not name."""
    if cfg.has_linear_layers and not (cfg.linear_layer == "mamba" and cfg.linear_bcdt_weights
                                      and cfg.linear_bcdt_eps == cfg.norm_eps):
        return ("its linear layers are Mamba's (linear_layer='mamba'), their steps, B and C normalised with weights and "
                "the model's norm_eps (linear_bcdt_weights)")
    if cfg.nope_every != 1 or cfg.norm_cast_after or cfg.attn_output_gate:
        return "its attention takes no positions (nope_every=1) and no gate, its norms rounding before they scale"
    if cfg.has_linear_layers and cfg.linear_heads[1] % cfg.dim:
        return "its Mamba layers' channels are a whole multiple of dim (mamba_expand)"
    if cfg.n_experts and (cfg.renormalize_experts or cfg.expert_hidden_dim != cfg.hidden_dim):
        return "its experts are ffn_dim wide, weighed by their softmax over all experts (not renormalised)"
    for kind, layers in _jamba_layers(cfg).items():
        if _jamba_period(cfg.n_layers, layers) is None:
            return (f"its {'attention' if kind == 'attn' else 'expert'} layers are those whose index leaves one "
                    f"remainder by one period ({kind}_layer_period), not {list(layers)}")
    return None


def _jamba_layers(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Jamba's two layer patterns, by its config keys' prefix: the attention layers ("attn") and those with experts."""
    return {"attn": tuple(i for i in range(cfg.n_layers) if not cfg.is_linear(i)),
            "expert": tuple(i for i in range(cfg.n_layers) if cfg.has_experts(i))}


def _periodic(n: int, period: int, offset: int) -> tuple[int, ...]:
    """The layers of `n` that JambaConfig's (period, offset) names: layer % period == offset."""
    return tuple(i for i in range(n) if i % period == offset)


def _jamba_period(n: int, layers: tuple[int, ...]) -> tuple[int, int] | None:
    """(period, offset) naming `layers` of `n` (`_periodic`), the shortest period; None where none does."""
    return next(((period, offset) for period in range(1, n + 2) for offset in range(period)
                 if _periodic(n, period, offset) == layers), None)


def to_hf_config(cfg: ModelConfig) -> dict[str, Any]:
    """A `config.json` that `transformers.AutoConfig` reads as the architecture `hf_architecture` picks."""
    arch = hf_architecture(cfg)
    if arch in _READ_APART:
        return _READ_APART[arch][1](cfg)
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
    if arch == GPT_NEOX:  # RoPE in the published spelling (rotary_pct, rotary_emb_base)
        return {"architectures": [GPT_NEOX], "model_type": "gpt_neox", "vocab_size": cfg.vocab_size,
                "hidden_size": cfg.dim, "num_hidden_layers": cfg.n_layers, "num_attention_heads": cfg.n_heads,
                "intermediate_size": cfg.hidden_dim, "hidden_act": "gelu" if cfg.gelu_exact else "gelu_new",
                "rotary_pct": cfg.rotary_dim / cfg.head_dim, "rotary_emb_base": cfg.rope_theta,
                "rope_scaling": dict(cfg.rope_scaling) if cfg.rope_scaling else None,
                "max_position_embeddings": cfg.max_seq_len, "layer_norm_eps": cfg.norm_eps,
                "use_parallel_residual": cfg.parallel_block, "attention_bias": True,
                "attention_dropout": cfg.dropout, "hidden_dropout": cfg.dropout, "initializer_range": cfg.init_std,
                "tie_word_embeddings": cfg.tie_embeddings, "bos_token_id": None, "eos_token_id": None,
                "use_cache": True}
    if arch == MAMBA2:  # no attention or MLP fields: its layers are Mamba 2 mixers alone
        (groups, heads), (state, head) = cfg.linear_heads, cfg.linear_sizes
        return {"architectures": [MAMBA2], "model_type": "mamba2", "vocab_size": cfg.vocab_size, "hidden_size": cfg.dim,
                "num_hidden_layers": cfg.n_layers, "num_heads": heads, "head_dim": head, "n_groups": groups,
                "state_size": state, "expand": heads * head // cfg.dim, "conv_kernel": cfg.linear_conv_size,
                "layer_norm_epsilon": cfg.norm_eps, "use_bias": False, "use_conv_bias": True, "hidden_act": "silu",
                "residual_in_fp32": True, "initializer_range": cfg.init_std, "tie_word_embeddings": cfg.tie_embeddings,
                "bos_token_id": None, "eos_token_id": None, "pad_token_id": None, "use_cache": True}
    if arch in MAMBAS:  # as Mamba 2's: no attention or MLP fields
        return {"architectures": [arch], "model_type": next(k for k, v in _MODEL_TYPES.items() if v == arch),
                "vocab_size": cfg.vocab_size, "hidden_size": cfg.dim, "num_hidden_layers": cfg.n_layers,
                "state_size": cfg.linear_sizes[0], "intermediate_size": cfg.linear_heads[1],
                **({"expand": cfg.linear_heads[1] // cfg.dim} if cfg.linear_heads[1] % cfg.dim == 0 else {}),
                "conv_kernel": cfg.linear_conv_size, "time_step_rank": cfg.linear_dt_rank or "auto",
                "layer_norm_epsilon": cfg.norm_eps,
                "use_bias": False, "use_conv_bias": True, "hidden_act": "silu", "residual_in_fp32": True,
                "initializer_range": cfg.init_std, "tie_word_embeddings": cfg.tie_embeddings, "bos_token_id": None,
                "eos_token_id": None, "pad_token_id": None, "use_cache": True,
                **({"mixer_rms_eps": cfg.linear_bcdt_eps} if arch == FALCON_MAMBA else {})}
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
    elif arch == ARCEE:
        d |= {"attention_bias": cfg.bias, "mlp_bias": cfg.bias, "hidden_act": "relu2"}
    elif arch == NANOCHAT:
        d |= {"attention_bias": False, "hidden_act": "relu2", "final_logit_softcapping": cfg.logit_softcap}
    elif arch == STABLELM:  # LayerNorm's epsilon under its own name
        del d["rms_norm_eps"]
        d |= {"layer_norm_eps": cfg.norm_eps, "use_qkv_bias": cfg.qkv_bias, "qk_layernorm": False,
              "use_parallel_residual": cfg.parallel_block, "partial_rotary_factor": cfg.rotary_dim / cfg.head_dim,
              "hidden_dropout": cfg.dropout}
    elif arch == MINISTRAL3:  # its RoPE written out, the queries' temperature in it
        d |= {"sliding_window": cfg.sliding_window, "rope_scaling": None,
              "rope_parameters": {"rope_theta": cfg.rope_theta, **(cfg.rope_scaling or {}),
                                  "llama_4_scaling_beta": cfg.query_scale_beta}}
    elif arch == OLMO:  # its LayerNorms' epsilon is fixed (1e-5)
        del d["rms_norm_eps"]
        d |= {"attention_bias": False, "clip_qkv": cfg.qkv_clip}
    elif arch == GRANITE:
        d |= {"attention_bias": cfg.bias, "mlp_bias": cfg.bias, "embedding_multiplier": cfg.embed_multiplier or 1.0,
              "residual_multiplier": cfg.residual_multiplier or 1.0, "logits_scaling": cfg.logit_divisor or 1.0,
              "attention_multiplier": (cfg.attn_scale_dim or cfg.head_dim) ** -0.5}
    elif arch == MINISTRAL:  # its windowed and global layers named one by one
        d |= {"sliding_window": cfg.sliding_window, "layer_types": _layer_types(cfg)}
    elif arch == CWM:  # and its RoPE written out: CwmConfig would take a missing one for its Llama 3.1 scaling
        d |= {"sliding_window": cfg.sliding_window, "layer_types": _layer_types(cfg), "rope_scaling": None,
              "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta, **(cfg.rope_scaling or {})}}
        del d["rope_theta"], d["bos_token_id"]  # (CwmConfig takes no null one: its own default stands)
    elif arch in (MISTRAL, PHI3, MIXTRAL):
        d["sliding_window"] = cfg.sliding_window
        if arch == PHI3:  # its original length at the top, where transformers reads it first
            d |= {"original_max_position_embeddings": (cfg.rope_scaling or {}).get("original_max_position_embeddings",
                                                                                    cfg.max_seq_len),
                  "resid_pdrop": cfg.dropout, "embd_pdrop": cfg.dropout,
                  "partial_rotary_factor": cfg.rotary_dim / cfg.head_dim}
    elif arch == PHI:  # GPT-2's MLP, biases everywhere, the head's too; LayerNorm's epsilon under its own name
        del d["rms_norm_eps"]
        d |= {"hidden_act": "gelu_new", "layer_norm_eps": cfg.norm_eps, "qk_layernorm": False,
              "partial_rotary_factor": cfg.rotary_dim / cfg.head_dim, "resid_pdrop": cfg.dropout,
              "embd_pdrop": cfg.dropout}
    elif arch == STARCODER2:  # GPT-2's MLP and biases everywhere; LayerNorm's epsilon under its own name
        del d["rms_norm_eps"]
        d |= {"hidden_act": "gelu_pytorch_tanh", "norm_epsilon": cfg.norm_eps, "use_bias": True,
              "sliding_window": cfg.sliding_window, "residual_dropout": cfg.dropout, "embedding_dropout": cfg.dropout}
    elif arch in GLM:
        d |= {"attention_bias": cfg.qkv_bias, "partial_rotary_factor": cfg.rotary_dim / cfg.head_dim}
    elif arch == SOLAR_OPEN:  # (its o_proj never has a bias)
        d["attention_bias"] = cfg.qkv_bias
    elif arch in EXAONES:
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
    elif arch in (GEMMA2, GEMMA3, VAULTGEMMA):  # Gemma 3: rope_theta and rope_scaling above are the global layers'
        d |= {"attention_bias": False, "hidden_activation": "gelu_pytorch_tanh",
              "query_pre_attn_scalar": cfg.attn_scale_dim or cfg.head_dim,
              "sliding_window": cfg.sliding_window,
              "layer_types": _layer_types(cfg),
              "final_logit_softcapping": cfg.logit_softcap, "attn_logit_softcapping": cfg.attn_softcap}
        if arch == GEMMA3:
            d |= {"rope_local_base_freq": cfg.rope_local_theta or cfg.rope_theta, "use_bidirectional_attention": False}
    elif arch == GEMMA4:  # one RoPE per layer type; per-layer embeddings written out (its config's default has them)
        global_kv_heads, global_head = cfg.global_shape
        del d["rope_theta"], d["rope_scaling"], d["hidden_act"]
        d |= {"attention_bias": False, "hidden_activation": "gelu_pytorch_tanh", "sliding_window": cfg.sliding_window,
              "layer_types": _layer_types(cfg), "final_logit_softcapping": cfg.logit_softcap,
              "global_head_dim": global_head, "attention_k_eq_v": cfg.global_values_are_keys,
              "num_global_key_value_heads": global_kv_heads if cfg.global_values_are_keys else None,
              "hidden_size_per_layer_input": cfg.per_layer_input_size or 0,
              "vocab_size_per_layer_input": cfg.per_layer_vocab_size or cfg.vocab_size,
              "num_kv_shared_layers": cfg.kv_shared_layers, "enable_moe_block": bool(cfg.n_experts),
              "use_double_wide_mlp": cfg.kv_shared_wide_mlp,
              "use_bidirectional_attention": None,
              "rope_parameters": {"sliding_attention": {"rope_type": "default", "rope_theta": cfg.rope_local_theta},
                                  "full_attention": {"rope_type": "default", "rope_theta": cfg.rope_theta,
                                                     **(cfg.rope_scaling or {})}}}
        if cfg.n_experts:  # its dense MLP is the shared expert
            d |= {"intermediate_size": cfg.shared_expert_ffn_dim, "num_experts": cfg.n_experts,
                  "top_k_experts": cfg.experts_per_token, "moe_intermediate_size": cfg.expert_hidden_dim}
    if arch in ERNIES:
        d["use_bias"] = cfg.bias
    if arch in GRANITE_MOES:  # no shared MLP: a width of 0
        d |= {"attention_bias": False, "embedding_multiplier": cfg.embed_multiplier or 1.0,
              "residual_multiplier": cfg.residual_multiplier or 1.0, "logits_scaling": cfg.logit_divisor or 1.0,
              "attention_multiplier": (cfg.attn_scale_dim or cfg.head_dim) ** -0.5,
              "num_local_experts": cfg.n_experts, "num_experts_per_tok": cfg.experts_per_token,
              "intermediate_size": cfg.expert_hidden_dim if cfg.n_experts else cfg.hidden_dim,
              "output_router_logits": False, "router_aux_loss_coef": 0.0}
        if arch != GRANITE_MOE:
            d["shared_intermediate_size"] = (cfg.shared_expert_ffn_dim or 0) if cfg.n_experts else cfg.hidden_dim
    if arch == GRANITE_HYBRID:  # its layers named one by one in the published spelling; no positions: nope
        (groups, heads), (state, head) = cfg.linear_heads, cfg.linear_sizes
        d |= {"position_embedding_type": "nope" if cfg.nope_every else "rope",
              "layer_types": ["mamba" if cfg.is_linear(i) else "attention" for i in range(cfg.n_layers)],
              "mamba_n_heads": heads, "mamba_n_groups": groups, "mamba_d_state": state, "mamba_d_head": head,
              "mamba_d_conv": cfg.linear_conv_size, "mamba_expand": heads * head // cfg.dim, "mamba_conv_bias": True,
              "mamba_proj_bias": False}
    if arch == BAMBA:  # its attention layers by index; half of each head rotated, as BambaConfig fixes
        (groups, heads), (state, head) = cfg.linear_heads, cfg.linear_sizes
        d |= {"attn_layer_indices": [i for i in range(cfg.n_layers) if not cfg.is_linear(i)], "mamba_n_heads": heads,
              "mamba_n_groups": groups, "mamba_d_state": state, "mamba_d_head": head,
              "mamba_d_conv": cfg.linear_conv_size, "mamba_expand": heads * head // cfg.dim, "mamba_conv_bias": True,
              "mamba_proj_bias": False, "attention_bias": False, "mlp_bias": False, "z_loss_coefficient": 0.0}
    if arch == JAMBA:  # its attention and expert layers by period and offset; no positions
        del d["rope_theta"], d["rope_scaling"]
        for kind, layers in _jamba_layers(cfg).items():
            d[f"{kind}_layer_period"], d[f"{kind}_layer_offset"] = _jamba_period(cfg.n_layers, layers)
        d |= {
              "num_experts": cfg.n_experts or 1, "num_experts_per_tok": cfg.experts_per_token,
              "mamba_d_state": cfg.linear_sizes[0], "mamba_d_conv": cfg.linear_conv_size,
              "mamba_expand": cfg.linear_heads[1] // cfg.dim or 2,  # (no Mamba layers: the default)
              "mamba_dt_rank": cfg.linear_dt_rank or "auto",
              "mamba_conv_bias": True, "mamba_proj_bias": False, "output_router_logits": False,
              "router_aux_loss_coef": 0.0}
    if arch == NEMOTRON_H:  # its layers one sublayer each, in the published hybrid_override_pattern; no positions
        (groups, heads), (state, head) = cfg.linear_heads, cfg.linear_sizes
        mlp = "E" if cfg.n_experts else "-"  # (Nemotron 3's mixtures)
        pattern = "".join(("M" if cfg.is_linear(i) else "*") + ("" if i in cfg.no_mlp_layers else mlp)
                          for i in range(cfg.n_layers))
        for key in ("rms_norm_eps", "rope_theta", "rope_scaling", "hidden_act"):
            del d[key]
        d |= {"num_hidden_layers": len(pattern), "hybrid_override_pattern": pattern,
              "layer_norm_epsilon": cfg.norm_eps, "mlp_hidden_act": "relu2", "mamba_hidden_act": "silu",
              "mamba_num_heads": heads, "mamba_head_dim": head, "n_groups": groups, "ssm_state_size": state,
              "conv_kernel": cfg.linear_conv_size, "use_conv_bias": True, "mamba_proj_bias": False, "use_bias": False,
              "mlp_bias": False, "attention_bias": False, "residual_in_fp32": False, "num_nextn_predict_layers": 0}
        if cfg.n_experts:
            d |= {"n_routed_experts": cfg.n_experts, "num_experts_per_tok": cfg.experts_per_token,
                  "moe_intermediate_size": cfg.expert_hidden_dim, "n_shared_experts": 1,
                  "moe_shared_expert_intermediate_size": cfg.shared_expert_ffn_dim, "moe_latent_size": None,
                  "n_group": cfg.expert_groups, "topk_group": cfg.expert_groups_per_token,
                  "routed_scaling_factor": cfg.routed_scaling, "norm_topk_prob": cfg.renormalize_experts}
    if arch in LFM2S:  # its MLP's width as it is (no adjusting), its layers named one by one
        del d["rms_norm_eps"]
        d |= {"norm_eps": cfg.norm_eps, "conv_bias": False, "conv_L_cache": cfg.linear_conv_size,
              "layer_types": ["conv" if cfg.is_linear(i) else "full_attention" for i in range(cfg.n_layers)]}
        if arch == LFM2:
            d |= {"block_auto_adjust_ff_dim": False, "block_ffn_dim_multiplier": 1.0, "block_multiple_of": 256,
                  "full_attn_idxs": [i for i in range(cfg.n_layers) if not cfg.is_linear(i)]}
        else:  # its dense first layers are intermediate_size wide
            d |= {"num_experts": cfg.n_experts, "num_experts_per_tok": cfg.experts_per_token,
                  "moe_intermediate_size": cfg.expert_hidden_dim, "num_dense_layers": cfg.dense_layers,
                  "use_expert_bias": cfg.expert_choice_bias, "routed_scaling_factor": cfg.routed_scaling,
                  "norm_topk_prob": cfg.renormalize_experts, "output_router_logits": False}
    if arch in COHERES:  # LayerNorm's epsilon; the logits multiplied by logit_scale
        del d["rms_norm_eps"]
        d |= {"layer_norm_eps": cfg.norm_eps, "logit_scale": 1 / cfg.logit_divisor if cfg.logit_divisor else 1.0,
              "attention_bias": False}
        if arch == COHERE:
            d["use_qk_norm"] = False
        else:
            d |= {"sliding_window": cfg.sliding_window, "layer_types": _layer_types(cfg)}
    if arch in HUNYUANS:
        d["attention_bias"] = False
    if arch == HUNYUAN_MOE:
        d |= {"num_experts": cfg.n_experts, "moe_topk": cfg.experts_per_token, "output_router_logits": False}
    if arch == ERNIE4_5_MOE:  # experts in every layer after the dense first ones; no multi-token-prediction layer
        d |= {"moe_num_experts": cfg.n_experts, "moe_k": cfg.experts_per_token,
              "moe_intermediate_size": cfg.expert_hidden_dim,
              "moe_num_shared_experts": (cfg.shared_expert_ffn_dim or 0) // cfg.expert_hidden_dim,
              "moe_layer_start_index": cfg.dense_layers, "moe_layer_end_index": cfg.n_layers - 1,
              "moe_layer_interval": 1, "moe_norm_min": 1e-12, "output_router_logits": False, "num_mtp_layers": None}
    if arch == GPT_OSS:  # one RoPE, written out: GptOssConfig would take a missing one for its YaRN default
        d |= {"attention_bias": True, "sliding_window": cfg.sliding_window,
              "layer_types": _layer_types(cfg),
              "num_local_experts": cfg.n_experts, "num_experts_per_tok": cfg.experts_per_token,
              "swiglu_limit": cfg.swiglu_limit, "swiglu_alpha": cfg.swiglu_alpha, "output_router_logits": False,
              "rope_scaling": None,
              "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta, **(cfg.rope_scaling or {})}}
    if arch in LATENT:  # the rotated dims in adjacent pairs, as DeepSeek publishes them (`rope_pair_rows`; V2 always)
        d |= {"head_dim": cfg.head_dim if arch == MISTRAL4 else cfg.rotary_dim,  # (Mistral 4's: the whole query head)
              "qk_rope_head_dim": cfg.rotary_dim, "kv_lora_rank": cfg.kv_lora_rank,
              "qk_nope_head_dim": cfg.head_dim - cfg.rotary_dim, "q_lora_rank": cfg.q_lora_rank,
              "v_head_dim": cfg.v_head_dim, "attention_bias": False,
              "rope_scaling": None, "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta,
                                                        **(cfg.rope_scaling or {})}}
        if cfg.query_scale_beta is not None:  # Mistral 4's temperature of the queries, in its RoPE
            d["rope_parameters"]["llama_4_scaling_beta"] = cfg.query_scale_beta
        if arch != DEEPSEEK_V2:
            d["rope_interleave"] = True
    if arch in DEEPSEEK_MOE:
        d |= {"n_routed_experts": cfg.n_experts, "num_experts_per_tok": cfg.experts_per_token,
              "moe_intermediate_size": cfg.expert_hidden_dim, "norm_topk_prob": cfg.renormalize_experts,
              "n_shared_experts": cfg.shared_expert_ffn_dim // cfg.expert_hidden_dim,
              "routed_scaling_factor": cfg.routed_scaling, "n_group": cfg.expert_groups,
              "topk_group": cfg.expert_groups_per_token, "first_k_dense_replace": cfg.dense_layers,
              "output_router_logits": False}
        if arch == GLM4_MOE_LITE:  # its dense layers are named per layer
            d["mlp_layer_types"] = ["dense" if i < cfg.dense_layers else "sparse" for i in range(cfg.n_layers)]
        if arch == DEEPSEEK_V2:
            d["topk_method"] = "group_limited_greedy" if cfg.expert_groups > 1 else "greedy"
        elif arch == DOTS1:  # no windowed layers
            d |= {"sliding_window": None, "max_window_layers": cfg.n_layers, "attention_bias": False}
        elif arch == EXAONE_MOE:  # its expert counts and dense layers under its own names
            d |= {"num_experts": cfg.n_experts, "num_shared_experts": cfg.shared_expert_ffn_dim // cfg.expert_hidden_dim,
                  "mlp_layer_types": ["dense" if i < cfg.dense_layers else "sparse" for i in range(cfg.n_layers)]}
        elif arch != MISTRAL4:  # no multi-token-prediction layers: temper trains none
            d["num_nextn_predict_layers"] = 0
        if arch == GLM4_MOE:
            d["use_qk_norm"] = cfg.qk_norm
    elif arch in MIXTRAL_NAMES:  # its experts are intermediate_size wide
        d |= {"num_local_experts": cfg.n_experts, "num_experts_per_tok": cfg.experts_per_token,
              "router_jitter_noise": 0.0, "output_router_logits": False}
        if arch == MINIMAX_M2:  # partial RoPE in the rotary_dim spelling of its published configs
            d |= {"rotary_dim": cfg.rotary_dim, "partial_rotary_factor": cfg.rotary_dim / cfg.head_dim}
    elif arch in (OLMOE, FLEX_OLMO):
        d |= {"num_experts": cfg.n_experts, "num_experts_per_tok": cfg.experts_per_token,
              "norm_topk_prob": cfg.renormalize_experts, "attention_bias": False, "output_router_logits": False}
        if arch == OLMOE:
            d["clip_qkv"] = cfg.qkv_clip
    elif arch in (QWEN3_5_MOE, QWEN3_NEXT):
        d |= {"num_experts": cfg.n_experts, "num_experts_per_tok": cfg.experts_per_token,
              "moe_intermediate_size": cfg.expert_hidden_dim, "shared_expert_intermediate_size": cfg.shared_expert_ffn_dim,
              "output_router_logits": False}
        if arch == QWEN3_NEXT:
            d |= {"norm_topk_prob": cfg.renormalize_experts, "decoder_sparse_step": 1,
                  "mlp_only_layers": [i for i in range(cfg.n_layers) if not cfg.has_experts(i)]}
    elif arch in (QWEN3_MOE, QWEN2_MOE):
        d |= {"num_experts": cfg.n_experts, "num_experts_per_tok": cfg.experts_per_token,
              "moe_intermediate_size": cfg.expert_hidden_dim, "norm_topk_prob": cfg.renormalize_experts,
              "decoder_sparse_step": 1, "mlp_only_layers": [i for i in range(cfg.n_layers) if not cfg.has_experts(i)],
              "output_router_logits": False}
        if arch == QWEN2_MOE:
            d |= {"qkv_bias": cfg.qkv_bias, "shared_expert_intermediate_size": cfg.shared_expert_ffn_dim}
    return d


def _layer_types(cfg: ModelConfig) -> list[str]:
    """transformers' `layer_types`: which layers attend within the sliding window."""
    return ["sliding_attention" if cfg.window_of(i) else "full_attention" for i in range(cfg.n_layers)]
