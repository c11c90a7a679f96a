"""Continuation log-likelihoods: the shared-context rows give what one plain forward per request gives."""

import random
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F

from temper.eval.loglik import Request, encode_pair, score
from temper.model.config import PRESETS
from temper.model.transformer import Transformer


def _model(name: str, **over) -> Transformer:
    torch.manual_seed(0)
    return Transformer(replace(PRESETS[name], **over)).eval()


def _reference(model: Transformer, r: Request) -> tuple[float, bool, int]:
    """lm-eval's computation, one request at a time, with the model's full logits."""
    L = model.cfg.max_seq_len
    whole = (r.context + r.continuation)[-(L + 1):]
    inp = torch.tensor([whole[:-1]])
    with torch.no_grad():
        lp = F.log_softmax(model(inp)[0].float(), -1)[-len(r.continuation):]
    cont = torch.tensor(r.continuation[-len(lp):])
    token_lp = lp.gather(-1, cont[:, None])[:, 0]
    return token_lp.sum().item(), bool((lp.argmax(-1) == cont).all()), len(r.context) + len(r.continuation) - len(whole)


def _requests(rng: random.Random, n_questions: int, vocab: int, max_ctx: int) -> list[Request]:
    out = []
    for _ in range(n_questions):
        ctx = tuple(rng.randrange(vocab) for _ in range(rng.randint(1, max_ctx)))
        for _ in range(rng.randint(1, 5)):  # choices share the context
            out.append(Request(ctx, tuple(rng.randrange(vocab) for _ in range(rng.randint(1, 9)))))
    rng.shuffle(out)
    return out


@pytest.mark.parametrize("name,over", [("debug", {}), ("debug-llama", {}), ("debug-llama", {"sliding_window": 16}),
                                       ("debug-qwen3.5", {})])  # linear attention: a continuation per row
def test_shared_rows_equal_one_forward_per_request(name, over):
    model = _model(name, **over)
    rng = random.Random(0)
    requests = _requests(rng, 30, model.cfg.vocab_size, 60)
    requests.append(Request((1, 2, 3), tuple(range(4, 140))))  # longer than the context: cut from the left
    requests.append(Request(tuple(range(100)), tuple(range(40))))
    scores = score(model, requests, batch_tokens=512)
    for r, s in zip(requests, scores, strict=True):
        lp, greedy, cut = _reference(model, r)
        assert s.logprob == pytest.approx(lp, rel=1e-5, abs=1e-4)
        assert (s.greedy, s.truncated) == (greedy, cut)
    assert [s.truncated for s in scores[-2:]] == [10, 11]


def test_greedy_flag_is_true_for_the_models_own_continuation():
    model = _model("debug-llama")
    ctx = (5, 6, 7)
    greedy = list(ctx)
    with torch.no_grad():
        for _ in range(4):
            greedy.append(int(model(torch.tensor([greedy]))[0, -1].argmax()))
    other = greedy[3:]
    other[-1] = (other[-1] + 1) % model.cfg.vocab_size
    a, b = score(model, [Request(ctx, tuple(greedy[3:])), Request(ctx, tuple(other))])
    assert a.greedy and not b.greedy and a.logprob > b.logprob


def test_encode_pair_moves_trailing_spaces_to_the_continuation():
    encode = lambda s: [ord(c) for c in s]  # noqa: E731
    assert encode_pair(encode, "Answer: ", "Paris") == Request(tuple(map(ord, "Answer:")), tuple(map(ord, " Paris")))
    with pytest.raises(ValueError, match="empty context"):
        encode_pair(encode, "", "x")


def test_empty_request_is_refused():
    with pytest.raises(ValueError, match="request 1"):
        score(_model("debug"), [Request((1,), (2,)), Request((1,), ())])


def test_scores_do_not_depend_on_how_many_rows_of_log_probabilities_are_made_at_once(monkeypatch):
    """The float32 log-softmax runs a chunk of rows at a time (`LOGPROB_CHUNK_BYTES`), so a large vocabulary never
    holds a batch's whole (N, V) log-probabilities: rows are independent, so chunks of 3 rows give the numbers of
    one chunk, bit for bit."""
    from temper.eval import loglik

    model = _model("debug-llama")
    requests = _requests(random.Random(1), 6, model.cfg.vocab_size, 12)
    whole = score(model, requests)
    monkeypatch.setattr(loglik, "LOGPROB_CHUNK_BYTES", 3 * 4 * model.cfg.vocab_size)
    assert score(model, requests) == whole
