"""The weights of each architecture, described once as a list of rules (HF tensor = these temper tensors
concatenated, maybe transposed), which serve both directions: temper state dict <-> Hugging Face names and layouts,
in memory. A rule may also move rows (RoPE's adjacent pairs, Qwen3-Next's groups) or stack experts (GPT-OSS).

It does not read or write files (files.py reads them, checkpoint.py loads and saves directories with these rules) or
read configs (config.py).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import torch

from temper.model.config import ModelConfig
from temper.model.hf.config import (
    APERTUS,
    BAMBA,
    COHERES,
    DBRX,
    DEEPSEEK_MOE,
    ERNIE4_5_MOE,
    ERNIES,
    EXAONE4,
    EXAONE_MOE,
    FALCON,
    GEMMA2,
    GEMMA3,
    GEMMA4,
    GLM1,
    GLM4,
    GPT2,
    GPT_BIGCODE,
    GPT_NEOX,
    GPT_OSS,
    GPTJ,
    GRANITE_MOE_SWA,
    GRANITE_MOES,
    GRANITE_SWA,
    HELIUM,
    HUNYUAN_MOE,
    HUNYUANS,
    HYBRID,
    HYPERCLOVAX,
    JAMBA,
    LATENT,
    LFM2_MOE,
    LFM2S,
    LLAMA,
    LLAMA4,
    MINIMAX_M2,
    MISTRAL4,
    MISTRALS,
    MIXERS_ALONE,
    MIXTRAL_NAMES,
    MOE_ARCHITECTURES,
    NANOCHAT,
    NEMOTRON_H,
    PHI,
    PHI3,
    POST_NORM,
    QWEN2,
    QWEN3,
    QWEN3_NEXT,
    SIGMOID_MOE,
    STARCODER2,
    VAULTGEMMA,
    hf_architecture,
    hf_mlp,
)
from temper.model.hf.files import CheckpointError
from temper.model.transformer import Transformer

_GEMMA3_TEXT_PREFIXES = {"language_model.model.": "model.", "model.language_model.": "model.",
                         "language_model.lm_head.": "lm_head."}
"""Where an image-text checkpoint keeps the text model's tensors (as published; as transformers 5 names them)."""
_GEMMA3_VISION = ("vision_tower.", "multi_modal_projector.", "model.vision_tower.", "model.multi_modal_projector.")
_LLAMA4_VISION = ("vision_model.", "multi_modal_projector.")
_GEMMA4_SKIPPED = ("model.vision_tower.", "model.embed_vision.", "model.audio_tower.", "model.embed_audio.")
_QWEN3_5_SKIPPED = ("model.visual.", "mtp.")  # the vision tower, and the multi-token-prediction layers (not built)
_QWEN_VL_SKIPPED = ("model.visual.", "visual.")  # the vision of Qwen2-VL, 2.5-VL and 3-VL (saved, published), EXAONE 4.5
_WRAPPER_PREFIXES = ("_orig_mod.", "module.", "_checkpoint_wrapped_module.")  # compile / DDP / checkpointing


@dataclass(frozen=True)
class _Rule:
    """One Hugging Face tensor: temper's `parts` concatenated along dim 0, transposed if asked
    (GPT-2's Conv1D stores (in, out)). Fused projections (GPT-2 c_attn, Phi-3 qkv_proj and
    gate_up_proj) have several parts. `stacked`: the parts are every expert's (GPT-OSS), stacked as `_STACKED` says.
    `rope_pairs` (head_dim, first rotated row, rotated dims): rows of query or key heads whose rotated dims the
    checkpoint keeps as adjacent pairs (GLM-4's and DeepSeek's interleaved RoPE) and temper as two halves
    (`rope_pair_rows`). `groups` (G, block sizes): the parts' rows are blocks of G * size rows, which the checkpoint
    interleaves group by group (Qwen3-Next's in_proj_qkvz: `group_rows`)."""

    hf: str
    parts: tuple[str, ...]
    transpose: bool = False
    stacked: str = ""
    rope_pairs: tuple[int, int, int] | None = None
    groups: tuple[int, tuple[int, ...]] | None = None

    def hf_rows(self, t: torch.Tensor, to_hf: bool) -> torch.Tensor:
        """Rows of this tensor (or of an adapter's B, a DoRA magnitude) in the checkpoint's order (to_hf) or temper's."""
        if self.rope_pairs:
            return rope_pair_rows(t, self.rope_pairs, to_hf)
        return group_rows(t, self.groups, to_hf) if self.groups else t


def rope_pair_rows(t: torch.Tensor, pairs: tuple[int, int, int], to_hf: bool) -> torch.Tensor:
    """Rows (heads * head_dim, ...) with the r rotated rows of each head, from row `start` on, reordered between the
    two RoPE layouts: adjacent pairs (x0, x1), (x2, x3), ... (the checkpoint's) and halves x0, x2, ..., x1, x3, ...
    (temper's), which rotate alike; q . k is the same sum in either order. Moving the rows once, at load and export,
    keeps one RoPE kernel. GLM-4 rotates each head's first rows; DeepSeek's latent attention its last (and the rotated
    key part after the latent, as one head)."""
    head_dim, start, r = pairs
    heads = t.reshape(-1, head_dim, *t.shape[1:])  # (H, D, ...)
    rot = heads[:, start:start + r]
    rot = (torch.stack((rot[:, : r // 2], rot[:, r // 2:]), dim=2).flatten(1, 2) if to_hf
           else torch.cat((rot[:, 0::2], rot[:, 1::2]), dim=1))
    return torch.cat((heads[:, :start], rot, heads[:, start + r:]), dim=1).reshape(t.shape)


def group_rows(t: torch.Tensor, groups: tuple[int, tuple[int, ...]], to_hf: bool) -> torch.Tensor:
    """Rows reordered between temper's blocks (each G * size rows: every group's rows of one kind, as q, k, v and z
    of all heads) and the checkpoint's groups (each group's rows of every block: Qwen3-Next's in_proj_qkvz holds, per
    key head, its q, k, the values and the gates of the value heads it serves)."""
    G, sizes = groups
    if to_hf:
        blocks = t.split([G * size for size in sizes])
        return torch.cat([b.reshape(G, size, *t.shape[1:]) for b, size in zip(blocks, sizes, strict=True)],
                         dim=1).reshape(t.shape)
    per_group = t.reshape(G, sum(sizes), *t.shape[1:]).split(list(sizes), dim=1)
    return torch.cat([b.reshape(G * size, *t.shape[1:]) for b, size in zip(per_group, sizes, strict=True)])


def _interleave(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """(F, ...) gate and up rows -> (2F, ...) rows gate_0, up_0, gate_1, ... (GPT-OSS's gate_up layout)."""
    return torch.stack((gate, up), dim=1).flatten(0, 1)


_STACKED: dict[str, tuple[Any, Any]] = {
    # name: (temper parts -> the HF tensor, (the HF tensor, the number of parts) -> temper parts). GPT-OSS stacks its
    # experts, (in, out) each, gate and up interleaved by columns: gate_up_proj (E, D, 2F), down_proj (E, F, D), and
    # their biases.
    "gate_up": (lambda ps: torch.stack([_interleave(g, u).t() for g, u in zip(ps[::2], ps[1::2], strict=True)]),
                lambda t, _: [w for e in t for w in (e[:, 0::2].t(), e[:, 1::2].t())]),
    "gate_up_bias": (lambda ps: torch.stack([_interleave(g, u) for g, u in zip(ps[::2], ps[1::2], strict=True)]),
                     lambda t, _: [b for e in t for b in (e[0::2], e[1::2])]),
    "down": (lambda ps: torch.stack([w.t() for w in ps]), lambda t, _: [e.t() for e in t]),
    "down_bias": (lambda ps: torch.stack(ps), lambda t, _: list(t)),
    # Gemma 4 stacks its experts' weights as they are, gate above up: gate_up_proj (E, 2F, D), down_proj (E, D, F);
    # ERNIE 4.5 its choice bias as one row (1, E).
    "gate_up_rows": (lambda ps: torch.stack([torch.cat((g, u)) for g, u in zip(ps[::2], ps[1::2], strict=True)]),
                     lambda t, _: [w for e in t for w in e.chunk(2)]),
    "rows": (lambda ps: torch.stack(ps), lambda t, _: list(t)),
    # Llama 4 stacks its experts (in, out) each, gate's columns then up's: gate_up_proj (E, D, 2F), down_proj (E, F, D)
    "gate_up_halves": (lambda ps: torch.stack([torch.cat((g, u)).t() for g, u in zip(ps[::2], ps[1::2], strict=True)]),
                       lambda t, _: [w for e in t for w in e.t().chunk(2)]),
    # DBRX keeps its experts' down projections (in, out) each, one above the other: w2 (E * F, D)
    "down_flat": (lambda ps: torch.cat([w.t() for w in ps]), lambda t, n: [e.t() for e in t.chunk(n)]),
}


_MAMBA2_NAMES = ("in_proj.weight", "conv1d.weight", "conv1d.bias", "dt_bias", "A_log", "D", "norm.weight",
                 "out_proj.weight")
"""A Mamba 2 layer's tensors, under the same names in temper and its checkpoints (Granite 4.0-H's, Nemotron-H's)."""
_MAMBA_NAMES = ("in_proj.weight", "conv1d.weight", "conv1d.bias", "x_proj.weight", "dt_proj.weight", "dt_proj.bias",
                "A_log", "D", "out_proj.weight")
"""A Mamba layer's tensors, under the same names in temper and its checkpoints."""
_MLP_NAMES = {STARCODER2: {"up": "c_fc", "down": "c_proj"}, NANOCHAT: {"up": "fc1", "down": "fc2"},
              PHI: {"up": "fc1", "down": "fc2"}}
"""Checkpoint names of an unfused MLP's up and down projections where they are not up_proj and down_proj."""
_JAMBA_MAMBA_NAMES = (*_MAMBA_NAMES, "dt_layernorm.weight", "b_layernorm.weight", "c_layernorm.weight")
"""A Jamba Mamba layer's: a Mamba layer's and the weights of its norms of the step input, B and C."""


def hf_rules(cfg: ModelConfig) -> list[_Rule]:
    """Every tensor of the Hugging Face checkpoint of `cfg`, in the architecture's order."""
    arch = hf_architecture(cfg)
    keys = _native_keys(cfg)
    rules: list[_Rule] = []
    if arch == GPT2:
        # GPT-2 always has biases: a temper model without them is exported with zero ones.
        add = lambda hf, *parts, t=False: rules.append(_Rule("transformer." + hf, parts, t))
        add("wte.weight", "tok_emb.weight")
        add("wpe.weight", "pos_emb.weight")
        for i in range(cfg.n_layers):
            p, h = f"layers.{i}.", f"h.{i}."
            for hf_norm, norm in (("ln_1", "attn_norm"), ("ln_2", "mlp_norm")):
                add(f"{h}{hf_norm}.weight", f"{p}{norm}.weight")
                add(f"{h}{hf_norm}.bias", f"{p}{norm}.bias")
            for t in ("weight", "bias"):
                add(f"{h}attn.c_attn.{t}", *(f"{p}attn.{n}_proj.{t}" for n in "qkv"), t=t == "weight")
                add(f"{h}attn.c_proj.{t}", f"{p}attn.o_proj.{t}", t=t == "weight")
                add(f"{h}mlp.c_fc.{t}", f"{p}mlp.up_proj.{t}", t=t == "weight")
                add(f"{h}mlp.c_proj.{t}", f"{p}mlp.down_proj.{t}", t=t == "weight")
        add("ln_f.weight", "norm.weight")
        add("ln_f.bias", "norm.bias")
    elif arch == DBRX:  # q, k and v fused; the experts in three tensors, (E * F, D) each: gate and up as they are,
        # one expert above the other, down (in, out) each (`_STACKED`'s down_flat)
        def add(hf: str, *parts: str, stacked: str = "") -> None:
            rules.append(_Rule("transformer." + hf, parts, stacked=stacked))
        add("wte.weight", "tok_emb.weight")
        for i in range(cfg.n_layers):
            p, h = f"layers.{i}.", f"blocks.{i}."
            add(f"{h}norm_attn_norm.norm_1.weight", f"{p}attn_norm.weight")
            add(f"{h}norm_attn_norm.attn.Wqkv.weight", *(f"{p}attn.{n}_proj.weight" for n in "qkv"))
            add(f"{h}norm_attn_norm.attn.out_proj.weight", f"{p}attn.o_proj.weight")
            add(f"{h}norm_attn_norm.norm_2.weight", f"{p}mlp_norm.weight")
            add(f"{h}ffn.router.layer.weight", f"{p}mlp.router.weight")
            for theirs, ours, stacked in (("w1", "gate", ""), ("v1", "up", ""), ("w2", "down", "down_flat")):
                add(f"{h}ffn.experts.mlp.{theirs}", *(f"{p}mlp.experts.{j}.{ours}_proj.weight"
                                                      for j in range(cfg.n_experts)), stacked=stacked)
        add("norm_f.weight", "norm.weight")
    elif arch == GPT_NEOX:  # q, k and v fused, head by head (`group_rows`); biases everywhere
        add = lambda hf, *parts: rules.append(_Rule("gpt_neox." + hf, parts))
        add("embed_in.weight", "tok_emb.weight")
        for i in range(cfg.n_layers):
            p, h = f"layers.{i}.", f"layers.{i}."
            norms = [("input_layernorm", "attn_norm"), ("post_attention_layernorm", "mlp_norm")]
            for t in ("weight", "bias"):
                for theirs, ours in norms:
                    add(f"{h}{theirs}.{t}", f"{p}{ours}.{t}")
                rules.append(_Rule(f"gpt_neox.{h}attention.query_key_value.{t}", tuple(
                    f"{p}attn.{n}_proj.{t}" for n in "qkv"), groups=(cfg.n_heads, (cfg.head_dim,) * 3)))
                add(f"{h}attention.dense.{t}", f"{p}attn.o_proj.{t}")
                add(f"{h}mlp.dense_h_to_4h.{t}", f"{p}mlp.up_proj.{t}")
                add(f"{h}mlp.dense_4h_to_h.{t}", f"{p}mlp.down_proj.{t}")
        add("final_layer_norm.weight", "norm.weight")
        add("final_layer_norm.bias", "norm.bias")
    elif arch == GPT_BIGCODE:  # GPT-2's names in linear layers (out, in); q, k and v fused: the queries, then the
        # key and the value (one kv head), or head by head
        add = lambda hf, *parts, **kw: rules.append(_Rule("transformer." + hf, parts, **kw))
        add("wte.weight", "tok_emb.weight")
        add("wpe.weight", "pos_emb.weight")
        by_head = (cfg.n_heads, (cfg.head_dim,) * 3) if cfg.kv_heads == cfg.n_heads else None
        for i in range(cfg.n_layers):
            p, h = f"layers.{i}.", f"h.{i}."
            for t in ("weight", "bias"):
                add(f"{h}ln_1.{t}", f"{p}attn_norm.{t}")
                add(f"{h}attn.c_attn.{t}", *(f"{p}attn.{n}_proj.{t}" for n in "qkv"), groups=by_head)
                add(f"{h}attn.c_proj.{t}", f"{p}attn.o_proj.{t}")
                add(f"{h}ln_2.{t}", f"{p}mlp_norm.{t}")
                add(f"{h}mlp.c_fc.{t}", f"{p}mlp.up_proj.{t}")
                add(f"{h}mlp.c_proj.{t}", f"{p}mlp.down_proj.{t}")
        add("ln_f.weight", "norm.weight")
        add("ln_f.bias", "norm.bias")
    elif arch == GPTJ:  # q and k's rotated dims in adjacent pairs; attention without biases, the rest with
        add = lambda hf, *parts, **kw: rules.append(_Rule("transformer." + hf, parts, **kw))
        add("wte.weight", "tok_emb.weight")
        pairs = (cfg.head_dim, 0, cfg.rotary_dim)
        for i in range(cfg.n_layers):
            p, h = f"layers.{i}.", f"h.{i}."
            for n in "qkv":
                add(f"{h}attn.{n}_proj.weight", f"{p}attn.{n}_proj.weight", rope_pairs=pairs if n in "qk" else None)
            add(f"{h}attn.out_proj.weight", f"{p}attn.o_proj.weight")
            for t in ("weight", "bias"):
                add(f"{h}ln_1.{t}", f"{p}attn_norm.{t}")
                add(f"{h}mlp.fc_in.{t}", f"{p}mlp.up_proj.{t}")
                add(f"{h}mlp.fc_out.{t}", f"{p}mlp.down_proj.{t}")
        add("ln_f.weight", "norm.weight")
        add("ln_f.bias", "norm.bias")
    elif arch == FALCON:  # q, k and v fused kv group by kv group (`group_rows`); LayerNorms with biases
        add = lambda hf, *parts: rules.append(_Rule("transformer." + hf, parts))
        add("word_embeddings.weight", "tok_emb.weight")
        qkv = (cfg.kv_heads, (cfg.n_heads // cfg.kv_heads * cfg.head_dim, cfg.head_dim, cfg.head_dim))
        norms = ([("ln_attn", "attn_norm"), ("ln_mlp", "mlp_norm")] if cfg.parallel_mlp_norm  # the new architecture's
                 else [("input_layernorm", "attn_norm")] + [("post_attention_layernorm", "mlp_norm")] * (
                     not cfg.parallel_block))
        for i in range(cfg.n_layers):
            p, h = f"layers.{i}.", f"h.{i}."
            for t in ("weight", "bias"):
                for theirs, ours in norms:
                    add(f"{h}{theirs}.{t}", f"{p}{ours}.{t}")
                if f"{p}attn.q_proj.{t}" in keys:
                    rules.append(_Rule(f"transformer.{h}self_attention.query_key_value.{t}", tuple(
                        f"{p}attn.{n}_proj.{t}" for n in "qkv"), groups=qkv))
                    for theirs, ours in (("self_attention.dense", "attn.o_proj"), ("mlp.dense_h_to_4h", "mlp.up_proj"),
                                         ("mlp.dense_4h_to_h", "mlp.down_proj")):
                        add(f"{h}{theirs}.{t}", f"{p}{ours}.{t}")
        add("ln_f.weight", "norm.weight")
        add("ln_f.bias", "norm.bias")
    elif arch in (NEMOTRON_H, *MIXERS_ALONE):  # one sublayer per checkpoint layer: a block's mixer, then its MLP where
        # it has one (Mamba2ForCausalLM's and MambaForCausalLM's blocks: a mixer alone)
        add = lambda hf, *parts: rules.append(_Rule(hf, parts))
        add("backbone.embeddings.weight", "tok_emb.weight")
        k = 0
        for i in range(cfg.n_layers):
            p = f"layers.{i}."
            names = ((_MAMBA_NAMES if cfg.linear_layer == "mamba" else _MAMBA2_NAMES) if cfg.is_linear(i)
                     else tuple(f"{n}_proj.weight" for n in "qkvo"))
            sublayers = [("attn_norm", [(f"mixer.{n}", f"attn.{n}") for n in names])]
            if i not in cfg.no_mlp_layers:
                mlp = [(f"mixer.{n}_proj.weight", f"mlp.{n}_proj.weight") for n in ("up", "down")]
                if cfg.n_experts:  # Nemotron 3's mixture: the router and its choice bias, the experts, a shared one
                    mlp = [("mixer.gate.weight", "mlp.router.weight"),
                           ("mixer.gate.e_score_correction_bias", "mlp.choice_bias"),
                           *((f"mixer.experts.{j}.{n}_proj.weight", f"mlp.experts.{j}.{n}_proj.weight")
                             for j in range(cfg.n_experts) for n in ("up", "down")),
                           *((f"mixer.shared_experts.{n}_proj.weight", f"mlp.shared_expert.{n}_proj.weight")
                             for n in ("up", "down"))]
                sublayers.append(("mlp_norm", mlp))
            for norm, parts in sublayers:
                add(f"backbone.layers.{k}.norm.weight", f"{p}{norm}.weight")
                for theirs, ours in parts:
                    add(f"backbone.layers.{k}.{theirs}", f"{p}{ours}")
                k += 1
        add("backbone.norm_f.weight", "norm.weight")
    else:
        add = lambda hf, *parts: rules.append(_Rule(hf, parts))
        add("model.embed_tokens.weight", "tok_emb.weight")
        if cfg.per_layer_input_size:  # Gemma 4 E2B's and E4B's per-layer embeddings
            add("model.embed_tokens_per_layer.weight", "per_layer_emb.weight")
            add("model.per_layer_model_projection.weight", "per_layer_proj.weight")
            add("model.per_layer_projection_norm.weight", "per_layer_norm.weight")
        for i in range(cfg.n_layers):
            p, h = f"layers.{i}.", f"model.layers.{i}."
            if arch in LFM2S:  # its own names, for its attention and short convolution layers alike
                add(f"{h}operator_norm.weight", f"{p}attn_norm.weight")
                add(f"{h}ffn_norm.weight", f"{p}mlp_norm.weight")
                parts = ((("conv.in_proj", "in_proj"), ("conv.conv", "conv"), ("conv.out_proj", "out_proj"))
                         if cfg.is_linear(i) else (("self_attn.q_proj", "q_proj"), ("self_attn.k_proj", "k_proj"),
                                                   ("self_attn.v_proj", "v_proj"), ("self_attn.out_proj", "o_proj"),
                                                   ("self_attn.q_layernorm", "q_norm"),
                                                   ("self_attn.k_layernorm", "k_norm")))
                for theirs, ours in parts:
                    add(f"{h}{theirs}.weight", f"{p}attn.{ours}.weight")
                ffn, names = f"{h}{hf_mlp(arch)}.", (("w1", "gate"), ("w3", "up"), ("w2", "down"))
                if f"{p}mlp.router.weight" in keys:  # LFM2-MoE's experts, router and choice bias
                    add(f"{ffn}gate.weight", f"{p}mlp.router.weight")
                    if cfg.expert_choice_bias:
                        add(f"{ffn}expert_bias", f"{p}mlp.choice_bias")
                    for j in range(cfg.n_experts):
                        for theirs, ours in names:
                            add(f"{ffn}experts.{j}.{theirs}.weight", f"{p}mlp.experts.{j}.{ours}_proj.weight")
                else:
                    for theirs, ours in names:
                        add(f"{ffn}{theirs}.weight", f"{p}mlp.{ours}_proj.weight")
                continue
            # Gemma 2's and 3's post_attention_layernorm is the attention output's norm; Llama's is the MLP's input norm.
            norms = (("input_layernorm", "attn_norm"), ("post_attention_layernorm", "mlp_norm"))
            if cfg.parallel_block:  # one norm, read by attention and the MLP (Cohere)
                norms = (("input_layernorm", "attn_norm"),)
            elif arch == VAULTGEMMA:  # Gemma 2's without the outputs' norms
                norms = (("input_layernorm", "attn_norm"), ("pre_feedforward_layernorm", "mlp_norm"))
            elif arch in (GEMMA2, GEMMA3, GEMMA4):
                norms = (("input_layernorm", "attn_norm"), ("post_attention_layernorm", "attn_out_norm"),
                         ("pre_feedforward_layernorm", "mlp_norm"), ("post_feedforward_layernorm", "mlp_out_norm"))
            elif arch in POST_NORM:  # the outputs' norms only
                norms = (("post_attention_layernorm", "attn_out_norm"), ("post_feedforward_layernorm", "mlp_out_norm"))
            elif arch in (BAMBA, JAMBA):
                norms = (("input_layernorm", "attn_norm"), ("pre_ff_layernorm", "mlp_norm"))
            elif arch == APERTUS:
                norms = (("attention_layernorm", "attn_norm"), ("feedforward_layernorm", "mlp_norm"))
            elif arch == HYPERCLOVAX:  # Llama's, and Peri-LN's on the sublayers' outputs
                norms = (("input_layernorm", "attn_norm"), ("post_norm1", "attn_out_norm"),
                         ("post_attention_layernorm", "mlp_norm"), ("post_norm2", "mlp_out_norm"))
            elif arch == GLM4:  # sandwich norms under its own names
                norms = (("input_layernorm", "attn_norm"), ("post_self_attn_layernorm", "attn_out_norm"),
                         ("post_attention_layernorm", "mlp_norm"), ("post_mlp_layernorm", "mlp_out_norm"))
            for theirs, ours in norms:
                for t in ("weight", "bias"):  # (biases: Starcoder2's LayerNorms)
                    if f"{p}{ours}.{t}" in keys:
                        add(f"{h}{theirs}.{t}", f"{p}{ours}.{t}")
            if arch in HYBRID and cfg.is_linear(i):  # Gated DeltaNet, under Qwen3.5's names
                fused = ()
                if arch == QWEN3_NEXT:  # q, k, v and z fused, b and a fused, each interleaved by key head
                    (hk, hv), (dk, dv) = cfg.linear_heads, cfg.linear_sizes
                    r = hv // hk
                    for hf, parts, sizes in (("in_proj_qkvz", ("qkv", "z"), (dk, dk, r * dv, r * dv)),
                                             ("in_proj_ba", ("b", "a"), (r, r))):
                        rules.append(_Rule(f"{h}linear_attn.{hf}.weight", tuple(f"{p}attn.in_proj_{x}.weight"
                                                                                  for x in parts), groups=(hk, sizes)))
                    fused = ("in_proj_qkv.weight", "in_proj_z.weight", "in_proj_b.weight", "in_proj_a.weight")
                for n in ("in_proj_qkv.weight", "in_proj_z.weight", "in_proj_b.weight", "in_proj_a.weight",
                          "conv1d.weight", "A_log", "dt_bias", "norm.weight", "out_proj.weight"):
                    if n not in fused:
                        add(f"{h}linear_attn.{n}", f"{p}attn.{n}")
            if arch in (*GRANITE_MOES, BAMBA, JAMBA):  # Mamba (Jamba's) or Mamba 2 or attention; Bamba's MLP,
                # Jamba's or its experts, or Granite's shared MLP (gate and up fused) and experts stacked
                names = (("q_proj.weight", "k_proj.weight", "v_proj.weight", "o_proj.weight") if not cfg.is_linear(i)
                         else _JAMBA_MAMBA_NAMES if arch == JAMBA else _MAMBA2_NAMES)
                if cfg.attn_sinks:  # Granite MoE SWA's, one per head
                    names = (*names, "sinks")
                for n in names:
                    add(f"{h}{'mamba' if cfg.is_linear(i) else 'self_attn'}.{n}", f"{p}attn.{n}")
                if arch == JAMBA and cfg.has_experts(i):  # transformers 5 fuses them in memory, as Mixtral's
                    add(f"{h}feed_forward.router.weight", f"{p}mlp.router.weight")
                    for j in range(cfg.n_experts):
                        for n in ("gate", "up", "down"):
                            add(f"{h}feed_forward.experts.{j}.{n}_proj.weight", f"{p}mlp.experts.{j}.{n}_proj.weight")
                    continue
                if arch in (BAMBA, JAMBA):
                    for n in ("gate", "up", "down"):
                        add(f"{h}feed_forward.{n}_proj.weight", f"{p}mlp.{n}_proj.weight")
                    continue
                shared = f"{p}mlp.shared_expert." if cfg.n_experts else f"{p}mlp."
                if f"{shared}gate_proj.weight" in keys:
                    add(f"{h}shared_mlp.input_linear.weight", f"{shared}gate_proj.weight", f"{shared}up_proj.weight")
                    add(f"{h}shared_mlp.output_linear.weight", f"{shared}down_proj.weight")
                if cfg.n_experts:  # (Granite MoE SWA's checkpoints name them as transformers 5 holds them)
                    moe, experts = f"{h}block_sparse_moe.", range(cfg.n_experts)
                    router, gate_up, down = (("router.weight", "experts.gate_up_proj", "experts.down_proj")
                                             if arch == GRANITE_MOE_SWA else
                                             ("router.layer.weight", "input_linear.weight", "output_linear.weight"))
                    add(f"{moe}{router}", f"{p}mlp.router.weight")
                    rules.append(_Rule(f"{moe}{gate_up}", tuple(
                        f"{p}mlp.experts.{j}.{n}_proj.weight" for j in experts for n in ("gate", "up")),
                        stacked="gate_up_rows"))
                    rules.append(_Rule(f"{moe}{down}", tuple(f"{p}mlp.experts.{j}.down_proj.weight"
                                                             for j in experts), stacked="rows"))
                continue
            if arch == PHI3:
                add(h + "self_attn.qkv_proj.weight", *(f"{p}attn.{n}_proj.weight" for n in "qkv"))
                add(h + "self_attn.o_proj.weight", p + "attn.o_proj.weight")
                add(h + "mlp.gate_up_proj.weight", p + "mlp.gate_proj.weight", p + "mlp.up_proj.weight")
                add(h + "mlp.down_proj.weight", p + "mlp.down_proj.weight")
                continue
            if arch in LATENT:  # latent attention: q through its latent or not, k and v through theirs
                for n in ("q_proj", "q_a_proj", "q_a_layernorm", "q_b_proj", "kv_a_proj_with_mqa", "kv_a_layernorm",
                          "kv_b_proj", "o_proj"):
                    if f"{p}attn.{n}.weight" in keys:  # rotated dims last in each head, and after the latent
                        rows = (cfg.kv_lora_rank + cfg.rotary_dim, cfg.kv_lora_rank, cfg.rotary_dim) if n.startswith(
                            "kv_a_proj") else (cfg.head_dim, cfg.head_dim - cfg.rotary_dim, cfg.rotary_dim)
                        rules.append(_Rule(f"{h}self_attn.{n}.weight", (f"{p}attn.{n}.weight",), rope_pairs=rows
                                           if n in ("q_proj", "q_b_proj", "kv_a_proj_with_mqa") else None))
            else:
                # GLM-4's, ERNIE 4.5's, Cohere's and Llama 4's q and k rows in RoPE's adjacent pairs
                pairs = (cfg.head_dim, 0, cfg.rotary_dim) if arch in (GLM1, GLM4, *ERNIES, *COHERES, LLAMA4,
                                                                      HELIUM) else None
                for n in "qkvo":
                    theirs = "dense" if arch == PHI and n == "o" else f"{n}_proj"  # Phi's output projection
                    for t in ("weight", "bias"):
                        if f"{p}attn.{n}_proj.{t}" in keys:
                            rules.append(_Rule(f"{h}self_attn.{theirs}.{t}", (f"{p}attn.{n}_proj.{t}",),
                                               rope_pairs=pairs if n in "qk" else None))
            if arch in (GLM1, GLM4):  # gate and up fused, as Phi-3's
                add(h + "mlp.gate_up_proj.weight", p + "mlp.gate_proj.weight", p + "mlp.up_proj.weight")
                add(h + "mlp.down_proj.weight", p + "mlp.down_proj.weight")
                continue
            for n, theirs in (("q_norm", "query_layernorm"), ("k_norm", "key_layernorm")):  # Hunyuan's names
                if f"{p}attn.{n}.weight" in keys:
                    add(f"{h}self_attn.{theirs if arch in HUNYUANS else n}.weight", f"{p}attn.{n}.weight")
            if f"{p}layer_scalar" in keys:  # Gemma 4's
                add(f"{h}layer_scalar", f"{p}layer_scalar")
            if cfg.per_layer_input_size:
                for theirs, ours in (("per_layer_input_gate", "per_layer_gate"), ("per_layer_projection", "per_layer_out"),
                                     ("post_per_layer_input_norm", "per_layer_out_norm")):
                    add(f"{h}{theirs}.weight", f"{p}{ours}.weight")
            if arch == GRANITE_SWA:  # a sink per head
                add(f"{h}self_attn.sinks", f"{p}attn.sinks")
            if arch == GPT_OSS:  # the experts stacked (`_STACKED`), the router with its bias, a sink per head
                add(f"{h}self_attn.sinks", f"{p}attn.sinks")
                add(f"{h}mlp.router.weight", f"{p}mlp.router.weight")
                add(f"{h}mlp.router.bias", f"{p}mlp.router.bias")
                experts = range(cfg.n_experts)
                for name, parts in (("gate_up_proj", ("gate", "up")), ("down_proj", ("down",))):
                    for t, suffix in (("weight", ""), ("bias", "_bias")):
                        rules.append(_Rule(f"{h}mlp.experts.{name}{suffix}", tuple(
                            f"{p}mlp.experts.{j}.{n}_proj.{t}" for j in experts for n in parts),
                            stacked=name.removesuffix("_proj") + suffix))
            elif arch == GEMMA4 and f"{p}mlp.router.weight" in keys:  # its dense MLP (the shared expert), the router
                # with its scales, the experts stacked as they are published (`_STACKED`), their norms
                add(f"{h}router.proj.weight", f"{p}mlp.router.weight")
                add(f"{h}router.scale", f"{p}mlp.router_scale")
                add(f"{h}router.per_expert_scale", f"{p}mlp.expert_scale")
                rules += _stacked_expert_rules(f"{h}experts.", p, cfg.n_experts, "gate_up_rows", "rows")
                for n in ("gate", "up", "down"):
                    add(f"{h}mlp.{n}_proj.weight", f"{p}mlp.shared_expert.{n}_proj.weight")
                for theirs, ours in (("post_feedforward_layernorm_1", "shared_out_norm"),
                                     ("pre_feedforward_layernorm_2", "experts_norm"),
                                     ("post_feedforward_layernorm_2", "experts_out_norm")):
                    add(f"{h}{theirs}.weight", f"{p}mlp.{ours}.weight")
            elif arch == MISTRAL4 and cfg.has_experts(i):  # the experts stacked as transformers holds them, gate over
                # up (its checkpoints too), beside shared ones
                add(f"{h}mlp.gate.weight", f"{p}mlp.router.weight")
                rules += _stacked_expert_rules(f"{h}mlp.experts.", p, cfg.n_experts, "gate_up_rows", "rows")
                for n in ("gate", "up", "down"):
                    add(f"{h}mlp.shared_experts.{n}_proj.weight", f"{p}mlp.shared_expert.{n}_proj.weight")
            elif arch == LLAMA4 and cfg.has_experts(i):  # the router, the experts stacked (`_STACKED`), a shared one
                ff = f"{h}feed_forward."
                add(f"{ff}router.weight", f"{p}mlp.router.weight")
                rules += _stacked_expert_rules(f"{ff}experts.", p, cfg.n_experts, "gate_up_halves", "down")
                for n in ("gate", "up", "down"):
                    add(f"{ff}shared_expert.{n}_proj.weight", f"{p}mlp.shared_expert.{n}_proj.weight")
            elif f"{p}mlp.router.weight" in keys:  # transformers 5 fuses the experts in memory but reads and writes
                # them one by one
                moe = f"{h}block_sparse_moe." if arch in MIXTRAL_NAMES else f"{h}mlp."
                add(f"{moe}gate.{'wg.' if arch == HUNYUAN_MOE else ''}weight", f"{p}mlp.router.weight")
                if arch == ERNIE4_5_MOE:  # its choice bias (1, E), in its moe_statics
                    rules.append(_Rule(f"{moe}moe_statics.e_score_correction_bias", (f"{p}mlp.choice_bias",),
                                       stacked="rows"))
                elif cfg.expert_choice_bias:  # MiniMax-M2's beside its gate
                    add(f"{moe}{'' if arch in (MINIMAX_M2, EXAONE_MOE) else 'gate.'}e_score_correction_bias",
                        f"{p}mlp.choice_bias")
                names = ("w1", "w3", "w2") if arch in MIXTRAL_NAMES else ("gate_proj", "up_proj", "down_proj")
                for j in range(cfg.n_experts):
                    for theirs, ours in zip(names, ("gate", "up", "down"), strict=True):
                        add(f"{moe}experts.{j}.{theirs}.weight", f"{p}mlp.experts.{j}.{ours}_proj.weight")
                if cfg.shared_expert_ffn_dim:  # Qwen2-MoE's, under the same names; GLM-4.5's, plural
                    shared = ("shared_experts" if arch in (*DEEPSEEK_MOE, ERNIE4_5_MOE)
                              else "shared_mlp" if arch == HUNYUAN_MOE else "shared_expert")
                    for n in ("gate_proj", "up_proj", "down_proj"):
                        add(f"{moe}{shared}.{n}.weight", f"{p}mlp.shared_expert.{n}.weight")
                    if cfg.shared_expert_gate:
                        add(f"{moe}shared_expert_gate.weight", f"{p}mlp.shared_expert_gate.weight")
            for n in ("gate", "up", "down"):
                for t in ("weight", "bias"):
                    if f"{p}mlp.{n}_proj.{t}" in keys:
                        add(f"{h}{hf_mlp(arch)}.{_MLP_NAMES.get(arch, {}).get(n, f'{n}_proj')}.{t}",
                            f"{p}mlp.{n}_proj.{t}")
            for n in ("alpha_p", "alpha_n", "beta", "eps"):  # Apertus' xIELU: its scalars and constants
                if f"{p}mlp.act.{n}" in keys:
                    add(f"{h}mlp.act_fn.{n}", f"{p}mlp.act.{n}")
        final = ("model.embedding_norm." if arch in LFM2S else "model.final_layernorm." if arch in (BAMBA, JAMBA, PHI)
                 else "model.norm.")
        for t in ("weight", "bias"):  # (Starcoder2's bias; nanochat's norm has neither)
            if f"norm.{t}" in keys:
                add(final + t, f"norm.{t}")
    if not cfg.tie_embeddings:  # (GPT-NeoX's: embed_out)
        rules.append(_Rule("embed_out.weight" if arch == GPT_NEOX else "lm_head.weight", ("head.weight",)))
    if cfg.head_bias:  # Phi's
        rules.append(_Rule("lm_head.bias", ("head.bias",)))
    return rules


def _stacked_expert_rules(hf: str, p: str, n_experts: int, gate_up: str, down: str) -> list[_Rule]:
    """The rules of a mixture whose experts the checkpoint stacks in two tensors, `hf`gate_up_proj and `hf`down_proj,
    laid out as `_STACKED`'s `gate_up` and `down` say, from block `p`'s experts."""
    experts = [f"{p}mlp.experts.{j}." for j in range(n_experts)]
    return [_Rule(f"{hf}gate_up_proj", tuple(f"{e}{n}_proj.weight" for e in experts for n in ("gate", "up")),
                  stacked=gate_up),
            _Rule(f"{hf}down_proj", tuple(f"{e}down_proj.weight" for e in experts), stacked=down)]


def _ignored(name: str, cfg: ModelConfig) -> bool:
    """HF tensors that carry nothing to load: recomputed buffers, a tied head saved anyway, the vision tower of a
    Gemma 3 or Qwen3.5 image-text checkpoint (and Gemma 4's audio tower), multi-token-prediction layers (DeepSeek-V3's,
    GLM-4.5's, Qwen3.5's), and the unused key and value weights of Gemma 4's layers that take another's."""
    return (name.endswith(("rotary_emb.inv_freq", ".attn.bias", ".attn.masked_bias", ".attention.bias",
                           ".attention.masked_bias"))  # (GPT-2's and GPT-NeoX's causal masks)
            or (cfg.hf_architecture in SIGMOID_MOE and _layer_index(name) >= cfg.n_layers)  # multi-token prediction
            or (name in ("lm_head.weight", "language_model.lm_head.weight", "embed_out.weight") and cfg.tie_embeddings)
            or (cfg.hf_architecture in (GEMMA3, *MISTRALS, MISTRAL4) and name.startswith(_GEMMA3_VISION))
            or (cfg.hf_architecture == LLAMA4 and name.startswith(_LLAMA4_VISION))
            or (cfg.hf_architecture == GEMMA4 and (name.startswith(_GEMMA4_SKIPPED) or _shared_kv_weight(name, cfg)))
            or (cfg.hf_architecture in HYBRID and name.startswith(_QWEN3_5_SKIPPED))
            or (cfg.hf_architecture in (QWEN2, QWEN3, EXAONE4) and name.startswith(_QWEN_VL_SKIPPED))
            or (cfg.hf_architecture == ERNIE4_5_MOE and "mtp" in name)  # their multi-token prediction, as transformers
            or (cfg.hf_architecture == EXAONE_MOE and name.startswith("mtp.")))


def _shared_kv_weight(name: str, cfg: ModelConfig) -> bool:
    """Whether `name` is a key or value projection or norm of a Gemma 4 layer that takes another's keys and values: its
    published checkpoints keep them, unused (transformers ignores them on load)."""
    layer = _layer_index(canonical_name(name, GEMMA4))
    return (layer >= 0 and cfg.kv_source(layer) is not None
            and name.endswith(tuple(f"self_attn.{n}.weight" for n in ("k_proj", "v_proj", "k_norm", "v_norm"))))


def _layer_index(name: str) -> int:
    """i of a "model.layers.{i}." tensor; -1 for others."""
    parts = name.split(".")
    return int(parts[2]) if parts[:2] == ["model", "layers"] and len(parts) > 2 and parts[2].isdigit() else -1


_EXAONE3_NAMES = ((r"^transformer\.wte\.", "model.embed_tokens."), (r"^transformer\.h\.", "model.layers."),
                  (r"^transformer\.ln_f\.", "model.norm."), (r"\.attn\.attention\.out_proj\.", ".self_attn.o_proj."),
                  (r"\.attn\.attention\.", ".self_attn."), (r"\.ln_1\.", ".input_layernorm."),
                  (r"\.ln_2\.", ".post_attention_layernorm."), (r"\.mlp\.c_fc_0\.", ".mlp.gate_proj."),
                  (r"\.mlp\.c_fc_1\.", ".mlp.up_proj."), (r"\.mlp\.c_proj\.", ".mlp.down_proj."))
"""EXAONE 3.0's and 3.5's tensor names and Llama's, as transformers 5 renames them (its conversion mapping)."""


def canonical_name(name: str, arch: str) -> str:
    """A tensor's (or a PEFT adapter's layer's) name as the rules spell it: a bare `GPT2Model` checkpoint names its
    tensors without the `transformer.` prefix; a Gemma 3 or Qwen3.5 image-text one keeps its text model's under
    `language_model.`; transformers 5 holds Nemotron-H's `backbone.` as `model.` and GPT-NeoX's `embed_out` as
    `lm_head`."""
    if arch == GPT2 and not name.startswith(("transformer.", "lm_head")):
        return "transformer." + name
    if arch == LLAMA and name.startswith("transformer."):  # EXAONE 3's names for Llama's tensors
        for theirs, ours in _EXAONE3_NAMES:
            name = re.sub(theirs, ours, name)
        return name
    if arch == NEMOTRON_H and name.startswith("model."):  # transformers 5 names its backbone `model` in memory
        return "backbone." + name.removeprefix("model.")
    if arch == GPT_NEOX and name.startswith("lm_head"):  # and GPT-NeoX's embed_out lm_head
        return "embed_out" + name.removeprefix("lm_head")
    if arch in (GEMMA3, GEMMA4, *HYBRID, *MISTRALS, MISTRAL4, LLAMA4, QWEN2, QWEN3, EXAONE4):
        for prefix, to in _GEMMA3_TEXT_PREFIXES.items():
            if name.startswith(prefix):
                return to + name[len(prefix):]
    return name


def _native_keys(cfg: ModelConfig) -> set[str]:
    with torch.device("meta"):
        return set(Transformer(cfg).state_dict().keys())


def _to_hf(rule: _Rule, sd: dict[str, torch.Tensor]) -> torch.Tensor:
    parts = []
    for p in rule.parts:
        if p in sd:
            parts.append(sd[p])
        else:  # a bias temper leaves out (GPT-2 export): zeros, the same function
            w = sd[p.removesuffix(".bias") + ".weight"]
            parts.append(torch.zeros(w.shape[0], dtype=w.dtype, device=w.device))
    if rule.stacked:
        return _STACKED[rule.stacked][0](parts)
    t = rule.hf_rows(torch.cat(parts) if len(parts) > 1 else parts[0], to_hf=True)
    return t.t() if rule.transpose else t


def _to_temper(rule: _Rule, t: torch.Tensor, sizes: list[int]) -> list[torch.Tensor]:
    if rule.stacked:
        return _STACKED[rule.stacked][1](t, len(rule.parts))
    t = rule.hf_rows(t.t() if rule.transpose else t, to_hf=False)
    return list(t.split(sizes)) if len(sizes) > 1 else [t]


def to_hf_state_dict(cfg: ModelConfig, sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """temper state dict -> Hugging Face names and layouts (contiguous, ready for safetensors)."""
    sd = _strip_wrappers(sd)
    _check_keys(sd, _native_keys(cfg), "temper state dict")
    return {r.hf: _to_hf(r, sd).detach().contiguous() for r in hf_rules(cfg)}


def from_hf_state_dict(cfg: ModelConfig, sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Hugging Face state dict (in memory) -> temper names and layouts."""
    arch = hf_architecture(cfg)
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in Transformer(cfg).state_dict().items()}
    rules = {r.hf: r for r in hf_rules(cfg)}
    out: dict[str, torch.Tensor] = {}
    if arch in (*MOE_ARCHITECTURES, JAMBA) and arch not in (GPT_OSS, MISTRAL4):  # (theirs are read stacked)
        sd = _unfused_experts(sd, arch)
    if arch in GRANITE_MOES and arch != GRANITE_MOE_SWA:
        sd = _granite_checkpoint_names(sd)
    if arch == NEMOTRON_H:
        sd = _nemotron_h_checkpoint_names(sd)
    for name, t in sd.items():
        if _ignored(name, cfg):
            continue
        rule = rules.get(canonical_name(name, arch))
        if rule is None:
            raise KeyError(f"unexpected {arch} weight {name!r}")
        _check_shape(rule, t.shape, shapes, "state dict")
        out |= dict(zip(rule.parts, _to_temper(rule, t, part_rows(rule, shapes)), strict=True))
    _check_keys(out, set(shapes), "Hugging Face checkpoint")
    return {k: v.contiguous() for k, v in out.items()}


_FUSED_EXPERTS = ("experts.gate_up_proj", "experts.down_proj")
"""transformers 5's in-memory experts, in the block's MLP module (`hf_mlp`): (E, 2F, D) gate and up stacked, (E, D, F)
down."""


def _unfused_experts(sd: dict[str, torch.Tensor], arch: str) -> dict[str, torch.Tensor]:
    """A transformers 5 model's own state dict (`model.state_dict()`, experts stacked as `_FUSED_EXPERTS`) in the
    per-expert names its `save_pretrained` writes, which the rules describe; other names pass unchanged."""
    out = {}
    block = f".{hf_mlp(arch)}."
    moe = ".block_sparse_moe." if arch in MIXTRAL_NAMES else block  # the checkpoint's name
    gate, up, down = ("w1", "w3", "w2") if arch in (*MIXTRAL_NAMES, LFM2_MOE) else ("gate_proj", "up_proj", "down_proj")
    fused = tuple(block + f for f in _FUSED_EXPERTS)
    for name, t in sd.items():
        if name.endswith(fused[0]):
            stem = name.removesuffix(fused[0]) + moe + "experts."
            for j, (g, u) in enumerate(zip(*t.chunk(2, dim=1), strict=True)):
                out[f"{stem}{j}.{gate}.weight"], out[f"{stem}{j}.{up}.weight"] = g, u
        elif name.endswith(fused[1]):
            stem = name.removesuffix(fused[1]) + moe + "experts."
            out |= {f"{stem}{j}.{down}.weight": w for j, w in enumerate(t)}
        elif name.endswith(".mlp.gate.weight"):
            out[name.removesuffix(".mlp.gate.weight") + moe + "gate.weight"] = t
        elif name.endswith(".mlp.gate.moe_statics.e_score_correction_bias"):  # ERNIE 4.5's, moved on saving
            out[name.replace(".mlp.gate.moe_statics.", ".mlp.moe_statics.")] = t
        elif arch == EXAONE_MOE and name.endswith(".mlp.gate.e_score_correction_bias"):  # held under gate, saved beside
            out[name.replace(".mlp.gate.", ".mlp.")] = t
        elif name.endswith(".mlp.e_score_correction_bias"):  # MiniMax-M2's
            out[name.removesuffix(".mlp.e_score_correction_bias") + moe + "e_score_correction_bias"] = t
        else:
            out[name] = t
    return out


_GRANITE_IN_MEMORY = {".block_sparse_moe.experts.gate_up_proj": ".block_sparse_moe.input_linear.weight",
                      ".block_sparse_moe.experts.down_proj": ".block_sparse_moe.output_linear.weight",
                      ".block_sparse_moe.router.weight": ".block_sparse_moe.router.layer.weight"}
"""transformers 5's in-memory names of the Granite mixtures' experts and router -> their checkpoints' (the rules')."""


def _granite_checkpoint_names(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A transformers 5 Granite mixture's own state dict in the names its `save_pretrained` writes."""
    out = {}
    for name, t in sd.items():
        for memory, checkpoint in _GRANITE_IN_MEMORY.items():
            if name.endswith(memory):
                name = name.removesuffix(memory) + checkpoint
        out[name] = t
    return out


def _nemotron_h_checkpoint_names(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A transformers 5 Nemotron-H model's own state dict, its mixtures' experts stacked ((E, F, D) up_proj, (E, D, F)
    down_proj), in the per-expert names its `save_pretrained` writes."""
    out = {}
    for name, t in sd.items():
        stem, _, last = name.rpartition(".experts.")
        if stem and last in ("up_proj", "down_proj"):
            out |= {f"{stem}.experts.{j}.{last}.weight": w for j, w in enumerate(t)}
        else:
            out[name] = t
    return out


def part_rows(rule: _Rule, shapes: dict[str, torch.Size]) -> list[int]:
    """The rows of each of `rule`'s temper tensors, where the checkpoint's tensor splits (a scalar, xIELU's: one)."""
    return [shapes[p][0] if len(shapes[p]) else 1 for p in rule.parts]


def _check_shape(rule: _Rule, got: torch.Size | tuple, shapes: dict[str, torch.Size], where: str) -> None:
    first = shapes[rule.parts[0]]
    expected = (sum(shapes[p][0] for p in rule.parts), *first[1:]) if len(first) else first  # (a scalar: xIELU's)
    if rule.transpose:
        expected = expected[::-1]
    if rule.stacked:  # what the stacking makes of the parts' shapes, worked out on the meta device
        expected = tuple(_STACKED[rule.stacked][0]([torch.empty(shapes[p], device="meta") for p in rule.parts]).shape)
    if tuple(got) != tuple(expected):
        raise CheckpointError(f"{where}: {rule.hf} has shape {list(got)}, expected {list(expected)} "
                              f"(temper {', '.join(rule.parts)})")


def _check_keys(got: dict[str, torch.Tensor], expected: set[str], what: str) -> None:
    missing, unexpected = sorted(expected - got.keys()), sorted(got.keys() - expected)
    if missing or unexpected:
        raise KeyError(f"{what}: missing {missing[:8]}{'...' if len(missing) > 8 else ''}, "
                       f"unexpected {unexpected[:8]}{'...' if len(unexpected) > 8 else ''}")


def _strip_wrappers(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = {}
    for k, v in sd.items():
        for prefix in _WRAPPER_PREFIXES:
            k = k.replace(prefix, "")
        out[k] = v
    return out
