"""What the recipes that train on preference pairs share (`temper reward`, `temper dpo`): their batch
and validation config sections, the held-out split, and which pairs each rank's micro-batches hold.

A step's pairs follow the training order (`data.loader.EpochOrder`, a function of the seed and the
pair's global index) and are dealt to ranks and micro-batches by `loader.rank_slice`, so N ranks with
the same global batch train on the pairs one process would.
"""

from __future__ import annotations

from dataclasses import dataclass

from temper.config import ConfigError
from temper.data.loader import EpochOrder, rank_slice, split_holdout
from temper.train.parallel import DistInfo
from temper.train.run import EvalSection, TrainSection


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


def split_pairs(pairs: list, val_fraction: float, seed: int) -> tuple[list, list]:
    """(training, held-out) pairs, stable across runs and world sizes."""
    train, val = split_holdout(pairs, val_fraction, seed)
    if not train:
        raise ConfigError(f"eval.val_fraction: no training pairs left after holding out {val_fraction}")
    return train, val


def step_pairs(order: EpochOrder, step: int, micro: int, accum: int, d: DistInfo) -> list[list[int]]:
    """The training pairs of this rank's micro-batches at optimizer step `step`, one list per micro-batch."""
    first = step * micro * accum * d.world
    starts = [rank_slice(first, micro, m, d.rank, d.world) for m in range(accum)]
    return [[order.item(g) for g in range(s, s + micro)] for s in starts]


def val_batches(n: int, micro: int, d: DistInfo) -> list[list[int]]:
    """This rank's held-out pairs in micro-batches: pair i is scored by rank i mod world. A rank left
    without one scores pair 0 too, since every rank must join the metrics' all-reduce."""
    idx = [i for i in range(n) if i % d.world == d.rank] or [0]
    return [idx[lo:lo + micro] for lo in range(0, len(idx), micro)]
