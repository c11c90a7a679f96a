"""Chat templates of real model families render, and tokenize, exactly as transformers' apply_chat_template,
in a sandbox that a template cannot leave."""

import datetime
import re

import jinja2
import pytest
from tokenizers import AddedToken, Tokenizer

from temper.data.chat import ChatTemplateError, render_chat_template, select_chat_template
from temper.data.tokenizer import HFTokenizer, load_hf_tokenizer
from tests.conftest import SHARED_DATA
from tests.data.test_tokenizer import (
    FAMILY_CONFIGS,
    llama2_style,
    llama3_style,
    qwen2_style,
    training_corpus,
    write_hf_dir,
)

transformers = pytest.importorskip("transformers")

# ---- real templates (public text: the `chat_template` of each model's tokenizer_config.json) ----

# meta-llama/Meta-Llama-3-70B-Instruct tokenizer_config.json @ a5a71a7527eac1d651bb145436c72026887fb68e (as
# quoted in GoogleCloudPlatform/vertex-ai-samples' model garden docs); the 8B-Instruct one is the same.
LLAMA3 = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = '<|start_header_id|>' + "
    "message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}"
    "{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)

# meta-llama/Llama-3.1-8B-Instruct tokenizer_config.json (tools in the first user message, JSON tool calls).
LLAMA31 = (
    '{{- bos_token }}\n'
    '{%- if custom_tools is defined %}\n'
    '    {%- set tools = custom_tools %}\n'
    '{%- endif %}\n'
    '{%- if not tools_in_user_message is defined %}\n'
    '    {%- set tools_in_user_message = true %}\n'
    '{%- endif %}\n'
    '{%- if not date_string is defined %}\n'
    '    {%- set date_string = "26 Jul 2024" %}\n'
    '{%- endif %}\n'
    '{%- if not tools is defined %}\n'
    '    {%- set tools = none %}\n'
    '{%- endif %}\n'
    '\n'
    '{#- This block extracts the system message, so we can slot it into the right place. #}\n'
    "{%- if messages[0]['role'] == 'system' %}\n"
    "    {%- set system_message = messages[0]['content']|trim %}\n"
    '    {%- set messages = messages[1:] %}\n'
    '{%- else %}\n'
    '    {%- set system_message = "" %}\n'
    '{%- endif %}\n'
    '\n'
    '{#- System message + builtin tools #}\n'
    '{{- "<|start_header_id|>system<|end_header_id|>\\n\\n" }}\n'
    '{%- if builtin_tools is defined or tools is not none %}\n'
    '    {{- "Environment: ipython\\n" }}\n'
    '{%- endif %}\n'
    '{%- if builtin_tools is defined %}\n'
    '    {{- "Tools: " + builtin_tools | reject(\'equalto\', \'code_interpreter\') | join(", ") + "\\n\\n"}}\n'
    '{%- endif %}\n'
    '{{- "Cutting Knowledge Date: December 2023\\n" }}\n'
    '{{- "Today Date: " + date_string + "\\n\\n" }}\n'
    '{%- if tools is not none and not tools_in_user_message %}\n'
    '    {{- "You have access to the following functions. To call a function, please respond with JSON for a function call." }}\n'
    '    {{- \'Respond in the format {"name": function name, "parameters": dictionary of argument name and its value}.\' }}\n'
    '    {{- "Do not use variables.\\n\\n" }}\n'
    '    {%- for t in tools %}\n'
    '        {{- t | tojson(indent=4) }}\n'
    '        {{- "\\n\\n" }}\n'
    '    {%- endfor %}\n'
    '{%- endif %}\n'
    '{{- system_message }}\n'
    '{{- "<|eot_id|>" }}\n'
    '\n'
    '{#- Custom tools are passed in a user message with some extra guidance #}\n'
    '{%- if tools_in_user_message and not tools is none %}\n'
    '    {#- Extract the first user message so we can plug it in here #}\n'
    '    {%- if messages | length != 0 %}\n'
    "        {%- set first_user_message = messages[0]['content']|trim %}\n"
    '        {%- set messages = messages[1:] %}\n'
    '    {%- else %}\n'
    '        {{- raise_exception("Cannot put tools in the first user message when there\'s no first user message!") }}\n'
    '{%- endif %}\n'
    "    {{- '<|start_header_id|>user<|end_header_id|>\\n\\n' -}}\n"
    '    {{- "Given the following functions, please respond with a JSON for a function call " }}\n'
    '    {{- "with its proper arguments that best answers the given prompt.\\n\\n" }}\n'
    '    {{- \'Respond in the format {"name": function name, "parameters": dictionary of argument name and its value}.\' }}\n'
    '    {{- "Do not use variables.\\n\\n" }}\n'
    '    {%- for t in tools %}\n'
    '        {{- t | tojson(indent=4) }}\n'
    '        {{- "\\n\\n" }}\n'
    '    {%- endfor %}\n'
    '    {{- first_user_message + "<|eot_id|>"}}\n'
    '{%- endif %}\n'
    '\n'
    '{%- for message in messages %}\n'
    "    {%- if not (message.role == 'ipython' or message.role == 'tool' or 'tool_calls' in message) %}\n"
    "        {{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'+ message['content'] | trim + '<|eot_id|>' }}\n"
    "    {%- elif 'tool_calls' in message %}\n"
    '        {%- if not message.tool_calls|length == 1 %}\n'
    '            {{- raise_exception("This model only supports single tool-calls at once!") }}\n'
    '        {%- endif %}\n'
    '        {%- set tool_call = message.tool_calls[0].function %}\n'
    '        {%- if builtin_tools is defined and tool_call.name in builtin_tools %}\n'
    "            {{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' -}}\n"
    '            {{- "<|python_tag|>" + tool_call.name + ".call(" }}\n'
    '            {%- for arg_name, arg_val in tool_call.arguments | items %}\n'
    '                {{- arg_name + \'="\' + arg_val + \'"\' }}\n'
    '                {%- if not loop.last %}\n'
    '                    {{- ", " }}\n'
    '                {%- endif %}\n'
    '                {%- endfor %}\n'
    '            {{- ")" }}\n'
    '        {%- else  %}\n'
    "            {{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' -}}\n"
    '            {{- \'{"name": "\' + tool_call.name + \'", \' }}\n'
    '            {{- \'"parameters": \' }}\n'
    '            {{- tool_call.arguments | tojson }}\n'
    '            {{- "}" }}\n'
    '        {%- endif %}\n'
    '        {%- if builtin_tools is defined %}\n'
    "            {#- This means we're in ipython mode #}\n"
    '            {{- "<|eom_id|>" }}\n'
    '        {%- else %}\n'
    '            {{- "<|eot_id|>" }}\n'
    '        {%- endif %}\n'
    '    {%- elif message.role == "tool" or message.role == "ipython" %}\n'
    '        {{- "<|start_header_id|>ipython<|end_header_id|>\\n\\n" }}\n'
    '        {%- if message.content is mapping or message.content is iterable %}\n'
    '            {{- message.content | tojson }}\n'
    '        {%- else %}\n'
    '            {{- message.content }}\n'
    '        {%- endif %}\n'
    '        {{- "<|eot_id|>" }}\n'
    '    {%- endif %}\n'
    '{%- endfor %}\n'
    '{%- if add_generation_prompt %}\n'
    "    {{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}\n"
    '{%- endif %}\n'
)

# Qwen/Qwen2.5-7B-Instruct tokenizer_config.json (ChatML, Hermes-style <tool_call> tools).
QWEN25 = (
    '{%- if tools %}\n'
    "    {{- '<|im_start|>system\\n' }}\n"
    "    {%- if messages[0]['role'] == 'system' %}\n"
    "        {{- messages[0]['content'] }}\n"
    '    {%- else %}\n'
    "        {{- 'You are Qwen, created by Alibaba Cloud. You are a helpful assistant.' }}\n"
    '    {%- endif %}\n'
    '    {{- "\\n\\n# Tools\\n\\nYou may call one or more functions to assist with the user query.\\n\\nYou are provided with function signatures within <tools></tools> XML tags:\\n<tools>" }}\n'
    '    {%- for tool in tools %}\n'
    '        {{- "\\n" }}\n'
    '        {{- tool | tojson }}\n'
    '    {%- endfor %}\n'
    '    {{- "\\n</tools>\\n\\nFor each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\\n<tool_call>\\n{\\"name\\": <function-name>, \\"arguments\\": <args-json-object>}\\n</tool_call><|im_end|>\\n" }}\n'
    '{%- else %}\n'
    "    {%- if messages[0]['role'] == 'system' %}\n"
    "        {{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}\n"
    '    {%- else %}\n'
    "        {{- '<|im_start|>system\\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\\n' }}\n"
    '    {%- endif %}\n'
    '{%- endif %}\n'
    '{%- for message in messages %}\n'
    '    {%- if (message.role == "user") or (message.role == "system" and not loop.first) or (message.role == "assistant" and not message.tool_calls) %}\n'
    "        {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}\n"
    '    {%- elif message.role == "assistant" %}\n'
    "        {{- '<|im_start|>' + message.role }}\n"
    '        {%- if message.content %}\n'
    "            {{- '\\n' + message.content }}\n"
    '        {%- endif %}\n'
    '        {%- for tool_call in message.tool_calls %}\n'
    '            {%- if tool_call.function is defined %}\n'
    '                {%- set tool_call = tool_call.function %}\n'
    '            {%- endif %}\n'
    '            {{- \'\\n<tool_call>\\n{"name": "\' }}\n'
    '            {{- tool_call.name }}\n'
    '            {{- \'", "arguments": \' }}\n'
    '            {{- tool_call.arguments | tojson }}\n'
    "            {{- '}\\n</tool_call>' }}\n"
    '        {%- endfor %}\n'
    "        {{- '<|im_end|>\\n' }}\n"
    '    {%- elif message.role == "tool" %}\n'
    '        {%- if (loop.index0 == 0) or (messages[loop.index0 - 1].role != "tool") %}\n'
    "            {{- '<|im_start|>user' }}\n"
    '        {%- endif %}\n'
    "        {{- '\\n<tool_response>\\n' }}\n"
    '        {{- message.content }}\n'
    "        {{- '\\n</tool_response>' }}\n"
    '        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}\n'
    "            {{- '<|im_end|>\\n' }}\n"
    '        {%- endif %}\n'
    '    {%- endif %}\n'
    '{%- endfor %}\n'
    '{%- if add_generation_prompt %}\n'
    "    {{- '<|im_start|>assistant\\n' }}\n"
    '{%- endif %}\n'
)

# Qwen3's chat template, from the Qwen/Qwen3 checkpoints' tokenizer_config.json (ChatML; a <think> block in the turns after the last user query only,
# reasoning read from `reasoning_content` or from the content's "<think>...</think>"; enable_thinking=false).
QWEN3 = r"""{%- if tools %}
    {{- '<|im_start|>system\n' }}
    {%- if messages[0].role == 'system' %}
        {{- messages[0].content + '\n\n' }}
    {%- endif %}
    {{- "# Tools\n\nYou may call one or more functions to assist with the user query.\n\nYou are provided with function signatures within <tools></tools> XML tags:\n<tools>" }}
    {%- for tool in tools %}
        {{- "\n" }}
        {{- tool | tojson }}
    {%- endfor %}
    {{- "\n</tools>\n\nFor each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\n<tool_call>\n{\"name\": <function-name>, \"arguments\": <args-json-object>}\n</tool_call><|im_end|>\n" }}
{%- else %}
    {%- if messages[0].role == 'system' %}
        {{- '<|im_start|>system\n' + messages[0].content + '<|im_end|>\n' }}
    {%- endif %}
{%- endif %}
{%- set ns = namespace(multi_step_tool=true, last_query_index=messages|length - 1) %}
{%- for message in messages[::-1] %}
    {%- set index = (messages|length - 1) - loop.index0 %}
    {%- if ns.multi_step_tool and message.role == "user" and message.content is string and not(message.content.startswith('<tool_response>') and message.content.endswith('</tool_response>')) %}
        {%- set ns.multi_step_tool = false %}
        {%- set ns.last_query_index = index %}
    {%- endif %}
{%- endfor %}
{%- for message in messages %}
    {%- if message.content is string %}
        {%- set content = message.content %}
    {%- else %}
        {%- set content = '' %}
    {%- endif %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) %}
        {{- '<|im_start|>' + message.role + '\n' + content + '<|im_end|>' + '\n' }}
    {%- elif message.role == "assistant" %}
        {%- set reasoning_content = '' %}
        {%- if message.reasoning_content is string %}
            {%- set reasoning_content = message.reasoning_content %}
        {%- else %}
            {%- if '</think>' in content %}
                {%- set reasoning_content = content.split('</think>')[0].rstrip('\n').split('<think>')[-1].lstrip('\n') %}
                {%- set content = content.split('</think>')[-1].lstrip('\n') %}
            {%- endif %}
        {%- endif %}
        {%- if loop.index0 > ns.last_query_index %}
            {%- if loop.last or (not loop.last and reasoning_content) %}
                {{- '<|im_start|>' + message.role + '\n<think>\n' + reasoning_content.strip('\n') + '\n</think>\n\n' + content.lstrip('\n') }}
            {%- else %}
                {{- '<|im_start|>' + message.role + '\n' + content }}
            {%- endif %}
        {%- else %}
            {{- '<|im_start|>' + message.role + '\n' + content }}
        {%- endif %}
        {%- if message.tool_calls %}
            {%- for tool_call in message.tool_calls %}
                {%- if (loop.first and content) or (not loop.first) %}
                    {{- '\n' }}
                {%- endif %}
                {%- if tool_call.function %}
                    {%- set tool_call = tool_call.function %}
                {%- endif %}
                {{- '<tool_call>\n{"name": "' }}
                {{- tool_call.name }}
                {{- '", "arguments": ' }}
                {%- if tool_call.arguments is string %}
                    {{- tool_call.arguments }}
                {%- else %}
                    {{- tool_call.arguments | tojson }}
                {%- endif %}
                {{- '}\n</tool_call>' }}
            {%- endfor %}
        {%- endif %}
        {{- '<|im_end|>\n' }}
    {%- elif message.role == "tool" %}
        {%- if loop.first or (messages[loop.index0 - 1].role != "tool") %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\n<tool_response>\n' }}
        {{- content }}
        {{- '\n</tool_response>' }}
        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}
            {{- '<|im_end|>\n' }}
        {%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\n' }}
    {%- if enable_thinking is defined and enable_thinking is false %}
        {{- '<think>\n\n</think>\n\n' }}
    {%- endif %}
{%- endif %}"""


# mistralai/Mistral-7B-Instruct-v0.2 tokenizer_config.json, original (no system role), and the
# later mistralai "v1" template with an optional system message; both as quoted in
# ggml-org/llama.cpp tests/test-chat-template.cpp.
MISTRAL_V02 = (
    '{{ bos_token }}{% for message in messages %}'
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
    "{% endif %}{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ message['content'] + eos_token}}"
    "{% else %}{{ raise_exception('Only user and assistant roles are supported!') }}{% endif %}"
    '{% endfor %}'
)

MISTRAL_V1 = (
    "{%- if messages[0]['role'] == 'system' %}\n"
    "    {%- set system_message = messages[0]['content'] %}\n"
    '    {%- set loop_messages = messages[1:] %}\n'
    '{%- else %}\n'
    '    {%- set loop_messages = messages %}\n'
    '{%- endif %}\n'
    '\n'
    '{{- bos_token }}\n'
    '{%- for message in loop_messages %}\n'
    "    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}\n"
    "        {{- raise_exception('After the optional system message, conversation roles must alternate user/assistant/user/assistant/...') }}\n"
    '    {%- endif %}\n'
    "    {%- if message['role'] == 'user' %}\n"
    '        {%- if loop.first and system_message is defined %}\n'
    "            {{- ' [INST] ' + system_message + '\\n\\n' + message['content'] + ' [/INST]' }}\n"
    '        {%- else %}\n'
    "            {{- ' [INST] ' + message['content'] + ' [/INST]' }}\n"
    '        {%- endif %}\n'
    "    {%- elif message['role'] == 'assistant' %}\n"
    "        {{- ' ' + message['content'] + eos_token}}\n"
    '    {%- else %}\n'
    "        {{- raise_exception('Only user and assistant roles are supported, with the exception of an initial optional system message!') }}\n"
    '    {%- endif %}\n'
    '{%- endfor %}\n'
)

# google/gemma-7b-it (rejects a system role), as quoted in llama.cpp tests/test-chat-template.cpp.
GEMMA = (
    "{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}"
    '{% endif %}{% for message in messages %}'
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
    "{% endif %}{% if (message['role'] == 'assistant') %}{% set role = 'model' %}{% else %}"
    "{% set role = message['role'] %}"
    "{% endif %}{{ '<start_of_turn>' + role + '\\n' + message['content'] | trim + '<end_of_turn>\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{'<start_of_turn>model\\n'}}{% endif %}"
)

# Gemma 3's chat template (google/gemma-3-*-it tokenizer_config.json): a system turn goes into the first user
# turn, the assistant is "model", content is trimmed; images become <start_of_image>.
GEMMA3 = r"""{{ bos_token }}
{%- if messages[0]['role'] == 'system' -%}
    {%- if messages[0]['content'] is string -%}
        {%- set first_user_prefix = messages[0]['content'] + '\n\n' -%}
    {%- else -%}
        {%- set first_user_prefix = messages[0]['content'][0]['text'] + '\n\n' -%}
    {%- endif -%}
    {%- set loop_messages = messages[1:] -%}
{%- else -%}
    {%- set first_user_prefix = "" -%}
    {%- set loop_messages = messages -%}
{%- endif -%}
{%- for message in loop_messages -%}
    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}
        {{ raise_exception("Conversation roles must alternate user/assistant/user/assistant/...") }}
    {%- endif -%}
    {%- if (message['role'] == 'assistant') -%}
        {%- set role = "model" -%}
    {%- else -%}
        {%- set role = message['role'] -%}
    {%- endif -%}
    {{ '<start_of_turn>' + role + '\n' + (first_user_prefix if loop.first else "") }}
    {%- if message['content'] is string -%}
        {{ message['content'] | trim }}
    {%- elif message['content'] is iterable -%}
        {%- for item in message['content'] -%}
            {%- if item['type'] == 'image' -%}
                {{ '<start_of_image>' }}
            {%- elif item['type'] == 'text' -%}
                {{ item['text'] | trim }}
            {%- endif -%}
        {%- endfor -%}
    {%- else -%}
        {{ raise_exception("Invalid content type") }}
    {%- endif -%}
    {{ '<end_of_turn>\n' }}
{%- endfor -%}
{%- if add_generation_prompt -%}
    {{'<start_of_turn>model\n'}}
{%- endif -%}
"""

# microsoft/Phi-3-mini-4k-instruct, April 2024 (system messages dropped), as quoted in
# llama.cpp tests/test-chat-template.cpp ("Phi-3-mini").
PHI3 = (
    '{{ bos_token }}{% for message in messages %}'
    "{% if (message['role'] == 'user') %}{{'<|user|>' + '\n' + message['content'] + '<|end|>' + '\n' + '<|assistant|>' + '\n'}}"
    "{% elif (message['role'] == 'assistant') %}{{message['content'] + '<|end|>' + '\n'}}{% endif %}"
    '{% endfor %}'
)


# ---- conversations ----------------------------------------------------------------------------

SYSTEM = {"role": "system", "content": "You are a helpful assistant. Antworte bitte auf Deutsch."}
TURNS = [
    {"role": "user", "content": "Hello! Wie geht's? 你好 😀"},
    {"role": "assistant", "content": "  Gut, danke.  Und dir?  "},  # spaces that some templates trim
    {"role": "user", "content": "Write `print('<s>')` in Python.\n\n\tIndented, مرحبا."},
]
CHATS = {"one_turn": TURNS[:1], "multi_turn": TURNS, "system_multi_turn": [SYSTEM, *TURNS]}
TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "description": "Current weather in a city, in °C.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "description": "e.g. Zürich"}},
                   "required": ["city"]}}}]
TOOL_CHAT = [
    SYSTEM,
    {"role": "user", "content": "Wie ist das Wetter in Zürich?"},
    # content None as OpenAI sends it: dropped before rendering, as transformers does
    {"role": "assistant", "content": None,
     "tool_calls": [{"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Zürich"}}}]},
    {"role": "tool", "name": "get_weather", "content": '{"temp": 21, "sky": "sonnig"}'},
    {"role": "assistant", "content": "21 °C und sonnig."},
]

# template -> the tiny tokenizer of its family (see test_tokenizer.py) that encodes it
TEMPLATES = {"llama3": (LLAMA3, "llama3"), "llama3.1": (LLAMA31, "llama3"), "qwen2.5": (QWEN25, "qwen2"),
             "qwen3": (QWEN3, "qwen2"),
             "mistral-v0.2": (MISTRAL_V02, "mistral"), "mistral-v1": (MISTRAL_V1, "mistral"),
             "gemma": (GEMMA, "gemma"), "gemma3": (GEMMA3, "gemma"), "phi3": (PHI3, "phi3")}
# Gemma and Phi-3 use a Llama-2 style pipeline with their control tokens added; Phi-3's strip
# the whitespace after them (rstrip), as in its tokenizer.json.
GEMMA_TOKENS = [AddedToken(t, special=True, normalized=False)
                for t in ("<bos>", "<eos>", "<start_of_turn>", "<end_of_turn>")]
PHI3_TOKENS = [AddedToken("<|endoftext|>", special=True, normalized=False)] + [
    AddedToken(t, rstrip=True, special=True, normalized=False) for t in ("<|assistant|>", "<|end|>", "<|user|>", "<|system|>")]
CHAT_CONFIGS = {
    **FAMILY_CONFIGS,
    "gemma": {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<bos>", "eos_token": "<eos>",
              "pad_token": "<unk>", "unk_token": "<unk>"},
    "phi3": {"tokenizer_class": "LlamaTokenizer", "bos_token": "<s>", "eos_token": "<|endoftext|>",
             "unk_token": "<unk>", "add_bos_token": True, "legacy": False},
}


@pytest.fixture(scope="module")
def tokenizers(tmp_path_factory) -> dict[str, tuple[HFTokenizer, object]]:
    """(temper's, AutoTokenizer's) tokenizer of each family."""
    if not SHARED_DATA.exists():
        pytest.skip(f"shared data not found at {SHARED_DATA}")
    return family_tokenizers(tmp_path_factory.mktemp("chat"))


def family_tokenizers(root) -> dict[str, tuple[HFTokenizer, object]]:
    """(temper's, AutoTokenizer's) tokenizer of each family, trained on the shared data, under root."""
    corpus = training_corpus(SHARED_DATA)
    llama2 = llama2_style(corpus)
    trained = {"llama3": llama3_style(corpus), "qwen2": qwen2_style(corpus), "mistral": llama2,
               "gemma": with_tokens(llama2, GEMMA_TOKENS), "phi3": with_tokens(llama2, PHI3_TOKENS)}
    out = {}
    for family, tok in trained.items():
        directory = write_hf_dir(root / family, tok, CHAT_CONFIGS[family])
        out[family] = (load_hf_tokenizer(directory),
                       transformers.AutoTokenizer.from_pretrained(str(directory), local_files_only=True))
    return out


def with_tokens(tok: Tokenizer, added: list[AddedToken]) -> Tokenizer:
    copy = Tokenizer.from_str(tok.to_str())
    copy.add_tokens(added)
    return copy


def assert_renders_as_transformers(ours: HFTokenizer, theirs, template: str, chat: list[dict], **kwargs) -> bool:
    """Same text and ids as apply_chat_template, or the same refusal; True when it rendered."""
    try:
        expected = theirs.apply_chat_template(chat, chat_template=template, tokenize=False, **kwargs)
    except jinja2.TemplateError as e:  # the template's raise_exception
        with pytest.raises(ChatTemplateError, match=re.escape(str(e))):
            ours.render_chat(chat, template=template, **kwargs)
        return False
    assert ours.render_chat(chat, template=template, **kwargs) == expected
    ids = theirs.apply_chat_template(chat, chat_template=template, tokenize=True, return_dict=False, **kwargs)
    assert ours.encode_chat(chat, template=template, **kwargs) == ids
    return True


@pytest.mark.parametrize("name", list(TEMPLATES))
def test_real_templates_render_and_tokenize_as_transformers(name, tokenizers):
    template, family = TEMPLATES[name]
    ours, theirs = tokenizers[family]
    rendered = [assert_renders_as_transformers(ours, theirs, template, chat, add_generation_prompt=prompt)
                for chat in CHATS.values() for prompt in (False, True)]
    assert sum(rendered) >= 4  # only the system conversation may be refused (Gemma, Mistral v0.2)
    if name in ("gemma", "mistral-v0.2"):
        with pytest.raises(ChatTemplateError, match="System role not supported|roles must alternate"):
            ours.render_chat(CHATS["system_multi_turn"], template=template)


def test_the_template_writes_bos_once(tokenizers):
    """encode_chat adds no special tokens: the template's own {{ bos_token }} is the only BOS."""
    chat = TURNS[:2]  # TURNS[2] quotes "<s>", which encodes as the token (transformers' default too)
    for family, template in (("llama3", LLAMA3), ("mistral", MISTRAL_V1), ("phi3", PHI3)):
        ours, _ = tokenizers[family]
        ids = ours.encode_chat(chat, template=template)
        assert ids[0] == ours.bos_id and ids.count(ours.bos_id) == 1, family
        assert ours.encode(ours.render_chat(chat, template=template))[:2] == [ours.bos_id] * 2  # the trap


@pytest.mark.parametrize("name", ["llama3.1", "qwen2.5", "qwen3"])
def test_tool_templates_render_tools_and_tool_calls_as_transformers(name, tokenizers):
    template, family = TEMPLATES[name]
    ours, theirs = tokenizers[family]
    for prompt in (False, True):
        assert assert_renders_as_transformers(ours, theirs, template, TOOL_CHAT, tools=TOOLS, add_generation_prompt=prompt)
        assert assert_renders_as_transformers(ours, theirs, template, TOOL_CHAT[:2], tools=TOOLS, add_generation_prompt=prompt)
    text = ours.render_chat(TOOL_CHAT, tools=TOOLS, template=template)
    assert "Zürich" in text and '"get_weather"' in text and "None" not in text


def test_qwen3_reasoning_in_the_last_turns_only_as_transformers(tokenizers):
    """Reasoning as `reasoning_content` (or its aliases) or inline "<think>...</think>": kept after the last user
    query, dropped before it; enable_thinking=false closes an empty block in the generation prompt."""
    ours, theirs = tokenizers["qwen2"]
    chat = [{"role": "user", "content": "2 + 2?"},
            {"role": "assistant", "content": "<think>\nadd them\n</think>\n\n4"},
            {"role": "user", "content": "And 3 + 3?"},
            {"role": "assistant", "content": "6", "thinking": "add again"}]
    for kwargs in ({}, {"add_generation_prompt": True, "enable_thinking": False}):
        for upto in (2, 3, 4):
            assert assert_renders_as_transformers(ours, theirs, QWEN3, chat[:upto], **kwargs)
    text = ours.render_chat(chat, template=QWEN3)
    assert "add them" not in text and "<think>\nadd again\n</think>\n\n6" in text
    assert ours.render_chat(chat[:2], template=QWEN3).endswith("<think>\nadd them\n</think>\n\n4<|im_end|>\n")


def test_template_variables_tojson_reasoning_and_generation_tag_as_transformers(tokenizers):
    ours, theirs = tokenizers["qwen2"]
    template = (
        "{% for m in messages %}{% generation %}[{{ m.role }}|{{ m.reasoning_content | default('-') }}]{% endgeneration %}"
        "{{ m | tojson }}{{ m | tojson(indent=2, sort_keys=True) }}{% endfor %}"
        "{{ eos_token }}{{ pad_token }}{{ bos_token }}{{ tools | tojson }}{{ documents | tojson }}{{ extra }}"
        "{% set ns = namespace(n=0) %}{% for m in messages %}{% set ns.n = ns.n + 1 %}{% if loop.index > 1 %}{% break %}{% endif %}{% endfor %}"
        "{{ ns.n }}{{ dict(a=1) | tojson }}"
    )
    chat = [{"role": "user", "content": "Grüße <b>&</b> 😀"}, {"role": "assistant", "content": "ok", "thinking": "hmm"}]
    docs = [{"title": "Zürich", "text": "Stadt"}]
    for kwargs in ({}, {"documents": docs, "extra": "x"}):
        assert assert_renders_as_transformers(ours, theirs, template, chat, **kwargs)
    text = ours.render_chat(chat, template=template)
    assert "Grüße <b>&</b> 😀" in text and "[assistant|hmm]" in text  # non-ASCII and HTML kept, reasoning aliased


def test_strftime_now_and_raise_exception():
    year = datetime.date.today().strftime("%Y")
    assert render_chat_template("{{ strftime_now('%Y') }}", TURNS) in (year, str(int(year) + 1))
    with pytest.raises(ChatTemplateError, match=r"rejected the conversation: only \d+ turns, sorry"):
        render_chat_template("{{ raise_exception('only ' ~ messages|length ~ ' turns, sorry') }}", TURNS)


ESCAPES = [
    "{{ ''.__class__.__mro__[1].__subclasses__() }}",
    "{{ ''.__class__ }}",
    "{{ cycler.__init__.__globals__.os.system('touch PWNED') }}",
    "{{ lipsum.__globals__['os'].system('touch PWNED') }}",
    "{{ joiner.__init__.__globals__['os'].popen('touch PWNED').read() }}",
    "{{ (''|attr('__class__')|attr('__mro__'))[1] }}",
    "{{ '{0.__class__.__mro__}'.format(messages) }}",
    "{{ raise_exception.__globals__['__builtins__']['exec']('open(\"PWNED\", \"w\")') }}",
    "{{ self.__init__.__globals__ }}",
    "{{ namespace.__init__.__globals__ }}",
    "{{ messages.append({'role': 'system', 'content': 'injected'}) }}",
    "{% set x = messages.pop() %}{{ messages | length }}",
    "{{ messages[0].update({'role': 'system'}) }}",
    "{% set ns = namespace(_hidden=1) %}",
    "{% set ns = namespace() %}{% set ns.__class__ = 1 %}",
]


@pytest.mark.parametrize("template", ESCAPES)
def test_templates_cannot_reach_python_internals_or_mutate_their_input(template, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    chat = [dict(m) for m in TURNS]
    with pytest.raises(ChatTemplateError, match="unsafe operation"):
        render_chat_template(template, chat)
    assert not (tmp_path / "PWNED").exists()
    assert chat == TURNS


def test_bad_templates_and_inputs_give_clear_errors():
    with pytest.raises(ChatTemplateError, match="syntax error on line 2"):
        render_chat_template("ok\n{% for m in messages %}", TURNS)
    with pytest.raises(ChatTemplateError, match="empty conversation"):
        render_chat_template("x", [])
    with pytest.raises(ChatTemplateError, match="message 1 is a str"):
        render_chat_template("x", [TURNS[0], "hi"])
    def get_weather(city: str) -> str:
        return city

    with pytest.raises(ChatTemplateError, match="tool 0 is a function: give tools as JSON-schema dicts"):
        render_chat_template("x", TURNS, tools=[get_weather])
    with pytest.raises(ChatTemplateError, match="failed: TypeError"):
        render_chat_template("{{ messages[0].content + 1 }}", TURNS)
    with pytest.raises(ChatTemplateError, match="no chat template"):
        select_chat_template({})
    with pytest.raises(ChatTemplateError, match=r"no default: name one of \['a', 'b'\]"):
        select_chat_template({"a": "A", "b": "B"})
    assert select_chat_template({"a": "A"}, "{{ 1 }}") == "{{ 1 }}"  # text that names no template is a template


def test_objects_reach_templates_only_as_plain_data():
    class Role(str):
        def dangerous(self) -> str:
            return "ran"

    chat = [{"role": Role("user"), "content": "hi", "meta": object()}]
    assert render_chat_template("{{ messages[0].role }} {{ messages[0].meta }}", chat) == "user <object>"
    with pytest.raises(ChatTemplateError):
        render_chat_template("{{ messages[0].role.dangerous() }}", chat)
