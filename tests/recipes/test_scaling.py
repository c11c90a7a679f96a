"""`temper scaling` end to end on the shared character data: the plan's arithmetic, a tiny grid of real pretrain
runs through the sweep machinery with a held-out run, the report files, `--fit_only` reproducing them, and the
grids it refuses."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from temper.config import ConfigError
from temper.model.config import PRESETS, ModelConfig
from temper.model.transformer import Transformer
from temper.recipes import scaling
from temper.train.log import read_metrics
from tests.recipes import test_pretrain

char_data = test_pretrain.char_data  # the same prepared text (a module fixture: prepared once here too)

GRID = {"shapes": "[16x1,24x1,32x2]", "head_dim": "8", "budgets": "[2e8,6e8]", "seq_len": "32", "batch_size": "4",
        "min_steps": "5", "eval_batches": "4"}


def grid(*extra: str) -> list[str]:
    """GRID's flags, with `extra` --key=value flags replacing its keys (a list flag given twice would collect)."""
    over = dict(e[2:].split("=", 1) for e in extra if "=" in e)
    return [f"--{k}={v}" for k, v in (GRID | over).items()] + [e for e in extra if "=" not in e]


def non_embedding(dim: int, n_layers: int, vocab: int, seq_len: int) -> tuple[int, float]:
    """N by its definition (the blocks and the final norm), and the exact FLOPs per token, from a real model."""
    cfg = ModelConfig(**{**PRESETS["debug"].__dict__, "vocab_size": vocab, "dim": dim, "n_layers": n_layers,
                         "n_heads": dim // 8, "max_seq_len": seq_len})
    model = Transformer(cfg)
    n = sum(p.numel() for p in model.layers.parameters()) + sum(p.numel() for p in model.norm.parameters())
    return n, model.flops_per_token(seq_len)


@pytest.mark.parametrize("flops", ["6nd", "exact"])
def test_plan_arithmetic(char_data, tmp_path, capsys, flops):
    vocab = json.loads((char_data / "manifest.json").read_text())["vocab_size"]
    cfg = scaling.ScalingConfig(data=str(char_data), dir=str(tmp_path), shapes=["16x1", "24x1", "32x2"], head_dim=8,
                                budgets=[2e8, 6e8], seq_len=32, batch_size=4, min_steps=12, flops=flops,
                                holdout=["32x2@2e9"])
    plan = scaling.make_plan(cfg, vocab)
    assert [(p.shape, p.budget, p.holdout) for p in plan] == [
        (s, c, False) for c in (2e8, 6e8) for s in ("16x1", "24x1", "32x2")] + [("32x2", 2e9, True)]
    for p in plan:
        n, fpt = non_embedding(p.dim, p.n_layers, vocab, 32)
        assert p.n_params == n and p.flops_per_token == fpt
        per_token = 6 * n if flops == "6nd" else fpt
        assert p.steps == round(p.budget / per_token / 128) and p.tokens == p.steps * 128
        assert bool(p.dropped) == (p.steps < 12)
    assert any(p.dropped for p in plan)  # 32x2 at 2e8 has too few steps; it is listed, not run
    assert scaling.main([f"--data={char_data}", f"--dir={tmp_path}", *grid(), "--plan_only"]) == 0
    out = capsys.readouterr().out
    assert "| 2e+08 | 16x1 |" in out and not (tmp_path / "plan.json").exists()


@pytest.mark.slow
def test_scaling_runs_fits_and_refits(char_data, tmp_path, capsys):
    study = tmp_path / "study"
    argv = [f"--data={char_data}", f"--dir={study}", *grid(), "--holdout=[32x2@2e9]", "--workers=2",
            "--threads_per_trial=1", "--bootstrap=20", "--pretrain=--optim.lr=1e-2", "--pretrain=--run.device=cpu",
            "--pretrain=--log.plots=false"]
    assert scaling.main(argv) == 0
    out = capsys.readouterr().out
    assert "compute-optimal at C = 6e+09" in out and "held out holdout-c2e09-32x2" in out
    for name in ("plan.json", "results.json", "fit.json", "scaling.md", "fit.png"):
        assert (study / name).is_file(), name
    plan = json.loads((study / "plan.json").read_text())["points"]
    runs = json.loads((study / "results.json").read_text())["runs"]
    assert [r["state"] for r in runs] == ["COMPLETE"] * 7
    for p, r in zip(plan, runs, strict=True):
        records = read_metrics(Path(r["run_dir"]) / "metrics.jsonl")
        val = [x for x in records if x["kind"] == "val"]
        assert len(val) == 1 and val[0]["step"] == p["steps"] == r["steps"]  # one evaluation, at the end
        assert r["loss"] == val[0]["val_loss"] and r["tokens"] == p["tokens"] == p["steps"] * 128
        resolved = (Path(r["run_dir"]) / "config.yaml").read_text()
        assert f"dim: {p['dim']}" in resolved and f"warmup_steps: {round(0.1 * p['steps'])}" in resolved
    fit = json.loads((study / "fit.json").read_text())
    par = fit["parametric"]
    assert par["n_points"] == 6  # the held-out run is not in the fit
    (held,) = fit["held_out"]
    n, d = held["n_params"], held["tokens"]
    assert held["predicted"] == pytest.approx(par["E"] + par["A"] / n ** par["alpha"] + par["B"] / d ** par["beta"],
                                              rel=1e-9)
    assert held["measured"] == runs[-1]["loss"]
    assert held["relative_error"] == pytest.approx((held["predicted"] - held["measured"]) / held["measured"])
    assert ("isoflop" in fit) == (study / "isoflop.png").is_file()  # a minimum, or the reason there is none
    assert ("isoflop" in fit) != ("isoflop_error" in fit)
    md = (study / "scaling.md").read_text()
    assert "## Held-out runs" in md and "Chinchilla (Hoffmann et al. 2022) | 1.69 | 406.4 | 410.7 | 0.34 | 0.28" in md

    # --fit_only: the same fits and report from the saved results, no run started.
    saved = {name: (study / name).read_text() for name in ("fit.json", "scaling.md")}
    (study / "fit.png").unlink()
    trial_logs = {p: p.stat().st_mtime_ns for p in (study / "runs").rglob("stdout.log")}
    assert scaling.main([f"--dir={study}", "--fit_only", "--bootstrap=20"]) == 0
    assert {name: (study / name).read_text() for name in saved} == saved
    assert (study / "fit.png").is_file()
    assert {p: p.stat().st_mtime_ns for p in (study / "runs").rglob("stdout.log")} == trial_logs


@pytest.mark.parametrize(("extra", "message"), [
    (["--shapes=[]"], "shapes: give at least two"),
    (["--shapes=[64by2]"], "'64by2' is not DIMxLAYERS"),
    (["--shapes=[20x1]"], "dim a multiple of head_dim=8"),
    (["--budgets=[]"], "budgets: give positive"),
    (["--budgets=[1e3,1e4]"], "too small for any shape"),
    (["--max_steps=6"], "more than max_steps=6"),
    (["--max_steps=3"], "max_steps=3 is below min_steps=5"),
    (["--shapes=[16x1]"], "leave 2 runs over 1 shape"),
    (["--budgets=[6e8]"], "1 budget"),
    (["--holdout=[32x2@1e3]"], "holdout: 32x2@1000 gives 0 steps"),
    (["--holdout=[32x2]"], "not DIMxLAYERS@FLOPS"),
    (["--holdout=[24x1@6e8]"], "24x1@6e+08 is a point of the grid"),
    (["--pretrain=--train.steps=5"], "--train.steps is set by temper scaling"),
    (["--pretrain=--lr"], "'--lr' is not a --key=value flag"),
    (["--pretrain=--model.dim=5"], "--model.dim is set by temper scaling"),
    (["--model={dim: 8}"], "come from shapes"),
    (["--plan_only", "--fit_only"], "exclude each other"),
])
def test_grids_it_refuses(char_data, tmp_path, extra, message):
    with pytest.raises(ConfigError, match=message.replace("[", "\\[").replace("+", "\\+")):
        scaling.main([f"--data={char_data}", f"--dir={tmp_path}", *grid(*extra, "--plan_only")])


def test_fit_only_needs_a_study(tmp_path):
    with pytest.raises(ConfigError, match="plan.json"):
        scaling.main([f"--dir={tmp_path}", "--fit_only"])


def test_non_embedding_count_leaves_out_the_tables():
    """Kaplan's N: a tied and an untied model of one shape have the same N, and it is neither total."""
    counts = []
    for tie in (True, False):
        cfg = scaling.ScalingConfig(model={"tie_embeddings": tie}, head_dim=8)
        n, total, fpt = scaling.count(cfg, 100, 64, 2)
        assert n < total - 100 * 64 and math.isfinite(fpt)
        counts.append(n)
    assert counts[0] == counts[1] == non_embedding(64, 2, 100, 128)[0]
