"""`temper best-of-n`: sample n responses per prompt, score them, keep the best as SFT data (rejection sampling).

The rejection-sampling fine-tuning of the Llama 2 paper (Touvron et al. 2023, §3.2.3), and the data
step of expert iteration / STaR: what a policy does best, by a reward model or a rule, becomes the
next round's SFT data.

Steps:
 1. parse the config; read the prompts (JSON Lines or a JSON array: `prompt` text, or `messages` whose
    trailing assistant turn is dropped, or GSM8K's `question`; an optional reference `answer`), each bad
    record named by file:line and key; open the policy and the scorer (a reward model's checkpoint, or a
    rule such as `final_number`) before any sampling
 2. for each batch of prompts: render them with the policy's chat template, prefill each once and fork
    it into n rows (`infer.engine.generate(num_samples=n)`), sample with per-row seeds (row j of prompt
    i draws with seed + i * n + j, so a prompt's samples do not depend on the batch)
 3. score every candidate; keep the best one (`keep=best`, ties to the earliest) or every one scoring
    at least `threshold` (`keep=above`)
 4. write `out`: one JSON line per kept response, in the `messages` format `temper sft` reads, with the
    score, its rank among the prompt's n, and the prompt's index; a summary line on stdout (mean best
    and mean of all scores, prompts with nothing kept)
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch

from temper import config
from temper.align.rewards import NEEDS_ANSWER, RULES, ModelReward, Rewards
from temper.data.prompts import read_prompts
from temper.data.sources import RecordError
from temper.data.tokenizer import load_hf_tokenizer
from temper.files import atomic_write_text
from temper.infer.engine import generate
from temper.infer.load import load_for_inference
from temper.model.heads import load_reward_model


@dataclass
class ScorerConfig:
    model: str = ""
    """A reward model's checkpoint directory (`temper reward`'s final/, or any one-label *ForSequenceClassification)."""
    rule: Literal["", "gsm8k_strict", "gsm8k_flexible", "final_number", "exact_match", "think_format",
                  "hash_answer_format", "code_tests"] = ""
    """Or a rule of `align.rewards.RULES`: gsm8k_strict, gsm8k_flexible, final_number, exact_match, code_tests (these compare with, or run, the record's `answer`), think_format, hash_answer_format."""


@dataclass
class BestOfNConfig:
    model: str = ""
    """The policy: a checkpoint directory in Hugging Face layout (e.g. runs/sft/final)."""
    prompts: list[str] = field(default_factory=list)
    """Prompt files (.jsonl / .json, .gz allowed): records with `prompt`, `messages` or `question`, optional `answer`."""
    out: str = ""
    """Where to write the kept responses (JSON Lines in the `messages` format)."""
    n: int = 4
    """Responses sampled per prompt."""
    keep: Literal["best", "above"] = "best"
    """Keep each prompt's best response, or every response scoring at least `threshold`."""
    threshold: float = 0.0
    """The score a response needs with keep=above."""
    scorer: ScorerConfig = field(default_factory=ScorerConfig)
    """What scores a response."""
    max_new_tokens: int = 256
    """Longest response, in tokens."""
    temperature: float = 1.0
    """Sampling temperature (> 0: n greedy samples would all be the same)."""
    top_p: float | None = None
    """Nucleus sampling (None: off)."""
    top_k: int | None = None
    """Top-k sampling (None: off)."""
    seed: int = 0
    """Row j of prompt i samples with seed + i * n + j."""
    batch_prompts: int = 8
    """Prompts sampled together (each takes n rows of the batch)."""
    device: str = "auto"
    """cpu, cuda, or auto."""

    def __post_init__(self) -> None:
        if self.n < 1:
            raise ValueError(f"n must be at least 1, got {self.n}")
        if not self.temperature > 0:
            raise ValueError(f"temperature must be > 0 (n samples at temperature 0 are all the same), got {self.temperature}")
        if self.max_new_tokens < 1 or self.batch_prompts < 1:
            raise ValueError("max_new_tokens and batch_prompts must be at least 1")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if not math.isfinite(self.threshold):
            raise ValueError(f"threshold must be a finite number, got {self.threshold}")


def main(argv: list[str] | None = None) -> int:
    return run(config.parse(BestOfNConfig, argv, prog="best-of-n"))  # bad input: __main__ prints one line


def run(cfg: BestOfNConfig) -> int:
    # 1. prompts, policy and scorer, all checked before sampling
    if not cfg.model or not cfg.out or not cfg.prompts:
        raise config.ConfigError("model, prompts and out are required: --model DIR --prompts=[FILE] --out FILE.jsonl")
    if bool(cfg.scorer.model) == bool(cfg.scorer.rule):
        raise config.ConfigError("scorer: give exactly one of scorer.model (a reward model) and scorer.rule")
    out = Path(cfg.out)
    if out.is_dir():
        raise config.ConfigError(f"out: {out} is a directory; give a file name")
    records = read_prompts(cfg.prompts)
    if cfg.scorer.rule in NEEDS_ANSWER and any(r.answer is None for r in records):
        bad = next(r for r in records if r.answer is None)
        raise RecordError(bad.where, "answer", "missing", f"the {cfg.scorer.rule} rule needs each record's answer")
    device = torch.device("cuda" if cfg.device == "auto" and torch.cuda.is_available() else
                          "cpu" if cfg.device == "auto" else cfg.device)
    policy = load_for_inference(cfg.model, device=device)
    if policy.chat_template is None:
        raise config.ConfigError(f"model: {cfg.model}'s tokenizer has no chat template to render the prompts")
    fn = (ModelReward(load_reward_model(cfg.scorer.model), load_hf_tokenizer(cfg.scorer.model), device)
          if cfg.scorer.model else RULES[cfg.scorer.rule])
    scorer = Rewards([("score", 1.0, fn)])  # the RL recipes' scoring: a model in one batch, code_tests in parallel

    # 2-3. sample, score, keep
    lines, best, every, empty = [], [], [], 0
    for lo in range(0, len(records), cfg.batch_prompts):
        batch = records[lo:lo + cfg.batch_prompts]
        prompts = [policy.encode_chat(r.messages) for r in batch]
        seeds = [cfg.seed + (lo + i) * cfg.n + j for i in range(len(batch)) for j in range(cfg.n)]
        samples = generate(policy.model, prompts, max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature,
                           top_k=cfg.top_k, top_p=cfg.top_p, stop_token_ids=policy.stop_ids, seed=seeds,
                           num_samples=cfg.n)
        texts = [policy.tokenizer.decode(ids, skip_special_tokens=True) for ids in samples]
        for i, record in enumerate(batch):
            cands = texts[i * cfg.n:(i + 1) * cfg.n]
            scores = scorer.score_many([record.messages] * cfg.n, cands, [record.answer] * cfg.n)[0]
            order = sorted(range(cfg.n), key=lambda j: (-scores[j], j))  # best first, ties to the earliest
            kept = order[:1] if cfg.keep == "best" else [j for j in order if scores[j] >= cfg.threshold]
            best.append(scores[order[0]])
            every += scores
            empty += not kept
            for j in kept:
                lines.append(json.dumps({
                    "messages": [*record.messages, {"role": "assistant", "content": cands[j]}],
                    "score": scores[j], "rank": order.index(j) + 1, "n": cfg.n, "prompt_index": lo + i,
                    "source": record.where}, ensure_ascii=False))

    # 4. the SFT data file
    atomic_write_text(out, "".join(line + "\n" for line in lines))
    print(f"temper best-of-n: {len(records)} prompts x {cfg.n} samples; kept {len(lines)} ({cfg.keep}); "
          f"mean best score {sum(best) / len(best):.4f}, mean score {sum(every) / len(every):.4f}; "
          f"{empty} prompts with nothing kept -> {out}")
    return 0
