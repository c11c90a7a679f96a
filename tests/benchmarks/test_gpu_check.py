"""The GPU check runs end to end before a GPU is lent: every part on the CPU with tiny shapes.

GPU time comes in short spans, so `benchmarks/gpu_check.sh` must not first fail on a typo there.
Its dry run runs the same parts, scripts and report as on a GPU, with tiny shapes and the
`aot_eager` compile backend (dynamo and autograd tracing, no code generation), in about a minute.
"""

import json
import os
import subprocess
import tarfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _row(rows: list[dict], impl: str, mode: str) -> dict:
    return next(r for r in rows if r["impl"] == impl and r["mode"] == mode)


@pytest.mark.slow
def test_gpu_check_dry_run_runs_every_part_and_writes_the_report(shared_data, tmp_path):
    env = {**os.environ, "TEMPER_SHARED_DATA": str(shared_data), "TMPDIR": str(tmp_path)}
    out = tmp_path / "out"
    proc = subprocess.run(["bash", "benchmarks/gpu_check.sh", "--dry-run", str(out)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=340)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    report = json.loads((out / "gpu_check.json").read_text())
    parts = {p["part"]: p["rc"] for p in report["parts"]}
    assert parts == dict.fromkeys(["tests", "peaks", "train", "decode", "finetune", "shakespeare", "scaleout"], 0)
    # Every part left its numbers: both sides of both modes (and temper's whole-model compile, against the same
    # transformers + compile), both decode sides, LoRA and QLoRA with peers.
    assert {(r["impl"], r["mode"]) for r in report["train"]["rows"] if "tokens_per_s" in r} == {
        (i, m) for i in ("temper", "transformers") for m in ("eager", "compile")} | {("temper", "compile-model")}
    assert _row(report["train"]["rows"], "temper", "compile-model")["ratio_vs_transformers"] > 0
    assert {r["impl"] for r in report["decode"]["rows"] if r.get("tokens_per_s")} == {"temper", "transformers"}
    ft = {(r["method"], r["impl"]) for r in report["finetune"]["rows"] if "peak_gib" in r}
    assert {("lora", "temper+compile"), ("lora", "temper"), ("lora", "peft"), ("qlora", "temper+compile+offload"),
            ("qlora", "temper+offload")} <= ft  # eager too (--eager lora qlora)
    assert report["shakespeare"]["val_loss"] > 0 and report["peaks"]["bf16_matmul_flops"] > 0
    assert {r["layout"] for r in report["scaleout"]["rows"] if r.get("tokens_per_s")} == {"ddp", "fsdp2"}
    assert all(g["met"] is None for g in report["goals"])  # tiny CPU shapes: goals are not judged
    md = (out / "gpu_check.md").read_text()
    assert "| goal | target | measured | met |" in md and "failed:" not in md
    with tarfile.open(out / "logs.tar.gz") as tar:
        assert {"./train.log", "./parts.jsonl"} <= set(tar.getnames())
