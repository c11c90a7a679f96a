"""One GRPO step end to end: `temper grpo` against TRL's `GRPOTrainer`, same model, tokenizer, prompts and settings.

A step: sample G = --n completions of each of --prompts prompts (16 x 8 = 128) with the policy, score
them with rule rewards, turn the rewards into group-relative advantages, and make one optimizer step
of the clipped GRPO loss over those 128 completions (micro-batches of --micro, gradients accumulated).

The two sides, each run as its users run it, in its own subprocess:
- temper: the `temper grpo` recipe itself (`temper.recipes.grpo.main`, full fine-tuning, no held-out
  evaluation, a log line every step). Its step time is the recipe's own `step_time_s` of each step
  in metrics.jsonl: the whole loop iteration (rollouts on the engine with their log-probs, rewards,
  advantages, collation, the recipe's engine-vs-forward log-prob check on the first micro-batch,
  `train_step` with `align.rl.GRPOLoss`, AdamW, the log line); the checkpoint and export after the
  last step are not in it.
- TRL: `GRPOTrainer(model, reward_funcs, GRPOConfig(use_vllm=False, use_cpu=True, bf16=False,
  per_device_train_batch_size=--micro, gradient_accumulation_steps=128 / --micro, num_generations=8,
  ...))`, `train()`. Its generation batch is then the step's 128 completions (`steps_per_generation`
  defaults to the accumulation steps), sampled with transformers' `generate`; generation and
  optimization are aligned, so TRL, like temper, runs no separate forward for the old log-probs. Its
  step time is the wall time between `on_step_end` callbacks (generation, rewards, advantages, the
  accumulated forward / backward passes, the optimizer step, its metrics and logging).

Same on both: the model (Llama-shaped, random weights made once by temper, a Hugging Face directory
with a byte-level BPE trained on the questions and a ChatML template, loaded by temper's `load_hf` and
by `from_pretrained`), float32 on the CPU, dropout off; the prompts (the first --prompts GSM8K test
questions as user messages, rendered with the template on both sides: the script checks the token
ids match), all of them in every step; sampling at temperature 1, no top-k / top-p, at most
--new-tokens tokens, stopping at <|im_end|>; the rewards, both plain Python run on each completion's
text: the evaluation's GSM8K flexible match (temper's rule; TRL calls the same function) plus the share
of digits in the completion (so that random completions' rewards differ and the advantages are not
all zero); advantages (r - group mean) / (group std + 1e-4); loss --loss-type (TRL's default "dapo"),
epsilon 0.2, beta 0 (no reference model); AdamW, lr 1e-6 constant, no weight decay, gradient
clipping at 1.0.

Timed: --warmup steps, then --steps steps per run; --repeats runs per side, alternating; the table
gives the median seconds per timed step and TRL / temper. It also prints each side's mean reward
and completion length over its steps (samples of the same policy: close, not equal).

    python benchmarks/grpo_step.py                       # dim 256, 4 layers, 16 prompts x 8, 64 tokens
    python benchmarks/grpo_step.py --repeats 3 --steps 3 --json grpo.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from rollout_throughput import (  # noqa: E402
    SHAPE,
    TOKENIZER_RECORDS,
    add_model_args,
    chat_tokenizer,
    model_config,
    questions,
    write_checkpoint,
)

from temper.align.rewards import gsm8k_flexible  # noqa: E402

HERE = Path(__file__).resolve()


def digit_share(prompt, response: str, reference: str | None = None) -> float:
    """Share of the response's characters that are digits: a rule reward that differs between random completions."""
    return sum(c.isdigit() for c in response) / max(len(response), 1)


# ---- the children -------------------------------------------------------------------------------------


def run_temper(a: argparse.Namespace, work: Path) -> dict:
    """`temper grpo` for warmup + steps steps; each step's time is its metrics' step_time_s."""
    from temper.recipes import grpo

    name = f"temper-{time.monotonic_ns()}"
    argv = [f"--model={work / 'model'}", f"--data.prompts=[{work / 'prompts.jsonl'}]",
            f"--rewards=[{{rule: gsm8k_flexible}}, {{function: '{HERE}:digit_share'}}]", "--method=full",
            f"--rollout.n={a.n}", f"--rollout.max_new_tokens={a.new_tokens}", "--rollout.temperature=1.0",
            f"--train.prompts_per_step={a.prompts}", f"--train.micro_batch_size={a.micro}",
            f"--train.steps={a.warmup + a.steps}", f"--loss.loss_type={a.loss_type}", "--loss.beta=0",
            "--optim.lr=1e-6", "--optim.weight_decay=0", "--schedule.kind=constant", "--schedule.warmup_steps=0",
            "--train.grad_clip=1.0", "--eval.val_fraction=0", "--eval.every=0", "--checkpoint.every=0",
            "--log.every=1", "--log.progress=false", "--run.device=cpu", f"--run.dir={work / 'runs'}",
            f"--run.name={name}", "--run.seed=0"]
    code = grpo.main(argv)
    if code:
        raise RuntimeError(f"temper grpo exited {code}")
    lines = [json.loads(ln) for ln in (work / "runs" / name / "metrics.jsonl").read_text().splitlines() if ln.strip()]
    train = [m for m in lines if "step_time_s" in m]
    return {"times": [m["step_time_s"] for m in train],
            "reward": [m["reward"] for m in train], "completion_length": [m["completion_length"] for m in train]}


def trl_reward(fn):
    """A temper reward function f(prompt, response, answer) as TRL calls a reward function."""
    def reward(prompts, completions, answer, **kw):
        return [fn(p, c[0]["content"], r) for p, c, r in zip(prompts, completions, answer, strict=True)]

    reward.__name__ = fn.__name__
    return reward


def run_trl(a: argparse.Namespace, work: Path) -> dict:
    """TRL's GRPOTrainer as its users run it, on the same checkpoint, prompts and settings."""
    import datasets
    import transformers
    from trl import GRPOConfig, GRPOTrainer

    transformers.logging.set_verbosity_error()
    records = [json.loads(ln) for ln in (work / "prompts.jsonl").read_text().splitlines()]
    data = datasets.Dataset.from_dict({"prompt": [[{"role": "user", "content": r["question"]}] for r in records],
                                       "answer": [r["answer"] for r in records]})
    tok = transformers.AutoTokenizer.from_pretrained(work / "model")
    mine = tok.apply_chat_template(data[0]["prompt"], add_generation_prompt=True, tokenize=True, return_dict=True)
    if list(mine["input_ids"]) != json.loads((work / "prompt0.json").read_text()):
        raise RuntimeError("transformers' rendering of the first prompt differs from temper's token ids")
    model = transformers.AutoModelForCausalLM.from_pretrained(work / "model", dtype=torch.float32)
    total = a.prompts * a.n
    args = GRPOConfig(
        output_dir=str(work / "trl"), max_steps=a.warmup + a.steps, per_device_train_batch_size=a.micro,
        gradient_accumulation_steps=total // a.micro, num_generations=a.n, max_completion_length=a.new_tokens,
        temperature=1.0, top_p=1.0, top_k=0, beta=0.0, loss_type=a.loss_type, epsilon=0.2, scale_rewards="group",
        learning_rate=1e-6, lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0, max_grad_norm=1.0,
        use_vllm=False, use_cpu=True, bf16=False, fp16=False, disable_dropout=True, shuffle_dataset=False,
        logging_steps=1, save_strategy="no", eval_strategy="no", report_to="none", dataloader_num_workers=0,
        seed=0)

    class Clock(transformers.TrainerCallback):
        def __init__(self):
            self.times, self.logs, self.t = [], [], 0.0

        def on_train_begin(self, *args, **kw):
            self.t = time.perf_counter()

        def on_step_end(self, *args, **kw):
            now = time.perf_counter()
            self.times.append(now - self.t)
            self.t = now

        def on_log(self, args, state, control, logs=None, **kw):
            if logs and "reward" in logs:
                self.logs.append(logs)

    clock = Clock()
    trainer = GRPOTrainer(model=model, reward_funcs=[trl_reward(gsm8k_flexible), trl_reward(digit_share)], args=args,
                          train_dataset=data, processing_class=tok, callbacks=[clock])
    trainer.train()
    return {"times": clock.times, "reward": [m["reward"] for m in clock.logs],
            "completion_length": [m["completions/mean_length"] for m in clock.logs]}


def child(a: argparse.Namespace) -> None:
    if a.threads:
        torch.set_num_threads(a.threads)
    out = (run_temper if a.child == "temper" else run_trl)(a, Path(a.work))
    print("RESULT " + json.dumps(out), flush=True)


# ---- the parent ---------------------------------------------------------------------------------------


def prepare(a: argparse.Namespace, work: Path) -> tuple[str, str, int]:
    """The prompt file, the first prompt's token ids and the checkpoint, written once for both sides."""
    records, source = questions(a.data, max(a.prompts, TOKENIZER_RECORDS))
    tok = chat_tokenizer([r["question"] + "\n" + r["answer"] for r in records], a.vocab)
    mine = records[:a.prompts]
    (work / "prompts.jsonl").write_text("".join(json.dumps(r) + "\n" for r in mine))
    ids = [tok.encode_chat([{"role": "user", "content": r["question"]}], add_generation_prompt=True) for r in mine]
    (work / "prompt0.json").write_text(json.dumps(ids[0]))
    cfg = model_config(a, tok.tokenizer.get_vocab_size(), max(map(len, ids)) + a.new_tokens)
    model = write_checkpoint(cfg, tok, work / "model")
    shape = (f"dim {cfg.dim}, {cfg.n_layers} layers, {cfg.n_heads}/{cfg.n_kv_heads} heads, ffn {cfg.ffn_dim}, vocab "
             f"{cfg.vocab_size} ({model.num_params() / 1e6:.1f}M parameters)")
    return shape, f"{source}, {a.prompts} prompts of {min(map(len, ids))}-{max(map(len, ids))} tokens", cfg.vocab_size


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(p, **SHAPE)
    p.add_argument("--prompts", type=int, default=16, help="prompts per step")
    p.add_argument("--n", type=int, default=8, help="completions per prompt (the group size G)")
    p.add_argument("--new-tokens", type=int, default=64, help="max completion length")
    p.add_argument("--micro", type=int, default=16, help="completions per forward / backward pass")
    p.add_argument("--loss-type", default="dapo", choices=["grpo", "dapo", "dr_grpo"])
    p.add_argument("--warmup", type=int, default=1, help="untimed steps first in each run")
    p.add_argument("--steps", type=int, default=2, help="timed steps per run")
    p.add_argument("--repeats", type=int, default=2, help="alternating runs per side; medians reported")
    p.add_argument("--threads", type=int, default=0, help="torch threads in each side (0: torch's default)")
    p.add_argument("--json", default="", help="also write the results to this file")
    p.add_argument("--child", choices=["temper", "trl"], help=argparse.SUPPRESS)
    p.add_argument("--work", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.child:
        child(a)
        return 0
    if min(a.prompts, a.new_tokens, a.micro, a.warmup, a.steps, a.repeats) < 1 or a.n < 2:
        p.error("--prompts, --new-tokens, --micro, --warmup, --steps, --repeats must be >= 1 and --n >= 2")
    if (a.prompts * a.n) % a.micro:
        p.error(f"--micro must divide the step's {a.prompts * a.n} completions")

    runs: dict[str, list[dict]] = {"temper": [], "trl": []}
    failed: dict[str, str] = {}
    with tempfile.TemporaryDirectory(prefix="grpo-bench-") as tmp:
        work = Path(tmp)
        shape, data, _ = prepare(a, work)
        for r in range(a.repeats):
            for side in (("trl", "temper") if r % 2 == 0 else ("temper", "trl")):
                if side in failed:
                    continue
                cmd = [sys.executable, str(HERE), "--child", side, "--work", str(work),
                       *(sys.argv[1:] if argv is None else argv)]
                out = subprocess.run(cmd, capture_output=True, text=True)
                lines = [ln for ln in out.stdout.splitlines() if ln.startswith("RESULT ")]
                if out.returncode or not lines:
                    failed[side] = (out.stderr.strip().splitlines() or ["no output"])[-1][:300]
                    print(f"# {side}: {failed[side]}", file=sys.stderr, flush=True)
                    continue
                res = json.loads(lines[-1].removeprefix("RESULT "))
                res["step_s"] = statistics.mean(res["times"][a.warmup:])
                runs[side].append(res)
                print(f"# repeat {r} {side}: {res['step_s']:.2f} s per step (steps: "
                      f"{', '.join(f'{t:.2f}' for t in res['times'])})", file=sys.stderr, flush=True)

    print(f"model: {shape}, fp32, CPU, {a.threads or torch.get_num_threads()} threads; data: {data}; {a.prompts} prompts x G={a.n} "
          f"completions of <= {a.new_tokens} tokens per step, micro-batches of {a.micro}, loss {a.loss_type}, beta 0; "
          f"{a.steps} timed steps after {a.warmup} warm-up, median of {a.repeats} alternating runs per side\n")
    print("| impl | s per step (median) | min-max | vs TRL (speedup) | mean reward | mean completion length |")
    print("|---|---:|---:|---:|---:|---:|")
    rows = {}
    for side in ("trl", "temper"):
        rs = runs[side]
        if not rs:
            print(f"| {side} | failed: {failed.get(side, '?')} | | | | |")
            continue
        steps = [x["step_s"] for x in rs]
        reward = statistics.mean(v for x in rs for v in x["reward"])
        length = statistics.mean(v for x in rs for v in x["completion_length"])
        rows[side] = {"step_s": statistics.median(steps), "runs_step_s": steps, "step_times": [x["times"] for x in rs],
                      "mean_reward": reward, "mean_completion_length": length}
        speed = rows["trl"]["step_s"] / rows[side]["step_s"] if "trl" in rows else None
        rows[side]["speedup_vs_trl"] = speed
        print(f"| {side} | {rows[side]['step_s']:.2f} | {min(steps):.2f}-{max(steps):.2f} | "
              f"{'' if speed is None else f'{speed:.2f}x'} | {reward:.4f} | {length:.1f} |")
    if a.json:
        Path(a.json).write_text(json.dumps({"model": shape, "data": data, "prompts": a.prompts, "n": a.n,
                                            "new_tokens": a.new_tokens, "micro": a.micro, "loss_type": a.loss_type,
                                            "warmup": a.warmup, "steps": a.steps, "rows": rows}, indent=1))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
