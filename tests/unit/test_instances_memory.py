"""Issue 12, the instance manager carrying out memory decisions, without a daemon or a model:
fake engines, a memory manager with small budgets, loads that fail fast (no store) and
callbacks posted to a list run as the control loop would."""
from __future__ import annotations

import threading
import time

import pytest
import torch

from conftest import FakeStream
from llmctl import errors
from llmosd.mem.manager import MemoryManager
from llmosd.serve.request import Request, SamplingParams, Task
from llmosd.table import State

MAN = {"parameters": 250, "weights": {"digest": "sha256:w"}}     # estimate: 1000 + 256 bytes


class Eng:
    """Enough engine for the manager: records stops, submits and cancels."""
    context, pool_bytes = 64, 0

    def stats(self):
        return {"kv_blocks_total": 4, "kv_blocks_used": 0, "kv_block_size": 16, "waiting": 0, "running": 0}

    def __init__(self):
        self.stops, self.submitted, self.cancelled = [], [], []

    def stop(self, swap=False):
        self.stops.append(swap)

    def submit(self, req):
        self.submitted.append(req)

    def cancel(self, key, reason, error=None):
        self.cancelled.append(key)

    def credit(self, key):
        pass


def manager(budget=3000, host=0):
    from llmosd.serve.instances import InstanceManager
    posted = []
    mem = MemoryManager({"cpu": budget}, host)
    m = InstanceManager(lambda fn, *a: posted.append((fn, a)), None, torch.device("cpu"), torch.float32,
                        max_batch=2, stream_buffer=4, max_kv_bytes=1 << 20, memory=mem)
    return m, mem, posted


def settle(posted):
    for t in [t for t in threading.enumerate() if t.name.startswith("load-")]:
        t.join(10)
    while posted:
        fn, a = posted.pop(0)
        fn(*a)


def serving(m, mem, name, nbytes=1000, last_used=None):
    """A ready instance of ``name`` with a fake engine, charged ``nbytes``."""
    inst = m.table.add(name, "sha256:" + name, "cpu", 1000)
    inst.transition(State.READY)
    inst.resident_bytes, inst.engine = nbytes, Eng()
    inst.last_used = time.time() if last_used is None else last_used
    mem.charge(("instance", inst.id), "cpu", nbytes)
    return inst


def test_i12_1_a_refused_load_adds_no_row_and_names_the_holders():
    m, mem, posted = manager(budget=1500)
    a = serving(m, mem, "a:latest")
    a.pinned = True
    got = []
    assert m.acquire("b:latest", MAN, "sha256:b", 1000, lambda i, e: got.append((i, e))) is None
    (inst, err), = got
    assert inst is None and isinstance(err, errors.OutOfMemory)
    assert "a:latest" in str(err) and "pinned" in str(err) and "needs" in str(err)
    assert len(m.table) == 1 and mem.used("cpu") == 1000 and posted == []


def test_i12_1_a_load_starts_only_once_its_victim_has_left():
    m, mem, posted = manager(budget=2500)
    old = serving(m, mem, "a:latest", last_used=1.0)
    serving(m, mem, "b:latest", last_used=2.0)
    got = []
    inst = m.acquire("c:latest", MAN, "sha256:c", 1000, lambda i, e: got.append((i, e)))
    assert inst.state is State.LOADING and old.state is State.UNLOADING and old.engine.stops == [False]
    assert not [t for t in threading.enumerate() if t.name == f"load-{inst.id}"]   # waits
    assert mem.charged(("instance", inst.id)) == ("cpu", "device", 1256)
    m._on_engine(old, old.engine, None, "stopped", {})          # the victim's engine ended
    assert mem.charged(("instance", old.id)) is None
    settle(posted)                                              # now the load runs (and fails: no store)
    assert isinstance(got[0][1], errors.LoadFailed) and inst.state is State.FAILED
    assert mem.charged(("instance", inst.id)) is None           # rolled back
    assert mem.recent_evictions()[-1]["model"] == "a:latest"


def test_i12_1_an_out_of_memory_load_is_rolled_back_and_the_estimator_learns(monkeypatch):
    import llmosd.serve.instances as instances

    def oom(*a, **k):
        raise torch.OutOfMemoryError("CUDA out of memory")
    monkeypatch.setattr(instances, "load_model", oom)
    m, mem, posted = manager()
    got = []
    inst = m.acquire("a:latest", MAN, "sha256:a", 1000, lambda i, e: got.append(e))
    settle(posted)
    assert isinstance(got[0], errors.OutOfMemory) and inst.state is State.FAILED
    assert mem.used("cpu") == 0
    assert mem.estimator.correct(("instance", "float32"), 1256) > 1256    # next time: a bigger estimate


def test_i12_2_swap_out_and_in_keeps_the_runner_and_moves_the_charge(monkeypatch):
    import llmosd.serve.instances as instances
    m, mem, posted = manager(budget=2500, host=5000)
    a = serving(m, mem, "a:latest", last_used=1.0)
    serving(m, mem, "b:latest", last_used=2.0)

    class R:
        tok = None

        def onload(self):
            pass
    a.engine.runner = R()
    m.acquire("c:latest", MAN, "sha256:c", 1000, lambda i, e: None)
    assert a.state is State.SWAPPED and a.engine.stops == [True] and a.swaps == 1
    assert mem.charged(("instance", a.id)) == ("cpu", "device", 1000)   # until its engine ends
    m._on_engine(a, a.engine, None, "stopped", {"swapped": True})
    assert mem.charged(("instance", a.id)) == ("cpu", "host", 1000) and a.engine is None
    assert a.row()["tier"] == "host" and mem.recent_evictions()[-1]["to"] == "host"
    settle(posted)                                              # c's load fails (no store): room again
    started = []

    class FakeEngine(Eng, threading.Thread):
        def __init__(self, iid, model, tok, device, emit, *, runner=None, **kw):
            Eng.__init__(self)
            threading.Thread.__init__(self)
            started.append(runner)

        def start(self):
            pass
    monkeypatch.setattr(instances, "Engine", FakeEngine)
    got = []
    t = Task(Request("k", "Hi", 4, SamplingParams()), FakeStream())
    m.run("a:latest", {}, "sha256:a:latest", 1000, t)
    assert a.state is State.LOADING
    settle(posted)
    assert a.state is State.BUSY and isinstance(started[0], R) and a.swap_in_ms is not None
    assert mem.charged(("instance", a.id)) == ("cpu", "device", 1000)
    assert t.extra["swap_in_ms"] == a.swap_in_ms and got == []


def test_i12_3_keep_alive_expiry_zero_and_pins():
    m, mem, posted = manager(budget=10_000)
    old = serving(m, mem, "a:latest", last_used=time.time() - 10)
    old.keep_alive = 5
    pinned = serving(m, mem, "b:latest", last_used=time.time() - 10)
    pinned.keep_alive, pinned.pinned = 5, True
    forever = serving(m, mem, "c:latest", last_used=0.0)
    forever.keep_alive = -1
    m._tick()
    assert old.state is State.UNLOADING and "expired" in mem.recent_evictions()[-1]["reason"]
    assert pinned.serving and forever.serving and pinned.row()["expires_at"] is None
    zero = serving(m, mem, "d:latest")
    zero.keep_alive = 0
    t = Task(Request("k", "Hi", 4, SamplingParams()), FakeStream())
    m.submit(zero, t)
    m._tasks["k"] = t
    assert zero.engine.submitted == [t.req] and mem.charged(("kv", 0)) is None   # nothing reserved
    m._on_engine(zero, zero.engine, "k", "end", {"generated_tokens": 1})
    assert zero.state is State.UNLOADING
    assert "keep-alive 0" in mem.recent_evictions()[-1]["reason"]


def test_i12_pin_and_unpin_by_name_or_id():
    from llmosd.ops.serve import ServeOps

    class Ctx:
        uid = 1000

        def __init__(self, target):
            self.body, self.reply = {"target": target}, None

        def ok(self, body):
            self.reply = body
    m, mem, posted = manager()
    a = serving(m, mem, "a:latest")
    ops = ServeOps(None, None, m)
    ops.op_pin(Ctx("a"))
    assert a.pinned
    c = Ctx(str(a.id))
    ops.op_unpin(c)
    assert not a.pinned and c.reply["unpinned"] == [a.id]
    with pytest.raises(errors.InstanceNotFound):
        ops.op_pin(Ctx("99"))
