"""Prefix tuning: a prefix taken from real tokens is exactly those tokens in front of the input; only
prefix parameters get gradients; cached generation equals recomputation; a few steps of training
lower the loss; a prefix taken out and put back gives the same logits; bad shapes fail naming them."""

from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F

from temper.infer.engine import generate
from temper.model.config import PRESETS
from temper.model.prefix import apply_prefix, prefix_kv, prefix_parameters, remove_prefix, set_prefix
from temper.model.transformer import Transformer

CASES = {
    "gpt2": PRESETS["debug"],  # learned positions, multi-head: the mask-free SDPA paths
    "llama-window": replace(PRESETS["debug-llama"], sliding_window=8),  # RoPE, GQA, masks: the folded-group path
}


def _model(case: str) -> Transformer:
    torch.manual_seed(0)
    model = Transformer(CASES[case]).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.2)
    return model


@pytest.mark.parametrize("case", CASES)
def test_a_prefix_of_real_tokens_is_those_tokens_in_front(case):
    """The keys and values of tokens t at positions 0..P-1 as a prefix: the model on x, placed at
    positions P.., gives what it gives on t + x (the paper's real-word initialisation, and proof that
    every query sees every prefix slot and nothing else changes)."""
    model = _model(case)
    t, x = torch.randint(0, 256, (1, 5)), torch.randint(0, 256, (1, 7))
    with torch.no_grad():
        full = model(torch.cat([t, x], dim=1))[:, 5:]
        assert len(apply_prefix(model, 5, init_tokens=t[0].tolist())) == model.cfg.n_layers
        ours = model(x, positions=torch.arange(5, 12)[None])
    window = model.cfg.sliding_window  # a window hides some of t from the last tokens of t + x; not so a prefix
    check = slice(None) if window is None else slice(0, window - 5)
    torch.testing.assert_close(ours[:, check], full[:, check], rtol=0, atol=1e-5)


@pytest.mark.parametrize("hidden", [None, 16])
def test_only_the_prefix_trains_and_changes_the_output(hidden):
    model = _model("llama-window")
    x = torch.randint(0, 256, (2, 12))
    with torch.no_grad():
        base = model(x)
    apply_prefix(model, 4, hidden=hidden)
    params = prefix_parameters(model)
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert {id(p) for p in trainable} == {id(p) for p in params}
    c = model.cfg
    per_layer = 2 * c.kv_heads * 4 * c.head_dim if hidden is None else (4 * 16 + 16 * 16 + 16 + 16 * 2 * c.kv_heads
                                                                          * c.head_dim + 2 * c.kv_heads * c.head_dim)
    assert sum(p.numel() for p in params) == c.n_layers * per_layer
    out = model(x)
    assert (out - base).abs().max() > 0.1
    out.square().mean().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in params)
    assert all(p.grad is None for p in model.parameters() if not p.requires_grad)
    with torch.no_grad():
        torch.testing.assert_close(remove_prefix(model)(x), base, rtol=0, atol=0)


@pytest.mark.parametrize("case", CASES)
def test_cached_generation_equals_recomputation(case):
    model = _model(case)
    apply_prefix(model, 3)
    x = torch.randint(0, 256, (2, 20))
    with torch.no_grad():
        full = model(x)
        cache = model.new_cache(2, 20)
        steps = [model(x[:, :6], cache=cache)] + [model(x[:, i:i + 1], cache=cache) for i in range(6, 20)]
    torch.testing.assert_close(torch.cat(steps, dim=1), full, rtol=0, atol=1e-5)
    prompts = [[5, 9, 2, 7, 1, 3], [4, 8]]  # left-padded together: padding masks plus the prefix
    cached = generate(model, prompts, max_new_tokens=12, temperature=0.0)
    assert cached == generate(model, prompts, max_new_tokens=12, temperature=0.0, use_cache=False)


@pytest.mark.parametrize("hidden", [None, 32])
def test_training_the_prefix_lowers_the_loss(hidden):
    model = _model("gpt2")
    apply_prefix(model, 8, hidden=hidden)
    torch.manual_seed(3)
    data = torch.randint(0, 8, (4, 17))  # 8 of the 256 tokens: learnable through the prefix alone
    opt = torch.optim.AdamW(prefix_parameters(model), lr=3e-2)
    losses = []
    for _ in range(30):
        logits = model(data[:, :-1])
        loss = F.cross_entropy(logits.flatten(0, 1), data[:, 1:].flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    # measured: 5.80 -> 4.97 (slots), 5.92 -> 4.64 (MLP); the frozen o_proj bounds what a prefix can move
    assert losses[-1] < 0.9 * losses[0] and losses[10] < losses[0], losses


def test_prefix_kv_and_set_prefix_give_the_same_logits():
    model = _model("llama-window")
    apply_prefix(model, 4, hidden=16)  # the MLP is evaluated once and its output kept
    x = torch.randint(0, 256, (2, 12))
    with torch.no_grad():
        ref = model(x)
    kv = prefix_kv(model)
    assert kv.shape == (2, 2, 2, 4, 16)  # (n_layers, k/v, n_kv_heads, n_tokens, head_dim)
    back = _model("llama-window")
    set_prefix(back, kv)
    with torch.no_grad():
        torch.testing.assert_close(back(x), ref, rtol=0, atol=1e-6)
    assert all(p.requires_grad for p in prefix_parameters(back))
    with pytest.raises(ValueError, match="already has a prefix"):
        apply_prefix(back, 2)
    with pytest.raises(ValueError, match=r"shape \[2, 2, 2, 4, 8\], expected \[2, 2, 2, n_tokens, 16\]"):
        set_prefix(_model("llama-window"), kv[..., :8])
    with pytest.raises(ValueError, match="layer 0 has no prefix"):
        prefix_kv(_model("llama-window"))


def test_the_prefix_is_a_module_swap_that_comes_off_cleanly():
    """apply_prefix swaps each attention layer for a PrefixAttention sharing its projections (state dict
    names unchanged, plus prefix.*); remove_prefix swaps plain layers back, outputs as before."""
    from temper.model.attention import Attention
    from temper.model.prefix import PrefixAttention

    torch.manual_seed(0)
    model = Transformer(PRESETS["debug-llama"]).eval()
    x = torch.randint(0, 256, (2, 9))
    before, names = model(x), set(model.state_dict())
    q = model.layers[0].attn.q_proj
    apply_prefix(model, 3)
    assert isinstance(model.layers[0].attn, PrefixAttention) and model.layers[0].attn.q_proj is q
    assert set(model.state_dict()) - names == {f"layers.{i}.attn.prefix.kv" for i in range(len(model.layers))}
    assert not torch.equal(model(x), before)
    remove_prefix(model)
    assert type(model.layers[0].attn) is Attention and model.layers[0].attn.q_proj is q
    assert set(model.state_dict()) == names and torch.equal(model(x), before)
