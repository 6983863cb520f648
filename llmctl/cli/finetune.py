"""Fine-tuning commands: finetune (a job like train), eval (a model's metrics on data), merge.

``finetune --wait`` follows the job as ``train --wait`` does and exits with its status;
``eval`` waits for its job (Ctrl-C cancels it: exit 130) and prints a table of metrics;
``merge`` writes an adapter or classifier into a standalone model, with progress like create.
"""
from __future__ import annotations

import os
import sys

import click

from .. import format as fmt
from ..jobs import FT_NO_DATA
from ..trainspec import (ARCH_KEYS, EVAL_METRICS, FINETUNE_KEYS, FT_METHODS, FT_REFUSED, data_files,
                         finetune_conflict, load_spec_file, merge_spec)
from . import common
from .job_export import export_finetune
from .jobs import Follow, NoInput, _upload_progress, cluster_options, queue_options, spec_options
from .store import _made, _progress

FT_HELPS = {
    "max_steps": "Optimizer steps in all (instead of --epochs).",
    "lr": "Peak learning rate [daemon default: full 2e-5, lora 3e-4, classify 3e-4, --head-only 1e-3].",
    "block_size": "Tokens per example, longer ones cut [default: min(512, the base's context)].",
    "eval_every": "Steps between validations [default: one epoch].",
    "seed": "Seed (adapter init, batches, split).",
}


def _arch_refused(ctx, param, value):
    if value is not None:
        raise click.UsageError(f"{param.opts[0]} is not a finetune flag: fine-tuning keeps the base "
                               f"model's architecture and tokenizer", ctx)
    return value


def _refused(ctx, param, value):
    if value is not None:
        raise click.UsageError(f"{param.opts[0]} is not a finetune flag: {FT_REFUSED[param.name]}", ctx)
    return value


def _arch_options(f):
    """The architecture flags of train and those fine-tuning refuses (FT_REFUSED), hidden:
    given to finetune, each is refused clearly."""
    for key in ARCH_KEYS:
        f = click.option("--" + key.replace("_", "-"), key, hidden=True, expose_value=False,
                         callback=_arch_refused)(f)
    for key in FT_REFUSED:
        f = click.option("--" + key.replace("_", "-"), key, type=int, hidden=True, expose_value=False,
                         callback=_refused)(f)
    return f


@click.command(context_settings={"max_content_width": 100})
@click.argument("base")
@click.argument("name")
@click.argument("more_data", nargs=-1, metavar="[FILE]...")
@click.option("--data", multiple=True, metavar="FILE",
              help="JSONL training data, one example per line: {\"prompt\", \"completion\"}, "
                   "{\"messages\": [...]}, {\"text\"} or {\"text\", \"label\"}; repeat it, or list more files after it.")
@click.option("--val-data", multiple=True, metavar="FILE",
              help="Validation examples (same formats) [default: 10% of --data held out].")
@click.option("--method", type=click.Choice(FT_METHODS),
              help="full (every weight), lora (an adapter on BASE) or classify (a classification head) "
                   "[daemon default: lora].")
@click.option("--rank", type=int, metavar="R", help="LoRA rank (1..1024) [8].")
@click.option("--alpha", type=float, metavar="A", help="LoRA alpha; the update is scaled by alpha/rank [2*rank].")
@click.option("--lora-dropout", type=float, metavar="X", help="Dropout on the LoRA input (0..0.95) [0].")
@click.option("--targets", metavar="LIST", help="Linear layers to adapt: q_proj,v_proj (default) or all-linear.")
@click.option("--labels", metavar="a,b,c", help="classify: the labels, in this order [the data's, sorted].")
@click.option("--head-only", is_flag=True, default=None,
              help="classify: train only the head on a frozen base [default: LoRA and head].")
@click.option("--epochs", type=float, metavar="N", help="Passes over the training data [1] (or --max-steps).")
@click.option("--eval-samples", type=int, metavar="N",
              help="Validation examples answered greedily for exact match and chrF [32].")
@spec_options(exclude=ARCH_KEYS + tuple(FT_REFUSED), helps=FT_HELPS)
@_arch_options
@click.option("--spec", "spec_file", metavar="FILE",
              help="TOML or JSON file with the same keys (method, rank, labels, epochs...); flags override it.")
@queue_options
@click.option("--force", is_flag=True, help="Replace a model already named NAME.")
@cluster_options("Write a job to run on a cluster into DIR instead (BASE's files come from the daemon).")
@click.pass_context
def finetune(ctx, base, name, more_data, data, val_data, spec_file, priority, preemptible, wait, as_json,
             force, export, nnodes, rdzv_endpoint, **flags):
    """Fine-tune model BASE into NAME[:TAG] on JSONL examples: a queued job that prints its id
    (with --wait: follows it, validation metrics included).

    lora stores an adapter that shares BASE's weights (it serves on a loaded BASE); classify
    stores a classifier that 'llmctl classify NAME' uses with its labels; full stores a model.
    Loss is taken on the completion / assistant tokens only.

    \b
    Examples:
      llmctl finetune smollm2 smollm2-qa --data qa.jsonl --rank 16 --epochs 3 --wait
      llmctl finetune smollm2 sentiment --data reviews.jsonl --method classify --labels pos,neg
      llmctl finetune smollm2 smollm2-chat --spec sft.toml --data chat.jsonl --method full
    """
    flags["head_only"] = flags.get("head_only") or None
    try:
        files = data_files(list(data) + list(more_data), FT_NO_DATA)
        val = data_files(list(val_data), FT_NO_DATA) if val_data else None
        file_spec = load_spec_file(spec_file, FINETUNE_KEYS) if spec_file else None
    except OSError as e:
        raise NoInput(e) from None
    spec = merge_spec(file_spec, {k: v for k, v in flags.items() if k in FINETUNE_KEYS}, FINETUNE_KEYS)
    conflict = finetune_conflict(spec)
    if conflict:
        raise click.UsageError(conflict, ctx)
    if (nnodes != 1 or rdzv_endpoint) and not export:
        raise click.UsageError("--nnodes and --rdzv-endpoint describe an --export'ed job")
    if export:
        if wait:
            raise click.UsageError("--wait follows a daemon job; an --export'ed job runs elsewhere")
        return _export(ctx, export, base, name, spec, files, val, nnodes, rdzv_endpoint, as_json)
    c = common.client(ctx)
    progress, line = _upload_progress(as_json)
    try:
        row = c.finetune(base, name, list(files.values()), spec, val_data=list(val.values()) if val else None,
                         priority=priority, force=force, progress=progress,
                         **common.preempt(preemptible))
    finally:
        line.done()
    if as_json:
        fmt.echo_json(row)
    else:
        click.echo(row["job_id"])
        click.echo(f"job {row['job_id']} {row.get('state') or 'queued'}: fine-tuning {base} into "
                   f"{row.get('model') or name}"
                   + ("" if wait else f"; follow it with: llmctl logs -f {row['job_id']}"), err=True)
    if wait:
        status = Follow(as_json).run(c, row)
        if status:
            sys.exit(status)


def _export(ctx, export, base, name, spec, files, val, nnodes, endpoint, as_json) -> None:
    kind, dest = export
    if endpoint and kind == "slurm":
        raise click.UsageError("--rdzv-endpoint is for torchrun; a slurm job meets on its first node")
    if spec.get("method") == "classify":
        raise click.UsageError("--export of a classify fine-tune is not supported yet: run it on the "
                               "daemon (without --export), or use --method lora or full")
    progress, line = _progress(as_json)
    try:
        r = export_finetune(common.client(ctx), kind, dest, base, name, spec, files, val,
                            nnodes=nnodes, endpoint=endpoint, progress=progress)
    finally:
        line.done()
    if as_json:
        return fmt.echo_json(r)
    run = "sbatch job.sbatch" if kind == "slurm" else "./run.sh" + ("" if nnodes == 1 else " (NODE_RANK=k on node k)")
    click.echo(f"wrote a {kind} job fine-tuning {r['base']} into {name} to {r['dir']} ({', '.join(r['files'])})")
    click.echo(f"run it there with: {run}; then: {r['import']}")


@click.command("eval")
@click.argument("model")
@click.argument("more", nargs=-1, metavar="[MODEL]...")
@click.option("--data", multiple=True, metavar="FILE",
              help="JSONL examples, as finetune takes them; repeat it for more files.")
@click.option("--metric", "metrics", multiple=True, type=click.Choice(EVAL_METRICS),
              help="A metric to compute; repeat it [default: every one the data allows].")
@click.option("--eval-samples", type=int, metavar="N",
              help="Examples answered greedily for exact match and chrF [100].")
@click.option("--block-size", type=int, metavar="N", help="Tokens per example, longer ones cut.")
@click.option("--batch-size", type=int, metavar="N", help="Examples per forward pass.")
@click.option("--device", metavar="D", help="auto, cpu, cuda or cuda:N [daemon default: auto].")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON (a list with several models).")
@click.pass_context
def eval_(ctx, model, more, data, metrics, eval_samples, block_size, batch_size, device, as_json):
    """Evaluate MODEL (and each further MODEL, side by side: one column each, the data sent
    once) on JSONL examples with the metrics fine-tuning reports (loss and perplexity;
    accuracy and macro-F1 for labelled data; exact match and chrF for completions and chats),
    without training.  Ctrl-C cancels the evaluation.

    \b
    Examples:
      llmctl eval smollm2 --data qa-test.jsonl
      llmctl eval smollm2 smollm2-qa --data qa-test.jsonl
      llmctl eval smollm2-qa --data qa-test.jsonl --metric exact_match --metric chrf --json
    """
    models, paths = split_eval_args(model, more, data)
    try:
        files = data_files(paths, FT_NO_DATA)
    except OSError as e:
        raise NoInput(e) from None
    spec = {k: v for k, v in (("metrics", list(metrics) or None), ("eval_samples", eval_samples),
                              ("block_size", block_size), ("batch_size", batch_size),
                              ("device", device)) if v is not None}
    progress, line = _progress(as_json)
    c = common.client(ctx)
    try:
        if len(models) == 1:
            results = [c.eval(models[0], list(files.values()), spec or None, progress=progress)]
        else:
            results = c.eval_many(models, list(files.values()), spec or None,
                                  progress=lambda p: progress(_named(p)))
    finally:
        line.done()
    if as_json:
        return fmt.echo_json(results[0] if len(models) == 1 else results)
    if len(models) == 1:
        r = results[0]
        click.echo(metrics_table(r.get("metrics") or {}))
        click.echo(f"{r.get('examples')} examples, model {r.get('model') or model}"
                   + (f" (job {r['job']})" if r.get("job") is not None else ""))
        return
    click.echo(side_by_side(results))
    jobs = [str(r["job"]) for r in results if r.get("job") is not None]
    click.echo(f"{results[0].get('examples')} examples" + (f" (jobs {', '.join(jobs)})" if jobs else ""))


def _named(p: dict) -> dict:
    """A side-by-side evaluation's job chunk with its model in the stage ("qa eval: ...")."""
    if "model" in p and "file" not in p:
        return {**p, "stage": f"{str(p['model']).removesuffix(':latest')} {p.get('stage', '')}".rstrip()}
    return p


def split_eval_args(model: str, more: tuple, data: tuple) -> tuple[list[str], list[str]]:
    """(models, data paths) of ``eval MODEL [MODEL]... --data FILE...``.  Before several
    models were taken, the arguments after MODEL were more data files: one that names an
    existing file still is one (a model is never a file here), so old command lines work."""
    models, paths = [model], list(data)
    for arg in more:
        (paths if os.path.isfile(arg) else models).append(arg)
    if len(set(models)) != len(models):
        raise click.UsageError(f"a model is named twice: {', '.join(models)}")
    return models, paths


def ordered(metrics: dict) -> list[tuple[str, object]]:
    """The metrics as (name, value) in EVAL_METRICS' order (others after, by name)."""
    order = [m for m in EVAL_METRICS if m in metrics] + sorted(m for m in metrics if m not in EVAL_METRICS)
    return [(m, metrics[m]) for m in order]


def metrics_table(metrics: dict) -> str:
    """A METRIC / VALUE table in EVAL_METRICS' order (others after, by name)."""
    return fmt.table(["METRIC", "VALUE"], [[m, _value(v)] for m, v in ordered(metrics)])


def side_by_side(results: list[dict]) -> str:
    """A METRIC table with a column per evaluated model (its name), rows in EVAL_METRICS'
    order; a metric one model lacks is '-' there."""
    union: dict = {}
    for r in results:
        union.update({k: None for k in r.get("metrics") or {}})
    names = [m for m, _ in ordered(union)]
    heads = [str(r.get("model") or "?").removesuffix(":latest") for r in results]
    return fmt.table(["METRIC", *heads],
                     [[m, *(_value((r.get("metrics") or {}).get(m)) for r in results)] for m in names])


def _value(v) -> str:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return "-" if v is None else str(v)
    return f"{v:.4f}" if abs(v) < 1000 else f"{v:.1f}"


@click.command()
@click.argument("adapter")
@click.argument("name")
@click.option("--force", is_flag=True, help="Replace a model already named NAME.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
@click.pass_context
def merge(ctx, adapter, name, force, as_json):
    """Merge ADAPTER (a LoRA adapter or classifier) into its base's weights as the standalone
    model NAME[:TAG] (a classifier keeps its head)."""
    progress, line = _progress(as_json)
    try:
        r = common.client(ctx).merge(adapter, name, force=force, progress=progress)
    finally:
        line.done()
    if as_json:
        return fmt.echo_json(r)
    click.echo(_made("merged", r) + f" from {adapter}")


COMMANDS = [finetune, eval_, merge]
