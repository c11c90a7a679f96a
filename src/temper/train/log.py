"""What a run shows and records: progress bar, `metrics.jsonl`, TensorBoard / W&B / MLflow, and the report.

`RunLogger` is the one sink for a run's numbers. Only rank 0 writes or prints anything; other
ranks get a logger whose every method is a no-op. `metrics.jsonl` is append-safe across resume:
a logger opened at `start_step=k` (or rewound to k after a rollback) first drops the lines of steps
after k and any line half-written by a crash, so no step is ever recorded twice. `write_report`
turns the file into `report.md` with plots.

MLflow (`mlflow=True`) gets the resolved config as parameters, every number as `<kind>/<name>` per step and,
through `log_artifacts`, the report and `final/`. Its run id lives in `<run>/mlflow-id`, so a resumed run
continues the same MLflow run; MLflow cannot forget a point, so a step it already has keeps its first value
(W&B alike) where metrics.jsonl takes the replayed one.

It computes no training number: tokens/s, MFU, perplexity and the rest arrive as metrics from
`train/step.py` and the recipes. It does not decide when to log; the loop does.
"""

from __future__ import annotations

import fcntl
import json
import math
import os
import re
import sys
import time
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Literal

from tqdm import tqdm

from temper.config import ConfigError
from temper.files import atomic_write_text

METRICS_FILE = "metrics.jsonl"
MLFLOW_ID_FILE = "mlflow-id"


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """Records of a metrics.jsonl, skipping lines that do not parse (a crash mid-write leaves one)."""
    path, records = Path(path), []
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines() if path.exists() else []:
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            pass
    return [r for r in records if isinstance(r, dict) and isinstance(r.get("step"), int)]


def _plain(value: Any) -> Any:
    """A JSON-safe scalar: tensors and numpy numbers become Python ones, NaN/inf become null."""
    value = value.item() if hasattr(value, "item") else value
    # Bare NaN is not JSON: strict readers (jq, browsers) would reject the whole line.
    return None if isinstance(value, float) and not math.isfinite(value) else value


def flatten_config(tree: dict, prefix: str = "") -> dict[str, Any]:
    """{"optim": {"lr": 1e-3}} -> {"optim.lr": 1e-3}; lists stay one value."""
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict) and value:
            flat.update(flatten_config(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def default_mlflow_uri(run_dir: Path) -> str:
    """The local store that log.mlflow_uri="" means: one SQLite file in the run's parent directory, shared by
    every run there (`mlflow ui --backend-store-uri sqlite:///runs/mlflow.db` shows them all)."""
    return f"sqlite:///{run_dir.resolve().parent / 'mlflow.db'}"


@contextmanager
def _flock(path: Path | None) -> Iterator[None]:
    """Hold an exclusive lock on `path` (None: no lock; a filesystem without locks: none either)."""
    if path is None:
        yield
        return
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
        except OSError:
            pass
        yield
    finally:
        os.close(fd)  # releases the lock


class _MlflowSink:
    """One run's MLflow tracking, through a client with an explicit tracking URI: MLflow's fluent API keeps one
    global active run, and two runs in one process (a sweep, the tests) would mix in it."""

    FLUSH_SECONDS = 5.0
    """Metrics are buffered and handed to a sender thread at most this often (and at close): MLflow's SQL store
    takes ~0.2 ms a point and a server a round trip a request, time the training loop should not wait for."""
    MAX_BUFFERED = 200_000
    """Points kept while the server is unreachable; beyond, the oldest are dropped."""

    def __init__(self, run_dir: Path, uri: str, experiment: str, config: dict | None, start_step: int) -> None:
        try:
            from mlflow.entities import Metric
            from mlflow.exceptions import MlflowException
            from mlflow.utils import validation
        except ImportError as e:
            raise ImportError("MLflow tracking was asked for (log.mlflow=true) but mlflow is not installed: "
                              "pip install 'temper[experiments]', or turn it off") from e

        self._limits, self._metric = validation, Metric
        self._buffer: list[Any] = []
        self._flushed = time.monotonic()
        self._warned = False
        self._sender = ThreadPoolExecutor(max_workers=1, thread_name_prefix="temper-mlflow")
        self._sending: Future | None = None
        try:
            run = self._open_run(run_dir, uri, experiment, start_step)
            self.run_id = run.info.run_id
            self._last_step = {key: max(m.step for m in self.client.get_metric_history(self.run_id, key))
                               for key in run.data.metrics}
            self._log_params(config or {}, run.data.params, start_step)
        except MlflowException as e:  # MLflow says what is wrong (a server down, a store refused); we say which key
            setting = f"log.mlflow_uri={uri}" if uri else f"log.mlflow (the local store {default_mlflow_uri(run_dir)})"
            raise ConfigError(f"{setting}: MLflow failed: {e.message.strip()}") from e

    def _open_run(self, run_dir: Path, uri: str, experiment: str, start_step: int) -> Any:
        """The MLflow run that `<run_dir>/mlflow-id` names when resuming (status RUNNING again), else a new one."""
        from mlflow import MlflowClient
        from mlflow.exceptions import MlflowException

        # The local store is shared by the runs of one directory: parallel ones (a sweep's trials) would race to
        # create its tables (MLflow's schema migration fails in all but one), so they take turns up to their run.
        with _flock(None if uri else run_dir.resolve().parent / "mlflow.db.lock"):
            self.client = MlflowClient(tracking_uri=uri or default_mlflow_uri(run_dir))  # opens (creates) the store
            id_file = run_dir / MLFLOW_ID_FILE
            if start_step > 0 and id_file.exists():  # at step 0 a new MLflow run, as metrics.jsonl starts anew
                try:
                    run = self.client.get_run(id_file.read_text().strip())
                    if run.info.lifecycle_stage == "active":
                        self.client.update_run(run.info.run_id, status="RUNNING")
                        return run
                except MlflowException:  # not in this store (another tracking URI, or deleted): a new run
                    pass
            run = self.client.create_run(self._experiment_id(experiment, run_dir, local=not uri),
                                         run_name=run_dir.name, tags={"temper.run_dir": str(run_dir.resolve())})
            atomic_write_text(id_file, run.info.run_id + "\n")
            return run

    def _experiment_id(self, name: str, run_dir: Path, local: bool) -> str:
        from mlflow.exceptions import MlflowException

        found = self.client.get_experiment_by_name(name)
        if found is not None:
            return found.experiment_id
        # The local store keeps artifacts next to it, not in MLflow's default ./mlruns of the working directory.
        location = (run_dir.resolve().parent / "mlartifacts").as_uri() if local else None
        try:
            return self.client.create_experiment(name, artifact_location=location)
        except MlflowException:  # another run (a parallel sweep trial) created it meanwhile
            return self.client.get_experiment_by_name(name).experiment_id

    def _log_params(self, config: dict, logged: dict[str, str], start_step: int) -> None:
        """The resolved config as dotted parameters. A resumed run sends only new keys: MLflow refuses to change
        a parameter, so a value changed on resume (run.override_checkpoint_config) is recorded as a tag."""
        from mlflow.entities import Param, RunTag

        limit = self._limits.MAX_PARAM_VAL_LENGTH
        params = {key: (value if isinstance(value, str) else json.dumps(value, default=str))[:limit]
                  for key, value in flatten_config(config).items()}
        new = [Param(key, value) for key, value in params.items() if key not in logged]
        per_batch = self._limits.MAX_PARAMS_TAGS_PER_BATCH
        for i in range(0, len(new), per_batch):
            self.client.log_batch(self.run_id, params=new[i:i + per_batch])
        changed = [RunTag(f"changed_on_resume.{key}",
                          f"{value} (from step {start_step}; was {logged[key]})"[:self._limits.MAX_TAG_VAL_LENGTH])
                   for key, value in params.items() if key in logged and logged[key] != value]
        for i in range(0, len(changed), per_batch):
            self.client.log_batch(self.run_id, tags=changed[i:i + per_batch])

    def log(self, step: int, kind: str, numbers: dict[str, float], timestamp: float) -> None:
        ms = int(timestamp * 1000)
        for name, value in numbers.items():
            key = re.sub(r"[^\w.\- /]", "_", f"{kind}/{name}")  # MLflow's metric-name alphabet
            if step > self._last_step.get(key, -1):  # a step MLflow already has (resume, rollback) keeps its value
                self._last_step[key] = step
                self._buffer.append(self._metric(key, float(value), ms, step))
        if len(self._buffer) >= self._limits.MAX_METRICS_PER_BATCH or \
                time.monotonic() - self._flushed >= self.FLUSH_SECONDS:
            self.flush()

    def flush(self) -> None:
        """Hand the buffered points to the sender thread, unless it is still busy (they go with a later flush)."""
        if self._sending is not None:
            if not self._sending.done():
                return
            self._buffer[:0] = self._sending.result()  # those that failed go again
            del self._buffer[:-self.MAX_BUFFERED]
        self._flushed = time.monotonic()
        points, self._buffer = self._buffer, []
        self._sending = self._sender.submit(self._send, points) if points else None

    def _send(self, points: list[Any]) -> list[Any]:
        """In the sender thread: the points in MLflow's batches; returns those not sent (after a warning)."""
        per_batch = self._limits.MAX_METRICS_PER_BATCH
        for i in range(0, len(points), per_batch):
            try:
                self.client.log_batch(self.run_id, metrics=points[i:i + per_batch])
            except Exception as e:  # a tracking server down a while must not stop training
                self._warn(f"MLflow: sending metrics failed ({e}); retrying at the next flush")
                return points[i:]
        return []

    def close(self, status: str) -> None:
        """Send what is left (one last try, then a warning) and end the MLflow run with `status`."""
        unsent = self._sending.result() if self._sending is not None else []
        self._sending = None
        self._sender.shutdown()
        self._buffer = self._send(unsent + self._buffer)
        if self._buffer:
            self._warn(f"MLflow: {len(self._buffer)} metric points could not be sent", always=True)
        try:
            self.client.set_terminated(self.run_id, status)
        except Exception as e:  # the run's own outputs are written: report, do not fail it
            self._warn(f"MLflow: ending run {self.run_id} as {status} failed ({e})")

    def log_artifacts(self, path: Path, subdir: str | None) -> None:
        try:
            if path.is_dir():
                self.client.log_artifacts(self.run_id, str(path), subdir)
            else:
                self.client.log_artifact(self.run_id, str(path), subdir)
        except Exception as e:  # the files are on disk already: report, do not fail the run
            self._warn(f"MLflow: uploading {path} failed ({e})")

    def _warn(self, text: str, always: bool = False) -> None:
        if always or not self._warned:  # once: a server down for an hour would otherwise print every flush
            print(f"temper: warning: {text}", file=sys.stderr)
        self._warned = True


class RunLogger:
    """Progress bar + metrics.jsonl (+ TensorBoard, W&B, MLflow) for one run; rank 0 only."""

    def __init__(self, run_dir: str | Path, *, total_steps: int, start_step: int = 0, rank: int = 0,
                 tensorboard: bool = False, wandb: bool = False, wandb_project: str = "temper",
                 mlflow: bool = False, mlflow_uri: str = "", mlflow_experiment: str = "temper",
                 config: dict | None = None, progress: bool = True) -> None:
        """mlflow_uri: any MLflow tracking URI; "" is `default_mlflow_uri`."""
        self.run_dir = Path(run_dir)
        self.active = rank == 0
        self._file = self._bar = self._tb = self._wandb = self._mlflow = None
        if not self.active:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.path, self._tensorboard = self.run_dir / METRICS_FILE, tensorboard
        self._open(start_step)
        if progress:
            self._bar = tqdm(total=total_steps, initial=start_step, unit="step", dynamic_ncols=True)
        if wandb:
            self._wandb = self._init_wandb(wandb_project, config)
        if mlflow:
            self._mlflow = _MlflowSink(self.run_dir, mlflow_uri, mlflow_experiment, config, start_step)

    def _open(self, start_step: int) -> None:
        """Drop what was logged after start_step (metrics.jsonl and TensorBoard), then open for appending."""
        if self.path.exists():
            text = self.path.read_text(encoding="utf-8", errors="replace")
            # A fresh run (start_step 0) starts an empty file rather than mixing with an old run's lines.
            keep = [r for r in read_metrics(self.path) if r["step"] <= start_step] if start_step > 0 else []
            new = "".join(json.dumps(r) + "\n" for r in keep)
            if new != text:  # atomic: a crash here leaves the old file or the new one, never half of it
                atomic_write_text(self.path, new)
        self._file = open(self.path, "a", encoding="utf-8")
        if self._tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            # purge_step hides the events a crashed run wrote after the checkpoint we resume from.
            self._tb = SummaryWriter(str(self.run_dir / "tb"), purge_step=start_step + 1)

    def rewind(self, step: int) -> None:
        """Forget what was logged after `step` (a rollback to its checkpoint); W&B and MLflow keep the first values."""
        if not self.active:
            return
        for sink in (self._file, self._tb):
            if sink is not None:
                sink.close()
        self._open(step)
        if self._bar is not None:
            self._bar.n = step
            self._bar.refresh()

    def _init_wandb(self, project: str, config: dict | None) -> Any:
        try:
            import wandb
        except ImportError as e:
            raise ImportError("W&B logging was asked for (wandb=True) but wandb is not installed: "
                              "pip install wandb, or turn it off") from e
        # The run id lives in the run directory so that a resumed run continues the same W&B run.
        id_file = self.run_dir / "wandb-id"
        run_id = id_file.read_text().strip() if id_file.exists() else wandb.util.generate_id()
        id_file.write_text(run_id)
        return wandb.init(project=project, name=self.run_dir.name, id=run_id, resume="allow",
                          dir=str(self.run_dir), config=config)

    def log(self, step: int, metrics: dict[str, float], *, kind: str = "train") -> None:
        """Record one step's metrics and update the bar (train) or print a line (val, others)."""
        if not self.active:
            return
        metrics, now = {k: _plain(v) for k, v in metrics.items()}, time.time()
        self._file.write(json.dumps({"step": step, "kind": kind, "time": now, **metrics}) + "\n")
        self._file.flush()  # a crash loses at most the line being written
        numbers = {k: v for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        if self._tb is not None:
            for name, value in numbers.items():
                self._tb.add_scalar(f"{kind}/{name}", value, step)
        if self._wandb is not None:
            self._wandb.log({f"{kind}/{name}": value for name, value in numbers.items()}, step=step)
        if self._mlflow is not None:
            self._mlflow.log(step, kind, numbers, now)
        if kind == "train":
            self._show_train(step, metrics)
        else:
            names = {"val_loss": "val loss", "val_ppl": "perplexity"}
            shown = (f"{names.get(k, k)} {format(v, '.4f' if isinstance(v, float) else '')}" for k, v in metrics.items())
            self.message(f"step {step} {kind}: " + " | ".join(shown))

    def _show_train(self, step: int, m: dict[str, Any]) -> None:
        shown = [("loss", "loss {:.4f}"), ("lr", "lr {:.2e}"), ("tokens_per_s", "{} tok/s"), ("mfu", "MFU {:.1%}")]
        # MFU is 0 where the hardware peak is unknown (CPU): not worth showing.
        text = " | ".join(fmt.format(tqdm.format_sizeof(m[k]) if k == "tokens_per_s" else m[k])
                          for k, fmt in shown if m.get(k) is not None and not (k == "mfu" and m[k] == 0))
        if self._bar is None:  # no bar (output to a file): one plain line per logged step instead
            tqdm.write(f"step {step}: {text}")
        else:
            self._bar.set_postfix_str(text, refresh=False)
            self._bar.update(step - self._bar.n)  # steps are absolute, so logging every N steps lands right

    def message(self, text: str) -> None:
        """Print a line above the progress bar without breaking it (rank 0 only)."""
        if self.active:
            tqdm.write(text)

    def close(self, status: Literal["FINISHED", "FAILED", "KILLED"] = "FINISHED") -> None:
        """Flush and close every sink, the MLflow run ended with `status`; safe to call twice. `log_artifacts`
        still works after it."""
        for sink in (self._bar, self._file, self._tb):
            if sink is not None:
                sink.close()
        if self._wandb is not None:
            self._wandb.finish()
        if self._mlflow is not None and self._file is not None:
            self._mlflow.close(status)
        self._file = self._bar = self._tb = self._wandb = None

    def log_artifacts(self, path: str | Path, subdir: str | None = None) -> None:
        """Upload a file or a directory's files under `subdir` of the MLflow run's artifacts (no-op without
        MLflow); a failed upload warns, the files being on disk already."""
        if self._mlflow is not None:
            self._mlflow.log_artifacts(Path(path), subdir)

    def __enter__(self) -> RunLogger:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close("FAILED" if exc[0] is not None else "FINISHED")


# Report panels: file stem, title, log y-scale, and the (label, kind, metric) series drawn on it.
# Gradient norm is on a log scale because one spike would otherwise flatten the rest of the curve.
_PANELS = [
    ("loss", "Loss", False, [("train", "train", "loss"), ("val", "val", "val_loss")]),
    ("lr", "Learning rate", False, [("lr", "train", "lr")]),
    ("grad_norm", "Gradient norm", True, [("grad norm", "train", "grad_norm")]),
    ("throughput", "Throughput (tokens/s)", False, [("tokens/s", "train", "tokens_per_s")]),
]

# Panels with one series per parameter group, when the run was monitored (log.monitor_every): file stem, title,
# log y-scale, and the prefix of the train metrics drawn (one line per `<prefix><group>` key).
_GROUP_PANELS = [
    ("grad_norm_groups", "Gradient norm by parameter group", True, "grad_norm/"),
    ("update_ratio", "Update / weight ratio by parameter group", True, "update_ratio/"),
]


def _series(records: list[dict[str, Any]], kind: str, key: str) -> tuple[list[int], list[float]]:
    pairs = [(r["step"], r[key]) for r in records if r.get("kind") == kind and isinstance(r.get(key), (int, float))]
    return [s for s, _ in pairs], [v for _, v in pairs]


def _draw(ax: Any, title: str, log: bool, lines: list[tuple[str, list[int], list[float]]]) -> None:
    for label, steps, values in lines:
        # Val points are few and far apart: markers keep each one visible (and a lone point at all).
        ax.plot(steps, values, "o-" if label == "val" or len(steps) == 1 else "-", label=label, markersize=3,
                linewidth=1.2)
    if log and min(v for _, _, vs in lines for v in vs) > 0:
        ax.set_yscale("log")
    else:  # 3e-4 reads better as 3 x 1e-4 than as 0.00030
        ax.ticklabel_format(axis="y", style="sci", scilimits=(-3, 6))
    ax.set(title=title, xlabel="step")
    ax.grid(alpha=0.3)
    if len(lines) > 1:
        ax.legend()


def _plot(run_dir: Path, records: list[dict[str, Any]]) -> list[str]:
    """Write report.png (all panels) and one PNG per panel; return the file names written."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure  # no pyplot: no global backend switch, no GUI

    panels = []
    for stem, title, log, spec in _PANELS:
        lines = [(label, *_series(records, kind, key)) for label, kind, key in spec]
        if lines := [line for line in lines if line[1]]:
            panels.append((stem, title, log, lines))
    for stem, title, log, prefix in _GROUP_PANELS:
        keys = dict.fromkeys(k for r in records if r.get("kind") == "train" for k in r if k.startswith(prefix))
        lines = [(key[len(prefix):], *_series(records, "train", key)) for key in keys]
        if lines := [line for line in lines if line[1]]:
            panels.append((stem, title, log, lines))
    if not panels:
        return []
    rows, cols = (1, len(panels)) if len(panels) <= 2 else ((len(panels) + 1) // 2, 2)
    grid = Figure(figsize=(6 * cols, 4 * rows), layout="constrained")
    for ax, (_, *panel) in zip(grid.subplots(rows, cols, squeeze=False).flat, panels, strict=False):
        _draw(ax, *panel)
    for ax in grid.axes[len(panels):]:
        ax.set_visible(False)
    FigureCanvasAgg(grid).print_png(run_dir / "report.png")
    for stem, *panel in panels:
        fig = Figure(figsize=(6, 4), layout="constrained")
        _draw(fig.subplots(), *panel)
        FigureCanvasAgg(fig).print_png(run_dir / f"{stem}.png")
    return ["report.png"] + [f"{stem}.png" for stem, *_ in panels]


def _summary(records: list[dict[str, Any]]) -> list[tuple[str, str]]:
    rows = [("steps", str(max(r["step"] for r in records)))]
    for label, kind, key in [("train loss", "train", "loss"), ("val loss", "val", "val_loss"),
                             ("val perplexity", "val", "val_ppl")]:
        steps, values = _series(records, kind, key)
        if values:
            best = min(range(len(values)), key=values.__getitem__)
            rows.append((label, f"final {values[-1]:.4f}, best {values[best]:.4f} (step {steps[best]})"))
    train = [r for r in records if r.get("kind") == "train"]
    last_half = train[len(train) // 2:]  # skips warm-up and compilation, which are not the steady rate
    for label, key, fmt in [("tokens/s (mean, last half)", "tokens_per_s", "{:,.0f}"),
                            ("MFU (mean, last half)", "mfu", "{:.1%}")]:
        values = [r[key] for r in last_half if isinstance(r.get(key), (int, float))]
        if any(values):  # all zero: MFU with an unknown peak
            rows.append((label, fmt.format(sum(values) / len(values))))
    for label, key in [("tokens seen", "tokens"), ("skipped steps", "skipped_steps")]:
        if values := _series(records, "train", key)[1]:
            rows.append((label, f"{values[-1]:,}"))
    if counted := [r for r in records if isinstance(r.get("params_total"), int)]:  # the last start's counts
        total, trainable = counted[-1]["params_total"], counted[-1].get("params_trainable", 0)
        rows.append(("parameters", f"{total:,} ({trainable:,} trainable, {trainable / max(total, 1):.2%})"))
    if shares := _series(records, "train", "comm_share")[1]:
        rows.append(("gradient all-reduce share of step time (mean, monitored steps)",
                     f"{sum(shares) / len(shares):.1%}"))
    # Wall clock from the first record to the last, pauses between a crash and its resume included.
    seconds = records[-1].get("time", 0) - records[0].get("time", 0)
    rows.append(("total time", f"{seconds:.0f} s ({seconds / 3600:.2f} h)"))
    return rows


def report_files(run_dir: str | Path) -> list[Path]:
    """What `write_report` wrote in `run_dir`: report.md and its PNGs."""
    names = ["report.md", "report.png"] + [f"{stem}.png" for stem, *_ in _PANELS + _GROUP_PANELS]
    return [Path(run_dir) / name for name in names if (Path(run_dir) / name).is_file()]


def write_report(run_dir: str | Path, plots: bool = True) -> Path:
    """Read `<run_dir>/metrics.jsonl`; write `report.md` with a summary table and, with `plots`, PNG plots."""
    run_dir = Path(run_dir)
    records = read_metrics(run_dir / METRICS_FILE)
    lines = [f"# Run report: {run_dir.name}", ""]
    if not records:
        lines.append(f"No metrics recorded in {METRICS_FILE}.")
    else:
        lines += ["| | |", "|---|---|"] + [f"| {k} | {v} |" for k, v in _summary(records)] + [""]
        try:
            images = _plot(run_dir, records) if plots else []
        except ImportError:  # plots are an extra; the table alone is still worth writing
            images = []
            lines.append("matplotlib is not installed (`pip install 'temper[plots]'`), so this report has no plots.")
        if images:
            lines += ["![training curves](report.png)", "",
                      "Single plots: " + ", ".join(f"[{name}]({name})" for name in images[1:])]
    path = run_dir / "report.md"
    atomic_write_text(path, "\n".join(lines) + "\n")
    return path
