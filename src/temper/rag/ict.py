"""Inverse cloze task (ICT): (query, passage) training pairs for a retriever from raw text alone.

Lee et al. 2019 ("Latent Retrieval for Weakly Supervised Open Domain Question Answering", section 5) pretrain
a bi-encoder without labels: a passage is a run of consecutive sentences, the query one of its sentences, and
the positive the passage with that sentence removed most of the time (90%), so the encoder must learn what
the context around a sentence says about it rather than only matching its words; keeping the sentence in 10%
of the time still teaches it that word overlap matters. The other passages of a batch are its negatives
(`train.losses.InfoNCELoss`).

Every choice here (which sentence, whether it is removed) is a function of the seed, the document's index and
the passage's index, so the pairs do not depend on the order they are asked for in.

It does not tokenize, batch or train (recipes/rag.py `train`), nor build an evaluation set (`temper.rag.evalset`).
"""

from __future__ import annotations

import random
import re
from collections.abc import Iterable
from dataclasses import dataclass

_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")


@dataclass(frozen=True)
class Pair:
    """One training example: a query and its positive passage (the in-batch negatives come from other pairs)."""

    query: str
    passage: str


def split_sentences(text: str) -> list[str]:
    """Sentences of `text`: split after '.', '!' or '?' followed by whitespace; blank pieces dropped.

    A plain rule, not a linguistic splitter: abbreviations ("e.g. this") split too, which for ICT only makes
    some queries shorter. WikiText's spaced punctuation ("end . Next") splits the same way."""
    return [s.strip() for s in _SENTENCE_END.split(text) if s.strip()]


def ict_pairs(texts: Iterable[str], *, seed: int = 0, passage_sentences: int = 4, remove_prob: float = 0.9,
              min_query_words: int = 4) -> list[Pair]:
    """ICT pairs from documents: each document's sentences in consecutive windows of `passage_sentences`; from
    each window with at least two sentences one query sentence (of at least `min_query_words` words) chosen at
    random, and the window as its passage, without the query sentence with probability `remove_prob`.

    Windows with no sentence long enough to be a query are skipped. Raises ValueError on impossible settings."""
    if passage_sentences < 2:
        raise ValueError(f"passage_sentences must be >= 2 (a query and its context), got {passage_sentences}")
    if not 0.0 <= remove_prob <= 1.0:
        raise ValueError(f"remove_prob must be in [0, 1], got {remove_prob}")
    pairs = []
    for d, text in enumerate(texts):
        sentences = split_sentences(text)
        for w, lo in enumerate(range(0, len(sentences), passage_sentences)):
            window = sentences[lo : lo + passage_sentences]
            candidates = [i for i, s in enumerate(window) if len(s.split()) >= min_query_words]
            if len(window) < 2 or not candidates:
                continue
            rng = random.Random(f"ict:{seed}:{d}:{w}")  # a str seed is hashed with SHA-512: stable across runs
            q = rng.choice(candidates)
            removed = rng.random() < remove_prob
            passage = " ".join(s for i, s in enumerate(window) if not (removed and i == q))
            pairs.append(Pair(window[q], passage))
    return pairs
