"""The REPL through a real pseudo-terminal (pexpect): streaming, settings, regen, undo, save/load, Ctrl-C, Ctrl-D."""

from __future__ import annotations

import json
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
