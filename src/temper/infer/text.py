"""From generated token ids to text: the completion's text, stop strings, and what is safe to stream.

The engine works on ids; every caller that shows or scores text (`temper generate`, the
evaluation runner, the server) needs the same three things, so they live here once.
It does not tokenize: the caller passes its tokenizer's decode.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence


def completion_text(decode: Callable[[list[int]], str], prompt: list[int], ids: list[int]) -> str:
    """The text that `ids` add after `prompt`.

    Decoded together with the prompt, so that tokenizers that drop a leading space when decoding
    a sequence's first token (SentencePiece's Metaspace) keep the space between prompt and answer.
    """
    base = decode(prompt)
    full = decode(prompt + ids)
    return full[len(base):] if full.startswith(base) else decode(ids)


def cut_at_stop(text: str, stops: Sequence[str]) -> tuple[str, bool]:
    """The text before the earliest stop string, and whether one was found."""
    hits = [i for i in (text.find(s) for s in stops) if i >= 0]
    return (text[: min(hits)], True) if hits else (text, False)


def safe_to_print(text: str, stops: Sequence[str]) -> int:
    """How much of `text` can be printed now: hold back a tail that may still become a stop string,
    and an incomplete UTF-8 character (decoded as U+FFFD until its last byte arrives)."""
    hold = max((k for s in stops for k in range(1, len(s)) if text.endswith(s[:k])), default=0)
    end = len(text) - hold
    while end > 0 and text[end - 1] == "\ufffd":
        end -= 1
    return end
