"""Instance lifecycle: load (on a loader thread), serve (through an engine), unload.

The ``InstanceManager`` owns the model table's rows, the engine threads behind them and the
registry of tasks (requests the daemon answers for): ``run`` registers a task and hands it to
an instance once one serves, ``cancel`` and ``shutdown`` end tasks; nothing else reads or
writes the registry or talks to an engine.  All of its methods run on the control loop thread;
loader and engine threads report back via ``post``.  It never runs device work itself: loads
run on loader threads, and an engine frees its model's memory on its own thread as it ends.

Adapters and classifiers run on their base's instance; attaching, installing and detaching
them is its ``Adapters``' (``serve.adapters``, which it owns): ``acquire_adapter``, ``detach``
and ``check_detachable`` are that object's, and an instance that unloads drops its adapters.

It also admits generations against the KV-cache byte limit (``scheduler.KVBudget``, whose
docstring gives the design) and within what the device's memory budget has free (the KV cache
is charged in the ledger like the models; Busy past either): reserved at ``submit``, shrunk on the engine's ``kv`` report,
released on the request's ``end``/``error`` or when its instance stops.  And it returns the
engine's stream credits: each chunk written to a client's socket is one ``Engine.credit``.

Memory (issue 12) is its ``Placement``'s (``serve.placement``, which it owns): before a load,
a swap-in or an adapter's attach, the estimate is planned there and the plan carried out, and
the work starts once the room is made; a refused plan ends the request with its OutOfMemory.
Loaded, an instance is charged what it measured; swapped ones come back on a request.
"""
from __future__ import annotations

import logging
import threading
import time
from typing import Callable

import torch

from llmctl.errors import Busy, Cancelled, LlmosdError, LoadFailed, OutOfMemory
from llmosd.desired import Desired
from llmosd.mem.devices import device_memory
from llmosd.mem.manager import MemoryManager
from llmosd.models import lora
from llmosd.models.loader import load_model, resident_bytes
from llmosd.serve.adapters import Adapters, Ready
from llmosd.serve.engine import Engine
from llmosd.serve.placement import Placement, configure, delegated, drop_runner
from llmosd.serve.request import Request, Task
from llmosd.serve.scheduler import KVBudget, kv_positions, prompt_token_bound, size_text
from llmosd.store.manifest import base_of
from llmosd.store.store import Store
from llmosd.table import Instance, ModelTable, State

log = logging.getLogger("llmosd.instances")


def default_kv_limit(device: torch.device) -> int:
    """``max_kv_bytes = 0`` (auto): a quarter of the memory the caches live in, physical RAM
    on the CPU, the device's own memory on CUDA."""
    return device_memory(device) // 4


def memory_device(device: torch.device) -> str:
    """The memory manager's name of ``device`` (its budgets' keys, the instances' rows):
    "cuda" without an index is "cuda:0", as a job's (``jobs.queue.mem_device``)."""
    if device.type == "cuda" and device.index is None:
        return "cuda:0"
    return str(device)


class InstanceManager:
    job_holders = delegated("job_holders")     # the job runner's holders, once wired (main)
    preempt_job = delegated("preempt_job")     # (job id, reason): pause it for room (main)
    desired = Desired()                        # the desired state on disk, once restored (main)

    def __init__(self, post: Callable, store: Store, device: torch.device, dtype: torch.dtype,
                 *, max_batch: int, stream_buffer: int, max_kv_bytes: int = 0,
                 memory: MemoryManager | None = None, keep_alive: float = 300.0):
        """``memory``: the daemon's memory manager (None: an unlimited one, for tests);
        ``keep_alive``: the default keep-alive of an instance (seconds; -1 forever)."""
        self.post, self.store, self.device, self.dtype = post, store, device, dtype
        self.table = ModelTable()
        self.mem_device = memory_device(device)
        self.place = Placement(post, self.table, self.mem_device, dtype.itemsize, memory=memory,
                               keep_alive=keep_alive, unload=lambda inst: self.unload(inst, True, lambda: None),
                               stopped=self._stopped, engine_for=self._engine_for,
                               waiting=lambda iid: len(self._ready_waiters.get(iid, ())),
                               take_waiters=lambda iid: self._ready_waiters.pop(iid, []))
        self.place.changed = lambda: self.desired.sync(self.table)   # pins set elsewhere
        # the placement's side that the daemon wires (main, ops, the job runner) and tests drive
        self.memory: MemoryManager = self.place.memory
        self.holders, self.instance_holders = self.place.holders, self.place.instance_holders
        self.make_room, self.start_timer, self._tick = self.place.make_room, self.place.start_timer, self.place.tick
        self.max_batch, self.stream_buffer = max_batch, stream_buffer
        self.kv = KVBudget(max_kv_bytes if max_kv_bytes > 0 else default_kv_limit(device))
        log.info("KV-cache limit %s%s", size_text(self.kv.limit), "" if max_kv_bytes > 0 else " (auto)")
        self._tasks: dict = {}                      # request key -> Task: only these methods touch it
        self._unload_waiters: dict[int, list[Callable[[], None]]] = {}
        self._ready_waiters: dict[int, list[Ready]] = {}
        self.adapters = Adapters(post, store, self.place, acquire=self.acquire, running=self._running)
        self.acquire_adapter, self.detach = self.adapters.acquire, self.adapters.detach
        self.check_detachable, self.check_resident = self.adapters.check_detachable, self.adapters.check_resident

    # -- loading ----------------------------------------------------------------------------
    def acquire(self, model: str, manifest: dict, digest: str, uid: int | None,
                on_ready: Ready, *, priority: int | None = None, keep_alive: float | None = None,
                pin: bool = False, displaced: list | None = None) -> Instance | None:
        """Call ``on_ready(inst, None)`` once an instance of this model version serves
        (loading or swapping one in if needed, after admission), or ``on_ready(None, err)``
        (OutOfMemory when admission refuses).  ``priority``, ``keep_alive`` and ``pin``, when
        given, apply to the instance (the latest wins).  What its room displaced is added to
        ``displaced`` (``Placement.make_room``'s rows).  Returns the instance (None: refused)."""
        inst = self.table.usable(model, digest)
        if inst is not None:
            configure(inst, priority, keep_alive, pin)
            self.desired.sync(self.table)
            if inst.serving:
                on_ready(inst, None)
            elif inst.state is State.SWAPPED:
                self._ready_waiters.setdefault(inst.id, []).append(on_ready)
                self.place.swap_in(inst, displaced)
            else:
                self._ready_waiters.setdefault(inst.id, []).append(on_ready)
            return inst
        ekey = ("instance", str(self.dtype).replace("torch.", ""))
        need, raw = self.place.estimate(manifest, ekey)
        plan = self.place.plan(need, priority or 0, f"loading {model}")
        if not plan.ok:
            log.info("refused to load %s: %s", model, plan.message)
            on_ready(None, plan.error())
            return None
        inst = self.table.add(model, digest, self.mem_device, uid)
        inst.estimate_bytes, inst.keep_alive = need, self.place.keep_alive
        configure(inst, priority, keep_alive, pin)
        self.place.expect(inst.id, ekey, raw)
        self._ready_waiters[inst.id] = [on_ready]
        self.place.charge(inst, need)
        log.info("loading %s as instance %d on %s (estimate %d bytes)", model, inst.id, self.device, need)
        shown = self.place.make_room(plan.actions, lambda: self._start_load(inst, manifest),
                                     room_for=model, fail=lambda err: self._no_room(inst, err))
        if displaced is not None:
            displaced.extend(shown)
        return inst

    def _no_room(self, inst: Instance, err: LlmosdError) -> None:
        """The room for ``inst``'s load was not made: the row goes (as a refused load adds
        none), whoever waits gets ``err``; nothing to learn."""
        self.place.forget(inst.id)
        if inst.state is not State.UNLOADING:
            inst.transition(State.UNLOADING)
        self._loaded(inst, None, 0, 0.0, err)

    def _start_load(self, inst: Instance, manifest: dict) -> None:
        if inst.state is State.UNLOADING:           # unloaded while it waited for room
            self._loaded(inst, None, 0, 0.0, None)
            return
        threading.Thread(target=self._load, args=(inst, manifest), name=f"load-{inst.id}",
                         daemon=True).start()

    def _load(self, inst: Instance, manifest: dict) -> None:
        t0, oom = time.perf_counter(), None
        try:
            model, tok = load_model(self.store, manifest, self.device, self.dtype)
            resident = resident_bytes(model)          # its own tensors, whatever else runs
            own = None                                # a merged classifier: its head
            if manifest.get("head") and base_of(manifest) is None:
                own = lora.read_adapter(self.store, manifest, inst.digest)
            engine = Engine(inst.id, model, tok, self.device,
                            lambda key, kind, body: self.post(self._on_engine, inst, engine, key, kind, body),
                            max_batch=self.max_batch, stream_buffer=self.stream_buffer, own_head=own)
            resident += engine.own_head_bytes
            del model                                 # the engine's runner holds the only reference
            self.post(self._loaded, inst, engine, resident, time.perf_counter() - t0, None)
        except torch.OutOfMemoryError:
            oom = OutOfMemory(f"not enough memory on {self.device} to load {inst.model} (estimated "
                              f"{size_text(inst.estimate_bytes)}); the estimate will be higher next time")
        except LlmosdError as e:
            self.post(self._loaded, inst, None, 0, 0.0, e)
        except Exception as e:
            log.exception("load of %s failed", inst.model)
            self.post(self._loaded, inst, None, 0, 0.0, LoadFailed(f"loading {inst.model} failed: {e}"))
        if oom is None:
            return
        # what the failed load allocated goes back to the device, now that the handler's
        # traceback (holding the half-built model) is gone
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        self.post(self._loaded, inst, None, 0, 0.0, oom)

    def _loaded(self, inst: Instance, engine: Engine | None, resident: int, secs: float,
                err: LlmosdError | None) -> None:
        waiters = self._ready_waiters.pop(inst.id, [])
        if inst.state is State.UNLOADING:          # unloaded (forced) while it was loading
            self.place.forget(inst.id)
            err = err or Cancelled(f"instance {inst.id} was unloaded while loading")
            if engine is not None:
                drop_runner(engine.runner)          # never started: nothing else holds it
            self.table.remove(inst.id)
            self.place.uncharge(inst)
            self._notify_unloaded(inst.id)
        elif err is not None:
            inst.transition(State.FAILED, str(err))
            oom = isinstance(err, OutOfMemory)     # rolled back; learn from it
            self.place.learn(inst.id, None, inst.estimate_bytes if oom else None)
            self.place.uncharge(inst)
            log.warning("instance %d (%s) failed to load: %s", inst.id, inst.model, err)
        else:
            inst.engine, inst.resident_bytes = engine, resident
            inst.load_ms, inst.last_used = round(secs * 1000, 3), time.time()
            inst.transition(State.READY)
            self.place.learn(inst.id, resident)
            self.place.recharge(inst)
            for old in self.table.for_model(inst.model):   # a success clears earlier failures
                if old.state is State.FAILED:
                    self.table.remove(old.id)
            engine.start()
            log.info("instance %d (%s) ready in %.2fs, %d bytes resident (estimated %d)", inst.id,
                     inst.model, secs, resident, inst.estimate_bytes)
            self.desired.sync(self.table)
        for cb in waiters:
            cb(None if err else inst, err)

    def _engine_for(self, inst: Instance, runner) -> Engine:
        """A new engine on a swapped-in instance's kept ``runner`` (on the loader thread)."""
        engine = Engine(inst.id, None, runner.tok, self.device,
                        lambda key, kind, body: self.post(self._on_engine, inst, engine, key, kind, body),
                        max_batch=self.max_batch, stream_buffer=self.stream_buffer, runner=runner)
        return engine

    # -- requests --------------------------------------------------------------------------
    def run(self, model: str, manifest: dict, digest: str, uid: int | None, task: Task,
            on_loading: Callable[[], None] | None = None,
            base: tuple[str, dict, str] | None = None, keep_alive: float | None = None) -> None:
        """Take responsibility for ``task`` (its key must be new): hand it to an instance of
        this model version once one serves, loading one if needed.  ``on_loading()`` is called
        first when it must wait for a load; meanwhile it counts in the instance's
        ``queued_requests``.  Its stream ends with the engine's answer, or with the error of a
        failed load, a refused admission, a cancel or the shutdown.  With ``base`` (name,
        manifest, digest), ``model`` is an adapter of that base and ``task.req.adapter`` its
        key: the task runs on the base's instance once the adapter is installed there.
        ``keep_alive`` (seconds, -1 forever), when given, becomes the instance's keep-alive.
        A task that waited for a swap-in has ``swap_in_ms`` in its final stats."""
        key = task.req.key
        self._tasks[key] = task
        task.model = model
        t0 = time.perf_counter()
        if base is None:
            existing = self.table.usable(model, digest)
            loading = existing is None or not existing.serving
        else:
            existing = self.table.usable(base[0], base[2])
            a = existing.adapters.get(digest) if existing is not None else None
            loading = existing is None or not existing.serving or a is None or not a.ready
        swapped = existing is not None and existing.state is State.SWAPPED
        if loading and on_loading is not None:
            on_loading()

        def ready(inst, err):
            if self._tasks.get(key) is not task:
                return                                   # cancelled while loading
            self._unqueue(task)
            if err:
                self._tasks.pop(key)
                task.stream.error(err)
                return
            task.extra = {"loaded": loading,
                          "load_ms": round((time.perf_counter() - t0) * 1000, 3) if loading else 0.0}
            if swapped and inst.swap_in_ms is not None:
                task.extra["swap_in_ms"] = inst.swap_in_ms
            self.submit(inst, task)
        if base is None:
            inst = self.acquire(model, manifest, digest, uid, ready, keep_alive=keep_alive)
        else:
            inst = self.acquire_adapter(base, model, manifest, digest, uid, ready, keep_alive=keep_alive)
        if self._tasks.get(key) is task and not task.running and inst is not None:   # waits for the load
            task.inst = inst
            inst.queued_requests += 1

    def _unqueue(self, task: Task) -> None:
        if task.inst is not None and not task.running:
            task.inst.queued_requests -= 1
            task.inst = None

    def _running(self, inst: Instance, adapter: str) -> list:
        """The keys of the requests running on ``inst`` with ``adapter``."""
        return [key for key, task in self._tasks.items()
                if task.inst is inst and task.running and task.req.adapter == adapter]

    def submit(self, inst: Instance, task: Task) -> None:
        """Hand the task to the instance's engine, once a generation's KV cache is admitted;
        a refusal (Busy, or too big ever to fit) ends the task's stream with that error."""
        req, positions = task.req, 0
        if isinstance(req, Request):
            try:
                positions = self._admit(inst, req)
            except LlmosdError as e:
                if self._tasks.get(req.key) is task:
                    self._tasks.pop(req.key)
                task.stream.error(e)
                return
        inst.begin_request(req.adapter)
        task.inst, task.running = inst, True
        inst.engine.submit(req, positions)

    def _admit(self, inst: Instance, req: Request) -> int:
        """Reserve an upper bound of ``req``'s KV cache; returns the positions reserved."""
        eng = inst.engine
        bound = prompt_token_bound(req.prompt, req.messages)
        positions = kv_positions(eng.context, bound, req.max_tokens)
        self.kv.admit(req.key, inst.id, positions * eng.kv_position_bytes, eng.kv_position_bytes, bound,
                      budget_free=(self.mem_device, self.place.kv_free()))
        self.place.charge_kv(self.kv.used)
        return positions

    def cancel(self, key, reason: str) -> None:
        """End the task ``key`` (unknown keys: nothing to do): a running one ends with
        finish_reason ``reason`` through its engine, a waiting one at once with Cancelled."""
        task = self._tasks.get(key)
        if task is None:
            return
        if task.running:
            task.inst.engine.cancel(key, reason)
        else:                                   # still waiting for its instance to load
            self._tasks.pop(key)
            self._unqueue(task)
            task.stream.error(Cancelled(f"request cancelled ({reason}) before it started"))

    def _on_engine(self, inst: Instance, engine: Engine, key, kind: str, body: dict) -> None:
        if kind == "stopped":                   # swapped out, or gone (then ``_stopped``)
            self.place.engine_stopped(inst, engine, bool(body.get("swapped")))
            return
        if kind == "kv":
            self.kv.shrink(key, body["bytes"])
            self.place.charge_kv(self.kv.used)
            return
        if kind == "adapter":
            self.adapters.installed(inst, key, body)
            return
        if kind in ("end", "error"):       # whoever still holds the task: the bytes are free
            self.kv.release(key)
            self.place.charge_kv(self.kv.used)
        task = self._tasks.get(key)
        if task is None:
            return
        if kind == "chunk":                # its credit goes back once the socket has it
            task.stream.chunk(body, on_sent=lambda: engine.credit(key))
            return
        self._tasks.pop(key)
        inst.end_request(body.get("generated_tokens", 0) if kind == "end" else 0, task.req.adapter)
        if kind == "end":                  # named as asked: an adapter's name (this tag), not its base's
            task.stream.end({**body, **(task.extra or {}), "instance": inst.id,
                             "model": task.model or inst.model})
        else:
            task.stream.error(body)
        self.place.after_request(inst)

    # -- unloading --------------------------------------------------------------------------
    def unload(self, inst: Instance, force: bool, on_done: Callable[[], None]) -> None:
        if inst.state is State.UNLOADING:
            self._unload_waiters.setdefault(inst.id, []).append(on_done)
            return
        if inst.state is State.FAILED:
            inst.transition(State.UNLOADING)
            self.table.remove(inst.id)
            on_done()
            return
        if not force:
            self.check_unloadable(inst)
        swapped = inst.state is State.SWAPPED and not self.place.leaving(inst.id)
        inst.transition(State.UNLOADING)
        self.desired.sync(self.table)              # unloaded, evicted or expired: not desired
        self.adapters.drop(inst, Cancelled(f"instance {inst.id} ({inst.model}) was unloaded"))
        self._unload_waiters.setdefault(inst.id, []).append(on_done)
        for key, task in list(self._tasks.items()):
            if task.inst is inst and task.running:
                inst.engine.cancel(key, "unloaded", Cancelled(
                    f"instance {inst.id} ({inst.model}) was unloaded while this request ran"))
        log.info("unloading instance %d (%s)", inst.id, inst.model)
        if swapped:                        # on the host, no engine: its runner just goes
            self.place.drop_swapped(inst)
            self._stopped(inst)
        elif inst.engine is not None and not self.place.leaving(inst.id):
            inst.engine.stop()

    def check_unloadable(self, inst: Instance) -> None:
        """Raise Busy if ``inst`` cannot be unloaded without --force: it loads, serves
        requests, has requests waiting for it, or has an adapter that would have to be
        detached with --force (still loading, or serving requests)."""
        if inst.state is State.LOADING:
            raise Busy(f"instance {inst.id} ({inst.model}) is still loading",
                       hint="wait for it to be ready, or use --force")
        for a in inst.adapters.values():      # unloading detaches them: the same rules
            self.check_detachable(inst, a)
        if inst.active_requests:
            raise Busy(f"instance {inst.id} ({inst.model}) has {inst.active_requests} active request(s)",
                       hint="wait for them to finish, or use --force to cancel them")
        if inst.queued_requests:
            raise Busy(f"instance {inst.id} ({inst.model}) has {inst.queued_requests} request(s) "
                       "waiting for it", hint="wait for them to finish, or use --force to cancel them")

    def _stopped(self, inst: Instance) -> None:
        self.kv.release_owner(inst.id)
        self.place.charge_kv(self.kv.used)
        for key, task in list(self._tasks.items()):   # anything the engine never answered
            if task.inst is inst and task.running:
                self._tasks.pop(key)
                task.stream.error(Cancelled(f"instance {inst.id} was unloaded"))
        if inst.state is not State.UNLOADING:        # the engine died on its own
            inst.transition(State.UNLOADING)
        self.adapters.drop(inst, Cancelled(f"instance {inst.id} was unloaded"))
        for cb in self._ready_waiters.pop(inst.id, []):   # waited for a swap-in (as _loaded)
            cb(None, Cancelled(f"instance {inst.id} ({inst.model}) was unloaded"))
        inst.adapters.clear()
        inst.engine = None              # its thread already dropped the model and freed the memory
        self.table.remove(inst.id)
        self.place.uncharge(inst)
        log.info("instance %d (%s) unloaded", inst.id, inst.model)
        self._notify_unloaded(inst.id)

    def _notify_unloaded(self, iid: int) -> None:
        for cb in self._unload_waiters.pop(iid, []):
            cb()

    def shutdown(self, err: LlmosdError) -> None:
        """Every request ends with ``err`` (engines are told to stop them), then all unload."""
        self.desired.freeze()                      # what was loaded loads again at the next start
        for key, task in list(self._tasks.items()):
            self._tasks.pop(key)
            self._unqueue(task)
            task.stream.error(err)
            if task.running and isinstance(task.req, Request):
                task.inst.engine.cancel(key, "shutdown")
        self.place.stop_timer()
        self.unload_all()
        self.place.flush_waits()

    def unload_all(self) -> None:
        for inst in list(self.table):
            self.unload(inst, True, lambda: None)

    def idle(self) -> bool:
        return len(self.table) == 0 or all(i.state is State.FAILED for i in self.table)

