"""Losses and log-probabilities: the one place each is computed, for every recipe.

A training objective is a `Loss`: `count(batch)` is the number of units its loss is normalised by
(valid target tokens, preference pairs, response tokens), known from the batch alone; called on
(model, micro-batch) it returns a `LossOut` — the *sum* of its per-unit losses and metrics as sums
over the same units. `train_step` divides every micro-batch's sum by the global count of all
micro-batches on all ranks, so accumulation and data parallelism give the update of one big batch
whatever the objective.

The language-model loss never holds the full (tokens x vocabulary) logits: `linear_cross_entropy`
runs the output layer and the cross-entropy a chunk of tokens at a time and computes the gradients
of the hidden states and of the output weight as it goes (the chunked "fused linear cross-entropy"
of Liger-Kernel, Hsu et al. 2024), so the loss holds one chunk of logits (`chunk_tokens`) instead of ~16 bytes x vocabulary per
token, and the matrix products are the ones autograd would run. Under tensor parallelism the output weight is a
DTensor split by vocabulary rows: each rank computes its slice of every chunk's logits, and the max, the sum of
exponentials and the target's logit are all-reduced over the tensor-parallel ranks (Megatron-LM's
vocab-parallel cross-entropy), so every rank gets the whole loss and no rank the whole logits.

It does not build batches (data/), run the optimizer (step.py) or own a model's heads (model/heads.py).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from typing import Protocol

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.distributed.tensor import DTensor, Shard

from temper.train.parallel import unwrap

IGNORE_INDEX = -100

TRAINED_CHUNK_BYTES = 2 * 2**30
FROZEN_CHUNK_BYTES = 64 * 2**20


def chunk_tokens(vocab_size: int, weight_trained: bool) -> int:
    """Tokens per chunk of `linear_cross_entropy`: float32 logits of at most 2 GiB when the output
    weight trains, 64 MiB when it is frozen.

    A trained weight's float32 gradient (V x d) is read and written by every chunk, and its
    product with the chunk is only ~6n FLOPs per byte of that traffic, so small chunks would make
    the loss memory-bound: large chunks keep it a matrix-product cost (still no B*T*V logits in
    bf16 + float32 + log-probabilities, as plain autograd keeps). A frozen weight (LoRA, QLoRA) is
    only read, so small chunks cost little and keep a 128k vocabulary's loss under 64 MiB.
    """
    budget = TRAINED_CHUNK_BYTES if weight_trained else FROZEN_CHUNK_BYTES
    return max(1, budget // (4 * vocab_size))


@dataclass
class Batch:
    """One micro-batch: inputs and targets, the model's keyword arguments, and objective-specific tensors.

    targets are IGNORE_INDEX where nothing is learnt (prompt, padding). `model_kwargs` go to the
    model's forward (positions and document mask of packed rows). `extra` carries what other
    objectives need, by name: pair indices, rewards, advantages, old and reference log-probs.
    """

    inputs: torch.Tensor  # (B, T)
    targets: torch.Tensor  # (B, T)
    model_kwargs: dict = field(default_factory=dict)
    extra: dict[str, torch.Tensor] = field(default_factory=dict)

    @classmethod
    def of(cls, mb: Batch | tuple) -> Batch:
        """A Batch from itself or from the (inputs, targets[, model_kwargs]) tuples recipes build."""
        return mb if isinstance(mb, Batch) else cls(mb[0], mb[1], mb[2] if len(mb) > 2 else {})


@dataclass
class LossOut:
    loss_sum: torch.Tensor
    """Sum of the per-unit losses (float32, with gradient)."""
    metrics: dict[str, torch.Tensor] = field(default_factory=dict)
    """Sums over the same units (no gradient); reported as their global means."""


class Loss(Protocol):
    def count(self, batch: Batch) -> torch.Tensor:
        """Units this batch's loss sum is normalised by, from the batch alone (before any forward pass)."""
        ...

    def __call__(self, model: nn.Module, batch: Batch) -> LossOut: ...


@dataclass(frozen=True)
class LogitForm:
    """What the model does to `hidden @ weight.T` before the softmax (`Transformer.logits`): divide by `divisor`
    (Granite's logits_scaling), then cap at +-`cap` (Gemma 2's softcap); None: neither."""

    divisor: float | None = None
    cap: float | None = None

    @classmethod
    def of(cls, model: nn.Module) -> LogitForm:
        """The form of a `Transformer`'s logits; plain for a module without a ModelConfig (its head is all)."""
        cfg = getattr(model, "cfg", None)
        return cls() if cfg is None else cls(cfg.logit_divisor, cfg.logit_softcap)


def _float_logits(hidden: torch.Tensor, weight: torch.Tensor, form: LogitForm, bias: torch.Tensor | None = None
                  ) -> tuple[torch.Tensor, torch.dtype, torch.Tensor | None]:
    """(a chunk's logits `hidden @ weight.T` (+ `bias`: a head with one, Phi's and GPT-J's) in float32 in the model's
    `form`, their dtype, and with a cap the capped logits' slope tanh(z / c), for `_raw_grad`). Divided and capped
    c * tanh(z / c) in float32, in place."""
    logits = hidden @ weight.T if bias is None else torch.addmm(bias, hidden, weight.T)  # (n, V), as nn.Linear
    dtype = logits.dtype
    lf = logits.float()  # (n, V)
    del logits  # freed here when the float32 copy is a new tensor
    if form.divisor is not None:
        lf = lf.div_(form.divisor)
    if form.cap is None:
        return lf, dtype, None
    slope = lf.div_(form.cap).tanh_()  # (n, V) tanh(z / c), in place on the chunk's own logits; kept for the gradient
    return slope * form.cap, dtype, slope


def _raw_grad(g: torch.Tensor, slope: torch.Tensor | None, form: LogitForm) -> torch.Tensor:
    """The gradient w.r.t. the raw logits from the formed ones' (in place): times the cap's slope
    d(c tanh(z / c))/dz = 1 - tanh^2, then divided by the divisor."""
    if slope is not None:
        g = g.mul_(slope.square_().neg_().add_(1))
    return g if form.divisor is None else g.div_(form.divisor)


def _chunk_ce(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, smoothing: float, grad: bool,
              form: LogitForm = LogitForm(), bias: torch.Tensor | None = None
              ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Summed cross-entropy of a chunk's logits `hidden @ weight.T` (float32, in the model's `form`) and,
    with `grad`, its gradient w.r.t. the logits in their dtype: softmax - ((1 - s) * one_hot + s / V), zero on
    ignored rows (PyTorch's label smoothing).

    Works in place on one float32 copy of the logits (the logits themselves when already float32):
    a chunk costs one float32 (n, V) tensor and its gradient (a capped chunk one more: the cap's slope).
    """
    lf, dtype, slope = _float_logits(hidden, weight, form, bias)  # (n, V)
    valid = targets != IGNORE_INDEX
    safe = targets.clamp(min=0)[:, None]  # (n, 1)
    lf = lf.sub_(lf.amax(dim=-1, keepdim=True))  # shifted so that exp cannot overflow
    picked = lf.gather(1, safe).squeeze(1)  # (n,)
    mean = lf.mean(dim=-1) if smoothing else None
    p = lf.exp_()  # (n, V) unnormalised probabilities
    z = p.sum(dim=-1)  # (n,)
    lse = z.log()
    nll = lse - picked
    if mean is not None:
        nll = (1 - smoothing) * nll + smoothing * (lse - mean)
    loss = torch.where(valid, nll, 0.0).sum()
    if not grad:
        return loss, None
    g = p.div_(z[:, None])  # softmax
    g.scatter_add_(1, safe, torch.full(safe.shape, -(1 - smoothing), dtype=g.dtype, device=g.device))
    if smoothing:
        g.sub_(smoothing / g.shape[-1])
    return loss, _raw_grad(g.mul_(valid[:, None]), slope, form).to(dtype)


@dataclass(frozen=True)
class VocabShard:
    """This rank's rows, from `start`, of an output layer of `size` rows split over the ranks of `group`."""

    group: dist.ProcessGroup
    start: int
    size: int


def _chunk_ce_sharded(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, smoothing: float,
                      grad: bool, form: LogitForm, bias: torch.Tensor | None, shard: VocabShard
                      ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """`_chunk_ce` when `weight` holds this rank's rows of the vocabulary (`shard`): the logits' max, the sum
    of their exponentials, the target's logit (on the rank that holds its row) and, for label smoothing, the
    sum of the logits are all-reduced over `shard.group` (two all-reduces a chunk; Shoeybi et al. 2019), so
    every rank returns the whole loss, and the gradient of its own slice of the logits."""
    lf, dtype, slope = _float_logits(hidden, weight, form, bias)  # (n, V/tp)
    valid = targets != IGNORE_INDEX
    mx = lf.amax(dim=-1)  # (n,)
    dist.all_reduce(mx, op=dist.ReduceOp.MAX, group=shard.group)
    lf = lf.sub_(mx[:, None])  # shifted by the global max, so that exp cannot overflow
    local = targets - shard.start
    mine = valid & (local >= 0) & (local < lf.shape[1])  # the target's row is on this rank
    safe = torch.where(mine, local, 0)[:, None]  # (n, 1)
    picked = torch.where(mine, lf.gather(1, safe).squeeze(1), 0.0)  # (n,)
    total = lf.sum(dim=-1) if smoothing else torch.zeros_like(picked)
    p = lf.exp_()  # (n, V/tp) unnormalised probabilities
    sums = torch.stack([picked, p.sum(dim=-1), total])  # (3, n)
    dist.all_reduce(sums, group=shard.group)
    picked, z, total = sums
    lse = z.log()
    nll = lse - picked
    if smoothing:
        nll = (1 - smoothing) * nll + smoothing * (lse - total / shard.size)
    loss = torch.where(valid, nll, 0.0).sum()
    if not grad:
        return loss, None
    g = p.div_(z[:, None])  # this rank's slice of the softmax
    g.scatter_add_(1, safe, torch.where(mine, -(1 - smoothing), 0.0)[:, None].to(g.dtype))
    if smoothing:
        g.sub_(smoothing / shard.size)
    return loss, _raw_grad(g.mul_(valid[:, None]), slope, form).to(dtype)


def _vocab_slice(weight: DTensor, bias: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None, VocabShard]:
    """This rank's rows of an output weight split by vocabulary (tensor parallel), and of its bias, as plain tensors
    whose gradients flow back into the DTensors' slices.

    Only a split over the tensor-parallel mesh dimension ("tp") is one: a weight still sharded by FSDP2 over
    the data-parallel ranks (which hold other tokens) must not be mistaken for it."""
    mesh = weight.device_mesh
    if mesh.mesh_dim_names != ("tp",) or tuple(weight.placements) != (Shard(0),):
        raise ValueError(f"an output weight split over ranks must be split by vocabulary rows over the 'tp' mesh "
                         f"dimension (Shard(0)), got {tuple(weight.placements)} over {mesh.mesh_dim_names}")
    local = weight.to_local()  # (V/tp, C)
    local_bias = bias.to_local() if isinstance(bias, DTensor) else bias  # (V/tp,): ColwiseParallel splits it alike
    return local, local_bias, VocabShard(mesh.get_group(), mesh.get_local_rank() * local.shape[0], weight.shape[0])


_compiled_chunk_ce: Callable | None = None


def _chunk_ce_fn(device: torch.device) -> Callable:
    """The chunk's loss and gradient: compiled on CUDA (one fused pass over the logits instead of ~8
    elementwise kernels), plain PyTorch elsewhere (CPU tests need no compiler)."""
    global _compiled_chunk_ce
    if device.type != "cuda":
        return _chunk_ce
    if _compiled_chunk_ce is None:
        _compiled_chunk_ce = torch.compile(_chunk_ce, dynamic=True)
    return _compiled_chunk_ce


def _linear_ce(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, smoothing: float, chunk: int,
               need_h: bool, need_w: bool, form: LogitForm = LogitForm(), shard: VocabShard | None = None,
               bias: torch.Tensor | None = None, need_b: bool = False
               ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """(loss sum, d loss / d hidden, d loss / d weight and d loss / d bias in float32), a chunk of rows at a time;
    `form`: the logits' divisor and softcap; `shard`: the weight (and bias) are this rank's vocabulary rows (tensor
    parallel)."""
    device = hidden.device.type
    dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else hidden.dtype
    with torch.autocast(device, enabled=False):
        h, w = hidden.to(dtype), weight.to(dtype)  # (N, C), (V, C): one cast of the weight, not one per chunk
        b = None if bias is None else bias.to(dtype)  # (V,)
        grad_h = torch.empty_like(h) if need_h else None
        grad_w = torch.zeros_like(weight, dtype=torch.float32) if need_w else None
        grad_b = torch.zeros_like(bias, dtype=torch.float32) if need_b else None
        total = torch.zeros((), device=h.device, dtype=torch.float32)
        chunk_ce = _chunk_ce_fn(h.device) if shard is None else partial(_chunk_ce_sharded, shard=shard)
        for lo in range(0, h.shape[0], chunk):
            hc, tc = h[lo : lo + chunk], targets[lo : lo + chunk]
            loss, g = chunk_ce(hc, w, tc, smoothing, need_h or need_w or need_b, form, b)  # g: (n, V)
            total += loss
            if grad_b is not None:
                grad_b += g.sum(dim=0, dtype=torch.float32)  # (V,)
            if grad_h is not None:
                torch.mm(g, w, out=grad_h[lo : lo + chunk])  # (n, C)
            if grad_w is not None:
                grad_w = _add_weight_grad(grad_w, g, hc)  # (V, C)
            del g  # before the next chunk's logits: one chunk's (n, V) tensors alive at a time, not two
        if shard is not None and grad_h is not None:
            dist.all_reduce(grad_h, group=shard.group)  # each vocabulary slice gives a part of d loss / d hidden
    return total, grad_h, grad_w, grad_b


def _add_weight_grad(grad_w: torch.Tensor, g: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """grad_w + g.T @ h, accumulated in float32: on CUDA by the matrix product itself (cuBLAS adds
    bf16 products into a float32 output), elsewhere through a product in the inputs' dtype."""
    if g.is_cuda and g.dtype != grad_w.dtype:
        return torch.addmm(grad_w, g.T, h, out_dtype=grad_w.dtype)
    return grad_w.add_((g.T @ h).to(grad_w.dtype))


class _LinearCrossEntropy(torch.autograd.Function):
    """The loss in forward, with both gradients computed there; backward only scales them."""

    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, smoothing: float,
                chunk: int, form: LogitForm, shard: VocabShard | None, bias: torch.Tensor | None) -> torch.Tensor:
        need_h, need_w = ctx.needs_input_grad[:2]
        total, *grads = _linear_ce(hidden, weight, targets, smoothing, chunk, need_h, need_w, form, shard, bias,
                                   ctx.needs_input_grad[7])
        ctx.save_for_backward(*grads)
        ctx.dtypes = (hidden.dtype, weight.dtype, None if bias is None else bias.dtype)
        return total

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):  # type: ignore[override]
        gh, gw, gb = (None if g is None else (g * grad_out).to(dtype)
                      for g, dtype in zip(ctx.saved_tensors, ctx.dtypes, strict=True))
        return gh, gw, None, None, None, None, None, gb


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, *,
                         label_smoothing: float = 0.0, chunk: int | None = None, form: LogitForm = LogitForm(),
                         bias: torch.Tensor | None = None) -> torch.Tensor:
    """Summed token cross-entropy of `hidden @ weight.T + bias` (float32 scalar) over the valid targets, of the logits
    in the model's `form`: divided by `form.divisor` (Granite), capped at +-`form.cap` (Gemma 2).

    hidden (N, C) final hidden states, weight (V, C) the output layer, targets (N,) with IGNORE_INDEX
    where nothing is learnt. Under autocast the products run in its dtype, as `nn.Linear` would; the
    loss is taken in float32. Equals `F.cross_entropy(hidden @ weight.T, targets, reduction="sum")`.
    chunk: tokens per chunk (default `chunk_tokens`). A DTensor `weight` split by vocabulary rows (tensor
    parallel; `hidden` and `targets` whole on every rank) gives every rank the whole loss, computed on its slice.
    """
    shard = None
    if isinstance(weight, DTensor):
        weight, bias, shard = _vocab_slice(weight, bias)
    chunk = chunk or chunk_tokens(weight.shape[0], weight.requires_grad)
    trains = [t.requires_grad for t in (hidden, weight, bias) if t is not None]
    if torch.is_grad_enabled() and any(trains):
        return _LinearCrossEntropy.apply(hidden, weight, targets, label_smoothing, chunk, form, shard, bias)
    with torch.no_grad():  # evaluation: no gradient is computed at all
        return _linear_ce(hidden, weight, targets, label_smoothing, chunk, False, False, form, shard, bias)[0]


def token_loss_sum(logits: torch.Tensor, targets: torch.Tensor, label_smoothing: float = 0.0) -> torch.Tensor:
    """Summed cross-entropy over the valid (not IGNORE_INDEX) targets of full logits, in float32."""
    return F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets.reshape(-1), ignore_index=IGNORE_INDEX,
                           reduction="sum", label_smoothing=label_smoothing)


def head_cross_entropy(model: nn.Module, hidden: torch.Tensor, targets: torch.Tensor,
                       label_smoothing: float = 0.0) -> torch.Tensor:
    """Summed cross-entropy of the model's output layer on its final hidden states (B, T, C) or (N, C).

    A plain weight (tied embedding, or an `nn.Linear` head, with its bias: Phi's, GPT-J's) goes through the chunked
    `linear_cross_entropy`; any other head (LoRA on the head, say) runs as a module, then the loss.
    """
    head = model.head
    if head is None or type(head) is nn.Linear:
        weight, bias = (model.tok_emb.weight, None) if head is None else (head.weight, head.bias)
        h, t = hidden.reshape(-1, hidden.shape[-1]), targets.reshape(-1)
        return linear_cross_entropy(h, weight, t, label_smoothing=label_smoothing, form=LogitForm.of(model),
                                    bias=bias)
    return token_loss_sum(model.logits(hidden), targets, label_smoothing)  # the model's own (B, T, C) call


@dataclass
class LMLoss:
    """Next-token cross-entropy over the valid targets: pretraining and SFT (targets carry the loss mask)."""

    label_smoothing: float = 0.0

    def count(self, batch: Batch) -> torch.Tensor:
        return (batch.targets != IGNORE_INDEX).sum()

    def __call__(self, model: nn.Module, batch: Batch) -> LossOut:
        hidden = model(batch.inputs, hidden_only=True, **batch.model_kwargs)  # (B, T, C), through DDP/compile
        return LossOut(head_cross_entropy(unwrap(model), hidden, batch.targets, self.label_smoothing))


@dataclass
class RouterBalance:
    """`loss` plus `coef` times the load-balancing loss of a mixture of experts' routers (Switch Transformer, Fedus
    et al. 2022, eq. 4): E * sum_e f_e * P_e, f_e the share of routing slots (each token's k) given to expert e and
    P_e its mean router probability, over the real tokens of every MoE layer's forward with gradients, pooled over
    the layers as transformers' `load_balancing_loss_func` pools them (so it equals that of Mixtral and Qwen3-MoE
    with output_router_logits; a balanced router scores k). Added as coef * aux per counted unit, so the step's
    normalisation gives the mean over micro-batches and ranks; logged as `router_aux`.

    With `loads` (a list) it also adds up, for each layer with a choice bias, the slots each expert took, over the
    calls of a step (its micro-batches), for `balance_choice_bias` to move the biases after the step.

    Real tokens: those `segments` (the batch's model_kwargs) does not mark as padding, in a forward of the batch's
    shape; every token of any other forward (a recipe's second pass, e.g. a value model's)."""

    loss: Loss
    coef: float = 0.0
    loads: list[torch.Tensor] | None = None

    def count(self, batch: Batch) -> torch.Tensor:
        return self.loss.count(batch)

    def __call__(self, model: nn.Module, batch: Batch) -> LossOut:
        from temper.config import ConfigError
        from temper.model.layers import MoE

        layers = [m for m in model.modules() if isinstance(m, MoE)]
        if not layers:
            key = "router_aux_loss_coef" if self.coef else "expert_bias_rate"
            raise ConfigError(f"train.{key}: the model has no mixture of experts (model.n_experts=0)")
        if self.loads is not None and not any(m.choice_bias is not None for m in layers):
            raise ConfigError("train.expert_bias_rate: the model's experts have no choice bias "
                              "(model.expert_choice_bias=false)")
        for m in layers:
            m.routing = []
        try:
            out = self.loss(model, batch)
            routed = [(m, m.routing) for m in layers]
        finally:
            for m in layers:
                m.routing = None
        if not any(records for _, records in routed):  # no forward with gradients
            return out
        segments = batch.model_kwargs.get("segments")
        real = (segments.ids >= 0).flatten() if segments is not None else None  # (B*T,)
        n_experts = layers[0].router.out_features
        device = next(p for _, records in routed for p, _ in records).device
        slots = torch.zeros(n_experts, device=device)  # (E,) tokens' k slots routed to each expert, all layers
        probs = torch.zeros(n_experts, device=device)  # (E,) summed router probabilities
        tokens = torch.zeros((), device=device)
        biased = [m for m in layers if m.choice_bias is not None]
        if self.loads is not None and not self.loads:
            self.loads.extend(torch.zeros(n_experts, device=device) for _ in biased)
        for m, records in routed:
            for p, chosen in records:  # (N, E), (N, k)
                same = real is not None and real.numel() == p.shape[0]
                w = real.float() if same else torch.ones(p.shape[0], device=p.device)  # (N,)
                taken = torch.zeros_like(slots).index_add_(0, chosen.flatten(), w.repeat_interleave(chosen.shape[1]))
                slots = slots + taken
                probs = probs + (p.float() * w[:, None]).sum(0)
                tokens = tokens + w.sum()
                if self.loads is not None and m.choice_bias is not None:
                    self.loads[biased.index(m)] += taken.detach()
        if not self.coef:
            return out
        aux = n_experts * (slots / tokens.clamp(min=1) * probs / tokens.clamp(min=1)).sum()
        units = self.loss.count(batch).float()
        return LossOut(out.loss_sum + self.coef * aux * units, {**out.metrics, "router_aux": aux.detach() * units})


def balance_choice_bias(model: nn.Module, loads: list[torch.Tensor], rate: float,
                        group: dist.ProcessGroup | None = None) -> float:
    """DeepSeek-V3's auxiliary-loss-free balancing (Wang et al. 2024, "Auxiliary-Loss-Free Load Balancing Strategy
    for Mixture-of-Experts"): after a step, each expert's choice bias moves by `rate` towards balance, up if it took
    fewer of its layer's routing slots than the mean expert, down if more, so that later tokens route around the crowd
    without a loss term pulling on the router's weights. `loads`: `RouterBalance`'s per-layer sums on this rank,
    added up here over `group` (the data-parallel ranks), so every rank moves its biases alike. Returns the step's
    largest violation, max load / mean load - 1 over the layers (the paper's MaxVio), before the move."""
    from temper.model.layers import MoE

    biased = [m for m in model.modules() if isinstance(m, MoE) and m.choice_bias is not None]
    if not loads:  # no forward with gradients
        return 0.0
    total = torch.stack(loads)  # (L, E)
    if dist.is_available() and dist.is_initialized() and dist.get_world_size(group) > 1:
        dist.all_reduce(total, group=group)
    mean = total.mean(-1, keepdim=True)  # (L, 1)
    with torch.no_grad():
        for m, load, mu in zip(biased, total, mean, strict=True):
            m.choice_bias += rate * torch.sign(mu - load).to(m.choice_bias.device)
    return float((total.amax(-1) / mean.squeeze(-1).clamp(min=1e-9) - 1).max())


class CompiledLoss:
    """`loss` with its call under torch.compile: the model's forward and the loss after it (for `LMLoss`, the
    chunked output layer and cross-entropy) traced as one graph, so no eager launches are left between them
    (train.compile_scope=model). `count` stays the plain loss's. Under DDP the trace breaks at DDP's forward:
    the model then runs its own compiled graph (compiled in place by `parallelize`) and the loss one more."""

    def __init__(self, loss: Loss) -> None:
        self.loss = loss
        self._call = torch.compile(loss.__call__)

    def count(self, batch: Batch) -> torch.Tensor:
        return self.loss.count(batch)

    def __call__(self, model: nn.Module, batch: Batch) -> LossOut:
        return self._call(model, batch)


def token_logprobs(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """log p(target) per position (B, T) in float32, with gradient; 0 where the target is IGNORE_INDEX.

    The building block of DPO, PPO, GRPO and distillation: a sequence's log-probability is the sum
    over its response tokens (`sequence_logprobs`).
    """
    logp = torch.log_softmax(logits.float(), dim=-1)  # (B, T, V)
    valid = targets != IGNORE_INDEX
    picked = logp.gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)  # (B, T)
    return torch.where(valid, picked, 0.0)


def sequence_logprobs(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Summed log-probability of each row's valid targets (B,), float32, with gradient."""
    return token_logprobs(logits, targets).sum(-1)


Encode = Callable[[nn.Module, torch.Tensor, torch.Tensor], torch.Tensor]
"""encode(model, tokens (N, T), mask (N, T) bool) -> (N, C) L2-normalised embeddings, with gradient."""


@dataclass
class InfoNCELoss:
    """Contrastive loss of a bi-encoder with in-batch negatives (InfoNCE, van den Oord et al. 2018; DPR, Karpukhin
    et al. 2020): each query's positive is its own passage, every other passage of the micro-batch a negative.

    The batch: `inputs` (2B, T) holds the B queries' tokens then their B passages' tokens, right-padded (a causal
    model's real tokens never see the padding after them), `extra["mask"]` (2B, T) marks the real tokens, and
    `targets` is all IGNORE_INDEX (no token is predicted). One forward pass embeds both halves, so DDP sees one
    forward per backward. `encode` turns the model's output into normalised embeddings (the recipe passes
    `rag.embed.pool` over the hidden states: train/ may not import rag/).

    count = B queries; the sum is over queries of -log softmax(q . p / temperature)[own passage], plus with
    `symmetric` the passage->query direction, the two averaged. The negatives are the micro-batch's passages:
    accumulation or more ranks add queries, not negatives to each query's softmax (DPR's in-batch setting).
    Metrics: `accuracy`, the share of queries whose own passage scores highest in the micro-batch.
    """

    encode: Encode
    temperature: float = 0.05
    symmetric: bool = False

    def __post_init__(self) -> None:
        if self.temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")

    def count(self, batch: Batch) -> torch.Tensor:
        return torch.tensor(batch.inputs.shape[0] // 2)

    def __call__(self, model: nn.Module, batch: Batch) -> LossOut:
        b = batch.inputs.shape[0] // 2
        emb = self.encode(model, batch.inputs, batch.extra["mask"]).float()  # (2B, C)
        q, p = emb[:b], emb[b:]
        return LossOut(*info_nce(q, p, self.temperature, self.symmetric))


def info_nce(q: torch.Tensor, p: torch.Tensor, temperature: float, symmetric: bool = False
             ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """(summed InfoNCE over the B queries, {"accuracy": number of queries ranking their own passage first}) for
    embeddings q (B, C) and their positives p (B, C), row i of p the positive of row i of q."""
    logits = q @ p.T / temperature  # (B, B): query i against every passage
    labels = torch.arange(q.shape[0], device=q.device)
    loss = F.cross_entropy(logits, labels, reduction="sum")
    if symmetric:
        loss = (loss + F.cross_entropy(logits.T, labels, reduction="sum")) / 2
    correct = (logits.detach().argmax(dim=-1) == labels).sum().float()
    return loss, {"accuracy": correct}
