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
a QLoRA run exports its merged, dequantized model in the Hugging Face layout (convert.py) or its
adapters in PEFT's (peft_io.py). torchao is an optional dependency (`temper[quant]`): importing
this module needs it.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from temper.model.lora import ALL_LINEAR_TARGETS, find_linears

try:
    from torchao.quantization import NF4Tensor, to_nf4
except ImportError:  # torchao < 0.15 kept NF4 under dtypes/
    from torchao.dtypes.nf4tensor import NF4Tensor, to_nf4


def is_nf4(t: torch.Tensor) -> bool:
    """Whether `t` is an NF4-quantized weight."""
    return isinstance(t, NF4Tensor)


def storage_bytes(t: torch.Tensor) -> int:
    """Bytes a weight occupies: for NF4, its packed 4-bit codes, 8-bit scales, per-block factors,
    mean and 16-entry lookup table; for a plain tensor, numel * element size."""
    if is_nf4(t):
        names, _ = t.__tensor_flatten__()
        return sum(getattr(t, n).nbytes for n in names)
    return t.numel() * t.element_size()


def quantize_nf4(
    model: nn.Module, targets: Iterable[str] = ALL_LINEAR_TARGETS, block_size: int = 64,
    scaler_block_size: int = 256,
) -> list[str]:
    """Replace the weight of every linear layer named in `targets` by its NF4 form, frozen; returns their names.

    Targets match a child's own name as in `apply_lora` (the blocks' linear layers by default: QLoRA
    keeps embeddings and the head in the compute dtype). The NF4 weight dequantizes to the dtype the
    weight had, so quantize a bf16 model to compute in bf16. A weight's size must be a multiple of
    block_size * scaler_block_size (torchao's layout); every weight is checked before any changes.
    """
    found = find_linears(model, targets, "NF4")
    unfit = []
    for dotted, parent, name in found:
        w = getattr(parent, name).weight
        if is_nf4(w):
            unfit.append(f"{dotted} is already NF4")
        elif w.numel() % (block_size * scaler_block_size):
            unfit.append(f"{dotted} has {w.numel()} weights, not a multiple of {block_size} * {scaler_block_size}")
    if unfit:
        raise ValueError(f"cannot quantize to NF4: {'; '.join(unfit[:4])}{'...' if len(unfit) > 4 else ''}")
    for _, parent, name in found:
        layer = getattr(parent, name)
        layer.weight = nn.Parameter(to_nf4(layer.weight.detach().contiguous(), block_size, scaler_block_size),
                                    requires_grad=False)
    return [dotted for dotted, _, _ in found]


def dequantize(model: nn.Module, dtype: torch.dtype | None = None) -> nn.Module:
    """Replace every NF4 weight by a plain frozen one in `dtype` (default: the dtype it was quantized
    from), in place; returns `model`. With LoRA, `merge_lora` first, or the adapters stay separate."""
    for m in model.modules():
        w = getattr(m, "weight", None)
        if isinstance(w, torch.Tensor) and is_nf4(w):
            m.weight = nn.Parameter(w.to(dtype or w.dtype), requires_grad=False)
    return model
