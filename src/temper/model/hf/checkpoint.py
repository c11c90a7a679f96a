"""Hugging Face checkpoint directories in and out: `read_hf_config`, `load_hf`, `load_score_hf` (a reward model's
decoder and score head) and `save_hf` (config.json, the weights in one file or shards, generation_config.json,
tokenizer.json; a `*ForSequenceClassification` head when asked).

Loading builds the model on the meta device, allocates it once in the asked dtype and reads each
tensor straight into its parameter, so a model is never held twice. Quantized weights as published (GPT-OSS's MXFP4
experts, DeepSeek-V3's block-scaled FP8) are dequantized as they load. Every fault of the input is a CheckpointError
naming the file (and the key or tensor).

It does not read or write tokenizer files beyond copying `tokenizer.json` (data/tokenizer.py does),
and it does not need `transformers` (only the tests import it, to prove both directions). What a config or a
tensor means is config.py's and weights.py's; how a weight file is read, files.py's.
"""

from __future__ import annotations

import math
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from torch import nn

from temper.errors import InputError
from temper.files import (
    atomic_write_json,
    check_remote_code,
    fsync_dir,
    read_json_object,
    safe_join,
    save_safetensors,
)
from temper.model.config import ModelConfig
from temper.model.hf.config import (
    GPT_OSS,
    _fp8_block_shape,
    from_hf_config,
    hf_architecture,
    sequence_classification_architecture,
    to_hf_config,
)
from temper.model.hf.files import CheckpointError, SafetensorsFile, _member, _PickledFile, _weight_files
from temper.model.hf.weights import (
    _FUSED_EXPERTS,
    _check_shape,
    _ignored,
    _Rule,
    _to_temper,
    canonical_name,
    from_hf_state_dict,
    hf_rules,
    part_rows,
    to_hf_state_dict,
)
from temper.model.transformer import Transformer

MAX_SHARD_BYTES = 5 << 30  # transformers' default shard size: a file per ~5 GB
_SLICE_BYTES = 16 << 20  # a tensor cast on loading is read in slices of about this size
SCORE = "score.weight"
"""The one-label head of a `*ForSequenceClassification` checkpoint: (1, hidden) scores the last real token."""


def read_hf_config(path: str | Path) -> ModelConfig:
    """The ModelConfig of a checkpoint directory's config.json; any fault is a CheckpointError
    naming the file (and the key)."""
    return _read_config(Path(path))[0]


def _read_config(root: Path) -> tuple[ModelConfig, tuple[int, int] | None]:
    """(`read_hf_config`, the FP8 weights' block shape or None)."""
    config_path = _member(root, "config.json")
    if not config_path.is_file():
        raise CheckpointError(f"{root}: no config.json")
    d = read_json_object(config_path, CheckpointError)
    try:
        return from_hf_config(d), _fp8_block_shape(d)
    except KeyError as e:
        raise CheckpointError(f"{config_path}: missing key {e}") from None
    except ValueError as e:  # a field of the wrong type, an architecture or option temper cannot reproduce
        raise CheckpointError(f"{config_path}: {e}") from None


def load_hf(
    path: str | Path, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
    allow_pickle: bool = False, trust_remote_code: bool = False, revision: str | None = None,
) -> tuple[Transformer, ModelConfig]:
    """Build a Transformer (in eval mode) from a Hugging Face checkpoint directory.

    No code of the checkpoint ever runs: `trust_remote_code` is taken only to refuse True without a
    pinned `revision` (`temper.files.check_remote_code`), as every loader does.

    The model is built on the meta device and given its weights: on the CPU, a tensor stored as
    temper uses it is a copy-on-write map of the file (no copy at all); any other is read into a
    new tensor of its final device and dtype (through one temporary when it must be split,
    transposed or cast). The weights are never held twice. Quantized weights as published (GPT-OSS's MXFP4 experts,
    DeepSeek-V3's block-scaled FP8) are dequantized one tensor at a time, into the asked dtype.
    """
    try:
        check_remote_code(trust_remote_code, revision)
    except InputError as e:
        raise CheckpointError(f"{path}: {e}") from None
    root = Path(path)
    cfg, fp8 = _read_config(root)
    arch = hf_architecture(cfg)
    device = torch.device(device)
    with torch.device("meta"):
        model = Transformer(cfg).to(dtype)  # the dtype of each tensor: a few stay float32 (`MoE._apply`)
    shapes = {k: v.shape for k, v in model.state_dict().items()}
    dtypes = {k: v.dtype for k, v in model.state_dict().items()}
    rules = {r.hf: r for r in hf_rules(cfg)}
    seen: dict[str, Path] = {}
    sd: dict[str, torch.Tensor] = {}
    mxfp4: dict[str, dict[str, torch.Tensor]] = {}  # a quantized tensor's blocks or scales, until both are read
    scaled: dict[str, dict[str, torch.Tensor]] = {}  # an FP8 weight or its scales, until both are read
    scratch = torch.empty(0, dtype=torch.uint8)
    with torch.no_grad():
        for f in _weight_files(root, allow_pickle):
            for name, (src_dtype, shape, _, _) in f.entries.items():
                if _ignored(name, cfg):
                    continue
                whole = None  # a tensor read whole: the stacked experts (GPT-OSS), dequantized from MXFP4 or FP8
                if arch == GPT_OSS and name.endswith(("_blocks", "_scales")):
                    name, half = name.rsplit("_", 1)
                    if half in mxfp4.get(name, {}):
                        raise CheckpointError(f"{f.path}: tensor {name + '_' + half!r} is in two files")
                    mxfp4.setdefault(name, {})[half] = f.read(f"{name}_{half}")
                    if len(mxfp4[name]) < 2:
                        continue
                    whole = _dequantize_mxfp4(mxfp4[name].pop("blocks"), mxfp4.pop(name)["scales"], f.path, name)
                    shape = whole.shape
                elif fp8 and (name.endswith(".weight_scale_inv") or src_dtype == torch.float8_e4m3fn):
                    half = "scales" if name.endswith("_scale_inv") else "weight"
                    name = name.removesuffix("_scale_inv")
                    if half in scaled.get(name, {}):
                        raise CheckpointError(f"{f.path}: tensor {name + ('_scale_inv' if half == 'scales' else '')!r}"
                                              " is in two files")
                    scaled.setdefault(name, {})[half] = f.read(name + ("_scale_inv" if half == "scales" else ""))
                    if len(scaled[name]) < 2:
                        continue
                    parts = scaled.pop(name)
                    whole = _dequantize_fp8(parts["weight"], parts["scales"], fp8, f.path, name)
                    shape = whole.shape
                if whole is None and src_dtype in (torch.float8_e4m3fn, torch.float8_e5m2):
                    raise CheckpointError(f"{f.path}: tensor {name!r} is {src_dtype} but config.json declares no FP8 "
                                          "quantization_config to scale it by; temper reads fine-grained FP8 "
                                          "(quant_method fp8, weight_block_size)")
                key = canonical_name(name, arch)
                rule = rules.get(key)
                if rule is None:
                    fused = (" (experts stacked in one tensor, as save_pretrained(save_original_format=False) "
                             "writes them: save with the default to write them one by one)"
                             if name.endswith(_FUSED_EXPERTS) else "")
                    raise CheckpointError(f"{f.path}: unexpected tensor {name!r} for {arch}{fused}")
                if key in seen:
                    raise CheckpointError(f"{f.path}: tensor {name!r} is also in {seen[key]}")
                seen[key] = f.path
                _check_shape(rule, shape, shapes, str(f.path))
                if whole is not None or rule.stacked or rule.rope_pairs or rule.groups or not shape:  # whole:
                    # dequantized, every expert's part copied out, rows moved, or a scalar (no rows to read)
                    whole = f.read(name) if whole is None else whole
                    parts = _to_temper(rule, whole, part_rows(rule, shapes))
                    sd |= {p: t.to(device, dtypes[p], copy=True).contiguous()
                           for p, t in zip(rule.parts, parts, strict=True)}
                    continue
                if (len(rule.parts) == 1 and not rule.transpose and src_dtype == dtypes[rule.parts[0]]
                        and device.type == "cpu"):
                    view = f.mapped(name)
                    if view is not None:
                        sd[rule.parts[0]] = view
                        continue
                outs = [torch.empty(shapes[p], dtype=dtypes[p], device=device) for p in rule.parts]
                sd.update(zip(rule.parts, outs, strict=True))
                scratch = _read_into(f, name, rule, outs, scratch)
    if mxfp4:
        name, half = next((n, next(iter(h))) for n, h in mxfp4.items())
        raise CheckpointError(f"{root}: {name}_{half} has no {'scales' if half == 'blocks' else 'blocks'} tensor")
    if scaled:
        name, half = next((n, next(iter(h))) for n, h in scaled.items())
        raise CheckpointError(f"{root}: FP8 {name} has no weight_scale_inv tensor" if half == "weight"
                              else f"{root}: {name}_scale_inv scales no FP8 weight")
    missing = [r.hf for r in rules.values() if r.hf not in seen]
    if missing:
        raise CheckpointError(f"{root}: missing tensors {missing[:8]}{'...' if len(missing) > 8 else ''}")
    model.load_state_dict(sd, strict=True, assign=True)
    model.init_buffers(device)
    return model.eval(), cfg


def _read_into(f: SafetensorsFile | _PickledFile, name: str, rule: _Rule, outs: list[torch.Tensor],
               scratch: torch.Tensor) -> torch.Tensor:
    """Fill temper's tensors `outs` from checkpoint tensor `name`, cast and moved on the way, read
    in slices of rows through `scratch` (returned, grown if it had to be): one buffer of about
    _SLICE_BYTES for the whole load, since temporaries allocated per tensor fragment the heap
    (~25% more memory at the peak, measured on GPT-2)."""
    dtype, shape, _, _ = f.entries[name]
    row_bytes = max(1, math.prod(shape[1:]) * dtype.itemsize)
    step = max(1, _SLICE_BYTES // row_bytes)
    if scratch.numel() < min(step, shape[0]) * row_bytes:
        scratch = torch.empty(min(step, shape[0]) * row_bytes, dtype=torch.uint8)
    ends = [0]
    for out in outs:  # where each part starts along the split axis (rows, or columns when transposed)
        ends.append(ends[-1] + out.shape[0])
    for r in range(0, shape[0], step):
        chunk = f.read(name, slice(r, r + step), scratch)  # (k, ...) rows r.. of the checkpoint's tensor
        for out, lo, hi in zip(outs, ends, ends[1:], strict=False):
            if rule.transpose:  # checkpoint (in, sum(out)): these rows are columns r.. of every part
                out[:, r:r + len(chunk)].copy_(chunk[:, lo:hi].t())
            elif lo < r + len(chunk) and hi > r:  # the rows of this part inside the slice
                a, b = max(lo, r), min(hi, r + len(chunk))
                out[a - lo:b - lo].copy_(chunk[a - r:b - r])
    return scratch


_FP4_E2M1 = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)


def _dequantize_fp8(weight: torch.Tensor, scales: torch.Tensor, block: tuple[int, int], path: Path, name: str
                    ) -> torch.Tensor:
    """A fine-grained FP8 weight in float32: each (rows, columns) block of the float8_e4m3fn (out, in) weight times its
    float32 scale (`weight_scale_inv`, (ceil(out / rows), ceil(in / columns))), as DeepSeek's `weight_dequant` and
    its fp8_cast_bf16.py compute it; the caller rounds it to the model's dtype."""
    rows, cols = block
    if weight.dtype != torch.float8_e4m3fn or weight.dim() != 2 or scales.shape != (
            -(-weight.shape[0] // rows), -(-weight.shape[1] // cols)):
        raise CheckpointError(f"{path}: {name} {list(weight.shape)} ({weight.dtype}) and its weight_scale_inv "
                              f"{list(scales.shape)} are not FP8 in blocks of {rows} x {cols}")
    full = scales.float().repeat_interleave(rows, 0)[: weight.shape[0]].repeat_interleave(cols, 1)[:, : weight.shape[1]]
    return weight.float() * full  # (out, in)


def _dequantize_mxfp4(blocks: torch.Tensor, scales: torch.Tensor, path: Path, name: str) -> torch.Tensor:
    """GPT-OSS's MXFP4 experts (the OCP microscaling format): blocks (E, out, G, 16) uint8, two FP4 (E2M1) values a
    byte, low nibble first; scales (E, out, G) uint8, a power of two biased by 127 for each 32 values. Returns the
    (E, in = 32 G, out) weights in bf16, which holds every such value exactly; one expert at a time, since the
    index tensors are 4 bytes a value."""
    if blocks.dtype != torch.uint8 or scales.dtype != torch.uint8 or blocks.shape[-1:] != (16,) or (
            blocks.shape[:-1] != scales.shape or blocks.dim() != 4):
        raise CheckpointError(f"{path}: {name}_blocks {list(blocks.shape)} ({blocks.dtype}) and _scales "
                              f"{list(scales.shape)} ({scales.dtype}) are not MXFP4 (uint8 (E, out, G, 16) and "
                              "(E, out, G))")
    lut = torch.tensor(_FP4_E2M1, dtype=torch.bfloat16)
    E, out, G, _ = blocks.shape
    weights = torch.empty(E, out, G * 32, dtype=torch.bfloat16)
    for e in range(E):
        values = torch.stack((lut[(blocks[e] & 0x0F).int()], lut[(blocks[e] >> 4).int()]), dim=-1)  # (out, G, 16, 2)
        exponents = scales[e].int()[..., None] - 127  # (out, G, 1)
        weights[e] = torch.ldexp(values.view(out, G, 32), exponents).view(out, G * 32)
    return weights.transpose(1, 2)  # (E, in, out)


def load_score_hf(path: str | Path, dtype: torch.dtype = torch.float32) -> tuple[Transformer, torch.Tensor, ModelConfig]:
    """(decoder, score weight (1, dim), config) of a one-label `*ForSequenceClassification` checkpoint
    (a reward model, from temper's `save_hf(..., score=...)` or from transformers), on the CPU.

    Such a checkpoint has no language-model head; an untied decoder gets a zero one, which nothing
    reads (the score head replaces it)."""
    root = Path(path)
    cfg = read_hf_config(root)
    arch = hf_architecture(cfg)
    sd: dict[str, torch.Tensor] = {}
    score = None
    for f in _weight_files(root, allow_pickle=False):
        for name in f.entries:
            if name == SCORE:
                score = f.read(name).to(dtype)
            elif not _ignored(name, cfg) and name != "lm_head.weight":
                sd[canonical_name(name, arch)] = f.read(name).to(dtype)
    if score is None or score.shape != (1, cfg.dim):
        raise CheckpointError(f"{root}: not a one-label sequence-classification checkpoint: "
                              f"{'no ' + SCORE if score is None else f'{SCORE} has shape {tuple(score.shape)}'}")
    if not cfg.tie_embeddings:
        sd["lm_head.weight"] = torch.zeros(cfg.vocab_size, cfg.dim, dtype=dtype)
    model = Transformer(cfg)
    try:
        model.load_state_dict(from_hf_state_dict(cfg, sd), strict=True)
    except (KeyError, RuntimeError, ValueError) as e:
        raise CheckpointError(f"{root}: {e}") from None
    return model.eval(), score, cfg


def save_hf(
    model_or_state: nn.Module | dict[str, torch.Tensor], cfg: ModelConfig, out_dir: str | Path, *,
    tokenizer_json: str | Path | None = None, generation_config: dict[str, Any] | None = None,
    max_shard_bytes: int = MAX_SHARD_BYTES, score: torch.Tensor | None = None,
) -> Path:
    """Write `config.json`, the weights, `generation_config.json` (and `tokenizer.json`) to out_dir.

    score: (1, dim) weight of a reward model's head: the checkpoint is then a one-label
    `*ForSequenceClassification` (`score.weight` in place of the language-model head), which
    transformers scores at each row's last token that is not `pad_token_id` (give it in generation_config).

    Weights above `max_shard_bytes` are split into `model-0000k-of-0000n.safetensors` files with a
    `model.safetensors.index.json`, as transformers writes them; weight files of an earlier save
    that the new one does not use are removed. generation_config's bos/eos/pad token ids are also
    written into config.json, where some readers look for them. Every file is written to a
    temporary name and renamed into place.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    sd = model_or_state.state_dict() if isinstance(model_or_state, nn.Module) else model_or_state
    tensors = {k: v.cpu() for k, v in to_hf_state_dict(cfg, sd).items()}
    if score is not None:
        tensors.pop("lm_head.weight", None)
        tensors[SCORE] = score.detach().reshape(1, cfg.dim).cpu().contiguous()
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, t in tensors.items():
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = t
        size += nbytes
    names = ["model.safetensors"] if len(shards) == 1 else [
        f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    for name, shard in zip(names, shards, strict=True):
        target = safe_join(out_dir, name)
        tmp = target.with_name(f".{name}.tmp")
        save_safetensors(shard, tmp, metadata={"format": "pt"})  # "format" is required by transformers
        os.replace(tmp, target)
    index = out_dir / "model.safetensors.index.json"
    if len(shards) > 1:
        total = sum(t.numel() * t.element_size() for t in tensors.values())
        weight_map = {k: n for n, shard in zip(names, shards, strict=True) for k in shard}
        atomic_write_json(index, {"metadata": {"total_size": total}, "weight_map": weight_map})
    stale = [p for p in out_dir.glob("model*.safetensors") if p.name not in names]
    for old in stale + ([index] if len(shards) == 1 else []):
        old.unlink(missing_ok=True)
    fsync_dir(out_dir)
    gen = dict(generation_config or {})
    hf_cfg = to_hf_config(cfg)
    hf_cfg |= {k: gen[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id") if k in gen}
    hf_cfg["torch_dtype"] = str(next(iter(tensors.values())).dtype).removeprefix("torch.")
    if score is not None:
        hf_cfg |= {"architectures": [sequence_classification_architecture(cfg)], "num_labels": 1,
                   "id2label": {"0": "LABEL_0"}, "label2id": {"LABEL_0": 0}}
    atomic_write_json(safe_join(out_dir, "config.json"), hf_cfg)
    atomic_write_json(safe_join(out_dir, "generation_config.json"), gen)
    if tokenizer_json is not None:
        target = safe_join(out_dir, "tokenizer.json")
        if Path(tokenizer_json).resolve() != target:
            tmp_tok = target.with_name(".tokenizer.json.tmp")
            shutil.copyfile(tokenizer_json, tmp_tok)
            os.replace(tmp_tok, target)
    return out_dir
