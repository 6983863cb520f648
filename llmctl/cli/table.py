"""The model table's commands: status, ps, load, unload."""
from __future__ import annotations

import click

from .. import format as fmt
from . import common


@click.command()
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.pass_context
def status(ctx, as_json):
    """Show the daemon's status."""
    s = common.client(ctx).status()
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


@click.command()
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.pass_context
def ps(ctx, as_json):
    """List loaded model instances (the model table)."""
    c = common.client(ctx)
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
        click.echo(fmt.table(["JOB", "KIND", "MODEL", "STATE", "PROGRESS", "PID"],
                             [job_cells(j) for j in body["jobs"]]))


def job_cells(j: dict) -> list:
    """A running job under the model table: a training job's steps and loss, another job's
    progress message (rows before protocol 1.5 said id/target/progress)."""
    if j.get("step") is not None:
        progress = f"step {fmt.steps(j['step'], j.get('max_steps'))}, loss {fmt.loss(j.get('loss'))}"
    else:
        progress = (j.get("progress") or {}).get("message", "")
    return [j.get("job_id", j.get("id")), j.get("kind"), j.get("model", j.get("target")),
            fmt.job_state(j), progress, j.get("pid")]


@click.command()
@click.argument("model")
@click.option("--json", "as_json", is_flag=True, help="Print the instance as JSON.")
@click.pass_context
def load(ctx, model, as_json):
    """Load MODEL into the model table (no-op if it is already loaded)."""
    c = common.client(ctx)
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


@click.command()
@click.argument("target")
@click.option("--force", is_flag=True, help="Cancel active requests instead of refusing.")
@click.pass_context
def unload(ctx, target, force):
    """Unload TARGET: an instance ID, or every instance of a model (a model that is not
    loaded is no error, as with 'systemctl stop')."""
    r = common.client(ctx).unload(target, force=force)
    if not r["unloaded"]:
        click.echo(f"{target} is not loaded")
        return
    click.echo("unloaded instance " + ", ".join(map(str, r["unloaded"])))


COMMANDS = [status, ps, load, unload]
