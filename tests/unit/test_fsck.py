"""Issue 14, recovery: ``store.fsck`` on a Store in tmp_path (blobs re-hashed, manifests checked,
repair removes only what nobody needs), and the desired state's file (``llmosd.desired``)."""
from __future__ import annotations

import json
import os
import time

import pytest

from llmctl import protocol
from llmctl.cli.admin import render
from llmosd import desired
from llmosd.store.fsck import GRACE_S, fsck
from llmosd.store.store import Store
from llmosd.table import ModelTable, State


def model(store: Store, name: str, payload: bytes) -> dict:
    """Publish a model whose weights are ``payload``; its manifest."""
    man = {"schema": 1, "architecture": "llama", "lineage": {"method": "test"}}
    for key, data in (("config", b'{"dim": 8}'), ("tokenizer", b"tok"), ("weights", payload)):
        d, n = store.put_blob(data)
        man[key] = {"digest": d, "size": n}
    store.write_manifest(name, man)
    return man


def old(path: str) -> None:
    """Make ``path`` look older than the grace period (no longer work in progress)."""
    t = time.time() - GRACE_S - 60
    os.utime(path, (t, t), follow_symlinks=False)


def kinds(report: dict) -> list[tuple[str, str]]:
    return sorted((p["kind"], p["action"]) for p in report["problems"])


@pytest.fixture
def store(tmp_path):
    s = Store(str(tmp_path / "store"))
    s.recover()
    return s


def test_i14_5_clean_store_is_clean_and_good_models_are_verified(store):
    a = model(store, "a", b"weights of a")
    model(store, "b", b"weights of b")
    before = {n: open(os.path.join(store.blobs, n), "rb").read() for n in os.listdir(store.blobs)}
    for repair in (False, True):
        r = fsck(store, repair=repair)
        assert r["clean"] and r["problems"] == [] and r["unresolved"] == 0
        assert r["checked"]["manifests"] == 2 and r["checked"]["blobs"] == 4   # config, tokenizer shared
    assert {n: open(os.path.join(store.blobs, n), "rb").read() for n in os.listdir(store.blobs)} == before
    assert store.get("a")[1]["weights"] == a["weights"]
    assert render(fsck(store)).endswith("clean")


def test_i14_5_corrupt_blob_reported_removed_and_its_model_needs_reimport(store):
    a = model(store, "a", b"weights of a")
    b = model(store, "b", b"weights of b")
    bad = store.blob_path(a["weights"]["digest"])
    with open(bad, "r+b") as f:                       # flip bytes, same size
        f.write(b"W")
    r = fsck(store)
    assert kinds(r) == [("broken_model", "needs re-import (or 'llmctl rm' it)"), ("corrupt_blob", "reported")]
    assert os.path.exists(bad) and r["unresolved"] == 2
    r = fsck(store, repair=True)
    assert ("corrupt_blob", "removed") in kinds(r) and not os.path.exists(bad)
    broken = [p for p in r["problems"] if p["kind"] == "broken_model"]
    assert [p["what"] for p in broken] == ["a:latest"] and "corrupt" in broken[0]["detail"]
    assert r["removed"]["blobs"] == 1 and r["unresolved"] == 1
    assert store.get("a")[0] == "a:latest"            # the manifest (user data) stays
    store.verify_blob(b["weights"]["digest"])         # the good model is untouched
    r = fsck(store)                                   # afterwards: the blob is missing
    assert kinds(r) == [("broken_model", "needs re-import (or 'llmctl rm' it)"),
                        ("missing_blob", "needs re-import (or 'llmctl rm' it)")]


def test_i14_5_orphan_blob_and_temp_files_removed_by_repair(store):
    model(store, "a", b"weights of a")
    orphan, _ = store.put_blob(b"nobody names me")
    tmp_file = os.path.join(store.tmp, "blob-x")
    tmp_dir = os.path.join(store.tmp, "dir-y")
    open(tmp_file, "wb").close()
    os.mkdir(tmp_dir)
    open(os.path.join(tmp_dir, "part"), "wb").close()
    r = fsck(store)
    assert kinds(r) == [("orphan_blob", "reported"), ("temp_file", "reported"), ("temp_file", "reported")]
    r = fsck(store, repair=True)                      # young: may be work in progress
    assert all(p["action"].startswith("kept: younger") for p in r["problems"]) and store.has_blob(orphan)
    for p in (store.blob_path(orphan), tmp_file, tmp_dir):
        old(p)
    r = fsck(store, repair=True, busy="job 3 running")
    assert all(p["action"] == "kept: job 3 running" for p in r["problems"]) and os.path.exists(tmp_file)
    r = fsck(store, repair=True)
    assert kinds(r) == [("orphan_blob", "removed"), ("temp_file", "removed"), ("temp_file", "removed")]
    assert r["unresolved"] == 0 and not r["clean"]
    assert not store.has_blob(orphan) and os.listdir(store.tmp) == []
    assert fsck(store)["clean"]
    assert render(r).endswith("repaired")


def test_i14_5_blobs_a_job_needs_are_not_orphans(store):
    kept, _ = store.put_blob(b"training data of a paused job")
    old(store.blob_path(kept))
    store.extra_refs = lambda: frozenset({kept})
    assert fsck(store, repair=True)["clean"] and store.has_blob(kept)


def test_i14_5_links_reported_never_followed(store, tmp_path):
    model(store, "a", b"weights of a")
    outside = tmp_path / "precious"
    outside.write_bytes(b"not the store's")
    link_blob = os.path.join(store.blobs, "sha256-" + "0" * 64)
    os.symlink(outside, link_blob)
    os.symlink(tmp_path, os.path.join(store.manifests, "evil"))
    os.symlink(outside, os.path.join(store.manifests, "a", "v2"))
    r = fsck(store)
    links = sorted(p["what"] for p in r["problems"] if p["kind"] == "link")
    assert links == ["a:v2", "blobs/sha256-" + "0" * 64, "manifests/evil"]
    assert r["checked"]["manifests"] == 1
    r = fsck(store, repair=True)
    assert not os.path.lexists(link_blob)                       # the link itself went
    assert outside.read_bytes() == b"not the store's"           # never its target
    assert os.path.islink(os.path.join(store.manifests, "evil"))   # manifests: left for a person
    assert store.get("a")[0] == "a:latest"


def test_i14_5_bad_manifests_are_reported_never_removed(store):
    a = model(store, "a", b"weights of a")
    os.makedirs(os.path.join(store.manifests, "junk"))
    with open(os.path.join(store.manifests, "junk", "latest"), "w") as f:
        f.write("{not json")
    bad_schema = dict(a, schema=7)
    del bad_schema["tokenizer"]
    os.makedirs(os.path.join(store.manifests, "odd"))
    with open(os.path.join(store.manifests, "odd", "latest"), "w") as f:
        json.dump(bad_schema, f)
    wrong_size = json.loads(json.dumps(a))
    wrong_size["weights"]["size"] += 1
    store.write_manifest("sized", wrong_size)
    r = fsck(store, repair=True)
    bad = {p["what"]: p["detail"] for p in r["problems"] if p["kind"] == "bad_manifest"}
    assert set(bad) == {"junk:latest", "odd:latest", "sized:latest"}
    assert "schema is 7" in bad["odd:latest"] and "no tokenizer" in bad["odd:latest"]
    assert bad["sized:latest"].endswith("bytes; it has 12")
    for name in ("junk", "odd", "sized"):
        assert os.path.exists(os.path.join(store.manifests, name, "latest"))


def test_i14_5_adapter_without_its_base_is_broken(store):
    a = model(store, "a", b"weights of a")
    ad, n = store.put_blob(b"lora")
    man = {"schema": 1, "kind": "adapter", "config": a["config"], "tokenizer": a["tokenizer"],
           "adapter": {"digest": ad, "size": n},
           "base": {"model": "a:latest", "manifest": "sha256:" + "1" * 64, "weights": a["weights"]["digest"]},
           "lineage": {"method": "finetune"}}
    store.write_manifest("qa", man)
    assert fsck(store)["clean"]
    store.remove("a")
    r = fsck(store)
    assert [(p["kind"], p["what"], p["detail"]) for p in r["problems"]] == [
        ("broken_model", "qa:latest", "its base a:latest is gone")]


def test_i14_5_fsck_message_in_protocol():
    assert protocol.MINOR >= 8                  # fsck came in 1.8
    protocol.check_request(protocol.request(1, "fsck", {"repair": True}))
    protocol.check_request(protocol.request(1, "fsck", {}))
    with pytest.raises(Exception, match="repair"):
        protocol.check_request(protocol.request(1, "fsck", {"repair": "yes"}))


# -- the desired state ------------------------------------------------------------------------------
def test_i14_5_desired_state_written_atomically_and_read_back(tmp_path):
    path = str(tmp_path / desired.FILE)
    table = ModelTable()
    d = desired.Desired(path)
    a = table.add("a:latest", "sha256:" + "a" * 64, "cpu", 1000)
    d.sync(table)
    assert desired.read(path) == []                    # loading: not desired yet
    a.transition(State.READY)
    a.pinned, a.keep_alive, a.priority = True, -1.0, 3
    d.sync(table)
    got = desired.read(path)
    assert got == [{"model": "a:latest", "digest": "sha256:" + "a" * 64, "device": "cpu", "uid": 1000,
                    "pinned": True, "keep_alive": -1.0, "priority": 3}]
    assert [n for n in os.listdir(tmp_path) if n.startswith(".desired-")] == []
    a.transition(State.UNLOADING)
    d.freeze()                                        # the daemon stops: left as it was
    d.sync(table)
    assert desired.read(path) == got
    d2 = desired.Desired(path)
    d2.sync(table)                                    # a user unload: gone
    assert desired.read(path) == []


def test_i14_5_desired_state_bad_file_is_ignored(tmp_path):
    p = tmp_path / desired.FILE
    p.write_text("{broken")
    assert desired.read(str(p)) == []
    p.write_text(json.dumps({"version": 1, "instances": [{"model": 3}, {
        "model": "a:latest", "digest": "d", "pinned": False, "keep_alive": 300, "priority": 0, "uid": None}]}))
    assert [e["model"] for e in desired.read(str(p))] == ["a:latest"]


class FakeManager:
    """What ``desired.restore`` uses of the instance manager: acquire, table, mem_device."""

    def __init__(self, fail=()):
        self.table, self.mem_device, self.fail, self.calls = ModelTable(), "cpu", fail, []

    def acquire(self, model, manifest, digest, uid, on_ready, *, priority=None, keep_alive=None, pin=False):
        self.calls.append((model, uid, priority, keep_alive, pin))
        if model in self.fail:
            on_ready(None, RuntimeError("no room"))
            return None
        inst = self.table.add(model, digest, "cpu", uid)
        inst.priority, inst.keep_alive, inst.pinned = priority, keep_alive, pin
        inst.transition(State.READY)
        on_ready(inst, None)
        return inst


def test_i14_5_restore_loads_back_and_drops_what_is_gone_or_fails(store, tmp_path):
    model(store, "a", b"weights of a")
    model(store, "b", b"weights of b")
    path = str(tmp_path / desired.FILE)
    entries = [{"model": m, "digest": store.get(m)[2] if m != "gone:latest" else "sha256:" + "9" * 64,
                "device": "cpu", "uid": 7, "pinned": m == "a:latest", "keep_alive": ka, "priority": 0}
               for m, ka in (("a:latest", 300.0), ("b:latest", 60.0), ("gone:latest", 5.0))]
    desired.write_file(path, desired.encode(entries))
    mgr = FakeManager(fail=("b:latest",))
    d = desired.restore(mgr, store, path)
    assert mgr.desired is d
    assert mgr.calls == [("a:latest", 7, 0, 300.0, True), ("b:latest", 7, 0, 60.0, False)]   # pinned first
    assert [e["model"] for e in desired.read(path)] == ["a:latest"]   # gone and failed: dropped
