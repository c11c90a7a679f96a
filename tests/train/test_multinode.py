"""Multi-node and elastic `temper pretrain` under the sharded layouts, against one process.

Two nodes on one machine: two `torchrun` launches that meet through a c10d rendezvous on 127.0.0.1, as on
a cluster (README, "Scale out"). FSDP2 over both nodes (2 x 1 rank, dp_shard=2) and HSDP (2 x 2 ranks,
replicas across the nodes, shards within one: torchrun numbers each node's ranks contiguously, and the
mesh puts dp_shard inside dp_replicate) train with the losses and final weights of one process with the
same global batch. And a torchrun `--max-restarts=1` job under FSDP2, on one node and across two,
whose rank 1 crashes once restarts by itself, resumes from its newest DCP checkpoint and finishes like the
uninterrupted process.

Every launch has a deadline (and the rendezvous a join timeout): a node that never joins or a job that
hangs fails the test with the launchers' logs, and every process the test started is stopped.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
import torch

from temper.train.parallel import ELASTIC_STORE_FIX
from tests.ranks import free_port
from tests.recipes import test_pretrain
from tests.recipes.test_pretrain import TINY, final_weights, metrics, train

char_data = test_pretrain.char_data  # the same prepared text (a module fixture: prepared once here too)

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "TEMPER_FAULT": ""}
JOIN_TIMEOUT_S = 120
"""The rendezvous's wait for the other node: torchrun itself fails when one never comes."""


def _descendants(pid: int) -> list[int]:
    """The processes under `pid` (torchrun's workers run in sessions of their own: a process group kill
    would miss them)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    out, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def _stop(proc: subprocess.Popen) -> None:
    """Stop a launcher that ran past its deadline, and its workers: SIGTERM first (torchrun then stops its
    workers), SIGKILL to whatever is left."""
    pids = [proc.pid, *_descendants(proc.pid)]
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        pass
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.wait()


def launch(launchers: list[list[str]], logs: list[Path], env: dict[str, str], timeout: float) -> list[str]:
    """Start the torchrun launchers at once (stdout + stderr to `logs`); wait for all of them for at most
    `timeout` seconds; fail the test, with their logs, when one fails or they run out of time."""
    procs = []
    for cmd, log in zip(launchers, logs, strict=True):
        with open(log, "w") as out:
            procs.append(subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT))
    deadline, late = time.monotonic() + timeout, False
    for proc in procs:
        try:
            proc.wait(timeout=max(deadline - time.monotonic(), 1))
        except subprocess.TimeoutExpired:
            late = True
    for proc in procs:
        if proc.poll() is None:
            _stop(proc)
    texts = [log.read_text() for log in logs]
    report = "\n".join(f"---- {log.name} (exit {p.returncode})\n{t[-3000:]}"
                       for log, p, t in zip(logs, procs, texts, strict=True))
    if late:
        pytest.fail(f"torchrun did not finish within {timeout:.0f} s\n{report}")
    assert all(p.returncode == 0 for p in procs), report
    return texts


def two_nodes(nproc: int) -> list[str]:
    """torchrun's flags for one of two nodes of `nproc` ranks meeting at a c10d rendezvous (README, "Scale out");
    no --node-rank: c10d numbers the nodes as they join (torchrun ignores it for c10d)."""
    return ["--nnodes=2", f"--nproc-per-node={nproc}", "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{free_port()}",
            f"--rdzv-id=temper-test-{uuid.uuid4().hex[:8]}", f"--rdzv-conf=join_timeout={JOIN_TIMEOUT_S}"]


def pretrain_cmd(torchrun: list[str], root: Path, name: str, *extra: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", *torchrun, "-m", "temper", "pretrain", *TINY,
            f"--run.dir={root}", f"--run.name={name}", *extra]


@pytest.fixture(scope="module")
def reference(char_data, tmp_path_factory) -> Path:
    """One process, micro-batch 4: the global batch of every layout below."""
    root = tmp_path_factory.mktemp("multinode")
    torch.set_num_threads(1)
    assert train(char_data, root, "ref", "--train.micro_batch_size=4") == 0
    return root / "ref"


def assert_same_run(ref: Path, got: Path) -> None:
    """Losses to 1e-6 (the shards' sums run in another order), weights after 8 Adam steps to 1e-5 (Adam turns
    1e-7 into ~1e-6 on near-zero biases)."""
    a, b = metrics(ref), metrics(got)
    assert sorted(b) == list(range(1, 9))
    torch.testing.assert_close([b[s]["loss"] for s in range(1, 9)], [a[s]["loss"] for s in range(1, 9)],
                               rtol=1e-6, atol=1e-7)
    wa, wb = final_weights(ref), final_weights(got)
    assert wa.keys() == wb.keys()
    for k in wa:
        torch.testing.assert_close(wb[k], wa[k], rtol=1e-5, atol=1e-5)


@pytest.mark.distributed
@pytest.mark.slow
@pytest.mark.parametrize(("nproc", "layout"), [
    (1, ["--train.micro_batch_size=2", "--train.parallel.dp_shard=2"]),
    (2, ["--train.micro_batch_size=1", "--train.parallel.dp_replicate=2", "--train.parallel.dp_shard=2"]),
], ids=["fsdp-2x1", "hsdp-2x2"])
def test_two_nodes_match_one_process(reference, char_data, tmp_path, nproc, layout):
    """Two torchrun launches, one per "node", joined by a c10d rendezvous, train one sharded job whose
    checkpoints go through DCP and whose run equals the one-process reference."""
    world = 2 * nproc
    cmd = pretrain_cmd(two_nodes(nproc), tmp_path, "two-nodes", f"--data.dir={char_data}", *layout)
    texts = launch([cmd, cmd], [tmp_path / "node-a.log", tmp_path / "node-b.log"], ENV, timeout=300)
    out = "".join(texts)
    assert out.count("temper pretrain: ") == 1  # one job: one rank 0
    assert f"{world} rank(s) on cpu" in out and f"x {world} data-parallel ranks" in out
    four = tmp_path / "two-nodes" / "checkpoints" / "step-0000004"
    assert (four / "dcp").is_dir()
    assert json.loads((four / "manifest.json").read_text())["world_size"] == world
    assert_same_run(reference, tmp_path / "two-nodes")


@pytest.mark.distributed
@pytest.mark.slow
@pytest.mark.parametrize("nodes", [1, 2], ids=["standalone", "two-nodes"])
def test_elastic_restart_under_fsdp_resumes_from_dcp(reference, char_data, tmp_path, nodes):
    """Rank 1 dies once at step 5; torchrun (--max-restarts=1) restarts both ranks, which resume from the
    step-4 DCP checkpoint (FSDP2, dp_shard=2) and finish with the reference's losses and weights. On one node
    (2 ranks), and on two (1 rank each: the surviving node's launcher restarts its rank when the other
    node's re-enters the rendezvous). Launched as the README says (with ELASTIC_STORE_FIX), so temper does
    not warn about restarts."""
    key, value = ELASTIC_STORE_FIX.split("=")
    env = {**ENV, "TEMPER_FAULT": f"crash:step=5:rank=1:once={tmp_path / 'crashed'}", key: value}
    torchrun = ["--standalone", "--nproc-per-node=2"] if nodes == 1 else two_nodes(1)
    cmd = pretrain_cmd([*torchrun, "--max-restarts=1"], tmp_path, "elastic", f"--data.dir={char_data}",
                       "--train.micro_batch_size=2", "--train.parallel.dp_shard=2")
    texts = launch([cmd] * nodes, [tmp_path / f"node-{i}.log" for i in range(nodes)], env, timeout=300)
    out = "".join(texts)
    assert (tmp_path / "crashed").exists() and "TEMPER_FAULT crash at step 5 on rank 1" in out
    assert out.count("temper pretrain: ") == 2  # the first start and the restart
    assert "temper: warning: torchrun --max-restarts" not in out
    # The first attempt logged steps 1-5; the restart, from step 4, logged 5-8 (step 5 again, nothing earlier).
    assert [out.count(f"step {s}: loss") for s in range(1, 9)] == [1, 1, 1, 1, 2, 1, 1, 1]
    run = tmp_path / "elastic"
    assert (run / "checkpoints" / "step-0000004" / "dcp").is_dir()
    logged = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()
              if json.loads(line)["kind"] == "train"]
    assert logged == list(range(1, 9))  # the crashed attempt's step 5 was rewound, not kept twice
    assert_same_run(reference, run)
