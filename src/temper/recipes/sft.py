"""`temper sft`: fine-tune a Hugging Face checkpoint on instruction or chat data (full, LoRA, QLoRA, prefix).

Steps, in the order `run` takes them:
 1. parse the config; load the tokenizer (tokenizer.json + tokenizer_config.json, chat template)
 2. read the examples (data/sft.py): Alpaca, chat `messages` or ShareGPT records -> token ids and
    the mask of the tokens to learn (every assistant turn and its end-of-turn token, never the
    prompt); hold out `val_fraction` of them by a hash of their index and the seed
 3. `--check`: print tokenized examples with the learnt tokens marked, the learnt fraction and the
    lengths, and stop (failing on an example with nothing to learn)
 4. join the process group when launched by torchrun (DDP; gloo on CPU); load the model
    (model/hf/checkpoint.py) and apply the method: full (every weight trains), lora (model/lora.py), qlora
    (NF4 base, model/quant.py, then LoRA), prefix (model/prefix.py); wrap it in DDP, which reduces
    only the gradients of what trains
 5. batches: each epoch, the examples in a seeded order, packed into rows of `seq_len` tokens with
    document masks and restarting positions (or one per row); rows are consumed in a fixed order,
    so the batch at any step is a function of (seed, step) and a resumed run continues exactly;
    each rank takes its micro-batches of a step's rows (loader.rank_slice), so N ranks with the same
    global batch train on the same rows as one process, and the loss is normalised over all of them
 6. the loop: learning-rate schedule, `train_step` (the one place for the loss), log, validation
    loss on the held-out examples, atomic checkpoints of what trains (and the optimizer)
 7. final/ (rank 0 writes it, a sharded model gathered there first): the merged model in Hugging Face
    layout with the tokenizer files (full, lora, qlora), plus the adapter in PEFT's format (lora, qlora, prefix)

It does not pretrain (`temper pretrain`), align (reward, DPO, PPO) or evaluate benchmarks.
"""

from __future__ import annotations

import math
import os
import signal
import sys
from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.distributed as dist

from temper import config, faults
from temper.data.loader import rank_slice, split_holdout
from temper.data.packing import collate_rows
from temper.data.sft import (
    RowOrder,
    SFTDataConfig,
    SFTDataError,
    SFTExample,
    SFTStats,
    check_examples,
    format_report,
    load_sft_examples,
    skip_summary,
)
from temper.data.sources import DataError
from temper.data.tokenizer import HFTokenizer, TokenizerError, load_hf_tokenizer
from temper.eval.run import TaskSuite, TaskSuiteConfig
from temper.eval.tasks import TaskError
from temper.files import UnsafePath
from temper.model.attention import Segments
from temper.model.hf.files import CheckpointError
from temper.model.hf.peft import peft_prefix_refusal
from temper.train import checkpoint as ckpt
from temper.train.losses import LMLoss
from temper.train.methods import (
    LoRAConfig,
    PrefixConfig,
    add_neftune,
    apply_method,
    export_finetuned,
    load_base,
)
from temper.train.optim import OptimConfig, ScheduleConfig, lr_at, set_lr
from temper.train.parallel import DistInfo, init_distributed, shutdown_distributed
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
from temper.train.step import IGNORE_INDEX, NonFiniteLoss, autocast, eval_loss, resolve_precision


@dataclass
class TrainConfig(TrainSection):
    steps: int = 0
    """Optimizer steps (0: from epochs)."""
    micro_batch_size: int = 4
    """Rows per forward pass, on each rank."""
    epochs: float = 1.0
    """Passes over the training examples (steps = epochs x rows / rows per step, unless `steps` is set)."""
    accumulation: int = 1
    """Micro-batches per optimizer step, on each rank: a step is micro_batch_size x accumulation x ranks rows."""
    seq_len: int = 0
    """Tokens per row (0: data.max_length)."""
    pack: bool = True
    """Pack several examples per row (document masks keep them apart); off: one example per row."""
    neftune_alpha: float = 0.0
    """NEFTune's noise on the input embeddings while training, alpha / sqrt(seq_len x width) (the paper and TRL
    suggest 5); 0: none."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.neftune_alpha < 0:
            raise ValueError(f"neftune_alpha must be >= 0, got {self.neftune_alpha}")


@dataclass
class EvalConfig(EvalSection):
    val_fraction: float = 0.05
    """Share of the examples held out for validation (by a hash of the example's position and the seed); every
    held-out row is scored (`batches` does not apply)."""
    tasks: TaskSuiteConfig = field(default_factory=TaskSuiteConfig)
    """Benchmark tasks (ARC, GSM8K, ...) run on rank 0 at step 0 and every `eval.tasks.every` steps (kind "tasks")."""


@dataclass
class SFTConfig:
    model: str = ""
    """Hugging Face checkpoint directory to fine-tune (config.json, safetensors, tokenizer files), e.g. runs/x/final."""
    method: Literal["full", "lora", "qlora", "prefix"] = "lora"
    """What trains: every weight, LoRA adapters, LoRA over an NF4-quantized base, or a learned prefix."""
    check: bool = False
    """Print tokenized examples with the learnt tokens marked and the length statistics, then stop."""
    data: SFTDataConfig = field(default_factory=SFTDataConfig)
    """The examples and how they are rendered."""
    lora: LoRAConfig = field(default_factory=LoRAConfig)
    """LoRA / QLoRA adapters."""
    prefix: PrefixConfig = field(default_factory=PrefixConfig)
    """Prefix tuning."""
    run: RunSection = field(default_factory=lambda: RunSection(name="sft", seed=0))
    """Where the run lives and how it starts."""
    train: TrainConfig = field(default_factory=TrainConfig)
    """Batches and the step."""
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=2e-4, weight_decay=0.0))
    """AdamW."""
    schedule: ScheduleConfig = field(default_factory=lambda: ScheduleConfig(warmup_steps=10))
    """Learning-rate schedule."""
    eval: EvalConfig = field(default_factory=EvalConfig)
    """Validation."""
    checkpoint: CheckpointSection = field(default_factory=CheckpointSection)
    """Checkpoints."""
    log: LogSection = field(default_factory=LogSection)
    """Metrics and progress."""


def main(argv: list[str] | None = None) -> int:
    cfg = config.parse(SFTConfig, argv, prog="sft")
    try:
        return run(cfg)
    except (DataError, TokenizerError, CheckpointError, ckpt.CheckpointCorrupt, FileNotFoundError, UnsafePath,
            RunDirBusy) as e:
        return print_error("sft", e)  # bad input: one line naming the file, no traceback


def run(cfg: SFTConfig) -> int:
    if not cfg.model:
        raise config.ConfigError("model: give a Hugging Face checkpoint directory")
    run_dir = run_directory(cfg.run)  # a bad run.name fails before anything loads
    # 1-2. tokenizer and examples
    tok = load_hf_tokenizer(cfg.model)
    stats = SFTStats()
    examples = load_sft_examples(cfg.data, tok, stats)
    if stats.skipped and not cfg.check:  # --check's report says it too
        print(f"temper sft: {skip_summary(stats)}", file=sys.stderr)
    # 3. the checker
    report = check_examples(examples, tok, max_length=cfg.data.max_length, stats=stats)
    if cfg.check:
        print(format_report(report))
        return 0 if report.ok else 1
    if not report.ok:
        print(format_report(report), file=sys.stderr)
        return 1
    train_ex, val_ex = split(examples, cfg.eval.val_fraction, cfg.run.seed)
    try:
        tasks = TaskSuite(cfg.eval.tasks, tok)  # read now: bad task input fails before training
    except TaskError as e:
        raise config.ConfigError(f"eval.tasks: {e}") from None
    with locked_run_dir(run_dir):  # a second process on this run directory is refused
        d = init_distributed(cfg.run.device, cfg.train.parallel)  # torchrun: one process per rank (DDP); else a single process
        try:
            return _train(cfg, d, tok, stats, train_ex, val_ex, tasks)
        finally:
            shutdown_distributed()


def _train(cfg: SFTConfig, d: DistInfo, tok: HFTokenizer, stats: SFTStats, train_ex: list[SFTExample],
           val_ex: list[SFTExample], tasks: TaskSuite) -> int:
    # 4. model and method
    amp = resolve_precision(cfg.train.precision, d.device)
    model, model_cfg = load_base(cfg.model, cfg.method, d.device, amp)
    if cfg.method == "prefix":
        refusal = peft_prefix_refusal(model_cfg)  # refused now, not after training, when final/ is written
        if refusal:
            raise config.ConfigError(f"method=prefix: {refusal}")
    torch.manual_seed(cfg.run.seed)  # the same adapters on every rank
    apply_method(model, cfg.method, cfg.lora, cfg.prefix, amp_dtype=amp)
    if d.dp_rank:  # other dropout masks on the other ranks; rank 0 keeps the single-process stream
        torch.manual_seed(cfg.run.seed + d.dp_rank)

    # 5. batches
    seq_len = cfg.train.seq_len or cfg.data.max_length
    if seq_len > model_cfg.max_seq_len:
        raise config.ConfigError(f"train.seq_len (or data.max_length) = {seq_len} exceeds the model's context "
                                 f"{model_cfg.max_seq_len}: lower data.max_length")
    rows = RowOrder(train_ex, seq_len, cfg.train.pack, cfg.run.seed)
    micro, accum = cfg.train.micro_batch_size, cfg.train.accumulation
    per_step = micro * accum * d.dp_world  # rows per optimizer step, over all ranks
    steps = cfg.train.steps or max(1, math.ceil(cfg.train.epochs * rows.per_epoch / per_step))
    val_rows = RowOrder(val_ex, seq_len, cfg.train.pack, cfg.run.seed) if val_ex else None
    pad = tok.pad_id if tok.pad_id is not None else 0

    def batch(order: RowOrder, start: int, n: int) -> tuple:
        """Rows start .. start + n - 1 of `order`, on this rank's device."""
        b = collate_rows(order.docs, [order.row(i) for i in range(start, start + n)], seq_len,
                         loss_masks=order.masks, pad_id=pad)
        return (b.tokens.to(d.device), b.targets.to(d.device),
                {"positions": b.positions.to(d.device), "segments": Segments(b.doc_ids.to(d.device))})

    # 6. the loop, on the scaffold every training recipe shares
    resolved = config.to_dict(cfg) | {"model_config": config.to_dict(model_cfg), "steps": steps,
                                      "seq_len": seq_len, "batch_rows": per_step}
    run = Run(cfg, d, resolved, resume_keys=RESUME_KEYS, deepspeed=True)
    train_model = run.wrap(model)  # DDP with world > 1: it reduces only parameters that require grad
    if cfg.train.neftune_alpha:  # on the embedding the layout left in place (a host-held table is its own module)
        add_neftune(model, cfg.train.neftune_alpha)
    optimizer = run.build_optimizer(model)  # after the layout: FSDP2 / TP parameters are DTensors
    run.check_tasks(bool(tasks.tasks))
    state = run.resume(model, optimizer, trainable_only=cfg.method != "full")
    step, offset = (state["step"], state.get("row_offset", 0)) if state else (0, 0)
    if state:
        run.restore_rng(state)
    if d.is_main:
        n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
        print(f"temper sft: {cfg.method} on {cfg.model}: {n_train:,} of {model.num_params():,} parameters train; "
              f"{len(train_ex)} train / {len(val_ex)} val examples, {rows.per_epoch} rows of {seq_len} per epoch, "
              f"{steps} steps of {per_step} rows ({micro} x {accum} accum x {d.dp_world} ranks), {run.amp_dtype}; "
              f"{stats.truncated} truncated, {sum(stats.dropped.values())} dropped")
    loss_fn = LMLoss(label_smoothing=cfg.train.label_smoothing)

    def save(at: int) -> None:  # every rank: rank 0 writes the weights, each rank its RNG
        run.save(at, ckpt.weights_to_save(model, cfg.method != "full"), optimizer, row_offset=offset)

    def validate() -> float:
        """The loss over every held-out row: micro-batches dealt to the ranks as training's are, so the
        rows are the same whatever the world size. Every rank scores as many micro-batches (a sharded
        model's forward needs every rank, and every rank joins eval_loss's all-reduce): where a rank's rows
        have run out, a row whose targets are all ignored."""
        assert val_rows is not None
        n = val_rows.per_epoch
        starts = [rank_slice(0, micro, m, d.dp_rank, d.dp_world) for m in range(math.ceil(n / (micro * d.dp_world)))]
        mbs = []
        for s in starts:
            if s < n:
                mbs.append(batch(val_rows, s, min(micro, n - s)))
            else:
                x, y, kw = batch(val_rows, 0, 1)
                mbs.append((x, torch.full_like(y, IGNORE_INDEX), kw))
        # the unwrapped model: DDP's forward is for training (FSDP2's is the model itself)
        return eval_loss(model, mbs, run.amp_dtype, run.eval_loss_fn(loss_fn), d.dp_group)

    def run_tasks(at: int) -> None:
        # Rank 0's tasks, or under a sharded layout every rank's (the same inputs): its forward needs every rank.
        if (d.is_main or d.sharded or run.engine) and tasks.due(at, steps):
            with autocast(d.device, run.amp_dtype):
                logger.log(at, tasks.run(model), kind="tasks")  # the unwrapped model, adapters included
        run.restart_clock()

    with run:
        logger = run.logging(steps, step, model.flops_per_token(seq_len))
        if step == 0 and val_rows is not None:  # the starting point, to see the held-out loss fall
            logger.log(0, {"val_loss": validate()}, kind="val")
        if step == 0:
            run_tasks(0)
        train_model.train()
        while step < steps:
            if faults.active("crash", step=step, rank=d.rank):
                raise SystemExit(f"TEMPER_FAULT crash at step {step}")
            if faults.active("sigterm", step=step, rank=d.rank):
                os.kill(os.getpid(), signal.SIGTERM)  # arrives in the middle of this step
            lr = lr_at(step, steps, cfg.optim.lr, cfg.schedule)
            set_lr(optimizer, lr)
            first = offset + step * per_step
            mbs = [batch(rows, rank_slice(first, micro, m, d.dp_rank, d.dp_world), micro) for m in range(accum)]
            try:
                result = run.step(train_model, optimizer, mbs, loss_fn, step)
            except NonFiniteLoss:
                if cfg.train.on_nonfinite != "rollback":
                    raise
                bad = step
                back = run.rollback(model, optimizer, trainable_only=cfg.method != "full")
                step = back["step"]
                # Resume `rollback_skip_steps` steps' rows past the bad step's first row (PaLM §5.1).
                offset += (bad - step + cfg.train.rollback_skip_steps) * per_step
                logger.message(f"non-finite loss: rolled back to step {step}, skipping to row {offset + step * per_step}")
                continue
            step += 1
            run.log_train(step, steps, result, lr, epoch=first / rows.per_epoch)
            if val_rows is not None and run.eval_due(step, steps):
                logger.log(step, {"val_loss": validate()}, kind="val")
                run.restart_clock()
            if tasks.due(step, steps):
                run_tasks(step)
            saved = run.save_due(step, steps)
            if saved:
                save(step)
            if run.preempted():
                if not saved:
                    save(step)
                return run.stop_preempted(step)

    # 7. final/, written by rank 0 (a sharded model gathered there first); the others wait, so that every rank
    # returns only once it is complete
    exported = run.exported_model()
    if d.is_main:
        final = run.dir / "final"
        export_finetuned(exported, model_cfg, cfg.method, tok, final, cfg.model)
        run.write_report(final)
        print(f"final model: {final}")
    if d.world > 1:
        dist.barrier()
    return 0


# What must match between a checkpoint and the run that resumes from it.
RESUME_KEYS = ("model", "method", "data", "lora", "prefix", "train.micro_batch_size", "train.epochs",
               "train.accumulation", "train.seq_len", "train.pack", "train.steps", "train.label_smoothing",
               "train.neftune_alpha",
               "optim", "schedule", "steps", "seq_len", "batch_rows", "run.seed")


def split(examples: list[SFTExample], val_fraction: float, seed: int) -> tuple[list[SFTExample], list[SFTExample]]:
    train, val = split_holdout(examples, val_fraction, seed)
    if not train:
        raise SFTDataError("data", "eval.val_fraction", "val_fraction", f"no training examples left after holding out {val_fraction}")
    return train, val
