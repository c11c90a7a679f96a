"""Rollouts: the engine's log-probs equal a training forward's, stops are kept, samples depend on their seed only."""

from dataclasses import replace

import pytest
import torch

from temper.align.rl import token_logprobs_of
from temper.align.rollout import (
    RolloutConfig,
    collate_rollouts,
    logprob_mismatch,
    rollout,
)
from temper.data.tokenizer import HFTokenizer, train_tokenizer
from temper.infer.engine import generate, generate_with_logprobs
from temper.model.config import PRESETS
from temper.model.transformer import Transformer
from temper.train.losses import IGNORE_INDEX

TEXTS = ["the cat sat on the mat. the answer is 42.", "a dog ran far away; the answer is 7!"] * 20


@pytest.fixture(scope="module")
def tiny():
    tok = train_tokenizer(TEXTS, "bpe", 300, ["<|endoftext|>"])
    hf = HFTokenizer(tok, {"eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>"}, {})
    cfg = replace(PRESETS["debug-llama"], vocab_size=tok.get_vocab_size(), max_seq_len=96)
    torch.manual_seed(0)
    return Transformer(cfg), hf


def test_engine_logprobs_equal_a_training_forward(tiny):
    model, tok = tiny
    prompts = [tok.encode("the cat"), tok.encode("a dog ran far")]
    outs, lps = generate_with_logprobs(model, prompts, max_new_tokens=12, temperature=0.7, seed=3, num_samples=3)
    # the tokens are exactly what generate samples with the same seeds
    assert outs == generate(model, prompts, max_new_tokens=12, temperature=0.7, seed=3, num_samples=3)
    rollouts = rollout(model, tok, prompts, RolloutConfig(n=3, max_new_tokens=12, temperature=0.7),
                       seeds=range(3, 9), stop_ids=[])
    assert [r.completion for r in rollouts] == outs and [r.logprobs for r in rollouts] == lps
    batch = collate_rollouts(rollouts, pad_id=0)
    model.train()
    with torch.no_grad():
        fresh = token_logprobs_of(model, batch, temperature=0.7)
    scored = batch.targets != IGNORE_INDEX
    assert int(scored.sum()) == sum(len(o) for o in outs)
    torch.testing.assert_close(fresh[scored], batch.extra["old_logps"][scored], atol=1e-5, rtol=0)
    assert logprob_mismatch(model, batch, 0.7) < 1e-5
    assert model.training  # restored


def test_a_rollout_depends_on_its_seed_only(tiny):
    model, tok = tiny
    cfg = RolloutConfig(n=2, max_new_tokens=8)
    alone = rollout(model, tok, [tok.encode("the cat")], cfg, seeds=[10, 11], stop_ids=[])
    mixed = rollout(model, tok, [tok.encode("a dog"), tok.encode("the cat")], cfg, seeds=[5, 6, 10, 11], stop_ids=[])
    assert [r.completion for r in mixed[2:]] == [r.completion for r in alone]
    torch.testing.assert_close(torch.tensor(mixed[2].logprobs), torch.tensor(alone[0].logprobs), atol=1e-5, rtol=0)


def test_stop_tokens_are_kept_and_stop_strings_cut_the_text(tiny):
    model, tok = tiny
    prompt = [tok.encode("the cat")]
    free = rollout(model, tok, prompt, RolloutConfig(n=4, max_new_tokens=20), seeds=range(4), stop_ids=[])
    first = free[0].completion[2]  # make the third sampled token a stop token
    ended = rollout(model, tok, prompt, RolloutConfig(n=4, max_new_tokens=20), seeds=range(4), stop_ids=[first])
    assert ended[0].completion == free[0].completion[:free[0].completion.index(first) + 1]
    assert not ended[0].truncated and free[0].truncated
    assert len(ended[0].logprobs) == len(ended[0].completion)
    text = free[1].text
    stop = text[len(text) // 2: len(text) // 2 + 2]
    if stop.strip():
        cut = rollout(model, tok, prompt, RolloutConfig(n=4, max_new_tokens=20, stop=[stop]), seeds=range(4),
                      stop_ids=[])[1]
        assert stop not in cut.text and text.startswith(cut.text) and not cut.truncated
        assert cut.completion == free[1].completion[:len(cut.completion)]


def test_collate_lays_completions_on_the_targets(tiny):
    model, tok = tiny
    rs = rollout(model, tok, [tok.encode("the cat"), tok.encode("a")], RolloutConfig(n=1, max_new_tokens=5),
                 seeds=[0, 1], stop_ids=[])
    values = [[float(i)] * len(r.completion) for i, r in enumerate(rs)]
    b = collate_rollouts(rs, pad_id=0, advantages=values)
    for i, r in enumerate(rs):
        row = r.prompt + r.completion
        assert b.inputs[i, :len(row) - 1].tolist() == row[:-1]
        scored = b.targets[i] != IGNORE_INDEX
        assert b.targets[i][scored].tolist() == r.completion
        assert b.extra["advantages"][i][scored].tolist() == values[i]
        assert b.extra["old_logps"][i][~scored].abs().sum() == 0


def test_bad_rollout_settings_are_refused():
    with pytest.raises(ValueError, match="temperature"):
        RolloutConfig(temperature=0)
    with pytest.raises(ValueError, match="stop"):
        RolloutConfig(stop=[""])
