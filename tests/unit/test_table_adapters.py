"""Issue 11, serving: adapters in the model table under their base instance (rows, bytes,
request counts), the instance manager attaching them once however many ask, detaching them,
and ``llmctl ps``/``load`` showing them.  No daemon, no model: a fake engine and adapter reader."""
from __future__ import annotations

import threading

import pytest
import torch

from conftest import FakeStream
from llmctl import errors
from llmctl.cli.table import ADAPTER_MARK, adapter_line, ps_rows
from llmosd.serve.request import Call, Request, SamplingParams, Task
from llmosd.table import ModelTable, State

A1, A2 = "sha256:" + "a" * 64, "sha256:" + "b" * 64


def ready_instance(t: ModelTable, base_bytes=1000):
    i = t.add("base:latest", "sha256:base", "cpu", 1000)
    i.transition(State.READY)
    i.resident_bytes = base_bytes
    return i


def test_i11_3_adapter_rows_nest_in_the_instance_row_and_add_their_bytes():
    t = ModelTable()
    i = ready_instance(t)
    a = i.attach("ad1:latest", A1, 1000)
    assert i.attach("ad1:latest", A1, 1000) is a              # one row per adapter
    assert a.state == "loading"
    with pytest.raises(errors.InvalidState):                  # not installed yet
        i.begin_request(A1)
    a.ready, a.resident_bytes = True, 64
    b = i.attach("clf:latest", A2, None, "classifier")
    b.ready, b.resident_bytes = True, 36
    assert i.resident_bytes == 1100 and i.base_bytes == 1000
    i.begin_request(A1)
    i.begin_request()
    assert (i.state, i.active_requests, a.active_requests, a.state) == (State.BUSY, 2, 1, "busy")
    i.end_request(5, A1)
    i.end_request(3)
    assert (i.state, i.tokens_served, a.tokens_served, a.requests_served, b.requests_served) == \
        (State.READY, 8, 5, 1, 0)
    row = i.row()
    assert row["resident_bytes"] == 1100
    assert [r["model"] for r in row["adapters"]] == ["ad1:latest", "clf:latest"]
    assert set(row["adapters"][0]) == {"model", "digest", "kind", "state", "resident_bytes",
                                       "active_requests", "requests_served", "tokens_served",
                                       "loaded_at", "last_used", "uid", "estimate_bytes"}
    assert row["adapters"][1]["kind"] == "classifier" and row["adapters"][0]["state"] == "ready"
    # rm/tag/show see a model as loaded while it is attached
    assert t.ids_of("ad1:latest") == [i.id] and t.ids_of("base:latest") == [i.id]
    assert t.with_adapter("clf:latest") == [i] and t.ids_of("other:latest") == []
    assert i.detach(A1) is a and i.resident_bytes == 1036 and t.ids_of("ad1:latest") == []
    i.end_request(0, A1)                                      # a detached adapter's late end
    assert i.active_requests == 0


def test_i11_3_ps_prints_adapters_indented_under_their_base():
    t = ModelTable()
    i = ready_instance(t, 2_000_000)
    a = i.attach("ad1:latest", A1, 1000)
    a.ready, a.resident_bytes = True, 64_000
    t.add("other:latest", "sha256:o", "cpu", None)
    rows = ps_rows(t.rows())
    assert [r[1] for r in rows] == ["base:latest", ADAPTER_MARK + "ad1:latest", "other:latest"]
    assert rows[0][5] == "2.1 MB" and rows[1][:6] == ["", "`- ad1:latest", "ready", "", "", "64.0 KB"]
    line = adapter_line({**i.row(), "adapter": a.row(), "load_ms": 1500.0, "already_loaded": False})
    assert line.startswith("ad1:latest ready on instance 1 (base:latest") and "64.0 KB" in line
    again = adapter_line({**i.row(), "adapter": a.row(), "load_ms": 0.0, "already_loaded": True})
    assert again.startswith("ad1:latest already loaded on instance 1")
    assert ps_rows([{k: v for k, v in i.row().items() if k != "adapters"}])[0][1] == "base:latest"


# -- the instance manager, with a fake engine and adapter reader -----------------------------------

class FakeEngine:
    def __init__(self):
        self.added, self.dropped, self.submitted, self.cancelled = [], [], [], []
        self.tokens = []                    # (key, token) of each install, in order

    def add_adapter(self, key, adapter, token=None):
        self.added.append(key)
        self.tokens.append((key, token))

    def drop_adapter(self, key):
        self.dropped.append(key)

    def submit(self, req, positions=0):
        self.submitted.append(req)

    def cancel(self, key, reason, error=None):
        self.cancelled.append(key)

    def stop(self):
        pass


@pytest.fixture
def manager(monkeypatch):
    from llmosd.models import lora
    from llmosd.serve.instances import InstanceManager
    reads = []
    gate = threading.Event()

    def read(store, manifest, key):
        reads.append(key)
        gate.wait(10)
        if manifest.get("broken"):
            raise errors.LoadFailed("the adapter's LoRA weights cannot be used")
        return object()
    monkeypatch.setattr(lora, "read_adapter", read)
    posted = []
    m = InstanceManager(lambda fn, *a: posted.append((fn, a)), None, torch.device("cpu"), torch.float32,
                        max_batch=2, stream_buffer=4, max_kv_bytes=1 << 30)
    inst = ready_instance(m.table)
    inst.engine = FakeEngine()

    def settle():
        gate.set()
        for t in [t for t in threading.enumerate() if t.name.startswith("load-")]:
            t.join(10)
        while posted:
            fn, a = posted.pop(0)
            fn(*a)
    return m, inst, reads, settle


BASE = ("base:latest", {}, "sha256:base")


def installed(m, inst, key, body, nth=-1):
    """The engine's answer to the ``nth`` install of ``key`` (with that install's token)."""
    token = [t for k, t in inst.engine.tokens if k == key][nth]
    m._on_engine(inst, inst.engine, key, "adapter", {**body, "token": token})


def call(key, adapter):
    return Task(Call(key, "score", {"text": "hi"}, adapter=adapter), FakeStream())


def test_i11_3_concurrent_requests_for_a_loading_adapter_wait_for_one_install(manager):
    m, inst, reads, settle = manager
    loads = []
    tasks = [call(f"k{i}", A1) for i in range(3)]
    for t in tasks:
        m.run("ad1:latest", {"kind": "adapter"}, A1, 1000, t, lambda: loads.append(1), base=BASE)
    assert loads == [1, 1, 1] and inst.queued_requests == 3
    assert inst.adapters[A1].state == "loading" and len(m.table) == 1
    settle()
    assert reads == [A1] and inst.engine.added == [A1]          # read once, installed once
    installed(m, inst, A1, {"bytes": 4096})
    assert [r.key for r in inst.engine.submitted] == ["k0", "k1", "k2"]
    assert all(r.adapter == A1 for r in inst.engine.submitted)
    assert inst.queued_requests == 0 and inst.adapters[A1].active_requests == 3
    assert inst.resident_bytes == 1000 + 4096
    for t in tasks:
        m._on_engine(inst, inst.engine, t.req.key, "end", {"logprob": 0.0})
    assert tasks[0].stream.result["model"] == "ad1:latest"      # named as asked
    assert inst.adapters[A1].requests_served == 3 and inst.state is State.READY
    ready = []                                                  # installed: at once, no reread
    m.acquire_adapter(BASE, "ad1:latest", {}, A1, 1000, lambda i, e: ready.append((i, e)))
    assert ready == [(inst, None)] and reads == [A1]


def test_i11_3_detach_is_refused_while_busy_unless_forced(manager):
    m, inst, reads, settle = manager
    t = call("k", A1)
    m.run("ad1:latest", {}, A1, 1000, t, base=BASE)
    with pytest.raises(errors.Busy, match="still loading"):
        m.detach(inst, "ad1:latest", force=False)
    settle()
    installed(m, inst, A1, {"bytes": 10})
    with pytest.raises(errors.Busy, match="1 active request"):
        m.detach(inst, "ad1:latest", force=False)
    m.detach(inst, "ad1:latest", force=True)
    assert inst.engine.cancelled == ["k"] and inst.engine.dropped == [A1]
    assert inst.adapters == {} and inst.resident_bytes == 1000 and inst.serving


def test_i11_3_a_failed_adapter_fails_its_waiters_and_leaves_no_row(manager):
    m, inst, reads, settle = manager
    t = call("k", A2)
    m.run("bad:latest", {"broken": True}, A2, 1000, t, base=BASE)
    settle()
    assert isinstance(t.stream.err, errors.LoadFailed) and inst.adapters == {}
    assert inst.engine.added == [] and inst.queued_requests == 0
    t2 = call("k2", A2)                                         # an install the engine refuses
    m.run("ad2:latest", {}, A2, 1000, t2, base=BASE)
    settle()
    installed(m, inst, A2, {"error": errors.LoadFailed("the adapter does not fit its base").to_wire()})
    assert isinstance(t2.stream.err, errors.LoadFailed) and inst.adapters == {}


def test_i11_3_unloading_the_base_fails_whoever_waits_for_its_adapters(manager):
    m, inst, reads, settle = manager
    t = Task(Request("g", "Hi", 4, SamplingParams(), adapter=A1), FakeStream())
    m.run("ad1:latest", {}, A1, 1000, t, base=BASE)
    m.unload(inst, True, lambda: None)
    assert isinstance(t.stream.err, errors.Cancelled) and inst.queued_requests == 0
    settle()                                                    # the late read changes nothing
    assert inst.engine.added == []


# -- code review of the serving of adapters -----------------------------------------------------

def test_i11_review_2_a_stale_install_answer_does_not_mark_a_reattached_adapter_ready(manager):
    m, inst, reads, settle = manager
    t1 = call("k1", A1)
    m.run("ad1:latest", {}, A1, 1000, t1, base=BASE)
    settle()                                                    # install 1 sent to the engine
    m.detach(inst, "ad1:latest", force=True)                    # ...and dropped after it
    assert isinstance(t1.stream.err, errors.Cancelled) and inst.engine.dropped == [A1]
    t2 = call("k2", A1)
    m.run("ad1:latest", {}, A1, 1000, t2, base=BASE)            # attached again
    settle()
    assert inst.engine.added == [A1, A1]
    first, second = [t for _, t in inst.engine.tokens]
    assert first != second
    installed(m, inst, A1, {"bytes": 64}, nth=0)                # the answer to the dropped install
    assert inst.adapters[A1].state == "loading" and inst.engine.submitted == []
    assert t2.stream.err is None and inst.queued_requests == 1
    installed(m, inst, A1, {"bytes": 64}, nth=1)                # the current one's
    assert inst.adapters[A1].state == "busy" and [r.key for r in inst.engine.submitted] == ["k2"]
    m._on_engine(inst, inst.engine, A1, "adapter", {"bytes": 64})   # no token: not this attach's
    assert inst.adapters[A1].resident_bytes == 64


def test_i11_review_3_unloading_the_base_is_busy_while_an_adapter_loads_or_serves(manager):
    m, inst, reads, settle = manager
    t = call("k", A1)
    m.run("ad1:latest", {}, A1, 1000, t, base=BASE)             # loading, a request queued on it
    done = []
    with pytest.raises(errors.Busy, match="ad1:latest is still loading"):
        m.unload(inst, False, lambda: done.append(1))
    assert inst.serving and t.stream.err is None and inst.adapters[A1].state == "loading"
    settle()
    installed(m, inst, A1, {"bytes": 10})
    assert [r.key for r in inst.engine.submitted] == ["k"]     # the queued request went on
    with pytest.raises(errors.Busy, match="1 active request"):
        m.unload(inst, False, lambda: done.append(1))
    m._on_engine(inst, inst.engine, "k", "end", {})
    m.acquire_adapter(BASE, "ad2:latest", {}, A2, 1000, lambda i, e: done.append(e))
    with pytest.raises(errors.Busy, match="ad2:latest is still loading"):   # a pending load ADAPTER
        m.unload(inst, False, lambda: done.append(1))
    assert done == []
    m.unload(inst, True, lambda: done.append(1))                # --force: the pending load fails
    assert isinstance(done[0], errors.Cancelled) and inst.state is State.UNLOADING


def test_i11_review_4_a_second_tag_of_an_attached_adapter_is_found_and_named(manager):
    m, inst, reads, settle = manager
    t = call("k1", A1)
    m.run("ad1:latest", {}, A1, 1000, t, base=BASE)
    settle()
    installed(m, inst, A1, {"bytes": 10})
    m._on_engine(inst, inst.engine, "k1", "end", {})
    t2 = call("k2", A1)                                         # the same adapter under a second tag
    m.run("tag2:latest", {}, A1, 1000, t2, base=BASE)
    m._on_engine(inst, inst.engine, "k2", "end", {})
    assert (t.stream.result["model"], t2.stream.result["model"]) == ("ad1:latest", "tag2:latest")
    assert m.table.with_adapter("tag2:latest") == []            # by name alone: not found...
    assert m.table.with_adapter("tag2:latest", A1) == [inst]    # ...by its digest: found
    assert inst.attached("tag2:latest", A1) is inst.adapters[A1]
    m.detach(inst, A1, force=False)
    assert inst.adapters == {} and inst.engine.dropped == [A1]
