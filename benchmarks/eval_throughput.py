"""Evaluation throughput: temper's task runner against lm-eval's `hf` backend, same model, same task, one run.

The model is Llama-shaped with random weights (default dim 512, 8 layers, 8 heads, 4 kv heads,
SwiGLU, RMSNorm, RoPE, untied head) and a byte-level BPE tokenizer (default 32,000 tokens, with
a BOS, as Llama's) trained here on WikiText-2 train + ARC-Easy train from ../shared/data; both are
exported with `save_hf` / `save_hf_tokenizer`, and each side loads the exported directory
(temper: `load_hf`; lm-eval: `HFLM(pretrained=dir)`, i.e. transformers' LlamaForCausalLM).

The task is ARC-Easy, the first N questions of the test split, 0-shot and 5-shot:
- temper: `run_task` with the `arc_easy` task (`TaskOptions(num_fewshot=5, fewshot_path=train)`);
- lm-eval: its real `arc_easy.yaml` (included from the installed package; only the dataset is
  pointed at local JSON files), `simple_evaluate(num_fewshot=5, limit=N, log_samples=True)`.
temper draws each question's shots as lm-eval's sampler does, so the prompts should be the same;
the table says how many are, and their mean length in tokens.

Batching: lm-eval `batch_size` B requests (one (context, choice) pair each) per forward pass,
padded to the longest; temper `batch_tokens` = B x the mean tokens of one such request in the
same setting, i.e. about the same tokens per forward pass (temper's rows hold a context and all
its choices, so they are longer and fewer). Both run in this process with the same torch threads;
each timing is the median of --repeats alternating runs, after a warm-up run of each side on 16
questions (which also fills lm-eval's dataset cache). "end to end" is examples -> metrics (temper:
task file read + run_task; lm-eval: simple_evaluate, task building included); "loglikelihood" is
only the tokenization + model calls (temper: requests_for + score; lm-eval: lm.loglikelihood).
Agreement: the largest |delta log-likelihood| over every choice of the questions whose prompts match.

    python benchmarks/eval_throughput.py                                  # CPU fp32, 200 questions
    python benchmarks/eval_throughput.py --n 100 --repeats 3 --shots 0
    python benchmarks/eval_throughput.py --device cuda --dtype bfloat16 --n 1000 --batch_size 64
    python benchmarks/eval_throughput.py --profile                        # where temper's time goes
"""

from __future__ import annotations

import argparse
import cProfile
import gzip
import json
import logging
import os
import pstats
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import yaml
from tokenizers import processors

import temper.eval.run as runner
from temper.data.tokenizer import HFTokenizer, load_hf_tokenizer, save_hf_tokenizer, train_tokenizer
from temper.eval.tasks import TaskOptions, get_task
from temper.model.config import ModelConfig
from temper.model.hf.checkpoint import load_hf, save_hf
from temper.model.transformer import Transformer

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
if not SHARED.exists():
    SHARED = Path(os.environ.get("TEMPER_SHARED_DATA", "../shared/data")).resolve()
BOS, EOS = "<|begin_of_text|>", "<|endoftext|>"
TASK = "arc_easy_bench"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


# ---- the model and the data ----------------------------------------------------------------


def build_checkpoint(root: Path, args: argparse.Namespace) -> Path:
    """Train the tokenizer, build the random Llama-shaped model, export both to root/model."""
    out = root / "model"
    wiki = gzip.decompress((SHARED / "wikitext-2" / "train.txt.gz").read_bytes()).decode()
    arc = [json.loads(line) for line in (SHARED / "arc-easy" / "train.jsonl").read_text().splitlines()]
    texts = [wiki[i:i + 4000] for i in range(0, len(wiki), 4000)]
    texts += [f"Question: {r['question']}\nAnswer: {' '.join(r['choices'])}" for r in arc]
    t0 = time.perf_counter()
    tok = train_tokenizer(texts, "bpe", args.vocab, [EOS, BOS])
    tok.post_processor = processors.Sequence([  # a BOS before every text, as Llama's tokenizer adds
        processors.ByteLevel(trim_offsets=False),
        processors.TemplateProcessing(single=f"{BOS} $A", special_tokens=[(BOS, tok.token_to_id(BOS))]),
    ])
    save_hf_tokenizer(HFTokenizer(tok, {"bos_token": BOS, "eos_token": EOS}), out)
    cfg = ModelConfig(vocab_size=tok.get_vocab_size(), dim=args.dim, n_layers=args.layers, n_heads=args.heads,
                      n_kv_heads=args.kv_heads, max_seq_len=args.seq, mlp="swiglu", norm="rmsnorm", pos="rope",
                      bias=False, tie_embeddings=False)
    torch.manual_seed(0)
    model = Transformer(cfg)
    save_hf(model, cfg, out)
    print(f"# built in {time.perf_counter() - t0:.0f} s: tokenizer {tok.get_vocab_size()} tokens, model "
          f"{model.num_params() / 1e6:.1f}M parameters ({cfg.dim}d, {cfg.n_layers} layers, {cfg.n_heads} heads, "
          f"{cfg.kv_heads} kv heads, ffn {cfg.hidden_dim}, untied head)", file=sys.stderr)
    return out


def write_task(root: Path, n: int) -> dict[str, Path]:
    """ARC-Easy test (first n) and train, flat for temper and in the Hugging Face layout for lm-eval's
    arc_easy.yaml, and a task directory whose YAML includes the installed arc_easy.yaml."""
    import lm_eval

    paths: dict[str, Path] = {}
    for split, limit in (("test", n), ("train", None)):
        lines = (SHARED / "arc-easy" / f"{split}.jsonl").read_text().splitlines()[:limit]
        paths[f"{split}_flat"] = root / f"{split}.flat.jsonl"
        paths[f"{split}_flat"].write_text("\n".join(lines) + "\n")
        paths[f"{split}_hf"] = root / f"{split}.hf.jsonl"
        with paths[f"{split}_hf"].open("w") as f:
            for r in map(json.loads, lines):
                labels = list("ABCDE"[:len(r["choices"])])
                f.write(json.dumps({"id": r["id"], "question": r["question"], "answerKey": labels[r["label"]],
                                    "choices": {"text": r["choices"], "label": labels}}) + "\n")
    paths["tasks"] = root / "tasks"
    paths["tasks"].mkdir(exist_ok=True)
    (paths["tasks"] / f"{TASK}.yaml").write_text(yaml.safe_dump({
        "include": str(Path(lm_eval.__file__).parent / "tasks" / "arc" / "arc_easy.yaml"),
        "task": TASK,
        "dataset_path": "json",
        "dataset_name": None,
        "dataset_kwargs": {"data_files": {"train": str(paths["train_hf"]), "test": str(paths["test_hf"])},
                           "cache_dir": str(root / "hf-datasets")},
        "validation_split": None,  # few-shot examples come from the training split, as arc_easy's do
    }))
    return paths


# ---- the two sides ---------------------------------------------------------------------------


class Clock:
    """Seconds spent inside wrapped functions (the loglikelihood part of each side)."""

    def __init__(self) -> None:
        self.seconds = 0.0

    def wrap(self, fn: Callable) -> Callable:
        def timed(*a: Any, **k: Any) -> Any:
            t0 = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                self.seconds += time.perf_counter() - t0
        return timed


def run_temper(model: torch.nn.Module, tok: HFTokenizer, paths: dict[str, Path], shots: int, n: int,
               batch_tokens: int) -> tuple[float, float, Any]:
    clock = Clock()
    score, requests_for = runner.score, runner.requests_for
    # Measured from outside: the runner's own two calls, wrapped for this run only.
    runner.score, runner.requests_for = clock.wrap(score), clock.wrap(requests_for)
    try:
        t0 = time.perf_counter()
        task = get_task("arc_easy")
        examples = task.load(paths["test_flat"], TaskOptions(num_fewshot=shots, fewshot_path=paths["train_flat"]))[:n]
        result = runner.run_task(model, tok, task, examples, batch_tokens=batch_tokens)
        seconds = time.perf_counter() - t0
    finally:
        runner.score, runner.requests_for = score, requests_for
    return seconds, clock.seconds, result


def run_lm_eval(lm: Any, tm: Any, shots: int, n: int) -> tuple[float, float, Any]:
    import lm_eval

    clock = Clock()
    lm.loglikelihood = clock.wrap(lm.loglikelihood)  # an instance attribute over the method, for this run
    try:
        t0 = time.perf_counter()
        out = lm_eval.simple_evaluate(model=lm, tasks=[TASK], num_fewshot=shots, limit=n, task_manager=tm,
                                      log_samples=True)  # its per-question numbers, as temper keeps
        seconds = time.perf_counter() - t0
    finally:
        del lm.loglikelihood
    return seconds, clock.seconds, out


def request_tokens(tok: HFTokenizer, examples: list) -> float:
    """Mean tokens of one (context, choice) request: what one row of lm-eval's batch holds."""
    requests = runner.requests_for(tok, [p for ex in examples for p in ex.pairs()])
    return statistics.mean(len(r.context) + len(r.continuation) - 1 for r in requests)


# ---- the run -------------------------------------------------------------------------------------


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--n", type=int, default=200, help="questions (the first n of the test split)")
    p.add_argument("--shots", type=int, nargs="+", default=[0, 5])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--batch_size", type=int, default=16, help="lm-eval requests per forward pass")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", choices=sorted(DTYPES))
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--kv_heads", type=int, default=4)
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--workdir", default=None, help="keep the checkpoint here (reused when it exists)")
    p.add_argument("--profile", action="store_true", help="cProfile one temper run per setting (top 25)")
    args = p.parse_args()

    torch.set_num_threads(args.threads)
    logging.getLogger("lm_eval").setLevel(logging.ERROR)  # per-request warnings would be timed too
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    root = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="temper-eval-bench-"))
    root.mkdir(parents=True, exist_ok=True)
    shape = {k: getattr(args, k) for k in ("vocab", "dim", "layers", "heads", "kv_heads", "seq")}
    stamp = root / "model" / "bench_shape.json"  # a kept checkpoint is reused only for the same shape
    if stamp.is_file() and json.loads(stamp.read_text()) == shape:
        ckpt = root / "model"
    else:
        ckpt = build_checkpoint(root, args)
        stamp.write_text(json.dumps(shape))
    paths = write_task(root, args.n)
    dtype = DTYPES[args.dtype]
    model, cfg = load_hf(ckpt, device=args.device, dtype=dtype)
    tok = load_hf_tokenizer(ckpt)
    lm = HFLM(pretrained=str(ckpt), device=args.device, dtype=args.dtype, batch_size=args.batch_size)
    tm = TaskManager(include_path=str(paths["tasks"]), include_defaults=False)

    rows, notes = [], []
    for shots in args.shots:
        examples = get_task("arc_easy").load(paths["test_flat"], TaskOptions(num_fewshot=shots,
                                                                              fewshot_path=paths["train_flat"]))
        batch_tokens = round(args.batch_size * request_tokens(tok, examples))
        run_temper(model, tok, paths, shots, 16, batch_tokens)  # warm-up, untimed
        run_lm_eval(lm, tm, shots, 16)
        t_runs, l_runs = {"temper": [], "lm-eval": []}, {"temper": [], "lm-eval": []}
        for r in range(args.repeats):
            for side in (("temper", "lm-eval") if r % 2 == 0 else ("lm-eval", "temper")):
                if side == "temper":
                    total, inner, ours = run_temper(model, tok, paths, shots, args.n, batch_tokens)
                else:
                    total, inner, theirs = run_lm_eval(lm, tm, shots, args.n)
                t_runs[side].append(total)
                l_runs[side].append(inner)
        samples = sorted(theirs["samples"][TASK], key=lambda s: s["doc_id"])
        same_prompt = [ex.contexts[0] == s["arguments"][0][0] for ex, s in zip(examples, samples, strict=True)]
        ctx_ours = statistics.mean(len(tok.encode(ex.contexts[0])) for ex in examples)
        ctx_theirs = statistics.mean(len(tok.encode(s["arguments"][0][0])) for s in samples)
        pairs = [(r, s) for r, s, same in zip(ours.examples, samples, same_prompt, strict=True) if same]
        delta = max((abs(a - b[0]) for r, s in pairs for a, b in zip(r["logprobs"], s["filtered_resps"], strict=True)),
                    default=float("nan"))
        agree = sum(r["acc"] == s["acc"] and r["acc_norm"] == s["acc_norm"] for r, s in pairs)
        notes.append(f"{shots}-shot: identical prompts {sum(same_prompt)}/{len(samples)}; over their "
                     f"{sum(len(r['logprobs']) for r, _ in pairs)} choices max |delta logprob| = {delta:.2e}, "
                     f"acc/acc_norm equal on {agree}/{len(pairs)} questions; acc {ours.metrics['acc']:.4f} vs "
                     f"{theirs['results'][TASK]['acc,none']:.4f}, acc_norm {ours.metrics['acc_norm']:.4f} vs "
                     f"{theirs['results'][TASK]['acc_norm,none']:.4f} (temper vs lm-eval)")
        med = {s: statistics.median(v) for s, v in t_runs.items()}
        med_l = {s: statistics.median(v) for s, v in l_runs.items()}
        for side in ("temper", "lm-eval"):
            setting = f"batch_tokens={batch_tokens}" if side == "temper" else f"batch_size={args.batch_size}"
            ctx = ctx_ours if side == "temper" else ctx_theirs
            spread = f"{min(t_runs[side]):.1f}-{max(t_runs[side]):.1f}"
            rows.append(f"| {shots} | {side} | {setting} | {ctx:.0f} | {med[side]:.1f} ({spread}) | "
                        f"{args.n / med[side]:.1f} | {args.n / med_l[side]:.1f} | "
                        f"{med['lm-eval'] / med[side]:.2f}x | {med_l['lm-eval'] / med_l[side]:.2f}x |")
        if args.profile:
            prof = cProfile.Profile()
            prof.enable()
            run_temper(model, tok, paths, shots, args.n, batch_tokens)
            prof.disable()
            print(f"\n## cProfile, temper, {shots}-shot\n", file=sys.stderr)
            pstats.Stats(prof, stream=sys.stderr).sort_stats("cumulative").print_stats(25)

    print(f"\nARC-Easy, first {args.n} test questions; {args.device} {args.dtype}, torch threads {args.threads}, "
          f"median of {args.repeats} (min-max). Model: Llama-shaped, random weights, "
          f"{model.num_params() / 1e6:.1f}M parameters ({cfg.dim}d, {cfg.n_layers} layers, {cfg.n_heads} heads, "
          f"{cfg.kv_heads} kv heads, ffn {cfg.hidden_dim}, untied head); byte-level BPE of {cfg.vocab_size} tokens "
          f"trained on WikiText-2 + ARC-Easy train; checkpoint {ckpt}\n")
    print("| shots | side | batching | prompt tokens (mean) | end to end s | end to end ex/s | loglikelihood ex/s "
          "| speed-up, end to end | speed-up, loglikelihood |")
    print("| ---: | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    print("\n".join(rows))
    print("\n" + "\n".join(notes))


if __name__ == "__main__":
    main()
