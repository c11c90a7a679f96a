"""DPO throughput and memory: temper's DPO step against TRL's `DPOTrainer` on the same model, pairs and batch.

Both sides train the same Llama-shaped model (random weights made once by temper, written as a
Hugging Face checkpoint that temper's `load_hf` and transformers' `from_pretrained` each load) on
the same preference pairs, `--pairs` pairs per optimizer step, in float32 on the CPU, with the
sigmoid DPO loss (beta 0.1), no dropout, AdamW (fused, betas 0.9/0.999, no weight decay) at one
constant learning rate and gradient clipping at 1.0. Methods:
- full: every weight trains; the reference is a frozen second copy of the model on both sides
  (temper's recipe deep-copies it; TRL loads it again from the checkpoint, its default).
- lora: rank `--rank` adapters (alpha 2r, no dropout) on q/k/v/o; the reference is the policy with
  its adapters off on both sides (temper's `adapters_off_reference`, peft's disabled adapter), so
  each holds one copy of the base weights (the `base copies` column counts them). The TRL side
  gets temper's initial adapters (through PEFT's format), so both start from the same weights.

The pairs are hh-rlhf's (`--data`, the harmless-base test split by default): each transcript is
split at the last "Assistant:" turn the two share, tokenized with a byte-level BPE of `--vocab`
tokens trained on them, responses ending in EOS, fitted into `--max-length` by keeping the prompt's
end. Without the file (or with `--data synthetic`) random tokens of similar lengths are used. Step
s takes pairs s*P .. s*P+P-1 on both sides (TRL's sampler is sequential). TRL pads them to the
longest of its 2P rows; temper, as its recipe does (`--layout shared`), collates one row per pair, the
prompt once and both responses behind it (`collate_pairs_shared`: the same log-probs, losses and
gradients, with the prompt computed once), or with `--layout padded` TRL's 2P padded rows. TRL gets the token ids as text of one word per id, read back by a word-level
tokenizer, so its tokenization (in `DPOTrainer.__init__`) yields exactly these ids.

What is timed: `--warmup` steps, then `--steps` steps, each from the end of one optimizer step
to the end of the next (collating the batch, policy and reference forward, backward, clipping,
AdamW; TRL's whole training-loop iteration as shipped: its fused LM head, which projects only the
response positions, its metrics, its default logging every 10 steps, plus a log of the first,
warm-up, step for the checks below). tokens/s
counts the real tokens of every row (a pair's prompt twice, once per response; padding
excluded), the same count on both sides. Each side runs in its own subprocess, the sides
alternating `--repeats` times; the table gives the median tokens/s and the peak resident memory
of the process (VmHWM, which includes the Python libraries each side imports: `after imports` is
that figure before the model loads, `peak - imports` what loading and training added). Loading,
tokenizing and building the trainer are not timed.

Same work: printed for both sides, the first step's mean policy log-probabilities of the chosen and
rejected responses and its gradient norm (same weights, same batch: equal to float32 round-off),
and the second step's loss after one update. That last one agrees to ~1e-5 only: the loss is
log 2 plus a small margin made of differences of ~100-token log-prob sums, whose float32 round-off
(different kernels and padded widths on the two sides) Adam's sign-like first step amplifies.

    python benchmarks/dpo_throughput.py            # dim 512, 8 layers, vocab 8k, 2 pairs of <= 256 tokens a step
    python benchmarks/dpo_throughput.py --methods lora --repeats 5 --json dpo.json
"""

from __future__ import annotations

import argparse
import copy
import gzip
import json
import random
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from temper.model.config import PRESETS, ModelConfig
from temper.model.lora import ATTENTION_TARGETS

HH_RLHF = Path(__file__).resolve().parents[2] / "shared/data/hh-rlhf/harmless-base/test.jsonl.gz"
PAD, EOS = 0, 1  # token ids of "<pad>" and "</s>" in both tokenizers
ASSISTANT = "\n\nAssistant:"


def rss_gib() -> float:
    """Peak resident memory of this process so far: Linux's VmHWM, the high-water mark of this program's
    own memory (`ru_maxrss` would start at the launching parent's peak: Linux carries it across exec)."""
    try:
        with open("/proc/self/status") as f:
            return next(int(ln.split()[1]) for ln in f if ln.startswith("VmHWM:")) * 1024 / 2**30
    except (OSError, StopIteration):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 2**30 / (2**10 if sys.platform == "darwin" else 1)


def model_config(a: argparse.Namespace) -> ModelConfig:
    return replace(PRESETS["debug-llama"], dim=a.dim, n_layers=a.layers, n_heads=a.heads, n_kv_heads=a.kv_heads,
                   ffn_dim=a.ffn, vocab_size=a.vocab, max_seq_len=a.max_length, tie_embeddings=False, dropout=0.0)


# ---- the pairs ------------------------------------------------------------------------------------


def hh_rlhf_pairs(path: Path, vocab: int) -> list[tuple[list[int], list[int], list[int]]]:
    """(prompt, chosen, rejected) ids of every hh-rlhf record, by a BPE of `vocab` tokens trained on them."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    with gzip.open(path, "rt", encoding="utf-8") as f:
        records = [json.loads(line) for line in f if line.strip()]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.train_from_iterator((r["chosen"] + r["rejected"] for r in records), trainers.BpeTrainer(
        vocab_size=vocab, special_tokens=["<pad>", "</s>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False))
    out = []
    for r in records:
        c, j = r["chosen"], r["rejected"]
        common = next((i for i, (x, y) in enumerate(zip(c, j)) if x != y), min(len(c), len(j)))
        cut = c.rfind(ASSISTANT, 0, common)
        if cut < 0:
            continue
        cut += len(ASSISTANT)
        ids = [tok.encode(s).ids for s in (c[:cut], c[cut:], j[cut:])]
        out.append((ids[0], ids[1] + [EOS], ids[2] + [EOS]))
    return out


def synthetic_pairs(n: int, vocab: int, seed: int) -> list[tuple[list[int], list[int], list[int]]]:
    """Random tokens of hh-rlhf-like lengths (prompt 32-224, responses 16-96 tokens)."""
    rng = np.random.default_rng(seed)

    def ids(lo: int, hi: int) -> list[int]:
        return rng.integers(EOS + 1, vocab, int(rng.integers(lo, hi))).tolist()

    return [(ids(32, 224), ids(16, 96) + [EOS], ids(16, 96) + [EOS]) for _ in range(n)]


def fit(prompt: list[int], chosen: list[int], rejected: list[int], max_length: int) -> tuple[list, list, list]:
    """Responses cut to half of max_length (still ending in EOS: TRL would append one), then the prompt's
    end kept so that both rows fit."""
    half = max_length // 2
    chosen, rejected = (r if len(r) <= half else r[:half - 1] + [EOS] for r in (chosen, rejected))
    keep = max_length - max(len(chosen), len(rejected))
    return prompt[-keep:], chosen, rejected


def make_pairs(a: argparse.Namespace, n: int) -> tuple[list, str]:
    path = None if a.data == "synthetic" else Path(a.data or HH_RLHF)
    if path is not None and path.exists():
        pool, source = hh_rlhf_pairs(path, a.vocab), f"hh-rlhf ({path.name}, BPE {a.vocab})"
        random.Random(0).shuffle(pool)
    else:
        if a.data not in ("", "synthetic"):
            raise SystemExit(f"--data {a.data}: no such file")
        pool, source = synthetic_pairs(n, a.vocab, 0), "synthetic random tokens"
    pool = [fit(*p, a.max_length) for p in pool]
    return (pool * (n // len(pool) + 1))[:n], source


def step_tokens(pairs: list, per_step: int) -> tuple[list[int], list[int]]:
    """(real tokens, padded positions) of every step's 2P rows."""
    real, padded = [], []
    for s in range(0, len(pairs), per_step):
        rows = [len(p) + len(r) for p, c, j in pairs[s:s + per_step] for r in (c, j)]
        real.append(sum(rows))
        padded.append(len(rows) * max(rows))
    return real, padded


def shared_positions(pairs: list, a: argparse.Namespace) -> int:
    """Positions (padding included) of temper's batches in the layout it runs."""
    if a.layout == "padded":
        return sum(step_tokens(pairs, a.pairs)[1])
    # one row per pair: prompt, then both responses, each behind a copy of the prompt's last token
    rows = [len(p) + len(c) + len(r) + 1 for p, c, r in pairs]
    return sum(len(rows[s:s + a.pairs]) * max(rows[s:s + a.pairs]) for s in range(0, len(rows), a.pairs))


# ---- the sides ------------------------------------------------------------------------------------


def held_bytes(models: list) -> tuple[int, int, int]:
    """(bytes of every parameter storage the models hold, each counted once; bytes of the adapters;
    bytes of the policy's base weights): the base copies held are (held - adapters) / base."""
    seen, held, adapters = set(), 0, 0
    for m in models:
        for name, p in m.named_parameters():
            s = p.untyped_storage()
            if s.data_ptr() in seen:
                continue
            seen.add(s.data_ptr())
            held += s.nbytes()
            adapters += s.nbytes() if "lora" in name else 0
    base = sum(p.numel() * p.element_size() for n, p in models[0].named_parameters() if "lora" not in n)
    return held, adapters, base


def lora_config(rank: int):
    from temper.train.methods import LoRAConfig

    return LoRAConfig(rank=rank, alpha=2.0 * rank, dropout=0.0, targets=list(ATTENTION_TARGETS))


def temper_lora(model: torch.nn.Module, rank: int) -> None:
    """temper's LoRA as the recipe applies it, from a fixed seed: the same adapters in every process."""
    from temper.train.methods import apply_method

    torch.manual_seed(1)
    apply_method(model, "lora", lora_config(rank))


def run_temper(a: argparse.Namespace, work: Path, pairs: list) -> dict:
    """temper's DPO recipe's pieces: load_hf, apply_method, the reference, PreferenceLoss, collate_pairs, train_step."""
    from temper.align.preference import PreferenceLoss, adapters_off_reference, as_batch, frozen_reference
    from temper.data.prefs import PrefExample, collate_pairs, collate_pairs_shared
    from temper.model.hf.checkpoint import load_hf
    from temper.train.optim import OptimConfig, build_optimizer
    from temper.train.step import train_step

    rss_import = rss_gib()
    model, _ = load_hf(work / "base", dtype=torch.float32)
    if a.method == "full":
        reference, models = frozen_reference(ref := copy.deepcopy(model)), [model, ref]
    else:
        temper_lora(model, a.rank)
        reference, models = adapters_off_reference(model), [model]
    model.train()
    loss_fn = PreferenceLoss("sigmoid", beta=a.beta, reference=reference)
    opt = build_optimizer(model, OptimConfig(lr=a.lr, weight_decay=0.0, beta2=0.999), "cpu")

    def example(p: list, c: list, r: list) -> PrefExample:
        arr = lambda x: np.asarray(x, dtype=np.int32)  # noqa: E731
        return PrefExample(arr(p), arr(c), arr(r), np.ones(len(c), bool), np.ones(len(r), bool), "bench")

    examples = [example(*p) for p in pairs]
    collate = collate_pairs_shared if a.layout == "shared" else collate_pairs
    rss_built = rss_gib()
    times, checks = [], {}
    t = time.perf_counter()
    for s in range(a.warmup + a.steps):
        b = collate(examples[s * a.pairs:(s + 1) * a.pairs], pad_id=PAD)
        res = train_step(model, opt, [as_batch(b, "cpu")], step=s, loss_fn=loss_fn)
        now = time.perf_counter()
        times.append(now - t)
        t = now
        if s == 0:
            checks |= {"logps_chosen": res.metrics["logps/chosen"], "logps_rejected": res.metrics["logps/rejected"],
                       "grad_norm": res.grad_norm}
        if s == 1:
            checks["loss_step2"] = res.loss
    held, adapters, base = held_bytes(models)
    return {"times": times, "checks": checks, "rss_import": rss_import, "rss_built": rss_built, "held": held,
            "adapters": adapters, "base": base}


def word_tokenizer(vocab: int):
    """A transformers tokenizer whose word "t<i>" is id i ("<pad>" 0, "</s>" 1): TRL tokenizes the
    pairs' text back to exactly the benchmark's ids."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = {"<pad>": PAD, "</s>": EOS} | {f"t{i}": i for i in range(EOS + 1, vocab)}
    tok = Tokenizer(models.WordLevel(words, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>")


def as_text(ids: list[int]) -> str:
    return " ".join("</s>" if i == EOS else f"t{i}" for i in ids)


def run_trl(a: argparse.Namespace, work: Path, pairs: list) -> dict:
    """TRL's DPOTrainer as its users run it, on the checkpoint's weights (and temper's initial adapters)."""
    import datasets
    import transformers
    from trl import DPOConfig, DPOTrainer

    rss_import = rss_gib()
    model = transformers.AutoModelForCausalLM.from_pretrained(work / "base", dtype=torch.float32)
    peft_config = None
    if a.method == "lora":
        import peft

        peft_config = peft.LoraConfig(r=a.rank, lora_alpha=2 * a.rank, lora_dropout=0.0,
                                      target_modules=list(ATTENTION_TARGETS), task_type="CAUSAL_LM")
    # Responses end in "</s>", so TRL appends no EOS; the prompt's trailing space keeps the words apart.
    data = datasets.Dataset.from_dict({"prompt": [as_text(p) + " " for p, _, _ in pairs],
                                       "chosen": [as_text(c) for _, c, _ in pairs],
                                       "rejected": [as_text(r) for _, _, r in pairs]})
    args = DPOConfig(
        output_dir=str(work / f"trl-{a.method}"), max_steps=a.warmup + a.steps, per_device_train_batch_size=a.pairs,
        gradient_accumulation_steps=1, learning_rate=a.lr, lr_scheduler_type="constant", weight_decay=0.0,
        max_grad_norm=1.0, beta=a.beta, loss_type=["sigmoid"], use_cpu=True, bf16=False, fp16=False,
        gradient_checkpointing=False, dataloader_num_workers=0, precompute_ref_log_probs=False, max_length=None,
        train_sampling_strategy="sequential", logging_first_step=True, save_strategy="no", eval_strategy="no", report_to="none", seed=0)

    class Clock(transformers.TrainerCallback):
        """Each step's wall time, and the first steps' numbers for the same-work check."""

        def __init__(self):
            self.times, self.checks, self.trainer, self.t = [], {}, None, 0.0

        def on_train_begin(self, *args, **kw):
            self.t = time.perf_counter()

        def on_step_end(self, *args, **kw):
            now = time.perf_counter()
            self.times.append(now - self.t)
            self.t = now
            m = self.trainer._metrics["train"]  # this step's entries are the last ones
            if len(self.times) == 1:
                self.checks |= {"logps_chosen": m["logps/chosen"][-1], "logps_rejected": m["logps/rejected"][-1]}

        def on_log(self, args, state, control, logs=None, **kw):
            if state.global_step == 1:  # logging_first_step: in the warm-up, not timed
                self.checks["grad_norm"] = logs["grad_norm"]

    class Trainer(DPOTrainer):
        """DPOTrainer, keeping the loss of its second step (a detached tensor: no extra work)."""

        losses: list = []

        def compute_loss(self, *args, **kw):
            loss = super().compute_loss(*args, **kw)
            if len(self.losses) < 2:
                self.losses.append((loss[0] if isinstance(loss, tuple) else loss).detach().clone())
            return loss

    clock = Clock()
    trainer = Trainer(model=model, args=args, train_dataset=data, processing_class=word_tokenizer(a.vocab),
                      peft_config=peft_config, callbacks=[clock])
    clock.trainer = trainer
    if a.method == "lora":  # temper's initial adapters, through PEFT's format: the same starting weights
        from safetensors.torch import load_file

        peft.set_peft_model_state_dict(trainer.model, load_file(work / "adapter/adapter_model.safetensors"))
    trainer.losses = []
    first = trainer.train_dataset[0]
    if first["prompt_ids"] + first["chosen_ids"] != pairs[0][0] + pairs[0][1]:
        raise RuntimeError("TRL's tokenization of the first pair differs from the benchmark's ids")
    models = [trainer.model] + ([trainer.ref_model] if trainer.ref_model is not None else [])
    if a.method == "full" and trainer.ref_model is None:
        raise RuntimeError("TRL built no reference model")
    rss_built = rss_gib()
    trainer.train()
    clock.checks["loss_step2"] = float(trainer.losses[1])
    held, adapters, base = held_bytes(models)
    return {"times": clock.times, "checks": clock.checks, "rss_import": rss_import, "rss_built": rss_built,
            "held": held, "adapters": adapters, "base": base}


def child(a: argparse.Namespace) -> None:
    if a.threads:
        torch.set_num_threads(a.threads)
    work = Path(a.work)
    pairs = json.loads((work / "pairs.json").read_text())
    out = (run_temper if a.child == "temper" else run_trl)(a, work, pairs)
    out["peak_rss"] = rss_gib()
    print("RESULT " + json.dumps(out), flush=True)


# ---- the parent -----------------------------------------------------------------------------------


def prepare(a: argparse.Namespace, work: Path, n_pairs: int) -> tuple[list, str]:
    """The pairs, the base checkpoint and (for lora) temper's initial adapters in PEFT's format, written once."""
    from temper.model.hf.checkpoint import save_hf
    from temper.model.hf.peft import save_peft
    from temper.model.transformer import Transformer

    pairs, source = make_pairs(a, n_pairs)
    (work / "pairs.json").write_text(json.dumps(pairs))
    cfg = model_config(a)
    torch.manual_seed(0)
    model = Transformer(cfg)
    save_hf(model, cfg, work / "base", generation_config={"eos_token_id": EOS, "pad_token_id": PAD})
    if "lora" in a.methods:
        temper_lora(model, a.rank)
        save_peft(model, cfg, work / "adapter")
    return pairs, source


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--methods", nargs="+", default=["full", "lora"], choices=["full", "lora"])
    p.add_argument("--data", default="", help="hh-rlhf .jsonl.gz (default: ../shared's harmless-base test), or synthetic")
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--kv-heads", type=int, default=4)
    p.add_argument("--ffn", type=int, default=1536)
    p.add_argument("--vocab", type=int, default=8192)
    p.add_argument("--max-length", type=int, default=256, help="tokens of a row (prompt + response)")
    p.add_argument("--pairs", type=int, default=2, help="pairs per optimizer step (2x rows)")
    p.add_argument("--layout", choices=["shared", "padded"], default="shared",
                   help="temper's batch: one row per pair, its prompt once (the recipe's), or 2P padded rows")
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--beta", type=float, default=0.1)
    p.add_argument("--lr", type=float, default=1e-5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--steps", type=int, default=5, help="timed steps per run")
    p.add_argument("--repeats", type=int, default=3, help="alternating runs per side; medians reported")
    p.add_argument("--threads", type=int, default=0, help="torch threads in each side (0: torch's default)")
    p.add_argument("--json", help="also write the rows to this file")
    p.add_argument("--child", choices=["temper", "trl"], help=argparse.SUPPRESS)
    p.add_argument("--method", choices=["full", "lora"], help=argparse.SUPPRESS)
    p.add_argument("--work", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.warmup < 1 or a.steps < 1:
        p.error("--warmup and --steps must be >= 1 (the checks read the first two steps)")
    if a.child:
        child(a)
        return 0

    n_steps = a.warmup + a.steps
    with tempfile.TemporaryDirectory(prefix="dpo-bench-") as tmp:
        work = Path(tmp)
        pairs, source = prepare(a, work, a.pairs * n_steps)
        real, padded = step_tokens(pairs, a.pairs)
        timed_tokens = sum(real[a.warmup:])
        runs: dict[tuple[str, str], list[dict]] = {(m, s): [] for m in a.methods for s in ("trl", "temper")}
        failed: dict[tuple[str, str], str] = {}
        for r in range(a.repeats):
            for m in a.methods:
                for side in (("trl", "temper") if r % 2 == 0 else ("temper", "trl")):
                    if (m, side) in failed:
                        continue
                    cmd = [sys.executable, __file__, "--child", side, "--method", m, "--work", str(work),
                           *(sys.argv[1:] if argv is None else argv)]
                    out = subprocess.run(cmd, capture_output=True, text=True)
                    lines = [ln for ln in out.stdout.splitlines() if ln.startswith("RESULT ")]
                    if out.returncode or not lines:
                        failed[(m, side)] = (out.stderr.strip().splitlines() or ["no output"])[-1][:300]
                        print(f"# {m} {side}: {failed[(m, side)]}", file=sys.stderr, flush=True)
                        continue
                    res = json.loads(lines[-1].removeprefix("RESULT "))
                    res["tokens_per_s"] = timed_tokens / sum(res["times"][a.warmup:])
                    runs[(m, side)].append(res)
                    print(f"# repeat {r} {m} {side}: {res['tokens_per_s']:,.0f} tokens/s, peak RSS "
                          f"{res['peak_rss']:.2f} GiB", file=sys.stderr, flush=True)
    cfg = model_config(a)
    n_params = sum(np.prod(s) for s in _param_shapes(cfg))
    print(f"model: dim {cfg.dim}, {cfg.n_layers} layers, {cfg.n_heads}/{cfg.n_kv_heads} heads, ffn {cfg.ffn_dim}, "
          f"vocab {cfg.vocab_size} ({n_params / 1e6:.1f}M parameters), fp32, CPU, {a.threads or torch.get_num_threads()} threads; "
          f"data: {source}, {a.pairs} pairs per step, max length {a.max_length}; {statistics.mean(real):,.0f} real "
          f"tokens per step ({1 - sum(real) / sum(padded):.0%} of the padded positions are padding; temper's "
          f"{a.layout} layout computes {shared_positions(pairs, a) / sum(padded):.0%} of the padded positions); sigmoid DPO, "
          f"beta {a.beta}, lr {a.lr}; LoRA r={a.rank} alpha {2 * a.rank} on q/k/v/o; {a.steps} timed steps after "
          f"{a.warmup} warm-up, median of {a.repeats} alternating runs\n")
    print("| method | impl | tokens/s (median) | min-max | peak RSS GiB | after imports GiB | peak - imports GiB "
          "| parameters held GiB | base copies | tokens/s vs TRL | peak RSS vs TRL |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    rows, checks = [], []
    for m in a.methods:
        medians = {}
        for side in ("trl", "temper"):
            rs = runs[(m, side)]
            if not rs:
                print(f"| {m} | {side} | failed: {failed.get((m, side), '?')} | | | | | | | | |")
                rows.append({"method": m, "impl": side, "error": failed.get((m, side), "?")})
                continue
            tps = [x["tokens_per_s"] for x in rs]
            peak = max(x["peak_rss"] for x in rs)
            medians[side] = (statistics.median(tps), peak)
            held, adapters, base = rs[0]["held"], rs[0]["adapters"], rs[0]["base"]
            copies = (held - adapters) / base
            speed = mem = None
            if side == "temper" and "trl" in medians:
                speed, mem = medians["temper"][0] / medians["trl"][0], peak / medians["trl"][1]
            rows.append({"method": m, "impl": side, "tokens_per_s": medians[side][0], "tokens_per_s_runs": tps,
                         "peak_rss_gib": peak, "rss_after_imports_gib": rs[0]["rss_import"],
                         "rss_after_build_gib": rs[0]["rss_built"], "params_held_gib": held / 2**30,
                         "base_copies": copies, "speed_vs_trl": speed, "peak_rss_vs_trl": mem, "checks": rs[0]["checks"],
                         "step_seconds": [x["times"] for x in rs]})
            print(f"| {m} | {side} | {medians[side][0]:,.0f} | {min(tps):,.0f}-{max(tps):,.0f} | {peak:.2f} "
                  f"| {rs[0]['rss_import']:.2f} | {peak - rs[0]['rss_import']:.2f} | {held / 2**30:.3f} | {copies:.2f} "
                  f"| {'' if speed is None else f'{speed:.2f}x'} | {'' if mem is None else f'{mem:.2f}x'} |")
        if runs[(m, "trl")] and runs[(m, "temper")]:
            checks.append((m, runs[(m, "trl")][0]["checks"], runs[(m, "temper")][0]["checks"]))
    print("\nsame work: the first step's mean policy log-probs of the chosen and rejected responses and its gradient "
          "norm; the second step's loss (float32 round-off in ~100-token log-prob sums, amplified by Adam's first "
          "step, leaves ~1e-5 there):")
    for m, theirs, ours in checks:
        parts = [f"{k} TRL {theirs[k]:.6f} temper {ours[k]:.6f} (diff {abs(theirs[k] - ours[k]):.1e})"
                 for k in ("logps_chosen", "logps_rejected", "grad_norm", "loss_step2")]
        print(f"- {m}: " + "; ".join(parts))
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"model": {"dim": cfg.dim, "layers": cfg.n_layers, "heads": cfg.n_heads,
                                 "kv_heads": cfg.n_kv_heads, "ffn": cfg.ffn_dim, "vocab": cfg.vocab_size},
                       "data": source, "pairs_per_step": a.pairs, "max_length": a.max_length,
                       "real_tokens_per_step": real, "padded_positions_per_step": padded, "rank": a.rank,
                       "warmup": a.warmup, "steps": a.steps, "repeats": a.repeats, "rows": rows}, f, indent=1)
    return 1 if failed else 0


def _param_shapes(cfg: ModelConfig) -> list[tuple[int, ...]]:
    from temper.model.transformer import Transformer

    with torch.device("meta"):
        return [tuple(p.shape) for p in Transformer(cfg).parameters()]


if __name__ == "__main__":
    sys.exit(main())
