"""``llmctl``: the command line.  It reaches the daemon only through ``llmctl.Client``.

The commands live by subject, each a module-level click command: ``store`` (ls, show, rm, tag,
create, import, export), ``table`` (status, free, ps, load, unload, pin, unpin), ``top`` (the
live view), ``infer`` (run, generate, chat,
score, classify, embed), ``jobs`` (train, jobs, logs, cancel, pause, resume; ``job_export``
writes ``train --export``'s cluster jobs), ``finetune`` (finetune, eval, merge); ``repl`` is
the conversation loop of chat and run.
This module is the group and the entry point.

Exit statuses follow sysexits(3): 64 usage, 65 bad data, 66 no such model, 69 daemon
unavailable, 70 internal error, 73 already exists / cannot create an output file, 74 I/O error,
75 busy/try again, 76 protocol, 77 permission denied, 130 Ctrl-C.  Nothing ends in a traceback.
"""
from __future__ import annotations

import difflib
import errno
import os
import sys

import click
import zmq

from ..errors import EX_IOERR, EX_PROTOCOL, EX_UNAVAILABLE, EX_USAGE, LlmosdError
from ..paths import normalize_socket
from . import admin, finetune, http, infer, jobs, keygen, metrics, store, table, top

# What users of other tools type, and what llmctl calls it.
ALIASES = {
    "pull": "there is no registry to pull from: use 'llmctl import FILE.gguf' (or a Hugging Face directory)",
    "list": "use 'llmctl ls'", "images": "use 'llmctl ls'",
    "rmi": "use 'llmctl rm'", "remove": "use 'llmctl rm'", "delete": "use 'llmctl rm'",
    "stop": "use 'llmctl unload MODEL' (a loaded model) or 'llmctl cancel JOB' (a job)",
    "kill": "use 'llmctl cancel JOB' (a job) or 'llmctl unload --force MODEL'", "cp": "use 'llmctl tag'", "copy": "use 'llmctl tag'",
    "serve": "start the daemon with 'llmosd' (or 'llmosd --user')",
    "start": "start the daemon with 'llmosd' (or 'llmosd --user'); 'llmctl load MODEL' loads a model",
}


def suggest_command(name: str, commands: list[str]) -> str:
    """The message for an unknown command ``name``: a known alias, else the nearest commands."""
    if name in ALIASES:
        return f"no such command {name!r}; {ALIASES[name]}"
    near = difflib.get_close_matches(name, commands, n=2, cutoff=0.5)
    if near:
        return f"no such command {name!r}; did you mean " + " or ".join(f"'{n}'" for n in near) + "?"
    return f"no such command {name!r}; 'llmctl --help' lists the commands"


class Group(click.Group):
    """A click group whose unknown commands get a suggestion, and whose commands end with
    status 0 when their reader goes away (click itself would exit 1 on EPIPE)."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except BrokenPipeError:
            _silence_stdout()
            raise click.exceptions.Exit(0) from None

    def resolve_command(self, ctx, args):
        name = args[0] if args else None
        if name and not name.startswith("-") and self.get_command(ctx, name) is None:
            raise click.UsageError(suggest_command(name, self.list_commands(ctx)), ctx)
        return super().resolve_command(ctx, args)


def _socket_url(ctx, param, value):
    """--socket / LLMOSD_SOCKET as users write it: a path, unix:///path, ipc://, tcp://."""
    return normalize_socket(value) if value else None


@click.group(cls=Group, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.option("--socket", metavar="URL", envvar="LLMOSD_SOCKET", callback=_socket_url,
              help="Daemon endpoint: a socket path, unix:///path, ipc:///path or tcp://host:port "
                   "[env LLMOSD_SOCKET; default: the user socket if it exists, "
                   "else ipc:///run/llmosd/llmosd.sock].")
@click.option("--timeout", type=float, default=60.0, show_default=True,
              help="Seconds to wait for a reply to a non-streaming request.")
@click.version_option(package_name="llmosd", prog_name="llmctl")
@click.pass_context
def cli(ctx, socket, timeout):
    """Control llmosd: create, load, run and manage language models.

    \b
    Examples:
      llmctl run smollm2 "Why is the sky blue?"
      llmctl create tiny --layers 2 --dim 64 --heads 4 --vocab-from corpus.txt
      llmctl import SmolLM2-135M-Instruct.Q4_1.gguf smollm2
      llmctl chat smollm2
      llmctl generate smollm2 "What is a kernel?" --chat --max-tokens 100
      echo "Hello" | llmctl generate tiny --temperature 0
      llmctl score smollm2 "To be, or not to be"
      llmctl classify smollm2 --labels positive,negative < reviews.txt
      llmctl train tiny-char --data input.txt --tokenizer char --max-steps 2000 --wait
      llmctl finetune smollm2 smollm2-qa --data qa.jsonl --method lora --epochs 3 --wait
      llmctl eval smollm2-qa --data qa-test.jsonl
      llmctl jobs --all
      llmctl logs -f 3
      llmctl ps
      llmctl top
    """
    ctx.obj = {**(ctx.obj or {}), "socket": socket, "timeout": timeout}   # a given obj may hold a client


for _module in (store, table, top, infer, jobs, finetune, metrics, admin, keygen, http):
    for _command in _module.COMMANDS:
        cli.add_command(_command)


def main(argv=None, obj: dict | None = None) -> int:
    """Entry point: runs the CLI and maps every error to one line and a sysexits status.
    A reader that goes away (``| head``) is no error: exit 0, even at the final flush.
    ``obj`` seeds the root context (tests put a fake ``client`` in it)."""
    try:
        status = _main(argv, obj)
        sys.stdout.flush()
        return status
    except BrokenPipeError:
        _silence_stdout()
        return 0


def _silence_stdout() -> None:
    """Point stdout at /dev/null so the interpreter's last flush cannot fail again."""
    try:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    except (OSError, ValueError):
        pass


def _main(argv, obj=None) -> int:
    try:
        cli.main(args=argv, prog_name="llmctl", standalone_mode=False, obj=obj)
        return 0
    except click.exceptions.Abort:
        click.echo("cancelled", err=True)
        return 130
    except click.UsageError as e:
        e.show()
        return EX_USAGE
    except click.ClickException as e:
        e.show()
        return e.exit_code
    except KeyboardInterrupt:
        click.echo("cancelled", err=True)
        return 130
    except BrokenPipeError:
        # the reader went away (e.g. `| head`): not an error worth a traceback
        _silence_stdout()
        return 0
    except LlmosdError as e:
        click.echo(f"llmctl: {e.name}: {e}", err=True)
        if e.hint:
            click.echo(f"  hint: {e.hint}", err=True)
        return e.exit_status
    except OSError as e:                     # a local file or device: say which, no traceback
        where = f" ({e.filename})" if getattr(e, "filename", None) else ""
        click.echo(f"llmctl: I/O error: {e.strerror or e}{where}", err=True)
        return EX_IOERR
    except zmq.ZMQError as e:
        click.echo(f"llmctl: socket error: {e}", err=True)
        return EX_PROTOCOL if e.errno in (errno.EPROTO, errno.EMSGSIZE, zmq.EFSM) else EX_UNAVAILABLE
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else 0
    except click.exceptions.Exit as e:
        return e.exit_code
