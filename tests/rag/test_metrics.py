"""Retrieval metrics against scikit-learn's nDCG and by-hand values; answer metrics against SQuAD v1.1's rules;
the labelled-set reader's errors; the WikiText-2 evaluation set maker (relevance by text, masking, seeding)."""

from __future__ import annotations

import gzip
import json

import numpy as np
import pytest
from sklearn.metrics import ndcg_score

from temper.errors import InputError
from temper.rag.chunks import Chunk
from temper.rag.evalset import LabelledQuery, make_eval_set, read_labelled, write_labelled
from temper.rag.metrics import (
    exact_match,
    hit_at_k,
    mrr,
    ndcg_at_k,
    normalize_answer,
    recall_at_k,
    retrieval_scores,
    token_f1,
)


def test_recall_and_mrr_by_hand():
    ranked = [7, 3, 9, 1, 4]
    assert recall_at_k(ranked, {3, 4}, 1) == 0.0
    assert recall_at_k(ranked, {3, 4}, 2) == 0.5
    assert recall_at_k(ranked, {3, 4}, 5) == 1.0
    assert recall_at_k(ranked, set(), 5) == 0.0
    assert hit_at_k(ranked, {3, 4}, 1) == 0.0 and hit_at_k(ranked, {3, 4}, 2) == 1.0
    assert mrr(ranked, {9, 4}) == pytest.approx(1 / 3)
    assert mrr(ranked, {9}, k=2) == 0.0
    assert mrr(ranked, {42}) == 0.0
    with pytest.raises(ValueError, match="k must be"):
        recall_at_k(ranked, {3}, 0)


@pytest.mark.parametrize("k", [1, 3, 5, 10])
def test_ndcg_matches_sklearn(k):
    rng = np.random.default_rng(0)
    n = 12
    for _ in range(20):
        relevant = set(rng.choice(n, size=int(rng.integers(1, 4)), replace=False).tolist())
        ranked = rng.permutation(n).tolist()
        # sklearn ranks by score: give the ranked ids decreasing distinct scores.
        scores = np.zeros(n)
        scores[ranked] = np.arange(n, 0, -1)
        truth = np.array([[1.0 if i in relevant else 0.0 for i in range(n)]])
        want = ndcg_score(truth, scores[None], k=k)
        assert ndcg_at_k(ranked, relevant, k) == pytest.approx(want, rel=1e-12, abs=1e-12)


def test_retrieval_scores_average():
    out = retrieval_scores([[1, 2], [3, 4]], [{2}, {5}], ks=(1, 2))
    assert out["recall@1"] == 0.0 and out["recall@2"] == 0.5
    assert out["mrr"] == 0.25 and out["hit@2"] == 0.5
    with pytest.raises(ValueError, match="rankings but"):
        retrieval_scores([[1]], [{1}, {2}])


@pytest.mark.parametrize(
    ("pred", "gold", "em", "f1"),
    [
        ("The Cat!", "cat", 1.0, 1.0),  # case, punctuation and articles go
        ("an  apple, a pear", "apple pear", 1.0, 1.0),
        ("Theodore", "the odore", 0.0, 0.0),  # "the" is removed only as a whole word
        ("the big red dog", "red dog", 0.0, 2 * (2 / 3 * 1) / (2 / 3 + 1)),
        ("dog dog", "dog", 0.0, 2 * (0.5 * 1) / 1.5),  # bag of tokens: repeats count once per match
        ("", "dog", 0.0, 0.0),
        ("a the", "an", 1.0, 0.0),  # both normalise to "": equal, but F1 has no common token
    ],
)
def test_squad_answer_metrics(pred, gold, em, f1):
    assert exact_match(pred, gold) == em
    assert token_f1(pred, gold) == pytest.approx(f1)


def test_squad_max_over_answers_and_normalisation():
    assert normalize_answer("  The  U.S. (army)  ") == "us army"
    assert exact_match("Paris", ["London", "paris."]) == 1.0
    assert token_f1("in Paris France", ["London", "Paris"]) == pytest.approx(0.5)


def _chunks(texts):
    return [Chunk(i, t, f"doc:{i}", "T", i, 0, 1) for i, t in enumerate(texts)]


def test_labelled_roundtrip_and_errors(tmp_path):
    path = tmp_path / "set.jsonl"
    qs = [LabelledQuery("where?", (3, 4), ("here",)), LabelledQuery("what?", (1,))]
    write_labelled(path, qs)
    assert read_labelled(path) == qs
    for bad, msg in [
        ("{not json", "invalid JSON"),
        ('{"query": "", "relevant": [1]}', "'query'"),
        ('{"query": "q", "relevant": ["1"]}', "'relevant'"),
        ('{"query": "q", "relevant": [1], "answer": 3}', "'answer'"),
    ]:
        path.write_text('{"query": "ok", "relevant": [0]}\n' + bad + "\n")
        with pytest.raises(InputError, match=rf"set.jsonl:2: .*{msg}"):
            read_labelled(path)
    path.write_bytes(b'{"query": "ok", "relevant": [0]}\n{"query": "\xff"}\n')  # invalid UTF-8: named, no traceback
    with pytest.raises(InputError, match=r"set.jsonl:2: invalid UTF-8"):
        read_labelled(path)
    path.write_text("\n")
    with pytest.raises(InputError, match="empty"):
        read_labelled(path)
    with pytest.raises(InputError, match="cannot read"):
        read_labelled(tmp_path / "missing.jsonl")


def test_eval_set_relevance_by_text_and_masking():
    shared = "This sentence is shared by two overlapping chunks of the text ."
    chunks = _chunks([
        f"Cut start . {shared} Another full sentence that is long enough to be a query here . end",
        f"start bit . {shared} And one more sentence long enough to be picked as a query . tail",
    ])
    kept, queries = make_eval_set(chunks, 10, seed=1, mask=False)
    assert kept == chunks
    by_query = {q.query: q.relevant for q in queries}
    assert len(queries) == 2 and len(set(by_query)) == 2  # one query per chunk, never the same sentence twice
    if shared in by_query:
        assert by_query[shared] == (0, 1)
    # Boundary pieces ("Cut start .", "end") are never queries.
    assert all(q.query not in ("Cut start .", "end", "tail", "start bit .") for q in queries)
    masked, queries_m = make_eval_set(chunks, 10, seed=1, mask=True)
    assert [q.query for q in queries_m] == [q.query for q in queries]  # the same seed picks the same
    for q in queries_m:
        for i in q.relevant:
            assert q.query not in masked[i].text and masked[i].id == chunks[i].id
    with pytest.raises(InputError, match="no sentence"):
        make_eval_set(_chunks(["too short . really . yes"]), 3)


def test_eval_set_on_wikitext(shared_data):
    with gzip.open(shared_data / "wikitext-2" / "valid.txt.gz", "rt", encoding="utf-8") as f:
        words = f.read().split()[:6000]
    # Overlapping windows of 120 words every 90, as a chunker with overlap would make.
    texts = [" ".join(words[s : s + 120]) for s in range(0, len(words) - 120, 90)]
    chunks = _chunks(texts)
    masked, queries = make_eval_set(chunks, 30, seed=0, mask=True)
    assert len(queries) == 30
    assert make_eval_set(chunks, 30, seed=0)[1] == queries and make_eval_set(chunks, 30, seed=1)[1] != queries
    for q in queries:
        assert 8 <= len(q.query.split()) <= 60 and q.relevant
        assert all(q.query in chunks[i].text and q.query not in masked[i].text for i in q.relevant)
        # Every chunk that holds the sentence is relevant, none that does not.
        assert set(q.relevant) == {c.id for c in chunks if q.query in c.text}
    assert json.loads(json.dumps([list(q.relevant) for q in queries]))
