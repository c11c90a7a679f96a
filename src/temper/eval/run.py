"""Run a task on a model: examples -> model calls -> per-example records -> metrics with standard errors.

Multiple-choice questions become (context, continuation) requests, tokenized as lm-eval-harness
does (`encode_pair`) and scored together (`loglik.score`, which runs a shared context once).
Generative examples are completed with the engine (`temper.infer.engine.generate`, the one decoding
loop), a batch of similar-length prompts at a time, greedy or sampled (prompt i with seed + i, so
the text does not depend on the batching), and cut at the task's stop strings; a code task's completions
are then run with their tests (`temper.sandbox`) and scored by pass@k over each problem's
samples. A prompt longer than the
context leaves room for the answer: it keeps its last max_seq_len - max_new_tokens tokens, as
lm-eval does, and the cut is counted.

It does not read checkpoints or write reports (see `temper.recipes.evaluate`, `temper.eval.report`).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from temper.data.tokenizer import HFTokenizer
from temper.eval import metrics as M
from temper.eval.loglik import Request, encode_pair, score
from temper.eval.tasks import DEFAULT_DATA_ROOT, Example, Generation, MultipleChoice, Task, TaskError
from temper.infer.engine import generate
from temper.infer.text import completion_text, cut_at_stop
from temper.sandbox import Limits, run_all


@dataclass
class TaskResult:
    """What one task measured: metric -> value and metric -> standard error, and every example."""

    task: str
    n: int
    metrics: dict[str, float]
    stderr: dict[str, float]
    examples: list[dict[str, Any]] = field(repr=False)
    truncated: int = 0
    """Examples cut from the left to fit the model's context."""
    seconds: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)
    """Anything a report may plot: the calibration bins of a multiple-choice task."""


@dataclass
class GenerationSettings:
    """How generative tasks (GSM8K, completion) produce their answers."""

    max_new_tokens: int | None = None
    """Most tokens per answer (None: the task's own limit)."""
    temperature: float = 0.0
    """0 is greedy; above 0 samples, reproducibly for the seed."""
    top_p: float | None = None
    """Nucleus sampling mass (None: off)."""
    seed: int = 1234
    """Seed of sampling (and of few-shot selection in `temper evaluate`)."""
    batch_size: int = 16
    """Prompts generated together."""
    num_samples: int = 1
    """Completions per prompt, for code tasks' pass@k (k = 1, 10, 100 up to it); above 1 needs temperature > 0."""

    def __post_init__(self) -> None:
        if self.batch_size < 1 or self.temperature < 0 or (self.max_new_tokens is not None and self.max_new_tokens < 1):
            raise ValueError(f"batch_size and max_new_tokens must be >= 1 and temperature >= 0, got {self}")
        if self.num_samples < 1 or (self.num_samples > 1 and self.temperature == 0):
            raise ValueError(f"num_samples must be >= 1, and above 1 needs temperature > 0 (greedy samples are all "
                             f"the same), got num_samples={self.num_samples}, temperature={self.temperature}")


PASS_AT = (1, 10, 100)
"""The k of the pass@k a code task reports, those up to its samples per problem (Chen et al. 2021's)."""


def prefix_id(tok: HFTokenizer) -> int:
    """The token that stands for an empty context: BOS, else EOS (lm-eval's `prefix_token_id`)."""
    found = tok.bos_id if tok.bos_id is not None else tok.eos_id
    if found is None:
        raise TaskError("the tokenizer has neither a BOS nor an EOS token to stand for an empty context")
    return found


def encode_text(tok: HFTokenizer, text: str) -> list[int]:
    """Token ids as lm-eval's `hf` backend encodes text: with the tokenizer's special tokens (a BOS
    where it adds one), unless the text already starts with the prefix token's text."""
    prefix = tok.decode([prefix_id(tok)]) if tok.bos_id is not None or tok.eos_id is not None else ""
    return tok.encode(text, add_special_tokens=not (prefix and text.startswith(prefix)))


def requests_for(tok: HFTokenizer, pairs: Sequence[tuple[str, str]]) -> list[Request]:
    """Text pairs -> token requests, as lm-eval's `loglikelihood` builds them (empty contexts included)."""
    out = []
    for context, continuation in pairs:
        if context:
            req = encode_pair(lambda text: encode_text(tok, text), context, continuation)
        else:
            cont = tok.encode(continuation, add_special_tokens=False)
            p = prefix_id(tok)
            req = Request((p,), tuple(cont)) if not cont or cont[0] != p else Request((p,), tuple(cont[1:]))
        if not req.continuation:
            raise TaskError(f"the continuation {continuation!r} (after {context[-40:]!r}) encodes to no tokens "
                            "with this tokenizer, so it cannot be scored")
        out.append(req)
    return out


def check_runnable(task: Task, generation: GenerationSettings, sandbox: Limits | None) -> None:
    """Refuse, before any model runs, a code task without leave to run its code, and samples it cannot score."""
    if task.program is not None and sandbox is None:
        raise TaskError(f"{task.name} runs the code the model writes: allow it with --allow_code_execution "
                        "(limited processes, not a security boundary: evaluate untrusted models in a container)")
    if generation.num_samples > 1 and task.program is None:
        raise TaskError(f"{task.name}: num_samples > 1 is for code tasks' pass@k; this task scores one completion "
                        "per prompt")


def run_task(model: nn.Module, tok: HFTokenizer, task: Task, examples: Sequence[Example], *,
             batch_tokens: int = 16384, generation: GenerationSettings | None = None,
             progress: Callable[[int], None] | None = None, stop_token_ids: Sequence[int] = (),
             sandbox: Limits | None = None) -> TaskResult:
    """Score `examples` of `task` with `model` (a temper Transformer, in eval mode).

    stop_token_ids: where generation ends besides the tokenizer's EOS (the checkpoint's, `temper.infer.load`).
    sandbox: the limits of the programs a code task runs; None refuses to run them (`check_runnable`).
    """
    if not examples:
        raise TaskError(f"{task.name}: no examples to evaluate (an empty task)")
    generation = generation or GenerationSettings()
    check_runnable(task, generation, sandbox)
    start = time.perf_counter()
    was_training = model.training
    model.eval()
    try:
        if task.kind == "multiple_choice":
            result = _multiple_choice(model, tok, task, examples, batch_tokens, progress)  # type: ignore[arg-type]
        else:
            result = _generate(model, tok, task, examples, generation, progress, stop_token_ids,
                               sandbox)  # type: ignore[arg-type]
    finally:
        model.train(was_training)
    result.seconds = time.perf_counter() - start
    return result


def _multiple_choice(model: nn.Module, tok: HFTokenizer, task: Task, examples: Sequence[MultipleChoice],
                     batch_tokens: int, progress: Callable[[int], None] | None) -> TaskResult:
    pairs = [ex.pairs() for ex in examples]
    requests = requests_for(tok, [p for ps in pairs for p in ps])
    done = [0, 0]  # requests scored, examples reported

    def advance(n: int) -> None:  # progress in examples, from the scorer's progress in requests
        done[0] += n
        now = done[0] * len(examples) // len(requests)
        if progress is not None and now > done[1]:
            progress(now - done[1])
            done[1] = now

    scores = score(model, requests, batch_tokens=batch_tokens, progress=advance)
    records, at = [], 0
    for ex, ps in zip(examples, pairs, strict=True):
        s = scores[at:at + len(ps)]
        at += len(ps)
        lls = [x.logprob for x in s]
        records.append({"doc_id": ex.doc_id, "gold": ex.gold, "logprobs": lls, "greedy": [x.greedy for x in s],
                        "truncated": max(x.truncated for x in s), **M.multiple_choice(lls, ex.gold, ex.norm_chars)})
    acc = [r["acc"] for r in records]
    conf = [r["confidence"] for r in records]
    values = {name: [r[name] for r in records] for name in task.mc_metrics}
    return TaskResult(
        task.name, len(records),
        metrics={**{k: M.mean(v) for k, v in values.items()}, "ece": M.expected_calibration_error(conf, acc)},
        stderr={**{k: M.mean_stderr(v) for k, v in values.items()},
                "ece": M.bootstrap_stderr(M.expected_calibration_error, [conf, acc])},
        examples=records, truncated=sum(r["truncated"] > 0 for r in records),
        extra={"calibration_bins": M.calibration_bins(conf, acc)},
    )


def generate_all(model: nn.Module, prompts: Sequence[list[int]], *, max_new_tokens: int, batch_size: int,
                 seed: int, stop_token_ids: Sequence[int] = (), stopped: Callable[[int, list[int]], bool] | None = None,
                 progress: Callable[[int], None] | None = None, **sampling: Any) -> list[list[int]]:
    """The new tokens of every prompt: prompts of similar length batched together (longest first),
    prompt i sampled with seed + i whatever its batch. `stopped(i, ids)` ends prompt i's row (stop strings)."""
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
    out: list[list[int]] = [[] for _ in prompts]
    for b in range(0, len(order), batch_size):
        rows = order[b:b + batch_size]
        should_stop = None if stopped is None else (lambda r, ids, rows=rows: stopped(rows[r], ids))
        with torch.no_grad():
            new = generate(model, [prompts[i] for i in rows], max_new_tokens=max_new_tokens,
                           stop_token_ids=stop_token_ids, should_stop=should_stop, seed=[seed + i for i in rows],
                           **sampling)
        for i, ids in zip(rows, new, strict=True):
            out[i] = ids
        if progress is not None:
            progress(len(rows))
    return out


def _generate(model: nn.Module, tok: HFTokenizer, task: Task, examples: Sequence[Generation],
              settings: GenerationSettings, progress: Callable[[int], None] | None,
              stop_token_ids: Sequence[int], sandbox: Limits | None) -> TaskResult:
    if task.score is None and not task.corpus_metrics and task.program is None:
        raise TaskError(f"{task.name}: a generative task needs a scorer, corpus metrics or a program")
    max_new = settings.max_new_tokens or task.max_new_tokens
    room = model.cfg.max_seq_len - max_new
    if room < 1:
        raise TaskError(f"{task.name}: max_new_tokens={max_new} leaves no room for a prompt in the model's "
                        f"context of {model.cfg.max_seq_len} tokens")
    prompts = [encode_text(tok, ex.prompt) for ex in examples]
    cut = [max(0, len(p) - room) for p in prompts]
    prompts = [p[c:] for p, c in zip(prompts, cut, strict=True)]
    # A stop string that is one special token (<|im_end|>) is decoded away by skip_special_tokens,
    # so it stops as a token id; lm-eval, which decodes with special tokens, stops there too.
    special = [i for i, t in tok.tokenizer.get_added_tokens_decoder().items() if t.special and t.content in task.stop]
    stop_ids = sorted({*special, *stop_token_ids, *([tok.eos_id] if tok.eos_id is not None else [])})
    decode = lambda ids: tok.decode(ids, skip_special_tokens=True)  # noqa: E731
    n = settings.num_samples  # sample j of prompt i is row i * n + j, with seed + i * n + j
    rows = [p for p in prompts for _ in range(n)]
    text_of = lambda r, ids: completion_text(decode, rows[r], ids)  # noqa: E731
    stopped = (lambda r, ids: cut_at_stop(text_of(r, ids), task.stop)[1]) if task.stop else None
    step = None if progress is None or n == 1 else _every(n, progress)  # progress in prompts, not rows
    outs = generate_all(model, rows, max_new_tokens=max_new, batch_size=settings.batch_size, seed=settings.seed,
                        stop_token_ids=stop_ids, stopped=stopped, progress=step or progress,
                        temperature=settings.temperature, top_p=settings.top_p)
    completions = [cut_at_stop(text_of(r, ids), task.stop)[0] for r, ids in enumerate(outs)]
    if task.program is not None:
        return _run_code(task, examples, completions, n, cut, sandbox)  # type: ignore[arg-type]  # not None: checked
    records = []
    for ex, text, c in zip(examples, completions, cut, strict=True):
        per = task.score(text, ex) if task.score is not None else {}
        records.append({"doc_id": ex.doc_id, "prompt_tokens_cut": c, "completion": text, "target": ex.target, **per})
    names = sorted({k for r in records for k, v in r.items() if isinstance(v, float)})
    values = {k: [r[k] for r in records] for k in names}
    result = TaskResult(task.name, len(records), {k: M.mean(v) for k, v in values.items()},
                        {k: M.mean_stderr(v) for k, v in values.items()}, records, truncated=sum(c > 0 for c in cut))
    if task.corpus_metrics:
        from temper.eval.text_metrics import corpus_metrics  # sacrebleu / rouge-score: only when asked for

        for name, (value, err) in corpus_metrics(task.corpus_metrics, completions,
                                                 [ex.target for ex in examples]).items():
            result.metrics[name], result.stderr[name] = value, err
    return result


def _every(n: int, progress: Callable[[int], None]) -> Callable[[int], None]:
    """A progress callback counting rows that reports whole prompts of n rows each."""
    rows = [0]

    def step(k: int) -> None:
        before, rows[0] = rows[0] // n, rows[0] + k
        if rows[0] // n > before:
            progress(rows[0] // n - before)

    return step


def _run_code(task: Task, examples: Sequence[Generation], completions: Sequence[str], n: int, cut: Sequence[int],
              sandbox: Limits) -> TaskResult:
    """Run every completion's program (`task.program`); pass@k of each problem over its n samples."""
    programs = [task.program(text, examples[r // n]) for r, text in enumerate(completions)]  # type: ignore[misc]
    outcomes = run_all(programs, sandbox)
    ks = [k for k in PASS_AT if k <= n]
    records = []
    for i, ex in enumerate(examples):
        mine = outcomes[i * n:(i + 1) * n]
        passed = sum(o.passed for o in mine)
        records.append({"doc_id": ex.doc_id, "prompt_tokens_cut": cut[i], "completions": list(completions[i * n:(i + 1) * n]),
                        "status": [o.status for o in mine], "detail": [o.detail for o in mine], "passed": passed,
                        **{f"pass@{k}": M.pass_at_k(n, passed, k) for k in ks}})
    values = {f"pass@{k}": [r[f"pass@{k}"] for r in records] for k in ks}
    statuses = [s for r in records for s in r["status"]]
    return TaskResult(task.name, len(records), {k: M.mean(v) for k, v in values.items()},
                      {k: M.mean_stderr(v) for k, v in values.items()}, records, truncated=sum(c > 0 for c in cut),
                      extra={"samples_per_problem": n, **{s: statuses.count(s) for s in ("passed", "failed", "timed out")}})


@dataclass
class TaskSuiteConfig:
    """Benchmark tasks run during training, their metrics logged next to the loss (kind "tasks")."""

    names: list[str] = field(default_factory=list)
    """Tasks as for `temper evaluate --tasks`: "arc_easy", or "arc_easy=path/to/file.jsonl"."""
    every: int = 0
    """Run them every N steps and at the end; 0: never."""
    limit: int | None = 200
    """Only the first N examples of each task (None: all): a quick signal during training."""
    num_fewshot: int | None = None
    """Solved examples before each question (None: each task's default)."""
    data_root: str = DEFAULT_DATA_ROOT
    """Where the tasks' default files are."""
    batch_tokens: int = 16384
    """Most tokens in one scoring forward pass."""
    allow_code_execution: bool = False
    """Let code tasks (humaneval, mbpp) run the code the model writes (`temper.sandbox`'s default limits)."""

    def __post_init__(self) -> None:
        if self.every < 0 or (self.limit is not None and self.limit < 1) or self.batch_tokens < 1:
            raise ValueError(f"every must be >= 0, limit and batch_tokens >= 1, got {self}")


class TaskSuite:
    """The tasks of a training run: read once at start (bad input fails before training), run on demand."""

    def __init__(self, cfg: TaskSuiteConfig, tok: HFTokenizer) -> None:
        from temper.eval.tasks import TaskOptions, load_task

        self.cfg, self.tok = cfg, tok
        self.sandbox = Limits() if cfg.allow_code_execution else None
        self.tasks = [load_task(name, cfg.data_root, TaskOptions(cfg.num_fewshot), cfg.limit) for name in cfg.names]
        for task, _ in self.tasks:
            check_runnable(task, GenerationSettings(), self.sandbox)

    def due(self, step: int, last_step: int) -> bool:
        return bool(self.tasks) and self.cfg.every > 0 and (step % self.cfg.every == 0 or step == last_step)

    def run(self, model: nn.Module) -> dict[str, float]:
        """{"task/metric": value} of every task; `model` is the bare (unwrapped) model."""
        out: dict[str, float] = {}
        for task, examples in self.tasks:
            r = run_task(model, self.tok, task, examples, batch_tokens=self.cfg.batch_tokens, sandbox=self.sandbox)
            out.update({f"{r.task}/{k}": v for k, v in r.metrics.items()})
        return out
