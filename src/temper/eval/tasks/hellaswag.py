"""HellaSwag (Zellers et al. 2019): pick the most plausible ending of an ActivityNet or WikiHow scene.

Scored as lm-eval-harness 0.4.13's `hellaswag`: the context is lm-eval's `preprocess` of
"{activity_label}: {ctx_a} {ctx_b.capitalize()}" (the WikiHow " [title]" becomes ". ", other
"[header]"-style brackets are removed, a double space becomes one), each choice is the
preprocessed ending after a space, metrics acc and acc_norm; zero-shot by default. Few-shot
examples ("{context} {gold ending}" blocks) come from `--fewshot_path` (the training split), drawn
as lm-eval draws them (see `fewshot_draws`).

Reads the Hugging Face `Rowan/hellaswag` layout, one JSON object per question:
{"activity_label": str, "ctx_a": str, "ctx_b": str, "endings": [str, ...], "label": "0".."3" (or int),
 ...} (other fields such as "ctx", "ind", "source_id" are ignored). The public test split has no
labels (label ""), so it fails on its first record naming the field: evaluate the validation split.
"""

from __future__ import annotations

import re
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


def preprocess(text: str) -> str:
    """lm-eval's clean-up of HellaSwag text, step for step (lm_eval/tasks/hellaswag/utils.py)."""
    text = text.strip()
    # The brackets are artifacts of the WikiHow part of the data set.
    text = text.replace(" [title]", ". ")
    text = re.sub("\\[.*?\\]", "", text)
    text = text.replace("  ", " ")
    return text


def _question(record: dict, where: str) -> tuple[str, list[str], int]:
    """(context, choices, gold) of one record, as lm-eval's `process_docs` builds query/choices/gold."""
    activity = field_of(record, where, "activity_label")
    ctx_a = field_of(record, where, "ctx_a")
    ctx_b = field_of(record, where, "ctx_b")
    endings = field_of(record, where, "endings", list)
    if len(endings) < 2 or not all(isinstance(e, str) for e in endings):
        raise TaskError(f"{where}: field 'endings' must hold at least two strings")
    gold = choice_index(field_of(record, where, "label", (str, int)), len(endings), where, "label")
    # str.capitalize also lower-cases the rest of ctx_b; lm-eval does exactly this, so we do too.
    query = preprocess(activity + ": " + ctx_a + " " + ctx_b.capitalize())
    return query, [preprocess(e) for e in endings], gold


def load(path: Path, options: TaskOptions) -> list[MultipleChoice]:
    return load_choice_questions("hellaswag", path, options, _question, exclude_question=True)


TASKS = [
    Task("hellaswag", "multiple_choice", load, data=None,
         description="HellaSwag commonsense sentence completion (lm-eval hellaswag); give the validation file"),
]
