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

Several prepared datasets are mixed with weights by `MixedWindows`: fixed blocks of samples with
exact per-source counts, shuffled per block, so the mixture keeps all of the above.

It does not tokenize or write shards (that is `data/shards.py`), does not pack variable-length
examples (`data/packing.py`) and knows nothing of models.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

import numpy as np
import torch

from temper.data.shards import load_split

_MASK64 = np.uint64(0xFFFFFFFFFFFFFFFF)
_MIX_STREAM = 0x6D6978  # "mix"


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
        self.data_dir = Path(data_dir)
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

    def rows(self, start: int, count: int) -> np.ndarray:
        """Global samples [start, start + count) as (count, seq_len + 1) int64 token rows."""
        ids = self.window_ids(start, count)
        shard_of = np.searchsorted(self._cum, ids, side="right") - 1
        rows = np.empty((count, self.seq_len + 1), dtype=np.int64)
        for row, (w, s) in enumerate(zip(ids, shard_of, strict=True)):
            local = int(w - self._cum[s])
            offset = local if self.order == "random" else local * self.seq_len
            rows[row] = self.shards[s][offset : offset + self.seq_len + 1]
        return rows

    def batch(self, start: int, count: int, device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
        """Global samples [start, start + count) as (inputs, targets), each (count, seq_len) int64."""
        return _as_batch(self.rows(start, count), device)


def _as_batch(rows: np.ndarray, device: torch.device | str) -> tuple[torch.Tensor, torch.Tensor]:
    tokens = torch.from_numpy(rows)  # (count, seq_len + 1)
    if torch.device(device).type == "cuda":
        tokens = tokens.pin_memory().to(device, non_blocking=True)
    return tokens[:, :-1], tokens[:, 1:]


def mixture_counts(weights: Sequence[float], block: int) -> np.ndarray:
    """Samples of each source in a block of `block`: block * w / sum(w), rounded by largest remainder.

    Largest remainder (Hamilton's method) keeps the sum exactly `block` and each count within one
    of its exact share; ties go to the earlier source.
    """
    w = np.asarray(weights, dtype=np.float64)
    if w.ndim != 1 or w.size == 0 or not np.all(np.isfinite(w)) or np.any(w <= 0):
        raise ValueError(f"mixture weights must be finite and > 0, got {list(weights)}")
    exact = block * w / w.sum()
    counts = np.floor(exact).astype(np.int64)
    order = np.lexsort((np.arange(w.size), -(exact - counts)))  # biggest remainder first, ties by index
    counts[order[: block - int(counts.sum())]] += 1
    return counts


class MixedWindows:
    """Several TokenWindows sampled in fixed proportions, still a pure function of (seed, g).

    The global index range is cut into blocks of `block` samples. Every block holds exactly
    `counts[i]` samples of source i (`mixture_counts`), in an order given by a permutation seeded
    with (seed, block index). So source i's own sample counter at global index g has a closed
    form, (g // block) * counts[i] + (its samples earlier in g's block), and each source is read
    as its own stream 0, 1, 2, ...: its "sequential" epochs stay whole. Like TokenWindows, the
    resumable state is the one global sample count. Give each source its own seed (the pretrain
    recipe uses seed + i), or two "random" sources draw correlated offsets.
    """

    def __init__(
        self, sources: Sequence[TokenWindows], weights: Sequence[float], *, seed: int = 0, block: int = 1024,
        names: Sequence[str] | None = None,
    ) -> None:
        if not sources:
            raise ValueError("a mixture needs at least one source")
        self.names = list(names) if names is not None else [str(s.data_dir) for s in sources]
        if len(weights) != len(sources) or len(self.names) != len(sources):
            raise ValueError(f"{len(sources)} sources need as many weights and names, got {len(weights)} "
                             f"weights and {len(self.names)} names")
        seq_lens = {s.seq_len for s in sources}
        if len(seq_lens) != 1:
            raise ValueError(f"mixture sources have different seq_len: {sorted(seq_lens)}")
        self.sources, self.seq_len, self.seed, self.block = list(sources), seq_lens.pop(), seed, block
        self.counts = mixture_counts(weights, block)
        for name, w, c in zip(self.names, weights, self.counts, strict=True):
            if c == 0:
                raise ValueError(f"source {name} (weight {w}) gets no sample in a block of {block}: "
                                 f"raise the weight or the block size")
        self.weights = self.counts / block  # the proportions actually drawn
        self._cache: dict[int, tuple[np.ndarray, np.ndarray]] = {}

    def _block(self, b: int) -> tuple[np.ndarray, np.ndarray]:
        """(source of each slot, samples of that source in earlier slots of the block), each (block,)."""
        if b not in self._cache:
            if len(self._cache) >= 4:  # a batch spans at most a few blocks; keep the memory flat
                self._cache.clear()
            # A third key word keeps this stream apart from the (seed, epoch) permutations of TokenWindows.
            rng = np.random.default_rng([self.seed, b, _MIX_STREAM])
            src = np.repeat(np.arange(len(self.sources)), self.counts)[rng.permutation(self.block)]
            onehot = src[:, None] == np.arange(len(self.sources))[None, :]  # (block, n)
            before = np.cumsum(onehot, axis=0) - onehot  # (block, n): earlier slots of each source
            self._cache[b] = (src, before[np.arange(self.block), src])
        return self._cache[b]

    def sample_sources(self, start: int, count: int) -> tuple[np.ndarray, np.ndarray]:
        """For global samples [start, start + count): (source of each, its index in that source's stream)."""
        src = np.empty(count, dtype=np.int64)
        local = np.empty(count, dtype=np.int64)
        g, out = start, 0
        while out < count:
            b, r = divmod(g, self.block)
            take = min(self.block - r, count - out)
            s, earlier = self._block(b)
            src[out : out + take] = s[r : r + take]
            local[out : out + take] = b * self.counts[s[r : r + take]] + earlier[r : r + take]
            g, out = g + take, out + take
        return src, local

    def rows(self, start: int, count: int) -> np.ndarray:
        """Global samples [start, start + count) as (count, seq_len + 1) int64 token rows."""
        src, local = self.sample_sources(start, count)
        rows = np.empty((count, self.seq_len + 1), dtype=np.int64)
        for i, source in enumerate(self.sources):
            sel = np.flatnonzero(src == i)
            if sel.size:
                # A contiguous global range holds consecutive samples of each source's stream.
                rows[sel] = source.rows(int(local[sel[0]]), sel.size)
        return rows

    def batch(self, start: int, count: int, device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
        """Global samples [start, start + count) as (inputs, targets), each (count, seq_len) int64."""
        return _as_batch(self.rows(start, count), device)


def rank_slice(step_start: int, micro_batch: int, micro_step: int, rank: int, world: int) -> int:
    """First global sample index of this rank's micro-batch within an optimizer step.

    An optimizer step covers samples [step_start, step_start + micro_batch * accum * world); micro
    step m of rank r takes the slice at (m * world + r) * micro_batch, so the union over ranks
    and micro steps is exactly that range whatever the world size.
    """
    return step_start + (micro_step * world + rank) * micro_batch


def split_holdout(items: Sequence, val_fraction: float, seed: int) -> tuple[list, list]:
    """(train, held-out) items: item i is held out by a hash of (seed, i), so the split is stable
    across runs, world sizes and added items (the examples of sft, the pairs of dpo and reward)."""
    def held_out(i: int) -> bool:
        h = hashlib.blake2b(f"{seed}:{i}".encode(), digest_size=8).digest()
        return int.from_bytes(h, "little") / 2**64 < val_fraction
    flags = [held_out(i) for i in range(len(items))]
    return [x for x, f in zip(items, flags) if not f], [x for x, f in zip(items, flags) if f]


class EpochOrder:
    """Items in training order: epoch e is a permutation of the n items seeded by (seed, e), so the g-th
    item of training is a function of (seed, g) alone and a resumed run continues exactly."""

    def __init__(self, n: int, seed: int):
        self.n, self.seed = n, seed
        self._epochs: dict[int, np.ndarray] = {}

    def item(self, g: int) -> int:
        e, k = divmod(g, self.n)
        if e not in self._epochs:
            self._epochs[e] = np.random.default_rng([self.seed, e]).permutation(self.n)
        return int(self._epochs[e][k])
