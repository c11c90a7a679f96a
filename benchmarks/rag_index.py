"""RAG indexing and query speed: temper's index against a plain FAISS + sentence-transformers pipeline (issue 19,
Performance; goal: within 1.2x of the peer, equal recall).

Both sides embed the same chunks with the same weights on the CPU, in float32, with the same thread count:

- temper: `temper.rag.embed.load_embedder` (mean pooling, normalised) and `temper.rag.index.Index.build(...,
  dense="flat")`, which embeds, fills a FAISS IndexFlatIP, builds the BM25 index and writes everything with its
  manifest and checksums; queries through `temper.rag.retrieve.retrieve(mode="dense")` (one query at a time:
  embed, check the model against the manifest, search).
- peer: `sentence_transformers.SentenceTransformer` assembled from `models.Transformer` (transformers' AutoModel on
  the very checkpoint directory temper loads), `models.Pooling("mean")` and `models.Normalize()`, as its docs build
  a custom embedder; `encode(batch_size=B)` then `faiss.IndexFlatIP.add`, in memory only (nothing on disk, no
  BM25). A query: `encode([q])` then `search`.

The table gives documents/s and chunks/s of indexing, and each side's median and p90 query latency. temper's
build also does work the peer does not (BM25, files, checksums): the BM25 part is timed on its own and shown in
the note so the ratio can be read both ways.

Recall: a WikiText-2 evaluation set from the same chunks (`temper.rag.evalset.make_eval_set`, the sentence
variant: the query is a sentence of a chunk, its relevant chunks those that hold it); each side's recall@1,
recall@10 and MRR, and the share of queries whose top-10 ids agree between the two. With a random-weight model
(the default, no model is shipped with the data) recall itself is low; what matters is that it is the same.

Model: --model DIR (any checkpoint temper loads, in Hugging Face layout) or, by default, a random Llama-shaped
model (`--preset`, default "debug-llama" widened to --dim/--layers) with a byte-level BPE trained on the corpus.

    python benchmarks/rag_index.py                          # 400 WikiText-2 articles, 128-token chunks
    python benchmarks/rag_index.py --docs 20 --queries 10 --dim 64 --layers 2   # tiny (the test's)
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("TEMPER_SHARED_DATA", ROOT.parent / "shared" / "data"))


def _args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="", help="checkpoint directory (HF layout); default: a random model")
    p.add_argument("--preset", default="debug-llama")
    p.add_argument("--dim", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--vocab", type=int, default=4096)
    p.add_argument("--docs", type=int, default=400, help="WikiText-2 articles (train split) to index")
    p.add_argument("--chunk", type=int, default=128, help="chunk size in tokens")
    p.add_argument("--overlap", type=int, default=16)
    p.add_argument("--batch", type=int, default=32, help="embedding batch size (both sides)")
    p.add_argument("--queries", type=int, default=100)
    p.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", "1")))
    p.add_argument("--json", default="", help="also write the figures here")
    return p.parse_args(argv)


def _articles(n: int) -> list:
    from temper.data.sources import read_documents
    from temper.rag.chunks import split_articles

    out = []
    for doc in read_documents(str(SHARED / "wikitext-2" / "train.txt.gz"), txt_docs="file"):
        for piece in split_articles(doc):
            if len(piece.text.split()) >= 50:  # skip stubs: a heading and a line
                out.append(piece)
            if len(out) == n:
                return out
    return out


def _random_model(args: argparse.Namespace, docs: list, out: Path) -> Path:
    import torch

    from temper.data.tokenizer import HFTokenizer, save_hf_tokenizer, train_tokenizer
    from temper.model.config import PRESETS
    from temper.model.hf.checkpoint import save_hf
    from temper.model.transformer import Transformer

    tok = train_tokenizer((d.text for d in docs), kind="bpe", vocab_size=args.vocab)
    save_hf_tokenizer(HFTokenizer(tok, {"eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>"}), out)
    heads = max(1, args.dim // 64)
    cfg = dataclasses.replace(PRESETS[args.preset], vocab_size=tok.get_vocab_size(), dim=args.dim,
                              n_layers=args.layers, n_heads=heads, n_kv_heads=heads, ffn_dim=args.dim * 3,
                              max_seq_len=max(512, args.chunk * 2))
    torch.manual_seed(0)
    save_hf(Transformer(cfg), cfg, out)
    return out


def _peer(path: Path, max_len: int):
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer import modules as models

    word = models.Transformer(str(path), max_seq_length=max_len)
    if word.tokenizer.pad_token is None:  # padding is masked out of the pool: any id will do
        word.tokenizer.pad_token = word.tokenizer.eos_token or word.tokenizer.convert_ids_to_tokens(0)
    pooling = models.Pooling(word.get_embedding_dimension(), pooling_mode="mean")
    return SentenceTransformer(modules=[word, pooling, models.Normalize()], device="cpu")


def _latency(fn, queries: list[str]) -> list[float]:
    fn(queries[0])  # warm-up
    times = []
    for q in queries:
        t = time.perf_counter()
        fn(q)
        times.append(time.perf_counter() - t)
    return times


def main(argv: list[str] | None = None) -> dict:
    args = _args(argv)
    import faiss
    import numpy as np
    import torch

    torch.set_num_threads(args.threads)
    faiss.omp_set_num_threads(args.threads)
    from temper.rag.chunks import chunk_documents
    from temper.rag.embed import load_embedder
    from temper.rag.evalset import make_eval_set
    from temper.rag.index import Index, _bm25_tokens, _bm25s
    from temper.rag.metrics import retrieval_scores
    from temper.rag.retrieve import retrieve

    docs = _articles(args.docs)
    with tempfile.TemporaryDirectory() as tmp:
        model = Path(args.model) if args.model else _random_model(args, docs, Path(tmp) / "model")
        emb = load_embedder(model, pooling="mean", max_len=args.chunk + 8, batch_size=args.batch)
        chunks = list(chunk_documents(docs, emb.tokenizer, args.chunk, args.overlap))
        texts = [c.text for c in chunks]
        _, labelled = make_eval_set(chunks, args.queries, seed=0, mask=False)
        queries = [q.query for q in labelled]
        peer = _peer(model, emb.max_len)
        emb.encode(texts[:4]), peer.encode(texts[:4], batch_size=args.batch)  # warm-up both

        t = time.perf_counter()
        index = Index.build(Path(tmp) / "index", chunks, emb, dense="flat")
        temper_s = time.perf_counter() - t
        t = time.perf_counter()
        _bm25s().BM25().index(_bm25_tokens(texts), show_progress=False)
        bm25_s = time.perf_counter() - t

        t = time.perf_counter()
        vecs = peer.encode(texts, batch_size=args.batch, convert_to_numpy=True, show_progress_bar=False)
        flat = faiss.IndexFlatIP(vecs.shape[1])
        flat.add(np.ascontiguousarray(vecs, dtype=np.float32))
        peer_s = time.perf_counter() - t

        def temper_query(q: str) -> list[int]:
            return [h.id for h in retrieve(index, q, k=10, mode="dense", embedder=emb)]

        def peer_query(q: str) -> list[int]:
            v = peer.encode([q], convert_to_numpy=True, show_progress_bar=False)
            return [int(i) for i in flat.search(np.ascontiguousarray(v, dtype=np.float32), 10)[1][0] if i >= 0]

        lat_t, lat_p = _latency(temper_query, queries), _latency(peer_query, queries)
        rank_t, rank_p = [temper_query(q) for q in queries], [peer_query(q) for q in queries]
        relevant = [set(q.relevant) for q in labelled]
        rec_t = retrieval_scores(rank_t, relevant, ks=(1, 10))
        rec_p = retrieval_scores(rank_p, relevant, ks=(1, 10))
        agree = sum(a == b for a, b in zip(rank_t, rank_p)) / len(queries)
        max_diff = float(np.abs(emb.encode(texts[:64]) - vecs[:64]).max())

    def ms(xs: list[float], p: float) -> float:
        return 1000 * (statistics.median(xs) if p == 0.5 else sorted(xs)[min(len(xs) - 1, int(p * len(xs)))])

    res = {
        "docs": len(docs), "chunks": len(chunks), "queries": len(queries), "threads": args.threads,
        "model": str(args.model or f"random {args.preset} dim {args.dim} x {args.layers} layers"),
        "temper": {"index_s": temper_s, "bm25_s": bm25_s, "docs_per_s": len(docs) / temper_s,
                   "chunks_per_s": len(chunks) / temper_s, "query_ms_p50": ms(lat_t, 0.5),
                   "query_ms_p90": ms(lat_t, 0.9), **rec_t},
        "peer": {"index_s": peer_s, "docs_per_s": len(docs) / peer_s, "chunks_per_s": len(chunks) / peer_s,
                 "query_ms_p50": ms(lat_p, 0.5), "query_ms_p90": ms(lat_p, 0.9), **rec_p},
        "top10_agreement": agree, "max_vector_diff": max_diff,
    }
    t_, p_ = res["temper"], res["peer"]
    print(f"# RAG indexing: {res['docs']} WikiText-2 articles -> {res['chunks']} chunks of {args.chunk} tokens "
          f"(overlap {args.overlap}), {res['queries']} queries, {args.threads} thread(s), model: {res['model']}\n")
    print("| pipeline | index s | documents/s | chunks/s | query ms p50 | query ms p90 | recall@1 | recall@10 | MRR |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name, r in (("temper Index.build + retrieve", t_), ("FAISS + sentence-transformers", p_)):
        print(f"| {name} | {r['index_s']:.2f} | {r['docs_per_s']:.1f} | {r['chunks_per_s']:.1f} | "
              f"{r['query_ms_p50']:.2f} | {r['query_ms_p90']:.2f} | {r['recall@1']:.3f} | {r['recall@10']:.3f} | "
              f"{r['mrr']:.3f} |")
    print(f"\nindexing time temper / peer: {t_['index_s'] / p_['index_s']:.2f}x (temper's includes BM25: "
          f"{bm25_s:.2f} s, and writing the index; without BM25: {(t_['index_s'] - bm25_s) / p_['index_s']:.2f}x); "
          f"query latency p50 temper / peer: {t_['query_ms_p50'] / p_['query_ms_p50']:.2f}x")
    print(f"top-10 ids identical on {agree:.0%} of queries; largest difference between the two sides' vectors: "
          f"{max_diff:.2e}")
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=2))
    return res


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
