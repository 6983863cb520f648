"""The model table: the daemon's process table for loaded model instances.  Pure logic.

An instance is one copy of a model's weights on a device, with an id like a PID.  States::

    loading --> ready <--> busy          (busy while it has active requests)
       |          \\        /
       v           v      v
     failed ----> unloading --> (removed from the table)

Every state change goes through ``Instance.transition``, which refuses illegal ones.  The table
is touched only by the daemon's control loop thread, so it needs no lock.
"""
from __future__ import annotations

import enum
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


LEGAL = {
    State.LOADING: {State.READY, State.FAILED, State.UNLOADING},
    State.READY: {State.BUSY, State.UNLOADING},
    State.BUSY: {State.READY, State.UNLOADING},
    State.FAILED: {State.UNLOADING},
    State.UNLOADING: set(),
}


@dataclass
class Instance:
    id: int
    model: str                     # canonical name:tag it was loaded as
    digest: str                    # manifest digest: what exactly is loaded
    device: str
    uid: int | None
    state: State = State.LOADING
    reason: str = ""               # why it failed
    resident_bytes: int = 0
    active_requests: int = 0
    tokens_served: int = 0
    requests_served: int = 0
    loaded_at: float = field(default_factory=time.time)
    last_used: float = field(default_factory=time.time)
    engine: Any = None             # the engine thread once ready (opaque here)
    queued_requests: int = 0       # requests waiting for it to finish loading (instance manager counts)

    def transition(self, new: State, reason: str = "") -> None:
        if new not in LEGAL[self.state]:
            raise InvalidState(f"instance {self.id} cannot go from {self.state.value} to {new.value}")
        self.state = new
        if reason:
            self.reason = reason

    @property
    def serving(self) -> bool:
        return self.state in (State.READY, State.BUSY)

    def begin_request(self) -> None:
        if not self.serving:
            raise InvalidState(f"instance {self.id} is {self.state.value}, not serving")
        self.active_requests += 1
        self.last_used = time.time()
        if self.state is State.READY:
            self.transition(State.BUSY)

    def end_request(self, tokens: int) -> None:
        self.active_requests = max(0, self.active_requests - 1)
        self.tokens_served += tokens
        self.requests_served += 1
        self.last_used = time.time()
        if self.state is State.BUSY and self.active_requests == 0:
            self.transition(State.READY)

    def row(self) -> dict:
        return {"id": self.id, "model": self.model, "digest": self.digest, "state": self.state.value,
                "device": self.device, "resident_bytes": self.resident_bytes,
                "active_requests": self.active_requests, "queued_requests": self.queued_requests,
                "tokens_served": self.tokens_served, "requests_served": self.requests_served,
                "loaded_at": self.loaded_at, "last_used": self.last_used, "uid": self.uid,
                "reason": self.reason}


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
        """Ids of the instances of ``model`` (canonical name:tag), in id order."""
        return sorted(i.id for i in self._rows.values() if i.model == model)

    def usable(self, model: str, digest: str) -> Instance | None:
        """A loading or serving instance of exactly this model version (least busy first)."""
        cands = [i for i in self.for_model(model, digest)
                 if i.state in (State.LOADING, State.READY, State.BUSY)]
        return min(cands, key=lambda i: (i.state is State.LOADING, i.active_requests, i.id), default=None)

    def __iter__(self):
        return iter(sorted(self._rows.values(), key=lambda i: i.id))

    def __len__(self) -> int:
        return len(self._rows)

    def rows(self) -> list[dict]:
        return [i.row() for i in self]
