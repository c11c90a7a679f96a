"""Speculative decoding is exact: greedy output equals the engine's plain greedy decoding (within the
context and past it, with a draft model or prompt lookup), and sampled tokens follow the target's own
distribution (chi-square against the exact marginals of the first and second token, fixed seeds)."""

from dataclasses import replace

import pytest
import torch

from temper.infer.cache import new_cache
from temper.infer.engine import filter_logits, generate, prefill
from temper.infer.speculative import (
    SpeculativeStats,
    _DraftModel,
    _PromptLookup,
    _Sampler,
    speculative_generate,
    speculative_stream,
)
from temper.model.config import PRESETS
from temper.model.transformer import Transformer

PROMPTS = [[5, 17, 9, 3, 42, 8, 8, 1], [7], [3, 1, 4, 1, 5, 9, 2, 6, 5, 3, 5] * 4]  # the last one exceeds the context


def _model(seed: int, vocab: int = 64, scale: float = 4.0, **changes) -> Transformer:
    torch.manual_seed(seed)
    model = Transformer(replace(PRESETS["debug-llama"], vocab_size=vocab, **changes))
    with torch.no_grad():  # sharper than init, so greedy paths branch on the prompt
        for p in model.parameters():
            p.mul_(scale)
    return model.eval()


@pytest.fixture(scope="module")
def target() -> Transformer:
    return _model(0, max_seq_len=32)


def test_prefill_all_logits_equals_a_full_forward(target):
    tokens = [5, 17, 9, 3, 42, 8]
    cache = new_cache(target, 1, 32)
    prefill(target, cache, [tokens[:2]])
    logits = prefill(target, cache, [tokens[2:]], all_logits=True)  # (4, V): after tokens 2..5
    full = target(torch.tensor([tokens]))[0, 2:]
    torch.testing.assert_close(logits, full, atol=1e-4, rtol=1e-4)
    assert cache.length == 6


@pytest.mark.parametrize("drafter", ["draft", "self", "lookup"])
def test_greedy_equals_plain_decoding(target, drafter):
    """Also past the context (32): 60 new tokens, and a 44-token prompt, cross the engine's window cuts."""
    kw = {"draft": {"draft": _model(1, max_seq_len=16, n_layers=1)}, "self": {"draft": target},
          "lookup": {"prompt_lookup": 2}}[drafter]
    for prompt in PROMPTS:
        plain = generate(target, [prompt], max_new_tokens=60, temperature=0)[0]
        for k in (1, 4):
            out, stats = speculative_generate(target, prompt, k=k, max_new_tokens=60, temperature=0, **kw)
            assert out == plain, (prompt, k)
            assert stats.tokens == 60 and stats.target_passes == 60 - stats.accepted
            if drafter == "self":  # the target drafting for itself: every draft accepted
                assert stats.acceptance_rate == 1.0 and stats.target_passes < 60 / k + 8


def test_latent_attention_speculates_exactly():
    """DeepSeek-V3's latent attention, whose cache holds a latent and the rotated key part per token: speculation
    (a smaller drafter of its kind, prompt lookup) rolls its cache back and forth and still decodes what plain greedy
    decoding does, past the context too."""
    latent = {"n_kv_heads": None, "head_size": 24, "rope_dim": 8, "kv_lora_rank": 16, "q_lora_rank": 24,
              "v_head_size": 12}
    target = _model(0, max_seq_len=32, **latent)
    for kw in ({"draft": _model(1, max_seq_len=16, n_layers=1, **latent)}, {"prompt_lookup": 2}):
        for prompt in PROMPTS:
            plain = generate(target, [prompt], max_new_tokens=40, temperature=0)[0]
            assert speculative_generate(target, prompt, k=4, max_new_tokens=40, temperature=0, **kw)[0] == plain


@pytest.mark.parametrize("kind", ["deltanet", "short-conv", "mamba"])  # (Mamba 2 keeps what Gated DeltaNet does: a
# state and the convolution's inputs, rolled back alike)
def test_linear_attention_speculates_exactly(kind):
    """Qwen3.5's Gated DeltaNet layers, LFM2's short convolutions and Mamba's layers, whose states cannot be cut back: a
    rejected draft sends target and draft model back to their states before the round and feeds the kept tokens
    again; what comes out is plain greedy decoding, past the context too, with drafters of either kind."""
    hybrid = {"deltanet": {"norm_unit_offset": True, "qk_norm": True, "rope_dim": 8, "attn_output_gate": True,
                           "full_attention_every": 2, "linear_key_heads": 2, "linear_value_heads": 4},
              "short-conv": {"qk_norm": True, "attention_layers": (1,), "linear_layer": "short_conv",
                             "linear_conv_size": 3},
              "mamba": {"attention_layers": (1,), "linear_layer": "mamba", "linear_key_heads": 1,
                        "linear_value_heads": 128, "linear_key_size": 8, "linear_value_size": 1}}[kind]
    target = _model(0, max_seq_len=32, n_layers=4, **hybrid)
    accepted = drafted = 0
    for kw in ({"draft": _model(1, max_seq_len=16, n_layers=2, **hybrid)}, {"draft": _model(1, max_seq_len=16)},
               {"draft": target}, {"prompt_lookup": 2}):
        for prompt in PROMPTS:
            plain = generate(target, [prompt], max_new_tokens=40, temperature=0)[0]
            out, stats = speculative_generate(target, prompt, k=4, max_new_tokens=40, temperature=0, **kw)
            assert out == plain
            accepted, drafted = accepted + stats.accepted, drafted + stats.drafted
    assert 0 < accepted < drafted  # drafts both kept and rejected
    # A hybrid draft model rolled back after one of its 4 drafts: its next drafts are its greedy continuation.
    draft = _model(1, max_seq_len=32, n_layers=2, **hybrid)
    drafter, sampler = _DraftModel(draft, 32), _Sampler(0.0, None, None, None, torch.device("cpu"))
    seq = PROMPTS[0]
    drafts, _ = drafter.propose(seq, 4, sampler)
    drafter.commit(len(seq), 1, 4)
    seq = [*seq, drafts[0], 11]
    assert drafter.propose(seq, 4, sampler)[0] == generate(draft, [seq], max_new_tokens=4, temperature=0)[0]


def test_prompt_lookup_drafts_what_followed_the_earliest_match():
    look = _PromptLookup(2)
    assert look.propose([1, 2, 3, 9, 1, 2, 4, 1, 2], 3, None)[0] == [3, 9, 1]  # the bigram [1, 2], first occurrence
    assert look.propose([5, 2, 7, 8, 1, 2], 3, None)[0] == [7, 8, 1]  # no earlier [1, 2]: the unigram [2]
    assert look.propose([1, 2, 3], 3, None)[0] == []  # nothing to copy
    assert look.propose([4, 4], 3, None)[0] == [4]  # a match just before the end copies what is left


def test_verify_keeps_drafts_the_target_agrees_with_then_adds_its_own_token():
    sampler = _Sampler(1.0, None, None, seed=0, device=torch.device("cpu"))
    logits = torch.full((3, 8), -30.0)
    logits[0, 2] = logits[1, 5] = logits[2, 7] = 0.0  # the target is sure: 2, then 5, then 7
    q = logits[:2].softmax(-1)
    assert sampler.verify(logits, [2, 5], q) == (2, 7)  # q = p: always accepted, then a token from p after both
    assert sampler.verify(logits, [2, 5], None) == (2, 7)  # point masses (prompt lookup) on what p is sure of
    assert sampler.verify(logits, [2, 4], None) == (1, 5)  # p(4) = 0: rejected, the residual is p without 4
    assert sampler.verify(logits, [3, 5], torch.full((2, 8), 1 / 8)) == (0, 2)  # residual max(0, p - q): 2 only
    greedy = _Sampler(0.0, None, None, seed=0, device=torch.device("cpu"))
    assert greedy.verify(logits, [2, 5], None) == (2, 7) and greedy.verify(logits, [2, 6], None) == (1, 5)


def _marginals(target: Transformer, prompt: list[int], temperature: float, **filters) -> torch.Tensor:
    """(3, V): the target's exact distributions of the first, second and third new token (filters applied),
    by enumerating every continuation of up to two tokens."""

    def probs(ids: list[list[int]]) -> torch.Tensor:
        with torch.no_grad():
            return filter_logits(target(torch.tensor(ids))[:, -1] / temperature, **filters).softmax(-1)

    V = target.cfg.vocab_size
    first = probs([prompt])[0]  # (V,)
    pairs = first[:, None] * probs([[*prompt, x] for x in range(V)])  # (V, V): p(x, y)
    after = probs([[*prompt, x, y] for x in range(V) for y in range(V)])  # (V * V, V): p(z | x, y)
    return torch.stack([first, pairs.sum(0), (pairs.reshape(-1, 1) * after).sum(0)])


def _chi2_pvalue(counts: torch.Tensor, probs: torch.Tensor) -> float:
    """Pearson's chi-square goodness of fit; tokens of probability 0 must never appear."""
    assert counts[probs == 0].sum() == 0
    seen = probs > 0
    expected = probs[seen] * counts.sum()
    stat = ((counts[seen] - expected) ** 2 / expected).sum()
    df = torch.tensor((int(seen.sum()) - 1) / 2, dtype=torch.float64)
    return float(torch.special.gammaincc(df, stat.double() / 2))


@pytest.mark.parametrize("drafter", ["draft", "lookup"])
def test_sampling_follows_the_target_distribution(drafter):
    """Tiny vocabulary (12), a draft far from the target (so drafts are often rejected), top-k and top-p on both.
    Two drafts then three tokens: the first two can be drafts, the third a token after every draft was kept."""
    small = dict(vocab=12, scale=2.0, n_layers=1, dim=32, n_heads=2, n_kv_heads=1, ffn_dim=64, max_seq_len=16)
    target = _model(0, **small)
    if drafter == "draft":
        prompt, kw = [3, 1, 4, 1, 5], {"draft": _model(1, **small)}
    else:  # the last bigram [6, 4] occurred before: drafts [4, 4], each of probability ~0.35 under the target
        prompt, kw = [6, 4, 4, 4, 6, 4], {"prompt_lookup": 2}
    filters = dict(temperature=0.9, top_k=8, top_p=0.95)
    exact = _marginals(target, prompt, **filters)  # (3, V)
    counts = torch.zeros(3, 12)
    total = SpeculativeStats()
    for seed in range(300):
        out, stats = speculative_generate(target, prompt, k=2, max_new_tokens=3, seed=seed, **kw, **filters)
        counts[[0, 1, 2], out] += 1
        total.drafted, total.accepted = total.drafted + stats.drafted, total.accepted + stats.accepted
    assert 0.1 < total.acceptance_rate < 0.9  # both paths, acceptance and rejection, ran often
    assert all(_chi2_pvalue(counts[i], exact[i]) > 1e-3 for i in range(3))
    if drafter == "draft":  # the test has power: the counts are far from the draft's own distribution
        q = _marginals(kw["draft"], prompt, **filters)[0]
        assert 0.5 * (counts[0] / 300 - q).abs().sum() > 0.25  # total variation; 0.34 from exact[0]


def test_seeds_reproduce_stop_tokens_end_and_stream_matches(target):
    draft = _model(1, max_seq_len=16, n_layers=1)
    kw = dict(draft=draft, k=3, max_new_tokens=20, temperature=1.0, top_k=20, seed=7)
    a, _ = speculative_generate(target, PROMPTS[0], **kw)
    assert speculative_generate(target, PROMPTS[0], **kw)[0] == a
    assert speculative_generate(target, PROMPTS[0], **(kw | {"seed": 8}))[0] != a
    stats = SpeculativeStats()
    assert list(speculative_stream(target, PROMPTS[0], stats=stats, **kw)) == a and stats.tokens == 20
    stop = a[5]
    cut, stats = speculative_generate(target, PROMPTS[0], stop_token_ids=[stop], **kw)
    assert cut == a[: a.index(stop)] and stats.tokens == len(cut)
    target.train()
    speculative_generate(target, PROMPTS[0], **kw)
    assert target.training and not draft.training  # modes restored
    target.eval()


def test_bad_arguments_are_clear(target):
    with pytest.raises(ValueError, match="one drafter"):
        speculative_generate(target, [1, 2], max_new_tokens=4)
    with pytest.raises(ValueError, match="one drafter"):
        speculative_generate(target, [1, 2], draft=target, prompt_lookup=2, max_new_tokens=4)
    with pytest.raises(ValueError, match="vocabulary"):
        speculative_generate(target, [1, 2], draft=_model(1, vocab=65), max_new_tokens=4)
    with pytest.raises(ValueError, match="k .* >= 1"):
        speculative_generate(target, [1, 2], prompt_lookup=2, k=0, max_new_tokens=4)
    with pytest.raises(ValueError, match="n-gram"):
        speculative_generate(target, [1, 2], prompt_lookup=0, max_new_tokens=4)
    with pytest.raises(ValueError, match="prompt token ids"):
        speculative_generate(target, [1, 64], prompt_lookup=2, max_new_tokens=4)
