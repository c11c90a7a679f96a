"""What a monitored step measures beyond the loss: per-group gradient norms and update/weight ratios, the
learning rate of each optimizer group, and under DDP the share of the step spent in gradient all-reduce.

Parameters are grouped by their role in the model, read off their names (`param_role`): embedding, attention,
mlp, norm, head, the adapters (lora, prefix) and other; only the parameters the optimizer trains count. On a step
`log.monitor_every` picks, `train_step` hands a `Monitor` its gradients before clipping and the weights around
the optimizer step, and gets back one flat dict of numbers for metrics.jsonl (`grad_norm/<role>`,
`update_ratio/<role>`, `lr/<group>`, `comm_share`). Norms are of the whole parameters, whatever their layout:
DTensor shards (FSDP2, TP) are reduced over their meshes (`parallel.squared_norm`, the reduction of the global
gradient norm), pipeline stages summed over the pipeline group. Every rank takes part; rank 0 logs.

The update/weight ratio ||w_after - w_before|| / ||w_before|| needs the weights before the step: a monitored
step keeps one float32 copy of this rank's trainable parameters (its shards only, under FSDP2) until the step
is done. Unmonitored steps cost nothing: no copy, no norm, and the DDP hook only forwards to the all-reduce.

It does not decide which steps are monitored (`train.run.Run.step`) and writes nothing (`train.log`).
"""

from __future__ import annotations

import time
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

from temper.train.parallel import squared_norm

ROLES = ("embedding", "attention", "mlp", "norm", "head", "lora", "prefix", "other")
"""The groups parameters are measured in, in the order every rank reduces them."""

# Module names of temper's models (model/transformer.py, attention.py, layers.py, lora.py, prefix.py, heads.py,
# align/rl.py) that give a parameter its role; wrappers' prefixes (DDP's module., activation checkpointing's, a
# pipeline's stages.N.) are other components and do not match.
_EMBEDDINGS = {"tok_emb", "pos_emb"}
_NORMS = {"norm", "attn_norm", "mlp_norm", "attn_out_norm", "mlp_out_norm", "q_norm", "k_norm"}
_HEADS = {"head", "score"}


def param_role(name: str) -> str:
    """The role of a parameter from its qualified name: "layers.0.attn.q_proj.weight" -> "attention"."""
    parts = name.split(".")
    if any(p.startswith("lora_") for p in parts):  # lora_a, lora_b, lora_magnitude (DoRA)
        return "lora"
    if "prefix" in parts:  # before mlp: a prefix can have its own MLP
        return "prefix"
    if _EMBEDDINGS & set(parts):
        return "embedding"
    if _NORMS & set(parts):
        return "norm"
    if "attn" in parts:
        return "attention"
    if "mlp" in parts:
        return "mlp"
    if _HEADS & set(parts):  # the output layer, a reward or value head (ScalarHead.score)
        return "head"
    return "other"


def role_groups(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, list[nn.Parameter]]:
    """The optimizer's parameters by `param_role` (every role a key, empty where none), each shared tensor once."""
    trained = {id(p) for g in optimizer.param_groups for p in g["params"]}
    groups: dict[str, list[nn.Parameter]] = {role: [] for role in ROLES}
    for name, p in model.named_parameters():  # shared parameters are listed once
        if id(p) in trained:
            groups[param_role(name)].append(p)
    return groups


def group_labels(groups: list[dict[str, Any]]) -> list[str]:
    """Names for the optimizer's param groups: a group's own "name", else decay / no_decay by its weight decay
    (`optim.param_groups`), else the index when those do not tell the groups apart."""
    labels = [str(g.get("name") or ("decay" if g.get("weight_decay", 0) > 0 else "no_decay")) for g in groups]
    return labels if len(set(labels)) == len(labels) else [str(i) for i in range(len(groups))]


class CommTimer:
    """A DDP communication hook that runs DDP's own all-reduce (`default_hooks.allreduce_hook`: sum, then divide
    by the world) and, while `on`, records when each gradient bucket's all-reduce was launched and when it
    completed. `share()` is then the time during which at least one all-reduce was in flight (the union of those
    intervals) over the time since `start()`.

    This is communication time, not the time communication costs: DDP launches a bucket's all-reduce as soon as
    its gradients are ready, while the backward goes on with earlier layers, so most of it overlaps compute (on
    a GPU NCCL runs on its own stream; here the marks are CUDA events, the completion one recorded on the stream
    the hook's callback runs on, which waits for the all-reduce). A share near 1 means gradients are still being
    exchanged through most of the step: the step may be bound by the network. Only the last micro-batch of an
    accumulated step communicates (`no_sync` for the others)."""

    def __init__(self, cuda: bool) -> None:
        self.cuda, self.on = cuda, False
        self._start: Any = None
        self._spans: list[tuple[Any, Any]] = []

    def _mark(self) -> Any:
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        return time.perf_counter()

    def _since(self, a: Any, b: Any) -> float:
        """Seconds from mark a to mark b."""
        return a.elapsed_time(b) / 1e3 if self.cuda else b - a

    def hook(self, state, bucket):
        """Registered with `DistributedDataParallel.register_comm_hook(None, timer.hook)`: state, the process group
        (None: the world); bucket, a `dist.GradBucket`; returns a `torch.futures.Future[torch.Tensor]`. Unannotated:
        DDP checks the annotations against those classes, and this module's are strings (postponed evaluation)."""
        if not self.on:
            return default_hooks.allreduce_hook(state, bucket)
        launched = self._mark()
        fut = default_hooks.allreduce_hook(state, bucket)

        def done(f: torch.futures.Future[torch.Tensor]) -> torch.Tensor:
            self._spans.append((launched, self._mark()))  # gloo: on its worker thread; a list append is atomic
            return f.value()

        return fut.then(done)

    def start(self) -> None:
        self._spans.clear()
        self._start, self.on = self._mark(), True

    def share(self) -> float:
        """The share of the time since `start` that an all-reduce was in flight; stops recording."""
        end = self._mark()
        self.on = False
        if self.cuda:
            torch.cuda.synchronize()
        spans = sorted((self._since(self._start, a), self._since(self._start, b)) for a, b in self._spans)
        busy, reach = 0.0, 0.0
        for a, b in spans:  # the union of the intervals
            a = max(a, reach)
            if b > a:
                busy, reach = busy + b - a, b
        return busy / max(self._since(self._start, end), 1e-9)


class Monitor:
    """One run's monitoring state: the parameters by role (found on the first monitored step) and, under DDP,
    the `CommTimer` registered on the model. `train_step` calls, on a monitored step: `begin`, `gradients`
    (after unscaling, before clipping), `before_update` and `after_update` around the optimizer step when it
    steps, then `numbers`."""

    def __init__(self, comm: CommTimer | None = None) -> None:
        self.comm = comm
        self._groups: dict[str, list[nn.Parameter]] | None = None
        self._key: tuple[int, int] | None = None
        self._sums: dict[str, torch.Tensor] = {}
        self._before: list[torch.Tensor] = []

    def begin(self, model: nn.Module, optimizer: torch.optim.Optimizer, device: torch.device) -> None:
        if self._key != (id(model), id(optimizer)):
            self._groups, self._key = role_groups(model, optimizer), (id(model), id(optimizer))
        self._device, self._sums, self._before = device, {}, []
        if self.comm is not None:
            self.comm.start()

    def _squares(self, tensors: dict[str, list[torch.Tensor]]) -> torch.Tensor:
        """(len(ROLES),) squared norms, one per role, in ROLES order (the same collectives on every rank)."""
        return torch.stack([squared_norm(tensors[role], self._device).to(self._device) for role in ROLES])

    def gradients(self) -> None:
        """Per-group squared gradient norms: call before clipping."""
        self._sums["count"] = torch.tensor([float(len(self._groups[r])) for r in ROLES], device=self._device)
        self._sums["grad"] = self._squares({r: [p.grad for p in ps if p.grad is not None]
                                            for r, ps in self._groups.items()})

    @torch.no_grad()
    def before_update(self) -> None:
        """Keep a float32 copy of the trained weights (local shards) and their squared norms per group."""
        self._before = [p.detach().to(torch.float32, copy=True) for r in ROLES for p in self._groups[r]]
        self._sums["weight"] = self._squares(self._by_role(self._before))

    @torch.no_grad()
    def after_update(self) -> None:
        """Per-group squared norms of the update (the copy minus the new weights, in place on the copy)."""
        for old, p in zip(self._before, (p for r in ROLES for p in self._groups[r]), strict=True):
            old.sub_(p.detach())
        self._sums["update"] = self._squares(self._by_role(self._before))
        self._before = []

    def _by_role(self, flat: list[torch.Tensor]) -> dict[str, list[torch.Tensor]]:
        out, i = {}, 0
        for role in ROLES:
            n = len(self._groups[role])
            out[role], i = flat[i:i + n], i + n
        return out

    def numbers(self, optimizer: torch.optim.Optimizer, pp_group: dist.ProcessGroup | None = None
                ) -> dict[str, float]:
        """The step's numbers: grad_norm/<role> for every role with trained parameters, update_ratio/<role> when
        the optimizer stepped (0/0 for a group of zeros is NaN, logged as null), lr/<group>, and comm_share under
        DDP. One all-reduce over the pipeline stages (`pp_group`), then one host sync."""
        self._before = []
        names = [k for k in ("count", "grad", "weight", "update") if k in self._sums]
        stacked = torch.stack([self._sums[k] for k in names])  # (kinds, roles)
        if pp_group is not None:  # each stage holds some of the groups' parameters
            dist.all_reduce(stacked, group=pp_group)
        sums = dict(zip(names, stacked.double().tolist(), strict=True))
        out: dict[str, float] = {}
        for i, role in enumerate(ROLES):
            if sums["count"][i] == 0:
                continue
            out[f"grad_norm/{role}"] = sums["grad"][i] ** 0.5
            if "update" in sums:
                w = sums["weight"][i] ** 0.5
                out[f"update_ratio/{role}"] = sums["update"][i] ** 0.5 / w if w > 0 else float("nan")
        for label, group in zip(group_labels(optimizer.param_groups), optimizer.param_groups, strict=True):
            out[f"lr/{label}"] = float(group["lr"])
        if self.comm is not None:
            out["comm_share"] = self.comm.share()
        self._sums = {}
        return out


def param_counts(model: nn.Module) -> tuple[int, int]:
    """(total, trainable) parameters of the whole model, each shared tensor once; a DTensor counts its full
    shape, a meta tensor its shape (call it before a pipeline split keeps only some stages)."""
    params = list(model.parameters())  # unique
    return sum(p.numel() for p in params), sum(p.numel() for p in params if p.requires_grad)
