"""``llmctl top``: a live, full-screen view of the daemon's memory and work, redrawn every
second: devices (budget, used, free, the host tier), instances (tier, state, requests,
tokens/s, resident bytes, keep-alive left, pins) with their adapters under them, recent
evictions, and jobs.  ``q`` or Ctrl-C quits and gives the terminal back as it was.

``--once`` prints one frame; ``--once --json`` prints what the frame is drawn from, as the
daemon gave it: {"devices", "instances", "evicted", "jobs"}.  Plain ANSI, the standard
library's termios: no curses, no extra dependency.
"""
from __future__ import annotations

import os
import shutil
import sys
import time

import click

from .. import format as fmt
from . import common
from .table import ADAPTER_MARK, device_rows, eviction_line, keep_alive_text

SNAPSHOT_KEYS = ("devices", "instances", "evicted", "jobs")
EVICTIONS_SHOWN = 5


def snapshot(c) -> dict:
    """One sample of the daemon: the status reply's devices, the ps reply's instances, recent
    evictions and unfinished jobs (an older daemon's missing fields: empty lists)."""
    status, body = c.status(), c._call("ps")
    return {"devices": status.get("devices") or [], "instances": body.get("instances") or [],
            "evicted": body.get("evicted") or [], "jobs": body.get("jobs") or []}


class Rates:
    """Tokens per second per instance, from its tokens_served between two samples (None for
    an instance seen for the first time)."""

    def __init__(self):
        self._prev: dict[int, tuple[int, float]] = {}

    def update(self, instances: list[dict], t: float) -> dict[int, float | None]:
        """The rates at monotonic time ``t``; remembers this sample for the next call."""
        out = {}
        for i in instances:
            p = self._prev.get(i["id"])
            dt = None if p is None else t - p[1]
            out[i["id"]] = None if not dt or dt <= 0 else max(0, i.get("tokens_served", 0) - p[0]) / dt
        self._prev = {i["id"]: (i.get("tokens_served", 0), t) for i in instances}
        return out


DEVICE_HEADERS = ["DEVICE", "BUDGET", "USED", "FREE", "INSTANCES", "JOBS", "RESERVED", "OTHER"]
INSTANCE_HEADERS = ["ID", "MODEL", "TIER", "STATE", "ACTIVE", "QUEUED", "TOK/S", "RESIDENT", "KEEP-ALIVE", "PIN"]
JOB_HEADERS = ["JOB", "KIND", "MODEL", "STATE", "STEP", "REASON"]


def device_lines(devices: list[dict]) -> list[list]:
    """The devices section: what status shows, with USED (instances + jobs + reserved, and its
    share of the budget) next to the budget, and OTHER (the cpu: the daemon's RSS the budget
    does not account)."""
    rows = []
    for d, (name, budget, inst, jobs, reserved, free, other) in zip(devices + [None], device_rows(devices)):
        if d is None:                      # the host tier: used is what swapped instances hold
            h = devices[0]
            rows.append([name, budget, _used(h.get("host_used"), h.get("host_budget")), free, inst, jobs,
                         reserved, other])
            continue
        used = sum(d.get(k) or 0 for k in ("instances", "jobs", "reserved"))
        rows.append([name, budget, _used(used, d.get("budget")), free, inst, jobs, reserved, other])
    return rows


def _used(used: int | None, budget: int | None) -> str:
    if used is None:
        return "-"
    return fmt.size(used) + (f" ({100 * used / budget:.0f}%)" if budget else "")


def instance_lines(instances: list[dict], rates: dict, now: float) -> list[list]:
    """One row per instance and its adapters indented under it."""
    rows = []
    for i in instances:
        rate = rates.get(i["id"])
        rows.append([i["id"], i["model"], i.get("tier") or "-", i["state"], i.get("active_requests", 0),
                     i.get("queued_requests", 0), "-" if rate is None else f"{rate:.1f}",
                     fmt.size(i.get("resident_bytes")), keep_alive_text(i, now), "yes" if i.get("pinned") else "-"])
        for a in i.get("adapters") or []:
            rows.append(["", ADAPTER_MARK + a["model"], "", a.get("state", "-"), a.get("active_requests", 0),
                         "", "", fmt.size(a.get("resident_bytes")), "", ""])
    return rows


def job_lines(jobs: list[dict]) -> list[list]:
    return [[j.get("job_id"), j.get("kind") or "-", j.get("model") or "-", j.get("state") or "-",
             fmt.steps(j.get("step"), j.get("max_steps")), " ".join(str(j.get("reason") or "-").split())]
            for j in jobs]


def render(snap: dict, rates: dict | None = None, now: float | None = None,
           width: int | None = None, height: int | None = None) -> list[str]:
    """The frame's lines, cut to ``width`` columns and ``height`` lines when given (the last
    line then says how many were left out)."""
    now = time.time() if now is None else now
    inst, jobs, ev = snap["instances"], snap["jobs"], snap["evicted"]
    lines = [f"llmosd top - {time.strftime('%H:%M:%S', time.localtime(now))}   "
             f"{len(inst)} instance(s), {sum(i.get('active_requests', 0) for i in inst)} active request(s), "
             f"{len(jobs)} job(s)   (q quits)", ""]
    if snap["devices"]:
        lines += fmt.table(DEVICE_HEADERS, device_lines(snap["devices"])).splitlines() + [""]
    lines += fmt.table(INSTANCE_HEADERS, instance_lines(inst, rates or {}, now)).splitlines()
    if ev:
        lines += ["", "recent evictions:"] + ["  " + eviction_line(e, now) for e in ev[-EVICTIONS_SHOWN:]]
    if jobs:
        lines += [""] + fmt.table(JOB_HEADERS, job_lines(jobs)).splitlines()
    if width:
        lines = [ln[:width] for ln in lines]
    if height and len(lines) > height:
        cut = len(lines) - height + 1
        lines = lines[:height - 1] + [f"... {cut} more line(s): enlarge the window"[:width or None]]
    return lines


class Screen:
    """The terminal while top runs: the alternate screen, no cursor, keys read one by one
    (cbreak: Ctrl-C still interrupts).  Leaving restores all of it, whatever happened."""

    def __init__(self, out, inp):
        self.out, self.inp, self.fd, self.saved = out, inp, None, None

    def __enter__(self) -> "Screen":
        try:
            if self.inp.isatty():
                import termios
                import tty
                self.fd = self.inp.fileno()
                self.saved = termios.tcgetattr(self.fd)
                tty.setcbreak(self.fd)
        except (OSError, ValueError, AttributeError, ImportError):
            self.fd = None
        self._write("\x1b[?1049h\x1b[?25l")
        return self

    def __exit__(self, *exc) -> None:
        self._write("\x1b[?25h\x1b[?1049l")
        if self.saved is not None:
            import termios
            termios.tcsetattr(self.fd, termios.TCSADRAIN, self.saved)

    def draw(self, lines: list[str]) -> None:
        """Redraw in place: home, each line cleared to its end, the rest of the screen cleared."""
        self._write("\x1b[H" + "\x1b[K\n".join(lines) + "\x1b[K\x1b[J")

    def key(self, timeout: float) -> str | None:
        """A key pressed within ``timeout`` seconds (None: none, or no keyboard)."""
        if self.fd is None:
            time.sleep(timeout)
            return None
        import select
        ready, _, _ = select.select([self.fd], [], [], timeout)
        return os.read(self.fd, 32).decode(errors="replace") if ready else None

    def _write(self, s: str) -> None:
        self.out.write(s)
        self.out.flush()


def live(c, interval: float, out=None, inp=None) -> None:
    """Redraw every ``interval`` seconds until q (a key pressed redraws at once)."""
    out, inp = out or sys.stdout, inp or sys.stdin
    rates = Rates()
    with Screen(out, inp) as screen:
        while True:
            snap = snapshot(c)
            r = rates.update(snap["instances"], time.monotonic())
            size = shutil.get_terminal_size()
            screen.draw(render(snap, r, time.time(), size.columns, size.lines))
            key = screen.key(interval)
            if key and key[:1] in ("q", "Q"):
                return


@click.command()
@click.option("--once", is_flag=True, help="Print one frame and exit.")
@click.option("--json", "as_json", is_flag=True,
              help="Print one sample, {devices, instances, evicted, jobs} as the daemon gives them "
                   "(implies --once).")
@click.option("-d", "--interval", type=click.FloatRange(0.1, 3600), default=1.0, show_default=True,
              metavar="SECONDS", help="Seconds between refreshes.")
@click.pass_context
def top(ctx, once, as_json, interval):
    """A live view of devices (budget, used, free, host tier), instances (tier, state,
    requests, tokens/s, resident bytes, keep-alive left, pins), recent evictions and jobs,
    refreshed every second.  q or Ctrl-C quits."""
    once = once or as_json                # --json prints one sample: a script wants no redraws
    if not once and not sys.stdout.isatty():
        raise click.UsageError("top redraws a terminal; in a script or a pipe use --once (or --once --json)")
    c = common.client(ctx)
    if once:
        snap = snapshot(c)
        if as_json:
            return fmt.echo_json({k: snap[k] for k in SNAPSHOT_KEYS})
        click.echo("\n".join(render(snap)))
        return
    try:
        live(c, interval)
    except KeyboardInterrupt:             # Ctrl-C quits like q: the terminal is restored by then
        pass


COMMANDS = [top]
