"""The one decoder-only Transformer: tokens (B, T) -> logits (B, T, V).

Every variant (GPT-2, GPT-3, Llama, Llama 4, Mistral, Qwen2, Qwen3, Gemma, Gemma 2, Gemma 3, Gemma 4, Phi-3, OLMo 2
and 3, Mixtral, Qwen3-MoE, GLM-4.5, DeepSeek-V3, GPT-OSS, Qwen3.5) comes from `ModelConfig` fields: learned positions or
RoPE, LayerNorm or RMSNorm, GELU, squared-ReLU, SwiGLU (clamped, GPT-OSS's) or GeGLU MLP (or none: Nemotron-H's blocks
of a mixer alone) or a mixture of gated experts (softmax- or sigmoid-routed, after dense layers), multi-head,
grouped-query, latent or gated attention, or Gated DeltaNet, Mamba 2 or short convolution linear layers between
attention ones, query/key norms (per head or over all heads, or weightless after RoPE), a sliding window or chunks (on
every layer, or local layers between global ones with their own RoPE base, and global layers of their own shape), a
temperature of the queries, norms on the sublayers' inputs, outputs or both, biases, tying, embedding scaling, capped
attention scores and logits, attention sinks, value norms, layer scalars.
The layers live beside it: attention, the mask type and the KV cache in `model/attention.py`, linear attention in
`model/linear_attention.py`, norms, MLPs and experts in `model/layers.py`; this file stacks them into blocks and the
model, and builds each forward's masks.

It does not compute the loss, sample tokens, load checkpoints or wrap itself for parallelism:
training computes the loss from the logits, `temper.infer` samples, `hf/` reads and writes
Hugging Face files, and `temper.train.parallel` wraps `self.layers` from outside.
"""

from __future__ import annotations

import math
from dataclasses import replace
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention.flex_attention import BlockMask

from temper.model.attention import (
    ATTN_IMPLS,
    Attention,
    KVCache,
    LatentAttention,
    MaskMod,
    Segments,
    causal_mask_mod,
    flex_kernels,
    softcap,
)
from temper.model.config import ModelConfig
from temper.model.layers import MLP, XIELU, MoE, RMSNorm, make_norm
from temper.model.linear_attention import LINEAR_LAYERS, GatedRMSNorm, GroupGatedRMSNorm, Mamba, Runs
from temper.model.rope import long_rope_length, rope_tables

LINEAR = "linear"
"""The mask kind of linear attention layers (`Block.mask_kind`), beside the attention layers' windows."""


class Block(nn.Module):
    """Pre-norm residual block: x + attn(norm(x)), then x + mlp(norm(x)) (GPT-2, Radford et al. 2019); with
    `sandwich_norm` each sublayer's output is normalised too before it is added (Gemma 2 and 3), and without
    `pre_norm` only the output is: x + norm(attn(x)) (OLMo 2); with `residual_multiplier` m, x + m * attn(norm(x))
    (Granite); with `layer_scalar` the block's output is scaled as a whole (Gemma 4); with `parallel_block`,
    x + attn(norm(x)) + mlp(norm(x)), one norm (GPT-J, Wang and Komatsuzaki 2021; Cohere); in `no_mlp_layers`, the
    mixer alone (Nemotron-H)."""

    def __init__(self, cfg: ModelConfig, layer_idx: int) -> None:
        super().__init__()
        linear = cfg.is_linear(layer_idx)
        self.window = cfg.window_of(layer_idx)  # which mask (and, with rope_local_theta, which RoPE table) it takes
        self.mask_kind = LINEAR if linear else self.window  # what `Transformer._attention_mask` builds for it
        self.local_rope = self.window is not None and cfg.rope_local_theta is not None
        self.rotates = cfg.pos == "rope" and not cfg.is_nope(layer_idx) and not linear
        # Llama 4: an attention layer without positions scales its queries by a temperature (`nope_query_scale`)
        self.scales_queries = cfg.nope_query_scale is not None and not self.rotates and not linear
        self.attn_norm = make_norm(cfg) if cfg.pre_norm else None
        # The cache's slots are counted per kind: a hybrid model's KV cache holds its attention layers only, global
        # layers shaped apart (Gemma 4) have slots of their own shape; layers taking another's keys and values none.
        shaped = cfg.is_global_shaped(layer_idx)
        slot = sum((cfg.is_linear(j), cfg.is_global_shaped(j)) == (linear, shaped) and cfg.kv_source(j) is None
                   for j in range(layer_idx))
        attention = LatentAttention if cfg.kv_lora_rank else Attention
        linear_layer = LINEAR_LAYERS[cfg.linear_layer]
        self.attn = linear_layer(cfg, slot) if linear else attention(cfg, slot, shaped, layer_idx)
        self.attn_out_norm = make_norm(cfg) if cfg.sandwich_norm else None
        self.parallel = cfg.parallel_block  # the MLP reads attn_norm's output, or its own norm of x (GPT-NeoX)
        has_mlp = layer_idx not in cfg.no_mlp_layers  # Nemotron-H: a mixer alone
        own_norm = not cfg.parallel_block or cfg.parallel_mlp_norm
        self.mlp_norm = make_norm(cfg) if cfg.pre_norm and own_norm and has_mlp else None
        wide = 2 * cfg.hidden_dim if cfg.kv_shared_wide_mlp and cfg.kv_source(layer_idx) is not None else None
        self.mlp = None
        if has_mlp:
            self.mlp = MoE(cfg) if cfg.has_experts(layer_idx) else MLP(cfg, wide)  # DeepSeek-V3: dense first
        self.mlp_takes_raw = isinstance(self.mlp, MoE) and cfg.experts_own_norms  # Gemma 4: routes the raw input
        self.mlp_out_norm = make_norm(cfg) if cfg.sandwich_norm and has_mlp else None
        self.residual_multiplier = cfg.residual_multiplier
        # Gemma 4 E2B, E4B: its per-layer input (the model's per-layer embeddings), gated by the stream, added back
        self.per_layer_gate = self.per_layer_out = self.per_layer_out_norm = None
        if cfg.per_layer_input_size:
            self.per_layer_gate = nn.Linear(cfg.dim, cfg.per_layer_input_size, bias=False)
            self.per_layer_out = nn.Linear(cfg.per_layer_input_size, cfg.dim, bias=False)
            self.per_layer_out_norm = make_norm(cfg)
            self.per_layer_act = F.silu if cfg.mlp == "swiglu" else partial(F.gelu, approximate="tanh")  # the MLP's
        # Gemma 4: the block's output times a scalar of its own, a checkpoint's value kept fixed (a buffer, not trained)
        self.register_buffer("layer_scalar", torch.ones(1) if cfg.layer_scalar else None)

    def _joining(self, h: torch.Tensor, out_norm: nn.Module | None) -> torch.Tensor:
        """A sublayer's output as it joins the residual stream: normalised (sandwich_norm), scaled (Granite)."""
        h = h if out_norm is None else out_norm(h)
        return h if self.residual_multiplier is None else h * self.residual_multiplier

    def forward(
        self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None = None,
        mask: torch.Tensor | BlockMask | None = None, causal: bool = True, cache: KVCache | None = None,
        per_layer: torch.Tensor | None = None, shared_kv: dict[int, tuple[torch.Tensor, torch.Tensor]] | None = None,
    ) -> torch.Tensor:
        """per_layer: this block's (B, T, P) per-layer input (`per_layer_input_size`); shared_kv: the keys and values
        layers share (`kv_shared_layers`), passed to attention."""
        h = x if self.attn_norm is None else self.attn_norm(x)
        shared = {} if shared_kv is None else {"shared_kv": shared_kv}  # (softmax attention alone takes them)
        a = self.attn(h, rope, mask, causal, cache, **shared)  # (B, T, C)
        if self.parallel:  # GPT-J's, Cohere's: the MLP reads the same normalised input (GPT-NeoX's: its own norm of
            # it); both join the stream
            m = self.mlp(h if self.mlp_norm is None else self.mlp_norm(x))  # (B, T, C)
            x = x + self._joining(a, None) + self._joining(m, None)  # (B, T, C)
        else:
            x = x + self._joining(a, self.attn_out_norm)
        if self.mlp is not None and not self.parallel:
            h = x if self.mlp_norm is None else self.mlp_norm(x)
            h = self.mlp(h, x) if self.mlp_takes_raw else self.mlp(h)  # (B, T, C)
            x = x + self._joining(h, self.mlp_out_norm)  # (B, T, C)
        if self.per_layer_gate is not None:
            h = self.per_layer_act(self.per_layer_gate(x)) * per_layer  # (B, T, P)
            x = x + self.per_layer_out_norm(self.per_layer_out(h))  # (B, T, C)
        return x if self.layer_scalar is None else x * self.layer_scalar


class Transformer(nn.Module):
    """Decoder-only transformer built from a `ModelConfig`; `forward` returns logits, never a loss.

    Parameter names: tok_emb, pos_emb (learned positions only), emb_norm (embed_norm with weights only),
    layers.{i}.{attn_norm, attn.{q,k,v,o}_proj,
    attn.{q,k}_norm (qk_norm only) or, in a linear layer, its own (`model/linear_attention.py`), attn_out_norm and
    mlp_out_norm (sandwich_norm only), mlp_norm (with parallel_block only with parallel_mlp_norm) and mlp (not in
    no_mlp_layers),
    mlp.{gate,up,down}_proj, or with n_experts mlp.router, mlp.experts.{j}.{gate,up,down}_proj, mlp.shared_expert, the
    buffer mlp.choice_bias and Gemma 4's mlp.{router_scale, expert_scale, shared_out_norm, experts_norm,
    experts_out_norm} where configured, and Gemma 4's buffer layer_scalar and per_layer_{gate, out, out_norm}}, Gemma
    4's per_layer_{emb, proj, norm}, norm,
    head (untied only; a tied head reuses tok_emb.weight, so state dicts never hold the same tensor twice).
    """

    attn_impl: str = "auto"
    """The kernel of masked forwards without a KV cache (packed documents, padding, a window shorter than
    the sequence): "flex" (FlexAttention's block mask, compiled on CUDA), "sdpa" (a dense (B, 1, T, T)
    mask) or "auto" (flex on CUDA, sdpa elsewhere: a CPU has no fused flex kernel, and torch no CPU flex
    backward). Set on the instance (`model.attn_impl = "sdpa"`; training recipes: `--train.attention`): a
    choice of kernel, not of the model, so no ModelConfig field (those are exported, and compared on resume).
    With `attn_softcap` or `attn_sinks`, "flex" serves unmasked forwards too (a causal block mask), and "sdpa"
    means the written-out `attention._written_attention`."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.pos_emb = nn.Embedding(cfg.max_seq_len, cfg.dim) if cfg.pos == "learned" else None
        self.drop = nn.Dropout(cfg.dropout)
        self.emb_norm = make_norm(cfg) if cfg.embed_norm else None  # nanochat: the embeddings normalised
        # Gemma 4 E2B, E4B: P values per layer for each token from a table of its own, beside a normalised projection
        # of its embedding (`per_layer_inputs`)
        self.per_layer_emb = self.per_layer_proj = self.per_layer_norm = None
        if cfg.per_layer_input_size:
            width = cfg.n_layers * cfg.per_layer_input_size
            self.per_layer_emb = nn.Embedding(cfg.per_layer_vocab_size or cfg.vocab_size, width)
            self.per_layer_proj = nn.Linear(cfg.dim, width, bias=False)
            self.per_layer_norm = RMSNorm(cfg.per_layer_input_size, cfg.norm_eps, cfg.norm_unit_offset,
                                          cfg.norm_cast_after)
        self.layers = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layers))
        self.norm = make_norm(cfg)
        self.head = None if cfg.tie_embeddings else nn.Linear(cfg.dim, cfg.vocab_size, bias=cfg.head_bias)
        for name, (table, _) in self._rope_tables().items():  # tables, not weights: non-persistent, by init_buffers()
            self.register_buffer(f"{name}_cos", torch.empty(cfg.max_seq_len, table.rotary_dim // 2), persistent=False)
            self.register_buffer(f"{name}_sin", torch.empty(cfg.max_seq_len, table.rotary_dim // 2), persistent=False)
        self.init_weights()

    # ---- initialisation -------------------------------------------------------------------------

    def _rope_tables(self) -> dict[str, tuple[ModelConfig, bool]]:
        """The RoPE tables the model keeps, by buffer prefix, as (the config they are computed from, LongRoPE's long
        table or not): its own (for global layers shaped apart, their head width's); with rope_local_theta the
        windowed layers' (their own base, unscaled, as Gemma 3's); with LongRoPE the long one. None where no layer
        rotates (Nemotron-H's, Granite 4.0-H's attention without positions: nope_every=1)."""
        c = self.cfg
        if not any(layer.rotates for layer in self.layers):
            return {}
        tables = {"rope": (replace(c, head_size=c.global_shape[1]) if c.global_shaped else c, False)}
        if c.rope_local_theta is not None:
            tables["rope_local"] = (replace(c, rope_theta=c.rope_local_theta, rope_scaling=None), False)
        if long_rope_length(c) is not None:
            tables["rope_long"] = (c, True)
        return tables

    def init_buffers(self, device: torch.device | str | None = None) -> None:
        """(Re)compute the RoPE cos/sin tables in float32, e.g. after building on the meta device."""
        for name, (cfg, long) in self._rope_tables().items():
            device = device or self.rope_cos.device
            cos, sin = rope_tables(cfg, self.cfg.max_seq_len, device, long)  # (S, R/2) each
            setattr(self, f"{name}_cos", cos)
            setattr(self, f"{name}_sin", sin)

    @torch.no_grad()
    def init_weights(self) -> None:
        """GPT-2 init: N(0, init_std) weights, zero biases, residual outputs scaled by 1/sqrt(2*n_layers).

        The scaling keeps the residual stream's variance independent of depth (Radford et al. 2019).
        Safe to call after `to_empty()` when the model was built on the meta device. On the meta device itself it
        draws nothing (there are no values, and torch's meta normal_ costs ~1 ms a tensor: seconds for the 18k
        tensors of a 128-expert model); whoever materialises the model loads or initialises its weights.
        """
        if next(self.parameters()).is_meta:
            self.init_buffers()
            return
        std = self.cfg.init_std
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, mean=0.0, std=std)
                if getattr(m, "bias", None) is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, (nn.LayerNorm, RMSNorm, GatedRMSNorm, GroupGatedRMSNorm, XIELU,
                                *LINEAR_LAYERS.values())):
                m.reset_parameters()
            elif isinstance(m, Attention) and m.sinks is not None:
                nn.init.zeros_(m.sinks)  # no pull towards the sink at first
            elif isinstance(m, MoE):
                if m.choice_bias is not None:
                    nn.init.zeros_(m.choice_bias)  # no expert favoured until training's balancing moves it
                for scale in (m.router_scale, m.expert_scale):  # Gemma 4's: ones, as its reference starts them
                    if scale is not None:
                        nn.init.ones_(scale)
            elif isinstance(m, Block) and m.layer_scalar is not None:
                nn.init.ones_(m.layer_scalar)
        for m in self.modules():
            out = (m.o_proj if isinstance(m, Attention) else m.down_proj if isinstance(m, MLP)
                   else m.out_proj if isinstance(m, tuple(LINEAR_LAYERS.values())) else None)
            if out is not None:
                nn.init.normal_(out.weight, mean=0.0, std=std / math.sqrt(2 * self.cfg.n_layers))
            if isinstance(m, Mamba):  # its dt_proj, which the first pass drew as any linear layer
                m.reset_steps()
        self.init_buffers()

    # ---- forward -------------------------------------------------------------------------------

    def forward(
        self, tokens: torch.Tensor, *, positions: torch.Tensor | None = None, cache: KVCache | None = None,
        segments: Segments | None = None, last_only: bool = False, logits_at: torch.Tensor | None = None,
        hidden_only: bool = False,
    ) -> torch.Tensor:
        """Logits (B, T, V) for tokens (B, T).

        positions: (B, T) per-row positions (left-padded batches); default 0 .. T-1. Not with a cache.
        cache: a `KVCache` from `new_cache`: the tokens go to each row's next slots, at positions equal to
            those slots, and see what the row holds before them (causally); every row's length grows by T.
            Callers fill rows of different lengths through `temper.infer.engine.prefill`.
        segments: which tokens form one sequence (packed documents, padding): see `Segments`. Default: the
            whole row is one causal sequence. Not with a cache.
        last_only: return only the last position's logits (B, 1, V), saving the head's matmul in decoding.
        logits_at: (B, T) bool; return logits (N, V) for its N True positions only, in row-major
            order: scoring a few continuation tokens then skips the head (T x V) on the rest.
        hidden_only: return the final (normed) hidden states (B, T, C) instead of logits: a loss that
            runs the output layer itself (train.losses' chunked cross-entropy) or another head (model.heads).

        A pipeline stage (`train.pipeline`: a model without some of its parts) runs its own: without `tok_emb`
        it takes the previous stage's hidden states (B, T, C) for `tokens`, and without `norm` it returns its
        last block's hidden states.
        """
        B, T = tokens.shape[:2]
        if cache is not None:
            if positions is not None or (segments is not None and segments.shared_prefix):
                raise ValueError("with a KV cache, positions and the mask come from its per-row lengths: pass no "
                                 "positions, and segments only to mark padding after each row's tokens (ids 0 and -1)")
            if T > cache.max_len:
                raise ValueError(f"KV cache holds {cache.max_len} tokens per row; {T} do not fit")
            positions = cache.positions(T)  # (B, T): each row's next slots
        elif positions is None and T > self.cfg.max_seq_len:
            raise ValueError(f"sequence of {T} tokens exceeds max_seq_len={self.cfg.max_seq_len}")
        first = self.tok_emb is not None  # the first pipeline stage, or the whole model
        x = self.tok_emb(tokens) if first else tokens  # (B, T, C)
        if first and self.cfg.scale_embeddings:  # Gemma: the factor rounded to the weights' dtype, as its reference does
            x = x * torch.tensor(self.cfg.dim**0.5, dtype=x.dtype)
        if first and self.cfg.embed_multiplier is not None:  # Granite: the float factor, as its reference multiplies
            x = x * self.cfg.embed_multiplier
        if first and self.emb_norm is not None:
            x = self.emb_norm(x)
        per_layer = self.per_layer_inputs(tokens, x) if self.per_layer_emb is not None else None  # (B, T, L, P)
        ropes: dict[bool, tuple[torch.Tensor, torch.Tensor] | None] = {False: None}  # by Block.local_rope
        nope = None  # what the layers without positions take: Llama 4's temperature of their queries, or nothing
        if self.pos_emb is not None:
            pe = self.pos_emb.weight[:T] if positions is None else self.pos_emb(positions)
            x = x + pe  # (B, T, C)
        elif self.cfg.pos == "rope":
            dtype = torch.float32 if self.cfg.rope_float32 else x.dtype
            for local in {layer.local_rope for layer in self.layers if layer.rotates}:
                cos, sin = self._rope_at("rope_local" if local else "rope", T, positions)  # (B|1, T, R/2)
                if self.cfg.rope_tables_rounded:  # Cohere: rounded to the activations' dtype, then rotated in float32
                    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
                ropes[local] = (cos.unsqueeze(-2).to(dtype), sin.unsqueeze(-2).to(dtype))  # (B|1, T, 1, R/2)
            if self.cfg.query_scale_beta is not None:  # Ministral 3: the queries' temperature, a third tensor
                at = positions if positions is not None else torch.arange(T, device=tokens.device)[None]  # (B|1, T)
                length = self.cfg.rope_scaling["original_max_position_embeddings"]
                scale = 1 + self.cfg.query_scale_beta * torch.log(1 + torch.floor(at / length))  # as its reference
                ropes = {k: r if r is None else (*r, scale[:, :, None, None]) for k, r in ropes.items()}
            if self.cfg.nope_query_scale is not None:  # Llama 4's: 1 + s log(1 + floor((p + 1) / floor)), as written
                at = positions if positions is not None else torch.arange(T, device=tokens.device)[None]  # (B|1, T)
                steps = torch.floor((at + 1) / self.cfg.nope_query_floor)
                nope = (None, None, (1 + self.cfg.nope_query_scale * torch.log1p(steps))[:, :, None, None])
        if first:
            x = self.drop(x)
        # One mask per window among the layers (one in all but mixed local/global models), shared by its layers.
        masks = {kind: self._attention_mask(segments, B, T, tokens.device, kind,
                                            positions if cache is not None else None,
                                            cache.max_len if cache is not None else 0, positions)
                 for kind in {layer.mask_kind for layer in self.layers}}
        shared_kv = {} if self.cfg.kv_shared_layers else None  # the keys and values layers share, as they are made
        for i, layer in enumerate(self.layers):
            extra = {} if per_layer is None else {"per_layer": per_layer[:, :, i]}
            if shared_kv is not None:
                extra["shared_kv"] = shared_kv
            rope = ropes[layer.local_rope] if layer.rotates else nope if layer.scales_queries else None
            x = layer(x, rope, *masks[layer.mask_kind], cache, **extra)  # (B, T, C)
        if cache is not None:
            cache.advance(T)
        if self.norm is None:  # a pipeline stage before the last: its hidden states go on to the next one
            return x  # (B, T, C)
        if last_only:
            x = x[:, -1:]  # (B, 1, C)
        elif logits_at is not None:
            x = x[logits_at]  # (N, C)
        x = self.norm(x)
        if hidden_only:  # the final hidden states, for a head applied outside (train.losses, model.heads)
            return x  # (B, T, C) or (N, C)
        return self.logits(x)

    def per_layer_inputs(self, tokens: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """Every block's per-layer input (B, T, L, P) (Gemma 4 E2B, E4B): the tokens' rows of the per-layer table,
        scaled by sqrt(P) (rounded to the weights' dtype, as the reference does), plus the normalised projection of
        their embeddings x (B, T, C) scaled by 1/sqrt(C), the sum scaled by 1/sqrt(2)."""
        B, T = tokens.shape
        L, P = self.cfg.n_layers, self.cfg.per_layer_input_size
        table = self.per_layer_emb(tokens) * torch.tensor(P**0.5, dtype=self.per_layer_emb.weight.dtype)
        projected = self.per_layer_norm((self.per_layer_proj(x) * self.cfg.dim**-0.5).view(B, T, L, P))
        return (projected + table.view(B, T, L, P)) * 2**-0.5

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """The output layer on final hidden states (..., C) -> (..., V): the tied embedding, or the head as a module
        call (so an adapter swapped in for it runs), divided by `logit_divisor`, then `logit_softcap`. The one place
        logits are made, for `forward` and for losses and rollouts that take `hidden_only` states (`train.losses`'
        chunked loss fuses the same steps)."""
        logits = F.linear(hidden, self.tok_emb.weight) if self.head is None else self.head(hidden)
        if self.cfg.logit_divisor is not None:
            logits = logits / self.cfg.logit_divisor
        return logits if self.cfg.logit_softcap is None else softcap(logits, self.cfg.logit_softcap)

    def _rope_at(self, name: str, T: int, positions: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """(cos, sin) of table `name` at this forward's positions: (T, R/2) for 0 .. T-1, else (B, T, R/2).

        With LongRoPE, a row longer than the original length (its last position + 1) takes the long table for every
        one of its positions, as transformers' Phi-3 does. transformers decides once for the batch, by its longest
        row; temper decides per row where positions or a cache give each row's own, so that a decoded row's logits
        never depend on the rows batched with it (without them a padded row counts its padding, as in
        transformers' training)."""
        cos, sin = getattr(self, f"{name}_cos"), getattr(self, f"{name}_sin")
        length = long_rope_length(self.cfg) if name == "rope" else None
        if length is None:
            return (cos[:T], sin[:T]) if positions is None else (cos[positions], sin[positions])
        if positions is None:
            return (self.rope_long_cos[:T], self.rope_long_sin[:T]) if T > length else (cos[:T], sin[:T])
        long = (positions.amax(dim=1) >= length)[:, None, None]  # (B, 1, 1) no host sync
        return (torch.where(long, self.rope_long_cos[positions], cos[positions]),
                torch.where(long, self.rope_long_sin[positions], sin[positions]))

    def _attention_mask(
        self, segments: Segments | None, B: int, T: int, device: torch.device, window: int | str | None = None,
        cache_positions: torch.Tensor | None = None, cache_len: int = 0, positions: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor | BlockMask | Runs | None, bool]:
        """(mask, is_causal). Without segments, avoid a mask so SDPA can pick flash attention; where a mask
        is needed (segments, a window shorter than T), a FlexAttention block mask when `_use_flex` says so
        (one per forward, shared by every layer), else SDPA's dense mask.

        With a cache (cache_positions: (B, T), the new tokens' slots), the keys are all cache_len slots:
        the query at position p of a row sees its slots 0..p (slot j holds position j; slots past p are
        later tokens, or stale ones of a row that restarted), within the sliding `window` (a layer's), or within its
        chunk of `window` positions (`window_chunked`: without a cache, by `positions` (B|1, T) where given).

        window=LINEAR: what linear attention layers take instead, their `Runs` (None: one document per row).
        """
        if segments is not None and segments.ids.shape != (B, T):
            raise ValueError(f"segments.ids must be (batch, tokens) = {(B, T)}, got {tuple(segments.ids.shape)}")
        if window == LINEAR:
            if segments is not None and segments.shared_prefix:
                raise ValueError("linear attention layers keep one state per row, so continuations cannot share a "
                                 "context (Segments.shared_prefix): score each continuation in a row of its own")
            return (None if segments is None else Runs.from_ids(segments.ids)), True
        if cache_positions is not None:
            k_pos = torch.arange(cache_len, device=device)  # (S_max,)
            q_pos = cache_positions[:, :, None]  # (B, T, 1)
            mask = k_pos <= q_pos  # (B, T, S_max)
            if window is not None and self.cfg.window_chunked:  # the keys of the query's chunk (Llama 4)
                mask &= k_pos // window == q_pos // window
            elif window is not None:  # the last `window` keys, the query's own included (Mistral)
                mask &= k_pos > q_pos - window
            return mask[:, None], False  # (B, 1, T, S_max)
        chunked = window is not None and self.cfg.window_chunked and positions is not None
        chunk_positions = positions.expand(B, T) if chunked else None  # (B, T)
        written = self.cfg.attn_softcap or self.cfg.attn_sinks  # scores SDPA cannot compute: flex, where it is chosen
        if (segments is None and (window is None or T <= window and chunk_positions is None)
                and not (written and self._use_flex(device))):
            return None, True  # plain causal prefill / training (capped scores, sinks on CUDA: a causal block mask)
        visible = self._mask_mod(segments, window, chunk_positions)
        # a plain causal (windowed) mask is the same for every row; chunks counted by positions are each row's own
        rows = B if segments is not None or chunk_positions is not None else 1
        if self._use_flex(device):
            make_block_mask = flex_kernels(device.type)[0]
            return make_block_mask(visible, rows, None, T, T, device=device), False
        idx = torch.arange(T, device=device)  # (T,)
        b = torch.arange(rows, device=device)[:, None, None]  # (B|1, 1, 1)
        return visible(b, None, idx[None, :, None], idx[None, None, :])[:, None], False  # (B|1, 1, T, T)

    def _mask_mod(self, segments: Segments | None, window: int | None, positions: torch.Tensor | None = None
                  ) -> MaskMod:
        """The one rule of a forward without a cache, as a FlexAttention mask_mod (broadcastable indices):
        `segments.mask_mod`, or plain causality, within the sliding `window` or the query's chunk (`window_chunked`,
        of the row's `positions` (B, T) where given, else of the indices)."""
        base = segments.mask_mod if segments is not None else causal_mask_mod
        if window is None:
            return base
        if self.cfg.window_chunked:
            def chunked(b: torch.Tensor, h: torch.Tensor, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
                # counted in positions: a packed document or a left-padded row chunks from its own start (Llama 4)
                q_at, k_at = (q, k) if positions is None else (positions[b, q], positions[b, k])
                return base(b, h, q, k) & (k_at // window == q_at // window)

            return chunked

        def windowed(b: torch.Tensor, h: torch.Tensor, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
            # counted in indices: the keys within `window` of the query, itself included (Mistral)
            return base(b, h, q, k) & (k > q - window)

        return windowed

    def _use_flex(self, device: torch.device) -> bool:
        """Whether this masked, cache-free forward takes a block mask (`attn_impl`)."""
        if self.attn_impl not in ATTN_IMPLS:
            raise ValueError(f"attn_impl must be one of {ATTN_IMPLS}, got {self.attn_impl!r}")
        if self.attn_impl == "sdpa" or (self.attn_impl == "auto" and device.type != "cuda"):
            return False
        # FlexAttention has no attention dropout: a training forward that drops attention probabilities
        # keeps SDPA (and its dense mask) rather than silently training without that dropout.
        if self.training and self.cfg.dropout > 0:
            return False
        # An attention module that adds keys of its own (prefix tuning) takes the dense mask it extends.
        return all(m.takes_block_mask for m in self.modules() if isinstance(m, Attention))

    # ---- inference helpers and accounting ------------------------------------------------------

    def new_cache(
        self, batch: int, max_len: int, device: torch.device | str | None = None, dtype: torch.dtype | None = None
    ) -> KVCache:
        """An empty KV cache for `batch` rows of up to `max_len` tokens (default: the weights' device/dtype).

        It holds the key/value heads of this model's attention modules: under tensor parallelism, the
        rank's share of them (`train.tensor_parallel` sets `Attention.n_kv_heads` to it)."""
        # The final norm's weight: on the compute device and in the compute dtype even where a frozen input table
        # is held in host memory (train.parallel.HostEmbedding).
        p = next(m.weight for m in (self.norm, self.head, self.tok_emb)  # (nanochat's norm has no weight)
                 if m is not None and m.weight is not None)
        c = self.cfg
        owners = [m for m in self.modules() if isinstance(m, Attention) and m.kv_source is None]  # of cache slots
        attention = [m for m in owners if not m.global_shaped]
        shaped = [m for m in owners if m.global_shaped]
        linear = [m for m in self.modules() if isinstance(m, tuple(LINEAR_LAYERS.values()))]
        k_dim, v_dim = c.cache_widths
        # (layers, (Hv, Dk, Dv) of a state (None: a short convolution's), (K - 1, C) of the convolution's inputs)
        states = (len(linear), *linear[0].state_shapes) if linear else None
        return KVCache(
            len(attention), batch, attention[0].n_kv_heads if attention else 1, max_len, k_dim,
            device=device or p.device, dtype=dtype or p.dtype, v_dim=v_dim, linear=states,
            global_=(len(shaped), shaped[0].n_kv_heads, shaped[0].head_dim) if shaped else None,
        )

    def num_params(self, exclude_embedding: bool = False) -> int:
        """Parameters, each shared tensor counted once.

        exclude_embedding drops the pure lookup tables: learned positions, and the token embedding
        unless it is tied (then it is also the output head, which does a matrix product).
        """
        n = sum(p.numel() for p in self.parameters())
        for table in (self.tok_emb, self.per_layer_emb):
            if table is not None and not isinstance(table.weight, nn.Parameter):
                n += table.weight.numel()  # a frozen table training holds in host memory, as a buffer
        if exclude_embedding:
            if self.pos_emb is not None:
                n -= self.pos_emb.weight.numel()
            if self.per_layer_emb is not None:  # Gemma 4's per-layer table: a lookup too
                n -= self.per_layer_emb.weight.numel()
            if self.head is not None:
                n -= self.tok_emb.weight.numel()
        return n

    def matmul_params(self) -> int:
        """N of the FLOP formula: weights of every matrix product, output head included, lookups excluded."""
        n = sum(m.weight.numel() for m in self.modules() if isinstance(m, nn.Linear))
        for moe in (m for m in self.modules() if isinstance(m, MoE)):  # a token runs only k of the experts
            experts = sum(m.weight.numel() for m in moe.experts.modules() if isinstance(m, nn.Linear))
            n -= experts * (len(moe.experts) - moe.k) // len(moe.experts)
        return n + (self.tok_emb.weight.numel() if self.head is None else 0)  # a tied head is tok_emb

    def flops_per_token(self, seq_len: int, *, head: bool = True) -> float:
        """Training FLOPs per token: 6*N (forward + backward matmuls) + 12*L*d*T (attention scores).

        The PaLM appendix B / nanoGPT accounting; biases and norms are elementwise and left out. d is
        the attention width n_heads * head_dim (d_model, except where head_size sets it apart); with values of
        another width (latent attention), the mean of the query's and the value's, 6 * L * H * (D + Dv) * T.
        head=False: without the language-model head (V x d), for callers that never run it (a reward head on
        the hidden states, a retriever pooling them): for a small model that head is most of the matmul
        weights, and counting it would inflate MFU several times over.
        """
        c = self.cfg
        lm_head = 0 if head else 6 * c.vocab_size * c.dim
        widths = [c.global_shape[1] * 2 if c.is_global_shaped(i) else c.head_dim + c.v_head_dim
                  for i in range(c.n_layers) if not c.is_linear(i)]  # linear attention has no T x T scores
        attention = 6 * c.n_heads * sum(widths) * seq_len
        return float(6 * self.matmul_params() - lm_head + attention)
