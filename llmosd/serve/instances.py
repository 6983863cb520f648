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

Admission of generations (issue 13) is the engines': each instance has a paged KV pool sized
when it loads (``placement.pool_blocks`` from ``max_kv_bytes``, ``kv_block_size`` and the
model) and charged with its weights, so there is no per-request reservation here; an engine
answers Busy past ``max_waiting`` queued requests, and a prompt the pool could never hold
with InvalidArgument; their ``blocks`` reports fill the rows.  It returns the engines' stream
credits: each chunk written to a client's socket is one ``Engine.credit``.

Load options (issue 13): ``acquire(..., load_opts={"dtype", "quant"})`` loads with them
(``load_model(..., dtype, quant=)``; the instance's ``load_opts`` keeps them); asking for an
instance already loaded with other options is InvalidArgument (unload it first).

Memory (issue 12) is its ``Placement``'s (``serve.placement``, which it owns): before a load,
a swap-in or an adapter's attach, the estimate is planned there and the plan carried out, and
the work starts once the room is made; a refused plan ends the request with its OutOfMemory.
Loaded, an instance is charged what it measured; swapped ones come back on a request.
"""
from __future__ import annotations

import json
import logging
import threading
import time
from typing import Callable

import torch

from llmctl.errors import Busy, Cancelled, LlmosdError, LoadFailed, OutOfMemory
from llmosd.desired import Desired
from llmosd.mem.devices import device_memory, resolve_dtype
from llmosd.mem.manager import MemoryManager
from llmosd.mem.policy import size_text
from llmosd.models import lora
from llmosd.models.loader import load_model, resident_bytes
from llmosd.serve.adapters import Adapters, Ready
from llmosd.serve.engine import Engine
from llmosd.serve.loadopts import check_opts, load_kwargs, memory_device, resolve_opts, weights_text
from llmosd.serve.placement import (Placement, config_pool, configure, delegated, drop_runner, pool_blocks,
                                    position_bytes)
from llmosd.serve.request import Task
from llmosd.store.manifest import base_of
from llmosd.store.store import Store
from llmosd.table import Instance, ModelTable, State

log = logging.getLogger("llmosd.instances")


class KVLimit:
    """``max_kv_bytes`` for the pools of instances loaded from now on (a reload sets
    ``limit``; 0 = auto)."""

    def __init__(self, limit: int):
        self.limit = limit


class InstanceManager:
    job_holders = delegated("job_holders")     # the job runner's holders, once wired (main)
    preempt_job = delegated("preempt_job")     # (job id, reason): pause it for room (main)
    desired = Desired()                        # the desired state on disk, once restored (main)

    def __init__(self, post: Callable, store: Store, device: torch.device, dtype: torch.dtype,
                 *, max_batch: int, stream_buffer: int, max_kv_bytes: int = 0,
                 memory: MemoryManager | None = None, keep_alive: float = 300.0,
                 max_prefill_tokens: int = 128, max_waiting: int = 256, kv_block_size: int = 16,
                 quant: str = "auto", compile: str = "auto"):
        """``memory``: the daemon's memory manager (None: an unlimited one, for tests);
        ``keep_alive``: the default keep-alive of an instance (seconds; -1 forever).  The
        engine settings (``max_batch``, ``stream_buffer``, ``max_prefill_tokens``,
        ``max_waiting``, ``kv_block_size``, ``kv.limit`` = ``max_kv_bytes``, ``compile``,
        ``quant`` the default of loads that name none) are attributes: engines started later use new values."""
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
        self.max_prefill_tokens, self.max_waiting = max_prefill_tokens, max_waiting
        self.kv_block_size, self.quant, self.compile = kv_block_size, quant, compile
        self.kv = KVLimit(max(0, max_kv_bytes))
        self._device_bytes = 0                  # asked of the device at the first pool sizing
        self._tasks: dict = {}                      # request key -> Task: only these methods touch it
        self._unload_waiters: dict[int, list[Callable[[], None]]] = {}
        self._ready_waiters: dict[int, list[Ready]] = {}
        self.adapters = Adapters(post, store, self.place, acquire=self.acquire, running=self._running)
        self.acquire_adapter, self.detach = self.adapters.acquire, self.adapters.detach
        self.check_detachable, self.check_resident = self.adapters.check_detachable, self.adapters.check_resident

    max_kv_bytes = property(lambda self: self.kv.limit, lambda self, v: setattr(self.kv, "limit", max(0, v)))

    # -- loading ----------------------------------------------------------------------------
    def acquire(self, model: str, manifest: dict, digest: str, uid: int | None,
                on_ready: Ready, *, priority: int | None = None, keep_alive: float | None = None,
                pin: bool = False, displaced: list | None = None,
                load_opts: dict | None = None) -> Instance | None:
        """Call ``on_ready(inst, None)`` once an instance of this model version serves
        (loading or swapping one in if needed, after admission), or ``on_ready(None, err)``
        (OutOfMemory when admission refuses).  ``priority``, ``keep_alive`` and ``pin``, when
        given, apply to the instance (the latest wins).  What its room displaced is added to
        ``displaced`` (``Placement.make_room``'s rows).  ``load_opts``: {"dtype", "quant"}
        (absent, None or "auto": the daemon's); an instance loaded with other ones is
        InvalidArgument (raised).  Returns the instance (None: refused)."""
        inst = self.table.usable(model, digest)
        opts = self.resolve_opts(load_opts)
        if inst is not None:
            self.check_opts(inst, load_opts)
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
        ekey, weights, raw, pool = self._estimate(manifest, opts)
        need = weights + pool
        plan = self.place.plan(need, priority or 0, f"loading {model}")
        if not plan.ok:
            log.info("refused to load %s: %s", model, plan.message)
            on_ready(None, plan.error())
            return None
        inst = self.table.add(model, digest, self.mem_device, uid)
        inst.estimate_bytes, inst.kv_bytes, inst.keep_alive = weights, pool, self.place.keep_alive
        inst.load_opts = opts
        configure(inst, priority, keep_alive, pin)
        self.place.expect(inst.id, ekey, raw)
        self._ready_waiters[inst.id] = [on_ready]
        self.place.charge(inst, need)
        log.info("loading %s as instance %d on %s (estimate %d bytes: weights %d, KV pool %d)",
                 model, inst.id, self.device, need, weights, pool)
        shown = self.place.make_room(plan.actions, lambda: self._start_load(inst, manifest),
                                     room_for=model, fail=lambda err: self._no_room(inst, err))
        if displaced is not None:
            displaced.extend(shown)
        return inst

    def resolve_opts(self, load_opts: dict | None) -> dict:
        """{"dtype", "quant"} a load uses (``loadopts.resolve_opts``; default: the daemon's)."""
        return resolve_opts(load_opts, self.dtype, self._setting("quant"))

    check_opts = staticmethod(check_opts)      # (ops.serve asks the manager)

    def _estimate(self, manifest: dict, opts: dict) -> tuple:
        """(estimator key, corrected weights, raw weights, KV pool) bytes of a load."""
        dtype = resolve_dtype(opts["dtype"], self.device)
        ekey = ("instance", str(dtype).replace("torch.", "") + ("" if opts["quant"] in ("auto", "none")
                                                               else "-" + opts["quant"]))
        weights, raw = self.place.estimate(manifest, ekey, dtype.itemsize, opts["quant"])
        return ekey, weights, raw, self._pool_estimate(manifest, dtype.itemsize)[1]

    def load_bytes(self, manifest: dict, load_opts: dict | None = None) -> int:
        """A new instance's bytes on the device as the ledger will charge them (weights + KV
        pool, estimated): what a device-bytes quota counts."""
        return sum(self._estimate(manifest, self.resolve_opts(load_opts))[1::2])

    def _pool_estimate(self, manifest: dict, dtype_bytes: int) -> tuple[int, int]:
        """(blocks, bytes) of the KV pool a load of ``manifest`` will allocate (0, 0 when its
        config cannot be read here: tests without a store)."""
        try:
            config = json.loads(self.store.read_blob(manifest["config"]["digest"]))
        except Exception:
            return 0, 0
        return config_pool(config, dtype_bytes, **self._pool_sizes())

    def use_config(self, cfg) -> None:
        """Take the engine settings from ``cfg`` (the daemon's Config, which a reload
        updates) at each load from now on, instead of the constructor's values."""
        self._cfg = cfg

    def _setting(self, key: str):
        cfg = getattr(self, "_cfg", None)
        if cfg is not None and getattr(cfg, key, None) is not None:
            return getattr(cfg, key)
        return getattr(self, key)

    def _pool_sizes(self) -> dict:
        self._device_bytes = self._device_bytes or device_memory(self.device)
        return {"max_kv_bytes": max(0, int(self._setting("max_kv_bytes"))), "device_bytes": self._device_bytes,
                "max_batch": self._setting("max_batch"), "block_size": self._setting("kv_block_size")}

    def _engine_settings(self) -> dict:
        return {k: self._setting(k) for k in ("max_batch", "stream_buffer", "max_prefill_tokens", "max_waiting")}

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
            opts = inst.load_opts or self.resolve_opts(None)
            dtype = resolve_dtype(opts["dtype"], self.device)
            model, tok = load_model(self.store, manifest, self.device, dtype, **load_kwargs(opts.get("quant"), load_model))
            resident = resident_bytes(model)          # its own tensors, whatever else runs
            weights = weights_text(model)
            own = None                                # a merged classifier: its head
            if manifest.get("head") and base_of(manifest) is None:
                own = lora.read_adapter(self.store, manifest, inst.digest)
            c = model.config
            pb = position_bytes(c.num_hidden_layers, c.num_key_value_heads, c.head_dim, dtype.itemsize)
            sizes = self._pool_sizes()
            blocks = pool_blocks(context=c.max_position_embeddings, pos_bytes=pb, **sizes)
            engine = Engine(inst.id, model, tok, self.device,
                            lambda key, kind, body: self.post(self._on_engine, inst, engine, key, kind, body),
                            num_blocks=blocks, block_size=sizes["block_size"], compile=self._setting("compile"), own_head=own,
                            **self._engine_settings())
            resident += engine.own_head_bytes
            pool = engine.pool_bytes or blocks * sizes["block_size"] * pb
            del model                                 # the engine's runner holds the only reference
            self.post(self._loaded, inst, engine, (resident, pool, weights), time.perf_counter() - t0, None)
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
        self.post(self._loaded, inst, None, 0, 0.0, oom, True)

    def _loaded(self, inst: Instance, engine: Engine | None, measured, secs: float,
                err: LlmosdError | None, weights_oom: bool = False) -> None:
        """``measured``: (resident weight bytes, KV pool bytes, weights text) of a load that
        worked.  ``weights_oom``: the weights ran out of memory (the estimator learns; the KV
        pool's own OutOfMemory teaches the weights' estimate nothing)."""
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
            self.place.learn(inst.id, None, inst.estimate_bytes if weights_oom else None)
            self.place.uncharge(inst)
            log.warning("instance %d (%s) failed to load: %s", inst.id, inst.model, err)
        else:
            resident, inst.kv_bytes, inst.weights = measured
            inst.engine, inst.resident_bytes = engine, resident
            inst.engine_stats(engine.stats())
            inst.load_ms, inst.last_used = round(secs * 1000, 3), time.time()
            inst.transition(State.READY)
            self.place.learn(inst.id, resident)
            self.place.recharge(inst)
            for old in self.table.for_model(inst.model):   # a success clears earlier failures
                if old.state is State.FAILED:
                    self.table.remove(old.id)
            engine.start()
            log.info("instance %d (%s) ready in %.2fs, %d bytes resident (estimated %d), weights %s, "
                     "KV pool %d bytes (%d blocks of %d)", inst.id, inst.model, secs, resident,
                     inst.estimate_bytes, inst.weights, inst.kv_bytes, inst.kv_blocks_total, inst.kv_block_size)
            self.desired.sync(self.table)
        for cb in waiters:
            cb(None if err else inst, err)

    def _engine_for(self, inst: Instance, runner) -> Engine:
        """A new engine on a swapped-in instance's kept ``runner`` (on the loader thread)."""
        engine = Engine(inst.id, None, runner.tok, self.device,
                        lambda key, kind, body: self.post(self._on_engine, inst, engine, key, kind, body),
                        runner=runner, **self._engine_settings())
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
        """Hand the task to the instance's engine (which queues it, or answers Busy past
        max_waiting: issue 13 admits by the engine's pool and queue, nothing is reserved)."""
        inst.begin_request(task.req.adapter)
        task.inst, task.running = inst, True
        inst.engine.submit(task.req)

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

    def cancel_client(self, ident: bytes, reason: str = "client disconnected") -> int:
        """End every task of the client ``ident`` (task keys are (client, request id)): the
        unary ones too (score, embed, classify), which no stream cancels.  Returns how many."""
        mine = [k for k in self._tasks if isinstance(k, tuple) and k and k[0] == ident]
        for key in mine:
            self.cancel(key, reason)
        return len(mine)

    def _on_engine(self, inst: Instance, engine: Engine, key, kind: str, body: dict) -> None:
        if kind == "stopped":                   # swapped out, or gone (then ``_stopped``)
            self.place.engine_stopped(inst, engine, bool(body.get("swapped")))
            return
        if kind == "blocks":
            inst.engine_stats(body)
            return
        if kind == "adapter":
            self.adapters.installed(inst, key, body)
            return
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
            if task.running:                 # generations and calls alike
                task.inst.engine.cancel(key, "shutdown")
        self.place.stop_timer()
        self.unload_all()
        self.place.flush_waits()

    def unload_all(self) -> None:
        for inst in list(self.table):
            self.unload(inst, True, lambda: None)

    def idle(self) -> bool:
        return len(self.table) == 0 or all(i.state is State.FAILED for i in self.table)

