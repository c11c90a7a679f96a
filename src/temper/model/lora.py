"""LoRA (Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models") by module swap.

`apply_lora` replaces the named `nn.Linear` children of a built model with `LoRALinear`, which
keeps the frozen weight W and adds a trainable low-rank update: y = x W^T + b + s * (drop(x) A^T) B^T
with A (r, in), B (out, r) and s = alpha / r. B starts at zero, so the wrapped model computes exactly
what it computed before. Every other parameter is frozen: only A and B get gradients and optimizer
states. `merge_lora` folds s * B @ A into W and gives back plain `nn.Linear` modules.

The swapped module keeps W and b under their own names (`q_proj.weight`, `q_proj.bias`) and adds
`q_proj.lora_a`, `q_proj.lora_b`, so a base state dict loads before or after the swap. It does not
quantize the base weights (QLoRA), save or load adapters, or train: those belong to the fine-tuning
recipe and to `quant.py`.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import nn

ATTENTION_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")
"""The attention projections: the default targets (Hu et al. 2021 adapt W_q and W_v; all four is PEFT's common choice)."""
ALL_LINEAR_TARGETS = ATTENTION_TARGETS + ("gate_proj", "up_proj", "down_proj")
"""Every linear layer of a block: QLoRA (Dettmers et al. 2023, §4) needs these to match full fine-tuning."""


class LoRALinear(nn.Module):
    """A frozen linear layer plus a trainable rank-r update scaled by alpha / r."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float, dropout: float = 0.0) -> None:
        super().__init__()
        if rank <= 0:
            raise ValueError(f"rank must be > 0, got {rank}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        self.in_features, self.out_features = base.in_features, base.out_features
        self.rank, self.alpha, self.scale = rank, alpha, alpha / rank
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
        # p = 0 is an Identity, not Dropout(0): no copy of x is made and saved for backward.
        self.dropout: nn.Module = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """A as nn.Linear initialises its weight (Kaiming uniform), B = 0: the update starts at zero."""
        nn.init.kaiming_uniform_(self.lora_a, a=math.sqrt(5))
        nn.init.zeros_(self.lora_b)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(x, self.weight, self.bias)  # (..., out)
        xa = self.dropout(x)
        if not torch.is_autocast_enabled(x.device.type):
            xa = xa.to(self.lora_a.dtype)  # a bfloat16 base feeds float32 adapters; under autocast, autocast casts
        h = F.linear(xa, self.lora_a)  # (..., r)
        return y + (F.linear(h, self.lora_b) * self.scale).to(y.dtype)  # (..., out)

    def delta_weight(self) -> torch.Tensor:
        """s * B @ A (out, in) in float32: what merging adds to W."""
        return self.scale * (self.lora_b.float() @ self.lora_a.float())

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, rank={self.rank}, alpha={self.alpha}"


def apply_lora(
    model: nn.Module, rank: int, alpha: float, targets: Iterable[str] = ATTENTION_TARGETS, dropout: float = 0.0
) -> list[str]:
    """Swap every `nn.Linear` child named in `targets` for a `LoRALinear`; freeze everything else.

    Targets match a child's own name (`q_proj` matches `layers.3.attn.q_proj`). Returns the dotted
    names of the swapped modules; a target that matches nothing raises, naming the linear layers
    that exist, so a typo never trains nothing.
    """
    targets = tuple(targets)
    if "head" in targets:  # Transformer.forward multiplies by head.weight (tied or not) without calling the module
        raise ValueError("LoRA target 'head': the output head is applied through its weight, so an adapter there "
                         "would never run; adapt the blocks' linear layers")
    if rank <= 0 or not 0.0 <= dropout < 1.0:
        raise ValueError(f"rank must be > 0 and dropout in [0, 1), got rank={rank}, dropout={dropout}")
    linears = [(f"{parent_name}.{name}" if parent_name else name, parent, name, child)
               for parent_name, parent in model.named_modules()
               for name, child in parent.named_children() if isinstance(child, nn.Linear)]
    names = {name for _, _, name, _ in linears}
    missing = [t for t in targets if t not in names]
    if missing:  # checked before anything changes, so a typo leaves the model as it was
        raise ValueError(f"LoRA targets {missing} match no nn.Linear; the model has {sorted(names)}")
    for p in model.parameters():
        p.requires_grad_(False)
    swapped = []
    for dotted, parent, name, child in linears:
        if name in targets:
            setattr(parent, name, LoRALinear(child, rank, alpha, dropout))
            swapped.append(dotted)
    return swapped


def merge_lora(model: nn.Module) -> nn.Module:
    """Replace every `LoRALinear` by a plain `nn.Linear` with weight W + s * B @ A (in place; returns `model`)."""
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, LoRALinear):
                w = child.weight
                linear = nn.Linear(child.in_features, child.out_features, bias=child.bias is not None,
                                   device=w.device, dtype=w.dtype)
                with torch.no_grad():
                    linear.weight.copy_((w.float() + child.delta_weight()).to(w.dtype))
                    if child.bias is not None:
                        linear.bias.copy_(child.bias)
                linear.requires_grad_(False)
                setattr(parent, name, linear)
    return model


def lora_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The adapters' parameters (A and B of every `LoRALinear`), in module order."""
    return [p for m in model.modules() if isinstance(m, LoRALinear) for p in (m.lora_a, m.lora_b)]
