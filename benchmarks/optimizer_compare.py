"""Muon against AdamW: validation loss after the same steps, steps to AdamW's final loss, time per step, one run.

Both optimizers train the same Llama-shaped model (random init from one seed) on the same batches through temper's
`train_step` and `build_optimizer`: AdamW over every parameter (`optim.name=adamw`), and Muon for the blocks' linear
weights beside AdamW for the rest (`optim.name=muon`, its updates scaled to AdamW's RMS, so one lr serves both).
Each runs at every learning rate of --lrs (warmup then cosine, `lr_at`); the table shows each run and, for the best
lr of each optimizer, how many steps Muon needed to reach AdamW's final validation loss.

The data are bytes of a text file (256 symbols, no tokenizer to train), split 90/10; batches are drawn from one
generator, so every run sees the same ones. On a shared CPU the time per step drifts by 10-20%; the runs alternate
optimizers at each lr so that drift falls on both.

    python benchmarks/optimizer_compare.py                                   # tinyshakespeare, 300 steps
    python benchmarks/optimizer_compare.py --steps 600 --lrs 1e-3 3e-3 1e-2 --dim 384 --layers 6
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import time
from pathlib import Path

import torch

from temper.model.config import PRESETS
from temper.model.transformer import Transformer
from temper.train.optim import OptimConfig, ScheduleConfig, build_optimizer, lr_at, set_lr
from temper.train.step import train_step

DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "tinyshakespeare" / "input.txt"


def batches(data: torch.Tensor, n: int, batch: int, seq: int, seed: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """n (inputs, targets) pairs of `batch` random windows of `seq` + 1 bytes."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        start = torch.randint(0, len(data) - seq - 1, (batch,), generator=g)
        rows = torch.stack([data[s:s + seq + 1] for s in start.tolist()])
        out.append((rows[:, :-1], rows[:, 1:]))
    return out


@torch.no_grad()
def val_loss(model: Transformer, val: list[tuple[torch.Tensor, torch.Tensor]]) -> float:
    model.eval()
    losses = [torch.nn.functional.cross_entropy(model(x).flatten(0, 1).float(), y.flatten()).item() for x, y in val]
    model.train()
    return statistics.fmean(losses)


def run(name: str, lr: float, args: argparse.Namespace, train: list, val: list) -> dict:
    cfg = dataclasses.replace(PRESETS["debug-llama"], vocab_size=256, dim=args.dim, n_layers=args.layers,
                              n_heads=args.dim // 64, n_kv_heads=args.dim // 64, ffn_dim=args.dim * 8 // 3,
                              max_seq_len=args.seq, tie_embeddings=False)
    torch.manual_seed(0)
    model = Transformer(cfg)
    optimizer = build_optimizer(model, OptimConfig(name=name, lr=lr, weight_decay=0.1), "cpu")
    schedule = ScheduleConfig(warmup_steps=args.steps // 20, min_lr_ratio=0.1)
    curve, times = [], []
    for step in range(args.steps):
        set_lr(optimizer, lr_at(step, args.steps, lr, schedule))
        start = time.perf_counter()
        train_step(model, optimizer, [train[step]], step=step)
        times.append(time.perf_counter() - start)
        if (step + 1) % args.eval_every == 0 or step + 1 == args.steps:
            curve.append((step + 1, val_loss(model, val)))
    return {"optimizer": name, "lr": lr, "val_loss": curve[-1][1], "curve": curve,
            "s_per_step": statistics.median(times), "params": model.num_params()}


def steps_to(curve: list[tuple[int, float]], target: float) -> int | None:
    return next((step for step, loss in curve if loss <= target), None)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--lrs", type=float, nargs="+", default=[1e-3, 3e-3, 1e-2])
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--eval-every", type=int, default=25)
    parser.add_argument("--val-batches", type=int, default=8)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    data = torch.frombuffer(bytearray(args.data.read_bytes()), dtype=torch.uint8).long()
    cut = int(0.9 * len(data))
    train = batches(data[:cut], args.steps, args.batch, args.seq, seed=1)
    val = batches(data[cut:], args.val_batches, args.batch, args.seq, seed=2)
    rows = [run(name, lr, args, train, val) for lr in args.lrs for name in ("adamw", "muon")]
    print(f"# {rows[0]['params'] / 1e6:.2f}M parameters ({args.dim}d, {args.layers} layers), bytes of "
          f"{args.data.name}, {args.steps} steps of {args.batch} x {args.seq} tokens, cpu fp32, {args.threads} threads")
    print("| optimizer | lr | val loss | s / step |\n|---|---|---|---|")
    for r in rows:
        print(f"| {r['optimizer']} | {r['lr']:g} | {r['val_loss']:.4f} | {r['s_per_step']:.3f} |")
    adamw, muon = (min((r for r in rows if r["optimizer"] == name), key=lambda r: r["val_loss"])
                   for name in ("adamw", "muon"))
    reached = steps_to(muon["curve"], adamw["val_loss"])
    at = reached if reached is not None else f"> {args.steps}"
    print(f"\nbest: adamw lr {adamw['lr']:g} -> {adamw['val_loss']:.4f}; muon lr {muon['lr']:g} -> "
          f"{muon['val_loss']:.4f}; muon reaches adamw's final loss at step {at} of {args.steps} (evaluated every "
          f"{args.eval_every}); time per step muon / adamw {muon['s_per_step'] / adamw['s_per_step']:.2f}x")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
