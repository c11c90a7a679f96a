"""Rewards: verifiable rules (the evaluation's GSM8K match reused, exact match, TRL's think format, GSM8K's
"#### N" format), a reward model, and their weighted sum as the RL recipes call it; bad configs and
records missing their answer fail naming the key."""

import json
import re
import shutil
import typing
from dataclasses import dataclass, field, replace

import pytest
import torch

from temper import config
from temper.align.rewards import (
    NEEDS_ANSWER,
    RULES,
    ModelReward,
    RewardConfig,
    build_rewards,
    exact_match,
    final_number,
    gsm8k_flexible,
    gsm8k_strict,
    hash_answer_format,
    think_format,
)
from temper.config import ConfigError
from temper.data.tokenizer import HFTokenizer, load_hf_tokenizer, save_hf_tokenizer, train_tokenizer
from temper.errors import InputError
from temper.eval.tasks import TaskOptions
from temper.eval.tasks import gsm8k as gsm8k_task
from temper.model.config import PRESETS
from temper.model.heads import RewardModel, load_reward_model
from temper.model.hf.checkpoint import save_hf
from temper.model.transformer import Transformer
from temper.recipes.best_of_n import ScorerConfig
from tests.templates import CHATML

Q = [{"role": "user", "content": "What is 3 + 5?"}]


# ---- rules ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("response, reference, strict, flexible, final", [
    ("3 + 5 = 8\n#### 8", "#### 8", 1, 1, 1),
    ("3 + 5 = 8\n#### 8", "Add them: 3 + 5 = <<3+5=8>>8\n#### 8", 1, 1, 1),  # GSM8K's full answer text
    ("3 + 5 = 8\n#### 8", "8", 1, 1, 1),  # a bare number
    ("It costs $1,250 in all.\n#### 1,250", "1250", 1, 1, 1),  # commas
    ("It costs $1,250.", "#### 1250", 0, 1, 1),  # "$" and a final "." are ignored by the flexible filter
    ("She ends at -3 degrees.\n#### -3", "-3", 1, 1, 1),  # negative numbers
    ("#### -3", "3", 0, 0, 0),
    ("The answer is 8.", "#### 8", 0, 1, 1),  # no "####": only the flexible match and final_number
    ("#### 8\nbut then 9", "8", 1, 0, 0),  # strict takes the first "####", flexible the last number
    ("3 + 5 = 9\n#### 9", "8", 0, 0, 0),
    ("so 8.0 in all", "8", 0, 0, 1),  # final_number compares numbers, lm-eval's filter strings
    ("answer: 8..", "8", 0, 0, 1),
    ("no number here", "8", 0, 0, 0),
])
def test_gsm8k_rules_and_final_number(response, reference, strict, flexible, final):
    assert gsm8k_strict(Q, response, reference) == strict
    assert gsm8k_flexible(Q, response, reference) == flexible
    assert final_number(Q, response, reference) == final


def test_gsm8k_rules_equal_the_evaluations_metrics_on_real_completions(shared_data):
    """On GSM8K's own worked answers (and the same answers ending "The answer is N." or with a wrong
    final line) the rules give exactly `temper evaluate`'s exact_match_strict / _flexible, the rule
    reading the record's full `answer` text as the reference."""
    path = shared_data / "gsm8k" / "test.jsonl"
    records = [json.loads(x) for x in path.read_text(encoding="utf-8").splitlines()[:24]]
    examples = gsm8k_task.load_cot(path, TaskOptions(num_fewshot=0))[:24]
    seen = set()
    for i, (record, example) in enumerate(zip(records, examples)):
        worked, final = record["answer"].rsplit("####", 1)
        for completion in (record["answer"], f"{worked}The answer is {final.strip()}.",
                           f"{worked}#### {final.strip()}1", records[i - 1]["answer"]):
            want = gsm8k_task.score(completion, example)
            got = (gsm8k_strict(Q, completion, record["answer"]), gsm8k_flexible(Q, completion, record["answer"]))
            assert got == (want["exact_match_strict"], want["exact_match_flexible"]), completion
            seen.add(got)
    assert {(1.0, 1.0), (0.0, 1.0), (0.0, 0.0)} <= seen


@pytest.mark.parametrize("response, reference, want", [
    ("Paris", "Paris", 1), ("  Paris.\n", "Paris", 1), ("Paris", "Paris.", 1), ("paris", "Paris", 0),
    ("Paris, France", "Paris", 0), ("", "Paris", 0), ("42", "42", 1),
])
def test_exact_match(response, reference, want):
    assert exact_match(Q, response, reference) == want


THINK_CASES = [
    "<think>\nThis is my reasoning.\n</think>\nThis is my answer.",
    "<think>\nThis is my reasoning.\nThis is my answer.",  # never closed
    "<think>a</think><think>b</think>c",  # a second <think>
    " <think>a</think>b",  # not at the start
    "Answer first <think>a</think>",
    "<think>a</think>",  # nothing after: TRL counts it
    "<think></think>\n8",
    "no tags",
]


def test_think_format_equals_trls_think_format_reward():
    format_rewards = pytest.importorskip("trl.rewards.format_rewards")
    want = format_rewards.think_format_reward([[{"content": c}] for c in THINK_CASES])
    assert [think_format(Q, c, None) for c in THINK_CASES] == want
    assert want[:3] == [1.0, 0.0, 0.0]


@pytest.mark.parametrize("response, want", [
    ("3 + 5 = 8\n#### 8", 1), ("3 + 5 = 8\n#### 8\n", 1), ("Total: $1,250.\n#### 1,250", 1),
    ("It drops.\n#### -3", 1),
    ("#### 8", 0),  # no reasoning before it
    ("3 + 5 = 8 #### 8", 0),  # not a line of its own
    ("3 + 5 = 8\n#### 8\nmore text", 0),  # not the last line
    ("3 + 5 = 8\n#### eight", 0), ("3 + 5 = 8\n#### $8", 0),  # no number the strict filter reads
    ("#### 7\n3 + 5 = 8\n#### 8", 0),  # two answers
    ("The answer is 8.", 0),
])
def test_hash_answer_format(response, want):
    assert hash_answer_format(Q, response, None) == want
    if want:  # whatever passes the format, the strict GSM8K rule can read
        assert gsm8k_strict(Q, response, response.split("#### ")[-1]) == 1


@pytest.mark.parametrize("name", sorted(NEEDS_ANSWER))
def test_rules_without_a_reference_name_the_answer_key(name):
    with pytest.raises(InputError, match=f"the {name} reward needs each record's reference answer .*'answer' key"):
        RULES[name](Q, "#### 8", None)


def test_format_rules_need_no_reference_and_best_of_n_offers_every_rule():
    assert set(RULES) - NEEDS_ANSWER == {"think_format", "hash_answer_format"}
    assert set(typing.get_args(typing.get_type_hints(ScorerConfig)["rule"])) == {"", *RULES}


TESTS = "assert double(2) == 4\nassert double(-3) == -6"
CODE_CASES = [
    ("Here it is:\n```python\ndef double(x):\n    return 2 * x\n```\nIt doubles.", 1.0),
    ("def double(x):\n    return x + x\n", 1.0),  # no fence: the whole response is the code
    ("First try:\n```python\ndef double(x):\n    return x\n```\nFixed:\n```\ndef double(x):\n    return 2*x\n```", 1.0),
    ("```python\ndef double(x):\n    return x * x\n```", 0.0),  # wrong: an assert fails
    ("```python\nimport sys\nsys.exit(0)\n```", 0.0),  # leaving before the tests is not passing them
    ("I cannot write that function.", 0.0),
]


def test_code_tests_runs_the_responses_last_code_block_then_the_reference_tests():
    rewards = build_rewards([RewardConfig(rule="code_tests", weight=2.0)])
    assert rewards.needs_answer == ["code_tests"]
    responses = [r for r, _ in CODE_CASES]
    totals, columns = rewards.score_many([Q] * len(responses), responses, [TESTS] * len(responses))
    assert columns["code_tests"] == [want for _, want in CODE_CASES]  # in order, though run in parallel
    assert totals == [2 * want for _, want in CODE_CASES]
    assert [RULES["code_tests"](Q, r, TESTS) for r in responses[:2]] == [1.0, 1.0]  # one at a time (best-of-n)


# ---- the weighted combination ---------------------------------------------------------------------


def _reward_model(root, seed: int):
    """A tiny random reward model with a ChatML tokenizer, in Hugging Face layout."""
    texts = ["What is 3 + 5? 3 + 5 = 8 #### 8 <think>reasoning</think> The answer is 8."] * 4
    tok = train_tokenizer(texts, "bpe", 300, ["<|endoftext|>", "<|im_start|>", "<|im_end|>"])
    hf_tok = HFTokenizer(tok, {"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"}, {"default": CHATML})
    cfg = replace(PRESETS["debug-llama"], vocab_size=tok.get_vocab_size(), tie_embeddings=False)
    torch.manual_seed(seed)
    rm = RewardModel(Transformer(cfg))
    save_hf(rm.backbone, cfg, root, generation_config={"pad_token_id": 0}, score=rm.head.score.weight)
    save_hf_tokenizer(hf_tok, root)
    return root


@pytest.fixture(scope="module")
def reward_models(tmp_path_factory):
    root = tmp_path_factory.mktemp("rms")
    return _reward_model(root / "a" / "final", 1), _reward_model(root / "rm_b", 2)


RESPONSES = ["<think>3 + 5</think>\n#### 8", "3 + 5 = 8\n#### 8", "The answer is 9.", "<think>hm</think>8", "x"]


def test_weighted_sum_of_rules_and_a_reward_model(reward_models):
    rm_dir, _ = reward_models
    cfgs = [RewardConfig(rule="gsm8k_flexible", weight=2.0), RewardConfig(model=str(rm_dir), weight=0.5),
            RewardConfig(rule="think_format", weight=-1.0)]
    rewards = build_rewards(cfgs, "cpu", batch_size=2)
    assert rewards.names == ["gsm8k_flexible", "model", "think_format"]
    assert rewards.needs_answer == ["gsm8k_flexible"]
    prompts, refs = [Q] * len(RESPONSES), ["#### 8"] * len(RESPONSES)
    totals, columns = rewards.score_many(prompts, RESPONSES, refs)
    assert columns["gsm8k_flexible"] == [1.0, 1.0, 0.0, 1.0, 0.0]
    assert columns["think_format"] == [1.0, 0.0, 0.0, 1.0, 0.0]
    alone = ModelReward(load_reward_model(rm_dir), load_hf_tokenizer(rm_dir))  # one response at a time
    assert columns["model"] == pytest.approx([alone(Q, r) for r in RESPONSES], abs=1e-5)
    assert len(set(columns["model"])) == len(RESPONSES)
    assert totals == pytest.approx([2 * f + 0.5 * m - t for f, m, t in
                                    zip(columns["gsm8k_flexible"], columns["model"], columns["think_format"])])
    assert rewards.score_many([], [], []) == ([], {name: [] for name in rewards.names})


def test_several_reward_models_are_named_by_directory(reward_models, tmp_path):
    a, b = reward_models
    rewards = build_rewards([RewardConfig(model=str(a)), RewardConfig(rule="exact_match"), RewardConfig(model=str(b))])
    assert rewards.names == ["model:final", "exact_match", "model:rm_b"]
    other = shutil.copytree(a, tmp_path / "other" / "final")
    assert build_rewards([RewardConfig(model=str(a)), RewardConfig(model=str(other))]).names == [
        f"model:{a}", f"model:{other}"]  # both .../final: their paths tell them apart


@dataclass
class _Recipe:  # how a recipe declares its rewards
    rewards: list[RewardConfig] = field(default_factory=lambda: [RewardConfig(rule="gsm8k_flexible")])
    """The rewards, weighted."""


def test_reward_list_parses_from_yaml_and_flags(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("rewards:\n  - rule: gsm8k_strict\n    weight: 2\n  - {rule: hash_answer_format, weight: 0.5}\n")
    want = [RewardConfig(rule="gsm8k_strict", weight=2.0), RewardConfig(rule="hash_answer_format", weight=0.5)]
    assert config.parse(_Recipe, ["--config", str(f)]).rewards == want
    flag = "--rewards=[{rule: gsm8k_strict, weight: 2}, {rule: hash_answer_format, weight: 0.5}]"
    assert config.parse(_Recipe, [flag]).rewards == want
    assert config.parse(_Recipe, []).rewards == [RewardConfig(rule="gsm8k_flexible")]


@pytest.mark.parametrize("flag, message", [
    ("--rewards=[{rule: gsm8k}]", "section 'rewards[0]': rule: unknown reward rule 'gsm8k' (did you mean "
                                  "'gsm8k_strict' or 'gsm8k_flexible'?); the rules: gsm8k_strict, gsm8k_flexible, final_number"),
    ("--rewards=[{rule: exact_match}, {rule: nope}]", "section 'rewards[1]': rule: unknown reward rule 'nope'; the"),
    ("--rewards=[{rule: exact_mach}]", "section 'rewards[0]': rule: unknown reward rule 'exact_mach' (did you mean "
                                       "'exact_match'?)"),
    ("--rewards=[{rule: exact_match, model: rm}]", "section 'rewards[0]': give exactly one of rule"),
    ("--rewards=[{weight: 2}]", "section 'rewards[0]': give exactly one of rule"),
    ("--rewards=[{rule: exact_match, weight: .nan}]", "section 'rewards[0]': weight: must be a finite number"),
    ("--rewards=[{rule: exact_match, wieght: 2}]", "unknown config key 'rewards[0].wieght' (did you mean"),
])
def test_bad_reward_configs_name_the_key(flag, message):
    with pytest.raises(config.ConfigError, match="^" + re.escape(message)):
        config.parse(_Recipe, [flag])


def test_build_rewards_rejects_empty_duplicate_and_missing_before_loading(tmp_path, reward_models):
    with pytest.raises(config.ConfigError, match="rewards: give at least one reward"):
        build_rewards([])
    with pytest.raises(config.ConfigError, match=r"rewards\[2\]: exact_match is given twice"):
        build_rewards([RewardConfig(rule="exact_match"), RewardConfig(rule="think_format"),
                       RewardConfig(rule="exact_match", weight=2)])
    with pytest.raises(config.ConfigError, match=r"rewards\[1\].model: .*missing is not a directory"):
        build_rewards([RewardConfig(model=str(reward_models[0])), RewardConfig(model=str(tmp_path / "missing"))])
    with pytest.raises(ValueError, match="2 prompts, 1 responses and 1 references"):
        build_rewards([RewardConfig(rule="exact_match")]).score_many([Q, Q], ["8"], ["8"])


def test_a_python_function_is_a_reward(tmp_path):
    f = tmp_path / "my_rewards.py"
    f.write_text("def brevity(prompt, response, answer):\n    return -len(response) / 10\n")
    scorer = build_rewards([RewardConfig(function=f"{f}:brevity", weight=2.0), RewardConfig(rule="exact_match")])
    totals, columns = scorer.score_many([[{"role": "user", "content": "q"}]] * 2, ["7", "seven"], ["7", "7"])
    assert columns == {"function:brevity": [-0.1, -0.5], "exact_match": [1.0, 0.0]}
    assert totals == pytest.approx([0.8, -1.0])
    assert build_rewards([RewardConfig(function="math:sqrt")]).names == ["function:sqrt"]
    with pytest.raises(ConfigError, match=r"rewards\[0\]\.function: .*no function 'nope'"):
        build_rewards([RewardConfig(function=f"{f}:nope")])
    with pytest.raises(ConfigError, match=r"rewards\[0\]\.function: .*not a file"):
        build_rewards([RewardConfig(function="missing.py:f")])
    with pytest.raises(ValueError, match="exactly one"):
        RewardConfig(rule="exact_match", function="math:sqrt")
