import hashlib
import json
import os

import pytest

from llmctl import errors
from llmosd.store.store import Store, canonical, parse_ref


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
    assert s.copy("a", "b:v1") == "b:v1"         # the same content again: a no-op
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
    assert s.recover() == {"temp_files": 1, "orphan_blobs": 1, "links": 0}
    assert not s.has_blob(orphan)
    _, man, _ = s.get("keep")
    assert all(s.has_blob(d) for d in s.blob_digests(man))


def test_manifest_is_never_half_written(tmp_path, monkeypatch):
    s = Store(str(tmp_path))
    s.write_manifest("m", manifest(s, b"v1"))
    before = s.get("m")

    def boom(*a, **kw):
        raise OSError("disk died")
    monkeypatch.setattr(os, "rename", boom)
    with pytest.raises(OSError):
        s.write_manifest("m", manifest(s, b"v2"), replace=True)
    monkeypatch.undo()
    assert s.get("m") == before
    json.loads(open(s._manifest_path("m", "latest")).read())
    assert os.listdir(s.tmp) == []               # the failed write left no temp file


def test_i8_7_names_not_stripped(tmp_path):
    s = Store(str(tmp_path))
    s.write_manifest("tiny", manifest(s))
    for bad in (" tiny ", "tiny ", " tiny", "tiny\n", "tiny:latest\n", "\ttiny"):
        with pytest.raises(errors.InvalidArgument):
            s.get(bad)
        with pytest.raises(errors.InvalidArgument):
            s.remove(bad)
    with pytest.raises(errors.InvalidArgument) as e:
        parse_ref(" tiny ")
    assert "spaces" in e.value.hint
    assert s.get("tiny")[0] == "tiny:latest"


def test_i7_11_invalid_name_echo_is_capped():
    with pytest.raises(errors.InvalidArgument) as e:
        parse_ref("X" * (15 << 20))
    assert len(e.value.message) < 300 and "characters" in e.value.message


def test_i7_12_name_namespace_collision(tmp_path):
    s = Store(str(tmp_path))
    m = manifest(s)
    s.write_manifest("dir:sub", m)                # manifests/dir/sub is a file
    with pytest.raises(errors.ModelNotFound):
        s.get("dir/sub:x")
    with pytest.raises(errors.InvalidArgument) as e:
        s.write_manifest("dir/sub:x", m)
    assert "dir:sub" in e.value.message and str(tmp_path) not in e.value.message + e.value.hint
    with pytest.raises(errors.InvalidArgument):
        s.copy("dir:sub", "dir/sub:x")
    with pytest.raises(errors.InvalidArgument):
        s.check_free("dir/sub:y")                 # the same answer before any work is done
    with pytest.raises(errors.AlreadyExists):
        s.check_free("dir:sub")
    s.check_free("dir:sub", replace=True)
    s.check_free("new/name:v1")
    assert not os.path.exists(os.path.join(s.manifests, "new"))
    s.write_manifest("other/name:v1", m)          # manifests/other/name is a directory
    for ref in ("other:name", "other"):
        with pytest.raises(errors.ModelNotFound) as nf:
            s.get(ref)
        assert str(tmp_path) not in nf.value.message
        with pytest.raises(errors.ModelNotFound):
            s.remove(ref)
    for replace in (False, True):
        with pytest.raises(errors.InvalidArgument) as e:
            s.write_manifest("other:name", m, replace=replace)
        assert "other/name" in e.value.message and str(tmp_path) not in e.value.message + e.value.hint
        with pytest.raises(errors.InvalidArgument):
            s.check_free("other:name", replace=replace)
    assert [r for r, _, _ in s.list()] == ["dir:sub", "other/name:v1"]


def test_i8_4_tag_replace_frees_blobs(tmp_path):
    s = Store(str(tmp_path))
    s.write_manifest("a", manifest(s, b"weights of a"))
    s.write_manifest("b", manifest(s, b"weights of b"))
    with pytest.raises(errors.AlreadyExists) as e:
        s.copy("a", "b")                          # b is another model: not without --force
    assert "--force" in e.value.hint
    assert s.get("b")[2] != s.get("a")[2]
    b_weights = s.get("b")[1]["weights"]["digest"]
    assert s.copy("a", "b", replace=True) == "b:latest"
    assert s.get("b")[2] == s.get("a")[2]
    assert not s.has_blob(b_weights)              # b's old weights went with the old b
    shared = s.get("a")[1]["config"]["digest"]
    assert s.has_blob(shared)
    # replacing through write_manifest frees the old blobs too, keeping those still named
    s.write_manifest("c", manifest(s, b"weights of c"))
    c_weights = s.get("c")[1]["weights"]["digest"]
    s.write_manifest("c", manifest(s, b"weights of c2"), replace=True)
    assert not s.has_blob(c_weights) and s.has_blob(shared)
    assert s.remove("b")["freed_bytes"] == 0      # a still names everything b named
    assert s.remove("a")["freed_bytes"] > 0


def test_i7_3_store_symlinks_not_followed(tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    secret = outside / "secret"
    secret.write_text('{"config": {"digest": "sha256:' + "0" * 64 + '"}}')
    s = Store(str(tmp_path / "store"))
    s.write_manifest("real", manifest(s))
    os.symlink(secret, os.path.join(s.manifests, "real", "evil"))      # real:evil -> outside
    os.symlink(outside, os.path.join(s.manifests, "ns"))              # ns/*:* -> outside dir
    (outside / "x").mkdir()
    (outside / "x" / "latest").write_text("{}")
    with pytest.raises(errors.StoreCorrupt) as e:
        s.get("real:evil")
    assert str(tmp_path) not in e.value.message + e.value.hint
    with pytest.raises(errors.StoreCorrupt):
        s.remove("real:evil")
    with pytest.raises(errors.StoreCorrupt):
        s.get("ns/x")
    with pytest.raises(errors.StoreCorrupt):
        s.remove("ns/x")
    with pytest.raises(errors.StoreCorrupt):
        s.write_manifest("ns/y", manifest(s))
    assert [r for r, _, _ in s.list()] == ["real:latest"]
    assert secret.exists() and (outside / "x" / "latest").exists()
    assert not (outside / "y").exists()
    # a blob that is a link is never read; recovery removes the link, not its target
    target = outside / "blob"
    target.write_bytes(b"abc")
    d = "sha256:" + hashlib.sha256(b"abc").hexdigest()
    os.symlink(target, s.blob_path(d))
    with pytest.raises(errors.StoreCorrupt):
        s.read_blob(d)
    assert not s.has_blob(d)
    # temp entries: links and directories go, nothing they point at
    os.symlink(outside, os.path.join(s.tmp, "dirlink"))
    os.symlink(secret, os.path.join(s.tmp, "filelink"))
    os.mkdir(os.path.join(s.tmp, "sub"))
    os.symlink(outside, os.path.join(s.tmp, "sub", "inner"))
    assert s.recover() == {"temp_files": 3, "orphan_blobs": 0, "links": 1}
    assert os.listdir(s.tmp) == [] and target.read_bytes() == b"abc" and secret.exists()
    assert sorted(os.listdir(outside)) == ["blob", "secret", "x"]


@pytest.mark.parametrize("entry", ["tmp", "manifests", "blobs"])
def test_i7_3_store_dir_links_are_refused(tmp_path, entry):
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "precious").write_text("keep me")
    root = tmp_path / "store"
    root.mkdir()
    os.symlink(outside, root / entry)
    with pytest.raises(errors.StoreCorrupt) as e:
        Store(str(root))
    assert "symbolic link" in e.value.message
    assert (outside / "precious").read_text() == "keep me"


# -- issue 9: the index, the writer, canonical names ---------------------------------------------

def test_i9_1_list_and_references_read_no_manifest(tmp_path, monkeypatch):
    """After start-up (recover), listing, did-you-mean and reference checks use the in-memory
    index, kept up to date by this process's writes: no manifest is read or hashed."""
    s = Store(str(tmp_path))
    s.write_manifest("a", manifest(s, b"weights of a"))
    s.recover()                                      # start-up: the one scan
    reads = []
    real = Store._read_manifest
    monkeypatch.setattr(Store, "_read_manifest", lambda self, n, t: reads.append(f"{n}:{t}") or real(self, n, t))
    monkeypatch.setattr(Store, "_iter_manifests", lambda self: pytest.fail("rescanned the manifests"))
    m = manifest(s, b"weights of b")
    s.write_manifest("b:v1", m)
    assert [r for r, _, _ in s.list()] == ["a:latest", "b:v1"]
    (ref, digest, man), = [t for t in s.list() if t[0] == "b:v1"]
    assert digest == s.get("b:v1")[2] == man["_digest"] and man["_mtime"] > 0
    assert s.referenced(m["weights"]["digest"]) and not s.referenced("sha256:" + "1" * 64)
    s.copy("b:v1", "c")
    assert s.referenced(m["weights"]["digest"]) and len(s.list()) == 3
    reads.clear()
    for _ in range(5):
        s.list()
        s.referenced(m["weights"]["digest"])
    with pytest.raises(errors.ModelNotFound) as e:
        s.find("bb:v1")                               # did-you-mean from the index
    assert "did you mean b:v1?" in e.value.hint
    assert reads == ["bb:v1"]                         # only the name asked for was read
    s.remove("b:v1")
    s.remove("c")
    assert not s.referenced(m["weights"]["digest"]) and not s.has_blob(m["weights"]["digest"])
    assert [r for r, _, _ in s.list()] == ["a:latest"]


def test_i9_1_a_new_store_object_sees_what_is_on_disk(tmp_path):
    """Without recover(), the index is read at first use (tools, tests, job workers)."""
    s = Store(str(tmp_path))
    s.write_manifest("a", manifest(s))
    again = Store(str(tmp_path))
    assert [r for r, _, _ in again.list()] == ["a:latest"]
    assert again.referenced(s.get("a")[1]["weights"]["digest"])


def test_i9_2_removal_in_flight_is_not_found(tmp_path):
    """A model whose removal is accepted but queued is gone for get, find and list at once."""
    s = Store(str(tmp_path))
    s.write_manifest("a", manifest(s))
    s.leaving("a")
    with pytest.raises(errors.ModelNotFound):
        s.get("a")
    with pytest.raises(errors.ModelNotFound):
        s.find("a:latest")
    assert s.list() == []
    s.remove("a")                                     # what the writer then does
    s.leaving("a", gone=False)
    assert s.list() == [] and os.listdir(s.blobs) == []


def test_i9_7_canonical_name():
    assert canonical("tiny") == "tiny:latest" and canonical("me/x:v2") == "me/x:v2"
    with pytest.raises(errors.InvalidArgument):
        canonical(" tiny")
