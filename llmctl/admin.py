"""The administrator's half of the client (a ``Client`` mixin): ``fsck`` (protocol 1.8).

    with Client() as c:
        report = c.fsck(repair=True)   # {clean, repair, checked, problems, removed, unresolved, skipped}

It uses only the client's ``_call`` and ``timeout``.
"""
from __future__ import annotations

__all__ = ["AdminMixin"]


class AdminMixin:
    def fsck(self, repair: bool = False, timeout: float | None = None) -> dict:
        """Check the daemon's store: every blob's digest, every manifest's schema and
        references; with ``repair`` remove orphan blobs, temp files, links among the blobs and
        corrupt blobs (never a manifest).  Hashing every blob takes a while: the timeout is
        ``timeout``, else the client's and at least an hour."""
        return self._call("fsck", {"repair": bool(repair)}, timeout=timeout or max(self.timeout, 3600))
