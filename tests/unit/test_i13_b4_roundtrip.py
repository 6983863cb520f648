"""Issue 13, bench B4 (no-op round trip): the per-message path of the daemon's control loop
and of ``Client`` does no work a ping does not need.  Counted, never timed: an in-process
``Server`` (its real ``run`` loop in a thread, a trivial handler) on an ipc socket in
tmp_path; no daemon process, no torch.  Seconds."""
from __future__ import annotations

import os
import threading
import time
import types

import msgpack
import pytest
import zmq

from llmctl import Client, protocol
from llmosd import server as S
from llmosd.metrics import Metrics

PINGS = 50


def _handler(ctx) -> None:
    if ctx.type == "hello":
        ctx.ok({"daemon": "llmosd", "version": "test", "protocol": [protocol.VERSION, protocol.MINOR],
                "pid": os.getpid(), "max_message_bytes": protocol.DEFAULT_MAX_MESSAGE})
    else:
        ctx.ok({"time": time.time()})


@pytest.fixture
def loop(tmp_path):
    """A Server running its loop in a thread; stopped (and its socket closed) whatever happens."""
    srv = S.Server(f"ipc://{tmp_path}/s.sock", max_message=protocol.DEFAULT_MAX_MESSAGE,
                   send_hwm=1000, heartbeat_ms=5000)
    srv.handler = _handler
    srv.bind()
    t = threading.Thread(target=srv.run, args=(lambda: None, 2.0), daemon=True)
    t.start()
    try:
        yield srv
    finally:
        srv.request_stop()
        t.join(10)
        srv.close()
    assert not t.is_alive()


def _dealer(srv):
    s = zmq.Context.instance().socket(zmq.DEALER)
    s.setsockopt(zmq.LINGER, 0)
    s.setsockopt(zmq.RCVTIMEO, 10_000)
    s.connect(srv.url)
    return s


def test_i13_b4_1_loop_reads_the_wake_pipe_only_when_woken(loop, monkeypatch):
    """A round woken by a request alone reads no pipe (the old loop read the empty pipe, a
    syscall and a BlockingIOError, on every round); posted calls still run."""
    reads = []

    def read(fd, n):
        reads.append(fd)
        return os.read(fd, n)
    monkeypatch.setattr(S, "os", types.SimpleNamespace(read=read, write=os.write))
    s = _dealer(loop)
    try:
        for i in range(1, PINGS + 1):
            s.send(protocol.encode(protocol.request(i, "ping")))
            assert protocol.decode(s.recv())["id"] == i
        assert reads == []
        ran = threading.Event()
        loop.post(ran.set)
        assert ran.wait(10) and reads, "a posted call wakes the loop, which empties the pipe"
    finally:
        s.close()


def test_i13_b4_2_receive_drains_a_batch_without_a_failing_recv(monkeypatch):
    """Every queued message is handled in one ``_receive``, whose end is found from the
    socket's EVENTS, not from a recv failing with EAGAIN (an exception per batch); a message
    of other than one frame after the routing id is still refused.  inproc: a sent message
    is queued when send returns."""
    srv = S.Server("inproc://i13-b4", max_message=1 << 20, send_hwm=1000, heartbeat_ms=5000)
    srv.handler = _handler
    srv.bind()
    s = srv.ctx.socket(zmq.DEALER)
    s.setsockopt(zmq.LINGER, 0)
    s.setsockopt(zmq.RCVTIMEO, 10_000)
    s.connect(srv.url)
    real, again = srv.sock.recv, []

    def recv(*a, **kw):
        try:
            return real(*a, **kw)
        except zmq.Again:
            again.append(1)
            raise
    monkeypatch.setattr(srv.sock, "recv", recv)
    try:
        for i in range(1, 6):
            s.send(protocol.encode(protocol.request(i, "ping")))
        s.send_multipart([b"a", b"b"])
        assert srv.sock.getsockopt(zmq.EVENTS) & zmq.POLLIN
        srv._receive()
        replies = [protocol.decode(s.recv()) for _ in range(6)]
        assert [r["id"] for r in replies[:5]] == [1, 2, 3, 4, 5]
        assert all(r["type"] == "ok" for r in replies[:5])
        assert replies[5]["type"] == "error" and "exactly one frame" in replies[5]["body"]["message"]
        assert again == []
    finally:
        monkeypatch.undo()
        s.close()
        srv.sock.close(0)
        srv.ctx.term()
        os.close(srv._wake_r)
        os.close(srv._wake_w)


def test_i13_b4_3_metrics_make_a_label_child_once(monkeypatch):
    """The requests counter's child for (type, result) is made once, not per reply."""
    m = Metrics(process=False)
    made = []
    real = m.requests.labels

    def labels(*a):
        made.append(a)
        return real(*a)
    monkeypatch.setattr(m.requests, "labels", labels)
    for _ in range(PINGS):
        m.reply("ping", "ok", {})
    m.reply("show", "model_not_found")
    assert made == [("ping", "ok"), ("show", "model_not_found")]
    text = m.render()
    assert f'llmosd_requests_total{{result="ok",type="ping"}} {PINGS}.0' in text
    assert 'llmosd_requests_total{result="model_not_found",type="show"} 1.0' in text


def test_i13_b4_4_client_ping_makes_no_poller_and_encode_no_packer(loop, monkeypatch):
    """Client.ping waits in a blocking recv: no zmq.Poller per call (the old client made one
    and registered two sockets for every reply); encode keeps one msgpack Packer per thread."""
    with Client(loop.url, connect_timeout=5.0) as c:
        c.ping()
        pollers, packers = [], []
        real_poller, real_packer = zmq.Poller, msgpack.Packer
        monkeypatch.setattr(zmq, "Poller", lambda *a: pollers.append(1) or real_poller(*a))
        monkeypatch.setattr(msgpack, "Packer", lambda *a, **kw: packers.append(1) or real_packer(*a, **kw))
        for _ in range(PINGS):
            assert "time" in c.ping()
        assert pollers == [] and packers == []


def test_i13_b4_5_client_still_reports_a_vanished_daemon(tmp_path):
    """The monitor is read between recv slices: a daemon that closes the connection while a
    request waits is reported as DaemonUnavailable, long before the request's timeout."""
    from llmctl.errors import DaemonUnavailable
    srv = S.Server(f"ipc://{tmp_path}/s.sock", max_message=1 << 20, send_hwm=1000, heartbeat_ms=5000)
    srv.handler = lambda ctx: None if ctx.type == "ping" else _handler(ctx)    # ping: no answer
    srv.bind()

    def serve():
        try:
            srv.run(lambda: None, 0.5)
        finally:
            srv.close()                  # the connection closes with the socket
    t = threading.Thread(target=serve, daemon=True)
    t.start()
    try:
        with Client(srv.url, connect_timeout=5.0, timeout=30.0) as c:
            timer = threading.Timer(0.3, srv.request_stop)
            timer.start()
            t0 = time.monotonic()
            with pytest.raises(DaemonUnavailable):
                c.ping()
            assert time.monotonic() - t0 < 15
    finally:
        if not srv.stop_requested:       # failed before the timer: stop it here
            srv.request_stop()
        t.join(10)
    assert not t.is_alive()
