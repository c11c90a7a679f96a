"""float8 training (`train.float8`): the blocks' linear layers compute in float8, through torchao.

`apply_float8` swaps each `nn.Linear` inside `model.layers` whose weight has both dimensions a multiple of
16 (what float8 matrix products take) for torchao's `Float8Linear` with its default recipe: dynamic
tensorwise scaling of the input, weight and output gradient to float8 (e4m3 forward, e5m2 gradients) around
`torch._scaled_mm`, as torchtitan's float8 converter does. The embedding and the output head stay in the
training precision (the head's error lands directly on the logits; torchtitan skips it too). `Float8Linear`
keeps the very `weight`/`bias` Parameters, high-precision, so state dicts, checkpoints, resume and final/ are
the plain model's; `remove_float8` puts `nn.Linear` modules back around them for export.

It refuses (ConfigError naming `train.float8`) a device that has no float8 matrix products (anything but a
CUDA GPU of compute capability >= 8.9: H100/H200, L4, RTX 4090 and later), a missing torchao, blocks holding
LoRA adapters or frozen linear layers (LoRA, QLoRA, prefix tuning: the base layers are frozen and LoRA's are
not `nn.Linear`; float8 here trains full weights), and tensor parallel (its DTensor layers need torchao's
float8 tensor-parallel styles, not wired here); FSDP2 and DDP compose. It does not use torchao's float8
all-gather under FSDP2 (the weights would become torchao tensor subclasses in state dicts and checkpoints, and
the scales need a step after every optimizer step): FSDP2 gathers the parameters in the training precision,
then each layer casts its weight.
"""

from __future__ import annotations

import sys

import torch
from torch import nn
from torch.distributed.tensor import DTensor

from temper.config import ConfigError

MIN_CAPABILITY = (8, 9)
"""CUDA compute capability of the first GPUs with float8 tensor cores (Ada: L4, RTX 4090; Hopper: H100, H200)."""


def float8_refusal(device: torch.device) -> str | None:
    """Why float8 training cannot run on `device` (no torchao, not a CUDA GPU of compute capability >= 8.9), or None."""
    try:
        import torchao.float8  # noqa: F401
    except ImportError:
        return "needs torchao (pip install 'temper[quant]')"
    if device.type != "cuda":
        return (f"float8 matrix products need a CUDA GPU of compute capability >= 8.9 (H100/H200, L4, RTX 4090); "
                f"the device is {device}")
    if not torch.cuda.is_available():
        return "float8 matrix products need a CUDA GPU, and CUDA is not available"
    cap = torch.cuda.get_device_capability(device)
    if cap < MIN_CAPABILITY:
        return (f"float8 matrix products need CUDA compute capability >= 8.9 (H100/H200, L4, RTX 4090); "
                f"{torch.cuda.get_device_name(device)} has {cap[0]}.{cap[1]}")
    return None


def check_float8(device: torch.device) -> None:
    """Raise a ConfigError naming `train.float8` when `device` cannot train in float8 (`float8_refusal`)."""
    refusal = float8_refusal(device)
    if refusal is not None:
        raise ConfigError(f"train.float8: {refusal}; leave train.float8=false")


def float8_eligible(module: nn.Module) -> bool:
    """Whether a block's layer is converted: a plain `nn.Linear` whose weight has both dimensions a multiple of
    16, which `torch._scaled_mm` needs."""
    return isinstance(module, nn.Linear) and module.in_features % 16 == 0 and module.out_features % 16 == 0


def apply_float8(model: nn.Module, device: torch.device, *, check_device: bool = True) -> list[str]:
    """Swap the eligible linear layers of `model.layers` (`float8_eligible`) for torchao's `Float8Linear` (dynamic
    tensorwise scaling), in place, keeping their Parameters; returns the converted layers' names (as in the
    model's state dict). check_device=False skips only the device check (`float8_refusal`), so that the
    conversion itself can be tested on the CPU, where `torch._scaled_mm` also runs."""
    from temper.model.lora import LoRALinear

    if check_device:
        check_float8(device)
    blocks = model.layers
    adapted = [n for n, m in blocks.named_modules() if isinstance(m, LoRALinear)]
    frozen = [n for n, m in blocks.named_modules() if isinstance(m, nn.Linear) and not m.weight.requires_grad]
    if any(isinstance(m.weight, DTensor) for m in blocks.modules() if isinstance(m, nn.Linear)):
        # Float8Linear casts plain tensors; tensor-parallel DTensor layers need torchao's float8 TP styles
        # (Float8ColwiseParallel, ...), which are not wired here.
        raise ConfigError("train.float8 does not compose with tensor parallel (train.parallel.tp > 1) here; "
                          "use FSDP2 (train.parallel.dp_shard) or DDP")
    if adapted or frozen:
        raise ConfigError(f"train.float8 trains full weights in float8; the blocks hold LoRA adapters or frozen "
                          f"linear layers ({(adapted or frozen)[0]}, ...: LoRA, QLoRA or prefix tuning): use "
                          f"method=full, or leave train.float8=false")
    try:
        from torchao.float8 import Float8LinearConfig, convert_to_float8_training
    except ImportError:
        raise ConfigError("train.float8 needs torchao (pip install 'temper[quant]')") from None
    converted: list[str] = []

    def keep(module: nn.Module, name: str) -> bool:
        if float8_eligible(module):
            converted.append(f"layers.{name}")
            return True
        return False

    # Only the blocks are walked: the embedding and the output head are never converted.
    convert_to_float8_training(blocks, module_filter_fn=keep, config=Float8LinearConfig())
    return converted


def remove_float8(model: nn.Module) -> nn.Module:
    """Put plain `nn.Linear` modules back for `Float8Linear` ones (in place, the same Parameters; returns
    `model`), so that an exported model computes in its own precision and holds no torchao modules."""
    module = sys.modules.get("torchao.float8.float8_linear")
    if module is None:  # never imported, so nothing was converted (and exporting does not import torchao)
        return model
    Float8Linear = module.Float8Linear  # noqa: N806 (a class)
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, Float8Linear):
                plain = nn.Linear(child.in_features, child.out_features, bias=False, device="meta")
                plain.weight, plain.bias = child.weight, child.bias
                setattr(parent, name, plain)
    return model
