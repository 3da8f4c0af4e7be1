"""The chat REPL: a prompt-toolkit loop and slash commands driving a ChatSession; plain line mode for pipes."""

from __future__ import annotations

import signal
import sys
from dataclasses import asdict
from pathlib import Path
from typing import BinaryIO

from . import paths
from .console import status_console, write_answer
from .errors import Qwen2Error, one_line
from .input_text import Utf8Input
from .session import ChatSession, Turn

COMMANDS = {
    "/help": "this list",
    "/system": "/system TEXT: set the system prompt",
    "/set": "/set KEY VALUE: temperature, top_p, top_k, min_p, repeat_penalty, seed, max_tokens",
    "/show": "model, settings and context used",
    "/reset": "forget the conversation",
    "/undo": "forget the last question and answer",
    "/regen": "answer the last question again",
    "/save": "/save FILE: write the conversation as JSON",
    "/load": "/load FILE: continue a saved conversation",
    "/read": "/read FILE: send a file's text as the next message",
    "/stats": "timings of the last answer",
    "/exit": "quit (Ctrl-D too)",
}
SETTING_TYPES = {
    "temperature": float,
    "top_p": float,
    "top_k": int,
    "min_p": float,
    "repeat_penalty": float,
    "seed": int,
    "max_tokens": int,
}


class Repl:
    """Reads user turns (a terminal or a pipe), runs commands, streams answers to stdout and status to stderr."""

    def __init__(self, session: ChatSession, *, model_name: str) -> None:
        self.session = session
        self.model_name = model_name
        self.status = status_console()
        self.last_turn: Turn | None = None
        self.failures = 0  # messages and commands that ended in an error

    def say(self, text: str, *, style: str = "dim") -> None:
        self.status.print(text, style=style, markup=False, highlight=False)

    # -- answering -------------------------------------------------------------------------------------------
    def answer(self, turn: Turn) -> None:
        """Stream one answer; Ctrl-C stops it, keeps what was said, and returns to the prompt."""
        if turn.dropped_turns:
            self.say(
                f"(dropped the {turn.dropped_turns} oldest turn(s) to fit the {self.session.ctx}-token "
                "context; the system prompt is kept)",
                style="yellow",
            )
        try:
            for text in turn.stream():
                write_answer(text)
        except KeyboardInterrupt:
            turn.cancel()
            write_answer("\n")
            self.say("[answer interrupted: kept as said]", style="yellow")
            self.last_turn = turn
            return
        write_answer("\n")
        self.last_turn = turn
        if turn.stats is not None:
            stats = turn.stats
            self.say(
                f"{stats.prompt_tokens} prompt tokens ({stats.prefilled_tokens} new) · TTFT {stats.ttft_s:.2f} s · "
                f"{stats.decode_tok_s:.1f} tok/s · context {self.session.context_used}/{self.session.ctx}"
            )
            if turn.finish_reason == "length":
                self.say("(stopped at --max-tokens or the end of the context)", style="yellow")

    # -- commands --------------------------------------------------------------------------------------------
    def command(self, line: str) -> bool:
        """Run a slash command; False means quit."""
        name, _, argument = line.strip().partition(" ")
        argument = argument.strip()
        session = self.session
        if name in ("/exit", "/quit", "/bye"):
            return False
        if name == "/help":
            for command, text in COMMANDS.items():
                self.say(f"{command:<8} {text}", style="")
        elif name == "/system":
            session.system = argument or None
            self.say("system prompt set" if argument else "system prompt back to the model's default")
        elif name == "/set":
            self._set(argument)
        elif name == "/show":
            settings = ", ".join(f"{k}={v}" for k, v in asdict(session.params).items())
            self.say(
                f"model {self.model_name} · {settings} · context {session.context_used}/{session.ctx} · "
                f"{len(session.messages)} messages",
                style="",
            )
        elif name == "/reset":
            session.reset()
            self.say("conversation cleared")
        elif name == "/undo":
            self.say("removed the last question and answer" if session.undo() else "nothing to undo")
        elif name == "/regen":
            self.answer(session.regenerate())
        elif name == "/save":
            session.save(Path(self._need(argument, "/save FILE")), model=self.model_name)
            self.say(f"saved to {argument}")
        elif name == "/load":
            session.load(Path(self._need(argument, "/load FILE")))
            self.say(f"loaded {len(session.messages)} messages from {argument}")
        elif name == "/read":
            path = Path(self._need(argument, "/read FILE")).expanduser()
            try:
                text = path.read_text(encoding="utf-8")
            except (OSError, UnicodeDecodeError) as exc:
                raise Qwen2Error(f"cannot read {path}: {exc}") from exc
            self.answer(session.ask(text))
        elif name == "/stats":
            self._stats()
        else:
            raise Qwen2Error(f"unknown command {name}: /help lists them")
        return True

    @staticmethod
    def _need(argument: str, usage: str) -> str:
        if not argument:
            raise Qwen2Error(f"usage: {usage}")
        return argument

    def _set(self, argument: str) -> None:
        key, _, value = argument.partition(" ")
        key = key.replace("-", "_")
        if key not in SETTING_TYPES or not value.strip():
            raise Qwen2Error(f"usage: /set KEY VALUE with KEY one of {', '.join(SETTING_TYPES)}")
        try:
            parsed = SETTING_TYPES[key](value.strip())
        except ValueError as exc:
            raise Qwen2Error(f"{key} needs a number, got {value.strip()!r}") from exc
        self.session.set_params(**{key: parsed})
        self.say(f"{key} = {parsed}")

    def _stats(self) -> None:
        turn = self.last_turn
        if turn is None:
            self.say("no answer yet")
            return
        if turn.stats is None:  # stopped before its first token
            self.say("the last answer was interrupted before its first token")
            return
        stats = turn.stats
        interrupted = " · interrupted" if turn.finish_reason == "interrupted" else ""
        self.say(
            f"prompt {stats.prompt_tokens} tokens ({stats.prefilled_tokens} prefilled, {stats.prefill_tok_s:.1f} "
            f"tok/s) · answer {stats.completion_tokens} tokens · TTFT {stats.ttft_s:.3f} s · decode "
            f"{stats.decode_tok_s:.2f} tok/s · context {self.session.context_used}/{self.session.ctx}{interrupted}",
            style="",
        )

    # -- input loops -----------------------------------------------------------------------------------------
    def handle(self, line: str) -> bool:
        """One line of input: a command or a message. False means quit."""
        if not line.strip():
            return True
        try:
            if line.lstrip().startswith("/"):
                return self.command(line)
            self.answer(self.session.ask(line))
        except Qwen2Error as exc:
            self.failures += 1
            self.say(f"error: {one_line(exc)}", style="red")
        return True

    def run_lines(self, stream: BinaryIO, *, strict: bool = False, first_message: str | None = None) -> int:
        """Pipe mode: `first_message`, then one user turn per line, answered in order; ends at end of input. Exit
        status 1 when any line failed (the others are still answered); input that is not UTF-8 is as Utf8Input says."""
        text = Utf8Input(strict=strict, warn=lambda message: self.say(message, style="yellow"))
        if first_message is not None and not self.handle(first_message):
            return 1 if self.failures else 0
        for line in text.lines(stream):
            if not self.handle(line):
                break
        return 1 if self.failures else 0

    def run_terminal(self, *, first_message: str | None = None) -> int:
        """Interactive mode with history, completion and multi-line input; `first_message` is answered first."""
        from prompt_toolkit import PromptSession
        from prompt_toolkit.completion import WordCompleter
        from prompt_toolkit.history import FileHistory
        from prompt_toolkit.key_binding import KeyBindings

        bindings = KeyBindings()

        @bindings.add("escape", "enter")
        def _newline(event) -> None:  # Alt-Enter: a new line in the same message
            event.current_buffer.insert_text("\n")

        # Ctrl-C is how an answer is stopped; a background job of a script inherits SIGINT ignored, which would leave
        # the key dead while an answer streams
        signal.signal(signal.SIGINT, signal.default_int_handler)
        history_path = paths.history_file()
        history_path.parent.mkdir(parents=True, exist_ok=True)
        prompt: PromptSession[str] = PromptSession(
            history=FileHistory(str(history_path)),
            key_bindings=bindings,
            completer=WordCompleter(list(COMMANDS), sentence=True),
        )
        self.say(f"qwen2 chat · {self.model_name} · /help for commands, Ctrl-D to quit")
        if first_message is not None and not self.handle(first_message):
            return 0
        while True:
            try:
                line = prompt.prompt(">>> ")
                if line.strip().startswith('"""'):
                    line = self._block(prompt, line)
            except KeyboardInterrupt:
                self.say("(Ctrl-C cancels; Ctrl-D or /exit quits)")
                continue
            except EOFError:
                return 0
            if not self.handle(line):
                return 0

    @staticmethod
    def _block(prompt, first: str) -> str:
        """The lines between \"\"\" markers, as one message."""
        body = first.strip()[3:]
        if body.rstrip().endswith('"""'):
            return body.rstrip()[:-3]
        lines = [body] if body else []
        while True:
            line = prompt.prompt("... ")
            if line.rstrip().endswith('"""'):
                lines.append(line.rstrip()[:-3])
                return "\n".join(lines).strip("\n")
            lines.append(line)


def run_chat(session: ChatSession, *, model_name: str, strict: bool = False, first_message: str | None = None) -> int:
    """The REPL on a terminal, line mode on a pipe (`strict`: input that is not UTF-8 is refused); `first_message`
    (from the command line) is the first turn."""
    repl = Repl(session, model_name=model_name)
    if sys.stdin.isatty():
        return repl.run_terminal(first_message=first_message)
    return repl.run_lines(sys.stdin.buffer, strict=strict, first_message=first_message)
