"""What a run shows and records: progress bar, `metrics.jsonl`, TensorBoard / W&B, and the report.

`RunLogger` is the one sink for a run's numbers. Only rank 0 writes or prints anything; other
ranks get a logger whose every method is a no-op. `metrics.jsonl` is append-safe across resume:
a logger opened at `start_step=k` (or rewound to k after a rollback) first drops the lines of steps
after k and any line half-written by a crash, so no step is ever recorded twice. `write_report`
turns the file into `report.md` with plots.

It computes no training number: tokens/s, MFU, perplexity and the rest arrive as metrics from
`train/step.py` and the recipes. It does not decide when to log; the loop does.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

from tqdm import tqdm

from temper.files import atomic_write_text

METRICS_FILE = "metrics.jsonl"


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


class RunLogger:
    """Progress bar + metrics.jsonl (+ TensorBoard, W&B) for one run; rank 0 only."""

    def __init__(self, run_dir: str | Path, *, total_steps: int, start_step: int = 0, rank: int = 0,
                 tensorboard: bool = False, wandb: bool = False, wandb_project: str = "temper",
                 config: dict | None = None, progress: bool = True) -> None:
        self.run_dir = Path(run_dir)
        self.active = rank == 0
        self._file = self._bar = self._tb = self._wandb = None
        if not self.active:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.path, self._tensorboard = self.run_dir / METRICS_FILE, tensorboard
        self._open(start_step)
        if progress:
            self._bar = tqdm(total=total_steps, initial=start_step, unit="step", dynamic_ncols=True)
        if wandb:
            self._wandb = self._init_wandb(wandb_project, config)

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
        """Forget what was logged after `step` (a rollback to its checkpoint); W&B keeps the first values."""
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
        metrics = {k: _plain(v) for k, v in metrics.items()}
        self._file.write(json.dumps({"step": step, "kind": kind, "time": time.time(), **metrics}) + "\n")
        self._file.flush()  # a crash loses at most the line being written
        numbers = {k: v for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        if self._tb is not None:
            for name, value in numbers.items():
                self._tb.add_scalar(f"{kind}/{name}", value, step)
        if self._wandb is not None:
            self._wandb.log({f"{kind}/{name}": value for name, value in numbers.items()}, step=step)
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

    def close(self) -> None:
        """Flush and close every sink; safe to call twice."""
        for sink in (self._bar, self._file, self._tb):
            if sink is not None:
                sink.close()
        if self._wandb is not None:
            self._wandb.finish()
        self._file = self._bar = self._tb = self._wandb = None

    def __enter__(self) -> RunLogger:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# Report panels: file stem, title, log y-scale, and the (label, kind, metric) series drawn on it.
# Gradient norm is on a log scale because one spike would otherwise flatten the rest of the curve.
_PANELS = [
    ("loss", "Loss", False, [("train", "train", "loss"), ("val", "val", "val_loss")]),
    ("lr", "Learning rate", False, [("lr", "train", "lr")]),
    ("grad_norm", "Gradient norm", True, [("grad norm", "train", "grad_norm")]),
    ("throughput", "Throughput (tokens/s)", False, [("tokens/s", "train", "tokens_per_s")]),
]


def _series(records: list[dict[str, Any]], kind: str, key: str) -> tuple[list[int], list[float]]:
    pairs = [(r["step"], r[key]) for r in records if r.get("kind") == kind and isinstance(r.get(key), (int, float))]
    return [s for s, _ in pairs], [v for _, v in pairs]


def _draw(ax: Any, title: str, log: bool, lines: list[tuple[str, list[int], list[float]]]) -> None:
    for label, steps, values in lines:
        # Val points are few and far apart: markers keep each one visible.
        ax.plot(steps, values, "o-" if label == "val" else "-", label=label, markersize=3, linewidth=1.2)
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
    if not panels:
        return []
    rows, cols = (1, len(panels)) if len(panels) <= 2 else (2, 2)
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
    # Wall clock from the first record to the last, pauses between a crash and its resume included.
    seconds = records[-1].get("time", 0) - records[0].get("time", 0)
    rows.append(("total time", f"{seconds:.0f} s ({seconds / 3600:.2f} h)"))
    return rows


def write_report(run_dir: str | Path) -> Path:
    """Read `<run_dir>/metrics.jsonl`; write `report.md` with a summary table and PNG plots."""
    run_dir = Path(run_dir)
    records = read_metrics(run_dir / METRICS_FILE)
    lines = [f"# Run report: {run_dir.name}", ""]
    if not records:
        lines.append(f"No metrics recorded in {METRICS_FILE}.")
    else:
        lines += ["| | |", "|---|---|"] + [f"| {k} | {v} |" for k, v in _summary(records)] + [""]
        try:
            images = _plot(run_dir, records)
        except ImportError:  # plots are an extra; the table alone is still worth writing
            images = []
            lines.append("matplotlib is not installed (`pip install 'temper[plots]'`), so this report has no plots.")
        if images:
            lines += ["![training curves](report.png)", "",
                      "Single plots: " + ", ".join(f"[{name}]({name})" for name in images[1:])]
    path = run_dir / "report.md"
    atomic_write_text(path, "\n".join(lines) + "\n")
    return path
