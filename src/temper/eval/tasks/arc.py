"""ARC (AI2 Reasoning Challenge, Clark et al. 2018), Easy and Challenge: science questions, 3-5 choices.

Scored as lm-eval-harness's `arc_easy` / `arc_challenge`: context "Question: {question}\\nAnswer:",
continuation " {choice}", metrics acc and acc_norm; zero-shot by default. Reads two layouts:
- flat: {"question": str, "choices": [str, ...], "label": int} (../shared/data/arc-easy);
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
    fewshot_draws,
    field_of,
    read_records,
    with_shots,
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
    return question, texts, gold


def _prompt(question: str) -> str:
    return f"Question: {question}\nAnswer:"


def load(path: Path, options: TaskOptions) -> list[MultipleChoice]:
    raw = read_records(path)
    records = [r for _, r in raw]
    questions = [_question(r, where) for where, r in raw]
    k = options.num_fewshot or 0
    shots: list[list[tuple[str, str]]] = [[] for _ in questions]
    if k:
        if options.fewshot_path is None:
            raise TaskError("arc: num_fewshot > 0 needs a few-shot file (the training split): --fewshot_path")
        pool = [(r, (_prompt(q), texts[gold])) for where, r in read_records(options.fewshot_path)
                for q, texts, gold in [_question(r, where)]]
        # arc has a test split apart from its few-shot split: lm-eval draws exactly k per question
        shots = fewshot_draws(pool, k, options.seed, records, exclude_question=False)
    return [
        MultipleChoice(doc_id=i, contexts=(with_shots(shots[i], _prompt(q)),),
                       continuations=tuple(f" {t}" for t in texts), gold=gold, norm_chars=tuple(len(t) for t in texts))
        for i, (q, texts, gold) in enumerate(questions)
    ]


TASKS = [
    Task("arc_easy", "multiple_choice", load, data="arc-easy/test.jsonl", fewshot_data="arc-easy/train.jsonl",
         description="ARC-Easy science questions (lm-eval arc_easy)"),
    Task("arc_challenge", "multiple_choice", load, data=None,
         description="ARC-Challenge science questions (lm-eval arc_challenge); give the file"),
]
