"""LoRA by module swap: the model is unchanged at init, only adapters train, merging is exact, counts by hand."""

from dataclasses import replace

import pytest
import torch
from torch import nn

from temper.model.config import PRESETS
from temper.model.lora import (
    ALL_LINEAR_TARGETS,
    ATTENTION_TARGETS,
    LoRALinear,
    apply_lora,
    lora_parameters,
    merge_lora,
)
from temper.model.transformer import Transformer


def _model(name: str = "debug-llama", **over) -> Transformer:
    torch.manual_seed(0)
    return Transformer(replace(PRESETS[name], **over))


def test_unchanged_at_init_and_only_adapters_train():
    model = _model()
    x = torch.randint(0, 256, (2, 16))
    before = model(x)
    swapped = apply_lora(model, rank=4, alpha=8)
    assert len(swapped) == 4 * 2 and swapped[0] == "layers.0.attn.q_proj"
    assert torch.equal(model(x), before)  # B = 0: exactly the same function
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {f"{s}.lora_{m}" for s in swapped for m in "ab"}
    model(x).square().mean().backward()
    for name, p in model.named_parameters():
        if name.endswith("lora_a"):  # dL/dA = s * B^T (...) = 0 while B = 0 (Hu et al. 2021, §4.1)
            assert torch.count_nonzero(p.grad) == 0
        elif name.endswith("lora_b"):
            assert torch.count_nonzero(p.grad) > 0
        else:
            assert p.grad is None


@pytest.mark.parametrize("preset, targets, per_layer", [
    # debug-llama: dim 64, q 4x16, kv 2x16, ffn 192; r * (in + out) for each target
    ("debug-llama", ATTENTION_TARGETS, (64 + 64) + (64 + 32) + (64 + 32) + (64 + 64)),
    ("debug-llama", ALL_LINEAR_TARGETS, 448 + 3 * (64 + 192)),
    ("debug", ("q_proj", "v_proj"), 2 * (64 + 64)),  # Hu et al.'s W_q, W_v
])
def test_trainable_count_by_formula(preset, targets, per_layer):
    model = _model(preset)
    rank = 8
    apply_lora(model, rank=rank, alpha=16, targets=targets)
    n = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert n == sum(p.numel() for p in lora_parameters(model)) == 2 * rank * per_layer
    assert model.num_params() == _model(preset).num_params() + n


def test_merge_equals_unmerged_forward_and_gives_plain_linears():
    model = _model("debug-llama")
    reference_keys = set(model.state_dict())
    apply_lora(model, rank=4, alpha=8, targets=ALL_LINEAR_TARGETS, dropout=0.1)
    torch.manual_seed(1)
    with torch.no_grad():
        for p in lora_parameters(model):
            p.normal_(0, 0.1)  # a trained-looking update, not the zero it starts from
    model.eval()  # dropout off: the adapted function is deterministic
    x = torch.randint(0, 256, (2, 16))
    with torch.no_grad():
        adapted = model(x)
        merged = merge_lora(model)(x)
    assert (merged - adapted).abs().max().item() < 1e-5
    assert not any(isinstance(m, LoRALinear) for m in model.modules())
    assert all(type(m.attn.q_proj) is nn.Linear for m in model.layers)
    assert set(model.state_dict()) == reference_keys  # exportable as the plain model


def test_base_state_dict_loads_after_the_swap_and_bf16_base_runs():
    base = _model("debug")
    model = _model("debug")
    apply_lora(model, rank=2, alpha=2)
    missing, unexpected = model.load_state_dict(base.state_dict(), strict=False)
    assert not unexpected and all(k.endswith(("lora_a", "lora_b")) for k in missing)
    model = _model("debug")
    apply_lora(model, rank=2, alpha=2)
    for p in model.parameters():
        if not p.requires_grad:
            p.data = p.data.bfloat16()  # a frozen base held in bfloat16, adapters in float32
    out = model.layers[0].attn.q_proj(torch.randn(3, 64, dtype=torch.bfloat16))
    assert out.dtype == torch.bfloat16 and model.layers[0].attn.q_proj.lora_a.dtype == torch.float32


def test_a_target_that_matches_nothing_names_the_linears():
    with pytest.raises(ValueError, match=r"\['gate_proj'\] match no nn.Linear.*'down_proj'"):
        apply_lora(_model("debug"), rank=2, alpha=2, targets=("q_proj", "gate_proj"))  # GELU MLP: no gate
    with pytest.raises(ValueError, match="rank"):
        apply_lora(_model("debug"), rank=0, alpha=2)
    model = _model("llama-125m", n_layers=1, vocab_size=64)  # an untied head is an nn.Linear ...
    with pytest.raises(ValueError, match="head"):  # ... that forward never calls: an adapter there would not run
        apply_lora(model, rank=2, alpha=2, targets=("q_proj", "head"))
    assert all(p.requires_grad for p in model.parameters())  # a refused call changes nothing
