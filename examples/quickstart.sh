#!/usr/bin/env bash
# The whole journey on one page: corpus -> tokenizer -> shards -> pretraining -> samples -> report.
# Default corpus: the Python standard library's own source files (every machine with Python has it).
# Use your own text with: bash examples/quickstart.sh --input 'my/**/*.txt'
# About 6-8 minutes on 2 CPU cores; uses a GPU when there is one.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
. .venv/bin/activate

INPUT_ARGS=()
if [ "${1:-}" = "--input" ]; then INPUT_ARGS=(--input "$2"); fi

temper prepare --config configs/quickstart-prepare.yaml "${INPUT_ARGS[@]}"
temper pretrain --config configs/quickstart.yaml
temper generate --checkpoint runs/quickstart/final --max_new_tokens 160 --temperature 0.8 --top_k 40 \
  --prompt "def" --prompt "class" --prompt "import os"
echo "report: runs/quickstart/report.md"
