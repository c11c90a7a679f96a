"""RunLogger and write_report: metrics.jsonl content, resume truncation, rank 0 only (row 32), report."""

import json
import math
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from temper.train.log import RunLogger, read_metrics, write_report
from tests.ranks import fork_ranks, free_port


def _lines(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _log_steps(logger: RunLogger, steps: range, **extra: float) -> None:
    for s in steps:
        logger.log(s, {"loss": 10.0 / s, "lr": 1e-3, "grad_norm": 1.0 + s % 3, "tokens_per_s": 1000.0 + s,
                       "mfu": 0.3, "tokens": 64 * s, "step_time_s": 0.1, "skipped_steps": 0, **extra})
        if s % 4 == 0:
            logger.log(s, {"val_loss": 9.0 / s, "val_ppl": math.exp(9.0 / s)}, kind="val")


def test_metrics_jsonl_content(tmp_path):
    with RunLogger(tmp_path, total_steps=3, progress=False) as logger:
        logger.log(1, {"loss": 2.5, "lr": 1e-3, "tokens_per_s": 5e4, "mfu": 0.42})
        logger.log(1, {"val_loss": 2.0, "val_ppl": math.exp(2.0)}, kind="val")
        logger.log(2, {"loss": torch.tensor(2.25), "grad_norm": float("nan")})  # tensor -> float, NaN -> null
        logger.message("hello")
    lines = _lines(tmp_path)
    assert [(r["step"], r["kind"]) for r in lines] == [(1, "train"), (1, "val"), (2, "train")]
    assert lines[0]["loss"] == 2.5 and lines[0]["mfu"] == 0.42 and isinstance(lines[0]["time"], float)
    assert lines[1]["val_ppl"] == pytest.approx(math.exp(2.0))
    assert lines[2]["loss"] == 2.25 and lines[2]["grad_norm"] is None


def test_resume_truncates_later_steps(tmp_path):
    with RunLogger(tmp_path, total_steps=8, progress=False) as logger:
        _log_steps(logger, range(1, 9))
    with RunLogger(tmp_path, total_steps=8, start_step=4, progress=False) as logger:  # resumed from step 4
        _log_steps(logger, range(5, 7))
    train = [r["step"] for r in _lines(tmp_path) if r["kind"] == "train"]
    assert train == [1, 2, 3, 4, 5, 6]
    assert [r["step"] for r in _lines(tmp_path) if r["kind"] == "val"] == [4]  # the step-8 eval is gone
    steps = [r["step"] for r in _lines(tmp_path)]
    assert steps == sorted(steps)


def test_rewind_after_rollback(tmp_path):
    with RunLogger(tmp_path, total_steps=8, tensorboard=True, progress=False) as logger:
        _log_steps(logger, range(1, 7))
        logger.rewind(3)  # non-finite loss at step 7: reload the step-3 checkpoint and go on from there
        _log_steps(logger, range(4, 9))
    steps = [r["step"] for r in _lines(tmp_path) if r["kind"] == "train"]
    assert steps == [1, 2, 3, 4, 5, 6, 7, 8]


def test_fresh_run_starts_empty_file(tmp_path):
    with RunLogger(tmp_path, total_steps=8, progress=False) as logger:
        _log_steps(logger, range(1, 4))
    with RunLogger(tmp_path, total_steps=8, progress=False) as logger:
        _log_steps(logger, range(1, 3))
    assert [r["step"] for r in _lines(tmp_path)] == [1, 2]


def test_partial_last_line_is_dropped(tmp_path):
    with RunLogger(tmp_path, total_steps=8, progress=False) as logger:
        _log_steps(logger, range(1, 4))
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 4, "kind": "train", "lo')  # killed mid-write
    assert [r["step"] for r in read_metrics(tmp_path / "metrics.jsonl")] == [1, 2, 3]
    with RunLogger(tmp_path, total_steps=8, start_step=3, progress=False) as logger:
        _log_steps(logger, range(4, 6))
    assert [r["step"] for r in _lines(tmp_path)] == [1, 2, 3, 4, 4, 5]  # every line parses; 4 = train + val


def test_nonzero_rank_writes_nothing(tmp_path):
    run_dir = tmp_path / "run"
    with RunLogger(run_dir, total_steps=4, rank=1, tensorboard=True) as logger:
        _log_steps(logger, range(1, 5))
        logger.message("rank 1 must not print")
    assert not run_dir.exists()


def test_progress_bar_and_val_line(tmp_path, capsys):
    with RunLogger(tmp_path, total_steps=8) as logger:
        _log_steps(logger, range(1, 5))
    out, err = capsys.readouterr()
    assert "4/8" in err and "loss 2.5000 | lr 1.00e-03 | 1.00k tok/s | MFU 30.0%" in err
    assert "step 4 val: val loss 2.2500 | perplexity 9.4877" in out
    with RunLogger(tmp_path, total_steps=8, start_step=4) as logger:
        logger.log(5, {"loss": 1.0, "mfu": 0.0})  # 0 = peak unknown (CPU): not shown
    assert "MFU" not in capsys.readouterr().err


def _two_rank_worker(rank: int, port: int, run_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        # Both ranks log every step, then "resume" from step 3 and log 4..6 again, as after a restart.
        with RunLogger(run_dir, total_steps=6, rank=dist.get_rank()) as logger:
            _log_steps(logger, range(1, 7), writer=rank)
        dist.barrier()
        with RunLogger(run_dir, total_steps=6, start_step=3, rank=dist.get_rank()) as logger:
            _log_steps(logger, range(4, 7), writer=rank)
    finally:
        dist.destroy_process_group()


@pytest.mark.distributed
def test_two_rank_gloo_only_rank0_writes(tmp_path):
    fork_ranks(_two_rank_worker, (free_port(), str(tmp_path)), 2)
    assert [p.name for p in tmp_path.iterdir()] == ["metrics.jsonl"]
    lines = _lines(tmp_path)
    assert [r["step"] for r in lines if r["kind"] == "train"] == [1, 2, 3, 4, 5, 6]  # once each, monotonic
    assert {r["writer"] for r in lines if r["kind"] == "train"} == {0}


def test_write_report(tmp_path):
    with RunLogger(tmp_path, total_steps=20, progress=False) as logger:
        _log_steps(logger, range(1, 21))
    report = write_report(tmp_path)
    text = report.read_text()
    assert report == tmp_path / "report.md" and "![training curves](report.png)" in text
    assert "| steps | 20 |" in text and "best 0.4500 (step 20)" in text and "| MFU (mean, last half) | 30.0% |" in text
    for name in ["report.png", "loss.png", "lr.png", "grad_norm.png", "throughput.png"]:
        data = (tmp_path / name).read_bytes()
        assert data.startswith(b"\x89PNG") and b"matplotlib" in data  # Agg writes its name in the PNG


def test_report_plots_only_what_was_logged(tmp_path):
    with RunLogger(tmp_path, total_steps=3, progress=False) as logger:
        for s in (1, 2, 3):
            logger.log(s, {"loss": 1.0 / s})
    text = write_report(tmp_path).read_text()
    assert "val loss" not in text and "tokens/s" not in text
    assert (tmp_path / "loss.png").exists() and not (tmp_path / "lr.png").exists()


def test_report_without_matplotlib(tmp_path, monkeypatch):
    with RunLogger(tmp_path, total_steps=3, progress=False) as logger:
        _log_steps(logger, range(1, 4))
    monkeypatch.setitem(__import__("sys").modules, "matplotlib.figure", None)  # import now raises ImportError
    text = write_report(tmp_path).read_text()
    assert "matplotlib is not installed" in text and "| steps | 3 |" in text
    assert not (tmp_path / "report.png").exists()


def test_report_without_plots_when_asked(tmp_path):
    """log.plots=false: the same table, no PNG and no link to one."""
    with RunLogger(tmp_path, total_steps=3, progress=False) as logger:
        _log_steps(logger, range(1, 4))
    text = write_report(tmp_path, plots=False).read_text()
    assert "| steps | 3 |" in text and ".png" not in text and "matplotlib" not in text
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.jsonl", "report.md"]


def test_tensorboard_event_file(tmp_path):
    with RunLogger(tmp_path, total_steps=4, tensorboard=True, progress=False) as logger:
        _log_steps(logger, range(1, 5))
    events = list((tmp_path / "tb").glob("events.out.tfevents.*"))
    assert len(events) == 1 and events[0].stat().st_size > 0


def test_wandb_missing_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setitem(__import__("sys").modules, "wandb", None)
    with pytest.raises(ImportError, match="wandb is not installed"):
        RunLogger(tmp_path, total_steps=4, wandb=True, progress=False)


def test_wandb_run_is_resumed_with_kind_tags(tmp_path, monkeypatch):
    calls = []

    class FakeRun:
        def log(self, data, step):
            calls.append((step, data))

        def finish(self):
            calls.append("finish")

    fake = type("wandb", (), {"util": type("util", (), {"generate_id": staticmethod(lambda: "abc123")}),
                              "init": staticmethod(lambda **kw: calls.append(kw) or FakeRun())})
    monkeypatch.setitem(__import__("sys").modules, "wandb", fake)
    for start in (0, 2):
        with RunLogger(tmp_path, total_steps=3, start_step=start, wandb=True, progress=False) as logger:
            logger.log(start + 1, {"loss": 1.0}, kind="train")
    init1, (step, data), _, init2 = calls[:4]
    assert init1["id"] == init2["id"] == "abc123" and init2["resume"] == "allow"
    assert (step, data) == (1, {"train/loss": 1.0})
