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
