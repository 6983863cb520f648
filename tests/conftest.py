"""Shared fixtures: a real llmosd subprocess on a temporary socket and state directory.

Every daemon a test starts through :class:`Daemon` is registered; each test's teardown stops
the ones it left running (and fails the test for it), and the end of the session fails the run
if any llmosd started under this session's temporary directory is still alive.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

# A test run started in the background of a non-interactive shell (`.ci/run &`) inherits
# SIGINT ignored, and so would every llmctl the tests start: the Ctrl-C tests would send a
# signal nobody hears.  Tests start their processes with the default disposition.
if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)

ROOT = Path(__file__).resolve().parent.parent
# Public-domain text carried in the repository (tests need nothing outside it).
SHAKESPEARE = ROOT / "tests" / "data" / "tinyshakespeare.txt"
TINY = ["--layers", "2", "--dim", "64", "--heads", "4", "--kv-heads", "2", "--vocab-size", "512"]


def train_bpe(vocab_size: int = 400):
    """A byte-level BPE tokenizer (``tokenizers``) trained on Shakespeare, with three ChatML
    special tokens at ids 0..2."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tk.train_from_iterator(SHAKESPEARE.read_text()[:100_000].splitlines(), trainer)
    return tk


# Every Daemon ever started in this process, in start order (see leftovers()).
STARTED: list["Daemon"] = []


class FakeStream:
    """A stream as a handler sees it (``server.Stream``), recording what it was given; for unit
    tests that inject it."""

    def __init__(self):
        self.chunks, self.result, self.err = [], None, None

    def chunk(self, body, on_sent=None):
        self.chunks.append(body)

    def end(self, body):
        self.result = body

    def error(self, err):
        self.err = err


class Daemon:
    """One llmosd process, in its own session (process group = its pid, with its job workers).
    ``cli()`` runs llmctl against it; ``client()`` gives a Client; ``stop()`` always cleans up."""

    def __init__(self, base: Path, env: dict | None = None):
        self.base = base
        self.rundir = base / "run"
        self.sock = f"ipc://{self.rundir}/llmosd.sock"
        self.state = base / "state"
        self.env = {**os.environ, "LLMOSD_SOCKET": self.sock, "LLMOSD_THREADS": "1",
                    "PYTHONUNBUFFERED": "1", **(env or {})}
        self.env.pop("LLMOSD_CONFIG", None)
        self.proc: subprocess.Popen | None = None
        self.pids: list[int] = []        # every daemon pid this object started (restarts too)
        self.outlives_test = False       # set by fixtures wider than a test (shared_daemon)
        self.log = base / "llmosd.log"
        self._logf = None

    def start(self, *extra: str, wait: bool = True) -> "Daemon":
        """Start (or restart, after stop/kill9) the daemon; with ``wait``, until it answers ping."""
        self.base.mkdir(parents=True, exist_ok=True)
        self._close_log()
        self._logf = open(self.log, "ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "llmosd", "--socket", self.sock, "--state-dir", str(self.state),
             "--config", "/dev/null", "--log-level", "debug", *extra],
            stdout=self._logf, stderr=subprocess.STDOUT, env=self.env, start_new_session=True)
        self.pids.append(self.proc.pid)
        if self not in STARTED:
            STARTED.append(self)
        if wait:
            self.wait_ready()
        return self

    def wait_ready(self, timeout: float = 60.0) -> None:
        from llmctl import Client
        from llmctl.errors import DaemonUnavailable
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"llmosd exited with {self.proc.returncode}:\n{self.log.read_text()}")
            try:
                with Client(self.sock, connect_timeout=1.0) as c:
                    c.ping()
                return
            except DaemonUnavailable:
                time.sleep(0.1)
        raise RuntimeError("llmosd did not become ready:\n" + self.log.read_text())

    def client(self, **kw):
        from llmctl import Client
        return Client(self.sock, **kw).connect()

    def cli(self, *args: str, input: str | bytes | None = None, timeout: float = 120,
            check: bool = True) -> subprocess.CompletedProcess:
        # no input: stdin is /dev/null, never the test runner's (a pipe that never closes would
        # make generate/run wait for a prompt on stdin)
        r = subprocess.run([sys.executable, "-m", "llmctl.cli", *args], input=input,
                           stdin=subprocess.DEVNULL if input is None else None,
                           capture_output=True, env=self.env, timeout=timeout,
                           text=not isinstance(input, bytes))
        if check and r.returncode != 0:
            raise AssertionError(f"llmctl {' '.join(args)} exited {r.returncode}:\n{r.stdout}\n{r.stderr}")
        return r

    def alive(self) -> bool:
        """True while the daemon or anything else in its process group (job workers) runs."""
        running = self.proc is not None and self.proc.poll() is None
        return running or bool(group_members(self.pids, self.env["LLMOSD_SOCKET"]))

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 20.0) -> int:
        """Send ``sig``, wait up to ``timeout`` s, then SIGKILL whatever is left in the process
        group (a hung daemon, job workers); close the log.  Safe to call at any time, any number
        of times, also after ``kill9()`` or a crash.  Returns the daemon's exit status (negative:
        killed by that signal; 0 if never started)."""
        p = self.proc
        if p is None:
            return 0
        try:
            if p.poll() is None:
                p.send_signal(sig)
                try:
                    p.wait(timeout)
                except subprocess.TimeoutExpired:
                    pass
        finally:
            kill_groups(self.pids, self.env["LLMOSD_SOCKET"])
            if p.poll() is None:
                p.wait(10)
            self._close_log()
        return p.returncode

    def kill9(self) -> None:
        """SIGKILL the daemon alone (its workers must die by themselves)."""
        self.proc.kill()
        self.proc.wait()
        self._close_log()

    def _close_log(self) -> None:
        if self._logf is not None:
            self._logf.close()
            self._logf = None


def _live_processes() -> dict[int, tuple[int, list[str], str | None]]:
    """{pid: (process group, argv, its LLMOSD_SOCKET or None)} of every live (not zombie)
    process of ours, from one /proc scan."""
    out = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat") as f:
                rest = f.read().rsplit(")", 1)[1].split()
            with open(f"/proc/{name}/cmdline", "rb") as f:
                argv = f.read().decode(errors="replace").split("\0")
            with open(f"/proc/{name}/environ", "rb") as f:
                env = f.read().split(b"\0")
        except (OSError, IndexError):
            continue                                  # gone meanwhile, or not ours
        if rest[0] != "Z":
            sock = next((e[14:].decode(errors="replace") for e in env if e.startswith(b"LLMOSD_SOCKET=")), None)
            out[int(name)] = (int(rest[2]), argv, sock)
    return out


def group_members(pgids: list[int], sock: str) -> list[int]:
    """Live processes in one of the process groups ``pgids`` that carry ``LLMOSD_SOCKET=sock``
    (inherited from the Daemon's environment; it tells our processes from a later, unrelated
    process group that reuses a pid)."""
    wanted = set(pgids)
    return [pid for pid, (pg, _, s) in _live_processes().items() if pg in wanted and s == sock]


def kill_groups(pgids: list[int], sock: str) -> None:
    """SIGKILL those of the process groups ``pgids`` that still have members of ours (see
    group_members), and wait (briefly) for them to go."""
    wanted = set(pgids)
    for pgid in {pg for pg, _, s in _live_processes().values() if pg in wanted and s == sock}:
        try:
            os.killpg(pgid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
    deadline = time.monotonic() + 5
    while group_members(pgids, sock) and time.monotonic() < deadline:
        time.sleep(0.05)


def leftovers(daemons: list[Daemon], basetemp: Path | None) -> list[str]:
    """Describe every live process that the given daemons started (their process groups: the
    daemon and its job workers), and every live llmosd whose command line names a path under
    ``basetemp`` (this session's pytest temporary directory) however it was started; then kill
    them all.  Empty when everything had been stopped."""
    base = str(basetemp).rstrip("/") + "/" if basetemp else None
    owner = {(pgid, d.env["LLMOSD_SOCKET"]): d for d in daemons for pgid in d.pids}
    found: dict[int, str] = {}
    to_stop: dict[int, Daemon] = {}
    for pid, (pgid, argv, sock) in _live_processes().items():
        cmd = " ".join(argv).strip()
        d = owner.get((pgid, sock))
        if d is not None:
            found[pid] = f"pid {pid} (in the group of the llmosd at {d.base}): {cmd}"
            to_stop[id(d)] = d
        elif base and any(a == "llmosd" or a.endswith("/llmosd") for a in argv[:4]) \
                and any(base in a for a in argv):
            found[pid] = f"pid {pid}: {cmd}"
    for d in to_stop.values():
        d.stop(timeout=5)
    for pid in found:                                 # strays no Daemon object knows
        try:
            os.kill(pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
    return [found[p] for p in sorted(found)]


def assert_refused_store_unchanged(daemon: Daemon, args: tuple, needle: str, code: int = 65) -> None:
    """Run llmctl ARGS: it must fail with exit ``code`` and ``needle`` in its message, and leave
    the store (manifests, blobs, temp files) exactly as it was."""
    root = daemon.state / "store"

    def files():
        return sorted(os.listdir(root / "blobs")), sorted(os.listdir(root / "tmp"))
    before_ls, before = daemon.cli("ls", "--json").stdout, files()
    r = daemon.cli(*args, check=False)
    assert r.returncode == code and needle in r.stderr, (r.returncode, r.stderr)
    assert daemon.cli("ls", "--json").stdout == before_ls
    assert files() == before


_BASETEMP: list[Path] = []      # this session's pytest temporary directory, once known


@pytest.fixture(scope="session", autouse=True)
def _session_basetemp(tmp_path_factory):
    _BASETEMP.append(tmp_path_factory.getbasetemp())


@pytest.fixture(autouse=True)
def _no_daemon_left_by_test():
    """Fail a test (in teardown) that leaves running a daemon it (or a function-scoped fixture)
    started; kill it.  Wider fixtures are set up before this one (pytest sets up higher scopes
    first), so their daemons are not counted; one started later says so with ``outlives_test``."""
    first = len(STARTED)
    yield
    mine = [d for d in STARTED[first:] if not d.outlives_test and d.alive()]
    left = leftovers(mine, None) if mine else []
    assert not left, "the test left llmosd processes running (now killed):\n" + "\n".join(left)


@pytest.fixture
def daemon(tmp_path):
    d = Daemon(tmp_path / "d")
    try:
        yield d.start()
    finally:
        d.stop()


@pytest.fixture(scope="session")
def shared_daemon(tmp_path_factory):
    """One daemon for tests that only read or add models; holds 'tiny' already created."""
    d = Daemon(tmp_path_factory.mktemp("shared"))
    d.outlives_test = True
    try:
        d.start()
        d.cli("create", "tiny", *TINY, "--vocab-from", str(SHAKESPEARE))
        yield d
    finally:
        d.stop()


@pytest.hookimpl(wrapper=True, trylast=True)
def pytest_sessionfinish(session):
    """After every fixture is torn down: fail the run if any daemon the tests started (or any
    llmosd under this session's temporary directory) is still alive; kill those and name them."""
    result = yield
    left = leftovers(list(STARTED), _BASETEMP[0] if _BASETEMP else None)
    if left:
        msg = "llmosd processes left running by the tests (now killed):\n  " + "\n  ".join(left)
        tr = session.config.pluginmanager.get_plugin("terminalreporter")
        if tr is not None:
            tr.write_line(msg, red=True, bold=True)
        else:
            sys.stderr.write(msg + "\n")
        if session.exitstatus == pytest.ExitCode.OK:
            session.exitstatus = pytest.ExitCode.TESTS_FAILED
    return result
