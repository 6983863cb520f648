"""Blob uploads from clients: the daemon may run as another user and cannot read the caller's
files, so clients send content over the socket in pieces.

``upload {digest, size}`` opens a slot (or reports the store already has the blob);
``upload_chunk {digest, offset, data}`` appends in order.  The sha256 is computed as chunks
arrive; the last chunk's fsync and rename run on a thread so the control loop never waits on
the disk.

A slot belongs to one owner (the client connection) and holds a descriptor and a temp file, so
slots are limited per owner and in all, and a descriptor reserve is kept so the daemon can
always accept a connection and answer ``status``.  A slot that fails for any reason (bad
offset, too long, wrong digest, a write error) is removed with its temp file at once; the
owner's slots go when it disconnects (``release``); idle ones after ``ttl`` seconds.  Two
owners uploading the same digest get separate slots; whichever finishes first stores the blob.
"""
from __future__ import annotations

import hashlib
import os
import resource
import tempfile
import threading
import time
from typing import Callable, Hashable

from llmctl.errors import Busy, InvalidArgument, StoreCorrupt, TooLarge
from llmosd.store.manifest import import_sources
from llmosd.store.paths import commit_file
from llmosd.store.store import Store

MAX_BLOB = 1 << 40
FD_RESERVE = 64          # descriptors kept free for connections, the store and `status`


class Slot:
    def __init__(self, store: Store, owner: Hashable, digest: str, size: int):
        self.owner, self.digest, self.size = owner, digest, size
        fd, self.tmp = tempfile.mkstemp(dir=store.tmp, prefix="upload-")
        self.f = os.fdopen(fd, "wb")
        self.h = hashlib.sha256()
        self.received = 0
        self.touched = time.monotonic()

    def discard(self) -> None:
        """Close and delete the temp file; never raises (closing may flush into a full disk)."""
        try:
            self.f.close()
        except OSError:
            pass
        try:
            os.unlink(self.tmp)
        except FileNotFoundError:
            pass


def open_fds() -> int:
    """How many descriptors this process has open (0 when /proc is not there)."""
    try:
        return len(os.listdir("/proc/self/fd"))
    except OSError:
        return 0


def fd_limit() -> int:
    soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    return soft if soft != resource.RLIM_INFINITY else 1 << 20


class Uploads:
    def __init__(self, store: Store, post: Callable, ttl: float = 600.0, *,
                 max_open: int = 64, max_per_owner: int = 8, fd_reserve: int = FD_RESERVE):
        self.store, self.post, self.ttl = store, post, ttl
        self.max_open, self.max_per_owner, self.fd_reserve = max_open, max_per_owner, fd_reserve
        self.slots: dict[tuple, Slot] = {}          # (owner, digest) -> slot

    def begin(self, digest: str, size: int, owner: Hashable = None) -> bool:
        """Open ``owner``'s slot for ``digest``; True when the store already has the blob
        (nothing to send).  Raises Busy past the limits."""
        self.store.check_digest(digest)         # validates the digest's form (bad input)
        if not 0 <= size <= MAX_BLOB:
            raise TooLarge(f"blob size {size} is out of range")
        self.expire()
        if self.store.has_blob(digest):
            return True
        self._drop((owner, digest))             # the owner starts this upload over
        self._check_room(owner)
        try:
            self.slots[(owner, digest)] = Slot(self.store, owner, digest, size)
        except OSError as e:                    # EMFILE, ENOSPC...: refuse, keep serving
            raise Busy(f"cannot open an upload now: {e.strerror or e}",
                       hint="free disk space or wait for other uploads to finish, then retry") from None
        return False

    def _check_room(self, owner: Hashable) -> None:
        mine = sum(1 for o, _ in self.slots if o == owner)
        if mine >= self.max_per_owner:
            raise Busy(f"this connection already has {mine} uploads open "
                       f"(limit {self.max_per_owner} per client)",
                       hint="finish or abandon an upload before starting another "
                            "(max_uploads_per_client in llmosd.toml)")
        if len(self.slots) >= self.max_open:
            raise Busy(f"llmosd has {len(self.slots)} uploads open (limit {self.max_open})",
                       hint="retry when other uploads have finished (max_uploads in llmosd.toml)")
        used, limit = open_fds(), fd_limit()
        if used + self.fd_reserve >= limit:
            raise Busy(f"llmosd is short of file descriptors ({used} open, limit {limit})",
                       hint="retry when other uploads have finished, or raise LimitNOFILE")

    def chunk(self, digest: str, offset: int, data: bytes,
              done: Callable[[dict | None, Exception | None], None],
              owner: Hashable = None) -> dict | None:
        """Append a piece.  Returns the reply body, or None when ``done`` will be called later
        (on the control loop, through ``post``).  Any failure removes the slot."""
        key = (owner, digest)
        slot = self.slots.get(key)
        if slot is None:
            if self.store.has_blob(digest):
                return {"received": offset + len(data), "complete": True}
            raise InvalidArgument(f"no upload of {digest} is open", hint="send 'upload' first")
        if offset != slot.received:
            self._drop(key)
            raise InvalidArgument(f"upload of {digest}: expected offset {slot.received}, got {offset}",
                                  hint="start the upload again with 'upload'")
        if slot.received + len(data) > slot.size:
            self._drop(key)
            raise InvalidArgument(f"upload of {digest} is longer than its declared {slot.size} bytes")
        if self.store.has_blob(digest):         # another client finished the same content first
            self._drop(key)
            return {"received": slot.size, "complete": True}
        try:
            slot.f.write(data)
        except OSError as e:                    # disk full: give the space back at once
            self._drop(key)
            raise StoreCorrupt(f"storing the upload of {digest} failed: {e.strerror or e}",
                               hint="free space in the state directory and try again") from None
        slot.h.update(data)
        slot.received += len(data)
        slot.touched = time.monotonic()
        if slot.received < slot.size:
            return {"received": slot.received, "complete": False}
        del self.slots[key]
        if "sha256:" + slot.h.hexdigest() != digest:
            slot.discard()
            raise InvalidArgument(f"uploaded content does not match its digest {digest}",
                                  hint="the file changed while it was being sent; try again")
        threading.Thread(target=self._finish, args=(slot, done), daemon=True).start()
        return None

    def _finish(self, slot: Slot, done) -> None:
        try:
            commit_file(slot.f, slot.tmp, self.store.blob_path(slot.digest), dir_path=self.store.blobs)
            self.post(done, {"received": slot.received, "complete": True}, None)
        except OSError as e:
            slot.discard()
            self.post(done, None, e)

    def is_open(self, digest: str, owner: Hashable = None) -> bool:
        return (owner, digest) in self.slots

    def release(self, owner: Hashable) -> int:
        """Drop every slot of ``owner`` (it disconnected); returns how many."""
        keys = [k for k in self.slots if k[0] == owner]
        for k in keys:
            self._drop(k)
        return len(keys)

    def _drop(self, key: tuple) -> None:
        slot = self.slots.pop(key, None)
        if slot:
            slot.discard()

    def expire(self) -> None:
        now = time.monotonic()
        for k, s in list(self.slots.items()):
            if now - s.touched > self.ttl:
                self._drop(k)


# -- files the daemon need not receive again -------------------------------------------------

class Sources:
    """The files stored models were imported from, by digest.  Raw uploads are discarded once
    converted, but a re-import of exactly the same files (format, dtype) can copy the model,
    so ``upload`` of a known source answers ``have`` and nothing is sent.

    Derived from the store's index (never from the disk), again whenever the store's
    ``generation`` says it changed.  ``resend`` holds sources an import needed the content of
    after all (other files or dtype): those are uploaded for real next time."""

    def __init__(self, store: Store):
        self.store = store
        self._index: dict = {}
        self._generation: int | None = None
        self.resend: set[str] = set()

    def models(self, digest: str) -> list[tuple[str, dict]]:
        """[(model, manifest)] imported from ``digest``."""
        gen = self.store.generation            # read first: a change while building is seen next time
        if self._generation != gen:
            idx: dict = {}
            for ref, _, man in self.store.list():
                for d in set(import_sources(man).values()):
                    idx.setdefault(d, []).append((ref, man))
            self._index, self._generation = idx, gen
        return self._index.get(digest, [])

    def known(self, digest: str) -> bool:
        """Whether a client need not send ``digest`` (it is the source of a stored model)."""
        return digest not in self.resend and bool(self.models(digest))

    def same_import(self, files: dict, fmt: str, dtype: str) -> str | None:
        """A stored model imported from exactly these files, format and dtype, or None."""
        if not files:
            return None
        for ref, man in self.models(next(iter(files.values()))):
            args = man["lineage"]["args"]
            if import_sources(man) == files and args.get("format") == fmt and args.get("dtype") == dtype:
                return ref
        return None
