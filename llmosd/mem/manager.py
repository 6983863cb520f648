"""The memory manager: the ledger of who holds how many bytes where, the budgets, admission
plans on that ledger, the estimator, and the recent evictions.  Runs on the control loop; no
torch (device sizes come in as numbers or a callable).

The manager decides and keeps account; it moves nothing.  The instance manager and the job
runner ``charge`` what they hold (an estimate while loading, the measured bytes after),
``uncharge`` it when freed (listeners registered with ``on_freed`` then run: paused jobs may
resume; they run too when a charge leaves fewer bytes on a device: measured below the estimate,
swapped to the host tier), ask for a ``plan`` before a load or a job start and carry its actions out.
"""
from __future__ import annotations

import logging
import time
from collections import deque
from typing import Callable

from llmosd.mem import policy
from llmosd.mem.budgets import budgets_from_config, check_budgets, default_budget
from llmosd.mem.estimate import Estimator
from llmosd.mem.policy import Holder, Plan

log = logging.getLogger("llmosd.mem")

RECENT_EVICTIONS = 20

__all__ = ["MemoryManager", "budgets_from_config", "check_budgets", "default_budget", "device_name"]


def device_name(device: str) -> str:
    """The ledger's name of ``device``: "cuda" without an index is "cuda:0" (as a job's and an
    instance's), any other name is itself."""
    return "cuda:0" if device == "cuda" else device


class MemoryManager:
    """Budgets and the ledger of charges: key (("instance", 3), ("job", 7), ...) -> (device,
    tier, bytes).  One thread: the control loop."""

    def __init__(self, budgets: dict[str, int], host_budget: int, clock=time.time):
        self.budgets = {device_name(d): int(n) for d, n in budgets.items()}
        self._host_budget = int(host_budget)
        self.clock = clock
        self.estimator = Estimator()
        self._ledger: dict[tuple, tuple[str, str, int]] = {}
        self._listeners: list[Callable[[], None]] = []
        self._evictions: deque = deque(maxlen=RECENT_EVICTIONS)

    # -- the ledger -----------------------------------------------------------------------
    def charge(self, key: tuple[str, int], device: str, nbytes: int, tier: str = "device") -> None:
        """``key`` holds ``nbytes`` on ``device``'s ``tier`` ("device" or "host"), replacing
        what it held before (an estimate becomes the measured bytes; a swap moves it).  When
        that leaves fewer device-tier bytes on the device it held before (measured below the
        estimate, swapped to the host tier, moved), the ``on_freed`` listeners run, as after
        an ``uncharge``."""
        if tier not in ("device", "host"):
            raise ValueError(f"tier must be device or host, got {tier!r}")
        key, device, nbytes = tuple(key), device_name(device), max(0, int(nbytes))
        old = self._ledger.get(key)
        self._ledger[key] = (device, tier, nbytes)
        if old is not None and old[1] == "device":
            now = nbytes if (tier, device) == ("device", old[0]) else 0
            if now < old[2]:
                self._freed()

    def uncharge(self, key) -> None:
        """``key`` holds nothing any more; then every ``on_freed`` listener runs (a failing
        one is logged, the others still run)."""
        if self._ledger.pop(tuple(key), None) is None:
            return
        self._freed()

    def _freed(self) -> None:
        """Run every ``on_freed`` listener (a failing one is logged, the others still run)."""
        for fn in list(self._listeners):
            try:
                fn()
            except Exception:
                log.exception("memory freed: a listener failed")

    def charged(self, key) -> tuple[str, str, int] | None:
        """(device, tier, bytes) ``key`` holds, or None.  (An addition to the design.)"""
        return self._ledger.get(tuple(key))

    def used(self, device: str, tier: str = "device") -> int:
        """Bytes charged on ``device``'s ``tier``."""
        device = device_name(device)
        return sum(n for d, t, n in self._ledger.values() if d == device and t == tier)

    def host_used(self) -> int:
        """Bytes the host tier holds, for all devices together."""
        return sum(n for _, t, n in self._ledger.values() if t == "host")

    def budget(self, device: str) -> int:
        """``device``'s budget in bytes (0 for a device without one: every need is refused);
        "cuda" is "cuda:0"."""
        return self.budgets.get(device_name(device), 0)

    @property
    def host_budget(self) -> int:
        return self._host_budget

    def on_freed(self, fn: Callable[[], None]) -> None:
        self._listeners.append(fn)

    # -- decisions ------------------------------------------------------------------------
    def holders(self, holders: list[Holder]) -> list[Holder]:
        """``holders`` (what the instance manager and job runner know: idle, pinned, ...) with
        the ledger's bytes, device and tier, plus a non-evictable holder for every charge no
        holder names (a load in progress, a reservation): the plan then sees all that is used."""
        import dataclasses
        out, seen = [], set()
        for h in holders:
            key = (h.kind, h.id)
            seen.add(key)
            c = self._ledger.get(key)
            out.append(dataclasses.replace(h, device=c[0], tier=c[1], bytes=c[2]) if c else h)
        for key, (d, t, n) in self._ledger.items():
            if key not in seen:
                kind, ident = (key[0], key[1]) if len(key) == 2 else (str(key[0]), -1)
                out.append(Holder(str(kind), int(ident) if isinstance(ident, int) else -1, "",
                                  d, t, n, idle=False))
        return out

    def plan(self, need: int, device: str, priority: int, holders: list[Holder],
             for_what: str, **how) -> Plan:
        """``policy.plan_admission`` on the ledger (see ``holders``); "cuda" is "cuda:0".
        ``how``: its ``how`` and ``fix`` keywords (the refusal's hints), when given."""
        device = device_name(device)
        return policy.plan_admission(need, device, priority, self.holders(holders),
                                     self.budget(device), self._host_budget, self.host_used(),
                                     for_what=for_what, **how)

    def expired(self, instances: list[Holder], keep_alive: dict[int, float]) -> list[int]:
        """``policy.expired`` at the manager's clock.  (An addition to the design.)"""
        return policy.expired(instances, keep_alive, self.clock())

    # -- reporting ------------------------------------------------------------------------
    def note_eviction(self, row: dict) -> None:
        """Remember an eviction (model, instance, reason, to: host|store; ``at`` filled in
        with the clock when missing); the last 20 are kept."""
        row = dict(row)
        row.setdefault("at", self.clock())
        self._evictions.append(row)

    def recent_evictions(self) -> list[dict]:
        """The last 20 evictions, oldest first."""
        return [dict(r) for r in self._evictions]

    def usage_rows(self, holders_by_device: dict[str, list[Holder]] | None = None) -> list[dict]:
        """One ``policy.usage`` row per budgeted device (and any device a holder names), the
        holders merged with the ledger, for status replies and top."""
        given = [h for hs in (holders_by_device or {}).values() for h in hs]
        merged = self.holders(given)
        devices = list(self.budgets) + sorted({h.device for h in merged} - set(self.budgets))
        return [policy.usage(d, merged, self.budget(d), self._host_budget) for d in devices]
