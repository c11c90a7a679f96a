"""The DPO benchmark runs end to end on a tiny shape: both sides train, do the same work, and under
LoRA each holds one copy of the base weights."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

pytest.importorskip("trl")
pytest.importorskip("peft")


@pytest.mark.slow
def test_dpo_benchmark_lora_runs_both_sides_on_the_same_work(tmp_path):
    out = tmp_path / "dpo.json"
    cmd = [sys.executable, "benchmarks/dpo_throughput.py", "--methods", "lora", "--data", "synthetic", "--dim", "32",
           "--layers", "1", "--heads", "2", "--kv-heads", "1", "--ffn", "64", "--vocab", "300", "--max-length", "64",
           "--pairs", "2", "--rank", "4", "--warmup", "1", "--steps", "1", "--repeats", "1", "--threads", "1",
           "--json", str(out)]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "| lora | temper |" in proc.stdout and "tokens/s vs TRL" in proc.stdout
    rows = {r["impl"]: r for r in json.loads(out.read_text())["rows"]}
    assert set(rows) == {"trl", "temper"}
    for r in rows.values():
        assert r["tokens_per_s"] > 0 and r["peak_rss_gib"] > 0
        assert r["base_copies"] == pytest.approx(1.0)  # adapters off for the reference: no second copy
    ours, theirs = rows["temper"]["checks"], rows["trl"]["checks"]
    for k in ("logps_chosen", "logps_rejected", "grad_norm"):
        assert ours[k] == pytest.approx(theirs[k], rel=1e-4), k
    assert ours["loss_step2"] == pytest.approx(theirs["loss_step2"], abs=1e-4)
    assert rows["temper"]["speed_vs_trl"] > 0
