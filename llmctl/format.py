"""What llmctl prints: human-readable tables and values (ps / docker ps style), and JSON lines."""
from __future__ import annotations

import json
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
        try:
            ts = time.mktime(time.strptime(ts, "%Y-%m-%dT%H:%M:%SZ")) - time.timezone
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
