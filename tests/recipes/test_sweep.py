"""`temper sweep` end to end: tiny pretrain trials on the shared Shakespeare text, each a real `temper pretrain`
process, the study in SQLite.

A 4-trial TPE sweep on 2 workers (run dirs, table, best.yaml, plots), median pruning (the pruned run stopped
early with a checkpoint), a resume after SIGKILL of the sweep (the interrupted trial's run resumes from its
checkpoint), a typo in the space stopping the sweep with exit 2, `run_points` (order, no rerun), and the Ray Tune
backend on a local Ray.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from temper import __main__ as cli
from temper.train.log import read_metrics
from temper.train.sweep import run_points
from tests.recipes import test_pretrain

char_data = test_pretrain.char_data  # the same prepared text (a module fixture: prepared once here too)

TINY = ["--preset=debug", "--model.dim=32", "--model.n_layers=2", "--model.n_heads=2", "--model.max_seq_len=32",
        "--train.micro_batch_size=2", "--train.steps=8", "--checkpoint.every=2", "--checkpoint.keep_last_n=0",
        "--eval.every=2", "--eval.batches=2", "--schedule.warmup_steps=2", "--run.device=cpu", "--log.plots=false"]
SPACE = {"optim.lr": {"type": "float", "low": 1e-4, "high": 1e-2, "log": True},
         "schedule.warmup_steps": {"type": "int", "low": 0, "high": 4, "step": 2}}
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


@pytest.fixture(autouse=True)
def _one_thread(monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # every trial process: one thread (the machine is shared)


def sweep(char_data, tmp_path, name, *extra, space=SPACE, trial_args=()) -> int:
    path = tmp_path / f"{name}-space.yaml"
    path.write_text(yaml.safe_dump(space))
    return cli.main(["sweep", f"--space={path}", f"--dir={tmp_path}", f"--name={name}", *extra, "--",
                     *TINY, f"--data.dir={char_data}", *trial_args])


def table(sweep_dir: Path) -> list[dict]:
    """The rows of sweep.md as dicts (column -> cell)."""
    lines = [line for line in (sweep_dir / "sweep.md").read_text().splitlines() if line.startswith("|")]
    head = [c.strip() for c in lines[0].strip("|").split("|")]
    return [dict(zip(head, (c.strip() for c in line.strip("|").split("|")), strict=True)) for line in lines[2:]]


def val_steps(run_dir: Path) -> list[int]:
    return [r["step"] for r in read_metrics(run_dir / "metrics.jsonl") if r["kind"] == "val"]


@pytest.mark.slow
def test_tpe_sweep_on_two_workers_writes_runs_table_best_config_and_plots(char_data, tmp_path, capsys):
    assert sweep(char_data, tmp_path, "tpe", "--trials=4", "--workers=2", "--seed=3") == 0
    out = capsys.readouterr().out
    sweep_dir = tmp_path / "tpe"
    rows = table(sweep_dir)
    assert [r["state"] for r in rows] == ["COMPLETE"] * 4, out
    for r in rows:  # each trial a normal run directory, its value the last evaluation's val_loss
        run_dir = sweep_dir / r["run dir"]
        assert (run_dir / "final" / "model.safetensors").is_file() and r["steps"] == "8"
        last = [x for x in read_metrics(run_dir / "metrics.jsonl") if x["kind"] == "val"][-1]
        assert last["step"] == 8 and float(r["val_loss"]) == pytest.approx(last["val_loss"], rel=1e-5)
        assert f"--optim.lr={r['optim.lr']}"[:12] in (run_dir / "stdout.log").read_text()
    best = min(rows, key=lambda r: float(r["val_loss"]))
    saved = yaml.safe_load((sweep_dir / "trials" / f"trial-{int(best['trial']):04d}" / "config.yaml").read_text())
    best_yaml = yaml.safe_load((sweep_dir / "best.yaml").read_text())
    assert best_yaml["optim"]["lr"] == saved["optim"]["lr"]
    assert float(best["optim.lr"]) == pytest.approx(best_yaml["optim"]["lr"], rel=1e-5)
    assert "name" not in best_yaml["run"] and "dir" not in best_yaml["run"]  # a new run, not the trial's
    assert len({r["optim.lr"] for r in rows}) == 4
    for plot in ("optimization_history", "intermediate_values", "param_importances"):
        assert (sweep_dir / f"{plot}.png").stat().st_size > 1000
    # Again with one trial more: only that one runs, with new values (the resumed sampler does not draw the first
    # trial's again); --report_only writes the same table.
    assert sweep(char_data, tmp_path, "tpe", "--trials=5", "--workers=2", "--seed=3") == 0
    more = table(sweep_dir)
    assert more[:4] == rows and more[4]["state"] == "COMPLETE" and more[4]["optim.lr"] not in {r["optim.lr"] for r in rows}
    assert len(list((sweep_dir / "trials").iterdir())) == 5
    assert cli.main(["sweep", f"--dir={tmp_path}", "--name=tpe", "--report_only"]) == 0
    assert table(sweep_dir) == more
    # Another space in the same sweep directory: refused, naming what changed.
    assert sweep(char_data, tmp_path, "tpe", "--trials=5", space={"optim.lr": [1e-3, 2e-3]}) == 2
    assert "another space" in capsys.readouterr().err


@pytest.mark.slow
def test_median_pruning_stops_a_bad_trial_early_with_a_checkpoint(char_data, tmp_path):
    """Grid order: a good learning rate first (the median's reference), then one too small to learn: pruned at an
    evaluation, SIGTERMed, checkpointed, well before its last step."""
    space = {"optim.lr": {"type": "categorical", "choices": [3e-3, 1e-7]}}
    assert sweep(char_data, tmp_path, "prune", "--sampler=grid", "--pruner=median", "--startup_trials=1",
                 "--trials=2", space=space, trial_args=["--train.steps=60"]) == 0
    good, bad = table(tmp_path / "prune")
    assert (good["state"], bad["state"]) == ("COMPLETE", "PRUNED")
    run_dir = tmp_path / "prune" / bad["run dir"]
    steps = int(bad["steps"])
    assert steps < 60 and not (run_dir / "final").exists()
    assert "exiting with 143" in (run_dir / "stdout.log").read_text()
    assert (run_dir / "checkpoints" / f"step-{steps:07d}").is_dir()  # SIGTERM: a checkpoint at the stop step


@pytest.mark.slow
def test_a_killed_sweep_resumes_and_its_interrupted_trial_resumes_its_run(char_data, tmp_path):
    space_file = tmp_path / "space.yaml"
    space_file.write_text(yaml.safe_dump(SPACE))
    cmd = [sys.executable, "-m", "temper", "sweep", f"--space={space_file}", f"--dir={tmp_path}", "--name=kill",
           "--trials=1", "--", *TINY, f"--data.dir={char_data}", "--train.steps=80"]
    proc = subprocess.Popen(cmd, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    first = tmp_path / "kill" / "trials" / "trial-0000"
    deadline = time.monotonic() + 120
    while not (first / "checkpoints" / "step-0000010").is_dir() and time.monotonic() < deadline:
        time.sleep(0.1)
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=60)
    # Its trial got the parent-death SIGTERM: a checkpoint, then exit 143 (not a run training on unwatched).
    deadline = time.monotonic() + 60
    while "exiting with 143" not in (first / "stdout.log").read_text() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert "exiting with 143" in (first / "stdout.log").read_text()
    stopped_at = max(int(p.name[5:]) for p in (first / "checkpoints").glob("step-*"))
    assert stopped_at < 80
    kept = {r["step"]: r["time"] for r in read_metrics(first / "metrics.jsonl") if r["kind"] == "train"}

    out = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=400)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "retry of trial 0: resumes its run" in out.stdout
    rows = table(tmp_path / "kill")
    assert [(r["state"], r["run dir"], r["note"]) for r in rows] == [
        ("FAIL", "trials/trial-0000", "interrupted; retried as 1"), ("COMPLETE", "trials/trial-0000", "retry of 0")]
    assert rows[0]["optim.lr"] == rows[1]["optim.lr"] and rows[1]["steps"] == "80"
    # Resumed, not restarted: the steps up to the checkpoint are the first attempt's records (a fresh start would
    # have rewritten them), and every step is there once.
    after = {r["step"]: r["time"] for r in read_metrics(first / "metrics.jsonl") if r["kind"] == "train"}
    assert sorted(after) == list(range(1, 81))
    assert all(after[s] == kept[s] for s in range(1, stopped_at + 1))
    assert (first / "final" / "model.safetensors").is_file()


def test_a_typo_in_the_space_stops_the_sweep_with_exit_2_naming_the_key(char_data, tmp_path, capsys):
    space = {"optim.lrr": {"type": "float", "low": 1e-4, "high": 1e-2}}
    assert sweep(char_data, tmp_path, "typo", "--trials=3", space=space) == 2
    err = capsys.readouterr().err
    assert "unknown config key 'optim.lrr' (did you mean 'optim.lr'?)" in err
    assert len(list((tmp_path / "typo" / "trials").iterdir())) == 1  # one trial, not three


@pytest.mark.slow
def test_run_points_returns_results_in_order_and_does_not_rerun(char_data, tmp_path):
    base = [*TINY, f"--data.dir={char_data}", "--train.steps=4"]
    points = [{"model.dim": 16}, {"model.dim": 32, "optim.lr": 1e-3}, {"model.dim": 16}]
    results = run_points("pretrain", base, points, tmp_path / "points", workers=2)
    assert [r.params for r in results] == points
    assert [r.state for r in results] == ["COMPLETE"] * 3 and results[0].number == results[2].number
    for r, p in zip(results, points, strict=True):
        saved = yaml.safe_load((r.run_dir / "config.yaml").read_text())
        assert saved["model"]["dim"] == p["model.dim"] and r.steps == 4
        assert r.value == [x["val_loss"] for x in read_metrics(r.run_dir / "metrics.jsonl") if x["kind"] == "val"][-1]
    mtime = (results[0].run_dir / "metrics.jsonl").stat().st_mtime_ns
    again = run_points("pretrain", base, [points[1], points[0]], tmp_path / "points", workers=2)
    assert [(r.number, r.value) for r in again] == [(results[1].number, results[1].value),
                                                      (results[0].number, results[0].value)]
    assert (results[0].run_dir / "metrics.jsonl").stat().st_mtime_ns == mtime  # not run again
    assert len(list((tmp_path / "points" / "trials").iterdir())) == 2


@pytest.mark.slow
def test_ray_tune_backend_on_a_local_ray(char_data, tmp_path):
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        assert sweep(char_data, tmp_path, "ray", "--backend=ray", "--trials=2", "--workers=2",
                     trial_args=["--train.steps=4"]) == 0
    finally:
        ray.shutdown()
    rows = table(tmp_path / "ray")
    assert [r["state"] for r in rows] == ["COMPLETE"] * 2
    for r in rows:
        run_dir = tmp_path / "ray" / r["run dir"]
        assert val_steps(run_dir)[-1] == 4 and (run_dir / "final" / "model.safetensors").is_file()
        assert float(r["val_loss"]) == pytest.approx(
            [x["val_loss"] for x in read_metrics(run_dir / "metrics.jsonl") if x["kind"] == "val"][-1], rel=1e-5)
    assert (tmp_path / "ray" / "best.yaml").is_file() and json.loads(
        (tmp_path / "ray" / "ray" / "sweep.json").read_text())["recipe"] == "pretrain"
