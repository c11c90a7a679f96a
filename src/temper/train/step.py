"""THE training step: the one place for loss normalisation, accumulation, clipping, non-finite
checks, tokens/s and MFU. Every recipe calls these functions; none re-implements them.

Loss normalisation: every micro-batch's summed token loss is divided by the number of valid
target tokens in the whole *global* batch (all micro-batches on all ranks), so gradient
accumulation and data parallelism give exactly the update of one big batch even when sequences
have different numbers of valid tokens (torchtune PR #1875, transformers PR #34191).

It does not build models, optimizers or data; it does not decide when to save or log.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from temper import faults

IGNORE_INDEX = -100


# (inputs (B, T), targets (B, T)) or with a dict of model keyword arguments (positions, attn_mask).
MicroBatch = tuple[torch.Tensor, torch.Tensor] | tuple[torch.Tensor, torch.Tensor, dict]


class NonFiniteLoss(RuntimeError):
    """The loss or gradient norm was NaN/inf on some rank; raised before the optimizer step."""


@dataclass
class StepResult:
    loss: float
    """Mean loss per valid token over the global batch."""
    grad_norm: float
    """Global gradient norm before clipping."""
    tokens: int
    """Valid target tokens in the global batch."""
    skipped: bool
    """True when the non-finite policy skipped the update."""


def token_loss_sum(logits: torch.Tensor, targets: torch.Tensor, label_smoothing: float = 0.0) -> torch.Tensor:
    """Summed cross-entropy over the valid (not IGNORE_INDEX) targets, computed in float32."""
    return F.cross_entropy(
        logits.float().view(-1, logits.size(-1)),  # (B*T, V)
        targets.reshape(-1),
        ignore_index=IGNORE_INDEX,
        reduction="sum",
        label_smoothing=label_smoothing,
    )


def _world() -> tuple[int, bool]:
    on = dist.is_available() and dist.is_initialized()
    return (dist.get_world_size() if on else 1), on


def global_valid_tokens(micro_batches: Sequence[MicroBatch], device: torch.device) -> int:
    """Count of valid target tokens over all micro-batches on all ranks (one all-reduce)."""
    local = sum(int((mb[1] != IGNORE_INDEX).sum()) for mb in micro_batches)
    world, on = _world()
    if not on:
        return local
    t = torch.tensor([local], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return int(t.item())


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


def train_step(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    micro_batches: Sequence[MicroBatch],
    *,
    step: int,
    amp_dtype: torch.dtype | None = None,
    scaler: torch.amp.GradScaler | None = None,
    clip_norm: float = 1.0,
    label_smoothing: float = 0.0,
    on_nonfinite: str = "fail",
) -> StepResult:
    """One optimizer update over `micro_batches` (this rank's share of the global batch): each is
    (inputs, targets) or (inputs, targets, model keyword arguments), e.g. the positions and
    document mask of packed sequences.

    Gradients are synchronised once, on the last micro-batch (DDP's `no_sync` for the others).
    Non-finite loss or gradient norm is detected on every rank identically (one all-reduce) and
    handled before `optimizer.step()`: "fail" raises NonFiniteLoss with parameters untouched;
    "skip" drops the update, leaving parameters and optimizer state as they were. ("rollback" is
    the caller's: it catches NonFiniteLoss and reloads a checkpoint.)
    """
    device = micro_batches[0][0].device
    world, distributed = _world()
    rank = dist.get_rank() if distributed else 0
    total_tokens = global_valid_tokens(micro_batches, device)
    # DDP averages gradients over ranks; multiplying by world turns that average into the sum
    # that `/ total_tokens` expects.
    scale = world / max(total_tokens, 1)
    loss_sum = torch.zeros((), device=device, dtype=torch.float32)
    for i, (x, y, *extra) in enumerate(micro_batches):
        last = i == len(micro_batches) - 1
        sync = contextlib.nullcontext() if last or not hasattr(model, "no_sync") else model.no_sync()
        with sync:
            with autocast(device, amp_dtype):
                logits = model(x, **(extra[0] if extra else {}))  # (B, T, V)
            summed = token_loss_sum(logits, y, label_smoothing)
            # The loss's backward needs its log-probabilities, not the logits: freed now, the peak of
            # backward is B*T*V logits smaller (65 MiB for 2 x 256 tokens of a 32k vocab in fp32).
            del logits
            if faults.active("nan_loss", step=step, rank=rank):
                summed = summed * float("nan")
            loss = summed * scale
            (scaler.scale(loss) if scaler is not None else loss).backward()
        loss_sum += summed.detach()

    if scaler is not None:
        scaler.unscale_(optimizer)
    params = [p for g in optimizer.param_groups for p in g["params"]]
    grad_norm = torch.nn.utils.clip_grad_norm_(params, clip_norm if clip_norm > 0 else math.inf)

    # One all-reduce tells every rank the global loss and whether any rank saw a non-finite value.
    stats = torch.stack([loss_sum, (~torch.isfinite(loss_sum)).float()])
    if distributed:
        dist.all_reduce(stats)
    global_loss = stats[0].item() / max(total_tokens, 1)
    # With a GradScaler an inf gradient norm is fp16 overflow, which the scaler skips by design.
    nonfinite = stats[1].item() > 0 or (scaler is None and not math.isfinite(grad_norm.item()))

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
    return StepResult(loss=global_loss, grad_norm=float(grad_norm), tokens=total_tokens, skipped=skipped)


@torch.no_grad()
def eval_loss(
    model: nn.Module,
    batches: Sequence[MicroBatch],
    amp_dtype: torch.dtype | None = None,
) -> float:
    """Mean loss per valid token over `batches` on all ranks (each rank passes its own share)."""
    was_training = model.training
    model.eval()
    device = batches[0][0].device
    totals = torch.zeros(2, dtype=torch.float64, device=device)
    for x, y, *extra in batches:
        with autocast(device, amp_dtype):
            logits = model(x, **(extra[0] if extra else {}))
        totals[0] += token_loss_sum(logits, y).double()
        totals[1] += (y != IGNORE_INDEX).sum()
    if _world()[1]:
        dist.all_reduce(totals)
    model.train(was_training)
    return (totals[0] / totals[1].clamp(min=1)).item()


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


def measured_matmul_peak_flops(device: torch.device, dtype: torch.dtype, n: int | None = None) -> float:
    """Achieved FLOP/s of a large square matmul on this device: the honest MFU denominator."""
    n = n or (8192 if device.type == "cuda" else 1024)
    # Full-rank random operands, drawn without touching the global RNG (a resumed run must not
    # see a different random stream because it measured its peak).
    gen = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(n, n, device=device, dtype=dtype, generator=gen)
    b = torch.randn(n, n, device=device, dtype=dtype, generator=gen)
    reps = 20 if device.type == "cuda" else 3
    a @ b  # warmup
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    for _ in range(reps):
        a @ b
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return 2 * n**3 * reps / (time.perf_counter() - t0)


def throughput(tokens: int, seconds: float, flops_per_token: float, peak_flops: float | None) -> tuple[float, float]:
    """(tokens per second, model FLOPs utilisation in [0, 1]; 0 when the peak is unknown)."""
    tokens_per_s = tokens / max(seconds, 1e-9)
    mfu = tokens_per_s * flops_per_token / peak_flops if peak_flops else 0.0
    return tokens_per_s, mfu
