"""Pipeline parallelism: the blocks split into stages over the ranks of the mesh's `pp` dimension, run by a
`torch.distributed.pipelining` schedule (GPipe, 1F1B, or Interleaved 1F1B with two stages per rank:
Narayanan et al. 2021, "Efficient Large-Scale Language Model Training on GPU Clusters").

A stage is a `Transformer` without the parts it does not hold: the first holds the embeddings, the last the
final norm and the head, and `layers` keeps the blocks' indices in the whole model (`StageLayers`), so a
stage's parameter names are the whole model's: checkpoints, keyed by name through DCP, reshard between a
pipeline and any other layout. `split` prunes the model in place to this rank's stages (the module the
optimizer, checkpoints and export use); `stage_modules` gives one module per stage, sharing its parts, for
the schedule to call; `Pipeline` is what `parallel.parallelize` returns: `train_step` and `eval_metrics`
hand it their micro-batches, each split into `pp_microbatches` pipeline micro-batches by rows, and the last
stage runs the recipe's `Loss` on the final hidden states. The normalisation by the global count stays in
`train_step`; gradients are not scaled by the schedule (`scale_grads=False`).

It does not normalise losses, clip or step the optimizer (train/step.py), and does not shard parameters
within a stage (FSDP2 and tensor parallel, applied by `parallelize` to each stage).
"""

from __future__ import annotations

import operator
from collections.abc import Iterable, Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.checkpoint.state_dict import get_model_state_dict
from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleGPipe, ScheduleInterleaved1F1B
from torch.distributed.tensor import DTensor

from temper.config import ConfigError
from temper.model.attention import Segments
from temper.model.config import ModelConfig
from temper.model.transformer import Transformer
from temper.train.losses import Batch, Loss, LossOut
from temper.train.parallel import DistInfo, ParallelConfig, unwrap

SCHEDULES = {"1F1B": Schedule1F1B, "Interleaved1F1B": ScheduleInterleaved1F1B, "GPipe": ScheduleGPipe}
"""`train.parallel.pp_schedule` -> the torch.distributed.pipelining schedule."""

STAGES_PER_RANK = {"1F1B": 1, "Interleaved1F1B": 2, "GPipe": 1}

MAX_SCHEDULES = 4
"""Schedules kept per pipeline, one per micro-batch shape (each holds receive buffers of its shape)."""


class StageLayers(nn.ModuleList):
    """Some of a model's blocks, registered under their indices in the whole model (`layers.5` stays
    `layers.5` on the stage that holds it) and indexed by position like a list: `layers[0]` is the first
    block held, and `layers[i] = wrapped` replaces it in place (activation checkpointing does)."""

    def __init__(self, blocks: Iterable[tuple[int, nn.Module]] = ()) -> None:
        super().__init__()
        for index, block in blocks:
            self.add_module(str(index), block)

    def _get_abs_string_index(self, idx: int) -> str:
        keys = list(self._modules)
        idx = operator.index(idx)
        if not -len(keys) <= idx < len(keys):
            raise IndexError(f"index {idx} is out of range of {len(keys)} blocks")
        return keys[idx]

    def __getitem__(self, idx: int | slice) -> nn.Module | nn.ModuleList:
        if isinstance(idx, slice):
            return nn.ModuleList(list(self._modules.values())[idx])
        return self._modules[self._get_abs_string_index(idx)]

    def __delitem__(self, idx: int | slice) -> None:
        raise TypeError("a pipeline stage's blocks keep their indices: build a new StageLayers instead")

    @property
    def indices(self) -> list[int]:
        """The blocks' indices in the whole model."""
        return [int(k) for k in self._modules]


def n_stages(layout: ParallelConfig) -> int:
    """Stages of the whole pipeline: pp ranks x stages per rank."""
    return layout.pp * STAGES_PER_RANK[layout.pp_schedule]


def stage_ids(d: DistInfo) -> list[int]:
    """This rank's stages: stage s runs on pipeline rank s mod pp (the looped placement of the interleaved
    schedule, and of torch.distributed.pipelining)."""
    pp, rank = d.degree("pp"), d.mesh["pp"].get_local_rank()
    return list(range(rank, n_stages(d.layout), pp))


def stage_blocks(n_layers: int, stages: int) -> list[range]:
    """The blocks of each stage: contiguous, as even as they go, the first stages one more when they do not."""
    base, extra = divmod(n_layers, stages)
    bounds = [0]
    for s in range(stages):
        bounds.append(bounds[-1] + base + (s < extra))
    return [range(bounds[s], bounds[s + 1]) for s in range(stages)]


def check_layout(cfg: ModelConfig, layout: ParallelConfig, amp_dtype: torch.dtype | None) -> None:
    """ConfigErrors, naming the keys, for what a pipeline cannot run."""
    stages = n_stages(layout)
    if cfg.n_layers < stages:
        raise ConfigError(f"model.n_layers={cfg.n_layers} cannot fill {stages} pipeline stages (train.parallel.pp="
                          f"{layout.pp} x {STAGES_PER_RANK[layout.pp_schedule]} stage(s) per rank with pp_schedule="
                          f"{layout.pp_schedule}): use fewer stages or more layers")
    if cfg.tie_embeddings:
        raise ConfigError("model.tie_embeddings=true with train.parallel.pp > 1: the first stage holds the embedding "
                          "and the last the head, so they cannot be one tensor; set model.tie_embeddings=false")
    if cfg.per_layer_input_size or cfg.kv_shared_layers:
        raise ConfigError("model.per_layer_input_size / model.kv_shared_layers (Gemma 4 E2B, E4B) with "
                          "train.parallel.pp > 1: every stage would need the tokens' per-layer embeddings or an earlier "
                          "stage's keys and values; shard the model with train.parallel.dp_shard (FSDP2) instead")
    if amp_dtype == torch.float16:
        raise ConfigError("train.precision=fp16 with train.parallel.pp > 1: the gradient scaler's overflow check "
                          "would differ between stages; use bf16")


def split(model: Transformer, ids: Sequence[int], stages: int) -> None:
    """Prune `model` in place to the parts of stages `ids` of `stages` (the other blocks, and the embeddings or
    the final norm and head when it holds neither end, are dropped). Parameter names stay the whole model's.
    The model is marked (`pipeline_stages`) so that checkpoints go through DCP."""
    blocks = stage_blocks(model.cfg.n_layers, stages)
    kept = [i for s in ids for i in blocks[s]]
    model.layers = StageLayers((i, model.layers[i]) for i in kept)
    if 0 not in ids:
        model.tok_emb = None
        model.pos_emb = None
    if stages - 1 not in ids:
        model.norm = None
        model.head = None
    model.pipeline_stages = tuple(ids)


def is_stage(model: nn.Module) -> bool:
    """Whether `model` holds only some pipeline stages' parts (`split`)."""
    return getattr(unwrap(model), "pipeline_stages", None) is not None


def stage_modules(model: Transformer, ids: Sequence[int], stages: int) -> list[Transformer]:
    """One module per stage of `ids`, for the schedule to call: `model` itself when it holds one stage; else a
    `Transformer` per stage sharing `model`'s parts (and its buffers: RoPE tables computed later reach them)."""
    if len(ids) == 1:
        return [model]
    blocks = stage_blocks(model.cfg.n_layers, stages)
    held = dict(zip(model.layers.indices, model.layers, strict=True))
    views = []
    for s in ids:
        view = Transformer.__new__(Transformer)
        nn.Module.__init__(view)
        # One dict of buffers: `init_buffers` and `to_empty` on `model` update every view (RoPE tables, not saved).
        view._buffers, view._non_persistent_buffers_set = model._buffers, model._non_persistent_buffers_set
        first, last = s == 0, s == stages - 1
        view.add_module("tok_emb", model.tok_emb if first else None)
        view.add_module("pos_emb", model.pos_emb if first else None)
        view.add_module("drop", model.drop)
        view.add_module("layers", StageLayers((i, held[i]) for i in blocks[s]))
        view.add_module("norm", model.norm if last else None)
        view.add_module("head", model.head if last else None)
        for k, v in model.__dict__.items():  # the config and any other plain attribute
            if not k.startswith("_") and k not in view.__dict__ and k not in view._modules and k != "pipeline_stages":
                view.__dict__[k] = v
        views.append(view)
    return views


def split_batch(batch: Batch, n: int) -> list[Batch]:
    """`batch` as `n` pipeline micro-batches of consecutive rows (inputs, targets, the model's keyword tensors,
    packed-document segments and the loss's extra tensors alike)."""
    rows = batch.inputs.shape[0]
    if rows % n:
        raise ConfigError(f"train.micro_batch_size={rows} is not a multiple of the {n} pipeline micro-batches it is "
                          f"split into (train.parallel.pp_microbatches; 0: the number of stages)")
    k = rows // n

    def part(v: Any, i: int, what: str) -> Any:
        if isinstance(v, torch.Tensor) and v.dim() > 0 and v.shape[0] == rows:
            return v[i * k : (i + 1) * k]
        if isinstance(v, Segments) and v.ids.shape[0] == rows:
            return Segments(v.ids[i * k : (i + 1) * k], v.shared_prefix)
        if isinstance(v, bool | int | float | str | None):
            return v
        raise ValueError(f"pipeline parallel splits a micro-batch by rows: {what} is not one value per row")

    return [Batch(batch.inputs[i * k : (i + 1) * k], batch.targets[i * k : (i + 1) * k],
                  {key: part(v, i, f"model_kwargs[{key!r}]") for key, v in batch.model_kwargs.items()},
                  {key: part(v, i, f"extra[{key!r}]") for key, v in batch.extra.items()})
            for i in range(n)]


class StageOutput:
    """The last stage's output posing as the model for a `Loss`: calling it returns the final hidden states the
    pipeline computed (the model's kwargs were the stages'), or the stage's logits on them; `head` and `cfg` are
    the stage's, for a loss that runs the output layer itself (`losses.head_cross_entropy`). So a pipeline runs
    the losses that call the model once on their batch and sum over its rows (language-model losses)."""

    def __init__(self, stage: Transformer, hidden: torch.Tensor) -> None:
        self.cfg, self.head, self.tok_emb, self.hidden = stage.cfg, stage.head, stage.tok_emb, hidden
        self.logits = stage.logits

    def __call__(self, tokens: torch.Tensor, *, hidden_only: bool = False, last_only: bool = False,
                 logits_at: torch.Tensor | None = None, **_: Any) -> torch.Tensor:
        x = self.hidden  # (B, T, C)
        if last_only:
            x = x[:, -1:]  # (B, 1, C)
        elif logits_at is not None:
            x = x[logits_at]  # (N, C)
        return x if hidden_only else self.logits(x)


class Pipeline(nn.Module):
    """This rank's stages and the schedules that run them: what `parallelize` returns under pp > 1. It is not
    called like a model: `train_step` and `eval_metrics` hand it their micro-batches (`run`)."""

    def __init__(self, stages: list[Transformer], ids: list[int], d: DistInfo) -> None:
        super().__init__()
        self.stages = nn.ModuleList(stages)
        self.ids, self.n_stages = ids, n_stages(d.layout)
        self.schedule_cls = SCHEDULES[d.layout.pp_schedule]
        self.microbatches = d.layout.pp_microbatches or self.n_stages
        self.device = d.device
        self.pp_group = d.mesh["pp"].get_group()
        self.dp_group = d.dp_group
        self.last_rank = dist.get_global_rank(self.pp_group, d.degree("pp") - 1)  # the last stage's, in this group
        self.holds_first, self.holds_last = 0 in ids, self.n_stages - 1 in ids
        self._schedules: dict[tuple, Any] = {}
        self._ctx: dict[str, Any] = {}

    def forward(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        raise TypeError("a pipeline runs micro-batches through train_step / eval_metrics, not one forward: gather the "
                        "whole model (parallel.full_state_dict) to call it")

    def _schedule(self, backward: bool, chunks: list[Batch]) -> Any:
        b = chunks[0]
        key = (backward, len(chunks), tuple(b.inputs.shape), b.inputs.dtype,
               tuple((k, tuple(v.shape) if isinstance(v, torch.Tensor) else type(v)) for k, v in b.model_kwargs.items()))
        if key not in self._schedules:
            if len(self._schedules) >= MAX_SCHEDULES:
                self._schedules.pop(next(iter(self._schedules)))
            stages = [PipelineStage(m, s, self.n_stages, self.device, group=self.pp_group)
                      for m, s in zip(self.stages, self.ids, strict=True)]
            arg = stages if len(stages) > 1 else stages[0]
            try:
                self._schedules[key] = self.schedule_cls(arg, n_microbatches=len(chunks), loss_fn=self._loss,
                                                         scale_grads=False)
            except ValueError as e:  # e.g. Interleaved1F1B's rounds of pp micro-batches
                raise ConfigError(f"train.parallel: {len(chunks)} pipeline micro-batches (micro-batches x "
                                  f"pp_microbatches) do not fit the schedule: {e}") from None
        return self._schedules[key]

    def _loss(self, hidden: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """The schedule's loss on the last stage: micro-batch `target` (its index) through the recipe's Loss;
        what goes backward is the sum scaled as `train_step` says."""
        c = self._ctx
        i = int(target.reshape(-1)[0])
        out = c["loss_fn"](StageOutput(self.stages[-1], hidden), c["chunks"][i])
        summed = out.loss_sum * float("nan") if c["poison"] else out.loss_sum
        c["outs"][i] = LossOut(summed, out.metrics)
        loss = summed * c["scale"] if c["scale"] is not None else summed
        return c["scaler"].scale(loss) if c["scaler"] is not None else loss

    def run(self, batches: Sequence[Batch], loss_fn: Loss, *, backward: bool, scale: torch.Tensor | None = None,
            scaler: torch.amp.GradScaler | None = None, poison: bool = False) -> dict[str, torch.Tensor]:
        """Every micro-batch through the pipeline in one schedule step (one fill and drain), backward too when
        `backward` (the loss scaled by `scale`): returns {"loss": sum of the loss sums, and each metric's sum}
        on every rank of this pipeline (the last stage's, broadcast over the pp group)."""
        shapes = {tuple(b.inputs.shape) for b in batches}
        if len(shapes) > 1:
            raise ValueError(f"pipeline parallel runs a step's micro-batches as one schedule: they must have one "
                             f"shape, got {sorted(shapes)}")
        chunks = [c for b in batches for c in split_batch(b, self.microbatches)]
        self._ctx = {"loss_fn": loss_fn, "chunks": chunks, "outs": {}, "scale": scale, "scaler": scaler,
                     "poison": poison}
        schedule = self._schedule(backward, chunks)
        args = (torch.cat([b.inputs for b in batches]),) if self.holds_first else ()
        kwargs = {k: _concat([c.model_kwargs[k] for c in chunks]) for k in chunks[0].model_kwargs}
        target = torch.arange(len(chunks))  # on the host: `_loss` reads it without a device sync
        try:
            if backward:
                schedule.step(*args, target=target, return_outputs=False, hidden_only=True, **kwargs)
            else:
                schedule.eval(*args, target=target, return_outputs=False, hidden_only=True, **kwargs)
            outs = self._ctx["outs"]
        finally:
            self._ctx = {}
        return self._share(outs, len(chunks))

    def _share(self, outs: dict[int, LossOut], n: int) -> dict[str, torch.Tensor]:
        """The last stage's sums on every rank of the pipeline: names by one object broadcast, values by one
        tensor broadcast over the pp group."""
        names: list[Any] = [sorted(outs[0].metrics) if self.holds_last else None]
        dist.broadcast_object_list(names, src=self.last_rank, group=self.pp_group, device=self.device)
        keys = ["loss", *names[0]]
        if self.holds_last:
            sums = torch.stack([
                torch.stack([outs[i].loss_sum.detach().float() for i in range(n)]).sum(),
                *(torch.stack([outs[i].metrics[k].detach().float() for i in range(n)]).sum() for k in names[0])])
        else:
            sums = torch.zeros(len(keys), device=self.device)
        dist.broadcast(sums, src=self.last_rank, group=self.pp_group)
        return dict(zip(keys, sums.unbind(), strict=True))


def _concat(values: list[Any]) -> Any:
    """A keyword argument of the pipeline micro-batches as one batch, which the schedule splits again by rows."""
    v = values[0]
    if isinstance(v, torch.Tensor):
        return torch.cat(values)
    if isinstance(v, Segments):
        raise ValueError("pipeline parallel does not take packed-document masks (segments) yet: train with "
                         "train.parallel.pp=1, or without packing")
    return v


def gather_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The whole model's state dict on the CPU of rank 0 ({} elsewhere) from pipeline stages, each possibly
    sharded (FSDP2, tensor parallel): every rank calls it. Each tensor is made whole within its stage, then
    sent to rank 0 by the lowest rank that holds it, one tensor at a time, in the model's order."""
    target = unwrap(model)
    local = get_model_state_dict(target)  # names without wrapper prefixes; DTensors stay sharded
    held: list[list[str]] = [[] for _ in range(dist.get_world_size())]
    dist.all_gather_object(held, [(k, tuple(v.shape), v.dtype) for k, v in local.items()])
    owner: dict[str, tuple[int, tuple, torch.dtype]] = {}
    for r, items in enumerate(held):
        for k, shape, dtype in items:
            owner.setdefault(k, (r, shape, dtype))
    rank = dist.get_rank()
    device = torch.device("cuda", torch.cuda.current_device()) if "nccl" in dist.get_backend() else torch.device("cpu")
    out: dict[str, torch.Tensor] = {}
    for k in sorted(owner, key=_model_order):
        src, shape, dtype = owner[k]
        if k in local:
            t = local[k]
            t = t.full_tensor() if isinstance(t, DTensor) else t  # every rank of the stage takes part
            if rank == src == 0:
                out[k] = t.detach().cpu()
            elif rank == src:
                dist.send(t.detach().to(device).contiguous(), dst=0)
        elif rank == 0:
            buf = torch.empty(shape, dtype=dtype, device=device)
            dist.recv(buf, src=src)
            out[k] = buf.cpu()
    return out


def _model_order(name: str) -> tuple[int, int, str]:
    """Sort key of a parameter name in the whole model's order: embeddings, blocks by index, then the rest."""
    parts = name.split(".")
    if parts[0] == "layers":
        return (1, int(parts[1]), name)
    return (0 if parts[0] in ("tok_emb", "pos_emb") else 2, 0, name)


def whole_model(model: nn.Module) -> Transformer | None:
    """The whole model gathered from its pipeline stages on rank 0, on rank 0's device (None on the other
    ranks; every rank calls it): for what needs one forward over every block (benchmark tasks, generation)."""
    weights = gather_state_dict(model)
    if dist.get_rank() != 0:
        return None
    target = unwrap(model)
    device = next(target.parameters()).device
    with torch.device("meta"):
        full = Transformer(target.cfg)
    full.load_state_dict(weights, assign=True)
    full.to(device)
    full.init_buffers(device)
    return full
