"""Distilled student vs the same student without a teacher, at equal tokens (char-level Shakespeare).

A teacher (3 x 96) is pretrained 300 steps; then a 2 x 48 student trains 100 steps x 16 x 64 tokens from the
same init and data order: `temper pretrain` (no teacher), and `temper distill` with alpha 0 (must equal it),
forward KL at alpha 0.5 and 1, JSD, and a top-32 cache. Prints each student's held-out loss.
~6 minutes on 2 cores.   python benchmarks/distill_quality.py [WORK_DIR]
"""
import json
import sys
import time
from pathlib import Path

from temper.recipes import distill, prepare, pretrain

root = Path(sys.argv[1] if len(sys.argv) > 1 else "out/distill_quality")
root.mkdir(parents=True, exist_ok=True)
src = Path(__file__).resolve().parents[2] / "shared" / "data" / "tinyshakespeare" / "input.txt"
if not (root/"data/manifest.json").exists():
    (root / "s.txt").write_text(src.read_text()[:300_000])
    assert prepare.main([f"--input={root/'s.txt'}", f"--out={root/'data'}", "--tokenizer.kind=char", "--txt_docs=paragraph",
                         "--val_fraction=0.1", "--workers=1", "--progress=false"]) == 0
COMMON = ["--log.progress=false", "--run.device=cpu", f"--run.dir={root}", "--checkpoint.every=0", "--log.every=50"]
def val(name):
    rows = [json.loads(line) for line in (root / name / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if r.get("kind") == "val"][-1]
t0 = time.time()
if not (root / "teacher/final/config.json").exists():
    assert pretrain.main([*COMMON, "--run.name=teacher", f"--data.dir={root/'data'}", "--preset=debug", "--model.dim=96",
        "--model.n_layers=3", "--model.n_heads=4", "--model.max_seq_len=64", "--train.micro_batch_size=16", "--train.steps=300",
        "--eval.every=0", "--eval.batches=16", "--schedule.warmup_steps=20", "--optim.lr=3e-3"]) == 0
print(f"teacher val_loss {val('teacher')['val_loss']:.4f} ({time.time()-t0:.0f}s)", flush=True)
STEPS = 100
SHAPE = "{dim: 48, n_layers: 2, n_heads: 4, max_seq_len: 64}"
base = [*COMMON, "--train.micro_batch_size=16", f"--train.steps={STEPS}", "--eval.every=0", "--eval.batches=16",
        "--schedule.warmup_steps=10", "--optim.lr=3e-3", "--run.resume=never"]
t0 = time.time()
assert pretrain.main([*base, "--run.name=pretrain", f"--data.dir={root/'data'}", "--preset=debug", "--data.order=sequential",
                      *[f"--model.{k}={v}" for k, v in dict(dim=48, n_layers=2, n_heads=4, max_seq_len=64).items()]]) == 0
print(f"pretrain (no teacher): val_loss {val('pretrain')['val_loss']:.4f} ({time.time()-t0:.0f}s)", flush=True)
runs = [("alpha0", ["--loss.alpha=0"]), ("fkl_a0.5", ["--loss.alpha=0.5"]), ("fkl_a1", ["--loss.alpha=1"]), ("jsd_a0.5", ["--loss.kind=jsd", "--loss.alpha=0.5"]), ("cache_k32_a0.5", ["--loss.alpha=0.5", "--teacher.cache=true", "--teacher.top_k=32"])]
for name, extra in runs:
    t0 = time.time()
    assert distill.main([*base, f"--run.name={name}", f"--teacher.path={root/'teacher'}", f"--data.dir={root/'data'}",
                         f"--student.model={SHAPE}", *extra]) == 0
    v = val(name)
    print(f"{name}: val_loss {v['val_loss']:.4f} val_kl {v.get('val_kl', float('nan')):.4f} ({time.time()-t0:.0f}s)", flush=True)
