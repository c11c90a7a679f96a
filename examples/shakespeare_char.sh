#!/usr/bin/env bash
# nanoGPT's "baby GPT" on tinyshakespeare, character level.
#   GPU: 6 layers, 6 heads, 384 wide, block 256 (nanoGPT reference val loss 1.4697)
#   CPU: bash examples/shakespeare_char.sh cpu   (4 layers, 128 wide, block 64; nanoGPT reference ~1.88)
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
. .venv/bin/activate
DATA=${SHARED_DATA:-../shared/data}
temper prepare --input "$DATA/tinyshakespeare/input.txt" --out data/shakespeare_char \
  --tokenizer.kind=char --tokenizer.special_tokens=[] --tokenizer.eot_token= --tokenizer.unknown=error \
  --split=tail --val_fraction=0.1
if [ "${1:-gpu}" = "cpu" ]; then
  temper pretrain --config configs/shakespeare-char-cpu.yaml
  temper generate --checkpoint runs/shakespeare-char-cpu/final --prompt "ROMEO:" --max_new_tokens 300 --temperature 0.8
else
  temper pretrain --config configs/shakespeare-char.yaml
  temper generate --checkpoint runs/shakespeare-char/final --prompt "ROMEO:" --max_new_tokens 500 --temperature 0.8
fi
