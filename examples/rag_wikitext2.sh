#!/usr/bin/env bash
# Retrieval on WikiText-2: BM25, dense retrieval with a small LM not tuned for retrieval, the same LM tuned as a
# retriever with the inverse cloze task (no labels), and hybrid fusion, scored on one masked inverse-cloze set.
#
# The collection is the test split's articles (chunks of 128 tokens, 32 shared), held out from both the LM's
# pretraining and the retriever's tuning (the train split). The queries are sentences of those chunks, cut out of
# the chunks they come from (`temper rag evalset --masked_index`): a query's relevant chunks are the ones that
# held it, and BM25 can no longer find it by its own words. Both dense models index the same chunks (same
# tokenizer and settings) and draw the same queries (same seed), so the rows of the table are comparable.
# About 11 minutes on 2 CPU cores (5 of them pretraining); runs/rag-wikitext2/table.md holds the table.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
. .venv/bin/activate
DATA=${SHARED_DATA:-../shared/data}/wikitext-2
OUT=runs/rag-wikitext2
mkdir -p $OUT
# 1. The small LM: an 8k BPE tokenizer and a 1.8M-parameter Llama (4 x 128) pretrained on the train split.
[ -f data/wikitext2-train/manifest.json ] || temper prepare --input "$DATA/train.txt.gz" --out data/wikitext2-train \
  --txt_docs=line --val_fraction=0 --tokenizer.vocab_size=8192
[ -f data/wikitext2-valid/manifest.json ] || temper prepare --input "$DATA/valid.txt.gz" --out data/wikitext2-valid \
  --txt_docs=line --val_fraction=1 --tokenizer.kind=file --tokenizer.path=data/wikitext2-train/tokenizer.json
[ -f runs/rag-wt2-lm/final/model.safetensors ] || temper pretrain --preset debug-llama --model.dim 128 \
  --model.n_layers 4 --model.n_heads 4 --model.n_kv_heads 2 --model.ffn_dim 384 --model.max_seq_len 256 \
  --data.dir data/wikitext2-train --data.val_dir data/wikitext2-valid --run.name rag-wt2-lm --run.resume never \
  --train.steps 600 --train.micro_batch_size 16 --optim.lr 3e-3 --schedule.warmup_steps 50 --eval.every 300 \
  --eval.batches 20 --checkpoint.every 0 --log.every 100 --log.progress false
# 2. The retriever: that LM tuned on inverse-cloze pairs of the train split's paragraphs (InfoNCE, in-batch negatives).
[ -f runs/rag-wt2-retriever/final/retriever.json ] || temper rag train --model runs/rag-wt2-lm/final \
  --data.files "$DATA/train.txt.gz" --data.ict true --data.txt_docs line --run.name rag-wt2-retriever \
  --run.resume never --max_len 128 --train.micro_batch_size 32 --train.steps 400 --optim.lr 5e-4 \
  --schedule.warmup_steps 20 --eval.every 200 --checkpoint.every 0 --log.every 50 --log.progress false
# 3. The test split's articles indexed with each model; the same queries drawn from each, and the masked copies.
for m in lm retriever; do
  temper rag index --inputs "$DATA/test.txt.gz" --articles true --model runs/rag-wt2-$m/final --out $OUT/index-$m
  temper rag evalset --index $OUT/index-$m --out $OUT/queries-$m.jsonl --n 500 --seed 0 --masked_index $OUT/masked-$m
done
cmp $OUT/queries-lm.jsonl $OUT/queries-retriever.jsonl  # the same chunks and the same queries for both models
# 4. Score each retriever on the masked indexes.
temper rag eval --index $OUT/masked-lm --data $OUT/queries-lm.jsonl --mode sparse --out $OUT/bm25.json
temper rag eval --index $OUT/masked-lm --data $OUT/queries-lm.jsonl --mode dense --out $OUT/dense-lm.json
temper rag eval --index $OUT/masked-lm --data $OUT/queries-lm.jsonl --mode hybrid --out $OUT/hybrid-lm.json
temper rag eval --index $OUT/masked-retriever --data $OUT/queries-lm.jsonl --mode dense --out $OUT/dense-retriever.json
temper rag eval --index $OUT/masked-retriever --data $OUT/queries-lm.jsonl --mode hybrid --out $OUT/hybrid-retriever.json
python - "$OUT" <<'EOF'
import json, sys
from pathlib import Path

out = Path(sys.argv[1])
rows = [("BM25", "bm25"), ("dense, LM untuned (mean pooling)", "dense-lm"), ("dense, ICT-tuned retriever", "dense-retriever"),
        ("hybrid: BM25 + untuned LM (RRF)", "hybrid-lm"), ("hybrid: BM25 + tuned retriever (RRF)", "hybrid-retriever")]
lines = ["| retriever | recall@1 | recall@10 | hit@1 | hit@10 | MRR | nDCG@10 |", "|---|---|---|---|---|---|---|"]
for name, key in rows:
    s = json.loads((out / f"{key}.json").read_text())
    lines.append(f"| {name} | " + " | ".join(f"{s[m]:.3f}" for m in ("recall@1", "recall@10", "hit@1", "hit@10", "mrr", "ndcg@10"))
                 + " |")
n = json.loads((out / "bm25.json").read_text())["queries"]
table = "\n".join(lines) + (f"\n\n{n} masked inverse-cloze queries over WikiText-2's test articles (a sentence in the "
                             "overlap of two chunks has both as relevant: recall@1 is then at most 1/2, hit@1 up to 1).\n")
(out / "table.md").write_text(table)
print(table)
EOF
