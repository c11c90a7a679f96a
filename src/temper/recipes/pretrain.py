"""`temper pretrain`: train a decoder from scratch on prepared token shards.

Steps, in the order the loop below runs them:
 1. parse the config; join the process group when launched by torchrun (DDP; gloo on CPU)
 2. open the train/val shards (one prepared directory, or several mixed by weight); build the
    model from a preset plus `model.*` overrides
 3. build AdamW; wrap the model (activation checkpointing -> compile -> DDP)
 4. resume from the newest valid checkpoint when there is one (`run.resume=auto`)
 5. loop: lr from the schedule -> this rank's micro-batches -> one train step -> log;
    validate every `eval.every` steps; checkpoint every `checkpoint.every` steps and on SIGTERM
 6. export `final/` in Hugging Face layout and write the report with plots
"""

from __future__ import annotations

import dataclasses
import math
import os
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
import torch.distributed as dist
import yaml

from temper import config, faults
from temper.data.loader import MixedWindows, TokenWindows, rank_slice
from temper.data.shards import ShardError, read_manifest
from temper.data.tokenizer import HFTokenizer, load_tokenizer, save_hf_tokenizer
from temper.eval.run import TaskSuite, TaskSuiteConfig
from temper.eval.tasks import TaskError
from temper.files import UnsafePath, atomic_write_text, safe_join, safe_name
from temper.model.config import PRESETS, ModelConfig
from temper.model.convert import save_hf
from temper.model.transformer import Transformer
from temper.train import checkpoint as ckpt
from temper.train.log import RunLogger, write_report
from temper.train.losses import LMLoss
from temper.train.optim import OptimConfig, ScheduleConfig, build_optimizer, lr_at, set_lr
from temper.train.parallel import DistInfo, init_distributed, parallelize, shutdown_distributed, unwrap
from temper.train.step import (
    NonFiniteLoss,
    autocast,
    datasheet_peak_flops,
    eval_loss,
    measured_matmul_peak_flops,
    resolve_precision,
    throughput,
    train_step,
)

EXIT_PREEMPTED = 143
"""Exit code after a SIGTERM was handled by writing a checkpoint (128 + SIGTERM, as a shell reports it)."""


@dataclass
class RunConfig:
    name: str = "pretrain"
    """Run name: the run directory is <dir>/<name> (a plain name, no '/' or '..')."""
    dir: str = "runs"
    """Parent directory of run directories."""
    seed: int = 1337
    """Seed for model init, data order and dropout."""
    device: str = "auto"
    """auto (cuda when available, else cpu), cpu, cuda, cuda:N."""
    resume: str = "auto"
    """auto: continue from the newest valid checkpoint if any; never: start fresh; or a checkpoint path."""
    override_checkpoint_config: bool = False
    """Allow resuming with a model, batch, sequence or schedule config that differs from the checkpoint's."""


@dataclass
class DataConfig:
    dir: str | list[str] = "data/stdlib"
    """Directory written by `temper prepare` (manifest.json, shards, tokenizer.json), or a list of them
    (one tokenizer) to train on their mixture, drawn in the proportions of `weights`."""
    weights: list[float] = field(default_factory=list)
    """With a list of dirs: each one's share of the training samples, normalised (drawn exactly in every
    block of 1024 samples). E.g. --data.dir=[data/web,data/code] --data.weights=[0.8,0.2]."""
    order: Literal["random", "sequential"] = "random"
    """random: windows at hashed offsets; sequential: each non-overlapping window once per epoch, shuffled
    (per directory, in a mixture)."""
    val_dir: str = ""
    """Directory whose `val` split is the validation set (e.g. a separately prepared held-out file);
    empty: the `val` split of each `dir`, reported per directory in a mixture. Must use the same tokenizer."""
    verify: bool = True
    """Check every shard's sha256 against the manifest before training."""

    @property
    def dirs(self) -> list[str]:
        return [self.dir] if isinstance(self.dir, str) else list(self.dir)

    def __post_init__(self) -> None:
        if not self.dirs or not all(self.dirs):
            raise ValueError("dir: name a prepared directory (or a list of them)")
        if len(self.dirs) > 1 and len(self.weights) != len(self.dirs):
            raise ValueError(f"weights: {len(self.dirs)} data dirs need {len(self.dirs)} weights, got {self.weights}")
        if len(self.dirs) == 1 and len(self.weights) > 1:
            raise ValueError(f"weights: {len(self.weights)} weights for a single data dir")
        if not all(math.isfinite(w) and w > 0 for w in self.weights):
            raise ValueError(f"weights must be finite and > 0, got {self.weights}")


@dataclass
class TrainConfig:
    steps: int = 200
    """Optimizer steps."""
    micro_batch_size: int = 8
    """Sequences per forward pass on each rank."""
    seq_len: int = 0
    """Tokens per sequence; 0 means the model's max_seq_len."""
    global_batch_tokens: int = 0
    """Tokens per optimizer step over all ranks; a multiple of micro_batch_size * seq_len * world.
    0 means one micro-batch per rank (no accumulation)."""
    grad_clip: float = 1.0
    """Clip the global gradient norm to this value; 0 disables clipping (the norm is still logged)."""
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    """auto: bf16 autocast on a GPU that supports it, else fp32. fp16 uses a gradient scaler."""
    compile: bool = False
    """torch.compile the model."""
    activation_checkpointing: int = 0
    """Recompute activations of every k-th block in backward; 0 disables."""
    label_smoothing: float = 0.0
    """Cross-entropy label smoothing."""
    on_nonfinite: Literal["fail", "skip", "rollback"] = "fail"
    """On a NaN/inf loss: fail (raise before the optimizer step), skip the update, or reload the last
    checkpoint and skip `rollback_skip_steps` steps' worth of data past the bad batch."""
    rollback_skip_steps: int = 1
    """rollback only: how many steps' batches to skip, counted from the batch that failed."""


@dataclass
class EvalConfig:
    every: int = 50
    """Validation loss every N steps (and at the end); 0 disables."""
    batches: int = 8
    """Validation batches of micro_batch_size x ranks sequences (the same fixed windows every time)."""
    tasks: TaskSuiteConfig = field(default_factory=TaskSuiteConfig)
    """Benchmark tasks (ARC, GSM8K, ...) run on rank 0 every `eval.tasks.every` steps, logged as kind "tasks"."""


@dataclass
class CheckpointConfig:
    every: int = 100
    """Save every N steps (and at the end); 0 saves only at the end and on SIGTERM."""
    keep_last_n: int = 3
    """Checkpoints to keep (>= 2, or 0 to keep all); older ones go only after a new one is complete."""


@dataclass
class LogConfig:
    every: int = 1
    """Log train metrics every N steps."""
    tensorboard: bool = False
    """Also write TensorBoard events to <run>/tb."""
    wandb: bool = False
    """Also log to Weights & Biases (needs `pip install wandb`)."""
    progress: bool = True
    """Show a progress bar."""


@dataclass
class PretrainConfig:
    preset: str = "debug"
    """Model shape from temper.model.config.PRESETS; `model.*` keys override its fields."""
    model: dict = field(default_factory=dict)
    """Overrides of ModelConfig fields, e.g. {dim: 384, n_layers: 6}; vocab_size defaults to the data's."""
    run: RunConfig = field(default_factory=RunConfig)
    """Run identity, seed, device and resume."""
    data: DataConfig = field(default_factory=DataConfig)
    """Token shards."""
    train: TrainConfig = field(default_factory=TrainConfig)
    """Batch, precision and step options."""
    optim: OptimConfig = field(default_factory=OptimConfig)
    """AdamW."""
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    """Learning-rate schedule."""
    eval: EvalConfig = field(default_factory=EvalConfig)
    """Validation."""
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    """Checkpointing."""
    log: LogConfig = field(default_factory=LogConfig)
    """Metrics and progress."""

    def __post_init__(self) -> None:
        if self.preset not in PRESETS:
            raise ValueError(f"unknown preset {self.preset!r}; choose one of {', '.join(PRESETS)}")
        if self.train.steps <= 0 or self.train.micro_batch_size <= 0:
            raise ValueError("train.steps and train.micro_batch_size must be > 0")
        if self.checkpoint.keep_last_n == 1:
            raise ValueError("checkpoint.keep_last_n=1 is unsafe (a crash while saving leaves nothing); use >= 2 or 0")


def build_model_config(cfg: PretrainConfig, data_vocab: int) -> ModelConfig:
    """The preset, then the data's vocabulary size, then the user's `model.*` overrides."""
    base = dataclasses.asdict(PRESETS[cfg.preset]) | {"vocab_size": data_vocab}
    model_cfg = config.from_dict(ModelConfig, base | cfg.model, prefix="model.")
    if model_cfg.vocab_size < data_vocab:
        raise config.ConfigError(f"model.vocab_size={model_cfg.vocab_size} is smaller than the data's {data_vocab}")
    return model_cfg


# What must match between a checkpoint and the resuming run for the resume to be exact.
RESUME_KEYS = ("model", "train.seq_len", "train.global_batch_tokens", "train.steps", "schedule", "optim.lr", "data.order",
               "data.weights", "run.seed")
_MISSING = object()


def _lookup(tree: dict, dotted: str):
    for part in dotted.split("."):
        tree = tree.get(part, _MISSING) if isinstance(tree, dict) else _MISSING
    return tree


def check_resume_config(saved: dict, current: dict, allow: bool) -> None:
    # A key missing from the checkpoint's config was added to temper after it was written: not a change.
    diffs = [k for k in RESUME_KEYS if _lookup(saved, k) is not _MISSING and _lookup(saved, k) != _lookup(current, k)]
    if diffs and not allow:
        detail = "; ".join(f"{k}: checkpoint {_lookup(saved, k)!r} vs now {_lookup(current, k)!r}" for k in diffs)
        raise config.ConfigError(
            f"resume config mismatch ({detail}); pass --run.override_checkpoint_config=true to resume anyway"
        )


def check_same_tokenizer(dirs: list[str], manifests: list[dict]) -> None:
    """Mixed datasets must share one tokenizer: the same vocab_size, end-of-text id and vocabulary."""
    first = manifests[0]
    if any((m["vocab_size"], m.get("eot_id")) != (first["vocab_size"], first.get("eot_id")) for m in manifests):
        detail = "; ".join(f"{d} has vocab_size {m['vocab_size']}, eot_id {m.get('eot_id')}"
                           for d, m in zip(dirs, manifests, strict=True))
        raise config.ConfigError(f"data.dir mixes datasets of different tokenizers ({detail}): prepare them with "
                                 f"one tokenizer (temper prepare --tokenizer.kind=file --tokenizer.path=...)")
    # Two BPEs of the same size share vocab_size and eot_id but not the meaning of their ids.
    paths = [safe_join(d, m["tokenizer"]) for d, m in zip(dirs, manifests, strict=True)]
    if all(p.is_file() for p in paths):
        vocab = load_tokenizer(paths[0]).get_vocab()
        for d, p in zip(dirs[1:], paths[1:], strict=True):
            if load_tokenizer(p).get_vocab() != vocab:
                raise config.ConfigError(f"data.dir mixes datasets of different tokenizers: {dirs[0]} and {d} have "
                                         f"the same vocab_size but different vocabularies; prepare them with one tokenizer")


def source_names(dirs: list[str]) -> list[str]:
    """Short names for the metrics (`val_loss/<name>`): each directory's last part, made unique."""
    names = [Path(d).name or f"data{i}" for i, d in enumerate(dirs)]
    return [f"{n}-{i}" if names.count(n) > 1 else n for i, n in enumerate(names)]


class _SigtermFlag:
    """SIGTERM only sets a flag; the loop saves at the next step boundary (never mid-accumulation)."""

    def __init__(self) -> None:
        self.raised = False
        self._previous = signal.signal(signal.SIGTERM, self._handle)

    def _handle(self, signum, frame) -> None:
        self.raised = True

    def any_rank(self, d: DistInfo) -> bool:
        if d.world == 1:
            return self.raised
        flag = torch.tensor([float(self.raised)], device=d.device)
        dist.all_reduce(flag)
        return flag.item() > 0

    def restore(self) -> None:
        signal.signal(signal.SIGTERM, self._previous)


def main(argv: list[str] | None = None) -> int:
    cfg = config.parse(PretrainConfig, argv, prog="pretrain")
    try:
        return run(cfg)
    except (ShardError, ckpt.CheckpointCorrupt, UnsafePath) as e:
        # Bad input, not a bug: one clear line naming the file, no traceback.
        print(f"temper pretrain: {type(e).__name__}: {e}", file=sys.stderr)
        return 2


def run(cfg: PretrainConfig) -> int:
    d = init_distributed(cfg.run.device)
    try:
        return _train(cfg, d)
    finally:
        shutdown_distributed()


def _train(cfg: PretrainConfig, d: DistInfo) -> int:
    run_dir = safe_join(cfg.run.dir, safe_name(cfg.run.name, what="run name"))
    dirs, names = cfg.data.dirs, source_names(cfg.data.dirs)
    manifests = [read_manifest(x) for x in dirs]
    if len(dirs) > 1:
        check_same_tokenizer(dirs, manifests)
    manifest = manifests[0]
    model_cfg = build_model_config(cfg, manifest["vocab_size"])
    seq_len = cfg.train.seq_len or model_cfg.max_seq_len
    if seq_len > model_cfg.max_seq_len:
        raise config.ConfigError(f"train.seq_len={seq_len} exceeds model.max_seq_len={model_cfg.max_seq_len}")
    micro = cfg.train.micro_batch_size
    tokens_per_micro_step = micro * seq_len * d.world
    global_tokens = cfg.train.global_batch_tokens or tokens_per_micro_step
    if global_tokens % tokens_per_micro_step:
        raise config.ConfigError(
            f"train.global_batch_tokens={global_tokens} is not a multiple of micro_batch_size * seq_len * world "
            f"= {micro} * {seq_len} * {d.world} = {tokens_per_micro_step}"
        )
    accum = global_tokens // tokens_per_micro_step
    samples_per_step = micro * accum * d.world
    resolved = config.to_dict(cfg) | {"model": dataclasses.asdict(model_cfg)}
    resolved["train"] |= {"seq_len": seq_len, "global_batch_tokens": global_tokens}

    # Each source of a mixture gets its own seed, so two "random" sources do not draw the same offsets.
    sources = [TokenWindows(x, "train", seq_len, seed=cfg.run.seed + i, order=cfg.data.order, verify=cfg.data.verify)
               for i, x in enumerate(dirs)]
    train_data = sources[0] if len(dirs) == 1 else MixedWindows(sources, cfg.data.weights, seed=cfg.run.seed,
                                                                names=names)
    if cfg.data.val_dir:
        val_manifest = read_manifest(cfg.data.val_dir)
        if val_manifest["vocab_size"] != manifest["vocab_size"]:
            raise config.ConfigError(f"data.val_dir {cfg.data.val_dir} has vocab_size {val_manifest['vocab_size']}, "
                                     f"data.dir {dirs[0]} has {manifest['vocab_size']}: prepare both with one tokenizer")
        candidates = [("", cfg.data.val_dir, val_manifest, 1.0)]
    else:
        weights = cfg.data.weights if len(dirs) > 1 else [1.0]
        candidates = [(n if len(dirs) > 1 else "", x, m, w)
                      for n, x, m, w in zip(names, dirs, manifests, weights, strict=True)]
    # (name, windows, weight) of each validation set; "" names the only one. A mixture's val_loss is the
    # mean of its sources' val losses weighted like the training mixture: the loss of the mixture itself
    # (a source without a val split is left out and the others' weights renormalised).
    val_sets = [(n, TokenWindows(x, "val", seq_len, order="sequential", verify=cfg.data.verify), w)
                for n, x, m, w in candidates
                if cfg.eval.every > 0 and m["splits"].get("val", {}).get("tokens", 0) > seq_len]

    # The end-of-text token is the tokenizer's EOS: in final/'s tokenizer files, and for the tasks.
    tok = load_tokenizer(Path(dirs[0]) / manifest["tokenizer"])
    eot = manifest.get("eot_id")
    hf_tok = HFTokenizer(tok, {} if eot is None else {"eos_token": tok.id_to_token(eot)})
    try:  # on every rank, so that bad task input stops them all
        tasks = TaskSuite(cfg.eval.tasks, hf_tok)
    except TaskError as e:
        raise config.ConfigError(f"eval.tasks: {e}") from None

    torch.manual_seed(cfg.run.seed)  # identical init on every rank
    model = Transformer(model_cfg).to(d.device)
    optimizer = build_optimizer(model, cfg.optim, d.device.type)
    amp_dtype = resolve_precision(cfg.train.precision, d.device)
    scaler = torch.amp.GradScaler(d.device.type) if amp_dtype == torch.float16 else None
    train_model = parallelize(
        model, d, activation_checkpointing=cfg.train.activation_checkpointing, compile=cfg.train.compile
    )

    step, samples, skipped = 0, 0, 0
    resume_from = ckpt.find_resume_checkpoint(run_dir, cfg.run.resume)
    if resume_from is not None:
        state = ckpt.load_checkpoint(resume_from, model=model, optimizer=optimizer, map_location=d.device)
        check_resume_config(state["config"], resolved, cfg.run.override_checkpoint_config)
        step, samples, skipped = state["step"], state["samples"], state["skipped_steps"]
        if scaler is not None and state.get("scaler"):
            scaler.load_state_dict(state["scaler"])
        ckpt.restore_rng(resume_from, d.rank)
    else:
        torch.manual_seed(cfg.run.seed + d.rank)  # dropout differs per rank, reproducibly
        if d.is_main:
            run_dir.mkdir(parents=True, exist_ok=True)
            atomic_write_text(run_dir / "config.yaml", config.to_yaml(cfg))
            atomic_write_text(run_dir / "config.resolved.yaml", yaml.safe_dump(resolved, sort_keys=False))

    flops_per_token = model.flops_per_token(seq_len)
    peak = datasheet_peak_flops(d.device, amp_dtype) or measured_matmul_peak_flops(d.device, amp_dtype)

    def save(at_step: int) -> Path:
        state = {"step": at_step, "samples": samples, "skipped_steps": skipped, "config": resolved,
                 "scaler": scaler.state_dict() if scaler is not None else None}
        return ckpt.save_checkpoint(run_dir, at_step, model=model, optimizer=optimizer, state=state,
                                    keep_last_n=cfg.checkpoint.keep_last_n)

    def validate() -> dict[str, float]:
        if faults.active("sigterm_in_eval", step=step, rank=d.rank):
            os.kill(os.getpid(), signal.SIGTERM)
        losses = {}
        for name, val_data, _ in val_sets:
            batches = [val_data.batch(rank_slice(0, micro, i, d.rank, d.world), micro, d.device)
                       for i in range(cfg.eval.batches)]
            losses[name] = eval_loss(train_model, batches, amp_dtype)
        if len(val_sets) == 1 and val_sets[0][0] == "":
            return {"val_loss": losses[""]}
        total = sum(w for _, _, w in val_sets)
        mean = sum(w * losses[name] for name, _, w in val_sets) / total
        return {"val_loss": mean, **{f"val_loss/{name}": loss for name, loss in losses.items()}}

    if d.is_main:
        print(yaml.safe_dump(resolved, sort_keys=False), end="")
        print(f"temper pretrain: {model.num_params() / 1e6:.2f}M parameters, {d.world} rank(s) on {d.device}, "
              f"{global_tokens} tokens/step ({micro} x {seq_len} x {accum} accum x {d.world} ranks), "
              f"{amp_dtype}, run dir {run_dir}")
        if len(dirs) > 1:
            mix = ", ".join(f"{n} {w:.3f}" for n, w in zip(names, train_data.weights, strict=True))
            print(f"temper pretrain: mixture of {len(dirs)} datasets by share of samples: {mix}")
    sigterm = _SigtermFlag()
    logger = RunLogger(run_dir, total_steps=cfg.train.steps, start_step=step, rank=d.rank,
                       tensorboard=cfg.log.tensorboard, wandb=cfg.log.wandb, config=resolved,
                       progress=cfg.log.progress)
    train_model.train()
    window_tokens, window_start = 0, time.perf_counter()
    loss_fn = LMLoss(label_smoothing=cfg.train.label_smoothing)
    try:
        while step < cfg.train.steps:
            if faults.active("crash", step=step, rank=d.rank):
                raise SystemExit(f"TEMPER_FAULT crash at step {step} on rank {d.rank}")
            if faults.active("sigterm", step=step, rank=d.rank):
                os.kill(os.getpid(), signal.SIGTERM)  # arrives in the middle of this step
            lr = lr_at(step - skipped, cfg.train.steps, cfg.optim.lr, cfg.schedule)
            set_lr(optimizer, lr)
            batches = [train_data.batch(rank_slice(samples, micro, m, d.rank, d.world), micro, d.device)
                       for m in range(accum)]
            try:
                result = train_step(train_model, optimizer, batches, step=step, amp_dtype=amp_dtype, scaler=scaler,
                                    clip_norm=cfg.train.grad_clip, loss_fn=loss_fn,
                                    on_nonfinite="fail" if cfg.train.on_nonfinite == "rollback" else cfg.train.on_nonfinite)
            except NonFiniteLoss:
                last = ckpt.find_resume_checkpoint(run_dir, "auto") if cfg.train.on_nonfinite == "rollback" else None
                if last is None:
                    raise
                # PaLM §5.1: restart from the last checkpoint and skip the batches around the spike.
                bad_samples = samples
                state = ckpt.load_checkpoint(last, model=model, optimizer=optimizer, map_location=d.device)
                ckpt.restore_rng(last, d.rank)
                step, skipped = state["step"], state["skipped_steps"]
                logger.rewind(step)
                samples = bad_samples + cfg.train.rollback_skip_steps * samples_per_step
                logger.message(f"non-finite loss: rolled back to step {step}, skipping to sample {samples}")
                continue
            samples += samples_per_step
            skipped += result.skipped
            step += 1
            window_tokens += result.tokens
            if step % cfg.log.every == 0 or step == cfg.train.steps:
                if d.device.type == "cuda":
                    torch.cuda.synchronize(d.device)
                elapsed = time.perf_counter() - window_start
                tokens_per_s, mfu = throughput(window_tokens, elapsed, flops_per_token, peak)
                logger.log(step, {"loss": result.loss, "lr": lr, "grad_norm": result.grad_norm,
                                  "tokens_per_s": tokens_per_s, "mfu": mfu, "tokens": samples * seq_len,
                                  "step_time_s": elapsed / cfg.log.every, "skipped_steps": skipped})
                window_tokens, window_start = 0, time.perf_counter()
            if val_sets and (step % cfg.eval.every == 0 or step == cfg.train.steps):
                val = validate()
                logger.log(step, {"val_loss": val["val_loss"], "val_ppl": math.exp(min(val["val_loss"], 80.0)),
                                  **val}, kind="val")
                window_start = time.perf_counter()  # validation time is not training throughput
            if d.is_main and tasks.due(step, cfg.train.steps):
                with autocast(d.device, amp_dtype):
                    logger.log(step, tasks.run(unwrap(model)), kind="tasks")
                window_start = time.perf_counter()
            saved = (cfg.checkpoint.every and step % cfg.checkpoint.every == 0) or step == cfg.train.steps
            if saved:
                save(step)
                window_start = time.perf_counter()
            if sigterm.any_rank(d):
                if not saved:
                    save(step)
                logger.message(f"SIGTERM: checkpoint at step {step} written; exiting with {EXIT_PREEMPTED}")
                return EXIT_PREEMPTED
    finally:
        logger.close()
        sigterm.restore()

    if d.is_main:
        final = run_dir / "final"
        save_hf(unwrap(model), model_cfg, final, generation_config={} if eot is None else {"eos_token_id": eot})
        save_hf_tokenizer(hf_tok, final)  # with tokenizer_config.json: AutoTokenizer knows the end-of-text token
        report = write_report(run_dir)
        print(f"final model: {final}\nreport: {report}")
    return 0
