"""Ownership across users (issue 14, acceptance 2), end to end: real users made with useradd
run llmctl (through setpriv) against one daemon whose socket lets them in."""
from __future__ import annotations

import os
import pwd
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from conftest import SHAKESPEARE, TINY, Daemon

pytestmark = [
    pytest.mark.skipif(os.getuid() != 0, reason="creating users needs root"),
    pytest.mark.skipif(not all(shutil.which(t) for t in ("useradd", "userdel", "groupadd", "groupdel",
                                                          "setpriv")),
                       reason="needs useradd, userdel, groupadd, groupdel and setpriv"),
]

ARCH = ["--tokenizer", "char", "--layers", "2", "--dim", "64", "--heads", "4", "--block-size", "32",
        "--batch-size", "8", "--device", "cpu", "--seed", "1"]


def _run(*cmd: str) -> None:
    subprocess.run(cmd, check=True, capture_output=True, timeout=60)


@pytest.fixture
def people():
    """{"alice", "bob", "admin": (name, uid, gid)} and the admin group's name: made now,
    removed in teardown whatever happened."""
    tag = secrets.token_hex(3)
    group = f"o1adm{tag}"
    made_users, made_group = [], False
    try:
        _run("groupadd", group)
        made_group = True
        out = {}
        for who in ("alice", "bob", "admin"):
            name = f"o1{who[:3]}{tag}"
            extra = ["-G", group] if who == "admin" else []
            _run("useradd", "-M", "-N", "-s", "/usr/sbin/nologin", *extra, name)
            made_users.append(name)
            pw = pwd.getpwnam(name)
            out[who] = (name, pw.pw_uid, pw.pw_gid)
        yield out, group
    finally:
        for name in made_users:
            subprocess.run(["userdel", name], capture_output=True, timeout=60)
        if made_group:
            subprocess.run(["groupdel", group], capture_output=True, timeout=60)


@pytest.fixture
def shared(people):
    """A daemon (as root) whose socket anyone may reach, with the admin group configured."""
    (users, group) = people
    base = Path(tempfile.mkdtemp(prefix="llmosd-o1-", dir="/tmp"))
    d = None
    try:
        os.chmod(base, 0o755)
        (base / "run").mkdir(mode=0o755)
        os.chmod(base / "run", 0o755)
        conf = base / "llmosd.toml"
        conf.write_text(f'socket_mode = "666"\nadmin_group = "{group}"\n'
                        f'[quotas.users.{users["bob"][0]}]\nmax_jobs = 1\nmax_device_bytes = "1KiB"\n')
        text = base / "text.txt"
        text.write_text(SHAKESPEARE.read_text()[:20_000])
        os.chmod(text, 0o644)
        d = Daemon(base).start("--config", str(conf))
        yield d, users, text
    finally:
        if d is not None:
            d.stop()
        shutil.rmtree(base, ignore_errors=True)


def as_user(d: Daemon, who: tuple, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    """llmctl ARGS as user ``who`` (name, uid, gid), with that user's groups."""
    name, uid, gid = who
    env = {k: v for k, v in d.env.items() if not k.startswith("XDG_")}
    env.update(HOME=str(d.base), USER=name, LOGNAME=name, PYTHONDONTWRITEBYTECODE="1")
    return subprocess.run(["setpriv", f"--reuid={uid}", f"--regid={gid}", "--init-groups",
                           sys.executable, "-m", "llmctl.cli", *args],
                          stdin=subprocess.DEVNULL, capture_output=True, text=True, env=env, timeout=timeout)


def ok(r: subprocess.CompletedProcess) -> str:
    assert r.returncode == 0, f"exit {r.returncode}:\n{r.stdout}\n{r.stderr}"
    return r.stdout


def denied(r: subprocess.CompletedProcess, owner: tuple) -> None:
    """Refused with permission_denied (exit 77), naming the owner by name and uid."""
    assert r.returncode == 77, f"exit {r.returncode}:\n{r.stdout}\n{r.stderr}"
    assert f"uid {owner[1]} ({owner[0]})" in r.stderr, r.stderr


def test_i14_2_users_cannot_touch_each_others_things(shared):
    d, users, text = shared
    alice, bob, admin = users["alice"], users["bob"], users["admin"]
    ok(as_user(d, alice, "create", "amodel", *TINY, "--vocab-from", str(SHAKESPEARE)))
    ok(as_user(d, alice, "load", "amodel"))
    job = int(ok(as_user(d, alice, "train", "atrain", "--data", str(text), *ARCH,
                         "--max-steps", "100000")).split()[0])

    # what alice owns is shown as hers
    ls = ok(d.cli("ls")).splitlines()
    assert "OWNER" in ls[0] and any(line.startswith("amodel") and alice[0] in line for line in ls[1:])
    assert alice[0] in ok(d.cli("jobs"))

    # bob may not unload, cancel or rm any of it; nothing changes
    denied(as_user(d, bob, "unload", "amodel"), alice)
    denied(as_user(d, bob, "cancel", str(job)), alice)
    denied(as_user(d, bob, "rm", "amodel"), alice)
    assert "amodel" in ok(d.cli("ps"))
    assert any(line.startswith("amodel") for line in ok(d.cli("ls")).splitlines())
    # ...but may use it (shared_inference is on by default)
    ok(as_user(d, bob, "generate", "amodel", "to be", "--max-tokens", "2"))

    # bob's tag of alice's model is bob's: he may remove it, and it leaves hers alone
    ok(as_user(d, bob, "tag", "amodel", "bcopy"))
    assert any(line.startswith("bcopy") and bob[0] in line for line in ok(d.cli("ls")).splitlines())
    # bob's device-bytes quota (1 KiB) counts what the memory manager would charge: a load of
    # his own, explicit or implied by a request, is refused with the numbers
    for cmd in (("load", "bcopy"), ("generate", "bcopy", "to be", "--max-tokens", "2")):
        r = as_user(d, bob, *cmd)
        assert r.returncode == 77 and "device bytes" in r.stderr and "> quota 1.0 KB" in r.stderr, r.stderr
    ok(as_user(d, bob, "rm", "bcopy"))
    assert any(line.startswith("amodel") for line in ok(d.cli("ls")).splitlines())

    # bob's quota (max_jobs = 1): a second job is refused with the numbers
    bjob = int(ok(as_user(d, bob, "train", "btrain", "--data", str(text), *ARCH,
                          "--max-steps", "100000")).split()[0])
    r = as_user(d, bob, "train", "btrain2", "--data", str(text), *ARCH, "--max-steps", "10")
    assert r.returncode == 77 and "quota exceeded" in r.stderr and "jobs: 1 in use" in r.stderr, r.stderr
    ok(as_user(d, bob, "cancel", str(bjob)))

    # an admin (admin group) may unload it; root may cancel and rm
    ok(as_user(d, admin, "unload", "amodel"))
    ok(d.cli("cancel", str(job)))
    deadline = time.monotonic() + 60
    while "cancelled" not in ok(d.cli("jobs", "--all")) and time.monotonic() < deadline:
        time.sleep(0.2)
    ok(d.cli("rm", "amodel"))
    log = d.log.read_text()
    assert f"unload amodel:latest by uid {admin[1]}" in log
    assert "rm amodel:latest by uid 0" in log
    assert f"job {job} (train atrain:latest): cancel by uid 0" in log
    assert f"refused rm by uid {bob[1]}" in log
