"""Blob uploads from clients: the daemon may run as another user and cannot read the caller's
files, so clients send content over the socket in pieces.

``upload {digest, size}`` opens a slot (or reports the store already has the blob);
``upload_chunk {digest, offset, data}`` appends in order.  The sha256 is computed as chunks
arrive; the last chunk's fsync and rename run on a thread so the control loop never waits on
the disk.  Slots idle for ``ttl`` seconds are dropped.
"""
from __future__ import annotations

import hashlib
import os
import tempfile
import threading
import time
from typing import Callable

from llmctl.errors import InvalidArgument, TooLarge
from .store import Store, fsync_dir

MAX_BLOB = 1 << 40


class Slot:
    def __init__(self, store: Store, digest: str, size: int):
        self.digest, self.size = digest, size
        fd, self.tmp = tempfile.mkstemp(dir=store.tmp, prefix="upload-")
        self.f = os.fdopen(fd, "wb")
        self.h = hashlib.sha256()
        self.received = 0
        self.touched = time.monotonic()

    def discard(self) -> None:
        self.f.close()
        if os.path.exists(self.tmp):
            os.unlink(self.tmp)


class Uploads:
    def __init__(self, store: Store, post: Callable, ttl: float = 600.0):
        self.store, self.post, self.ttl = store, post, ttl
        self.slots: dict[str, Slot] = {}

    def begin(self, digest: str, size: int) -> bool:
        """True when the store already has the blob (nothing to send)."""
        self.store.blob_path(digest)            # validates the digest's form
        if not 0 <= size <= MAX_BLOB:
            raise TooLarge(f"blob size {size} is out of range")
        self.expire()
        if self.store.has_blob(digest):
            return True
        old = self.slots.pop(digest, None)
        if old:
            old.discard()
        self.slots[digest] = Slot(self.store, digest, size)
        return False

    def chunk(self, digest: str, offset: int, data: bytes, done: Callable[[dict | None, Exception | None], None]) -> dict | None:
        """Append a piece.  Returns the reply body, or None when ``done`` will be called later."""
        slot = self.slots.get(digest)
        if slot is None:
            if self.store.has_blob(digest):
                return {"received": offset + len(data), "complete": True}
            raise InvalidArgument(f"no upload of {digest} is open", hint="send 'upload' first")
        if offset != slot.received:
            raise InvalidArgument(f"upload of {digest}: expected offset {slot.received}, got {offset}")
        if slot.received + len(data) > slot.size:
            self._drop(digest)
            raise InvalidArgument(f"upload of {digest} is longer than its declared {slot.size} bytes")
        slot.f.write(data)
        slot.h.update(data)
        slot.received += len(data)
        slot.touched = time.monotonic()
        if slot.received < slot.size:
            return {"received": slot.received, "complete": False}
        del self.slots[digest]
        if "sha256:" + slot.h.hexdigest() != digest:
            slot.discard()
            raise InvalidArgument(f"uploaded content does not match its digest {digest}",
                                  hint="the file changed while it was being sent; try again")
        threading.Thread(target=self._finish, args=(slot, done), daemon=True).start()
        return None

    def _finish(self, slot: Slot, done) -> None:
        try:
            slot.f.flush()
            os.fsync(slot.f.fileno())
            slot.f.close()
            os.chmod(slot.tmp, 0o640)
            os.rename(slot.tmp, self.store.blob_path(slot.digest))
            fsync_dir(self.store.blobs)
            self.post(done, {"received": slot.received, "complete": True}, None)
        except OSError as e:
            slot.discard()
            self.post(done, None, e)

    def _drop(self, digest: str) -> None:
        slot = self.slots.pop(digest, None)
        if slot:
            slot.discard()

    def expire(self) -> None:
        now = time.monotonic()
        for d, s in list(self.slots.items()):
            if now - s.touched > self.ttl:
                self._drop(d)
