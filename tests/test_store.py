import json
import os

import pytest

from llmctl import errors
from llmosd.store import Store, parse_ref


def manifest(store, payload=b"weights"):
    d, n = store.put_blob(payload)
    c, m = store.put_blob(b'{"x": 1}')
    return {"config": {"digest": c, "size": m}, "weights": {"digest": d, "size": n},
            "lineage": {"method": "test"}}


def test_parse_ref():
    assert parse_ref("tiny") == ("tiny", "latest")
    assert parse_ref("me/tiny:v2") == ("me/tiny", "v2")
    for bad in ("", "Tiny", "a b", "../x", "x:", "x:/y", "a/b/c"):
        if bad == "x:":
            assert parse_ref(bad) == ("x", "latest")
            continue
        with pytest.raises(errors.InvalidArgument):
            parse_ref(bad)


def test_blobs_are_content_addressed_and_idempotent(tmp_path):
    s = Store(str(tmp_path))
    d1, n = s.put_blob(b"abc")
    d2, _ = s.put_blob(b"abc")
    assert d1 == d2 and n == 3 and d1.startswith("sha256:")
    assert s.read_blob(d1) == b"abc"
    with open(s.blob_path(d1), "wb") as f:
        f.write(b"abd")
    with pytest.raises(errors.StoreCorrupt):
        s.read_blob(d1)


def test_manifest_publish_copy_remove(tmp_path):
    s = Store(str(tmp_path))
    m = manifest(s)
    digest = s.write_manifest("a", m)
    with pytest.raises(errors.AlreadyExists):
        s.write_manifest("a:latest", m)
    assert s.copy("a", "b:v1") == "b:v1"
    assert s.get("b:v1")[2] == digest            # same content, same digest
    assert [r for r, _, _ in s.list()] == ["a:latest", "b:v1"]
    assert s.remove("a")["freed_bytes"] == 0     # b still names the blobs
    assert s.remove("b:v1")["freed_bytes"] > 0
    assert os.listdir(s.blobs) == [] and s.list() == []
    with pytest.raises(errors.ModelNotFound):
        s.get("a")


def test_manifest_refuses_missing_blob(tmp_path):
    s = Store(str(tmp_path))
    with pytest.raises(errors.StoreCorrupt):
        s.write_manifest("x", {"weights": {"digest": "sha256:" + "0" * 64, "size": 1}})
    assert s.list() == []


def test_recover_drops_temp_and_orphans_only(tmp_path):
    s = Store(str(tmp_path))
    s.write_manifest("keep", manifest(s))
    orphan, _ = s.put_blob(b"orphan from a crashed create")
    open(os.path.join(s.tmp, "blob-half"), "wb").write(b"half")
    assert s.recover() == {"temp_files": 1, "orphan_blobs": 1}
    assert not s.has_blob(orphan)
    _, man, _ = s.get("keep")
    assert all(s.has_blob(d) for d in s.blob_digests(man))


def test_manifest_is_never_half_written(tmp_path, monkeypatch):
    s = Store(str(tmp_path))
    s.write_manifest("m", manifest(s, b"v1"))
    before = s.get("m")

    def boom(*a):
        raise OSError("disk died")
    monkeypatch.setattr(os, "rename", boom)
    with pytest.raises(OSError):
        s.write_manifest("m", manifest(s, b"v2"), replace=True)
    monkeypatch.undo()
    assert s.get("m") == before
    json.loads(open(s._manifest_path("m", "latest")).read())
