import errno
import hashlib
import os
import threading

import pytest

from llmctl import errors
from llmosd.store.store import Store
from llmosd.store.uploads import Uploads


def digest(b):
    return "sha256:" + hashlib.sha256(b).hexdigest()


def make(tmp_path):
    store = Store(str(tmp_path))
    return store, Uploads(store, post=lambda fn, *a: fn(*a))


def test_chunked_upload_lands_atomically(tmp_path):
    store, up = make(tmp_path)
    data = bytes(range(256)) * 1000
    d = digest(data)
    assert up.begin(d, len(data)) is False
    assert up.chunk(d, 0, data[:100_000], None) == {"received": 100_000, "complete": False}
    assert not store.has_blob(d)
    got, ev = [], threading.Event()
    assert up.chunk(d, 100_000, data[100_000:], lambda body, err: (got.append((body, err)), ev.set())) is None
    assert ev.wait(10) and got[0][1] is None and got[0][0]["complete"]
    assert store.read_blob(d) == data
    assert up.begin(d, len(data)) is True          # already there: nothing to send


def test_bad_uploads_are_refused_and_leave_nothing(tmp_path):
    store, up = make(tmp_path)
    data = b"hello world"
    d = digest(data)
    with pytest.raises(errors.InvalidArgument, match="no upload of"):
        up.chunk(d, 0, data, None)
    up.begin(d, len(data))
    with pytest.raises(errors.InvalidArgument, match="expected offset 0"):
        up.chunk(d, 5, data, None)
    assert up.slots == {}                          # a failed upload is gone at once
    up.begin(d, len(data))
    with pytest.raises(errors.InvalidArgument, match="does not match"):
        up.chunk(d, 0, b"HELLO WORLD", None)
    up.begin(d, 3)
    with pytest.raises(errors.InvalidArgument, match="longer"):
        up.chunk(d, 0, data, None)
    with pytest.raises(errors.InvalidArgument):
        up.begin("md5:abc", 3)
    assert not store.has_blob(d)
    assert os.listdir(store.tmp) == []


def test_idle_uploads_expire(tmp_path):
    store, up = make(tmp_path)
    up.ttl = 0.0
    up.begin(digest(b"x"), 1)
    up.expire()
    assert up.slots == {}


def test_i7_4_upload_slots_are_limited_per_owner_and_in_all(tmp_path):
    store, up = make(tmp_path)
    up.max_per_owner, up.max_open = 2, 3
    up.begin(digest(b"a"), 1, owner="A")
    up.begin(digest(b"a"), 1, owner="A")              # the same upload again: replaced, not added
    up.begin(digest(b"b"), 1, owner="A")
    with pytest.raises(errors.Busy, match="limit 2 per client"):
        up.begin(digest(b"c"), 1, owner="A")
    up.begin(digest(b"c"), 1, owner="B")
    with pytest.raises(errors.Busy, match="limit 3"):
        up.begin(digest(b"d"), 1, owner="C")
    assert up.release("A") == 2 and len(os.listdir(store.tmp)) == 1
    up.fd_reserve = 1 << 30                           # no descriptors to spare: refused, not crashed
    with pytest.raises(errors.Busy, match="file descriptors"):
        up.begin(digest(b"d"), 1, owner="C")


def test_i7_4_failed_upload_frees_disk(tmp_path):
    store, up = make(tmp_path)
    data = b"x" * 1000
    d = digest(data)
    # a write error (disk full) during a chunk
    up.begin(d, len(data), owner="A")

    class Full:
        def write(self, b):
            raise OSError(errno.ENOSPC, "No space left on device")

        def close(self):
            raise OSError(errno.ENOSPC, "No space left on device")
    up.slots[("A", d)].f.close()
    up.slots[("A", d)].f = Full()
    with pytest.raises(errors.StoreCorrupt, match="No space left"):
        up.chunk(d, 0, data[:10], None, owner="A")
    assert up.slots == {} and os.listdir(store.tmp) == []
    # wrong content, too long, and a failure while finishing: all leave nothing
    up.begin(d, len(data), owner="A")
    with pytest.raises(errors.InvalidArgument, match="does not match"):
        up.chunk(d, 0, b"y" * 1000, None, owner="A")
    up.begin(d, 10, owner="A")
    with pytest.raises(errors.InvalidArgument, match="longer"):
        up.chunk(d, 0, data, None, owner="A")
    assert os.listdir(store.tmp) == []
    up.begin(d, len(data), owner="A")
    store.blobs, real = str(tmp_path / "missing" / "blobs"), store.blobs   # rename fails
    got = []
    up.chunk(d, 0, data, lambda body, err: got.append(err), owner="A")
    for _ in range(100):
        if got:
            break
        threading.Event().wait(0.05)
    store.blobs = real
    assert isinstance(got[0], OSError) and os.listdir(store.tmp) == []


def test_i7_4_same_digest_from_two_clients(tmp_path):
    store, up = make(tmp_path)
    data = b"z" * 100
    d = digest(data)
    up.begin(d, len(data), owner="A")
    up.begin(d, len(data), owner="B")                 # does not clobber A's slot
    assert up.chunk(d, 0, data[:50], None, owner="A") == {"received": 50, "complete": False}
    ev = threading.Event()
    assert up.chunk(d, 0, data, lambda body, err: ev.set(), owner="B") is None
    assert ev.wait(10) and store.read_blob(d) == data
    # A's next piece finds the blob stored: its upload is complete, its temp file gone
    assert up.chunk(d, 50, data[50:], None, owner="A")["complete"]
    assert up.slots == {} and os.listdir(store.tmp) == []
