"""Constrained decoding: a grammar masks every draw to the tokens that keep the text inside it, so each completion
parses (a JSON schema's object, a regular expression's match, one of a list of strings, a Lark grammar's sentence).

The grammar is compiled against the tokenizer's vocabulary by llguidance (Microsoft's Rust engine, the "guidance"
backend of vLLM and the grammar engine of llama.cpp and SGLang): an Earley parser over a byte-level lexer, so a token
that spans several of the grammar's symbols, or half a UTF-8 character, is allowed exactly when its bytes can extend
the text, and a step's mask takes about 0.1 ms of a CPU core. It is taken rather than written because the hard part
(JSON Schema's keywords, a lexer over byte tokens, its limits against grammars that blow up) is what it is; xgrammar,
vLLM's other backend, would pull triton and transformers into a serving install.

The pieces, in the order a server uses them:
  - `vocabulary(tokenizer, size, eos_ids)`: llguidance's view of a `tokenizers` tokenizer, built once per model.
    Special tokens (marked so in tokenizer.json) never match a grammar's text, and an EOS id is allowed only where
    the text is complete.
  - `json_schema`, `regex`, `choice`, `lark`: a grammar's source in llguidance's form;
  - `compile_grammar(vocabulary, source)`: the compiled grammar, or `GrammarError` naming what is wrong;
  - `Grammar.matcher()`: one choice's parser state (a copy: compiling is the slow part, done once per request,
    off the scheduler's thread); each step `Matcher.mask_(logits)` (`mask_rows_` for a batch's rows at once), then
    `Matcher.advance(token)`.

JSON is written as `json.dumps` writes it by default (", " and ": ", no other whitespace): that is how chat
templates and models write JSON, and a grammar that allows any whitespace lets a weak model pad forever. A schema's
own `"x-guidance": {"whitespace_flexible": true}` (llguidance's options) allows any.

It masks; it does not choose: the draw, its temperature and its log-probs stay the engine's (`temper.infer.engine`).
"""

from __future__ import annotations

import functools
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import llguidance
import torch
from tokenizers import Tokenizer

from temper.infer.text import ToolCallFormat

JSON_STYLE = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
"""llguidance's JSON options by default: the separators `json.dumps` writes, no other whitespace."""


class GrammarError(ValueError):
    """A grammar that does not compile, or a parser that failed while generating; the message says where."""


def vocabulary(tokenizer: Tokenizer, size: int, eos_ids: Sequence[int]) -> llguidance.LLTokenizer:
    """The tokenizer (its tokenizer.json) as llguidance sees it: each id's bytes, special tokens apart; `size`, the
    model's vocabulary (ids past the tokenizer's, padding rows of the embedding, are never allowed); and the EOS
    ids, allowed only where the text is complete. Built once per model."""
    if not eos_ids:
        raise GrammarError("constrained decoding needs the model's EOS token id (generation_config.json)")
    try:
        return llguidance.LLTokenizer(tokenizer.to_str(), n_vocab=size, eos_token=list(eos_ids))
    except (ValueError, RuntimeError) as e:
        raise GrammarError(f"llguidance cannot read this tokenizer: {e}") from None


def json_schema(schema: Mapping[str, Any]) -> str:
    """A JSON schema's grammar (in `JSON_STYLE` unless the schema's x-guidance says otherwise)."""
    if not isinstance(schema, Mapping):
        raise GrammarError(f"a JSON schema must be an object, got {type(schema).__name__}")
    return llguidance.LLMatcher.grammar_from_json_schema(dict(schema), defaults=JSON_STYLE)


def regex(pattern: str) -> str:
    """The grammar of text that matches `pattern` whole (Rust's regex syntax, close to Python's `re`)."""
    return llguidance.LLMatcher.grammar_from_regex(pattern)


def choice(options: Sequence[str]) -> str:
    """The grammar of exactly one of `options`."""
    return llguidance.LLMatcher.grammar_from_lark("start: " + " | ".join(json.dumps(o) for o in options))


def lark(text: str) -> str:
    """A Lark grammar's (llguidance's dialect: `start` is the text; `%json {...}` inlines a JSON schema), or llama.cpp's
    GBNF (rules written `name ::= ...`), converted to Lark by llguidance."""
    try:
        return llguidance.grammar_from("grammar", text)
    except ValueError as e:
        raise GrammarError(str(e)) from None


def tool_calls(fmt: ToolCallFormat, tools: Sequence[Mapping[str, Any]], many: bool = True) -> str:
    """The grammar of a reply that is tool calls only, in the model's format `fmt`: one (`many` False) or more calls
    of `tools` (OpenAI's {type: function, function: {name, parameters}}), each call's arguments in its function's
    JSON schema. What `tool_choice` "required" or a named function forces."""
    calls = []
    for tool in tools:
        function = tool["function"]
        calls.append({"type": "object", "properties": {"name": {"const": function["name"]},
                                                       fmt.arguments: function.get("parameters") or {"type": "object"}},
                      "required": ["name", fmt.arguments], "additionalProperties": False})
    before, after = (json.dumps(text) for text in fmt.call)
    item = " ".join(t for t in (before, json_in_lark(calls[0] if len(calls) == 1 else {"anyOf": calls}), after)
                    if t != '""')
    more = f" ({json.dumps(fmt.separator)} call)*" if many else ""
    return llguidance.LLMatcher.grammar_from_lark(f"start: call{more}\ncall: {item}")


def json_in_lark(schema: Mapping[str, Any]) -> str:
    """A JSON schema as a Lark grammar's item, in `JSON_STYLE` as `json_schema`'s."""
    options = JSON_STYLE | dict(schema.get("x-guidance", {}))
    return "%json " + json.dumps(dict(schema) | {"x-guidance": options})


class Matcher:
    """One choice's place in its grammar: the tokens allowed next, and the text so far."""

    def __init__(self, matcher: llguidance.LLMatcher) -> None:
        self._matcher = matcher

    def mask_(self, logits: torch.Tensor) -> torch.Tensor:
        """`logits` (V,) with every token the grammar does not allow next at -inf, in place (`mask_rows_`)."""
        mask_rows_(logits[None], [self])
        return logits

    def advance(self, token: int) -> None:
        """Take the token drawn (one `mask_` allowed); `GrammarError` if the parser failed."""
        if not self._matcher.consume_token(token):
            raise GrammarError(f"the grammar's parser failed: {self._matcher.get_error()}")

    @property
    def done(self) -> bool:
        """The text is complete and nothing may follow it (but an EOS id)."""
        return self._matcher.is_stopped()


@functools.cache
def _executor() -> llguidance.LLExecutor:
    return llguidance.LLExecutor()  # Rust threads, most of the cores


@functools.cache
def _byte_bias(device: torch.device) -> torch.Tensor:
    """(256, 8) float32: for each byte of a mask, the 8 tokens' bias, 0 where its bit is set, else -inf."""
    bits = (torch.arange(256)[:, None] >> torch.arange(8)) & 1  # bit j of byte b: token 8 * (byte's index) + j
    return torch.zeros(256, 8).masked_fill_(bits == 0, float("-inf")).to(device)


def mask_rows_(logits: torch.Tensor, matchers: Sequence[Matcher]) -> torch.Tensor:
    """Each row of `logits` (G, V) with the tokens its matcher does not allow next at -inf, in place. llguidance
    computes the G masks in parallel (a bit per token), and each byte of them picks its 8 tokens' biases from a
    table (a gather and an add: 2.4x faster than a boolean masked_fill at V = 21k). A row whose parser failed is
    left whole (`advance` then says why, whatever is drawn)."""
    words = (logits.shape[-1] + 31) // 32
    bits = torch.empty(len(matchers), words, dtype=torch.int32)  # (G, V / 32): token j is bit j % 32 of word j // 32
    _executor().unsafe_compute_mask_ptr([(m._matcher, i) for i, m in enumerate(matchers)], bits.data_ptr(),
                                        words * 4, len(matchers))
    for i, m in enumerate(matchers):
        if m._matcher.is_error():
            bits[i] = -1
    # Little-endian words (every x86 and ARM): byte k of a row holds tokens 8k .. 8k + 7, lowest bit first.
    table = _byte_bias(logits.device)
    bias = table[bits.to(logits.device, non_blocking=True).view(torch.uint8).long()].flatten(1)  # (G, words * 32)
    return logits.add_(bias[:, : logits.shape[-1]].to(logits.dtype))


@dataclass(frozen=True)
class Grammar:
    """A grammar compiled against a vocabulary; `matcher()` starts one choice at its beginning."""

    _root: llguidance.LLMatcher

    def matcher(self) -> Matcher:
        return Matcher(self._root.deep_copy())


def compile_grammar(vocab: llguidance.LLTokenizer, source: str) -> Grammar:
    """Compile `source` (from `json_schema`, `regex`, `choice` or `lark`) against `vocabulary(...)`; `GrammarError`
    says what is wrong. The slow part (up to a second for a large schema): done once per request."""
    try:
        matcher = llguidance.LLMatcher(vocab, source, log_level=0)
    except ValueError as e:
        raise GrammarError(str(e)) from None
    if matcher.is_error():
        raise GrammarError(matcher.get_error())
    return Grammar(matcher)
