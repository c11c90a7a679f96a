"""Pretraining throughput: temper against `transformers` on the same shape, batch, precision and optimizer.

Each (implementation, shape) runs in its own subprocess so that peak memory is its own. Both
sides run forward -> cross-entropy -> backward -> clip -> AdamW step with the same optimizer
(temper's: fused AdamW, which is also the Hugging Face Trainer's default); temper through its
real `train_step`, transformers as its users train it (`model(input_ids, labels=...)`).

A shared machine drifts by 10-20% between runs, so the two sides alternate `--repeats` times
(order flipped each round) and the table reports the median tokens/s of each, its spread, and
the ratio of medians. MFU is against the datasheet peak on known GPUs and a matmul peak
measured in the same run.

Modes: eager; compile (temper: each block compiled in place, `train.compile_scope=blocks`; transformers: the whole
model, as its users and its Trainer compile it); compile-model (temper: the whole model and its loss as one graph,
`train.compile_scope=model`, against the same transformers + compile runs, which are not measured twice); float8
(temper + compile per block with `train.float8`: the blocks' linear layers in float8 through torchao, against
transformers + compile; a CUDA GPU of compute capability >= 8.9 only, skipped elsewhere with the reason printed;
its MFU is over the same bf16 peaks, as torchtitan reports it).

    python benchmarks/pretrain_throughput.py                      # CPU: debug and gpt2-124m shapes
    python benchmarks/pretrain_throughput.py --shapes gpt2-124m --steps 3 --repeats 5
    python benchmarks/pretrain_throughput.py --shapes gpt2-124m llama-3.2-1b --batch 16 4 --seq 1024 --modes eager compile
    python benchmarks/pretrain_throughput.py --shapes gpt2-124m --batch 16 --seq 1024 --modes compile compile-model
    python benchmarks/pretrain_throughput.py --shapes llama-3.2-1b --batch 4 --seq 1024 --modes compile float8  # H100
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import resource
import statistics
import subprocess
import sys
import time

import torch
from decode_throughput import SHAPES, hf_attention
from profiling import print_top_kernels

from temper.model.config import ModelConfig
from temper.model.hf.config import to_hf_config
from temper.model.transformer import Transformer
from temper.train.float8 import float8_refusal
from temper.train.losses import CompiledLoss, LMLoss
from temper.train.optim import OptimConfig, build_optimizer
from temper.train.parallel import DistInfo, parallelize
from temper.train.step import datasheet_peak_flops, measured_matmul_peak_flops, throughput, train_step


def bench_config(shape: str, vocab: int, seq: int) -> ModelConfig:
    """The preset at this sequence length, without dropout or long-context RoPE scaling."""
    cfg = SHAPES[shape]  # the presets, and the small shapes of the families (decode_throughput.SHAPES)
    return dataclasses.replace(cfg, vocab_size=vocab or cfg.vocab_size, max_seq_len=max(seq, 64),
                               dropout=0.0, rope_scaling=None)


def build(impl: str, shape: str, vocab: int, seq: int, device: torch.device):
    cfg = bench_config(shape, vocab, seq)
    torch.manual_seed(0)
    if impl == "temper":
        model = Transformer(cfg)
    else:
        import transformers

        hf_cfg = to_hf_config(cfg)
        config = transformers.AutoConfig.for_model(**hf_cfg)
        model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation=hf_attention(hf_cfg))
    return cfg, model.to(device)


MODES = ("eager", "compile", "compile-model", "float8")
PEER_MODE = {"eager": "eager", "compile": "compile", "compile-model": "compile", "float8": "compile"}
"""The transformers run each of temper's modes is compared with: it compiles the whole model in either scope."""


def measure(impl: str, shape: str, batch: int, seq: int, steps: int, dtype_name: str, mode: str, vocab: int,
            profile: int = 0) -> dict:
    compile = mode != "eager"
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype_name]
    cfg, model = build(impl, shape, vocab, seq, device)
    opt = build_optimizer(model, OptimConfig(lr=1e-4), device.type)
    loss_fn = None
    if impl == "temper":  # temper's own wrapping: each block, or the whole model, compiled in place
        scope = "model" if mode == "compile-model" else "blocks"
        train_model = parallelize(model, DistInfo(0, 0, 1, device), compile=compile, compile_scope=scope,
                                  float8=mode == "float8")
        if scope == "model":  # as `Run.step` does under train.compile_scope=model: the loss in the model's graph
            loss_fn = CompiledLoss(LMLoss())
    else:  # as transformers' users (and its Trainer's torch_compile=True) do: the whole model
        train_model = torch.compile(model) if compile else model
    x = torch.randint(0, cfg.vocab_size, (batch, seq + 1), device=device)
    inputs, targets = x[:, :-1], x[:, 1:]

    def one_step(i: int) -> None:
        if impl == "temper":
            train_step(train_model, opt, [(inputs, targets)], step=i, amp_dtype=dtype, loss_fn=loss_fn)
        else:
            with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
                loss = train_model(input_ids=inputs, labels=inputs).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)

    t0 = time.perf_counter()
    for i in range(3 if compile else 2):  # warmup (and compile)
        one_step(i)
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    warmup_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    for i in range(steps):
        one_step(i + 3)
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    if profile:  # where the time goes: the top kernels of a few more steps, printed to stderr
        print_top_kernels(f"{impl} {mode}", lambda: [one_step(i + 3 + steps) for i in range(profile)],
                          device.type == "cuda", rows=30)
    return {
        "impl": impl, "shape": shape, "mode": mode, "compile": compile, "tokens": batch * seq * steps, "seconds": seconds,
        "warmup_s": warmup_s, "device": str(device),
        "peak_mem_gib": (torch.cuda.max_memory_allocated() if device.type == "cuda"
                         else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024) / 2**30,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", nargs="+", default=["debug", "gpt2-124m"])
    p.add_argument("--batch", type=int, nargs="+", default=[8], help="one per shape, or one for all")
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--dtype", default="auto", choices=["auto", "fp32", "bf16"])
    p.add_argument("--modes", nargs="+", default=["eager"], choices=MODES,
                   help="run each side eager, under torch.compile (temper: per block, or compile-model: the whole model "
                        "and its loss; float8: per block with float8 linear layers, temper only, CUDA capability >= 8.9), "
                        "or several (one process per side runs them in turn)")
    p.add_argument("--compile", action="store_true", help="same as --modes compile")
    p.add_argument("--compile-backend", default="inductor", help="torch.compile backend (aot_eager: a quick dry run)")
    p.add_argument("--vocab", type=int, default=0, help="override the preset's vocabulary (0: keep)")
    p.add_argument("--repeats", type=int, default=3, help="alternating runs per side; the median is reported")
    p.add_argument("--json", help="also write every row (tokens/s, MFU, memory, the peaks) to this file")
    p.add_argument("--profile", type=int, default=0, help="profile this many extra steps per side; print the top kernels")
    p.add_argument("--child-timeout", type=float, default=0,
                   help="seconds one side's process may take for one shape (0: no limit); the modes it measured "
                        "before the limit are kept, the rest reported as timed out")
    p.add_argument("--child", nargs=2, metavar=("IMPL", "SHAPE"), help=argparse.SUPPRESS)
    a = p.parse_args()
    modes = ["compile"] if a.compile else a.modes
    dtype = a.dtype if a.dtype != "auto" else ("bf16" if torch.cuda.is_available() else "fp32")
    if a.child:
        if a.compile_backend != "inductor":  # nn.Module.compile and torch.compile both read this name
            torch.compile = functools.partial(torch.compile, backend=a.compile_backend)
        for mode in modes:
            print(json.dumps(measure(a.child[0], a.child[1], a.batch[0], a.seq, a.steps, dtype, mode, a.vocab,
                                     a.profile)), flush=True)
        return

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    refusal = float8_refusal(device) if "float8" in modes else None
    if refusal:  # not a failure: the other modes still run (gpu_check.sh's CPU dry run asks for it)
        print(f"# mode float8 skipped: {refusal}", flush=True)
        modes = [m for m in modes if m != "float8"]
    torch_dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype]
    # n=2048 on CPU: the 1024 the recipes use for a quick estimate under-reads a 2-core peak by ~1/3.
    measured = measured_matmul_peak_flops(device, torch_dtype, None if device.type == "cuda" else 2048)
    datasheet = datasheet_peak_flops(device, torch_dtype)
    batches = dict(zip(a.shapes, a.batch * len(a.shapes) if len(a.batch) == 1 else a.batch, strict=True))
    print(f"device {device} ({torch.cuda.get_device_name() if device.type == 'cuda' else f'{torch.get_num_threads()} threads'}), "
          f"{dtype}, seq {a.seq}, {a.steps} timed steps x {a.repeats} alternating runs, modes {modes}")
    print(f"measured {dtype} matmul peak: {measured / 1e12:.2f} TFLOP/s"
          + (f"; datasheet {datasheet / 1e12:.0f} TFLOP/s" if datasheet else ""))
    header = ("| shape | batch | mode | impl | tokens/s (median) | min-max | MFU (measured peak) | MFU (datasheet) "
              "| peak mem GiB | warm-up s | temper / transformers |")
    print(header + "\n|" + "---|" * 11, flush=True)
    rows = []
    for shape in a.shapes:
        with torch.device("meta"):
            fpt = Transformer(bench_config(shape, a.vocab, a.seq)).flops_per_token(a.seq)
        runs: dict[tuple[str, str], list[dict]] = {(impl, m): [] for m in MODES for impl in ("transformers", "temper")}
        failed: dict[str, str] = {}
        for r in range(a.repeats):
            for impl in (("transformers", "temper") if r % 2 == 0 else ("temper", "transformers")):
                if impl in failed:
                    continue
                # transformers measures each mode it is compared in once (compile-model's peer is its compile)
                side_modes = modes if impl == "temper" else list(dict.fromkeys(PEER_MODE[m] for m in modes))
                cmd = [sys.executable, __file__, "--child", impl, shape, "--batch", str(batches[shape]), "--seq",
                       str(a.seq), "--steps", str(a.steps), "--dtype", dtype, "--vocab", str(a.vocab),
                       "--compile-backend", a.compile_backend, "--modes", *side_modes, "--profile", str(a.profile)]
                try:
                    out = subprocess.run(cmd, capture_output=True, text=True, timeout=a.child_timeout or None)
                    stdout, stderr, returncode = out.stdout, out.stderr, out.returncode
                except subprocess.TimeoutExpired as e:  # its output so far is bytes whatever text= says
                    stdout = (e.stdout or b"").decode() if isinstance(e.stdout, bytes) else e.stdout or ""
                    stderr, returncode = f"timed out after {a.child_timeout:.0f} s (--child-timeout)", -1
                if a.profile:
                    print("\n".join(ln for ln in stderr.splitlines() if "Warning" not in ln), flush=True)
                for line in stdout.strip().splitlines():
                    row = json.loads(line)
                    runs[(impl, row["mode"])].append(row)
                if returncode != 0:
                    failed[impl] = (stderr.strip().splitlines() or ["no output"])[-1]
        for mode in modes:
            medians = {}
            for impl in ("transformers", "temper"):
                # transformers' runs of a mode also listed: only the reference of temper's ratio, not a row again
                peer_only = impl == "transformers" and PEER_MODE[mode] != mode and PEER_MODE[mode] in modes
                side = runs[(impl, PEER_MODE[mode] if impl == "transformers" else mode)]
                if peer_only and not side:
                    continue
                if not side:
                    print(f"| {shape} | {batches[shape]} | {mode} | {impl} | failed: {failed.get(impl, '?')} |")
                    rows.append({"shape": shape, "mode": mode, "impl": impl, "error": failed.get(impl, "?")})
                    continue
                rates = [r["tokens"] / r["seconds"] for r in side]
                medians[impl] = tokens_per_s = statistics.median(rates)
                if peer_only:
                    continue
                mfu_m = throughput(int(tokens_per_s), 1.0, fpt, measured)[1]
                mfu_d = throughput(int(tokens_per_s), 1.0, fpt, datasheet)[1] if datasheet else None
                mem = max(r["peak_mem_gib"] for r in side)
                warm = statistics.median(r["warmup_s"] for r in side)
                ratio = tokens_per_s / medians["transformers"] if impl == "temper" and "transformers" in medians else None
                rows.append({"shape": shape, "batch": batches[shape], "seq": a.seq, "mode": mode, "impl": impl,
                             "tokens_per_s": tokens_per_s, "mfu_measured": mfu_m, "mfu_datasheet": mfu_d,
                             "peak_mem_gib": mem, "warmup_s": warm, "ratio_vs_transformers": ratio})
                print(f"| {shape} | {batches[shape]} | {mode} | {impl} | {tokens_per_s:,.0f} | {min(rates):,.0f}-{max(rates):,.0f} "
                      f"| {mfu_m:.1%} | {'n/a' if mfu_d is None else f'{mfu_d:.1%}'} | {mem:.2f} | {warm:.1f} "
                      f"| {'' if ratio is None else f'{ratio:.2f}x'} |", flush=True)
        if a.json:  # after every shape, so that a run cut short keeps what it measured
            with open(a.json, "w") as f:
                json.dump({"device": str(device), "dtype": dtype, "measured_peak_flops": measured,
                           "datasheet_peak_flops": datasheet, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
