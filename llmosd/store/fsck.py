"""``fsck``: check the whole store against itself, and with ``repair`` remove what nobody needs.

What is checked:

- every manifest (``manifests/<name>/<tag>``): readable JSON, the store's schema, the entries a
  model must have (config, tokenizer, and weights unless it is an adapter on a base), each
  blob entry a well-formed digest and size; an adapter's base present with the weights it was
  made on;
- every blob (``blobs/sha256-<hex>``): re-hashed and compared with its name, its size with what
  the manifests say; blobs that manifests or jobs name but the store lacks;
- what does not belong: orphan blobs (named by no manifest and no job record), temp files
  (``tmp/``), symbolic links and other strays.  Links are reported and never followed.

``repair`` removes, and only removes: orphan blobs, temp files, links among the blobs (the
link itself, never its target) and corrupt blobs (their content is wrong: nobody can use them).
A manifest is user data: a broken one (unreadable, or naming a missing or corrupt blob) is
reported as needing a re-import (or ``llmctl rm``), never deleted.  Orphans and temp files are
removed only when ``busy`` is None (no job writing blobs, no upload open: the daemon says) and
when they are older than ``grace_s`` (a blob a job just wrote, before its manifest), and each
orphan is checked again under the store's lock just before it goes (a manifest published
meanwhile keeps it).

Disk work from start to end: run it on a short thread, never on the control loop.  Pure
store logic, no torch.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import stat
import time
from typing import Callable, Collection

from llmosd.store.manifest import SCHEMA, base_of
from llmosd.store.paths import READ_FLAGS

GRACE_S = 120.0                       # younger orphans and temp files may be work in progress
_BLOB_NAME = re.compile(r"sha256-[0-9a-f]{64}")
_DIGEST = re.compile(r"sha256:[0-9a-f]{64}")
REIMPORT = "needs re-import (or 'llmctl rm' it)"


def problem(kind: str, what: str, detail: str, action: str = "reported") -> dict:
    """One finding: ``kind`` (corrupt_blob, missing_blob, orphan_blob, temp_file, link, stray,
    bad_manifest, broken_model), ``what`` it is about (a model, a digest or a store entry),
    ``detail`` in words, and ``action``: removed, kept (why), or reported / needs re-import."""
    return {"kind": kind, "what": what, "detail": detail, "action": action}


def manifest_problems(man: dict) -> list[str]:
    """What is wrong with a parsed manifest's structure (empty: nothing)."""
    out = []
    if man.get("schema") != SCHEMA:
        out.append(f"schema is {man.get('schema')!r}, not {SCHEMA}")
    base = base_of(man)
    needed = ("config", "tokenizer") + (() if base is not None else ("weights",))
    for key in needed:
        if not isinstance(man.get(key), dict):
            out.append(f"it has no {key} entry")
    if base is not None and not (isinstance(man.get("adapter"), dict) or isinstance(man.get("head"), dict)):
        out.append("it names a base but has neither adapter nor head")
    for key, v in man.items():
        if not isinstance(v, dict) or "digest" not in v:
            continue
        if not isinstance(v["digest"], str) or not _DIGEST.fullmatch(v["digest"]):
            out.append(f"its {key} entry has a malformed digest")
        size = v.get("size")
        if not isinstance(size, int) or isinstance(size, bool) or size < 0:
            out.append(f"its {key} entry has no valid size")
    return out


def hash_file(path: str) -> tuple[str | None, int]:
    """(sha256 digest, size) of the regular file ``path``, opened without following a link;
    (None, 0) when it is not a regular file any more."""
    try:
        fd = os.open(path, READ_FLAGS)
    except OSError:
        return None, 0
    with os.fdopen(fd, "rb") as f:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return None, 0
        h, size = hashlib.sha256(), 0
        while block := f.read(1 << 22):
            h.update(block)
            size += len(block)
    return "sha256:" + h.hexdigest(), size


class Fsck:
    """One run over ``store`` (see the module's docstring); ``run()`` returns the report."""

    def __init__(self, store, *, repair: bool = False, busy: str | None = None,
                 grace_s: float = GRACE_S, now: Callable[[], float] = time.time):
        self.store, self.repair, self.busy, self.grace_s, self.now = store, repair, busy, grace_s, now
        self.problems: list[dict] = []
        self.removed = {"blobs": 0, "bytes": 0, "temp_files": 0, "links": 0}
        self.checked = {"manifests": 0, "blobs": 0, "bytes": 0}
        self.users: dict[str, set[str]] = {}        # blob digest -> models naming it
        self.sizes: dict[tuple[str, str], int] = {}   # (model, digest) -> size its manifest says
        self.models: dict[str, dict] = {}           # name:tag -> manifest (the readable ones)
        self.bad_blobs: dict[str, str] = {}         # digest -> "missing" | "corrupt"

    def run(self) -> dict:
        extra = frozenset(self.store.extra_refs())
        self.check_manifests()
        self.check_blobs(extra)
        self.check_missing(extra)
        self.check_models()
        self.check_tmp()
        left = [p for p in self.problems if p["action"] != "removed"]
        return {"clean": not self.problems, "repair": self.repair, "checked": dict(self.checked),
                "problems": self.problems, "removed": dict(self.removed), "unresolved": len(left),
                "skipped": self.busy if self.repair else None}

    # -- manifests ----------------------------------------------------------------------------
    def check_manifests(self) -> None:
        top = self.store.manifests
        for dirpath, dirs, files in os.walk(top):          # never descends a link
            rel = os.path.relpath(dirpath, top).replace(os.sep, "/")
            for d in list(dirs):
                if os.path.islink(os.path.join(dirpath, d)):
                    entry = d if rel == "." else f"{rel}/{d}"
                    self.problems.append(problem("link", f"manifests/{entry}", "a symbolic link "
                                                 "among the manifests (not followed)", "left alone: remove it by hand"))
            for name in files:
                entry = name if rel == "." else f"{rel}/{name}"
                if rel == ".":
                    self.problems.append(problem("stray", f"manifests/{entry}", "a file outside any "
                                                 "model's directory", "left alone"))
                    continue
                self.check_manifest(f"{rel}:{name}", os.path.join(dirpath, name))

    def check_manifest(self, ref: str, path: str) -> None:
        mode = os.lstat(path).st_mode
        if stat.S_ISLNK(mode) or not stat.S_ISREG(mode):
            what = "a symbolic link (not followed)" if stat.S_ISLNK(mode) else "not a regular file"
            self.problems.append(problem("link" if stat.S_ISLNK(mode) else "stray", ref,
                                         f"the manifest entry is {what}", "left alone: remove it by hand"))
            return
        self.checked["manifests"] += 1
        try:
            fd = os.open(path, READ_FLAGS)
            with os.fdopen(fd, "rb") as f:
                man = json.loads(f.read())
            if not isinstance(man, dict):
                raise ValueError("not a JSON object")
        except (OSError, ValueError) as e:
            self.problems.append(problem("bad_manifest", ref, f"its manifest cannot be read: {e}", REIMPORT))
            return
        wrong = manifest_problems(man)
        if wrong:
            self.problems.append(problem("bad_manifest", ref, "; ".join(wrong), REIMPORT))
        self.models[ref] = man
        for key, v in man.items():
            if isinstance(v, dict) and isinstance(v.get("digest"), str) and _DIGEST.fullmatch(v["digest"]):
                self.users.setdefault(v["digest"], set()).add(ref)
                if isinstance(v.get("size"), int):
                    self.sizes[(ref, v["digest"])] = v["size"]

    # -- blobs --------------------------------------------------------------------------------
    def check_blobs(self, extra: Collection[str]) -> None:
        with os.scandir(self.store.blobs) as entries:
            for e in sorted(entries, key=lambda e: e.name):
                self.check_blob(e, extra)

    def check_blob(self, e: os.DirEntry, extra: Collection[str]) -> None:
        entry = f"blobs/{e.name}"
        if e.is_symlink():
            self._remove(problem("link", entry, "a symbolic link among the blobs (not followed)"),
                         e.path, "links", anyway=True)
            return
        if not e.is_file(follow_symlinks=False):
            self.problems.append(problem("stray", entry, "not a regular file", "left alone: remove it by hand"))
            return
        if not _BLOB_NAME.fullmatch(e.name):
            self._remove(problem("stray", entry, "a file whose name is not a blob digest"), e.path, "blobs")
            return
        digest = e.name.replace("-", ":", 1)
        if digest not in self.users and digest not in extra:
            self._remove(problem("orphan_blob", digest, "no model and no job names it"), e.path, "blobs",
                         digest=digest)
            return
        got, size = hash_file(e.path)
        self.checked["blobs"] += 1
        self.checked["bytes"] += size
        if got != digest:
            self.bad_blobs[digest] = "corrupt"
            self._remove(problem("corrupt_blob", digest, "its content does not match its digest"),
                         e.path, "blobs", anyway=True)
            return
        for (ref, d), said in self.sizes.items():
            if d == digest and said != size:
                self.problems.append(problem("bad_manifest", ref, f"it says blob {digest} has {said} "
                                             f"bytes; it has {size}", REIMPORT))

    def check_missing(self, extra: Collection[str]) -> None:
        for digest in sorted(set(self.users) | set(extra)):
            if digest in self.bad_blobs or self.store.has_blob(digest):
                continue
            self.bad_blobs[digest] = "missing"
            who = sorted(self.users.get(digest, ()))
            self.problems.append(problem("missing_blob", digest, "named by " + (", ".join(who) or "a job")
                                         + " but not in the store", REIMPORT if who else "reported"))

    def check_models(self) -> None:
        """Each model naming a missing or corrupt blob, and each adapter without its base."""
        for ref, man in sorted(self.models.items()):
            bad = sorted((k, v["digest"]) for k, v in man.items() if isinstance(v, dict)
                         and v.get("digest") in self.bad_blobs)
            if bad:
                self.problems.append(problem("broken_model", ref, ", ".join(
                    f"its {k} blob {d} is {self.bad_blobs[d]}" for k, d in bad), REIMPORT))
            base = base_of(man)
            if base is None:
                continue
            bman = self.models.get(_canon(base["model"]))
            if bman is None:
                self.problems.append(problem("broken_model", ref, f"its base {base['model']} is gone",
                                             f"needs its base {base['model']} again (or 'llmctl rm' it)"))
            elif (bman.get("weights") or {}).get("digest") != base.get("weights"):
                self.problems.append(problem("broken_model", ref, f"its base {base['model']} has other "
                                             "weights than it was made on", "needs its original base"))

    # -- temp files ---------------------------------------------------------------------------
    def check_tmp(self) -> None:
        with os.scandir(self.store.tmp) as entries:
            for e in sorted(entries, key=lambda e: e.name):
                self._remove(problem("temp_file", f"tmp/{e.name}", "a write that never finished"),
                             e.path, "temp_files")

    # -- removal ------------------------------------------------------------------------------
    def _remove(self, p: dict, path: str, counter: str, *, anyway: bool = False,
                digest: str | None = None) -> None:
        """Record ``p`` and, repairing, remove ``path`` (never through a link).  ``anyway``:
        useless whatever runs (a link, a corrupt blob); else only when nothing writes (``busy``
        is None) and the entry is older than the grace period; an orphan ``digest`` must still
        be unreferenced under the store's lock."""
        self.problems.append(p)
        if not self.repair:
            return
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            p["action"] = "gone meanwhile"
            return
        if not anyway:
            if self.busy:
                p["action"] = f"kept: {self.busy}"
                return
            if self.now() - st.st_mtime < self.grace_s:
                p["action"] = f"kept: younger than {self.grace_s:g}s (work in progress?)"
                return
        try:
            with self.store._lock:             # one disk write at a time; manifests published meanwhile count
                if digest is not None and self.store._kept(digest, self.store.extra_refs()):
                    p["action"] = "kept: named by a model published meanwhile"
                    return
                if stat.S_ISDIR(st.st_mode):
                    shutil.rmtree(path)        # fd-based on Linux: never descends a link
                else:
                    os.unlink(path)
        except OSError as e:
            p["action"] = f"not removed: {e.strerror or e}"
            return
        p["action"] = "removed"
        self.removed[counter] += 1
        if counter == "blobs" and stat.S_ISREG(st.st_mode):
            self.removed["bytes"] += st.st_size


def _canon(ref: str) -> str:
    return ref if ":" in ref else ref + ":latest"


def fsck(store, *, repair: bool = False, busy: str | None = None, grace_s: float = GRACE_S) -> dict:
    """Check ``store`` (and repair it): the report (see ``Fsck``).  Disk work: off the loop."""
    return Fsck(store, repair=repair, busy=busy, grace_s=grace_s).run()


def summary(report: dict) -> str:
    """One line for the log: what was checked, found and removed."""
    c, r = report["checked"], report["removed"]
    return (f"fsck{' --repair' if report['repair'] else ''}: {c['manifests']} manifest(s), "
            f"{c['blobs']} blob(s) ({c['bytes']} bytes) checked; {len(report['problems'])} problem(s), "
            f"{report['unresolved']} left; removed {r['blobs']} blob(s) ({r['bytes']} bytes), "
            f"{r['temp_files']} temp file(s), {r['links']} link(s)")


__all__ = ["fsck", "Fsck", "summary", "manifest_problems", "hash_file", "GRACE_S"]
