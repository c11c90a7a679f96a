"""From generated token ids to text: the completion's text, stop strings, what is safe to stream, a
reasoning model's thinking apart from its answer, and the tool calls in a reply.

The engine works on ids; every caller that shows or scores text (`temper generate`, the
evaluation runner, the server) needs the same things, so they live here once.
It does not tokenize: the caller passes its tokenizer's decode.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any


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


def partial_tail(text: str, markers: Sequence[str]) -> int:
    """How many characters at the end of `text` may still become one of `markers` (a stop string, a tag): the
    longest proper prefix of one that `text` ends with. A stream holds them back until the next piece decides."""
    return max((k for m in markers for k in range(1, len(m)) if text.endswith(m[:k])), default=0)


def safe_to_print(text: str, stops: Sequence[str]) -> int:
    """How much of `text` can be printed now: hold back a tail that may still become a stop string,
    and an incomplete UTF-8 character (decoded as U+FFFD until its last byte arrives)."""
    end = len(text) - partial_tail(text, stops)
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
                cut = len(self.held) - (0 if final else partial_tail(self.held, [self.close]))
                reasoning, self.held = reasoning + self.held[:cut], self.held[cut:]
                return reasoning, ""
            else:
                answer, self.held = self.held, ""
                return reasoning, answer


Calls = list[tuple[str, str]]
"""Tool calls as (function name, arguments as a JSON string)."""


def _call(obj: Any) -> tuple[str, str] | None:
    """One call object {"name", "arguments" or "parameters"} as (name, arguments JSON), or None if it is not one."""
    arguments = obj.get("arguments", obj.get("parameters", {})) if isinstance(obj, dict) else None
    if not (isinstance(obj, dict) and isinstance(obj.get("name"), str) and isinstance(arguments, (dict, str))):
        return None
    return obj["name"], arguments if isinstance(arguments, str) else json.dumps(arguments, ensure_ascii=False)


def _hermes_calls(text: str) -> Calls | None:
    """<tool_call>{...}</tool_call> blocks, the last one's closing tag optional (a reply may end at EOS right after
    its JSON)."""
    calls = []
    for piece in text.split("<tool_call>")[1:]:
        try:
            call = _call(json.loads(piece.split("</tool_call>", 1)[0]))
        except json.JSONDecodeError:
            return None
        if call is None:
            return None
        calls.append(call)
    return calls


def _llama3_json_calls(text: str) -> Calls | None:
    """Llama 3.1-3.3's JSON tool calls: the reply is {"name", "parameters"} objects (after an optional
    <|python_tag|>), separated by ";"."""
    text, decoder, calls, at = text.removeprefix("<|python_tag|>"), json.JSONDecoder(), [], 0
    while True:
        while at < len(text) and (text[at].isspace() or text[at] == ";"):
            at += 1
        if at == len(text):
            return calls or None
        try:
            obj, at = decoder.raw_decode(text, at)
        except json.JSONDecodeError:
            return None
        if (call := _call(obj)) is None:
            return None
        calls.append(call)


@dataclass(frozen=True)
class ToolCallFormat:
    """Where a reply's tool calls begin and how they read: one per vLLM tool-call parser temper has."""

    markers: tuple[str, ...]
    """Text that opens the calls."""
    at_start: bool
    """The calls must open the reply (after whitespace); else content may come before them."""
    parse: Callable[[str], Calls | None]
    """The text from the marker on -> its calls, or None when it is not well-formed calls."""
    arguments: str
    """The key of a call object's arguments: "arguments" or "parameters"."""
    call: tuple[str, str]
    """The text before and after one call object, as the model writes it."""
    separator: str
    """The text between two calls."""


TOOL_CALL_FORMATS = {
    # Qwen2.5, Qwen3, Hermes 2 and 3
    "hermes": ToolCallFormat(("<tool_call>",), False, _hermes_calls, "arguments", ("<tool_call>\n", "\n</tool_call>"),
                             "\n"),
    # Llama 3.1, 3.2, 3.3
    "llama3_json": ToolCallFormat(("<|python_tag|>", "{"), True, _llama3_json_calls, "parameters", ("", ""), "; "),
}


def _calls_start(text: str, fmt: ToolCallFormat) -> int:
    """Where the calls begin in `text`, or -1."""
    if fmt.at_start:
        head = text.lstrip()
        return len(text) - len(head) if head.startswith(fmt.markers) else -1
    return min((i for i in (text.find(m) for m in fmt.markers) if i >= 0), default=-1)


def parse_tool_calls(text: str, fmt: ToolCallFormat = TOOL_CALL_FORMATS["hermes"]) -> tuple[str, Calls] | None:
    """(the content before the calls, the calls) of a reply, as vLLM's parser of that format reads it; None when
    the reply opens no call or its calls are not well-formed: it is then all content."""
    start = _calls_start(text, fmt)
    calls = fmt.parse(text[start:]) if start >= 0 else None
    return None if calls is None else (text[:start], calls)


class ToolCallSplitter:
    """A reply's content as it streams, its tool calls held back (`parse_tool_calls`): content is released up to
    where the calls begin (a tail that may still become a marker is held), everything after is kept until the
    reply ends, then parsed; if it does not parse, it is released as content."""

    def __init__(self, fmt: ToolCallFormat = TOOL_CALL_FORMATS["hermes"]) -> None:
        self.fmt, self.held = fmt, ""
        self.state = "start" if fmt.at_start else "content"  # start: the reply may yet open with a call
        self.calls: Calls = []

    def feed(self, text: str, final: bool = False) -> str:
        """The content this piece releases; at the end (`final`) `calls` holds the reply's tool calls."""
        self.held += text
        out = ""
        if self.state in ("start", "content"):
            at = _calls_start(self.held, self.fmt)
            if at >= 0:
                out, self.held, self.state = self.held[:at], self.held[at:], "calling"
            elif self.state == "start":
                head = self.held.lstrip()
                if final or (head and not any(m.startswith(head) for m in self.fmt.markers)):
                    out, self.held, self.state = self.held, "", "answer"  # no call opens this reply
            else:
                cut = len(self.held) - (0 if final else partial_tail(self.held, self.fmt.markers))
                out, self.held = self.held[:cut], self.held[cut:]
        elif self.state == "answer":
            out, self.held = self.held, ""
        if final and self.state == "calling":
            calls = self.fmt.parse(self.held)
            out, self.calls, self.held = (out + self.held, [], "") if calls is None else (out, calls, "")
        return out
