"""Rows of the static KV cache move as whole rows: fork copies one into others, select / write_back take
some out and put them back, reset empties one; nothing else changes."""

import pytest
import torch

from temper.infer.cache import fork, new_cache, reset, select, write_back
from temper.model.config import PRESETS
from temper.model.transformer import Transformer


def _filled():
    model = Transformer(PRESETS["debug-llama"]).eval()
    cache = new_cache(model, 4, 16)
    cache.k.normal_()
    cache.v.normal_()
    cache.lengths.copy_(torch.tensor([3, 5, 7, 9]))
    return model, cache


def test_fork_select_write_back_reset():
    model, cache = _filled()
    k, v = cache.k.clone(), cache.v.clone()
    fork(cache, 1, [0, 3])
    assert cache.lengths.tolist() == [5, 5, 7, 5]
    for r in (0, 3):
        assert torch.equal(cache.k[:, r], k[:, 1]) and torch.equal(cache.v[:, r], v[:, 1])
    assert torch.equal(cache.k[:, 1:3], k[:, 1:3])
    part = select(cache, [2, 0])
    assert part.lengths.tolist() == [7, 5] and torch.equal(part.k[:, 0], cache.k[:, 2])
    part.k.add_(1.0)
    part.lengths.add_(1)
    write_back(cache, [2, 0], part)
    assert cache.lengths.tolist() == [6, 5, 8, 5] and torch.equal(cache.k[:, 2], k[:, 2] + 1)
    reset(cache, [1])
    assert cache.lengths.tolist() == [6, 0, 8, 5]


def test_bad_rows_and_sizes_are_refused():
    model, cache = _filled()
    with pytest.raises(ValueError, match="into itself"):
        fork(cache, 1, [1, 2])
    with pytest.raises(ValueError, match=r"rows must be in \[0, 4\)"):
        reset(cache, [4])
    with pytest.raises(ValueError, match="max_seq_len=128"):
        new_cache(model, 1, 129)


def test_a_window_decodes_its_rows_as_the_whole_cache_does_and_writes_into_it():
    """decode_step on window(cache, 2, 8) gives rows 0 and 1 the logits the whole cache gives them, writes their
    new keys into the cache's own slots, and leaves the rows and slots outside it untouched."""
    from temper.infer.cache import window
    from temper.infer.engine import decode_step, prefill

    torch.manual_seed(0)
    model = Transformer(PRESETS["debug-llama"]).eval()
    whole, cache = new_cache(model, 4, 16), new_cache(model, 4, 16)
    with torch.inference_mode():
        for c in (whole, cache):
            prefill(model, c, [[5, 6, 7], [8, 9, 10, 11, 12], [13], [14, 15]], [0, 1, 2, 3])
        before = cache.k.clone()
        tokens = torch.tensor([[20], [21], [22], [23]])
        expected = decode_step(model, whole, tokens)
        got = decode_step(model, window(cache, 2, 8), tokens[:2])
    torch.testing.assert_close(got, expected[:2], rtol=1e-5, atol=1e-5)
    assert cache.lengths.tolist() == [4, 6, 1, 2]
    torch.testing.assert_close(cache.k[:, :2, :, :6], whole.k[:, :2, :, :6], rtol=1e-5, atol=1e-5)
    assert torch.equal(cache.k[:, 2:], before[:, 2:]) and torch.equal(cache.k[:, :, :, 8:], before[:, :, :, 8:])
