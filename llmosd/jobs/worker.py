"""The worker process's side of a job (this module runs in the worker, never in the daemon).

``main`` runs ``func(spec, store_root, ctl)`` and sends everything back over a pipe:
``("progress", p)``, ``("metrics", m)``, ``("log", text)``, ``("checkpoint", step)``,
``("blob", digest)``, then one of ``("result", manifest)``, ``("stopped", "paused" |
"cancelled")`` or ``("error", {"message", "invalid"}, traceback)``.

Stops are cooperative: SIGUSR1 asks for a pause and SIGTERM for a cancel; the handlers only
set a flag that ``ctl.stop_requested()`` reports between steps (the daemon kills the worker if
it does not stop in time).  The worker dies with the daemon (PR_SET_PDEATHSIG).
"""
from __future__ import annotations

import ctypes
import importlib
import signal
import time
import traceback
from typing import Callable

_STOP: list[str | None] = [None]


def _die_with_parent() -> None:
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGKILL)          # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def _on_signal(signum, frame) -> None:
    # a cancel is never downgraded to a pause
    _STOP[0] = "cancel" if signum == signal.SIGTERM or _STOP[0] == "cancel" else "pause"


class Ctl:
    """What a job function gets as its third argument.  ``ctl(p)`` is ``ctl.progress(p)``
    (create and import call it like that)."""

    def __init__(self, conn, job_id: int, job_dir: str):
        self._conn, self.job_id, self.job_dir = conn, job_id, job_dir

    def __call__(self, p: dict) -> None:
        self.progress(p)

    def progress(self, p: dict) -> None:
        """A stage or message for the client watching (create/import) and ``ps``."""
        self._conn.send(("progress", dict(p)))

    def metrics(self, m: dict) -> None:
        """{step, loss, val_loss?, lr, tokens_per_s, eta_s, time}: kept in metrics.jsonl."""
        m = dict(m)
        m.setdefault("time", time.time())
        self._conn.send(("metrics", m))

    def log(self, text: str) -> None:
        """A line (or lines) for the job's log."""
        self._conn.send(("log", str(text)))

    def checkpoint_saved(self, step: int) -> None:
        """A checkpoint of ``step`` is complete in ``job_dir``: the record notes it."""
        self._conn.send(("checkpoint", int(step)))

    def stop_requested(self) -> str | None:
        """None, "pause" (checkpoint, then raise Paused) or "cancel" (raise Cancelled)."""
        return _STOP[0]


def resolve(func: Callable | str) -> Callable:
    """A job function, given itself or as "package.module:function" (imported here, in the
    worker, so that the daemon never imports what it needs: torch)."""
    if callable(func):
        return func
    module, _, name = func.partition(":")
    return getattr(importlib.import_module(module), name)


def _report_new_blobs(conn) -> None:
    """Tell the daemon of each blob the job adds, so that a job that fails (or whose manifest
    cannot be published) leaves no orphan blobs behind."""
    from llmosd.store.store import Store
    put = Store.put_blob

    def put_blob(self, data):
        digest, size = put(self, data)
        conn.send(("blob", digest))
        return digest, size
    Store.put_blob = put_blob


def main(conn, func: Callable | str, spec: dict, store_root: str, threads: int,
         job_id: int = 0, job_dir: str = "") -> None:
    """The worker's entry point (multiprocessing target)."""
    _die_with_parent()
    signal.signal(signal.SIGINT, signal.SIG_IGN)   # the daemon decides when we stop
    signal.signal(signal.SIGUSR1, _on_signal)
    signal.signal(signal.SIGTERM, _on_signal)
    try:
        _report_new_blobs(conn)
        import torch
        torch.set_num_threads(threads)
        result = resolve(func)(spec, store_root, Ctl(conn, job_id, job_dir))
        conn.send(("result", result))
    except BaseException as e:   # noqa: BLE001 - everything is reported, nothing escapes
        name = type(e).__name__
        if name in ("Paused", "Cancelled") and _STOP[0] is not None:
            conn.send(("stopped", "paused" if name == "Paused" else "cancelled"))
        elif isinstance(e, ValueError):   # bad input the job found: the message is for the user
            conn.send(("error", {"message": str(e), "invalid": True}, traceback.format_exc()))
        else:
            conn.send(("error", {"message": f"{name}: {e}", "invalid": False}, traceback.format_exc()))
    finally:
        conn.close()
