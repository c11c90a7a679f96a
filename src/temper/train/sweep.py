"""Hyper-parameter sweeps: many runs of one recipe, each a normal run directory, driven by an Optuna study.

A trial is one `python -m temper <recipe> <fixed args> --<key>=<value>...` process whose run directory is
`<sweep dir>/trials/trial-NNNN`. This module parses the search space (`load_space`: float / log-float, int,
categorical per config key), launches a trial and watches its `metrics.jsonl`, reporting each evaluation of
the metric to the study so that a pruner (median, successive halving) can stop it, by SIGTERM (the run
checkpoints and exits 143). The study lives in SQLite in the sweep directory; `workers` trials run at once
(threads in this process, each waiting on its own trial process: the work is in the children, and one
process asking for trials launches exactly `trials` of them, where independent workers would overshoot).
A trial process exiting 2 (bad input: a typo in the space) stops the whole sweep with its message.

Resume: the same command again continues the study. A trial left running by a killed sweep, or stopped by a
Ctrl-C / SIGTERM of it, is run again with the same values in the same run directory, so its run resumes from
its checkpoint (trial processes get SIGTERM when their sweep dies: Linux's parent-death signal).

`run_points` runs fixed points (other recipes' grids: `temper scaling`) with the same machinery; `sweep_ray.run_ray`
runs the sweep as a Ray Tune experiment (across machines); `write_report` writes the table of trials
(`sweep.md`), the best trial's config (`best.yaml`) and Optuna's plots.

It does not know any recipe (it only launches `temper` commands) and computes no training number. Optuna and
Ray are optional extras, imported when used.
"""

from __future__ import annotations

import fcntl
import itertools
import json
import math
import os
import re
import signal
import subprocess
import sys
import threading
import time
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import yaml

from temper.config import ConfigError, load_yaml
from temper.errors import InputError
from temper.files import atomic_write_text
from temper.train.log import METRICS_FILE, read_metrics
from temper.train.run import EXIT_PREEMPTED, LOCK_FILE, locked_run_dir

if TYPE_CHECKING:
    import optuna

TRIALS_DIR = "trials"
"""In the sweep directory: the trials' run directories."""

POLL_S = 0.2
"""How often a trial's metrics.jsonl is looked at (a stat; read only when it changed)."""

STUDY = "temper-sweep"
"""The study of `run_sweep` in its storage; `run_points` uses POINTS_STUDY."""

POINTS_STUDY = "temper-points"

SET_BY_SWEEP = ("run.dir", "run.name", "run.resume")
"""Keys the sweep sets for every trial (its run directory): neither the space nor the fixed args may."""


class SweepError(InputError):
    """The sweep cannot go on: a trial that exited 2 (its message), a changed sweep on resume (a bad space or bad
    trial args are a ConfigError)."""


class SweepInterrupted(Exception):
    """SIGTERM or Ctrl-C stopped the sweep after its running trials checkpointed; the same command resumes it."""

    exit_code = EXIT_PREEMPTED


def _optuna() -> Any:
    try:
        import optuna
    except ImportError as e:
        raise ImportError("sweeps need Optuna: pip install 'temper[experiments]'") from e
    optuna.logging.set_verbosity(optuna.logging.WARNING)  # the sweep prints one line per trial itself
    return optuna


# ---- the search space ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Param:
    """One config key's range: float (`log` for log-uniform, `step` for a grid), int, or categorical."""

    type: Literal["float", "int", "categorical"]
    low: float | int | None = None
    high: float | int | None = None
    log: bool = False
    step: float | int | None = None
    choices: tuple = ()

    def as_dict(self) -> dict[str, Any]:
        if self.type == "categorical":
            return {"type": "categorical", "choices": list(self.choices)}
        out: dict[str, Any] = {"type": self.type, "low": self.low, "high": self.high}
        if self.log:
            out["log"] = True
        if self.step is not None:
            out["step"] = self.step
        return out


_KEY = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*")
_SPEC_KEYS = {"float": {"type", "low", "high", "log", "step"}, "int": {"type", "low", "high", "log", "step"},
              "categorical": {"type", "choices"}}


def _number(value: Any, where: str, name: str, integer: bool) -> int | float:
    if isinstance(value, str) and not integer:  # YAML 1.1 reads 1e-4 (no dot) as a string
        try:
            value = float(value)
        except ValueError:
            pass
    ok = isinstance(value, int) if integer else isinstance(value, (int, float))
    if not ok or isinstance(value, bool) or (isinstance(value, float) and not math.isfinite(value)):
        raise ConfigError(f"{where}: {name} must be {'an integer' if integer else 'a finite number'}, got {value!r}")
    return value


def parse_space(data: Mapping[str, Any], source: str = "space") -> dict[str, Param]:
    """The search space from its YAML mapping `{config.key: {type: float|int|categorical, ...}}` (a bare list is
    a categorical's choices); every error names the key and `source`."""
    if not isinstance(data, Mapping) or not data:
        raise ConfigError(f"{source}: the search space must be a non-empty mapping of config keys to ranges")
    space: dict[str, Param] = {}
    for key, spec in data.items():
        where = f"{source}: {key}"
        if not isinstance(key, str) or not _KEY.fullmatch(key):
            raise ConfigError(f"{source}: {key!r} is not a config key (section.key)")
        if key in SET_BY_SWEEP:
            raise ConfigError(f"{where}: set by the sweep for each trial (its run directory)")
        if isinstance(spec, list):
            spec = {"type": "categorical", "choices": spec}
        if not isinstance(spec, Mapping):
            raise ConfigError(f"{where}: expected {{type: float|int|categorical, ...}} or a list of choices, got {spec!r}")
        kind = spec.get("type")
        if kind not in _SPEC_KEYS:
            raise ConfigError(f"{where}: type must be float, int or categorical, got {kind!r}")
        unknown = sorted(set(spec) - _SPEC_KEYS[kind])
        if unknown:
            raise ConfigError(f"{where}: unknown field {unknown[0]!r} for type {kind} (fields: "
                             f"{', '.join(sorted(_SPEC_KEYS[kind] - {'type'}))})")
        if kind == "categorical":
            choices = spec.get("choices")
            if not isinstance(choices, list) or not choices:
                raise ConfigError(f"{where}: choices must be a non-empty list")
            bad = [c for c in choices if c is not None and not isinstance(c, (bool, int, float, str))]
            if bad:
                raise ConfigError(f"{where}: choices must be numbers, strings, booleans or null, got {bad[0]!r}")
            if len({json.dumps(c) for c in choices}) != len(choices):
                raise ConfigError(f"{where}: choices repeat a value")
            space[key] = Param("categorical", choices=tuple(choices))
            continue
        integer = kind == "int"
        if "low" not in spec or "high" not in spec:
            raise ConfigError(f"{where}: a {kind} range needs low and high")
        low, high = (_number(spec[n], where, n, integer) for n in ("low", "high"))
        log = spec.get("log", False)
        if not isinstance(log, bool):
            raise ConfigError(f"{where}: log must be true or false, got {log!r}")
        if low > high or (low == high and not integer):
            raise ConfigError(f"{where}: low ({low}) must be below high ({high})")
        if log and low <= 0:
            raise ConfigError(f"{where}: a log range needs low > 0, got {low}")
        step = spec.get("step")
        if step is not None:
            step = _number(step, where, "step", integer)
            if step <= 0:
                raise ConfigError(f"{where}: step must be > 0, got {step}")
            if log:
                raise ConfigError(f"{where}: step and log cannot be combined")
        space[key] = Param(kind, low=low, high=high, log=log, step=step)
    return space


def load_space(spec: str | Path | Mapping[str, Any]) -> dict[str, Param]:
    """The search space from a YAML file, or from the mapping itself (e.g. a sweep config's inline `space`)."""
    if isinstance(spec, Mapping):
        return parse_space(spec, "space")
    if not str(spec):
        raise ConfigError("space: name a YAML file of config keys and ranges, or give the mapping")
    return parse_space(load_yaml(spec), str(spec))


def grid_points(space: dict[str, Param]) -> list[dict[str, Any]]:
    """Every combination of the space's values, in order (grid sampling): categorical choices, ints by `step`
    (default 1), floats by their `step` (a float range without one has no grid)."""
    axes = []
    for key, p in space.items():
        if p.type == "categorical":
            axes.append(list(p.choices))
        elif p.step is None and p.type == "float":
            raise ConfigError(f"space: {key}: the grid sampler needs a step for a float range (or list its choices)")
        else:
            step = p.step or 1
            n = int(math.floor((p.high - p.low) / step + 1e-9)) + 1
            axes.append([p.low + i * step if p.type == "int" else round(p.low + i * step, 12) for i in range(n)])
    return [dict(zip(space, combo, strict=True)) for combo in itertools.product(*axes)]


def _distribution(p: Param) -> Any:
    dist = _optuna().distributions
    if p.type == "categorical":
        return dist.CategoricalDistribution(list(p.choices))
    cls = dist.IntDistribution if p.type == "int" else dist.FloatDistribution
    return cls(p.low, p.high, log=p.log, step=p.step if p.type == "float" else (p.step or 1))


def _suggest(trial: optuna.Trial, space: dict[str, Param]) -> dict[str, Any]:
    """The trial's values: sampled, or fixed when the trial was enqueued with them (a grid point, a retry)."""
    out: dict[str, Any] = {}
    for key, p in space.items():
        if p.type == "categorical":
            out[key] = trial.suggest_categorical(key, list(p.choices))
        elif p.type == "int":
            out[key] = trial.suggest_int(key, p.low, p.high, step=p.step or 1, log=p.log)
        else:
            out[key] = trial.suggest_float(key, p.low, p.high, step=p.step, log=p.log)
    return out


# ---- one trial: its process and what it logs -------------------------------------------------------------


def flag(key: str, value: Any) -> str:
    """`--key=value` with the value written so that temper's flag parser reads it back as it is (YAML: a float
    keeps its dot, `1.0e-05`, which YAML 1.1 would otherwise read as a string)."""
    if isinstance(value, str):
        return f"--{key}={value}"
    text = yaml.safe_dump(value, default_flow_style=True, width=1 << 30).strip()
    return f"--{key}={text.removesuffix('...').strip()}"


def _given(args: list[str], key: str) -> bool:
    return any(a == f"--{key}" or a.startswith(f"--{key}=") for a in args)


def check_args(base_args: list[str]) -> None:
    """The fixed args leave the run directory to the sweep."""
    for key in SET_BY_SWEEP:
        if _given(base_args, key):
            raise ConfigError(f"--{key} is set by the sweep for each trial (its run directory): leave it out")


def without(args: list[str], keys: Iterable[str]) -> list[str]:
    """`args` less the flags that set one of `keys` (`--key=value`, or `--key value`): a trial's own value replaces
    a fixed one rather than follows it (a list field given twice would collect both)."""
    keys = set(keys)
    out, skip = [], False
    for i, a in enumerate(args):
        if skip:
            skip = False
            continue
        key = a[2:].partition("=")[0].replace("-", "_") if a.startswith("--") else None
        if key in keys:
            skip = "=" not in a and i + 1 < len(args) and not args[i + 1].startswith("--")
            continue
        out.append(a)
    return out


@dataclass
class TrialSpec:
    """What every trial of a sweep runs, and where."""

    recipe: str
    base_args: list[str]
    sweep_dir: Path
    metric: str = "val_loss"
    direction: Literal["minimize", "maximize"] = "minimize"
    threads: int = 0
    """OMP_NUM_THREADS of each trial process; 0: the environment's."""
    cwd: Path = field(default_factory=Path.cwd)
    """Where trial processes run (relative paths in the args are relative to it)."""

    def run_dir(self, name: str) -> Path:
        return self.sweep_dir / TRIALS_DIR / name

    def command(self, values: Mapping[str, Any], name: str) -> list[str]:
        """The trial's argv after `temper`: fixed args, then the trial's values, then its run directory."""
        return [self.recipe, *without(self.base_args, values), *(flag(k, v) for k, v in values.items()),
                f"--run.dir={self.sweep_dir / TRIALS_DIR}", f"--run.name={name}", "--run.resume=auto",
                "--log.progress=false"]


# Runs `temper` in the trial process after asking Linux to SIGTERM it when the thread that started it dies (a
# killed sweep): the run then checkpoints and exits instead of training on, holding its run directory.
_LAUNCHER = """\
import os, signal, sys
if sys.platform.startswith("linux"):
    import ctypes
    ctypes.CDLL(None).prctl(1, int(signal.SIGTERM))  # PR_SET_PDEATHSIG
    if os.getppid() != int(os.environ.pop("TEMPER_SWEEP_PARENT", os.getppid())):
        sys.exit(143)  # the sweep died before the line above
from temper.__main__ import main
sys.exit(main(sys.argv[1:]))
"""


def _wait_unlocked(run_dir: Path, timeout_s: float = 120.0) -> None:
    """Wait until no process holds the run directory (a killed sweep's trial still writing its checkpoint)."""
    lock = run_dir / LOCK_FILE
    if not lock.exists():
        return
    deadline = time.monotonic() + timeout_s
    with open(lock, "a+") as f:
        while True:
            try:
                fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
                fcntl.flock(f.fileno(), fcntl.LOCK_UN)
                return
            except BlockingIOError:
                if time.monotonic() > deadline:
                    return  # the trial will say who holds it (exit 2)
                time.sleep(0.5)


def launch(spec: TrialSpec, values: Mapping[str, Any], name: str, note: str = "") -> subprocess.Popen:
    """Start one trial process; its output goes to <run dir>/stdout.log (appended to, attempt after attempt)."""
    run_dir = spec.run_dir(name)
    run_dir.mkdir(parents=True, exist_ok=True)
    _wait_unlocked(run_dir)
    argv = spec.command(values, name)
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "TEMPER_SWEEP_PARENT": str(os.getpid())}
    if spec.threads:
        env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = str(spec.threads)
    with open(run_dir / "stdout.log", "a", encoding="utf-8") as log:
        stamp = datetime.now(timezone.utc).isoformat(timespec="seconds")
        log.write(f"# {stamp} {note}\n# temper {' '.join(argv)}\n")
        log.flush()
        return subprocess.Popen([sys.executable, "-c", _LAUNCHER, *argv], stdout=log, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, cwd=spec.cwd, env=env)


class MetricWatch:
    """The new values of one metric in a run's metrics.jsonl, in step order (read only when the file changed)."""

    def __init__(self, run_dir: Path, metric: str) -> None:
        self.path, self.metric = run_dir / METRICS_FILE, metric
        self.last_step = -1
        self.last_value: float | None = None
        self.steps = 0
        """The highest step in the file (training steps reached)."""
        self._stat: tuple | None = None

    def new(self) -> list[tuple[int, float]]:
        """(step, value) pairs not returned before; a non-finite value (logged as null) comes as NaN."""
        try:
            st = self.path.stat()
        except FileNotFoundError:
            return []
        if (st.st_mtime_ns, st.st_size) == self._stat:
            return []
        self._stat = (st.st_mtime_ns, st.st_size)
        records = read_metrics(self.path)
        self.steps = max((r["step"] for r in records), default=0)
        out = []
        for r in records:
            if self.metric in r and r["step"] > self.last_step:
                value = r[self.metric]
                value = float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else math.nan
                out.append((r["step"], value))
                self.last_step, self.last_value = r["step"], value
        return out


def _tail(run_dir: Path, lines: int = 12) -> str:
    """The end of a trial's output: what it said when it failed."""
    try:
        text = (run_dir / "stdout.log").read_text(encoding="utf-8", errors="replace")
    except OSError:
        return ""
    return "\n".join(line for line in text.splitlines()[-lines:] if not line.startswith("# "))


def _error_line(run_dir: Path) -> str:
    """The one-line message of a trial that exited 2 (temper prints `temper <recipe>: ...` last)."""
    lines = [line for line in _tail(run_dir, 40).splitlines() if line.strip()]
    said = [line for line in lines if line.startswith("temper ")]
    return (said or lines or ["no output"])[-1]


@dataclass
class Outcome:
    """How a trial process ended, as the sweep sees it."""

    state: Literal["COMPLETE", "PRUNED", "FAIL", "INTERRUPTED"]
    value: float | None
    steps: int
    exit_code: int
    error: str = ""


def watch(proc: subprocess.Popen, spec: TrialSpec, run_dir: Path, stop: threading.Event,
          report: Callable[[int, float], bool]) -> Outcome:
    """Follow a trial process to its end: each new value of the metric goes to `report(step, value)`, which
    returns True to prune (SIGTERM; the run checkpoints and exits 143); `stop` set ends it the same way. The
    process never outlives this call. A trial that exited 2 raises SweepError (bad input: stop the sweep)."""
    metrics = MetricWatch(run_dir, spec.metric)
    pruned = stopped = False
    try:
        while True:
            code = proc.poll()
            for step, value in metrics.new():
                if not pruned and not stopped and report(step, value) and code is None:
                    pruned = True
                    proc.send_signal(signal.SIGTERM)
            if code is not None:
                break
            if stop.is_set() and not stopped and not pruned:
                stopped = True
                proc.send_signal(signal.SIGTERM)
            time.sleep(POLL_S)
    finally:
        if proc.poll() is None:  # an exception here (or in report): the trial must not train on unwatched
            proc.send_signal(signal.SIGTERM)
            proc.wait()
    for step, value in metrics.new():  # the values logged after the last look
        if not pruned:
            report(step, value)
    steps = metrics.steps
    if code == 0:
        if metrics.last_step < 0:
            raise SweepError(f"{run_dir.name} finished without logging {spec.metric!r} (see "
                             f"{run_dir / METRICS_FILE}): is the metric's name right, and does the run evaluate?")
        if not math.isfinite(metrics.last_value):
            return Outcome("FAIL", None, steps, code, f"{spec.metric} is not finite")
        return Outcome("COMPLETE", metrics.last_value, steps, code)
    if code == 2:
        raise SweepError(f"{run_dir.name} stopped on bad input ({run_dir / 'stdout.log'}): {_error_line(run_dir)}")
    if pruned:
        return Outcome("PRUNED", metrics.last_value, steps, code)
    if stopped or code == EXIT_PREEMPTED:  # stopped by us (killed if still starting), or checkpointed on a SIGTERM
        return Outcome("INTERRUPTED", None, steps, code, "interrupted: the next sweep resumes it")
    return Outcome("FAIL", None, steps, code, _tail(run_dir)[-2000:])


# ---- the study ---------------------------------------------------------------------------------------------


@dataclass
class SweepSection:
    """How a sweep searches: trials, workers, metric, sampler, pruner, storage and backend."""

    trials: int = 10
    """Trials to finish (complete or pruned); failed ones do not count. Grid sampling: at most the grid's size."""
    workers: int = 1
    """Trials run at the same time, each in its own process."""
    threads_per_trial: int = 0
    """OMP_NUM_THREADS of each trial process; 0: the CPUs divided by workers, unless OMP_NUM_THREADS is set."""
    metric: str = "val_loss"
    """The metric to optimise, as the trials log it to metrics.jsonl at each evaluation; a trial's value is its last."""
    direction: Literal["minimize", "maximize"] = "minimize"
    """Whether a lower or a higher metric is better."""
    sampler: Literal["tpe", "random", "grid"] = "tpe"
    """tpe: Optuna's Tree-structured Parzen Estimator; random; grid: every combination (float ranges need a step)."""
    seed: int = 0
    """Seed of the sampler."""
    pruner: Literal["none", "median", "halving"] = "none"
    """Stop unpromising trials at an evaluation: median (worse than the median of earlier trials at that step),
    halving (successive halving / ASHA), or none."""
    startup_trials: int = 5
    """median: trials that finish before any is pruned."""
    warmup_steps: int = 0
    """median: training steps of a trial before it may be pruned."""
    min_resource: int = 0
    """halving: steps before the first rung; 0: Optuna's estimate (Ray: 1)."""
    reduction_factor: int = 3
    """halving: 1 in this many trials goes on at each rung."""
    max_failures: int = 5
    """Stop the sweep after this many failed trials in one invocation (0: never)."""
    storage: str = ""
    """Optuna storage URL; empty: sqlite:///<sweep dir>/study.db."""
    backend: Literal["optuna", "ray"] = "optuna"
    """optuna: trials run here, `workers` at a time; ray: a Ray Tune experiment (`pip install 'temper[ray]'`)."""
    ray_address: str = ""
    """backend=ray: the cluster to join (auto, ray://host:10001); empty: start Ray on this machine."""

    def __post_init__(self) -> None:
        if self.trials <= 0 or self.workers <= 0:
            raise ValueError("trials and workers must be > 0")
        if min(self.threads_per_trial, self.startup_trials, self.warmup_steps, self.min_resource,
               self.max_failures) < 0:
            raise ValueError("threads_per_trial, startup_trials, warmup_steps, min_resource and max_failures must be >= 0")
        if self.reduction_factor < 2:
            raise ValueError(f"reduction_factor must be >= 2, got {self.reduction_factor}")
        if not self.metric:
            raise ValueError("metric: name the metric to optimise (e.g. val_loss)")

    def threads(self) -> int:
        return trial_threads(self.threads_per_trial, self.workers)


def trial_threads(threads: int, workers: int) -> int:
    """OMP_NUM_THREADS for each of `workers` trial processes: `threads`, else the CPUs shared out (0: leave the
    environment's OMP_NUM_THREADS, when it is set, to the trials)."""
    if threads or "OMP_NUM_THREADS" in os.environ:
        return threads
    return max(1, (os.cpu_count() or 1) // workers)


def _storage(sweep_dir: Path, url: str) -> Any:
    optuna = _optuna()
    url = url or f"sqlite:///{(sweep_dir / 'study.db').resolve()}"
    # Several writers (workers, a report run alongside) wait for SQLite's lock rather than fail at once.
    kwargs = {"connect_args": {"timeout": 60}} if url.startswith("sqlite") else {}
    return optuna.storages.RDBStorage(url, engine_kwargs=kwargs)


def _sampler(opts: SweepSection, offset: int = 0) -> Any:
    """`offset` (the trials the study has): a resumed sweep's sampler does not draw its first values again."""
    samplers = _optuna().samplers
    if opts.sampler == "tpe":
        # constant_liar: parallel workers do not all sample next to the same running trial.
        return samplers.TPESampler(seed=opts.seed + offset, constant_liar=opts.workers > 1)
    return samplers.RandomSampler(seed=opts.seed + offset)  # grid: every trial is enqueued with its values


def _pruner(opts: SweepSection) -> Any:
    pruners = _optuna().pruners
    if opts.pruner == "median":
        return pruners.MedianPruner(n_startup_trials=opts.startup_trials, n_warmup_steps=opts.warmup_steps)
    if opts.pruner == "halving":
        return pruners.SuccessiveHalvingPruner(min_resource=opts.min_resource or "auto",
                                               reduction_factor=opts.reduction_factor)
    return pruners.NopPruner()


def _open_study(storage: Any, name: str, direction: str, identity: dict[str, Any], sweep_dir: Path,
                sampler: Any = None, pruner: Any = None) -> optuna.Study:
    """Create the study, or load it to resume: then it must be the same sweep (recipe, args, space, metric)
    unless nothing of it ran yet (every trial failed, e.g. on the typo being fixed)."""
    optuna = _optuna()
    study = optuna.create_study(storage=storage, study_name=name, direction=direction, sampler=sampler,
                                pruner=pruner, load_if_exists=True)
    before = study.user_attrs.get("sweep")
    states = optuna.trial.TrialState
    if before is not None and before != identity and any(t.state != states.FAIL for t in study.get_trials(False)):
        changed = [k for k in identity if before.get(k) != identity[k]]
        raise SweepError(f"{sweep_dir} holds a sweep with another {', '.join(changed)} ({changed[0]}: "
                         f"{before.get(changed[0])!r}, now {identity[changed[0]]!r}): to resume it, run the same "
                         f"sweep; to start another, choose another name (or remove {sweep_dir})")
    if before != identity:
        study.set_user_attr("sweep", identity)
    return study


def _root(t: Any) -> int:
    """The trial whose run directory a trial uses: the first of its retries."""
    return int(t.user_attrs.get("retry_of", t.number))


def _recover(study: optuna.Study) -> list[Any]:
    """Trials a previous sweep left RUNNING (it was killed: this process holds the sweep's lock) become FAIL;
    returns them with those a stopped sweep interrupted, neither retried yet: the caller enqueues their retries."""
    optuna = _optuna()
    states = optuna.trial.TrialState
    killed = {t.number for t in study.get_trials(deepcopy=False, states=(states.RUNNING,))}
    for number in sorted(killed):
        study.tell(number, state=states.FAIL)
    trials = study.get_trials(deepcopy=False)
    retried = {t.user_attrs.get("retry_for") for t in trials}
    return [t for t in trials if t.state == states.FAIL and t.number not in retried
            and (t.number in killed or t.user_attrs.get("interrupted"))]


def _retry_attrs(t: Any) -> dict[str, Any]:
    return {"retry_of": _root(t), "retry_for": t.number}


def _print(msg: str) -> None:
    print(f"temper sweep: {msg}", flush=True)


def _drive(study: optuna.Study, spec: TrialSpec, *, workers: int, more: Callable[[int], bool],
           values: Callable[[optuna.Trial], dict[str, Any]], max_failures: int = 0) -> None:
    """Run trials `workers` at a time while `more(running)` says so; each is asked of the study, launched,
    watched (reports, pruning) and told. SIGTERM / Ctrl-C stops the running trials (they checkpoint) and
    raises SweepInterrupted; a trial that exited 2 stops the others and raises its SweepError."""
    optuna = _optuna()
    states = optuna.trial.TrialState
    lock, stop = threading.Lock(), threading.Event()
    running, failures, errors, signals = [0], [0], [], []

    def one(trial: optuna.Trial) -> None:
        def report(step: int, value: float) -> bool:
            trial.report(value, step)
            return trial.should_prune()

        try:
            vals = values(trial)
            name = f"trial-{_root(trial):04d}"
            trial.set_user_attr("run_dir", f"{TRIALS_DIR}/{name}")
            again = f" (retry of trial {trial.user_attrs['retry_for']}: resumes its run)" \
                if "retry_for" in trial.user_attrs else ""
            _print(f"trial {trial.number} started{again}: {' '.join(flag(k, v)[2:] for k, v in vals.items())}")
            started = time.monotonic()
            proc = launch(spec, vals, name, note=f"trial {trial.number}{again}")
            out = watch(proc, spec, spec.run_dir(name), stop, report)
        except BaseException as e:
            trial.set_user_attr("error", str(e)[:2000])
            study.tell(trial, state=states.FAIL)
            raise
        trial.set_user_attr("steps", out.steps)
        trial.set_user_attr("exit_code", out.exit_code)
        if out.error:
            trial.set_user_attr("error", out.error)
        if out.state == "INTERRUPTED":
            trial.set_user_attr("interrupted", True)
        state = {"COMPLETE": states.COMPLETE, "PRUNED": states.PRUNED}.get(out.state, states.FAIL)
        told = study.tell(trial, out.value if state == states.COMPLETE else None, state=state)
        shown = f" {spec.metric}={told.value:.6g}" if told.value is not None else ""  # pruned: at its last report
        why = f": {out.error.splitlines()[-1] if out.error.strip() else ''}" if out.state == "FAIL" else ""
        _print(f"trial {trial.number} {out.state}{shown} at step {out.steps} ({time.monotonic() - started:.0f}s){why}")
        if out.state == "FAIL":
            with lock:
                failures[0] += 1
                if max_failures and failures[0] >= max_failures:
                    errors.append(SweepError(f"{failures[0]} trials failed (max_failures): see their stdout.log "
                                             f"under {spec.sweep_dir / TRIALS_DIR}"))
                    stop.set()

    def worker() -> None:
        while not stop.is_set():
            with lock:  # asking under the lock: exactly as many trials as `more` allows
                if stop.is_set() or not more(running[0]):
                    return
                trial = study.ask()
                running[0] += 1
            try:
                one(trial)
            except BaseException as e:  # noqa: BLE001 - handed to the main thread, which raises it
                with lock:
                    errors.append(e)
                stop.set()
            finally:
                with lock:
                    running[0] -= 1

    def on_signal(signum: int, frame: Any) -> None:
        if not signals:
            _print(f"{signal.Signals(signum).name}: stopping the running trials (they write a checkpoint); "
                   "run the same command again to resume")
        signals.append(signum)
        stop.set()

    previous = {}
    if threading.current_thread() is threading.main_thread():
        previous = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        threads = [threading.Thread(target=worker, name=f"sweep-worker-{i}", daemon=True) for i in range(workers)]
        for t in threads:
            t.start()
        while any(t.is_alive() for t in threads):
            for t in threads:
                t.join(0.2)
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    if signals:
        raise SweepInterrupted("interrupted: the running trials checkpointed; the same command resumes the sweep")
    if errors:
        raise errors[0]


# ---- the sweep and fixed points --------------------------------------------------------------------------


@dataclass
class TrialResult:
    """One trial as the table shows it."""

    number: int
    params: dict[str, Any]
    state: str
    """COMPLETE, PRUNED or FAIL."""
    value: float | None
    run_dir: Path
    steps: int = 0
    """Training steps the run reached."""
    note: str = ""


def _result(t: Any, sweep_dir: Path, retried_as: int | None = None) -> TrialResult:
    attrs = t.user_attrs
    params = dict(t.params) if "point" not in attrs else json.loads(attrs["point"])
    errors = (attrs.get("error") or "").strip().splitlines()
    note = "interrupted" if attrs.get("interrupted") or retried_as is not None else (errors[-1] if errors else "")
    if "retry_for" in attrs:
        note = f"retry of {attrs['retry_for']}" + (f"; {note}" if note else "")
    if retried_as is not None:
        note += f"; retried as {retried_as}"
    run_dir = sweep_dir / attrs.get("run_dir", f"{TRIALS_DIR}/trial-{_root(t):04d}")
    return TrialResult(t.number, params, t.state.name, t.value, run_dir, attrs.get("steps", 0), note)


def _finished(study: optuna.Study) -> list[Any]:
    return [t for t in study.get_trials(deepcopy=False) if t.state.name in ("COMPLETE", "PRUNED", "FAIL")]


def _results(study: optuna.Study, sweep_dir: Path) -> list[TrialResult]:
    trials = _finished(study)
    retried = {t.user_attrs["retry_for"]: t.number for t in study.get_trials(deepcopy=False) if "retry_for" in t.user_attrs}
    return [_result(t, sweep_dir, retried.get(t.number)) for t in trials]


def _identity(recipe: str, base_args: list[str], metric: str, **more: Any) -> dict[str, Any]:
    return {"recipe": recipe, "args": list(base_args), "metric": metric, **more}


def _check_recipe(recipe: str) -> None:
    if not recipe or recipe.startswith("-") or any(c.isspace() for c in recipe):
        raise SweepError(f"recipe: {recipe!r} is not a temper command (pretrain, sft, ...)")
    if recipe == "sweep":
        raise SweepError("recipe: a sweep's trials cannot be sweeps")


def run_sweep(opts: SweepSection, recipe: str, base_args: list[str], space: dict[str, Param],
              sweep_dir: Path) -> list[TrialResult]:
    """Search `space` with `opts.trials` trials of `temper <recipe> <base_args>` (resuming the sweep in
    `sweep_dir` if there is one), then write its report (`write_report`); returns every trial."""
    _check_recipe(recipe)
    check_args(base_args)
    grid = grid_points(space) if opts.sampler == "grid" else None
    sweep_dir = Path(sweep_dir).resolve()
    if opts.backend == "ray":
        from temper.train.sweep_ray import run_ray  # Ray is an extra: its module is imported when asked for

        return run_ray(opts, recipe, base_args, space, sweep_dir, grid=grid)
    optuna = _optuna()
    states = optuna.trial.TrialState
    spec = TrialSpec(recipe, list(base_args), sweep_dir, opts.metric, opts.direction, opts.threads())
    identity = _identity(recipe, base_args, opts.metric, direction=opts.direction,
                         space={k: p.as_dict() for k, p in space.items()}, sampler=opts.sampler)
    with locked_run_dir(sweep_dir):
        study = _open_study(_storage(sweep_dir, opts.storage), STUDY, opts.direction, identity, sweep_dir,
                            pruner=_pruner(opts))
        study.sampler = _sampler(opts, offset=len(study.get_trials(deepcopy=False)))
        for t in _recover(study):
            study.enqueue_trial(t.params, user_attrs={**_retry_attrs(t), "values": json.dumps(t.params, sort_keys=True)})
        trials = opts.trials if grid is None else min(opts.trials, len(grid))
        if grid is not None:  # the grid's points not done nor queued, in order, up to `trials` (failed ones again)
            kept = study.get_trials(deepcopy=False, states=(states.COMPLETE, states.PRUNED, states.WAITING))
            tried = {t.user_attrs.get("values") or json.dumps(t.params, sort_keys=True) for t in kept}
            todo = [p for p in grid if json.dumps(p, sort_keys=True) not in tried]
            for p in todo[:max(0, trials - len(kept))]:
                study.enqueue_trial(p, user_attrs={"values": json.dumps(p, sort_keys=True)})

        def more(running: int) -> bool:
            done = len(study.get_trials(deepcopy=False, states=(states.COMPLETE, states.PRUNED)))
            if grid is not None and not study.get_trials(deepcopy=False, states=(states.WAITING,)):
                return False
            return done + running < trials

        done = len(study.get_trials(deepcopy=False, states=(states.COMPLETE, states.PRUNED)))
        _print(f"{sweep_dir}: {done} of {trials} trials done, {opts.workers} at a time, "
               f"{opts.sampler} sampler, {opts.pruner} pruner, {opts.direction} {opts.metric}")
        try:
            _drive(study, spec, workers=opts.workers, more=more, values=lambda trial: _suggest(trial, space),
                   max_failures=opts.max_failures)
        finally:
            if any(t.state.is_finished() for t in study.get_trials(deepcopy=False)):
                write_report(sweep_dir, study, _results(study, sweep_dir), metric=opts.metric, direction=opts.direction)
        return _results(study, sweep_dir)


def open_report(sweep_dir: Path, storage: str = "") -> tuple[Any, list[TrialResult], dict[str, Any]]:
    """The study of an existing sweep, its trials and what it was started with (recipe, space, metric...)."""
    sweep_dir = Path(sweep_dir).resolve()
    if not (sweep_dir / "study.db").exists() and not storage:
        raise SweepError(f"{sweep_dir}: no sweep there (no study.db)")
    optuna = _optuna()
    try:
        study = optuna.load_study(study_name=STUDY, storage=_storage(sweep_dir, storage))
    except KeyError:
        raise SweepError(f"{sweep_dir}: its storage holds no sweep") from None
    return study, _results(study, sweep_dir), study.user_attrs.get("sweep", {})


def run_points(recipe: str, base_args: list[str], points: list[dict[str, Any]], sweep_dir: Path, *,
               workers: int = 1, metric: str = "val_loss", threads_per_trial: int = 0) -> list[TrialResult]:
    """Run each point (a dict of config key -> value) once as a trial of a study in sweep_dir (resumable:
    points already complete are not run again); results in the order of `points`.

    A point that failed before is run again; one that a killed or interrupted call left unfinished resumes its
    run. `recipe`, `base_args` and `metric` must be those the directory was started with (SweepError otherwise).
    Raises SweepInterrupted on SIGTERM / Ctrl-C, SweepError when a trial exits 2 (bad input)."""
    _check_recipe(recipe)
    keys = [json.dumps(p, sort_keys=True) for p in points]
    check_args(base_args)
    for p in points:
        bad = [k for k in p if not isinstance(k, str) or not _KEY.fullmatch(k) or k in SET_BY_SWEEP]
        if bad:
            raise SweepError(f"point {p}: {bad[0]!r} is not a config key the sweep may set")
    optuna = _optuna()
    states = optuna.trial.TrialState
    sweep_dir = Path(sweep_dir).resolve()
    spec = TrialSpec(recipe, list(base_args), sweep_dir, metric, "minimize", trial_threads(threads_per_trial, workers))
    with locked_run_dir(sweep_dir):
        study = _open_study(_storage(sweep_dir, ""), POINTS_STUDY, "minimize", _identity(recipe, base_args, metric),
                            sweep_dir, optuna.samplers.RandomSampler(0), optuna.pruners.NopPruner())
        unfinished = {t.user_attrs.get("point"): t for t in _recover(study)}  # the newest per point
        trials = study.get_trials(deepcopy=False)
        complete = {t.user_attrs["point"] for t in trials if t.state == states.COMPLETE and "point" in t.user_attrs}
        waiting = {t.user_attrs.get("point") for t in trials if t.state == states.WAITING}
        for key in dict.fromkeys(keys):  # each distinct point once, in order
            if key not in complete and key not in waiting:
                again = _retry_attrs(unfinished[key]) if key in unfinished else {}
                study.enqueue_trial({}, user_attrs={"point": key, **again})

        def more(running: int) -> bool:
            return bool(study.get_trials(deepcopy=False, states=(states.WAITING,)))

        todo = len(study.get_trials(deepcopy=False, states=(states.WAITING,)))
        _print(f"{sweep_dir}: {len(set(keys)) - todo} of {len(set(keys))} points done, {workers} at a time")
        _drive(study, spec, workers=workers, more=more, values=lambda trial: json.loads(trial.user_attrs["point"]))
        by_point: dict[str, TrialResult] = {}
        for t in _finished(study):
            key = t.user_attrs.get("point")
            if key is not None and (by_point.get(key) is None or by_point[key].state != "COMPLETE"):
                by_point[key] = _result(t, sweep_dir)  # the complete one, else the newest attempt
    return [by_point[k] for k in keys]


def _history(run_dir: Path, metric: str) -> Iterator[tuple[int, float]]:
    for r in read_metrics(run_dir / METRICS_FILE):
        v = r.get(metric)
        if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
            yield r["step"], float(v)


# ---- the report -------------------------------------------------------------------------------------------


def _cell(value: Any) -> str:
    text = f"{value:.6g}" if isinstance(value, float) else str(value)
    return text.replace("|", "\\|").replace("\n", " ")


def best_trial(results: list[TrialResult], direction: str) -> TrialResult | None:
    done = [r for r in results if r.state == "COMPLETE" and r.value is not None and math.isfinite(r.value)]
    if not done:
        return None
    return (min if direction == "minimize" else max)(done, key=lambda r: r.value)


def write_report(sweep_dir: Path, study: Any, results: list[TrialResult], *, metric: str,
                 direction: str) -> str:
    """`sweep.md` (the table of trials, best first line), `best.yaml` (the best trial's config.yaml, its run
    directory keys dropped so that it starts a new run) and PNG plots; returns the Markdown."""
    sweep_dir = Path(sweep_dir)
    keys = list(dict.fromkeys(k for r in results for k in r.params))
    best = best_trial(results, direction)
    lines = [f"# Sweep {sweep_dir.name}", ""]
    counts = {s: sum(r.state == s for r in results) for s in ("COMPLETE", "PRUNED", "FAIL")}
    lines.append(f"{len(results)} trials: {counts['COMPLETE']} complete, {counts['PRUNED']} pruned, "
                 f"{counts['FAIL']} failed; {direction} {metric}.")
    if best is not None:
        lines.append(f"Best: trial {best.number}, {metric} = {best.value:.6g} "
                     f"({', '.join(f'{k}={_cell(v)}' for k, v in best.params.items())}); its config: best.yaml.")
    lines += ["", "| trial | state | " + metric + " | steps | " + " | ".join(keys) + " | run dir | note |",
              "|---" * (len(keys) + 6) + "|"]
    for r in sorted(results, key=lambda r: r.number):
        value = "" if r.value is None else _cell(float(r.value))
        rel = os.path.relpath(r.run_dir, sweep_dir)
        cells = [str(r.number), r.state, value, str(r.steps), *(_cell(r.params.get(k, "")) for k in keys), rel,
                 _cell(r.note[:120])]
        lines.append("| " + " | ".join(cells) + " |")
    plots = _plots(sweep_dir, study, results, metric, len(keys))
    if plots:
        lines += ["", *(f"![{p.stem}]({p.name})" for p in plots)]
    text = "\n".join(lines) + "\n"
    atomic_write_text(sweep_dir / "sweep.md", text)
    if best is not None and (best.run_dir / "config.yaml").is_file():
        cfg = yaml.safe_load((best.run_dir / "config.yaml").read_text(encoding="utf-8")) or {}
        for key in ("name", "dir", "resume"):  # a new run, not the trial's directory
            (cfg.get("run") or {}).pop(key, None)
        header = (f"# Best trial {best.number} of sweep {sweep_dir.name}: {metric} = {best.value:.6g}\n"
                  f"# {os.path.relpath(best.run_dir / 'config.yaml', sweep_dir)} without run.name/dir/resume\n")
        atomic_write_text(sweep_dir / "best.yaml", header + yaml.safe_dump(cfg, sort_keys=False))
    return text


def _plots(sweep_dir: Path, study: Any, results: list[TrialResult], metric: str, n_params: int) -> list[Path]:
    """Optuna's matplotlib plots: optimization history, intermediate values, and parameter importances when
    >= 2 trials completed over >= 2 parameters. Missing matplotlib: no plots, said once."""
    complete = sum(r.state == "COMPLETE" for r in results)
    if not complete:
        return []
    try:
        import matplotlib

        if "matplotlib.pyplot" not in sys.modules:
            matplotlib.use("Agg")  # files only; a program that already chose a backend keeps it
        import matplotlib.pyplot as plt
        from optuna.importance import PedAnovaImportanceEvaluator
        from optuna.visualization import matplotlib as ovm
    except ImportError:
        _print("matplotlib is not installed (`pip install 'temper[experiments]'`): no plots")
        return []
    made = []
    todo: list[tuple[str, Callable[[], Any]]] = [
        ("optimization_history", lambda: ovm.plot_optimization_history(study, target_name=metric))]
    if any(t.intermediate_values for t in study.get_trials(deepcopy=False)):
        todo.append(("intermediate_values", lambda: ovm.plot_intermediate_values(study)))
    if complete >= 2 and n_params >= 2:
        # PED-ANOVA (Watanabe et al. 2023): importances without scikit-learn's random forests (fANOVA's).
        todo.append(("param_importances", lambda: ovm.plot_param_importances(
            study, evaluator=PedAnovaImportanceEvaluator(), target_name=metric)))
    for stem, plot in todo:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # Optuna marks its matplotlib plots experimental
            try:
                ax = plot()
            except (ValueError, RuntimeError, ZeroDivisionError) as e:  # too few trials for this plot
                _print(f"no {stem} plot: {e}")
                continue
        fig = (ax[0] if hasattr(ax, "__len__") else ax).figure
        fig.savefig(sweep_dir / f"{stem}.png", dpi=100, bbox_inches="tight")
        plt.close(fig)
        made.append(sweep_dir / f"{stem}.png")
    return made
