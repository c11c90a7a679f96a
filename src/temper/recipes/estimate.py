"""`temper estimate`: memory per device of a training run, before it starts.

Steps:
  1. parse EstimateConfig; take the model's shape from a preset (plus `model.overrides`), a Hugging
     Face directory (config.json), a temper checkpoint (state.json) or a temper run directory
     (config.resolved.yaml); no weights are read;
  2. estimate each component with `temper.train.memory.estimate` (the model is built on the meta device);
  3. print a table: component, bytes per rank, formula; the training step's peak and the moment
     it happens; host memory under CPU offload; the KV cache and what generation needs; the per-block
     saved tensors; the rules of thumb; and notes.

The layout is `run.parallel` (the training recipes' `train.parallel`: dp_shard, dp_replicate, tp, pp,
zero1, offload, ...) over `run.world_size` ranks, e.g. `--run.world_size=8 --run.parallel.dp_shard=4
--run.parallel.tp=2`: every figure is one rank's (the pipeline stage that peaks higher).

It does not run a step or measure anything (`benchmarks/memory_estimate.py` checks the estimate
against measured peaks), and it does not choose a batch size for you.
"""

from __future__ import annotations

import dataclasses
import sys
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from temper import config
from temper.errors import InputError
from temper.files import checkpoint_file, read_json_object
from temper.model.config import PRESETS, ModelConfig
from temper.model.hf.checkpoint import read_hf_config
from temper.train.memory import Estimate, RunShape, describe_layout, estimate, human_bytes, rules_of_thumb


@dataclass
class ModelSource:
    """Where the model's shape comes from: one of a preset or a path."""

    preset: str = ""
    """A name from temper.model.config.PRESETS (debug when neither preset nor path is given)."""
    path: str = ""
    """A Hugging Face directory (config.json), a temper checkpoint (state.json) or run directory (config.resolved.yaml)."""
    overrides: dict = field(default_factory=dict)
    """ModelConfig fields to change, e.g. {vocab_size: 50257, max_seq_len: 4096}."""

    def __post_init__(self) -> None:
        if self.preset and self.path:
            raise ValueError("give preset or path, not both")
        if self.preset and self.preset not in PRESETS:
            raise ValueError(f"unknown preset {self.preset!r}; choose one of {', '.join(PRESETS)}")


@dataclass
class EstimateConfig:
    """Options of `temper estimate`."""

    model: ModelSource = field(default_factory=ModelSource)
    """The model."""
    run: RunShape = field(default_factory=RunShape)
    """The run: recipe, precision, batch, sequence, checkpointing, world size and parallel layout, adapters."""


def read_model_config(source: ModelSource) -> ModelConfig:
    """The ModelConfig named by `source`, with its overrides applied."""
    if not source.path:
        base = PRESETS[source.preset or "debug"]
    else:
        base = _config_at(Path(source.path))
    return config.from_dict(ModelConfig, dataclasses.asdict(base) | source.overrides, prefix="model.overrides.")


def _config_at(path: Path) -> ModelConfig:
    if path.is_file() and path.name == "config.json":
        path = path.parent
    if not path.is_dir():
        raise FileNotFoundError(f"model.path {path}: no such directory")
    # checkpoint_file: the loaders' one rule, so a hub-cache snapshot (symlinks into ../../blobs/) reads here too
    hf, state, run = (checkpoint_file(path, n) for n in ("config.json", "state.json", "config.resolved.yaml"))
    if hf.is_file():
        return read_hf_config(path)
    if state.is_file():  # a temper checkpoint: its state.json stores the resolved run config
        resolved = read_json_object(state).get("config", {})
    elif run.is_file():
        resolved = _read_yaml(run)
    else:
        raise FileNotFoundError(f"model.path {path}: no config.json (Hugging Face), state.json (temper checkpoint) "
                                "or config.resolved.yaml (temper run directory)")
    # sft's `model` is the checkpoint it started from; every training recipe stores the shape as model_config
    # (pretrain's `model` section is the shape too).
    saved = resolved.get("model_config", resolved.get("model")) if isinstance(resolved, dict) else None
    if not isinstance(saved, dict):
        raise ValueError(f"model.path {path}: its saved config has no model section")
    return config.from_dict(ModelConfig, saved, prefix=f"{path} model.")


def _read_yaml(path: Path) -> object:
    try:
        return yaml.safe_load(path.read_bytes().decode("utf-8")) or {}
    except (UnicodeDecodeError, yaml.YAMLError) as e:
        raise InputError(f"{path}: not a YAML file ({' '.join(str(e).split())})") from None


def render(est: Estimate, cfg: ModelConfig, run: RunShape, name: str) -> str:
    """The report as Markdown: a table of components, the per-block terms, rules of thumb and notes."""
    T = run.seq_len or cfg.max_seq_len
    ck = f"every {run.activation_checkpointing} block(s)" if run.activation_checkpointing else "off"
    if run.activation_offload:
        ck += ", offloaded to host memory"
    lines = [
        f"temper estimate: {name} ({est.params:,} params, {est.trainable:,} trainable), "
        f"recipe {run.recipe}, {run.precision} on {run.device}, micro-batch {run.micro_batch_size} x {T} tokens"
        + (f" x {run.accumulation_steps} accumulated" if run.accumulation_steps > 1 else "")
        + f", activation checkpointing {ck}, {describe_layout(run)}",
        "",
        "| component | per rank | formula |",
        "| --- | ---: | --- |",
    ]
    later = ("host memory (CPU offload)", "KV cache (generation)")  # after the peak: not in the device's step
    for c in est.components:
        if c.name not in later:
            lines.append(f"| {c.name} | {human_bytes(c.bytes)} | {c.formula} |")
    alive = " + ".join(f"{k} {human_bytes(v)}" for k, v in est.at_peak.items() if v)
    lines.append(f"| **training peak** | **{human_bytes(est.peak)}** | {est.peak_formula} ({alive}); "
                 "not the sum of the rows: gradients grow as activations are freed |")
    for name in later:
        if any(c.name == name for c in est.components):
            lines.append(f"| {name} | {human_bytes(est[name].bytes)} | {est[name].formula} |")
    lines.append(f"| generation total | {human_bytes(est.inference)} | weights in {run.precision}"
                 + (" (NF4 base)" if run.recipe == "qlora" else "") + " + KV cache |")
    lines += ["", "saved for backward by one block, per token: "
              + " + ".join(f"{label} {human_bytes(n)}" for label, n in est.block_terms), "", "rules of thumb:"]
    lines += [f"  - {r}" for r in rules_of_thumb(est, cfg, run)]
    if est.notes:
        lines += ["", "notes:"] + [f"  - {n}" for n in est.notes]
    lines.append("\n(tensors only, as torch.cuda.max_memory_allocated counts them: add the CUDA context, ~0.5 GiB, "
                 "and the allocator's cache)")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    cfg = config.parse(EstimateConfig, argv, prog="estimate")
    try:
        model_cfg = read_model_config(cfg.model)
        est = estimate(model_cfg, cfg.run)
    except config.ConfigError:
        raise
    except (OSError, ValueError) as e:  # a bad path, an unreadable config, a LoRA target that matches nothing
        print(f"temper estimate: {e}", file=sys.stderr)
        return 2
    name = cfg.model.path or cfg.model.preset or "debug"
    print(render(est, model_cfg, cfg.run, name))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
