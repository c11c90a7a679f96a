"""Tokenizers: nanoGPT's character vocabulary, exact byte-level BPE round trips, load/save, eot."""

import json

import numpy as np
import pytest
from tokenizers import Tokenizer, models

from temper.data.tokenizer import (
    EOT,
    TokenizerError,
    decode,
    encode_batch,
    eot_id,
    load_tokenizer,
    plain_text_encoder,
    save_tokenizer,
    train_tokenizer,
    vocab_size,
)

CORPUS = [
    "def add(a, b):\n    return a + b\n",
    "The quick brown fox jumps over the lazy dog.\r\n\ttabs  and  spaces   ",
    "Unicode: héllo wörld, 日本語, emoji \U0001f600, combining e\u0301, \ufffd",
    "for i in range(10):\n    print(i ** 2)\n" * 5,
]


def test_char_tokenizer_on_tinyshakespeare_is_nanogpts(shared_data):
    text = (shared_data / "tinyshakespeare/input.txt").read_text()
    tok = train_tokenizer([text], "char", special_tokens=[])
    assert vocab_size(tok) == 65
    chars = sorted(set(text))  # nanoGPT: stoi = {ch: i for i, ch in enumerate(chars)}
    head = text[:2000]
    assert tok.encode(head).ids == [chars.index(c) for c in head]
    assert decode(tok, tok.encode(text).ids) == text
    with_eot = train_tokenizer([text], "char")
    assert vocab_size(with_eot) == 66 and eot_id(with_eot) == 65


def test_bpe_has_the_asked_vocab_and_round_trips_any_text():
    tok = train_tokenizer(CORPUS, "bpe", vocab_size=300)
    assert vocab_size(tok) == 300
    assert eot_id(tok) == 0 and tok.id_to_token(0) == EOT
    unseen = "never seen: Ωμέγα ∑ \x01\x7f \U0001f680 \u200b end"  # bytes outside the corpus too
    for text in CORPUS + [unseen]:
        assert decode(tok, tok.encode(text, add_special_tokens=False).ids) == text


def test_special_token_text_in_a_document_is_encoded_as_plain_text():
    tok = train_tokenizer(CORPUS, "bpe", vocab_size=300)
    text = f"a document quoting {EOT} in its text"
    assert eot_id(tok) in tok.encode(text).ids  # what the plain tokenizer would do
    [ids] = encode_batch(plain_text_encoder(tok), [text], np.uint16)
    assert ids.dtype == np.uint16 and eot_id(tok) not in ids.tolist()
    assert decode(tok, ids) == text
    # in a batch, only that text takes the slow safe path; every text keeps its place and ids
    safe = Tokenizer.from_str(tok.to_str())
    safe.encode_special_tokens = True
    batch = CORPUS + [text] + CORPUS[:2] + [f"{EOT}{EOT}"]
    got = encode_batch(plain_text_encoder(tok), batch, np.uint32)
    assert [g.tolist() for g in got] == [e.ids for e in safe.encode_batch(batch, add_special_tokens=False)]
    assert plain_text_encoder(tok).encode_ids(text) == ids.tolist()


def test_save_and_load_give_the_same_tokenizer(tmp_path):
    tok = train_tokenizer(CORPUS, "bpe", vocab_size=280)
    save_tokenizer(tok, tmp_path / "tokenizer.json")
    for where in (tmp_path / "tokenizer.json", tmp_path):
        loaded = load_tokenizer(where)
        assert [e.ids for e in loaded.encode_batch(CORPUS)] == [e.ids for e in tok.encode_batch(CORPUS)]
    with pytest.raises(FileNotFoundError, match="no tokenizer at"):
        load_tokenizer(tmp_path / "missing")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(TokenizerError, match="not a valid tokenizer.json"):
        load_tokenizer(tmp_path / "bad.json")


def test_eot_of_a_foreign_tokenizer_json(tmp_path):
    """Any HF tokenizer.json loads; its end-of-text token is found by the usual names."""
    foreign = Tokenizer(models.WordLevel({"<unk>": 0, "hello": 1, "</s>": 2}, unk_token="<unk>"))
    foreign.add_special_tokens(["</s>"])
    (tmp_path / "tokenizer.json").write_text(foreign.to_str())
    tok = load_tokenizer(tmp_path)
    assert eot_id(tok) == 2 and eot_id(tok, "hello") == 1
    assert json.loads(tok.to_str())["model"]["type"] == "WordLevel"
    with pytest.raises(TokenizerError, match="no end-of-text token"):
        eot_id(train_tokenizer(["abc"], "char", special_tokens=[]))


def test_bad_arguments():
    with pytest.raises(ValueError, match="kind must be one of"):
        train_tokenizer(CORPUS, "wordpiece")
    with pytest.raises(ValueError, match="smaller than the 256 byte symbols"):
        train_tokenizer(CORPUS, "bpe", vocab_size=200)
