"""Adapters and classifiers attached to their base's instance (issue 11): attach, read on a
loader thread, install through the engine, detach.

Adapters run on their base's instance, the way forked processes share their parent's pages:
acquiring one acquires (loads if needed) the one instance of its base, then reads the adapter
on a loader thread (``lora.read_adapter``) and has the engine install it (``Engine.add_adapter``,
answered by an ``adapter`` message with its bytes) once, however many requests ask for it
meanwhile; its requests carry its key (``Request.adapter``).  ``detach`` takes one out again;
an instance that unloads drops its adapters with it (``drop``).

``Adapters`` is owned by ``serve.instances.InstanceManager`` and runs on the control loop
(reads run on loader threads and report back through ``post``).  Its contract:

- ``acquire(base, model, manifest, digest, uid, on_ready, **opts)``: the adapter installed on a
  serving instance of its base (admitted first through the placement: the base is no eviction
  candidate), ``on_ready(inst, None)`` then, or ``on_ready(None, err)``;
- ``installed(inst, key, body)``: the engine's ``adapter`` answer to an install;
- ``detach(inst, model, force)`` and ``check_detachable(inst, a)``: take one out (Busy while it
  loads or serves unless forced);
- ``drop(inst, err)``: the instance is going, whoever waits for one of its adapters gets ``err``.

What it needs of its owner comes in as callables: ``acquire`` (the base's instance, as
``InstanceManager.acquire``) and ``running(inst, digest)`` (the keys of the requests running on
``inst`` with that adapter).  It never touches the owner's tasks.
"""
from __future__ import annotations

import logging
import threading
import time
from typing import Callable

from llmctl.errors import Busy, Cancelled, LlmosdError, LoadFailed, from_wire
from llmosd.models import lora
from llmosd.serve.placement import Placement
from llmosd.store.manifest import kind_of
from llmosd.store.store import Store
from llmosd.table import Attached, Instance, State

log = logging.getLogger("llmosd.instances")

Ready = Callable[[Instance | None, LlmosdError | None], None]


class Adapters:
    def __init__(self, post: Callable, store: Store, place: Placement, *,
                 acquire: Callable[..., Instance | None], running: Callable[[Instance, str], list]):
        """``acquire(name, manifest, digest, uid, on_ready, **opts)``: the base's instance,
        as ``InstanceManager.acquire``; ``running(inst, digest)``: the keys of the requests
        running on ``inst`` with adapter ``digest``."""
        self.post, self.store, self.place = post, store, place
        self._acquire, self._running = acquire, running
        self._waiters: dict[tuple[int, str], list[Ready]] = {}   # (instance, adapter key)

    def acquire(self, base: tuple[str, dict, str], model: str, manifest: dict, digest: str,
                uid: int | None, on_ready: Ready, **opts) -> Instance | None:
        """Call ``on_ready(inst, None)`` once the adapter ``model`` (manifest ``manifest``,
        key ``digest``) is installed on a serving instance of ``base`` = (name, manifest,
        digest) (loading both if needed), or ``on_ready(None, err)``.  Returns the instance.
        ``opts`` (priority, keep_alive, pin, displaced) apply to the base's instance, as
        ``acquire``; ``displaced`` gets what the adapter's own room displaced too."""
        bcanon, bman, bdigest = base

        def base_ready(inst, err):
            if err is not None:
                on_ready(None, err)
            else:
                self._attach(inst, model, manifest, digest, uid, on_ready, opts.get("displaced"))
        return self._acquire(bcanon, bman, bdigest, uid, base_ready, **opts)

    def _attach(self, inst: Instance, model: str, manifest: dict, digest: str, uid: int | None,
                on_ready: Ready, displaced: list | None = None) -> None:
        if not inst.serving:                       # unloaded between its ready and this call
            on_ready(None, Cancelled(f"instance {inst.id} ({inst.model}) was unloaded"))
            return
        a = inst.adapters.get(digest)
        if a is not None and a.ready:
            on_ready(inst, None)
            return
        if a is not None:
            self._waiters.setdefault((inst.id, digest), []).append(on_ready)
            return
        # the first to ask reads and installs it, once admitted (the base is not a candidate)
        ekey = ("adapter", kind_of(manifest))
        need, raw = self.place.estimate(manifest, ekey)
        plan = self.place.plan(need, inst.priority, f"attaching {model} to instance {inst.id}",
                               frozenset({inst.id}))
        if not plan.ok:
            log.info("refused to attach %s to instance %d: %s", model, inst.id, plan.message)
            on_ready(None, plan.error())
            return
        self._waiters.setdefault((inst.id, digest), []).append(on_ready)
        a = inst.attach(model, digest, uid, kind_of(manifest))
        a.estimate_bytes = need
        self.place.expect((inst.id, digest), ekey, raw)
        self.place.recharge(inst)
        log.info("attaching %s to instance %d (%s), estimate %d bytes", model, inst.id, inst.model, need)

        def go():
            if inst.adapters.get(digest) is a and inst.serving:
                threading.Thread(target=self._read, args=(inst, a, manifest),
                                 name=f"load-{inst.id}-adapter", daemon=True).start()

        def fail(err):
            if inst.adapters.get(digest) is a and not a.ready:
                self.installed(inst, digest, {"error": err.to_wire(), "token": a.token})
        shown = self.place.make_room(plan.actions, go, room_for=f"{model} on instance {inst.id}",
                                     fail=fail)
        if displaced is not None:
            displaced.extend(shown)

    def _read(self, inst: Instance, a: Attached, manifest: dict) -> None:
        """Loader thread: the adapter's tensors (on the CPU) for the engine to install."""
        adapter, err = None, None
        try:
            adapter = lora.read_adapter(self.store, manifest, a.digest)
        except LlmosdError as e:
            err = e
        except ValueError as e:
            err = LoadFailed(f"the adapter {a.model} cannot be used: {e}")
        except Exception as e:
            log.exception("reading adapter %s failed", a.model)
            err = LoadFailed(f"reading the adapter {a.model} failed: {e}")
        self.post(self._read_done, inst, a, adapter, err)

    def _read_done(self, inst: Instance, a: Attached, adapter, err: LlmosdError | None) -> None:
        if inst.adapters.get(a.digest) is not a or not inst.serving:
            return                                 # detached or unloaded meanwhile: told then
        if err is not None:
            self.installed(inst, a.digest, {"error": err.to_wire(), "token": a.token})
            return
        inst.engine.add_adapter(a.digest, adapter, a.token)   # answered by an "adapter" message

    def installed(self, inst: Instance, key: str, body: dict) -> None:
        """The engine's answer to the install of attach ``body["token"]``.  Only the current
        attach's answer counts: one to an attach detached meanwhile (the engine dropped that
        install after it) must not mark a later attach of the same digest ready."""
        a = inst.adapters.get(key)
        if a is None or a.ready or body.get("token") != a.token:
            return                                 # detached meanwhile (the engine dropped it)
        waiters = self._waiters.pop((inst.id, key), [])
        err = from_wire(body["error"]) if "error" in body else None
        if err is not None:
            self.place.forget((inst.id, key))
            inst.detach(key)
            log.warning("adapter %s failed to install on instance %d: %s", a.model, inst.id, err)
        else:
            a.resident_bytes, a.ready, a.loaded_at = int(body["bytes"]), True, time.time()
            self.place.learn((inst.id, key), a.resident_bytes)
            log.info("adapter %s installed on instance %d (%s), %d bytes", a.model, inst.id,
                     inst.model, a.resident_bytes)
        if inst.state not in (State.FAILED, State.UNLOADING):
            self.place.recharge(inst)
        for cb in waiters:
            cb(None if err else inst, err)

    def detach(self, inst: Instance, model: str, force: bool) -> None:
        """Take the adapter ``model`` (its manifest digest, or the name it was attached as)
        off ``inst`` (at once: the engine uninstalls it between two steps).  Busy while it
        loads or serves requests, unless ``force``, which cancels them (and fails whoever
        waits for it to load)."""
        a = inst.adapters.get(model) or inst.adapter_named(model)
        if a is None:
            return
        self.check_resident(inst, a)
        if not force:
            self.check_detachable(inst, a)
        for key in self._running(inst, a.digest):
            inst.engine.cancel(key, "unloaded", Cancelled(
                f"{a.model} was unloaded from instance {inst.id} while this request ran"))
        inst.detach(a.digest)
        self.place.forget((inst.id, a.digest))
        if inst.state not in (State.FAILED, State.UNLOADING):
            self.place.recharge(inst)
        if inst.engine is not None:
            inst.engine.drop_adapter(a.digest)
        for cb in self._waiters.pop((inst.id, a.digest), []):
            cb(None, Cancelled(f"{a.model} was unloaded while it loaded"))
        log.info("detached %s from instance %d (%s)", a.model, inst.id, inst.model)

    @staticmethod
    def check_resident(inst: Instance, a: Attached) -> None:
        """Raise Busy (even with --force) while ``inst`` has no engine to uninstall ``a``
        through: swapped to the host or swapping back in (its kept runner still holds the
        adapter; the next engine on it would too)."""
        if inst.state in (State.SWAPPED, State.LOADING) and inst.engine is None:
            where = ("swapped out to host memory" if inst.state is State.SWAPPED
                     else "swapping back in from host memory")
            raise Busy(f"cannot unload {a.model}: its base's instance {inst.id} ({inst.model}) is {where}",
                       hint="retry once the instance serves again (a request brings it back), "
                            f"or unload the instance with its adapters (llmctl unload {inst.id})")

    @staticmethod
    def check_detachable(inst: Instance, a: Attached) -> None:
        """Raise Busy if the adapter ``a`` cannot be detached from ``inst`` without --force."""
        if not a.ready:
            raise Busy(f"{a.model} is still loading on instance {inst.id}",
                       hint="wait for it to be ready, or use --force")
        if a.active_requests:
            raise Busy(f"{a.model} has {a.active_requests} active request(s) on instance {inst.id}",
                       hint="wait for them to finish, or use --force to cancel them")

    def drop(self, inst: Instance, err: LlmosdError) -> None:
        """The instance is going: whoever waits for one of its adapters gets ``err``."""
        for digest in list(inst.adapters):
            for cb in self._waiters.pop((inst.id, digest), []):
                cb(None, err)
