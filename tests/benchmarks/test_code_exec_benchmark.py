"""The code-execution benchmark runs end to end on a few programs, and both sides agree on every verdict."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_code_exec_benchmark_tiny():
    cmd = [sys.executable, "benchmarks/code_exec.py", "--programs", "6", "--workers", "2", "--repeats", "1"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    # programs 0..5: 0 raises, 3 fails its assert, the other four pass
    assert "verdicts equal on 6/6, 4 passed" in proc.stdout
    assert "| temper |" in proc.stdout and "temper / peer:" in proc.stdout
