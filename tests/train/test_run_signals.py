"""train/run.py's signal handling, in a process of its own: a first Ctrl-C only asks for a checkpoint at
the next step boundary (as SIGTERM does); a second one ends the process at once, without a traceback.
(The first Ctrl-C end to end, checkpoint and exit code, is in tests/recipes/test_pretrain.py.)"""

from __future__ import annotations

import os
import signal
import subprocess
import sys

SCRIPT = """
import os, signal, time
from temper.train.run import _SigtermFlag
flag = _SigtermFlag()
os.kill(os.getpid(), signal.SIGINT)
time.sleep(0.2)
print("after the first:", flag.raised, flag.name, flush=True)
os.kill(os.getpid(), signal.SIGINT)
time.sleep(5)
print("still running", flush=True)
"""


def test_a_second_ctrl_c_exits_at_once(tmp_path):
    proc = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=60,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.stdout == "after the first: True SIGINT\n"
    assert proc.returncode == -signal.SIGINT
    assert "Ctrl-C again to exit at once" in proc.stderr and "Traceback" not in proc.stderr


def test_the_flag_restores_the_previous_handlers():
    from temper.train.run import _SigtermFlag

    before = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    flag = _SigtermFlag()
    assert signal.getsignal(signal.SIGINT) == flag._handle
    flag.restore()
    assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == before
