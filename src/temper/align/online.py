"""What the recipes that learn from their own samples share (`temper grpo`, `temper ppo`): the prompt data
and held-out split, which prompts each rank samples at a step and with which seeds, the reward of each
rollout, the reference policy, and the greedy evaluation on held-out prompts.

A step's prompts follow the training order (`data.loader.EpochOrder`, a function of the seed and the
prompt's global index); rank r of W takes the r-th of W equal blocks of them, and rollout j of the
prompt with global index g samples with the seed (seed, g, j) hashed (`rollout_seeds`): N ranks
sample what one process samples, and a resumed run samples what the uninterrupted one did, with no
generator state to save.

It does not compute advantages or losses (align/rl.py) or run the optimizer (train/).
"""

from __future__ import annotations

import hashlib
import math
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from temper.align.rewards import NEEDS_ANSWER, RewardConfig, Rewards
from temper.align.rl import TokenReference, adapters_off_token_reference, frozen_token_reference
from temper.align.rollout import Rollout, RolloutConfig, collate_rollouts, rollout
from temper.config import ConfigError
from temper.data.chat import check_template_variables
from temper.data.loader import EpochOrder, split_holdout
from temper.data.prompts import PromptRecord, read_prompts
from temper.data.sources import RecordError
from temper.data.tokenizer import HFTokenizer, load_hf_tokenizer
from temper.infer.engine import join
from temper.infer.load import open_checkpoint
from temper.train.losses import Batch
from temper.train.parallel import DistInfo, init_distributed, shutdown_distributed
from temper.train.run import EvalSection, TrainSection, locked_run_dir, run_directory


@dataclass
class PromptDataConfig:
    prompts: list[str] = field(default_factory=list)
    """Prompt files (.jsonl / .json, .gz allowed): records with `prompt`, `messages` or `question`, and `answer`
    when a rule reward needs it. Rendered with the policy's chat template."""
    max_prompt_length: int = 256
    """A longer rendered prompt keeps its last max_prompt_length tokens (counted and reported)."""
    chat_template_kwargs: dict = field(default_factory=dict)
    """Extra variables for the chat template, as apply_chat_template takes them: '{enable_thinking: false}' (Qwen3)."""

    def __post_init__(self) -> None:
        if self.max_prompt_length < 1:
            raise ValueError(f"max_prompt_length must be at least 1, got {self.max_prompt_length}")
        check_template_variables(self.chat_template_kwargs)


@dataclass
class OnlineTrainConfig(TrainSection):
    steps: int = 100
    """Rollout steps, each followed by the recipe's optimizer steps on its rollouts."""
    prompts_per_step: int = 8
    """Prompts sampled per step over all ranks (a multiple of the ranks, for ppo of ranks x ppo.minibatches);
    each gives rollout.n completions."""
    micro_batch_size: int = 16
    """Completions per forward pass, on each rank."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.steps < 1 or self.prompts_per_step < 1:
            raise ValueError("steps and prompts_per_step must be at least 1")


@dataclass
class OnlineEvalConfig(EvalSection):
    val_fraction: float = 0.1
    """Share of the prompts held out (by a hash of the prompt's position and the seed)."""
    max_prompts: int = 64
    """Held-out prompts answered greedily and scored at each evaluation (0: all)."""

    def __post_init__(self) -> None:
        if not 0.0 <= self.val_fraction < 1.0:
            raise ValueError(f"val_fraction must be in [0, 1), got {self.val_fraction}")
        if self.max_prompts < 0:
            raise ValueError(f"max_prompts must be >= 0, got {self.max_prompts}")


@dataclass
class Prompts:
    """The prompt records with their rendered token ids."""

    records: list[PromptRecord]
    ids: list[list[int]]


Train = Callable[..., int]
"""train(cfg, d, tok, stop_ids, train_prompts, val_prompts) -> exit code: the recipe's own steps."""


def run_on_prompts(cfg, train: Train) -> int:
    """The steps every sampling recipe takes before its model: the tokenizer and stop tokens of
    `cfg.model`, the prompts of `cfg.data` rendered with its chat template (each checked to have an
    answer when a rule needs it), the held-out split; then `train` under the run directory's lock, in
    the process group torchrun describes."""
    if not cfg.model:
        raise ConfigError("model: give a Hugging Face checkpoint directory (usually an SFT result)")
    if not cfg.data.prompts:
        raise ConfigError("data.prompts: give the prompt files: --data.prompts=[FILE.jsonl]")
    check_rewards(cfg.rewards)
    run_dir = run_directory(cfg.run)  # a bad run.name fails before anything loads
    tok: HFTokenizer = load_hf_tokenizer(cfg.model)
    if not tok.chat_templates.get("default"):
        raise ConfigError(f"model: {cfg.model}'s tokenizer has no chat template to render the prompts")
    stop_ids = open_checkpoint(cfg.model).stop_ids
    records = read_prompts(cfg.data.prompts)
    needs = [c.rule for c in cfg.rewards if c.rule in NEEDS_ANSWER]
    missing = next((r for r in records if r.answer is None), None)
    if needs and missing is not None:
        raise RecordError(missing.where, "answer", "missing", f"the {needs[0]} reward needs each record's answer")
    prompts, cut = render(tok, records, cfg.data.max_prompt_length, cfg.data.chat_template_kwargs)
    if cut:
        print(f"temper: {cut} of {len(records)} prompts longer than data.max_prompt_length="
              f"{cfg.data.max_prompt_length} keep their last tokens", file=sys.stderr)
    train_idx, val_idx = split_holdout(range(len(records)), cfg.eval.val_fraction, cfg.run.seed)
    if not train_idx:
        raise ConfigError(f"eval.val_fraction: no training prompts left after holding out {cfg.eval.val_fraction}")
    if cfg.eval.max_prompts:
        val_idx = val_idx[:cfg.eval.max_prompts]
    pick = lambda idx: Prompts([prompts.records[i] for i in idx], [prompts.ids[i] for i in idx])  # noqa: E731
    with locked_run_dir(run_dir):  # a second process on this run directory is refused
        d = init_distributed(cfg.run.device, cfg.train.parallel)
        try:
            return train(cfg, d, tok, stop_ids, pick(train_idx), pick(val_idx))
        finally:
            shutdown_distributed()


def check_rewards(configs: Sequence[RewardConfig]) -> None:
    if not configs:
        raise ConfigError("rewards: give at least one reward, e.g. --rewards='[{rule: gsm8k_flexible}]' or "
                          "--rewards='[{model: runs/reward/final}]'")


def render(tok: HFTokenizer, records: Sequence[PromptRecord], max_len: int,
           variables: Mapping[str, Any] | None = None) -> tuple[Prompts, int]:
    """Each record's conversation through the chat template (with its extra `variables`), ready for the assistant's
    turn; a prompt over `max_len` tokens keeps its last ones. Returns the prompts and how many were cut."""
    ids, cut = [], 0
    for r in records:
        row = tok.encode_chat(r.messages, add_generation_prompt=True, **(variables or {}))
        cut += len(row) > max_len
        ids.append(row[-max_len:])
    return Prompts(list(records), ids), cut


def check_context(train: Prompts, val: Prompts, max_new_tokens: int, context: int) -> None:
    """Every prompt with a full-length completion fits the model's context (the training forward sees both)."""
    longest = max(len(p) for p in train.ids + val.ids)
    if longest + max_new_tokens > context:
        raise ConfigError(f"rollout.max_new_tokens={max_new_tokens} after the longest prompt ({longest} tokens) "
                          f"exceeds the model's context ({context}): lower it or data.max_prompt_length")


def step_prompts(order: EpochOrder, step: int, per_step: int, d: DistInfo) -> list[int]:
    """Global indices (positions in training order) of this rank's prompts at `step`: the rank-th of
    `world` equal blocks of the step's `per_step` prompts."""
    share = per_step // d.dp_world
    first = step * per_step + d.dp_rank * share
    return list(range(first, first + share))


def rollout_seeds(seed: int, globals_: Sequence[int], n: int) -> list[int]:
    """One engine seed per rollout: rollout j of the prompt at global index g gets a hash of (seed, g, j)."""
    out = []
    for g in globals_:
        for j in range(n):
            h = hashlib.blake2b(f"{seed}:{g}:{j}".encode(), digest_size=8).digest()
            out.append(int.from_bytes(h, "little") >> 2)  # < 2**62: the engine's seeds are int64
    return out


def score(rewards: Rewards, records: Sequence[PromptRecord], rollouts: Sequence[Rollout], n: int
          ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """(total reward (len(rollouts),), {component: values}) of rollouts, n per record in order."""
    rec = [records[i // n] for i in range(len(rollouts))]
    totals, columns = rewards.score_many([r.messages for r in rec], [r.text for r in rollouts], [r.answer for r in rec])
    return torch.tensor(totals, dtype=torch.float32), {k: torch.tensor(v, dtype=torch.float32) for k, v in columns.items()}


def reference_policy(model: nn.Module, reference_model: nn.Module | None, temperature: float) -> TokenReference:
    """The frozen starting policy: a separate copy (full fine-tuning), or the policy itself with its
    adapters off (LoRA, QLoRA: no second copy of the weights)."""
    if reference_model is not None:
        return frozen_token_reference(reference_model.eval(), temperature)
    return adapters_off_token_reference(model, temperature)


def global_std(d: DistInfo, values: torch.Tensor) -> float:
    """The unbiased std of every rank's `values` together (one all-reduce of their count, sum and sum of squares,
    in float64), as TRL's `nanstd` of its gathered rewards."""
    v = values.double()
    t = torch.stack([torch.tensor(float(v.numel()), dtype=torch.float64), v.sum(), (v * v).sum()]).to(d.device)
    if d.world > 1:
        dist.all_reduce(t, group=d.dp_group)
    n, total, squares = t.tolist()
    return math.sqrt(max(squares - total * total / n, 0.0) / (n - 1)) if n > 1 else 0.0


def global_means(d: DistInfo, sums: dict[str, tuple[float, float]]) -> dict[str, float]:
    """{name: (sum, count)} on each rank -> {name: global sum / global count} (one all-reduce)."""
    names = sorted(sums)
    t = torch.tensor([[sums[k][0], sums[k][1]] for k in names], dtype=torch.float64, device=d.device)
    if d.world > 1:
        dist.all_reduce(t, group=d.dp_group)
    return {k: float(t[i, 0] / t[i, 1]) if t[i, 1] else 0.0 for i, k in enumerate(names)}


@torch.no_grad()
def evaluate_greedy(model: nn.Module, tok: HFTokenizer, prompts: Prompts, rewards: Rewards, cfg: RolloutConfig,
                    stop_ids: Sequence[int], d: DistInfo, batch_prompts: int = 16) -> dict[str, float]:
    """Held-out prompts answered greedily (temperature 0) and scored: the mean total reward and each
    component's mean (for a correctness rule, the accuracy), and the mean completion length.
    Prompt i is answered by rank i mod world, in as many rounds on every rank: a rank out of prompts takes
    part in the others' generation (`engine.join`: a sharded model's forward needs every rank)."""
    mine = [i for i in range(len(prompts.ids)) if i % d.dp_world == d.dp_rank]
    sums: dict[str, list[float]] = {}
    rounds = math.ceil(math.ceil(len(prompts.ids) / d.dp_world) / batch_prompts)
    for lo in range(0, rounds * batch_prompts, batch_prompts):
        idx = mine[lo:lo + batch_prompts]
        if not idx:
            join(model)
            continue
        outs = rollout(model, tok, [prompts.ids[i] for i in idx], cfg, seeds=[0] * len(idx), stop_ids=stop_ids,
                       greedy=True, n=1)
        total, columns = score(rewards, [prompts.records[i] for i in idx], outs, 1)
        for k, v in {"reward": total, **{f"reward/{c}": x for c, x in columns.items()},
                     "completion_length": torch.tensor([float(len(o.completion)) for o in outs])}.items():
            acc = sums.setdefault(k, [0.0, 0.0])
            acc[0] += float(v.sum())
            acc[1] += len(v)
    for k in ["reward", *(f"reward/{c}" for c in rewards.names), "completion_length"]:
        sums.setdefault(k, [0.0, 0.0])  # a rank without prompts still joins the all-reduce
    return global_means(d, {k: (s, c) for k, (s, c) in sums.items()})


def micro_batches(rollouts: Sequence[Rollout], micro: int, pad_id: int, device: torch.device,
                  **per_row: torch.Tensor) -> list[Batch]:
    """Rollouts in micro-batches of `micro`, each a `collate_rollouts` batch; `per_row` tensors (one
    value per rollout, e.g. GRPO's advantages) go to each batch's extra by name."""
    out = []
    for lo in range(0, len(rollouts), micro):
        b = collate_rollouts(rollouts[lo:lo + micro], pad_id=pad_id, device=device)
        for k, v in per_row.items():
            b.extra[k] = v[lo:lo + micro].to(device)
        out.append(b)
    return out
