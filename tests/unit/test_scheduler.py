"""The step scheduler's basic contract (issue 13 API): prefill, decode, finish reasons, cancel,
backpressure.  Fairness, chunking, preemption, prefix sharing: tests/unit/test_i13_sched.py."""
import pytest

from llmosd.serve.blocks import BlockManager
from llmosd.serve.scheduler import FINISHED, RUNNING, Chunk, Scheduler, Seq


def sched(num_blocks=64, block_size=4, **kw):
    kw.setdefault("eos_ids", {2})
    return Scheduler(BlockManager(num_blocks, block_size), **kw)


def seq(key, n, max_tokens, capacity, client="c"):
    return Seq(key, client, list(range(10, 10 + n)), n, max_tokens, capacity)


def test_prefill_then_decode_and_finish_reasons():
    s = sched(max_batch=4)
    s.add(seq("a", 3, 2, 5))
    s.add(seq("b", 3, 10, 10))
    s.add(seq("c", 4, 10, 5))
    p = s.schedule()
    assert [c.key for c in p.prefill] == ["a", "b", "c"] and p.decode == []
    assert all(c.sample and c.start == 0 for c in p.prefill)
    assert s.postprocess("a", 7).finish_reason is None
    assert s.postprocess("b", 2).finish_reason == "stop"          # eos
    assert s.postprocess("c", 9).finish_reason == "context"       # 4 + 1 fills 5 positions
    assert s.seqs["a"].status == RUNNING and s.seqs["a"].tokens[-1] == 7
    assert s.schedule().decode == ["a"]
    done = s.postprocess("a", 8)
    assert done.finish_reason == "length" and done.status == FINISHED
    assert not s.schedule() and len(s) == 0
    assert s.blocks.free_count == s.blocks.num_blocks


def test_stop_string_and_cancel():
    s = sched(max_batch=1)
    s.add(seq("a", 1, 10, 20))
    s.schedule()
    assert s.postprocess("a", 5, stop_hit=True).finish_reason == "stop"
    s.add(seq("b", 1, 10, 20))
    assert s.finish("b", "cancelled").finish_reason == "cancelled"
    assert s.finish("b", "cancelled") is None
    assert "b" not in s and s.stats()["waiting"] == 0


def test_backpressure_skips_blocked_and_keeps_blocks():
    s = sched(max_batch=4)
    for k in "abcd":
        s.add(seq(k, 1, 100, 200))
    p = s.schedule()
    assert [c.key for c in p.prefill] == list("abcd")
    for k in "abcd":
        s.postprocess(k, 1)
    p = s.schedule(blocked=lambda k: k in "ab")
    assert p.decode == ["c", "d"]
    assert s.table("a") and s.table("b")        # skipped, not preempted
    assert s.schedule().decode == ["a", "b"]    # c, d still await their tokens


def test_prompt_must_fit():
    with pytest.raises(ValueError, match="context"):
        sched().add(seq("a", 11, 1, 10))
    with pytest.raises(ValueError, match="pool"):
        sched(num_blocks=2, block_size=4).add(seq("a", 9, 1, 100))
    with pytest.raises(ValueError):
        sched().add(seq("a", 0, 1, 10))


def test_chunk_fields():
    s = sched(max_prefill_tokens=5, idle_prefill_tokens=5)
    s.add(seq("a", 12, 3, 50))
    assert s.schedule().prefill == [Chunk("a", 0, 5, False)]
    assert s.schedule().prefill == [Chunk("a", 5, 5, False)]
    assert s.schedule().prefill == [Chunk("a", 10, 2, True)]
