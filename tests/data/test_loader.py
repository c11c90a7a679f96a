"""The loader: samples are a pure function of (seed, global index) — rows 3 and 12."""

import numpy as np
import pytest
import torch

from temper.data.loader import TokenWindows, rank_slice
from temper.data.shards import ShardWriter, write_manifest


def make_data(path, shard_tokens=150, n_tokens=1300, val_tokens=200):
    """Token value == its position in the stream, so a window tells where it came from."""
    train = ShardWriter(path, "train", vocab_size=5000, eot_id=None, shard_tokens=shard_tokens)
    for start in range(0, n_tokens, 50):
        train.add(np.arange(start, min(start + 50, n_tokens)))
    val = ShardWriter(path, "val", vocab_size=5000, eot_id=None)
    val.add(np.arange(4000, 4000 + val_tokens))
    write_manifest(path, vocab_size=5000, eot_id=None, splits={"train": train.close(), "val": val.close()}, stats={})
    return path


def test_windows_are_next_token_pairs(tmp_path):
    w = TokenWindows(make_data(tmp_path), "train", seq_len=8, seed=1)
    x, y = w.batch(0, 64)
    assert x.shape == y.shape == (64, 8) and x.dtype == torch.int64
    assert torch.equal(y[:, :-1], x[:, 1:])
    assert torch.equal(x[:, 1:] - x[:, :-1], torch.ones(64, 7, dtype=torch.int64))  # never spans a shard seam


def test_same_seed_same_order_different_seed_different_order(tmp_path):
    """Row 12."""
    d = make_data(tmp_path)
    a = TokenWindows(d, "train", 8, seed=1).window_ids(0, 100)
    assert np.array_equal(a, TokenWindows(d, "train", 8, seed=1).window_ids(0, 100))
    assert not np.array_equal(a, TokenWindows(d, "train", 8, seed=2).window_ids(0, 100))


@pytest.mark.parametrize("order", ["random", "sequential"])
def test_order_independent_of_world_size_and_micro_batch(tmp_path, order):
    """Row 12: the union of every rank's micro-batches of a step is the single-process batch."""
    w = TokenWindows(make_data(tmp_path), "train", 8, seed=3, order=order)
    global_batch = 8
    for step in range(5):
        start = step * global_batch
        single = w.batch(start, global_batch)[0]
        for world, micro in [(2, 4), (4, 2), (2, 2)]:
            accum = global_batch // (world * micro)
            parts = [w.batch(rank_slice(start, micro, m, r, world), micro)[0]
                     for m in range(accum) for r in range(world)]
            assert torch.equal(torch.cat(parts), single)


def test_sequential_epochs_see_every_window_once_across_resumes(tmp_path):
    """Row 3: 40 windows, 3 epochs; 'resuming' at any sample index changes nothing."""
    d = make_data(tmp_path, shard_tokens=10_000, n_tokens=40 * 8 + 1)
    w = TokenWindows(d, "train", 8, seed=5, order="sequential")
    assert w.num_windows == 40
    ids = w.window_ids(0, 120)
    for epoch in range(3):
        assert sorted(ids[epoch * 40 : (epoch + 1) * 40]) == list(range(40))
    assert not np.array_equal(ids[:40], ids[40:80])  # reshuffled each epoch
    for cut in (17, 40, 17 + 13):  # mid-epoch, boundary, twice within one epoch
        fresh = TokenWindows(d, "train", 8, seed=5, order="sequential")
        resumed = np.concatenate([fresh.window_ids(0, cut), TokenWindows(d, "train", 8, seed=5,
                                  order="sequential").window_ids(cut, 120 - cut)])
        assert np.array_equal(resumed, ids)


def test_too_little_data_is_a_clear_error(tmp_path):
    d = make_data(tmp_path, val_tokens=5)
    with pytest.raises(ValueError, match="fewer than one window"):
        TokenWindows(d, "val", seq_len=8)
