"""Continuous batching: requests join and leave one running batch of KV-cache rows at every decode step.

A server cannot wait for a whole batch to finish before starting the next one: short answers would
wait for long ones and new requests for everybody. Orca (Yu et al. 2022, "iteration-level
scheduling") and vLLM instead schedule at every step: a request is admitted into free rows of the
running batch as soon as there are some, decodes beside the others one token per step, and leaves
(its rows freed) as soon as it stops. Here the rows are those of one static `KVCache` (gpt-fast's,
with per-row lengths), so every decode step has the same shapes (one compiled graph) and a row's
computation does not depend on its neighbours: a request's greedy output is what
`engine.generate` gives for it alone, and its seeded samples too (the draw hashes the row's own
seed and step, see `temper.infer.engine`).

`Scheduler` owns the model and the cache and runs them in ONE thread (the model is not thread-safe, and one
thread keeps the batch whole): a background thread of its own (`start`), or the caller's (`run`: `temper serve`
runs it on the main thread, which loaded the model, for the reason `run` gives). Callers (the asyncio server,
tests) `submit` a `Request` with a `deliver` callback and get a `Ticket`; the thread calls `deliver` with `Token`,
`Finished` and `Failed` events (an asyncio caller hops them onto its loop with `loop.call_soon_threadsafe`), and
runs what callers hand it with `call`. Each iteration of the thread:
  1. drops cancelled requests (a client that went away) and those past their deadline, freeing
     their rows at once;
  2. admits waiting requests, first come first served, into free rows: one `prefill` of their
     prompts; a request for n choices is prefilled once and `fork`ed into n rows, choice i seeded
     with seed + i (as `generate(num_samples=n, seed=s)`);
  3. samples one token per live row with that request's temperature / top-k / top-p (rows grouped
     by settings; OpenAI's penalties and a grammar's mask shape a row's draw), with its log-prob
     (`token_logprob`), and delivers it; a row ends on a stop id (not delivered: "stop"), where its
     grammar's text is complete ("stop"), at max_tokens or when its cache row is full ("length");
  4. runs ONE `decode_step` over the rows up to the last live one and the slots they fill (`cache.window`;
     a compiled step, whose shapes are fixed, over all rows and slots; idle rows compute garbage nobody
     reads); or, with a drafter (a draft model or prompt lookup) while exactly one request with n = 1 runs
     and none waits, a speculative round on its row instead (below).
This loop is the server's only decoding loop, built from the engine's prefill / decode_step / fork /
sample_next, as DESIGN.md's seam for new ways to generate asks. The waiting queue is bounded:
`submit` raises `QueueFull` when it is full (an HTTP 429), so load beyond capacity is refused at
once instead of piling up latency.

Speculative decoding (`temper.infer.speculative`) pays off at batch 1, where a decode step reads all
the weights for one token; a batch already shares those reads among its rows. So it runs only while
one request (n = 1) is alone: each iteration, a `Speculator` drafts k tokens after the row's
sequence, the target verifies them in one `prefill(..., all_logits=True)` on the request's own cache
row, and the row's length is set back past the rejected drafts, so the row holds exactly its
accepted tokens, as with plain steps. The accepted drafts and the target's own token are delivered
at once (log-probs from the verifying pass); that last token is fed next, by the next round or, as
soon as another request arrives, by the batch's plain `decode_step` (the draft model's cache, kept
per request while it speculates, is dropped then, and prefilled again when it is alone again).
Greedy output is unchanged (up to rounding: a pass over k + 1 tokens may round differently from
one-token steps); sampled tokens keep the target's distribution (exact rejection sampling), but a
speculated request draws from a torch.Generator seeded from its seed and position, not the engine's
hashed draws, so a seeded request's text depends on whether it ran alone. Drafted and accepted
counts are kept (`speculative`, for /metrics) and logged per request.

It does not tokenize, cut stop strings (text: the caller decodes and `cancel`s a choice whose text
reached one) or know HTTP (`temper.serve.app`). No prefix caching: a shared system prompt is
prefilled again for every request.
"""

from __future__ import annotations

import collections
import logging
import random
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from temper.infer.cache import fork, new_cache, reset, window
from temper.infer.engine import (
    apply_openai_penalties,
    crosses_long_rope,
    decode_step,
    prefill,
    sample_next,
    token_logprob,
)
from temper.infer.grammar import Grammar, GrammarError, Matcher, mask_rows_
from temper.infer.speculative import Round, SpeculativeStats, Speculator, check_drafter

log = logging.getLogger(__name__)


class QueueFull(RuntimeError):
    """The waiting queue is full: the caller should answer "try again later" (HTTP 429)."""


class NotRunning(RuntimeError):
    """The scheduler is stopped (or stopping): no request is accepted (HTTP 503)."""


@dataclass(frozen=True)
class Request:
    """One prompt to complete n times, with its sampling settings (checked by the caller)."""

    prompt: Sequence[int]
    max_tokens: int
    temperature: float = 1.0
    """0: greedy (argmax)."""
    top_k: int | None = None
    top_p: float | None = None
    seed: int | None = None
    """Choice i samples with seed + i; None: a random seed."""
    n: int = 1
    stop_ids: Sequence[int] = ()
    """Token ids that end a choice (not delivered): the checkpoint's EOS ids."""
    top_logprobs: int = 0
    """How many of the most likely tokens (with log-probs) to deliver beside each sampled one."""
    presence_penalty: float = 0.0
    """OpenAI's: taken off the logit of every token the choice has generated (`apply_openai_penalties`)."""
    frequency_penalty: float = 0.0
    """OpenAI's: taken off a token's logit once per time the choice has generated it."""
    logit_bias: Mapping[int, float] = field(default_factory=dict)
    """OpenAI's: added to the logits of these token ids at every draw."""
    grammar: Grammar | None = None
    """Constrained decoding (`temper.infer.grammar`): each choice's text stays inside this grammar, and ends (stop)
    where it is complete and nothing may follow."""
    prompt_logprobs: bool = False
    """Also deliver the prompt's tokens' log-probs (with top_logprobs of the most likely each), a `PromptLogprobs`
    before any token: what /v1/completions' echo returns, and lm-eval-harness reads for a log-likelihood."""
    timeout_s: float | None = None
    """Seconds from submission after which the request fails with "timeout" and its rows are freed."""


def _shapes_logits(q: Request) -> bool:
    return bool(q.presence_penalty or q.frequency_penalty or q.logit_bias or q.grammar)


@dataclass(frozen=True)
class Token:
    """Choice `index` produced `token`, with log p(token) under softmax(logits / temperature)."""

    index: int
    token: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()


@dataclass(frozen=True)
class PromptLogprobs:
    """log p(prompt[j] | prompt[:j]) for j >= 1 under the model's softmax, and each position's most likely tokens."""

    logprobs: tuple[float, ...]
    top: tuple[tuple[tuple[int, float], ...], ...]


@dataclass(frozen=True)
class Finished:
    """Choice `index` ended: "stop" (a stop id) or "length" (max_tokens, or its cache row is full)."""

    index: int
    reason: str


@dataclass(frozen=True)
class Failed:
    """The whole request ended without finishing: "timeout", "shutdown" or "error"."""

    reason: str
    message: str


Event = Token | PromptLogprobs | Finished | Failed
Deliver = Callable[[Event], None]


@dataclass(eq=False)
class Ticket:
    """A submitted request: what `cancel` takes. Its rows and state belong to the scheduler's thread."""

    request: Request
    deliver: Deliver
    deadline: float | None
    seeds: list[int]
    rows: list[int | None] = field(default_factory=list)
    """Choice i's cache row (None once it ended); empty while waiting."""
    cancelled: set[int] = field(default_factory=set)
    """Choices cancelled while the request waited: ended as soon as it is admitted."""
    done: bool = False


@dataclass
class _Row:
    ticket: Ticket
    index: int  # the choice
    seed: int
    seq: list[int]  # the prompt and the tokens delivered: what a drafter continues
    generated: int = 0  # tokens sampled so far: the step of the next draw
    held: int = 0  # tokens in the cache row
    pending: bool = False  # a speculative round chose (and delivered) the token in _feed: no sampling before it is fed
    spec: Speculator | None = None  # while it speculates: its drafter (the draft model's cache) and sampler
    matcher: Matcher | None = None  # its place in the request's grammar
    stats: SpeculativeStats = field(default_factory=SpeculativeStats)


class Scheduler:
    """Continuous batching over `slots` rows of one KV cache, in a background thread (module docstring).

    model: in eval mode, on its device; max_len: tokens per cache row (default and at most the
    model's context); max_queue: requests that may wait for rows; max_prefill_tokens: prompt tokens
    admitted per iteration (at least one request), which bounds a prefill's memory and the pause it
    causes to running rows; step_fn: `decode_step` or a compiled one (`compiled_decode_step()`).
    draft (a draft model with the model's vocabulary, on its device) or prompt_lookup (the n-gram
    size): speculative decoding of a request running alone, num_draft_tokens per round.
    """

    def __init__(self, model: nn.Module, *, slots: int = 16, max_queue: int = 64, max_len: int | None = None,
                 max_prefill_tokens: int = 8192, step_fn: Callable = decode_step, draft: nn.Module | None = None,
                 prompt_lookup: int | None = None, num_draft_tokens: int = 4) -> None:
        context = model.cfg.max_seq_len
        self.max_len = context if max_len is None else max_len
        if slots < 1 or max_queue < 0 or not 0 < self.max_len <= context or max_prefill_tokens < 1:
            raise ValueError(f"need slots >= 1, max_queue >= 0, max_len in [1, {context}] and max_prefill_tokens "
                             f">= 1, got {slots}, {max_queue}, {self.max_len}, {max_prefill_tokens}")
        self.model, self.slots, self.max_queue = model, slots, max_queue
        if draft is not None or prompt_lookup is not None:
            check_drafter(model, draft, prompt_lookup, num_draft_tokens)
            draft = draft.eval() if draft is not None else None
        self.draft, self.prompt_lookup, self.num_draft_tokens = draft, prompt_lookup, num_draft_tokens
        self.speculative = SpeculativeStats() if draft is not None or prompt_lookup is not None else None
        """Drafted and accepted tokens since start (None: no drafter); Prometheus reads it."""
        self.max_prefill_tokens, self.step_fn = max_prefill_tokens, step_fn
        self._lock = threading.Condition()
        self._waiting: collections.deque[Ticket] = collections.deque()
        self._cancels: list[tuple[Ticket, int | None]] = []
        self._calls: list[tuple[Callable[[], Any], Future]] = []
        self._stopping = False
        self._thread: threading.Thread | None = None
        self._exited = threading.Event()  # the loop has ended (set by _main, whichever thread ran it)
        self._rows: list[_Row | None] = [None] * slots
        self._running = 0
        self.tokens_generated = 0
        """Tokens delivered since start (a Prometheus counter reads it)."""
        self.steps = 0
        """Decode steps (or speculative rounds) run since start."""
        self._recent: collections.deque[tuple[float, int]] = collections.deque()  # (time, tokens) per step

    # ---- the caller's side (any thread) ----------------------------------------------------------

    def start(self) -> None:
        """Start the loop in a thread of its own (again after `stop`); a no-op while it runs."""
        with self._lock:
            if self._running_loop():
                return
            self._stopping = False
            self._exited.clear()
            self._thread = threading.Thread(target=self._main, name="temper-scheduler", daemon=True)
            self._thread.start()

    def run(self, on_start: Callable[[], None] | None = None) -> None:
        """Run the loop in the calling thread until `stop` (called from another thread); `on_start` is called once
        the loop owns the thread (`start` is then a no-op), e.g. to start the HTTP server whose app calls `start`.

        Why `temper serve` runs the model on its main thread: PyTorch's CPU kernels run on OpenMP (libgomp), which
        keeps a pool of worker threads per thread that runs parallel work. The main thread that loaded the model has
        one; a scheduler thread gets a second, and with more pooled threads than cores libgomp stops its workers'
        spinning between parallel regions, so each of a decode step's hundreds of small products waits for its
        workers to wake: 2.2x slower decoding at batch 1 on a 2-core CPU (measured: 59 against 130 tokens/s)."""
        with self._lock:
            if self._running_loop():
                raise RuntimeError("the scheduler runs already")
            self._stopping = False
            self._exited.clear()
            self._thread = threading.current_thread()
        if on_start is not None:
            on_start()
        self._main()

    def stop(self, timeout: float | None = 30.0) -> None:
        """End the loop, waiting for it up to `timeout` seconds; running and waiting requests get
        Failed("shutdown")."""
        with self._lock:
            self._stopping = True
            self._lock.notify_all()
            started = self._thread is not None
        if started:
            self._exited.wait(timeout)

    def _running_loop(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and not self._exited.is_set()

    def submit(self, request: Request, deliver: Deliver) -> Ticket:
        """Queue `request`; `deliver` is called from the scheduler's thread with its events.

        Raises QueueFull when max_queue requests wait already, NotRunning when stopped, ValueError
        when it can never be admitted (more choices than slots, an empty prompt or one that leaves
        no room in a cache row).
        """
        if not 1 <= request.n <= self.slots:
            raise ValueError(f"n must be in [1, {self.slots}] (the server's slots), got {request.n}")
        if not 0 < len(request.prompt) <= self.max_len:
            raise ValueError(f"the prompt must have 1 .. {self.max_len} tokens, got {len(request.prompt)}")
        if request.max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {request.max_tokens}")
        base = request.seed if request.seed is not None else random.getrandbits(62)
        deadline = None if request.timeout_s is None else time.monotonic() + request.timeout_s
        ticket = Ticket(request, deliver, deadline, [base + i for i in range(request.n)])
        with self._lock:
            if self._stopping or not self._running_loop():
                raise NotRunning("the scheduler is not running")
            if len(self._waiting) >= self.max_queue:
                raise QueueFull(f"{len(self._waiting)} requests are waiting already (max_queue={self.max_queue})")
            self._waiting.append(ticket)
            self._lock.notify_all()
        return ticket

    def call(self, fn: Callable[[], Any]) -> Future:
        """Run `fn` on the loop's thread before its next step; its result (or exception) comes in the future. Work
        that runs a torch model beside this one (a retriever's query embedding) goes here, so that one thread runs
        all of the process's parallel CPU work (`run` says why). The batch waits meanwhile."""
        future: Future = Future()
        with self._lock:
            if self._stopping or not self._running_loop():
                raise NotRunning("the scheduler is not running")
            self._calls.append((fn, future))
            self._lock.notify_all()
        return future

    def cancel(self, ticket: Ticket, index: int | None = None) -> None:
        """End choice `index` of `ticket` (None: all of it) and free its rows at the next iteration.

        Nothing more is delivered for what was cancelled: the caller asked (a stop string) or left.
        """
        with self._lock:
            self._cancels.append((ticket, index))
            self._lock.notify_all()

    @property
    def queued(self) -> int:
        """Requests waiting for rows."""
        return len(self._waiting)

    @property
    def running(self) -> int:
        """Rows decoding now."""
        return self._running

    def tokens_per_second(self, window: float = 10.0) -> float:
        """Tokens delivered per second over the last `window` seconds."""
        now = time.monotonic()
        while True:
            try:
                steps = tuple(self._recent)  # the scheduler's thread appends meanwhile
                break
            except RuntimeError:
                continue
        return sum(n for t, n in steps if now - t <= window) / window

    # ---- the scheduler's thread ------------------------------------------------------------------

    def _main(self) -> None:
        try:
            self._loop()
        finally:
            self._exited.set()

    def _loop(self) -> None:
        device = next(self.model.parameters()).device
        self.model.eval()  # the server owns the model: no dropout
        with torch.inference_mode():
            self._cache = new_cache(self.model, self.slots, self.max_len)
            self._logits = torch.zeros(self.slots, self.model.cfg.vocab_size, device=device)
            self._feed = [0] * self.slots  # the token each row is fed next (idle rows: anything)
            while True:
                with self._lock:
                    while (not self._stopping and not self._waiting and not self._cancels and not self._running
                           and not self._calls):
                        self._lock.wait(timeout=1.0)
                    if self._stopping:
                        break
                    cancels, self._cancels = self._cancels, []
                    calls, self._calls = self._calls, []
                for fn, future in calls:
                    try:
                        future.set_result(fn())
                    except Exception as e:  # the caller's to handle
                        future.set_exception(e)
                try:
                    self._iterate(cancels)
                except Exception as e:  # a bug or out of memory: fail what runs, keep serving
                    log.exception("scheduler iteration failed")
                    self._fail_all("error", f"generation failed: {type(e).__name__}: {e}")
            self._fail_all("shutdown", "the server is shutting down")

    def _iterate(self, cancels: list[tuple[Ticket, int | None]]) -> None:
        for ticket, index in cancels:
            self._cancel(ticket, index)
        self._expire(time.monotonic())
        self._admit()
        live = [r for r, row in enumerate(self._rows) if row is not None]
        if not live:
            return
        fresh = [r for r in live if not self._rows[r].pending]  # a pending row's token is chosen already
        if fresh:
            self._sample(fresh)
        live = [r for r, row in enumerate(self._rows) if row is not None]
        self._running = len(live)
        if not live:
            return
        self.steps += 1
        if self._alone(live):
            self._speculate(live[0])
            return
        feed = torch.tensor(self._feed, device=self._logits.device)[:, None]  # (slots, 1)
        if self.step_fn is decode_step:  # eager: the rows up to the last live one, over the slots they fill
            rows, slots = live[-1] + 1, min(self.max_len, -(-(max(self._rows[r].held for r in live) + 1) // 128) * 128)
            self._logits[:rows] = decode_step(self.model, window(self._cache, rows, slots), feed[:rows])
        else:  # CUDA graphs: the next step's outputs overwrite this one's, which admissions write into
            torch.compiler.cudagraph_mark_step_begin()
            self._logits = self.step_fn(self.model, self._cache, feed).clone()
        for r in live:
            row = self._rows[r]
            if crosses_long_rope(self.model, row.held, 1):  # its step replaced: the whole row encoded again
                reset(self._cache, [r])
                self._logits[r] = prefill(self.model, self._cache, [row.seq], [r])[0]
            row.held += 1
            row.pending, row.spec = False, None  # decoding in the batch: its draft cache is freed

    def _alone(self, live: list[int]) -> bool:
        """Whether to speculate: a drafter is set and one request with n = 1 runs while none waits (and its draws
        are the model's own: no penalty, bias or grammar)."""
        q = self._rows[live[0]].ticket.request
        return (self.speculative is not None and len(live) == 1 and q.n == 1 and not _shapes_logits(q)
                and not self._waiting)

    def _speculate(self, r: int) -> None:
        """One speculative round on row r (the module docstring): deliver what it commits, end the row
        on a stop id or at its limits, else leave its last token pending in _feed."""
        row = self._rows[r]
        ticket, q = row.ticket, row.ticket.request
        if row.spec is None:  # a Generator seeded from the seed and the position: no draws reused on a return
            row.spec = Speculator(self.model, draft=self.draft, prompt_lookup=self.prompt_lookup,
                                  k=self.num_draft_tokens, temperature=q.temperature, top_k=q.top_k or None,
                                  top_p=q.top_p, seed=hash((row.seed, row.generated)), total=self.max_len)
        # The row holds seq[:-1]: its last token and the drafts must fit, and so must the tokens delivered.
        room = min(self.max_len - row.held - 1, q.max_tokens - row.generated - 1)
        done = row.spec.round(self._cache, r, row.seq, room)
        row.held += 1 + done.accepted
        for stats in (self.speculative, row.stats):
            stats.count(done)
        delivered = self._deliver_round(row, done)
        for stats in (self.speculative, row.stats):
            stats.tokens += delivered
        self._count(delivered)
        if delivered < len(done.tokens):
            self._finish(ticket, row.index, "stop")
        elif row.generated >= q.max_tokens or row.held >= self.max_len:
            self._finish(ticket, row.index, "length")
        else:
            self._feed[r], row.pending = done.tokens[-1], True

    def _deliver_round(self, row: _Row, done: Round) -> int:
        """Deliver a round's tokens up to a stop id (not delivered); how many were delivered."""
        q = row.ticket.request
        tokens = torch.tensor(done.tokens, device=done.logits.device)
        logps, tops = _logprobs(done.logits, tokens, q.temperature, q.top_logprobs)
        for i, (t, lp, tp) in enumerate(zip(done.tokens, logps, tops, strict=True)):
            row.generated += 1
            if t in q.stop_ids:
                return i
            row.ticket.deliver(Token(row.index, t, lp, tp))
            row.seq.append(t)
        return len(done.tokens)

    def _free(self, ticket: Ticket, index: int) -> None:
        row = ticket.rows[index]
        if row is not None:
            if self._rows[row].stats.target_passes:
                log.info("speculative decoding: %s", self._rows[row].stats.describe())
            self._rows[row] = None
            ticket.rows[index] = None
            reset(self._cache, [row])
        if all(r is None for r in ticket.rows):
            ticket.done = True
        self._running = sum(r is not None for r in self._rows)

    def _end(self, ticket: Ticket) -> None:
        """Take `ticket` out of the queue or the batch, delivering nothing."""
        with self._lock:
            if ticket in self._waiting:
                self._waiting.remove(ticket)
        for i in range(len(ticket.rows)):
            self._free(ticket, i)
        ticket.done = True

    def _cancel(self, ticket: Ticket, index: int | None) -> None:
        if index is None:
            self._end(ticket)
        elif not ticket.rows:  # a choice of a waiting request has no row yet
            ticket.cancelled.add(index)
        elif 0 <= index < len(ticket.rows):
            self._free(ticket, index)

    def _expire(self, now: float) -> None:
        with self._lock:
            waiting = list(self._waiting)
        running = {row.ticket for row in self._rows if row is not None}
        for ticket in [*waiting, *running]:
            if ticket.deadline is not None and now > ticket.deadline and not ticket.done:
                self._end(ticket)
                ticket.deliver(Failed("timeout", f"the request ran past its {ticket.request.timeout_s:g} s timeout"))

    def _admit(self) -> None:
        free = [r for r, row in enumerate(self._rows) if row is None]
        admitted: list[Ticket] = []
        budget = self.max_prefill_tokens
        with self._lock:
            while self._waiting and self._waiting[0].request.n <= len(free):
                size = len(self._waiting[0].request.prompt)
                if admitted and size > budget:
                    break
                ticket = self._waiting.popleft()
                ticket.rows, free = free[: ticket.request.n], free[ticket.request.n :]
                budget -= size
                admitted.append(ticket)
        if not admitted:
            return
        for ticket in admitted:
            if ticket.request.prompt_logprobs:
                ticket.deliver(self._prompt_logprobs(ticket.request))
        firsts = [t.rows[0] for t in admitted]
        reset(self._cache, [r for t in admitted for r in t.rows])
        logits = prefill(self.model, self._cache, [list(t.request.prompt) for t in admitted], firsts)
        for ticket, first, lg in zip(admitted, firsts, logits, strict=True):
            if len(ticket.rows) > 1:
                fork(self._cache, first, ticket.rows[1:])
            for i, r in enumerate(ticket.rows):
                self._logits[r] = lg
                grammar = ticket.request.grammar
                self._rows[r] = _Row(ticket, i, ticket.seeds[i], list(ticket.request.prompt),
                                     held=len(ticket.request.prompt), matcher=grammar.matcher() if grammar else None)
            for i in sorted(ticket.cancelled):
                self._cancel(ticket, i)

    def _prompt_logprobs(self, q: Request) -> PromptLogprobs:
        """The prompt's log-probs, from one forward pass over it without the cache (on this thread: the model is
        only ever called here)."""
        ids = torch.tensor([list(q.prompt)], device=self._logits.device)  # (1, T)
        logits = self.model(ids)[0, :-1]  # (T - 1, V): position j predicts token j + 1
        logps, top = _logprobs(logits, ids[0, 1:], 0.0, q.top_logprobs)
        return PromptLogprobs(tuple(logps), tuple(top))

    def _sample(self, live: list[int]) -> None:
        """One token per live row (step 3 of the module docstring), delivered; ended rows freed."""
        groups: dict[tuple[float, int | None, float | None], list[int]] = collections.defaultdict(list)
        for r in live:
            q = self._rows[r].ticket.request
            groups[(q.temperature, q.top_k or None, q.top_p)].append(r)
        device = self._logits.device
        out: dict[int, tuple[int, float, tuple[tuple[int, float], ...]]] = {}
        for (temperature, top_k, top_p), rows in groups.items():
            idx = torch.tensor(rows, device=device)
            logits = self._logits[idx]  # (G, V)
            # OpenAI's penalties and biases and a grammar's mask shape the draw; the log-probs delivered are the
            # model's (vLLM's default)
            shaping = [i for i, r in enumerate(rows) if _shapes_logits(self._rows[r].ticket.request)]
            shaped = logits.clone() if shaping else logits
            for i in shaping:
                row = self._rows[rows[i]]
                q = row.ticket.request
                if q.presence_penalty or q.frequency_penalty or q.logit_bias:
                    generated = torch.tensor(row.seq[len(q.prompt):], dtype=torch.long, device=device)
                    shaped[i] = apply_openai_penalties(logits[i], generated, q.presence_penalty, q.frequency_penalty,
                                                       q.logit_bias)
            constrained = [i for i in shaping if self._rows[rows[i]].matcher is not None]
            if constrained:  # the grammars' masks, computed together
                matchers = [self._rows[rows[i]].matcher for i in constrained]
                shaped[constrained] = mask_rows_(shaped[constrained], matchers)
            seeds = torch.tensor([self._rows[r].seed for r in rows], device=device)
            steps = torch.tensor([self._rows[r].generated for r in rows], device=device)
            tokens = sample_next(shaped, temperature=temperature, top_k=top_k, top_p=top_p, seeds=seeds, step=steps)
            k = max(self._rows[r].ticket.request.top_logprobs for r in rows)
            logps, top = _logprobs(logits, tokens, temperature, k)
            for r, t, lp, tp in zip(rows, tokens.tolist(), logps, top, strict=True):
                out[r] = (t, lp, tp[: self._rows[r].ticket.request.top_logprobs])
        delivered = 0
        for r in live:
            row = self._rows[r]
            if row is None:  # its request failed on another of its rows
                continue
            t, lp, tp = out[r]
            ticket, q = row.ticket, row.ticket.request
            row.generated += 1
            if t in q.stop_ids:
                self._finish(ticket, row.index, "stop")
                continue
            try:
                if row.matcher is not None:
                    row.matcher.advance(t)
            except GrammarError as e:  # llguidance's limits (a grammar too costly to parse): this request only
                self._end(ticket)
                ticket.deliver(Failed("error", str(e)))
                continue
            ticket.deliver(Token(row.index, t, lp, tp))
            row.seq.append(t)
            delivered += 1
            if row.matcher is not None and row.matcher.done:  # the text is complete: only EOS could follow
                self._finish(ticket, row.index, "stop")
            elif row.generated >= q.max_tokens or row.held >= self.max_len:
                self._finish(ticket, row.index, "length")
            else:
                self._feed[r] = t
        self._count(delivered)

    def _count(self, delivered: int) -> None:
        """Tokens delivered by one iteration, for tokens_generated and tokens_per_second."""
        self.tokens_generated += delivered
        now = time.monotonic()
        self._recent.append((now, delivered))
        while self._recent and now - self._recent[0][0] > 60:
            self._recent.popleft()

    def _finish(self, ticket: Ticket, index: int, reason: str) -> None:
        self._free(ticket, index)
        ticket.deliver(Finished(index, reason))

    def _fail_all(self, reason: str, message: str) -> None:
        with self._lock:
            waiting, self._waiting = list(self._waiting), collections.deque()
            calls, self._calls = self._calls, []
        for _, future in calls:
            future.set_exception(NotRunning(message))
        tickets = {row.ticket for row in self._rows if row is not None} | set(waiting)
        for ticket in tickets:
            self._end(ticket)
            ticket.deliver(Failed(reason, message))
        self._running = 0


def _logprobs(logits: torch.Tensor, tokens: torch.Tensor, temperature: float, k: int
              ) -> tuple[list[float], list[tuple[tuple[int, float], ...]]]:
    """log p of each row's token (logits (n, V), tokens (n,)) and each row's k most likely tokens with
    theirs (k = 0: none), under softmax(logits / temperature) (temperature 0: softmax(logits))."""
    logps = token_logprob(logits, tokens, temperature).tolist()
    if not k:
        return logps, [()] * len(logps)
    scaled = logits.float() / temperature if temperature > 0 else logits.float()
    values, ids = scaled.log_softmax(-1).topk(min(k, logits.shape[-1]), dim=-1)
    return logps, [tuple(zip(i, v, strict=True)) for i, v in zip(ids.tolist(), values.tolist(), strict=True)]
