"""Optimizer parameter groups and learning-rate schedules.

The schedule is a pure function of the optimizer-step count, so resuming a run needs no scheduler
object: `lr_at(step, cfg)` after a resume is the uninterrupted value by construction (a scheduler
object restored out of step with the optimizer is a classic resume bug, Lightning #1772). This module does not run the step itself (that is `train/step.py`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn


@dataclass
class OptimConfig:
    """AdamW hyper-parameters."""

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

    def __post_init__(self) -> None:
        if self.lr <= 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
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


def build_optimizer(model: nn.Module, cfg: OptimConfig, device_type: str, *,
                    shard_states: bool = False) -> torch.optim.Optimizer:
    """AdamW over `param_groups`; the fused kernel on CUDA and CPU unless `cfg.fused` is off.

    shard_states: ZeRO-1 (Rajbhandari et al. 2020) for replicated (DDP) models: each rank keeps the AdamW
    states of its share of the parameters, steps them, and broadcasts them (`ZeroRedundancyOptimizer`).
    """
    # An empty group (LoRA trains only matrices) is left out: torch's flattened optimizer state dict, which
    # sharded checkpoints use, cannot load one.
    groups = [g for g in param_groups(model, cfg.weight_decay, cfg.decay_embeddings) if g["params"]]
    fused = cfg.fused and device_type in ("cuda", "cpu")
    kwargs = {"lr": cfg.lr, "betas": (cfg.beta1, cfg.beta2), "eps": cfg.eps, "fused": fused or None}
    if shard_states:
        from torch.distributed.optim import ZeroRedundancyOptimizer
        return ZeroRedundancyOptimizer(groups, optimizer_class=torch.optim.AdamW, **kwargs)
    return torch.optim.AdamW(groups, **kwargs)


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr
