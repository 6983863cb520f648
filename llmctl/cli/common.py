"""What the command modules share: the invocation's ``Client`` and the output-file error."""
from __future__ import annotations

import click

from ..client import Client
from ..errors import EX_CANTCREAT


def client(ctx: click.Context) -> Client:
    """The Client of this invocation, connected on first use.  A caller may put one in the
    root context's ``obj["client"]`` (tests inject fakes that way)."""
    obj = ctx.find_root().obj
    if "client" not in obj:
        obj["client"] = Client(obj["socket"], timeout=obj["timeout"]).connect()
    return obj["client"]


class OutputError(click.ClickException):
    """An output file or directory that cannot be written: one line, exit 73 (EX_CANTCREAT)."""
    exit_code = EX_CANTCREAT

    def __init__(self, path: str, reason: OSError | str):
        why = (reason.strerror or str(reason)) if isinstance(reason, OSError) else reason
        super().__init__(f"cannot write {path}: {why}")

    def show(self, file=None) -> None:
        click.echo(f"llmctl: {self.message}", err=True)


# -- memory (protocol 1.7) ------------------------------------------------------------------------
_UNITS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}
_PART = r"(\d+(?:\.\d+)?)([a-z]*)"
MAX_KEEP_ALIVE = 10 * 365 * 86400      # the protocol's bound


def parse_duration(text: str) -> float:
    """A keep-alive as Ollama takes it: seconds ('300', '2.5'), with units ('30s', '5m', '1h',
    '1h30m', '1d'), '0' (unload when the request ends) or any negative value ('-1', '-1m':
    forever, sent as -1).  ValueError naming the problem otherwise (the daemon's config reads
    the same forms)."""
    import re
    s = str(text).strip().lower().replace(" ", "")
    neg, body = s.startswith("-"), s.removeprefix("-")
    parts = re.findall(_PART, body)
    if not body or not re.fullmatch(f"(?:{_PART})+", body) or any(u not in _UNITS for _, u in parts):
        raise ValueError(f"{text!r} is not a duration: use seconds (300), 30s, 5m, 1h, 1h30m, 1d, "
                         f"0 (unload when done) or -1 (forever)")
    secs = sum(float(n) * _UNITS[u] for n, u in parts)
    if neg and secs:
        return -1.0
    if secs > MAX_KEEP_ALIVE:
        raise ValueError(f"{text!r} is longer than 10 years; use -1 to keep a model loaded forever")
    return secs


class Duration(click.ParamType):
    """--keep-alive DURATION: seconds as a float (see parse_duration); a usage error (exit 64)
    for anything else."""
    name = "duration"

    def convert(self, value, param, ctx):
        if isinstance(value, float):
            return value
        try:
            return parse_duration(value)
        except ValueError as e:
            self.fail(str(e), param, ctx)


def keep_alive_option(f):
    """The --keep-alive option of load and of the commands that run a model."""
    return click.option("--keep-alive", "keep_alive", type=Duration(), metavar="DURATION",
                        help="How long the model stays loaded once idle: 30s, 5m, 1h, 300 (seconds), "
                             "0 (unload when done), -1 (forever) [daemon default: 5m].")(f)


def preempt(flag: bool) -> dict:
    """The keyword a preemptible job submit adds (none otherwise: older fakes and daemons)."""
    return {"preemptible": True} if flag else {}
