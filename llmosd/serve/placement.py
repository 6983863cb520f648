"""Where the instances' memory goes (issue 12): admission, evictions and swaps, keep-alives,
and the memory manager's ledger kept true.

``Placement`` is owned by ``serve.instances.InstanceManager`` and runs on the control loop (a
swap-in's reads run on a loader thread and report back through ``post``).  It decides nothing
itself: ``mem.policy`` plans through the memory manager (``mem.manager``); this carries the plans
out.  Its contract:

- ``estimate``, ``expect``, ``learn``: an instance's or an adapter's estimate (``mem.estimate``,
  corrected by what earlier loads measured), and the estimator taught what a load measured;
- ``plan(need, priority, for_what)`` against every holder (the table's instances, the job
  runner's jobs through ``job_holders``); ``make_room(actions, go)`` carries a plan's actions out
  (an idle instance swapped to the host tier or unloaded, a preemptible job paused through
  ``preempt_job``) and calls ``go()`` once all of them have left the device (at once when there
  are none; after ``WAIT_LIMIT_S`` only if the device is within its budget by then, else the
  requester's ``fail``), and returns what it displaced (the load's reply says it); reasons are
  plain ("room for t3:latest", "keep-alive expired"), with ``why`` evicted|expired apart;
- swapping instances count on the host tier from the moment they are chosen (``plan``), so two
  plans in a row never fill the host's room twice;
- ``charge``, ``recharge``, ``uncharge``: the ledger holds each instance (on its tier): its
  weights and (issue 13) its paged KV pool, sized once when its engine starts (``pool_blocks``)
  and allocated whole, so a running request never needs memory the budget did not admit;
- swaps: ``swap_out`` has an instance's engine stop keeping its ``Runner`` (weights moved to host
  RAM); ``swap_in`` brings it back, once admitted, with a new engine on that runner (out of
  memory doing it: it stays swapped, runner and host charge kept, and its waiters fail);
- keep-alive: ``start_timer`` checks expiries every ``TICK_S`` (``tick``); ``after_request``
  unloads a keep-alive 0 instance once idle; ``configure`` sets pin, priority and keep-alive.

What it needs of its owner comes in as callables (``unload``, ``stopped``, ``engine_for``,
``waiting``, ``take_waiters``): it never touches the owner's tasks or talks to an engine but to
stop it.  No torch here.
"""
from __future__ import annotations

import logging
import threading
import time
from typing import Callable

from llmctl.errors import Cancelled, LlmosdError, LoadFailed, OutOfMemory
from llmosd.mem.estimate import estimate_instance
from llmosd.mem.manager import MemoryManager
from llmosd.mem.policy import Action, Holder, Plan, plan_admission
from llmosd.table import Instance, ModelTable, State

log = logging.getLogger("llmosd.instances")

TICK_S = 0.5          # how often keep-alives are checked
WAIT_LIMIT_S = 60.0   # a load waiting longer for its evictions (a job that does not pause) goes on
KV_AUTO_MAX = 1 << 30  # max_kv_bytes 0 (auto): an instance's pool is at most 1 GiB
KV_AUTO_MIN_BLOCKS = 4  # ... and at least this many blocks (not a full context: 128k would be huge)
_POLICY_PREFIXES = ("swapped to host: ", "evicted: ", "preempted: ")


def position_bytes(layers: int, kv_heads: int, head_dim: int, dtype_bytes: int) -> int:
    """Bytes one position of a sequence takes in the KV cache: a key and a value per layer."""
    return layers * 2 * kv_heads * head_dim * dtype_bytes


def pool_blocks(max_kv_bytes: int, device_bytes: int, context: int, pos_bytes: int,
                max_batch: int, block_size: int) -> int:
    """Blocks of ``block_size`` positions in an instance's KV pool.  ``max_kv_bytes`` > 0: that
    many bytes, as given (at least one block).  0 (auto): a quarter of the device's memory
    (RAM, or the GPU's), at most ``KV_AUTO_MAX`` and at most what ``max_batch`` full
    contexts can use, but at least ``KV_AUTO_MIN_BLOCKS``; not necessarily a full context (a
    prompt longer than the pool is refused, naming the fix: raise max_kv_bytes)."""
    block = max(1, block_size * pos_bytes)
    if max_kv_bytes > 0:
        return max(1, max_kv_bytes // block)
    limit = min(device_bytes // 4, KV_AUTO_MAX, max(1, max_batch) * context * pos_bytes)
    return max(limit // block, KV_AUTO_MIN_BLOCKS)


def config_pool(config: dict, dtype_bytes: int, **sizes) -> tuple[int, int]:
    """(blocks, bytes) of the pool ``pool_blocks(**sizes)`` gives a model of ``config`` (a
    stored config dict); (0, 0) when the config lacks what it takes."""
    try:
        heads = int(config["num_attention_heads"])
        hd = int(config.get("head_dim") or int(config["hidden_size"]) // heads)
        pb = position_bytes(int(config["num_hidden_layers"]), int(config.get("num_key_value_heads") or heads),
                            hd, dtype_bytes)
        n = pool_blocks(context=int(config["max_position_embeddings"]), pos_bytes=pb, **sizes)
    except (KeyError, TypeError, ValueError, ZeroDivisionError):
        return 0, 0
    return n, n * sizes["block_size"] * pb


def plain_reason(reason: str) -> str:
    """A plan's reason without the policy's prefix ("evicted: room for x" -> "room for x"):
    where it went is the eviction row's ``to``, and the CLI says it."""
    for p in _POLICY_PREFIXES:
        if reason.startswith(p):
            return reason[len(p):]
    return reason


def _key(inst: Instance) -> tuple[str, int]:
    return ("instance", inst.id)


def drop_runner(runner) -> None:
    """Let go of a runner that no engine runs (swapped, or never started): its model and
    heads are freed with the last reference."""
    if runner is not None:
        runner.model = None
        runner.adapters.clear()


def configure(inst: Instance, priority: int | None, keep_alive: float | None, pin: bool) -> None:
    """Apply what a load or request asked for (None / False: left as it is)."""
    if priority is not None:
        inst.priority = priority
    if keep_alive is not None:
        inst.keep_alive = -1.0 if keep_alive < 0 else float(keep_alive)
    if pin:
        inst.pinned = True


def delegated(name: str) -> property:
    """An owner's attribute that is its placement's (``self.place``): the daemon wires
    ``job_holders`` and ``preempt_job`` on the instance manager."""
    return property(lambda self: getattr(self.place, name),
                    lambda self, value: setattr(self.place, name, value))


class Placement:
    def __init__(self, post: Callable, table: ModelTable, device: str, dtype_bytes: int, *,
                 memory: MemoryManager | None, keep_alive: float,
                 unload: Callable[[Instance], None], stopped: Callable[[Instance], None],
                 engine_for: Callable, waiting: Callable[[int], int],
                 take_waiters: Callable[[int], list]):
        """``memory``: the daemon's memory manager (None: an unlimited one, for tests);
        ``keep_alive``: the default keep-alive of an instance (seconds; -1 forever).  The
        owner's side: ``unload(inst)`` (forced), ``stopped(inst)`` (its engine is gone: the row
        goes), ``engine_for(inst, runner)`` (a new engine on a swapped-in runner, on a loader
        thread), ``waiting(id)`` (how many wait for the instance to serve) and
        ``take_waiters(id)`` (those callbacks, taken)."""
        self.post, self.table, self.device, self.dtype_bytes = post, table, device, dtype_bytes
        self.memory = memory if memory is not None else MemoryManager({device: 1 << 62}, 0)
        self.keep_alive = keep_alive
        self.job_holders: Callable[[], list[Holder]] = lambda: []   # the job runner's, once wired
        self.preempt_job: Callable[[int, str], None] | None = None
        self._unload, self._stopped, self._engine_for = unload, stopped, engine_for
        self._waiting, self._take_waiters = waiting, take_waiters
        self._waits: list[tuple[list, Callable[[], None], float]] = []   # (keys leaving, go, since)
        self._leaving: set[int] = set()     # instances swapping out (their engines still stop)
        self._runners: dict = {}            # swapped instance id -> its Runner (on the host)
        self._estimates: dict = {}          # instance id / (id, digest) -> (estimator key, raw estimate)
        self._origins: dict = {}            # loaded instance id -> (estimator key, raw estimate)
        self._timer_stop = threading.Event()
        self.memory.on_freed(self.check_waits)
        self.changed: Callable[[], None] = lambda: None   # the owner records its desired state

    # -- estimates --------------------------------------------------------------------------
    def estimate(self, manifest: dict, ekey, dtype_bytes: int | None = None, quant: str = "auto") -> tuple[int, int]:
        """(corrected, raw) estimate of ``manifest``'s bytes under estimator key ``ekey``,
        loaded in ``dtype_bytes`` (default: the daemon's dtype) with ``quant``."""
        raw = estimate_instance(manifest, dtype_bytes or self.dtype_bytes, quant=quant)
        return self.memory.estimator.correct(ekey, raw), raw

    def expect(self, key, ekey, raw: int) -> None:
        """Remember the raw estimate of what loads under ``key`` (an instance id, or (id,
        adapter digest)) until its load says what it measured."""
        self._estimates[key] = (ekey, raw)

    def forget(self, key) -> None:
        """``key`` will not load (detached, unloaded): nothing to learn."""
        self._estimates.pop(key, None)

    def learn(self, key, measured: int | None, oom_estimate: int | None = None) -> None:
        """``key``'s load is over: the estimator learns what it ``measured`` (None: nothing,
        the load failed), or from an out-of-memory load that was estimated ``oom_estimate``."""
        ekey, raw = self._estimates.pop(key, (None, 0))
        if ekey is None:
            return
        if isinstance(key, int) and measured is not None:
            self._origins[key] = (ekey, raw)     # a swap-in out of memory learns from it too
        if oom_estimate is not None:
            self.memory.estimator.learn_oom(ekey, raw, oom_estimate)
        elif measured is not None:
            self.memory.estimator.learn(ekey, raw, measured)

    # -- admission --------------------------------------------------------------------------
    def leaving(self, iid: int) -> bool:
        """Whether instance ``iid`` is swapping out (its engine still stops)."""
        return iid in self._leaving

    def instance_holders(self, busy: frozenset = frozenset()) -> list[Holder]:
        """The table's instances as holders (those swapping out and those in ``busy`` are
        never chosen; each holds its KV pool with its weights).  For the job runner's
        admissions too."""
        return self.table.holders(frozenset(busy) | frozenset(self._leaving))

    def holders(self, busy: frozenset = frozenset()) -> list[Holder]:
        """Everything holding memory: the instances and the job runner's jobs."""
        return self.instance_holders(busy) + list(self.job_holders())

    def plan(self, need: int, priority: int, for_what: str, busy: frozenset = frozenset(),
             host_freed: int = 0) -> Plan:
        """The memory manager's plan; ``host_freed``: host-tier bytes that leave the host as
        this need is met (a swap-in's own), room for what the plan swaps out.  The instances
        still swapping out count on the host already (the ledger books them there only once
        their engines end): two plans in a row must not both fill the host's room."""
        m, dev = self.memory, self.device
        host_used = m.host_used() + self.host_pending() - host_freed
        return plan_admission(need, dev, priority, m.holders(self.holders(busy)), m.budget(dev),
                              m.host_budget, max(0, host_used), for_what=for_what)

    def host_pending(self) -> int:
        """Bytes of the instances swapping out (decided, engines not yet ended)."""
        out = 0
        for iid in self._leaving:
            c = self.memory.charged(("instance", iid))
            try:
                inst = self.table.get(iid)
            except LlmosdError:
                continue
            if c is not None and inst.state is State.SWAPPED and c[1] == "device":
                out += inst.charge_bytes("host")      # its KV pool does not go to the host
        return out

    def make_room(self, actions: tuple[Action, ...], go: Callable[[], None], *,
                  room_for: str | None = None,
                  fail: Callable[[LlmosdError], None] | None = None) -> list[dict]:
        """Carry out a plan's ``actions`` (swap or unload instances, pause jobs), then call
        ``go()`` once all of them have left the device (at once when there are none).  Also
        for the job runner's admissions.  ``room_for`` names the requester in the reasons
        ("room for t3:latest"; else the plan's reasons, without their prefixes).  Evictions
        not done after ``WAIT_LIMIT_S`` (a job that does not pause): ``go()`` if the device
        is within its budget by then, else ``fail(OutOfMemory)`` (without ``fail``: ``go()``
        anyway, with a warning).  Returns what it displaced: the eviction rows (model,
        instance, to, reason, why) and ``{"job": id}`` for each job it paused."""
        keys, shown = [], []
        for a in actions:
            h = a.holder
            reason = f"room for {room_for}" if room_for else plain_reason(a.reason)
            if h.kind == "instance":
                try:
                    inst = self.table.get(h.id)
                except LlmosdError:
                    continue
                if a.kind == "swap" and inst.engine is not None:
                    shown.append(self.swap_out(inst, reason))
                    keys.append((_key(inst), "host"))
                else:
                    shown.append(self.evict(inst, reason))
                    keys.append((_key(inst), None))
            elif h.kind == "job" and self.preempt_job is not None:
                why = f"preempted: {reason}"
                log.info("pausing job %d (%s): %s", h.id, h.name, why)
                self.preempt_job(h.id, why)
                keys.append((("job", h.id), None))
                shown.append({"job": h.id})
        if keys:
            self._waits.append((keys, go, time.monotonic(), fail))
            self.check_waits()
        else:
            go()
        return shown

    def check_waits(self) -> None:
        """Start the admissions whose evictions are done (a key gone from the ledger, or on
        the host tier for a swap); those that waited too long go on if the device is within
        its budget, else fail (see ``make_room``)."""
        def gone(key, tier):
            c = self.memory.charged(key)
            return c is None or (tier is not None and c[1] == tier)
        now, done, keep = time.monotonic(), [], []
        for w in self._waits:
            keys, go, since, fail = w
            if all(gone(k, t) for k, t in keys):
                done.append(go)
            elif now - since > WAIT_LIMIT_S:
                done.append(self._stale(keys, go, fail, [k for k, t in keys if not gone(k, t)]))
            else:
                keep.append(w)
        self._waits = keep
        for go in done:
            go()

    def _stale(self, keys, go, fail, left) -> Callable[[], None]:
        """What a wait past ``WAIT_LIMIT_S`` does: plan again, in effect: ``go`` if what the
        device holds now (the waiter's own charge with it) fits the budget, else ``fail``."""
        m, dev = self.memory, self.device
        over = m.used(dev) - m.budget(dev)
        names = ", ".join(f"{k[0]} {k[1]}" for k in left)
        if over <= 0 or fail is None:
            log.warning("evictions (%s) did not finish in %.0fs; going on%s", names, WAIT_LIMIT_S,
                        "" if over <= 0 else f", {over} bytes over the budget of {dev}")
            return go
        err = OutOfMemory(f"the room was not made in {WAIT_LIMIT_S:.0f}s: {names} still "
                          f"held memory on {dev}", hint="try again later, or unload or pause "
                          "what holds the memory")
        log.warning("evictions (%s) did not finish in %.0fs: giving up", names, WAIT_LIMIT_S)
        return lambda: fail(err)

    def flush_waits(self) -> None:
        """Shutting down: whatever waits for evictions goes on now (and finds its row
        unloading)."""
        waits, self._waits = self._waits, []
        for _, go, _, _ in waits:
            go()

    # -- the ledger -------------------------------------------------------------------------
    def charge(self, inst: Instance, nbytes: int) -> None:
        """``inst`` holds ``nbytes`` on its device (its estimate, while it loads)."""
        self.memory.charge(_key(inst), inst.device, nbytes)

    def recharge(self, inst: Instance) -> None:
        """Tell the ledger what ``inst`` holds now (and where)."""
        tier = "device" if inst.id in self._leaving else inst.tier
        self.memory.charge(_key(inst), inst.device, inst.charge_bytes(tier), tier)

    def uncharge(self, inst: Instance) -> None:
        self.memory.uncharge(_key(inst))

    # -- evictions and swaps ----------------------------------------------------------------
    def evict(self, inst: Instance, reason: str, why: str = "evicted") -> dict:
        """Unload ``inst`` to make room (``why`` "evicted") or because its keep-alive ran out
        ("expired"); logged, kept in the recent evictions, and that row returned.  ``reason``
        is plain ("room for t3:latest", "keep-alive expired"): clients say the rest."""
        log.info("%s instance %d (%s): %s", "evicting" if why == "evicted" else "unloading",
                 inst.id, inst.model, reason)
        row = {"model": inst.model, "instance": inst.id, "reason": reason, "to": "store", "why": why}
        self.memory.note_eviction(dict(row))
        self._unload(inst)
        return row

    def swap_out(self, inst: Instance, reason: str) -> dict:
        """Move ``inst`` to the host tier: its engine stops keeping the model (moved to host
        RAM); ``stopped`` then charges it on the host tier."""
        log.info("swapping instance %d (%s) out to host memory: %s", inst.id, inst.model, reason)
        row = {"model": inst.model, "instance": inst.id, "reason": reason, "to": "host", "why": "evicted"}
        self.memory.note_eviction(dict(row))
        inst.transition(State.SWAPPED)
        inst.swaps += 1
        self._leaving.add(inst.id)
        inst.engine.stop(swap=True)
        return row

    def engine_stopped(self, inst: Instance, engine, swapped: bool) -> None:
        """``inst``'s engine ended (``swapped``: it kept the model on the host).  Swapped out
        as planned, the runner is kept; else the instance is gone (``stopped``)."""
        if swapped and inst.state is State.SWAPPED:
            self._swapped_out(inst)
            return
        if swapped:                             # unloaded while it swapped out
            drop_runner(engine.runner)
        self._leaving.discard(inst.id)
        self._origins.pop(inst.id, None)
        self._stopped(inst)

    def _swapped_out(self, inst: Instance) -> None:
        """Its engine ended with the model on the host: keep the runner, charge the host."""
        self._leaving.discard(inst.id)
        self._runners[inst.id] = inst.engine.runner
        inst.engine = None
        self.recharge(inst)
        log.info("instance %d (%s) swapped out, %d bytes on the host", inst.id, inst.model,
                 inst.charge_bytes())
        self.check_waits()
        if self._waiting(inst.id):               # asked for again meanwhile
            self._start_swap_in(inst)

    def drop_swapped(self, inst: Instance) -> None:
        """``inst``, on the host with no engine, is unloaded: its runner just goes."""
        self._origins.pop(inst.id, None)
        drop_runner(self._runners.pop(inst.id, None))

    def swap_in(self, inst: Instance, displaced: list | None = None) -> None:
        """Someone waits (registered with the owner) for swapped ``inst``: the first starts
        its swap-in, unless it is still swapping out (then ``_swapped_out`` does).  What its
        room displaced is added to ``displaced`` (see ``make_room``)."""
        if self._waiting(inst.id) == 1 and inst.id not in self._leaving:
            self._start_swap_in(inst, displaced)

    def _start_swap_in(self, inst: Instance, displaced: list | None = None) -> None:
        need = inst.charge_bytes("device")       # its KV pool comes back with it
        plan = self.plan(need, inst.priority, f"swapping in {inst.model} (instance {inst.id})",
                         frozenset({inst.id}), host_freed=inst.charge_bytes("host"))
        if not plan.ok:
            log.info("refused to swap in instance %d (%s): %s", inst.id, inst.model, plan.message)
            for cb in self._take_waiters(inst.id):
                cb(None, plan.error())
            return
        inst.transition(State.LOADING)
        self.charge(inst, need)
        shown = self.make_room(plan.actions, lambda: self._spawn_swap_in(inst),
                               room_for=f"swapping {inst.model} back in",
                               fail=lambda err: self._back_to_host(inst, err))
        if displaced is not None:
            displaced.extend(shown)

    def _back_to_host(self, inst: Instance, err: LlmosdError) -> None:
        """The swap-in did not happen (no room, or out of memory moving it): ``inst`` stays
        swapped, charged on the host with its runner kept; whoever waits gets ``err``."""
        if inst.state is State.LOADING:
            inst.transition(State.SWAPPED)
            self.recharge(inst)
            log.warning("instance %d (%s) stays on the host: %s", inst.id, inst.model, err)
        elif inst.state is State.UNLOADING:
            self._origins.pop(inst.id, None)
            self.drop_swapped(inst)
            self._stopped(inst)
        for cb in self._take_waiters(inst.id):
            cb(None, err)

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
            engine = self._engine_for(inst, runner)
            self.post(self._swapped_in, inst, engine, runner, time.perf_counter() - t0, None)
        except LlmosdError as e:
            self.post(self._swapped_in, inst, None, runner, 0.0, e)
        except Exception as e:
            log.exception("swap-in of %s failed", inst.model)
            self.post(self._swapped_in, inst, None, runner, 0.0, LoadFailed(f"swapping in {inst.model} failed: {e}"))

    def _swapped_in(self, inst: Instance, engine, runner, secs: float, err: LlmosdError | None) -> None:
        """The loader thread is done with ``inst``'s ``runner``.  Out of memory moving it back
        (``Runner.onload`` left the model on the host): it stays swapped, its runner kept,
        and the estimator learns."""
        if inst.state is State.LOADING and isinstance(err, OutOfMemory) and runner is not None:
            ekey, raw = self._origins.get(inst.id, (None, 0))
            if ekey is not None:             # the weights' estimate: its pool and adapters aside
                self.memory.estimator.learn_oom(ekey, raw, inst.base_bytes or inst.estimate_bytes)
            self._runners[inst.id] = runner
            self._back_to_host(inst, err)
            return
        if inst.state is State.LOADING and err is None and engine is not None:
            inst.engine, inst.swap_in_ms, inst.last_used = engine, round(secs * 1000, 3), time.time()
            inst.transition(State.READY)
            self.recharge(inst)
            engine.start()
            log.info("instance %d (%s) swapped in in %.3fs", inst.id, inst.model, secs)
            for cb in self._take_waiters(inst.id):
                cb(inst, None)
            return
        drop_runner(runner)                          # its memory goes back
        self._origins.pop(inst.id, None)
        err = err or Cancelled(f"instance {inst.id} was unloaded while it swapped in")
        if inst.state is State.LOADING:
            inst.transition(State.FAILED, str(err))
            self.uncharge(inst)
            inst.adapters.clear()
            log.warning("instance %d (%s) failed to swap in: %s", inst.id, inst.model, err)
        else:
            self._stopped(inst)
        for cb in self._take_waiters(inst.id):
            cb(None, err)

    # -- keep-alive -------------------------------------------------------------------------
    def start_timer(self, every: float = TICK_S) -> None:
        """Check keep-alives (and stale waits) every ``every`` seconds, on the control loop."""
        def loop():
            while not self._timer_stop.wait(every):
                self.post(self.tick)
        threading.Thread(target=loop, name="keep-alive", daemon=True).start()

    def stop_timer(self) -> None:
        self._timer_stop.set()

    def tick(self) -> None:
        ka = {i.id: i.keep_alive for i in self.table}
        for iid in self.memory.expired(self.table.holders(frozenset(self._leaving)), ka):
            inst = self.table.get(iid)
            self.evict(inst, f"keep-alive expired ({ka[iid]:g}s idle)", "expired")
        if self._waits:
            self.check_waits()
        self.changed()

    def after_request(self, inst: Instance) -> None:
        """A request ended: keep-alive 0 unloads the instance as soon as it is idle."""
        if inst.keep_alive == 0 and inst.idle and not inst.pinned:
            self.evict(inst, "keep-alive 0 (unloaded after its last request)", "expired")
