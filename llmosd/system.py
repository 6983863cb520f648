"""The daemon's dealings with its host: the single-instance lock and systemd notification."""
from __future__ import annotations

import fcntl
import os
import socket

from llmctl.errors import ConfigError


class PidLock:
    """An exclusive flock on ``path``, holding our pid.  Released (and the file removed) on close.

    libzmq silently unlinks and re-creates an ipc socket that is in use, stealing it from a
    running daemon; taking this lock before binding is what makes a second daemon refuse.
    """

    def __init__(self, path: str):
        self.path, self.fd = path, None

    def acquire(self) -> "PidLock":
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o640)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                other = os.read(fd, 32).decode(errors="replace").strip()
                os.close(fd)
                raise ConfigError(f"another llmosd (pid {other or '?'}) is already running on this "
                                  f"socket/state (lock {self.path})",
                                  hint="stop it first, or give this one its own --socket and --state-dir") from None
            # the holder may have removed the file between our open and flock: retry then
            st = os.fstat(fd)
            try:
                same = os.stat(self.path).st_ino == st.st_ino
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
