"""Preference pairs -> prompt, chosen and rejected token ids with loss masks, batches and the check.

A pair is a prompt and two responses to it, one preferred. Four record formats of pairs, and one of
unpaired examples, recognised per record by their keys (or forced by `PrefDataConfig.format`), read
from JSON arrays, JSON Lines (.json, .jsonl, .ndjson, optionally .gz) or Parquet (.parquet, one
record a row):
- hh-rlhf (Anthropic's Helpful-Harmless): `chosen` and `rejected`, each a whole transcript of
  "\\n\\nHuman: ..." / "\\n\\nAssistant: ..." turns. The prompt is their common start, up to and
  including the last "\\n\\nAssistant:" both share; the responses are what follows it. Two
  Assistant turns in a row (4 prompts of harmless-base's test split) become one turn joined by a
  blank line, since chat templates require turns to alternate. An empty reply ("Assistant:" with
  nothing after it) is a response the data prefers 4 times in that split: it is kept (the model
  learns to end the turn at once), unlike an empty response in the other formats.
- messages (UltraFeedback, TRL's conversational format): `prompt` (a string, or a list of
  {"role", "content"} messages; absent: the messages that `chosen` and `rejected` share before
  their last one) and `chosen` / `rejected` as message lists whose last, assistant, message is the
  response (the prompt's messages at their start are stripped) or as the response's string.
- LLaMA-Factory: `conversations` (ShareGPT {"from", "value"} turns), optional `system`, and
  `chosen` / `rejected` as one {"from": "gpt", "value"} turn each.
- plain: `prompt`, `chosen`, `rejected` strings.
- unpaired (TRL's "unpaired preference" type, what KTO trains on): `prompt`, `completion` and
  `label` (true: desirable, false: undesirable), prompt and completion as strings or, in TRL's
  conversational form, message lists (`prompt` absent: the completion's messages before its last,
  assistant, one). Each record is one example, an `UnpairedExample` (`tokenize_unpaired`,
  `fit_unpaired`, `collate_kto`, `check_unpaired`); the files hold pairs or unpaired examples, not both.
The prompt is held as messages (optional system turn, then user and assistant alternating,
ending with user) and, where the record has it as text, as that text; responses are the
assistant turn's content and, for hh-rlhf, also the text exactly as it follows the prompt.

Two prompt formats, each the same rendering as sft.py's (its functions are reused):
- "chat": the tokenizer's chat template. A side's ids are those of the conversation prompt +
  response, as sft.py tokenizes it; the response is its last assistant turn, trained up to and
  including the token that ends the turn (EOS inserted when the template writes none), and the
  prompt is everything before it, the same for both sides (checked).
- "plain": BOS (what the tokenizer's post-processor puts before text), the prompt text, the
  response text (encoded with the prompt, as the model reads it; the prompt's own ids must be its
  start) and EOS. This is what TRL's DPOTrainer does for non-conversational pairs, and for
  hh-rlhf it is the transcript the data was collected as.

Length: `fit_pair` fits the longer side within `max_length` by cutting the prompt's START (its
end, the turn being answered, matters most; BOS stays), down to `max_prompt_length` tokens, then
the responses' ends. What was cut is counted per pair and in `PrefStats`.

`collate_pairs` builds one batch of 2P rows for P pairs, the chosen rows first and then the
rejected ones (TRL's `concatenated_forward` order), right-padded, with next-token targets that
are IGNORE_INDEX except where a response token is predicted. `collate_pairs_shared` holds the same
2P sequences in P rows, one per pair: the prompt once, then each response behind it (the model's
`Segments` with a shared prefix), so the prompt is computed once. `check_pairs` + `format_pref_check`
are the check before training: a few pairs with the learnt tokens of both sides marked.

Bad input (a missing `rejected`, chosen identical to rejected, an empty response, a value of the
wrong type, a transcript with no Assistant turn, prompts the two sides do not share) raises
`PrefDataError` (a RecordError, like sft's SFTDataError) naming the file, the line (JSON Lines,
Parquet row) or index (JSON array) and the key; with `strict=False` the record is skipped and
counted, up to `max_skip_fraction`. Messages name keys, never the record's content.

It does not compute log-probs or losses (align/), or read LLaMA-Factory's Alpaca-style preference
rows (`instruction` + `chosen` strings).
"""

from __future__ import annotations

import dataclasses
import os
import re
import sys
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import closing, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from temper.data.chat import check_template_variables
from temper.data.packing import IGNORE_INDEX, pad_batch
from temper.data.sft import (
    _MISSING,
    MAX_LISTED,
    ROLES,
    SHAREGPT_ROLES,
    SUFFIXES,
    CheckReport,
    SFTDataError,
    SFTExample,
    SFTStats,
    _check_order,
    _eos,
    _kind,
    _prefix_tokens,
    _runs,
    _skip,
    _system,
    _text,
    _tokenize_chat,
    _turns,
    check_examples,
    check_skipped,
    skip_summary,
)
from temper.data.sources import DataError, RecordError, expand_inputs, json_records
from temper.data.tokenizer import HFTokenizer

FORMATS = ("auto", "hh-rlhf", "messages", "llamafactory", "plain", "unpaired")
TEMPLATES = ("chat", "plain")
SIDES = ("chosen", "rejected")
PARQUET_SUFFIXES = (".parquet", ".pq")
HUMAN, ASSISTANT = "\n\nHuman:", "\n\nAssistant:"
_HH_TURN = re.compile(r"\n\n(Human|Assistant):")
_HH_ROLES = {"Human": "user", "Assistant": "assistant"}
_PARQUET_BATCH_ROWS = 1024


@dataclass
class PrefDataConfig:
    """Where preference pairs come from and how they become tokens and loss masks."""

    files: list[str] = field(default_factory=list)
    """JSON arrays, JSON Lines (.json, .jsonl, .ndjson, optionally .gz) or Parquet files: paths, directories or globs."""
    format: Literal["auto", "hh-rlhf", "messages", "llamafactory", "plain", "unpaired"] = "auto"
    """Record format: auto (per record, by its keys), hh-rlhf (transcripts), messages (UltraFeedback), llamafactory,
    plain, unpaired (prompt, completion, label: KTO's examples)."""
    template: Literal["chat", "plain"] = "chat"
    """Prompt format: the tokenizer's chat template, or the prompt text as it is (BOS + prompt + response + EOS)."""
    chat_template: str = ""
    """Which of the tokenizer's chat templates to use ('': its default)."""
    chat_template_kwargs: dict = field(default_factory=dict)
    """Extra variables for the chat template, as apply_chat_template takes them: '{enable_thinking: false}' (Qwen3)."""
    system_prompt: str = ""
    """System turn put first in prompts that have none (template=chat; '': none added)."""
    max_length: int = 1024
    """Longest row (prompt + response) in tokens; longer pairs lose the prompt's start, then the responses' ends."""
    max_prompt_length: int = 0
    """Tokens of the prompt kept at least when cutting for max_length (0: half of max_length)."""
    strict: bool = True
    """Stop at the first bad record (naming file, line and key); false: skip bad records and count them."""
    max_skip_fraction: float = 0.01
    """With strict=false: stop when more than this fraction of the records are bad."""

    def __post_init__(self) -> None:
        _check_lengths(self.max_length, self.max_prompt_length or None)
        if not 0.0 <= self.max_skip_fraction <= 1.0:
            raise ValueError(f"max_skip_fraction must be in [0, 1], got {self.max_skip_fraction}")
        if self.template == "plain" and (self.system_prompt or self.chat_template or self.chat_template_kwargs):
            raise ValueError("system_prompt and chat_template(_kwargs) apply to template=chat; a plain prompt has "
                             "neither")
        check_template_variables(self.chat_template_kwargs)


class PrefDataError(RecordError):
    """A record that cannot become a preference pair: the message names file, line or index, and key."""


@dataclass
class PrefRecord:
    """One preference pair read from a file, checked but not tokenized."""

    prompt: list[dict[str, str]]
    """The prompt's turns: an optional system turn, then user and assistant alternating, ending with user."""
    chosen: str
    """The preferred response, as the content of an assistant turn."""
    rejected: str
    """The other response."""
    where: str
    """Where it was read: "file:line" (JSON Lines, Parquet row), or "file[index]" (JSON array, 0-based)."""
    prompt_text: str | None = None
    """The prompt as text, when the record has it so (plain, hh-rlhf, a string `prompt`); template=plain uses it."""
    chosen_text: str | None = None
    """The chosen response as it follows `prompt_text` in the record's text (hh-rlhf: with its leading space); None: `chosen`."""
    rejected_text: str | None = None
    """The rejected response as it follows `prompt_text`; None: `rejected`."""


@dataclass
class UnpairedRecord:
    """One unpaired example read from a file (KTO's data), checked but not tokenized."""

    prompt: list[dict[str, str]]
    """The prompt's turns, as `PrefRecord.prompt`."""
    completion: str
    """The response, as the content of an assistant turn."""
    label: bool
    """True: a desirable completion; False: an undesirable one."""
    where: str
    """Where it was read, as `PrefRecord.where`."""
    prompt_text: str | None = None
    """The prompt as text, when the record has it so (a string `prompt`); template=plain uses it."""


@dataclass
class PrefExample:
    """One tokenized pair: a row is the prompt followed by one response."""

    prompt: np.ndarray
    """Prompt ids, int32 (P,): template, turns and generation prompt up to the response."""
    chosen: np.ndarray
    """Chosen response ids, int32 (C,): the response, the token that ends it, any template text after that."""
    rejected: np.ndarray
    """Rejected response ids, int32 (R,)."""
    chosen_mask: np.ndarray
    """bool (C,): True where the token is learnt (the response and its end-of-turn token, not layout after it)."""
    rejected_mask: np.ndarray
    """bool (R,)."""
    where: str
    """The record it came from."""
    prompt_cut: int = 0
    """Tokens cut from the prompt's start by `fit_pair`."""
    chosen_cut: int = 0
    """Tokens cut from the chosen response's end."""
    rejected_cut: int = 0
    """Tokens cut from the rejected response's end."""
    eos_added: bool = False
    """EOS was inserted after assistant turns because the chat template ends them with no special token."""

    @property
    def truncated(self) -> bool:
        return bool(self.prompt_cut or self.chosen_cut or self.rejected_cut)

    def row(self, side: str) -> tuple[np.ndarray, np.ndarray]:
        """(ids, loss_mask) of the row prompt + `side` ("chosen" or "rejected"); the mask is False on the prompt."""
        ids, mask = (self.chosen, self.chosen_mask) if side == "chosen" else (self.rejected, self.rejected_mask)
        return _row(self.prompt, ids, mask)


@dataclass
class UnpairedExample:
    """One tokenized unpaired example (KTO): a prompt and one completion labelled desirable or not."""

    prompt: np.ndarray
    """Prompt ids, int32, as `PrefExample.prompt`."""
    completion: np.ndarray
    """Completion ids, int32, as `PrefExample.chosen`."""
    mask: np.ndarray
    """bool: True where the completion's token is learnt."""
    label: bool
    """True: desirable."""
    where: str
    """The record it came from."""
    prompt_cut: int = 0
    """Tokens cut from the prompt's start by `fit_unpaired`."""
    completion_cut: int = 0
    """Tokens cut from the completion's end."""
    eos_added: bool = False
    """EOS was inserted after assistant turns because the chat template ends them with no special token."""

    @property
    def truncated(self) -> bool:
        return bool(self.prompt_cut or self.completion_cut)

    def row(self) -> tuple[np.ndarray, np.ndarray]:
        """(ids, loss_mask) of the row prompt + completion; the mask is False on the prompt."""
        return _row(self.prompt, self.completion, self.mask)


def _row(prompt: np.ndarray, response: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(ids, loss mask) of prompt + response, learnt where the response's mask is."""
    return (np.concatenate([prompt, response]).astype(np.int32),
            np.concatenate([np.zeros(len(prompt), dtype=bool), mask]))


@dataclass
class PrefStats(SFTStats):
    """What reading, tokenizing and fitting saw (`examples` counts pairs, or unpaired examples; `truncated`
    those cut to max_length)."""

    prompt_tokens_cut: int = 0
    """Tokens cut from the start of prompts, over all pairs."""
    response_tokens_cut: int = 0
    """Tokens cut from the end of responses, chosen and rejected together, over all pairs."""


def _check_lengths(max_length: int, max_prompt_length: int | None) -> None:
    if max_length < 2:
        raise ValueError(f"max_length={max_length} must be at least 2 (a prompt token and a response token)")
    if max_prompt_length is not None and not 1 <= max_prompt_length < max_length:
        raise ValueError(f"max_prompt_length={max_prompt_length} must be at least 1 and less than "
                         f"max_length={max_length}, leaving room for the responses")


@contextmanager
def _as_pref_error(side: str = "") -> Iterator[None]:
    """sft.py's helpers raise SFTDataError; a pair's errors are PrefDataErrors, their key under `side`."""
    try:
        yield
    except SFTDataError as e:
        key = f"{side}, {e.key}" if side and e.key else side or e.key
        raise PrefDataError(e.where, key, e.reason, e.message) from None


# ---- reading records ---------------------------------------------------------------------------


def read_pref_records(files: str | Sequence[str], *, format: str = "auto", strict: bool = True,
                      stats: PrefStats | None = None) -> list[PrefRecord] | list[UnpairedRecord]:
    """The preference pairs (or unpaired examples) of `files` (paths, directories, globs), in file order, checked.

    A bad record raises `PrefDataError`, or with `strict=False` is skipped and counted in `stats`.
    A file that cannot be read as a whole (a JSON array that does not parse, corrupt gzip or
    Parquet), or an unpaired example among pairs (or a pair among unpaired examples), always
    raises DataError: no recipe trains on both.
    """
    if format not in FORMATS:
        raise ValueError(f"format must be one of {FORMATS}, got {format!r}")
    stats = stats if stats is not None else PrefStats()
    records = []
    first: tuple[bool, str] | None = None  # (unpaired, where) of the first object, by its keys
    for path in expand_inputs(files):
        for where, obj in _file_records(path):
            stats.records += 1
            if format == "auto" and isinstance(obj, dict):  # by keys, bad or not: as `is_unpaired_data` looks
                first = first or (_is_unpaired(obj), where)
                if _is_unpaired(obj) != first[0]:
                    raise DataError(f"{where}: {_data_kind(not first[0])} after {_data_kind(first[0])} (the first "
                                    f"at {first[1]}): the data must be all pairs or all unpaired examples")
            try:
                if isinstance(obj, RecordError):  # an unreadable line
                    raise PrefDataError(obj.where, obj.key, obj.reason, obj.message)
                records.append(parse_pref_record(obj, where, format))
            except PrefDataError as e:
                _skip(e, strict, stats)
    return records


def _data_kind(unpaired: bool) -> str:
    return "an unpaired example (prompt, completion, label)" if unpaired else "a preference pair (chosen, rejected)"


def _file_records(path: Path) -> Iterator[tuple[str, Any]]:
    name = path.name.lower()
    if name.endswith(PARQUET_SUFFIXES):
        return parquet_records(path)
    if name.removesuffix(".gz").endswith(SUFFIXES):
        return json_records(path)
    raise DataError(f"{path}: preference data must be JSON, JSON Lines ({', '.join(SUFFIXES)}, optionally .gz) "
                    f"or Parquet ({', '.join(PARQUET_SUFFIXES)})")


def parquet_records(path: Path) -> Iterator[tuple[str, Any]]:
    """("file:row", record as a dict) of each row of a Parquet file, rows 1-based; nested columns
    (lists of messages) become lists of dicts. A file pyarrow cannot read raises DataError."""
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        raise DataError(f"{path}: reading Parquet needs pyarrow: pip install 'temper[data]'") from None
    row = 0
    try:
        with pq.ParquetFile(path) as f:
            for batch in f.iter_batches(batch_size=_PARQUET_BATCH_ROWS, use_threads=False):
                for obj in batch.to_pylist():
                    row += 1
                    yield f"{path}:{row}", obj
    except (FileNotFoundError, PermissionError, IsADirectoryError, MemoryError):
        raise  # the machine's problem, not the file's
    except (pa.ArrowException, OSError) as e:  # pyarrow raises OSError for damaged pages
        after = f" after row {row}" if row else ""
        raise DataError(f"{path}: corrupt Parquet file{after} ({e})") from None


def parse_pref_record(obj: Any, where: str, format: str = "auto") -> PrefRecord | UnpairedRecord:
    """One JSON value (or Parquet row) -> a checked pair (or unpaired example); raises PrefDataError
    naming `where` and the key."""
    if not isinstance(obj, dict):
        raise PrefDataError(where, "", "not_object", f"expected a JSON object, got {_kind(obj)}")
    if format == "auto":
        format = _detect(obj, where)
    parse = {"hh-rlhf": _hh_rlhf, "messages": _messages, "llamafactory": _llamafactory, "plain": _plain,
             "unpaired": _unpaired}.get(format)
    if parse is None:
        raise ValueError(f"format must be one of {FORMATS}, got {format!r}")
    with _as_pref_error():
        record = parse(obj, where)
    if isinstance(record, UnpairedRecord):
        return record
    if record.chosen.strip() == record.rejected.strip():
        raise PrefDataError(where, "rejected", "identical", "identical to chosen: the pair prefers nothing")
    return record


def is_unpaired_data(cfg: PrefDataConfig) -> bool:
    """Whether `cfg.files` hold unpaired examples (KTO's data) rather than pairs, by the format or the
    first record that is an object: a cheap look before anything loads (the full read refuses a mix)."""
    if cfg.format != "auto":
        return cfg.format == "unpaired"
    for path in expand_inputs(cfg.files) if cfg.files else ():
        with closing(_file_records(path)) as records:
            for _, obj in records:
                if isinstance(obj, dict):
                    return _is_unpaired(obj)
    return False


def _is_unpaired(obj: Mapping[str, Any]) -> bool:
    return "completion" in obj or ("label" in obj and "chosen" not in obj and "rejected" not in obj)


def _detect(obj: Mapping[str, Any], where: str) -> str:
    if _is_unpaired(obj):
        return "unpaired"
    if "conversations" in obj:
        return "llamafactory"
    response = obj.get("chosen", obj.get("rejected"))
    if "prompt" in obj:
        return "messages" if isinstance(obj["prompt"], list) or isinstance(response, list) else "plain"
    if "chosen" in obj or "rejected" in obj:
        return "messages" if isinstance(response, list) else "hh-rlhf"
    keys = ", ".join(k[:40] for k in sorted(obj)[:10])
    raise PrefDataError(where, "", "unknown_format", "cannot tell the format: expected 'chosen' and 'rejected' "
                        "(hh-rlhf transcripts or message lists), with 'prompt' (messages or plain strings) or "
                        "'conversations' (LLaMA-Factory), or unpaired 'prompt', 'completion' and 'label' (KTO); "
                        f"keys: {keys}")


def _hh_rlhf(obj: Mapping[str, Any], where: str) -> PrefRecord:
    chosen = _text(obj.get("chosen", _MISSING), where, "chosen")
    rejected = _text(obj.get("rejected", _MISSING), where, "rejected")
    for side, text in zip(SIDES, (chosen, rejected)):
        if ASSISTANT not in text:
            raise PrefDataError(where, side, "no_assistant_turn", "a transcript with no '\\n\\nAssistant:' turn")
    shared = len(os.path.commonprefix([chosen, rejected]))
    cut = chosen.rfind(ASSISTANT, 0, shared)
    if cut < 0:
        raise PrefDataError(where, "rejected", "no_shared_prompt", "differs from chosen before their first "
                            "'\\n\\nAssistant:' turn: the two transcripts share no prompt")
    cut += len(ASSISTANT)
    responses = chosen[cut:], rejected[cut:]
    for side, text in zip(SIDES, responses):
        if HUMAN in text:
            raise PrefDataError(where, side, "not_one_response", "holds a '\\n\\nHuman:' turn after the last "
                                "'\\n\\nAssistant:' the transcripts share: they must differ in their last reply only")
    prompt = _hh_turns(chosen[:cut - len(ASSISTANT)], where)
    return PrefRecord(prompt, responses[0].strip(), responses[1].strip(), where, prompt_text=chosen[:cut],
                      chosen_text=responses[0], rejected_text=responses[1])


def _hh_turns(transcript: str, where: str) -> list[dict[str, str]]:
    """The turns of a transcript before its response, two of the same speaker in a row joined by a blank line."""
    parts = _HH_TURN.split("\n\n" + transcript.lstrip())  # tolerate a first "Human:" without the blank line
    if parts[0].strip() or len(parts) == 1:
        raise PrefDataError(where, "chosen", "bad_transcript", "expected a transcript starting with '\\n\\nHuman:'")
    turns: list[dict[str, str]] = []
    for speaker, text in zip(parts[1::2], parts[2::2]):
        role, content = _HH_ROLES[speaker], text.strip()
        if turns and turns[-1]["role"] == role:
            turns[-1]["content"] += "\n\n" + content
        else:
            turns.append({"role": role, "content": content})
    if turns[0]["role"] != "user":
        raise PrefDataError(where, "chosen", "role_order", "the transcript must start with a '\\n\\nHuman:' turn")
    if turns[-1]["role"] != "user":
        raise PrefDataError(where, "chosen", "role_order", "the response follows an Assistant turn: expected a "
                            "Human turn before the last '\\n\\nAssistant:'")
    return turns


def _messages(obj: Mapping[str, Any], where: str) -> PrefRecord:
    value = obj.get("prompt", _MISSING)
    prompt_text = None
    if value is _MISSING:
        prompt = None  # the messages both sides share before their response
    elif isinstance(value, str):
        prompt_text = _text(value, where, "prompt")
        prompt = [{"role": "user", "content": prompt_text}]
    else:
        prompt = _turns(obj, where, "prompt", "role", "content", {r: r for r in ROLES})
    contexts, responses = [], []
    for side in SIDES:
        context, response = _side(obj, where, side, prompt)
        contexts.append(context)
        responses.append(response)
    if prompt is None:
        if contexts[0] != contexts[1]:
            raise PrefDataError(where, "rejected", "prompt_mismatch", "its messages before the response differ from "
                                "chosen's: the two sides must share their prompt")
        prompt = contexts[0]
        if not prompt:
            raise PrefDataError(where, "chosen", "no_prompt", "no prompt: give 'prompt', or the user turn before the "
                                "response in chosen and rejected")
    _check_prompt(prompt, where, "prompt[{}].role" if isinstance(value, list) else "chosen[{}].role")
    return PrefRecord(prompt, responses[0], responses[1], where, prompt_text=prompt_text)


def _side(obj: Mapping[str, Any], where: str, side: str,
          prompt: list[dict[str, str]] | None) -> tuple[list[dict[str, str]], str]:
    """(messages before the response, the response) of one side of a messages record."""
    value = obj.get(side, _MISSING)
    if value is _MISSING:
        raise PrefDataError(where, side, "missing_field", "missing")
    if isinstance(value, str):
        if prompt is None:
            raise PrefDataError(where, "prompt", "missing_field", f"missing, and {side} is a string, not a conversation")
        return [], _text(value, where, side)
    messages = _turns(obj, where, side, "role", "content", {r: r for r in ROLES})
    if not messages:
        raise PrefDataError(where, side, "empty_conversation", "no messages")
    last = len(messages) - 1
    if messages[last]["role"] != "assistant":
        raise PrefDataError(where, f"{side}[{last}].role", "role_order", "the last message must be the assistant's "
                            "response")
    context = messages[:last]
    if prompt is not None:
        if context[:len(prompt)] == prompt:
            context = context[len(prompt):]
        if context:
            raise PrefDataError(where, side, "prompt_mismatch", f"holds {len(context)} messages before its response "
                                f"that are not the prompt's: the two sides must share the prompt")
    return context, messages[last]["content"]


def _llamafactory(obj: Mapping[str, Any], where: str) -> PrefRecord:
    system = _system(obj, where)
    prompt = system + _turns(obj, where, "conversations", "from", "value", SHAREGPT_ROLES)
    _check_prompt(prompt, where, "conversations[{}].from", added=len(system))
    responses = []
    for side in SIDES:
        turn = obj.get(side, _MISSING)
        if turn is _MISSING:
            raise PrefDataError(where, side, "missing_field", "missing")
        if not isinstance(turn, dict):
            raise PrefDataError(where, side, "not_object", f"expected an object {{'from': 'gpt', 'value': ...}}, "
                                f"got {_kind(turn)}")
        speaker = turn.get("from", "gpt")
        if not isinstance(speaker, str) or SHAREGPT_ROLES.get(speaker) != "assistant":
            raise PrefDataError(where, f"{side}.from", "role_order", "the response must be the assistant's ('gpt')")
        responses.append(_text(turn.get("value", _MISSING), where, f"{side}.value"))
    return PrefRecord(prompt, responses[0], responses[1], where)


def _plain(obj: Mapping[str, Any], where: str) -> PrefRecord:
    prompt = _text(obj.get("prompt", _MISSING), where, "prompt")
    chosen = _text(obj.get("chosen", _MISSING), where, "chosen")
    rejected = _text(obj.get("rejected", _MISSING), where, "rejected")
    return PrefRecord([{"role": "user", "content": prompt}], chosen, rejected, where, prompt_text=prompt)


def _unpaired(obj: Mapping[str, Any], where: str) -> UnpairedRecord:
    """TRL's unpaired preference record: `prompt` and `completion` as strings or message lists (see
    `_side`: absent, the prompt is the completion's messages before its response), and a boolean `label`."""
    value = obj.get("prompt", _MISSING)
    prompt_text = None
    if value is _MISSING:
        prompt = None
    elif isinstance(value, str):
        prompt_text = _text(value, where, "prompt")
        prompt = [{"role": "user", "content": prompt_text}]
    else:
        prompt = _turns(obj, where, "prompt", "role", "content", {r: r for r in ROLES})
    context, completion = _side(obj, where, "completion", prompt)
    if prompt is None:
        prompt = context
        if not prompt:
            raise PrefDataError(where, "completion", "no_prompt", "no prompt: give 'prompt', or the user turn "
                                "before the response in completion")
    _check_prompt(prompt, where, "prompt[{}].role" if isinstance(value, list) else "completion[{}].role")
    label = obj.get("label", _MISSING)
    if label is _MISSING:
        raise PrefDataError(where, "label", "missing_field", "missing: true for a desirable completion, false for "
                            "an undesirable one")
    if not isinstance(label, bool):
        raise PrefDataError(where, "label", "not_bool", f"expected true or false, got {_kind(label)}")
    return UnpairedRecord(prompt, completion, label, where, prompt_text=prompt_text)


def _check_prompt(prompt: list[dict[str, str]], where: str, key: str, added: int = 0) -> None:
    """sft.py's turn order with the response after the prompt: optional system turn, then user and
    assistant alternating from user; so the prompt ends with a user turn. An error at the response's
    place (one past the prompt) is reported on the prompt's last turn."""
    if len(prompt) == added:
        raise PrefDataError(where, key.split("[")[0], "no_prompt", "no turns: the responses answer nothing")
    try:
        _check_order([*prompt, {"role": "assistant", "content": ""}], where, key, added=added)
    except SFTDataError as e:
        if e.key != key.format(len(prompt) - added):
            raise
        raise PrefDataError(where, key.format(max(len(prompt) - 1 - added, 0)), "role_order",
                            "the prompt must end with a user turn (the responses answer it)") from None


# ---- tokenizing ---------------------------------------------------------------------------------


def tokenize_pair(
    record: PrefRecord,
    tokenizer: HFTokenizer,
    *,
    template: str = "chat",
    chat_template: str | None = None,
    system_prompt: str = "",
    template_variables: Mapping[str, Any] | None = None,
) -> PrefExample:
    """One pair -> prompt ids and both responses' ids and loss masks (see the module docstring); no length limit.
    `template_variables`: extra names the chat template reads (`enable_thinking`, ...).

    Raises PrefDataError naming the record and the side when the chat template refuses the
    conversation or breaks the prefix property, a plain prompt is asked of a conversation, or
    the two responses tokenize to the same ids.
    """
    if template == "plain" and (system_prompt or chat_template):
        raise ValueError("system_prompt and chat_template apply to template=chat; a plain prompt has neither")
    if template == "chat":
        prompt = record.prompt
        if system_prompt and prompt[0]["role"] != "system":
            prompt = [{"role": "system", "content": system_prompt}, *prompt]
        sides = [_chat_side(prompt, response, tokenizer, chat_template, record.where, side, template_variables)
                 for side, response in zip(SIDES, (record.chosen, record.rejected))]
        if sides[0][0] != sides[1][0]:
            raise PrefDataError(record.where, "rejected", "prefix_mismatch", "the chat template renders the prompt "
                                "differently before the two responses")
        prompt_ids = sides[0][0]
        eos_added = sides[0][3] or sides[1][3]
    elif template == "plain":
        prompt_ids, sides = _plain_sides(record, tokenizer)
        eos_added = False
    else:
        raise ValueError(f"template must be one of {TEMPLATES}, got {template!r}")
    (_, chosen, chosen_mask, *_), (_, rejected, rejected_mask, *_) = sides
    if chosen == rejected:
        raise PrefDataError(record.where, "rejected", "identical", "tokenizes to the same ids as chosen")
    ids = lambda x: np.asarray(x, dtype=np.int32)
    masks = lambda x: np.asarray(x, dtype=bool)
    return PrefExample(ids(prompt_ids), ids(chosen), ids(rejected), masks(chosen_mask), masks(rejected_mask),
                       record.where, eos_added=eos_added)


def _chat_side(prompt: list[dict[str, str]], response: str, tokenizer: HFTokenizer, template: str | None,
               where: str, side: str, variables: Mapping[str, Any] | None = None
               ) -> tuple[list[int], list[int], list[bool], bool]:
    """(prompt ids, response ids, response mask, EOS added) of prompt + response, tokenized as sft.py's turns=last
    does: the response is the final assistant turn, the prompt everything before it, earlier assistant turns as the
    template renders them in a conversation's history (Qwen3's without their <think> blocks)."""
    with _as_pref_error(side):
        ids, mask, eos_added = _tokenize_chat([*prompt, {"role": "assistant", "content": response}], tokenizer,
                                              template, where, last_turn_only=True, variables=variables)
    start = mask.index(True)
    return ids[:start], ids[start:], mask[start:], eos_added


def _plain_sides(record: PrefRecord, tokenizer: HFTokenizer) -> tuple[list[int], list[tuple]]:
    texts = (record.chosen if record.chosen_text is None else record.chosen_text,
             record.rejected if record.rejected_text is None else record.rejected_text)
    return _plain_rows(record.prompt, record.prompt_text, list(zip(SIDES, texts)), tokenizer, record.where)


def _plain_rows(prompt: list[dict[str, str]], text: str | None, responses: list[tuple[str, str]],
                tokenizer: HFTokenizer, where: str) -> tuple[list[int], list[tuple]]:
    """(BOS + prompt ids, [(None, response ids + EOS, all-learnt mask)] per (key, response)) of template=plain."""
    if text is None:
        if [m["role"] for m in prompt] != ["user"]:
            raise PrefDataError(where, "prompt", "not_text", f"template=plain needs a prompt text, and this "
                                f"prompt is a conversation of {len(prompt)} turns: use template=chat")
        text = prompt[0]["content"]
    with _as_pref_error():
        eos = _eos(tokenizer, where)
    prompt_ids = tokenizer.encode(text, add_special_tokens=False)
    sides = []
    for side, response in responses:
        # Encoded with the prompt, as the model reads it: the prompt's own ids must be its start.
        full = tokenizer.encode(text + response, add_special_tokens=False)
        if full[:len(prompt_ids)] != prompt_ids:
            raise PrefDataError(where, side, "prefix_mismatch", "the prompt's tokens are not a prefix of the "
                                "tokens of prompt + response (the response's start merges with the prompt's end)")
        ids = [*full[len(prompt_ids):], eos]
        sides.append((None, ids, [True] * len(ids)))
    return _prefix_tokens(tokenizer) + prompt_ids, sides


def tokenize_unpaired(record: UnpairedRecord, tokenizer: HFTokenizer, *, template: str = "chat",
                      chat_template: str | None = None, system_prompt: str = "",
                      template_variables: Mapping[str, Any] | None = None) -> UnpairedExample:
    """One unpaired example -> prompt ids and the completion's ids and loss mask, rendered as
    `tokenize_pair` renders each side of a pair; no length limit. Raises PrefDataError as it does."""
    if template == "plain" and (system_prompt or chat_template):
        raise ValueError("system_prompt and chat_template apply to template=chat; a plain prompt has neither")
    if template == "chat":
        prompt = record.prompt
        if system_prompt and prompt[0]["role"] != "system":
            prompt = [{"role": "system", "content": system_prompt}, *prompt]
        prompt_ids, ids, mask, eos_added = _chat_side(prompt, record.completion, tokenizer, chat_template,
                                                      record.where, "completion", template_variables)
    elif template == "plain":
        prompt_ids, [(_, ids, mask)] = _plain_rows(record.prompt, record.prompt_text, [("completion", record.completion)],
                                                   tokenizer, record.where)
        eos_added = False
    else:
        raise ValueError(f"template must be one of {TEMPLATES}, got {template!r}")
    return UnpairedExample(np.asarray(prompt_ids, dtype=np.int32), np.asarray(ids, dtype=np.int32),
                           np.asarray(mask, dtype=bool), record.label, record.where, eos_added=eos_added)


def fit_pair(example: PrefExample, max_length: int, max_prompt_length: int | None = None, *,
             bos_id: int | None = None) -> PrefExample:
    """`example` with both rows (prompt + response) within `max_length` tokens, and what was cut.

    The prompt loses its start first (its end is the turn being answered), down to
    `max_prompt_length` tokens (default half of max_length); then the responses lose their ends.
    When the prompt starts with `bos_id`, that token stays: the model has always seen it first.
    A response keeps at least its first token, which is learnt.
    """
    fitted = _fit_prompt(example.prompt, max(len(example.chosen), len(example.rejected)), max_length,
                         max_prompt_length, bos_id)
    if fitted is None:
        return example
    prompt, room = fitted
    return PrefExample(
        prompt, example.chosen[:room].copy(), example.rejected[:room].copy(), example.chosen_mask[:room].copy(),
        example.rejected_mask[:room].copy(), example.where,
        prompt_cut=example.prompt_cut + len(example.prompt) - len(prompt),
        chosen_cut=example.chosen_cut + max(len(example.chosen) - room, 0),
        rejected_cut=example.rejected_cut + max(len(example.rejected) - room, 0),
        eos_added=example.eos_added,
    )


def fit_unpaired(example: UnpairedExample, max_length: int, max_prompt_length: int | None = None, *,
                 bos_id: int | None = None) -> UnpairedExample:
    """`example` with its row within `max_length` tokens, cut as `fit_pair` cuts a pair's, and what was cut."""
    fitted = _fit_prompt(example.prompt, len(example.completion), max_length, max_prompt_length, bos_id)
    if fitted is None:
        return example
    prompt, room = fitted
    return dataclasses.replace(example, prompt=prompt, completion=example.completion[:room].copy(),
                               mask=example.mask[:room].copy(),
                               prompt_cut=example.prompt_cut + len(example.prompt) - len(prompt),
                               completion_cut=example.completion_cut + max(len(example.completion) - room, 0))


def _fit_prompt(prompt: np.ndarray, longest: int, max_length: int, max_prompt_length: int | None,
                bos_id: int | None) -> tuple[np.ndarray, int] | None:
    """(the prompt cut at its start, room left for a response) so that prompt + the `longest` response
    fit `max_length` (see `fit_pair`); None when they already do."""
    max_prompt_length = max_length // 2 if max_prompt_length is None else max_prompt_length
    _check_lengths(max_length, max_prompt_length)
    n_prompt = len(prompt)
    over = n_prompt + longest - max_length
    if over <= 0:
        return None
    keep = max(n_prompt - over, min(n_prompt, max_prompt_length))
    head = 1 if bos_id is not None and n_prompt and keep and prompt[0] == bos_id else 0
    return np.concatenate([prompt[:head], prompt[n_prompt - keep + head:]]), max_length - keep


def load_pref_examples(cfg: PrefDataConfig, tokenizer: HFTokenizer,
                       stats: PrefStats | None = None) -> list[PrefExample] | list[UnpairedExample]:
    """Read, check, tokenize and fit to `cfg.max_length` the pairs (or unpaired examples) of `cfg.files`,
    counting in `stats`."""
    if not cfg.files:
        raise DataError("no preference data files given: pass --data.files=[FILE.jsonl, ...]")
    if cfg.template == "chat" and not tokenizer.chat_templates and not cfg.chat_template:
        raise DataError("template=chat but the tokenizer has no chat template: use template=plain, or a tokenizer "
                        "directory with one (chat_template.jinja or tokenizer_config.json's chat_template)")
    stats = stats if stats is not None else PrefStats()
    examples = []
    for record in read_pref_records(cfg.files, format=cfg.format, strict=cfg.strict, stats=stats):
        unpaired = isinstance(record, UnpairedRecord)
        tokenize, fit = (tokenize_unpaired, fit_unpaired) if unpaired else (tokenize_pair, fit_pair)
        try:
            example = tokenize(record, tokenizer, template=cfg.template, chat_template=cfg.chat_template or None,
                               system_prompt=cfg.system_prompt, template_variables=cfg.chat_template_kwargs)
        except PrefDataError as e:
            _skip(e, cfg.strict, stats)
            continue
        fitted = fit(example, cfg.max_length, cfg.max_prompt_length or None, bos_id=tokenizer.bos_id)
        stats.truncated += fitted.truncated
        stats.prompt_tokens_cut += fitted.prompt_cut
        stats.response_tokens_cut += (fitted.completion_cut if unpaired else fitted.chosen_cut + fitted.rejected_cut)
        stats.eos_added += fitted.eos_added
        examples.append(fitted)
    stats.examples = len(examples)
    check_skipped(stats, cfg.max_skip_fraction)
    if not examples:
        files = ", ".join(cfg.files)
        if not stats.records:
            raise DataError(f"no preference records in {files}: the data is empty")
        raise DataError(f"no preference pairs or examples left in {files} from {stats.records} records: skipped "
                        f"{dict(stats.skipped)}; first problems: {stats.problems[:3]}")
    return examples


# ---- batches ------------------------------------------------------------------------------------


@dataclass
class PrefBatch:
    """2P rows for P pairs: rows 0..P-1 are prompt + chosen, rows P..2P-1 prompt + rejected, in pair order."""

    inputs: torch.Tensor
    """(2P, T) int64 token ids, right-padded with pad_id."""
    targets: torch.Tensor
    """(2P, T) int64: the next token where it is a learnt response token, IGNORE_INDEX elsewhere
    (predicting the prompt, at padding, at a row's last token)."""
    n_pairs: int
    response_tokens: torch.Tensor
    """(2P,) int64: learnt targets per row (the response tokens predicted, end-of-turn token included)."""
    lengths: torch.Tensor
    """(2P,) int64: real (unpadded) tokens per row."""
    positions: torch.Tensor | None = None
    """Shared-prompt batches only (`collate_pairs_shared`): (R, T) int64 position of each token in its
    own prompt + response sequence (a response's positions continue its prompt's)."""
    segment_ids: torch.Tensor | None = None
    """Shared-prompt batches only: (R, T) int64 ids for the model's `Segments(ids, shared_prefix=True)`:
    0 the prompt, 1, 2, ... each response branch, -1 padding."""
    seq: torch.Tensor | None = None
    """Shared-prompt batches only: (R, T) int64, the sequence (0 .. 2P-1, this class's row order) whose
    target each position holds, -1 where none; `response_tokens` and `lengths` are then per sequence."""

    def to(self, device: torch.device | str) -> PrefBatch:
        move = lambda t: None if t is None else t.to(device)  # noqa: E731
        return PrefBatch(self.inputs.to(device), self.targets.to(device), self.n_pairs,
                         self.response_tokens.to(device), self.lengths.to(device), move(self.positions),
                         move(self.segment_ids), move(self.seq))


def collate_pairs(examples: Sequence[PrefExample], *, pad_id: int = 0, pad_to_multiple_of: int = 1) -> PrefBatch:
    """P pairs -> one batch of 2P rows, chosen rows first (TRL's order), padded to the longest row
    rounded up to `pad_to_multiple_of`; targets by packing.py's `pad_batch` from the loss masks."""
    if not examples:
        raise ValueError("collate_pairs needs at least one pair")
    rows = [e.row(side) for side in SIDES for e in examples]
    return _collate(rows, len(examples), pad_id, pad_to_multiple_of)


def collate_unpaired(examples: Sequence[PrefExample], *, pad_id: int = 0, pad_to_multiple_of: int = 1) -> PrefBatch:
    """P pairs as 2P unpaired examples for KTO (rows 0..P-1 desirable, P..2P-1 undesirable, as
    `collate_pairs`), then 2P KL rows: row k's prompt with row k-1's response (cyclically), TRL's
    mismatched pairs, whose log-ratios estimate KTO's reference point. 4P rows in all."""
    if not examples:
        raise ValueError("collate_unpaired needs at least one pair")
    parts = [(e.prompt, e.chosen, e.chosen_mask) for e in examples] + [
        (e.prompt, e.rejected, e.rejected_mask) for e in examples]
    return _collate(_with_kl_rows(parts), len(examples), pad_id, pad_to_multiple_of)


def collate_kto(examples: Sequence[UnpairedExample], *, pad_id: int = 0,
                pad_to_multiple_of: int = 1) -> tuple[PrefBatch, torch.Tensor]:
    """n unpaired examples -> (a batch of their n rows then n KL rows, as `collate_unpaired`'s; their
    labels (n,) bool). The batch's `n_pairs` is n: KTO's unit is the example."""
    if not examples:
        raise ValueError("collate_kto needs at least one example")
    rows = _with_kl_rows([(e.prompt, e.completion, e.mask) for e in examples])
    return (_collate(rows, len(examples), pad_id, pad_to_multiple_of),
            torch.tensor([e.label for e in examples], dtype=torch.bool))


def _with_kl_rows(parts: list[tuple[np.ndarray, np.ndarray, np.ndarray]]) -> list[tuple[np.ndarray, np.ndarray]]:
    """The rows of (prompt, response, mask) examples, then their KL rows: row k's prompt with row k-1's
    response (cyclically), TRL's mismatched pairs whose log-ratios estimate KTO's reference point."""
    mismatched = [(parts[k][0], *parts[k - 1][1:]) for k in range(len(parts))]
    return [_row(p, r, m) for p, r, m in parts + mismatched]


def collate_pairs_shared(examples: Sequence[PrefExample], *, pad_id: int = 0, pad_to_multiple_of: int = 1) -> PrefBatch:
    """P pairs -> P rows, one per pair: its prompt once, then the chosen and the rejected response, each
    seeing only the prompt and itself (`segment_ids` for `Segments(shared_prefix=True)`, positions
    restarting where the prompt ends). The prompt, most of a pair's tokens, is computed once instead
    of twice, and no row is padded to the longest other pair's row + response.

    Sequences keep `collate_pairs`' order (2P: chosen 0..P-1, then rejected), so the same per-sequence
    log-probs, losses and gradients come out (float round-off aside). A response's first target is
    predicted at the prompt's last token, so that token starts each branch instead of ending the shared
    part: one extra token per branch, and every scored position is predicted once."""
    if not examples:
        raise ValueError("collate_pairs_shared needs at least one pair")
    P = len(examples)
    return _collate_shared([(e.prompt, [(e.chosen, e.chosen_mask, k), (e.rejected, e.rejected_mask, P + k)])
                            for k, e in enumerate(examples)], P, pad_id, pad_to_multiple_of)


def collate_unpaired_shared(examples: Sequence[PrefExample], *, pad_id: int = 0, pad_to_multiple_of: int = 1) -> PrefBatch:
    """`collate_unpaired`'s 4P sequences (2P examples, then their 2P mismatched KL rows, in its order) with
    prompts shared as in `collate_pairs_shared`: P example rows (pair k's prompt, chosen, rejected), then
    P KL rows (pair k's prompt with the two responses `collate_unpaired` gives it: those of examples
    k - 1 and P + k - 1, cyclically). KTO splits such a batch into halves: the first half of the rows holds
    the first half of the sequences."""
    if not examples:
        raise ValueError("collate_unpaired_shared needs at least one pair")
    P = len(examples)
    resp = [(e.chosen, e.chosen_mask) for e in examples] + [(e.rejected, e.rejected_mask) for e in examples]
    rows = [(e.prompt, [(e.chosen, e.chosen_mask, k), (e.rejected, e.rejected_mask, P + k)])
            for k, e in enumerate(examples)]
    rows += [(e.prompt, [(*resp[k - 1], 2 * P + k), (*resp[P + k - 1], 3 * P + k)]) for k, e in enumerate(examples)]
    return _collate_shared(rows, P, pad_id, pad_to_multiple_of)


def _collate_shared(groups: list[tuple[np.ndarray, list[tuple[np.ndarray, np.ndarray, int]]]], n_pairs: int,
                    pad_id: int, multiple: int) -> PrefBatch:
    """One row per group (prompt, [(response ids, loss mask, sequence index), ...])."""
    n_seq = sum(len(branches) for _, branches in groups)
    rows = []
    lengths, learnt = np.zeros(n_seq, np.int64), np.zeros(n_seq, np.int64)
    for prompt, branches in groups:
        shared = max(len(prompt) - 1, 0)  # the prompt's last token starts each branch (it predicts the response)
        parts = [(prompt[:shared], np.full(shared, IGNORE_INDEX), np.arange(shared), 0, -1)]
        for b, (resp, mask, k) in enumerate(branches, start=1):
            ids = np.concatenate([prompt, resp]).astype(np.int64)
            full_mask = np.concatenate([np.zeros(len(prompt), dtype=bool), mask])
            targets = np.where(full_mask[1:], ids[1:], IGNORE_INDEX)  # next-token targets where learnt
            targets = np.append(targets, IGNORE_INDEX)[shared:]
            parts.append((ids[shared:], targets, np.arange(shared, len(ids)), b, k))
            lengths[k], learnt[k] = len(ids), int((targets != IGNORE_INDEX).sum())
        rows.append(parts)
    longest = max(sum(len(part[0]) for part in parts) for parts in rows)
    width = -(-max(longest, 1) // multiple) * multiple
    R = len(rows)
    tokens, targets = np.full((R, width), pad_id, np.int64), np.full((R, width), IGNORE_INDEX, np.int64)
    positions, seg, seq = np.zeros((R, width), np.int64), np.full((R, width), -1, np.int64), np.full((R, width), -1, np.int64)
    for r, parts in enumerate(rows):
        col = 0
        for ids, tgt, pos, b, k in parts:
            span = slice(col, col + len(ids))
            tokens[r, span], targets[r, span], positions[r, span], seg[r, span] = ids, tgt, pos, b
            seq[r, span] = np.where(tgt != IGNORE_INDEX, k, -1)
            col += len(ids)
    as_t = torch.from_numpy
    return PrefBatch(as_t(tokens), as_t(targets), n_pairs, as_t(learnt), as_t(lengths), as_t(positions),
                     as_t(seg), as_t(seq))


def _collate(rows: list[tuple[np.ndarray, np.ndarray]], n_pairs: int, pad_id: int, multiple: int) -> PrefBatch:
    docs, masks = [ids for ids, _ in rows], [mask for _, mask in rows]
    batch = pad_batch(docs, range(len(docs)), pad_to_multiple_of=multiple, loss_masks=masks, pad_id=pad_id)
    return PrefBatch(batch.tokens, batch.targets, n_pairs, (batch.targets != IGNORE_INDEX).sum(1),
                     torch.tensor([len(d) for d in docs], dtype=torch.int64))


# ---- the check ------------------------------------------------------------------------------------


@dataclass
class PrefCheckReport:
    """What `check_pairs` found; `ok` is False when training on these pairs would be wrong."""

    pairs: int
    chosen: CheckReport
    """sft's check of the prompt + chosen rows (learnt share, end-of-turn tokens, lengths before truncation)."""
    rejected: CheckReport
    """The same of the prompt + rejected rows."""
    truncated: int
    prompt_tokens_cut: int
    response_tokens_cut: int
    identical: list[str] = field(default_factory=list)
    """Where pairs whose two rows are the same tokens (after truncation) came from (the first MAX_LISTED)."""
    n_identical: int = 0
    shown: list[tuple[str, str, list[tuple[str, bool]], list[tuple[str, bool]]]] = field(default_factory=list)
    """The first pairs as (where, prompt text, chosen runs, rejected runs), runs being (text, learnt)."""
    stats: PrefStats | None = None

    @property
    def ok(self) -> bool:
        return self.pairs > 0 and self.chosen.ok and self.rejected.ok and self.n_identical == 0


@dataclass
class UnpairedCheckReport:
    """What `check_unpaired` found; `ok` is False when training on these examples would be wrong."""

    examples: int
    desirable: int
    """Examples labelled desirable (the rest are undesirable)."""
    rows: CheckReport
    """sft's check of the prompt + completion rows."""
    truncated: int
    prompt_tokens_cut: int
    response_tokens_cut: int
    shown: list[tuple[str, bool, str, list[tuple[str, bool]]]] = field(default_factory=list)
    """The first examples as (where, label, prompt text, completion runs), runs being (text, learnt)."""
    stats: PrefStats | None = None

    @property
    def undesirable(self) -> int:
        return self.examples - self.desirable

    @property
    def ok(self) -> bool:
        return self.examples > 0 and self.rows.ok


def check_pairs(examples: Sequence[PrefExample] | Sequence[UnpairedExample], tokenizer: HFTokenizer, *,
                max_length: int | None = None, n_show: int = 3,
                stats: PrefStats | None = None) -> PrefCheckReport | UnpairedCheckReport:
    """Look at tokenized pairs as the trainer will see them: sft's check of each side's rows, plus
    pairs left identical by truncation; `format_pref_check` prints it. Unpaired examples go to `check_unpaired`."""
    if examples and isinstance(examples[0], UnpairedExample):
        return check_unpaired(examples, tokenizer, max_length=max_length, n_show=n_show, stats=stats)
    def side_examples(side: str) -> list[SFTExample]:
        out = []
        for e in examples:
            ids, mask = e.row(side)
            out.append(SFTExample(ids, mask, e.where, len(ids) + e.prompt_cut + getattr(e, f"{side}_cut"),
                                  e.eos_added))
        return out

    identical = [e.where for e in examples if np.array_equal(e.chosen, e.rejected)]
    shown = []
    for e in examples[:n_show]:
        runs = [_runs(SFTExample(ids, mask, e.where, len(ids)), tokenizer)
                for ids, mask in ((e.chosen, e.chosen_mask), (e.rejected, e.rejected_mask))]
        shown.append((e.where, tokenizer.decode(e.prompt), runs[0], runs[1]))
    return PrefCheckReport(
        pairs=len(examples),
        chosen=check_examples(side_examples("chosen"), tokenizer, max_length=max_length, n_show=0),
        rejected=check_examples(side_examples("rejected"), tokenizer, max_length=max_length, n_show=0),
        truncated=sum(e.truncated for e in examples),
        prompt_tokens_cut=sum(e.prompt_cut for e in examples),
        response_tokens_cut=sum(e.chosen_cut + e.rejected_cut for e in examples),
        identical=identical[:MAX_LISTED],
        n_identical=len(identical),
        shown=shown,
        stats=stats,
    )


def check_unpaired(examples: Sequence[UnpairedExample], tokenizer: HFTokenizer, *, max_length: int | None = None,
                   n_show: int = 3, stats: PrefStats | None = None) -> UnpairedCheckReport:
    """Look at tokenized unpaired examples as the trainer will see them: their labels and sft's check of their rows."""
    rows = []
    for e in examples:
        ids, mask = e.row()
        rows.append(SFTExample(ids, mask, e.where, len(ids) + e.prompt_cut + e.completion_cut, e.eos_added))
    shown = [(e.where, e.label, tokenizer.decode(e.prompt),
              _runs(SFTExample(e.completion, e.mask, e.where, len(e.completion)), tokenizer))
             for e in examples[:n_show]]
    return UnpairedCheckReport(
        examples=len(examples), desirable=sum(e.label for e in examples),
        rows=check_examples(rows, tokenizer, max_length=max_length, n_show=0),
        truncated=sum(e.truncated for e in examples), prompt_tokens_cut=sum(e.prompt_cut for e in examples),
        response_tokens_cut=sum(e.completion_cut for e in examples), shown=shown, stats=stats)


def format_pref_check(report: PrefCheckReport | UnpairedCheckReport, color: bool | None = None) -> str:
    """The report as text: learnt tokens in green (color, by default when stdout is a terminal) or in [[...]]."""
    if color is None:
        color = sys.stdout.isatty()
    open_, close = ("\x1b[32m", "\x1b[0m") if color else ("[[", "]]")
    mark = lambda runs: "".join(f"{open_}{text}{close}" if learnt else text for text, learnt in runs)
    if isinstance(report, UnpairedCheckReport):
        return _format_unpaired_check(report, color, mark)
    lines = [f"Preference data check: {report.pairs} pairs"]
    lines += [_rows_line(side, r) for side, r in (("chosen", report.chosen), ("rejected", report.rejected))]
    lines += _cut_lines(report, "pairs")
    for i, (where, prompt, chosen, rejected) in enumerate(report.shown, 1):
        lines.append(f"--- pair {i} ({where}); learnt text {'in green' if color else 'in [[...]]'} ---")
        lines += [f"prompt: {prompt}", f"chosen: {mark(chosen)}", f"rejected: {mark(rejected)}"]
    if report.ok:
        lines.append("OK")
        return "\n".join(lines)
    if report.pairs == 0:
        lines.append("FAIL: no pairs")
    for side, r in (("chosen", report.chosen), ("rejected", report.rejected)):
        if r.n_no_trained:
            lines.append(f"FAIL: {r.n_no_trained} {side} responses have no learnt token: {', '.join(r.no_trained)}")
        if r.n_no_stop:
            lines.append(f"FAIL: {r.n_no_stop} untruncated {side} responses do not end with a learnt EOS / "
                         f"end-of-turn token, so the model would not learn to stop: {', '.join(r.no_stop)}")
    if report.n_identical:
        lines.append(f"FAIL: {report.n_identical} pairs have identical chosen and rejected tokens (cut to the same "
                     f"start?): {', '.join(report.identical)}")
    return "\n".join(lines)


def _rows_line(side: str, r: CheckReport) -> str:
    line = f"{side}: {r.tokens} tokens, {r.trained_tokens} learnt ({r.trained_fraction:.1%})"
    if r.lengths:
        lens = r.lengths
        line += (f"; row lengths before truncation: min {lens['min']:.0f}, median {lens['median']:.0f}, "
                 f"p95 {lens['p95']:.0f}, max {lens['max']:.0f}")
    return line + f"; ends with a learnt EOS / end-of-turn token: {r.ends_with_stop} of {r.examples}"


def _cut_lines(report: PrefCheckReport | UnpairedCheckReport, unit: str) -> list[str]:
    """The lines on truncation, skipped records and inserted EOS tokens."""
    lines = []
    if report.truncated:
        lines.append(f"truncated: {report.truncated} {unit}, {report.prompt_tokens_cut} tokens cut from prompts' "
                     f"starts and {report.response_tokens_cut} from responses' ends")
    stats = report.stats
    if stats is not None and stats.skipped:
        lines.append(skip_summary(stats))
    if stats is not None and stats.eos_added:
        lines.append(f"EOS inserted after assistant turns (the template ends them with no special token): "
                     f"{stats.eos_added} {unit}")
    return lines


def _format_unpaired_check(report: UnpairedCheckReport, color: bool, mark: Callable) -> str:
    lines = [f"Preference data check: {report.examples} unpaired examples, {report.desirable} desirable and "
             f"{report.undesirable} undesirable", _rows_line("completion", report.rows)]
    lines += _cut_lines(report, "examples")
    for i, (where, label, prompt, runs) in enumerate(report.shown, 1):
        lines.append(f"--- example {i} ({where}, {'desirable' if label else 'undesirable'}); learnt text "
                     f"{'in green' if color else 'in [[...]]'} ---")
        lines += [f"prompt: {prompt}", f"completion: {mark(runs)}"]
    if report.ok:
        lines.append("OK")
        return "\n".join(lines)
    r = report.rows
    if report.examples == 0:
        lines.append("FAIL: no examples")
    if r.n_no_trained:
        lines.append(f"FAIL: {r.n_no_trained} completions have no learnt token: {', '.join(r.no_trained)}")
    if r.n_no_stop:
        lines.append(f"FAIL: {r.n_no_stop} untruncated completions do not end with a learnt EOS / end-of-turn token, "
                     f"so the model would not learn to stop: {', '.join(r.no_stop)}")
    return "\n".join(lines)
