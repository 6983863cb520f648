"""Token ids to streamed text, and stop strings, as pure logic (no torch).

``StreamDecoder`` emits only text that will not change when more tokens arrive: byte-fallback
pieces of one character can span tokens, and SentencePiece drops the leading space of the first
piece it decodes, so each step decodes a window that starts a few tokens back (TGI's method).
``StopMatcher`` holds back text that might be the start of a stop string.
"""
from __future__ import annotations


class StreamDecoder:
    def __init__(self, tokenizer, context_ids: list[int]):
        self.tok = tokenizer
        self.ids = list(context_ids[-4:])        # a little context so spaces decode right
        self.prefix = 0                           # window start
        self.read = len(self.ids)                 # end of what has been emitted

    def push(self, token: int) -> str:
        """Add one token; return newly completed text ('' while a character is incomplete)."""
        self.ids.append(token)
        before = self.tok.decode(self.ids[self.prefix:self.read])
        after = self.tok.decode(self.ids[self.prefix:])
        if len(after) > len(before) and not after.endswith("\ufffd"):
            new = after[len(before):]
            self.prefix, self.read = self.read, len(self.ids)
            return new
        return ""

    def flush(self) -> str:
        """Whatever remains at the end of the sequence (incomplete bytes become U+FFFD)."""
        before = self.tok.decode(self.ids[self.prefix:self.read])
        after = self.tok.decode(self.ids[self.prefix:])
        self.read = len(self.ids)
        return after[len(before):] if len(after) > len(before) else ""


class StopMatcher:
    """Feed text pieces; get back (text safe to emit, stopped?).  Output excludes the stop."""

    def __init__(self, stops: list[str]):
        self.stops = [s for s in stops if s]
        self.held = ""
        self.keep = max((len(s) for s in self.stops), default=1) - 1

    def feed(self, text: str) -> tuple[str, bool]:
        buf = self.held + text
        if not self.stops:
            return buf, False
        hits = [(buf.find(s), s) for s in self.stops if s in buf]
        if hits:
            pos = min(h[0] for h in hits)
            self.held = ""
            return buf[:pos], True
        # hold back the longest suffix that is a prefix of some stop string
        hold = 0
        for s in self.stops:
            for n in range(min(len(s) - 1, len(buf)), 0, -1):
                if buf.endswith(s[:n]):
                    hold = max(hold, n)
                    break
        self.held = buf[len(buf) - hold:] if hold else ""
        return buf[:len(buf) - hold], False

    def flush(self) -> str:
        out, self.held = self.held, ""
        return out
