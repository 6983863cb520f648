"""Jobs as pure data (``jobs/queue.py``): states and their legal moves, the scheduling decision,
what a restart and a worker's end do to a job, its row.  Tables, no processes, no torch."""
from __future__ import annotations

import signal
import subprocess
import sys

import pytest

from conftest import ROOT
from llmctl.errors import InvalidState
from llmosd.jobs.queue import (LEGAL, Job, JobState, after_restart, exit_reason, next_to_start,
                               order, outcome, running_by_device)

Q, R, PG, P, S, F, C = (JobState.QUEUED, JobState.RUNNING, JobState.PAUSING, JobState.PAUSED,
                        JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELLED)

# every legal move (the contract's table and the three a real run needs); all else is refused
MOVES = {(Q, R), (Q, C), (Q, P), (R, S), (R, F), (R, C), (R, PG), (R, Q), (PG, P), (PG, F),
         (PG, C), (PG, S), (PG, Q), (P, Q), (P, C), (F, Q)}


def job(id_=1, state=Q, priority=0, device="cpu", kind="train", **kw) -> Job:
    return Job(id_, kind, "m:latest", 1000, state=state, priority=priority, device=device, **kw)


@pytest.mark.parametrize("start", list(dict.fromkeys(JobState)))
@pytest.mark.parametrize("new", list(dict.fromkeys(JobState)))
def test_i10_states_legal_transitions_only(start, new):
    j = job(state=start)
    if (start, new) in MOVES:
        j.transition(new, now=5.0)
        assert j.state is new
        assert j.finished == (5.0 if new in (S, F, C) else None)
        assert j.started == (5.0 if new is R else None)
    else:
        with pytest.raises(InvalidState, match=f"job 1 cannot go from {start.value} to {new.value}"):
            j.transition(new)
        assert j.state is start


def test_i10_states_table_is_the_one_tested():
    assert {(a, b) for a, bs in LEGAL.items() for b in bs} == MOVES
    assert JobState.DONE is S                         # the old name still works


@pytest.mark.parametrize("state,kind,resumable", [
    (P, "train", True), (F, "train", True), (F, "create", False), (F, "import", False),
    (Q, "train", False), (R, "train", False), (S, "train", False), (C, "train", False)])
def test_i10_2_resumable(state, kind, resumable):
    assert job(state=state, kind=kind).resumable() is resumable


# (jobs as (id, state, priority, device), running_by_device, max_jobs) -> ids to start
SCHEDULE = [
    ([(1, Q, 0, "cpu"), (2, Q, 0, "cpu")], {}, 1, [1]),                 # FIFO
    ([(1, Q, 0, "cpu"), (2, Q, 0, "cpu")], {}, 2, [1, 2]),
    ([(1, Q, 0, "cpu"), (2, Q, 5, "cpu")], {}, 1, [2]),                 # priority first
    ([(1, Q, 0, "cpu"), (2, Q, 0, "cpu")], {"cpu": 1}, 1, []),          # device full
    ([(1, R, 0, "cpu"), (2, Q, 0, "cpu")], {"cpu": 1}, 2, [2]),
    ([(1, Q, 0, "cpu"), (2, Q, 0, "cuda:0")], {"cpu": 1}, 1, [2]),      # per device
    ([(3, Q, 0, "cpu"), (1, P, 9, "cpu"), (2, F, 9, "cpu")], {}, 1, [3]),  # only queued ones
    ([(2, Q, -1, "cpu"), (5, Q, 3, "cpu"), (4, Q, 3, "cpu")], {}, 3, [4, 5, 2]),
    ([], {}, 1, []),
]


@pytest.mark.parametrize("jobs,running,max_jobs,want", SCHEDULE)
def test_i10_6_next_to_start(jobs, running, max_jobs, want):
    js = [job(i, s, p, d) for i, s, p, d in jobs]
    assert [j.id for j in next_to_start(js, running, max_jobs)] == want


def test_i10_6_running_by_device_and_order():
    js = [job(1, R, device="cpu"), job(2, PG, device="cpu"), job(3, R, device="cuda"),
          job(4, Q, device="cpu"), job(5, P, device="cpu")]
    assert running_by_device(js) == {"cpu": 2, "cuda": 1}
    assert [j.id for j in order([job(3, Q, 1), job(1, Q), job(2, Q, 1)])] == [2, 3, 1]


# (kind, state before the restart) -> (state after, changed, reason)
RESTART = [
    ("train", R, Q, True, ""), ("train", PG, Q, True, ""), ("train", Q, Q, False, ""),
    ("train", P, P, False, ""), ("train", S, S, False, ""), ("train", F, F, False, ""),
    ("create", R, F, True, "interrupted by a daemon restart; run it again"),
    ("import", Q, F, True, "interrupted by a daemon restart; run it again"),
    ("import", C, C, False, ""),
]


@pytest.mark.parametrize("kind,before,after,changed,reason", RESTART)
def test_i10_2_after_restart(kind, before, after, changed, reason):
    j = job(kind=kind, state=before)
    assert after_restart(j, now=9.0) is changed
    assert j.state is after and j.reason == reason
    if after is F and changed:
        assert j.finished == 9.0


# (stop asked, requeue, how the worker ended, detail) -> (state, reason)
OUTCOMES = [
    (None, False, "result", {}, (None, "")),
    (None, False, "error", "boom", (F, "boom")),
    (None, False, "exit", -9, (F, "worker killed by signal 9 (SIGKILL; out of memory, or killed)")),
    (None, False, "exit", 1, (F, "worker exited with status 1 without a result")),
    ("pause", False, "stopped", "paused", (P, "")),
    ("pause", True, "stopped", "paused", (Q, "")),       # the daemon stops: queued again
    ("pause", False, "exit", -9, (P, "")),               # killed after the timeout: last checkpoint
    ("pause", False, "error", "disk full", (F, "disk full")),
    ("pause", False, "result", {}, (None, "")),          # done before the pause was seen
    ("cancel", False, "stopped", "cancelled", (C, "cancelled")),
    ("cancel", False, "exit", -9, (C, "cancelled")),
    ("cancel", False, "result", {}, (C, "cancelled")),   # a cancel wins: nothing is published
    ("cancel", False, "error", "x", (C, "cancelled")),
]


@pytest.mark.parametrize("stop,requeue,kind,detail,want", OUTCOMES)
def test_i10_3_outcome_of_a_worker(stop, requeue, kind, detail, want):
    j = job(state=PG if stop == "pause" else R)
    j.stop, j.requeue = stop, requeue
    assert outcome(j, kind, detail) == want


def test_i10_3_exit_reason_names_the_signal():
    assert exit_reason(-signal.SIGSEGV).startswith("worker killed by signal 11 (SIGSEGV")


def test_i10_row():
    j = job(7, R, 2, "cpu", spec={"max_steps": 100, "nproc": 1}, created=1.0)
    j.transition(PG, now=3.0)
    j.update_metrics({"step": 10, "loss": 2.5, "val_loss": 2.7, "tokens_per_s": 1000.0, "eta_s": 9.0})
    j.update_metrics({"step": 20, "loss": 2.4, "tokens_per_s": 1100.0, "eta_s": 8.0})
    j.process = type("P", (), {"pid": 4242})()
    j.checkpoint_step = 20
    assert j.row() == {
        "job_id": 7, "kind": "train", "model": "m:latest", "state": "pausing", "reason": None,
        "step": 20, "max_steps": 100, "loss": 2.4, "val_loss": 2.7, "tokens_per_s": 1100.0,
        "eta_s": 8.0, "device": "cpu", "owner": 1000, "priority": 2, "created": 1.0,
        "started": None, "finished": None, "checkpoint_step": 20, "nproc": 1, "pid": 4242,
        "progress": {}, "preemptible": False, "estimate_bytes": None, "mem_bytes": None}
    j.transition(F, "worker killed by signal 9", now=4.0)
    row = j.row()
    assert row["state"] == "failed" and row["reason"] == "worker killed by signal 9"
    assert row["pid"] is None and row["eta_s"] is None and row["finished"] == 4.0
    assert job(kind="create").row()["nproc"] is None and j.target == j.model == "m:latest"


def test_i9_5_queue_needs_no_torch_nor_processes():
    code = ("import sys\nimport llmosd.jobs.queue, llmosd.jobs.records\n"
            "print(sorted(m for m in ('torch', 'multiprocessing') if m in sys.modules))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert r.returncode == 0 and r.stdout.strip() == "[]", r.stdout + r.stderr
