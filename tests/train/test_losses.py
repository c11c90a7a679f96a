"""The one place losses are computed: the chunked linear cross-entropy equals PyTorch's on full logits
(values and both gradients, ignored targets, label smoothing, autocast), on CPU and, compiled, on a GPU; the routers'
load-balancing loss of a mixture of experts equals transformers' (Mixtral, padding masked)."""

from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from temper.model.attention import Segments
from temper.model.config import PRESETS
from temper.model.lora import apply_lora
from temper.model.transformer import Transformer
from temper.train.losses import (
    IGNORE_INDEX,
    Batch,
    LMLoss,
    LogitForm,
    RouterBalance,
    balance_choice_bias,
    chunk_tokens,
    linear_cross_entropy,
    sequence_logprobs,
    token_logprobs,
    token_loss_sum,
)


def _case(n=37, c=16, v=50, dtype=torch.float32, device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(n, c, generator=g, dtype=dtype).to(device).requires_grad_()
    w = torch.randn(v, c, generator=g, dtype=dtype).to(device).requires_grad_()
    t = torch.randint(0, v, (n,), generator=g).to(device)
    t[::5] = IGNORE_INDEX
    return h, w, t


def _reference(h, w, t, smoothing=0.0, scale=0.37, cap=None, divisor=None):
    logits = (h @ w.T).float()
    if divisor is not None:
        logits = logits / divisor
    if cap is not None:
        logits = torch.tanh(logits / cap) * cap
    loss = F.cross_entropy(logits, t, ignore_index=IGNORE_INDEX, reduction="sum", label_smoothing=smoothing)
    gh, gw = torch.autograd.grad(loss * scale, (h, w))
    return loss.detach(), gh, gw


@pytest.mark.parametrize("smoothing", [0.0, 0.1])
@pytest.mark.parametrize("chunk", [1, 8, 64])
def test_linear_cross_entropy_equals_full_logits(smoothing, chunk):
    h, w, t = _case()
    ref, gh, gw = _reference(h, w, t, smoothing)
    loss = linear_cross_entropy(h, w, t, label_smoothing=smoothing, chunk=chunk)
    got_h, got_w = torch.autograd.grad(loss * 0.37, (h, w))
    torch.testing.assert_close(loss, ref, rtol=1e-6, atol=1e-5)
    torch.testing.assert_close(got_h, gh, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got_w, gw, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_linear_cross_entropy_of_capped_logits(smoothing):
    """Gemma 2's logit softcap inside the chunks: the loss of cap * tanh(logits / cap), and both gradients through
    the cap's slope, equal autograd's on the full logits; a frozen weight gives the hidden gradient alone."""
    h, w, t = _case()
    w = (w * 3).detach().requires_grad_()  # logits up to ~60: the cap of 2 bends nearly all of them
    ref, gh, gw = _reference(h, w, t, smoothing, cap=2.0)
    loss = linear_cross_entropy(h, w, t, label_smoothing=smoothing, chunk=8, form=LogitForm(cap=2.0))
    got_h, got_w = torch.autograd.grad(loss * 0.37, (h, w))
    torch.testing.assert_close(loss, ref, rtol=1e-6, atol=1e-5)
    torch.testing.assert_close(got_h, gh, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got_w, gw, rtol=1e-5, atol=1e-6)
    assert (loss - _reference(h, w, t, smoothing)[0]).abs() > 1.0  # the cap changes the loss
    frozen = linear_cross_entropy(h, w.detach(), t, label_smoothing=smoothing, form=LogitForm(cap=2.0))
    torch.testing.assert_close(torch.autograd.grad(frozen * 0.37, h)[0], gh, rtol=1e-5, atol=1e-6)
    with torch.no_grad():
        torch.testing.assert_close(linear_cross_entropy(h, w, t, label_smoothing=smoothing, form=LogitForm(cap=2.0)), ref)


def test_linear_cross_entropy_of_divided_and_capped_logits():
    """Granite's logits_scaling inside the chunks (and with a cap after it): loss and both gradients equal autograd's
    on the full logits, and the divisor changes them."""
    h, w, t = _case()
    w = (w * 3).detach().requires_grad_()
    for form in (LogitForm(divisor=8.0), LogitForm(divisor=8.0, cap=2.0)):
        ref, gh, gw = _reference(h, w, t, 0.1, cap=form.cap, divisor=form.divisor)
        loss = linear_cross_entropy(h, w, t, label_smoothing=0.1, chunk=8, form=form)
        got_h, got_w = torch.autograd.grad(loss * 0.37, (h, w))
        torch.testing.assert_close(loss, ref, rtol=1e-6, atol=1e-5)
        torch.testing.assert_close(got_h, gh, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(got_w, gw, rtol=1e-5, atol=1e-6)
        assert (loss - _reference(h, w, t, 0.1, cap=form.cap)[0]).abs() > 1.0


@pytest.mark.parametrize("smoothing, cap", [(0.0, None), (0.1, 2.0)])
def test_linear_cross_entropy_with_a_head_bias(smoothing, cap):
    """A head with a bias (Phi's, GPT-J's) inside the chunks: loss and the three gradients equal autograd's on
    F.linear's full logits, frozen parts give none, and the bias changes the loss."""
    h, w, t = _case()
    b = torch.randn(w.shape[0], generator=torch.Generator().manual_seed(3)).mul_(2).requires_grad_()
    logits = F.linear(h, w, b)
    logits = logits if cap is None else torch.tanh(logits / cap) * cap
    ref = F.cross_entropy(logits, t, ignore_index=IGNORE_INDEX, reduction="sum", label_smoothing=smoothing)
    want = torch.autograd.grad(ref * 0.37, (h, w, b))
    loss = linear_cross_entropy(h, w, t, label_smoothing=smoothing, chunk=8, form=LogitForm(cap=cap), bias=b)
    torch.testing.assert_close(loss, ref.detach(), rtol=1e-6, atol=1e-5)
    for got, expected in zip(torch.autograd.grad(loss * 0.37, (h, w, b)), want, strict=True):
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    only_b = linear_cross_entropy(h.detach(), w.detach(), t, label_smoothing=smoothing, form=LogitForm(cap=cap),
                                  bias=b)
    torch.testing.assert_close(torch.autograd.grad(only_b * 0.37, b)[0], want[2], rtol=1e-5, atol=1e-6)
    assert (loss - linear_cross_entropy(h, w, t, label_smoothing=smoothing, form=LogitForm(cap=cap))).abs() > 1.0
    with torch.autocast("cpu", dtype=torch.bfloat16):  # the bias rounded with the products, as nn.Linear's
        ref16 = F.cross_entropy(F.linear(h, w, b).float(), t, ignore_index=IGNORE_INDEX, reduction="sum")
        torch.testing.assert_close(linear_cross_entropy(h, w, t, bias=b), ref16, rtol=2e-3, atol=0)


def test_a_capped_model_loss_goes_through_its_logits():
    """`LMLoss` on a model with `logit_divisor` and `logit_softcap`: the chunked loss (tied head) and a head run as a
    module both equal the cross-entropy of the model's own (divided, capped) logits."""
    model = Transformer(replace(PRESETS["debug-llama"], logit_softcap=0.5, logit_divisor=0.25))
    x = torch.randint(0, 256, (2, 9))
    with torch.no_grad():
        ref = token_loss_sum(model(x), x)
        assert model(x).abs().max() <= 0.5
        torch.testing.assert_close(LMLoss()(model, Batch(x, x)).loss_sum, ref)
        model.head = nn.Linear(64, 256, bias=True)
        torch.testing.assert_close(LMLoss()(model, Batch(x, x)).loss_sum, token_loss_sum(model(x), x))


def test_linear_cross_entropy_under_autocast_and_without_grad():
    h, w, t = _case()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref = F.cross_entropy(F.linear(h, w).float(), t, ignore_index=IGNORE_INDEX, reduction="sum")
        loss = linear_cross_entropy(h, w, t, chunk=8)
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss, ref, rtol=2e-3, atol=0)  # both from the same bf16 products
    loss.backward()
    assert h.grad.dtype == w.grad.dtype == torch.float32
    with torch.no_grad():
        assert linear_cross_entropy(h, w, t).requires_grad is False
    only_h = linear_cross_entropy(h, w.detach(), t)  # a frozen weight: no weight gradient is made
    torch.testing.assert_close(torch.autograd.grad(only_h, h)[0], _reference(h, w, t, scale=1.0)[1])


def test_chunks_are_smaller_for_a_frozen_weight():
    assert chunk_tokens(128256, True) >= 4096 and chunk_tokens(128256, False) <= 130
    assert chunk_tokens(128256, False) * 128256 * 4 <= 64 * 2**20


@pytest.mark.parametrize("name", ["debug", "debug-llama"])
def test_lm_loss_equals_cross_entropy_of_the_model_logits(name):
    """Tied (debug) and untied heads; with LoRA on the head the loss runs it as a module."""
    torch.manual_seed(0)
    model = Transformer(PRESETS[name])
    x = torch.randint(0, 256, (3, 20))
    y = torch.roll(x, -1, 1)
    y[1, 5:] = IGNORE_INDEX
    for lora_head in (False, True):
        if lora_head and model.head is not None:
            apply_lora(model, 4, 8.0, ["head"])
            with torch.no_grad():
                model.head.lora_b.normal_()
        out = LMLoss()(model, Batch(x, y))
        ref = token_loss_sum(model(x), y)
        torch.testing.assert_close(out.loss_sum, ref, rtol=1e-5, atol=1e-5)
        assert int(LMLoss().count(Batch(x, y))) == int((y != IGNORE_INDEX).sum())
        grads = torch.autograd.grad(out.loss_sum, [p for p in model.parameters() if p.requires_grad])
        refs = torch.autograd.grad(ref, [p for p in model.parameters() if p.requires_grad])
        for a, b in zip(grads, refs):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_token_and_sequence_logprobs():
    logits = torch.randn(2, 5, 7)
    t = torch.randint(0, 7, (2, 5))
    t[0, 3:] = IGNORE_INDEX
    lp = token_logprobs(logits, t)
    ref = torch.log_softmax(logits, -1).gather(-1, t.clamp(min=0)[..., None])[..., 0]
    torch.testing.assert_close(lp[t != IGNORE_INDEX], ref[t != IGNORE_INDEX])
    assert (lp[t == IGNORE_INDEX] == 0).all()
    torch.testing.assert_close(sequence_logprobs(logits, t), lp.sum(-1))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_linear_cross_entropy_on_cuda_compiled_equals_full_logits(dtype):
    """The compiled chunk kernel and the float32-accumulated weight gradient, against PyTorch's loss."""
    h, w, t = _case(n=3000, c=256, v=5000, dtype=dtype, device="cuda")
    ref, gh, gw = _reference(h, w, t, 0.1)
    loss = linear_cross_entropy(h, w, t, label_smoothing=0.1, chunk=512)
    got_h, got_w = torch.autograd.grad(loss * 0.37, (h, w))
    if dtype == torch.float32:
        torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-3)
        torch.testing.assert_close(got_h, gh, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(got_w, gw, rtol=1e-4, atol=1e-5)
    else:  # bf16 products on both sides, rounded at different points: compare relative norms
        assert abs(loss.item() - ref.item()) <= 1e-3 * abs(ref.item())
        for got, want in ((got_h, gh), (got_w, gw)):
            assert ((got.float() - want.float()).norm() / want.float().norm()).item() < 1e-2


def test_head_modules_that_are_not_plain_linear_layers_still_work():
    model = Transformer(PRESETS["debug-llama"])
    model.head = nn.Linear(64, 256, bias=True)
    x = torch.randint(0, 256, (2, 9))
    out = LMLoss()(model, Batch(x, x))
    torch.testing.assert_close(out.loss_sum, token_loss_sum(model(x), x))


def test_router_balance_equals_transformers_mixtral_aux_loss():
    """`RouterBalance(LMLoss(), coef)` on a Mixtral checkpoint: its loss per token is transformers' (cross-entropy +
    coef * load_balancing_loss_func with output_router_logits), padding masked out of both terms, and so are the
    routers' gradients; the aux term itself is logged, and a balanced router would score k = 2."""
    transformers = pytest.importorskip("transformers")
    from temper.model.hf.config import from_hf_config
    from temper.model.hf.weights import from_hf_state_dict

    torch.manual_seed(0)
    hf = transformers.MixtralForCausalLM(transformers.MixtralConfig(
        vocab_size=101, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2, output_router_logits=True,
        router_aux_loss_coef=0.02)).train()
    cfg = from_hf_config(hf.config.to_dict())
    model = Transformer(cfg).train()
    model.load_state_dict(from_hf_state_dict(cfg, hf.state_dict()))
    x = torch.randint(0, 101, (2, 12))
    real = torch.ones_like(x, dtype=torch.bool)
    real[1, 8:] = False  # right padding
    labels = x.masked_fill(~real, IGNORE_INDEX)
    theirs = hf(x, attention_mask=real.long(), labels=labels)
    targets = torch.cat([labels[:, 1:], torch.full((2, 1), IGNORE_INDEX)], 1)
    batch = Batch(x, targets, {"segments": Segments.padding(real)})
    loss = RouterBalance(LMLoss(), 0.02)
    out = loss(model, batch)
    n = loss.count(batch)
    torch.testing.assert_close(out.loss_sum / n, theirs.loss, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(out.metrics["router_aux"] / n, theirs.aux_loss, rtol=1e-6, atol=1e-6)
    assert abs(theirs.aux_loss.item() - 2) > 1e-3  # not the balanced value: the term is exercised
    (out.loss_sum / n).backward()
    theirs.loss.backward()
    for i in range(2):
        torch.testing.assert_close(model.layers[i].mlp.router.weight.grad, hf.model.layers[i].mlp.gate.weight.grad,
                                   rtol=1e-5, atol=1e-7)
    assert all(m.routing is None for m in model.modules() if hasattr(m, "routing"))  # recorded for one call only
    with pytest.raises(ValueError, match="the model has no mixture of experts"):
        RouterBalance(LMLoss(), 0.02)(Transformer(PRESETS["debug"]), batch)


DEEPSEEK_ROUTING = replace(PRESETS["debug-llama"], vocab_size=101, n_layers=3, n_experts=8, experts_per_token=2,
                           expert_ffn_dim=32, router_scores="sigmoid", expert_choice_bias=True, expert_groups=4,
                           expert_groups_per_token=2, shared_expert_ffn_dim=32, dense_layers=1)


def test_choice_bias_moves_by_the_rate_towards_the_mean_load():
    """`RouterBalance(loss, 0, loads)` adds up, per layer with a choice bias, the experts' routing slots of the real
    tokens over a step's calls (its micro-batches), adding no loss; `balance_choice_bias` then moves each expert's
    bias by +-rate towards its layer's mean load and returns the largest excess over the mean (MaxVio)."""
    torch.manual_seed(0)
    model = Transformer(DEEPSEEK_ROUTING).train()
    x = torch.randint(0, 101, (2, 12))
    real = torch.ones_like(x, dtype=torch.bool)
    real[1, 7:] = False  # right padding: not counted
    batches = [Batch(x, x, {"segments": Segments.padding(real)}), Batch(x[:1, :5], x[:1, :5], {})]
    plain = [LMLoss()(model, batch).loss_sum for batch in batches]
    seen = {i: [] for i in (1, 2)}  # the MoE layers' inputs, to route them again by hand
    for i in seen:
        model.layers[i].mlp.register_forward_pre_hook(lambda m, args, i=i: seen[i].append(args[0].detach()))
    loads: list[torch.Tensor] = []
    loss = RouterBalance(LMLoss(), 0.0, loads)
    for batch, reference in zip(batches, plain, strict=True):
        out = loss(model, batch)
        assert out.loss_sum == reference and "router_aux" not in out.metrics
    expected = []
    for i in seen:
        moe, load = model.layers[i].mlp, torch.zeros(8)
        for inputs, mask in zip(seen[i], (real.flatten(), torch.ones(5, dtype=torch.bool)), strict=True):
            chosen = moe.route(inputs.flatten(0, 1))[1]  # (N, k)
            load += torch.bincount(chosen[mask].flatten(), minlength=8)
        expected.append(load)
    assert [int(t.sum()) for t in expected] == [2 * (19 + 5)] * 2  # k slots per real token
    torch.testing.assert_close(loads, expected, rtol=0, atol=0)
    maxvio = balance_choice_bias(model, loads, 0.01)
    for i, load in zip(seen, expected, strict=True):
        torch.testing.assert_close(model.layers[i].mlp.choice_bias, 0.01 * torch.sign(load.mean() - load))
    assert maxvio == pytest.approx(max(float(t.max() / t.mean() - 1) for t in expected))
    with pytest.raises(ValueError, match=r"train.expert_bias_rate: the model's experts have no choice bias"):
        RouterBalance(LMLoss(), 0.0, [])(Transformer(replace(DEEPSEEK_ROUTING, expert_choice_bias=False)), batches[0])


def test_expert_bias_rate_is_checked_with_the_config():
    from temper.train.parallel import ParallelConfig
    from temper.train.run import TrainSection

    with pytest.raises(ValueError, match="expert_bias_rate must be >= 0, got -0.1"):
        TrainSection(expert_bias_rate=-0.1)
    with pytest.raises(ValueError, match="expert_bias_rate reads the routers of the model the loss runs"):
        TrainSection(expert_bias_rate=0.001, parallel=ParallelConfig(pp=2))


def test_choice_bias_alone_balances_a_skewed_router():
    """Auxiliary-loss-free balancing works: tokens of two kinds crowd onto a few experts; moving the choice biases
    step after step (nothing else trained) spreads the same tokens over all of them."""
    torch.manual_seed(0)
    model = Transformer(replace(DEEPSEEK_ROUTING, expert_groups=1, expert_groups_per_token=1)).train()
    batch = Batch(*(torch.randint(0, 4, (4, 32)),) * 2, {})  # four token ids: similar hidden states and choices
    vio = []
    for _ in range(60):  # a rate near DeepSeek-V3's 0.001, against init's score gaps of a few hundredths
        loads: list[torch.Tensor] = []
        RouterBalance(LMLoss(), 0.0, loads)(model, batch)
        vio.append(balance_choice_bias(model, loads, 0.001))
    # At first the most loaded expert takes over 3x the mean (4x: every token's), at the end under 1.6x.
    assert vio[0] > 2.0 and max(vio[-5:]) < vio[0] / 4, vio
