"""Chunking, embedding and the on-disk index on real WikiText-2 text with a tiny model: windows and overlap against
the tokenizer's own offsets, pooling against its definition and batching against one text at a time, search
against a brute-force reference, incremental add against a full build, and every bad input (empty collection,
another model, a damaged file) refused with a clear error; `temper rag index` end to end."""

import gzip
import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from temper.__main__ import main as temper_main
from temper.data.sources import Document, read_documents
from temper.errors import InputError
from temper.rag.chunks import chunk_document, chunk_documents, split_articles, title_of
from temper.rag.embed import load_embedder, pool
from temper.rag.index import (
    CorruptIndexError,
    EmbedderMismatchError,
    EmptyCollectionError,
    Index,
    RagIndexError,
)
from tests.rag.tiny import tiny_checkpoint

WIKI_HEAD = 4000  # lines of WikiText-2's test split read by these tests: a dozen articles


@pytest.fixture(scope="module")
def wiki_file(tmp_path_factory) -> Path:
    from tests.conftest import SHARED_DATA

    src = SHARED_DATA / "wikitext-2" / "test.txt.gz"
    if not src.exists():
        pytest.skip(f"shared data not found at {SHARED_DATA}")
    out = tmp_path_factory.mktemp("wiki") / "wiki.txt"
    with gzip.open(src, "rt", encoding="utf-8") as f:
        out.write_text("".join(line for _, line in zip(range(WIKI_HEAD), f, strict=False)), encoding="utf-8")
    return out


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory, wiki_file) -> Path:
    lines = [ln for ln in wiki_file.read_text(encoding="utf-8").splitlines() if ln.strip()][:300]
    torch.manual_seed(0)
    return tiny_checkpoint(tmp_path_factory.mktemp("ckpt"), lines, chat=False)


@pytest.fixture(scope="module")
def embedder(ckpt):
    torch.set_num_threads(1)
    return load_embedder(ckpt, max_len=96, batch_size=8)


@pytest.fixture(scope="module")
def chunks(wiki_file, embedder):
    docs = read_documents([str(wiki_file)])
    return list(chunk_documents(docs, embedder.tokenizer, 64, 16, articles=True))[:240]


# ---- chunks ----------------------------------------------------------------------------------------


def test_windows_overlap_and_map_back_to_the_documents_text(wiki_file, embedder):
    doc = split_articles(next(iter(read_documents([str(wiki_file)]))))[0]
    spans = embedder.tokenizer.tokenizer.encode(doc.text, add_special_tokens=False).offsets
    size, overlap = 50, 12
    chunks = chunk_document(doc.text, "src", "T", embedder.tokenizer, size, overlap, first_id=7)
    assert [c.id for c in chunks] == list(range(7, 7 + len(chunks)))
    assert [c.position for c in chunks] == list(range(len(chunks)))
    assert [c.start for c in chunks] == list(range(0, (size - overlap) * len(chunks), size - overlap))
    assert all(c.end - c.start == size for c in chunks[:-1]) and chunks[-1].end == len(spans)
    for c in chunks:  # the chunk is the document's own text between its first and last token
        assert c.text == doc.text[spans[c.start][0]:spans[c.end - 1][1]].strip()
    assert chunk_document("", "s", "t", embedder.tokenizer, 8, 2) == []
    for size, overlap in [(0, 0), (8, 8), (8, -1)]:
        with pytest.raises(InputError, match="chunk"):
            chunk_document(doc.text, "s", "t", embedder.tokenizer, size, overlap)


def test_articles_split_at_top_level_headings_and_carry_their_titles(wiki_file):
    doc = next(iter(read_documents([str(wiki_file)])))
    articles = split_articles(doc)
    titles = [title_of(a) for a in articles]
    # WikiText's article lines are exactly " = Title = " (sections "= = ... = =", table rows "= x" do not count)
    heads = [ln[3:-3] for ln in doc.text.split("\n") if re.fullmatch(r" = [^=].* = ", ln)]
    assert titles == heads and len(titles) > 3  # one document per article, titled by its heading
    assert "Robert <unk>" in titles[0]
    # each piece starts on the line of its heading in the file
    file_lines = wiki_file.read_text(encoding="utf-8").split("\n")
    assert all(file_lines[a.line - 1].strip() == f"= {t} =" for a, t in zip(articles, titles, strict=True))
    assert title_of(Document("plain text", "/x/notes.txt", 1)) == "notes.txt"
    assert title_of(Document("x", "f.jsonl", 3, meta={"title": "Meta title"})) == "Meta title"


# ---- embed -----------------------------------------------------------------------------------------


def test_pool_matches_its_definition_and_is_differentiable():
    torch.manual_seed(0)
    hidden = torch.randn(3, 5, 4, requires_grad=True)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]], dtype=torch.bool)
    mean = torch.stack([hidden[0, :3].mean(0), hidden[1].mean(0), hidden[2, 0]])
    last = torch.stack([hidden[0, 2], hidden[1, 4], hidden[2, 0]])
    for kind, ref in (("mean", mean), ("last", last)):
        out = pool(hidden, mask, kind)
        torch.testing.assert_close(out, ref / ref.norm(dim=-1, keepdim=True), rtol=1e-6, atol=1e-6)
    pool(hidden, mask, "mean").sum().backward()
    assert hidden.grad is not None and hidden.grad[0, 3:].abs().sum() == 0  # padding gets no gradient
    with pytest.raises(ValueError, match="no tokens"):
        pool(hidden, torch.zeros(3, 5, dtype=torch.bool), "mean")


@pytest.mark.parametrize("pooling", ["mean", "last"])
def test_batched_encoding_equals_one_text_at_a_time(ckpt, chunks, pooling):
    emb = load_embedder(ckpt, pooling=pooling, max_len=96, batch_size=5)
    texts = [c.text for c in chunks[:12]] + ["short", chunks[0].text * 4]  # a text past max_len is cut
    batched = emb.encode(texts)
    single = np.concatenate([emb.encode([t]) for t in texts])
    assert batched.shape == (len(texts), emb.dim) and batched.dtype == np.float32
    np.testing.assert_allclose(batched, single, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(batched, axis=1), 1.0, rtol=1e-5)
    # by hand: the model's final hidden states, pooled
    ids = emb.tokenizer.encode(texts[1])
    with torch.no_grad():
        hidden = emb.model(torch.tensor([ids]), hidden_only=True)
    ref = pool(hidden, torch.ones(1, len(ids), dtype=torch.bool), pooling).numpy()
    np.testing.assert_allclose(batched[1:2], ref, rtol=1e-5, atol=1e-5)
    assert emb.identity["pooling"] == pooling and emb.identity["dim"] == emb.dim


def test_a_trained_retrievers_settings_are_its_defaults(tmp_path, ckpt, embedder):
    root = tmp_path / "retriever"
    root.mkdir()
    for p in ckpt.iterdir():
        (root / p.name).write_bytes(p.read_bytes())
    (root / "retriever.json").write_text(json.dumps({"pooling": "last", "max_len": 40}))
    emb = load_embedder(root)
    assert (emb.pooling, emb.max_len) == ("last", 40)
    assert emb.identity["weights_sha256"] == embedder.identity["weights_sha256"]  # same weights, same fingerprint
    assert load_embedder(root, pooling="mean", max_len=20).identity["pooling"] == "mean"  # flags win
    for bad in ('{"pooling": "max"}', '{"max_len": "x"}', "[1]", "{"):
        (root / "retriever.json").write_text(bad)
        with pytest.raises(InputError):
            load_embedder(root)


# ---- index -----------------------------------------------------------------------------------------


def _brute_dense(vecs: np.ndarray, q: np.ndarray, k: int) -> list[int]:
    return list(np.argsort(-(vecs @ q))[:k])


def test_search_matches_brute_force_and_survives_reopening(tmp_path, chunks, embedder):
    index = Index.build(tmp_path / "idx", chunks, embedder, chunking={"size": 64})
    assert index.manifest["dense"]["kind"] == "flat" and index.manifest["chunks"] == len(chunks)
    index = Index.open(tmp_path / "idx")
    assert index.chunks == chunks and index.manifest["chunking"] == {"size": 64}
    vecs = embedder.encode([c.text for c in chunks])
    queries = [chunks[i].text[:80] for i in (3, 50, 200)]
    qv = embedder.encode(queries)
    for row, q in zip(index.dense(qv, 5), qv, strict=True):
        assert [i for i, _ in row] == _brute_dense(vecs, q, 5)
        np.testing.assert_allclose([s for _, s in row], np.sort(vecs @ q)[::-1][:5], rtol=1e-5, atol=1e-5)
    import bm25s

    ref = bm25s.BM25()
    ref.index(bm25s.tokenize([c.text for c in chunks], stopwords="en", show_progress=False), show_progress=False)
    for i, q in zip((3, 50, 200), queries, strict=True):
        hits = index.sparse(q, 5)
        assert hits[0][0] == i  # the chunk a query was cut from is BM25's best
        want, scores = ref.retrieve(bm25s.tokenize([q], stopwords="en", return_ids=False, show_progress=False),
                                    k=5, show_progress=False)
        assert [h for h, _ in hits] == [int(x) for x in want[0]]
        np.testing.assert_allclose([s for _, s in hits], scores[0], rtol=1e-6)
    assert index.sparse("zzzzqqq", 5) == []  # no shared term: nothing, rather than arbitrary chunks
    assert len(index.dense(qv[:1], 10_000)[0]) == len(chunks)  # k past the collection: all of it


def test_add_equals_a_full_build(tmp_path, chunks, embedder):
    full = Index.build(tmp_path / "full", chunks, embedder)
    part = Index.build(tmp_path / "part", chunks[:150], embedder)
    part.add(chunks[150:], embedder)
    part = Index.open(tmp_path / "part")
    assert part.chunks == full.chunks
    qv = embedder.encode([chunks[i].text[:60] for i in (10, 160, 230)])
    for a, b in zip(part.dense(qv, 8), full.dense(qv, 8), strict=True):
        assert [i for i, _ in a] == [i for i, _ in b]
        np.testing.assert_allclose([s for _, s in a], [s for _, s in b], rtol=1e-5, atol=1e-5)
    for i in (10, 160, 230):
        q = chunks[i].text[:60]
        a, b = part.sparse(q, 8), full.sparse(q, 8)
        assert [x for x, _ in a] == [x for x, _ in b]
        np.testing.assert_allclose([s for _, s in a], [s for _, s in b], rtol=1e-6)
    with pytest.raises(RagIndexError, match="chunk ids must run 240"):
        part.add(chunks[:3], embedder)
    # only the current generation's files stay on disk
    names = {p.relative_to(tmp_path / "part").as_posix() for p in (tmp_path / "part").rglob("*") if p.is_file()}
    assert names == {*part.manifest["files"], "manifest.json"}


def test_an_add_killed_before_its_manifest_leaves_the_previous_index_whole(tmp_path, chunks, embedder, ckpt):
    Index.build(tmp_path / "idx", chunks[:100], embedder, chunking={"size": 64, "overlap": 16})
    before = Index.open(tmp_path / "idx")
    more = tmp_path / "more.txt"
    more.write_text("\n\n".join(c.text for c in chunks[100:110]), encoding="utf-8")
    # the manifest's chunking must match --add's: rewrite it as the command records it
    from temper.recipes.rag import IndexConfig, _chunking

    chunking = _chunking(IndexConfig(chunk_size=64, overlap=16), embedder.tokenizer)
    before.manifest["chunking"] = chunking
    (tmp_path / "idx" / "manifest.json").write_text(json.dumps(before.manifest))
    cmd = [sys.executable, "-m", "temper", "rag", "index", f"--inputs=[{more}]", f"--out={tmp_path / 'idx'}",
           f"--model={ckpt}", "--chunk_size=64", "--overlap=16", "--max_len=96", "--txt_docs=paragraph",
           "--device=cpu", "--add"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TEMPER_FAULT": "kill_during_index_save:step=1"}
    killed = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    after = Index.open(tmp_path / "idx")  # the old generation, checksums and all
    assert after.chunks == before.chunks and after.manifest == before.manifest
    env.pop("TEMPER_FAULT")
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    final = Index.open(tmp_path / "idx")  # adding again works over the leftovers, and leaves none
    assert len(final.chunks) > 100 and final.manifest["generation"] == 1
    names = {p.relative_to(tmp_path / "idx").as_posix() for p in (tmp_path / "idx").rglob("*") if p.is_file()}
    assert names == {*final.manifest["files"], "manifest.json"}


@pytest.mark.parametrize("kind", ["hnsw", "ivf"])
def test_approximate_kinds_find_what_flat_finds(tmp_path, chunks, embedder, kind):
    flat = Index.build(tmp_path / "flat", chunks, embedder, dense="flat")
    approx = Index.build(tmp_path / kind, chunks, embedder, dense=kind)
    approx = Index.open(tmp_path / kind)
    assert approx.manifest["dense"]["kind"] == kind
    qv = embedder.encode([c.text for c in chunks[::10]])
    a, f = approx.dense(qv, 1), flat.dense(qv, 1)
    agree = np.mean([x[0][0] == y[0][0] for x, y in zip(a, f, strict=True)])
    assert agree >= 0.9, f"{kind} top-1 agrees with exact search on {agree:.0%} of self-queries"


def test_bad_input_gives_clear_errors(tmp_path, chunks, embedder, ckpt):
    with pytest.raises(EmptyCollectionError, match="no chunks"):
        Index.build(tmp_path / "empty", [], embedder)
    with pytest.raises(RagIndexError, match="no manifest.json"):
        Index.open(tmp_path / "nothing")
    index = Index.build(tmp_path / "idx", chunks[:40], embedder)
    # another model: the same shape, other weights
    other_root = tmp_path / "other"
    other_root.mkdir()
    for p in ckpt.iterdir():
        (other_root / p.name).write_bytes(p.read_bytes())
    from temper.model.hf.checkpoint import load_hf, save_hf

    model, cfg = load_hf(other_root)
    with torch.no_grad():
        model.tok_emb.weight.mul_(1.5)
    save_hf(model, cfg, other_root)
    other = load_embedder(other_root, max_len=96)
    with pytest.raises(EmbedderMismatchError, match=f"built with {ckpt}.*query embedder is {other_root}"):
        index.check_embedder(other)
    with pytest.raises(EmbedderMismatchError, match="pooling"):
        index.check_embedder(load_embedder(ckpt, pooling="last", max_len=96))
    with pytest.raises(EmbedderMismatchError):
        index.add(chunks[40:45], other)
    with pytest.raises(EmbedderMismatchError, match="dim"):
        index.dense(np.zeros((1, 3), np.float32), 2)
    index.check_embedder(embedder)  # the same model, loaded again, passes
    # damaged on disk: one byte of the vectors, a truncated chunk file
    dense_file = tmp_path / "idx" / index.manifest["dense"]["file"]
    data = bytearray(dense_file.read_bytes())
    data[-5] ^= 0xFF
    dense_file.write_bytes(bytes(data))
    with pytest.raises(CorruptIndexError, match=f"{dense_file.name} does not match its checksum"):
        Index.open(tmp_path / "idx")
    Index.build(tmp_path / "idx2", chunks[:40], None)  # sparse only
    sparse = Index.open(tmp_path / "idx2")
    assert not sparse.has_dense and sparse.sparse(chunks[2].text, 1)[0][0] == 2
    with pytest.raises(EmbedderMismatchError, match="sparse only"):
        sparse.check_embedder(embedder)
    (tmp_path / "idx2" / sparse.manifest["bm25_dir"] / "vocab.index.json").unlink()
    with pytest.raises(CorruptIndexError, match="vocab.index.json is missing"):
        Index.open(tmp_path / "idx2")


# ---- the command -----------------------------------------------------------------------------------


def test_rag_index_command_builds_adds_and_refuses(tmp_path, wiki_file, ckpt, capsys):
    lines = wiki_file.read_text(encoding="utf-8").split("\n")
    first, second = tmp_path / "a.txt", tmp_path / "b.jsonl"
    first.write_text("\n".join(lines[:1500]), encoding="utf-8")
    records = [{"text": "Lasers are devices that emit coherent light .", "title": "Laser", "id": "doc-1"},
               {"text": "A harbour is a sheltered body of water .", "title": "Harbour", "id": "doc-2"}]
    second.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    out = tmp_path / "index"
    common = [f"--out={out}", f"--model={ckpt}", "--chunk_size=48", "--overlap=8", "--max_len=64", "--device=cpu"]
    assert temper_main(["rag", "index", f"--inputs=[{first}]", "--articles", *common]) == 0
    n = Index.open(out).manifest["chunks"]
    assert f"-> {n} chunks indexed" in capsys.readouterr().out
    assert temper_main(["rag", "index", f"--inputs=[{second}]", "--add", "--id_field=id", *common]) == 0
    index = Index.open(out)
    assert len(index.chunks) == n + 2
    assert [(c.source, c.title) for c in index.chunks[n:]] == [("doc-1", "Laser"), ("doc-2", "Harbour")]
    assert index.sparse("coherent light lasers", 1)[0][0] == n
    assert index.chunks[0].title == title_of(split_articles(Document(first.read_text(), str(first), 1))[0])
    capsys.readouterr()
    # adding with other chunking settings, or nothing at all, is refused in one line with exit code 2
    assert temper_main(["rag", "index", f"--inputs=[{second}]", "--add", *common[:-3], "--overlap=4",
                        "--max_len=64", "--device=cpu"]) == 2
    assert "chunked with" in capsys.readouterr().err
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n", encoding="utf-8")
    assert temper_main(["rag", "index", f"--inputs=[{empty}]", f"--out={tmp_path / 'e'}", f"--model={ckpt}",
                        "--chunk_size=48", "--max_len=64", "--device=cpu"]) == 2
    assert "no chunks" in capsys.readouterr().err
    assert temper_main(["rag", "index", f"--inputs=[{first}]", f"--out={tmp_path / 'x'}", "--chunk_size=100",
                        f"--model={ckpt}", "--max_len=64", "--device=cpu"]) == 2
    assert "exceeds the embedder's max_len" in capsys.readouterr().err
    assert temper_main(["rag", "nope"]) == 2
