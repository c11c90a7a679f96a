#!/usr/bin/env bash
# Alignment on CPU with real preference pairs (hh-rlhf harmless-base, 2,312 pairs): a small Llama-style
# model pretrained on WikiText-2, then (a) a reward model trained on 80% of the pairs, with its pairwise
# accuracy on the held-out 20%, and (b) DPO from the same model, with the held-out loss and implicit
# reward accuracy before and after. The transcripts are used as they are ("\n\nHuman: ... \n\nAssistant:").
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
. .venv/bin/activate
DATA=${SHARED_DATA:-../shared/data}
STEPS=${BASE_STEPS:-500}
# 1. a base model: WikiText-2, 8k BPE, $STEPS steps of 16 x 256 tokens
if [ ! -f runs/align-base/final/model.safetensors ]; then
  temper prepare --input "$DATA/wikitext-2/train.txt.gz" --out data/wikitext2-train --txt_docs=line \
    --tokenizer.vocab_size=8192 --progress=false
  temper pretrain --preset debug-llama --model.dim 128 --model.n_layers 4 --model.n_heads 4 --model.n_kv_heads 2 \
    --model.ffn_dim 384 --model.max_seq_len 256 --data.dir data/wikitext2-train --run.name align-base \
    --train.steps "$STEPS" --train.micro_batch_size 16 --optim.lr 3e-3 --schedule.warmup_steps 100 \
    --eval.every 0 --checkpoint.every 0 --log.every 100 --log.progress false
fi
PAIRS=(--model runs/align-base/final --data.files="[$DATA/hh-rlhf/harmless-base/test.jsonl.gz]" --data.template plain
       --data.max_length 256 --eval.val_fraction 0.2 --log.progress false --log.every 50 --run.resume never)
# 2. a reward model: full fine-tuning, one epoch
temper reward "${PAIRS[@]}" --run.name align-reward --method full --train.epochs 1 --train.micro_batch_size 8 \
  --optim.lr 1e-4 --loss.center_coef 0.01 --eval.every 100
# 3. DPO (sigmoid, beta 0.1) with LoRA on every linear layer: the reference is the base with adapters off
temper dpo "${PAIRS[@]}" --run.name align-dpo --method lora --lora.rank 16 --lora.alpha 32 \
  --lora.targets "[q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj]" --lora.dropout 0 \
  --train.epochs 1 --train.micro_batch_size 8 --optim.lr 5e-4 --eval.every 100
python - <<'PY'
import json
for run, keys in (("align-reward", ("val_loss", "val_accuracy", "val_margin")),
                  ("align-dpo", ("val_loss", "val_rewards/accuracies", "val_rewards/margins"))):
    print(f"{run} held-out pairs (step: {', '.join(keys)}):")
    for line in open(f"runs/{run}/metrics.jsonl"):
        r = json.loads(line)
        if r.get("kind") == "val":
            print(f"  {r['step']}: " + ", ".join(f"{r[k]:.4f}" for k in keys))
PY
