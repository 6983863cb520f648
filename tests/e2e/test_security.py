"""Issue 7, local privilege and store safety: runtime directories someone else controls are
refused, lock files are never followed through links, the daemon changes the mode only of
directories it made, the store never leaves its own tree, and SIGTERM mid-forward exits 0."""
from __future__ import annotations

import json
import logging
import os
import signal
import stat
import threading
import time

import pytest

from conftest import SHAKESPEARE, TINY, Daemon
from llmctl import paths
from llmctl.errors import ConfigError
from llmosd.main import prepare_dir, raise_fd_limit, wait_for_workers
from llmosd.system import PidLock

EX_CONFIG, EX_IOERR = 78, 74
NOBODY = 65534
as_root = pytest.mark.skipif(os.getuid() != 0, reason="simulating another user needs chown (root)")


def mode_of(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def start_refused(base, *, sock_dir=None, timeout: float = 20) -> tuple[int, str]:
    """Start a daemon that must refuse to start; return its exit status and log."""
    d = Daemon(base)
    if sock_dir is not None:
        d.rundir, d.sock = sock_dir, f"ipc://{sock_dir}/llmosd.sock"
        d.env["LLMOSD_SOCKET"] = d.sock
    d.start(wait=False)
    try:
        rc = d.proc.wait(timeout)
    finally:
        d.stop(signal.SIGKILL)
    return rc, d.log.read_text()


# -- 7.1: runtime directories and lock files ----------------------------------------------------
def test_i7_1_check_private_dir(tmp_path):
    own = tmp_path / "own"
    own.mkdir(mode=0o700)
    assert paths.check_private_dir(str(own)) is None
    os.chmod(own, 0o777)
    assert "writable by group or others" in paths.check_private_dir(str(own))
    os.chmod(own, 0o1777)          # sticky but ours, not root's: only root's /tmp-likes pass
    if os.getuid() != 0:
        assert paths.check_private_dir(str(own), shared_ok=True) is not None
    os.chmod(own, 0o750)
    link = tmp_path / "link"
    link.symlink_to(own)
    assert paths.check_private_dir(str(link)) is None          # our own link to our own dir
    (tmp_path / "file").write_text("")
    assert paths.check_private_dir(str(tmp_path / "file")) == "is not a directory"
    assert paths.check_private_dir(str(tmp_path / "missing")) == "does not exist"


@as_root
def test_i7_1_check_private_dir_other_owner(tmp_path):
    other = tmp_path / "other"
    other.mkdir(mode=0o700)
    os.chown(other, NOBODY, NOBODY)
    assert paths.check_private_dir(str(other)) == f"is owned by uid {NOBODY}, not by uid 0"
    mine = tmp_path / "mine"
    mine.mkdir(mode=0o700)
    link = tmp_path / "link"
    link.symlink_to(mine)
    os.lchown(link, NOBODY, NOBODY)
    assert "symbolic link owned by uid" in paths.check_private_dir(str(link))
    shared = tmp_path / "shared"
    shared.mkdir()
    os.chmod(shared, 0o1777)       # root's, sticky: like /tmp
    assert paths.check_private_dir(str(shared), shared_ok=True) is None
    assert paths.check_private_dir(str(shared)) is not None


def test_i7_1_client_skips_squatted_user_socket(tmp_path, monkeypatch, caplog):
    rundir = tmp_path / "llmosd-squat"
    rundir.mkdir(mode=0o700)
    (rundir / "llmosd.sock").write_text("")   # exists is all the client checks
    monkeypatch.delenv("LLMOSD_SOCKET", raising=False)
    monkeypatch.setattr(paths, "user_runtime_dir", lambda: str(rundir))
    assert paths.client_default_socket() == f"ipc://{rundir}/llmosd.sock"
    os.chmod(rundir, 0o777)                   # another user could have put a socket there
    with caplog.at_level(logging.WARNING, logger="llmctl"):
        assert paths.client_default_socket() == paths.SYSTEM_SOCKET
    assert str(rundir) in caplog.text and "writable" in caplog.text
    if os.getuid() == 0:
        os.chmod(rundir, 0o700)
        os.chown(rundir, NOBODY, NOBODY)
        assert paths.client_default_socket() == paths.SYSTEM_SOCKET


def test_i7_1_squatted_runtime_dir_is_refused(tmp_path):
    squat = tmp_path / "llmosd-squat"
    squat.mkdir()
    os.chmod(squat, 0o777)
    rc, log = start_refused(tmp_path / "d", sock_dir=squat)
    assert rc == EX_CONFIG, log
    assert f"socket directory {squat} is writable by group or others" in log and "hint:" in log
    assert mode_of(squat) == 0o777 and os.listdir(squat) == []


@as_root
def test_i7_1_runtime_dir_of_another_user_is_refused(tmp_path):
    squat = tmp_path / "llmosd-0"
    squat.mkdir(mode=0o755)
    os.chown(squat, NOBODY, NOBODY)
    with pytest.raises(ConfigError) as e:
        prepare_dir(str(squat), "socket directory", hint="set XDG_RUNTIME_DIR")
    assert str(squat) in e.value.message and f"owned by uid {NOBODY}" in e.value.message
    assert "XDG_RUNTIME_DIR" in e.value.hint


def test_i7_1_lock_file_link_is_not_followed(tmp_path):
    precious = tmp_path / "root-only"
    precious.write_text("do not truncate me")
    lock = tmp_path / "llmosd.sock.lock"
    lock.symlink_to(precious)
    with pytest.raises(ConfigError) as e:
        PidLock(str(lock)).acquire()
    assert "symbolic link" in e.value.message and str(lock) in e.value.message
    assert precious.read_text() == "do not truncate me"
    lock.unlink()
    os.mkfifo(lock)                            # must not hang opening it either
    with pytest.raises(ConfigError, match="not a regular file"):
        PidLock(str(lock)).acquire()
    lock.unlink()
    held = PidLock(str(lock)).acquire()
    assert lock.read_text() == f"{os.getpid()}\n"
    held.release()
    assert not lock.exists()


@as_root
def test_i7_1_lock_file_of_another_user_is_refused(tmp_path):
    lock = tmp_path / "llmosd.lock"
    lock.write_text("12345\n")
    os.chown(lock, NOBODY, NOBODY)
    with pytest.raises(ConfigError, match=f"owned by uid {NOBODY}"):
        PidLock(str(lock)).acquire()
    assert lock.read_text() == "12345\n"


def test_i7_1_state_lock_link_refused_by_daemon(tmp_path):
    precious = tmp_path / "root-only"
    precious.write_text("secret")
    state = tmp_path / "d" / "state"
    state.mkdir(parents=True, mode=0o750)
    (state / "llmosd.lock").symlink_to(precious)
    rc, log = start_refused(tmp_path / "d")
    assert rc == EX_CONFIG, log
    assert "is a symbolic link" in log and precious.read_text() == "secret"


# -- 7.2: the daemon sets the mode only of directories it made -----------------------------------
def test_i7_2_prepare_dir_modes(tmp_path):
    old = os.umask(0o077)
    try:
        prepare_dir(str(tmp_path / "new" / "run"), "socket directory", hint="-")
    finally:
        os.umask(old)
    assert mode_of(tmp_path / "new" / "run") == 0o750        # made here: 0750 whatever the umask
    pre = tmp_path / "pre"
    pre.mkdir()
    os.chmod(pre, 0o755)
    prepare_dir(str(pre), "socket directory", hint="-")
    assert mode_of(pre) == 0o755                              # not ours: left as it was
    tmp = os.stat("/tmp")
    if tmp.st_uid == 0 and stat.S_IMODE(tmp.st_mode) == 0o1777:
        prepare_dir("/tmp", "socket directory", hint="-")     # root's sticky /tmp is fine
        assert stat.S_IMODE(os.stat("/tmp").st_mode) == 0o1777
    os.chmod(pre, 0o775)
    with pytest.raises(ConfigError, match="writable by group or others"):
        prepare_dir(str(pre), "state directory", hint="-")
    assert mode_of(pre) == 0o775


@pytest.fixture(scope="module")
def preexisting_daemon(tmp_path_factory):
    """A daemon whose socket lives in a directory that was there before it (mode 0755)."""
    base = tmp_path_factory.mktemp("sec")
    sock_dir = base / "sockets"
    sock_dir.mkdir()
    os.chmod(sock_dir, 0o755)
    d = Daemon(base / "d")
    d.rundir, d.sock = sock_dir, f"ipc://{sock_dir}/llmosd.sock"
    d.env["LLMOSD_SOCKET"] = d.sock
    try:
        yield d.start()
    finally:
        d.stop()


def test_i7_2_socket_parent_mode_untouched(preexisting_daemon):
    d = preexisting_daemon
    assert mode_of(d.rundir) == 0o755
    assert mode_of(d.state) == 0o750                          # made by the daemon
    assert d.cli("status").returncode == 0


# -- 7.3: the store never leaves its own tree -----------------------------------------------------
def test_i7_3_store_symlinks_not_followed(preexisting_daemon, tmp_path):
    d = preexisting_daemon
    outside = tmp_path / "outside.json"
    outside.write_text(json.dumps({"lineage": {"method": "planted"}}))
    evil = d.state / "store" / "manifests" / "evil"
    evil.mkdir()
    (evil / "latest").symlink_to(outside)
    try:
        assert "evil" not in d.cli("ls", "--json").stdout
        r = d.cli("rm", "evil", check=False)
        assert r.returncode == EX_IOERR and "symbolic link" in r.stderr, r.stderr
        assert str(d.state) not in r.stderr
        r = d.cli("show", "evil", check=False)
        assert r.returncode == EX_IOERR and "planted" not in r.stdout
        assert outside.exists() and "planted" in outside.read_text()
    finally:
        (evil / "latest").unlink()
        evil.rmdir()


def test_i7_3_store_tmp_link_refused_at_start(tmp_path):
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    (outside / "precious").write_text("keep")
    store = tmp_path / "d" / "state" / "store"
    store.mkdir(parents=True, mode=0o750)
    os.chmod(store.parent, 0o750)
    (store / "tmp").symlink_to(outside)
    rc, log = start_refused(tmp_path / "d")
    assert rc == EX_IOERR, log
    assert "is a symbolic link" in log
    assert (outside / "precious").read_text() == "keep"


# -- 7.10 (main part) and the descriptor limit ----------------------------------------------------
def test_i7_10_wait_for_workers_is_bounded():
    stop = threading.Event()
    t = threading.Thread(target=stop.wait, args=(30,), name="engine-99", daemon=True)
    t.start()
    try:
        t0 = time.monotonic()
        assert wait_for_workers(0.2) == ["engine-99"]
        assert time.monotonic() - t0 < 2
    finally:
        stop.set()
        t.join()
    assert wait_for_workers(0.2) == []


def test_i7_4_fd_soft_limit_raised():
    import resource
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(soft, 1024), hard))
        raise_fd_limit()
        want = 65536 if hard == resource.RLIM_INFINITY else min(hard, 65536)
        assert resource.getrlimit(resource.RLIMIT_NOFILE)[0] == max(want, min(soft, 1024))
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def test_i7_10_sigterm_exits_0(tmp_path):
    """SIGTERM while the engine is deep in a long score: exit 0, never 134 (abort)."""
    d = Daemon(tmp_path / "d", env={"LLMOSD_SHUTDOWN_GRACE_S": "0.5"}).start()
    try:
        d.cli("create", "tiny", *TINY, "--vocab-from", str(SHAKESPEARE))
        with d.client() as c:
            c.load("tiny")
        text, done = SHAKESPEARE.read_text(), {}

        def score():
            try:
                with d.client(timeout=60) as c:
                    done["result"] = c.score("tiny", text)
            except Exception as e:             # cancelled or shut down: what we expect
                done["error"] = e
        t = threading.Thread(target=score, daemon=True)
        t.start()
        time.sleep(1.0)                         # well inside the forward passes
        t0 = time.monotonic()
        rc = d.stop(signal.SIGTERM, timeout=30)
        assert rc == 0, d.log.read_text()[-3000:]
        assert time.monotonic() - t0 < 15
        t.join(30)
        assert "terminate called" not in d.log.read_text()
    finally:
        d.stop(signal.SIGKILL)
