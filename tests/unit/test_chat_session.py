"""llmctl's chat loop (llmctl.cli.repl.ChatSession) with a fake client injected: history,
/commands, and what a daemon error does in a terminal and in a script."""
import io

import pytest

from llmctl.cli.repl import ChatSession
from llmctl.errors import InvalidArgument


class FakeGen:
    def __init__(self, pieces, error=None):
        self._it, self.error, self.stats = iter(pieces), error, None

    def __iter__(self):
        return self

    def __next__(self):
        try:
            return next(self._it)
        except StopIteration:
            if self.error:
                raise self.error
            self.stats = {"finish_reason": "stop"}
            raise

    def cancel(self):
        return self.stats


class FakeClient:
    def __init__(self, fail_on=None):
        self.calls, self.fail_on = [], fail_on

    def chat(self, model, messages, **opts):
        self.calls.append([dict(m) for m in messages])
        if self.fail_on and messages[-1]["content"] == self.fail_on:
            return FakeGen([], InvalidArgument("the prompt is 9000 tokens, more than the model's context"))
        return FakeGen(["re: ", messages[-1]["content"]])


class PlainClient(FakeClient):
    def generate(self, model, prompt, **opts):
        self.calls.append(prompt)
        return FakeGen([prompt, " and so on"])


class Tty(io.StringIO):
    def isatty(self):
        return True


def test_history_commands_and_script_mode():
    c, out = FakeClient(), io.StringIO()
    s = ChatSession(c, "m", {}, system="be kind")
    s.run(io.StringIO("hello\n/reset\n/system terse\nagain\n/history\n/bye\nnever sent\n"), out)
    assert c.calls[0] == [{"role": "system", "content": "be kind"}, {"role": "user", "content": "hello"}]
    assert c.calls[1] == [{"role": "system", "content": "terse"}, {"role": "user", "content": "again"}]
    assert len(c.calls) == 2
    text = out.getvalue()
    assert "re: hello" in text and "assistant: re: again" in text


def test_error_ends_a_script_but_not_a_terminal_session(monkeypatch, capsys):
    c = FakeClient(fail_on="too long")
    with pytest.raises(InvalidArgument):
        ChatSession(c, "m", {}).run(io.StringIO("too long\nnext\n"), io.StringIO())
    c = FakeClient(fail_on="too long")
    lines = iter(["too long", "next"])

    def fake_input(prompt=""):
        try:
            return next(lines)
        except StopIteration:
            raise EOFError
    monkeypatch.setattr("builtins.input", fake_input)
    s = ChatSession(c, "m", {})
    s.run(Tty(), io.StringIO())
    assert "more than the model's context" in capsys.readouterr().err
    assert s.history == [{"role": "user", "content": "next"}, {"role": "assistant", "content": "re: next"}]


def test_continuation_lines_join_in_a_terminal(monkeypatch):
    lines = iter(["first \\", "second"])
    monkeypatch.setattr("builtins.input", lambda prompt="": next(lines))
    c = FakeClient()
    s = ChatSession(c, "m", {})
    assert s._read(Tty(), True) == "first \nsecond"


def test_plain_session_continues_each_line_without_history():
    c, out = PlainClient(), io.StringIO()
    s = ChatSession(c, "m", {}, plain=True)
    s.run(io.StringIO("Once upon\nROMEO:\n"), out)
    assert c.calls == ["Once upon", "ROMEO:"] and s.history == []
    assert "Once upon and so on" in out.getvalue()
