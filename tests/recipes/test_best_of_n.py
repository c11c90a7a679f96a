"""`temper best-of-n`: n samples per prompt from one prefill, scored by a reward model or a rule, the
best written as SFT data that `temper sft` reads; sampling is batch-independent and bad prompts are
named by file:line."""

import json
from pathlib import Path

import pytest
import torch

from temper.__main__ import main as temper
from temper.align.rewards import ModelReward, final_number, last_number
from temper.data.tokenizer import load_hf_tokenizer, save_hf_tokenizer
from temper.infer.engine import generate
from temper.infer.load import load_for_inference
from temper.model.heads import RewardModel, load_reward_model
from temper.model.hf.checkpoint import save_hf
from temper.recipes import sft
from tests.recipes.conftest import HH

pytestmark = pytest.mark.skipif(not HH.exists(), reason=f"shared data not found at {HH}")
N = 3


@pytest.fixture(scope="module")
def setup(hh_base, tmp_path_factory):
    """The tiny policy, a random reward model with its tokenizer, and 4 prompts."""
    model_dir, _ = hh_base
    root = tmp_path_factory.mktemp("bon")
    policy = load_for_inference(model_dir)
    torch.manual_seed(5)
    rm = RewardModel(policy.model)
    rm_dir = root / "rm"
    save_hf(rm.backbone, policy.config, rm_dir, generation_config={"pad_token_id": 0}, score=rm.head.score.weight)
    save_hf_tokenizer(load_hf_tokenizer(model_dir), rm_dir)
    prompts = root / "prompts.jsonl"
    rows = [{"prompt": "How do I bake bread?"}, {"messages": [{"role": "user", "content": "Hi"},
                                                               {"role": "assistant", "content": "old reply"}]},
            {"question": "What is 2 + 3?", "answer": "#### 5"}, {"prompt": "Tell me a story."}]
    prompts.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return model_dir, rm_dir, prompts, root


def test_best_of_n_keeps_the_best_scored_sample_and_sft_reads_it(setup, tmp_path):
    model_dir, rm_dir, prompts, _ = setup
    out = tmp_path / "best.jsonl"
    assert temper(["best-of-n", f"--model={model_dir}", f"--prompts=[{prompts}]", f"--out={out}", f"--n={N}",
                   f"--scorer.model={rm_dir}", "--max_new_tokens=12", "--batch_prompts=3", "--seed=7"]) == 0
    kept = [json.loads(x) for x in out.read_text().splitlines()]
    assert [k["prompt_index"] for k in kept] == [0, 1, 2, 3] and all(k["rank"] == 1 for k in kept)
    assert kept[1]["messages"][:1] == [{"role": "user", "content": "Hi"}] and len(kept[1]["messages"]) == 2
    # Each prompt's samples are what a run of that prompt alone gives with the same row seeds, and the
    # kept one is the best of them under the reward model.
    policy = load_for_inference(model_dir)
    scorer = ModelReward(load_reward_model(rm_dir), load_hf_tokenizer(rm_dir))
    for i, k in enumerate(kept):
        prompt = k["messages"][:-1]
        alone = generate(policy.model, [policy.encode_chat(prompt)], max_new_tokens=12, temperature=1.0,
                         stop_token_ids=policy.stop_ids, seed=[7 + i * N + j for j in range(N)], num_samples=N)
        texts = [policy.tokenizer.decode(ids, skip_special_tokens=True) for ids in alone]
        scores = scorer.score_many([(prompt, t) for t in texts])
        assert k["messages"][-1]["content"] == texts[max(range(N), key=lambda j: (scores[j], -j))]
        assert k["score"] == pytest.approx(max(scores), abs=1e-5)
    # The file is SFT data as it is.
    assert sft.main([f"--model={model_dir}", f"--data.files=[{out}]", "--check", "--data.max_length=128"]) == 0


def test_keep_above_a_threshold_and_the_final_number_rule(setup, tmp_path, capsys):
    model_dir, _, _, root = setup
    gsm = root / "gsm.jsonl"
    gsm.write_text(json.dumps({"question": "What is 2 + 3?", "answer": "#### 5"}) + "\n")
    out = tmp_path / "above.jsonl"
    assert temper(["best-of-n", f"--model={model_dir}", f"--prompts=[{gsm}]", f"--out={out}", "--n=2",
                   "--scorer.rule=final_number", "--keep=above", "--threshold=1", "--max_new_tokens=4"]) == 0
    assert "1 prompts x 2 samples" in capsys.readouterr().out
    for k in map(json.loads, out.read_text().splitlines()):  # a random model rarely says 5; whatever it kept scored 1
        assert k["score"] == 1.0
    assert last_number("so 1,234.5 apples") == 1234.5 and last_number("none") is None
    assert final_number([], "The answer is 5.", "#### 5") == 1.0
    assert final_number([], "maybe 6", "#### 5") == 0.0


def test_bad_prompts_and_flags_are_one_line(setup, tmp_path, capsys):
    model_dir, rm_dir, _, _ = setup
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "ok"}\n{"text": "no prompt"}\n')
    base = ["best-of-n", f"--model={model_dir}", f"--out={tmp_path / 'o.jsonl'}", f"--scorer.model={rm_dir}"]
    assert temper([*base, f"--prompts=[{bad}]"]) == 2
    assert f"{bad}:2: prompt: a record needs 'prompt', 'messages' or 'question'" in capsys.readouterr().err
    good = tmp_path / "good.jsonl"
    good.write_text('{"prompt": "ok"}\n')
    assert temper([*base, f"--prompts=[{good}]", "--scorer.rule=final_number"]) == 2
    assert "exactly one of scorer.model" in capsys.readouterr().err
    assert temper(["best-of-n", f"--model={model_dir}", f"--out={tmp_path / 'o.jsonl'}", f"--prompts=[{good}]",
                   "--scorer.rule=final_number"]) == 2
    assert f"{good}:1: answer: the final_number rule needs each record's answer" in capsys.readouterr().err
    assert temper([*base, f"--prompts=[{good}]", "--temperature=0"]) == 2
    assert not (tmp_path / "o.jsonl").exists()


def test_model_reward_scores_a_conversation_as_the_reward_model_does(setup):
    model_dir, rm_dir, _, _ = setup
    rm, tok = load_reward_model(rm_dir), load_hf_tokenizer(rm_dir)
    conv = [{"role": "user", "content": "Hi"}]
    ids = tok.encode_chat([*conv, {"role": "assistant", "content": "Hello!"}])
    want = rm(torch.tensor([ids]), last=torch.tensor([len(ids) - 1])).item()
    assert ModelReward(rm, tok)(conv, "Hello!") == pytest.approx(want, abs=1e-6)
    assert Path(rm_dir, "config.json").exists()
