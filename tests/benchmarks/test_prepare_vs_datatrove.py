"""benchmarks/prepare_vs_datatrove.py runs both pipelines end to end on a tiny corpus and prints its
table: the documents each side keeps are the ones it tokenized (the fates read from temper's rejects
and datatrove's exclusion writers account for every document), and every document kept by one side
only falls in a group with its explanation. A check of the script, not a timing test."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

for module in ("datatrove", "spacy", "fasteners", "orjson"):  # datatrove's pipeline needs these
    pytest.importorskip(module)

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_benchmark_prints_the_table_and_explains_every_difference(shared_data):
    cmd = [sys.executable, "benchmarks/prepare_vs_datatrove.py", "--docs", "300", "--workers", "2"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TEMPER_SHARED_DATA": str(shared_data)}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = proc.stdout
    assert "| pipeline | seconds | documents/s | vs datatrove | kept | tokens |" in out
    rows = dict(re.findall(r"^\| (temper prepare|datatrove) \|(.*)$", out, re.MULTILINE))
    assert set(rows) == {"temper prepare", "datatrove"}
    for name, row in rows.items():
        kept, tokenized = re.search(r"\| ([\d,]+) \(tokenized ([\d,]+)\) \|", row).groups()
        assert kept == tokenized and int(kept.replace(",", "")) > 50, (name, row)
    differ = int(re.search(r"documents kept by one side only: (\d+)", out).group(1))
    groups = re.findall(r"^\| (kept|[\w:]+) \| (kept|[\w:]+) \| (\d+) \| (.+?) \|", out, re.MULTILINE)
    assert sum(int(g[2]) for g in groups) == differ
    assert all(g[3].strip() for g in groups), groups  # every group has its explanation
