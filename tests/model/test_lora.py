"""LoRA by module swap: the model is unchanged at init, only adapters train, merging is exact (plain,
rsLoRA, DoRA), counts by hand; a LoRALinear computes what PEFT's computes, gradients included."""

import math
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F
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
    model = _model("debug")  # a tied head is tok_emb.weight: no layer of its own to adapt
    with pytest.raises(ValueError, match="tied to tok_emb"):
        apply_lora(model, rank=2, alpha=2, targets=("q_proj", "head"))
    assert all(p.requires_grad for p in model.parameters())  # a refused call changes nothing
    apply_lora(model, rank=2, alpha=2)
    with pytest.raises(ValueError, match="already have LoRA adapters"):
        apply_lora(model, rank=2, alpha=2, targets=("q_proj",))


def _randomize_adapters(model: nn.Module, std: float = 0.1) -> None:
    """A trained-looking update, not the zero it starts from (DoRA's magnitude moved off ||W||)."""
    torch.manual_seed(1)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, LoRALinear):
                m.lora_a.normal_(0, std)
                m.lora_b.normal_(0, std)
                if m.lora_magnitude is not None:
                    m.lora_magnitude.mul_(1 + 0.2 * torch.randn_like(m.lora_magnitude))


@pytest.mark.parametrize("variant", ["plain", "rslora", "dora"])
def test_merge_is_exact_for_every_variant_and_the_untied_head(variant):
    model = _model("debug-llama", tie_embeddings=False)  # an untied head: an nn.Linear that forward calls
    swapped = apply_lora(model, rank=4, alpha=8, targets=ALL_LINEAR_TARGETS + ("head",), dropout=0.1,
                         rslora=variant == "rslora", dora=variant == "dora")
    assert "head" in swapped and len(swapped) == 7 * 2 + 1 and isinstance(model.head, LoRALinear)
    head = model.head
    assert head.scale == (8 / math.sqrt(4) if variant == "rslora" else 8 / 4)
    x = torch.randint(0, 256, (2, 16))
    with torch.no_grad():
        base = model(x)
        _randomize_adapters(model)
        model.eval()
        adapted = model(x)
        assert (adapted - base).abs().max() > 0.05  # the update (the head's included) changes the function
        trained_b = head.lora_b.clone()
        head.lora_b.zero_()
        assert (model(x) - adapted).abs().max() > 1e-3  # the head's adapter runs
        head.lora_b.copy_(trained_b)
        merged = merge_lora(model)(x)
    assert (merged - adapted).abs().max().item() < 1e-5
    assert type(model.head) is nn.Linear and not any(isinstance(m, LoRALinear) for m in model.modules())


def test_dora_starts_as_the_base_and_trains_its_magnitude():
    model = _model("debug-llama")
    x = torch.randint(0, 256, (2, 16))
    before = model(x)
    apply_lora(model, rank=4, alpha=8, targets=ALL_LINEAR_TARGETS, dora=True)
    q = model.layers[0].attn.q_proj
    torch.testing.assert_close(q.lora_magnitude, torch.linalg.norm(q.weight, dim=1), rtol=0, atol=0)
    assert torch.equal(model(x), before)  # m = ||W||, B = 0: W' = W exactly
    trainable = {n.rsplit(".", 1)[-1] for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"lora_a", "lora_b", "lora_magnitude"}
    assert len(lora_parameters(model)) == 3 * 7 * 2
    model(x).square().mean().backward()
    assert torch.count_nonzero(q.lora_magnitude.grad) > 0


def _peft_pair(variant: str, dropout: float):
    """The same nn.Linear (bias and all) adapted by temper and by PEFT, with equal adapter weights."""
    peft = pytest.importorskip("peft")
    torch.manual_seed(0)
    base = nn.Linear(24, 40)
    ours = LoRALinear(nn.Linear(24, 40), rank=3, alpha=5, dropout=dropout, rslora=variant == "rslora",
                      dora=variant == "dora")
    ours.weight.data.copy_(base.weight)
    ours.bias.data.copy_(base.bias)
    holder = nn.Module()
    holder.proj = base
    config = peft.LoraConfig(r=3, lora_alpha=5, lora_dropout=dropout, target_modules=["proj"],
                             use_rslora=variant == "rslora", use_dora=variant == "dora")
    theirs = peft.inject_adapter_in_model(config, holder).proj
    with torch.no_grad():
        ours.lora_a.normal_(0, 0.3)
        ours.lora_b.normal_(0, 0.3)
        theirs.lora_A["default"].weight.copy_(ours.lora_a)
        theirs.lora_B["default"].weight.copy_(ours.lora_b)
        if variant == "dora":
            # PEFT initialised m from the norm with B = 0; give both the same moved magnitude
            ours.lora_magnitude.copy_(torch.linalg.norm(base.weight, dim=1) * (1 + 0.3 * torch.randn(40)))
            theirs.lora_magnitude_vector["default"].weight.copy_(ours.lora_magnitude)
    return ours, theirs


@pytest.mark.parametrize("variant", ["plain", "rslora", "dora"])
@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_layer_matches_peft_forward_and_gradients(variant, dropout):
    """PEFT's lora.Linear is the reference: outputs and gradients of x, A, B (and DoRA's m, whose
    norm both treat as a constant) agree, in training mode with the same dropout mask."""
    ours, theirs = _peft_pair(variant, dropout)
    theirs_params = [theirs.lora_A["default"].weight, theirs.lora_B["default"].weight]
    ours_params = [ours.lora_a, ours.lora_b]
    if variant == "dora":
        theirs_params.append(theirs.lora_magnitude_vector["default"].weight)
        ours_params.append(ours.lora_magnitude)
    x = torch.randn(5, 7, 24)
    outs, grads = [], []
    for layer, params in ((ours, ours_params), (theirs, theirs_params)):
        layer.train()
        xi = x.clone().requires_grad_(True)
        torch.manual_seed(3)  # the same dropout mask for both
        y = layer(xi)
        (y * torch.linspace(-1, 1, 40)).sum().backward()
        outs.append(y)
        grads.append([xi.grad] + [p.grad for p in params])
    # The same operations in the same order (alpha / r = 5 / 3 is not a power of two, so a product
    # taken in another order would round differently): bit-identical, DoRA included.
    torch.testing.assert_close(outs[0], outs[1], rtol=0, atol=0)
    for g_ours, g_theirs in zip(*grads, strict=True):
        torch.testing.assert_close(g_ours, g_theirs, rtol=0, atol=0)


def _bf16_layer() -> tuple[LoRALinear, torch.Tensor, torch.Tensor]:
    """A bf16 linear layer with float32 adapters (B nonzero), a bf16 input (3, 7, 48) and output weights (40,)."""
    torch.manual_seed(0)
    layer = LoRALinear(nn.Linear(48, 40, bias=True).to(torch.bfloat16), rank=4, alpha=5)
    nn.init.normal_(layer.lora_b, std=0.1)
    return layer, torch.randn(3, 7, 48, dtype=torch.bfloat16), torch.linspace(-1, 1, 40)


def test_bf16_activations_give_autograds_numbers_without_a_float32_copy_saved():
    """On bf16 activations the float32 adapters' A product saves x itself, not its float32 copy (half the
    bytes, shared by q, k and v): output and gradients are plain autograd's of the cast, bit for bit."""
    layer, x, w = _bf16_layer()
    xi = x.clone().requires_grad_(True)
    y = layer(xi)
    saved = _saved_tensors(y.grad_fn)
    assert any(t is xi for t in saved)  # x itself, not a float32 copy of it
    assert not [t.shape for t in saved if t.dtype == torch.float32 and t.numel() == x.numel()]
    (y.float() * w).sum().backward()
    got = [y, xi.grad, layer.lora_a.grad, layer.lora_b.grad]
    a, b = layer.lora_a.detach().clone().requires_grad_(), layer.lora_b.detach().clone().requires_grad_()
    xr = x.clone().requires_grad_(True)
    yr = F.linear(xr, layer.weight, layer.bias) + (F.linear(F.linear(xr.to(torch.float32), a), b) * layer.scale).to(
        torch.bfloat16)
    (yr.float() * w).sum().backward()
    for g, r in zip(got, [yr, xr.grad, a.grad, b.grad], strict=True):
        torch.testing.assert_close(g, r, rtol=0, atol=0)


def test_under_autocast_the_update_is_added_by_the_product_itself():
    """Under bf16 autocast y + s (x A^T) B^T is one addmm: no separate (..., out) tensor for the update, and
    in backward y's gradient is the output's own (no scaled copy). The numbers are float32's within bf16's
    rounding; no (..., out) tensor is saved for backward."""
    layer, x, w = _bf16_layer()
    xi = x.clone().requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(xi)
    assert y.dtype == torch.bfloat16 and y.grad_fn.name() in ("ViewBackward0", "AddmmBackward0")
    assert not [t.shape for t in _saved_tensors(y.grad_fn) if t.numel() == 3 * 7 * 40]  # no (..., out) activation
    (y.float() * w).sum().backward()
    a, b = layer.lora_a.detach().clone().requires_grad_(), layer.lora_b.detach().clone().requires_grad_()
    xr = x.float().requires_grad_(True)
    yr = F.linear(xr, layer.weight.float(), layer.bias.float()) + F.linear(F.linear(xr, a), b) * layer.scale
    (yr * w).sum().backward()
    for g, r in zip([y, xi.grad, layer.lora_a.grad, layer.lora_b.grad], [yr, xr.grad, a.grad, b.grad], strict=True):
        torch.testing.assert_close(g.float(), r, rtol=2e-2, atol=2e-2)


def _saved_tensors(fn) -> list[torch.Tensor]:
    """Every tensor the autograd graph under `fn` saved for backward."""
    out, seen, todo = [], set(), [fn]
    while todo:
        f = todo.pop()
        if f is None or f in seen:
            continue
        seen.add(f)
        for name in dir(f):
            if name.startswith("_saved_"):
                v = getattr(f, name)
                out += [t for t in (v if isinstance(v, tuple) else (v,)) if isinstance(t, torch.Tensor)]
        if hasattr(f, "saved_tensors"):  # a custom autograd.Function's node
            out += [t for t in f.saved_tensors if isinstance(t, torch.Tensor)]
        todo += [n for n, _ in f.next_functions]
    return out
