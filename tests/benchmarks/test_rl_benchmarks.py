"""The RL benchmarks run end to end on a tiny shape: rollouts (temper vs transformers) generate the same number
of tokens with the policy's log-probs on both sides, and one GRPO step runs in `temper grpo` and in TRL."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
TINY = ["--data", "synthetic", "--dim", "32", "--layers", "1", "--heads", "2", "--kv-heads", "1", "--ffn", "64",
        "--vocab", "300", "--threads", "1"]


def run(script: str, *args: str) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, f"benchmarks/{script}", *TINY, *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


@pytest.mark.slow
def test_rollout_benchmark_generates_the_same_tokens_with_the_policys_logprobs(tmp_path):
    pytest.importorskip("transformers")
    out = tmp_path / "rollout.json"
    proc = run("rollout_throughput.py", "--prompts", "3", "--n", "2", "--new-tokens", "5", "--repeats", "1",
               "--json", str(out))
    assert "| temper | 30 |" in proc.stdout and "| transformers | 30 |" in proc.stdout
    result = json.loads(out.read_text())
    assert set(result["rows"]) == {"temper", "transformers"} and result["speedup"] > 0
    for row in result["rows"].values():
        assert row["tokens_per_row"] == 5  # no early stop on either side
        assert row["logp_mismatch"] < 1e-4  # the returned log-probs are the policy's, on both sides
        assert row["tokens_per_s"] > 0


@pytest.mark.slow
def test_grpo_step_benchmark_runs_temper_grpo_and_trl(tmp_path):
    pytest.importorskip("trl")
    out = tmp_path / "grpo.json"
    run("grpo_step.py", "--prompts", "2", "--n", "2", "--new-tokens", "4", "--micro", "2", "--warmup", "1",
        "--steps", "1", "--repeats", "1", "--json", str(out))
    rows = json.loads(out.read_text())["rows"]
    assert set(rows) == {"trl", "temper"}
    for row in rows.values():
        assert len(row["step_times"][0]) == 2 and row["step_s"] > 0  # warm-up + one timed step
        assert 0 < row["mean_completion_length"] <= 4
    assert rows["temper"]["speedup_vs_trl"] > 0
