"""ChatSession: the cache follows the conversation; each turn prefills only what is new; overflow drops old turns."""

from __future__ import annotations

import json

import pytest

from qwen2cli.chatml import Message, default_system_prompt, encode_chat
from qwen2cli.errors import ContextOverflow
from qwen2cli.generate import Stats, generate, load_engine
from qwen2cli.load_options import LoadOptions
from qwen2cli.sampling import SamplingParams
from qwen2cli.session import ChatSession, Turn

GREEDY = SamplingParams(temperature=0, max_tokens=12, repeat_penalty=1.0)


@pytest.fixture(scope="module")
def engine(tiny_model):
    return load_engine(tiny_model, LoadOptions(device="cpu", dtype="float32"))


def answer(turn: Turn) -> str:
    return "".join(turn.stream())


def stats_of(turn: Turn) -> Stats:
    """The stats of a turn whose answer was read to its end."""
    assert turn.stats is not None, "the answer was not read to its end"
    return turn.stats


def from_scratch(engine, messages: list[Message], content_ids=()) -> tuple[str, list[int]]:
    """Render the whole conversation and generate with a fresh cache: no reuse at all."""
    ids = encode_chat(
        engine.tokenizer,
        messages,
        default_system=default_system_prompt(engine.tokenizer.chat_template),
        content_ids=content_ids,
    )
    chunks = list(generate(engine, ids, params=GREEDY, cache=engine.new_cache(1024)))
    stats = chunks[-1].stats
    assert stats is not None, "the last chunk carries the stats"
    return "".join(c.text for c in chunks), [t for t in stats.generated_ids if t not in engine.stop_ids]


def test_second_turn_prefills_only_new_tokens(engine):
    session = ChatSession(engine, params=GREEDY, ctx=512)
    first = session.ask("hello there")
    answer(first)
    cached_after_first = session.cache.pos
    second = session.ask("and again")
    answer(second)
    assert stats_of(second).prefilled_tokens == len(second.prompt_ids) - cached_after_first
    # what is new: the previous answer's last sampled token (never fed), its closing <|im_end|> and "\n", and the
    # new user turn with the assistant header
    new_turn = encode_chat(engine.tokenizer, [Message("user", "and again")], default_system=None)
    assert stats_of(second).prefilled_tokens == len(new_turn) + 3


def test_cached_conversation_equals_from_scratch(engine):
    """The tiny model's answers are not valid UTF-8, so the fresh render reuses their token ids, as the session does."""
    session = ChatSession(engine, params=GREEDY, ctx=512)
    history: list[Message] = []
    answers: list[list[int]] = []
    for question in ["first question", "second one", "a third, longer question with more words"]:
        got = answer(session.ask(question))
        history.append(Message("user", question))
        expected, expected_ids = from_scratch(engine, history, _content(history, answers))
        assert got == expected
        history.append(Message("assistant", got))
        answers.append(expected_ids)


def _content(history: list[Message], answers: list[list[int]]) -> list[list[int] | None]:
    produced = iter(answers)
    return [next(produced) if m.role == "assistant" else None for m in history]


@pytest.mark.real
def test_real_greedy_conversation_equals_from_scratch(real_model_dir):
    real = load_engine(real_model_dir, LoadOptions(device="cpu", dtype="float32"))
    session = ChatSession(real, params=GREEDY, ctx=1024)
    history: list[Message] = []
    for question in ["What is the capital of France?", "And of Japan?", "Write one line of Python that adds 2 and 3."]:
        got = answer(session.ask(question))
        history.append(Message("user", question))
        assert got == from_scratch(real, history)[0]  # rendered from text alone
        history.append(Message("assistant", got))


def test_undo_and_regenerate_reuse_the_common_prefix(engine):
    session = ChatSession(engine, params=GREEDY, ctx=512)
    answer(session.ask("one"))
    first_two = answer(session.ask("two"))
    again = session.regenerate()
    assert answer(again) == first_two
    assert stats_of(again).prefilled_tokens < len(again.prompt_ids) // 2
    assert session.undo() and len(session.messages) == 2
    third = session.ask("three")
    answer(third)
    assert stats_of(third).prefilled_tokens < len(third.prompt_ids)


def test_overflow_drops_oldest_turns_and_keeps_system(engine):
    session = ChatSession(
        engine, params=SamplingParams(temperature=0, max_tokens=8, repeat_penalty=1.0), ctx=96, system="sys"
    )
    dropped = 0
    for index in range(12):
        turn = session.ask(f"message number {index} with several words in it")
        answer(turn)
        dropped += turn.dropped_turns
        assert len(turn.prompt_ids) + 1 <= 96
    assert dropped > 0
    assert session.messages[-2].content.startswith("message number 11")
    assert session.system == "sys"


def test_single_message_too_long_is_refused(engine):
    session = ChatSession(engine, params=GREEDY, ctx=64)
    with pytest.raises(ContextOverflow, match="needs \\d+ tokens"):
        session.ask("word " * 200)
    assert session.messages == []


def test_cancel_keeps_partial_answer_marked_cut(engine):
    session = ChatSession(engine, params=SamplingParams(temperature=0, max_tokens=30, repeat_penalty=1.0), ctx=256)
    turn = session.ask("tell me something")
    stream = turn.stream()
    partial = next(stream)
    turn.cancel()
    assert session.messages[-1] == Message("assistant", partial)
    assert session.cut_flags == [True]
    assert session.cache.pos == len(session.cached_ids) <= len(turn.prompt_ids)
    answer(session.ask("next"))  # the conversation goes on


def test_save_and_load_round_trip(engine, tmp_path):
    session = ChatSession(engine, params=GREEDY, ctx=512, system="be brief")
    answer(session.ask("remember this"))
    path = tmp_path / "chat.json"
    session.save(path, model="tiny")
    data = json.loads(path.read_text())
    assert data["model"] == "tiny" and data["system"] == "be brief" and len(data["messages"]) == 2
    restored = ChatSession(engine, params=SamplingParams(), ctx=512)
    restored.load(path)
    assert restored.messages == session.messages and restored.params == session.params
    assert answer(restored.ask("what now")) == answer(session.ask("what now"))
