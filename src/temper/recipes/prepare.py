"""`temper prepare`: raw text -> clean, deduplicated documents -> a tokenizer and token shards.

Steps, in the order `main` runs them (each stage in `workers` processes, one input file per
task, with a progress bar; each task's result is a file in `<out>/.prepare/`, so an interrupted
run resumes where it stopped and re-running a finished one does nothing):
 1. parse the config; list the input files; fingerprint them (path, size, mtime) with the config
 2. filter: read every document, apply the quality and language filters (data/filters.py), the
    decontamination n-grams and the perplexity band; record per document its fate, size, split
    and its exact-dedup key and MinHash signature (data/dedup.py)
 3. dedup: across the whole corpus, drop exact then near duplicates (the first one is kept)
 4. tokenizer: train a byte-level BPE on a sample of the kept train documents (about
    `tokenizer.train_bytes`), or a character-level one on every kept character, or load a file
 5. tokenize: read the documents again, encode the kept ones and split them into train and val:
    by a hash of each document's text and the seed ("document"; the same whatever the number of
    workers), or the last `val_fraction` of each file's tokens ("tail", as nanoGPT's shakespeare)
 6. shard: concatenate the files' tokens in input order into shards of about `shard_bytes`
    (deterministic), write tokenizer.json, report.json, optionally rejects.jsonl, and
    manifest.json last (a directory without one is incomplete)

It does not batch or pack (the loader does) and does not choose what to train on.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import math
import multiprocessing as mp
import os
import shutil
import sys
import sysconfig
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from itertools import islice
from pathlib import Path
from typing import Any, Literal

import numpy as np
from tqdm import tqdm

from temper import config
from temper.data import shards
from temper.data.dedup import (
    DedupConfig,
    MinHasher,
    NgramIndex,
    exact_keys,
    find_exact_duplicates,
    find_near_duplicates,
)
from temper.data.filters import DocumentFilter, FilterConfig
from temper.data.sources import (
    MAX_LINE_BYTES,
    DataError,
    Document,
    FilePart,
    ReadStats,
    expand_inputs,
    read_files,
    split_file,
)
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
from temper.files import atomic_write_json

WORK = ".prepare"  # the work directory inside `out`, removed when the manifest is written
REPORT = "report.json"
REJECTS = "rejects.jsonl"
_BATCH_CHARS = 4 << 20  # documents encoded / hashed together: big enough to amortise the calls
_BATCH_DOCS = 8192
# Fates of a document, stored per document as int8 codes; filter reasons get codes after these.
KEEP, EXACT_DUP, NEAR_DUP, SHORT = 0, 1, 2, 3
_FATES = ["kept", "exact_duplicate", "near_duplicate", "short"]


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
class DecontaminateConfig:
    files: list[str] = field(default_factory=list)
    """Evaluation sets (txt, jsonl, jsonl.gz; paths or globs) whose long n-grams must not appear in training documents."""
    fields: list[str] = field(default_factory=list)
    """JSONL fields holding evaluation text (empty: every string field of each object)."""
    ngram: int = 13
    """Words per n-gram: a document sharing one with an evaluation set is dropped (13: GPT-3's choice)."""

    def __post_init__(self) -> None:
        if self.ngram < 1:
            raise ValueError(f"decontaminate.ngram={self.ngram} must be at least 1")


@dataclass
class PerplexityConfig:
    model: str = ""
    """A temper checkpoint or Hugging Face directory (final/) whose perplexity scores each document ('': off)."""
    min: float = 0.0
    """Drop documents with a lower perplexity (repetitive boilerplate); 0: no lower bound."""
    max: float = 0.0
    """Drop documents with a higher perplexity (noise, other languages); 0: no upper bound."""
    max_tokens: int = 256
    """Score each document on its first this many tokens."""

    def __post_init__(self) -> None:
        if self.min < 0 or self.max < 0 or (self.max and self.min > self.max):
            raise ValueError(f"perplexity band [{self.min}, {self.max}] must be 0 <= min <= max (max 0: none)")
        if self.max_tokens < 2:
            raise ValueError(f"perplexity.max_tokens={self.max_tokens} must be at least 2")


@dataclass
class PrepareConfig:
    input: list[str] = field(default_factory=_stdlib_sources)
    """Files, directories or globs (** recursive): .txt/.md/.py/... (.gz, .zst), .jsonl (.gz, .zst), .parquet."""
    exclude: list[str] = field(default_factory=lambda: ["*/site-packages/*", "*/dist-packages/*"])
    """Glob patterns of files to leave out (by default installed packages, which live inside the stdlib dir)."""
    out: str = "data/stdlib"
    """Output directory for the shards, tokenizer.json, report.json and manifest.json."""
    text_field: str = "text"
    """Field (JSONL) or column (parquet) that holds the document's text."""
    id_field: str = ""
    """Field or column with the document's id, shown in the report and rejects file ('': none)."""
    txt_docs: Literal["file", "paragraph", "line"] = "file"
    """What one document is in a text file: the whole file, a blank-line separated paragraph, or a line."""
    filters: FilterConfig = field(default_factory=FilterConfig)
    """Quality and language filters (off by default: source code and shakespeare are not web text)."""
    dedup: DedupConfig = field(default_factory=DedupConfig)
    """Exact and near-duplicate removal across the whole corpus."""
    decontaminate: DecontaminateConfig = field(default_factory=DecontaminateConfig)
    """Drop documents that share long n-grams with evaluation sets."""
    perplexity: PerplexityConfig = field(default_factory=PerplexityConfig)
    """Keep documents whose perplexity under a model lies in a band."""
    rejects: bool = False
    """Write every dropped document with its reason to rejects.jsonl in the output directory."""
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
    """Worker processes (0: every CPU core; 1: all in this process)."""
    part_bytes: int = 32 << 20
    """Cut uncompressed JSONL and line-per-document text files into parts of at most this size (smaller when needed to give every worker about four) that workers read in parallel (0: never)."""
    shard_bytes: int = 1 << 30
    """Size of a shard file (a shard closes after the document that reaches it)."""
    strict: bool = False
    """Fail on the first bad record (invalid JSON, missing field, binary file, giant line, truncated gzip), naming
    file:line; by default bad records are skipped, counted and listed in the summary and report."""
    max_skip_fraction: float = 0.01
    """Fail when more than this fraction of the records are bad, even without strict."""
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
        for name in ("min_tokens", "shard_bytes", "max_line_bytes"):
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
    # 1. inputs (checked before anything is written), fingerprint, work directory
    files = expand_inputs(cfg.input, cfg.exclude)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    fingerprint = _fingerprint(cfg, files)
    if _already_prepared(out, fingerprint):
        return f"{out} is already prepared from the same input and config: nothing to do"
    (out / shards.MANIFEST).unlink(missing_ok=True)  # from now on the directory reads as incomplete
    work = _work_dir(out, fingerprint)
    run = _Run(cfg, files, work)
    seconds: dict[str, float] = {}

    # 2. filter
    t = time.perf_counter()
    if cfg.max_documents:
        run.first_documents(_filter_unit)
    else:
        run.stage("filter", _filter_unit)
    unit_stats = [run.load_json(i, "filter") for i in range(len(run.units))]
    read_stats = ReadStats()
    for s in unit_stats:
        read_stats.merge(ReadStats.from_dict(s["read"]))
    read_stats.check_fraction(cfg.max_skip_fraction)
    read = {**read_stats.as_dict(), "examples": read_stats.examples}
    seconds["filter"] = time.perf_counter() - t

    # 3. dedup (global: one process, memory O(documents))
    t = time.perf_counter()
    dedup = _dedup(run)
    seconds["dedup"] = time.perf_counter() - t

    # 4. tokenizer
    t = time.perf_counter()
    tok, sample_stats = _tokenizer(run, cfg)
    vocab = vocab_size(tok)
    eot = None if cfg.tokenizer.eot_token == "" else eot_id(tok, _auto(cfg.tokenizer.eot_token))
    seconds["tokenizer"] = time.perf_counter() - t

    # 5. tokenize
    t = time.perf_counter()
    run.tokenizer_json, run.vocab, run.eot = tok.to_str(), vocab, eot
    run.stage("tokenize", _tokenize_unit)
    tokenized = [run.load_json(i, "tokenize") for i in range(len(run.units))]
    seconds["tokenize"] = time.perf_counter() - t

    # 6. shard, report, manifest (last)
    t = time.perf_counter()
    shards.clear_output(out)
    splits = _write_shards(run, out, vocab, eot, cfg.shard_bytes)
    if cfg.rejects:
        _concatenate((run.unit_file(i, "rejects.jsonl") for i in range(len(run.units))), out / REJECTS)
    save_tokenizer(tok, out / shards.TOKENIZER)
    seconds["shard"] = time.perf_counter() - t
    seconds["total"] = time.perf_counter() - t0
    read["dropped"]["short"] = sum(t["short"] for t in tokenized)
    report = _report(cfg, run, read, dedup, tokenized, splits, seconds, sample_stats, vocab)
    atomic_write_json(out / REPORT, report)
    run_stats = {
        "read": read,
        "tokenizer": {"kind": cfg.tokenizer.kind, "vocab_size": vocab, **sample_stats},
        "seconds": {k: round(v, 2) for k, v in seconds.items()},
        "fingerprint": fingerprint,
        "config": config.to_dict(cfg),
    }
    shards.write_manifest(out, vocab_size=vocab, eot_id=eot, splits=splits, stats=run_stats)
    shutil.rmtree(work, ignore_errors=True)
    return _summary(cfg, report)


# ---- resumability ---------------------------------------------------------------------------------

def _fingerprint(cfg: PrepareConfig, files: list[Path]) -> str:
    """Hash of everything that decides the output: the config (less how it is run) and each input
    file's path, size and modification time. Equal fingerprints: the same output."""
    settings = {k: v for k, v in config.to_dict(cfg).items() if k not in ("workers", "progress")}
    h = hashlib.sha256(json.dumps(settings, sort_keys=True).encode())
    for f in files:
        st = f.stat()
        h.update(f"{f}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    for extra in (cfg.tokenizer.path, cfg.perplexity.model) + tuple(cfg.decontaminate.files):
        if extra and os.path.exists(extra):
            h.update(f"{extra}\0{os.stat(extra).st_mtime_ns}\n".encode())
    return h.hexdigest()


def _already_prepared(out: Path, fingerprint: str) -> bool:
    try:
        manifest = shards.read_manifest(out)
    except shards.ShardError:
        return False
    if manifest.get("stats", {}).get("fingerprint") != fingerprint:
        return False
    try:  # the files must still be there with their sizes (checksums are the loader's `verify`)
        for split in manifest["splits"]:
            shards.load_index(out, split, verify=False)
            shards.load_split(out, split, verify=False)
    except shards.ShardError:
        return False
    return True


def _work_dir(out: Path, fingerprint: str) -> Path:
    """`out/.prepare`, kept when it belongs to the same fingerprint (resume), else started anew."""
    work = out / WORK
    stamp = work / "fingerprint"
    if not (stamp.is_file() and stamp.read_text() == fingerprint):
        shutil.rmtree(work, ignore_errors=True)
        work.mkdir(parents=True)
        stamp.write_text(fingerprint)
    return work


class _Run:
    """What the stages share: the config, the files (one task each) and the work directory.

    A task's outputs are written under temporary names and its `<stage>.json` renamed into place
    last: that file is the task's completion marker.
    """

    def __init__(self, cfg: PrepareConfig, files: list[Path], work: Path):
        self.cfg, self.files, self.work = cfg, files, work
        # One task per unit: consecutive small files together, a big line-oriented file in parts
        # (split=tail cuts each whole file, so its files stay whole). About four units per worker
        # balance the load; fewer, bigger ones would cost less per unit.
        target = sum(map(_size, files)) / (4 * (cfg.workers or os.cpu_count() or 1))
        part_bytes = cfg.part_bytes if cfg.split == "document" else 0
        if part_bytes:
            target = part_bytes = int(min(part_bytes, max(target, 1 << 20)))
        items = [u for f in files for u in split_file(f, part_bytes, cfg.txt_docs)]
        self.units: list[list[Path | FilePart]] = []
        size = target
        for item in items:
            if size >= target:
                self.units.append([])
                size = 0
            self.units[-1].append(item)
            size += _size(item)
        self.tokenizer_json: str | None = None
        self.vocab = 0
        self.eot: int | None = None
        self.read_so_far = 0  # documents read by the units before the current one (max_documents)

    def first_documents(self, task: Callable[[_Run, int], dict]) -> None:
        """max_documents: filter the units in order, in this process, until that many documents
        are read; the units after that one are dropped from the run."""
        self.read_so_far = 0
        for i in range(len(self.units)):
            done = self.unit_file(i, "filter.json")
            if not done.exists():
                atomic_write_json(done, task(self, i))
            self.read_so_far += json.loads(done.read_text())["documents"]
            if self.read_so_far >= self.cfg.max_documents:
                self.units = self.units[: i + 1]
                return

    def unit_file(self, i: int, name: str) -> Path:
        return self.work / f"unit-{i:06d}.{name}"

    def load_json(self, i: int, stage: str) -> dict:
        return json.loads(self.unit_file(i, f"{stage}.json").read_text())

    def load_arrays(self, i: int, stage: str) -> dict[str, np.ndarray]:
        with np.load(self.unit_file(i, f"{stage}.npz")) as z:
            return dict(z)

    def stage(self, name: str, task: Callable[[_Run, int], dict]) -> None:
        """Run `task(run, i)` for every unit whose `<name>.json` is missing, in worker processes."""
        todo = [i for i in range(len(self.units)) if not self.unit_file(i, f"{name}.json").exists()]
        if not todo:
            return
        sizes = {i: _size(self.units[i]) for i in todo}
        bar = tqdm(total=sum(sizes.values()), unit="B", unit_scale=True, desc=name,
                   disable=not self.cfg.progress, file=sys.stderr)
        workers = min(self.cfg.workers or os.cpu_count() or 1, len(todo))
        results = _map(task, self, todo, workers)
        try:
            for i, result in results:
                atomic_write_json(self.unit_file(i, f"{name}.json"), result)
                bar.update(sizes[i])
        finally:
            results.close()
            bar.close()


def _size(unit: Path | FilePart | list[Path | FilePart]) -> int:
    if isinstance(unit, list):
        return sum(map(_size, unit))
    return unit.end - unit.start if isinstance(unit, FilePart) else unit.stat().st_size


def _path(item: Path | FilePart) -> str:
    return str(item.path if isinstance(item, FilePart) else item)


def _map(task: Callable, run: _Run, todo: list[int], workers: int) -> Iterator[tuple[int, Any]]:
    """(i, task(run, i)) for i in todo: in this process, or in `workers` spawned processes."""
    if workers <= 1:
        return ((i, task(run, i)) for i in todo)
    # spawn, not fork: this process may already run tokenizers' Rust thread pool, which fork breaks.
    ctx = mp.get_context("spawn")
    pool = ctx.Pool(workers, initializer=_init_worker, initargs=(run, workers))

    def results():
        try:
            yield from pool.imap_unordered(_call, [(task, i) for i in todo])
        finally:
            pool.terminate()
            pool.join()

    return results()


_worker_run: _Run | None = None


def _init_worker(run: _Run, workers: int) -> None:
    global _worker_run
    _worker_run = run
    # Processes already use every core: the Rust thread pools inside each (tokenizers', rensa's)
    # would oversubscribe them.
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    os.environ["RAYON_NUM_THREADS"] = "1"


def _call(args: tuple[Callable, int]) -> tuple[int, dict]:
    task, i = args
    return i, task(_worker_run, i)


def _save_arrays(path: Path, **arrays: np.ndarray) -> None:
    tmp = path.with_name(path.name + ".tmp.npz")
    np.savez(tmp, **arrays)
    os.replace(tmp, path)


# ---- 2. filter --------------------------------------------------------------------------------------

def _documents(run: _Run, i: int, stats: ReadStats | None = None, limit: int | None = None) -> Iterator[Document]:
    """The documents of file i, the same sequence every time it is read."""
    cfg = run.cfg
    # The skip fraction is checked over the whole corpus once every file is read (a file with one
    # bad line of two is not a reason to stop), so each file's reader only counts.
    docs = read_files(
        run.units[i], text_field=cfg.text_field, txt_docs=cfg.txt_docs, on_error="fail" if cfg.strict else "skip",
        max_skip_fraction=1.0, strict_utf8=cfg.strict_utf8, max_line_bytes=cfg.max_line_bytes,
        stats=stats, id_field=cfg.id_field,
    )
    return islice(docs, limit) if limit is not None else docs


class _Scorers:
    """The per-document judges of the filter stage, built once per process."""

    def __init__(self, cfg: PrepareConfig):
        self.filter = DocumentFilter(cfg.filters)
        self.decontam = _decontamination_index(cfg.decontaminate) if cfg.decontaminate.files else None
        self.perplexity = _PerplexityScorer(cfg.perplexity) if cfg.perplexity.model else None
        self.minhash = MinHasher(cfg.dedup) if cfg.dedup.near else None
        self.reasons: list[str] = []  # filter reason -> code (offset by len(_FATES))

    def code(self, reason: str) -> int:
        if reason not in self.reasons:
            self.reasons.append(reason)
        return len(_FATES) + self.reasons.index(reason)


_cache: dict[str, Any] = {}


def _cached(key: str, build: Callable[[], Any]) -> Any:
    """One instance per process of what is costly to build (language model, tokenizer), rebuilt
    when the key (what it is built from) changes."""
    if key not in _cache:
        _cache.clear()
        _cache[key] = build()
    return _cache[key]


def _filter_unit(run: _Run, i: int) -> dict:
    cfg = run.cfg
    sc = _cached("filter:" + json.dumps(config.to_dict(cfg), sort_keys=True), lambda: _Scorers(cfg))
    sc.reasons = []
    stats = ReadStats()
    limit = None
    if cfg.max_documents:  # units run in order (first_documents): the earlier ones read so many
        limit = cfg.max_documents - run.read_so_far
    fate, nbytes, line, val, sample, language, source = [], [], [], [], [], [], []
    sources = {_path(item): k for k, item in enumerate(run.units[i])}
    languages: list[str] = []
    keys, sigs = [], []
    batch: list[str] = []

    def flush() -> None:
        if batch:
            keys.append(exact_keys(batch))
            if sc.minhash is not None:
                sigs.append(sc.minhash.signatures(batch))
            batch.clear()

    for doc in _documents(run, i, stats, limit):
        text = doc.text
        code = KEEP
        verdict = sc.filter(text) if sc.filter.active else None
        if verdict is not None and verdict.reason:
            code = sc.code(verdict.reason)
        elif sc.decontam is not None and sc.decontam.overlaps(text):
            code = sc.code("contaminated")
        elif sc.perplexity is not None:
            reason = sc.perplexity.reason(text)
            code = sc.code(reason) if reason else KEEP
        lang = verdict.language if verdict is not None else None
        if lang is not None and lang not in languages:
            languages.append(lang)
        language.append(languages.index(lang) if lang is not None else -1)
        fate.append(code)
        nbytes.append(len(text.encode("utf-8", "surrogatepass")))
        line.append(doc.line)
        source.append(sources[doc.source])
        val.append(_unit_hash(text, cfg.seed, "val") < cfg.val_fraction)
        sample.append(_unit_hash(text, cfg.seed, "tokenizer"))
        # Every document gets a key and signature row (rejected ones are skipped in dedup), so
        # row k of every array is document k of the file.
        batch.append(text if code == KEEP else "")
        if len(batch) >= _BATCH_DOCS:
            flush()
    flush()
    n = len(fate)
    P = cfg.dedup.num_perm
    arrays = {
        "fate": np.asarray(fate, np.int16), "bytes": np.asarray(nbytes, np.int64),
        "line": np.asarray(line, np.int64), "source": np.asarray(source, np.int32), "val": np.asarray(val, bool),
        "sample": np.asarray(sample, np.float64), "language": np.asarray(language, np.int16),
        "exact": np.concatenate(keys) if keys else np.zeros(0, np.uint64),
    }
    if sc.minhash is not None:
        sig = np.concatenate(sigs) if sigs else np.zeros((0, P), np.uint64)
        arrays["bands"] = sc.minhash.band_keys(sig) if n else np.zeros((0, cfg.dedup.bands), np.uint64)
        np.save(run.unit_file(i, "sig.tmp.npy"), sig)
        os.replace(run.unit_file(i, "sig.tmp.npy"), run.unit_file(i, "sig.npy"))
    _save_arrays(run.unit_file(i, "filter.npz"), **arrays)
    return {"read": {**stats.as_dict(), "examples": stats.examples}, "documents": n, "reasons": sc.reasons,
            "languages": languages}


def _decontamination_index(dc: DecontaminateConfig) -> NgramIndex:
    return NgramIndex.from_texts(_evaluation_texts(dc), n=dc.ngram)


def _evaluation_texts(dc: DecontaminateConfig) -> Iterator[str]:
    """Every text of the evaluation files: the chosen (or all) string fields of JSONL objects,
    the lines of text files."""
    for path in expand_inputs(dc.files):
        if not any(s in path.name for s in (".jsonl", ".ndjson")):
            yield from (doc.text for doc in read_files([path], txt_docs="line"))
            continue
        opener = gzip.open if path.name.endswith(".gz") else open
        with opener(path, "rt", encoding="utf-8", errors="replace") as f:
            for number, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as e:
                    raise DataError(f"{path}:{number}: invalid JSON in an evaluation set ({e.msg})") from None
                if isinstance(obj, dict):
                    yield from (v for k, v in obj.items() if isinstance(v, str) and (not dc.fields or k in dc.fields))


class _PerplexityScorer:
    """Perplexity of a document's first tokens under a small model (CCNet, Wenzek et al. 2020,
    keeps the documents whose perplexity under a reference model lies in a band)."""

    def __init__(self, pc: PerplexityConfig):
        from temper.model.convert import load_hf  # torch only when asked

        self.pc = pc
        self.model, _ = load_hf(pc.model)
        self.tok = plain_text_encoder(load_tokenizer(pc.model))

    def perplexity(self, text: str) -> float:
        import torch

        from temper.train.step import token_loss_sum

        ids = self.tok.encode_ids(text)[: self.pc.max_tokens]
        if len(ids) < 2:
            return math.inf
        x = torch.tensor([ids])
        with torch.no_grad():
            logits = self.model(x[:, :-1])
        return math.exp(token_loss_sum(logits, x[:, 1:]).item() / (len(ids) - 1))

    def reason(self, text: str) -> str | None:
        ppl = self.perplexity(text)
        if self.pc.min and ppl < self.pc.min:
            return "perplexity_low"
        if self.pc.max and ppl > self.pc.max:
            return "perplexity_high"
        return None


# ---- 3. dedup --------------------------------------------------------------------------------------

class _Signatures:
    """Rows of every file's signature matrix by global document index, read from memory maps."""

    def __init__(self, run: _Run, offsets: np.ndarray, total: int):
        self.offsets, self.total = offsets, total
        self.maps = [np.load(run.unit_file(i, "sig.npy"), mmap_mode="r") for i in range(len(run.units))]

    def __len__(self) -> int:
        return self.total

    def __getitem__(self, idx: np.ndarray) -> np.ndarray:
        idx = np.asarray(idx)
        unit = np.searchsorted(self.offsets, idx, side="right") - 1
        out = np.empty((len(idx), self.maps[0].shape[1] if self.maps else 0), np.uint64)
        for u in np.unique(unit):
            sel = unit == u
            out[sel] = self.maps[u][idx[sel] - self.offsets[u]]
        return out


def _dedup(run: _Run) -> dict:
    """Global duplicate decisions, saved as `dedup.npz` (fate per document, after the filters)."""
    cfg = run.cfg.dedup
    path = run.work / "dedup.npz"
    done = run.work / "dedup.json"
    if done.exists():
        return json.loads(done.read_text())
    units = [run.load_arrays(i, "filter") for i in range(len(run.units))]
    counts = np.array([len(u["fate"]) for u in units], np.int64)
    offsets = np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(np.int64)
    fate = np.concatenate([u["fate"] for u in units]) if units else np.zeros(0, np.int16)
    skip = fate != KEEP
    pairs: list[dict] = []
    if cfg.exact and len(fate):
        candidates = np.flatnonzero(~skip)  # documents the filters rejected take no part
        removed, exact_pairs = find_exact_duplicates(np.concatenate([u["exact"] for u in units])[candidates])
        fate[candidates[removed]] = EXACT_DUP
        skip[candidates[removed]] = True
        pairs += [{"kind": "exact", "duplicate": int(candidates[d]), "kept": int(candidates[k])}
                  for d, k in exact_pairs[:5]]
    if cfg.near and len(fate):
        bands = np.concatenate([u["bands"] for u in units])
        removed, near_pairs = find_near_duplicates(bands, _Signatures(run, offsets, len(fate)), cfg.threshold, skip=skip)
        fate[removed & ~skip] = NEAR_DUP
        pairs += [{"kind": "near", "duplicate": int(d), "kept": int(k), "jaccard": round(float(j), 3)}
                  for d, k, j in near_pairs[:5]]
    _save_arrays(path, fate=fate, offsets=offsets)
    where = lambda g: _where(run, units, offsets, g)
    for p in pairs:
        p["duplicate"], p["kept"] = where(p["duplicate"]), where(p["kept"])
    result = {"exact": int((fate == EXACT_DUP).sum()), "near": int((fate == NEAR_DUP).sum()), "pairs": pairs}
    atomic_write_json(done, result)
    return result


def _where(run: _Run, units: list[dict], offsets: np.ndarray, g: int) -> str:
    u = int(np.searchsorted(offsets, g, side="right") - 1)
    k = g - offsets[u]
    return f"{_path(run.units[u][int(units[u]['source'][k])])}:{int(units[u]['line'][k])}"


def _final_fates(run: _Run) -> tuple[np.ndarray, np.ndarray]:
    with np.load(run.work / "dedup.npz") as z:
        return z["fate"], z["offsets"]


# ---- 4. tokenizer ----------------------------------------------------------------------------------

def _tokenizer(run: _Run, cfg: PrepareConfig):
    """Load the tokenizer, or train it: a BPE on the kept train documents with the smallest sample
    hashes that fit in train_bytes / train_docs (a bottom-k sample, spread over the whole corpus,
    the same on every run, blind to val); a char one on every kept document (val too: a
    character missing from the vocabulary would be lost)."""
    tc = cfg.tokenizer
    saved = run.work / "tokenizer.json"
    stats_file = run.work / "tokenizer-stats.json"
    if tc.kind == "file":
        return load_tokenizer(tc.path), {}
    if saved.exists():
        return load_tokenizer(saved), json.loads(stats_file.read_text())
    fate, offsets = _final_fates(run)
    units = [run.load_arrays(i, "filter") for i in range(len(run.units))]
    kept = fate == KEEP
    if tc.kind == "bpe" and cfg.split == "document" and len(fate):
        kept &= ~np.concatenate([u["val"] for u in units])
    stats: dict = {}
    if tc.kind == "bpe" and len(fate):
        sample = np.concatenate([u["sample"] for u in units])
        size = np.concatenate([u["bytes"] for u in units]).astype(np.float64)
        if cfg.split == "tail":
            size *= 1 - cfg.val_fraction
        order = np.argsort(np.where(kept, sample, np.inf), kind="stable")[: int(kept.sum())]
        within = np.ones(len(order), bool)
        if tc.train_bytes:
            within &= np.cumsum(size[order]) <= tc.train_bytes
            within[0] = True  # at least one document, however long
        if tc.train_docs:
            within &= np.arange(len(order)) < tc.train_docs
        selected = np.zeros(len(fate), bool)
        selected[order[within]] = True
    else:
        selected = kept
    if not selected.any():
        raise DataError("no train documents to train the tokenizer on")
    run.selected = selected
    run.offsets = offsets
    texts: list[str] = []
    for _, part in sorted(_map_collect(run, _tokenizer_texts_unit)):
        texts += part
    if tc.kind == "bpe":
        stats = {"trained_on_documents": len(texts), "trained_on_chars": sum(map(len, texts))}
    tok = train_tokenizer(texts, tc.kind, tc.vocab_size, tc.special_tokens, show_progress=cfg.progress)
    save_tokenizer(tok, saved)
    atomic_write_json(stats_file, stats)
    return tok, stats


def _map_collect(run: _Run, task: Callable) -> list[tuple[int, Any]]:
    todo = [i for i in range(len(run.units)) if run.selected[run.offsets[i]:_end(run, i)].any()]
    workers = min(run.cfg.workers or os.cpu_count() or 1, len(todo))
    return list(_map(task, run, todo, workers))


def _end(run: _Run, i: int) -> int:
    return int(run.offsets[i + 1]) if i + 1 < len(run.offsets) else len(run.selected)


def _tokenizer_texts_unit(run: _Run, i: int) -> list[str]:
    """The selected documents of file i (char tokenizer: only their distinct characters)."""
    sel = run.selected[run.offsets[i]:_end(run, i)]
    texts = []
    for k, doc in enumerate(_documents(run, i, limit=len(sel))):
        if sel[k]:
            text = doc.text
            if run.cfg.split == "tail" and run.cfg.tokenizer.kind == "bpe":  # keep the val tail unseen
                text = text[: int(len(text) * (1 - run.cfg.val_fraction))]
            texts.append(text)
    if run.cfg.tokenizer.kind == "char":
        return ["".join(sorted(set().union(*texts)))]
    return texts


def _auto(token: str) -> str | None:
    return None if token == "auto" else token


# ---- 5. tokenize -----------------------------------------------------------------------------------

def _tokenize_unit(run: _Run, i: int) -> dict:
    from tokenizers import Tokenizer

    cfg = run.cfg
    encoder = _cached("tokenizer:" + run.tokenizer_json, lambda: plain_text_encoder(Tokenizer.from_str(run.tokenizer_json)))
    fate_all, offsets = _final_fates(run)
    start = int(offsets[i])
    arrays = run.load_arrays(i, "filter")
    fate = fate_all[start:start + len(arrays["fate"])].copy()
    reasons = run.load_json(i, "filter")["reasons"]
    dtype = shards.dtype_for(run.vocab)
    tmp = run.work / f"unit-{i:06d}.tokens.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    writers = {s: shards.ShardWriter(tmp, s, run.vocab, run.eot, shard_tokens=1 << 62) for s in ("train", "val")}
    tail = _TailSplit(writers, cfg.val_fraction) if cfg.split == "tail" else None
    rejects = open(run.unit_file(i, "rejects.jsonl.tmp"), "w", encoding="utf-8") if cfg.rejects else None
    batch: list[tuple[int, Document]] = []
    size = 0

    def flush() -> None:
        for (k, doc), ids in zip(batch, encode_batch(encoder, [d.text for _, d in batch], dtype), strict=True):
            if len(ids) < cfg.min_tokens:
                fate[k] = SHORT
                _reject(rejects, doc, "short")
            elif tail is not None:
                tail.add(doc.source, ids)
            else:
                writers["val" if arrays["val"][k] else "train"].add(ids)
        batch.clear()

    for k, doc in enumerate(_documents(run, i, limit=len(fate))):
        if fate[k] != KEEP:
            code = int(fate[k])
            _reject(rejects, doc, _FATES[code] if code < len(_FATES) else reasons[code - len(_FATES)])
            continue
        batch.append((k, doc))
        size += len(doc.text)
        if size >= _BATCH_CHARS or len(batch) >= _BATCH_DOCS:
            flush()
            size = 0
    flush()
    if tail is not None:
        tail.flush()
    splits = {s: w.close() for s, w in writers.items()}
    if rejects is not None:
        rejects.close()
        os.replace(run.unit_file(i, "rejects.jsonl.tmp"), run.unit_file(i, "rejects.jsonl"))
    final = run.work / f"unit-{i:06d}.tokens"
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    counts = Counter(_FATES[c] if c < len(_FATES) else reasons[c - len(_FATES)] for c in fate.tolist())
    kept = fate == KEEP
    return {"splits": {s: {"tokens": v["tokens"], "documents": v["documents"]} for s, v in splits.items()},
            "fates": dict(counts), "kept_bytes": int(arrays["bytes"][kept].sum()), "short": int((fate == SHORT).sum()),
            "languages": _language_counts(arrays, kept, run.load_json(i, "filter")["languages"])}


def _language_counts(arrays: dict, kept: np.ndarray, names: list[str]) -> dict[str, int]:
    codes, n = np.unique(arrays["language"][kept], return_counts=True)
    return {names[c]: int(k) for c, k in zip(codes.tolist(), n.tolist()) if c >= 0}


def _reject(f, doc: Document, reason: str) -> None:
    if f is not None:
        f.write(json.dumps({"source": doc.source, "line": doc.line, "id": doc.id, "reason": reason,
                            "text": doc.text}, ensure_ascii=False) + "\n")


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


# ---- 6. shard and report ---------------------------------------------------------------------------

def _write_shards(run: _Run, out: Path, vocab: int, eot: int | None, shard_bytes: int) -> dict:
    """Concatenate the files' token pieces, in input order, into shards of about shard_bytes."""
    dtype = shards.dtype_for(vocab)
    per_shard = max(1, shard_bytes // dtype.itemsize)
    splits = {}
    for split in ("train", "val"):
        writer = shards.ShardWriter(out, split, vocab, eot, shard_tokens=per_shard)
        for i in range(len(run.units)):
            piece = run.work / f"unit-{i:06d}.tokens"
            if not piece.exists():
                continue
            for j in range(_count(piece, split)):
                name = f"{split}-{j:05d}"
                if (piece / f"{name}.bin").stat().st_size:
                    tokens = np.memmap(piece / f"{name}.bin", dtype=dtype, mode="r")
                    writer.add_documents(tokens, np.fromfile(piece / f"{name}.idx", dtype="<i8"))
        splits[split] = writer.close()
    return splits


def _count(piece: Path, split: str) -> int:
    n = 0
    while (piece / f"{split}-{n:05d}.bin").exists():
        n += 1
    return n


def _concatenate(parts: Iterator[Path], dest: Path) -> None:
    tmp = dest.with_name(dest.name + ".tmp")
    with open(tmp, "wb") as f:
        for part in parts:
            if part.exists():
                with open(part, "rb") as src:
                    shutil.copyfileobj(src, f)
    os.replace(tmp, dest)


def _report(cfg: PrepareConfig, run: _Run, read: dict, dedup: dict,
            tokenized: list[dict], splits: dict, seconds: dict, sample_stats: dict, vocab: int) -> dict:
    """report.json: documents and bytes in and out of every stage, and why the others left."""
    fate, _ = _final_fates(run)
    nbytes = np.concatenate([run.load_arrays(i, "filter")["bytes"] for i in range(len(run.units))]) \
        if len(fate) else np.zeros(0, np.int64)
    fates = Counter()
    languages = Counter()
    for t in tokenized:
        fates.update(t["fates"])
        languages.update(t["languages"])
    filtered = {k: v for k, v in fates.items() if k not in _FATES}
    after_filter = fate < len(_FATES)
    after_dedup = after_filter & (fate != EXACT_DUP) & (fate != NEAR_DUP)
    tokens = {s: v["tokens"] for s, v in splits.items()}
    kept_docs = sum(t["splits"]["train"]["documents"] + t["splits"]["val"]["documents"] for t in tokenized)
    if cfg.split == "tail":  # a document cut at the val boundary is in both splits
        kept_docs = int(fates.get("kept", 0))

    def stage(mask_in: np.ndarray, mask_out: np.ndarray, name: str) -> dict:
        return {"documents_in": int(mask_in.sum()), "bytes_in": int(nbytes[mask_in].sum()),
                "documents_out": int(mask_out.sum()), "bytes_out": int(nbytes[mask_out].sum()),
                "seconds": round(seconds[name], 2)}

    everything = np.ones(len(fate), bool)
    return {
        "input": {"files": len(run.files), "bytes": sum(_size(f) for f in run.files)},
        "read": read,
        "stages": {
            "filter": {**stage(everything, after_filter, "filter"), "rejected": dict(filtered)},
            "dedup": {**stage(after_filter, after_dedup, "dedup"),
                      "exact_duplicates": dedup["exact"], "near_duplicates": dedup["near"],
                      "duplicate_rate": round((dedup["exact"] + dedup["near"]) / max(int(after_filter.sum()), 1), 4),
                      "examples": dedup["pairs"]},
            "tokenizer": {"kind": cfg.tokenizer.kind, "vocab_size": vocab, **sample_stats,
                          "seconds": round(seconds["tokenizer"], 2)},
            "tokenize": {"documents_in": int(after_dedup.sum()), "bytes_in": int(nbytes[after_dedup].sum()),
                         "documents_out": kept_docs, "bytes_out": sum(t["kept_bytes"] for t in tokenized),
                         "seconds": round(seconds["tokenize"], 2), "short": int(fates.get("short", 0)),
                         "tokens": tokens},
            "shard": {"shards": {s: len(v["shards"]) for s, v in splits.items()}, "seconds": round(seconds["shard"], 2)},
        },
        "languages": dict(languages.most_common()),
        "tokens": tokens,
        "documents": {s: v["documents"] for s, v in splits.items()},
        "seconds": {k: round(v, 2) for k, v in seconds.items()},
        "workers": cfg.workers or os.cpu_count(),
    }


def _unit_hash(text: str, seed: int, purpose: str) -> float:
    """A number in [0, 1) fixed by the text, the seed and the purpose: the same in any process."""
    key = f"{seed}:{purpose}".encode()
    digest = hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=8, key=key).digest()
    return int.from_bytes(digest, "little") / 2**64


def _summary(cfg: PrepareConfig, report: dict) -> str:
    read, st = report["read"], report["stages"]
    lines = [
        f"prepared {cfg.out}: {read['files']} files, {read['documents'] + sum(read['errors'].values()) + sum(read['dropped'].values())} records read",
        f"  filter: {st['filter']['documents_in']:,} -> {st['filter']['documents_out']:,} documents; "
        f"rejected {_counts(st['filter']['rejected'])}",
        f"  dedup: {st['dedup']['documents_in']:,} -> {st['dedup']['documents_out']:,} documents "
        f"({st['dedup']['exact_duplicates']} exact, {st['dedup']['near_duplicates']} near duplicates)",
        f"  kept {st['tokenize']['documents_out']:,} documents; dropped {_counts(read['dropped'])}; "
        f"bad input skipped {_counts(read['errors'])}",
    ]
    if read["repaired"]:
        lines.append(f"  repaired characters: {_counts(read['repaired'])}")
    lines += [f"  skipped: {e}" for e in read["examples"][:5]]
    if report["languages"]:
        lines.append(f"  languages: {_counts(dict(list(report['languages'].items())[:8]))}")
    for name in ("train", "val"):
        lines.append(f"  {name}: {report['tokens'][name]:,} tokens, {report['documents'][name]:,} documents, "
                     f"{st['shard']['shards'][name]} shards")
    sec = report["seconds"]
    lines.append(f"  vocab {st['tokenizer']['vocab_size']}; time {sec['total']}s ("
                 + ", ".join(f"{k} {v}s" for k, v in sec.items() if k != "total") + f"); report: {cfg.out}/{REPORT}")
    return "\n".join(lines)


def _counts(c: Counter | dict) -> str:
    items = [f"{k}={v}" for k, v in sorted(c.items()) if v]
    return ", ".join(items) if items else "none"
