"""The linear layers of hybrid models, which mix positions through a fixed-size state instead of attending to every
earlier key: Gated DeltaNet (Yang, Kautz and Hatamizadeh 2024, "Gated Delta Networks"), the linear attention of
Qwen3-Next and Qwen3.5, Mamba 2's state space layers (`Mamba2`, Granite 4.0-H's: the same rule without its
correction), Mamba's (`Mamba`, FalconMamba's: a decay per channel and state value, `selective_scan`), and LFM2's gated
short convolutions (`ShortConv`, whose state is its last few inputs).

Each head keeps a state S (Dk x Dv). Token t decays it by exp(g_t) (0 < exp(g_t) <= 1), then writes its value by the
delta rule, S <- S + beta_t k_t^T (v_t - k_t S), correcting what S already recalls for k_t, and reads q_t S. Queries,
keys and values first pass a short causal depthwise convolution and SiLU; queries and keys are L2-normalised; the
output is normalised per head and gated by SiLU(z) before out_proj.

Training and prefill run the rule a chunk of tokens at a time (the WY/UT form of Yang et al. 2024, "Parallelizing
Linear Transformers with the Delta Rule"): inside a chunk it is a few matrix products and one triangular solve, and
only the state crosses from chunk to chunk. Decoding one token is the rule itself. The state (and the convolution's
last inputs) is what `KVCache` holds for these layers: its size does not grow with the sequence.

Packed documents reset the state where a document starts, and padding leaves it as it was (`Runs`), so a packed row
computes what its documents would alone. There is no causal mask to build and no score matrix over the sequence.

Written in plain PyTorch: `flash-linear-attention`'s Triton kernels are GPU-only, and transformers' torch fallback is a
test dependency here. It does not decide which layers are linear (`ModelConfig.is_linear`) nor hold the cache
(`attention.KVCache`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from temper.model.config import ModelConfig
from temper.model.layers import RMSNorm, rms_normalized

if TYPE_CHECKING:
    from temper.model.attention import KVCache


@dataclass
class Runs:
    """Where a linear layer's state restarts and which tokens leave it unchanged, from the forward's `Segments`.

    doc: (B, T) int64: a token's document id, padding taking its last real token's (so a row's padding continues its
        run, and a run ends where the id changes). real: (B, T) bool, False for padding.
    """

    doc: torch.Tensor
    real: torch.Tensor

    @classmethod
    def from_ids(cls, ids: torch.Tensor) -> Runs:
        """From `Segments.ids` (B, T): -1 marks padding, equal ids next to each other form one document."""
        real = ids >= 0
        T = ids.shape[1]
        at = torch.where(real, torch.arange(T, device=ids.device), -1).cummax(dim=1).values  # last real token, or -1
        return cls(torch.where(at >= 0, ids.gather(1, at.clamp(min=0)), -1), real)


class GatedRMSNorm(nn.Module):
    """RMSNorm of each head's output, scaled by its weight and gated by SiLU(z), in float32 as Qwen3-Next does."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def reset_parameters(self) -> None:
        nn.init.ones_(self.weight)

    def forward(self, x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        y = self.weight * rms_normalized(x, self.eps).to(x.dtype)
        return (y * F.silu(z.float())).to(x.dtype)


class GroupGatedRMSNorm(nn.Module):
    """Mamba 2's output norm: gated by SiLU(z) first, then RMS-normalised over each of `groups` equal slices of the
    channels and scaled by its weight, in float32 (its reference's order; Qwen3-Next's `GatedRMSNorm` gates after)."""

    def __init__(self, dim: int, groups: int, eps: float) -> None:
        super().__init__()
        self.groups, self.eps = groups, eps
        self.weight = nn.Parameter(torch.ones(dim))

    def reset_parameters(self) -> None:
        nn.init.ones_(self.weight)

    def forward(self, x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """x (..., dim) float32, z (..., dim) -> float32."""
        y = x.float() * F.silu(z.float())
        return self.weight * rms_normalized(y.unflatten(-1, (self.groups, -1)), self.eps).flatten(-2)


class GatedDeltaNet(nn.Module):
    """One linear attention layer; x (B, T, C) -> (B, T, C), called as `Attention` is (it takes no RoPE).

    Parameter names follow Qwen3.5's checkpoints: in_proj_qkv (queries, keys, values), in_proj_z (the output gate),
    in_proj_b (beta, the write strength), in_proj_a (the decay's input), conv1d, A_log and dt_bias (the decay's rate,
    as Mamba 2's), norm, out_proj."""

    def __init__(self, cfg: ModelConfig, slot: int) -> None:
        super().__init__()
        self.slot = slot  # which of the cache's linear states this layer owns
        (self.n_k, self.n_v), (self.d_k, self.d_v) = cfg.linear_heads, cfg.linear_sizes
        key, value = self.n_k * self.d_k, self.n_v * self.d_v
        self.conv_taps = cfg.linear_conv_size
        self.in_proj_qkv = nn.Linear(cfg.dim, 2 * key + value, bias=False)
        self.in_proj_z = nn.Linear(cfg.dim, value, bias=False)
        self.in_proj_b = nn.Linear(cfg.dim, self.n_v, bias=False)
        self.in_proj_a = nn.Linear(cfg.dim, self.n_v, bias=False)
        self.conv1d = nn.Conv1d(2 * key + value, 2 * key + value, self.conv_taps, groups=2 * key + value, bias=False)
        self.A_log = nn.Parameter(torch.empty(self.n_v))
        self.dt_bias = nn.Parameter(torch.empty(self.n_v))
        self.norm = GatedRMSNorm(self.d_v, cfg.norm_eps)
        self.out_proj = nn.Linear(value, cfg.dim, bias=False)
        self.resid_drop = nn.Dropout(cfg.dropout)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Decay rates A spread over [1, 16] (Mamba 2's range), dt_bias 1 and torch's default convolution; the linear
        layers and the norm are initialised with the model's."""
        with torch.no_grad():
            if not self.A_log.is_meta:
                self.A_log.copy_(torch.empty_like(self.A_log).uniform_(1, 16).log())
            nn.init.ones_(self.dt_bias)
            self.conv1d.reset_parameters()

    @property
    def state_shapes(self) -> tuple[tuple[int, int, int], tuple[int, int]]:
        """((Hv, Dk, Dv) of the state, (K - 1, C) of the convolution's inputs): what `KVCache` holds for this layer."""
        return (self.n_v, self.d_k, self.d_v), (self.conv_taps - 1, self.conv1d.weight.shape[0])

    def forward(
        self, x: torch.Tensor, rope: None, runs: Runs | None, causal: bool, cache: KVCache | None,
    ) -> torch.Tensor:
        B, T, _ = x.shape
        if runs is not None:  # padding enters nothing: its inputs are zero and its updates leave the state as it is
            x = x * runs.real[..., None].to(x.dtype)
        state, conv = cache.linear_state(self.slot) if cache is not None else (None, None)
        qkv, conv_tail = causal_conv(self.in_proj_qkv(x), self.conv1d.weight, conv, runs)  # (B, T, 2*Hk*Dk + Hv*Dv)
        q, k, v = qkv.split([self.n_k * self.d_k, self.n_k * self.d_k, self.n_v * self.d_v], dim=-1)
        group = self.n_v // self.n_k  # each query/key head serves `group` consecutive value heads
        q, k = (_l2norm(t.float().view(B, T, self.n_k, self.d_k)).repeat_interleave(group, 2) for t in (q, k))
        v = v.float().view(B, T, self.n_v, self.d_v)  # (B, T, Hv, Dv)
        beta = torch.sigmoid(self.in_proj_b(x)).float()  # (B, T, Hv)
        g = -self.A_log.float().exp() * F.softplus(self.in_proj_a(x).float() + self.dt_bias.float())  # (B, T, Hv) <= 0
        if runs is not None:
            beta, g = beta * runs.real[..., None], g * runs.real[..., None]
        q = q * self.d_k ** -0.5
        y, state = gated_delta_rule(*(t.transpose(1, 2) for t in (q, k, v, g, beta)), state,
                                    None if runs is None else runs.doc)  # (B, Hv, T, Dv)
        if cache is not None:
            cache.set_linear_state(self.slot, state, conv_tail)
        y = self.norm(y.transpose(1, 2).to(x.dtype), self.in_proj_z(x).view(B, T, self.n_v, self.d_v))
        return self.resid_drop(self.out_proj(y.reshape(B, T, -1)))  # (B, T, C)


class Mamba2(nn.Module):
    """One Mamba 2 layer (Dao and Gu 2024, "Transformers are SSMs"; Granite 4.0-H's); x (B, T, C) -> (B, T, C), called
    as `Attention` is.

    in_proj makes the gate z, the heads' inputs x, the groups' B and C, and each head's step dt. x, B and C pass a
    causal depthwise convolution (with a bias) and SiLU. Each head keeps a state S (N x P): token t decays it by
    exp(dt_t A) and writes dt_t B_t^T x_t; it reads y_t = C_t S + D x_t. That is the gated delta rule without its
    correction (`gated_delta_rule(delta=False)`): one chunked kernel serves both. The output is gated by SiLU(z), then
    RMS-normalised over each group's heads (Mamba 2's norm after the gate) before out_proj. Parameter names follow its
    checkpoints: in_proj, conv1d, dt_bias, A_log, D, norm, out_proj."""

    def __init__(self, cfg: ModelConfig, slot: int) -> None:
        super().__init__()
        self.slot = slot  # which of the cache's linear states this layer owns
        (self.n_groups, self.n_heads), (self.d_state, self.d_head) = cfg.linear_heads, cfg.linear_sizes
        self.inner, self.bc = inner, bc = self.n_heads * self.d_head, self.n_groups * self.d_state  # x's, B's widths
        self.conv_taps = cfg.linear_conv_size
        self.in_proj = nn.Linear(cfg.dim, 2 * inner + 2 * bc + self.n_heads, bias=False)
        self.conv1d = nn.Conv1d(inner + 2 * bc, inner + 2 * bc, self.conv_taps, groups=inner + 2 * bc)
        self.dt_bias = nn.Parameter(torch.empty(self.n_heads))
        self.A_log = nn.Parameter(torch.empty(self.n_heads))
        self.D = nn.Parameter(torch.empty(self.n_heads))
        self.norm = GroupGatedRMSNorm(inner, self.n_groups, cfg.norm_eps)
        self.out_proj = nn.Linear(inner, cfg.dim, bias=False)
        self.resid_drop = nn.Dropout(cfg.dropout)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """A = 1..H (Mamba 2's, as transformers initialises it), dt_bias and D 1 and torch's default convolution; the
        linear layers and the norm are initialised with the model's."""
        with torch.no_grad():
            if not self.A_log.is_meta:
                self.A_log.copy_(torch.arange(1, self.n_heads + 1, dtype=torch.float32).log())
            nn.init.ones_(self.dt_bias)
            nn.init.ones_(self.D)
            self.conv1d.reset_parameters()

    @property
    def state_shapes(self) -> tuple[tuple[int, int, int], tuple[int, int]]:
        """((H, N, P) of the state, (K - 1, C) of the convolution's inputs): what `KVCache` holds for this layer."""
        return (self.n_heads, self.d_state, self.d_head), (self.conv_taps - 1, self.conv1d.weight.shape[0])

    def forward(
        self, x: torch.Tensor, rope: None, runs: Runs | None, causal: bool, cache: KVCache | None,
    ) -> torch.Tensor:
        B, T, _ = x.shape
        if runs is not None:  # padding enters nothing: its inputs are zero and its updates leave the state as it is
            x = x * runs.real[..., None].to(x.dtype)
        inner, bc = self.inner, self.bc
        z, xbc, dt = self.in_proj(x).split([inner, inner + 2 * bc, self.n_heads], dim=-1)
        state, conv = cache.linear_state(self.slot) if cache is not None else (None, None)
        xbc, conv_tail = causal_conv(xbc, self.conv1d.weight, conv, runs, bias=self.conv1d.bias)  # (B, T, inner + 2bc)
        xs, b, c = xbc.split([inner, bc, bc], dim=-1)
        b, c = (t.float().view(B, T, self.n_groups, self.d_state) for t in (b, c))  # a group's serve its heads
        v = xs.float().view(B, T, self.n_heads, self.d_head)  # (B, T, H, P)
        # the step in the activations' dtype, then float32, as Mamba 2's reference computes it
        dt = F.softplus(dt + self.dt_bias.to(dt.dtype)).float()  # (B, T, H) > 0
        g = -self.A_log.float().exp() * dt  # (B, T, H) <= 0
        if runs is not None:
            dt, g = dt * runs.real[..., None], g * runs.real[..., None]
        y, state = gated_delta_rule(*(t.transpose(1, 2) for t in (c, b, v, g, dt)), state,
                                    None if runs is None else runs.doc, delta=False)  # (B, H, T, P)
        if cache is not None:
            cache.set_linear_state(self.slot, state, conv_tail)
        y = y.transpose(1, 2) + self.D.float()[:, None] * v  # (B, T, H, P)
        y = self.norm(y.reshape(B, T, inner), z)
        return self.resid_drop(self.out_proj(y.to(x.dtype)))  # (B, T, C)


class Mamba(nn.Module):
    """One Mamba layer (Gu and Dao 2023, "Mamba: Linear-Time Sequence Modeling with Selective State Spaces"; Mamba's
    and FalconMamba's checkpoints); x (B, T, C) -> (B, T, C), called as `Attention` is.

    in_proj makes each channel's input x and gate z; x passes a causal depthwise convolution (with a bias) and SiLU.
    x_proj makes from it each token's step input (linear_dt_rank wide), B and C (the state size N); dt_proj lifts the
    step to every channel and softplus makes it positive. Channel d keeps N state values, each decaying at its own
    rate A[d, n]: h_t[d] = exp(dt_t[d] A[d]) h_{t-1}[d] + dt_t[d] x_t[d] B_t; it reads y_t[d] = C_t . h_t[d] + D[d]
    x_t[d], gated by SiLU(z) before out_proj. FalconMamba first RMS-normalises the step input, B and C without weights
    (`linear_bcdt_eps`), Jamba with weights (`linear_bcdt_weights`: dt_layernorm, b_layernorm, c_layernorm). In Mamba 2's terms each channel is a head of width 1 (linear_value_heads of
    linear_value_size 1) whose decay is a vector, not a scalar: the chunked rule cannot take it (`selective_scan`).
    Parameter names follow its checkpoints: in_proj, conv1d, x_proj, dt_proj, A_log, D, out_proj."""

    def __init__(self, cfg: ModelConfig, slot: int) -> None:
        super().__init__()
        self.slot = slot  # which of the cache's linear states this layer owns
        self.inner, self.d_state = cfg.linear_heads[1], cfg.linear_sizes[0]
        self.dt_rank, self.bcdt_eps = cfg.dt_rank, cfg.linear_bcdt_eps
        self.conv_taps = cfg.linear_conv_size
        self.in_proj = nn.Linear(cfg.dim, 2 * self.inner, bias=False)
        self.conv1d = nn.Conv1d(self.inner, self.inner, self.conv_taps, groups=self.inner)
        self.x_proj = nn.Linear(self.inner, self.dt_rank + 2 * self.d_state, bias=False)
        self.dt_proj = nn.Linear(self.dt_rank, self.inner)
        self.A_log = nn.Parameter(torch.empty(self.inner, self.d_state))
        self.D = nn.Parameter(torch.empty(self.inner))
        self.out_proj = nn.Linear(self.inner, cfg.dim, bias=False)
        self.dt_layernorm = self.b_layernorm = self.c_layernorm = None
        if cfg.linear_bcdt_weights:  # Jamba's
            self.dt_layernorm, self.b_layernorm, self.c_layernorm = (
                RMSNorm(n, cfg.linear_bcdt_eps) for n in (self.dt_rank, self.d_state, self.d_state))
        self.resid_drop = nn.Dropout(cfg.dropout)
        self.reset_parameters()
        self.reset_steps()

    def reset_parameters(self) -> None:
        """A[d] = 1..N (S4D's real initialisation, Mamba's), D 1 and torch's default convolution; the linear layers are
        initialised with the model's, then dt_proj by `reset_steps`."""
        with torch.no_grad():
            if not self.A_log.is_meta:
                self.A_log.copy_(torch.arange(1, self.d_state + 1, dtype=torch.float32).log().expand_as(self.A_log))
            nn.init.ones_(self.D)
            self.conv1d.reset_parameters()

    def reset_steps(self) -> None:
        """Mamba's initial steps: dt_proj's weight uniform in +-rank^-0.5, its bias softplus^-1 of steps spread
        log-uniformly over [0.001, 0.1] (floor 1e-4), so each channel starts with its own time scale."""
        with torch.no_grad():
            nn.init.uniform_(self.dt_proj.weight, -self.dt_rank ** -0.5, self.dt_rank ** -0.5)
            if not self.dt_proj.bias.is_meta:
                dt = (torch.rand(self.inner) * (math.log(0.1) - math.log(1e-3)) + math.log(1e-3)).exp().clamp(min=1e-4)
                self.dt_proj.bias.copy_(dt + torch.log(-torch.expm1(-dt)))  # softplus^-1(dt)

    @property
    def state_shapes(self) -> tuple[tuple[int, int, int], tuple[int, int]]:
        """((D, N, 1) of the state, (K - 1, D) of the convolution's inputs): what `KVCache` holds for this layer."""
        return (self.inner, self.d_state, 1), (self.conv_taps - 1, self.inner)

    def forward(
        self, x: torch.Tensor, rope: None, runs: Runs | None, causal: bool, cache: KVCache | None,
    ) -> torch.Tensor:
        if runs is not None:  # padding enters nothing: its inputs are zero and its steps leave the state as it is
            x = x * runs.real[..., None].to(x.dtype)
        xs, z = self.in_proj(x).chunk(2, dim=-1)  # (B, T, D) each
        state, conv = cache.linear_state(self.slot) if cache is not None else (None, None)
        xs, conv_tail = causal_conv(xs, self.conv1d.weight, conv, runs, bias=self.conv1d.bias)  # (B, T, D)
        step, b, c = self.x_proj(xs).split([self.dt_rank, self.d_state, self.d_state], dim=-1)
        if self.dt_layernorm is not None:  # Jamba's norms
            step, b, c = self.dt_layernorm(step), self.b_layernorm(b), self.c_layernorm(c)
        elif self.bcdt_eps is not None:  # FalconMamba's weightless ones
            step, b, c = (rms_normalized(t, self.bcdt_eps).to(t.dtype) for t in (step, b, c))
        # the step in the activations' dtype, then float32, as Mamba's reference computes it
        dt = F.softplus(self.dt_proj(step)).float()  # (B, T, D) > 0
        if runs is not None:
            dt = dt * runs.real[..., None]
        args = (xs.float(), dt, -self.A_log.float().exp(), b.float(), c.float(),
                None if state is None else state[..., 0], None if runs is None else runs.doc)
        y, state = checkpointed_scan(*args) if torch.is_grad_enabled() else selective_scan(*args)  # (B, T, D)
        if cache is not None:
            cache.set_linear_state(self.slot, state[..., None], conv_tail)
        y = (y + self.D.float() * xs) * F.silu(z)  # float32
        return self.resid_drop(self.out_proj(y.to(x.dtype)))  # (B, T, C)


class ShortConv(nn.Module):
    """One gated short convolution layer (LFM2, Liquid AI 2025); x (B, T, C) -> (B, T, C), called as `Attention` is.

    in_proj makes three gates per channel, b, c and x; the layer's output is out_proj(c * conv(b * x)), conv causal and
    depthwise over the token and the linear_conv_size - 1 before it (no activation). Its state is that convolution's
    last inputs, as Gated DeltaNet's convolution keeps (`KVCache.conv`); there is no recurrent state. Parameter names
    follow LFM2's checkpoints: in_proj, conv, out_proj."""

    def __init__(self, cfg: ModelConfig, slot: int) -> None:
        super().__init__()
        self.slot = slot  # which of the cache's convolution states this layer owns
        self.conv_taps = cfg.linear_conv_size
        self.in_proj = nn.Linear(cfg.dim, 3 * cfg.dim, bias=False)
        self.conv = nn.Conv1d(cfg.dim, cfg.dim, self.conv_taps, groups=cfg.dim, bias=False)
        self.out_proj = nn.Linear(cfg.dim, cfg.dim, bias=False)
        self.resid_drop = nn.Dropout(cfg.dropout)

    def reset_parameters(self) -> None:
        """torch's default convolution; the linear layers are initialised with the model's."""
        self.conv.reset_parameters()

    @property
    def state_shapes(self) -> tuple[None, tuple[int, int]]:
        """(no recurrent state, (K - 1, C) of the convolution's inputs): what `KVCache` holds for this layer."""
        return None, (self.conv_taps - 1, self.conv.weight.shape[0])

    def forward(
        self, x: torch.Tensor, rope: None, runs: Runs | None, causal: bool, cache: KVCache | None,
    ) -> torch.Tensor:
        if runs is not None:  # padding enters nothing
            x = x * runs.real[..., None].to(x.dtype)
        b, c, h = self.in_proj(x).chunk(3, dim=-1)  # (B, T, C) each
        conv = cache.linear_state(self.slot)[1] if cache is not None else None
        y, conv_tail = causal_conv(b * h, self.conv.weight, conv, runs, activation=False)  # (B, T, C)
        if cache is not None:
            cache.set_linear_state(self.slot, None, conv_tail)
        return self.resid_drop(self.out_proj(c * y))  # (B, T, C)


def _l2norm(x: torch.Tensor) -> torch.Tensor:
    """x / sqrt(sum x^2 + 1e-6) over the last dim: flash-linear-attention's form (and eps), which Qwen3.5 trained with."""
    return x * torch.rsqrt((x * x).sum(-1, keepdim=True) + 1e-6)


def causal_conv(
    x: torch.Tensor, weight: torch.Tensor, before: torch.Tensor | None, runs: Runs | None, activation: bool = True,
    bias: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """SiLU (activation=False: none, LFM2's) of the causal depthwise convolution of x (B, T, C) with weight (C, 1, K)
    and bias (C,) (None: none; Mamba 2's): each output is a channel's sum over its token and the K - 1 before it, within
    the token's document. before: (B, K - 1, C), the inputs a cache row holds from earlier forwards (None: zeros). Also
    returns the last K - 1 real inputs (B, K - 1, C), a cache's next `before`.

    Written as K shifted products rather than `F.conv1d` so that document boundaries mask taps, in float32 and rounded
    once, as conv1d's kernel accumulates."""
    B, T, C = x.shape
    K = weight.shape[-1]
    if before is None:
        before = x.new_zeros(B, K - 1, C)
    ext = torch.cat((before.to(x.dtype), x), dim=1)  # (B, K - 1 + T, C)
    w = weight.float().view(C, K)
    doc = None if runs is None else torch.cat((runs.doc[:, :1].expand(B, K - 1), runs.doc), dim=1)  # (B, K - 1 + T)
    out = x.new_zeros(B, T, C, dtype=torch.float32)
    if bias is not None:
        out += bias.float()
    for j in range(K):  # tap j reads the token K - 1 - j before
        tap = ext[:, j : j + T].float() * w[:, j]
        out += tap if doc is None else tap * (doc[:, j : j + T] == runs.doc)[..., None]
    count = torch.full((B,), T, device=x.device) if runs is None else runs.real.sum(dim=1)  # real tokens, padding last
    # cache state, never differentiated: a gather with gradient would keep ext for its backward
    tail = ext.detach().gather(1, (count[:, None] + torch.arange(K - 1, device=x.device))[..., None].expand(-1, -1, C))
    out = out.to(x.dtype)
    return F.silu(out) if activation else out, tail


def gated_delta_rule(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor, beta: torch.Tensor,
    state: torch.Tensor | None = None, doc: torch.Tensor | None = None, chunk: int = 64, delta: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The gated delta rule over a sequence, chunk by chunk: outputs (B, H, T, Dv) and the final state (B, H, Dk, Dv),
    in q's dtype (the layer's: float32). delta=False: the rule without its correction, S_t = exp(g_t) S_{t-1} +
    beta_t k_t^T v_t, Mamba 2's state space recurrence (its B as keys, C as queries, x as values, dt as beta): the same
    chunks without the triangular solves.

    q, k: (B, Hk, T, Dk) (Gated DeltaNet's: q scaled, both L2-normalised); v: (B, H, T, Dv); g (log decay, <= 0),
    beta: (B, H, T). With delta=False, Hk may divide H: each of Hk groups' queries and keys serves H / Hk consecutive
    heads (Mamba 2's groups of B and C), read as they are, never repeated per head; the delta rule takes one per head.
    state: the state before the first token (None: zeros). doc: (B, T) document ids (`Runs.doc`): the state restarts
    where the id changes, and `state` belongs to the first token's document.

    Inside a chunk of C tokens the recurrence S_t = exp(g_t) S_{t-1} (I - beta_t k_t^T k_t) + beta_t k_t^T v_t unrolls
    to S_t = decay(t) S_0 + sum_j k_j^T u_j decay(j, t), where the u_j (the corrected values) solve one unit
    lower-triangular C x C system; a token's output is its read of S_0 plus its causal attention to the chunk's u.
    Under autocast the matrix products take bf16 operands, as transformers' reference does under autocast (the
    solves stay float32): outputs 4e-3 from float64's, against 2e-3 for rounding float32's to bf16."""
    B, Hk, T, Dk = k.shape
    H, Dv = v.shape[1], v.shape[-1]
    r = H // Hk
    if r * Hk != H or (delta and r != 1):
        raise ValueError(f"{Hk} query/key heads cannot serve {H} value heads" + (" (the delta rule takes one per head)"
                                                                                 if delta else ""))
    # A group axis: (B, Hk, r, ...), queries and keys broadcast over their group's r heads
    q, k = q[:, :, None], k[:, :, None]  # (B, Hk, 1, T, Dk)
    v, g, beta = v.view(B, Hk, r, T, Dv), g.view(B, Hk, r, T), beta.view(B, Hk, r, T)
    state = q.new_zeros(B, Hk, r, Dk, Dv) if state is None else state.to(q.dtype).view(B, Hk, r, Dk, Dv)
    if T == 1 and doc is None:  # one decoding step: the rule itself
        state = state * g.exp()[..., None]  # (B, Hk, r, Dk, Dv)
        state = state + k.transpose(-1, -2) @ (((v - k @ state) if delta else v) * beta[..., None])
        return (q @ state).view(B, H, 1, Dv), state.view(B, H, Dk, Dv)
    C = min(chunk, T)
    pad = -T % C
    if pad:  # zero tokens that neither decay nor write, in the last token's document
        q, k, v = (F.pad(t, (0, 0, 0, pad)) for t in (q, k, v))
        g, beta = F.pad(g, (0, pad)), F.pad(beta, (0, pad))
        doc = None if doc is None else torch.cat((doc, doc[:, -1:].expand(B, pad)), dim=1)
    N = (T + pad) // C
    q, k, v = (t.reshape(*t.shape[:3], N, C, t.shape[-1]) for t in (q, k, v))  # (B, Hk, r or 1, N, C, D)
    g, beta = g.reshape(B, Hk, r, N, C), beta.reshape(B, Hk, r, N, C)
    cum = g.cumsum(-1)  # (B, Hk, r, N, C): log of the decay from the chunk's start through each token
    seen = torch.ones(C, C, dtype=torch.bool, device=q.device).tril()  # (C, C): j <= i
    carry = last = 1.0
    if doc is not None:
        doc = doc.reshape(B, 1, 1, N, C)
        seen = seen & (doc[..., :, None] == doc[..., None, :])  # (B, 1, 1, N, C, C): j <= i in i's document
        before = torch.cat((doc[..., :1, :1], doc[..., :-1, -1:]), dim=-2)  # (B, 1, 1, N, 1): the run a chunk enters in
        carry = (doc == before).float()  # (B, 1, 1, N, C): tokens whose document started before their chunk
        last = (doc == doc[..., -1:]).float()  # (B, 1, 1, N, C): tokens in the chunk's last token's document
    decay = (cum[..., :, None] - cum[..., None, :]).masked_fill(~seen, float("-inf")).exp()  # (B, Hk, r, N, C, C)
    reads = cum.exp() * carry  # (B, Hk, r, N, C): each query's decay from the state entering its chunk
    writes = (cum[..., -1:] - cum).exp() * last  # (B, Hk, r, N, C): each write's decay to the chunk's end
    keep = (cum[..., -1].exp() * (carry[..., -1] if doc is not None else 1.0))[..., None, None]  # (B, Hk, r, N, 1, 1)
    attn = (q @ k.transpose(-1, -2)) * decay  # (B, Hk, r, N, C, C): one q k^T per group
    if delta:
        kb = k * beta[..., None]
        system = (kb @ k.transpose(-1, -2)) * decay  # its strictly lower part; the solve takes a unit diagonal
        u = torch.linalg.solve_triangular(system, v * beta[..., None], upper=False, unitriangular=True)  # (.., C, Dv)
        w = torch.linalg.solve_triangular(system, kb * reads[..., None], upper=False, unitriangular=True)
        # The decays scale the queries and keys, as the delta rule's reference orders the products
        q, k, reads, writes = q * reads[..., None], k * writes[..., None], None, None
    else:  # the values as written, nothing to correct
        u, w = v * beta[..., None], None
    out = []
    # Unbound once rather than indexed per chunk: an index's backward makes a whole-size gradient for each chunk
    # (quadratic in the chunks), unbind's one stack of them.
    per_chunk = [t.unbind(3) if t is not None else (None,) * N for t in (q, k, u, attn, keep, w, reads, writes)]
    for q_n, k_n, u_n, attn_n, keep_n, w_n, reads_n, writes_n in zip(*per_chunk):
        if delta:
            u_n = u_n - w_n @ state  # (B, Hk, 1, C, Dv): values less what the state already recalls
            out.append(q_n @ state + attn_n @ u_n)
            state = state * keep_n + k_n.transpose(-1, -2) @ u_n
        else:  # Mamba 2: the decays scale each head's read of the state and its written values, not C and B, which
            # stay their group's (its reference, too, scales C S after the product); einsum takes a group's heads as one
            # wider product, where `@` would copy B and C to every head
            out.append(reads_n[..., None] * torch.einsum("bgcn,bgrnp->bgrcp", q_n[:, :, 0], state) + attn_n @ u_n)
            state = state * keep_n + torch.einsum("bgcn,bgrcp->bgrnp", k_n[:, :, 0], writes_n[..., None] * u_n)
    return torch.stack(out, dim=3).reshape(B, H, N * C, Dv)[:, :, :T], state.view(B, H, Dk, Dv)


SCAN_SEGMENT = 1024
"""Tokens per row of each recomputed stretch of a Mamba layer's scan (`checkpointed_scan`)."""


def checkpointed_scan(
    x: torch.Tensor, dt: torch.Tensor, A: torch.Tensor, b: torch.Tensor, c: torch.Tensor,
    state: torch.Tensor | None = None, doc: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """`selective_scan` for training: stretches of SCAN_SEGMENT tokens, each recomputed in the backward, the state
    carried from one to the next.

    The scan's states are N floats per channel and token, which autograd would keep several times over; its inputs are
    D + N per token, and it is cheap beside the layer's products, so only they are kept. A stretch's recompute holds
    its states while its backward runs (about 17 B per channel, state value and token): a whole 4k-token row would
    hold 9 GiB for a FalconMamba-7B layer, a stretch of 1024 a quarter of it."""
    # Split once rather than sliced per stretch: a slice's backward makes a whole-size gradient for each stretch
    parts = [t.split(SCAN_SEGMENT, dim=1) for t in (x, dt, b, c)]
    docs = [None] * len(parts[0]) if doc is None else doc.split(SCAN_SEGMENT, dim=1)
    out = []
    for i, (x_i, dt_i, b_i, c_i) in enumerate(zip(*parts)):
        if i and doc is not None and state is not None:  # `state` belongs to the stretch's first token's document
            state = state * (docs[i][:, 0] == docs[i - 1][:, -1]).to(state.dtype)[:, None, None]
        y, state = checkpoint(selective_scan, x_i, dt_i, A, b_i, c_i, state, docs[i], use_reentrant=False)
        out.append(y)
    return torch.cat(out, dim=1), state


def selective_scan(
    x: torch.Tensor, dt: torch.Tensor, A: torch.Tensor, b: torch.Tensor, c: torch.Tensor,
    state: torch.Tensor | None = None, doc: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mamba's selective scan, h_t = exp(dt_t A) h_{t-1} + dt_t x_t B_t and y_t = h_t C_t per channel: outputs
    (B, T, D) and the final state (B, D, N), float32.

    x, dt: (B, T, D) (dt >= 0; 0 leaves the state as it was); A: (D, N), < 0; b, c: (B, T, N). state: the state before
    the first token (None: zeros). doc: (B, T) document ids (`Runs.doc`): the state restarts where the id changes, and
    `state` belongs to the first token's document.

    A decay per channel and state value leaves no small matrix products to chunk (Mamba 2's scalar decay does:
    `gated_delta_rule`), and the parallel form's decays from every token to every later one would be N times the
    attention matrix. So the recurrence runs in two levels of about sqrt(T) steps each: every chunk of L tokens scans
    from zero, all chunks at once (L steps); the states entering the chunks follow from the chunks' ends (T / L
    steps); each token then adds its read of the state entering its chunk, decayed by exp(A * its steps so far). Every
    decay is a product of factors <= 1, so nothing overflows; T Python steps, transformers' path, become 3 sqrt(T)."""
    Bsz, T, D = x.shape
    state = x.new_zeros(Bsz, D, A.shape[1]) if state is None else state.to(x.dtype)
    if T == 1 and doc is None:  # one decoding step: the recurrence itself
        state = (dt[:, 0, :, None] * A).exp() * state + (dt * x)[:, 0, :, None] * b[:, 0, None, :]
        return torch.einsum("bdn,bn->bd", state, c[:, 0])[:, None], state
    L = max(1, math.isqrt(T))
    pad = -T % L
    if pad:  # zero steps: they neither decay nor write
        x, dt, b, c = (F.pad(t, (0, 0, 0, pad)) for t in (x, dt, b, c))
        doc = None if doc is None else torch.cat((doc, doc[:, -1:].expand(Bsz, pad)), dim=1)
    K = (T + pad) // L
    x, dt = x.view(Bsz, K, L, D), dt.view(Bsz, K, L, D)
    b, c = b.view(Bsz, K, L, -1), c.view(Bsz, K, L, -1)  # (B, K, L, N)
    # Where a document starts its first token keeps nothing from before it, nor do the tokens after it keep the state
    # entering their chunk: -inf added to those decays' logs (a factor of 0 would keep each decay twice for backward)
    gone = carried = x.new_zeros(Bsz, K, L)
    if doc is not None:
        starts = torch.cat((torch.zeros_like(doc[:, :1], dtype=torch.bool), doc[:, 1:] != doc[:, :-1]), dim=1)
        gone = gone.masked_fill(starts.view(Bsz, K, L), float("-inf"))
        carried = gone.cumsum(2)  # (B, K, L)
    steps = dt.cumsum(2)  # (B, K, L, D): each token's steps since its chunk began
    # Each step's decays and writes (B, K, D, N) are made inside the loops, never all T at once: a prefill's
    # transient memory is then sqrt(T) states, not T. The inputs are unbound once rather than indexed per step: an
    # index's backward makes a whole-size gradient for each step.
    c_steps = c.unbind(2)  # L of (B, K, N)
    h = x.new_zeros(Bsz, K, D, A.shape[1])  # (B, K, D, N): each chunk's state, from zero
    out = []
    for dt_j, write_j, b_j, c_j, gone_j in zip(dt.unbind(2), (dt * x).unbind(2), b.unbind(2), c_steps, gone.unbind(2)):
        h = (dt_j[..., None] * A + gone_j[..., None, None]).exp() * h + write_j[..., None] * b_j[:, :, None, :]
        out.append(torch.einsum("bkdn,bkn->bkd", h, c_j))
    entering = []
    # the state entering each chunk, then the last one's end
    for end_k, carried_k, h_k in zip(steps[:, :, -1].unbind(1), carried[:, :, -1].unbind(1), h.unbind(1)):
        entering.append(state)
        state = (end_k[..., None] * A + carried_k[:, None, None]).exp() * state + h_k
    entering = torch.stack(entering, dim=1)  # (B, K, D, N)
    for j, (steps_j, carried_j, c_j) in enumerate(zip(steps.unbind(2), carried.unbind(2), c_steps)):
        # each token's read of the state entering its chunk, decayed by its steps since
        reads = (steps_j[..., None] * A + carried_j[..., None, None]).exp()  # (B, K, D, N)
        out[j] = out[j] + torch.einsum("bkdn,bkn->bkd", reads * entering, c_j)
    return torch.stack(out, dim=2).reshape(Bsz, K * L, D)[:, :T], state


LINEAR_LAYERS = {"gated_deltanet": GatedDeltaNet, "short_conv": ShortConv, "mamba2": Mamba2, "mamba": Mamba}
"""The module of each kind of linear layer (`ModelConfig.linear_layer`, one of `config.LINEAR_LAYER_KINDS`)."""
