"""Rewards of whole responses: a trained reward model, or a rule that checks the answer.

A reward function maps (prompt messages, response text, the record's reference answer or None) to a
float. Best-of-n sampling ranks a prompt's candidates by it, and GRPO's verifiable rewards are rules
of the same form.

- `ModelReward`: a `model.heads.RewardModel` scoring the rendered conversation at its last token,
  through the reward model's own tokenizer and chat template (it need not share the policy's).
- `final_number`: 1.0 when the last number of the response equals the reference's (GSM8K's
  "#### 42", or any text whose last number is the answer), else 0.0: a verifiable reward for maths.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch

from temper.data.tokenizer import HFTokenizer
from temper.model.heads import RewardModel

Messages = Sequence[Mapping[str, Any]]
RewardFn = Callable[[Messages, str, str | None], float]

_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")


def last_number(text: str) -> float | None:
    """The last number written in `text` (thousands commas allowed: "1,234.5"), or None."""
    found = _NUMBER.findall(text)
    if not found:
        return None
    try:
        return float(found[-1].replace(",", ""))
    except ValueError:
        return None


def final_number(prompt: Messages, response: str, reference: str | None) -> float:
    """1.0 when the response's last number equals the reference's (within 1e-6), else 0.0."""
    if reference is None:
        raise ValueError("the final_number rule needs each record's reference answer (its 'answer' key)")
    want, got = last_number(reference), last_number(response)
    return float(want is not None and got is not None and abs(want - got) <= 1e-6 * max(1.0, abs(want)))


RULES: dict[str, RewardFn] = {"final_number": final_number}


class ModelReward:
    """The score a reward model gives the conversation prompt + response, read at its last token."""

    def __init__(self, model: RewardModel, tokenizer: HFTokenizer, device: torch.device | str = "cpu"):
        self.model, self.tokenizer, self.device = model.to(device).eval(), tokenizer, torch.device(device)

    @torch.no_grad()
    def __call__(self, prompt: Messages, response: str, reference: str | None = None) -> float:
        return self.score_many([(prompt, response)])[0]

    @torch.no_grad()
    def score_many(self, items: Sequence[tuple[Messages, str]]) -> list[float]:
        """Scores of several (prompt, response) conversations in one right-padded batch."""
        rows = [self.tokenizer.encode_chat([*p, {"role": "assistant", "content": r}], add_generation_prompt=False)
                for p, r in items]
        T = max(len(r) for r in rows)
        tokens = torch.zeros(len(rows), T, dtype=torch.long)
        for i, r in enumerate(rows):
            tokens[i, :len(r)] = torch.tensor(r)
        last = torch.tensor([len(r) - 1 for r in rows])
        return self.model(tokens.to(self.device), last=last.to(self.device)).tolist()
