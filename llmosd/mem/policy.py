"""Admission and eviction decisions: tables of holders in, plans out.  Pure: no torch, no daemon.

A *holder* is one thing holding memory on a device: a loaded instance (on the device tier, or
swapped out to the host tier) or a job's reservation.  ``plan_admission`` decides whether a need
fits a device's budget and, when it does not, which holders leave to make room and how:

- idle, unpinned instances whose priority is at most the requester's go first, lowest priority
  class first, then least recently used (then lowest id, so plans are deterministic); each one
  is *swapped* to the host tier when the host budget has room for it, else *unloaded*;
- then preemptible running jobs (same order), *paused*;
- pinned instances, busy instances (active or queued requests, loading), jobs that are not
  preemptible, and anything of a higher priority than the requester's are never chosen.

When even that is not enough, the plan is refused with a message naming the bytes needed, the
bytes free, the budget and every holder on the device (bytes, owner uid, pinned), and a hint.
A need larger than the whole budget is refused at once, whatever could be evicted.

The instance manager and the job runner carry the plans out; this module only decides.
"""
from __future__ import annotations

from dataclasses import dataclass

__all__ = ["Action", "Holder", "Plan", "expired", "plan_admission", "size_text", "usage"]


@dataclass(frozen=True)
class Holder:
    """One thing holding memory on a device (see the module docstring)."""
    kind: str                       # "instance" | "job" (other kinds: reservations, never chosen)
    id: int
    name: str                       # model name:tag (a job: the model it makes)
    device: str                     # "cpu", "cuda:0", ...
    tier: str                       # "device" | "host"
    bytes: int
    uid: int | None = None          # owner
    pinned: bool = False
    priority: int = 0
    last_used: float = 0.0          # epoch seconds of its last use (request end, load)
    idle: bool = True               # instance: no active/queued requests and serving;
                                    # job: False unless preemptible and running
    preemptible: bool = False       # jobs

    def label(self) -> str:
        """'instance 3 smol:latest' for messages."""
        return f"{self.kind} {self.id}" + (f" {self.name}" if self.name else "")


@dataclass(frozen=True)
class Action:
    """One step of a plan: ``kind`` "swap" (device -> host tier), "unload" (-> store) or
    "pause" (a preemptible job); ``reason`` says why, for logs and the eviction list."""
    kind: str
    holder: Holder
    reason: str


@dataclass(frozen=True)
class Plan:
    """What admission decided.  ``ok``: the need fits once ``actions`` are carried out (no
    actions: it fits now).  Not ok: ``message`` says why (bytes needed, free, budget, holders)
    and ``hint`` what the user can do; raise ``error()`` toward the client."""
    ok: bool
    actions: tuple[Action, ...]
    need: int
    free: int
    budget: int
    message: str
    hint: str = ""                  # added to the design's fields: the OutOfMemory hint

    def error(self):
        """The OutOfMemory error of a refused plan (message and hint)."""
        from llmctl.errors import OutOfMemory
        return OutOfMemory(self.message, hint=self.hint or None)


def size_text(n: int) -> str:
    """Bytes for people: '512 B', '300.0 MiB', '1.2 GiB' (binary units, as the budgets)."""
    v = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(v) < 1024 or unit == "TiB":
            return f"{int(v)} B" if unit == "B" else f"{v:.1f} {unit}"
        v /= 1024
    return ""


def _resident(device: str, holders: list[Holder]) -> list[Holder]:
    return [h for h in holders if h.device == device and h.tier == "device"]


def _holder_text(h: Holder) -> str:
    extra = [f"uid {h.uid}" if h.uid is not None else "uid ?"]
    if h.pinned:
        extra.append("pinned")
    if h.kind == "instance" and not h.idle:
        extra.append("busy")
    if h.priority:
        extra.append(f"priority {h.priority}")
    return f"{h.label()} {size_text(h.bytes)} ({', '.join(extra)})"


def _section(device: str) -> str:
    """The config section (and --budget name) of a device: cuda:0 -> cuda0 ("cuda" -> cuda0)."""
    return "cuda0" if device == "cuda" else device.replace(":", "")


def _candidates(resident: list[Holder], priority: int) -> list[Holder]:
    """Who may leave, in the order they leave: idle unpinned instances, then preemptible
    running jobs; each group by (priority, last_used, id); nothing above ``priority``."""
    def order(h):
        return (h.priority, h.last_used, h.id)
    inst = [h for h in resident if h.kind == "instance" and h.idle and not h.pinned
            and h.priority <= priority]
    jobs = [h for h in resident if h.kind == "job" and h.preemptible and h.idle and not h.pinned
            and h.priority <= priority]
    return sorted(inst, key=order) + sorted(jobs, key=order)


def plan_admission(need: int, device: str, priority: int, holders: list[Holder],
                   budget: int, host_budget: int, host_used: int, *, for_what: str) -> Plan:
    """Decide whether ``need`` bytes fit on ``device`` (its device tier may use ``budget``),
    and what must leave first (see the module docstring).  ``holders``: everything holding
    memory (any device, any tier; those of other devices are ignored); ``host_used``: bytes
    the host tier holds now, of ``host_budget``.  ``for_what`` names the requester in the
    message ("loading smol:latest", "job 4 (train tiny)")."""
    resident = _resident(device, holders)
    used = sum(h.bytes for h in resident)
    free = max(0, budget - used)
    raise_hint = f"raise the budget with llmosd --budget {_section(device)}=SIZE (or [devices.{_section(device)}] budget in llmosd.toml)"
    if need > budget:
        return Plan(False, (), need, free, budget,
                    f"{for_what} needs {size_text(need)} on {device}, more than the whole budget "
                    f"of {device} ({size_text(budget)})",
                    hint=f"use a smaller model or dtype, or {raise_hint}")
    if need <= free:
        return Plan(True, (), need, free, budget, "")
    room, host_free, actions = free, max(0, host_budget - host_used), []
    for h in _candidates(resident, priority):
        if room >= need:
            break
        why = f"room for {for_what}"
        if h.kind == "job":
            actions.append(Action("pause", h, f"preempted: {why}"))
        elif h.bytes <= host_free:
            host_free -= h.bytes
            actions.append(Action("swap", h, f"swapped to host: {why}"))
        else:
            actions.append(Action("unload", h, f"evicted: {why}"))
        room += h.bytes
    if room >= need:
        return Plan(True, tuple(actions), need, free, budget, "")
    held = ", ".join(_holder_text(h) for h in sorted(resident, key=lambda h: (-h.bytes, h.kind, h.id)))
    msg = (f"{for_what} needs {size_text(need)} on {device}, {size_text(free)} free of "
           f"{size_text(budget)}; held by: {held or 'nothing'}")
    if room > free:
        msg += f" (evicting what policy allows would free only {size_text(room)})"
    return Plan(False, (), need, free, budget, msg,
                hint=f"unpin or unload an instance (llmctl unpin MODEL, llmctl unload ID), wait for "
                     f"busy ones, or {raise_hint}")


def expired(instances: list[Holder], keep_alive: dict[int, float], now: float) -> list[int]:
    """Ids of the instances whose keep-alive has run out at ``now``, oldest first: idle and
    unpinned ones (either tier) whose ``keep_alive[id]`` seconds have passed since
    ``last_used``.  A negative keep-alive never runs out; 0 runs out as soon as the instance
    is idle; an instance without an entry never runs out."""
    out = []
    for h in instances:
        k = keep_alive.get(h.id)
        if h.kind != "instance" or not h.idle or h.pinned or k is None or k < 0:
            continue
        if now - h.last_used >= k:
            out.append(h)
    return [h.id for h in sorted(out, key=lambda h: (h.last_used, h.id))]


def usage(device: str, holders: list[Holder], budget: int, host_budget: int) -> dict:
    """One device's row for status/top: {"device", "budget", "instances", "jobs", "reserved",
    "free", "host_budget", "host_used"} (bytes).  ``instances``/``jobs``: device-tier bytes of
    those kinds; ``reserved``: device-tier bytes of any other kind (reservations such as a
    load in progress or KV cache charged apart); ``host_used``: the host tier, all devices."""
    resident = _resident(device, holders)
    inst = sum(h.bytes for h in resident if h.kind == "instance")
    jobs = sum(h.bytes for h in resident if h.kind == "job")
    reserved = sum(h.bytes for h in resident) - inst - jobs
    host_used = sum(h.bytes for h in holders if h.tier == "host")
    return {"device": device, "budget": budget, "instances": inst, "jobs": jobs,
            "reserved": reserved, "free": max(0, budget - inst - jobs - reserved),
            "host_budget": host_budget, "host_used": host_used}
