"""The forked-ranks launcher of the layout tests (tests/ranks.py) fails as torchrun would: a rank that fails stops
the others, even one waiting for it in a collective, and the test sees the failing rank's output."""

import os
import time

import pytest
import torch.distributed as dist

from tests.ranks import run_ranks

pytestmark = pytest.mark.distributed


def _second_rank_fails(argv: list[str]) -> int:
    dist.init_process_group("gloo")
    if dist.get_rank() == 1:
        raise RuntimeError(f"rank 1 fails on {argv[0]}")
    dist.barrier()  # rank 0 waits here for a rank that never comes (killed, or failing when gloo sees it go)
    return 0


def test_a_failing_rank_stops_the_others_and_fails_with_its_output(tmp_path):
    start = time.monotonic()
    with pytest.raises(AssertionError, match=r"(?s)exit codes \[(-9|1), 1\].*rank 1 fails on purpose"):
        run_ranks(_second_rank_fails, ["purpose"], 2, tmp_path, timeout=60)
    assert time.monotonic() - start < 30


def test_ranks_see_torchruns_environment(tmp_path):
    def main(argv: list[str]) -> int:
        dist.init_process_group("gloo")
        print(f"rank {os.environ['RANK']} of {dist.get_world_size()}: {dist.get_rank()}")
        dist.destroy_process_group()
        return 0

    out = run_ranks(main, [], 2, tmp_path)
    assert "rank 0 of 2: 0" in out and "rank 1 of 2: 1" in out
