"""`temper evaluate`: score a checkpoint on benchmark tasks and perplexity; write a JSON and Markdown report.

Steps:
  1. parse EvaluateConfig from flags / YAML;
  2. open --checkpoint with `temper.infer.load` (the loader `generate` and `lm-eval` use: Hugging
     Face layout, e.g. runs/x/final; a run directory means its final/): its tokenizer and stop ids,
     then, once the tasks and documents have been read, its weights; no tokenizer files is an error;
  3. for each task of --tasks ("arc_easy", or "arc_easy=path/to/test.jsonl"): read its examples
     (its default file under --data_root unless given), score them (code tasks: run what the model
     wrote against the tests, with --allow_code_execution), print the metrics;
  4. perplexity of --perplexity.files (text, JSONL or Parquet) or of a prepared --perplexity.data_dir;
  5. write <out>/results.json, samples/<task>.jsonl, report.md and plots/.

It does not train; `temper pretrain` and `temper sft` run the same tasks during training
(`eval.tasks`). lm-eval-harness's own tasks run on a temper checkpoint with `temper lm-eval`.
"""

from __future__ import annotations

import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from tqdm import tqdm

from temper.config import parse
from temper.data.shards import ShardError, load_split, read_manifest
from temper.data.sources import read_documents
from temper.data.tokenizer import UnknownCounter
from temper.eval.perplexity import Document, encode_document, ids_document, perplexity
from temper.eval.report import write_report
from temper.eval.run import GenerationSettings, TaskResult, check_runnable, prefix_id, run_task
from temper.eval.tasks import DEFAULT_DATA_ROOT, TaskError, TaskOptions, all_tasks, load_task
from temper.infer.load import open_checkpoint
from temper.sandbox import Limits
from temper.train.parallel import pick_device, pick_dtype


@dataclass
class PerplexityConfig:
    """Perplexity and bits per byte of text (files or prepared shards)."""

    files: list[str] = field(default_factory=list)
    """Text to score: .txt, .jsonl(.gz) or .parquet files, directories or globs."""
    data_dir: str = ""
    """Or a directory made by `temper prepare`: its token shards (documents split at end-of-text)."""
    split: str = "val"
    """Split of data_dir to score."""
    txt_docs: str = "paragraph"
    """What a document is in a .txt file: the whole "file", a blank-line separated "paragraph", a "line"."""
    text_field: str = "text"
    """Field holding the text in JSONL / Parquet files."""
    seq_len: int | None = None
    """Tokens of context per prediction (default: the model's context)."""
    stride: int | None = None
    """Tokens scored per window (default: seq_len, disjoint windows as lm-eval); smaller gives more context."""
    max_documents: int | None = None
    """Score only the first N documents (None: all)."""


@dataclass
class EvaluateConfig:
    """Options of `temper evaluate`."""

    checkpoint: str = ""
    """Hugging Face layout directory (config.json, weights, tokenizer files), or a run directory (its final/)."""
    tasks: list[str] = field(default_factory=list)
    """Tasks to run: "arc_easy" reads its default file under data_root, "arc_easy=path/file.jsonl" another.
    Known: arc_easy, arc_challenge, hellaswag, piqa, winogrande, gsm8k, gsm8k_cot, completion, humaneval, mbpp."""
    data_root: str = DEFAULT_DATA_ROOT
    """Where the tasks' default files are."""
    limit: int | None = None
    """Only the first N examples of each task (None: all)."""
    num_fewshot: int | None = None
    """Solved examples before each question (None: each task's default)."""
    fewshot_path: str = ""
    """File the few-shot examples come from (default: the task's training file under data_root)."""
    perplexity: PerplexityConfig = field(default_factory=PerplexityConfig)
    generation: GenerationSettings = field(default_factory=GenerationSettings)
    allow_code_execution: bool = False
    """Let code tasks (humaneval, mbpp) run the code the model writes, in limited processes (`temper.sandbox`).
    Not a security boundary: evaluate an untrusted model inside a container or a VM without network."""
    sandbox: Limits = field(default_factory=Limits)
    """Limits of each program a code task runs."""
    batch_tokens: int = 16384
    """Most tokens (rows x longest row) in one forward pass of log-likelihood scoring."""
    out: str = ""
    """Output directory (default: runs/eval/<checkpoint's name>)."""
    device: str = "auto"
    """"auto" (cuda when available), "cpu", "cuda", "cuda:1", ..."""
    dtype: str = "auto"
    """Weights' dtype: "auto" (bfloat16 on GPU, float32 on CPU), "float32", "bfloat16", "float16"."""
    allow_pickle: bool = False
    """Also read pickled pytorch_model*.bin weights (with torch.load(weights_only=True), so no code runs)."""
    quant: Literal["", "int8", "int4", "nf4"] = ""
    """Quantize the blocks' linear weights after loading (torchao, weight-only): "int8", "int4" (4-bit, groups
    of 64; on CUDA bfloat16 only) or "nf4" (QLoRA's NormalFloat); embeddings, norms and head stay in --dtype."""
    progress: bool = True
    """Show a progress bar per task."""

    def __post_init__(self) -> None:
        pick_dtype(self.dtype, torch.device("cpu"))  # an unknown name fails here, naming the choices
        if self.limit is not None and self.limit < 1:
            raise ValueError(f"limit must be >= 1, got {self.limit}")
        if self.batch_tokens < 1:
            raise ValueError(f"batch_tokens must be >= 1, got {self.batch_tokens}")


def perplexity_documents(cfg: PerplexityConfig, tok) -> list[Document]:
    """The documents of cfg.files (tokenized here) or of cfg.data_dir's shards (decoded for their bytes)."""
    docs: list[Document] = []
    counter = UnknownCounter(tok.tokenizer, added_are_tokens=not tok.split_special_tokens)
    if cfg.files:
        for d in read_documents(cfg.files, text_field=cfg.text_field, txt_docs=cfg.txt_docs):
            if cfg.max_documents is not None and len(docs) >= cfg.max_documents:
                break
            if d.text.strip():
                docs.append(encode_document(tok, d.text, f"{d.source}:{d.line}", counter))
        return docs
    eot = read_manifest(cfg.data_dir).get("eot_id")
    for shard in load_split(cfg.data_dir, cfg.split):
        cuts = np.flatnonzero(shard == eot) if eot is not None else np.array([], dtype=np.int64)
        for piece in np.split(np.asarray(shard), cuts + 1):
            if cfg.max_documents is not None and len(docs) >= cfg.max_documents:
                return docs
            ids = piece[piece != eot].tolist() if eot is not None else piece.tolist()
            if ids:
                docs.append(ids_document(tok, ids, counter.unk_id))
    return docs


def main(argv: list[str] | None = None) -> int:
    cfg = parse(EvaluateConfig, argv, prog="evaluate")
    ppl_wanted = bool(cfg.perplexity.files or cfg.perplexity.data_dir)
    if not cfg.checkpoint or not (cfg.tasks or ppl_wanted):
        known = ", ".join(sorted(all_tasks()))
        print("temper evaluate: --checkpoint and at least one of --tasks, --perplexity.files, --perplexity.data_dir "
              f"are required; tasks: {known}", file=sys.stderr)
        return 2
    device = pick_device(cfg.device)
    dtype = pick_dtype(cfg.dtype, device)
    options = TaskOptions(cfg.num_fewshot, Path(cfg.fewshot_path) if cfg.fewshot_path else None, cfg.generation.seed)
    try:  # everything that can fail on input fails before the model is loaded
        ckpt = open_checkpoint(cfg.checkpoint)
        tok = ckpt.tokenizer
        tasks = [load_task(spec, cfg.data_root, options, cfg.limit) for spec in cfg.tasks]
        sandbox = cfg.sandbox if cfg.allow_code_execution else None
        for task, _ in tasks:
            check_runnable(task, cfg.generation, sandbox)
        docs = perplexity_documents(cfg.perplexity, tok) if ppl_wanted else []
        model = ckpt.load(device, dtype, allow_pickle=cfg.allow_pickle, quant=cfg.quant).model
    except (OSError, ValueError, ShardError) as e:  # TaskError, TokenizerError, DataError, CheckpointError: one line
        print(f"temper evaluate: {e}", file=sys.stderr)
        return 2
    results: list[TaskResult] = []
    for task, examples in tasks:
        with tqdm(total=len(examples), desc=task.name, unit="ex", disable=not cfg.progress) as bar:
            try:
                result = run_task(model, tok, task, examples, batch_tokens=cfg.batch_tokens, generation=cfg.generation,
                                  progress=bar.update, stop_token_ids=ckpt.stop_ids, sandbox=sandbox)
            except TaskError as e:
                print(f"temper evaluate: {e}", file=sys.stderr)
                return 2
        results.append(result)
        _print(result)
    if ppl_wanted:
        p = cfg.perplexity
        with tqdm(desc="perplexity", unit="window", disable=not cfg.progress) as bar:
            try:
                result = perplexity(model, docs, prefix_id(tok), seq_len=p.seq_len, stride=p.stride,
                                    batch_tokens=cfg.batch_tokens, progress=bar.update)
            except ValueError as e:
                print(f"temper evaluate: {e}", file=sys.stderr)
                return 2
        results.append(result)
        _print(result)
    out = Path(cfg.out) if cfg.out else Path("runs") / "eval" / ckpt.path.resolve().name
    report = write_report(out, results, {"checkpoint": str(ckpt.path), "config": asdict(cfg), "device": str(device),
                                         "dtype": str(dtype).removeprefix("torch.")})
    print(f"temper evaluate: wrote {out / 'results.json'} and {report}")
    return 0


def _print(r: TaskResult) -> None:
    cut = f", {r.truncated} truncated to fit the context" if r.truncated else ""
    metrics = ", ".join(f"{k} {v:.4f} ± {r.stderr.get(k, float('nan')):.4f}" for k, v in r.metrics.items())
    print(f"{r.task}: {metrics} (n={r.n}{cut}, {r.seconds:.1f}s)")


if __name__ == "__main__":
    raise SystemExit(main())
