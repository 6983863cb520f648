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

When even that is not enough, the plan is refused (``OutOfMemory``: it may fit later) with a
message naming the bytes needed, the bytes free, the budget and every holder on the device (bytes,
owner, and why it could not leave: pinned, busy, a higher priority...), and a hint built from
those reasons.  A need larger than the whole budget is refused at once, whatever could be
evicted, as ``InvalidArgument`` (it can never fit: retrying is useless); its hint names the fix.

Sizes in messages are written as ``llmctl``'s tables write them (``llmctl.format.size``:
decimal units, "16.0 MB"), so that a refusal and ``llmctl free`` read alike.

The instance manager and the job runner carry the plans out; this module only decides.
"""
from __future__ import annotations

import functools
import pwd
from dataclasses import dataclass

__all__ = ["Action", "Holder", "Plan", "expired", "never_fits", "owner_text", "plan_admission",
           "size_text", "sizes_text", "usage"]


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
    and ``hint`` what the user can do; raise ``error()`` toward the client.  ``never``: the
    need is more than the whole budget, so no eviction and no wait can make it fit."""
    ok: bool
    actions: tuple[Action, ...]
    need: int
    free: int
    budget: int
    message: str
    hint: str = ""                  # added to the design's fields: the refusal's hint
    never: bool = False             # added: more than the whole budget

    def error(self):
        """The error of a refused plan (message and hint): ``InvalidArgument`` (exit 65) when
        it can never fit, ``OutOfMemory`` (75, "try again later") when it does not fit now."""
        from llmctl.errors import InvalidArgument, OutOfMemory
        return (InvalidArgument if self.never else OutOfMemory)(self.message, hint=self.hint or None)


def size_text(n: int) -> str:
    """Bytes for people, as ``llmctl``'s tables write them (a mirror of ``llmctl.format.size``,
    which the daemon may not import): '512 B', '300.0 MB', '1.2 GB' (decimal units)."""
    v = float(n)
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(v) < 1000 or unit == "TB":
            return f"{v:.0f} B" if unit == "B" else f"{v:.1f} {unit}"
        v /= 1000
    return ""


def sizes_text(*ns: int) -> tuple[str, ...]:
    """``size_text`` of each of ``ns``, but in plain bytes ('1001 B') when two different
    numbers would read the same once rounded ('1.0 KB' needed of a '1.0 KB' budget)."""
    texts = tuple(size_text(n) for n in ns)
    if len(set(texts)) < len(set(ns)):        # size_text is a function: some two collide
        return tuple(f"{n} B" for n in ns)
    return texts


@functools.lru_cache(maxsize=256)
def _user_name(uid: int) -> str | None:
    try:
        return pwd.getpwuid(uid).pw_name
    except (KeyError, OverflowError, ValueError):
        return None


def owner_text(uid: int | None) -> str:
    """A holder's owner for messages: 'alice, uid 1000', 'uid 1234' when the uid has no
    name here, 'owner unknown' without a uid.  (Names are cached: looked up once per uid.)"""
    if uid is None:
        return "owner unknown"
    name = _user_name(int(uid))
    return f"{name}, uid {uid}" if name else f"uid {uid}"


def _resident(device: str, holders: list[Holder]) -> list[Holder]:
    return [h for h in holders if h.device == device and h.tier == "device"]


def _stays(h: Holder, priority: int) -> str:
    """Why ``h`` may not leave for a requester of ``priority`` ('' when it may)."""
    if h.kind not in ("instance", "job"):
        return "in use"                          # a load in progress, a reservation
    if h.pinned:
        return "pinned"
    if h.kind == "job" and not h.preemptible:
        return "a job, not preemptible"
    if not h.idle:
        return "busy" if h.kind == "instance" else "not preemptible now"
    if h.priority > priority:
        return f"priority {h.priority}, above the requested {priority}"
    return ""


def _holder_text(h: Holder, priority: int) -> str:
    """'instance 3 smol:latest 2.1 GB (alice, uid 1000, pinned)': bytes, owner, and why it
    stays (or that it may be evicted)."""
    extra = [owner_text(h.uid)] if h.kind in ("instance", "job") else []
    why = _stays(h, priority)
    extra.append(why or (f"priority {h.priority}, evictable" if h.priority else "evictable"))
    return f"{h.label()} {size_text(h.bytes)} ({', '.join(extra)})"


def _refusal_hint(blockers: list[Holder], priority: int, device: str, how: str) -> str:
    """What the user can do about a refusal, from why each holder stayed (``how``: the
    command that asked, "load", "train", "finetune")."""
    parts = []
    above = [h for h in blockers if _stays(h, priority).startswith("priority")]
    if above:
        top = max(h.priority for h in above)
        names = " and ".join(h.label() for h in above[:3]) + (" ..." if len(above) > 3 else "")
        parts.append(f"{how} with --priority {top} or higher to displace {names}")
    pinned = [h for h in blockers if h.pinned]
    if pinned:
        parts.append("unpin " + ", ".join(h.name or h.label() for h in pinned[:3])
                     + " (llmctl unpin MODEL) or unload it (llmctl unload ID)")
    if any(_stays(h, priority) == "busy" for h in blockers):
        parts.append("wait for the busy instances' requests to end")
    jobs = [h for h in blockers if h.kind == "job"]
    if jobs:
        parts.append("pause or cancel " + ", ".join(h.label() for h in jobs[:3])
                     + " (llmctl pause ID)")
    parts.append(f"raise the budget with llmosd --budget {_section(device)}=SIZE "
                 f"(or [devices.{_section(device)}] budget in llmosd.toml)")
    return "; or ".join(parts)


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


LOAD_FIX = "load it with a smaller dtype (llmosd --dtype bfloat16: half of float32's bytes)"


def never_fits(need: int, device: str, budget: int, for_what: str, fix: str = LOAD_FIX,
               about: bool = False) -> tuple[str, str]:
    """(message, hint) of a need larger than ``device``'s whole ``budget``: it can never fit
    there, whatever leaves.  ``fix``: how the requester itself could need less (a load: a
    smaller dtype; a job: smaller batches...), offered with a bigger budget; ``about``: the
    need is an estimate not yet measured."""
    sec = _section(device)
    need_t, budget_t = sizes_text(need, budget)
    return (f"{for_what} needs {'about ' if about else ''}{need_t} on {device}, more "
            f"than the whole budget of {device} ({budget_t}): it can never fit there",
            f"give {device} a bigger budget (llmosd --budget {sec}=SIZE, or [devices.{sec}] budget "
            f"in llmosd.toml), or {fix}")


def plan_admission(need: int, device: str, priority: int, holders: list[Holder],
                   budget: int, host_budget: int, host_used: int, *, for_what: str,
                   how: str = "load", fix: str = LOAD_FIX) -> Plan:
    """Decide whether ``need`` bytes fit on ``device`` (its device tier may use ``budget``),
    and what must leave first (see the module docstring).  ``holders``: everything holding
    memory (any device, any tier; those of other devices are ignored); ``host_used``: bytes
    the host tier holds now, of ``host_budget``.  ``for_what`` names the requester in the
    message ("loading smol:latest", "job 4 (train tiny)"); ``how`` the command a refusal's
    hint tells to run with a higher --priority ("load", "train", "finetune"); ``fix`` how the
    requester could need less, for a need above the whole budget (see ``never_fits``)."""
    resident = _resident(device, holders)
    used = sum(h.bytes for h in resident)
    free = max(0, budget - used)
    if need > budget:
        msg, hint = never_fits(need, device, budget, for_what, fix)
        return Plan(False, (), need, free, budget, msg, hint=hint, never=True)
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
    ordered = sorted(resident, key=lambda h: (-h.bytes, h.kind, h.id))
    held = ", ".join(_holder_text(h, priority) for h in ordered)
    need_t, free_t, budget_t = sizes_text(need, free, budget)
    msg = (f"{for_what} needs {need_t} on {device}, {free_t} free of {budget_t}; "
           f"held by: {held or 'nothing'}")
    if room > free:
        msg += f" (evicting what may leave would free only {size_text(room)})"
    blockers = [h for h in ordered if _stays(h, priority)]
    return Plan(False, (), need, free, budget, msg,
                hint=_refusal_hint(blockers, priority, device, how))


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
