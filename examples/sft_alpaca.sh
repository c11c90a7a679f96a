#!/usr/bin/env bash
# Instruction tuning on CPU: a small Llama-style model pretrained on WikiText-2, then LoRA SFT on the
# 999 Alpaca-GPT4 rows in ../shared/data (Alpaca prompt, loss on responses + EOS only); prints the
# held-out loss before and after, and greedy answers to two unseen instructions (they should follow
# the template and stop at the end-of-text token). About 16 minutes on 2 cores.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
. .venv/bin/activate
DATA=${SHARED_DATA:-../shared/data}
# 1. a base model: WikiText-2, 8k BPE, 500 steps of 16 x 256 tokens (2M tokens)
temper prepare --input "$DATA/wikitext-2/train.txt.gz" --out data/wikitext2-train --txt_docs=line \
  --tokenizer.vocab_size=8192 --progress=false
temper pretrain --preset debug-llama --model.dim 128 --model.n_layers 4 --model.n_heads 4 --model.n_kv_heads 2 \
  --model.ffn_dim 384 --model.max_seq_len 256 --data.dir data/wikitext2-train --run.name sft-base \
  --train.steps 500 --train.micro_batch_size 16 --optim.lr 3e-3 --schedule.warmup_steps 100 \
  --eval.every 0 --checkpoint.every 0 --log.every 100 --log.progress false
# 2. the checker, then LoRA on every linear layer of the blocks
SFT=(--model runs/sft-base/final --data.files="[$DATA/alpaca/alpaca_gpt4_en_demo.json]" --data.template alpaca
     --data.max_length 256 --run.name sft-alpaca)
temper sft "${SFT[@]}" --check | tail -n 12
temper sft "${SFT[@]}" --run.resume never --method lora --lora.rank 16 --lora.alpha 32 \
  --lora.targets "[q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj]" --train.epochs 3 \
  --train.micro_batch_size 8 --optim.lr 2e-3 --eval.every 100 --log.every 25 --log.progress false
echo "held-out loss (step: val_loss):"
python - <<'PY'
import json
for line in open("runs/sft-alpaca/metrics.jsonl"):
    r = json.loads(line)
    if "val_loss" in r:
        print(f"  {r['step']}: {r['val_loss']:.3f}")
PY
# 3. answers to instructions it has not seen
for q in "Give three tips for staying healthy." "Name a color that is often associated with the ocean."; do
  # (the x keeps the prompt's final newline, which $(...) would strip)
  prompt="$(printf 'Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n### Instruction:\n%s\n\n### Response:\n' "$q"; echo x)"
  prompt="${prompt%x}"
  temper generate --checkpoint runs/sft-alpaca/final --prompt "$prompt" --temperature 0 --max_new_tokens 120
done
