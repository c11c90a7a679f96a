"""Memory per device before a run starts: parameters, gradients, optimizer states, activations, KV cache.

`estimate(model_cfg, run)` returns, for one device (one rank of a parallel layout), the bytes of
each component with the formula that gave it, and the peak of a training step. The peak is not the sum of the components: during
backward the gradients grow as the saved activations are freed, so the peak is the largest of
three moments of temper's `train_step` (see `_moments`):

  * the loss, forward and as backward starts: every saved activation, plus what the chunked
    cross-entropy holds (train/losses.py): the gradients of the hidden states and of the output
    weight it computes as it goes, and one chunk's logits and float32 working copy. The full
    B*T*V logits, often the largest single term otherwise (Wijmans et al. 2024 "Cut Your Losses"),
    never exist;
  * each block's backward (recomputed first under activation checkpointing), with the gradients
    of the blocks above it already made;
  * the end of backward: every gradient, plus two vocabulary-sized contributions to a tied
    embedding's gradient that autograd sums at the end.

What temper's training actually does, and so what is counted (read from `train/step.py`,
`recipes/pretrain.py`, `model/transformer.py`, `model/attention.py`, `model/layers.py`):

  * precision. pretrain/full keep float32 weights, float32 gradients and float32 AdamW states
    (exp_avg, exp_avg_sq: 8 bytes per trainable parameter); bf16/fp16 is `torch.autocast` around
    the forward, so matmul outputs are 2 bytes and autocast's cached 2-byte copy of every weight
    is saved for backward (2 bytes per matmul weight, Micikevicius et al. 2018's "fp16 copy").
    The residual stream stays float32 (the embedding runs outside autocast), LayerNorm runs in
    float32 (on CUDA; CPU autocast keeps the input's dtype), and a float32 tensor entering a matmul
    is cast separately for each reader (autocast caches only weight casts), so q, k and v each
    save their own 2-byte copy of the norm output.
    lora/qlora hold the frozen base in the compute dtype (a frozen weight needs no float32 master
    copy; fp32 keeps it in float32) and the adapters in float32 with their AdamW states.
  * activations. Per block, the tensors autograd saves for backward, walked op by op: the norms'
    inputs and statistics, a linear layer's input only when its weight is trained (a frozen base
    weight needs only itself to pass the gradient on), SDPA's q, k, v, output and float32
    log-sum-exp (flash / memory-efficient kernels: no T x T matrix), the MLP's pre-activations
    (GELU: up; SwiGLU/GeGLU: gate, act(gate), up). Latent attention (DeepSeek-V3) keeps its latents' RMSNorm
    terms and the inputs of the layers that expand them, and SDPA's v is a view of kv_b_proj's whole output (keys'
    and values' parts, kept together). Gated attention (Qwen3-Next, Qwen3.5) keeps sigmoid(gate) and the gated
    output beside SDPA's. A hybrid model's Gated DeltaNet layers (`full_attention_every`) keep what their chunked
    rule needs: C x C matrices per value head and chunk of C = 64 tokens, about (8 + 3 x compute dtype bytes) x 64
    bytes per token and value head, beside ~20 float32 vectors of the heads' width (`_linear_saved`); their
    backward peaks after the rule's chunk loop, where the chunks' gradients are stacked whole and the intra-chunk
    attention's makes three C x C ones at once. In LoRA the first block's input needs no gradient (the embedding
    is frozen), so its first norm saves nothing. A mixture of experts keeps its router's float32 probabilities and
    int64 choices, and each expert's MLP terms for the rows routed to it: k rows per token in all, however unevenly
    they are spread; only the backward's transient (one expert at a time) assumes balanced routing.
  * activation checkpointing (`train.activation_checkpointing = k`: every k-th block, as
    `train/parallel.py` wraps them; Chen et al. 2016): a wrapped block keeps only its input and
    is recomputed, whole, in its backward. With activation offload (`train.activation_offload`) that input
    waits in host memory until its block's backward copies it back, and without a device mesh a frozen,
    untied token embedding is held there too (`train.parallel.HostEmbedding`; `Estimate.host`).
  * the parallel layout (`RunShape.parallel`, the recipes' `train.parallel`, over `world_size`
    ranks; every figure is one rank's), as `train/parallel.py` builds it:
    - DDP keeps a second copy of the gradients in its buckets (allocated once, alive throughout);
      ZeRO-1 (`zero1`, Rajbhandari et al. 2020) divides the optimizer states by the replicas.
    - FSDP2 (`dp_shard`; over every data-parallel rank when a mesh exists, over dp_shard only under
      HSDP) keeps each parameter's dim-0 shard, padded to a multiple of the shard degree, and its
      float32 gradient and AdamW shards. In flight (torch 2.x's FSDP2, read and measured): the root
      unit (embeddings, final norm, head) is gathered in the compute dtype from its forward to the
      end of backward; a block's unit is gathered for its forward, with the previous block's
      all-gather buffer kept until this one's is copied out (3 units at once), and again for its
      backward, with the next one prefetched (2); its gradients are made whole in the compute dtype,
      copied into a float32 reduce-scatter input that is kept until the next block's reduce-scatter
      (gloo on a CPU reduces a copy of it as well), and leave a float32 shard. With
      reshard_after_forward off (ZeRO-2) every block's unit stays gathered from its forward to its
      backward. With accumulation, each unit's whole gradients are summed in float32 until the last
      micro-batch. Under mixed precision the gathered weights are already in the compute dtype, so
      the residual stream is too and autocast makes no weight copies. CPU offload moves the shards
      (and the optimizer step) to host memory (`Estimate.host`); the device keeps what is in flight.
    - tensor parallel (`tp`, Megatron-LM; `train/tensor_parallel.py`'s plan): q/k/v, gate/up,
      o/down, the token embedding and the head are split by tp, norms are whole; inside attention
      and the MLP the activations are split by tp, the norms' and the residual stream's only with
      sequence parallel (Korthikanti et al. 2022), and the regions' inputs never (each rank
      multiplies the whole, all-gathered, input); the loss holds a vocabulary slice of each chunk.
    - pipeline parallel (`pp`): a stage holds its share of the blocks, the first the embeddings,
      the last the final norm, head and loss (pipelines refuse tied embeddings); a micro-batch is split into
      pp_microbatches, and the first stage keeps the activations of as many of them as its
      schedule runs forwards before the first backward (1F1B: pp; GPipe: all; Interleaved1F1B:
      from its warm-up) during the schedule's first backward, which makes the gradients; the later
      backwards add into whole gradients with fewer in flight. The estimate is the stage that peaks
      higher (`estimate(..., stage=)` gives either).
    DDP, ZeRO-1, FSDP2 (ZeRO-2/3, HSDP), tensor and pipeline parallel (1F1B; 1F1B x FSDP2) are checked
    against measured steps on gloo ranks (tests/train/test_memory_distributed.py).
  * KV cache: what `Transformer.new_cache(batch, seq_len)` allocates for generation, in the compute
    dtype: 2 (k and v) x layers x batch x seq_len x kv_heads x head_dim; for latent attention, each token's latent
    and rotated key part: layers x batch x seq_len x (kv_lora_rank + rope_dim). A hybrid model caches keys and values
    for its softmax attention layers only; each linear attention layer holds a fixed-size state per sequence instead,
    whatever its length: float32 value heads x Dk x Dv, and the convolution's last K - 1 inputs.
  * QLoRA (Dettmers et al. 2023): the blocks' linear weights in NF4, 4 bits plus double-quantized
    block scales (an 8-bit absmax per 64 weights, a float32 scale per 256 of those): 0.5 + 1/64 +
    4/16384 bytes per weight; one linear layer is dequantized at a time (transient).

Attention dropout on a CPU sends SDPA to its math kernel, which keeps T x T probabilities per head, and
whose backward makes two T x T gradients per head at once (counted), as do values of another width than the
keys (latent attention's); CUDA's fused kernels take both without them. Capped scores (Gemma 2) and sinks (GPT-OSS) keep
T x T per head too where FlexAttention does not run (a CPU, or dropout): the scores and the float32 probabilities
(counted). The estimate counts tensors, as
`torch.cuda.max_memory_allocated` does; it does not count the CUDA context (~0.5 GB), allocator
caching and fragmentation, kernels' workspaces, or what torch.compile saves instead. `LiveTensorBytes` / `measure_train_step` measure the same thing on any
device (a CPU has no allocator counter) so that the estimate can be checked against a real step.
"""

from __future__ import annotations

import functools
import inspect
import itertools
import math
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Literal

import torch
from torch import nn
from torch.distributed.optim import ZeroRedundancyOptimizer
from torch.distributed.tensor import DTensor
from torch.nn.parallel import DistributedDataParallel
from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves, tree_map_only

from temper.config import ConfigError
from temper.model import linear_attention
from temper.model.attention import Attention, LatentAttention
from temper.model.config import ModelConfig
from temper.model.layers import MoE
from temper.model.linear_attention import GatedDeltaNet, Mamba, Mamba2, ShortConv, gated_delta_rule
from temper.model.lora import ATTENTION_TARGETS, LoRALinear, apply_lora
from temper.model.transformer import Transformer
from temper.train.losses import chunk_tokens
from temper.train.optim import block_matrices
from temper.train.parallel import ParallelConfig, tables_on_host

Recipe = Literal["pretrain", "full", "lora", "qlora"]
DTYPE_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}
NF4_BYTES = 0.5 + 1 / 64 + 4 / (64 * 256)
"""Bytes per NF4 weight with double quantization (QLoRA §3): 4 bits, an 8-bit scale per 64, a float32 per 256 scales."""
ADAMW_STATE_BYTES = 8
"""exp_avg and exp_avg_sq in float32 per trainable parameter (PyTorch keeps them in the parameter's dtype)."""
MUON_STATE_BYTES = 4
"""Muon's one momentum buffer, in the parameter's dtype (float32)."""


@dataclass
class LoRAShape:
    """The adapters of a lora/qlora run (ignored by pretrain/full)."""

    rank: int = 16
    """Rank r of every adapter: A is (r, in), B is (out, r)."""
    targets: list[str] = field(default_factory=lambda: list(ATTENTION_TARGETS))
    """Names of the linear layers that get adapters: q_proj k_proj v_proj o_proj gate_proj up_proj down_proj (latent
    attention: q_a_proj q_b_proj kv_a_proj_with_mqa kv_b_proj, and q_proj without q_lora_rank; Gated DeltaNet:
    in_proj_qkv in_proj_z in_proj_b in_proj_a out_proj)."""
    dropout: float = 0.0
    """Dropout on the adapters' input; > 0 saves a copy of each target's input and a mask (1 byte on CUDA)."""

    def __post_init__(self) -> None:
        if self.rank <= 0:
            raise ValueError(f"rank must be > 0, got {self.rank}")
        if not self.targets:
            raise ValueError("targets: name at least one linear layer")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")


@dataclass
class RunShape:
    """Everything about a run that decides its memory, besides the model's shape."""

    recipe: Recipe = "pretrain"
    """pretrain or full (every weight trained), lora (frozen base + adapters), qlora (NF4 base + adapters)."""
    precision: Literal["fp32", "bf16", "fp16"] = "bf16"
    """Compute dtype: fp32, or bf16/fp16 autocast (float32 master weights in pretrain/full)."""
    micro_batch_size: int = 1
    """Sequences per forward pass on each device."""
    seq_len: int = 0
    """Tokens per sequence; 0 means the model's max_seq_len."""
    accumulation_steps: int = 1
    """Micro-batches per optimizer step; > 1 keeps the gradients alive through every forward."""
    activation_checkpointing: int = 0
    """Recompute every k-th block in backward (as train.activation_checkpointing); 0 disables."""
    activation_offload: bool = False
    """With activation_checkpointing (as train.activation_offload): the checkpointed inputs wait in host memory,
    and without a device mesh (one process, DDP) a frozen, untied token embedding is held there too."""
    world_size: int = 1
    """Ranks in all (torchrun's WORLD_SIZE): the product of the layout's degrees; micro_batch_size is per rank."""
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    """How the ranks are laid out, as the training recipes' train.parallel: DDP by default (ZeRO-1 with zero1),
    FSDP2 with dp_shard (ZeRO-2 with reshard_after_forward false, HSDP with dp_replicate, offload), tp, pp."""
    device: Literal["cuda", "cpu"] = "cuda"
    """Where it runs: CUDA's autocast computes LayerNorm in float32 and keeps 1-byte dropout masks, a CPU's neither."""
    lora: LoRAShape = field(default_factory=LoRAShape)
    """Adapters (lora and qlora only)."""
    optimizer: Literal["adamw", "muon"] = "adamw"
    """As the recipes' optim.name: muon keeps one state, not AdamW's two, for the blocks' linear weights."""

    def __post_init__(self) -> None:
        for key in ("micro_batch_size", "accumulation_steps", "world_size"):
            if getattr(self, key) <= 0:
                raise ValueError(f"{key} must be > 0, got {getattr(self, key)}")
        for key in ("seq_len", "activation_checkpointing"):
            if getattr(self, key) < 0:
                raise ValueError(f"{key} must be >= 0, got {getattr(self, key)}")
        if self.activation_offload and not self.activation_checkpointing:
            raise ValueError("activation_offload needs activation_checkpointing >= 1 (it offloads the checkpoints)")
        if self.optimizer == "muon" and self.recipe in ("lora", "qlora"):
            raise ValueError(f"optimizer=muon trains whole weight matrices (pretrain, full), not {self.recipe}'s "
                             "adapters")
        try:
            self.parallel.degrees(self.world_size)
        except ConfigError as e:  # the training recipes' key is train.parallel; here it is run.parallel
            raise ConfigError(str(e).replace("train.parallel", "run.parallel") + f" (run.world_size={self.world_size})") from None
        microbatches = self.parallel.pp_microbatches or self.parallel.pp
        if self.parallel.pp > 1 and self.micro_batch_size % microbatches:
            raise ValueError(f"micro_batch_size {self.micro_batch_size} does not split into {microbatches} pipeline "
                             "micro-batches (parallel.pp_microbatches, default parallel.pp)")


@dataclass
class Component:
    """One line of the estimate: bytes per device and how they were computed."""

    name: str
    bytes: int
    formula: str


@dataclass
class Estimate:
    """The estimate for one device (rank); `peak` is what the training step reaches, not the sum of the lines."""

    components: list[Component]
    """parameters, gradients, optimizer states, activations, KV cache (generation; not in the training peak);
    under FSDP2 "gathered (FSDP2)" (its largest transient), under CPU offload "host memory (CPU offload)"."""
    peak: int
    """Peak bytes of one training step on one device."""
    peak_formula: str
    """Which moment of the step is the peak, and its sum."""
    at_peak: dict[str, int]
    """What is alive at the peak: parameters, gradients, optimizer states, activations (and FSDP2's gathered)."""
    block_terms: list[tuple[str, float]]
    """Saved bytes per token of one (not checkpointed) block, the one that saves the most, by tensor."""
    params: int
    """Parameters of the model (each shared tensor once), adapters included."""
    trainable: int
    """Parameters that get gradients and optimizer states."""
    notes: list[str]
    """Warnings and assumptions worth printing."""
    inference: int
    """Weights in the compute dtype (NF4 for qlora) plus the KV cache: what generation needs."""
    host: int = 0
    """Host memory of this rank: its shards of parameters, gradients and optimizer states under CPU offload;
    the checkpointed inputs and a frozen token embedding under activation offload."""

    def __getitem__(self, name: str) -> Component:
        for c in self.components:
            if c.name == name:
                return c
        raise KeyError(name)


# ---- counting the model -------------------------------------------------------------------------


@dataclass
class _Counts:
    params: int
    buffer_bytes: int
    trainable: int
    muon_trainable: int  # the weights Muon would train (`optim.block_matrices`)
    frozen: int
    frozen_linears: int  # frozen weights of the blocks' linear layers (NF4 in qlora)
    block_params: int  # one block, adapters included
    block_trainable: list[int]
    late_trainable: int  # the lookups (untied token embedding, learned positions): their gradients come last
    down_trainable: list[int]  # per block: down_proj's trained parameters (its gradient exists during the MLP backward)
    autocast_block: list[int]  # per block: trained matmul weights (autocast caches a copy of each)
    autocast_tail: int  # the head's (or tied embedding's) weight, when trained
    embedding_unit: int  # embeddings + final norm + head: FSDP2's root unit
    largest_frozen_linear: int  # qlora dequantizes one at a time
    tied_trained: bool


def build_meta(cfg: ModelConfig, run: RunShape) -> Transformer:
    """The model as the run trains it (adapters swapped in for lora/qlora), on the meta device: shapes only."""
    with torch.device("meta"):
        model = Transformer(cfg)
        if run.recipe in ("lora", "qlora"):
            apply_lora(model, run.lora.rank, float(run.lora.rank), run.lora.targets, run.lora.dropout)
    return model


def _count(model: Transformer, size: dict[int, int] | None = None) -> _Counts:
    """The counts of `model`; `size`: each parameter's elements on this rank by id (default: all of them)."""
    def n(p: nn.Parameter) -> int:
        return p.numel() if size is None else size[id(p)]

    def unique(params: Any) -> list[nn.Parameter]:
        seen: dict[int, nn.Parameter] = {}
        for p in params:
            seen.setdefault(id(p), p)
        return list(seen.values())

    everything = unique(model.parameters())
    block_ids = {id(p) for p in model.layers.parameters()}
    frozen_linears = 0
    autocast_block = []
    for block in model.layers:
        k = 0
        for m in block.modules():
            if isinstance(m, (nn.Linear, LoRALinear)):
                if m.weight.requires_grad:
                    k += n(m.weight)
                else:
                    frozen_linears += n(m.weight)
            if isinstance(m, LoRALinear):
                k += n(m.lora_a) + n(m.lora_b)
        autocast_block.append(k)
    head_weight = model.tok_emb.weight if model.head is None else model.head.weight
    tail = [p for p in everything if id(p) not in block_ids]
    lookups = ([model.pos_emb.weight] if model.pos_emb is not None else []) + ([model.tok_emb.weight] if model.head is not None else [])
    return _Counts(
        params=sum(n(p) for p in everything),
        buffer_bytes=sum(b.numel() * b.element_size() for b in model.buffers()),
        trainable=sum(n(p) for p in everything if p.requires_grad),
        muon_trainable=sum(n(p) for p in block_matrices(model)),
        frozen=sum(n(p) for p in everything if not p.requires_grad),
        frozen_linears=frozen_linears,
        block_params=sum(n(p) for p in unique(model.layers[0].parameters())),
        block_trainable=[sum(n(p) for p in unique(b.parameters()) if p.requires_grad) for b in model.layers],
        late_trainable=sum(n(p) for p in lookups if p.requires_grad),
        down_trainable=[sum(n(p) for p in _down_proj(b.mlp).parameters() if p.requires_grad) if b.mlp is not None
                        else 0 for b in model.layers],
        autocast_block=autocast_block,
        autocast_tail=n(head_weight) if head_weight.requires_grad else 0,
        embedding_unit=sum(n(p) for p in tail),
        largest_frozen_linear=max((n(m.weight) for m in model.layers.modules()
                                   if isinstance(m, (nn.Linear, LoRALinear)) and not m.weight.requires_grad), default=0),
        tied_trained=model.head is None and model.tok_emb.weight.requires_grad,
    )


def _down_proj(mlp: nn.Module) -> nn.Module:
    """The MLP's output projection whose gradient exists when its backward peaks: for a mixture, the last
    expert's (backward runs the experts in reverse, and peaks in the first it runs, with every other's saved
    tensors still held)."""
    return mlp.experts[-1].down_proj if isinstance(mlp, MoE) else mlp.down_proj


# ---- the layout: what one rank holds ------------------------------------------------------------


@dataclass(frozen=True)
class _Layout:
    """One rank's cut of the run, as `train.parallel` builds it from `ParallelConfig.degrees`."""

    tp: int = 1
    pp: int = 1
    dp: int = 1  # data-parallel ranks: each runs its own micro-batches
    shard: int = 1  # FSDP2's shard degree (dp_shard under HSDP, else every data-parallel rank); 1: no FSDP2
    ddp: bool = False  # replicas kept in step by DDP (its gradient buckets)
    zero1: bool = False
    reshard: bool = True  # FSDP2's reshard_after_forward
    offload: bool = False
    mesh: bool = False  # a device mesh (FSDP2, tp or pp); none for one process or DDP
    sp: bool = False  # sequence parallel (with tp > 1)
    microbatches: int = 1  # pipeline micro-batches per micro-batch
    schedule: str = ""

    @property
    def fsdp(self) -> bool:
        return self.shard > 1


def _layout(run: RunShape) -> _Layout:
    par = run.parallel
    deg = par.degrees(run.world_size)
    tp, pp, replicate, shard = deg["tp"], deg["pp"], deg["dp_replicate"], deg["dp_shard"]
    dp = replicate * shard
    mesh = replicate != run.world_size  # `build_mesh`: no mesh when every rank is a replica (DDP)
    fsdp = mesh and dp > 1  # `parallelize`: with a mesh, data parallelism is FSDP2 (HSDP over two dimensions)
    microbatches = (par.pp_microbatches or pp) if pp > 1 else 1
    return _Layout(
        tp=tp, pp=pp, dp=dp, shard=(shard if replicate > 1 and shard > 1 else dp) if fsdp else 1,
        ddp=not mesh and dp > 1, mesh=mesh, zero1=par.zero1 and not mesh and dp > 1, reshard=par.reshard_after_forward,
        offload=par.offload and fsdp, sp=par.sequence_parallel and tp > 1, microbatches=microbatches,
        schedule=par.pp_schedule if pp > 1 else "")


_COLUMNS = ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj")
_ROWS = ("o_proj", "down_proj")


def _tp_shape(name: str, p: nn.Parameter, tp: int) -> tuple[int, int]:
    """(rows, columns) of this rank's slice of parameter `name` under `train.tensor_parallel`'s plan: q/k/v and
    gate/up split by output rows (weights and biases), o/down by input columns, the token embedding and the
    head by vocabulary rows; norms, positions and LoRA adapters whole."""
    rows = p.shape[0] if p.dim() else 1
    cols = p.numel() // max(rows, 1)
    if tp == 1:
        return rows, cols
    module, kind = (name.split(".") + [""])[-3:-1] if "." in name else ("", name)
    if (module in _COLUMNS and kind in ("weight", "bias")) or name in ("tok_emb.weight", "head.weight"):
        return -(-rows // tp), cols
    if module in _ROWS and kind == "weight":
        return rows, -(-cols // tp)
    return rows, cols


def _sizes(model: Transformer, lay: _Layout, stage: str) -> tuple[dict[int, int], dict[int, int], dict[int, int]]:
    """Elements of each parameter (by id) on this rank: (computed with: its tensor-parallel slice; stored:
    FSDP2's shard of that slice, dim 0 padded to a multiple of the shard degree as FSDP2 pads it; gathered:
    the padded slice FSDP2 all-gathers). `stage` (pipeline): "first" holds the embeddings and the blocks,
    "last" the blocks, the final norm and the head (a tied embedding on both), "all" everything."""
    compute, stored, gathered = {}, {}, {}
    lookups = {"tok_emb.weight", "pos_emb.weight"}
    for name, p in model.named_parameters():
        on_stage = not (
            (stage == "first" and not name.startswith("layers.") and name not in lookups)
            or (stage == "last" and name in lookups and not (name == "tok_emb.weight" and model.head is None)))
        rows, cols = _tp_shape(name, p, lay.tp) if on_stage else (0, 0)
        local_rows = -(-rows // lay.shard)
        compute[id(p)], stored[id(p)], gathered[id(p)] = rows * cols, local_rows * cols, local_rows * lay.shard * cols
    return compute, stored, gathered


# ---- activations: what autograd saves, op by op -------------------------------------------------


@dataclass
class _Dtypes:
    r: int  # residual stream (the embedding's output dtype)
    a: int  # matmul outputs (the compute dtype)
    autocast: bool
    cuda: bool  # CUDA's autocast runs LayerNorm in float32 and its dropout keeps a bool mask; CPU's do neither

    def norm_out(self) -> int:
        """LayerNorm's output (and saved input) dtype size."""
        return 4 if self.autocast and self.cuda else self.r

    def mask(self, of: int) -> int:
        """Bytes per element of a dropout mask of a tensor of `of` bytes per element."""
        return 1 if self.cuda else of


class _Saved:
    """Bytes per token that autograd keeps, by label."""

    def __init__(self) -> None:
        self.terms: list[tuple[str, float]] = []

    def add(self, label: str, nbytes: float) -> None:
        if nbytes:
            self.terms.append((label, nbytes))

    @property
    def total(self) -> float:
        return sum(n for _, n in self.terms)


def _wants_grad(module: nn.Module) -> bool:
    """Whether any of the module's parameters trains."""
    return any(p.requires_grad for p in module.parameters())


def _keeps_input(module: nn.Module) -> bool:
    """A linear layer keeps its input for backward when its weight trains or it carries an adapter."""
    return isinstance(module, LoRALinear) or (isinstance(module, nn.Linear) and module.weight.requires_grad)


def _norm(s: _Saved, label: str, norm: nn.Module | None, d: int, grad_in: bool, t: _Dtypes, rows: int = 1,
          in_bytes: int | None = None, input_kept: bool = False) -> int:
    """Save what the norm keeps, for `rows` vectors of width d / rows per token (a q/k norm: one per head) of
    `in_bytes` per element (default: the residual stream's); return its output's bytes per element (None, no norm:
    the input's, passed on). input_kept: another norm keeps the same input (GPT-NeoX's two norms of a block's input)."""
    if norm is None:
        return in_bytes or t.r
    trained = any(p.requires_grad for p in norm.parameters())
    if isinstance(norm, nn.LayerNorm):
        if (grad_in or trained) and not input_kept:  # native_layer_norm keeps its input, mean and rstd
            s.add(f"{label} input", d * t.norm_out())
        if grad_in or trained:
            s.add(f"{label} mean, rstd", 2 * t.norm_out())
        return t.norm_out()
    # RMSNorm: rms_norm(x.float()) keeps the float32 input and rstd; weight * y keeps y when the weight trains, cast
    # back first (Llama's), or still float32 where the product is cast after (Gemma's unit offset, OLMo 2's).
    if grad_in:
        s.add(f"{label} input (float32)", 4 * d)
        s.add(f"{label} rstd", 4 * rows)
    if trained:
        after = getattr(norm, "unit_offset", False) or getattr(norm, "cast_after", False)
        s.add(f"{label} normalised", (4 if after else in_bytes or t.r) * d)
    return t.r


def _readers(s: _Saved, label: str, linears: list[nn.Module], in_bytes: int, t: _Dtypes, dropout: float,
             grad_in: bool) -> None:
    """The inputs kept by the linear layers that read one tensor.

    Readers share the tensor, except that autocast casts it once per reader (it caches only the
    casts of weights) and LoRA dropout makes one dropped copy per adapter. The tensor itself is kept once, however
    many calls name it (a parallel block's attention and MLP read one norm's output).
    """
    keepers = [m for m in linears if _keeps_input(m)]
    dropped = [m for m in keepers if isinstance(m, LoRALinear) and dropout > 0]
    shared = [m for m in keepers if m not in dropped]
    if shared:
        d_in = shared[0].in_features
        if in_bytes == t.a:
            if f"{label} (matmul input)" not in dict(s.terms):
                s.add(f"{label} (matmul input)", t.a * d_in)
        else:
            s.add(f"{label} cast for {len(shared)} matmul(s)", len(shared) * t.a * d_in)
    for m in dropped:
        s.add(f"{label} LoRA dropout copy" + (" + mask" if grad_in else ""),
              (t.a + (t.mask(in_bytes) if grad_in else 0)) * m.in_features)


def _lora_hidden(s: _Saved, linears: list[nn.Module], t: _Dtypes) -> None:
    ranks = sum(m.rank for m in linears if isinstance(m, LoRALinear))
    s.add("LoRA x A^T", ranks * (t.a if t.autocast else 4))


@dataclass
class _BlockMem:
    saved: _Saved  # what the forward leaves for backward, per token
    grad_out: bool  # whether the block's output needs a gradient
    transient: float  # extra bytes per token during its backward
    input_shared: bool  # whether `saved` holds the block's input tensor itself
    transient_residual: float = 0.0  # the part of `transient` that is the residual stream's gradient

    def split(self, tp: int, sp: bool) -> tuple[float, float]:
        """(saved, transient) bytes per token on one of `tp` tensor-parallel ranks (Korthikanti et al. 2022):
        what lives inside the parallel regions (heads, MLP columns) is split; the norms and the residual
        stream only with sequence parallel; the regions' inputs never (each rank multiplies the whole input,
        all-gathered under sequence parallel)."""
        if tp == 1:
            return self.saved.total, self.transient
        outer = tp if sp else 1
        saved = sum(n / (1 if _region_input(label) else outer if _outside(label) else tp)
                    for label, n in self.saved.terms)
        return saved, self.transient_residual / outer + (self.transient - self.transient_residual) / tp


def _region_input(label: str) -> bool:
    """A norm's output as the matmuls of a tensor-parallel region keep it, or a LoRA adapter's term."""
    return label.startswith(("attn_norm output", "mlp_norm output")) or "LoRA" in label


def _outside(label: str) -> bool:
    """A norm's saved tensors or a residual dropout mask: split by sequence under sequence parallel."""
    return label.startswith(("attn_norm", "mlp_norm", "attn_out_norm", "mlp_out_norm")) or "residual" in label


def _block_saved(block: nn.Module, cfg: ModelConfig, t: _Dtypes, grad_in: bool, lora_dropout: float,
                 rope: bool, seq_len: int) -> _BlockMem:
    """What one Block.forward leaves for backward, and what its backward adds on top, per token."""
    s = _Saved()
    d = cfg.dim
    attn, mlp = block.attn, block.mlp

    # attention half
    h_bytes = attn_in_bytes = _norm(s, "attn_norm", block.attn_norm, d, grad_in, t)
    _lora_hidden(s, list(attn.modules()), t)
    if isinstance(attn, GatedDeltaNet):
        first, attn_grad, attn_peak = _linear_saved(s, attn, h_bytes, t, lora_dropout, grad_in, seq_len)
    elif isinstance(attn, ShortConv):
        first, attn_grad, attn_peak = _short_conv_saved(s, attn, h_bytes, t, lora_dropout, grad_in, seq_len)
    elif isinstance(attn, Mamba2):
        first, attn_grad, attn_peak = _mamba2_saved(s, attn, h_bytes, t, lora_dropout, grad_in, seq_len)
    elif isinstance(attn, Mamba):
        first, attn_grad, attn_peak = _mamba_saved(s, attn, h_bytes, t, lora_dropout, grad_in, seq_len)
    else:
        # (a layer without positions, NoPE, keeps no rotated copies; a window shorter than the sequence takes a mask)
        rotates, window = getattr(block, "rotates", rope), getattr(block, "window", None)
        first, attn_grad, attn_peak = _attention_saved(s, attn, cfg, h_bytes, t, lora_dropout, grad_in, rotates,
                                                       seq_len, window is not None and window < seq_len)
    if attn_grad and cfg.dropout > 0:
        s.add("attention residual dropout mask", t.mask(t.a) * d)
    if block.attn_out_norm is not None:  # Gemma 3: the output normalised before it joins the residual stream
        _norm(s, "attn_out_norm", block.attn_out_norm, d, attn_grad, t, in_bytes=t.a)
        attn_grad = attn_grad or _wants_grad(block.attn_out_norm)
    grad_mid = grad_in or attn_grad
    attn_half = s.total

    # MLP half. A parallel block's MLP reads attention's input (attn_norm's output, kept once; GPT-NeoX's: its own norm
    # of the block's input, kept once), which needs a gradient only where the block's input does, whatever attention's
    # adapters need.
    h_bytes, mlp_grad_in, source = attn_in_bytes, grad_in, "attn_norm output"
    if block.mlp_norm is not None:
        grad = grad_in if block.parallel else grad_mid
        h_bytes = _norm(s, "mlp_norm", block.mlp_norm, d, grad, t, input_kept=block.parallel and block.attn_norm
                        is not None)
        mlp_grad_in, source = grad, "mlp_norm output"
    if mlp is None:  # the mixer alone (Nemotron-H)
        mlp_grad, hidden = False, 0.0
    elif isinstance(mlp, MoE):
        mlp_grad, hidden = _experts_saved(s, mlp, d, h_bytes, t, lora_dropout, mlp_grad_in, source)
    else:
        mlp_grad, hidden = _mlp_saved(s, "", mlp, h_bytes, t, lora_dropout, mlp_grad_in, source=source)
    if mlp_grad and cfg.dropout > 0:
        s.add("MLP residual dropout mask", t.mask(t.a) * d)
    out_norm_bytes = 0.0  # what the MLP's output norm keeps: its backward, the first of the block's, frees it
    if block.mlp_out_norm is not None:
        before = s.total
        _norm(s, "mlp_out_norm", block.mlp_out_norm, d, mlp_grad, t, in_bytes=t.a)
        out_norm_bytes = s.total - before
        mlp_grad = mlp_grad or _wants_grad(block.mlp_out_norm)
    if block.per_layer_gate is not None:  # Gemma 4 E2B: the per-layer input gated by the stream, projected, normalised
        width, grad = block.per_layer_gate.out_features, grad_mid or mlp_grad
        _readers(s, "per-layer gate input", [block.per_layer_gate], t.r, t, lora_dropout, grad)
        if grad or _wants_grad(block.per_layer_gate) or _wants_grad(block.per_layer_out):
            s.add("per-layer gate's activation input and output (a product's operand)", 2 * t.a * width)
        _readers(s, "per-layer product", [block.per_layer_out], 4, t, lora_dropout, grad)
        _norm(s, "per_layer_out_norm", block.per_layer_out_norm, d, grad or _wants_grad(block.per_layer_out), t,
              in_bytes=t.a)
    # The peak of its backward is in the MLP: the gradient of the residual stream coming down and of
    # the hidden (`_mlp_saved`'s), while down_proj's saved input has just been freed (measured on a recomputed block).
    transient = t.r * d + hidden if (mlp_grad or grad_mid) else 0
    # The saved set holds the block's input itself when its first norm kept it uncast.
    # (Without a first norm, OLMo 2's, q, k and v keep the input itself where they keep it uncast.)
    shares_input = (grad_in and (t.r == 4 or (isinstance(block.attn_norm, nn.LayerNorm) and t.norm_out() == t.r))
                    if block.attn_norm is not None else t.r == t.a and any(_keeps_input(m) for m in first))
    # When it peaks, the output norm's saved tensors are freed already: taken off the transient, from its part
    # that is split by sequence alone under tensor parallel, as they are.
    freed = out_norm_bytes if transient else 0.0
    # It may peak in the attention half instead (SDPA's math kernel: its T x T gradients; linear attention: its
    # chunks' gradients), the MLP half's saved tensors freed by then.
    if attn_peak:
        transient = max(transient, t.r * d + attn_peak - (s.total - attn_half - freed))
    return _BlockMem(s, grad_mid or mlp_grad, transient - freed, shares_input, (t.r * d if transient else 0.0) - freed)


def _attention_saved(s: _Saved, attn: Attention, cfg: ModelConfig, h_bytes: int, t: _Dtypes, lora_dropout: float,
                     grad_in: bool, rope: bool, seq_len: int, masked: bool = False
                     ) -> tuple[list[nn.Module], bool, float]:
    """What softmax attention (`Attention`, `LatentAttention`) keeps per token, from its normalised input (`h_bytes`
    per element) to o_proj's input; `rope`: whether it rotates; `masked`: whether its window takes a mask. Returns
    (the layers reading its input, whether its output needs a gradient, the bytes per token its backward makes at
    once beyond them: a math kernel's T x T gradients, else 0)."""
    gated = getattr(attn, "output_gate", False)
    if isinstance(attn, LatentAttention):
        first, attn_grad, (q_out, k_out, v_out) = _latent_saved(s, attn, h_bytes, t, lora_dropout, grad_in)
    else:
        first = [m for m in (attn.q_proj, attn.k_proj, attn.v_proj) if m is not None]  # Gemma 4's global: no v_proj
        _readers(s, "attn_norm output", first, h_bytes, t, lora_dropout, grad_in)
        attn_grad = grad_in or any(_wants_grad(m) for m in first)
        # With an output gate q_proj makes each head's gates beside its queries; both are split off as copies,
        # the queries going on as q does.
        # (a layer taking another's keys and values, Gemma 4 E2B's, reads that layer's: its SDPA keeps them too)
        q_out, kv_out = attn.q_proj.out_features // (2 if gated else 1), attn.n_kv_heads * attn.head_dim
        k_out = v_out = kv_out
        if attn.q_norm is not None:  # Qwen3: normalised per head (OLMo 2: all heads at once), in float32, before RoPE
            heads = (1, 1) if attn.qk_norm_whole else (q_out // attn.head_dim, kv_out // attn.head_dim)
            _norm(s, "q_norm", attn.q_norm, q_out, attn_grad, t, rows=heads[0], in_bytes=t.a)
            _norm(s, "k_norm", attn.k_norm, kv_out, attn_grad, t, rows=heads[1], in_bytes=t.a)
        if attn.value_norm_eps is not None and attn_grad:  # Gemma 4: rms_norm(v.float()) keeps its input and rstd
            s.add("value norm input (float32) and rstd", 4 * (kv_out + kv_out // attn.head_dim))
        if attn.qkv_clip is not None and attn_grad:  # OLMo: each clamp keeps its input for the mask of its gradient
            s.add("q, k, v before their clamps", t.a * (q_out + k_out + v_out))
        if attn.qk_l2_eps is not None and rope and attn_grad:  # Llama 4: rms_norm(q.float()) after RoPE keeps its
            # float32 input and an rstd per head
            s.add("rotated q and k (float32) and rstd, for their norms",
                  4 * (q_out + k_out) * (1 + 1 / attn.head_dim))
    o_in = attn.o_proj.in_features  # the values' width over every query head: the attention output's
    scores_grad = 0  # per token, the T x T gradients a math-kernel backward makes at once (below)
    fused = False  # whether SDPA keeps its output, o_proj's input (the written-out and math paths leave it to o_proj)
    if attn_grad and (cfg.attn_softcap or cfg.attn_sinks) and not (t.cuda and cfg.dropout == 0):
        # Capped scores (Gemma 2) or sinks (GPT-OSS) without FlexAttention (a CPU; dropout): `_written_attention`
        # keeps q (its grouped copy), k, v and, per head, T x T: the scores, the float32 probabilities and their
        # cast (with dropout its mask and the dropped ones).
        s.add("q, k, v" + (" (after RoPE)" if rope else ""), t.a * (q_out + k_out + v_out))
        per_score = ((t.a if cfg.attn_softcap else 0) + 4 + (t.a if t.a != 4 else 0)  # capped ones; probabilities
                     + (1 + t.a if cfg.dropout > 0 else 0))
        s.add("capped scores and probabilities (T x T per head)", seq_len * cfg.n_heads * per_score)
    elif attn_grad and not t.cuda and (cfg.dropout > 0 or o_in != q_out):
        # A CPU has no fused kernel with attention dropout, nor for values of another width than the keys
        # (latent attention's): SDPA's math path (in float32 on a CPU, whatever the inputs) keeps the scaled q and k
        # and v (k and v repeated to every query head under GQA) and the T x T probabilities per head (with dropout
        # the mask and the dropped ones too). Its backward holds the probabilities' and the scores' gradients
        # (float32, T x T per head) at once.
        s.add("scaled q, k, v (math kernel, float32)", 4 * (2 * q_out + o_in))
        s.add("attention probabilities" + (", mask, dropped" if cfg.dropout > 0 else "") + " (T x T per head)",
              seq_len * cfg.n_heads * 4 * (3 if cfg.dropout > 0 else 1))
        scores_grad = 2 * 4 * seq_len * cfg.n_heads
    elif attn_grad:
        # SDPA (flash / memory-efficient) keeps q, k, v (after RoPE: new tensors, cast to the compute
        # dtype; latent attention's v, a view, keeps kv_b_proj's whole output), its output and a float32
        # log-sum-exp per head and query. The output, viewed as (B, T, H*Dv), is also o_proj's input: one tensor.
        s.add("q, k, v" + (" (after RoPE)" if rope else ""), t.a * (q_out + k_out + v_out))
        if masked and q_out > k_out and not t.cuda:  # a mask beside grouped kv heads: each kv head's
            # queries folded into one axis, a copy (`Attention.attend`); the mask itself is per forward, not counted
            s.add("grouped queries (beside a window's mask)", t.a * q_out)
        s.add("attention output", t.a * o_in)
        s.add("log-sum-exp", 4 * cfg.n_heads)
        fused = True
    if gated and attn_grad:
        # Gated attention (Qwen3-Next): y * sigmoid(gate) keeps the attention output (SDPA's own, where it keeps
        # it) and the sigmoid (sigmoid's backward needs its output too), and o_proj reads the product: a new tensor.
        s.add("attention output (for the gate's gradient)", 0 if fused else t.a * o_in)
        s.add("sigmoid(gate)", t.a * o_in)
        fused = False
    _readers(s, "gated attention output" if gated else "attention output",
             [attn.o_proj] if not fused or lora_dropout > 0 else [], t.a, t, lora_dropout, attn_grad)
    return first, attn_grad or _wants_grad(attn.o_proj), scores_grad


_CHUNK = inspect.signature(gated_delta_rule).parameters["chunk"].default
"""Tokens per chunk of the gated delta rule in training (its C x C matrices per head)."""


def _conv_input(s: _Saved, conv: nn.Conv1d, t: _Dtypes, seq_len: int) -> None:
    """A linear layer's causal convolution keeps its input where its weight trains (`causal_conv`: each tap multiplies
    a shifted window of the inputs by its weight): whole, with the K - 1 zeros before it, in fp32; a float32 copy per
    tap under autocast."""
    if conv.weight.requires_grad:
        channels, taps = conv.weight.shape[0], conv.weight.shape[-1]
        s.add("convolution input" + (" (float32, K - 1 zeros before)" if t.a == 4 else f" (a float32 copy per tap, {taps})"),
              4 * channels * ((seq_len + taps - 1) / seq_len if t.a == 4 else taps))


def _short_conv_saved(s: _Saved, attn: ShortConv, h_bytes: int, t: _Dtypes, lora_dropout: float, grad_in: bool,
                      seq_len: int) -> tuple[list[nn.Module], bool, float]:
    """What a short convolution layer (LFM2's `ShortConv`) keeps per token, from its normalised input (`h_bytes` per
    element) to out_proj's input; returns what `_attention_saved` does (its backward adds nothing beyond them).

    in_proj's input; b and x, each the other's factor, where in_proj's output needs a gradient; the convolution's input
    where its weight trains (whole with the K - 1 inputs before it in fp32, a float32 copy per tap under autocast, as
    Gated DeltaNet's convolution keeps it); c and the convolution's output, each the other's factor; out_proj's
    input."""
    d, a = attn.conv.weight.shape[0], t.a
    _readers(s, "attn_norm output", [attn.in_proj], h_bytes, t, lora_dropout, grad_in)
    gates = grad_in or _wants_grad(attn.in_proj)  # b, c, x need gradients
    conv = attn.conv.weight.requires_grad
    s.add("b, x (each the other's factor)", 2 * a * d if gates else 0)
    _conv_input(s, attn.conv, t, seq_len)
    s.add("c (the convolution output's factor)", a * d if gates or conv else 0)
    s.add("convolution output (c's factor)", a * d if gates else 0)
    _readers(s, "gated output", [attn.out_proj], a, t, lora_dropout, gates or conv)
    return [attn.in_proj], gates or conv or _wants_grad(attn.out_proj), 0.0


def _mamba2_saved(s: _Saved, attn: Mamba2, h_bytes: int, t: _Dtypes, lora_dropout: float, grad_in: bool,
                  seq_len: int) -> tuple[list[nn.Module], bool, float]:
    """What a Mamba 2 layer (`Mamba2`) keeps per token, from its normalised input (`h_bytes` per element) to out_proj's
    input; returns what `_attention_saved` does, its backward's extra bytes those of the chunked rule.

    in_proj's input; the convolution's input where its weight trains (as Gated DeltaNet's) and SiLU's input; the
    softplus input and the step dt (float32); the rule without its correction (`gated_delta_rule(delta=False)`): per
    head and chunk of C tokens the decay (C x C, float32), per group the C x B^T products (B and C serve their group's
    heads unrepeated), the written values, each matmul operand (cast under autocast) and the state each chunk enters
    with; the values x (in fp32 a view: SiLU's whole output stays); the gated norm's inputs (float32: the output, z,
    SiLU(z), their product and its rstd), and in fp32 z is a view of in_proj's output, which stays whole."""
    H, G, N, P = attn.n_heads, attn.n_groups, attn.d_state, attn.d_head
    inner, a = H * P, t.a
    width = inner + 2 * G * N  # the convolution's channels: x, B, C
    _readers(s, "attn_norm output", [attn.in_proj], h_bytes, t, lora_dropout, grad_in)
    proj = grad_in or _wants_grad(attn.in_proj)  # in_proj's output needs a gradient
    conv = attn.conv1d.weight.requires_grad
    _conv_input(s, attn.conv1d, t, seq_len)
    xbc = proj or conv or attn.conv1d.bias.requires_grad  # x, B, C need gradients
    s.add("convolution output (SiLU input)", a * width if xbc else 0)
    dt = proj or attn.dt_bias.requires_grad  # the step needs a gradient
    s.add("softplus input", a * H if dt else 0)
    rule = xbc or dt or attn.A_log.requires_grad
    if rule:
        s.add("step dt (float32)", 4 * H)
    C = min(_CHUNK, seq_len)
    chunks = -(-seq_len // C)
    pad = chunks * C / seq_len
    if rule:  # a matmul operand is kept as a copy (its batched layout), in the compute dtype under autocast
        s.add("rule: B, C as the C B^T product's operands (per group)", pad * 2 * a * G * N)
        s.add(f"rule: decay (C x C per head, C={C}, float32), C B^T products (per group)", pad * (4 * H + a * G) * C)
        s.add("rule: the decays' exponentials, the written values (float32)", pad * 4 * (4 * H + inner))
    # per chunk: the intra-chunk attention, the written values, their decayed copy and the state's read (per head),
    # B and C as the reads' and writes' operands (per group), the state itself and its operand copy
    loop = pad * (a * H * C + 3 * a * inner + 2 * a * G * N + (4 + a) * H * N * P / C)
    if rule:
        s.add("chunk loop: intra-chunk attention, written values (three times), B and C, the state entering each "
              "chunk (twice)", loop)
    after_rule = s.total  # what the layer keeps after the rule is freed before the rule's backward
    s.add("values x" + (" (SiLU's whole output)" if a == 4 else " (float32)"), (4 * width if a == 4 else 4 * inner)
          if rule or attn.D.requires_grad else 0)
    norm = rule or attn.D.requires_grad or attn.norm.weight.requires_grad
    z = proj
    if norm or z:
        s.add("output with D x (float32)", 4 * inner)
        s.add("SiLU(z) (float32)", 4 * inner)
        s.add("z" + (" (in_proj's whole output)" if a == 4 else " (float32)"),
              4 * (2 * inner + 2 * G * N + H) if a == 4 else 4 * inner)
        s.add("gated product (float32), rstd", 4 * (inner + G))
    s.add("normalised (float32)", 4 * inner if attn.norm.weight.requires_grad else 0)
    _readers(s, "gated output", [attn.out_proj], 4 if a == 4 else a, t, lora_dropout, norm or z)
    out_grad = norm or z or _wants_grad(attn.out_proj)
    if not rule:
        return [attn.in_proj], out_grad, 0.0
    # The rule's backward peaks in its chunk loop's gradients, stacked whole: three C x C per head (the intra-chunk
    # attention's, the decay's, and the C B^T product's before it is summed over its group's heads) and one per group
    # (that sum), B's and C's per group, and the values' twice; by then what the layer kept after the rule, and the
    # loop's own, are freed (a checkpointed block without an MLP peaks there).
    grads = pad * 4 * (H * (3 * C + 2 * P) + G * (C + 2 * N))
    return [attn.in_proj], out_grad, grads - (s.total - after_rule) - loop


def _mamba_saved(s: _Saved, attn: Mamba, h_bytes: int, t: _Dtypes, lora_dropout: float, grad_in: bool,
                 seq_len: int) -> tuple[list[nn.Module], bool, float]:
    """What a Mamba layer (`Mamba`) keeps per token, from its normalised input (`h_bytes` per element) to out_proj's
    input; returns what `_attention_saved` does, its backward's extra bytes those of the scan it recomputes.

    in_proj's input and output (z is a view of it); the convolution's input where its weight trains (as Mamba 2's) and
    SiLU's input; x_proj's input (SiLU's output, D's factor too) and its output (the step input, B and C are views of
    it); the softplus input; the scan's inputs, which its checkpoint keeps instead of its states (x, dt, B, C in
    float32: under autocast copies); then D x plus the scan's output (float32) and SiLU(z), each the other's factor, and
    out_proj's input. The scan runs in stretches of `SCAN_SEGMENT` tokens, each keeping the state it starts from and
    recomputed one at a time in the block's backward (the output's own tensors freed by then). A stretch's recompute
    keeps per token, channel and state value each step's decay and state and, for the reads of the state entering each
    chunk, their decays and products: about 16 B; its backward's gradients add per step a tensor of every chunk's
    states, 1 / L of a token's (L, the chunk, sqrt of the stretch): 24 B / L; and per token and channel the steps, both
    loops' outputs and the inputs' gradients, 23 B. Measured for chunks of 8, 16 and 32 tokens and 8 or 16 state
    values, fp32 and autocast alike within 2%. The stretches done before hold their x's and dt's gradients (float32)
    until the last, which is recomputed with all of them alive."""
    D, N, R, a = attn.inner, attn.d_state, attn.dt_rank, t.a
    _readers(s, "attn_norm output", [attn.in_proj], h_bytes, t, lora_dropout, grad_in)
    proj = grad_in or _wants_grad(attn.in_proj)  # in_proj's output needs a gradient
    conv = attn.conv1d.weight.requires_grad
    _conv_input(s, attn.conv1d, t, seq_len)
    xs = proj or conv or attn.conv1d.bias.requires_grad  # x needs a gradient
    s.add("convolution output (SiLU input)", a * D if xs else 0)
    _readers(s, "x (SiLU output)", [attn.x_proj], a, t, lora_dropout, xs)
    projected = xs or _wants_grad(attn.x_proj)  # the step input, B and C need gradients
    if attn.dt_layernorm is not None and (projected or attn.dt_layernorm.weight.requires_grad):  # Jamba's norms
        # keep their float32 inputs (copies under autocast) and rstd, and in fp32 their normalised values (their
        # weights' factors) and the normed B and C, the scan's inputs (no longer views of x_proj's output); measured
        # within 1.5% for steps of rank 4 and 64, states of 16 and 48
        w = R + 2 * N
        s.add("step, B and C norms: inputs, normalised values, rstd", (4 * w if a != 4 else 4 * w + 8 * N) + 12)
    _readers(s, "step input", [attn.dt_proj], a, t, lora_dropout, projected)
    steps = projected or _wants_grad(attn.dt_proj)
    s.add("softplus input", a * D if steps else 0)
    scan = steps or attn.A_log.requires_grad
    if scan:
        s.add("x_proj output (B, C and the step input its views)", a * (R + 2 * N))
        s.add("scan inputs: dt (float32)" + (", x, B, C (float32 copies)" if a != 4 else "")
              + ", the state entering each stretch", 4 * D + (4 * (D + 2 * N) if a != 4 else 0)
              + 4 * D * N * (-(-seq_len // linear_attention.SCAN_SEGMENT) - 1) / seq_len)
    if not _wants_grad(attn.x_proj) and not scan and (xs or attn.D.requires_grad):
        s.add("x (D's factor)", a * D)
    out = scan or xs or attn.D.requires_grad
    if out or proj:
        s.add("scan output plus D x (float32), SiLU(z)", 4 * D + a * D)
    if proj:
        s.add("in_proj output (z a view of it)", 2 * a * D)
    _readers(s, "gated output", [attn.out_proj], a, t, lora_dropout, out or proj)
    out_grad = out or proj or _wants_grad(attn.out_proj)
    if not scan:
        return [attn.in_proj], out_grad, 0.0
    stretch = min(seq_len, linear_attention.SCAN_SEGMENT)
    recompute = (16 * D * N * (1 + 1.5 / math.isqrt(stretch)) + 23 * D) * stretch / seq_len + 8 * D * (
        1 - stretch / seq_len)
    freed = a * D + (4 * D + a * D if out or proj else 0) + (2 * a * D if proj else 0)
    return [attn.in_proj], out_grad, recompute - freed


def _linear_saved(s: _Saved, attn: GatedDeltaNet, h_bytes: int, t: _Dtypes, lora_dropout: float, grad_in: bool,
                  seq_len: int) -> tuple[list[nn.Module], bool, float]:
    """What a Gated DeltaNet layer (`model/linear_attention.py`) keeps per token, from its normalised input (`h_bytes`
    per element) to out_proj's input; returns what `_attention_saved` does, its backward's extra bytes those of the
    chunked rule.

    Walked op by op and measured. Before the rule: the four projections' inputs; the convolution's input where its
    weight trains (whole, with the K - 1 zeros before it, in fp32; a float32 copy per tap under autocast) and SiLU's;
    q, k, v in float32 (views of SiLU's output in fp32, copies under autocast) and the L2 norms' rstd; beta's sigmoid
    and the decay's softplus. The chunked rule (chunks of C = 64 tokens) keeps per value head and chunk C x C float32
    matrices, the decay and the system it solves, and in the compute dtype (autocast runs `@`, not the solves) the two
    q k^T products and the intra-chunk attention as the chunk loop reads it: (8 + 3a) C bytes per token and value
    head, where a softmax layer keeps nothing that grows with the sequence. Beside them its per-token vectors (q, k,
    k * beta, the solves' results, the decays' exponentials), each matmul operand again (cast under autocast; in fp32
    copied, the keys and queries being transposed views) and the state each chunk enters with (float32 Dk x Dv per
    head, and its casts). After it, GatedRMSNorm's float32 input and rstd, SiLU(z)'s float32 input and output and the
    gated product's factors; out_proj reads the product. A tensor is kept for the gradients it serves: q, k, v's
    (an adapter on in_proj_qkv), beta's, or the decay's."""
    (n_k, H), (dk, dv) = (attn.n_k, attn.n_v), (attn.d_k, attn.d_v)
    value, a = H * dv, t.a
    width = 2 * n_k * dk + value  # the convolution's channels: q, k, v
    first = [attn.in_proj_qkv, attn.in_proj_z, attn.in_proj_b, attn.in_proj_a]
    _readers(s, "attn_norm output", first, h_bytes, t, lora_dropout, grad_in)
    _conv_input(s, attn.conv1d, t, seq_len)
    qkv = grad_in or _wants_grad(attn.in_proj_qkv) or attn.conv1d.weight.requires_grad  # q, k, v need gradients
    if qkv:
        s.add("convolution output (SiLU input)", a * width)
        s.add("q, k, v (float32)", 4 * width)
        s.add("q, k L2 norms' rstd", 2 * 4 * n_k)
    beta = grad_in or _wants_grad(attn.in_proj_b)
    s.add("beta (sigmoid output)", a * H if beta else 0)
    softplus = grad_in or _wants_grad(attn.in_proj_a) or attn.dt_bias.requires_grad
    s.add("softplus input (float32)", 4 * H if softplus else 0)
    s.add("softplus output (float32)", 4 * H if attn.A_log.requires_grad else 0)
    decay = softplus or attn.A_log.requires_grad  # the decay's log needs a gradient
    rule = qkv or beta or decay
    C = min(_CHUNK, seq_len)
    chunks = -(-seq_len // C)
    pad = chunks * C / seq_len  # the last chunk is padded with zero tokens
    # The chunk loop's, per token in all: the intra-chunk attention (one float32 tensor in fp32, a cast per chunk under
    # autocast); the corrected values and write's operand; the rest (read's and w's operands, the states).
    attend = pad * a * H * C
    used = pad * ((2 if a != 4 else 1) * a * H * dv + a * H * dk)
    rest = pad * ((chunks - 1) / chunks * (2 if a != 4 else 1) * a * H * dk
                  + (4 + (2 * a if a != 4 else 0)) * H * dk * dv / C)
    if rule:
        s.add(f"rule: decay, system (C x C per value head, C={C}, float32)", pad * 2 * 4 * H * C)
        s.add("rule: q k^T products before the decay (C x C per value head)", pad * 2 * a * H * C if decay else 0)
        s.add("rule: w, u (float32)", pad * 4 * H * (dk + dv))
        s.add("rule: q, k * beta, the decays' exponentials (float32)", pad * 4 * H * (2 * dk + 3) if decay else 0)
        s.add("rule: k (float32)", pad * 4 * H * dk if beta or decay else 0)
        s.add("rule: beta's float32 copy", pad * 4 * H if qkv and a != 4 else 0)
        s.add("rule: q k^T products' operands (copies, or casts under autocast), decays by chunk (float32)",
              pad * (4 * a * H * dk + 3 * 4 * H) if qkv else 0)
        s.add("chunk loop: intra-chunk attention (C x C per value head)", attend)
        s.add("chunk loop: corrected values, write's operand" + (" (casts)" if a != 4 else ""), used)
        s.add("chunk loop: read's" + (" and w's operands" if a != 4 else " operand") + " after the first chunk, "
              "the state entering each chunk (float32" + (", and two casts)" if a != 4 else ")"), rest)
    after_rule = s.total  # what the layer keeps after the rule is freed before the rule's backward
    s.add("GatedRMSNorm input (float32), rstd", 4 * (value + H) if rule else 0)
    s.add("GatedRMSNorm normalised", h_bytes * value if attn.norm.weight.requires_grad else 0)
    norm = rule or attn.norm.weight.requires_grad
    z = grad_in or _wants_grad(attn.in_proj_z)
    if z:
        s.add("z (SiLU input, float32)", 4 * value)
        s.add("normalised * weight (for the gate's gradient)", max(t.r, h_bytes) * value)
    s.add("SiLU(z) (float32)", 4 * value if norm else 0)
    _readers(s, "gated output", [attn.out_proj], h_bytes, t, lora_dropout, norm or z)
    out_grad = norm or z or _wants_grad(attn.out_proj)
    if not rule:
        return first, out_grad, 0.0
    # The rule's backward peaks after its chunk loop's: the chunks' gradients of their slices of the intra-chunk
    # attention, read, write, w and u (float32) are stacked whole once the first chunk's are in, and the attention's
    # product with the decay makes two more C x C gradients beside its own: three C x C per value head at once, and
    # beside them the stacked ones of the keys' width, the outputs' and the values', and what in_proj_z gave its input
    # (measured op by op in fp32; under autocast, where other casts peak first, within 6% of a block, above or below).
    # By then what the layer kept after the rule is freed, and all the loop's.
    grads = (pad * 4 * H * (3 * C + 3 * dk + 2 * dv + dv / chunks)
             + (h_bytes * attn.in_proj_z.in_features if grad_in else 0))
    loop = used + rest + attend
    return first, out_grad, grads - (s.total - after_rule) - loop


def _latent_saved(s: _Saved, attn: LatentAttention, in_bytes: int, t: _Dtypes, lora_dropout: float,
                  grad_in: bool) -> tuple[list[nn.Module], bool, tuple[int, int, int]]:
    """What `LatentAttention.project` keeps per token (DeepSeek-V2/V3): the inputs of the layers reading the
    block's normalised input, and each latent's RMSNorm and the input of the layer that expands it per head. The
    rotation, the splits and the concatenations keep nothing. Returns (those first layers, whether q, k or v needs a
    gradient, the widths of q, k and v as SDPA keeps them: its v is a view of kv_b_proj's output, which stays whole)."""
    plain_q = getattr(attn, "q_proj", None)  # without q_lora_rank
    first = [attn.q_a_proj if plain_q is None else plain_q, attn.kv_a_proj_with_mqa]
    _readers(s, "attn_norm output", first, in_bytes, t, lora_dropout, grad_in)
    q_grad = grad_in or _wants_grad(first[0])
    if plain_q is None:
        q_grad = _latent(s, "q_a_layernorm", attn.q_a_layernorm, attn.q_b_proj, q_grad, t, lora_dropout)
    kv_grad = grad_in or _wants_grad(attn.kv_a_proj_with_mqa)
    if kv_grad and t.a == 4:  # in float32 the norm keeps the latent itself, a view: its rotated columns stay too
        s.add("kv_a_proj_with_mqa output's rotated part (viewed by the latent)", 4 * attn.rope_dim)
    kv_grad = _latent(s, "kv_a_layernorm", attn.kv_a_layernorm, attn.kv_b_proj, kv_grad, t, lora_dropout)
    width = attn.n_heads * attn.head_dim
    return first, q_grad or kv_grad, (width, width, attn.kv_b_proj.out_features)


def _latent(s: _Saved, label: str, norm: nn.Module, expand: nn.Module, grad_in: bool, t: _Dtypes,
            lora_dropout: float) -> bool:
    """A latent (a matmul's output, in the compute dtype), its RMSNorm and the layer that expands it: what they keep;
    returns whether the expansion's output needs a gradient."""
    out_bytes = _norm(s, label, norm, expand.in_features, grad_in, t, in_bytes=t.a)
    grad = grad_in or _wants_grad(norm)
    _readers(s, label + " output", [expand], out_bytes, t, lora_dropout, grad)
    return grad or _wants_grad(expand)


def _mlp_saved(s: _Saved, label: str, mlp: nn.Module, in_bytes: int, t: _Dtypes, lora_dropout: float,
               grad_in: bool, inputs: bool = True, source: str = "mlp_norm output") -> tuple[bool, float]:
    """What a dense MLP keeps per row it runs, under labels starting `label`; returns (whether its output needs a
    gradient, the bytes per row its backward holds at its peak: d(act*up), then d act and d up for a gated MLP; d
    GELU-output and d up for GELU, four for squared ReLU; less down_proj's input, freed by then). inputs=False: its
    input's copies are counted by the caller, with the other layers that read the same tensor; `source` names that
    tensor."""
    gated = getattr(mlp, "gate_proj", None) is not None  # SwiGLU / GeGLU
    readers = [mlp.gate_proj, mlp.up_proj] if gated else [mlp.up_proj]
    if inputs:
        _readers(s, label + source, readers, in_bytes, t, lora_dropout, grad_in)
    _lora_hidden(s, readers + [mlp.down_proj], t)
    f = mlp.up_proj.out_features
    up_grad = grad_in or _wants_grad(mlp.up_proj)
    down_keeps = _keeps_input(mlp.down_proj) and not (isinstance(mlp.down_proj, LoRALinear) and lora_dropout > 0)
    if gated and getattr(mlp, "limit", None) is not None:  # GPT-OSS's clamped SwiGLU: g * sigmoid(alpha g) * (u + 1)
        gate_grad = grad_in or _wants_grad(mlp.gate_proj)
        for name in ("gate pre-clamp", "clamped gate", "sigmoid(alpha * gate)", "up + 1"):
            s.add(label + name, t.a * f if gate_grad else 0)
        for name in ("up pre-clamp", "gate * sigmoid"):
            s.add(label + name, t.a * f if up_grad else 0)
        s.add(label + "clamped SwiGLU output (down_proj input)", t.a * f if down_keeps else 0)
        mlp_grad = gate_grad or up_grad
    elif gated:
        gate_grad = grad_in or _wants_grad(mlp.gate_proj)
        s.add(label + "gate pre-activation", t.a * f if gate_grad else 0)
        s.add(label + "act(gate)", t.a * f if up_grad else 0)  # the product keeps each factor for the other's gradient
        s.add(label + "up", t.a * f if gate_grad else 0)
        s.add(label + "act(gate) * up (down_proj input)", t.a * f if down_keeps else 0)
        mlp_grad = gate_grad or up_grad
    elif getattr(mlp, "act", None) is not None:  # xIELU (`_XIELUFunction`) keeps its input alone
        s.add(label + "up (xIELU input)", t.a * f if up_grad else 0)
        s.add(label + "activation output (down_proj input)", t.a * f if down_keeps else 0)
        mlp_grad = up_grad
    else:  # GELU keeps its input; squared ReLU ReLU's output (relu's and the square's backward read it)
        act = "ReLU output (the square's input)" if getattr(mlp, "relu2", False) else "up (GELU input)"
        s.add(label + act, t.a * f if up_grad else 0)
        s.add(label + "activation output (down_proj input)", t.a * f if down_keeps else 0)
        mlp_grad = up_grad
    if lora_dropout > 0:
        _readers(s, label + "MLP hidden", [mlp.down_proj], t.a, t, lora_dropout, mlp_grad)
    # Squared ReLU's backward holds two more: the square's gradient is grad * (2 * r), a temporary and its product,
    # beside the gradient coming down, before ReLU's (measured).
    held = (3 if gated else 4 if getattr(mlp, "relu2", False) else 2) * t.a
    if getattr(mlp, "act", None) is not None:  # xIELU's backward: the gradient, two temporaries and a mask, in its
        # output's dtype: float32 under autocast while its scalars train (x then copied to float32 as well)
        out = 4 if t.autocast and mlp.act.alpha_p.requires_grad else t.a
        held = 3 * out + (4 if out != t.a else 0) + 1
    return mlp_grad or _wants_grad(mlp.down_proj), (held - down_keeps * t.a) * f


def _experts_saved(s: _Saved, moe: MoE, d: int, in_bytes: int, t: _Dtypes, lora_dropout: float,
                   grad_in: bool, source: str = "mlp_norm output") -> tuple[bool, float]:
    """What `MoE.forward` keeps per token: the router's input, float32 probabilities and choices, the routing's
    int64 indices, and each expert's dense-MLP terms for the k rows a token is routed to (in total over the
    experts, however unevenly they are routed). Returns what `_mlp_saved` does, the transient per token: one
    expert's hidden gradients (backward runs the experts one at a time, each on k / n_experts of the tokens when the
    routing is balanced), and two gradients of the experts' input, since each expert's gather (`x[rows]`) returns it
    whole (zeros off its rows) to be summed into the other."""
    k, n = moe.k, len(moe.experts)
    router_grad = grad_in or _wants_grad(moe.router)
    shared, gate = moe.shared_expert, moe.shared_expert_gate
    own = moe.experts_norm is not None  # Gemma 4: the router and the experts read the raw stream, normalised apart
    shared_in = [] if shared is None else [  # (Nemotron 3's is ungated)
        m for m in (getattr(shared, "gate_proj", None), shared.up_proj) if m is not None]
    readers = ([] if own else [moe.router]) + shared_in + (
        [gate] if gate is not None else [])  # the router, the shared expert and its gate read the norm's output
    _readers(s, source, readers, in_bytes, t, lora_dropout, grad_in)
    if own:
        if moe.router_scale is not None and router_grad:  # rms_norm(x.float()), cast, times the learned scale
            s.add("router norm input (float32) and rstd", 4 * (d + 1))
            s.add("router's normalised input (for its scale's gradient)", t.a * d if moe.router_scale.requires_grad else 0)
        _readers(s, "router input", [moe.router], t.a, t, lora_dropout, router_grad)
        in_bytes = _norm(s, "experts_norm", moe.experts_norm, d, grad_in, t)
    if router_grad:
        s.add("router probabilities (float32)", 4 * n)
        s.add("chosen experts (int64)", 8 * k)
        if moe.renormalize:
            s.add("top-k weights and their sum", 4 * (k + 1))
    s.add("routing order and rows (int64)", 16 * k)
    one = _Saved()
    expert_grad, hidden = _mlp_saved(one, "experts: ", moe.experts[0], in_bytes, t, lora_dropout, grad_in)
    for label, nbytes in one.terms:
        s.add(label, k * nbytes)
    if moe.weigh_inputs:  # Llama 4: x[rows] * weight keeps the gathered rows, in the input's dtype
        s.add("experts' inputs (for the routing weights' gradient)", k * in_bytes * d if router_grad else 0)
    else:
        s.add("experts' outputs (for the routing weights' gradient)", k * t.a * d if router_grad else 0)
    s.add("routing weights (for the outputs' gradient)", 4 * k if expert_grad else 0)
    if moe.experts_out_norm is not None:
        _norm(s, "experts_out_norm", moe.experts_out_norm, d, expert_grad or router_grad, t, in_bytes=t.a)
    transient = k * hidden / n
    if shared is not None:  # every token's: a dense MLP's terms, and its gate's sigmoid * output
        shared_grad, shared_hidden = _mlp_saved(s, "shared expert: ", shared, in_bytes, t, lora_dropout, grad_in,
                                                inputs=False)
        transient = max(transient, shared_hidden)  # backward runs it before the routed experts
        gate_grad = gate is not None and (grad_in or _wants_grad(gate))
        s.add("shared expert's output (for its gate's gradient)", t.a * d if gate_grad else 0)
        s.add("sigmoid(gate) (for the shared output's gradient)", t.a if gate is not None and shared_grad else 0)
        if moe.shared_out_norm is not None:
            _norm(s, "shared_out_norm", moe.shared_out_norm, d, shared_grad, t, in_bytes=t.a)
        expert_grad = expert_grad or shared_grad or gate_grad
    return expert_grad or router_grad, transient + 2 * in_bytes * d


def _tail_saved(model: Transformer, t: _Dtypes, grad_out: bool, stage: str = "all") -> _Saved:
    """Embedding, final norm and head, per token (the logits and the loss are counted apart); a pipeline's
    "first" stage has the embedding only, its "last" the final norm and head only."""
    cfg = model.cfg
    s = _Saved()
    s.add("token ids and targets", 16)
    if model.tok_emb.weight.requires_grad and stage != "last":
        s.add("embedding indices", 8)
    if cfg.dropout > 0 and model.tok_emb.weight.requires_grad and stage != "last":
        s.add("embedding dropout mask", t.mask(t.r) * cfg.dim)
    if model.emb_norm is not None and stage != "last":  # nanochat: the embeddings normalised
        _norm(s, "embedding norm", model.emb_norm, cfg.dim, model.tok_emb.weight.requires_grad, t)
    if model.per_layer_emb is not None and stage != "last":  # Gemma 4 E2B: every layer's input, made once
        width = cfg.n_layers * cfg.per_layer_input_size
        _readers(s, "embeddings", [model.per_layer_proj], 4, t, 0.0, grad_out)
        _norm(s, "per-layer projection norm", model.per_layer_norm, width, grad_out, t, rows=cfg.n_layers,
              in_bytes=t.a)
        s.add("per-layer inputs (float32, each block's product operand)", 4 * width if grad_out else 0)
    if stage == "first":
        return s
    _norm(s, "final norm", model.norm, cfg.dim, grad_out, t)
    head_weight = model.tok_emb.weight if model.head is None else model.head.weight
    if not _plain_head(model) and head_weight.requires_grad:  # a head run as a module keeps its cast input
        s.add("final norm output (head input)", t.a * cfg.dim)
    return s


def _plain_head(model: Transformer) -> bool:
    """Whether the loss runs the output layer through the chunked `linear_cross_entropy` (train/losses.py)."""
    return model.head is None or type(model.head) is nn.Linear


def _loss_bytes(model: Transformer, t: _Dtypes, tokens: int, hidden_grad: bool, vocab: int = 0,
                gathered: bool = False) -> tuple[float, float, str]:
    """(bytes alive beside the saved activations at the loss's forward peak, and as backward starts; formula).

    The chunked loss (train/losses.py) holds the final hidden states and their copy in the compute
    dtype, the gradients it computes as it goes (hidden: tokens x d, weight: V x d in float32) and one
    chunk of n tokens: its logits, one float32 (n, V) working copy (capped logits: and the cap's float32 slope)
    and the logits' gradient; backward
    scales both gradients into new tensors. A head run as a module (e.g. LoRA on it) instead makes
    the full logits: float32 log-probabilities and two gradients per token (~12 B x V). `vocab`: the
    output layer's rows on this rank (its vocabulary slice under tensor parallel; 0: all of them);
    `gathered`: FSDP2 hands the loss the weight already in the compute dtype (no cast copy).
    """
    cfg = model.cfg
    V, d, a = vocab or cfg.vocab_size, cfg.dim, t.a
    head_weight = model.tok_emb.weight if model.head is None else model.head.weight
    h = t.norm_out() if isinstance(model.norm, nn.LayerNorm) else t.r  # the final norm's output
    if not _plain_head(model):
        return tokens * 12 * V, tokens * 12 * V, f"full logits: 12 B x V = {12 * V} B per token"
    trained = head_weight.requires_grad
    n = min(tokens, chunk_tokens(V, trained))
    w = 4 if trained and not gathered else a  # the estimate's convention: float32 master weights train, a frozen base is in a
    grad_h = tokens * d * a if hidden_grad else 0
    grad_w = 4 * V * d if trained else 0
    held = tokens * d * h + (tokens * d * a if h != a else 0) + (V * d * a if w != a else 0) + grad_h + grad_w
    # the logits or their gradient, and one float32 working copy; capped logits (Gemma 2) keep the cap's slope too
    per_logit = (4 + a if a != 4 else 4) + (4 if cfg.logit_softcap else 0)
    chunk = n * V * per_logit
    if trained:  # after a chunk: its gradient and the weight gradient's product, in a and float32
        chunk = max(chunk, n * V * a + V * d * (a + (4 if a != 4 else 0)))
    backward = grad_h + grad_w + (tokens * d * (a + (h if h != a else 0)) if hidden_grad else 0) \
        + (V * d * (4 + (w if w != 4 else 0)) if trained else 0)
    formula = f"chunked: {n} tokens x V x {per_logit} B at a time + gradients of hidden and weight"
    return held + chunk, backward, formula


# ---- the estimate -------------------------------------------------------------------------------


def human_bytes(n: float) -> str:
    """1536 -> '1.50 KiB'."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    raise AssertionError  # unreachable


def _m(n: float) -> str:
    """A parameter count for a formula: 124.48M, 8.19K."""
    return f"{n / 1e9:.3g}B" if n >= 1e9 else f"{n / 1e6:.4g}M" if n >= 1e6 else f"{n / 1e3:.4g}K" if n >= 1e3 else str(n)


def estimate(cfg: ModelConfig, run: RunShape, stage: Literal["first", "last"] | None = None) -> Estimate:
    """Bytes per rank of each component of a training run of `cfg` shaped by `run`, and the step's peak.

    Under a pipeline (parallel.pp > 1) the figures are those of the stage that peaks higher: the first
    (embeddings, the most micro-batches in flight) or the last (final norm, head and loss); `stage` asks
    for one of them (a rank of the first or the last pipeline stage)."""
    lay = _layout(run)
    if lay.tp > 1:
        from temper.train.tensor_parallel import check_tensor_parallel

        check_tensor_parallel(cfg, lay.tp)  # what training refuses is not estimated
    if lay.pp == 1:
        return _estimate_rank(cfg, run, lay, "all")
    if stage is not None:
        if stage not in ("first", "last"):
            raise ValueError(f"stage must be 'first' or 'last', got {stage!r}")
        return _estimate_rank(cfg, run, lay, stage)
    first, last = (_estimate_rank(cfg, run, lay, stage) for stage in ("first", "last"))
    est, other, names = (first, last, ("first", "last")) if first.peak >= last.peak else (last, first, ("last", "first"))
    est.notes.append(f"pipeline: the {names[0]} stage's figures; the {names[1]} stage peaks at {human_bytes(other.peak)}")
    return est


@dataclass
class _Fsdp:
    """FSDP2's gathered parameters and communication buffers at each moment of the step (bytes; module docstring)."""

    forward: float  # the last block's forward: its unit, its all-gather buffer and the previous block's
    loss: float
    block: list[float]  # each block's backward
    reduce: list[float]  # each block's reduce-scatter, as its whole gradients are copied in
    reduce_grads: list[float]  # those whole gradients (counted as gradients)
    gloo: list[float]  # gloo (a CPU) then reduces a copy of the input, the whole gradients freed: 0 elsewhere
    end: float  # the root's reduce-scatter
    end_grads: float


def _estimate_rank(cfg: ModelConfig, run: RunShape, lay: _Layout, stage: str) -> Estimate:
    """`estimate` for one rank of pipeline stage `stage` ("all" without a pipeline)."""
    blocks = -(-cfg.n_layers // lay.pp)  # this stage's blocks (the first stages take any remainder)
    whole = build_meta(cfg, run)
    model = whole if lay.pp == 1 else build_meta(replace(cfg, n_layers=blocks), run)
    compute, kept, gathered = _sizes(model, lay, stage)
    total = _count(whole)
    cg = _count(model, compute)  # what this rank computes with: its tensor-parallel slice of this stage
    c = _count(model, kept)  # what it keeps: FSDP2's shard of that
    cu = _count(model, gathered)  # what FSDP2 gathers: the slice, padded
    L, V, d = model.cfg.n_layers, -(-cfg.vocab_size // lay.tp), cfg.dim
    B, T = run.micro_batch_size, run.seq_len or cfg.max_seq_len
    tokens = B * T // lay.microbatches
    a = DTYPE_BYTES[run.precision]
    full = run.recipe in ("pretrain", "full")
    qlora = run.recipe == "qlora"
    autocast = run.precision != "fp32"
    # FSDP2's MixedPrecisionPolicy gathers every weight in the compute dtype, the embedding's included: the
    # residual stream is then in it too, and autocast has no float32 weight left to cast.
    cast_gathered = lay.fsdp and autocast
    t = _Dtypes(r=4 if full and not cast_gathered else a, a=a, autocast=autocast, cuda=run.device == "cuda")
    notes: list[str] = []
    if T > cfg.max_seq_len:
        notes.append(f"seq_len {T} exceeds the model's max_seq_len {cfg.max_seq_len}: training would refuse it")
    if cfg.dropout > 0 and run.device == "cpu":
        notes.append("dropout > 0 on a CPU: SDPA falls back to its math kernel and keeps T x T probabilities per head")
    if qlora:
        notes.append("qlora: NF4 storage is 0.516 B/param (model/quant.py measures torchao's tensors)")
    notes += _layout_notes(run, lay)
    share = _share(lay, stage, blocks, cfg.n_layers)

    # parameters, gradients and optimizer states: this rank's share
    nf4 = c.frozen_linears if qlora else 0
    if full:
        p_bytes = 4 * c.params + c.buffer_bytes
        p_formula = f"4 B x {_m(c.params)} params (float32 master weights)"
    else:
        dense = c.frozen - nf4
        p_bytes = round(NF4_BYTES * nf4 + a * dense + 4 * c.trainable) + c.buffer_bytes
        p_formula = " + ".join(
            ([f"{NF4_BYTES:.3f} B x {_m(nf4)} NF4 block weights"] if nf4 else [])
            + [f"{a} B x {_m(dense)} frozen {run.precision} weights", f"4 B x {_m(c.trainable)} float32 adapters"]
        )
    # `train.parallel.hold_frozen_embeddings_on_host`: without a device mesh, the tables it can hold on the host
    held = tables_on_host(model) if run.activation_offload and not lay.mesh else []
    table = a * sum(getattr(model, name).weight.numel() for name in held)
    if table:
        p_bytes -= table
        p_formula += f", less the lookup tables {held} ({human_bytes(table)}, held in host memory)"
    if c.buffer_bytes:
        p_formula += f" + {human_bytes(c.buffer_bytes)} RoPE tables"
    g_bytes = 4 * c.trainable
    g_formula = f"4 B x {_m(c.trainable)} trainable params (float32)"
    buckets = g_bytes if lay.ddp else 0
    if lay.ddp:
        g_bytes += buckets
        g_formula += " x 2 (DDP's gradient buckets are a second copy)"
    s_bytes = ADAMW_STATE_BYTES * c.trainable
    s_formula = f"8 B x {_m(c.trainable)} trainable params (AdamW exp_avg + exp_avg_sq, float32)"
    if run.optimizer == "muon":
        s_bytes = ADAMW_STATE_BYTES * (c.trainable - c.muon_trainable) + MUON_STATE_BYTES * c.muon_trainable
        s_formula = (f"8 B x {_m(c.trainable - c.muon_trainable)} params (AdamW exp_avg + exp_avg_sq, float32) + "
                     f"4 B x {_m(c.muon_trainable)} blocks' linear weights (Muon's momentum, float32)")
    if lay.zero1:
        s_bytes = math.ceil(s_bytes / lay.dp)
        s_formula += f" / {lay.dp} replicas (ZeRO-1)"
    if share:
        p_formula, g_formula, s_formula = (f"{f}; {share}" for f in (p_formula, g_formula, s_formula))

    # activations, per token unless said otherwise
    k = run.activation_checkpointing
    checkpointed = [k > 0 and i % k == 0 for i in range(L)]
    grad = full  # the embedding's output needs a gradient only when the embedding trains
    mems: list[_BlockMem] = []
    for block in model.layers:
        mems.append(_block_saved(block, model.cfg, t, grad, 0.0 if full else run.lora.dropout, cfg.pos == "rope", T))
        grad = mems[-1].grad_out
    tail = _tail_saved(model, t, grad, stage)
    if stage == "first":
        loss_fwd, loss_bwd, loss_formula = 0.0, 0.0, "on the last stage"
    else:
        loss_fwd, loss_bwd, loss_formula = _loss_bytes(model, t, tokens, grad, V, gathered=cast_gathered)
    split = [m.split(lay.tp, lay.sp) for m in mems]
    resid = t.r * d / (lay.tp if lay.sp else 1)  # a checkpointed block's input on this rank
    # (under activation offload a checkpointed input waits in host memory, and comes back for its block's backward)
    stored = [(0.0 if run.activation_offload else resid) if ck else sv for ck, (sv, _) in zip(checkpointed, split)]
    # A block's backward: its saved tensors (recomputed if checkpointed, beside the input the
    # checkpoint holds unless they share it) and the transient gradients.
    in_backward = [sv + tr + (resid if ck and not m.input_shared else 0)
                   for ck, m, (sv, tr) in zip(checkpointed, mems, split)]
    # Whole tensors: autocast's 2-byte weight copies, saved by every matmul of a block that is not
    # recomputed (the trained weights; lora/qlora: only the adapters, the base is already 2-byte),
    # and qlora's one dequantized weight at a time. FSDP2 gathers the weights in the compute dtype already.
    copies = autocast and not lay.fsdp
    wcopy = [a * n if copies and not ck else 0 for ck, n in zip(checkpointed, cg.autocast_block)]
    recast = [a * n if copies and ck else 0 for ck, n in zip(checkpointed, cg.autocast_block)]
    wcopy_tail = a * cg.autocast_tail if copies else 0
    dequant = a * cg.largest_frozen_linear if qlora else 0
    # A pipeline runs a step's micro-batches, each split into pp_microbatches, as one schedule of `chunks`.
    chunks = lay.microbatches * run.accumulation_steps if lay.pp > 1 else 1
    in_flight = _in_flight(replace(lay, microbatches=chunks), stage)
    held = (in_flight - 1) * tokens * sum(stored)  # the stage's other micro-batches in flight (pipeline)
    accumulating = run.accumulation_steps > 1 or lay.microbatches > 1

    # Gradients as backward makes them: each block's (during its MLP backward only down_proj's), the
    # head's and final norm's from the loss on (`g_tail`), the lookups' last (`g_late`). Under FSDP2 they
    # are made whole in the gathered dtype and only a block's float32 shard stays after its reduce-scatter.
    fsdp = None
    if lay.fsdp:
        pd = a  # the gathered dtype (fp32 runs: 4)
        # With accumulation, FSDP2 sums each unit's whole gradients in float32 until the last micro-batch's
        # reduce-scatter, which frees them: a block's backward then leaves its shard less its sum.
        summed = [4.0 * n if accumulating else 0.0 for n in cu.block_trainable]
        g_blocks = [4.0 * n - acc for n, acc in zip(c.block_trainable, summed)]
        g_down = [pd * n for n in cg.down_trainable]
        g_late = pd * cg.late_trainable
        g_tail = pd * (cg.trainable - sum(cg.block_trainable)) - g_late
        g_held = 4.0 * cu.trainable if accumulating else 0.0
        g_end = 4.0 * c.trainable
        tied_extra = 2 * pd * V * d if cg.tied_trained and stage == "all" else 0
        fsdp = _fsdp_terms(cg, cu, lay, pd, run.device == "cpu", accumulating)
    else:
        g_blocks = [4.0 * n for n in c.block_trainable]
        g_down = [4.0 * n for n in c.down_trainable]
        g_late = 4.0 * c.late_trainable
        g_tail = 4.0 * c.trainable - sum(g_blocks) - g_late
        g_held = float(buckets)
        g_end = float(g_bytes)
        tied_extra = 8 * V * d if c.tied_trained and stage == "all" else 0
    host = 0
    p_dev, s_dev = p_bytes, s_bytes
    if lay.offload:  # FSDP2's CPUOffloadPolicy: the shards live in host memory, where the optimizer steps
        host = p_bytes - c.buffer_bytes + 4 * c.trainable + s_bytes
        p_dev, s_dev, g_blocks, g_end = c.buffer_bytes, 0, [0.0] * L, g_held
    offloaded = in_flight * tokens * resid * sum(checkpointed) if run.activation_offload else 0
    host += round(offloaded) + table
    moments_at = functools.partial(  # (FSDP2's accumulation is its own: g_held and g_blocks above)
        _moments, p=p_dev, s=s_dev, g=g_end, tokens=tokens, stored=stored,
        in_backward=in_backward, wcopy=wcopy, recast=recast, wcopy_head=wcopy_tail, dequant=dequant,
        tail=tail.total, loss_forward=loss_fwd, loss_backward=loss_bwd, g_blocks=g_blocks, g_down=g_down,
        g_late=g_late, tied_extra=tied_extra, checkpointed=checkpointed, g_tail=g_tail, g_held=g_held, fsdp=fsdp)
    if lay.pp > 1:
        # The schedule's first backward makes the gradients (zero_grad left none; FSDP2 sums them whole, in
        # float32, block by block) while the warm-up's other micro-batches are in flight; the later ones add
        # into whole gradients with at most chunks - 1 in flight (1F1B's steady state and cool-down, GPipe's
        # drain): measured on gloo ranks (tests/train/test_memory_distributed.py).
        later = max(min(in_flight, chunks - 1) - 1, 0) * tokens * sum(stored)
        if lay.fsdp and chunks > 1:
            moments = moments_at(accumulating=False, held=held, g_held=0.0, g=4.0 * cu.trainable,
                                 g_blocks=[4.0 * n for n in cu.block_trainable])
        else:
            moments = moments_at(accumulating=False, held=held)
        if chunks > 1:
            moments += [(b, f"{what} (a later pipeline micro-batch)", alive) for b, what, alive in
                        moments_at(accumulating=not lay.fsdp, held=later)]
    else:
        moments = moments_at(accumulating=accumulating and not lay.fsdp, held=held)
    peak, peak_formula, alive = max(moments, key=lambda m: m[0])
    _, act_moment, act_alive = max(moments, key=lambda m: m[2]["activations"])  # the activations' own peak
    act_bytes = act_alive["activations"]
    typical = max(mems, key=lambda m: m.saved.total).saved
    wcopies = sum(wcopy) + wcopy_tail
    kinds: dict[tuple[str, float], int] = {}  # blocks by kind and saved bytes (a hybrid's, a mixture's dense first layers)
    for block, (sv, _) in zip(model.layers, split):
        key = ("linear attention " if isinstance(block.attn, GatedDeltaNet) else "Mamba 2 " if isinstance(
            block.attn, Mamba2) else "short convolution " if isinstance(block.attn, ShortConv) else "", sv)
        kinds[key] = kinds.get(key, 0) + 1
    a_formula = (
        f"B*T = {tokens} tokens x (" + " + ".join(f"{n} {kind}blocks x {human_bytes(sv)}" for (kind, sv), n in kinds.items())
        + (f" ({sum(checkpointed)} of them checkpointed: input only, {human_bytes(resid)}"
           + (", in host memory until its backward" if run.activation_offload else "") + ")" if k else "")
        + f" + tail {human_bytes(tail.total)})"
        + (f" + the loss ({loss_formula})" if stage != "first" else "")
        + (f" + autocast weight copies {a} B x {_m(wcopies / a)}" if wcopies else "")
        + (f" + one dequantized weight {human_bytes(dequant)}" if dequant else "")
        + (f" + {in_flight - 1:g} more micro-batches in flight ({lay.schedule})" if in_flight > 1 else "")
        + (f"; tensor parallel: / {lay.tp} inside attention and MLP"
           + (", and the norms and residuals (sequence parallel)" if lay.sp else "") if lay.tp > 1 else "")
        + f"; largest at: {act_moment.split(':')[0]}"
    )

    kv_token, kv_row, kv_formula = _kv_cache(cfg, L, a, lay.tp, f"B*T = {B * T}", f"B = {B}")
    kv = B * T * kv_token + B * kv_row
    # For generation the adapters merge into the weights they adapt, except into NF4 ones.
    nf4_c = cg.frozen_linears if qlora else 0
    base = cg.params - (0 if full else cg.trainable)
    weights = round(NF4_BYTES * nf4_c + a * (base - nf4_c) + (a * cg.trainable if nf4_c else 0))
    if lay.offload:
        p_formula, g_formula, s_formula = (f"in host memory (offload){'' if not b else ': ' + human_bytes(b) + ' RoPE tables on the device'}"
                                           for b in (c.buffer_bytes, 0, 0))
    components = [
        Component("parameters", p_dev, p_formula),
        Component("gradients", 0 if lay.offload else g_bytes, g_formula),
        Component("optimizer states", s_dev, s_formula),
        Component("activations", int(act_bytes), a_formula),
        Component("KV cache (generation)", kv, kv_formula),
    ]
    at_peak = {"parameters": p_dev, "gradients": int(alive["gradients"]), "optimizer states": s_dev,
               "activations": int(alive["activations"])}
    if fsdp is not None:
        most = max(m[2]["gathered"] for m in moments)
        components.append(Component("gathered (FSDP2)", int(most), _fsdp_formula(lay, cu, a, run.device == "cpu")))
        at_peak["gathered"] = int(alive["gathered"])
    if host:
        held_there = ([f"this rank's shards of parameters, gradients and optimizer states ({share})"] if lay.offload else [])
        if offloaded:
            held_there.append(f"the checkpointed inputs: {sum(checkpointed)} x B*T = {tokens} x {human_bytes(resid)}"
                              + (f" x {in_flight:g} micro-batches in flight" if in_flight > 1 else "")
                              + " (activation offload)")
        if table:
            held_there.append(f"the frozen token embedding: {a} B x {V} x {d}")
        components.append(Component("host memory (CPU offload)", host, "; ".join(held_there)
                                    + "; the other rows are on the device"))
    return Estimate(
        components=components, peak=int(peak), peak_formula=peak_formula, at_peak=at_peak,
        block_terms=typical.terms, params=total.params, trainable=total.trainable, notes=notes,
        inference=weights + kv, host=host,
    )


def _fsdp_terms(cg: _Counts, cu: _Counts, lay: _Layout, pd: int, cpu: bool, accumulating: bool) -> _Fsdp:
    """FSDP2's gathered parameters and communication buffers at each moment (module docstring), from the
    gathered (padded) counts `cu` in the gathered dtype `pd`, and its whole gradients from `cg` (summed in
    float32 under accumulation, where they are counted already)."""
    L = len(cu.block_trainable)
    unit, root = pd * cu.block_params, pd * cu.embedding_unit
    rs = [4.0 * n for n in cu.block_trainable]  # float32 reduce-scatter inputs of the trained parameters
    keep = [rs[i + 1] if i + 1 < L else 0.0 for i in range(L)]  # the block above's, kept
    root_rs = 4.0 * (cu.trainable - sum(cu.block_trainable))
    if lay.reshard:
        forward, loss = root + 3 * unit, root
        block = [root + unit + (unit if i else 0) + keep[i] for i in range(L)]
        reduce = [root + (unit if i else 0) + rs[i] for i in range(L)]  # its own unit resharded first
    else:  # ZeRO-2: every unit stays gathered from its forward to its backward
        forward, loss = root + (L + 2) * unit, root + L * unit
        block = [root + (i + 1) * unit + keep[i] for i in range(L)]
        reduce = [root + i * unit + rs[i] for i in range(L)]
    return _Fsdp(forward=forward, loss=loss, block=block, reduce=reduce,
                 reduce_grads=[0.0 if accumulating else pd * n for n in cg.block_trainable],
                 gloo=[r if cpu else 0.0 for r in rs], end=root_rs * (2 if cpu else 1),
                 end_grads=(4 if accumulating else pd) * (cg.trainable - sum(cg.block_trainable)))


def _fsdp_formula(lay: _Layout, cu: _Counts, pd: int, cpu: bool) -> str:
    unit, root = human_bytes(pd * cu.block_params), human_bytes(pd * cu.embedding_unit)
    gathered = ("the root unit (embeddings, final norm, head) " + root + " throughout, "
                + ("a block's unit " + unit + " for its forward and backward (3 at once at an all-gather, 2 in "
                   "backward with the next one prefetched)" if lay.reshard else
                   "every block's unit " + unit + " from its forward to its backward (reshard_after_forward off)"))
    return (f"largest of: {gathered}, in {pd} B; plus a block's float32 reduce-scatter input, kept until the "
            "next block's" + (" (and gloo's copy of it)" if cpu else "") + "; transient, not in the rows above")


def _share(lay: _Layout, stage: str, blocks: int, n_layers: int) -> str:
    """What part of the model one rank holds, in words ('' for all of it)."""
    parts = []
    if lay.pp > 1:
        held = {"first": "+ the embeddings", "last": "+ the final norm and head"}[stage]
        parts.append(f"pipeline {stage} stage: {blocks} of {n_layers} blocks {held}")
    if lay.tp > 1:
        parts.append(f"tensor parallel: 1/{lay.tp} of the block matrices and vocabulary rows")
    if lay.fsdp:
        parts.append(f"FSDP2: a 1/{lay.shard} shard (dim 0 padded to a multiple of {lay.shard})")
    return "this rank: " + ", ".join(parts) if parts else ""


def _in_flight(lay: _Layout, stage: str) -> float:
    """Micro-batches whose activations of this stage's blocks are alive at once (pipeline schedules' warm-up:
    GPipe runs every forward first; 1F1B at most pp - rank before its first backward; Interleaved1F1B, two
    stages of half the blocks per rank, 2 (pp - 1 - rank) + pp forwards of a half, plus one)."""
    if lay.pp == 1:
        return 1.0
    rank = 0 if stage == "first" else lay.pp - 1
    if lay.schedule == "GPipe":
        return float(lay.microbatches)
    if lay.schedule == "Interleaved1F1B":
        return min(2 * (lay.pp - 1 - rank) + lay.pp + 1, 2 * lay.microbatches) / 2
    return float(min(lay.pp - rank, lay.microbatches))


def _layout_notes(run: RunShape, lay: _Layout) -> list[str]:
    par, notes = run.parallel, []
    if par.offload and not lay.fsdp:
        notes.append("parallel.offload moves FSDP2's shards to host memory: without FSDP2 (dp_shard > 1, or a mesh "
                     "with several data-parallel ranks) training ignores it, and so does this estimate")
    if par.zero1 and not lay.zero1:
        notes.append("parallel.zero1 shards optimizer states over DDP replicas only: ignored here")
    if lay.pp > 1 and lay.schedule != "1F1B":
        notes.append(f"pipeline terms for pp_schedule={lay.schedule} (micro-batches in flight from its warm-up) are "
                     "formulas; 1F1B is checked against a measured step")
    if lay.offload or run.activation_offload:
        notes.append("CPU offload: the device/host split is a formula (a CPU-only measurement cannot tell them apart)")
    if lay.fsdp and run.recipe == "qlora":
        notes.append("qlora under FSDP2: NF4 weights are counted as sharded and gathered like dense ones")
    return notes


def _moments(*, p: float, s: float, g: float, accumulating: bool, tokens: int, stored: list[float],
             in_backward: list[float], wcopy: list[float], recast: list[float], wcopy_head: float, dequant: float,
             tail: float, loss_forward: float, loss_backward: float, g_blocks: list[float], g_down: list[float],
             g_late: float, tied_extra: float, checkpointed: list[bool], g_tail: float, g_held: float = 0.0,
             held: float = 0.0, fsdp: _Fsdp | None = None) -> list[tuple[float, str, dict[str, float]]]:
    """The step's candidate peaks (module docstring): (bytes, what it is, {gradients, activations, gathered}).

    p, s, g: parameters, optimizer states, gradients (bytes; g as backward ends); per token: stored (each
    block's saved tensors, its input if checkpointed), in_backward (each block's saved and transient tensors
    during its backward), tail; whole bytes: loss_forward / loss_backward (the loss's own tensors at
    its forward peak and as backward starts, `_loss_bytes`), wcopy / recast (autocast weight copies of a block kept / recomputed),
    wcopy_head, dequant (qlora), g_blocks / g_down (a block's gradients as kept / its down_proj's as made),
    g_tail (the head's and final norm's, from the loss on), g_late (the lookups' gradients, made last),
    tied_extra (the tied embedding's two contributions), g_held (gradient bytes alive throughout: DDP's
    buckets, FSDP2's accumulators), held (activations alive throughout: other micro-batches in flight),
    fsdp (FSDP2's gathered parameters and buffers).
    """
    g_before = g if accumulating else g_held  # earlier micro-batches' gradients, alive through this one
    f = fsdp or _Fsdp(0.0, 0.0, *([[0.0] * len(stored)] * 4), 0.0, 0.0)
    out = []
    saved = tokens * (sum(stored) + tail) + sum(wcopy) + wcopy_head + dequant + held
    if fsdp is not None:  # the last block's forward, as its all-gather is copied out
        before = tokens * sum(stored[:-1]) + sum(wcopy[:-1]) + dequant + held
        out.append((p + s + g_before + before + f.forward, "the last block's forward: parameters + optimizer states"
                    + " + the saved tensors below it + gathered units", {"gradients": g_before, "activations": before,
                                                                          "gathered": f.forward}))
    for what, loss in (("the loss, computing its first chunk", loss_forward),
                       ("backward starts, at the loss", loss_backward)):
        out.append((p + s + g_before + saved + loss + f.loss, f"{what}: parameters + optimizer states"
                    + (" + gradients" if accumulating else "") + " + every saved activation + the loss's tensors"
                    + (" + gathered units" if fsdp is not None else ""),
                    {"gradients": g_before, "activations": saved + loss, "gathered": f.loss}))
    # Each block's backward, top down: the gradients above it exist (the head's and final norm's
    # are g_tail), the blocks below still hold their saved tensors. The peak of a block's backward is
    # in its MLP, when down_proj's is the only gradient of the block made.
    g_done = g if accumulating else g_held + g_tail
    for i in reversed(range(len(stored))):
        g_now = g_done + (0.0 if accumulating else g_down[i])
        # (a recomputed block casts its weights again for its own backward: `recast`)
        live = tokens * (sum(stored[:i]) + in_backward[i]) + sum(wcopy[: i + 1]) + recast[i] + dequant + held
        out.append((p + s + g_now + live + f.block[i], f"block {i}'s backward" + (" (recomputed)" if checkpointed[i] else "")
                    + ": parameters + optimizer states + gradients so far + the saved tensors below it"
                    + (" + gathered units" if fsdp is not None else ""),
                    {"gradients": g_now, "activations": live, "gathered": f.block[i]}))
        if fsdp is not None:  # its reduce-scatter: its whole gradients copied into the float32 input
            below = tokens * sum(stored[:i]) + sum(wcopy[:i]) + dequant + held
            g_rs = g_done + f.reduce_grads[i]
            out.append((p + s + g_rs + below + f.reduce[i], f"block {i}'s reduce-scatter: parameters + optimizer "
                        "states + gradients so far + its whole gradients + the saved tensors below it + gathered "
                        "units and buffers", {"gradients": g_rs, "activations": below, "gathered": f.reduce[i]}))
            if f.gloo[i]:  # then its whole gradients are freed, and gloo reduces a copy into the new shard
                g_gloo = g_done + g_blocks[i]
                out.append((p + s + g_gloo + below + f.reduce[i] + f.gloo[i], f"block {i}'s reduce-scatter in gloo: "
                            "parameters + optimizer states + gradients so far + the saved tensors below it + gathered "
                            "units and buffers, gloo's copy", {"gradients": g_gloo, "activations": below,
                                                               "gathered": f.reduce[i] + f.gloo[i]}))
        if not accumulating:
            g_done += g_blocks[i]
    end = tied_extra
    out.append((p + s + g + end + f.end_grads + f.end, "backward ends: parameters + optimizer states + gradients"
                + (" + two vocab x dim contributions to the tied embedding's gradient" if tied_extra else "")
                + (" + the root's reduce-scatter" if fsdp is not None else ""),
                {"gradients": g + f.end_grads, "activations": end, "gathered": f.end}))
    return out


def _kv_width(cfg: ModelConfig, tp: int = 1, global_shaped: bool = False) -> tuple[int, str]:
    """Values per token and layer that `Transformer.new_cache` holds on one of `tp` tensor-parallel ranks, and what
    they are: each kv head's key and value, or latent attention's latent and the rotated key part that every head
    shares (tensor parallel refuses latent attention); global_shaped: a global layer shaped apart's (Gemma 4)."""
    k, v = cfg.cache_widths
    if cfg.kv_lora_rank:
        return k + v, f"({k} latent + {v} rotated key)"
    heads, k = cfg.global_shape if global_shaped else (cfg.kv_heads, k)
    kv_heads = -(-heads // tp)
    return kv_heads * 2 * k, f"2 (k, v) x {kv_heads} kv heads x {k} head_dim"


def _kv_cache(cfg: ModelConfig, n_layers: int, a: int, tp: int = 1, tokens: str = "",
              rows: str = "") -> tuple[int, int, str]:
    """What `Transformer.new_cache` allocates for the first `n_layers` layers of `cfg` in an `a`-byte compute dtype,
    on one of `tp` tensor-parallel ranks: (bytes per token, bytes per sequence, how; `tokens` and `rows` name the
    counts the formula multiplies them by, if any). Softmax attention layers hold keys and values for every token
    (`_kv_width`); a hybrid model's linear attention layers hold none, only a fixed-size state per sequence whatever
    its length: the float32 state (value heads x Dk x Dv) and the convolution's last K - 1 inputs in the compute
    dtype."""
    linear = sum(cfg.is_linear(i) for i in range(n_layers))
    owners = [i for i in range(n_layers) if cfg.kv_source(i) is None]  # Gemma 4 E2B's last layers cache nothing
    shaped = sum(cfg.is_global_shaped(i) for i in owners)
    attention = len(owners) - linear - shaped
    width, per_layer = _kv_width(cfg, tp)
    formula = f"{attention} {'attention ' if linear else ''}layers x {tokens + ' x ' if tokens else ''}{per_layer} x {a} B"
    if shaped:  # Gemma 4's global layers: kv heads and a width of their own (never beside linear layers)
        global_width, global_per_layer = _kv_width(cfg, tp, global_shaped=True)
        formula += f" + {shaped} global layers x {tokens + ' x ' if tokens else ''}{global_per_layer} x {a} B"
        return (attention * width + shaped * global_width) * a, 0, formula
    if not linear:
        return attention * width * a, 0, formula
    if cfg.linear_layer == "short_conv":  # LFM2's: the convolution's last K - 1 inputs alone
        taps = cfg.linear_conv_size - 1
        formula += (f" + {linear} short convolution layers x {rows + ' x ' if rows else ''}{a} B x {taps} x {cfg.dim} "
                    "convolution inputs")
        return attention * width * a, linear * a * taps * cfg.dim, formula
    (n_k, n_v), (dk, dv) = cfg.linear_heads, cfg.linear_sizes
    taps, channels = cfg.linear_conv_size - 1, n_v * dv + (2 * n_k * dk if cfg.linear_layer != "mamba" else 0)
    row = linear * (4 * n_v * dk * dv + a * taps * channels)
    formula += (f" + {linear} linear attention layers x {rows + ' x ' if rows else ''}(4 B x {n_v} x {dk} x {dv} "
                f"float32 state + {a} B x {taps} x {channels} convolution inputs)")
    return attention * width * a, row, formula


def rules_of_thumb(est: Estimate, cfg: ModelConfig, run: RunShape) -> list[str]:
    """The numbers to remember, applied to this model."""
    n, k = est.params, est.trainable
    kv_token, kv_row, kv_formula = _kv_cache(cfg, cfg.n_layers, 2)
    return [
        f"weights: 4 B/param in fp32, 2 in bf16/fp16, ~{NF4_BYTES:.2f} in NF4: {_m(n)} params -> "
        f"{human_bytes(4 * n)} / {human_bytes(2 * n)} / {human_bytes(NF4_BYTES * n)}",
        f"training with AdamW and float32 master weights (pretrain, full; fp32 or mixed precision): 16 B per "
        f"trained param (4 weights + 4 gradients + 8 optimizer states) -> {human_bytes(16 * n)} before activations",
        f"LoRA/QLoRA: the frozen base (2 B or ~{NF4_BYTES:.2f} B/param) + 16 B per adapter param "
        f"({_m(k)} trainable here)" if run.recipe in ("lora", "qlora") else
        "LoRA/QLoRA: the frozen base (2 B or ~0.52 B/param) + 16 B per adapter param",
        "activations grow as micro_batch_size x seq_len; the loss holds one chunk of logits (<= 64 MiB in float32 for a frozen head), "
        "never all of them; "
        "checkpointing keeps one residual (4 B x dim) per block instead of the block's saved tensors",
        f"KV cache in bf16: {kv_formula}" + (f" = {human_bytes(kv_token)} per token + {human_bytes(kv_row)} per sequence"
                                              if kv_row else f" = {human_bytes(kv_token)} per token"),
        "over N data-parallel ranks: ZeRO-1 (zero1) divides the optimizer states by N, FSDP2 (dp_shard) the "
        "parameters, gradients and optimizer states (plus gathered units in flight), DDP nothing (its gradient "
        "buckets double the gradients); tp divides the block matrices and the activations inside attention and MLP",
    ]


def describe_layout(run: RunShape) -> str:
    """The layout of `run` in words, e.g. "8 ranks: FSDP2 over 4 (ZeRO-3), tp 2 (sequence parallel)"."""
    lay = _layout(run)
    if run.world_size == 1:
        return "one device"
    parts = []
    if lay.ddp:
        parts.append(f"DDP over {lay.dp}" + (" with ZeRO-1 (optimizer states sharded)" if lay.zero1 else ""))
    if lay.fsdp:
        replicas = lay.dp // lay.shard
        parts.append(f"FSDP2 over {lay.shard} ({'ZeRO-3' if lay.reshard else 'ZeRO-2: reshard_after_forward off'})"
                     + (f" x {replicas} replicas (HSDP)" if replicas > 1 else "") + (", CPU offload" if lay.offload else ""))
    if lay.tp > 1:
        parts.append(f"tp {lay.tp}" + (" (sequence parallel)" if lay.sp else ""))
    if lay.pp > 1:
        parts.append(f"pp {lay.pp} ({lay.schedule}, {lay.microbatches} micro-batches)")
    return f"{run.world_size} ranks: " + (", ".join(parts) or "replicas without data parallelism")


# ---- measuring the same thing on a real step ----------------------------------------------------


class LiveTensorBytes(TorchDispatchMode):
    """Bytes of distinct tensor storages alive, and their peak, over the ops run inside the mode.

    Every op's outputs are recorded by storage (views share one); a weakref finalizer takes a
    storage off when it is freed. Tensors made before entering (weights, optimizer states, the
    batch) are added with `track`. Each storage has a role ("parameters", "gradients", "optimizer
    states", "activations" by default) so that the peak can be split like the estimate. It sees
    tensors, not the allocator: caching, fragmentation and kernels' scratch space are not counted.
    A storage's size is read again after every op, because FSDP2 frees and re-allocates its gathered
    parameters by resizing their storages in place (no op the mode sees). Memory that no visible
    tensor owns (DDP's gradient buckets, allocated by its C++ reducer) is added with `hold`.
    """

    def __init__(self) -> None:
        super().__init__()
        self._live: dict[int, list[Any]] = {}  # id(storage) -> [serial, nbytes, weakref to the storage]
        self._role: dict[int, str] = {}  # serial -> role
        self._serial = itertools.count()
        self.current = 0
        self.peak = 0
        self.peak_op = ""
        self._peak_live: list[tuple[int, int]] = []
        self.default_role = "activations"
        self._held: int | None = None  # the key of `hold`'s bytes

    def track(self, tensor: torch.Tensor, role: str | None = None) -> None:
        """Count `tensor`'s storage from now on (once); `role` relabels a storage already counted.

        A DTensor (FSDP2, tensor parallel) counts its local shard: what this rank holds; a wrapper subclass
        (torchao's NF4) its inner tensors (`storage_leaves`)."""
        for leaf in storage_leaves(tensor):
            self._track_storage(leaf.untyped_storage(), role)

    def _track_storage(self, storage: torch.UntypedStorage, role: str | None) -> None:
        key = id(storage)
        if key in self._live:
            if role is not None:
                self._role[self._live[key][0]] = role
            return
        serial, n = next(self._serial), storage.nbytes()
        self._live[key] = [serial, n, weakref.ref(storage)]
        self._role[serial] = role or self.default_role
        self.current += n
        weakref.finalize(storage, self._free, key)

    def hold(self, nbytes: int, role: str) -> None:
        """Count `nbytes` that exist already but that no tensor tracked so far owns, from now on (DDP's gradient
        buckets, allocated by its C++ reducer). An untracked storage that an op later writes into (the reducer
        copying gradients into a bucket) is taken to be part of it: counted once, from then on as itself."""
        serial = next(self._serial)
        self._held = -1 - serial
        self._live[self._held] = [serial, nbytes, None]
        self._role[serial] = role
        self.current += nbytes

    def _claim(self, args: Any, out: Any) -> None:
        """Move the outputs that an op wrote into a storage nobody tracked from the held bytes to themselves."""
        entry = self._live.get(self._held) if self._held is not None else None
        if entry is None or not entry[1]:
            return
        inputs = {id(leaf.untyped_storage()) for t in tree_leaves(args) if isinstance(t, torch.Tensor)
                  for leaf in storage_leaves(t)}
        for t in tree_leaves(out):
            if not isinstance(t, torch.Tensor):
                continue
            for leaf in storage_leaves(t):
                storage = leaf.untyped_storage()
                if id(storage) in inputs and id(storage) not in self._live and storage.nbytes() <= entry[1]:
                    entry[1] -= storage.nbytes()
                    self.current -= storage.nbytes()
                    self._track_storage(storage, self._role[entry[0]])

    def _free(self, key: int) -> None:
        self.current -= self._live.pop(key)[1]

    def _resized(self) -> None:
        # A copy: a storage freed meanwhile (a collection the loop's allocations trigger) drops its entry from `_live`
        for entry in list(self._live.values()):
            storage = entry[2]() if entry[2] is not None else None
            if storage is not None and storage.nbytes() != entry[1]:
                self.current += storage.nbytes() - entry[1]
                entry[1] = storage.nbytes()

    def mark_peak(self, where: str = "") -> None:
        self._resized()
        if self.current > self.peak:
            self.peak, self.peak_op = self.current, where
            self._peak_live = [(serial, n) for serial, n, _ in list(self._live.values())]

    def at_peak(self) -> dict[str, int]:
        """Bytes alive at the peak by role (roles as known now: a tensor that became a gradient counts as one)."""
        out: dict[str, int] = {}
        for serial, n in self._peak_live:
            role = self._role[serial]
            out[role] = out.get(role, 0) + n
        return out

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        self._claim((args, kwargs), out)
        tree_map_only(torch.Tensor, self.track, out)
        self.mark_peak(str(func))
        return out


@dataclass
class Measured:
    """The peak of live tensor bytes in one measured training step, split like `Estimate.at_peak`."""

    peak: int
    """Peak bytes of distinct live tensor storages."""
    at_peak: dict[str, int]
    """parameters, gradients, optimizer states, activations (everything else) at the peak."""
    op: str
    """The op that reached the peak."""
    cuda_max_allocated: int | None = None
    """On CUDA: torch.cuda.max_memory_allocated over the step, less what was allocated at its start that is
    not a tensor of the run (cuBLAS's workspace, a few MiB that would swamp a debug model)."""
    at_step: dict[str, int] = field(default_factory=dict)
    """parameters, gradients, optimizer states this rank holds as the optimizer step starts: distinct local
    storages (a DTensor's shard, FSDP2's padding included; DDP's gradient buckets among the gradients)."""
    buckets: int = 0
    """Bytes of DDP's gradient buckets (counted as gradients, at the peak and at the step)."""


def measure_train_step(
    model: nn.Module, optimizer: torch.optim.Optimizer, batches: Sequence[tuple[torch.Tensor, torch.Tensor]],
    step: Callable[[], object],
) -> Measured:
    """Run `step()` (e.g. `lambda: train_step(model, optimizer, batches, step=1)`) under `LiveTensorBytes`.

    Weights, buffers, existing gradients and optimizer states, and the batch are counted from the
    start; gradients are labelled as autograd assigns them (FSDP2's shards as the optimizer step
    starts), optimizer states as `optimizer.step` makes them. Run it on the second step to see the
    steady state (the first has no AdamW state until its end); under DDP on the third (DDP
    re-allocates its gradient buckets once, in the second step's forward: they would count twice).
    `model` is the module that is called: a DDP wrapper, an FSDP2 or plain module.
    """
    tracker = LiveTensorBytes()
    inner = optimizer.optim if isinstance(optimizer, ZeroRedundancyOptimizer) else optimizer
    buckets = 0
    if isinstance(model, DistributedDataParallel) and not model.gradient_as_bucket_view:
        # The reducer's flat buckets are allocated in C++, out of the mode's sight; DDP reports their sizes.
        sizes = str(model._get_ddp_logging_data().get("bucket_sizes", ""))
        buckets = sum(int(n) for n in sizes.split(",") if n.strip())
        tracker.hold(buckets, "gradients")
    for p in model.parameters():
        tracker.track(p, "parameters")
        if p.grad is not None:
            tracker.track(p.grad, "gradients")
    for b in model.buffers():
        tracker.track(b, "parameters")
    for state in inner.state.values():
        for v in state.values():
            if isinstance(v, torch.Tensor):
                tracker.track(v, "optimizer states")
    for x, y in batches:
        tracker.track(x)
        tracker.track(y)
    tracker.mark_peak("start")
    at_step: dict[str, int] = {}

    def grad_hook(p: torch.Tensor) -> None:
        tracker.track(p.grad, "gradients")

    def pre(*_: Any) -> None:
        if not at_step:  # the first call (ZeroRedundancyOptimizer's own, before its inner optimizer's)
            params = [p for g in optimizer.param_groups for p in g["params"]]  # ZeRO-1: all, inner: its share
            grads = [p.grad for p in params if p.grad is not None]
            for grad in grads:  # FSDP2 sets its shards' .grad itself: no autograd hook sees them
                tracker.track(grad, "gradients")
            states = [v for st in inner.state.values() for v in st.values() if isinstance(v, torch.Tensor)]
            at_step.update({"parameters": _storage_bytes(params + list(model.buffers())),
                            "gradients": _storage_bytes(grads) + buckets,
                            "optimizer states": _storage_bytes(states)})
        tracker.default_role = "optimizer states"

    def post(*_: Any) -> None:
        tracker.default_role = "activations"

    handles = [p.register_post_accumulate_grad_hook(grad_hook) for p in model.parameters() if p.requires_grad]
    handles += [register_optimizer_step_pre_hook(pre), register_optimizer_step_post_hook(post)]
    device = batches[0][0].device
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        other = torch.cuda.memory_allocated(device) - tracker.current  # allocated, but not a tensor of ours
        torch.cuda.reset_peak_memory_stats(device)
    try:
        with tracker:
            step()
    finally:
        for h in handles:
            h.remove()
    cuda_peak = None
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        cuda_peak = torch.cuda.max_memory_allocated(device) - other
    return Measured(peak=tracker.peak, at_peak=tracker.at_peak(), op=tracker.peak_op, cuda_max_allocated=cuda_peak,
                    at_step=at_step, buckets=buckets)


def storage_leaves(tensor: torch.Tensor) -> list[torch.Tensor]:
    """The plain tensors that hold `tensor`'s bytes on this rank: a DTensor's local shard, a wrapper subclass's
    inner tensors (torchao's NF4Tensor reports its dense size as its storage: 4x its packed bytes in bf16)."""
    if isinstance(tensor, DTensor):
        return storage_leaves(tensor._local_tensor)
    if hasattr(tensor, "__tensor_flatten__"):
        names, _ = tensor.__tensor_flatten__()
        return [leaf for name in names for leaf in storage_leaves(getattr(tensor, name))]
    return [tensor]


def _storage_bytes(tensors: Sequence[torch.Tensor]) -> int:
    """Bytes of the distinct storages behind `tensors` (a DTensor: its local shard's)."""
    seen: dict[int, int] = {}
    for t in tensors:
        for leaf in storage_leaves(t):
            storage = leaf.untyped_storage()
            seen[storage.data_ptr() or id(storage)] = storage.nbytes()
    return sum(seen.values())
