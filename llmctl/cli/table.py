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
    click.echo(fmt.table(PS_HEADERS, ps_rows(body["instances"])))
    if body["jobs"]:
        click.echo()
        click.echo(fmt.table(["JOB", "KIND", "MODEL", "STATE", "PROGRESS", "PID"],
                             [job_cells(j) for j in body["jobs"]]))


PS_HEADERS = ["ID", "MODEL", "STATE", "DEVICE", "RESIDENT", "ACTIVE", "TOKENS", "LOADED",
              "LAST USED", "UID"]
ADAPTER_MARK = "`- "          # an adapter under its base instance, as pstree -A draws a child


def ps_rows(instances: list[dict]) -> list[list]:
    """The table's rows: each instance, then its adapters indented under it (a process tree:
    their bytes count in the instance's RESIDENT, which includes them)."""
    rows = []
    for i in instances:
        rows.append([i["id"], i["model"], i["state"] + (f" ({i['reason']})" if i.get("reason") else ""),
                     i["device"], fmt.size(i["resident_bytes"]), i["active_requests"], i["tokens_served"],
                     fmt.ago(i["loaded_at"]), fmt.ago(i["last_used"]), _uid(i.get("uid"))])
        for a in i.get("adapters") or []:
            rows.append(["", ADAPTER_MARK + a["model"], a["state"], "", fmt.size(a.get("resident_bytes")),
                         a.get("active_requests", 0), a.get("tokens_served", 0),
                         fmt.ago(a.get("loaded_at")), fmt.ago(a.get("last_used")), _uid(a.get("uid"))])
    return rows


def _uid(uid) -> str:
    return "-" if uid is None else str(uid)


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
    if r.get("adapter"):
        click.echo(adapter_line(r))
        return
    if r.get("already_loaded"):
        click.echo(f"{r['model']} already loaded (instance {r['id']}, {r['state']} on {r['device']})")
        return
    click.echo(f"instance {r['id']}: {r['model']} {r['state']} on {r['device']} "
               f"({fmt.size(r['resident_bytes'])}, {r['load_ms'] / 1000:.2f}s)")


def adapter_line(r: dict) -> str:
    """What ``load ADAPTER`` prints: the adapter, and the base instance it runs on."""
    a = r["adapter"]
    where = f"instance {r['id']} ({r['model']}, {r['state']} on {r['device']})"
    if r.get("already_loaded"):
        return f"{a['model']} already loaded on {where}"
    return (f"{a['model']} {a['state']} on {where} "
            f"({fmt.size(a['resident_bytes'])}, {r['load_ms'] / 1000:.2f}s)")


@click.command()
@click.argument("target")
@click.option("--force", is_flag=True, help="Cancel active requests instead of refusing.")
@click.pass_context
def unload(ctx, target, force):
    """Unload TARGET: an instance ID, or every instance of a model (a model that is not
    loaded is no error, as with 'systemctl stop').  An adapter is detached from the instances
    of its base it runs on; the base stays loaded."""
    r = common.client(ctx).unload(target, force=force)
    if r.get("detached"):
        click.echo(f"unloaded {r.get('model', target)} from instance " + ", ".join(map(str, r["detached"])))
        return
    if not r["unloaded"]:
        click.echo(f"{target} is not loaded")
        return
    click.echo("unloaded instance " + ", ".join(map(str, r["unloaded"])))


COMMANDS = [status, ps, load, unload]
