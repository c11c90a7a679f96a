"""Packed SFT attention: FlexAttention's block mask against SDPA's dense mask, on the same packed batch.

Documents of random lengths (log-normal around --mean-doc tokens, cut at --seq) are packed into rows of
--seq tokens by `data.packing.pack_documents`, as `temper sft --train.pack` packs them, and one model
(random weights) trains on them with temper's `train_step` (AdamW, bf16 autocast on a GPU) three ways:

- sdpa: `Segments(doc_ids)` as a dense (B, 1, T, T) bool mask (`model.attn_impl = "sdpa"`): SDPA's
  memory-efficient or math kernel, every masked score still computed;
- flex: the same mask as FlexAttention's block mask (`attn_impl = "flex"`, compiled on CUDA): blocks
  outside every document skipped;
- causal: no segments at all, documents attending across their boundaries (wrong for SFT): SDPA's
  flash kernel with is_causal, the speed a mask-free kernel would reach on these rows.

Tokens per second (real tokens, padding excluded) is the median over --steps steps after --warmup steps
(which compile), the sides alternating step by step; on CUDA each side's peak memory of a step is
`max_memory_allocated`. sdpa and flex must give the same first loss (reported as their difference).
On a CPU torch has no flex_attention backward, so the sides time forward passes only (`--forward-only`
is forced there): a smoke run of this script, not a measurement of the GPU kernels.

    python benchmarks/packed_attention.py                                  # CPU smoke run, debug shape
    python benchmarks/packed_attention.py --device cuda --shape llama-125m --seq 4096 --batch 4 --compile --json out.json
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from temper.data.packing import pack_documents
from temper.model.attention import Segments
from temper.model.config import PRESETS
from temper.model.transformer import Transformer
from temper.train.parallel import DistInfo, parallelize
from temper.train.step import train_step

SIDES = ("sdpa", "flex", "causal")


def packed_batch(n_rows: int, seq: int, mean_doc: int, vocab: int, seed: int) -> tuple:
    """(tokens, targets, model kwargs, real tokens) of the first n_rows packed rows of random documents."""
    rng = np.random.default_rng(seed)
    docs = []
    while sum(len(d) for d in docs) < 2 * n_rows * seq:  # enough documents to fill n_rows rows well
        n = int(min(seq, max(2, rng.lognormal(np.log(mean_doc), 0.6))))
        docs.append(rng.integers(0, vocab, n))
    b = pack_documents(docs, seq)
    rows = slice(0, n_rows)
    kwargs = {"positions": b.positions[rows], "segments": Segments(b.doc_ids[rows])}
    return b.tokens[rows], b.targets[rows], kwargs, int((b.doc_ids[rows] >= 0).sum())


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--shape", default="debug-llama", help="a preset of temper.model.config.PRESETS")
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--batch", type=int, default=2, help="packed rows per step")
    ap.add_argument("--mean-doc", type=int, default=0, help="median document length (default: seq / 8)")
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--compile", action="store_true", help="blocks compiled in place, as --train.compile does")
    ap.add_argument("--forward-only", action="store_true", help="time forward passes (forced on a CPU)")
    ap.add_argument("--json", help="also write the rows to this file")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    forward_only = args.forward_only or device.type != "cuda"
    cfg = replace(PRESETS[args.shape], max_seq_len=max(args.seq, PRESETS[args.shape].max_seq_len), dropout=0.0)
    x, y, kw, real = packed_batch(args.batch, args.seq, args.mean_doc or max(2, args.seq // 8), cfg.vocab_size, 0)
    x, y = x.to(device), y.to(device)
    kw = {"positions": kw["positions"].to(device), "segments": kw["segments"].to(device)}
    amp = torch.bfloat16 if device.type == "cuda" else None
    torch.manual_seed(0)
    base = Transformer(cfg).to(device)
    models, opts, times, peaks, first_loss = {}, {}, {s: [] for s in SIDES}, {s: 0 for s in SIDES}, {}
    for side in SIDES:
        m = copy.deepcopy(base)
        m.attn_impl = "flex" if side == "flex" else "sdpa"
        models[side] = parallelize(m, DistInfo(0, 0, 1, device), compile=args.compile)
        opts[side] = torch.optim.AdamW(m.parameters(), lr=1e-5)

    def run(side: str, step: int) -> float:
        m, batch_kw = models[side], ({} if side == "causal" else kw)
        if forward_only:
            with torch.no_grad(), torch.autocast(device.type, dtype=amp or torch.float32, enabled=amp is not None):
                logits = m(x, **batch_kw)
            return float(torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), y.flatten(), ignore_index=-100))
        return float(train_step(m, opts[side], [(x, y, batch_kw)], step=step, amp_dtype=amp).loss)

    for step in range(args.warmup + args.steps):
        for side in SIDES:
            if device.type == "cuda":
                torch.cuda.synchronize(device)
                torch.cuda.reset_peak_memory_stats(device)
            t0 = time.perf_counter()
            loss = run(side, step)  # float(): the host waits for the step
            dt = time.perf_counter() - t0
            first_loss.setdefault(side, loss)
            if step >= args.warmup:
                times[side].append(dt)
                if device.type == "cuda":
                    peaks[side] = max(peaks[side], torch.cuda.max_memory_allocated(device))
    rows = [{"side": s, "tokens_per_s": real / statistics.median(times[s]), "median_s": statistics.median(times[s]),
             "peak_gib": peaks[s] / 2**30, "first_loss": first_loss[s]} for s in SIDES]
    meta = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu", "shape": args.shape,
            "seq": args.seq, "batch": args.batch, "real_tokens": real, "padding": 1 - real / (args.batch * args.seq),
            "docs_per_row": float(kw["segments"].ids.amax(1).float().add(1).mean()), "compile": args.compile,
            "mode": "forward" if forward_only else "train_step", "torch": torch.__version__,
            "flex_vs_sdpa_first_loss": abs(first_loss["flex"] - first_loss["sdpa"])}
    print(json.dumps(meta))
    print(f"{'side':8} {'tokens/s':>12} {'median s':>10} {'peak GiB':>9} {'first loss':>11}")
    for r in rows:
        print(f"{r['side']:8} {r['tokens_per_s']:12.0f} {r['median_s']:10.4f} {r['peak_gib']:9.2f} {r['first_loss']:11.5f}")
    print(f"flex / sdpa: {rows[1]['tokens_per_s'] / rows[0]['tokens_per_s']:.2f}x")
    if args.json:
        Path(args.json).write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
