"""benchmarks/rag_index.py in tiny mode: both pipelines index the same WikiText-2 chunks with the same random model,
the table is printed, and the two sides' vectors, top-10 ids and recall agree. A check of the script, not a timing
test."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("sentence_transformers")
pytest.importorskip("faiss")
pytest.importorskip("bm25s")

ROOT = Path(__file__).resolve().parents[2]


def test_rag_benchmark_tiny(shared_data, tmp_path):
    out = tmp_path / "res.json"
    cmd = [sys.executable, "benchmarks/rag_index.py", "--docs", "3", "--queries", "8", "--dim", "64", "--layers", "2",
           "--vocab", "600", "--chunk", "64", "--overlap", "8", "--threads", "1", "--json", str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TEMPER_SHARED_DATA": str(shared_data)}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "| temper Index.build + retrieve |" in proc.stdout and "| FAISS + sentence-transformers |" in proc.stdout
    res = json.loads(out.read_text())
    assert res["docs"] == 3 and res["chunks"] > 3 and res["queries"] == 8
    # Same weights, same tokens, same pooling: the vectors agree to float32 rounding, so do the rankings.
    assert res["max_vector_diff"] < 1e-5
    assert res["top10_agreement"] >= 7 / 8
    for key in ("recall@1", "recall@10", "mrr"):
        assert res["temper"][key] == pytest.approx(res["peer"][key], abs=1 / 8 + 1e-9)
