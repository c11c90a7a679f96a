"""Labelled retrieval sets: read / write the JSONL `temper rag eval` scores, and make one from raw text.

A labelled set is JSON Lines, one query a line: `{"query": str, "relevant": [chunk ids], "answer": str}`
(`answer` optional: a string or a list of gold strings; when given, answers are scored with SQuAD's
exact match and token F1, see metrics.py). Bad lines stop with an `InputError` naming file:line.

`make_eval_set` builds such a set from an index's own chunks, so that the relevant chunk is known
without human labels (WikiText-2's articles in the issue's report). Each query is one interior sentence
of a chunk (a sentence the chunker did not cut), and the relevant ids are every chunk whose text holds
that sentence (with overlapping chunks, usually two). Two variants, and why both:

- `mask=False` ("sentence"): the indexed text is unchanged, so the query appears verbatim in its
  chunk. This leaks the answer: BM25 finds an exact sentence almost always, and so does any
  encoder that embeds surface words, so the scores are an upper bound that says little about
  understanding.
- `mask=True` ("ict", after the inverse cloze task of Lee et al. 2019): the sentence is cut out of
  every chunk that held it and those masked chunks are what gets indexed; the retriever must find
  the passage from what its context says about the sentence. This is the honest variant, and the
  one that separates a trained retriever from BM25 and from an untuned model.

Masking changes a chunk's text only: its id, source, title and position stay, and its token offsets
(start, end) still point at the unmasked document. Queries are picked with a seeded RNG, at most one
per chunk. Nothing here embeds or retrieves.
"""

from __future__ import annotations

import dataclasses
import json
import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, TypeVar

from temper.data.sources import json_records
from temper.errors import InputError
from temper.rag.ict import split_sentences


class _HasText(Protocol):
    id: int
    text: str


C = TypeVar("C", bound=_HasText)


@dataclass(frozen=True)
class LabelledQuery:
    """One query of a labelled set: its text, the relevant chunk ids, and gold answers (may be empty)."""

    query: str
    relevant: tuple[int, ...]
    answers: tuple[str, ...] = ()


def make_eval_set(
    chunks: Sequence[C], n: int, *, seed: int = 0, mask: bool = True, min_words: int = 8, max_words: int = 60
) -> tuple[list[C], list[LabelledQuery]]:
    """Up to `n` queries from `chunks` and the chunks to index for them (see the module docstring).

    A query is an interior sentence of a randomly chosen chunk, with `min_words`..`max_words` words and
    not already used. Returns (chunks to index: masked when `mask`, else the same objects; queries).
    Raises InputError when the chunks hold no usable sentence."""
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    rng = random.Random(f"evalset:{seed}")  # a str seed is hashed with SHA-512: stable across runs
    order = list(range(len(chunks)))
    rng.shuffle(order)
    used: set[str] = set()
    picked: list[str] = []
    for c in order:
        # The first and last pieces of a chunk may be sentences the chunker cut in two: never a query.
        interior = [
            s for s in split_sentences(chunks[c].text)[1:-1] if min_words <= len(s.split()) <= max_words and s not in used
        ]
        if not interior:
            continue
        s = rng.choice(interior)
        used.add(s)
        picked.append(s)
        if len(picked) == n:
            break
    if not picked:
        raise InputError(
            f"no sentence of {min_words}-{max_words} words inside any of the {len(chunks)} chunks to make queries from"
        )
    # Relevance is found by text, not by the chunk the sentence was drawn from: overlapping chunks share it.
    holders: dict[str, list[int]] = {s: [] for s in picked}
    for i, chunk in enumerate(chunks):
        for s in picked:
            if s in chunk.text:
                holders[s].append(i)
    queries = [LabelledQuery(s, tuple(chunks[i].id for i in holders[s])) for s in picked]
    if not mask:
        return list(chunks), queries
    out = list(chunks)
    for s, idx in holders.items():
        for i in idx:
            out[i] = dataclasses.replace(out[i], text=" ".join(out[i].text.replace(s, " ").split()))
    return out, queries


def write_labelled(path: str | Path, queries: Sequence[LabelledQuery]) -> None:
    """Write a labelled set as JSON Lines (the format `read_labelled` and `temper rag eval` read)."""
    with open(path, "w", encoding="utf-8") as f:
        for q in queries:
            rec: dict = {"query": q.query, "relevant": list(q.relevant)}
            if q.answers:
                rec["answer"] = list(q.answers)
            f.write(json.dumps(rec, ensure_ascii=False) + "\n")


def read_labelled(path: str | Path) -> list[LabelledQuery]:
    """Read a labelled set; a bad line raises InputError naming file:line and the field."""
    out = []
    if not Path(path).is_file():
        raise InputError(f"{path}: cannot read the labelled set (no such file)")
    # The readers' JSON Lines parser: gzip, a BOM, invalid UTF-8 and bad JSON named by file:line.
    for where, rec in json_records(Path(path)):
        if isinstance(rec, Exception):
            raise rec
        if not isinstance(rec, dict):
            raise InputError(f"{where}: expected an object with 'query' and 'relevant'")
        query, relevant, answer = rec.get("query"), rec.get("relevant"), rec.get("answer")
        if not isinstance(query, str) or not query.strip():
            raise InputError(f"{where}: 'query' must be a non-empty string")
        if not isinstance(relevant, list) or not all(type(i) is int for i in relevant):
            raise InputError(f"{where}: 'relevant' must be a list of chunk ids (integers)")
        if answer is None:
            answers: tuple[str, ...] = ()
        elif isinstance(answer, str):
            answers = (answer,)
        elif isinstance(answer, list) and answer and all(isinstance(a, str) for a in answer):
            answers = tuple(answer)
        else:
            raise InputError(f"{where}: 'answer' must be a string or a non-empty list of strings")
        out.append(LabelledQuery(query, tuple(relevant), answers))
    if not out:
        raise InputError(f"{path}: the labelled set is empty")
    return out
