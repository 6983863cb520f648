"""The conversation loop of ``llmctl chat`` (and of ``llmctl run`` without a prompt), over the
client's ``chat`` call.

Reads one message per line from a terminal (with a prompt and line editing) or from a pipe (a
script), keeps the history, and prints each reply as it streams.  Ctrl-C stops the reply being
written (the partial reply is kept in the history); Ctrl-D or /bye leaves.  For a model without
a chat template (``plain``, from ``llmctl run``) each message is continued as plain text, with
no history.
"""
from __future__ import annotations

import json
import sys

from ..errors import DaemonUnavailable, LlmosdError
from ..format import StatusLine

HELP = """commands:
  /reset          forget the conversation (the system message stays)
  /system TEXT    set the system message (/system alone clears it)
  /history        show the conversation so far
  /bye            leave (Ctrl-D too)
end a line with \\ to continue the message on the next line"""


class ChatSession:
    def __init__(self, client, model: str, opts: dict, *, system: str | None = None,
                 as_json: bool = False, verbose: bool = False, stats_line=None, plain: bool = False):
        self.client, self.model, self.opts = client, model, opts
        self.system, self.as_json, self.verbose, self.plain = system, as_json, verbose, plain
        self.stats_line = stats_line or (lambda s: str(s))
        self.history: list[dict] = []

    def messages(self) -> list[dict]:
        sys_msg = [{"role": "system", "content": self.system}] if self.system else []
        return sys_msg + self.history

    def _read(self, inp, tty: bool) -> str | None:
        """One message (joining lines ending in a backslash); None at end of input."""
        parts = []
        while True:
            if tty:
                try:
                    line = input(">>> " if not parts else "... ")
                except EOFError:
                    return None if not parts else "\n".join(parts)
            else:
                line = inp.readline()
                if not line:
                    return None if not parts else "\n".join(parts)
                line = line.rstrip("\n")
            if line.endswith("\\"):
                parts.append(line[:-1])
                continue
            parts.append(line)
            return "\n".join(parts)

    def command(self, line: str, out) -> bool:
        """Run a /command; False means leave."""
        cmd, _, arg = line.partition(" ")
        if cmd in ("/bye", "/exit", "/quit"):
            return False
        if cmd == "/reset":
            self.history = []
            self._note("conversation reset")
        elif cmd == "/system":
            self.system = arg.strip() or None
            self._note("system message " + ("set" if self.system else "cleared"))
        elif cmd == "/history":
            for m in self.messages():
                print(f"{m['role']}: {m['content']}", file=out)
        elif cmd in ("/help", "/?"):
            print(HELP, file=out)
        else:
            self._note(f"unknown command {cmd}; /help lists them")
        return True

    def _note(self, msg: str) -> None:
        print(msg, file=sys.stderr)

    def reply(self, text: str, out, tty: bool = False) -> None:
        """Send ``text`` with the history; stream the answer.  In a terminal a daemon error
        (say, a conversation grown past the context) is shown and the turn dropped; in a
        script it ends the session with that error."""
        self.history.append({"role": "user", "content": text})
        if self.plain:
            gen = self.client.generate(self.model, text, **self.opts)
        else:
            gen = self.client.chat(self.model, self.messages(), **self.opts)
        from .infer import waiting_text     # here: infer imports this module at its top
        parts = []
        note = StatusLine(enabled=tty and not self.as_json)
        try:
            for piece in gen:
                chunk = (getattr(gen, "chunks", None) or [{}])[-1]
                if chunk.get("loading"):            # a load, or a swap-in: as generate -v says it
                    note.update(waiting_text(chunk))
                parts.append(piece)
                if not self.as_json and piece:
                    note.clear()
                    out.write(piece)
                    out.flush()
        except KeyboardInterrupt:
            note.clear()
            gen.cancel()
            self._note("\n(reply stopped)")
        except LlmosdError as e:
            note.clear()
            if not tty or isinstance(e, DaemonUnavailable):
                raise
            self.history.pop()
            self._note(f"error: {e}" + (f" ({e.hint})" if e.hint else "")
                       + "; try /reset if the conversation is too long")
            return
        note.clear()
        answer = "".join(parts)
        self.history.append({"role": "assistant", "content": answer})
        if self.plain:                      # no template, so no conversation to keep
            self.history = []
        if self.as_json:
            print(json.dumps({"role": "assistant", "content": answer, **(gen.stats or {})},
                             ensure_ascii=False), file=out)
        else:
            out.write("\n" if answer.endswith("\n") else "\n\n")
        out.flush()
        if self.verbose and gen.stats:
            self._note(self.stats_line(gen.stats))

    def run(self, inp, out) -> None:
        tty = inp.isatty()
        if tty:
            try:
                import readline  # noqa: F401  (line editing and history for input())
            except ImportError:
                pass
            self._note(f"chatting with {self.model}; /help for commands, Ctrl-D to leave")
            if self.plain:
                self._note(f"{self.model} has no chat template: each message is continued as plain text")
        while True:
            try:
                line = self._read(inp, tty)
            except KeyboardInterrupt:
                if not tty:
                    raise
                self._note("\n(use Ctrl-D or /bye to leave)")
                continue
            if line is None:
                if tty:
                    print(file=out)
                return
            if not line.strip():
                continue
            if line.startswith("/"):
                if not self.command(line.strip(), out):
                    return
                continue
            self.reply(line, out, tty)
