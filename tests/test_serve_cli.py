"""`qwen2 serve`'s prompts against transformers' apply_chat_template, the shell side (run/chat --url,
--json-schema, --grammar, Ctrl-C), batched decoding of a quantized model, and the real model."""

from __future__ import annotations

import json
import signal
import threading
from pathlib import Path
from typing import Any

import httpx
import jsonschema
import openai
import pytest

from tests.serve_helpers import (
    CONVERSATIONS,
    GREEDY,
    MODEL,
    PERSON,
    SHELL_GREEDY,
    TOOLS,
    chat,
    make_tool_model,
    openai_client,
    our_ids,
    qwen2,
    reference_ids,
    serving,
    start_server,
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


@pytest.mark.parametrize("name", list(CONVERSATIONS))
@pytest.mark.parametrize("tools", [None, TOOLS], ids=["no tools", "tools"])
def test_prompt_ids_equal_apply_chat_template(tool_model, name, tools):
    messages = CONVERSATIONS[name]
    assert our_ids(tool_model, messages, tools) == reference_ids(tool_model, messages, tools)


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


def test_a_long_prompt_is_read_between_the_others_tokens(tiny_model, monkeypatch):
    """A prompt is read a chunk per turn of the worker, so an answer already streaming keeps getting tokens while a
    newcomer's long prompt is read; both answers are those each gets alone."""
    from qwen2cli.generate import load_engine
    from qwen2cli.load_options import LoadOptions
    from qwen2cli.sampling import SamplingParams
    from qwen2cli.serve.scheduler import Finished, Job, Scheduler, Token

    monkeypatch.setattr("qwen2cli.serve.scheduler.PREFILL_CHUNK", 8)
    engine = load_engine(tiny_model, LoadOptions(device="cpu"))
    short, long = engine.tokenizer.encode("short one"), engine.tokenizer.encode("a much longer prompt " * 12)
    assert len(long) > 5 * 8
    params = SamplingParams(temperature=0, repeat_penalty=1.0, max_tokens=40)
    scheduler = Scheduler(engine, slots=2)
    scheduler.start()
    events: list[tuple[str, Any]] = []
    done = {name: threading.Event() for name in ("short", "long", "short alone", "long alone")}
    first_short_token = threading.Event()

    def emit_as(name: str):
        def emit(event) -> None:
            events.append((name, event))
            if name == "short" and isinstance(event, Token):
                first_short_token.set()
            if not isinstance(event, Token):
                done[name].set()

        return emit

    try:
        scheduler.submit(Job(prompt_ids=short, params=params, emit=emit_as("short")))
        assert first_short_token.wait(60)
        submitted = len(events)
        scheduler.submit(Job(prompt_ids=long, params=params, emit=emit_as("long")))
        assert done["short"].wait(120) and done["long"].wait(120)
        scheduler.stop()
        scheduler = Scheduler(engine, slots=2)  # fresh slots: each prompt read whole, as above
        scheduler.start()
        for name, ids in (("short alone", short), ("long alone", long)):
            scheduler.submit(Job(prompt_ids=ids, params=params, emit=emit_as(name)))
            assert done[name].wait(120)
    finally:
        scheduler.stop()
    names = [name for name, event in events[submitted:] if isinstance(event, Token) and name in ("short", "long")]
    assert names[: names.index("long")].count("short") >= 4  # its tokens kept coming while the long prompt was read

    def tokens(name: str) -> list[int]:
        return [event.token_id for n, event in events if n == name and isinstance(event, Token)]

    assert tokens("short") == tokens("short alone") and tokens("long") == tokens("long alone")
    assert all(isinstance(event, Finished) for name, event in events if not isinstance(event, Token))


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


def test_a_taken_port_is_one_error(tiny_model):
    import socket
    import subprocess
    import sys

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        done = subprocess.run(
            [sys.executable, "-m", "qwen2cli", "serve", str(tiny_model), "--port", str(port), "--device", "cpu"],
            capture_output=True,
            text=True,
            timeout=120,
        )
    assert done.returncode == 1, done.stderr
    assert f"error: cannot listen on 127.0.0.1:{port}" in done.stderr and "Traceback" not in done.stderr
    assert "serving" not in done.stderr  # never announced


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
