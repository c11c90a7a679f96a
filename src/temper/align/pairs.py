"""What the recipes that train on preference pairs share (`temper reward`, `temper dpo`): their batch
and validation config sections, the steps before training (read, check and split the pairs, lock the
run directory, join the process group), and which pairs each rank's micro-batches hold.

A step's pairs follow the training order (`data.loader.EpochOrder`, a function of the seed and the
pair's global index) and are dealt to ranks and micro-batches by `loader.rank_slice`, so N ranks with
the same global batch train on the pairs one process would. Held-out pairs are dealt so that every rank
scores as many micro-batches (a sharded model's forward pass needs every rank): a rank short of pairs
scores a void one (`void`, `IgnoreVoid`), which runs the model and counts for nothing.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Callable
from dataclasses import dataclass

import torch

from temper.config import ConfigError
from temper.data.loader import EpochOrder, rank_slice, split_holdout
from temper.data.prefs import PrefStats, check_pairs, format_pref_check, load_pref_examples
from temper.data.tokenizer import HFTokenizer, load_hf_tokenizer
from temper.train.losses import Batch, Loss, LossOut
from temper.train.parallel import DistInfo, init_distributed, shutdown_distributed
from temper.train.run import EvalSection, TrainSection, locked_run_dir, run_directory

# What must match between a checkpoint and the run that resumes from it.
RESUME_KEYS = ("model", "method", "data", "loss", "lora", "train.micro_batch_size", "train.epochs",
               "train.accumulation", "train.steps", "optim", "schedule", "steps", "pairs_per_step", "run.seed")

Train = Callable[..., int]
"""train(cfg, d, tok, stats, train_pairs, val_pairs) -> exit code: a recipe's own steps from the model on."""


@dataclass
class PairTrainConfig(TrainSection):
    steps: int = 0
    """Optimizer steps (0: from epochs)."""
    micro_batch_size: int = 2
    """Pairs per forward pass, on each rank (twice as many rows)."""
    epochs: float = 1.0
    """Passes over the training pairs."""
    accumulation: int = 1
    """Micro-batches per optimizer step, on each rank: a step is micro_batch_size x accumulation x ranks pairs."""


@dataclass
class PairEvalConfig(EvalSection):
    val_fraction: float = 0.05
    """Share of the pairs held out (by a hash of the pair's position and the seed); every held-out pair is scored."""


def run_on_pairs(cfg, train: Train) -> int:
    """The steps every pair recipe takes before its model: the tokenizer of `cfg.model`, the pairs of
    `cfg.data`, the check (printed and stopping with `cfg.check`, or when it fails), the held-out split;
    then `train` under the run directory's lock, in the process group torchrun describes."""
    if not cfg.model:
        raise ConfigError("model: give a Hugging Face checkpoint directory")
    run_dir = run_directory(cfg.run)  # a bad run.name fails before anything loads
    tok: HFTokenizer = load_hf_tokenizer(cfg.model)
    stats = PrefStats()
    pairs = load_pref_examples(cfg.data, tok, stats)
    report = check_pairs(pairs, tok, max_length=cfg.data.max_length, stats=stats)
    if cfg.check or not report.ok:
        print(format_pref_check(report), file=sys.stdout if cfg.check else sys.stderr)
        return 0 if report.ok else 1
    train_pairs, val_pairs = split_pairs(pairs, cfg.eval.val_fraction, cfg.run.seed)
    with locked_run_dir(run_dir):  # a second process on this run directory is refused
        d = init_distributed(cfg.run.device, cfg.train.parallel)
        try:
            return train(cfg, d, tok, stats, train_pairs, val_pairs)
        finally:
            shutdown_distributed()


def split_pairs(pairs: list, val_fraction: float, seed: int) -> tuple[list, list]:
    """(training, held-out) pairs, stable across runs and world sizes."""
    train, val = split_holdout(pairs, val_fraction, seed)
    if not train:
        raise ConfigError(f"eval.val_fraction: no training pairs left after holding out {val_fraction}")
    return train, val


def step_pairs(order: EpochOrder, step: int, micro: int, accum: int, d: DistInfo) -> list[list[int]]:
    """The training pairs of this rank's micro-batches at optimizer step `step`, one list per micro-batch."""
    first = step * micro * accum * d.dp_world
    starts = [rank_slice(first, micro, m, d.dp_rank, d.dp_world) for m in range(accum)]
    return [[order.item(g) for g in range(s, s + micro)] for s in starts]


def val_batches(n: int, micro: int, d: DistInfo) -> list[list[int]]:
    """This rank's held-out pairs in micro-batches: pair i is scored by rank i mod world. Every rank gets as
    many micro-batches, at least one (every rank joins the metrics' all-reduce, and a sharded model's forward
    needs every rank): one whose pairs have run out is empty, for the recipe to score as `void`."""
    idx = [i for i in range(n) if i % d.dp_world == d.dp_rank]
    rounds = max(1, math.ceil(math.ceil(n / d.dp_world) / micro))
    return [idx[k * micro:(k + 1) * micro] for k in range(rounds)]


VOID = "void"
"""A micro-batch's extra that marks it void: built from pair 0 to run the model, counted as no pair."""


def void(idx: list[int]) -> dict[str, torch.Tensor]:
    """The extra of a micro-batch of the pairs `idx`: {VOID: ...} when there are none (build it from pair 0)."""
    return {} if idx else {VOID: torch.ones(())}


@dataclass
class IgnoreVoid:
    """`loss` that scores a void micro-batch (`void`) as nothing: its forward pass runs, its count, loss and
    metrics are zero."""

    loss: Loss

    def count(self, batch: Batch) -> torch.Tensor:
        n = torch.as_tensor(self.loss.count(batch))
        return n * 0 if VOID in batch.extra else n

    def __call__(self, model, batch: Batch) -> LossOut:
        out = self.loss(model, batch)
        if VOID not in batch.extra:
            return out
        return LossOut(out.loss_sum * 0, {k: v * 0 for k, v in out.metrics.items()})
