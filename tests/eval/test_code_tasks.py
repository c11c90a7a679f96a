"""HumanEval and MBPP: lm-eval-harness's prompts, stop strings and test programs; a model that writes the
right function passes and one that does not fails; pass@k over sampled completions; bad files refused."""

import json
import math
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from temper.eval.metrics import pass_at_k
from temper.eval.run import GenerationSettings, TaskSuite, TaskSuiteConfig, encode_text, run_task
from temper.eval.tasks import Generation, TaskError, TaskOptions, get_task
from temper.sandbox import Limits, run_python
from tests.eval.test_tasks import _lm_eval_task, _write

# HumanEval-format problems (openai_humaneval's fields), written for these tests.
HUMANEVAL = [
    {"task_id": "Test/0", "entry_point": "add",
     "prompt": 'def add(a: int, b: int) -> int:\n    """Return the sum of a and b.\n    >>> add(2, 3)\n    5\n    """\n',
     "canonical_solution": "    return a + b\n",
     "test": "\n\nMETADATA = {}\n\n\ndef check(candidate):\n    assert candidate(2, 3) == 5\n"
             "    assert candidate(-1, 1) == 0\n"},
    {"task_id": "Test/1", "entry_point": "is_palindrome",
     "prompt": 'def is_palindrome(text: str) -> bool:\n    """Whether text reads the same backwards.\n'
               '    >>> is_palindrome("aba")\n    True\n    """\n',
     "canonical_solution": "    return text == text[::-1]\n",
     "test": "def check(candidate):\n    assert candidate('aba') is True\n    assert candidate('ab') is False\n"},
]

# MBPP "full" rows (google-research-datasets/mbpp): task 11 of its test split, and one written for these tests.
MBPP = [
    {"task_id": 11, "text": "Write a python function to remove first and last occurrence of a given character from the "
                            "string.",
     "code": "def remove_Occ(s,ch): \r\n    for i in range(len(s)): \r\n        if (s[i] == ch): \r\n"
             "            s = s[0 : i] + s[i + 1:] \r\n            break\r\n    for i in range(len(s) - 1,-1,-1):  \r\n"
             "        if (s[i] == ch): \r\n            s = s[0 : i] + s[i + 1:] \r\n            break\r\n    return s ",
     "test_list": ['assert remove_Occ("hello","l") == "heo"', 'assert remove_Occ("abcda","a") == "bcd"',
                   'assert remove_Occ("PHP","P") == "H"'],
     "test_setup_code": "", "challenge_test_list": []},
    {"task_id": 9001, "text": "Write a function to double a number.", "code": "def double(x):\r\n  return 2 * x",
     "test_list": ["assert double(2) == 4", "assert double(-3) == -6", "assert double(0) == 0"],
     "test_setup_code": "", "challenge_test_list": []},
]


def _load(name: str, path: Path, **options) -> list[Generation]:
    return get_task(name).load(path, TaskOptions(**options))


def _lm_eval_code_task(monkeypatch, yaml_name: str, data: Path, cache: Path):
    """lm-eval's task from its YAML. Its utils.py loads the `code_eval` metric from the Hugging Face Hub when
    imported; these tests compare prompts and tests only, so `evaluate.load` gets a stand-in that runs nothing."""
    evaluate = pytest.importorskip("evaluate")

    class NoCodeEval:
        def compute(self, **kwargs):
            return [{"pass@1": 0.0}], {}

    monkeypatch.setattr(evaluate, "load", lambda *args, **kwargs: NoCodeEval())
    return _lm_eval_task(yaml_name, {"test": data}, cache)


@pytest.mark.parametrize("name,yaml_name,rows", [("humaneval", "humaneval/humaneval.yaml", HUMANEVAL),
                                                  ("mbpp", "mbpp/mbpp.yaml", MBPP)])
def test_prompts_stops_and_tests_equal_lm_eval(name, yaml_name, rows, tmp_path, monkeypatch):
    data = _write(tmp_path / "test.jsonl", rows)
    ours = _load(name, data)
    task, requests = _lm_eval_code_task(monkeypatch, yaml_name, data, tmp_path / "cache")
    assert len(ours) == len(requests) == len(rows)
    for ex, (theirs,), doc in zip(ours, requests, task.eval_docs, strict=True):
        prompt, kwargs = theirs
        assert ex.prompt == prompt
        assert tuple(kwargs["until"]) == get_task(name).stop
        assert ex.target == task.doc_to_target(doc)  # the tests code_eval appends to the prediction
    assert get_task(name).max_new_tokens == (1024 if name == "humaneval" else 256)  # max_gen_toks


def test_the_reference_solution_passes_and_a_wrong_one_fails(tmp_path):
    he = get_task("humaneval")
    for ex, row in zip(_load("humaneval", _write(tmp_path / "he.jsonl", HUMANEVAL)), HUMANEVAL, strict=True):
        assert run_python(he.program(row["canonical_solution"], ex)).passed
        assert not run_python(he.program("    return None\n", ex)).passed
    mbpp = get_task("mbpp")
    for ex, row in zip(_load("mbpp", _write(tmp_path / "mbpp.jsonl", MBPP)), MBPP, strict=True):
        assert run_python(mbpp.program(row["code"], ex)).passed
        assert run_python(mbpp.program("def nothing():\n  pass", ex)).detail.startswith("NameError")


def test_mbpp_reads_the_sanitized_layout_and_fewer_shots(tmp_path):
    sanitized = [{"task_id": 2, "prompt": "Write a function to double a number.", "code": "def double(x): return 2*x",
                  "test_list": ["assert double(2) == 4"], "test_imports": []}]
    (ex,) = _load("mbpp", _write(tmp_path / "s.jsonl", sanitized), num_fewshot=0)
    assert ex.prompt.startswith("You are an expert Python programmer, and here is your task: Write a function to "
                                "double a number. Your code should pass these tests:\n\nassert double(2) == 4\n[BEGIN]")
    assert ex.target == "assert double(2) == 4"
    (one,) = _load("mbpp", _write(tmp_path / "s.jsonl", sanitized), num_fewshot=1)
    assert one.prompt.count("[BEGIN]") == 2 and one.prompt.count("[DONE]") == 1


@pytest.mark.parametrize("name,rows,options,message", [
    ("humaneval", [HUMANEVAL[0], {k: v for k, v in HUMANEVAL[1].items() if k != "test"}], {}, ":2: missing field 'test'"),
    ("humaneval", [dict(HUMANEVAL[0], entry_point="add; import os")], {}, ":1: field 'entry_point' must be a function"),
    ("humaneval", HUMANEVAL, {"num_fewshot": 2}, "humaneval is zero-shot"),
    ("mbpp", [MBPP[0], dict(MBPP[1], test_list="assert double(2) == 4")], {}, ":2: field 'test_list' must be list"),
    ("mbpp", [dict(MBPP[0], test_list=[])], {}, ":1: field 'test_list' must be a non-empty list of strings"),
    ("mbpp", [{k: v for k, v in MBPP[0].items() if k != "text"}], {}, ":1: missing field 'text'"),
    ("mbpp", MBPP, {"num_fewshot": 4}, "only 3 solved problems"),
])
def test_bad_code_task_files_are_refused_naming_the_line(name, rows, options, message, tmp_path):
    with pytest.raises(TaskError, match=None) as e:
        _load(name, _write(tmp_path / "bad.jsonl", rows), **options)
    assert message in str(e.value)


@pytest.mark.parametrize("n", [1, 5, 20, 200])
def test_pass_at_k_is_the_unbiased_estimator_of_chen_et_al(n):
    for c in range(n + 1):
        for k in {1, 2, 10, n} & set(range(1, n + 1)):
            exact = 1 - math.comb(n - c, k) / math.comb(n, k)
            assert pass_at_k(n, c, k) == pytest.approx(exact, abs=1e-12)
    assert pass_at_k(n, 0, 1) == 0.0 and pass_at_k(n, n, 1) == 1.0
    with pytest.raises(ValueError):
        pass_at_k(n, 0, n + 1)


# ---- end to end ----------------------------------------------------------------------------------


def _memorised(checkpoint: Path, prompt_ids: list[int], answer_ids: list[int]):
    """The test checkpoint's model, trained until it continues `prompt_ids` with `answer_ids` greedily."""
    from temper.data.tokenizer import load_hf_tokenizer
    from temper.model.hf.checkpoint import load_hf

    model, _ = load_hf(checkpoint)
    seq = torch.tensor([prompt_ids + answer_ids])
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    torch.manual_seed(0)
    for _ in range(300):
        logits = model(seq[:, :-1])
        loss = torch.nn.functional.cross_entropy(logits[0, len(prompt_ids) - 1:], seq[0, len(prompt_ids):])
        if loss.item() < 0.01:
            break
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.01, "the model did not learn the answer"
    return model.eval(), load_hf_tokenizer(checkpoint)


def test_humaneval_end_to_end_a_model_that_writes_the_function_passes(checkpoint, tmp_path):
    from temper.data.tokenizer import load_hf_tokenizer

    tok = load_hf_tokenizer(checkpoint)
    task = get_task("humaneval")
    examples = _load("humaneval", _write(tmp_path / "he.jsonl", HUMANEVAL))
    # The answer as real code models write it: the body, then the next top-level definition (a stop string).
    answer = tok.encode(HUMANEVAL[0]["canonical_solution"] + "\n\ndef main():\n    pass", add_special_tokens=False)
    model, tok = _memorised(checkpoint, encode_text(tok, examples[0].prompt), answer)
    settings = GenerationSettings(max_new_tokens=40)

    with pytest.raises(TaskError, match="--allow_code_execution"):
        run_task(model, tok, task, examples, generation=settings)
    result = run_task(model, tok, task, examples, generation=settings, sandbox=Limits(timeout_s=5.0))
    first, second = result.examples
    assert first["completions"] == [HUMANEVAL[0]["canonical_solution"] + "\n"]  # cut before "\ndef main"
    assert (first["status"], first["passed"], first["pass@1"]) == (["passed"], 1, 1.0)
    assert second["status"] != ["passed"] and second["pass@1"] == 0.0  # it knows only add()
    assert result.metrics == {"pass@1": 0.5} and result.n == 2
    assert result.extra == {"samples_per_problem": 1, "passed": 1, "failed": second["status"].count("failed"),
                            "timed out": second["status"].count("timed out")}


def test_pass_at_k_over_sampled_completions_does_not_depend_on_the_batch(checkpoint, tmp_path):
    from temper.data.tokenizer import load_hf_tokenizer
    from temper.model.hf.checkpoint import load_hf

    model, _ = load_hf(checkpoint)
    tok = load_hf_tokenizer(checkpoint)
    task = replace(get_task("mbpp"), max_new_tokens=12)
    examples = _load("mbpp", _write(tmp_path / "mbpp.jsonl", MBPP), num_fewshot=0)
    sampled = GenerationSettings(temperature=1.0, num_samples=3, batch_size=6, seed=7)
    result = run_task(model, tok, task, examples, generation=sampled, sandbox=Limits(timeout_s=5.0))
    assert set(result.metrics) == {"pass@1"}  # pass@10 needs 10 samples
    for r in result.examples:
        assert len(r["completions"]) == len(r["status"]) == 3
        assert r["pass@1"] == r["passed"] / 3
    # sample j of prompt i has its own seed, so batching rows differently gives the same completions
    again = run_task(model, tok, task, examples, generation=replace(sampled, batch_size=2), sandbox=Limits())
    assert [r["completions"] for r in again.examples] == [r["completions"] for r in result.examples]
    assert len({c for r in result.examples for c in r["completions"]}) > 2  # sampled, not greedy

    with pytest.raises(ValueError, match="temperature > 0"):
        GenerationSettings(num_samples=2)
    with pytest.raises(TaskError, match="num_samples > 1 is for code tasks"):
        run_task(model, tok, get_task("gsm8k_cot"), [Generation(0, "Q: 1+1?\nA:", "2")], generation=sampled)


def test_tasks_during_training_run_code_only_when_allowed(checkpoint, tmp_path):
    from temper.data.tokenizer import load_hf_tokenizer

    tok = load_hf_tokenizer(checkpoint)
    spec = f"humaneval={_write(tmp_path / 'he.jsonl', HUMANEVAL)}"
    with pytest.raises(TaskError, match="--allow_code_execution"):
        TaskSuite(TaskSuiteConfig(names=[spec], every=10), tok)
    suite = TaskSuite(TaskSuiteConfig(names=[spec], every=10, allow_code_execution=True), tok)
    assert suite.sandbox == Limits()


def test_evaluate_recipe_refuses_code_tasks_before_loading_the_model(checkpoint, tmp_path, capsys):
    from temper.recipes import evaluate

    data = _write(tmp_path / "he.jsonl", HUMANEVAL)
    code = evaluate.main([f"--checkpoint={checkpoint}", f"--tasks=[humaneval={data}]", f"--out={tmp_path / 'out'}",
                          "--progress=false"])
    assert code == 2 and "--allow_code_execution" in capsys.readouterr().err
    code = evaluate.main([f"--checkpoint={checkpoint}", f"--tasks=[mbpp={_write(tmp_path / 'm.jsonl', MBPP)}]",
                          f"--out={tmp_path / 'out'}", "--progress=false", "--allow_code_execution=true",
                          "--generation.max_new_tokens=8", "--sandbox.timeout_s=5"])
    assert code == 0
    results = json.loads((tmp_path / "out" / "results.json").read_text())["results"]["mbpp"]
    assert results["n"] == 2 and set(results["metrics"]) == {"pass@1"}
    assert results["counts"]["samples_per_problem"] == 1
