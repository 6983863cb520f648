"""``llmctl``: the command line.  It reaches the daemon only through ``llmctl.Client``.

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

from . import format as fmt
from .cli_infer import OutputError, register as register_inference
from .client import Client
from .errors import EX_IOERR, EX_PROTOCOL, EX_UNAVAILABLE, EX_USAGE, LlmosdError
from .paths import normalize_socket

VOCAB_TEXT_LIMIT = 8 * 1024 * 1024

# What users of other tools type, and what llmctl calls it.
ALIASES = {
    "pull": "there is no registry to pull from: use 'llmctl import FILE.gguf' (or a Hugging Face directory)",
    "list": "use 'llmctl ls'", "images": "use 'llmctl ls'",
    "rmi": "use 'llmctl rm'", "remove": "use 'llmctl rm'", "delete": "use 'llmctl rm'",
    "stop": "use 'llmctl unload'", "cp": "use 'llmctl tag'", "copy": "use 'llmctl tag'",
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


def _client(ctx: click.Context) -> Client:
    obj = ctx.find_root().obj
    if "client" not in obj:
        obj["client"] = Client(obj["socket"], timeout=obj["timeout"]).connect()
    return obj["client"]


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
      llmctl ps
    """
    ctx.obj = {**(ctx.obj or {}), "socket": socket, "timeout": timeout}   # a given obj may hold a client


@cli.command()
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.pass_context
def status(ctx, as_json):
    """Show the daemon's status."""
    s = _client(ctx).status()
    if as_json:
        return fmt.echo_json(s)
    rows = [("daemon", f"llmosd {s['version']} (pid {s['pid']}, protocol {'.'.join(map(str, s['protocol']))})"),
            ("socket", s["socket"]), ("state", s["state_dir"]),
            ("device", f"{s['device']} ({s['dtype']}, {s['threads']} thread(s))"),
            ("uptime", f"{s['uptime_s']:.0f}s"), ("models", s["models"]),
            ("instances", f"{s['instances']} ({fmt.size(s['resident_bytes'])} resident)"),
            ("requests", f"{s['active_requests']} active, {s['tokens_served']} tokens served"),
            ("memory", f"{fmt.size(s['rss_bytes'])} RSS"), ("jobs", len(s["jobs"]))]
    for k, v in rows:
        click.echo(f"{k + ':':<11}{v}")


@cli.command()
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.pass_context
def ps(ctx, as_json):
    """List loaded model instances (the model table)."""
    c = _client(ctx)
    body = c._call("ps")
    if as_json:
        return fmt.echo_json(body)
    rows = [[i["id"], i["model"], i["state"] + (f" ({i['reason']})" if i["reason"] else ""),
             i["device"], fmt.size(i["resident_bytes"]), i["active_requests"], i["tokens_served"],
             fmt.ago(i["loaded_at"]), fmt.ago(i["last_used"]), "-" if i["uid"] is None else i["uid"]]
            for i in body["instances"]]
    click.echo(fmt.table(["ID", "MODEL", "STATE", "DEVICE", "RESIDENT", "ACTIVE", "TOKENS",
                          "LOADED", "LAST USED", "UID"], rows))
    if body["jobs"]:
        click.echo()
        click.echo(fmt.table(["JOB", "KIND", "TARGET", "STATE", "PROGRESS", "PID"],
                             [[j["id"], j["kind"], j["target"], j["state"],
                               j["progress"].get("message", ""), j["pid"]] for j in body["jobs"]]))


@cli.command()
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.pass_context
def ls(ctx, as_json):
    """List the models in the store."""
    models = _client(ctx).ls()
    if as_json:
        return fmt.echo_json(models)
    rows = [[m["model"], fmt.short_digest(m["digest"]), fmt.size(m["size"]), fmt.count(m["parameters"]),
             m["method"] or "-", fmt.ago(m["created"]), ",".join(map(str, m["instances"])) or "-"]
            for m in models]
    click.echo(fmt.table(["NAME", "ID", "SIZE", "PARAMS", "MADE BY", "CREATED", "LOADED"], rows))


@cli.command()
@click.argument("model")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.pass_context
def show(ctx, model, as_json):
    """Show a model's manifest, config and lineage."""
    s = _client(ctx).show(model)
    if as_json:
        return fmt.echo_json(s)
    man, cfg = s["manifest"], s["config"]
    lin = man.get("lineage") or {}
    click.echo(f"model:         {s['model']}")
    click.echo(f"digest:        {s['digest']}")
    click.echo(f"architecture:  {man.get('architecture')}  ({fmt.count(man.get('parameters'))} parameters, {fmt.size(s['size'])})")
    click.echo(f"created:       {man.get('created')}  by {lin.get('method')}"
               + (f" from {lin['parent']}" if lin.get("parent") else ""))
    click.echo(f"tokenizer:     {man['tokenizer']['type']}, {man['tokenizer'].get('vocab_size')} pieces"
               + (", chat template" if man.get("chat_template") else ""))
    if man.get("defaults"):
        click.echo("defaults:      " + ", ".join(f"{k}={v}" for k, v in sorted(man["defaults"].items())))
    if lin.get("method") == "import":
        click.echo(f"imported from: {lin.get('args', {}).get('format')} ({', '.join(lin.get('args', {}).get('files', []))})")
    click.echo("config:")
    for k in ("num_hidden_layers", "hidden_size", "intermediate_size", "num_attention_heads",
              "num_key_value_heads", "vocab_size", "max_position_embeddings", "rope_theta",
              "rms_norm_eps", "tie_word_embeddings"):
        click.echo(f"  {k:<25}{cfg.get(k)}")
    if s["instances"]:
        click.echo("instances:     " + ", ".join(f"{i['id']} ({i['state']})" for i in s["instances"]))


@cli.command()
@click.argument("name")
@click.option("--layers", type=int, required=True, help="Number of transformer blocks.")
@click.option("--dim", type=int, required=True, help="Model width (hidden size).")
@click.option("--heads", type=int, required=True, help="Attention heads.")
@click.option("--kv-heads", type=int, help="Key/value heads for grouped-query attention [default: heads].")
@click.option("--vocab-size", type=int, default=1024, show_default=True, help="Tokenizer pieces (at least 300).")
@click.option("--vocab-from", "vocab_from", type=click.File("rb"), required=True,
              help="Text to train the SentencePiece tokenizer on ('-' for stdin; first 8 MiB used).")
@click.option("--seed", type=click.IntRange(0, 2**64 - 1), default=0, show_default=True,
              help="Seed for weights and tokenizer (0..2^64-1).")
@click.option("--hidden-dim", type=int, help="MLP width [default: Llama's 8/3*dim rounded to 32].")
@click.option("--context", type=int, default=2048, show_default=True, help="Maximum sequence length.")
@click.option("--rope-theta", type=float, default=10000.0, show_default=True, help="Rotary base.")
@click.option("--tie-embeddings", is_flag=True, help="Share the input embedding with the output layer.")
@click.option("--force", is_flag=True, help="Replace a model of the same name.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
@click.pass_context
def create(ctx, name, vocab_from, as_json, **opts):
    """Create a new model NAME[:TAG] with random weights (a starting point for pretraining)."""
    text = vocab_from.read(VOCAB_TEXT_LIMIT + 1)
    if len(text) > VOCAB_TEXT_LIMIT:
        text = text[:text.rfind(b"\n", 0, VOCAB_TEXT_LIMIT) + 1 or VOCAB_TEXT_LIMIT]
        click.echo(f"note: using the first {len(text):,} bytes of the vocabulary text", err=True)

    progress, line = _progress(as_json)
    try:
        r = _client(ctx).create(name, text=text, progress=progress, **opts)
    finally:
        line.done()
    if as_json:
        return fmt.echo_json(r)
    click.echo(f"created {r['model']} ({fmt.count(r['parameters'])} parameters, "
               f"{fmt.size(r['size'])}, {fmt.short_digest(r['digest'])})")


@cli.command("import")
@click.argument("path", type=click.Path(exists=True))
@click.argument("name", required=False)
@click.option("--force", is_flag=True, help="Replace a model of the same name.")
@click.option("--dtype", type=click.Choice(["auto", "float32", "float16", "bfloat16"]), default="auto",
              show_default=True, help="Store weights as this type (auto: GGUF quantized tensors become "
                                      "float32, or float16 past 4 GiB; HF weights keep theirs).")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
@click.pass_context
def import_(ctx, path, name, force, dtype, as_json):
    """Import a GGUF file or a Hugging Face model directory PATH as NAME[:TAG].

    GGUF (llama.cpp, Ollama): architecture llama; tensors F32, F16, BF16, Q8_0, Q4_0, Q4_1,
    Q5_0, Q5_1, Q2_K..Q6_K are dequantized; the tokenizer and chat template come from its
    metadata.  A Hugging Face directory needs config.json, *.safetensors weights (sharded
    with their index, or one file) and tokenizer.json or tokenizer.model;
    tokenizer_config.json and generation_config.json are used when present.  Files are sent to the daemon over its socket
    (it may not be able to read your files); content it already has is not sent again.
    """
    if name is None:
        base = os.path.basename(os.path.abspath(path)).lower()
        base = base[:-5] if base.endswith(".gguf") else base
        name = "".join(ch if ch.isalnum() or ch in "._-" else "-" for ch in base).strip("-._") or "model"
    progress, line = _progress(as_json)
    try:
        r = _client(ctx).import_path(path, name, force=force, dtype=None if dtype == "auto" else dtype,
                                     progress=progress)
    finally:
        line.done()
    if as_json:
        return fmt.echo_json(r)
    click.echo(f"imported {r['model']} ({fmt.count(r['parameters'])} parameters, "
               f"{fmt.size(r['size'])}, {fmt.short_digest(r['digest'])})")


def _progress(as_json: bool):
    """A progress callback for transfers ({file, sent, size}) and job chunks ({stage, message,
    done?, total?}), and its StatusLine (silent with --json; call ``done()`` at the end)."""
    line = fmt.StatusLine(enabled=not as_json)
    last = {"phase": None}

    def phase(name):                       # a new phase keeps the previous one's line
        if last["phase"] != name:
            line.done()
            last["phase"] = name

    def progress(p):
        if "file" in p:
            phase("file " + p["file"])
            if p.get("skipped"):
                line.update(f"{p['file']}: already in the store")
            else:
                frac = p["sent"] / max(1, p["size"])
                line.update(f"{p['file']}: {100 * frac:.0f}% of {fmt.size(p['size'])}", frac, key=p["file"])
        else:
            stage = p.get("stage", "")
            phase("stage " + stage)
            text = f"{stage}: {p.get('message', '')}"
            if "total" in p:               # a counter: redrawn in a terminal, quarters in a log
                line.update(text, p["done"] / max(1, p["total"]), key=stage)
            else:
                line.update(text)
    return progress, line


@cli.command()
@click.argument("model")
@click.argument("directory", type=click.Path(file_okay=False))
@click.option("--force", is_flag=True, help="Write into a directory that is not empty.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
@click.pass_context
def export(ctx, model, directory, force, as_json):
    """Write MODEL to DIRECTORY as a Hugging Face model (config.json, model.safetensors,
    tokenizer, generation_config.json) that transformers and other tools load."""
    progress, line = _progress(as_json)
    try:
        r = _client(ctx).export(model, directory, force=force, progress=progress)
    except OSError as e:
        raise OutputError(directory, e) from None
    finally:
        line.done()
    if as_json:
        return fmt.echo_json(r)
    click.echo(f"exported {r['model']} to {r['dir']} ({', '.join(r['files'])})")


@cli.command()
@click.argument("models", nargs=-1, required=True)
@click.pass_context
def rm(ctx, models):
    """Remove models from the store (refused while loaded)."""
    for m in models:
        r = _client(ctx).rm(m)
        click.echo(f"deleted {r['model']} ({fmt.size(r['freed_bytes'])} freed)")


@cli.command()
@click.argument("source")
@click.argument("target")
@click.option("--force", is_flag=True, help="Replace a different model already named TARGET.")
@click.pass_context
def tag(ctx, source, target, force):
    """Give model SOURCE another name TARGET (a copy that shares its blobs)."""
    r = _client(ctx).tag(source, target, force=force)
    click.echo(f"tagged {r['source']} as {r['model']}")


@cli.command()
@click.argument("model")
@click.option("--json", "as_json", is_flag=True, help="Print the instance as JSON.")
@click.pass_context
def load(ctx, model, as_json):
    """Load MODEL into the model table (no-op if it is already loaded)."""
    c = _client(ctx)
    line = fmt.StatusLine(enabled=not as_json)
    line.update(f"loading {model}...")
    try:
        r = c.load(model)
    finally:
        line.clear()                       # the result (or the error) replaces the live line
    if as_json:
        return fmt.echo_json(r)
    if r.get("already_loaded"):
        click.echo(f"{r['model']} already loaded (instance {r['id']}, {r['state']} on {r['device']})")
        return
    click.echo(f"instance {r['id']}: {r['model']} {r['state']} on {r['device']} "
               f"({fmt.size(r['resident_bytes'])}, {r['load_ms'] / 1000:.2f}s)")


@cli.command()
@click.argument("target")
@click.option("--force", is_flag=True, help="Cancel active requests instead of refusing.")
@click.pass_context
def unload(ctx, target, force):
    """Unload TARGET: an instance ID, or every instance of a model (a model that is not
    loaded is no error, as with 'systemctl stop')."""
    r = _client(ctx).unload(target, force=force)
    if not r["unloaded"]:
        click.echo(f"{target} is not loaded")
        return
    click.echo("unloaded instance " + ", ".join(map(str, r["unloaded"])))


def _stats_line(s: dict) -> str:
    parts = [f"{s.get('prompt_tokens')} prompt tokens", f"{s.get('generated_tokens')} generated",
             f"finish: {s.get('finish_reason')}"]
    if s.get("ttft_ms") is not None:
        parts.append(f"first token {s['ttft_ms']:.0f} ms")
    if s.get("tokens_per_s"):
        parts.append(f"{s['tokens_per_s']:.1f} tokens/s")
    if s.get("dropped_messages"):
        parts.append(f"{s['dropped_messages']} oldest message(s) left out to fit the context")
    if s.get("loaded"):
        parts.append(f"loaded in {s['load_ms'] / 1000:.2f}s")
    return ", ".join(parts)


register_inference(cli, _client, _stats_line)


def main(argv=None) -> int:
    """Entry point: runs the CLI and maps every error to one line and a sysexits status.
    A reader that goes away (``| head``) is no error: exit 0, even at the final flush."""
    try:
        status = _main(argv)
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


def _main(argv) -> int:
    try:
        cli.main(args=argv, prog_name="llmctl", standalone_mode=False)
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


if __name__ == "__main__":
    sys.exit(main())
