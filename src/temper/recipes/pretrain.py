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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch

from temper import config, faults
from temper.data.loader import MixedWindows, TokenWindows, rank_slice
from temper.data.shards import ShardError, read_manifest
from temper.data.tokenizer import HFTokenizer, load_tokenizer, save_hf_tokenizer
from temper.eval.run import TaskSuite, TaskSuiteConfig
from temper.eval.tasks import TaskError
from temper.files import UnsafePath, safe_join
from temper.model.config import PRESETS, ModelConfig
from temper.model.hf.checkpoint import load_hf, save_hf
from temper.model.hf.files import CheckpointError
from temper.model.transformer import Transformer
from temper.train import checkpoint as ckpt
from temper.train.losses import LMLoss
from temper.train.optim import OptimConfig, ScheduleConfig, lr_at, set_lr
from temper.train.parallel import DistInfo, init_distributed, materialize, shutdown_distributed, unwrap
from temper.train.pipeline import is_stage, whole_model
from temper.train.run import (
    CheckpointSection,
    EvalSection,
    LogSection,
    Run,
    RunDirBusy,
    RunSection,
    TrainSection,
    locked_run_dir,
    print_error,
    run_directory,
)
from temper.train.step import NonFiniteLoss, autocast, eval_loss


@dataclass
class InitSection:
    from_: str = ""
    """Weights to start from (continued pretraining): a Hugging Face directory, a temper run's final/ or
    run directory, or a temper checkpoint (step-NNNNNNN); empty: random init of the preset."""


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
class TrainConfig(TrainSection):
    seq_len: int = 0
    """Tokens per sequence; 0 means the model's max_seq_len."""
    global_batch_tokens: int = 0
    """Tokens per optimizer step over all ranks; a multiple of micro_batch_size * seq_len * world.
    0 means one micro-batch per rank (no accumulation)."""


@dataclass
class EvalConfig(EvalSection):
    tasks: TaskSuiteConfig = field(default_factory=TaskSuiteConfig)
    """Benchmark tasks (ARC, GSM8K, ...) run on rank 0 every `eval.tasks.every` steps, logged as kind "tasks"."""


@dataclass
class PretrainConfig:
    preset: str = "debug"
    """Model shape from temper.model.config.PRESETS; `model.*` keys override its fields."""
    model: dict = field(default_factory=dict)
    """Overrides of ModelConfig fields, e.g. {dim: 384, n_layers: 6}; vocab_size defaults to the data's."""
    init: InitSection = field(default_factory=InitSection)
    """Where the weights start."""
    run: RunSection = field(default_factory=lambda: RunSection(name="pretrain"))
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
    checkpoint: CheckpointSection = field(default_factory=CheckpointSection)
    """Checkpointing."""
    log: LogSection = field(default_factory=LogSection)
    """Metrics and progress."""

    def __post_init__(self) -> None:
        if self.preset not in PRESETS:
            raise ValueError(f"unknown preset {self.preset!r}; choose one of {', '.join(PRESETS)}")
        if self.train.steps <= 0:
            raise ValueError("train.steps must be > 0")


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


def main(argv: list[str] | None = None) -> int:
    cfg = config.parse(PretrainConfig, argv, prog="pretrain")
    try:
        return run(cfg)
    except (ShardError, ckpt.CheckpointCorrupt, UnsafePath, CheckpointError, RunDirBusy) as e:
        return print_error("pretrain", f"{type(e).__name__}: {e}")  # bad input: one line naming the file


def run(cfg: PretrainConfig) -> int:
    # The run name is checked, and the run directory locked against a second process, before anything loads.
    with locked_run_dir(run_directory(cfg.run)):
        d = init_distributed(cfg.run.device, cfg.train.parallel)
        try:
            return _train(cfg, d)
        finally:
            shutdown_distributed()


def initial_model(cfg: PretrainConfig, data_vocab: int, d: DistInfo) -> tuple[Transformer, ModelConfig, dict | None]:
    """The preset's random init, or the weights of `init.from` (continued pretraining) with their shape.

    Under a sharded layout a random init is built on the meta device, and its weights (third value) exist
    once, on rank 0's CPU: `parallel.materialize` deals each rank its slices after the layout is applied, so
    no rank holds the whole model on its device and every layout starts from the one-process weights."""
    device = d.device
    if not cfg.init.from_:
        model_cfg = build_model_config(cfg, data_vocab)
        torch.manual_seed(cfg.run.seed)  # identical init on every rank
        if d.sharded:
            full = Transformer(model_cfg).state_dict() if d.is_main else None
            with torch.device("meta"):
                return Transformer(model_cfg), model_cfg, full
        return Transformer(model_cfg).to(device), model_cfg, None
    src = Path(cfg.init.from_)
    if not src.is_dir():
        raise config.ConfigError(f"init.from {src}: no such directory")
    try:
        if (src / ckpt.STATE_FILE).is_file():  # a temper checkpoint: its config, then its weights
            saved = ckpt.read_state(src).get("config", {}).get("model")
            if not isinstance(saved, dict):
                raise ValueError(f"{ckpt.STATE_FILE} has no model section")
            model_cfg = config.from_dict(ModelConfig, saved, prefix="init.from model.")
            model = Transformer(model_cfg).to(device)
            ckpt.load_checkpoint(src, model=model, optimizer=None, map_location=device)
        else:  # Hugging Face layout, or a temper run directory (its final/)
            model, model_cfg = load_hf(src / "final" if (src / "final" / "config.json").is_file() else src,
                                       device=device, dtype=torch.float32)
    except (OSError, ValueError, CheckpointError, ckpt.CheckpointCorrupt) as e:  # not a checkpoint we can read
        raise config.ConfigError(f"init.from {src}: {e}") from None
    if model_cfg.vocab_size < data_vocab:
        raise config.ConfigError(f"init.from {src}: vocab_size {model_cfg.vocab_size} is smaller than the data's "
                                 f"{data_vocab}: prepare the data with the model's tokenizer")
    # The shape is the checkpoint's: a model.* key may restate it, never change it.
    clash = {k: (v, getattr(model_cfg, k, None)) for k, v in cfg.model.items() if getattr(model_cfg, k, None) != v}
    if clash:
        detail = ", ".join(f"model.{k}={v!r} (the checkpoint has {c!r})" for k, (v, c) in clash.items())
        raise config.ConfigError(f"init.from {src} fixes the model's shape: {detail}")
    return model, model_cfg, None


def _train(cfg: PretrainConfig, d: DistInfo) -> int:
    dirs, names = cfg.data.dirs, source_names(cfg.data.dirs)
    manifests = [read_manifest(x) for x in dirs]
    if len(dirs) > 1:
        check_same_tokenizer(dirs, manifests)
    manifest = manifests[0]
    model, model_cfg, full_weights = initial_model(cfg, manifest["vocab_size"], d)
    seq_len = cfg.train.seq_len or model_cfg.max_seq_len
    if seq_len > model_cfg.max_seq_len:
        raise config.ConfigError(f"train.seq_len={seq_len} exceeds model.max_seq_len={model_cfg.max_seq_len}")
    micro = cfg.train.micro_batch_size
    tokens_per_micro_step = micro * seq_len * d.dp_world
    global_tokens = cfg.train.global_batch_tokens or tokens_per_micro_step
    if global_tokens % tokens_per_micro_step:
        raise config.ConfigError(
            f"train.global_batch_tokens={global_tokens} is not a multiple of micro_batch_size * seq_len * world "
            f"= {micro} * {seq_len} * {d.dp_world} = {tokens_per_micro_step}"
        )
    accum = global_tokens // tokens_per_micro_step
    samples_per_step = micro * accum * d.dp_world
    resolved = config.to_dict(cfg) | {"model": config.to_dict(model_cfg)}
    resolved["train"] |= {"seq_len": seq_len, "global_batch_tokens": global_tokens}
    run = Run(cfg, d, resolved, resume_keys=RESUME_KEYS, deepspeed=True)

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
                for n, x, m, w in candidates if m["splits"].get("val", {}).get("tokens", 0) > seq_len]

    # The end-of-text token is the tokenizer's EOS: in final/'s tokenizer files, and for the tasks.
    tok = load_tokenizer(Path(dirs[0]) / manifest["tokenizer"])
    eot = manifest.get("eot_id")
    hf_tok = HFTokenizer(tok, {} if eot is None else {"eos_token": tok.id_to_token(eot)})
    try:  # on every rank, so that bad task input stops them all
        tasks = TaskSuite(cfg.eval.tasks, hf_tok)
    except TaskError as e:
        raise config.ConfigError(f"eval.tasks: {e}") from None

    n_params, flops_per_token = model.num_params(), model.flops_per_token(seq_len)  # the whole model's, before
    train_model = run.wrap(model)  # a pipeline stage keeps only its own parts
    if any(p.is_meta for p in model.parameters()):  # built on the meta device: rank 0's init, each rank its slices
        materialize(model, full_weights, d.device)
        del full_weights
    optimizer = run.build_optimizer(model)  # after the layout: FSDP2 / TP parameters are DTensors
    run.check_tasks(bool(tasks.tasks))
    state = run.resume(model, optimizer)
    step, samples, skipped = (state["step"], state["samples"], state["skipped_steps"]) if state else (0, 0, 0)
    if state:
        run.restore_rng(state)  # the loader is a function of `samples`: nothing to fast-forward first
    else:
        torch.manual_seed(cfg.run.seed + d.dp_rank)  # dropout differs per rank, reproducibly
    loss_fn = LMLoss(label_smoothing=cfg.train.label_smoothing)

    def save(at_step: int) -> Path:
        return run.save(at_step, model, optimizer, samples=samples, skipped_steps=skipped)

    def validate() -> dict[str, float]:
        if faults.active("sigterm_in_eval", step=step, rank=d.rank):
            os.kill(os.getpid(), signal.SIGTERM)
        losses = {}
        for name, val_data, _ in val_sets:
            batches = [val_data.batch(rank_slice(0, micro, i, d.dp_rank, d.dp_world), micro, d.device)
                       for i in range(cfg.eval.batches)]
            losses[name] = eval_loss(train_model, batches, run.amp_dtype, run.eval_loss_fn(loss_fn))
        if len(val_sets) == 1 and val_sets[0][0] == "":
            return {"val_loss": losses[""]}
        total = sum(w for _, _, w in val_sets)
        mean = sum(w * losses[name] for name, _, w in val_sets) / total
        return {"val_loss": mean, **{f"val_loss/{name}": loss for name, loss in losses.items()}}

    if d.is_main:
        print(f"temper pretrain: {n_params / 1e6:.2f}M parameters, {d.world} rank(s) on {d.device}, "
              f"{global_tokens} tokens/step ({micro} x {seq_len} x {accum} accum x {d.dp_world} data-parallel ranks), "
              f"{run.amp_dtype}, run dir {run.dir}" + (f", from {cfg.init.from_}" if cfg.init.from_ else ""))
        if len(dirs) > 1:
            mix = ", ".join(f"{n} {w:.3f}" for n, w in zip(names, train_data.weights, strict=True))
            print(f"temper pretrain: mixture of {len(dirs)} datasets by share of samples: {mix}")
    total = cfg.train.steps
    with run:
        logger = run.logging(total, step, flops_per_token)
        train_model.train()
        while step < total:
            if faults.active("crash", step=step, rank=d.rank):
                raise SystemExit(f"TEMPER_FAULT crash at step {step} on rank {d.rank}")
            if faults.active("sigterm", step=step, rank=d.rank):
                os.kill(os.getpid(), signal.SIGTERM)  # arrives in the middle of this step
            lr = lr_at(step - skipped, total, cfg.optim.lr, cfg.schedule)
            set_lr(optimizer, lr)
            batches = [train_data.batch(rank_slice(samples, micro, m, d.dp_rank, d.dp_world), micro, d.device)
                       for m in range(accum)]
            try:
                result = run.step(train_model, optimizer, batches, loss_fn, step)
            except NonFiniteLoss:
                if cfg.train.on_nonfinite != "rollback":
                    raise
                bad_samples = samples
                back = run.rollback(model, optimizer)
                step, skipped = back["step"], back["skipped_steps"]
                samples = bad_samples + cfg.train.rollback_skip_steps * samples_per_step
                logger.message(f"non-finite loss: rolled back to step {step}, skipping to sample {samples}")
                continue
            samples += samples_per_step
            skipped += result.skipped
            step += 1
            run.log_train(step, total, result, lr, tokens=samples * seq_len, skipped_steps=skipped)
            if val_sets and run.eval_due(step, total):
                val = validate()
                logger.log(step, {"val_loss": val["val_loss"], "val_ppl": math.exp(min(val["val_loss"], 80.0)),
                                  **val}, kind="val")
                run.restart_clock()  # validation time is not training throughput
            if (d.is_main or d.sharded or run.engine) and tasks.due(step, total):  # a sharded forward: every rank
                # Pipeline stages are gathered into the whole model on rank 0, which runs the tasks alone.
                scorer = whole_model(model) if is_stage(model) else unwrap(model)
                if scorer is not None:
                    with autocast(d.device, run.amp_dtype):
                        logger.log(step, tasks.run(scorer), kind="tasks")
                del scorer
                run.restart_clock()
            saved = run.save_due(step, total)
            if saved:
                save(step)
            if run.preempted():
                if not saved:
                    save(step)
                return run.stop_preempted(step)

    exported = run.exported_model()  # every rank: a sharded model's slices gather on rank 0
    if d.is_main:
        final = run.dir / "final"
        save_hf(exported, model_cfg, final, generation_config={} if eot is None else {"eos_token_id": eot})
        save_hf_tokenizer(hf_tok, final)  # with tokenizer_config.json: AutoTokenizer knows the end-of-text token
        report = run.write_report(final)
        print(f"final model: {final}\nreport: {report}")
    return 0
