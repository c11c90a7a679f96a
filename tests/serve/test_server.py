"""`temper serve` against the official `openai` client on a real uvicorn server on 127.0.0.1: completions,
chat, streaming, n > 1, stop strings, seeds, usage, the error shapes (400, 401, 404, 413, 429), a
disconnect freeing its row, and 64 concurrent streams each equal to what the request gives alone."""

import asyncio
import contextlib
import json
import math
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from dataclasses import replace
from pathlib import Path

import jsonschema
import openai
import pytest
import torch
import uvicorn

from temper.__main__ import main as temper_main
from temper.data.tokenizer import HFTokenizer, save_hf_tokenizer, train_tokenizer
from temper.infer.engine import decode_step, generate, generate_with_logprobs
from temper.infer.load import load_for_inference
from temper.infer.scheduler import Request, Scheduler
from temper.infer.text import THINK_TAGS, TOOL_CALL_FORMATS, completion_text, cut_at_stop
from temper.model.config import PRESETS
from temper.model.hf.checkpoint import save_hf
from temper.model.transformer import Transformer
from temper.serve.app import ServeSettings, create_app

KEY = "sk-test-0123456789"
# ChatML, with a thinking switch: enable_thinking=false closes an empty <think> block in the generation prompt
# (Qwen3's way), true opens one (DeepSeek-R1's way), so the reply starts inside it.
CHATML = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>' + '\\n' }}"
          "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}"
          "{% if enable_thinking is defined and enable_thinking is false %}{{ '<think>\\n\\n</think>\\n\\n' }}{% endif %}"
          "{% if enable_thinking is defined and enable_thinking is true %}{{ '<think>\\n' }}{% endif %}"
          "{% endif %}")
WORDS = ("the cat sat on a mat while the dog ran far away from home and the bird sang in the tall green "
         "tree near a river where fish swim under the bright sun all day long").split()


def _checkpoint(root: Path, context: int) -> Path:
    """A tiny Llama-layout model with a ChatML tokenizer; weights sharpened so greedy paths branch."""
    texts = [" ".join(WORDS[i:] + WORDS[:i]) for i in range(len(WORDS))]
    tok = train_tokenizer(texts, "bpe", 320, ["<|endoftext|>", "<|im_start|>", "<|im_end|>"])
    hf_tok = HFTokenizer(tok, {"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"}, {"default": CHATML})
    cfg = replace(PRESETS["debug-llama"], vocab_size=tok.get_vocab_size(), max_seq_len=context)
    torch.manual_seed(0)
    model = Transformer(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(3.0)
    save_hf(model, cfg, root)
    save_hf_tokenizer(hf_tok, root)
    return root


@contextlib.contextmanager
def serving(path: Path, slots: int, max_queue: int, scheduler_kw: dict | None = None, hook=None, **settings):
    """A real uvicorn server on a free 127.0.0.1 port, in a thread: (base url, scheduler, loaded, app).
    hook: called with (loaded, scheduler), it returns the app's retrieval hook (`temper serve --rag.index`)."""
    torch.set_num_threads(1)  # as the tests' harness, which a module fixture runs before
    loaded = load_for_inference(path)
    sched = Scheduler(loaded.model, slots=slots, max_queue=max_queue, **(scheduler_kw or {}))
    app = create_app(loaded, sched, ServeSettings(model_name="tiny", api_key=KEY, **settings),
                     hook(loaded, sched) if hook else None)
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", ws="none", lifespan="on"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.01)
    assert server.started
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}", sched, loaded, app
    finally:
        server.should_exit = True
        thread.join(10)
        sock.close()


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with serving(_checkpoint(tmp_path_factory.mktemp("tiny"), 128), slots=16, max_queue=64,
                 max_body_bytes=4096, max_n=4, reasoning_tags=THINK_TAGS) as s:  # --reasoning_parser think
        yield s


def _client(url: str, key: str | None = KEY) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key=key or "none", max_retries=0, timeout=30)


def _post(url: str, path: str, body: bytes, key: str | None = KEY) -> tuple[int, dict]:
    return _request(url, "POST", path, body, key)


def _request(url: str, method: str, path: str, body: bytes | None = None, key: str | None = KEY) -> tuple[int, dict]:
    headers = {"Content-Type": "application/json"} | ({"Authorization": f"Bearer {key}"} if key else {})
    req = urllib.request.Request(url + path, data=body, headers=headers, method=method)
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            data = r.read()
            return r.status, json.loads(data) if r.headers.get_content_type() == "application/json" else {}
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def _alone(loaded, ids: list[int], **kw) -> list[int]:
    return generate(loaded.model, [ids], stop_token_ids=loaded.stop_ids, **kw)[0]


def _text(loaded, prompt: list[int], ids: list[int]) -> str:
    return completion_text(lambda x: loaded.tokenizer.decode(x, skip_special_tokens=True), prompt, ids)


def test_completions_chat_and_streams_equal_generate_alone(server):
    url, _, loaded, _ = server
    client = _client(url)
    assert [m.id for m in client.models.list().data] == ["tiny"]
    prompt = "the cat sat on"
    ids = loaded.tokenizer.encode(prompt)
    want = _alone(loaded, ids, max_new_tokens=12, temperature=0)
    out = client.completions.create(model="tiny", prompt=prompt, max_tokens=12, temperature=0)
    assert out.choices[0].text == _text(loaded, ids, want)
    assert out.choices[0].finish_reason == ("length" if len(want) == 12 else "stop")
    assert (out.usage.prompt_tokens, out.usage.completion_tokens) == (len(ids), len(want))
    streamed = client.completions.create(model="tiny", prompt=prompt, max_tokens=12, temperature=0, stream=True)
    assert "".join(c.choices[0].text for c in streamed) == out.choices[0].text

    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "where is the dog"}]
    chat_ids = loaded.encode_chat(messages)
    want, logps = generate_with_logprobs(loaded.model, [chat_ids], max_new_tokens=10, temperature=0,
                                         stop_token_ids=loaded.stop_ids)
    chat = client.chat.completions.create(model="tiny", messages=messages, max_tokens=10, temperature=0, logprobs=True)
    assert chat.choices[0].message.content == _text(loaded, chat_ids, want[0])
    assert chat.usage.prompt_tokens == len(chat_ids) and chat.usage.total_tokens == len(chat_ids) + len(want[0])
    torch.testing.assert_close(torch.tensor([t.logprob for t in chat.choices[0].logprobs.content]),
                               torch.tensor(logps[0]), rtol=0, atol=1e-4)
    chunks = list(client.chat.completions.create(model="tiny", messages=messages, max_tokens=10, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == chat.choices[0].message.content
    assert chunks[-1].usage.total_tokens == chat.usage.total_tokens
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == chat.choices[0].finish_reason
    # Template variables, as vLLM takes them (the client sends them through extra_body).
    quiet_ids = loaded.encode_chat(messages, enable_thinking=False)
    assert len(quiet_ids) > len(chat_ids)
    quiet = client.chat.completions.create(model="tiny", messages=messages, max_tokens=10, temperature=0,
                                           extra_body={"chat_template_kwargs": {"enable_thinking": False}})
    assert quiet.usage.prompt_tokens == len(quiet_ids)
    assert quiet.choices[0].message.content == _text(loaded, quiet_ids, _alone(loaded, quiet_ids, max_new_tokens=10,
                                                                                 temperature=0))
    assert quiet.choices[0].message.model_extra["reasoning_content"] is None  # no block opened: all content
    # A prompt that opens the thinking block: the reply is reasoning until </think> (here, all of it), as vLLM's
    # reasoning parsers give it, whole and streamed.
    think_ids = loaded.encode_chat(messages, enable_thinking=True)
    want = _text(loaded, think_ids, _alone(loaded, think_ids, max_new_tokens=10, temperature=0))
    kw = dict(model="tiny", messages=messages, max_tokens=10, temperature=0,
              extra_body={"chat_template_kwargs": {"enable_thinking": True}})
    thought = client.chat.completions.create(**kw).choices[0].message
    assert (thought.model_extra["reasoning_content"], thought.content) == (want, "") and want.strip()
    streamed = [c.choices[0].delta for c in client.chat.completions.create(**kw, stream=True) if c.choices]
    assert "".join(d.model_extra.get("reasoning_content") or "" for d in streamed) == want
    assert not "".join(d.content or "" for d in streamed)


def _penalized(logits: torch.Tensor, before: list[int], presence: float, frequency: float) -> torch.Tensor:
    """OpenAI's documented formula, written out: mu[j] - c[j] * frequency - (c[j] > 0) * presence."""
    out = logits.clone()
    for t in set(before):
        out[t] -= before.count(t) * frequency + presence
    return out


@pytest.mark.parametrize(("presence", "frequency"), [(1.5, 0.0), (0.0, 1.8), (0.7, 0.9)])
def test_presence_and_frequency_penalties_shape_greedy_choices(server, presence, frequency):
    """Every token a penalised greedy completion chose is the best of the model's logits less OpenAI's penalties
    for what the completion had generated before it (to rounding: 1e-4); the text over HTTP is those tokens'; and
    the penalties change what plain greedy decoding gives."""
    from tests.greedy import next_token_logits
    from tests.infer.test_scheduler import Collector

    url, sched, loaded, _ = server
    ids = loaded.tokenizer.encode("the dog ran")  # plain greedy repeats tokens from its 7th on
    got = Collector()
    sched.submit(Request(ids, max_tokens=16, temperature=0.0, stop_ids=loaded.stop_ids, presence_penalty=presence,
                         frequency_penalty=frequency), got)
    tokens = got.wait().tokens[0]
    logits = next_token_logits(loaded.model, ids, tokens)
    for i, t in enumerate(tokens):
        shaped = _penalized(logits[i], tokens[:i], presence, frequency)
        assert shaped[t] >= shaped.max() - 1e-4, (i, t, int(shaped.argmax()))
    assert tokens != _alone(loaded, ids, max_new_tokens=16, temperature=0)[:len(tokens)]
    out = _client(url).completions.create(model="tiny", prompt="the dog ran", max_tokens=16, temperature=0,
                                          presence_penalty=presence, frequency_penalty=frequency)
    assert out.choices[0].text == _text(loaded, ids, tokens)


def test_logit_bias_and_bad_sampling_settings(server):
    url, _, loaded, _ = server
    client = _client(url)
    ids = loaded.tokenizer.encode("the cat sat on")
    cat = loaded.tokenizer.encode(" cat")[-1]
    out = client.completions.create(model="tiny", prompt="the cat sat on", max_tokens=5, temperature=0,
                                    logit_bias={str(cat): 100})
    assert out.choices[0].text == _text(loaded, ids, [cat] * 5)
    banned = _alone(loaded, ids, max_new_tokens=1, temperature=0)[0]
    out = client.completions.create(model="tiny", prompt="the cat sat on", max_tokens=1, temperature=0,
                                    logit_bias={str(banned): -100}, logprobs=1)
    assert out.choices[0].text != _text(loaded, ids, [banned])
    for bad in ({"presence_penalty": 2.5}, {"frequency_penalty": "1"}, {"logit_bias": {"cat": 1}},
                {"logit_bias": {"5": 101}}, {"logit_bias": {str(loaded.config.vocab_size): 1}}, {"logit_bias": [1]}):
        status, body = _post(url, "/v1/completions", json.dumps({"prompt": "the"} | bad).encode())
        assert (status, body["error"]["param"]) == (400, next(iter(bad))), (bad, body)


# Qwen2.5's way with tools, cut down: the tools as JSON in a system turn, the assistant's calls in <tool_call> tags,
# the results as <tool_response> in a user turn.
TOOLS_CHATML = (
    "{%- if tools %}{{ '<|im_start|>system\\n<tools>' }}{% for t in tools %}{{ t | tojson }}{% endfor %}"
    "{{ '</tools><|im_end|>\\n' }}{%- endif %}"
    "{%- for m in messages %}"
    "{%- if m['role'] == 'assistant' and m['tool_calls'] %}{{ '<|im_start|>assistant\\n' }}"
    "{%- for c in m['tool_calls'] %}{{ '<tool_call>\\n{\"name\": \"' + c['function']['name'] + '\", \"arguments\": ' }}"
    "{{ c['function']['arguments'] | tojson }}{{ '}\\n</tool_call>' }}{%- endfor %}{{ '<|im_end|>\\n' }}"
    "{%- elif m['role'] == 'tool' %}{{ '<|im_start|>user\\n<tool_response>\\n' + m['content'] + "
    "'\\n</tool_response><|im_end|>\\n' }}"
    "{%- else %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}{%- endif %}"
    "{%- endfor %}{%- if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{%- endif %}")
CITY = {"type": "object", "properties": {"city": {"type": "string"}}}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "the weather in a city",
                                           "parameters": CITY}}]
ASK = [{"role": "user", "content": "weather in paris"}]
TOOL_REPLIES = {"hermes": '<tool_call>\n{"name": "get_weather", "arguments": {"city": "paris"}}\n</tool_call>',
                "llama3_json": '{"name": "get_weather", "parameters": {"city": "paris"}}'}
"""A call of get_weather in each tool-call format."""


def _tool_checkpoint(root: Path, reply: str) -> Path:
    """A tiny model that has learnt one reply by heart: `reply`, after the question with the tools."""
    texts = [" ".join(WORDS[i:] + WORDS[:i]) for i in range(len(WORDS))]
    tok = train_tokenizer(texts, "bpe", 320, ["<|endoftext|>", "<|im_start|>", "<|im_end|>"])
    hf_tok = HFTokenizer(tok, {"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"}, {"default": TOOLS_CHATML})
    cfg = replace(PRESETS["debug-llama"], vocab_size=tok.get_vocab_size(), max_seq_len=512)
    torch.manual_seed(0)
    model = Transformer(cfg)
    prompt = hf_tok.encode_chat(ASK, add_generation_prompt=True, tools=TOOLS)
    row = torch.tensor([prompt + tok.encode(reply).ids + [tok.token_to_id("<|im_end|>")]])
    optimizer = torch.optim.AdamW(model.parameters(), lr=5e-3)
    for step in range(300):
        for group in optimizer.param_groups:  # cosine decay: the last steps settle instead of bouncing
            group["lr"] = 5e-3 * 0.5 * (1 + math.cos(math.pi * step / 300))
        logits = model(row[:, :-1])[0, len(prompt) - 1:]
        loss = torch.nn.functional.cross_entropy(logits, row[0, len(prompt):])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert loss.item() < 0.05, loss.item()  # every token of the reply about 0.95 likely or more
    save_hf(model, cfg, root)
    save_hf_tokenizer(hf_tok, root)
    return root


@pytest.mark.parametrize("parser", list(TOOL_REPLIES))
def test_tools_go_to_the_template_and_calls_come_back_as_tool_calls(tmp_path, parser):
    """--tool_call_parser hermes or llama3_json: the model's call is the message's tool_calls (finish_reason
    tool_calls), whole and streamed; the call and the tool's result go back into the next turn's prompt."""
    checkpoint = _tool_checkpoint(tmp_path, TOOL_REPLIES[parser])
    with serving(checkpoint, slots=4, max_queue=8, tool_call_format=TOOL_CALL_FORMATS[parser]) as (url, _, loaded, _):
        client = _client(url)
        kw = dict(model="tiny", messages=ASK, tools=TOOLS, temperature=0, max_tokens=96)
        out = client.chat.completions.create(**kw)
        assert out.usage.prompt_tokens == len(loaded.encode_chat(ASK, tools=TOOLS))
        choice = out.choices[0]
        assert (choice.finish_reason, choice.message.content) == ("tool_calls", None)
        [call] = choice.message.tool_calls
        assert (call.type, call.function.name, json.loads(call.function.arguments)) == (
            "function", "get_weather", {"city": "paris"})
        chunks = [c for c in client.chat.completions.create(**kw, stream=True) if c.choices]
        assert not "".join(c.choices[0].delta.content or "" for c in chunks)
        [streamed] = [t for c in chunks for t in c.choices[0].delta.tool_calls or []]
        assert (streamed.index, streamed.function.name, streamed.function.arguments) == (
            0, "get_weather", call.function.arguments)
        assert chunks[-1].choices[0].finish_reason == "tool_calls"

        result = {"role": "tool", "tool_call_id": call.id, "content": "sunny"}
        again = client.chat.completions.create(**kw | {"messages": ASK + [
            {"role": "assistant", "content": None, "tool_calls": [call.model_dump()]}, result], "max_tokens": 2})
        rendered = ASK + [{"role": "assistant", "content": None, "tool_calls": [
            {"id": call.id, "type": "function", "function": {"name": "get_weather", "arguments": {"city": "paris"}}}]},
            result]
        assert again.usage.prompt_tokens == len(loaded.encode_chat(rendered, tools=TOOLS))

        plain = client.chat.completions.create(**kw | {"tool_choice": "none"})  # no tools in the prompt, no parsing
        assert plain.usage.prompt_tokens == len(loaded.encode_chat(ASK)) and plain.choices[0].message.tool_calls is None
        with pytest.raises(openai.BadRequestError, match="not one of the tools"):
            client.chat.completions.create(**kw | {"tool_choice": {"type": "function", "function": {"name": "f"}}})
        for bad in ([{"type": "function"}], [{"type": "function", "function": {"name": "f", "parameters": 5}}]):
            for choice in ("auto", "none"):  # checked even where they would not be used
                with pytest.raises(openai.BadRequestError, match="tools must be a list"):
                    client.chat.completions.create(**kw | {"tools": bad, "tool_choice": choice})


ADD = {"type": "object", "properties": {"a": {"type": "integer", "minimum": 0, "maximum": 99},
                                        "b": {"type": "integer", "minimum": 0, "maximum": 99}},
       "required": ["a", "b"], "additionalProperties": False}
SHORT_CITY = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 8}}, "required": ["city"],
              "additionalProperties": False}
FORCED_TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": SHORT_CITY}},
                {"type": "function", "function": {"name": "add", "parameters": ADD}}]


@pytest.mark.parametrize("parser", list(TOOL_REPLIES))
def test_tool_choice_required_or_named_forces_calls_that_fit_their_schemas(tmp_path, parser):
    """tool_choice "required" or a named function: a model that never learnt to call (random weights) answers with
    calls in its parser's format, each of a given function with arguments valid under its schema (jsonschema), one
    call of the named function; whole and streamed alike."""
    with serving(_checkpoint(tmp_path, 256), slots=4, max_queue=8,
                 tool_call_format=TOOL_CALL_FORMATS[parser]) as (url, _, loaded, _):
        client = _client(url)
        # EOS favoured where the grammar allows it (after a call): a random model would go on calling to max_tokens
        kw = dict(model="tiny", messages=ASK, tools=FORCED_TOOLS, max_tokens=160,
                  logit_bias={str(loaded.stop_ids[0]): 8})
        assert client.chat.completions.create(**kw, temperature=0).choices[0].message.tool_calls is None
        schemas = {t["function"]["name"]: t["function"]["parameters"] for t in FORCED_TOOLS}
        for choice in ("required", {"type": "function", "function": {"name": "add"}}):
            out = client.chat.completions.create(**kw, tool_choice=choice, temperature=1.0, seed=4, n=3)
            for c in out.choices:
                assert (c.finish_reason, c.message.content) == ("tool_calls", None)
                for call in c.message.tool_calls:
                    jsonschema.validate(json.loads(call.function.arguments), schemas[call.function.name])
                if choice != "required":
                    assert [call.function.name for call in c.message.tool_calls] == ["add"]
            whole = client.chat.completions.create(**kw, tool_choice=choice, temperature=0).choices[0]
            chunks = [c for c in client.chat.completions.create(**kw, tool_choice=choice, temperature=0, stream=True)
                      if c.choices]
            streamed = [t for c in chunks for t in c.choices[0].delta.tool_calls or []]
            assert [(t.function.name, t.function.arguments) for t in streamed] == [
                (t.function.name, t.function.arguments) for t in whole.message.tool_calls]
            assert chunks[-1].choices[0].finish_reason == "tool_calls"
        with pytest.raises(openai.BadRequestError, match="cannot shape the reply too"):
            client.chat.completions.create(**kw, tool_choice="required", response_format={"type": "json_object"})
        with pytest.raises(openai.BadRequestError, match="no tools"):
            client.chat.completions.create(**kw | {"tools": None}, tool_choice="required")


PET = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 6}, "legs": {"enum": [2, 4]},
                                        "age": {"type": "integer", "minimum": 0, "maximum": 30},
                                        "tame": {"type": "boolean"}},
       "required": ["name", "legs", "age", "tame"], "additionalProperties": False}


def test_structured_outputs_follow_a_json_schema_regex_choice_or_grammar(server):
    """response_format (json_schema, json_object) and vLLM's structured_outputs (json, regex, choice, grammar in
    Lark or GBNF) on both endpoints: a random model's text, which is no JSON when free, follows each, sampled or
    greedy, whole or streamed; bad formats are refused naming the parameter."""
    url, _, loaded, _ = server
    client = _client(url)
    ask = dict(model="tiny", messages=[{"role": "user", "content": "the cat"}], max_tokens=80)
    free = client.chat.completions.create(**ask, temperature=0).choices[0].message.content
    with pytest.raises(ValueError):
        json.loads(free)
    pet = {"type": "json_schema", "json_schema": {"name": "pet", "schema": PET, "strict": True}}
    out = client.chat.completions.create(**ask, response_format=pet, temperature=1.0, seed=2, n=3)
    for c in out.choices:
        assert c.finish_reason == "stop"
        jsonschema.validate(json.loads(c.message.content), PET)
    whole = client.chat.completions.create(**ask, response_format=pet, temperature=0).choices[0].message.content
    stream = client.chat.completions.create(**ask, response_format=pet, temperature=0, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == whole
    jsonschema.validate(json.loads(whole), PET)

    prompt = dict(model="tiny", prompt="the cat sat", max_tokens=60, temperature=1.0, seed=7, n=2)
    closing = {str(loaded.tokenizer.tokenizer.token_to_id(c)): 6 for c in '"}'}  # or a free string runs on
    for extra, valid in [
            ({"response_format": {"type": "json_object"}, "logit_bias": closing},
             lambda t: isinstance(json.loads(t), dict)),
            ({"structured_outputs": {"json": json.dumps(PET)}}, lambda t: jsonschema.validate(json.loads(t), PET)
             is None),
            ({"structured_outputs": {"regex": "[a-z]{2,6}-[0-9]{3}"}},
             lambda t: re.fullmatch("[a-z]{2,6}-[0-9]{3}", t)),
            ({"structured_outputs": {"choice": ["the cat", "a dog", "tree"]}},
             lambda t: t in ("the cat", "a dog", "tree")),
            ({"structured_outputs": {"grammar": 'start: N (" + " N)*\nN: /[1-9][0-9]?/'}},
             lambda t: re.fullmatch(r"[1-9][0-9]?( \+ [1-9][0-9]?)*", t)),
            ({"structured_outputs": {"grammar": 'root ::= ("yes" | "no") " " [0-9]'}},
             lambda t: re.fullmatch("(yes|no) [0-9]", t)),
            ({"guided_choice": ["cat", "dog"]}, lambda t: t in ("cat", "dog"))]:  # vLLM's older field
        for c in client.completions.create(**prompt, extra_body=extra).choices:
            assert c.finish_reason == "stop" and valid(c.text), (extra, c.text)

    for bad, param in [({"response_format": {"type": "xml"}}, "response_format"),
                       ({"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}}, "response_format"),
                       ({"response_format": {"type": "json_schema", "json_schema": {"schema": {"type": "foo"}}}},
                        "response_format"),
                       ({"structured_outputs": {"regex": "(ab"}}, "structured_outputs"),
                       ({"structured_outputs": {"regex": "a", "choice": ["b"]}}, "structured_outputs"),
                       ({"structured_outputs": {"choice": []}}, "structured_outputs"),
                       ({"structured_outputs": {"grammar": "start: nothing_here"}}, "structured_outputs"),
                       ({"structured_outputs": {"json": "[1]"}}, "structured_outputs"),
                       ({"response_format": {"type": "json_object"}, "structured_outputs": {"regex": "a"}},
                        "structured_outputs"),
                       ({"structured_outputs": {}}, "structured_outputs"),
                       ({"guided_regex": "(ab"}, "guided_regex"),
                       ({"structured_outputs": {"regex": "a"}, "guided_json": {}}, "guided_json")]:
        status, body = _post(url, "/v1/completions", json.dumps({"prompt": "the"} | bad).encode())
        assert (status, body["error"]["param"]) == (400, param), (bad, body)


def test_echo_returns_the_prompt_with_its_log_probs_as_lm_eval_reads_them(server, monkeypatch):
    """echo with logprobs: the prompt's text and tokens before the completion's, its tokens' log-probs those of a
    full forward pass (the first None), each position's top token; and lm-eval-harness's own `local-completions`
    model, pointed at the server, scores a continuation's log-likelihood and greediness as the model gives them."""
    from lm_eval.api.instance import Instance
    from lm_eval.models.openai_completions import LocalCompletionsAPI

    url, _, loaded, _ = server
    ids = loaded.tokenizer.encode("the cat sat on the mat")
    with torch.no_grad():
        logps = loaded.model(torch.tensor([ids]))[0, :-1].float().log_softmax(-1)  # (T - 1, V)
    want = logps.gather(-1, torch.tensor(ids[1:])[:, None])[:, 0]
    out = _client(url).completions.create(model="tiny", prompt=ids, max_tokens=1, temperature=0, logprobs=1, echo=True)
    choice, lp = out.choices[0], out.choices[0].logprobs
    prompt_text = loaded.tokenizer.decode(ids, skip_special_tokens=False)
    assert choice.text.startswith(prompt_text) and len(lp.tokens) == len(ids) + 1
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    torch.testing.assert_close(torch.tensor(lp.token_logprobs[1:len(ids)]), want, rtol=0, atol=1e-4)
    for j, top in enumerate(lp.top_logprobs[1:len(ids)]):
        assert max(top.values()) == pytest.approx(logps[j].max().item(), abs=1e-4)
    assert lp.text_offset[len(ids)] == len(prompt_text)
    status, body = _post(url, "/v1/completions", json.dumps({"prompt": "the", "echo": True, "stream": True}).encode())
    assert (status, body["error"]["param"]) == (400, "echo")

    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    lm = LocalCompletionsAPI(base_url=f"{url}/v1/completions", model="tiny", tokenizer=str(loaded.path),
                             tokenizer_backend="huggingface", max_length=128, max_retries=1)
    context, continuation = "the cat sat", " on the mat"
    [(ll, greedy)] = lm.loglikelihood([Instance("loglikelihood", {}, (context, continuation), 0)],
                                      disable_tqdm=True)
    ctx = loaded.tokenizer.encode(context)
    whole = loaded.tokenizer.encode(context + continuation)
    assert whole[:len(ctx)] == ctx
    with torch.no_grad():
        logps = loaded.model(torch.tensor([whole]))[0, :-1].float().log_softmax(-1)
    cont = torch.tensor(whole[len(ctx):])
    steps = logps[len(ctx) - 1:]
    assert ll == pytest.approx(steps.gather(-1, cont[:, None]).sum().item(), abs=1e-3)
    assert greedy == bool((steps.argmax(-1) == cont).all())


def test_n_seeds_and_stop_strings(server):
    url, _, loaded, _ = server
    client = _client(url)
    prompt = "the bird sang"
    ids = loaded.tokenizer.encode(prompt)
    kw = dict(model="tiny", prompt=prompt, max_tokens=10, temperature=1.0, top_p=0.95, n=3, seed=5)
    a, b = client.completions.create(**kw), client.completions.create(**kw)
    want = generate(loaded.model, [ids], max_new_tokens=10, temperature=1.0, top_p=0.95, num_samples=3, seed=5,
                    stop_token_ids=loaded.stop_ids)
    assert [c.text for c in a.choices] == [c.text for c in b.choices] == [_text(loaded, ids, w) for w in want]
    assert [c.index for c in a.choices] == [0, 1, 2] and a.usage.completion_tokens == sum(map(len, want))

    batch = client.completions.create(model="tiny", prompt=["the cat", "a dog ran"], n=2, max_tokens=6, temperature=0,
                                      logprobs=2)
    for i, p in enumerate(["the cat", "a dog ran"]):  # prompt i's choices are i*n .. i*n + n - 1
        p_ids = loaded.tokenizer.encode(p)
        want_ids = _alone(loaded, p_ids, max_new_tokens=6, temperature=0)
        for c in batch.choices[2 * i : 2 * i + 2]:
            assert c.text == _text(loaded, p_ids, want_ids)
            assert len(c.logprobs.token_logprobs) == len(want_ids) and len(c.logprobs.top_logprobs[0]) == 2
            assert max(c.logprobs.top_logprobs[0].values()) == pytest.approx(c.logprobs.token_logprobs[0])  # greedy
    assert [c.index for c in batch.choices] == [0, 1, 2, 3]

    full = client.completions.create(model="tiny", prompt=prompt, max_tokens=12, temperature=0).choices[0].text
    stop = full[len(full) // 2 : len(full) // 2 + 2]
    assert stop.strip(), full
    cut = client.completions.create(model="tiny", prompt=prompt, max_tokens=12, temperature=0, stop=[stop, "zzz"])
    assert cut.choices[0].text == cut_at_stop(full, [stop])[0] and cut.choices[0].finish_reason == "stop"
    streamed = client.completions.create(model="tiny", prompt=prompt, max_tokens=12, temperature=0, stop=stop,
                                         stream=True)
    assert "".join(c.choices[0].text for c in streamed) == cut.choices[0].text


def test_errors_in_openai_shape(server):
    url, _, _, app = server
    for route in app.routes:  # every route but the liveness probe and the static chat page needs the key
        for method in sorted(route.methods - {"HEAD"}):
            path = route.path.replace("{name:path}", "tiny")
            status, _ = _request(url, method, path, key=None)
            assert status in ((200,) if path == "/health" else (200, 404) if path == "/" else (401,)), (method, path)
    assert _request(url, "GET", "/no/such/route", key=None)[0] == 401
    with pytest.raises(openai.AuthenticationError):
        _client(url, key=None).models.list()
    with pytest.raises(openai.AuthenticationError):
        _client(url, key="sk-wrong").completions.create(model="tiny", prompt="the", max_tokens=1)
    status, body = _post(url, "/v1/completions", b'{"prompt": "the"}', key=None)
    assert status == 401 and body["error"]["code"] == "invalid_api_key"
    assert urllib.request.urlopen(f"{url}/health", timeout=10).status == 200  # open: a liveness probe
    status, body = _post(url, "/v1/completions", b'{"prompt": "' + b"a" * 5000 + b'"}')
    assert status == 413 and set(body["error"]) == {"message", "type", "param", "code"}
    status, body = _post(url, "/v1/completions", b'{"prompt": "the", ')
    assert status == 400 and "JSON" in body["error"]["message"]
    for bad, param in [({"temperature": -1}, "temperature"), ({"n": 100}, "n"), ({"max_tokens": "5"}, "max_tokens"),
                       ({"stop": [""]}, "stop"), ({"top_p": 0}, "top_p"), ({"max_tokens": 1000}, "max_tokens"),
                       ({"prompt": 5}, "prompt"), ({"suffix": "x"}, "suffix")]:
        status, body = _post(url, "/v1/completions", json.dumps({"prompt": "the"} | bad).encode())
        assert (status, body["error"]["param"]) == (400, param), (bad, body)
    assert _post(url, "/v1/completions", b'{"prompt": "the", "max_tokens": 1000}')[1]["error"]["code"] == \
        "context_length_exceeded"
    status, body = _post(url, "/v1/chat/completions", b'{"messages": [{"content": "hi"}]}')
    assert (status, body["error"]["param"]) == (400, "messages")
    hi = [{"role": "user", "content": "hi"}]
    for bad in (5, {"messages": []}, {"not a name": 1}):
        status, body = _post(url, "/v1/chat/completions", json.dumps({"messages": hi, "chat_template_kwargs": bad}).encode())
        assert (status, body["error"]["param"]) == (400, "chat_template_kwargs"), (bad, body)
    with pytest.raises(openai.NotFoundError):
        _client(url).completions.create(model="gpt-4", prompt="the", max_tokens=1)
    with pytest.raises(openai.BadRequestError, match="--tool_call_parser"):
        _client(url).chat.completions.create(model="tiny", messages=ASK, tools=TOOLS)
    with pytest.raises(openai.BadRequestError, match="temperature"):
        _client(url).chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}],
                                             temperature=5)
    metrics = urllib.request.urlopen(urllib.request.Request(f"{url}/metrics", headers={"Authorization": f"Bearer {KEY}"}),
                                     timeout=10).read().decode()
    for name in ("temper_queue_length", "temper_running_rows", "temper_tokens_generated_total",
                 "temper_tokens_per_second", "temper_request_latency_seconds_bucket",
                 "temper_time_to_first_token_seconds_bucket"):
        assert name in metrics


def test_64_concurrent_streams_equal_each_request_alone(server):
    url, sched, loaded, _ = server
    client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key=KEY, max_retries=0, timeout=60)
    prompts = [" ".join(WORDS[i % 20 : i % 20 + 1 + i % 5]) for i in range(64)]
    lengths = [4 + i % 9 for i in range(64)]

    async def one(prompt: str, max_tokens: int) -> str:
        stream = await client.completions.create(model="tiny", prompt=prompt, max_tokens=max_tokens, temperature=0,
                                                 stream=True)
        return "".join([c.choices[0].text async for c in stream])

    async def everyone() -> list[str]:
        try:
            return await asyncio.gather(*(one(p, n) for p, n in zip(prompts, lengths, strict=True)))
        finally:
            await client.close()

    texts = asyncio.run(everyone())
    for p, n, text in zip(prompts, lengths, texts, strict=True):
        ids = loaded.tokenizer.encode(p)
        assert text == _text(loaded, ids, _alone(loaded, ids, max_new_tokens=n, temperature=0)), p
    assert sched.running == 0 and sched.queued == 0


def _slow_step(model, cache, tokens):
    """A decode step that takes at least 2 ms (RELIABILITY row 23's artificial per-token sleep): a long
    request is still running when the test acts on it, however fast the machine."""
    time.sleep(0.002)
    return decode_step(model, cache, tokens)


def test_queue_full_gives_429_and_a_disconnect_frees_the_row(tmp_path):
    ckpt = _checkpoint(tmp_path / "long", 2048)
    slow = {"step_fn": _slow_step}
    with serving(ckpt, slots=1, max_queue=1, scheduler_kw=slow) as (url, sched, _, _):
        client = _client(url)
        stream = client.completions.create(model="tiny", prompt="the", max_tokens=2000, temperature=0, stream=True)
        next(iter(stream))
        assert sched.running == 1
        waiting = threading.Thread(target=lambda: client.completions.create(model="tiny", prompt="a", max_tokens=2))
        waiting.start()
        deadline = time.monotonic() + 10
        while sched.queued == 0 and time.monotonic() < deadline:
            time.sleep(0.005)
        with pytest.raises(openai.RateLimitError):
            client.completions.create(model="tiny", prompt="the", max_tokens=1)
        before = sched.tokens_generated
        stream.close()  # the client goes away mid-stream: its row is freed, the waiting request runs
        waiting.join(10)
        assert not waiting.is_alive()
        deadline = time.monotonic() + 10
        while sched.running and time.monotonic() < deadline:
            time.sleep(0.005)
        assert sched.running == 0 and sched.queued == 0
        assert sched.tokens_generated - before < 1000  # the abandoned stream did not run to its end
    with serving(ckpt, slots=1, max_queue=1, scheduler_kw=slow, request_timeout_s=0.3) as (url, sched, _, _):
        # greedy: a sampled completion could draw the stop token early and finish inside the timeout
        with pytest.raises(openai.InternalServerError) as e:
            _client(url).completions.create(model="tiny", prompt="the", max_tokens=2000, temperature=0)
        assert e.value.status_code == 504
        with pytest.raises(openai.APIError, match="timeout"):  # a stream ends with an error event
            list(_client(url).completions.create(model="tiny", prompt="the", max_tokens=2000, temperature=0,
                                                 stream=True))
        assert sched.running == 0


def test_serve_refuses_to_start_without_a_key(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("TEMPER_API_KEY", raising=False)
    assert temper_main(["serve", str(tmp_path)]) == 2
    assert "an API key is required" in capsys.readouterr().err
    assert temper_main(["serve", str(tmp_path), "--no-auth", "--host", "0.0.0.0"]) == 2
    assert "--no_auth is refused on host '0.0.0.0'" in capsys.readouterr().err
    assert temper_main(["serve", str(tmp_path), "--no-auth"]) == 2  # allowed: then the missing checkpoint
    assert "checkpoint" in capsys.readouterr().err


@pytest.mark.slow
def test_serve_command_starts_and_stops_on_sigint(tmp_path):
    ckpt = _checkpoint(tmp_path / "ckpt", 64)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = os.environ | {"TEMPER_API_KEY": KEY}
    proc = subprocess.Popen([sys.executable, "-m", "temper", "serve", str(ckpt), "--port", str(port), "--slots", "2",
                             "--log_level", "warning", "--quant", "int8"], env=env, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            with contextlib.suppress(OSError):
                if urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1).status == 200:
                    break
            time.sleep(0.1)
        out = _client(f"http://127.0.0.1:{port}").completions.create(model=str(ckpt), prompt="the", max_tokens=3)
        assert out.usage.prompt_tokens > 0
        proc.send_signal(signal.SIGINT)
        assert proc.wait(20) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    with socket.socket() as busy:  # uvicorn cannot bind: the model's loop on the main thread ends too, exit 1
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        proc = subprocess.run([sys.executable, "-m", "temper", "serve", str(ckpt), "--port",
                               str(busy.getsockname()[1]), "--slots", "2"], env=env, capture_output=True, text=True,
                              timeout=120)
    assert proc.returncode == 1 and "could not start" in proc.stderr


@pytest.mark.parametrize("drafter", ["prompt_lookup", "draft"])
def test_speculative_serving_equals_plain_greedy(tmp_path, drafter):
    """`temper serve --prompt_lookup 2` or `--draft` (the model itself, loaded again: every draft accepted):
    greedy completions, alone and two at once, equal plain decoding's; /metrics counts the drafts."""
    ckpt = _checkpoint(tmp_path, 128)
    kw = {"prompt_lookup": {"prompt_lookup": 2}, "draft": {"draft": load_for_inference(ckpt).model}}[drafter]
    with serving(ckpt, slots=4, max_queue=8, scheduler_kw=kw | {"num_draft_tokens": 3}) as (url, sched, loaded, _):
        client = _client(url)
        prompts = ["the cat sat on the mat while the cat", "where is the dog"]
        want = [_text(loaded, ids, _alone(loaded, ids, max_new_tokens=24, temperature=0))
                for ids in map(loaded.tokenizer.encode, prompts)]
        for p, w in zip(prompts, want, strict=True):
            assert client.completions.create(model="tiny", prompt=p, max_tokens=24, temperature=0).choices[0].text == w
        streamed = client.completions.create(model="tiny", prompt=prompts[0], max_tokens=24, temperature=0, stream=True)
        assert "".join(c.choices[0].text for c in streamed) == want[0]
        together: list[str] = [""] * 2

        def one(i: int) -> None:
            together[i] = client.completions.create(model="tiny", prompt=prompts[i], max_tokens=24,
                                                    temperature=0).choices[0].text

        threads = [threading.Thread(target=one, args=(i,)) for i in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        assert together == want
        scrape = urllib.request.Request(f"{url}/metrics", headers={"Authorization": f"Bearer {KEY}"})
        metrics = urllib.request.urlopen(scrape, timeout=10).read().decode()
        values = {line.split()[0]: float(line.split()[1]) for line in metrics.splitlines()
                  if line.startswith("temper_speculative")}
        drafted = values["temper_speculative_drafted_tokens_total"]
        accepted = values["temper_speculative_accepted_tokens_total"]
        assert drafted == sched.speculative.drafted > 0 and 0 < accepted <= drafted
        assert values["temper_speculative_acceptance_rate"] == pytest.approx(accepted / drafted)
        if drafter == "draft":
            assert accepted == drafted


def test_serve_speculation_options_are_checked(tmp_path, capsys):
    for args, message in [(["--draft", str(tmp_path), "--prompt_lookup", "2"], "not both"),
                          (["--prompt_lookup", "2", "--num_draft_tokens", "0"], "num_draft_tokens >= 1")]:
        assert temper_main(["serve", str(tmp_path), "--no-auth", *args]) == 2
        assert message in capsys.readouterr().err
