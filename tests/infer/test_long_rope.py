"""LongRoPE (Phi-3.5, Phi-4-mini) takes its long table once a sequence passes the original length. Every decoding loop
(generate, the server's scheduler, speculative decoding) encodes a row again when it crosses that length, so each
token is what a fresh forward over its row gives, as transformers' Phi-3 drops its cache there; without that
re-encoding the cached rows would mix the two tables (checked below, so these tests cannot pass vacuously)."""

from dataclasses import replace

import pytest
import torch

from temper.infer import engine, scheduler
from temper.infer.engine import generate
from temper.infer.scheduler import Request, Scheduler
from temper.infer.speculative import speculative_generate
from temper.model.config import PRESETS
from temper.model.transformer import Transformer
from tests.infer.test_scheduler import Collector

ORIGINAL = 12
PROMPTS = [[5, 17, 40, 3], [7, 1, 9, 22, 31, 2, 8, 8, 60, 11], [20, 11, 12, 13] * 4]  # 4, 10 and 16 (already past)


@pytest.fixture(scope="module")
def model() -> Transformer:
    """Phi-4-mini's way on a tiny model: half of each head rotated, short and long stretches far apart."""
    torch.manual_seed(0)
    scaling = {"rope_type": "longrope", "short_factor": [1.0, 1.5, 2.0, 4.0], "long_factor": [2.0, 8.0, 30.0, 90.0],
               "factor": 4.0, "original_max_position_embeddings": ORIGINAL}
    model = Transformer(replace(PRESETS["debug-llama"], vocab_size=64, max_seq_len=48, rope_dim=8,
                                rope_scaling=scaling))
    with torch.no_grad():  # sharper than init, so greedy paths branch on the positions
        for p in model.parameters():
            p.mul_(4.0)
    return model.eval()


def _without_reencoding(monkeypatch: pytest.MonkeyPatch) -> None:
    for module in (engine, scheduler, __import__("temper.infer.speculative", fromlist=["x"])):
        monkeypatch.setattr(module, "crosses_long_rope", lambda *a: False)


def test_cached_generation_crossing_the_length_equals_fresh_forwards(model, monkeypatch):
    fresh = generate(model, PROMPTS, max_new_tokens=16, temperature=0, use_cache=False)
    assert generate(model, PROMPTS, max_new_tokens=16, temperature=0) == fresh
    assert [generate(model, [p], max_new_tokens=16, temperature=0)[0] for p in PROMPTS] == fresh
    _without_reencoding(monkeypatch)
    mixed = generate(model, PROMPTS, max_new_tokens=16, temperature=0)
    assert mixed[2] == fresh[2] and mixed[:2] != fresh[:2]  # the long prompt never crosses


def test_the_scheduler_encodes_a_crossing_row_again(model):
    sched = Scheduler(model, slots=2, max_queue=4)
    sched.start()
    try:
        runs = [(p, Collector()) for p in PROMPTS[:2]]
        for p, c in runs:
            sched.submit(Request(p, max_tokens=16, temperature=0.0), c)
        for p, c in runs:
            assert c.wait().tokens[0] == generate(model, [p], max_new_tokens=16, temperature=0, use_cache=False)[0]
    finally:
        sched.stop()


def test_speculative_verification_across_the_length_equals_plain_greedy(model):
    """Drafts verified in one pass that crosses the length: the row and its drafts are encoded again together."""
    for prompt in PROMPTS[:2]:
        plain = generate(model, [prompt], max_new_tokens=16, temperature=0, use_cache=False)[0]
        for k in (1, 4):
            out, _ = speculative_generate(model, prompt, k=k, max_new_tokens=16, temperature=0, draft=model)
            assert out == plain, (prompt, k)
