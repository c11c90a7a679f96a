#!/usr/bin/env bash
# Chinchilla's scaling laws, small: 3 compute budgets x 4 model shapes of tiny character-level models on
# WikiText-2, trained on CPU (2 runs at a time, one core each), then L(N, D) = E + A/N^alpha + B/D^beta
# (approach 3) and the IsoFLOP minima (approach 2) fitted to them, and a larger held-out run (64x2, the widest,
# at 3x the largest budget) predicted from the fit. 13 runs of 10 s to about a minute each on one core (the
# longest: 8x2 at 2e11, 8k steps); 5-8 minutes on 2 cores. runs/scaling-wikitext2/scaling.md holds the plan,
# the runs, both fits next to Chinchilla's published ones, the compute-optimal N and D at 2e12 FLOPs with
# bootstrap intervals, and the held-out prediction error; isoflop.png and fit.png the plots.
#
# Characters rather than examples/wikitext2.sh's 8k BPE: at the widths a CPU trains in a minute (8 to 64), the
# embedding and output head of a BPE vocabulary are most of the model and of its FLOPs; with ~280 characters
# the transformer blocks are. C is counted exactly (--flops=exact: temper's FLOPs per token, head and attention
# included), so every run of a budget costs about the same time.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
. .venv/bin/activate
DATA=${SHARED_DATA:-../shared/data}/wikitext-2
[ -f data/wikitext2-char-train/manifest.json ] || temper prepare --input "$DATA/train.txt.gz" \
  --out data/wikitext2-char-train --txt_docs=line --val_fraction=0 --tokenizer.kind=char
[ -f data/wikitext2-char-valid/manifest.json ] || temper prepare --input "$DATA/valid.txt.gz" \
  --out data/wikitext2-char-valid --txt_docs=line --val_fraction=1 --tokenizer.kind=file \
  --tokenizer.path=data/wikitext2-char-train/tokenizer.json
# The same command again resumes (finished runs are kept); --fit_only refits from the saved results.
OMP_NUM_THREADS=1 temper scaling --dir runs/scaling-wikitext2 \
  --data data/wikitext2-char-train --val_dir data/wikitext2-char-valid \
  --shapes='[8x2,16x2,32x2,48x2]' --head_dim 8 --budgets='[3e10,1e11,2e11]' --flops exact \
  --holdout='[64x2@6e11]' --seq_len 128 --batch_size 4 --min_steps 100 --eval_batches 80 \
  --workers 2 --threads_per_trial 1 --pretrain=--optim.lr=1e-2 --pretrain=--run.device=cpu
