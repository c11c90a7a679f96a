"""Benchmark tasks: what a task file gives the runner, and the registry of task names.

A task is a small file of this package that reads a local data file (JSON Lines, a JSON array,
either optionally gzipped) and turns each record into an example:
- `MultipleChoice`: contexts and continuations whose log-likelihoods are compared
  (`acc`, `acc_norm` and calibration, exactly as lm-eval-harness scores them);
- `Generation`: a prompt to complete, and a scorer for the completion (exact match after answer
  extraction, BLEU, ROUGE, ...), or a program that tests it (code tasks: run in `temper.sandbox`,
  scored by pass@k).
Few-shot examples come from a second file (the task's training split), drawn for each question
in turn from one seeded generator, as lm-eval-harness's default sampler draws them
(`fewshot_draws`), unless the task fixes them (GSM8K-CoT's exemplars).

It does not run a model (see `temper.eval.run`).
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal, TypeVar

from temper.data.sources import DataError, RecordError, json_records
from temper.errors import InputError

T = TypeVar("T")


class TaskError(InputError):
    """A task file or option that cannot be used; the message names the file and line or the key."""


@dataclass(frozen=True)
class MultipleChoice:
    """One question: the choice whose continuation is most likely after its context is the answer.

    Most tasks share one context and score one continuation per choice (ARC: "Question: ...
    Answer:" then " <choice>"). WinoGrande does the reverse: one context per choice (the sentence
    up to the blank, filled with the choice) and one shared continuation (the rest).
    """

    doc_id: int
    contexts: tuple[str, ...]
    """One shared context, or one per choice."""
    continuations: tuple[str, ...]
    """One per choice, or one shared."""
    gold: int
    """Index of the correct choice."""
    norm_chars: tuple[int, ...]
    """Characters of each choice, the divisor of `acc_norm` (lm-eval: the choice text, without the
    space that joins it to the context)."""

    @property
    def n_choices(self) -> int:
        return max(len(self.contexts), len(self.continuations))

    def pairs(self) -> list[tuple[str, str]]:
        """(context, continuation) of each choice."""
        n = self.n_choices
        ctx = self.contexts * n if len(self.contexts) == 1 else self.contexts
        cont = self.continuations * n if len(self.continuations) == 1 else self.continuations
        return list(zip(ctx, cont, strict=True))


@dataclass(frozen=True)
class Generation:
    """One prompt to complete; `target` is the reference the completion is scored against."""

    doc_id: int
    prompt: str
    target: str


Example = MultipleChoice | Generation


@dataclass(frozen=True)
class TaskOptions:
    """How a task builds its examples; every task accepts these."""

    num_fewshot: int | None = None
    """Solved examples put before each question (None: the task's default)."""
    fewshot_path: Path | None = None
    """File to draw them from (None: the task's default, usually its training split)."""
    seed: int = 1234
    """Seed of the few-shot sample (lm-eval's default seed)."""


DEFAULT_DATA_ROOT = "data/eval"
"""Where tasks named without a file look for theirs: `<root>/<task's data path>`, e.g.
data/eval/arc-easy/validation.jsonl (the README's 'Evaluation data' lists each task's files and sources)."""


@dataclass(frozen=True)
class Task:
    """A task: how to read its file, and for generative tasks how to score a completion."""

    name: str
    kind: Literal["multiple_choice", "generate"]
    load: Callable[[Path, TaskOptions], list[Example]]
    """Read the data file into examples (raises TaskError naming file:line and the field)."""
    data: str | None = None
    """Default data file, relative to the data root (`temper evaluate --data_root`)."""
    fewshot_data: str | None = None
    """Default file of few-shot examples (the training split), relative to the data root."""
    description: str = ""
    stop: tuple[str, ...] = ()
    """Generation ends before the first of these strings (and at the tokenizer's end-of-text)."""
    max_new_tokens: int = 256
    mc_metrics: tuple[str, ...] = ("acc", "acc_norm")
    """Multiple choice: which of acc / acc_norm the task reports (ECE always comes with acc)."""
    score: Callable[[str, Generation], dict[str, float]] | None = None
    """Per-example metrics of a completion (generative tasks); each is averaged over the task."""
    corpus_metrics: tuple[str, ...] = ()
    """Metrics computed over all completions at once: "bleu", "rouge1", "rouge2", "rougeL"."""
    program: Callable[[str, Generation], str] | None = None
    """Code tasks: the program that tests a completion (the completion, then the example's tests in
    `target`); it passes when it runs to its end (`temper.sandbox`), and the task reports pass@k."""


# ---- reading task files --------------------------------------------------------------------------


def read_records(path: str | Path) -> list[tuple[str, dict[str, Any]]]:
    """(location "file:line", record) of each object of a .jsonl / .json array file (.gz allowed).

    A task is scored on all its records, so a bad one stops it (skipping would change the number)."""
    path = Path(path)
    if not path.is_file():
        raise TaskError(f"{path}: no such file")
    records = []
    try:
        for where, obj in json_records(path):
            if isinstance(obj, RecordError):
                raise obj
            if not isinstance(obj, dict):
                raise TaskError(f"{where}: expected a JSON object, got {type(obj).__name__}")
            records.append((where, obj))
    except DataError as e:
        raise TaskError(str(e)) from None
    if not records:
        raise TaskError(f"{path}: no records (an empty task)")
    return records


def field_of(record: dict[str, Any], where: str, key: str, kind: type | tuple[type, ...] = str) -> Any:
    """record[key], checked to be a `kind`; a missing or wrong field names the file:line and key."""
    if key not in record:
        raise TaskError(f"{where}: missing field {key!r}")
    value = record[key]
    if not isinstance(value, kind) or isinstance(value, bool) and kind is int:
        names = kind.__name__ if isinstance(kind, type) else " or ".join(k.__name__ for k in kind)
        raise TaskError(f"{where}: field {key!r} must be {names}, got {type(value).__name__}")
    return value


def choice_index(value: Any, n: int, where: str, key: str) -> int:
    """A gold label as an index into n choices (ints, or digit strings as some datasets store them)."""
    if isinstance(value, str) and value.strip().isdigit():
        value = int(value)
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value < n:
        raise TaskError(f"{where}: field {key!r} must be a choice index in [0, {n}), got {value!r}")
    return value


def fewshot_draws(pool: Sequence[tuple[dict[str, Any], T]], k: int, seed: int, questions: Sequence[dict[str, Any]],
                  exclude_question: bool) -> list[list[T]]:
    """The k shots of each question, drawn exactly as lm-eval 0.4.13's default `ContextSampler`.

    `pool` holds (record, shot) pairs of the few-shot file. lm-eval seeds one generator once and
    draws in question order, so question i's shots depend on i: they equal lm-eval's only when the
    questions are read in file order from the first. When the task names no few-shot split and no
    test split (hellaswag, piqa, winogrande: `fewshot_split == test_split`, both None), lm-eval
    treats the pool as possibly holding the question itself: it draws k + 1, drops records equal
    to the question, keeps the first k, and redraws from the pool without the question if too few
    are left.
    """
    if k == 0:
        return [[] for _ in questions]  # lm-eval returns before touching the generator
    need = k + 1 if exclude_question else k
    if need > len(pool):
        raise TaskError(f"num_fewshot={k} needs {need} examples in the few-shot file"
                        f"{' (lm-eval draws one spare)' if exclude_question else ''}, but it has {len(pool)}")
    rng = random.Random(seed)
    draws = []
    for question in questions:
        if not exclude_question:
            draws.append([shot for _, shot in rng.sample(pool, k)])
            continue
        picked = [shot for record, shot in rng.sample(pool, k + 1) if record != question][:k]
        if len(picked) < k:  # the question appeared more than once in the draw
            picked = [shot for _, shot in rng.sample([p for p in pool if p[0] != question], k)]
        draws.append(picked)
    return draws


def with_shots(shots: Sequence[tuple[str, str]], query: str, target_delimiter: str = " ") -> str:
    """lm-eval's few-shot prompt: question, target_delimiter, answer of each shot, then the query, blank-line
    separated."""
    return "".join(f"{q}{target_delimiter}{a}\n\n" for q, a in shots) + query


Question = Callable[[dict[str, Any], str], tuple[str, list[str], int]]
"""(record, "file:line") -> (prompt, choices, gold): one task's reading of one record."""


def load_choice_questions(task: str, path: Path, options: TaskOptions, question: Question, *,
                          exclude_question: bool) -> list[MultipleChoice]:
    """The usual multiple-choice task (ARC, HellaSwag, PIQA): one context, the few-shot examples then
    the prompt, and the continuations " {choice}", acc_norm dividing by each choice's characters.

    exclude_question: the few-shot file may hold the question itself (no separate test split),
    so lm-eval draws a spare shot and drops it (see `fewshot_draws`).
    """
    records = read_records(path)
    questions = [question(r, where) for where, r in records]
    k = options.num_fewshot or 0
    pool: list[tuple[dict[str, Any], tuple[str, str]]] = []
    if k:
        if options.fewshot_path is None:
            raise TaskError(f"{task}: num_fewshot > 0 needs a few-shot file (the training split): --fewshot_path")
        for where, r in read_records(options.fewshot_path):
            prompt, choices, gold = question(r, where)
            pool.append((r, (prompt, choices[gold])))
    shots = fewshot_draws(pool, k, options.seed, [r for _, r in records], exclude_question)
    return [
        MultipleChoice(doc_id=i, contexts=(with_shots(shots[i], prompt),),
                       continuations=tuple(f" {c}" for c in choices), gold=gold, norm_chars=tuple(len(c) for c in choices))
        for i, (prompt, choices, gold) in enumerate(questions)
    ]


# ---- the registry ------------------------------------------------------------------------------


def _registry() -> dict[str, Task]:
    # Imported here, not at the top: each task module imports the types above.
    from temper.eval.tasks import arc, code, completion, gsm8k, hellaswag, piqa, winogrande

    tasks = [*arc.TASKS, *hellaswag.TASKS, *piqa.TASKS, *winogrande.TASKS, *gsm8k.TASKS, *completion.TASKS,
             *code.TASKS]
    return {t.name: t for t in tasks}


TASKS: dict[str, Task] = {}
"""Every task by name; filled on first use by `all_tasks`."""


def all_tasks() -> dict[str, Task]:
    if not TASKS:
        TASKS.update(_registry())
    return TASKS


def get_task(name: str) -> Task:
    """The task called `name`; an unknown name lists the known ones."""
    tasks = all_tasks()
    if name not in tasks:
        raise TaskError(f"unknown task {name!r}; known tasks: {', '.join(sorted(tasks))}")
    return tasks[name]


def load_task(spec: str, data_root: str | Path, options: TaskOptions = TaskOptions(),
              limit: int | None = None) -> tuple[Task, list[Example]]:
    """A task and its first `limit` examples from a spec "name" (its default file under data_root)
    or "name=path/to/file.jsonl"; few-shot examples default to the task's own training file."""
    name, _, path = spec.partition("=")
    task = get_task(name.strip())
    root = Path(data_root)
    if not path:
        if task.data is None:
            raise TaskError(f"task {task.name!r} has no default data file: give one as {task.name}=path/to/file.jsonl")
        path = str(root / task.data)
        if not Path(path).is_file():
            raise TaskError(f"{task.name}: no data file {path}: give one as {task.name}=path/to/file.jsonl, or put the "
                            f"task's files under the data root (now {root}) as the README's 'Evaluation data' lists them")
    if options.fewshot_path is None and task.fewshot_data is not None:  # read only when shots are asked for
        options = replace(options, fewshot_path=root / task.fewshot_data)
    examples = task.load(Path(path), options)
    return task, examples[:limit] if limit is not None else examples
