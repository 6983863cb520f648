"""Request handlers at unit level: a real Store in a temp directory, fake clients, instances
and jobs (no daemon, no torch work)."""
from __future__ import annotations

import errno
import logging
import os
import queue
import threading
import types

import pytest

from conftest import FakeStream
from llmctl import errors
from llmosd.jobs.queue import JobState
from llmosd.ops import Ops
from llmosd.store.store import Store
from llmosd.store.uploads import Uploads
from llmosd.store.writer import StoreWriter
from llmosd.table import ModelTable


class FakeCtx:
    """What a handler sees of one request; replies are recorded."""

    def __init__(self, type_, body, peer=None):
        self.type, self.body, self.rid = type_, body, 1
        self.peer = peer or types.SimpleNamespace(ident=b"p1", uid=1000, holds=set(), streams={})
        self.replies, self.streams = [], []

    @property
    def uid(self):
        return self.peer.uid

    def ok(self, body=None):
        self.replies.append(("ok", body))

    def error(self, err):
        self.replies.append(("error", err))

    def stream(self, on_cancel):
        self.streams.append(FakeStream())
        return self.streams[-1]


class FakeJobs:
    """Runs a job at once: ``make(store)`` plays the worker and returns (manifest, error)."""

    def __init__(self, store):
        self.store, self.jobs, self.make, self.funcs = store, {}, None, []

    def start(self, kind, target, func, spec, uid, on_progress, on_done):
        self.funcs.append(func)
        job = types.SimpleNamespace(id=1, kind=kind, target=target, uid=uid, blobs=set(),
                                    state=JobState.DONE, progress={})
        manifest, error = self.make(self.store, job)
        on_done(job, manifest, error)
        return job

    def writing(self, target):
        return any(j.target == target for j in self.jobs.values())


def make_ops(store):
    cfg = types.SimpleNamespace(max_uploads=64, max_uploads_per_client=8, default_max_tokens=64)
    manager = types.SimpleNamespace(table=ModelTable(), tasks={})
    return Ops(cfg, store, manager, FakeJobs(store), Uploads(store, post=lambda fn, *a: fn(*a)))


def put_model(store, name, payload=b"w"):
    """A tiny model whose manifest names three blobs; returns its digests."""
    digests = [store.put_blob(payload + bytes([i]))[0] for i in range(3)]
    man = {"schema": 1, "parameters": 1,
           **{k: {"digest": d, "size": 2} for k, d in zip(("config", "tokenizer", "weights"), digests)}}
    store.write_manifest(name, man)
    return digests


def import_worker(store, job):
    """Plays an import worker: writes its blobs, returns (manifest, no error)."""
    d = [store.put_blob(b"blob%d" % i)[0] for i in range(3)]
    job.blobs.update(d)
    return {"schema": 1, "parameters": 1, "config": {"digest": d[0], "size": 5},
            "tokenizer": {"digest": d[1], "size": 5}, "weights": {"digest": d[2], "size": 5},
            "lineage": {"method": "import", "args": {"format": "hf", "files": ["config.json"]}}}, None


def call(ops, type_, body):
    ctx = FakeCtx(type_, body)
    ops.dispatch(ctx)
    return ctx


def test_i7_8_publish_failure_ends_stream(tmp_path):
    class FullStore(Store):
        def write_manifest(self, ref, manifest, *, replace=False):
            raise OSError(errno.ENOSPC, "No space left on device")
    store = FullStore(str(tmp_path))
    ops = make_ops(store)
    raw = store.put_blob(b"{}")[0]                      # the client's upload

    ops.jobs.make = import_worker
    ctx = call(ops, "import", {"name": "m", "files": {"config.json": raw}})
    (stream,) = ctx.streams
    assert stream.result is None and isinstance(stream.err, errors.StoreCorrupt)
    assert "No space left" in stream.err.message and stream.err.hint
    assert list((tmp_path / "blobs").iterdir()) == []     # the job's blobs and the upload: gone
    # a job that fails in its worker also leaves nothing
    store2 = Store(str(tmp_path / "b"))
    ops2 = make_ops(store2)

    def crashing(store, job):
        job.blobs.add(store.put_blob(b"half")[0])
        return None, {"message": "MemoryError", "invalid": False}
    ops2.jobs.make = crashing
    raw = store2.put_blob(b"{}")[0]
    ctx = call(ops2, "import", {"name": "m", "files": {"config.json": raw}})
    assert isinstance(ctx.streams[0].err, errors.JobFailed)
    assert list((tmp_path / "b" / "blobs").iterdir()) == []


def test_i8_4_tag_refuses_to_replace(tmp_path):
    store = Store(str(tmp_path))
    ops = make_ops(store)
    put_model(store, "a")
    b_blobs = put_model(store, "b", payload=b"other")
    with pytest.raises(errors.AlreadyExists) as e:
        call(ops, "tag", {"source": "a", "target": "b"})
    assert "--force" in e.value.hint
    assert store.get("b")[2] != store.get("a")[2]        # untouched
    r = call(ops, "tag", {"source": "a", "target": "b", "force": True}).replies[0]
    assert r[0] == "ok" and store.get("b")[2] == store.get("a")[2]
    assert not any(store.has_blob(d) for d in b_blobs)   # the replaced model's blobs went at once
    r = call(ops, "tag", {"source": "a", "target": "b"}).replies[0]   # same content: a no-op
    assert r[0] == "ok" and r[1]["digest"] == store.get("a")[2]
    r = call(ops, "rm", {"model": "b"}).replies[0]
    assert r[0] == "ok" and r[1]["freed_bytes"] == 0     # 'a' still uses every blob


def test_i8_7_unload_not_loaded_is_noop(tmp_path):
    store = Store(str(tmp_path))
    ops = make_ops(store)
    put_model(store, "tiny")
    assert call(ops, "unload", {"target": "tiny"}).replies == [("ok", {"unloaded": []})]
    with pytest.raises(errors.InstanceNotFound):
        call(ops, "unload", {"target": "7"})
    with pytest.raises(errors.ModelNotFound):           # a model that does not exist at all
        call(ops, "unload", {"target": "nosuch"})
    with pytest.raises(errors.LlmosdError) as e:          # not a digit ASCII knows: no crash
        call(ops, "unload", {"target": "\u00b2"})
    assert not isinstance(e.value, errors.Internal)


def test_i8_7_did_you_mean(tmp_path):
    store = Store(str(tmp_path))
    ops = make_ops(store)
    put_model(store, "smollm2")
    put_model(store, "tiny", payload=b"t")
    for op, body in [("show", {"model": "smolm2"}), ("load", {"model": "smolm2"}),
                     ("generate", {"model": "smolm2", "prompt": "hi"}),
                     ("score", {"model": "smolm2", "text": "hi"}), ("rm", {"model": "smolm2"}),
                     ("tag", {"source": "smolm2", "target": "x"}), ("unload", {"target": "smolm2"})]:
        with pytest.raises(errors.ModelNotFound) as e:
            call(ops, op, body)
        assert "did you mean smollm2?" in e.value.hint, op
    with pytest.raises(errors.ModelNotFound) as e:
        call(ops, "show", {"model": "zzzzzz"})
    assert "did you mean" not in e.value.hint


def test_i8_7_audit_lines_name_the_uid(tmp_path, caplog):
    store = Store(str(tmp_path))
    ops = make_ops(store)
    put_model(store, "a")
    with caplog.at_level(logging.INFO, logger="llmosd.ops"):
        call(ops, "tag", {"source": "a", "target": "b"})
        call(ops, "rm", {"model": "b"})
    text = caplog.text
    assert "tag a:latest as b:latest by uid 1000" in text
    assert "rm b:latest by uid 1000 (freed 0 bytes)" in text


# -- issue 9 -----------------------------------------------------------------------------------

class Loop:
    """The control loop's stand-in: ``post``ed calls wait until the test runs them."""

    def __init__(self):
        self.calls = queue.SimpleQueue()

    def post(self, fn, *args):
        self.calls.put((fn, args))

    def run_one(self, timeout=10.0):
        fn, args = self.calls.get(timeout=timeout)
        fn(*args)


@pytest.fixture
def fsyncs(monkeypatch):
    """The names of the threads that call os.fsync."""
    seen, real = [], os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (seen.append(threading.current_thread().name), real(fd))[1])
    return seen


def test_i9_2_rm_and_tag_write_off_the_loop(tmp_path, fsyncs):
    store = Store(str(tmp_path))
    put_model(store, "a")
    loop = Loop()
    store.writer = StoreWriter(loop.post)
    ops = make_ops(store)
    fsyncs.clear()
    ctx = call(ops, "tag", {"source": "a", "target": "b"})
    assert ctx.replies == []                          # the reply waits for the write
    loop.run_one()
    assert ctx.replies[0][0] == "ok" and store.get("b")[2] == store.get("a")[2]
    ctx = call(ops, "rm", {"model": "b"})
    assert ctx.replies == []
    with pytest.raises(errors.ModelNotFound):         # gone for everyone once accepted
        call(ops, "show", {"model": "b"})
    assert "b:latest" not in [m["model"] for m in call(ops, "ls", {}).replies[0][1]["models"]]
    loop.run_one()
    assert ctx.replies == [("ok", {"model": "b:latest", "digest": store.get("a")[2], "freed_bytes": 0})]
    assert fsyncs and set(fsyncs) == {"store-writer"}  # never on the loop's thread
    assert store.writer.idle()


def test_i9_2_job_publishes_off_the_loop(tmp_path, fsyncs):
    store = Store(str(tmp_path))
    loop = Loop()
    store.writer = StoreWriter(loop.post)
    ops = make_ops(store)
    raw = store.put_blob(b"{}")[0]

    def worker(store, job):
        made = import_worker(store, job)
        fsyncs.clear()                                # the worker's own writes are not the loop's
        return made
    ops.jobs.make = worker
    ctx = call(ops, "import", {"name": "m", "files": {"config.json": raw}})
    (stream,) = ctx.streams
    assert stream.result is None and stream.err is None
    with pytest.raises(errors.Busy):                  # its manifest is being written
        call(ops, "import", {"name": "m", "files": {"config.json": raw}, "force": True})
    loop.run_one()
    assert stream.result["model"] == "m:latest" and stream.result["digest"] == store.get("m")[2]
    assert set(fsyncs) == {"store-writer"} and not store.has_blob(raw)


def test_i9_5_jobs_are_function_references(tmp_path):
    from llmosd.formats.importer import import_model
    from llmosd.train.create import create
    store = Store(str(tmp_path))
    ops = make_ops(store)
    ops.jobs.make = lambda store, job: (None, {"message": "stop here", "invalid": True})
    with pytest.raises(errors.InvalidArgument):       # the spec check, before any job
        call(ops, "create", {"name": "x", "layers": 1, "dim": 30, "heads": 4, "text": b"hi"})
    call(ops, "create", {"name": "x", "layers": 1, "dim": 32, "heads": 4, "text": b"hi"})
    raw = store.put_blob(b"{}")[0]
    ctx = call(ops, "import", {"name": "y", "files": {"config.json": raw}})
    assert ops.jobs.funcs == [create, import_model]
    assert isinstance(ctx.streams[0].err, errors.InvalidArgument)   # a worker's ValueError


def test_i9_1_ls_status_download_use_the_index(tmp_path, monkeypatch):
    store = Store(str(tmp_path))
    digests = put_model(store, "a")
    store.recover()
    ops = make_ops(store)
    monkeypatch.setattr(Store, "_read_manifest", lambda *a: pytest.fail("read a manifest"))
    assert [m["model"] for m in call(ops, "ls", {}).replies[0][1]["models"]] == ["a:latest"]
    body = call(ops, "download", {"digest": digests[2], "offset": 0, "size": 10}).replies[0][1]
    assert body == {"data": b"w\x02", "total": 2}
    with pytest.raises(errors.ModelNotFound):
        call(ops, "download", {"digest": store.put_blob(b"stray")[0], "offset": 0, "size": 10})
    assert ops.store_ops.sources.known(digests[0]) is False     # Sources: from the index too
