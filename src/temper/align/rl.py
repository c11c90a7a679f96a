"""Objectives of reinforcement learning from feedback: GRPO (and DAPO, Dr. GRPO, GSPO, CISPO, SAPO), RLOO, and PPO.

A rollout micro-batch is a `train.losses.Batch` of B sampled sequences (prompt + completion), right-padded:
targets are IGNORE_INDEX everywhere but on the completion's tokens, and `scored = targets != IGNORE_INDEX`
marks the N positions whose next token was sampled. Per-token tensors travel in `batch.extra` as (B, T)
float32 aligned with the targets (0 where not scored): `old_logps` (the sampling policy's log-probs, after
its temperature), optionally `ref_logps` (the reference policy's), and for PPO `advantages`, `returns` and
`old_values`; GRPO's `advantages` are (B,), one per sequence. The policy's log-probs are those of
`model(inputs, logits_at=scored)` divided by `temperature` (the sampler's), as TRL computes them.

- `GRPOLoss`: the clipped surrogate with token-level importance ratios (Shao et al. 2024, DeepSeekMath) and
  an optional k3 KL to the reference; the token normalisation is a named option (GRPO's per-sequence mean,
  DAPO's per-token mean, Dr. GRPO's constant), expressed as the loss's unit (`count`), so that accumulation
  and data parallelism (`train.step.train_step`) give the update of one big batch; GSPO's sequence ratios, and
  CISPO's and SAPO's surrogates, as options.
- `group_advantages`: (r - group mean) / (group std + 1e-4), or over the whole batch's std, or without the
  division (Dr. GRPO).
- RLOO (Ahmadian et al. 2024, "Back to Basics"): `leave_one_out_advantages` (each reward minus the mean of the
  others of its group), the reward less beta times `sequence_kl`, and `RLOOLoss` (one clipped ratio per sequence).
- PPO (Ziegler et al. 2019, "Fine-Tuning Language Models from Human Preferences"): `kl_penalized_rewards`,
  `gae`, `whiten`, `explained_variance`, the KL coefficient controllers, and `PPOLoss` (clipped policy and value losses) on an
  `ActorCritic` (the policy and its value function in one module, so that DDP wraps one module).

Every loss and statistic equals TRL's (GRPOTrainer and RLOOTrainer of trl 1.16, PPOTrainer of trl 0.24) on one
micro-batch
(tests/align/test_rl.py), with two deliberate differences in PPO that matter only for padded responses:
TRL adds the score one position past the response's last token (its first padding slot) and counts that
slot in the value loss (huggingface/trl#1893, #3750); here the score lands on the last completion token and
only completion tokens are counted (OpenRLHF's and the paper's episode). TRL's approxkl, entropy and ratio
statistics also average over the padding; here they are means over completion tokens.

It does not sample (align/rollout.py), score completions (align/rewards.py), or run the optimizer (train/).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch
import torch.distributed as dist
from torch import nn

from temper.model.heads import RewardModel, ScalarHead, last_positions
from temper.model.lora import adapters_disabled
from temper.train.losses import IGNORE_INDEX, Batch, LossOut

GRPO_LOSS_TYPES = ("grpo", "dapo", "dr_grpo", "cispo", "sapo")
TOKEN_MEAN_LOSSES = ("dapo", "cispo")
"""The loss types whose unit is a completion token of the global batch (the others': a sequence)."""
KL_ESTIMATORS = ("k1", "k3")

TokenReference = Callable[[Batch], torch.Tensor]
"""batch -> (B, T) float32 log-probs of every target under the reference policy (0 where not scored), no gradient."""


# ---- log-probabilities -------------------------------------------------------------------------------------


def scored_mask(batch: Batch) -> torch.Tensor:
    """(B, T) bool: the positions whose next token was sampled (the completion's tokens)."""
    return batch.targets != IGNORE_INDEX


def logps_and_entropy(logits: torch.Tensor, targets: torch.Tensor, temperature: float = 1.0
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """(log p(target) with gradient, entropy without) of logits (N, V) at temperature, in float32.

    The sampler drew from softmax(logits / temperature), so the ratio to it and the entropy are taken on
    the same scaled logits (TRL's GRPOTrainer and PPOTrainer do likewise)."""
    logp_all = torch.log_softmax(logits.float() / temperature, dim=-1)  # (N, V)
    picked = logp_all.gather(-1, targets.unsqueeze(-1)).squeeze(-1)  # (N,)
    with torch.no_grad():
        entropy = -(logp_all.exp() * logp_all).sum(-1)  # (N,)
    return picked, entropy


def token_logprobs_of(model: nn.Module, batch: Batch, temperature: float = 1.0) -> torch.Tensor:
    """(B, T) float32 log-probs of every target under `model` (logits only) at temperature, 0 where not scored."""
    scored = scored_mask(batch)
    logits = model(batch.inputs, logits_at=scored, **batch.model_kwargs)  # (N, V), row-major
    picked, _ = logps_and_entropy(logits, batch.targets[scored], temperature)
    return torch.zeros(scored.shape, device=picked.device, dtype=picked.dtype).masked_scatter(scored, picked)


def frozen_token_reference(reference_model: nn.Module, temperature: float = 1.0) -> TokenReference:
    """The reference policy as a separate frozen model (full fine-tuning: a copy of the starting weights)."""
    reference_model.requires_grad_(False)

    @torch.no_grad()
    def reference(batch: Batch) -> torch.Tensor:
        return token_logprobs_of(reference_model, batch, temperature)

    return reference


def adapters_off_token_reference(policy: nn.Module, temperature: float = 1.0) -> TokenReference:
    """The reference policy of a LoRA run: the policy itself with every adapter switched off (no second copy)."""

    @torch.no_grad()
    def reference(batch: Batch) -> torch.Tensor:
        with adapters_disabled(policy):
            return token_logprobs_of(policy, batch, temperature)

    return reference


def _reference_at(batch: Batch, reference: TokenReference | None, scored: torch.Tensor, who: str) -> torch.Tensor:
    """The reference's log-probs (N,) at the scored positions: from the batch, else from `reference`."""
    if "ref_logps" in batch.extra:
        return batch.extra["ref_logps"].float()[scored]
    if reference is None:
        raise ValueError(f"{who} with a KL term needs reference log-probs: give the loss a reference, or the "
                         "batch extra['ref_logps']")
    return reference(batch).float()[scored]


def _extra(batch: Batch, name: str, who: str) -> torch.Tensor:
    if name not in batch.extra:
        raise ValueError(f"{who} needs the rollout's extra[{name!r}] in its batch")
    return batch.extra[name].float()


def token_kl(logps: torch.Tensor, ref_logps: torch.Tensor, estimator: Literal["k1", "k3"] = "k1") -> torch.Tensor:
    """Per sampled token, an estimate of KL(pi || ref) from the two log-probs (Schulman 2020, "Approximating KL
    divergence"): k1 = logp - ref (unbiased), k3 = exp(ref - logp) - 1 - (ref - logp) (unbiased, lower variance,
    >= 0). GRPO's penalty is k3, RLOO's and PPO's k1 by default (TRL's)."""
    if estimator not in KL_ESTIMATORS:
        raise ValueError(f"unknown KL estimator {estimator!r}; choose one of {KL_ESTIMATORS}")
    logr = ref_logps - logps
    return -logr if estimator == "k1" else (logr.exp() - 1) - logr


def _seq_has_tokens(scored: torch.Tensor) -> torch.Tensor:
    return scored.any(-1)  # (B,)


# ---- GRPO -------------------------------------------------------------------------------------------------


def _grouped(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    """rewards (G*P,) as (P, G) float32: P consecutive groups of `group_size` samples of one prompt."""
    if group_size < 2:
        raise ValueError(f"group_size must be >= 2 (advantages are relative to the group), got {group_size}")
    if rewards.dim() != 1 or rewards.numel() % group_size:
        raise ValueError(f"rewards must be (groups * group_size,) with group_size={group_size}, "
                         f"got shape {tuple(rewards.shape)}")
    return rewards.float().view(-1, group_size)


def group_advantages(rewards: torch.Tensor, group_size: int, scale: Literal["group", "batch", "none"] = "group",
                     batch_std: float | None = None) -> torch.Tensor:
    """Advantages (G*P,) of rewards (G*P,) laid out as P consecutive groups of `group_size` samples of one prompt.

    "group": GRPO's (r - group mean) / (group std + 1e-4), the std unbiased (n - 1), as TRL's `nanstd`;
    "batch": (r - group mean) / (std of the whole step's rewards + 1e-4), TRL's scale_rewards="batch" (Liu et al.
    2025, "Part I: Tricks or Traps"), `batch_std` that std over every rank's rewards (default: these rewards');
    "none": Dr. GRPO's (Liu et al. 2025) r - group mean, which does not up-weight groups of near-equal rewards.
    """
    if scale not in ("group", "batch", "none"):
        raise ValueError(f"unknown advantage scale {scale!r}; choose 'group', 'batch' or 'none' (TRL's scale_rewards)")
    grouped = _grouped(rewards, group_size)  # (P, G)
    adv = grouped - grouped.mean(-1, keepdim=True)
    if scale == "group":
        adv = adv / (grouped.std(-1, keepdim=True) + 1e-4)
    elif scale == "batch":
        adv = adv / ((grouped.std() if batch_std is None else batch_std) + 1e-4)
    return adv.reshape(-1)


@dataclass
class GRPOLoss:
    """The clipped surrogate of GRPO on a rollout micro-batch, with token-level importance ratios.

    Per completion token: r = exp(logp - old_logp), loss -min(r A, clip(r, 1 - eps_low, 1 + eps_high) A), plus
    beta * (exp(ref - logp) - (ref - logp) - 1), the k3 estimate of KL(pi || ref) (Schulman 2020), when beta != 0.
    With importance_sampling_level "sequence" (GSPO, Zheng et al. 2025) every token of a sequence takes the
    sequence's ratio, exp of the mean of its tokens' log-ratios, as TRL's importance_sampling_level="sequence".
    `loss_type` chooses how the token losses are averaged (the loss's unit, `count`):
    - "grpo"    each sequence's mean over its tokens, averaged over sequences (unit: a sequence with >= 1 token);
    - "dapo"    the mean over all completion tokens of the global batch (Yu et al. 2025; unit: a token);
    - "dr_grpo" each sequence's token sum / max_completion_length, averaged over sequences (Liu et al. 2025),
                so that long and short completions are not weighted differently.
    Two more surrogates, as TRL's loss types: "cispo" (MiniMax-M1, Chen et al. 2025) -sg(min(r, eps_high)) A logp,
    the ratio clipped (at eps_high itself, a ratio such as 5) and held constant instead of the update, averaged as
    dapo; "sapo" (Gao et al. 2025) -(4 / tau) sigmoid(tau (r - 1)) A, a soft gate instead of the clip, tau
    sapo_temperature_pos where A > 0 and sapo_temperature_neg elsewhere, averaged as grpo.
    Metrics (TRL's names) are completion-token means of the micro-batch; for the per-sequence types they are
    weighted by its number of sequences, so that their logged global means equal TRL's on one micro-batch.
    """

    loss_type: Literal["grpo", "dapo", "dr_grpo", "cispo", "sapo"] = "grpo"
    epsilon_low: float = 0.2
    epsilon_high: float = 0.2
    beta: float = 0.0
    """Weight of the KL to the reference; 0 needs no reference at all."""
    temperature: float = 1.0
    """The sampler's: the policy's logits are divided by it."""
    max_completion_length: int | None = None
    """Dr. GRPO's constant normaliser (the rollout's maximum number of completion tokens)."""
    importance_sampling_level: Literal["token", "sequence"] = "token"
    """A ratio per token (GRPO), or one per sequence, its tokens' geometric mean (GSPO)."""
    sapo_temperature_pos: float = 1.0
    """SAPO's gate temperature where the advantage is positive."""
    sapo_temperature_neg: float = 1.05
    """... and where it is not."""
    reference: TokenReference | None = None
    """Where the reference log-probs come from when the batch does not carry them (`extra["ref_logps"]`)."""

    def __post_init__(self) -> None:
        if self.loss_type not in GRPO_LOSS_TYPES:
            raise ValueError(f"unknown GRPO loss type {self.loss_type!r}; choose one of {GRPO_LOSS_TYPES}")
        if not (0 <= self.epsilon_low < 1 and self.epsilon_high >= 0):
            raise ValueError(f"clip range must satisfy 0 <= epsilon_low < 1 and epsilon_high >= 0, got "
                             f"{self.epsilon_low}, {self.epsilon_high}")
        if self.beta < 0:
            raise ValueError(f"beta must be >= 0, got {self.beta}")
        if self.temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")
        if self.loss_type == "dr_grpo" and not (self.max_completion_length and self.max_completion_length > 0):
            raise ValueError("dr_grpo normalises by max_completion_length: give it a positive value")
        if self.loss_type == "cispo" and self.epsilon_high < 1:
            raise ValueError(f"cispo caps the ratio at epsilon_high itself (5.0 in ScaleRL), so it must be >= 1, got "
                             f"{self.epsilon_high}")
        if self.sapo_temperature_pos <= 0 or self.sapo_temperature_neg <= 0:
            raise ValueError("sapo_temperature_pos and sapo_temperature_neg must be > 0")
        if self.importance_sampling_level not in ("token", "sequence"):
            raise ValueError(f"unknown importance sampling level {self.importance_sampling_level!r}; choose 'token' "
                             "or 'sequence'")

    def count(self, batch: Batch) -> torch.Tensor:
        scored = scored_mask(batch)
        return scored.sum() if self.loss_type in TOKEN_MEAN_LOSSES else _seq_has_tokens(scored).sum()

    def __call__(self, model: nn.Module, batch: Batch) -> LossOut:
        scored = scored_mask(batch)  # (B, T)
        rows = scored.nonzero()[:, 0]  # (N,) the sequence of each scored token, in logits' order
        logits = model(batch.inputs, logits_at=scored, **batch.model_kwargs)  # (N, V)
        logp, entropy = logps_and_entropy(logits, batch.targets[scored], self.temperature)  # (N,), (N,)
        old = _extra(batch, "old_logps", "grpo")[scored]  # (N,)
        adv = _extra(batch, "advantages", "grpo")
        if adv.dim() != 1 or adv.shape[0] != scored.shape[0]:
            raise ValueError(f"grpo advantages must be one per sequence ({scored.shape[0]},), got {tuple(adv.shape)}")
        B = scored.shape[0]
        lengths = scored.sum(-1)  # (B,)
        sequence = self.importance_sampling_level == "sequence"
        if sequence:  # GSPO: each sequence's mean log-ratio, the same ratio for all its tokens
            seq_log_ratio = torch.zeros(B, device=logp.device, dtype=logp.dtype).index_add(0, rows, logp - old)
            seq_ratio = torch.exp(seq_log_ratio / lengths.clamp(min=1))  # (B,)
            ratio = seq_ratio[rows]
        else:
            ratio = torch.exp(logp - old)
        seq_adv, adv = adv, adv[rows]  # (B,), (N,)
        if self.loss_type == "cispo":
            per_token = -torch.clamp(ratio, max=self.epsilon_high).detach() * adv * logp  # (N,)
        elif self.loss_type == "sapo":
            tau = torch.where(adv > 0, self.sapo_temperature_pos, self.sapo_temperature_neg)
            per_token = -torch.sigmoid(tau * (ratio - 1)) * 4 / tau * adv
        else:
            clipped = torch.clamp(ratio, 1 - self.epsilon_low, 1 + self.epsilon_high)
            per_token = -torch.min(ratio * adv, clipped * adv)  # (N,)
        kl = None
        if self.beta != 0.0:
            ref = _reference_at(batch, self.reference, scored, "grpo")
            kl = token_kl(logp, ref, "k3")
            per_token = per_token + self.beta * kl

        if self.loss_type in TOKEN_MEAN_LOSSES:
            loss_sum = per_token.sum()
            units = lengths.sum()
        else:
            seq_sums = torch.zeros(B, device=per_token.device, dtype=per_token.dtype).index_add(0, rows, per_token)
            denom = float(self.max_completion_length) if self.loss_type == "dr_grpo" else lengths.clamp(min=1).float()
            loss_sum = (seq_sums / denom).sum()
            units = _seq_has_tokens(scored).sum()

        n_tokens = lengths.sum().clamp(min=1).float()
        weight = units.float() / n_tokens  # token sums -> micro-batch token means x this batch's units

        def stat(x: torch.Tensor) -> torch.Tensor:
            return x.detach().float().sum() * weight

        def clip_stat(x: torch.Tensor) -> torch.Tensor:  # a share of sequences under GSPO (TRL's), else of tokens
            return x.float().sum() * units.float() / B if sequence else stat(x)

        r, a = (seq_ratio, seq_adv) if sequence else (ratio, adv)
        metrics = {"entropy": stat(entropy)}
        if self.loss_type == "cispo":
            metrics["cispo_clip_ratio"] = clip_stat((r > self.epsilon_high) & (a > 0))
        elif self.loss_type != "sapo":  # a soft gate clips nothing
            low = (r < 1 - self.epsilon_low) & (a < 0)
            high = (r > 1 + self.epsilon_high) & (a > 0)
            metrics |= {"clip_ratio/low_mean": clip_stat(low), "clip_ratio/high_mean": clip_stat(high),
                        "clip_ratio/region_mean": clip_stat(low | high)}
        if kl is not None:
            metrics["kl"] = stat(kl)
        return LossOut(loss_sum, metrics)


# ---- RLOO ---------------------------------------------------------------------------------------------------


def leave_one_out_advantages(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    """RLOO's advantages (G*P,) of rewards (G*P,) laid out as P consecutive groups of `group_size` samples of one
    prompt: each reward minus the mean of the other group_size - 1 (Kool et al. 2019; Ahmadian et al. 2024), an
    unbiased baseline because it does not hold the sample's own reward."""
    grouped = _grouped(rewards, group_size)  # (P, G)
    baseline = (grouped.sum(-1, keepdim=True) - grouped) / (group_size - 1)
    return (grouped - baseline).reshape(-1)


def sequence_kl(batch: Batch) -> torch.Tensor:
    """(B,) each sequence's sum over its completion of old_logps - ref_logps: the k1 estimate of KL(sampler || ref)
    that RLOO takes off the reward, scaled by beta, before the baseline (TRL's RLOOTrainer)."""
    scored = scored_mask(batch)
    kl = token_kl(_extra(batch, "old_logps", "rloo"), _extra(batch, "ref_logps", "rloo"))  # k1
    return torch.where(scored, kl, 0.0).sum(-1)


@dataclass
class RLOOLoss:
    """RLOO's clipped surrogate on a rollout micro-batch, with one importance ratio per sequence (TRL's RLOOTrainer).

    Per sequence: r = exp(sum of its completion's logp - sum of its old_logp), loss -min(r A, clip(r, 1 - eps_low,
    1 + eps_high) A), averaged over every sequence (the unit: a sequence). The KL to the reference is not here: it
    is taken off each sequence's reward before the baseline (`sequence_kl`). Metrics (TRL's names): entropy, a
    completion-token mean weighted by the micro-batch's sequences; the clip shares, sums over sequences.
    """

    epsilon_low: float = 0.2
    epsilon_high: float = 0.2
    temperature: float = 1.0
    """The sampler's: the policy's logits are divided by it."""

    def __post_init__(self) -> None:
        if not (0 <= self.epsilon_low < 1 and self.epsilon_high >= 0):
            raise ValueError(f"clip range must satisfy 0 <= epsilon_low < 1 and epsilon_high >= 0, got "
                             f"{self.epsilon_low}, {self.epsilon_high}")
        if self.temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")

    def count(self, batch: Batch) -> torch.Tensor:
        return torch.tensor(batch.targets.shape[0], device=batch.targets.device)

    def __call__(self, model: nn.Module, batch: Batch) -> LossOut:
        scored = scored_mask(batch)  # (B, T)
        rows = scored.nonzero()[:, 0]  # (N,)
        logits = model(batch.inputs, logits_at=scored, **batch.model_kwargs)  # (N, V)
        logp, entropy = logps_and_entropy(logits, batch.targets[scored], self.temperature)  # (N,), (N,)
        B = scored.shape[0]
        seq_logp = torch.zeros(B, device=logp.device, dtype=logp.dtype).index_add(0, rows, logp)  # (B,)
        seq_old = torch.where(scored, _extra(batch, "old_logps", "rloo"), 0.0).sum(-1)  # (B,)
        adv = _extra(batch, "advantages", "rloo")
        if adv.shape != (B,):
            raise ValueError(f"rloo advantages must be one per sequence ({B},), got {tuple(adv.shape)}")
        ratio = torch.exp(seq_logp - seq_old)
        clipped = torch.clamp(ratio, 1 - self.epsilon_low, 1 + self.epsilon_high)
        per_seq = -torch.min(ratio * adv, clipped * adv)  # (B,)
        low = (ratio < 1 - self.epsilon_low) & (adv < 0)
        high = (ratio > 1 + self.epsilon_high) & (adv > 0)
        weight = B / scored.sum().clamp(min=1).float()  # a token mean, times this batch's sequences
        metrics = {"entropy": entropy.detach().float().sum() * weight, "clip_ratio/low_mean": low.float().sum(),
                   "clip_ratio/high_mean": high.float().sum(), "clip_ratio/region_mean": (low | high).float().sum()}
        return LossOut(per_seq.sum(), metrics)


# ---- PPO: rewards, advantages, KL coefficient --------------------------------------------------------------


def kl_penalized_rewards(logps: torch.Tensor, ref_logps: torch.Tensor, scores: torch.Tensor, mask: torch.Tensor,
                         kl_coef: float, estimator: Literal["k1", "k3"] = "k1") -> tuple[torch.Tensor, torch.Tensor]:
    """(rewards, kl), both (B, T) and 0 outside `mask`: -kl_coef * kl per completion token, plus each sequence's
    score (B,) on its last completion token (Ziegler et al. 2019; Stiennon et al. 2020).

    kl is `token_kl`'s estimate of log pi/ref per token, k1 or k3.
    """
    m = mask.float()
    kl = token_kl(logps.float() * m, ref_logps.float() * m, estimator)  # 0 outside the mask: no penalty there
    rewards = -kl_coef * kl
    last = last_positions(mask)  # (B,)
    score = torch.where(mask.any(-1), scores.float(), 0.0)  # a row without completion tokens has nowhere to score
    rewards = rewards.scatter_add(1, last[:, None], score[:, None])
    return rewards * m, kl * m


@torch.no_grad()
def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float = 1.0, lam: float = 0.95
        ) -> tuple[torch.Tensor, torch.Tensor]:
    """(advantages, returns), (B, T) and 0 outside `mask`: generalised advantage estimation (Schulman et al.
    2016) over each row's completion tokens, the episode ending after its last one (next value 0).

    delta_t = r_t + gamma V_{t+1} - V_t; A_t = delta_t + gamma lam A_{t+1}; returns = A + V. A position whose
    successor is outside the mask ends its episode, so the prompt and the padding never leak into it.
    """
    m = mask.float()
    r, v = rewards.float() * m, values.float() * m
    B, T = r.shape
    adv = torch.zeros_like(r)
    last = torch.zeros(B, device=r.device)
    for t in reversed(range(T)):
        cont = m[:, t + 1] if t + 1 < T else torch.zeros(B, device=r.device)  # 1 where the episode goes on
        next_v = v[:, t + 1] * cont if t + 1 < T else 0.0
        delta = r[:, t] + gamma * next_v - v[:, t]
        last = delta + gamma * lam * last * cont
        adv[:, t] = last
    adv = adv * m
    return adv, (adv + v) * m


@torch.no_grad()
def whiten(values: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True, distributed: bool = False
           ) -> torch.Tensor:
    """(values - mean) / sqrt(var + 1e-8) over the masked entries (unbiased variance), 0 outside the mask; with
    shift_mean=False the mean is added back (only the scale changes). TRL's `masked_whiten`.

    distributed: the mean and variance are those of every rank's entries (two all-reduces), so N ranks
    whiten as one process holding the whole rollout batch would (TRL whitens each rank's alone)."""
    m = mask.float()
    x = values.float()

    def total(t: torch.Tensor) -> torch.Tensor:
        t = t.double()
        if distributed:
            dist.all_reduce(t)
        return t

    n = total(m.sum())
    if n < 2:
        raise ValueError(f"whitening needs at least 2 completion tokens, got {int(n)}: use a larger rollout batch")
    mean = (total((x * m).sum()) / n).float()
    var = (total((((x - mean) ** 2) * m).sum()) / n * (n / (n - 1))).float()
    out = (x - mean) * torch.rsqrt(var + 1e-8)
    if not shift_mean:
        out = out + mean
    return out * m


@torch.no_grad()
def explained_variance(values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor, distributed: bool = False
                       ) -> torch.Tensor:
    """1 - Var[R - V] / Var[R] over the masked tokens (population variances, as OpenAI baselines and CleanRL log
    it): 1 for a value function that predicts the returns, 0 for a constant one, below 0 for a worse one;
    NaN when the returns do not vary. distributed: over every rank's tokens (one all-reduce of their moments,
    in float64)."""
    m = mask.bool()
    r, e = returns.double()[m], (returns.double() - values.double())[m]
    moments = torch.stack([torch.tensor(float(m.sum()), dtype=torch.float64, device=r.device),
                           r.sum(), (r * r).sum(), e.sum(), (e * e).sum()])
    if distributed:
        dist.all_reduce(moments)
    n, r1, r2, e1, e2 = moments / moments[0].clamp(min=1)
    var_r, var_e = r2 - r1 * r1, e2 - e1 * e1
    return torch.where(var_r > 0, 1 - var_e / var_r, float("nan")).float()


class FixedKLController:
    """A constant KL coefficient."""

    def __init__(self, kl_coef: float) -> None:
        self.value = float(kl_coef)

    def update(self, current: float, n_steps: int) -> None:
        pass

    def state_dict(self) -> dict:
        return {"value": self.value}

    def load_state_dict(self, state: dict) -> None:
        self.value = float(state["value"])


class AdaptiveKLController(FixedKLController):
    """The KL coefficient of Ziegler et al. 2019 (section 2.2; lm-human-preferences' train_policy.py): a
    proportional controller that steers the measured KL towards `target`,
    e = clip(KL / target - 1, -0.2, 0.2), beta <- beta * (1 + e * n_steps / horizon),
    n_steps being the samples (episodes) of the rollout batch the KL was measured on."""

    def __init__(self, init_kl_coef: float, target: float, horizon: int) -> None:
        if target <= 0 or horizon <= 0:
            raise ValueError(f"adaptive KL needs target > 0 and horizon > 0, got {target}, {horizon}")
        super().__init__(init_kl_coef)
        self.target, self.horizon = float(target), int(horizon)

    def update(self, current: float, n_steps: int) -> None:
        error = min(max(current / self.target - 1, -0.2), 0.2)
        self.value *= 1 + error * n_steps / self.horizon


# ---- PPO: the actor-critic and its loss --------------------------------------------------------------------


class ActorCritic(nn.Module):
    """The policy (a `Transformer`) and its value function as one module, so that DDP wraps one module.

    The value function is a `ScalarHead` on the policy's final hidden states (shared, `value_model=None`), or a
    separate decoder with its own head (a `RewardModel`, e.g. `temper reward`'s export, as TRL initialises
    its value model). Parameters are named policy.* and value.*.

    forward(tokens (B, T), logits_at (B, T) bool, **model kwargs) -> (logits (N, V), values (N,) float32) at
    the N True positions, in row-major order; with policy_only=True, the policy's own output alone (`Actor`).
    """

    def __init__(self, policy: nn.Module, value_model: RewardModel | None = None) -> None:
        super().__init__()
        self.policy = policy
        self.value = ScalarHead(policy.cfg.dim) if value_model is None else value_model

    @property
    def shared(self) -> bool:
        return isinstance(self.value, ScalarHead)

    # What training code reads off a decoder is the policy's; the blocks are the policy's (activation
    # checkpointing and compile act on them; a separate value decoder runs plain).
    @property
    def cfg(self):
        return self.policy.cfg

    @property
    def layers(self) -> nn.ModuleList:
        return self.policy.layers

    def num_params(self) -> int:
        return self.policy.num_params() + sum(p.numel() for p in self.value.parameters())

    def flops_per_token(self, seq_len: int) -> float:
        """The policy's, plus the separate value decoder's (without its unused language-model head)."""
        extra = 6 * self.cfg.dim if self.shared else self.value.flops_per_token(seq_len)
        return self.policy.flops_per_token(seq_len) + extra

    def forward(self, tokens: torch.Tensor, *, logits_at: torch.Tensor | None = None, policy_only: bool = False,
                **kwargs) -> tuple[torch.Tensor, torch.Tensor] | torch.Tensor:
        if policy_only:
            return self.policy(tokens, logits_at=logits_at, **kwargs)
        hidden = self.policy(tokens, logits_at=logits_at, hidden_only=True, **kwargs)  # (N, C)
        logits = self.policy.logits(hidden)  # (N, V)
        if self.shared:
            return logits, self.value(hidden).float()
        value_hidden = self.value.backbone(tokens, logits_at=logits_at, hidden_only=True, **kwargs)  # (N, C)
        return logits, self.value.head(value_hidden).float()


class Actor(nn.Module):
    """An `ActorCritic`'s policy as a model of its own, called through the `ActorCritic` (`policy_only`): what
    samples rollouts, scores their log-probs and, with its adapters off, is the LoRA reference. Calling the
    policy directly would skip the hooks a sharded layout puts on the whole module (FSDP2's root gathers the
    embeddings, the final norm and the output layer)."""

    def __init__(self, actor_critic: ActorCritic) -> None:
        super().__init__()
        self.actor_critic = actor_critic

    @property
    def cfg(self):
        return self.actor_critic.policy.cfg

    def new_cache(self, *args, **kwargs):
        return self.actor_critic.policy.new_cache(*args, **kwargs)

    def forward(self, tokens: torch.Tensor, **kwargs) -> torch.Tensor:
        return self.actor_critic(tokens, policy_only=True, **kwargs)


@dataclass
class PPOLoss:
    """PPO's clipped objective on an `ActorCritic` (Schulman et al. 2017; Ziegler et al. 2019), per completion token:

    policy  max(-A r, -A clip(r, 1 - cliprange, 1 + cliprange)), r = exp(logp - old_logp);
    value   0.5 * max((v - R)^2, (clip(v, v_old - cliprange_value, v_old + cliprange_value) - R)^2);
    loss = policy + vf_coef * value, averaged over the completion tokens of the global batch (unit: a token).
    `extra` carries old_logps, advantages (whitened), returns and old_values, all (B, T). Metrics under TRL's names.
    """

    cliprange: float = 0.2
    cliprange_value: float = 0.2
    vf_coef: float = 0.1
    temperature: float = 1.0

    def __post_init__(self) -> None:
        if self.cliprange <= 0 or self.cliprange_value <= 0 or self.vf_coef < 0 or self.temperature <= 0:
            raise ValueError(f"ppo needs cliprange > 0, cliprange_value > 0, vf_coef >= 0 and temperature > 0, got "
                             f"{self.cliprange}, {self.cliprange_value}, {self.vf_coef}, {self.temperature}")

    def count(self, batch: Batch) -> torch.Tensor:
        return scored_mask(batch).sum()

    def __call__(self, model: nn.Module, batch: Batch) -> LossOut:
        scored = scored_mask(batch)
        logits, values = model(batch.inputs, logits_at=scored, **batch.model_kwargs)  # (N, V), (N,)
        logp, entropy = logps_and_entropy(logits, batch.targets[scored], self.temperature)
        old, adv = _extra(batch, "old_logps", "ppo")[scored], _extra(batch, "advantages", "ppo")[scored]
        returns, old_values = _extra(batch, "returns", "ppo")[scored], _extra(batch, "old_values", "ppo")[scored]

        v_clipped = torch.clamp(values, old_values - self.cliprange_value, old_values + self.cliprange_value)
        vf1, vf2 = (values - returns) ** 2, (v_clipped - returns) ** 2
        vf_loss = 0.5 * torch.max(vf1, vf2)  # (N,)
        diff = logp - old
        ratio = torch.exp(diff)
        pg1 = -adv * ratio
        pg2 = -adv * torch.clamp(ratio, 1 - self.cliprange, 1 + self.cliprange)
        pg_loss = torch.max(pg1, pg2)  # (N,)
        loss_sum = (pg_loss + self.vf_coef * vf_loss).sum()

        def total(x: torch.Tensor) -> torch.Tensor:
            return x.detach().float().sum()

        return LossOut(loss_sum, {
            "policy/approxkl_avg": total(0.5 * diff**2), "policy/clipfrac_avg": total(pg2 > pg1),
            "loss/policy_avg": total(pg_loss), "loss/value_avg": total(vf_loss), "val/clipfrac_avg": total(vf2 > vf1),
            "policy/entropy_avg": total(entropy), "val/ratio": total(ratio),
        })
