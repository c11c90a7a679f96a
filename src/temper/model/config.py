"""ModelConfig: the shape and the variant of a decoder, and the named presets.

A model is chosen by its fields (MLP kind, experts, norm kind, position kind, biases, tying, window), never
by matching a model's name, so one `Transformer` covers GPT-2, GPT-3, Llama, Mistral, Qwen2, Qwen3,
Gemma, Gemma 2, Gemma 3, Gemma 4, Phi-3, OLMo 2 and 3, Mixtral, Qwen3-MoE, GLM-4.5, DeepSeek-V2 and V3, ERNIE 4.5,
Hunyuan, GPT-OSS, Qwen3.5 and Llama 4 shapes.
This module only describes shapes: it builds nothing and imports no torch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

MLP_KINDS = ("gelu", "swiglu", "geglu", "relu2", "xielu")
NORM_KINDS = ("layernorm", "rmsnorm")
POS_KINDS = ("learned", "rope")
ROUTER_SCORES = ("softmax", "sigmoid")
ROPE_SCALING_KEYS = {  # rope_type -> the keys it needs
    "llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"),
    "linear": ("factor",),
    "yarn": ("factor", "original_max_position_embeddings"),
    "longrope": ("short_factor", "long_factor", "factor", "original_max_position_embeddings"),
    "proportional": ("partial_rotary_factor",),
    "dynamic": ("factor",),
}
YARN_OPTIONAL_KEYS = ("attention_factor", "beta_fast", "beta_slow", "mscale", "mscale_all_dim", "truncate")
ROPE_OPTIONAL_KEYS = {"yarn": YARN_OPTIONAL_KEYS, "longrope": ("attention_factor",), "proportional": ("factor",)}  # rope_type -> keys it may take
LINEAR_LAYER_KINDS = ("gated_deltanet", "short_conv", "mamba2", "mamba")
"""The kinds of linear layer a hybrid model may have (`ModelConfig.linear_layer`)."""


@dataclass
class ModelConfig:
    """The hyper-parameters of one decoder-only transformer."""

    vocab_size: int = 256
    """Rows of the token embedding (and of the output head)."""
    dim: int = 64
    """Width of the residual stream (d_model)."""
    n_layers: int = 2
    """Number of transformer blocks."""
    n_heads: int = 4
    """Query heads per attention layer."""
    head_size: int | None = None
    """Width of one attention head; None means dim // n_heads (Gemma: 256 whatever the width)."""
    n_kv_heads: int | None = None
    """Key/value heads; None means n_heads (multi-head), fewer means grouped-query attention."""
    kv_lora_rank: int | None = None
    """Multi-head latent attention (DeepSeek-V2 and V3): every head's keys and values come from one normalised latent
    of this width per token, which the KV cache holds in their place, beside the key's rotated part (rope_dim wide,
    shared by the heads); each head's query and key are its head_size - rope_dim unrotated dimensions, then rope_dim
    rotated ones. None: key and value projections per kv head."""
    q_lora_rank: int | None = None
    """With kv_lora_rank: queries through a normalised latent of this width (DeepSeek-V3: 1536); None: one q_proj."""
    v_head_size: int | None = None
    """With kv_lora_rank: each head's value width (DeepSeek-V3: 128, beside 192-wide queries and keys); None:
    head_size."""
    attn_output_gate: bool = False
    """q_proj also makes a gate per query head and dimension, and attention's output is multiplied by its sigmoid
    before o_proj (Qiu et al. 2025, gated attention; Qwen3-Next, Qwen3.5). q_proj's rows hold each head's queries,
    then its gates."""
    full_attention_every: int | None = None
    """Hybrid linear attention: the last layer of every group of this many attends with softmax attention, the others
    are Gated DeltaNet layers (Yang et al. 2024; `model/linear_attention.py`), whose fixed-size state replaces the
    KV cache (Qwen3-Next, Qwen3.5: 4). None: every layer is softmax attention."""
    attention_layers: tuple[int, ...] | None = None
    """Hybrid models whose softmax attention layers fall irregularly (LFM2-1.2B: 2, 5, 8, 10, 12, 14; 0-based): these
    layers attend, every other is a linear layer; None: full_attention_every's pattern (or no linear layers)."""
    linear_layer: str = "gated_deltanet"
    """What the linear layers are: "gated_deltanet" (Qwen3.5's linear attention), "short_conv" (LFM2's gated short
    convolutions: in_proj makes B, C and x; C * conv(B * x), causal and depthwise over linear_conv_size tokens;
    out_proj; a state of the last few inputs alone) or "mamba2" (Mamba 2's state space layers, Dao and Gu 2024:
    linear_key_heads groups of B and C, linear_key_size wide (its state size), serving linear_value_heads heads of
    linear_value_size (its head width); Granite 4.0-H) or "mamba" (Mamba's selective state spaces, Gu and Dao 2023:
    one group of B and C (linear_key_heads 1) linear_key_size wide, serving linear_value_heads channels (its
    intermediate size) of linear_value_size 1, each decaying its state values at their own rates)."""
    linear_key_heads: int | None = None
    """With linear layers: query and key heads of each (Mamba 2: its groups of B and C); None: n_heads."""
    linear_value_heads: int | None = None
    """With linear layers: value heads of each (Mamba 2: its heads), a multiple of its key heads (Qwen3.5-9B: 32 to 16
    key heads); None: as many as key heads."""
    linear_key_size: int | None = None
    """With linear layers: width of their query and key heads (Mamba 2: its state size); None: head_dim."""
    linear_value_size: int | None = None
    """With linear layers: width of their value heads (Mamba 2: its head width); None: linear_key_size."""
    linear_conv_size: int = 4
    """With linear layers: taps of their causal depthwise convolution (a token and the 3 before it), over Gated
    DeltaNet's queries, keys and values, Mamba 2's x, B and C (with a bias), or a short convolution's gated input
    (LFM2: 3)."""
    linear_dt_rank: int | None = None
    """With Mamba layers: width of the step's input, which x_proj makes and dt_proj lifts to every channel; None:
    ceil(dim / 16), Mamba's "auto"."""
    linear_bcdt_eps: float | None = None
    """With Mamba layers: RMS-normalise the step's input, B and C (without weights) with this epsilon (FalconMamba:
    1e-6); None: not."""
    linear_bcdt_weights: bool = False
    """With linear_bcdt_eps: those norms scale by learned weights, as RMSNorm does (Jamba's dt_layernorm, b_layernorm
    and c_layernorm); False: weightless (FalconMamba's)."""
    ffn_dim: int | None = None
    """MLP hidden width; None means 4*dim for gelu, relu2 and xielu and Llama's rule (8*dim/3 rounded up to 256) for
    swiglu."""
    no_mlp_layers: tuple[int, ...] = ()
    """Blocks without an MLP (0-based): their mixer alone, x + mixer(norm(x)) (Nemotron-H's Mamba 2 layers that follow
    one another)."""
    max_seq_len: int = 256
    """Longest sequence: rows of the learned position table or of the RoPE table."""
    mlp: str = "gelu"
    """MLP kind: "gelu" (GPT-2, tanh approximation), "swiglu" (Llama), "geglu" (Gemma: gated, tanh GELU), "relu2"
    (Nemotron-H: relu(up(x))^2, not gated; So et al. 2021, "Primer") or "xielu" (Apertus: xIELU with two learned
    scalars per layer, not gated)."""
    gelu_exact: bool = False
    """With mlp='gelu': GELU by the error function, exactly (GPT-NeoX, Pythia); False: its tanh approximation
    (GPT-2)."""
    norm: str = "layernorm"
    """Normalisation kind: "layernorm" (GPT-2) or "rmsnorm" (Llama)."""
    norm_eps: float = 1e-5
    """Epsilon added to the variance in every norm."""
    norm_unit_offset: bool = False
    """The norms scale by (1 + weight), their weight starting at 0: RMSNorm's in float32 (Gemma), LayerNorm's
    (Nemotron-4's LayerNorm1P)."""
    norm_cast_after: bool = False
    """RMSNorm scales by its weight before rounding to the activations' dtype (OLMo 2); False: after (Llama). The
    same in float32."""
    norm_bias: bool | None = None
    """With norm='layernorm': whether the LayerNorms have biases, where that differs from `bias` (StableLM: biased
    LayerNorms beside linear layers without); None: as `bias` says."""
    norm_weightless: bool = False
    """Every norm (the blocks', the final one, the q/k norms) normalises without a learned weight or bias (nanochat's
    RMSNorms, OLMo's LayerNorms)."""
    embed_norm: bool = False
    """Normalise the token embeddings before the first block, by a norm of their own (nanochat's, weightless)."""
    pos: str = "learned"
    """Position kind: "learned" absolute embeddings (GPT-2) or "rope" rotary embeddings (Llama)."""
    rope_theta: float = 10000.0
    """RoPE base wavelength."""
    rope_reversed: bool = False
    """With RoPE: turn each pair the other way, by minus its angle (nanochat, whose rotate_half is cat(x2, -x1)): the
    sine table negated."""
    query_scale_beta: float | None = None
    """With RoPE scaling: Llama 4's attention temperature (Ministral 3): each query, rotated, is multiplied by 1 + beta
    log(1 + floor(position / L)), L the scaling's original_max_position_embeddings, so that attention sharpens as
    positions grow past it; None: not."""
    rope_dim: int | None = None
    """How many leading dimensions of each head RoPE rotates (Phi-4-mini: 96 of 128); the rest pass through
    unrotated (latent attention rotates its last ones instead). None: the whole head."""
    rope_float32: bool = False
    """Rotate queries and keys in float32 and round after (OLMo 2, DeepSeek-V2); False: in the activations' dtype
    (Llama). The same in float32."""
    rope_tables_rounded: bool = False
    """With rope_float32: the cos and sin tables rounded to the activations' dtype first, the rotation still in float32
    (Cohere's reference). The same in float32."""
    rope_scaling: dict | None = None
    """RoPE scaling: {"rope_type": "llama3", "factor", "low_freq_factor", "high_freq_factor",
    "original_max_position_embeddings"} (Llama 3.1), {"rope_type": "yarn", "factor", "original_max_position_embeddings"}
    and YaRN's optional keys (Qwen2.5/Qwen3 long contexts, OLMo 3), {"rope_type": "longrope", "short_factor",
    "long_factor", "factor", "original_max_position_embeddings"} and optionally "attention_factor" (Phi-3.5,
    Phi-4-mini), {"rope_type": "linear", "factor"} (position interpolation), or {"rope_type": "proportional",
    "partial_rotary_factor"} and optionally "factor" (Gemma 4's global layers: only that share of each head's pairs
    turn), or {"rope_type": "dynamic", "factor"} (dynamic NTK: the base grows past max_seq_len alone, so within it
    the plain RoPE; kept to be written back). `temper.model.rope` computes each."""
    sliding_window: int | None = None
    """Each query attends to at most this many keys, itself included (Mistral, Phi-3); None: all earlier ones."""
    window_chunked: bool = False
    """With sliding_window: a windowed layer's query attends to the earlier keys of its own chunk, positions 0..W-1,
    W..2W-1, ... (Llama 4's attention_chunk_size), not to the last W; counted in positions, so that a packed document
    or a left-padded row chunks from its own start."""
    global_every: int | None = None
    """With sliding_window: the last layer of every group of this many attends to all earlier tokens, the others
    within the window (Gemma 3: 6, five local layers to one global); None: every layer within the window."""
    global_first: bool = False
    """With global_every: the first layer of every group is the global one (Ministral-8B: one global layer, then
    three windowed), not the last."""
    global_head_size: int | None = None
    """With global_every: the head width of the global layers, beside head_size on the windowed ones (Gemma 4: 512
    to 256); their RoPE table is computed for it. None: head_size on every layer."""
    global_kv_heads: int | None = None
    """With global_every: the key/value heads of the global layers (Gemma 4 31B: 4, to 16 on the windowed ones); None:
    n_kv_heads on every layer."""
    global_values_are_keys: bool = False
    """With global_every: a global layer has no v_proj; its values are its k_proj's outputs, taken before the key norm
    and RoPE (Gemma 4's attention_k_eq_v), so one projection serves both."""
    value_norm: bool = False
    """RMSNorm without a weight over each head's values, before attention (Gemma 4)."""
    layer_scalar: bool = False
    """Each block's output, residual stream included, is multiplied by a scalar of its own: a buffer read from the
    checkpoint and kept fixed in training, 1 in a fresh model (Gemma 4's layer_scalar)."""
    kv_shared_layers: int = 0
    """The last this many layers make no keys or values: each attends, with its own queries, to those of the last
    earlier layer of its kind (windowed or global) that makes its own, as they are cached (Gemma 4 E2B: 20 of 35
    layers). 0: every layer makes its own."""
    kv_shared_wide_mlp: bool = False
    """With kv_shared_layers: those layers' MLPs are twice ffn_dim wide (Gemma 4's use_double_wide_mlp)."""
    per_layer_input_size: int | None = None
    """Per-layer embeddings (Gemma 4 E2B, E4B): each token looks up this many values per layer in a table of its own,
    added to a normalised projection of its embedding; each block gates them by its output and adds their projection
    back, normalised, before its layer_scalar. None: none."""
    per_layer_vocab_size: int | None = None
    """With per_layer_input_size: rows of the per-layer table; None: vocab_size."""
    nope_every: int | None = None
    """The last layer of every group of this many takes no positions at all (NoPE, Kazemnejad et al. 2023; SmolLM3:
    4, three RoPE layers then one without); equal to global_every, the global layers (the first of each group with
    global_first: Granite SWA's); None: every layer rotates (`is_nope`)."""
    rope_local_theta: float | None = None
    """RoPE base of the windowed layers where global_every mixes them with global ones (Gemma 3: 10000); rope_theta
    and rope_scaling then apply to the global layers only. None: rope_theta everywhere."""
    bias: bool = True
    """Biases in every linear layer and in LayerNorm."""
    qkv_bias: bool = False
    """Biases in the query, key and value projections even when `bias` is off (Qwen2)."""
    attn_bias: bool | None = None
    """Biases in attention's q, k, v and o projections where that differs from `bias` (GPT-J: none, beside an MLP, its
    LayerNorms and its head with them); None: as `bias` says."""
    qk_norm: bool = False
    """RMSNorm over each head's query and key, before RoPE (Qwen3, Gemma 3; Dehghani et al. 2023): it bounds
    attention logits."""
    qk_norm_after_rope: bool = False
    """With qk_norm: normalise each head's query and key after RoPE rotates them, not before (Hunyuan)."""
    qk_norm_whole: bool = False
    """With qk_norm: one RMSNorm over all the query heads' values together (and one over the keys'), not one per
    head (OLMo 2)."""
    qk_l2_norm: bool = False
    """Each head's query and key RMS-normalised without a weight (norm_eps), after RoPE, on the layers that rotate
    (Llama 4's use_qk_norm, its "L2 norm"); the layers without positions take none."""
    nope_query_scale: float | None = None
    """With nope_every: the layers without positions multiply each query by 1 + s log(1 + floor((position + 1) /
    nope_query_floor)), sharpening attention at long range (Llama 4's attn_temperature_tuning, its attn_scale s);
    None: not."""
    nope_query_floor: int = 8192
    """With nope_query_scale: the positions per step of the temperature (Llama 4's floor_scale)."""
    qkv_clip: float | None = None
    """Clamp every query, key and value to +-this after its projection (and a q/k norm over all heads) (OLMo's and
    OLMoE's clip_qkv); None: not."""
    tie_embeddings: bool = True
    """Share the token embedding with the output head."""
    head_bias: bool = False
    """An untied output head with a bias (Phi-1, 1.5 and 2)."""
    scale_embeddings: bool = False
    """Multiply token embeddings by sqrt(dim) (Gemma)."""
    sandwich_norm: bool = False
    """Normalise each sublayer's output too, before it joins the residual stream (Gemma 2 and 3)."""
    pre_norm: bool = True
    """Normalise each sublayer's input; False (with sandwich_norm): only its output, the residual stream itself
    entering attention and MLP (OLMo 2)."""
    parallel_block: bool = False
    """Attention and MLP side by side: both read the block's one normalised input, and their outputs join the
    residual stream together (GPT-J's layout; Cohere's Command R and R7B). Saves a norm and lets the two sublayers'
    matrix products overlap; False: the MLP reads the stream after attention joined it (Llama)."""
    parallel_mlp_norm: bool = False
    """With parallel_block: the MLP reads its own norm of the block's input, mlp_norm: x + attn(norm1(x)) +
    mlp(norm2(x)) (GPT-NeoX, Pythia); False: attention's norm (GPT-J, Cohere)."""
    attn_scale_dim: int | None = None
    """Scale attention scores by attn_scale_dim ** -0.5, not head_dim ** -0.5 (Gemma 3 27B: 168); None: head_dim."""
    attn_softcap: float | None = None
    """Cap attention scores smoothly at +-c: c * tanh(score / c), after scaling, before the mask and softmax (Gemma 2:
    50). None: uncapped, which lets SDPA's fused kernels run (a capped score needs FlexAttention or the math form)."""
    logit_softcap: float | None = None
    """Cap the output logits smoothly at +-c: c * tanh(logit / c) (Gemma 2: 30); None: uncapped."""
    attn_sinks: bool = False
    """A learned logit per query head that each softmax spreads over too, with no value behind it, so a query may
    attend to nothing (GPT-OSS; Xiao et al. 2023's attention sinks, learned)."""
    swiglu_limit: float | None = None
    """GPT-OSS's clamped SwiGLU: the gate clamped above at the limit (7) and up to +-limit, then
    gate * sigmoid(swiglu_alpha * gate) * (up + 1); None: Llama's silu(gate) * up."""
    swiglu_alpha: float = 1.702
    """With swiglu_limit: the gain in the gate's sigmoid (GPT-OSS: 1.702, the GELU approximation's)."""
    n_experts: int = 0
    """Experts in each block's MLP, a sparse mixture (Shazeer et al. 2017; Mixtral, Qwen3-MoE); 0: one dense MLP."""
    experts_per_token: int = 2
    """With n_experts: the experts each token is routed to, the top k of the router's softmax."""
    expert_ffn_dim: int | None = None
    """With n_experts: each expert's hidden width; None: the MLP's (ffn_dim)."""
    renormalize_experts: bool = True
    """With n_experts: rescale the chosen experts' router probabilities to sum to 1 (Mixtral; Qwen3-MoE's
    norm_topk_prob); False weighs them by their softmax over all experts."""
    shared_expert_ffn_dim: int | None = None
    """With n_experts: the hidden width of a shared expert, an MLP every token runs beside its routed ones (Qwen2-MoE);
    None: none."""
    shared_expert_gate: bool = False
    """With a shared expert: weigh its output by sigmoid(a learned linear function of the token) (Qwen2-MoE)."""
    experts_own_norms: bool = False
    """With a shared expert: the shared expert and the routed experts each normalise their output, and the routed
    experts their input too, from the block's un-normalised input (the shared one takes mlp_norm's), before the sum
    that mlp_out_norm normalises (Gemma 4 26B-A4B: its dense MLP beside 128 experts)."""
    router_input_norm: bool = False
    """With experts_own_norms: the router scores the block's un-normalised input through a weightless RMSNorm, times a
    learned scale per dimension and dim ** -0.5, and a learned scale per expert multiplies each chosen expert's
    weight (Gemma 4)."""
    router_scores: str = "softmax"
    """With n_experts: how the router scores the experts: "softmax" over them (Mixtral, Qwen3-MoE), or "sigmoid" of
    each, computed in float32 from float32 inputs (DeepSeek-V3, GLM-4.5)."""
    router_rounded: bool = False
    """With router_scores='sigmoid': the router scores in the model's dtype, its logits rounded to it before a float32
    sigmoid (Llama 4's reference); False: from float32 inputs and weights, as DeepSeek-V3's does."""
    router_float32: bool = False
    """With n_experts: keep the router's weights float32 when the model is cast, and score from float32 inputs, as
    DeepSeek-V2 is published (a sigmoid router always does, unless router_rounded)."""
    expert_choice_bias: bool = False
    """With n_experts: a per-expert bias (a float32 buffer, not trained by gradient) added to the scores when choosing
    the experts only, not to their weights (DeepSeek-V3's auxiliary-loss-free balancing, its e_score_correction_bias;
    training moves it with `train.expert_bias_rate`)."""
    expert_groups: int = 1
    """With n_experts: split the experts into this many groups; each token first keeps the expert_groups_per_token
    groups whose expert_group_best best scores sum highest, then chooses its experts among them (DeepSeek-V2's and
    V3's device- and node-limited routing); 1: no groups."""
    expert_groups_per_token: int = 1
    """With expert_groups: the groups each token chooses its experts from."""
    expert_group_best: int = 2
    """With expert_groups: a group scores the sum of its this many best experts' scores (DeepSeek-V3: 2; DeepSeek-V2:
    1, its best alone)."""
    routed_scaling: float = 1.0
    """With n_experts: the chosen experts' weights are multiplied by this, after renormalising (DeepSeek-V3: 2.5)."""
    dense_layers: int = 0
    """With n_experts: the first this many blocks have a dense MLP of ffn_dim instead of experts (DeepSeek-V3's and
    GLM-4.5's first_k_dense_replace)."""
    expert_layers: tuple[int, ...] | None = None
    """With n_experts: the blocks whose MLP is the mixture (0-based), the others a dense MLP of ffn_dim (Jamba: every
    other block, 1, 3, 5, ...); None: every block from dense_layers on."""
    expert_input_weights: bool = False
    """With n_experts: each chosen expert's weight multiplies the token it runs on, not its output (Llama 4, whose
    sigmoid-scored experts are gated: the two differ)."""
    expert_weights_float32: bool = False
    """With n_experts: weigh each expert's output by its float32 routing weight and round the product (Mixtral);
    False: round the weight to the activations' dtype first (Qwen3-MoE). The same in float32; read from a
    checkpoint's architecture, so that 16-bit logits equal its reference's too."""
    embed_multiplier: float | None = None
    """Input embeddings are multiplied by this (Granite's embedding_multiplier); None: by 1 (Gemma's sqrt(dim) is
    scale_embeddings)."""
    residual_multiplier: float | None = None
    """Each sublayer's output is multiplied by this before it joins the residual stream (Granite); None: by 1."""
    logit_divisor: float | None = None
    """Logits are divided by this (Granite's logits_scaling), before any logit_softcap; None: by 1."""
    dropout: float = 0.0
    """Dropout on embeddings, attention probabilities and residual branches (training only)."""
    init_std: float = 0.02
    """Standard deviation of the normal initialisation (GPT-2)."""
    hf_architecture: str | None = None
    """The Hugging Face architecture written on export (set when loaded from one; None: chosen from the fields). The model never reads it."""

    def __post_init__(self) -> None:
        if self.attention_layers is not None:  # a list read from YAML or JSON
            self.attention_layers = tuple(self.attention_layers)
        if self.expert_layers is not None:
            self.expert_layers = tuple(self.expert_layers)
        self.no_mlp_layers = tuple(self.no_mlp_layers)
        for name in ("vocab_size", "dim", "n_layers", "n_heads", "max_seq_len"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.head_size is None and self.dim % self.n_heads:
            raise ValueError(f"dim ({self.dim}) must be divisible by n_heads ({self.n_heads})")
        if self.n_kv_heads is not None and (self.n_kv_heads <= 0 or self.n_heads % self.n_kv_heads):
            raise ValueError(f"n_kv_heads ({self.n_kv_heads}) must be positive and divide n_heads ({self.n_heads})")
        if self.ffn_dim is not None and self.ffn_dim <= 0:
            raise ValueError(f"ffn_dim must be positive or None, got {self.ffn_dim}")
        for name, kinds in (("mlp", MLP_KINDS), ("norm", NORM_KINDS), ("pos", POS_KINDS)):
            if getattr(self, name) not in kinds:
                raise ValueError(f"{name} must be one of {kinds}, got {getattr(self, name)!r}")
        if self.head_size is not None and self.head_size <= 0:
            raise ValueError(f"head_size must be positive or None, got {self.head_size}")
        if self.rope_dim is not None and (self.pos != "rope" or self.rope_dim % 2
                                          or not 0 < self.rope_dim <= self.head_dim):
            raise ValueError(f"rope_dim={self.rope_dim} needs pos='rope' and an even width up to head_dim "
                             f"({self.head_dim})")
        if self.pos == "rope" and self.head_dim % 2:
            raise ValueError(f"pos='rope' needs an even head_dim (dim / n_heads), got {self.head_dim}")
        if self.rope_scaling is not None:
            kind = self.rope_scaling.get("rope_type")
            if kind not in ROPE_SCALING_KEYS:
                raise ValueError(f"rope_scaling: rope_type must be one of {sorted(ROPE_SCALING_KEYS)}, got {self.rope_scaling!r}")
            missing = [k for k in ROPE_SCALING_KEYS[kind] if k not in self.rope_scaling]
            if missing:
                raise ValueError(f"rope_scaling is missing {missing}")
            known = {"rope_type", *ROPE_SCALING_KEYS[kind], *ROPE_OPTIONAL_KEYS.get(kind, ())}
            if set(self.rope_scaling) - known:
                raise ValueError(f"rope_scaling: unknown keys {sorted(set(self.rope_scaling) - known)} for "
                                 f"rope_type {kind!r} (it reads {sorted(known)})")
            share = self.rope_scaling.get("partial_rotary_factor", 1.0)
            if not (isinstance(share, (int, float)) and 0 < share <= 1):
                raise ValueError(f"rope_scaling.partial_rotary_factor must be in (0, 1], got {share!r}")
            for key in ("short_factor", "long_factor") if kind == "longrope" else ():
                factors = self.rope_scaling[key]
                if (not isinstance(factors, (list, tuple)) or len(factors) != self.rotary_dim // 2
                        or not all(isinstance(f, (int, float)) and f > 0 for f in factors)):
                    raise ValueError(f"rope_scaling.{key} must be {self.rotary_dim // 2} positive numbers, one per "
                                     f"rotated pair of a head's dimensions, got {factors!r}")
        if self.sliding_window is not None and self.sliding_window <= 0:
            raise ValueError(f"sliding_window must be positive or None, got {self.sliding_window}")
        if self.qk_norm and self.norm != "rmsnorm":
            raise ValueError("qk_norm needs norm='rmsnorm'")
        if self.qk_norm_whole and not self.qk_norm:
            raise ValueError("qk_norm_whole needs qk_norm")
        if self.qk_norm_after_rope and (not self.qk_norm or self.qk_norm_whole or self.kv_lora_rank is not None):
            raise ValueError("qk_norm_after_rope needs per-head q/k norms (qk_norm, not qk_norm_whole) and no latent "
                             "attention")
        if self.rope_tables_rounded and not self.rope_float32:
            raise ValueError("rope_tables_rounded needs rope_float32 (without it the tables are in the activations' "
                             "dtype already)")
        layers = self.no_mlp_layers
        if list(layers) != sorted(set(layers)) or not all(0 <= i < self.n_layers for i in layers) or (
                layers and self.parallel_block):
            raise ValueError(f"no_mlp_layers={layers} must list layers of the {self.n_layers} once each, in order "
                             "(and not with parallel_block, whose MLP is beside the mixer)")
        if self.parallel_block and (not self.pre_norm or self.sandwich_norm or self.experts_own_norms):
            raise ValueError("parallel_block needs pre_norm, without sandwich_norm or experts_own_norms (its attention "
                             "and MLP read one normalised input, and their outputs join the stream as they are)")
        if not self.pre_norm and not self.sandwich_norm:
            raise ValueError("pre_norm=false needs sandwich_norm (a block normalises its sublayers' inputs, outputs "
                             "or both)")
        if self.global_every is not None and (self.sliding_window is None or self.global_every < 2):
            raise ValueError(f"global_every={self.global_every} needs a sliding_window and groups of 2 layers or more")
        if self.global_first and self.global_every is None:
            raise ValueError("global_first needs global_every (the groups whose first layer is global)")
        if self.rope_local_theta is not None and (self.global_every is None or self.pos != "rope"
                                                  or self.rope_local_theta <= 0):
            raise ValueError(f"rope_local_theta={self.rope_local_theta} needs pos='rope', global_every and a positive "
                             "base")
        if self.global_shaped:
            for name in ("global_head_size", "global_kv_heads"):
                if getattr(self, name) is not None and getattr(self, name) <= 0:
                    raise ValueError(f"{name} must be positive or None, got {getattr(self, name)}")
            if (self.global_every is None or self.kv_lora_rank is not None or self.rope_dim is not None
                    or self.has_linear_layers):
                raise ValueError("global_head_size, global_kv_heads and global_values_are_keys (global layers shaped "
                                 "apart) need global_every, and neither latent attention, linear layers nor rope_dim")
            if self.n_heads % self.global_shape[0]:
                raise ValueError(f"global_kv_heads ({self.global_kv_heads}) must divide n_heads ({self.n_heads})")
            if self.pos == "rope" and (self.global_shape[1] % 2 or self.global_head_size is not None
                                       and self.global_head_size != self.head_dim and self.rope_local_theta is None):
                raise ValueError(f"global_head_size={self.global_head_size} with RoPE needs an even width and "
                                 "rope_local_theta (the windowed layers' table is another width)")
        if self.kv_shared_layers:
            first = self.n_layers - self.kv_shared_layers
            sources = {self.window_of(j) for j in range(max(first, 0))}
            if (not 0 < first < self.n_layers or self.kv_lora_rank is not None or self.has_linear_layers
                    or self.qk_norm_whole or any(self.window_of(i) not in sources for i in range(first, self.n_layers))):
                raise ValueError(f"kv_shared_layers={self.kv_shared_layers} must leave an earlier layer of each kind "
                                 f"(windowed or global) of the {self.n_layers} to share its keys and values, without "
                                 "latent or linear attention or q/k norms over all heads")
        if self.kv_shared_wide_mlp and (not self.kv_shared_layers or self.n_experts):
            raise ValueError("kv_shared_wide_mlp needs kv_shared_layers and a dense MLP (no n_experts)")
        for name in ("per_layer_input_size", "per_layer_vocab_size"):
            if getattr(self, name) is not None and getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive or None, got {getattr(self, name)}")
        if self.per_layer_vocab_size is not None and self.per_layer_input_size is None:
            raise ValueError("per_layer_vocab_size needs per_layer_input_size")
        if self.nope_every is not None and (self.pos != "rope" or self.nope_every < 1):
            raise ValueError(f"nope_every={self.nope_every} needs pos='rope' and groups of 1 layer or more")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        for name in ("attn_softcap", "logit_softcap", "embed_multiplier", "residual_multiplier", "logit_divisor"):
            if getattr(self, name) is not None and not getattr(self, name) > 0:
                raise ValueError(f"{name} must be positive or None, got {getattr(self, name)}")
        if self.swiglu_limit is not None and (self.mlp != "swiglu" or not self.swiglu_limit > 0):
            raise ValueError(f"swiglu_limit={self.swiglu_limit} needs mlp='swiglu' and a positive limit")
        if self.attn_scale_dim is not None and self.attn_scale_dim <= 0:
            raise ValueError(f"attn_scale_dim must be positive or None, got {self.attn_scale_dim}")
        if self.n_experts < 0 or (self.n_experts and not 1 <= self.experts_per_token <= self.n_experts):
            raise ValueError(f"n_experts={self.n_experts} must be 0 or positive, and experts_per_token="
                             f"{self.experts_per_token} between 1 and n_experts")
        if self.n_experts and self.mlp == "gelu":
            raise ValueError("n_experts needs a gated MLP (mlp='swiglu' or 'geglu')")
        if self.norm_bias is not None and self.norm != "layernorm":
            raise ValueError(f"norm_bias needs norm='layernorm', got {self.norm!r}")
        if self.norm_weightless and self.norm_unit_offset:
            raise ValueError("norm_weightless does not take norm_unit_offset (a weight to offset)")
        if self.qkv_clip is not None and not self.qkv_clip > 0:
            raise ValueError(f"qkv_clip must be positive or None, got {self.qkv_clip}")
        if self.query_scale_beta is not None and "original_max_position_embeddings" not in (self.rope_scaling or {}):
            raise ValueError(f"query_scale_beta={self.query_scale_beta} needs a rope_scaling with an "
                             "original_max_position_embeddings")
        if self.window_chunked and self.sliding_window is None:
            raise ValueError("window_chunked needs sliding_window (the chunk's length)")
        llama4_attention = {"qk_l2_norm": self.qk_l2_norm, "nope_query_scale": self.nope_query_scale is not None}
        for name, on in llama4_attention.items():
            if on and (self.pos != "rope" or self.kv_lora_rank is not None or self.kv_shared_layers):
                raise ValueError(f"{name} needs pos='rope', without latent attention or kv_shared_layers")
        if self.nope_query_scale is not None and (self.nope_every is None or self.nope_query_floor <= 0):
            raise ValueError(f"nope_query_scale={self.nope_query_scale} needs nope_every (layers without positions) "
                             f"and a positive nope_query_floor, got {self.nope_query_floor}")
        if self.expert_input_weights and not self.n_experts:
            raise ValueError("expert_input_weights needs n_experts")
        if self.rope_reversed and self.pos != "rope":
            raise ValueError(f"rope_reversed needs pos='rope', got {self.pos!r}")
        if self.head_bias and self.tie_embeddings:
            raise ValueError("head_bias needs an untied head (tie_embeddings=false)")
        if self.gelu_exact and self.mlp != "gelu":
            raise ValueError(f"gelu_exact needs mlp='gelu', got {self.mlp!r}")
        if self.parallel_mlp_norm and not self.parallel_block:
            raise ValueError("parallel_mlp_norm needs parallel_block (the MLP beside attention)")
        if self.expert_ffn_dim is not None and (self.expert_ffn_dim <= 0 or not self.n_experts):
            raise ValueError(f"expert_ffn_dim={self.expert_ffn_dim} needs n_experts and a positive width")
        if self.shared_expert_ffn_dim is not None and (self.shared_expert_ffn_dim <= 0 or not self.n_experts):
            raise ValueError(f"shared_expert_ffn_dim={self.shared_expert_ffn_dim} needs n_experts and a positive width")
        if self.shared_expert_gate and self.shared_expert_ffn_dim is None:
            raise ValueError("shared_expert_gate needs a shared expert (shared_expert_ffn_dim)")
        if self.experts_own_norms and (self.shared_expert_ffn_dim is None or self.norm != "rmsnorm"):
            raise ValueError("experts_own_norms needs a shared expert (shared_expert_ffn_dim) and norm='rmsnorm'")
        if self.router_input_norm and not self.experts_own_norms:
            raise ValueError("router_input_norm needs experts_own_norms (it routes the block's un-normalised input)")
        latent_ok = (self.pos == "rope" and self.rope_dim is not None and self.rope_dim < self.head_dim
                     and self.kv_heads == self.n_heads and not (self.qk_norm or self.bias or self.qkv_bias))
        if self.kv_lora_rank is not None and not (self.kv_lora_rank > 0 and latent_ok):
            raise ValueError(f"kv_lora_rank={self.kv_lora_rank} (latent attention) needs a positive rank, pos='rope' "
                             f"with rope_dim below head_dim ({self.head_dim}), as many kv heads as heads, and no q/k "
                             "norms or attention biases")
        for name in ("q_lora_rank", "v_head_size"):
            if getattr(self, name) is not None and (self.kv_lora_rank is None or getattr(self, name) <= 0):
                raise ValueError(f"{name}={getattr(self, name)} needs kv_lora_rank (latent attention) and a positive "
                                 "width")
        if self.router_scores not in ROUTER_SCORES:
            raise ValueError(f"router_scores must be one of {ROUTER_SCORES}, got {self.router_scores!r}")
        routing = {"router_scores": self.router_scores != "softmax", "expert_choice_bias": self.expert_choice_bias,
                   "routed_scaling": self.routed_scaling != 1.0}
        if not self.n_experts and any(routing.values()):
            raise ValueError(f"{next(k for k, v in routing.items() if v)} needs n_experts")
        groups, per_token = self.expert_groups, self.expert_groups_per_token
        if groups != 1 and not (self.n_experts and groups > 1 and self.n_experts % groups == 0
                                and self.n_experts // groups >= 2):
            raise ValueError(f"expert_groups={groups} needs n_experts ({self.n_experts}) split into groups of 2 or more")
        if not 1 <= per_token <= groups or groups > 1 and self.experts_per_token > per_token * self.n_experts // groups:
            raise ValueError(f"expert_groups_per_token={per_token} must be between 1 and expert_groups ({groups}), "
                             f"and its groups must hold experts_per_token={self.experts_per_token} experts")
        if self.expert_group_best < 1 or groups > 1 and self.expert_group_best > self.n_experts // groups:
            raise ValueError(f"expert_group_best={self.expert_group_best} must be between 1 and the experts in a "
                             f"group ({self.n_experts // groups})")
        if self.router_float32 and not self.n_experts:
            raise ValueError("router_float32 needs n_experts")
        if self.router_rounded and (self.router_scores != "sigmoid" or self.router_float32):
            raise ValueError("router_rounded needs router_scores='sigmoid', without router_float32")
        if not self.routed_scaling > 0:
            raise ValueError(f"routed_scaling must be positive, got {self.routed_scaling}")
        if self.dense_layers and not (self.n_experts and 0 < self.dense_layers < self.n_layers):
            raise ValueError(f"dense_layers={self.dense_layers} needs n_experts and fewer than n_layers "
                             f"({self.n_layers}) layers")
        chosen = self.expert_layers
        if chosen is not None and not (self.n_experts and not self.dense_layers and chosen == tuple(sorted(set(chosen)))
                                       and all(0 <= i < self.n_layers for i in chosen)):
            raise ValueError(f"expert_layers={chosen} needs n_experts without dense_layers, and layers of the "
                             f"{self.n_layers} once each, in order")
        if self.attn_output_gate and self.kv_lora_rank is not None:
            raise ValueError("attn_output_gate needs grouped-query attention: latent attention (kv_lora_rank) has no "
                             "output gates")
        layers = self.attention_layers
        if layers is not None and (self.full_attention_every is not None or list(layers) != sorted(set(layers))
                                   or not all(0 <= i < self.n_layers for i in layers)):
            raise ValueError(f"attention_layers={layers} must list layers of the {self.n_layers} once each, in order, "
                             "without full_attention_every")
        if self.linear_layer not in LINEAR_LAYER_KINDS:
            raise ValueError(f"linear_layer must be one of {', '.join(LINEAR_LAYER_KINDS)}, got {self.linear_layer!r}")
        if self.has_linear_layers and self.linear_conv_size < 1:
            raise ValueError(f"linear layers need linear_conv_size >= 1, got {self.linear_conv_size}")
        if self.has_linear_layers and self.kv_lora_rank is not None:
            raise ValueError("linear attention layers need no latent attention (kv_lora_rank)")
        if self.full_attention_every is not None and self.full_attention_every < 1:
            raise ValueError(f"full_attention_every={self.full_attention_every} (linear attention) needs groups of 1 "
                             "layer or more")
        if self.has_linear_layers and self.linear_layer != "short_conv":
            for name in ("linear_key_heads", "linear_value_heads", "linear_key_size", "linear_value_size"):
                if getattr(self, name) is not None and getattr(self, name) <= 0:
                    raise ValueError(f"{name} must be positive or None, got {getattr(self, name)}")
            if self.linear_heads[1] % self.linear_heads[0]:
                raise ValueError(f"linear_value_heads ({self.linear_heads[1]}) must be a multiple of linear_key_heads "
                                 f"({self.linear_heads[0]})")
        if self.has_linear_layers and self.linear_layer == "mamba" and (
                self.linear_heads[0] != 1 or self.linear_sizes[1] != 1 or self.dt_rank <= 0):
            raise ValueError(f"Mamba layers take one group of B and C (linear_key_heads 1, got {self.linear_heads[0]}), "
                             f"channels of linear_value_size 1 (got {self.linear_sizes[1]}) and a positive "
                             f"linear_dt_rank (got {self.dt_rank})")
        if self.linear_bcdt_weights and self.linear_bcdt_eps is None:
            raise ValueError("linear_bcdt_weights needs linear_bcdt_eps (the norms they scale)")
        if self.linear_bcdt_eps is not None and not (self.linear_layer == "mamba" and self.linear_bcdt_eps > 0):
            raise ValueError(f"linear_bcdt_eps={self.linear_bcdt_eps} needs Mamba layers (linear_layer='mamba') and a "
                             "positive epsilon")
        if self.norm_eps <= 0 or self.init_std <= 0 or self.rope_theta <= 0:
            raise ValueError("norm_eps, init_std and rope_theta must be positive")

    @property
    def head_dim(self) -> int:
        """head_size with None resolved."""
        return self.head_size or self.dim // self.n_heads

    @property
    def cache_widths(self) -> tuple[int, int]:
        """(key, value) widths a KV cache holds per kv head and token: head_dim each, or, for latent attention's one
        "head", its latent and the rotated key part every head shares."""
        return (self.kv_lora_rank, self.rotary_dim) if self.kv_lora_rank else (self.head_dim, self.head_dim)

    @property
    def v_head_dim(self) -> int:
        """v_head_size with None resolved: the width of each head's value and output."""
        return self.v_head_size or self.head_dim

    @property
    def rotary_dim(self) -> int:
        """rope_dim with None resolved: the dimensions of each head that RoPE rotates."""
        return self.rope_dim or self.head_dim

    def is_nope(self, layer: int) -> bool:
        """Whether layer `layer` (0-based) takes no positions (`nope_every`)."""
        if self.global_first and self.nope_every == self.global_every:
            return layer % self.nope_every == 0
        return last_of_every(layer, self.nope_every)

    def window_of(self, layer: int) -> int | None:
        """The sliding window of layer `layer` (0-based), or None where it attends to all earlier tokens."""
        if self.sliding_window is None or (layer % self.global_every == 0 if self.global_first
                                           else last_of_every(layer, self.global_every)):
            return None
        return self.sliding_window

    @property
    def global_shaped(self) -> bool:
        """Whether the global layers' attention is shaped apart from the windowed ones' (Gemma 4)."""
        return self.global_head_size is not None or self.global_kv_heads is not None or self.global_values_are_keys

    @property
    def global_shape(self) -> tuple[int, int]:
        """(kv heads, head width) of the global layers, with None resolved."""
        return self.global_kv_heads or self.kv_heads, self.global_head_size or self.head_dim

    def is_global_shaped(self, layer: int) -> bool:
        """Whether layer `layer` (0-based) is a global layer shaped apart (`global_shape`, global_values_are_keys):
        its KV cache slots are the cache's `k_global`, `v_global`."""
        return self.global_shaped and self.window_of(layer) is None

    def kv_source(self, layer: int) -> int | None:
        """The layer whose keys and values layer `layer` attends to, where it makes none (`kv_shared_layers`): the
        last of its kind before them. None: it makes its own."""
        first = self.n_layers - self.kv_shared_layers
        if layer < first:
            return None
        return max(j for j in range(first) if self.window_of(j) == self.window_of(layer))

    def is_linear(self, layer: int) -> bool:
        """Whether layer `layer` (0-based) is a linear layer (`linear_layer`: Gated DeltaNet, a short
        convolution, Mamba 2), not softmax attention (`full_attention_every`, `attention_layers`)."""
        if self.attention_layers is not None:
            return layer not in self.attention_layers
        return self.full_attention_every is not None and not last_of_every(layer, self.full_attention_every)

    def has_experts(self, layer: int) -> bool:
        """Whether block `layer`'s MLP (0-based) is the mixture of experts (`expert_layers`, `dense_layers`)."""
        if not self.n_experts:
            return False
        return layer in self.expert_layers if self.expert_layers is not None else layer >= self.dense_layers

    @property
    def has_linear_layers(self) -> bool:
        """Whether any layer is linear: a hybrid model (Qwen3.5, LFM2)."""
        return self.full_attention_every is not None or self.attention_layers is not None

    @property
    def branches_share_rows(self) -> bool:
        """Whether continuations of one context can share a row (`Segments.shared_prefix`: DPO's responses to one
        prompt, evaluation's choices): not with linear attention layers, whose one state per row cannot fork mid-row."""
        return not self.has_linear_layers

    @property
    def linear_heads(self) -> tuple[int, int]:
        """(key heads, value heads) of a linear attention layer, with None resolved."""
        keys = self.linear_key_heads or self.n_heads
        return keys, self.linear_value_heads or keys

    @property
    def linear_sizes(self) -> tuple[int, int]:
        """(key head width, value head width) of a linear attention layer, with None resolved."""
        key = self.linear_key_size or self.head_dim
        return key, self.linear_value_size or key

    @property
    def dt_rank(self) -> int:
        """Mamba's step input width, with None resolved (`linear_dt_rank`)."""
        return self.linear_dt_rank if self.linear_dt_rank is not None else -(-self.dim // 16)

    @property
    def kv_heads(self) -> int:
        """n_kv_heads with None resolved."""
        return self.n_heads if self.n_kv_heads is None else self.n_kv_heads

    @property
    def hidden_dim(self) -> int:
        """ffn_dim with None resolved (kept a property so `replace(cfg, dim=...)` never goes stale)."""
        if self.ffn_dim is not None:
            return self.ffn_dim
        if self.mlp in ("gelu", "relu2", "xielu"):
            return 4 * self.dim
        return 256 * math.ceil(int(8 * self.dim / 3) / 256)  # gated (Llama): 2/3 of 4*dim, multiple of 256

    @property
    def expert_hidden_dim(self) -> int:
        """expert_ffn_dim with None resolved."""
        return self.expert_ffn_dim or self.hidden_dim


def last_of_every(layer: int, every: int | None) -> bool:
    """Whether layer `layer` (0-based) is the last of a group of `every` layers: the global one among windowed
    layers (Gemma 3's pattern, and transformers' `sliding_window_pattern`), or the one without positions
    (`nope_every`); None: no layer is."""
    return bool(every) and (layer + 1) % every == 0


_GPT2 = ModelConfig(max_seq_len=1024, vocab_size=50304)  # 50257 padded to a multiple of 64 as nanoGPT does (faster matmuls)
_GPT3 = ModelConfig(max_seq_len=2048, vocab_size=50257)
_LLAMA = ModelConfig(mlp="swiglu", norm="rmsnorm", pos="rope", bias=False)
_LLAMA4_SCOUT = replace(
    _LLAMA, vocab_size=202048, dim=5120, n_layers=48, n_heads=40, n_kv_heads=8, ffn_dim=16384, max_seq_len=262144,
    rope_theta=500000.0, rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                       "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
    rope_float32=True, norm_eps=1e-5, tie_embeddings=False, sliding_window=8192, window_chunked=True, global_every=4,
    nope_every=4,
    qk_l2_norm=True, nope_query_scale=0.1, nope_query_floor=8192, n_experts=16, experts_per_token=1,
    expert_ffn_dim=8192, shared_expert_ffn_dim=8192, router_scores="sigmoid", router_rounded=True,
    renormalize_experts=False, expert_input_weights=True,
)
"""Llama 4 Scout (the "llama-4-scout" preset), whose attention Maverick keeps."""
_GEMMA2 = replace(
    _LLAMA, mlp="geglu", norm_unit_offset=True, scale_embeddings=True, sandwich_norm=True, norm_eps=1e-6,
    max_seq_len=8192, sliding_window=4096, global_every=2, attn_softcap=50.0, logit_softcap=30.0, tie_embeddings=True,
    vocab_size=256000,
)
_GPT_OSS = replace(
    _LLAMA, vocab_size=201088, dim=2880, n_heads=64, n_kv_heads=8, head_size=64, ffn_dim=2880, max_seq_len=131072,
    rope_theta=150000.0, rope_scaling={"rope_type": "yarn", "factor": 32.0, "original_max_position_embeddings": 4096,
                                       "beta_fast": 32.0, "beta_slow": 1.0, "truncate": False},
    sliding_window=128, global_every=2, bias=True, tie_embeddings=False, norm_cast_after=True, attn_sinks=True,
    swiglu_limit=7.0, experts_per_token=4,
)
_GEMMA3 = replace(
    _LLAMA, mlp="geglu", norm_unit_offset=True, scale_embeddings=True, qk_norm=True, sandwich_norm=True, norm_eps=1e-6,
    max_seq_len=32768, rope_theta=1000000.0, rope_local_theta=10000.0, sliding_window=512, global_every=6,
    tie_embeddings=True,
)
_GLM45 = replace(
    _LLAMA, vocab_size=151552, n_heads=96, n_kv_heads=8, head_size=128, rope_dim=64, max_seq_len=131072,
    rope_theta=1000000.0, norm_eps=1e-5, qkv_bias=True, tie_embeddings=False, n_experts=128, experts_per_token=8,
    router_scores="sigmoid", expert_choice_bias=True, expert_weights_float32=True,
)
_DEEPSEEK_V3 = replace(
    _LLAMA, vocab_size=129280, dim=7168, n_layers=61, n_heads=128, n_kv_heads=128, head_size=192, rope_dim=64,
    kv_lora_rank=512, q_lora_rank=1536, v_head_size=128, ffn_dim=18432, max_seq_len=163840, norm_eps=1e-6,
    tie_embeddings=False,
    rope_scaling={"rope_type": "yarn", "factor": 40.0, "original_max_position_embeddings": 4096,
                  "beta_fast": 32.0, "beta_slow": 1.0, "mscale": 1.0, "mscale_all_dim": 1.0},
    n_experts=256, experts_per_token=8, expert_ffn_dim=2048, shared_expert_ffn_dim=2048, router_scores="sigmoid",
    expert_choice_bias=True, expert_groups=8, expert_groups_per_token=4, routed_scaling=2.5, dense_layers=3,
    expert_weights_float32=True,
)
_DEEPSEEK_V2_LITE = replace(
    _LLAMA, vocab_size=102400, dim=2048, n_layers=27, n_heads=16, n_kv_heads=16, head_size=192, rope_dim=64,
    kv_lora_rank=512, v_head_size=128, ffn_dim=10944, max_seq_len=163840, norm_eps=1e-6, tie_embeddings=False,
    rope_scaling={"rope_type": "yarn", "factor": 40.0, "original_max_position_embeddings": 4096,
                  "beta_fast": 32.0, "beta_slow": 1.0, "mscale": 0.707, "mscale_all_dim": 0.707},
    n_experts=64, experts_per_token=6, expert_ffn_dim=1408, shared_expert_ffn_dim=2816, renormalize_experts=False,
    router_float32=True, expert_group_best=1, dense_layers=1, expert_weights_float32=True, rope_float32=True,
)

_GEMMA4_31B = replace(
    _GEMMA3, vocab_size=262144, dim=5376, n_layers=60, n_heads=32, n_kv_heads=16, head_size=256, ffn_dim=21504,
    max_seq_len=262144, norm_unit_offset=False, norm_cast_after=True, sliding_window=1024,
    rope_scaling={"rope_type": "proportional", "partial_rotary_factor": 0.25}, global_head_size=512, global_kv_heads=4,
    global_values_are_keys=True, value_norm=True, layer_scalar=True, attn_scale_dim=1, logit_softcap=30.0,
)

_ERNIE4_5 = replace(
    _LLAMA, vocab_size=103424, dim=1024, n_layers=18, n_heads=16, n_kv_heads=2, head_size=128, ffn_dim=3072,
    max_seq_len=131072, rope_theta=500000.0, norm_eps=1e-5, tie_embeddings=True, rope_float32=True,
)

# Pythia (Biderman et al. 2023; GPT-NeoX's layout): LayerNorms and an exact-GELU MLP with biases everywhere,
# attention beside the MLP on two norms of the block's input, a quarter of each 128- or 64-wide head rotated, untied.
_PYTHIA = ModelConfig(
    vocab_size=50304, max_seq_len=2048, mlp="gelu", gelu_exact=True, norm="layernorm", pos="rope", bias=True,
    tie_embeddings=False, parallel_block=True, parallel_mlp_norm=True,
)
_FALCON = ModelConfig(
    vocab_size=65024, max_seq_len=2048, mlp="gelu", gelu_exact=True, norm="layernorm", norm_bias=True, pos="rope",
    bias=False, parallel_block=True,
)

PRESETS: dict[str, ModelConfig] = {
    # Trains on a CPU in seconds; vocab_size is replaced by the tokenizer's at train time.
    "debug": ModelConfig(vocab_size=256, dim=64, n_layers=2, n_heads=4, max_seq_len=128),
    # The same size with every Llama feature switched on, GQA included (2 kv heads for 4 query heads).
    "debug-llama": replace(_LLAMA, vocab_size=256, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=192, max_seq_len=128),
    "gpt2-124m": replace(_GPT2, dim=768, n_layers=12, n_heads=12),
    "gpt2-350m": replace(_GPT2, dim=1024, n_layers=24, n_heads=16),
    "gpt2-774m": replace(_GPT2, dim=1280, n_layers=36, n_heads=20),
    "gpt2-1.5b": replace(_GPT2, dim=1600, n_layers=48, n_heads=25),
    # Pythia's suite, trained on the Pile in one order (public checkpoints every 1000 steps): 162M, 1.41B and 6.86B
    "pythia-160m": replace(_PYTHIA, dim=768, n_layers=12, n_heads=12, ffn_dim=3072, rope_dim=16),
    "pythia-1.4b": replace(_PYTHIA, dim=2048, n_layers=24, n_heads=16, ffn_dim=8192, rope_dim=32),
    "pythia-6.9b": replace(_PYTHIA, vocab_size=50432, dim=4096, n_layers=32, n_heads=32, ffn_dim=16384, rope_dim=32),
    # Falcon (TII, 2023): LayerNorms with biases, linear layers without, an exact-GELU MLP beside attention, RoPE;
    # Falcon-7B: one norm, one kv head (multi-query), 71 heads of 64, tied; 6.92B parameters (7.22B with the head
    # its checkpoint stores again). Falcon-40B: two norms, 8 kv heads for 128; 41.3B (41.8B stored).
    "falcon-7b": replace(_FALCON, dim=4544, n_layers=32, n_heads=71, n_kv_heads=1, ffn_dim=18176),
    "falcon-40b": replace(_FALCON, dim=8192, n_layers=60, n_heads=128, n_kv_heads=8, ffn_dim=32768,
                          parallel_mlp_norm=True),
    # GPT-2-small's width and depth with Llama's parts: 4 kv heads for 12 query heads (GQA, Ainslie et
    # al. 2023) cut the KV cache 3x at little quality cost; ffn 2048 = 8/3*768 keeps the MLP's parameter
    # count equal to a 4x GELU MLP; a 32k vocab with an untied head lands at ~125M parameters.
    "llama-125m": replace(
        _LLAMA, vocab_size=32000, dim=768, n_layers=12, n_heads=12, n_kv_heads=4, ffn_dim=2048,
        max_seq_len=2048, tie_embeddings=False,
    ),
    "llama-3.2-1b": replace(
        _LLAMA, vocab_size=128256, dim=2048, n_layers=16, n_heads=32, n_kv_heads=8, ffn_dim=8192,
        max_seq_len=131072, rope_theta=500000.0, tie_embeddings=True, norm_eps=1e-5,
        rope_scaling={
            "rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192,
        },
    ),
    # Llama-3-8B's shape (Meta, "The Llama 3 Herd of Models", 2024): the usual LoRA / QLoRA target.
    "llama-3-8b": replace(
        _LLAMA, vocab_size=128256, dim=4096, n_layers=32, n_heads=32, n_kv_heads=8, ffn_dim=14336,
        max_seq_len=8192, rope_theta=500000.0, tie_embeddings=False, norm_eps=1e-5,
    ),
    # Qwen3-0.6B and Qwen3-8B (Qwen team, "Qwen3 Technical Report", 2025): 128-wide heads whatever the width
    # (attention wider than the residual stream in the 0.6B), q/k norms, no biases.
    "qwen3-0.6b": replace(
        _LLAMA, vocab_size=151936, dim=1024, n_layers=28, n_heads=16, n_kv_heads=8, head_size=128, ffn_dim=3072,
        max_seq_len=40960, rope_theta=1000000.0, norm_eps=1e-6, qk_norm=True, tie_embeddings=True,
    ),
    "qwen3-8b": replace(
        _LLAMA, vocab_size=151936, dim=4096, n_layers=36, n_heads=32, n_kv_heads=8, head_size=128, ffn_dim=12288,
        max_seq_len=40960, rope_theta=1000000.0, norm_eps=1e-6, qk_norm=True, tie_embeddings=False,
    ),
    # Gemma 2 (Gemma team, "Gemma 2: Improving Open Language Models at a Practical Size", 2024): windowed layers (4096
    # tokens) alternating with global ones, attention scores capped at +-50 and logits at +-30, sandwich norms.
    "gemma-2-2b": replace(_GEMMA2, dim=2304, n_layers=26, n_heads=8, n_kv_heads=4, head_size=256, ffn_dim=9216),
    "gemma-2-9b": replace(_GEMMA2, dim=3584, n_layers=42, n_heads=16, n_kv_heads=8, head_size=256, ffn_dim=14336),
    "gemma-2-27b": replace(_GEMMA2, dim=4608, n_layers=46, n_heads=32, n_kv_heads=16, head_size=128, ffn_dim=36864,
                           attn_scale_dim=144),
    # Gemma 3's text models (Gemma team, "Gemma 3 Technical Report", 2025): five local layers (a 512-token window,
    # RoPE base 10k) to one global (base 1M), 256-wide heads, one kv head, q/k norms and sandwich norms.
    "gemma3-270m": replace(
        _GEMMA3, vocab_size=262144, dim=640, n_layers=18, n_heads=4, n_kv_heads=1, head_size=256, ffn_dim=2048,
    ),
    "gemma3-1b": replace(
        _GEMMA3, vocab_size=262144, dim=1152, n_layers=26, n_heads=4, n_kv_heads=1, head_size=256, ffn_dim=6912,
    ),
    # Gemma 4 31B (Google DeepMind, 2026): five windowed layers (1024 tokens, 16 kv heads of 256) to one global (4 kv
    # heads of 512 whose values are their keys' projection, a quarter of each head's pairs turning); value norms,
    # layer scalars, unscaled scores, logits capped at 30 (30.7B parameters).
    "gemma-4-31b": _GEMMA4_31B,
    # Gemma 4 26B-A4B: 31B's attention, narrower (16 heads; 2 kv heads on its global layers), and in every layer its
    # dense MLP beside 128 experts, 8 per token (25.2B parameters, 3.8B active).
    "gemma-4-26b-a4b": replace(
        _GEMMA4_31B, dim=2816, n_layers=30, n_heads=16, n_kv_heads=8, global_kv_heads=2, ffn_dim=2112, n_experts=128,
        experts_per_token=8, expert_ffn_dim=704, shared_expert_ffn_dim=2112, experts_own_norms=True,
        router_input_norm=True, expert_weights_float32=True,
    ),
    # ERNIE 4.5 (Baidu, 2025) 0.3B: Llama's parts, RoPE in float32 in adjacent pairs, 128-wide heads, a tied head
    # (360M parameters).
    "ernie-4.5-0.3b": _ERNIE4_5,
    # ERNIE-4.5-21B-A3B: 64 experts, 6 per token by a float32 softmax and a choice bias, beside 2 shared ones, after a
    # dense layer (21.8B parameters, 3.4B active).
    "ernie-4.5-21b-a3b": replace(
        _ERNIE4_5, dim=2560, n_layers=28, n_heads=20, n_kv_heads=4, head_size=None, ffn_dim=12288, n_experts=64,
        experts_per_token=6, expert_ffn_dim=1536, shared_expert_ffn_dim=3072, router_float32=True,
        expert_choice_bias=True, dense_layers=1,
    ),
    # Mixtures of experts. Mixtral-8x7B (Jiang et al. 2024): Mistral-7B's shape with 8 experts of its MLP's size, 2
    # per token (46.7B parameters, 12.9B active). Qwen3-30B-A3B: 128 narrow experts, 8 per token, q/k norms.
    "mixtral-8x7b": replace(
        _LLAMA, vocab_size=32000, dim=4096, n_layers=32, n_heads=32, n_kv_heads=8, ffn_dim=14336, max_seq_len=32768,
        rope_theta=1000000.0, tie_embeddings=False, norm_eps=1e-5, n_experts=8, experts_per_token=2,
        expert_weights_float32=True,
    ),
    "qwen3-30b-a3b": replace(
        _LLAMA, vocab_size=151936, dim=2048, n_layers=48, n_heads=32, n_kv_heads=4, head_size=128, ffn_dim=6144,
        max_seq_len=40960, rope_theta=1000000.0, norm_eps=1e-6, qk_norm=True, tie_embeddings=False, n_experts=128,
        experts_per_token=8, expert_ffn_dim=768,
    ),
    # GPT-OSS (OpenAI, "gpt-oss-120b & gpt-oss-20b Model Card", 2025): 32 or 128 experts with clamped SwiGLU, 4 per
    # token; biases everywhere, a sink per head, 128-token windows alternating with global layers, YaRN to 131k.
    "gpt-oss-20b": replace(_GPT_OSS, n_layers=24, n_experts=32),
    "gpt-oss-120b": replace(_GPT_OSS, n_layers=36, n_experts=128),
    # GLM-4-9B (Zhipu AI, "ChatGLM: A Family of Large Language Models from GLM-130B to GLM-4 All Tools", 2024):
    # Llama's blocks with q/k/v biases, 2 kv heads for 32, half of each head rotated; 9.40B parameters.
    "glm-4-9b": replace(_LLAMA, vocab_size=151552, dim=4096, n_layers=40, n_heads=32, n_kv_heads=2, ffn_dim=13696,
                        max_seq_len=131072, rope_dim=64, qkv_bias=True, norm_eps=1.5625e-07, tie_embeddings=False),
    # GLM-4.5 and GLM-4.5-Air (Zhipu AI, "GLM-4.5: Agentic, Reasoning, and Coding (ARC) Foundation Models", 2025):
    # DeepSeek-V3's routing (sigmoid scores, a choice bias, weights scaled) over 160 or 128 narrow experts, 8 per token,
    # beside a shared one, after 3 or 1 dense layers; 96 query heads, half of each rotated, q/k/v biases.
    "glm-4.5": replace(_GLM45, dim=5120, n_layers=92, ffn_dim=12288, qk_norm=True, n_experts=160, expert_ffn_dim=1536,
                       shared_expert_ffn_dim=1536, routed_scaling=2.5, dense_layers=3),
    "glm-4.5-air": replace(_GLM45, dim=4096, n_layers=46, ffn_dim=10944, expert_ffn_dim=1408,
                           shared_expert_ffn_dim=1408, dense_layers=1),
    # DeepSeek-V3 (DeepSeek-AI, "DeepSeek-V3 Technical Report", 2024; R1 and Kimi K2 share the architecture): latent
    # attention (a 512-wide latent and 64 rotated dims cached per token; queries through a 1536-wide latent), 256
    # experts in 8 groups, 8 per token from 4 groups, a shared expert, 3 dense layers; YaRN to 160k.
    "deepseek-v3": _DEEPSEEK_V3,
    # MiniMax-M2 (MiniMax, 2025): 256 narrow experts, 8 per token chosen by sigmoid scores plus a bias, q/k norms over
    # all heads, half of each 128-wide head rotated (229B parameters, 10B active).
    "minimax-m2": replace(
        _LLAMA, vocab_size=200064, dim=3072, n_layers=62, n_heads=48, n_kv_heads=8, head_size=128, rope_dim=64,
        ffn_dim=1536, max_seq_len=196608, norm_eps=1e-6, rope_theta=5000000.0, tie_embeddings=False, qk_norm=True,
        qk_norm_whole=True, n_experts=256, experts_per_token=8, router_scores="sigmoid", expert_choice_bias=True,
        expert_weights_float32=True,
    ),
    # DeepSeek-V2-Lite (DeepSeek-AI, "DeepSeek-V2", 2024): latent attention without a query latent, 64 experts, 6 per
    # token by a softmax, beside 2 shared ones, after a dense layer (15.7B parameters, 2.4B active).
    "deepseek-v2-lite": _DEEPSEEK_V2_LITE,
    # Kimi K2 (Moonshot AI, "Kimi K2: Open Agentic Intelligence", 2025): DeepSeek-V3's architecture with 64 heads, 384
    # experts in one group, one dense layer and a larger vocabulary (1.03T parameters, 33B active).
    "kimi-k2": replace(
        _DEEPSEEK_V3, vocab_size=163840, n_heads=64, n_kv_heads=64, n_experts=384, expert_groups=1,
        expert_groups_per_token=1, dense_layers=1, routed_scaling=2.827, max_seq_len=131072, rope_theta=50000.0,
        rope_scaling={"rope_type": "yarn", "factor": 32.0, "original_max_position_embeddings": 4096, "beta_fast": 1.0,
                      "beta_slow": 1.0, "mscale": 1.0, "mscale_all_dim": 1.0},
    ),
    # LFM2-1.2B (Liquid AI, 2025): ten gated short convolutions (3 taps) around six attention layers with q/k norms
    # (32 heads, 8 kv heads), tied embeddings; 1.17B parameters.
    "lfm2-1.2b": replace(
        _LLAMA, vocab_size=65536, dim=2048, n_layers=16, n_heads=32, n_kv_heads=8, ffn_dim=8192, max_seq_len=128000,
        rope_theta=1000000.0, norm_eps=1e-5, qk_norm=True, tie_embeddings=True, attention_layers=(2, 5, 8, 10, 12, 14),
        linear_layer="short_conv", linear_conv_size=3,
    ),
    # Granite 4.0-H-350M (IBM, 2025): 28 Mamba 2 layers (48 heads of 32, a state of 128) around 4 attention layers
    # without positions (12 heads, 4 kv heads), Granite's multipliers, tied embeddings; 340M parameters.
    "granite-4.0-h-350m": replace(
        _LLAMA, vocab_size=100352, dim=768, n_layers=32, n_heads=12, n_kv_heads=4, ffn_dim=2048, max_seq_len=32768,
        norm_eps=1e-5, tie_embeddings=True, nope_every=1, attention_layers=(10, 13, 17, 27), linear_layer="mamba2",
        linear_key_heads=1, linear_value_heads=48, linear_key_size=128, linear_value_size=32, embed_multiplier=12.0,
        residual_multiplier=0.246, logit_divisor=3.0, attn_scale_dim=4096,
    ),
    # NVIDIA-Nemotron-Nano-9B-v2 (NVIDIA, 2025): 56 sublayers as 31 blocks: 27 Mamba 2 layers (128 heads of 80, 8
    # groups, a state of 128) and 4 attention layers without positions (40 heads of 128, 8 kv heads), 25 of them with a
    # squared-ReLU MLP after; 8.89B parameters.
    "nemotron-nano-9b-v2": replace(
        _LLAMA, vocab_size=131072, dim=4480, n_layers=31, n_heads=40, n_kv_heads=8, head_size=128, ffn_dim=15680,
        max_seq_len=131072, mlp="relu2", norm_eps=1e-5, norm_cast_after=True, tie_embeddings=False, nope_every=1,
        attention_layers=(8, 12, 17, 22), no_mlp_layers=(3, 7, 11, 16, 21, 24), linear_layer="mamba2",
        linear_key_heads=8, linear_value_heads=128, linear_key_size=128, linear_value_size=80,
    ),
    # NVIDIA-Nemotron-3-Nano-30B-A3B (NVIDIA, 2025): 52 sublayers as 29 blocks: 23 Mamba 2 layers (64 heads of 64, 8
    # groups, a state of 128) and 6 attention layers without positions (32 heads of 128, 2 kv heads), 23 of them with a
    # mixture after: 128 squared-ReLU experts, 6 per token by sigmoid scores plus a bias, scaled 2.5, beside a shared
    # expert; 31.6B parameters.
    "nemotron-3-nano-30b-a3b": replace(
        _LLAMA, vocab_size=131072, dim=2688, n_layers=29, n_heads=32, n_kv_heads=2, head_size=128, ffn_dim=1856,
        max_seq_len=262144, mlp="relu2", norm_eps=1e-5, norm_cast_after=True, tie_embeddings=False, nope_every=1,
        attention_layers=(3, 7, 11, 15, 19, 24), no_mlp_layers=(2, 6, 10, 14, 18, 23), linear_layer="mamba2",
        linear_key_heads=8, linear_value_heads=64, linear_key_size=128, linear_value_size=64, n_experts=128,
        experts_per_token=6, expert_ffn_dim=1856, shared_expert_ffn_dim=3712, router_scores="sigmoid",
        router_float32=True, expert_choice_bias=True, routed_scaling=2.5,
    ),
    # Mamba-Codestral-7B (Mistral AI, 2024): 64 Mamba 2 layers (128 heads of 64, 8 groups, a state of 128), each a
    # mixer alone, with no attention and no MLP (n_heads and ffn_dim are placeholders no layer reads); 7.29B parameters.
    "mamba-codestral-7b": replace(
        _LLAMA, vocab_size=32768, dim=4096, n_layers=64, n_heads=1, n_kv_heads=1, ffn_dim=4096, max_seq_len=262144,
        norm_eps=1e-5, tie_embeddings=False, attention_layers=(), no_mlp_layers=tuple(range(64)), linear_layer="mamba2",
        linear_key_heads=8, linear_value_heads=128, linear_key_size=128, linear_value_size=64,
    ),
    # Mamba (Gu and Dao 2023; state-spaces/mamba-130m-hf): 24 Mamba layers of 1536 channels, a state of 16 values
    # each, steps of rank 48, every layer a mixer alone; tied embeddings; 129M parameters.
    "mamba-130m": replace(
        _LLAMA, vocab_size=50280, dim=768, n_layers=24, n_heads=1, n_kv_heads=1, ffn_dim=768, max_seq_len=262144,
        norm_eps=1e-5, tie_embeddings=True, attention_layers=(), no_mlp_layers=tuple(range(24)), linear_layer="mamba",
        linear_key_heads=1, linear_value_heads=1536, linear_key_size=16, linear_value_size=1, linear_dt_rank=48,
        init_std=0.1,
    ),
    # FalconMamba-7B (TII, 2024): 64 Mamba layers of 8192 channels, a state of 16, steps of rank 256, its steps, B and C
    # RMS-normalised (1e-6); untied; 7.27B parameters.
    "falcon-mamba-7b": replace(
        _LLAMA, vocab_size=65024, dim=4096, n_layers=64, n_heads=1, n_kv_heads=1, ffn_dim=4096, max_seq_len=262144,
        norm_eps=1e-5, tie_embeddings=False, attention_layers=(), no_mlp_layers=tuple(range(64)), linear_layer="mamba",
        linear_key_heads=1, linear_value_heads=8192, linear_key_size=16, linear_value_size=1, linear_dt_rank=256,
        linear_bcdt_eps=1e-6, init_std=0.1,
    ),
    # Jamba (AI21, 2024; Jamba-v0.1, whose shape Jamba 1.5 Mini keeps): 28 Mamba layers of 8192 channels, a state of
    # 16, steps of rank 256, their steps, B and C normalised with weights, and 4 attention layers without positions
    # (32 heads, 8 kv heads), one in 8; every other block's MLP a mixture of 16 SwiGLU experts, 2 per token weighed by
    # their softmax unrenormalised; 51.6B parameters, 12B active.
    "jamba-v0.1": replace(
        _LLAMA, vocab_size=65536, dim=4096, n_layers=32, n_heads=32, n_kv_heads=8, ffn_dim=14336, max_seq_len=262144,
        norm_eps=1e-6, tie_embeddings=False, nope_every=1, attention_layers=(4, 12, 20, 28), linear_layer="mamba",
        linear_key_heads=1, linear_value_heads=8192, linear_key_size=16, linear_value_size=1, linear_dt_rank=256,
        linear_bcdt_eps=1e-6, linear_bcdt_weights=True, n_experts=16, experts_per_token=2, renormalize_experts=False,
        expert_layers=tuple(range(1, 32, 2)),
    ),
    # Jamba 1.5 Large (AI21, 2024): Jamba's layers, 8192 wide, 72 of them (9 attention layers of 64 heads), experts of
    # 24576, steps of rank 256; 398B parameters, 94B active.
    "jamba-1.5-large": replace(
        _LLAMA, vocab_size=65536, dim=8192, n_layers=72, n_heads=64, n_kv_heads=8, ffn_dim=24576, max_seq_len=262144,
        norm_eps=1e-6, tie_embeddings=False, nope_every=1, attention_layers=tuple(range(4, 72, 8)),
        linear_layer="mamba", linear_key_heads=1, linear_value_heads=16384, linear_key_size=16, linear_value_size=1,
        linear_dt_rank=256, linear_bcdt_eps=1e-6, linear_bcdt_weights=True, n_experts=16, experts_per_token=2,
        renormalize_experts=False, expert_layers=tuple(range(1, 72, 2)),
    ),
    # Llama 4 Scout (Meta, 2025): 48 layers of 40 heads (8 kv heads), RoPE (llama3-scaled) in three of every four,
    # attending within chunks of 8192 with weightless q/k norms, the fourth without positions, its queries' temperature
    # tuned; in every layer 16 experts of 8192 (one per token, weighing its input) beside a shared one; 107.8B text
    # parameters (109B with its vision tower), 17B active.
    "llama-4-scout": _LLAMA4_SCOUT,
    # Llama 4 Maverick (Meta, 2025): Scout's attention without q/k norms or RoPE scaling; a mixture of 128 experts in
    # every other layer (one per token, beside the shared one), dense MLPs of 16384 between; 400.7B parameters, 17B
    # active.
    "llama-4-maverick": replace(
        _LLAMA4_SCOUT, max_seq_len=1048576, rope_scaling=None, qk_l2_norm=False, n_experts=128,
        expert_layers=tuple(range(1, 48, 2)),
    ),
    # Qwen3.5 (Qwen team, 2026): three Gated DeltaNet layers (16 query/key heads serving 32 value heads, 128 wide) to
    # one of gated attention (16 heads of 256, 4 kv heads, a quarter of each rotated); (1 + w) norms; 262k context.
    "qwen3.5-9b": replace(
        _LLAMA, vocab_size=248320, dim=4096, n_layers=32, n_heads=16, n_kv_heads=4, head_size=256, ffn_dim=12288,
        max_seq_len=262144, rope_theta=1e7, rope_dim=64, norm_eps=1e-6, norm_unit_offset=True, qk_norm=True,
        tie_embeddings=False, attn_output_gate=True, full_attention_every=4, linear_key_heads=16,
        linear_value_heads=32, linear_key_size=128, linear_value_size=128,
    ),
    # debug-llama with Qwen3.5's layers: a Gated DeltaNet layer, then a gated attention one, twice.
    "debug-qwen3.5": replace(_LLAMA, vocab_size=256, dim=64, n_layers=4, n_heads=4, n_kv_heads=2, ffn_dim=96,
                             max_seq_len=128, norm_unit_offset=True, qk_norm=True, rope_dim=8, attn_output_gate=True,
                             full_attention_every=2, linear_key_heads=2, linear_value_heads=4),
    # debug-llama with Llama 4's layers: attention within chunks of 8 with weightless q/k norms, then a layer without
    # positions whose queries take a temperature, twice; in every other block 4 experts weighing their inputs (1 per
    # token, sigmoid-scored) beside a shared one.
    "debug-llama4": replace(_LLAMA, vocab_size=256, dim=64, n_layers=4, n_heads=4, n_kv_heads=2, ffn_dim=96,
                            max_seq_len=128, rope_float32=True, sliding_window=8, window_chunked=True,
                            global_every=2, nope_every=2, qk_l2_norm=True, nope_query_scale=0.1, nope_query_floor=8,
                            n_experts=4, experts_per_token=1, expert_ffn_dim=48, shared_expert_ffn_dim=48,
                            router_scores="sigmoid", router_rounded=True, renormalize_experts=False,
                            expert_input_weights=True, expert_layers=(1, 3)),
    # debug-llama with a mixture of experts in each block (Mixtral's layout): 8 experts, 2 per token.
    "debug-moe": replace(_LLAMA, vocab_size=256, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=96,
                         max_seq_len=128, n_experts=8, experts_per_token=2, expert_weights_float32=True),
    # Shapes for FLOP and memory estimates (Brown et al. 2020, table 2.1); never built in tests.
    "gpt3-6.7b": replace(_GPT3, dim=4096, n_layers=32, n_heads=32),
    "gpt3-175b": replace(_GPT3, dim=12288, n_layers=96, n_heads=96),
}
