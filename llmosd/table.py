"""The model table: the daemon's process table for loaded model instances.  Pure logic.

An instance is one copy of a model's weights on a device, with an id like a PID.  States::

    loading --> ready <--> busy          (busy while it has active requests)
     |   ^        |
     |   |        v
     |   '---> swapped                 (swapped to the host tier; a swap-in loads it back,
     |                                  or, out of memory, leaves it there)
     v            |
   failed ----> unloading --> (removed from the table)
                 (ready, busy, loading and swapped go to unloading too)

Every state change goes through ``Instance.transition``, which refuses illegal ones.  The table
is touched only by the daemon's control loop thread, so it needs no lock.

Adapters (LoRA weights, classification heads) live inside their base's instance, the way a
forked process shares its parent's pages: an ``Attached`` row per adapter, keyed by the
adapter's manifest digest, ``loading`` while it is read and installed, then ``ready``/``busy``
like an instance.  An instance's ``resident_bytes`` is its base's plus its adapters'; its
request counts include the requests its adapters serve.

Memory (issue 12): an instance's ``tier`` is "device" while it loads or serves and "host" while
swapped (engine stopped, weights kept in host RAM); it has an ``estimate_bytes`` (before the
load), a ``keep_alive`` (seconds after its last request; -1 forever, 0 none), a ``priority``
and may be ``pinned``.  ``holders`` turns the table into ``mem.policy.Holder`` rows.

The paged KV cache (issue 13): an instance holds its pool (``kv_bytes``, allocated whole when
its engine starts, charged with its weights while on the device, not while swapped); its engine reports the pool's blocks and its
queue (``kv_blocks_total``, ``kv_blocks_used``, ``kv_block_size``, ``waiting``, ``running``),
shown in its row with ``weights`` (how the weights are held: "float32", "int8", "q4_1"...) and
the ``load_opts`` it was loaded with (dtype, quant).
"""
from __future__ import annotations

import enum
import itertools
import time
from dataclasses import dataclass, field
from typing import Any

from llmctl.errors import InstanceNotFound, InvalidState


class State(str, enum.Enum):
    LOADING = "loading"
    READY = "ready"
    BUSY = "busy"
    UNLOADING = "unloading"
    FAILED = "failed"
    SWAPPED = "swapped"


LEGAL = {
    State.LOADING: {State.READY, State.FAILED, State.UNLOADING, State.SWAPPED},   # a swap-in undone
    State.READY: {State.BUSY, State.UNLOADING, State.SWAPPED},
    State.SWAPPED: {State.LOADING, State.UNLOADING},
    State.BUSY: {State.READY, State.UNLOADING},
    State.FAILED: {State.UNLOADING},
    State.UNLOADING: set(),
}


_attach_tokens = itertools.count(1)


@dataclass
class Attached:
    """An adapter (or classifier head) installed on a base instance.  ``token`` is unique to
    this attach: the engine's answer to its install carries it back, so an answer to an
    earlier attach of the same digest (detached meanwhile) is told apart and ignored."""
    model: str                     # the adapter's canonical name:tag
    digest: str                    # its manifest digest: the key requests name it by
    uid: int | None
    kind: str = "adapter"          # adapter | classifier
    ready: bool = False            # installed on the engine (before: loading)
    resident_bytes: int = 0
    estimate_bytes: int = 0        # before it was read (admission charges this meanwhile)
    active_requests: int = 0
    tokens_served: int = 0
    requests_served: int = 0
    loaded_at: float = field(default_factory=time.time)
    last_used: float = field(default_factory=time.time)
    token: int = field(default_factory=lambda: next(_attach_tokens))

    @property
    def state(self) -> str:
        if not self.ready:
            return State.LOADING.value
        return (State.BUSY if self.active_requests else State.READY).value

    def row(self) -> dict:
        return {"model": self.model, "digest": self.digest, "kind": self.kind, "state": self.state,
                "resident_bytes": self.resident_bytes, "estimate_bytes": self.estimate_bytes,
                "active_requests": self.active_requests, "requests_served": self.requests_served, "tokens_served": self.tokens_served,
                "loaded_at": self.loaded_at, "last_used": self.last_used, "uid": self.uid}


@dataclass
class Instance:
    id: int
    model: str                     # canonical name:tag it was loaded as
    digest: str                    # manifest digest: what exactly is loaded
    device: str
    uid: int | None
    state: State = State.LOADING
    reason: str = ""               # why it failed
    base_bytes: int = 0            # the base model's own tensors (see resident_bytes)
    active_requests: int = 0
    tokens_served: int = 0
    requests_served: int = 0
    loaded_at: float = field(default_factory=time.time)
    last_used: float = field(default_factory=time.time)
    engine: Any = None             # the engine thread once ready (opaque here)
    queued_requests: int = 0       # requests waiting for it to finish loading (instance manager counts)
    adapters: dict[str, Attached] = field(default_factory=dict)   # digest -> adapter, attach order
    # memory (issue 12)
    estimate_bytes: int = 0        # the base's estimate before its load (corrected)
    pinned: bool = False           # never evicted, never expires
    priority: int = 0              # eviction class: lower leaves first
    keep_alive: float = 300.0      # seconds idle before it unloads; -1 forever; 0 at once
    load_ms: float | None = None   # how long its load took
    swap_in_ms: float | None = None   # how long its last swap-in took
    swaps: int = 0                 # times swapped out to the host tier
    # the engine (issue 13)
    kv_bytes: int = 0              # its KV pool (estimated before the load, then allocated)
    kv_blocks_total: int = 0
    kv_blocks_used: int = 0
    kv_block_size: int = 0
    waiting: int = 0               # requests queued in its engine (not yet running)
    running: int = 0               # sequences running in its engine (prefilling or decoding)
    weights: str | None = None     # how its weights are held (quant.describe), once loaded
    load_opts: dict = field(default_factory=dict)   # dtype, quant it was loaded with

    def engine_stats(self, st: dict) -> None:
        """Take an engine's ``blocks`` report (unknown keys ignored)."""
        for k in ("kv_blocks_total", "kv_blocks_used", "kv_block_size", "waiting", "running"):
            if isinstance(st.get(k), int):
                setattr(self, k, st[k])

    def kv_row(self) -> dict:
        """The engine's fields of its row (status and ps)."""
        return {"kv_blocks_total": self.kv_blocks_total, "kv_blocks_used": self.kv_blocks_used,
                "kv_block_size": self.kv_block_size, "kv_bytes": self.kv_bytes, "waiting": self.waiting,
                "running": self.running, "weights": self.weights}

    @property
    def tier(self) -> str:
        """"host" while swapped out, else "device" (loading, serving, leaving)."""
        return "host" if self.state is State.SWAPPED else "device"

    @property
    def idle(self) -> bool:
        """Nothing runs on it or waits for it, and it is serving or swapped: evictable (unless
        pinned) and subject to its keep-alive."""
        return (self.state in (State.READY, State.SWAPPED) and not self.active_requests
                and not self.queued_requests and all(a.ready for a in self.adapters.values()))

    def expires_at(self) -> float | None:
        """When its keep-alive runs out (epoch s), if it is idle, unpinned and not kept forever."""
        if self.pinned or self.keep_alive < 0 or not self.idle:
            return None
        return self.last_used + self.keep_alive

    def charge_bytes(self, tier: str | None = None) -> int:
        """What it holds for the memory manager on ``tier`` (default: its own): the base
        (measured once loaded, else the estimate) and each adapter (measured once installed,
        else its estimate), plus its KV pool on the device only (swapped out, the pool is
        dropped; a swap-in allocates it again)."""
        base = self.base_bytes if self.base_bytes else self.estimate_bytes
        pool = self.kv_bytes if (tier or self.tier) == "device" else 0
        return base + pool + sum(a.resident_bytes if a.ready else a.estimate_bytes
                                 for a in self.adapters.values())

    @property
    def resident_bytes(self) -> int:
        """The base's bytes plus those of every adapter installed on it."""
        return self.base_bytes + sum(a.resident_bytes for a in self.adapters.values())

    @resident_bytes.setter
    def resident_bytes(self, n: int) -> None:
        self.base_bytes = n

    def attach(self, model: str, digest: str, uid: int | None, kind: str = "adapter") -> Attached:
        """Add an adapter row (loading); the one already there if this digest is attached."""
        if digest not in self.adapters:
            self.adapters[digest] = Attached(model, digest, uid, kind)
        return self.adapters[digest]

    def detach(self, digest: str) -> Attached | None:
        return self.adapters.pop(digest, None)

    def adapter_named(self, model: str) -> Attached | None:
        """The attached adapter loaded as ``model`` (canonical name:tag), if any."""
        return next((a for a in self.adapters.values() if a.model == model), None)

    def attached(self, model: str, digest: str | None = None) -> Attached | None:
        """The adapter of manifest ``digest`` if attached, else the one attached as ``model``."""
        return (self.adapters.get(digest) if digest is not None else None) or self.adapter_named(model)

    def transition(self, new: State, reason: str = "") -> None:
        if new not in LEGAL[self.state]:
            raise InvalidState(f"instance {self.id} cannot go from {self.state.value} to {new.value}")
        self.state = new
        if reason:
            self.reason = reason

    @property
    def serving(self) -> bool:
        return self.state in (State.READY, State.BUSY)

    def begin_request(self, adapter: str | None = None) -> None:
        """One more active request, on the base alone or with the attached ``adapter`` (which
        must be installed)."""
        if not self.serving:
            raise InvalidState(f"instance {self.id} is {self.state.value}, not serving")
        a = None
        if adapter is not None:
            a = self.adapters.get(adapter)
            if a is None or not a.ready:
                raise InvalidState(f"adapter {adapter} is not installed on instance {self.id}")
        self.active_requests += 1
        self.last_used = time.time()
        if a is not None:
            a.active_requests += 1
            a.last_used = self.last_used
        if self.state is State.READY:
            self.transition(State.BUSY)

    def end_request(self, tokens: int, adapter: str | None = None) -> None:
        self.active_requests = max(0, self.active_requests - 1)
        self.tokens_served += tokens
        self.requests_served += 1
        self.last_used = time.time()
        a = self.adapters.get(adapter) if adapter is not None else None
        if a is not None:                 # (a force-detached adapter's requests count here only)
            a.active_requests = max(0, a.active_requests - 1)
            a.tokens_served += tokens
            a.requests_served += 1
            a.last_used = self.last_used
        if self.state is State.BUSY and self.active_requests == 0:
            self.transition(State.READY)

    def row(self) -> dict:
        return {"id": self.id, "model": self.model, "digest": self.digest, "state": self.state.value,
                "device": self.device, "resident_bytes": self.resident_bytes,
                "active_requests": self.active_requests, "queued_requests": self.queued_requests,
                "tokens_served": self.tokens_served, "requests_served": self.requests_served,
                "loaded_at": self.loaded_at, "last_used": self.last_used, "uid": self.uid,
                "reason": self.reason, "adapters": [a.row() for a in self.adapters.values()],
                "tier": self.tier, "estimate_bytes": self.estimate_bytes + sum(
                    a.estimate_bytes for a in self.adapters.values()),
                "pinned": self.pinned, "priority": self.priority, "keep_alive": self.keep_alive,
                "expires_at": self.expires_at(), "load_ms": self.load_ms,
                "swap_in_ms": self.swap_in_ms, "swaps": self.swaps, **self.kv_row()}


class ModelTable:
    def __init__(self):
        self._next = 1
        self._rows: dict[int, Instance] = {}

    def add(self, model: str, digest: str, device: str, uid: int | None) -> Instance:
        inst = Instance(self._next, model, digest, device, uid)
        self._rows[inst.id] = inst
        self._next += 1
        return inst

    def remove(self, iid: int) -> None:
        inst = self._rows.get(iid)
        if inst is not None and inst.state not in (State.UNLOADING, State.FAILED):
            raise InvalidState(f"instance {iid} must be unloading to leave the table (it is {inst.state.value})")
        self._rows.pop(iid, None)

    def get(self, iid: int) -> Instance:
        try:
            return self._rows[iid]
        except KeyError:
            raise InstanceNotFound(f"no instance with id {iid}") from None

    def for_model(self, model: str, digest: str | None = None) -> list[Instance]:
        return [i for i in self._rows.values()
                if i.model == model and (digest is None or i.digest == digest)]

    def ids_of(self, model: str) -> list[int]:
        """Ids of the instances of ``model`` (canonical name:tag), or that have the adapter
        ``model`` attached, in id order."""
        return sorted(i.id for i in self._rows.values()
                      if i.model == model or i.adapter_named(model) is not None)

    def with_adapter(self, model: str, digest: str | None = None) -> list[Instance]:
        """The instances that have the adapter ``model`` attached (loading or installed), by
        the name it was attached as, or by its manifest ``digest`` (whatever tag attached it)."""
        return [i for i in self if i.attached(model, digest) is not None]

    def usable(self, model: str, digest: str) -> Instance | None:
        """A loading, serving or swapped instance of exactly this model version (serving and
        least busy first, then loading, then swapped)."""
        order = {State.READY: 0, State.BUSY: 0, State.LOADING: 1, State.SWAPPED: 2}
        cands = [i for i in self.for_model(model, digest) if i.state in order]
        return min(cands, key=lambda i: (order[i.state], i.active_requests, i.id), default=None)

    def holders(self, busy: frozenset = frozenset()) -> list:
        """The instances holding memory as ``mem.policy.Holder`` rows (failed ones hold
        nothing); those whose ids are in ``busy`` count as not idle (never chosen)."""
        from llmosd.mem.policy import Holder
        return [Holder("instance", i.id, i.model, i.device, i.tier, i.charge_bytes(), i.uid,
                       i.pinned, i.priority, i.last_used, i.idle and i.id not in busy)
                for i in self if i.state is not State.FAILED]

    def __iter__(self):
        return iter(sorted(self._rows.values(), key=lambda i: i.id))

    def __len__(self) -> int:
        return len(self._rows)

    def rows(self) -> list[dict]:
        return [i.row() for i in self]
