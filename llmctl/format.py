"""What llmctl prints: human-readable tables and values (ps / docker ps style), and JSON lines."""
from __future__ import annotations

import calendar
import json
import sys
import threading
import time

import click


def echo_json(obj) -> None:
    """One JSON document on one line (for --json output and scripts)."""
    click.echo(json.dumps(obj, ensure_ascii=False))


def size(n: int | None) -> str:
    if n is None:
        return "-"
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return str(n)


def count(n: int | None) -> str:
    if n is None:
        return "-"
    for unit, div in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= div:
            return f"{n / div:.1f}{unit}"
    return str(n)


def ago(ts: float | str | None, now: float | None = None) -> str:
    if ts is None:
        return "-"
    if isinstance(ts, str):
        try:     # UTC: timegm, not mktime - timezone (an hour off while DST is in effect)
            ts = calendar.timegm(time.strptime(ts, "%Y-%m-%dT%H:%M:%SZ"))
        except ValueError:
            return ts
    d = max(0.0, (now or time.time()) - ts)
    for unit, secs in (("day", 86400), ("hour", 3600), ("minute", 60)):
        if d >= secs:
            k = int(d // secs)
            return f"{k} {unit}{'s' if k > 1 else ''} ago"
    return "just now" if d < 2 else f"{int(d)} seconds ago"


def table(headers: list[str], rows: list[list]) -> str:
    """Left-aligned columns separated by three spaces, like docker ps."""
    cells = [headers] + [[("" if c is None else str(c)) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = ["   ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in cells]
    return "\n".join(lines)


def short_digest(d: str | None) -> str:
    return d.split(":", 1)[-1][:12] if d else "-"


class StatusLine:
    """Progress of long work on stderr: one live line redrawn in place on a terminal (with the
    seconds elapsed, ticking), plain whole lines in a log (never ``\\r``-joined).

    ``update(text, frac)`` shows the current phase; in a log a phase with a fraction done is
    printed when it starts and at each further quarter, one without when its text changes.
    ``done(text)`` ends the line (a final text replaces it); ``clear()`` erases a live line
    before other output is written to the same terminal.  ``enabled=False`` prints nothing.
    """

    TICK_S = 1.0

    def __init__(self, stream=None, *, enabled: bool = True, tty: bool | None = None):
        self.stream = stream or sys.stderr
        self.enabled = enabled
        self.tty = _isatty(self.stream) if tty is None else tty
        self._text, self._key, self._quarter, self._since = "", _NO_PHASE, -1, 0.0
        self._live = False                  # a live line is on the terminal, not yet ended
        self._lock = threading.Lock()
        self._ticker: threading.Thread | None = None

    def update(self, text: str, frac: float | None = None, key: str | None = None) -> None:
        """Show ``text``; ``key`` names the phase (default: the text itself when ``frac`` is None)."""
        if not self.enabled:
            return
        key = key if key is not None else (text if frac is None else "")
        with self._lock:
            new_phase = key != self._key
            if new_phase:
                self._key, self._quarter, self._since = key, -1, time.monotonic()
            self._text = text
            if self.tty:
                self._draw()
                self._start_ticker()
                return
            quarter = -1 if frac is None else int(4 * min(max(frac, 0.0), 1.0))
            if new_phase or quarter > self._quarter:
                self._quarter = quarter
                self._write(text + "\n")

    def done(self, text: str | None = None) -> None:
        """End the current line: replaced by ``text`` if given, else kept as it is."""
        if not self.enabled:
            return
        with self._lock:
            if self.tty and self._live:
                self._write("\r\x1b[K" + (text if text is not None else self._line()) + "\n")
            elif text is not None:
                self._write(text + "\n")
            self._live, self._key, self._text = False, _NO_PHASE, ""

    def clear(self) -> None:
        """Erase a live line (so the next output starts at the left margin)."""
        with self._lock:
            if self.enabled and self.tty and self._live:
                self._write("\r\x1b[K")
            self._live, self._key, self._text = False, _NO_PHASE, ""

    def _line(self) -> str:
        secs = time.monotonic() - self._since
        return self._text + (f" ({secs:.0f}s)" if secs >= 2 else "")

    def _draw(self) -> None:
        self._write("\r\x1b[K" + self._line())
        self._live = True

    def _write(self, s: str) -> None:
        try:
            self.stream.write(s)
            self.stream.flush()
        except (OSError, ValueError):       # a closed or broken stderr is no reason to fail
            self.enabled = False

    def _start_ticker(self) -> None:
        """Redraw the elapsed seconds while the caller waits (terminals only)."""
        if self._ticker is not None:
            return

        def tick():
            while True:
                time.sleep(self.TICK_S)
                with self._lock:
                    if self._live and self.enabled:
                        self._draw()
        self._ticker = threading.Thread(target=tick, name="llmctl-status", daemon=True)
        self._ticker.start()


_NO_PHASE = object()


def _isatty(stream) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


# -- jobs -----------------------------------------------------------------------------------
def duration(secs: float | None) -> str:
    """A span of time as people read it: 45s, 3m12s, 2h05m, 3d04h ('-' when unknown)."""
    if secs is None:
        return "-"
    s = max(0, int(round(secs)))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    if s < 86400:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 86400}d{s % 86400 // 3600:02d}h"


def rate(tokens_per_s: float | None) -> str:
    """Tokens per second, short: 950 tok/s, 12.3k tok/s, 1.2M tok/s."""
    if tokens_per_s is None:
        return "-"
    for unit, div in (("M", 1e6), ("k", 1e3)):
        if tokens_per_s >= div:
            return f"{tokens_per_s / div:.1f}{unit} tok/s"
    return f"{tokens_per_s:.0f} tok/s"


def loss(x: float | None) -> str:
    return "-" if x is None else f"{x:.4f}"


def steps(step: int | None, max_steps: int | None) -> str:
    if step is None:
        return "-"
    return f"{step}/{max_steps}" if max_steps else str(step)


def job_state(row: dict, width: int = 40) -> str:
    """The state, with a failed job's reason cut to ``width`` characters."""
    state, reason = row.get("state") or "-", row.get("reason")
    if not reason or str(reason).strip() == state:      # "cancelled: cancelled" says nothing
        return state
    reason = " ".join(str(reason).split())
    return f"{state}: {reason if len(reason) <= width else reason[:width - 1] + '…'}"


def job_table(rows: list[dict], now: float | None = None) -> str:
    """Jobs as ``llmctl jobs`` lists them, like ps: newest last."""
    cells = [[r.get("job_id"), r.get("kind") or "-", r.get("model") or "-", job_state(r),
              _step_cell(r), loss(r.get("loss")), r.get("device") or "-",
              "-" if r.get("owner") is None else r["owner"], ago(r.get("created"), now)]
             for r in rows]
    return table(["ID", "KIND", "MODEL", "STATE", "STEP", "LOSS", "DEVICE", "OWNER", "AGE"], cells)


def _step_cell(r: dict) -> str:
    """A job table's STEP cell: step/max; for an eval, its number of examples ("40 ex")."""
    m = r.get("metrics") if isinstance(r.get("metrics"), dict) else {}
    if r.get("kind") == "eval" and m.get("examples") is not None:
        return f"{m['examples']} ex"
    return steps(r.get("step"), r.get("max_steps"))


def train_progress(m: dict, max_steps: int | None = None, lr: bool = False) -> str:
    """One metrics report as one line: step 120/2000  loss 2.3141  val 2.4012  12.3k tok/s  ETA 3m12s
    (with ``lr``, the learning rate after the losses); a fine-tune's validation figures follow
    the validation loss: ... val 0.5200 ppl 1.68 em 0.75 chrF 91.2 ..."""
    parts = [f"step {steps(m.get('step'), max_steps or m.get('max_steps'))}",
             f"loss {loss(m.get('loss'))}"]
    if m.get("val_loss") is not None:
        parts.append(f"val {loss(m['val_loss'])}")
    figures = val_metrics(m)
    if figures:
        parts.append(figures)
    if lr and m.get("lr") is not None:
        parts.append(f"lr {m['lr']:.2e}")
    if m.get("tokens_per_s") is not None:
        parts.append(rate(m["tokens_per_s"]))
    if m.get("eta_s") is not None:
        parts.append(f"ETA {duration(m['eta_s'])}")
    return "  ".join(parts)


# A fine-tune's validation figures (metrics.jsonl keys; a lineage's ``final.metrics`` names
# perplexity "perplexity"), as progress lines and ``show`` print them: (key, label, format).
VAL_FIGURES = (("val_ppl", "ppl", "{:.2f}"), ("perplexity", "ppl", "{:.2f}"),
               ("accuracy", "acc", "{:.3f}"), ("f1", "f1", "{:.3f}"),
               ("exact_match", "em", "{:.2f}"), ("chrf", "chrF", "{:.1f}"))


def val_metrics(m: dict, sep: str = " ") -> str:
    """The validation figures of a metrics map in one short string ("ppl 1.68 em 0.75 chrF
    91.2"; "acc 0.900 f1 0.889"), '' when it has none.  Perplexity once (val_ppl first)."""
    out, seen = [], set()
    for key, label, form in VAL_FIGURES:
        v = m.get(key)
        if label in seen or isinstance(v, bool) or not isinstance(v, (int, float)):
            continue
        seen.add(label)
        out.append(f"{label} {form.format(v)}")
    return sep.join(out)
