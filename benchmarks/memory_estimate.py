"""`temper estimate` against the measured peak of real training steps, per preset, recipe and checkpointing.

Each case runs in its own subprocess: build the model (LoRA swapped in for `lora`; its frozen base
in the compute dtype, as the estimate assumes), wrap it with activation checkpointing, run one
`train_step` so that AdamW's states exist, then measure the second step: the peak of distinct live
tensor storages (`LiveTensorBytes`: a CPU has no allocator counter) split into parameters,
gradients, optimizer states and activations at the peak; on CUDA also
`torch.cuda.max_memory_allocated` over the same step, less cuBLAS's workspace (not a tensor).
Peak RSS growth over the process's size before the model was built is printed as a cross-check
only: the allocator caches freed blocks and the first step's temporaries are in it.

The issue's bar: within 15% for the debug and 125M presets, pretrain and LoRA, with and without
activation checkpointing.

    python benchmarks/memory_estimate.py                                  # CPU, fp32, 4 presets x 2 x 2
    python benchmarks/memory_estimate.py --presets gpt2-124m --batch 4 --seq 512
    python benchmarks/memory_estimate.py --device cuda --precision bf16    # on a GPU
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import resource
import subprocess
import sys
import time

import torch

from temper.model.config import PRESETS, ModelConfig
from temper.model.lora import apply_lora
from temper.model.transformer import Transformer
from temper.train.memory import LoRAShape, RunShape, estimate, human_bytes, measure_train_step
from temper.train.optim import OptimConfig, build_optimizer
from temper.train.parallel import apply_activation_checkpointing
from temper.train.step import train_step

PARTS = ("parameters", "gradients", "optimizer states", "activations")


def bench_config(preset: str, seq: int) -> ModelConfig:
    """The preset at this sequence length, without dropout or long-context RoPE scaling."""
    return dataclasses.replace(PRESETS[preset], max_seq_len=seq, dropout=0.0, rope_scaling=None)


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def worker(case: dict) -> dict:
    torch.manual_seed(0)
    device = torch.device(case["device"])
    cfg = bench_config(case["preset"], case["seq"])
    amp = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[case["precision"]]
    lora = LoRAShape(rank=case["rank"])
    run = RunShape(recipe=case["recipe"], precision=case["precision"], micro_batch_size=case["batch"],
                   seq_len=case["seq"], activation_checkpointing=case["ckpt"], device=device.type, lora=lora)
    est = estimate(cfg, run)
    rss0 = _rss()
    model = Transformer(cfg)
    if case["recipe"] == "lora":
        apply_lora(model, lora.rank, 2.0 * lora.rank, lora.targets, lora.dropout)
        for p in model.parameters():
            if not p.requires_grad and amp is not None:
                p.data = p.data.to(amp)
    model.to(device)
    apply_activation_checkpointing(model, case["ckpt"])
    optimizer = build_optimizer(model, OptimConfig(), device.type)
    x = torch.randint(0, cfg.vocab_size, (case["batch"], case["seq"] + 1), device=device)
    batches = [(x[:, :-1], x[:, 1:])]
    t0 = time.perf_counter()
    train_step(model, optimizer, batches, step=0, amp_dtype=amp)
    measured = measure_train_step(model, optimizer, batches,
                                  lambda: train_step(model, optimizer, batches, step=1, amp_dtype=amp))
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - rss0
    return {"estimate": est.peak, "estimate_at_peak": est.at_peak, "moment": est.peak_formula.split(":")[0],
            "measured": measured.peak, "measured_at_peak": measured.at_peak, "op": measured.op,
            "cuda_max_allocated": measured.cuda_max_allocated, "rss_growth": rss, "seconds": time.perf_counter() - t0}


def _mib(n: float) -> str:
    return f"{n / 2**20:.1f}"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--presets", nargs="+", default=["debug", "debug-llama", "gpt2-124m", "llama-125m"])
    ap.add_argument("--recipes", nargs="+", default=["pretrain", "lora"], choices=["pretrain", "lora"])
    ap.add_argument("--ckpt", nargs="+", type=int, default=[0, 1], help="activation checkpointing: every k-th block")
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--rank", type=int, default=8, help="LoRA rank (q, k, v, o targets)")
    ap.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "fp16"])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return 0

    print(f"device {args.device}, {args.precision}, micro-batch {args.batch} x {args.seq} tokens, LoRA rank "
          f"{args.rank} on q/k/v/o; MiB; est/meas per component at the peak\n")
    gpu = args.device.startswith("cuda")
    header = ["preset", "recipe", "ckpt", "estimate", "measured", "ratio"] + (["cuda max alloc", "ratio"] if gpu else []) + \
             [f"{p} est/meas" for p in PARTS] + ["RSS growth", "estimated peak moment", "measured peak op", "s"]
    print("| " + " | ".join(header) + " |")
    print("|" + "|".join(" --- " for _ in header) + "|")
    worst = 0.0
    for preset in args.presets:
        for recipe in args.recipes:
            for ckpt in args.ckpt:
                case = {"preset": preset, "recipe": recipe, "ckpt": ckpt, "batch": args.batch, "seq": args.seq,
                        "rank": args.rank, "precision": args.precision, "device": args.device}
                proc = subprocess.run([sys.executable, __file__, "--worker", json.dumps(case)],
                                      capture_output=True, text=True)
                if proc.returncode:
                    print(f"| {preset} | {recipe} | {ckpt} | failed: {proc.stderr.strip().splitlines()[-1]} |")
                    continue
                r = json.loads(proc.stdout.strip().splitlines()[-1])
                ratio = r["estimate"] / r["measured"]
                worst = max(worst, abs(ratio - 1))
                row = [preset, recipe, str(ckpt), _mib(r["estimate"]), _mib(r["measured"]), f"{ratio:.3f}"]
                if gpu:
                    ratio_gpu = r["estimate"] / r["cuda_max_allocated"]
                    worst = max(worst, abs(ratio_gpu - 1))
                    row += [_mib(r["cuda_max_allocated"]), f"{ratio_gpu:.3f}"]
                row += [f"{_mib(r['estimate_at_peak'].get(p, 0))} / {_mib(r['measured_at_peak'].get(p, 0))}" for p in PARTS]
                row += [human_bytes(r["rss_growth"]), r["moment"], r["op"].removeprefix("aten.").removesuffix(".default"),
                        f"{r['seconds']:.1f}"]
                print("| " + " | ".join(row) + " |", flush=True)
    print(f"\nlargest |estimate / measured - 1|: {worst:.1%} (the issue's bar: 15%)")
    return 0 if worst <= 0.15 else 1


if __name__ == "__main__":
    raise SystemExit(main())
