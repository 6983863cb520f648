"""Training and the job table: train, jobs (ls, show, rm), logs, cancel, pause, resume.

``train --wait`` and ``logs -f`` follow a job's stream; Ctrl-C leaves it (the job goes on, and
the command says how to come back).  ``train --wait`` exits with the job's status: 0 succeeded,
65 failed on bad input, 70 failed otherwise, 130 cancelled.
"""
from __future__ import annotations

import sys

import click

from .. import format as fmt
from ..errors import EX_DATAERR, EX_NOINPUT, EX_SOFTWARE, InvalidArgument
from ..jobs import FINISHED
from ..trainspec import DTYPES, SPEC_KEYS, TOKENIZERS, data_files, load_spec_file, merge_spec
from . import common
from .job_export import KINDS, export_job


class NoInput(click.ClickException):
    """An input file (data, spec) that does not exist or cannot be read: one line, exit 66."""
    exit_code = EX_NOINPUT

    def __init__(self, err: OSError):
        super().__init__(f"cannot read {err.filename}: {err.strerror or err}")

    def show(self, file=None) -> None:
        click.echo(f"llmctl: {self.message}", err=True)


# Reasons of a failed job that mean its input was bad (exit 65 rather than 70).
BAD_INPUT = ("invalid_argument", "invalid argument", "invalid data", "bad input", "too_large")


def exit_status(row: dict) -> int:
    """A finished job's exit status: 0 succeeded, 130 cancelled, 65 failed on bad input (the
    row's error ``code`` is invalid_argument/too_large, or its reason says so), else 70."""
    state = row.get("state")
    if state == "cancelled":
        return 130
    if state != "failed":
        return 0
    if row.get("code") in (4, 5):
        return EX_DATAERR
    reason = str(row.get("reason") or "").lower()
    return EX_DATAERR if reason.startswith(BAD_INPUT) else EX_SOFTWARE


def detached(job_id) -> None:
    click.echo(f"detached; the job goes on: llmctl logs -f {job_id}", err=True)


# The training spec's flags (every one optional: unset keys take the daemon's defaults).
SPEC_FLAGS = [
    ("--tokenizer", dict(type=click.Choice(TOKENIZERS), help="Tokenizer to train [daemon default: bpe].")),
    ("--vocab-size", dict(type=int, metavar="N", help="Tokenizer pieces (char: the text's characters).")),
    ("--layers", dict(type=int, metavar="N", help="Transformer blocks.")),
    ("--dim", dict(type=int, metavar="N", help="Model width.")),
    ("--heads", dict(type=int, metavar="N", help="Attention heads.")),
    ("--kv-heads", dict(type=int, metavar="N", help="Key/value heads (grouped-query attention).")),
    ("--block-size", dict(type=int, metavar="N", help="Tokens per training sequence.")),
    ("--batch-size", dict(type=int, metavar="N", help="Sequences per micro-batch (per process).")),
    ("--grad-accum", dict(type=int, metavar="N", help="Micro-batches per optimizer step.")),
    ("--max-steps", dict(type=int, metavar="N", help="Optimizer steps in all.")),
    ("--lr", dict(type=float, metavar="X", help="Peak learning rate (AdamW).")),
    ("--min-lr", dict(type=float, metavar="X", help="Learning rate at the end of the cosine decay.")),
    ("--warmup", dict(type=int, metavar="N", help="Steps of linear warmup.")),
    ("--weight-decay", dict(type=float, metavar="X", help="AdamW weight decay.")),
    ("--dropout", dict(type=float, metavar="X", help="Dropout probability while training.")),
    ("--eval-every", dict(type=int, metavar="N", help="Steps between validation losses.")),
    ("--eval-batches", dict(type=int, metavar="N", help="Batches per validation loss.")),
    ("--checkpoint-every", dict(type=int, metavar="N", help="Steps between checkpoints.")),
    ("--nproc", dict(type=int, metavar="N", help="Data-parallel processes (per node).")),
    ("--seed", dict(type=click.IntRange(0, 2**32 - 1), metavar="N", help="Seed (weights, batches, split).")),
    ("--device", dict(metavar="D", help="auto, cpu, cuda or cuda:N [daemon default: auto].")),
    ("--dtype", dict(type=click.Choice(DTYPES), help="Training precision: float32, or bfloat16 autocast (auto: bf16 where supported).")),
]


def spec_options(exclude=(), helps=None):
    """A decorator adding SPEC_FLAGS but those of the keys in ``exclude``; ``helps`` ({key:
    text}) replaces some help texts (fine-tuning's defaults differ)."""
    def add(f):
        for flag, kw in reversed(SPEC_FLAGS):
            key = flag[2:].replace("-", "_")
            if key not in exclude:
                f = click.option(flag, **{**kw, **({"help": helps[key]} if helps and key in helps else {})})(f)
        return f
    return add


_spec_options = spec_options()


def _stack(opts):
    def apply(f):
        for opt in reversed(opts):
            f = opt(f)
        return f
    return apply


# The queueing flags train and finetune share (priority, preemptible, --wait, --json).
queue_options = _stack([
    click.option("--priority", type=click.IntRange(-1000, 1000), default=0, show_default=True, metavar="N",
                 help="-1000..1000: higher runs first (first come, first served within one)."),
    click.option("--preemptible", is_flag=True,
                 help="Let loads that need its memory pause it (checkpointed); it resumes when the "
                      "room comes back."),
    click.option("--wait", is_flag=True, help="Follow the job to its end and exit with its status."),
    click.option("--json", "as_json", is_flag=True,
                 help="Print the job row as JSON (and, with --wait, one line per metrics report)."),
])


def cluster_options(export_help: str):
    """--export slurm|torchrun DIR, --nnodes and --rdzv-endpoint (train and finetune)."""
    return _stack([
        click.option("--export", nargs=2, type=(click.Choice(KINDS), click.Path(file_okay=False)),
                     metavar="slurm|torchrun DIR", help=export_help),
        click.option("--nnodes", type=click.IntRange(1, 4096), default=1, show_default=True,
                     help="Nodes of an exported job."),
        click.option("--rdzv-endpoint", metavar="HOST:PORT",
                     help="Rendezvous of an exported torchrun job [localhost:29500]."),
    ])


@click.command(context_settings={"max_content_width": 100})
@click.argument("name")
@click.argument("more_data", nargs=-1, metavar="[FILE]...")
@click.option("--data", multiple=True, metavar="FILE",
              help="Training text or JSONL ({\"text\": ...} per line); repeat it, or list more files after it.")
@_spec_options
@click.option("--spec", "spec_file", metavar="FILE",
              help="TOML or JSON file with the same keys (vocab_size, max_steps...); flags override it.")
@queue_options
@cluster_options("Write a job to run on a cluster into DIR instead (no daemon).")
@click.pass_context
def train(ctx, name, more_data, data, spec_file, priority, preemptible, wait, as_json, export, nnodes,
          rdzv_endpoint, **flags):
    """Train model NAME[:TAG] on text: a queued job that prints its id (with --wait: follows it).

    A new NAME is created from the architecture flags; an existing one is trained further (its
    architecture kept).  Data files are sent to the daemon once (content it has is skipped).

    \b
    Examples:
      llmctl train tiny-char --data input.txt --tokenizer char --max-steps 2000 --wait
      llmctl train tiny --spec run.toml --data a.txt b.jsonl --lr 3e-4
      llmctl train big --spec run.toml --data corpus.txt --nproc 8 --export slurm ./job
    """
    try:
        files = data_files(list(data) + list(more_data))
        file_spec = load_spec_file(spec_file) if spec_file else None
    except OSError as e:
        raise NoInput(e) from None
    spec = merge_spec(file_spec, {k: v for k, v in flags.items() if k in SPEC_KEYS})
    if (nnodes != 1 or rdzv_endpoint) and not export:
        raise click.UsageError("--nnodes and --rdzv-endpoint describe an --export'ed job")
    if export:
        if wait:
            raise click.UsageError("--wait follows a daemon job; an --export'ed job runs elsewhere")
        return _export(export, name, spec, files, nnodes, rdzv_endpoint, as_json)
    c = common.client(ctx)
    progress, line = _upload_progress(as_json)
    try:
        row = c.train(name, list(files.values()), spec, priority=priority, progress=progress,
                      **common.preempt(preemptible))
    finally:
        line.done()
    if as_json:
        fmt.echo_json(row)
    else:
        click.echo(row["job_id"])
        click.echo(f"job {row['job_id']} {row.get('state') or 'queued'}: training {row.get('model') or name}"
                   + ("" if wait else f"; follow it with: llmctl logs -f {row['job_id']}"), err=True)
    if wait:
        status = Follow(as_json).run(c, row)
        if status:
            sys.exit(status)


def _export(export, name, spec, files, nnodes, endpoint, as_json) -> None:
    kind, dest = export
    if endpoint and kind == "slurm":
        raise click.UsageError("--rdzv-endpoint is for torchrun; a slurm job meets on its first node")
    r = export_job(kind, dest, name, spec, files, nnodes=nnodes, endpoint=endpoint)
    if as_json:
        return fmt.echo_json(r)
    run = "sbatch job.sbatch" if kind == "slurm" else "./run.sh" + ("" if nnodes == 1 else " (NODE_RANK=k on node k)")
    click.echo(f"wrote a {kind} job for {name} to {r['dir']} ({', '.join(r['files'])})")
    click.echo(f"run it there with: {run}; then: llmctl import {r['dir']}/output {name}")


def _upload_progress(as_json: bool):
    line = fmt.StatusLine(enabled=not as_json)

    def progress(p):
        if p.get("skipped"):
            line.update(f"{p['file']}: already in the store", key=p["file"])
        else:
            frac = p["sent"] / max(1, p["size"])
            line.update(f"{p['file']}: sent {100 * frac:.0f}% of {fmt.size(p['size'])}", frac, key=p["file"])
    return progress, line


class Follow:
    """Shows a followed job: a live line on a terminal (stderr), plain lines in a log (each
    validation, each tenth of the steps, each state change), or with ``as_json`` one JSON line
    per metrics report on stdout.  ``run`` returns the job's exit status."""

    def __init__(self, as_json: bool, stream=None):
        self.as_json, self.stream = as_json, stream or sys.stderr
        self.line = fmt.StatusLine(self.stream, enabled=not as_json)
        self.metrics: dict = {}
        self.state, self.max_steps, self._tenth = None, None, -1

    def run(self, client, row: dict) -> int:
        job_id = row["job_id"]
        self.state, self.max_steps = row.get("state"), row.get("max_steps")
        self._show(job_id, False)                   # a terminal shows "queued" at once
        log = client.job_logs(job_id, follow=True)
        try:
            for chunk in log:
                self.chunk(job_id, chunk)
        except KeyboardInterrupt:
            self.line.done()
            detached(job_id)
            return 130
        self.line.done()
        final = log.row or client.job(job_id)["job"]
        self.finish(final)
        return exit_status(final)

    def chunk(self, job_id: int, chunk: dict) -> None:
        if "metrics" in chunk:
            self.metrics = m = chunk["metrics"]
            if self.as_json:
                fmt.echo_json({"job_id": job_id, **m})
                sys.stdout.flush()
            else:
                self._show(job_id, self._worth_a_line(m))
        elif "row" in chunk:
            r = chunk["row"]
            self.max_steps = r.get("max_steps") or self.max_steps
            if r.get("state") != self.state:
                self.state = r.get("state")
                self._show(job_id, True)
        elif "line" in chunk and not self.as_json:
            self.line.clear()
            click.echo(chunk["line"], err=True)
            self._show(job_id, False)

    def _worth_a_line(self, m: dict) -> bool:
        """In a log: print the first report, those with a validation loss, and one per tenth
        of the steps (every report when the number of steps is unknown)."""
        tenth = int(10 * m["step"] / self.max_steps) if self.max_steps and m.get("step") is not None else None
        first = self._tenth < 0
        if tenth is not None and tenth > self._tenth:
            self._tenth = tenth
            return True
        return first or tenth is None or m.get("val_loss") is not None

    def _show(self, job_id, log_line: bool) -> None:
        if self.as_json:
            return
        text = f"job {job_id} {self.state or ''}".rstrip()
        if self.metrics:
            text += "  " + fmt.train_progress(self.metrics, self.max_steps)
        if self.line.tty:
            self.line.update(text, key="follow")
        elif log_line:
            click.echo(text, err=True)

    def finish(self, row: dict) -> None:
        if self.as_json:
            fmt.echo_json(row)
            return
        what = (f"{row.get('model')}: step {fmt.steps(row.get('step'), row.get('max_steps'))}, "
                f"loss {fmt.loss(row.get('loss'))}, val {fmt.loss(row.get('val_loss'))}")
        figures = fmt.val_metrics(self.metrics, ", ")      # the last report's, as the row has none
        if figures:
            what += ", " + figures
        if row.get("state") == "succeeded":
            click.echo(f"job {row['job_id']} succeeded: {what}")
        else:
            click.echo(f"llmctl: job {row['job_id']} {fmt.job_state(row, 500)} ({what})", err=True)


# -- the job table ---------------------------------------------------------------------------
@click.group("jobs", invoke_without_command=True)
@click.option("--all", "all_", is_flag=True, help="Include finished jobs.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON (a list of job rows).")
@click.pass_context
def jobs(ctx, all_, as_json):
    """List jobs (queued, running, paused; --all: finished too), like ps.

    \b
    Subcommands: llmctl jobs show JOB, llmctl jobs rm JOB...
    """
    if ctx.invoked_subcommand:
        return
    rows = common.client(ctx).jobs(all=all_)
    if as_json:
        return fmt.echo_json(rows)
    click.echo(fmt.job_table([{**r, "owner": owner_name(r.get("owner"))} for r in rows]))


def owner_name(uid) -> str | None:
    """A job's OWNER as a user name (this machine's passwd: the daemon's socket is local),
    its uid when passwd has none; None stays None."""
    import pwd
    if not isinstance(uid, int) or isinstance(uid, bool):
        return uid
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return str(uid)


@jobs.command("show")
@click.argument("job", type=int)
@click.option("--json", "as_json", is_flag=True, help="Print JSON ({job, spec, data}).")
@click.pass_context
def jobs_show(ctx, job, as_json):
    """Show one job: its row, the spec it runs with and its data files."""
    r = common.client(ctx).job(job)
    if as_json:
        return fmt.echo_json(r)
    row = r["job"]
    for key in ("job_id", "kind", "model", "state", "reason", "priority", "device", "nproc", "owner", "pid"):
        if row.get(key) is not None:
            value = f"{owner_name(row[key])} (uid {row[key]})" if key == "owner" else row[key]
            click.echo(f"{key + ':':<17}{value}")
    click.echo(f"{'progress:':<17}step {fmt.steps(row.get('step'), row.get('max_steps'))}, "
               f"loss {fmt.loss(row.get('loss'))}, val {fmt.loss(row.get('val_loss'))}, "
               f"{fmt.rate(row.get('tokens_per_s'))}, ETA {fmt.duration(row.get('eta_s'))}")
    for line in result_lines(r):
        click.echo(line)
    if row.get("checkpoint_step") is not None:
        click.echo(f"{'checkpoint:':<17}step {row['checkpoint_step']}")
    for key in ("created", "started", "finished"):
        click.echo(f"{key + ':':<17}{fmt.ago(row.get(key))}")
    if r.get("spec"):
        click.echo("spec:            " + ", ".join(f"{k}={v}" for k, v in sorted(r["spec"].items())
                                                  if not k.startswith("_") and k != "data" and v is not None))
    for rel, digest in sorted((r.get("data") or {}).items()):
        click.echo(f"data:            {rel} ({fmt.short_digest(digest)})")


def result_lines(r: dict) -> list[str]:
    """``jobs show``'s lines for what a job measured (its row's ``metrics``, from daemons that
    send it): a fine-tune's last validation figures; an eval's metrics and example count."""
    row = r.get("job") or {}
    m, kind = row.get("metrics") or {}, row.get("kind")
    if kind == "eval" and isinstance(m.get("metrics"), dict):
        from .finetune import ordered
        figures = ", ".join(f"{k} {_num(v)}" for k, v in ordered(m["metrics"]))
        return [f"{'result:':<17}{figures or '-'}"
                + (f" on {m['examples']} examples" if m.get("examples") is not None else "")]
    figures = fmt.val_metrics(m, ", ")
    if not figures:
        return []
    return [f"{'validation:':<17}" + (f"step {m['step']}: " if m.get("step") is not None else "")
            + (f"loss {fmt.loss(m['val_loss'])}, " if m.get("val_loss") is not None else "") + figures]


def _num(v) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


@jobs.command("rm")
@click.argument("job_ids", nargs=-1, type=int, required=True, metavar="JOB...")
@click.pass_context
def jobs_rm(ctx, job_ids):
    """Remove finished jobs: their records, metrics, logs and checkpoints."""
    for j in job_ids:
        r = common.client(ctx).job_rm(j)
        click.echo(f"removed job {r.get('removed', j)}")


def _control(ctx, action: str, job_ids, as_json: bool) -> None:
    """Ask for ``action`` (cancel, pause, resume) on each job; print each job's new state."""
    c = common.client(ctx)
    for j in job_ids:
        row = getattr(c, f"job_{action}")(j)
        if as_json:
            fmt.echo_json(row)
        else:
            click.echo(f"job {row.get('job_id', j)} {row.get('state')}")


_JOB_IDS = click.argument("job_ids", nargs=-1, type=int, required=True, metavar="JOB...")
_ROWS_JSON = click.option("--json", "as_json", is_flag=True, help="Print each job row as JSON.")


@click.command()
@_JOB_IDS
@_ROWS_JSON
@click.pass_context
def cancel(ctx, job_ids, as_json):
    """Cancel jobs (queued, running or paused); a cancelled training leaves no model."""
    _control(ctx, "cancel", job_ids, as_json)


@click.command()
@_JOB_IDS
@_ROWS_JSON
@click.pass_context
def pause(ctx, job_ids, as_json):
    """Pause running jobs: each writes a checkpoint and stops (pausing, then paused)."""
    _control(ctx, "pause", job_ids, as_json)


@click.command()
@_JOB_IDS
@_ROWS_JSON
@click.pass_context
def resume(ctx, job_ids, as_json):
    """Resume paused jobs: queued again, they continue from their checkpoint."""
    _control(ctx, "resume", job_ids, as_json)


@click.command()
@click.argument("job", type=int)
@click.option("-f", "--follow", is_flag=True, help="Keep following until the job ends (Ctrl-C leaves it running).")
@click.option("--json", "as_json", is_flag=True, help="One JSON object per record ({line}, {metrics}, {row}), then {job}.")
@click.option("--plot", metavar="FILE", help="Draw train and validation loss against steps into FILE (.png, .svg, .pdf).")
@click.pass_context
def logs(ctx, job, follow, as_json, plot):
    """Print a job's log, metrics and state changes (with -f: as they come)."""
    c = common.client(ctx)
    info = c.job(job)                          # no such job: said before anything streams
    max_steps, state = info["job"].get("max_steps"), None
    log = c.job_logs(job, follow=follow)
    metrics = []
    try:
        for chunk in log:
            if "metrics" in chunk:
                metrics.append(chunk["metrics"])
            elif "row" in chunk:
                max_steps = chunk["row"].get("max_steps") or max_steps
                state = chunk["row"].get("state")
            if plot:
                continue
            if as_json:
                fmt.echo_json(chunk)
            else:
                click.echo(log_text(chunk, max_steps))
            if follow:
                sys.stdout.flush()
    except KeyboardInterrupt:
        detached(job)
        if not plot:
            sys.exit(130)
    if plot:
        return _plot(info, job, metrics, plot, as_json)
    if log.result is not None:
        if as_json:
            fmt.echo_json(log.result)
        elif log.row and log.row.get("state") in FINISHED and log.row.get("state") != state:
            click.echo(log_text({"row": log.row}))


def log_text(chunk: dict, max_steps: int | None = None) -> str:
    """One record of a job's log as a line of text."""
    if "line" in chunk:
        return chunk["line"]
    if "metrics" in chunk:
        return fmt.train_progress(chunk["metrics"], max_steps, lr=True)
    if "row" in chunk:
        return f"-- job {chunk['row'].get('job_id')} {fmt.job_state(chunk['row'], 500)}"
    return str(chunk)


def _plot(info: dict, job: int, metrics: list[dict], path: str, as_json: bool) -> None:
    from ..plot import plot_losses
    row, spec = info["job"], info.get("spec") or {}
    arch = ", ".join(f"{v} {k}" for k, v in (("layers", spec.get("layers")), ("dim", spec.get("dim")),
                                            ("heads", spec.get("heads"))) if v is not None)
    sub = " · ".join(x for x in (f"job {job} ({row.get('state')})", arch,
                                 spec.get("method") and f"{spec['method']} fine-tune",
                                 spec.get("tokenizer") and f"{spec['tokenizer']} tokenizer",
                                 row.get("device")) if x)
    try:
        s = plot_losses(metrics, path, title=f"{row.get('model') or 'job ' + str(job)}: loss", subtitle=sub)
    except ValueError as e:
        raise InvalidArgument(f"job {job}: nothing to plot: {e}", hint="plot again once it has run some steps") from None
    except OSError as e:
        raise common.OutputError(path, e) from None
    if as_json:
        return fmt.echo_json({"plot": path, **s})
    best = (f"; best validation {s['best_val_loss']:.4f} at step {s['best_val_step']}"
            if s["best_val_loss"] is not None else "")
    last = "".join(f"; last {k} {v:.3f}" for k, v in (s.get("scores") or {}).items())
    click.echo(f"wrote {path}: {s['points']} train and {s['val_points']} validation points{best}{last}")


COMMANDS = [train, jobs, logs, cancel, pause, resume]
