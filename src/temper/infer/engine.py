"""Token generation with a KV cache: batched prompts of any lengths, sampling, streaming, past the context.

Prompts are left-padded into one batch; a key-padding mask and per-row positions make every row
compute exactly what it would alone. Each step runs the model on one new token per row, reusing
the cached keys and values, then samples: repetition penalty, temperature, top-k, top-p.

Generation does not stop at the model's context (max_seq_len): like nanoGPT's `idx[:, -block_size:]`
crop, each row conditions on a window of its most recent tokens, at positions 0.. from the window's
start (so learned positions and RoPE both work). A prompt longer than the context keeps its last
max_seq_len tokens. When a row's window is full, it is cut to its last max_seq_len - window_margin
tokens, which are re-encoded into the cache, and it grows again from there; window_margin=0 is
nanoGPT's exact sliding window (one re-encode per step). Either way every step computes exactly what
a fresh forward pass over each row's window would. It does not shift cached keys in place (llama.cpp's
RoPE "context shift", approximate and RoPE-only) nor keep "attention sink" tokens (StreamingLLM, Xiao et al. 2023).

It works on token ids only (it imports `temper.model`, never `temper.data`): decoding text and
stop *strings* belong to the caller, which can end a row through the `should_stop` hook.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence

import torch
from torch import nn

from temper.model.transformer import KVCache


def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """CTRL's penalty (Keskar et al. 2019): seen tokens' positive logits / penalty, negative ones * penalty.

    logits: (B, V) float; seen: (B, V) bool, True for tokens in the prompt or generated so far.
    """
    if penalty == 1.0:
        return logits
    penalized = torch.where(logits > 0, logits / penalty, logits * penalty)
    return torch.where(seen, penalized, logits)


def filter_logits(logits: torch.Tensor, top_k: int | None = None, top_p: float | None = None) -> torch.Tensor:
    """Set to -inf every logit outside the top k and outside the nucleus of mass top_p.

    Nucleus sampling (Holtzman et al. 2019): keep the smallest set of most likely tokens whose
    probability reaches top_p; the most likely token is always kept. logits: (B, V).
    """
    if top_k is not None and 0 < top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]  # (B, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)  # (B, V)
        probs = sorted_logits.softmax(dim=-1)
        mass_before = probs.cumsum(dim=-1) - probs  # probability of the tokens ranked above
        drop_sorted = mass_before >= top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)  # back to vocabulary order
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def sample_next(
    logits: torch.Tensor, *, temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """One token per row (B,) from logits (B, V): argmax when temperature is 0, else a filtered sample."""
    if temperature == 0:
        return logits.argmax(dim=-1)
    logits = filter_logits(logits / temperature, top_k, top_p)
    probs = logits.softmax(dim=-1)  # (B, V)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def _check(prompts: Sequence[Sequence[int]], max_new_tokens: int, temperature: float, top_k: int | None,
           top_p: float | None, repetition_penalty: float, window_margin: int, vocab_size: int, max_seq_len: int) -> None:
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token")
    if any(not 0 <= t < vocab_size for p in prompts for t in p):
        raise ValueError(f"prompt token ids must be in [0, {vocab_size})")
    if max_new_tokens < 0 or temperature < 0 or repetition_penalty <= 0:
        raise ValueError("max_new_tokens and temperature must be >= 0, repetition_penalty > 0")
    if top_k is not None and top_k < 0:
        raise ValueError(f"top_k must be >= 0 (0 or None: off), got {top_k}")
    if top_p is not None and not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    if not 0 <= window_margin < max_seq_len:
        raise ValueError(f"window_margin must be in [0, max_seq_len={max_seq_len}), got {window_margin}")


def _refill(model: nn.Module, cache: KVCache, tokens: torch.Tensor, rows: list[int], shift: int, lo: int, hi: int) -> None:
    """Drop the first `shift` cache slots, then re-encode tokens[rows, lo:hi] at positions 0.. into the
    last hi - lo slots of those rows; the other rows keep their keys and values (moved down by `shift`)."""
    if len(rows) == cache.k.shape[1]:  # every row's window now starts at lo: refill the emptied cache in place
        cache.crop(0)
        if hi > lo:
            model(tokens[:, lo:hi], cache=cache, last_only=True)
        return
    if shift:
        n = cache.length - shift
        for layer in (*cache.k, *cache.v):  # (B, Hkv, S_max, D); a layer at a time bounds the copy's memory
            layer[:, :, :n] = layer[:, :, shift : shift + n].clone()
        cache.crop(n)
    if rows and hi > lo:
        fresh = model.new_cache(len(rows), hi - lo)
        model(tokens[rows, lo:hi], cache=fresh, last_only=True)
        idx, end = torch.tensor(rows, device=tokens.device), cache.length
        cache.k[:, idx, :, end - (hi - lo) : end] = fresh.k  # (L, len(rows), Hkv, hi - lo, D)
        cache.v[:, idx, :, end - (hi - lo) : end] = fresh.v


@torch.inference_mode()
def stream(
    model: nn.Module, prompts: Sequence[Sequence[int]], *, max_new_tokens: int, temperature: float = 1.0,
    top_k: int | None = None, top_p: float | None = None, repetition_penalty: float = 1.0,
    stop_token_ids: Sequence[int] = (), seed: int | None = None, use_cache: bool = True, pad_id: int = 0,
    should_stop: Callable[[int, list[int]], bool] | None = None, window_margin: int | None = None,
) -> Iterator[list[int | None]]:
    """Yield, per step, one entry per prompt: its new token id, or None once that row has finished.

    A row finishes on a token in stop_token_ids (which is not yielded) or when
    `should_stop(row, tokens_so_far)` returns True (the token that triggered it is yielded).
    window_margin: past the context, a full window is cut to its last max_seq_len - window_margin
    tokens (None: a quarter of the context; 0: nanoGPT's crop to the last max_seq_len every step).
    The repetition penalty counts every token so far, inside the window or not.
    `use_cache=False` recomputes each row's window every step (the reference the cache is tested on).
    The model runs in eval mode meanwhile; its mode is restored afterwards.
    """
    cfg = model.cfg
    C = cfg.max_seq_len
    margin = C // 4 if window_margin is None else window_margin
    _check(prompts, max_new_tokens, temperature, top_k, top_p, repetition_penalty, margin, cfg.vocab_size, C)
    device = next(model.parameters()).device
    B, lens = len(prompts), [len(p) for p in prompts]
    L, total = max(lens), max(lens) + max_new_tokens
    tokens = torch.full((B, total), pad_id, dtype=torch.long)  # (B, L + new): left-padded prompts, then output
    seen = torch.zeros((B, cfg.vocab_size), dtype=torch.bool)  # (B, V): tokens to penalise
    for i, p in enumerate(prompts):
        tokens[i, L - len(p) : L] = torch.tensor(p, dtype=torch.long)
        seen[i, list(p)] = True
    tokens, seen = tokens.to(device), seen.to(device)
    cols = torch.arange(total, device=device)
    # Row i conditions on columns start[i]:cur of `tokens`, at positions 0..; the columns before (its
    # padding, tokens that slid out) are masked. A prompt longer than the context keeps its last C tokens.
    start = [L - min(n, C) for n in lens]
    # Past the context, a full window is cut to `keep` tokens and re-encoded, then grows by one token per
    # cheap cached step: one re-encode of `keep` tokens every margin + 1 steps. Cutting a quarter of the
    # context costs about 3 prefilled tokens per new token (prefill is much faster per token than a
    # decode step) while every token still sees at least 3/4 of the context; margin = 0 would re-encode
    # every step, as nanoGPT's crop does. Each row fills up at its own step (so that it computes what it
    # would alone), and only the rows that are full are re-encoded.
    keep = C - margin
    generator = torch.Generator(device=device).manual_seed(seed) if seed is not None else None
    cache = model.new_cache(B, min(C, total)) if use_cache else None  # slot j holds column min(start) + j
    stop_ids, rows = set(stop_token_ids), torch.arange(B, device=device)
    finished, outputs = [False] * B, [[] for _ in range(B)]

    def run(lo: int, hi: int) -> torch.Tensor:  # logits (B, V) for the last of tokens[:, lo:hi]
        first = torch.tensor(start, device=device)[:, None]  # (B, 1): where each row's window starts
        pos = (cols[lo:hi] - first).clamp(min=0)  # (B, T)
        # Equal windows need no mask (the fast path: SDPA may use flash); else mask every key before a row's window.
        mask = cols[min(start) : hi] >= first if len(set(start)) > 1 else None  # (B, S)
        return model(tokens[:, lo:hi], positions=pos, cache=cache, attn_mask=mask, last_only=True)[:, -1].float()

    was_training = model.training
    model.eval()
    try:
        cur = L
        logits = run(min(start), L) if max_new_tokens else None
        for step in range(max_new_tokens):
            logits = apply_repetition_penalty(logits, seen, repetition_penalty)
            nxt = sample_next(logits, temperature=temperature, top_k=top_k, top_p=top_p, generator=generator)  # (B,)
            tokens[:, cur] = nxt
            seen[rows, nxt] = True
            out: list[int | None] = []
            for i, t in enumerate(nxt.tolist()):
                if finished[i] or t in stop_ids:
                    finished[i] = True
                    out.append(None)
                    continue
                outputs[i].append(t)
                out.append(t)
                if should_stop is not None and should_stop(i, outputs[i]):
                    finished[i] = True
            yield out
            cur += 1
            if all(finished) or step == max_new_tokens - 1:
                break
            full = [i for i in range(B) if cur - start[i] > C]  # windows that the new token would overfill
            if full:
                before = min(start)
                for i in full:  # a finished row's output no longer matters: it keeps just the new token, for free
                    start[i] = cur - (1 if finished[i] else keep)
                if cache is not None:
                    refill = [i for i in full if not finished[i]]
                    _refill(model, cache, tokens, refill, min(start) - before, cur - keep, cur - 1)
            logits = run(cur - 1, cur) if use_cache else run(min(start), cur)
    finally:
        model.train(was_training)


def generate(
    model: nn.Module, prompts: Sequence[Sequence[int]], *, max_new_tokens: int, temperature: float = 1.0,
    top_k: int | None = None, top_p: float | None = None, repetition_penalty: float = 1.0,
    stop_token_ids: Sequence[int] = (), seed: int | None = None, use_cache: bool = True, pad_id: int = 0,
    should_stop: Callable[[int, list[int]], bool] | None = None, window_margin: int | None = None,
) -> list[list[int]]:
    """The new token ids of each prompt (prompt not included, stop token not included); see `stream`."""
    outputs: list[list[int]] = [[] for _ in prompts]
    for step in stream(
        model, prompts, max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
        repetition_penalty=repetition_penalty, stop_token_ids=stop_token_ids, seed=seed, use_cache=use_cache,
        pad_id=pad_id, should_stop=should_stop, window_margin=window_margin,
    ):
        for i, t in enumerate(step):
            if t is not None:
                outputs[i].append(t)
    return outputs
