"""The store's index: what its manifests say, kept in memory so that listing models and
checking whether a blob is referenced never read the disk.  Thread-safe; its lock is held only
for in-memory work, never across a disk access."""
from __future__ import annotations

import threading
from typing import Iterable


def blob_digests(manifest: dict) -> set[str]:
    """The blobs a manifest names."""
    return {v["digest"] for v in manifest.values() if isinstance(v, dict) and "digest" in v}


class Index:
    """name:tag -> (digest, manifest), and blob digest -> the models naming it.

    Empty until ``load``; after that the store reports each write (``put``, ``drop``).
    ``leaving`` marks models whose removal was accepted but is not done yet: ``models``
    leaves them out and ``is_leaving`` says so.  ``generation`` grows with every change of
    what ``models`` returns, for those who derive something from it."""

    def __init__(self):
        self._lock = threading.Lock()
        self.loaded = False
        self._models: dict[str, tuple[str, dict]] = {}
        self._users: dict[str, set[str]] = {}
        self._leaving: set[str] = set()
        self.generation = 0

    def load(self, entries: Iterable[tuple[str, str, dict]]) -> None:
        """Replace the contents with (name:tag, digest, manifest) read from the disk."""
        models = {ref: (digest, man) for ref, digest, man in entries}
        users: dict[str, set[str]] = {}
        for ref, (_, man) in models.items():
            for d in blob_digests(man):
                users.setdefault(d, set()).add(ref)
        with self._lock:
            self._models, self._users, self.loaded = models, users, True
            self.generation += 1

    def put(self, ref: str, digest: str, manifest: dict | None) -> None:
        """Model ``ref`` now has ``manifest`` (None: it is gone)."""
        with self._lock:
            old = self._models.pop(ref, None)
            for d in blob_digests(old[1]) if old else ():
                self._users[d].discard(ref)
                if not self._users[d]:
                    del self._users[d]
            if manifest is not None:
                self._models[ref] = (digest, manifest)
                for d in blob_digests(manifest):
                    self._users.setdefault(d, set()).add(ref)
            self.generation += 1

    def referenced(self, digest: str) -> bool:
        with self._lock:
            return digest in self._users

    def models(self) -> list[tuple[str, str, dict]]:
        """[(name:tag, digest, manifest)] sorted by name, without those leaving."""
        with self._lock:
            return sorted(((ref, d, man) for ref, (d, man) in self._models.items()
                           if ref not in self._leaving), key=lambda t: t[0])

    def leaving(self, ref: str, gone: bool = True) -> None:
        with self._lock:
            (self._leaving.add if gone else self._leaving.discard)(ref)
            self.generation += 1

    def is_leaving(self, ref: str) -> bool:
        with self._lock:
            return ref in self._leaving
