"""Store writes off the control loop: publishing a manifest, tag and rm fsync the disk, so the
loop hands them to one writer thread and replies when they are done.

One thread and a FIFO queue: writes happen in the order the loop accepted them, one at a time.
Each result comes back to the loop through ``post`` as ``done(result, error)``.  Without a
``post`` (tests, tools, worker processes) a write runs at once on the caller's thread and
``done`` is called before ``submit`` returns: the same contract, synchronously.
"""
from __future__ import annotations

import logging
import queue
import threading
from typing import Callable

from llmctl.errors import LlmosdError

log = logging.getLogger("llmosd.store")

Done = Callable[[object, Exception | None], None]


class StoreWriter:
    def __init__(self, post: Callable | None = None):
        self.post = post
        self.pending = 0                  # submitted, ``done`` not yet run (loop-side count)
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._thread: threading.Thread | None = None

    def submit(self, fn: Callable, done: Done, *args) -> None:
        """Run ``fn(*args)`` after the writes submitted before it; then ``done(result, None)``
        or ``done(None, exception)`` on the caller's (the loop's) thread."""
        if self.post is None:
            result, error = _call(fn, args)
            done(result, error)
            return
        self.pending += 1
        self._queue.put((fn, args, done))
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="store-writer", daemon=True)
            self._thread.start()

    def idle(self) -> bool:
        """No write is queued or running (shutdown waits for this)."""
        return self.pending == 0

    def _run(self) -> None:
        while True:
            fn, args, done = self._queue.get()
            result, error = _call(fn, args)
            self.post(self._done, done, result, error)

    def _done(self, done: Done, result, error) -> None:
        self.pending -= 1
        done(result, error)


def _call(fn: Callable, args: tuple) -> tuple[object, Exception | None]:
    try:
        return fn(*args), None
    except Exception as e:            # handed to ``done``: the writer thread carries on
        if not isinstance(e, LlmosdError):     # a refusal is an answer; anything else is news
            log.warning("store write %s failed: %r", getattr(fn, "__qualname__", fn), e)
        return None, e
