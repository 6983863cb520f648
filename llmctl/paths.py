"""Where the daemon's socket lives by default (shared by llmosd's config and the client).

System mode (root, or a system service): ``ipc:///run/llmosd/llmosd.sock``.
User mode: ``ipc://$XDG_RUNTIME_DIR/llmosd/llmosd.sock`` (``/tmp/llmosd-$UID`` without XDG).

``/tmp/llmosd-$UID`` is a name anyone can take first, so both sides trust a runtime directory
only when ``check_private_dir`` finds nothing wrong with it.
"""
from __future__ import annotations

import logging
import os
import stat

SYSTEM_SOCKET = "ipc:///run/llmosd/llmosd.sock"
SYSTEM_STATE_DIR = "/var/lib/llmosd"
SYSTEM_CONFIG = "/etc/llmosd/llmosd.toml"

log = logging.getLogger("llmctl")


def user_runtime_dir() -> str:
    base = os.environ.get("XDG_RUNTIME_DIR") or f"/tmp/llmosd-{os.getuid()}"
    return os.path.join(base, "llmosd") if os.environ.get("XDG_RUNTIME_DIR") else base


def user_socket() -> str:
    return "ipc://" + os.path.join(user_runtime_dir(), "llmosd.sock")


def user_state_dir() -> str:
    base = os.environ.get("XDG_STATE_HOME") or os.path.join(os.path.expanduser("~"), ".local", "state")
    return os.path.join(base, "llmosd")


def user_config() -> str:
    base = os.environ.get("XDG_CONFIG_HOME") or os.path.join(os.path.expanduser("~"), ".config")
    return os.path.join(base, "llmosd", "llmosd.toml")


def normalize_socket(url: str) -> str:
    """An endpoint as users write it -> a ZeroMQ URL: ``ipc://``/``tcp://`` URLs stay as they
    are; ``unix:///path`` and a plain filesystem path (absolute or relative) become ``ipc://``."""
    url = url.strip()
    if url.startswith("unix://"):
        url = url[len("unix://"):]
    elif "://" in url:
        return url
    return "ipc://" + os.path.abspath(url)


def ipc_path(url: str) -> str | None:
    """The filesystem path of an ``ipc://`` URL, or None for other transports."""
    return url[len("ipc://"):] if url.startswith("ipc://") else None


def check_private_dir(path: str, uid: int | None = None, *, shared_ok: bool = False) -> str | None:
    """None if only ``uid`` (default: ours) or root controls the directory ``path``; otherwise
    why not, as a phrase to follow the path ("is owned by uid 65534, not by uid 0").

    Refused: a missing path or a non-directory; a symbolic link owned by someone else (one of
    ours or root's is followed and its target checked); a directory owned by another user; one
    that group or others may write.  ``shared_ok`` admits a world-writable sticky directory
    owned by root, such as /tmp, where others cannot remove or rename our entries.
    """
    uid = os.getuid() if uid is None else uid
    try:
        lst = os.lstat(path)
        st = os.stat(path) if stat.S_ISLNK(lst.st_mode) else lst
    except FileNotFoundError:
        return "does not exist"
    except OSError as e:
        return f"cannot be examined ({e.strerror})"
    if stat.S_ISLNK(lst.st_mode) and lst.st_uid not in (uid, 0):
        return f"is a symbolic link owned by uid {lst.st_uid}, not by uid {uid}"
    if not stat.S_ISDIR(st.st_mode):
        return "is not a directory"
    if st.st_uid not in (uid, 0):
        return f"is owned by uid {st.st_uid}, not by uid {uid}"
    if st.st_mode & 0o022:
        if shared_ok and st.st_uid == 0 and st.st_mode & stat.S_ISVTX:
            return None
        return f"is writable by group or others (mode {stat.S_IMODE(st.st_mode):04o})"
    return None


def client_default_socket() -> str:
    """LLMOSD_SOCKET, else the user-mode socket if it exists (or we are not root), else system.

    The user-mode socket is used only in a runtime directory that passes
    ``check_private_dir``: a directory someone else made could hold their daemon's socket,
    and the prompts sent there."""
    env = os.environ.get("LLMOSD_SOCKET")
    if env:
        return normalize_socket(env)
    user, rundir = user_socket(), user_runtime_dir()
    problem = check_private_dir(rundir) if os.path.lexists(rundir) else None
    if problem is None and os.path.exists(ipc_path(user)):
        return user
    if problem is not None:
        log.warning("ignoring the user-mode socket: its directory %s %s (remove that directory, "
                    "or set XDG_RUNTIME_DIR or LLMOSD_SOCKET)", rundir, problem)
    if os.path.exists(ipc_path(SYSTEM_SOCKET)) or os.getuid() == 0 or problem is not None:
        return SYSTEM_SOCKET
    return user
