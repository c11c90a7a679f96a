"""Speculative decoding: cheap drafts of k tokens, verified by the target in one pass, exactly.

Each round a drafter proposes up to k tokens after the sequence so far; the target scores the last
committed token and the k drafts in one `prefill(..., all_logits=True)` onto its cache row, which
gives its next-token distribution at k + 1 positions; the accepted drafts and one token of the
target's own are committed, and both caches roll back past the rest (a row's length set back; a model with linear
attention layers, whose states cannot be cut back, restores them from before the round and feeds the kept tokens
again).
Drafters:
  - a draft model (any checkpoint with the target's vocabulary, e.g. a `temper distill` student),
    with its own cache: a catch-up `prefill` of what it has not seen, then k - 1 `decode_step`s;
  - prompt lookup (Saxena 2023; transformers' `prompt_lookup_num_tokens`): the tokens that followed
    the earliest earlier occurrence of the last n tokens (n down to 1) in the prompt and output. No model.

Verification (Leviathan et al. 2023, Chen et al. 2023): greedy keeps the longest prefix of drafts
equal to the target's argmax, then the target's argmax, so the output is the target's greedy output
(the same logits up to rounding: a pass over k + 1 tokens may round differently from k + 1 one-token
steps, which can tip a near-tie in bfloat16; float32 tests match token for token).
Sampling accepts draft x with probability min(1, p(x) / q(x)) and, at the first rejection, draws from
normalize(max(0, p - q)) (after all k, from p): every token is distributed exactly as the target
samples it. p and q are softmax(filter_logits(logits / temperature, top_k, top_p)), the filters the
engine samples with; prompt lookup's q is a point mass on its draft.

Past the target's context it keeps the engine's windows (nanoGPT's crop, cut to max_seq_len -
window_margin tokens when full; see `temper.infer.engine`): a round never drafts across a cut, so
each token sees exactly the window plain decoding gives it. The draft model windows its own context
the same way; its windows only change how many drafts are accepted.

`Speculator` is one round (draft, verify, roll back) on a cache row its caller owns: `speculative_stream`
runs it on a row of its own; `temper serve`'s scheduler (`temper.infer.scheduler`) on a request's row
of the running batch while that request decodes alone.

One prompt at a time (batch 1: the latency mode of a server or of `temper generate`); sampled draws
come from one torch.Generator seeded with `seed` (reproducible, but not the engine's per-row Gumbel
draws: the same seed samples other text than plain decoding). It does not apply a repetition
penalty, decode text or handle stop strings (stop by leaving the stream).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from temper.infer.cache import linear_states, new_cache, reset, restore
from temper.infer.engine import (
    _check,
    crosses_long_rope,
    decode_step,
    filter_logits,
    prefill,
)
from temper.model.attention import KVCache
from temper.model.rope import long_rope_length

log = logging.getLogger(__name__)


@dataclass
class SpeculativeStats:
    """What speculative decoding did: drafts proposed and accepted, target passes, tokens generated."""

    drafted: int = 0
    """Draft tokens the target verified."""
    accepted: int = 0
    """Of those, the tokens kept."""
    target_passes: int = 0
    """Forward passes of the target after the prompt (each commits one token of its own, plus accepted drafts)."""
    tokens: int = 0
    """Tokens generated (a stop token not counted)."""

    @property
    def acceptance_rate(self) -> float:
        """accepted / drafted (0 when nothing was drafted)."""
        return self.accepted / self.drafted if self.drafted else 0.0

    def count(self, done: Round) -> None:
        """Add one round's drafts, acceptances and target pass (tokens are counted as they are yielded)."""
        self.drafted += done.drafted
        self.accepted += done.accepted
        self.target_passes += 1

    def describe(self) -> str:
        """One line for a log or a terminal."""
        return (f"accepted {self.accepted} of {self.drafted} drafted tokens ({100 * self.acceptance_rate:.1f}%); "
                f"{self.tokens} tokens in {self.target_passes} target passes")


@dataclass
class Round:
    """What one round committed: the accepted drafts then the target's own token, and the target's
    logits (len(tokens), V) each of them was drawn from (for log-probs)."""

    drafted: int
    accepted: int
    tokens: list[int]
    logits: torch.Tensor


class _Sampler:
    """Turns logits into probabilities and draws, the same way for the target and the draft."""

    def __init__(self, temperature: float, top_k: int | None, top_p: float | None, seed: int | None,
                 device: torch.device) -> None:
        self.temperature, self.top_k, self.top_p = temperature, top_k, top_p
        self.generator = torch.Generator(device=device)
        if seed is None:
            self.generator.seed()
        else:
            self.generator.manual_seed(seed)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def probs(self, logits: torch.Tensor) -> torch.Tensor:
        """(n, V) the distributions sampled from: softmax of the filtered, tempered logits (n, V)."""
        return filter_logits(logits / self.temperature, self.top_k, self.top_p).softmax(-1)

    def draw(self, probs: torch.Tensor) -> int:
        """One token from a distribution (V,)."""
        return int(torch.multinomial(probs, 1, generator=self.generator))

    def pick(self, logits: torch.Tensor) -> tuple[int, torch.Tensor | None]:
        """A draft token from logits (V,), and the distribution q (V,) it came from (None when greedy)."""
        if self.greedy:
            return int(logits.argmax()), None
        q = self.probs(logits[None])[0]
        return self.draw(q), q

    def verify(self, logits: torch.Tensor, drafts: list[int], q: torch.Tensor | None) -> tuple[int, int]:
        """(drafts accepted, the target's next token) from its logits (k + 1, V) after the last committed
        token and each draft; q (k, V): the draft's distributions (None: greedy, or point masses)."""
        k = len(drafts)
        if self.greedy:
            best = logits.argmax(-1).tolist()  # (k + 1,)
            n = next((i for i, x in enumerate(drafts) if best[i] != x), k)
            return n, best[n]
        p = self.probs(logits)  # (k + 1, V)
        if k == 0:
            return 0, self.draw(p[0])
        idx = torch.arange(k, device=p.device)
        x = torch.tensor(drafts, device=p.device)
        px = p[idx, x]
        qx = torch.ones_like(px) if q is None else q[idx, x]
        u = torch.rand(k, generator=self.generator, device=p.device)
        rejected = (u * qx >= px).tolist()  # accept x with probability min(1, p(x) / q(x))
        n = rejected.index(True) if True in rejected else k
        if n == k:
            return k, self.draw(p[k])  # every draft kept: one more token from the target
        q_n = torch.zeros_like(p[n]).index_fill_(0, x[n : n + 1], 1.0) if q is None else q[n]
        residual = (p[n] - q_n).clamp(min=0)
        # p == q up to rounding rejects with probability ~0; should it happen, p itself is the right draw.
        return n, self.draw(residual if float(residual.sum()) > 0 else p[n])


class _Target:
    """The target's cache row and window: it holds seq[start : cur - 1], the last token is fed next.

    The window for predicting token `cur` is seq[start:cur]; when it would exceed the context it is
    cut to its last `keep` tokens (the engine's rule, so the same tokens see the same windows)."""

    def __init__(self, model: nn.Module, prompt_len: int, total: int, margin: int) -> None:
        self.model = model
        self.context = model.cfg.max_seq_len
        self.keep = self.context - margin
        self.start = max(0, prompt_len - self.context)
        self.cache = new_cache(model, 1, min(self.context, total))

    def prefill_window(self, seq: list[int]) -> None:
        """Fill the (empty) row with seq[start : cur - 1]."""
        if len(seq) - 1 > self.start:
            prefill(self.model, self.cache, [seq[self.start : -1]])

    def room(self, seq: list[int]) -> int:
        """How many drafts this round may verify: cutting the window first if it is full."""
        cur = len(seq)
        if cur - self.start > self.context:
            self.start = cur - self.keep
            reset(self.cache, [0])
            self.prefill_window(seq)
        return self.context + self.start - cur


class _DraftModel:
    """A small model drafting with its own cache, which holds seq[start:fed]."""

    def __init__(self, model: nn.Module, total: int) -> None:
        self.model = model
        self.context = model.cfg.max_seq_len
        self.cache = new_cache(model, 1, min(self.context, total))
        self.start = self.fed = 0

    def limit(self) -> int:
        return self.cache.max_len

    def propose(self, seq: list[int], k: int, sampler: _Sampler) -> tuple[list[int], torch.Tensor | None]:
        """k drafts after seq and their distributions (k, V) (None when greedy)."""
        cur, size = len(seq), self.cache.max_len
        if cur - self.start + k - 1 > size:  # its window would overflow: cut, as the engine does
            width = max(1, min(self.context - self.context // 4, size - k + 1))
            self.start = self.fed = cur - width
            reset(self.cache, [0])
        logits = prefill(self.model, self.cache, [seq[self.fed : cur]])[0]  # what it has not seen yet
        self.saved = linear_states(self.cache, 0), cur  # linear layers roll back to here (`commit`)
        drafts, qs = [], []
        for i in range(k):
            x, q = sampler.pick(logits)
            drafts.append(x)
            qs.append(q)
            if i < k - 1:
                logits = decode_step(self.model, self.cache, torch.tensor([[x]], device=logits.device))[0]
        self.fed = cur + k - 1
        return drafts, None if sampler.greedy else torch.stack(qs)

    def commit(self, cur: int, accepted: int, drafted: int) -> None:
        """Roll back past the rejected drafts (the drafts it fed were all but the last). A model with linear attention
        layers rolls back to before its drafts (their states cannot be cut back) and takes the accepted ones again in
        its next prefill."""
        states, before = self.saved
        if states is not None and accepted < drafted - 1:
            self.fed = before
            restore(self.cache, 0, self.fed - self.start, states)
            return
        self.fed = cur + min(accepted, drafted - 1)
        self.cache.lengths.fill_(self.fed - self.start)


class _PromptLookup:
    """Drafts copied from the sequence itself: what followed the earliest match of its last n tokens."""

    def __init__(self, ngram: int) -> None:
        self.ngram = ngram

    def limit(self) -> int:
        return 1 << 30

    def propose(self, seq: list[int], k: int, sampler: _Sampler) -> tuple[list[int], None]:
        t = torch.tensor(seq)
        for n in range(min(self.ngram, len(seq) - 1), 0, -1):  # the longest n-gram that occurs before
            hits = (t.unfold(0, n, 1)[:-1] == t[-n:]).all(-1).nonzero()  # earlier occurrences, not the tail
            if len(hits):
                begin = int(hits[0]) + n
                return seq[begin : begin + k], None
        return [], None

    def commit(self, cur: int, accepted: int, drafted: int) -> None:
        pass


class Speculator:
    """Speculative rounds for one sequence: its drafter and sampler; the target's cache row is the caller's.

    total: the most tokens the sequence reaches (the draft model's cache size, at most its context).
    seed: the sampler's torch.Generator (None: a random one).
    """

    def __init__(self, target: nn.Module, *, draft: nn.Module | None, prompt_lookup: int | None, k: int,
                 temperature: float, top_k: int | None, top_p: float | None, seed: int | None, total: int) -> None:
        self.target, self.k = target, k
        self.sampler = _Sampler(temperature, top_k, top_p, seed, next(target.parameters()).device)
        self.drafter = _DraftModel(draft, total) if draft is not None else _PromptLookup(prompt_lookup or 0)

    def round(self, cache: KVCache, row: int, seq: list[int], room: int) -> Round:
        """Draft up to min(k, room) tokens after seq, score seq[-1] and them in one pass on cache row
        `row` (which holds the window before seq[-1]), accept, and roll the row back past the rejected
        drafts: it then holds the accepted drafts too, and the round's last token is fed next round."""
        room = min(self.k, room, self.drafter.limit())
        held, length = int(cache.lengths[row]), long_rope_length(self.target.cfg)  # held: the window before seq[-1]
        if length is not None and held < length:  # LongRoPE: a pass ends before its original length or starts at it
            room = min(room, length - 1 - held)  # (each token's logits then take the table they take alone)
        drafts, q = self.drafter.propose(seq, room, self.sampler) if room > 0 else ([], None)
        saved = linear_states(cache, row)
        if crosses_long_rope(self.target, held, 1 + len(drafts)):  # the whole window encoded again, with them
            reset(cache, [row])
            logits = prefill(self.target, cache, [[*seq[len(seq) - 1 - held :], *drafts]], [row],
                             last_logits=1 + len(drafts))  # (k + 1, V)
        else:
            logits = prefill(self.target, cache, [[seq[-1], *drafts]], [row], all_logits=True)  # (k + 1, V)
        accepted, nxt = self.sampler.verify(logits, drafts, q)
        if accepted < len(drafts) and saved is not None:  # linear layers: their states before the pass, then the
            restore(cache, row, held, saved)  # kept tokens fed again (their logits are the pass's)
            prefill(self.target, cache, [[seq[-1], *drafts[:accepted]]], [row])
        elif accepted < len(drafts):  # roll back: the rejected drafts' slots stay, masked, until overwritten
            cache.lengths[row] -= len(drafts) - accepted
        if drafts:
            self.drafter.commit(len(seq), accepted, len(drafts))
        return Round(len(drafts), accepted, [*drafts[:accepted], nxt], logits[: accepted + 1])


def check_drafter(target: nn.Module, draft: nn.Module | None, prompt_lookup: int | None, k: int) -> None:
    """ValueError unless there is exactly one drafter, usable with `target`, and k >= 1."""
    if (draft is None) == (prompt_lookup is None):
        raise ValueError("speculative decoding needs one drafter: a draft model or prompt_lookup=n, not both")
    if prompt_lookup is not None and prompt_lookup < 1:
        raise ValueError(f"prompt_lookup is the n-gram size to match, >= 1, got {prompt_lookup}")
    if k < 1:
        raise ValueError(f"k (tokens drafted per round) must be >= 1, got {k}")
    if target.cfg.has_linear_layers and long_rope_length(target.cfg) is not None:
        raise ValueError("a target with linear attention layers and LongRoPE: a round that crosses LongRoPE's length "
                         "encodes its row again, and linear layers roll back by feeding tokens again from a state "
                         "taken before the round; decode it without speculation")
    if draft is not None and draft.cfg.vocab_size != target.cfg.vocab_size:
        raise ValueError(f"the draft model's vocabulary ({draft.cfg.vocab_size}) is not the target's "
                         f"({target.cfg.vocab_size}): drafts are verified token id by token id")


def _checked(target: nn.Module, prompt_ids: Sequence[int], draft: nn.Module | None, prompt_lookup: int | None,
             k: int, max_new_tokens: int, temperature: float, top_k: int | None, top_p: float | None,
             window_margin: int | None) -> int:
    """The window margin after checking every argument (ValueError naming the one that is wrong)."""
    check_drafter(target, draft, prompt_lookup, k)
    context = target.cfg.max_seq_len
    margin = context // 4 if window_margin is None else window_margin
    _check([list(prompt_ids)], max_new_tokens, temperature, top_k, top_p, 1.0, margin, target.cfg.vocab_size,
           context, 1)
    return margin


@torch.inference_mode()
def speculative_stream(
    target: nn.Module, prompt_ids: Sequence[int], *, draft: nn.Module | None = None, prompt_lookup: int | None = None,
    k: int = 4, max_new_tokens: int, temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None,
    seed: int | None = None, stop_token_ids: Sequence[int] = (), window_margin: int | None = None,
    stats: SpeculativeStats | None = None,
) -> Iterator[int]:
    """Yield the new tokens of one prompt as the target accepts them (a stop token ends it, unyielded).

    draft: a draft model with the target's vocabulary; or prompt_lookup: the longest n-gram matched.
    k: tokens drafted per round. stats: filled in as it goes (see `speculative_generate`).
    window_margin: as the engine's (None: a quarter of the context). Both models run in eval mode
    meanwhile and get their modes back afterwards.
    """
    margin = _checked(target, prompt_ids, draft, prompt_lookup, k, max_new_tokens, temperature, top_k, top_p,
                      window_margin)
    stats = SpeculativeStats() if stats is None else stats
    seq, stop = list(prompt_ids), set(stop_token_ids)
    total = len(seq) + max_new_tokens
    models = [m for m in (target, draft) if m is not None]
    modes = [m.training for m in models]
    for m in models:
        m.eval()
    try:
        verifier = _Target(target, len(seq), total, margin)
        spec = Speculator(target, draft=draft, prompt_lookup=prompt_lookup, k=k, temperature=temperature, top_k=top_k,
                          top_p=top_p, seed=seed, total=total)
        verifier.prefill_window(seq)
        while len(seq) < total:
            done = spec.round(verifier.cache, 0, seq, min(total - len(seq) - 1, verifier.room(seq)))
            stats.count(done)
            for t in done.tokens:
                if t in stop:
                    return
                seq.append(t)
                stats.tokens += 1
                yield t
    finally:
        for m, mode in zip(models, modes, strict=True):
            m.train(mode)
        log.info("speculative decoding: %s", stats.describe())


def speculative_generate(
    target: nn.Module, prompt_ids: Sequence[int], *, draft: nn.Module | None = None, prompt_lookup: int | None = None,
    k: int = 4, max_new_tokens: int, temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None,
    seed: int | None = None, stop_token_ids: Sequence[int] = (), window_margin: int | None = None,
) -> tuple[list[int], SpeculativeStats]:
    """The new tokens of one prompt (stop token not included) and what decoding did; see `speculative_stream`.

    Greedy (temperature 0) gives exactly `engine.generate`'s tokens; sampling gives tokens distributed
    as the target's own samples."""
    stats = SpeculativeStats()
    tokens = list(speculative_stream(target, prompt_ids, draft=draft, prompt_lookup=prompt_lookup, k=k,
                                     max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                                     seed=seed, stop_token_ids=stop_token_ids, window_margin=window_margin,
                                     stats=stats))
    return tokens, stats
