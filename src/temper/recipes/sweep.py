"""`temper sweep`: a hyper-parameter search over any config keys of another recipe, with Optuna (or Ray Tune).

Steps:
 1. parse the config; the trials' fixed flags come from `args` and from everything after `--`
 2. read the search space (a YAML file, or the `space` mapping of the sweep's own YAML)
 3. run the study in <dir>/<name>: `trials` runs of `temper <recipe>`, `workers` at a time, each a run directory
    under trials/; the sampler picks each trial's values, the pruner stops the unpromising ones at an evaluation
    (the same command again resumes an interrupted sweep)
 4. write sweep.md (the table of trials), best.yaml (the best trial's config) and the plots, and print the table

    temper sweep --space=space.yaml --trials=12 --workers=2 --pruner=median -- \\
        --preset=debug --data.dir=data/wikitext2 --train.steps=300 --eval.every=50

The machinery (space, trial processes, study, Ray backend, report) is `temper.train.sweep`.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path

from temper import config
from temper.files import safe_join, safe_name
from temper.train import sweep
from temper.train.sweep import SweepSection


@dataclass
class SweepConfig(SweepSection):
    recipe: str = "pretrain"
    """The temper command each trial runs (pretrain, sft, dpo, ...)."""
    base_config: str = ""
    """A YAML config file every trial starts from (its --config)."""
    args: list[str] = field(default_factory=list)
    """Fixed flags of every trial, e.g. [--preset=debug, --train.steps=300]; also everything after `--`."""
    space: str | dict = ""
    """The search space: a YAML file, or the mapping itself: {optim.lr: {type: float, low: 1e-4, high: 1e-2,
    log: true}, schedule.warmup_steps: {type: int, low: 0, high: 100, step: 10}, preset: [debug, debug-llama]}."""
    dir: str = "sweeps"
    """Parent directory of sweep directories."""
    name: str = "sweep"
    """Sweep name: its directory <dir>/<name> holds study.db, trials/, sweep.md, best.yaml and the plots."""
    report_only: bool = False
    """Run nothing: write the table, best.yaml and plots of the sweep as it stands (an Optuna sweep)."""


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    trial_args: list[str] = []
    if "--" in argv:
        cut = argv.index("--")
        argv, trial_args = argv[:cut], argv[cut + 1:]
    cfg = config.parse(SweepConfig, argv, prog="sweep")
    sweep_dir = safe_join(cfg.dir, safe_name(cfg.name, what="sweep name"))
    if cfg.report_only:
        if cfg.backend == "ray":
            raise config.ConfigError("report_only: a Ray sweep writes its report when its experiment ends; rerun "
                                     "the sweep (it resumes) to write it again")
        study, results, started = sweep.open_report(Path(sweep_dir), cfg.storage)
        print(sweep.write_report(Path(sweep_dir).resolve(), study, results, metric=started.get("metric", cfg.metric),
                                 direction=started.get("direction", cfg.direction)), end="")
        return 0
    space = sweep.load_space(cfg.space)
    base_args = ([f"--config={cfg.base_config}"] if cfg.base_config else []) + list(cfg.args) + trial_args
    try:
        sweep.run_sweep(cfg, cfg.recipe, base_args, space, Path(sweep_dir))
    except sweep.SweepInterrupted as e:
        print(f"temper sweep: {e}", file=sys.stderr)
        return e.exit_code
    print((Path(sweep_dir) / "sweep.md").read_text(encoding="utf-8"), end="")
    return 0
