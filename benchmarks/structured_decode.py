"""Structured outputs' cost: decoding under a JSON schema's mask against free decoding, in temper's scheduler (the
server's loop) and in transformers' `generate` with a logits processor that applies the same mask.

The model is a preset shape with random weights (default "llama-small", as serve_throughput.py: Llama-shaped, dim
512, 8 layers) over a byte-level BPE tokenizer trained on the text of --text (tinyshakespeare by default) to --vocab
ids: a grammar's mask costs more with a larger vocabulary, and a real BPE vocabulary (tokens that span JSON's
punctuation and words) is what llguidance works on in use. The schema is a list of at least 50 {"name", "age",
"tags"} objects, so that no constrained row can end before --max-tokens: every row of both runs generates exactly
--max-tokens tokens (no end-of-text stop in the free run either), and the time per token compares like for like.

Each batch size of --batch runs that many greedy requests at once, free and constrained, --repeats times
alternating (on a shared machine load drifts), and the median is kept. transformers (`generate`, sdpa, batch 1)
runs the first prompt free and with a `LogitsProcessor` that masks through `temper.infer.grammar` (the same
llguidance matcher; transformers has no grammar engine of its own), so its row's ratio is the cost of the mask in
another decode loop. The mask's own time per token (compute the bitmask, unpack it, advance) is measured apart by
replaying a constrained row's tokens.

    python benchmarks/structured_decode.py                                  # llama-small, 8k BPE, batch 1 and 8
    python benchmarks/structured_decode.py --vocab 32000 --batch 1,8,32 --json out.json
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import torch

from temper.data.tokenizer import HFTokenizer, save_hf_tokenizer, train_tokenizer
from temper.infer.grammar import compile_grammar, json_schema, vocabulary
from temper.infer.scheduler import Finished, Request, Scheduler, Token
from temper.model.config import PRESETS, ModelConfig
from temper.model.hf.checkpoint import save_hf
from temper.model.transformer import Transformer

SHAPES: dict[str, ModelConfig] = {
    "llama-small": dataclasses.replace(PRESETS["llama-125m"], dim=512, n_layers=8, n_heads=8, n_kv_heads=4,
                                       ffn_dim=1408, max_seq_len=2048),
    **PRESETS,
}
DEFAULT_TEXT = Path(__file__).resolve().parents[2] / "shared" / "data" / "tinyshakespeare" / "input.txt"
EOS = "<|endoftext|>"
PEOPLE = {"type": "array", "minItems": 50, "items": {
    "type": "object", "properties": {"name": {"type": "string", "maxLength": 12},
                                     "age": {"type": "integer", "minimum": 0, "maximum": 120},
                                     "tags": {"type": "array", "items": {"enum": ["a", "b", "c"]}, "maxItems": 3}},
    "required": ["name", "age", "tags"], "additionalProperties": False}}
"""At least 50 objects: no row completes it within a few hundred tokens."""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--shape", default="llama-small", choices=sorted(SHAPES), help="model shape (random weights)")
    p.add_argument("--text", type=Path, default=DEFAULT_TEXT, help="text the BPE tokenizer is trained on")
    p.add_argument("--vocab", type=int, default=8192, help="BPE vocabulary size")
    p.add_argument("--max-tokens", type=int, default=64, help="tokens generated per request (exactly)")
    p.add_argument("--batch", default="1,8", help="requests decoded together, one run per size")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--json", type=Path, help="also write the rows here")
    args = p.parse_args(argv)
    args.batches = [int(b) for b in args.batch.split(",")]
    if min(args.batches) < 1 or args.max_tokens < 1 or args.repeats < 1 or args.vocab < 300:
        p.error("--batch, --max-tokens and --repeats must be positive, --vocab at least 300")
    return args


def build(args: argparse.Namespace, root: Path) -> tuple[Transformer, Any, list[list[int]]]:
    """The model, the tokenizer and 32 prompts (lines of the text); the checkpoint written for transformers."""
    text = args.text.read_text(encoding="utf-8")[:2_000_000]
    tok = train_tokenizer(text.split("\n\n"), "bpe", args.vocab, [EOS])
    cfg = dataclasses.replace(SHAPES[args.shape], vocab_size=tok.get_vocab_size())
    torch.manual_seed(0)
    model = Transformer(cfg).eval()
    save_hf(model, cfg, root)
    save_hf_tokenizer(HFTokenizer(tok, {"eos_token": EOS}), root)
    prompts = [tok.encode("Answer in JSON. " + line).ids[:48] for line in text.splitlines() if len(line) > 20][:32]
    return model, tok, prompts


def run_scheduler(model: Transformer, prompts: list[list[int]], max_tokens: int, grammar: Any) -> tuple[float, list]:
    """Seconds for the prompts decoded together (greedy, no stop id), and their tokens. The loop runs on this
    thread, as `temper serve` runs it (`Scheduler.run`), and a client thread submits the requests."""
    sched = Scheduler(model, slots=len(prompts), max_queue=len(prompts), max_len=48 + max_tokens + 1)
    tokens: list[list[int]] = [[] for _ in prompts]
    left = [len(prompts)]

    def deliver(i: int):
        def on(ev: Any) -> None:
            if isinstance(ev, Token):
                tokens[i].append(ev.token)
            elif isinstance(ev, Finished):
                left[0] -= 1
                if not left[0]:
                    sched.stop(timeout=0)
        return on

    def client() -> None:
        for i, p in enumerate(prompts):
            sched.submit(Request(p, max_tokens=max_tokens, temperature=0, grammar=grammar), deliver(i))

    t0 = time.perf_counter()
    sched.run(on_start=threading.Thread(target=client).start)
    return time.perf_counter() - t0, tokens


def run_transformers(path: Path, prompt: list[int], max_tokens: int, grammar: Any) -> float:
    """Seconds for transformers' greedy generate of one prompt, masked by `grammar` through a logits processor."""
    from transformers import AutoModelForCausalLM, LogitsProcessor, LogitsProcessorList

    class Mask(LogitsProcessor):  # the mask a grammar library's transformers integration applies at each step
        def __init__(self) -> None:
            self.matcher, self.start = grammar.matcher(), len(prompt)

        def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
            if input_ids.shape[1] > self.start:
                self.matcher.advance(int(input_ids[0, -1]))
            self.matcher.mask_(scores[0])
            return scores

    model = run_transformers.cache.get(path) or AutoModelForCausalLM.from_pretrained(path, attn_implementation="sdpa")
    run_transformers.cache[path] = model.eval()
    ids = torch.tensor([prompt])
    kw = dict(max_new_tokens=max_tokens, min_new_tokens=max_tokens, do_sample=False, pad_token_id=0)
    t0 = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(ids, **kw, logits_processor=LogitsProcessorList([Mask()]) if grammar else None)
    assert out.shape[1] == len(prompt) + max_tokens
    return time.perf_counter() - t0


run_transformers.cache = {}


def mask_time(grammar: Any, tokens: list[int], vocab_size: int) -> float:
    """Microseconds per token of computing the mask, applying it and advancing, replaying `tokens`."""
    matcher, logits = grammar.matcher(), torch.zeros(vocab_size)
    t0 = time.perf_counter()
    for t in tokens:
        matcher.mask_(logits)
        matcher.advance(t)
    return (time.perf_counter() - t0) / len(tokens) * 1e6


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        model, tok, prompts = build(args, root)
        t0 = time.perf_counter()
        vocab = vocabulary(tok, model.cfg.vocab_size, [tok.token_to_id(EOS)])
        t1 = time.perf_counter()
        grammar = compile_grammar(vocab, json_schema(PEOPLE))
        t2 = time.perf_counter()
        print(f"vocabulary {model.cfg.vocab_size}: llguidance's view built in {t1 - t0:.3f}s, the schema compiled in "
              f"{t2 - t1:.3f}s", flush=True)
        rows, sample = [], None
        for b in args.batches:
            batch = [prompts[i % len(prompts)] for i in range(b)]
            run_scheduler(model, batch, 4, grammar)  # warm-up
            times: dict[str, list[float]] = {"free": [], "json schema": []}
            for _ in range(args.repeats):
                for name, g in (("free", None), ("json schema", grammar)):
                    sec, tokens = run_scheduler(model, batch, args.max_tokens, g)
                    assert all(len(t) == args.max_tokens for t in tokens), "a row ended early"
                    times[name].append(sec)
                    if g is not None:
                        sample = tokens[0]
            rows.append(row(f"temper scheduler, batch {b}", b * args.max_tokens, times))
        times = {"free": [], "json schema": []}
        run_transformers(root, prompts[0], 4, None)  # warm-up
        for _ in range(args.repeats):
            for name, g in (("free", None), ("json schema", grammar)):
                times[name].append(run_transformers(root, prompts[0], args.max_tokens, g))
        rows.append(row("transformers generate, batch 1", args.max_tokens, times))
        text = tok.decode(sample)
        assert text.startswith('[{"name": "'), text  # the schema's shape, json.dumps' separators
        mask_us = mask_time(grammar, sample, model.cfg.vocab_size)
    print(f"\nshape {args.shape}, vocabulary {model.cfg.vocab_size}, {args.max_tokens} tokens per request, greedy, "
          f"{args.threads} threads, median of {args.repeats}\n")
    print("| side | free tokens/s | JSON-schema tokens/s | constrained / free |\n|---|---:|---:|---:|")
    for r in rows:
        print(f"| {r['side']} | {r['free_tokens_per_s']:.1f} | {r['constrained_tokens_per_s']:.1f} | "
              f"{r['ratio']:.3f} |")
    print(f"\nthe mask alone: {mask_us:.0f} us per token (bitmask, unpack, advance); a constrained row's text begins "
          f"{text[:60]!r}")
    if args.json:
        args.json.write_text(json.dumps({"rows": rows, "mask_us_per_token": mask_us, "vocab": model.cfg.vocab_size,
                                         "args": {k: str(v) for k, v in vars(args).items()}}, indent=1))
    return 0


def row(side: str, tokens: int, times: dict[str, list[float]]) -> dict[str, Any]:
    free, constrained = (tokens / statistics.median(times[k]) for k in ("free", "json schema"))
    return {"side": side, "free_tokens_per_s": free, "constrained_tokens_per_s": constrained,
            "ratio": constrained / free}


if __name__ == "__main__":
    raise SystemExit(main())
