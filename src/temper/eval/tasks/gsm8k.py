"""GSM8K (Cobbe et al. 2021): grade-school math word problems, answered by a generated chain of thought.

Two tasks, each as lm-eval-harness 0.4.13 defines it (lm_eval/tasks/gsm8k/):
- `gsm8k` (gsm8k.yaml): prompt "Question: {question}\\nAnswer:", 5 solved training problems before
  it ("Question: ...\\nAnswer: {full answer with its <<calculator>> notes and '#### N'}" blocks,
  blank-line separated), drawn as lm-eval's default sampler draws them (`temper.eval.tasks.fewshot_draws`),
  a different 5 for each problem; generation stops at
  "Question:", "</s>" or "<|im_end|>". Strict answer: the number after "#### ".
- `gsm8k_cot` (gsm8k-cot.yaml): prompt "Q: {question}\\nA:" after the 8 fixed chain-of-thought
  exemplars of Wei et al. 2022 ("Q: ...\\nA: ... The answer is N."), in their order (lm-eval's
  first_n sampler); generation stops at "Q:", "</s>" or "<|im_end|>". Strict answer: the number in
  "The answer is N.".
Both report lm-eval's two filters as metrics: `exact_match_strict` (the strict pattern, first match)
and `exact_match_flexible` (the last number of the completion). Before comparing, lm-eval's
`regexes_to_ignore` (",", "$", everything up to "#### ", a final ".") are deleted from prediction
and target alike and both are lower-cased (ignore_case); a completion with no match scores 0.

Reads the GSM8K layout (openai/grade-school-math, Hugging Face `openai/gsm8k` "main"), one JSON
object per problem: {"question": str, "answer": str ending "#### <number>"}. The target is the
text after the last "####". `gsm8k` takes its few-shot problems from `--fewshot_path`, or else from
train.jsonl.gz / train.jsonl beside the data file (as openai/grade-school-math ships them).

It does not check the arithmetic of the chain of thought, only the final number.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from temper.data.answers import STRICT, STRICT_COT, exact_match_scores
from temper.eval.tasks import (
    Generation,
    Task,
    TaskError,
    TaskOptions,
    fewshot_draws,
    field_of,
    read_records,
    with_shots,
)

# The 8 exemplars of Wei et al. 2022 (chain-of-thought prompting), as gsm8k-cot.yaml lists them.
COT_EXEMPLARS: tuple[tuple[str, str], ...] = (
    ("There are 15 trees in the grove. Grove workers will plant trees in the grove today. After they are done, "
     "there will be 21 trees. How many trees did the grove workers plant today?",
     "There are 15 trees originally. Then there were 21 trees after some more were planted. So there must have "
     "been 21 - 15 = 6. The answer is 6."),
    ("If there are 3 cars in the parking lot and 2 more cars arrive, how many cars are in the parking lot?",
     "There are originally 3 cars. 2 more cars arrive. 3 + 2 = 5. The answer is 5."),
    ("Leah had 32 chocolates and her sister had 42. If they ate 35, how many pieces do they have left in total?",
     "Originally, Leah had 32 chocolates. Her sister had 42. So in total they had 32 + 42 = 74. After eating 35, "
     "they had 74 - 35 = 39. The answer is 39."),
    ("Jason had 20 lollipops. He gave Denny some lollipops. Now Jason has 12 lollipops. How many lollipops did "
     "Jason give to Denny?",
     "Jason started with 20 lollipops. Then he had 12 after giving some to Denny. So he gave Denny 20 - 12 = 8. "
     "The answer is 8."),
    ("Shawn has five toys. For Christmas, he got two toys each from his mom and dad. How many toys does he have "
     "now?",
     "Shawn started with 5 toys. If he got 2 toys each from his mom and dad, then that is 4 more toys. 5 + 4 = 9. "
     "The answer is 9."),
    ("There were nine computers in the server room. Five more computers were installed each day, from monday to "
     "thursday. How many computers are now in the server room?",
     "There were originally 9 computers. For each of 4 days, 5 more computers were added. So 5 * 4 = 20 "
     "computers were added. 9 + 20 is 29. The answer is 29."),
    ("Michael had 58 golf balls. On tuesday, he lost 23 golf balls. On wednesday, he lost 2 more. How many golf "
     "balls did he have at the end of wednesday?",
     "Michael started with 58 golf balls. After losing 23 on tuesday, he had 58 - 23 = 35. After losing 2 more, "
     "he had 35 - 2 = 33 golf balls. The answer is 33."),
    ("Olivia has $23. She bought five bagels for $3 each. How much money does she have left?",
     "Olivia had 23 dollars. 5 bagels for 3 dollars each will be 5 x 3 = 15 dollars. So she has 23 - 15 dollars "
     "left. 23 - 15 is 8. The answer is 8."),
)


# ---- scoring: lm-eval's filters (data/answers.py) -------------------------------------------------


def score(completion: str, example: Generation) -> dict[str, float]:
    """`gsm8k`'s two exact-match metrics of one completion (1.0 or 0.0 each)."""
    return exact_match_scores(completion, example.target, STRICT)


def score_cot(completion: str, example: Generation) -> dict[str, float]:
    """`gsm8k_cot`'s two exact-match metrics of one completion (1.0 or 0.0 each)."""
    return exact_match_scores(completion, example.target, STRICT_COT)


# ---- reading -------------------------------------------------------------------------------------


def _problem(record: dict, where: str) -> tuple[str, str, str]:
    """(question, full answer, final answer) of one record."""
    question = field_of(record, where, "question")
    answer = field_of(record, where, "answer")
    if "####" not in answer:
        raise TaskError(f"{where}: field 'answer' has no '#### <number>' final answer")
    return question, answer, answer.split("####")[-1].strip()


def _fewshot_file(path: Path, options: TaskOptions) -> Path:
    if options.fewshot_path is not None:
        return Path(options.fewshot_path)
    for name in ("train.jsonl.gz", "train.jsonl"):
        if (path.parent / name).exists():
            return path.parent / name
    raise TaskError(f"gsm8k: few-shot problems come from the training split: put train.jsonl(.gz) beside {path}, "
                    "give --fewshot_path, or set num_fewshot=0")


def load(path: Path, options: TaskOptions) -> list[Generation]:
    records = read_records(path)
    problems = [_problem(r, where) for where, r in records]
    k = 5 if options.num_fewshot is None else options.num_fewshot  # gsm8k.yaml num_fewshot
    pool: list[tuple[dict[str, Any], tuple[str, str]]] = []
    if k:
        for where, r in read_records(_fewshot_file(Path(path), options)):
            q, a, _ = _problem(r, where)
            pool.append((r, (f"Question: {q}\nAnswer:", a)))
    # gsm8k names its few-shot split (train) apart from its test split, so lm-eval draws exactly
    # k per problem and never checks for the problem itself.
    shots = fewshot_draws(pool, k, options.seed, [r for _, r in records], exclude_question=False)
    return [Generation(doc_id=i, prompt=with_shots(shots[i], f"Question: {q}\nAnswer:"), target=t)
            for i, (q, _, t) in enumerate(problems)]


def load_cot(path: Path, options: TaskOptions) -> list[Generation]:
    problems = [_problem(r, where) for where, r in read_records(path)]
    k = len(COT_EXEMPLARS) if options.num_fewshot is None else options.num_fewshot
    if options.fewshot_path is not None:
        raise TaskError("gsm8k_cot: its exemplars are the 8 fixed ones of Wei et al.; --fewshot_path is not used")
    if k > len(COT_EXEMPLARS):
        raise TaskError(f"gsm8k_cot: num_fewshot={k} but there are only {len(COT_EXEMPLARS)} exemplars")
    shots = [(f"Q: {q}\nA:", a) for q, a in COT_EXEMPLARS[:k]]  # lm-eval's first_n sampler
    return [Generation(doc_id=i, prompt=with_shots(shots, f"Q: {q}\nA:"), target=t)
            for i, (q, _, t) in enumerate(problems)]


TASKS = [
    Task("gsm8k", "generate", load, data="gsm8k/test.jsonl",
         description="GSM8K math word problems, 5-shot from the training split (lm-eval gsm8k)",
         stop=("Question:", "</s>", "<|im_end|>"), max_new_tokens=256, score=score),
    Task("gsm8k_cot", "generate", load_cot, data="gsm8k/test.jsonl",
         description="GSM8K with the 8 chain-of-thought exemplars of Wei et al. (lm-eval gsm8k_cot)",
         stop=("Q:", "</s>", "<|im_end|>"), max_new_tokens=256, score=score_cot),
]
