"""How tokens see each other: the mask (`Segments`), the static KV cache, RoPE's rotation and the attention layers:
`Attention` (multi-head and grouped-query) and `LatentAttention` (DeepSeek's), which differ in how they make queries,
keys and values (`project`) and share how they attend (`attend`).

Attention goes through `F.scaled_dot_product_attention` (a GPU picks flash attention when no mask is
needed), or, for masked forwards without a KV cache (packed documents, padding, a window shorter than
the sequence), through FlexAttention's block-sparse kernel (`Transformer.attn_impl` chooses). Capped scores
(Gemma 2) and sinks (GPT-OSS), which SDPA cannot take, go through FlexAttention where it is chosen, else through
`_written_attention`.

It does not build masks for a whole forward (`Transformer._attention_mask` does, once per window) nor compute
the RoPE tables (`model/rope.py`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention.flex_attention import AuxRequest, BlockMask, create_block_mask, flex_attention

from temper.model.config import ModelConfig
from temper.model.layers import RMSNorm, rms_normalized
from temper.model.rope import yarn_score_multiplier


@dataclass
class Segments:
    """Which earlier tokens each token may attend to: the model's one mask type, for packed documents
    and padding alike (and for rows that score several continuations of one shared context).

    ids: (B, T) int64. Tokens of a row with the same id form one sequence: a packed document, or the
        whole row of a padded batch. A token sees the earlier tokens of its own id; -1 marks padding.
    shared_prefix: id 0 is a context that every other id of its row continues (`eval.loglik` scores the
        choices of a question side by side after one copy of it): tokens of any id also see id 0.

    One rule (`mask_mod`) serves both attention paths: `dense` evaluates it into SDPA's (B, 1, T, T) bool
    mask, and FlexAttention's `create_block_mask(segments.mask_mod, ...)` turns it into the block-sparse
    form, which skips the masked blocks of a packed row instead of computing them.
    """

    ids: torch.Tensor
    shared_prefix: bool = False

    @classmethod
    def padding(cls, valid: torch.Tensor) -> Segments:
        """One sequence per row from a (B, T) bool mask of real tokens (False: padding, anywhere in the row)."""
        return cls(valid.long() - 1)  # real -> 0, padding -> -1

    @property
    def mask_mod(self):
        """visible(b, h, q, k): whether query q of row b may attend to key k, for broadcastable index
        tensors (FlexAttention's mask_mod; h, the head, is unused).

        A padding query sees only itself: a fully masked row would make softmax NaN, and a NaN in a
        padded slot poisons real rows through 0 * NaN in the next layer."""
        ids, shared = self.ids, self.shared_prefix

        def visible(b: torch.Tensor, h: torch.Tensor, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
            seg_q, seg_k = ids[b, q], ids[b, k]
            same = (seg_k == seg_q) | (seg_k == 0) if shared else seg_k == seg_q
            return ((k <= q) & same & (seg_k >= 0)) | (k == q)

        return visible

    def dense(self) -> torch.Tensor:
        """(B, 1, T, T) bool: `mask_mod` at every (query, key) pair, for SDPA's attn_mask."""
        B, T = self.ids.shape
        idx = torch.arange(T, device=self.ids.device)
        b = torch.arange(B, device=self.ids.device)[:, None, None]  # (B, 1, 1)
        return self.mask_mod(b, None, idx[None, :, None], idx[None, None, :])[:, None]  # (B, 1, T, T)

    def to(self, device: torch.device | str) -> Segments:
        return Segments(self.ids.to(device), self.shared_prefix)


ATTN_IMPLS = ("auto", "sdpa", "flex")

MaskMod = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


_COMPILED_FLEX: dict[str, tuple[Callable[..., BlockMask], Callable[..., torch.Tensor]]] = {}


def flex_kernels(device_type: str) -> tuple[Callable[..., BlockMask], Callable[..., torch.Tensor]]:
    """(create_block_mask, flex_attention) for a device: compiled once per process on CUDA, where eager
    flex_attention runs an unfused reference (slower than SDPA) and compiled create_block_mask never
    builds the dense T x T mask; eager elsewhere (CPU tests; a CPU run picks SDPA unless told otherwise).

    Compiled on first use, not at import (torch.compile's setup costs seconds). Inside a compiled region (a
    block compiled in place, or the whole model) the plain functions: the enclosing graph traces them and
    compiles the flex kernel itself."""
    if device_type != "cuda" or torch.compiler.is_compiling():
        return create_block_mask, flex_attention
    if device_type not in _COMPILED_FLEX:
        _COMPILED_FLEX[device_type] = (torch.compile(create_block_mask), torch.compile(flex_attention))
    return _COMPILED_FLEX[device_type]


class KVCache:
    """Preallocated keys and values of every layer, with a fill length per row (a static cache).

    Row b holds the keys and values of its tokens at slots 0 .. lengths[b] - 1, and slot j is
    position j of that row (RoPE, learned positions): rows fill, empty and restart independently,
    so one batch can hold requests of different lengths (continuous batching, RL rollouts) and
    `temper.infer.cache` can fork, reset and refill rows. New keys and values are scattered at
    each row's own slots, and attention always spans all `max_len` slots behind a mask built from
    the lengths, so no tensor changes shape between decode steps (what `torch.compile` and CUDA
    graphs need; gpt-fast's static cache, with per-row lengths).

    A row never grows past `max_len`: writes past the end land on the last slot (so an idle row
    of a static batch cannot fail), which the engine avoids for live rows by checking on the host.

    Global layers shaped apart from the windowed ones (Gemma 4: fewer, wider kv heads) keep theirs in `k_global`,
    `v_global` ((Lg, B, Hkv_g, S_max, Dg)), numbered among themselves (`global_`: their count, heads and width).

    Linear attention layers (`model/linear_attention.py`) keep no keys: each holds a state per row (`state`, float32,
    (Llin, B, Hv, Dk, Dv); none for short convolutions) and its convolution's last inputs (`conv`, (Llin, B, K - 1,
    C)), which a row of length 0 reads as zeros. Such a state holds the whole row and cannot be cut back: a row's
    length only grows, or restarts at 0.
    """

    def __init__(
        self, n_layers: int, batch: int, n_kv_heads: int, max_len: int, head_dim: int,
        *, device: torch.device | str | None = None, dtype: torch.dtype | None = None, v_dim: int | None = None,
        linear: tuple[int, tuple[int, int, int] | None, tuple[int, int]] | None = None,
        global_: tuple[int, int, int] | None = None,
    ) -> None:
        shape = (n_layers, batch, n_kv_heads, max_len)
        self.k = torch.zeros(*shape, head_dim, device=device, dtype=dtype)  # (L, B, Hkv, S_max, D)
        self.v = torch.zeros(*shape, v_dim or head_dim, device=device, dtype=dtype)  # (L, B, Hkv, S_max, Dv)
        self.lengths = torch.zeros(batch, dtype=torch.long, device=device)  # (B,) slots filled per row
        self.max_len = max_len
        self.k_global = self.v_global = None
        if global_ is not None:  # (global layers, their kv heads, their head width)
            layers, heads, width = global_
            self.k_global = torch.zeros(layers, batch, heads, max_len, width, device=device, dtype=dtype)
            self.v_global = torch.zeros_like(self.k_global)  # (Lg, B, Hkv_g, S_max, Dg)
        self.state = self.conv = None
        if linear is not None:  # (linear layers, (Hv, Dk, Dv) of a state or None, (K - 1, C) of convolution inputs)
            layers, state, conv = linear
            if state is not None:
                self.state = torch.zeros(layers, batch, *state, device=device)  # (Llin, B, Hv, Dk, Dv) float32
            self.conv = torch.zeros(layers, batch, *conv, device=device, dtype=dtype)  # (Llin, B, K - 1, C)

    def per_row(self) -> dict[str, torch.Tensor]:
        """The tensors that hold rows, by attribute, each with its rows on dim 1: what forking, selecting and putting
        back rows copies (besides `lengths`)."""
        return {name: t for name in ("k", "v", "k_global", "v_global", "state", "conv")
                if (t := getattr(self, name)) is not None}

    def linear_state(self, slot: int) -> tuple[torch.Tensor | None, torch.Tensor]:
        """Linear layer `slot`'s state (B, Hv, Dk, Dv) (None: a short convolution's) and convolution inputs
        (B, K - 1, C), zero in empty rows."""
        fresh = (self.lengths == 0)[:, None, None, None]
        state = None if self.state is None else self.state[slot].masked_fill(fresh, 0)
        return state, self.conv[slot].masked_fill(fresh[..., 0], 0)

    def set_linear_state(self, slot: int, state: torch.Tensor | None, conv: torch.Tensor) -> None:
        if state is not None:
            self.state[slot].copy_(state)
        self.conv[slot].copy_(conv)

    @property
    def length(self) -> int:
        """The longest row's length, read on the host (a device sync: for tests and checks, not per step)."""
        return int(self.lengths.max())

    def positions(self, T: int) -> torch.Tensor:
        """(B, T) the slots, and positions, of T new tokens per row: right after each row's filled slots."""
        pos = self.lengths[:, None] + torch.arange(T, device=self.lengths.device)  # (B, T)
        return pos.clamp(max=self.max_len - 1)

    def update(
        self, layer: int, k: torch.Tensor, v: torch.Tensor, global_shaped: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Write the new (B, Hkv, T, D) keys and (B, Hkv, T, Dv) values at each row's next T slots; return every
        slot's, for attention behind the mask of `Transformer._attention_mask`. global_shaped: `layer` numbers the
        global layers shaped apart, whose slots are `k_global`, `v_global`."""
        B, H, T, _ = k.shape
        keys, values = (self.k_global, self.v_global) if global_shaped else (self.k, self.v)
        slots = self.positions(T)[:, None, :, None]  # (B, 1, T, 1)
        keys[layer].scatter_(2, slots.expand(k.shape), k.to(keys.dtype))
        values[layer].scatter_(2, slots.expand(v.shape), v.to(values.dtype))
        return keys[layer], values[layer]

    def advance(self, n: int) -> None:
        """Mark `n` more slots of every row as filled (the model calls this once per forward, after every layer)."""
        self.lengths.add_(n).clamp_(max=self.max_len)


def _rotated_queries(q: torch.Tensor, rope: tuple[torch.Tensor, ...]) -> torch.Tensor:
    """Queries (B, T, H, D) rotated by `rope` (cos, sin), rounded to their dtype, then, where `rope` carries a third
    tensor (B|1, T, 1, 1), multiplied by it, rounded to their dtype first (`query_scale_beta`, Ministral 3's)."""
    q = apply_rope(q, *rope[:2]).to(q.dtype)
    return q if len(rope) == 2 else q * rope[2].to(q.dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate pairs (x_i, x_{i+D/2}) by position-dependent angles (Su et al. 2021).

    The half-split pairing (not interleaved pairs) is the Hugging Face layout, so Llama weights
    load without permuting q and k. x: (B, T, H, D); cos, sin: (B or 1, T, 1, R/2), R <= D: a partial rotary model
    (Phi-4-mini) rotates the leading R dimensions of each head and passes the rest through.
    """
    rotated = 2 * cos.shape[-1]
    if rotated < x.shape[-1]:
        return torch.cat((apply_rope(x[..., :rotated], cos, sin), x[..., rotated:]), dim=-1)
    x1, x2 = x.chunk(2, dim=-1)  # (B, T, H, D/2) each
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)


class Attention(nn.Module):
    """Causal self-attention with grouped-query heads (Ainslie et al. 2023) and an optional KV cache.

    The mask is SDPA's bool tensor (or None with `causal`), or a FlexAttention `BlockMask` built once
    per forward by `Transformer._attention_mask` and shared by every layer of the same window (never with a
    cache)."""

    takes_block_mask: ClassVar[bool] = True
    """Whether `extend_kv` passes a `BlockMask` through; a subclass whose extra keys lie outside its key
    axis says False, and the model then gives it SDPA's dense mask."""

    def __init__(self, cfg: ModelConfig, layer_idx: int, global_shaped: bool = False, layer: int | None = None) -> None:
        super().__init__()
        self.layer_idx = layer_idx  # which slice of the KV cache this layer owns (of `k_global` if global_shaped)
        self.global_shaped = global_shaped  # a global layer shaped apart (Gemma 4): its heads, width, values
        # Gemma 4 E2B's and E4B's last layers attend to an earlier layer's keys and values (`kv_shared_layers`): the
        # layer (its index in the model) whose they take, and whether this layer's are taken
        self.layer, self.kv_source = layer, None if layer is None else cfg.kv_source(layer)
        self.kv_shared = layer is not None and any(cfg.kv_source(j) == layer for j in range(cfg.n_layers))
        self.n_heads = cfg.n_heads
        self.n_kv_heads, self.head_dim = cfg.global_shape if global_shaped else (cfg.kv_heads, cfg.head_dim)
        # Gemma 4: each value head normalised without a weight, as its reference does (in float32, rounded after)
        self.value_norm_eps = cfg.norm_eps if cfg.value_norm else None
        self.dropout = cfg.dropout
        self.resid_drop = nn.Dropout(cfg.dropout)
        self.scale = None if cfg.attn_scale_dim is None else cfg.attn_scale_dim ** -0.5  # None: the kernels' 1/sqrt(D)
        self.softcap = cfg.attn_softcap
        # GPT-OSS: one learned logit per query head, a softmax column with no value behind it.
        self.sinks = nn.Parameter(torch.zeros(cfg.n_heads)) if cfg.attn_sinks else None
        self.make_projections(cfg)

    def make_projections(self, cfg: ModelConfig) -> None:
        """The layers that make queries, keys and values (`project` runs them) and the output projection."""
        # Separate q/k/v projections (not one fused matrix) so tensor parallelism can shard each by
        # heads and LoRA can target each by name, as in the Hugging Face Llama layout.
        biased = cfg.bias if cfg.attn_bias is None else cfg.attn_bias  # (GPT-J: the MLP's alone)
        qkv_bias = biased or cfg.qkv_bias
        self.output_gate = cfg.attn_output_gate  # q_proj makes each head's queries, then its output gates
        self.q_proj = nn.Linear(cfg.dim, self.n_heads * self.head_dim * (2 if self.output_gate else 1), bias=qkv_bias)
        own_kv = self.kv_source is None  # a layer taking another's keys and values makes none
        self.k_proj = nn.Linear(cfg.dim, self.n_kv_heads * self.head_dim, bias=qkv_bias) if own_kv else None
        # Gemma 4's global layers: the values are the keys' projection (attention_k_eq_v), so no v_proj
        values_are_keys = self.global_shaped and cfg.global_values_are_keys
        self.v_proj = (nn.Linear(cfg.dim, self.n_kv_heads * self.head_dim, bias=qkv_bias)
                       if own_kv and not values_are_keys else None)
        self.o_proj = nn.Linear(self.n_heads * self.head_dim, cfg.dim, bias=biased)
        # Qwen3, Gemma 3: one RMSNorm of width head_dim shared by every query head, one by every key head; OLMo 2:
        # one over all the query heads' values at once, one over the keys'.
        self.qk_norm_whole = cfg.qk_norm_whole
        self.qkv_clip = cfg.qkv_clip
        self.qk_norm_after_rope = cfg.qk_norm_after_rope  # Hunyuan: each head's vector rotated, then normalised
        self.qk_l2_eps = cfg.norm_eps if cfg.qk_l2_norm else None  # Llama 4: weightless, after RoPE
        q_width, k_width = ((self.n_heads * self.head_dim, self.n_kv_heads * self.head_dim) if cfg.qk_norm_whole
                            else (self.head_dim, self.head_dim))
        norm = (cfg.norm_eps, cfg.norm_unit_offset, cfg.norm_cast_after, cfg.norm_weightless)
        self.q_norm = RMSNorm(q_width, *norm) if cfg.qk_norm else None
        self.k_norm = RMSNorm(k_width, *norm) if cfg.qk_norm and own_kv else None

    def forward(
        self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None,
        mask: torch.Tensor | BlockMask | None, causal: bool, cache: KVCache | None,
        shared_kv: dict[int, tuple[torch.Tensor, torch.Tensor]] | None = None,
    ) -> torch.Tensor:
        """rope: the (cos, sin) tables at this forward's positions, a third tensor (B|1, T, 1, 1) scaling the rotated
        queries (`query_scale_beta`), or (None, None, that scale) for a layer without positions whose queries take a
        temperature (`nope_query_scale`); None: no positions. shared_kv: with `kv_shared_layers`, the keys and values
        of the layers others attend to, by layer, as this forward makes them (this layer adds its own where others
        take them, or takes its source's)."""
        B, T, C = x.shape
        q, k, v, gate = self.project(x, rope, cache, shared_kv)  # (B, H, T, D), (B, Hkv, S, D), (B, Hkv, S, Dv)
        k, v, mask, causal = self.extend_kv(k, v, mask, causal, T)
        y = self.attend(q, k, v, mask, causal)  # (B, H, T, Dv)
        y = y.transpose(1, 2).reshape(B, T, -1)  # (B, T, H*Dv)
        if gate is not None:
            y = y * torch.sigmoid(gate)
        return self.resid_drop(self.o_proj(y))  # (B, T, C)

    def project(
        self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None, cache: KVCache | None,
        shared_kv: dict[int, tuple[torch.Tensor, torch.Tensor]] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Queries (B, H, T, D), rotated, every key and value (B, Hkv, S, D) (the cache's and these T tokens'), and the
        output's gates (B, T, H*D) with `attn_output_gate`, else None."""
        B, T, C = x.shape
        # Head counts come from the projections' outputs (-1), not the config: a tensor-parallel shard
        # of the projections holds a slice of the heads and runs this same code on it.
        q = self.q_proj(x)  # (B, T, H*D)
        gate = None
        if self.output_gate:
            q, gate = q.view(B, T, -1, 2 * self.head_dim).chunk(2, dim=-1)  # (B, T, H, D) each
            q, gate = q.reshape(B, T, -1), gate.reshape(B, T, -1)
        if self.kv_source is not None:  # another layer's keys and values, cached and rotated: queries alone here
            q = q.view(B, T, -1, self.head_dim)  # (B, T, H, D)
            q = q if self.q_norm is None or self.qk_norm_after_rope else self.q_norm(q)
            q = q if rope is None else _rotated_queries(q, rope)
            q = self.q_norm(q) if self.q_norm is not None and self.qk_norm_after_rope else q
            return (q.transpose(1, 2), *shared_kv[self.kv_source], gate)
        k = self.k_proj(x)  # (B, T, Hkv*D)
        v = k if self.v_proj is None else self.v_proj(x)  # (B, T, Hkv*D): without v_proj, k_proj's before its norm
        if self.q_norm is not None and self.qk_norm_whole:  # all heads' values normalised together
            q, k = self.q_norm(q), self.k_norm(k)
        if self.qkv_clip is not None:  # OLMo's and OLMoE's
            q, k, v = (t.clamp(-self.qkv_clip, self.qkv_clip) for t in (q, k, v))
        q = q.view(B, T, -1, self.head_dim)  # (B, T, H, D)
        k = k.view(B, T, -1, self.head_dim)  # (B, T, Hkv, D)
        v = v.view(B, T, -1, self.head_dim)  # (B, T, Hkv, D)
        if self.value_norm_eps is not None:
            v = rms_normalized(v, self.value_norm_eps).to(v.dtype)
        per_head_norm = self.q_norm is not None and not self.qk_norm_whole
        if per_head_norm and not self.qk_norm_after_rope:  # each head's vector normalised before it is rotated
            q, k = self.q_norm(q), self.k_norm(k)
        if rope is not None and rope[0] is None:  # no positions, the queries' temperature alone (Llama 4's NoPE
            # layers), multiplied in float32 and rounded once, as its reference does
            q = (q * rope[2]).to(q.dtype)
        elif rope is not None:
            q, k = _rotated_queries(q, rope), apply_rope(k, *rope[:2]).to(k.dtype)  # float32 tables: rounded after
            if self.qk_l2_eps is not None:  # Llama 4: each rotated head normalised without a weight
                q, k = rms_normalized(q, self.qk_l2_eps).to(q.dtype), rms_normalized(k, self.qk_l2_eps).to(k.dtype)
        if per_head_norm and self.qk_norm_after_rope:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, H|Hkv, T, D)
        if cache is not None:
            k, v = cache.update(self.layer_idx, k, v, self.global_shaped)  # (B, Hkv, S, D), S = cached + T
        if self.kv_shared:
            shared_kv[self.layer] = k, v
        return q, k, v, gate

    def attend(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | BlockMask | None, causal: bool,
    ) -> torch.Tensor:
        """softmax(q k^T * scale + mask) v: (B, H, T, Dv), through the kernel the mask and the variant call for."""
        B, n_heads, T, D = q.shape
        n_kv_heads = k.shape[1]
        dropout_p = self.dropout if self.training else 0.0
        groups = n_heads // n_kv_heads
        if isinstance(mask, BlockMask):
            # Block-sparse: whole masked blocks (other documents of a packed row) are skipped, and GQA
            # reads the shared kv heads in the kernel. No dropout here: the model only builds a block
            # mask when attention dropout is off.
            flex = flex_kernels(q.device.type)[1]
            kw = {"score_mod": None if self.softcap is None else _tanh_cap(self.softcap), "block_mask": mask,
                  "scale": self.scale, "enable_gqa": groups > 1}
            if self.sinks is None:
                y = flex(q, k, v, **kw)  # (B, H, T, D)
            else:  # the sinks' share of each softmax, from its log-sum-exp: y * sum e^s / (sum e^s + e^sink)
                y, aux = flex(q, k, v, **kw, return_aux=AuxRequest(lse=True))  # (B, H, T, D), lse (B, H, T)
                y = y * torch.sigmoid(aux.lse - self.sinks[:, None]).unsqueeze(-1).to(y.dtype)
        elif self.softcap is not None or self.sinks is not None:
            y = _written_attention(q, k, v, mask, causal, self.scale, self.softcap, self.sinks,
                                   dropout_p)  # (B, H, T, D)
        elif groups == 1 or mask is None:
            # Without a mask, SDPA's flash kernel handles GQA natively (enable_gqa): no K/V copies.
            y = F.scaled_dot_product_attention(
                q, k, v, attn_mask=mask, dropout_p=dropout_p, is_causal=causal, scale=self.scale, enable_gqa=groups > 1
            )  # (B, H, T, D)
        else:
            # With a mask, enable_gqa falls back to the math kernel, and repeating K/V would copy the
            # whole cache every step. Fold each kv head's query group into the query axis instead:
            # (B, Hkv, G*T, D) queries against the un-repeated (B, Hkv, S, D) keys.
            S = k.shape[2]
            qg = q.reshape(B, n_kv_heads, groups * T, D)  # (B, Hkv, G*T, D)
            mg = mask.unsqueeze(2).expand(-1, -1, groups, -1, -1).reshape(mask.shape[0], 1, groups * T, S)
            # Materialised: with a stride-0 query axis (one decode query) the CPU kernel runs ~40x slower.
            mg = mg.contiguous()  # (B|1, 1, G*T, S)
            y = F.scaled_dot_product_attention(qg, k, v, attn_mask=mg, dropout_p=dropout_p, scale=self.scale)
            y = y.reshape(B, n_heads, T, v.shape[-1])  # (B, H, T, Dv); CUDA kernels may return it strided
        return y

    def extend_kv(
        self, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | BlockMask | None, causal: bool, T: int
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | BlockMask | None, bool]:
        """Keys, values and mask as attention uses them: unchanged here. An adapter that adds keys
        (prefix tuning, `model/prefix.py`) is a subclass swapped in for this module, not a slot in it."""
        return k, v, mask, causal


class LatentAttention(Attention):
    """Multi-head latent attention (DeepSeek-AI 2024, "DeepSeek-V2", section 2.1; DeepSeek-V3): each token's keys and
    values come from one latent of kv_lora_rank values (normalised), expanded per head by kv_b_proj, beside one
    rotated key part (rope_dim values) that every head shares; queries come through their own low-rank latent
    (q_lora_rank) or one q_proj. A head's query and key are its unrotated dimensions, then the rotated ones.

    The KV cache holds the latent (as the "keys" of one kv head, kv_lora_rank wide) and the rotated key part (as its
    "values", rope_dim wide): 576 values a token for DeepSeek-V3, where its 128 heads' keys and values would take
    40960. Attending to it takes one of two forms, whichever costs fewer products (`_absorbs`): expanded, every
    head's keys and values made from the latents, as transformers' reference does (training, prefill); or absorbed
    (DeepSeek-V2's inference form, for decoding a few tokens over a long cache): kv_b_proj's key rows folded into the
    queries, which then attend to the latents themselves as one shared kv head, and its value rows applied to the
    output, so nothing the size of the cache is expanded per step."""

    def make_projections(self, cfg: ModelConfig) -> None:
        self.rope_dim, self.kv_rank, self.v_dim = cfg.rotary_dim, cfg.kv_lora_rank, cfg.v_head_dim
        self.nope_dim = self.head_dim - self.rope_dim
        # The latents' norms take 1e-6 whatever norm_eps says, as DeepSeek's reference and transformers build them
        norm = lambda n: RMSNorm(n, 1e-6, cfg.norm_unit_offset, cfg.norm_cast_after)  # noqa: E731
        if cfg.q_lora_rank is None:
            self.q_proj = nn.Linear(cfg.dim, self.n_heads * self.head_dim, bias=False)
        else:
            self.q_a_proj = nn.Linear(cfg.dim, cfg.q_lora_rank, bias=False)
            self.q_a_layernorm = norm(cfg.q_lora_rank)
            self.q_b_proj = nn.Linear(cfg.q_lora_rank, self.n_heads * self.head_dim, bias=False)
        self.kv_a_proj_with_mqa = nn.Linear(cfg.dim, self.kv_rank + self.rope_dim, bias=False)
        self.kv_a_layernorm = norm(self.kv_rank)
        self.kv_b_proj = nn.Linear(self.kv_rank, self.n_heads * (self.nope_dim + self.v_dim), bias=False)
        self.o_proj = nn.Linear(self.n_heads * self.v_dim, cfg.dim, bias=False)
        self.n_kv_heads = 1  # what the cache holds: one latent
        # DeepSeek's YaRN scales every dimension's scores, not only the rotated ones'; explicit for the absorbed form,
        # whose queries are not head_dim wide
        self.scale = self.head_dim ** -0.5 * yarn_score_multiplier(cfg)

    def forward(
        self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None,
        mask: torch.Tensor | BlockMask | None, causal: bool, cache: KVCache | None,
    ) -> torch.Tensor:
        if cache is None or not self._absorbs(x.shape[1], cache.max_len):
            return super().forward(x, rope, mask, causal, cache)
        B, T, C = x.shape
        q_pass, q_rot, latent, k_rot = self._latents(x, rope, cache)  # (B, T, H, D-R), (B, T, H, R), (B, 1, S, r|R)
        w = self.kv_b_proj.weight.view(-1, self.nope_dim + self.v_dim, self.kv_rank)  # (H, D-R + Dv, r)
        q_latent = torch.einsum("bthd,hdr->bhtr", q_pass, w[:, : self.nope_dim])  # (B, H, T, r)
        q = torch.cat((q_latent, q_rot.transpose(1, 2)), dim=-1)  # (B, H, T, r + R)
        y = self.attend(q, torch.cat((latent, k_rot), dim=-1), latent, mask, causal)  # (B, H, T, r)
        y = torch.einsum("bhtr,hvr->bthv", y, w[:, self.nope_dim:]).reshape(B, T, -1)  # (B, T, H*Dv)
        return self.resid_drop(self.o_proj(y))  # (B, T, C)

    def _absorbs(self, T: int, S: int) -> bool:
        """Whether the absorbed form takes fewer multiply-adds for T queries over S cached slots than the expanded
        one, and can: kv_b_proj a plain layer (not LoRA's, quantized or NF4), whose weight it reads directly."""
        if type(self.kv_b_proj) is not nn.Linear or type(self.kv_b_proj.weight) is not nn.Parameter:
            return False
        H, r, R, dn, dv = self.n_heads, self.kv_rank, self.rope_dim, self.nope_dim, self.v_dim
        expanded = S * r * H * (dn + dv) + T * S * H * (dn + R + dv)
        absorbed = T * H * dn * r + T * S * H * (2 * r + R) + T * H * r * dv
        return absorbed < expanded

    def _latents(
        self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None, cache: KVCache | None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """The queries' unrotated and rotated parts (B, T, H, D - R), (B, T, H, R), and every latent and rotated key
        part (B, 1, S, r), (B, 1, S, R): the cache's and these T tokens'."""
        B, T, C = x.shape
        q = self.q_proj(x) if hasattr(self, "q_proj") else self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x)))
        q_pass, q_rot = q.view(B, T, -1, self.head_dim).split([self.nope_dim, self.rope_dim], dim=-1)  # (B, T, H, .)
        latent, k_rot = self.kv_a_proj_with_mqa(x).split([self.kv_rank, self.rope_dim], dim=-1)  # (B, T, r), (B, T, R)
        latent, k_rot = self.kv_a_layernorm(latent), k_rot.unsqueeze(2)  # (B, T, r), (B, T, 1, R)
        if rope is not None:
            q_rot, k_rot = _rotated_queries(q_rot, rope), apply_rope(k_rot, *rope[:2]).to(k_rot.dtype)
        if rope is not None and len(rope) == 3:  # Mistral 4: the temperature scales the whole query, as the rotated part
            q_pass = q_pass * rope[2].to(q_pass.dtype)
        latent, k_rot = latent.unsqueeze(1), k_rot.transpose(1, 2)  # (B, 1, T, r), (B, 1, T, R)
        if cache is not None:
            latent, k_rot = cache.update(self.layer_idx, latent, k_rot)  # (B, 1, S, r), (B, 1, S, R)
        return q_pass, q_rot, latent, k_rot

    def project(
        self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None, cache: KVCache | None,
        shared_kv: dict[int, tuple[torch.Tensor, torch.Tensor]] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, None]:
        """The expanded form: every head's keys and values made from the latents (no output gates)."""
        B = x.shape[0]
        q_pass, q_rot, latent, k_rot = self._latents(x, rope, cache)
        q = torch.cat((q_pass, q_rot), dim=-1).transpose(1, 2)  # (B, H, T, D)
        S = latent.shape[2]
        kv = self.kv_b_proj(latent.squeeze(1)).view(B, S, -1, self.nope_dim + self.v_dim).transpose(1, 2)
        k_pass, v = kv.split([self.nope_dim, self.v_dim], dim=-1)  # (B, H, S, D - R), (B, H, S, Dv)
        k = torch.cat((k_pass, k_rot.expand(-1, k_pass.shape[1], -1, -1)), dim=-1)  # (B, H, S, D)
        return q, k, v, None


def softcap(x: torch.Tensor, cap: float) -> torch.Tensor:
    """Gemma 2's smooth cap at +-cap: cap * tanh(x / cap), divided first as its reference does (for its 16-bit
    rounding). Attention scores (`attn_softcap`) and logits (`logit_softcap`) alike."""
    return torch.tanh(x / cap) * cap


def _tanh_cap(cap: float) -> Callable[..., torch.Tensor]:
    """FlexAttention's score_mod of capped scores (`softcap`), on the scaled score, before the mask."""

    def capped(score: torch.Tensor, b: torch.Tensor, h: torch.Tensor, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        return softcap(score, cap)

    return capped


def _written_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, causal: bool, scale: float | None,
    cap: float | None, sinks: torch.Tensor | None, dropout_p: float,
) -> torch.Tensor:
    """Attention with scores capped at +-cap (Gemma 2) or a sink logit per head (GPT-OSS), written out: SDPA takes
    no hook on the scores, and FlexAttention (which does) has no CPU backward. It keeps the T x S scores, as the
    references do.

    Gemma 2's order and dtypes: the scaled scores in the inputs' dtype, divided by the cap, tanh, times the cap, the
    mask, a float32 softmax rounded back, so 16-bit outputs equal its own. Each kv head's query group is folded into
    the query axis (as SDPA's masked path above), so keys and values are never repeated per head.
    q: (B, H, T, D); k, v: (B, Hkv, S, D); mask: (B|1, 1, T, S) bool, or None (causal: the T queries are the last
    T positions of the S keys; else every key is seen); sinks: (H,). Returns (B, H, T, D)."""
    B, H, T, D = q.shape
    n_kv, S = k.shape[1], k.shape[2]
    groups = H // n_kv
    if mask is None and causal:
        mask = torch.ones(T, S, dtype=torch.bool, device=q.device).tril(S - T)[None, None]  # (1, 1, T, S)
    scores = q.reshape(B, n_kv, groups * T, D) @ k.transpose(-1, -2) * (D**-0.5 if scale is None else scale)
    if cap is not None:
        scores = softcap(scores, cap)  # (B, Hkv, G*T, S)
    if mask is not None:  # an additive -inf, which (unlike masked_fill) keeps no mask for backward
        bias = torch.zeros(mask.shape, dtype=scores.dtype, device=q.device).masked_fill_(~mask, float("-inf"))
        scores = (scores.view(B, n_kv, groups, T, S) + bias.unsqueeze(2)).view(B, n_kv, groups * T, S)
    if sinks is not None:  # one more column per query: its head's sink, dropped after the softmax
        sink = sinks.to(scores.dtype).view(1, n_kv, groups, 1, 1).expand(B, -1, -1, T, -1).reshape(B, n_kv, -1, 1)
        probs = F.softmax(torch.cat([scores, sink], dim=-1), dim=-1, dtype=torch.float32)[..., :S].to(q.dtype)
    else:
        probs = F.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)  # (B, Hkv, G*T, S)
    if dropout_p:
        probs = F.dropout(probs, dropout_p)
    return (probs @ v).view(B, H, T, v.shape[-1])


def causal_mask_mod(b: torch.Tensor, h: torch.Tensor, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """The mask_mod of one causal sequence per row."""
    return k <= q
