"""Heads on a model's final hidden states: the scalar head of reward and value models.

`Transformer(tokens, hidden_only=True)` gives the final (normed) hidden states (B, T, C) of any
model, tied output layer or not; a head maps them to what an objective needs. The language-model
head is the model's own output layer (`Transformer.head`, or the tied embedding), which
`train.losses` applies chunk by chunk; a reward model (Bradley-Terry, Ouyang et al. 2022) or a PPO
value function puts a `ScalarHead` on the same hidden states and reads it at the positions it
scores, e.g. each sequence's last real token (`last_positions`).

It does not compute losses (train/losses.py, align/) or decide which tokens are scored.
"""

from __future__ import annotations

import torch
from torch import nn


class ScalarHead(nn.Module):
    """hidden (..., C) -> one score per position (...): a linear layer to a single output.

    Initialised N(0, std 1/sqrt(C + 1)) with zero bias, as OpenAI's lm-human-preferences reward head
    (Ziegler et al. 2019), so that initial scores are O(1) whatever the width.
    """

    def __init__(self, dim: int, bias: bool = False) -> None:
        super().__init__()
        self.score = nn.Linear(dim, 1, bias=bias)
        nn.init.normal_(self.score.weight, std=1.0 / (dim + 1) ** 0.5)
        if bias:
            nn.init.zeros_(self.score.bias)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        # A float32 head that trains on a bf16 frozen backbone (LoRA under bf16, `train.methods.base_dtype`) takes
        # its hidden states in its own dtype outside autocast (e.g. PPO's value pass while scoring rollouts).
        return self.score(hidden.to(self.score.weight.dtype)).squeeze(-1)  # (...,)


def last_positions(mask: torch.Tensor) -> torch.Tensor:
    """Index of each row's last True position (B,) in a (B, T) bool mask of real tokens (right padding
    or not: the last real token wherever it is); a row with none gets 0."""
    T = mask.shape[-1]
    idx = torch.arange(T, device=mask.device).expand_as(mask)  # (B, T)
    return torch.where(mask, idx, 0).amax(dim=-1)  # (B,)


def score_at(values: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """values (B, T) read at one position per row (B,): a sequence's reward at its last token."""
    return values.gather(-1, positions.unsqueeze(-1)).squeeze(-1)  # (B,)


class RewardModel(nn.Module):
    """A decoder whose output is one score per sequence: a `ScalarHead` on its final hidden states, read
    at each row's last real token (the Bradley-Terry reward model of InstructGPT; the layout of Hugging
    Face's `*ForSequenceClassification` with one label). The backbone's own output layer is unused.

    forward(tokens (B, T), last (B,): index of each row's last real token, **model kwargs) -> (B,) scores.
    """

    def __init__(self, backbone: nn.Module, bias: bool = False) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = ScalarHead(backbone.cfg.dim, bias=bias)
        if getattr(backbone, "head", None) is not None:  # the unused language-model head never trains
            backbone.head.requires_grad_(False)

    # What training code reads off a decoder (its config, its blocks for checkpointing and compile,
    # its size for MFU) is the backbone's.
    @property
    def cfg(self):
        return self.backbone.cfg

    @property
    def layers(self) -> nn.ModuleList:
        return self.backbone.layers

    def num_params(self) -> int:
        return self.backbone.num_params() + sum(p.numel() for p in self.head.parameters())

    def flops_per_token(self, seq_len: int) -> float:
        """The decoder's, without its language-model head (never run here)."""
        return self.backbone.flops_per_token(seq_len, head=False)

    def forward(self, tokens: torch.Tensor, *, last: torch.Tensor, **kwargs) -> torch.Tensor:
        hidden = self.backbone(tokens, hidden_only=True, **kwargs)  # (B, T, C)
        rows = torch.arange(tokens.shape[0], device=tokens.device)
        return self.head(hidden[rows, last]).float()  # (B,): only the scored positions go through the head


def load_reward_model(path, dtype: torch.dtype = torch.float32) -> RewardModel:
    """A `RewardModel` from a one-label `*ForSequenceClassification` checkpoint directory (on the CPU)."""
    from temper.model.hf.checkpoint import load_score_hf

    backbone, score, _ = load_score_hf(path, dtype)
    model = RewardModel(backbone)
    with torch.no_grad():
        model.head.score.weight.copy_(score)
    return model.eval()
