"""The quantization benchmark runs end to end on a tiny setting: each kind loads through `load_for_inference`
in its own process, and int4's weights take about a third of float32's bytes once the float32 head and
embeddings of this tiny model are counted."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

pytest.importorskip("torchao")


@pytest.mark.slow
def test_quant_benchmark_runs_fp32_and_int4_on_a_tiny_setting(tmp_path, shared_data):
    out = tmp_path / "quant.json"
    cmd = [sys.executable, "benchmarks/quant_inference.py", "--kinds", "fp32,int4", "--shape", "debug-llama",
           "--data", str(shared_data / "wikitext-2"), "--train-steps", "2", "--train-bytes", "20000", "--vocab", "300",
           "--train-dim", "64", "--train-layers", "1", "--seq-len", "32", "--batch", "2", "--eval-docs", "3",
           "--prompt-len", "4", "--new-tokens", "4", "--threads", "1", "--json", str(out)]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "| int4 |" in proc.stdout and "WikiText-2 ppl" in proc.stdout
    rows = {r["kind"]: r for r in json.loads(out.read_text())["rows"]}
    assert rows["fp32"]["linear_bytes_per_param"] == 4.0
    assert rows["int4"]["linear_bytes_per_param"] == pytest.approx(0.5 + 8 / 64)  # codes + fp32 scale, zero per 64
    assert rows["int4"]["weight_bytes"] < 0.4 * rows["fp32"]["weight_bytes"]
    assert rows["int4"]["eval_tokens"] == rows["fp32"]["eval_tokens"] > 0
    # two training steps: the model is still near uniform (ln 300 = 5.7), and 4-bit weights barely move that
    assert rows["int4"]["perplexity"] == pytest.approx(rows["fp32"]["perplexity"], rel=0.05)
    for r in rows.values():
        assert r["decode_tokens_per_s"] > 0 and r["rss_delta"] > 0
