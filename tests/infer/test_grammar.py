"""Constrained decoding: the mask allows exactly the tokens whose text extends the grammar's language (checked by
brute force over the vocabulary), random walks under JSON schemas, regexes, choices and Lark grammars stay inside
them, and the scheduler's constrained rows draw the best allowed token while their neighbours' output is unchanged;
the engine's loop draws what the scheduler draws."""

import json
import re
from dataclasses import replace

import jsonschema
import pytest
import torch

from temper.data.tokenizer import train_tokenizer
from temper.infer.engine import generate
from temper.infer.grammar import (
    GrammarError,
    choice,
    compile_grammar,
    json_in_lark,
    json_schema,
    lark,
    mask_rows_,
    regex,
    tool_calls,
    vocabulary,
)
from temper.infer.scheduler import Request, Scheduler
from temper.infer.text import TOOL_CALL_FORMATS, parse_tool_calls
from temper.model.config import PRESETS
from temper.model.transformer import Transformer
from tests.greedy import next_token_logits
from tests.infer.test_scheduler import Collector

WORDS = ("the cat sat on a mat while the dog ran far away from home and the bird sang in the tall green tree "
         'near a river {"name": "cat", "age": 3, "tags": ["a", "b"]} 12 + 34 = 46').split()
EOS = "<|im_end|>"
SCHEMA = {"type": "object", "properties": {
    "name": {"type": "string", "maxLength": 8},
    "age": {"type": "integer", "minimum": 0, "maximum": 120},
    "pet": {"enum": ["cat", "dog", None]},
    "tags": {"type": "array", "items": {"type": "string", "maxLength": 3}, "maxItems": 3},
    "home": {"type": "object", "properties": {"x": {"type": "number"}, "ok": {"type": "boolean"}},
             "required": ["ok"], "additionalProperties": False}},
    "required": ["name", "age", "home"], "additionalProperties": False}
ARITHMETIC = r"""start: sum
sum: NUMBER (" + " NUMBER)*
NUMBER: /[1-9][0-9]{0,2}/"""
OPTIONS = ["cat", "cats", "the dog", "a bird sang", "{}"]
"""A finite language, one option a prefix of another."""


@pytest.fixture(scope="module")
def tok():
    texts = [" ".join(WORDS[i:] + WORDS[:i]) for i in range(len(WORDS))]
    return train_tokenizer(texts, "bpe", 320, ["<|endoftext|>", "<|im_start|>", EOS])


@pytest.fixture(scope="module")
def vocab(tok):
    return vocabulary(tok, tok.get_vocab_size() + 7, [tok.token_to_id(EOS)])  # 7 padding rows, never allowed


def _walk(grammar, tok, seed: int, steps: int = 400) -> tuple[str, bool]:
    """Draw tokens from random logits under the grammar's mask: (the text, whether it ended at EOS or complete)."""
    g = torch.Generator().manual_seed(seed)
    matcher, eos, out = grammar.matcher(), tok.token_to_id(EOS), []
    for _ in range(steps):
        logits = matcher.mask_(torch.randn(tok.get_vocab_size() + 7, generator=g) * 3)
        t = int(torch.multinomial(logits.softmax(-1), 1, generator=g))
        if t == eos:
            return tok.decode(out, skip_special_tokens=False), True
        matcher.advance(t)
        out.append(t)
        if matcher.done:
            return tok.decode(out, skip_special_tokens=False), True
    return tok.decode(out, skip_special_tokens=False), False


def _arithmetic(text: str) -> bool:
    return re.fullmatch(r"[1-9][0-9]{0,2}( \+ [1-9][0-9]{0,2})*", text) is not None


def _tool_calls(text: str) -> bool:
    calls = re.findall(r"<call>(.*?)</call>", text)
    return ";".join(f"<call>{c}</call>" for c in calls) == text and all(json.loads(c)["n"] in (1, 2) for c in calls)


def _json_dumps_style(text: str) -> bool:
    """Outside strings, one space after each "," and ":" (json.dumps' separators) and no other whitespace."""
    bare = re.sub(r'"(\\.|[^"\\])*"', '""', text)
    return re.fullmatch(r"[^\s,:]*([,:] [^\s,:]*)*", bare) is not None


CASES = {
    "json_schema": (lambda: json_schema(SCHEMA), lambda t: jsonschema.validate(json.loads(t), SCHEMA) is None),
    "json_object": (lambda: json_schema({"type": "object", "maxProperties": 2}),
                    lambda t: isinstance(json.loads(t), dict)),
    "regex": (lambda: regex(r"[a-c]{2,5}-\d{3}( ok)?"), lambda t: re.fullmatch(r"[a-c]{2,5}-\d{3}( ok)?", t)),
    "choice": (lambda: choice(OPTIONS), lambda t: t in OPTIONS),
    "lark": (lambda: lark(ARITHMETIC), _arithmetic),
    "lark_with_json": (lambda: lark('start: call (";" call)*\ncall: "<call>" ' + json_in_lark(
        {"type": "object", "properties": {"n": {"enum": [1, 2]}}, "required": ["n"], "additionalProperties": False})
        + ' "</call>"'), _tool_calls),
}


@pytest.mark.parametrize("kind", CASES)
def test_random_walks_stay_inside_the_grammar(tok, vocab, kind):
    """Tokens drawn from random logits under the mask always make a sentence of the grammar (checked by Python's
    json/jsonschema/re), over many seeds; JSON is compact (no whitespace but json.dumps' separators)."""
    source, valid = CASES[kind]
    grammar = compile_grammar(vocab, source())
    ended = 0
    for seed in range(12):
        text, complete = _walk(grammar, tok, seed)
        if complete:
            ended += 1
            assert valid(text), (seed, text)
            if kind.startswith("json"):
                assert _json_dumps_style(text), text
    assert ended >= 9  # random logits may run long inside a string; most walks end


def _extending(texts: dict[int, str], text: str, options: list[str]) -> set[int]:
    """By brute force: the tokens whose text extends `text` to a prefix of an option."""
    return {t for t, s in texts.items() if s and any(o.startswith(text + s) for o in options)}


TOOLS = [{"type": "function", "function": {"name": "add", "parameters": {
             "type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}}, "required": ["a"],
             "additionalProperties": False}}},
         {"type": "function", "function": {"name": "now"}}]


@pytest.mark.parametrize("name", list(TOOL_CALL_FORMATS))
def test_forced_tool_calls_parse_as_their_format_reads_them(tok, vocab, name):
    """Random walks under `tool_calls` (one or several calls) give replies that the format's own parser reads back
    whole, no content before, each call of a given function with arguments valid under its schema."""
    fmt = TOOL_CALL_FORMATS[name]
    schemas = {"add": TOOLS[0]["function"]["parameters"], "now": {"type": "object"}}
    for many in (True, False):
        grammar, counts = compile_grammar(vocab, tool_calls(fmt, TOOLS, many)), set()
        for seed in range(16):
            text, complete = _walk(grammar, tok, seed)
            if not complete:
                continue
            content, calls = parse_tool_calls(text, fmt)
            assert content == "" and (len(calls) == 1 or many), text
            for function, arguments in calls:
                jsonschema.validate(json.loads(arguments), schemas[function])
            counts.add(len(calls))
        assert counts == {1} if not many else len(counts) > 1


def test_the_mask_allows_only_tokens_that_extend_an_option(tok, vocab):
    """Along random paths through a finite language, the mask allows only tokens of the brute-force set (those
    whose text extends the text so far to a prefix of an option), always some, EOS exactly where the text is an
    option, and every option is reached. (llguidance leaves out some tokenizations of text the grammar forces:
    after "t" only "the dog" goes on, and it allows "he" but not "h".)"""
    grammar, eos, size = compile_grammar(vocab, choice(OPTIONS)), tok.token_to_id(EOS), tok.get_vocab_size() + 7
    specials = {tok.token_to_id(s) for s in ("<|endoftext|>", "<|im_start|>", EOS)}
    texts = {t: tok.decode([t]) for t in range(tok.get_vocab_size()) if t not in specials}
    g, reached = torch.Generator().manual_seed(0), set()
    for _ in range(40):
        matcher, text = grammar.matcher(), ""
        while True:
            allowed = matcher.mask_(torch.zeros(size)).isfinite().nonzero().flatten().tolist()
            assert set(allowed) - {eos} <= _extending(texts, text, OPTIONS) and allowed, text
            assert (eos in allowed) == (text in OPTIONS), text
            t = allowed[int(torch.randint(len(allowed), (1,), generator=g))]
            if t == eos:
                break
            matcher.advance(t)
            text += texts[t]
            if matcher.done:  # complete, and no option goes on: only EOS could follow
                assert text in OPTIONS and not any(o != text and o.startswith(text) for o in OPTIONS)
                break
        reached.add(text)
    assert reached == set(OPTIONS)


def test_a_batch_of_masks_equals_each_alone(tok, vocab):
    """mask_rows_ over matchers of different grammars at different places masks each row as its matcher alone."""
    size, g = tok.get_vocab_size() + 7, torch.Generator().manual_seed(3)
    matchers = [compile_grammar(vocab, source()).matcher() for source, _ in CASES.values()]
    for k, m in enumerate(matchers):  # k tokens into each
        for _ in range(k):
            allowed = m.mask_(torch.zeros(size)).isfinite().nonzero().flatten()
            m.advance(int(allowed[torch.randint(len(allowed), (1,), generator=g)]))
    logits = torch.randn(len(matchers), size, generator=g)
    alone = torch.stack([m.mask_(row.clone()) for m, row in zip(matchers, logits, strict=True)])
    assert torch.equal(mask_rows_(logits, matchers), alone) and torch.equal(logits, alone)


def test_bad_grammars_are_refused_with_the_reason(tok, vocab):
    for source, reason in [(regex("(abc"), "unclosed group"), (json_schema({"type": "foo"}), "foo"),
                           (lark("start: missing"), "missing"), (lark("start: /[/"), "regex")]:
        with pytest.raises(GrammarError, match=reason):
            compile_grammar(vocab, source)
    with pytest.raises(GrammarError, match="EOS"):
        vocabulary(tok, tok.get_vocab_size(), [])
    matcher = compile_grammar(vocab, choice(["cat"])).matcher()
    with pytest.raises(GrammarError, match="parser"):
        matcher.advance(tok.token_to_id("<|im_start|>"))  # a token its mask does not allow


def _model(tok) -> Transformer:
    torch.manual_seed(0)
    model = Transformer(replace(PRESETS["debug-llama"], vocab_size=tok.get_vocab_size() + 7, max_seq_len=96))
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(3.0)
    return model.eval()


def test_scheduler_draws_the_best_allowed_token_beside_free_rows(tok, vocab):
    """A greedy constrained request takes, at each step, the model's best token among those the brute-force set
    allows, ends (stop) on an option that nothing extends, and reports the model's own log-probs; requests beside it
    give what they give alone; sampled choices under a JSON schema all validate; a drafter never speculates on it."""
    model, eos = _model(tok), tok.token_to_id(EOS)
    specials = {tok.token_to_id(s) for s in ("<|endoftext|>", "<|im_start|>", EOS)}
    texts = {t: tok.decode([t]) for t in range(tok.get_vocab_size()) if t not in specials}
    prompts = [tok.encode(p).ids for p in ("the cat sat on", "a bird sang in the", "near a river the dog")]
    options = ["the dog ran far", "the cat", "a mat while", "home and the bird"]
    for drafter in ({}, {"prompt_lookup": 2}):
        sched = Scheduler(model, slots=8, max_queue=8, **drafter)
        sched.start()
        try:
            free = [Collector() for _ in prompts]
            fixed, sampled = Collector(), Collector(3)
            for p, c in zip(prompts, free, strict=True):
                sched.submit(Request(p, max_tokens=12, temperature=0, stop_ids=(eos,)), c)
            grammar = compile_grammar(vocab, choice(options))
            sched.submit(Request(prompts[0], max_tokens=12, temperature=0, stop_ids=(eos,), grammar=grammar), fixed)
            sched.submit(Request(prompts[1], max_tokens=90, temperature=1.0, seed=5, n=3, stop_ids=(eos,),
                                 grammar=compile_grammar(vocab, json_schema(SCHEMA))), sampled)
            for c in (*free, fixed, sampled):
                c.wait()
            if drafter:
                assert sched.speculative.drafted == 0
        finally:
            sched.stop()
        for p, c in zip(prompts, free, strict=True):
            assert c.tokens[0] == generate(model, [p], max_new_tokens=12, temperature=0.0, stop_token_ids=[eos])[0]
        text, matcher = "", grammar.matcher()
        for k, (t, logits) in enumerate(zip(fixed.tokens[0], next_token_logits(model, prompts[0], fixed.tokens[0]),
                                            strict=True)):
            allowed = matcher.mask_(torch.zeros_like(logits)).isfinite().nonzero().flatten().tolist()
            assert set(allowed) <= _extending(texts, text, options)
            assert t in allowed and logits[t] >= logits[allowed].max() - 1e-4  # the best allowed, to rounding
            assert fixed.logprobs[0][k] == pytest.approx(float(logits.log_softmax(-1)[t]), abs=1e-4)
            matcher.advance(t)
            text += texts[t]
        assert text in options and fixed.reasons == {0: "stop"}
        for i in range(3):
            assert sampled.reasons[i] == "stop", sampled.reasons
            jsonschema.validate(json.loads(tok.decode(sampled.tokens[i])), SCHEMA)
        assert len({tuple(t) for t in sampled.tokens}) > 1  # seeds 5, 6, 7 differ
    # The engine's own loop (`temper generate`, offline) draws the same tokens under the same grammars.
    assert generate(model, [prompts[0]], max_new_tokens=12, temperature=0.0, stop_token_ids=[eos],
                    grammar=grammar)[0] == fixed.tokens[0]
    assert generate(model, [prompts[1]], max_new_tokens=90, temperature=1.0, seed=5, num_samples=3,
                    stop_token_ids=[eos], grammar=compile_grammar(vocab, json_schema(SCHEMA))) == sampled.tokens


@pytest.mark.parametrize("family", ["llama3", "qwen2", "llama2", "llama2-legacy"])
def test_each_tokenizer_family_decodes_to_the_grammar(family):
    """llguidance reads each family's tokenizer.json as its decoder does: byte-level BPE (Llama 3, Qwen2) and
    SentencePiece-style "▁" pieces with byte fallback (Llama 2, Mistral; Metaspace or the old normalizer), so the
    text the tokenizer decodes from a walk under a JSON schema is valid, non-ASCII strings and spaces included."""
    from tests.conftest import SHARED_DATA
    from tests.data.test_tokenizer import llama2_style, llama3_style, qwen2_style, training_corpus

    if not SHARED_DATA.exists():
        pytest.skip(f"shared data not found at {SHARED_DATA}")
    corpus = training_corpus(SHARED_DATA)[:40]
    build = {"llama3": llama3_style, "qwen2": qwen2_style, "llama2": llama2_style,
             "llama2-legacy": lambda c: llama2_style(c, legacy_normalizer=True)}[family]
    tok = build(corpus)
    eos = {"llama3": "<|end_of_text|>", "qwen2": "<|im_end|>"}.get(family, "</s>")
    grammar = compile_grammar(vocabulary(tok, tok.get_vocab_size(), [tok.token_to_id(eos)]), json_schema(SCHEMA))
    g, done = torch.Generator().manual_seed(0), 0
    for _ in range(8):
        matcher, out = grammar.matcher(), []
        for _ in range(300):
            logits = matcher.mask_(torch.randn(tok.get_vocab_size(), generator=g) * 3)
            t = int(torch.multinomial(logits.softmax(-1), 1, generator=g))
            if t == tok.token_to_id(eos) or matcher.done:
                break
            matcher.advance(t)
            out.append(t)
        else:
            continue
        done += 1
        text = tok.decode(out, skip_special_tokens=False)
        jsonschema.validate(json.loads(text), SCHEMA)
        assert _json_dumps_style(text), text
    assert done >= 6
