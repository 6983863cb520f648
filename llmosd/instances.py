"""Instance lifecycle: load (on a loader thread), serve (through an engine), unload.

The ``InstanceManager`` owns the model table's rows and the engine threads behind them.  All of
its methods run on the control loop thread; loader and engine threads report back via ``post``.
"""
from __future__ import annotations

import gc
import logging
import threading
import time
from dataclasses import dataclass
from typing import Callable

import torch

from llmctl.errors import Busy, Cancelled, InvalidArgument, LlmosdError, LoadFailed, OutOfMemory
from .engine import Engine, Request
from .loader import load_model, resident_bytes
from .store import Store
from .table import Instance, ModelTable, State

log = logging.getLogger("llmosd.instances")

Ready = Callable[[Instance | None, LlmosdError | None], None]


@dataclass
class Task:
    """A generation the daemon is responsible for, from arrival to its stream's end."""
    req: Request
    stream: object                 # server.Stream
    inst: Instance | None = None
    extra: dict | None = None      # merged into the final stats (load info)
    running: bool = False


class InstanceManager:
    def __init__(self, post: Callable, store: Store, device: torch.device, dtype: torch.dtype,
                 *, max_batch: int, stream_buffer: int):
        self.post, self.store, self.device, self.dtype = post, store, device, dtype
        self.max_batch, self.stream_buffer = max_batch, stream_buffer
        self.table = ModelTable()
        self.tasks: dict = {}                       # request key -> Task
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
            before = torch.cuda.memory_allocated(self.device) if self.device.type == "cuda" else 0
            model, tok = load_model(self.store, manifest, self.device, self.dtype)
            resident = (torch.cuda.memory_allocated(self.device) - before
                        if self.device.type == "cuda" else resident_bytes(model))
            engine = Engine(inst.id, model, tok, self.device,
                            lambda key, kind, body: self.post(self._on_engine, inst, key, kind, body),
                            max_batch=self.max_batch, stream_buffer=self.stream_buffer)
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

    # -- generation -------------------------------------------------------------------------
    def submit(self, inst: Instance, task: Task) -> None:
        inst.begin_request()
        task.inst, task.running = inst, True
        inst.engine.submit(task.req)

    def cancel(self, key, reason: str) -> None:
        task = self.tasks.get(key)
        if task is None:
            return
        if task.running:
            task.inst.engine.cancel(key, reason)
        else:                                   # still waiting for its instance to load
            self.tasks.pop(key)
            task.stream.error(Cancelled(f"request cancelled ({reason}) before it started"))

    def _on_engine(self, inst: Instance, key, kind: str, body: dict) -> None:
        if kind == "stopped":
            self._stopped(inst)
            return
        task = self.tasks.get(key)
        if task is None:
            return
        if kind == "chunk":
            req = task.req
            task.stream.chunk(body, on_sent=lambda: setattr(req, "sent", req.sent + 1))
            return
        self.tasks.pop(key)
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
        for key, task in list(self.tasks.items()):
            if task.inst is inst:
                task.inst.engine.cancel(key, "unloaded", Cancelled(
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
        for key, task in list(self.tasks.items()):   # anything the engine never answered
            if task.inst is inst:
                self.tasks.pop(key)
                task.stream.error(Cancelled(f"instance {inst.id} was unloaded"))
        if inst.state is not State.UNLOADING:        # the engine died on its own
            inst.transition(State.UNLOADING)
        inst.engine = None
        self.table.remove(inst.id)
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        log.info("instance %d (%s) unloaded", inst.id, inst.model)
        self._notify_unloaded(inst.id)

    def _notify_unloaded(self, iid: int) -> None:
        for cb in self._unload_waiters.pop(iid, []):
            cb()

    def unload_all(self) -> None:
        for inst in list(self.table):
            self.unload(inst, True, lambda: None)

    def idle(self) -> bool:
        return len(self.table) == 0 or all(i.state is State.FAILED for i in self.table)


def check_generate(body: dict, default_max: int) -> dict:
    """Validated generation settings from a request body (InvalidArgument on bad values)."""
    mt = body.get("max_tokens", default_max)
    if not 1 <= mt <= 1_000_000:
        raise InvalidArgument(f"max_tokens must be between 1 and 1000000, got {mt}")
    stops = body.get("stop") or []
    if len(stops) > 16 or not all(isinstance(s, str) and 0 < len(s) <= 256 for s in stops):
        raise InvalidArgument("stop must be a list of at most 16 non-empty strings of at most 256 characters")
    logprobs = body.get("logprobs", 0)
    if not 0 <= logprobs <= 20:
        raise InvalidArgument(f"logprobs must be between 0 and 20, got {logprobs}")
    return {"max_tokens": mt, "stops": stops, "logprobs": logprobs}
