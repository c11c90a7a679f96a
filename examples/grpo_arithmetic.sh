#!/usr/bin/env bash
# GRPO with a verifiable reward on CPU (a few minutes): two-digit addition and subtraction, answered with
# the column method before "#### answer" (examples/arithmetic_data.py).
#  1. data: SFT examples, RL prompts and test prompts, three disjoint sets of problems; a character
#     tokenizer with a compact chat template and a randomly initialised tiny Llama (0.8M parameters)
#  2. a brief SFT (full) that teaches the format and gets a minority of answers right
#  3. `temper grpo` (full fine-tuning, KL to the SFT model with beta > 0) with the final_number rule;
#     its held-out prompts (eval.val_fraction of rl.jsonl) are answered greedily at step 0 and after
#  4. greedy accuracy on test.jsonl (never used in training or tuning) of the SFT and the GRPO model;
#     reward, held-out accuracy and KL curves plotted to runs/arith-grpo/grpo_curves.png
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
. .venv/bin/activate
# A model this small runs fastest on one thread, and one thread is not slowed by other busy processes.
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
SFT_STEPS=${SFT_STEPS:-180}
GRPO_STEPS=${GRPO_STEPS:-60}
START=$SECONDS
COMMON=(--log.progress false --run.resume never --checkpoint.every 0)
# 1. data and the untrained model
python examples/arithmetic_data.py data --out data/arithmetic
python examples/arithmetic_data.py init --data data/arithmetic --out runs/arith-init
# 2. SFT: packed rows of 128 tokens, ~2,900 examples seen (about one epoch)
temper sft --model runs/arith-init --method full --data.files=[data/arithmetic/sft.jsonl] --data.max_length 128 \
  --train.micro_batch_size 16 --train.steps "$SFT_STEPS" --optim.lr 3e-3 --schedule.warmup_steps 20 \
  --eval.every 0 --eval.val_fraction 0.02 --log.every 25 --run.name arith-sft "${COMMON[@]}"
SFT_DONE=$SECONDS
# 3. GRPO: 32 prompts x 8 samples a step at temperature 0.8; reward 1 for the right final number
temper grpo --model runs/arith-sft/final --method full --data.prompts=[data/arithmetic/rl.jsonl] \
  --rewards='[{rule: final_number, weight: 1}]' --rollout.n 8 --rollout.max_new_tokens 40 \
  --rollout.temperature 0.8 --train.prompts_per_step 32 --train.micro_batch_size 128 \
  --train.steps "$GRPO_STEPS" --loss.beta 0.04 --optim.lr 2e-4 --eval.every 10 --eval.val_fraction 0.05 \
  --eval.max_prompts 100 --log.every 1 --run.name arith-grpo "${COMMON[@]}"
GRPO_DONE=$SECONDS
# 4. the untouched test set, and the figure
python examples/arithmetic_data.py accuracy --model runs/arith-sft/final --prompts data/arithmetic/test.jsonl \
  --out runs/arith-grpo/test_sft.json
python examples/arithmetic_data.py accuracy --model runs/arith-grpo/final --prompts data/arithmetic/test.jsonl \
  --out runs/arith-grpo/test_grpo.json
echo "wall time: SFT $((SFT_DONE - START)) s (with the data), GRPO $((GRPO_DONE - SFT_DONE)) s, whole example $((SECONDS - START)) s"
python - <<'PY'
import json
import matplotlib
matplotlib.use("Agg")
import matplotlib.pyplot as plt

run = "runs/arith-grpo"
rows = [json.loads(line) for line in open(f"{run}/metrics.jsonl")]
train = [r for r in rows if r.get("kind", "train") == "train"]
val = [r for r in rows if r.get("kind") == "val"]
fig, axes = plt.subplots(1, 2, figsize=(10, 3.5))
axes[0].plot([r["step"] for r in train], [r["reward"] for r in train], ".-", alpha=0.6, label="sampled (T=0.8)")
axes[0].plot([r["step"] for r in val], [r["val_reward/final_number"] for r in val], "o-", label="held-out, greedy")
axes[0].set(xlabel="GRPO step", title="accuracy (final_number reward)")
axes[0].legend()
axes[1].plot([r["step"] for r in train], [r["kl"] for r in train], ".-")
axes[1].set(xlabel="GRPO step", title="KL to the SFT model (k3, per token)")
fig.tight_layout()
fig.savefig(f"{run}/grpo_curves.png", dpi=120)
k = max(1, len(train) // 5)
mean = lambda rs, key: sum(r[key] for r in rs) / len(rs)  # noqa: E731
print(f"held-out accuracy (greedy, {run}'s val prompts): step {val[0]['step']} {val[0]['val_reward/final_number']:.3f}"
      f" -> step {val[-1]['step']} {val[-1]['val_reward/final_number']:.3f}")
print(f"sampled reward: first {k} steps {mean(train[:k], 'reward'):.3f} -> last {k} steps {mean(train[-k:], 'reward'):.3f}")
print(f"KL: first {k} steps {mean(train[:k], 'kl'):.4f} -> last {k} steps {mean(train[-k:], 'kl'):.4f}")
sft, grpo = (json.load(open(f"{run}/test_{m}.json")) for m in ("sft", "grpo"))
print(f"test accuracy (greedy, {sft['n']} prompts never trained or tuned on): SFT {sft['accuracy']:.3f} -> GRPO {grpo['accuracy']:.3f}")
print(f"figure: {run}/grpo_curves.png")
PY
