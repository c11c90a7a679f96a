"""Process groups and model wrapping: activation checkpointing -> torch.compile (per block) -> DDP.

`torchrun` sets RANK/WORLD_SIZE/LOCAL_RANK; `init_distributed` reads them and picks NCCL on GPU,
gloo on CPU. `parallelize` applies the wrappers in the order that composes (checkpointing is
inside compile so the compiled graph recomputes; DDP is outermost so its gradient hooks see the
compiled module's parameters). FSDP2 and tensor parallel are later issues and will slot in here.

It does not own the training loop or the data order.
"""

from __future__ import annotations

import os
import sys
import traceback
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import (
    ActivationWrapper,
    CheckpointImpl,
    checkpoint_wrapper,
    offload_wrapper,
)

from temper.config import ConfigError


@dataclass
class DistInfo:
    rank: int
    local_rank: int
    world: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def pick_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        return torch.device(name)
    except RuntimeError:
        raise ConfigError(f"device: {name!r} is not a device (auto, cpu, cuda, cuda:N)") from None


WEIGHT_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
"""The dtypes a model can be loaded in for inference (`--dtype`), by name."""


def pick_dtype(name: str, device: torch.device) -> torch.dtype:
    """Weights' dtype for inference: "auto" is bfloat16 on a GPU and float32 on the CPU."""
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if name not in WEIGHT_DTYPES:
        raise ValueError(f"dtype must be 'auto' or one of {list(WEIGHT_DTYPES)}, got {name!r}")
    return WEIGHT_DTYPES[name]


ELASTIC_STORE_FIX = "TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1"
"""torchrun's setting that gives each restart of a job a new TCP store."""


def shared_store_restarts() -> bool:
    """Whether torchrun may restart this job (--max-restarts > 0) while its workers share the launcher's TCP
    store, which outlives a restart with the failed attempt's keys in it: the restarted gloo/NCCL group can
    then connect to a dead worker (seen with torch 2.13, about one restart in two on 2 CPU ranks)."""
    return (os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
            and int(os.environ.get("TORCHELASTIC_MAX_RESTARTS", "0")) > 0)


def init_distributed(device_name: str = "auto") -> DistInfo:
    """Join the process group that torchrun describes, or run as a single process."""
    device = pick_device(device_name)
    if "RANK" not in os.environ or int(os.environ.get("WORLD_SIZE", "1")) == 1:
        return DistInfo(0, 0, 1, device)
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if rank == 0 and shared_store_restarts():
        print(f"temper: warning: torchrun --max-restarts with its shared TCP store: a restarted job may read the "
              f"dead workers' addresses and fail to connect or hang (pytorch#135712); launch torchrun with "
              f"{ELASTIC_STORE_FIX}", file=sys.stderr)
    if device.type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo", device_id=device if device.type == "cuda" else None)
    return DistInfo(rank, local_rank, world, device)


def shutdown_distributed() -> None:
    """Leave the process group; in a recipe's `finally`, also when the loop failed (a non-finite loss, a crash).

    Leaving on an exception, the failed frames (held by its traceback) still hold the DDP model, and with it the
    group: gloo's teardown then runs when the model is freed later, after the peer has left, and can wait for it
    forever. Their locals are dropped first, so that the model goes before the group as on a normal return."""
    if dist.is_initialized():
        failed = sys.exc_info()[1]
        if failed is not None:
            traceback.clear_frames(failed.__traceback__)  # frames still running (the caller's) are skipped
        dist.destroy_process_group()


def apply_activation_checkpointing(model: nn.Module, every: int, offload: bool = False) -> None:
    """Recompute every `every`-th block's activations in backward instead of storing them.

    offload: also keep each checkpointed block's input in pinned CPU memory until its backward (the
    checkpoint saves its inputs through autograd's saved-tensor hooks, which `offload_wrapper`'s
    `save_on_cpu` moves off the device): the last activations that scale with depth leave the GPU,
    for one copy each way per block (Unsloth's offloaded gradient checkpointing does the same).
    """
    if every <= 0:
        return
    layers = model.layers
    for i in range(len(layers)):
        if i % every == 0:
            layers[i] = checkpoint_wrapper(layers[i], checkpoint_impl=CheckpointImpl.NO_REENTRANT)
            if offload:
                layers[i] = offload_wrapper(layers[i])


def parallelize(
    model: nn.Module, dist_info: DistInfo, *, activation_checkpointing: int = 0, activation_offload: bool = False,
    compile: bool = False,
) -> nn.Module:
    """Wrap `model` for training; returns the module to call (the original stays reachable)."""
    apply_activation_checkpointing(model, activation_checkpointing, activation_offload)
    if compile:
        # Each block compiled in place (torchtitan's way): identical blocks share one compiled graph,
        # so compile time does not grow with depth, and parameter names stay the plain model's (no
        # `_orig_mod.` prefix), so checkpoints do not depend on whether a run compiled.
        for block in model.layers:
            block.compile()
    if dist_info.world > 1:
        ids = [dist_info.device.index] if dist_info.device.type == "cuda" else None
        # The only buffers are the RoPE tables, computed identically on every rank: re-broadcasting
        # them before every forward (DDP's default) would only cost time.
        model = nn.parallel.DistributedDataParallel(model, device_ids=ids, broadcast_buffers=False)
    return model


def remove_activation_checkpointing(model: nn.Module) -> nn.Module:
    """Put the plain blocks back (in place; returns `model`), e.g. before exporting adapters by module name."""
    layers = model.layers
    for i, layer in enumerate(layers):
        while isinstance(layer, ActivationWrapper):
            layer = layer._checkpoint_wrapped_module
        layers[i] = layer
    return model


def unwrap(model: nn.Module) -> nn.Module:
    """The plain Transformer under DDP / torch.compile wrappers."""
    while True:
        if isinstance(model, nn.parallel.DistributedDataParallel):
            model = model.module
        elif hasattr(model, "_orig_mod"):
            model = model._orig_mod
        else:
            return model
