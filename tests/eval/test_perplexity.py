"""Perplexity: every token scored once, windows as documented, lm-eval's rolling windows at stride = seq_len."""

import math
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F

from temper.data.tokenizer import EOT, UNK, HFTokenizer, TokenizerError, train_tokenizer
from temper.eval.perplexity import Document, blocks, document, encode_document, ids_document, perplexity
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


PROMPT = "日本語 ☃ 𝄞"  # 18 bytes, 7 characters: none but the spaces is in the tokenizers' corpus


def _char_tokenizer(unknown: str) -> HFTokenizer:
    return HFTokenizer(train_tokenizer(["hello world"], "char", unknown=unknown), {"eos_token": EOT})


def test_every_byte_of_the_text_is_scored_unknown_characters_as_the_unknown_token():
    """A character tokenizer that dropped them scored 58 tokens of 78 bytes: bits per byte understated."""
    tok = _char_tokenizer("unk")
    d = encode_document(tok, f"hello {PROMPT}", "f.txt:3")
    unk, space = tok.tokenizer.token_to_id(UNK), tok.tokenizer.token_to_id(" ")
    assert d.tokens[-7:] == (unk, unk, unk, space, unk, space, unk)  # one token scored per character
    assert (len(d.tokens), d.n_bytes, d.n_unknown) == (13, 24, 5)
    r = perplexity(_model(), [d, encode_document(tok, "hello", "f.txt:5")], prefix_id=0)
    assert (r.extra["tokens"], r.extra["bytes"], r.extra["unknown"]) == (18, 29, 5)
    with pytest.raises(TokenizerError, match=r"^f.txt:3: 5 characters \('☃', '日', '本', '語', '𝄞'\) not in the "
                                             r"tokenizer's vocabulary, which has no unknown token and would drop them"):
        encode_document(_char_tokenizer("error"), f"hello {PROMPT}", "f.txt:3")
    assert encode_document(_char_tokenizer("error"), "hello", "f.txt:5").n_unknown == 0


def test_a_shards_unknown_token_counts_one_byte_never_its_text():
    tok = _char_tokenizer("unk")
    ids = tok.encode(f"hello {PROMPT}", add_special_tokens=False)
    d = ids_document(tok, ids, tok.tokenizer.token_to_id(UNK))
    assert (d.n_bytes, d.n_unknown) == (len("hello   ") + 5, 5)  # not 7 bytes of "<|unk|>" each
    assert ids_document(tok, ids[:5]).n_bytes == 5


def test_evaluate_reads_files_with_every_byte_counted_and_stops_where_characters_would_be_dropped(tmp_path):
    from temper.recipes.evaluate import PerplexityConfig, perplexity_documents

    (tmp_path / "t.txt").write_text(f"hello world\n\nhello {PROMPT}\n")
    docs = perplexity_documents(PerplexityConfig(files=[str(tmp_path / "t.txt")]), _char_tokenizer("unk"))
    assert [(d.n_bytes, d.n_unknown) for d in docs] == [(11, 0), (24, 5)]
    with pytest.raises(TokenizerError, match=rf"^{tmp_path / 't.txt'}:3: 5 characters"):
        perplexity_documents(PerplexityConfig(files=[str(tmp_path / "t.txt")]), _char_tokenizer("error"))
