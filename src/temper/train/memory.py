"""Memory per device before a run starts: parameters, gradients, optimizer states, activations, KV cache.

`estimate(model_cfg, run)` returns, for one device, the bytes of each component with the formula
that gave it, and the peak of a training step. The peak is not the sum of the components: during
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
`recipes/pretrain.py`, `model/transformer.py`):

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
    (GELU: up; SwiGLU/GeGLU: gate, act(gate), up). In LoRA the first block's input needs no
    gradient (the embedding is frozen), so its first norm saves nothing.
  * activation checkpointing (`train.activation_checkpointing = k`: every k-th block, as
    `train/parallel.py` wraps them; Chen et al. 2016): a wrapped block keeps only its input and
    is recomputed, whole, in its backward.
  * sharding (Rajbhandari et al. 2020, ZeRO): "optimizer" divides the optimizer states by the
    world size, "gradients" also the gradients, "parameters" also the parameters, plus two
    gathered units (the one computing and the one prefetched, as FSDP2 does). Unsharded data
    parallelism (DDP) keeps a second copy of the gradients in its buckets. These are formulas
    only: temper's FSDP2 is a later issue, and they are not validated by a measurement here.
  * KV cache: what `Transformer.new_cache(batch, seq_len)` allocates for generation, in the compute
    dtype: 2 (k and v) x layers x batch x seq_len x kv_heads x head_dim.
  * QLoRA (Dettmers et al. 2023): the blocks' linear weights in NF4, 4 bits plus double-quantized
    block scales (an 8-bit absmax per 64 weights, a float32 scale per 256 of those): 0.5 + 1/64 +
    4/16384 bytes per weight; one linear layer is dequantized at a time (transient).

Attention dropout on a CPU sends SDPA to its math kernel, which keeps T x T probabilities per head
(counted); CUDA's fused kernels take dropout without them. The estimate counts tensors, as
`torch.cuda.max_memory_allocated` does; it does not count the CUDA context (~0.5 GB), allocator
caching and fragmentation, kernels' workspaces, or what torch.compile saves instead. `LiveTensorBytes` / `measure_train_step` measure the same thing on any
device (a CPU has no allocator counter) so that the estimate can be checked against a real step.
"""

from __future__ import annotations

import itertools
import math
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import nn
from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_map_only

from temper.model.config import ModelConfig
from temper.model.lora import ATTENTION_TARGETS, LoRALinear, apply_lora
from temper.model.transformer import Transformer
from temper.train.losses import chunk_tokens

Recipe = Literal["pretrain", "full", "lora", "qlora"]
Sharding = Literal["none", "optimizer", "gradients", "parameters"]
SHARDINGS: tuple[str, ...] = ("none", "optimizer", "gradients", "parameters")
DTYPE_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}
NF4_BYTES = 0.5 + 1 / 64 + 4 / (64 * 256)
"""Bytes per NF4 weight with double quantization (QLoRA §3): 4 bits, an 8-bit scale per 64, a float32 per 256 scales."""
ADAMW_STATE_BYTES = 8
"""exp_avg and exp_avg_sq in float32 per trainable parameter (PyTorch keeps them in the parameter's dtype)."""


@dataclass
class LoRAShape:
    """The adapters of a lora/qlora run (ignored by pretrain/full)."""

    rank: int = 16
    """Rank r of every adapter: A is (r, in), B is (out, r)."""
    targets: list[str] = field(default_factory=lambda: list(ATTENTION_TARGETS))
    """Names of the linear layers that get adapters: q_proj k_proj v_proj o_proj gate_proj up_proj down_proj."""
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
    sharding: Sharding = "none"
    """What is split over the data-parallel devices: none (DDP), optimizer, gradients, parameters (ZeRO-1/2/3)."""
    world_size: int = 1
    """Data-parallel devices."""
    device: Literal["cuda", "cpu"] = "cuda"
    """Where it runs: CUDA's autocast computes LayerNorm in float32 and keeps 1-byte dropout masks, a CPU's neither."""
    lora: LoRAShape = field(default_factory=LoRAShape)
    """Adapters (lora and qlora only)."""

    def __post_init__(self) -> None:
        for key in ("micro_batch_size", "accumulation_steps", "world_size"):
            if getattr(self, key) <= 0:
                raise ValueError(f"{key} must be > 0, got {getattr(self, key)}")
        for key in ("seq_len", "activation_checkpointing"):
            if getattr(self, key) < 0:
                raise ValueError(f"{key} must be >= 0, got {getattr(self, key)}")
        if self.sharding not in SHARDINGS:
            raise ValueError(f"sharding must be one of {SHARDINGS}, got {self.sharding!r}")


@dataclass
class Component:
    """One line of the estimate: bytes per device and how they were computed."""

    name: str
    bytes: int
    formula: str


@dataclass
class Estimate:
    """The estimate for one device; `peak` is what the training step reaches, not the sum of the lines."""

    components: list[Component]
    """parameters, gradients, optimizer states, activations, KV cache (generation; not in the training peak)."""
    peak: int
    """Peak bytes of one training step on one device."""
    peak_formula: str
    """Which moment of the step is the peak, and its sum."""
    at_peak: dict[str, int]
    """What is alive at the peak: parameters, gradients, optimizer states, activations."""
    block_terms: list[tuple[str, float]]
    """Saved bytes per token of one (not checkpointed) block, by tensor."""
    params: int
    """Parameters of the model (each shared tensor once), adapters included."""
    trainable: int
    """Parameters that get gradients and optimizer states."""
    notes: list[str]
    """Warnings and assumptions worth printing."""
    inference: int
    """Weights in the compute dtype (NF4 for qlora) plus the KV cache: what generation needs."""

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


def _count(model: Transformer) -> _Counts:
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
        n = 0
        for m in block.modules():
            if isinstance(m, (nn.Linear, LoRALinear)):
                if m.weight.requires_grad:
                    n += m.weight.numel()
                else:
                    frozen_linears += m.weight.numel()
            if isinstance(m, LoRALinear):
                n += m.lora_a.numel() + m.lora_b.numel()
        autocast_block.append(n)
    head_weight = model.tok_emb.weight if model.head is None else model.head.weight
    tail = [p for p in everything if id(p) not in block_ids]
    lookups = ([model.pos_emb.weight] if model.pos_emb is not None else []) + ([model.tok_emb.weight] if model.head is not None else [])
    return _Counts(
        params=sum(p.numel() for p in everything),
        buffer_bytes=sum(b.numel() * b.element_size() for b in model.buffers()),
        trainable=sum(p.numel() for p in everything if p.requires_grad),
        frozen=sum(p.numel() for p in everything if not p.requires_grad),
        frozen_linears=frozen_linears,
        block_params=sum(p.numel() for p in unique(model.layers[0].parameters())),
        block_trainable=[sum(p.numel() for p in unique(b.parameters()) if p.requires_grad) for b in model.layers],
        late_trainable=sum(p.numel() for p in lookups if p.requires_grad),
        down_trainable=[sum(p.numel() for p in b.mlp.down_proj.parameters() if p.requires_grad) for b in model.layers],
        autocast_block=autocast_block,
        autocast_tail=head_weight.numel() if head_weight.requires_grad else 0,
        embedding_unit=sum(p.numel() for p in tail),
        largest_frozen_linear=max((m.weight.numel() for m in model.layers.modules()
                                   if isinstance(m, (nn.Linear, LoRALinear)) and not m.weight.requires_grad), default=0),
        tied_trained=model.head is None and model.tok_emb.weight.requires_grad,
    )


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


def _keeps_input(module: nn.Module) -> bool:
    """A linear layer keeps its input for backward when its weight trains or it carries an adapter."""
    return isinstance(module, LoRALinear) or (isinstance(module, nn.Linear) and module.weight.requires_grad)


def _norm(s: _Saved, label: str, norm: nn.Module, d: int, grad_in: bool, t: _Dtypes) -> int:
    """Save what the norm keeps; return its output's bytes per element."""
    trained = any(p.requires_grad for p in norm.parameters())
    if isinstance(norm, nn.LayerNorm):
        if grad_in or trained:  # native_layer_norm keeps its input, mean and rstd
            s.add(f"{label} input", d * t.norm_out())
            s.add(f"{label} mean, rstd", 2 * t.norm_out())
        return t.norm_out()
    # RMSNorm: rms_norm(x.float()) keeps the float32 input and rstd; weight * y keeps y when the weight trains.
    if grad_in:
        s.add(f"{label} input (float32)", 4 * d)
        s.add(f"{label} rstd", 4)
    if trained:
        s.add(f"{label} normalised", t.r * d)
    return t.r


def _readers(s: _Saved, label: str, linears: list[nn.Module], in_bytes: int, t: _Dtypes, dropout: float,
             grad_in: bool) -> None:
    """The inputs kept by the linear layers that read one tensor.

    Readers share the tensor, except that autocast casts it once per reader (it caches only the
    casts of weights) and LoRA dropout makes one dropped copy per adapter.
    """
    keepers = [m for m in linears if _keeps_input(m)]
    dropped = [m for m in keepers if isinstance(m, LoRALinear) and dropout > 0]
    shared = [m for m in keepers if m not in dropped]
    if shared:
        d_in = shared[0].in_features
        if in_bytes == t.a:
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


def _block_saved(block: nn.Module, cfg: ModelConfig, t: _Dtypes, grad_in: bool, lora_dropout: float,
                 rope: bool, seq_len: int) -> _BlockMem:
    """What one Block.forward leaves for backward, and what its backward adds on top, per token."""
    s = _Saved()
    d = cfg.dim
    attn, mlp = block.attn, block.mlp

    def wants_grad(m: nn.Module) -> bool:
        return any(p.requires_grad for p in m.parameters())

    # attention half
    h_bytes = _norm(s, "attn_norm", block.attn_norm, d, grad_in, t)
    qkv = [attn.q_proj, attn.k_proj, attn.v_proj]
    _readers(s, "attn_norm output", qkv, h_bytes, t, lora_dropout, grad_in)
    _lora_hidden(s, qkv + [attn.o_proj], t)
    attn_grad = grad_in or any(wants_grad(m) for m in qkv)
    q_out, kv_out = attn.q_proj.out_features, attn.k_proj.out_features
    if attn_grad and cfg.dropout > 0 and not t.cuda:
        # A CPU has no fused kernel with attention dropout: SDPA's math path (in float32 on a CPU,
        # whatever the inputs) keeps the scaled q and k (k and v repeated to every query head under
        # GQA), the T x T probabilities, the dropout mask and the dropped probabilities, per head.
        s.add("scaled q, k, v (math kernel, float32)", 4 * (2 * q_out + (q_out if kv_out < q_out else kv_out)))
        s.add("attention probabilities, mask, dropped (T x T per head)", seq_len * cfg.n_heads * 3 * 4)
        s.add("attention output", t.a * q_out)
    elif attn_grad:
        # SDPA (flash / memory-efficient) keeps q, k, v (after RoPE: new tensors, cast to the compute
        # dtype), its output and a float32 log-sum-exp per head and query. The output, viewed as
        # (B, T, H*D), is also o_proj's input: one tensor.
        s.add("q, k, v" + (" (after RoPE)" if rope else ""), t.a * (q_out + 2 * kv_out))
        s.add("attention output", t.a * q_out)
        s.add("log-sum-exp", 4 * cfg.n_heads)
    _readers(s, "attention output", [attn.o_proj] if not attn_grad or lora_dropout > 0 else [], t.a, t,
             lora_dropout, attn_grad)
    attn_grad = attn_grad or wants_grad(attn.o_proj)
    if attn_grad and cfg.dropout > 0:
        s.add("attention residual dropout mask", t.mask(t.a) * d)
    grad_mid = grad_in or attn_grad

    # MLP half
    h_bytes = _norm(s, "mlp_norm", block.mlp_norm, d, grad_mid, t)
    gated = getattr(mlp, "gate_proj", None) is not None  # SwiGLU / GeGLU
    readers = [mlp.gate_proj, mlp.up_proj] if gated else [mlp.up_proj]
    _readers(s, "mlp_norm output", readers, h_bytes, t, lora_dropout, grad_mid)
    _lora_hidden(s, readers + [mlp.down_proj], t)
    f = mlp.up_proj.out_features
    up_grad = grad_mid or wants_grad(mlp.up_proj)
    down_keeps = _keeps_input(mlp.down_proj) and not (isinstance(mlp.down_proj, LoRALinear) and lora_dropout > 0)
    if gated:
        gate_grad = grad_mid or wants_grad(mlp.gate_proj)
        s.add("gate pre-activation", t.a * f if gate_grad else 0)
        s.add("act(gate)", t.a * f if up_grad else 0)  # the product keeps each factor for the other's gradient
        s.add("up", t.a * f if gate_grad else 0)
        s.add("act(gate) * up (down_proj input)", t.a * f if down_keeps else 0)
        mlp_grad = gate_grad or up_grad
    else:
        s.add("up (GELU input)", t.a * f if up_grad else 0)
        s.add("GELU output (down_proj input)", t.a * f if down_keeps else 0)
        mlp_grad = up_grad
    if lora_dropout > 0:
        _readers(s, "MLP hidden", [mlp.down_proj], t.a, t, lora_dropout, mlp_grad)
    mlp_grad = mlp_grad or wants_grad(mlp.down_proj)
    if mlp_grad and cfg.dropout > 0:
        s.add("MLP residual dropout mask", t.mask(t.a) * d)
    # The peak of its backward is in the MLP: the gradient of the residual stream coming down and of
    # the hidden (d(act*up), then d act and d up for a gated MLP; d GELU-output and d up for GELU),
    # while down_proj's saved input has just been freed (measured on a recomputed block).
    transient = t.r * d + ((3 if gated else 2) - down_keeps) * t.a * f if (mlp_grad or grad_mid) else 0
    # The saved set holds the block's input itself when its first norm kept it uncast.
    shares_input = grad_in and (t.r == 4 or (isinstance(block.attn_norm, nn.LayerNorm) and t.norm_out() == t.r))
    return _BlockMem(s, grad_mid or mlp_grad, transient, shares_input)


def _tail_saved(model: Transformer, t: _Dtypes, grad_out: bool) -> _Saved:
    """Embedding, final norm and head, per token (the logits and the loss are counted apart)."""
    cfg = model.cfg
    s = _Saved()
    s.add("token ids and targets", 16)
    if model.tok_emb.weight.requires_grad:
        s.add("embedding indices", 8)
    if cfg.dropout > 0 and model.tok_emb.weight.requires_grad:
        s.add("embedding dropout mask", t.mask(t.r) * cfg.dim)
    _norm(s, "final norm", model.norm, cfg.dim, grad_out, t)
    head_weight = model.tok_emb.weight if model.head is None else model.head.weight
    if not _plain_head(model) and head_weight.requires_grad:  # a head run as a module keeps its cast input
        s.add("final norm output (head input)", t.a * cfg.dim)
    return s


def _plain_head(model: Transformer) -> bool:
    """Whether the loss runs the output layer through the chunked `linear_cross_entropy` (train/losses.py)."""
    return model.head is None or (type(model.head) is nn.Linear and model.head.bias is None)


def _loss_bytes(model: Transformer, t: _Dtypes, tokens: int, hidden_grad: bool) -> tuple[float, float, str]:
    """(bytes alive beside the saved activations at the loss's forward peak, and as backward starts; formula).

    The chunked loss (train/losses.py) holds the final hidden states and their copy in the compute
    dtype, the gradients it computes as it goes (hidden: tokens x d, weight: V x d in float32) and one
    chunk of n tokens: its logits, one float32 (n, V) working copy and the logits' gradient; backward
    scales both gradients into new tensors. A head run as a module (e.g. LoRA on it) instead makes
    the full logits: float32 log-probabilities and two gradients per token (~12 B x V).
    """
    cfg = model.cfg
    V, d, a = cfg.vocab_size, cfg.dim, t.a
    head_weight = model.tok_emb.weight if model.head is None else model.head.weight
    h = t.norm_out() if isinstance(model.norm, nn.LayerNorm) else t.r  # the final norm's output
    if not _plain_head(model):
        return tokens * 12 * V, tokens * 12 * V, f"full logits: 12 B x V = {12 * V} B per token"
    trained = head_weight.requires_grad
    n = min(tokens, chunk_tokens(V, trained))
    w = 4 if trained else a  # the estimate's convention: float32 master weights train, a frozen base is in a
    grad_h = tokens * d * a if hidden_grad else 0
    grad_w = 4 * V * d if trained else 0
    held = tokens * d * h + (tokens * d * a if h != a else 0) + (V * d * a if w != a else 0) + grad_h + grad_w
    chunk = n * V * (4 + a if a != 4 else 4)  # the logits or their gradient, and one float32 working copy
    if trained:  # after a chunk: its gradient and the weight gradient's product, in a and float32
        chunk = max(chunk, n * V * a + V * d * (a + (4 if a != 4 else 0)))
    backward = grad_h + grad_w + (tokens * d * (a + (h if h != a else 0)) if hidden_grad else 0) \
        + (V * d * (4 + (w if w != 4 else 0)) if trained else 0)
    formula = f"chunked: {n} tokens x V x {4 + a if a != 4 else 4} B at a time + gradients of hidden and weight"
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


def estimate(cfg: ModelConfig, run: RunShape) -> Estimate:
    """Bytes per device of each component of a training run of `cfg` shaped by `run`, and the step's peak."""
    model = build_meta(cfg, run)
    c = _count(model)
    L, V, d = cfg.n_layers, cfg.vocab_size, cfg.dim
    B, T = run.micro_batch_size, run.seq_len or cfg.max_seq_len
    tokens = B * T
    a = DTYPE_BYTES[run.precision]
    full = run.recipe in ("pretrain", "full")
    qlora = run.recipe == "qlora"
    autocast = run.precision != "fp32"
    t = _Dtypes(r=4 if full else a, a=a, autocast=autocast, cuda=run.device == "cuda")
    N = run.world_size
    stage = SHARDINGS.index(run.sharding)  # 0 none, 1 optimizer, 2 gradients, 3 parameters
    notes: list[str] = []
    if stage and N == 1:
        notes.append(f"sharding={run.sharding} with world_size=1 divides by 1: it saves no memory")
    if T > cfg.max_seq_len:
        notes.append(f"seq_len {T} exceeds the model's max_seq_len {cfg.max_seq_len}: training would refuse it")
    if cfg.dropout > 0 and run.device == "cpu":
        notes.append("dropout > 0 on a CPU: SDPA falls back to its math kernel and keeps T x T probabilities per head")
    if stage or N > 1:
        notes.append("sharding and data-parallel terms are formulas (ZeRO, DDP buckets), not yet checked by a measurement")
    if qlora:
        notes.append("qlora: NF4 storage is 0.516 B/param (model/quant.py measures torchao's tensors); the QLoRA step's activations are not yet measured")

    # parameters
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
    if c.buffer_bytes:
        p_formula += f" + {human_bytes(c.buffer_bytes)} RoPE tables"
    unit = max(c.block_params, c.embedding_unit)  # FSDP2 units: each block, and the root (embeddings, head)
    if stage >= 3:
        p_bytes = math.ceil(p_bytes / N) + 2 * unit * a
        p_formula = f"({p_formula}) / {N} devices + 2 gathered units (computing, prefetched) x {_m(unit)} x {a} B"

    # gradients and optimizer states: float32, trainable parameters only
    g_bytes = 4 * c.trainable
    g_formula = f"4 B x {_m(c.trainable)} trainable params (float32)"
    if stage >= 2:
        g_bytes = math.ceil(g_bytes / N) + (4 * unit if N > 1 else 0)
        g_formula += f" / {N} devices" + (f" + one unit's before its reduce-scatter (4 B x {_m(unit)})" if N > 1 else "")
    elif N > 1:
        g_bytes *= 2
        g_formula += " x 2 (DDP's gradient buckets are a second copy)"
    s_bytes = ADAMW_STATE_BYTES * c.trainable
    s_formula = f"8 B x {_m(c.trainable)} trainable params (AdamW exp_avg + exp_avg_sq, float32)"
    if stage >= 1:
        s_bytes = math.ceil(s_bytes / N)
        s_formula += f" / {N} devices"
    g_share = 4 / (N if stage >= 2 else 1)  # gradient bytes per trainable parameter on this device

    # activations, per token unless said otherwise
    k = run.activation_checkpointing
    checkpointed = [k > 0 and i % k == 0 for i in range(L)]
    grad = full  # the embedding's output needs a gradient only when the embedding trains
    blocks: list[_BlockMem] = []
    for block in model.layers:
        blocks.append(_block_saved(block, cfg, t, grad, 0.0 if full else run.lora.dropout, cfg.pos == "rope", T))
        grad = blocks[-1].grad_out
    tail = _tail_saved(model, t, grad)
    loss_fwd, loss_bwd, loss_formula = _loss_bytes(model, t, tokens, grad)
    stored = [t.r * d if ck else b.saved.total for ck, b in zip(checkpointed, blocks)]
    # A block's backward: its saved tensors (recomputed if checkpointed, beside the input the
    # checkpoint holds unless they share it) and the transient gradients.
    in_backward = [b.saved.total + b.transient + (t.r * d if ck and not b.input_shared else 0)
                   for ck, b in zip(checkpointed, blocks)]
    # Whole tensors: autocast's 2-byte weight copies, saved by every matmul of a block that is not
    # recomputed (the trained weights; lora/qlora: only the adapters, the base is already 2-byte),
    # and qlora's one dequantized weight at a time.
    wcopy = [a * n if autocast and not ck and stage < 3 else 0 for ck, n in zip(checkpointed, c.autocast_block)]
    recast = [a * n if autocast and ck and stage < 3 else 0 for ck, n in zip(checkpointed, c.autocast_block)]
    wcopy_tail = a * c.autocast_tail if autocast and stage < 3 else 0
    dequant = a * c.largest_frozen_linear if qlora else 0
    moments = _moments(
        p=p_bytes, s=s_bytes, g=g_bytes, accumulating=run.accumulation_steps > 1, tokens=tokens, stored=stored,
        in_backward=in_backward, wcopy=wcopy, recast=recast, wcopy_head=wcopy_tail, dequant=dequant,
        tail=tail.total, loss_forward=loss_fwd, loss_backward=loss_bwd,
        g_blocks=[g_share * n for n in c.block_trainable],
        g_down=[g_share * n for n in c.down_trainable], g_late=g_share * c.late_trainable,
        tied_extra=8 * V * d if c.tied_trained else 0, checkpointed=checkpointed,
    )
    peak, peak_formula, alive = max(moments, key=lambda m: m[0])
    _, act_moment, act_alive = max(moments, key=lambda m: m[2]["activations"])  # the activations' own peak
    act_bytes = act_alive["activations"]
    typical = blocks[-1].saved
    wcopies = sum(wcopy) + wcopy_tail
    a_formula = (
        f"B*T = {tokens} tokens x ({L} blocks x {human_bytes(typical.total)}"
        + (f" ({sum(checkpointed)} of them checkpointed: input only, {t.r}d = {human_bytes(t.r * d)})" if k else "")
        + f" + tail {human_bytes(tail.total)}) + the loss ({loss_formula})"
        + (f" + autocast weight copies {a} B x {_m(wcopies / a)}" if wcopies else "")
        + (f" + one dequantized weight {human_bytes(dequant)}" if dequant else "")
        + f"; largest at: {act_moment.split(':')[0]}"
    )

    kv = 2 * L * B * T * cfg.kv_heads * cfg.head_dim * a
    kv_formula = f"2 (k, v) x {L} layers x B*T = {tokens} x {cfg.kv_heads} kv heads x {cfg.head_dim} head_dim x {a} B"
    # For generation the adapters merge into the weights they adapt, except into NF4 ones.
    base = c.params - (0 if full else c.trainable)
    weights = round(NF4_BYTES * nf4 + a * (base - nf4) + (a * c.trainable if nf4 else 0))
    components = [
        Component("parameters", p_bytes, p_formula),
        Component("gradients", g_bytes, g_formula),
        Component("optimizer states", s_bytes, s_formula),
        Component("activations", int(act_bytes), a_formula),
        Component("KV cache (generation)", kv, kv_formula),
    ]
    return Estimate(
        components=components, peak=int(peak), peak_formula=peak_formula,
        at_peak={"parameters": p_bytes, "gradients": int(alive["gradients"]), "optimizer states": s_bytes,
                 "activations": int(alive["activations"])},
        block_terms=typical.terms, params=c.params, trainable=c.trainable, notes=notes,
        inference=weights + kv,
    )


def _moments(*, p: float, s: float, g: float, accumulating: bool, tokens: int, stored: list[float],
             in_backward: list[float], wcopy: list[float], recast: list[float], wcopy_head: float, dequant: float,
             tail: float, loss_forward: float, loss_backward: float, g_blocks: list[float], g_down: list[float],
             g_late: float, tied_extra: float, checkpointed: list[bool]) -> list[tuple[float, str, dict[str, float]]]:
    """The step's candidate peaks (module docstring): (bytes, what it is, {gradients, activations}).

    p, s, g: parameters, optimizer states, gradients (bytes); per token: stored (each block's saved
    tensors, its input if checkpointed), in_backward (each block's saved and transient tensors
    during its backward), tail; whole bytes: loss_forward / loss_backward (the loss's own tensors at
    its forward peak and as backward starts, `_loss_bytes`), wcopy / recast (autocast weight copies of a block kept / recomputed),
    wcopy_head, dequant (qlora), g_blocks / g_down (a block's gradients / its down_proj's), g_late
    (the lookups' gradients, made last), tied_extra (the tied embedding's two contributions).
    """
    g_before = g if accumulating else 0.0  # earlier micro-batches' gradients, alive through this one
    out = []
    saved = tokens * (sum(stored) + tail) + sum(wcopy) + wcopy_head + dequant
    for what, loss in (("the loss, computing its first chunk", loss_forward),
                       ("backward starts, at the loss", loss_backward)):
        out.append((p + s + g_before + saved + loss, f"{what}: parameters + optimizer states"
                    + (" + gradients" if accumulating else "") + " + every saved activation + the loss's tensors",
                    {"gradients": g_before, "activations": saved + loss}))
    # Each block's backward, top down: the gradients above it exist (the head's and final norm's
    # are g - sum(g_blocks) - g_late), the blocks below still hold their saved tensors. The peak of
    # a block's backward is in its MLP, when down_proj's is the only gradient of the block made.
    g_done = g if accumulating else g - sum(g_blocks) - g_late
    for i in reversed(range(len(stored))):
        g_now = g_done + (0.0 if accumulating else g_down[i])
        # (a recomputed block casts its weights again for its own backward: `recast`)
        live = tokens * (sum(stored[:i]) + in_backward[i]) + sum(wcopy[: i + 1]) + recast[i] + dequant
        out.append((p + s + g_now + live, f"block {i}'s backward" + (" (recomputed)" if checkpointed[i] else "")
                    + ": parameters + optimizer states + gradients so far + the saved tensors below it",
                    {"gradients": g_now, "activations": live}))
        if not accumulating:
            g_done += g_blocks[i]
    end = tied_extra
    out.append((p + s + g + end, "backward ends: parameters + optimizer states + gradients"
                + (" + two vocab x dim contributions to the tied embedding's gradient" if tied_extra else ""),
                {"gradients": g, "activations": end}))
    return out


def rules_of_thumb(est: Estimate, cfg: ModelConfig, run: RunShape) -> list[str]:
    """The numbers to remember, applied to this model."""
    n, k = est.params, est.trainable
    kv_token = 2 * cfg.n_layers * cfg.kv_heads * cfg.head_dim * 2
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
        f"KV cache in bf16: 2 x layers x kv_heads x head_dim x 2 B = {human_bytes(kv_token)} per token",
        "sharding over N devices divides the optimizer states (optimizer), also the gradients (gradients), "
        "also the parameters (parameters) by N",
    ]


# ---- measuring the same thing on a real step ----------------------------------------------------


class LiveTensorBytes(TorchDispatchMode):
    """Bytes of distinct tensor storages alive, and their peak, over the ops run inside the mode.

    Every op's outputs are recorded by storage (views share one); a weakref finalizer takes a
    storage off when it is freed. Tensors made before entering (weights, optimizer states, the
    batch) are added with `track`. Each storage has a role ("parameters", "gradients", "optimizer
    states", "activations" by default) so that the peak can be split like the estimate. It sees
    tensors, not the allocator: caching, fragmentation and kernels' scratch space are not counted.
    """

    def __init__(self) -> None:
        super().__init__()
        self._live: dict[int, tuple[int, int]] = {}  # id(storage) -> (serial, nbytes)
        self._role: dict[int, str] = {}  # serial -> role
        self._serial = itertools.count()
        self.current = 0
        self.peak = 0
        self.peak_op = ""
        self._peak_live: list[tuple[int, int]] = []
        self.default_role = "activations"

    def track(self, tensor: torch.Tensor, role: str | None = None) -> None:
        """Count `tensor`'s storage from now on (once); `role` relabels a storage already counted."""
        storage = tensor.untyped_storage()
        key = id(storage)
        if key in self._live:
            if role is not None:
                self._role[self._live[key][0]] = role
            return
        serial, n = next(self._serial), storage.nbytes()
        self._live[key] = (serial, n)
        self._role[serial] = role or self.default_role
        self.current += n
        weakref.finalize(storage, self._free, key)

    def _free(self, key: int) -> None:
        self.current -= self._live.pop(key)[1]

    def mark_peak(self, where: str = "") -> None:
        if self.current > self.peak:
            self.peak, self.peak_op = self.current, where
            self._peak_live = list(self._live.values())

    def at_peak(self) -> dict[str, int]:
        """Bytes alive at the peak by role (roles as known now: a tensor that became a gradient counts as one)."""
        out: dict[str, int] = {}
        for serial, n in self._peak_live:
            role = self._role[serial]
            out[role] = out.get(role, 0) + n
        return out

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
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


def measure_train_step(
    model: nn.Module, optimizer: torch.optim.Optimizer, batches: Sequence[tuple[torch.Tensor, torch.Tensor]],
    step: Callable[[], object],
) -> Measured:
    """Run `step()` (e.g. `lambda: train_step(model, optimizer, batches, step=1)`) under `LiveTensorBytes`.

    Weights, buffers, existing gradients and optimizer states, and the batch are counted from the
    start; gradients are labelled as autograd assigns them, optimizer states as `optimizer.step`
    makes them. Run it on the second step to see the steady state (the first has no AdamW state
    until its end).
    """
    tracker = LiveTensorBytes()
    for p in model.parameters():
        tracker.track(p, "parameters")
        if p.grad is not None:
            tracker.track(p.grad, "gradients")
    for b in model.buffers():
        tracker.track(b, "parameters")
    for state in optimizer.state.values():
        for v in state.values():
            if isinstance(v, torch.Tensor):
                tracker.track(v, "optimizer states")
    for x, y in batches:
        tracker.track(x)
        tracker.track(y)
    tracker.mark_peak("start")

    def grad_hook(p: torch.Tensor) -> None:
        tracker.track(p.grad, "gradients")

    def pre(*_: Any) -> None:
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
    return Measured(peak=tracker.peak, at_peak=tracker.at_peak(), op=tracker.peak_op, cuda_max_allocated=cuda_peak)
