"""The model store: content-addressed blobs plus ``name:tag`` manifests.

Layout under ``root``::

    blobs/sha256-<hex>        immutable content (weights, tokenizer, config)
    manifests/<name>/<tag>    JSON naming the blobs of one model, with lineage
    tmp/                      writes in progress; emptied at start-up

Every write goes temp file -> fsync -> rename -> fsync(dir), so a crash leaves either the old
file or the new one, never half of one.  A manifest is written only after all of its blobs,
so a model is listed only once it is complete.  The model's digest is the sha256 of its
manifest's bytes, which do not contain the name: ``tag`` gives a copy the same digest.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
import threading
import time
from typing import BinaryIO, Iterator

from llmctl.errors import AlreadyExists, InvalidArgument, ModelNotFound, StoreCorrupt

SCHEMA = 1
_NAME = re.compile(r"^[a-z0-9][a-z0-9._-]{0,62}(/[a-z0-9][a-z0-9._-]{0,62})?$")
_TAG = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9._-]{0,127}$")
_DIGEST = re.compile(r"^sha256:[0-9a-f]{64}$")


def parse_ref(ref: str) -> tuple[str, str]:
    """'name[:tag]' -> (name, tag); tag defaults to 'latest'.  Raises InvalidArgument."""
    name, _, tag = ref.strip().partition(":")
    tag = tag or "latest"
    if not _NAME.match(name) or not _TAG.match(tag) or ".." in name:
        raise InvalidArgument(f"invalid model name {ref!r}",
                              hint="use lowercase letters, digits, '.', '_', '-' (optionally "
                                   "'namespace/name'), then an optional ':tag'")
    return name, tag


def fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class Store:
    """Thread-safe access to one store directory."""

    def __init__(self, root: str):
        self.root = root
        self.blobs = os.path.join(root, "blobs")
        self.manifests = os.path.join(root, "manifests")
        self.tmp = os.path.join(root, "tmp")
        for d in (self.blobs, self.manifests, self.tmp):
            os.makedirs(d, mode=0o750, exist_ok=True)
        self._lock = threading.RLock()

    # -- recovery -------------------------------------------------------------------------
    def recover(self) -> dict:
        """Start-up only (nothing else may be writing): drop temp files and orphan blobs."""
        removed_tmp = 0
        for name in os.listdir(self.tmp):
            p = os.path.join(self.tmp, name)
            shutil.rmtree(p) if os.path.isdir(p) else os.unlink(p)
            removed_tmp += 1
        referenced = set()
        for _, _, man in self._iter_manifests():
            referenced.update(self.blob_digests(man))
        orphans = 0
        for name in os.listdir(self.blobs):
            if name.replace("-", ":", 1) not in referenced:
                os.unlink(os.path.join(self.blobs, name))
                orphans += 1
        return {"temp_files": removed_tmp, "orphan_blobs": orphans}

    # -- blobs ----------------------------------------------------------------------------
    def blob_path(self, digest: str) -> str:
        if not _DIGEST.match(digest):
            raise StoreCorrupt(f"malformed blob digest {digest!r}")
        return os.path.join(self.blobs, digest.replace(":", "-", 1))

    def has_blob(self, digest: str) -> bool:
        return os.path.exists(self.blob_path(digest))

    def put_blob(self, data: bytes | BinaryIO) -> tuple[str, int]:
        """Store bytes (or a readable binary file); returns (digest, size).  Idempotent."""
        h = hashlib.sha256()
        fd, tmp = tempfile.mkstemp(dir=self.tmp, prefix="blob-")
        size = 0
        try:
            with os.fdopen(fd, "wb") as f:
                if isinstance(data, (bytes, bytearray, memoryview)):
                    h.update(data)
                    f.write(data)
                    size = len(data)
                else:
                    while block := data.read(1 << 20):
                        h.update(block)
                        f.write(block)
                        size += len(block)
                f.flush()
                os.fsync(f.fileno())
            digest = "sha256:" + h.hexdigest()
            final = self.blob_path(digest)
            if os.path.exists(final):
                os.unlink(tmp)
            else:
                os.chmod(tmp, 0o640)
                os.rename(tmp, final)
                fsync_dir(self.blobs)
            return digest, size
        except BaseException:
            if os.path.exists(tmp):
                os.unlink(tmp)
            raise

    def read_range(self, digest: str, offset: int, size: int) -> tuple[bytes, int]:
        """Up to ``size`` bytes of a blob from ``offset``, and the blob's total size."""
        try:
            with open(self.blob_path(digest), "rb") as f:
                total = os.fstat(f.fileno()).st_size
                f.seek(offset)
                return f.read(size), total
        except FileNotFoundError:
            raise ModelNotFound(f"blob {digest} is not in the store") from None

    def verify_blob(self, digest: str) -> None:
        """Raise StoreCorrupt unless the blob exists and its content matches its digest."""
        h = hashlib.sha256()
        try:
            with open(self.blob_path(digest), "rb") as f:
                while block := f.read(1 << 22):
                    h.update(block)
        except FileNotFoundError:
            raise StoreCorrupt(f"blob {digest} is missing from the store",
                               hint="remove the model with 'llmctl rm' and create or import it again") from None
        if "sha256:" + h.hexdigest() != digest:
            raise StoreCorrupt(f"blob {digest} is corrupt (its content does not match its digest)",
                               hint="remove the model with 'llmctl rm' and create or import it again")

    def read_blob(self, digest: str) -> bytes:
        path = self.blob_path(digest)
        try:
            with open(path, "rb") as f:
                data = f.read()
        except FileNotFoundError:
            raise StoreCorrupt(f"blob {digest} is missing from the store",
                               hint="remove the model with 'llmctl rm' and create or import it again") from None
        if "sha256:" + hashlib.sha256(data).hexdigest() != digest:
            raise StoreCorrupt(f"blob {digest} is corrupt (its content does not match its digest)",
                               hint="remove the model with 'llmctl rm' and create or import it again")
        return data

    # -- manifests ------------------------------------------------------------------------
    @staticmethod
    def blob_digests(manifest: dict) -> set[str]:
        return {v["digest"] for v in manifest.values() if isinstance(v, dict) and "digest" in v}

    def _manifest_path(self, name: str, tag: str) -> str:
        return os.path.join(self.manifests, *name.split("/"), tag)

    def write_manifest(self, ref: str, manifest: dict, *, replace: bool = False) -> str:
        """Atomically publish ``manifest`` as ``ref``; all its blobs must already exist."""
        name, tag = parse_ref(ref)
        for d in self.blob_digests(manifest):
            if not self.has_blob(d):
                raise StoreCorrupt(f"manifest for {name}:{tag} names blob {d}, which is not stored")
        data = json.dumps(manifest, sort_keys=True, indent=1).encode()
        path = self._manifest_path(name, tag)
        with self._lock:
            if os.path.exists(path) and not replace:
                raise AlreadyExists(f"model {name}:{tag} already exists",
                                    hint="choose another name, or 'llmctl rm' the old one first")
            os.makedirs(os.path.dirname(path), mode=0o750, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=self.tmp, prefix="manifest-")
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.chmod(tmp, 0o640)
            os.rename(tmp, path)
            fsync_dir(os.path.dirname(path))
        return "sha256:" + hashlib.sha256(data).hexdigest()

    def get(self, ref: str) -> tuple[str, dict, str]:
        """-> (canonical 'name:tag', manifest, digest).  Raises ModelNotFound."""
        name, tag = parse_ref(ref)
        path = self._manifest_path(name, tag)
        try:
            with open(path, "rb") as f:
                data = f.read()
        except FileNotFoundError:
            raise ModelNotFound(f"model {name}:{tag} is not in the store") from None
        try:
            man = json.loads(data)
        except ValueError:
            raise StoreCorrupt(f"manifest of {name}:{tag} is not valid JSON") from None
        return f"{name}:{tag}", man, "sha256:" + hashlib.sha256(data).hexdigest()

    def _iter_manifests(self) -> Iterator[tuple[str, str, dict]]:
        for dirpath, _, files in os.walk(self.manifests):
            for tag in files:
                path = os.path.join(dirpath, tag)
                name = os.path.relpath(dirpath, self.manifests).replace(os.sep, "/")
                try:
                    with open(path, "rb") as f:
                        data = f.read()
                    man = json.loads(data)
                except (OSError, ValueError):
                    continue
                man["_digest"] = "sha256:" + hashlib.sha256(data).hexdigest()
                man["_mtime"] = os.path.getmtime(path)
                yield f"{name}:{tag}", man["_digest"], man

    def list(self) -> list[tuple[str, str, dict]]:
        """[(name:tag, digest, manifest)] sorted by name."""
        with self._lock:
            return sorted(self._iter_manifests(), key=lambda t: t[0])

    def copy(self, source: str, target: str) -> str:
        """Make ``target`` name the same manifest as ``source``; returns the canonical target."""
        _, man, _ = self.get(source)
        name, tag = parse_ref(target)
        self.write_manifest(f"{name}:{tag}", man, replace=True)
        return f"{name}:{tag}"

    def remove(self, ref: str) -> dict:
        """Delete a manifest; free its blobs that no other manifest names."""
        with self._lock:
            canon, man, digest = self.get(ref)
            name, tag = parse_ref(canon)
            path = self._manifest_path(name, tag)
            os.unlink(path)
            fsync_dir(os.path.dirname(path))
            d = os.path.dirname(path)
            while d != self.manifests and not os.listdir(d):
                os.rmdir(d)
                d = os.path.dirname(d)
            still = set()
            for _, _, other in self._iter_manifests():
                still.update(self.blob_digests(other))
            freed = 0
            for b in self.blob_digests(man) - still:
                p = self.blob_path(b)
                if os.path.exists(p):
                    freed += os.path.getsize(p)
                    os.unlink(p)
            return {"model": canon, "digest": digest, "freed_bytes": freed}

    def discard_unreferenced(self, digests: set[str]) -> None:
        """Delete those of ``digests`` that no manifest names (e.g. raw uploads after import)."""
        with self._lock:
            still = set()
            for _, _, man in self._iter_manifests():
                still.update(self.blob_digests(man))
            for d in set(digests) - still:
                try:
                    os.unlink(self.blob_path(d))
                except FileNotFoundError:
                    pass

    def size(self, manifest: dict) -> int:
        return sum(v.get("size", 0) for v in manifest.values() if isinstance(v, dict) and "digest" in v)


def now_iso() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
