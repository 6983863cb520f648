"""Issue 12 through llmctl and a real daemon: ``top --once --json`` carries what ``top``, ``ps``
and ``status`` show (6), ``top`` in a terminal quits on q and on Ctrl-C with the terminal
restored, and load's --keep-alive/--priority/--pin, pin/unpin and a request's --keep-alive
reach the daemon."""
from __future__ import annotations

import json
import os
import re
import select
import signal
import struct
import subprocess
import sys
import time

import pytest

from conftest import SHAKESPEARE, TINY, Daemon
from llmctl import errors


@pytest.fixture(scope="module")
def mem_daemon(tmp_path_factory):
    """One daemon holding 'tiny' (created once for this file's tests)."""
    d = Daemon(tmp_path_factory.mktemp("climem"))
    d.outlives_test = True
    try:
        d.start()
        d.cli("create", "tiny", *TINY, "--vocab-from", str(SHAKESPEARE))
        yield d
    finally:
        d.stop()


def as_json(d: Daemon, *args) -> dict:
    return json.loads(d.cli(*args).stdout)


def wait_for(fn, timeout: float = 15.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        v = fn()
        if v:
            return v
        time.sleep(0.1)
    raise AssertionError("timed out")


RSS_KEYS = ("process_rss", "other")


def steady(devices: list[dict]) -> list[dict]:
    """The devices rows less the cpu's ``process_rss``/``other``: the daemon's RSS moves
    between two calls, the rest must not."""
    return [{k: v for k, v in d.items() if k not in RSS_KEYS} for d in devices]


def assert_rss_sane(devices: list[dict]) -> bool:
    """The cpu row carries the daemon's RSS (> 0) and the part of it the ledger does not charge."""
    (cpu,) = [d for d in devices if d["device"] == "cpu"]
    assert cpu["process_rss"] > 0 and 0 <= cpu["other"] <= cpu["process_rss"]
    return True


def without_other(lines: list[str]) -> list[list[str]]:
    """Table lines' cells (columns are 3+ spaces apart) less the last one, OTHER: it shows
    the daemon's RSS, which moves between two calls."""
    return [re.split(r" {3,}", ln.strip())[:-1] for ln in lines]


def test_i12_6_top_once_json_carries_what_the_table_shows(mem_daemon):
    d = mem_daemon
    d.cli("load", "tiny", "--keep-alive", "1h")
    try:
        top = as_json(d, "top", "--once", "--json")
        ps, status = as_json(d, "ps", "--json"), as_json(d, "status", "--json")
        assert list(top) == ["devices", "instances", "evicted", "jobs"]
        assert top["instances"] == ps["instances"] and top["evicted"] == ps["evicted"]
        assert top["jobs"] == ps["jobs"] and steady(top["devices"]) == steady(status["devices"])
        assert_rss_sane(top["devices"]) and assert_rss_sane(status["devices"])
        (inst,) = top["instances"]
        assert inst["model"] == "tiny:latest" and inst["tier"] == "device" and inst["keep_alive"] == 3600
        assert [x["device"] for x in top["devices"]] and all("budget" in x for x in top["devices"])
        lines = d.cli("top", "--once").stdout.splitlines()
        row = next(ln.split() for ln in lines if ln.split()[:2] == [str(inst["id"]), "tiny:latest"])
        assert row[2:4] == ["device", inst["state"]]
        for dev in top["devices"]:
            assert any(ln.split()[:1] == [dev["device"]] for ln in lines), dev
        assert any(ln.startswith("host ") for ln in lines)
        # free and status draw the same devices table
        free_json = as_json(d, "free", "--json")
        assert list(free_json) == ["devices"] and steady(free_json["devices"]) == steady(status["devices"])
        free = d.cli("free").stdout
        header = ["DEVICE", "BUDGET", "INSTANCES", "JOBS", "RESERVED", "FREE", "OTHER"]
        assert free.splitlines()[0].split() == header
        free_lines = free.strip().splitlines()
        status_lines = d.cli("status").stdout.splitlines()
        at = next(i for i, ln in enumerate(status_lines) if ln.split() == header)
        assert without_other(status_lines[at:at + len(free_lines)]) == without_other(free_lines)
    finally:
        d.cli("unload", "tiny")


def test_i12_3_pin_unpin_and_keep_alive_flags_reach_the_daemon(mem_daemon):
    d = mem_daemon

    def row():
        (i,) = [i for i in as_json(d, "ps", "--json")["instances"] if i["state"] != "unloading"]
        return i
    try:
        d.cli("load", "tiny", "--keep-alive", "10m", "--priority", "5")
        i = row()
        assert (i["keep_alive"], i["priority"], i["pinned"]) == (600, 5, False)
        assert i["expires_at"] == pytest.approx(i["last_used"] + 600)
        assert "pinned instance" in d.cli("pin", "tiny").stdout and row()["pinned"] is True
        assert "pinned" in d.cli("ps").stdout
        assert "unpinned instance" in d.cli("unpin", str(i["id"])).stdout and row()["pinned"] is False
        d.cli("load", "tiny", "--pin")                    # already loaded: the pin applies to it
        assert row()["pinned"] is True
        d.cli("unpin", "tiny")
        d.cli("generate", "tiny", "hi", "--max-tokens", "2", "--keep-alive", "30s")
        assert row()["keep_alive"] == 30
        d.cli("score", "tiny", "To be, or not to be", "--keep-alive", "-1")
        assert row()["keep_alive"] == -1 and "forever" in d.cli("ps").stdout
        d.cli("generate", "tiny", "hi", "--max-tokens", "2", "--keep-alive", "0")
        wait_for(lambda: not [i for i in as_json(d, "ps", "--json")["instances"] if i["state"] != "unloading"])
    finally:
        d.cli("unload", "tiny")
    r = d.cli("load", "tiny", "--keep-alive", "5x", check=False)
    assert r.returncode == errors.EX_USAGE and "not a duration" in r.stderr
    r = d.cli("pin", "tiny", check=False)                 # not loaded: named, with the fix
    assert r.returncode == errors.EX_NOINPUT and "not loaded" in r.stderr


def test_i12_6_top_in_a_terminal_quits_on_q_and_on_ctrl_c(mem_daemon):
    """The live view in a pseudo-terminal: frames are drawn, q (then SIGINT, as Ctrl-C sends)
    ends it with status 0, the screen and the terminal's modes restored."""
    import fcntl
    import termios
    for stop in ("q", "sigint"):
        master, slave = os.openpty()
        fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 120, 0, 0))
        before = termios.tcgetattr(slave)
        p = subprocess.Popen([sys.executable, "-m", "llmctl.cli", "top", "-d", "0.2"], stdin=slave,
                             stdout=slave, stderr=slave, env=mem_daemon.env, start_new_session=True)
        try:
            out = read_until(master, b"llmosd top - ", 30)
            out += read_until(master, b"llmosd top - ", 10)        # a second frame: it refreshes
            if stop == "q":
                os.write(master, b"q")
            else:
                p.send_signal(signal.SIGINT)
            assert p.wait(20) == 0
            out += read_until(master, b"\x1b[?1049l", 5)
            assert out.startswith(b"\x1b[?1049h") and out.rstrip().endswith(b"\x1b[?25h\x1b[?1049l")
            assert termios.tcgetattr(slave) == before, stop
        finally:
            if p.poll() is None:
                p.kill()
                p.wait()
            os.close(master)
            os.close(slave)


def read_until(fd: int, needle: bytes, timeout: float) -> bytes:
    """Bytes from ``fd`` until ``needle`` has arrived (AssertionError after ``timeout`` s)."""
    buf, deadline = b"", time.monotonic() + timeout
    while needle not in buf:
        left = deadline - time.monotonic()
        assert left > 0, f"{needle!r} not seen in {buf[-500:]!r}"
        if select.select([fd], [], [], left)[0]:
            buf += os.read(fd, 65536)
    return buf


def test_i12_6_chat_says_a_swap_in_as_generate_does(monkeypatch, capsys):
    """``chat`` (and ``run`` without a prompt) waiting for a swapped instance says "swapping X
    back in...", as ``generate -v`` does (``infer.waiting_text``); a load still says loading."""
    import io

    from llmctl.cli.repl import ChatSession

    class Gen:
        def __init__(self, wait):
            self.chunks = [{"loading": "tiny:latest", **wait}]
            self._it, self.stats = iter(["", "ok"]), {"finish_reason": "stop"}

        def __iter__(self):
            return self._it

        def cancel(self):
            return self.stats

    class Client:
        waits = [{"wait": "swap_in"}, {}]

        def chat(self, model, messages, **opts):
            return Gen(self.waits.pop(0))

    class Tty(io.StringIO):
        def isatty(self):
            return True
    lines = iter(["hello", "again"])

    def fake_input(prompt=""):
        try:
            return next(lines)
        except StopIteration:
            raise EOFError
    monkeypatch.setattr("builtins.input", fake_input)
    ChatSession(Client(), "tiny", {}).run(Tty(), io.StringIO())
    err = capsys.readouterr().err
    assert "swapping tiny:latest back in..." in err and "loading tiny:latest..." in err
