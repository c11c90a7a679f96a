"""`temper prepare`: raw text -> clean, deduplicated documents -> a tokenizer and token shards.

Steps, in the order `prepare` runs them (the stages live in data/pipeline.py; each runs over
units of the input in `workers` processes, or as Ray tasks with `--executor=ray`, with a progress
bar, and keeps its results in `<out>/.prepare/`, so an interrupted run resumes where it stopped and
re-running a finished one does nothing):
 1. list the input files; check `out` (a directory, not one of the inputs, holding no input that
    prepare would overwrite); fingerprint the inputs (path, size, mtime) with the config
 2. filter: read every document, apply the quality and language filters (data/filters.py), the
    decontamination n-grams and the perplexity band (scored here, with a model); record per
    document its fate, size, split and its exact-dedup key and MinHash signature
 3. dedup: across the whole corpus, drop exact then near duplicates (the first one is kept)
 4. tokenizer: train a byte-level BPE on a sample of the kept train documents (about
    `tokenizer.train_bytes`), or a character-level one on every kept character, or load a file
 5. tokenize: read the documents again, encode the kept ones (counting the characters the tokenizer
    has no token for, or stopping at the first: `tokenizer.unknown`) and split them into train and val:
    by a hash of each document's text and the seed ("document"; the same whatever the number of
    workers), or the last `val_fraction` of each file's tokens ("tail", as nanoGPT's shakespeare)
 6. shard: concatenate the units' tokens in input order into shards of about `shard_bytes`
    (deterministic), write tokenizer.json, report.json, optionally rejects.jsonl, and
    manifest.json last (a directory without one is incomplete)

It does not batch or pack (the loader does) and does not choose what to train on.
"""

from __future__ import annotations

import math
import os
import shutil
import sys
import sysconfig
import time
from dataclasses import dataclass, field
from pathlib import Path

from temper import config
from temper.config import ConfigError
from temper.data import pipeline, shards
from temper.data.pipeline import (  # noqa: F401  (the config's parts, importable from the recipe)
    DecontaminateConfig,
    PerplexityConfig,
    PipelineConfig,
    TokenizerConfig,
)
from temper.data.sources import expand_inputs
from temper.data.tokenizer import (
    eot_id,
    load_tokenizer,
    plain_text_encoder,
    save_tokenizer,
    vocab_size,
)
from temper.errors import InputError
from temper.files import atomic_write_json


def _stdlib_sources() -> list[str]:
    return [os.path.join(sysconfig.get_paths()["stdlib"], "**", "*.py")]


@dataclass
class PrepareConfig(PipelineConfig):
    input: list[str] = field(default_factory=_stdlib_sources)
    """Files, directories or globs (** recursive): .txt/.md/.py/... (.gz, .zst), .jsonl (.gz, .zst), .parquet."""
    out: str = "data/stdlib"
    """Output directory for the shards, tokenizer.json, report.json and manifest.json."""


def main(argv: list[str] | None = None) -> int:
    cfg = config.parse(PrepareConfig, argv, prog="prepare")
    print(config.to_yaml(cfg), end="")
    try:
        summary = prepare(cfg)
    except (InputError, FileNotFoundError) as e:  # DataError, TokenizerError, ShardError, ConfigError, UnsafePath
        print(f"temper prepare: {e}", file=sys.stderr)
        return 2
    print(summary)
    return 0


def prepare(cfg: PipelineConfig) -> str:
    """Run the steps of the module docstring; return the summary to print."""
    t0 = time.perf_counter()
    # 1. inputs (checked before anything is written), fingerprint
    files = expand_inputs(cfg.input, cfg.exclude)
    out = Path(cfg.out)
    check_output(out, cfg.input, files)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ConfigError(f"out={cfg.out}: cannot create the directory: {e.strerror}") from None
    fingerprint = pipeline.fingerprint(cfg, files)
    if pipeline.already_prepared(out, fingerprint):
        return f"{out} is already prepared from the same input and config: nothing to do"
    (out / shards.MANIFEST).unlink(missing_ok=True)  # from now on the directory reads as incomplete
    seconds: dict[str, float] = {}
    with pipeline.Run(cfg, files, fingerprint) as run:
        t = time.perf_counter()
        read = pipeline.filter_documents(run, PerplexityScorer)  # 2.
        seconds["filter"] = time.perf_counter() - t

        t = time.perf_counter()
        dedup = pipeline.deduplicate(run)  # 3.
        seconds["dedup"] = time.perf_counter() - t

        t = time.perf_counter()
        tok, tokenizer_stats = pipeline.get_tokenizer(run)  # 4.
        vocab = vocab_size(tok)
        eot = None if cfg.tokenizer.eot_token == "" else eot_id(tok, _auto(cfg.tokenizer.eot_token))
        seconds["tokenizer"] = time.perf_counter() - t

        t = time.perf_counter()
        tokenized = pipeline.tokenize(run, vocab, eot)  # 5.
        seconds["tokenize"] = time.perf_counter() - t

    # 6. shards, report, manifest (last)
    t = time.perf_counter()
    splits = pipeline.write_shards(run, vocab, eot)
    save_tokenizer(tok, out / shards.TOKENIZER)
    seconds["shard"] = time.perf_counter() - t
    seconds["total"] = time.perf_counter() - t0
    report = pipeline.report(run, read, dedup, tokenized, splits, seconds, tokenizer_stats, vocab)
    atomic_write_json(out / pipeline.REPORT, report)
    run_stats = {
        "read": report["read"],
        "tokenizer": {"kind": cfg.tokenizer.kind, "vocab_size": vocab, **tokenizer_stats},
        "seconds": report["seconds"],
        "fingerprint": fingerprint,
        "config": config.to_dict(cfg),
    }
    shards.write_manifest(out, vocab_size=vocab, eot_id=eot, splits=splits, stats=run_stats)
    shutil.rmtree(run.work, ignore_errors=True)
    return pipeline.summary(report, cfg.out)


def check_output(out: Path, inputs: list[str], files: list[Path]) -> None:
    """Refuse, before anything is written, an `out` that is not a directory that can be made, or one
    where prepare would overwrite or delete its own input: the input directory itself, or an input
    file that is one of prepare's outputs (an earlier run's manifest, shards, tokenizer, report)."""
    for p in (out, *out.parents):
        if p.exists() or p.is_symlink():
            if not p.is_dir():
                where = "is a file" if p == out else f"is under {p}, which is a file"
                raise ConfigError(f"out={out} {where}: give a directory for the shards and manifest")
            break
    resolved = out.resolve()
    for pattern in inputs:
        if os.path.isdir(pattern) and Path(pattern).resolve() == resolved:
            raise ConfigError(f"out={out} is also an input directory: prepare would read and then overwrite its "
                              f"own output; write it to another directory")
    for f in files:
        rel = _relative(f.resolve(), resolved)
        if rel is not None and _written_by_prepare(rel):
            raise ConfigError(f"input {f} is in out={out}, where prepare writes {rel}: it would be overwritten or "
                              f"deleted; write the output to another directory (or --exclude the file)")


def _relative(path: Path, root: Path) -> Path | None:
    return path.relative_to(root) if root == path or root in path.parents else None


def _written_by_prepare(rel: Path) -> bool:
    """Whether prepare writes or deletes `rel` (relative to out)."""
    if rel.parts and rel.parts[0] == pipeline.WORK:
        return True
    outputs = {shards.MANIFEST, shards.TOKENIZER, pipeline.REPORT, pipeline.REJECTS, pipeline.REJECTS + ".tmp"}
    return len(rel.parts) == 1 and (rel.name in outputs or shards.is_shard_file(rel.name))


def _auto(token: str) -> str | None:
    return None if token == "auto" else token


class PerplexityScorer:
    """Perplexity of a document's first tokens under a small model (CCNet, Wenzek et al. 2020,
    keeps the documents whose perplexity under a reference model lies in a band). The pipeline
    builds one per worker process from the config."""

    def __init__(self, pc: PerplexityConfig):
        from temper.model.hf.checkpoint import load_hf  # torch only when asked

        self.max_tokens = pc.max_tokens
        self.model, _ = load_hf(pc.model)
        self.tok = plain_text_encoder(load_tokenizer(pc.model))

    def __call__(self, text: str) -> float:
        import torch

        from temper.train.losses import token_loss_sum

        ids = self.tok.encode_ids(text)[: self.max_tokens]
        if len(ids) < 2:
            return math.inf
        x = torch.tensor([ids])
        with torch.no_grad():
            logits = self.model(x[:, :-1])
        return math.exp(token_loss_sum(logits, x[:, 1:]).item() / (len(ids) - 1))

