"""The speculative decoding benchmark runs end to end on a tiny setting: it trains both models, every
speculative output equals plain greedy decoding (asserted inside), and the table and JSON hold every row."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
TEXT = ROOT.parent / "shared" / "data" / "tinyshakespeare" / "input.txt"


@pytest.mark.slow
def test_speculative_benchmark_tiny(tmp_path):
    if not TEXT.exists():
        pytest.skip(f"shared data not found at {TEXT}")
    out = tmp_path / "spec.json"
    cmd = [sys.executable, "benchmarks/speculative_decoding.py", "--work", str(tmp_path / "work"), "--target", "1x32",
           "--draft", "1x16", "--target-steps", "2", "--draft-steps", "2", "--chars", "20000", "--seq", "64",
           "--new-tokens", "12", "--prompts", "1", "--repeats", "1", "--k", "2", "--json", str(out)]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "| shakespeare | draft | 2 |" in proc.stdout and "| copy | lookup-3 | 2 |" in proc.stdout
    rows = json.loads(out.read_text())["rows"]
    assert {(r["prompts"], r["method"]) for r in rows} == {
        (p, m) for p in ("shakespeare", "copy") for m in ("plain", "draft", "lookup-3")}
    for r in rows:
        assert r["tokens_per_s"] > 0 and r["speedup"] > 0 and r["tokens_per_pass"] >= 1.0
        assert (r["acceptance"] is None) == (r["method"] == "plain")
