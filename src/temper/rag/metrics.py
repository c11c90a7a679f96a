"""Retrieval and answer metrics: recall@k, hit@k, MRR, nDCG@k over ranked ids; SQuAD exact match and token F1.

Retrieval metrics take one query's ranked chunk ids (best first) and the set of ids judged relevant;
`retrieval_scores` averages them over a labelled set. Relevance is binary (a chunk is relevant or not),
so nDCG uses gain 1 and the ideal ranking puts every relevant id first (Jarvelin & Kekalainen 2002).

Answer metrics follow the official SQuAD v1.1 evaluation script exactly: lower-case, drop ASCII
punctuation, drop the articles a/an/the, collapse whitespace; F1 over the bag of whitespace tokens;
the score against several gold answers is the maximum over them (Rajpurkar et al. 2016).

This module does not retrieve, embed or generate: it only scores lists and strings.
"""

from __future__ import annotations

import math
import re
import string
from collections import Counter
from collections.abc import Collection, Sequence

_PUNCT = set(string.punctuation)
_ARTICLES = re.compile(r"\b(a|an|the)\b")


def recall_at_k(ranked: Sequence[int], relevant: Collection[int], k: int) -> float:
    """Share of the relevant ids found in the first k of `ranked` (0 when nothing is relevant)."""
    _check_k(k)
    if not relevant:
        return 0.0
    rel = set(relevant)
    return len(rel.intersection(ranked[:k])) / len(rel)


def hit_at_k(ranked: Sequence[int], relevant: Collection[int], k: int) -> float:
    """1.0 when any relevant id is in the first k of `ranked` (DPR's "top-k accuracy"), else 0.0.

    Differs from recall@k only when a query has several relevant ids (a sentence in two overlapping chunks)."""
    _check_k(k)
    rel = set(relevant)
    return float(any(i in rel for i in ranked[:k]))


def mrr(ranked: Sequence[int], relevant: Collection[int], k: int | None = None) -> float:
    """Reciprocal rank of the first relevant id in `ranked` (cut at k when given), 0 when none is found."""
    rel = set(relevant)
    for rank, i in enumerate(ranked[:k] if k is not None else ranked, start=1):
        if i in rel:
            return 1.0 / rank
    return 0.0


def ndcg_at_k(ranked: Sequence[int], relevant: Collection[int], k: int) -> float:
    """Normalised discounted cumulative gain at k with binary gains: DCG / the best DCG possible."""
    _check_k(k)
    rel = set(relevant)
    if not rel:
        return 0.0
    dcg = sum(1.0 / math.log2(rank + 1) for rank, i in enumerate(ranked[:k], start=1) if i in rel)
    ideal = sum(1.0 / math.log2(rank + 1) for rank in range(1, min(len(rel), k) + 1))
    return dcg / ideal


def retrieval_scores(
    rankings: Sequence[Sequence[int]], relevants: Sequence[Collection[int]], ks: Sequence[int] = (1, 5, 10)
) -> dict[str, float]:
    """Mean recall@k, hit@k and nDCG@k for each k, and mean MRR, over queries: {"recall@1": ..., "mrr": ...}."""
    if len(rankings) != len(relevants):
        raise ValueError(f"{len(rankings)} rankings but {len(relevants)} relevance sets")
    if not rankings:
        raise ValueError("no queries to score")
    n = len(rankings)
    out: dict[str, float] = {}
    for k in ks:
        out[f"recall@{k}"] = sum(recall_at_k(r, g, k) for r, g in zip(rankings, relevants)) / n
    for k in ks:
        out[f"hit@{k}"] = sum(hit_at_k(r, g, k) for r, g in zip(rankings, relevants)) / n
    out["mrr"] = sum(mrr(r, g) for r, g in zip(rankings, relevants)) / n
    for k in ks:
        out[f"ndcg@{k}"] = sum(ndcg_at_k(r, g, k) for r, g in zip(rankings, relevants)) / n
    return out


def normalize_answer(text: str) -> str:
    """SQuAD v1.1's normalisation: lower case, no punctuation, no articles, single spaces."""
    text = "".join(ch for ch in text.lower() if ch not in _PUNCT)
    return " ".join(_ARTICLES.sub(" ", text).split())


def exact_match(prediction: str, answers: str | Sequence[str]) -> float:
    """1.0 when the normalised prediction equals any normalised gold answer, else 0.0."""
    golds = [answers] if isinstance(answers, str) else list(answers)
    pred = normalize_answer(prediction)
    return float(any(pred == normalize_answer(g) for g in golds))


def token_f1(prediction: str, answers: str | Sequence[str]) -> float:
    """SQuAD token F1 of the prediction against the best-matching gold answer."""
    golds = [answers] if isinstance(answers, str) else list(answers)
    return max((_f1(prediction, g) for g in golds), default=0.0)


def _f1(prediction: str, gold: str) -> float:
    pred, ref = normalize_answer(prediction).split(), normalize_answer(gold).split()
    same = sum((Counter(pred) & Counter(ref)).values())
    if same == 0:  # also covers an empty side, as the official script does
        return 0.0
    precision, recall = same / len(pred), same / len(ref)
    return 2 * precision * recall / (precision + recall)


def _check_k(k: int) -> None:
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
