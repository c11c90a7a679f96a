"""THE training step: the one place for loss normalisation, accumulation, clipping, non-finite
checks, tokens/s and MFU. Every recipe calls these functions; none re-implements them.

The objective is a plug-in (`train.losses.Loss`): it counts the units a batch's loss is normalised
by (valid target tokens, preference pairs, ...) and returns the sum of its per-unit losses. Every
micro-batch's sum is divided by the count over every micro-batch on every data-parallel rank (one
all-reduce before the first forward), so gradient accumulation and data parallelism give exactly
the update of one big batch even when micro-batches hold different numbers of units (torchtune PR
#1875, transformers PR #34191). Under pipeline parallelism (`train.pipeline.Pipeline`) the step's
micro-batches run as one schedule and the last stage computes the same scaled sums; the gradient
norm then sums over the stages, and every stage learns the loss from the last.

On a step the run monitors (`log.monitor_every`), it also hands a `train.monitor.Monitor` the gradients before
clipping and the weights around the optimizer step: per-group gradient norms, update/weight ratios, learning
rates and DDP's communication share come back in `StepResult.monitored`.

It does not build models, optimizers or data; it does not decide when to save or log.
"""

from __future__ import annotations

import contextlib
import functools
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor

from temper import faults
from temper.train.losses import IGNORE_INDEX, Batch, LMLoss, Loss, token_loss_sum
from temper.train.monitor import Monitor
from temper.train.parallel import clip_grads, no_grad_sync
from temper.train.parallel import grad_norm as global_grad_norm
from temper.train.pipeline import Pipeline

__all__ = ["IGNORE_INDEX", "Batch", "MicroBatch", "NonFiniteLoss", "StepResult", "autocast", "eval_loss",
           "resolve_precision", "throughput", "token_loss_sum", "train_step"]

# A Batch, or (inputs (B, T), targets (B, T)[, dict of model keyword arguments: positions, segments]).
MicroBatch = Batch | tuple[torch.Tensor, torch.Tensor] | tuple[torch.Tensor, torch.Tensor, dict]


class NonFiniteLoss(RuntimeError):
    """The loss or gradient norm was NaN/inf on some rank; raised before the optimizer step."""


@dataclass
class StepResult:
    loss: float
    """Mean loss per counted unit (valid token, pair, ...) over the global batch."""
    grad_norm: float
    """Global gradient norm before clipping."""
    tokens: int
    """Units the loss is normalised by over the global batch (valid target tokens for LM losses)."""
    skipped: bool
    """True when the non-finite policy skipped the update."""
    metrics: dict[str, float] = field(default_factory=dict)
    """The loss's metrics, as global means per counted unit."""
    monitored: dict[str, float] = field(default_factory=dict)
    """On a monitored step (`monitor` given): per-group gradient norms, update/weight ratios, learning rates and
    the communication share (`train.monitor.Monitor.numbers`); else empty."""


def _world(group: dist.ProcessGroup | None) -> tuple[int, bool]:
    on = dist.is_available() and dist.is_initialized()
    return (dist.get_world_size(group) if on else 1), on


def resolve_precision(name: str, device: torch.device) -> torch.dtype:
    """The autocast dtype of a recipe's `train.precision`: "auto" is bf16 on a GPU that has it, else fp32."""
    if name == "auto":
        bf16_ok = device.type == "cuda" and torch.cuda.is_bf16_supported()
        return torch.bfloat16 if bf16_ok else torch.float32
    return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[name]


def autocast(device: torch.device, dtype: torch.dtype | None) -> contextlib.AbstractContextManager:
    """Mixed precision for the forward pass; fp32 runs without autocast."""
    if dtype is None or dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def loss_scale(loss_fn: Loss, batches: Sequence[Batch], dp_group: dist.ProcessGroup | None = None
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """(the global count of units the step's loss is normalised by, the factor each micro-batch's loss sum is
    multiplied by before its backward): world / count. One all-reduce, before the first forward.

    The data-parallel reduction (DDP, FSDP2, DeepSpeed) averages gradients over the ranks; multiplying by world
    turns that average into the sum that dividing by the global count expects. Computed on the device: no host
    sync before the forward."""
    world, distributed = _world(dp_group)
    device = batches[0].inputs.device
    # A count on the CPU (a loss that counts from shapes) is copied without waiting for the device: a blocking
    # copy would synchronise the stream once per micro-batch.
    count = torch.stack([torch.as_tensor(loss_fn.count(b)).to(device, non_blocking=True)
                         for b in batches]).sum().double()
    if distributed:
        dist.all_reduce(count, group=dp_group)
    return count, (world / count.clamp(min=1)).float()


def train_step(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    micro_batches: Sequence[MicroBatch],
    *,
    step: int,
    loss_fn: Loss | None = None,
    amp_dtype: torch.dtype | None = None,
    scaler: torch.amp.GradScaler | None = None,
    clip_norm: float = 1.0,
    on_nonfinite: str = "fail",
    dp_group: dist.ProcessGroup | None = None,
    monitor: Monitor | None = None,
) -> StepResult:
    """One optimizer update over `micro_batches` (this rank's share of the global batch).

    loss_fn: the objective (default: next-token cross-entropy, `LMLoss()`); dp_group: the
    data-parallel group its sums and counts are reduced over (default: the whole world).
    Gradients are synchronised once, on the last micro-batch (DDP's `no_sync` for the others).
    Non-finite loss or gradient norm is detected on every rank identically (the same all-reduce)
    and handled before `optimizer.step()`: "fail" raises NonFiniteLoss with parameters untouched;
    "skip" drops the update, leaving parameters and optimizer state as they were. ("rollback" is
    the caller's: it catches NonFiniteLoss and reloads a checkpoint.)
    monitor: measure this step by parameter group too (`StepResult.monitored`; every rank must pass one or none).
    """
    loss_fn = loss_fn or LMLoss()
    batches = [Batch.of(mb) for mb in micro_batches]
    device = batches[0].inputs.device
    pipe = model if isinstance(model, Pipeline) else None
    if pipe is not None:
        dp_group = pipe.dp_group  # not the whole world, which holds each batch once per stage
    distributed = _world(dp_group)[1]
    rank = dist.get_rank() if distributed else 0
    if monitor is not None:
        monitor.begin(model, optimizer, device)
    count, scale = loss_scale(loss_fn, batches, dp_group)
    loss_sum = torch.zeros((), device=device, dtype=torch.float32)
    metric_sums: dict[str, torch.Tensor] = {}
    if pipe is not None:  # one schedule over every micro-batch; the last stage runs the loss, scaled alike
        with autocast(device, amp_dtype):
            metric_sums = pipe.run(batches, loss_fn, backward=True, scale=scale, scaler=scaler,
                                   poison=faults.active("nan_loss", step=step, rank=rank))
        loss_sum = metric_sums.pop("loss")
    else:
        for i, batch in enumerate(batches):
            last = i == len(batches) - 1
            with contextlib.nullcontext() if last else no_grad_sync(model):
                with autocast(device, amp_dtype):
                    out = loss_fn(model, batch)
                summed = out.loss_sum
                if faults.active("nan_loss", step=step, rank=rank):
                    summed = summed * float("nan")
                loss = summed * scale
                (scaler.scale(loss) if scaler is not None else loss).backward()
            loss_sum += summed.detach()
            for k, v in out.metrics.items():
                metric_sums[k] = metric_sums.get(k, 0) + v.detach().float()

    if scaler is not None:
        scaler.unscale_(optimizer)
    params = [p for g in optimizer.param_groups for p in g["params"]]
    if monitor is not None:
        monitor.gradients()  # before clipping, as grad_norm
    if pipe is not None or any(isinstance(p, DTensor) for p in params):
        # sharded (FSDP2, TP): a norm per mesh, then the global one; pipeline stages: summed over the stages
        grad_norm = global_grad_norm(params, pipe.pp_group if pipe is not None else None)
        if clip_norm > 0:
            clip_grads(params, clip_norm, grad_norm)
    else:
        grad_norm = torch.nn.utils.clip_grad_norm_(params, clip_norm if clip_norm > 0 else math.inf)
    # One all-reduce tells every rank the global loss and metrics and whether any rank saw a
    # non-finite value; reading it (with the gradient norm) is the step's one host sync.
    names = sorted(metric_sums)
    stats = torch.stack([loss_sum, (~torch.isfinite(loss_sum)).float(), *(metric_sums[k] for k in names)])
    if distributed:
        dist.all_reduce(stats, group=dp_group)
    host = torch.cat([stats.double(), grad_norm.reshape(1).double(), count.reshape(1)]).tolist()
    n_units = max(int(host[-1]), 1)
    global_loss, any_nonfinite, norm = host[0] / n_units, host[1] > 0, host[-2]
    # With a GradScaler an inf gradient norm is fp16 overflow, which the scaler skips by design.
    nonfinite = any_nonfinite or (scaler is None and not math.isfinite(norm))

    # The update/weight ratio only where the weights move: not on a skipped step, nor on one the fp16 scaler
    # skips (an overflow: an infinite gradient norm).
    measure_update = monitor is not None and not nonfinite and math.isfinite(norm)
    if measure_update:
        monitor.before_update()
    skipped = False
    if nonfinite:
        optimizer.zero_grad(set_to_none=True)
        if on_nonfinite == "skip":
            skipped = True
        else:
            raise NonFiniteLoss(f"non-finite loss or gradient at step {step} (loss={global_loss})")
    elif scaler is not None:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    if measure_update:
        monitor.after_update()
    metrics = {k: host[2 + j] / n_units for j, k in enumerate(names)}
    monitored = monitor.numbers(optimizer, pipe.pp_group if pipe is not None else None) if monitor is not None else {}
    return StepResult(loss=global_loss, grad_norm=norm, tokens=int(host[-1]), skipped=skipped, metrics=metrics,
                      monitored=monitored)


def eval_loss(
    model: nn.Module,
    batches: Sequence[MicroBatch],
    amp_dtype: torch.dtype | None = None,
    loss_fn: Loss | None = None,
    dp_group: dist.ProcessGroup | None = None,
) -> float:
    """Mean loss per counted unit over `batches` on all ranks (each rank passes its own share)."""
    return eval_metrics(model, batches, amp_dtype, loss_fn, dp_group)["loss"]


@torch.no_grad()
def eval_metrics(
    model: nn.Module,
    batches: Sequence[MicroBatch],
    amp_dtype: torch.dtype | None = None,
    loss_fn: Loss | None = None,
    dp_group: dist.ProcessGroup | None = None,
) -> dict[str, float]:
    """{"loss": mean loss per counted unit, and every metric of the loss as its mean per unit} over
    `batches` on all ranks (each rank passes its own share; every rank must pass at least one)."""
    loss_fn = loss_fn or LMLoss()
    was_training = model.training
    model.eval()
    sums: dict[str, torch.Tensor] = {}
    if isinstance(model, Pipeline):  # one forward-only schedule; every stage gets the last one's sums
        dp_group = model.dp_group
        bs = [Batch.of(mb) for mb in batches]
        with autocast(bs[0].inputs.device, amp_dtype):
            sums = {k: v.double() for k, v in model.run(bs, loss_fn, backward=False).items()}
        sums["count"] = torch.stack([torch.as_tensor(loss_fn.count(b), device=sums["loss"].device)
                                     for b in bs]).sum().double()
    else:
        for mb in batches:
            batch = Batch.of(mb)
            with autocast(batch.inputs.device, amp_dtype):
                out = loss_fn(model, batch)
            count = torch.as_tensor(loss_fn.count(batch), device=out.loss_sum.device)
            for k, v in {"loss": out.loss_sum, "count": count, **out.metrics}.items():
                sums[k] = sums.get(k, 0) + v.detach().double()
    names = sorted(sums)
    totals = torch.stack([sums[k] for k in names])
    if _world(dp_group)[1]:
        dist.all_reduce(totals, group=dp_group)
    model.train(was_training)
    values = dict(zip(names, totals.tolist(), strict=True))
    n = max(values.pop("count"), 1)
    return {k: v / n for k, v in values.items()}


# Datasheet dense peaks (FLOP/s) for MFU, by device-name substring and dtype.
DATASHEET_PEAK = {
    ("H100", torch.bfloat16): 989e12,
    ("H100", torch.float16): 989e12,
    ("H200", torch.bfloat16): 989e12,
    ("A100", torch.bfloat16): 312e12,
    ("A100", torch.float16): 312e12,
}


def datasheet_peak_flops(device: torch.device, dtype: torch.dtype) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for (k, d), v in DATASHEET_PEAK.items() if k in name and d == dtype), None)


@functools.cache
def measured_matmul_peak_flops(device: torch.device, dtype: torch.dtype, n: int | None = None) -> float:
    """Achieved FLOP/s of a large square matmul on this device: the honest MFU denominator. Measured once per
    process and (device, dtype); on a CPU for about a quarter of a second (a 16-bit CPU matmul runs at a few
    GFLOP/s: three products of 1024^2 took 9 s, at the start of every run)."""
    cuda = device.type == "cuda"
    n = n or (8192 if cuda else 512)
    # Full-rank random operands, drawn without touching the global RNG (a resumed run must not
    # see a different random stream because it measured its peak).
    gen = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(n, n, device=device, dtype=dtype, generator=gen)
    b = torch.randn(n, n, device=device, dtype=dtype, generator=gen)
    a @ b  # warmup
    if cuda:
        torch.cuda.synchronize(device)
    reps, t0 = 0, time.perf_counter()
    while reps < (20 if cuda else 1) or not cuda and time.perf_counter() - t0 < 0.25:
        a @ b
        reps += 1
    if cuda:
        torch.cuda.synchronize(device)
    return 2 * n**3 * reps / (time.perf_counter() - t0)


def throughput(tokens: int, seconds: float, flops_per_token: float, peak_flops: float | None) -> tuple[float, float]:
    """(tokens per second, model FLOPs utilisation in [0, 1]; 0 when the peak is unknown)."""
    tokens_per_s = tokens / max(seconds, 1e-9)
    mfu = tokens_per_s * flops_per_token / peak_flops if peak_flops else 0.0
    return tokens_per_s, mfu
