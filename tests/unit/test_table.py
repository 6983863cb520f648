import pytest

from llmctl import errors
from llmosd.table import LEGAL, ModelTable, State


def test_lifecycle_and_counts():
    t = ModelTable()
    i = t.add("m:latest", "sha256:x", "cpu", 1000)
    assert i.id == 1 and i.state is State.LOADING
    with pytest.raises(errors.InvalidState):
        i.begin_request()
    i.transition(State.READY)
    i.begin_request()
    i.begin_request()
    assert i.state is State.BUSY and i.active_requests == 2
    i.end_request(5)
    assert i.state is State.BUSY
    i.end_request(7)
    assert i.state is State.READY and i.tokens_served == 12 and i.requests_served == 2
    with pytest.raises(errors.InvalidState):
        t.remove(i.id)                     # must be unloading first
    i.transition(State.UNLOADING)
    t.remove(i.id)
    assert len(t) == 0
    assert t.add("m:latest", "sha256:x", "cpu", None).id == 2   # ids are never reused


def test_illegal_transitions_refused():
    t = ModelTable()
    i = t.add("m:latest", "d", "cpu", None)
    for s in State:
        if s not in LEGAL[State.LOADING]:
            with pytest.raises(errors.InvalidState):
                i.transition(s)
    i.transition(State.FAILED, "bad weights")
    assert i.reason == "bad weights"
    with pytest.raises(errors.InvalidState):
        i.transition(State.READY)


def test_usable_prefers_ready_and_least_busy():
    t = ModelTable()
    a, b, c = (t.add("m:latest", "d", "cpu", None) for _ in range(3))
    a.transition(State.READY)
    a.begin_request()
    b.transition(State.READY)
    assert t.usable("m:latest", "d") is b
    assert t.usable("m:latest", "other") is None
    with pytest.raises(errors.InstanceNotFound):
        t.get(99)
    assert [r["id"] for r in t.rows()] == [1, 2, 3] and c.state is State.LOADING
