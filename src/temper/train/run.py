"""The scaffold every training recipe shares: what a run is around its loop, written once.

A recipe's config embeds the same sections with the same meanings — `run` (name, directory, seed,
device, resume), `train` (the step: micro-batch, clipping, precision, compile, activation
checkpointing, label smoothing, non-finite policy), `eval`, `checkpoint` and `log` — and extends
`train`/`eval` with its own fields. `Run` then does, for every recipe alike: the run directory and
its saved config, resume from the newest valid checkpoint with a check on the typed fields that
must not change, the autocast dtype and the fp16 grad scaler, the model's wrapping (float8, checkpointing,
compile, DDP or FSDP2), one optimizer step with the non-finite policy, tokens/s and MFU, parameter counts and
every log.monitor_every steps the numbers by parameter group (`train.monitor`), checkpoints, the
trained model as one plain module for final/ whatever the layout (`exported_model`), the report (sent with
final/ to MLflow under log.mlflow: `write_report`), and SIGTERM or a first Ctrl-C (a checkpoint at the next
step boundary, then exit code 143; a second Ctrl-C ends the process at once). `locked_run_dir` keeps a second
process off a run directory in use.

The loop itself stays in the recipe, visible: it decides what a batch is and when to evaluate.
This module does not build models or data, and computes no loss (`train/losses.py`).
"""

from __future__ import annotations

import copy
import fcntl
import itertools
import json
import os
import signal
import socket
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Literal

import torch
import torch.distributed as dist
import yaml
from torch import nn

from temper import config, faults
from temper.errors import InputError
from temper.files import atomic_write_text, safe_join, safe_name
from temper.model.transformer import Transformer
from temper.train import checkpoint as ckpt
from temper.train import deepspeed_engine as dse
from temper.train.float8 import check_float8, remove_float8
from temper.train.log import RunLogger, report_files, write_report
from temper.train.losses import Batch, CompiledLoss, Loss, RouterBalance, balance_choice_bias
from temper.train.monitor import CommTimer, Monitor, param_counts
from temper.train.optim import build_optimizer
from temper.train.parallel import (
    DistInfo,
    ParallelConfig,
    full_state_dict,
    parallelize,
    remove_activation_checkpointing,
    remove_host_embeddings,
)
from temper.train.step import (
    MicroBatch,
    NonFiniteLoss,
    StepResult,
    datasheet_peak_flops,
    measured_matmul_peak_flops,
    resolve_precision,
    throughput,
    train_step,
)

MAX_ROLLBACKS = 3
"""on_nonfinite=rollback gives up (NonFiniteLoss) on the 4th return to the same checkpoint."""

EXIT_PREEMPTED = 143
"""Exit code after a SIGTERM (or a first Ctrl-C) was handled by writing a checkpoint (128 + SIGTERM, as a
shell reports it)."""

LOCK_FILE = "temper.lock"
"""In the run directory: locked (flock) by the process training in it, and naming it."""


@dataclass
class RunSection:
    name: str = "run"
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
    """Allow resuming with settings that differ from the checkpoint's (model, batch, schedule, ...)."""


@dataclass
class TrainSection:
    steps: int = 200
    """Optimizer steps (a recipe may derive them from epochs when 0)."""
    micro_batch_size: int = 8
    """Sequences per forward pass on each rank."""
    grad_clip: float = 1.0
    """Clip the global gradient norm to this value; 0 disables clipping (the norm is still logged)."""
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    """auto: bf16 autocast on a GPU that supports it, else fp32. fp16 uses a gradient scaler."""
    compile: bool = False
    """torch.compile each block (one compiled graph for identical blocks; parameter names unchanged)."""
    compile_scope: Literal["blocks", "model"] = "blocks"
    """With compile: what is compiled. blocks: each block in place (every layout); model: the whole model in place
    and, in the training step, the model's forward and the loss after it as one graph (fewer kernel launches and
    less host work a step; one process or DDP only: not with FSDP2, tensor or pipeline parallel, nor DeepSpeed; under
    DDP the gradients' all-reduce starts after the whole backward instead of overlapping it). Parameter names and
    checkpoints are the same for both."""
    attention: Literal["auto", "sdpa", "flex"] = "auto"
    """Kernel of masked attention (packed documents, padding): flex (FlexAttention block mask; CUDA), sdpa (dense
    mask) or auto (flex on CUDA, sdpa elsewhere); unmasked causal batches always take SDPA's flash kernel."""
    float8: bool = False
    """The blocks' linear layers in float8 (torchao, tensorwise scaling; CUDA compute capability >= 8.9, full weights)."""
    activation_checkpointing: int = 0
    """Recompute activations of every k-th block in backward; 0 disables."""
    activation_offload: bool = False
    """With activation_checkpointing: keep the checkpointed blocks' inputs in CPU memory until backward, and (one
    process or DDP) a frozen, untied token embedding there too: each forward copies over only the rows it reads."""
    label_smoothing: float = 0.0
    """Cross-entropy label smoothing."""
    router_aux_loss_coef: float = 0.0
    """A mixture of experts: add this times its routers' load-balancing loss (Mixtral trained with 0.02, Qwen3-MoE
    0.001; transformers' router_aux_loss_coef with output_router_logits); 0: none, as transformers fine-tunes."""
    expert_bias_rate: float = 0.0
    """Experts with a choice bias (model.expert_choice_bias): after each step move each expert's bias by this, up if it
    took fewer than its layer's mean share of the step's tokens, down if more (DeepSeek-V3's auxiliary-loss-free
    balancing: 0.001); logged as `expert_maxvio`, the most loaded expert's excess over the mean. 0: the biases stay."""
    on_nonfinite: Literal["fail", "skip", "rollback"] = "fail"
    """On a NaN/inf loss: fail (raise before the optimizer step), skip the update, or reload the last
    checkpoint and skip `rollback_skip_steps` steps' worth of data past the bad batch."""
    rollback_skip_steps: int = 1
    """rollback only: how many steps' batches to skip, counted from the batch that failed."""
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    """How the ranks of a torchrun job are laid out: DDP (default), FSDP2 / HSDP / ZeRO-1, tensor and pipeline parallel."""
    deepspeed: str = ""
    """A DeepSpeed JSON config (ZeRO stage 1-3, CPU offload) for DeepSpeed to shard and step the model, temper
    keeping its loss normalisation (`pip install temper[deepspeed]`; pretrain and sft, under torchrun). Its
    checkpoints hold the weights only (DeepSpeed's own reader unpickles): such a run does not resume."""

    def __post_init__(self) -> None:
        if self.steps < 0 or self.micro_batch_size <= 0:
            raise ValueError("steps must be >= 0 and micro_batch_size > 0")
        if self.deepspeed and (self.parallel != ParallelConfig() or self.on_nonfinite == "rollback"):
            raise ValueError("deepspeed: DeepSpeed lays out and steps the model itself: leave train.parallel at its "
                             "default, and on_nonfinite at fail or skip (rollback needs a resumable checkpoint)")
        if self.float8 and self.deepspeed:
            raise ValueError("float8: DeepSpeed lays out the model itself, without temper's float8 layers; drop one of them")
        if self.float8 and self.parallel.tp > 1:
            raise ValueError("float8 does not compose with tensor parallel (parallel.tp > 1) here: use FSDP2 "
                             "(parallel.dp_shard) or DDP")
        if self.compile_scope == "model":
            if not self.compile:
                raise ValueError("compile_scope=model needs compile=true (it says what is compiled)")
            p = self.parallel
            if p.dp_shard > 1 or p.tp > 1 or p.pp > 1 or self.deepspeed:
                raise ValueError("compile_scope=model compiles the whole model as one graph: one process or DDP "
                                 "only, not with parallel.dp_shard, tp or pp > 1 nor deepspeed; use compile_scope=blocks")
        if self.activation_offload and not self.activation_checkpointing:
            raise ValueError("activation_offload needs activation_checkpointing >= 1 (it offloads the checkpoints)")
        if not 0.0 <= self.label_smoothing < 1.0:
            raise ValueError(f"label_smoothing must be in [0, 1), got {self.label_smoothing}")
        if self.router_aux_loss_coef < 0:
            raise ValueError(f"router_aux_loss_coef must be >= 0, got {self.router_aux_loss_coef}")
        if self.expert_bias_rate < 0:
            raise ValueError(f"expert_bias_rate must be >= 0, got {self.expert_bias_rate}")
        for key in ("router_aux_loss_coef", "expert_bias_rate"):
            if getattr(self, key) and (self.parallel.pp > 1 or self.compile_scope == "model"):
                raise ValueError(f"{key} reads the routers of the model the loss runs: not with parallel.pp > 1 (the "
                                 "loss sees the last stage) nor compile_scope=model")


@dataclass
class EvalSection:
    every: int = 50
    """Validation every N steps and at the end; 0: only at the end."""
    batches: int = 8
    """Validation batches of micro_batch_size x ranks sequences (recipes with a fixed held-out set use all of it)."""


@dataclass
class CheckpointSection:
    every: int = 100
    """Save every N steps, at the end and on SIGTERM; 0: only at the end and on SIGTERM."""
    keep_last_n: int = 3
    """Checkpoints to keep (>= 2, or 0 to keep all); older ones go only after a new one is complete."""
    fresh_if_corrupt: bool = False
    """With run.resume=auto, when every checkpoint is corrupt: start again from step 0 instead of refusing (the
    corrupt ones are kept, renamed step-N.corrupt, and the old metrics.jsonl is kept as metrics.<time>.jsonl)."""
    async_save: bool = False
    """Sharded layouts (FSDP2, TP, PP): copy the shards to CPU memory and write them in a background thread while
    training goes on; the checkpoint is committed when the next save starts or the run ends."""

    def __post_init__(self) -> None:
        if self.keep_last_n == 1:
            raise ValueError("keep_last_n=1 is unsafe (a crash while saving leaves nothing); use >= 2 or 0")
        if self.every < 0 or self.keep_last_n < 0:
            raise ValueError("every and keep_last_n must be >= 0")


@dataclass
class LogSection:
    every: int = 1
    """Log train metrics every N steps."""
    tensorboard: bool = False
    """Also write TensorBoard events to <run>/tb."""
    wandb: bool = False
    """Also log to Weights & Biases (needs `pip install wandb`)."""
    mlflow: bool = False
    """Also track the run in MLflow (`pip install 'temper[experiments]'`): the config as params, metrics per step,
    the report and final/ as artifacts."""
    mlflow_uri: str = ""
    """MLflow tracking URI (http://..., sqlite:..., file:..., databricks); "": a local store shared by the runs of
    <run.dir>, <run.dir>/mlflow.db with artifacts in <run.dir>/mlartifacts."""
    mlflow_experiment: str = "temper"
    """MLflow experiment the run is filed under (created when missing)."""
    progress: bool = True
    """Show a progress bar."""
    plots: bool = True
    """Draw the report's PNG plots (matplotlib, about a second of CPU); false: report.md's table alone, for many
    short runs (a sweep's trials, a test suite's)."""
    monitor_every: int = 0
    """Every N optimizer steps also log, by parameter group (embedding, attention, mlp, norm, head, lora, prefix,
    other), gradient norms and update/weight ratios, the learning rate of each optimizer group and, under DDP, the
    share of the step spent in gradient all-reduce; 0: never. A multiple of `every` (they go on logged lines)."""

    def __post_init__(self) -> None:
        if self.every < 1 or self.monitor_every < 0:
            raise ValueError("every must be >= 1 and monitor_every >= 0")
        if self.monitor_every % self.every:
            raise ValueError(f"monitor_every ({self.monitor_every}) must be a multiple of every ({self.every}): "
                             "the monitored numbers are written on logged lines")


SECTIONS = ("run", "train", "eval", "checkpoint", "log")
"""The config sections every training recipe has, with the types above (a test checks it)."""

_MISSING = object()


def lookup(tree: dict, dotted: str) -> Any:
    """tree["a"]["b"] for "a.b", or a sentinel when a part is missing."""
    for part in dotted.split("."):
        tree = tree.get(part, _MISSING) if isinstance(tree, dict) else _MISSING
    return tree


def check_resume_config(saved: dict, current: dict, keys: Sequence[str], allow: bool) -> None:
    """Refuse to resume when a setting in `keys` differs from the checkpoint's (a key missing from the
    checkpoint was added to temper after it was written: not a change)."""
    diffs = [k for k in keys if lookup(saved, k) is not _MISSING and lookup(saved, k) != lookup(current, k)]
    if diffs and not allow:
        detail = "; ".join(f"{k}: checkpoint {lookup(saved, k)!r} vs now {lookup(current, k)!r}" for k in diffs)
        raise config.ConfigError(
            f"resume config mismatch ({detail}); pass --run.override_checkpoint_config=true to resume anyway "
            "(or another run.name, or run.resume=never)"
        )


def run_directory(section: RunSection) -> Path:
    """<run.dir>/<run.name>, the name checked first (a plain name: no '/', '..'): callers check it before
    loading anything, so a bad name costs nothing."""
    return safe_join(section.dir, safe_name(section.name, what="run name"))


class RunDirBusy(InputError):
    """Another process is training in this run directory."""


@contextmanager
def locked_run_dir(run_dir: Path, rank: int | None = None) -> Iterator[None]:
    """Hold an exclusive lock on `run_dir` while training in it: a second `pretrain`/`sft` there would clean
    up the first one's checkpoint in progress as a crash's leftover, or save over it. flock on LOCK_FILE,
    which the kernel releases however the holder ends (kill -9 included), so a stale lock cannot block
    a restart. Only the main process of a torchrun job (RANK 0, read from the environment when `rank` is
    None: this runs before the process group exists) locks; the other ranks share its directory."""
    if (int(os.environ.get("RANK", "0")) if rank is None else rank) != 0:
        yield
        return
    created, locked = not run_dir.exists(), False
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(run_dir / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as e:
        raise config.ConfigError(f"run directory {run_dir}: {e.strerror or e}") from None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            locked = True
        except BlockingIOError:
            raise RunDirBusy(f"run directory {run_dir} is in use by another training process ({_holder(fd)}): "
                             f"wait for it to end or stop it, or choose another run.name") from None
        except OSError as e:  # a filesystem without locks: train, but say that nothing guards the directory
            print(f"temper: warning: cannot lock {run_dir / LOCK_FILE} ({e.strerror or e}); a second process on "
                  f"this run directory would not be refused", file=sys.stderr)
        me = {"pid": os.getpid(), "host": socket.gethostname(), "command": " ".join(sys.argv)[:500],
              "started": datetime.now(timezone.utc).isoformat(timespec="seconds")}
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(me) + "\n").encode(), 0)
        yield
    finally:
        if created and locked:  # never a directory another process holds
            _remove_if_unused(run_dir)
        os.close(fd)  # releases the lock


def _remove_if_unused(run_dir: Path) -> None:
    """A start that failed before writing anything (bad data, a refused setting) leaves no run directory
    behind: one holding only the lock file goes (while still locked, so no other process is using it)."""
    try:
        if [p.name for p in run_dir.iterdir()] == [LOCK_FILE]:
            (run_dir / LOCK_FILE).unlink()
            run_dir.rmdir()
    except OSError:
        pass  # best effort: an empty run directory is harmless


def _holder(fd: int) -> str:
    """Who holds the lock, as the holder wrote it into the lock file."""
    try:
        me = json.loads(os.pread(fd, 4096, 0).decode())
        return f"pid {me['pid']} on {me['host']}, started {me['started']}: {me['command']}"
    except (OSError, ValueError, KeyError, TypeError):
        return "it has not written its pid yet"


class _SigtermFlag:
    """SIGTERM, or a first Ctrl-C (SIGINT), only sets a flag; the loop saves at the next step boundary
    (never mid-accumulation) and exits with EXIT_PREEMPTED. A second Ctrl-C ends the process at once:
    SIGINT's default action, no traceback, the steps since the last checkpoint lost."""

    def __init__(self) -> None:
        self.raised = False
        self.name = ""
        """The signal that came first ("SIGTERM" or "SIGINT")."""
        self._previous = {s: signal.signal(s, self._handle) for s in (signal.SIGTERM, signal.SIGINT)}

    def _handle(self, signum, frame) -> None:
        self.raised = True
        self.name = self.name or signal.Signals(signum).name
        if signum == signal.SIGINT:
            signal.signal(signal.SIGINT, signal.SIG_DFL)  # the next Ctrl-C ends the process at once
            # os.write, not print: a handler that prints while the loop prints can raise "reentrant call".
            os.write(2, b"\ntemper: Ctrl-C: writing a checkpoint at the end of this step, then exiting; "
                        b"Ctrl-C again to exit at once\n")

    def any_rank(self, d: DistInfo) -> bool:
        if d.world == 1:
            return self.raised
        flag = torch.full((1,), float(self.raised), device=d.device)  # filled there: no blocking copy to the device
        dist.all_reduce(flag)
        return flag.item() > 0

    def restore(self) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)


class Run:
    """One training run around a recipe's loop (module docstring). Typical use:

        run = Run(cfg, d, resolved, resume_keys=RESUME_KEYS)
        train_model = run.wrap(model)
        state = run.resume(model, optimizer)          # None for a fresh run
        with run:
            logger = run.logging(total_steps, start_step, flops_per_token)
            while step < total:
                result = run.step(train_model, optimizer, batches, loss_fn, step)
                run.log_train(...); eval, run.save(...), run.preempted() ...
    """

    def __init__(self, cfg: Any, d: DistInfo, resolved: dict, *, resume_keys: Sequence[str],
                 deepspeed: bool = False) -> None:
        """deepspeed: the recipe evaluates with `eval_loss_fn` and calls `check_tasks`, so `train.deepspeed` may be
        used."""
        if cfg.train.deepspeed and not deepspeed:
            raise config.ConfigError("train.deepspeed: this recipe does not run under DeepSpeed (pretrain and sft do); "
                                     "use train.parallel (FSDP2: dp_shard) instead")
        if cfg.train.deepspeed and cfg.optim.name == "muon":
            raise config.ConfigError("optim.name=muon: DeepSpeed steps its own optimizer over flattened partitions, "
                                     "where Muon needs each weight matrix whole; use train.parallel (FSDP2: dp_shard)")
        if cfg.train.deepspeed and cfg.log.monitor_every:
            raise config.ConfigError("log.monitor_every: DeepSpeed steps the model itself, so its steps cannot be "
                                     "measured by parameter group; leave it at 0 under train.deepspeed")
        if cfg.train.float8:  # refused before the model is laid out, the data read or a step taken
            check_float8(d.device)
        if cfg.train.attention == "flex" and d.device.type != "cuda":
            raise config.ConfigError(f"train.attention=flex trains on CUDA only (torch has no FlexAttention backward "
                                     f"on {d.device.type}); use auto or sdpa")
        self.cfg, self.d, self.resolved = cfg, d, resolved
        # A checkpoint's optimizer holds its kind (Muon's states are not AdamW's) and the lr scales of Muon's and
        # LoRA+'s param groups (which load over this run's).
        self.resume_keys = (*resume_keys, "optim.name", "optim.muon_lr", "optim.loraplus_lr_ratio")
        self.dir = run_directory(cfg.run)
        self.amp_dtype = resolve_precision(cfg.train.precision, d.device)
        self.scaler = torch.amp.GradScaler(d.device.type) if self.amp_dtype == torch.float16 else None
        self.logger: RunLogger | None = None
        self._sigterm: _SigtermFlag | None = None
        self._flops_per_token = 0.0
        self._peak: float | None = None
        self._window_tokens, self._window_start = 0, time.perf_counter()
        self._rollbacks: dict[str, int] = {}
        self._preempted = False
        self.model: nn.Module | None = None
        """The model `wrap` laid out (its optimizer's parameters)."""
        self.engine: Any = None
        """The DeepSpeed engine with train.deepspeed (built by `build_optimizer`), else None."""
        self._pending: ckpt.PendingSave | None = None
        """A checkpoint being written in the background (checkpoint.async_save)."""
        self._skeleton: nn.Module | None = None
        """Under a sharded layout, the model's structure before `wrap` with meta tensors for weights: what
        `exported_model` gathers the trained weights into."""
        self.monitor = Monitor() if cfg.log.monitor_every else None
        """What `step` measures by parameter group every log.monitor_every steps (None: never)."""
        self._monitored: dict[str, float] = {}
        """The last monitored step's numbers, until the next logged line carries them."""
        self.param_counts: tuple[int, int] | None = None
        """(total, trainable) parameters of the model `wrap` was given, for the first logged line."""
        self._counts_due = False
        self._compiled: dict[int, CompiledLoss] = {}
        """Under train.compile_scope=model, each loss `step` compiled with the model, by id (`_compiled_loss`)."""

    # ---- model and resume ------------------------------------------------------------------------

    def wrap(self, model: nn.Module) -> nn.Module:
        """The layout `train.parallel` says (tensor parallel -> activation checkpointing -> compile -> FSDP2 or
        DDP), in place; returns the module to call. Build the optimizer after it (`build_optimizer`): FSDP2
        and tensor parallel replace the parameters with DTensors."""
        t = self.cfg.train
        self.model = model
        for m in model.modules():  # the kernel of masked attention, on every decoder (a head's or value model's too)
            if isinstance(m, Transformer):
                m.attn_impl = t.attention
        self.param_counts = param_counts(model)  # the whole model: before a pipeline split or FSDP2's sharding
        if t.deepspeed:  # DeepSpeed lays the model out itself, in `build_optimizer`
            if self.d.world == 1:
                raise config.ConfigError("train.deepspeed runs under torchrun (it needs a process group)")
            self._skeleton = skeleton(model)
            return model
        if self.d.sharded:
            self._skeleton = skeleton(model)
        wrapped = parallelize(model, self.d, activation_checkpointing=t.activation_checkpointing,
                              activation_offload=t.activation_offload, compile=t.compile,
                              compile_scope=t.compile_scope, amp_dtype=self.amp_dtype,
                              float8=t.float8)
        if self.monitor is not None and isinstance(wrapped, nn.parallel.DistributedDataParallel):
            # Registered only when monitoring: DDP's built-in all-reduce otherwise, without a Python hook.
            self.monitor.comm = CommTimer(cuda=self.d.device.type == "cuda")
            wrapped.register_comm_hook(None, self.monitor.comm.hook)
        return wrapped

    def exported_model(self) -> nn.Module | None:
        """The trained model (as `wrap` was given it: adapters, heads and all) as one plain module, for final/, on
        rank 0; None on the other ranks. Every rank must call it: a sharded model's slices are gathered
        (`parallel.full_state_dict`) into the structure `wrap` kept, on the CPU; a replicated model is returned
        itself, without activation checkpointing, float8 layers or host-held embeddings."""
        if self._skeleton is None:
            if not self.d.is_main:
                return None
            return remove_float8(remove_host_embeddings(remove_activation_checkpointing(self.model)))
        weights = dse.full_state_dict(self.engine) if self.engine else full_state_dict(self.model)
        if not self.d.is_main:
            return None
        model = self._skeleton
        kept = {n for n, t in itertools.chain(model.named_parameters(), model.named_buffers()) if not t.is_meta}
        extra = model.load_state_dict({k: v for k, v in weights.items() if k not in kept}, strict=False,
                                      assign=True).unexpected_keys
        if extra:
            raise RuntimeError(f"exported model: gathered weights it has no place for: {extra[:8]}")
        for m in model.modules():  # tables that are not saved (RoPE's), computed again
            if hasattr(m, "init_buffers"):
                m.init_buffers("cpu")
        left = [n for n, t in itertools.chain(model.named_parameters(), model.named_buffers()) if t.is_meta]
        if left:
            raise RuntimeError(f"exported model: no gathered weights for {left[:8]}")
        return model

    def write_report(self, final: Path | None = None) -> Path:
        """After the loop, on rank 0, once `final/` is written: report.md with its plots (`log.write_report`);
        with log.mlflow, the report and `final` uploaded as the MLflow run's artifacts report/ and final/."""
        path = write_report(self.dir, plots=self.cfg.log.plots)
        if self.logger is not None:
            for file in report_files(self.dir):
                self.logger.log_artifacts(file, "report")
            if final is not None:
                self.logger.log_artifacts(final, "final")
        return path

    def build_optimizer(self, model: nn.Module) -> torch.optim.Optimizer:
        """AdamW over the (wrapped) model's trainable parameters, its states sharded over the replicas with
        `train.parallel.zero1`."""
        t = self.cfg.train
        zero1 = t.parallel.zero1 and self.d.dp_world > 1
        optimizer = build_optimizer(model, self.cfg.optim, self.d.device.type, shard_states=zero1)
        if not t.deepspeed:
            return optimizer
        ds_config = dse.load_config(t.deepspeed, micro_batch_size=t.micro_batch_size, grad_accum=1,
                                    dp_world=self.d.dp_world, grad_clip=t.grad_clip, precision=t.precision)
        self.engine = dse.initialize(model, optimizer, ds_config)  # imports deepspeed, the optional extra
        return self.engine.optimizer

    def eval_loss_fn(self, loss_fn: Loss) -> Loss:
        """The loss to evaluate with: `loss_fn`, or under DeepSpeed ZeRO-3 `loss_fn` run inside the engine's
        forward, which gathers the partitioned parameters it reads (the head, outside the model's forward)."""
        if self.engine is None or self.engine.zero_optimization_stage() != 3:
            return loss_fn
        return dse.EngineLoss(self.engine, loss_fn)

    def check_tasks(self, wanted: bool) -> None:
        """Benchmark tasks generate with the model outside any step: refused under DeepSpeed ZeRO-3, which keeps
        only a partition of every parameter on each rank."""
        if wanted and self.engine is not None and self.engine.zero_optimization_stage() == 3:
            raise config.ConfigError("eval.tasks cannot run under train.deepspeed with ZeRO stage 3; use stage 1-2, "
                                     "or train.parallel.dp_shard (FSDP2)")

    def resume(self, model: nn.Module, optimizer: torch.optim.Optimizer, *, trainable_only: bool = False) -> dict | None:
        """The newest valid checkpoint's state (model, optimizer and scaler restored; RNG by `restore_rng`)
        after checking its settings against this run's; or, for a fresh run, None after writing
        config.yaml and config.resolved.yaml. Rank 0 prints the resolved config either way."""
        try:
            start = ckpt.find_resume_checkpoint(self.dir, self.cfg.run.resume)
        except ckpt.NoValidCheckpoint as e:
            if not self.cfg.checkpoint.fresh_if_corrupt:
                raise ckpt.CheckpointCorrupt(
                    f"{e}; refusing to start again from step 0: pass --checkpoint.fresh_if_corrupt=true to do so "
                    "(keeping them as step-N.corrupt and the old metrics), or --run.resume=<checkpoint path>") from None
            self._start_over(e)
            start = None
        if self.d.is_main:
            print(yaml.safe_dump(self.resolved, sort_keys=False, default_flow_style=None), end="")
        if start is None:
            if self.d.is_main:
                self.dir.mkdir(parents=True, exist_ok=True)
                atomic_write_text(self.dir / "config.yaml", config.to_yaml(self.cfg))
                atomic_write_text(self.dir / "config.resolved.yaml",
                                  yaml.safe_dump(self.resolved, sort_keys=False, default_flow_style=None))
            return None
        if self.engine is not None:
            raise config.ConfigError(f"train.deepspeed: {start} exists, and a DeepSpeed run does not resume (its "
                                     f"checkpoints hold the weights only): pass --run.resume=never, or another run.name")
        saved = ckpt.read_state(start)["config"]  # checked before any weight is read
        check_resume_config(saved, self.resolved, self.resume_keys, self.cfg.run.override_checkpoint_config)
        state = ckpt.load_checkpoint(start, model=model, optimizer=optimizer, map_location=self.d.device,
                                     trainable_only=trainable_only)
        if self.scaler is not None and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        state["path"] = start
        return state

    def _start_over(self, e: ckpt.NoValidCheckpoint) -> None:
        """checkpoint.fresh_if_corrupt: step 0 again, the old run kept for a post-mortem: its checkpoints
        renamed step-N.corrupt (out of resume's and retention's way) and its metrics.jsonl renamed
        metrics.<time>.jsonl (the new run's steps restart at 1, so one file would hold each step twice)."""
        if self.d.world > 1:
            dist.barrier()  # every rank has looked at the checkpoints before rank 0 moves them
        if self.d.is_main:
            moved = ckpt.set_aside([path for path, _ in e.corrupt])
            metrics = self.dir / "metrics.jsonl"
            kept = ""
            if metrics.exists():
                stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
                metrics.rename(metrics.with_name(f"metrics.{stamp}.jsonl"))
                kept = f", old metrics in metrics.{stamp}.jsonl"
            print(f"temper: {e}; starting again from step 0 (checkpoint.fresh_if_corrupt): kept as "
                  f"{', '.join(p.name for p in moved)}{kept}", file=sys.stderr)
        if self.d.world > 1:
            dist.barrier()

    def restore_rng(self, state: dict) -> None:
        """Restore every device's RNG from the checkpoint: after the data loader was fast-forwarded,
        so that fast-forwarding does not consume the restored stream."""
        ckpt.restore_rng(state["path"], self.d.rank)

    # ---- the loop's pieces -----------------------------------------------------------------------

    def logging(self, total_steps: int, start_step: int, flops_per_token: float) -> RunLogger:
        """Open the run's logger (metrics.jsonl, progress, TensorBoard / W&B / MLflow) and SIGTERM flag; the loop
        uses `run.logger`, and `run.close()` (or the `with` block) ends both."""
        log = self.cfg.log
        self.logger = RunLogger(self.dir, total_steps=total_steps, start_step=start_step, rank=self.d.rank,
                                tensorboard=log.tensorboard, wandb=log.wandb, mlflow=log.mlflow,
                                mlflow_uri=log.mlflow_uri, mlflow_experiment=log.mlflow_experiment,
                                config=self.resolved, progress=log.progress)
        self._sigterm = _SigtermFlag()
        self._flops_per_token = flops_per_token
        self._counts_due = self.param_counts is not None  # on the first line this process logs
        # The datasheet peak on known GPUs; else a bf16/fp32 matmul measured now (the honest denominator).
        self._peak = datasheet_peak_flops(self.d.device, self.amp_dtype) or \
            measured_matmul_peak_flops(self.d.device, self.amp_dtype)
        self._window_tokens, self._window_start = 0, time.perf_counter()
        return self.logger

    def __enter__(self) -> Run:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close(failed=exc[0] is not None)

    def close(self, failed: bool = False) -> None:
        """End the logger and the signal handlers; first commit a checkpoint still being written, unless the
        run failed (a peer may be gone: the unfinished checkpoint stays a `.tmp` directory, ignored)."""
        if self._pending is not None and not failed:
            self.wait_for_save()
        if self.logger is not None:
            self.logger.close("FAILED" if failed else "KILLED" if self._preempted else "FINISHED")
        if self._sigterm is not None:
            self._sigterm.restore()
            self._sigterm = None

    def step(self, train_model: nn.Module, optimizer: torch.optim.Optimizer, batches: Sequence[MicroBatch],
             loss_fn: Loss, step: int) -> StepResult:
        """One optimizer step with this run's precision, scaler, clipping and non-finite policy.
        "rollback" raises NonFiniteLoss for the recipe's loop, which calls `rollback`."""
        t = self.cfg.train
        every = self.cfg.log.monitor_every
        # `step` counts optimizer steps from 0: step + 1 is the number the loop logs it as (grpo and ppo make
        # several updates a logged step: the last monitored one's numbers go on the next logged line).
        monitor = self.monitor if every and (step + 1) % every == 0 else None
        balance = None
        if t.router_aux_loss_coef or t.expert_bias_rate:
            loss_fn = balance = RouterBalance(loss_fn, t.router_aux_loss_coef, [] if t.expert_bias_rate else None)
        if t.compile and t.compile_scope == "model" and self.engine is None:
            loss_fn = self._compiled_loss(loss_fn)
        if self.engine is not None:  # DeepSpeed clips and steps; the loss is normalised as in train_step
            result = dse.deepspeed_step(self.engine, batches, step=step, loss_fn=loss_fn, amp_dtype=self.amp_dtype,
                                        on_nonfinite=t.on_nonfinite, dp_group=self.d.dp_group)
        else:
            try:
                result = train_step(train_model, optimizer, batches, step=step, loss_fn=loss_fn,
                                    amp_dtype=self.amp_dtype, scaler=self.scaler, clip_norm=t.grad_clip,
                                    dp_group=self.d.dp_group, monitor=monitor,
                                    on_nonfinite="fail" if t.on_nonfinite == "rollback" else t.on_nonfinite)
            finally:
                if monitor is not None and monitor.comm is not None:
                    monitor.comm.on = False  # a failed step leaves no timing on for the next ones
        if balance is not None and balance.loads is not None and not result.skipped:
            result.metrics["expert_maxvio"] = balance_choice_bias(train_model, balance.loads, t.expert_bias_rate,
                                                                  self.d.dp_group)
        if result.monitored:
            self._monitored = result.monitored
        # Throughput counts the positions the model ran (padding and prompts included: compute was spent
        # on them), not the loss's units, which are pairs for preference losses.
        self._window_tokens += sum(Batch.of(b).inputs.numel() for b in batches) * self.d.dp_world
        return result

    def _compiled_loss(self, loss_fn: Loss) -> CompiledLoss:
        """train.compile_scope=model: `loss_fn` compiled with the model's forward; kept for each loss object the
        recipe passes (distill alternates two), so that its compiled graph is reused step after step."""
        compiled = self._compiled.get(id(loss_fn))
        if compiled is None or compiled.loss is not loss_fn:
            compiled = self._compiled[id(loss_fn)] = CompiledLoss(loss_fn)
        return compiled

    def rollback(self, model: nn.Module, optimizer: torch.optim.Optimizer, *, trainable_only: bool = False) -> dict:
        """After a non-finite loss with on_nonfinite=rollback: reload the newest checkpoint (PaLM §5.1:
        restart from before the spike and skip the batches around it); re-raises when there is none."""
        self.wait_for_save()
        try:
            last = ckpt.find_resume_checkpoint(self.dir, "auto")
        except ckpt.NoValidCheckpoint as e:
            raise NonFiniteLoss(f"non-finite loss and no valid checkpoint to roll back to: {e}") from None
        if last is None:
            raise NonFiniteLoss("non-finite loss and no checkpoint to roll back to")
        # A loss that turns non-finite whatever the data (a diverged learning rate, say) would send the
        # run back to the same checkpoint forever: give up after MAX_ROLLBACKS returns to one checkpoint.
        self._rollbacks[last.name] = self._rollbacks.get(last.name, 0) + 1
        if self._rollbacks[last.name] > MAX_ROLLBACKS:
            raise NonFiniteLoss(f"non-finite loss again after {MAX_ROLLBACKS} rollbacks to {last.name}: giving up")
        state = ckpt.load_checkpoint(last, model=model, optimizer=optimizer, map_location=self.d.device,
                                     trainable_only=trainable_only)
        ckpt.restore_rng(last, self.d.rank)
        self.logger.rewind(state["step"])
        self._monitored = {}  # measured after the checkpoint: those steps run again
        return state

    def log_train(self, step: int, total_steps: int, result: StepResult, lr: float, **extra: float) -> None:
        """Every `log.every` steps (and the last): loss, lr, gradient norm, tokens/s and MFU over the
        steps since the last line (evaluation and checkpoint time excluded), plus the recipe's extras."""
        if step % self.cfg.log.every and step != total_steps:
            return
        if self.d.device.type == "cuda":
            torch.cuda.synchronize(self.d.device)
        elapsed = time.perf_counter() - self._window_start
        # tokens/s over the whole job, against the peak of every device in it (each runs 1/world of the FLOPs).
        peak = self._peak * self.d.world if self._peak else None
        tokens_per_s, mfu = throughput(self._window_tokens, elapsed, self._flops_per_token, peak)
        once = {}
        if self._counts_due:  # parameter counts on the first line each process start logs (kind "train")
            once = dict(zip(("params_total", "params_trainable"), self.param_counts, strict=True))
            self._counts_due = False
        self.logger.log(step, {"loss": result.loss, "lr": lr, "grad_norm": result.grad_norm,
                               "tokens_per_s": tokens_per_s, "mfu": mfu,
                               "step_time_s": elapsed / max(self.cfg.log.every, 1), **result.metrics,
                               **self._monitored, **once, **extra})
        self._monitored = {}
        self.restart_clock()

    def restart_clock(self) -> None:
        """Start a new throughput window (after evaluation or a checkpoint, which are not training time)."""
        self._window_tokens, self._window_start = 0, time.perf_counter()

    def eval_due(self, step: int, total_steps: int) -> bool:
        every = self.cfg.eval.every
        return step == total_steps or bool(every and step % every == 0)

    def save_due(self, step: int, total_steps: int) -> bool:
        every = self.cfg.checkpoint.every
        return step == total_steps or bool(every and step % every == 0)

    def save(self, step: int, model: nn.Module | dict, optimizer: torch.optim.Optimizer, **state: Any) -> Path:
        """A complete checkpoint (atomic; retention after it is written) with the resolved config,
        the scaler and the recipe's own state (data position, counters)."""
        self.wait_for_save()  # one checkpoint in flight at a time, committed in order
        if self.engine is not None:  # the weights only, gathered on rank 0 (the recipe's selection of them)
            weights = dse.full_state_dict(self.engine)
            model, optimizer = {k: v for k, v in weights.items() if not isinstance(model, dict) or k in model}, None
        full = {"step": step, "config": self.resolved,
                "scaler": self.scaler.state_dict() if self.scaler is not None else None, **state}
        path = ckpt.save_checkpoint(self.dir, step, model=model, optimizer=optimizer, state=full,
                                    keep_last_n=self.cfg.checkpoint.keep_last_n, module=self.model,
                                    async_write=self.cfg.checkpoint.async_save)
        if isinstance(path, ckpt.PendingSave):
            self._pending, path = path, path.final
        self.restart_clock()
        return path

    def wait_for_save(self) -> None:
        """Finish and commit the checkpoint being written in the background, if any (every rank)."""
        if self._pending is not None:
            pending, self._pending = self._pending, None
            pending.wait()

    def inject_faults(self, step: int) -> None:
        """Test hooks at the top of a step (`TEMPER_FAULT`): a crash, or a SIGTERM to this process."""
        if faults.active("crash", step=step, rank=self.d.rank):
            raise SystemExit(f"TEMPER_FAULT crash at step {step}")
        if faults.active("sigterm", step=step, rank=self.d.rank):
            os.kill(os.getpid(), signal.SIGTERM)

    def after_step(self, step: int, total_steps: int, save: Callable[[int], Any],
                   validate: Callable[[], dict[str, float]] | None) -> int | None:
        """What follows optimizer step `step` in every recipe: the held-out metrics when due (`validate`,
        None: nothing held out; an empty dict from it logs nothing), a checkpoint when due (`save(step)`), and
        after a SIGTERM a checkpoint of this step if there is none yet; then the exit code to stop with, else
        None to go on."""
        if validate is not None and self.eval_due(step, total_steps):
            val = validate()
            if val:
                self.logger.log(step, val, kind="val")
            self.restart_clock()
        saved = self.save_due(step, total_steps)
        if saved:
            save(step)
        if self.preempted():
            if not saved:
                save(step)
            return self.stop_preempted(step)
        return None

    def preempted(self) -> bool:
        """Whether SIGTERM reached any rank (all ranks answer alike); the loop then makes sure a
        checkpoint of this step exists and returns `stop_preempted(step)`."""
        return self._sigterm is not None and self._sigterm.any_rank(self.d)

    def stop_preempted(self, step: int) -> int:
        name = (self._sigterm.name if self._sigterm is not None else "") or "SIGTERM"  # "": another rank's signal
        self._preempted = True
        self.logger.message(f"{name}: checkpoint at step {step} written; exiting with {EXIT_PREEMPTED}")
        return EXIT_PREEMPTED


def skeleton(model: nn.Module) -> nn.Module:
    """A copy of `model`'s modules whose parameters and buffers are meta tensors (no memory), shared ones shared
    alike: the structure a sharded model's weights are gathered into (`load_state_dict(..., assign=True)`).

    A frozen weight of a tensor subclass (QLoRA's NF4 base, 4 bits a weight) is copied as it is instead: it is
    the same after training, and a meta stand-in of a subclass cannot be assigned to."""
    memo: dict[int, torch.Tensor] = {}
    for t in itertools.chain(model.parameters(), model.buffers()):
        if type(t) not in (torch.Tensor, nn.Parameter) and not t.requires_grad:
            continue  # deep-copied
        meta = torch.empty_like(t, device="meta")
        memo[id(t)] = nn.Parameter(meta, requires_grad=t.requires_grad) if isinstance(t, nn.Parameter) else meta
    return copy.deepcopy(model, memo)


def print_error(recipe: str, e: BaseException | str) -> int:
    """Bad input, not a bug: one line naming the file, no traceback; exit code 2."""
    print(f"temper {recipe}: {e}", file=sys.stderr)
    return 2
