"""Instance lifecycle: load (on a loader thread), serve (through an engine), unload.

The ``InstanceManager`` owns the model table's rows and the engine threads behind them.  All of
its methods run on the control loop thread; loader and engine threads report back via ``post``.
It also admits generations against the KV-cache byte limit (``scheduler.KVBudget``, whose
docstring gives the design): reserved at ``submit``, shrunk on the engine's ``kv`` report,
released on the request's ``end``/``error`` or when its instance stops.
"""
from __future__ import annotations

import gc
import logging
import os
import threading
import time
from dataclasses import dataclass
from typing import Callable

import torch

from llmctl.errors import Busy, Cancelled, InvalidArgument, LlmosdError, LoadFailed, OutOfMemory
from llmosd.serve.engine import Engine, Request
from llmosd.models.loader import load_model, resident_bytes
from llmosd.serve.scheduler import KVBudget, kv_positions, prompt_token_bound, size_text
from llmosd.store.store import Store
from llmosd.table import Instance, ModelTable, State

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


def default_kv_limit(device: torch.device) -> int:
    """``max_kv_bytes = 0`` (auto): a quarter of the memory the caches live in, physical RAM
    on the CPU, the device's own memory on CUDA."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory // 4
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 4
    except (OSError, ValueError):
        return 1 << 30


class InstanceManager:
    def __init__(self, post: Callable, store: Store, device: torch.device, dtype: torch.dtype,
                 *, max_batch: int, stream_buffer: int, max_kv_bytes: int = 0):
        self.post, self.store, self.device, self.dtype = post, store, device, dtype
        self.max_batch, self.stream_buffer = max_batch, stream_buffer
        self.kv = KVBudget(max_kv_bytes if max_kv_bytes > 0 else default_kv_limit(device))
        log.info("KV-cache limit %s%s", size_text(self.kv.limit), "" if max_kv_bytes > 0 else " (auto)")
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
        """Hand the task to the instance's engine, once a generation's KV cache is admitted;
        a refusal (Busy, or too big ever to fit) ends the task's stream with that error."""
        req = task.req
        if isinstance(req, Request):
            try:
                req.kv_positions = self._admit(inst, req)
            except LlmosdError as e:
                if self.tasks.get(req.key) is task:
                    self.tasks.pop(req.key)
                task.stream.error(e)
                return
        inst.begin_request()
        task.inst, task.running = inst, True
        inst.engine.submit(req)

    def _admit(self, inst: Instance, req: Request) -> int:
        """Reserve an upper bound of ``req``'s KV cache; returns the positions reserved."""
        eng = inst.engine
        bound = prompt_token_bound(req.prompt, req.messages)
        positions = kv_positions(eng.context, bound, req.max_tokens)
        self.kv.admit(req.key, inst.id, positions * eng.kv_position_bytes, eng.kv_position_bytes, bound)
        return positions

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
        if kind == "kv":
            self.kv.shrink(key, body["bytes"])
            return
        if kind in ("end", "error"):       # whoever still holds the task: the bytes are free
            self.kv.release(key)
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
        self.kv.release_owner(inst.id)
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

    def shutdown(self, err: LlmosdError) -> None:
        """Every request ends with ``err`` (engines are told to stop them), then all unload."""
        for key, task in list(self.tasks.items()):
            self.tasks.pop(key)
            task.stream.error(err)
            if task.running and isinstance(task.req, Request):
                task.inst.engine.cancel(key, "shutdown")
        self.unload_all()

    def unload_all(self) -> None:
        for inst in list(self.table):
            self.unload(inst, True, lambda: None)

    def idle(self) -> bool:
        return len(self.table) == 0 or all(i.state is State.FAILED for i in self.table)


def _int_setting(body: dict, key: str, default: int, lo: int, hi: int) -> int:
    """``body[key]`` as an int in lo..hi; absent or nil means ``default``."""
    v = body.get(key)
    if v is None:
        return default
    if not isinstance(v, int) or isinstance(v, bool) or not lo <= v <= hi:
        raise InvalidArgument(f"{key} must be an integer between {lo} and {hi:,}, got {v!r:.40}")
    return v


def check_generate(body: dict, default_max: int) -> dict:
    """Validated generation settings from a request body (InvalidArgument on bad values;
    a setting given as nil counts as not given)."""
    mt = _int_setting(body, "max_tokens", default_max, 1, 1_000_000)
    stops = body.get("stop") or []
    if not isinstance(stops, list) or len(stops) > 16 or \
            not all(isinstance(s, str) and 0 < len(s) <= 256 for s in stops):
        raise InvalidArgument("stop must be a list of at most 16 non-empty strings of at most 256 characters")
    logprobs = _int_setting(body, "logprobs", 0, 0, 20)
    return {"max_tokens": mt, "stops": stops, "logprobs": logprobs}
