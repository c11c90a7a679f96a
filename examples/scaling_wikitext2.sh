#!/usr/bin/env bash
# Chinchilla's scaling laws, small: 3 compute budgets x 5 model shapes of tiny character-level models on
# WikiText-2, trained on CPU (2 runs at a time, one core each; the points with under 60 or over 5000 steps are
# dropped: 11 runs), then L(N, D) = E + A/N^alpha + B/D^beta (approach 3) and the IsoFLOP minima (approach 2)
# fitted to them, and a larger held-out run (128x4 at 3x the largest budget) predicted from the fit. About 6
# minutes on 2 cores. runs/scaling-wikitext2/scaling.md holds the plan, the runs, both fits next to Chinchilla's
# published ones, the compute-optimal N and D at 1e13 FLOPs with bootstrap intervals, and the held-out
# prediction error; isoflop.png and fit.png the plots. At these budgets the larger shapes get a few hundred
# steps: the held-out loss is predicted within a few percent, but the exponents are not pinned down (the report
# says when a fitted constant sits on its bound).
#
# Characters rather than examples/wikitext2.sh's 8k BPE: at the widths a CPU trains in a minute (16 to 128), the
# embedding and output head of a BPE vocabulary are most of the model and of its FLOPs; with ~280 characters
# the transformer blocks are. C = 6ND with N the non-embedding parameters (Kaplan, Chinchilla).
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
  --shapes='[16x2,32x2,48x3,64x4,96x4]' --head_dim 16 --budgets='[1e11,3e11,1e12]' --flops 6nd \
  --holdout='[128x4@3e12]' --seq_len 128 --batch_size 16 --min_steps 60 --max_steps 5000 --eval_batches 40 \
  --target_flops 1e13 --workers 2 --threads_per_trial 1 --pretrain=--optim.lr=1e-2 --pretrain=--run.device=cpu
