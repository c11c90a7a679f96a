"""The layers that act on each position alone: norms, the MLP and the mixture of experts.

They do not mix positions (attention does, `model/attention.py`) nor stack themselves into blocks (`transformer.py`).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from temper.model.config import ModelConfig


def rms_normalized(x: torch.Tensor, eps: float) -> torch.Tensor:
    """x / rms(x) over its last dimension, in float32 (as every reference computes it, so that 16-bit activations do
    not lose the mean of squares): the one computation behind RMSNorm and the weightless norms (Gemma 4's values and
    router input)."""
    return F.rms_norm(x.float(), (x.shape[-1],), eps=eps)


class RMSNorm(nn.Module):
    """RMSNorm (Zhang & Sennrich 2019): x / rms(x) * weight, computed in float32 as Llama does.

    unit_offset: scale by (1 + weight) and cast after the product, as Gemma does; the weight then
    starts at 0, and checkpoints store it in that form. cast_after: scale by the weight, then cast (OLMo 2).
    weightless: no weight at all, x / rms(x) (nanochat).
    """

    def __init__(self, dim: int, eps: float, unit_offset: bool = False, cast_after: bool = False,
                 weightless: bool = False) -> None:
        super().__init__()
        self.eps = eps
        self.unit_offset, self.cast_after = unit_offset, cast_after
        self.weight = None if weightless else nn.Parameter(torch.zeros(dim) if unit_offset else torch.ones(dim))

    def reset_parameters(self) -> None:
        if self.weight is not None:
            nn.init.zeros_(self.weight) if self.unit_offset else nn.init.ones_(self.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Upcast so that bf16 activations do not lose the mean of squares; Llama casts back before
        # the weight, Gemma and OLMo 2 after: each matches its Hugging Face reference bit for bit, in bf16 too.
        y = rms_normalized(x, self.eps)
        if self.weight is None:
            return y.to(x.dtype)
        if self.unit_offset:
            return (y * (1.0 + self.weight.float())).to(x.dtype)
        if self.cast_after:
            return (self.weight * y).to(x.dtype)
        return self.weight * y.to(x.dtype)


class LayerNorm1P(nn.LayerNorm):
    """LayerNorm scaling by (1 + weight), its weight starting at 0 (Nemotron-4's LayerNorm1P: weight decay then pulls
    the scale towards 1, not 0); checkpoints store the weight in that form."""

    def reset_parameters(self) -> None:
        super().reset_parameters()
        nn.init.zeros_(self.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x, self.normalized_shape, self.weight + 1.0, self.bias, self.eps)


def make_norm(cfg: ModelConfig) -> nn.Module:
    if cfg.norm == "rmsnorm":
        return RMSNorm(cfg.dim, cfg.norm_eps, cfg.norm_unit_offset, cfg.norm_cast_after, cfg.norm_weightless)
    bias = cfg.bias if cfg.norm_bias is None else cfg.norm_bias
    kind = LayerNorm1P if cfg.norm_unit_offset else nn.LayerNorm
    return kind(cfg.dim, eps=cfg.norm_eps, elementwise_affine=not cfg.norm_weightless, bias=bias)


def _xielu(x: torch.Tensor, a_p: torch.Tensor, a_n: torch.Tensor, beta: torch.Tensor, eps: torch.Tensor
           ) -> torch.Tensor:
    """torch.where(x > 0, a_p * x * x + beta * x, (expm1(min(x, eps)) - x) * a_n + beta * x), the reference's
    operations in its order and dtypes, in place where the dtype stays (the same kernels, so the same values), so that
    two hidden-sized temporaries live at a time."""
    above = (a_p * x).mul_(x).add_(beta * x)
    below = (torch.expm1(torch.minimum(x, eps)).sub_(x) * a_n).add_(beta * x)
    return torch.where(x > 0, above, below, out=below)


class _XIELUFunction(torch.autograd.Function):
    """xIELU of x given its factors a_p and a_n (already softplus'd), beta and eps, saving only x for backward.

    Written by hand for memory: autograd through the expression keeps x * a_p, expm1's output and its difference with x
    beside x (three more tensors as large as the MLP's hidden layer); this keeps x and recomputes them in backward. The
    forward runs the reference's operations in its order and dtypes, so the values are the reference's bit for bit."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, a_p: torch.Tensor, a_n: torch.Tensor, beta: torch.Tensor,  # noqa: ANN001
                eps: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(x, a_p, a_n, beta, eps)
        return _xielu(x, a_p, a_n, beta, eps)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple:  # noqa: ANN001
        # x in the forward's dtype (autocast: float32 factors promote it). The saved x stays referenced, so that the
        # backward holds the same with activation checkpointing (whose saved tensors go once unpacked) as without.
        saved, a_p, a_n, beta, eps = ctx.saved_tensors
        x = saved.to(torch.result_type(saved, a_p))
        positive = x > 0
        # In place where it can: beside x, the gradient and a mask, it holds two hidden-sized tensors at a time.
        d_p = d_n = None
        if ctx.needs_input_grad[1]:  # sum of grad * x^2 above zero
            d_p = (grad * x).mul_(x).masked_fill_(~positive, 0).sum().reshape(a_p.shape).to(a_p.dtype)
        low = torch.minimum(x, eps)
        if ctx.needs_input_grad[2]:  # sum of grad * (expm1(min(x, eps)) - x) below
            d_n = torch.expm1(low).sub_(x).mul_(grad).masked_fill_(positive, 0).sum().reshape(a_n.shape).to(a_n.dtype)
        # the slope: 2 a_p x + beta above zero; below, a_n (exp(x) - 1) + beta under eps, -a_n + beta between eps and
        # 0 (the min's flat part, as autograd's gives)
        slope = low.exp_().masked_fill_(x >= eps, 0).sub_(1).mul_(a_n).masked_fill_(positive, 0)
        slope.add_(x.clamp(min=0).mul_(2 * a_p)).add_(beta)
        return slope.mul_(grad).to(saved.dtype), d_p, d_n, None, None


class XIELU(nn.Module):
    """xIELU (Huang & Schlag 2024, "Deriving Activation Functions Using Integration"; Apertus' MLP): a_p x^2 + beta x
    above zero, a_n (expm1(min(x, eps)) - x) + beta x below, with a_p = softplus(alpha_p) and a_n = beta +
    softplus(alpha_n) two learned scalars per layer: a trainable quadratic above zero, an ELU-like integral below.
    beta and eps are buffers, as checkpoints store them (their values are read, not assumed)."""

    def __init__(self) -> None:
        super().__init__()
        self.alpha_p = nn.Parameter(torch.empty(1))
        self.alpha_n = nn.Parameter(torch.empty(1))
        self.register_buffer("beta", torch.empty(()))
        self.register_buffer("eps", torch.empty(()))
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """The reference's start: a_p = 0.8, a_n = 0.8 (alpha_n = softplus^-1(0.8 - beta)), beta 0.5, eps -1e-6."""
        if self.alpha_p.is_meta:
            return
        self.alpha_p.fill_(math.log(math.expm1(0.8)))
        self.alpha_n.fill_(math.log(math.expm1(0.8 - 0.5)))
        self.beta.fill_(0.5)
        self.eps.fill_(-1e-6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a_p = F.softplus(self.alpha_p)  # (1,)
        a_n = self.beta + F.softplus(self.alpha_n)  # (1,)
        if not torch.is_grad_enabled():  # (generation: no autograd node to build)
            return _xielu(x, a_p, a_n, self.beta, self.eps)
        return _XIELUFunction.apply(x, a_p, a_n, self.beta, self.eps)


class MLP(nn.Module):
    """GELU MLP (GPT-2's tanh approximation, or GPT-NeoX's exact GELU: `gelu_exact`), squared ReLU (Nemotron-H) or
    xIELU (Apertus: `XIELU`), or gated: SwiGLU or GeGLU (Shazeer 2020, "GLU Variants Improve Transformer"):
    act(gate(x)) * up(x)."""

    def __init__(self, cfg: ModelConfig, hidden: int | None = None) -> None:
        super().__init__()
        hidden = hidden or cfg.hidden_dim
        self.gated = cfg.mlp in ("swiglu", "geglu")
        self.silu = cfg.mlp == "swiglu"
        self.relu2 = cfg.mlp == "relu2"
        self.gelu = "none" if cfg.gelu_exact else "tanh"  # F.gelu's approximation
        self.act = XIELU() if cfg.mlp == "xielu" else None  # (learned scalars, so a module)
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
        elif self.relu2:
            h = F.relu(self.up_proj(x)).square()  # (B, T, F)
        elif self.act is not None:
            h = self.act(self.up_proj(x))  # (B, T, F)
        else:
            h = F.gelu(self.up_proj(x), approximate=self.gelu)  # (B, T, F)
        return self.resid_drop(self.down_proj(h))  # (B, T, C)


class MoE(nn.Module):
    """A sparse mixture of gated MLPs (Shazeer et al. 2017; Mixtral, Jiang et al. 2024; Qwen3-MoE): a router scores
    the experts for each token, and the token's output is the sum of its top-k experts' outputs, weighted by their
    scores (renormalised over the k with `renormalize_experts`), plus, with `shared_expert_ffn_dim`, a shared expert's
    output that every token computes (Qwen2-MoE: gated by a sigmoid; DeepSeek-V3: not).

    Scores are a softmax over the experts, or each expert's sigmoid (DeepSeek-V3, GLM-4.5: `router_scores`); DeepSeek-V3
    chooses by the scores plus a bias it moves to balance the load (`expert_choice_bias`), among the best groups of
    experts (`expert_groups`, as DeepSeek-V2 does with softmax scores), and scales the weights (`routed_scaling`).
    Gemma 4 keeps its dense MLP as the shared expert, normalises it and the routed experts apart (`experts_own_norms`)
    and scales the router's input and each expert's weight by learned factors (`router_input_norm`). Llama 4 weighs
    each chosen expert's input instead of its output (`expert_input_weights`).

    The experts are plain `MLP`s in a ModuleList, not one stacked weight: LoRA, QLoRA's NF4 and tensor names
    reach each expert's projections by module swap, as they reach a dense MLP's. Tokens are grouped by expert
    and each expert runs once on its rows (one host sync per layer for the group sizes; a grouped GEMM kernel
    would be faster on a GPU with many experts). With gradients every expert runs, on zero rows if none chose it,
    so each parameter gets a gradient in every step and DDP / FSDP2 reduce the same tensors on every rank; without,
    only the chosen ones (decoding one token runs k of them)."""

    routing: list[tuple[torch.Tensor, torch.Tensor]] | None = None
    """When a list, each forward with gradients appends its (router probabilities (N, E), chosen experts (N, k)):
    training's load-balancing loss (`train.losses.RouterBalance`) and the choice bias's update read them (sigmoid
    scores are normalised to sum to 1, as DeepSeek-V3's balance loss takes them); None records nothing."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.k, self.renormalize, self.float32_weights = (cfg.experts_per_token, cfg.renormalize_experts,
                                                          cfg.expert_weights_float32)
        self.sigmoid, self.scaling = cfg.router_scores == "sigmoid", cfg.routed_scaling
        self.weigh_inputs = cfg.expert_input_weights  # Llama 4: the weight scales what an expert runs on
        self.groups, self.groups_per_token, self.group_best = (cfg.expert_groups, cfg.expert_groups_per_token,
                                                               cfg.expert_group_best)
        self.router_float32 = self.sigmoid and not cfg.router_rounded or cfg.router_float32
        self.router = nn.Linear(cfg.dim, cfg.n_experts, bias=cfg.bias)  # GPT-OSS's router has a bias, as its layers
        self.choice_bias: torch.Tensor | None  # (E,)
        self.register_buffer("choice_bias", torch.zeros(cfg.n_experts) if cfg.expert_choice_bias else None)
        self.experts = nn.ModuleList(MLP(cfg, cfg.expert_hidden_dim) for _ in range(cfg.n_experts))
        # Qwen2-MoE: an MLP every token runs, its output weighed by a sigmoid gate, added to the routed experts'
        self.shared_expert = MLP(cfg, cfg.shared_expert_ffn_dim) if cfg.shared_expert_ffn_dim else None
        self.shared_expert_gate = nn.Linear(cfg.dim, 1, bias=False) if cfg.shared_expert_gate else None
        # Gemma 4: the shared expert (its dense MLP) and the routed experts normalised apart (`experts_own_norms`)
        own = lambda: make_norm(cfg) if cfg.experts_own_norms else None  # noqa: E731
        self.shared_out_norm, self.experts_norm, self.experts_out_norm = own(), own(), own()
        # Gemma 4's router: a learned scale of its normalised input, and one of each chosen expert's weight
        self.router_scale = nn.Parameter(torch.ones(cfg.dim)) if cfg.router_input_norm else None  # (C,)
        self.expert_scale = nn.Parameter(torch.ones(cfg.n_experts)) if cfg.router_input_norm else None  # (E,)
        self.norm_eps = cfg.norm_eps

    def _apply(self, fn, recurse=True):  # noqa: ANN001, ANN202 (nn.Module's signature)
        """Casting the model leaves the choice bias and a float32 router float32, as transformers keeps them
        (`_keep_in_fp32_modules_strict`): the published biases differ by less than a bf16 step of their size, so a
        rounded one would choose other experts."""
        kept = self._float32_slots()
        before = [getattr(owner, n) for owner, n in kept]
        super()._apply(fn, recurse)
        for (owner, name), old in zip(kept, before, strict=True):
            new = getattr(owner, name)
            if old is None or new is None or new.dtype == torch.float32:
                continue
            value = (torch.empty_like(new, dtype=torch.float32) if old.is_meta or new.is_meta
                     else old.detach().to(new.device))
            if isinstance(new, nn.Parameter):
                new.data = value
            else:
                setattr(owner, name, value)
        return self

    def _float32_slots(self) -> list[tuple[nn.Module, str]]:
        return [(self, "choice_bias")] + [(self.router, n) for n in ("weight", "bias") if self.router_float32]

    def float32_tensors(self) -> list[torch.Tensor]:
        """What stays float32 when the model is cast (`_apply`): the choice bias and a float32 router's weights."""
        return [t for owner, n in self._float32_slots() if (t := getattr(owner, n)) is not None]

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Each token's (N, C) scores over the experts (N, E) float32, its chosen experts (N, k) and their weights
        (N, k) float32."""
        if self.router_scale is not None:  # Gemma 4: a weightless RMSNorm (float32, rounded), scaled, times 1/sqrt(C)
            x = rms_normalized(x, self.norm_eps).to(x.dtype)
            x = x * self.router_scale * x.shape[-1] ** -0.5
        if self.router_float32:  # in the router's dtype, float32 however the model is cast (`_apply`; FSDP2's 16-bit
            # compute weights aside), as DeepSeek's and GLM-4.5's references score; a LoRA router adds its update
            with torch.autocast(x.device.type, enabled=False):
                logits = self.router(x.to(self.router.weight.dtype)).float()  # (N, E)
            scores = torch.sigmoid(logits) if self.sigmoid else F.softmax(logits, dim=-1)  # (N, E)
        else:  # the softmax (Llama 4: the sigmoid) in float32, as Mixtral's and Qwen3-MoE's references route
            logits = self.router(x)  # (N, E)
            scores = torch.sigmoid(logits.float()) if self.sigmoid else F.softmax(logits, dim=-1, dtype=torch.float32)
        choice = scores if self.choice_bias is None else scores + self.choice_bias  # (N, E)
        if self.groups > 1:  # keep the groups whose best experts score highest (DeepSeek-V2: the best; V3: two)
            grouped = choice.unflatten(-1, (self.groups, -1))  # (N, G, E / G)
            best = grouped.topk(self.group_best, dim=-1).values.sum(-1).topk(self.groups_per_token, dim=-1).indices
            kept = torch.zeros_like(grouped[..., 0], dtype=torch.bool).scatter_(-1, best, True)  # (N, G)
            choice = grouped.masked_fill(~kept[..., None], float("-inf")).flatten(-2)  # (N, E)
        chosen = choice.topk(self.k, dim=-1).indices  # (N, k)
        weights = scores.gather(-1, chosen)  # (N, k)
        if self.renormalize:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        if self.expert_scale is not None:  # Gemma 4
            weights = weights * self.expert_scale[chosen]
        return scores, chosen, weights * self.scaling if self.scaling != 1.0 else weights

    def forward(self, x: torch.Tensor, raw: torch.Tensor | None = None) -> torch.Tensor:
        """x: the block's normalised input (B, T, C); raw: its un-normalised input, which experts with their own norms
        (`experts_own_norms`, Gemma 4) route and normalise themselves, the shared expert taking x."""
        B, T, C = x.shape
        x = x.reshape(B * T, C)  # (N, C)
        shared_in = x
        if self.experts_norm is not None:
            raw = raw.reshape(B * T, C)  # (N, C)
            x = self.experts_norm(raw)
        scores, chosen, weights = self.route(x if self.router_scale is None else raw)  # (N, E), (N, k), (N, k)
        if self.routing is not None and torch.is_grad_enabled():
            self.routing.append((scores / scores.sum(-1, keepdim=True) if self.sigmoid else scores, chosen))
        weights = (weights if self.float32_weights else weights.to(x.dtype)).flatten()  # (N*k,)
        order = chosen.flatten().argsort(stable=True)  # (N*k,) assignments grouped by expert, tokens in order
        counts = torch.bincount(chosen.flatten(), minlength=len(self.experts)).tolist()
        rows, scale = (order // self.k).split(counts), weights[order, None].split(counts)  # per expert: tokens, weights
        # float32 weights: the weighted outputs are summed in float32 and rounded once, as Mixtral's reference does.
        out = torch.zeros_like(x, dtype=weights.dtype if self.float32_weights else x.dtype)  # (N, C)
        for expert, r, w in zip(self.experts, rows, scale, strict=True):
            if not len(r) and not torch.is_grad_enabled():  # nothing to compute, and no gradient to give
                continue
            y = expert(x[r] * w.to(x.dtype)) if self.weigh_inputs else expert(x[r]) * w  # (n_e, C)
            # index_put_ keeps only the rows for backward (index_add_ would keep y as well): each expert's rows are
            # distinct tokens, so the sum is the same, in the same order, as the references' index_add_.
            out.index_put_((r,), y.to(out.dtype), accumulate=True)
        out = out.to(x.dtype)
        if self.experts_out_norm is not None:
            out = self.experts_out_norm(out)
        if self.shared_expert is not None:
            shared = self.shared_expert(shared_in)  # (N, C)
            if self.shared_expert_gate is not None:
                shared = torch.sigmoid(self.shared_expert_gate(shared_in)) * shared
            if self.shared_out_norm is not None:
                shared = self.shared_out_norm(shared)
            out = out + shared
        return out.view(B, T, C)  # (B, T, C)
