"""ARC (AI2 Reasoning Challenge, Clark et al. 2018), Easy and Challenge: science questions, 3-5 choices.

Scored as lm-eval-harness's `arc_easy` / `arc_challenge`: context "Question: {question}\\nAnswer:",
continuation " {choice}", metrics acc and acc_norm; zero-shot by default. Reads two layouts:
- flat: {"question": str, "choices": [str, ...], "label": int} (one row per question, lm-eval's order);
- Hugging Face `ai2_arc`: {"question": str, "choices": {"text": [...], "label": ["A", ...]}, "answerKey": "A"}.
"""

from __future__ import annotations

from pathlib import Path

from temper.eval.tasks import (
    MultipleChoice,
    Task,
    TaskError,
    TaskOptions,
    choice_index,
    field_of,
    load_choice_questions,
)


def _question(record: dict, where: str) -> tuple[str, list[str], int]:
    question = field_of(record, where, "question")
    choices = field_of(record, where, "choices", (list, dict))
    if isinstance(choices, dict):  # the Hugging Face layout: answerKey is one of choices.label
        texts = field_of(choices, f"{where} choices", "text", list)
        labels = field_of(choices, f"{where} choices", "label", list)
        key = field_of(record, where, "answerKey")
        if key not in labels:
            raise TaskError(f"{where}: answerKey {key!r} is not one of the choice labels {labels}")
        gold = labels.index(key)
    else:
        texts = choices
        gold = choice_index(field_of(record, where, "label", (int, str)), len(texts), where, "label")
    if len(texts) < 2 or not all(isinstance(t, str) and t for t in texts):
        raise TaskError(f"{where}: field 'choices' must hold at least two non-empty strings")
    return f"Question: {question}\nAnswer:", texts, gold


def load(path: Path, options: TaskOptions) -> list[MultipleChoice]:
    # arc has a test split apart from its few-shot split: lm-eval draws exactly k per question
    return load_choice_questions("arc", path, options, _question, exclude_question=False)


TASKS = [
    Task("arc_easy", "multiple_choice", load, data="arc-easy/test.jsonl", fewshot_data="arc-easy/train.jsonl",
         description="ARC-Easy science questions (lm-eval arc_easy)"),
    Task("arc_challenge", "multiple_choice", load, data=None,
         description="ARC-Challenge science questions (lm-eval arc_challenge); give the file"),
]
