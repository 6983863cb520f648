"""Issue 14, recovery: after kill -9 the daemon comes back as it was: the model table (its
desired state, with pins and keep-alives) and the jobs; ``llmctl fsck`` finds the store clean;
and so after a SIGTERM (a reboot).  main.serve() restores the table (``desired.restore``)."""
from __future__ import annotations

import json
import time

from conftest import SHAKESPEARE, TINY, Daemon
from test_jobs_daemon import train, wait_row


def as_json(d: Daemon, *args: str) -> dict:
    return json.loads(d.cli(*args, "--json").stdout)


def table(d: Daemon) -> dict[str, dict]:
    """model -> its loaded instance's row (ready or busy)."""
    return {i["model"]: i for i in as_json(d, "ps")["instances"] if i["state"] in ("ready", "busy")}


def wait_table(d: Daemon, models: set[str], timeout: float = 60.0) -> dict[str, dict]:
    deadline = time.monotonic() + timeout
    while True:
        got = table(d)
        if models <= set(got):
            return got
        assert time.monotonic() < deadline, f"not loaded again: {models - set(got)}; ps: {got}"
        time.sleep(0.1)


def test_i14_5_kill9_then_restart_restores_table_and_jobs_and_fsck_is_clean(tmp_path):
    d = Daemon(tmp_path / "d")
    try:
        d.start()
        d.cli("create", "a", *TINY, "--vocab-from", str(SHAKESPEARE))
        d.cli("tag", "a", "b")
        d.cli("tag", "a", "c")
        d.cli("load", "a", "--pin")
        d.cli("load", "b", "--keep-alive", "1h", "--priority", "2")
        with d.client() as c:
            job = train(c, "t")
        first = wait_row(d, job["job_id"], lambda r: (r["checkpoint_step"] or 0) >= 10)["checkpoint_step"]
        before = table(d)
        assert before["a:latest"]["pinned"] and before["b:latest"]["keep_alive"] == 3600
        with d.client() as c:                    # a generation running, and c loading, when killed
            gen = c.generate("a", "To be, or not to be", max_tokens=100_000)
            next(iter(gen))
            loading = c.generate("c", "Hi", max_tokens=5)
            d.kill9()
        d.start()
        after = wait_table(d, {"a:latest", "b:latest"})
        assert set(after) <= {"a:latest", "b:latest", "c:latest"}        # c only if its load was done
        a, b = after["a:latest"], after["b:latest"]
        assert a["pinned"] and not b["pinned"]
        assert b["keep_alive"] == 3600 and b["priority"] == 2 and a["keep_alive"] == before["a:latest"]["keep_alive"]
        assert a["uid"] == before["a:latest"]["uid"]
        wait_row(d, job["job_id"], lambda r: (r["checkpoint_step"] or 0) >= first + 10)   # resumed
        r = d.cli("fsck")
        assert r.stdout.strip().endswith("clean"), r.stdout
        report = as_json(d, "fsck")
        assert report["clean"] and report["checked"]["blobs"] >= 4, report
        desired = json.loads((d.state / "desired.json").read_text())
        assert {e["model"] for e in desired["instances"]} >= {"a:latest", "b:latest"}
        del gen, loading
        assert d.stop() == 0                     # SIGTERM (a reboot): unloads, and keeps the file
        d.start()
        again = wait_table(d, {"a:latest", "b:latest"})
        assert again["a:latest"]["pinned"] and again["b:latest"]["keep_alive"] == 3600
    finally:
        d.stop()
