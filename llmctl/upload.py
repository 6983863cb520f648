"""Sending local files into the daemon's store: content-addressed, never twice.

The daemon may run as another user and cannot read the caller's files, so ``import`` and
``train`` send what they need over the socket: first the file's digest (``upload``), and only
when the store lacks it, the content in ``UPLOAD_CHUNK`` pieces (``upload_chunk``).
"""
from __future__ import annotations

import hashlib
import os
from typing import Callable

from . import protocol

# The daemon's answer when it said "have" for a file only known as an import's source and now
# needs the content after all: it remembers to ask, and the caller sends and retries once.
RESEND = "were not sent because llmosd knew them"


def sha256_file(path: str) -> tuple[str, int]:
    """("sha256:<hex>", size in bytes) of the file at ``path``."""
    h, n = hashlib.sha256(), 0
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            h.update(block)
            n += len(block)
    return "sha256:" + h.hexdigest(), n


def upload_file(client, path: str, progress: Callable[[dict], None] | None = None) -> str:
    """Send one file's content to ``client``'s daemon unless its store has it; returns the digest.
    ``progress`` hears {file, sent, size} per chunk, or {file, sent, size, skipped} once."""
    digest, size = sha256_file(path)
    name = os.path.basename(path)
    if client._call("upload", {"digest": digest, "size": size})["have"]:
        if progress:
            progress({"file": name, "sent": size, "size": size, "skipped": True})
        return digest
    with open(path, "rb") as f:
        offset = 0
        while True:
            data = f.read(protocol.UPLOAD_CHUNK)
            if not data and offset:
                break
            r = client._call("upload_chunk", {"digest": digest, "offset": offset, "data": data})
            offset += len(data)
            if progress:
                progress({"file": name, "sent": offset, "size": size})
            if r.get("complete") or not data:
                break
    return digest
