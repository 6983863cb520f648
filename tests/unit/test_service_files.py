"""Issue 14, service life: the systemd files `llmosd install-service` writes, and the watchdog."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from llmosd import service
from llmosd.system import Watchdog, watchdog_interval

ROOT = Path(__file__).resolve().parents[2]


def test_i14_1_shipped_files_are_the_ones_install_service_writes():
    shipped = ROOT / "systemd"
    assert (shipped / "llmosd.service").read_text() == service.unit_text()
    assert (shipped / "llmosd.sysusers").read_text() == service.SYSUSERS
    assert (shipped / "llmosd.tmpfiles").read_text() == service.TMPFILES
    assert (shipped / "llmosd.toml").read_text() == service.SAMPLE_CONFIG
    assert (shipped / "llmosd-http.service").read_text() == service.http_unit_text()


def test_i14_1_unit_has_the_service_settings_the_issue_names():
    unit = service.unit_text()
    for line in ("Type=notify", "User=llmosd", "Group=llmos", "RuntimeDirectory=llmosd",
                 "StateDirectory=llmosd", "ConfigurationDirectory=llmosd", "RestartPreventExitStatus=78",
                 "ExecReload=/bin/kill -HUP $MAINPID", "ExecStart=/usr/local/bin/llmosd --system"):
        assert f"\n{line}\n" in unit, line
    assert "WatchdogSec=" in unit and "DeviceAllow=" in unit and "SupplementaryGroups=" in unit
    assert "\nMemoryDenyWriteExecute=" not in unit        # breaks torch's oneDNN kernels: a comment says so


def test_i14_1_install_service_writes_this_installations_unit(tmp_path):
    r = subprocess.run([sys.executable, "-m", "llmosd", "install-service", "--prefix", str(tmp_path)],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    unit = (tmp_path / "etc/systemd/system/llmosd.service").read_text()
    assert f"\nExecStart={os.path.abspath(sys.executable)} -m llmosd --system\n" in unit
    assert (tmp_path / "etc/sysusers.d/llmosd.conf").read_text() == service.SYSUSERS
    assert (tmp_path / "etc/tmpfiles.d/llmosd.conf").read_text() == service.TMPFILES
    conf = tmp_path / "etc/llmosd/llmosd.toml"
    assert conf.read_text() == service.SAMPLE_CONFIG
    for step in ("systemd-sysusers", "systemd-tmpfiles --create", "systemctl daemon-reload",
                 "systemctl enable --now llmosd"):
        assert step in r.stdout
    conf.write_text("[llmosd]\nmax_jobs = 2\n")           # an administrator's config is kept
    service.install(str(tmp_path), out=open(os.devnull, "w"))
    assert conf.read_text() == "[llmosd]\nmax_jobs = 2\n"


def test_i14_1_install_service_dry_run_writes_nothing(tmp_path):
    r = subprocess.run([sys.executable, "-m", "llmosd", "install-service", "--prefix", str(tmp_path),
                        "--dry-run"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert "would write" in r.stdout and "Type=notify" in r.stdout
    assert list(tmp_path.iterdir()) == []


def test_i14_1_code_under_home_gets_protecthome_read_only():
    assert service.needs_home(["/home/ann/venv/bin/python"]) and service.needs_home(["/root/x"])
    assert not service.needs_home(["/usr/bin/python3", "/opt/llmosd", "/homework/x"])
    files = service.plan("/nonexistent-prefix", python="/home/ann/venv/bin/python", man_pages=[])
    unit = files["/nonexistent-prefix/etc/systemd/system/llmosd.service"]
    assert "\nProtectHome=read-only\n" in unit and "Documentation=" not in unit


@pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("systemd-sysusers"),
                    reason="systemd-sysusers --root needs root")
def test_i14_1_sysusers_creates_user_llmosd_in_group_llmos(tmp_path):
    (tmp_path / "etc").mkdir()
    f = tmp_path / "llmosd.conf"
    f.write_text(service.SYSUSERS)
    subprocess.run(["systemd-sysusers", f"--root={tmp_path}", str(f)], check=True, capture_output=True)
    passwd = (tmp_path / "etc/passwd").read_text().splitlines()
    group = (tmp_path / "etc/group").read_text().splitlines()
    gid = next(line.split(":")[2] for line in group if line.startswith("llmos:"))
    user = next(line.split(":") for line in passwd if line.startswith("llmosd:"))
    assert user[3] == gid and user[5] == "/var/lib/llmosd"


def test_i14_1_watchdog_interval_is_for_this_process_only():
    assert watchdog_interval({"WATCHDOG_USEC": "1000000"}) == 1.0
    assert watchdog_interval({"WATCHDOG_USEC": "1000000", "WATCHDOG_PID": str(os.getpid())}) == 1.0
    assert watchdog_interval({"WATCHDOG_USEC": "1000000", "WATCHDOG_PID": "1"}) is None
    assert watchdog_interval({}) is None and watchdog_interval({"WATCHDOG_USEC": "x"}) is None
    assert Watchdog.from_env({}) is None
    assert Watchdog.from_env({"WATCHDOG_USEC": "4000000"}).period == 2.0
    assert Watchdog.from_env({"NOTIFY_SOCKET": "/x"}).ping is False


def test_i14_1_watchdog_pings_only_when_the_loop_runs_its_probe():
    sent: list[str] = []
    w = Watchdog(0.05, ping=True, notify=lambda s: sent.append(s) or True)
    assert w.beat(0.05) and sent == ["WATCHDOG=1"]          # start-up: before the loop exists
    sent.clear()
    w.attach(lambda fn: None, lambda: "busy")               # a hung loop: the probe never runs
    assert not w.beat(0.05) and sent == []

    def loop_post(fn):                                      # a live loop runs it (on its thread)
        threading.Thread(target=fn).start()
    w.attach(loop_post, lambda: "listening; 1 instance(s)")
    assert w.beat(1.0) and w.beat(1.0)
    assert sent == ["WATCHDOG=1\nSTATUS=listening; 1 instance(s)", "WATCHDOG=1"]   # status once


def test_i14_1_status_only_watchdog_sends_no_pings():
    sent: list[str] = []
    w = Watchdog(0.05, ping=False, notify=lambda s: sent.append(s) or True)
    w.attach(lambda fn: fn(), lambda: "listening")
    assert w.beat(0.05) and w.beat(0.05)
    assert sent == ["STATUS=listening"]
