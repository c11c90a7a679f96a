#!/usr/bin/env bash
# WikiText-2 validation perplexity after a fixed budget of 1M training tokens (500 steps x 16 x 128),
# for the GPT-2-style `debug` preset and its Llama-style twin `debug-llama`, on CPU.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
. .venv/bin/activate
DATA=${SHARED_DATA:-../shared/data}/wikitext-2
# The corpus is already split: train.txt.gz -> train, valid.txt.gz -> val (one paragraph per line).
temper prepare --input "$DATA/train.txt.gz" --out data/wikitext2-train --txt_docs=line --val_fraction=0 \
  --tokenizer.vocab_size=8192
temper prepare --input "$DATA/valid.txt.gz" --out data/wikitext2-valid --txt_docs=line --val_fraction=1 \
  --tokenizer.kind=file --tokenizer.path=data/wikitext2-train/tokenizer.json
for preset in debug debug-llama; do
  temper pretrain --preset $preset --data.dir data/wikitext2-train --data.val_dir data/wikitext2-valid \
    --run.name wikitext2-$preset --run.resume never --train.steps 500 --train.micro_batch_size 16 \
    --model.max_seq_len 128 --optim.lr 3e-3 --schedule.warmup_steps 50 --eval.every 250 --eval.batches 40 \
    --checkpoint.every 0 --log.every 50 --log.progress false
done
grep -h '"val_loss"' runs/wikitext2-*/metrics.jsonl | tail -n 4
