"""``llmctl``: the command line.  It reaches the daemon only through ``llmctl.Client``.

Exit statuses follow sysexits(3): 64 usage, 65 bad data, 66 no such model, 69 daemon
unavailable, 70 internal error, 73 already exists, 75 busy/try again, 76 protocol, 130 Ctrl-C.
"""
from __future__ import annotations

import os
import sys

import click

from . import format as fmt
from .cli_infer import register as register_inference
from .client import Client
from .errors import EX_USAGE, LlmosdError

VOCAB_TEXT_LIMIT = 8 * 1024 * 1024


def _client(ctx: click.Context) -> Client:
    obj = ctx.find_root().obj
    if "client" not in obj:
        obj["client"] = Client(obj["socket"], timeout=obj["timeout"]).connect()
    return obj["client"]


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.option("--socket", metavar="URL", envvar="LLMOSD_SOCKET",
              help="Daemon endpoint [env LLMOSD_SOCKET; default: the user socket if it exists, "
                   "else ipc:///run/llmosd/llmosd.sock].")
@click.option("--timeout", type=float, default=60.0, show_default=True,
              help="Seconds to wait for a reply to a non-streaming request.")
@click.version_option(package_name="llmosd", prog_name="llmctl")
@click.pass_context
def cli(ctx, socket, timeout):
    """Control llmosd: create, load, run and manage language models.

    \b
    Examples:
      llmctl create tiny --layers 2 --dim 64 --heads 4 --vocab-from corpus.txt
      llmctl import SmolLM2-135M-Instruct.Q4_1.gguf smollm2
      llmctl chat smollm2
      llmctl generate smollm2 "What is a kernel?" --chat --max-tokens 100
      echo "Hello" | llmctl generate tiny --temperature 0
      llmctl score smollm2 "To be, or not to be"
      llmctl classify smollm2 --labels positive,negative < reviews.txt
      llmctl ps
    """
    ctx.obj = {"socket": socket, "timeout": timeout}


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
@click.option("--seed", type=int, default=0, show_default=True, help="Seed for weights and tokenizer.")
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

    def progress(p):
        if not as_json:
            click.echo(f"{p.get('stage', '')}: {p.get('message', '')}", err=True)
    r = _client(ctx).create(name, text=text, progress=progress, **opts)
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
    r = _client(ctx).import_path(path, name, force=force, dtype=None if dtype == "auto" else dtype,
                                 progress=_upload_progress(as_json))
    if as_json:
        return fmt.echo_json(r)
    click.echo(f"imported {r['model']} ({fmt.count(r['parameters'])} parameters, "
               f"{fmt.size(r['size'])}, {fmt.short_digest(r['digest'])})")


def _upload_progress(as_json: bool):
    last = {}

    def progress(p):
        if as_json:
            return
        if "file" in p:
            pct = 100 * p["sent"] // max(1, p["size"])
            if p.get("skipped"):
                click.echo(f"{p['file']}: already in the store", err=True)
            elif last.get(p["file"]) != pct:
                last[p["file"]] = pct
                click.echo(f"\r{p['file']}: {pct}% of {fmt.size(p['size'])}", err=True, nl=pct == 100)
        elif "total" in p:                     # a counter: redraw in a terminal, quarters in a log
            if sys.stderr.isatty():
                click.echo(f"\r{p.get('stage', '')}: {p.get('message', '')}", err=True,
                           nl=p["done"] == p["total"])
            elif last.setdefault("stage-" + str(p.get("stage")), -1) < 4 * p["done"] // max(1, p["total"]):
                last["stage-" + str(p.get("stage"))] = 4 * p["done"] // max(1, p["total"])
                click.echo(f"{p.get('stage', '')}: {p.get('message', '')}", err=True)
        else:
            click.echo(f"{p.get('stage', '')}: {p.get('message', '')}", err=True)
    return progress


@cli.command()
@click.argument("model")
@click.argument("directory", type=click.Path(file_okay=False))
@click.option("--force", is_flag=True, help="Write into a directory that is not empty.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
@click.pass_context
def export(ctx, model, directory, force, as_json):
    """Write MODEL to DIRECTORY as a Hugging Face model (config.json, model.safetensors,
    tokenizer, generation_config.json) that transformers and other tools load."""
    r = _client(ctx).export(model, directory, force=force, progress=_upload_progress(as_json))
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
@click.pass_context
def tag(ctx, source, target):
    """Give model SOURCE another name TARGET (a copy that shares its blobs)."""
    r = _client(ctx).tag(source, target)
    click.echo(f"tagged {r['source']} as {r['model']}")


@cli.command()
@click.argument("model")
@click.option("--json", "as_json", is_flag=True, help="Print the instance as JSON.")
@click.pass_context
def load(ctx, model, as_json):
    """Load MODEL into the model table (no-op if it is already loaded)."""
    r = _client(ctx).load(model)
    if as_json:
        return fmt.echo_json(r)
    click.echo(f"instance {r['id']}: {r['model']} {r['state']} on {r['device']} "
               f"({fmt.size(r['resident_bytes'])}, {r['load_ms'] / 1000:.2f}s)")


@cli.command()
@click.argument("target")
@click.option("--force", is_flag=True, help="Cancel active requests instead of refusing.")
@click.pass_context
def unload(ctx, target, force):
    """Unload TARGET: an instance ID, or every instance of a model."""
    r = _client(ctx).unload(target, force=force)
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
    """Entry point: runs the CLI and maps errors to sysexits statuses."""
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
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except LlmosdError as e:
        click.echo(f"llmctl: {e.name}: {e}", err=True)
        if e.hint:
            click.echo(f"  hint: {e.hint}", err=True)
        return e.exit_status
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else 0
    except click.exceptions.Exit as e:
        return e.exit_code


if __name__ == "__main__":
    sys.exit(main())
