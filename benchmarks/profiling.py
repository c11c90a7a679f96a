"""Where a benchmark's time goes: the top kernels of one profiled run, printed to stderr beside its table.

A ratio against a peer says how far a side is from a goal; its kernels beside the peer's say why (QLoRA's
dequantization against bitsandbytes', a decode step's kernel count). Scripts run as `python benchmarks/x.py`
import it as `profiling` (their own folder is first on the path).
"""

from __future__ import annotations

import sys
from collections.abc import Callable

import torch


def print_top_kernels(name: str, run: Callable[[], object], cuda: bool, rows: int = 25) -> None:
    """Profile `run()` and print its `rows` top operators and kernels by self time (the device's on a GPU)."""
    with torch.profiler.profile() as prof:
        run()
        if cuda:
            torch.cuda.synchronize()
    sort = "self_device_time_total" if cuda else "self_cpu_time_total"
    print(f"# profile {name}\n" + prof.key_averages().table(sort_by=sort, row_limit=rows), file=sys.stderr, flush=True)
