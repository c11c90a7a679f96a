"""KV-cache generation equals full recomputation, within the context and past it (nanoGPT's crop);
sampling is reproducible and its filters behave."""

from dataclasses import replace

import pytest
import torch

from temper.infer.engine import apply_repetition_penalty, filter_logits, generate, sample_next, stream
from temper.model.config import PRESETS
from temper.model.transformer import Transformer

PROMPTS = [[5, 17, 99, 3, 42, 8, 8, 1], [7], [200, 11, 12, 13]]  # different lengths: left padding


def _model(name: str, **changes) -> Transformer:
    torch.manual_seed(0)
    model = Transformer(replace(PRESETS[name], vocab_size=256, **changes))
    with torch.no_grad():  # sharper than init, so greedy paths branch on the prompt
        for p in model.parameters():
            p.mul_(4.0)
    return model.eval()


@pytest.mark.parametrize("name", ["debug", "debug-llama"])
def test_cached_greedy_equals_full_recompute_batched(name):
    model = _model(name)
    cached = generate(model, PROMPTS, max_new_tokens=12, temperature=0)
    full = generate(model, PROMPTS, max_new_tokens=12, temperature=0, use_cache=False)
    alone = [generate(model, [p], max_new_tokens=12, temperature=0)[0] for p in PROMPTS]
    assert cached == full == alone
    assert all(len(o) == 12 for o in cached) and len({tuple(o) for o in cached}) == 3


def test_sampling_reproducible_with_seed():
    model = _model("debug-llama")
    kw = dict(max_new_tokens=10, temperature=1.0, top_k=50, top_p=0.95, seed=123)
    a, b = generate(model, PROMPTS, **kw), generate(model, PROMPTS, **kw)
    assert a == b
    assert generate(model, PROMPTS, **(kw | {"seed": 124})) != a
    assert generate(model, PROMPTS, **kw, use_cache=False) == a  # same logits, same draws


def test_stop_tokens_hook_and_stream():
    model = _model("debug")
    ref = generate(model, PROMPTS, max_new_tokens=8, temperature=0)
    stop = ref[0][3]
    out = generate(model, PROMPTS, max_new_tokens=8, temperature=0, stop_token_ids=[stop])
    assert out[0] == ref[0][: ref[0].index(stop)]  # cut before the stop token, which is not returned
    hooked = generate(model, PROMPTS, max_new_tokens=8, temperature=0, should_stop=lambda i, toks: len(toks) == 2 + i)
    assert hooked == [r[: 2 + i] for i, r in enumerate(ref)]
    steps = list(stream(model, PROMPTS, max_new_tokens=8, temperature=0))
    assert [[s[i] for s in steps] for i in range(3)] == ref
    assert model.training is False


def test_top_k_top_p_filters():
    logits = torch.tensor([[1.0, 4.0, 3.0, 2.0]])
    assert torch.isinf(filter_logits(logits, top_k=2)).tolist() == [[True, False, False, True]]
    probs = torch.tensor([[0.05, 0.5, 0.3, 0.15]])
    kept = ~torch.isinf(filter_logits(probs.log(), top_p=0.7))
    assert kept.tolist() == [[False, True, True, False]]  # 0.5 + 0.3 is the smallest set reaching 0.7
    assert (~torch.isinf(filter_logits(probs.log(), top_p=0.01))).sum() == 1  # the top token always stays
    g = torch.Generator().manual_seed(0)
    draws = sample_next(logits.expand(200, 4), temperature=1.0, top_k=2, generator=g)
    assert set(draws.tolist()) == {1, 2}
    assert sample_next(logits, temperature=0).item() == 1


def test_repetition_penalty():
    logits = torch.tensor([[2.0, -2.0, 1.0]])
    seen = torch.tensor([[True, True, False]])
    out = apply_repetition_penalty(logits, seen, 2.0)
    assert out.tolist() == [[1.0, -4.0, 1.0]]
    model = _model("debug")
    prompt = [[1, 2, 3]]
    plain = generate(model, prompt, max_new_tokens=20, temperature=0)[0]
    assert len(set(plain)) < len(plain)  # greedy decoding of a random model repeats itself
    penalised = generate(model, prompt, max_new_tokens=20, temperature=0, repetition_penalty=1e6)[0]
    assert len(set(penalised)) == len(penalised) and not set(penalised) & {1, 2, 3}


def _reference(model: Transformer, prompt: list[int], n: int, margin: int) -> list[int]:
    """Greedy by full recomputation of each step's window, one prompt alone: with margin 0 the window is
    nanoGPT's crop `tokens[-max_seq_len:]`; else a full window is cut to its last max_seq_len - margin."""
    C, seq = model.cfg.max_seq_len, list(prompt)
    lo = max(0, len(seq) - C)
    for _ in range(n):
        if margin == 0:
            window = seq[-C:]
        else:
            lo = len(seq) - (C - margin) if len(seq) - lo > C else lo
            window = seq[lo:]
        logits = model(torch.tensor([window]))[0, -1]  # positions 0.. of the window
        seq.append(int(logits.argmax()))
    return seq[len(prompt) :]


@pytest.mark.parametrize("name", ["debug", "debug-llama"])
@pytest.mark.parametrize("margin", [0, None])
def test_generation_past_the_context_equals_cropped_recompute(name, margin):
    model = _model(name, max_seq_len=16)
    prompts = PROMPTS + [list(range(30, 50))]  # the last one is longer than the context
    n = 60  # several contexts' worth
    cached = generate(model, prompts, max_new_tokens=n, temperature=0, window_margin=margin)
    expected = [_reference(model, p, n, 4 if margin is None else margin) for p in prompts]  # None: 16 // 4
    assert cached == expected
    assert all(len(o) == n for o in cached) and len({tuple(o[-16:]) for o in cached}) == 4
    assert generate(model, prompts, max_new_tokens=n, temperature=0, window_margin=margin, use_cache=False) == expected
    assert generate(model, prompts[2:3], max_new_tokens=n, temperature=0, window_margin=margin) == expected[2:3]


def test_sampling_past_the_context_cached_equals_recompute_and_finished_rows():
    model = _model("debug", max_seq_len=16)
    kw = dict(max_new_tokens=50, temperature=1.0, top_k=50, seed=7)
    assert generate(model, PROMPTS, **kw) == generate(model, PROMPTS, **kw, use_cache=False)
    ref = generate(model, PROMPTS, max_new_tokens=50, temperature=0)
    hooked = generate(model, PROMPTS, max_new_tokens=50, temperature=0, should_stop=lambda i, t: i == 1 and len(t) == 5)
    assert hooked == [ref[0], ref[1][:5], ref[2]]  # a row that finished early does not disturb the others


def test_rejects_bad_requests():
    model = _model("debug")
    with pytest.raises(ValueError, match="window_margin"):
        generate(model, [[1] * 100], max_new_tokens=29, window_margin=128)
    with pytest.raises(ValueError, match="at least one token"):
        generate(model, [[]], max_new_tokens=1)
