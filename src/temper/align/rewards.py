"""Rewards of whole responses: verifiable rules, a trained reward model, and their weighted sum.

A reward function maps (prompt messages, response text, the record's reference answer or None) to a
float. Best-of-n sampling ranks a prompt's candidates by it; GRPO and PPO train on it.

- Rules (`RULES`, by name), 1.0 or 0.0:
  - `gsm8k_strict`, `gsm8k_flexible`: the evaluation's two GSM8K metrics (`eval.tasks.gsm8k`'s
    exact_match_strict: the number after "#### "; exact_match_flexible: the last number-like run), on
    the response against the reference's final answer (the text after its last "####", or a bare
    number), so that a reward and a `temper evaluate` score agree on every completion.
  - `final_number`: the response's last number equals the reference's last number, as numbers
    (1e-6 relative): "72.0" earns the reward for "72", and punctuation near the number ("8..",
    "e.g., 12") does not hide it. lm-eval's flexible filter compares normalised strings instead,
    so there "72.0" != "72", "8.." is "8." and a trailing ".," is taken as the number.
  - `exact_match`: the response, stripped of spaces and one final ".", equals the reference, stripped
    the same way (case-sensitive).
  - `think_format`: "<think>reasoning</think>answer", exactly TRL's `think_format_reward` (DeepSeek-R1's
    format): the response opens with "<think>", has no second "<think>", and closes it; what follows
    may be empty, and a chat template that writes "<think>" into the prompt leaves the response without one.
  - `hash_answer_format`: GSM8K's "reasoning, then a last line '#### N'": some text, then "#### " and a
    number (the strict pattern's) at the start of the last line, with nothing after it and no other "####".
  - `code_tests`: the response's code (its last fenced block, as TRL's code reward reads it, or else the
    whole response) followed by the reference (assert statements) runs to its end in `temper.sandbox`:
    a limited process per response, a batch's responses in parallel. It runs what the model writes.
- A Python function of the user's (`function: "my_rewards.py:brevity"` or `"package.module:name"`), with
  the signature of a rule, imported when the run starts (TRL's `reward_funcs` as callables).
- `ModelReward`: a `model.heads.RewardModel` scoring the rendered conversation at its last token,
  through the reward model's own tokenizer and chat template (it need not share the policy's).
- `RewardConfig` / `build_rewards` / `Rewards`: several of them with weights; the total is
  sum(weight_i * r_i), and each component's values are returned too, for logging.

It does not check the arithmetic of a chain of thought, only its form and its final answer.
"""

from __future__ import annotations

import difflib
import importlib
import importlib.util
import math
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from temper.config import ConfigError
from temper.data.answers import exact_match_scores
from temper.data.sources import DataError
from temper.data.tokenizer import HFTokenizer, load_hf_tokenizer
from temper.model.heads import RewardModel, load_reward_model
from temper.sandbox import Limits, run_all

Messages = Sequence[Mapping[str, Any]]
RewardFn = Callable[[Messages, str, str | None], float]

_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")


def last_number(text: str) -> float | None:
    """The last number written in `text` (thousands commas allowed: "1,234.5"), or None."""
    found = _NUMBER.findall(text)
    if not found:
        return None
    try:
        return float(found[-1].replace(",", ""))
    except ValueError:
        return None


def _reference(rule: str, reference: str | None) -> str:
    """The reference a rule compares against; a record without one is bad input, not a zero reward."""
    if reference is None:
        raise DataError(f"the {rule} reward needs each record's reference answer (its 'answer' key); a record has none")
    return reference


def final_number(prompt: Messages, response: str, reference: str | None) -> float:
    """1.0 when the response's last number equals the reference's (within 1e-6), else 0.0."""
    want, got = last_number(_reference("final_number", reference)), last_number(response)
    return float(want is not None and got is not None and abs(want - got) <= 1e-6 * max(1.0, abs(want)))


def gsm8k_target(reference: str) -> str:
    """A GSM8K reference's final answer, as the evaluation reads its targets: the text after the last
    "####" of the full answer, or the whole (stripped) text when it is a bare number."""
    return reference.split("####")[-1].strip()


def _gsm8k(metric: str, rule: str, response: str, reference: str | None) -> float:
    target = gsm8k_target(_reference(rule, reference))
    return exact_match_scores(response, target)[metric]


def gsm8k_strict(prompt: Messages, response: str, reference: str | None) -> float:
    """The evaluation's GSM8K exact_match_strict: the first "#### N" of the response is the answer."""
    return _gsm8k("exact_match_strict", "gsm8k_strict", response, reference)


def gsm8k_flexible(prompt: Messages, response: str, reference: str | None) -> float:
    """The evaluation's GSM8K exact_match_flexible: the last number-like run of the response is the answer."""
    return _gsm8k("exact_match_flexible", "gsm8k_flexible", response, reference)


def _plain(text: str) -> str:
    text = text.strip()
    return text[:-1].rstrip() if text.endswith(".") else text


def exact_match(prompt: Messages, response: str, reference: str | None) -> float:
    """1.0 when the response is the reference, up to surrounding spaces and one final period."""
    return float(_plain(response) == _plain(_reference("exact_match", reference)))


THINK = re.compile(r"^<think>(?!.*<think>)(.*?)</think>.*$", re.DOTALL | re.MULTILINE)
"""TRL's `think_format_reward` pattern (trl/rewards/format_rewards.py), used with re.match."""
HASH_ANSWER = re.compile(r"(?s)(?!.*####.*####)\s*\S.*\n#### -?[0-9.,]*[0-9][0-9.,]*\s*")
"""Reasoning, then one last line "#### N" (a number the strict GSM8K filter reads), used with fullmatch."""


def think_format(prompt: Messages, response: str, reference: str | None = None) -> float:
    """1.0 when the response is "<think>reasoning</think>answer" (TRL's think_format_reward), else 0.0."""
    return float(THINK.match(response) is not None)


def hash_answer_format(prompt: Messages, response: str, reference: str | None = None) -> float:
    """1.0 when the response is reasoning followed by a last line "#### N" (GSM8K's format), else 0.0."""
    return float(HASH_ANSWER.fullmatch(response) is not None)


FENCED = re.compile(r"```[ \t]*(?:python3?|py)?[ \t]*\n(.*?)```", re.DOTALL | re.IGNORECASE)
"""A fenced code block, untagged or tagged Python; its body is group 1."""


def response_code(response: str) -> str:
    """The code a response gives: its last fenced block (TRL's code reward reads the last ```python block), or
    the whole response when it has none (a completion that is only code)."""
    blocks = FENCED.findall(response)
    return blocks[-1] if blocks else response


class CodeTests:
    """The `code_tests` rule: 1.0 when the response's code, then the record's tests (its reference: assert
    statements), runs to its end in `temper.sandbox` (its default limits), else 0.0. `score_many` runs a
    batch in parallel."""

    def __call__(self, prompt: Messages, response: str, reference: str | None) -> float:
        return self.score_many([response], [reference])[0]

    def score_many(self, responses: Sequence[str], references: Sequence[str | None]) -> list[float]:
        programs = [response_code(r) + "\n" + _reference("code_tests", a) for r, a in zip(responses, references,
                                                                                         strict=True)]
        return [float(o.passed) for o in run_all(programs, Limits())]


RULES: dict[str, RewardFn] = {
    "gsm8k_strict": gsm8k_strict,
    "gsm8k_flexible": gsm8k_flexible,
    "final_number": final_number,
    "exact_match": exact_match,
    "think_format": think_format,
    "hash_answer_format": hash_answer_format,
    "code_tests": CodeTests(),
}
NEEDS_ANSWER = frozenset({"gsm8k_strict", "gsm8k_flexible", "final_number", "exact_match", "code_tests"})
"""The rules that compare against each record's reference `answer` (a recipe checks its records up front)."""


class ModelReward:
    """The score a reward model gives the conversation prompt + response, read at its last token."""

    def __init__(self, model: RewardModel, tokenizer: HFTokenizer, device: torch.device | str = "cpu"):
        self.model, self.tokenizer, self.device = model.to(device).eval(), tokenizer, torch.device(device)

    @torch.no_grad()
    def __call__(self, prompt: Messages, response: str, reference: str | None = None) -> float:
        return self.score_many([(prompt, response)])[0]

    @torch.no_grad()
    def score_many(self, items: Sequence[tuple[Messages, str]], batch_size: int | None = None) -> list[float]:
        """Scores of several (prompt, response) conversations, in right-padded batches of `batch_size`
        (None: one batch)."""
        rows = [self.tokenizer.encode_chat([*p, {"role": "assistant", "content": r}], add_generation_prompt=False)
                for p, r in items]
        step = batch_size or max(1, len(rows))
        return [s for lo in range(0, len(rows), step) for s in self._score_rows(rows[lo:lo + step])]

    def _score_rows(self, rows: list[list[int]]) -> list[float]:
        T = max(len(r) for r in rows)
        tokens = torch.zeros(len(rows), T, dtype=torch.long)
        for i, r in enumerate(rows):
            tokens[i, :len(r)] = torch.tensor(r)
        last = torch.tensor([len(r) - 1 for r in rows])
        return self.model(tokens.to(self.device), last=last.to(self.device)).tolist()


# ---- weighted combination ------------------------------------------------------------------------


@dataclass
class RewardConfig:
    rule: str = ""
    """A rule: gsm8k_strict, gsm8k_flexible, final_number, exact_match, code_tests (these need each record's `answer`; code_tests runs the response's code with it), think_format, hash_answer_format."""
    model: str = ""
    """Or a reward model's checkpoint directory (`temper reward`'s final/, or any one-label *ForSequenceClassification)."""
    function: str = ""
    """Or a Python function f(prompt_messages, response, answer) -> float: "file.py:name" or "package.module:name"."""
    weight: float = 1.0
    """Its weight in the total reward (0: computed and logged only; negative: a penalty)."""

    def __post_init__(self) -> None:
        if sum(map(bool, (self.rule, self.model, self.function))) != 1:
            raise ValueError("give exactly one of rule (a reward rule), model (a reward model's directory) and "
                             "function (file.py:name or module:name)")
        if self.function and (self.function.count(":") != 1 or not all(self.function.split(":"))):
            raise ValueError(f"function: {self.function!r} must be 'file.py:name' or 'package.module:name'")
        if self.rule and self.rule not in RULES:
            close = [r for r in RULES if r.startswith(self.rule)] or difflib.get_close_matches(self.rule, list(RULES), n=1)
            hint = f" (did you mean {' or '.join(map(repr, close))}?)" if close else ""
            raise ValueError(f"rule: unknown reward rule {self.rule!r}{hint}; the rules: {', '.join(RULES)}")
        if not math.isfinite(self.weight):
            raise ValueError(f"weight: must be a finite number, got {self.weight}")


class Rewards:
    """Weighted reward functions: total = sum(weight_i * r_i), with every component's values for logging.

    `parts` is [(name, weight, function)]; a `ModelReward` scores all responses in batches, `code_tests` runs
    them in parallel, any other rule scores them one by one.
    """

    def __init__(self, parts: Sequence[tuple[str, float, RewardFn]], batch_size: int | None = None):
        self.parts, self.batch_size = list(parts), batch_size

    @property
    def names(self) -> list[str]:
        return [name for name, _, _ in self.parts]

    @property
    def needs_answer(self) -> list[str]:
        """The rules here that need each record's reference `answer`."""
        return [name for name in self.names if name in NEEDS_ANSWER]

    def score_many(self, prompts: Sequence[Messages], responses: Sequence[str],
                   references: Sequence[str | None] | None = None) -> tuple[list[float], dict[str, list[float]]]:
        """(total reward of each response (n,), {component name: its unweighted values (n,)})."""
        n = len(responses)
        refs = [None] * n if references is None else list(references)
        if len(prompts) != n or len(refs) != n:
            raise ValueError(f"{len(prompts)} prompts, {n} responses and {len(refs)} references: one each")
        columns: dict[str, list[float]] = {}
        for name, _, fn in self.parts:
            if isinstance(fn, ModelReward):
                columns[name] = fn.score_many(list(zip(prompts, responses)), self.batch_size) if n else []
            elif isinstance(fn, CodeTests):
                columns[name] = fn.score_many(responses, refs)
            else:
                columns[name] = [float(fn(p, r, a)) for p, r, a in zip(prompts, responses, refs)]
        totals = [sum(w * columns[name][i] for name, w, _ in self.parts) for i in range(n)]
        return totals, columns


def _names(configs: Sequence[RewardConfig]) -> list[str]:
    """Each component's column name: the rule's, "model" for a single reward model, "model:<dirname>"
    (or "model:<path>" where two directories share a name) for several."""
    models = [c.model for c in configs if c.model]
    short = [Path(m).name for m in models]
    label = {m: "model" if len(models) == 1 else f"model:{s}" if short.count(s) == 1 else f"model:{m}"
             for m, s in zip(models, short)}
    return [c.rule or (f"function:{c.function.split(':')[1]}" if c.function else label[c.model]) for c in configs]


def load_function(spec: str) -> RewardFn:
    """The callable `spec` names: "path/to/file.py:name" (the file run as a module) or "package.module:name"."""
    where, name = spec.split(":")
    try:
        if where.endswith(".py"):
            path = Path(where)
            if not path.is_file():
                raise ConfigError(f"function: {where} is not a file")
            loader = importlib.util.spec_from_file_location(f"temper_reward_{path.stem}", path)
            module = importlib.util.module_from_spec(loader)
            loader.loader.exec_module(module)
        else:
            module = importlib.import_module(where)
    except ImportError as e:
        raise ConfigError(f"function: cannot import {where}: {e}") from None
    fn = getattr(module, name, None)
    if not callable(fn):
        raise ConfigError(f"function: {where} has no function {name!r}")
    return fn


def build_rewards(configs: Sequence[RewardConfig], device: torch.device | str = "cpu",
                  batch_size: int | None = 32) -> Rewards:
    """The weighted rewards of `configs`: every config checked before any reward model is loaded."""
    if not configs:
        raise ConfigError("rewards: give at least one reward: --rewards='[{rule: gsm8k_flexible, weight: 1}]' "
                          "or a reward model {model: DIR}")
    names = _names(configs)
    for i, name in enumerate(names):
        if name in names[:i]:
            raise ConfigError(f"rewards[{i}]: {name} is given twice; give it once with the summed weight")
    for i, c in enumerate(configs):
        if c.model and not Path(c.model).is_dir():
            raise ConfigError(f"rewards[{i}].model: {c.model} is not a directory (a reward model's checkpoint)")
    parts: list[tuple[str, float, RewardFn]] = []
    for i, (c, name) in enumerate(zip(configs, names)):
        if c.rule:
            parts.append((name, c.weight, RULES[c.rule]))
            continue
        if c.function:
            try:
                parts.append((name, c.weight, load_function(c.function)))
            except ConfigError as e:
                raise ConfigError(f"rewards[{i}].{e}") from None
            continue
        tokenizer = load_hf_tokenizer(c.model)
        if not tokenizer.chat_templates:
            raise ConfigError(f"rewards[{i}].model: {c.model}'s tokenizer has no chat template to render the conversation")
        parts.append((name, c.weight, ModelReward(load_reward_model(c.model), tokenizer, device)))
    return Rewards(parts, batch_size)
