"""Log-likelihoods of continuations given contexts: the one number every scored task is built on.

A request is a (context, continuation) pair of token ids; its score is the sum of
log p(continuation token | everything before it), and whether greedy decoding would have produced
the continuation (lm-eval-harness's `(logprob, is_greedy)`). The numbers are lm-eval's: a pair
longer than the model's context is cut from the left, `(context + continuation)[-(L + 1):]`,
and the cut is counted.

Faster than lm-eval's `hf` backend, with the same numbers:
- **Shared contexts run once.** The choices of a multiple-choice question share their context, so
  one row holds the context followed by every choice, with an attention mask that lets each
  choice see the context and itself only, and positions that restart after the context for each
  choice (a prefix tree flattened into one sequence). A 4-way question costs its context once.
- **The head runs only where a token is scored**: hidden states of other positions never reach
  the (T x V) output matmul or the log-softmax (`Transformer.forward(logits_at=...)`).
- **Rows are sorted by length** and batched under a token budget, so padding stays small.

It does not tokenize (see `encode_pair`, the one place that turns text into a request) nor
generate (see `temper.infer.engine`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from temper.model.attention import Segments


@dataclass(frozen=True)
class Request:
    """Score `continuation` after `context` (token ids; the context is never empty)."""

    context: tuple[int, ...]
    continuation: tuple[int, ...]


@dataclass(frozen=True)
class Score:
    logprob: float
    """Sum of the continuation tokens' log-probabilities."""
    greedy: bool
    """Every continuation token is the model's most likely next token."""
    truncated: int
    """Tokens cut from the left to fit the model's context (0 when it fitted)."""


def encode_pair(encode: Callable[[str], list[int]], context: str, continuation: str) -> Request:
    """lm-eval-harness's tokenization of a (context, continuation) pair, so scores match it exactly.

    Trailing whitespace of the context moves to the continuation (" Paris" is one token where
    "Answer:" + " " + "Paris" would split), and the continuation's ids are those of the whole
    text after the context's own ids. `encode` is the tokenizer's encode with its default special
    tokens (a BOS where the tokenizer adds one), as lm-eval's `hf` backend calls it.
    """
    if not context:
        raise ValueError("empty context: use the tokenizer's prefix (BOS or EOS) token as the context")
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces:
        context, continuation = context[:-n_spaces], context[-n_spaces:] + continuation
    whole = encode(context + continuation)
    ctx = encode(context)
    return Request(tuple(ctx), tuple(whole[len(ctx):]))


@dataclass
class _Row:
    """One sequence of the batch: a context and one or more continuations that share it."""

    context: tuple[int, ...]
    items: list[int]  # request indices, one continuation each
    conts: list[tuple[int, ...]]

    @property
    def length(self) -> int:  # each continuation's last token is only a target, never an input
        return len(self.context) + sum(len(c) - 1 for c in self.conts)


def _rows(requests: Sequence[Request], max_len: int, shared_len: int) -> tuple[list[_Row], list[int]]:
    """Group requests by context into rows of at most `shared_len` tokens (one request: `max_len`)."""
    truncated = [0] * len(requests)
    by_context: dict[tuple[int, ...], list[int]] = {}
    rows: list[_Row] = []
    for i, r in enumerate(requests):
        if not r.context or not r.continuation:
            raise ValueError(f"request {i}: context and continuation must both be non-empty token lists")
        total = len(r.context) + len(r.continuation)
        if total > max_len + 1:  # lm-eval: (context + continuation)[-(max_len + 1):]
            keep = (r.context + r.continuation)[-(max_len + 1):]
            truncated[i] = total - len(keep)
            n_ctx = max(1, len(keep) - len(r.continuation))
            rows.append(_Row(keep[:n_ctx], [i], [keep[n_ctx:]]))
        else:
            by_context.setdefault(r.context, []).append(i)
    for context, items in by_context.items():
        row = _Row(context, [], [])
        for i in sorted(items, key=lambda i: -len(requests[i].continuation)):
            cont = requests[i].continuation
            if row.items and row.length + len(cont) - 1 > shared_len:
                rows.append(row)
                row = _Row(context, [], [])
            row.items.append(i)
            row.conts.append(cont)
        rows.append(row)
    return rows, truncated


def _batches(rows: list[_Row], batch_tokens: int) -> list[list[_Row]]:
    """Longest rows first, each batch's rows x longest row within `batch_tokens` (at least one row)."""
    rows = sorted(rows, key=lambda r: -r.length)
    batches: list[list[_Row]] = []
    for row in rows:
        if batches and (len(batches[-1]) + 1) * batches[-1][0].length <= batch_tokens:
            batches[-1].append(row)
        else:
            batches.append([row])
    return batches


@torch.no_grad()
def score(model: nn.Module, requests: Sequence[Request], *, batch_tokens: int = 16384,
          progress: Callable[[int], None] | None = None) -> list[Score]:
    """The `Score` of every request, in order. `model` is a temper `Transformer` in eval mode.

    batch_tokens: most tokens (rows x longest row) in one forward pass.
    progress: called with the number of requests finished after each batch.
    """
    cfg = model.cfg
    device = next(model.parameters()).device
    # A row holding several continuations puts them side by side, so index distance exceeds
    # position distance; a sliding window (counted in indices by the model) must then span the row.
    shared_len = min(cfg.max_seq_len, cfg.sliding_window or cfg.max_seq_len) if cfg.branches_share_rows else 0
    rows, truncated = _rows(requests, cfg.max_seq_len, shared_len)
    out: list[Score | None] = [None] * len(requests)
    for batch in _batches(rows, batch_tokens):
        tokens, positions, segments, scored, predict_at, targets = _layout(batch)
        # logits_at returns the scored positions in row-major order: the k-th True of `scored`.
        logit_row = (scored.view(-1).cumsum(0) - 1)[predict_at].to(device)  # (N_targets,)
        tokens, positions, scored = tokens.to(device), positions.to(device), scored.to(device)
        # Continuations side by side see the shared context (id 0) and themselves; right padding alone
        # needs no mask, as causal attention never looks ahead.
        shared = Segments(segments.to(device), shared_prefix=True) if any(len(r.conts) > 1 for r in batch) else None
        logits = model(tokens, positions=positions, segments=shared, logits_at=scored)  # (N_scored, V)
        token_lp, hit = _target_logprobs(logits, logit_row, torch.tensor(targets, device=device))
        del logits  # before the next batch's forward
        at = 0
        for row in batch:
            for i, cont in zip(row.items, row.conts, strict=True):
                n = len(cont)
                out[i] = Score(sum(token_lp[at:at + n]), all(hit[at:at + n]), truncated[i])
                at += n
        if progress is not None:
            progress(sum(len(row.items) for row in batch))
    return out  # type: ignore[return-value]


LOGPROB_CHUNK_BYTES = 64 * 2**20
"""Float32 log-probabilities made at once by `_target_logprobs`."""


def _target_logprobs(logits: torch.Tensor, rows_of: torch.Tensor, targets: torch.Tensor
                     ) -> tuple[list[float], list[bool]]:
    """log p(target) of each target and whether it is the argmax: target i is predicted by `logits[rows_of[i]]`
    (logits (N, V)). The float32 log-softmax runs a chunk of targets at a time (rows are independent, so the
    numbers are the whole tensor's): a large vocabulary's batch never holds (N, V) float32 log-probabilities, nor
    a row-indexed copy of its logits (16,384 scored tokens of a 128k vocabulary: 8 GiB each in float32)."""
    rows = max(1, LOGPROB_CHUNK_BYTES // (4 * logits.shape[-1]))
    token_lp, hit = [], []
    for lo in range(0, targets.shape[0], rows):
        logprobs = F.log_softmax(logits[rows_of[lo:lo + rows]].float(), dim=-1)  # (n, V)
        t = targets[lo:lo + rows, None]  # (n, 1)
        token_lp.append(logprobs.gather(-1, t)[:, 0])
        hit.append(logprobs.argmax(-1) == t[:, 0])
        del logprobs
    if not token_lp:
        return [], []
    return torch.cat(token_lp).tolist(), torch.cat(hit).tolist()


def _layout(batch: list[_Row]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, list[int], list[int]]:
    """tokens, positions, segments (0 context, j continuation j, -1 padding), scored: (B, T); and for
    every target token in request order, the flat index b * T + t of the position that predicts it."""
    T = batch[0].length
    B = len(batch)
    tokens = torch.zeros(B, T, dtype=torch.long)
    positions = torch.zeros(B, T, dtype=torch.long)
    segments = torch.full((B, T), -1, dtype=torch.long)
    predict_at: list[int] = []
    targets: list[int] = []
    for b, row in enumerate(batch):
        c = len(row.context)
        tokens[b, :c] = torch.tensor(row.context)
        positions[b, :c] = torch.arange(c)
        segments[b, :c] = 0
        at = c
        for j, cont in enumerate(row.conts, start=1):
            n = len(cont) - 1  # inputs of this continuation: all its tokens but the last
            tokens[b, at:at + n] = torch.tensor(cont[:-1], dtype=torch.long)
            positions[b, at:at + n] = torch.arange(c, c + n)
            segments[b, at:at + n] = j
            # Its first token is predicted at the context's last position (shared by every
            # continuation of the row), the others at their own inputs.
            predict_at += [b * T + c - 1] + list(range(b * T + at, b * T + at + n))
            targets += cont
            at += n
    scored = torch.zeros(B * T, dtype=torch.bool)
    scored[predict_at] = True
    return tokens, positions, segments, scored.view(B, T), predict_at, targets
