"""Issue 13: the continuous-batching scheduler over the paged KV cache (pure, no torch).

``Engine`` below stands in for the real engine: it runs each plan against a fake KV pool in
which a slot holds the whole prefix its position's KV depends on, so any block-table, prefix
sharing or recompute mistake shows as a wrong slot content."""
import random

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from llmctl.errors import Busy
from llmosd.serve.blocks import BlockManager
from llmosd.serve.scheduler import Scheduler, Seq
from test_i13_blocks import check

EOS = 0


class Engine:
    def __init__(self, s: Scheduler, rng=None):
        self.s, self.kv, self.rng = s, {}, rng or random.Random(0)
        self.done = {}                          # key -> finished Seq

    def rows(self, plan):
        for c in plan.prefill:
            yield c.key, c.start, c.length, c.sample
        for key in plan.decode:
            yield key, len(self.s.seqs[key].tokens) - 1, 1, True

    def step(self, blocked=lambda k: False, eos_rate=0.0):
        s, bs = self.s, self.s.blocks.block_size
        before = set(s.running)
        plan = s.schedule(blocked)
        rows = list(self.rows(plan))
        assert len({k for k, *_ in rows}) == len(rows)                  # one row per sequence
        assert not any(blocked(k) for k, *_ in rows)                    # blocked ones wait
        limit = s.idle_prefill_tokens if not plan.decode else max(s.max_prefill_tokens, len(plan.decode) + 1)
        assert sum(n for _, _, n, _ in rows) <= limit
        assert len(plan.decode) <= s.max_batch
        if set(s.running) - before:          # admitted: blocked sequences hold no batch slot
            assert sum(1 for k in s.running if not blocked(k)) <= s.max_batch
        for key, start, n, sample in rows:                              # reads see right KV
            seq, table = s.seqs[key], s.table(key)
            assert s.blocks.positions(key) >= start + n == seq.num_computed
            assert sample == (start + n == len(seq.tokens))
            for p in range(start):
                assert self.kv.get(table[p // bs] * bs + p % bs) == (seq.salt, *seq.tokens[:p + 1])
        for key, start, n, sample in rows:                              # writes: own blocks only
            seq, table = s.seqs[key], s.table(key)
            for p in range(start, start + n):
                assert s.blocks.ref[table[p // bs]] == 1, "write into a shared block"
                self.kv[table[p // bs] * bs + p % bs] = (seq.salt, *seq.tokens[:p + 1])   # KV: adapter too
        for key, _, _, sample in rows:
            if sample:
                tok = EOS if self.rng.random() < eos_rate else self.rng.randrange(1, 50)
                seq = s.postprocess(key, tok)
                if seq.finish_reason:
                    self.done[key] = seq
        return plan

    def drain(self, limit=10_000):
        for _ in range(limit):
            if not len(self.s):
                return
            assert self.step(), "nothing scheduled while sequences wait: deadlock"
        raise AssertionError("did not drain")


def make(num_blocks=64, block_size=4, **kw):
    kw.setdefault("eos_ids", {EOS})
    return Scheduler(BlockManager(num_blocks, block_size), **kw)


def seq(key, client, tokens, max_tokens=4, capacity=1000, salt=b""):
    return Seq(key, client, list(tokens), len(tokens), max_tokens, capacity, salt=salt)


def test_i13_2_blocks_all_return_to_the_pool():
    s = make(num_blocks=16, max_batch=4, max_prefill_tokens=8)
    e = Engine(s)
    for i in range(10):
        s.add(seq(i, i % 3, range(1, 3 + i), max_tokens=5 + i))
    for _ in range(6):
        e.step()
    s.finish(3, "cancelled")                    # cancel one running and one waiting
    s.finish(9, "cancelled")
    check(s.blocks)
    e.drain()
    assert len(s) == 0 and s.stats() == {"waiting": 0, "running": 0, "blocks_total": 16,
                                         "blocks_used": 0, "blocks_cached": s.blocks.cached_count,
                                         "block_size": 4}
    assert s.blocks.free_count == s.blocks.num_blocks
    check(s.blocks)


def test_i13_2_fairness_one_clients_thousand_requests_do_not_starve_another():
    s = make(num_blocks=256, max_batch=4, max_waiting=2000)
    e = Engine(s)
    for i in range(1000):
        s.add(seq(("pipe", i), "pipe", [1, 2, 3], max_tokens=3))
    e.step()
    e.step()
    s.add(seq("chat", "chat", [4, 5, 6], max_tokens=3))
    for steps in range(1, 10):                  # the next free slot goes to the chat
        plan = e.step()
        if any(c.key == "chat" for c in plan.prefill):
            break
    assert steps <= 2, steps
    assert s.stats()["waiting"] > 900
    # FIFO within a client
    admitted = [k for k in e.done if k != "chat"]
    assert admitted == sorted(admitted)


def test_i13_2_long_prompt_is_chunked_and_decodes_run_every_step():
    s = make(num_blocks=200, max_batch=4, max_prefill_tokens=16)
    e = Engine(s)
    for k in "ab":
        s.add(seq(k, k, [1, 2], max_tokens=200))
    e.step()
    s.add(seq("long", "long", range(1, 301), max_tokens=1))
    chunks = []
    while "long" not in e.done:
        plan = e.step()
        assert sorted(plan.decode) == ["a", "b"]          # never stalled by the prefill
        chunks += [c for c in plan.prefill if c.key == "long"]
        assert all(c.length <= 16 - 2 for c in chunks)    # decodes count against the budget
    assert [c.start for c in chunks] == list(range(0, 300, 14))
    assert [c.sample for c in chunks] == [False] * (len(chunks) - 1) + [True]


def test_i13_prefill_goes_in_big_chunks_when_nobody_decodes():
    """Nobody's tokens to keep flowing: a lone long prompt is not cut into small chunks
    (fewer, fuller matmuls: time to first token), up to idle_prefill_tokens."""
    s = make(num_blocks=200, max_batch=4, max_prefill_tokens=16, idle_prefill_tokens=256)
    e = Engine(s)
    s.add(seq("long", "long", range(1, 301), max_tokens=2))
    plan = e.step()
    assert [(c.start, c.length) for c in plan.prefill] == [(0, 256)]
    plan = e.step()
    assert [(c.start, c.length) for c in plan.prefill] == [(256, 44)]


def test_i13_2_preempts_the_newest_when_the_pool_runs_out_and_recomputes():
    s = make(num_blocks=5, block_size=2, max_batch=4)
    e = Engine(s, random.Random(1))
    s.add(seq("old", "x", [1, 2, 3], max_tokens=6))       # 2 blocks now, 5 at the end
    s.add(seq("new", "y", [4, 5, 6], max_tokens=4))       # 2 blocks now, 4 at the end
    e.step()
    preempted = []
    while len(s):
        plan = e.step()
        preempted += plan.preempted
        assert "old" not in plan.preempted
        if "new" in plan.preempted:
            n = s.seqs["new"]
            assert n.num_computed == 0 and "new" not in s.blocks and n.status == "waiting"
            assert n.generated >= 1 and len(n.tokens) == 3 + n.generated   # output kept
    assert preempted == ["new"]
    assert e.done["old"].generated == 6 and e.done["new"].generated == 4
    assert e.done["new"].finish_reason == "length"
    assert s.blocks.free_count == 5


def test_i13_2_recompute_continues_the_same_tokens():
    """A preempted sequence's re-prefill covers prompt + generated, and sampling continues."""
    s = make(num_blocks=6, block_size=2, max_batch=2)
    e = Engine(s)
    s.add(seq("a", "x", [1, 2, 3], max_tokens=10, capacity=8))
    s.add(seq("b", "y", [4], max_tokens=10))
    preempted, recompute = [], []
    while len(s):
        plan = e.step()
        preempted += plan.preempted
        recompute += [c for c in plan.prefill if c.key == "b" and preempted]
    assert preempted == ["b"]
    # prompt + generated again, the blocks it had computed still come from the prefix cache
    # (the fake KV pool checks their content)
    assert recompute[0].start == 4 and recompute[-1].sample
    assert e.done["a"].finish_reason == "context" and len(e.done["a"].tokens) == 8
    b = e.done["b"]
    assert b.finish_reason == "length" and b.generated == 10 and len(b.tokens) == 11


def test_i13_2_alone_a_sequence_ends_at_the_pool_size():
    s = make(num_blocks=3, block_size=2)
    e = Engine(s)
    s.add(seq("a", "x", [1, 2], max_tokens=100, capacity=100))
    e.drain()
    assert e.done["a"].finish_reason == "context" and len(e.done["a"].tokens) == 6


def test_i13_2_busy_past_max_waiting():
    s = make(max_waiting=3, max_batch=1)
    for i in range(3):
        s.add(seq(i, "c", [1]))
    with pytest.raises(Busy) as exc:
        s.add(seq(3, "c", [1]))
    assert "3 requests waiting" in str(exc.value) and "max_waiting" in exc.value.hint
    Engine(s).step()                            # one admitted: room again
    s.add(seq(3, "c", [1]))


def test_i13_2_prefix_sharing_skips_the_cached_system_prompt():
    s = make(num_blocks=32, block_size=4, max_batch=4, max_prefill_tokens=64)
    e = Engine(s)
    system = list(range(1, 21))                 # 5 full blocks
    s.add(seq("a", "x", system + [30, 31], max_tokens=10))
    e.step()
    s.add(seq("b", "y", system + [40], max_tokens=2))
    plan = e.step()
    assert [(c.key, c.start, c.length) for c in plan.prefill] == [("b", 20, 1)]
    assert s.table("b")[:5] == s.table("a")[:5]
    e.drain()
    s.add(seq("c", "z", system + [50, 51, 52], max_tokens=1))   # after both ended
    assert [(c.start, c.length) for c in e.step().prefill] == [(20, 3)]
    e.drain()
    assert s.blocks.free_count == 32


step = st.tuples(st.just("step"), st.frozensets(st.integers(0, 15), max_size=2))
ops = st.lists(st.one_of(
    st.tuples(st.just("add"), st.integers(0, 2), st.integers(0, 3), st.integers(1, 8),
              st.integers(1, 30), st.integers(4, 80), st.sampled_from([b"", b"", b"adapter"])),
    step, step, step,
    st.tuples(st.just("cancel"), st.integers(0, 30)),
), max_size=80)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(num_blocks=st.integers(1, 16), block_size=st.integers(1, 4), max_batch=st.integers(1, 4),
       max_prefill=st.integers(1, 12), max_waiting=st.integers(1, 6), ops=ops,
       seed=st.integers(0, 2**16))
def test_i13_2_property_no_block_leaked_or_double_freed(num_blocks, block_size, max_batch,
                                                        max_prefill, max_waiting, ops, seed):
    s = make(num_blocks, block_size, max_batch=max_batch, max_prefill_tokens=max_prefill,
             max_waiting=max_waiting)
    e = Engine(s, random.Random(seed))
    prefixes = [[], [7] * 6, [1, 2, 3, 4, 5, 6, 7], [9, 8]]
    n = 0
    for op in ops:
        if op[0] == "add":
            _, client, prefix, tail, max_tokens, capacity, salt = op
            toks = (prefixes[prefix] + list(range(20, 20 + tail)))
            try:
                s.add(seq(n, client, toks, max_tokens, capacity, salt))
            except ValueError:
                assert len(toks) > min(capacity, num_blocks * block_size)
            except Busy:
                assert s.stats()["waiting"] >= max_waiting
            n += 1
        elif op[0] == "step":
            e.step(blocked=lambda k, b=op[1]: k in b, eos_rate=0.03)
        else:
            s.finish(op[1], "cancelled")
        check(s.blocks)
        assert set(s.blocks._tables) == set(s.running)
        # preempted sequences wait beyond max_waiting: only new ones are refused
        assert s.stats()["waiting"] - len(s._resume) <= max_waiting
        for key, q in s.seqs.items():
            assert len(q.tokens) <= q.capacity <= num_blocks * block_size
            if key in s.running:
                assert s.blocks.positions(key) >= q.num_computed
            else:
                assert q.num_computed == 0 and key not in s.blocks
    e.drain()
    check(s.blocks)
    assert s.blocks.free_count == num_blocks and s.blocks.used_count == 0
