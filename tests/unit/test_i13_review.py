"""Issue 13 review: the prefix cache per adapter (1), blocked sequences hold no batch slot and
are preempted first (2), one score/embed/classify call in progress at a time (3), a swapped
instance's charge without its dropped KV pool and the weights' estimator fed weights only (4),
the auto pool without a forced full context (5), the dead KV-byte admission gone (6)."""
from __future__ import annotations

from pathlib import Path

from llmctl import errors
from llmosd.serve.blocks import adapter_salt
from llmosd.table import Instance, State
from test_i13_sched import Engine, make, seq

ROOT = Path(__file__).resolve().parents[2]
AD1, AD2 = "sha256:" + "1" * 64, "sha256:" + "2" * 64


# -- 1: equal tokens under another adapter are other KV -----------------------------------------

def test_i13_review_1_prefix_blocks_are_shared_only_within_one_adapter():
    assert adapter_salt(None) == b"" and adapter_salt(AD1) == adapter_salt(AD1) != adapter_salt(AD2)
    s = make(num_blocks=32, block_size=4, max_batch=4, max_prefill_tokens=64)
    e = Engine(s)                      # its fake KV holds the salt: a wrong share fails a read
    system = list(range(1, 21))        # 5 full blocks
    s.add(seq("base", "x", system + [30], max_tokens=10))
    e.step()
    s.add(seq("a", "y", system + [40], max_tokens=10, salt=adapter_salt(AD1)))
    assert [(c.key, c.start) for c in e.step().prefill] == [("a", 0)]       # nothing shared
    assert not set(s.table("a")) & set(s.table("base"))
    s.add(seq("a2", "z", system + [50], max_tokens=2, salt=adapter_salt(AD1)))
    assert [(c.key, c.start) for c in e.step().prefill] == [("a2", 20)]     # same adapter: shared
    assert s.table("a2")[:5] == s.table("a")[:5]
    s.add(seq("b2", "w", system + [60], max_tokens=2))
    assert [(c.key, c.start) for c in e.step().prefill] == [("b2", 20)]     # base: its own
    assert s.table("b2")[:5] == s.table("base")[:5]
    e.drain()
    assert s.blocks.free_count == 32


def test_i13_review_1_an_adapters_request_after_the_base_gets_its_own_output():
    """The reviewer's repro: the base's request first registers its prompt's blocks; the same
    prompt with an adapter must not reuse them (its greedy output equals a fresh engine's)."""
    import torch
    from test_engine import greedy, pool_engine, random_adapter
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    prompt = "You are a helpful system prompt. Hi"
    try:
        outs = []
        for base_first in (True, False):
            eng, events = pool_engine(64, block_size=4, stream_buffer=1000)
            try:
                a = random_adapter(None, AD1, 1)
                eng.add_adapter(a.key, a)
                while events.get(timeout=30)[1] != "adapter":
                    pass
                if base_first:
                    greedy(eng, events, "b0", prompt)
                outs.append(greedy(eng, events, "a0", prompt, adapter=a.key))
            finally:
                eng.stop()
                eng.join(10)
    finally:
        torch.set_num_threads(before)
    assert outs[0] == outs[1]


# -- 2: backpressure holds blocks, not batch slots -----------------------------------------------

def test_i13_review_2_blocked_sequences_hold_no_batch_slot():
    s = make(num_blocks=64, block_size=4, max_batch=2, max_prefill_tokens=64)
    e = Engine(s)
    s.add(seq("a1", "A", [1, 2, 3], max_tokens=50))
    s.add(seq("a2", "A", [4, 5, 6], max_tokens=50))
    e.step()
    e.step()
    assert set(s.running) == {"a1", "a2"}
    lagging = lambda k: k in ("a1", "a2")         # noqa: E731  (client A stopped reading)
    s.add(seq("b", "B", [7, 8, 9], max_tokens=3))
    plan = e.step(lagging)
    assert [c.key for c in plan.prefill] == ["b"] and plan.decode == []
    for _ in range(3):
        e.step(lagging)
    assert "b" in e.done and e.done["b"].finish_reason == "length"
    plan = e.step()                               # A reads again: both decode, their blocks kept
    assert plan.decode == ["a1", "a2"] and plan.preempted == []
    e.drain()
    assert s.blocks.free_count == 64


def test_i13_review_2_a_short_pool_preempts_blocked_sequences_first():
    s = make(num_blocks=4, block_size=4, max_batch=4, max_prefill_tokens=64)
    e = Engine(s)
    s.add(seq("a", "A", list(range(1, 11)), max_tokens=20))     # 3 blocks
    e.step()
    lagging = lambda k: k == "a"                                 # noqa: E731
    s.add(seq("c", "C", [50, 51, 52, 53, 54, 55], max_tokens=3))   # needs 2 blocks, 1 free
    plan = e.step(lagging)
    assert plan.preempted == ["a"] and [c.key for c in plan.prefill] == ["c"]
    while "c" not in e.done:
        e.step(lagging)
    tokens = list(s.seqs["a"].tokens)
    plan = e.step()                          # back, recomputed (its cached prefix kept)
    (ch,) = plan.prefill
    assert ch.key == "a" and ch.start + ch.length == len(tokens) and ch.sample
    e.drain()
    assert s.blocks.free_count == 4


def test_i13_review_2_a_decode_that_needs_a_block_preempts_a_blocked_one_not_the_newest():
    s = make(num_blocks=4, block_size=4, max_batch=4, max_prefill_tokens=64)
    e = Engine(s)
    s.add(seq("old", "A", [1, 2, 3, 4, 5, 6, 7], max_tokens=20))   # 2 blocks
    s.add(seq("mid", "B", [1, 2, 3], max_tokens=20))                # 1 block, fills at 4
    s.add(seq("new", "C", [9, 9, 9], max_tokens=20))                # 1 block, fills at 4
    e.step()
    assert s.blocks.free_count == 0
    lagging = lambda k: k == "old"                                   # noqa: E731
    e.step(lagging)                       # mid and new reach 5 tokens: each needs a block
    plan = e.step(lagging)
    assert "old" in plan.preempted and "new" not in plan.preempted
    assert {"mid", "new"} <= set(plan.decode)
    e.drain()
    assert s.blocks.free_count == 4


# -- 3: one call in progress ---------------------------------------------------------------------

def test_i13_review_3_one_call_in_progress_the_others_wait_holding_nothing():
    import torch
    from llmosd.serve.request import Call
    from test_engine import collect, pool_engine
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    eng, events = pool_engine(64, block_size=4, max_prefill_tokens=16, max_waiting=8, start=False)
    started, overlap, real = [], [], eng.runner.start_call

    def spy(call, n):
        overlap.append(sum(not t.done for t in started))          # tasks alive as one starts
        task = real(call, n)
        started.append(task)
        return task
    eng.runner.start_call = spy
    keys = [("c", i) for i in range(4)]
    try:
        for key in keys:
            eng.submit(Call(key, "score", {"text": "x" * 100}))    # several slices each
        eng.cancel(("c", 3), "cancelled")
        eng.start()
        got, _ = collect(events, keys)
    finally:
        eng.stop()
        eng.join(10)
        torch.set_num_threads(before)
    assert [got[k][1][0] for k in keys] == ["end", "end", "end", "error"]
    assert len(started) == 3 and overlap == [0, 0, 0]


# -- 4: the KV pool is charged on the device only --------------------------------------------------

def test_i13_review_4_a_swapped_instance_is_charged_without_its_kv_pool():
    inst = Instance(1, "m:latest", "sha256:m", "cpu", None)
    inst.resident_bytes, inst.kv_bytes = 1000, 2000
    inst.transition(State.READY)
    assert inst.charge_bytes() == 3000
    inst.transition(State.SWAPPED)
    assert inst.charge_bytes() == 1000 and inst.charge_bytes("device") == 3000
    from test_placement_review import task
    from test_instances_memory import manager, serving, settle
    m, mem, posted = manager(budget=5000, host=5000)
    a = serving(m, mem, "a:latest")
    a.kv_bytes = 2000
    mem.charge(("instance", a.id), "cpu", 3000)
    a = _swap(m, mem, a)                                               # its runner: OOM swapping in
    assert mem.charged(("instance", a.id)) == ("cpu", "host", 1000)
    ekey = ("instance", "float32")
    m.place._origins[a.id] = (ekey, 1000)
    t = task()
    m.run("a:latest", {}, "sha256:a:latest", 1000, t)                 # swap-in: weights + pool
    assert a.state is State.LOADING and mem.charged(("instance", a.id)) == ("cpu", "device", 3000)
    settle(posted)                                                     # out of memory: back to host
    assert isinstance(t.stream.err, errors.OutOfMemory) and a.state is State.SWAPPED
    assert mem.charged(("instance", a.id)) == ("cpu", "host", 1000)
    assert mem.estimator.correct(ekey, 1000) == 1250                   # weights only: x1.25, not x3.3


def _swap(m, mem, inst):
    from test_placement_review import with_runner
    with_runner(inst, oom=True)
    m.place.swap_out(inst, "room for x:latest")
    m._on_engine(inst, inst.engine, None, "stopped", {"swapped": True})
    assert inst.state is State.SWAPPED
    return inst


def test_i13_review_4_the_kv_pools_out_of_memory_teaches_the_weights_estimate_nothing():
    from test_instances_memory import MAN, manager
    from test_placement_review import ConfigStore
    m, mem, posted = manager(budget=1_000_000)
    m.store, m.kv.limit = ConfigStore(), 0
    man = {**MAN, "config": {"digest": "sha256:c"}}
    inst = m.acquire("b:latest", man, "sha256:b", 1000, lambda i, e: None)
    assert inst.kv_bytes > 0
    m._loaded(inst, None, 0, 0.0, errors.OutOfMemory("no memory for the KV cache pool"))
    assert inst.state is State.FAILED and mem.estimator.ratios == {}
    inst2 = m.acquire("b:latest", man, "sha256:b", 1000, lambda i, e: None)
    m._loaded(inst2, None, 0, 0.0, errors.OutOfMemory("weights"), True)   # the weights': learnt
    assert mem.estimator.ratios


# -- 5: the auto pool ------------------------------------------------------------------------------

def test_i13_review_5_the_auto_pool_is_not_forced_to_a_full_context():
    from llmosd.serve.placement import KV_AUTO_MAX, pool_blocks
    pos, bs = 46_080, 16                                          # SmolLM2-360M, float32
    n = pool_blocks(0, 64 << 30, 131_072, pos, 16, bs)            # a 128k context
    assert n * bs * pos <= KV_AUTO_MAX and n * bs < 131_072
    assert pool_blocks(0, 1 << 20, 131_072, pos, 16, bs) >= 4     # tiny memory: a few blocks
    assert pool_blocks(40 * bs * pos, 1 << 20, 131_072, pos, 16, bs) == 40   # explicit: as given


# -- 6: dead code ----------------------------------------------------------------------------------

def test_i13_review_6_the_kv_byte_admission_is_gone_and_modules_stay_small():
    from llmosd.serve import instances, scheduler
    for name in ("KVBudget", "prompt_token_bound", "kv_positions", "kv_position_bytes", "PROMPT_MARGIN",
                 "CHAT_MESSAGE_MARGIN", "CHAT_TEMPLATE_MARGIN"):
        assert not hasattr(scheduler, name), name
    assert not hasattr(instances, "default_kv_limit")
    for path in ("engine.py", "instances.py", "scheduler.py", "blocks.py", "placement.py", "calls.py"):
        assert len((ROOT / "llmosd/serve" / path).read_text().splitlines()) <= 500, path
