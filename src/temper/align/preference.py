"""Objectives on preferences: the Bradley-Terry reward loss, DPO and its family, and KTO.

A batch of P pairs is 2P rows, the P chosen responses first and then the P rejected ones in the same
order (TRL's layout, `data.prefs` collates it); targets are IGNORE_INDEX outside the responses, so a
row's summed target log-probability is log pi(response | prompt). A shared-prompt batch
(`data.prefs.collate_pairs_shared`, made a `Batch` by `as_batch`) holds one row per pair instead, its
prompt once and both responses behind it, and maps each scored position to its sequence
(`extra["seq"]`): `response_logprobs` returns the same (2P,) sequences in the same order either way, so
every loss below runs unchanged on both layouts. Each objective is a `train.losses`
`Loss`: its unit is the pair, `train_step` divides the summed per-pair losses by the global number of
pairs, and its metrics are sums over pairs that are logged as means, under TRL's names.

DPO-family losses, with pi_c, pi_r the policy's summed log-probs, ref_c, ref_r the reference's, n_c,
n_r the response lengths, and z the scaled margin:
- `sigmoid`  DPO (Rafailov et al. 2023): z = beta * ((pi_c - ref_c) - (pi_r - ref_r)); -log sigmoid(z).
             With `label_smoothing` e > 0, conservative DPO: -(1 - e) log sigmoid(z) - e log sigmoid(-z).
- `ipo`      IPO (Azar et al. 2023), on per-token log-ratios as TRL and the authors compute it:
             ((pi_c - ref_c) / n_c - (pi_r - ref_r) / n_r - 1 / (2 beta))^2.
- `simpo`    SimPO (Meng et al. 2024), reference-free and length-normalised:
             z = beta * (pi_c / n_c - pi_r / n_r) - gamma; the sigmoid loss of z (label smoothing as above).
- `orpo`     ORPO (Hong et al. 2024), reference-free, on top of the chosen response's SFT loss: with
             a = pi / n (mean token log-prob), -a_c - beta * log sigmoid(log odds(a_c) - log odds(a_r)),
             log odds(a) = a - log(1 - exp(a)).
The others of TRL's DPOTrainer `loss_type`, each on the log-ratios c = pi_c - ref_c, r = pi_r - ref_r, with
z = beta * (c - r) and e the label smoothing: `hinge` (SLiC, Zhao et al. 2023) relu(1 - z); `robust` (Chowdhury
et al. 2024) the unbiased loss under flipped labels, ((1 - e)(-log sigmoid(z)) - e(-log sigmoid(-z))) / (1 - 2e);
`exo_pair` (Ji et al. 2024) KL(softmax of the pair's z || (1 - e, e)); `nca_pair` (Chen et al. 2024)
-log sigmoid(beta c) - (log sigmoid(-beta c) + log sigmoid(-beta r)) / 2; `bco_pair` (Jung et al. 2024)
-log sigmoid(beta c) - log sigmoid(-beta r); `sppo_hard` (Wu et al. 2024) (c - 1 / (2 beta))^2 + (r + 1 / (2 beta))^2;
`apo_zero` and `apo_down` (D'Oosterlinck et al. 2024) 1 - sigmoid(beta c) + sigmoid(beta r) and
sigmoid(beta c) + 1 - sigmoid(z); `discopop` (Chris Lu et al. 2024) with m = sigmoid(z / tau),
(1 - m)(-log sigmoid(z)) + m exp(-z); `sigmoid_norm`, DPO on per-token log-ratios,
-log sigmoid(beta (c / n_c - r / n_r)).
`KTOLoss` is the unpaired objective (KTO): each response alone, labelled desirable or undesirable.
The reference log-probs come from the batch (`extra["ref_logps"]`, precomputed once) or from a
`reference` function: a frozen copy of the base (`frozen_reference`), or, under LoRA, the policy's own
weights with the adapters off (`adapters_off_reference`: no second copy of the model).

It does not build batches (data/prefs.py), run the optimizer (train/step.py) or own the models' heads
(model/heads.py).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from temper.model.attention import Segments
from temper.model.lora import adapters_disabled
from temper.train.losses import IGNORE_INDEX, Batch, LossOut, token_logprobs

PREFERENCE_LOSSES = ("sigmoid", "ipo", "simpo", "orpo", "hinge", "robust", "exo_pair", "nca_pair", "bco_pair",
                     "sppo_hard", "apo_zero", "apo_down", "discopop", "sigmoid_norm")
REFERENCE_FREE = ("simpo", "orpo")

Reference = Callable[[Batch], torch.Tensor]
"""batch -> (2P,) summed log-probs of every row's targets under the reference policy, without gradient."""


def pairs(batch: Batch) -> int:
    seqs = sequences(batch)
    if seqs % 2:
        raise ValueError(f"a preference batch holds the chosen and rejected sequences of P pairs (2P rows), "
                         f"got {seqs} rows")
    return seqs // 2


def sequences(batch: Batch) -> int:
    """The batch's scored sequences: one per row, or, in a shared-prompt batch (`as_batch` of
    `data.prefs.collate_pairs_shared`), as many as its `extra["response_tokens"]` counts."""
    counts = batch.extra.get("response_tokens")
    return batch.inputs.shape[0] if counts is None else counts.shape[0]


def as_batch(b, device: torch.device | str, extra: dict | None = None) -> Batch:
    """A `data.prefs.PrefBatch` as the losses' `Batch` on `device`. A shared-prompt batch (one row per
    pair, `collate_pairs_shared`) brings its positions and `Segments` as model arguments, and the
    position -> sequence map (`extra["seq"]`) and per-sequence response lengths that `response_logprobs`
    sums by."""
    extra = dict(extra or {})
    kwargs = {}
    if b.seq is not None:
        kwargs = {"positions": b.positions.to(device), "segments": Segments(b.segment_ids.to(device), shared_prefix=True)}
        extra |= {"seq": b.seq.to(device), "response_tokens": b.response_tokens.to(device)}
    return Batch(b.inputs.to(device), b.targets.to(device), kwargs, extra)


def response_logprobs(model: nn.Module, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
    """(summed log-probs (S,) with gradient, response lengths (S,)) of every sequence's targets: one
    sequence per row, or by `extra["seq"]` (a shared-prompt batch: each row holds a prompt and
    several responses), in the same (S,) order either way.

    The output layer runs only at the response positions (`logits_at`): prompts and padding, often
    most of a preference batch, never become (T x V) logits."""
    scored = batch.targets != IGNORE_INDEX  # (R, T)
    logits = model(batch.inputs, logits_at=scored, **batch.model_kwargs)  # (N, V), row-major
    picked = token_logprobs(logits, batch.targets[scored])  # (N,)
    seq = batch.extra.get("seq")
    if seq is None:
        index, lengths = scored.nonzero()[:, 0], scored.sum(-1)  # the row of each scored position
    else:
        index, lengths = seq[scored], batch.extra["response_tokens"]
    logps = torch.zeros(lengths.shape[0], device=picked.device, dtype=picked.dtype).index_add(0, index, picked)
    return logps, lengths


def halves(batch: Batch) -> tuple[Batch, Batch]:
    """The first and the second half of a batch's rows, holding the first and the second half of its
    sequences (KTO: examples, then KL rows), as two batches, each with its own model arguments and
    sequence map."""
    h = batch.inputs.shape[0] // 2
    kw = batch.model_kwargs
    parts = []
    for rows in (slice(None, h), slice(h, None)):
        kwargs = dict(kw)
        if "positions" in kw:
            kwargs["positions"] = kw["positions"][rows]
        if "segments" in kw:
            kwargs["segments"] = Segments(kw["segments"].ids[rows], kw["segments"].shared_prefix)
        parts.append(Batch(batch.inputs[rows], batch.targets[rows], kwargs))
    if "seq" in batch.extra:  # the second half's sequences are numbered from 0 again
        n, seq, counts = sequences(batch) // 2, batch.extra["seq"], batch.extra["response_tokens"]
        parts[0].extra |= {"seq": seq[:h], "response_tokens": counts[:n]}
        parts[1].extra |= {"seq": torch.where(seq[h:] >= 0, seq[h:] - n, -1), "response_tokens": counts[n:]}
    return parts[0], parts[1]


def frozen_reference(reference_model: nn.Module) -> Reference:
    """The reference policy as a separate frozen model (full fine-tuning: a copy of the starting weights)."""
    reference_model.requires_grad_(False)

    @torch.no_grad()
    def reference(batch: Batch) -> torch.Tensor:
        return response_logprobs(reference_model, batch)[0]

    return reference


def adapters_off_reference(model: nn.Module) -> Reference:
    """The reference policy of a LoRA run: the policy's own model with every adapter switched off."""

    @torch.no_grad()
    def reference(batch: Batch) -> torch.Tensor:
        with adapters_disabled(model):
            return response_logprobs(model, batch)[0]

    return reference


def _sigmoid_loss(z: torch.Tensor, label_smoothing: float) -> torch.Tensor:
    """-(1 - e) log sigmoid(z) - e log sigmoid(-z): the logistic loss, with the labels flipped at rate e."""
    return -(1 - label_smoothing) * F.logsigmoid(z) - label_smoothing * F.logsigmoid(-z)


def _log1mexp(a: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(a)) for a < 0, accurate at both ends (Maechler 2012): log(-expm1(a)) near 0,
    log1p(-exp(a)) below -log 2."""
    return torch.where(a > -0.6931471805599453, torch.log(-torch.expm1(a)), torch.log1p(-torch.exp(a)))


@dataclass
class PreferenceLoss:
    """DPO and its family on a batch of pairs; see the module docstring for each `kind`."""

    kind: Literal["sigmoid", "ipo", "simpo", "orpo", "hinge", "robust", "exo_pair", "nca_pair", "bco_pair",
                  "sppo_hard", "apo_zero", "apo_down", "discopop", "sigmoid_norm"] = "sigmoid"
    beta: float = 0.1
    """DPO's inverse temperature of the implicit reward; ORPO's weight of the odds-ratio term."""
    label_smoothing: float = 0.0
    """Probability that a pair's label is flipped (conservative DPO: sigmoid and simpo; robust; exo_pair's epsilon)."""
    simpo_gamma: float = 0.5
    """SimPO's target reward margin."""
    discopop_tau: float = 0.05
    """DiscoPOP's temperature of the mix between its logistic and exponential losses."""
    reference: Reference | None = None
    """Where the reference log-probs come from when the batch does not carry them (`extra["ref_logps"]`)."""

    def __post_init__(self) -> None:
        if self.kind not in PREFERENCE_LOSSES:
            raise ValueError(f"unknown preference loss {self.kind!r}; choose one of {PREFERENCE_LOSSES}")
        if self.beta <= 0:
            raise ValueError(f"beta must be > 0, got {self.beta}")
        if not 0.0 <= self.label_smoothing < 0.5:
            raise ValueError(f"label_smoothing must be in [0, 0.5), got {self.label_smoothing}")
        if self.kind == "exo_pair" and self.label_smoothing <= 0:
            raise ValueError("exo_pair needs label_smoothing > 0 (EXO's epsilon, the target's weight on the rejected "
                             "response; 1e-3 in the paper)")
        if self.discopop_tau <= 0:
            raise ValueError(f"discopop_tau must be > 0, got {self.discopop_tau}")

    def count(self, batch: Batch) -> torch.Tensor:
        return torch.tensor(pairs(batch))  # on the host: `train_step` copies it without a stream sync

    def reference_logps(self, batch: Batch) -> torch.Tensor:
        if "ref_logps" in batch.extra:
            return batch.extra["ref_logps"].float()
        if self.reference is None:
            raise ValueError(f"{self.kind} needs reference log-probs: give the loss a reference, or the batch "
                             "extra['ref_logps']")
        return self.reference(batch).float()

    def __call__(self, model: nn.Module, batch: Batch) -> LossOut:
        P = pairs(batch)
        logps, lengths = response_logprobs(model, batch)  # (2P,), (2P,)
        n = lengths.clamp(min=1).float()
        b = self.beta
        if self.kind in REFERENCE_FREE:
            avg = logps / n  # (2P,) mean token log-prob
            avg_c, avg_r = avg[:P], avg[P:]
            shown_c, shown_r = avg_c, avg_r  # TRL's CPO / ORPO log these, and rewards = beta * them
            rewards_c, rewards_r = b * avg_c.detach(), b * avg_r.detach()
            metrics = {}
            if self.kind == "simpo":
                losses = _sigmoid_loss(b * (avg_c - avg_r) - self.simpo_gamma, self.label_smoothing)
            else:
                log_odds = (avg_c - avg_r) - (_log1mexp(avg_c) - _log1mexp(avg_r))
                ratio = F.logsigmoid(log_odds)
                nll = -avg_c
                losses = nll - b * ratio
                metrics = {"nll_loss": nll.detach().sum(), "log_odds_ratio": ratio.detach().sum(),
                           "log_odds_chosen": log_odds.detach().sum()}
        else:
            ref = self.reference_logps(batch)  # (2P,)
            ratio = logps - ref  # (2P,) log pi / pi_ref of each response
            ratio_c, ratio_r = ratio[:P], ratio[P:]
            losses = self._pair_losses(ratio_c, ratio_r, n[:P], n[P:])
            shown_c, shown_r = logps[:P], logps[P:]
            rewards_c, rewards_r = b * ratio_c.detach(), b * ratio_r.detach()
            metrics = {}
        metrics |= {
            "rewards/chosen": rewards_c.sum(), "rewards/rejected": rewards_r.sum(),
            "rewards/accuracies": (rewards_c > rewards_r).float().sum(),
            "rewards/margins": (rewards_c - rewards_r).sum(),
            "logps/chosen": shown_c.detach().sum(), "logps/rejected": shown_r.detach().sum(),
        }
        return LossOut(losses.sum(), metrics)


    def _pair_losses(self, c: torch.Tensor, r: torch.Tensor, n_c: torch.Tensor, n_r: torch.Tensor) -> torch.Tensor:
        """(P,) the losses of the kinds with a reference, from the log-ratios c, r (module docstring)."""
        b, e, kind = self.beta, self.label_smoothing, self.kind
        z = b * (c - r)
        if kind == "sigmoid":
            return _sigmoid_loss(z, e)
        if kind == "ipo":
            return ((c / n_c - r / n_r) - 1 / (2 * b)) ** 2
        if kind == "hinge":
            return torch.relu(1 - z)
        if kind == "robust":
            return (-(1 - e) * F.logsigmoid(z) + e * F.logsigmoid(-z)) / (1 - 2 * e)
        if kind == "exo_pair":
            return (torch.sigmoid(z) * (F.logsigmoid(z) - math.log1p(-e))
                    + torch.sigmoid(-z) * (F.logsigmoid(-z) - math.log(e)))
        if kind == "nca_pair":
            return -F.logsigmoid(b * c) - 0.5 * F.logsigmoid(-b * c) - 0.5 * F.logsigmoid(-b * r)
        if kind == "bco_pair":
            return -F.logsigmoid(b * c) - F.logsigmoid(-b * r)
        if kind == "sppo_hard":
            return (c - 0.5 / b) ** 2 + (r + 0.5 / b) ** 2
        if kind == "apo_zero":
            return 1 - torch.sigmoid(b * c) + torch.sigmoid(b * r)
        if kind == "apo_down":
            return torch.sigmoid(b * c) + 1 - torch.sigmoid(z)
        if kind == "discopop":
            m = torch.sigmoid(z / self.discopop_tau)
            return -F.logsigmoid(z) * (1 - m) + torch.exp(-z) * m
        return -F.logsigmoid(b * (c / n_c - r / n_r))  # sigmoid_norm


@dataclass
class KTOLoss:
    """KTO (Ethayarajh et al. 2024) on unpaired examples, each a response labelled desirable or not.

    A batch holds n example rows and then n KL rows: each example's prompt with another example's
    response (TRL's mismatched pairs), whose policy / reference log-ratio, averaged, estimates the KL
    term z = max(0, mean(log pi(y'|x) - log ref(y'|x))), held constant. With r = log pi(y|x) - log ref(y|x):
    a desirable response costs w_D * (1 - sigmoid(beta (r - z))), an undesirable one
    w_U * (1 - sigmoid(beta (z - r))). `extra["label"]` (n,) bool marks the desirable; `extra["ref_logps"]`
    (2n,) may carry the reference's log-probs of all rows, precomputed.

    z is estimated per micro-batch, from its own KL rows (TRL averages those estimates over ranks), so
    unlike the other losses KTO's update depends a little on how a step is split into micro-batches.
    """

    beta: float = 0.1
    desirable_weight: float = 1.0
    undesirable_weight: float = 1.0
    reference: Reference | None = None

    def count(self, batch: Batch) -> torch.Tensor:
        return torch.tensor(pairs(batch))  # n examples (and n KL rows); on the host, as DPO's

    def __call__(self, model: nn.Module, batch: Batch) -> LossOut:
        n = pairs(batch)
        examples, kl_rows = halves(batch)
        logps, _ = response_logprobs(model, examples)  # (n,) with gradient
        with torch.no_grad():  # the KL rows only estimate a constant
            kl_logps, _ = response_logprobs(model, kl_rows)
        ref = batch.extra["ref_logps"].float() if "ref_logps" in batch.extra else None
        if ref is None:
            if self.reference is None:
                raise ValueError("kto needs reference log-probs: give the loss a reference, or the batch extra['ref_logps']")
            ref = self.reference(batch).float()
        kl = (kl_logps - ref[n:]).mean().clamp(min=0)
        ratio = logps - ref[:n]  # (n,)
        good = batch.extra["label"].bool()
        losses = torch.where(good, self.desirable_weight * (1 - torch.sigmoid(self.beta * (ratio - kl))),
                             self.undesirable_weight * (1 - torch.sigmoid(self.beta * (kl - ratio))))
        rewards = self.beta * ratio.detach()
        return LossOut(losses.sum(), {
            "kl": kl * n, "rewards/accuracies": ((rewards > 0) == good).float().sum(),
            "rewards/desirable": torch.where(good, rewards, 0.0).sum(),
            "rewards/undesirable": torch.where(good, 0.0, rewards).sum(),
        })


@dataclass
class RewardLoss:
    """Bradley-Terry loss of a reward model (`model.heads.RewardModel`) on pairs: -log sigmoid(r_c - r_r - m),
    with an optional per-pair margin m (`extra["margin"]`, as in Llama 2) and reward centering
    (Eisenstein et al. 2023): + coef * (r_c + r_r)^2, which keeps scores near zero without changing
    which response is preferred. The reward model reads each row at `extra["last"]`, its last real token."""

    center_coef: float = 0.0

    def count(self, batch: Batch) -> torch.Tensor:
        return torch.tensor(pairs(batch))  # on the host: `train_step` copies it without a stream sync

    def __call__(self, model: nn.Module, batch: Batch) -> LossOut:
        P = pairs(batch)
        scores = model(batch.inputs, last=batch.extra["last"], **batch.model_kwargs)  # (2P,)
        r_c, r_r = scores[:P], scores[P:]
        margin = batch.extra.get("margin")
        diff = r_c - r_r - (margin.float() if margin is not None else 0.0)
        losses = -F.logsigmoid(diff)
        if self.center_coef:
            losses = losses + self.center_coef * (r_c + r_r) ** 2
        gap = (r_c - r_r).detach()
        return LossOut(losses.sum(), {"accuracy": (gap > 0).float().sum(), "margin": gap.sum(),
                                      "rewards/chosen": r_c.detach().sum(), "rewards/rejected": r_r.detach().sum()})
