"""Greedy choices of two implementations compared only where rounding cannot decide them.

Two correct implementations (temper and transformers, PEFT or lm-eval) agree on float32 logits to
about 1e-6, not bit for bit: which BLAS or ATen kernel ran (AVX-512 or AVX2, Intel or AMD, MKL's
code path) moves the last bits. Where a step's two best logits are closer than that, greedy decoding
may pick either one, and every later token then follows different text. So greedy tokens are
compared token by token while each step's choice is decisive; a difference is accepted only at a
near-tie, and nothing after it is compared. Anything larger is a real mismatch and fails.
"""

from collections.abc import Callable, Sequence

import torch


def next_token_logits(forward: Callable[[torch.Tensor], torch.Tensor], prompt: Sequence[int],
                      tokens: Sequence[int]) -> torch.Tensor:
    """(len(tokens), V): `forward`'s logits for each of `tokens` given the prompt and the tokens
    before it, in one pass. `forward` maps ids (1, T) to logits (1, T, V)."""
    ids = torch.tensor([[*prompt, *tokens]])
    with torch.no_grad():
        return forward(ids)[0, len(prompt) - 1 : ids.shape[1] - 1].float()


def top2_margin(scores: Sequence[float] | torch.Tensor) -> float:
    """The gap between the best and second-best of `scores`: the most rounding that keeps the argmax."""
    top = torch.as_tensor(scores, dtype=torch.float64).topk(2).values
    return float(top[0] - top[1])


def assert_greedy_agrees(ours: Sequence[int], theirs: Sequence[int], logits: torch.Tensor, tol: float) -> int:
    """`ours` and `theirs`: two implementations' greedy tokens after the same prompt; `logits`
    (len(ours), V): one implementation's logits along `ours` (`next_token_logits`). The tokens must
    be equal wherever the step's choice is decisive; at the first step where they differ, both
    tokens must lie within `tol` of that step's top logit (a near-tie that rounding decides), and
    the rest, which follows different text, is not compared. Returns how many tokens agreed."""
    ours, theirs = list(ours), list(theirs)
    assert len(logits) >= min(len(ours), len(theirs)), (logits.shape, len(ours), len(theirs))
    for i, (a, b) in enumerate(zip(ours, theirs)):
        if a != b:
            top = logits[i].max()
            gaps = (float(top - logits[i, a]), float(top - logits[i, b]))
            assert max(gaps) <= tol, (f"greedy token {i}: {a} != {b}, which are {gaps[0]:.2e} and {gaps[1]:.2e} "
                                      f"below the top logit: not a near-tie within {tol:g}\nours:   {ours}\n"
                                      f"theirs: {theirs}")
            return i
    assert len(ours) == len(theirs), f"same tokens, different lengths\nours:   {ours}\ntheirs: {theirs}"
    return len(ours)
