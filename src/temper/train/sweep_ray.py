"""The Ray Tune backend of `temper sweep` (`backend=ray`): the same trial processes, watched the same way, as a Tune
experiment that can spread over the machines of a Ray cluster; OptunaSearch samples the same space, ASHA or the
median stopping rule prune, and the results go into the same table, best.yaml and plots (`sweep.write_report`).

It does not launch or watch trials itself (`sweep.launch`, `sweep.watch`). Ray is an extra, imported here only.
"""

from __future__ import annotations

import json
import math
import os
import re
import threading
from pathlib import Path
from typing import Any

from temper.files import atomic_write_text
from temper.train.sweep import (
    TRIALS_DIR,
    MetricWatch,
    Param,
    SweepError,
    SweepSection,
    TrialResult,
    TrialSpec,
    _distribution,
    _history,
    _identity,
    _optuna,
    _print,
    launch,
    watch,
    write_report,
)


def _ray_trial(config: dict[str, Any], spec: TrialSpec) -> None:
    """A Ray Tune function trainable: one trial process, each evaluation reported to Tune; a trial Tune stops
    (ASHA, median rule) gets its SIGTERM in the `finally` of `watch` (or the parent-death signal)."""
    from ray import tune

    name = f"trial-{tune.get_context().get_trial_id()}"
    worst = math.inf if spec.direction == "minimize" else -math.inf

    def report(step: int, value: float) -> bool:
        tune.report({spec.metric: value if math.isfinite(value) else worst, "step": step})
        return False  # Tune decides, and stops the trainable itself

    out = watch(launch(spec, dict(config), name, note="ray trial"), spec, spec.run_dir(name), threading.Event(), report)
    if out.state == "COMPLETE":
        tune.report({spec.metric: out.value, "step": out.steps, "complete": 1})
        return
    raise RuntimeError(f"trial {name} {out.state.lower()} (exit {out.exit_code}): {out.error}")


def run_ray(opts: SweepSection, recipe: str, base_args: list[str], space: dict[str, Param], sweep_dir: Path,
            grid: list[dict[str, Any]] | None = None) -> list[TrialResult]:
    """The sweep as a Ray Tune experiment under <sweep dir>/ray: OptunaSearch over the same space, ASHA for
    halving, the median stopping rule for median, `workers` trials at once; resumed with `Tuner.restore`."""
    try:
        import ray
        from ray import tune
        from ray.tune.schedulers import ASHAScheduler, FIFOScheduler, MedianStoppingRule
        from ray.tune.search.optuna import OptunaSearch
        from ray.tune.stopper import Stopper
    except ImportError as e:
        raise ImportError("the Ray backend needs Ray Tune: pip install 'temper[ray]'") from e
    optuna = _optuna()
    spec = TrialSpec(recipe, list(base_args), sweep_dir, opts.metric, opts.direction, opts.threads())
    mode = "min" if opts.direction == "minimize" else "max"
    trials = opts.trials if grid is None else min(opts.trials, len(grid))

    class StopOnBadInput(Stopper, tune.Callback):
        """A trial that exited 2 (bad input) ends the experiment: the others would fail alike."""

        def __init__(self) -> None:
            self.message = ""

        def __call__(self, trial_id: str, result: dict) -> bool:
            return False

        def stop_all(self) -> bool:
            return bool(self.message)

        def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
            text = Path(trial.error_file).read_text(errors="replace") if getattr(trial, "error_file", None) else ""
            found = re.findall(r"SweepError: (.*)", text)
            if found:
                self.message = found[-1]

    stopper = StopOnBadInput()
    storage, name = str(sweep_dir / "ray"), "tune"
    # The sweep it was started as, kept beside Tune's experiment: a resume must be the same sweep.
    identity = _identity(recipe, base_args, opts.metric, direction=opts.direction,
                         space={k: p.as_dict() for k, p in space.items()}, sampler=opts.sampler, pruner=opts.pruner)
    kept = Path(storage) / "sweep.json"
    if kept.exists() and tune.Tuner.can_restore(os.path.join(storage, name)):
        before = json.loads(kept.read_text())
        changed = [k for k in identity if before.get(k) != identity[k]]
        if changed:
            raise SweepError(f"{sweep_dir} holds a Ray sweep with another {', '.join(changed)}: to resume it, run the "
                             f"same sweep; to start another, choose another name (or remove {sweep_dir})")
    Path(storage).mkdir(parents=True, exist_ok=True)
    atomic_write_text(kept, json.dumps(identity, indent=1) + "\n")
    started = not ray.is_initialized()
    if started:
        ray.init(address=opts.ray_address or None, include_dashboard=False, log_to_driver=False)
    try:
        trainable = tune.with_parameters(_ray_trial, spec=spec)
        if tune.Tuner.can_restore(os.path.join(storage, name)):
            _print(f"{sweep_dir}: resuming the Ray Tune experiment")
            tuner = tune.Tuner.restore(os.path.join(storage, name), trainable, resume_unfinished=True)
        else:
            sampler = optuna.samplers.TPESampler(seed=opts.seed) if opts.sampler == "tpe" else \
                optuna.samplers.RandomSampler(seed=opts.seed)
            # metric and mode given to the searcher and scheduler themselves: Tune does not pass TuneConfig's on
            # through the concurrency limiter that max_concurrent_trials adds.
            target = {"metric": opts.metric, "mode": mode}
            search = OptunaSearch(space={k: _distribution(p) for k, p in space.items()}, sampler=sampler,
                                  points_to_evaluate=grid[:trials] if grid else None, **target)
            if opts.pruner == "halving":
                scheduler = ASHAScheduler(time_attr="step", max_t=10**9, grace_period=opts.min_resource or 1,
                                          reduction_factor=opts.reduction_factor, **target)
            elif opts.pruner == "median":
                scheduler = MedianStoppingRule(time_attr="step", grace_period=opts.warmup_steps,
                                               min_samples_required=max(opts.startup_trials, 1), **target)
            else:
                scheduler = FIFOScheduler()
            tuner = tune.Tuner(
                trainable,
                tune_config=tune.TuneConfig(search_alg=search, scheduler=scheduler, num_samples=trials,
                                            max_concurrent_trials=opts.workers),
                run_config=tune.RunConfig(name=name, storage_path=storage, stop=stopper, callbacks=[stopper],
                                          verbose=0))
        grid_results = tuner.fit()
    finally:
        if started:
            ray.shutdown()
    bad = [m for r in grid_results if r.error for m in re.findall(r"SweepError: (.*)", str(r.error))]
    if stopper.message or bad:  # (a restored experiment has its own stopper: the results say it too)
        raise SweepError(stopper.message or bad[-1])
    results = []
    for r in grid_results:
        # Tune names a trial's directory _ray_trial_<trial id>_<number from 1>_<values>_<time>.
        found = re.match(r"_ray_trial_([0-9a-f]+)_(\d+)_", Path(r.path).name)
        trial_id, number = (found[1], int(found[2]) - 1) if found else (Path(r.path).name, len(results))
        m = r.metrics or {}
        state = "FAIL" if r.error else ("COMPLETE" if m.get("complete") else "PRUNED")
        note = str(r.error).strip().splitlines()[-1][:300] if r.error else ""
        steps = MetricWatch(sweep_dir / TRIALS_DIR / f"trial-{trial_id}", opts.metric)
        steps.new()
        results.append(TrialResult(number, {k: r.config.get(k) for k in space}, state,
                                   m.get(opts.metric) if state != "FAIL" else None,
                                   sweep_dir / TRIALS_DIR / f"trial-{trial_id}", steps.steps, note))
    results.sort(key=lambda r: r.number)
    study = optuna.create_study(direction=opts.direction)  # in memory: for the plots
    dists = {k: _distribution(p) for k, p in space.items()}
    for r in results:
        history = dict(_history(r.run_dir, opts.metric))
        study.add_trial(optuna.trial.create_trial(
            state=getattr(optuna.trial.TrialState, r.state), params=r.params, distributions=dists,
            value=r.value if r.state == "COMPLETE" else None, intermediate_values=history))
    write_report(sweep_dir, study, results, metric=opts.metric, direction=opts.direction)
    return results
