"""The structured-decoding benchmark runs end to end on a tiny setting: every row of the free and the constrained
runs generates exactly the tokens asked, in the scheduler and in transformers, and the table is printed."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
TEXT = ROOT.parent / "shared" / "data" / "tinyshakespeare" / "input.txt"

pytest.importorskip("transformers")


@pytest.mark.slow
def test_structured_decode_benchmark_times_free_and_constrained_runs(tmp_path):
    out = tmp_path / "structured.json"
    cmd = [sys.executable, "benchmarks/structured_decode.py", "--shape", "debug-llama", "--vocab", "600", "--text",
           str(TEXT), "--max-tokens", "10", "--batch", "1,3", "--repeats", "1", "--threads", "1", "--json", str(out)]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "| temper scheduler, batch 3 |" in proc.stdout and "the mask alone" in proc.stdout
    result = json.loads(out.read_text())
    assert [r["side"] for r in result["rows"]] == ["temper scheduler, batch 1", "temper scheduler, batch 3",
                                                   "transformers generate, batch 1"]
    assert all(r["free_tokens_per_s"] > 0 and r["constrained_tokens_per_s"] > 0 for r in result["rows"])
    assert result["mask_us_per_token"] > 0 and result["vocab"] == 600
