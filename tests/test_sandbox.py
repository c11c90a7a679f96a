"""Generated code runs in a separate, limited process: it passes only by running to its end, every way of
failing is reported (and none hangs the evaluation), and the guard keeps its honest mistakes contained."""

import os
import signal
import sys
import time

import pytest

from temper.sandbox import Limits, run_all, run_python

QUICK = Limits(timeout_s=2.0)


@pytest.mark.parametrize("program,status,detail", [
    ("def add(a, b):\n    return a + b\nassert add(2, 3) == 5\n", "passed", ""),
    ("s = 'héllo ✓'\nassert len(s) == 7\n", "passed", ""),
    ("def add(a, b):\n    return a - b\nassert add(2, 3) == 5\n", "failed", "AssertionError"),
    ("print(undefined_name)\n", "failed", "NameError: name 'undefined_name' is not defined"),
    ("def f(:\n", "failed", "SyntaxError: invalid syntax"),
    ("x = bytearray(8 << 30)\n", "failed", "MemoryError"),
    # exiting before the tests have run is not passing them (code_eval counts SystemExit as a failure)
    ("import sys\nsys.exit(0)\nassert False\n", "failed", "SystemExit: 0"),
    ("import os\nos._exit(0)\nassert False\n", "failed", "exit status 0 before the program's end"),
    ("exit()\n", "failed", "TypeError: 'NoneType' object is not callable"),
    ("import sys\nwhile True:\n    sys.stderr.write('x' * 65536)\n", "failed",
     "wrote over the 1 MiB file-size limit"),
])
def test_a_program_passes_only_by_running_to_its_end(program, status, detail):
    out = run_python(program, Limits(timeout_s=5.0, max_file_mb=1))
    assert (out.status, out.detail) == (status, detail)
    assert out.passed == (status == "passed")


@pytest.mark.parametrize("program", ["while True:\n    pass\n", "import time\ntime.sleep(60)\n"])
def test_a_program_that_never_ends_times_out_on_the_wall_clock(program):
    start = time.perf_counter()
    out = run_python(program, Limits(timeout_s=1.0))
    assert (out.passed, out.status) == (False, "timed out")
    assert time.perf_counter() - start < 5.0


def test_the_guard_keeps_destructive_calls_from_running(tmp_path):
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "data.txt").write_text("keep me")
    marker = tmp_path / "marker"
    for program in (f"import shutil\nshutil.rmtree({str(victim)!r})\n",
                    f"import os\nos.remove({str(victim / 'data.txt')!r})\n",
                    f"import os\nos.system('touch {marker}')\n",
                    f"import subprocess\nsubprocess.run(['touch', {str(marker)!r}])\n",
                    "import os\nos.kill(os.getppid(), 9)\n",
                    "import os\nos.fork()\n"):
        out = run_python(program, QUICK)
        assert out.status == "failed" and "NoneType" in out.detail, (program, out)
    assert (victim / "data.txt").read_text() == "keep me" and not marker.exists()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_each_program_runs_in_an_empty_directory_that_is_removed_and_sees_no_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("TEMPER_SECRET", "do-not-leak")
    where = tmp_path / "where.txt"
    program = ("import os, sys\n"
               f"open({str(where)!r}, 'w').write(os.readlink('/proc/self/cwd'))\n"
               "assert sorted(os.listdir('.')) == ['program.py', 'stderr.txt'], os.listdir('.')\n"
               "assert 'TEMPER_SECRET' not in os.environ and sys.flags.isolated\n")
    assert run_python(program, QUICK).passed
    assert not os.path.exists(where.read_text())


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_a_timeout_kills_what_the_program_started(tmp_path):
    pid_file = tmp_path / "pid"
    program = ("import os, sys, time\n"
               "pid = os.posix_spawn(sys.executable, [sys.executable, '-c', 'import time; time.sleep(60)'], {})\n"
               f"open({str(pid_file)!r}, 'w').write(str(pid))\n"
               "time.sleep(60)\n")
    assert run_python(program, Limits(timeout_s=1.0)).status == "timed out"
    pid = int(pid_file.read_text())
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:  # gone, or a zombie waiting for its new parent to reap it
        try:
            state = next(x for x in open(f"/proc/{pid}/status") if x.startswith("State:"))
        except (FileNotFoundError, ProcessLookupError):
            return
        if "Z" in state.split()[1]:
            return
        time.sleep(0.05)
    pytest.fail(f"the program's child {pid} outlived the timeout")


def _has_pidfd() -> bool:
    try:
        os.close(os.pidfd_open(os.getpid()))
        return hasattr(signal, "pidfd_send_signal")
    except (AttributeError, OSError):  # not Linux, or a kernel before 5.3
        return False


@pytest.mark.skipif(not _has_pidfd(), reason="kills its worker through a pidfd (Linux 5.3+)")
def test_a_program_that_kills_its_worker_fails_and_the_next_one_gets_a_new_worker():
    killer = "import os, signal\nsignal.pidfd_send_signal(os.pidfd_open(os.getppid()), signal.SIGKILL)\n" \
             "import time\ntime.sleep(60)\n"
    start = time.perf_counter()
    outs = run_all([killer, "assert True\n"], Limits(timeout_s=30.0, workers=1))
    assert [(o.status, o.detail) for o in outs] == [("failed", "the sandbox's worker process died"), ("passed", "")]
    assert time.perf_counter() - start < 10.0  # the orphaned program was ended, not waited for


def test_run_all_keeps_the_order_of_the_programs():
    programs = [f"assert {i} % 3 != 0\n" for i in range(12)]
    outs = run_all(programs, Limits(timeout_s=5.0, workers=4))
    assert [o.passed for o in outs] == [i % 3 != 0 for i in range(12)]
    assert run_all([]) == []


def test_limits_are_checked():
    for bad in ({"timeout_s": 0}, {"memory_mb": 8}, {"max_file_mb": 0}, {"workers": -1}):
        with pytest.raises(ValueError):
            Limits(**bad)
