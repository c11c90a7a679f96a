"""RL rollouts: sample n completions per prompt on the engine, with the log-probs of the sampled tokens.

The policy that samples is the model being trained (no copy per step): `infer.engine` puts it in eval
mode, prefills each prompt once and forks its cache row into n (`generate_with_logprobs`), and
returns, from that same pass, each sampled token's log-probability under softmax(logits / T), the
"old" log-probs PPO and GRPO's ratios divide by. A rollout ends on a stop token (kept: the policy
learns to stop), on a stop string (the tokens up to the one that completes it are kept; the text is
cut before it), or at `max_new_tokens` (truncated).

`collate_rollouts` lays rollouts out as a `train.losses.Batch` (align/rl.py's layout): inputs = row[:-1],
targets = row[1:] scored on the completion only, and per-token tensors (B, T) aligned with targets.
`logprob_mismatch` compares the engine's log-probs with a training-mode forward on the same tokens
(cached decode and a full forward run different kernels: they should agree to float error, and a
larger gap means the ratios are biased, so recipes log it).

It does not score completions (align/rewards.py) or compute advantages and losses (align/rl.py).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from temper.align.rl import token_logprobs_of
from temper.data.tokenizer import HFTokenizer
from temper.infer.engine import generate_with_logprobs
from temper.train.losses import IGNORE_INDEX, Batch


@dataclass
class RolloutConfig:
    n: int = 8
    """Completions sampled per prompt (GRPO's group size G)."""
    max_new_tokens: int = 128
    """Longest completion, in tokens."""
    temperature: float = 1.0
    """Sampling temperature (> 0); the policy's log-probs are taken at the same temperature."""
    top_p: float | None = None
    """Nucleus sampling (None: off)."""
    top_k: int | None = None
    """Top-k sampling (None: off)."""
    stop: list[str] = field(default_factory=list)
    """Stop strings (besides the tokenizer's end tokens): a completion ends once its text contains one."""

    def __post_init__(self) -> None:
        if self.n < 1 or self.max_new_tokens < 1:
            raise ValueError(f"n and max_new_tokens must be at least 1, got {self.n} and {self.max_new_tokens}")
        if not self.temperature > 0:
            raise ValueError(f"temperature must be > 0 for sampled rollouts, got {self.temperature}")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if any(not s for s in self.stop):
            raise ValueError("stop strings must be non-empty")


@dataclass
class Rollout:
    prompt: list[int]
    completion: list[int]
    """Sampled token ids, the final stop token included."""
    logprobs: list[float]
    """Each completion token's log-prob under the sampling policy (softmax(logits / temperature))."""
    text: str
    """The completion's text, special tokens skipped, cut before a stop string."""
    truncated: bool
    """True when it ran out of tokens (max_new_tokens) instead of stopping."""


def rollout(model: nn.Module, tokenizer: HFTokenizer, prompts: Sequence[Sequence[int]], cfg: RolloutConfig, *,
            seeds: Sequence[int], stop_ids: Sequence[int], greedy: bool = False, n: int | None = None
            ) -> list[Rollout]:
    """n (default cfg.n) rollouts of each prompt, prompt i's at i*n .. i*n + n - 1; `seeds` gives one per
    rollout (the engine's per-row seeds: a rollout depends on its seed only, not on what shares the
    batch). greedy: temperature 0 (evaluation), log-probs then under softmax(logits)."""
    n = cfg.n if n is None else n
    stops, ends = list(cfg.stop), set(stop_ids)
    tail = max((len(s) for s in stops), default=0) + 2  # tokens whose text can hold a stop string's end

    def should_stop(row: int, tokens: list[int]) -> bool:
        if tokens[-1] in ends:
            return True
        return bool(stops) and any(s in tokenizer.decode(tokens[-tail:], skip_special_tokens=True) for s in stops)

    completions, logprobs = generate_with_logprobs(
        model, prompts, max_new_tokens=cfg.max_new_tokens, temperature=0.0 if greedy else cfg.temperature,
        top_k=cfg.top_k, top_p=cfg.top_p, seed=list(seeds), should_stop=should_stop, num_samples=n)
    out = []
    for r, (ids, lps) in enumerate(zip(completions, logprobs, strict=True)):
        text = tokenizer.decode(ids, skip_special_tokens=True)
        cut = [text.index(s) for s in stops if s in text]
        stopped = bool(ids) and (ids[-1] in ends or bool(cut))
        out.append(Rollout(list(prompts[r // n]), ids, lps, text[:min(cut)] if cut else text, not stopped))
    return out


def collate_rollouts(rollouts: Sequence[Rollout], *, pad_id: int = 0, device: torch.device | str = "cpu",
                     **per_token: Sequence[Sequence[float]]) -> Batch:
    """B rollouts as one right-padded Batch; extra["old_logps"] (B, T) from the rollouts, and each of
    `per_token` (one sequence per rollout, one value per completion token) as a (B, T) tensor too.

    A rollout with an empty completion (a stop token can only be the first token when it is kept, so
    this is a zero-length sample) has no scored position and contributes nothing."""
    rows = [r.prompt + r.completion for r in rollouts]
    T = max(len(row) for row in rows) - 1
    inputs = torch.full((len(rows), T), pad_id, dtype=torch.long)
    targets = torch.full((len(rows), T), IGNORE_INDEX, dtype=torch.long)
    extra = {"old_logps": torch.zeros(len(rows), T)} | {k: torch.zeros(len(rows), T) for k in per_token}
    for i, (r, row) in enumerate(zip(rollouts, rows, strict=True)):
        inputs[i, :len(row) - 1] = torch.tensor(row[:-1])
        p, c = len(r.prompt), len(r.completion)
        if not c:
            continue
        targets[i, p - 1:p - 1 + c] = torch.tensor(r.completion)
        extra["old_logps"][i, p - 1:p - 1 + c] = torch.tensor(r.logprobs)
        for k, values in per_token.items():
            extra[k][i, p - 1:p - 1 + c] = torch.as_tensor(values[i], dtype=torch.float32)
    return Batch(inputs.to(device), targets.to(device), extra={k: v.to(device) for k, v in extra.items()})


def logprob_mismatch(model: nn.Module, batch: Batch, temperature: float) -> float:
    """Mean |log-prob from the rollout - log-prob of a training-mode forward| over the scored tokens."""
    scored = batch.targets != IGNORE_INDEX
    was = model.training
    model.train()
    try:
        with torch.no_grad():
            fresh = token_logprobs_of(model, batch, temperature)
    finally:
        model.train(was)
    return float((fresh - batch.extra["old_logps"]).abs()[scored].mean()) if scored.any() else 0.0
