"""The store's commands: ls, show, rm, tag, and what writes models: create, import, export."""
from __future__ import annotations

import os

import click

from .. import format as fmt
from ..upload import is_peft_dir
from . import common
from .common import OutputError

VOCAB_TEXT_LIMIT = 8 * 1024 * 1024


def _made(verb: str, r: dict) -> str:
    """The line create and import print for the model they made."""
    return (f"{verb} {r['model']} ({fmt.count(r['parameters'])} parameters, "
            f"{fmt.size(r['size'])}, {fmt.short_digest(r['digest'])})")


@click.command()
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.pass_context
def ls(ctx, as_json):
    """List the models in the store."""
    models = common.client(ctx).ls()
    if as_json:
        return fmt.echo_json(models)
    rows = [[m["model"], fmt.short_digest(m["digest"]), fmt.size(m["size"]), fmt.count(m["parameters"]),
             kind_cell(m), m["method"] or "-", fmt.ago(m["created"]), ",".join(map(str, m["instances"])) or "-",
             owner_cell(m)]
            for m in models]
    click.echo(fmt.table(["NAME", "ID", "SIZE", "PARAMS", "KIND/BASE", "MADE BY", "CREATED", "LOADED", "OWNER"],
                         rows))


def owner_cell(m: dict) -> str:
    """An ls row's OWNER: the user name the daemon gave, else the uid, else "-" (an older
    daemon)."""
    if m.get("owner_name"):
        return str(m["owner_name"])
    return "-" if m.get("owner") is None else str(m["owner"])


def kind_cell(m: dict) -> str:
    """An ls row's KIND/BASE cell: "model", or "adapter of BASE" / "classifier of BASE" (a
    merged classifier, which has no base: "classifier")."""
    kind = m.get("kind") or "model"
    return f"{kind} of {m['base']}" if m.get("base") else kind


@click.command()
@click.argument("model")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.pass_context
def show(ctx, model, as_json):
    """Show a model's manifest, config and lineage."""
    s = common.client(ctx).show(model)
    if as_json:
        return fmt.echo_json(s)
    man, cfg = s["manifest"], s["config"]
    lin = man.get("lineage") or {}
    click.echo(f"model:         {s['model']}")
    click.echo(f"digest:        {s['digest']}")
    for line in adapter_lines(man):
        click.echo(line)
    click.echo("architecture:  " + architecture(s, _base_show(ctx, man)))
    click.echo(f"created:       {man.get('created')}  by {lin.get('method')}"
               + (f" from {lin['parent']}" if lin.get("parent") else "")
               + (f" ({fmt.short_digest(lin['args']['parent_digest'])})"       # the name may be this model's own
                  if (lin.get("args") or {}).get("parent_digest") else ""))
    click.echo(f"tokenizer:     {man['tokenizer']['type']}, {man['tokenizer'].get('vocab_size')} pieces"
               + (", chat template" if man.get("chat_template") else ""))
    if man.get("defaults"):
        click.echo("defaults:      " + ", ".join(f"{k}={v}" for k, v in sorted(man["defaults"].items())))
    if lin.get("method") == "import":
        click.echo(f"imported from: {lin.get('args', {}).get('format')} ({', '.join(lin.get('args', {}).get('files', []))})")
    if lin.get("method") == "train":
        click.echo(f"trained by:    {trained(lin)}")
    elif lin.get("method") == "finetune":
        click.echo(f"fine-tuned:    {trained(lin)}")
    click.echo("config:")
    for k in ("num_hidden_layers", "hidden_size", "intermediate_size", "num_attention_heads",
              "num_key_value_heads", "vocab_size", "max_position_embeddings", "rope_theta",
              "rms_norm_eps", "tie_word_embeddings"):
        click.echo(f"  {k:<25}{cfg.get(k)}")
    if s["instances"]:
        click.echo("instances:     " + ", ".join(f"{i['id']} ({i['state']})" for i in s["instances"]))


def _base_show(ctx, man: dict) -> dict | None:
    """``show`` of an adapter's base (for its architecture and size), None without a base or
    when it cannot be had (gone: the adapter's own lines say enough)."""
    from ..errors import LlmosdError
    base = (man.get("base") or {}).get("model") if isinstance(man.get("base"), dict) else None
    if not base:
        return None
    try:
        return common.client(ctx).show(base)
    except LlmosdError:
        return None


def architecture(s: dict, base: dict | None = None) -> str:
    """``show``'s architecture line: "llama  (134.5M parameters, 269.1 MB)"; for an adapter
    or classifier on a base, its own figures and the base's: "adapter of smollm2:latest:
    460.8K parameters (1.9 MB); base llama 134.5M" (``base``: the base's ``show``)."""
    man = s["manifest"]
    own = f"{fmt.count(man.get('parameters'))} parameters"
    on = (man.get("base") or {}).get("model") if isinstance(man.get("base"), dict) else None
    if not on:
        return f"{man.get('architecture')}  ({own}, {fmt.size(s.get('size'))})"
    bman = (base or {}).get("manifest") or {}
    arch = bman.get("architecture") or man.get("architecture")
    return (f"{man.get('kind') or 'adapter'} of {on}: {own} ({fmt.size(s.get('size'))}); base {arch}"
            + (f" {fmt.count(bman['parameters'])}" if bman.get("parameters") else ""))


def adapter_lines(man: dict) -> list[str]:
    """``show``'s lines for an adapter or classifier: its kind and base, LoRA settings, labels."""
    out = []
    if man.get("kind") in ("adapter", "classifier"):
        base = (man.get("base") or {}).get("model")
        out.append(f"kind:          {man['kind']}" + (f" of {base} (its weights are the base's)" if base else ""))
    ad = man.get("adapter")
    if ad:
        out.append(f"adapter:       LoRA rank {ad.get('rank')}, alpha {ad.get('alpha')}, "
                   f"dropout {ad.get('dropout')}, targets {','.join(ad.get('targets') or [])}"
                   + (", rsLoRA" if ad.get("rslora") else "") + f" ({fmt.size(ad.get('size'))})")
    if man.get("head"):
        out.append(f"labels:        {', '.join(map(str, man['head'].get('labels') or []))}")
    return out


def trained(lin: dict) -> str:
    """A training lineage in a line: job 3 on a.txt, b.jsonl: step 2000, loss 1.71, val 1.88 (best 1.87)."""
    fin, files = lin.get("final") or {}, sorted((lin.get("args") or {}).get("sources") or {})
    text = f"job {lin.get('job', '?')}" + (f" on {', '.join(files)}" if files else "")
    if fin:
        text += (f": step {fin.get('step')}, loss {fmt.loss(fin.get('loss'))}, "
                 f"val {fmt.loss(fin.get('val_loss'))} (best {fmt.loss(fin.get('best_val_loss'))})")
        figures = fmt.val_metrics(fin.get("metrics") if isinstance(fin.get("metrics"), dict) else {}, ", ")
        if figures:                     # a fine-tune's last validation: ppl, em, chrF / acc, f1
            text += ", " + figures
    return text


@click.command()
@click.argument("models", nargs=-1, required=True)
@click.option("--force", is_flag=True, help="Remove a base model with the adapters and classifiers "
                                            "made on it (else refused, naming them).")
@click.pass_context
def rm(ctx, models, force):
    """Remove models from the store (refused while loaded, and for a base that adapters use)."""
    for m in models:
        r = common.client(ctx).rm(m, force=force)
        click.echo(f"deleted {r['model']} ({fmt.size(r['freed_bytes'])} freed)")
        if r.get("removed"):
            click.echo(f"also removed what was made on it: {', '.join(r['removed'])}")
        if r.get("kept_by_jobs"):
            click.echo(kept_line(r))


def kept_line(r: dict) -> str:
    """Why an rm freed less than the model's size: job records that still name its blobs."""
    ids = " ".join(map(str, r["kept_by_jobs"]))
    many = len(r["kept_by_jobs"]) > 1
    size = f" ({fmt.size(r['kept_bytes'])})" if r.get("kept_bytes") else ""
    return (f"weights{size} kept for job{'s' if many else ''} {', '.join(map(str, r['kept_by_jobs']))}, "
            f"{'whose records name' if many else 'whose record names'} them "
            f"(llmctl jobs rm {ids} frees them)")


@click.command()
@click.argument("source")
@click.argument("target")
@click.option("--force", is_flag=True, help="Replace a different model already named TARGET.")
@click.pass_context
def tag(ctx, source, target, force):
    """Give model SOURCE another name TARGET (a copy that shares its blobs)."""
    r = common.client(ctx).tag(source, target, force=force)
    click.echo(f"tagged {r['source']} as {r['model']}")


@click.command()
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
        r = common.client(ctx).create(name, text=text, progress=progress, **opts)
    finally:
        line.done()
    if as_json:
        return fmt.echo_json(r)
    click.echo(_made("created", r))


@click.command("import")
@click.argument("path", type=click.Path(exists=True))
@click.argument("name", required=False)
@click.option("--force", is_flag=True, help="Replace a model of the same name.")
@click.option("--dtype", type=click.Choice(["auto", "float32", "float16", "bfloat16", "int8", "int4"]),
              default="auto", show_default=True,
              help="Store weights as this type (auto: as the file has them: GGUF Q8_0/Q4_0/Q4_1 kept "
                   "packed, other quantized types requantized to int8/int4; int8/int4: quantized in "
                   "groups of 32; a float type: dequantized).")
@click.option("--base", metavar="MODEL", help="PATH is a PEFT adapter directory (adapter_config.json, "
                                             "adapter_model.safetensors) for the stored MODEL.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
@click.pass_context
def import_(ctx, path, name, force, dtype, base, as_json):
    """Import a GGUF file or a Hugging Face model directory PATH as NAME[:TAG].

    GGUF (llama.cpp, Ollama): architecture llama; tensors F32, F16, BF16, Q8_0, Q4_0, Q4_1
    (kept quantized), Q5_0, Q5_1, Q2_K..Q6_K (requantized to int8/int4); the tokenizer and
    chat template come from its metadata.  A Hugging Face directory needs config.json, *.safetensors weights (sharded
    with their index, or one file) and tokenizer.json or tokenizer.model;
    tokenizer_config.json and generation_config.json are used when present.  A PEFT LoRA adapter
    directory (adapter_config.json, adapter_model.safetensors) is imported with --base MODEL as
    an adapter of that stored model.  Files are sent to the daemon over its socket
    (it may not be able to read your files); content it already has is not sent again.
    """
    peft = is_peft_dir(path)
    if peft and not base:
        raise click.UsageError(f"{path} is a PEFT adapter directory (adapter_config.json): give the "
                               f"stored model it adapts with --base MODEL")
    if base and not peft:
        raise click.UsageError(f"--base MODEL is for a PEFT adapter directory; {path} has no adapter_config.json")
    if base and dtype != "auto":
        raise click.UsageError("--dtype is for models; an adapter's tensors are stored as float32")
    if name is None:
        stem = os.path.basename(os.path.abspath(path)).lower()
        stem = stem[:-5] if stem.endswith(".gguf") else stem
        name = "".join(ch if ch.isalnum() or ch in "._-" else "-" for ch in stem).strip("-._") or "model"
    progress, line = _progress(as_json)
    try:
        r = common.client(ctx).import_path(path, name, force=force, base=base,
                                           dtype=None if dtype == "auto" else dtype, progress=progress)
    finally:
        line.done()
    if as_json:
        return fmt.echo_json(r)
    click.echo(_made("imported", r) + (f", an adapter of {base}" if base else ""))


@click.command()
@click.argument("model")
@click.argument("directory", type=click.Path(file_okay=False))
@click.option("--force", is_flag=True, help="Write into a directory that is not empty.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
@click.pass_context
def export(ctx, model, directory, force, as_json):
    """Write MODEL to DIRECTORY as a Hugging Face model (config.json, model.safetensors,
    tokenizer, generation_config.json) that transformers and other tools load; an adapter as
    a PEFT adapter directory (adapter_config.json, adapter_model.safetensors) that peft loads
    onto its exported base."""
    progress, line = _progress(as_json)
    try:
        r = common.client(ctx).export(model, directory, force=force, progress=progress)
    except OSError as e:
        raise OutputError(directory, e) from None
    finally:
        line.done()
    if as_json:
        return fmt.echo_json(r)
    what = "a PEFT adapter" + (f" of {r['base']}" if r.get("base") else "") if r.get("format") == "peft" else None
    click.echo(f"exported {r['model']} to {r['dir']}" + (f" as {what}" if what else "")
               + f" ({', '.join(r['files'])})")


COMMANDS = [ls, show, rm, tag, create, import_, export]


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
