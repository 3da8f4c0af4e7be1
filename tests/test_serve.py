"""`qwen2 serve` through the official openai client: answers against transformers, streaming, stop strings, JSON
schemas, tool calls, errors, auth, parallel requests, prefix reuse and disconnects; prompts against
transformers' apply_chat_template."""

from __future__ import annotations

import functools
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import jsonschema
import openai
import pytest
import torch

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


@pytest.fixture(scope="module")
def tool_model(tiny_model, tmp_path_factory) -> Path:
    return with_template(tiny_model, tmp_path_factory.mktemp("serve") / "tinyqwen")


@pytest.mark.parametrize("name", list(CONVERSATIONS))
@pytest.mark.parametrize("tools", [None, TOOLS], ids=["no tools", "tools"])
def test_prompt_ids_equal_apply_chat_template(tool_model, name, tools):
    messages = CONVERSATIONS[name]
    assert our_ids(tool_model, messages, tools) == reference_ids(tool_model, messages, tools)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_server(model_dir: Path, *extra: str) -> tuple[subprocess.Popen, str]:
    port = free_port()
    command = [sys.executable, "-m", "qwen2cli", "serve", str(model_dir), "--port", str(port), "--device", "cpu"]
    process = subprocess.Popen([*command, *extra], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
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


@pytest.fixture(scope="module")
def server(tool_model):
    process, url = start_server(tool_model, "--api-key", KEY, "--parallel", "4")
    yield url
    process.terminate()
    assert process.wait(timeout=30) == 0, process.communicate()[1]


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server}/v1", api_key=KEY, max_retries=0, timeout=120)


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


def test_models_and_health(server, client):
    assert [m.id for m in client.models.list().data] == [MODEL]
    assert httpx.get(f"{server}/health").json()["status"] == "ok"


def test_answer_equals_transformers_greedy(client, tool_model):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    messages = CONVERSATIONS["system and user"]
    answer = chat(client, messages, max_tokens=12)
    ids = reference_ids(tool_model, messages, None)
    model = AutoModelForCausalLM.from_pretrained(tool_model, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(tool_model)
    stops = [tokenizer.convert_tokens_to_ids(t) for t in ("<|im_end|>", "<|endoftext|>")] + [2]
    padding = list(range(len(tokenizer), model.config.vocab_size))  # ids no tokenizer produces: never sampled
    out = model.generate(
        torch.tensor([ids]), max_new_tokens=12, do_sample=False, eos_token_id=stops, suppress_tokens=padding
    )[0, len(ids) :]
    new = [t for t in out.tolist() if t not in stops]
    # a random model's tokens are often pieces of UTF-8 characters: the characters that decode must agree
    expected = str(tokenizer.decode(new)).replace("\ufffd", "")
    assert answer.choices[0].message.content.replace("\ufffd", "") == expected
    assert answer.usage.prompt_tokens == len(ids)
    assert answer.usage.completion_tokens == len(out)
    assert answer.choices[0].finish_reason == ("length" if len(out) == 12 and out[-1] not in stops else "stop")


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


def test_logprobs_equal_transformers(client, tool_model):
    from transformers import AutoModelForCausalLM

    messages = CONVERSATIONS["system and user"]
    answer = chat(client, messages, max_tokens=6, logprobs=True, top_logprobs=3)
    entries = answer.choices[0].logprobs.content
    ids = reference_ids(tool_model, messages, None)
    model = AutoModelForCausalLM.from_pretrained(tool_model, dtype=torch.float32)
    tokenizer = hf_tokenizer(tool_model)
    padding = list(range(len(tokenizer), model.config.vocab_size))  # ids no tokenizer produces: never sampled
    out = model.generate(
        torch.tensor([ids]),
        max_new_tokens=6,
        do_sample=False,
        suppress_tokens=padding,
        output_logits=True,
        return_dict_in_generate=True,
    )
    tokens = out.sequences[0, len(ids) :].tolist()
    byte_of = {char: byte for byte, char in bytes_to_unicode().items()}  # byte-level BPE's spelling of bytes
    assert len(entries) == len(tokens) == 6
    for entry, token, logits in zip(entries, tokens, out.logits, strict=True):
        logprobs = torch.log_softmax(logits[0, : len(tokenizer)].float(), -1)
        assert bytes(entry.bytes) == bytes(byte_of[c] for c in tokenizer.convert_ids_to_tokens(token))
        assert entry.logprob == pytest.approx(logprobs[token].item(), abs=1e-4)
        expected_top = torch.topk(logprobs, 3)
        assert [t.logprob for t in entry.top_logprobs] == pytest.approx(expected_top.values.tolist(), abs=1e-4)
    streamed_entries: list[Any] = []
    for chunk in chat(client, messages, max_tokens=6, logprobs=True, top_logprobs=3, stream=True):
        for choice in chunk.choices:
            streamed_entries += choice.logprobs.content if choice.logprobs else []
    assert [(e.bytes, e.logprob) for e in streamed_entries] == [(e.bytes, e.logprob) for e in entries]


def test_streaming_equals_non_streaming(client):
    messages = CONVERSATIONS["multi turn"]
    whole = chat(client, messages, max_tokens=16)
    text, calls, finish, usage = streamed(client, messages, max_tokens=16)
    assert (text, calls, finish) == (whole.choices[0].message.content, [], whole.choices[0].finish_reason)
    assert (usage.prompt_tokens, usage.completion_tokens) == (whole.usage.prompt_tokens, whole.usage.completion_tokens)
    plain = client.completions.create(model=MODEL, prompt="Once upon", max_tokens=10, **GREEDY)
    pieces = client.completions.create(model=MODEL, prompt="Once upon", max_tokens=10, stream=True, **GREEDY)
    assert "".join(c.choices[0].text for c in pieces) == plain.choices[0].text
    assert plain.usage.completion_tokens == 10 and plain.choices[0].finish_reason == "length"


SAMPLED = {"temperature": 1.0, "top_p": 1.0, "seed": 3}  # the tiny model's greedy answer is all broken UTF-8


def test_stop_string_is_never_emitted(client):
    messages = CONVERSATIONS["user only"]
    full = chat(client, messages, max_tokens=24, **SAMPLED).choices[0].message.content
    visible = full.replace("\ufffd", "")
    stop = visible[len(visible) // 2 : len(visible) // 2 + 2]
    assert stop.strip(), full
    expected = full[: full.index(stop)]
    cut = chat(client, messages, max_tokens=24, stop=[stop, "never there"], **SAMPLED)
    assert (cut.choices[0].message.content, cut.choices[0].finish_reason) == (expected, "stop")
    text, _, finish, usage = streamed(client, messages, max_tokens=24, stop=stop, **SAMPLED)
    assert (text, finish) == (expected, "stop")
    assert usage.completion_tokens < 24


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


@pytest.mark.parametrize("temperature", [0, 1.0])
def test_json_schema_output_validates(client, temperature):
    fmt = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON, "strict": True}}
    answer = chat(client, CONVERSATIONS["user only"], max_tokens=200, response_format=fmt, temperature=temperature)
    assert answer.choices[0].finish_reason == "stop"
    jsonschema.validate(json.loads(answer.choices[0].message.content), PERSON)


def check_calls(calls, names):
    assert calls
    by_name = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}
    for name, arguments in calls:
        assert name in names
        jsonschema.validate(json.loads(arguments), by_name[name])


def test_tool_choice_required_and_named(client):
    messages = CONVERSATIONS["user only"]
    required = chat(client, messages, tools=TOOLS, tool_choice="required", max_tokens=200)
    assert required.choices[0].finish_reason == "tool_calls"
    calls = required.choices[0].message.tool_calls
    check_calls([(c.function.name, c.function.arguments) for c in calls], {"get_weather", "get_time"})
    assert all(c.id.startswith("call_") and c.type == "function" for c in calls)
    assert len({c.id for c in calls}) == len(calls)
    named = chat(
        client,
        messages,
        tools=TOOLS,
        tool_choice={"type": "function", "function": {"name": "get_time"}},
        max_tokens=200,
    )
    assert named.choices[0].finish_reason == "tool_calls"
    check_calls([(c.function.name, c.function.arguments) for c in named.choices[0].message.tool_calls], {"get_time"})
    single = chat(client, messages, tools=TOOLS, tool_choice="required", parallel_tool_calls=False, max_tokens=200)
    assert len(single.choices[0].message.tool_calls) == 1


def test_tool_calls_stream_as_deltas(client):
    messages = CONVERSATIONS["tool results"]
    whole = chat(client, messages, tools=TOOLS, tool_choice="required", max_tokens=200)
    text, calls, finish, usage = streamed(client, messages, tools=TOOLS, tool_choice="required", max_tokens=200)
    expected = [
        {"name": c.function.name, "arguments": c.function.arguments} for c in whole.choices[0].message.tool_calls
    ]
    assert (calls, finish, text) == (expected, "tool_calls", whole.choices[0].message.content or "")
    assert usage.completion_tokens == whole.usage.completion_tokens


def test_tool_choice_none_and_auto(client):
    messages = CONVERSATIONS["user only"]
    none = chat(client, messages, tools=TOOLS, tool_choice="none", max_tokens=30)
    assert none.choices[0].message.tool_calls is None
    assert "<tool_call>" not in none.choices[0].message.content
    auto = chat(client, messages, tools=TOOLS, tool_choice="auto", max_tokens=200)
    message = auto.choices[0].message
    if message.tool_calls:
        assert auto.choices[0].finish_reason == "tool_calls"
        check_calls([(c.function.name, c.function.arguments) for c in message.tool_calls], {"get_weather", "get_time"})
    else:
        assert "<tool_call>" not in message.content


@pytest.mark.parametrize(
    ("fields", "named"),
    [
        ({"extra_body": {"bogus": 1}}, "bogus"),
        ({"temperature": -0.5}, "temperature"),
        ({"n": 2}, "'n'"),
        ({"top_logprobs": 2}, "top_logprobs"),
        ({"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
        ({"messages": []}, "messages"),
        ({"messages": [{"role": "user", "content": "hi", "name": "bob"}]}, "name"),
        ({"tool_choice": "required"}, "tools"),
    ],
)
def test_bad_requests_are_400_naming_the_field(client, fields, named):
    fields = {"messages": CONVERSATIONS["user only"], "max_tokens": 4, **fields}
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model=MODEL, **fields)
    assert named in caught.value.message


def test_over_long_prompt_is_400_with_both_numbers(client, tool_model):
    messages = [{"role": "user", "content": "hello world " * 1500}]
    length = len(reference_ids(tool_model, messages, None))
    assert length > CTX
    with pytest.raises(openai.BadRequestError) as caught:
        chat(client, messages, max_tokens=4)
    assert str(length) in caught.value.message and str(CTX) in caught.value.message


def test_wrong_key_is_401(server):
    wrong = openai.OpenAI(base_url=f"{server}/v1", api_key="nope", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        wrong.models.list()
    assert httpx.post(f"{server}/v1/completions", json={"model": MODEL, "prompt": "x"}).status_code == 401


def test_parallel_requests_equal_their_answers_alone(client, server):
    prompts = [[{"role": "user", "content": f"Question number {i}: {'why ' * i}?"}] for i in range(4)]
    alone = [chat(client, p, max_tokens=24).choices[0].message.content for p in prompts]
    together: list[str | None] = [None] * 4
    started = threading.Barrier(4)

    def ask(index: int) -> None:
        started.wait()
        together[index] = chat(client, prompts[index], max_tokens=24).choices[0].message.content

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert together == alone
    assert httpx.get(f"{server}/health").json()["requests"]["widest_step"] > 1  # they did run side by side


def test_quantized_gguf_model_batches_as_it_answers_alone(tmp_path):
    from qwen2cli.generate import load_engine
    from qwen2cli.gguf_import import import_gguf
    from qwen2cli.load_options import LoadOptions
    from qwen2cli.sampling import SamplingParams
    from qwen2cli.serve.scheduler import Finished, Job, Scheduler, Token
    from tests.tiny_gguf import write_tiny_gguf

    model_dir = import_gguf(write_tiny_gguf(tmp_path / "tiny.gguf"), tmp_path / "model")
    engine = load_engine(model_dir, LoadOptions(device="cpu"))
    prompts = [engine.tokenizer.encode(f"prompt {i} " * (i + 1)) for i in range(3)]
    params = SamplingParams(temperature=0, repeat_penalty=1.0, max_tokens=12)

    def answers(scheduler: Scheduler, together: bool) -> list[list]:
        outputs: list[list] = [[] for _ in prompts]
        done = [threading.Event() for _ in prompts]

        def emit_into(index: int):
            def emit(event) -> None:
                if isinstance(event, Token):
                    outputs[index].append(event.token_id)
                else:  # Finished, or Failed (whose message then stands in for the answer)
                    outputs[index].append(event if isinstance(event, Finished) else event.message)
                    done[index].set()

            return emit

        for index, ids in enumerate(prompts):
            scheduler.submit(Job(prompt_ids=ids, params=params, emit=emit_into(index)))
            if not together:
                done[index].wait(120)
        assert all(event.wait(120) for event in done)
        assert all(isinstance(output[-1], Finished) for output in outputs), outputs
        return [output[:-1] for output in outputs]

    alone_scheduler, together_scheduler = Scheduler(engine, slots=3), Scheduler(engine, slots=3)
    for scheduler in (alone_scheduler, together_scheduler):
        scheduler.start()
    try:
        assert answers(together_scheduler, True) == answers(alone_scheduler, False)
        assert together_scheduler.widest_step == 3 and alone_scheduler.widest_step == 1
    finally:
        alone_scheduler.stop()
        together_scheduler.stop()


def test_second_turn_reuses_the_first_turns_cache(client, tool_model):
    first = [{"role": "user", "content": "Remember the number seven. " * 20}]
    answer = chat(client, first, max_tokens=8).choices[0].message.content
    second = [*first, {"role": "assistant", "content": answer}, {"role": "user", "content": "Which number?"}]
    reply = chat(client, second, max_tokens=8)
    first_ids, second_ids = reference_ids(tool_model, first, None), reference_ids(tool_model, second, None)
    shared = next((i for i, (a, b) in enumerate(zip(first_ids, second_ids, strict=False)) if a != b), len(first_ids))
    assert shared >= len(first_ids) - 1
    assert shared <= reply.usage.prompt_tokens_details.cached_tokens < len(second_ids)


def test_disconnect_mid_stream_cancels_and_later_requests_are_served(client, server):
    headers = {"Authorization": f"Bearer {KEY}"}
    before = httpx.get(f"{server}/health").json()["requests"].get("cancelled", 0)
    body = {
        "model": MODEL,
        "messages": CONVERSATIONS["user only"],
        "stream": True,
        "max_tokens": 1500,
        "temperature": 0,
    }
    with httpx.stream("POST", f"{server}/v1/chat/completions", json=body, headers=headers, timeout=60) as response:
        lines = response.iter_lines()
        for _ in range(6):
            next(lines)
    deadline = time.monotonic() + 60
    while httpx.get(f"{server}/health").json()["requests"].get("cancelled", 0) == before:
        assert time.monotonic() < deadline, "the generation did not stop after the client left"
        time.sleep(0.1)
    assert httpx.get(f"{server}/health").json()["requests"]["active"] == 0
    messages = CONVERSATIONS["multi turn"]
    assert (
        streamed(client, messages, max_tokens=8)[0] == chat(client, messages, max_tokens=8).choices[0].message.content
    )


def test_disconnect_while_waiting_for_a_whole_answer_cancels(server):
    health = f"{server}/health"
    before = httpx.get(health).json()["requests"].get("cancelled", 0)
    body = json.dumps({"model": MODEL, "prompt": "Once", "max_tokens": 1900, "temperature": 0}).encode()
    host, port = server.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port))) as sock:
        head = (
            f"POST /v1/completions HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer {KEY}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
        )
        sock.sendall(head.encode() + body)
        deadline = time.monotonic() + 60
        while httpx.get(health).json()["requests"]["active"] == 0:  # generating
            assert time.monotonic() < deadline
            time.sleep(0.02)
    while httpx.get(health).json()["requests"].get("cancelled", 0) == before:
        assert time.monotonic() < deadline, "the generation did not stop after the client left"
        time.sleep(0.05)


def qwen2(args: list[str], stdin: str = "") -> subprocess.CompletedProcess:
    env = {**os.environ, "OPENAI_API_KEY": KEY}
    command = [sys.executable, "-m", "qwen2cli", *args]
    return subprocess.run(command, input=stdin, capture_output=True, text=True, timeout=300, env=env)


SHELL_GREEDY = ["--temperature", "0", "--repeat-penalty", "1", "--max-tokens", "10"]


def test_run_url_answers_as_the_server_does(client, server):
    done = qwen2(["run", "--url", server, "--json", "--system", "Be brief.", *SHELL_GREEDY, "Hello there"])
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    answer = chat(client, CONVERSATIONS["system and user"], max_tokens=10)
    assert result["text"] == answer.choices[0].message.content
    assert result["finish_reason"] == answer.choices[0].finish_reason
    assert result["usage"]["prompt_tokens"] == answer.usage.prompt_tokens
    raw = qwen2(["run", "--url", server, MODEL, "--raw", *SHELL_GREEDY], "Once upon")
    plain = client.completions.create(model=MODEL, prompt="Once upon", max_tokens=10, **GREEDY)
    assert (raw.returncode, raw.stdout) == (0, plain.choices[0].text)
    wrong = qwen2(["run", "--url", server, "-m", "nothing", "hi"])
    assert wrong.returncode == 1 and wrong.stderr.startswith("error: the server answered 404")


def test_chat_url_keeps_the_conversation(client, server):
    done = qwen2(["chat", "--url", server, *SHELL_GREEDY], "Hi\nTell me a joke.\n")
    assert done.returncode == 0, done.stderr
    first = chat(client, [{"role": "user", "content": "Hi"}], max_tokens=10).choices[0].message.content
    turns = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": first}]
    second = chat(client, [*turns, {"role": "user", "content": "Tell me a joke."}], max_tokens=10)
    assert done.stdout == f"{first}\n{second.choices[0].message.content}\n"


def test_run_json_schema_and_grammar(tiny_model, server, tmp_path):
    schema_file = tmp_path / "person.json"
    schema_file.write_text(json.dumps(PERSON))
    for sampling in (["--temperature", "0"], ["--temperature", "1", "--seed", "5"]):
        local = qwen2(
            ["run", str(tiny_model), "--json-schema", str(schema_file), "--max-tokens", "200", *sampling, "hi"]
        )
        assert local.returncode == 0, local.stderr
        jsonschema.validate(json.loads(local.stdout), PERSON)
    remote = qwen2(["run", "--url", server, "--json-schema", str(schema_file), "--max-tokens", "200", "hi"])
    assert remote.returncode == 0, remote.stderr
    jsonschema.validate(json.loads(remote.stdout), PERSON)
    lark, gbnf = tmp_path / "answer.lark", tmp_path / "answer.gbnf"
    lark.write_text('start: "yes" | "no" | "maybe"\n')
    gbnf.write_text('root ::= "yes" | "no"\n')
    for grammar, allowed in ((lark, {"yes", "no", "maybe"}), (gbnf, {"yes", "no"})):
        for seed in ("1", "2", "3"):
            done = qwen2(
                ["run", str(tiny_model), "--grammar", str(grammar), "--temperature", "1", "--seed", seed, "ok?"]
            )
            assert done.returncode == 0 and done.stdout in allowed, done.stderr
    for args, message in (
        (["--json-schema", str(tmp_path / "absent.json")], "cannot read"),
        (["--grammar", str(schema_file)], "cannot read the grammar"),
        (["--json-schema", str(schema_file), "--grammar", str(lark)], "not both"),
    ):
        done = qwen2(["run", str(tiny_model), *args, "hi"])
        assert done.returncode == 1 and done.stderr.startswith("error: ") and message in done.stderr, done.stderr
        assert "Traceback" not in done.stderr


def test_open_host_warns_and_ctrl_c_stops_cleanly(tiny_model):
    process, url = start_server(tiny_model, "--host", "0.0.0.0")
    assert httpx.get(f"{url}/v1/models").status_code == 200  # no key asked for
    process.send_signal(signal.SIGINT)
    stderr = process.communicate(timeout=60)[1]
    assert process.returncode == 130
    assert "warning: listening on 0.0.0.0 without --api-key" in stderr and "Traceback" not in stderr


def test_missing_model_name_is_404(client):
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="other", messages=CONVERSATIONS["user only"])


@pytest.mark.real
def test_real_template_equals_apply_chat_template(real_model_dir):
    for name, messages in CONVERSATIONS.items():
        for tools in (None, TOOLS):
            assert our_ids(real_model_dir, messages, tools) == reference_ids(real_model_dir, messages, tools), name


@pytest.mark.real
def test_real_model_calls_the_tool_it_is_asked_for(real_model_dir):
    process, url = start_server(real_model_dir, "--parallel", "1", "--ctx", "4096")
    try:
        client: Any = openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0, timeout=1200)
        model = client.models.list().data[0].id
        messages = [{"role": "user", "content": "What is the weather like in Paris, in celsius?"}]
        answer = client.chat.completions.create(
            model=model,
            messages=messages,
            tools=TOOLS,
            tool_choice="required",
            parallel_tool_calls=False,
            temperature=0,
            max_tokens=100,
        )
        calls = answer.choices[0].message.tool_calls
        assert answer.choices[0].finish_reason == "tool_calls"
        assert [(c.function.name, json.loads(c.function.arguments)) for c in calls] == [
            ("get_weather", {"city": "Paris", "unit": "celsius"})
        ]
        fmt = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON, "strict": True}}
        person = client.chat.completions.create(
            model=model,
            messages=[{"role": "user", "content": "Invent a user called Ann, aged 30, not an admin."}],
            response_format=fmt,
            temperature=0,
            max_tokens=100,
        )
        jsonschema.validate(json.loads(person.choices[0].message.content), PERSON)
        anything = client.chat.completions.create(
            model=model,
            messages=[{"role": "user", "content": "The capital of France and its country, as a JSON object."}],
            response_format={"type": "json_object"},
            temperature=0,
            max_tokens=120,
        )
        assert anything.choices[0].finish_reason == "stop"
        assert isinstance(json.loads(anything.choices[0].message.content), dict)
    finally:
        process.terminate()
        process.wait(timeout=30)
