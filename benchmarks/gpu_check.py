"""The measuring and reporting halves of `benchmarks/gpu_check.sh`.

    python benchmarks/gpu_check.py peaks --device cuda --json peaks.json   # bf16 matmul peak, copy bandwidth
    python benchmarks/gpu_check.py report --work DIR --out DIR             # gpu_check.md + gpu_check.json

`report` reads what each part left in the work directory (parts.jsonl with exit codes and times,
the benchmarks' JSON files, the test log, the Shakespeare run's metrics.jsonl) and writes one
Markdown file: the goals with their targets and whether they were met, then every measured row.
A part that failed or timed out shows as such; the report never invents a number. Its exit code is
0 when every part ran to completion (goals missed are reported, not failures of the check).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # torch is imported where it measures: `report` runs after every part and stays instant
    import torch

NANOGPT_COMPILE_TOKENS_PER_S = 467e3
"""nanoGPT + torch.compile, GPT-2 124M, batch 16 x 1024, bf16 on one H100: the issue's reference figure
(nanoGPT is not installed on the GPU machine, so it is not measured side by side)."""


def copy_bandwidth(device: torch.device, nbytes: int) -> float:
    """Bytes per second of a device-to-device copy, counting bytes read plus bytes written."""
    import torch

    src = torch.empty(nbytes // 2, dtype=torch.bfloat16, device=device).uniform_()
    dst = torch.empty_like(src)
    reps = 20 if device.type == "cuda" else 3
    dst.copy_(src)
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(reps):
        dst.copy_(src)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return 2 * nbytes * reps / (time.perf_counter() - t0)


def peaks(device_name: str, out: str) -> None:
    import torch

    from temper.train.step import datasheet_peak_flops, measured_matmul_peak_flops

    device = torch.device(device_name)
    cuda = device.type == "cuda"
    info = {
        "device": torch.cuda.get_device_name(device) if cuda else "cpu",
        "torch": torch.__version__,
        "bf16_matmul_flops": measured_matmul_peak_flops(device, torch.bfloat16, None if cuda else 512),
        "datasheet_bf16_flops": datasheet_peak_flops(device, torch.bfloat16),
        "copy_bytes_per_s": copy_bandwidth(device, 4 * 2**30 if cuda else 64 * 2**20),
        "memory_gib": torch.cuda.get_device_properties(device).total_memory / 2**30 if cuda else None,
    }
    print(json.dumps(info, indent=1))
    Path(out).write_text(json.dumps(info, indent=1))


def _load(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _fmt(x: float | None, spec: str) -> str:
    return "n/a" if x is None else format(x, spec)


def _goal(name: str, target: str, value: str, met: bool | None) -> dict:
    return {"goal": name, "target": target, "measured": value, "met": met}


def _row(rows: list[dict], **match) -> dict | None:
    return next((r for r in rows if all(r.get(k) == v for k, v in match.items()) and "error" not in r), None)


def _fastest_compiled(rows: list[dict], **match) -> dict | None:
    """The faster of temper's compile scopes (per block, "compile"; the whole model, "compile-model") measured."""
    found = [r for m in ("compile", "compile-model") if (r := _row(rows, impl="temper", mode=m, **match))]
    return max(found, key=lambda r: r["tokens_per_s"], default=None)


def _tests(work: Path) -> dict:
    log = (work / "tests.log").read_text(errors="replace") if (work / "tests.log").exists() else ""
    counts = {k: int(n) for n, k in re.findall(r"(\d+) (passed|failed|skipped|error|errors|deselected)", log)}
    return {"counts": counts, "failures": re.findall(r"^(?:FAILED|ERROR) (\S+)", log, re.M)}


def _shakespeare(work: Path) -> dict | None:
    metrics = work / "runs" / "shakespeare" / "metrics.jsonl"
    if not metrics.exists():
        return None
    val, train, last = None, None, None
    for line in metrics.read_text().splitlines():
        try:
            m = json.loads(line)
        except ValueError:
            continue
        if "val_loss" in m:
            val = m
        if "tokens_per_s" in m or "loss" in m:
            train = m
        last = m.get("step", last)
    return {"last_step": last, "val_loss": val and val["val_loss"], "val_step": val and val.get("step"),
            "tokens_per_s": train and train.get("tokens_per_s"), "mfu": train and train.get("mfu")}


def report(work: Path, out: Path, dry_run: bool) -> int:
    parts = [json.loads(line) for line in (work / "parts.jsonl").read_text().splitlines()] \
        if (work / "parts.jsonl").exists() else []
    pk = _load(work / "peaks.json") or {}
    train = _load(work / "train.json") or {"rows": []}
    decode = _load(work / "decode.json") or []
    decode = {"rows": decode} if isinstance(decode, list) else decode
    finetune = _load(work / "finetune.json") or {"rows": []}
    scaleout = _load(work / "scaleout.json") or {"rows": []}
    tests, shake = _tests(work), _shakespeare(work)

    goals = []
    t = tests["counts"]
    goals.append(_goal("gpu-marked tests pass", "0 failed", f"{t.get('passed', 0)} passed, {t.get('failed', 0)} failed, "
                       f"{t.get('skipped', 0)} skipped", (t.get("failed", 0) + t.get("error", 0) + t.get("errors", 0) == 0
                                                          and t.get("passed", 0) > 0) if not dry_run else None))
    g2 = _fastest_compiled(train["rows"], shape="gpt2-124m")
    goals.append(_goal("GPT-2 124M, temper + compile (b16 x 1024, bf16)", f">= 1.2 x {NANOGPT_COMPILE_TOKENS_PER_S:,.0f} "
                       "(nanoGPT + compile, H100) tokens/s",
                       _fmt(g2 and g2["tokens_per_s"], ",.0f") + (f" ({g2['mode']})" if g2 else ""),
                       g2 and g2["tokens_per_s"] >= 1.2 * NANOGPT_COMPILE_TOKENS_PER_S))
    ll = _fastest_compiled(train["rows"], shape="llama-3.2-1b")
    hf = _row(train["rows"], shape="llama-3.2-1b", impl="transformers", mode="compile")
    ratio = ll and hf and ll["tokens_per_s"] / hf["tokens_per_s"]
    goals.append(_goal("Llama-3.2-1B shape, temper + compile vs transformers + compile (b4 x 1024)", ">= 1.3x",
                       _fmt(ratio, ".2f") + ("x" if ratio else "") + (f" ({ll['mode']})" if ll else ""), ratio and ratio >= 1.3))
    d1 = _row(decode.get("rows", []), impl="temper", batch=1)
    share = d1 and d1.get("share_of_bound")
    goals.append(_goal("decode, 1B at batch 1: share of the bandwidth bound", ">= 75%", _fmt(share, ".1%"),
                       share and share >= 0.75))
    for method, peak_max, peer in (("lora", 17.0, "peft"), ("qlora", 6.5, "peft + bitsandbytes")):
        ours = [r for r in finetune["rows"] if r["method"] == method and r["impl"].startswith("temper")
                and "error" not in r]
        low = min(ours, key=lambda r: r["peak_gib"], default=None)
        fast = max((r for r in ours if r.get("temper_speed_ratio")), key=lambda r: r["temper_speed_ratio"],
                   default=None)
        goals.append(_goal(f"{method.upper()} 8B shape: peak memory", f"<= {peak_max} GiB",
                           f"{_fmt(low and low['peak_gib'], '.2f')} GiB ({low and low['impl']})",
                           low and low["peak_gib"] <= peak_max))
        speed = fast and fast["temper_speed_ratio"]
        goals.append(_goal(f"{method.upper()} 8B shape: tokens/s vs {peer}", ">= 1.5x",
                           f"{_fmt(speed, '.2f')}{'x' if speed else ''} ({fast and fast['impl']})", speed and speed >= 1.5))
        # The two goals are one configuration's: the rows above may be two (eager the leaner, compiled the faster).
        both = [r for r in ours if r["peak_gib"] <= peak_max and (r.get("temper_speed_ratio") or 0) >= 1.5]
        goals.append(_goal(f"{method.upper()} 8B shape: both in one configuration", "both above",
                           ", ".join(r["impl"] for r in both) or "none", bool(both) if ours else None))
    val = shake and shake["val_loss"]
    goals.append(_goal("tinyshakespeare (baby GPT) val loss", "<= 1.5",
                       f"{_fmt(val, '.4f')} at step {shake and shake['val_step']}", val is not None and val <= 1.5))
    if dry_run:  # tiny shapes on a CPU: the goals do not apply, only that every part ran
        for g in goals:
            g["met"] = None

    lines = [f"# GPU check{' (dry run: CPU, tiny shapes; goals not judged)' if dry_run else ''}", "",
             f"device: {pk.get('device', 'n/a')}, torch {pk.get('torch', 'n/a')}; measured bf16 matmul peak "
             f"{_fmt(pk.get('bf16_matmul_flops') and pk['bf16_matmul_flops'] / 1e12, '.0f')} TFLOP/s (datasheet "
             f"{_fmt(pk.get('datasheet_bf16_flops') and pk['datasheet_bf16_flops'] / 1e12, '.0f')}); copy bandwidth "
             f"{_fmt(pk.get('copy_bytes_per_s') and pk['copy_bytes_per_s'] / 1e12, '.2f')} TB/s (read + write)", "",
             "| part | exit | seconds | limit |", "| --- | ---: | ---: | ---: |"]
    lines += [f"| {p['part']} | {p['rc']}{' (timed out)' if p['rc'] in (124, 137) else ''} | {p['ms'] / 1000:.0f} "
              f"| {p['limit_s']} |" for p in parts]
    lines += ["", "| goal | target | measured | met |", "| --- | --- | --- | --- |"]
    lines += [f"| {g['goal']} | {g['target']} | {g['measured']} | "
              f"{'n/a' if g['met'] is None else 'yes' if g['met'] else 'NO'} |" for g in goals]
    if tests["failures"]:
        lines += ["", "failed tests: " + ", ".join(tests["failures"])]
    lines += ["", "## Pretraining (tokens/s, MFU against the measured peak and the datasheet)", "",
              "| shape | mode | impl | tokens/s | MFU meas. | MFU datasheet | peak GiB | warm-up s | vs transformers |",
              "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in train["rows"]:
        if "error" in r:
            lines.append(f"| {r['shape']} | {r['mode']} | {r['impl']} | failed: {r['error']} | | | | | |")
            continue
        lines.append(f"| {r['shape']} | {r['mode']} | {r['impl']} | {r['tokens_per_s']:,.0f} | {r['mfu_measured']:.1%} "
                     f"| {_fmt(r['mfu_datasheet'], '.1%')} | {r['peak_mem_gib']:.2f} | {r['warmup_s']:.0f} "
                     f"| {_fmt(r['ratio_vs_transformers'], '.2f')} |")
    lines += ["", "## Decode (greedy, prefill excluded)", "",
              "| shape | batch | impl | compile | tokens/s | share of bandwidth bound | greedy tokens agreeing |",
              "| --- | ---: | --- | --- | ---: | ---: | ---: |"]
    for r in decode["rows"]:
        lines.append(f"| {r.get('shape')} | {r.get('batch')} | {r.get('impl')} | {r.get('compile')} "
                     f"| {_fmt(r.get('tokens_per_s'), ',.0f')} | {_fmt(r.get('share_of_bound'), '.1%')} "
                     f"| {r.get('greedy_agree')}/{r.get('greedy_compared')} |")
    lines += ["", "## Fine-tuning (8B shape)", "", "| method | impl | peak GiB | tokens/s | peak / peer's | "
              "tokens/s / peer's |", "| --- | --- | ---: | ---: | ---: | ---: |"]
    for r in finetune["rows"]:
        if "error" in r:
            lines.append(f"| {r['method']} | {r['impl']} | failed: {r['error']} | | | |")
            continue
        lines.append(f"| {r['method']} | {r['impl']} | {r['peak_gib']:.2f} | {r['tokens_per_s']:,.0f} "
                     f"| {_fmt(r['temper_peak_ratio'], '.2f')} | {_fmt(r['temper_speed_ratio'], '.2f')} |")
    if finetune.get("qlora_peer_missing"):
        lines.append(f"\nQLoRA peer missing: {finetune['qlora_peer_missing']}")
    lines += ["", "## Scale-out on one GPU: FSDP2 against DDP, each over a one-rank group (overheads only)", "",
              "| layout | tokens/s | MFU meas. | MFU datasheet | step s | step / DDP's |",
              "| --- | ---: | ---: | ---: | ---: | ---: |"]
    ddp_step = next((r["step_s"] for r in scaleout["rows"] if r.get("layout") == "ddp" and "step_s" in r), None)
    for r in scaleout["rows"]:
        if "step_s" not in r:
            lines.append(f"| {r.get('layout')} | failed: {r.get('error')} | | | | |")
            continue
        lines.append(f"| {r['layout']} | {r['tokens_per_s']:,.0f} | {_fmt(r.get('mfu_measured'), '.1%')} "
                     f"| {_fmt(r.get('mfu_datasheet'), '.1%')} | {r['step_s']:.3f} "
                     f"| {_fmt(ddp_step and r['step_s'] / ddp_step, '.2f')} |")
    lines += ["", "## Shakespeare", "", json.dumps(shake)]
    (out / "gpu_check.md").write_text("\n".join(lines) + "\n")
    (out / "gpu_check.json").write_text(json.dumps(
        {"dry_run": dry_run, "parts": parts, "peaks": pk, "goals": goals, "tests": tests, "train": train,
         "decode": decode, "finetune": finetune, "shakespeare": shake, "scaleout": scaleout}, indent=1))
    return 0 if parts and all(p["rc"] == 0 for p in parts) else 1


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("peaks")
    p.add_argument("--device", default="cuda")
    p.add_argument("--json", required=True)
    r = sub.add_parser("report")
    r.add_argument("--work", required=True)
    r.add_argument("--out", required=True)
    r.add_argument("--dry-run", type=int, default=0)
    a = ap.parse_args(argv)
    if a.cmd == "peaks":
        peaks(a.device, a.json)
        return 0
    return report(Path(a.work), Path(a.out), bool(a.dry_run))


if __name__ == "__main__":
    sys.exit(main())
