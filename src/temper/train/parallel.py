"""Process groups, the device mesh, and the layouts a model is trained in.

`torchrun` sets RANK/WORLD_SIZE/LOCAL_RANK; `init_distributed` reads them, picks NCCL on GPU and gloo
on CPU, and lays the ranks out on a named device mesh (pp, dp_replicate, dp_shard, tp) from a
`ParallelConfig` (torchtitan's layout: tensor parallel innermost, on the fastest links). Data is dealt,
and token counts and losses reduced, over the data-parallel ranks only (`DistInfo.dp_rank`,
`dp_world`, `dp_group`): the ranks of one tensor-parallel group see the same batch.

`parallelize` applies the layouts in place, in the order that composes (torchtitan's): pipeline parallel (the
model pruned to this rank's stages, `train.pipeline`) -> tensor parallel (DTensor `parallelize_module`) ->
float8 linear layers (`train.float8`) -> activation checkpointing (with offload, a frozen input table held in host
memory: `HostEmbedding`) -> compile (per block, or the whole model on one
process or under DDP) -> FSDP2 (`fully_shard` per block, then each stage's root) or DDP. Checkpointing sits inside
compile so the compiled graph recomputes; data parallelism is outermost so its gradient hooks see the compiled
blocks' parameters. The default layout (every rank a replica) is DDP, as
before FSDP2 existed here.

It does not own the training loop or the data order.
"""

from __future__ import annotations

import atexit
import contextlib
import gc
import os
import sys
import traceback
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed._functional_collectives import AsyncCollectiveTensor
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import (
    ActivationWrapper,
    CheckpointImpl,
    checkpoint_wrapper,
    offload_wrapper,
)
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.fsdp import CPUOffloadPolicy, FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor
from torch.nn import functional as F

from temper.config import ConfigError
from temper.model.transformer import Transformer


@dataclass
class ParallelConfig:
    """How the ranks are laid out: degrees of the mesh dimensions, whose product is the world size."""

    dp_shard: int = 1
    """FSDP2 (ZeRO-3) degree: parameters, gradients and optimizer states sharded over this many data-parallel
    ranks; 1: no sharding; -1: every rank the other dimensions leave."""
    dp_replicate: int = -1
    """Replicas of the model (DDP; with dp_shard > 1, HSDP's replicate dimension); -1: every rank the other
    dimensions leave."""
    tp: int = 1
    """Tensor-parallel degree: attention heads and MLP columns split over this many ranks (Megatron-LM)."""
    pp: int = 1
    """Pipeline-parallel degree: the blocks split into this many stages."""
    pp_schedule: Literal["1F1B", "Interleaved1F1B", "GPipe"] = "1F1B"
    """Pipeline schedule (torch.distributed.pipelining); Interleaved1F1B runs two stages per rank."""
    pp_microbatches: int = 0
    """Pipeline micro-batches each micro-batch is split into; 0: the number of stages."""
    reshard_after_forward: bool = True
    """FSDP2: free the gathered parameters after each block's forward (ZeRO-3) or keep them until its backward
    (ZeRO-2: less communication, more memory)."""
    offload: bool = False
    """FSDP2: keep the parameters, gradients and optimizer states in CPU memory; the optimizer step runs on the CPU."""
    zero1: bool = False
    """DDP only: shard the optimizer states over the replicas (ZeRO-1, `ZeroRedundancyOptimizer`)."""
    sequence_parallel: bool = False
    """With tp > 1: shard the norms' and residuals' activations by sequence between the tensor-parallel regions
    (less activation memory; every forward's length must then divide by tp, so generation, as in GRPO/PPO
    rollouts and generative tasks, needs it off)."""

    def __post_init__(self) -> None:
        for key in ("dp_shard", "dp_replicate"):
            if getattr(self, key) == 0 or getattr(self, key) < -1:
                raise ValueError(f"{key} must be >= 1, or -1 for the ranks left over")
        if self.dp_shard == -1 and self.dp_replicate == -1:
            raise ValueError("dp_shard and dp_replicate cannot both be -1: set one of them")
        for key in ("tp", "pp"):
            if getattr(self, key) < 1:
                raise ValueError(f"{key} must be >= 1")
        if self.pp_microbatches < 0:
            raise ValueError("pp_microbatches must be >= 0")

    def degrees(self, world: int) -> dict[str, int]:
        """{pp, dp_replicate, dp_shard, tp} for `world` ranks, the -1 filled in; a ConfigError names what does not fit."""
        fixed = self.pp * self.tp * max(self.dp_shard, 1) * max(self.dp_replicate, 1)
        if world % fixed:
            raise ConfigError(f"train.parallel: pp={self.pp} x tp={self.tp} x dp_shard={self.dp_shard} x dp_replicate="
                              f"{self.dp_replicate} does not divide the world size {world}")
        rest = world // fixed
        shard = rest if self.dp_shard == -1 else self.dp_shard
        replicate = rest if self.dp_replicate == -1 else self.dp_replicate
        if self.pp * self.tp * shard * replicate != world:
            raise ConfigError(f"train.parallel: pp={self.pp} x tp={self.tp} x dp_shard={shard} x dp_replicate="
                              f"{replicate} = {self.pp * self.tp * shard * replicate} ranks, but the world size is {world}")
        if self.zero1 and shard > 1:
            raise ConfigError("train.parallel.zero1 shards optimizer states under DDP; with dp_shard > 1 FSDP2 "
                              "shards them already (ZeRO-3): drop one of them")
        return {"pp": self.pp, "dp_replicate": replicate, "dp_shard": shard, "tp": self.tp}


MESH_DIMS = ("pp", "dp_replicate", "dp_shard", "tp")
"""The device mesh's dimensions, outermost first: tensor parallel innermost, on the fastest links."""


@dataclass
class DistInfo:
    rank: int
    local_rank: int
    world: int
    device: torch.device
    mesh: DeviceMesh | None = None
    """The named device mesh (MESH_DIMS); None when every rank is a plain replica (DDP, or one process)."""
    layout: ParallelConfig = field(default_factory=ParallelConfig)
    """The parallel layout the mesh was built from."""

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def degree(self, dim: str) -> int:
        """The size of mesh dimension `dim` (pp, dp_replicate, dp_shard, tp); dp_replicate is the world without a mesh."""
        if self.mesh is None:
            return self.world if dim == "dp_replicate" else 1
        return self.mesh[dim].size()

    @property
    def dp_world(self) -> int:
        """Data-parallel ranks: each sees its own share of a batch."""
        return self.degree("dp_replicate") * self.degree("dp_shard")

    @property
    def dp_rank(self) -> int:
        """This rank's index among the data-parallel ranks (the ranks of one tp/pp group share it)."""
        if self.mesh is None:
            return self.rank
        return self.mesh["dp_replicate"].get_local_rank() * self.degree("dp_shard") + self.mesh["dp_shard"].get_local_rank()

    @property
    def dp_group(self) -> dist.ProcessGroup | None:
        """The group that data sums (tokens, losses, metrics) are reduced over; None: the whole world."""
        if self.mesh is None or self.dp_world == self.world:
            return None
        return self.mesh["dp"].get_group()

    @property
    def sharded(self) -> bool:
        """Whether parameters are DTensors split over ranks (FSDP2, TP or PP), so checkpoints go through DCP."""
        return self.mesh is not None and (self.degree("dp_shard") > 1 or self.degree("tp") > 1 or self.degree("pp") > 1)


def build_mesh(device: torch.device, world: int, layout: ParallelConfig) -> DeviceMesh | None:
    """The device mesh for `layout`, or None for the plain layout (every rank a replica: DDP)."""
    deg = layout.degrees(world)
    if deg["dp_replicate"] == world:
        return None
    mesh = init_device_mesh(device.type, tuple(deg[d] for d in MESH_DIMS), mesh_dim_names=MESH_DIMS)
    mesh["dp_replicate", "dp_shard"]._flatten("dp")  # the data-parallel ranks as one dimension
    return mesh


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


def init_distributed(device_name: str = "auto", layout: ParallelConfig | None = None) -> DistInfo:
    """Join the process group that torchrun describes and lay the ranks out as `layout` says (default: every
    rank a replica), or run as a single process."""
    device = pick_device(device_name)
    layout = layout or ParallelConfig()
    if "RANK" not in os.environ or int(os.environ.get("WORLD_SIZE", "1")) == 1:
        layout.degrees(1)  # a layout for several ranks is refused here too, not silently ignored
        return DistInfo(0, 0, 1, device, layout=layout)
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
    return DistInfo(rank, local_rank, world, device, build_mesh(device, world, layout), layout)


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
        release_dtensor_caches()
        # What no longer holds a group goes now, and what the caller still holds (its model) goes at exit but
        # before finalization; unregistered first, so that a process that leaves again registers it once.
        gc.collect()
        atexit.unregister(gc.collect)
        atexit.register(gc.collect)


def release_dtensor_caches() -> None:
    """Empty torch's DTensor caches (sharding propagation, redistribution plans, mesh topology).

    They key on DeviceMeshes, which hold their process groups, and `destroy_process_group` does not stop a
    gloo group's threads: those live as long as the group object. Left in the caches, the groups of a finished
    run keep their threads, their sockets to the peers and rank 0's TCP store until interpreter exit, where
    tearing them down can abort the process ("terminate called without an active exception", as in
    pytorch#179291), and a process that joins again (a sweep, the tests) runs beside them. With the caches
    empty, the groups go with the last model or tensor that holds them (`shutdown_distributed` also collects,
    now and at exit, while the interpreter is whole). The caches are torch's private functions, each cleared
    only where it exists."""
    import torch.distributed.tensor._collective_utils as collective_utils
    import torch.distributed.tensor._redistribute as redistribute
    import torch.distributed.tensor.debug as debug

    propagator = DTensor._op_dispatcher.sharding_propagator
    for clear in (getattr(debug, "_clear_python_sharding_prop_cache", None),
                  getattr(debug, "_clear_fast_path_sharding_prop_cache", None),
                  getattr(getattr(propagator, "_propagate_tensor_meta_cached", None), "cache_clear", None),
                  getattr(getattr(redistribute, "_gen_transform_infos", None), "cache_clear", None),
                  getattr(redistribute, "clear_redistribute_planner_cache", None),
                  getattr(getattr(getattr(collective_utils, "MeshTopoInfo", None), "build_from_mesh", None),
                          "cache_clear", None)):
        if clear is not None:
            clear()


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


class HostEmbedding(nn.Module):
    """A frozen token embedding held in host memory: the device receives only the rows a batch looks up.

    Why: a large-vocabulary model's input table is a large share of what a QLoRA run keeps on the GPU
    (Llama-3-8B: 128,256 x 4,096 in bf16, 1 GiB beside 3.4 GiB of NF4 blocks), yet a step reads only B*T of
    its rows and never trains it. The lookup runs where the table is, into pinned memory, and the (B, T, C)
    rows are copied to the device (16 MiB for a 2,048-token sequence): one small host-to-device copy a forward,
    as `offload_wrapper` makes per checkpointed block, and a wait for the token ids to reach the host. The table is a
    persistent buffer named `weight`, so state dicts and checkpoints still hold `tok_emb.weight`, and
    `parameters()` (whose first entry callers take for the model's device) no longer yields it.
    """

    def __init__(self, weight: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("weight", weight.detach().cpu())

    @torch.compiler.disable  # a host lookup and a copy: the compiled graph (compile_scope=model) starts after it
    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        w = self.weight
        if w.device == tokens.device:
            return F.embedding(tokens, w)  # (B, T, C)
        rows = torch.empty((*tokens.shape, w.shape[1]), dtype=w.dtype, device=w.device,
                           pin_memory=tokens.device.type == "cuda" and w.device.type == "cpu")
        torch.index_select(w, 0, tokens.to(w.device).reshape(-1), out=rows.view(-1, w.shape[1]))
        return rows.to(tokens.device, non_blocking=True)  # (B, T, C)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, {self.weight.shape[1]}, held on {self.weight.device.type}"


LOOKUP_TABLES = ("tok_emb", "per_layer_emb")
"""A decoder's tables that are only looked up: the token embedding (where untied) and Gemma 4 E2B's and E4B's per-layer
table (2.3B of E2B's 5.1B parameters)."""


def tables_on_host(model: Transformer) -> list[str]:
    """The tables (`LOOKUP_TABLES`) activation offload moves to host memory (without a device mesh): frozen ones, the
    token embedding only untied. A trained table needs its gradient on the device, and a tied one is the output
    head's weight too. (`train.memory` counts the same tables, on the model it builds on the meta device.)"""
    return [name for name in LOOKUP_TABLES if isinstance(emb := getattr(model, name, None), nn.Embedding)
            and not emb.weight.requires_grad and (name != "tok_emb" or model.head is not None)]


def hold_frozen_embeddings_on_host(model: nn.Module) -> list[str]:
    """Swap every decoder's tables that `tables_on_host` names for `HostEmbedding`s (in place); returns the swapped
    tables' state-dict names."""
    names = []
    for name, m in model.named_modules():
        if isinstance(m, Transformer):
            for table in tables_on_host(m):
                setattr(m, table, HostEmbedding(getattr(m, table).weight))
                names.append(f"{name}.{table}.weight".lstrip("."))
    return names


def remove_host_embeddings(model: nn.Module) -> nn.Module:
    """Put plain (frozen) embeddings back in place of `HostEmbedding`s, their tables where they are; returns `model`."""
    for m in list(model.modules()):
        for name in LOOKUP_TABLES:
            if isinstance(getattr(m, name, None), HostEmbedding):
                table = getattr(m, name).weight
                setattr(m, name, nn.Embedding(*table.shape, _weight=table, _freeze=True))
    return model


def parallelize(
    model: nn.Module, dist_info: DistInfo, *, activation_checkpointing: int = 0, activation_offload: bool = False,
    compile: bool = False, amp_dtype: torch.dtype | None = None, float8: bool = False,
    compile_scope: Literal["blocks", "model"] = "blocks",
) -> nn.Module:
    """Apply `dist_info`'s layout to `model` in place; returns the module to call (the original stays reachable:
    FSDP2 and tensor parallel change it in place, DDP wraps it). Under pp > 1, `model` keeps only this rank's
    stages' parts (the optimizer's, checkpoints' and export's module) and the returned `train.pipeline.Pipeline`
    runs them, for `train_step` and `eval_metrics`.

    amp_dtype: the training precision; under FSDP2 the gathered parameters are cast to it (bf16 compute,
    fp32 gradient reduction and fp32 sharded master weights: FSDP2's `MixedPrecisionPolicy`).
    compile_scope: with `compile`, what one compiled graph covers: "blocks" (each block, every layout) or "model"
    (the whole model, one process or DDP only: a ConfigError under any device mesh; `check_compile_scope`).
    float8: the blocks' linear layers compute in float8 (`train.float8.apply_float8`; a ConfigError on a device
    without float8 matrix products).
    """
    mesh, layout = dist_info.mesh, dist_info.layout
    pipelined = mesh is not None and dist_info.degree("pp") > 1
    if pipelined:
        from temper.train import pipeline
        pipeline.check_layout(model.cfg, layout, amp_dtype)
        stage_ids = pipeline.stage_ids(dist_info)
        pipeline.split(model, stage_ids, pipeline.n_stages(layout))
    if mesh is not None and dist_info.degree("tp") > 1:
        from temper.train.tensor_parallel import apply_tensor_parallel
        apply_tensor_parallel(model, mesh["tp"], sequence_parallel=layout.sequence_parallel)
    if float8:  # torchtitan's place: before checkpointing, compile and FSDP2 wrap the layers (tp > 1 is refused)
        from temper.train.float8 import apply_float8
        apply_float8(model, dist_info.device)
    apply_activation_checkpointing(model, activation_checkpointing, activation_offload)
    # Offloading also moves a frozen input table to host memory; a device mesh shards or splits it instead.
    on_host = hold_frozen_embeddings_on_host(model) if activation_offload and mesh is None else []
    if compile and compile_scope == "model":
        check_compile_scope(dist_info)
        # The whole model in place: one graph (embedding, blocks, final norm) instead of one call per block
        # plus eager ops around them, so fewer launches and guard checks a step; names stay unprefixed too.
        model.compile()
    elif compile:
        # Each block compiled in place (torchtitan's way): identical blocks share one compiled graph,
        # so compile time does not grow with depth, and parameter names stay the plain model's (no
        # `_orig_mod.` prefix), so checkpoints do not depend on whether a run compiled.
        for block in model.layers:
            block.compile()
    # A stage's module is what the schedule calls, and so what FSDP2 gathers the root parameters for.
    stages = pipeline.stage_modules(model, stage_ids, pipeline.n_stages(layout)) if pipelined else [model]
    if mesh is not None and dist_info.dp_world > 1:
        apply_fsdp(model, dp_mesh(dist_info), reshard_after_forward=layout.reshard_after_forward,
                   offload=layout.offload, param_dtype=amp_dtype, roots=stages)
    elif dist_info.world > 1 and mesh is None:
        ids = [dist_info.device.index] if dist_info.device.type == "cuda" else None
        # A host-held table is frozen and loaded alike on every rank: DDP's start-up broadcast (NCCL: device
        # tensors only) leaves it out.
        nn.parallel.DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(model, on_host)
        # The only buffers are the RoPE tables, computed identically on every rank: re-broadcasting
        # them before every forward (DDP's default) would only cost time.
        model = nn.parallel.DistributedDataParallel(model, device_ids=ids, broadcast_buffers=False)
    if pipelined:
        return pipeline.Pipeline(stages, stage_ids, dist_info)
    return model


def check_compile_scope(d: DistInfo) -> None:
    """Refuse train.compile_scope=model under a device mesh (FSDP2 / HSDP, tensor or pipeline parallel): FSDP2's
    per-block gather and free hooks and a pipeline's stage boundaries sit inside the model, where one whole-model
    graph would have to trace them (torchtitan compiles per block for this reason). One process and DDP (which
    wraps the compiled model, its gradient hooks outside the graph) are fine."""
    if d.mesh is not None:
        raise ConfigError(f"train.compile_scope=model compiles the whole model as one graph, which works on one "
                          f"process or under DDP only; this layout ({d.layout}) shards or splits the model: use "
                          f"train.compile_scope=blocks")


def dp_mesh(d: DistInfo) -> DeviceMesh:
    """The mesh FSDP2 shards over: (dp_replicate, dp_shard) for HSDP, else the data-parallel ranks as one
    dimension (with tensor or pipeline parallel and no dp_shard, the replicas are sharded too: FSDP2 is the
    data parallelism that composes with DTensor parameters)."""
    if d.degree("dp_replicate") > 1 and d.degree("dp_shard") > 1:
        return d.mesh["dp_replicate", "dp_shard"]
    return d.mesh["dp"]


def apply_fsdp(model: nn.Module, mesh: DeviceMesh, *, reshard_after_forward: bool = True, offload: bool = False,
               param_dtype: torch.dtype | None = None, roots: list[nn.Module] | None = None) -> None:
    """FSDP2: each block one unit (its parameters gathered for its forward and backward only), then the root
    (embeddings, final norm, head): `model`, or each of `roots` (the modules that are called: pipeline stages).

    The root keeps its parameters gathered after the forward: the loss runs the output layer on the final
    hidden states outside the forward (`train.losses.head_cross_entropy`), and the backward needs them at once.
    """
    policy = MixedPrecisionPolicy(
        param_dtype=None if param_dtype in (None, torch.float32) else param_dtype, reduce_dtype=torch.float32)
    common = {"mesh": mesh, "mp_policy": policy}
    if offload:
        common["offload_policy"] = CPUOffloadPolicy(pin_memory=torch.cuda.is_available())
    for block in model.layers:
        fully_shard(block, reshard_after_forward=reshard_after_forward, **common)
    for root in roots or [model]:
        fully_shard(root, reshard_after_forward=False, **common)


@contextlib.contextmanager
def no_grad_sync(model: nn.Module) -> Iterator[None]:
    """Accumulate gradients locally, without the data-parallel reduction (all micro-batches but the last):
    DDP's `no_sync`, FSDP2's `set_requires_gradient_sync(False)`; a no-op for a plain module."""
    if isinstance(model, FSDPModule):
        model.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            model.set_requires_gradient_sync(True)
    elif hasattr(model, "no_sync"):
        with model.no_sync():
            yield
    else:
        yield


def is_sharded(model: nn.Module | Mapping[str, torch.Tensor]) -> bool:
    """Whether any parameter (or tensor of a state dict) is a DTensor, or the model holds only some pipeline
    stages: checkpoints then go through DCP."""
    if isinstance(model, nn.Module) and getattr(unwrap(model), "pipeline_stages", None) is not None:
        return True
    tensors = model.values() if isinstance(model, Mapping) else (t for _, t in unwrap(model).state_dict().items())
    return any(isinstance(t, DTensor) for t in tensors)


def grad_norm(params: list[torch.Tensor], pp_group: dist.ProcessGroup | None = None) -> torch.Tensor:
    """The global L2 norm of the parameters' gradients, whatever their layout: DTensor shards (FSDP2, TP) are
    reduced over their meshes, one norm per mesh (a 2-D layout mixes meshes), and the stages of a pipeline
    over `pp_group`. Returns a plain scalar tensor."""
    grads = [p.grad for p in params if p.grad is not None]
    total = squared_norm(grads, next(iter(params)).device if params else torch.device("cpu"))
    if pp_group is not None:
        dist.all_reduce(total, group=pp_group)
    return total.sqrt()


def squared_norm(tensors: list[torch.Tensor], device: torch.device) -> torch.Tensor:
    """The squared global L2 norm of `tensors` (gradients, weights, updates) whatever their layout: DTensor shards
    are reduced over their meshes, one norm per mesh (a 2-D layout mixes meshes), so every rank of a mesh must
    call it with the same tensors in the same order. A float32 scalar, on `device` (0 for no tensors) or on the
    device the norms were computed on."""
    by_mesh: dict[object, list[torch.Tensor]] = {}
    for t in tensors:
        by_mesh.setdefault(t.device_mesh if isinstance(t, DTensor) else None, []).append(t)
    total = torch.zeros((), dtype=torch.float32, device=device)
    for group in by_mesh.values():
        norm = torch.nn.utils.get_total_norm(group, foreach=True)
        norm = norm.full_tensor() if isinstance(norm, DTensor) else norm
        total = total.to(norm.device) + norm.float() ** 2
    return total


def clip_grads(params: list[torch.Tensor], max_norm: float, norm: torch.Tensor) -> None:
    """Scale the gradients so that their global norm `norm` (`grad_norm`) is at most `max_norm`."""
    coef = torch.clamp(max_norm / (norm + 1e-6), max=1.0)
    # A 0-dim tensor, never `.item()`: a DTensor takes it as a replicated scalar, and reading it on the host
    # would wait for the whole backward (once per parameter). One copy per device (CPU-offloaded gradients).
    on: dict[torch.device, torch.Tensor] = {}
    for p in params:
        if p.grad is not None:
            device = p.grad.device
            if device not in on:
                on[device] = coef.to(device)
            p.grad.mul_(on[device])


def materialize(model: nn.Module, full: Mapping[str, torch.Tensor] | None, device: torch.device) -> None:
    """Give a model built on the meta device and parallelised its weights: `full` is the whole state dict on
    rank 0 (None on the others, which hold no full copy); each tensor is broadcast from rank 0 in turn and
    every rank keeps its own slice. Any layout thus starts from exactly the weights of one process.
    A pipeline stage takes the tensors it holds and ignores the rest."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    model.to_empty(device=device)
    options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True, strict=False)
    set_model_state_dict(model, dict(full) if full is not None else {}, options=options)
    target = unwrap(model)
    if hasattr(target, "init_buffers"):
        target.init_buffers(device)


def full_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The whole model's state dict on the CPU of rank 0 ({} on the other ranks), whatever its layout: every
    rank must call it when the model is sharded (each sends its slices). Plain tensors, canonical names.

    A sharded model's parameters are gathered one at a time here rather than by `get_model_state_dict`'s
    full_state_dict option, which waits for a gathered tensor only when it is itself an AsyncCollectiveTensor:
    a tensor subclass that gathers its inner tensors through functional collectives (torchao's NF4Tensor, so
    QLoRA under FSDP2) came back with them in flight, rank 0 could read them unfinished, and their works stayed
    in torch's registry on every rank, holding the group's connections past `destroy_process_group`."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    target = unwrap(model)
    if getattr(target, "pipeline_stages", None) is not None:  # stages on other ranks: gathered on rank 0
        from temper.train.pipeline import gather_state_dict
        return gather_state_dict(target)
    if not is_sharded(target):
        return dict(target.state_dict())  # checkpoint_wrapper's state-dict hooks drop its prefix
    main, full = dist.get_rank() == 0, {}
    for name, value in get_model_state_dict(target).items():  # canonical names, each rank's slices
        if isinstance(value, DTensor):
            if value.device.type != value.device_mesh.device_type:  # offloaded slices (CPUOffloadPolicy)
                value = value.to(value.device_mesh.device_type)
            value = _gathered_rows(value)
            value = _waited(value.full_tensor()) if isinstance(value, DTensor) else value
        if main:
            full[name] = value.cpu() if isinstance(value, torch.Tensor) else value
    return full


def _gathered_rows(value: DTensor) -> torch.Tensor | DTensor:
    """The whole tensor of an FSDP2 parameter (rows sharded over one mesh dimension, replicated over any other:
    FSDP, HSDP), gathered by one blocking `all_gather_into_tensor` into plain tensors; an NF4 slice is dequantized
    first (its rows, exactly: its blocks never straddle two ranks). `value` itself for another layout.

    Why not `DTensor.full_tensor()` here: it gathers through functional collectives, which over gloo crashed or
    hung about one export in seven in the sharded recipe tests (heap corruption at the all-gather; a gloo worker
    spinning in an all-gather that never completed), while blocking collectives of the process group did not."""
    from temper.model.quant import is_nf4, nf4_to

    sharded = [i for i, p in enumerate(value.placements) if not p.is_replicate()]
    if len(sharded) != 1 or not value.placements[sharded[0]].is_shard(dim=0):  # not _StridedShard (FSDP2 x TP)
        return value
    group, local = value.device_mesh.get_group(sharded[0]), value.to_local()
    if is_nf4(local):
        local = nf4_to(local, local.dtype)
    world, rows = dist.get_world_size(group), value.shape[0]
    per_rank = -(-rows // world)  # torch.chunk's sizes: ceil(rows / world) each, the last ones short or empty
    padded = local.new_zeros((per_rank, *local.shape[1:]))
    padded[: local.shape[0]] = local
    out = local.new_empty((world * per_rank, *local.shape[1:]))
    dist.all_gather_into_tensor(out, padded.contiguous(), group=group)
    counts = [min(per_rank, max(rows - r * per_rank, 0)) for r in range(world)]
    return torch.cat([out[r * per_rank: r * per_rank + n] for r, n in enumerate(counts)])


def _waited(tensor: torch.Tensor) -> torch.Tensor:
    """`tensor` with every functional collective behind it finished: its own, or its inner tensors' for a
    subclass (`__tensor_flatten__`)."""
    if isinstance(tensor, AsyncCollectiveTensor):
        return tensor.wait()
    if hasattr(tensor, "__tensor_flatten__"):
        for attr in tensor.__tensor_flatten__()[0]:
            torch.ops._c10d_functional.wait_tensor(getattr(tensor, attr))
    return tensor


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
