"""Token generation over a static KV cache: prefill, a compilable decode step, sampling, and the driver.

The engine is three plain functions over `temper.model.attention.KVCache` (per-row lengths; see
`temper.infer.cache` for reset / fork / select), after gpt-fast and nanochat:
  - `prefill(model, cache, prompts, rows)`: append each prompt to its row, return its last logits;
  - `decode_step(model, cache, tokens)`: one token per row -> next-token logits (B, V). Shapes never
    change between steps, so `compiled_decode_step()` is one `torch.compile(fullgraph=True)` graph
    (CUDA graphs with mode="reduce-overhead") that does not recompile as the rows grow;
  - `sample_next(logits, ...)`: repetition penalty, temperature, top-k, top-p, per-row seeds; a grammar's mask
    before it (`temper.infer.grammar`: structured outputs) when one is given.
`stream` / `generate` drive them for a batch of prompts; the evaluation runner, lm-eval, `temper
generate` and RL rollouts all go through them, and a server schedules rows with the same three.

Prompts of different lengths need no padding: each row's tokens sit at slots 0.. of its cache row
and positions restart at 0 per row, so every row computes exactly what it would alone.

Sampling with per-row seeds is batch-independent: row r's draw at step t inverts the CDF of its
filtered softmax at one uniform number that is a hash of (seed_r, t) (counter-based, as SGLang's
seeded sampling), so a prompt forked into n rows with seeds s..s+n-1 gives what n separate runs with
those seeds give, whatever else shares the batch, and the draw needs no generator state.

Generation does not stop at the model's context (max_seq_len): like nanoGPT's `idx[:, -block_size:]`
crop, each row conditions on a window of its most recent tokens, at positions 0.. from the window's
start (so learned positions and RoPE both work). A prompt longer than the context keeps its last
max_seq_len tokens. When a row's window is full, it is cut to its last max_seq_len - window_margin
tokens, which are re-encoded into its (reset) cache row, and it grows again from there;
window_margin=0 is nanoGPT's exact sliding window (one re-encode per step). Either way every step
computes exactly what a fresh forward pass over each row's window would. It does not shift cached
keys in place (llama.cpp's RoPE "context shift", approximate and RoPE-only) nor keep "attention
sink" tokens (StreamingLLM, Xiao et al. 2023). For the same reason a LongRoPE model's row (Phi-3.5, Phi-4-mini) is
encoded again, whole, at the step where it outgrows the original length (`crosses_long_rope`).

It works on token ids only: decoding text and stop *strings* belong to the caller, which can end a
row through the `should_stop` hook. Loading a checkpoint for inference is `temper.infer.load`.

A training recipe's sharded model (FSDP2, tensor parallel) generates too, every rank its own prompts: its
forward pass is a collective, so the ranks run in lockstep (each pass announced by a one-value all-reduce;
a rank done early answers the others' passes until all are, `join` for a rank with nothing to generate),
and without gradient under no_grad, never inference_mode (whose tensors FSDP2 could not reuse in training).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator, Mapping, Sequence

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.fsdp import FSDPModule
from torch.distributed.tensor import DTensor

from temper.infer.cache import fork, new_cache, reset, select, write_back
from temper.infer.grammar import Grammar, mask_rows_
from temper.model.attention import KVCache, Segments
from temper.model.layers import MoE
from temper.model.rope import long_rope_length

Prompts = Sequence[Sequence[int]] | torch.Tensor

# ---- sharded models ------------------------------------------------------------------------------


def collective(model: nn.Module) -> bool:
    """Whether `model`'s forward pass is a collective over ranks (parameters sharded by FSDP2 or tensor
    parallel, as a training recipe lays them out): every rank must then run as many forward passes as the
    others, and passes without gradient run under no_grad rather than inference_mode (FSDP2 keeps the
    buffers it gathers parameters into between calls: made in inference mode, training could not write them)."""
    if not (dist.is_available() and dist.is_initialized()):
        return False
    return (any(isinstance(m, FSDPModule) for m in model.modules())
            or any(isinstance(p, DTensor) for p in model.parameters()))


def _without_grad(fn: Callable) -> Callable:
    """Run `fn(model, ...)` (a function or a generator) under inference_mode, or no_grad for a sharded model."""

    @functools.wraps(fn)
    def wrapper(model: nn.Module, *args, **kwargs):
        mode = torch.no_grad() if collective(model) else torch.inference_mode()
        return mode(fn)(model, *args, **kwargs)

    return wrapper


def _any_rank(flag: bool, device: torch.device) -> bool:
    t = torch.tensor([float(flag)], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item() > 0)


class _Lockstep:
    """A sharded model as one rank's generation sees it: each forward pass is announced to the other ranks
    first (one small all-reduce), and a rank whose generation ends early (its rows stopped, it had fewer new
    tokens to make, no window to re-encode) answers the others' announced passes with a one-token pass of
    its own (`finish`) until every rank is done, so that the passes' gathers line up on every rank."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.device = next(model.parameters()).device

    def __getattr__(self, name: str):  # cfg, new_cache, parameters, eval, train, training: the model's
        return getattr(self.model, name)

    def __call__(self, *args, **kwargs) -> torch.Tensor:
        _any_rank(True, self.device)
        return self.model(*args, **kwargs)

    def compute_dtype(self) -> torch.dtype:
        """The dtype the model computes in, from a one-token pass: FSDP2's mixed precision gathers the
        parameters in another dtype than the one they are stored in, and the KV cache must take the former."""
        return self(torch.zeros((1, 1), dtype=torch.long, device=self.device), last_only=True).dtype

    def finish(self) -> None:
        idle = torch.zeros((1, 1), dtype=torch.long, device=self.device)
        while _any_rank(False, self.device):
            self.model(idle, last_only=True)


@torch.no_grad()
def join(model: nn.Module) -> None:
    """Take part in the other ranks' generation without generating (a rank with no prompts in a round of a
    sharded evaluation): answer their forward passes until all are done. A no-op for a model that is not sharded."""
    if collective(model):
        _Lockstep(model).finish()


# ---- sampling ------------------------------------------------------------------------------------


def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """CTRL's penalty (Keskar et al. 2019): seen tokens' positive logits / penalty, negative ones * penalty.

    logits: (B, V) float; seen: (B, V) bool, True for tokens in the prompt or generated so far.
    """
    if penalty == 1.0:
        return logits
    penalized = torch.where(logits > 0, logits / penalty, logits * penalty)
    return torch.where(seen, penalized, logits)


def apply_openai_penalties(logits: torch.Tensor, generated: torch.Tensor, presence: float = 0.0,
                           frequency: float = 0.0, bias: Mapping[int, float] | None = None) -> torch.Tensor:
    """OpenAI's presence and frequency penalties and logit bias on one row's logits (V,), as its API documents them:
    logit[j] - c[j] * frequency - (c[j] > 0) * presence, c[j] the count of token j among the tokens `generated`
    so far (the completion's, not the prompt's: vLLM's reading), then + bias[j]. A new tensor; `logits` is kept."""
    counts = torch.bincount(generated, minlength=logits.shape[-1]).to(logits.dtype)  # (V,)
    out = logits - frequency * counts - presence * (counts > 0).to(logits.dtype)
    if bias:
        ids = torch.tensor(list(bias), device=logits.device)
        out[ids] += torch.tensor(list(bias.values()), device=logits.device, dtype=logits.dtype)
    return out


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


# splitmix64's finalizer constants (Steele et al. 2014), as signed int64.
_GOLDEN, _MIX1, _MIX2 = 0x9E3779B97F4A7C15 - (1 << 64), 0xBF58476D1CE4E5B9 - (1 << 64), 0x94D049BB133111EB - (1 << 64)


def _mix(x: torch.Tensor) -> torch.Tensor:
    """splitmix64's bijective 64-bit mixer on int64 (wrapping products; logical shifts by masking)."""
    x = x ^ ((x >> 30) & ((1 << 34) - 1))
    x = x * _MIX1
    x = x ^ ((x >> 27) & ((1 << 37) - 1))
    x = x * _MIX2
    return x ^ ((x >> 31) & ((1 << 33) - 1))


def seeded_uniform(seeds: torch.Tensor, step: int | torch.Tensor) -> torch.Tensor:
    """(B,) float64 uniform numbers in (0, 1), a pure function of (seeds[b], step) (53 bits of its hash).

    step: an int for every row, or a (B,) tensor of each row's own step (a server's rows started at
    different times): row b's number is the same either way."""
    x = _mix(_mix(seeds.long() + _GOLDEN) + step)  # (B,)
    return (((x >> 11) & ((1 << 53) - 1)).double() + 0.5) / (1 << 53)


def _inverse_cdf(probs: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """The token (B,) whose CDF interval of probs (B, V) holds u (B,): exactly a draw from probs.

    One uniform per row and a cumulative sum, where a Gumbel-max draw hashes a number for every token
    (~20 int64 operations per vocabulary entry: 12x slower at V = 32k, most of a rollout's sampling).
    A token of probability 0 (filtered out) has an empty interval and is never drawn."""
    cdf = probs.cumsum(-1)  # (B, V)
    total = cdf[:, -1:]
    # u * total rounded into [0, total): the largest float below the total is the last nonzero token's.
    target = torch.minimum((u[:, None] * total.double()).to(cdf.dtype), torch.nextafter(total, torch.zeros_like(total)))
    return torch.searchsorted(cdf, target, right=True).squeeze(-1)


def sample_next(
    logits: torch.Tensor, *, temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None,
    generator: torch.Generator | None = None, seeds: torch.Tensor | None = None, step: int | torch.Tensor = 0,
) -> torch.Tensor:
    """One token per row (B,) from logits (B, V): argmax when temperature is 0, else a filtered sample.

    With `seeds` (B,) the draw inverts the CDF of the filtered softmax at a uniform number hashed from
    (seeds[b], step): each row's draw depends on its own seed and step only (`step` (B,): each row's
    own, as a server's rows that joined the batch at different steps).
    Without, `torch.multinomial` draws with `generator`.
    """
    if temperature == 0:
        return logits.argmax(dim=-1)
    logits = filter_logits(logits / temperature, top_k, top_p)
    probs = logits.softmax(dim=-1)  # (B, V)
    if seeds is not None:
        return _inverse_cdf(probs, seeded_uniform(seeds, step))
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def token_logprob(logits: torch.Tensor, tokens: torch.Tensor, temperature: float) -> torch.Tensor:
    """log p(token) per row (B,) float32 under softmax(logits / temperature) (temperature 0: softmax(logits)).

    The distribution a training forward computes (RL's "old" log-probs): before repetition penalty,
    top-k and top-p, which shape the draw but not the policy being trained.
    """
    scaled = logits.float() / temperature if temperature > 0 else logits.float()
    return scaled.log_softmax(-1).gather(-1, tokens[:, None]).squeeze(-1)


# ---- prefill and decode --------------------------------------------------------------------------


def _pad(prompts: Prompts, lengths: Sequence[int] | None, pad_id: int, device: torch.device
         ) -> tuple[torch.Tensor, list[int]]:
    """(n, T) right-padded tokens and each row's count."""
    if isinstance(prompts, torch.Tensor):
        counts = list(lengths) if lengths is not None else [prompts.shape[1]] * prompts.shape[0]
        return prompts.to(device), counts
    counts = [len(p) for p in prompts]
    out = torch.full((len(prompts), max(counts, default=0)), pad_id, dtype=torch.long)
    for i, p in enumerate(prompts):
        out[i, : len(p)] = torch.as_tensor(list(p), dtype=torch.long)
    return out.to(device), counts


@_without_grad
def prefill(model: nn.Module, cache: KVCache, prompts: Prompts, rows: Sequence[int] | None = None, *,
            lengths: Sequence[int] | None = None, pad_id: int = 0, all_logits: bool = False,
            last_logits: int = 1) -> torch.Tensor:
    """Append each prompt's tokens to its cache row, after what the row holds; return the logits
    (n, V) float32 that follow each prompt's last token.

    prompts: n lists of token ids, or an (n, T) tensor (right-padded when `lengths` gives each row's
        count). Rows of different lengths run as one right-padded batch: a padding token only sees
        real tokens before it, and the rows' lengths are set to their real counts, so the slots the
        padding wrote stay masked until overwritten.
    rows: the cache rows (default 0..n-1). Other rows are untouched: when `rows` is not the whole
        cache, those rows are copied out (`cache.select`), run, and put back.
    all_logits: return the logits after every real token instead, (sum of the counts, V) row by row: a
        target scoring k drafted tokens in one pass (`temper.infer.speculative`).
    last_logits: return the logits after each row's last `last_logits` tokens, (n * last_logits, V) row by row.
    Raises ValueError when a row would outgrow the cache (the one host sync of a prefill).
    """
    tokens, counts = _pad(prompts, lengths, pad_id, cache.lengths.device)
    n, T = tokens.shape
    rows = list(range(n)) if rows is None else list(rows)
    if len(rows) != n or n == 0 or min(counts) < 1:
        raise ValueError(f"prefill needs one non-empty prompt per row: {n} prompts, {len(rows)} rows")
    length = long_rope_length(model.cfg)
    if length is not None and n > 1 and any(b + c <= length < b + T for b, c in zip(cache.lengths[rows].tolist(),
                                                                                    counts)):
        # LongRoPE takes its table by a row's last position, padding's included: one row at a time instead
        return torch.cat([prefill(model, cache, tokens[i : i + 1, : counts[i]], [rows[i]], all_logits=all_logits,
                                  last_logits=last_logits) for i in range(n)])
    whole = rows == list(range(cache.k.shape[1]))
    part = cache if whole else select(cache, rows)
    before = part.lengths.clone()
    count = torch.tensor(counts, device=tokens.device)
    room = min(cache.max_len, model.cfg.max_seq_len)
    if int((before + count).max()) > room:
        raise ValueError(f"a prompt does not fit its cache row ({room} tokens): lengths {before.tolist()} + {counts}")
    cols = torch.arange(T, device=tokens.device)[None, :]
    real = cols < count[:, None]  # (n, T)
    at = real & (all_logits | (cols >= (count - last_logits)[:, None]))  # (n, T)
    # The padding marked, for linear attention layers, whose state must not take it in; attention's mask comes from
    # the rows' lengths.
    segments = Segments.padding(real) if min(counts) < T else None
    logits = model(tokens, cache=part, logits_at=at, segments=segments)  # (n, V), or (sum of counts, V)
    part.lengths.copy_(before + count)
    if not whole:
        write_back(cache, rows, part)
    return logits.float()


def crosses_long_rope(model: nn.Module, held: int, new: int) -> bool:
    """Whether feeding `new` tokens to a cache row that holds `held` crosses LongRoPE's original length: that
    forward takes the long table while the row's cached keys, and every layer's states above them, came from the
    short one. Its caller then encodes the row again, whole, as transformers' Phi-3 does at that step (its
    generate drops the cache there), so that the row computes what a fresh forward over it would."""
    length = long_rope_length(model.cfg)
    return length is not None and 0 < held <= length < held + new


def decode_step(model: nn.Module, cache: KVCache, tokens: torch.Tensor) -> torch.Tensor:
    """Feed one token per row, tokens (B, 1), at each row's next slot; return next-token logits (B, V) float32.

    Every row advances by one (an idle row computes garbage that nobody reads; its length stops at
    the cache's size). Nothing here reads a value back to the host or changes a shape, so it
    compiles to one graph (`compiled_decode_step`).
    """
    return model(tokens, cache=cache, last_only=True)[:, -1].float()


_COMPILED: dict[str, Callable[[nn.Module, KVCache, torch.Tensor], torch.Tensor]] = {}


def compiled_decode_step(mode: str | None = None) -> Callable[[nn.Module, KVCache, torch.Tensor], torch.Tensor]:
    """`decode_step` through `torch.compile(fullgraph=True)` (inductor), one compiled function per mode.

    mode None: "reduce-overhead" (CUDA graphs) when CUDA is available, else the default. It compiles
    once per (model, batch, cache size, dtype); the rows' lengths are tensor values, not shapes.
    """
    if mode is None:
        mode = "reduce-overhead" if torch.cuda.is_available() else "default"
    if mode not in _COMPILED:
        # dynamic=False: one graph per batch and cache size, never a dynamic-shape one (slower, and CUDA
        # graphs re-record per shape anyway) after dynamo has seen a second size.
        _COMPILED[mode] = torch.compile(decode_step, fullgraph=True, mode=mode, dynamic=False)
    return _COMPILED[mode]


def check_compiled_decode(model: nn.Module) -> None:
    """Refuse, naming the flag, a model whose decode step is not one graph: a mixture of experts sizes each expert's
    rows on the host (`MoE.forward`), which a fullgraph compile (CUDA graphs) cannot hold."""
    from temper.config import ConfigError

    if any(isinstance(m, MoE) for m in model.modules()):
        raise ConfigError("compile: a mixture of experts sizes its experts' rows on the host at every step, which "
                          "one compiled decode graph cannot hold; decode without compile")


# ---- the driver ----------------------------------------------------------------------------------


def _check(prompts: Sequence[Sequence[int]], max_new_tokens: int, temperature: float, top_k: int | None,
           top_p: float | None, repetition_penalty: float, window_margin: int, vocab_size: int, max_seq_len: int,
           num_samples: int) -> None:
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token")
    if any(not 0 <= t < vocab_size for p in prompts for t in p):
        raise ValueError(f"prompt token ids must be in [0, {vocab_size})")
    if max_new_tokens < 0 or temperature < 0 or repetition_penalty <= 0 or num_samples < 1:
        raise ValueError("max_new_tokens and temperature must be >= 0, repetition_penalty > 0, num_samples >= 1")
    if top_k is not None and top_k < 0:
        raise ValueError(f"top_k must be >= 0 (0 or None: off), got {top_k}")
    if top_p is not None and not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    if not 0 <= window_margin < max_seq_len:
        raise ValueError(f"window_margin must be in [0, max_seq_len={max_seq_len}), got {window_margin}")


def _row_seeds(seed: int | Sequence[int] | None, B: int, device: torch.device) -> torch.Tensor:
    """(B,) seeds: row r of an int seed s gets s + r; None draws them from torch's global generator."""
    if seed is None:
        return torch.randint(0, 2**62, (B,), device=device)
    if isinstance(seed, int):
        return torch.arange(seed, seed + B, device=device)
    if len(seed) != B:
        raise ValueError(f"seed: one per row ({B}), got {len(seed)}")
    return torch.tensor(list(seed), dtype=torch.long, device=device)


def _run(model: nn.Module, prompts: Sequence[Sequence[int]], **kwargs) -> Iterator[list[int | None]]:
    """`_decode`; for a sharded model in lockstep with the other ranks (`_Lockstep`), which all call it: a
    rank that is done early keeps answering the others' forward passes, so none waits forever."""
    if not collective(model):
        yield from _decode(model, prompts, **kwargs)
        return
    lock = _Lockstep(model)
    yield from _decode(lock, prompts, **(kwargs | {"compile": False}))  # the plain step: calls go through the lock
    lock.finish()


def _decode(
    model: nn.Module, prompts: Sequence[Sequence[int]], *, max_new_tokens: int, temperature: float,
    top_k: int | None, top_p: float | None, repetition_penalty: float, stop_token_ids: Sequence[int],
    seed: int | Sequence[int] | None, use_cache: bool, pad_id: int,
    should_stop: Callable[[int, list[int]], bool] | None, window_margin: int | None, num_samples: int,
    compile: bool | str, sync_every: int, logprobs: list[list[float]] | None = None, grammar: Grammar | None = None,
) -> Iterator[list[int | None]]:
    """The one decoding loop (see `stream`): device work every step, host bookkeeping every `sync_every`
    steps (and whenever a window must be cut), where the buffered steps are yielded one by one.
    logprobs: when given, row r's kept tokens' log-probs are appended to logprobs[r] (see `generate`)."""
    cfg = model.cfg
    C = cfg.max_seq_len
    margin = C // 4 if window_margin is None else window_margin
    _check(prompts, max_new_tokens, temperature, top_k, top_p, repetition_penalty, margin, cfg.vocab_size, C,
           num_samples)
    device = next(model.parameters()).device
    n = num_samples
    P, lens = len(prompts), [len(p) for p in prompts]
    B = P * n  # prompt i's samples are rows i*n .. i*n + n - 1
    L, total = max(lens), max(lens) + max_new_tokens
    # Row r's tokens so far, left-padded: prompt, then output from column L. The model never sees the padding.
    tokens = torch.full((P, total), pad_id, dtype=torch.long)
    seen = torch.zeros((P, cfg.vocab_size), dtype=torch.bool)  # (B, V): tokens to penalise
    for i, p in enumerate(prompts):
        tokens[i, L - len(p) : L] = torch.as_tensor(list(p), dtype=torch.long)
        seen[i, list(p)] = True
    tokens = tokens.to(device).repeat_interleave(n, 0)  # (B, total)
    seen = seen.to(device).repeat_interleave(n, 0) if repetition_penalty != 1.0 else None
    seeds = _row_seeds(seed, B, device) if temperature > 0 else None
    stop_ids = set(stop_token_ids)
    matchers = [grammar.matcher() for _ in range(B)] if grammar is not None else None
    if matchers is not None:
        sync_every = 1  # each step's mask needs the tokens drawn before it, on the host
    # Row r conditions on columns start[r]:cur of `tokens` (its window, at positions 0..); a prompt longer
    # than the context keeps its last C tokens. Its cache row holds the window but for its last token,
    # which the next decode step feeds.
    start = [L - min(lens[r // n], C) for r in range(B)]
    # Past the context, a full window is cut to `keep` tokens and re-encoded, then grows by one token per
    # cheap cached step: one re-encode of `keep` tokens every margin + 1 steps. Cutting a quarter of the
    # context costs about 3 prefilled tokens per new token (prefill is much faster per token than a
    # decode step) while every token still sees at least 3/4 of the context; margin = 0 would re-encode
    # every step, as nanoGPT's crop does. Each row fills up at its own step (so that it computes what it
    # would alone), and only the rows that are full and unfinished are re-encoded.
    keep = C - margin
    dtype = model.compute_dtype() if isinstance(model, _Lockstep) and use_cache and max_new_tokens else None
    cache = new_cache(model, B, min(C, total), dtype=dtype) if use_cache and max_new_tokens else None
    step_fn = decode_step
    if compile and cache is not None:
        check_compiled_decode(model)
        step_fn = compiled_decode_step(compile if isinstance(compile, str) else None)
    cols = torch.arange(total, device=device)

    def windows(cur: int) -> tuple[torch.Tensor, list[int]]:
        """Each row's window, right-padded: (B, T) tokens and the counts."""
        first = torch.tensor(start, device=device)  # (B,)
        counts = [cur - s for s in start]
        idx = (first[:, None] + cols[: max(counts)]).clamp(max=cur - 1)  # (B, T); the tail repeats a token
        return tokens.gather(1, idx), counts

    def recompute(cur: int) -> torch.Tensor:  # use_cache=False: each row's whole window, no cache
        window, counts = windows(cur)
        count = torch.tensor(counts, device=device)[:, None]  # (B, 1)
        last = cols[: window.shape[1]][None, :] == count - 1
        # Each row's own positions (its padding repeats the last one): a row is then as long as it is alone
        positions = cols[: window.shape[1]][None, :].minimum(count - 1)  # (B, T)
        return model(window, positions=positions, logits_at=last).float()  # (B, V)

    finished, outputs = [False] * B, [[] for _ in range(B)]

    def settle(new: list[int], logps: list[float] | None) -> list[int | None]:
        """One step's tokens -> what `stream` yields, ending rows on stop ids and `should_stop`."""
        out: list[int | None] = []
        for r, t in enumerate(new):
            if finished[r] or t in stop_ids:
                finished[r] = True
                out.append(None)
                continue
            outputs[r].append(t)
            if logps is not None:
                logprobs[r].append(logps[r])
            out.append(t)
            if matchers is not None:
                matchers[r].advance(t)
                finished[r] = matchers[r].done  # the text is complete: only EOS could follow
            if should_stop is not None and should_stop(r, outputs[r]):
                finished[r] = True
        return out

    was_training = model.training
    model.eval()
    try:
        if not max_new_tokens:
            return
        cur = L
        if cache is None:
            logits = recompute(cur)
        else:  # each prompt once, into the first of its rows, then forked into the others
            window, counts = windows(cur)
            firsts = list(range(0, B, n))
            logits = prefill(model, cache, window[firsts], firsts, lengths=[counts[r] for r in firsts])
            if n > 1:
                for r in firsts:
                    fork(cache, r, range(r + 1, r + n))
                logits = logits.repeat_interleave(n, 0)
        pending: list[torch.Tensor] = []
        pending_logps: list[torch.Tensor] = []
        for step in range(max_new_tokens):
            raw = logits
            if seen is not None:
                logits = apply_repetition_penalty(logits, seen, repetition_penalty)
            if matchers is not None:  # the grammar's mask on the rows still going; the log-probs stay the model's
                going = [r for r in range(B) if not finished[r]]
                logits = logits.clone() if logits is raw else logits
                logits[going] = mask_rows_(logits[going], [matchers[r] for r in going])
            nxt = sample_next(logits, temperature=temperature, top_k=top_k, top_p=top_p, seeds=seeds, step=step)
            tokens[:, cur] = nxt
            if seen is not None:
                seen.scatter_(1, nxt[:, None], True)
            pending.append(nxt)
            if logprobs is not None:
                pending_logps.append(token_logprob(raw, nxt, temperature))
            cur += 1
            last = step == max_new_tokens - 1
            full = cur - min(start) > C  # some window would overfill with the token fed next
            if len(pending) >= sync_every or last or full:
                steps = torch.stack(pending, 1).tolist()  # (B, k)
                step_logps = torch.stack(pending_logps, 1).tolist() if logprobs is not None else None
                for k, new in enumerate(zip(*steps, strict=True)):  # k steps
                    yield settle(list(new), None if step_logps is None else [row[k] for row in step_logps])
                    if all(finished):
                        return
                pending, pending_logps = [], []
            if last:
                break
            if full:  # flushed above, so `finished` is current
                restart, refill = [], []
                for r in range(B):
                    if cur - start[r] > C:  # a finished row's output no longer matters: it keeps just the token fed next
                        start[r] = cur - (1 if finished[r] else keep)
                        restart.append(r)
                        if not finished[r]:
                            refill.append(r)
                if cache is not None:
                    reset(cache, restart)
                    if refill and keep > 1:
                        prefill(model, cache, tokens[refill, cur - keep : cur - 1], refill)
            if cache is None:
                logits = recompute(cur)
            else:
                if step_fn is not decode_step:  # CUDA graphs: this step's outputs may overwrite the last one's
                    torch.compiler.cudagraph_mark_step_begin()
                logits = step_fn(model, cache, tokens[:, cur - 1 : cur])
                switch = [r for r in range(B) if crosses_long_rope(model, cur - 1 - start[r], 1)]
                if switch:  # those rows' steps are replaced: each row's whole window, encoded again
                    reset(cache, switch)
                    window, counts = windows(cur)
                    again = prefill(model, cache, window[switch], switch, lengths=[counts[r] for r in switch])
                    logits = logits.index_copy(0, torch.tensor(switch, device=device), again)
    finally:
        model.train(was_training)


@_without_grad
def stream(
    model: nn.Module, prompts: Sequence[Sequence[int]], *, max_new_tokens: int, temperature: float = 1.0,
    top_k: int | None = None, top_p: float | None = None, repetition_penalty: float = 1.0,
    stop_token_ids: Sequence[int] = (), seed: int | Sequence[int] | None = None, use_cache: bool = True,
    pad_id: int = 0, should_stop: Callable[[int, list[int]], bool] | None = None, window_margin: int | None = None,
    num_samples: int = 1, compile: bool | str = False, sync_every: int = 1, grammar: Grammar | None = None,
) -> Iterator[list[int | None]]:
    """Yield, per step, one entry per row: its new token id, or None once that row has finished.

    Rows are the prompts, or with num_samples=n, n rows per prompt (prompt i's are i*n .. i*n + n - 1):
    each prompt is prefilled once and its cache row forked into the other n - 1.
    A row finishes on a token in stop_token_ids (which is not yielded) or when
    `should_stop(row, tokens_so_far)` returns True (the token that triggered it is yielded).
    seed: an int s gives row r the seed s + r (so row r of one run equals a run of its prompt alone with
    seed s + r); a sequence gives one seed per row; None draws them from torch's global generator.
    window_margin: past the context, a full window is cut to its last max_seq_len - window_margin
    tokens (None: a quarter of the context; 0: nanoGPT's crop to the last max_seq_len every step).
    The repetition penalty counts every token so far, inside the window or not.
    `use_cache=False` recomputes each row's window every step (the reference the cache is tested on).
    compile: run `decode_step` compiled (True: `compiled_decode_step()`'s mode, or a mode's name).
    sync_every: steps run on the device between reads of their tokens on the host; > 1 lets a GPU queue
    steps without waiting, and the steps then arrive in bursts of that many (see `generate`).
    grammar: every row's text stays inside it (`temper.infer.grammar`; each step then syncs with the host) and
    finishes where it is complete; the log-probs stay the model's.
    The model runs in eval mode meanwhile; its mode is restored afterwards.
    """
    yield from _run(model, prompts, max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                    repetition_penalty=repetition_penalty, stop_token_ids=stop_token_ids, seed=seed,
                    use_cache=use_cache, pad_id=pad_id, should_stop=should_stop, window_margin=window_margin,
                    num_samples=num_samples, compile=compile, sync_every=max(1, sync_every), grammar=grammar)


@_without_grad
def generate(
    model: nn.Module, prompts: Sequence[Sequence[int]], *, max_new_tokens: int, temperature: float = 1.0,
    top_k: int | None = None, top_p: float | None = None, repetition_penalty: float = 1.0,
    stop_token_ids: Sequence[int] = (), seed: int | Sequence[int] | None = None, use_cache: bool = True,
    pad_id: int = 0, should_stop: Callable[[int, list[int]], bool] | None = None, window_margin: int | None = None,
    num_samples: int = 1, compile: bool | str = False, sync_every: int | None = None, grammar: Grammar | None = None,
) -> list[list[int]]:
    """The new token ids of each row (prompt not included, stop token not included); see `stream`.

    sync_every: steps run on the device between reads of their tokens on the host (None: 1 on the
    CPU, where there is nothing to overlap, 8 on a GPU, which then queues steps without waiting; a
    batch whose rows all stopped runs at most sync_every - 1 steps too many, whose tokens are dropped).
    """
    device = next(model.parameters()).device
    every = sync_every if sync_every is not None else (1 if device.type == "cpu" else 8)
    outputs: list[list[int]] = [[] for _ in range(len(prompts) * num_samples)]
    for step in _run(model, prompts, max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k,
                     top_p=top_p, repetition_penalty=repetition_penalty, stop_token_ids=stop_token_ids, seed=seed,
                     use_cache=use_cache, pad_id=pad_id, should_stop=should_stop, window_margin=window_margin,
                     num_samples=num_samples, compile=compile, sync_every=max(1, every), grammar=grammar):
        for i, t in enumerate(step):
            if t is not None:
                outputs[i].append(t)
    return outputs


@_without_grad
def generate_with_logprobs(
    model: nn.Module, prompts: Sequence[Sequence[int]], *, max_new_tokens: int, temperature: float = 1.0,
    top_k: int | None = None, top_p: float | None = None, stop_token_ids: Sequence[int] = (),
    seed: int | Sequence[int] | None = None, pad_id: int = 0,
    should_stop: Callable[[int, list[int]], bool] | None = None, num_samples: int = 1, compile: bool | str = False,
    sync_every: int | None = None, grammar: Grammar | None = None,
) -> tuple[list[list[int]], list[list[float]]]:
    """`generate`, with each kept token's log-prob (`token_logprob`) from the same pass: RL rollouts.

    No repetition penalty (it would make the sampling distribution differ from the policy's).
    """
    device = next(model.parameters()).device
    every = sync_every if sync_every is not None else (1 if device.type == "cpu" else 8)
    outputs: list[list[int]] = [[] for _ in range(len(prompts) * num_samples)]
    logprobs: list[list[float]] = [[] for _ in outputs]
    for step in _run(model, prompts, max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k,
                     top_p=top_p, repetition_penalty=1.0, stop_token_ids=stop_token_ids, seed=seed,
                     use_cache=True, pad_id=pad_id, should_stop=should_stop, window_margin=None,
                     num_samples=num_samples, compile=compile, sync_every=max(1, every), logprobs=logprobs,
                     grammar=grammar):
        for i, t in enumerate(step):
            if t is not None:
                outputs[i].append(t)
    return outputs, logprobs
