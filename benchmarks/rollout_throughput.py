"""RL rollout throughput: temper's `align.rollout.rollout` against `transformers`' `generate`, same model and prompts.

An RL step samples n completions of each of P prompts and needs each sampled token's log-probability
(the "old" policy of the PPO / GRPO ratio). Both sides here do that for --prompts (16) GSM8K test
questions x --n (8) samples, --new-tokens (64) tokens each, temperature 1.0, no top-k / top-p:
- temper: `rollout(model, tokenizer, prompts, RolloutConfig(n, ...), seeds=..., stop_ids=[])`. The
  engine prefills each prompt once (no padding: each cache row holds its own prompt), forks its cache
  row into n, samples, and returns per rollout the token ids, each token's log-prob under
  softmax(logits / T) from the same pass, and the decoded text.
- transformers: `model.generate(input_ids, attention_mask, do_sample=True, num_return_sequences=n,
  output_scores=True, return_dict_in_generate=True)` on the left-padded prompts (sdpa attention, its
  dynamic cache; it repeats each prompt n times and prefills all P * n rows), then
  `compute_transition_scores(sequences, scores, normalize_logits=True)`, the log-softmax of each step's
  scores at the sampled token (the documented route to the same log-probs; with temperature 1 and no
  top-k / top-p the scores are the raw logits), and `batch_decode` of the completions. So each side
  returns the same things: ids, per-token log-probs, text.
Neither side stops early, so both generate exactly P * n * --new-tokens tokens: temper is given no
stop token (and no stop strings), transformers no EOS id (`eos_token_id=None`, so no processor masks
a token and the sampled distribution is the model's on both sides).

The model: Llama-shaped (RMSNorm, RoPE, SwiGLU, GQA, untied head; --dim 256, --layers 4, 4 heads, 2 kv
heads, ffn 704, a --vocab 4096 byte-level BPE trained here on 1000 GSM8K questions with their answers:
about 3M parameters, the default of benchmarks/grpo_step.py too, sized for two CPU cores; larger
shapes are flags away), random weights made once
by temper and written with `save_hf`; transformers loads that directory with `from_pretrained`, so both
run the same weights in float32 on the CPU. Prompts are the questions rendered with a ChatML template
(`encode_chat`, ready for the assistant turn): real text of different lengths, so the transformers
side pads. Without ../shared/data/gsm8k (or with --data synthetic) arithmetic questions are made up.

Timed: the whole call on each side (prefill, decode, log-probs, decoding to text), wall clock;
tokens/s = P * n * new tokens / seconds. A warm-up of each side, then --repeats alternating runs; the
table gives the medians and temper / transformers.

Same work (printed, from the warm-up outputs, untimed): every row has --new-tokens tokens on both
sides; each side's log-probs against a fresh training-mode forward of temper's model over the same
prompt + completion, for the first sample of each prompt (`logprob_mismatch`: mean |difference|,
float32 round-off when the returned log-probs are the policy's); and each side's mean log-prob per
token (samples of the same distribution: close, not equal).

    python benchmarks/rollout_throughput.py                     # 16 prompts x 8 samples x 64 tokens
    python benchmarks/rollout_throughput.py --dim 512 --layers 8 --heads 8 --kv-heads 4 --ffn 1408 --vocab 8192
    python benchmarks/rollout_throughput.py --repeats 5 --threads 2 --json rollout.json
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from temper.align.rollout import Rollout, RolloutConfig, collate_rollouts, logprob_mismatch, rollout
from temper.data.tokenizer import HFTokenizer, save_hf_tokenizer, train_tokenizer
from temper.model.config import PRESETS, ModelConfig
from temper.model.hf.checkpoint import save_hf
from temper.model.transformer import Transformer

SHARED = Path(os.environ.get("TEMPER_SHARED_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))
GSM8K = SHARED / "gsm8k" / "test.jsonl"
CHATML = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>' + '\\n' }}"
          "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")
SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]  # ids 0, 1, 2: pad, -, eos
TOKENIZER_RECORDS = 1000  # questions + answers the BPE is trained on
# The default model of both RL benchmarks: small enough that each runs in minutes on two CPU cores.
SHAPE = {"dim": 256, "layers": 4, "heads": 4, "kv_heads": 2, "ffn": 704, "vocab": 4096}


# ---- what both benchmarks build (benchmarks/grpo_step.py imports these) -----------------------------


def questions(data: str, n: int, seed: int = 0) -> tuple[list[dict[str, str]], str]:
    """n records {"question", "answer"}: GSM8K test's first n (data: a .jsonl of such records, "" for the
    shared copy), or made-up sums when the shared copy is missing or data == "synthetic". Also says which."""
    path = Path(data) if data and data != "synthetic" else GSM8K
    if data and data != "synthetic" and not path.is_file():
        raise SystemExit(f"--data: {data} is not a file")
    if data != "synthetic" and path.is_file():
        with path.open(encoding="utf-8") as f:
            rows = [json.loads(line) for line in f if line.strip()]
        return [{"question": r["question"], "answer": r["answer"]} for r in rows[:n]], str(path)
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        a, b, c = rng.randint(2, 99), rng.randint(2, 99), rng.randint(2, 9)
        out.append({"question": f"Tom has {a} apples and buys {c} bags of {b} apples each. How many apples does "
                                f"he have now?", "answer": f"{a} + {c}*{b} = {a + c * b}\n#### {a + c * b}"})
    return out, "synthetic sums"


def chat_tokenizer(texts: list[str], vocab: int) -> HFTokenizer:
    """A byte-level BPE of `vocab` tokens trained on `texts`, with a ChatML template (eos <|im_end|>)."""
    tok = train_tokenizer(texts, "bpe", vocab, SPECIAL)
    return HFTokenizer(tok, {"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"}, {"default": CHATML})


def model_config(a: argparse.Namespace, vocab: int, context: int) -> ModelConfig:
    return dataclasses.replace(PRESETS["debug-llama"], dim=a.dim, n_layers=a.layers, n_heads=a.heads,
                               n_kv_heads=a.kv_heads, ffn_dim=a.ffn, vocab_size=vocab, max_seq_len=context,
                               tie_embeddings=False, dropout=0.0, rope_scaling=None)


def write_checkpoint(cfg: ModelConfig, tok: HFTokenizer, out: Path, seed: int = 0) -> Transformer:
    """Random weights (seeded) as a Hugging Face directory with the tokenizer; returns temper's model."""
    torch.manual_seed(seed)
    model = Transformer(cfg)
    save_hf(model, cfg, out, generation_config={"eos_token_id": tok.eos_id, "pad_token_id": tok.pad_id})
    save_hf_tokenizer(tok, out)
    return model.eval()


def add_model_args(p: argparse.ArgumentParser, dim: int, layers: int, heads: int, kv_heads: int, ffn: int,
                   vocab: int) -> None:
    p.add_argument("--data", default="", help="GSM8K-style .jsonl (default: ../shared's test split), or synthetic")
    p.add_argument("--dim", type=int, default=dim)
    p.add_argument("--layers", type=int, default=layers)
    p.add_argument("--heads", type=int, default=heads)
    p.add_argument("--kv-heads", type=int, default=kv_heads)
    p.add_argument("--ffn", type=int, default=ffn)
    p.add_argument("--vocab", type=int, default=vocab, help="BPE vocabulary trained on the questions")


# ---- the two sides ------------------------------------------------------------------------------------


def temper_side(model: Transformer, tok: HFTokenizer, prompts: list[list[int]], a: argparse.Namespace):
    cfg = RolloutConfig(n=a.n, max_new_tokens=a.new_tokens, temperature=a.temperature)

    def run(seed: int) -> list[Rollout]:
        seeds = [seed * len(prompts) * a.n + i for i in range(len(prompts) * a.n)]
        return rollout(model, tok, prompts, cfg, seeds=seeds, stop_ids=[])  # no stop: every row runs N tokens

    return run


def hf_side(path: Path, prompts: list[list[int]], pad: int, a: argparse.Namespace):
    """transformers' sampling with the sampled tokens' log-probs, returned as temper's Rollouts."""
    import transformers

    transformers.logging.set_verbosity_error()
    hf = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="sdpa").eval()
    hf_tok = transformers.AutoTokenizer.from_pretrained(path)
    gen = transformers.GenerationConfig(
        do_sample=True, max_new_tokens=a.new_tokens, temperature=a.temperature, top_k=0, top_p=1.0,
        num_return_sequences=a.n, output_scores=True, return_dict_in_generate=True, eos_token_id=None,
        pad_token_id=pad, bos_token_id=None)
    L = max(map(len, prompts))
    input_ids = torch.tensor([[pad] * (L - len(p)) + p for p in prompts])  # left-padded
    mask = torch.tensor([[0] * (L - len(p)) + [1] * len(p) for p in prompts])

    @torch.inference_mode()
    def run(seed: int) -> list[Rollout]:
        torch.manual_seed(seed)
        out = hf.generate(input_ids=input_ids, attention_mask=mask, generation_config=gen)
        logps = hf.compute_transition_scores(out.sequences, out.scores, normalize_logits=True)  # (B, N)
        completions = out.sequences[:, L:].tolist()
        texts = hf_tok.batch_decode(completions, skip_special_tokens=True)
        return [Rollout(prompts[r // a.n], c, lp, t, True)
                for r, (c, lp, t) in enumerate(zip(completions, logps.tolist(), texts, strict=True))]

    return run


# ---- the run ------------------------------------------------------------------------------------------


def same_work(model: Transformer, outs: list[Rollout], a: argparse.Namespace) -> dict[str, float]:
    """Tokens per row (-1 when rows differ), the mean |returned log-prob - a training forward's| over the
    first sample of each prompt (one forward of P rows, not P * n), and the mean log-prob of all rows."""
    lengths = {len(o.completion) for o in outs}
    mismatch = logprob_mismatch(model, collate_rollouts(outs[::a.n]), a.temperature)
    mean_logp = sum(sum(o.logprobs) for o in outs) / sum(len(o.logprobs) for o in outs)
    return {"tokens_per_row": min(lengths) if len(lengths) == 1 else -1.0, "logp_mismatch": mismatch,
            "mean_logp": mean_logp}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(p, **SHAPE)
    p.add_argument("--prompts", type=int, default=16)
    p.add_argument("--n", type=int, default=8, help="samples per prompt")
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--repeats", type=int, default=3, help="alternating timed runs per side after a warm-up")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--json", default="", help="also write the results to this file")
    a = p.parse_args(argv)
    if min(a.prompts, a.n, a.new_tokens, a.repeats) < 1 or not a.temperature > 0:
        p.error("--prompts, --n, --new-tokens and --repeats must be >= 1, --temperature > 0")
    if a.threads:
        torch.set_num_threads(a.threads)

    records, source = questions(a.data, max(a.prompts, TOKENIZER_RECORDS))
    tok = chat_tokenizer([r["question"] + "\n" + r["answer"] for r in records], a.vocab)
    prompts = [tok.encode_chat([{"role": "user", "content": r["question"]}], add_generation_prompt=True)
               for r in records[:a.prompts]]
    cfg = model_config(a, tok.tokenizer.get_vocab_size(), max(map(len, prompts)) + a.new_tokens)
    with tempfile.TemporaryDirectory(prefix="rollout-bench-") as tmp:
        model = write_checkpoint(cfg, tok, Path(tmp))
        sides = {"temper": temper_side(model, tok, prompts, a), "transformers": hf_side(Path(tmp), prompts, tok.pad_id, a)}
    lens = [len(x) for x in prompts]
    print(f"# model: dim {cfg.dim}, {cfg.n_layers} layers, {cfg.n_heads}/{cfg.n_kv_heads} heads, ffn {cfg.ffn_dim}, "
          f"vocab {cfg.vocab_size} ({model.num_params() / 1e6:.1f}M parameters), fp32, CPU, {torch.get_num_threads()} "
          f"threads; data: {source}; {a.prompts} prompts of {min(lens)}-{max(lens)} tokens x n={a.n} samples x "
          f"{a.new_tokens} new tokens, temperature {a.temperature}; median of {a.repeats} alternating runs after a "
          f"warm-up", file=sys.stderr, flush=True)

    checks = {name: same_work(model, run(0), a) for name, run in sides.items()}  # warm-up, and the checks
    times: dict[str, list[float]] = {name: [] for name in sides}
    for r in range(a.repeats):
        for name in (list(sides) if r % 2 == 0 else list(sides)[::-1]):
            t = time.perf_counter()
            outs = sides[name](r + 1)
            times[name].append(time.perf_counter() - t)
            assert len(outs) == a.prompts * a.n
            print(f"# repeat {r} {name}: {times[name][-1]:.2f} s", file=sys.stderr, flush=True)

    tokens = a.prompts * a.n * a.new_tokens
    rows = {name: {"seconds": statistics.median(ts), "tokens_per_s": tokens / statistics.median(ts),
                   "runs_s": ts, **checks[name]} for name, ts in times.items()}
    t, h = rows["temper"], rows["transformers"]
    print("| impl | generated tokens | s (median) | min-max s | tokens/s | vs transformers | tokens per row "
          "| log-prob vs forward | mean log-prob |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for name, row in rows.items():
        ratio = row["tokens_per_s"] / h["tokens_per_s"]
        print(f"| {name} | {tokens} | {row['seconds']:.2f} | {min(row['runs_s']):.2f}-{max(row['runs_s']):.2f} "
              f"| {row['tokens_per_s']:,.0f} | {ratio:.2f}x | {row['tokens_per_row']:.0f} | {row['logp_mismatch']:.1e} "
              f"| {row['mean_logp']:.3f} |")
    print(f"\ntemper / transformers: {t['tokens_per_s'] / h['tokens_per_s']:.2f}x generated tokens/s")
    if a.json:
        Path(a.json).write_text(json.dumps({"model": dataclasses.asdict(cfg), "data": source, "prompts": a.prompts,
                                            "n": a.n, "new_tokens": a.new_tokens, "threads": torch.get_num_threads(),
                                            "speedup": t["tokens_per_s"] / h["tokens_per_s"], "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
