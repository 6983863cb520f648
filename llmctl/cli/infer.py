"""The commands that run a model: run, generate, chat, score, classify, embed, and the
sampling options they share.  ``chat`` (and ``run`` without a prompt) hand the terminal to the
conversation loop in ``repl``.
"""
from __future__ import annotations

import json
import os
import stat
import sys
import tempfile

import click

from ..format import StatusLine, echo_json
from . import common
from .common import OutputError
from .repl import ChatSession

SEED_MAX = 2**64 - 1


def stdin_has_data(stream) -> bool:
    """Whether ``stream`` is a pipe or a file (text to read), not a terminal or /dev/null."""
    try:
        mode = os.fstat(stream.fileno()).st_mode
    except (OSError, ValueError, AttributeError):
        return False
    return stat.S_ISFIFO(mode) or stat.S_ISREG(mode)


def join_stdin_prompt(piped: str, prompt: str) -> str:
    """What Ollama sends for ``... | run MODEL PROMPT``: the piped text first, then the prompt
    on a line of its own."""
    if not piped:
        return prompt
    return piped + ("" if piped.endswith("\n") else "\n") + prompt


def read_prompt(prompt: str | None, stdin) -> str | None:
    """The prompt the user meant: '-' is stdin; none is stdin unless stdin is a terminal (then
    None); a PROMPT with text piped in is both (never silently dropping the piped text)."""
    if prompt == "-":
        return stdin.read()
    if prompt is None:
        return None if stdin.isatty() else stdin.read()
    return join_stdin_prompt(stdin.read(), prompt) if stdin_has_data(stdin) else prompt


def logprob_lines(chunks: list[dict]) -> list[str]:
    """--logprobs without --json: one line per generated token (logprob, token, alternatives)."""
    lines = []
    for ch in chunks:
        for t in ch.get("logprobs") or ():
            alts = ", ".join(f"{json.dumps(a['token'], ensure_ascii=False)} {a['logprob']:.4f}"
                             for a in t.get("top") or ())
            lines.append(f"{t['logprob']:10.4f}  {json.dumps(t['token'], ensure_ascii=False)}"
                         + (f"   [{alts}]" if alts else ""))
    return lines


def stopped_at_once(gen) -> bool:
    """A generation that ended before writing anything (typically a chat model's end-of-turn
    token right away, when it was sent a bare prompt)."""
    s = gen.stats or {}
    return s.get("generated_tokens") == 0 or (
        s.get("finish_reason") == "stop" and not "".join(c.get("text", "") for c in gen.chunks).strip())


def messages(system: str | None, prompt: str) -> list[dict]:
    return ([{"role": "system", "content": system}] if system is not None else []) + [
        {"role": "user", "content": prompt}]


def sampling_options(f):
    """The generation settings shared by generate and chat."""
    opts = [
        click.option("--max-tokens", type=int, help="Most tokens to generate [daemon default: 256]."),
        click.option("--temperature", type=float, help="0 for greedy [default: the model's, else 0.8]."),
        click.option("--top-k", type=int, help="Sample among the K most likely tokens (0: off)."),
        click.option("--top-p", type=float, help="Nucleus sampling threshold (1: off)."),
        click.option("--min-p", type=float, help="Drop tokens less likely than this fraction of the best (0: off)."),
        click.option("--repetition-penalty", type=float, help="Penalise tokens already seen (1: off; 1.1 is mild)."),
        click.option("--seed", type=click.IntRange(0, SEED_MAX), help="Seed for reproducible sampling (0..2^64-1)."),
        click.option("--stop", multiple=True, help="Stop when this text appears (repeatable); it is not printed."),
    ]
    for o in reversed(opts):
        f = o(f)
    return f


def _opts(opts: dict) -> dict:
    opts = dict(opts)
    opts["stop"] = list(opts.get("stop") or []) or None
    keep = _keep(opts.pop("keep_alive", None))
    return {**opts, **keep}


def _keep(keep_alive: float | None) -> dict:
    """The keep_alive keyword when --keep-alive was given (none otherwise: the daemon's default)."""
    return {} if keep_alive is None else {"keep_alive": keep_alive}


def stats_line(s: dict) -> str:
    """The -v line after a reply: tokens, finish reason, speed, what was left out, load time."""
    parts = [f"{s.get('prompt_tokens')} prompt tokens", f"{s.get('generated_tokens')} generated",
             f"finish: {s.get('finish_reason')}"]
    if s.get("ttft_ms") is not None:
        parts.append(f"first token {s['ttft_ms']:.0f} ms")
    if s.get("tokens_per_s"):
        parts.append(f"{s['tokens_per_s']:.1f} tokens/s")
    if s.get("dropped_messages"):
        parts.append(f"{s['dropped_messages']} oldest message(s) left out to fit the context")
    if s.get("swap_in_ms") is not None:          # 1.7: it was swapped out to host RAM
        parts.append(f"swapped back in {s['swap_in_ms'] / 1000:.2f}s")
    elif s.get("loaded"):
        parts.append(f"loaded in {s['load_ms'] / 1000:.2f}s")
    return ", ".join(parts)


def waiting_text(chunk: dict) -> str:
    """What the status line says while a request waits: a load, or (1.7 ``wait``) a swap-in."""
    if chunk.get("wait") == "swap_in":
        return f"swapping {chunk['loading']} back in..."
    return f"loading {chunk['loading']}..."


def stream_out(gen, as_json: bool, verbose: bool, newline: bool = False) -> dict:
    """Print a Generation as it arrives; Ctrl-C cancels it (exit 130). Returns its stats.
    A final newline is added in a terminal, or always with ``newline`` (chat answers).
    A model being loaded first is announced on stderr, in a terminal or with ``verbose``."""
    out = sys.stdout
    note = StatusLine(enabled=not as_json)
    note.enabled = note.enabled and (verbose or note.tty)
    last = ""
    try:
        for text in gen:
            chunk = gen.chunks[-1] if gen.chunks else {}
            if chunk.get("loading"):
                note.update(waiting_text(chunk))
            if as_json:
                echo_json(chunk)
            elif text:
                note.clear()
                out.write(text)
                out.flush()
                last = text
    except KeyboardInterrupt:
        note.clear()
        gen.cancel()
        if not as_json:
            out.write("\n")
        click.echo("cancelled", err=True)
        sys.exit(130)
    finally:
        note.clear()
    stats = gen.stats or {}
    if as_json:
        echo_json({"done": True, **stats})
    else:
        if (newline or out.isatty()) and not last.endswith("\n"):   # pipes get the exact text
            out.write("\n")
        out.flush()
        lines = logprob_lines(gen.chunks)
        if lines:
            click.echo("\n".join(["   logprob  token   [alternatives]"] + lines), err=True)
        if verbose:
            click.echo(stats_line(stats), err=True)
        elif stats.get("finish_reason") == "context":      # never a silent truncation
            used = (stats.get("prompt_tokens") or 0) + (stats.get("generated_tokens") or 0)
            click.echo(f"note: stopped because the model's context ({used} tokens) is full", err=True)
    return stats


@click.command()
@click.argument("model")
@click.argument("prompt", required=False)
@sampling_options
@common.keep_alive_option
@click.option("--chat", "as_chat", is_flag=True,
              help="Send PROMPT as a user message through the model's chat template.")
@click.option("--system", help="System message (implies --chat).")
@click.option("--no-bos", is_flag=True, help="Do not prepend the beginning-of-sequence token.")
@click.option("--logprobs", type=click.IntRange(0, 20), default=0,
              help="Each token's log-probability and its N best alternatives (in each JSON "
                   "chunk with --json, else a table on stderr after the text).")
@click.option("--json", "as_json", is_flag=True, help="One JSON object per chunk, then the stats.")
@click.option("-v", "--verbose", is_flag=True, help="Print timing statistics to stderr.")
@click.pass_context
def generate(ctx, model, prompt, as_chat, system, no_bos, logprobs, as_json, verbose, **opts):
    """Continue PROMPT as plain text (stdin when PROMPT is '-' or absent; text piped in
    with a PROMPT comes first, then PROMPT).

    With --chat/--system the prompt is rendered with the model's chat template and output
    stops at its end-of-turn token ('llmctl run' chooses by itself).  The model is loaded
    first if it is not.  Ctrl-C cancels.
    """
    prompt = read_prompt(prompt, sys.stdin)
    if prompt is None:
        raise click.UsageError("give a PROMPT, or pipe one in (e.g. echo hi | llmctl generate MODEL)")
    c = common.client(ctx)
    opts = _opts(opts)
    if logprobs:
        opts["logprobs"] = logprobs
    chat = as_chat or system is not None
    if chat:
        gen = c.chat(model, messages(system, prompt), **opts)
    else:
        gen = c.generate(model, prompt, add_bos=False if no_bos else None, **opts)
    stream_out(gen, as_json, verbose, newline=chat)
    if not chat and stopped_at_once(gen) and c.show(model)["manifest"].get("chat_template"):
        click.echo(f"hint: {model} is a chat model; try 'llmctl run {model}' or --chat", err=True)


@click.command()
@click.argument("model")
@click.argument("prompt", required=False)
@sampling_options
@common.keep_alive_option
@click.option("--system", help="System message (models with a chat template).")
@click.option("--json", "as_json", is_flag=True, help="One JSON object per chunk, then the stats.")
@click.option("-v", "--verbose", is_flag=True, help="Print timing statistics to stderr.")
@click.pass_context
def run(ctx, model, prompt, system, as_json, verbose, **opts):
    """Answer PROMPT with MODEL, or talk with it (as 'ollama run' does).

    A model with a chat template gets PROMPT as a user message through its template; one
    without continues PROMPT as plain text.  Without a PROMPT, a terminal starts a
    conversation (see 'llmctl chat'); text piped in is the prompt, and text piped in
    with a PROMPT comes first, then PROMPT.  The model is loaded first if it is not.
    """
    c = common.client(ctx)
    chat = bool(c.show(model)["manifest"].get("chat_template"))
    if system is not None and not chat:
        raise click.UsageError(f"{model} has no chat template, so it takes no --system message")
    prompt = read_prompt(prompt, sys.stdin)
    opts = _opts(opts)
    if prompt is None:                  # a terminal and no prompt: a conversation
        ChatSession(c, model, opts, system=system, as_json=as_json, verbose=verbose,
                    stats_line=stats_line, plain=not chat).run(sys.stdin, sys.stdout)
        return
    gen = c.chat(model, messages(system, prompt), **opts) if chat else c.generate(model, prompt, **opts)
    stream_out(gen, as_json, verbose, newline=chat)


@click.command()
@click.argument("model")
@sampling_options
@common.keep_alive_option
@click.option("--system", help="System message for the conversation.")
@click.option("--json", "as_json", is_flag=True, help="One JSON object per reply.")
@click.option("-v", "--verbose", is_flag=True, help="Print timing statistics after each reply.")
@click.pass_context
def chat(ctx, model, system, as_json, verbose, **opts):
    """Talk with MODEL, keeping the conversation's history.

    \b
    Each line is a message; in a terminal, end a line with \\ to continue it.
    Commands: /reset (forget the history), /system TEXT (set the system message),
    /history, /help, /bye.  Ctrl-D leaves; Ctrl-C stops the reply being written.
    Reading a script from a pipe works the same way: one message per line.
    """
    ChatSession(common.client(ctx), model, _opts(opts), system=system, as_json=as_json,
                verbose=verbose, stats_line=stats_line).run(sys.stdin, sys.stdout)


def _note_file_arguments(texts, command: str) -> None:
    """TEXT arguments are the text itself; one naming a file is probably meant as its content,
    so say how to send that (on stderr) instead of silently scoring the file's name."""
    for t in texts:
        if t and len(t) < 4096 and "\n" not in t and os.path.isfile(t):
            click.echo(f"note: {t!r} is used as the text itself; to use the file's content: "
                       f"llmctl {command} MODEL - < {t}" if command == "score" else
                       f"note: {t!r} is used as the text itself; to {command} the file's lines: "
                       f"llmctl {command} MODEL ... < {t}", err=True)


@click.command()
@click.argument("model")
@click.argument("text", required=False)
@click.option("--no-bos", is_flag=True, help="Do not prepend the beginning-of-sequence token.")
@click.option("--json", "as_json", is_flag=True, help="Print every token's log-probability as JSON.")
@common.keep_alive_option
@click.pass_context
def score(ctx, model, text, no_bos, as_json, keep_alive):
    """Score TEXT (or stdin): per-token log-probabilities and perplexity.

    Perplexity is exp of the mean negative log-likelihood of every token after the first.
    Text longer than the model's context is scored in windows overlapping by half.
    """
    if text in (None, "-"):
        if text is None and sys.stdin.isatty():
            raise click.UsageError("give TEXT, or pipe it in")
        text = sys.stdin.read()
    else:
        _note_file_arguments([text], "score")
    r = common.client(ctx).score(model, text, add_bos=False if no_bos else None, **_keep(keep_alive))
    if as_json:
        return echo_json(r)
    for t in r["tokens"]:
        lp = "" if t["logprob"] is None else f"{t['logprob']:10.4f}"
        click.echo(f"{lp:>10}  {json.dumps(t['text'], ensure_ascii=False)}")
    click.echo(f"tokens: {r['scored_tokens']} scored, logprob {r['logprob']:.4f}, "
               f"perplexity {r['perplexity']:.4f}")


@click.command()
@click.argument("model")
@click.argument("texts", nargs=-1)
@click.option("--labels", help="Comma-separated candidate labels, e.g. positive,negative (a "
                                "classifier model uses its trained labels without it).")
@click.option("--template", help="Prompt with {text} (and optionally {labels}) [default: a plain "
                                 "'Classify the text into one of these labels' prompt].")
@click.option("--json", "as_json", is_flag=True, help="One JSON object per input, with every label's score.")
@common.keep_alive_option
@click.pass_context
def classify(ctx, model, texts, labels, template, as_json, keep_alive):
    """Classify each of TEXTS (or each stdin line) as one of --labels, zero-shot, or with a
    classifier model's trained head and labels.

    Zero-shot works with any causal LM: the label whose tokens the model finds most likely
    after the prompt wins.  A classifier (made by 'llmctl finetune --method classify') needs
    no --labels.  Output is one line per input, in input order: LABEL<TAB>PROBABILITY<TAB>TEXT.
    """
    labs = []             # none: the daemon uses a classifier's trained labels, or says to give them
    if labels is not None:
        labs = [x.strip() for x in labels.split(",") if x.strip()]
        if len(labs) < 2:
            raise click.UsageError("--labels needs at least two comma-separated labels")
    c = common.client(ctx)
    if texts:
        _note_file_arguments(texts, "classify")
        _classify_batch(c, model, list(texts), labs, template, as_json, keep_alive)
        return
    if sys.stdin.isatty():
        raise click.UsageError("give TEXTS, or pipe lines in")
    batch = []
    for line in sys.stdin:                 # streams: results appear batch by batch
        line = line.rstrip("\n")
        if line.strip():
            batch.append(line)
        if len(batch) >= 16:
            _classify_batch(c, model, batch, labs, template, as_json, keep_alive)
            batch = []
    if batch:
        _classify_batch(c, model, batch, labs, template, as_json, keep_alive)


def _classify_batch(c, model, batch, labs, template, as_json, keep_alive=None):
    for text, r in zip(batch, c.classify(model, batch, labs or None, template=template, **_keep(keep_alive))):
        if as_json:
            echo_json({"text": text, **r})
        else:
            click.echo(f"{r['label']}\t{r['probs'][r['label']]:.3f}\t{text}")
    sys.stdout.flush()


@click.command()
@click.argument("model")
@click.argument("texts", nargs=-1)
@click.option("--pooling", type=click.Choice(["mean", "last"]), default="mean", show_default=True,
              help="Average the final hidden states over the tokens, or take the last token's.")
@click.option("--no-normalize", is_flag=True, help="Do not scale vectors to unit length.")
@click.option("-o", "--output", type=click.Path(dir_okay=False),
              help="Write this file, in .npy format (float32, one row per input), instead of "
                   "JSON lines (the name is used as given).")
@common.keep_alive_option
@click.pass_context
def embed(ctx, model, texts, pooling, no_normalize, output, keep_alive):
    """Embed each of TEXTS (or each stdin line): one vector per input, in input order.

    A vector is the model's final (normalized) hidden states pooled over the input's tokens,
    L2-normalized unless --no-normalize.  Prints one JSON array per line, or writes --output.
    """
    if not texts:
        if sys.stdin.isatty():
            raise click.UsageError("give TEXTS, or pipe lines in")
        texts = [ln.rstrip("\n") for ln in sys.stdin if ln.strip()]
    else:
        _note_file_arguments(texts, "embed")
    if output:
        check_output_file(output)       # before the work, not after it
    vecs = common.client(ctx).embed(model, list(texts), pooling=pooling, normalize=not no_normalize,
                                    **_keep(keep_alive))
    if output:
        save_npy(output, vecs)
        click.echo(f"wrote {vecs.shape[0]} x {vecs.shape[1]} float32 to {output}", err=True)
        return
    for v in vecs:
        click.echo(json.dumps([round(float(x), 7) for x in v]))

COMMANDS = [run, generate, chat, score, classify, embed]


def check_output_file(path: str) -> None:
    """Raise OutputError unless a file can be created at ``path`` (its directory exists and is
    writable, and it is not a directory)."""
    d = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(d):
        raise OutputError(path, f"directory {d} does not exist")
    if not os.access(d, os.W_OK | os.X_OK) or (os.path.exists(path) and not os.access(path, os.W_OK)):
        raise OutputError(path, "permission denied")


def save_npy(path: str, array) -> None:
    """Write ``array`` in .npy format to exactly ``path`` (numpy's np.save would add '.npy'),
    through a temporary file so a failure leaves no partial file."""
    import numpy as np
    d = os.path.dirname(os.path.abspath(path))
    try:
        fd, tmp = tempfile.mkstemp(dir=d, prefix=".embed.")
        try:
            with os.fdopen(fd, "wb") as f:
                np.save(f, array)
            os.chmod(tmp, 0o666 & ~_umask())
            os.replace(tmp, path)
        except BaseException:
            if os.path.exists(tmp):
                os.unlink(tmp)
            raise
    except OSError as e:
        raise OutputError(path, e) from None


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
