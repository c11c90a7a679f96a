"""PEFT's adapter formats, both ways: temper's LoRA adapters and prefixes <-> `adapter_config.json` +
`adapter_model.safetensors`.

`save_peft` writes the files that `peft.PeftModel.from_pretrained` reads onto the Hugging Face model
that `checkpoint.save_hf` exports, giving the same logits; `load_peft` reads the files that PEFT's
`save_pretrained` writes and swaps adapters into a temper model with the file's rank, alpha,
dropout, rsLoRA and DoRA settings, again with the same logits. Plain LoRA, rsLoRA and DoRA, on
every architecture `config.py` knows, the untied output head (`lm_head`) included; a mixture of experts'
experts and router are adapted as PEFT adapts transformers 5's stacked experts, as parameters (below `_moe_layers`;
no DoRA there, as in PEFT).

Names come from `weights.py`'s rules: each Hugging Face linear layer is one temper layer, or
several stacked by rows (GPT-2's `c_attn`, Phi-3's `qkv_proj` and `gate_up_proj`), and PEFT adapts
the fused layer with one A and one B where temper has one adapter per part:
- reading, the fused update s * B A splits by rows of B into parts that share A: exact.
- writing, the parts' adapters stack into one of k times the rank, k the most parts adapted in one
  fused layer: A = [A_q; A_k; A_v], B = blockdiag(B_q, B_k, B_v), and alpha times k (rsLoRA:
  sqrt(k)) so that the scale s is unchanged; the other layers' adapters get zero rows up to that
  rank, since a PEFT config holds one rank. Exact as well, DoRA included: its norm and magnitude
  are per output row, and rows do not mix. A part left unadapted has B rows of zero and (DoRA) the
  magnitude ||W|| of its rows, so its scale is exactly 1.

Prefix tuning (`save_peft_prefix`, `load_peft_prefix`): PEFT keeps one `prompt_embeddings` matrix
(P, L * 2 * Hkv * D) that `PeftModel.get_prompt` views as (P, L * 2, Hkv, D): per virtual token, layer
by layer, the key then the value, kv-head by kv-head (PEFT sizes it by num_key_value_heads on GQA
models, its `_prepare_prompt_learning_config`), and hands the result to transformers as a KV cache
of P entries. The model then places the input after the cache, at positions P..P+T-1 (PeftModel
even shifts given position_ids by P), where temper's prefix leaves it at 0..T-1. With RoPE that
shift rotates every query and key by P more: scores between tokens keep their relative positions,
and the prefix keys, which no rotation reaches, are stored rotated by position P, since
R(P + t) q . R(P) k = R(t) q . k. Exact, GQA included. Two cases cannot be matched and are refused
(`peft_prefix_refusal`): learned position embeddings (GPT-2), which the shift changes for every input
token, and a sliding window, under which transformers hides the prefix (cached positions 0..P-1)
from the queries at positions >= window, where temper's prefix stays visible to every query.

It does not read PEFT's other methods (prompt tuning, IA3, ...), rank or alpha patterns (but gate_up_proj's),
`modules_to_save`, adapter biases, adapters on only some layers, or pickled `adapter_model.bin`
files: each is refused with what was found. It never changes the model's base weights: PEFT's copy
of an adapted head's base weight (`lm_head.base_layer.weight`) is not read.
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import nn

from temper.files import atomic_write_json, fsync_dir, safe_join, save_safetensors
from temper.model.attention import apply_rope
from temper.model.config import ModelConfig
from temper.model.hf.config import (
    DEEPSEEK_V2,
    DEEPSEEK_V3,
    ERNIE4_5_MOE,
    GEMMA4,
    GLM4_MOE,
    GLM4_MOE_LITE,
    GPT2,
    GPT_NEOX,
    GRANITE_MOES,
    HUNYUAN_MOE,
    JAMBA,
    LLAMA4,
    MIXERS_ALONE,
    NEMOTRON_H,
    hf_architecture,
    hf_mlp,
)
from temper.model.hf.weights import canonical_name, hf_rules, rope_pair_rows
from temper.model.lora import LoRALinear, apply_lora
from temper.model.prefix import prefix_kv, set_prefix
from temper.model.rope import rope_inv_freq
from temper.model.transformer import Transformer

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
_PREFIX = "base_model.model."  # PeftModel > LoraModel > the transformers model
_A, _B, _M = ".lora_A.weight", ".lora_B.weight", ".lora_magnitude_vector"
_BASE = (".base_layer.weight", ".base_layer.bias")  # copies of an adapted head's own tensors (Phi's has a bias)
_PROMPT = "prompt_embeddings"  # prefix tuning's one tensor
# Config keys of LoRA variants and options whose adapters temper cannot run: refused when set.
_UNSUPPORTED = ("modules_to_save", "lora_bias", "layers_to_transform",
                "layer_replication", "use_qalora", "use_bdlora", "alora_invocation_tokens", "arrow_config",
                "velora_config", "monteclora_config", "kasa_config", "mica", "trainable_token_indices")
"""(rank_pattern, alpha_pattern and target_parameters are read for a mixture of experts only: `_load_moe_plan`.)"""


def _sites(model: nn.Module, cfg: ModelConfig) -> dict[str, tuple[str, ...]]:
    """Each Hugging Face linear layer -> the temper linear layers stacked in it by rows (a mixture's router and
    experts apart: `_save_moe`, `_load_moe_plan`)."""
    sites = {}
    for rule in hf_rules(cfg):
        parts = tuple(p.removesuffix(".weight") for p in rule.parts)
        if any(".mlp.experts." in p or p.endswith(".mlp.router") and not _plain_router(cfg) for p in parts):
            continue
        if rule.hf.endswith(".weight") and all(
                isinstance(model.get_submodule(p), (nn.Linear, LoRALinear)) for p in parts):
            sites[rule.hf.removesuffix(".weight")] = parts
    return sites


def _plain_router(cfg: ModelConfig | None) -> bool:
    """Whether the architecture's router is a plain linear layer that PEFT adapts by its module name (Gemma 4's
    router.proj, Hunyuan's gate.wg), not a parameter of transformers 5's mixture modules (`target_parameters`)."""
    return cfg is not None and cfg.n_experts > 0 and hf_architecture(cfg) in (GEMMA4, HUNYUAN_MOE, LLAMA4)


def _router(cfg: ModelConfig | None) -> str:
    """The name of a mixture's router module in transformers' models: the Granite mixtures' and Jamba's `router`, the
    others' `gate`."""
    return "router" if cfg is not None and hf_architecture(cfg) in (*GRANITE_MOES, JAMBA) else "gate"


def _reordered(cfg: ModelConfig) -> dict[str, Any]:
    """Each Hugging Face layer whose output rows the checkpoint orders otherwise than temper (RoPE's adjacent pairs:
    GLM-4's q and k, DeepSeek's q_b_proj and kv_a_proj_with_mqa; Qwen3-Next's groups of in_proj_qkvz and in_proj_ba)
    -> its rule: an adapter's B and DoRA magnitude rows move with the weight's (`_Rule.hf_rows`)."""
    return {r.hf.removesuffix(".weight"): r for r in hf_rules(cfg) if r.rope_pairs or r.groups}


_EXPERT_NAMES_ONLY = (GLM4_MOE, DEEPSEEK_V2, DEEPSEEK_V3, GLM4_MOE_LITE, ERNIE4_5_MOE, HUNYUAN_MOE)
"""Architectures whose gate_proj, up_proj and down_proj module names PEFT turns into its routed experts' parameters
(its `_MOE_TARGET_MODULE_MAPPING`, for transformers 5), though their dense layers and shared experts have linear layers
of those names too: a PEFT file cannot adapt those."""


def peft_lora_refusal(model: nn.Module) -> str | None:
    """Why the model's LoRA adapters have no PEFT file `save_peft` writes, or None: DoRA on a mixture's experts or
    router, which PEFT adapts as parameters (`target_parameters`), where it has no DoRA; any adapter of experts or a
    router stacked in a layout temper writes no PEFT form for (`_stacked_experts`: GPT-OSS's, Gemma 4's, Nemotron
    3's); an adapter of GLM-4.5's, DeepSeek-V2's or V3's, ERNIE 4.5's or Hunyuan's dense or shared-expert MLP layers
    (`_EXPERT_NAMES_ONLY`); an adapter of a Mamba out_proj of Nemotron-H or the mixers-alone architectures, which PEFT
    refuses; an adapter of a Mamba dt_proj, which transformers runs past."""
    loras = [n for n, m in model.named_modules() if isinstance(m, LoRALinear)]
    cfg = getattr(model, "cfg", None)
    if cfg is not None and cfg.n_experts and hf_architecture(cfg) in _EXPERT_NAMES_ONLY:
        mlp = [n for n in loras if ".mlp." in n and ".mlp.experts." not in n and not n.endswith(".mlp.router")]
        if mlp:
            return (f"{mlp[0]} and {len(mlp) - 1} more adapt {hf_architecture(cfg)}'s dense or shared-expert MLP "
                    "layers, whose module names (gate_proj, up_proj, down_proj) PEFT takes for its routed experts' "
                    "parameters, so no PEFT file holds them (adapt the attention and the routed experts for one); the "
                    "merged model holds them")
    in_moe = [n for n in loras if ".mlp.experts." in n or n.endswith(".mlp.router") and not _plain_router(cfg)]
    if in_moe and _stacked_experts(model):
        return (f"{in_moe[0]} and {len(in_moe) - 1} more adapt {hf_architecture(cfg)}'s experts or router, which are "
                "stacked in a layout temper writes no PEFT adapter for (adapt the attention for one); the merged model "
                "holds them")
    if cfg is not None and hf_architecture(cfg) in (NEMOTRON_H, *MIXERS_ALONE):
        out = [n for n in loras if n.endswith(".attn.out_proj")]  # its Mamba layers' (attention's is o_proj)
        if out:
            return (f"{out[0]} and {len(out) - 1} more adapt {hf_architecture(cfg)}'s Mamba out_proj, which PEFT "
                    "refuses on that model (its fused Mamba kernels read out_proj's weight directly); adapt in_proj and "
                    "the other layers for a PEFT file; the merged model holds them")
    steps = [n for n in loras if n.endswith(".attn.dt_proj")]  # Mamba's (FalconMamba's, Jamba's)
    if steps:
        return (f"{steps[0]} and {len(steps) - 1} more adapt {hf_architecture(cfg)}'s dt_proj, whose weight "
                "transformers' Mamba multiplies directly, so a PEFT adapter on it changes nothing there; adapt "
                "in_proj and x_proj for a PEFT file; the merged model holds them")
    moe = [n for n in in_moe if model.get_submodule(n).lora_magnitude is not None]
    if moe:
        return (f"{moe[0]} and {len(moe) - 1} more are DoRA adapters of a mixture's experts or router, which PEFT "
                "adapts as parameters, without DoRA; the merged model holds them")
    return None


def _stacked_experts(model: nn.Module) -> bool:
    """Whether the model's experts are stacked in a layout temper's PEFT reader and writer do not lay out: in its
    Hugging Face checkpoint (GPT-OSS, Gemma 4: `weights._STACKED`), or ungated as transformers 5 holds them (Nemotron
    3's up_proj and down_proj, (E, F, D) and (E, D, F)). Granite's mixtures stack them as transformers 5 holds every
    gated mixture in memory (gate over up, (E, 2F, D)), where PEFT adapts them: written and read as Mixtral's."""
    cfg = getattr(model, "cfg", None)
    return cfg is not None and cfg.n_experts > 0 and hf_architecture(cfg) not in GRANITE_MOES and (
        hf_architecture(cfg) == NEMOTRON_H or any(r.stacked and ".mlp.experts." in r.parts[0] for r in hf_rules(cfg)))


def save_peft(model: nn.Module, cfg: ModelConfig, out_dir: str | Path, base_model_name_or_path: str = "") -> Path:
    """Write the model's LoRA adapters as a PEFT adapter directory for the `hf_architecture(cfg)` model."""
    arch = hf_architecture(cfg)
    loras = {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear)}
    if not loras:
        raise ValueError("the model has no LoRA adapters to save: apply_lora first")
    refusal = peft_lora_refusal(model)
    if refusal:
        raise ValueError(refusal)
    settings = {n: (m.rank, m.alpha, m.rslora, m.lora_magnitude is not None, m.dropout_p) for n, m in loras.items()}
    first = next(iter(settings.values()))
    odd = [n for n, s in settings.items() if s != first]
    if odd:
        raise ValueError(f"a PEFT config holds one (rank, alpha, rslora, dora, dropout): {odd[:4]} differ from {first}")
    rank, alpha, rslora, dora, dropout = first
    sites, pairs = _sites(model, cfg), _reordered(cfg)
    k = max(sum(p in loras for p in parts) for parts in sites.values())  # the most adapted parts in one layer
    k = max(k, 1)  # none: every adapter is a mixture's
    r = rank * k
    moe_tensors, moe_config, moe_written = _save_moe(model, rank, alpha, rslora, r)
    stray = sorted(set(loras) - {p for parts in sites.values() for p in parts} - set(moe_written))
    if stray:
        raise ValueError(f"{stray[:4]} have no counterpart in {arch}")
    tensors: dict[str, torch.Tensor] = {}
    targets = set()
    with torch.no_grad():
        for hf, parts in sites.items():
            mods = [model.get_submodule(p) for p in parts]
            if not any(isinstance(m, LoRALinear) for m in mods):
                continue
            a = torch.zeros(r, mods[0].in_features)  # (r, in)
            b = torch.zeros(sum(m.out_features for m in mods), r)  # (out, r)
            magnitude, row, col = [], 0, 0
            for m in mods:
                if isinstance(m, LoRALinear):
                    a[col:col + rank] = m.lora_a.float().cpu()
                    b[row:row + m.out_features, col:col + rank] = m.lora_b.float().cpu()
                    col += rank
                    magnitude.append(m.lora_magnitude)
                elif dora:  # an unadapted part of a fused layer: g = ||W|| / ||W + 0|| = 1
                    magnitude.append(torch.linalg.norm(m.weight.to(torch.float32), dim=1))
                row += m.out_features
            module = "lm_head" if (arch, hf) == (GPT_NEOX, "embed_out") else hf  # transformers 5's name in memory
            key = _PREFIX + module
            tensors[key + _A], tensors[key + _B] = a, b if hf not in pairs else pairs[hf].hf_rows(b, to_hf=True)
            if dora:
                m = torch.cat([t.float().cpu() for t in magnitude])
                tensors[key + _M] = m if hf not in pairs else pairs[hf].hf_rows(m, to_hf=True)
            targets.add(re.sub(r"^.*\.\d+\.", "", module))  # "self_attn.q_proj", "attn.c_attn", "lm_head"
    config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model_name_or_path or None,
        "r": r, "lora_alpha": alpha * (math.sqrt(k) if rslora else k), "lora_dropout": dropout,
        "target_modules": sorted(targets), "use_rslora": rslora, "use_dora": dora, "bias": "none",
        "fan_in_fan_out": arch == GPT2,  # GPT-2's Conv1D stores (in, out); PEFT resets it per nn.Linear
        "init_lora_weights": True, "inference_mode": True, "modules_to_save": None,
        "rank_pattern": {}, "alpha_pattern": {},
    } | moe_config
    return _write(out_dir, tensors | moe_tensors, config)


def _write(out_dir: str | Path, tensors: dict[str, torch.Tensor], config: dict[str, Any]) -> Path:
    """The weights, then the config: a directory with a config always has its weights."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    target = safe_join(out_dir, ADAPTER_WEIGHTS)
    tmp = target.with_name(f".{ADAPTER_WEIGHTS}.tmp")
    save_safetensors({n: t.contiguous() for n, t in tensors.items()}, tmp, metadata={"format": "pt"})
    os.replace(tmp, target)
    fsync_dir(out_dir)
    atomic_write_json(safe_join(out_dir, ADAPTER_CONFIG), config)
    return out_dir


def _read_json(path: Path, peft_type: str) -> dict[str, Any]:
    """The adapter config at `path`, which must be of `peft_type`."""
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such adapter config")
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: invalid JSON ({e})") from None
    kind = config.get("peft_type") if isinstance(config, dict) else None
    if kind != peft_type:
        raise ValueError(f"{path}: peft_type {kind!r} is not supported here, {peft_type!r} is; temper reads "
                         "'LORA' adapters (with rsLoRA and DoRA) with load_peft and 'PREFIX_TUNING' ones with "
                         "load_peft_prefix")
    return config


def _read_weights(root: Path) -> dict[str, torch.Tensor]:
    path = root / ADAPTER_WEIGHTS
    if not path.is_file():
        pickled = " (only a pickled adapter_model.bin: convert it to safetensors)" if (
            root / "adapter_model.bin").is_file() else ""
        raise FileNotFoundError(f"{path}: no such adapter weights file{pickled}")
    try:
        return load_file(path)
    except SafetensorError as e:
        raise ValueError(f"{path}: not a safetensors file ({e})") from None


def _read_config(path: Path) -> dict[str, Any]:
    config = _read_json(path, "LORA")
    for key in _UNSUPPORTED:
        if config.get(key):
            raise ValueError(f"{path}: {key}={config[key]!r} is not supported")
    if config.get("bias", "none") != "none":
        raise ValueError(f"{path}: bias={config['bias']!r} is not supported (temper's adapters have no biases)")
    for key in ("r", "lora_alpha"):
        if not isinstance(config.get(key), (int, float)) or config[key] <= 0:
            raise ValueError(f"{path}: {key} must be a positive number, got {config.get(key)!r}")
    return config


def load_peft(model: nn.Module, cfg: ModelConfig, adapter_dir: str | Path) -> list[str]:
    """Swap in the LoRA adapters of a PEFT adapter directory (made on the `hf_architecture(cfg)` model).

    Applies LoRA with the config's r, lora_alpha, lora_dropout, use_rslora and use_dora to the
    temper layers whose Hugging Face layers the file adapts, and copies the tensors in. Every key,
    shape and layer is checked before the model changes. Returns the names of the adapted layers.
    """
    root = Path(adapter_dir)
    config = _read_config(root / ADAPTER_CONFIG)
    path = root / ADAPTER_WEIGHTS
    tensors = _read_weights(root)
    r, dora = int(config["r"]), bool(config.get("use_dora"))
    arch = hf_architecture(cfg)
    sites = _sites(model, cfg)
    found: dict[str, dict[str, torch.Tensor]] = {}
    moe = _load_moe_plan(model, config, tensors, path)
    for key, t in tensors.items():
        kind = next((s for s in (_A, _B, _M, *_BASE) if key.endswith(s)), None)
        if kind is None or not key.startswith(_PREFIX) or (kind == _M and not dora):
            raise ValueError(f"{path}: unexpected tensor {key!r}; temper reads {_PREFIX}<layer>"
                             f"{{{_A}, {_B}}} (and {_M} with use_dora)")
        site = canonical_name(key[len(_PREFIX):-len(kind)], arch)  # in memory, transformers 5 may rename a layer
        if key in moe.keys:
            continue
        if site not in sites:
            raise ValueError(f"{path}: {key!r} adapts {site!r}, which is not a linear layer of this {arch} model "
                             f"(it has e.g. {sorted(sites)[:3]})")
        if kind not in _BASE:
            found.setdefault(site, {})[kind] = t
    kinds = {p.rsplit(".", 1)[-1] for site in found for p in sites[site]}  # temper's targets
    unadapted = [s for s, parts in sites.items() if s not in found and any(p.rsplit(".", 1)[-1] in kinds for p in parts)]
    if unadapted:
        raise ValueError(f"{path}: no adapter for {unadapted[:4]}; temper adapts a target in every layer")
    for site, got in found.items():
        mods = [model.get_submodule(p) for p in sites[site]]
        n_out = sum(m.out_features for m in mods)
        shapes = {_A: (r, mods[0].in_features), _B: (n_out, r)} | ({_M: (n_out,)} if dora else {})
        for kind, shape in shapes.items():
            key = _PREFIX + site + kind
            if kind not in got:
                raise ValueError(f"{path}: missing tensor {key!r}")
            if tuple(got[kind].shape) != shape:
                raise ValueError(f"{path}: {key} has shape {list(got[kind].shape)}, expected {list(shape)} "
                                 f"(r={r}, temper {', '.join(sites[site])})")
    rslora = bool(config.get("use_rslora"))
    swapped = apply_lora(model, r, config["lora_alpha"], sorted(kinds), config.get("lora_dropout") or 0.0,
                         rslora=rslora, dora=dora, only={p for site in found for p in sites[site]}) if kinds else []
    swapped += moe.apply(model, rslora)
    pairs = _reordered(cfg)
    with torch.no_grad():
        for site, got in found.items():
            if site in pairs:  # back to temper's rows from the checkpoint's (RoPE's pairs, Qwen3-Next's groups)
                got = {k: pairs[site].hf_rows(v, to_hf=False) if k in (_B, _M) else v for k, v in got.items()}
            row = 0
            for p in sites[site]:
                m = model.get_submodule(p)
                m.lora_a.copy_(got[_A])  # the parts of a fused layer share its A
                m.lora_b.copy_(got[_B][row:row + m.out_features])
                if dora:
                    m.lora_magnitude.copy_(got[_M][row:row + m.out_features])
                row += m.out_features
    return swapped


# ---- a mixture's experts and router: adapted as parameters (PEFT's target_parameters) ---------------------------
#
# transformers 5 holds each MoE layer's experts stacked, as parameters of one `experts` module: gate_up_proj
# (E, 2F, D), gate over up, and down_proj (E, D, F); PEFT adapts them with one LoRA per parameter, rank r_p over the
# experts at once: A (E * r_p, in), expert-major, and B (out, r_p * E), expert-minor, so that expert e's update is
# s * B.view(out, r_p, E)[:, :, e] @ A.view(E, r_p, in)[e]. With both targeted, the gate_up one is the inner
# wrapper (`experts.base_layer.lora_*`) and the down one the outer (`experts.lora_*`). temper's gate and up adapters
# of an expert stack into gate_up's as a fused layer's parts do (rank 2r: PEFT's own rank_pattern when its targets
# are gate_proj and up_proj). The router is the `gate` (Granite's: `router`) module's `weight` parameter: one plain
# (r, D), (E, r) pair.

_GATE_UP, _DOWN = "gate_up_proj", "down_proj"
_GATE_UP_PATTERN = r".*\.gate_up_proj"  # PEFT's key for gate_up's rank and alpha


def _moe_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(the HF prefix of its mlp, e.g. "model.layers.3.mlp" (`hf_mlp`), the MoE module) of each mixture layer."""
    from temper.model.layers import MoE

    mlp = hf_mlp(hf_architecture(model.cfg))
    return [(f"model.layers.{i}.{mlp}", block.mlp) for i, block in enumerate(getattr(model, "layers", []))
            if isinstance(block.mlp, MoE)]


def _stacked(loras: list[list[nn.Module]], rank: int, in_features: int, width: int
             ) -> tuple[torch.Tensor, torch.Tensor]:
    """PEFT's (A, B) of one stacked parameter from each expert's parts (a block of rows each, zero where a part has
    no adapter), `width` >= parts * rank rows per expert (zero beyond)."""
    n = len(loras)
    a = torch.zeros(n, width, in_features)  # (E, r_p, in)
    b = torch.zeros(sum(m.out_features for m in loras[0]), width, n)  # (out, r_p, E)
    for e, parts in enumerate(loras):
        row = 0
        for j, m in enumerate(parts):
            if isinstance(m, LoRALinear):
                a[e, j * rank:(j + 1) * rank] = m.lora_a.float().cpu()
                b[row:row + m.out_features, j * rank:(j + 1) * rank, e] = m.lora_b.float().cpu()
            row += m.out_features
    return a.reshape(n * width, in_features), b.reshape(b.shape[0], width * n)


def _save_moe(model: nn.Module, rank: int, alpha: float, rslora: bool, r: int
              ) -> tuple[dict[str, torch.Tensor], dict, list[str]]:
    """The mixture layers' adapters in PEFT's form, the config keys they need, and the temper modules written. `r`:
    the config's rank, which down_proj's and the router's take (their adapters padded with zeros: a fused linear
    layer beside them, Granite 4.0's shared_mlp.input_linear, makes it a multiple of `rank`, with alpha alike)."""
    tensors: dict[str, torch.Tensor] = {}
    targets = set()
    if _stacked_experts(model):  # their adapters are refused (`peft_lora_refusal`): none to write
        return tensors, {}, []
    for hf, moe in _moe_layers(model):
        experts = [[e.gate_proj, e.up_proj] for e in moe.experts], [[e.down_proj] for e in moe.experts]
        adapted = [any(isinstance(m, LoRALinear) for parts in group for m in parts) for group in experts]
        for name, group, on, inner in ((_GATE_UP, experts[0], adapted[0], adapted[1]),
                                       (_DOWN, experts[1], adapted[1], False)):
            if on:
                a, b = _stacked(group, rank, group[0][0].in_features, 2 * rank if name == _GATE_UP else r)
                key = f"{_PREFIX}{hf}.experts{'.base_layer' if inner else ''}"
                tensors[key + _A], tensors[key + _B] = a, b
                targets.add(name)
        if isinstance(moe.router, LoRALinear) and not _plain_router(model.cfg):
            router = _router(model.cfg)
            a, b = moe.router.lora_a.float().cpu(), moe.router.lora_b.float().cpu()
            tensors[f"{_PREFIX}{hf}.{router}{_A}"] = torch.cat((a, a.new_zeros(r - rank, a.shape[1])))
            tensors[f"{_PREFIX}{hf}.{router}{_B}"] = torch.cat((b, b.new_zeros(b.shape[0], r - rank)), dim=1)
            targets.add(f"{router}.weight")
    written = [n for n, m in model.named_modules() if isinstance(m, LoRALinear)
               and (".mlp.experts." in n or n.endswith(".mlp.router") and not _plain_router(model.cfg))]
    if not targets:
        return {}, {}, []
    config: dict = {"target_parameters": sorted(targets),
                    "lora_dropout": 0.0}  # PEFT refuses dropout on adapted parameters; it never changes the function
    if _GATE_UP in targets:  # gate over up: twice the rank, and alpha to keep the scale
        config |= {"rank_pattern": {_GATE_UP_PATTERN: 2 * rank},
                   "alpha_pattern": {_GATE_UP_PATTERN: alpha * (math.sqrt(2) if rslora else 2)}}
    return tensors, config, written


@dataclass
class _MoePlan:
    """What `load_peft` takes from a file's target_parameters: the keys it reads, and how to apply them."""

    keys: set[str] = field(default_factory=set)
    groups: list[tuple[tuple[str, ...], int, float, list[tuple[nn.Module, str, torch.Tensor, torch.Tensor]]]] = field(
        default_factory=list)  # (temper targets, rank, alpha, [(parent, child name, A, B)])

    def apply(self, model: nn.Module, rslora: bool) -> list[str]:
        """Swap in the adapters, group by group (each its own rank), and copy the tensors in."""
        swapped = []
        routed = {n for n, _ in model.named_modules() if ".mlp.experts." in n or n.endswith(".mlp.router")}
        for targets, rank, alpha, copies in self.groups:
            trained = [p for p in model.parameters() if p.requires_grad]  # apply_lora freezes all else
            swapped += apply_lora(model, rank, alpha, targets, rslora=rslora, only=routed)  # not a shared expert
            for p in trained:
                p.requires_grad_(True)
            with torch.no_grad():
                for parent, name, a, b in copies:
                    getattr(parent, name).lora_a.copy_(a)
                    getattr(parent, name).lora_b.copy_(b)
        return swapped


def _load_moe_plan(model: nn.Module, config: dict[str, Any], tensors: dict[str, torch.Tensor], path: Path
                   ) -> _MoePlan:
    """Read and check a file's adapters of the mixture layers (`target_parameters`) before the model changes. A plain
    router (`_plain_router`) is adapted by module name: PEFT lists its mixture's router parameter anyway, matching
    nothing, and writes no tensor for it."""
    params = config.get("target_parameters") or []
    cfg = getattr(model, "cfg", None)
    router = f"{_router(cfg)}.weight"  # the router's parameter, as PEFT names it
    if _plain_router(cfg):
        params = [p for p in params if p != router]
    plan = _MoePlan()
    for key in ("rank_pattern", "alpha_pattern"):  # read for gate_up_proj alone
        if set(config.get(key) or {}) - ({_GATE_UP_PATTERN} if _GATE_UP in params else set()):
            raise ValueError(f"{path}: {key}={config[key]!r} is not supported (temper reads {_GATE_UP_PATTERN!r}, "
                             "the rank and alpha of a mixture's gate_up_proj)")
    if not params:
        return plan
    layers = _moe_layers(model)
    odd = sorted(set(params) - {_GATE_UP, _DOWN, router})
    if odd or not layers or _stacked_experts(model):
        raise ValueError(f"{path}: target_parameters={params!r} is not supported (temper reads {_GATE_UP!r}, "
                         f"{_DOWN!r} and {router!r} of Mixtral's and Qwen3-MoE's experts, not those GPT-OSS's and "
                         "Gemma 4's checkpoints store stacked)")
    if config.get("use_dora"):
        raise ValueError(f"{path}: use_dora with target_parameters is not supported (PEFT has no DoRA there)")
    r, alpha = int(config["r"]), config["lora_alpha"]
    ranks = {_GATE_UP: (int((config.get("rank_pattern") or {}).get(_GATE_UP_PATTERN, r)),
                        (config.get("alpha_pattern") or {}).get(_GATE_UP_PATTERN, alpha)),
             _DOWN: (r, alpha), router: (r, alpha)}
    copies: dict[str, list] = {name: [] for name in params}
    for hf, moe in layers:
        n = len(moe.experts)
        for name in params:
            inner = name == _GATE_UP and _DOWN in params
            key = f"{_PREFIX}{hf}.{name.removesuffix('.weight') if name == router else 'experts'}"
            key += ".base_layer" if inner else ""
            rank = ranks[name][0]
            e0 = moe.experts[0]
            if name == router:
                shapes = {_A: (rank, moe.router.in_features), _B: (n, rank)}
            elif name == _GATE_UP:
                shapes = {_A: (n * rank, e0.gate_proj.in_features), _B: (2 * e0.gate_proj.out_features, rank * n)}
            else:
                shapes = {_A: (n * rank, e0.down_proj.in_features), _B: (e0.down_proj.out_features, rank * n)}
            for kind, shape in shapes.items():
                if key + kind not in tensors:
                    raise ValueError(f"{path}: missing tensor {key + kind!r} ({name} of a mixture layer)")
                if tuple(tensors[key + kind].shape) != shape:
                    raise ValueError(f"{path}: {key + kind} has shape {list(tensors[key + kind].shape)}, expected "
                                     f"{list(shape)} ({name}, rank {rank}, {n} experts)")
                plan.keys.add(key + kind)
            a, b = tensors[key + _A], tensors[key + _B]
            if name == router:
                copies[name].append((moe, "router", a, b))
                continue
            a, b = a.view(n, rank, -1), b.view(b.shape[0], rank, n)
            for e, expert in enumerate(moe.experts):
                parts = ("gate_proj", "up_proj") if name == _GATE_UP else ("down_proj",)
                row = 0
                for part in parts:  # the parts of gate_up share its A (a fused layer's rule)
                    out = getattr(expert, part).out_features
                    copies[name].append((expert, part, a[e], b[row:row + out, :, e]))
                    row += out
    for name in params:
        targets = {_GATE_UP: ("gate_proj", "up_proj"), _DOWN: ("down_proj",), router: ("router",)}[name]
        plan.groups.append((targets, *ranks[name], copies[name]))
    return plan


def peft_prefix_refusal(cfg: ModelConfig) -> str | None:
    """Why PEFT's prefix tuning would compute something else than temper's prefix on this model; None
    when it computes the same (see the module docstring)."""
    if cfg.kv_lora_rank:
        return ("latent attention (DeepSeek-V3) caches one latent per token, not keys and values, so a prefix of keys "
                "and values has no place in it")
    if cfg.pos != "rope":
        return (f"PEFT's prefix tuning places the input after the prefix, at positions P..P+T-1 (transformers "
                f"counts the prefix as cached tokens), temper's prefix leaves it at 0..T-1; with {cfg.pos} position "
                f"embeddings ({hf_architecture(cfg)}) that moves every token's position embedding, so no PEFT "
                "prefix file gives temper's logits")
    if (cfg.rope_scaling or {}).get("rope_type") == "longrope":
        return ("with LongRoPE, transformers switches to the long table by the last position, which PEFT's prefix "
                "moves P later than temper's, so the two switch at different lengths")
    if cfg.sliding_window is not None:
        return (f"with sliding_window={cfg.sliding_window}, transformers hides PEFT's prefix (cached positions "
                f"0..P-1) from queries at positions >= {cfg.sliding_window}, temper's prefix stays visible to "
                "every query; only a model without a sliding window can be matched")
    return None


def _rotate(kv: torch.Tensor, position: int, cfg: ModelConfig) -> None:
    """Rotate the keys of prefix_kv's (L, 2, Hkv, P, D) in place as RoPE rotates a key at `position` (negative: back),
    in the layers that rotate (not NoPE ones)."""
    angle = position * rope_inv_freq(cfg)  # (D/2,), the float32 product of temper's and HF's tables
    layers = [i for i in range(cfg.n_layers) if not cfg.is_nope(i)]
    kv[layers, 0] = apply_rope(kv[layers, 0], angle.cos(), angle.sin())


def _key_layout(kv: torch.Tensor, cfg: ModelConfig, to_hf: bool) -> None:
    """Move the prefix keys' dims (L, 2, Hkv, P, D) in place between temper's RoPE layout and the checkpoint's where
    they differ (GLM-4's adjacent pairs: `rope_pair_rows`, on the last axis)."""
    pairs = next((r.rope_pairs for r in _reordered(cfg).values() if r.rope_pairs), None)
    if pairs is not None:
        kv[:, 0] = rope_pair_rows(kv[:, 0].movedim(-1, 0), pairs, to_hf).movedim(0, -1)


def save_peft_prefix(model: Transformer, cfg: ModelConfig, out_dir: str | Path,
                     base_model_name_or_path: str = "") -> Path:
    """Write the model's prefix as a PEFT prefix-tuning adapter for the `hf_architecture(cfg)` model."""
    refusal = peft_prefix_refusal(cfg)
    if refusal:
        raise ValueError(f"cannot write the prefix in PEFT's format: {refusal}")
    kv = prefix_kv(model)  # (L, 2, Hkv, P, D)
    L, _, H, P, D = kv.shape
    _rotate(kv, P, cfg)  # PEFT's input starts at position P: R(P+t) q . R(P) k = R(t) q . k
    _key_layout(kv, cfg, to_hf=True)
    config = {
        "peft_type": "PREFIX_TUNING", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model_name_or_path or None,
        "num_virtual_tokens": P, "num_layers": L, "token_dim": H * D, "num_attention_heads": H,
        "encoder_hidden_size": H * D, "num_transformer_submodules": 1, "prefix_projection": False,
        "inference_mode": True, "modules_to_save": None,
    }
    return _write(out_dir, {_PROMPT: kv.permute(3, 0, 1, 2, 4).reshape(P, L * 2 * H * D)}, config)


def load_peft_prefix(model: Transformer, cfg: ModelConfig, adapter_dir: str | Path) -> list[str]:
    """Give the model the prefix of a PEFT prefix-tuning adapter directory (made on the
    `hf_architecture(cfg)` model) as trainable slots, and freeze everything else.

    The config and the tensor are checked against the model before it changes; a prefix saved with
    `prefix_projection` holds its evaluated keys and values, as any other. Returns the prefix modules' names.
    """
    root = Path(adapter_dir)
    config_path = root / ADAPTER_CONFIG
    config = _read_json(config_path, "PREFIX_TUNING")
    refusal = peft_prefix_refusal(cfg)
    if refusal:
        raise ValueError(f"{root}: cannot read a PEFT prefix onto this model: {refusal}")
    H, D = cfg.kv_heads, cfg.head_dim
    expected = {"task_type": "CAUSAL_LM", "num_transformer_submodules": 1, "num_layers": cfg.n_layers,
                "token_dim": H * D, "num_attention_heads": H}
    for key, want in expected.items():
        if config.get(key) not in (None, want):  # None or absent: PEFT derives it from the model, as here
            raise ValueError(f"{config_path}: {key}={config[key]!r}, this model needs {want!r} (n_layers "
                             f"{cfg.n_layers}, n_kv_heads {H} x head_dim {D})")
    P = config.get("num_virtual_tokens")
    if not isinstance(P, int) or P <= 0:
        raise ValueError(f"{config_path}: num_virtual_tokens must be a positive integer, got {P!r}")
    tensors = _read_weights(root)
    path = root / ADAPTER_WEIGHTS
    if set(tensors) != {_PROMPT}:
        raise ValueError(f"{path}: expected the one tensor {_PROMPT!r}, found {sorted(tensors)[:4]}")
    emb = tensors[_PROMPT]
    shape = (P, cfg.n_layers * 2 * H * D)
    if tuple(emb.shape) != shape:
        raise ValueError(f"{path}: {_PROMPT} has shape {list(emb.shape)}, expected {list(shape)} "
                         f"(num_virtual_tokens, n_layers {cfg.n_layers} x 2 x n_kv_heads {H} x head_dim {D})")
    kv = emb.float().view(P, cfg.n_layers, 2, H, D).permute(1, 2, 3, 0, 4).contiguous()  # (L, 2, Hkv, P, D)
    _key_layout(kv, cfg, to_hf=False)
    _rotate(kv, -P, cfg)  # back to temper's input at 0..T-1 (module docstring)
    return set_prefix(model, kv)
