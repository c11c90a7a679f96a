"""The scale-out benchmark runs end to end on two gloo ranks, and its byte counter sees all the traffic:
DDP's bucketed all-reduce carries the parameter bytes, and DDP and FSDP2 ZeRO-3 each send what their
formula says, up to the small non-parameter traffic (loss and token-count reductions) and, for FSDP2,
the root unit that is not gathered again in backward. A check of the counter, not a timing test."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.distributed
@pytest.mark.slow
def test_scale_out_counts_ddp_and_fsdp2_traffic_as_their_theory(tmp_path):
    out = tmp_path / "scale_out.json"
    cmd = [sys.executable, "benchmarks/scale_out.py", "--ranks", "2", "--layouts", "ddp", "fsdp2", "--dim", "64",
           "--layers", "4", "--batch", "1", "--seq", "32", "--steps", "1", "--warmup", "1", "--timeout", "150",
           "--json", str(out)]
    proc = subprocess.run(cmd, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
                          timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "| layout | ranks | all-reduce MB |" in proc.stdout and "counter check (2 ranks)" in proc.stdout
    rows = {r["layout"]: r for r in json.loads(out.read_text())["rows"]}
    assert set(rows) == {"ddp", "fsdp2"} and not any("error" in r for r in rows.values()), rows
    ddp, fsdp = rows["ddp"], rows["fsdp2"]
    params = ddp["shape"]["param_bytes"]
    # DDP's C++ reducer all-reduces every gradient once; the train step's own reductions add a few bytes.
    assert params <= ddp["payload"]["all-reduce"] <= 1.01 * params
    assert 0.9 <= ddp["ratio"] <= 1.3 and 0.9 <= fsdp["ratio"] <= 1.3
    # FSDP2 moves parameters by all-gather and gradients by reduce-scatter, not by all-reduce.
    assert fsdp["payload"]["reduce-scatter"] == pytest.approx(params)
    assert fsdp["payload"]["all-gather"] == pytest.approx(2 * params - fsdp["shape"]["root_bytes"])
    assert fsdp["payload"]["all-reduce"] < 0.01 * params
    assert not ddp["unknown_ops"] and not fsdp["unknown_ops"]
    assert ddp["step_s"] > 0 and fsdp["step_s"] > 0
