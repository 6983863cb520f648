"""Instance lifecycle: load (on a loader thread), serve (through an engine), unload.

The ``InstanceManager`` owns the model table's rows, the engine threads behind them and the
registry of tasks (requests the daemon answers for): ``run`` registers a task and hands it to
an instance once one serves, ``cancel`` and ``shutdown`` end tasks; nothing else reads or
writes the registry or talks to an engine.  All of its methods run on the control loop thread;
loader and engine threads report back via ``post``.  It never runs device work itself: loads
run on loader threads, and an engine frees its model's memory on its own thread as it ends.

Adapters and classifiers run on their base's instance, the way forked processes share their
parent's pages: acquiring one acquires (loads if needed) the one instance of its base, then
reads the adapter on a loader thread (``lora.read_adapter``) and has the engine install it
(``Engine.add_adapter``, answered by an ``adapter`` message with its bytes) once, however many
requests ask for it meanwhile; its requests carry its key (``Request.adapter``).  ``detach``
takes one out again; an instance that unloads drops its adapters with it.

It also admits generations against the KV-cache byte limit (``scheduler.KVBudget``, whose
docstring gives the design): reserved at ``submit``, shrunk on the engine's ``kv`` report,
released on the request's ``end``/``error`` or when its instance stops.  And it returns the
engine's stream credits: each chunk written to a client's socket is one ``Engine.credit``.

Memory (issue 12) is admitted through the memory manager (``mem.manager``): before a load, a
swap-in or an adapter's attach, the estimate (``mem.estimate``, corrected by what earlier loads
measured) is planned against the device's budget with every holder (this table's instances, the
job runner's jobs through ``job_holders``); the plan's actions are carried out (an idle instance
swapped to the host tier or unloaded, a preemptible job paused through ``preempt_job``) and the
work starts once they have left; a refused plan ends the request with its OutOfMemory.  Loaded,
an instance is charged its measured bytes (the estimator learns), the KV cache reserved by
running requests is charged apart (``("kv", 0)``), and a timer (``start_timer``) unloads
instances whose keep-alive ran out.  Swapped instances keep their ``Runner`` (weights moved to
host RAM); a request brings them back with a new engine on it.
"""
from __future__ import annotations

import logging
import threading
import time
from typing import Callable

import torch

from llmctl.errors import Busy, Cancelled, LlmosdError, LoadFailed, OutOfMemory, from_wire
from llmosd.mem.devices import device_memory
from llmosd.mem.estimate import estimate_instance
from llmosd.mem.manager import MemoryManager
from llmosd.mem.policy import Action, Holder, Plan, plan_admission
from llmosd.models import lora
from llmosd.models.loader import load_model, resident_bytes
from llmosd.serve.engine import Engine
from llmosd.serve.request import Request, Task
from llmosd.serve.scheduler import KVBudget, kv_positions, prompt_token_bound, size_text
from llmosd.store.manifest import base_of, kind_of
from llmosd.store.store import Store
from llmosd.table import Attached, Instance, ModelTable, State

log = logging.getLogger("llmosd.instances")

Ready = Callable[[Instance | None, LlmosdError | None], None]

TICK_S = 0.5          # how often keep-alives are checked
WAIT_LIMIT_S = 60.0   # a load waiting longer for its evictions (a job that does not pause) goes on
KV_KEY = ("kv", 0)    # the ledger's key of the KV cache reserved by running requests


def default_kv_limit(device: torch.device) -> int:
    """``max_kv_bytes = 0`` (auto): a quarter of the memory the caches live in, physical RAM
    on the CPU, the device's own memory on CUDA."""
    return device_memory(device) // 4


def _key(inst: Instance) -> tuple[str, int]:
    return ("instance", inst.id)


def _drop(runner) -> None:
    """Let go of a runner that no engine runs (swapped, or never started): its model and
    heads are freed with the last reference."""
    if runner is not None:
        runner.model = None
        runner.adapters.clear()


class InstanceManager:
    def __init__(self, post: Callable, store: Store, device: torch.device, dtype: torch.dtype,
                 *, max_batch: int, stream_buffer: int, max_kv_bytes: int = 0,
                 memory: MemoryManager | None = None, keep_alive: float = 300.0):
        """``memory``: the daemon's memory manager (None: an unlimited one, for tests);
        ``keep_alive``: the default keep-alive of an instance (seconds; -1 forever)."""
        self.post, self.store, self.device, self.dtype = post, store, device, dtype
        self.memory = memory if memory is not None else MemoryManager({str(device): 1 << 62}, 0)
        self.keep_alive = keep_alive
        self.job_holders: Callable[[], list[Holder]] = lambda: []   # the job runner's, once wired
        self.preempt_job: Callable[[int, str], None] | None = None
        self._waits: list[tuple[list, Callable[[], None], float]] = []   # (keys leaving, go, since)
        self._leaving: set[int] = set()     # instances swapping out (their engines still stop)
        self._runners: dict = {}            # swapped instance id -> its Runner (on the host)
        self._estimates: dict = {}          # instance id / (id, digest) -> (estimator key, raw estimate)
        self._timer_stop = threading.Event()
        self.memory.on_freed(self._check_waits)
        self.max_batch, self.stream_buffer = max_batch, stream_buffer
        self.kv = KVBudget(max_kv_bytes if max_kv_bytes > 0 else default_kv_limit(device))
        log.info("KV-cache limit %s%s", size_text(self.kv.limit), "" if max_kv_bytes > 0 else " (auto)")
        self.table = ModelTable()
        self._tasks: dict = {}                      # request key -> Task: only these methods touch it
        self._unload_waiters: dict[int, list[Callable[[], None]]] = {}
        self._ready_waiters: dict[int, list[Ready]] = {}
        self._adapter_waiters: dict[tuple[int, str], list[Ready]] = {}   # (instance, adapter key)

    # -- loading ----------------------------------------------------------------------------
    def acquire(self, model: str, manifest: dict, digest: str, uid: int | None,
                on_ready: Ready, *, priority: int | None = None, keep_alive: float | None = None,
                pin: bool = False) -> Instance | None:
        """Call ``on_ready(inst, None)`` once an instance of this model version serves
        (loading or swapping one in if needed, after admission), or ``on_ready(None, err)``
        (OutOfMemory when admission refuses).  ``priority``, ``keep_alive`` and ``pin``, when
        given, apply to the instance (the latest wins).  Returns the instance (None: refused)."""
        inst = self.table.usable(model, digest)
        if inst is not None:
            self._configure(inst, priority, keep_alive, pin)
            if inst.serving:
                on_ready(inst, None)
            elif inst.state is State.SWAPPED:
                self._swap_in(inst, on_ready)
            else:
                self._ready_waiters.setdefault(inst.id, []).append(on_ready)
            return inst
        raw = estimate_instance(manifest, self.dtype.itemsize)
        ekey = ("instance", str(self.dtype).replace("torch.", ""))
        need = self.memory.estimator.correct(ekey, raw)
        plan = self._plan(need, priority or 0, f"loading {model}")
        if not plan.ok:
            log.info("refused to load %s: %s", model, plan.message)
            on_ready(None, plan.error())
            return None
        inst = self.table.add(model, digest, str(self.device), uid)
        inst.estimate_bytes, inst.keep_alive = need, self.keep_alive
        self._configure(inst, priority, keep_alive, pin)
        self._estimates[inst.id] = (ekey, raw)
        self._ready_waiters[inst.id] = [on_ready]
        self.memory.charge(_key(inst), inst.device, need)
        log.info("loading %s as instance %d on %s (estimate %d bytes)", model, inst.id, self.device, need)
        self.make_room(plan.actions, lambda: self._start_load(inst, manifest))
        return inst

    @staticmethod
    def _configure(inst: Instance, priority: int | None, keep_alive: float | None, pin: bool) -> None:
        if priority is not None:
            inst.priority = priority
        if keep_alive is not None:
            inst.keep_alive = -1.0 if keep_alive < 0 else float(keep_alive)
        if pin:
            inst.pinned = True

    def _start_load(self, inst: Instance, manifest: dict) -> None:
        if inst.state is State.UNLOADING:           # unloaded while it waited for room
            self._loaded(inst, None, 0, 0.0, None)
            return
        threading.Thread(target=self._load, args=(inst, manifest), name=f"load-{inst.id}",
                         daemon=True).start()

    def _load(self, inst: Instance, manifest: dict) -> None:
        t0 = time.perf_counter()
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
            if self.device.type == "cuda":          # what the failed load allocated goes back
                torch.cuda.empty_cache()
            self.post(self._loaded, inst, None, 0, 0.0, OutOfMemory(
                f"not enough memory on {self.device} to load {inst.model} (estimated "
                f"{size_text(inst.estimate_bytes)}); the estimate will be higher next time"))
        except LlmosdError as e:
            self.post(self._loaded, inst, None, 0, 0.0, e)
        except Exception as e:
            log.exception("load of %s failed", inst.model)
            self.post(self._loaded, inst, None, 0, 0.0, LoadFailed(f"loading {inst.model} failed: {e}"))

    def _loaded(self, inst: Instance, engine: Engine | None, resident: int, secs: float,
                err: LlmosdError | None) -> None:
        waiters = self._ready_waiters.pop(inst.id, [])
        ekey, raw = self._estimates.pop(inst.id, (None, 0))
        if inst.state is State.UNLOADING:          # unloaded (forced) while it was loading
            err = err or Cancelled(f"instance {inst.id} was unloaded while loading")
            if engine is not None:
                _drop(engine.runner)                # never started: nothing else holds it
            self.table.remove(inst.id)
            self.memory.uncharge(_key(inst))
            self._notify_unloaded(inst.id)
        elif err is not None:
            inst.transition(State.FAILED, str(err))
            if isinstance(err, OutOfMemory) and ekey is not None:   # rolled back; learn from it
                self.memory.estimator.learn_oom(ekey, raw, inst.estimate_bytes)
            self.memory.uncharge(_key(inst))
            log.warning("instance %d (%s) failed to load: %s", inst.id, inst.model, err)
        else:
            inst.engine, inst.resident_bytes = engine, resident
            inst.load_ms, inst.last_used = round(secs * 1000, 3), time.time()
            inst.transition(State.READY)
            if ekey is not None:
                self.memory.estimator.learn(ekey, raw, resident)
            self._recharge(inst)
            for old in self.table.for_model(inst.model):   # a success clears earlier failures
                if old.state is State.FAILED:
                    self.table.remove(old.id)
            engine.start()
            log.info("instance %d (%s) ready in %.2fs, %d bytes resident (estimated %d)", inst.id,
                     inst.model, secs, resident, inst.estimate_bytes)
        for cb in waiters:
            cb(None if err else inst, err)

    # -- memory: admission, eviction, swapping ----------------------------------------------
    def instance_holders(self, busy: frozenset = frozenset()) -> list[Holder]:
        """The table's instances as holders (those swapping out and those in ``busy`` are
        never chosen).  For the job runner's admissions."""
        return self.table.holders(frozenset(busy) | frozenset(self._leaving))

    def holders(self, busy: frozenset = frozenset()) -> list[Holder]:
        """Everything holding memory: the instances and the job runner's jobs."""
        return self.instance_holders(busy) + list(self.job_holders())

    def _plan(self, need: int, priority: int, for_what: str, busy: frozenset = frozenset(),
              host_freed: int = 0) -> Plan:
        """The memory manager's plan; ``host_freed``: host-tier bytes that leave the host as
        this need is met (a swap-in's own), room for what the plan swaps out."""
        if not host_freed:
            return self.memory.plan(need, str(self.device), priority, self.holders(busy), for_what)
        m, dev = self.memory, str(self.device)
        return plan_admission(need, dev, priority, m.holders(self.holders(busy)), m.budget(dev),
                              m.host_budget, max(0, m.host_used() - host_freed), for_what=for_what)

    def make_room(self, actions: tuple[Action, ...], go: Callable[[], None]) -> None:
        """Carry out a plan's ``actions`` (swap or unload instances, pause jobs), then call
        ``go()`` once all of them have left the device (at once when there are none; after
        ``WAIT_LIMIT_S`` anyway).  Also for the job runner's admissions."""
        keys = []
        for a in actions:
            h = a.holder
            if h.kind == "instance":
                try:
                    inst = self.table.get(h.id)
                except LlmosdError:
                    continue
                if a.kind == "swap" and inst.engine is not None:
                    self._swap_out(inst, a.reason)
                    keys.append((_key(inst), "host"))
                else:
                    self._evict(inst, a.reason)
                    keys.append((_key(inst), None))
            elif h.kind == "job" and self.preempt_job is not None:
                log.info("pausing job %d (%s): %s", h.id, h.name, a.reason)
                self.preempt_job(h.id, a.reason)
                keys.append((("job", h.id), None))
        if keys:
            self._waits.append((keys, go, time.monotonic()))
            self._check_waits()
        else:
            go()

    def _check_waits(self) -> None:
        """Start the admissions whose evictions are done (a key gone from the ledger, or on
        the host tier for a swap), and those that waited too long."""
        def gone(key, tier):
            c = self.memory.charged(key)
            return c is None or (tier is not None and c[1] == tier)
        now, done, keep = time.monotonic(), [], []
        for w in self._waits:
            stale = now - w[2] > WAIT_LIMIT_S
            if stale or all(gone(k, t) for k, t in w[0]):
                if stale:
                    log.warning("evictions did not finish in %.0fs; going on", WAIT_LIMIT_S)
                done.append(w[1])
            else:
                keep.append(w)
        self._waits = keep
        for go in done:
            go()

    def _recharge(self, inst: Instance) -> None:
        """Tell the ledger what ``inst`` holds now (and where)."""
        tier = "device" if inst.id in self._leaving else inst.tier
        self.memory.charge(_key(inst), inst.device, inst.charge_bytes(), tier)

    def _charge_kv(self) -> None:
        used = self.kv.used
        if used:
            self.memory.charge(KV_KEY, str(self.device), used)
        else:
            self.memory.uncharge(KV_KEY)

    def _evict(self, inst: Instance, reason: str) -> None:
        """Unload ``inst`` to make room or because its keep-alive ran out (logged, and kept in
        the recent evictions)."""
        log.info("evicting instance %d (%s): %s", inst.id, inst.model, reason)
        self.memory.note_eviction({"model": inst.model, "instance": inst.id, "reason": reason,
                                   "to": "store"})
        self.unload(inst, True, lambda: None)

    def _swap_out(self, inst: Instance, reason: str) -> None:
        """Move ``inst`` to the host tier: its engine stops keeping the model (moved to host
        RAM); ``stopped`` then charges it on the host tier."""
        log.info("swapping instance %d (%s) out to host memory: %s", inst.id, inst.model, reason)
        self.memory.note_eviction({"model": inst.model, "instance": inst.id, "reason": reason,
                                   "to": "host"})
        inst.transition(State.SWAPPED)
        inst.swaps += 1
        self._leaving.add(inst.id)
        inst.engine.stop(swap=True)

    def _swapped_out(self, inst: Instance) -> None:
        """Its engine ended with the model on the host: keep the runner, charge the host."""
        self._leaving.discard(inst.id)
        self._runners[inst.id] = inst.engine.runner
        inst.engine = None
        self._recharge(inst)
        log.info("instance %d (%s) swapped out, %d bytes on the host", inst.id, inst.model,
                 inst.charge_bytes())
        self._check_waits()
        if self._ready_waiters.get(inst.id):          # asked for again meanwhile
            self._start_swap_in(inst)

    def _swap_in(self, inst: Instance, on_ready: Ready) -> None:
        waiters = self._ready_waiters.setdefault(inst.id, [])
        waiters.append(on_ready)
        if len(waiters) == 1 and inst.id not in self._leaving:
            self._start_swap_in(inst)

    def _start_swap_in(self, inst: Instance) -> None:
        need = inst.charge_bytes()
        plan = self._plan(need, inst.priority, f"swapping in {inst.model} (instance {inst.id})",
                          frozenset({inst.id}), host_freed=need)
        if not plan.ok:
            log.info("refused to swap in instance %d (%s): %s", inst.id, inst.model, plan.message)
            for cb in self._ready_waiters.pop(inst.id, []):
                cb(None, plan.error())
            return
        inst.transition(State.LOADING)
        self.memory.charge(_key(inst), inst.device, need)
        self.make_room(plan.actions, lambda: self._spawn_swap_in(inst))

    def _spawn_swap_in(self, inst: Instance) -> None:
        runner = self._runners.pop(inst.id, None)
        if inst.state is State.UNLOADING or runner is None:
            self._swapped_in(inst, None, runner, 0.0, None)
            return
        threading.Thread(target=self._swap_in_thread, args=(inst, runner), name=f"load-{inst.id}-swap",
                         daemon=True).start()

    def _swap_in_thread(self, inst: Instance, runner) -> None:
        t0 = time.perf_counter()
        try:
            runner.onload()
            engine = Engine(inst.id, None, runner.tok, self.device,
                            lambda key, kind, body: self.post(self._on_engine, inst, engine, key, kind, body),
                            max_batch=self.max_batch, stream_buffer=self.stream_buffer, runner=runner)
            self.post(self._swapped_in, inst, engine, runner, time.perf_counter() - t0, None)
        except LlmosdError as e:
            self.post(self._swapped_in, inst, None, runner, 0.0, e)
        except Exception as e:
            log.exception("swap-in of %s failed", inst.model)
            self.post(self._swapped_in, inst, None, runner, 0.0, LoadFailed(f"swapping in {inst.model} failed: {e}"))

    def _swapped_in(self, inst: Instance, engine: Engine | None, runner, secs: float,
                    err: LlmosdError | None) -> None:
        if inst.state is State.LOADING and err is None and engine is not None:
            inst.engine, inst.swap_in_ms, inst.last_used = engine, round(secs * 1000, 3), time.time()
            inst.transition(State.READY)
            self._recharge(inst)
            engine.start()
            log.info("instance %d (%s) swapped in in %.3fs", inst.id, inst.model, secs)
            for cb in self._ready_waiters.pop(inst.id, []):
                cb(inst, None)
            return
        _drop(runner)                                # its memory goes back
        err = err or Cancelled(f"instance {inst.id} was unloaded while it swapped in")
        if inst.state is State.LOADING:
            inst.transition(State.FAILED, str(err))
            self.memory.uncharge(_key(inst))
            inst.adapters.clear()
            log.warning("instance %d (%s) failed to swap in: %s", inst.id, inst.model, err)
        else:
            self._stopped(inst)
        for cb in self._ready_waiters.pop(inst.id, []):
            cb(None, err)

    def start_timer(self, every: float = TICK_S) -> None:
        """Check keep-alives (and stale waits) every ``every`` seconds, on the control loop."""
        def loop():
            while not self._timer_stop.wait(every):
                self.post(self._tick)
        threading.Thread(target=loop, name="keep-alive", daemon=True).start()

    def _tick(self) -> None:
        ka = {i.id: i.keep_alive for i in self.table}
        for iid in self.memory.expired(self.table.holders(frozenset(self._leaving)), ka):
            inst = self.table.get(iid)
            self._evict(inst, f"keep-alive of {ka[iid]:g}s expired")
        if self._waits:
            self._check_waits()

    def _after_request(self, inst: Instance) -> None:
        """A request ended: keep-alive 0 unloads the instance as soon as it is idle."""
        if inst.keep_alive == 0 and inst.idle and not inst.pinned:
            self._evict(inst, "keep-alive 0: unloaded after its last request")

    # -- adapters ---------------------------------------------------------------------------
    def acquire_adapter(self, base: tuple[str, dict, str], model: str, manifest: dict, digest: str,
                        uid: int | None, on_ready: Ready, **opts) -> Instance | None:
        """Call ``on_ready(inst, None)`` once the adapter ``model`` (manifest ``manifest``,
        key ``digest``) is installed on a serving instance of ``base`` = (name, manifest,
        digest) (loading both if needed), or ``on_ready(None, err)``.  Returns the instance.
        ``opts`` (priority, keep_alive, pin) apply to the base's instance, as ``acquire``."""
        bcanon, bman, bdigest = base

        def base_ready(inst, err):
            if err is not None:
                on_ready(None, err)
            else:
                self._attach(inst, model, manifest, digest, uid, on_ready)
        return self.acquire(bcanon, bman, bdigest, uid, base_ready, **opts)

    def _attach(self, inst: Instance, model: str, manifest: dict, digest: str, uid: int | None,
                on_ready: Ready) -> None:
        if not inst.serving:                       # unloaded between its ready and this call
            on_ready(None, Cancelled(f"instance {inst.id} ({inst.model}) was unloaded"))
            return
        a = inst.adapters.get(digest)
        if a is not None and a.ready:
            on_ready(inst, None)
            return
        if a is not None:
            self._adapter_waiters.setdefault((inst.id, digest), []).append(on_ready)
            return
        # the first to ask reads and installs it, once admitted (the base is not a candidate)
        raw = estimate_instance(manifest, self.dtype.itemsize)
        ekey = ("adapter", kind_of(manifest))
        need = self.memory.estimator.correct(ekey, raw)
        plan = self._plan(need, inst.priority, f"attaching {model} to instance {inst.id}",
                          frozenset({inst.id}))
        if not plan.ok:
            log.info("refused to attach %s to instance %d: %s", model, inst.id, plan.message)
            on_ready(None, plan.error())
            return
        self._adapter_waiters.setdefault((inst.id, digest), []).append(on_ready)
        a = inst.attach(model, digest, uid, kind_of(manifest))
        a.estimate_bytes = need
        self._estimates[(inst.id, digest)] = (ekey, raw)
        self._recharge(inst)
        log.info("attaching %s to instance %d (%s), estimate %d bytes", model, inst.id, inst.model, need)

        def go():
            if inst.adapters.get(digest) is a and inst.serving:
                threading.Thread(target=self._read_adapter, args=(inst, a, manifest),
                                 name=f"load-{inst.id}-adapter", daemon=True).start()
        self.make_room(plan.actions, go)

    def _read_adapter(self, inst: Instance, a: Attached, manifest: dict) -> None:
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
        self.post(self._adapter_read, inst, a, adapter, err)

    def _adapter_read(self, inst: Instance, a: Attached, adapter, err: LlmosdError | None) -> None:
        if inst.adapters.get(a.digest) is not a or not inst.serving:
            return                                 # detached or unloaded meanwhile: told then
        if err is not None:
            self._adapter_installed(inst, a.digest, {"error": err.to_wire(), "token": a.token})
            return
        inst.engine.add_adapter(a.digest, adapter, a.token)   # answered by an "adapter" message

    def _adapter_installed(self, inst: Instance, key: str, body: dict) -> None:
        """The engine's answer to the install of attach ``body["token"]``.  Only the current
        attach's answer counts: one to an attach detached meanwhile (the engine dropped that
        install after it) must not mark a later attach of the same digest ready."""
        a = inst.adapters.get(key)
        if a is None or a.ready or body.get("token") != a.token:
            return                                 # detached meanwhile (the engine dropped it)
        waiters = self._adapter_waiters.pop((inst.id, key), [])
        err = from_wire(body["error"]) if "error" in body else None
        ekey, raw = self._estimates.pop((inst.id, key), (None, 0))
        if err is not None:
            inst.detach(key)
            log.warning("adapter %s failed to install on instance %d: %s", a.model, inst.id, err)
        else:
            a.resident_bytes, a.ready, a.loaded_at = int(body["bytes"]), True, time.time()
            if ekey is not None:
                self.memory.estimator.learn(ekey, raw, a.resident_bytes)
            log.info("adapter %s installed on instance %d (%s), %d bytes", a.model, inst.id,
                     inst.model, a.resident_bytes)
        if inst.state not in (State.FAILED, State.UNLOADING):
            self._recharge(inst)
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
        if not force:
            self.check_detachable(inst, a)
        for key, task in list(self._tasks.items()):
            if task.inst is inst and task.running and task.req.adapter == a.digest:
                inst.engine.cancel(key, "unloaded", Cancelled(
                    f"{a.model} was unloaded from instance {inst.id} while this request ran"))
        inst.detach(a.digest)
        self._estimates.pop((inst.id, a.digest), None)
        if inst.state not in (State.FAILED, State.UNLOADING):
            self._recharge(inst)
        if inst.engine is not None:
            inst.engine.drop_adapter(a.digest)
        for cb in self._adapter_waiters.pop((inst.id, a.digest), []):
            cb(None, Cancelled(f"{a.model} was unloaded while it loaded"))
        log.info("detached %s from instance %d (%s)", a.model, inst.id, inst.model)

    @staticmethod
    def check_detachable(inst: Instance, a: Attached) -> None:
        """Raise Busy if the adapter ``a`` cannot be detached from ``inst`` without --force."""
        if not a.ready:
            raise Busy(f"{a.model} is still loading on instance {inst.id}",
                       hint="wait for it to be ready, or use --force")
        if a.active_requests:
            raise Busy(f"{a.model} has {a.active_requests} active request(s) on instance {inst.id}",
                       hint="wait for them to finish, or use --force to cancel them")

    def _drop_adapters(self, inst: Instance, err: LlmosdError) -> None:
        """The instance is going: whoever waits for one of its adapters gets ``err``."""
        for digest in list(inst.adapters):
            for cb in self._adapter_waiters.pop((inst.id, digest), []):
                cb(None, err)

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
        self.kv.admit(req.key, inst.id, positions * eng.kv_position_bytes, eng.kv_position_bytes, bound)
        self._charge_kv()
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
            if body.get("swapped") and inst.state is State.SWAPPED:
                self._swapped_out(inst)
                return
            if body.get("swapped"):                 # unloaded while it swapped out
                _drop(engine.runner)
            self._leaving.discard(inst.id)
            self._stopped(inst)
            return
        if kind == "kv":
            self.kv.shrink(key, body["bytes"])
            self._charge_kv()
            return
        if kind == "adapter":
            self._adapter_installed(inst, key, body)
            return
        if kind in ("end", "error"):       # whoever still holds the task: the bytes are free
            self.kv.release(key)
            self._charge_kv()
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
        self._after_request(inst)

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
        swapped = inst.state is State.SWAPPED and inst.id not in self._leaving
        inst.transition(State.UNLOADING)
        self._drop_adapters(inst, Cancelled(f"instance {inst.id} ({inst.model}) was unloaded"))
        self._unload_waiters.setdefault(inst.id, []).append(on_done)
        for key, task in list(self._tasks.items()):
            if task.inst is inst and task.running:
                inst.engine.cancel(key, "unloaded", Cancelled(
                    f"instance {inst.id} ({inst.model}) was unloaded while this request ran"))
        log.info("unloading instance %d (%s)", inst.id, inst.model)
        if swapped:                        # on the host, no engine: its runner just goes
            runner = self._runners.pop(inst.id, None)
            _drop(runner)
            self._stopped(inst)
        elif inst.engine is not None and inst.id not in self._leaving:
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
        self._charge_kv()
        for key, task in list(self._tasks.items()):   # anything the engine never answered
            if task.inst is inst and task.running:
                self._tasks.pop(key)
                task.stream.error(Cancelled(f"instance {inst.id} was unloaded"))
        if inst.state is not State.UNLOADING:        # the engine died on its own
            inst.transition(State.UNLOADING)
        self._drop_adapters(inst, Cancelled(f"instance {inst.id} was unloaded"))
        inst.adapters.clear()
        inst.engine = None              # its thread already dropped the model and freed the memory
        self.table.remove(inst.id)
        self.memory.uncharge(_key(inst))
        log.info("instance %d (%s) unloaded", inst.id, inst.model)
        self._notify_unloaded(inst.id)

    def _notify_unloaded(self, iid: int) -> None:
        for cb in self._unload_waiters.pop(iid, []):
            cb()

    def _flush_waits(self) -> None:
        """Shutting down: whatever waits for evictions goes on now (and finds its row
        unloading)."""
        waits, self._waits = self._waits, []
        for _, go, _ in waits:
            go()

    def shutdown(self, err: LlmosdError) -> None:
        """Every request ends with ``err`` (engines are told to stop them), then all unload."""
        for key, task in list(self._tasks.items()):
            self._tasks.pop(key)
            self._unqueue(task)
            task.stream.error(err)
            if task.running and isinstance(task.req, Request):
                task.inst.engine.cancel(key, "shutdown")
        self._timer_stop.set()
        self.unload_all()
        self._flush_waits()

    def unload_all(self) -> None:
        for inst in list(self.table):
            self.unload(inst, True, lambda: None)

    def idle(self) -> bool:
        return len(self.table) == 0 or all(i.state is State.FAILED for i in self.table)

