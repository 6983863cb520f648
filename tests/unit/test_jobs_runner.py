"""The job runner with real worker processes but trivial job functions (no training): the
queue, pause/resume through a checkpoint, cancel, kills, shutdown and restart.  The runner
does not care which function it runs."""
from __future__ import annotations

import os
import queue
import signal
import time

import pytest

from llmosd.jobs.queue import JobState
from llmosd.jobs.records import Records
from llmosd.jobs.runner import JobRunner

Q, R, PG, P, S, F, C = (JobState.QUEUED, JobState.RUNNING, JobState.PAUSING, JobState.PAUSED,
                        JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELLED)


class Paused(Exception):
    """Named like ``llmosd.train.pretrain.Paused``: the runner goes by the name."""


class Cancelled(Exception):
    pass


def counter_job(spec, store_root, ctl):
    """Counts to spec["n"], a step every spec["sleep"] s, keeping the count in ctl.job_dir
    (its checkpoint) every 5 steps and when paused; honours stop requests between steps."""
    path = os.path.join(ctl.job_dir, "count")
    n = int(open(path).read()) if os.path.exists(path) else 0
    ctl.log(f"starting at {n}")

    def save():
        with open(path + ".tmp", "w") as f:
            f.write(str(n))
        os.replace(path + ".tmp", path)
        ctl.checkpoint_saved(n)
    while n < spec["n"]:
        stop = ctl.stop_requested()
        if stop == "pause":
            save()
            raise Paused(f"paused at {n}")
        if stop == "cancel":
            raise Cancelled()
        n += 1
        ctl.metrics({"step": n, "loss": 1.0 / n})
        if n % 5 == 0:
            save()
        time.sleep(spec.get("sleep", 0.0))
    ctl.progress({"stage": "done", "message": f"counted to {n}"})
    return {"count": n, "job": ctl.job_id}


def stubborn_job(spec, store_root, ctl):
    """Never looks at stop requests."""
    ctl.metrics({"step": 1})
    while True:
        time.sleep(0.05)


class Loop:
    """The control loop's part: posted calls run here, in the test's thread."""

    def __init__(self):
        self.calls = queue.SimpleQueue()

    def post(self, fn, *args):
        self.calls.put((fn, args))

    def until(self, cond, timeout=60.0):
        deadline = time.monotonic() + timeout
        while not cond():
            fn, args = self.calls.get(timeout=max(0.01, deadline - time.monotonic()))
            fn(*args)


@pytest.fixture
def env(tmp_path):
    """(loop, records, make_runner(**kw)); every worker is killed at the end."""
    loop, runners = Loop(), []
    records = Records(str(tmp_path / "jobs"))

    def make(**kw):
        r = JobRunner(loop.post, str(tmp_path / "store"), records, **kw)
        runners.append(r)
        return r
    yield loop, records, make
    for r in runners:
        for j in r.jobs.values():
            if j.process is not None and j.process.is_alive():
                j.process.kill()
                j.process.join(10)


def submit(runner, func=counter_job, n=3, sleep=0.0, done=None, **kw):
    done = [] if done is None else done

    def on_done(job, manifest, error):
        done.append((job.state, manifest, error))
        if manifest is not None:
            runner.settle(job, None)           # "published"
    return runner.start("train", "m:latest", func, {"n": n, "sleep": sleep}, 1000, None, on_done, **kw)


def test_i10_runner_runs_a_job_and_records_it(env):
    loop, records, make = env
    runner = make()
    done = []
    job = submit(runner, "test_jobs_runner:counter_job", n=3, done=done, data={"a": "sha256:" + "1" * 64})
    assert job.id == 1 and job.state is R and runner.refs() == {"sha256:" + "1" * 64}
    loop.until(lambda: job.state is S)
    assert done == [(R, {"count": 3, "job": 1}, None)]
    assert job.metrics["step"] == 3 and job.checkpoint_step is None and runner.idle()
    (saved,) = records.load()
    assert saved.state is S and saved.metrics["step"] == 3 and saved.finished is not None
    events = records.read_events(1, records.sizes(1))
    assert [e["metrics"]["step"] for e in events if "metrics" in e] == [1, 2, 3]
    text = "\n".join(e["line"] for e in events if "line" in e)
    for words in ("queued: train of m:latest", "started on cpu", "starting at 0", "counted to 3",
                  "succeeded"):
        assert words in text


def test_i10_2_pause_checkpoints_and_resume_goes_on(env):
    loop, records, make = env
    runner = make()
    job = submit(runner, n=10_000, sleep=0.005)
    loop.until(lambda: job.metrics.get("step", 0) >= 7)
    replies = []
    runner.stop(job, "pause", replies.append)
    assert job.state is PG
    loop.until(lambda: replies)
    assert job.state is P and job.checkpoint_step >= 7 and runner.idle()
    at = job.checkpoint_step
    runner.resume(job)
    assert job.state is R
    loop.until(lambda: job.metrics["step"] > at + 2)
    runner.stop(job, "cancel", replies.append)
    loop.until(lambda: len(replies) == 2)
    assert job.state is C and job.reason == "cancelled"
    lines = [e["line"] for e in records.read_events(job.id, records.sizes(job.id)) if "line" in e]
    assert any(f"starting at {at}" in ln for ln in lines)          # resumed from its checkpoint


def test_i10_3_killed_worker_fails_with_reason_and_stuck_one_is_killed(env):
    loop, records, make = env
    runner = make(max_jobs=2, stop_timeout=0.5)
    done = []
    a = submit(runner, n=10_000, sleep=0.01, done=done)
    b = submit(runner, stubborn_job)
    loop.until(lambda: a.metrics and b.metrics)
    os.kill(a.process.pid, signal.SIGKILL)
    loop.until(lambda: a.state is F)
    assert a.reason.startswith("worker killed by signal 9") and done[0][2]["message"] == a.reason
    replies = []
    runner.stop(b, "pause", replies.append)                  # ignored: killed after 0.5 s
    loop.until(lambda: replies)
    assert b.state is P
    assert a.resumable() and not runner.jobs[b.id].is_finished()
    runner.resume(a)                                         # a failed train job goes on
    loop.until(lambda: a.metrics["step"] > 1 and a.state is R)
    runner.stop(a, "cancel")
    loop.until(lambda: a.state is C)


def test_i10_6_one_job_per_device_in_order(env):
    loop, records, make = env
    runner = make(max_jobs=1)
    first = submit(runner, n=3, sleep=0.02)
    second = submit(runner, n=2, priority=0)
    gpu = submit(runner, n=2, device="cuda:7")               # another device: not held back
    assert (first.state, second.state, gpu.state) == (R, Q, R)
    runner.stop(gpu, "cancel")
    loop.until(lambda: second.state is S)
    assert first.state is S and second.started >= first.finished


def test_i10_2_shutdown_requeues_and_restart_resumes(env):
    loop, records, make = env
    runner = make()
    job = submit(runner, n=10_000, sleep=0.005)
    queued = submit(runner, n=2)
    loop.until(lambda: job.metrics.get("step", 0) >= 3)
    runner.shutdown()
    loop.until(runner.idle)
    assert job.state is Q and queued.state is Q and runner.jobs[job.id].checkpoint_step
    # a daemon that was killed: the record says running; the next start queues it again
    runner2 = make(jobs=records.load())
    assert [j.state for j in runner2.jobs.values()] == [Q, Q]
    assert submit(runner2, n=1).id == 3                      # ids go on
    loop.until(lambda: runner2.jobs[3].state is S)          # the others have nothing to run yet
    again = runner2.jobs[job.id]
    runner2.attach(again, counter_job)
    runner2.schedule()
    assert again.state is R
    loop.until(lambda: again.metrics.get("step", 0) > job.checkpoint_step)
    runner2.stop(again, "cancel")
    loop.until(lambda: again.state is C)
