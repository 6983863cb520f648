"""The model store: content-addressed blobs plus ``name:tag`` manifests.

Layout under ``root``::

    blobs/sha256-<hex>        immutable content (weights, tokenizer, config)
    manifests/<name>/<tag>    JSON naming the blobs of one model, with lineage
    tmp/                      writes in progress; emptied at start-up

Every write goes temp file -> fsync -> rename -> fsync(dir), so a crash leaves either the old
file or the new one, never half of one.  A manifest is written only after all of its blobs,
so a model is listed only once it is complete.  The model's digest is the sha256 of its
manifest's bytes, which do not contain the name: ``tag`` gives a copy the same digest.

The store keeps an index in memory (model -> digest and manifest; blob -> the models naming
it), built from the manifests once (at ``recover``, or at first use) and updated by each write
of this process, so listing and reference checks never read the disk.  Only one process
writes manifests (the daemon; job workers write blobs only).
"""
from __future__ import annotations

import difflib
import errno
import hashlib
import json
import logging
import os
import re
import shutil
import stat
import tempfile
import threading
from typing import BinaryIO, Callable, Collection, Iterator

from llmctl.errors import AlreadyExists, InvalidArgument, LlmosdError, ModelNotFound, StoreCorrupt
from llmosd.store.index import Index, blob_digests
from llmosd.store.manifest import base_of
from llmosd.store.paths import (LINK_HINT, own_dir, READ_FLAGS, Blocked, blocked_error, clash_error,
                                commit_file, fsync_dir, kind, open_parent, read_entry, shown)
from llmosd.store.writer import StoreWriter

__all__ = ["Store", "parse_ref", "canonical", "shown", "fsync_dir"]

_NAME = re.compile(r"[a-z0-9][a-z0-9._-]{0,62}(/[a-z0-9][a-z0-9._-]{0,62})?")
_TAG = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]{0,127}")
_DIGEST = re.compile(r"^sha256:[0-9a-f]{64}$")
_FIX_HINT = "remove the model with 'llmctl rm' and create or import it again"

log = logging.getLogger("llmosd.store")


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


def canonical(ref: str) -> str:
    """'name[:tag]' -> 'name:tag', the one spelling a model has.  Raises InvalidArgument."""
    return "%s:%s" % parse_ref(ref)


def _parts(ref: str) -> tuple[str, str, list[str]]:
    """(name, tag, path components under manifests/) of a valid ref."""
    name, tag = parse_ref(ref)
    return name, tag, name.split("/") + [tag]


def _digest_of(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def _sha256_of(f: BinaryIO, keep: bool) -> tuple[str, bytes]:
    """(digest, bytes read: b"" unless ``keep``) of an open file, read in 4 MiB blocks."""
    h, blocks = hashlib.sha256(), []
    while block := f.read(1 << 22):
        h.update(block)
        if keep:
            blocks.append(block)
    return "sha256:" + h.hexdigest(), b"".join(blocks)


def _identity(st: os.stat_result) -> tuple[int, int, int, int, int]:
    """What changes whenever a file's content may have: any write moves mtime and ctime, a
    ``touch`` or ``utime`` back moves ctime, a replacement changes the inode."""
    return st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns


class Store:
    """Thread-safe access to one store directory.

    The store never leaves its own tree: its three directories must be real directories,
    manifests are reached one path component at a time without following a symbolic link
    (a link is reported as corrupt, and never read, listed or deleted through), and blobs
    are opened with O_NOFOLLOW.  Error messages name models and digests, never store paths.

    ``writer`` runs the writes that callers on the control loop must not wait for; by default
    it runs them at once (set a ``StoreWriter(post)`` to move them onto its thread).
    """

    def __init__(self, root: str):
        self.root = root
        self.blobs = os.path.join(root, "blobs")
        self.manifests = os.path.join(root, "manifests")
        self.tmp = os.path.join(root, "tmp")
        os.makedirs(root, mode=0o750, exist_ok=True)
        for d in (self.blobs, self.manifests, self.tmp):
            own_dir(d, "store directory")
        self._lock = threading.RLock()          # one disk write at a time
        self.index = Index()                    # read from the disk at ``recover`` or first use
        self._warned: set[str] = set()
        # digest -> _identity of the file when it last matched its digest (verify_blob);
        # engine and loader threads verify concurrently.
        self._verified: dict[str, tuple] = {}
        self._verified_lock = threading.Lock()
        self.writer = StoreWriter()
        # Blobs that something besides the manifests needs (job records: their data files and
        # parents): recover() and the clean-ups keep them.  Called from any thread.
        self.extra_refs: Callable[[], Collection[str]] = frozenset

    def _warn_once(self, entry: str, why: str) -> None:
        if entry not in self._warned:
            self._warned.add(entry)
            log.warning("store: skipping manifest entry %s: %s", shown(entry), why)

    # -- recovery -------------------------------------------------------------------------
    def recover(self) -> dict:
        """Start-up only (nothing else may be writing): drop temp files, orphan blobs (those no
        manifest names and no job needs: set ``extra_refs`` first) and symbolic links among the blobs (a link is removed itself, never its target); (re)build
        the index from the manifests."""
        removed_tmp = orphans = links = 0
        with os.scandir(self.tmp) as entries:
            for e in entries:
                if e.is_dir(follow_symlinks=False):
                    shutil.rmtree(e.path)        # fd-based on Linux: never descends a link
                else:
                    os.unlink(e.path)
                removed_tmp += 1
        with self._lock:
            self.index.load(self._iter_manifests())
            kept = self.extra_refs()
            with os.scandir(self.blobs) as entries:
                for e in entries:
                    if e.is_symlink():
                        log.warning("store: removing blob entry %s, a symbolic link", shown(e.name))
                        os.unlink(e.path)
                        links += 1
                    elif not e.is_file(follow_symlinks=False):
                        log.warning("store: leaving blob entry %s alone: not a regular file", shown(e.name))
                    elif not self._kept(e.name.replace("-", ":", 1), kept):
                        os.unlink(e.path)
                        orphans += 1
        return {"temp_files": removed_tmp, "orphan_blobs": orphans, "links": links}

    # -- blobs ----------------------------------------------------------------------------
    def blob_path(self, digest: str) -> str:
        if not isinstance(digest, str) or not _DIGEST.match(digest):
            raise StoreCorrupt(f"malformed blob digest {shown(str(digest))}")
        return os.path.join(self.blobs, digest.replace(":", "-", 1))

    @staticmethod
    def check_digest(digest) -> None:
        """InvalidArgument unless ``digest`` is a well-formed blob digest: for digests a client
        sends (a malformed one is bad input, not a corrupt store)."""
        if not isinstance(digest, str) or not _DIGEST.match(digest):
            raise InvalidArgument(f"malformed blob digest {shown(str(digest))}",
                                  hint="a digest is 'sha256:' and 64 lowercase hex digits")

    def has_blob(self, digest: str) -> bool:
        try:
            return stat.S_ISREG(os.lstat(self.blob_path(digest)).st_mode)
        except FileNotFoundError:
            return False

    def _open_blob(self, digest: str) -> BinaryIO:
        """A blob opened for reading, never through a link.  FileNotFoundError when absent;
        StoreCorrupt for a link or anything but a regular file."""
        try:
            fd = os.open(self.blob_path(digest), READ_FLAGS)
        except OSError as e:
            if e.errno == errno.ELOOP:
                raise StoreCorrupt(f"blob {digest} is a symbolic link", hint=LINK_HINT) from None
            raise
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            os.close(fd)
            raise StoreCorrupt(f"blob {digest} is not a regular file", hint=LINK_HINT)
        return os.fdopen(fd, "rb")

    def put_blob(self, data: bytes | BinaryIO) -> tuple[str, int]:
        """Store bytes (or a readable binary file); returns (digest, size).  Idempotent."""
        h = hashlib.sha256()
        fd, tmp = tempfile.mkstemp(dir=self.tmp, prefix="blob-")   # O_EXCL | O_NOFOLLOW
        f = os.fdopen(fd, "wb")
        size = 0
        try:
            if isinstance(data, (bytes, bytearray, memoryview)):
                h.update(data)
                f.write(data)
                size = len(data)
            else:
                while block := data.read(1 << 20):
                    h.update(block)
                    f.write(block)
                    size += len(block)
        except BaseException:
            f.close()
            os.unlink(tmp)
            raise
        digest = "sha256:" + h.hexdigest()
        if self.has_blob(digest):
            f.close()
            os.unlink(tmp)
        else:
            commit_file(f, tmp, self.blob_path(digest), dir_path=self.blobs)
        return digest, size

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
        self.open_verified(digest).close()

    def open_verified(self, digest: str) -> BinaryIO:
        """The blob opened for reading (never through a link), at offset 0, once its content
        matched its digest; StoreCorrupt if it does not.  Hashed once per Store: while the
        file keeps the ``_identity`` it had when it last matched, it is not hashed again; any
        write, touch or replacement changes that, and the next call hashes it.  (``fsck``
        always hashes.)"""
        f = self._checked_open(digest)
        try:
            before = _identity(os.fstat(f.fileno()))
            with self._verified_lock:
                if self._verified.get(digest) == before:
                    return f
            self._check(digest, _sha256_of(f, keep=False)[0])
            if _identity(os.fstat(f.fileno())) == before:      # not changed while read
                with self._verified_lock:
                    self._verified[digest] = before
            f.seek(0)
            return f
        except BaseException:
            f.close()
            raise

    def read_blob(self, digest: str) -> bytes:
        """The blob's bytes, always hashed (they are read anyway) and checked: StoreCorrupt."""
        with self._checked_open(digest) as f:
            got, data = _sha256_of(f, keep=True)
        self._check(digest, got)
        return data

    def _checked_open(self, digest: str) -> BinaryIO:
        """``_open_blob``, a missing blob being StoreCorrupt."""
        try:
            return self._open_blob(digest)
        except FileNotFoundError:
            raise StoreCorrupt(f"blob {digest} is missing from the store", hint=_FIX_HINT) from None

    def _check(self, digest: str, got: str) -> None:
        """StoreCorrupt (and forget it was verified) unless ``got`` is ``digest``."""
        if got != digest:
            with self._verified_lock:
                self._verified.pop(digest, None)
            raise StoreCorrupt(f"blob {digest} is corrupt (its content does not match its digest)",
                               hint=_FIX_HINT)

    def _free_unreferenced(self, digests: set[str]) -> int:
        """Delete those of ``digests`` that no manifest names and no job needs; returns the
        bytes freed.
        Caller holds the lock."""
        freed, kept = 0, self.extra_refs()
        for d in set(digests):
            if self._kept(d, kept):
                continue
            path = self.blob_path(d)
            try:
                st = os.lstat(path)
                if not stat.S_ISDIR(st.st_mode):
                    os.unlink(path)              # a link itself, never its target
                    freed += st.st_size if stat.S_ISREG(st.st_mode) else 0
            except FileNotFoundError:
                pass
        return freed

    def _kept(self, digest: str, extra: Collection[str]) -> bool:
        return self.referenced(digest) or digest in extra

    def discard_unreferenced(self, digests: set[str]) -> None:
        """Delete those of ``digests`` that no manifest names and no job needs (``extra_refs``),
        e.g. raw uploads after import."""
        with self._lock:
            self._free_unreferenced(digests)

    # -- the index --------------------------------------------------------------------------
    blob_digests = staticmethod(blob_digests)

    @staticmethod
    def size(manifest: dict) -> int:
        """The bytes of a model's blobs; for an adapter or classifier on a base only its own
        (adapter, head): its config and tokenizer are the base's, counted there."""
        shared = ("config", "tokenizer") if base_of(manifest) is not None else ()
        return sum(v.get("size", 0) for k, v in manifest.items()
                   if isinstance(v, dict) and "digest" in v and k not in shared)

    @property
    def generation(self) -> int:
        """Grows with every change of what ``list`` returns."""
        return self.index.generation

    def _loaded(self) -> Index:
        if not self.index.loaded:
            with self._lock:
                if not self.index.loaded:
                    self.index.load(self._iter_manifests())
        return self.index

    def _indexed(self, ref: str, data: bytes | None, mtime: float = 0.0) -> None:
        """Record that manifest ``ref`` now holds ``data`` (None: it is gone)."""
        if not self.index.loaded:
            return                              # read from the disk at first use
        if data is None:
            self.index.put(ref, "", None)
            return
        man = json.loads(data)
        man["_digest"], man["_mtime"] = _digest_of(data), mtime
        self.index.put(ref, man["_digest"], man)

    def referenced(self, digest: str) -> bool:
        """Whether a stored manifest names blob ``digest``."""
        return self._loaded().referenced(digest)

    def list(self) -> list[tuple[str, str, dict]]:
        """[(name:tag, digest, manifest)] sorted by name, from the index.  The manifests carry
        ``_digest`` and ``_mtime``; they are the index's own: read them, never change them."""
        return self._loaded().models()

    def leaving(self, ref: str, gone: bool = True) -> None:
        """Mark model ``ref`` as being removed (``gone``): ``get``, ``find`` and ``list`` no
        longer see it, so nothing starts using a model whose removal was accepted but is still
        queued.  ``gone=False`` clears the mark (the removal is done, or failed)."""
        self.index.leaving(canonical(ref), gone)

    # -- manifests ------------------------------------------------------------------------
    def _manifest_path(self, name: str, tag: str) -> str:
        return os.path.join(self.manifests, *name.split("/"), tag)

    def _read_manifest(self, name: str, tag: str) -> tuple[bytes, float]:
        """The bytes and mtime of manifest ``name:tag``.  ModelNotFound (also when the name
        is a namespace or lies under another model's tag); StoreCorrupt for a link."""
        parts = name.split("/") + [tag]
        return read_entry(self.manifests, parts, lambda b: blocked_error(name, tag, parts, b))

    @staticmethod
    def _encode(manifest: dict) -> bytes:
        return json.dumps(manifest, sort_keys=True, indent=1).encode()

    def write_manifest(self, ref: str, manifest: dict, *, replace: bool = False) -> str:
        """Atomically publish ``manifest`` as ``ref``; all its blobs must already exist.
        Replacing a manifest frees the old one's blobs that no other manifest names.

        A name that clashes with the layout (``dir/sub:x`` when ``dir:sub`` exists, or the
        reverse) is refused with InvalidArgument naming the other model."""
        name, tag, parts = _parts(ref)
        for d in self.blob_digests(manifest):
            if not self.has_blob(d):
                raise StoreCorrupt(f"manifest for {name}:{tag} names blob {d}, which is not stored")
        data = self._encode(manifest)
        with self._lock:
            try:
                dfd = open_parent(self.manifests, parts, create=True)
            except Blocked as b:
                raise clash_error(name, tag, parts, b) from None
            try:
                what = kind(tag, dfd)
                self._check_target(name, tag, parts, what, replace)
                old = self._old_blobs(name, tag) if what == "file" else set()
                fd, tmp = tempfile.mkstemp(dir=self.tmp, prefix="manifest-")   # O_EXCL | O_NOFOLLOW
                f = os.fdopen(fd, "wb")
                try:
                    f.write(data)
                except BaseException:
                    f.close()
                    os.unlink(tmp)
                    raise
                commit_file(f, tmp, tag, dir_fd=dfd)
                mtime = os.stat(tag, dir_fd=dfd, follow_symlinks=False).st_mtime
            finally:
                os.close(dfd)
            self._indexed(f"{name}:{tag}", data, mtime)
            if old:
                self._free_unreferenced(old)
        return _digest_of(data)

    def check_free(self, ref: str, *, replace: bool = False) -> None:
        """Raise what ``write_manifest(ref, ..., replace=replace)`` would for the name alone
        (AlreadyExists, a clash with another model, a link), writing nothing: for checking a
        name before long work (create, import) rather than when publishing its result."""
        name, tag, parts = _parts(ref)
        try:
            dfd = open_parent(self.manifests, parts)
        except Blocked as b:
            if b.kind == "missing":
                return
            raise clash_error(name, tag, parts, b) from None
        try:
            what = kind(tag, dfd)
        finally:
            os.close(dfd)
        self._check_target(name, tag, parts, what, replace)

    @staticmethod
    def _check_target(name: str, tag: str, parts: list[str], what: str, replace: bool) -> None:
        """Whether a manifest may be written where one of kind ``what`` now is."""
        if what not in ("missing", "file"):
            raise clash_error(name, tag, parts, Blocked(len(parts) - 1, what))
        if what == "file" and not replace:
            raise AlreadyExists(f"model {name}:{tag} already exists",
                                hint="choose another name, or 'llmctl rm' the old one first")

    def _old_blobs(self, name: str, tag: str) -> set[str]:
        """The blobs the manifest being replaced names (none if it cannot be read)."""
        try:
            man = json.loads(self._read_manifest(name, tag)[0])
            return self.blob_digests(man) if isinstance(man, dict) else set()
        except (LlmosdError, ValueError):
            return set()

    def get(self, ref: str) -> tuple[str, dict, str]:
        """-> (canonical 'name:tag', manifest, digest), read from the disk.  Raises
        ModelNotFound (also for a model whose removal is under way)."""
        canon = canonical(ref)
        if self.index.is_leaving(canon):
            raise ModelNotFound(f"model {canon} is not in the store (it is being removed)")
        return self._get(canon)

    def _get(self, ref: str) -> tuple[str, dict, str]:
        name, tag = parse_ref(ref)
        data, _ = self._read_manifest(name, tag)
        try:
            man = json.loads(data)
        except ValueError:
            man = None
        if not isinstance(man, dict):
            raise StoreCorrupt(f"manifest of {name}:{tag} is not valid JSON", hint=_FIX_HINT)
        return f"{name}:{tag}", man, _digest_of(data)

    def _iter_manifests(self) -> Iterator[tuple[str, str, dict]]:
        """Every readable manifest on disk; links and other strays are skipped (warned about
        once).  Each manifest carries ``_digest`` and ``_mtime``."""
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
                man["_digest"] = _digest_of(data)
                man["_mtime"] = mtime
                yield f"{name}:{tag}", man["_digest"], man

    def find(self, ref: str) -> tuple[str, dict, str]:
        """``get`` for a name a user typed: a mistyped one gets "did you mean" in its hint."""
        try:
            return self.get(ref)
        except ModelNotFound as e:
            close = difflib.get_close_matches(canonical(ref), [r for r, _, _ in self.list()],
                                              n=1, cutoff=0.6)
            hint = (f"did you mean {close[0].removesuffix(':latest')}? ('llmctl ls' lists the models)"
                    if close else ModelNotFound.default_hint)
            raise ModelNotFound(e.message, hint=hint) from None

    def copy(self, source: str, target: str, *, replace: bool = False, owner: int | None = None) -> str:
        """Make ``target`` name the same manifest as ``source`` (owned by ``owner`` if given and
        the source has another recorded owner: a tag is its maker's); returns the canonical target.

        A target that already names the same content is left as it is; one that names other
        content is AlreadyExists unless ``replace`` (then its blobs no other model uses go)."""
        with self._lock:
            _, man, _ = self._get(source)
            if owner is not None and isinstance(man.get("owner"), int) and man["owner"] != owner:
                man = {**man, "owner": owner}      # someone else's model: the new name is theirs
            canon = canonical(target)
            try:
                _, _, old = self._get(canon)
            except ModelNotFound:
                old = None
            if old == _digest_of(self._encode(man)):
                return canon
            if old is not None and not replace:
                raise AlreadyExists(f"model {canon} already exists (a different model)",
                                    hint="add --force to replace it, or choose another name")
            self.write_manifest(canon, man, replace=True)
            return canon

    def remove(self, ref: str) -> dict:
        """Delete a manifest; free its blobs that no other manifest names."""
        with self._lock:
            canon, man, digest = self._get(ref)
            _, _, parts = _parts(canon)
            dfd = open_parent(self.manifests, parts)     # _get() just walked it: no link on the way
            try:
                os.unlink(parts[-1], dir_fd=dfd)
                os.fsync(dfd)
            finally:
                os.close(dfd)
            self._indexed(canon, None)
            for depth in range(len(parts) - 1, 0, -1):    # drop directories left empty
                pfd = open_parent(self.manifests, parts[:depth])
                try:
                    os.rmdir(parts[depth - 1], dir_fd=pfd)
                except OSError:
                    break
                finally:
                    os.close(pfd)
            freed = self._free_unreferenced(self.blob_digests(man))
            return {"model": canon, "digest": digest, "freed_bytes": freed}
