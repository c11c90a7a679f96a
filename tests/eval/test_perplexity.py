"""Perplexity: every token scored once, windows as documented, lm-eval's rolling windows at stride = seq_len."""

import math
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F

from temper.eval.perplexity import Document, blocks, document, perplexity
from temper.model.config import PRESETS
from temper.model.transformer import Transformer


def _model() -> Transformer:
    torch.manual_seed(0)
    return Transformer(replace(PRESETS["debug-llama"], max_seq_len=64)).eval()


def _nll_one_pass(model, prefix, tokens) -> float:
    seq = torch.tensor([[prefix, *tokens]])
    with torch.no_grad():
        lp = F.log_softmax(model(seq[:, :-1])[0].float(), -1)
    return -lp.gather(-1, seq[0, 1:, None]).sum().item()


def _nll_windows(model, prefix, tokens, seq_len, stride) -> float:
    """The documented windows, one forward pass each, full logits."""
    seq = [prefix, *tokens]
    total = 0.0
    for ctx_start, start, end in blocks(len(tokens), seq_len, stride):
        inp = torch.tensor([seq[ctx_start:end - 1]])
        assert inp.shape[1] <= seq_len
        with torch.no_grad():
            lp = F.log_softmax(model(inp)[0].float(), -1)[-(end - start):]
        total -= lp.gather(-1, torch.tensor(seq[start:end])[:, None]).sum().item()
    return total


@pytest.mark.parametrize("n,seq_len,stride", [(200, 64, 64), (200, 64, 16), (200, 32, 1), (7, 64, 64)])
def test_blocks_cover_every_token_once(n, seq_len, stride):
    covered = [j for _, start, end in blocks(n, seq_len, stride) for j in range(start, end)]
    assert covered == list(range(1, n + 1))
    assert all(end - 1 - ctx <= seq_len and ctx < start for ctx, start, end in blocks(n, seq_len, stride))


def test_short_documents_equal_one_forward_pass_whatever_the_stride():
    model = _model()
    g = torch.Generator().manual_seed(1)
    docs = [Document(tuple(torch.randint(0, 256, (n,), generator=g).tolist()), 3 * n, n) for n in (5, 40, 63)]
    expected = sum(_nll_one_pass(model, 0, d.tokens) for d in docs)
    for stride in (64, 8, 1):
        r = perplexity(model, docs, prefix_id=0, stride=stride)
        assert r.extra["nll"] == pytest.approx(expected, rel=1e-5)
        assert r.extra["tokens"] == 108 and r.extra["bytes"] == 324
        assert r.metrics["perplexity"] == pytest.approx(math.exp(expected / 108), rel=1e-5)
        assert r.metrics["bits_per_byte"] == pytest.approx(expected / 324 / math.log(2), rel=1e-5)


@pytest.mark.parametrize("seq_len,stride", [(64, 64), (64, 16), (40, 25)])
def test_long_documents_use_the_documented_windows(seq_len, stride):
    model = _model()
    g = torch.Generator().manual_seed(2)
    docs = [Document(tuple(torch.randint(0, 256, (n,), generator=g).tolist()), n, n) for n in (150, 300)]
    r = perplexity(model, docs, prefix_id=3, seq_len=seq_len, stride=stride, batch_tokens=256)
    expected = sum(_nll_windows(model, 3, d.tokens, seq_len, stride) for d in docs)
    assert r.extra["nll"] == pytest.approx(expected, rel=1e-5)
    assert r.stderr["perplexity"] > 0 and r.extra["tokens"] == 450


def test_disjoint_windows_are_lm_evals_rolling_windows():
    utils = pytest.importorskip("lm_eval.utils")
    tokens = list(range(10, 140))
    ours = [(tuple([99, *tokens][c:s]), tuple([99, *tokens][s:e])) for c, s, e in blocks(len(tokens), 32, 32)]
    theirs = [tuple(map(tuple, utils.make_disjoint_window(w)))
              for w in utils.get_rolling_token_windows(tokens, prefix_token=99, max_seq_len=32, context_len=1)]
    assert ours == theirs


def test_counts_and_bad_settings():
    d = document("hello  wide world", [1, 2, 3])
    assert (d.n_bytes, d.n_words) == (17, 3)
    model = _model()
    with pytest.raises(ValueError, match="stride"):
        perplexity(model, [d], prefix_id=0, stride=65)
    with pytest.raises(ValueError, match="exceeds the model's context"):
        perplexity(model, [d], prefix_id=0, seq_len=65)
    with pytest.raises(ValueError, match="empty"):
        perplexity(model, [Document((), 0, 0)], prefix_id=0)
