"""The job messages' handlers (``ops/jobctl.py``) over a real runner and records, with jobs
that never start a worker (no hooks attached): listing, owners, cancel/resume, logs, rm."""
from __future__ import annotations

import queue
import time

import pytest

from llmctl import errors
from llmosd.jobs.queue import Job, JobState
from llmosd.jobs.records import Records, to_record
from llmosd.jobs.runner import JobRunner
from llmosd.ops.jobctl import JobCtlOps
from llmosd.store.store import Store


class Stream:
    def __init__(self):
        self.chunks, self.result, self.err, self.closed = [], None, None, False

    def chunk(self, body, on_sent=None):
        self.chunks.append(body)

    def end(self, body):
        self.result, self.closed = body, True

    def error(self, err):
        self.err, self.closed = err, True


class Ctx:
    def __init__(self, body, uid=1000):
        self.body, self.uid, self.replies, self.streams = body, uid, [], []

    def ok(self, body=None):
        self.replies.append(body)

    def stream(self, on_cancel):
        self.streams.append(Stream())
        self.on_cancel = on_cancel
        return self.streams[-1]


@pytest.fixture
def setup(tmp_path):
    calls = queue.SimpleQueue()
    records = Records(str(tmp_path / "jobs"))
    store = Store(str(tmp_path / "store"))
    data = store.put_blob(b"some text")[0]
    for id_, state in ((1, JobState.SUCCEEDED), (2, JobState.PAUSED)):
        job = Job(id_, "train", f"m{id_}:latest", 1000, spec={"max_steps": 5, "_parent": {}},
                  data={"a.txt": data}, refs=[data], state=state, device="cpu")
        records.make_dir(id_)
        records.save(to_record(job))
        records.append_line(id_, f"hello from {id_}", now=1.0)
    store.extra_refs = lambda: runner.refs()
    runner = JobRunner(lambda fn, *a: calls.put((fn, a)), store.root, records, jobs=records.load())
    ops = JobCtlOps(store, runner)

    def run_posted():
        while not calls.empty():
            fn, args = calls.get()
            fn(*args)
    return ops, runner, store, data, run_posted


def call(ops, name, body, uid=1000):
    ctx = Ctx(body, uid)
    getattr(ops, "op_" + name)(ctx)
    return ctx


def test_i10_jobs_job_and_owners(setup):
    ops, runner, store, data, run_posted = setup
    assert [r["job_id"] for r in call(ops, "jobs", {}).replies[0]["jobs"]] == [2]
    assert [r["job_id"] for r in call(ops, "jobs", {"all": True}).replies[0]["jobs"]] == [1, 2]
    got = call(ops, "job", {"job": 2}, uid=4321).replies[0]     # anyone may look
    assert got["spec"] == {"max_steps": 5} and got["data"] == {"a.txt": data}
    assert got["job"]["state"] == "paused"
    with pytest.raises(errors.PermissionDenied, match="job 2 belongs to uid 1000"):
        call(ops, "job_cancel", {"job": 2}, uid=4321)
    with pytest.raises(errors.JobNotFound, match="there is no job 3"):
        call(ops, "job", {"job": 3})
    with pytest.raises(errors.InvalidState):
        call(ops, "job_resume", {"job": 1})
    ctx = call(ops, "job_cancel", {"job": 2})                    # paused: cancelled at once
    assert ctx.replies[0]["job"]["state"] == "cancelled"
    assert runner.records.load()[1].state is JobState.CANCELLED


def test_i10_job_logs_and_rm(setup):
    ops, runner, store, data, run_posted = setup
    ctx = call(ops, "job_logs", {"job": 1, "follow": True})   # finished: no following
    (stream,) = ctx.streams
    deadline = time.monotonic() + 10
    while not stream.closed and time.monotonic() < deadline:
        run_posted()
        time.sleep(0.01)
    assert [c["line"][25:] for c in stream.chunks] == ["hello from 1"]
    assert stream.result["job"]["job_id"] == 1 and not runner.listeners.get(1)
    with pytest.raises(errors.InvalidState, match="only finished jobs"):
        call(ops, "job_rm", {"job": 2})
    assert call(ops, "job_rm", {"job": 1}).replies == [{"removed": 1}]
    assert store.has_blob(data)                                 # job 2 still names it
    call(ops, "job_cancel", {"job": 2})
    call(ops, "job_rm", {"job": 2})
    assert not store.has_blob(data) and runner.jobs == {}
    assert runner.records.last_id() == 2 and runner.records.load() == []
