"""Prompt files for sampling recipes (`temper best-of-n`, `temper grpo`, `temper ppo`): each record a
conversation to answer and, optionally, its reference answer (for verifiable rewards).

A record is a JSON object with `prompt` or GSM8K's `question` (text: one user turn), or `messages`
(a list of {role, content}; trailing assistant turns, the reply to replace, are dropped), and an
optional `answer` (text or a number). Files are JSON Lines or a JSON array, .gz allowed
(`data.sources.json_records`); a bad record stops the run with its file:line and key.

It does not render the conversation (the policy's chat template does) or score answers (align/rewards.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from temper.data.sources import DataError, RecordError, expand_inputs, json_records


@dataclass
class PromptRecord:
    where: str
    messages: list[dict[str, Any]]
    answer: str | None


def read_prompts(files: list[str]) -> list[PromptRecord]:
    """The prompt records of `files`, in order; a bad record stops with its file:line and key."""
    out = []
    for path in expand_inputs(files):
        for where, obj in json_records(path):
            if isinstance(obj, RecordError):
                raise obj
            if not isinstance(obj, dict):
                raise RecordError(where, "", "not_object", f"a record must be a JSON object, got {type(obj).__name__}")
            out.append(_prompt_record(where, obj))
    if not out:
        raise DataError(f"no prompts in {files}")
    return out


def _prompt_record(where: str, obj: dict) -> PromptRecord:
    answer = obj.get("answer")
    if answer is not None and not isinstance(answer, (str, int, float)):
        raise RecordError(where, "answer", "wrong_type", f"must be text or a number, got {type(answer).__name__}")
    answer = None if answer is None else str(answer)
    for key in ("prompt", "question"):
        if key in obj:
            if not isinstance(obj[key], str) or not obj[key].strip():
                raise RecordError(where, key, "wrong_type", "must be non-empty text")
            return PromptRecord(where, [{"role": "user", "content": obj[key]}], answer)
    if "messages" in obj:
        msgs = obj["messages"]
        if not isinstance(msgs, list) or not all(isinstance(m, dict) and isinstance(m.get("role"), str)
                                                 and isinstance(m.get("content"), str) for m in msgs):
            raise RecordError(where, "messages", "wrong_type", "must be a list of {role, content} objects")
        while msgs and msgs[-1]["role"] == "assistant":
            msgs = msgs[:-1]  # the reply to replace
        if not msgs:
            raise RecordError(where, "messages", "empty", "no turn left to answer")
        return PromptRecord(where, [dict(m) for m in msgs], answer)
    raise RecordError(where, "prompt", "missing", "a record needs 'prompt', 'messages' or 'question'")
