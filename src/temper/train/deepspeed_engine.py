"""DeepSpeed as an optional engine: ZeRO stages 1-3 and CPU/NVMe offload from a user's DeepSpeed JSON config.

For users who already have DeepSpeed configs (`--train.deepspeed=ds.json`). DeepSpeed owns what its config
says: the optimizer step, the sharding of optimizer states / gradients / parameters (ZeRO-1/2/3), offload
to CPU or NVMe, its own bf16/fp16 mixed precision and gradient clipping. temper keeps what makes a step a
temper step: the loss is a plug-in (`train.losses.Loss`), every micro-batch's sum is divided by the count
of units over every micro-batch on every data-parallel rank (the one all-reduce before the first forward,
as in `train.step.train_step`), and a non-finite loss never reaches the parameters.

The pieces, in the order a recipe calls them:
  `load_config(path, ...)`   the JSON, with temper's batch/clipping filled into its "auto" (or absent) keys;
                            a value that contradicts temper's config is a ConfigError naming the key.
  `initialize(model, optimizer, ds_config)`  the DeepSpeed engine over temper's model and AdamW (after
                            `init_distributed`: DeepSpeed reuses the process group).
  `deepspeed_step(engine, micro_batches, ...)`  one optimizer update -> `train.step.StepResult`.
  `full_state_dict(engine)`  rank 0's full CPU state dict (ZeRO-3 parameters gathered), for `final/`.

The loss runs inside the engine's forward (`_LossModule`): ZeRO-3 gathers a parameter only while the
module that owns it runs, and temper's LM loss reads the output head's weight outside the model's forward
(the chunked cross-entropy), so the head and tied embedding are registered as the wrapper's external
parameters (DeepSpeed's `register_external_parameter`).

It does not build models, optimizers, data or schedules, and it does not save checkpoints: DeepSpeed's
`save_checkpoint` format is read back by DeepSpeed with an unrestricted pickle (torch's loader with
weights-only mode off), which temper never does. It does not run on one process without torch.distributed, and it does not
compose with `train.parallel` (DeepSpeed is the data-parallel layout) or torch's GradScaler.
"""

from __future__ import annotations

import contextlib
import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from temper import faults
from temper.config import ConfigError
from temper.train.losses import Batch, LMLoss, Loss, LossOut
from temper.train.step import MicroBatch, NonFiniteLoss, StepResult, autocast, loss_scale

AUTO = "auto"
"""A DeepSpeed config value that temper fills in (Hugging Face's convention for DeepSpeed configs)."""


def _fill(cfg: dict, key: str, value: Any, temper_key: str) -> None:
    """Set `cfg[key]` to temper's `value` when absent or "auto"; a different explicit value is a ConfigError."""
    have = cfg.get(key, AUTO)
    if have == AUTO:
        cfg[key] = value
    elif have != value:
        raise ConfigError(f"train.deepspeed: {key}={have!r} contradicts {temper_key}={value!r}: "
                          f"set it to \"auto\" (or remove it) and temper fills it in")


def load_config(path: str | Path, *, micro_batch_size: int, grad_accum: int, dp_world: int, grad_clip: float,
                precision: str) -> dict:
    """The DeepSpeed config at `path` checked and completed from temper's config.

    micro_batch_size: `train.micro_batch_size`; grad_accum: the micro-batches per optimizer step;
    dp_world: the data-parallel ranks; grad_clip: `train.grad_clip` (0: none); precision:
    `train.precision` (fp16 goes through DeepSpeed's own "fp16" section and loss scaler instead).
    """
    path = Path(path)
    try:
        cfg = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ConfigError(f"train.deepspeed: cannot read DeepSpeed config {path}: {e}") from None
    if not isinstance(cfg, dict):
        raise ConfigError(f"train.deepspeed: {path} must hold a JSON object")
    stage = cfg.get("zero_optimization", {}).get("stage", 0)
    if stage not in (1, 2, 3):
        raise ConfigError(f"train.deepspeed: zero_optimization.stage={stage!r} in {path}: temper runs ZeRO stages "
                          "1-3 through DeepSpeed (stage 0 is plain data parallel: temper's own DDP does it)")
    if precision == "fp16":
        raise ConfigError("train.precision=fp16 with train.deepspeed: enable DeepSpeed's \"fp16\" section "
                          "(its loss scaler) and set train.precision=fp32")
    for key in ("optimizer", "scheduler"):
        if key in cfg:
            raise ConfigError(f"train.deepspeed: remove {key!r} from {path}: temper builds the optimizer "
                              "(section optim) and sets the learning rate every step (section schedule)")
    _fill(cfg, "train_micro_batch_size_per_gpu", micro_batch_size, "train.micro_batch_size")
    _fill(cfg, "gradient_accumulation_steps", grad_accum, "the micro-batches per step")
    _fill(cfg, "train_batch_size", micro_batch_size * grad_accum * dp_world, "micro_batch_size x accumulation x ranks")
    _fill(cfg, "gradient_clipping", float(grad_clip), "train.grad_clip")
    # temper's rule: a non-finite gradient never reaches the parameters. DeepSpeed's bf16 path skips such a
    # step only when asked (fp32 and fp16 always check).
    if cfg.get("bf16", {}).get("enabled") is True:
        cfg["bf16"].setdefault("check_grad_overflow", True)
    # The offloaded optimizer is temper's AdamW (torch's fused CPU kernel), not DeepSpeedCPUAdam: DeepSpeed
    # refuses a client optimizer with offload unless told, and its own needs a C++ build at start.
    cfg.setdefault("zero_force_ds_cpu_optimizer", False)
    cfg.setdefault("steps_per_print", 2**31 - 1)  # temper logs the step; DeepSpeed's own lines are noise
    return cfg


class _LossModule(nn.Module):
    """The model with the loss inside its forward, so that ZeRO-3 gathers the parameters the loss reads."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, loss_fn: Loss, batch: Batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        # A tuple and a dict, not LossOut: ZeRO-3's hooks find the output tensors (its backward hooks sit on
        # them) only inside the containers it knows.
        out = loss_fn(self.model, batch)
        return out.loss_sum, out.metrics


class EngineLoss:
    """`loss` computed inside the engine's forward (for evaluation under ZeRO-3, where the parameters the loss
    reads exist whole only there); `eval_metrics` calls it like any `Loss`, its model argument unused."""

    def __init__(self, engine: Any, loss: Loss) -> None:
        self.engine, self.loss = engine, loss

    def count(self, batch: Batch) -> torch.Tensor:
        return self.loss.count(batch)

    def __call__(self, model: nn.Module, batch: Batch) -> LossOut:
        return LossOut(*self.engine(self.loss, batch))


def initialize(model: nn.Module, optimizer: torch.optim.Optimizer, ds_config: dict) -> Any:
    """The DeepSpeed engine (`deepspeed.DeepSpeedEngine`) training `model` with `optimizer` under `ds_config`
    (from `load_config`). Call after `init_distributed`; pass `engine` to `deepspeed_step`, and
    `engine.optimizer` where a recipe sets the learning rate (`optim.set_lr`)."""
    import deepspeed  # the optional extra: `pip install temper[deepspeed]`

    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError("train.deepspeed needs torch.distributed initialised (launch with torchrun)")
    _skip_shm_inference_kernel(deepspeed)
    wrapper = _LossModule(model)
    engine, *_ = deepspeed.initialize(model=wrapper, optimizer=optimizer, config=ds_config)
    if engine.zero_optimization_stage() == 3:
        # Parameters the loss reads outside their own module's forward (temper's LM loss takes the head's
        # weight, or the tied embedding, into its chunked cross-entropy): gathered for the wrapper's forward.
        for name in ("head", "tok_emb"):
            sub = getattr(model, name, None)
            if isinstance(sub, nn.Module) and isinstance(getattr(sub, "weight", None), nn.Parameter):
                deepspeed.zero.register_external_parameter(wrapper, sub.weight)
    return engine


def _skip_shm_inference_kernel(deepspeed: Any) -> None:
    """On CPU, DeepSpeed's communication backend JIT-compiles a shared-memory all-reduce kernel at start
    (C++, a minute or more) that only its inference all-reduce calls; training never uses it."""
    from deepspeed.accelerator import get_accelerator

    if get_accelerator().device_name() == "cpu" and "__compatible_ops__" not in vars(deepspeed.ops):
        deepspeed.ops.__compatible_ops__ = {"deepspeed_shm_comm": False}


def deepspeed_step(
    engine: Any,
    micro_batches: Sequence[MicroBatch],
    *,
    step: int,
    loss_fn: Loss | None = None,
    amp_dtype: torch.dtype | None = None,
    on_nonfinite: str = "fail",
    dp_group: dist.ProcessGroup | None = None,
) -> StepResult:
    """One optimizer update over `micro_batches` (this rank's share of the global batch), DeepSpeed stepping.

    The same normalisation as `train_step`: each micro-batch's loss sum times world / (global count),
    backpropagated without DeepSpeed's own division by the accumulation steps; DeepSpeed's averaging over
    the data-parallel ranks turns the world factor back into a sum. amp_dtype: temper's autocast, used only
    when the DeepSpeed config enables neither bf16 nor fp16 (then DeepSpeed's own mixed precision runs).
    A non-finite loss or gradient norm: DeepSpeed skips the update (its overflow check) and "fail" raises
    NonFiniteLoss after it, parameters untouched; "skip" returns skipped=True.
    """
    if on_nonfinite not in ("fail", "skip"):
        raise ValueError(f"on_nonfinite={on_nonfinite!r}: the DeepSpeed step takes fail or skip")
    loss_fn = loss_fn or LMLoss()
    batches = [Batch.of(mb) for mb in micro_batches]
    device = batches[0].inputs.device
    rank = dist.get_rank()
    count, scale = loss_scale(loss_fn, batches, dp_group)  # train_step's normalisation, the one definition
    own_precision = engine.bfloat16_enabled() or engine.fp16_enabled()
    loss_sum = torch.zeros((), device=device, dtype=torch.float32)
    metric_sums: dict[str, torch.Tensor] = {}
    for i, batch in enumerate(batches):
        # DeepSpeed reduces gradients (and steps) at the boundary it is told; temper's step has as many
        # micro-batches as the caller passes, whatever gradient_accumulation_steps says.
        engine.set_gradient_accumulation_boundary(i == len(batches) - 1)
        with autocast(device, None if own_precision else amp_dtype):
            out = LossOut(*engine(loss_fn, batch))
        summed = out.loss_sum.float()
        if faults.active("nan_loss", step=step, rank=rank):
            summed = summed * float("nan")
        engine.backward(summed * scale, scale_wrt_gas=False)
        loss_sum += summed.detach()
        for k, v in out.metrics.items():
            metric_sums[k] = metric_sums.get(k, 0) + v.detach().float()
    engine.step()
    names = sorted(metric_sums)
    stats = torch.stack([loss_sum, (~torch.isfinite(loss_sum)).float(), *(metric_sums[k] for k in names)])
    dist.all_reduce(stats, group=dp_group)
    host = torch.cat([stats.double(), count.reshape(1)]).tolist()
    norm = engine.get_global_grad_norm()
    norm = math.inf if norm is None else float(norm)
    n_units = max(int(host[-1]), 1)
    global_loss = host[0] / n_units
    skipped = not engine.was_step_applied()
    if host[1] > 0 and not skipped:  # cannot happen with the overflow check load_config keeps on; never silent
        raise NonFiniteLoss(f"non-finite loss at step {step} reached the parameters through DeepSpeed's step")
    if skipped and on_nonfinite == "fail":
        raise NonFiniteLoss(f"non-finite loss or gradient at step {step} (loss={global_loss}); DeepSpeed "
                            "skipped the update")
    metrics = {k: host[2 + j] / n_units for j, k in enumerate(names)}
    return StepResult(loss=global_loss, grad_norm=norm, tokens=int(host[-1]), skipped=skipped, metrics=metrics)


def full_state_dict(engine: Any) -> dict[str, torch.Tensor]:
    """Every rank calls; rank 0 gets the model's full state dict on the CPU (ZeRO-3's partitioned parameters
    gathered), the other ranks an empty dict. Keys are the model's own (no wrapper prefix)."""
    import deepspeed

    model = engine.module.model
    params = list(model.parameters())
    gathered = deepspeed.zero.GatheredParameters(params) if engine.zero_optimization_stage() == 3 else None
    with gathered if gathered is not None else contextlib.nullcontext():
        full = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()} if dist.get_rank() == 0 else {}
    return full
