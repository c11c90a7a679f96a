"""Server throughput: `temper serve` with 1, 8 and 32 concurrent clients against the same requests sent one
by one to `transformers`' `generate` (issue 16, Performance (a); goal: >= 4x at 32 clients on a CPU).

The model is a preset of `temper.model.config.PRESETS` (default "llama-small", as in
decode_throughput.py: Llama-shaped, dim 512, 8 layers, 32k vocabulary) with random weights, written
with `temper.model.hf.checkpoint.save_hf`; transformers loads that directory (`from_pretrained`, sdpa
attention) and `temper serve` serves it, so both run the same weights in float32 on the CPU. The
tokenizer is a word-level one with a word per id ("w0" ... "wN") and no end-of-text token, so neither
side stops early: every request generates exactly --max-tokens tokens (transformers: min_new_tokens).

The requests: --requests prompts of random token ids, lengths drawn in --prompt-len (no padding on
either side), greedy, --max-tokens each. transformers runs them one after another (`generate` on one
prompt, as a script without a server would). The server runs as its own process (`python -m temper
serve ... --no_auth`, on 127.0.0.1, --slots = the most clients, --max_len = the longest request) and
the clients are the official `openai` client (`AsyncOpenAI`), at most C requests in flight for each C
of --clients, the prompts sent as token ids to /v1/completions. Each side's throughput is its
generated tokens (the server's from `usage`) over the wall time of the whole set, prefill and HTTP
included; a warm-up request (and one full batch on the server) comes first. Both sides get --threads
CPU threads (the server through OMP_NUM_THREADS). On a shared machine wall time moves with the others'
load, so the table also gives tokens per CPU-second of the generating process (the server's from
/proc, its HTTP work included).

Agreement: each completion's text is compared with transformers' tokens decoded the same way (random
float32 weights can tip a near-tie when the batch changes the kernels' summation order, so it is
reported, not asserted).

    python benchmarks/serve_throughput.py                      # llama-small, 32 requests x 64 tokens
    python benchmarks/serve_throughput.py --clients 1,8,32 --requests 64 --threads 2 --json out.json
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

import torch

from temper.data.tokenizer import HFTokenizer, save_hf_tokenizer
from temper.infer.text import completion_text
from temper.model.config import PRESETS, ModelConfig
from temper.model.hf.checkpoint import save_hf
from temper.model.transformer import Transformer

SHAPES: dict[str, ModelConfig] = {
    "llama-small": dataclasses.replace(PRESETS["llama-125m"], dim=512, n_layers=8, n_heads=8, n_kv_heads=4,
                                       ffn_dim=1408, max_seq_len=2048),
    **PRESETS,
}
NAME = "bench"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--shape", default="llama-small", choices=sorted(SHAPES), help="model shape (random weights)")
    p.add_argument("--vocab", type=int, default=32000, help="vocabulary size (the head's cost)")
    p.add_argument("--requests", type=int, default=32, help="requests in the set every run sends")
    p.add_argument("--prompt-len", default="16,64", help="prompt lengths, drawn uniformly in MIN,MAX tokens")
    p.add_argument("--max-tokens", type=int, default=64, help="tokens generated per request (exactly)")
    p.add_argument("--clients", default="1,8,32", help="concurrent clients for each server run")
    p.add_argument("--threads", type=int, default=torch.get_num_threads(), help="CPU threads of each side")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", type=Path, help="also write the rows here")
    args = p.parse_args(argv)
    lo, _, hi = args.prompt_len.partition(",")
    args.prompt_lo, args.prompt_hi = int(lo), int(hi or lo)
    args.client_counts = [int(c) for c in args.clients.split(",")]
    if not 1 <= args.prompt_lo <= args.prompt_hi or args.max_tokens < 1 or args.requests < 1 or \
            min(args.client_counts) < 1 or args.threads < 1:
        p.error("prompt lengths, --max-tokens, --requests, --clients and --threads must be positive (MIN <= MAX)")
    if args.prompt_hi + args.max_tokens > SHAPES[args.shape].max_seq_len:
        p.error(f"the longest prompt plus --max-tokens is over {args.shape}'s context "
                f"({SHAPES[args.shape].max_seq_len})")
    return args


# ---- the checkpoint and the requests ----------------------------------------------------------------


def write_checkpoint(out: Path, shape: str, vocab: int, seed: int) -> None:
    """Random weights of `shape` and a word-level tokenizer with one word per id and no end-of-text token."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    cfg = dataclasses.replace(SHAPES[shape], vocab_size=vocab)
    torch.manual_seed(seed)
    save_hf(Transformer(cfg), cfg, out)
    tok = Tokenizer(models.WordLevel({f"w{i}": i for i in range(vocab)}, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    save_hf_tokenizer(HFTokenizer(tok), out)


def make_prompts(n: int, lo: int, hi: int, vocab: int, seed: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(lo, hi + 1, (n,), generator=g).tolist()
    return [torch.randint(0, vocab, (k,), generator=g).tolist() for k in lengths]


def decode_words(ids: list[int]) -> str:
    """The tokenizer's decode: the words joined by spaces (a word-level model has no decoder)."""
    return " ".join(f"w{i}" for i in ids)


# ---- transformers, one request at a time ------------------------------------------------------------


@dataclasses.dataclass
class Run:
    side: str
    clients: int
    tokens: int
    seconds: float
    latencies: list[float]
    texts: list[str]
    cpu_seconds: float | None = None
    """CPU time the generating process spent (all its threads): less sensitive than wall time to a busy machine."""

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds


@torch.inference_mode()
def run_transformers(path: Path, prompts: list[list[int]], max_tokens: int) -> Run:
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="sdpa").eval()
    gen = hf.generation_config
    gen.eos_token_id = gen.pad_token_id = gen.bos_token_id = None  # decode exactly max_tokens

    def one(ids: list[int]) -> list[int]:
        x = torch.tensor([ids])
        out = hf.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=max_tokens, min_new_tokens=max_tokens,
                          do_sample=False, pad_token_id=0)
        return out[0, len(ids):].tolist()

    one(prompts[0])  # warm-up
    texts, latencies, tokens = [], [], 0
    start, cpu = time.perf_counter(), time.process_time()
    for ids in prompts:
        t = time.perf_counter()
        new = one(ids)
        latencies.append(time.perf_counter() - t)
        tokens += len(new)
        texts.append(completion_text(decode_words, ids, new))
    return Run("transformers generate, one by one", 1, tokens, time.perf_counter() - start, latencies, texts,
               time.process_time() - cpu)


# ---- temper serve, C clients at a time -------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cpu_seconds(pid: int) -> float | None:
    """A process's user + system CPU time from /proc (None where there is no /proc)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime, stime: fields 14, 15


@contextlib.contextmanager
def temper_serve(path: Path, slots: int, queue: int, max_len: int, threads: int):
    """`temper serve` in its own process on 127.0.0.1 (no key: loopback); yields its base URL."""
    port = free_port()
    cmd = [sys.executable, "-m", "temper", "serve", str(path), "--no_auth", "--port", str(port), "--slots", str(slots),
           "--max_queue", str(queue), "--max_len", str(max_len), "--served_model_name", NAME, "--device", "cpu",
           "--log_level", "warning"]
    env = os.environ | {"OMP_NUM_THREADS": str(threads)}
    proc = subprocess.Popen(cmd, env=env, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 300
        while True:
            with contextlib.suppress(OSError):
                if urllib.request.urlopen(f"{url}/health", timeout=2).status == 200:
                    break
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"temper serve did not start: {proc.stderr.read()[-2000:] if proc.stderr else ''}")
            time.sleep(0.1)
        yield url, proc.pid
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


async def send_all(url: str, prompts: list[list[int]], max_tokens: int, clients: int, pid: int) -> Run:
    """Every prompt through /v1/completions with at most `clients` requests in flight (pid: the server's)."""
    import openai

    client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0, timeout=3600)
    gate = asyncio.Semaphore(clients)

    async def one(ids: list[int]) -> tuple[str, int, float]:
        async with gate:
            t = time.perf_counter()
            out = await client.completions.create(model=NAME, prompt=ids, max_tokens=max_tokens, temperature=0)
            return out.choices[0].text, out.usage.completion_tokens, time.perf_counter() - t

    try:
        start, cpu = time.perf_counter(), cpu_seconds(pid)
        done = await asyncio.gather(*(one(ids) for ids in prompts))
        seconds, cpu_end = time.perf_counter() - start, cpu_seconds(pid)
    finally:
        await client.close()
    return Run(f"temper serve, {clients} client{'s' if clients > 1 else ''}", clients, sum(d[1] for d in done),
               seconds, [d[2] for d in done], [d[0] for d in done],
               cpu_end - cpu if cpu is not None and cpu_end is not None else None)


# ---- the table ----------------------------------------------------------------------------------


def rows(base: Run, runs: list[Run]) -> list[dict[str, Any]]:
    out = []
    for r in [base, *runs]:
        same = sum(a == b for a, b in zip(r.texts, base.texts, strict=True))
        out.append({"side": r.side, "clients": r.clients, "requests": len(r.texts), "tokens": r.tokens,
                    "seconds": r.seconds, "tokens_per_s": r.tokens_per_s, "vs_transformers": r.tokens_per_s /
                    base.tokens_per_s, "mean_latency_s": statistics.fmean(r.latencies),
                    "same_text_as_transformers": same, "cpu_seconds": r.cpu_seconds,
                    "tokens_per_cpu_s": r.tokens / r.cpu_seconds if r.cpu_seconds else None})
    return out


def table(rows_: list[dict[str, Any]]) -> str:
    lines = ["| side | requests | tokens | wall s | tokens/s | vs transformers | mean latency s | tokens/CPU-s "
             "| same text |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows_:
        per_cpu = f"{r['tokens_per_cpu_s']:.1f}" if r["tokens_per_cpu_s"] else "-"
        lines.append(f"| {r['side']} | {r['requests']} | {r['tokens']} | {r['seconds']:.2f} | {r['tokens_per_s']:.1f} "
                     f"| {r['vs_transformers']:.2f}x | {r['mean_latency_s']:.2f} | {per_cpu} | "
                     f"{r['same_text_as_transformers']}/{r['requests']} |")
    return "\n".join(lines)


def progress(r: Run) -> None:
    print(f"{r.side}: {r.tokens} tokens in {r.seconds:.1f} s", file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    prompts = make_prompts(args.requests, args.prompt_lo, args.prompt_hi, args.vocab, args.seed)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "ckpt"
        write_checkpoint(path, args.shape, args.vocab, args.seed)
        base = run_transformers(path, prompts, args.max_tokens)
        progress(base)
        slots = max(args.client_counts)
        runs = []
        with temper_serve(path, slots, args.requests, args.prompt_hi + args.max_tokens, args.threads) as (url, pid):
            # warm-up: one request, then a full batch (the server's first steps at every batch size)
            asyncio.run(send_all(url, prompts[:1], args.max_tokens, 1, pid))
            asyncio.run(send_all(url, (prompts * slots)[:slots], 4, slots, pid))
            for c in args.client_counts:
                runs.append(asyncio.run(send_all(url, prompts, args.max_tokens, c, pid)))
                progress(runs[-1])
    out = rows(base, runs)
    print(f"\n{args.shape}, vocab {args.vocab}, fp32 on CPU ({args.threads} threads); {args.requests} requests, "
          f"prompts of {args.prompt_lo}-{args.prompt_hi} tokens, {args.max_tokens} greedy tokens each; "
          f"server --slots {max(args.client_counts)}\n")
    print(table(out))
    if args.json:
        args.json.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "rows": out}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
