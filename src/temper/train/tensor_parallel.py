"""Tensor parallelism (Megatron-LM, Shoeybi et al. 2019) of the Transformer over the `tp` mesh, in place.

Each block's attention is split by heads and its MLP by hidden columns: q/k/v and gate/up projections are
column-parallel (each rank computes its heads / columns from the whole input), o_proj and down_proj
row-parallel (each rank's partial product, summed over the tp ranks). The token embedding is split by
vocabulary rows, and so is the output layer (or, tied, the embedding itself): the language-model loss then
runs on each rank's vocabulary slice and combines max, sum of exponentials and target logit over the
tp ranks (`train.losses`' vocab-parallel cross-entropy), so no rank ever holds logits for the whole
vocabulary in training. A forward that returns logits (generation, evaluation tasks) gathers them.

With `sequence_parallel` (Korthikanti et al. 2022, "Reducing Activation Recomputation in Large Transformer
Models") the residual stream between the tensor-parallel regions is split by sequence: the norms run on
each rank's T/tp tokens, the all-reduce after o_proj / down_proj becomes a reduce-scatter and the input of
attention / MLP is all-gathered (the same traffic, activations and norm work divided by tp). The first
block (of the model, or of each run of blocks a pipeline stage holds) takes its slice of the sequence and the
last gathers it back, so that the final norm, the loss, a stage's output and the slicing of
`last_only` / `logits_at` see every token. Every forward must then have a length divisible by tp: it is a
training layout, and a model for generation (one token per decode step) is parallelised without it.

Every parameter becomes a DTensor on the tp mesh, split or replicated (norms, learned positions); FSDP2
applied afterwards shards them over the data-parallel ranks as well (2-D).

Dropout: the ranks of a tensor-parallel group draw from one seed (pretrain seeds by data-parallel rank), which
keeps the activations they replicate identical. The split regions' masks (attention probabilities of each
rank's heads; with sequence parallel, the residual dropout of each rank's slice) therefore repeat from rank to
rank instead of being independent draws (Megatron-LM forks a per-rank generator for them; not done here), and
a run with dropout is not one process's bit for bit. Without dropout a run matches one process up to the
order of the all-reduces' sums.

It does not build the mesh, wrap with FSDP2 or run the loss (`train.parallel`, `train.losses`).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Placement, Replicate, Shard, distribute_module
from torch.distributed.tensor.parallel import (
    ColwiseParallel,
    RowwiseParallel,
    SequenceParallel,
    parallelize_module,
)

from temper.config import ConfigError
from temper.model.config import ModelConfig


def check_tensor_parallel(cfg: ModelConfig, tp: int) -> None:
    """Refuse a model whose heads, MLP columns or vocabulary do not split evenly over `tp` ranks, mixtures of
    experts (the plan splits one dense MLP; expert parallelism is not built), OLMo 2's blocks (a q/k norm over all
    heads needs statistics across the ranks' heads), latent attention (its latent is every head's), linear attention
    and attention sinks (the plan has no layout for them)."""
    if cfg.n_experts:
        raise ConfigError(f"train.parallel.tp={tp} does not split a mixture of experts (n_experts={cfg.n_experts}): "
                          "shard it with train.parallel.dp_shard (FSDP2) instead")
    if cfg.per_layer_input_size or cfg.kv_shared_layers:
        raise ConfigError(f"train.parallel.tp={tp} does not split Gemma 4 E2B's and E4B's per-layer embeddings or "
                          "layers sharing keys and values: shard the model with train.parallel.dp_shard (FSDP2) instead")
    if cfg.qk_norm_whole or not cfg.pre_norm:
        raise ConfigError(f"train.parallel.tp={tp} does not split OLMo 2's blocks (q/k norms over all heads, no "
                          "pre-norms): shard it with train.parallel.dp_shard (FSDP2) instead")
    if cfg.kv_lora_rank:
        raise ConfigError(f"train.parallel.tp={tp} does not split latent attention (kv_lora_rank={cfg.kv_lora_rank}: "
                          "one latent shared by every head): shard it with train.parallel.dp_shard (FSDP2) instead")
    if cfg.has_linear_layers:
        raise ConfigError(f"train.parallel.tp={tp} does not split linear attention layers (full_attention_every="
                          f"{cfg.full_attention_every}, attention_layers={cfg.attention_layers}): shard the model with "
                          "train.parallel.dp_shard (FSDP2) instead")
    if cfg.no_mlp_layers:
        raise ConfigError(f"train.parallel.tp={tp} does not split blocks without an MLP (no_mlp_layers): shard the model "
                          "with train.parallel.dp_shard (FSDP2) instead")
    if cfg.attn_sinks:
        raise ConfigError(f"train.parallel.tp={tp} does not split attention sinks (one per head, kept whole): shard "
                          "it with train.parallel.dp_shard (FSDP2) instead")
    sizes = {"n_heads": cfg.n_heads, "n_kv_heads": cfg.kv_heads, "ffn hidden dim": cfg.hidden_dim,
             "vocab_size": cfg.vocab_size, **({"global_kv_heads": cfg.global_shape[0]} if cfg.global_shaped else {})}
    bad = [f"{name} {n}" for name, n in sizes.items() if n % tp]
    if bad:
        hint = f" (pad it: --model.vocab_size={-(-cfg.vocab_size // tp) * tp})" if cfg.vocab_size % tp else ""
        raise ConfigError(f"train.parallel.tp={tp} must divide the model's {', '.join(bad)}{hint}")


def check_splittable_layers(model: nn.Module) -> None:
    """Refuse a model whose layers the plan splits are not plain `nn.Linear` (LoRA's adapted layers: lora,
    qlora), which torch's tensor-parallel styles cannot split, with the key and what to use instead."""
    names = [f"layers.{i}.{p}" for i in range(len(model.layers))
             for p in ("attn.q_proj", "attn.k_proj", "attn.v_proj", "attn.o_proj", "mlp.gate_proj", "mlp.up_proj",
                       "mlp.down_proj")] + ["head"]
    odd = [f"{n} ({type(m).__name__})" for n in names
           if (m := _submodule(model, n)) is not None and type(m) is not nn.Linear]
    if odd:
        raise ConfigError(f"train.parallel.tp splits plain linear layers; {odd[0]} is not one (LoRA and QLoRA adapt "
                          f"them): shard adapters with train.parallel.dp_shard (FSDP2) instead")


def _submodule(model: nn.Module, name: str) -> nn.Module | None:
    try:
        return model.get_submodule(name)
    except AttributeError:  # no such layer (a GELU MLP has no gate, a tied model no head)
        return None


def apply_tensor_parallel(model: nn.Module, tp_mesh: DeviceMesh, *, sequence_parallel: bool) -> None:
    """Split `model` (a `Transformer`, on any device, meta included) over the 1-D `tp_mesh`, in place.

    Every parameter becomes a DTensor on `tp_mesh` (AdamW's fused and foreach kernels take DTensors or
    plain tensors, not a mix): split, or replicated (norms, learned positions) with identical values and
    gradients on every rank. A replicated module built outside the meta device must hold the same values
    on every rank already (the same seed, or the same checkpoint): they are not broadcast.
    """
    tp = tp_mesh.size()
    check_tensor_parallel(model.cfg, tp)
    check_splittable_layers(model)
    # Between the parallel regions the residual stream is split by sequence, or whole on every rank.
    between: Placement = Shard(1) if sequence_parallel else Replicate()
    # The embedding is split by vocabulary rows (each rank looks up its rows, zeros elsewhere, then an
    # all-reduce): it is the largest matrix of a small model, and tied it is the vocabulary-parallel
    # output layer too. Its output is whole (not torchtitan's Shard(1)): learned positions and the
    # embedding dropout act on the whole sequence, and the first block takes its slice locally.
    # (A pipeline stage, `train.pipeline`, lacks the embeddings or the final norm and head.)
    plan = {}
    if model.tok_emb is not None:
        plan["tok_emb"] = RowwiseParallel(input_layouts=Replicate(), output_layouts=Replicate(), use_local_output=False)
    if model.head is not None:
        # Gathered logits for a forward that returns them; the training loss reads the weight's slice.
        plan["head"] = ColwiseParallel(input_layouts=Replicate(), output_layouts=Replicate())
    parallelize_module(model, tp_mesh, plan)
    if model.pos_emb is not None:
        _replicate(model.pos_emb, tp_mesh)
    _first_arg_to(model.drop, tp_mesh, Replicate(), Replicate(), local=True)  # one mask, drawn alike on every rank
    # Blocks by their index in the whole model: a pipeline stage holds a run of them (two runs for an
    # interleaved schedule), and each run is one sequence-parallel region.
    indices = list(getattr(model.layers, "indices", range(len(model.layers))))
    held = set(indices)
    for i, block in zip(indices, model.layers, strict=True):
        attn, mlp = block.attn, block.mlp
        plan = {f"attn.{p}_proj": ColwiseParallel() for p in ("q", "k", "v")
                if getattr(attn, f"{p}_proj") is not None}  # Gemma 4's global layers: values from k_proj
        plan["attn.o_proj"] = RowwiseParallel(output_layouts=between)
        plan |= {f"mlp.{p}_proj": ColwiseParallel() for p in ("gate", "up") if hasattr(mlp, f"{p}_proj")}
        plan["mlp.down_proj"] = RowwiseParallel(output_layouts=between)
        if sequence_parallel:  # (a parallel block's MLP reads attn_norm's output, or GPT-NeoX's its own mlp_norm's)
            plan |= {n: SequenceParallel() for n in ("attn_norm", "mlp_norm") if getattr(block, n) is not None}
        parallelize_module(block, tp_mesh, plan)
        if not sequence_parallel:
            for norm in (block.attn_norm, block.mlp_norm):
                if norm is not None:
                    _replicate(norm, tp_mesh)
        for norm in (attn.q_norm, attn.k_norm):  # Qwen3, Gemma 3: one weight for every head, over this rank's heads
            if norm is not None:  # input (B, T, H/tp, D): split by heads, so the weight's gradient adds up over ranks
                _replicate(norm, tp_mesh, inputs=Shard(2), local_output=True)
        if getattr(mlp, "act", None) is not None:  # xIELU's scalars (Apertus), over this rank's MLP columns: their
            _replicate(mlp.act, tp_mesh, inputs=Shard(2), local_output=True)  # gradients add up over the ranks
        for norm in (block.attn_out_norm, block.mlp_out_norm):  # Gemma 3: on o_proj's / down_proj's output, laid
            if norm is not None:  # out as the residual stream between the regions; a plain tensor for the residual
                _replicate(norm, tp_mesh, inputs=between, local_output=True)
        # One DTensor input shared by q, k and v (gate and up): their partial input gradients add up
        # before a single all-reduce, instead of one each (torchtitan's PrepareModuleInput).
        _first_arg_to(attn, tp_mesh, between, Replicate(), local=False)
        _first_arg_to(mlp, tp_mesh, between, Replicate(), local=False)
        attn.n_heads, attn.n_kv_heads = attn.n_heads // tp, attn.n_kv_heads // tp  # this rank's heads (KV cache)
        if sequence_parallel and i - 1 not in held:  # a region's first block takes its slice of the sequence
            block.register_forward_pre_hook(_check_divisible(tp))
            _first_arg_to(block, tp_mesh, Replicate(), Shard(1), local=True)
        if sequence_parallel and i + 1 not in held:  # and its last gathers the whole sequence again
            block.register_forward_hook(lambda _m, _a, out: _to(out, tp_mesh, Shard(1), Replicate(), local=True))
    # The final norm runs on every token on every rank (the last block gathered them). Its output is plain
    # (the head takes it as replicated), but for a tied head: a replicated DTensor there, whose `F.linear`
    # with the embedding's vocabulary slice gives logits split by vocabulary, which the model's output hook
    # gathers (and `hidden_only` gets as the plain tensor). Pipeline stages, whose modules other than `model`
    # carry no hook of it, are never tied (`train.pipeline` refuses it).
    if model.norm is not None:
        tied = model.head is None
        _replicate(model.norm, tp_mesh, local_output=not tied)
        if tied:
            model.register_forward_hook(lambda _m, _a, out: out.full_tensor() if isinstance(out, DTensor) else out)
    plain = [name for name, p in model.named_parameters() if not isinstance(p, DTensor)]
    if plain:
        raise ValueError(f"tensor parallel has no layout for parameters {plain}")


def _replicate(module: nn.Module, mesh: DeviceMesh, *, inputs: Placement | None = None, local_output: bool = False
               ) -> None:
    """`module`'s parameters as DTensors replicated over `mesh` (its values as they are on each rank), and
    its plain inputs taken as laid out as `inputs` (default: replicated); its output stays a DTensor unless
    `local_output`."""
    inputs = inputs or Replicate()

    def partition(_name: str, mod: nn.Module, mesh: DeviceMesh) -> None:
        for name, p in mod.named_parameters(recurse=False):
            mod.register_parameter(name, nn.Parameter(DTensor.from_local(p, mesh, (Replicate(),), run_check=False),
                                                      requires_grad=p.requires_grad))

    def take(_mod: nn.Module, args: tuple, mesh: DeviceMesh) -> tuple:
        return tuple(_to(a, mesh, inputs, inputs, local=False) if isinstance(a, torch.Tensor) else a for a in args)

    output = (lambda _mod, out, _mesh: out.to_local()) if local_output else None
    distribute_module(module, mesh, partition, take, output)


def _to(x: torch.Tensor, mesh: DeviceMesh, src: Placement, dst: Placement, *, local: bool) -> torch.Tensor:
    """`x` (a local tensor laid out as `src`, or a DTensor) redistributed to `dst`; a plain tensor when `local`."""
    if not isinstance(x, DTensor):
        x = DTensor.from_local(x, mesh, (src,), run_check=False)
    if x.placements != (dst,):
        x = x.redistribute(mesh, (dst,))
    return x.to_local() if local else x


def _first_arg_to(module: nn.Module, mesh: DeviceMesh, src: Placement, dst: Placement, *, local: bool) -> None:
    """Redistribute `module`'s first positional input from `src` to `dst` before its forward. The others
    pass as they are (attention's RoPE tables, mask and KV cache are the same on every rank), which
    `PrepareModuleInput` would need spelled out one by one."""
    module.register_forward_pre_hook(lambda _m, args: (_to(args[0], mesh, src, dst, local=local), *args[1:]))


def _check_divisible(tp: int):
    def check(_module: nn.Module, args: tuple) -> None:
        if args[0].shape[1] % tp:
            raise ValueError(f"train.parallel.sequence_parallel splits the sequence over tp={tp} ranks: a forward of "
                             f"{args[0].shape[1]} tokens does not split (parallelise a model for generation with "
                             f"sequence_parallel=false)")
    return check
