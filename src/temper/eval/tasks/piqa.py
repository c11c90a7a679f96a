"""PIQA (Bisk et al. 2020): physical commonsense, choose which of two solutions reaches a goal.

Scored as lm-eval-harness 0.4.13's `piqa`: context "Question: {goal}\\nAnswer:", continuations
" {sol1}" and " {sol2}" (the solution text kept as it is, trailing spaces included), metrics acc
and acc_norm; zero-shot by default. Few-shot examples come from `--fewshot_path` (the training
split), drawn as lm-eval draws them (see `temper.eval.tasks.fewshot_draws`).

Reads the Hugging Face layout (`baber/piqa`, `ybisk/piqa`), one JSON object per question:
{"goal": str, "sol1": str, "sol2": str, "label": 0 | 1 (or "0" / "1")}. The original release keeps
the labels in a separate file: merge them into the records first.
"""

from __future__ import annotations

from pathlib import Path

from temper.eval.tasks import (
    MultipleChoice,
    Task,
    TaskOptions,
    choice_index,
    field_of,
    load_choice_questions,
)


def _question(record: dict, where: str) -> tuple[str, list[str], int]:
    goal = field_of(record, where, "goal")
    choices = [field_of(record, where, "sol1"), field_of(record, where, "sol2")]
    gold = choice_index(field_of(record, where, "label", (int, str)), 2, where, "label")
    return f"Question: {goal}\nAnswer:", choices, gold


def load(path: Path, options: TaskOptions) -> list[MultipleChoice]:
    return load_choice_questions("piqa", path, options, _question, exclude_question=True)


TASKS = [
    Task("piqa", "multiple_choice", load, data=None,
         description="PIQA physical commonsense, two solutions (lm-eval piqa); give the validation file"),
]
