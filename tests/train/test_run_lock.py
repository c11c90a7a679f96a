"""train/run.py's run-directory lock: one training process per run directory, the second told who holds it.
(A second process, and the lock's release on kill -9, are in tests/recipes/test_pretrain.py.)"""

from __future__ import annotations

import os

import pytest

from temper.errors import InputError
from temper.train.run import LOCK_FILE, RunDirBusy, locked_run_dir


def test_a_second_lock_is_refused_naming_the_holder(tmp_path):
    run = tmp_path / "run"
    with locked_run_dir(run, rank=0):
        assert (run / LOCK_FILE).exists()
        with pytest.raises(RunDirBusy, match=f"in use by another training process \\(pid {os.getpid()} on ") as e:
            with locked_run_dir(run, rank=0):  # another open file: flock refuses it as it would another process
                pass
        assert isinstance(e.value, InputError)
        with locked_run_dir(run, rank=1):  # the other ranks of a torchrun job share rank 0's directory
            pass
        (run / "metrics.jsonl").write_text("")
    assert (run / LOCK_FILE).exists()  # a run directory in use keeps its lock file
    with locked_run_dir(run, rank=0):  # released with its holder
        pass


def test_a_start_that_wrote_nothing_leaves_no_directory(tmp_path):
    run = tmp_path / "runs" / "x"
    with pytest.raises(ValueError, match="bad data"), locked_run_dir(run, rank=0):
        raise ValueError("bad data")
    assert not run.exists()
