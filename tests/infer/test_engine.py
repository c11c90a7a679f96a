"""KV-cache generation equals full recomputation, within the context and past it (nanoGPT's crop);
prefill / decode_step over the static cache equal a full forward and compile to one graph; a forked
prompt samples what separate runs with the same seeds sample; sampling is reproducible and its filters behave."""

from dataclasses import replace

import pytest
import torch
from torch._dynamo.testing import CompileCounter

from temper.infer.cache import new_cache, reset, select
from temper.infer.engine import (
    _inverse_cdf,
    apply_repetition_penalty,
    decode_step,
    filter_logits,
    generate,
    prefill,
    sample_next,
    seeded_uniform,
    stream,
)
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


@pytest.mark.parametrize("name", ["debug", "debug-llama", "experts"])
def test_cached_greedy_equals_full_recompute_batched(name):
    model = _model("debug-llama", n_experts=4, expert_ffn_dim=48) if name == "experts" else _model(name)
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


# ---- prefill / decode_step / fork ----------------------------------------------------------------

VARIANTS = {"debug": {}, "debug-llama": {}, "window": {"sliding_window": 5},  # window: Mistral's, on debug-llama
            # latent: DeepSeek-V3's attention, whose cache holds a latent and the rotated key part per token
            "latent": {"n_kv_heads": None, "head_size": 24, "rope_dim": 8, "kv_lora_rank": 16, "q_lora_rank": 24,
                       "v_head_size": 12}}


def _variant(name: str) -> Transformer:
    return _model("debug-llama" if name in ("window", "latent") else name, **VARIANTS[name])


@pytest.mark.parametrize("name", VARIANTS)
def test_decode_equals_full_recompute(name):
    """Rows of different lengths prefilled together, then decoded: every step's logits are a full forward's
    over that row alone (fp32 tolerance), and the greedy tokens agree wherever the top-2 margin exceeds it."""
    model, tol = _variant(name), 1e-4
    rows = [list(p) for p in PROMPTS]
    with torch.inference_mode():
        cache = new_cache(model, len(rows), 24)
        logits = prefill(model, cache, rows)
        for _ in range(10):
            for i, row in enumerate(rows):
                full = model(torch.tensor([row]))[0, -1]
                torch.testing.assert_close(logits[i], full, rtol=0, atol=tol)
                top2 = full.topk(2).values
                if top2[0] - top2[1] > tol:
                    assert int(logits[i].argmax()) == int(full.argmax())
            nxt = logits.argmax(-1)
            for row, t in zip(rows, nxt.tolist(), strict=True):
                row.append(t)
            assert cache.lengths.tolist() == [len(r) - 1 for r in rows]
            logits = decode_step(model, cache, nxt[:, None])


def test_rows_are_admitted_and_retired_independently():
    """Continuous batching: a row reset and refilled mid-decode computes what it would alone, and the
    rows beside it are untouched by its prefill."""
    model = _model("debug-llama")
    with torch.inference_mode():
        cache = new_cache(model, 3, 32)
        first = prefill(model, cache, PROMPTS[:2], rows=[0, 1])
        assert cache.lengths.tolist() == [8, 1, 0]
        toks = torch.stack([first.argmax(-1)[0], first.argmax(-1)[1], torch.tensor(0)])[:, None]
        for _ in range(3):
            out = decode_step(model, cache, toks)
            toks = out.argmax(-1, keepdim=True)
        before = cache.k[:, :2].clone(), cache.lengths[:2].clone()
        reset(cache, [2])
        late = prefill(model, cache, [PROMPTS[2]], rows=[2])  # admitted while rows 0 and 1 are mid-way
        assert torch.equal(cache.k[:, :2], before[0]) and torch.equal(cache.lengths[:2], before[1])
        torch.testing.assert_close(late[0], model(torch.tensor([PROMPTS[2]]))[0, -1], rtol=0, atol=1e-4)
        toks[2] = late.argmax(-1)
        out = decode_step(model, cache, toks)
        alone = model(torch.tensor([PROMPTS[2] + [int(toks[2])]]))[0, -1]
        torch.testing.assert_close(out[2], alone, rtol=0, atol=1e-4)


def test_decode_step_compiles_once_for_every_length():
    """fullgraph capture, and no recompilation as rows grow, restart or change (same cache shape)."""
    model = _model("debug-llama", sliding_window=6)
    counter = CompileCounter()
    step = torch.compile(decode_step, backend=counter, fullgraph=True)
    with torch.inference_mode():
        for _ in range(2):  # a second cache of the same shape reuses the graph
            cache = new_cache(model, 3, 32)
            logits = prefill(model, cache, PROMPTS)
            for i in range(8):
                if i == 4:
                    reset(cache, [1])
                    logits[1] = prefill(model, cache, [[9, 9, 9]], rows=[1])[0]
                expected = decode_step(model, select(cache, range(3)), logits.argmax(-1, keepdim=True))
                logits = step(model, cache, logits.argmax(-1, keepdim=True))
                torch.testing.assert_close(logits, expected, rtol=0, atol=1e-5)
    assert counter.frame_count == 1


def test_generate_with_a_compiled_step_equals_eager(monkeypatch):
    """generate(compile=...) drives the compiled decode step (here dynamo with the eager backend, as inductor
    would take minutes on a CPU test) and gets the eager engine's tokens, past the context too."""
    from temper.infer import engine

    counter = CompileCounter()
    monkeypatch.setitem(engine._COMPILED, "test", torch.compile(decode_step, backend=counter, fullgraph=True))
    model = _model("debug-llama", max_seq_len=16)
    kw = dict(max_new_tokens=30, temperature=0.7, seed=5, repetition_penalty=1.1)
    assert generate(model, PROMPTS, compile="test", **kw) == generate(model, PROMPTS, **kw)
    assert counter.frame_count == 1


def test_a_mixture_of_experts_is_refused_a_compiled_decode_step():
    """Its experts' rows are sized on the host each step: no one graph holds that; the flag is named."""
    from temper.config import ConfigError

    with pytest.raises(ConfigError, match="compile: a mixture of experts"):
        generate(_model("debug-llama", n_experts=4), PROMPTS, max_new_tokens=2, compile="test")


def test_forked_samples_equal_separate_runs():
    """One prefill forked into n rows (seeds s .. s+n-1) samples what n runs of the prompt alone do."""
    model = _model("debug-llama")
    kw = dict(max_new_tokens=12, temperature=1.0, top_k=40, top_p=0.9, repetition_penalty=1.2)
    forked = generate(model, PROMPTS[:2], num_samples=3, seed=100, **kw)
    separate = [generate(model, [p], seed=100 + 3 * i + j, **kw)[0] for i, p in enumerate(PROMPTS[:2]) for j in range(3)]
    assert forked == separate
    assert len({tuple(o) for o in forked}) == 6  # the samples differ
    assert generate(model, PROMPTS[:2], num_samples=3, seed=100, use_cache=False, **kw) == forked
    greedy = generate(model, PROMPTS[:1], num_samples=2, max_new_tokens=6, temperature=0)
    assert greedy[0] == greedy[1] == generate(model, PROMPTS[:1], max_new_tokens=6, temperature=0)[0]


def test_seeded_rows_do_not_depend_on_the_batch():
    model = _model("debug")
    kw = dict(max_new_tokens=10, temperature=0.9)
    together = generate(model, PROMPTS, seed=[7, 8, 9], **kw)
    assert together == [generate(model, [p], seed=s, **kw)[0] for p, s in zip(PROMPTS, [7, 8, 9], strict=True)]
    assert together == generate(model, PROMPTS, seed=7, **kw)  # an int seed s: row r gets s + r


def test_seeded_draws_follow_the_softmax():
    """The inverse CDF at a hashed uniform is a sample of softmax(logits / T): frequencies over many seeds."""
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0, 3.0]])
    n = 20000
    draws = sample_next(logits.expand(n, 5), temperature=1.5, seeds=torch.arange(n), step=3)
    freq = torch.bincount(draws, minlength=5).float() / n
    torch.testing.assert_close(freq, (logits[0] / 1.5).softmax(-1), rtol=0, atol=0.015)
    u = seeded_uniform(torch.arange(20000), 0)
    assert 0 < float(u.min()) and float(u.max()) < 1 and abs(float(u.mean()) - 0.5) < 0.01  # U(0, 1)
    assert abs(float(u.std()) - 12 ** -0.5) < 0.01 and u.unique().numel() == u.numel()
    assert seeded_uniform(torch.tensor([1]), 0) != seeded_uniform(torch.tensor([1]), 1)
    assert seeded_uniform(torch.tensor([1]), 0) != seeded_uniform(torch.tensor([2]), 0)


def test_seeded_draws_never_pick_a_filtered_token():
    """Top-k / top-p leave tokens of probability 0: no uniform number, the extremes included, lands on one."""
    logits = torch.tensor([[0.0, -float("inf"), 1.0, -float("inf")]]).expand(3, 4)
    assert _inverse_cdf(logits.softmax(-1), torch.tensor([0.0, 1 - 2**-53, 1.0], dtype=torch.float64)).tolist() == \
        [0, 2, 2]
    logits = torch.randn(4000, 30, generator=torch.Generator().manual_seed(0))
    draws = sample_next(logits, temperature=1.0, top_k=3, seeds=torch.arange(4000))
    assert (logits.topk(3, dim=-1).indices == draws[:, None]).any(-1).all()


def test_reading_tokens_every_few_steps_changes_nothing():
    """generate's sync_every (host reads of the tokens every k steps) gives the per-step result,
    stop ids and should_stop included, within the context and past it."""
    model = _model("debug", max_seq_len=16)
    ref = generate(model, PROMPTS, max_new_tokens=30, temperature=0)
    stop = ref[0][5]
    kw = dict(max_new_tokens=30, temperature=0.8, seed=3, stop_token_ids=[stop],
              should_stop=lambda i, t: i == 1 and len(t) == 7)
    assert generate(model, PROMPTS, sync_every=1, **kw) == generate(model, PROMPTS, sync_every=5, **kw)
    steps = list(stream(model, PROMPTS, max_new_tokens=30, temperature=0, stop_token_ids=[stop]))
    assert len(steps) <= 30 and all(len(s) == 3 for s in steps)


def test_per_row_steps_draw_what_each_row_draws_alone():
    """A server's rows are at different steps: a (B,) step tensor gives row b its draw at steps[b]."""
    logits = torch.randn(4, 50, generator=torch.Generator().manual_seed(0))
    seeds, steps = torch.tensor([1, 2, 3, 4]), torch.tensor([0, 5, 2, 9])
    together = sample_next(logits, temperature=0.9, top_k=20, top_p=0.9, seeds=seeds, step=steps)
    alone = [sample_next(logits[b : b + 1], temperature=0.9, top_k=20, top_p=0.9, seeds=seeds[b : b + 1],
                         step=int(steps[b])).item() for b in range(4)]
    assert together.tolist() == alone
