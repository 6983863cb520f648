"""Instance lifecycle: load (on a loader thread), serve (through an engine), unload.

The ``InstanceManager`` owns the model table's rows, the engine threads behind them and the
registry of tasks (requests the daemon answers for): ``run`` registers a task and hands it to
an instance once one serves, ``cancel`` and ``shutdown`` end tasks; nothing else reads or
writes the registry or talks to an engine.  All of its methods run on the control loop thread;
loader and engine threads report back via ``post``.  It never runs device work itself: loads
run on loader threads, and an engine frees its model's memory on its own thread as it ends.

It also admits generations against the KV-cache byte limit (``scheduler.KVBudget``, whose
docstring gives the design): reserved at ``submit``, shrunk on the engine's ``kv`` report,
released on the request's ``end``/``error`` or when its instance stops.  And it returns the
engine's stream credits: each chunk written to a client's socket is one ``Engine.credit``.
"""
from __future__ import annotations

import logging
import threading
import time
from typing import Callable

import torch

from llmctl.errors import Busy, Cancelled, LlmosdError, LoadFailed, OutOfMemory
from llmosd.mem.devices import device_memory
from llmosd.models.loader import load_model, resident_bytes
from llmosd.serve.engine import Engine
from llmosd.serve.request import Request, Task
from llmosd.serve.scheduler import KVBudget, kv_positions, prompt_token_bound, size_text
from llmosd.store.store import Store
from llmosd.table import Instance, ModelTable, State

log = logging.getLogger("llmosd.instances")

Ready = Callable[[Instance | None, LlmosdError | None], None]


def default_kv_limit(device: torch.device) -> int:
    """``max_kv_bytes = 0`` (auto): a quarter of the memory the caches live in, physical RAM
    on the CPU, the device's own memory on CUDA."""
    return device_memory(device) // 4


class InstanceManager:
    def __init__(self, post: Callable, store: Store, device: torch.device, dtype: torch.dtype,
                 *, max_batch: int, stream_buffer: int, max_kv_bytes: int = 0):
        self.post, self.store, self.device, self.dtype = post, store, device, dtype
        self.max_batch, self.stream_buffer = max_batch, stream_buffer
        self.kv = KVBudget(max_kv_bytes if max_kv_bytes > 0 else default_kv_limit(device))
        log.info("KV-cache limit %s%s", size_text(self.kv.limit), "" if max_kv_bytes > 0 else " (auto)")
        self.table = ModelTable()
        self._tasks: dict = {}                      # request key -> Task: only these methods touch it
        self._unload_waiters: dict[int, list[Callable[[], None]]] = {}
        self._ready_waiters: dict[int, list[Ready]] = {}

    # -- loading ----------------------------------------------------------------------------
    def acquire(self, model: str, manifest: dict, digest: str, uid: int | None,
                on_ready: Ready) -> Instance:
        """Call ``on_ready(inst, None)`` once an instance of this model version serves
        (loading one if needed), or ``on_ready(None, err)``.  Returns the instance."""
        inst = self.table.usable(model, digest)
        if inst is not None and inst.serving:
            on_ready(inst, None)
            return inst
        if inst is None:
            inst = self.table.add(model, digest, str(self.device), uid)
            self._ready_waiters[inst.id] = []
            threading.Thread(target=self._load, args=(inst, manifest), name=f"load-{inst.id}",
                             daemon=True).start()
            log.info("loading %s as instance %d on %s", model, inst.id, self.device)
        self._ready_waiters[inst.id].append(on_ready)
        return inst

    def _load(self, inst: Instance, manifest: dict) -> None:
        t0 = time.perf_counter()
        try:
            model, tok = load_model(self.store, manifest, self.device, self.dtype)
            resident = resident_bytes(model)          # its own tensors, whatever else runs
            engine = Engine(inst.id, model, tok, self.device,
                            lambda key, kind, body: self.post(self._on_engine, inst, engine, key, kind, body),
                            max_batch=self.max_batch, stream_buffer=self.stream_buffer)
            del model                                 # the engine's runner holds the only reference
            self.post(self._loaded, inst, engine, resident, time.perf_counter() - t0, None)
        except torch.OutOfMemoryError:
            self.post(self._loaded, inst, None, 0, 0.0, OutOfMemory(f"not enough memory on {self.device} to load {inst.model}"))
        except LlmosdError as e:
            self.post(self._loaded, inst, None, 0, 0.0, e)
        except Exception as e:
            log.exception("load of %s failed", inst.model)
            self.post(self._loaded, inst, None, 0, 0.0, LoadFailed(f"loading {inst.model} failed: {e}"))

    def _loaded(self, inst: Instance, engine: Engine | None, resident: int, secs: float,
                err: LlmosdError | None) -> None:
        waiters = self._ready_waiters.pop(inst.id, [])
        if inst.state is State.UNLOADING:          # unloaded (forced) while it was loading
            err = err or Cancelled(f"instance {inst.id} was unloaded while loading")
            self.table.remove(inst.id)
            self._notify_unloaded(inst.id)
        elif err is not None:
            inst.transition(State.FAILED, str(err))
            log.warning("instance %d (%s) failed to load: %s", inst.id, inst.model, err)
        else:
            inst.engine, inst.resident_bytes = engine, resident
            inst.transition(State.READY)
            for old in self.table.for_model(inst.model):   # a success clears earlier failures
                if old.state is State.FAILED:
                    self.table.remove(old.id)
            engine.start()
            log.info("instance %d (%s) ready in %.2fs, %d bytes resident", inst.id, inst.model,
                     secs, resident)
        for cb in waiters:
            cb(None if err else inst, err)

    # -- requests --------------------------------------------------------------------------
    def run(self, model: str, manifest: dict, digest: str, uid: int | None, task: Task,
            on_loading: Callable[[], None] | None = None) -> None:
        """Take responsibility for ``task`` (its key must be new): hand it to an instance of
        this model version once one serves, loading one if needed.  ``on_loading()`` is called
        first when it must wait for a load; meanwhile it counts in the instance's
        ``queued_requests``.  Its stream ends with the engine's answer, or with the error of a
        failed load, a refused admission, a cancel or the shutdown."""
        key = task.req.key
        self._tasks[key] = task
        t0 = time.perf_counter()
        existing = self.table.usable(model, digest)
        loading = existing is None or existing.state is State.LOADING
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
            self.submit(inst, task)
        inst = self.acquire(model, manifest, digest, uid, ready)
        if self._tasks.get(key) is task and not task.running:       # waits for the load
            task.inst = inst
            inst.queued_requests += 1

    def _unqueue(self, task: Task) -> None:
        if task.inst is not None and not task.running:
            task.inst.queued_requests -= 1
            task.inst = None

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
        inst.begin_request()
        task.inst, task.running = inst, True
        inst.engine.submit(req, positions)

    def _admit(self, inst: Instance, req: Request) -> int:
        """Reserve an upper bound of ``req``'s KV cache; returns the positions reserved."""
        eng = inst.engine
        bound = prompt_token_bound(req.prompt, req.messages)
        positions = kv_positions(eng.context, bound, req.max_tokens)
        self.kv.admit(req.key, inst.id, positions * eng.kv_position_bytes, eng.kv_position_bytes, bound)
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
        if kind == "stopped":
            self._stopped(inst)
            return
        if kind == "kv":
            self.kv.shrink(key, body["bytes"])
            return
        if kind in ("end", "error"):       # whoever still holds the task: the bytes are free
            self.kv.release(key)
        task = self._tasks.get(key)
        if task is None:
            return
        if kind == "chunk":                # its credit goes back once the socket has it
            task.stream.chunk(body, on_sent=lambda: engine.credit(key))
            return
        self._tasks.pop(key)
        inst.end_request(body.get("generated_tokens", 0) if kind == "end" else 0)
        if kind == "end":
            task.stream.end({**body, **(task.extra or {}), "instance": inst.id, "model": inst.model})
        else:
            task.stream.error(body)

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
        inst.transition(State.UNLOADING)
        self._unload_waiters.setdefault(inst.id, []).append(on_done)
        for key, task in list(self._tasks.items()):
            if task.inst is inst and task.running:
                inst.engine.cancel(key, "unloaded", Cancelled(
                    f"instance {inst.id} ({inst.model}) was unloaded while this request ran"))
        if inst.engine is not None:
            inst.engine.stop()
        log.info("unloading instance %d (%s)", inst.id, inst.model)

    def check_unloadable(self, inst: Instance) -> None:
        """Raise Busy if ``inst`` cannot be unloaded without --force."""
        if inst.state is State.LOADING:
            raise Busy(f"instance {inst.id} ({inst.model}) is still loading",
                       hint="wait for it to be ready, or use --force")
        if inst.active_requests:
            raise Busy(f"instance {inst.id} ({inst.model}) has {inst.active_requests} active request(s)",
                       hint="wait for them to finish, or use --force to cancel them")

    def _stopped(self, inst: Instance) -> None:
        self.kv.release_owner(inst.id)
        for key, task in list(self._tasks.items()):   # anything the engine never answered
            if task.inst is inst and task.running:
                self._tasks.pop(key)
                task.stream.error(Cancelled(f"instance {inst.id} was unloaded"))
        if inst.state is not State.UNLOADING:        # the engine died on its own
            inst.transition(State.UNLOADING)
        inst.engine = None              # its thread already dropped the model and freed the memory
        self.table.remove(inst.id)
        log.info("instance %d (%s) unloaded", inst.id, inst.model)
        self._notify_unloaded(inst.id)

    def _notify_unloaded(self, iid: int) -> None:
        for cb in self._unload_waiters.pop(iid, []):
            cb()

    def shutdown(self, err: LlmosdError) -> None:
        """Every request ends with ``err`` (engines are told to stop them), then all unload."""
        for key, task in list(self._tasks.items()):
            self._tasks.pop(key)
            self._unqueue(task)
            task.stream.error(err)
            if task.running and isinstance(task.req, Request):
                task.inst.engine.cancel(key, "shutdown")
        self.unload_all()

    def unload_all(self) -> None:
        for inst in list(self.table):
            self.unload(inst, True, lambda: None)

    def idle(self) -> bool:
        return len(self.table) == 0 or all(i.state is State.FAILED for i in self.table)

