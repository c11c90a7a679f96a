"""A reasoning model's reply split into thinking and answer (`ReasoningSplitter`): the same split whatever pieces
the reply streams in, tags held back while split across pieces, and replies without a block left whole. Tool calls
read from a reply (`parse_tool_calls`, `ToolCallSplitter`) as vLLM's hermes and llama3_json parsers read them, the
same streamed."""

import pytest

from temper.infer.text import TOOL_CALL_FORMATS, ReasoningSplitter, ToolCallSplitter, parse_tool_calls

CASES = [
    # (reply, the prompt opened the block, reasoning, answer)
    ("<think>\nadd them\n</think>\n\n4", False, "\nadd them\n", "\n\n4"),  # Qwen3
    ("\n <think>a</think>b", False, "a", "b"),  # whitespace before the block is layout
    ("add them\n</think>\n\n4", True, "add them\n", "\n\n4"),  # DeepSeek-R1: the prompt ends with <think>
    ("just 4", False, "", "just 4"),  # no block: all answer
    ("4 <think>x</think>", False, "", "4 <think>x</think>"),  # a block later on is part of the answer
    ("<think>cut off by max_tokens", False, "cut off by max_tokens", ""),
    ("<thi", False, "", "<thi"),  # a tag's start that never completes is text
    ("still </thin", True, "still </thin", ""),
    ("", False, "", ""),
]


@pytest.mark.parametrize("reply, thinking, reasoning, answer", CASES)
def test_the_split_is_the_same_for_every_way_the_reply_streams(reply, thinking, reasoning, answer):
    cuts = [(i, j) for i in range(len(reply) + 1) for j in range(i, len(reply) + 1)]
    for i, j in cuts:  # three pieces, every pair of cut points
        splitter = ReasoningSplitter(thinking=thinking)
        got = [splitter.feed(reply[:i]), splitter.feed(reply[i:j]), splitter.feed(reply[j:], final=True)]
        assert ("".join(r for r, _ in got), "".join(a for _, a in got)) == (reasoning, answer), (i, j)
    splitter = ReasoningSplitter(thinking=thinking)  # a character at a time: no part of a tag leaks into either side
    streamed = [splitter.feed(ch) for ch in reply] + [splitter.feed("", final=True)]
    assert ("".join(r for r, _ in streamed), "".join(a for _, a in streamed)) == (reasoning, answer)


CALL = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Zürich"}}\n</tool_call>'
ZURICH = [("get_weather", '{"city": "Zürich"}')]
TOOL_CASES = [
    # (format, reply, content, calls); calls None: no call parses, the reply is all content
    ("hermes", CALL, "", ZURICH),
    ("hermes", "Let me look.\n" + CALL + "\n" + CALL.replace("get_weather", "get_time"), "Let me look.\n",
     [("get_weather", '{"city": "Zürich"}'), ("get_time", '{"city": "Zürich"}')]),
    ("hermes", '<tool_call>{"name": "f", "parameters": {}}', "", [("f", "{}")]),  # ended at EOS before its closing tag
    ("hermes", '<tool_call>{"name": "f", "arguments": "{\\"x\\": 1}"}</tool_call>', "",
     [("f", '{"x": 1}')]),  # arguments given as a JSON string
    ("hermes", "no call here", "no call here", None),
    ("hermes", "<tool_call>not json</tool_call>", "<tool_call>not json</tool_call>", None),
    ("hermes", '<tool_call>{"arguments": {}}</tool_call>', '<tool_call>{"arguments": {}}</tool_call>', None),  # no name
    ("hermes", "<tool_ca", "<tool_ca", None),  # a tag's start that never completes is content
    ("llama3_json", '{"name": "get_weather", "parameters": {"city": "Zürich"}}', "", ZURICH),
    ("llama3_json", ' <|python_tag|>{"name": "f", "parameters": {}}; {"name": "g", "parameters": {"x": ";"}}', " ",
     [("f", "{}"), ("g", '{"x": ";"}')]),  # a ";" inside a string is not a separator
    ("llama3_json", 'Sure: {"name": "f", "parameters": {}}', 'Sure: {"name": "f", "parameters": {}}', None),  # late
    ("llama3_json", '{"name": "f", "parameters": {}', '{"name": "f", "parameters": {}', None),  # cut short
    ("llama3_json", "{}", "{}", None),
    ("llama3_json", "  ", "  ", None),
]


@pytest.mark.parametrize("name, reply, content, calls", TOOL_CASES)
def test_tool_calls_parse_and_stream_alike(name, reply, content, calls):
    fmt = TOOL_CALL_FORMATS[name]
    assert parse_tool_calls(reply, fmt) == (None if calls is None else (content, calls))
    for i in range(len(reply) + 1):  # two pieces, every cut; then a character at a time
        splitter = ToolCallSplitter(fmt)
        assert splitter.feed(reply[:i]) + splitter.feed(reply[i:], final=True) == content, i
        assert splitter.calls == (calls or [])
    splitter = ToolCallSplitter(fmt)
    assert "".join(splitter.feed(ch) for ch in reply) + splitter.feed("", final=True) == content
