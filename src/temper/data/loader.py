"""Batches of (inputs, targets) windows over token shards, as a pure function of a global sample index.

Sample `g` of a run is fully determined by the seed and `g`: its content never depends on the
number of ranks, micro-batch size or workers (OLMo's global indices). Ranks and micro-batches
simply take disjoint slices of the global index range of each optimizer step, so the loader's
whole resumable state is one integer, the number of samples consumed. Because a sample costs
one slice of a memory-mapped array, no worker processes are needed.

Two orders:
- "random": window starts drawn by a counter-based hash of (seed, g): any offset, any shard.
- "sequential": non-overlapping windows, shuffled once per epoch by a permutation seeded with
  (seed, epoch): every window is seen exactly once per epoch, across resumes.

It does not tokenize or write shards (that is `data/shards.py`) and knows nothing of models.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import numpy as np
import torch

from temper.data.shards import load_split

_MASK64 = np.uint64(0xFFFFFFFFFFFFFFFF)


def _splitmix64(x: np.ndarray) -> np.ndarray:
    """A counter-based hash (Steele et al. 2014): independent 64-bit draws from (seed, index)."""
    with np.errstate(over="ignore"):
        x = (x + np.uint64(0x9E3779B97F4A7C15)) & _MASK64
        x = ((x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)) & _MASK64
        x = ((x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)) & _MASK64
        return x ^ (x >> np.uint64(31))


class TokenWindows:
    """Fixed-length next-token windows over one split of a prepared shard directory."""

    def __init__(
        self,
        data_dir: str | Path,
        split: str,
        seq_len: int,
        *,
        seed: int = 0,
        order: Literal["random", "sequential"] = "random",
        verify: bool = True,
    ) -> None:
        self.shards = load_split(data_dir, split, verify=verify)
        self.seq_len, self.seed, self.order = seq_len, seed, order
        lengths = np.array([len(s) for s in self.shards], dtype=np.int64)
        if order == "random":
            per_shard = np.maximum(lengths - seq_len, 0)  # valid window starts (need seq_len + 1 tokens)
        elif order == "sequential":
            per_shard = np.maximum(lengths - 1, 0) // seq_len
        else:
            raise ValueError(f"unknown order {order!r}: expected 'random' or 'sequential'")
        self._cum = np.concatenate([[0], np.cumsum(per_shard)])
        self.num_windows = int(self._cum[-1])
        if self.num_windows == 0:
            raise ValueError(
                f"{data_dir}: split '{split}' has {int(lengths.sum())} tokens, fewer than one window of "
                f"{seq_len + 1}; use a shorter seq_len or more data"
            )
        self._perm_epoch, self._perm = -1, np.empty(0, dtype=np.int64)

    def _window_ids(self, indices: np.ndarray) -> np.ndarray:
        if self.order == "random":
            keys = (np.uint64(self.seed) << np.uint64(40)) ^ indices.astype(np.uint64)
            return (_splitmix64(keys) % np.uint64(self.num_windows)).astype(np.int64)
        out = np.empty_like(indices)
        epochs = indices // self.num_windows
        for epoch in np.unique(epochs):
            if epoch != self._perm_epoch:
                rng = np.random.default_rng([self.seed, int(epoch)])
                self._perm, self._perm_epoch = rng.permutation(self.num_windows), int(epoch)
            sel = epochs == epoch
            out[sel] = self._perm[indices[sel] % self.num_windows]
        return out

    def window_ids(self, start: int, count: int) -> np.ndarray:
        """Which windows global samples [start, start + count) are (for tests of the order)."""
        return self._window_ids(np.arange(start, start + count, dtype=np.int64))

    def batch(self, start: int, count: int, device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
        """Global samples [start, start + count) as (inputs, targets), each (count, seq_len) int64."""
        ids = self.window_ids(start, count)
        shard_of = np.searchsorted(self._cum, ids, side="right") - 1
        rows = np.empty((count, self.seq_len + 1), dtype=np.int64)
        for row, (w, s) in enumerate(zip(ids, shard_of, strict=True)):
            local = int(w - self._cum[s])
            offset = local if self.order == "random" else local * self.seq_len
            rows[row] = self.shards[s][offset : offset + self.seq_len + 1]
        tokens = torch.from_numpy(rows)
        if torch.device(device).type == "cuda":
            tokens = tokens.pin_memory().to(device, non_blocking=True)
        return tokens[:, :-1], tokens[:, 1:]


def rank_slice(step_start: int, micro_batch: int, micro_step: int, rank: int, world: int) -> int:
    """First global sample index of this rank's micro-batch within an optimizer step.

    An optimizer step covers samples [step_start, step_start + micro_batch * accum * world); micro
    step m of rank r takes the slice at (m * world + r) * micro_batch, so the union over ranks
    and micro steps is exactly that range whatever the world size.
    """
    return step_start + (micro_step * world + rank) * micro_batch
