"""The daemon's dealings with its host: the single-instance lock and systemd notification."""
from __future__ import annotations

import errno
import fcntl
import os
import socket
import stat

from llmctl.errors import ConfigError


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
