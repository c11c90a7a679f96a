"""Quantized weights for inference: memory, WikiText-2 perplexity and decode speed of fp32, bf16, int8, int4, nf4.

Two models, each saved once in Hugging Face layout and loaded per kind through `load_for_inference(...,
quant=kind)`, the path `temper generate / evaluate / serve --quant` take:
  - memory and speed: a model of realistic shape (--shape, default "llama-125m": Llama parts, dim 768,
    12 layers, 32k vocabulary, untied head) with random weights: bytes of its weights as stored
    (`temper.model.quant.weight_bytes`: codes + scales), those bytes per parameter against the seeds'
    rule of thumb (X billion parameters: 4X GB fp32, 2X GB bf16, X GB int8, X/2 GB 4-bit), the process's
    resident memory (RSS) after loading and one forward pass (which reads every weight: float weights are
    copy-on-write maps of the safetensors file until then) minus before, freed memory returned first,
    and greedy decode tokens/s at batch 1 (--new-tokens after a --prompt-len prompt, prefill excluded);
  - quality: a small Llama (--train-dim, --train-layers) trained here on WikiText-2's train split for
    --train-steps (capped at --train-seconds) with a BPE tokenizer trained on its first --train-bytes,
    then scored on the test split's first --eval-docs paragraphs by temper's perplexity
    (`temper.eval.perplexity`, as `temper evaluate --perplexity.files` does).
Each kind runs in its own process (`--worker`), so its RSS is its own. fp32 and bf16 are the weights as
loaded; int8 / int4 / nf4 quantize the blocks' linear layers of the --quant-dtype model (float32 by
default: `temper generate`'s CPU default), the embeddings, norms and head staying in that dtype (see
`temper.model.quant`): the head and embeddings of a 32k vocabulary are 40% of llama-125m, so its bytes
per parameter sit above the rule of thumb, which assumes everything is quantized; "linear B/param"
shows the quantized layers alone.

Decode speed is eager by default (--compile: `torch.compile` the decode step, minutes on a CPU): eager
int8 casts each weight to the activation dtype before its matmul, so it is slower than float32 there
(compiled, the cast fuses into the product); int4 runs `_weight_int4pack_mm_for_cpu`; nf4 dequantizes
then multiplies. Figures on a shared machine drift: compare rows of one run.

    python benchmarks/quant_inference.py                          # ~10 min on 2 CPU cores
    python benchmarks/quant_inference.py --kinds fp32,int4 --train-steps 50 --json out.json
"""

from __future__ import annotations

import argparse
import ctypes
import dataclasses
import gc
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from temper.model.config import PRESETS
from temper.model.hf.checkpoint import save_hf
from temper.model.transformer import Transformer

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "wikitext-2"
KINDS = ("fp32", "bf16", "int8", "int4", "nf4")
RULE_OF_THUMB = {"fp32": 4.0, "bf16": 2.0, "int8": 1.0, "int4": 0.5, "nf4": 0.5}  # bytes per parameter
EOT = "<|endoftext|>"


# ---- setup: the two checkpoints -------------------------------------------------------------------


def save_shape_model(shape: str, out: Path) -> None:
    """The realistic-shape model, random weights (float32), with a three-letter tokenizer so it loads."""
    from temper.data.tokenizer import HFTokenizer, save_hf_tokenizer, train_tokenizer

    cfg = PRESETS[shape]
    torch.manual_seed(0)
    save_hf(Transformer(cfg), cfg, out)
    save_hf_tokenizer(HFTokenizer(train_tokenizer(["a b c"], "char", 0, [EOT]), {"eos_token": EOT}), out)


def train_small_model(args: argparse.Namespace, out: Path) -> dict:
    """A small Llama trained on WikiText-2 train for a minute or two, saved with its tokenizer."""
    from temper.data.sources import read_documents
    from temper.data.tokenizer import HFTokenizer, save_hf_tokenizer, train_tokenizer

    texts, size = [], 0
    for d in read_documents([str(args.data / "train.txt.gz")], txt_docs="paragraph"):
        if d.text.strip():
            texts.append(d.text)
            size += len(d.text)
            if size >= args.train_bytes:
                break
    tok = train_tokenizer(texts, "bpe", args.vocab, [EOT])
    eot = tok.token_to_id(EOT)
    ids = torch.tensor([t for e in tok.encode_batch(texts) for t in [*e.ids, eot]])
    cfg = dataclasses.replace(PRESETS["debug-llama"], vocab_size=tok.get_vocab_size(), dim=args.train_dim,
                              n_layers=args.train_layers, n_heads=args.train_dim // 64, n_kv_heads=max(1, args.train_dim // 128),
                              ffn_dim=args.train_dim * 3, max_seq_len=args.seq_len, tie_embeddings=False)
    torch.manual_seed(0)
    model = Transformer(cfg).train()
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=0.1)
    gen = torch.Generator().manual_seed(0)
    start, step, loss = time.perf_counter(), 0, float("nan")
    while step < args.train_steps and time.perf_counter() - start < args.train_seconds:
        done = max(step / args.train_steps, (time.perf_counter() - start) / args.train_seconds)
        lr = args.lr * min(1.0, (step + 1) / 10) * (1 - done)  # warm-up, then linear decay to the step or time cap
        for g in opt.param_groups:
            g["lr"] = lr
        at = torch.randint(0, len(ids) - args.seq_len - 1, (args.batch,), generator=gen)
        x = torch.stack([ids[i:i + args.seq_len + 1] for i in at.tolist()])
        logits = model(x[:, :-1])
        loss_t = F.cross_entropy(logits.flatten(0, 1), x[:, 1:].flatten())
        opt.zero_grad(set_to_none=True)
        loss_t.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        loss, step = loss_t.item(), step + 1
    save_hf(model.eval(), cfg, out)
    save_hf_tokenizer(HFTokenizer(tok, {"eos_token": EOT}), out)
    return {"train_steps": step, "train_seconds": round(time.perf_counter() - start, 1),
            "train_tokens": step * args.batch * args.seq_len, "train_loss": round(loss, 3),
            "params": sum(p.numel() for p in model.parameters())}


# ---- one kind, in its own process -------------------------------------------------------------------


def rss_bytes() -> int:
    """Resident memory now (not the peak), after returning freed heap to the system."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def load(path: Path, kind: str, quant_dtype: torch.dtype):
    from temper.infer.load import load_for_inference

    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}.get(kind, quant_dtype)
    return load_for_inference(path, dtype=dtype, quant=kind if kind in ("int8", "int4", "nf4") else None)


def decode_tokens_per_s(model, prompt_len: int, new_tokens: int, compile: bool) -> float:
    """Greedy decode at batch 1: tokens after the first over the time from the first to the last."""
    from temper.infer.engine import stream

    prompt = torch.randint(0, model.cfg.vocab_size, (1, prompt_len), generator=torch.Generator().manual_seed(0))
    for _ in stream(model, prompt.tolist(), max_new_tokens=min(4, new_tokens), temperature=0, compile=compile):
        pass  # warm-up (and compile)
    stamps = []
    for _ in stream(model, prompt.tolist(), max_new_tokens=new_tokens, temperature=0, compile=compile):
        stamps.append(time.perf_counter())
    return (len(stamps) - 1) / (stamps[-1] - stamps[0]) if len(stamps) > 1 else float("nan")


def worker(args: argparse.Namespace) -> dict:
    """Measure one kind: memory and decode speed of the shape model, perplexity of the trained one."""
    import temper.model.quant as quant  # torchao imported before the baseline, as every kind loads it
    from temper.eval.perplexity import perplexity
    from temper.eval.run import prefix_id
    from temper.recipes.evaluate import PerplexityConfig, perplexity_documents

    torch.set_num_threads(args.threads)
    kind, quant_dtype = args.worker, getattr(torch, args.quant_dtype)
    before = rss_bytes()
    model = load(args.shape_dir, kind, quant_dtype).model
    with torch.no_grad():  # touch every weight: float weights are copy-on-write maps of the file, read on first use
        model(torch.zeros(1, 8, dtype=torch.long))
    row = {"kind": kind, "rss_delta": rss_bytes() - before, "weight_bytes": quant.weight_bytes(model),
           "params": sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())}
    linears = [m.weight for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n != "head"]
    row["linear_bytes_per_param"] = sum(quant.storage_bytes(w) for w in linears) / sum(w.numel() for w in linears)
    row["decode_tokens_per_s"] = decode_tokens_per_s(model, args.prompt_len, args.new_tokens, args.compile)
    del model
    loaded = load(args.trained_dir, kind, quant_dtype)
    docs = perplexity_documents(PerplexityConfig(files=[str(args.data / "test.txt.gz")],
                                                 max_documents=args.eval_docs), loaded.tokenizer)
    with torch.no_grad():
        result = perplexity(loaded.model, docs, prefix_id(loaded.tokenizer), seq_len=args.seq_len)
    return row | {"perplexity": result.metrics["perplexity"], "perplexity_stderr": result.stderr["perplexity"],
                  "eval_tokens": result.extra["tokens"]}


# ---- the table --------------------------------------------------------------------------------------


def table(rows: list[dict], info: dict) -> str:
    bf16 = next((r["perplexity"] for r in rows if r["kind"] == "bf16"), None)
    lines = [f"Shape model: {info['shape']} ({info['params'] / 1e6:.1f}M parameters, random weights); "
             f"perplexity: {info['trained']['params'] / 1e6:.1f}M-parameter model trained "
             f"{info['trained']['train_seconds']}s ({info['trained']['train_tokens']:,} tokens) on WikiText-2 "
             f"train, scored on {rows[0]['eval_tokens']:,} test tokens; quantized from {info['quant_dtype']}; "
             f"decode at batch 1 on {info['device']}, {info['threads']} threads{', compiled' if info['compile'] else ''}.",
             "",
             "| kind | weights MB | B/param | rule of thumb B/param | linear B/param | RSS delta MB | "
             "decode tok/s | WikiText-2 ppl | ppl vs bf16 |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        vs = f"{r['perplexity'] / bf16:.3f}x" if bf16 else "-"
        lines.append(f"| {r['kind']} | {r['weight_bytes'] / 1e6:.1f} | {r['weight_bytes'] / r['params']:.3f} | "
                     f"{RULE_OF_THUMB[r['kind']]:.1f} | {r['linear_bytes_per_param']:.3f} | "
                     f"{r['rss_delta'] / 1e6:.1f} | {r['decode_tokens_per_s']:.1f} | {r['perplexity']:.2f} | {vs} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--kinds", default=",".join(KINDS))
    p.add_argument("--shape", default="llama-125m", choices=sorted(PRESETS))
    p.add_argument("--quant-dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--data", type=Path, default=DATA, help="directory with WikiText-2's train.txt.gz, test.txt.gz")
    p.add_argument("--train-bytes", type=int, default=2_000_000, help="characters of train text used")
    p.add_argument("--vocab", type=int, default=4096)
    p.add_argument("--train-dim", type=int, default=256)
    p.add_argument("--train-layers", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--train-steps", type=int, default=600)
    p.add_argument("--train-seconds", type=float, default=120.0)
    p.add_argument("--eval-docs", type=int, default=100, help="test paragraphs scored")
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--compile", action="store_true")
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--json", type=Path)
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--shape-dir", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--trained-dir", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(args)))
        return 0
    kinds = [k for k in args.kinds.split(",") if k]
    if unknown := [k for k in kinds if k not in KINDS]:
        p.error(f"unknown kinds {unknown}: choose from {', '.join(KINDS)}")
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        shape_dir, trained_dir = Path(tmp) / "shape", Path(tmp) / "trained"
        save_shape_model(args.shape, shape_dir)
        trained = train_small_model(args, trained_dir)
        print(f"trained: {trained}", file=sys.stderr)
        rows = []
        for kind in kinds:
            cmd = [sys.executable, __file__, *(argv if argv is not None else sys.argv[1:]), "--worker", kind,
                   "--shape-dir", str(shape_dir), "--trained-dir", str(trained_dir)]
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode:
                print(proc.stderr[-3000:], file=sys.stderr)
                return 1
            rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))
            print(f"{kind}: {rows[-1]}", file=sys.stderr)
    info = {"shape": args.shape, "params": rows[0]["params"], "trained": trained, "quant_dtype": args.quant_dtype,
            "device": "cpu", "threads": args.threads, "compile": args.compile}
    print(table(rows, info))
    if args.json:
        args.json.write_text(json.dumps({"info": info, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
