"""WinoGrande (Sakaguchi et al. 2020): fill the blank of a sentence with the right one of two names.

Scored as lm-eval-harness 0.4.13's `winogrande`, by partial evaluation (Trinh & Le 2018): the
sentence is cut at its first "_"; each choice gives its own context (the text before the blank,
then the option) and both share one continuation, " " + the rest of the sentence stripped of
surrounding whitespace. The choice under which the rest of the sentence is most likely wins.
Metric acc; zero-shot by default. Few-shot examples ("{text before the blank}{right option} {rest}"
blocks, put before every choice's context) come from `--fewshot_path` (the training split), drawn
as lm-eval draws them (see `temper.eval.tasks.fewshot_draws`).

Reads the Hugging Face `allenai/winogrande` layout, one JSON object per sentence:
{"sentence": str with one "_", "option1": str, "option2": str, "answer": "1" | "2"}. The public test
split has no answers (answer ""), so it fails on its first record naming the field.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from temper.eval.tasks import (
    MultipleChoice,
    Task,
    TaskError,
    TaskOptions,
    fewshot_draws,
    field_of,
    read_records,
    with_shots,
)


def _sentence(record: dict, where: str) -> tuple[list[str], str, int]:
    """(one context per option, the shared rest of the sentence, gold), as lm-eval's
    preprocess_winogrande.doc_to_choice / doc_to_target / doc_to_text compute them."""
    sentence = field_of(record, where, "sentence")
    options = [field_of(record, where, "option1"), field_of(record, where, "option2")]
    answer = field_of(record, where, "answer", (str, int))
    if str(answer) not in ("1", "2"):
        raise TaskError(f"{where}: field 'answer' must be \"1\" or \"2\", got {answer!r}")
    blank = sentence.find("_")  # lm-eval cuts at the first underscore
    if blank < 0:
        raise TaskError(f"{where}: field 'sentence' has no blank '_' to fill")
    for key, option in zip(("option1", "option2"), options, strict=True):
        if not option.strip():
            raise TaskError(f"{where}: field {key!r} is empty")
    contexts = [sentence[:blank] + option for option in options]
    return contexts, sentence[blank + 1:].strip(), int(answer) - 1


def load(path: Path, options: TaskOptions) -> list[MultipleChoice]:
    records = read_records(path)
    sentences = [_sentence(r, where) for where, r in records]
    k = options.num_fewshot or 0
    pool: list[tuple[dict[str, Any], tuple[str, str]]] = []
    if k:
        if options.fewshot_path is None:
            raise TaskError("winogrande: num_fewshot > 0 needs a few-shot file (the training split): --fewshot_path")
        for where, r in read_records(options.fewshot_path):
            # A shot is the sentence filled with its right option: lm-eval's q = choices[gold], a = the rest.
            ctxs, rest, gold = _sentence(r, where)
            pool.append((r, (ctxs[gold], rest)))
    # The same shots go before both of a question's contexts.
    shots = fewshot_draws(pool, k, options.seed, [r for _, r in records], exclude_question=True)
    examples = []
    for i, (ctxs, rest, gold) in enumerate(sentences):
        examples.append(MultipleChoice(
            doc_id=i, contexts=tuple(with_shots(shots[i], c) for c in ctxs), continuations=(f" {rest}",), gold=gold,
            # Every choice scores the same continuation: no length to normalise, so the task
            # reports acc only (as lm-eval); equal divisors keep the unused acc_norm equal to acc.
            norm_chars=(len(rest),) * len(ctxs),
        ))
    return examples


TASKS = [
    Task("winogrande", "multiple_choice", load, data=None, mc_metrics=("acc",),
         description="WinoGrande pronoun resolution by partial scoring (lm-eval winogrande, acc); give the file"),
]
