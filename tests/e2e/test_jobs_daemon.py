"""Issue 10 through a real daemon: train jobs queued one per device, cancelled, killed, paused,
resumed after kill -9 and SIGTERM of the daemon (bit for bit), with their records and logs.
Tiny character-level runs on a slice of Shakespeare (a few seconds each)."""
from __future__ import annotations

import hashlib
import os
import signal
import time

import pytest

from conftest import SHAKESPEARE, Daemon
from llmctl import errors

DATA = SHAKESPEARE.read_bytes()[:20_000]
SPEC = {"tokenizer": "char", "layers": 1, "dim": 32, "heads": 2, "block_size": 32, "batch_size": 4,
        "max_steps": 400, "eval_every": 100, "eval_batches": 2, "checkpoint_every": 10, "seed": 7}
FINISHED = ("succeeded", "failed", "cancelled")


def upload(c, data: bytes = DATA) -> str:
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    if not c._call("upload", {"digest": digest, "size": len(data)})["have"]:
        c._call("upload_chunk", {"digest": digest, "offset": 0, "data": data})
    return digest


def train(c, name: str, **spec) -> dict:
    return c._call("train", {"name": name, "data": {"input.txt": upload(c)},
                             "spec": {**SPEC, **spec}}, timeout=120)["job"]


def row(c, job_id: int) -> dict:
    return c._call("job", {"job": job_id})["job"]


def wait_row(d: Daemon, job_id: int, cond, timeout: float = 90.0) -> dict:
    """Poll the job's row (through a fresh connection each time: the daemon may restart)."""
    deadline = time.monotonic() + timeout
    while True:
        with d.client() as c:
            r = row(c, job_id)
        if cond(r):
            return r
        assert r["state"] not in FINISHED or cond(r), r
        assert time.monotonic() < deadline, f"job {job_id} did not get there: {r}"
        time.sleep(0.02)


def weights(c, model: str) -> str:
    return c._call("show", {"model": model})["manifest"]["weights"]["digest"]


def blobs(d: Daemon) -> set[str]:
    return {n.replace("-", ":", 1) for n in os.listdir(d.state / "store" / "blobs")}


def test_i10_6_max_jobs_one_runs_in_order(daemon):
    with daemon.client() as c:
        with pytest.raises(errors.InvalidArgument, match="unknown train spec key 'bogus'"):
            train(c, "x", bogus=1)
        with pytest.raises(errors.InvalidArgument, match="too little"):
            train(c, "x", block_size=8192)
        with pytest.raises(errors.InvalidArgument, match="has not been uploaded"):
            c._call("train", {"name": "x", "data": {"a.txt": "sha256:" + "0" * 64}, "spec": {}})
        assert c._call("jobs", {"all": True})["jobs"] == []            # refused: nothing queued
        first = train(c, "first", max_steps=100)
        second = train(c, "second", max_steps=100)
        rows = {r["job_id"]: r for r in c._call("jobs")["jobs"]}
        assert rows[first["job_id"]]["state"] == "running" and rows[first["job_id"]]["pid"]
        assert rows[second["job_id"]]["state"] == "queued" and rows[second["job_id"]]["pid"] is None
        assert [j["job_id"] for j in c._call("ps")["jobs"]] == [first["job_id"], second["job_id"]]
    a = wait_row(daemon, first["job_id"], lambda r: r["state"] in FINISHED)
    b = wait_row(daemon, second["job_id"], lambda r: r["state"] in FINISHED)
    assert a["state"] == b["state"] == "succeeded" and b["started"] >= a["finished"]
    assert a["step"] == a["max_steps"] == 100 and a["val_loss"] is not None
    with daemon.client() as c:
        assert c._call("jobs")["jobs"] == []                           # finished: only with all
        assert [r["job_id"] for r in c._call("jobs", {"all": True})["jobs"]] == [1, 2]
        lineage = c._call("show", {"model": "second"})["manifest"]["lineage"]
        assert lineage["method"] == "train"


def test_i10_3_cancel_leaves_no_model_and_sigkill_fails_with_reason(daemon):
    with daemon.client() as c:
        before = blobs(daemon)
        a = train(c, "cancelled", max_steps=100_000)
        wait_row(daemon, a["job_id"], lambda r: (r["step"] or 0) > 0)
        r = c._call("job_cancel", {"job": a["job_id"]})["job"]         # answered once it stopped
        assert r["state"] == "cancelled" and r["pid"] is None
        b = train(c, "killed", max_steps=100_000)
        pid = wait_row(daemon, b["job_id"], lambda r: (r["step"] or 0) > 0)["pid"]
        os.kill(pid, signal.SIGKILL)
        r = wait_row(daemon, b["job_id"], lambda r: r["state"] == "failed")
        assert r["reason"].startswith("worker killed by signal 9"), r
        assert c.ping() and c._call("ls")["models"] == []              # the daemon is fine, no model
        data = upload(c)
        assert blobs(daemon) == before | {data}                        # no partial blobs
        with pytest.raises(errors.InvalidState):
            c._call("job_pause", {"job": a["job_id"]})
        with pytest.raises(errors.JobNotFound, match="there is no job 99"):
            c._call("job_cancel", {"job": 99})
        logs = "\n".join(ch.get("line", "") for ch in c._start_stream("job_logs", {"job": a["job_id"]})[1])
        assert "cancel requested" in logs and "cancelled" in logs
        assert c._call("job_rm", {"job": a["job_id"]}) == {"removed": a["job_id"]}
        assert data in blobs(daemon)                                   # job b still needs it
        c._call("job_rm", {"job": b["job_id"]})
        assert blobs(daemon) == before
        assert sorted(os.listdir(daemon.state / "jobs")) == ["last_id"]


def test_i10_2_daemon_kill9_resumes_job(tmp_path):
    """A job interrupted by kill -9 of the daemon, then by its SIGTERM, resumes by itself from
    its checkpoint each time; another is paused and resumed; both end with the weights of an
    uninterrupted run (which runs beside the paused one: max_jobs 2)."""
    d = Daemon(tmp_path / "d", env={"LLMOSD_MAX_JOBS": "2"})
    try:
        d.start()
        with d.client() as c:
            a = train(c, "a")
        first = wait_row(d, a["job_id"], lambda r: (r["checkpoint_step"] or 0) >= 10)["checkpoint_step"]
        d.kill9()
        d.start()                                           # a resumes by itself
        wait_row(d, a["job_id"], lambda r: (r["checkpoint_step"] or 0) >= first + 20)
        assert d.stop() == 0                                # SIGTERM: a pauses, queued for next time
        d.start()
        r = wait_row(d, a["job_id"], lambda r: r["state"] in FINISHED)
        assert r["state"] == "succeeded", r
        with d.client() as c:
            alog = "\n".join(ch.get("line", "") for ch in c._start_stream("job_logs", {"job": a["job_id"]})[1])
        assert "running when the daemon stopped: queued again, to resume" in alog      # kill -9
        assert "stopped with the daemon: queued again, to resume" in alog              # SIGTERM

        with d.client() as c:
            ref = train(c, "ref")
            cj = train(c, "c")
            wait_row(d, cj["job_id"], lambda r: (r["checkpoint_step"] or 0) >= 10)
            paused = c._call("job_pause", {"job": cj["job_id"]})["job"]
            assert paused["state"] == "paused" and paused["checkpoint_step"] >= 10
            assert c._call("job_resume", {"job": cj["job_id"]})["job"]["state"] in ("queued", "running")
            _, chunks = c._start_stream("job_logs", {"job": cj["job_id"], "follow": True})
            got = list(chunks)
        steps = [ch["metrics"]["step"] for ch in got if "metrics" in ch]
        assert steps == sorted(steps) and steps[-1] == SPEC["max_steps"]
        assert [ch["row"]["state"] for ch in got if "row" in ch][-1] == "succeeded"
        assert "paused (checkpoint of step" in "\n".join(ch["line"] for ch in got if "line" in ch)
        assert wait_row(d, ref["job_id"], lambda r: r["state"] in FINISHED)["state"] == "succeeded"
        with d.client() as c:
            assert weights(c, "a") == weights(c, "c") == weights(c, "ref")
    finally:
        d.stop()


def test_i10_2_killed_worker_resumed_with_llmctl_resume_is_bitwise(tmp_path):
    """A worker killed with SIGKILL fails its job with the reason; `llmctl resume` takes it up
    from its last checkpoint, and it ends with the weights of an uninterrupted run."""
    d = Daemon(tmp_path / "d", env={"LLMOSD_MAX_JOBS": "2"})
    try:
        d.start()
        spec = {"max_steps": 120}
        with d.client() as c:
            ref = train(c, "ref", **spec)
            w = train(c, "w", **spec)
        r = wait_row(d, w["job_id"], lambda r: (r["checkpoint_step"] or 0) >= 10 and r["pid"])
        os.kill(r["pid"], signal.SIGKILL)
        r = wait_row(d, w["job_id"], lambda r: r["state"] in FINISHED)
        assert r["state"] == "failed" and "signal 9" in r["reason"], r
        out = d.cli("resume", str(w["job_id"])).stdout
        assert str(w["job_id"]) in out
        assert wait_row(d, w["job_id"], lambda r: r["state"] in FINISHED)["state"] == "succeeded"
        assert wait_row(d, ref["job_id"], lambda r: r["state"] in FINISHED)["state"] == "succeeded"
        with d.client() as c:
            assert weights(c, "w") == weights(c, "ref")
    finally:
        d.stop()
