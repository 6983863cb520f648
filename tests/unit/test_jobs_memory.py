"""Jobs and the memory manager (issue 12): reservations at start, waiting with a reason,
refusal at submit, room made by the instance manager's side (a fake here), measured bytes,
and preemptible jobs paused for a load and queued again when the room comes back.  Real worker
processes running trivial job functions; the instance manager is played by the test."""
from __future__ import annotations

import time

import pytest

from llmctl.errors import InvalidArgument, OutOfMemory
from llmosd.jobs.queue import Job, JobState, after_restart
from llmosd.mem.manager import MemoryManager
from llmosd.mem.policy import Holder
from test_jobs_runner import Loop, counter_job, env  # noqa: F401 - env is a fixture

Q, R, PG, P, S, F, C = (JobState.QUEUED, JobState.RUNNING, JobState.PAUSING, JobState.PAUSED,
                        JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELLED)


def measuring_job(spec, store_root, ctl):
    """Reports the bytes it "measured", then waits to be stopped (or ends after a while)."""
    ctl.metrics({"step": 1, "mem_bytes": spec["mem"]})
    for _ in range(2000):
        if ctl.stop_requested():
            raise type("Cancelled", (Exception,), {})()
        time.sleep(0.01)
    return {"count": 1}


def submit(runner, func=counter_job, n=3, sleep=0.0, done=None, **kw):
    done = [] if done is None else done

    def on_done(job, manifest, error):
        done.append((job.state, manifest, error))
        if manifest is not None:
            runner.settle(job, None)
    return runner.start("train", "m:latest", func, {"n": n, "sleep": sleep, **kw.pop("spec", {})},
                        1000, None, on_done, **kw)


def drain(loop: Loop, seconds: float = 0.3) -> None:
    """Play the loop for a while (posted calls run), whatever comes."""
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        try:
            fn, args = loop.calls.get(timeout=0.02)
        except Exception:   # noqa: BLE001 - empty
            continue
        fn(*args)


@pytest.fixture
def mem_env(env):
    loop, records, make = env
    memory = MemoryManager({"cpu": 1000}, 0)
    return loop, records, lambda **kw: make(memory=memory, **kw), memory


def test_i12_5_job_reserves_its_estimate_and_gives_it_back(mem_env):
    loop, _, make, memory = mem_env
    runner = make()
    job = submit(runner, n=3, mem_estimate=600)
    assert job.state is R and memory.charged(("job", job.id)) == ("cpu", "device", 600)
    (h,) = runner.holders("cpu")
    assert (h.kind, h.id, h.bytes, h.idle, h.preemptible) == ("job", job.id, 600, False, False)
    loop.until(lambda: job.state is S)
    assert memory.charged(("job", job.id)) is None and memory.used("cpu") == 0
    assert job.row()["estimate_bytes"] == 600


def test_i12_5_job_bigger_than_the_budget_is_refused_at_submit(mem_env):
    _, _, make, _ = mem_env
    runner = make()
    with pytest.raises(InvalidArgument) as e:
        submit(runner, mem_estimate=5000)
    assert "about 5.0 KB on cpu, more than the whole budget of cpu (1.0 KB)" in e.value.message
    assert "--budget cpu=" in e.value.hint and runner.jobs == {}


def test_i12_5_job_that_does_not_fit_waits_with_its_reason(mem_env):
    loop, _, make, memory = mem_env
    runner = make()
    memory.charge(("instance", 1), "cpu", 700)        # nobody may evict it (no holder row)
    job = submit(runner, n=3, mem_estimate=600)
    assert job.state is Q and job.reason == "waiting for memory: needs 600 B on cpu, 300 B free of 1.0 KB"
    assert job.row()["reason"].startswith("waiting for memory")
    memory.uncharge(("instance", 1))                  # the room comes back: it starts
    loop.until(lambda: job.state is S)
    assert job.reason == ""


def test_i12_5_a_job_start_has_idle_instances_evicted_through_make_room(mem_env):
    loop, _, make, memory = mem_env
    runner = make()
    idle = Holder("instance", 4, "smol:latest", "cpu", "device", 700, 1000, last_used=1.0)
    memory.charge(("instance", 4), "cpu", 700)
    runner.other_holders = lambda: [idle] if memory.charged(("instance", 4)) else []
    plans = []
    job = submit(runner, n=3, mem_estimate=600)
    assert job.state is Q and job.reason.startswith("waiting for memory")   # nobody makes room yet

    def make_room(plan, done):                         # the instance manager's side
        plans.append(plan)
        memory.uncharge(("instance", 4))
        done(True)
    runner.make_room = make_room
    runner.schedule()
    assert [(a.kind, a.holder.id) for a in plans[0].actions] == [("unload", 4)]
    assert job.reason.startswith("making room: unload instance 4")
    loop.until(lambda: job.state is S)
    assert len(plans) == 1 and memory.used("cpu") == 0


def test_i12_5_measured_bytes_move_the_reservation_and_teach_the_estimator(mem_env):
    loop, _, make, memory = mem_env
    runner = make()
    job = submit(runner, measuring_job, mem_estimate=400, spec={"mem": 800})
    loop.until(lambda: job.mem_bytes is not None)
    assert memory.charged(("job", job.id)) == ("cpu", "device", 800)
    assert job.row()["mem_bytes"] == 800
    assert memory.estimator.correct(("job", "train", "full", "cpu"), 400) > 400
    runner.stop(job, "cancel")
    loop.until(lambda: job.state is C)
    assert memory.used("cpu") == 0


def test_i12_5_preempted_job_pauses_for_a_load_and_resumes_when_room_is_back(mem_env):
    loop, records, make, memory = mem_env
    runner = make()
    job = submit(runner, n=300, sleep=0.01, mem_estimate=600, preemptible=True)
    loop.until(lambda: job.metrics.get("step", 0) >= 10)
    (h,) = runner.holders("cpu")
    assert h.idle and h.preemptible and job.row()["preemptible"]
    # the instance manager plans a load of 700 B: the job's room is needed
    plan = memory.plan(700, "cpu", 0, runner.holders("cpu"), for_what="smol:latest")
    ((action),) = plan.actions
    assert plan.ok and action.kind == "pause" and action.holder.id == job.id
    got = []

    def on_done(ok):                                   # the load goes on: it charges its room
        got.append((ok, memory.used("cpu")))
        memory.charge(("instance", 9), "cpu", 700)
    runner.preempt(job.id, action.reason, on_done)
    assert job.state is PG
    loop.until(lambda: got)
    assert got == [(True, 0)] and job.state is P and job.checkpoint_step
    assert job.reason == "preempted: room for smol:latest"
    assert runner.jobs[job.id].row()["reason"] == "preempted: room for smol:latest"
    drain(loop)                                        # no room: it stays paused
    assert job.state is P and records.load()[0].preempted
    paused_at = job.checkpoint_step
    memory.uncharge(("instance", 9))                   # unloaded: the job resumes and ends
    loop.until(lambda: job.state is S)
    events = records.read_events(job.id, records.sizes(job.id))
    text = "\n".join(e["line"] for e in events if "line" in e)
    assert f"starting at {paused_at}" in text.split("queued, to resume")[-1]
    assert "memory is free again: queued, to resume" in text
    assert job.metrics["step"] == 300 and memory.used("cpu") == 0


def test_i12_5_user_paused_and_non_preemptible_jobs_stay_put(mem_env):
    loop, _, make, memory = mem_env
    runner = make()
    plain = submit(runner, n=10_000, sleep=0.01, mem_estimate=300)
    loop.until(lambda: plain.metrics.get("step", 0) >= 1)
    got = []
    runner.preempt(plain.id, "preempted: room for x", got.append)
    loop.until(lambda: got)
    assert got == [False] and plain.state is R
    assert not runner.holders("cpu")[0].idle
    runner.stop(plain, "pause")
    loop.until(lambda: plain.state is P)
    assert memory.used("cpu") == 0
    memory.charge(("instance", 1), "cpu", 10)
    memory.uncharge(("instance", 1))                   # memory freed: a user's pause holds
    drain(loop)
    assert plain.state is P and plain.reason == ""


def test_i12_5_preempted_job_is_queued_again_after_a_restart():
    j = Job(3, "train", "m:latest", 1000, state=P, reason="preempted: room for smol:latest",
            preemptible=True, preempted=True)
    assert after_restart(j) and j.state is Q and not j.preempted and j.reason == ""
    user = Job(4, "train", "m:latest", 1000, state=P, preemptible=True)
    assert not after_restart(user) and user.state is P


def test_i12_review_2_a_users_pause_during_a_preemption_holds(mem_env):
    loop, records, make, memory = mem_env
    runner = make()
    job = submit(runner, n=10_000, sleep=0.01, mem_estimate=600, preemptible=True)
    loop.until(lambda: job.metrics.get("step", 0) >= 3)
    got, replies = [], []
    runner.preempt(job.id, "preempted: room for smol:latest", got.append)
    assert job.state is PG and job.preempted
    runner.preempt(job.id, "preempted: room for other:latest", got.append)   # a second load: still a preemption
    assert job.preempted
    runner.stop(job, "pause", replies.append)         # its owner pauses it meanwhile
    assert not job.preempted
    loop.until(lambda: len(got) == 2 and replies)
    assert got == [True, True] and job.state is P and job.reason == ""
    memory.charge(("instance", 1), "cpu", 10)
    memory.uncharge(("instance", 1))                  # room comes back: a user's pause holds
    drain(loop)
    assert job.state is P and not records.load()[0].preempted
    runner.stop(job, "cancel")


def test_i12_review_3_preempted_job_resumes_when_a_charge_shrinks(mem_env):
    loop, _, make, memory = mem_env
    runner = make()
    job = submit(runner, n=200, sleep=0.01, mem_estimate=600, preemptible=True)
    loop.until(lambda: job.metrics.get("step", 0) >= 3)
    got = []

    def on_done(ok):                                  # the load charges its estimate
        got.append(ok)
        memory.charge(("instance", 9), "cpu", 700)
    runner.preempt(job.id, "preempted: room for smol:latest", on_done)
    loop.until(lambda: got)
    drain(loop)
    assert job.state is P and job.preempted
    memory.charge(("instance", 9), "cpu", 300)        # measured far below its estimate: room
    loop.until(lambda: job.state is S)
    assert memory.used("cpu") == 300


def test_i12_review_3_a_room_that_cannot_be_made_is_not_retried_in_a_loop(mem_env):
    loop, _, make, memory = mem_env
    runner = make()
    tries = []
    runner.use_instances(lambda: [Holder("instance", 5, "i:latest", "cpu", "device", 0)],
                         lambda actions, go, **kw: tries.append(actions))
    memory.charge(("instance", 5), "cpu", 700)
    job = submit(runner, mem_estimate=600)
    loop.until(lambda: tries)
    runner._room_made(job, False)                     # the instance side could not make it
    drain(loop, 0.3)
    assert len(tries) == 1 and job.state is Q          # zeroing its own reservation frees nothing
    runner.stop(job, "cancel")


def test_i12_5_a_room_never_made_fails_the_job_back_to_waiting(mem_env):
    """The instance side gives up on the room (``Placement.make_room``'s ``fail``, after its
    wait limit with the device over budget): the job is not started over the budget but
    waits, queued, with its reason, and starts once memory is freed."""
    loop, records, make, memory = mem_env
    runner = make()
    memory.charge(("instance", 5), "cpu", 700)
    calls = []

    def make_room(actions, go, *, room_for=None, fail=None):   # Placement.make_room's signature
        calls.append((actions, fail))
        assert fail is not None                                # the job side must say what failing does
        fail(OutOfMemory("the room was not made in 60s: instance 5 still held memory on cpu"))
        return []
    idle = Holder("instance", 5, "i:latest", "cpu", "device", 700, last_used=1.0)
    runner.use_instances(lambda: [idle] if memory.charged(("instance", 5)) else [], make_room)
    job = submit(runner, n=3, mem_estimate=600)
    loop.until(lambda: calls and job.reason.startswith("waiting for memory"))
    drain(loop, 0.2)
    assert len(calls) == 1 and job.state is Q and job.process is None
    assert memory.charged(("job", job.id)) in (None, ("cpu", "device", 0))
    events = records.read_events(job.id, records.sizes(job.id))
    assert any("the room was not made" in e.get("line", "") for e in events)
    memory.uncharge(("instance", 5))                           # freed: it starts and ends
    loop.until(lambda: job.state is S)


def test_i12_5_a_job_plan_counts_swaps_in_flight_on_the_host(env):
    """Host-tier bytes of instances still swapping out (``host_pending``) are the host's
    already: an idle instance the host has no room left for is unloaded, not swapped."""
    loop, records, make = env
    memory = MemoryManager({"cpu": 1000}, 1000)
    runner = make(memory=memory)
    memory.charge(("instance", 4), "cpu", 700)
    idle = Holder("instance", 4, "smol:latest", "cpu", "device", 700, last_used=1.0)
    plans = []

    def make_room(actions, go, *, room_for=None, fail=None):
        plans.append(actions)
        return []
    runner.use_instances(lambda: [idle], make_room, host_pending=lambda: 600)
    job = submit(runner, n=3, mem_estimate=600)
    loop.until(lambda: plans)
    assert [(a.kind, a.holder.id) for a in plans[0]] == [("unload", 4)]
    runner.use_instances(lambda: [idle], make_room)             # nothing in flight: a swap fits
    assert [a.kind for a in runner._plan(job, 600).actions] == ["swap"]
    runner.stop(job, "cancel")
