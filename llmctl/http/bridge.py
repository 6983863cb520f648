"""The blocking ``Client`` run on worker threads for the gateway's event loop.

A request takes a connected Client from the ``Pool`` and holds it alone until it is done (a
Client is not thread-safe: it only moves between worker threads while idle, and the thread
pool's hand-off orders memory), then gives it back unless its connection failed.  A stream
reads one chunk per ``next()``, only when the HTTP side asks for it: nothing is read ahead of
a slow HTTP reader, so the daemon's flow control (credits per chunk sent) holds its engine
back instead of a queue growing here.
"""
from __future__ import annotations

import threading
from typing import Callable

import anyio
from anyio import to_thread

from ..client import Client, Generation
from ..errors import DaemonUnavailable, LlmosdError, Timeout

__all__ = ["Pool", "Stream"]


class Pool:
    """Connected Clients to one daemon endpoint, at most ``keep`` of them idle; at most
    ``threads`` requests talk to the daemon at once (the others wait their turn)."""

    def __init__(self, socket: str | None = None, *, keep: int = 32, threads: int = 512,
                 timeout: float = 60.0):
        self.socket, self.keep, self.timeout = socket, keep, timeout
        self._idle: list[Client] = []
        self._lock = threading.Lock()
        self.limiter = anyio.CapacityLimiter(threads)

    def take(self) -> Client:
        """An idle Client, or a new one (DaemonUnavailable if the daemon does not answer)."""
        with self._lock:
            if self._idle:
                return self._idle.pop()
        return Client(self.socket, timeout=self.timeout).connect()

    def give(self, client: Client, healthy: bool) -> None:
        """Back to the pool, or closed when its connection failed or the pool is full."""
        if healthy:
            with self._lock:
                if len(self._idle) < self.keep:
                    self._idle.append(client)
                    return
        client.close()

    def close(self) -> None:
        with self._lock:
            idle, self._idle = self._idle, []
        for c in idle:
            c.close()

    async def run(self, fn: Callable, *args):
        """``fn(client, *args)`` on a worker thread with a pooled Client; its result."""
        def work():
            client = self.take()
            healthy = False
            try:
                out = fn(client, *args)
                healthy = True
                return out
            except LlmosdError as e:
                healthy = not isinstance(e, (DaemonUnavailable, Timeout))
                raise
            finally:
                self.give(client, healthy)
        return await to_thread.run_sync(work, limiter=self.limiter)

    async def stream(self, start: Callable[[Client], Generation]) -> "Stream":
        """Start a generation (``start(client)``) and read up to its first chunk that is not a
        loading notice, on a worker thread: errors that come first (unknown model, busy, a bad
        setting) are raised here, before any HTTP header is sent."""
        def work():
            client = self.take()
            try:
                gen = start(client)
                s = Stream(self, client, gen)
                s.first = s._read_first()
                return s
            except BaseException as e:
                self.give(client, isinstance(e, LlmosdError) and not isinstance(e, (DaemonUnavailable, Timeout)))
                raise
        return await to_thread.run_sync(work, limiter=self.limiter)


class Stream:
    """One generation on its own Client.  ``first`` is its first chunk (None if it ended at
    once); ``await next()`` the following ones, None at the end (then ``stats`` holds the end
    body); ``await close()`` cancels it on the daemon if it is unfinished and returns the
    Client to the pool — call it whatever happened (it is shielded from cancellation)."""

    def __init__(self, pool: Pool, client: Client, gen: Generation):
        self._pool, self._client, self._gen = pool, client, gen
        self.first: dict | None = None
        self._closed = self._broken = False

    @property
    def stats(self) -> dict | None:
        return self._gen.stats

    def _read(self) -> dict | None:
        try:
            next(self._gen)
        except StopIteration:
            return None
        except (DaemonUnavailable, Timeout):
            self._broken = True
            raise
        chunk = self._gen.chunks[-1]
        self._gen.chunks.clear()            # the gateway keeps no history of the stream
        return chunk

    def _read_first(self) -> dict | None:
        while True:
            chunk = self._read()
            if chunk is None or "loading" not in chunk:
                return chunk

    async def next(self) -> dict | None:
        return await to_thread.run_sync(self._read, limiter=self._pool.limiter)

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True

        def finish():
            healthy = True
            try:
                self._gen.cancel(wait=2.0)          # no-op when it had ended
            except Exception:  # noqa: BLE001 - a dead connection: drop the Client
                healthy = False
            self._pool.give(self._client, healthy and not self._broken)
        with anyio.CancelScope(shield=True):
            await to_thread.run_sync(finish, limiter=self._pool.limiter)
