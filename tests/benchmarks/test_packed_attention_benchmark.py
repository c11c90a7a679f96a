"""The packed-attention benchmark runs end to end on a CPU (forward passes: torch has no CPU flex backward):
every side is timed, and flex gives sdpa's loss on the same packed rows."""

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_packed_attention_benchmark_tiny(tmp_path):
    out = tmp_path / "packed.json"
    cmd = [sys.executable, "benchmarks/packed_attention.py", "--device", "cpu", "--seq", "64", "--batch", "2",
           "--steps", "1", "--warmup", "1", "--json", str(out)]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env=os.environ | {"OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert [r["side"] for r in result["rows"]] == ["sdpa", "flex", "causal"]
    assert all(r["tokens_per_s"] > 0 for r in result["rows"])
    assert result["meta"]["mode"] == "forward" and result["meta"]["docs_per_row"] > 1
    assert result["meta"]["flex_vs_sdpa_first_loss"] < 1e-5
