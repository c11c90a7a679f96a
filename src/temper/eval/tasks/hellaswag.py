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
from typing import Any

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
    records = read_records(path)
    questions = [_question(r, where) for where, r in records]
    k = options.num_fewshot or 0
    pool: list[tuple[dict[str, Any], tuple[str, str]]] = []
    if k:
        if options.fewshot_path is None:
            raise TaskError("hellaswag: num_fewshot > 0 needs a few-shot file (the training split): --fewshot_path")
        for where, r in read_records(options.fewshot_path):
            q, texts, gold = _question(r, where)
            pool.append((r, (q, texts[gold])))
    shots = fewshot_draws(pool, k, options.seed, [r for _, r in records], exclude_question=True)
    return [
        MultipleChoice(doc_id=i, contexts=(with_shots(shots[i], q),), continuations=tuple(f" {t}" for t in texts),
                       gold=gold, norm_chars=tuple(len(t) for t in texts))
        for i, (q, texts, gold) in enumerate(questions)
    ]


TASKS = [
    Task("hellaswag", "multiple_choice", load, data=None,
         description="HellaSwag commonsense sentence completion (lm-eval hellaswag); give the validation file"),
]
