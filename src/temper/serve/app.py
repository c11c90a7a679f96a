"""The OpenAI-compatible HTTP API (FastAPI) over the continuous-batching scheduler.

Clients written for OpenAI's API (its Python client, LangChain, curl scripts) work unchanged:
`/v1/models`, `/v1/completions`, `/v1/chat/completions` (rendered by the checkpoint's chat
template, in jinja's sandbox), with max_tokens, temperature, top_p, top_k (vLLM's extension), seed,
stop, n, presence_penalty, frequency_penalty, logit_bias, logprobs, tools, streaming as server-sent
events (`data: {...}` chunks in OpenAI's chunk shape, then `data: [DONE]`), `usage`, and errors in
OpenAI's shape `{"error": {"message", "type", "param", "code"}}`: 400 (bad JSON, a bad parameter,
named), 401 (no or a wrong key), 404 (unknown model or route), 413 (body over the cap), 429 (the
queue is full), 503 (stopped) and 504 (timed out).
`/health` answers without a key; `/metrics` is Prometheus text (queue length, running rows, tokens
generated and per second, request latency and time-to-first-token histograms; with speculative
decoding, draft tokens drafted and accepted, and their ratio).

Every request becomes one `temper.infer.scheduler.Request` per prompt; the scheduler's thread sends
token events back onto the event loop (`loop.call_soon_threadsafe`). Text is this module's job:
each choice's tokens are decoded as `temper generate` decodes them (`temper.infer.text`), a stop
string cuts the text and cancels that choice's row, and a stream holds back a tail that may still
become a stop string. A client that disconnects cancels its request, which frees its rows at the
next decode step.

Secure by default: a Bearer key is checked (constant-time) on every route
but `/health` and the chat page at `/` (static HTML, no model access); bodies, prompts, max_tokens
and n are capped; nothing from a request reaches a shell, a path or a template outside the sandbox.
Log-probs: the sampled token's log p under softmax(logits / temperature) and up to 5 (completions)
or 20 (chat) most likely tokens, of the model's logits (before penalties, biases and a grammar's mask, as vLLM's
default). Not supported (400 when set): suffix, best_of != n, echo with stream. `echo` puts the prompt before each
completion, with its tokens' log-probs when `logprobs` is set (one forward pass over the prompt, on the scheduler's
thread): what lm-eval-harness's `local-completions` reads for a log-likelihood.

Tools (`temper serve --tool_call_parser hermes` or `llama3_json`, as vLLM's): a chat request's `tools` go to the chat
template, its messages may carry an assistant's `tool_calls` and the tools' results (role "tool", `tool_call_id`),
and a reply's calls (`<tool_call>{"name", "arguments"}</tool_call>`, Qwen's and Hermes' format; or a reply of
`{"name", "parameters"}` objects, Llama 3.1's) come back as the message's `tool_calls` with finish_reason
"tool_calls"; a stream holds them back and sends them whole in one delta. `tool_choice` "required" or a named
function forces the reply to be calls (one of the named function), in the parser's format, each call's arguments
valid under its function's schema.

Structured outputs: OpenAI's `response_format` ({type: json_object}, {type: json_schema, json_schema: {schema}})
and vLLM's `structured_outputs` ({json}, {json_object}, {regex}, {choice}, {grammar}: Lark or GBNF, through the
client's `extra_body`; its older `guided_json`, `guided_regex`, `guided_choice`, `guided_grammar` alike) on both
endpoints, and the forced tool calls, are grammars (`temper.infer.grammar`): each
draw is masked to the tokens that keep the text inside the grammar, and a choice ends (stop) where its text is
complete. The log-probs stay the model's. Such a request does not speculate. A reply that starts inside a thinking
block is constrained from its first token (no room to think first).

Retrieval (`temper serve --rag.index DIR`): `create_app` takes a `rag` hook, built by the recipe from
`temper.rag` (this package may not import it), that turns a chat's messages and its prompt budget into the
prompt's token ids with numbered passages and their citations; the chat response then carries a
top-level "citations" list ({n, source, title, chunk_id}; in a stream, on the first chunk), which the
official client exposes as an extra field.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hmac
import itertools
import json
import math
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fastapi import FastAPI
from fastapi import Request as HTTPRequest
from fastapi.responses import FileResponse, JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from starlette.exceptions import HTTPException as StarletteHTTPException

from temper.data.chat import check_template_variables
from temper.errors import InputError
from temper.infer import grammar
from temper.infer.load import Loaded
from temper.infer.scheduler import (
    Failed,
    Finished,
    NotRunning,
    PromptLogprobs,
    QueueFull,
    Request,
    Scheduler,
    Ticket,
    Token,
)
from temper.infer.text import (
    ReasoningSplitter,
    ToolCallFormat,
    ToolCallSplitter,
    completion_text,
    cut_at_stop,
    safe_to_print,
)

STATIC = Path(__file__).parent / "static"
RagHook = Callable[..., tuple[list[int], list[dict[str, Any]]]]
"""(messages, the prompt's most tokens, **chat template variables) -> (the prompt's token ids, with retrieved
passages, and their citations)."""
OPEN_PATHS = {("GET", "/health"), ("GET", "/"), ("HEAD", "/")}
"""Routes answered without a key: the liveness probe and the chat page (which asks for the key itself)."""


@dataclass
class ServeSettings:
    """What the API accepts: the served name, the key and the caps (see `temper.recipes.serve`)."""

    model_name: str
    api_key: str | None = None
    """The Bearer key every request but /health needs (None: no auth; the recipe allows it on loopback only)."""
    max_body_bytes: int = 1 << 20
    max_prompt_tokens: int | None = None
    """None: the cache row's size minus one (room for one token)."""
    max_tokens: int | None = None
    """The largest max_tokens a request may ask (None: the cache row's size)."""
    max_n: int = 8
    """The most choices per request (also at most the scheduler's slots)."""
    max_prompts: int = 16
    """The most prompts in one /v1/completions request."""
    request_timeout_s: float | None = 600.0
    """A request running longer fails with 504 (a stream ends with an error event) and its rows are freed."""
    reasoning_tags: tuple[str, str] | None = None
    """Chat replies split at these tags into `reasoning_content` and `content` (None: all content)."""
    tool_call_format: ToolCallFormat | None = None
    """How chat replies' tool calls read (`TOOL_CALL_FORMATS`); None: requests with tools are refused."""


class APIError(Exception):
    """An error answered in OpenAI's shape; `param` names the parameter at fault."""

    TYPES = {400: "invalid_request_error", 401: "invalid_request_error", 404: "invalid_request_error",
             413: "invalid_request_error", 429: "rate_limit_error", 503: "server_error", 504: "server_error"}

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.TYPES.get(self.status, "server_error"),
                          "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        headers = {"WWW-Authenticate": "Bearer"} if self.status == 401 else None
        return JSONResponse(self.body(), status_code=self.status, headers=headers)


# ---- reading a request ---------------------------------------------------------------------------


async def read_json(request: HTTPRequest, cap: int) -> dict[str, Any]:
    """The body as a JSON object, refused (413) as soon as it passes `cap` bytes, before parsing."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > cap:
        raise APIError(413, f"the request body is {declared} bytes; this server accepts at most {cap}")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > cap:
            raise APIError(413, f"the request body is over {cap} bytes, the most this server accepts")
    try:
        data = json.loads(bytes(body))
    except (ValueError, RecursionError) as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise APIError(400, f"the body is not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise APIError(400, f"the body must be a JSON object, got {type(data).__name__}")
    return data


def _int(body: Mapping[str, Any], key: str, default: int | None, lo: int, hi: int | None = None) -> int | None:
    value = body.get(key)
    if value is None:
        return default
    if type(value) is not int:
        raise APIError(400, f"{key} must be an integer, got {value!r}", key)
    if value < lo or (hi is not None and value > hi):
        raise APIError(400, f"{key} must be in [{lo}, {hi if hi is not None else 'inf'}], got {value}", key)
    return value


def _float(body: Mapping[str, Any], key: str, default: float | None, lo: float, hi: float,
           open_low: bool = False) -> float | None:
    value = body.get(key)
    if value is None:
        return default
    if type(value) not in (int, float) or not math.isfinite(value):
        raise APIError(400, f"{key} must be a number, got {value!r}", key)
    if value < lo or value > hi or (open_low and value == lo):
        raise APIError(400, f"{key} must be in {'(' if open_low else '['}{lo}, {hi}], got {value}", key)
    return float(value)


def _bool(body: Mapping[str, Any], key: str, default: bool = False) -> bool:
    value = body.get(key)
    if value is None:
        return default
    if type(value) is not bool:
        raise APIError(400, f"{key} must be true or false, got {value!r}", key)
    return value


def read_template_variables(body: Mapping[str, Any]) -> dict[str, Any]:
    """`chat_template_kwargs`: extra variables for the chat template, as vLLM and SGLang take them (the OpenAI
    client sends them through `extra_body`), e.g. {"enable_thinking": false} for Qwen3."""
    value = body.get("chat_template_kwargs")
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise APIError(400, f"chat_template_kwargs must be an object, got {value!r}", "chat_template_kwargs")
    try:
        return check_template_variables(value)
    except ValueError as e:
        raise APIError(400, str(e), "chat_template_kwargs") from None


def _unsupported(body: Mapping[str, Any], key: str, allowed: Callable[[Any], bool], what: str) -> None:
    if key in body and body[key] is not None and not allowed(body[key]):
        raise APIError(400, f"{key} is not supported by this server ({what})", key)


@dataclass
class Sampling:
    """The parameters shared by both endpoints, checked."""

    max_tokens: int | None
    """None: the endpoint's default (16 for completions, as OpenAI; the rest of the context for chat)."""
    temperature: float
    top_p: float | None
    top_k: int | None
    n: int
    seed: int | None
    stop: list[str]
    stream: bool
    include_usage: bool
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[int, float] = field(default_factory=dict)


def read_sampling(body: Mapping[str, Any], settings: ServeSettings, slots: int, vocab_size: int) -> Sampling:
    max_tokens = _int(body, "max_tokens", None, 1)
    if "max_completion_tokens" in body and body["max_completion_tokens"] is not None:
        max_tokens = _int(body, "max_completion_tokens", None, 1)
    top_p = _float(body, "top_p", None, 0.0, 1.0, open_low=True)
    top_k = _int(body, "top_k", None, -1)  # vLLM's extension; -1 and 0 are off
    stop = body.get("stop")
    stops = [] if stop is None else [stop] if isinstance(stop, str) else stop
    if not isinstance(stops, list) or not all(isinstance(s, str) and s for s in stops) or len(stops) > 16:
        raise APIError(400, "stop must be a non-empty string or a list of at most 16 of them", "stop")
    options = body.get("stream_options")
    if options is not None and not isinstance(options, dict):
        raise APIError(400, "stream_options must be an object", "stream_options")
    n = _int(body, "n", 1, 1, min(settings.max_n, slots))
    _unsupported(body, "best_of", lambda v: v == n, "best_of must equal n")
    return Sampling(
        max_tokens=max_tokens,
        temperature=_float(body, "temperature", 1.0, 0.0, 2.0),
        top_p=None if top_p == 1.0 else top_p,
        top_k=top_k if top_k and top_k > 0 else None,
        n=n,
        seed=_int(body, "seed", None, -(2**62), 2**62),
        stop=stops,
        stream=_bool(body, "stream"),
        include_usage=_bool(options or {}, "include_usage"),
        presence_penalty=_float(body, "presence_penalty", 0.0, -2.0, 2.0),
        frequency_penalty=_float(body, "frequency_penalty", 0.0, -2.0, 2.0),
        logit_bias=read_logit_bias(body, vocab_size),
    )


def read_logit_bias(body: Mapping[str, Any], vocab_size: int) -> dict[int, float]:
    """OpenAI's logit_bias: {token id (a JSON key, so a string): bias in [-100, 100]}, at most 300 of them."""
    bias = body.get("logit_bias")
    if bias is None:
        return {}
    if not isinstance(bias, dict) or len(bias) > 300:
        raise APIError(400, "logit_bias must be an object of at most 300 token ids", "logit_bias")
    out = {}
    for key, value in bias.items():
        if not (isinstance(key, str) and key.isdigit() and int(key) < vocab_size):
            raise APIError(400, f"logit_bias: {key!r} is not a token id of this model (0 .. {vocab_size - 1})",
                           "logit_bias")
        if type(value) not in (int, float) or not -100 <= value <= 100:
            raise APIError(400, f"logit_bias[{key!r}] must be a number in [-100, 100], got {value!r}", "logit_bias")
        out[int(key)] = float(value)
    return out


def read_messages(body: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Chat messages as plain dicts of strings (content parts of type "text" joined)."""
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise APIError(400, "messages must be a non-empty list of {role, content} objects", "messages")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise APIError(400, f"messages[{i}] must be an object with a string role", "messages")
        content = m.get("content")
        if isinstance(content, list):
            if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
                       for p in content):
                raise APIError(400, f"messages[{i}].content: only text parts are supported", "messages")
            content = "".join(p["text"] for p in content)
        if content is not None and not isinstance(content, str):
            raise APIError(400, f"messages[{i}].content must be a string or a list of text parts", "messages")
        message = {"role": m["role"], "content": content}
        if isinstance(m.get("name"), str):
            message["name"] = m["name"]
        if isinstance(m.get("tool_call_id"), str):  # a tool's result
            message["tool_call_id"] = m["tool_call_id"]
        if m.get("tool_calls") is not None:
            message["tool_calls"] = _read_tool_calls(m["tool_calls"], i)
        out.append(message)
    return out


def _read_tool_calls(calls: Any, i: int) -> list[dict[str, Any]]:
    """An assistant message's tool calls as chat templates take them: each function's arguments a dict, parsed
    from the JSON string OpenAI's API carries (vLLM's reading; templates write them with tojson)."""
    where = f"messages[{i}].tool_calls"
    if not isinstance(calls, list):
        raise APIError(400, f"{where} must be a list", "messages")
    out = []
    for j, call in enumerate(calls):
        function = call.get("function") if isinstance(call, dict) else None
        if not isinstance(function, dict) or not isinstance(function.get("name"), str):
            raise APIError(400, f"{where}[{j}] must be {{type: function, function: {{name, arguments}}}}", "messages")
        arguments = function.get("arguments", "{}")
        try:
            arguments = json.loads(arguments) if isinstance(arguments, str) else arguments
        except json.JSONDecodeError:
            raise APIError(400, f"{where}[{j}].function.arguments is not JSON", "messages") from None
        out.append({"id": call.get("id"), "type": "function",
                    "function": {"name": function["name"], "arguments": arguments}})
    return out


def read_tools(body: Mapping[str, Any], settings: ServeSettings) -> tuple[list[dict[str, Any]] | None, str | None]:
    """The request's tools for the chat template (OpenAI's list of {type: function, function: {name, description,
    parameters}}, the shape transformers' templates take; None: no tools, or tool_choice "none"), and the grammar
    of the calls tool_choice forces: "auto" (the default) leaves the choice to the model, "required" forces one or
    more calls of the tools, {type: function, function: {name}} one call of that function."""
    tools, choice = body.get("tools"), body.get("tool_choice")
    function = choice.get("function") if isinstance(choice, dict) and choice.get("type") == "function" else None
    named = function.get("name") if isinstance(function, dict) else None
    if choice not in (None, "auto", "none", "required") and not isinstance(named, str):
        raise APIError(400, "tool_choice must be 'auto', 'none', 'required' or {type: function, function: {name}}",
                       "tool_choice")
    if tools is None:
        if choice == "required" or named is not None:
            raise APIError(400, "tool_choice forces a call, but the request has no tools", "tool_choice")
        return None, None
    if not isinstance(tools, list) or not all(
            isinstance(t, dict) and t.get("type") == "function" and isinstance(t.get("function"), dict)
            and isinstance(t["function"].get("name"), str) and isinstance(t["function"].get("parameters", {}), dict)
            for t in tools):
        raise APIError(400, "tools must be a list of {type: function, function: {name, description, parameters "
                            "(a JSON schema object)}}", "tools")
    if not tools or choice == "none":
        return None, None
    if settings.tool_call_format is None:
        raise APIError(400, "tools need a tool call parser: start the server with --tool_call_parser (hermes, "
                            "llama3_json)", "tools")
    if named is not None:
        chosen = [t for t in tools if t["function"]["name"] == named]
        if not chosen:
            raise APIError(400, f"tool_choice names {named!r}, which is not one of the tools", "tool_choice")
        return tools, grammar.tool_calls(settings.tool_call_format, chosen, many=False)
    return tools, grammar.tool_calls(settings.tool_call_format, tools) if choice == "required" else None


GUIDED = ("guided_json", "guided_regex", "guided_choice", "guided_grammar")
"""vLLM's fields before `structured_outputs` (0.10 and older), still sent by clients written for them: `guided_x` is
read as `structured_outputs.x`."""


def read_output_format(body: Mapping[str, Any]) -> tuple[str, str] | None:
    """The grammar the reply must follow, with the parameter that asked for it (OpenAI's `response_format`, vLLM's
    `structured_outputs` or its older `guided_*` fields); None: free text."""
    asked = [k for k in ("response_format", "structured_outputs", *GUIDED) if body.get(k) is not None]
    if len(asked) > 1:
        raise APIError(400, f"set one of response_format, structured_outputs and guided_*, got {', '.join(asked)}",
                       asked[-1])
    if not asked:
        return None
    param = asked[0]
    try:
        if param == "response_format":
            source = _response_format(body[param])
        else:
            extra = body[param] if param == "structured_outputs" else {param.removeprefix("guided_"): body[param]}
            source = _structured_outputs(extra, param)
    except ValueError as e:  # a schema that is not a JSON object, a GBNF grammar llguidance cannot convert
        raise APIError(400, f"{param}: {e}", param) from None
    return None if source is None else (source, param)


def _response_format(form: Any) -> str | None:
    """OpenAI's: {type: text} (None), {type: json_object} (any JSON object), {type: json_schema, json_schema:
    {name, schema, strict}} (the schema's objects; every schema is kept strictly)."""
    kind = form.get("type") if isinstance(form, dict) else None
    if kind == "text":
        return None
    if kind == "json_object":
        return grammar.json_schema({"type": "object"})
    schema = (form.get("json_schema") or {}).get("schema") if kind == "json_schema" else None
    if not isinstance(schema, dict):
        raise APIError(400, "response_format must be {type: text}, {type: json_object} or {type: json_schema, "
                            "json_schema: {name, schema: a JSON schema object}}", "response_format")
    return grammar.json_schema(schema)


def _structured_outputs(extra: Any, param: str) -> str:
    """vLLM's, one of: json (a schema, or its JSON text), json_object: true, regex, choice (a list of strings),
    grammar (Lark, or llama.cpp's GBNF)."""
    given = {k: v for k, v in extra.items() if v is not None} if isinstance(extra, dict) else {}
    kind, value = next(iter(given.items())) if len(given) == 1 else (None, None)
    if kind == "json" and isinstance(value, (dict, str)):
        return grammar.json_schema(json.loads(value) if isinstance(value, str) else value)
    if kind == "json_object" and value is True:
        return grammar.json_schema({"type": "object"})
    if kind in ("regex", "grammar") and isinstance(value, str):
        return grammar.regex(value) if kind == "regex" else grammar.lark(value)
    if kind == "choice" and isinstance(value, list) and value and all(isinstance(v, str) for v in value):
        return grammar.choice(value)
    raise APIError(400, f"{param}: structured_outputs takes one of json (a schema), json_object (true), regex (a "
                        "string), choice (a list of strings) or grammar (Lark or GBNF)", param)


# ---- a request's choices -------------------------------------------------------------------------


@dataclass
class Choice:
    """One choice's tokens and text so far; `add` decodes and cuts at stop strings."""

    prompt: list[int]
    decode: Callable[[list[int]], str]
    stops: list[str]
    tokens: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    tops: list[tuple[tuple[int, float], ...]] = field(default_factory=list)
    offsets: list[int] = field(default_factory=list)
    """Where each token's text starts in `text`."""
    text: str = ""
    sent: int = 0
    """Characters of `text` already streamed."""
    logged: int = 0
    """Tokens whose log-probs were already streamed."""
    finish_reason: str | None = None
    cut: bool = False
    """A stop string ended the text."""

    def add(self, ev: Token) -> bool:
        """Append a token; True when a stop string was reached (the text is cut before it)."""
        self.offsets.append(len(self.text))
        self.tokens.append(ev.token)
        self.logprobs.append(ev.logprob)
        self.tops.append(ev.top)
        self.text, hit = cut_at_stop(completion_text(self.decode, self.prompt, self.tokens), self.stops)
        if hit:
            self.finish_reason, self.cut = "stop", True
        return hit

    def kept(self) -> int:
        """Tokens whose text starts inside the (possibly cut) text."""
        return sum(1 for o in self.offsets if o < len(self.text)) if self.cut else len(self.tokens)

    def pending_text(self) -> str:
        """The text that can be streamed now (all of it once finished), marked as sent."""
        end = len(self.text) if self.finish_reason else safe_to_print(self.text, self.stops)
        delta, self.sent = self.text[self.sent : max(end, self.sent)], max(end, self.sent)
        return delta


class Job:
    """One HTTP request's tickets (one per prompt) and the events the scheduler's thread sends back."""

    def __init__(self, scheduler: Scheduler, requests: list[Request], choices: list[Choice]) -> None:
        self.scheduler, self.choices = scheduler, choices
        self.queue: asyncio.Queue = asyncio.Queue()
        self.n = requests[0].n
        self.tickets: list[Ticket] = []
        self.started = time.monotonic()
        self.first_token: float | None = None
        self.prompt_logprobs: dict[int, PromptLogprobs] = {}
        """Each prompt's, when its request asked for them (echo)."""
        loop = asyncio.get_running_loop()
        try:
            for p, request in enumerate(requests):
                self.tickets.append(scheduler.submit(request, self._deliver(loop, p)))
        except QueueFull as e:
            self.cancel()
            raise APIError(429, f"the server is busy ({e}): retry later", code="rate_limit_exceeded") from None
        except NotRunning as e:
            self.cancel()
            raise APIError(503, f"the server is not generating ({e})", code="unavailable") from None
        except ValueError as e:
            self.cancel()
            raise APIError(400, str(e)) from None

    def _deliver(self, loop: asyncio.AbstractEventLoop, prompt: int) -> Callable[[Any], None]:
        def deliver(ev: Any) -> None:
            with contextlib.suppress(RuntimeError):  # the loop closed: nobody is listening
                loop.call_soon_threadsafe(self.queue.put_nowait, (prompt, ev))
        return deliver

    def cancel(self) -> None:
        for t in self.tickets:
            self.scheduler.cancel(t)

    async def events(self) -> AsyncIterator[tuple[int, Choice]]:
        """(choice index, its Choice) after each token or finish, until every choice finished.

        Raises APIError 504 on a timeout and 503 when the scheduler stops or fails."""
        while any(c.finish_reason is None for c in self.choices):
            prompt, ev = await self.queue.get()
            if isinstance(ev, Failed):
                for c in self.choices:
                    c.finish_reason = c.finish_reason or "error"
                status = 504 if ev.reason == "timeout" else 503
                raise APIError(status, ev.message, code=ev.reason)
            if isinstance(ev, PromptLogprobs):
                self.prompt_logprobs[prompt] = ev
                continue
            i = prompt * self.n + ev.index
            choice = self.choices[i]
            if choice.finish_reason is not None:
                continue  # tokens already on their way when a stop string cancelled the choice
            if isinstance(ev, Token):
                if self.first_token is None:
                    self.first_token = time.monotonic()
                if choice.add(ev):
                    self.scheduler.cancel(self.tickets[prompt], ev.index)
            elif isinstance(ev, Finished):
                choice.finish_reason = ev.reason
            yield i, choice


async def watch_disconnect(request: HTTPRequest, job: Job) -> None:
    """Cancel `job` when the client goes away (its body was read, so the next message is the disconnect)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass
    job.cancel()
    job.queue.put_nowait((0, Failed("disconnect", "the client disconnected")))


# ---- the app -------------------------------------------------------------------------------------


class SchedulerCollector:
    """Prometheus gauges and a counter read from the scheduler at scrape time."""

    def __init__(self, scheduler: Scheduler) -> None:
        self.scheduler = scheduler

    def collect(self) -> Iterator[Metric]:
        s = self.scheduler
        yield GaugeMetricFamily("temper_queue_length", "Requests waiting for cache rows", value=s.queued)
        yield GaugeMetricFamily("temper_running_rows", "Cache rows decoding now", value=s.running)
        yield GaugeMetricFamily("temper_slots", "Cache rows in the running batch", value=s.slots)
        yield CounterMetricFamily("temper_tokens_generated", "Tokens generated since start", value=s.tokens_generated)
        yield GaugeMetricFamily("temper_tokens_per_second", "Tokens generated per second over the last 10 s",
                                value=s.tokens_per_second())
        if s.speculative is not None:  # speculative decoding (--draft, --prompt_lookup)
            spec = s.speculative
            yield CounterMetricFamily("temper_speculative_drafted_tokens", "Draft tokens the model verified since "
                                      "start (speculative decoding)", value=spec.drafted)
            yield CounterMetricFamily("temper_speculative_accepted_tokens", "Draft tokens accepted since start",
                                      value=spec.accepted)
            yield GaugeMetricFamily("temper_speculative_acceptance_rate", "Accepted / drafted tokens since start",
                                    value=spec.acceptance_rate)


def create_app(loaded: Loaded, scheduler: Scheduler, settings: ServeSettings, rag: RagHook | None = None) -> FastAPI:
    """The API for `loaded` (tokenizer, chat template, stop ids) generating on `scheduler`; with `rag`, chats
    are answered from retrieved passages and their responses carry the citations.

    The scheduler's thread starts with the app (its lifespan) and stops when the app shuts down.
    """
    tokenizer, context = loaded.tokenizer, scheduler.max_len
    max_prompt = min(settings.max_prompt_tokens or context - 1, context - 1)
    max_tokens_cap = min(settings.max_tokens or context, context)
    registry = CollectorRegistry()
    registry.register(SchedulerCollector(scheduler))
    latency = Histogram("temper_request_latency_seconds", "Time from a request's arrival to its last token",
                        registry=registry, buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300))
    ttft = Histogram("temper_time_to_first_token_seconds", "Time from a request's arrival to its first token",
                     registry=registry, buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30))

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        scheduler.start()
        try:
            yield
        finally:
            await asyncio.to_thread(scheduler.stop)

    app = FastAPI(title="temper", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.scheduler, app.state.settings = scheduler, settings

    @app.middleware("http")
    async def authenticate(request: HTTPRequest, call_next: Callable[[HTTPRequest], Awaitable[Response]]
                           ) -> Response:
        if settings.api_key is not None and (request.method, request.url.path) not in OPEN_PATHS:
            given = request.headers.get("authorization", "")
            scheme, _, key = given.partition(" ")
            if scheme.lower() != "bearer" or not hmac.compare_digest(key.strip().encode(), settings.api_key.encode()):
                message = "a Bearer API key is required" if not given else "the API key is not valid"
                return APIError(401, message, code="invalid_api_key").response()
        return await call_next(request)

    @app.exception_handler(APIError)
    async def api_error(request: HTTPRequest, e: APIError) -> JSONResponse:
        return e.response()

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: HTTPRequest, e: StarletteHTTPException) -> JSONResponse:
        return APIError(e.status_code, str(e.detail)).response()

    @app.exception_handler(InputError)
    async def input_error(request: HTTPRequest, e: InputError) -> JSONResponse:  # e.g. a template's refusal
        return APIError(400, str(e)).response()

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/")
    async def page() -> Response:
        index = STATIC / "index.html"
        if not index.is_file():
            raise APIError(404, "no chat page is installed; the API is under /v1")
        return FileResponse(index, media_type="text/html")

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [_model_card(settings.model_name)]}

    @app.get("/v1/models/{name:path}")
    async def model(name: str) -> dict[str, Any]:
        _check_model({"model": name}, settings)
        return _model_card(settings.model_name)

    def decode(ids: list[int]) -> str:
        return tokenizer.decode(ids, skip_special_tokens=True)

    def token_text(t: int) -> str:
        return tokenizer.decode([t], skip_special_tokens=False)

    @functools.cache
    def grammar_vocabulary() -> Any:
        """llguidance's view of the tokenizer, built at the first request with a grammar (up to a second)."""
        return grammar.vocabulary(tokenizer.tokenizer, loaded.config.vocab_size, loaded.stop_ids)

    async def compile_output(source: tuple[str, str] | None) -> grammar.Grammar | None:
        """A request's grammar (source, the parameter that asked for it) compiled, off the event loop."""
        if source is None:
            return None
        try:
            return await asyncio.to_thread(lambda: grammar.compile_grammar(grammar_vocabulary(), source[0]))
        except grammar.GrammarError as e:
            raise APIError(400, f"{source[1]}: {e}", source[1]) from None

    def submit(prompts: list[list[int]], s: Sampling, default_max_tokens: int | None, top_logprobs: int,
               param: str, echo: bool = False, constraint: grammar.Grammar | None = None) -> Job:
        """Check the prompts' lengths against the caps and the context, and queue one request per prompt."""
        requests = []
        for ids in prompts:
            if not ids:
                raise APIError(400, f"{param} encodes to no tokens", param)
            if len(ids) > max_prompt:
                raise APIError(400, f"{param} has {len(ids)} tokens; this server takes at most {max_prompt}",
                               param, "context_length_exceeded")
            if s.max_tokens is not None and (s.max_tokens > max_tokens_cap or len(ids) + s.max_tokens > context):
                raise APIError(400, f"max_tokens={s.max_tokens} with a {len(ids)}-token prompt is more than the "
                                    f"{context}-token context (or the cap of {max_tokens_cap})", "max_tokens",
                               "context_length_exceeded")
            wanted = s.max_tokens or min(default_max_tokens or max_tokens_cap, max_tokens_cap)
            requests.append(Request(ids, max_tokens=min(wanted, context - len(ids)), temperature=s.temperature,
                                    top_k=s.top_k, top_p=s.top_p, seed=s.seed, n=s.n, stop_ids=loaded.stop_ids,
                                    top_logprobs=top_logprobs, presence_penalty=s.presence_penalty,
                                    frequency_penalty=s.frequency_penalty, logit_bias=s.logit_bias,
                                    prompt_logprobs=echo, grammar=constraint, timeout_s=settings.request_timeout_s))
        return Job(scheduler, requests, [Choice(ids, decode, s.stop) for ids in prompts for _ in range(s.n)])

    def observe(job: Job) -> None:
        latency.observe(time.monotonic() - job.started)
        if job.first_token is not None:
            ttft.observe(job.first_token - job.started)

    def usage(job: Job, prompts: list[list[int]]) -> dict[str, int]:
        prompt_tokens = sum(len(p) for p in prompts)
        completion_tokens = sum(c.kept() for c in job.choices)
        return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                "total_tokens": prompt_tokens + completion_tokens}

    async def collect(request: HTTPRequest, job: Job) -> None:
        """Wait for every choice (the non-streaming answer), cancelling if the client leaves."""
        watcher = asyncio.create_task(watch_disconnect(request, job))
        try:
            async for _ in job.events():
                pass
        finally:
            watcher.cancel()
            job.cancel()
            observe(job)

    def sse(job: Job, chunks: AsyncIterator[dict[str, Any]]) -> StreamingResponse:
        async def body() -> AsyncIterator[str]:
            try:
                async for chunk in chunks:
                    yield f"data: {json.dumps(chunk, ensure_ascii=False)}\n\n"
            except APIError as e:  # the status line is sent already: an error event, as OpenAI's streams do
                yield f"data: {json.dumps(e.body(), ensure_ascii=False)}\n\n"
            finally:
                job.cancel()  # a client that left (or an error): free the rows now
                observe(job)
            yield "data: [DONE]\n\n"
        return StreamingResponse(body(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    def new_tokens(c: Choice) -> tuple[str, int, int]:
        """A stream's next piece of a choice: its text, and the range of its tokens not yet streamed."""
        start, end = c.logged, c.kept() if c.finish_reason else len(c.tokens)
        c.logged = end
        return c.pending_text(), start, end

    # ---- /v1/completions ----

    def completion_logprobs(c: Choice, start: int, end: int, k: int) -> dict[str, Any]:
        return {"tokens": [token_text(t) for t in c.tokens[start:end]],
                "token_logprobs": c.logprobs[start:end],
                "top_logprobs": [{token_text(t): lp for t, lp in top} for top in c.tops[start:end]] if k else None,
                "text_offset": c.offsets[start:end]}

    def echoed(c: Choice, ids: list[int], prompt: PromptLogprobs | None, k: int | None) -> dict[str, Any]:
        """A choice with its prompt in front (echo): the prompt's text, and its tokens' log-probs before the
        completion's (the first token's None, as OpenAI's), text offsets into the whole text."""
        text = tokenizer.decode(ids, skip_special_tokens=False)
        out: dict[str, Any] = {"text": text + c.text}
        if k is not None and prompt is not None:
            pieces = [token_text(t) for t in ids]
            offsets = [0, *itertools.accumulate(len(p) for p in pieces)][:-1]
            after = completion_logprobs(c, 0, c.kept(), k)
            top = [None, *({token_text(t): lp for t, lp in row} for row in prompt.top)] if k else None
            out["logprobs"] = {"tokens": pieces + after["tokens"],
                               "token_logprobs": [None, *prompt.logprobs, *after["token_logprobs"]],
                               "top_logprobs": top + after["top_logprobs"] if k else None,
                               "text_offset": offsets + [len(text) + o for o in after["text_offset"]]}
        return out

    @app.post("/v1/completions")
    async def completions(request: HTTPRequest) -> Response:
        body = await read_json(request, settings.max_body_bytes)
        _check_model(body, settings)
        _unsupported(body, "suffix", lambda v: v == "", "no suffix")
        logprobs = _int(body, "logprobs", None, 0, 5)
        echo = _bool(body, "echo")
        s = read_sampling(body, settings, scheduler.slots, loaded.config.vocab_size)
        if echo and s.stream:
            raise APIError(400, "echo is not supported with stream", "echo")
        constraint = await compile_output(read_output_format(body))
        prompts = await asyncio.to_thread(_encode_prompts, body.get("prompt"), tokenizer, loaded.config.vocab_size,
                                          settings.max_prompts)
        # 16: OpenAI's default max_tokens here
        job = submit(prompts, s, 16, logprobs or 0, "prompt", echo=echo and logprobs is not None,
                     constraint=constraint)
        head = {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion", "created": int(time.time()),
                "model": settings.model_name}

        if s.stream:
            async def chunks() -> AsyncIterator[dict[str, Any]]:
                async for i, c in job.events():
                    text, start, end = new_tokens(c)
                    if text or c.finish_reason or (logprobs is not None and end > start):
                        lp = completion_logprobs(c, start, end, logprobs) if logprobs is not None else None
                        yield head | {"choices": [{"index": i, "text": text, "logprobs": lp,
                                                   "finish_reason": c.finish_reason}]}
                if s.include_usage:
                    yield head | {"choices": [], "usage": usage(job, prompts)}
            return sse(job, chunks())

        await collect(request, job)
        out = [{"index": i, "text": c.text, "finish_reason": c.finish_reason,
                "logprobs": completion_logprobs(c, 0, c.kept(), logprobs) if logprobs is not None else None}
               for i, c in enumerate(job.choices)]
        if echo:
            for i, (o, c) in enumerate(zip(out, job.choices, strict=True)):
                p = i // job.n
                o |= echoed(c, prompts[p], job.prompt_logprobs.get(p), logprobs)
        return JSONResponse(head | {"choices": out, "usage": usage(job, prompts)})

    # ---- /v1/chat/completions ----

    def chat_logprobs(c: Choice, start: int, end: int) -> dict[str, Any]:
        def entry(t: int, lp: float) -> dict[str, Any]:
            text = token_text(t)
            return {"token": text, "logprob": lp, "bytes": list(text.encode("utf-8"))}
        return {"content": [entry(t, lp) | {"top_logprobs": [entry(u, v) for u, v in top]}
                            for t, lp, top in zip(c.tokens[start:end], c.logprobs[start:end], c.tops[start:end],
                                                  strict=True)]}

    @app.post("/v1/chat/completions")
    async def chat_completions(request: HTTPRequest) -> Response:
        body = await read_json(request, settings.max_body_bytes)
        _check_model(body, settings)
        messages = read_messages(body)
        variables = read_template_variables(body)
        want_logprobs = _bool(body, "logprobs")
        top = _int(body, "top_logprobs", 0, 0, 20) or 0
        tools, forced = read_tools(body, settings)
        if tools is not None:
            variables["tools"] = tools
        output = read_output_format(body)
        if forced is not None and output is not None:
            raise APIError(400, f"tool_choice forces a call: {output[1]} cannot shape the reply too", output[1])
        s = read_sampling(body, settings, scheduler.slots, loaded.config.vocab_size)
        if loaded.chat_template is None:
            raise APIError(400, "this model has no chat template: use /v1/completions", "messages")
        if rag is None:
            ids = await asyncio.to_thread(loaded.encode_chat, messages, None, **variables)
            cited: dict[str, Any] = {}
        else:  # room for the request's max_tokens (the hook keeps its own default room when it gives none)
            room = max_prompt if s.max_tokens is None else min(max_prompt, context - s.max_tokens)
            try:  # on the scheduler's thread: the query embedder is a torch model too (`Scheduler.call`)
                ids, citations = await asyncio.wrap_future(scheduler.call(lambda: rag(messages, room, **variables)))
            except NotRunning as e:
                raise APIError(503, f"the server is not generating ({e})", code="unavailable") from None
            cited = {"citations": citations}
        constraint = await compile_output((forced, "tool_choice") if forced is not None else output)
        job = submit([ids], s, None, top if want_logprobs else 0, "messages", constraint=constraint)
        head = {"id": f"chatcmpl-{uuid.uuid4().hex}", "created": int(time.time()), "model": settings.model_name}
        tags = settings.reasoning_tags
        # The prompt may open the thinking block itself (DeepSeek-R1's template): the reply then starts inside it.
        # Its last few tokens hold the tag (one token in those vocabularies, a few characters' worth in any other).
        thinking = tags is not None and loaded.tokenizer.decode(ids[-8:]).rstrip().endswith(tags[0])
        splitters = [ReasoningSplitter(tags, thinking) for _ in job.choices] if tags else None
        callers = [ToolCallSplitter(settings.tool_call_format) for _ in job.choices] if tools is not None else None

        def delta(i: int, text: str, final: bool) -> dict[str, str]:
            """A choice's new text as the message's fields: content, or reasoning_content and content (the
            content's tool calls held back, in `callers[i].calls` at the end)."""
            reasoning, answer = splitters[i].feed(text, final) if splitters is not None else ("", text)
            if callers is not None:
                answer = callers[i].feed(answer, final)
            return {k: v for k, v in (("reasoning_content", reasoning), ("content", answer)) if v}

        def tool_calls(i: int, c: Choice) -> tuple[list[dict[str, Any]], str | None]:
            """Choice i's parsed tool calls in OpenAI's shape (after its last delta), and its finish reason."""
            if callers is None or not callers[i].calls:
                return [], c.finish_reason
            calls = [{"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
                      "function": {"name": name, "arguments": arguments}} for name, arguments in callers[i].calls]
            return calls, "tool_calls" if c.finish_reason == "stop" else c.finish_reason

        if s.stream:
            head = head | {"object": "chat.completion.chunk"}

            async def chunks() -> AsyncIterator[dict[str, Any]]:
                for i in range(len(job.choices)):
                    yield head | (cited if i == 0 else {}) | {
                        "choices": [{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                                     "finish_reason": None}]}
                async for i, c in job.events():
                    text, start, end = new_tokens(c)
                    lp = chat_logprobs(c, start, end) if want_logprobs and end > start else None
                    fields = delta(i, text, bool(c.finish_reason))
                    if any(fields.values()) or lp:
                        yield head | {"choices": [{"index": i, "delta": fields or {"content": ""}, "logprobs": lp,
                                                   "finish_reason": None}]}
                    if c.finish_reason:
                        calls, reason = tool_calls(i, c)
                        if calls:
                            yield head | {"choices": [{"index": i, "delta": {"tool_calls": [
                                {"index": k} | call for k, call in enumerate(calls)]}, "logprobs": None,
                                "finish_reason": None}]}
                        yield head | {"choices": [{"index": i, "delta": {}, "logprobs": None,
                                                   "finish_reason": reason}]}
                if s.include_usage:
                    yield head | {"choices": [], "usage": usage(job, [ids])}
            return sse(job, chunks())

        await collect(request, job)
        def message(i: int, c: Choice) -> tuple[dict[str, Any], str | None]:
            fields = delta(i, c.text, final=True)
            calls, reason = tool_calls(i, c)
            out = {"role": "assistant", "content": fields.get("content", "" if not calls else None)}
            if splitters is not None:
                out["reasoning_content"] = fields.get("reasoning_content")
            return out | ({"tool_calls": calls} if calls else {}), reason

        out = []
        for i, c in enumerate(job.choices):
            m, reason = message(i, c)
            out.append({"index": i, "message": m, "finish_reason": reason,
                        "logprobs": chat_logprobs(c, 0, c.kept()) if want_logprobs else None})
        return JSONResponse(head | {"object": "chat.completion", "choices": out, "usage": usage(job, [ids])} | cited)

    return app


def _model_card(name: str) -> dict[str, Any]:
    return {"id": name, "object": "model", "created": 0, "owned_by": "temper"}


def _check_model(body: Mapping[str, Any], settings: ServeSettings) -> None:
    name = body.get("model")
    if name is not None and name != settings.model_name:
        raise APIError(404, f"the model {str(name)[:200]!r} does not exist; this server serves "
                            f"{settings.model_name!r}", "model", "model_not_found")


def _encode_prompts(prompt: Any, tokenizer: Any, vocab: int, max_prompts: int) -> list[list[int]]:
    """/v1/completions' prompt: a string, a list of strings, a list of token ids or a list of those."""
    if isinstance(prompt, str):
        prompts: Sequence[Any] = [prompt]
    elif isinstance(prompt, list) and prompt and all(type(t) is int for t in prompt):
        prompts = [prompt]
    elif isinstance(prompt, list) and prompt:
        prompts = prompt
    else:
        raise APIError(400, "prompt must be a string, a list of strings or a list of token ids", "prompt")
    if len(prompts) > max_prompts:
        raise APIError(400, f"at most {max_prompts} prompts per request, got {len(prompts)}", "prompt")
    out = []
    for p in prompts:
        if isinstance(p, str):
            out.append(tokenizer.encode(p))
        elif isinstance(p, list) and all(type(t) is int and 0 <= t < vocab for t in p):
            out.append(list(p))
        else:
            raise APIError(400, f"prompt: each prompt must be a string or a list of token ids in [0, {vocab})",
                           "prompt")
    return out
