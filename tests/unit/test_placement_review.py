"""Issue 12 review: the KV cache within the budget (1), a forced unload during a swap-out (2),
the host tier never overcommitted (3), no detach from a swapped instance (4), an out-of-memory
swap-in kept on the host (5), owners' settings (6), stale evictions (7), what a load displaced
(8), plain eviction reasons (9), the swap-in's own words (10), RSS given back (11).

The fakes of ``test_instances_memory``: fake engines, small budgets, loads without a store."""
from __future__ import annotations

import json
import time
from types import SimpleNamespace

import pytest

from conftest import FakeStream
from llmctl import errors
from llmosd.mem.policy import Holder
from llmosd.serve.request import Request, SamplingParams, Task
from llmosd.table import State
from test_instances_memory import MAN, Eng, manager, serving, settle


class Runner:
    """A kept runner: what drop_runner and a swap-in touch."""
    tok = None

    def __init__(self, oom=False):
        self.model, self.adapters, self.oom = object(), {}, oom

    def onload(self):
        if self.oom:
            raise errors.OutOfMemory("not enough memory on cuda:0 to swap the model back in")


def with_runner(inst, oom=False):
    inst.engine.runner = Runner(oom)
    return inst


def task(key="k", max_tokens=4):
    return Task(Request(key, "Hi", max_tokens, SamplingParams()), FakeStream())


def swapped(m, mem, name, oom=False):
    """A serving instance swapped out to the host (its engine ended, runner kept)."""
    inst = with_runner(serving(m, mem, name), oom)
    m.place.swap_out(inst, "room for x:latest")
    m._on_engine(inst, inst.engine, None, "stopped", {"swapped": True})
    assert inst.state is State.SWAPPED and mem.charged(("instance", inst.id))[1] == "host"
    return inst


class Ctx:
    def __init__(self, body, uid=1000):
        self.body, self.uid, self.reply, self.err = body, uid, None, None

    def ok(self, body):
        self.reply = body

    def error(self, err):
        self.err = err


class Store:
    def find(self, name):
        canon = name if ":" in name else name + ":latest"
        return canon, dict(MAN), "sha256:" + canon


def ops_for(m):
    from llmosd.ops.serve import ServeOps
    return ServeOps(None, Store(), m)


CONFIG = {"hidden_size": 64, "num_attention_heads": 4, "num_key_value_heads": 2, "num_hidden_layers": 2,
          "max_position_embeddings": 256}          # 512 bytes a position in float32


class ConfigStore:
    """A store that has the config blob (and nothing else: the loads fail)."""

    def read_blob(self, digest):
        return json.dumps(CONFIG).encode()


def test_i13_2_the_kv_pool_is_charged_with_its_instance_and_requests_reserve_nothing():
    """Issue 13 replaces 12 review 1's per-request KV reservation: an instance's paged pool is
    part of its charge from the load's admission on (auto: max_batch full contexts here, far
    under RAM/4 and 1 GiB; explicit: max_kv_bytes), a budget without room for it refuses the
    load, and a request reserves nothing (``("kv", 0)`` is gone from the ledger)."""
    from llmosd.serve.placement import pool_blocks
    man = {**MAN, "config": {"digest": "sha256:c"}}
    m, mem, posted = manager(budget=1_000_000)
    m.store, m.kv.limit = ConfigStore(), 0                    # max_kv_bytes auto
    inst = m.acquire("b:latest", man, "sha256:b", 1000, lambda i, e: None)
    pool = 2 * 256 * 512                                      # max_batch 2 x context x 512 B
    assert inst.kv_bytes == pool and mem.charged(("instance", inst.id))[2] == 1256 + pool
    assert inst.row()["kv_bytes"] == pool and inst.row()["estimate_bytes"] == 1256
    m.kv.limit = 3 * 16 * 512 + 100                           # explicit: whole blocks of it
    inst = m.acquire("c:latest", man, "sha256:c", 1000, lambda i, e: None)
    assert inst.kv_bytes == 3 * 16 * 512
    small, _, _ = manager(budget=1256 + pool - 1)             # the weights fit, the pool not
    small.store, small.kv.limit, got = ConfigStore(), 0, []
    assert small.acquire("b:latest", man, "sha256:b", 1000, lambda i, e: got.append(e)) is None
    assert isinstance(got[0], errors.InvalidArgument) and f"{1256 + pool} B" in str(got[0])
    # auto: at most 1 GiB / RAM/4 / max_batch contexts, at least a few blocks (not a context)
    assert pool_blocks(0, 1 << 40, 8192, 46_080, 16, 16) == (1 << 30) // (16 * 46_080)
    assert pool_blocks(0, 1 << 20, 8192, 46_080, 16, 16) == 4                    # tiny RAM: 4 blocks
    assert pool_blocks(0, 1 << 40, 100, 512, 2, 16) == 200 * 512 // (16 * 512)
    assert pool_blocks(10, 1 << 40, 100, 512, 2, 16) == 1                        # explicit, tiny
    # a request goes straight to the engine; its blocks show in the row once reported
    a = serving(m, mem, "a:latest")
    t = task("r", max_tokens=1_000_000)
    m._tasks["r"] = t
    m.submit(a, t)
    assert t.stream.err is None and a.engine.submitted == [t.req] and mem.charged(("kv", 0)) is None
    m._on_engine(a, a.engine, None, "blocks", {"kv_blocks_total": 8, "kv_blocks_used": 3, "kv_block_size": 16,
                                               "waiting": 2, "running": 1})
    row = a.row()
    assert (row["kv_blocks_total"], row["kv_blocks_used"], row["kv_block_size"], row["waiting"],
            row["running"]) == (8, 3, 16, 2, 1)


def test_i12_review_2_a_forced_unload_during_a_swap_out_fails_whoever_waits():
    m, mem, posted = manager(budget=5000, host=5000)
    a = with_runner(serving(m, mem, "a:latest"))
    m.place.swap_out(a, "room for x:latest")
    t = task()
    m.run("a:latest", {}, "sha256:a:latest", 1000, t)
    assert m._ready_waiters == {a.id: [m._ready_waiters[a.id][0]]}
    done = []
    m.unload(a, True, lambda: done.append(True))
    m._on_engine(a, a.engine, None, "stopped", {"swapped": True})
    assert isinstance(t.stream.err, errors.Cancelled) and "k" not in m._tasks
    assert m._ready_waiters == {} and done == [True] and len(m.table) == 0
    assert mem.charged(("instance", a.id)) is None


def test_i12_review_3_two_plans_in_a_row_never_overcommit_the_host():
    m, mem, posted = manager(budget=4000, host=1000)
    insts = [with_runner(serving(m, mem, n, last_used=i)) for i, n in enumerate(["a:latest", "b:latest", "c:latest"], 1)]
    m.acquire("d:latest", MAN, "sha256:d", 1000, lambda i, e: None)
    m.acquire("e:latest", MAN, "sha256:e", 1000, lambda i, e: None)
    a, b, _ = insts
    assert a.state is State.SWAPPED and b.state is State.UNLOADING      # no room left on the host
    assert [r["to"] for r in mem.recent_evictions()] == ["host", "store", "store"]   # b, c: unloaded
    m._on_engine(a, a.engine, None, "stopped", {"swapped": True})
    m._on_engine(b, b.engine, None, "stopped", {})
    assert mem.host_used() == 1000 <= mem.host_budget
    settle(posted)                                                    # the loads fail: no store


def test_i12_review_4_no_detach_from_a_swapped_instance():
    m, mem, posted = manager(budget=5000, host=5000)
    a = with_runner(serving(m, mem, "a:latest"))
    ad = a.attach("qa:latest", "sha256:qa", 1000)
    ad.ready, ad.resident_bytes = True, 100
    m.place.swap_out(a, "room")
    m._on_engine(a, a.engine, None, "stopped", {"swapped": True})
    for force in (False, True):
        with pytest.raises(errors.Busy, match="swapped out to host memory"):
            m.detach(a, "sha256:qa", force)
    assert "sha256:qa" in a.adapters and mem.charged(("instance", a.id)) == ("cpu", "host", 1100)
    ctx = Ctx({"target": "qa:latest", "force": True})
    ops = ops_for(m)
    ops._adapter_digest = lambda canon: "sha256:qa"
    with pytest.raises(errors.Busy):
        ops.op_unload(ctx)
    assert "sha256:qa" in a.adapters


def test_i12_review_5_an_out_of_memory_swap_in_keeps_the_host_copy():
    m, mem, posted = manager(budget=5000, host=5000)
    a = swapped(m, mem, "a:latest", oom=True)
    runner = m.place._runners[a.id]
    ekey = ("instance", "float32")
    m.place._origins[a.id] = (ekey, 1000)
    t = task()
    m.run("a:latest", {}, "sha256:a:latest", 1000, t)
    assert a.state is State.LOADING
    settle(posted)
    assert isinstance(t.stream.err, errors.OutOfMemory) and "k" not in m._tasks
    assert a.state is State.SWAPPED and m.place._runners[a.id] is runner and runner.model is not None
    assert mem.charged(("instance", a.id)) == ("cpu", "host", 1000)
    assert mem.estimator.correct(ekey, 1000) > 1000                   # learnt
    runner.oom = False                                                # the next request brings it back
    m.run("a:latest", {}, "sha256:a:latest", 1000, task("k2"))
    assert a.state is State.LOADING


def test_i12_review_6_pins_priorities_and_forever_are_for_the_owner():
    m, mem, posted = manager()
    a = serving(m, mem, "a:latest")                                   # loaded by uid 1000
    ops = ops_for(m)
    for op in (ops.op_pin, ops.op_unpin):
        with pytest.raises(errors.PermissionDenied, match="uid 1000"):
            op(Ctx({"target": "a"}, uid=1001))
    assert not a.pinned
    for body in ({"priority": 1000}, {"keep_alive": -1}, {"pin": True}):
        with pytest.raises(errors.PermissionDenied, match="loaded by uid 1000"):
            ops.op_load(Ctx({"model": "a", **body}, uid=1001))
    assert a.priority == 0 and a.keep_alive == 300 and not a.pinned
    ops.op_load(Ctx({"model": "a", "priority": -5}, uid=1001))        # lowering it is anyone's
    ops.op_pin(Ctx({"target": "a"}, uid=0))                           # root may
    ops.op_load(Ctx({"model": "a", "priority": 9}, uid=1000))         # and the owner
    assert a.pinned and a.priority == 9


def test_i12_review_7_evictions_that_never_finish_fail_the_load(monkeypatch):
    import llmosd.serve.placement as placement
    m, mem, posted = manager(budget=1500)
    serving(m, mem, "a:latest")                                       # its engine never ends
    got = []
    inst = m.acquire("c:latest", MAN, "sha256:c", 1000, lambda i, e: got.append(e))
    assert inst.state is State.LOADING and got == []
    monkeypatch.setattr(placement, "WAIT_LIMIT_S", -1.0)
    m._tick()
    assert isinstance(got[0], errors.OutOfMemory) and "instance" in str(got[0])
    assert inst.id not in [i.id for i in m.table] and mem.charged(("instance", inst.id)) is None
    assert mem.used("cpu") <= 1500 and posted == []                   # no load started


def test_i12_review_8_a_load_says_what_it_displaced(monkeypatch):
    import llmosd.serve.instances as instances
    m, mem, posted = manager(budget=2500)
    old = serving(m, mem, "t1:latest", last_used=1.0)
    serving(m, mem, "t2:latest", nbytes=500).pinned = True
    mem.charge(("job", 7), "cpu", 900)
    paused = []
    m.job_holders = lambda: [Holder("job", 7, "j:latest", "cpu", "device", 900, 1000, idle=True,
                                    preemptible=True, last_used=5.0)]
    m.preempt_job = lambda jid, why: (paused.append((jid, why)), mem.uncharge(("job", jid)))

    class Eng2(Eng):
        own_head_bytes = 0

        def __init__(self, *a, **k):
            super().__init__()

        def start(self):
            pass
    model = SimpleNamespace(config=SimpleNamespace(num_hidden_layers=1, num_key_value_heads=1, head_dim=4,
                                                   max_position_embeddings=32))
    monkeypatch.setattr(instances, "load_model", lambda *a: (model, None))
    monkeypatch.setattr(instances, "resident_bytes", lambda model: 1200)
    monkeypatch.setattr(instances, "Engine", Eng2)
    ctx = Ctx({"model": "t3"})
    ops_for(m).op_load(ctx)
    m._on_engine(old, old.engine, None, "stopped", {})
    settle(posted)
    assert ctx.err is None, ctx.err
    assert ctx.reply["evicted"] == [{"model": "t1:latest", "instance": old.id, "to": "store",
                                     "reason": "room for t3:latest"}]
    assert ctx.reply["paused_jobs"] == [7] and paused == [(7, "preempted: room for t3:latest")]


def test_i12_review_8_llmctl_load_prints_what_it_displaced(capsys):
    from test_cli_top import FakeClient, run
    reply = {"id": 3, "model": "t3:latest", "state": "ready", "device": "cpu", "resident_bytes": 1000,
             "load_ms": 10.0, "evicted": [{"model": "t1:latest", "instance": 1, "to": "store",
                                           "reason": "room for t3:latest"}], "paused_jobs": [7]}

    class Client(FakeClient):
        def load(self, model, **mem_):
            return reply
    assert run(Client(), "load", "t3") == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == "evicted t1:latest (instance 1) to store: room for t3:latest"
    assert out[1] == "paused job 7 to make room" and out[2].startswith("instance 3: t3:latest ready")


def test_i12_review_9_eviction_reasons_are_plain_and_expiries_say_so():
    from llmctl.cli.table import eviction_line
    m, mem, posted = manager(budget=2500, host=5000)
    a = with_runner(serving(m, mem, "a:latest", last_used=1.0))
    b = serving(m, mem, "b:latest", last_used=time.time() - 10)
    b.keep_alive = 5
    m.acquire("c:latest", MAN, "sha256:c", 1000, lambda i, e: None)
    m._tick()
    swap, expiry = mem.recent_evictions()
    assert (swap["reason"], swap["to"], swap["why"], swap["instance"]) == ("room for c:latest", "host", "evicted", a.id)
    assert expiry["why"] == "expired" and expiry["reason"].startswith("keep-alive expired")
    line = eviction_line(swap)
    assert line.startswith("evicted ") and line.endswith(f": a:latest (instance {a.id}) to host: room for c:latest")
    assert eviction_line(expiry).startswith("expired ") and "to store: keep-alive expired" in eviction_line(expiry)
    old = {"model": "x", "instance": 1, "to": "store", "reason": "evicted: room for loading y"}   # an older daemon
    assert eviction_line(old).endswith("to store: room for loading y")
    m._on_engine(a, a.engine, None, "stopped", {"swapped": True})
    m._on_engine(b, b.engine, None, "stopped", {})
    settle(posted)


def test_i12_review_10_a_swap_in_is_called_one():
    from llmctl.cli.infer import stats_line, waiting_text
    m, mem, posted = manager(budget=5000, host=5000)
    swapped(m, mem, "smollm2:latest")

    class Peer:
        ident = b"p"
    ctx = Ctx({})
    ctx.peer, ctx.rid = Peer(), 1
    t = task()
    ops_for(m)._run(ctx, "smollm2:latest", {}, "sha256:smollm2:latest", t)
    assert t.stream.chunks[0]["wait"] == "swap_in" and t.stream.chunks[0]["loading"] == "smollm2:latest"
    assert waiting_text(t.stream.chunks[0]) == "swapping smollm2:latest back in..."
    assert waiting_text({"loading": "x:latest", "wait": "load"}) == "loading x:latest..."
    line = stats_line({"loaded": True, "load_ms": 10.0, "swap_in_ms": 4.0, "generated_tokens": 1})
    assert "swapped back in 0.00s" in line and "loaded in" not in line
    assert "loaded in 0.01s" in stats_line({"loaded": True, "load_ms": 10.0})


def test_i12_review_11_the_cpu_row_shows_what_the_budget_does_not_account(monkeypatch, capsys):
    from llmctl.cli.table import device_rows
    from llmosd.ops import rss_rows
    import llmosd.models.loader as loader
    cpu = {"device": "cpu", "budget": 8000, "instances": 2000, "jobs": 500, "reserved": 100,
           "free": 5400, "host_budget": 1000, "host_used": 400}
    assert rss_rows(cpu, 3000) == {"process_rss": 3000, "other": 500}   # jobs: other processes
    assert rss_rows(cpu, 1000)["other"] == 0
    rows = device_rows([{**cpu, **rss_rows(cpu, 3000)}, {**cpu, "device": "cuda:0"}])
    assert rows[0][-1] == "500 B" and rows[1][-1] == "-" and rows[2][-1] == "-"
    trims = []

    class Libc:
        def malloc_trim(self, pad):
            trims.append(pad)
    monkeypatch.setattr(loader, "_LIBC", Libc())
    loader.release_free_heap()
    assert trims == [0]


def test_i13_3_load_options_reach_the_loader_and_a_mismatch_is_refused(monkeypatch):
    """A load's dtype/quant go to ``load_model`` (the config's quant when none is given) and
    are kept on the instance (and in the desired state); a load asking for other options
    than those of the instance already loaded is refused, naming how it is loaded."""
    import llmosd.serve.instances as instances
    from llmosd import desired
    seen = []
    model = SimpleNamespace(config=SimpleNamespace(num_hidden_layers=1, num_key_value_heads=1, head_dim=4,
                                                   max_position_embeddings=32))

    def load_model(store, man, device, dtype, quant="auto"):
        seen.append((dtype, quant))
        return model, None

    class Eng2(Eng):
        own_head_bytes = 0

        def __init__(self, *a, **k):
            super().__init__()

        def start(self):
            pass
    monkeypatch.setattr(instances, "load_model", load_model)
    monkeypatch.setattr(instances, "resident_bytes", lambda model: 1000)
    monkeypatch.setattr(instances, "weights_text", lambda model: "int8")
    monkeypatch.setattr(instances, "Engine", Eng2)
    m, mem, posted = manager(budget=1 << 30)
    m.use_config(SimpleNamespace(quant="int4", max_batch=2, stream_buffer=4, max_prefill_tokens=8,
                                 max_waiting=4, kv_block_size=16, compile="off", max_kv_bytes=0))
    ops = ops_for(m)
    ctx = Ctx({"model": "t1", "quant": "int8", "dtype": "bfloat16"})
    ops.op_load(ctx)
    ctx2 = Ctx({"model": "t2"})
    ops.op_load(ctx2)
    settle(posted)
    assert ctx.err is None and ctx2.err is None
    import torch
    assert seen == [(torch.bfloat16, "int8"), (torch.float32, "int4")]
    assert ctx.reply["weights"] == "int8" and ctx.reply["kv_blocks_total"] == 4
    t1 = m.table.get(ctx.reply["id"])
    assert desired.entry(t1)["quant"] == "int8" and desired.entry(t1)["dtype"] == "bfloat16"
    assert desired.checked(desired.entry(t1))
    ops.op_load(Ctx({"model": "t1", "quant": "auto"}))          # auto: whatever it is loaded as
    with pytest.raises(errors.InvalidArgument, match="already loaded as int8.*unload it first"):
        ops.op_load(Ctx({"model": "t1", "quant": "int4"}))
    with pytest.raises(errors.InvalidArgument, match="already loaded"):
        m.acquire("t1:latest", MAN, "sha256:t1:latest", 1000, lambda i, e: None, load_opts={"dtype": "float32"})
