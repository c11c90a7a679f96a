"""Inverse cloze pairs (rag/ict.py) and the InfoNCE loss (train/losses.py) against by-hand and
sentence-transformers references, and its normalisation through `train_step` with accumulation."""

from __future__ import annotations

import copy
import gzip
import math
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F

from temper.model.config import PRESETS
from temper.model.transformer import Transformer
from temper.rag.ict import ict_pairs, split_sentences
from temper.train.losses import IGNORE_INDEX, Batch, InfoNCELoss, info_nce
from temper.train.step import train_step


def _wikitext_articles(shared_data, n: int) -> list[str]:
    lines = gzip.open(shared_data / "wikitext-2" / "valid.txt.gz", "rt", encoding="utf-8").read().splitlines()
    return [line for line in lines if len(line.split()) > 60][:n]


def test_split_sentences_wikitext_spacing():
    assert split_sentences("It rained . Then it stopped ! Why ?  ok") == ["It rained .", "Then it stopped !", "Why ?",
                                                                           "ok"]
    assert split_sentences("   ") == []


def test_ict_pairs_remove_the_query_most_of_the_time_and_are_seeded(shared_data):
    texts = _wikitext_articles(shared_data, 40)
    pairs = ict_pairs(texts, seed=3, passage_sentences=4)
    assert len(pairs) > 40
    removed = [p.query not in p.passage for p in pairs]
    assert 0.75 < sum(removed) / len(pairs) < 0.99  # Lee et al.: removed 90% of the time
    for p in pairs:
        assert len(p.query.split()) >= 4 and p.passage
    assert ict_pairs(texts, seed=3, passage_sentences=4) == pairs
    assert ict_pairs(texts, seed=4, passage_sentences=4) != pairs
    assert all(p.query in p.passage for p in ict_pairs(texts, remove_prob=0.0))
    with pytest.raises(ValueError, match="passage_sentences"):
        ict_pairs(texts, passage_sentences=1)


def test_info_nce_matches_by_hand_and_sentence_transformers():
    g = torch.Generator().manual_seed(0)
    q = F.normalize(torch.randn(6, 8, generator=g, dtype=torch.float64), dim=-1)
    p = F.normalize(torch.randn(6, 8, generator=g, dtype=torch.float64), dim=-1)
    t = 0.1
    by_hand = 0.0
    for i in range(6):
        scores = [float(q[i] @ p[j]) / t for j in range(6)]
        by_hand -= scores[i] - math.log(sum(math.exp(s) for s in scores))
    loss, metrics = info_nce(q, p, t)
    assert loss.item() == pytest.approx(by_hand, rel=1e-12)
    assert metrics["accuracy"].item() == sum(int((q[i] @ p.T).argmax()) == i for i in range(6))

    from sentence_transformers.sentence_transformer.losses.multiple_negatives_ranking import (
        MultipleNegativesRankingLoss,
    )
    labels = torch.arange(6)
    mnrl = MultipleNegativesRankingLoss(None, scale=1 / t)
    assert loss.item() / 6 == pytest.approx(mnrl.compute_loss_from_embeddings([q, p], labels).item(), rel=1e-10)
    sym = MultipleNegativesRankingLoss(None, scale=1 / t, directions=("query_to_doc", "doc_to_query"),
                                       partition_mode="per_direction")
    assert info_nce(q, p, t, symmetric=True)[0].item() / 6 == pytest.approx(
        sym.compute_loss_from_embeddings([q, p], labels).item(), rel=1e-10)


def _mean_pool(model, tokens, mask):
    h = model(tokens, hidden_only=True)  # (N, T, C)
    m = mask.unsqueeze(-1).to(h.dtype)
    return F.normalize((h * m).sum(1) / m.sum(1).clamp(min=1), dim=-1)


def _batch(g: torch.Generator, b: int, vocab: int) -> Batch:
    tokens = torch.randint(1, vocab, (2 * b, 12), generator=g)
    lengths = torch.randint(3, 13, (2 * b,), generator=g)
    mask = torch.arange(12)[None, :] < lengths[:, None]
    return Batch(tokens * mask, torch.full_like(tokens, IGNORE_INDEX), extra={"mask": mask})


def test_accumulated_step_is_the_mean_over_all_queries():
    """Two micro-batches of 3 and 2 queries (each its own in-batch negatives) give the update of the summed loss
    over 5 queries divided by 5: the scaffold's normalisation holds for the contrastive loss."""
    torch.manual_seed(0)
    cfg = replace(PRESETS["debug"], vocab_size=50, dropout=0.0)
    model = Transformer(cfg)
    ref = copy.deepcopy(model)
    g = torch.Generator().manual_seed(1)
    mbs = [_batch(g, 3, 50), _batch(g, 2, 50)]
    loss_fn = InfoNCELoss(_mean_pool, temperature=0.1)
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    result = train_step(model, opt, mbs, step=0, loss_fn=loss_fn, clip_norm=0.0)

    total = sum(loss_fn(ref, mb).loss_sum for mb in mbs) / 5
    total.backward()
    assert result.loss == pytest.approx(total.item(), rel=1e-6)
    assert result.tokens == 5
    for (name, p), p0 in zip(model.named_parameters(), ref.parameters(), strict=True):
        if p0.grad is not None:
            torch.testing.assert_close(p, p0.detach() - p0.grad, rtol=1e-5, atol=1e-6, msg=name)
