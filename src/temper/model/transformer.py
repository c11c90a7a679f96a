"""The one decoder-only Transformer: tokens (B, T) -> logits (B, T, V), and its KV cache.

Every variant (GPT-2, GPT-3, Llama, Mistral, Qwen2, Qwen3, Gemma, Gemma 2, Gemma 3, Phi-3, OLMo 2 and 3, Mixtral,
Qwen3-MoE, GPT-OSS) comes from `ModelConfig` fields: learned positions or RoPE, LayerNorm or RMSNorm, GELU, SwiGLU
(clamped, GPT-OSS's) or GeGLU MLP or a mixture of gated experts, multi-head or grouped-query attention, query/key
norms (per head or over all heads), a sliding window (on every layer, or local layers between global ones with their
own RoPE base), norms on the sublayers' inputs, outputs or both, biases, tying, embedding scaling, capped attention
scores and logits, attention sinks.
Attention goes through `F.scaled_dot_product_attention` (a GPU picks flash attention when no mask is
needed), or, for masked forwards without a KV cache (packed documents, padding, a window shorter than
the sequence), through FlexAttention's block-sparse kernel: see `Transformer.attn_impl`. Capped scores (Gemma 2)
and sinks (GPT-OSS), which SDPA cannot take, go through FlexAttention where it is chosen, else through
`_written_attention`.

It does not compute the loss, sample tokens, load checkpoints or wrap itself for parallelism:
training computes the loss from the logits, `temper.infer` samples, `convert.py` reads and writes
Hugging Face files, and `temper.train.parallel` wraps `self.layers` from outside.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention.flex_attention import AuxRequest, BlockMask, create_block_mask, flex_attention

from temper.model.config import ModelConfig
from temper.model.rope import rope_tables


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


def _flex_kernels(device_type: str) -> tuple[Callable[..., BlockMask], Callable[..., torch.Tensor]]:
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
    """

    def __init__(
        self, n_layers: int, batch: int, n_kv_heads: int, max_len: int, head_dim: int,
        *, device: torch.device | str | None = None, dtype: torch.dtype | None = None,
    ) -> None:
        shape = (n_layers, batch, n_kv_heads, max_len, head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)  # (L, B, Hkv, S_max, D)
        self.v = torch.zeros(shape, device=device, dtype=dtype)  # (L, B, Hkv, S_max, D)
        self.lengths = torch.zeros(batch, dtype=torch.long, device=device)  # (B,) slots filled per row
        self.max_len = max_len

    @property
    def length(self) -> int:
        """The longest row's length, read on the host (a device sync: for tests and checks, not per step)."""
        return int(self.lengths.max())

    def positions(self, T: int) -> torch.Tensor:
        """(B, T) the slots, and positions, of T new tokens per row: right after each row's filled slots."""
        pos = self.lengths[:, None] + torch.arange(T, device=self.lengths.device)  # (B, T)
        return pos.clamp(max=self.max_len - 1)

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write the new (B, Hkv, T, D) keys and values at each row's next T slots; return every slot's
        (B, Hkv, S_max, D), for attention behind the mask of `Transformer._attention_mask`."""
        B, H, T, D = k.shape
        slots = self.positions(T)[:, None, :, None].expand(B, H, T, D)  # (B, Hkv, T, D)
        self.k[layer].scatter_(2, slots, k.to(self.k.dtype))
        self.v[layer].scatter_(2, slots, v.to(self.v.dtype))
        return self.k[layer], self.v[layer]

    def advance(self, n: int) -> None:
        """Mark `n` more slots of every row as filled (the model calls this once per forward, after every layer)."""
        self.lengths.add_(n).clamp_(max=self.max_len)


class RMSNorm(nn.Module):
    """RMSNorm (Zhang & Sennrich 2019): x / rms(x) * weight, computed in float32 as Llama does.

    unit_offset: scale by (1 + weight) and cast after the product, as Gemma does; the weight then
    starts at 0, and checkpoints store it in that form. cast_after: scale by the weight, then cast (OLMo 2).
    """

    def __init__(self, dim: int, eps: float, unit_offset: bool = False, cast_after: bool = False) -> None:
        super().__init__()
        self.eps = eps
        self.unit_offset, self.cast_after = unit_offset, cast_after
        self.weight = nn.Parameter(torch.zeros(dim) if unit_offset else torch.ones(dim))

    def reset_parameters(self) -> None:
        nn.init.zeros_(self.weight) if self.unit_offset else nn.init.ones_(self.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Upcast so that bf16 activations do not lose the mean of squares; Llama casts back before
        # the weight, Gemma and OLMo 2 after: each matches its Hugging Face reference bit for bit, in bf16 too.
        y = F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps)
        if self.unit_offset:
            return (y * (1.0 + self.weight.float())).to(x.dtype)
        if self.cast_after:
            return (self.weight * y).to(x.dtype)
        return self.weight * y.to(x.dtype)


def make_norm(cfg: ModelConfig) -> nn.Module:
    if cfg.norm == "rmsnorm":
        return RMSNorm(cfg.dim, cfg.norm_eps, cfg.norm_unit_offset, cfg.norm_cast_after)
    return nn.LayerNorm(cfg.dim, eps=cfg.norm_eps, bias=cfg.bias)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate pairs (x_i, x_{i+D/2}) by position-dependent angles (Su et al. 2021).

    The half-split pairing (not interleaved pairs) is the Hugging Face layout, so Llama weights
    load without permuting q and k. x: (B, T, H, D); cos, sin: (B or 1, T, 1, D/2).
    """
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

    def __init__(self, cfg: ModelConfig, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx  # which slice of the KV cache this layer owns
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.kv_heads, cfg.head_dim
        # Separate q/k/v projections (not one fused matrix) so tensor parallelism can shard each by
        # heads and LoRA can target each by name, as in the Hugging Face Llama layout.
        qkv_bias = cfg.bias or cfg.qkv_bias
        self.q_proj = nn.Linear(cfg.dim, self.n_heads * self.head_dim, bias=qkv_bias)
        self.k_proj = nn.Linear(cfg.dim, self.n_kv_heads * self.head_dim, bias=qkv_bias)
        self.v_proj = nn.Linear(cfg.dim, self.n_kv_heads * self.head_dim, bias=qkv_bias)
        self.o_proj = nn.Linear(self.n_heads * self.head_dim, cfg.dim, bias=cfg.bias)
        # Qwen3, Gemma 3: one RMSNorm of width head_dim shared by every query head, one by every key head; OLMo 2:
        # one over all the query heads' values at once, one over the keys'.
        self.qk_norm_whole = cfg.qk_norm_whole
        q_width, k_width = ((self.n_heads * self.head_dim, self.n_kv_heads * self.head_dim) if cfg.qk_norm_whole
                            else (self.head_dim, self.head_dim))
        self.q_norm = RMSNorm(q_width, cfg.norm_eps, cfg.norm_unit_offset, cfg.norm_cast_after) if cfg.qk_norm else None
        self.k_norm = RMSNorm(k_width, cfg.norm_eps, cfg.norm_unit_offset, cfg.norm_cast_after) if cfg.qk_norm else None
        self.dropout = cfg.dropout
        self.resid_drop = nn.Dropout(cfg.dropout)
        self.scale = None if cfg.attn_scale_dim is None else cfg.attn_scale_dim ** -0.5  # None: the kernels' 1/sqrt(D)
        self.softcap = cfg.attn_softcap
        # GPT-OSS: one learned logit per query head, a softmax column with no value behind it.
        self.sinks = nn.Parameter(torch.zeros(cfg.n_heads)) if cfg.attn_sinks else None

    def forward(
        self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None,
        mask: torch.Tensor | BlockMask | None, causal: bool, cache: KVCache | None,
    ) -> torch.Tensor:
        B, T, C = x.shape
        # Head counts come from the projections' outputs (-1), not the config: a tensor-parallel shard
        # of the projections holds a slice of the heads and runs this same code on it.
        q, k = self.q_proj(x), self.k_proj(x)  # (B, T, H*D), (B, T, Hkv*D)
        if self.q_norm is not None and self.qk_norm_whole:  # all heads' values normalised together
            q, k = self.q_norm(q), self.k_norm(k)
        q = q.view(B, T, -1, self.head_dim)  # (B, T, H, D)
        k = k.view(B, T, -1, self.head_dim)  # (B, T, Hkv, D)
        v = self.v_proj(x).view(B, T, -1, self.head_dim)  # (B, T, Hkv, D)
        n_heads, n_kv_heads = q.shape[2], k.shape[2]
        if self.q_norm is not None and not self.qk_norm_whole:  # each head's vector normalised before it is rotated
            q, k = self.q_norm(q), self.k_norm(k)
        if rope is not None:
            q, k = apply_rope(q, *rope).to(q.dtype), apply_rope(k, *rope).to(k.dtype)  # float32 tables: rounded after
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, H|Hkv, T, D)
        if cache is not None:
            k, v = cache.update(self.layer_idx, k, v)  # (B, Hkv, S, D), S = cached + T
        k, v, mask, causal = self.extend_kv(k, v, mask, causal, T)
        dropout_p = self.dropout if self.training else 0.0
        groups = n_heads // n_kv_heads
        if isinstance(mask, BlockMask):
            # Block-sparse: whole masked blocks (other documents of a packed row) are skipped, and GQA
            # reads the shared kv heads in the kernel. No dropout here: the model only builds a block
            # mask when attention dropout is off.
            flex = _flex_kernels(q.device.type)[1]
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
            qg = q.reshape(B, n_kv_heads, groups * T, self.head_dim)  # (B, Hkv, G*T, D)
            mg = mask.unsqueeze(2).expand(-1, -1, groups, -1, -1).reshape(mask.shape[0], 1, groups * T, S)
            # Materialised: with a stride-0 query axis (one decode query) the CPU kernel runs ~40x slower.
            mg = mg.contiguous()  # (B|1, 1, G*T, S)
            y = F.scaled_dot_product_attention(qg, k, v, attn_mask=mg, dropout_p=dropout_p, scale=self.scale)
            y = y.reshape(B, n_heads, T, self.head_dim)  # (B, H, T, D); CUDA kernels may return it strided
        y = y.transpose(1, 2).reshape(B, T, -1)  # (B, T, H*D)
        return self.resid_drop(self.o_proj(y))  # (B, T, C)

    def extend_kv(
        self, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | BlockMask | None, causal: bool, T: int
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | BlockMask | None, bool]:
        """Keys, values and mask as attention uses them: unchanged here. An adapter that adds keys
        (prefix tuning, `model/prefix.py`) is a subclass swapped in for this module, not a slot in it."""
        return k, v, mask, causal


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
    return (probs @ v).view(B, H, T, D)


class MLP(nn.Module):
    """GELU MLP (GPT-2, tanh approximation), or gated: SwiGLU or GeGLU (Shazeer 2020, "GLU Variants
    Improve Transformer"): act(gate(x)) * up(x)."""

    def __init__(self, cfg: ModelConfig, hidden: int | None = None) -> None:
        super().__init__()
        hidden = hidden or cfg.hidden_dim
        self.gated = cfg.mlp in ("swiglu", "geglu")
        self.silu = cfg.mlp == "swiglu"
        self.limit, self.alpha = cfg.swiglu_limit, cfg.swiglu_alpha
        if self.gated:
            self.gate_proj = nn.Linear(cfg.dim, hidden, bias=cfg.bias)
        self.up_proj = nn.Linear(cfg.dim, hidden, bias=cfg.bias)
        self.down_proj = nn.Linear(hidden, cfg.dim, bias=cfg.bias)
        self.resid_drop = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.limit is not None:  # GPT-OSS's clamped SwiGLU
            gate, up = self.gate_proj(x).clamp(max=self.limit), self.up_proj(x).clamp(-self.limit, self.limit)
            h = gate * torch.sigmoid(gate * self.alpha) * (up + 1)  # (B, T, F)
        elif self.gated:
            gate = self.gate_proj(x)  # (B, T, F)
            h = (F.silu(gate) if self.silu else F.gelu(gate, approximate="tanh")) * self.up_proj(x)  # (B, T, F)
        else:
            h = F.gelu(self.up_proj(x), approximate="tanh")  # (B, T, F)
        return self.resid_drop(self.down_proj(h))  # (B, T, C)


class MoE(nn.Module):
    """A sparse mixture of gated MLPs (Shazeer et al. 2017; Mixtral, Jiang et al. 2024; Qwen3-MoE): a linear
    router scores the experts for each token, and the token's output is the sum of its top-k experts' outputs,
    weighted by their softmax probabilities (renormalised over the k with `renormalize_experts`).

    The experts are plain `MLP`s in a ModuleList, not one stacked weight: LoRA, QLoRA's NF4 and tensor names
    reach each expert's projections by module swap, as they reach a dense MLP's. Tokens are grouped by expert
    and each expert runs once on its rows (one host sync per layer for the group sizes; a grouped GEMM kernel
    would be faster on a GPU with many experts). With gradients every expert runs, on zero rows if none chose it,
    so each parameter gets a gradient in every step and DDP / FSDP2 reduce the same tensors on every rank; without,
    only the chosen ones (decoding one token runs k of them)."""

    routing: list[tuple[torch.Tensor, torch.Tensor]] | None = None
    """When a list, each forward with gradients appends its (router probabilities (N, E), chosen experts (N, k)):
    training's load-balancing loss (`train.losses.RouterBalance`) reads them; None records nothing."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.k, self.renormalize, self.float32_weights = (cfg.experts_per_token, cfg.renormalize_experts,
                                                          cfg.expert_weights_float32)
        self.router = nn.Linear(cfg.dim, cfg.n_experts, bias=cfg.bias)  # GPT-OSS's router has a bias, as its layers
        self.experts = nn.ModuleList(MLP(cfg, cfg.expert_hidden_dim) for _ in range(cfg.n_experts))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        x = x.reshape(B * T, C)  # (N, C)
        # The softmax in float32, as Mixtral's and Qwen3-MoE's references route; the weights stay float32 for Mixtral.
        probs = F.softmax(self.router(x), dim=-1, dtype=torch.float32)  # (N, E)
        weights, chosen = probs.topk(self.k, dim=-1)  # (N, k) each
        if self.routing is not None and torch.is_grad_enabled():
            self.routing.append((probs, chosen))
        if self.renormalize:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        weights = (weights if self.float32_weights else weights.to(x.dtype)).flatten()  # (N*k,)
        order = chosen.flatten().argsort(stable=True)  # (N*k,) assignments grouped by expert, tokens in order
        counts = torch.bincount(chosen.flatten(), minlength=len(self.experts)).tolist()
        rows, scale = (order // self.k).split(counts), weights[order, None].split(counts)  # per expert: tokens, weights
        # float32 weights: the weighted outputs are summed in float32 and rounded once, as Mixtral's reference does.
        out = torch.zeros_like(x, dtype=weights.dtype if self.float32_weights else x.dtype)  # (N, C)
        for expert, r, w in zip(self.experts, rows, scale, strict=True):
            if not len(r) and not torch.is_grad_enabled():  # nothing to compute, and no gradient to give
                continue
            y = expert(x[r]) * w  # (n_e, C)
            # index_put_ keeps only the rows for backward (index_add_ would keep y as well): each expert's rows are
            # distinct tokens, so the sum is the same, in the same order, as the references' index_add_.
            out.index_put_((r,), y.to(out.dtype), accumulate=True)
        return out.view(B, T, C).to(x.dtype)  # (B, T, C)


class Block(nn.Module):
    """Pre-norm residual block: x + attn(norm(x)), then x + mlp(norm(x)) (GPT-2, Radford et al. 2019); with
    `sandwich_norm` each sublayer's output is normalised too before it is added (Gemma 2 and 3), and without
    `pre_norm` only the output is: x + norm(attn(x)) (OLMo 2)."""

    def __init__(self, cfg: ModelConfig, layer_idx: int) -> None:
        super().__init__()
        self.window = cfg.window_of(layer_idx)  # which mask (and, with rope_local_theta, which RoPE table) it takes
        self.local_rope = self.window is not None and cfg.rope_local_theta is not None
        self.attn_norm = make_norm(cfg) if cfg.pre_norm else None
        self.attn = Attention(cfg, layer_idx)
        self.attn_out_norm = make_norm(cfg) if cfg.sandwich_norm else None
        self.mlp_norm = make_norm(cfg) if cfg.pre_norm else None
        self.mlp = MoE(cfg) if cfg.n_experts else MLP(cfg)
        self.mlp_out_norm = make_norm(cfg) if cfg.sandwich_norm else None

    def forward(
        self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None = None,
        mask: torch.Tensor | BlockMask | None = None, causal: bool = True, cache: KVCache | None = None,
    ) -> torch.Tensor:
        h = self.attn(x if self.attn_norm is None else self.attn_norm(x), rope, mask, causal, cache)  # (B, T, C)
        x = x + (h if self.attn_out_norm is None else self.attn_out_norm(h))
        h = self.mlp(x if self.mlp_norm is None else self.mlp_norm(x))  # (B, T, C)
        return x + (h if self.mlp_out_norm is None else self.mlp_out_norm(h))  # (B, T, C)


def _causal(b: torch.Tensor, h: torch.Tensor, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """The mask_mod of one causal sequence per row."""
    return k <= q


class Transformer(nn.Module):
    """Decoder-only transformer built from a `ModelConfig`; `forward` returns logits, never a loss.

    Parameter names: tok_emb, pos_emb (learned positions only), layers.{i}.{attn_norm, attn.{q,k,v,o}_proj,
    attn.{q,k}_norm (qk_norm only), attn_out_norm and mlp_out_norm (sandwich_norm only), mlp_norm,
    mlp.{gate,up,down}_proj, or with n_experts mlp.router and mlp.experts.{j}.{gate,up,down}_proj}, norm,
    head (untied only; a tied head reuses tok_emb.weight, so state dicts never hold the same tensor twice).
    """

    attn_impl: str = "auto"
    """The kernel of masked forwards without a KV cache (packed documents, padding, a window shorter than
    the sequence): "flex" (FlexAttention's block mask, compiled on CUDA), "sdpa" (a dense (B, 1, T, T)
    mask) or "auto" (flex on CUDA, sdpa elsewhere: a CPU has no fused flex kernel, and torch no CPU flex
    backward). Set on the instance (`model.attn_impl = "sdpa"`; training recipes: `--train.attention`): a
    choice of kernel, not of the model, so no ModelConfig field (those are exported, and compared on resume).
    With `attn_softcap` or `attn_sinks`, "flex" serves unmasked forwards too (a causal block mask), and "sdpa"
    means the written-out `_written_attention`."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.pos_emb = nn.Embedding(cfg.max_seq_len, cfg.dim) if cfg.pos == "learned" else None
        self.drop = nn.Dropout(cfg.dropout)
        self.layers = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layers))
        self.norm = make_norm(cfg)
        self.head = None if cfg.tie_embeddings else nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        if cfg.pos == "rope":  # tables, not weights: non-persistent, rebuilt by init_buffers()
            for name in ("rope", "rope_local") if cfg.rope_local_theta is not None else ("rope",):
                self.register_buffer(f"{name}_cos", torch.empty(cfg.max_seq_len, cfg.head_dim // 2), persistent=False)
                self.register_buffer(f"{name}_sin", torch.empty(cfg.max_seq_len, cfg.head_dim // 2), persistent=False)
        self.init_weights()

    # ---- initialisation -------------------------------------------------------------------------

    def init_buffers(self, device: torch.device | str | None = None) -> None:
        """(Re)compute the RoPE cos/sin tables in float32, e.g. after building on the meta device; with
        rope_local_theta, also the windowed layers' (their own base, unscaled, as Gemma 3's)."""
        if self.cfg.pos != "rope":
            return
        device = self.rope_cos.device if device is None else device
        tables = {"rope": self.cfg}
        if self.cfg.rope_local_theta is not None:
            tables["rope_local"] = replace(self.cfg, rope_theta=self.cfg.rope_local_theta, rope_scaling=None)
        for name, cfg in tables.items():
            cos, sin = rope_tables(cfg, self.cfg.max_seq_len, device)  # (S, D/2) each
            setattr(self, f"{name}_cos", cos)
            setattr(self, f"{name}_sin", sin)

    @torch.no_grad()
    def init_weights(self) -> None:
        """GPT-2 init: N(0, init_std) weights, zero biases, residual outputs scaled by 1/sqrt(2*n_layers).

        The scaling keeps the residual stream's variance independent of depth (Radford et al. 2019).
        Safe to call after `to_empty()` when the model was built on the meta device.
        """
        std = self.cfg.init_std
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, mean=0.0, std=std)
                if getattr(m, "bias", None) is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, (nn.LayerNorm, RMSNorm)):
                m.reset_parameters()
            elif isinstance(m, Attention) and m.sinks is not None:
                nn.init.zeros_(m.sinks)  # no pull towards the sink at first
        for m in self.modules():
            out = m.o_proj if isinstance(m, Attention) else m.down_proj if isinstance(m, MLP) else None
            if out is not None:
                nn.init.normal_(out.weight, mean=0.0, std=std / math.sqrt(2 * self.cfg.n_layers))
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
            if positions is not None or segments is not None:
                raise ValueError("with a KV cache, positions and the mask come from its per-row lengths: pass neither")
            if T > cache.max_len:
                raise ValueError(f"KV cache holds {cache.max_len} tokens per row; {T} do not fit")
            positions = cache.positions(T)  # (B, T): each row's next slots
        elif positions is None and T > self.cfg.max_seq_len:
            raise ValueError(f"sequence of {T} tokens exceeds max_seq_len={self.cfg.max_seq_len}")
        first = self.tok_emb is not None  # the first pipeline stage, or the whole model
        x = self.tok_emb(tokens) if first else tokens  # (B, T, C)
        if first and self.cfg.scale_embeddings:  # Gemma: the factor rounded to the weights' dtype, as its reference does
            x = x * torch.tensor(self.cfg.dim**0.5, dtype=x.dtype)
        ropes: dict[bool, tuple[torch.Tensor, torch.Tensor] | None] = {False: None}  # by Block.local_rope
        if self.pos_emb is not None:
            pe = self.pos_emb.weight[:T] if positions is None else self.pos_emb(positions)
            x = x + pe  # (B, T, C)
        elif self.cfg.pos == "rope":
            for local in {layer.local_rope for layer in self.layers}:
                cos, sin = (self.rope_local_cos, self.rope_local_sin) if local else (self.rope_cos, self.rope_sin)
                # (T, D/2), or (B, T, D/2) at given positions
                cos, sin = (cos[:T], sin[:T]) if positions is None else (cos[positions], sin[positions])
                dtype = torch.float32 if self.cfg.rope_float32 else x.dtype
                ropes[local] = (cos.unsqueeze(-2).to(dtype), sin.unsqueeze(-2).to(dtype))  # (B|1, T, 1, D/2)
        if first:
            x = self.drop(x)
        # One mask per window among the layers (one in all but mixed local/global models), shared by its layers.
        masks = {window: self._attention_mask(segments, B, T, tokens.device, window,
                                              positions if cache is not None else None,
                                              cache.max_len if cache is not None else 0)
                 for window in {layer.window for layer in self.layers}}
        for layer in self.layers:
            x = layer(x, ropes[layer.local_rope], *masks[layer.window], cache)  # (B, T, C)
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

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """The output layer on final hidden states (..., C) -> (..., V): the tied embedding, or the head as a module
        call (so an adapter swapped in for it runs), then `logit_softcap`. The one place logits are made, for
        `forward` and for losses and rollouts that take `hidden_only` states (`train.losses`' chunked loss fuses
        the same steps)."""
        logits = F.linear(hidden, self.tok_emb.weight) if self.head is None else self.head(hidden)
        return logits if self.cfg.logit_softcap is None else softcap(logits, self.cfg.logit_softcap)

    def _attention_mask(
        self, segments: Segments | None, B: int, T: int, device: torch.device, window: int | None = None,
        cache_positions: torch.Tensor | None = None, cache_len: int = 0,
    ) -> tuple[torch.Tensor | BlockMask | None, bool]:
        """(mask, is_causal). Without segments, avoid a mask so SDPA can pick flash attention; where a mask
        is needed (segments, a window shorter than T), a FlexAttention block mask when `_use_flex` says so
        (one per forward, shared by every layer), else SDPA's dense mask.

        With a cache (cache_positions: (B, T), the new tokens' slots), the keys are all cache_len slots:
        the query at position p of a row sees its slots 0..p (slot j holds position j; slots past p are
        later tokens, or stale ones of a row that restarted), within the sliding `window` (a layer's).
        """
        if cache_positions is not None:
            k_pos = torch.arange(cache_len, device=device)  # (S_max,)
            q_pos = cache_positions[:, :, None]  # (B, T, 1)
            mask = k_pos <= q_pos  # (B, T, S_max)
            if window is not None:  # the last `window` keys, the query's own included (Mistral)
                mask &= k_pos > q_pos - window
            return mask[:, None], False  # (B, 1, T, S_max)
        written = self.cfg.attn_softcap or self.cfg.attn_sinks  # scores SDPA cannot compute: flex, where it is chosen
        if segments is None and (window is None or T <= window) and not (written and self._use_flex(device)):
            return None, True  # plain causal prefill / training (capped scores, sinks on CUDA: a causal block mask)
        if segments is not None and segments.ids.shape != (B, T):
            raise ValueError(f"segments.ids must be (batch, tokens) = {(B, T)}, got {tuple(segments.ids.shape)}")
        visible = self._mask_mod(segments, window)
        rows = B if segments is not None else 1  # a plain causal (windowed) mask is the same for every row
        if self._use_flex(device):
            make_block_mask = _flex_kernels(device.type)[0]
            return make_block_mask(visible, rows, None, T, T, device=device), False
        idx = torch.arange(T, device=device)  # (T,)
        b = torch.arange(rows, device=device)[:, None, None]  # (B|1, 1, 1)
        return visible(b, None, idx[None, :, None], idx[None, None, :])[:, None], False  # (B|1, 1, T, T)

    def _mask_mod(self, segments: Segments | None, window: int | None) -> MaskMod:
        """The one rule of a forward without a cache, as a FlexAttention mask_mod (broadcastable indices):
        `segments.mask_mod`, or plain causality, within the sliding `window`."""
        base = segments.mask_mod if segments is not None else _causal
        if window is None:
            return base

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
        p = (self.norm if self.norm is not None else self.tok_emb).weight
        c = self.cfg
        kv_heads = self.layers[0].attn.n_kv_heads
        return KVCache(
            c.n_layers, batch, kv_heads, max_len, c.head_dim, device=device or p.device, dtype=dtype or p.dtype
        )

    def num_params(self, exclude_embedding: bool = False) -> int:
        """Parameters, each shared tensor counted once.

        exclude_embedding drops the pure lookup tables: learned positions, and the token embedding
        unless it is tied (then it is also the output head, which does a matrix product).
        """
        n = sum(p.numel() for p in self.parameters())
        if self.tok_emb is not None and not isinstance(self.tok_emb.weight, nn.Parameter):
            n += self.tok_emb.weight.numel()  # a frozen table training holds in host memory, as a buffer
        if exclude_embedding:
            if self.pos_emb is not None:
                n -= self.pos_emb.weight.numel()
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
        the attention width n_heads * head_dim (d_model, except where head_size sets it apart).
        head=False: without the language-model head (V x d), for callers that never run it (a reward head on
        the hidden states, a retriever pooling them): for a small model that head is most of the matmul
        weights, and counting it would inflate MFU several times over.
        """
        c = self.cfg
        lm_head = 0 if head else 6 * c.vocab_size * c.dim
        return float(6 * self.matmul_params() - lm_head + 12 * c.n_layers * c.n_heads * c.head_dim * seq_len)
