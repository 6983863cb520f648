"""An engine's one-shot calls (score, embed, classify): a FIFO of which one at most is in
progress.  Engine thread only; no torch here (the runner's ``start_call`` holds the tensors).

A call in progress holds its own working memory (an evaluation's KV cache, outside the paged
pool and the memory ledger), so only the oldest call runs: the others wait as plain ``Call``
values, holding nothing, until it ends.  ``step()`` advances it by one slice (one forward of
at most ``max_prefill_tokens`` tokens), which the engine runs once per step beside its
decodes; its answer (``end`` with the result, or ``error``) goes out through ``emit``.  Past
``max_waiting`` calls a new one fails with Busy.
"""
from __future__ import annotations

from collections import deque
from typing import Callable, Hashable

from llmctl.errors import Busy, LlmosdError
from llmosd.serve.request import Call


class CallQueue:
    def __init__(self, start: Callable, emit: Callable, *, max_waiting: int, slice_tokens: int):
        """``start(call, slice_tokens)``: the runner's ``start_call`` (a task with ``step()``,
        ``done``, ``result``, ``close()``); ``emit(key, kind, body)``: the engine's."""
        self._start, self.emit = start, emit
        self.max_waiting, self.slice_tokens = max(1, max_waiting), slice_tokens
        self.queue: deque[Call] = deque()      # waiting calls, FIFO: no state of their own
        self.current: tuple[Call, object] | None = None   # (call, its task) in progress

    def __len__(self) -> int:
        return len(self.queue) + (self.current is not None)

    def submit(self, call: Call) -> None:
        """Queue ``call``; Busy (emitted) past ``max_waiting``."""
        if len(self) >= self.max_waiting:
            self.emit(call.key, "error", Busy(
                f"{len(self)} score/embed/classify requests wait on this instance already",
                hint="retry when some have finished").to_wire())
            return
        self.queue.append(call)

    def cancel(self, key: Hashable, error: LlmosdError) -> bool:
        """Fail the call ``key`` with ``error`` (its task, if it runs, abandoned); False if
        it is not here."""
        if self.current is not None and self.current[0].key == key:
            self.current[1].close()
            self.current = None
        else:
            call = next((c for c in self.queue if c.key == key), None)
            if call is None:
                return False
            self.queue.remove(call)
        self.emit(key, "error", error.to_wire())
        return True

    def step(self) -> bool:
        """Advance the call in progress by one slice, starting the oldest waiting one if none
        runs; False when there is no call."""
        if self.current is None:
            if not self.queue:
                return False
            call = self.queue.popleft()
            try:
                self.current = (call, self._start(call, self.slice_tokens))
            except LlmosdError as e:
                self.emit(call.key, "error", e.to_wire())
                return True
        call, task = self.current
        try:
            task.step()
        except LlmosdError as e:
            self.current = None
            self.emit(call.key, "error", e.to_wire())
            return True
        if task.done:
            self.current = None
            self.emit(call.key, "end", task.result)
        return True

    def fail_all(self, error: LlmosdError) -> None:
        """Every call fails with ``error`` (the engine stops or crashed)."""
        if self.current is not None:
            self.current[1].close()
            self.queue.appendleft(self.current[0])
            self.current = None
        while self.queue:
            self.emit(self.queue.popleft().key, "error", error.to_wire())

