#!/usr/bin/env bash
# A hyper-parameter sweep: learning rate (log-uniform) x warmup for a short `debug`-preset pretrain on
# WikiText-2, 12 trials of 300 steps, two at a time, the unpromising ones stopped by the median pruner.
# Ends with sweeps/wikitext2-lr-warmup/: sweep.md (the table), best.yaml (the best trial's config, to train
# with: temper pretrain --config sweeps/wikitext2-lr-warmup/best.yaml --train.steps 2000), and the plots.
# Interrupted (Ctrl-C, a reboot)? Run it again: the sweep resumes, and so does the trial it was running.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
. .venv/bin/activate
DATA=${SHARED_DATA:-../shared/data}/wikitext-2
# The corpus as examples/wikitext2.sh prepares it: train.txt.gz -> train, valid.txt.gz -> val.
[ -f data/wikitext2-train/manifest.json ] || temper prepare --input "$DATA/train.txt.gz" --out data/wikitext2-train \
  --txt_docs=line --val_fraction=0 --tokenizer.vocab_size=8192
[ -f data/wikitext2-valid/manifest.json ] || temper prepare --input "$DATA/valid.txt.gz" --out data/wikitext2-valid \
  --txt_docs=line --val_fraction=1 --tokenizer.kind=file --tokenizer.path=data/wikitext2-train/tokenizer.json
# The space, the pruner and the trials' fixed flags are in the config; flags after `--` are added to each trial's.
temper sweep --config configs/sweep-wikitext2.yaml "$@"
