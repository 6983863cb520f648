"""Wire-level guarantees of the control loop (issue 7): request ids, reply sizes, envelopes."""
from __future__ import annotations

import time

import msgpack
import pytest
import zmq

from llmctl import protocol


class Raw:
    def __init__(self, url):
        self.ctx = zmq.Context()
        self.s = self.ctx.socket(zmq.DEALER)
        self.s.setsockopt(zmq.LINGER, 0)
        self.s.connect(url)

    def send(self, rid, type_, body):
        self.s.send(protocol.encode(protocol.request(rid, type_, body)))

    def replies(self, want: int, timeout: float = 60.0) -> list[dict]:
        """The next ``want`` non-beat replies, in arrival order."""
        out, deadline = [], time.monotonic() + timeout
        while len(out) < want:
            assert self.s.poll(int(max(0.0, deadline - time.monotonic()) * 1000)), out
            m = msgpack.unpackb(self.s.recv(), raw=False)
            if m["type"] != "beat":
                out.append(m)
        return out

    def close(self):
        self.s.close(0)
        self.ctx.term()


@pytest.fixture
def raw(shared_daemon):
    r = Raw(shared_daemon.sock)
    yield r
    r.close()


def test_i7_7_duplicate_request_id_refused_for_any_type(shared_daemon, raw):
    text = "First Citizen: before we proceed any further, hear me speak. " * 20
    raw.send(5, "score", {"model": "tiny", "text": text})
    raw.send(5, "score", {"model": "tiny", "text": "again"})          # same id, still open
    raw.send(5, "generate", {"model": "tiny", "prompt": "x", "max_tokens": 2})
    got = raw.replies(3)
    dup = [m for m in got if m["type"] == "error"]
    assert len(dup) == 2 and all("already in use" in m["body"]["message"] for m in dup), got
    assert all(m["id"] == 5 for m in got)
    ok = [m for m in got if m["type"] == "ok"]
    assert len(ok) == 1 and ok[0]["body"]["scored_tokens"] > 10
    # the id is free again once answered, and the instance is not left busy
    raw.send(5, "score", {"model": "tiny", "text": "again"})
    assert raw.replies(1)[0]["type"] == "ok"
    with shared_daemon.client() as c:
        deadline = time.monotonic() + 10
        while any(i["active_requests"] for i in c.ps() if i["model"] == "tiny:latest"):
            assert time.monotonic() < deadline, c.ps()
            time.sleep(0.05)


def test_i7_11_oversized_reply_becomes_too_large_error():
    from llmosd.server import Peer, Server
    srv = Server("inproc://x", max_message=1000, send_hwm=10, heartbeat_ms=1000)
    try:
        sent = []
        srv._try_send = lambda peer, data, on_sent: sent.append(protocol.decode(data)) or "sent"
        peer = Peer(b"p", None)
        srv.send(peer, protocol.reply(9, "ok", {"tokens": ["x" * 50] * 100}))
        assert sent[0]["type"] == "error" and sent[0]["id"] == 9
        assert sent[0]["body"]["name"] == "too_large" and "1000" in sent[0]["body"]["message"]
    finally:
        srv.sock.close(0)
        srv.ctx.term()


def test_i7_11_errors_never_echo_huge_input(raw):
    raw.send(3, "show", {"model": "n" * 200_000})
    m = raw.replies(1)[0]
    assert m["id"] == 3 and m["type"] == "error" and len(protocol.encode(m)) < 5000


@pytest.mark.parametrize("body,needle", [
    ({"model": "tiny", "prompt": "x", "max_tokens": None, "logprobs": None, "temperature": 0}, None),
    ({"model": "tiny", "prompt": "x", "temperature": 1e-320, "max_tokens": 2}, None),
    ({"model": "tiny", "prompt": "x", "top_p": 1e-320, "max_tokens": 2}, None),
    ({"model": "tiny", "prompt": "x", "repetition_penalty": 1e-320}, "repetition_penalty"),
    ({"model": "tiny", "prompt": "x", "temperature": float("nan")}, "finite"),
    ({"model": "tiny", "prompt": "x", "seed": 2 ** 64 - 1, "max_tokens": 1}, None),
])
def test_i7_12_generation_fields_checked_no_internal(raw, body, needle):
    raw.send(11, "generate", body)
    while True:
        m = raw.replies(1)[0]
        if m["type"] in ("end", "error"):
            break
    if needle is None:
        assert m["type"] == "end", m
    else:
        assert m["type"] == "error" and m["body"]["name"] == "invalid_argument", m
        assert needle in m["body"]["message"]


@pytest.mark.parametrize("type_,body", [
    ("download", {"digest": "sha256:" + "0" * 64, "offset": 2 ** 63, "size": 10}),
    ("unload", {"target": "²"}),
    ("unload", {"target": "9" * 5000}),
    ("cancel", {"target": 2 ** 64 - 1}),
])
def test_i7_12_odd_values_no_internal(raw, type_, body):
    raw.send(12, type_, body)
    m = raw.replies(1)[0]
    assert m["id"] == 12 and not (m["type"] == "error" and m["body"]["code"] == 40), m


def test_i7_12_envelope_errors_echo_the_request_id(raw):
    raw.s.send(msgpack.packb({"v": 1, "id": 77, "type": "ping", "body": [1]}))
    raw.s.send(msgpack.packb({"v": 1, "id": 78}))
    got = {m["id"]: m for m in raw.replies(2)}
    assert got[77]["type"] == "error" and got[77]["body"]["name"] == "bad_request"
    assert got[78]["type"] == "error" and "type" in got[78]["body"]["message"]
