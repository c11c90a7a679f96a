"""Knowledge distillation: a student learns a teacher's next-token distributions, mixed with the hard labels.

`DistillLoss` is a `train.losses.Loss` over the valid target tokens (the unit of `LMLoss`): per
token, with student and teacher log-probs s and t at temperature T (both logits divided by T),

    loss = alpha * D(s, t) + (1 - alpha) * CE(student logits at T = 1, target)

where D is the generalised Jensen-Shannon divergence of GKD (Agarwal et al. 2024, eq. 1), exactly as
TRL's `GKDTrainer.generalized_jsd_loss` computes it: with the mixture m = (1 - beta) p_s + beta p_t,
JSD_beta = beta KL(p_t || m) + (1 - beta) KL(p_s || m); beta = 0 is defined as forward KL(p_t || p_s)
(the usual KD loss of Hinton et al. 2015: the student covers the teacher's mass) and beta = 1 as
reverse KL(p_s || p_t) (mode seeking, MiniLLM, Gu et al. 2024). `kind` forward_kl / reverse_kl are
these two ends; jsd takes beta in (0, 1). Like TRL (and unlike Hinton et al.), the divergence is not
multiplied by T^2: `alpha` sets the balance.

The teacher's distribution comes from one of two places:
- a frozen teacher model run under no_grad on the same batch (`teacher=`): every logit, exact;
- a cache of the teacher's top-k log-probs (`align.topk_cache`), carried by the batch as
  `extra["teacher_ids"]` and `extra["teacher_logps"]`, (N, k) for the batch's N valid targets in
  row-major order. Both distributions are then compared on those k ids only, each renormalised over
  them (the teacher's tempered log-probs log_softmax(logp_k / T), the student's log_softmax of its
  logits at the k ids / T). Renormalising both keeps D a divergence of two distributions on one
  support, which reverse KL and JSD need (the teacher's mass outside its top k is unknown), and the
  cache with k = V gives the on-the-fly loss exactly. The price: the student is not pushed off ids
  outside the teacher's top k by D; the hard-label term (alpha < 1) still trains the full softmax.

Memory: the loss never holds the (N x V) logits of either model for the backward pass. The student
returns its final hidden states (`hidden_only`), the teacher its own (no_grad), and the output
layers, softmaxes and divergence run `chunk` positions at a time under `torch.utils.checkpoint`: a
chunk's logits are freed after its forward and recomputed in the backward, so the graph keeps the
(N x C) hidden states plus one chunk's tensors at a time, and the gradient is the unchunked one. At
V = 128256 in float32 the unchunked loss kept 20 x V bytes per valid token from forward to backward
for forward KL (24 x V reverse KL, 40 x V JSD): 2.6 / 3.1 / 5.1 MB per token, 10-20 GB for a 4k-token
micro-batch, before the teacher's logits; now it keeps 0 bytes of logits per token (the hidden
states, C x 4 bytes, which the model computes anyway) and at most one chunk's ~20-40 x V x chunk
bytes at a time (`distill_chunk_tokens`: 523 positions at that vocabulary, about 1.3-2.7 GB). The
price: each chunk's output layers run twice (the head's matrix product of student and teacher is
recomputed in the backward).

It does not build batches or caches (recipes/distill.py, align/topk_cache.py) or run the optimizer.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from temper.train.losses import IGNORE_INDEX, Batch, LossOut
from temper.train.parallel import unwrap

DISTILL_KINDS = ("forward_kl", "reverse_kl", "jsd")
Kind = Literal["forward_kl", "reverse_kl", "jsd"]
CHUNK_BYTES = 256 * 2**20


def distill_chunk_tokens(vocab_size: int) -> int:
    """Positions per chunk of the loss: one float32 (chunk x V) tensor of at most 256 MiB (the chunk holds
    about 5-10 of them at once). Large enough that the output weight's gradient, a (V x C) product added
    once per chunk, stays a matrix-product cost rather than a memory-bound one."""
    return max(1, CHUNK_BYTES // (4 * vocab_size))


def generalized_jsd(student_logp: torch.Tensor, teacher_logp: torch.Tensor, beta: float) -> torch.Tensor:
    """Per-position generalised JSD (..., V) -> (...) of two log-prob tensors: forward KL(t || s) at beta 0,
    reverse KL(s || t) at beta 1, else beta KL(t || m) + (1 - beta) KL(s || m), m = (1 - beta) p_s + beta p_t
    (TRL's `generalized_jsd_loss`, term for term)."""
    if beta == 0:
        div = F.kl_div(student_logp, teacher_logp, reduction="none", log_target=True)
    elif beta == 1:
        div = F.kl_div(teacher_logp, student_logp, reduction="none", log_target=True)
    else:
        b = torch.tensor(beta, dtype=student_logp.dtype, device=student_logp.device)
        mixture = torch.logsumexp(torch.stack([student_logp + torch.log1p(-b), teacher_logp + torch.log(b)]), dim=0)
        div = (b * F.kl_div(mixture, teacher_logp, reduction="none", log_target=True)
               + (1 - b) * F.kl_div(mixture, student_logp, reduction="none", log_target=True))
    return div.sum(-1)


def topk_logprobs(student_logits: torch.Tensor, teacher_ids: torch.Tensor, teacher_logps: torch.Tensor,
                  temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(student, teacher) tempered log-probs (N, k) on the teacher's top-k ids, each renormalised over them.

    teacher_logps are the teacher's full-vocabulary log-probs at T = 1 (any additive constant per row
    cancels): dividing by T and renormalising over the k ids gives softmax(teacher logits / T) on them."""
    picked = student_logits.gather(-1, teacher_ids.long())  # (N, k)
    return (torch.log_softmax(picked.float() / temperature, dim=-1),
            torch.log_softmax(teacher_logps.float() / temperature, dim=-1))


@dataclass
class DistillLoss:
    """alpha * divergence to the teacher + (1 - alpha) * cross-entropy, summed over valid targets (module docstring)."""

    kind: Kind = "forward_kl"
    beta: float = 0.5
    """jsd only: the teacher's weight in the mixture (0 < beta < 1)."""
    temperature: float = 1.0
    """Both distributions are softened by dividing the logits by it."""
    alpha: float = 0.5
    """Weight of the divergence; 1 - alpha weighs the hard-label cross-entropy."""
    label_smoothing: float = 0.0
    """Of the hard-label cross-entropy."""
    teacher: nn.Module | None = None
    """The frozen teacher, run on every batch that does not carry cached top-k log-probs."""
    chunk: int = 0
    """Positions per chunk of the output layers and the loss (0: `distill_chunk_tokens` of the vocabulary)."""

    def __post_init__(self) -> None:
        if self.kind not in DISTILL_KINDS:
            raise ValueError(f"unknown distillation loss {self.kind!r}; choose one of {DISTILL_KINDS}")
        if self.kind == "jsd" and not 0 < self.beta < 1:
            raise ValueError(f"jsd needs 0 < beta < 1, got {self.beta} (beta 0 is forward_kl, 1 is reverse_kl)")
        if not self.temperature > 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")
        if not 0 <= self.alpha <= 1:
            raise ValueError(f"alpha must be in [0, 1], got {self.alpha}")
        if self.chunk < 0:
            raise ValueError(f"chunk must be >= 0 (0: from the vocabulary), got {self.chunk}")
        if self.teacher is not None:
            self.teacher.requires_grad_(False).eval()

    @property
    def effective_beta(self) -> float:
        return {"forward_kl": 0.0, "reverse_kl": 1.0}.get(self.kind, self.beta)

    @property
    def metric(self) -> str:
        """The divergence's name in the metrics: kl (forward or reverse) or jsd."""
        return "jsd" if self.kind == "jsd" else "kl"

    def count(self, batch: Batch) -> torch.Tensor:
        return (batch.targets != IGNORE_INDEX).sum()

    def teacher_hidden(self, batch: Batch, valid: torch.Tensor) -> torch.Tensor:
        """The teacher's final hidden states (N, C_t) at the valid positions, without gradient."""
        if self.teacher is None:
            raise ValueError("distillation needs the teacher: give the loss a teacher model, or the batch "
                             "extra['teacher_ids'] and extra['teacher_logps'] from a top-k cache")
        with torch.no_grad():
            return self.teacher(batch.inputs, logits_at=valid, hidden_only=True, **batch.model_kwargs)

    def _chunk(self, student: nn.Module, hidden: torch.Tensor, targets: torch.Tensor, teacher_hidden: torch.Tensor | None,
               ids: torch.Tensor | None, logps: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """(divergence sum, cross-entropy sum) of one chunk of positions, from the student's hidden states and
        the teacher's hidden states or its cached top-k."""
        logits = student.logits(hidden).float()  # (n, V)
        ce = F.cross_entropy(logits, targets, reduction="sum", label_smoothing=self.label_smoothing)
        T = self.temperature
        if ids is not None:
            s, t = topk_logprobs(logits, ids, logps, T)
        else:
            with torch.no_grad():
                teacher_logits = self.teacher.logits(teacher_hidden).float()  # (n, V)
            if teacher_logits.shape != logits.shape:
                raise ValueError(f"teacher logits {tuple(teacher_logits.shape)} and student logits "
                                 f"{tuple(logits.shape)} differ: the vocabularies must have one size")
            s, t = torch.log_softmax(logits / T, dim=-1), torch.log_softmax(teacher_logits / T, dim=-1)
        return generalized_jsd(s, t, self.effective_beta).sum(), ce

    def __call__(self, model: nn.Module, batch: Batch) -> LossOut:
        valid = batch.targets != IGNORE_INDEX  # (B, T)
        hidden = model(batch.inputs, logits_at=valid, hidden_only=True, **batch.model_kwargs)  # (N, C), through DDP
        student, targets, n = unwrap(model), batch.targets[valid], hidden.shape[0]
        ids = logps = teacher_hidden = None
        if "teacher_ids" in batch.extra:
            ids, logps = batch.extra["teacher_ids"], batch.extra["teacher_logps"]
            if ids.shape[0] != n:
                raise ValueError(f"the batch carries teacher top-k for {ids.shape[0]} positions but has "
                                 f"{n} valid targets")
        else:
            teacher_hidden = self.teacher_hidden(batch, valid)  # (N, C_t)
        chunk = self.chunk or distill_chunk_tokens(student.cfg.vocab_size)
        keep_graph = torch.is_grad_enabled() and hidden.requires_grad
        div = ce = torch.zeros((), device=hidden.device)
        for lo in range(0, max(n, 1), chunk):  # one empty chunk when no target is valid: a loss with a graph
            part = slice(lo, lo + chunk)
            args = (student, hidden[part], targets[part], None if teacher_hidden is None else teacher_hidden[part],
                    None if ids is None else ids[part], None if logps is None else logps[part])
            # Checkpointed: the chunk's logits are recomputed in the backward instead of kept (module docstring).
            d, c = checkpoint(self._chunk, *args, use_reentrant=False) if keep_graph else self._chunk(*args)
            div, ce = div + d, ce + c
        loss = self.alpha * div + (1 - self.alpha) * ce
        return LossOut(loss, {self.metric: div.detach(), "ce": ce.detach()})
