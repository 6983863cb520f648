"""Request handlers at unit level: a real Store in a temp directory, fake clients, instances
and jobs (no daemon, no torch work)."""
from __future__ import annotations

import errno
import logging
import types

import pytest

from llmctl import errors
from llmosd.jobs.runner import JobState
from llmosd.ops import Ops
from llmosd.store.store import Store
from llmosd.table import ModelTable
from llmosd.store.uploads import Uploads


class FakeStream:
    def __init__(self):
        self.chunks, self.result, self.err = [], None, None

    def chunk(self, body, on_sent=None):
        self.chunks.append(body)

    def end(self, body):
        self.result = body

    def error(self, err):
        self.err = err


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
        self.store, self.jobs, self.make = store, {}, None

    def start(self, kind, target, func, spec, uid, on_progress, on_done):
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

    def worker(store, job):                              # writes its blobs, returns a manifest
        d = [store.put_blob(b"blob%d" % i)[0] for i in range(3)]
        job.blobs.update(d)
        return {"schema": 1, "parameters": 1, "config": {"digest": d[0], "size": 5},
                "tokenizer": {"digest": d[1], "size": 5}, "weights": {"digest": d[2], "size": 5},
                "lineage": {"method": "import", "args": {"format": "hf", "files": ["config.json"]}}}, None
    ops.jobs.make = worker
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
