"""LoRA (Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models") by module swap,
with rsLoRA scaling and DoRA.

`apply_lora` replaces the named `nn.Linear` children of a built model with `LoRALinear`, which
keeps the frozen weight W and adds a trainable low-rank update: y = x W^T + b + s * (drop(x) A^T) B^T
with A (r, in), B (out, r) and s = alpha / r, or alpha / sqrt(r) with rsLoRA. B starts at zero, so
the wrapped model computes exactly what it computed before. Every other parameter is frozen: only
the adapters get gradients and optimizer states. `merge_lora` folds the update into W and gives
back plain `nn.Linear` modules.

DoRA (Liu et al. 2024, "DoRA: Weight-Decomposed Low-Rank Adaptation") adds a trainable magnitude
m (out,): W' = m * (W + sBA) / ||W + sBA||, the norm taken over each output row (the paper's
column norm of W^T) and treated as a constant in backward (§4.3). The forward is computed as PEFT
computes it, so an adapter trained here gives PEFT's numbers and back.

The swapped module keeps W and b under their own names (`q_proj.weight`, `q_proj.bias`) and adds
`q_proj.lora_a`, `q_proj.lora_b` (and `q_proj.lora_magnitude`), so a base state dict loads before
or after the swap. W may be a torchao NF4 tensor (QLoRA, see `quant.py`): the forward calls
`F.linear`, which torchao dispatches to its NF4 kernel, and merging dequantizes. This module does
not quantize, read or write adapter files (`hf/peft.py`), or train.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Collection, Iterable, Iterator

import torch
import torch.nn.functional as F
from torch import nn

ATTENTION_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")
"""The attention projections: the default targets (Hu et al. 2021 adapt W_q and W_v; all four is PEFT's common choice)."""
ALL_LINEAR_TARGETS = ATTENTION_TARGETS + ("gate_proj", "up_proj", "down_proj")
"""Every linear layer of a block: QLoRA (Dettmers et al. 2023, §4) needs these to match full fine-tuning."""
LATENT_ATTENTION_TARGETS = ("q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj")
"""Latent attention's projections beside o_proj (DeepSeek-V3; q_proj too where it has no query latent), in place of
k_proj and v_proj."""
LINEAR_ATTENTION_TARGETS = ("in_proj_qkv", "in_proj_z", "in_proj_b", "in_proj_a", "out_proj")
"""The projections of Gated DeltaNet layers (Qwen3.5's linear attention), beside the attention layers' q/k/v/o."""
IN_OUT_PROJ_TARGETS = ("in_proj", "out_proj")
"""The projections of short convolution layers (LFM2's) and of Mamba 2 layers (Granite 4.0-H's)."""
MAMBA_TARGETS = ("x_proj", "dt_proj")
"""The projections of Mamba layers beside in_proj and out_proj: the step input, B and C, and the step per channel."""


def block_linears(model: nn.Module) -> tuple[str, ...]:
    """The names of ALL_LINEAR_TARGETS, LATENT_ATTENTION_TARGETS, LINEAR_ATTENTION_TARGETS, IN_OUT_PROJ_TARGETS and
    MAMBA_TARGETS that `model` has: every linear layer of its blocks (what QLoRA quantizes by default)."""
    names = {name for m in model.modules() for name, c in m.named_children() if isinstance(c, (nn.Linear, LoRALinear))}
    known = ALL_LINEAR_TARGETS + LATENT_ATTENTION_TARGETS + LINEAR_ATTENTION_TARGETS + IN_OUT_PROJ_TARGETS + MAMBA_TARGETS
    return tuple(dict.fromkeys(t for t in known if t in names))  # out_proj once


class _UpcastLinear(torch.autograd.Function):
    """F.linear(x.to(weight.dtype), weight), saving x in its own dtype and casting it again in backward.

    The adapters' A product on bf16 activations: autograd would save the float32 copy of x, twice x's
    bytes, once per adapter (q, k and v each their own), all alive while a checkpointed block is
    recomputed. Saving x itself (which q, k and v share) costs half or less. The backward runs the
    products autograd runs for the cast and `F.linear` (x's gradient grad @ W cast back to x's dtype,
    W's grad^T @ x), so the gradients are the same, bit for bit.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(x, weight)
        return F.linear(x.to(weight.dtype), weight)  # (..., r)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        x, weight = ctx.saved_tensors
        g = grad.reshape(-1, grad.shape[-1])  # (N, r)
        gx = g.mm(weight).to(x.dtype).view(x.shape) if ctx.needs_input_grad[0] else None  # (..., in)
        gw = g.t().mm(x.reshape(-1, x.shape[-1]).to(weight.dtype)) if ctx.needs_input_grad[1] else None  # (r, in)
        return gx, gw


class LoRALinear(nn.Module):
    """A frozen linear layer plus a trainable rank-r update scaled by alpha / r (rsLoRA: alpha / sqrt(r)),
    and with `dora` a trainable magnitude per output row."""

    def __init__(
        self, base: nn.Linear, rank: int, alpha: float, dropout: float = 0.0, *,
        rslora: bool = False, dora: bool = False,
    ) -> None:
        super().__init__()
        if rank <= 0:
            raise ValueError(f"rank must be > 0, got {rank}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        self.in_features, self.out_features = base.in_features, base.out_features
        self.rank, self.alpha, self.rslora, self.dropout_p = rank, alpha, rslora, dropout
        # rsLoRA (Kalajdzievski 2023): alpha / sqrt(r) keeps the update's scale stable as r grows,
        # where alpha / r shrinks it and slows learning at large ranks.
        self.scale = alpha / math.sqrt(rank) if rslora else alpha / rank
        # The base's own Parameters, frozen, under the base's names (no copy, no new state-dict keys).
        self.weight = base.weight
        self.bias = base.bias
        self.weight.requires_grad_(False)
        if self.bias is not None:
            self.bias.requires_grad_(False)
        # Adapters in float32 whatever the base's dtype: they are trained, so they need the precision.
        kw = {"device": base.weight.device, "dtype": torch.float32}
        self.lora_a = nn.Parameter(torch.empty(rank, self.in_features, **kw))  # (r, in)
        self.lora_b = nn.Parameter(torch.empty(self.out_features, rank, **kw))  # (out, r)
        self.lora_magnitude = nn.Parameter(torch.empty(self.out_features, **kw)) if dora else None  # (out,)
        # p = 0 is an Identity, not Dropout(0): no copy of x is made and saved for backward.
        self.dropout: nn.Module = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.enabled = True
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """A as nn.Linear initialises its weight (Kaiming uniform), B = 0: the update starts at zero;
        DoRA's magnitude starts at ||W||, so W' = W."""
        nn.init.kaiming_uniform_(self.lora_a, a=math.sqrt(5))
        nn.init.zeros_(self.lora_b)
        if self.lora_magnitude is not None:
            with torch.no_grad():
                self.lora_magnitude.copy_(self.weight_norm())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if hasattr(self.weight, "quantized_data"):  # NF4 (QLoRA): torchao's product, dequantized in slices
            from temper.model.quant import nf4_linear  # not at the top: quant imports this module

            y = nf4_linear(x, self.weight, self.bias)  # (..., out)
        else:
            y = F.linear(x, self.weight, self.bias)  # (..., out)
        if not self.enabled:  # the base model, e.g. DPO's reference (`adapters_disabled`)
            return y
        xd = self.dropout(x)
        if torch.is_autocast_enabled(x.device.type) or xd.dtype == self.lora_a.dtype:  # autocast casts, or no cast
            xa = F.linear(xd, self.lora_a)  # (..., r)
        else:  # bf16 activations, float32 adapters: save x, not its float32 copy, for A's gradient
            xa = _UpcastLinear.apply(xd, self.lora_a)  # (..., r)
        if self.lora_magnitude is None:
            if xa.dtype == y.dtype != torch.float32:  # bf16/fp16 autocast: y + s xa B^T as one addmm
                # The update lands in the product's own output: no separate (..., out) tensor for it, and in
                # backward the gradient of y is the gradient itself (scaling the (..., r) factor, not the
                # (..., out) product, makes no scaled copy). A recomputed, compiled Llama-3-8B QLoRA block
                # (T = 2048) peaks 256 MiB lower for it. One rounding, not PEFT's two; float32 keeps PEFT's
                # order below, bit for bit.
                out = torch.addmm(y.reshape(-1, y.shape[-1]), (xa * self.scale).reshape(-1, self.rank),
                                  self.lora_b.t())  # (N, out)
                return out.view(y.shape)
            # Scaled in place and cast without a name holding it: a float32 (..., out) product (bf16 y without
            # autocast) is freed before the sum, not kept beside it.
            return y + F.linear(xa, self.lora_b).mul_(self.scale).to(y.dtype)  # (..., out)
        h = F.linear(xa, self.lora_b)  # (..., out)
        # DoRA as PEFT computes it (same operations, same order): y + (g - 1) * x W^T + g * x A^T B^T * s
        # with g = m / ||W + sBA||, which is g * x (W + sBA)^T + b without forming W'. With dropout
        # active, PEFT feeds the dropped-out x to both W-terms of the correction, and so does this.
        g = self.lora_magnitude / self.weight_norm()  # (out,); the norm is a constant (Liu et al. §4.3)
        if self.training and isinstance(self.dropout, nn.Dropout):
            wx = F.linear(xd, self.weight)
        else:
            wx = y if self.bias is None else y - self.bias
        return (y + ((g - 1) * wx + g * h * self.scale)).to(y.dtype)  # (..., out)

    def delta_weight(self) -> torch.Tensor:
        """s * B @ A (out, in) in float32: the low-rank update of W."""
        return self.scale * (self.lora_b.float() @ self.lora_a.float())

    @torch.no_grad()
    def weight_norm(self) -> torch.Tensor:
        """||W + sBA|| of each output row (out,) in float32, without gradient (DoRA's denominator)."""
        return torch.linalg.norm(self.weight.to(torch.float32) + self.delta_weight(), dim=1)

    def merged_weight(self) -> torch.Tensor:
        """The weight of the equivalent plain linear layer, in float32: W + sBA, times m / ||W + sBA|| with DoRA."""
        w = self.weight.to(torch.float32) + self.delta_weight()  # an NF4 W is dequantized by .to
        if self.lora_magnitude is not None:
            w = w * (self.lora_magnitude.float() / torch.linalg.norm(w, dim=1))[:, None]
        return w

    def extra_repr(self) -> str:
        return (f"in={self.in_features}, out={self.out_features}, rank={self.rank}, alpha={self.alpha}"
                f"{', rslora' if self.rslora else ''}{', dora' if self.lora_magnitude is not None else ''}")


def find_linears(model: nn.Module, targets: Iterable[str], what: str = "LoRA") -> list[tuple[str, nn.Module, str]]:
    """(dotted name, parent, child name) of every `nn.Linear` or `LoRALinear` whose own name is in `targets`.

    Targets match a child's own name (`q_proj` matches `layers.3.attn.q_proj`). A target that matches
    nothing raises, naming the linear layers that exist, so a typo never trains (or quantizes) nothing.
    """
    targets = tuple(targets)
    if "head" in targets and getattr(model, "head", False) is None:
        raise ValueError(f"{what} target 'head': this model's output head is tied to tok_emb (tie_embeddings=True), "
                         "so there is no separate head layer; adapt the blocks' linear layers")
    found = [(f"{parent_name}.{name}" if parent_name else name, parent, name, child)
             for parent_name, parent in model.named_modules()
             for name, child in parent.named_children() if isinstance(child, (nn.Linear, LoRALinear))]
    names = {name for _, _, name, _ in found}
    missing = [t for t in targets if t not in names]
    if missing:
        raise ValueError(f"{what} targets {missing} match no nn.Linear; the model has {sorted(names)}")
    return [(dotted, parent, name) for dotted, parent, name, _ in found if name in targets]


def apply_lora(
    model: nn.Module, rank: int, alpha: float, targets: Iterable[str] = ATTENTION_TARGETS, dropout: float = 0.0,
    *, rslora: bool = False, dora: bool = False, only: Collection[str] | None = None,
) -> list[str]:
    """Swap every `nn.Linear` child named in `targets` (`head` included, when untied) for a `LoRALinear`;
    freeze everything else. Returns the dotted names of the swapped modules. only: of those, just these dotted
    names (a PEFT file's layers: a shared expert's down_proj, not the routed experts' of the same name).

    Checks everything before changing anything, so a refused call leaves the model as it was.
    """
    if rank <= 0 or not 0.0 <= dropout < 1.0:
        raise ValueError(f"rank must be > 0 and dropout in [0, 1), got rank={rank}, dropout={dropout}")
    found = [f for f in find_linears(model, targets) if only is None or f[0] in only]
    adapted = [dotted for dotted, parent, name in found if isinstance(getattr(parent, name), LoRALinear)]
    if adapted:
        raise ValueError(f"{adapted[:4]} already have LoRA adapters; merge_lora first to stack another")
    for p in model.parameters():
        p.requires_grad_(False)
    for _, parent, name in found:
        setattr(parent, name, LoRALinear(getattr(parent, name), rank, alpha, dropout, rslora=rslora, dora=dora))
    return [dotted for dotted, _, _ in found]


def merge_lora(model: nn.Module, dtype: torch.dtype | None = None) -> nn.Module:
    """Replace every `LoRALinear` by a frozen plain `nn.Linear` holding its merged weight (in place; returns `model`).

    dtype: of the new layers' weight and bias; default the base weight's (an NF4 base's is the dtype
    it was quantized from), so a QLoRA model merges into a bf16 model ready for export.
    """
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, LoRALinear):
                dt = dtype or child.weight.dtype
                linear = nn.Linear(child.in_features, child.out_features, bias=child.bias is not None,
                                   device=child.lora_a.device, dtype=dt)
                with torch.no_grad():
                    linear.weight.copy_(child.merged_weight())
                    if child.bias is not None:
                        linear.bias.copy_(child.bias)
                linear.requires_grad_(False)
                setattr(parent, name, linear)
    return model


@contextlib.contextmanager
def adapters_disabled(model: nn.Module) -> Iterator[nn.Module]:
    """Within the block, every `LoRALinear` of `model` computes its frozen base layer alone: the model
    before fine-tuning, from the same weights. DPO's reference policy under LoRA is this, with no
    second copy of the base (PEFT's `disable_adapter`)."""
    layers = [m for m in model.modules() if isinstance(m, LoRALinear)]
    for m in layers:
        m.enabled = False
    try:
        yield model
    finally:
        for m in layers:
            m.enabled = True


def lora_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The adapters' parameters (A, B and DoRA's magnitude of every `LoRALinear`), in module order."""
    return [p for m in model.modules() if isinstance(m, LoRALinear)
            for p in (m.lora_a, m.lora_b, m.lora_magnitude) if p is not None]
