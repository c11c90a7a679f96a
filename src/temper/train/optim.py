"""Optimizers, their parameter groups and learning-rate schedules.

The schedule is a pure function of the optimizer-step count, so resuming a run needs no scheduler
object: `lr_at(step, cfg)` after a resume is the uninterrupted value by construction (a scheduler
object restored out of step with the optimizer is a classic resume bug, Lightning #1772). This module does not run the step itself (that is `train/step.py`).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn

from temper.config import ConfigError
from temper.model.lora import LoRALinear
from temper.model.transformer import Block


@dataclass
class OptimConfig:
    """The optimizer: AdamW, or Muon for the blocks' weight matrices beside AdamW for the rest."""

    name: Literal["adamw", "muon"] = "adamw"
    """adamw: AdamW for every parameter. muon: Muon (Jordan et al. 2024, torch.optim.Muon) for the weights of the
    decoder blocks' linear layers (attention, MLPs, each expert, routers), AdamW as set below for the rest
    (embeddings, head, norms, biases, convolutions, adapters), as nanochat and Moonlight train."""
    lr: float = 6e-4
    """Peak learning rate (after warmup)."""
    weight_decay: float = 0.1
    """Decoupled weight decay, applied to matrices only (never to norms and biases)."""
    decay_embeddings: bool = False
    """Also decay the embedding (and tied head) matrix; off as in most modern recipes."""
    beta1: float = 0.9
    """AdamW beta1."""
    beta2: float = 0.95
    """AdamW beta2 (0.95 as GPT-3 and Llama; 0.999 is PyTorch's default)."""
    eps: float = 1e-8
    """AdamW epsilon."""
    fused: bool = True
    """Use the fused AdamW kernel on CUDA and CPU (one kernel for all parameters; about 5x faster
    than the per-tensor loop for a 124M model on CPU, and the default of the Hugging Face Trainer)."""
    muon_lr: float | None = None
    """Muon's peak learning rate, scheduled like lr; None: lr, right for Muon too when its updates are scaled to
    AdamW's size (muon_adjust_lr=match_rms_adamw, Liu et al. 2025, "Muon is Scalable for LLM Training")."""
    muon_adjust_lr: Literal["match_rms_adamw", "original"] = "match_rms_adamw"
    """How Muon scales a (rows x cols) matrix's orthogonalised update: match_rms_adamw, by 0.2 sqrt(max(rows, cols)),
    to AdamW's RMS (Moonlight: AdamW's lr and weight decay carry over); original, by sqrt(max(1, rows / cols))
    (Keller Jordan's, with a muon_lr near 0.02)."""
    muon_momentum: float = 0.95
    """Muon's momentum (Nesterov)."""
    muon_ns_steps: int = 5
    """Newton-Schulz iterations that orthogonalise each update."""
    loraplus_lr_ratio: float = 0.0
    """LoRA+ (Hayou et al. 2024): LoRA's B factors learn at lr times this (16 in the paper), and so do the trained
    vectors (DoRA's magnitudes), as PEFT's create_loraplus_optimizer groups them; 0: off."""

    def __post_init__(self) -> None:
        if self.lr <= 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        if self.muon_lr is not None and self.muon_lr <= 0:
            raise ValueError(f"muon_lr must be > 0, got {self.muon_lr}")
        if self.muon_lr is not None and self.name != "muon":
            raise ValueError(f"muon_lr={self.muon_lr} is Muon's learning rate: set name=muon, or leave it out")
        if not 0 <= self.muon_momentum < 1:
            raise ValueError(f"muon_momentum must be in [0, 1), got {self.muon_momentum}")
        if not 1 <= self.muon_ns_steps < 100:
            raise ValueError(f"muon_ns_steps must be in [1, 100), got {self.muon_ns_steps}")
        if self.loraplus_lr_ratio < 0:
            raise ValueError(f"loraplus_lr_ratio must be >= 0 (0: off), got {self.loraplus_lr_ratio}")
        if not (0 <= self.beta1 < 1 and 0 <= self.beta2 < 1):
            raise ValueError("beta1 and beta2 must be in [0, 1)")


@dataclass
class ScheduleConfig:
    """Learning-rate schedule as a function of the optimizer step."""

    kind: Literal["cosine", "linear", "constant", "wsd"] = "cosine"
    """cosine: warmup then cosine decay; linear: warmup then linear decay; constant: warmup then flat;
    wsd: warmup, stable, then linear decay over the last `decay_fraction` of training."""
    warmup_steps: int = 100
    """Linear warmup from 0 to the peak LR over this many steps."""
    min_lr_ratio: float = 0.1
    """Final LR as a fraction of the peak (cosine, linear, wsd)."""
    decay_fraction: float = 0.2
    """wsd only: fraction of the run spent decaying (Hägele et al. 2024 use 10-20%)."""

    def __post_init__(self) -> None:
        if self.warmup_steps < 0:
            raise ValueError("warmup_steps must be >= 0")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ValueError("min_lr_ratio must be in [0, 1]")
        if not 0 < self.decay_fraction <= 1:
            raise ValueError("decay_fraction must be in (0, 1]")


def lr_at(step: int, total_steps: int, peak_lr: float, cfg: ScheduleConfig) -> float:
    """Learning rate for optimizer step `step` (0-based) of `total_steps`."""
    if step < cfg.warmup_steps:
        return peak_lr * (step + 1) / cfg.warmup_steps
    min_lr = peak_lr * cfg.min_lr_ratio
    if cfg.kind == "constant":
        return peak_lr
    if cfg.kind == "wsd":
        decay_start = max(cfg.warmup_steps, total_steps - int(cfg.decay_fraction * total_steps))
        if step < decay_start:
            return peak_lr
        progress = (step - decay_start) / max(1, total_steps - 1 - decay_start)
        return peak_lr - (peak_lr - min_lr) * min(1.0, progress)
    progress = min(1.0, (step - cfg.warmup_steps) / max(1, total_steps - 1 - cfg.warmup_steps))
    if cfg.kind == "linear":
        return peak_lr - (peak_lr - min_lr) * progress
    return min_lr + 0.5 * (peak_lr - min_lr) * (1 + math.cos(math.pi * progress))


def param_groups(model: nn.Module, weight_decay: float, decay_embeddings: bool = False) -> list[dict]:
    """Two AdamW groups: matrices decay; norms, biases (and embeddings unless asked) do not.

    Embeddings are recognised by module type, not by name, so a tied head (the same Parameter as
    the embedding) follows the embedding's rule. Shared parameters are listed once.
    """
    embedding_params = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    decay, no_decay, seen = [], [], set()
    for p in model.parameters():
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        is_matrix = p.dim() >= 2 and (decay_embeddings or id(p) not in embedding_params)
        (decay if is_matrix else no_decay).append(p)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def block_matrices(model: nn.Module) -> list[nn.Parameter]:
    """The trainable weights of the linear layers inside the decoder blocks: the hidden layers' matrices that Muon
    orthogonalises. Embeddings and the head stay with AdamW (Jordan et al. 2024: their updates are not transforms of
    a hidden state), as do norms, biases, convolutions and adapters (not `nn.Linear`)."""
    embeddings = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    found, seen = [], set()
    for block in (m for m in model.modules() if isinstance(m, Block)):
        for linear in (m for m in block.modules() if isinstance(m, nn.Linear)):
            p = linear.weight
            if p.requires_grad and id(p) not in seen and id(p) not in embeddings:
                seen.add(id(p))
                found.append(p)
    return found


class MuonWithAdamW(torch.optim.Optimizer):
    """Muon for the param groups marked "muon", AdamW for the others, as one optimizer, because the recipes, the
    checkpoints, the gradient scaler and ZeRO-1 each take one. It steps a `torch.optim.Muon` and a
    `torch.optim.AdamW` whose param groups are its own (the same dicts: `set_lr` reaches them) and whose state is its
    own, so its `state_dict` holds both and loads back into both."""

    def __init__(self, params: list[dict[str, Any]], *, muon: dict[str, Any], adamw: dict[str, Any]) -> None:
        groups = [dict(g, muon=bool(g.get("muon"))) for g in params]  # unmarked: AdamW's
        self._muon = torch.optim.Muon([g for g in groups if g["muon"]], **muon) if any(
            g["muon"] for g in groups) else None
        self._adamw = torch.optim.AdamW([g for g in groups if not g["muon"]], **adamw) if any(
            not g["muon"] for g in groups) else None
        super().__init__(groups, {})  # the same dicts, with the defaults each inner optimizer filled in
        self._share()

    def _share(self) -> None:
        for inner, muon in ((self._muon, True), (self._adamw, False)):
            if inner is not None:
                inner.param_groups = [g for g in self.param_groups if g["muon"] is muon]
                inner.state = self.state

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for inner in (self._muon, self._adamw):
            if inner is not None:
                inner.step()
        return loss

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)  # new group dicts and a new state: shared again
        self._share()


def build_optimizer(model: nn.Module, cfg: OptimConfig, device_type: str, *,
                    shard_states: bool = False) -> torch.optim.Optimizer:
    """AdamW over `param_groups` (the fused kernel on CUDA and CPU unless `cfg.fused` is off); with
    cfg.name=muon, `MuonWithAdamW`: Muon over `block_matrices`, AdamW over the rest.

    shard_states: ZeRO-1 (Rajbhandari et al. 2020) for replicated (DDP) models: each rank keeps the optimizer
    states of its share of the parameters, steps them, and broadcasts them (`ZeroRedundancyOptimizer`).
    """
    groups = param_groups(model, cfg.weight_decay, cfg.decay_embeddings)
    fused = cfg.fused and device_type in ("cuda", "cpu")
    adamw = {"lr": cfg.lr, "betas": (cfg.beta1, cfg.beta2), "eps": cfg.eps, "fused": fused or None}
    optimizer_class: Callable[..., torch.optim.Optimizer] = torch.optim.AdamW
    kwargs: dict[str, Any] = adamw
    if cfg.name == "muon":
        matrices = block_matrices(model)
        if not matrices:
            raise ConfigError("optim.name=muon: the model trains no weight of a decoder block's linear layers (Muon "
                              "orthogonalises those; LoRA's and prefix tuning's parameters are not); use adamw")
        taken = {id(p) for p in matrices}
        groups = [{"params": matrices, "weight_decay": cfg.weight_decay, "name": "muon", "muon": True,
                   "lr_scale": (cfg.muon_lr or cfg.lr) / cfg.lr}] + [
            {**g, "params": [p for p in g["params"] if id(p) not in taken], "muon": False} for g in groups]
        muon = {"momentum": cfg.muon_momentum, "nesterov": True, "ns_steps": cfg.muon_ns_steps,
                "adjust_lr_fn": cfg.muon_adjust_lr}
        # Bound, not passed as keywords: ZeRO-1 would copy its keywords into every param group as defaults.
        optimizer_class, kwargs = functools.partial(MuonWithAdamW, muon=muon, adamw=adamw), {}
    if cfg.loraplus_lr_ratio:
        groups = _loraplus_groups(model, groups, cfg.loraplus_lr_ratio)
    # An empty group (LoRA trains only matrices) is left out: torch's flattened optimizer state dict, which
    # sharded checkpoints use, cannot load one.
    groups = [g for g in groups if g["params"]]
    if shard_states:
        from torch.distributed.optim import ZeroRedundancyOptimizer
        optimizer = ZeroRedundancyOptimizer(groups, optimizer_class=optimizer_class, **kwargs)
    else:
        optimizer = optimizer_class(groups, **kwargs)
    set_lr(optimizer, cfg.lr)  # each group at its lr_scale (Muon's, LoRA+'s) from the start
    return optimizer


def _loraplus_groups(model: nn.Module, groups: list[dict[str, Any]], ratio: float) -> list[dict[str, Any]]:
    """LoRA's B factors and the trained vectors of each group in groups of their own, at `ratio` times its lr."""
    b_factors = {id(m.lora_b) for m in model.modules() if isinstance(m, LoRALinear)}
    if not b_factors:
        raise ConfigError("optim.loraplus_lr_ratio: the model has no LoRA adapters (LoRA+ speeds up their B factors); "
                          "train with method lora or qlora, or leave it at 0")
    out = []
    for g in groups:
        b = [p for p in g["params"] if id(p) in b_factors]
        vectors = [p for p in g["params"] if p.dim() == 1]
        out += [{**g, "params": [p for p in g["params"] if id(p) not in b_factors and p.dim() != 1]},
                {**g, "params": b, "lr_scale": ratio, "name": "lora_b"},
                {**g, "params": vectors, "lr_scale": ratio, "name": "vectors"}]
    return out


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Every group at the schedule's `lr`, times its "lr_scale" (Muon's: muon_lr / lr)."""
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)
