"""Decode throughput: temper's generation engine against `transformers`' `generate`, same model, one run.

The model is a preset of `temper.model.config.PRESETS` (or the benchmark's default "llama-small":
Llama-shaped, dim 512, 8 layers, 8 heads, 4 kv heads, SwiGLU, RMSNorm, RoPE, 32k vocabulary,
untied head) with random weights. temper builds it, exports it with `save_hf` to a temporary
directory, and transformers loads that directory with `AutoModelForCausalLM.from_pretrained`
(sdpa attention), so both sides run the same weights in the same dtype on the same device.

Both decode greedily the same prompts (random token ids, all of --prompt-len tokens, so neither
side pads) for exactly --new-tokens tokens (transformers: min_new_tokens, and no end-of-text id).
Only the decode is timed: the clock is read when each step's tokens reach the host (temper: each
step `stream` yields; transformers: each `put` of a streamer, which `generate` calls after every
step), so decode tokens/s = batch * steps / (time of the last step - time of the first), prefill
excluded. On a GPU temper reads tokens every 8 steps, as its `generate` does there (transformers
syncs every step), so its clock starts when the first 8 have arrived and counts the N - 8 after.
The sides alternate --repeats times after a warm-up of each (which also compiles), CUDA is
synchronised before every clock read, and the table reports the median of each side and
temper / transformers.

--compile: temper compiles its decode step (`compiled_decode_step`: inductor, fullgraph, CUDA graphs
on a GPU); transformers uses a static cache with its own automatic `torch.compile` of the forward
(`cache_implementation="static"`, the documented route; on a CPU `CompileConfig._compile_all_devices`
switches it on, with mode "default").

On CUDA the JSON rows also hold the bytes a decode step must read (weights of every matrix
product + the KV cache at the mean context length), the device's memory bandwidth measured here
(a large device-to-device copy, bytes read + written over CUDA-event time), the tokens/s that
bandwidth allows, `batch * bandwidth / bytes per step`, and each side's share of it.

Agreement: greedy tokens of both sides compared row by row up to the first difference (random
weights in bf16 can tip a near-tie late, so it is reported, not asserted).

    python benchmarks/decode_throughput.py                                 # CPU fp32, batch 1 and 8
    python benchmarks/decode_throughput.py --batch 1 --new-tokens 128 --repeats 5 --threads 1
    python benchmarks/decode_throughput.py --device cuda --shape llama-3.2-1b --compile --json out.json
    python benchmarks/decode_throughput.py --shape qwen3-moe-small   # a mixture: 64 experts, 8 per token
    python benchmarks/decode_throughput.py --shape gemma2-small      # capped scores; also gpt-oss-small (sinks)
    python benchmarks/decode_throughput.py --shape deepseek-v3-small # latent attention; also glm4.5-small
    python benchmarks/decode_throughput.py --shape qwen3.5-small     # Gated DeltaNet layers beside gated attention
    python benchmarks/decode_throughput.py --shape lfm2-small        # short convolutions; also cohere2-small
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from profiling import print_top_kernels

from temper.infer import engine
from temper.model.config import PRESETS, ModelConfig
from temper.model.hf.checkpoint import save_hf
from temper.model.transformer import Transformer

# The default shape: small enough that both sides decode on two CPU cores in about a minute.
SHAPES: dict[str, ModelConfig] = {
    "llama-small": dataclasses.replace(PRESETS["llama-125m"], dim=512, n_layers=8, n_heads=8, n_kv_heads=4,
                                       ffn_dim=1408, max_seq_len=2048),
    # Qwen3-30B-A3B's layout, small: 64 experts of which a token runs 8, q/k norms.
    "qwen3-moe-small": dataclasses.replace(PRESETS["qwen3-30b-a3b"], vocab_size=32000, dim=512, n_layers=8,
                                           n_heads=8, n_kv_heads=4, head_size=64, ffn_dim=1408, n_experts=64,
                                           expert_ffn_dim=256, max_seq_len=2048),
    # Gemma 2's layout, small: capped scores (the written-out attention on a CPU) and logits, alternating windows.
    "gemma2-small": dataclasses.replace(PRESETS["gemma-2-2b"], vocab_size=32000, dim=512, n_layers=8, n_heads=8,
                                        n_kv_heads=4, head_size=64, ffn_dim=1408, max_seq_len=2048),
    # GPT-OSS's layout, small: sinks, biases, 32 clamped-SwiGLU experts of which a token runs 4, 128-token windows.
    "gpt-oss-small": dataclasses.replace(PRESETS["gpt-oss-20b"], vocab_size=32000, dim=512, n_layers=8, n_heads=8,
                                         n_kv_heads=4, head_size=64, ffn_dim=256, max_seq_len=2048),
    # GLM-4.5's layout, small: sigmoid-routed experts (a choice bias, 64 of them, 8 per token) beside a shared one,
    # after a dense layer; half of each head rotated.
    "glm4.5-small": dataclasses.replace(PRESETS["glm-4.5-air"], vocab_size=32000, dim=512, n_layers=8, n_heads=8,
                                        n_kv_heads=4, head_size=64, rope_dim=32, ffn_dim=1408, n_experts=64,
                                        expert_ffn_dim=256, shared_expert_ffn_dim=256, max_seq_len=2048),
    # DeepSeek-V3's layout, small: latent attention (a 128-wide latent and 32 rotated dims cached per token) and the
    # same routing in 4 groups, 2 of them kept per token.
    "deepseek-v3-small": dataclasses.replace(
        PRESETS["deepseek-v3"], vocab_size=32000, dim=512, n_layers=8, n_heads=8, n_kv_heads=8, head_size=96,
        rope_dim=32, kv_lora_rank=128, q_lora_rank=192, v_head_size=64, ffn_dim=1408, n_experts=64, expert_ffn_dim=256,
        shared_expert_ffn_dim=256, expert_groups=4, expert_groups_per_token=2, dense_layers=1, max_seq_len=2048,
        rope_scaling=None),
    # Qwen3.5-9B's layout, small: three Gated DeltaNet layers (a fixed-size state each) to one of gated attention.
    "qwen3.5-small": dataclasses.replace(
        PRESETS["qwen3.5-9b"], vocab_size=32000, dim=512, n_layers=8, n_heads=8, n_kv_heads=2, head_size=64,
        rope_dim=16, ffn_dim=1408, linear_key_heads=4, linear_value_heads=8, linear_key_size=64, linear_value_size=64,
        max_seq_len=2048),
    # LFM2-1.2B's layout, small: short convolutions (their last two inputs cached) around two attention layers.
    "lfm2-small": dataclasses.replace(
        PRESETS["lfm2-1.2b"], vocab_size=32000, dim=512, n_layers=8, n_heads=8, n_kv_heads=4, ffn_dim=1408,
        attention_layers=(2, 5), max_seq_len=2048),
    # Granite 4.0-H-350M's layout, small: Mamba 2 layers (16 heads of 64, a state of 64) around two attention layers
    # without positions.
    "granite4-small": dataclasses.replace(
        PRESETS["granite-4.0-h-350m"], vocab_size=32000, dim=512, n_layers=8, n_heads=8, n_kv_heads=4, ffn_dim=1408,
        attention_layers=(2, 5), linear_value_heads=16, linear_key_size=64, linear_value_size=64, max_seq_len=2048),
    # Nemotron-Nano-9B-v2's layout, small: Mamba 2 layers (16 heads of 64 in 2 groups, a state of 64), two attention
    # layers without positions, squared-ReLU MLPs after most mixers.
    "nemotron-h-small": dataclasses.replace(
        PRESETS["nemotron-nano-9b-v2"], vocab_size=32000, dim=512, n_layers=8, n_heads=8, n_kv_heads=4, head_size=64,
        ffn_dim=1408, attention_layers=(2, 5), no_mlp_layers=(3,), linear_key_heads=2, linear_value_heads=16,
        linear_key_size=64, linear_value_size=64, max_seq_len=2048),
    # Nemotron 3 Nano's layout, small: those layers, each MLP a mixture of 32 squared-ReLU experts (4 per token, chosen
    # by sigmoid scores plus a bias) beside a shared one.
    "nemotron3-small": dataclasses.replace(
        PRESETS["nemotron-nano-9b-v2"], vocab_size=32000, dim=512, n_layers=8, n_heads=8, n_kv_heads=4, head_size=64,
        ffn_dim=1408, attention_layers=(2, 5), no_mlp_layers=(3,), linear_key_heads=2, linear_value_heads=16,
        linear_key_size=64, linear_value_size=64, max_seq_len=2048, n_experts=32, experts_per_token=4,
        expert_ffn_dim=256, shared_expert_ffn_dim=512, router_scores="sigmoid", router_float32=True,
        expert_choice_bias=True, routed_scaling=2.5),
    # FalconMamba-7B's layout, small: Mamba layers alone (1024 channels, a state of 16 values each), their steps, B and
    # C normalised.
    "falcon-mamba-small": dataclasses.replace(
        PRESETS["falcon-mamba-7b"], vocab_size=32000, dim=512, n_layers=8, no_mlp_layers=tuple(range(8)),
        linear_value_heads=1024, linear_dt_rank=32, max_seq_len=2048),
    # Jamba's layout, small: Mamba layers (1024 channels, a state of 16, their norms weighted) around one attention
    # layer without positions, a mixture of 2 of 8 experts in every other block.
    "jamba-small": dataclasses.replace(
        PRESETS["jamba-v0.1"], vocab_size=32000, dim=512, n_layers=8, n_heads=8, n_kv_heads=4, ffn_dim=1408,
        linear_value_heads=1024, linear_dt_rank=32, attention_layers=(4,), n_experts=8, expert_layers=(1, 3, 5, 7),
        max_seq_len=2048),
    # Llama 4 Scout's layout, small: three layers attending within chunks of 128 (weightless q/k norms) to one without
    # positions, 16 experts (1 per token, weighing its input) beside a shared one in every layer.
    "llama4-small": dataclasses.replace(
        PRESETS["llama-4-scout"], vocab_size=32000, dim=512, n_layers=8, n_heads=8, n_kv_heads=4, head_size=64,
        ffn_dim=1408, expert_ffn_dim=512, shared_expert_ffn_dim=512, sliding_window=128, max_seq_len=2048),
    # Apertus' layout, small: per-head q/k norms, an MLP of xIELU (learned scalars per layer), not gated, 5.25x wide.
    "apertus-small": dataclasses.replace(
        PRESETS["llama-125m"], dim=512, n_layers=8, n_heads=8, n_kv_heads=4, ffn_dim=2688, vocab_size=32000,
        max_seq_len=2048, mlp="xielu", qk_norm=True, rope_theta=12e6),
    # Cohere2's (Command R7B's) layout, small: attention beside the MLP on one LayerNorm, three windowed layers with
    # RoPE to one global without, scaled logits.
    "cohere2-small": dataclasses.replace(
        PRESETS["llama-125m"], dim=512, n_layers=8, n_heads=8, n_kv_heads=4, ffn_dim=1408, vocab_size=32000,
        max_seq_len=2048, norm="layernorm", bias=False, parallel_block=True, rope_float32=True,
        rope_tables_rounded=True, sliding_window=512, global_every=4, nope_every=4, logit_divisor=4.0),
    # Gemma 4's layouts, small. E2B's: five windowed layers to one global (wider heads, one kv head, values from k_proj),
    # per-layer embeddings, the last six layers attending to earlier layers' cached keys and values.
    "gemma4-small": dataclasses.replace(
        PRESETS["gemma-4-31b"], vocab_size=32000, dim=512, n_layers=12, n_heads=8, n_kv_heads=4, head_size=64,
        global_head_size=128, global_kv_heads=1, ffn_dim=1408, sliding_window=512, kv_shared_layers=6,
        kv_shared_wide_mlp=True, per_layer_input_size=64, max_seq_len=2048),
    # 26B-A4B's: every layer's dense MLP beside 64 experts, 8 per token.
    "gemma4-moe-small": dataclasses.replace(
        PRESETS["gemma-4-26b-a4b"], vocab_size=32000, dim=512, n_layers=12, n_heads=8, n_kv_heads=4, head_size=64,
        global_head_size=128, global_kv_heads=1, ffn_dim=1408, shared_expert_ffn_dim=1408, n_experts=64,
        expert_ffn_dim=256, sliding_window=512, max_seq_len=2048),
    **PRESETS,
}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
SYNC_EVERY = 8  # temper on a GPU: steps between host reads of the tokens (`generate`'s default there)

Runner = Callable[[torch.Tensor, int], "Timed"]  # (prompts (B, P), new tokens) -> Timed


@dataclasses.dataclass
class Timed:
    """New token ids (B, n), and the clock when the first (burst) and the last of them reached the host."""

    tokens: torch.Tensor
    first: float
    last: float
    first_step: int = 1
    """How many steps had reached the host at `first` (the decode timed is steps first_step .. n - 1)."""


class Clock:
    """Per-step clock readings taken where each side hands its new tokens to the host."""

    def __init__(self, device: torch.device) -> None:
        self.device, self.stamps = device, []

    def tick(self) -> None:
        sync(self.device)
        self.stamps.append(time.perf_counter())


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ---- the two sides ---------------------------------------------------------------------------------


def temper_runner(model: Transformer, device: torch.device, compile: bool) -> Runner:
    """Greedy generation through temper's engine (`stream`, which drives prefill / decode_step), timed at
    each step it yields. On a GPU it reads tokens on the host every `SYNC_EVERY` steps, as `generate`
    does there, so steps arrive in bursts: the clock runs from the end of the first burst to the last."""
    every = SYNC_EVERY if device.type == "cuda" else 1

    def run(prompts: torch.Tensor, n: int) -> Timed:
        clock, out = Clock(device), []
        for step in engine.stream(model, prompts.tolist(), max_new_tokens=n, temperature=0, compile=compile,
                                  sync_every=every):
            clock.tick()
            out.append(step)
        return Timed(torch.tensor(out).T, clock.stamps[min(every, n) - 1], clock.stamps[-1], min(every, n))

    return run


def hf_attention(config: dict[str, Any]) -> str:
    """transformers' SDPA, or its eager attention for the models SDPA cannot serve (capped scores, sinks) or that have
    no attention to serve (Mamba's, which refuse SDPA), by their config.json's keys."""
    eager = config.get("attn_logit_softcapping") or config.get("model_type") in ("gpt_oss", "mamba", "falcon_mamba")
    return "eager" if eager else "sdpa"


def hf_runner(path: Path, device: torch.device, dtype: torch.dtype, compile: bool) -> tuple[Runner, Any]:
    """Greedy generation through transformers' `generate` on the exported checkpoint, timed by a streamer
    (`generate` hands it each step's tokens on the host, a sync it makes every step anyway)."""
    from transformers import AutoModelForCausalLM, CompileConfig
    from transformers.generation.streamers import BaseStreamer

    attention = hf_attention(json.loads((path / "config.json").read_text()))
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, attn_implementation=attention).to(device).eval()
    gen = hf.generation_config
    gen.eos_token_id = gen.pad_token_id = gen.bos_token_id = None  # decode exactly N tokens
    if compile:
        gen.cache_implementation = "static"
        if device.type != "cuda":  # its automatic compile is GPU-only unless told; CUDA graphs need a GPU
            gen.compile_config = CompileConfig(mode="default")
            gen.compile_config._compile_all_devices = True

    class Stamps(BaseStreamer):
        def __init__(self) -> None:
            self.clock, self.prompt_seen = Clock(device), False

        def put(self, value: torch.Tensor) -> None:
            if self.prompt_seen:  # the first put is the prompt
                self.clock.tick()
            self.prompt_seen = True

        def end(self) -> None:
            pass

    @torch.inference_mode()
    def run(prompts: torch.Tensor, n: int) -> Timed:
        stamps = Stamps()
        out = hf.generate(prompts, attention_mask=torch.ones_like(prompts), max_new_tokens=n, min_new_tokens=n,
                          do_sample=False, pad_token_id=0, streamer=stamps)
        return Timed(out[:, prompts.shape[1]:], stamps.clock.stamps[0], stamps.clock.stamps[-1])

    return run, hf


# ---- memory bandwidth (CUDA) -----------------------------------------------------------------------


def measured_bandwidth(device: torch.device, nbytes: int = 1 << 30, iters: int = 20) -> float:
    """Bytes per second of a device-to-device copy of `nbytes` (read + written), timed by CUDA events."""
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        dst.copy_(src)
    end.record()
    torch.cuda.synchronize(device)
    seconds = start.elapsed_time(end) / 1e3
    del src, dst
    torch.cuda.empty_cache()
    return 2 * nbytes * iters / seconds


def step_bytes(model: Transformer, batch: int, context: float, itemsize: int) -> tuple[int, int]:
    """(weight bytes, KV-cache bytes) one decode step reads: every matrix product's weights (the
    embedding lookup reads a row per token, left out) and keys + values of `context` tokens per row.
    A mixture's experts: those the batch's rows choose, E * (1 - (1 - k/E) ** batch) of each layer's E
    when the routing is uniform (k at batch 1)."""
    c = model.cfg
    kv = int(2 * c.n_layers * batch * c.kv_heads * c.head_dim * context * itemsize)
    weights = model.matmul_params()
    if c.n_experts:
        per_expert = sum(p.numel() for p in model.layers[0].mlp.experts[0].parameters())
        chosen = c.n_experts * (1 - (1 - c.experts_per_token / c.n_experts) ** batch)
        weights += round(c.n_layers * per_expert * (chosen - c.experts_per_token))
    return weights * itemsize, kv


# ---- the run ---------------------------------------------------------------------------------------


def agreement(a: torch.Tensor, b: torch.Tensor) -> tuple[int, int]:
    """Tokens equal before each row's first difference, summed over rows; and the total compared."""
    same = 0
    for x, y in zip(a.tolist(), b.tolist(), strict=True):
        for s, t in zip(x, y, strict=False):
            if s != t:
                break
            same += 1
    return same, a.numel()


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shape", default="llama-small", choices=sorted(SHAPES))
    p.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--device", default="auto", help="auto (cuda when available), cpu, cuda, cuda:1, ...")
    p.add_argument("--dtype", default=None, choices=sorted(DTYPES), help="default: bf16 on cuda, fp32 on cpu")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--compile", action="store_true")
    p.add_argument("--json", default="", help="also write the rows to this JSON file")
    p.add_argument("--profile", action="store_true",
                   help="after timing, profile one more run of each side (the same shapes: no new compilation); "
                        "top kernels to stderr, a kernel's calls / --new-tokens being how often one step runs it")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch CPU threads (both sides)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device)
    first = SYNC_EVERY if device.type == "cuda" else 1  # steps that reach the host before temper's clock starts
    if args.new_tokens <= first or args.repeats < 1 or args.prompt_len < 1:
        p.error(f"--new-tokens must be > {first} here, --repeats and --prompt-len >= 1")
    dtype = DTYPES[args.dtype or ("bf16" if device.type == "cuda" else "fp32")]
    # Without long-context RoPE scaling: the context is cut to what the run needs, and transformers
    # rewrites a llama3 scaling whose original context exceeds max_position_embeddings.
    cfg = dataclasses.replace(SHAPES[args.shape], dropout=0.0, rope_scaling=None,
                              max_seq_len=min(SHAPES[args.shape].max_seq_len,
                                              max(2048, args.prompt_len + args.new_tokens)))
    if args.prompt_len + args.new_tokens > cfg.max_seq_len:
        p.error(f"--prompt-len + --new-tokens must fit the context of {cfg.max_seq_len}")

    torch.manual_seed(args.seed)
    with tempfile.TemporaryDirectory() as tmp:
        model = Transformer(cfg).to(dtype)
        save_hf(model, cfg, tmp)
        model = model.to(device).eval()
        hf_run, hf = hf_runner(Path(tmp), device, dtype, args.compile)
    sides: dict[str, Runner] = {"temper": temper_runner(model, device, args.compile), "transformers": hf_run}
    print(f"# {args.shape}: {model.num_params() / 1e6:.1f}M parameters, {cfg.dim}d, {cfg.n_layers} layers, "
          f"{cfg.n_heads} heads, {cfg.kv_heads} kv heads; {device}, {str(dtype).removeprefix('torch.')}, "
          f"prompt {args.prompt_len}, {args.new_tokens} new tokens, compile={args.compile}, "
          f"torch threads {torch.get_num_threads()}", file=sys.stderr)
    bandwidth = measured_bandwidth(device) if device.type == "cuda" else None

    rows: list[dict[str, Any]] = []
    gen = torch.Generator().manual_seed(args.seed)
    N = args.new_tokens
    for batch in args.batch:
        prompts = torch.randint(0, cfg.vocab_size, (batch, args.prompt_len), generator=gen).to(device)
        outputs = {name: run(prompts, N).tokens.cpu() for name, run in sides.items()}  # warm-up (and compilation)
        times: dict[str, list[float]] = {name: [] for name in sides}
        for r in range(args.repeats):
            for name in (list(sides) if r % 2 == 0 else list(sides)[::-1]):
                t = sides[name](prompts, N)
                times[name].append(batch * (N - t.first_step) / (t.last - t.first))
        same, total = agreement(outputs["temper"], outputs["transformers"])
        for name in sides if args.profile else ():
            print_top_kernels(f"{name} batch {batch}, {N} new tokens", functools.partial(sides[name], prompts, N),
                              device.type == "cuda")
        for name in sides:
            row: dict[str, Any] = {
                "shape": args.shape, "batch": batch, "impl": name, "tokens_per_s": statistics.median(times[name]),
                "spread": [min(times[name]), max(times[name])], "device": str(device),
                "dtype": str(dtype).removeprefix("torch."), "prompt_len": args.prompt_len, "new_tokens": N,
                "compile": args.compile, "greedy_agree": same, "greedy_compared": total,
            }
            if bandwidth is not None:
                w, kv = step_bytes(model, batch, args.prompt_len + N / 2, dtype.itemsize)
                bound = batch * bandwidth / (w + kv)
                row |= {"weight_bytes": w, "kv_bytes_per_step": kv, "bandwidth_bytes_per_s": bandwidth,
                        "bandwidth_bound_tokens_per_s": bound, "share_of_bound": row["tokens_per_s"] / bound}
            rows.append(row)
    del hf

    print_table(rows)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2) + "\n")
        print(f"# wrote {args.json}", file=sys.stderr)


def print_table(rows: list[dict[str, Any]]) -> None:
    cuda = "bandwidth_bound_tokens_per_s" in rows[0]
    head = "| shape | batch | temper tok/s | transformers tok/s | temper / transformers | greedy agree |"
    print(head + (" bound tok/s | temper share | transformers share |" if cuda else ""))
    print("|" + "---|" * (9 if cuda else 6))
    by = {(r["shape"], r["batch"], r["impl"]): r for r in rows}
    for shape, batch in dict.fromkeys((r["shape"], r["batch"]) for r in rows):
        t, h = by[shape, batch, "temper"], by[shape, batch, "transformers"]
        line = (f"| {shape} | {batch} | {t['tokens_per_s']:.1f} | {h['tokens_per_s']:.1f} | "
                f"{t['tokens_per_s'] / h['tokens_per_s']:.2f}x | {t['greedy_agree']}/{t['greedy_compared']} |")
        if cuda:
            line += (f" {t['bandwidth_bound_tokens_per_s']:.0f} | {t['share_of_bound']:.0%} | "
                     f"{h['share_of_bound']:.0%} |")
        print(line)


if __name__ == "__main__":
    main()
