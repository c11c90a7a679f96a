"""Perplexity and bits per byte of documents, with sliding windows and exact token accounting.

Every token of every document is scored exactly once. A document is preceded by the tokenizer's
prefix token (BOS, else EOS) so that its first token is scored too, as lm-eval-harness's
`loglikelihood_rolling` does. The tokens are scored in blocks of `stride`; each block is
predicted from up to `seq_len` tokens: the block itself and as much of what precedes it as fits
(Hugging Face's "perplexity of fixed-length models"). stride = seq_len is lm-eval's disjoint
rolling windows (fast, less context for a block's first tokens); a smaller stride gives each
token more context at the cost of recomputing the overlap.

Reported, each with a standard error over documents (the delta method for a ratio of sums):
token perplexity exp(nll / tokens), bits per byte nll / (ln 2 * UTF-8 bytes), byte perplexity
2 ** bits_per_byte and word perplexity exp(nll / words), the last three as lm-eval's `wikitext`.
Bytes and words do not depend on the tokenizer, so they compare models with different vocabularies.
They are counted from the text itself, never from decoded tokens: a character the tokenizer has no
token for is scored as its unknown token (and counted), and one it would drop is an error, since
its bytes would count with nothing scored for them and bits per byte would be understated.
"""

from __future__ import annotations

import math
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
from torch import nn

from temper.data.tokenizer import HFTokenizer, UnknownCounter, check_unknown
from temper.eval.loglik import Request, score
from temper.eval.run import TaskResult


@dataclass(frozen=True)
class Document:
    """A document to score: its tokens (no prefix token) and the size of its text."""

    tokens: tuple[int, ...]
    n_bytes: int
    n_words: int
    n_unknown: int = 0
    """Characters the tokenizer has no token for, each scored as its unknown token."""


def document(text: str, tokens: Sequence[int], n_unknown: int = 0) -> Document:
    """A `Document` of `text`, counting bytes and words as lm-eval's wikitext task does."""
    return Document(tuple(tokens), len(text.encode("utf-8")), len(re.split(r"\s+", text)), n_unknown)


def encode_document(tok: HFTokenizer, text: str, where: str, counter: UnknownCounter | None = None) -> Document:
    """`text` tokenized for scoring (no special tokens added); its unknown characters counted, or an
    error naming `where` (file:line) when the tokenizer would drop them. Pass one `counter` for many texts."""
    counter = counter or UnknownCounter(tok.tokenizer, added_are_tokens=not tok.split_special_tokens)
    ids = tok.encode(text, add_special_tokens=False)
    return document(text, ids, check_unknown(counter, text, ids, where))


def ids_document(tok: HFTokenizer, ids: Sequence[int], unk: int | None = None) -> Document:
    """A `Document` of token ids (a prepared shard's), its bytes those of the text they decode to.

    The shards keep no text, so the character behind an unknown token (id `unk`, from
    `UnknownCounter(tok.tokenizer).unk_id`) is not known: it counts as one byte, the least a character
    has, so that bits per byte may be overstated but never understated.
    """
    n = int(np.count_nonzero(np.asarray(ids) == unk)) if unk is not None else 0
    text = tok.decode([i for i in ids if i != unk] if n else ids)
    return Document(tuple(ids), len(text.encode("utf-8")) + n, len(re.split(r"\s+", text)), n)


def blocks(n_tokens: int, seq_len: int, stride: int) -> list[tuple[int, int, int]]:
    """(context_start, start, end) of each block over a sequence [prefix] + tokens.

    Sequence index j >= 1 is the (j-1)-th token. Block [start, end) is scored with the inputs
    sequence[context_start:end - 1], at most seq_len of them; the blocks cover 1..n_tokens once.
    """
    if not 0 < stride <= seq_len:
        raise ValueError(f"stride must be in [1, seq_len={seq_len}], got {stride}")
    out = []
    for start in range(1, n_tokens + 1, stride):
        end = min(start + stride, n_tokens + 1)
        out.append((max(0, end - 1 - seq_len), start, end))
    return out


def perplexity(model: nn.Module, docs: Sequence[Document], prefix_id: int, *, seq_len: int | None = None,
               stride: int | None = None, batch_tokens: int = 16384,
               progress: Callable[[int], None] | None = None, name: str = "perplexity") -> TaskResult:
    """Score `docs` with `model` (a temper Transformer in eval mode); see the module docstring.

    The result's `extra` holds the exact counts: documents, tokens, bytes, words and the total nll.
    seq_len: most tokens of context per prediction (default and maximum: the model's max_seq_len).
    stride: tokens scored per window (default seq_len: disjoint windows).
    """
    begin = time.perf_counter()
    docs = [d for d in docs if d.tokens]
    if not docs:
        raise ValueError("no tokens to score: every document is empty")
    max_len = model.cfg.max_seq_len
    seq_len = seq_len or max_len
    if seq_len > max_len:
        raise ValueError(f"seq_len={seq_len} exceeds the model's context of {max_len} tokens")
    stride = stride or seq_len
    requests, owner = [], []
    for i, d in enumerate(docs):
        seq = (prefix_id, *d.tokens)
        for ctx_start, start, end in blocks(len(d.tokens), seq_len, stride):
            requests.append(Request(seq[ctx_start:start], seq[start:end]))
            owner.append(i)
    nll = [0.0] * len(docs)
    for i, s in zip(owner, score(model, requests, batch_tokens=batch_tokens, progress=progress), strict=True):
        nll[i] -= s.logprob
    per_token = _ratio(nll, [len(d.tokens) for d in docs])
    per_byte = _ratio(nll, [d.n_bytes for d in docs])
    per_word = _ratio(nll, [d.n_words for d in docs])
    ln2 = math.log(2)
    metrics = {"perplexity": math.exp(per_token[0]), "bits_per_byte": per_byte[0] / ln2,
               "byte_perplexity": math.exp(per_byte[0]), "word_perplexity": math.exp(per_word[0])}
    # delta method: se(f(R)) = |f'(R)| se(R)
    stderr = {"perplexity": metrics["perplexity"] * per_token[1], "bits_per_byte": per_byte[1] / ln2,
              "byte_perplexity": metrics["byte_perplexity"] * per_byte[1],
              "word_perplexity": metrics["word_perplexity"] * per_word[1]}
    records = [{"doc_id": i, "tokens": len(d.tokens), "bytes": d.n_bytes, "nll": v}
               for i, (d, v) in enumerate(zip(docs, nll, strict=True))]
    counts = {"documents": len(docs), "tokens": sum(len(d.tokens) for d in docs), "bytes": sum(d.n_bytes for d in docs),
              "words": sum(d.n_words for d in docs), "unknown": sum(d.n_unknown for d in docs), "nll": sum(nll),
              "seq_len": seq_len, "stride": stride}
    return TaskResult(name, len(docs), metrics, stderr, records, seconds=time.perf_counter() - begin, extra=counts)


def _ratio(num: Sequence[float], den: Sequence[int]) -> tuple[float, float]:
    """R = sum(num) / sum(den) and its standard error over documents (delta method; nan for one)."""
    n = len(num)
    r = sum(num) / sum(den)
    if n < 2:
        return r, float("nan")
    mean_den = sum(den) / n
    var = sum((a - r * b) ** 2 for a, b in zip(num, den, strict=True)) / (n - 1)
    return r, math.sqrt(var / n) / mean_den
