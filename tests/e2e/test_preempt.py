"""Issue 12.5 through a real daemon: training and serving share one CPU budget.  A preemptible
training job is paused (checkpoint) when a load needs its room, resumes by itself when the model
is unloaded, and ends with the weights of an uninterrupted run.

The budget is sized from what a first daemon measured: its reference run of the same job gives
the job's estimate and measured peak, and the model is big enough (~160 MB) that the budget
holds either the job or the model, not both, whatever the noise in the measurements."""
from __future__ import annotations

import json

from conftest import SHAKESPEARE, Daemon
from test_jobs_daemon import FINISHED, train, wait_row, weights

MB = 1 << 20
# ~40M parameters, float32: 158 MB loaded
BIG = ["--layers", "4", "--dim", "896", "--heads", "4", "--vocab-size", "512", "--context", "64"]
JOB = {"max_steps": 600, "block_size": 64, "batch_size": 16, "checkpoint_every": 50}


def peak(d: Daemon, job_id: int) -> int:
    """The largest ``mem_bytes`` the job's worker reported (its metrics file)."""
    lines = (d.state / "jobs" / str(job_id) / "metrics.jsonl").read_text().splitlines()
    return max(json.loads(ln).get("mem_bytes") or 0 for ln in lines)


def test_i12_5_preemptible_job_is_paused_for_a_load_and_resumes_bitwise(tmp_path):
    d = Daemon(tmp_path / "d")
    try:
        d.start()                                       # the default budget: room for all
        d.cli("create", "big", *BIG, "--vocab-from", str(SHAKESPEARE))
        with d.client() as c:
            ref = train(c, "ref", **JOB)
            model = c._call("show", {"model": "big"})["manifest"]["parameters"] * 4
        ref = wait_row(d, ref["job_id"], lambda r: r["state"] in FINISHED)
        assert ref["state"] == "succeeded", ref
        estimate, measured = ref["estimate_bytes"], peak(d, ref["job_id"])
        assert estimate and measured, ref
        # holds the job (its estimate at submit, its measured bytes while it runs) or the model
        budget = max(estimate, measured) + 16 * MB
        assert model > budget - measured + 48 * MB, (model, budget, measured)
        assert d.stop() == 0

        d.start("--budget", f"cpu={budget // 1024}KiB")  # the same store, a tight budget
        with d.client() as c:
            job = c._call("train", {**_train_body(c, "p"), "preemptible": True}, timeout=120)["job"]
        assert job["preemptible"] and job["estimate_bytes"] == estimate
        wait_row(d, job["job_id"], lambda r: (r["step"] or 0) >= 20 and r["state"] == "running")
        with d.client() as c:                           # the load makes room: the job pauses
            loaded = c._call("load", {"model": "big"}, timeout=120)
            r = c._call("job", {"job": job["job_id"]})["job"]
        assert r["state"] == "paused" and r["reason"].startswith("preempted: room for"), r
        assert "big" in r["reason"] and r["checkpoint_step"] and r["step"] < JOB["max_steps"]
        with d.client() as c:                           # still no room while the model stays
            assert c._call("job", {"job": job["job_id"]})["job"]["state"] == "paused"
            c._call("unload", {"target": str(loaded["id"])})
        r = wait_row(d, job["job_id"], lambda r: r["state"] in FINISHED)
        assert r["state"] == "succeeded", r
        with d.client() as c:
            assert weights(c, "p") == weights(c, "ref")
            lines = "\n".join(ch.get("line", "") for ch in
                              c._start_stream("job_logs", {"job": job["job_id"]})[1])
        assert "preempted: room for" in lines and "memory is free again: queued, to resume" in lines
    finally:
        d.stop()


def _train_body(c, name: str) -> dict:
    """The train request of ``test_jobs_daemon.train`` with JOB's spec (to add a field)."""
    from test_jobs_daemon import SPEC, upload
    return {"name": name, "data": {"input.txt": upload(c)}, "spec": {**SPEC, **JOB}}
