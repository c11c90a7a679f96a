"""`temper scaling`: plan model sizes x token budgets under compute budgets, train them, fit Chinchilla's laws.

Steps:
 1. parse the config; read the data's vocabulary; build each shape on the meta device to count its parameters
    N and its training FLOPs per token
 2. plan: for each compute budget C and shape, tokens D = C / 6N (`flops=6nd`) or C / flops_per_token
    (`flops=exact`), steps = D / tokens per step; points under `min_steps` steps are dropped (and listed);
    the `holdout` points join them; print the plan (`--plan_only` stops here)
 3. train every point as a `temper pretrain` trial through the sweep machinery (`temper.train.sweep.run_points`:
    resumable, `workers` in parallel), warm-up and cosine schedule stretched to each run's own length
 4. read each run's final validation loss and the tokens it really saw from its metrics.jsonl
 5. fit approach 3 (parametric L(N, D)) and approach 2 (IsoFLOP minima) on the planned runs, the held-out ones
    left out; bootstrap the compute-optimal N and D at `target_flops`; predict the held-out runs' losses
 6. write <dir>/scaling.md, fit.json and the plots (isoflop.png, fit.png); `--fit_only` redoes 5-6 from
    <dir>/plan.json and results.json

N is the non-embedding parameter count (Kaplan et al. 2020): the token and position tables and an untied output
head are left out. At the sizes a CPU trains, the vocabulary's rows are most of the parameters and they add
little capacity, so totals bend the power laws while non-embedding counts keep them straight (Kaplan's
figure 6). `flops=6nd` counts compute with that N, as Kaplan and Chinchilla do; `flops=exact` with temper's
training FLOPs per token (`Transformer.flops_per_token`, the MFU count: the head's matmul and attention
included), the wall-clock compute of a small model; the compute-optimal split is then found numerically along a
power law of FLOPs per token in N fitted over the planned shapes.

The fitting itself lives in `temper.eval.scaling`; the launching in `temper.train.sweep`.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from temper import config
from temper.data.shards import read_manifest
from temper.eval.scaling import (
    CHINCHILLA,
    CHINCHILLA_EXPONENTS,
    Bootstrap,
    FitError,
    IsoFlopFit,
    ParametricFit,
    Point,
    bootstrap_isoflop,
    bootstrap_parametric,
    fit_isoflop,
    fit_parametric,
    json_safe,
    plot_isoflop,
    plot_parametric,
)
from temper.files import atomic_write_json, atomic_write_text, read_json_object
from temper.model.config import PRESETS, ModelConfig
from temper.model.transformer import Transformer
from temper.train.log import read_metrics
from temper.train.sweep import SweepInterrupted, TrialResult, flag, run_points

SHAPE = re.compile(r"^(\d+)x(\d+)$")
HOLDOUT = re.compile(r"^(\d+x\d+)@(.+)$")
# pretrain keys this recipe sets for every run (or per point): given in `pretrain` they would fight the plan.
OWNED = ("preset", "data.dir", "data.val_dir", "train.steps", "train.micro_batch_size", "train.seq_len",
         "train.global_batch_tokens", "schedule.warmup_steps", "eval.every", "eval.batches", "run.name", "run.dir",
         "run.resume")


@dataclass
class ScalingConfig:
    """Options of `temper scaling`."""

    dir: str = "runs/scaling"
    """The study's directory: plan.json, results.json, scaling.md, fit.json, plots, and the runs under runs/."""
    data: str = "data/stdlib"
    """Prepared directory (`temper prepare`) every run trains on; its `val` split scores them."""
    val_dir: str = ""
    """A separately prepared directory whose `val` split is the validation set (same tokenizer); empty: data's."""
    preset: str = "debug"
    """Model family from temper.model.config.PRESETS; each shape sets its dim, n_layers and n_heads."""
    model: dict = field(default_factory=dict)
    """ModelConfig overrides shared by every shape, e.g. {mlp: swiglu}."""
    shapes: list[str] = field(default_factory=lambda: ["32x2", "48x2", "64x2", "64x3"])
    """Model shapes as DIMxLAYERS, e.g. [64x2, 96x3]."""
    head_dim: int = 16
    """Width of one attention head: n_heads = dim / head_dim."""
    budgets: list[float] = field(default_factory=lambda: [1e12, 3e12, 1e13])
    """Compute budgets C in training FLOPs; each gives an IsoFLOP curve over the shapes."""
    flops: Literal["6nd", "exact"] = "6nd"
    """How C is counted: 6nd: C = 6 N D with N non-embedding (Kaplan, Chinchilla); exact: C = D x temper's
    training FLOPs per token (head and attention included, the MFU count)."""
    seq_len: int = 128
    """Tokens per sequence (the model's max_seq_len)."""
    batch_size: int = 16
    """Sequences per optimizer step: tokens per step = batch_size x seq_len."""
    warmup_fraction: float = 0.1
    """Each run warms up over this fraction of its steps, then decays by cosine to its own end (Chinchilla)."""
    eval_batches: int = 20
    """Validation batches of batch_size sequences behind each run's final loss (the same windows for every run)."""
    min_steps: int = 20
    """Points with fewer optimizer steps are dropped from the plan (too short to train)."""
    max_steps: int = 0
    """Points with more optimizer steps are dropped (too long to run: a small shape at a large budget); 0: no cap."""
    holdout: list[str] = field(default_factory=list)
    """Held-out runs as DIMxLAYERS@FLOPS, e.g. [128x4@1e14]: trained, left out of the fits, their loss predicted."""
    pretrain: list[str] = field(default_factory=list)
    """More `temper pretrain` flags for every run, e.g. [--optim.lr=3e-3, --run.device=cpu]."""
    workers: int = 1
    """Runs trained at once (processes)."""
    threads_per_trial: int = 1
    """Torch threads of each run (0: torch's default)."""
    target_flops: float = 0.0
    """Budget to print the compute-optimal N and D for; 0: 10x the largest budget."""
    bootstrap: int = 200
    """Bootstrap resamples of the runs for the intervals; 0: none."""
    level: float = 0.9
    """Coverage of the percentile bootstrap intervals."""
    seed: int = 0
    """Seed of the bootstrap."""
    plan_only: bool = False
    """Print the plan and stop."""
    fit_only: bool = False
    """Refit from <dir>/plan.json and results.json (runs already trained; the plan keys given now are not read)."""

    def __post_init__(self) -> None:
        if not self.shapes:
            raise ValueError("shapes: give at least two model shapes, e.g. [64x2, 96x3]")
        for s in [*self.shapes, *(h.partition("@")[0] for h in self.holdout)]:
            m = SHAPE.match(s)
            if not m:
                raise ValueError(f"shapes: {s!r} is not DIMxLAYERS (e.g. 64x2)")
            if self.head_dim <= 0 or int(m[1]) <= 0 or int(m[2]) <= 0 or int(m[1]) % self.head_dim:
                raise ValueError(f"shapes: {s!r} needs dim and n_layers > 0 and dim a multiple of "
                                 f"head_dim={self.head_dim} (> 0)")
        if len(set(self.shapes)) != len(self.shapes):
            raise ValueError(f"shapes: {self.shapes} lists a shape twice")
        if not self.budgets or not all(math.isfinite(c) and c > 0 for c in self.budgets):
            raise ValueError(f"budgets: give positive FLOP counts, got {self.budgets}")
        if len(set(self.budgets)) != len(self.budgets):
            raise ValueError(f"budgets: {self.budgets} lists a budget twice")
        for h in self.holdout:
            m = HOLDOUT.match(h)
            if not m or not _positive_float(m[2]):
                raise ValueError(f"holdout: {h!r} is not DIMxLAYERS@FLOPS (e.g. 128x4@1e14)")
        if self.seq_len <= 0 or self.batch_size <= 0 or self.eval_batches <= 0 or self.min_steps <= 0:
            raise ValueError("seq_len, batch_size, eval_batches and min_steps must be > 0")
        if self.max_steps and self.max_steps < self.min_steps:
            raise ValueError(f"max_steps={self.max_steps} is below min_steps={self.min_steps} (0: no cap)")
        if not 0 <= self.warmup_fraction < 1:
            raise ValueError(f"warmup_fraction must be in [0, 1), got {self.warmup_fraction}")
        if self.workers <= 0 or self.threads_per_trial < 0 or self.bootstrap < 0:
            raise ValueError("workers must be > 0, threads_per_trial and bootstrap >= 0")
        if not 0 < self.level < 1:
            raise ValueError(f"level must be in (0, 1), got {self.level}")
        if self.target_flops < 0 or not math.isfinite(self.target_flops):
            raise ValueError(f"target_flops must be >= 0, got {self.target_flops}")
        if self.plan_only and self.fit_only:
            raise ValueError("plan_only and fit_only exclude each other")
        if self.preset not in PRESETS:
            raise ValueError(f"unknown preset {self.preset!r}; choose one of {', '.join(PRESETS)}")
        if clash := {"dim", "n_layers", "n_heads", "max_seq_len"} & set(self.model):
            raise ValueError(f"model: {sorted(clash)} come from shapes, head_dim and seq_len")
        for arg in self.pretrain:
            key = arg[2:].partition("=")[0].replace("-", "_")
            if not arg.startswith("--") or "=" not in arg:
                raise ValueError(f"pretrain: {arg!r} is not a --key=value flag")
            if key in OWNED or key.startswith("model."):
                raise ValueError(f"pretrain: --{key} is set by temper scaling (see its shapes, budgets, seq_len, "
                                 f"batch_size, warmup_fraction, eval_batches, data, model keys)")


def _positive_float(text: str) -> bool:
    try:
        return math.isfinite(float(text)) and float(text) > 0
    except ValueError:
        return False


@dataclass
class PlanPoint:
    """One planned run."""

    name: str
    budget: float
    dim: int
    n_layers: int
    n_heads: int
    n_params: int
    """Non-embedding parameters: the N of the fits."""
    total_params: int
    flops_per_token: float
    """temper's training FLOPs per token (6 x matmul weights + attention) at seq_len."""
    tokens: int
    """Planned training tokens (steps x tokens per step)."""
    steps: int
    holdout: bool = False
    dropped: str = ""
    """Why the point is not run (empty: it is)."""

    @property
    def shape(self) -> str:
        return f"{self.dim}x{self.n_layers}"


def count(cfg: ScalingConfig, vocab_size: int, dim: int, n_layers: int) -> tuple[int, int, float]:
    """(non-embedding parameters, all parameters, training FLOPs per token) of one shape, built on meta."""
    fields = dataclasses.asdict(PRESETS[cfg.preset]) | {"vocab_size": vocab_size} | cfg.model | {
        "dim": dim, "n_layers": n_layers, "n_heads": dim // cfg.head_dim, "max_seq_len": cfg.seq_len}
    model_cfg = config.from_dict(ModelConfig, fields, prefix="model.")
    with torch.device("meta"):
        model = Transformer(model_cfg)
    tables = [model.tok_emb, model.pos_emb, model.head]  # lookups, and the untied head (Kaplan leaves it out)
    embedding = sum(m.weight.numel() for m in tables if m is not None)
    total = model.num_params()
    return total - embedding, total, model.flops_per_token(cfg.seq_len)


def make_plan(cfg: ScalingConfig, vocab_size: int) -> list[PlanPoint]:
    """Every (budget, shape) point and the held-out ones, with their steps; refuses a grid no fit can use."""
    per_step = cfg.batch_size * cfg.seq_len
    counts: dict[str, tuple[int, int, float]] = {}

    def point(shape: str, budget: float, holdout: bool) -> PlanPoint:
        dim, n_layers = (int(x) for x in SHAPE.match(shape).groups())  # type: ignore[union-attr]
        if shape not in counts:
            counts[shape] = count(cfg, vocab_size, dim, n_layers)
        n, total, fpt = counts[shape]
        per_token = 6 * n if cfg.flops == "6nd" else fpt
        steps = round(budget / per_token / per_step)
        name = f"{'holdout-' if holdout else ''}c{budget:.6g}-{shape}".replace("+", "")
        dropped = (f"{steps} steps < min_steps={cfg.min_steps}" if steps < cfg.min_steps else
                   f"{steps} steps > max_steps={cfg.max_steps}" if cfg.max_steps and steps > cfg.max_steps else "")
        return PlanPoint(name, budget, dim, n_layers, dim // cfg.head_dim, n, total, fpt, steps * per_step, steps,
                         holdout, dropped)

    plan = [point(s, c, False) for c in sorted(cfg.budgets) for s in cfg.shapes]
    plan += [point(m[1], float(m[2]), True) for m in map(HOLDOUT.match, cfg.holdout) if m]
    kept = [p for p in plan if not p.dropped and not p.holdout]
    if not kept:
        need = min(6 * counts[s][0] if cfg.flops == "6nd" else counts[s][2] for s in cfg.shapes) * cfg.min_steps * per_step
        if any(p.steps >= cfg.min_steps for p in plan if not p.holdout):  # all of them too long
            raise config.ConfigError(f"budgets: {cfg.budgets} give every shape more than max_steps={cfg.max_steps} steps")
        raise config.ConfigError(f"budgets: {cfg.budgets} are too small for any shape: {cfg.min_steps} steps "
                                 f"(min_steps) of {per_step} tokens need C >= {need:.3g} FLOPs for the smallest one")
    grid = {(p.shape, p.budget) for p in plan if not p.holdout}
    for p in plan:
        if p.holdout and p.dropped:
            raise config.ConfigError(f"holdout: {p.shape}@{p.budget:g} gives {p.dropped}")
        if p.holdout and (p.shape, p.budget) in grid:
            raise config.ConfigError(f"holdout: {p.shape}@{p.budget:g} is a point of the grid (shapes x budgets)")
    if len(kept) < 5 or len({p.shape for p in kept}) < 2 or len({p.budget for p in kept}) < 2:
        raise config.ConfigError(
            f"budgets x shapes leave {len(kept)} runs over {len({p.shape for p in kept})} shape(s) and "
            f"{len({p.budget for p in kept})} budget(s) (after min_steps): the fits need at least 5 runs, 2 shapes "
            f"and 2 budgets (3 shapes per budget for IsoFLOP minima)")
    return plan


def plan_table(plan: list[PlanPoint], cfg_flops: str) -> str:
    rows = ["| budget C | shape | heads | N (non-emb) | params | FLOPs/token | tokens D | steps | D/N | note |",
            "| ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |"]
    for p in plan:
        note = f"dropped: {p.dropped}" if p.dropped else ("held out" if p.holdout else "")
        rows.append(f"| {p.budget:.3g} | {p.shape} | {p.n_heads} | {p.n_params:,} | {p.total_params:,} | "
                    f"{p.flops_per_token:.3g} | {p.tokens:,} | {p.steps} | {p.tokens / p.n_params:.1f} | {note} |")
    return "\n".join(rows) + f"\n\nC counted as {'6 N D' if cfg_flops == '6nd' else 'D x FLOPs/token'}."


def pretrain_args(cfg: ScalingConfig) -> list[str]:
    """The flags every run shares: data, family, batch, evaluation at the end only, no interim checkpoints."""
    model = [flag(f"model.{k}", v) for k, v in cfg.model.items()]
    return [f"--preset={cfg.preset}", f"--data.dir={cfg.data}", *([f"--data.val_dir={cfg.val_dir}"] * bool(cfg.val_dir)),
            f"--model.max_seq_len={cfg.seq_len}", f"--train.micro_batch_size={cfg.batch_size}", "--eval.every=0",
            f"--eval.batches={cfg.eval_batches}", "--checkpoint.every=0", *model, *cfg.pretrain]


def overrides(p: PlanPoint, cfg: ScalingConfig) -> dict[str, Any]:
    return {"model.dim": p.dim, "model.n_layers": p.n_layers, "model.n_heads": p.n_heads, "train.steps": p.steps,
            "schedule.warmup_steps": round(cfg.warmup_fraction * p.steps)}


def train_points(cfg: ScalingConfig, plan: list[PlanPoint]) -> list[dict[str, Any]]:
    """Run every kept point; one result row per planned point (dropped ones included, marked)."""
    todo = [p for p in plan if not p.dropped]
    trials = run_points("pretrain", pretrain_args(cfg), [overrides(p, cfg) for p in todo], Path(cfg.dir) / "runs",
                        workers=cfg.workers, metric="val_loss", threads_per_trial=cfg.threads_per_trial)
    by_name = {p.name: t for p, t in zip(todo, trials, strict=True)}
    return [read_result(p, by_name.get(p.name)) for p in plan]


def read_result(p: PlanPoint, trial: TrialResult | None) -> dict[str, Any]:
    """The run's final validation loss and the tokens it really trained on (its metrics.jsonl)."""
    row: dict[str, Any] = {"name": p.name, "state": "DROPPED" if trial is None else trial.state, "loss": None,
                           "tokens": None, "steps": None, "run_dir": None if trial is None else str(trial.run_dir)}
    if trial is None or trial.state != "COMPLETE":
        return row
    records = read_metrics(Path(trial.run_dir) / "metrics.jsonl")
    train = [r for r in records if r.get("kind") == "train" and "tokens" in r]
    val = [r for r in records if r.get("kind") == "val" and isinstance(r.get("val_loss"), (int, float))]
    if not train or not val:
        return row | {"state": "FAIL"}
    return row | {"loss": float(val[-1]["val_loss"]), "tokens": int(train[-1]["tokens"]), "steps": train[-1]["step"]}


def flops_per_token_law(plan: list[PlanPoint]) -> tuple[float, float]:
    """(p, q) of log FLOPs/token = p log N + q over the planned shapes: the family's FLOPs as a function of N."""
    shapes = {p.shape: p for p in plan}.values()
    slope, icept = np.polyfit(np.log([p.n_params for p in shapes]), np.log([p.flops_per_token for p in shapes]), 1)
    return float(slope), float(icept)


@dataclass
class Study:
    """Everything the report shows: the fits, their intervals, the held-out predictions."""

    target: float
    parametric: ParametricFit | None = None
    parametric_error: str = ""
    isoflop: IsoFlopFit | None = None
    isoflop_error: str = ""
    parametric_boot: Bootstrap | None = None
    isoflop_boot: Bootstrap | None = None
    held_out: list[dict[str, Any]] = field(default_factory=list)
    flops_per_token: Callable[[float], float] | None = None
    """flops=exact: the family's FLOPs per token as a function of N (None: C = 6 N D)."""


def fit_study(cfg: ScalingConfig, plan: list[PlanPoint], results: list[dict[str, Any]], flops: str) -> tuple[
        Study, list[Point], list[Point]]:
    """Both fits on the planned runs; the held-out runs' predicted and measured losses."""
    target = cfg.target_flops or 10 * max(p.budget for p in plan if not p.holdout)
    law = flops_per_token_law(plan) if flops == "exact" else None
    fpt = None if law is None else (lambda n: math.exp(law[1]) * n ** law[0])
    done = [(p, r) for p, r in zip(plan, results, strict=True) if r["loss"] is not None]
    fitted = [Point(p.n_params, r["tokens"], r["loss"], p.budget) for p, r in done if not p.holdout]
    held = [Point(p.n_params, r["tokens"], r["loss"], p.budget) for p, r in done if p.holdout]
    study = Study(target, flops_per_token=fpt)
    try:
        study.parametric = fit_parametric(fitted)
    except FitError as e:
        study.parametric_error = str(e)
    try:
        study.isoflop = fit_isoflop(fitted)
    except FitError as e:
        study.isoflop_error = str(e)
    if cfg.bootstrap and study.parametric is not None:
        study.parametric_boot = bootstrap_parametric(fitted, study.parametric, target, resamples=cfg.bootstrap,
                                                     level=cfg.level, seed=cfg.seed, flops_per_token=fpt)
    if cfg.bootstrap and study.isoflop is not None:
        study.isoflop_boot = bootstrap_isoflop(fitted, study.isoflop, target, resamples=cfg.bootstrap,
                                               level=cfg.level, seed=cfg.seed)
    if study.parametric is not None:
        for (p, r), h in zip([(p, r) for p, r in done if p.holdout], held, strict=True):
            pred = float(study.parametric.predict(h.n, h.d))
            study.held_out.append({"name": p.name, "shape": p.shape, "budget": p.budget, "n_params": p.n_params,
                                   "tokens": r["tokens"], "measured": r["loss"], "predicted": pred,
                                   "relative_error": (pred - r["loss"]) / r["loss"]})
    return study, fitted, held


def _g(x: float | None, digits: int = 3) -> str:
    return "n/a" if x is None or not math.isfinite(x) else f"{x:.{digits}g}"


def _iv(boot: Bootstrap | None, key: str) -> str:
    if boot is None:
        return ""
    iv = boot.intervals[key]
    return f" [{_g(iv.low)}, {_g(iv.high)}]"


def fit_json(cfg: ScalingConfig, study: Study, flops: str) -> dict[str, Any]:
    out: dict[str, Any] = {"target_flops": study.target, "flops": flops, "n": "non-embedding parameters",
                           "chinchilla": {"approach 3": CHINCHILLA, "exponents": CHINCHILLA_EXPONENTS}}
    fpt = study.flops_per_token
    if study.parametric is not None:
        n, d = study.parametric.optimal(study.target, fpt)
        out["parametric"] = json_safe(study.parametric) | {"a": study.parametric.a, "b": study.parametric.b,
                                                         "n_opt": n, "d_opt": d}
    else:
        out["parametric_error"] = study.parametric_error
    if study.isoflop is not None:
        n, d = study.isoflop.optimal(study.target)
        out["isoflop"] = json_safe(study.isoflop) | {"n_opt": n, "d_opt": d}
    else:
        out["isoflop_error"] = study.isoflop_error
    for key, boot in (("parametric_bootstrap", study.parametric_boot), ("isoflop_bootstrap", study.isoflop_boot)):
        if boot is not None:
            out[key] = boot
    out["held_out"] = study.held_out
    return json_safe(out)


def report(cfg: ScalingConfig, plan: list[PlanPoint], results: list[dict[str, Any]], study: Study, flops: str,
           plots: list[str]) -> tuple[str, str]:
    """(scaling.md, the short summary printed at the end)."""
    fit, iso, t = study.parametric, study.isoflop, study.target
    md = [f"# Scaling study `{cfg.dir}`", "",
          f"N: non-embedding parameters. C: {'6 N D' if flops == '6nd' else 'D x temper FLOPs/token'}. "
          f"Losses: final validation loss (nats/token).", "", "## Plan", "", plan_table(plan, flops), "",
          "## Runs", "", "| run | budget C | shape | N | tokens D | steps | val loss | L(N, D) fit | state |",
          "| --- | ---: | --- | ---: | ---: | ---: | ---: | ---: | --- |"]
    for p, r in zip(plan, results, strict=True):
        pred = _g(float(fit.predict(p.n_params, r["tokens"])), 4) if fit and r["loss"] is not None else ""
        tokens = f"{r['tokens']:,}" if r["tokens"] else ""
        md.append(f"| {p.name} | {p.budget:.3g} | {p.shape} | {p.n_params:,} | {tokens} | "
                  f"{r['steps'] or ''} | {_g(r['loss'], 4) if r['loss'] else ''} | {pred} | "
                  f"{r['state'] + (' (held out)' if p.holdout else '')} |")
    summary = [f"compute-optimal at C = {t:.3g} FLOPs ({cfg.level:.0%} bootstrap intervals):"]
    md += ["", "## Approach 3: parametric fit L(N, D) = E + A/N^alpha + B/D^beta", ""]
    if fit is not None:
        b = study.parametric_boot
        n, d = fit.optimal(t, study.flops_per_token)
        md += ["| | E | A | B | alpha | beta | a = beta/(alpha+beta) | b |", "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
               f"| this fit | {_g(fit.E)}{_iv(b, 'E')} | {_g(fit.A)} | {_g(fit.B)} | {_g(fit.alpha)}{_iv(b, 'alpha')} | "
               f"{_g(fit.beta)}{_iv(b, 'beta')} | {_g(fit.a)}{_iv(b, 'a')} | {_g(fit.b)} |",
               f"| Chinchilla (Hoffmann et al. 2022) | {CHINCHILLA['E']} | {CHINCHILLA['A']} | {CHINCHILLA['B']} | "
               f"{CHINCHILLA['alpha']} | {CHINCHILLA['beta']} | {CHINCHILLA_EXPONENTS['approach 3'][0]} | "
               f"{CHINCHILLA_EXPONENTS['approach 3'][1]} |", "",
               f"Huber objective {fit.objective:.3g} over {fit.n_points} runs. At C = {t:.3g}: N_opt = {_g(n)}"
               f"{_iv(b, 'n_opt')}, D_opt = {_g(d)}{_iv(b, 'd_opt')}, D/N = {_g(d / n)}."]
        summary.append(f"  approach 3 (parametric): N_opt = {_g(n)}{_iv(b, 'n_opt')}, D_opt = {_g(d)}{_iv(b, 'd_opt')}"
                       f"  (alpha={_g(fit.alpha)}, beta={_g(fit.beta)}, E={_g(fit.E)}; Chinchilla 0.34, 0.28, 1.69)")
        if b is not None:
            md.append(f"Bootstrap: {b.resamples} resamples of the runs within each budget, {b.failed} failed.")
        if fit.at_bounds:
            md.append(f"**Warning**: {', '.join(fit.at_bounds)} ended on the optimiser's bounds: these runs do not "
                      f"determine the law (more runs, or a wider range of N and D, would).")
            summary.append(f"  warning: {', '.join(fit.at_bounds)} at the fit's bounds: the runs do not determine the law")
    else:
        md.append(f"Not fitted: {study.parametric_error}")
        summary.append(f"  approach 3: not fitted ({study.parametric_error})")
    md += ["", "## Approach 2: IsoFLOP minima", ""]
    if iso is not None:
        b = study.isoflop_boot
        n, d = iso.optimal(t)
        md += ["| budget C | runs | N* | D* | loss at N* | vertex within the sizes |", "| ---: | ---: | ---: | ---: | ---: | --- |"]
        md += [f"| {k.budget:.3g} | {k.n_points} | {_g(k.n_opt)} | {_g(k.d_opt)} | {_g(k.loss_opt, 4)} | "
               f"{'yes' if k.inside else 'no (extrapolated)'} |" for k in iso.curves]
        md += [f"| {c:.3g} | | skipped: {why} | | | |" for c, why in iso.skipped]
        md += ["", f"N* ~ C^{_g(iso.a)}{_iv(b, 'a')}, D* ~ C^{_g(iso.b)}{_iv(b, 'b')} (Chinchilla approach 2: "
               f"{CHINCHILLA_EXPONENTS['approach 2'][0]} / {CHINCHILLA_EXPONENTS['approach 2'][1]}). At C = {t:.3g}: "
               f"N* = {_g(n)}{_iv(b, 'n_opt')}, D* = {_g(d)}{_iv(b, 'd_opt')}."]
        summary.append(f"  approach 2 (IsoFLOP):    N* = {_g(n)}{_iv(b, 'n_opt')}, D* = {_g(d)}{_iv(b, 'd_opt')}"
                       f"  (N* ~ C^{_g(iso.a)}, D* ~ C^{_g(iso.b)}; Chinchilla 0.49, 0.51)")
    else:
        md.append(f"Not fitted: {study.isoflop_error}")
        summary.append(f"  approach 2: not fitted ({study.isoflop_error})")
    if study.held_out:
        md += ["", "## Held-out runs", "", "| run | N | tokens D | measured | predicted L(N, D) | relative error |",
               "| --- | ---: | ---: | ---: | ---: | ---: |"]
        for h in study.held_out:
            md.append(f"| {h['name']} | {h['n_params']:,} | {h['tokens']:,} | {h['measured']:.4f} | {h['predicted']:.4f} | "
                      f"{h['relative_error']:+.2%} |")
            summary.append(f"  held out {h['name']}: measured {h['measured']:.4f}, predicted {h['predicted']:.4f} "
                           f"({h['relative_error']:+.2%})")
    if plots:
        md += ["", "## Plots", "", *[f"![{Path(x).stem}]({x})" for x in plots]]
    return "\n".join(md) + "\n", "\n".join(summary)


def main(argv: list[str] | None = None) -> int:
    cfg = config.parse(ScalingConfig, argv, prog="scaling")
    return run(cfg)


def run(cfg: ScalingConfig) -> int:
    out = Path(cfg.dir)
    if cfg.fit_only:
        saved, res_file = read_json_object(out / "plan.json", config.ConfigError), out / "results.json"
        if not res_file.is_file():
            raise config.ConfigError(f"fit_only: {res_file} not found: train the study first (without --fit_only)")
        runs = read_json_object(res_file, config.ConfigError)
        try:
            plan = [PlanPoint(**p) for p in saved["points"]]
            results, flops = runs["runs"], saved["flops"]
            if len(results) != len(plan) or flops not in ("6nd", "exact"):
                raise ValueError("results.json does not match plan.json")
        except (KeyError, TypeError, ValueError) as e:
            raise config.ConfigError(f"fit_only: {out} is not a scaling study written by temper scaling ({e})") from None
    else:
        plan, flops = make_plan(cfg, read_manifest(cfg.data)["vocab_size"]), cfg.flops
        print(f"temper scaling: plan of {sum(not p.dropped for p in plan)} runs, "
              f"{cfg.batch_size * cfg.seq_len} tokens per step\n{plan_table(plan, flops)}")
        if cfg.plan_only:
            return 0
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_json(out / "plan.json", {"flops": flops, "points": [dataclasses.asdict(p) for p in plan]})
        try:
            results = train_points(cfg, plan)
        except SweepInterrupted as e:
            print(f"temper scaling: interrupted; the same command continues the study in {out}")
            return e.exit_code
        atomic_write_json(out / "results.json", {"runs": results})
        if failed := [r["name"] for r in results if r["state"] not in ("COMPLETE", "DROPPED")]:
            print(f"temper scaling: {len(failed)} run(s) did not finish and are left out: {', '.join(failed)}")
    study, fitted, held = fit_study(cfg, plan, results, flops)
    plots = []
    try:
        if study.isoflop is not None:
            plots.append(plot_isoflop(fitted, study.isoflop, out / "isoflop.png").name)
        if study.parametric is not None:
            plots.append(plot_parametric(fitted, study.parametric, out / "fit.png", held_out=held).name)
    except ImportError:  # matplotlib is the plots extra
        print("temper scaling: matplotlib is not installed: no plots (pip install 'temper[plots]')")
    md, summary = report(cfg, plan, results, study, flops, plots)
    atomic_write_text(out / "scaling.md", md)
    atomic_write_json(out / "fit.json", fit_json(cfg, study, flops))
    print(f"{summary}\nreport: {out / 'scaling.md'}")
    return 0
