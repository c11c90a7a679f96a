"""Retrieval over a real index of WikiText-2 chunks: sparse is BM25's ranking, dense the exact cosine ranking
recomputed here with numpy, hybrid their reciprocal-rank fusion; a query embedded by another model, a sparse-only
index asked for dense, an empty query and a bad k each fail with a clear error."""

from dataclasses import replace

import numpy as np
import pytest
import torch

from temper.data.sources import Document
from temper.model.config import PRESETS
from temper.model.hf.checkpoint import save_hf
from temper.model.transformer import Transformer
from temper.rag.chunks import chunk_documents
from temper.rag.embed import load_embedder
from temper.rag.index import EmbedderMismatchError, Index
from temper.rag.retrieve import QueryError, pick_mode, query_embedder, retrieve, retrieve_many, rrf
from tests.rag.tiny import tiny_checkpoint, wikitext_lines


@pytest.fixture
def built(tmp_path, shared_data):
    lines = wikitext_lines(shared_data, 30)
    model = tiny_checkpoint(tmp_path / "enc", lines, context=128, chat=False)
    embedder = load_embedder(model, max_len=64)
    docs = [Document(text, "valid.txt.gz", i + 1) for i, text in enumerate(lines)]
    chunks = list(chunk_documents(docs, embedder.tokenizer, 48, 8))
    index = Index.build(tmp_path / "index", chunks, embedder)
    return index, embedder, lines, tmp_path


def test_sparse_dense_and_hybrid_rankings(built):
    index, embedder, lines, _ = built
    n = len(index.chunks)
    query = lines[3][:120]
    sparse = retrieve(index, query, k=5, mode="sparse")
    assert [(h.id, h.score) for h in sparse] == index.sparse(query, 5)
    assert sparse[0].chunk.source == "valid.txt.gz:4"  # an exact passage of a document is found by BM25

    vecs = embedder.encode([c.text for c in index.chunks])
    q = embedder.encode([query])[0]
    cos = vecs @ q
    dense = retrieve(index, query, k=5, mode="dense", embedder=embedder)
    assert [h.id for h in dense] == list(np.argsort(-cos, kind="stable")[:5])
    np.testing.assert_allclose([h.score for h in dense], np.sort(cos)[::-1][:5], rtol=1e-5, atol=1e-5)

    hybrid = retrieve(index, query, k=5, mode="hybrid", embedder=embedder, depth=n)
    both = [[i for i, _ in index.sparse(query, n)], [i for i, _ in index.dense(embedder.encode([query]), n)[0]]]
    assert [(h.id, h.score) for h in hybrid] == rrf(both)[:5]
    assert all(h.chunk is index.chunks[h.id] for h in hybrid)
    assert pick_mode(index, "auto") == "hybrid"

    queries = [line[:90] for line in lines[:12]]  # padded batches embed as one query at a time does
    for mode in ("sparse", "dense", "hybrid"):
        many = retrieve_many(index, queries, k=5, mode=mode, embedder=embedder)
        assert [[h.id for h in hs] for hs in many] == [[h.id for h in retrieve(index, q, k=5, mode=mode,
                                                                                embedder=embedder)] for q in queries]
    with pytest.raises(QueryError, match="query 2 is empty"):
        retrieve_many(index, ["battle", " "], k=3)


def test_queries_from_another_model_or_bad_queries_fail_clearly(built):
    index, embedder, lines, tmp = built
    other = tiny_checkpoint(tmp / "other", lines[::-1], context=128, chat=False)
    with torch.no_grad():  # the same shape, other weights
        cfg = replace(PRESETS["debug-llama"], vocab_size=embedder.model.cfg.vocab_size, max_seq_len=128)
        torch.manual_seed(1)
        save_hf(Transformer(cfg), cfg, other)
    with pytest.raises(EmbedderMismatchError, match="was built with .*enc.*query embedder is .*other"):
        retrieve(index, "a query", k=3, mode="dense", embedder=load_embedder(other, max_len=64))
    assert query_embedder(index).identity == embedder.identity  # the manifest's model, pooling and token limit
    with pytest.raises(QueryError, match="query is empty"):
        retrieve(index, "   ", k=3)
    with pytest.raises(QueryError, match="k must be >= 1"):
        retrieve(index, "battle", k=0)
    with pytest.raises(QueryError, match="embeds the query"):
        retrieve(index, "battle", k=3, mode="hybrid")
    sparse_only = Index.build(tmp / "sparse", index.chunks, None)
    assert pick_mode(sparse_only, "auto") == "sparse"
    with pytest.raises(QueryError, match="sparse only"):
        query_embedder(sparse_only)
    with pytest.raises(EmbedderMismatchError, match="no dense vectors"):
        retrieve(sparse_only, "battle", k=3, mode="dense", embedder=embedder)
