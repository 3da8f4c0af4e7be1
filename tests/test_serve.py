"""`qwen2 serve` over HTTP through the official openai client: answers and logprobs against transformers,
streaming, stop strings, JSON schemas, tool calls, errors, auth, parallel requests, prefix reuse, disconnects."""

from __future__ import annotations

import json
import socket
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import jsonschema
import openai
import pytest
import torch

from tests.serve_helpers import (
    CONVERSATIONS,
    CTX,
    GREEDY,
    KEY,
    MODEL,
    PERSON,
    SAMPLED,
    TOOLS,
    bytes_to_unicode,
    chat,
    check_calls,
    hf_tokenizer,
    make_tool_model,
    openai_client,
    reference_ids,
    serving,
    streamed,
)


@pytest.fixture(scope="module")
def tool_model(tiny_model, tmp_path_factory) -> Path:
    return make_tool_model(tiny_model, tmp_path_factory)


@pytest.fixture(scope="module")
def server(tool_model):
    yield from serving(tool_model)


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return openai_client(server)


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


@pytest.mark.parametrize("temperature", [0, 1.0])
def test_json_schema_output_validates(client, temperature):
    fmt = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON, "strict": True}}
    answer = chat(client, CONVERSATIONS["user only"], max_tokens=200, response_format=fmt, temperature=temperature)
    assert answer.choices[0].finish_reason == "stop"
    jsonschema.validate(json.loads(answer.choices[0].message.content), PERSON)


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


def test_missing_model_name_is_404(client):
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="other", messages=CONVERSATIONS["user only"])
