"""Run a recipe's `main(argv)` on N local gloo ranks, forked from the test process, as torchrun's workers run it.

On the 2-core CI machine a torchrun job of 2 ranks that only join a gloo group takes ~7 s of wall time and ~10 s of
CPU (the launcher and each rank import torch), and temper's imports add ~3 s of CPU a rank. Forked ranks inherit
the test process's imports, so a layout test's job costs what its training costs. Each rank gets the environment
torchrun gives a worker (RANK, LOCAL_RANK, WORLD_SIZE, LOCAL_WORLD_SIZE, MASTER_ADDR, MASTER_PORT) and joins a
real gloo process group through temper's own `init_distributed`. torchrun itself, and what only it does (its
agent, restarts, rendezvous across machines), stays tested through it: pretrain's DDP test, test_multinode.py,
test_pretrain_reliability.py and the sharded recipes' launch.
"""

from __future__ import annotations

import multiprocessing
import os
import socket
import sys
import time
import traceback
from collections.abc import Callable, Sequence
from multiprocessing.connection import wait
from pathlib import Path

import torch.distributed as dist
import torch.multiprocessing as mp

from temper.__main__ import main as temper_main


def free_port() -> int:
    """A TCP port free on the loopback now (a rendezvous or a server binds it next)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank(main: Callable[[list[str]], int], argv: list[str], env: dict[str, str], log: str) -> None:
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    sys.stdout = open(1, "w", buffering=1, closefd=False)  # noqa: SIM115 (the process's own streams)
    sys.stderr = open(2, "w", buffering=1, closefd=False)  # noqa: SIM115
    os.environ.update(env)
    code = 1
    try:
        code = main(argv) or 0
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else int(e.code is not None)  # sys.exit(): 0; a message: 1
    except BaseException:
        traceback.print_exc()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def run_ranks(main: Callable[[list[str]], int], argv: Sequence[str], ranks: int, logs: Path,
              env: dict[str, str] | None = None, timeout: float = 400) -> str:
    """`main(argv)` on `ranks` forked processes of one gloo group; returns their output (rank 0's first) and fails
    the test, with that output, when a rank exits non-zero or runs past `timeout` seconds."""
    _check_no_group()
    logs.mkdir(parents=True, exist_ok=True)
    base = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()), "WORLD_SIZE": str(ranks),
            "LOCAL_WORLD_SIZE": str(ranks), "TEMPER_FAULT": "", **(env or {})}
    ctx = multiprocessing.get_context("fork")
    procs = [ctx.Process(target=_rank, args=(main, list(argv), {**base, "RANK": str(r), "LOCAL_RANK": str(r)},
                                             str(logs / f"rank{r}.log"))) for r in range(ranks)]
    for p in procs:
        p.start()
    deadline = time.monotonic() + timeout
    # As torchrun's agent does: when a rank fails, the others (waiting for it in a collective) are stopped.
    while (alive := [p for p in procs if p.exitcode is None]) and not any(p.exitcode for p in procs):
        if time.monotonic() > deadline:
            break
        wait([p.sentinel for p in alive], timeout=1)
    for p in procs:
        if p.exitcode is None:  # past the timeout, or waiting for a rank that failed
            p.kill()
        p.join()
    out = "".join((logs / f"rank{r}.log").read_text() for r in range(ranks))
    codes = [p.exitcode for p in procs]
    assert codes == [0] * ranks, f"exit codes {codes} (negative: killed; timeout {timeout} s):\n{out[-4000:]}"
    return out


def temper_on_ranks(argv: Sequence[str], ranks: int, logs: Path, env: dict[str, str] | None = None) -> str:
    """`temper <argv>` (the command line's dispatch and error boundary) on `ranks` forked gloo ranks."""
    return run_ranks(temper_main, argv, ranks, logs, env)


def fork_ranks(fn: Callable[..., None], args: tuple, nprocs: int) -> None:
    """`torch.multiprocessing.spawn(fn, args, nprocs)` with forked processes: each rank calls fn(rank, *args) with
    this process's imports, where spawn's would import torch and temper again (seconds a rank)."""
    _check_no_group()
    mp.start_processes(fn, args=args, nprocs=nprocs, join=True, start_method="fork")


def _check_no_group() -> None:
    assert not dist.is_initialized(), "a process group in the test process would be shared by the forked ranks"
