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

import errno
import difflib
import hashlib
import json
import logging
import os
import re
import shutil
import stat
import tempfile
import threading
import time
from typing import BinaryIO, Iterator

from llmctl.errors import AlreadyExists, InvalidArgument, LlmosdError, ModelNotFound, StoreCorrupt

SCHEMA = 1
_NAME = re.compile(r"[a-z0-9][a-z0-9._-]{0,62}(/[a-z0-9][a-z0-9._-]{0,62})?")
_TAG = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]{0,127}")
_DIGEST = re.compile(r"^sha256:[0-9a-f]{64}$")
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_READ_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK   # NONBLOCK: a planted FIFO
_FIX_HINT = "remove the model with 'llmctl rm' and create or import it again"
_LINK_HINT = "the store never follows links out of its own directory: remove that entry by hand"

log = logging.getLogger("llmosd.store")


def shown(text: str, limit: int = 100) -> str:
    """``text`` quoted for an error message, cut to ``limit`` characters (names can be huge)."""
    if len(text) <= limit:
        return repr(text)
    return f"{text[:limit]!r}... ({len(text)} characters)"


def parse_ref(ref: str) -> tuple[str, str]:
    """'name[:tag]' -> (name, tag); tag defaults to 'latest'.  Raises InvalidArgument.

    Nothing is stripped: ' tiny ' is not 'tiny' (a name must be exactly what is stored)."""
    if not isinstance(ref, str):
        raise InvalidArgument("a model name must be a string")
    name, _, tag = ref.partition(":")
    tag = tag or "latest"
    if not _NAME.fullmatch(name) or not _TAG.fullmatch(tag) or ".." in name:
        spaces = ref != ref.strip()
        raise InvalidArgument(f"invalid model name {shown(ref)}",
                              hint="remove the spaces around the name" if spaces else
                              "use lowercase letters, digits, '.', '_', '-' (optionally "
                              "'namespace/name'), then an optional ':tag'")
    return name, tag


def fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _kind(entry: str, dir_fd: int) -> str:
    """What ``entry`` in the directory ``dir_fd`` is: missing, link, dir, file or other."""
    try:
        mode = os.stat(entry, dir_fd=dir_fd, follow_symlinks=False).st_mode
    except FileNotFoundError:
        return "missing"
    return ("link" if stat.S_ISLNK(mode) else "dir" if stat.S_ISDIR(mode) else
            "file" if stat.S_ISREG(mode) else "other")


class _Blocked(Exception):
    """Component ``index`` of a manifest path is not what it should be (``kind`` as _kind)."""

    def __init__(self, index: int, kind: str):
        super().__init__(index, kind)
        self.index, self.kind = index, kind


class Store:
    """Thread-safe access to one store directory.

    The store never leaves its own tree: its three directories must be real directories,
    manifests are reached one path component at a time without following a symbolic link
    (a link is reported as corrupt, and never read, listed or deleted through), and blobs
    are opened with O_NOFOLLOW.  Error messages name models and digests, never store paths.
    """

    def __init__(self, root: str):
        self.root = root
        self.blobs = os.path.join(root, "blobs")
        self.manifests = os.path.join(root, "manifests")
        self.tmp = os.path.join(root, "tmp")
        os.makedirs(root, mode=0o750, exist_ok=True)
        for d in (self.blobs, self.manifests, self.tmp):
            try:
                os.mkdir(d, 0o750)
            except FileExistsError:
                pass
            mode = os.lstat(d).st_mode
            if stat.S_ISLNK(mode) or not stat.S_ISDIR(mode):
                what = "a symbolic link" if stat.S_ISLNK(mode) else "not a directory"
                raise StoreCorrupt(f"store directory {d} is {what}; the store never follows links "
                                   "out of its own tree",
                                   hint=f"move {d} aside (its target is left alone) and start again")
        self._lock = threading.RLock()
        self._warned: set[str] = set()

    def _warn_once(self, entry: str, why: str) -> None:
        if entry not in self._warned:
            self._warned.add(entry)
            log.warning("store: skipping manifest entry %s: %s", shown(entry), why)

    # -- recovery -------------------------------------------------------------------------
    def recover(self) -> dict:
        """Start-up only (nothing else may be writing): drop temp files, orphan blobs and
        symbolic links among the blobs.  A link is removed itself, never its target."""
        removed_tmp = orphans = links = 0
        with os.scandir(self.tmp) as entries:
            for e in entries:
                if e.is_dir(follow_symlinks=False):
                    shutil.rmtree(e.path)        # fd-based on Linux: never descends a link
                else:
                    os.unlink(e.path)
                removed_tmp += 1
        referenced = set()
        for _, _, man in self._iter_manifests():
            referenced.update(self.blob_digests(man))
        with os.scandir(self.blobs) as entries:
            for e in entries:
                if e.is_symlink():
                    log.warning("store: removing blob entry %s, a symbolic link", shown(e.name))
                    os.unlink(e.path)
                    links += 1
                elif not e.is_file(follow_symlinks=False):
                    log.warning("store: leaving blob entry %s alone: not a regular file", shown(e.name))
                elif e.name.replace("-", ":", 1) not in referenced:
                    os.unlink(e.path)
                    orphans += 1
        return {"temp_files": removed_tmp, "orphan_blobs": orphans, "links": links}

    # -- blobs ----------------------------------------------------------------------------
    def blob_path(self, digest: str) -> str:
        if not isinstance(digest, str) or not _DIGEST.match(digest):
            raise StoreCorrupt(f"malformed blob digest {shown(str(digest))}")
        return os.path.join(self.blobs, digest.replace(":", "-", 1))

    def has_blob(self, digest: str) -> bool:
        try:
            return stat.S_ISREG(os.lstat(self.blob_path(digest)).st_mode)
        except FileNotFoundError:
            return False

    def _open_blob(self, digest: str) -> BinaryIO:
        """A blob opened for reading, never through a link.  FileNotFoundError when absent;
        StoreCorrupt for a link or anything but a regular file."""
        try:
            fd = os.open(self.blob_path(digest), _READ_FLAGS)
        except OSError as e:
            if e.errno == errno.ELOOP:
                raise StoreCorrupt(f"blob {digest} is a symbolic link", hint=_LINK_HINT) from None
            raise
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            os.close(fd)
            raise StoreCorrupt(f"blob {digest} is not a regular file", hint=_LINK_HINT)
        return os.fdopen(fd, "rb")

    def put_blob(self, data: bytes | BinaryIO) -> tuple[str, int]:
        """Store bytes (or a readable binary file); returns (digest, size).  Idempotent."""
        h = hashlib.sha256()
        fd, tmp = tempfile.mkstemp(dir=self.tmp, prefix="blob-")   # O_EXCL | O_NOFOLLOW
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
                os.fchmod(f.fileno(), 0o640)
                os.fsync(f.fileno())
            digest = "sha256:" + h.hexdigest()
            if self.has_blob(digest):
                os.unlink(tmp)
            else:
                os.rename(tmp, self.blob_path(digest))   # replaces a stray link itself
                fsync_dir(self.blobs)
            return digest, size
        except BaseException:
            if os.path.lexists(tmp):
                os.unlink(tmp)
            raise

    def read_range(self, digest: str, offset: int, size: int) -> tuple[bytes, int]:
        """Up to ``size`` bytes of a blob from ``offset``, and the blob's total size."""
        try:
            with self._open_blob(digest) as f:
                total = os.fstat(f.fileno()).st_size
                f.seek(offset)
                return f.read(size), total
        except FileNotFoundError:
            raise ModelNotFound(f"blob {digest} is not in the store") from None

    def verify_blob(self, digest: str) -> None:
        """Raise StoreCorrupt unless the blob exists and its content matches its digest."""
        self._checked_blob(digest, keep=False)

    def read_blob(self, digest: str) -> bytes:
        return self._checked_blob(digest, keep=True)

    def _checked_blob(self, digest: str, keep: bool) -> bytes:
        """The blob's bytes (b"" unless ``keep``), hashed in blocks and checked against its
        digest.  StoreCorrupt when it is missing or does not match."""
        h, blocks = hashlib.sha256(), []
        try:
            with self._open_blob(digest) as f:
                while block := f.read(1 << 22):
                    h.update(block)
                    if keep:
                        blocks.append(block)
        except FileNotFoundError:
            raise StoreCorrupt(f"blob {digest} is missing from the store", hint=_FIX_HINT) from None
        if "sha256:" + h.hexdigest() != digest:
            raise StoreCorrupt(f"blob {digest} is corrupt (its content does not match its digest)",
                               hint=_FIX_HINT)
        return b"".join(blocks)

    def _free_unreferenced(self, digests: set[str]) -> int:
        """Delete those of ``digests`` that no manifest names; returns the bytes freed.
        Caller holds the lock."""
        still = set()
        for _, _, man in self._iter_manifests():
            still.update(self.blob_digests(man))
        freed = 0
        for d in set(digests) - still:
            path = self.blob_path(d)
            try:
                st = os.lstat(path)
                if not stat.S_ISDIR(st.st_mode):
                    os.unlink(path)              # a link itself, never its target
                    freed += st.st_size if stat.S_ISREG(st.st_mode) else 0
            except FileNotFoundError:
                pass
        return freed

    # -- manifests: reaching them without leaving the tree ----------------------------------
    @staticmethod
    def blob_digests(manifest: dict) -> set[str]:
        return {v["digest"] for v in manifest.values() if isinstance(v, dict) and "digest" in v}

    def _manifest_path(self, name: str, tag: str) -> str:
        return os.path.join(self.manifests, *name.split("/"), tag)

    def _open_parent(self, parts: list[str], create: bool = False) -> int:
        """A descriptor of the directory holding ``manifests/parts[0]/.../parts[-1]``, entered
        one component at a time without following links (made as needed if ``create``).
        Raises _Blocked for the first component that is not a real directory."""
        fd = os.open(self.manifests, _DIR_FLAGS)
        try:
            for i, part in enumerate(parts[:-1]):
                if create:
                    try:
                        os.mkdir(part, 0o750, dir_fd=fd)
                    except FileExistsError:
                        pass
                try:
                    sub = os.open(part, _DIR_FLAGS, dir_fd=fd)
                except OSError as e:
                    if e.errno not in (errno.ENOENT, errno.ENOTDIR, errno.ELOOP):
                        raise
                    raise _Blocked(i, _kind(part, fd)) from None
                os.close(fd)
                fd = sub
            return fd
        except BaseException:
            os.close(fd)
            raise

    @staticmethod
    def _blocked_error(name: str, tag: str, parts: list[str], b: _Blocked) -> LlmosdError:
        """The user-facing error for reading ``name:tag`` past a blocked component."""
        if b.kind in ("link", "other"):
            entry = "/".join(parts[:b.index + 1])
            what = "a symbolic link" if b.kind == "link" else "not a regular file or directory"
            return StoreCorrupt(f"the store entry {shown(entry)} (of {name}:{tag}) is {what}",
                                hint=_LINK_HINT)
        return ModelNotFound(f"model {name}:{tag} is not in the store")

    def _read_manifest(self, name: str, tag: str) -> tuple[bytes, float]:
        """The bytes and mtime of manifest ``name:tag``.  ModelNotFound (also when the name
        is a namespace or lies under another model's tag); StoreCorrupt for a link."""
        parts = name.split("/") + [tag]
        try:
            dfd = self._open_parent(parts)
        except _Blocked as b:
            raise self._blocked_error(name, tag, parts, b) from None
        try:
            try:
                fd = os.open(tag, _READ_FLAGS, dir_fd=dfd)
            except OSError as e:
                if e.errno not in (errno.ENOENT, errno.ELOOP, errno.ENOTDIR):
                    raise
                blocked = _Blocked(len(parts) - 1, _kind(tag, dfd))
                raise self._blocked_error(name, tag, parts, blocked) from None
        finally:
            os.close(dfd)
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            os.close(fd)                          # a directory: name:tag is others' namespace
            kind = "missing" if stat.S_ISDIR(st.st_mode) else "other"
            raise self._blocked_error(name, tag, parts, _Blocked(len(parts) - 1, kind))
        with os.fdopen(fd, "rb") as f:
            return f.read(), st.st_mtime

    @staticmethod
    def _encode(manifest: dict) -> bytes:
        return json.dumps(manifest, sort_keys=True, indent=1).encode()

    # -- manifests ------------------------------------------------------------------------
    def write_manifest(self, ref: str, manifest: dict, *, replace: bool = False) -> str:
        """Atomically publish ``manifest`` as ``ref``; all its blobs must already exist.
        Replacing a manifest frees the old one's blobs that no other manifest names.

        A name that clashes with the layout (``dir/sub:x`` when ``dir:sub`` exists, or the
        reverse) is refused with InvalidArgument naming the other model."""
        name, tag = parse_ref(ref)
        for d in self.blob_digests(manifest):
            if not self.has_blob(d):
                raise StoreCorrupt(f"manifest for {name}:{tag} names blob {d}, which is not stored")
        data = self._encode(manifest)
        parts = name.split("/") + [tag]
        with self._lock:
            try:
                dfd = self._open_parent(parts, create=True)
            except _Blocked as b:
                raise self._clash_error(name, tag, parts, b) from None
            try:
                kind = _kind(tag, dfd)
                self._check_target(name, tag, parts, kind, replace)
                old = self._old_blobs(name, tag) if kind == "file" else set()
                fd, tmp = tempfile.mkstemp(dir=self.tmp, prefix="manifest-")   # O_EXCL | O_NOFOLLOW
                try:
                    with os.fdopen(fd, "wb") as f:
                        f.write(data)
                        f.flush()
                        os.fchmod(f.fileno(), 0o640)
                        os.fsync(f.fileno())
                    os.rename(tmp, tag, dst_dir_fd=dfd)
                except BaseException:
                    if os.path.lexists(tmp):
                        os.unlink(tmp)
                    raise
                os.fsync(dfd)
            finally:
                os.close(dfd)
            if old:
                self._free_unreferenced(old)
        return "sha256:" + hashlib.sha256(data).hexdigest()

    def check_free(self, ref: str, *, replace: bool = False) -> None:
        """Raise what ``write_manifest(ref, ..., replace=replace)`` would for the name alone
        (AlreadyExists, a clash with another model, a link), writing nothing: for checking a
        name before long work (create, import) rather than when publishing its result."""
        name, tag = parse_ref(ref)
        parts = name.split("/") + [tag]
        try:
            dfd = self._open_parent(parts)
        except _Blocked as b:
            if b.kind == "missing":
                return
            raise self._clash_error(name, tag, parts, b) from None
        try:
            kind = _kind(tag, dfd)
        finally:
            os.close(dfd)
        self._check_target(name, tag, parts, kind, replace)

    def _check_target(self, name: str, tag: str, parts: list[str], kind: str, replace: bool) -> None:
        """Whether a manifest may be written where one of ``kind`` (as _kind) now is."""
        if kind not in ("missing", "file"):
            raise self._clash_error(name, tag, parts, _Blocked(len(parts) - 1, kind))
        if kind == "file" and not replace:
            raise AlreadyExists(f"model {name}:{tag} already exists",
                                hint="choose another name, or 'llmctl rm' the old one first")

    def _old_blobs(self, name: str, tag: str) -> set[str]:
        """The blobs the manifest being replaced names (none if it cannot be read)."""
        try:
            man = json.loads(self._read_manifest(name, tag)[0])
            return self.blob_digests(man) if isinstance(man, dict) else set()
        except (LlmosdError, ValueError):
            return set()

    @staticmethod
    def _clash_error(name: str, tag: str, parts: list[str], b: _Blocked) -> LlmosdError:
        """The user-facing error for writing ``name:tag`` over a component in the way."""
        if b.kind == "file" and b.index > 0:      # a directory is needed where a tag file is
            other = "/".join(parts[:b.index]) + ":" + parts[b.index]
            return InvalidArgument(f"model name {name}:{tag} clashes with model {other} "
                                   f"(the store cannot hold both)",
                                   hint=f"choose another name, or remove {other} first")
        if b.kind == "dir" and b.index == len(parts) - 1:   # a tag where a namespace is
            space = "/".join(parts)
            return InvalidArgument(f"model name {name}:{tag} clashes with the models named "
                                   f"{space}:TAG (the store cannot hold both)",
                                   hint=f"choose another name or tag, or remove the {space} models first")
        entry = "/".join(parts[:b.index + 1])
        what = "a symbolic link" if b.kind == "link" else f"in the way ({b.kind})"
        return StoreCorrupt(f"the store entry {shown(entry)} (for {name}:{tag}) is {what}",
                            hint=_LINK_HINT)

    def get(self, ref: str) -> tuple[str, dict, str]:
        """-> (canonical 'name:tag', manifest, digest).  Raises ModelNotFound."""
        name, tag = parse_ref(ref)
        data, _ = self._read_manifest(name, tag)
        try:
            man = json.loads(data)
        except ValueError:
            man = None
        if not isinstance(man, dict):
            raise StoreCorrupt(f"manifest of {name}:{tag} is not valid JSON", hint=_FIX_HINT)
        return f"{name}:{tag}", man, "sha256:" + hashlib.sha256(data).hexdigest()

    def _iter_manifests(self) -> Iterator[tuple[str, str, dict]]:
        """Every readable manifest; links and other strays are skipped (warned about once)."""
        for dirpath, dirs, files in os.walk(self.manifests):          # never descends a link
            rel = os.path.relpath(dirpath, self.manifests).replace(os.sep, "/")
            for d in dirs:
                if os.path.islink(os.path.join(dirpath, d)):
                    self._warn_once(d if rel == "." else f"{rel}/{d}", "a symbolic link")
            for tag in files:
                if rel == ".":
                    self._warn_once(tag, "a file outside any model's directory")
                    continue
                ref = f"{rel}:{tag}"
                try:
                    name, tag = parse_ref(ref)
                    data, mtime = self._read_manifest(name, tag)
                    man = json.loads(data)
                    if not isinstance(man, dict):
                        raise ValueError("not a JSON object")
                except (LlmosdError, OSError, ValueError) as e:
                    self._warn_once(ref, str(e))
                    continue
                man["_digest"] = "sha256:" + hashlib.sha256(data).hexdigest()
                man["_mtime"] = mtime
                yield f"{name}:{tag}", man["_digest"], man

    def find(self, ref: str) -> tuple[str, dict, str]:
        """``get`` for a name a user typed: a mistyped one gets "did you mean" in its hint."""
        try:
            return self.get(ref)
        except ModelNotFound as e:
            canon = "%s:%s" % parse_ref(ref)
            close = difflib.get_close_matches(canon, [r for r, _, _ in self.list()], n=1, cutoff=0.6)
            hint = (f"did you mean {close[0].removesuffix(':latest')}? ('llmctl ls' lists the models)"
                    if close else ModelNotFound.default_hint)
            raise ModelNotFound(e.message, hint=hint) from None

    def list(self) -> list[tuple[str, str, dict]]:
        """[(name:tag, digest, manifest)] sorted by name."""
        with self._lock:
            return sorted(self._iter_manifests(), key=lambda t: t[0])

    def copy(self, source: str, target: str, *, replace: bool = False) -> str:
        """Make ``target`` name the same manifest as ``source``; returns the canonical target.

        A target that already names the same content is left as it is; one that names other
        content is AlreadyExists unless ``replace`` (then its blobs no other model uses go)."""
        with self._lock:
            _, man, _ = self.get(source)
            name, tag = parse_ref(target)
            canon = f"{name}:{tag}"
            try:
                _, _, old = self.get(canon)
            except ModelNotFound:
                old = None
            if old == "sha256:" + hashlib.sha256(self._encode(man)).hexdigest():
                return canon
            if old is not None and not replace:
                raise AlreadyExists(f"model {canon} already exists (a different model)",
                                    hint="add --force to replace it, or choose another name")
            self.write_manifest(canon, man, replace=True)
            return canon

    def remove(self, ref: str) -> dict:
        """Delete a manifest; free its blobs that no other manifest names."""
        with self._lock:
            canon, man, digest = self.get(ref)
            name, tag = parse_ref(canon)
            parts = name.split("/") + [tag]
            dfd = self._open_parent(parts)      # get() just walked it: no link on the way
            try:
                os.unlink(tag, dir_fd=dfd)
                os.fsync(dfd)
            finally:
                os.close(dfd)
            for depth in range(len(parts) - 1, 0, -1):    # drop directories left empty
                pfd = self._open_parent(parts[:depth])
                try:
                    os.rmdir(parts[depth - 1], dir_fd=pfd)
                except OSError:
                    break
                finally:
                    os.close(pfd)
            freed = self._free_unreferenced(self.blob_digests(man))
            return {"model": canon, "digest": digest, "freed_bytes": freed}

    def discard_unreferenced(self, digests: set[str]) -> None:
        """Delete those of ``digests`` that no manifest names (e.g. raw uploads after import)."""
        with self._lock:
            self._free_unreferenced(digests)

    def size(self, manifest: dict) -> int:
        return sum(v.get("size", 0) for v in manifest.values() if isinstance(v, dict) and "digest" in v)


def now_iso() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
