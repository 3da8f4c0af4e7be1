"""The REPL through a real pseudo-terminal (pexpect): streaming, settings, regen, undo, save/load, Ctrl-C, Ctrl-D."""

from __future__ import annotations

import io
import json
import re
import signal
import sys
import time

import pexpect
import pytest

PROMPT = ">>> "


def ignore_interrupts() -> None:
    """Start the chat as a script's background job would (`cmd &` leaves SIGINT ignored), the hardest case for
    Ctrl-C: the REPL must take the key back itself."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def spawn(model_dir, tmp_path, *extra: str) -> pexpect.spawn:
    env = {
        "QWEN2_HOME": str(tmp_path / "home"),
        "TERM": "dumb",
        "NO_COLOR": "1",
        "PATH": "/usr/bin:/bin",
        "PYTHONPATH": str(__import__("pathlib").Path(__file__).resolve().parents[1]),
    }
    child = pexpect.spawn(
        sys.executable,
        ["-m", "qwen2cli", "chat", str(model_dir), *extra],
        env=env,
        encoding="utf-8",
        timeout=180,
        dimensions=(50, 200),
        preexec_fn=ignore_interrupts,
    )
    child.expect_exact(PROMPT)
    return child


def ask(child: pexpect.spawn, text: str) -> str:
    """Send a line; return what came back before the stats line."""
    child.sendline(text)
    child.expect(r"prompt tokens \(\d+ new\)")
    answer = child.before
    child.expect_exact(PROMPT)
    return answer.split(text, 1)[-1].strip()


def command(child: pexpect.spawn, text: str) -> str:
    child.sendline(text)
    child.expect_exact(PROMPT)
    return child.before


def control(child: pexpect.spawn, key: str) -> None:
    """Send a control key once the prompt is really reading (a key sent while the prompt is still being drawn
    reaches a terminal not yet in raw mode, where Ctrl-D is swallowed by the line discipline)."""
    time.sleep(0.5)
    if key == "c":
        child.sendintr()
    else:
        child.sendcontrol(key)


def conversation(model_dir, tmp_path, question: str, follow_up: str, *, slow: bool) -> None:
    """`slow`: the model cannot finish 2000 tokens in the 1.5 s before Ctrl-C (the tiny model can hit the end of
    its context or sample an end-of-turn token first, so for it an answer that ends on its own is also accepted)."""
    log: list[str] = []
    child = spawn(model_dir, tmp_path, "--max-tokens", "24")
    log.append(command(child, "/set temperature 0"))
    first = ask(child, question)
    log.append(first)
    regen_one = command(child, "/regen")
    regen_two = command(child, "/regen")
    log += [regen_one, regen_two]
    strip = lambda text: text.split("prompt tokens")[0].replace("/regen", "").strip()  # noqa: E731
    assert strip(regen_one) == strip(regen_two) == first
    log.append(command(child, "/undo"))
    log.append(ask(child, question))
    save = tmp_path / "chat.json"
    log.append(command(child, f"/save {save}"))
    data = json.loads(save.read_text())
    assert [m["role"] for m in data["messages"]] == ["user", "assistant"]
    # Ctrl-C mid-answer: back at the prompt, history intact
    child.sendline("/set max_tokens 2000")
    child.expect_exact(PROMPT)
    child.sendline(follow_up)
    time.sleep(1.5)  # the answer is streaming by now (2000 tokens take far longer)
    child.sendintr()
    # Either the key stopped the answer, or (tiny model only) the answer had already ended, at --max-tokens, the
    # end of the context or an end-of-turn token, and the key reached the prompt, which says how to quit.
    ended = child.expect_exact(["[answer interrupted", "Ctrl-C cancels; Ctrl-D or /exit quits"])
    assert ended == 0 or not slow, "the answer was not streaming any more when Ctrl-C was sent"
    child.expect_exact(PROMPT)
    log.append(child.before)
    shown = command(child, "/show")
    log.append(shown)
    assert "4 messages" in shown
    control(child, "d")
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0
    # --load continues the saved conversation
    resumed = spawn(model_dir, tmp_path, "--load", str(save), "--max-tokens", "8")
    log.append(command(resumed, "/show"))
    assert "2 messages" in log[-1]
    log.append(ask(resumed, follow_up))
    resumed.sendline("/exit")
    resumed.expect(pexpect.EOF)
    resumed.close()
    assert resumed.exitstatus == 0
    assert "Traceback" not in "\n".join(log)


def test_tiny_model_session(tiny_model, tmp_path):
    conversation(tiny_model, tmp_path, "hello", "tell me more", slow=False)


def test_ctrl_c_at_empty_prompt_says_how_to_quit(tiny_model, tmp_path):
    child = spawn(tiny_model, tmp_path)
    control(child, "c")
    child.expect_exact("Ctrl-D or /exit quits")
    control(child, "d")
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0


@pytest.mark.real
def test_real_model_session(real_model_dir, tmp_path):
    conversation(
        real_model_dir,
        tmp_path,
        "What is the capital of France? One word.",
        "Write a long story about a lighthouse keeper.",
        slow=True,
    )


def context_shown(child: pexpect.spawn) -> int:
    """The context used, as /show reports it."""
    shown = command(child, "/show")
    used = re.search(r"context (\d+)/", shown)
    assert used is not None, shown
    return int(used.group(1))


def test_show_after_undo_counts_only_the_kept_turns(tiny_model, tmp_path):
    child = spawn(tiny_model, tmp_path, "--max-tokens", "6")
    command(child, "/set temperature 0")
    assert context_shown(child) == 0
    ask(child, "hello")
    after_first = context_shown(child)
    ask(child, "tell me more")
    after_second = context_shown(child)
    assert after_second > after_first > 0
    command(child, "/undo")
    # the second turn's tokens are gone; the first turn's stay, with at most three more that the second question's
    # prompt put in the cache: the first answer's last token (sampled, never fed back), its end marker, a newline
    assert after_first <= context_shown(child) <= after_first + 3
    command(child, "/undo")
    assert context_shown(child) == 0
    child.sendline("/exit")
    child.expect(pexpect.EOF)


class InterruptingOutput(io.StringIO):
    """Standard output on which Ctrl-C arrives while the answer's `at`-th piece is being written."""

    def __init__(self, at: int) -> None:
        super().__init__()
        self.left = at

    def write(self, text: str) -> int:
        self.left -= 1
        if self.left == 0:
            raise KeyboardInterrupt
        return super().write(text)


def test_stats_after_an_interrupted_answer(tiny_model, capsys, monkeypatch):
    from qwen2cli.generate import load_engine
    from qwen2cli.load_options import LoadOptions
    from qwen2cli.repl import Repl
    from qwen2cli.sampling import SamplingParams
    from qwen2cli.session import ChatSession

    engine = load_engine(tiny_model, LoadOptions(device="cpu", dtype="float32"))
    params = SamplingParams(temperature=1.0, top_k=0, top_p=1.0, seed=3, max_tokens=200)
    repl = Repl(ChatSession(engine, params=params), model_name="tiny")
    monkeypatch.setattr(sys, "stdout", InterruptingOutput(at=4))
    repl.handle("hello")
    status = capsys.readouterr().err
    assert "[answer interrupted: kept as said]" in status, "the answer ended before the fourth piece"
    turn = repl.last_turn
    assert turn is not None and turn.stats is not None, "the interrupted answer is kept, with its stats"
    repl.handle("/stats")
    shown = capsys.readouterr().err
    assert "no answer yet" not in shown
    said = re.search(r"answer (\d+) tokens", shown)
    assert said is not None, shown
    assert int(said.group(1)) == len(turn.stats.generated_ids) >= 3  # three pieces were written before the key
    assert "interrupted" in shown


def test_a_first_message_on_the_command_line_is_answered_before_the_prompt(tiny_model, tmp_path):
    child = pexpect.spawn(
        sys.executable,
        ["-m", "qwen2cli", "chat", "-m", str(tiny_model), "hello there", "--max-tokens", "3"],
        env={
            "QWEN2_HOME": str(tmp_path / "home"),
            "TERM": "dumb",
            "NO_COLOR": "1",
            "PATH": "/usr/bin:/bin",
            "PYTHONPATH": str(__import__("pathlib").Path(__file__).resolve().parents[1]),
        },
        encoding="utf-8",
        timeout=180,
        dimensions=(50, 200),
    )
    child.expect(r"prompt tokens \(\d+ new\)")  # the answer to "hello there", before any prompt
    child.expect_exact(PROMPT)
    assert "2 messages" in command(child, "/show")  # the question and its answer are the conversation
    child.sendline("/exit")
    child.expect(pexpect.EOF)
