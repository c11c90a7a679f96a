"""Text <-> token ids: train, load, save and run tokenizers, all of them HF `tokenizers` objects.

Two kinds can be trained here: a byte-level BPE (GPT-2's scheme: every byte is in the base
alphabet, so any text encodes without unknown tokens) and a character-level tokenizer (a BPE
model with no merges whose vocabulary is the corpus' characters, sorted, as nanoGPT's
shakespeare_char builds it). Any Hugging Face `tokenizer.json` can be loaded instead. The
tokenizer is saved as `tokenizer.json`, the file every HF library reads.

It does not read files of documents (sources.py), write shards (shards.py) or render chat
templates (sft.py).
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

from temper.files import atomic_write_text

EOT = "<|endoftext|>"
KINDS = ("bpe", "char")
# End-of-text tokens of common families, tried in order when none is named: GPT-2 and Qwen,
# Llama 3, Llama 2 and Mistral, Gemma.
EOT_CANDIDATES = (EOT, "<|end_of_text|>", "</s>", "<eos>")


class TokenizerError(ValueError):
    """A tokenizer file that cannot be used, or a token it lacks."""


def train_tokenizer(
    texts: Iterable[str],
    kind: str = "bpe",
    vocab_size: int = 4096,
    special_tokens: Sequence[str] = (EOT,),
    show_progress: bool = False,
) -> Tokenizer:
    """Train a "bpe" (byte-level, `vocab_size` including special tokens) or "char" tokenizer.

    For "char", `vocab_size` is ignored: the vocabulary is every character of `texts` (sorted,
    ids 0..n-1) followed by the special tokens. A character not seen in training is dropped by
    encode, so train it on the whole corpus.
    """
    if kind == "bpe":
        return _train_bpe(texts, vocab_size, list(special_tokens), show_progress)
    if kind == "char":
        return _train_char(texts, list(special_tokens))
    raise ValueError(f"tokenizer kind must be one of {KINDS}, got {kind!r}")


def _train_bpe(texts: Iterable[str], vocab_size: int, special_tokens: list[str],
               show_progress: bool) -> Tokenizer:
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    if vocab_size < len(alphabet) + len(special_tokens):
        raise ValueError(f"vocab_size {vocab_size} is smaller than the 256 byte symbols plus "
                         f"{len(special_tokens)} special tokens")
    tok = Tokenizer(models.BPE())
    # add_prefix_space=False keeps encode(text) -> decode exact for every text (GPT-2 style).
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=special_tokens,
        initial_alphabet=alphabet,  # all 256 bytes, even those the sample lacks
        show_progress=show_progress,
    )
    tok.train_from_iterator(texts, trainer)
    return tok


def _train_char(texts: Iterable[str], special_tokens: list[str]) -> Tokenizer:
    chars: set[str] = set()
    for text in texts:
        chars.update(text)
    if not chars:
        raise TokenizerError("cannot build a character tokenizer from no text")
    vocab = {c: i for i, c in enumerate(sorted(chars))}
    # No pre-tokenizer and no merges: the BPE model then maps each character to its id.
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.decoder = decoders.Fuse()  # join tokens with "" (the default joins with spaces)
    tok.add_special_tokens(special_tokens)
    return tok


def load_tokenizer(path: str | os.PathLike) -> Tokenizer:
    """Load a `tokenizer.json`, or the one inside directory `path`."""
    path = Path(path)
    if path.is_dir():
        path = path / "tokenizer.json"
    if not path.is_file():
        raise FileNotFoundError(f"no tokenizer at {path}: expected a Hugging Face tokenizer.json")
    try:
        return Tokenizer.from_file(str(path))
    except Exception as e:  # tokenizers raises a bare Exception for malformed files
        raise TokenizerError(f"{path} is not a valid tokenizer.json: {e}") from e


def save_tokenizer(tok: Tokenizer, path: str | os.PathLike) -> None:
    """Write `tok` as a tokenizer.json, atomically."""
    atomic_write_text(path, tok.to_str(pretty=True))


def eot_id(tok: Tokenizer, token: str | None = None) -> int:
    """Id of the end-of-text token: `token` if named, else the first of EOT_CANDIDATES present."""
    candidates = (token,) if token else EOT_CANDIDATES
    for name in candidates:
        i = tok.token_to_id(name)
        if i is not None:
            return i
    raise TokenizerError(
        f"tokenizer has no end-of-text token (looked for {', '.join(candidates)}); "
        f"add one to its special tokens or name it"
    )


def vocab_size(tok: Tokenizer) -> int:
    """Number of ids the tokenizer can produce, special tokens included."""
    return tok.get_vocab_size(with_added_tokens=True)


class PlainTextEncoder:
    """Encodes corpus text with special-token strings taken as ordinary text.

    A document that contains the literal text "<|endoftext|>" must not be cut in two by it (nor
    let the data inject control tokens). `tokenizers` does that with `encode_special_tokens=True`,
    which costs ~20% on every text; here only the rare texts that contain an added token's string
    take that path, and the others the ordinary one, which gives them the same ids (added tokens
    only act where their string occurs). When an added token is matched on normalised text, a raw
    substring test could miss it, so every text takes the safe path.
    """

    def __init__(self, tok: Tokenizer) -> None:
        self.plain = Tokenizer.from_str(tok.to_str())
        self.safe = Tokenizer.from_str(tok.to_str())
        self.safe.encode_special_tokens = True
        added = list(tok.get_added_tokens_decoder().values())
        self.markers = [t.content for t in added] if not any(t.normalized for t in added) else None

    def _risky(self, text: str) -> bool:
        return self.markers is None or any(m in text for m in self.markers)

    def encode_ids(self, text: str) -> list[int]:
        tok = self.safe if self._risky(text) else self.plain
        return tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: Sequence[str], dtype: np.dtype | type = np.uint32) -> list[np.ndarray]:
        risky = [i for i, t in enumerate(texts) if self._risky(t)]
        if not risky:
            return _encode(self.plain, texts, dtype)
        out = [None] * len(texts)
        for i, ids in zip(risky, _encode(self.safe, [texts[i] for i in risky], dtype), strict=True):
            out[i] = ids
        rest = [i for i, x in enumerate(out) if x is None]
        for i, ids in zip(rest, _encode(self.plain, [texts[i] for i in rest], dtype), strict=True):
            out[i] = ids
        return out


def plain_text_encoder(tok: Tokenizer) -> PlainTextEncoder:
    """The encoder for corpus text: special-token strings in it are ordinary text."""
    return PlainTextEncoder(tok)


def encode_batch(tok: Tokenizer | PlainTextEncoder, texts: Sequence[str], dtype: np.dtype | type = np.uint32) -> list[np.ndarray]:
    """Token ids of each text (no special tokens added), as arrays of `dtype`."""
    if isinstance(tok, PlainTextEncoder):
        return tok.encode_batch(texts, dtype)
    return _encode(tok, texts, dtype)


def _encode(tok: Tokenizer, texts: Sequence[str], dtype: np.dtype | type) -> list[np.ndarray]:
    # encode_batch_fast (tokenizers >= 0.20) skips the character offsets, which ids do not need: 15% faster.
    encode = getattr(tok, "encode_batch_fast", tok.encode_batch)
    return [np.asarray(e.ids, dtype=dtype) for e in encode(list(texts), add_special_tokens=False)]


def decode(tok: Tokenizer, ids: Iterable[int]) -> str:
    """Text of `ids`, special tokens included (the inverse of encoding plus the eot marker)."""
    ids = ids.tolist() if isinstance(ids, np.ndarray) else [int(i) for i in ids]
    return tok.decode(ids, skip_special_tokens=False)
