"""Pooled blocking ``Client``s for the gateway's event loop, and streams read without threads.

A request takes a connected Client from the ``Pool`` and holds it alone until it is done (a
Client is not thread-safe: it only moves between threads while idle, and every hand-off goes
through a lock or the thread pool, which orders memory), then gives it back unless its
connection failed.  Connecting and starting a generation are blocking round trips, run on a
worker thread; the stream's replies are then read on the event loop itself, straight off the
Client's socket: what already waits there is taken without blocking, and the loop waits for
more on the socket's file descriptor — no thread hop per chunk, and a wait that a disconnect
can cancel at once, even while the request is queued, loading or in a long prefill.

A stream reads only when the HTTP side asks, at most ``WINDOW`` chunks that are already on the
socket at a time: nothing more is read ahead of a slow HTTP reader, so the daemon's flow
control (credits per chunk sent) holds its engine back instead of a queue growing here.
"""
from __future__ import annotations

import asyncio
import threading
import time
from typing import Awaitable, Callable

import anyio
import zmq
from anyio import to_thread

from .. import protocol
from ..client import Client, Generation
from ..errors import DaemonUnavailable, LlmosdError, Timeout, from_wire

__all__ = ["Gone", "Pool", "SocketSource", "Stream", "until_gone"]

WINDOW = 8          # chunks taken at once, only those already on the socket
SETTLE = 1.0        # a wait on the socket's descriptor looks again after this long regardless
POLL = 0.05         # a source without descriptors is read in worker-thread slices this long
CANCEL_WAIT = 2.0   # seconds a cancelled stream may take to send its end
END = object()      # SocketSource.get: the stream ended (stats hold its end body)


class Gone(Exception):
    """The HTTP client disconnected before its answer started; the request was cancelled."""


def _healthy(e: BaseException) -> bool:
    """Whether a Client that raised ``e`` may be pooled again."""
    return isinstance(e, LlmosdError) and not isinstance(e, (DaemonUnavailable, Timeout))


class Pool:
    """Connected Clients to one daemon endpoint, at most ``keep`` of them idle; at most
    ``threads`` blocking calls run at once (the others wait their turn)."""

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

    @staticmethod
    def source(client: Client, gen: Generation) -> "SocketSource":
        """How a stream's replies are read (a seam for tests)."""
        return SocketSource(client, gen)

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
                healthy = _healthy(e)
                raise
            finally:
                self.give(client, healthy)
        return await to_thread.run_sync(work, limiter=self.limiter)

    async def stream(self, start: Callable[[Client], Generation], receive=None) -> "Stream":
        """Start a generation (``start(client)``, on a worker thread) and read up to its first
        chunk that is not a loading notice: errors that come first (unknown model, busy, a bad
        setting) are raised here, before any HTTP header is sent.  With ``receive`` (the ASGI
        channel) a disconnect meanwhile cancels the generation and raises ``Gone``; whatever
        fails or is cancelled, the Client goes back to the pool (or is closed)."""
        s = Stream(self)
        try:
            await to_thread.run_sync(s._open, start, limiter=self.limiter)
            if receive is None:
                await s._read_first()
            elif await until_gone(receive, s._read_first):
                raise Gone("the HTTP client disconnected before the answer started")
            return s
        except BaseException:
            await s.close()
            raise


async def until_gone(receive, work: Callable[[], Awaitable]) -> bool:
    """Await ``work()`` while watching the ASGI ``receive`` channel; True (and ``work``
    cancelled) when the HTTP client disconnected first."""
    finished = False
    failed: list[Exception] = []
    async with anyio.create_task_group() as tg:
        tg.start_soon(watch, receive, tg.cancel_scope)
        try:
            await work()
            finished = True
        except Exception as e:      # raised as itself, not in the task group's ExceptionGroup
            failed.append(e)
        finally:
            tg.cancel_scope.cancel()
    if failed:
        raise failed[0]
    return not finished


async def watch(receive, scope: anyio.CancelScope) -> None:
    """Cancel ``scope`` once the HTTP client has disconnected."""
    while (await receive())["type"] != "http.disconnect":
        pass
    scope.cancel()


async def _readable(fds: list[int], timeout: float) -> None:
    """Return once one of ``fds`` is readable (or after ``timeout``); cancellable."""
    loop = asyncio.get_running_loop()
    ready = asyncio.Event()
    for fd in fds:
        loop.add_reader(fd, ready.set)
    try:
        with anyio.move_on_after(timeout):
            await ready.wait()
    finally:
        for fd in fds:
            loop.remove_reader(fd)


class SocketSource:
    """The replies to generation ``gen`` read straight off its Client's socket, by whichever
    thread holds the Client.  ``get`` and ``cancel`` as documented; ``fds()`` the descriptors
    that become readable when something may have arrived (ZeroMQ's are edge-triggered: they
    are only waited on after ``get(0)`` found nothing, which updates their state)."""

    def __init__(self, client: Client, gen: Generation):
        self.client, self.gen, self.rid = client, gen, gen.id
        self.stats: dict | None = None
        self.done = False
        self._poller = zmq.Poller()
        self._poller.register(client._sock, zmq.POLLIN)
        self._poller.register(client._mon, zmq.POLLIN)
        self._idle = client.stream_idle_timeout
        self._deadline = time.monotonic() + self._idle

    def fds(self) -> list[int]:
        return [self.client._sock.getsockopt(zmq.FD), self.client._mon.getsockopt(zmq.FD)]

    def _settle(self, stats: dict | None) -> None:
        """Ended: the Generation is marked done, so the Client never cancels it again."""
        self.done, self.stats = True, stats
        self.gen._done, self.gen.stats = True, stats
        self.client._open.pop(self.rid, None)

    def get(self, timeout: float):
        """The next chunk body; END at the end (``stats`` then hold the end body); None when
        nothing came within ``timeout`` s (0: only what already waits).  Raises the stream's
        error, DaemonUnavailable when the connection dropped, Timeout after the daemon was
        silent (not even a beat) for the Client's ``stream_idle_timeout``."""
        c = self.client
        limit = time.monotonic() + timeout
        while True:
            wait = max(0.0, min(limit, self._deadline) - time.monotonic())
            ready = dict(self._poller.poll(int(wait * 1000) + (wait > 0)))
            if c._sock in ready:
                msg = protocol.decode(c._sock.recv(), max_size=c.max_message + (1 << 20))
                self._deadline = time.monotonic() + self._idle       # the daemon is alive
                if msg["type"] == "beat" or msg["id"] != self.rid:
                    continue
                kind, body = msg["type"], msg["body"]
                if kind == "chunk":
                    return body
                self._settle(body if kind == "end" else None)
                if kind == "end":
                    return END
                if kind == "error":
                    raise from_wire(body)
                raise LlmosdError(f"unexpected reply type {kind!r} in a stream")
            if c._mon in ready:
                try:
                    c._check_monitor()
                except DaemonUnavailable:
                    self._settle(None)
                    raise
            now = time.monotonic()
            if now >= self._deadline:
                raise Timeout(f"no reply from llmosd within {self._idle:g}s ({c.url})",
                              hint="the daemon may be overloaded or hung; see its log")
            if now >= limit and not ready:
                return None

    def cancel(self, wait: float) -> bool:
        """Cancel the generation on the daemon (unless it ended) and read up to its end for at
        most ``wait`` s; whether the Client may be pooled again (it read the end)."""
        if self.done:
            return True
        self.client._send_cancel(self.rid)
        deadline = time.monotonic() + wait
        try:
            while not self.done and time.monotonic() < deadline:
                self.get(max(0.0, deadline - time.monotonic()))
        except LlmosdError as e:
            return _healthy(e) and self.done
        return self.done


class Stream:
    """One generation on its own Client.  ``first`` is its first chunks (a non-empty list,
    loading notices left out; None if it ended at once); ``await batch()`` the following ones
    (a non-empty list), None at the end (then ``stats`` holds the end body); ``await close()``
    cancels it on the daemon if it is unfinished and returns the Client to the pool — call it
    whatever happened (it is shielded from cancellation)."""

    def __init__(self, pool: Pool):
        self._pool = pool
        self._client: Client | None = None
        self._source = None
        self.first: list[dict] | None = None
        self._ended = self._closed = self._broken = False
        self._error: BaseException | None = None     # raised after the chunks read before it

    def _open(self, start: Callable[[Client], Generation]) -> None:
        """Take a Client and start the generation (blocking: on a worker thread)."""
        client = self._pool.take()
        try:
            gen = start(client)
        except BaseException as e:
            self._pool.give(client, _healthy(e))
            raise
        self._client, self._source = client, self._pool.source(client, gen)

    @property
    def stats(self) -> dict | None:
        return self._source.stats if self._source is not None else None

    def _take(self, timeout: float) -> list[dict] | None:
        """The chunks read within ``timeout`` s: [] when none came, None at the end; after the
        first, only those already waiting, at most WINDOW."""
        if self._error is not None:
            e, self._error = self._error, None
            raise e
        if self._ended:
            return None
        out: list[dict] = []
        try:
            got = self._source.get(timeout)
            while got is not None:
                if got is END:
                    self._ended = True
                    break
                out.append(got)
                if len(out) >= WINDOW:
                    break
                got = self._source.get(0)
        except LlmosdError as e:
            self._broken = not _healthy(e)
            if not out:
                raise
            self._error = e
        return None if self._ended and not out else out

    async def batch(self) -> list[dict] | None:
        """The next chunks (a non-empty list), None at the end.  Cancellable at any time."""
        while True:
            got = self._take(0)           # on the loop: what already waits costs no thread hop
            if got != []:
                return got
            fds = self._source.fds()
            if fds:
                await _readable(fds, SETTLE)
            else:
                got = await to_thread.run_sync(self._take, POLL, limiter=self._pool.limiter)
                if got != []:
                    return got

    async def _read_first(self) -> None:
        while True:
            got = await self.batch()
            if got is None:
                return
            got = [c for c in got if "loading" not in c]
            if got:
                self.first = got
                return

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        client, source = self._client, self._source
        if client is None:
            return
        if source.done or self._broken:        # nothing to wait for: no thread needed
            if not source.done:
                source.cancel(0)                   # best effort on a connection given up
            self._pool.give(client, not self._broken)
            return

        def finish():
            try:
                healthy = source.cancel(CANCEL_WAIT)
            except Exception:  # noqa: BLE001 - a dead connection: drop the Client
                healthy = False
            self._pool.give(client, healthy)
        with anyio.CancelScope(shield=True):
            await to_thread.run_sync(finish, limiter=self._pool.limiter)
