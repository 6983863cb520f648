import hashlib
import threading

import pytest

from llmctl import errors
from llmosd.store import Store
from llmosd.uploads import Uploads


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
    with pytest.raises(errors.InvalidArgument, match="does not match"):
        up.chunk(d, 0, b"HELLO WORLD", None)
    up.begin(d, 3)
    with pytest.raises(errors.InvalidArgument, match="longer"):
        up.chunk(d, 0, data, None)
    with pytest.raises(errors.StoreCorrupt):
        up.begin("md5:abc", 3)
    assert not store.has_blob(d)
    import os
    assert os.listdir(store.tmp) == []


def test_idle_uploads_expire(tmp_path):
    store, up = make(tmp_path)
    up.ttl = 0.0
    up.begin(digest(b"x"), 1)
    up.expire()
    assert up.slots == {}
