"""Issue 9: job states are pure logic (``jobs/queue.py``: no torch, no processes), and the
runner takes jobs as function references (sent to a spawned worker by reference)."""
from __future__ import annotations

import queue
import subprocess
import sys

import pytest

from conftest import ROOT
from llmctl.errors import InvalidState
from llmosd.jobs.queue import LEGAL, Job, JobState


def echo_job(spec, store_root, progress):
    """A job for the runner test: reports once, returns what it was given."""
    progress({"stage": "echo"})
    return {"spec": spec, "store_root": store_root}


def test_i9_5_legal_transitions_only():
    for start in JobState:
        for new in JobState:
            job = Job(1, "create", "m:latest", 1000, state=start)
            if new in LEGAL.get(start, set()):
                job.transition(new)
                assert job.state is new and job.finished()
            else:
                with pytest.raises(InvalidState, match=f"job 1 cannot go from {start.value} to {new.value}"):
                    job.transition(new)
                assert job.state is start
    assert not Job(2, "import", "m", None).finished()


def test_i9_5_row():
    job = Job(3, "import", "m:latest", 1000, started=12.5, progress={"stage": "weights"})
    assert job.row() == {"id": 3, "kind": "import", "target": "m:latest", "uid": 1000,
                         "state": "running", "started": 12.5, "progress": {"stage": "weights"},
                         "pid": None, "error": ""}
    job.process = type("P", (), {"pid": 4242})()
    job.transition(JobState.FAILED)
    job.error = "boom"
    assert job.row()["pid"] == 4242 and job.row()["state"] == "failed" and job.row()["error"] == "boom"


def test_i9_5_queue_needs_no_torch_nor_processes():
    code = ("import sys\nimport llmosd.jobs.queue\n"
            "print(sorted(m for m in ('torch', 'multiprocessing') if m in sys.modules))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert r.returncode == 0 and r.stdout.strip() == "[]", r.stdout + r.stderr


def test_i9_5_runner_runs_a_function_reference(tmp_path):
    from llmosd.jobs.runner import JobRunner
    calls = queue.SimpleQueue()
    runner = JobRunner(lambda fn, *a: calls.put((fn, a)), str(tmp_path))
    seen = []
    job = runner.start("echo", "m:latest", echo_job, {"x": 1}, 1000,
                       lambda j, p: seen.append(("progress", p)),
                       lambda j, result, error: seen.append(("done", result, error)))
    assert runner.writing("m:latest") and not runner.idle()
    try:
        while not seen or seen[-1][0] != "done":
            fn, args = calls.get(timeout=60)
            fn(*args)
    finally:
        if job.process.is_alive():
            job.process.kill()
        job.process.join(10)
    assert seen == [("progress", {"stage": "echo"}),
                    ("done", {"spec": {"x": 1}, "store_root": str(tmp_path)}, None)]
    assert job.state is JobState.DONE and runner.idle()
