"""The daemon's desired state: which models are loaded, so that after kill -9 or a reboot the
daemon comes back as it was.  ``<state_dir>/desired.json``::

    {"version": 1, "instances": [{"model": "tiny:latest", "digest": "sha256:...",
      "device": "cpu", "uid": 1000, "pinned": true, "keep_alive": 300.0, "priority": 0,
      "dtype": "float32", "quant": "int8"}, ...]}

(``dtype`` and ``quant``, issue 13: the weight options it was loaded with; older files lack
them and load with the daemon's.)

An instance is desired once its load is done (ready, busy, or swapped out to the host tier:
still loaded); a load still under way is not (a model whose load kills the daemon must not
bring it down again at every start).  It stops being desired when it is unloaded, evicted or
expires, or fails.  A daemon that stops (SIGTERM) unloads everything but leaves the file as it
was: ``freeze``.

``Desired`` runs on the control loop: ``sync(table)`` compares the table with what was last
written and, when they differ, hands the new bytes to ``write`` (the store writer's ``submit``:
the file is replaced atomically with fsync off the loop; one write at a time, the latest wins).
The instance manager calls ``sync`` on every change it makes and on each keep-alive tick (pins
changed elsewhere are seen within ``TICK_S``).

``restore(manager, store, path)`` at start, after the store's index is loaded: each desired
model is loaded again through the normal admission (budgets apply), with its pin, keep-alive,
priority, owner and weight options; one gone from the store, an adapter, or one whose load fails is logged and
dropped.  No torch here: the manager comes in as a parameter.
"""
from __future__ import annotations

import json
import logging
import os
import tempfile
from typing import Callable

from llmctl.errors import LlmosdError
from llmosd.store.manifest import base_of
from llmosd.store.paths import commit_file

log = logging.getLogger("llmosd.desired")

FILE = "desired.json"
VERSION = 1
LOADED = ("ready", "busy", "swapped")      # states of an instance that is loaded (desired)
LOAD_OPTS = ("dtype", "quant")             # the weight options a load is restored with

Write = Callable[..., None]                # StoreWriter.submit(fn, done, *args)


def entry(inst) -> dict:
    """The desired-state entry of a table instance."""
    out = {"model": inst.model, "digest": inst.digest, "device": inst.device, "uid": inst.uid,
           "pinned": bool(inst.pinned), "keep_alive": float(inst.keep_alive),
           "priority": int(inst.priority)}
    for k, v in (getattr(inst, "load_opts", None) or {}).items():
        if k in LOAD_OPTS and isinstance(v, str):
            out[k] = v
    return out


def _key(e: dict) -> tuple[str, str]:
    return e["model"], e["digest"]


def snapshot(table, pending: dict) -> list[dict]:
    """The loaded instances of ``table`` (by model, digest) plus ``pending``'s entries (loads
    being restored: still desired until they are done or failed)."""
    out = {_key(e): e for e in pending.values()}
    for inst in table:
        state = getattr(inst.state, "value", inst.state)
        if state in LOADED:
            out[(inst.model, inst.digest)] = entry(inst)
    return [out[k] for k in sorted(out)]


def encode(entries: list[dict]) -> bytes:
    return json.dumps({"version": VERSION, "instances": entries}, sort_keys=True, indent=1).encode()


def read(path: str) -> list[dict]:
    """The entries of the desired-state file (none when it is absent); a file that cannot be
    read or is not one is logged and ignored, and so is each bad entry."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        with os.fdopen(fd, "rb") as f:
            data = json.loads(f.read())
    except FileNotFoundError:
        return []
    except (OSError, ValueError) as e:
        log.warning("desired state %s cannot be read (%s): starting with no model loaded", path, e)
        return []
    items = data.get("instances") if isinstance(data, dict) else None
    if not isinstance(items, list):
        log.warning("desired state %s is not a desired-state file: ignored", path)
        return []
    out = []
    for e in items:
        if checked(e):
            out.append(e)
        else:
            log.warning("desired state: ignoring a bad entry %.200r", e)
    return out


def checked(e) -> bool:
    """Whether ``e`` is a well-formed entry."""
    num = (int, float)
    return (isinstance(e, dict) and isinstance(e.get("model"), str) and isinstance(e.get("digest"), str)
            and isinstance(e.get("pinned"), bool)
            and isinstance(e.get("keep_alive"), num) and not isinstance(e.get("keep_alive"), bool)
            and isinstance(e.get("priority"), int) and not isinstance(e.get("priority"), bool)
            and (e.get("uid") is None or isinstance(e.get("uid"), int))
            and all(e.get(k) is None or isinstance(e.get(k), str) for k in LOAD_OPTS))


def write_file(path: str, data: bytes) -> bytes:
    """Replace ``path`` with ``data`` atomically (temp file, fsync, rename, fsync the directory);
    returns ``data``."""
    d = os.path.dirname(path) or "."
    fd, tmp = tempfile.mkstemp(dir=d, prefix=".desired-")
    f = os.fdopen(fd, "wb")
    try:
        f.write(data)
    except BaseException:
        f.close()
        os.unlink(tmp)
        raise
    commit_file(f, tmp, path, dir_path=d)
    return data


class Desired:
    """The desired state and its file (``path`` None: keeps nothing, the default of an instance
    manager nobody restored)."""

    def __init__(self, path: str | None = None, write: Write | None = None):
        self.path, self.write = path, write
        self.pending: dict[tuple[str, str], dict] = {}   # restores under way
        self.frozen = False
        self._last: list[dict] | None = None             # what the file says (or will)
        self._data: bytes | None = None                  # the newest bytes to write
        self._writing = False

    def sync(self, table) -> None:
        """Write the table's loaded instances if they changed since the last write."""
        if self.path is None or self.frozen:
            return
        entries = snapshot(table, self.pending)
        if entries == self._last:
            return
        self._last, self._data = entries, encode(entries)
        if self._writing:
            return                                       # _written sends the newest bytes
        self._writing = True
        self._submit()

    def _submit(self) -> None:
        if self.write is None:
            try:
                self._written(write_file(self.path, self._data), None)
            except OSError as e:
                self._written(None, e)
            return
        self.write(write_file, self._written, self.path, self._data)

    def _written(self, data: bytes | None, err: Exception | None) -> None:
        if err is not None:
            log.warning("desired state: cannot write %s: %s", self.path, err)
            self._last = None                            # the next sync tries again
        if data != self._data and err is None:
            self._submit()                               # changed again meanwhile
            return
        self._writing = False

    def freeze(self) -> None:
        """The daemon stops: what it unloads now stays desired (the file is left as it is)."""
        self.frozen = True


def restore(manager, store, path: str) -> Desired:
    """Read ``path``, make it ``manager.desired`` and load back what it lists (see the module's
    docstring).  Call once at start, after the store's index is loaded and the job runner is
    wired (admission sees its jobs); loads finish on their loader threads."""
    desired = Desired(path, store.writer.submit)
    manager.desired = desired
    entries = read(path)
    # the important first: pinned, then by priority (admission may not fit them all)
    for e in sorted(entries, key=lambda e: (not e["pinned"], -e["priority"], e["model"])):
        _restore_one(manager, store, desired, e)
    desired.sync(manager.table)       # what was dropped goes from the file now
    return desired


def _restore_one(manager, store, desired: Desired, e: dict) -> None:
    model = e["model"]
    try:
        canon, man, digest = store.get(model)
    except LlmosdError as err:
        log.warning("desired state: not loading %s again: %s", model, err)
        return
    if base_of(man) is not None:
        log.warning("desired state: not loading %s again: it is an adapter", model)
        return
    if digest != e["digest"]:
        log.info("desired state: %s now names another version (%s); loading that", canon, digest)
    if e.get("device") not in (None, manager.mem_device):
        log.info("desired state: %s was on %s; loading it on %s", canon, e["device"], manager.mem_device)
    key = (canon, digest)
    desired.pending[key] = {**e, "model": canon, "digest": digest, "device": manager.mem_device}

    def ready(inst, err):
        desired.pending.pop(key, None)
        if err is not None:
            log.warning("desired state: loading %s again failed: %s", canon, err)
        else:
            log.info("desired state: %s loaded again (instance %d)", canon, inst.id)
        desired.sync(manager.table)
    log.info("desired state: loading %s again (pinned %s, keep-alive %gs, priority %d)", canon,
             e["pinned"], e["keep_alive"], e["priority"])
    opts = {k: e[k] for k in LOAD_OPTS if e.get(k) is not None}
    try:
        manager.acquire(canon, man, digest, e.get("uid"), ready, priority=e["priority"],
                        keep_alive=e["keep_alive"], pin=e["pinned"], **({"load_opts": opts} if opts else {}))
    except LlmosdError as err:            # options this daemon refuses: dropped, as a failed load
        ready(None, err)
