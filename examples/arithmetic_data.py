"""Data, a from-scratch model and an accuracy check for examples/grpo_arithmetic.sh.

Two-digit addition and subtraction, answered with the column method before the answer:

    user:      47+38
    assistant: 7+8=15, carry 1
               4+3+1=8
               #### 85

Subcommands:
- `data --out DIR`: sft.jsonl (chat `messages`, the worked answer), rl.jsonl and test.jsonl
  (`prompt` + `answer`); the three hold disjoint problems, so that nothing RL or the test scores
  was seen in SFT, and test.jsonl is scored only once, at the end.
- `init --data DIR --out DIR`: a character tokenizer over the data's characters with a compact chat
  template, and a randomly initialised tiny Llama-layout model, in Hugging Face layout.
- `accuracy --model DIR --prompts FILE`: greedy answers to every prompt, scored with the
  `final_number` rule `temper grpo` trains on; prints the accuracy and writes it as JSON.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from dataclasses import replace
from pathlib import Path

TEMPLATE = ("{% for m in messages %}{% if m['role'] == 'user' %}{{ '<|user|>' + m['content'] }}"
            "{% else %}{{ '<|assistant|>' + m['content'] + '<|end|>' }}{% endif %}{% endfor %}"
            "{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}")
SPECIALS = ["<|pad|>", "<|user|>", "<|assistant|>", "<|end|>"]


def problem(rng: random.Random) -> tuple[int, str, int]:
    """(a, op, b) with two-digit a, b; subtraction keeps a >= b (no negative answers)."""
    a, b, op = rng.randint(10, 99), rng.randint(10, 99), rng.choice("+-")
    if op == "-" and a < b:
        a, b = b, a
    return a, op, b


def worked(a: int, op: str, b: int) -> str:
    """The column method, ones then tens, then '#### answer' on the last line."""
    (a1, a0), (b1, b0) = divmod(a, 10), divmod(b, 10)
    if op == "+":
        ones = a0 + b0
        carry = ones // 10
        lines = [f"{a0}+{b0}={ones}" + (", carry 1" if carry else ""),
                 f"{a1}+{b1}+1={a1 + b1 + 1}" if carry else f"{a1}+{b1}={a1 + b1}"]
        return "\n".join(lines + [f"#### {a + b}"])
    borrow = a0 < b0
    lines = [f"{a0 + 10 * borrow}-{b0}={a0 + 10 * borrow - b0}" + (", borrow 1" if borrow else ""),
             f"{a1}-1-{b1}={a1 - 1 - b1}" if borrow else f"{a1}-{b1}={a1 - b1}"]
    return "\n".join(lines + [f"#### {a - b}"])


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def make_data(out: Path, seed: int, n_sft: int, n_rl: int, n_test: int) -> None:
    """Disjoint problem sets: every (a, op, b) appears in at most one file."""
    rng = random.Random(seed)
    seen: set[tuple[int, str, int]] = set()
    sets = []
    for n in (n_sft, n_rl, n_test):
        picked = []
        while len(picked) < n:
            p = problem(rng)
            if p not in seen:
                seen.add(p)
                picked.append(p)
        sets.append(picked)
    out.mkdir(parents=True, exist_ok=True)
    sft, rl, test = sets
    write_jsonl(out / "sft.jsonl", [{"messages": [{"role": "user", "content": f"{a}{op}{b}"},
                                                  {"role": "assistant", "content": worked(a, op, b)}]}
                                    for a, op, b in sft])
    for name, rows in (("rl", rl), ("test", test)):
        write_jsonl(out / f"{name}.jsonl", [{"prompt": f"{a}{op}{b}", "answer": str(a + b if op == "+" else a - b)}
                                            for a, op, b in rows])
    print(f"{out}: {n_sft} SFT examples, {n_rl} RL prompts, {n_test} test prompts (disjoint)")


def make_model(data: Path, out: Path, dim: int, layers: int, seed: int) -> None:
    """A character tokenizer (every character of sft.jsonl's texts) with TEMPLATE, and a random tiny Llama."""
    import torch

    from temper.data.tokenizer import HFTokenizer, save_hf_tokenizer, train_tokenizer
    from temper.model.config import PRESETS
    from temper.model.hf.checkpoint import save_hf
    from temper.model.transformer import Transformer

    texts = [m["content"] for line in (data / "sft.jsonl").read_text().splitlines()
             for m in json.loads(line)["messages"]]
    tok = train_tokenizer(texts, "char", special_tokens=SPECIALS)
    hf_tok = HFTokenizer(tok, {"eos_token": "<|end|>", "pad_token": "<|pad|>"}, {"default": TEMPLATE})
    cfg = replace(PRESETS["debug-llama"], vocab_size=tok.get_vocab_size(), dim=dim, n_layers=layers,
                  n_heads=4, n_kv_heads=2, ffn_dim=3 * dim, max_seq_len=128)
    torch.manual_seed(seed)
    save_hf(Transformer(cfg), cfg, out)
    save_hf_tokenizer(hf_tok, out)
    print(f"{out}: {tok.get_vocab_size()} tokens, dim {dim}, {layers} layers")


def accuracy(model_dir: str, prompts: str, out: str | None) -> float:
    """Greedy accuracy (final_number) of `model_dir` on every prompt, with the engine `temper grpo` evaluates with."""
    import torch

    from temper.align.online import Prompts, evaluate_greedy, render
    from temper.align.rewards import RewardConfig, build_rewards
    from temper.align.rollout import RolloutConfig
    from temper.data.prompts import read_prompts
    from temper.data.tokenizer import load_hf_tokenizer
    from temper.infer.load import open_checkpoint
    from temper.model.hf.checkpoint import load_hf
    from temper.train.parallel import DistInfo

    tok = load_hf_tokenizer(model_dir)
    records = read_prompts([prompts])
    rendered, _ = render(tok, records, 64)
    model, _ = load_hf(model_dir, device=torch.device("cpu"), dtype=torch.float32)
    d = DistInfo(rank=0, world=1, local_rank=0, device=torch.device("cpu"))
    rewards = build_rewards([RewardConfig(rule="final_number")])
    metrics = evaluate_greedy(model.eval(), tok, Prompts(rendered.records, rendered.ids), rewards,
                              RolloutConfig(max_new_tokens=40), open_checkpoint(model_dir).stop_ids, d)
    acc = metrics["reward/final_number"]
    print(f"{model_dir}: greedy accuracy {acc:.3f} on {len(records)} prompts of {prompts}")
    if out:
        Path(out).write_text(json.dumps({"model": model_dir, "prompts": prompts, "n": len(records), "accuracy": acc}))
    return acc


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    d = sub.add_parser("data")
    d.add_argument("--out", type=Path, required=True)
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--n_sft", type=int, default=3000)
    d.add_argument("--n_rl", type=int, default=2000)
    d.add_argument("--n_test", type=int, default=500)
    m = sub.add_parser("init")
    m.add_argument("--data", type=Path, required=True)
    m.add_argument("--out", type=Path, required=True)
    m.add_argument("--dim", type=int, default=128)
    m.add_argument("--layers", type=int, default=4)
    m.add_argument("--seed", type=int, default=0)
    a = sub.add_parser("accuracy")
    a.add_argument("--model", required=True)
    a.add_argument("--prompts", required=True)
    a.add_argument("--out", default=None)
    args = p.parse_args(argv)
    if args.cmd == "data":
        make_data(args.out, args.seed, args.n_sft, args.n_rl, args.n_test)
    elif args.cmd == "init":
        make_model(args.data, args.out, args.dim, args.layers, args.seed)
    else:
        accuracy(args.model, args.prompts, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
