"""What the `qwen2 serve` tests share: a tiny model with Qwen2.5's chat template, conversations and tools,
transformers' prompt ids, a server started on a free port, and client helpers."""

from __future__ import annotations

import functools
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import jsonschema
import openai

from qwen2cli.serve.schema import parse_chat
from qwen2cli.serve.template import ChatTemplate
from qwen2cli.tokenizer import Qwen2Tokenizer

KEY = "test-key"
CTX = 2048

# Qwen2.5-Instruct's chat template (tokenizer_config.json of the Qwen2.5 checkpoints), tools included
QWEN25_TEMPLATE = (
    "{%- if tools %}\n    {{- '<|im_start|>system\\n' }}\n    {%- if messages[0]['role'] == 'system' %}\n"
    "        {{- messages[0]['content'] }}\n    {%- else %}\n"
    "        {{- 'You are Qwen, created by Alibaba Cloud. You are a helpful assistant.' }}\n    {%- endif %}\n"
    '    {{- "\\n\\n# Tools\\n\\nYou may call one or more functions to assist with the user query.\\n\\nYou are '
    'provided with function signatures within <tools></tools> XML tags:\\n<tools>" }}\n'
    '    {%- for tool in tools %}\n        {{- "\\n" }}\n        {{- tool | tojson }}\n    {%- endfor %}\n'
    '    {{- "\\n</tools>\\n\\nFor each function call, return a json object with function name and arguments '
    'within <tool_call></tool_call> XML tags:\\n<tool_call>\\n{\\"name\\": <function-name>, \\"arguments\\": '
    '<args-json-object>}\\n</tool_call><|im_end|>\\n" }}\n{%- else %}\n'
    "    {%- if messages[0]['role'] == 'system' %}\n"
    "        {{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}\n    {%- else %}\n"
    "        {{- '<|im_start|>system\\nYou are Qwen, created by Alibaba Cloud. You are a helpful "
    "assistant.<|im_end|>\\n' }}\n    {%- endif %}\n{%- endif %}\n{%- for message in messages %}\n"
    '    {%- if (message.role == "user") or (message.role == "system" and not loop.first) or '
    '(message.role == "assistant" and not message.tool_calls) %}\n'
    "        {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}\n"
    "    {%- elif message.role == \"assistant\" %}\n        {{- '<|im_start|>' + message.role }}\n"
    "        {%- if message.content %}\n            {{- '\\n' + message.content }}\n        {%- endif %}\n"
    "        {%- for tool_call in message.tool_calls %}\n            {%- if tool_call.function is defined %}\n"
    "                {%- set tool_call = tool_call.function %}\n            {%- endif %}\n"
    '            {{- \'\\n<tool_call>\\n{"name": "\' }}\n            {{- tool_call.name }}\n'
    '            {{- \'", "arguments": \' }}\n            {{- tool_call.arguments | tojson }}\n'
    "            {{- '}\\n</tool_call>' }}\n        {%- endfor %}\n        {{- '<|im_end|>\\n' }}\n"
    '    {%- elif message.role == "tool" %}\n'
    '        {%- if (loop.index0 == 0) or (messages[loop.index0 - 1].role != "tool") %}\n'
    "            {{- '<|im_start|>user' }}\n        {%- endif %}\n        {{- '\\n<tool_response>\\n' }}\n"
    "        {{- message.content }}\n        {{- '\\n</tool_response>' }}\n"
    '        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}\n'
    "            {{- '<|im_end|>\\n' }}\n        {%- endif %}\n    {%- endif %}\n{%- endfor %}\n"
    "{%- if add_generation_prompt %}\n    {{- '<|im_start|>assistant\\n' }}\n{%- endif %}\n"
)

WEATHER: dict[str, Any] = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather in a city.",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "maxLength": 12},
                "unit": {"enum": ["celsius", "fahrenheit"]},
            },
            "required": ["city", "unit"],
            "additionalProperties": False,
        },
    },
}
CLOCK: dict[str, Any] = {
    "type": "function",
    "function": {
        "name": "get_time",
        "description": "The time now.",
        "parameters": {
            "type": "object",
            "properties": {"utc": {"type": "boolean"}},
            "required": ["utc"],
            "additionalProperties": False,
        },
    },
}
TOOLS: list[dict[str, Any]] = [WEATHER, CLOCK]
CONVERSATIONS: dict[str, list[dict[str, Any]]] = {
    "system and user": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello there"}],
    "user only": [{"role": "user", "content": "What is 2+2?"}],
    "multi turn": [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello! How can I help?"},
        {"role": "user", "content": [{"type": "text", "text": "Tell me "}, {"type": "text", "text": "a joke."}]},
    ],
    "tool results": [
        {"role": "system", "content": "You can look things up."},
        {"role": "user", "content": "Weather in Paris and the time?"},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": "call_1",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"city": "Paris", "unit": "celsius"}'},
                },
                {"id": "call_2", "type": "function", "function": {"name": "get_time", "arguments": '{"utc": true}'}},
            ],
        },
        {"role": "tool", "tool_call_id": "call_1", "content": '{"temp": 21}'},
        {"role": "tool", "tool_call_id": "call_2", "content": "12:00"},
        {"role": "assistant", "content": "It is 21 C and noon."},
        {"role": "user", "content": "Thanks, and Tokyo?"},
    ],
}


def with_template(source: Path, target: Path) -> Path:
    """A copy of a checkpoint whose tokenizer carries Qwen2.5's chat template (tools included)."""
    shutil.copytree(source, target)
    config_path = target / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config["chat_template"] = QWEN25_TEMPLATE
    config_path.write_text(json.dumps(config))
    return target


@functools.cache
def hf_tokenizer(model_dir: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_dir)


def reference_ids(model_dir: Path, messages: list[dict], tools: list[dict] | None) -> list[int]:
    """The prompt ids transformers' apply_chat_template gives (tool-call arguments as objects, as it expects)."""
    tokenizer = hf_tokenizer(model_dir)
    plain = []
    for message in messages:
        message = dict(message)
        if isinstance(message.get("content"), list):
            message["content"] = "".join(part["text"] for part in message["content"])
        if message.get("tool_calls"):
            message["tool_calls"] = [
                {**c, "function": {**c["function"], "arguments": json.loads(c["function"]["arguments"])}}
                for c in message["tool_calls"]
            ]
            message["content"] = message["content"] or ""
        plain.append(message)
    rendered = tokenizer.apply_chat_template(plain, tools=tools, add_generation_prompt=True, tokenize=True)
    return list(rendered["input_ids"] if isinstance(rendered, dict) or hasattr(rendered, "keys") else rendered)


def our_ids(model_dir: Path, messages: list[dict], tools: list[dict] | None) -> list[int]:
    tokenizer = Qwen2Tokenizer.from_dir(model_dir)
    request = parse_chat({"model": "m", "messages": messages, **({"tools": tools} if tools else {})})
    template = ChatTemplate.from_model(model_dir, tokenizer.chat_template)
    assert template is not None
    return tokenizer.encode(template.render(request.messages, tools=request.tools))


def make_tool_model(tiny_model: Path, tmp_path_factory) -> Path:
    """The tiny model as served to the tests (the module fixtures `tool_model` call this)."""
    return with_template(tiny_model, tmp_path_factory.mktemp("serve") / "tinyqwen")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_server(model_dir: Path, *extra: str) -> tuple[subprocess.Popen, str]:
    port = free_port()
    command = [sys.executable, "-m", "qwen2cli", "serve", str(model_dir), "--port", str(port), "--device", "cpu"]
    # started as a script's background job would be (`cmd &` leaves SIGINT ignored): Ctrl-C must still stop it
    process = subprocess.Popen(
        [*command, *extra],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN),
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"the server exited: {process.communicate()[1]}")
        try:
            if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                return process, url
        except httpx.HTTPError:
            time.sleep(0.2)
    process.kill()
    raise AssertionError("the server did not come up")


def serving(tool_model: Path) -> Iterator[str]:
    """A keyed server on the tool model for a module's tests (their `server` fixture); SIGTERM stops it with 0."""
    process, url = start_server(tool_model, "--api-key", KEY, "--parallel", "4")
    yield url
    process.terminate()
    assert process.wait(timeout=30) == 0, process.communicate()[1]


def openai_client(url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key=KEY, max_retries=0, timeout=120)


MODEL = "tinyqwen"
GREEDY = {"temperature": 0, "extra_body": {"repetition_penalty": 1.0}}


def chat(client, messages, **fields):
    return client.chat.completions.create(model=MODEL, messages=messages, **{**GREEDY, **fields})


def streamed(client, messages, **fields) -> tuple[str, list[dict[str, str]], Any, Any]:
    """Text, tool calls (accumulated from deltas), finish reason and usage of a streamed chat answer."""
    text, finish, usage = "", None, None
    calls: dict[int, dict[str, str]] = {}
    stream = chat(client, messages, stream=True, stream_options={"include_usage": True}, **fields)
    for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
        for choice in chunk.choices:
            text += choice.delta.content or ""
            for call in choice.delta.tool_calls or []:
                entry = calls.setdefault(call.index, {"name": "", "arguments": ""})
                entry["name"] += call.function.name or ""
                entry["arguments"] += call.function.arguments or ""
            finish = choice.finish_reason or finish
    return text, [calls[i] for i in sorted(calls)], finish, usage


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte-level alphabet: the character each byte is spelled with in a byte-level BPE vocabulary."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), 256))
    chars = printable[:]
    extra = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            chars.append(256 + extra)
            extra += 1
    return dict(zip(printable, map(chr, chars), strict=True))


SAMPLED = {"temperature": 1.0, "top_p": 1.0, "seed": 3}  # the tiny model's greedy answer is all broken UTF-8


PERSON: dict[str, Any] = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 8},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "admin": {"type": "boolean"},
        "role": {"enum": ["user", "guest"]},
    },
    "required": ["name", "age", "admin", "role"],
    "additionalProperties": False,
}


def check_calls(calls, names):
    assert calls
    by_name = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}
    for name, arguments in calls:
        assert name in names
        jsonschema.validate(json.loads(arguments), by_name[name])


def qwen2(args: list[str], stdin: str = "") -> subprocess.CompletedProcess:
    env = {**os.environ, "OPENAI_API_KEY": KEY}
    command = [sys.executable, "-m", "qwen2cli", *args]
    return subprocess.run(command, input=stdin, capture_output=True, text=True, timeout=300, env=env)


SHELL_GREEDY = ["--temperature", "0", "--repeat-penalty", "1", "--max-tokens", "10"]
