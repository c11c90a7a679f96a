"""Continuous batching: whatever shares the batch, and whenever a request joins it, its greedy and seeded
output equals `engine.generate` of it alone; the queue is bounded; cancelled and timed-out requests free
their rows at once."""

import queue
import threading
import time
from dataclasses import replace

import pytest
import torch

from temper.infer.engine import generate, generate_with_logprobs
from temper.infer.scheduler import Failed, Finished, NotRunning, QueueFull, Request, Scheduler, Token
from temper.model.config import PRESETS
from temper.model.transformer import Transformer

STOP = 3


def _model(**changes) -> Transformer:
    torch.manual_seed(0)
    model = Transformer(replace(PRESETS["debug-llama"], vocab_size=256, max_seq_len=64, **changes))
    with torch.no_grad():  # sharper than init, so greedy paths branch on the prompt
        for p in model.parameters():
            p.mul_(4.0)
    return model.eval()


@pytest.fixture(scope="module")
def model():
    return _model()


LATENT = {"n_kv_heads": None, "head_size": 24, "rope_dim": 8, "kv_lora_rank": 16, "q_lora_rank": 24, "v_head_size": 12}
"""DeepSeek-V3's latent attention: its cache rows (a latent and the rotated key part per token) move alike."""
HYBRID = {"norm_unit_offset": True, "qk_norm": True, "rope_dim": 8, "attn_output_gate": True, "full_attention_every": 2,
          "linear_key_heads": 2, "linear_value_heads": 4}
"""Qwen3.5's layers: the linear ones' states move with their rows, restart with a new request, and see no padding."""
SHORT_CONV = {"qk_norm": True, "attention_layers": (1,), "linear_layer": "short_conv", "linear_conv_size": 3}
"""LFM2's layers: a short convolution, then an attention layer."""
MAMBA2 = {"attention_layers": (), "no_mlp_layers": (0, 1), "linear_layer": "mamba2", "linear_key_heads": 2,
          "linear_value_heads": 4, "linear_key_size": 8, "linear_value_size": 16}
"""Mamba-Codestral's layers: Mamba 2 mixers alone, no attention layer at all (a cache of states only)."""
MAMBA = {"attention_layers": (1,), "linear_layer": "mamba", "linear_key_heads": 1, "linear_value_heads": 128,
         "linear_key_size": 8, "linear_value_size": 1, "linear_dt_rank": 4}
"""Mamba's layers (a state per channel, each value decaying at its own rate), then an attention layer, as Jamba's."""


class Collector:
    """A request's events, gathered from the scheduler's thread."""

    def __init__(self, n: int = 1) -> None:
        self.tokens: list[list[int]] = [[] for _ in range(n)]
        self.logprobs: list[list[float]] = [[] for _ in range(n)]
        self.reasons: dict[int, str] = {}
        self.failed: Failed | None = None
        self.done = threading.Event()
        self.n = n

    def __call__(self, ev) -> None:
        if isinstance(ev, Token):
            self.tokens[ev.index].append(ev.token)
            self.logprobs[ev.index].append(ev.logprob)
        elif isinstance(ev, Finished):
            self.reasons[ev.index] = ev.reason
            if len(self.reasons) == self.n:
                self.done.set()
        else:
            self.failed = ev
            self.done.set()

    def wait(self) -> "Collector":
        assert self.done.wait(20), "the request did not finish"
        return self


def _prompts(k: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(1)
    return [torch.randint(4, 256, (int(torch.randint(1, 12, (1,), generator=g)),), generator=g).tolist()
            for _ in range(k)]


@pytest.mark.parametrize("attention", ["grouped", "latent", "hybrid", "short-conv", "mamba2", "mamba"])
def test_requests_joining_at_any_step_equal_generate_alone(model, attention):
    """More requests than slots, of different lengths and settings, arriving while others decode:
    greedy and seeded outputs (and log-probs) are what generate gives for each alone."""
    model = model if attention == "grouped" else _model(**{"latent": LATENT, "hybrid": HYBRID,
                                                          "short-conv": SHORT_CONV, "mamba2": MAMBA2,
                                                          "mamba": MAMBA}[attention])
    sched = Scheduler(model, slots=4, max_queue=32)
    sched.start()
    try:
        prompts = _prompts(10)
        settings = [dict(temperature=0.0), dict(temperature=0.8, top_k=20, seed=7), dict(temperature=1.0, top_p=0.9,
                                                                                         seed=11)]
        runs = []
        for i, p in enumerate(prompts):
            kw = settings[i % 3]
            c = Collector(2 if i == 4 else 1)
            sched.submit(Request(p, max_tokens=5 + i, stop_ids=[STOP], n=c.n, **kw), c)
            runs.append((p, 5 + i, kw, c))
            if i % 4 == 1:
                time.sleep(0.01)  # later requests join a running batch
        for p, max_tokens, kw, c in runs:
            c.wait()
            want, logps = generate_with_logprobs(model, [p], max_new_tokens=max_tokens, stop_token_ids=[STOP],
                                                 num_samples=c.n, **kw)
            assert c.tokens == want
            for got, ref in zip(c.logprobs, logps, strict=True):
                torch.testing.assert_close(torch.tensor(got), torch.tensor(ref), rtol=0, atol=1e-4)
            assert all(r in ("stop", "length") for r in c.reasons.values())
        assert sched.running == 0 and sched.queued == 0 and sched.tokens_generated > 0
    finally:
        sched.stop()


def test_full_rows_end_with_length_and_bad_requests_are_refused(model):
    sched = Scheduler(model, slots=2, max_queue=1, max_len=16)
    with pytest.raises(NotRunning):
        sched.submit(Request([5], max_tokens=1), Collector())
    sched.start()
    try:
        c = Collector()
        sched.submit(Request(list(range(4, 14)), max_tokens=50, temperature=0.0), c)
        assert c.wait().reasons == {0: "length"} and len(c.tokens[0]) == 16 - 10 + 1  # the last is never fed
        with pytest.raises(ValueError, match="n must be"):
            sched.submit(Request([5], max_tokens=1, n=3), Collector())
        with pytest.raises(ValueError, match="prompt"):
            sched.submit(Request([], max_tokens=1), Collector())
    finally:
        sched.stop()


def test_queue_is_bounded_and_cancel_frees_rows_at_once(model):
    sched = Scheduler(model, slots=1, max_queue=1)
    sched.start()
    try:
        long = Collector()
        ticket = sched.submit(Request([5, 6, 7], max_tokens=10_000, temperature=0.0), long)
        deadline = time.monotonic() + 10
        while sched.running == 0 and time.monotonic() < deadline:
            time.sleep(0.005)
        assert sched.running == 1
        waiting = Collector()
        sched.submit(Request([9], max_tokens=3, temperature=0.0), waiting)
        assert sched.queued == 1
        with pytest.raises(QueueFull):
            sched.submit(Request([9], max_tokens=3), Collector())
        sched.cancel(ticket)  # the waiting request gets the row at the next iteration
        waiting.wait()
        assert waiting.tokens == generate(model, [[9]], max_new_tokens=3, temperature=0.0)
        assert not long.done.is_set() and sched.running == 0
    finally:
        sched.stop()


def test_timeouts_fail_the_request_and_free_its_rows(model):
    sched = Scheduler(model, slots=2, max_queue=4)
    sched.start()
    try:
        c = Collector(2)

        def slow(ev) -> None:  # a slow step: the rows cannot fill up before the deadline
            time.sleep(0.01)
            c(ev)

        sched.submit(Request([5, 6], max_tokens=10_000, n=2, timeout_s=0.2), slow)
        c.wait()
        assert c.failed is not None and c.failed.reason == "timeout"
        assert sched.running == 0
    finally:
        sched.stop()
    stopped = Collector()
    sched.start()  # a stopped scheduler starts again; stopping fails what was running
    sched.submit(Request([5], max_tokens=10_000), stopped)
    sched.stop()
    assert stopped.wait().failed.reason == "shutdown"


def test_a_choice_cancelled_mid_way_leaves_its_sibling_alone(model):
    sched = Scheduler(model, slots=2, max_queue=4)
    events: queue.Queue = queue.Queue()
    sched.start()
    try:
        ticket = sched.submit(Request([5, 6], max_tokens=12, n=2, temperature=0.9, seed=3), events.put)
        first = events.get(timeout=10)
        assert isinstance(first, Token)
        sched.cancel(ticket, 1)
        got: list[int] = [first.token] if first.index == 0 else []
        while True:
            ev = events.get(timeout=10)
            if isinstance(ev, Finished) and ev.index == 0:
                break
            if isinstance(ev, Token) and ev.index == 0:
                got.append(ev.token)
        assert got == generate(model, [[5, 6]], max_new_tokens=12, temperature=0.9, seed=3)[0]
    finally:
        sched.stop()


@pytest.fixture(scope="module")
def small():
    """16 tokens: greedy paths soon repeat, so prompt lookup's drafts are accepted in part."""
    torch.manual_seed(0)
    model = Transformer(replace(PRESETS["debug-llama"], vocab_size=16, max_seq_len=64))
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(4.0)
    return model.eval()


@pytest.mark.parametrize("drafter", ["lookup", "self"])
def test_speculation_alone_and_beside_others_equals_plain_greedy(small, drafter):
    """A request alone speculates (prompt lookup, or the model drafting for itself: every draft kept);
    one arriving meanwhile turns it back to plain steps, and it speculates again once alone. Greedy
    tokens and log-probs are generate's for each alone, whenever that happens."""
    model = small
    kw = {"lookup": dict(prompt_lookup=2), "self": dict(draft=model)}[drafter]
    sched = Scheduler(model, slots=4, max_queue=4, num_draft_tokens=3, **kw)
    sched.start()
    try:
        long, short = Collector(), Collector()
        first, second = list(range(4, 14)), [9, 10]
        drafted: list[int] = []  # when the second request joins, and when it leaves

        def on_long(ev) -> None:  # the second request joins at the first's 8th token (on the scheduler's thread)
            long(ev)
            if isinstance(ev, Token) and len(long.tokens[0]) == 8:
                drafted.append(sched.speculative.drafted)
                sched.submit(Request(second, max_tokens=6, temperature=0.0), on_short)

        def on_short(ev) -> None:
            short(ev)
            if isinstance(ev, Finished):
                drafted.append(sched.speculative.drafted)

        sched.submit(Request(first, max_tokens=40, temperature=0.0, top_logprobs=2), on_long)
        for prompt, c, n in ((first, long, 40), (second, short, 6)):
            c.wait()
            want, logps = generate_with_logprobs(model, [prompt], max_new_tokens=n, temperature=0.0)
            assert c.tokens == want and c.reasons == {0: "length"}
            torch.testing.assert_close(torch.tensor(c.logprobs[0]), torch.tensor(logps[0]), rtol=0, atol=1e-4)
        assert len(long.tokens[0]) > 8 + 6  # it was still running when the second one left
        stats = sched.speculative
        assert 0 < drafted[0] == drafted[1] < stats.drafted  # before the visit, none during it, after it again
        assert 0 < stats.accepted <= stats.drafted
        assert stats.tokens == stats.target_passes + stats.accepted  # each pass: its accepted drafts and one token
        if drafter == "self":
            assert stats.accepted == stats.drafted
        assert sched.running == 0
    finally:
        sched.stop()


def test_speculation_keeps_stop_ids_limits_and_samples(small):
    """A full cache row still ends with "length" after the same tokens; a stop id among accepted drafts
    ends the request there; sampled requests (seeded) run to their max_tokens. The model drafts for
    itself: every draft is accepted, so each round commits num_draft_tokens + 1 tokens."""
    model = small
    sched = Scheduler(model, slots=2, max_queue=4, max_len=16, draft=model, num_draft_tokens=4)
    sched.start()
    try:
        full = Collector()
        sched.submit(Request(list(range(4, 14)), max_tokens=50, temperature=0.0), full)
        assert full.wait().reasons == {0: "length"}
        assert full.tokens == generate(model, [list(range(4, 14))], max_new_tokens=7, temperature=0.0)
        plain = generate(model, [[5, 6, 7, 5, 6]], max_new_tokens=10, temperature=0.0)[0]
        stop = plain[3]  # token 0 is sampled, 1..4 are the first round's drafts, 5 is the model's own
        assert plain.index(stop) == 3
        stopped = Collector()
        sched.submit(Request([5, 6, 7, 5, 6], max_tokens=10, temperature=0.0, stop_ids=[stop]), stopped)
        assert stopped.wait().reasons == {0: "stop"} and stopped.tokens == [plain[: plain.index(stop)]]
        sampled = Collector()
        sched.submit(Request([5, 6], max_tokens=9, temperature=0.9, top_k=8, seed=1), sampled)
        assert sampled.wait().reasons == {0: "length"} and len(sampled.tokens[0]) == 9
        assert sched.speculative.accepted == sched.speculative.drafted > 0
    finally:
        sched.stop()


def test_calls_run_on_the_loops_thread_and_run_runs_the_loop_here(model):
    """`call` runs a function on the loop's thread (the retriever's embedder in `temper serve`), its exception
    included; `run` takes the calling thread for the loop until `stop`, and a stopped scheduler refuses calls."""
    sched = Scheduler(model, slots=2, max_queue=2)
    sched.start()
    try:
        assert sched.call(threading.get_ident).result(10) == sched._thread.ident != threading.get_ident()
        with pytest.raises(ZeroDivisionError):
            sched.call(lambda: 1 / 0).result(10)
    finally:
        sched.stop()
    with pytest.raises(NotRunning):
        sched.call(threading.get_ident)

    here, got = Scheduler(model, slots=2, max_queue=2), {}

    def client() -> None:
        got["thread"] = here.call(threading.get_ident).result(10)
        c = Collector()
        here.submit(Request([5, 6], max_tokens=3, temperature=0.0), c)
        got["tokens"] = c.wait().tokens[0]
        here.stop(timeout=0)

    here.run(on_start=threading.Thread(target=client).start)
    assert got == {"thread": threading.get_ident(), "tokens": generate(model, [[5, 6]], max_new_tokens=3,
                                                                       temperature=0.0)[0]}
    with pytest.raises(RuntimeError, match="runs already"):
        sched.start()
        try:
            sched.run()
        finally:
            sched.stop()
