"""`temper prepare`: raw text -> a tokenizer and token shards, the data stage of the spine.

Steps, in the order `main` runs them:
 1. parse the config; list the input files; clear the output directory's old manifest
 2. tokenizer: train a byte-level BPE on a sample of the train documents (about
    `tokenizer.train_bytes`), or a character-level one on every character, or load a file
 3. read the documents again, encode them in worker processes (chunks, order kept) and split
    them into train and val: by a hash of each document's text and the seed ("document"; the
    same whatever the number of workers), or the last `val_fraction` of each file's tokens
    ("tail", as nanoGPT's shakespeare split)
 4. write the shards, the tokenizer.json, and manifest.json last (a directory without one is
    incomplete)
 5. print a summary: documents read, kept and dropped by reason, tokens per split, time

It does not filter or deduplicate (data/filters.py, data/dedup.py) and does not batch (the
loader reads the shards).
"""

from __future__ import annotations

import hashlib
import heapq
import multiprocessing as mp
import os
import sys
import sysconfig
import time
from collections import Counter, deque
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from itertools import chain, islice
from pathlib import Path
from typing import Literal

import numpy as np
from tokenizers import Tokenizer
from tqdm import tqdm

from temper import config
from temper.data import shards
from temper.data.sources import MAX_LINE_BYTES, DataError, Document, ReadStats, expand_inputs, read_files
from temper.data.tokenizer import (
    EOT,
    TokenizerError,
    encode_batch,
    eot_id,
    load_tokenizer,
    plain_text_encoder,
    save_tokenizer,
    train_tokenizer,
    vocab_size,
)

_CHUNK_CHARS = 1 << 20  # text sent to a worker per task: big enough to amortise the pickling
_CHUNK_DOCS = 1024


def _stdlib_sources() -> list[str]:
    return [os.path.join(sysconfig.get_paths()["stdlib"], "**", "*.py")]


@dataclass
class TokenizerConfig:
    kind: Literal["bpe", "char", "file"] = "bpe"
    """bpe: train a byte-level BPE; char: a character-level one (nanoGPT shakespeare_char); file: load `path`."""
    vocab_size: int = 4096
    """BPE vocabulary size, special tokens included (char and file ignore it)."""
    path: str = ""
    """The tokenizer.json (or a directory holding one) to load when kind=file."""
    special_tokens: list[str] = field(default_factory=lambda: [EOT])
    """Special tokens of a trained tokenizer; they get the ids after the learned ones (char) or the first ids (bpe)."""
    eot_token: str = "auto"
    """Token appended after every document: auto (first of <|endoftext|>, <|end_of_text|>, </s>, <eos>), a token, or '' for none."""
    train_bytes: int = 8_000_000
    """Train the BPE on a sample of about this many bytes of text (0: all); training time grows with it."""
    train_docs: int = 0
    """Train the BPE on at most this many documents (0: no cap)."""

    def __post_init__(self) -> None:
        if self.kind == "file" and not self.path:
            raise ValueError("tokenizer.kind=file needs tokenizer.path")
        if self.kind == "bpe" and self.vocab_size < 257:
            raise ValueError(f"tokenizer.vocab_size={self.vocab_size}: a byte-level BPE needs more than 256")


@dataclass
class PrepareConfig:
    input: list[str] = field(default_factory=_stdlib_sources)
    """Files, directories or globs (** recursive) of .txt/.py/.md/... and .jsonl, optionally .gz."""
    exclude: list[str] = field(default_factory=lambda: ["*/site-packages/*", "*/dist-packages/*"])
    """Glob patterns of files to leave out (by default installed packages, which live inside the stdlib dir)."""
    out: str = "data/stdlib"
    """Output directory for the shards, tokenizer.json and manifest.json."""
    text_field: str = "text"
    """Field of each JSONL object that holds the document's text."""
    txt_docs: Literal["file", "paragraph", "line"] = "file"
    """What one document is in a text file: the whole file, a blank-line separated paragraph, or a line."""
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    """How the tokenizer is trained or loaded."""
    split: Literal["document", "tail"] = "document"
    """document: each document goes to val by a hash of its text and seed; tail: the last val_fraction of each file's tokens."""
    val_fraction: float = 0.01
    """Fraction of documents (or of each file's tokens, split=tail) that go to the val split."""
    seed: int = 0
    """Seed of the val split and of the tokenizer's training sample."""
    min_tokens: int = 2
    """Documents with fewer tokens (end-of-text excluded) are dropped and counted: one token teaches nothing."""
    max_documents: int = 0
    """Read at most this many documents (0: all), for quick trials."""
    workers: int = 0
    """Encoding processes (0: min(4, CPU cores); 1: encode in this process)."""
    shard_tokens: int = 100_000_000
    """Tokens per shard file (a shard closes after the document that reaches it)."""
    on_error: Literal["fail", "skip"] = "fail"
    """A bad record (invalid JSON, missing field, giant line, truncated gzip): fail naming file:line, or skip and count it."""
    max_skip_fraction: float = 0.01
    """With on_error=skip, abort when more than this fraction of the records are bad."""
    strict_utf8: bool = False
    """Fail on invalid UTF-8 (naming file:line and byte offset) instead of replacing it with U+FFFD."""
    max_line_bytes: int = MAX_LINE_BYTES
    """Longest line (or whole-file / paragraph document) read into memory; longer ones are bad records."""
    progress: bool = True
    """Show progress bars."""

    def __post_init__(self) -> None:
        if "\x00" in self.out:
            raise ValueError("out: the output directory name contains a NUL byte")
        if not self.input:
            raise ValueError("input: name at least one file, directory or glob")
        if not 0.0 <= self.val_fraction <= 1.0:
            raise ValueError(f"val_fraction={self.val_fraction} must be in [0, 1]")
        if self.val_fraction == 1.0 and self.tokenizer.kind != "file":
            raise ValueError("val_fraction=1 (a held-out set only) needs tokenizer.kind=file: there is no "
                             "training text to learn a tokenizer from")
        for name in ("min_tokens", "shard_tokens", "max_line_bytes"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be at least 1")
        if self.workers < 0 or self.max_documents < 0:
            raise ValueError("workers and max_documents must be >= 0")


def main(argv: list[str] | None = None) -> int:
    cfg = config.parse(PrepareConfig, argv, prog="prepare")
    print(config.to_yaml(cfg), end="")
    try:
        summary = prepare(cfg)
    except (DataError, TokenizerError, shards.ShardError, FileNotFoundError) as e:
        print(f"temper prepare: {e}", file=sys.stderr)
        return 1
    print(summary)
    return 0


def prepare(cfg: PrepareConfig) -> str:
    """Run the steps of the module docstring; return the summary to print."""
    t0 = time.perf_counter()
    # 1. inputs (checked before anything is written) and the output directory
    files = expand_inputs(cfg.input, cfg.exclude)
    out = shards.clear_output(cfg.out)

    # 2. tokenizer
    sample_stats: dict = {}
    if cfg.tokenizer.kind == "file":
        tok = load_tokenizer(cfg.tokenizer.path)
    else:
        texts = _tokenizer_texts(cfg, files, sample_stats)
        tok = train_tokenizer(texts, cfg.tokenizer.kind, cfg.tokenizer.vocab_size,
                              cfg.tokenizer.special_tokens, show_progress=cfg.progress)
    vocab = vocab_size(tok)
    eot = None if cfg.tokenizer.eot_token == "" else eot_id(tok, _auto(cfg.tokenizer.eot_token))
    t_tok = time.perf_counter()

    # 3.-4. encode, split, write
    stats = ReadStats()
    writers = {s: shards.ShardWriter(out, s, vocab, eot, cfg.shard_tokens) for s in ("train", "val")}
    tail = _TailSplit(writers, cfg.val_fraction) if cfg.split == "tail" else None
    short = 0
    workers = cfg.workers or min(4, os.cpu_count() or 1)
    docs = _documents(cfg, files, stats)
    bar = tqdm(total=_estimate_bytes(files), unit="B", unit_scale=True, desc="encode",
               disable=not cfg.progress, file=sys.stderr)
    for chunk, encoded in _encode_chunks(_chunks(docs), tok, workers, shards.dtype_for(vocab)):
        for doc, ids in zip(chunk, encoded, strict=True):
            bar.update(len(doc.text))
            if len(ids) < cfg.min_tokens:
                short += 1
            elif tail is not None:
                tail.add(doc.source, ids)
            else:
                is_val = _unit_hash(doc.text, cfg.seed, "val") < cfg.val_fraction
                writers["val" if is_val else "train"].add(ids)
    bar.close()
    if tail is not None:
        tail.flush()
    splits = {s: w.close() for s, w in writers.items()}
    t_enc = time.perf_counter()

    save_tokenizer(tok, out / shards.TOKENIZER)
    read = stats.as_dict()
    read["dropped"]["short"] = short
    run_stats = {
        "read": read,
        "tokenizer": {"kind": cfg.tokenizer.kind, "vocab_size": vocab, **sample_stats},
        "seconds": {"tokenizer": round(t_tok - t0, 2), "encode": round(t_enc - t_tok, 2),
                    "total": round(time.perf_counter() - t0, 2)},
        "config": config.to_dict(cfg),
    }
    shards.write_manifest(out, vocab_size=vocab, eot_id=eot, splits=splits, stats=run_stats)
    return _summary(cfg, stats, short, splits, run_stats)


def _auto(token: str) -> str | None:
    return None if token == "auto" else token


def _documents(cfg: PrepareConfig, files: list[Path], stats: ReadStats) -> Iterator[Document]:
    docs = read_files(
        files, text_field=cfg.text_field, txt_docs=cfg.txt_docs, on_error=cfg.on_error,
        max_skip_fraction=cfg.max_skip_fraction, strict_utf8=cfg.strict_utf8,
        max_line_bytes=cfg.max_line_bytes, stats=stats,
    )
    return islice(docs, cfg.max_documents) if cfg.max_documents else docs


def _unit_hash(text: str, seed: int, purpose: str) -> float:
    """A number in [0, 1) fixed by the text, the seed and the purpose: the same in any process."""
    key = f"{seed}:{purpose}".encode()
    digest = hashlib.blake2b(text.encode("utf-8"), digest_size=8, key=key).digest()
    return int.from_bytes(digest, "little") / 2**64


def _estimate_bytes(files: list[Path]) -> int:
    # gzip'd text is typically 3-4x smaller; only the progress bar uses this.
    return sum(os.path.getsize(f) * (3 if str(f).endswith(".gz") else 1) for f in files)


def _tokenizer_texts(cfg: PrepareConfig, files: list[Path], out_stats: dict) -> Iterable[str]:
    """What the tokenizer learns from. char: every document, streamed (each character of the
    corpus must be in the vocabulary). bpe: a sample of the train documents, the ones with the
    smallest hashes that fit in train_bytes / train_docs (a bottom-k sample): spread over the
    whole corpus instead of its first files, the same on every run, and blind to val."""
    tc = cfg.tokenizer
    docs = _documents(cfg, files, ReadStats())  # this pass's counts are not reported: step 3 reads again
    docs = tqdm(docs, desc=f"read for the {tc.kind} tokenizer", unit=" docs", disable=not cfg.progress,
                file=sys.stderr)
    if tc.kind == "char":
        return (doc.text for doc in docs)
    heap: list[tuple[float, str]] = []  # (-hash, text): the largest hash on top, popped first
    size = 0
    for doc in docs:
        text = doc.text
        if cfg.split == "document" and _unit_hash(text, cfg.seed, "val") < cfg.val_fraction:
            continue
        if cfg.split == "tail":  # keep each document's val tail unseen (by characters)
            text = text[: int(len(text) * (1 - cfg.val_fraction))]
        heapq.heappush(heap, (-_unit_hash(text, cfg.seed, "tokenizer"), text))
        size += len(text)
        while len(heap) > 1 and ((tc.train_bytes and size > tc.train_bytes)
                                 or (tc.train_docs and len(heap) > tc.train_docs)):
            size -= len(heapq.heappop(heap)[1])
    if not heap:
        raise DataError("no train documents to train the tokenizer on")
    out_stats.update(trained_on_documents=len(heap), trained_on_chars=size)
    return [text for _, text in sorted(heap, reverse=True)]


def _chunks(docs: Iterator[Document]) -> Iterator[list[Document]]:
    chunk, size = [], 0
    for doc in docs:
        chunk.append(doc)
        size += len(doc.text)
        if size >= _CHUNK_CHARS or len(chunk) >= _CHUNK_DOCS:
            yield chunk
            chunk, size = [], 0
    if chunk:
        yield chunk


def _encode_chunks(chunks: Iterator[list[Document]], tok: Tokenizer, workers: int,
                   dtype: np.dtype) -> Iterator[tuple[list[Document], list[np.ndarray]]]:
    """Encode chunks in `workers` processes, yielding them in input order. At most 2 chunks per
    worker are in flight, so memory stays bounded however large the corpus (Pool.imap would read
    the whole input ahead)."""
    head = list(islice(chunks, 2))
    chunks = chain(head, chunks)
    if workers <= 1 or len(head) < 2:  # one chunk: starting processes would cost more than it saves
        encoder = plain_text_encoder(tok)
        for chunk in chunks:
            yield chunk, encode_batch(encoder, [d.text for d in chunk], dtype)
        return
    # spawn, not fork: the parent may already run tokenizers' Rust thread pool, which fork breaks.
    ctx = mp.get_context("spawn")
    with ctx.Pool(workers, initializer=_init_worker, initargs=(tok.to_str(), dtype.str)) as pool:
        pending: deque = deque()
        for chunk in chunks:
            pending.append((chunk, pool.apply_async(_encode_in_worker, ([d.text for d in chunk],))))
            if len(pending) >= 2 * workers:
                yield _collect(*pending.popleft())
        while pending:
            yield _collect(*pending.popleft())


def _collect(chunk: list[Document], result) -> tuple[list[Document], list[np.ndarray]]:
    lengths, flat = result.get()
    return chunk, np.split(flat, np.cumsum(lengths)[:-1])


_worker_tok: Tokenizer | None = None
_worker_dtype: np.dtype | None = None


def _init_worker(tokenizer_json: str, dtype: str) -> None:
    global _worker_tok, _worker_dtype
    # One process per core already: the Rust thread pool inside each would oversubscribe them.
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    _worker_tok = plain_text_encoder(Tokenizer.from_str(tokenizer_json))
    _worker_dtype = np.dtype(dtype)


def _encode_in_worker(texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
    ids = encode_batch(_worker_tok, texts, _worker_dtype)
    # One flat array and its lengths pickle far faster than thousands of small arrays.
    lengths = np.array([len(x) for x in ids], dtype=np.int64)
    flat = np.concatenate(ids) if ids else np.zeros(0, _worker_dtype)
    return lengths, flat


class _TailSplit:
    """split=tail: hold one file's documents, then send its last val_fraction of tokens to val
    (the document that straddles the cut is cut in two, each part ending with end-of-text)."""

    def __init__(self, writers: dict[str, shards.ShardWriter], val_fraction: float):
        self.writers = writers
        self.val_fraction = val_fraction
        self.source: str | None = None
        self.docs: list[np.ndarray] = []

    def add(self, source: str, ids: np.ndarray) -> None:
        if source != self.source:
            self.flush()
            self.source = source
        self.docs.append(ids)

    def flush(self) -> None:
        total = sum(len(d) for d in self.docs)
        cut = int(total * (1 - self.val_fraction))  # nanoGPT: data[:int(n * 0.9)]
        pos = 0
        for ids in self.docs:
            k = min(len(ids), max(0, cut - pos))
            pos += len(ids)
            if k:
                self.writers["train"].add(ids[:k])
            if k < len(ids):
                self.writers["val"].add(ids[k:])
        self.docs = []


def _summary(cfg: PrepareConfig, stats: ReadStats, short: int, splits: dict, run: dict) -> str:
    dropped = {**stats.dropped, "short": short}
    lines = [
        f"prepared {cfg.out}: {stats.files} files, {stats.records} records read",
        f"  kept {stats.documents - short:,} documents; "
        f"dropped {_counts(dropped)}; bad input skipped {_counts(stats.errors)}",
    ]
    if stats.repaired:
        lines.append(f"  repaired characters: {_counts(stats.repaired)}")
    lines += [f"  skipped: {e}" for e in stats.examples[:5]]
    for name, s in splits.items():
        lines.append(f"  {name}: {s['tokens']:,} tokens, {s['documents']:,} documents, {len(s['shards'])} shards")
    sec = run["seconds"]
    lines.append(f"  vocab {run['tokenizer']['vocab_size']}; time {sec['total']}s "
                 f"(tokenizer {sec['tokenizer']}s, encode+write {sec['encode']}s)")
    return "\n".join(lines)


def _counts(c: Counter | dict) -> str:
    items = [f"{k}={v}" for k, v in sorted(c.items()) if v]
    return ", ".join(items) if items else "none"
