"""Instruction and chat examples -> token ids and loss masks, and the check to run before training.

Three record formats, recognised per record by their keys (or forced by `SFTDataConfig.format`),
read from JSON arrays or JSON Lines (.json, .jsonl, .ndjson, optionally .gz):
- Alpaca: `instruction`, optional `input`, `output`; optional `system` and `history` (a list of
  [user, assistant] pairs before the instruction, as LLaMA-Factory writes multi-turn Alpaca rows);
- chat: `messages`, a list of {"role": "system" | "user" | "assistant", "content": str}, an assistant turn
  optionally with its reasoning (`reasoning_content`, `thinking` or `reasoning`: a str the template renders);
- ShareGPT: `conversations`, a list of {"from": "human" | "gpt" | "system" | "user" | "assistant",
  "value": str}, optional top-level `system`.
Every record becomes one conversation: an optional system turn first, then user and assistant
turns alternating, starting with user and ending with assistant. An Alpaca record is one user turn
(the instruction, then a blank line and the input when there is one) and one assistant turn.

Two prompt formats:
- "chat": the tokenizer's own chat template, rendered exactly as transformers'
  `apply_chat_template`, so the ids equal `apply_chat_template(messages, tokenize=True)`.
- "alpaca": the Stanford Alpaca prompt (with or without input) followed by the response and EOS,
  for one instruction and one response. The prompt ends "### Response:\\n", as in the Alpaca
  README and the `text` column of the tatsu-lab/alpaca dataset (Stanford's train.py leaves the
  newline out); BOS is what the tokenizer's post-processor puts before any text, and EOS is
  appended whatever the post-processor would add after it.

What is trained (`SFTExample.loss_mask`, True where a token is a training target: a boolean mask
rather than -100 labels because packing.py's `pack_documents(loss_masks=...)` takes it and shifts
the targets itself; `SFTExample.labels` gives Hugging Face-style labels): the tokens of every
assistant turn, up to and including the token that ends the turn, so that the model learns
to stop. With the chat template an assistant turn is found by rendering the conversation up to it
with `add_generation_prompt=True` and up to and including it: the first must be a prefix of the
second, and the second of the whole conversation, in token ids (a template that renders earlier
turns differently once more follow, such as one that drops past reasoning, is refused naming the
record, unless `turns` says otherwise: see below). The turn's tokens are those between the two; the
token that ends it is the last special
token among them that is followed by nothing but whitespace (`<|eot_id|>`, `<|im_end|>`,
`<end_of_turn>`, `</s>` ...), and that whitespace (Qwen's "\\n" after `<|im_end|>`) is left
untrained: it is template layout that the model never generates, since decoding stops at the end
token. When a template ends an assistant turn with no special token, the tokenizer's EOS is
inserted after the turn and trained (the ids then differ from `apply_chat_template` by those EOS
tokens, counted in `SFTStats.eos_added`): without it the model could not learn to stop. With the
Alpaca prompt the response and the appended EOS are trained. `train_on_prompt` trains every token
but the first, which nothing in the example precedes.

Which assistant turns (`turns`): "all" of them, in one example; the "last" one only, the earlier ones
being context (LLaMA-Factory's `mask_history`); or "each" in an example of its own, the conversation
cut after it and only its last turn trained. "last" and "each" only need the prefix property up to the
final turn, so they serve templates that render past turns unlike the current one: Qwen3's writes a
`<think>` block in the final assistant turn only, and drops past ones, as at inference; with "each"
every turn is trained as the model will see it when it answers.

Length: an example longer than `max_length` is truncated (its start is kept: the prompt, and as
much of the response as fits; an example left with no trained token is dropped) or dropped, and
counted. Bad input (unknown role, wrong role order, empty or missing content, a value that is not a
string, invalid JSON) raises `SFTDataError` naming the file, the line (JSON Lines) or index (JSON
array: `file[3]`) and the key, or with `strict=False` is skipped and counted (`skip_summary` says how
many, why and where), and more than `max_skip_fraction` of bad records stops, as in `prepare`.

`check_examples` + `format_report` are the check to run before training (`temper sft --check`):
a few examples with the trained text marked, the share of trained tokens, whether every example
ends with a trained end-of-turn token, the length distribution; an example with no trained token,
or an untruncated one whose last trained token does not end a turn, makes the check fail.

It does not pack or pad examples (packing.py takes `ids` and `loss_mask`), render templates
(chat.py), read tool calls, images or per-message weights, or read Parquet.
"""

from __future__ import annotations

import re
import sys
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np

from temper.data.chat import REASONING_FIELDS, ChatTemplateError, check_template_variables
from temper.data.packing import IGNORE_INDEX, Piece, plan_packing
from temper.data.sources import DataError, ReadStats, RecordError, expand_inputs, json_records
from temper.data.tokenizer import HFTokenizer

FORMATS = ("auto", "alpaca", "messages", "sharegpt")
TEMPLATES = ("chat", "alpaca")
OVERFLOW = ("truncate", "drop")
ROLES = ("system", "user", "assistant")
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}
SUFFIXES = (".json", ".jsonl", ".ndjson")
MAX_LISTED = 10  # record locations kept per kind of problem: enough to find them, bounded for big sets

# Stanford Alpaca's prompts (tatsu-lab/stanford_alpaca), each ending with the newline its README shows.
ALPACA_PROMPT_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
ALPACA_PROMPT_NO_INPUT = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:\n"
)
_SURROGATE = re.compile("[\ud800-\udfff]")
_JSON_TYPES = {dict: "object", list: "array", str: "string", int: "number", float: "number", bool: "boolean"}


@dataclass
class SFTDataConfig:
    """Where SFT examples come from and how they become tokens and loss masks."""

    files: list[str] = field(default_factory=list)
    """JSON arrays or JSON Lines files (.json, .jsonl, .ndjson, optionally .gz): paths, directories or globs."""
    format: Literal["auto", "alpaca", "messages", "sharegpt"] = "auto"
    """Record format: auto (per record, by its keys), alpaca (instruction/input/output), messages (chat), sharegpt."""
    template: Literal["chat", "alpaca"] = "chat"
    """Prompt format: the tokenizer's chat template, or the Stanford Alpaca prompt (one instruction, one response)."""
    chat_template: str = ""
    """Which of the tokenizer's chat templates to use ('': its default)."""
    chat_template_kwargs: dict = field(default_factory=dict)
    """Extra variables for the chat template, as apply_chat_template takes them: '{enable_thinking: false}' (Qwen3)."""
    system_prompt: str = ""
    """System turn put first in conversations that have none (template=chat; '': none added)."""
    max_length: int = 2048
    """Longest example in tokens; longer ones are truncated or dropped (see overflow)."""
    overflow: Literal["truncate", "drop"] = "truncate"
    """Over-long examples: truncate (keep the start, cut the response; dropped if nothing trained is left) or drop."""
    strict: bool = True
    """Stop at the first bad record (naming file, line and key); false: skip bad records and count them."""
    max_skip_fraction: float = 0.01
    """With strict=false: stop when more than this fraction of the records are bad (as `prepare` does)."""
    train_on_prompt: bool = False
    """Train on every token (prompt and system turns included), not only on the assistant turns."""
    turns: Literal["all", "last", "each"] = "all"
    """Assistant turns trained (template=chat): all, the last only, or each in its own example (Qwen3's template)."""

    def __post_init__(self) -> None:
        if self.max_length < 2:
            raise ValueError(f"max_length={self.max_length} must be at least 2")
        if not 0.0 <= self.max_skip_fraction <= 1.0:
            raise ValueError(f"max_skip_fraction must be in [0, 1], got {self.max_skip_fraction}")
        if self.template == "alpaca" and (self.system_prompt or self.chat_template):
            raise ValueError("system_prompt and chat_template apply to template=chat; the Alpaca prompt has neither")
        if self.template == "alpaca" and self.turns != "all":
            raise ValueError("turns applies to template=chat; the Alpaca prompt holds one turn")
        if self.template == "alpaca" and self.chat_template_kwargs:
            raise ValueError("chat_template_kwargs apply to template=chat")
        check_template_variables(self.chat_template_kwargs)


class SFTDataError(RecordError):
    """A record that cannot become an example: the message names file, line or index, and key."""


@dataclass
class SFTRecord:
    """One conversation read from a file, checked but not tokenized."""

    messages: list[dict[str, str]]
    """The turns in order, each {"role": "system" | "user" | "assistant", "content": str}; an assistant turn may
    add "reasoning_content"."""
    where: str
    """Where it was read: "file:line" (JSON Lines) or "file[index]" (JSON array, 0-based)."""
    instruction: str | None = None
    """An Alpaca record's instruction (None for chat records): the Alpaca prompt keeps it apart from its input."""
    input: str = ""
    """An Alpaca record's input ("" when it has none)."""


@dataclass
class SFTExample:
    """One tokenized example: what packing.py's `pack_documents(docs, loss_masks=...)` takes."""

    ids: np.ndarray
    """Token ids, int32 (T,)."""
    loss_mask: np.ndarray
    """bool (T,): True where the token is a training target (predicted from the tokens before it)."""
    where: str
    """The record it came from ("file:line" or "file[index]")."""
    full_length: int
    """Tokens before truncation (len(ids) when not truncated)."""
    eos_added: bool = False
    """EOS was inserted after assistant turns because the chat template ends them with no special token."""

    @property
    def truncated(self) -> bool:
        return len(self.ids) < self.full_length

    @property
    def n_trained(self) -> int:
        return int(self.loss_mask.sum())

    @property
    def labels(self) -> np.ndarray:
        """int64 (T,) Hugging Face-style labels: the id where trained, IGNORE_INDEX (-100) elsewhere (not shifted)."""
        return np.where(self.loss_mask, self.ids.astype(np.int64), IGNORE_INDEX)


@dataclass
class SFTStats:
    """What reading and tokenizing saw."""

    records: int = 0
    """Records read, good and bad."""
    examples: int = 0
    """Examples produced."""
    skipped: Counter = field(default_factory=Counter)
    """Bad records skipped (strict=False), by reason."""
    truncated: int = 0
    """Examples cut to max_length (and kept)."""
    dropped: Counter = field(default_factory=Counter)
    """Examples dropped for their length: "too_long" (overflow=drop), "nothing_trained_left" (truncation cut every trained token)."""
    eos_added: int = 0
    """Examples whose template ends assistant turns with no special token, where EOS was inserted."""
    problems: list[str] = field(default_factory=list)
    """The first skipped records' errors, to find them again."""


# ---- reading records ---------------------------------------------------------------------------


def read_sft_records(files: str | Sequence[str], *, format: str = "auto", strict: bool = True,
                     stats: SFTStats | None = None) -> list[SFTRecord]:
    """The conversations of `files` (paths, directories, globs), in file order, checked.

    A bad record raises `SFTDataError`, or with `strict=False` is skipped and counted in `stats`.
    A JSON array that does not parse, a file that is not UTF-8 or a corrupt gzip file always
    raises: nothing of it can be read reliably.
    """
    if format not in FORMATS:
        raise ValueError(f"format must be one of {FORMATS}, got {format!r}")
    stats = stats if stats is not None else SFTStats()
    records = []
    for path in expand_inputs(files):
        name = path.name.lower().removesuffix(".gz")
        if not name.endswith(SUFFIXES):
            raise DataError(f"{path}: SFT data must be JSON or JSON Lines ({', '.join(SUFFIXES)}, optionally .gz)")
        for where, obj in json_records(path):
            stats.records += 1
            try:
                if isinstance(obj, RecordError):  # an unreadable line
                    raise SFTDataError(obj.where, obj.key, obj.reason, obj.message)
                records.append(parse_record(obj, where, format))
            except SFTDataError as e:
                _skip(e, strict, stats)
    return records


def _skip(error: SFTDataError, strict: bool, stats: SFTStats) -> None:
    if strict:
        raise error
    stats.skipped[error.reason] += 1
    if len(stats.problems) < MAX_LISTED:
        stats.problems.append(str(error))


def parse_record(obj: Any, where: str, format: str = "auto") -> SFTRecord:
    """One JSON value -> a checked conversation; raises SFTDataError naming `where` and the key."""
    if not isinstance(obj, dict):
        raise SFTDataError(where, "", "not_object", f"expected a JSON object, got {_kind(obj)}")
    if format == "auto":
        format = _detect(obj, where)
    if format == "messages":
        record = SFTRecord(_turns(obj, where, "messages", "role", "content", {r: r for r in ROLES}), where)
        _check_order(record.messages, where, "messages[{}].role")
    elif format == "sharegpt":
        system = _system(obj, where)
        turns = _turns(obj, where, "conversations", "from", "value", SHAREGPT_ROLES)
        record = SFTRecord(system + turns, where)
        _check_order(record.messages, where, "conversations[{}].from", added=len(system))
    elif format == "alpaca":
        record = _alpaca(obj, where)  # its turns are in order by construction
    else:
        raise ValueError(f"format must be one of {FORMATS}, got {format!r}")
    return record


def _detect(obj: Mapping[str, Any], where: str) -> str:
    if "messages" in obj:
        return "messages"
    if "conversations" in obj:
        return "sharegpt"
    if "instruction" in obj or "output" in obj:
        return "alpaca"
    keys = ", ".join(k[:40] for k in sorted(obj)[:10])
    raise SFTDataError(where, "", "unknown_format", "cannot tell the format: expected a 'messages' (chat), "
                       f"'conversations' (ShareGPT) or 'instruction' + 'output' (Alpaca) key; keys: {keys}")


_MISSING = object()  # a key absent from the record, told apart from an explicit null


def _kind(value: Any) -> str:
    return _JSON_TYPES.get(type(value), "null")


def _text(value: Any, where: str, key: str, optional: bool = False) -> str:
    """A string field: present (unless optional, when null or absent is ""), a string, not blank, valid Unicode."""
    if value is None and optional:
        return ""
    if value is _MISSING:
        raise SFTDataError(where, key, "missing_field", "missing")
    if not isinstance(value, str):
        raise SFTDataError(where, key, "not_string", f"expected a string, got {_kind(value)}")
    if not value.strip() and not optional:
        raise SFTDataError(where, key, "empty_content", "empty (or only whitespace)")
    if not value.isascii() and _SURROGATE.search(value):  # "\ud800" in JSON: the tokenizer cannot take it
        raise SFTDataError(where, key, "bad_unicode", "holds a lone surrogate escape (\\ud800-\\udfff), not text")
    return value



def _turns(obj: Mapping[str, Any], where: str, key: str, role_key: str, content_key: str,
           roles: Mapping[str, str]) -> list[dict[str, str]]:
    turns = obj.get(key)
    if not isinstance(turns, list):
        raise SFTDataError(where, key, "not_list", f"expected a list of turns, got {_kind(turns)}")
    messages = []
    for i, turn in enumerate(turns):
        at = f"{key}[{i}]"
        if not isinstance(turn, dict):
            raise SFTDataError(where, at, "not_object", f"expected an object, got {_kind(turn)}")
        role = turn.get(role_key, _MISSING)
        if role is _MISSING:
            raise SFTDataError(where, f"{at}.{role_key}", "missing_field", "missing")
        if not isinstance(role, str):
            raise SFTDataError(where, f"{at}.{role_key}", "not_string", f"expected a string, got {_kind(role)}")
        if role not in roles:
            raise SFTDataError(where, f"{at}.{role_key}", "unknown_role",
                               f"unknown role {role[:40]!r} (expected one of {', '.join(roles)})")
        message = {"role": roles[role], "content": _text(turn.get(content_key, _MISSING), where, f"{at}.{content_key}")}
        # A reasoning model's thinking (`reasoning_content`, or an alias), kept for templates that render it (Qwen3's
        # <think> block); only an assistant turn has one.
        field = next((f for f in REASONING_FIELDS if turn.get(f) is not None), None)
        if field is not None:
            if message["role"] != "assistant":
                raise SFTDataError(where, f"{at}.{field}", "not_assistant", "only an assistant turn carries reasoning")
            if reasoning := _text(turn[field], where, f"{at}.{field}", optional=True):
                message["reasoning_content"] = reasoning
        messages.append(message)
    return messages


def _system(obj: Mapping[str, Any], where: str) -> list[dict[str, str]]:
    system = _text(obj.get("system"), where, "system", optional=True)
    return [{"role": "system", "content": system}] if system.strip() else []


def _alpaca(obj: Mapping[str, Any], where: str) -> SFTRecord:
    instruction = _text(obj.get("instruction", _MISSING), where, "instruction")
    input_ = _text(obj.get("input"), where, "input", optional=True)
    output = _text(obj.get("output", _MISSING), where, "output")
    history = obj.get("history")
    messages = _system(obj, where)
    if history is not None:
        if not isinstance(history, list):
            raise SFTDataError(where, "history", "not_list", f"expected a list of [user, assistant] pairs, got {_kind(history)}")
        for i, pair in enumerate(history):
            if not (isinstance(pair, list) and len(pair) == 2):
                raise SFTDataError(where, f"history[{i}]", "not_pair", "expected a [user, assistant] pair")
            messages.append({"role": "user", "content": _text(pair[0], where, f"history[{i}][0]")})
            messages.append({"role": "assistant", "content": _text(pair[1], where, f"history[{i}][1]")})
    # The blank line keeps the input a paragraph of its own, as in the Alpaca prompt's layout.
    user = f"{instruction}\n\n{input_}" if input_.strip() else instruction
    messages += [{"role": "user", "content": user}, {"role": "assistant", "content": output}]
    return SFTRecord(messages, where, instruction=instruction, input=input_ if input_.strip() else "")


def _check_order(messages: list[dict[str, str]], where: str, key: str, added: int = 0) -> None:
    """Optional system turn first, then user and assistant alternating from user, ending with assistant.

    `key` formats a turn's index in the file into its key; the first `added` turns came from
    elsewhere in the record (a top-level "system").
    """
    if len(messages) == added:
        raise SFTDataError(where, key.split("[")[0], "empty_conversation", "no turns")
    previous = None
    for i, message in enumerate(messages):
        role, at = message["role"], key.format(i - added)
        if role == "system":
            if i > 0:
                raise SFTDataError(where, at, "role_order", "a system turn must come first, before any other"
                                   + (" (the record's 'system' already is)" if added else ""))
            continue
        if previous is None and role != "user":
            raise SFTDataError(where, at, "role_order", "the first turn (after a system turn) must be the user's")
        if role == previous:
            raise SFTDataError(where, at, "role_order", f"two {role} turns in a row: turns must alternate")
        previous = role
    if previous != "assistant":
        raise SFTDataError(where, key.format(len(messages) - 1 - added), "role_order",
                           "the conversation must end with an assistant turn (nothing follows it to learn)")


# ---- tokenizing ---------------------------------------------------------------------------------


def alpaca_prompt(instruction: str, input: str = "") -> str:
    """The Stanford Alpaca prompt, up to and including "### Response:\\n"."""
    if input:
        return ALPACA_PROMPT_INPUT.format(instruction=instruction, input=input)
    return ALPACA_PROMPT_NO_INPUT.format(instruction=instruction)


def tokenize_record(
    record: SFTRecord,
    tokenizer: HFTokenizer,
    *,
    template: str = "chat",
    chat_template: str | None = None,
    system_prompt: str = "",
    train_on_prompt: bool = False,
    last_turn_only: bool = False,
    template_variables: Mapping[str, Any] | None = None,
) -> SFTExample:
    """One record -> ids and loss mask (see the module docstring for what is trained); no length limit.

    Raises SFTDataError (naming the record, and as "turn k" the turn's index in the conversation
    as rendered, system turn included) when the chat template refuses the conversation or breaks
    the prefix property, or the Alpaca prompt is asked for a conversation it cannot hold.
    last_turn_only: train the final assistant turn only (turns=last; chat template only).
    template_variables: extra names the chat template reads (`enable_thinking`, ...).
    """
    if template == "alpaca" and (system_prompt or chat_template):
        raise ValueError("system_prompt and chat_template apply to template=chat; the Alpaca prompt has neither")
    if template == "chat":
        messages = record.messages
        if system_prompt and messages[0]["role"] != "system":
            messages = [{"role": "system", "content": system_prompt}, *messages]
        ids, mask, eos_added = _tokenize_chat(messages, tokenizer, chat_template, record.where, last_turn_only,
                                              template_variables)
    elif template == "alpaca":
        ids, mask = _tokenize_alpaca(record, tokenizer)
        eos_added = False
    else:
        raise ValueError(f"template must be one of {TEMPLATES}, got {template!r}")
    if train_on_prompt:
        mask = [True] * len(ids)
        mask[0] = False  # nothing in the example precedes its first token, so nothing predicts it
    return SFTExample(np.asarray(ids, dtype=np.int32), np.asarray(mask, dtype=bool), record.where, len(ids), eos_added)


def each_turn(record: SFTRecord) -> list[SFTRecord]:
    """The conversation cut after each of its assistant turns (turns=each), in order: "turn k" in `where` is the
    turn's index in the record's messages."""
    return [SFTRecord(record.messages[:k + 1], f"{record.where} turn {k}", record.instruction, record.input)
            for k, m in enumerate(record.messages) if m["role"] == "assistant"]


def _eos(tokenizer: HFTokenizer, where: str) -> int:
    if tokenizer.eos_id is None:
        raise SFTDataError(where, "", "no_eos", "the tokenizer has no eos_token, so the model could not learn to "
                           "stop: name one in tokenizer_config.json")
    return tokenizer.eos_id


def _tokenize_alpaca(record: SFTRecord, tokenizer: HFTokenizer) -> tuple[list[int], list[bool]]:
    messages = record.messages
    if record.instruction is not None:
        if len(messages) != 2:
            key = "system" if messages[0]["role"] == "system" else "history"
            raise SFTDataError(record.where, key, "not_one_turn", "the Alpaca prompt holds one instruction and one "
                               "response, without system turn or history: use template=chat")
        instruction, input_ = record.instruction, record.input
    else:
        if [m["role"] for m in messages] != ["user", "assistant"]:
            raise SFTDataError(record.where, "", "not_one_turn", "the Alpaca prompt holds one user and one assistant "
                               "turn, without system turn: use template=chat")
        instruction, input_ = messages[0]["content"], ""
    prompt = alpaca_prompt(instruction, input_)
    eos = _eos(tokenizer, record.where)
    bos = _prefix_tokens(tokenizer)
    # The whole text is encoded at once, as the model reads it; the prompt's own encoding must be
    # its start, or the response's first token straddles the boundary and no split is right.
    prompt_ids = tokenizer.encode(prompt, add_special_tokens=False)
    full = tokenizer.encode(prompt + messages[-1]["content"], add_special_tokens=False)
    if full[:len(prompt_ids)] != prompt_ids:
        raise SFTDataError(record.where, "output", "prefix_mismatch", "the prompt's tokens are not a prefix of the "
                           "tokens of prompt + response (the response's start merges with the prompt's end)")
    ids = bos + full + [eos]
    return ids, [False] * (len(bos) + len(prompt_ids)) + [True] * (len(full) - len(prompt_ids) + 1)


def _prefix_tokens(tokenizer: HFTokenizer) -> list[int]:
    """The tokens the tokenizer's post-processor puts before any text (its BOS, if it adds one).

    Probed rather than read from `bos_token`: the post-processor decides, and some name one BOS
    and add another (a Llama-2 pipeline under Gemma's special tokens)."""
    plain = tokenizer.encode("a", add_special_tokens=False)
    full = tokenizer.encode("a", add_special_tokens=True)
    for start in range(len(full) - len(plain) + 1):
        if full[start:start + len(plain)] == plain:
            return full[:start]
    return []


def _special_ids(tokenizer: HFTokenizer) -> frozenset[int]:
    return frozenset(i for i, t in tokenizer.tokenizer.get_added_tokens_decoder().items() if t.special)


def _tokenize_chat(messages: list[dict[str, str]], tokenizer: HFTokenizer, template: str | None, where: str,
                   last_turn_only: bool = False, variables: Mapping[str, Any] | None = None
                   ) -> tuple[list[int], list[bool], bool]:
    variables = variables or {}
    try:
        full = tokenizer.encode_chat(messages, template=template, **variables)
        spans = []
        for k, message in enumerate(messages):
            if message["role"] != "assistant" or (last_turn_only and k < len(messages) - 1):
                continue
            prompt = tokenizer.encode_chat(messages[:k], add_generation_prompt=True, template=template, **variables)
            # The last turn's conversation is the whole one (records end with an assistant turn).
            upto = full if k == len(messages) - 1 else tokenizer.encode_chat(messages[:k + 1], template=template,
                                                                             **variables)
            if upto[:len(prompt)] != prompt or full[:len(upto)] != upto:
                what = ("the generation prompt's" if upto[:len(prompt)] != prompt else "this turn's")
                raise SFTDataError(where, f"turn {k}", "prefix_mismatch",
                                   f"the chat template breaks the prefix property: {what} tokens are not a prefix of "
                                   f"those of the longer conversation, so the assistant turn cannot be located (a "
                                   f"template that renders past turns otherwise: train with turns=each or turns=last)")
            if len(upto) == len(prompt):
                raise SFTDataError(where, f"turn {k}", "empty_turn", "the chat template writes nothing for this "
                                   "assistant turn")
            spans.append((len(prompt), len(upto)))
    except ChatTemplateError as e:
        raise SFTDataError(where, "", "template", str(e)) from None
    special = _special_ids(tokenizer)
    ids: list[int] = []
    mask: list[bool] = []
    eos_added = False
    done = 0
    for start, stop in spans:
        ids += full[done:start]
        mask += [False] * (start - done)
        end = _end_of_turn(full, start, stop, special, tokenizer)
        if end is None:  # the template writes no token that ends the turn: EOS teaches the model to stop
            ids += [*full[start:stop], _eos(tokenizer, where)]
            mask += [True] * (stop - start + 1)
            eos_added = True
        else:
            ids += full[start:stop]
            mask += [True] * (end + 1 - start) + [False] * (stop - end - 1)
        done = stop
    ids += full[done:]
    mask += [False] * (len(full) - done)
    return ids, mask, eos_added


def _end_of_turn(ids: list[int], start: int, stop: int, special: frozenset[int], tokenizer: HFTokenizer) -> int | None:
    """Index of the last special token in ids[start:stop] that only whitespace follows, or None."""
    for j in range(stop - 1, start - 1, -1):
        if ids[j] in special:
            return j
        if tokenizer.decode([ids[j]]).strip():
            return None
    return None


def fit_length(example: SFTExample, max_length: int, overflow: str = "truncate") -> SFTExample | None:
    """`example` within `max_length` tokens: as it is, truncated (keeping its start), or None (dropped).

    A truncated example that keeps no trained token is dropped: it would only cost compute.
    """
    if overflow not in OVERFLOW:
        raise ValueError(f"overflow must be one of {OVERFLOW}, got {overflow!r}")
    if len(example.ids) <= max_length:
        return example
    if overflow == "drop" or not example.loss_mask[:max_length].any():
        return None
    return SFTExample(example.ids[:max_length].copy(), example.loss_mask[:max_length].copy(), example.where,
                      example.full_length, example.eos_added)


def load_sft_examples(cfg: SFTDataConfig, tokenizer: HFTokenizer, stats: SFTStats | None = None) -> list[SFTExample]:
    """Read, check, tokenize and fit to `cfg.max_length` the examples of `cfg.files`, counting in `stats`."""
    if not cfg.files:
        raise DataError("no SFT data files given: pass --data.files=[FILE.jsonl, ...]")
    if cfg.template == "chat" and not tokenizer.chat_templates and not cfg.chat_template:
        raise DataError("template=chat but the tokenizer has no chat template: use template=alpaca, or a tokenizer "
                        "directory with one (chat_template.jinja or tokenizer_config.json's chat_template)")
    stats = stats if stats is not None else SFTStats()
    examples = []
    for record in read_sft_records(cfg.files, format=cfg.format, strict=cfg.strict, stats=stats):
        try:
            made = [tokenize_record(part, tokenizer, template=cfg.template, chat_template=cfg.chat_template or None,
                                    system_prompt=cfg.system_prompt, train_on_prompt=cfg.train_on_prompt,
                                    last_turn_only=cfg.turns != "all", template_variables=cfg.chat_template_kwargs)
                    for part in (each_turn(record) if cfg.turns == "each" else [record])]
        except SFTDataError as e:  # a record is kept or skipped whole
            _skip(e, cfg.strict, stats)
            continue
        for example in made:
            fitted = fit_length(example, cfg.max_length, cfg.overflow)
            if fitted is None:
                stats.dropped["too_long" if cfg.overflow == "drop" else "nothing_trained_left"] += 1
                continue
            stats.truncated += fitted.truncated
            stats.eos_added += fitted.eos_added
            examples.append(fitted)
    stats.examples = len(examples)
    check_skipped(stats, cfg.max_skip_fraction)
    if not examples:
        files = ", ".join(cfg.files)
        if not stats.records:
            raise DataError(f"no SFT records in {files}: the data is empty")
        raise DataError(f"no SFT examples left in {files} from {stats.records} records: skipped {dict(stats.skipped)}, "
                        f"dropped {dict(stats.dropped)}; first problems: {stats.problems[:3]}")
    return examples


def check_skipped(stats: SFTStats, max_skip_fraction: float) -> None:
    """Raise DataError when more than `max_skip_fraction` of the records were bad: `prepare`'s rule and
    message (`ReadStats.check_fraction`), on SFT's counts."""
    bad = sum(stats.skipped.values())
    ReadStats(documents=stats.records - bad, errors=Counter(stats.skipped),
              examples=list(stats.problems)).check_fraction(max_skip_fraction)


def skip_summary(stats: SFTStats, n: int = 3) -> str:
    """One line on the bad records skipped (strict=false), "" when none: how many, by reason, and the first
    `n` with their file:line and what was wrong."""
    if not stats.skipped:
        return ""
    reasons = ", ".join(f"{reason} {count}" for reason, count in stats.skipped.most_common())
    return (f"bad records skipped: {sum(stats.skipped.values())} of {stats.records} ({reasons}); first: "
            + "; ".join(stats.problems[:n]))


# ---- the check ------------------------------------------------------------------------------------


@dataclass
class CheckReport:
    """What `check_examples` found; `ok` is False when training on these examples would be wrong."""

    examples: int
    tokens: int
    trained_tokens: int
    lengths: dict[str, float]
    """Tokens per example before truncation: min, median, p95, max (empty when there are no examples)."""
    max_length: int | None
    over_max_length: int
    """Examples longer than max_length before truncation (the dropped ones are in stats.dropped)."""
    truncated: int
    ends_with_stop: int
    """Examples whose last trained token is a special token (EOS or the template's end of turn)."""
    no_trained: list[str] = field(default_factory=list)
    """Where the examples with no trained token came from (the first MAX_LISTED), and how many in `n_no_trained`."""
    n_no_trained: int = 0
    no_stop: list[str] = field(default_factory=list)
    """Where untruncated examples that do not end with a trained special token came from (the first MAX_LISTED)."""
    n_no_stop: int = 0
    shown: list[tuple[str, list[tuple[str, bool]]]] = field(default_factory=list)
    """The first examples as (where, [(text, trained), ...]): their decoded text in runs of trained and untrained tokens."""
    stats: SFTStats | None = None

    @property
    def trained_fraction(self) -> float:
        return self.trained_tokens / self.tokens if self.tokens else 0.0

    @property
    def ok(self) -> bool:
        return self.examples > 0 and self.n_no_trained == 0 and self.n_no_stop == 0


def check_examples(examples: Sequence[SFTExample], tokenizer: HFTokenizer, *, max_length: int | None = None,
                   n_show: int = 3, stats: SFTStats | None = None) -> CheckReport:
    """Look at tokenized examples as the trainer will see them; see `CheckReport` and `format_report`.

    The check fails (`ok` False) on no examples, on an example with no trained token, and on an
    untruncated example whose last trained token is not a special token (the model would not
    learn to stop).
    """
    special = _special_ids(tokenizer)
    full = np.asarray([e.full_length for e in examples], dtype=np.int64)
    no_trained = [e.where for e in examples if not e.loss_mask.any()]
    stops = [bool(e.loss_mask.any()) and int(e.ids[np.flatnonzero(e.loss_mask)[-1]]) in special for e in examples]
    no_stop = [e.where for e, stop in zip(examples, stops, strict=True) if not stop and not e.truncated and e.loss_mask.any()]
    lengths = {}
    if len(full):
        lengths = {"min": float(full.min()), "median": float(np.median(full)), "p95": float(np.percentile(full, 95)),
                   "max": float(full.max())}
    return CheckReport(
        examples=len(examples),
        tokens=sum(len(e.ids) for e in examples),
        trained_tokens=sum(e.n_trained for e in examples),
        lengths=lengths,
        max_length=max_length,
        over_max_length=int((full > max_length).sum()) if max_length is not None else 0,
        truncated=sum(e.truncated for e in examples),
        ends_with_stop=sum(stops),
        no_trained=no_trained[:MAX_LISTED],
        n_no_trained=len(no_trained),
        no_stop=no_stop[:MAX_LISTED],
        n_no_stop=len(no_stop),
        shown=[(e.where, _runs(e, tokenizer)) for e in examples[:n_show]],
        stats=stats,
    )


def _runs(example: SFTExample, tokenizer: HFTokenizer) -> list[tuple[str, bool]]:
    """The example's text in runs of trained / untrained tokens (a character split across runs shows as U+FFFD)."""
    runs = []
    cuts = [0, *(np.flatnonzero(np.diff(example.loss_mask.astype(np.int8))) + 1).tolist(), len(example.ids)]
    for a, b in zip(cuts[:-1], cuts[1:]):
        if b > a:
            runs.append((tokenizer.decode(example.ids[a:b]), bool(example.loss_mask[a])))
    return runs


def format_report(report: CheckReport, color: bool | None = None) -> str:
    """The report as text: trained text in green (color, by default when stdout is a terminal) or in [[...]]."""
    if color is None:
        color = sys.stdout.isatty()
    open_, close = ("\x1b[32m", "\x1b[0m") if color else ("[[", "]]")
    lines = [f"SFT data check: {report.examples} examples, {report.tokens} tokens, {report.trained_tokens} trained "
             f"({report.trained_fraction:.1%})"]
    if report.lengths:
        lens = report.lengths
        line = (f"lengths (tokens, before truncation): min {lens['min']:.0f}, median {lens['median']:.0f}, "
                f"p95 {lens['p95']:.0f}, max {lens['max']:.0f}")
        if report.max_length is not None:
            line += f"; {report.over_max_length} over max_length={report.max_length} ({report.truncated} truncated)"
        lines.append(line)
    lines.append(f"ends with a trained EOS / end-of-turn token: {report.ends_with_stop} of {report.examples}"
                 f" ({report.truncated} truncated)")
    stats = report.stats
    if stats is not None:
        if stats.skipped:
            lines.append(skip_summary(stats))
        if stats.dropped:
            lines.append(f"dropped for length: {dict(stats.dropped)}")
        if stats.eos_added:
            lines.append(f"EOS inserted after assistant turns (the template ends them with no special token): "
                         f"{stats.eos_added} examples")
    for i, (where, runs) in enumerate(report.shown, 1):
        lines.append(f"--- example {i} ({where}); trained text {'in green' if color else 'in [[...]]'} ---")
        lines.append("".join(f"{open_}{text}{close}" if trained else text for text, trained in runs))
    if report.ok:
        lines.append("OK")
    else:
        if report.examples == 0:
            lines.append("FAIL: no examples")
        if report.n_no_trained:
            lines.append(f"FAIL: {report.n_no_trained} examples have no trained token: {', '.join(report.no_trained)}")
        if report.n_no_stop:
            lines.append(f"FAIL: {report.n_no_stop} untruncated examples do not end with a trained EOS / end-of-turn "
                         f"token, so the model would not learn to stop: {', '.join(report.no_stop)}")
    return "\n".join(lines)


class RowOrder:
    """Rows of packed examples in training order: epoch e shuffles the examples with (seed, e),
    packs them (best-fit-decreasing) and shuffles the rows, so row g is a function of (seed, g)."""

    def __init__(self, examples: list[SFTExample], seq_len: int, pack: bool, seed: int):
        self.docs = [e.ids for e in examples]
        self.masks = [e.loss_mask for e in examples]
        self.seq_len, self.pack, self.seed = seq_len, pack, seed
        self._epochs: list[list] = []
        self.per_epoch = len(self._epoch(0))

    def _epoch(self, e: int) -> list:
        while len(self._epochs) <= e:
            rng = np.random.default_rng([self.seed, len(self._epochs)])
            order = rng.permutation(len(self.docs))
            if self.pack:
                rows = plan_packing([len(self.docs[i]) for i in order], self.seq_len, overflow="truncate")
                rows = [[p._replace(doc=int(order[p.doc])) for p in row] for row in rows]
                rows = [rows[i] for i in rng.permutation(len(rows))]
            else:
                rows = [[Piece(int(i), 0, min(len(self.docs[i]), self.seq_len))] for i in order]
            self._epochs.append(rows)
        return self._epochs[e]

    def row(self, g: int) -> list:
        e, k = divmod(g, self.per_epoch) if self.per_epoch else (0, 0)
        rows = self._epoch(e)
        return rows[k % len(rows)]
