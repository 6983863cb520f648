"""Issue 7.13: random and mutated protocol messages against a running daemon.

A seeded, bounded hypothesis run throws messages of every type (well-formed, wrongly typed,
out of range, nil, oversized, unicode, mutated bytes, several frames) at a real llmosd and
checks every reply: well-formed, never ``internal``; the daemon stays up; its RSS and open
descriptors stay flat.  A long run lives in bench/ (same generator, more examples).
"""
from __future__ import annotations

import os
import time

import msgpack
import pytest
import zmq
from hypothesis import HealthCheck, given, settings, strategies as st

from conftest import SHAKESPEARE, TINY, Daemon
from llmctl import protocol
from llmctl.protocol import SCHEMAS, Field

N_MESSAGES = int(os.environ.get("LLMOSD_FUZZ_EXAMPLES", "2000"))
PROTECTED = {"tiny", "tiny:latest"}       # the model every generation uses stays loaded

# -- values ----------------------------------------------------------------------------------
junk = st.one_of(
    st.none(), st.booleans(), st.integers(-(2 ** 63), 2 ** 64 - 1),
    st.floats(allow_nan=True, allow_infinity=True), st.sampled_from([1e-320, -0.0, 5e-324, 1e308]),
    st.text(max_size=20), st.binary(max_size=20), st.lists(st.integers(-(2 ** 63), 2 ** 64 - 1), max_size=3),
    st.dictionaries(st.text(max_size=5), st.integers(-5, 5), max_size=3),
    st.sampled_from(["²", "٣", "9" * 5000, "x" * 70_000, "../..", "a/b:c", "dir:sub", "dir/sub:x"]),
)
names = st.one_of(
    st.sampled_from(["tiny", "tiny:latest", "nope", "Tiny", "tiny:", ":x", "a/b/c", " tiny ",
                     "dir:sub", "dir/sub:x", "dir/sub", "x" * 400, "../etc:passwd", "ns/m:v1"]),
    st.text(alphabet="abcz09._-/:² ", min_size=0, max_size=40),
)


def value_for(name: str, f: Field):
    """A strategy for one field: mostly legal values, sometimes anything at all."""
    if f.choices:
        good = st.sampled_from(list(f.choices))
    elif name in ("model", "name", "source", "target") and str in f.types:
        good = names
    elif name == "digest":
        good = st.one_of(st.just("sha256:" + "0" * 64), st.text(max_size=70),
                         st.binary(min_size=32, max_size=32).map(lambda b: "sha256:" + b.hex()))
    elif name == "messages":
        msg = st.fixed_dictionaries({"role": st.sampled_from(["user", "system", "assistant", "tool", ""]),
                                     "content": st.one_of(st.text(max_size=30), junk)})
        good = st.lists(st.one_of(msg, junk), max_size=4)
    elif name == "max_tokens":
        good = st.integers(1, 6)                    # generations stay short
    elif bool in f.types:
        good = st.booleans()
    elif int in f.types and float not in f.types:
        good = st.integers(f.lo if f.lo is not None else -10, min(f.hi if f.hi is not None else 10, 10 ** 6))
    elif float in f.types:
        good = st.floats(f.lo if f.lo is not None else -1, f.hi if f.hi is not None else 1)
    elif list in f.types:
        good = st.lists(st.text(max_size=12), max_size=5)
    elif dict in f.types:
        good = st.dictionaries(st.text(max_size=10), st.text(max_size=70), max_size=3)
    elif bytes in f.types:
        good = st.binary(max_size=64)
    else:
        good = st.text(max_size=40)
    return st.one_of(good, good, good, junk)


@st.composite
def structured(draw):
    mtype = draw(st.sampled_from(sorted(SCHEMAS) + ["nope", ""]))
    schema = SCHEMAS.get(mtype, {})
    body = {}
    for name, f in schema.items():
        if f.required or draw(st.booleans()):
            if not draw(st.integers(0, 30)) == 0:    # now and then a required field is missing
                body[name] = draw(value_for(name, f))
    if draw(st.integers(0, 15)) == 0:
        body[draw(st.text(max_size=8))] = draw(junk)
    if mtype in ("rm", "unload") and str(body.get("model", body.get("target", ""))).strip() in PROTECTED:
        body.pop("model", None), body.pop("target", None)
    if mtype == "create":                            # never a real (heavy) training job
        body["layers"] = "many"
    if mtype == "tag" and body.get("force"):
        body["force"] = "yes"                        # never replace the model the test uses
    env = {"v": draw(st.sampled_from([1, 1, 1, 1, 1, 2, 0])), "type": mtype, "body": body}
    if draw(st.integers(0, 20)) == 0:
        env["body"] = draw(junk)
    if draw(st.integers(0, 20)) == 0:
        env.pop(draw(st.sampled_from(["v", "type", "body"])))
    return env


@st.composite
def message(draw):
    """-> (frames, structured): one frame of msgpack, mutated bytes, or several frames."""
    env = draw(structured())
    kind = draw(st.integers(0, 19))
    data = msgpack.packb(env, use_bin_type=True)
    if kind == 0:
        return [draw(st.binary(max_size=64))], False
    if kind == 1 and data:
        pos = draw(st.integers(0, len(data) - 1))
        return [data[:pos] + bytes([draw(st.integers(0, 255))]) + data[pos + 1:]], False
    if kind == 2:
        return [data, draw(st.binary(max_size=8))], False
    if kind == 3:
        return [msgpack.packb(draw(junk), use_bin_type=True)], False
    return env, True


# -- the daemon --------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def fuzz_daemon(tmp_path_factory):
    d = Daemon(tmp_path_factory.mktemp("fuzz"), env={"LLMOSD_HEARTBEAT_MS": "300"})
    try:
        d.start()
        d.cli("create", "tiny", *TINY, "--vocab-from", str(SHAKESPEARE))
        d.cli("load", "tiny")
        yield d
    finally:
        d.stop()


class Wire:
    """A raw DEALER that sends anything and checks every reply it gets."""

    def __init__(self, url: str):
        self.ctx = zmq.Context()
        self.sock = self.ctx.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.connect(url)
        self.next_id = 1
        self.replies = 0
        self.seen: dict[str, int] = {}      # reply kinds, for the failure message

    def close(self):
        self.sock.close(0)
        self.ctx.term()

    def check(self, raw: bytes) -> dict:
        msg = msgpack.unpackb(raw, raw=False)
        assert isinstance(msg, dict) and msg.get("v") == 1, msg
        assert isinstance(msg.get("id"), int) and msg.get("type") in protocol.REPLY_TYPES, msg
        assert isinstance(msg.get("body"), dict), msg
        if msg["type"] == "error":
            b = msg["body"]
            assert {"code", "name", "message", "hint"} <= set(b), b
            assert b["code"] != 40 and b["name"] != "internal", b
            assert len(b["message"]) <= 4200, len(b["message"])
        if msg["type"] in ("chunk", "end"):
            assert isinstance(msg.get("seq"), int), msg
        self.replies += 1
        kind = msg["body"].get("name", msg["type"]) if msg["type"] == "error" else msg["type"]
        self.seen[kind] = self.seen.get(kind, 0) + 1
        return msg

    def exchange(self, frames: list, rid: int | None, timeout: float = 60.0) -> None:
        """Send; read replies until the request's final one (any id for raw frames)."""
        self.sock.send_multipart(frames)
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            assert left > 0, f"no final reply to {frames[0][:200]!r}"
            if not self.sock.poll(int(left * 1000)):
                continue
            msg = self.check(self.sock.recv())
            if msg["type"] == "beat" or (rid is not None and msg["id"] != rid):
                continue
            if msg["type"] in ("ok", "error", "end"):
                return


def _usage(pid: int) -> tuple[int, int]:
    with open(f"/proc/{pid}/statm") as f:
        rss = int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    return rss, len(os.listdir(f"/proc/{pid}/fd"))


def test_i7_13_fuzz_no_internal_daemon_alive_rss_and_fds_flat(fuzz_daemon):
    wire = Wire(fuzz_daemon.sock)
    sent = {"n": 0}

    @settings(max_examples=N_MESSAGES, derandomize=True, deadline=None, database=None,
              suppress_health_check=list(HealthCheck))
    @given(message())
    def one(m):
        frames, ok = m
        if ok:
            env = frames
            rid = wire.next_id
            wire.next_id += 1
            env["id"] = rid
            frames = [msgpack.packb(env, use_bin_type=True)]   # its error echoes the id
        else:
            rid = None
        wire.exchange(frames, rid)
        sent["n"] += 1
        if sent["n"] == 300:                    # warm: the model is loaded, caches are filled
            sent["base"] = _usage(fuzz_daemon.proc.pid)

    try:
        one()
        assert fuzz_daemon.proc.poll() is None, "the daemon died"
        with fuzz_daemon.client() as c:
            assert c.status()["pid"] == fuzz_daemon.proc.pid
        time.sleep(1.0)                         # let abandoned uploads and beats settle
        rss, fds = _usage(fuzz_daemon.proc.pid)
        rss0, fds0 = sent["base"]
        assert sent["n"] >= min(N_MESSAGES, 2000), wire.seen
        # the run reached the handlers, not just the envelope checks
        assert wire.seen.get("ok", 0) + wire.seen.get("end", 0) >= sent["n"] // 20, wire.seen
        assert fds <= fds0 + 8, (fds0, fds)
        assert rss <= rss0 + 48 * 2 ** 20, (rss0, rss)
    finally:
        wire.close()
