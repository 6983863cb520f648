"""The daemon's dealings with its host: the single-instance lock, systemd notification and the
watchdog."""
from __future__ import annotations

import errno
import fcntl
import logging
import os
import socket
import stat
import threading
import time
from typing import Callable

from llmctl.errors import ConfigError

log = logging.getLogger("llmosd")


def open_private_file(path: str, what: str, mode: int = 0o640) -> int:
    """Open (creating if missing) a read-write file of ours at ``path`` without following a
    symbolic link: a link planted there (say to a root-only file) is refused, never truncated.

    Raises ConfigError for a link, a non-regular file, or a file owned by another user."""
    flags = os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK
    try:
        fd = os.open(path, flags, mode)
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise ConfigError(f"{what} {path} is a symbolic link; llmosd does not follow links there",
                              hint="remove it (someone else may have planted it) and start again") from None
        raise
    st = os.fstat(fd)
    problem = ("is not a regular file" if not stat.S_ISREG(st.st_mode) else
               f"is owned by uid {st.st_uid}, not by uid {os.geteuid()}" if st.st_uid != os.geteuid()
               else None)
    if problem:
        os.close(fd)
        raise ConfigError(f"{what} {path} {problem}",
                          hint="remove it (someone else may have made it) and start again")
    os.set_blocking(fd, True)
    return fd


class PidLock:
    """An exclusive flock on ``path``, holding our pid.  Released (and the file removed) on close.

    libzmq silently unlinks and re-creates an ipc socket that is in use, stealing it from a
    running daemon; taking this lock before binding is what makes a second daemon refuse.
    """

    def __init__(self, path: str):
        self.path, self.fd = path, None

    def acquire(self) -> "PidLock":
        while True:
            fd = open_private_file(self.path, "lock file")
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                other = os.read(fd, 32).decode(errors="replace").strip()[:20]
                os.close(fd)
                raise ConfigError(f"another llmosd (pid {other or '?'}) is already running on this "
                                  f"socket/state (lock {self.path})",
                                  hint="stop it first, or give this one its own --socket and --state-dir") from None
            # the holder may have removed the file between our open and flock: retry then
            st = os.fstat(fd)
            try:
                same = os.lstat(self.path).st_ino == st.st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self.fd = fd
        return self

    def release(self, remove: bool = True) -> None:
        if self.fd is None:
            return
        if remove:
            try:
                os.unlink(self.path)
            except FileNotFoundError:
                pass
        os.close(self.fd)
        self.fd = None


def sd_notify(state: str) -> bool:
    """Send ``state`` (e.g. 'READY=1') to $NOTIFY_SOCKET if set; no libsystemd needed."""
    addr = os.environ.get("NOTIFY_SOCKET")
    if not addr:
        return False
    if addr.startswith("@"):
        addr = "\0" + addr[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as s:
            s.connect(addr)
            s.sendall(state.encode())
        return True
    except OSError:
        return False


def watchdog_interval(environ=None) -> float | None:
    """Seconds of systemd's watchdog (WatchdogSec=) when it is meant for this process:
    $WATCHDOG_USEC set, and $WATCHDOG_PID unset or our pid (as sd_watchdog_enabled decides);
    else None."""
    environ = os.environ if environ is None else environ
    try:
        usec = int(environ.get("WATCHDOG_USEC", ""))
    except ValueError:
        return None
    pid = environ.get("WATCHDOG_PID")
    if usec <= 0 or (pid and pid.strip() != str(os.getpid())):
        return None
    return usec / 1e6


class Watchdog:
    """A thread that tells systemd the daemon is alive and what it does.

    Every ``period`` seconds (half the watchdog interval, or ``status_period`` without one) it
    posts a probe to the control loop (``attach``'s ``post``), which computes the status line
    there; once the probe has run it sends ``WATCHDOG=1`` (when ``ping``) and the ``STATUS=`` line
    if it changed.  A loop that does not run the probe within ``period`` gets no ping, so
    systemd kills a hung daemon; job workers and engine threads do not hold the loop, so a long
    import or generation does not stop the pings.  Before ``attach`` (start-up: imports, store
    recovery) it pings unconditionally: TimeoutStartSec= bounds that phase."""

    def __init__(self, period: float, ping: bool, notify: Callable[[str], bool] | None = None):
        self.period, self.ping = period, ping
        self.notify = notify or sd_notify
        self._post: Callable | None = None
        self._status: Callable[[], str] | None = None
        self._last_status = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="watchdog", daemon=True)

    @classmethod
    def from_env(cls, environ=None, status_period: float = 5.0) -> "Watchdog | None":
        """The watchdog systemd asked for ($WATCHDOG_USEC), or a status-only one under
        $NOTIFY_SOCKET; None when neither is set."""
        environ = os.environ if environ is None else environ
        interval = watchdog_interval(environ)
        if interval is not None:
            return cls(interval / 2, ping=True)
        return cls(status_period, ping=False) if environ.get("NOTIFY_SOCKET") else None

    def start(self) -> "Watchdog":
        self._thread.start()
        return self

    def attach(self, post: Callable, status: Callable[[], str]) -> None:
        """From now on, ping only when ``post``-ed probes run; they send ``status()``."""
        self._status, self._post = status, post

    def stop(self) -> None:
        self._stop.set()

    def sent_status(self, text: str) -> None:
        """``text`` went to systemd as STATUS= by someone else: do not repeat it."""
        self._last_status = text

    def _run(self) -> None:
        while not self._stop.is_set():
            t0 = time.monotonic()
            self.beat(self.period)
            self._stop.wait(max(0.0, self.period - (time.monotonic() - t0)))

    def beat(self, timeout: float) -> bool:
        """One round: probe the loop (waiting up to ``timeout``), notify; True when alive."""
        post = self._post
        if post is None:
            if self.ping:
                self.notify("WATCHDOG=1")
            return True
        box: list = []
        done = threading.Event()

        def probe():                     # runs on the control loop
            try:
                box.append(self._status())
            finally:
                done.set()
        post(probe)
        if not done.wait(timeout):
            if self._stop.is_set():             # the loop has ended: we are stopping
                return False
            log.warning("the control loop did not answer the watchdog's probe within %.1fs", timeout)
            return False
        lines = ["WATCHDOG=1"] if self.ping else []
        if box and box[0] != self._last_status:
            self._last_status = box[0]
            lines.append(f"STATUS={box[0]}")
        if lines:
            self.notify("\n".join(lines))
        return True
