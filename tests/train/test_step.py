"""The one train step: loss normalisation by valid tokens, accumulation (row 11), non-finite policy."""

import copy

import pytest
import torch
from torch import nn

from temper.model.attention import Segments
from temper.train.step import IGNORE_INDEX, NonFiniteLoss, eval_loss, throughput, token_loss_sum, train_step


class TinyLM(nn.Module):
    def __init__(self, vocab=17, dim=8):
        super().__init__()
        self.emb = nn.Embedding(vocab, dim)
        self.mix = nn.Linear(dim, dim)
        self.head = nn.Linear(dim, vocab)

    def forward(self, x, hidden_only=False):
        h = self.emb(x)
        h = torch.tanh(h + torch.cumsum(self.mix(h), dim=1) / torch.arange(1, x.size(1) + 1).view(1, -1, 1))
        return h if hidden_only else self.logits(h)

    def logits(self, h):  # the output layer on final hidden states, as `Transformer.logits`
        return self.head(h)


def padded_batch(seed=0, batch=4, seq=6, vocab=17):
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, vocab, (batch, seq), generator=g)
    y = torch.randint(0, vocab, (batch, seq), generator=g)
    for row, valid in enumerate([6, 2, 5, 1][:batch]):  # unequal lengths: padding is ignored
        y[row, valid:] = IGNORE_INDEX
    return x, y


def run_steps(micro_batches_per_step, steps=3):
    torch.manual_seed(0)
    model = TinyLM()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    losses = [train_step(model, opt, micro_batches_per_step(s), step=s).loss for s in range(steps)]
    return losses, model


def test_grad_accumulation_equals_one_big_batch():
    """Row 11: B=4 GA=1 vs B=1 GA=4 with unequal valid lengths give the same update."""
    big = lambda s: [padded_batch(s)]
    split = lambda s: [(x[i : i + 1], y[i : i + 1]) for x, y in [padded_batch(s)] for i in range(4)]
    losses_big, model_big = run_steps(big)
    losses_split, model_split = run_steps(split)
    torch.testing.assert_close(losses_big, losses_split, rtol=1e-6, atol=1e-7)
    for a, b in zip(model_big.parameters(), model_split.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


def test_loss_is_mean_over_valid_tokens():
    model = TinyLM()
    x, y = padded_batch()
    expected = token_loss_sum(model(x), y).item() / int((y != IGNORE_INDEX).sum())
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    assert train_step(model, opt, [(x, y)], step=0).loss == pytest.approx(expected, rel=1e-6)
    assert eval_loss(model, [(x, y)]) == pytest.approx(expected, rel=1e-6)


def test_clipping_reports_the_unclipped_norm():
    model = TinyLM()
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    before = copy.deepcopy(model)
    res = train_step(model, opt, [padded_batch()], step=0, clip_norm=1e-3)
    assert res.grad_norm > 1e-3
    moved = torch.sqrt(sum(((a - b) ** 2).sum() for a, b in zip(model.parameters(), before.parameters())))
    assert moved.item() == pytest.approx(1e-3, rel=1e-4)  # SGD lr 1: the step is the clipped gradient


@pytest.mark.parametrize("policy", ["fail", "skip"])
def test_nonfinite_loss_never_reaches_the_optimizer(monkeypatch, policy):
    """Row 14 (single process): params and optimizer state are untouched on a NaN loss."""
    monkeypatch.setenv("TEMPER_FAULT", "nan_loss:step=1")
    model = TinyLM()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    train_step(model, opt, [padded_batch(0)], step=0)
    params = copy.deepcopy(list(model.parameters()))
    opt_state = copy.deepcopy(opt.state_dict())
    if policy == "fail":
        with pytest.raises(NonFiniteLoss):
            train_step(model, opt, [padded_batch(1)], step=1, on_nonfinite="fail")
    else:
        assert train_step(model, opt, [padded_batch(1)], step=1, on_nonfinite="skip").skipped
    for a, b in zip(model.parameters(), params):
        assert torch.equal(a, b)
    assert str(opt.state_dict()) == str(opt_state)
    assert all(p.grad is None for p in model.parameters())


def test_throughput_and_mfu():
    tps, mfu = throughput(tokens=1000, seconds=2.0, flops_per_token=6e6, peak_flops=1e10)
    assert tps == 500 and mfu == pytest.approx(0.3)
    assert throughput(10, 1.0, 1.0, None)[1] == 0.0


@pytest.mark.parametrize("preset", ["debug", "debug-llama"])
def test_packed_and_unpacked_examples_give_the_same_update(preset):
    """SFT-style examples (a prompt not learnt, a response learnt) trained one per padded row, or
    packed into shared rows with document masks and restarting positions: the same loss and the
    same gradients (an SGD step of lr 1 applies them as they are; Adam's normalised update would
    magnify float32 rounding in near-zero gradients)."""
    import numpy as np

    from temper.data.packing import pack_documents, pad_batch
    from temper.model.config import PRESETS
    from temper.model.transformer import Transformer

    rng = np.random.default_rng(0)
    lengths = [5, 17, 9, 30, 12, 3, 21]
    docs = [rng.integers(0, 256, n) for n in lengths]
    masks = [np.arange(n) >= n // 3 for n in lengths]  # the first third is the prompt
    torch.manual_seed(0)
    base = Transformer(PRESETS[preset]).train()

    def one_step(batch) -> tuple[float, nn.Module]:
        model = copy.deepcopy(base)
        opt = torch.optim.SGD(model.parameters(), lr=1.0)
        mb = (batch.tokens, batch.targets, {"positions": batch.positions, "segments": Segments(batch.doc_ids)})
        return train_step(model, opt, [mb], step=0).loss, model

    packed = pack_documents(docs, 40, loss_masks=masks)
    unpacked = pad_batch(docs, range(len(docs)), loss_masks=masks)
    assert len(packed.tokens) < len(unpacked.tokens)  # it did pack
    (loss_p, model_p), (loss_u, model_u) = one_step(packed), one_step(unpacked)
    assert loss_p == pytest.approx(loss_u, rel=1e-6)
    for (name, a), b in zip(model_p.named_parameters(), model_u.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=2e-7, msg=name)
