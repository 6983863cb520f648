"""The model table's commands: status, free, ps, load, unload, pin, unpin; the memory columns
and lines that ``top`` shows too."""
from __future__ import annotations

import time

import click

from .. import format as fmt
from ..errors import UnsupportedVersion
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
    if s.get("devices"):                 # protocol 1.7: the memory budgets
        click.echo()
        click.echo(devices_table(s["devices"]))


@click.command()
@click.option("--json", "as_json", is_flag=True, help="Print JSON ({devices: [...]}).")
@click.pass_context
def free(ctx, as_json):
    """Show memory per device, as free(1) does for RAM: budget, used by instances and jobs,
    reserved, free, and the host tier that swapped instances use."""
    devices = common.client(ctx).status().get("devices")
    if as_json:
        return fmt.echo_json({"devices": devices or []})
    if devices is None:
        raise UnsupportedVersion("this llmosd reports no memory budgets (it speaks protocol 1.6 or older)",
                                 hint="upgrade llmosd")
    click.echo(devices_table(devices))


DEVICE_HEADERS = ["DEVICE", "BUDGET", "INSTANCES", "JOBS", "RESERVED", "FREE", "OTHER"]


def devices_table(devices: list[dict]) -> str:
    """The per-device table of status and free: one row per device, then the host tier."""
    return fmt.table(DEVICE_HEADERS, device_rows(devices))


def device_rows(devices: list[dict]) -> list[list]:
    """Each device's budget, bytes held by instances, by jobs, reserved and free, and OTHER:
    on the cpu, the daemon's RSS that the budget does not account (itself, torch, caches;
    "-" elsewhere and from older daemons); then "host": the swap tier's budget, the bytes
    swapped instances hold there, and its free bytes (one pool for every device: each row
    repeats it)."""
    rows = [[d["device"], fmt.size(d.get("budget")), fmt.size(d.get("instances")), fmt.size(d.get("jobs")),
             fmt.size(d.get("reserved")), fmt.size(d.get("free")),
             fmt.size(d["other"]) if d.get("other") is not None else "-"] for d in devices]
    if devices:
        hb, hu = devices[0].get("host_budget"), devices[0].get("host_used")
        hfree = None if hb is None or hu is None else max(0, hb - hu)
        rows.append(["host", fmt.size(hb), fmt.size(hu), "-", "-", fmt.size(hfree), "-"])
    return rows


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
    evicted = body.get("evicted") or []
    if evicted:
        click.echo()
        click.echo("\n".join(eviction_line(e) for e in evicted[-EVICTED_SHOWN:]))
    if body["jobs"]:
        click.echo()
        click.echo(fmt.table(["JOB", "KIND", "MODEL", "STATE", "PROGRESS", "PID"],
                             [job_cells(j) for j in body["jobs"]]))


PS_HEADERS = ["ID", "MODEL", "STATE", "DEVICE", "WEIGHTS", "RESIDENT", "EST", "TIER", "KV", "KEEP-ALIVE", "ACTIVE",
              "TOKENS", "LAST USED", "UID"]
ADAPTER_MARK = "`- "          # an adapter under its base instance, as pstree -A draws a child
EVICTED_SHOWN = 5             # ps shows the latest evictions; --json has all the daemon keeps


def ps_rows(instances: list[dict], now: float | None = None) -> list[list]:
    """The table's rows: each instance, then its adapters indented under it (a process tree:
    their bytes count in the instance's RESIDENT, which includes them).  WEIGHTS is how the
    weights are held (e.g. q4_1+q8_0, int8, float32); RESIDENT is measured,
    EST the estimate made before the load; KV the engine's paged KV pool (``kv_text``); rows
    of an older daemon lack the memory fields."""
    rows = []
    for i in instances:
        rows.append([i["id"], i["model"], i["state"] + (f" ({i['reason']})" if i.get("reason") else ""),
                     i["device"], i.get("weights") or "-", fmt.size(i["resident_bytes"]),
                     fmt.size(i.get("estimate_bytes")),
                     i.get("tier") or "-", kv_text(i), keep_alive_text(i, now), i["active_requests"], i["tokens_served"],
                     fmt.ago(i["last_used"], now), _uid(i.get("uid"))])
        for a in i.get("adapters") or []:
            rows.append(["", ADAPTER_MARK + a["model"], a["state"], "", "", fmt.size(a.get("resident_bytes")),
                         fmt.size(a.get("estimate_bytes")), "", "", "", a.get("active_requests", 0),
                         a.get("tokens_served", 0), fmt.ago(a.get("last_used"), now), _uid(a.get("uid"))])
    return rows


def kv_text(i: dict) -> str:
    """KV: the blocks of the instance's KV pool in use of all ("3/64"), and the requests
    queued in its engine ("+5w"); "-" before its engine reports (or from an older daemon)."""
    total = i.get("kv_blocks_total")
    if not total:
        return "-"
    waiting = i.get("waiting") or 0
    return f"{i.get('kv_blocks_used') or 0}/{total}" + (f" +{waiting}w" if waiting else "")


def keep_alive_text(i: dict, now: float | None = None) -> str:
    """KEEP-ALIVE: "pinned", "forever" (-1), the time left before an idle instance unloads,
    or, while it is in use, its keep-alive and "idle" ("5m00s idle": counted once idle)."""
    if i.get("pinned"):
        return "pinned"
    ka = i.get("keep_alive")
    if ka is None:
        return "-"
    if ka < 0:
        return "forever"
    if i.get("expires_at") is not None:
        return fmt.duration(i["expires_at"] - (time.time() if now is None else now))
    return f"{fmt.duration(ka)} idle"


def eviction_line(e: dict, now: float | None = None) -> str:
    """One of ps's recent evictions: evicted (for room) or expired (keep-alive), when, what,
    where it went (host: swapped; store: unloaded), why:
    "evicted 2 minutes ago: tiny:latest (instance 3) to host: room for big:latest"."""
    return f"{e.get('why') or 'evicted'} {fmt.ago(e.get('at'), now)}: " + displaced_text(e)


def displaced_text(e: dict) -> str:
    """'tiny:latest (instance 3) to host: room for big:latest' (an eviction row).  Reasons
    of a daemon before the plain ones said where already ("evicted: ...", "swapped to host:
    ..."): that prefix is dropped."""
    reason = str(e.get("reason") or "-")
    for old in ("evicted: ", "swapped to host: "):
        reason = reason[len(old):] if reason.startswith(old) else reason
    return f"{e.get('model')} (instance {e.get('instance')}) to {e.get('to') or '?'}: {reason}"


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
@common.keep_alive_option
@click.option("--priority", type=click.IntRange(-1000, 1000), metavar="N",
              help="-1000..1000: when room is needed, lower priorities are evicted first [0].")
@click.option("--pin", is_flag=True, help="Never evict it, never let it expire (until 'llmctl unpin').")
@click.option("--dtype", type=click.Choice(["auto", "float32", "float16", "bfloat16"]),
              help="Compute dtype of this instance [the daemon's dtype].")
@click.option("--quant", type=click.Choice(["auto", "none", "int8", "int4"]),
              help="Weights: as stored (auto), dequantized to the dtype (none), or quantized at "
                   "load (int8, int4: group 32) [the daemon's quant, auto].")
@click.pass_context
def load(ctx, model, as_json, keep_alive, priority, pin, dtype, quant):
    """Load MODEL into the model table (no-op if it is already loaded; the memory settings
    given then apply to it).  A load that does not fit evicts idle, unpinned models of no
    higher priority, least recently used first, or is refused saying what holds the memory."""
    c = common.client(ctx)
    mem = {k: v for k, v in (("keep_alive", keep_alive), ("priority", priority), ("pin", pin or None),
                             ("dtype", dtype), ("quant", quant)) if v is not None}
    line = fmt.StatusLine(enabled=not as_json)
    line.update(f"loading {model}...")
    try:
        r = c.load(model, **mem)
    finally:
        line.clear()                       # the result (or the error) replaces the live line
    if as_json:
        return fmt.echo_json(r)
    for e in r.get("evicted") or []:       # 1.7: what this load displaced
        click.echo("evicted " + displaced_text(e))
    if r.get("paused_jobs"):
        click.echo("paused job " + ", ".join(map(str, r["paused_jobs"])) + " to make room")
    if r.get("adapter"):
        click.echo(adapter_line(r))
        return
    keep = "" if r.get("keep_alive") is None else f"; keep-alive {keep_alive_text(r)}"
    if r.get("already_loaded"):
        click.echo(f"{r['model']} already loaded (instance {r['id']}, {r['state']} on {r['device']}{keep})")
        return
    weights = f"{r['weights']} weights, " if r.get("weights") else ""
    click.echo(f"instance {r['id']}: {r['model']} {r['state']} on {r['device']} "
               f"({weights}{fmt.size(r['resident_bytes'])}, {r['load_ms'] / 1000:.2f}s{keep})")


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
    click.echo("unloaded instance " + ", ".join(map(str, r["unloaded"]))
               + (f" and the adapters attached to it: {', '.join(r['adapters'])}" if r.get("adapters") else ""))


@click.command()
@click.argument("target", metavar="MODEL|ID")
@click.option("--json", "as_json", is_flag=True, help="Print the reply as JSON.")
@click.pass_context
def pin(ctx, target, as_json):
    """Pin MODEL's instances (or instance ID): they are never evicted to make room and never
    unload when their keep-alive runs out."""
    _pin_reply(common.client(ctx).pin(target), target, "pinned", as_json)


@click.command()
@click.argument("target", metavar="MODEL|ID")
@click.option("--json", "as_json", is_flag=True, help="Print the reply as JSON.")
@click.pass_context
def unpin(ctx, target, as_json):
    """Unpin MODEL's instances (or instance ID): they may be evicted and expire again."""
    _pin_reply(common.client(ctx).unpin(target), target, "unpinned", as_json)


def _pin_reply(r: dict, target: str, verb: str, as_json: bool) -> None:
    """What pin/unpin print: the instances changed (the reply's ids, or its rows)."""
    if as_json:
        return fmt.echo_json(r)
    ids = r.get(verb, r.get("ids"))
    if ids is None:
        ids = [i["id"] for i in r.get("instances", [])] or ([r["id"]] if "id" in r else [])
    ids = [i["id"] if isinstance(i, dict) else i for i in ids]
    click.echo(f"{verb} instance " + ", ".join(map(str, ids)) if ids else f"{target} is not loaded")


COMMANDS = [status, free, ps, load, unload, pin, unpin]
