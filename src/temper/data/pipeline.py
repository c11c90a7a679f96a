"""The stages of `temper prepare`, each run over units of work in worker processes, resumable.

    input files -> units -> filter -> dedup -> tokenizer -> tokenize -> shards, report

A unit is a task's share of the input: consecutive small files, or a part of a big line-oriented
file. Each stage runs one function per unit in a pool of spawned processes kept for the whole
run (starting one costs ~0.4 s of imports: a pool per stage showed in the tokenize stage's speed),
or with `executor=ray` as one Ray task per unit, on a local Ray or a cluster: the same function,
the same files, the same output bytes (`Run.map` is the only difference).
A unit's results are files in the work directory `<out>/.prepare/`, its `<stage>.json` renamed
into place last as its completion marker, so an interrupted run resumes where it stopped.

Per document, the filter stage records its fate, size, split and sampling hashes, its exact-dedup
key and MinHash signature, as arrays (row k = document k of the unit), so the later stages read
the text again but never judge it again.

It does not score perplexity (a model sits above `data`): the recipe passes a scorer factory.
It does not write the manifest or remove the work directory: the recipe does, last.
"""

from __future__ import annotations

import gzip
import hashlib
import importlib.util
import json
import logging
import multiprocessing as mp
import os
import shutil
import sys
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from itertools import islice
from pathlib import Path
from typing import Any, Literal

import numpy as np
from tokenizers import Tokenizer
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
    MAX_VOCAB_SIZE,
    UnknownCounter,
    check_unknown,
    encode_batch,
    load_tokenizer,
    plain_text_encoder,
    save_tokenizer,
    train_tokenizer,
)
from temper.files import UnsafePath, atomic_write_json

WORK = ".prepare"  # the work directory inside `out`, removed when the manifest is written
REPORT = "report.json"
REJECTS = "rejects.jsonl"
_BATCH_CHARS = 4 << 20  # documents encoded / hashed together: big enough to amortise the calls
_BATCH_DOCS = 8192
# Fates of a document, stored per document as int16 codes; filter reasons get codes after these.
KEEP, EXACT_DUP, NEAR_DUP, SHORT = 0, 1, 2, 3
_FATES = ["kept", "exact_duplicate", "near_duplicate", "short"]


# ---- config ----------------------------------------------------------------------------------------

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
    unknown: Literal["unk", "error"] = "unk"
    """A character the tokenizer has no token for: unk (char: a reserved <|unk|> token) encodes it as the unknown token
    and counts it in the summary; error stops, naming file:line. A tokenizer without an unknown token fails either way."""

    def __post_init__(self) -> None:
        if self.kind == "file" and not self.path:
            raise ValueError("tokenizer.kind=file needs tokenizer.path")
        if self.kind == "bpe" and self.vocab_size < 257:
            raise ValueError(f"tokenizer.vocab_size={self.vocab_size}: a byte-level BPE needs more than 256")
        if self.vocab_size > MAX_VOCAB_SIZE:
            raise ValueError(f"tokenizer.vocab_size={self.vocab_size} is above the maximum of {MAX_VOCAB_SIZE:,}")


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


# A function of the perplexity config that builds a text -> perplexity scorer (the recipe's, which
# loads the model). It crosses into worker processes, so it must be a module-level name.
PerplexityFactory = Callable[[PerplexityConfig], Callable[[str], float]]


@dataclass
class PipelineConfig:
    input: list[str] = field(default_factory=list)
    """Files, directories or globs (** recursive): .txt/.md/.py/... (.gz, .zst), .jsonl (.gz, .zst), .parquet."""
    exclude: list[str] = field(default_factory=lambda: ["*/site-packages/*", "*/dist-packages/*"])
    """Glob patterns of files to leave out (by default installed packages, which live inside the stdlib dir)."""
    out: str = "data/prepared"
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
    """Worker processes (0: every CPU core; 1: all in this process). executor=ray: the local Ray's CPUs; on a cluster
    only what the units are sized for (about four per worker, at most part_bytes each)."""
    executor: Literal["processes", "ray"] = "processes"
    """How the units of a stage run: processes (a pool of `workers` spawned processes) or ray (one Ray task per unit,
    `pip install 'temper[ray]'`). Units read the input paths and write their results to `out`'s work directory, so
    on a cluster of several machines the input and `out` must be on a filesystem every node mounts at the same path,
    and every node needs the same temper installed."""
    ray_address: str = ""
    """executor=ray: '' starts a local Ray with `workers` CPUs (stopped at the end); 'auto' or host:port joins a
    running cluster (left running)."""
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
        if self.ray_address and self.executor != "ray":
            raise ValueError(f"ray_address={self.ray_address!r} needs executor=ray")
        if self.executor == "ray" and importlib.util.find_spec("ray") is None:
            raise ValueError("executor=ray needs Ray, which is not installed: pip install 'temper[ray]'")


# ---- units, the run, the worker pool ----------------------------------------------------------------

@dataclass(frozen=True)
class Unit:
    """One task's input (consecutive files, or a part of one) and the files of its results."""

    index: int
    items: tuple[Path | FilePart, ...]
    work: Path

    def file(self, name: str) -> Path:
        return self.work / f"unit-{self.index:06d}.{name}"

    def load_json(self, stage: str) -> dict:
        return json.loads(self.file(f"{stage}.json").read_text())

    def load_arrays(self, stage: str) -> dict[str, np.ndarray]:
        with np.load(self.file(f"{stage}.npz")) as z:
            return dict(z)

    @property
    def size(self) -> int:
        return sum(map(_size, self.items))


class Run:
    """One prepare: its config, the input cut into units, the work directory and the worker pool
    (or, executor=ray, the connection to Ray).

    Use it as a context manager: leaving it stops the pool, or the local Ray it started (also on
    Ctrl-C or an error).
    """

    def __init__(self, cfg: PipelineConfig, files: list[Path], fingerprint: str):
        self.cfg, self.files, self.fingerprint = cfg, files, fingerprint
        self.out = Path(cfg.out)
        self.work = _work_dir(self.out, fingerprint)
        self.workers = cfg.workers or os.cpu_count() or 1
        # Consecutive small files share a unit; a big line-oriented file is cut into parts
        # (split=tail cuts each whole file, so its files stay whole). About four units per worker
        # balance the load; fewer, bigger ones would cost less per unit.
        target = sum(map(_size, files)) / (4 * self.workers)
        part_bytes = cfg.part_bytes if cfg.split == "document" else 0
        if part_bytes:
            target = part_bytes = int(min(part_bytes, max(target, 1 << 20)))
        groups: list[list[Path | FilePart]] = []
        size = target
        for item in (u for f in files for u in split_file(f, part_bytes, cfg.txt_docs)):
            if size >= target:
                groups.append([])
                size = 0
            groups[-1].append(item)
            size += _size(item)
        self.units = [Unit(i, tuple(g), self.work) for i, g in enumerate(groups)]
        self._pool: Any = None
        self._ray: _Ray | None = None

    def __enter__(self) -> Run:
        return self

    def __exit__(self, *exc: object) -> None:
        if self._pool is not None:
            self._pool.terminate()
            self._pool.join()
            self._pool = None
        if self._ray is not None:
            self._ray.close()
            self._ray = None

    def map(self, task: Callable, jobs: list[tuple]) -> Iterator[tuple[int, Any]]:
        """(k, task(*jobs[k])) for every job, in any order: in this process when one would do
        (one worker, or a single job before the pool exists), else in the pool or as Ray tasks."""
        if self._pool is None and min(self.workers, len(jobs)) <= 1:
            return ((k, task(*job)) for k, job in enumerate(jobs))
        if self.cfg.executor == "ray":
            if self._ray is None:
                self._ray = _Ray(self.cfg.ray_address, self.workers)
            return self._ray.map(task, jobs)
        if self._pool is None:
            # spawn, not fork: this process may already run tokenizers' Rust thread pool, which fork breaks.
            self._pool = mp.get_context("spawn").Pool(self.workers, initializer=_init_worker)
        return self._pool.imap_unordered(_call, [(k, task, job) for k, job in enumerate(jobs)])

    def stage(self, name: str, task: Callable, args: Callable[[Unit], tuple] = lambda u: ()) -> list[dict]:
        """Run `task(cfg, unit, *args(unit))` for every unit without a `<name>.json`, which gets the
        task's result; return every unit's result."""
        todo = [u for u in self.units if not u.file(f"{name}.json").exists()]
        bar = tqdm(total=sum(u.size for u in todo), unit="B", unit_scale=True, desc=name,
                   disable=not self.cfg.progress or not todo, file=sys.stderr)
        with bar:
            for k, result in self.map(task, [(self.cfg, u, *args(u)) for u in todo]):
                atomic_write_json(todo[k].file(f"{name}.json"), result)
                bar.update(todo[k].size)
        return [u.load_json(name) for u in self.units]


# Processes already use every core: the Rust thread pools inside each (tokenizers', rensa's)
# would oversubscribe them.
_WORKER_ENV = {"TOKENIZERS_PARALLELISM": "false", "RAYON_NUM_THREADS": "1"}


def _init_worker() -> None:
    os.environ.update(_WORKER_ENV)


def _call(job: tuple[int, Callable, tuple]) -> tuple[int, Any]:
    k, task, args = job
    return k, task(*args)


class _Ray:
    """executor=ray: a connection to Ray (a local one started here, or a cluster joined) that runs
    each job as a task of one CPU, `_call` as in the pool, in workers with the pool's environment."""

    def __init__(self, address: str, workers: int):
        import ray  # lazily: an extra (PipelineConfig checked that it is installed)

        self.ray = ray
        self.started = not ray.is_initialized()  # a caller's own ray.init is used and left running
        if self.started:
            ray.init(address=address or "local", num_cpus=None if address else workers, include_dashboard=False,
                     logging_level=logging.WARNING)
        self.pending: list[Any] = []
        self.call = ray.remote(num_cpus=1, runtime_env={"env_vars": _WORKER_ENV})(_call)

    def map(self, task: Callable, jobs: list[tuple]) -> Iterator[tuple[int, Any]]:
        """Submit every job, then yield (k, result) as each finishes; a task's exception is raised
        as itself (a DataError stays one), not wrapped in Ray's."""
        ray = self.ray
        self.pending = [self.call.remote((k, task, job)) for k, job in enumerate(jobs)]
        while self.pending:
            done, self.pending = ray.wait(self.pending, num_returns=1)
            try:
                result = ray.get(done[0])
            except ray.exceptions.RayTaskError as e:
                raise e.cause from None
            yield result

    def close(self) -> None:
        for ref in self.pending:  # tasks left by an error or Ctrl-C must not go on writing on a cluster
            self.ray.cancel(ref, force=True)
        self.pending = []
        if self.started:
            self.ray.shutdown()


def _size(item: Path | FilePart) -> int:
    return item.end - item.start if isinstance(item, FilePart) else item.stat().st_size


def _path(item: Path | FilePart) -> str:
    return str(item.path if isinstance(item, FilePart) else item)


_cache: dict[str, Any] = {}


def _cached(key: str, build: Callable[[], Any]) -> Any:
    """One instance per process of what is costly to build (language model, tokenizer), rebuilt
    when the key (what it is built from) changes."""
    if key not in _cache:
        _cache.clear()
        _cache[key] = build()
    return _cache[key]


def _save_arrays(path: Path, **arrays: np.ndarray) -> None:
    tmp = path.with_name(path.name + ".tmp.npz")
    np.savez(tmp, **arrays)
    os.replace(tmp, path)


# ---- resumability ---------------------------------------------------------------------------------

def fingerprint(cfg: PipelineConfig, files: list[Path]) -> str:
    """Hash of everything that decides the output: the config (less how it is run) and each input
    file's path, size and modification time. Equal fingerprints: the same output."""
    settings = {k: v for k, v in config.to_dict(cfg).items()
                if k not in ("workers", "executor", "ray_address", "progress")}
    h = hashlib.sha256(json.dumps(settings, sort_keys=True).encode())
    for f in files:
        st = f.stat()
        h.update(f"{f}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    for extra in (cfg.tokenizer.path, cfg.perplexity.model) + tuple(cfg.decontaminate.files):
        if extra and os.path.exists(extra):
            h.update(f"{extra}\0{os.stat(extra).st_mtime_ns}\n".encode())
    return h.hexdigest()


def already_prepared(out: Path, fingerprint: str) -> bool:
    """Whether `out` holds a complete output of the same fingerprint, its files all there."""
    try:
        manifest = shards.read_manifest(out)
    except (shards.ShardError, UnsafePath):  # an old output to replace
        return False
    if manifest.get("stats", {}).get("fingerprint") != fingerprint:
        return False
    try:  # the files must still be there with their sizes (checksums are the loader's `verify`)
        for split in manifest["splits"]:
            shards.load_index(out, split, verify=False)
            shards.load_split(out, split, verify=False)
    except (shards.ShardError, UnsafePath):
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


# ---- filter ----------------------------------------------------------------------------------------

def filter_documents(run: Run, perplexity: PerplexityFactory | None = None) -> dict:
    """Judge every document; return what was read (counts of bad records, with examples).
    Fails when more than max_skip_fraction of the records were bad."""
    cfg = run.cfg
    if cfg.perplexity.model and perplexity is None:
        raise ValueError("perplexity.model is set but no perplexity scorer was given")
    if cfg.max_documents:  # units in order, in this process, until that many documents are read
        read_so_far = 0
        for i, unit in enumerate(run.units):
            if not unit.file("filter.json").exists():
                atomic_write_json(unit.file("filter.json"),
                                  _filter_unit(cfg, unit, perplexity, cfg.max_documents - read_so_far))
            read_so_far += unit.load_json("filter")["documents"]
            if read_so_far >= cfg.max_documents:
                run.units = run.units[: i + 1]
                break
        results = [u.load_json("filter") for u in run.units]
    else:
        results = run.stage("filter", _filter_unit, lambda u: (perplexity, None))
    stats = ReadStats()
    for r in results:
        stats.merge(ReadStats.from_dict(r["read"]))
    stats.check_fraction(cfg.max_skip_fraction)
    return {**stats.as_dict(), "examples": stats.examples}


def _documents(cfg: PipelineConfig, unit: Unit, stats: ReadStats | None = None,
               limit: int | None = None) -> Iterator[Document]:
    """The documents of a unit, the same sequence every time it is read."""
    # The skip fraction is checked over the whole corpus once every unit is read (a file with one
    # bad line of two is not a reason to stop), so each unit's reader only counts.
    docs = read_files(
        list(unit.items), text_field=cfg.text_field, txt_docs=cfg.txt_docs, on_error="fail" if cfg.strict else "skip",
        max_skip_fraction=1.0, strict_utf8=cfg.strict_utf8, max_line_bytes=cfg.max_line_bytes,
        stats=stats, id_field=cfg.id_field,
    )
    return islice(docs, limit) if limit is not None else docs


class _Judges:
    """The per-document judges of the filter stage, built once per process."""

    def __init__(self, cfg: PipelineConfig, perplexity: PerplexityFactory | None):
        self.filter = DocumentFilter(cfg.filters)
        self.decontam = _decontamination_index(cfg.decontaminate) if cfg.decontaminate.files else None
        self.perplexity = perplexity(cfg.perplexity) if perplexity and cfg.perplexity.model else None
        self.band = cfg.perplexity
        self.minhash = MinHasher(cfg.dedup) if cfg.dedup.near else None
        self.reasons: list[str] = []  # filter reason -> code (offset by len(_FATES))

    def fate(self, text: str, verdict: Any) -> int:
        """KEEP, or the code of the first reason to drop the text."""
        if verdict is not None and verdict.reason:
            return self.code(verdict.reason)
        if self.decontam is not None and self.decontam.overlaps(text):
            return self.code("contaminated")
        if self.perplexity is not None:
            ppl = self.perplexity(text)
            if self.band.min and ppl < self.band.min:
                return self.code("perplexity_low")
            if self.band.max and ppl > self.band.max:
                return self.code("perplexity_high")
        return KEEP

    def code(self, reason: str) -> int:
        if reason not in self.reasons:
            self.reasons.append(reason)
        return len(_FATES) + self.reasons.index(reason)


def _filter_unit(cfg: PipelineConfig, unit: Unit, perplexity: PerplexityFactory | None, limit: int | None) -> dict:
    key = f"filter:{getattr(perplexity, '__qualname__', '')}:" + json.dumps(config.to_dict(cfg), sort_keys=True)
    judges = _cached(key, lambda: _Judges(cfg, perplexity))
    judges.reasons = []
    stats = ReadStats()
    fate, nbytes, line, val, sample, language, source = [], [], [], [], [], [], []
    sources = {_path(item): k for k, item in enumerate(unit.items)}
    languages: list[str] = []
    keys, sigs = [], []
    batch: list[str] = []

    def flush() -> None:
        if batch:
            keys.append(exact_keys(batch))
            if judges.minhash is not None:
                sigs.append(judges.minhash.signatures(batch))
            batch.clear()

    for doc in _documents(cfg, unit, stats, limit):
        text = doc.text
        verdict = judges.filter(text) if judges.filter.active else None
        code = judges.fate(text, verdict)
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
        # row k of every array is document k of the unit.
        batch.append(text if code == KEEP else "")
        if len(batch) >= _BATCH_DOCS:
            flush()
    flush()
    n = len(fate)
    arrays = {
        "fate": np.asarray(fate, np.int16), "bytes": np.asarray(nbytes, np.int64),
        "line": np.asarray(line, np.int64), "source": np.asarray(source, np.int32), "val": np.asarray(val, bool),
        "sample": np.asarray(sample, np.float64), "language": np.asarray(language, np.int16),
        "exact": np.concatenate(keys) if keys else np.zeros(0, np.uint64),
    }
    if judges.minhash is not None:
        sig = np.concatenate(sigs) if sigs else np.zeros((0, cfg.dedup.num_perm), np.uint64)
        arrays["bands"] = judges.minhash.band_keys(sig) if n else np.zeros((0, cfg.dedup.bands), np.uint64)
        np.save(unit.file("sig.tmp.npy"), sig)
        os.replace(unit.file("sig.tmp.npy"), unit.file("sig.npy"))
    _save_arrays(unit.file("filter.npz"), **arrays)
    return {"read": {**stats.as_dict(), "examples": stats.examples}, "documents": n, "reasons": judges.reasons,
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


def _unit_hash(text: str, seed: int, purpose: str) -> float:
    """A number in [0, 1) fixed by the text, the seed and the purpose: the same in any process."""
    key = f"{seed}:{purpose}".encode()
    digest = hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=8, key=key).digest()
    return int.from_bytes(digest, "little") / 2**64


# ---- dedup ------------------------------------------------------------------------------------------

class _Signatures:
    """Rows of every unit's signature matrix by global document index, read from memory maps."""

    def __init__(self, run: Run, offsets: np.ndarray, total: int):
        self.offsets, self.total = offsets, total
        self.maps = [np.load(u.file("sig.npy"), mmap_mode="r") for u in run.units]

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


def deduplicate(run: Run) -> dict:
    """Global duplicate decisions (one process, memory O(documents)), saved as `dedup.npz` (the
    fate of every document after the filters and dedup); return the counts and a few pairs."""
    cfg = run.cfg.dedup
    done = run.work / "dedup.json"
    if done.exists():
        return json.loads(done.read_text())
    units = [u.load_arrays("filter") for u in run.units]
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
    _save_arrays(run.work / "dedup.npz", fate=fate, offsets=offsets)
    for p in pairs:
        p["duplicate"], p["kept"] = _where(run, units, offsets, p["duplicate"]), _where(run, units, offsets, p["kept"])
    result = {"exact": int((fate == EXACT_DUP).sum()), "near": int((fate == NEAR_DUP).sum()), "pairs": pairs}
    atomic_write_json(done, result)
    return result


def _where(run: Run, units: list[dict], offsets: np.ndarray, g: int) -> str:
    """file:line of document g."""
    u = int(np.searchsorted(offsets, g, side="right") - 1)
    k = g - offsets[u]
    return f"{_path(run.units[u].items[int(units[u]['source'][k])])}:{int(units[u]['line'][k])}"


def _final_fates(run: Run) -> list[np.ndarray]:
    """The fate of every document after dedup, one array per unit."""
    with np.load(run.work / "dedup.npz") as z:
        fate, offsets = z["fate"], z["offsets"]
    return np.split(fate, offsets[1:]) if len(offsets) else []


# ---- tokenizer ----------------------------------------------------------------------------------------

def get_tokenizer(run: Run) -> tuple[Tokenizer, dict]:
    """Load the tokenizer, or train it: a BPE on the kept train documents with the smallest sample
    hashes that fit in train_bytes / train_docs (a bottom-k sample, spread over the whole corpus,
    the same on every run, blind to val); a char one on every kept document (val too: a
    character missing from the vocabulary would be lost). It is also saved in the work directory,
    where the tokenize stage's workers read it. Returns it and what it was trained on."""
    cfg, tc = run.cfg, run.cfg.tokenizer
    saved = run.work / "tokenizer.json"
    stats_file = run.work / "tokenizer-stats.json"
    if saved.exists() and stats_file.exists():
        return load_tokenizer(saved), json.loads(stats_file.read_text())
    if tc.kind == "file":
        tok = load_tokenizer(tc.path)
        save_tokenizer(tok, saved)
        atomic_write_json(stats_file, {})
        return tok, {}
    fates = _final_fates(run)
    units = [u.load_arrays("filter") for u in run.units]
    fate = np.concatenate(fates) if fates else np.zeros(0, np.int16)
    kept = fate == KEEP
    if tc.kind == "bpe" and cfg.split == "document" and len(fate):
        kept &= ~np.concatenate([u["val"] for u in units])
    selected = kept
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
    if not selected.any():
        raise DataError("no train documents to train the tokenizer on")
    per_unit = np.split(selected, np.cumsum([len(f) for f in fates])[:-1])
    jobs = [(cfg, u, sel) for u, sel in zip(run.units, per_unit, strict=True) if sel.any()]
    texts: list[str] = []
    for _, part in sorted(run.map(_tokenizer_texts_unit, jobs), key=lambda r: r[0]):
        texts += part
    stats = {"trained_on_documents": len(texts), "trained_on_chars": sum(map(len, texts))} if tc.kind == "bpe" else {}
    tok = train_tokenizer(texts, tc.kind, tc.vocab_size, tc.special_tokens, show_progress=cfg.progress,
                          unknown=tc.unknown)
    save_tokenizer(tok, saved)
    atomic_write_json(stats_file, stats)
    return tok, stats


def _tokenizer_texts_unit(cfg: PipelineConfig, unit: Unit, selected: np.ndarray) -> list[str]:
    """The selected documents of a unit (char tokenizer: only their distinct characters)."""
    texts = []
    for k, doc in enumerate(_documents(cfg, unit, limit=len(selected))):
        if selected[k]:
            text = doc.text
            if cfg.split == "tail" and cfg.tokenizer.kind == "bpe":  # keep the val tail unseen
                text = text[: int(len(text) * (1 - cfg.val_fraction))]
            texts.append(text)
    if cfg.tokenizer.kind == "char":
        return ["".join(sorted(set().union(*texts)))]
    return texts


# ---- tokenize ----------------------------------------------------------------------------------------

def tokenize(run: Run, vocab: int, eot: int | None) -> list[dict]:
    """Encode every kept document into per-unit train/val token pieces; one result per unit."""
    fates = _final_fates(run)
    tokenizer = run.work / "tokenizer.json"
    return run.stage("tokenize", _tokenize_unit, lambda u: (fates[u.index], tokenizer, vocab, eot))


def _tokenize_unit(cfg: PipelineConfig, unit: Unit, fate: np.ndarray, tokenizer: Path, vocab: int,
                   eot: int | None) -> dict:
    key = f"tokenizer:{tokenizer}:{tokenizer.stat().st_mtime_ns}"
    encoder, unknown = _cached(key, lambda: _encoder(load_tokenizer(tokenizer)))
    unknown_chars = 0
    fate = fate.copy()
    arrays = unit.load_arrays("filter")
    filtered = unit.load_json("filter")
    dtype = shards.dtype_for(vocab)
    tmp = unit.file("tokens.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    writers = {s: shards.ShardWriter(tmp, s, vocab, eot, shard_tokens=1 << 62) for s in ("train", "val")}
    tail = _TailSplit(writers, cfg.val_fraction) if cfg.split == "tail" else None
    rejects = open(unit.file("rejects.jsonl.tmp"), "w", encoding="utf-8") if cfg.rejects else None

    def batches() -> Iterator[list[tuple[int, Document]]]:
        """The kept documents in batches (the others go to the rejects file as they pass)."""
        batch, size = [], 0
        for k, doc in enumerate(_documents(cfg, unit, limit=len(fate))):
            if fate[k] != KEEP:
                _reject(rejects, doc, _reason(int(fate[k]), filtered["reasons"]))
                continue
            batch.append((k, doc))
            size += len(doc.text)
            if size >= _BATCH_CHARS or len(batch) >= _BATCH_DOCS:
                yield batch
                batch, size = [], 0
        if batch:
            yield batch

    def write(batch: list[tuple[int, Document]], encoded: list[np.ndarray]) -> None:
        nonlocal unknown_chars
        for (k, doc), ids in zip(batch, encoded, strict=True):
            if unknown.active:
                unknown_chars += check_unknown(unknown, doc.text, ids, f"{doc.source}:{doc.line}", cfg.tokenizer.unknown)
            if len(ids) < cfg.min_tokens:
                fate[k] = SHORT
                _reject(rejects, doc, "short")
            elif tail is not None:
                tail.add(doc.source, ids)
            else:
                writers["val" if arrays["val"][k] else "train"].add(ids)

    # The Rust encoder releases the GIL: a batch is encoded in a thread while this one reads the
    # next batch and writes the previous one.
    with ThreadPoolExecutor(1) as thread:
        pending = None
        for batch in batches():
            future = thread.submit(encode_batch, encoder, [doc.text for _, doc in batch], dtype)
            if pending is not None:
                write(pending[0], pending[1].result())
            pending = (batch, future)
        if pending is not None:
            write(pending[0], pending[1].result())
    if tail is not None:
        tail.flush()
    splits = {s: w.close() for s, w in writers.items()}
    if rejects is not None:
        rejects.close()
        os.replace(unit.file("rejects.jsonl.tmp"), unit.file("rejects.jsonl"))
    final = unit.file("tokens")
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    kept = fate == KEEP
    codes, n = np.unique(arrays["language"][kept], return_counts=True)
    return {"splits": {s: {"tokens": v["tokens"], "documents": v["documents"]} for s, v in splits.items()},
            "fates": dict(Counter(_reason(c, filtered["reasons"]) for c in fate.tolist())),
            "kept_bytes": int(arrays["bytes"][kept].sum()), "short": int((fate == SHORT).sum()),
            "unknown_chars": unknown_chars,
            "languages": {filtered["languages"][c]: int(m) for c, m in zip(codes.tolist(), n.tolist()) if c >= 0}}


def _encoder(tok: Tokenizer) -> tuple[Any, UnknownCounter]:
    """The corpus encoder and the counter of its unknown characters (special-token text is plain text)."""
    return plain_text_encoder(tok), UnknownCounter(tok, added_are_tokens=False)


def _reason(code: int, reasons: list[str]) -> str:
    return _FATES[code] if code < len(_FATES) else reasons[code - len(_FATES)]


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


# ---- shards and report ---------------------------------------------------------------------------

def write_shards(run: Run, vocab: int, eot: int | None) -> dict:
    """Concatenate the units' token pieces, in input order, into `out`'s shards of about
    shard_bytes (and rejects.jsonl when asked); return the manifest's splits."""
    out = run.out
    shards.clear_output(out)
    dtype = shards.dtype_for(vocab)
    per_shard = max(1, run.cfg.shard_bytes // dtype.itemsize)
    splits = {}
    for split in ("train", "val"):
        writer = shards.ShardWriter(out, split, vocab, eot, shard_tokens=per_shard)
        for unit in run.units:
            piece = unit.file("tokens")
            if not piece.exists():
                continue
            j = 0
            while (piece / f"{split}-{j:05d}.bin").exists():
                name = f"{split}-{j:05d}"
                if (piece / f"{name}.bin").stat().st_size:
                    tokens = np.memmap(piece / f"{name}.bin", dtype=dtype, mode="r")
                    writer.add_documents(tokens, np.fromfile(piece / f"{name}.idx", dtype="<i8"))
                j += 1
        splits[split] = writer.close()
    if run.cfg.rejects:
        tmp = out / (REJECTS + ".tmp")
        with open(tmp, "wb") as f:
            for unit in run.units:
                if unit.file("rejects.jsonl").exists():
                    with open(unit.file("rejects.jsonl"), "rb") as src:
                        shutil.copyfileobj(src, f)
        os.replace(tmp, out / REJECTS)
    return splits


def report(run: Run, read: dict, dedup: dict, tokenized: list[dict], splits: dict, seconds: dict,
           tokenizer_stats: dict, vocab: int) -> dict:
    """report.json: documents and bytes in and out of every stage, and why the others left."""
    cfg = run.cfg
    fates = _final_fates(run)
    fate = np.concatenate(fates) if fates else np.zeros(0, np.int16)
    nbytes = np.concatenate([u.load_arrays("filter")["bytes"] for u in run.units]) if len(fate) else np.zeros(0, np.int64)
    outcomes: Counter = Counter()
    languages: Counter = Counter()
    for t in tokenized:
        outcomes.update(t["fates"])
        languages.update(t["languages"])
    read = {**read, "dropped": {**read["dropped"], "short": sum(t["short"] for t in tokenized)}}
    filtered = {k: v for k, v in outcomes.items() if k not in _FATES}
    after_filter = fate < len(_FATES)
    after_dedup = after_filter & (fate != EXACT_DUP) & (fate != NEAR_DUP)
    tokens = {s: v["tokens"] for s, v in splits.items()}
    kept_docs = sum(t["splits"]["train"]["documents"] + t["splits"]["val"]["documents"] for t in tokenized)
    if cfg.split == "tail":  # a document cut at the val boundary is in both splits
        kept_docs = int(outcomes.get("kept", 0))

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
            "tokenizer": {"kind": cfg.tokenizer.kind, "vocab_size": vocab, **tokenizer_stats,
                          "seconds": round(seconds["tokenizer"], 2)},
            "tokenize": {"documents_in": int(after_dedup.sum()), "bytes_in": int(nbytes[after_dedup].sum()),
                         "documents_out": kept_docs, "bytes_out": sum(t["kept_bytes"] for t in tokenized),
                         "seconds": round(seconds["tokenize"], 2), "short": int(outcomes.get("short", 0)),
                         "unknown_chars": sum(t.get("unknown_chars", 0) for t in tokenized), "tokens": tokens},
            "shard": {"shards": {s: len(v["shards"]) for s, v in splits.items()}, "seconds": round(seconds["shard"], 2)},
        },
        "languages": dict(languages.most_common()),
        "tokens": tokens,
        "documents": {s: v["documents"] for s, v in splits.items()},
        "seconds": {k: round(v, 2) for k, v in seconds.items()},
        "workers": run.workers,
    }


def summary(report: dict, out: str) -> str:
    """The report in a few lines, for the terminal."""
    read, st = report["read"], report["stages"]
    lines = [
        f"prepared {out}: {read['files']} files, {read['documents'] + sum(read['errors'].values()) + sum(read['dropped'].values())} records read",
        f"  filter: {st['filter']['documents_in']:,} -> {st['filter']['documents_out']:,} documents; "
        f"rejected {_counts(st['filter']['rejected'])}",
        f"  dedup: {st['dedup']['documents_in']:,} -> {st['dedup']['documents_out']:,} documents "
        f"({st['dedup']['exact_duplicates']} exact, {st['dedup']['near_duplicates']} near duplicates)",
        f"  kept {st['tokenize']['documents_out']:,} documents; dropped {_counts(read['dropped'])}; "
        f"bad input skipped {_counts(read['errors'])}",
    ]
    if read["repaired"]:
        lines.append(f"  repaired characters: {_counts(read['repaired'])}")
    if st["tokenize"]["unknown_chars"]:
        lines.append(f"  unknown characters (not in the tokenizer's vocabulary, encoded as its unknown token): "
                     f"{st['tokenize']['unknown_chars']:,}")
    lines += [f"  skipped: {e}" for e in read["examples"][:5]]
    if report["languages"]:
        lines.append(f"  languages: {_counts(dict(list(report['languages'].items())[:8]))}")
    for name in ("train", "val"):
        lines.append(f"  {name}: {report['tokens'][name]:,} tokens, {report['documents'][name]:,} documents, "
                     f"{st['shard']['shards'][name]} shards")
    sec = report["seconds"]
    lines.append(f"  vocab {st['tokenizer']['vocab_size']}; time {sec['total']}s ("
                 + ", ".join(f"{k} {v}s" for k, v in sec.items() if k != "total") + f"); report: {out}/{REPORT}")
    return "\n".join(lines)


def _counts(c: Counter | dict) -> str:
    items = [f"{k}={v}" for k, v in sorted(c.items()) if v]
    return ", ".join(items) if items else "none"

