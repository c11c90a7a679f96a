"""From generated token ids to text: the completion's text, stop strings, what is safe to stream, a
reasoning model's thinking apart from its answer, and the tool calls in a reply.

The engine works on ids; every caller that shows or scores text (`temper generate`, the
evaluation runner, the server) needs the same things, so they live here once.
It does not tokenize: the caller passes its tokenizer's decode.
"""

from __future__ import annotations

import json
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


THINK_TAGS = ("<think>", "</think>")
"""The tags around a reasoning model's thinking (Qwen3, DeepSeek-R1, QwQ)."""


class ReasoningSplitter:
    """A reply split into reasoning and answer as it streams, at the thinking tags (the `reasoning_content` of
    vLLM's reasoning parsers, which OpenAI-style clients read).

    Reasoning is what lies between an opening tag at the reply's start (whitespace before it dropped) and the
    closing tag; with `thinking` (the prompt already opened the block, as DeepSeek-R1's template does) it starts
    with the reply. The answer is everything after the closing tag, verbatim, or the whole reply when no block
    opens. A tag split across pieces is held back until it is decided, so the pieces' outputs join to what the
    whole reply gives at once."""

    def __init__(self, tags: tuple[str, str] = THINK_TAGS, thinking: bool = False) -> None:
        self.open, self.close = tags
        self.state = "reasoning" if thinking else "start"
        self.held = ""

    def feed(self, text: str, final: bool = False) -> tuple[str, str]:
        """(reasoning, answer) this piece decides; `final` (the reply's end) releases what was held back."""
        self.held += text
        reasoning = ""
        while True:
            if self.state == "start":  # does the reply open a block?
                head = self.held.lstrip()
                if head.startswith(self.open):
                    self.held, self.state = head[len(self.open):], "reasoning"
                elif final or not self.open.startswith(head):
                    self.state = "answer"
                else:
                    return reasoning, ""  # whitespace, or the opening tag's start: not decided yet
            elif self.state == "reasoning":
                end = self.held.find(self.close)
                if end >= 0:
                    reasoning += self.held[:end]
                    self.held, self.state = self.held[end + len(self.close):], "answer"
                    continue
                keep = 0 if final else max((k for k in range(1, len(self.close)) if self.held.endswith(self.close[:k])),
                                           default=0)
                cut = len(self.held) - keep
                reasoning, self.held = reasoning + self.held[:cut], self.held[cut:]
                return reasoning, ""
            else:
                answer, self.held = self.held, ""
                return reasoning, answer


HERMES_TAGS = ("<tool_call>", "</tool_call>")
"""The tags around each tool call of Hermes-style chat templates (Qwen2.5, Qwen3, Hermes 2 and 3), a JSON object
{"name": ..., "arguments": {...}} between them."""


def parse_tool_calls(text: str, tags: tuple[str, str] = HERMES_TAGS) -> tuple[str, list[tuple[str, str]]] | None:
    """(the content before the first call, [(name, arguments as a JSON string)]) of a reply that calls tools, as
    vLLM's hermes parser reads it: every call between the tags, the last one's closing tag optional (a reply may
    end at EOS right after its JSON). None when the reply opens no call or a call is not such a JSON object: it is
    then all content."""
    opening, closing = tags
    start = text.find(opening)
    if start < 0:
        return None
    calls = []
    for piece in text[start:].split(opening)[1:]:
        body = piece.split(closing, 1)[0]
        try:
            call = json.loads(body)
        except json.JSONDecodeError:
            return None
        arguments = call.get("arguments", call.get("parameters", {})) if isinstance(call, dict) else None
        if not (isinstance(call, dict) and isinstance(call.get("name"), str) and isinstance(arguments, (dict, str))):
            return None
        calls.append((call["name"], arguments if isinstance(arguments, str)
                      else json.dumps(arguments, ensure_ascii=False)))
    return text[:start], calls


class ToolCallSplitter:
    """A reply's content as it streams, its tool calls held back (`parse_tool_calls`): content is released up to
    the first opening tag (a tail that may still become the tag is held), everything after it is kept until the
    reply ends, then parsed; if it does not parse, it is released as content."""

    def __init__(self, tags: tuple[str, str] = HERMES_TAGS) -> None:
        self.tags, self.held, self.calling = tags, "", False
        self.calls: list[tuple[str, str]] = []

    def feed(self, text: str, final: bool = False) -> str:
        """The content this piece releases; at the end (`final`) `calls` holds the reply's tool calls."""
        self.held += text
        out = ""
        if not self.calling:
            at = self.held.find(self.tags[0])
            if at >= 0:
                out, self.held, self.calling = self.held[:at], self.held[at:], True
            else:
                opening = self.tags[0]
                keep = 0 if final else max((k for k in range(1, len(opening)) if self.held.endswith(opening[:k])),
                                           default=0)
                out, self.held = self.held[:len(self.held) - keep], self.held[len(self.held) - keep:]
        if final and self.calling:
            parsed = parse_tool_calls(self.held, self.tags)
            if parsed is None:
                out += self.held
            else:
                self.calls = parsed[1]
            self.held = ""
        return out
