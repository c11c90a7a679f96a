"""Packing and bucketing: a packed row is exactly its documents run one by one; little padding."""

import json

import numpy as np
import pytest
import torch

from temper.data import packing
from temper.data.packing import (
    IGNORE_INDEX,
    Piece,
    bucket_by_length,
    pack_documents,
    pad_batch,
    padding_fraction,
    plan_packing,
)
from temper.model.attention import Segments
from temper.model.config import PRESETS
from temper.model.transformer import Transformer
from temper.train.step import IGNORE_INDEX as TRAIN_IGNORE_INDEX
from temper.train.step import token_loss_sum


def random_docs(n: int, max_len: int, seed: int = 0) -> list[np.ndarray]:
    """Documents whose tokens are all different (a token's value says where it came from)."""
    rng = np.random.default_rng(seed)
    lengths = rng.integers(1, max_len + 1, size=n)
    ends = np.cumsum(lengths)
    return [np.arange(e - n_, e, dtype=np.int64) for e, n_ in zip(ends, lengths)]


def alpaca_lengths(shared_data) -> list[int]:
    """Alpaca-GPT4 instruction examples, tokenised crudely by whitespace."""
    rows = json.loads((shared_data / "alpaca" / "alpaca_gpt4_en_demo.json").read_text())
    return [len(f"{r['instruction']} {r['input']} {r['output']}".split()) for r in rows]


def test_ignore_index_agrees_with_the_train_step():
    assert packing.IGNORE_INDEX == TRAIN_IGNORE_INDEX


@pytest.mark.parametrize("preset", ["debug", "debug-llama"])
def test_packed_rows_give_the_logits_and_loss_of_separate_documents(preset):
    """The key property: attention stops at document boundaries and positions restart, so each
    document's logits in a packed row equal running it alone; the summed loss is the same too."""
    model = Transformer(PRESETS[preset]).eval()
    vocab = model.cfg.vocab_size
    rng = np.random.default_rng(1)
    # 30 > seq_len: split into a full row and a remainder, each run alone as its own document.
    docs = [rng.integers(0, vocab, size=n) for n in (5, 9, 3, 12, 7, 1, 20, 30, 2)]
    batch = pack_documents(docs, seq_len=24)
    assert batch.tokens.shape[1] == 24 and batch.tokens.shape[0] < len(docs)
    with torch.no_grad():
        packed = model(batch.tokens, positions=batch.positions, segments=Segments(batch.doc_ids))  # (B, T, V)
        assert torch.isfinite(packed).all()  # padding rows included
        packed_loss, alone_loss = token_loss_sum(packed, batch.targets), torch.zeros(())
        for r, row in enumerate(batch.pieces):
            col = 0
            for doc, start, stop in row:
                piece = torch.from_numpy(docs[doc][start:stop])[None]  # (1, n)
                alone = model(piece)  # (1, n, V)
                n = stop - start
                torch.testing.assert_close(packed[r, col : col + n], alone[0], rtol=1e-5, atol=1e-5)
                # Alone, the piece predicts its next tokens; a split piece also predicts the token after it.
                target = torch.from_numpy(docs[doc][start + 1 : stop + 1])
                target = torch.cat([target, torch.full((n - len(target),), IGNORE_INDEX)])
                assert torch.equal(batch.targets[r, col : col + n], target)
                alone_loss += token_loss_sum(alone, target[None])
                col += n
    torch.testing.assert_close(packed_loss, alone_loss, rtol=1e-5, atol=1e-4)


def test_bucketed_padded_batch_gives_the_logits_of_separate_documents():
    model = Transformer(PRESETS["debug-llama"]).eval()
    rng = np.random.default_rng(2)
    docs = [rng.integers(0, 256, size=n) for n in (4, 11, 7)]
    batch = pad_batch(docs, [2, 0, 1], pad_to_multiple_of=8)
    assert batch.tokens.shape == (3, 16) and batch.padding_fraction == pytest.approx(1 - 22 / 48)
    with torch.no_grad():
        padded = model(batch.tokens, segments=Segments.padding(batch.doc_ids >= 0))
        for r, i in enumerate([2, 0, 1]):
            n = len(docs[i])
            torch.testing.assert_close(padded[r, :n], model(torch.from_numpy(docs[i])[None])[0],
                                       rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("overflow", ["split", "truncate"])
def test_every_token_appears_exactly_once_and_packing_is_deterministic(overflow):
    docs = random_docs(300, max_len=100, seed=3)
    seq_len = 64
    batch = pack_documents(docs, seq_len, overflow=overflow)
    again = pack_documents(docs, seq_len, overflow=overflow)
    assert batch.pieces == again.pieces and torch.equal(batch.tokens, again.tokens)
    real = batch.doc_ids >= 0
    kept = docs if overflow == "split" else [d[:seq_len] for d in docs]
    assert sorted(batch.tokens[real].tolist()) == sorted(np.concatenate(kept).tolist())
    # Each token is predicted once, from the token before it in its own document.
    expected_targets = np.concatenate([d[1 : len(k) + 1] for d, k in zip(docs, kept)])
    assert sorted(batch.targets[batch.targets != IGNORE_INDEX].tolist()) == sorted(expected_targets.tolist())
    for r, row in enumerate(batch.pieces):
        col = 0
        for k, (_, start, stop) in enumerate(row):
            n = stop - start
            assert torch.equal(batch.positions[r, col : col + n], torch.arange(n))
            assert (batch.doc_ids[r, col : col + n] == k).all()
            col += n
        assert not real[r, col:].any() and real[r, :col].all()  # padding only at the end of a row
    # Best-fit-decreasing leaves little room on these lengths.
    assert batch.padding_fraction < 0.05


def test_loss_mask_is_carried_to_the_targets():
    docs = random_docs(20, max_len=30, seed=4)
    masks = [np.arange(len(d)) >= len(d) // 2 for d in docs]  # learn only the second half ("response")
    batch = pack_documents(docs, 32, loss_masks=masks)
    learnt = np.concatenate([d[m] for d, m in zip(docs, masks)])
    learnt = learnt[~np.isin(learnt, [d[0] for d in docs])]  # a document's first token is never a target
    assert sorted(batch.targets[batch.targets != IGNORE_INDEX].tolist()) == sorted(learnt.tolist())
    with pytest.raises(ValueError, match="loss mask of document 0"):
        pack_documents(docs, 32, loss_masks=[m[:-1] for m in masks])


def test_plan_packing_edges():
    assert plan_packing([0, 0], 8) == []  # empty documents take no room
    assert plan_packing([8, 8], 8) == [[Piece(0, 0, 8)], [Piece(1, 0, 8)]]
    assert plan_packing([5, 3, 4, 4], 8) == [[Piece(0, 0, 5), Piece(1, 0, 3)], [Piece(2, 0, 4), Piece(3, 0, 4)]]
    assert plan_packing([19], 8, overflow="truncate") == [[Piece(0, 0, 8)]]
    assert plan_packing([19], 8) == [[Piece(0, 0, 8)], [Piece(0, 8, 16)], [Piece(0, 16, 19)]]
    with pytest.raises(ValueError, match="seq_len"):
        plan_packing([3], 0)


def test_bucketing_pads_much_less_than_random_batches(shared_data):
    lengths = alpaca_lengths(shared_data)
    n = len(lengths)
    rng = np.random.default_rng(0)
    perm = rng.permutation(n)
    random_batches = [perm[i : i + 16].tolist() for i in range(0, n, 16)]
    bucketed = bucket_by_length(lengths, batch_size=16, seed=0)
    small_pools = bucket_by_length(lengths, batch_size=16, seed=0, pool_size=256)
    pad_random, pad_bucket = padding_fraction(random_batches, lengths), padding_fraction(bucketed, lengths)
    pad_small = padding_fraction(small_pools, lengths)
    assert pad_random > 0.4 and pad_bucket < 0.05 and pad_bucket <= pad_small < pad_random / 3
    for batches in (bucketed, small_pools):
        assert sorted(i for b in batches for i in b) == list(range(n))
        assert all(len(b) <= 16 for b in batches)
    # Packing the same examples into rows of 512 wastes even less.
    packed = pack_documents([np.zeros(k, dtype=np.int64) for k in lengths], 512)
    assert packed.padding_fraction < 0.02


def test_bucketing_by_token_budget_is_deterministic_in_the_seed(shared_data):
    lengths = alpaca_lengths(shared_data)
    a = bucket_by_length(lengths, max_tokens=2048, seed=7)
    assert a == bucket_by_length(lengths, max_tokens=2048, seed=7)
    assert a != bucket_by_length(lengths, max_tokens=2048, seed=8)
    assert a != bucket_by_length(lengths, max_tokens=2048, seed=7, epoch=1)
    assert sorted(i for b in a for i in b) == list(range(len(lengths)))
    assert all(len(b) * max(lengths[i] for i in b) <= 2048 for b in a)
    assert padding_fraction(a, lengths) < 0.05
    with pytest.raises(ValueError, match="more than max_tokens"):
        bucket_by_length(lengths, max_tokens=100, seed=0)
