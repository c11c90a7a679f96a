"""The loader: samples are a pure function of (seed, global index) — rows 3 and 12."""

import numpy as np
import pytest
import torch

from temper.data.loader import MixedWindows, TokenWindows, mixture_counts, rank_slice
from temper.data.shards import ShardWriter, write_manifest


def make_data(path, shard_tokens=150, n_tokens=1300, val_tokens=200, offset=0):
    """Token value == its position in the stream (+ offset), so a window tells where it came from."""
    train = ShardWriter(path, "train", vocab_size=5000, eot_id=None, shard_tokens=shard_tokens)
    for start in range(0, n_tokens, 50):
        train.add(np.arange(start, min(start + 50, n_tokens)) + offset)
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


# ---- mixtures ------------------------------------------------------------------------------------

OFFSETS = (0, 1500, 3000)  # source i's tokens are in [OFFSETS[i], OFFSETS[i] + 1300)


def make_mixture(tmp_path, weights, order="random", block=64, seed=9, **data):
    sources = [TokenWindows(make_data(tmp_path / f"s{i}", offset=OFFSETS[i], **data), "train", 8,
                            seed=seed + i, order=order) for i in range(len(weights))]
    return MixedWindows(sources, weights, seed=seed, block=block)


def source_of_rows(x: torch.Tensor) -> np.ndarray:
    return np.searchsorted(np.array(OFFSETS), x[:, 0].numpy(), side="right") - 1


def test_mixture_counts_by_largest_remainder():
    assert mixture_counts([1, 1, 1], 10).tolist() == [4, 3, 3]
    assert mixture_counts([0.7, 0.2, 0.1], 1024).tolist() == [717, 205, 102]
    assert mixture_counts([3, 1], 1024).tolist() == [768, 256]
    with pytest.raises(ValueError, match="finite and > 0"):
        mixture_counts([1, 0], 10)


@pytest.mark.parametrize("weights", [[3, 1], [0.7, 0.2, 0.1]])
def test_mixture_draws_each_source_in_exact_proportion(tmp_path, weights):
    mix = make_mixture(tmp_path, weights, block=100)
    x, y = mix.batch(0, 1000)
    assert torch.equal(y[:, :-1], x[:, 1:])
    src = source_of_rows(x)
    assert np.array_equal(src, mix.sample_sources(0, 1000)[0])
    share = np.bincount(src, minlength=len(weights)) / 1000
    np.testing.assert_allclose(share, np.array(weights) / sum(weights), atol=1e-12)  # whole blocks: exact
    for start in (0, 37, 512):  # any window of a few blocks stays within 1/block per block of the weights
        part = np.bincount(source_of_rows(mix.batch(start, 250)[0]), minlength=len(weights)) / 250
        np.testing.assert_allclose(part, np.array(weights) / sum(weights), atol=0.02)
    # The blocks are shuffled differently: the sources do not repeat one fixed pattern.
    assert not np.array_equal(src[:100], src[100:200])


def test_mixture_is_deterministic_and_independent_of_slicing(tmp_path):
    """Row 12 for mixtures: same seed same samples; ranks, micro-batches and resumes slice one order."""
    mix = make_mixture(tmp_path, [2, 1])
    x = mix.batch(0, 400)[0]
    same = MixedWindows(mix.sources, [2, 1], seed=mix.seed, block=mix.block).batch(0, 400)[0]
    assert torch.equal(x, same)
    other = MixedWindows(mix.sources, [2, 1], seed=mix.seed + 1, block=mix.block).batch(0, 400)[0]
    assert not torch.equal(x, other)
    for world, micro in [(2, 4), (4, 2), (2, 2)]:
        global_batch = 16
        accum = global_batch // (world * micro)
        parts = [mix.batch(rank_slice(start, micro, m, r, world), micro)[0]
                 for start in range(0, 400, global_batch) for m in range(accum) for r in range(world)]
        assert torch.equal(torch.cat(parts), x)
    # A resumed run builds a fresh loader and continues at any cut, also mid-block and across blocks.
    rng = np.random.default_rng(0)
    cuts = np.sort(rng.choice(np.arange(1, 400), size=12, replace=False)).tolist()
    def fresh() -> MixedWindows:
        return MixedWindows([TokenWindows(s.data_dir, "train", 8, seed=s.seed, order=s.order) for s in mix.sources],
                            [2, 1], seed=mix.seed, block=mix.block)

    chunks = [fresh().batch(a, b - a)[0] for a, b in zip([0, *cuts], [*cuts, 400])]
    assert torch.equal(torch.cat(chunks), x)


def test_each_source_is_read_as_its_own_stream_so_sequential_epochs_stay_whole(tmp_path):
    """Row 3 for mixtures: a source's samples are its windows 0, 1, 2, ... in its own order, so with
    order=sequential each source sees each window exactly once per its own epoch."""
    mix = make_mixture(tmp_path, [1, 3], order="sequential", block=8, shard_tokens=10_000,
                       n_tokens=40 * 8 + 1)
    x = mix.batch(0, 320)[0]
    src, local = mix.sample_sources(0, 320)
    for i, source in enumerate(mix.sources):
        assert source.num_windows == 40
        assert np.array_equal(local[src == i], np.arange((src == i).sum()))
        assert torch.equal(x[torch.from_numpy(src == i)], source.batch(0, int((src == i).sum()))[0])
        ids = source.window_ids(0, int((src == i).sum()))
        for epoch in range(len(ids) // 40):
            assert sorted(ids[epoch * 40 : (epoch + 1) * 40]) == list(range(40))


def test_mixture_rejects_what_it_cannot_honour(tmp_path):
    a = TokenWindows(make_data(tmp_path / "a"), "train", 8)
    b = TokenWindows(make_data(tmp_path / "b"), "train", 16)
    with pytest.raises(ValueError, match="different seq_len"):
        MixedWindows([a, b], [1, 1])
    with pytest.raises(ValueError, match="2 sources need as many weights"):
        MixedWindows([a, a], [1])
    with pytest.raises(ValueError, match="gets no sample in a block of 64"):
        MixedWindows([a, a], [1, 1e-4], block=64)
