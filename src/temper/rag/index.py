"""A retrieval index on disk: chunks, a sparse BM25 index (bm25s) and a dense FAISS index, with a manifest.

Layout of an index directory (G: the generation, one more at each build or add):
  manifest.json   format version, generation, the embedding model's identity (`temper.rag.embed.Embedder.identity`),
                  the chunking settings, the dense index kind, and the sha256 of every other file
  chunks-G.jsonl  one `Chunk` per line, ids 0 .. n-1 in order (a chunk's id is its row in both indexes)
  dense-G.faiss   the chunks' unit vectors: IndexFlatIP (exact), HNSW or IVF (approximate), inner product
  bm25-G/         bm25s' own files (numpy arrays without pickle, JSON vocabulary and parameters)

Dense kind "auto": exact (flat) up to 100k chunks, HNSW (32 links, efSearch 64) above; "ivf" (nlist about
4 sqrt(n), nprobe 16, trained on the chunks it is built with) and "none" (sparse only) on request.

`add` appends chunks: their vectors only are computed and added to the FAISS index (no re-embedding of
what is indexed). BM25's statistics (document frequencies, average length) depend on every chunk, so
the sparse index is re-indexed from the stored texts, which costs tokenizing text, not running a model.

A save writes generation G+1's files beside G's, then the manifest naming them (atomically: the commit),
then removes G's: an interrupted build or add leaves the previous index whole. `Index.open` verifies
each checksum, so an index damaged on disk is refused naming the file, and a
query embedder is checked against the manifest's (`check_embedder`), so an index built with one model
is never searched with another's vectors.

It does not chunk, embed, fuse rankings or answer (`temper.rag.retrieve`, `temper.rag.answer`).
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path
from typing import Any

import numpy as np

from temper import faults
from temper.errors import InputError
from temper.files import atomic_write_json, safe_join, sha256_file
from temper.rag.chunks import Chunk
from temper.rag.embed import Embedder

FORMAT = "temper-rag-index"
VERSION = 1
DENSE_KINDS = ("auto", "flat", "hnsw", "ivf", "none")
FLAT_MAX = 100_000
HNSW_M, HNSW_EF_SEARCH, IVF_NPROBE = 32, 64, 16
STOPWORDS = "en"
_IDENTITY_KEYS = ("weights_sha256", "pooling", "max_len", "dim")


class RagIndexError(InputError):
    """A retrieval index that cannot be built, opened or searched as asked."""


class EmptyCollectionError(RagIndexError):
    """No chunks to index: no documents, or documents without text."""


class EmbedderMismatchError(RagIndexError):
    """Query vectors from another model (or pooling, or token limit) than the index's."""


class CorruptIndexError(RagIndexError):
    """A file of the index is missing or does not match the manifest's checksum."""


def _faiss() -> Any:
    import faiss

    return faiss


def _bm25s() -> Any:
    import bm25s

    return bm25s


def _bm25_tokens(texts: list[str]) -> Any:
    return _bm25s().tokenize(texts, stopwords=STOPWORDS, show_progress=False)


def _describe(identity: dict[str, Any] | None) -> str:
    if not identity:
        return "no model (sparse only)"
    return (f"{identity.get('model')} (weights {str(identity.get('weights_sha256'))[:12]}, "
            f"{identity.get('pooling')} pooling, max_len {identity.get('max_len')}, dim {identity.get('dim')})")


class Index:
    """An index directory in memory: its chunks, manifest, BM25 retriever and FAISS index."""

    def __init__(self, root: Path, chunks: list[Chunk], manifest: dict[str, Any], bm25: Any, dense: Any) -> None:
        self.root = root
        self.chunks = chunks
        self.manifest = manifest
        self._bm25 = bm25
        self._dense = dense

    # ---- building -------------------------------------------------------------------------------

    @classmethod
    def build(cls, out_dir: str | Path, chunks: list[Chunk], embedder: Embedder | None, *, dense: str = "auto",
              chunking: dict[str, Any] | None = None) -> Index:
        """Index `chunks` (ids 0 .. n-1) into `out_dir` (created; an existing index there is replaced).
        embedder None or dense "none": sparse only. `chunking` (size, overlap, tokenizer, ...) is recorded."""
        if dense not in DENSE_KINDS:
            raise RagIndexError(f"dense index kind must be one of {DENSE_KINDS}, got {dense!r}")
        if not chunks:
            raise EmptyCollectionError(f"index {out_dir}: no chunks to index (no documents, or only empty ones)")
        _check_ids(chunks, 0, out_dir)
        kind = "none" if embedder is None or dense == "none" else dense
        if kind == "auto":
            kind = "flat" if len(chunks) <= FLAT_MAX else "hnsw"
        root = Path(out_dir)
        try:
            root.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise RagIndexError(f"index {root}: cannot create the directory ({e.strerror or e})") from None
        manifest: dict[str, Any] = {
            "format": FORMAT, "version": VERSION,
            "embedder": None if kind == "none" else dict(embedder.identity),  # type: ignore[union-attr]
            "chunking": dict(chunking or {}), "chunks": 0,
            "dense": {"kind": kind}, "sparse": {"library": "bm25s", "stopwords": STOPWORDS}, "files": {},
        }
        index = cls(root, [], manifest, None, None)
        if kind != "none":
            vecs = embedder.encode([c.text for c in chunks])  # type: ignore[union-attr]
            index._dense = _new_dense(kind, vecs, manifest["dense"])
            index._dense.add(vecs)
        index.chunks = list(chunks)
        index._save(new_chunks=chunks, rewrite_chunks=True)
        return index

    def add(self, chunks: list[Chunk], embedder: Embedder | None) -> None:
        """Append `chunks` (ids continuing from len(self.chunks)): embed only them, add them to the dense
        index, re-index BM25 from the texts, and rewrite the manifest last."""
        if not chunks:
            raise EmptyCollectionError(f"index {self.root}: no chunks to add (no documents, or only empty ones)")
        _check_ids(chunks, len(self.chunks), self.root)
        if self._dense is not None:
            if embedder is None:
                raise EmbedderMismatchError(f"index {self.root} has dense vectors from "
                                            f"{_describe(self.manifest['embedder'])}: adding needs that model")
            self.check_embedder(embedder)
            self._dense.add(embedder.encode([c.text for c in chunks]))
        self.chunks.extend(chunks)
        self._save(new_chunks=chunks, rewrite_chunks=False)

    def _save(self, *, new_chunks: list[Chunk], rewrite_chunks: bool) -> None:
        try:
            self._write(new_chunks=new_chunks, rewrite_chunks=rewrite_chunks)
        except OSError as e:  # permissions, a full disk: the previous generation is still whole
            raise RagIndexError(f"index {self.root}: cannot write ({e.strerror or e}: {e.filename or ''})") from None

    def _write(self, *, new_chunks: list[Chunk], rewrite_chunks: bool) -> None:
        """Write generation g+1 of every file beside generation g, then the manifest that names them (the
        commit: a crash before it leaves generation g whole), then remove generation g's files."""
        old = dict(self.manifest["files"])
        gen = int(self.manifest.get("generation", -1)) + 1
        if rewrite_chunks:  # a build over an existing index: past its generation, and remove its files after
            try:
                previous = json.loads((self.root / "manifest.json").read_text(encoding="utf-8"))
                gen = max(gen, int(previous.get("generation", -1)) + 1)
                old = {k: v for k, v in previous.get("files", {}).items() if isinstance(k, str)}
            except (OSError, ValueError, TypeError, AttributeError):
                pass
        files: dict[str, str] = {}
        name = f"chunks-{gen}.jsonl"
        lines = "".join(json.dumps(c.to_dict(), ensure_ascii=False) + "\n" for c in new_chunks)
        tmp = self.root / f"{name}.tmp"
        if rewrite_chunks:
            tmp.write_text(lines, encoding="utf-8")
        else:  # the old file stays as it is until the manifest stops naming it
            shutil.copyfile(self.root / self.manifest["chunks_file"], tmp)
            with open(tmp, "a", encoding="utf-8") as f:
                f.write(lines)
        tmp.replace(self.root / name)
        files[name] = sha256_file(self.root / name)
        self.manifest["chunks_file"] = name
        if self._dense is not None:
            name = f"dense-{gen}.faiss"
            _faiss().write_index(self._dense, str(self.root / f"{name}.tmp"))
            (self.root / f"{name}.tmp").replace(self.root / name)
            files[name] = sha256_file(self.root / name)
            self.manifest["dense"]["file"] = name
        bm25 = _bm25s().BM25()
        bm25.index(_bm25_tokens([c.text for c in self.chunks]), show_progress=False)
        bm25_dir = self.root / f"bm25-{gen}"
        if bm25_dir.exists():  # left by a crashed save of this generation
            shutil.rmtree(bm25_dir)
        bm25.save(str(bm25_dir), show_progress=False)
        for p in sorted(bm25_dir.iterdir()):
            files[f"{bm25_dir.name}/{p.name}"] = sha256_file(p)
        self.manifest.update(generation=gen, chunks=len(self.chunks), files=files, bm25_dir=bm25_dir.name)
        if faults.active("kill_during_index_save", step=gen):  # the tests' crash before the commit
            faults.kill_now()
        atomic_write_json(self.root / "manifest.json", self.manifest)
        self._bm25 = bm25
        for stale in sorted(set(old) - set(files)):
            try:
                path = safe_join(self.root, *stale.split("/"))
            except InputError:  # a name from a damaged manifest that points outside: not ours to delete
                continue
            path.unlink(missing_ok=True)
            if path.parent != self.root.resolve() and path.parent.is_dir() and not any(path.parent.iterdir()):
                path.parent.rmdir()

    # ---- opening --------------------------------------------------------------------------------

    @classmethod
    def open(cls, path: str | Path) -> Index:
        """The index in directory `path`, every file checked against the manifest's sha256."""
        root = Path(path)
        mpath = root / "manifest.json"
        if not mpath.is_file():
            raise RagIndexError(f"index {root}: no manifest.json (not an index built by `temper rag index`)")
        try:
            manifest = json.loads(mpath.read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            raise CorruptIndexError(f"index {root}: manifest.json is not readable JSON ({e})") from None
        if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
            raise CorruptIndexError(f"index {root}: manifest.json is not a {FORMAT} manifest")
        if manifest.get("version") != VERSION:
            raise RagIndexError(f"index {root}: format version {manifest.get('version')}, this temper reads {VERSION}")
        files = manifest.get("files")
        if not isinstance(files, dict) or manifest.get("chunks_file") not in files:
            raise CorruptIndexError(f"index {root}: manifest.json lists no files")
        for name, digest in files.items():
            p = safe_join(root, *name.split("/"))
            if not p.is_file():
                raise CorruptIndexError(f"index {root}: {name} is missing")
            if sha256_file(p) != digest:
                raise CorruptIndexError(f"index {root}: {name} does not match its checksum in manifest.json "
                                        f"(damaged or changed on disk; rebuild the index)")
        chunks = []
        chunks_file = manifest["chunks_file"]
        with open(safe_join(root, chunks_file), encoding="utf-8") as f:
            for line_no, line in enumerate(f, 1):
                try:
                    chunks.append(Chunk.from_dict(json.loads(line)))
                except (ValueError, KeyError, TypeError) as e:
                    raise CorruptIndexError(f"index {root}: {chunks_file}:{line_no}: not a chunk ({e})") from None
        if len(chunks) != manifest.get("chunks") or any(c.id != i for i, c in enumerate(chunks)):
            raise CorruptIndexError(f"index {root}: {chunks_file} holds {len(chunks)} chunks out of order or "
                                    f"not the manifest's {manifest.get('chunks')}")
        bm25_dir = manifest.get("bm25_dir")
        if not isinstance(bm25_dir, str) or not any(k.startswith(f"{bm25_dir}/") for k in files):
            raise CorruptIndexError(f"index {root}: manifest.json names no BM25 files")
        bm25 = _bm25s().BM25.load(str(safe_join(root, bm25_dir)), allow_pickle=False)
        dense = None
        kind = manifest.get("dense", {}).get("kind")
        if kind != "none":
            dense_file = manifest["dense"].get("file")
            if dense_file not in files:
                raise CorruptIndexError(f"index {root}: manifest.json names a {kind} dense index but no file of it")
            dense = _faiss().read_index(str(safe_join(root, dense_file)))
            if dense.ntotal != len(chunks):
                raise CorruptIndexError(f"index {root}: {dense_file} holds {dense.ntotal} vectors for {len(chunks)} chunks")
            _set_search_params(dense, manifest["dense"])
        return cls(root, chunks, manifest, bm25, dense)

    # ---- searching ------------------------------------------------------------------------------

    @property
    def has_dense(self) -> bool:
        return self._dense is not None

    def check_embedder(self, embedder: Embedder) -> None:
        """Raise EmbedderMismatchError naming both models unless `embedder` is the one the index was built with."""
        mine = self.manifest.get("embedder")
        if not mine:
            raise EmbedderMismatchError(f"index {self.root} has no dense vectors (built sparse only): "
                                        f"dense retrieval with {_describe(embedder.identity)} is not possible")
        theirs = embedder.identity
        diff = [k for k in _IDENTITY_KEYS if mine.get(k) != theirs.get(k)]
        if diff:
            raise EmbedderMismatchError(f"index {self.root} was built with {_describe(mine)}, but the query "
                                        f"embedder is {_describe(theirs)} (differs in {', '.join(diff)}): "
                                        f"use the index's model or rebuild the index")

    def sparse(self, query: str, k: int) -> list[tuple[int, float]]:
        """The k best chunks by BM25 as (chunk id, score), best first; only chunks sharing a term with the query."""
        if k < 1:
            raise RagIndexError(f"k must be >= 1, got {k}")
        terms = _bm25s().tokenize([query], stopwords=STOPWORDS, return_ids=False, show_progress=False)
        if not terms or not terms[0]:
            return []
        ids, scores = self._bm25.retrieve(terms, k=min(k, len(self.chunks)), show_progress=False)
        return [(int(i), float(s)) for i, s in zip(ids[0], scores[0], strict=True) if s > 0]

    def dense(self, query_vecs: np.ndarray, k: int) -> list[list[tuple[int, float]]]:
        """For each row of (q, dim) unit vectors, the k nearest chunks as (chunk id, inner product), best first."""
        if self._dense is None:
            raise RagIndexError(f"index {self.root} has no dense vectors (built sparse only)")
        if k < 1:
            raise RagIndexError(f"k must be >= 1, got {k}")
        q = np.ascontiguousarray(np.asarray(query_vecs, dtype=np.float32))
        if q.ndim != 2 or q.shape[1] != self._dense.d:
            raise EmbedderMismatchError(f"index {self.root}: query vectors of shape {tuple(q.shape)}, the index holds "
                                        f"vectors of dim {self._dense.d}")
        scores, ids = self._dense.search(q, min(k, len(self.chunks)))
        return [[(int(i), float(s)) for i, s in zip(ri, rs, strict=True) if i >= 0] for ri, rs in zip(ids, scores, strict=True)]


def _check_ids(chunks: list[Chunk], first: int, where: str | Path) -> None:
    bad = next((c for i, c in enumerate(chunks) if c.id != first + i), None)
    if bad is not None:
        raise RagIndexError(f"index {where}: chunk ids must run {first}, {first + 1}, ... in order; got id {bad.id} "
                            f"at position {chunks.index(bad)} (number new chunks from the index's size)")


def _new_dense(kind: str, vecs: np.ndarray, params: dict[str, Any]) -> Any:
    faiss = _faiss()
    d = vecs.shape[1]
    params["dim"] = int(d)
    if kind == "flat":
        return faiss.IndexFlatIP(d)
    if kind == "hnsw":
        index = faiss.IndexHNSWFlat(d, HNSW_M, faiss.METRIC_INNER_PRODUCT)
        params.update(m=HNSW_M, ef_search=HNSW_EF_SEARCH)
        _set_search_params(index, params)
        return index
    # IVF: k-means needs about 39 points per list (faiss warns below), so small sets get fewer lists.
    nlist = max(1, min(int(4 * math.sqrt(len(vecs))), len(vecs) // 39))
    index = faiss.index_factory(d, f"IVF{nlist},Flat", faiss.METRIC_INNER_PRODUCT)
    index.train(vecs)
    params.update(nlist=nlist, nprobe=min(IVF_NPROBE, nlist))
    _set_search_params(index, params)
    return index


def _set_search_params(index: Any, params: dict[str, Any]) -> None:
    # Search-time knobs are not always kept by write_index, so they live in the manifest.
    if params.get("kind") == "hnsw":
        index.hnsw.efSearch = int(params.get("ef_search", HNSW_EF_SEARCH))
    elif params.get("kind") == "ivf":
        index.nprobe = int(params.get("nprobe", IVF_NPROBE))
