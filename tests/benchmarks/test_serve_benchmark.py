"""The server throughput benchmark runs end to end on a tiny setting: transformers and `temper serve` (its own
process, the openai client) generate every requested token, greedy texts agree, and the table is printed."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

pytest.importorskip("transformers")
pytest.importorskip("openai")


@pytest.mark.slow
def test_serve_benchmark_runs_both_sides_on_the_same_requests(tmp_path):
    out = tmp_path / "serve.json"
    cmd = [sys.executable, "benchmarks/serve_throughput.py", "--shape", "debug-llama", "--vocab", "300",
           "--requests", "6", "--prompt-len", "3,7", "--max-tokens", "5", "--clients", "1,3", "--threads", "1",
           "--json", str(out)]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "| temper serve, 3 clients | 6 | 30 |" in proc.stdout and "vs transformers" in proc.stdout
    rows = json.loads(out.read_text())["rows"]
    assert [(r["side"], r["clients"]) for r in rows] == [("transformers generate, one by one", 1),
                                                         ("temper serve, 1 client", 1), ("temper serve, 3 clients", 3)]
    for r in rows:
        assert r["tokens"] == 6 * 5 and r["tokens_per_s"] > 0  # no end-of-text token: every token is generated
        assert r["same_text_as_transformers"] == 6  # fp32, a 300-word vocabulary: no near-ties tip greedy here
    assert rows[0]["vs_transformers"] == 1.0 and all(r["tokens_per_cpu_s"] > 0 for r in rows)
