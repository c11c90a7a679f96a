"""Chat templates: render a conversation to the exact text a model was trained on.

A chat template is a Jinja program shipped with a model (tokenizer_config.json's `chat_template`,
or `chat_template.jinja`). Templates come from the Hub, so they are untrusted code: they render
in jinja's `ImmutableSandboxedEnvironment`, which refuses attribute access to Python internals
(`__class__`, `__globals__`, ...) and calls that mutate data (`messages.append`); here such an
access fails at once instead of rendering as "". Everything the template sees is first copied
into plain JSON values, so no object with dangerous methods reaches it. The environment mirrors transformers' `utils/chat_template_utils.py` (trim_blocks,
lstrip_blocks, loop controls, `raise_exception`, `strftime_now`, a `tojson` that keeps non-ASCII,
the `{% generation %}` tag) so that rendering equals `tokenizer.apply_chat_template(...,
tokenize=False)` character for character; transformers itself is not imported.

It does not tokenize (tokenizer.py's `HFTokenizer.encode_chat` does), read tokenizer files
(tokenizer.py), build loss masks from the `{% generation %}` spans (sft.py), or support
`continue_final_message` or tools given as Python functions (pass JSON schemas).
"""

from __future__ import annotations

import dataclasses
import functools
import json
from collections.abc import Callable, Mapping, Sequence
from datetime import datetime
from typing import Any

import jinja2
import jinja2.ext
import jinja2.nodes
import numpy as np
from jinja2.sandbox import ImmutableSandboxedEnvironment

from temper.errors import InputError

# Older jinja2 releases have known sandbox escapes (CVE-2024-56326, CVE-2025-27516); transformers
# refuses them for the same reason.
MIN_JINJA = (3, 1, 6)
# Names a message's reasoning is passed under; templates read the first (transformers aliases them).
REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")

Message = Mapping[str, Any]


class ChatTemplateError(InputError):
    """A chat template that cannot be compiled or rendered, or that refused the conversation."""


class TemplateRaised(jinja2.TemplateError):
    """Raised by a template's `raise_exception(message)`: the template rejects its input."""


def render_chat_template(
    template: str,
    messages: Sequence[Message],
    *,
    add_generation_prompt: bool = False,
    tools: Sequence[Mapping[str, Any]] | None = None,
    documents: Sequence[Mapping[str, Any]] | None = None,
    **variables: Any,
) -> str:
    """Render `messages` with `template`, as transformers' `apply_chat_template(tokenize=False)` does.

    `variables` are extra names the template can read (the tokenizer passes its special tokens:
    `bos_token`, `eos_token`, ...). Keys whose value is None are dropped from each message first,
    because templates handle a missing key but print "None" for a null one (OpenAI-style
    `content: null`). Raises ChatTemplateError for a template that fails, breaks the sandbox or
    calls `raise_exception`.
    """
    if not messages:
        raise ChatTemplateError("cannot render an empty conversation: give at least one message")
    chat = []
    for i, message in enumerate(messages):
        if not isinstance(message, Mapping):
            raise ChatTemplateError(f"message {i} is a {type(message).__name__}, expected a dict with 'role' and 'content'")
        chat.append({k: v for k, v in plain_template_data(message).items() if v is not None})
    for i, tool in enumerate(tools or ()):
        if not isinstance(tool, Mapping):
            raise ChatTemplateError(f"tool {i} is a {type(tool).__name__}: give tools as JSON-schema dicts")
    for i, doc in enumerate(documents or ()):
        if not isinstance(doc, Mapping):
            raise ChatTemplateError(f"document {i} is a {type(doc).__name__}, expected a dict with 'title' and 'text'")
    compiled = compile_chat_template(template)
    try:
        return compiled.render(
            messages=alias_reasoning_fields(chat),
            tools=plain_template_data(list(tools) if tools is not None else None),
            documents=plain_template_data(list(documents) if documents is not None else None),
            add_generation_prompt=add_generation_prompt,
            **plain_template_data(variables),
        )
    except TemplateRaised as e:
        raise ChatTemplateError(f"the chat template rejected the conversation: {e.message}") from None
    except jinja2.exceptions.SecurityError as e:
        # `from None`: the jinja frames point into the sandbox, not at anything the caller can fix
        raise ChatTemplateError(f"the chat template tried an unsafe operation and was stopped: {e}") from None
    except (jinja2.TemplateError, TypeError, ValueError, KeyError, IndexError, AttributeError,
            ZeroDivisionError) as e:
        raise ChatTemplateError(f"the chat template failed: {type(e).__name__}: {e}") from e


RENDERER_NAMES = ("messages", "tools", "documents", "add_generation_prompt")
"""Names the renderer sets itself, which a template's extra variables may not replace."""


def check_template_variables(variables: Mapping[str, Any]) -> dict[str, Any]:
    """Extra names a chat template reads (`chat_template_kwargs`: Qwen3's `enable_thinking`, ...), checked: each a
    Python identifier, none of RENDERER_NAMES, every value JSON data. Raises ValueError naming the key."""
    for key, value in variables.items():
        if not isinstance(key, str) or not key.isidentifier() or key in RENDERER_NAMES:
            raise ValueError(f"chat template variable {key!r}: give a name the template reads, not one of "
                             f"{', '.join(RENDERER_NAMES)}")
        try:
            json.dumps(value)
        except (TypeError, ValueError):
            raise ValueError(f"chat template variable {key!r}: {value!r} is not JSON data") from None
    return dict(variables)


def select_chat_template(templates: Mapping[str, str], name: str | None = None, has_tools: bool = False) -> str:
    """The template text to use, by transformers' rule (`get_chat_template`).

    `name` picks a named template, or, when it names none, is itself the text of a template.
    Otherwise "tool_use" is used when tools are given and it exists, else "default".
    """
    if name is not None:
        return templates.get(name, name)
    if has_tools and "tool_use" in templates:
        return templates["tool_use"]
    if "default" in templates:
        return templates["default"]
    if not templates:
        raise ChatTemplateError("this tokenizer has no chat template: pass one (template=...)")
    raise ChatTemplateError(f"this tokenizer has several chat templates and no default: name one of {sorted(templates)}")


@functools.lru_cache(maxsize=64)
def compile_chat_template(template: str) -> jinja2.Template:
    """Compile once per template text (templates are a few KB and rendered for every example)."""
    try:
        return _environment().from_string(template)
    except jinja2.TemplateSyntaxError as e:
        raise ChatTemplateError(f"chat template syntax error on line {e.lineno}: {e.message}") from None


class ChatSandbox(ImmutableSandboxedEnvironment):
    """jinja's immutable sandbox, failing at the first touch of an unsafe attribute.

    jinja returns an undefined value that raises only when used further, so `{{ ''.__class__ }}`
    renders as "" (and does so in transformers); here every reach for internals (`__class__`,
    `__globals__`, through `.`, `|attr` or `str.format`) and every mutating method (`append`,
    `update`, ...) stops the rendering.
    """

    def unsafe_undefined(self, obj: Any, attribute: str) -> jinja2.Undefined:
        raise jinja2.exceptions.SecurityError(f"access to attribute {attribute!r} of {type(obj).__name__!r} "
                                              f"object is unsafe")


@functools.cache
def _environment() -> ChatSandbox:
    version = tuple(int(p) for p in jinja2.__version__.split(".")[:3] if p.isdigit())
    if version < MIN_JINJA:
        raise ChatTemplateError(f"chat templates need jinja2>={'.'.join(map(str, MIN_JINJA))} (older releases have "
                                f"sandbox escapes); found {jinja2.__version__}: pip install -U jinja2")
    env = ChatSandbox(trim_blocks=True, lstrip_blocks=True, extensions=[GenerationTag, jinja2.ext.loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = strftime_now
    env.globals["dict"] = TemplateDict()
    env.globals["namespace"] = TemplateNamespace
    return env


def raise_exception(message: str) -> None:
    """Template global: a template calls it to reject a conversation it cannot format."""
    raise TemplateRaised(message)


def tojson(x: Any, ensure_ascii: bool = False, indent: int | None = None,
           separators: tuple[str, str] | None = None, sort_keys: bool = False) -> str:
    """Template filter replacing jinja's own, which escapes HTML characters and non-ASCII text."""
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def strftime_now(format: str) -> str:
    """Template global: today's date for templates that print it (Llama 3.2)."""
    return datetime.now().strftime(format)


class TemplateDict:
    """The template's `dict`: builds dicts, but is not the `dict` type, so no type tricks go through it."""

    def __call__(self, *args: Any, **kwargs: Any) -> dict:
        return dict(*args, **kwargs)

    def fromkeys(self, *args: Any, **kwargs: Any) -> dict:
        return dict.fromkeys(*args, **kwargs)


class TemplateNamespace(jinja2.utils.Namespace):
    """A jinja namespace that refuses underscore names, which could shadow Python internals."""

    def __init__(*args: Any, **kwargs: Any) -> None:
        # `self` comes in *args, as in jinja's Namespace, so that `namespace(self=...)` still works
        self, args = args[0], args[1:]
        attrs = dict(*args, **kwargs)
        for name in attrs:
            TemplateNamespace.check_name(name)
        jinja2.utils.Namespace.__init__(self, attrs)

    def __setitem__(self, name: str, value: Any) -> None:
        TemplateNamespace.check_name(name)
        jinja2.utils.Namespace.__setitem__(self, name, value)

    @staticmethod
    def check_name(name: object) -> None:
        if isinstance(name, str) and name.startswith("_"):
            raise jinja2.exceptions.SecurityError(f"a chat template cannot store {name!r} on a namespace "
                                                  f"(underscore names are refused)")


class GenerationTag(jinja2.ext.Extension):
    """`{% generation %}...{% endgeneration %}` marks assistant text for loss masks; it renders its body.

    transformers uses the spans for `return_assistant_tokens_mask`; here the tag only has to parse
    so that templates that use it render the same text.
    """

    tags = {"generation"}

    def parse(self, parser: jinja2.parser.Parser) -> jinja2.nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.Scope(body).set_lineno(lineno)


def plain_template_data(value: Any) -> Any:
    """A copy of `value` made only of JSON types (dict, list, tuple, str, int, float, bool, None).

    Objects with methods the sandbox does not know to be dangerous never reach the template;
    anything else becomes a placeholder naming its type ("<ndarray>"), as in transformers.
    """
    if value is None or type(value) in (str, int, float, bool):
        return value
    if isinstance(value, str):  # subclasses (enums, numpy strings) may carry extra methods
        return str.__str__(value)
    if isinstance(value, int):
        return int.__int__(value)
    if isinstance(value, float):
        return float.__float__(value)
    if isinstance(value, Mapping):
        return {plain_template_data(k): plain_template_data(v) for k, v in value.items()}
    if isinstance(value, list):
        return [plain_template_data(v) for v in value]
    if isinstance(value, tuple):
        return tuple(plain_template_data(v) for v in value)
    if isinstance(value, np.generic):  # np.bool_(False) would otherwise become a truthy placeholder
        return plain_template_data(value.item())
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: plain_template_data(getattr(value, f.name)) for f in dataclasses.fields(value)}
    dump: Callable[[], Any] | None = getattr(value, "model_dump", None)  # pydantic models
    if callable(dump):
        return plain_template_data(dump())
    return f"<{type(value).__name__}>"


def alias_reasoning_fields(chat: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Fill `reasoning_content` (what templates read) and `thinking` from whichever name the message used."""
    out = []
    for message in chat:
        reasoning = next((message[k] for k in REASONING_FIELDS if message.get(k) is not None), None)
        if reasoning is not None:
            message = {"thinking": reasoning, **message, "reasoning_content": reasoning}
        out.append(message)
    return out
