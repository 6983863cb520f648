import pytest

from llmosd.serve.scheduler import Scheduler, Seq


def test_prefill_then_decode_and_finish_reasons():
    s = Scheduler(max_batch=4, eos_ids={2})
    s.add(Seq("a", prompt_len=3, max_tokens=2, capacity=5))
    s.add(Seq("b", prompt_len=3, max_tokens=10, capacity=10))
    s.add(Seq("c", prompt_len=4, max_tokens=10, capacity=5))
    p = s.schedule()
    assert p.prefill == ["a", "b", "c"] and p.decode == []
    assert s.update("a", 7).finish_reason is None
    assert s.update("b", 2).finish_reason == "stop"          # eos
    assert s.update("c", 9).finish_reason == "context"       # 4 + 1 fills 5 positions
    assert s.schedule().decode == ["a"]
    assert s.update("a", 8).finish_reason == "length"
    assert not s.schedule() and len(s) == 0


def test_stop_string_and_cancel():
    s = Scheduler(1, set())
    s.add(Seq("a", 1, 10, 20))
    assert s.update("a", 5, stop_hit=True).finish_reason == "stop"
    s.add(Seq("b", 1, 10, 20))
    assert s.finish("b", "cancelled").finish_reason == "cancelled"
    assert s.finish("b", "cancelled") is None


def test_round_robin_beyond_max_batch_and_backpressure():
    s = Scheduler(max_batch=2, eos_ids=set())
    for k in "abcd":
        s.add(Seq(k, 1, 100, 200))
    seen = set()
    for _ in range(2):
        p = s.schedule()
        seen.update(p.prefill)
        for k in p.prefill:
            s.update(k, 1)
    assert seen == set("abcd")
    p = s.schedule(blocked=lambda k: k in "ab")
    assert set(p.decode) <= set("cd") and p.decode


def test_prompt_must_fit():
    with pytest.raises(ValueError):
        Scheduler(1, set()).add(Seq("a", 11, 1, 10))
