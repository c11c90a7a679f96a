"""Rows of the static KV cache: allocate, reset, fork, and take a few rows out and put them back.

The cache is `temper.model.attention.KVCache`: keys and values (L, B, Hkv, S_max, D) and a (B,)
tensor of per-row lengths; row b holds its tokens at slots 0 .. lengths[b] - 1, slot j at position
j. The model writes and reads it; this module moves rows around for the callers that schedule
them: the engine (a prompt prefilled once and forked into n rows for n samples), a server that
admits a request into a free row and retires it when done (continuous batching), RL rollouts.
Every function here works on device tensors and never reads a length back to the host.

It does not run the model (`temper.infer.engine.prefill` / `decode_step` do) or decide which row
holds what (the caller's bookkeeping).
"""

from __future__ import annotations

import copy
from collections.abc import Sequence

import torch
from torch import nn

from temper.model.attention import KVCache


def new_cache(model: nn.Module, batch: int, max_len: int, device: torch.device | str | None = None,
              dtype: torch.dtype | None = None) -> KVCache:
    """An empty cache of `batch` rows of up to `max_len` tokens (default: the weights' device and dtype).

    Its tensors are marked as static addresses (as transformers' StaticCache does), so CUDA graphs of a
    compiled decode step read and write them in place instead of copying them in and out each step.
    """
    if not 0 < max_len <= model.cfg.max_seq_len:
        raise ValueError(f"a cache row holds 1 .. max_seq_len={model.cfg.max_seq_len} tokens, got {max_len}")
    cache = model.new_cache(batch, max_len, device=device, dtype=dtype)
    for t in (*cache.per_row().values(), cache.lengths):
        torch._dynamo.mark_static_address(t)
    return cache


def _index(cache: KVCache, rows: Sequence[int] | torch.Tensor) -> torch.Tensor:
    idx = torch.as_tensor(rows, dtype=torch.long, device=cache.lengths.device).reshape(-1)
    if idx.numel() and isinstance(rows, Sequence) and not all(0 <= r < cache.k.shape[1] for r in rows):
        raise ValueError(f"rows must be in [0, {cache.k.shape[1]}), got {list(rows)}")
    return idx


def reset(cache: KVCache, rows: Sequence[int] | torch.Tensor) -> None:
    """Empty `rows` (their stale keys and values stay, masked, until overwritten; linear layers read an empty row's
    state as zeros)."""
    cache.lengths[_index(cache, rows)] = 0


def fork(cache: KVCache, src: int, dst: Sequence[int] | torch.Tensor) -> None:
    """Copy row `src` (keys, values, length) into every row of `dst`: a prompt prefilled once, then
    sampled n times (best-of-n, GRPO groups) without prefilling it n times."""
    idx = _index(cache, dst)
    n = idx.numel()
    if not isinstance(dst, torch.Tensor) and src in dst:
        raise ValueError(f"cannot fork row {src} into itself")
    # Copies of the source first: index_put refuses a source that shares memory with its destination.
    for t in cache.per_row().values():  # k (L, B, Hkv, S_max, D), v, and linear layers' states
        t[:, idx] = t[:, src : src + 1].clone().expand(-1, n, *t.shape[2:])
    cache.lengths[idx] = cache.lengths[src].clone()


def linear_states(cache: KVCache, row: int) -> dict[str, torch.Tensor] | None:
    """A copy of `row`'s linear attention states (None where the model has none): what `restore` puts back to roll
    the row back, since such a state cannot be cut back as keys can (speculative decoding's rejected drafts)."""
    if cache.conv is None:
        return None
    return {name: t[:, row].clone() for name, t in cache.per_row().items() if name in ("state", "conv")}


def restore(cache: KVCache, row: int, length: int, states: dict[str, torch.Tensor]) -> None:
    """Set `row` back to `length` tokens and the linear states `linear_states` copied when it held them."""
    cache.lengths[row] = length
    for name, t in states.items():
        getattr(cache, name)[:, row] = t


def select(cache: KVCache, rows: Sequence[int] | torch.Tensor) -> KVCache:
    """A new cache holding a copy of `rows` (in that order): the model runs on it alone, and
    `write_back` returns the rows, so a prefill of a few rows leaves every other row untouched."""
    idx = _index(cache, rows)
    part = copy.copy(cache)
    for name, t in cache.per_row().items():
        setattr(part, name, t[:, idx])  # indexing copies
    part.lengths = cache.lengths[idx]
    return part


def window(cache: KVCache, rows: int, slots: int) -> KVCache:
    """A view of the first `rows` rows and `slots` slots of `cache`, which the model runs on as on a cache of that
    size: its writes land in `cache` (views share memory). A server's eager decode step runs on the rows up to its
    last live one and the slots they fill, not on every row at the cache's full length (the static shapes a
    compiled step needs); an idle row in the window still decodes garbage, and its length stops at `slots`."""
    part = copy.copy(cache)
    for name, t in cache.per_row().items():  # keys and values (L, B, Hkv, S_max, D); states have no slots
        setattr(part, name, t[:, :rows, :, :slots] if name in ("k", "v", "k_global", "v_global") else t[:, :rows])
    part.lengths, part.max_len = cache.lengths[:rows], slots
    return part


def write_back(cache: KVCache, rows: Sequence[int] | torch.Tensor, part: KVCache) -> None:
    """Put the rows of `part` (from `select(cache, rows)`) back into `cache`."""
    idx = _index(cache, rows)
    for name, t in cache.per_row().items():
        t[:, idx] = getattr(part, name)
    cache.lengths[idx] = part.lengths
