"""Speculative decoding against plain decoding: greedy, batch 1, same target, one run (issue 16, Performance (b)).

A char-level Shakespeare target (default 6 layers x 256) is pretrained with `temper pretrain`, and a
small draft (default 2 x 64) is distilled from it with `temper distill` (forward KL, alpha 1): both are
kept in WORK_DIR and reused by later runs with the same settings. Then each prompt is decoded greedily
for --new-tokens tokens three ways, alternating, --repeats times: plain (`engine.generate`), with the
draft model and with prompt lookup (`speculative_generate`, k = --k drafts per pass). Every speculative
output is asserted equal to the plain one (exactness), so the table compares the same tokens:
tokens/s (the median of the repeats' whole-call times, prefill included), speedup over plain,
acceptance rate (accepted / drafted) and tokens per target pass.

Two prompt sets: "shakespeare" (held-out lines) and "copy" (a held-out passage, a blank line, then its
first line again: the summarise/quote-back case where prompt lookup has something to copy).

Read the acceptance with care: a target trained for a few minutes decodes greedily into loops ("the
the the ..."), which a draft (or the sequence itself) predicts easily, so the acceptance here is higher
than a well-trained pair on varied text gives; the cost side (draft steps, one (k + 1)-token pass of
the target against k + 1 one-token steps) is what the speedup at a given acceptance measures.

    python benchmarks/speculative_decoding.py     # ~12 minutes on 2 busy cores: 8 training (kept in --work), 3 decoding
    python benchmarks/speculative_decoding.py --work out/spec --k 3 5 --threads 1 --json spec.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

from temper.infer.engine import generate
from temper.infer.load import load_for_inference
from temper.infer.speculative import SpeculativeStats, speculative_generate
from temper.recipes import distill, prepare, pretrain

TEXT = Path(__file__).resolve().parents[2] / "shared" / "data" / "tinyshakespeare" / "input.txt"


def shape(text: str) -> dict[str, int]:
    """'6x256' -> layers 6, dim 256, heads of 32 dimensions."""
    layers, dim = (int(x) for x in text.lower().split("x"))
    return {"n_layers": layers, "dim": dim, "n_heads": max(1, dim // 32), "n_kv_heads": max(1, dim // 32)}


def train(args: argparse.Namespace, work: Path) -> tuple[Path, Path]:
    """The target's and the draft's final/ directories (trained here unless already there)."""
    data = work / "data"
    if not (data / "manifest.json").exists():
        work.mkdir(parents=True, exist_ok=True)
        (work / "text.txt").write_text(Path(args.text).read_text()[: args.chars])
        assert prepare.main([f"--input={work / 'text.txt'}", f"--out={data}", "--tokenizer.kind=char",
                             "--txt_docs=paragraph", "--val_fraction=0.1", "--workers=1", "--progress=false"]) == 0
    common = ["--log.progress=false", "--run.device=cpu", f"--run.dir={work}", "--checkpoint.every=0",
              "--log.every=50", "--eval.every=0", "--eval.batches=4", "--train.micro_batch_size=16",
              "--schedule.warmup_steps=20", "--optim.lr=3e-3", f"--data.dir={data}"]
    target = work / "target" / "final"
    if not (target / "config.json").exists():
        t0 = time.time()
        model = [f"--model.{k}={v}" for k, v in shape(args.target).items()]
        assert pretrain.main([*common, "--run.name=target", "--preset=debug-llama", f"--model.max_seq_len={args.seq}",
                              *model, f"--train.steps={args.target_steps}"]) == 0
        print(f"target {args.target} trained in {time.time() - t0:.0f}s", flush=True)
    draft = work / "draft" / "final"
    if not (draft / "config.json").exists():
        t0 = time.time()
        student = "{" + ", ".join(f"{k}: {v}" for k, v in {**shape(args.draft), "max_seq_len": args.seq}.items()) + "}"
        assert distill.main([*common, "--run.name=draft", f"--teacher.path={target}", "--student.preset=debug-llama",
                             f"--student.model={student}", "--loss.alpha=1", f"--train.steps={args.draft_steps}"]) == 0
        print(f"draft {args.draft} distilled in {time.time() - t0:.0f}s", flush=True)
    return target, draft


def prompt_sets(text: str, n: int, length: int) -> dict[str, list[str]]:
    """Held-out Shakespeare: n prompts of `length` characters, and n copy-back prompts."""
    held = text[int(len(text) * 0.9) :]
    step = max(1, (len(held) - 4 * length) // max(1, n))
    starts = [i * step for i in range(n)]
    lines = [held[s : s + length] for s in starts]
    passages = [held[s : s + 4 * length] for s in starts]
    copies = [p + "\n\n" + p[: length // 2] for p in passages]
    return {"shakespeare": lines, "copy": copies}


def run_once(target: torch.nn.Module, p: list[int], new_tokens: int, k: int, kw: dict[str, Any]
             ) -> tuple[float, list[int], SpeculativeStats | None]:
    """Seconds, tokens and stats of one greedy decode: plain when kw is empty, else speculative."""
    t0 = time.perf_counter()
    if not kw:
        out, stats = generate(target, [p], max_new_tokens=new_tokens, temperature=0)[0], None
    else:
        out, stats = speculative_generate(target, p, k=k, max_new_tokens=new_tokens, temperature=0, **kw)
    return time.perf_counter() - t0, out, stats


def bench(args: argparse.Namespace, target_dir: Path, draft_dir: Path) -> list[dict[str, Any]]:
    loaded = load_for_inference(target_dir)
    target, tok = loaded.model, loaded.tokenizer
    draft = load_for_inference(draft_dir).model
    text = Path(args.text).read_text()[: args.chars]
    methods: list[tuple[str, int, dict[str, Any]]] = [("plain", 0, {})]
    methods += [("draft", k, {"draft": draft}) for k in args.k]
    methods += [(f"lookup-{args.lookup}", k, {"prompt_lookup": args.lookup}) for k in args.k]
    rows = []
    for name, prompts in prompt_sets(text, args.prompts, args.prompt_chars).items():
        ids = [tok.encode(p) for p in prompts]
        plain = [generate(target, [p], max_new_tokens=args.new_tokens, temperature=0)[0] for p in ids]  # warm-up too
        times: dict[tuple[str, int], list[float]] = {(m, k): [] for m, k, _ in methods}
        stats = {(m, k): SpeculativeStats() for m, k, _ in methods}
        for rep in range(args.repeats):  # the methods alternate, so drifting load hits each alike
            for m, k, kw in methods:
                total = 0.0
                for p, expected in zip(ids, plain, strict=True):
                    sec, out, st = run_once(target, p, args.new_tokens, k, kw)
                    assert out == expected, f"{name} {m} k={k}: not the plain greedy output"
                    total += sec
                    if st is not None and rep == 0:  # greedy: every repeat drafts the same
                        s = stats[m, k]
                        s.drafted, s.accepted = s.drafted + st.drafted, s.accepted + st.accepted
                        s.target_passes, s.tokens = s.target_passes + st.target_passes, s.tokens + st.tokens
                times[m, k].append(total)
        n_tokens = sum(len(o) for o in plain)
        plain_s = statistics.median(times["plain", 0])
        for m, k, _ in methods:
            sec = statistics.median(times[m, k])
            s = stats[m, k]
            rows.append({"prompts": name, "method": m, "k": k, "tokens_per_s": n_tokens / sec,
                         "speedup": plain_s / sec, "acceptance": s.acceptance_rate if m != "plain" else None,
                         "tokens_per_pass": s.tokens / s.target_passes if s.target_passes else 1.0})
    return rows


def table(rows: list[dict[str, Any]]) -> str:
    out = ["| prompts | method | k | tokens/s | speedup vs plain | acceptance | tokens / target pass |",
           "|---|---|---|---|---|---|---|"]
    for r in rows:
        acc = "-" if r["acceptance"] is None else f"{100 * r['acceptance']:.1f}%"
        k = "-" if r["method"] == "plain" else r["k"]
        out.append(f"| {r['prompts']} | {r['method']} | {k} | {r['tokens_per_s']:.1f} | {r['speedup']:.2f}x | {acc} "
                   f"| {r['tokens_per_pass']:.2f} |")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", default="out/speculative_decoding", help="where the models are trained and kept")
    ap.add_argument("--text", default=str(TEXT), help="training text (tinyshakespeare)")
    ap.add_argument("--chars", type=int, default=300_000, help="characters of --text used")
    ap.add_argument("--target", default="6x256", help="target shape, LAYERSxDIM")
    ap.add_argument("--draft", default="2x64", help="draft shape, LAYERSxDIM")
    ap.add_argument("--seq", type=int, default=128, help="both models' context (and training length)")
    ap.add_argument("--target-steps", type=int, default=200)
    ap.add_argument("--draft-steps", type=int, default=200)
    ap.add_argument("--k", type=int, nargs="+", default=[3, 5], help="drafts per verification pass")
    ap.add_argument("--lookup", type=int, default=3, help="prompt lookup's longest n-gram")
    ap.add_argument("--prompts", type=int, default=3, help="prompts per set")
    ap.add_argument("--prompt-chars", type=int, default=64)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", default="", help="also write the rows here")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    target, draft = train(args, Path(args.work))
    rows = bench(args, target, draft)
    print(f"\nGreedy, batch 1, CPU ({args.threads} thread(s)); target {args.target}, draft {args.draft} (distilled); "
          f"{args.new_tokens} new tokens x {args.prompts} prompts; median of {args.repeats}.\n")
    print(table(rows))
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
