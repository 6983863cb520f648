"""Issue 15, review fixes of the HTTP gateway: a disconnect before the first chunk (queued behind
a busy instance) cancels the request at once and leaks no Client; big embedding bodies are built
off the event loop; waiting chunks go out in one send.  The in-process tests drive the ASGI app
with a fake source; the last one runs a real daemon (max_batch=1) and `llmctl serve-http`,
both stopped in teardown."""
from __future__ import annotations

import json
import os
import select
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest

from conftest import SHAKESPEARE, TINY, Daemon

anyio = pytest.importorskip("anyio")
pytest.importorskip("starlette", reason="the gateway needs the http extra (pip install 'llmosd[http]')")
pytest.importorskip("uvicorn", reason="the gateway needs the http extra (pip install 'llmosd[http]')")

from llmctl.http import app as app_mod  # noqa: E402
from llmctl.http.app import Gateway  # noqa: E402
from llmctl.http.bridge import END, WINDOW, Pool  # noqa: E402

MSG = [{"role": "user", "content": "Hi"}]


class Source:
    """A bridge source: ``n`` chunks, all ready at once unless ``silent`` (a request that waits
    in the daemon's queue: nothing ever comes); it records its cancellation."""

    def __init__(self, n: int = 0, silent: bool = False, fail: Exception | None = None):
        self.n, self.silent, self.reads, self.fail = n, silent, 0, fail
        self.cancelled = self.done = False
        self.stats = None

    def get(self, timeout: float):
        if self.fail is not None:
            self.done = True
            raise self.fail
        if self.silent:
            time.sleep(timeout)
            return None
        if self.reads >= self.n:
            self.done, self.stats = True, {"finish_reason": "stop", "prompt_tokens": 1, "generated_tokens": self.n}
            return END
        self.reads += 1
        return {"text": f"{self.reads},", "token_ids": [1]}

    def fds(self):
        return []

    def cancel(self, wait: float) -> bool:
        self.cancelled = self.done = True
        return True


class FakeClient:
    def chat(self, model, **kw):
        return object()

    def close(self):
        pass


def _pool(source: Source) -> tuple[Pool, list]:
    """A Pool whose Clients are fakes reading ``source``; the list records every give(healthy)."""
    pool = Pool("ipc:///nonexistent")
    given: list = []
    pool.take = lambda: FakeClient()
    pool.give = lambda client, healthy: given.append(healthy)
    pool.source = lambda client, gen: source
    return pool, given


def _request(app, body: dict, path: str, gone_after: float | None):
    """Send ``body`` to ``app`` in process; the HTTP client disconnects after ``gone_after`` s
    (None: never).  Returns (sent messages, seconds from the disconnect to the app's return)."""
    scope = {"type": "http", "asgi": {"version": "3.0", "spec_version": "2.3"}, "http_version": "1.1",
             "method": "POST", "scheme": "http", "path": path, "raw_path": path.encode(), "query_string": b"",
             "root_path": "", "headers": [(b"content-type", b"application/json")],
             "client": ("127.0.0.1", 1), "server": ("127.0.0.1", 2)}
    sent, took = [], []

    async def main():
        gone = anyio.Event()
        requested = [False]

        async def receive():
            if not requested[0]:
                requested[0] = True
                return {"type": "http.request", "body": json.dumps(body).encode(), "more_body": False}
            await gone.wait()
            return {"type": "http.disconnect"}

        async def send(msg):
            sent.append(msg)

        async with anyio.create_task_group() as tg:
            async def disconnect():
                if gone_after is not None:
                    await anyio.sleep(gone_after)
                    took.append(time.monotonic())
                    gone.set()
            tg.start_soon(disconnect)
            with anyio.fail_after(10):
                await app(scope, receive, send)
            took[:] = [time.monotonic() - took[0]] if took else [None]
            tg.cancel_scope.cancel()
    anyio.run(main)
    return sent, took[0]


@pytest.mark.parametrize("stream", [True, False])
@pytest.mark.parametrize("path", ["/v1/chat/completions", "/api/chat"])
def test_i15_review_1_a_disconnect_before_the_first_chunk_cancels_and_leaks_no_client(stream, path):
    source = Source(silent=True)
    pool, given = _pool(source)
    sent, took = _request(Gateway(pool).app(), {"model": "m", "messages": MSG, "stream": stream}, path, 0.2)
    assert took is not None and took < 1.0          # the app returned at once...
    assert source.cancelled                         # ...having cancelled the generation...
    assert given == [True]                          # ...and given its Client back, once
    assert sent[0]["status"] == 499                 # no header was sent before: nobody listens


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/api/chat"])
def test_i15_review_1_an_error_before_the_first_chunk_is_still_a_status_while_watching(path):
    from llmctl.errors import ModelNotFound
    source = Source(fail=ModelNotFound("model m is not in the store"))
    pool, given = _pool(source)
    sent, _ = _request(Gateway(pool).app(), {"model": "m", "messages": MSG, "stream": True}, path, None)
    assert sent[0]["status"] == 404 and "not in the store" in sent[1]["body"].decode()
    assert given == [True]


def test_i15_review_1_the_stream_waits_on_the_socket_and_is_cancelled_within_the_loop():
    """A real zmq socket that stays silent (a queued request): the wait is on its descriptor, on
    the event loop, and a disconnect cancels it at once (no worker thread blocked on it)."""
    zmq = pytest.importorskip("zmq")
    from llmctl import protocol
    from llmctl.http.bridge import SocketSource

    ctx = zmq.Context.instance()
    server, sock = ctx.socket(zmq.ROUTER), ctx.socket(zmq.DEALER)
    server.bind("inproc://i15-review")
    sock.connect("inproc://i15-review")
    mon = sock.get_monitor_socket(zmq.EVENT_DISCONNECTED | zmq.EVENT_CONNECTED)

    class Client:
        _sock, _mon, max_message, stream_idle_timeout, url = sock, mon, 1 << 20, 30.0, "inproc://i15-review"
        _open: dict = {}

        def _check_monitor(self):
            while mon.poll(0):
                mon.recv_multipart()

        def _send_cancel(self, rid):
            sock.send(b"cancel")

    class Gen:
        id = 1

    def daemon():            # answers the cancel with the stream's end, as llmosd does
        if server.poll(5000):
            peer, msg = server.recv_multipart()
            assert msg == b"cancel"
            server.send_multipart([peer, protocol.encode(protocol.reply(1, "end", {"finish_reason": "cancelled"}))])
    source = SocketSource(Client(), Gen())
    pool, given = _pool(source)
    threads = threading.active_count()
    t = threading.Thread(target=daemon)
    t.start()
    try:
        sent, took = _request(Gateway(pool).app(), {"model": "m", "messages": MSG, "stream": True},
                              "/v1/chat/completions", 0.3)
        t.join(5)
        assert took < 1.0 and sent[0]["status"] == 499
        assert source.done and given == [True]    # the end was read: the Client is pooled again
        assert threading.active_count() <= threads + 1
    finally:
        t.join(5)
        sock.disable_monitor()
        for s in (mon, sock, server):
            s.close(linger=0)


def test_i15_review_2_embedding_bodies_are_built_off_the_event_loop(monkeypatch):
    import numpy as np
    threads = []
    real = app_mod.openai.embeddings_response

    def spy(*a, **kw):
        threads.append(threading.current_thread())
        return real(*a, **kw)
    monkeypatch.setattr(app_mod.openai, "embeddings_response", spy)
    pool = Pool("ipc:///nonexistent")

    async def run(fn, *args):
        return np.ones((3, 4), dtype="float32"), 6
    pool.run = run
    sent, _ = _request(Gateway(pool).app(), {"model": "m", "input": ["a", "b", "c"]}, "/v1/embeddings", None)
    assert sent[0]["status"] == 200 and len(json.loads(sent[1]["body"])["data"]) == 3
    assert threads and threads[0] is not threading.main_thread()


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/api/chat"])
def test_i15_review_3_waiting_chunks_go_out_together_and_unchanged(path):
    n = 5 * WINDOW + 3
    source = Source(n)
    pool, given = _pool(source)
    sent, _ = _request(Gateway(pool).app(), {"model": "m", "messages": MSG, "stream": True}, path, None)
    bodies = [m["body"] for m in sent if m["type"] == "http.response.body" and m["body"]]
    assert len(bodies) <= n // WINDOW + 3               # a send per window, not per chunk
    text = b"".join(bodies).decode()
    if path.startswith("/v1"):
        events = [json.loads(x[6:]) for x in text.split("\n\n") if x.startswith("data: {")]
        pieces = [e["choices"][0]["delta"].get("content") for e in events if e["choices"]]
        assert text.endswith("data: [DONE]\n\n")
    else:
        lines = [json.loads(x) for x in text.splitlines()]
        pieces = [x["message"]["content"] for x in lines if not x["done"]]
    assert "".join(p for p in pieces if p) == "".join(f"{i}," for i in range(1, n + 1))
    assert given == [True] and not source.cancelled


# -- against a real daemon: a request queued behind max_batch=1 --------------------------------
class HttpGateway:
    """One `llmctl serve-http` process in its own session, on a free loopback port."""

    def __init__(self, daemon: Daemon):
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "llmctl.cli", "serve-http", "--listen", "127.0.0.1:0"],
            env=daemon.env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
            start_new_session=True, text=True)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and self.proc.poll() is None:
            if select.select([self.proc.stderr], [], [], 0.2)[0]:
                line = self.proc.stderr.readline()
                if "listening on" in line:
                    self.host, port = line.split("http://", 1)[1].split()[0].rsplit(":", 1)
                    self.port = int(port)
                    return
        self.stop()
        raise RuntimeError(f"the gateway did not start (exit {self.proc.poll()})")

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)
        self.proc.stderr.close()


def _requests(c) -> int:
    return sum(i["active_requests"] + i.get("queued_requests", 0) for i in c.ps())


def test_i15_review_1_a_request_queued_behind_a_busy_instance_is_gone_within_a_second(tmp_path):
    d = Daemon(tmp_path / "d", env={"LLMOSD_MAX_BATCH": "1"})
    gw = None
    try:
        d.start()
        d.cli("create", "tiny", *TINY, "--context", "16384", "--vocab-from", str(SHAKESPEARE))
        gw = HttpGateway(d)
        with d.client() as holder, d.client() as c:
            busy = holder.generate("tiny", "Once upon a time", max_tokens=16000, temperature=0)
            next(busy)                            # it runs (and, never read, holds the batch's one slot)
            body = json.dumps({"model": "tiny", "prompt": "The king", "max_tokens": 50, "stream": True})
            with socket.create_connection((gw.host, gw.port), timeout=30) as s:
                s.sendall(f"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                          f"Content-Length: {len(body)}\r\n\r\n{body}".encode())
                deadline = time.monotonic() + 20
                while _requests(c) < 2 and time.monotonic() < deadline:
                    time.sleep(0.05)
                assert _requests(c) == 2              # the HTTP request waits behind the busy one
                s.setblocking(False)
                with pytest.raises(BlockingIOError):
                    s.recv(1)                         # queued: not even a header has come
            gone = time.monotonic()                   # the HTTP client went away
            while _requests(c) > 1 and time.monotonic() - gone < 5:
                time.sleep(0.02)
            took = time.monotonic() - gone
            assert _requests(c) == 1 and took < 1.0, f"still queued {took:.2f}s after the disconnect"
            assert not busy._done                     # the busy one still runs: it was not that one ending
            busy.cancel()
    finally:
        if gw is not None:
            gw.stop()
        d.stop()
