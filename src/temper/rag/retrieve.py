"""Top-k retrieval over a `temper.rag.index.Index`: sparse (BM25), dense (embeddings), or hybrid.

Hybrid fuses the two rankings with reciprocal-rank fusion (Cormack, Clarke & Buettcher, 2009:
score(d) = sum over rankings of 1 / (k + rank(d)), rank from 1, k = 60), which needs no score
calibration between BM25 and cosine similarities. Each ranking is taken `depth` deep (at least k)
before fusing, so a chunk ranked well by one retriever and missed by the other still competes.

It does not build or change an index (`temper.rag.index`), embed documents (`temper.rag.embed`),
or build prompts (`temper.rag.answer`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

from temper.errors import InputError

if TYPE_CHECKING:
    from temper.rag.chunks import Chunk
    from temper.rag.embed import Embedder
    from temper.rag.index import Index

Mode = Literal["sparse", "dense", "hybrid"]
MODES: tuple[str, ...] = ("sparse", "dense", "hybrid")
RRF_K = 60
"""Reciprocal-rank fusion's constant, Cormack et al.'s: it damps the weight of the very first ranks."""


class QueryError(InputError):
    """A query that cannot be answered as given: empty, longer than the prompt's budget, a bad k or mode."""


@dataclass(frozen=True)
class Hit:
    """One retrieved chunk and its score (BM25, cosine similarity, or the fused RRF score), best first."""

    chunk: Chunk
    score: float

    @property
    def id(self) -> int:
        return self.chunk.id


def rrf(rankings: Sequence[Sequence[int]], k: int = RRF_K) -> list[tuple[int, float]]:
    """Reciprocal-rank fusion of ranked id lists (best first): (id, sum of 1 / (k + rank)), best first.

    Ties keep the order in which ids first appear across the rankings, so the result is deterministic."""
    if k < 0:
        raise ValueError(f"rrf k must be >= 0, got {k}")
    scores: dict[int, float] = {}
    for ranking in rankings:
        for rank, i in enumerate(ranking, start=1):
            scores[i] = scores.get(i, 0.0) + 1.0 / (k + rank)
    order = {i: n for n, i in enumerate(scores)}  # dicts keep first-insertion order
    return sorted(scores.items(), key=lambda item: (-item[1], order[item[0]]))


def pick_mode(index: Index, mode: str) -> Mode:
    """"auto": hybrid when the index holds dense vectors, else sparse; any other mode as given (checked)."""
    if mode == "auto":
        return "hybrid" if index.has_dense else "sparse"
    if mode not in MODES:
        raise QueryError(f"mode must be auto, {', '.join(MODES)}, got {mode!r}")
    return mode  # type: ignore[return-value]


def query_embedder(index: Index, path: str = "", *, device: str = "cpu") -> Embedder:
    """The model that embeds queries for `index`: the one its manifest names (its pooling and token limit),
    or the checkpoint at `path`, which `retrieve` then checks against the manifest."""
    from temper.rag.embed import load_embedder

    identity = index.manifest.get("embedder")
    if not identity:
        raise QueryError(f"index {index.root} was built sparse only (no embedding model): use mode sparse")
    return load_embedder(path or identity["model"], pooling=identity.get("pooling"), max_len=identity.get("max_len"),
                         device=device)


def retrieve(index: Index, query: str, *, k: int, mode: Mode = "sparse", embedder: Embedder | None = None,
             depth: int | None = None) -> list[Hit]:
    """The k chunks of `index` best matching `query`, best first.

    mode: "sparse" (BM25), "dense" (the query embedded by `embedder`, which must be the model the index was
    built with: checked, naming both), or "hybrid" (both, fused by `rrf`). depth: how deep each ranking is
    read before fusing (None: max(k, 100))."""
    return retrieve_many(index, [query], k=k, mode=mode, embedder=embedder, depth=depth)[0]


def retrieve_many(index: Index, queries: Sequence[str], *, k: int, mode: Mode = "sparse",
                  embedder: Embedder | None = None, depth: int | None = None) -> list[list[Hit]]:
    """`retrieve` for each of `queries`, in order: the dense side embeds them in the embedder's batches and
    searches FAISS once, which an evaluation set of hundreds of queries needs (one query per forward pass
    leaves the CPU's matrix units mostly idle)."""
    if mode not in MODES:
        raise QueryError(f"mode must be one of {', '.join(MODES)}, got {mode!r}")
    if k < 1:
        raise QueryError(f"k must be >= 1, got {k}")
    empty = next((i for i, q in enumerate(queries) if not q.strip()), None)
    if empty is not None:
        where = f"query {empty + 1} is empty" if len(queries) > 1 else "the query is empty"
        raise QueryError(f"{where}: give the question to retrieve passages for")
    if mode != "sparse" and embedder is None:
        raise QueryError(f"mode {mode!r} embeds the query: give the embedding model (the index's)")
    n = len(index.chunks)
    deep = min(n, max(k, depth if depth is not None else 100))
    dense: list[list[tuple[int, float]]] = []
    if mode in ("dense", "hybrid") and queries:
        assert embedder is not None
        index.check_embedder(embedder)
        dense = index.dense(embedder.encode(list(queries)), deep)
    out = []
    for i, query in enumerate(queries):
        rankings = ([index.sparse(query, deep)] if mode in ("sparse", "hybrid") else []) + ([dense[i]] if dense else [])
        fused = rankings[0] if len(rankings) == 1 else rrf([[c for c, _ in r] for r in rankings])
        out.append([Hit(index.chunks[c], float(s)) for c, s in fused[:k]])  # a chunk's id is its row (rag.index)
    return out
