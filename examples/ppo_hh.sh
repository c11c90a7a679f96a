#!/usr/bin/env bash
# RLHF with PPO on CPU (a few minutes): hh-rlhf harmless-base (2,312 pairs) split by position into 80% for
# SFT and the reward model and 20% whose prompts PPO samples from, so that PPO's prompts are new to both.
#  1. the base model of examples/align_hh.sh (WikiText-2, 8k BPE; reused when runs/align-base exists),
#     with a chat template that writes a conversation as the hh-rlhf transcript it is ("\n\nHuman: ...
#     \n\nAssistant:"), so that the policy, SFT and the reward model all read the transcripts as collected
#  2. SFT on the chosen responses, a reward model (Bradley-Terry) on the pairs
#  3. `temper ppo` from the SFT model with that reward model and a KL penalty to the SFT model; then
#     the reward (objective/scores), KL (objective/kl) and KL coefficient curves, plotted to
#     runs/ppo-hh/ppo_curves.png
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
. .venv/bin/activate
DATA=${SHARED_DATA:-../shared/data}
# A model this small runs fastest on one thread, and one thread is not slowed by other busy processes.
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
STEPS=${BASE_STEPS:-500}
PPO_STEPS=${PPO_STEPS:-150}
START=$SECONDS
# 1. the base model (the same run as align_hh.sh's)
if [ ! -f runs/align-base/final/model.safetensors ]; then
  temper prepare --input "$DATA/wikitext-2/train.txt.gz" --out data/wikitext2-train --txt_docs=line \
    --tokenizer.vocab_size=8192 --progress=false
  temper pretrain --preset debug-llama --model.dim 128 --model.n_layers 4 --model.n_heads 4 --model.n_kv_heads 2 \
    --model.ffn_dim 384 --model.max_seq_len 256 --data.dir data/wikitext2-train --run.name align-base \
    --train.steps "$STEPS" --train.micro_batch_size 16 --optim.lr 3e-3 --schedule.warmup_steps 100 \
    --eval.every 0 --checkpoint.every 0 --log.every 100 --log.progress false
fi
# the data, and the base with the transcript chat template (user turns as they are: the prompt is the
# transcript up to and including its last "\n\nAssistant:"; an assistant turn is its text and EOS)
HH="$DATA/hh-rlhf/harmless-base/test.jsonl.gz" python - <<'PY'
import gzip, json, os, shutil
from pathlib import Path
from temper.data.tokenizer import load_hf_tokenizer, save_hf_tokenizer

MARK = "\n\nAssistant:"
MAX_PROMPT_CHARS = 500  # ~120 tokens: prompt + response fit the 256-token context of the reward model
out = Path("data/hh-ppo")
out.mkdir(parents=True, exist_ok=True)
pairs = [json.loads(line) for line in gzip.open(os.environ["HH"], "rt", encoding="utf-8")]
cut = int(0.8 * len(pairs))
split = lambda t: (t[:t.rindex(MARK) + len(MARK)], t[t.rindex(MARK) + len(MARK):])  # noqa: E731
with open(out / "pairs.jsonl", "w") as f:
    f.writelines(json.dumps(p) + "\n" for p in pairs[:cut])
with open(out / "sft.jsonl", "w") as f:
    for p in pairs[:cut]:
        prompt, response = split(p["chosen"])
        if response.strip():
            f.write(json.dumps({"messages": [{"role": "user", "content": prompt},
                                             {"role": "assistant", "content": response}]}) + "\n")
prompts = [split(p["chosen"])[0] for p in pairs[cut:]]
prompts = [p for p in dict.fromkeys(prompts) if len(p) <= MAX_PROMPT_CHARS]
with open(out / "prompts.jsonl", "w") as f:
    f.writelines(json.dumps({"prompt": p}) + "\n" for p in prompts)
print(f"{out}: {cut} pairs for SFT and the reward model, {len(prompts)} PPO prompts of the other {len(pairs) - cut}")
base = Path("runs/ppo-hh-base")
shutil.copytree("runs/align-base/final", base, dirs_exist_ok=True)
tok = load_hf_tokenizer(base)
tok.chat_templates = {"default": "{% for m in messages %}{% if m['role'] == 'assistant' %}"
                                 "{{ m['content'] + eos_token }}{% else %}{{ m['content'] }}{% endif %}{% endfor %}"}
save_hf_tokenizer(tok, base)
PY
COMMON=(--log.progress false --run.resume never --checkpoint.every 0)
# 2. SFT (full, one epoch) and the reward model (full, one epoch) from the base
temper sft --model runs/ppo-hh-base --method full --data.files=[data/hh-ppo/sft.jsonl] --data.max_length 256 \
  --data.strict false --train.epochs 1 --train.micro_batch_size 8 --optim.lr 1e-3 --eval.every 0 \
  --log.every 50 --run.name ppo-hh-sft "${COMMON[@]}"
temper reward --model runs/ppo-hh-base --data.files=[data/hh-ppo/pairs.jsonl] --data.template plain \
  --data.max_length 256 --eval.val_fraction 0.1 --method full --train.epochs 1 --train.micro_batch_size 8 \
  --optim.lr 1e-4 --loss.center_coef 0.01 --eval.every 0 --log.every 50 --run.name ppo-hh-reward "${COMMON[@]}"
# 3. PPO: full fine-tuning, a value head on the policy, a KL coefficient that the adaptive controller
#    (Ziegler et al. 2019) steers towards 1 nat of KL per completion
PPO_START=$SECONDS
temper ppo --model runs/ppo-hh-sft/final --method full --rewards='[{model: runs/ppo-hh-reward/final}]' \
  --data.prompts=[data/hh-ppo/prompts.jsonl] --data.max_prompt_length 160 --rollout.max_new_tokens 48 \
  --rollout.stop='["\n\nHuman:"]' --train.steps "$PPO_STEPS" --train.prompts_per_step 16 \
  --train.micro_batch_size 16 --ppo.epochs 2 --ppo.minibatches 2 --optim.lr 2e-5 \
  --kl.coef 0.05 --kl.adaptive true --kl.target 1.0 --kl.horizon 200 \
  --eval.every 50 --eval.val_fraction 0.1 --eval.max_prompts 32 --log.every 1 --run.name ppo-hh "${COMMON[@]}"
echo "ppo wall time: $((SECONDS - PPO_START)) s; whole example: $((SECONDS - START)) s"
python - <<'PY'
import json
import matplotlib
matplotlib.use("Agg")
import matplotlib.pyplot as plt

run = "runs/ppo-hh"
rows = [json.loads(line) for line in open(f"{run}/metrics.jsonl")]
train = [r for r in rows if r.get("kind", "train") == "train"]
steps = [r["step"] for r in train]
fig, axes = plt.subplots(1, 3, figsize=(14, 3.5))
for ax, key, label in ((axes[0], "objective/scores", "reward model score (sampled)"),
                       (axes[1], "objective/kl", "KL to the reference (nats / completion)"),
                       (axes[2], "kl_coef", "KL coefficient (adaptive)")):
    ys = [r[key] for r in train]
    ax.plot(steps, ys, ".", alpha=0.4)
    w = 10
    ax.plot(steps[w - 1:], [sum(ys[i - w + 1:i + 1]) / w for i in range(w - 1, len(ys))], "-", label=f"{w}-step mean")
    ax.set(xlabel="PPO step", title=label)
axes[0].legend()
fig.tight_layout()
fig.savefig(f"{run}/ppo_curves.png", dpi=120)
k = max(1, len(train) // 5)
mean = lambda rs, key: sum(r[key] for r in rs) / len(rs)  # noqa: E731
for key in ("objective/scores", "objective/kl", "objective/rlhf_reward", "kl_coef"):
    if key in train[0]:
        print(f"{key}: first {k} steps {mean(train[:k], key):+.4f} -> last {k} steps {mean(train[-k:], key):+.4f}")
for r in rows:
    if r.get("kind") == "val":
        print(f"step {r['step']} held-out prompts (greedy): " + ", ".join(f"{a} {b:.4f}" for a, b in r.items()
                                                                   if a.startswith("val_")))
print(f"figure: {run}/ppo_curves.png")
PY
