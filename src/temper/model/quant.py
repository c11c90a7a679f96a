"""QLoRA's frozen base (Dettmers et al. 2023): linear weights in 4-bit NormalFloat (NF4) with double quantization.

`quantize_nf4` replaces the weights of the targeted linear layers (plain `nn.Linear`, or the frozen
base of a `LoRALinear`) by torchao's `NF4Tensor`: each block of `block_size` weights is scaled by its
absolute maximum and rounded to the nearest of 16 levels placed at the quantiles of a normal
distribution (QLoRA §3, NF4), and the per-block scales are themselves quantized to 8 bits in blocks
of `scaler_block_size` (double quantization), about 0.5 + 1/64 bytes per weight. The layers'
forward is unchanged: `F.linear` on an NF4 weight is dispatched by torchao to `linear_nf4`, which
dequantizes to the input's dtype, and whose backward gives the input's gradient and no weight
gradient. `dequantize` turns the weights back into plain tensors; `merge_lora` (lora.py) merges
adapters over an NF4 base into plain layers of a chosen dtype, for export.

It does not implement NF4 itself (torchao does, on CPU and CUDA), train, or save NF4 checkpoints:
a QLoRA run exports its merged, dequantized model in the Hugging Face layout (hf/checkpoint.py) or its
adapters in PEFT's (hf/peft.py).

`quantize_for_inference` quantizes a loaded model's linear weights for generation (`temper generate
/ evaluate / serve --quant`), with torchao's weight-only formats; the activations stay in the model's
dtype and each layer's `F.linear` is dispatched by torchao to:
  - "int8": `Int8WeightOnlyConfig`, int8 per output row (or per group) with a float scale: the int8
    weight is cast to the activation's dtype inside the product and the output rescaled
    (`torch.compile` fuses the cast into the matmul); CPU and CUDA, any float dtype.
  - "int4": 4-bit asymmetric per group of `group_size` input features, two codes per byte, with a
    scale and zero point per group, as gpt-fast's int4 (tinygemm): on CPU torchao's
    `PrototypeInt4WeightOnlyConfig` (`aten._weight_int4pack_mm_for_cpu`, any float dtype), on CUDA
    `Int4WeightOnlyConfig(int4_packing_format="tile_packed_to_4d")` (`aten._weight_int4pack_mm`,
    bfloat16 and compute capability >= 8.0 only).
  - "nf4": QLoRA's NF4 above, `group_size` weights per block: dequantized to the activation's dtype,
    then a dense matmul (smaller weights, no faster kernel).
The embeddings, norms and output head stay in the model's dtype: a tied head is the embedding table
(an embedding lookup, not a product), and the logits are the most error-sensitive product (bitsandbytes
and QLoRA keep lm_head unquantized too). What stays unquantized is a model's embeddings and head:
13% of Llama-3-8B's weights, 21% of Llama-3.2-1B's (tied), 40% of a 125M model with a 32k vocabulary,
so small models shrink less than the rule of thumb. It does not quantize activations or the KV cache, calibrate (GPTQ, AWQ), or save
quantized checkpoints: a checkpoint is quantized each time it is loaded, in seconds.

torchao is an optional dependency (`temper[quant]`): without it this module imports, but quantizing
raises a QuantError saying how to install it.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import nn

from temper.errors import InputError
from temper.model.lora import block_linears, find_linears

try:
    from torchao.quantization import NF4Tensor, to_nf4
except ImportError:
    try:  # torchao < 0.15 kept NF4 under dtypes/
        from torchao.dtypes.nf4tensor import NF4Tensor, to_nf4
    except ImportError:  # no torchao: quantizing says how to install it
        NF4Tensor = to_nf4 = None

QUANT_KINDS = ("int8", "int4", "nf4")
"""What `quantize_for_inference` (and `--quant`) accepts."""
DEFAULT_GROUP_SIZE: dict[str, int | None] = {"int8": None, "int4": 64, "nf4": 64}
"""Weights per scale: int8 one scale per output row (None); the 4-bit kinds 64 (QLoRA's NF4 block, and
one group size for both so their errors compare; llama.cpp's Q4_0 uses 32, torchao defaults to 128)."""


class QuantError(InputError):
    """A quantization this model, device or torchao cannot do: the kind, the layers or the device, and what would."""


def is_nf4(t: torch.Tensor) -> bool:
    """Whether `t` is an NF4-quantized weight."""
    return NF4Tensor is not None and isinstance(t, NF4Tensor)


def storage_bytes(t: torch.Tensor) -> int:
    """Bytes a weight occupies: for a torchao tensor (NF4, int8, int4), the inner tensors it holds (codes,
    scales, zero points; NF4's block factors, mean and 16-entry table too); for a plain tensor, numel *
    element size."""
    if hasattr(t, "__tensor_flatten__"):  # a wrapper subclass: only its inner tensors hold memory
        names, _ = t.__tensor_flatten__()
        return sum(storage_bytes(getattr(t, n)) for n in names if getattr(t, n) is not None)
    return t.numel() * t.element_size()


def weight_bytes(model: nn.Module) -> int:
    """Bytes of the model's parameters as stored (a tied weight once): what quantization shrinks."""
    return sum(storage_bytes(p) for p in {id(p): p for p in model.parameters()}.values())


def quantize_nf4(
    model: nn.Module, targets: Iterable[str] | None = None, block_size: int = 64,
    scaler_block_size: int = 256, device: torch.device | str | None = None,
) -> list[str]:
    """Replace the weight of every linear layer named in `targets` by its NF4 form, frozen; returns their names.

    Targets match a child's own name as in `apply_lora` (`block_linears`, the blocks' linear layers, by default: QLoRA
    keeps embeddings and the head in the compute dtype). The NF4 weight dequantizes to the dtype the
    weight had, so quantize a bf16 model to compute in bf16. A weight's size must be a multiple of block_size; its
    blocks' scales are quantized in groups of scaler_block_size (QLoRA's double quantization), or of the largest power
    of two below it that divides their count where that one does not (torchao's layout needs whole groups: Granite
    4.0-H's in_proj takes 64); every weight is checked before any changes. `device`: move each weight there first, one
    at a time (default: quantize where it is).
    """
    _need_torchao("nf4")
    found = find_linears(model, block_linears(model) if targets is None else targets, "NF4")
    unfit = []
    for dotted, parent, name in found:
        w = getattr(parent, name).weight
        if is_nf4(w):
            unfit.append(f"{dotted} is already NF4")
        elif w.numel() % block_size:
            unfit.append(f"{dotted} has {w.numel()} weights, not a multiple of block_size {block_size}")
    if unfit:
        raise ValueError(f"cannot quantize to NF4: {'; '.join(unfit[:4])}{'...' if len(unfit) > 4 else ''}")
    for _, parent, name in found:
        layer = getattr(parent, name)
        _set_nf4(layer, block_size, _scaler_block(layer.weight.numel() // block_size, scaler_block_size), device)
    return [dotted for dotted, _, _ in found]


def _set_nf4(layer: nn.Module, block_size: int, scaler_block_size: int,
             device: torch.device | str | None = None) -> None:
    """The layer's weight in NF4 (on `device`, default its own), frozen."""
    w = layer.weight.detach().to(device or layer.weight.device).contiguous()
    layer.weight = nn.Parameter(to_nf4(w, block_size, scaler_block_size), requires_grad=False)
    if layer.bias is not None:
        layer.bias.data = layer.bias.data.to(w.device)


NF4_CHUNK = 1 << 22
"""Weights `nf4_to` dequantizes at a time (a multiple of torchao's scaler block, 64 * 256 weights)."""


def nf4_to(w: torch.Tensor, dtype: torch.dtype, chunk: int | None = None) -> torch.Tensor:
    """`w.to(dtype)` of an NF4 weight, bit for bit, with its temporaries bounded by `chunk` weights (default
    `NF4_CHUNK`).

    torchao's dequantization runs over the whole weight at once: two int64 code tensors (16 bytes
    per pair of weights), the looked-up and scaled halves and their interleaving, ~7x a bf16 copy of
    the weight (784 MiB for one of Llama-3-8B's MLP projections) on top of the result. The same
    element-wise operations over `chunk` weights at a time give the same values into one output.
    Eager only: under torch.compile torchao's version is traced and fused instead.
    """
    block, sblock, chunk = w.block_size, w.scaler_block_size, chunk or NF4_CHUNK
    n = w.numel()
    if not w.is_contiguous() or n % (block * sblock):  # a transposed view, or another layout: torchao's own path
        return w.to(dtype)
    step = max(chunk // (block * sblock), 1) * block * sblock  # whole double-quantization blocks; the last may be short
    out = None
    for lo in range(0, n, step):
        codes = w.quantized_data[lo // 2 : (lo + step) // 2]  # two 4-bit codes a byte
        first = w.nf4[(codes >> 4).to(torch.long)]  # torchao's operations, in its order, on a slice
        second = w.nf4[(codes & 0b1111).to(torch.long)]
        qs = w.quantized_scalers[lo // block : (lo + step) // block].view(-1, sblock)
        qf = w.quantization_factor[lo // (block * sblock) : (lo + step) // (block * sblock)]
        scalers = (qs / qf.unsqueeze(-1)).flatten().to(w.dtype) + w.scaler_mean
        repeated = scalers.unsqueeze(-1).expand(scalers.size(0), block // 2).flatten()
        pairs = torch.stack([first * repeated, second * repeated], dim=-1).view(-1)  # interleaved
        if out is None:
            out = torch.empty(n, dtype=pairs.dtype, device=pairs.device)
        out[lo : lo + step] = pairs
    return out.view(w.shape).to(dtype)


class _LinearNF4(torch.autograd.Function):
    """torchao's `linear_nf4` (x @ W^T for an NF4 W, no gradient for W), dequantizing through `nf4_to`."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(w)
        return F.linear(x, nf4_to(w, x.dtype))

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        (w,) = ctx.saved_tensors
        return grad @ nf4_to(w, grad.dtype), None


def nf4_linear(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """`F.linear(x, w, bias)` for an NF4 `w`, the numbers torchao gives, with less memory in eager mode
    (`nf4_to`); under torch.compile, torchao's own (traced and fused)."""
    if torch.compiler.is_compiling():
        return F.linear(x, w, bias)
    y = _LinearNF4.apply(x, w)
    return y if bias is None else y + bias  # as torchao adds it


def dequantize(model: nn.Module, dtype: torch.dtype | None = None) -> nn.Module:
    """Replace every NF4 weight by a plain frozen one in `dtype` (default: the dtype it was quantized
    from), in place; returns `model`. With LoRA, `merge_lora` first, or the adapters stay separate."""
    for m in model.modules():
        w = getattr(m, "weight", None)
        if isinstance(w, torch.Tensor) and is_nf4(w):
            m.weight = nn.Parameter(w.to(dtype or w.dtype), requires_grad=False)
    return model


def _need_torchao(kind: str) -> None:
    if to_nf4 is None:
        raise QuantError(f"quantization {kind!r} needs torchao: pip install 'temper[quant]'")


def check_quant(kind: str, device: torch.device | str, dtype: torch.dtype) -> None:
    """Raise a QuantError when `kind` cannot run on `device` with weights in `dtype`, before any weights are read."""
    if kind not in QUANT_KINDS:
        raise QuantError(f"unknown quantization {kind!r}: choose one of {', '.join(QUANT_KINDS)}")
    _need_torchao(kind)
    device = torch.device(device)
    if device.type not in ("cpu", "cuda"):
        raise QuantError(f"quantization {kind!r} runs on cpu or cuda, not {device.type}")
    if not dtype.is_floating_point:
        raise QuantError(f"quantization {kind!r} needs floating-point weights, got {dtype}")
    if kind == "int4" and device.type == "cuda":
        if dtype != torch.bfloat16:  # torchao's tinygemm kernel takes bfloat16 activations only
            raise QuantError(f"int4 on CUDA (torchao's tinygemm kernel) needs bfloat16 weights, got {dtype}: "
                             "use --dtype bfloat16 (or auto)")
        if torch.cuda.is_available() and torch.cuda.get_device_capability(device)[0] < 8:
            raise QuantError(f"int4 on CUDA (tinygemm) needs compute capability >= 8.0, {device} has "
                             f"{'.'.join(map(str, torch.cuda.get_device_capability(device)))}: use int8 or nf4")


def _scaler_block(n_blocks: int, largest: int = 256) -> int:
    """NF4's double-quantization block: the largest power of two <= `largest` that divides `n_blocks`."""
    size = largest
    while n_blocks % size:
        size //= 2
    return size


def _torchao_config(kind: str, group: int | None, device: torch.device):
    """torchao's config for int8 / int4 (see the module docstring for the kernel each one runs)."""
    import torchao
    from torchao.quantization import Int4WeightOnlyConfig, Int8WeightOnlyConfig
    from torchao.quantization.granularity import PerGroup, PerRow

    try:  # set_inductor_config=False: quantizing must not change the process's global inductor settings
        if kind == "int8":
            return Int8WeightOnlyConfig(granularity=PerRow() if group is None else PerGroup(group),
                                        set_inductor_config=False)
        if device.type == "cuda":
            return Int4WeightOnlyConfig(group_size=group, int4_packing_format="tile_packed_to_4d",
                                        set_inductor_config=False)
        from torchao.prototype.quantization.int4.inference_workflow import PrototypeInt4WeightOnlyConfig

        return PrototypeInt4WeightOnlyConfig(group_size=group, set_inductor_config=False)
    except (ImportError, TypeError) as e:  # an older torchao: names and arguments moved between releases
        raise QuantError(f"quantization {kind!r} on {device.type} is not available in torchao {torchao.__version__} "
                         f"({e}): pip install -U 'torchao>=0.18'") from None


def quantize_for_inference(
    model: nn.Module, kind: str, group_size: int | None = None, targets: Iterable[str] | None = None,
) -> list[str]:
    """Quantize the weights of the linear layers named in `targets` to `kind` ("int8", "int4", "nf4"), in
    place, for generation; returns their names. See the module docstring for the formats and kernels.

    `group_size`: input features per scale (default `DEFAULT_GROUP_SIZE[kind]`; int8's None is one
    scale per output row). Every layer is checked before any changes; the model stays usable by the
    engine (prefill, decode_step, KV cache, `torch.compile`) and cannot be trained.
    """
    _need_torchao(kind)
    found = find_linears(model, block_linears(model) if targets is None else targets, "quantization")
    if not found:
        return []
    weight = getattr(found[0][1], found[0][2]).weight
    check_quant(kind, weight.device, weight.dtype)
    group = DEFAULT_GROUP_SIZE[kind] if group_size is None else group_size
    if group is not None and group < 1:
        raise QuantError(f"group_size must be >= 1, got {group}")
    unfit = []
    for dotted, parent, name in found:
        w = getattr(parent, name).weight
        if type(w) is not nn.Parameter and type(w) is not torch.Tensor:
            unfit.append(f"{dotted} is already quantized ({type(w).__name__})")
        elif group is not None and w.shape[-1] % group:
            unfit.append(f"{dotted} has {w.shape[-1]} input features, not a multiple of group_size {group}")
    if unfit:
        raise QuantError(f"cannot quantize to {kind}: {'; '.join(unfit[:4])}{'...' if len(unfit) > 4 else ''}")
    if kind == "nf4":
        for _, parent, name in found:
            layer = getattr(parent, name)
            _set_nf4(layer, group, _scaler_block(layer.weight.numel() // group))
    else:
        from torchao.quantization import quantize_

        names = {dotted for dotted, _, _ in found}
        quantize_(model, _torchao_config(kind, group, weight.device), filter_fn=lambda _, fqn: fqn in names)
    return [dotted for dotted, _, _ in found]
