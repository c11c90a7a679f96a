"""Write evaluation results: results.json, one samples file per task, report.md and plots.

results.json holds every metric with its standard error and how it was measured (the checkpoint,
the settings, examples and truncations, seconds); samples/<task>.jsonl holds every example's
record (log-likelihoods, completions, per-example metrics), so a number can be traced to the
examples behind it. The reliability diagram of the multiple-choice tasks (plots/calibration.png,
when matplotlib is installed) shows calibration better than the single ECE figure.

It does not compute metrics (see `temper.eval.metrics`, `temper.eval.run`).
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from temper.eval.run import TaskResult
from temper.files import atomic_write_text


def summary(results: Sequence[TaskResult]) -> dict[str, dict[str, Any]]:
    """task -> {n, metrics, stderr, truncated, seconds, extra (without plot data)}: results.json's body."""
    return {r.task: {"n": r.n, "metrics": r.metrics, "stderr": r.stderr, "truncated": r.truncated,
                     "seconds": round(r.seconds, 3), **({"counts": r.extra} if "calibration_bins" not in r.extra else {})}
            for r in results}


def write_report(out_dir: str | Path, results: Sequence[TaskResult], header: dict[str, Any]) -> Path:
    """Write results.json, samples/*.jsonl, report.md (and plots/) under out_dir; returns report.md."""
    out = Path(out_dir)
    (out / "samples").mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "results.json", json.dumps({**header, "results": summary(results)}, indent=2,
                                                       default=str) + "\n")
    for r in results:
        lines = "".join(json.dumps(x, ensure_ascii=False) + "\n" for x in r.examples)
        atomic_write_text(out / "samples" / f"{r.task}.jsonl", lines)
    plot = _calibration_plot(out / "plots" / "calibration.png", results)
    md = [f"# Evaluation of `{header.get('checkpoint', '?')}`", "",
          "| task | metric | value | ± stderr | n | truncated | seconds |",
          "| --- | --- | ---: | ---: | ---: | ---: | ---: |"]
    for r in results:
        for i, (k, v) in enumerate(r.metrics.items()):
            first = i == 0
            md.append(f"| {r.task if first else ''} | {k} | {_fmt(v)} | {_fmt(r.stderr.get(k, math.nan))} | "
                      f"{r.n if first else ''} | {r.truncated if first else ''} | "
                      f"{f'{r.seconds:.1f}' if first else ''} |")
    for r in results:
        if "tokens" in r.extra:
            e = r.extra
            md += ["", f"`{r.task}`: {e['documents']} documents, {e['tokens']} tokens, {e['bytes']} bytes, "
                       f"{e['words']} words; windows of {e['seq_len']} tokens, stride {e['stride']}."]
    if plot is not None:
        md += ["", "Calibration of the multiple-choice tasks (confidence of the chosen answer vs accuracy):", "",
               f"![calibration]({plot.relative_to(out).as_posix()})"]
    md += ["", "Standard errors: sample standard deviation / sqrt(n) for means (as lm-eval-harness), the "
               "delta method over documents for perplexity, a bootstrap for ECE and corpus metrics.",
           "Per-example records: `samples/<task>.jsonl`."]
    report = out / "report.md"
    atomic_write_text(report, "\n".join(md) + "\n")
    return report


def _fmt(v: float) -> str:
    if math.isnan(v):
        return "-"
    return f"{v:.4f}" if abs(v) < 1000 else f"{v:.4g}"


def _calibration_plot(path: Path, results: Sequence[TaskResult]) -> Path | None:
    mc = [r for r in results if "calibration_bins" in r.extra]
    if not mc:
        return None
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    path.parent.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(5, 5))
    ax.plot([0, 1], [0, 1], color="gray", linestyle="--", label="perfect calibration")
    for r in mc:
        bins = [b for b in r.extra["calibration_bins"] if b["count"]]
        ax.plot([b["confidence"] for b in bins], [b["accuracy"] for b in bins], marker="o",
                label=f"{r.task} (ECE {r.metrics['ece']:.3f})")
    ax.set(xlabel="confidence of the chosen answer", ylabel="accuracy", xlim=(0, 1), ylim=(0, 1))
    ax.legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
