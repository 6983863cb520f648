"""Issue 14.3: remote access over tcp:// only with CURVE keys (made by `llmctl keygen`)."""
from __future__ import annotations

import socket
import subprocess
import sys
import time

import pytest

from conftest import Daemon
from llmctl import Client
from llmctl.errors import DaemonUnavailable


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def keygen(*args: str) -> str:
    r = subprocess.run([sys.executable, "-m", "llmctl.cli", "keygen", *args],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    return r.stdout


@pytest.fixture
def keys(tmp_path, monkeypatch):
    """Server and client key pairs; the client's public key authorized; the test process
    (and llmctl subprocesses) use the client's keys and know the server's public key."""
    d = tmp_path / "keys"
    keygen("--server", "--dir", str(d / "server"))
    keygen("--dir", str(d / "client"))
    keygen("--dir", str(d / "stranger"))
    (d / "authorized").mkdir()
    (d / "authorized" / "alice.key").write_bytes((d / "client" / "client.key").read_bytes())
    env = {"LLMCTL_CLIENT_KEY": str(d / "client" / "client.key_secret"),
           "LLMOSD_SERVER_KEY": str(d / "server" / "server.key"),
           "LLMOSD_CURVE_SERVER_KEY": str(d / "server" / "server.key_secret"),
           "LLMOSD_CURVE_AUTHORIZED_DIR": str(d / "authorized")}
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    return d, env


def tcp_daemon(base, env) -> Daemon:
    d = Daemon(base, env=env)
    d.sock = d.env["LLMOSD_SOCKET"] = f"tcp://127.0.0.1:{free_port()}"
    return d


def test_i14_3_tcp_with_the_right_key_works(tmp_path, keys):
    d = tcp_daemon(tmp_path / "d", keys[1])
    try:
        d.start()
        with Client(d.sock, connect_timeout=5) as c:
            assert c.ping() is not None
            c.ls()
        assert d.cli("ls").returncode == 0
    finally:
        d.stop()
    assert "tcp with CURVE: 1 authorized client key(s)" in d.log.read_text()


def test_i14_3_tcp_with_a_wrong_key_is_refused_and_logged(tmp_path, keys, monkeypatch):
    kdir, env = keys
    d = tcp_daemon(tmp_path / "d", env)
    try:
        d.start()
        monkeypatch.setenv("LLMCTL_CLIENT_KEY", str(kdir / "stranger" / "client.key_secret"))
        t0 = time.monotonic()
        with pytest.raises(DaemonUnavailable) as e:
            Client(d.sock, connect_timeout=1.5).connect()
        assert time.monotonic() - t0 < 10
        assert "refused this client's key or does not answer" in str(e.value)
        assert "keygen" in e.value.hint
        stranger = (kdir / "stranger" / "client.key").read_text()
        deadline = time.monotonic() + 10
        while "not authorized" not in d.log.read_text() and time.monotonic() < deadline:
            time.sleep(0.1)
        line = next(ln for ln in d.log.read_text().splitlines() if "not authorized" in ln)
        assert "WARNING" in line and "127.0.0.1" in line
        assert line.split("CURVE key ")[1].split()[0] in stranger   # the refused key is named
    finally:
        d.stop()


def test_i14_3_tcp_without_keys_refuses_to_start(tmp_path, keys):
    env = {**keys[1], "LLMOSD_CURVE_SERVER_KEY": str(tmp_path / "missing.key_secret")}
    d = tcp_daemon(tmp_path / "d", env)
    try:
        d.start(wait=False)
        assert d.proc.wait(60) == 78
    finally:
        d.stop()
    log = d.log.read_text()
    assert "missing.key_secret does not exist" in log and "llmctl keygen --server" in log
