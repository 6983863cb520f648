"""Whether this process may use llmosd's Unix socket, and why not: checked before connecting,
since ZeroMQ itself would only retry a socket it cannot open, silently, until a timeout."""
from __future__ import annotations

import os

from .errors import DaemonUnavailable, LlmosdError, PermissionDenied

__all__ = ["check_socket_path", "socket_access_error"]


def _mode_allows(st: os.stat_result, uid: int, gids: set[int], bit: int) -> bool:
    """Whether ``uid`` (in groups ``gids``) has permission ``bit`` (4 r, 2 w, 1 x) on ``st``."""
    if uid == 0:
        return True
    if st.st_uid == uid:
        return bool(st.st_mode >> 6 & bit)
    if st.st_gid in gids:
        return bool(st.st_mode >> 3 & bit)
    return bool(st.st_mode & bit)


def socket_access_error(path: str, uid: int, gids: set[int], dir_st: os.stat_result | None,
                        sock_st: os.stat_result | None) -> LlmosdError | None:
    """Why ``uid`` cannot connect to the Unix socket ``path``, or None when it can (pure).

    ``dir_st`` and ``sock_st`` are the stat results of the socket's directory and of the socket,
    None where they do not exist.  Connecting needs search permission on the directory and
    write permission on the socket; an inaccessible socket is "permission denied", not missing.
    """
    fix = ("ask the daemon's owner for access (its socket group, see llmosd.8), or run your own "
           "daemon with 'llmosd --user'")
    if dir_st is not None and not _mode_allows(dir_st, uid, gids, 1):
        return PermissionDenied(f"permission denied: uid {uid} cannot enter {os.path.dirname(path)}, "
                                f"the directory of llmosd's socket", hint=fix)
    if sock_st is None:
        return DaemonUnavailable(f"is llmosd running? (socket {path} does not exist)",
                                 hint="start it with 'llmosd' or point LLMOSD_SOCKET / --socket at it")
    if not _mode_allows(sock_st, uid, gids, 2):
        return PermissionDenied(f"permission denied: uid {uid} may not write to llmosd's socket {path}",
                                hint=fix)
    return None


def check_socket_path(path: str) -> None:
    """Raise PermissionDenied or DaemonUnavailable when the socket at ``path`` cannot be used."""
    def stat(p):
        try:
            return os.stat(p)
        except (FileNotFoundError, NotADirectoryError):
            return None
        except PermissionError:
            raise PermissionDenied(f"permission denied: cannot look at {p} (llmosd's socket or a "
                                   f"directory above it)",
                                   hint="ask the daemon's owner for access, or run 'llmosd --user'") from None
    uid, gids = os.geteuid(), set(os.getgroups()) | {os.getegid()}
    dir_st = stat(os.path.dirname(path) or ".")
    err = socket_access_error(path, uid, gids, dir_st, None)     # the directory first: a closed
    if not isinstance(err, PermissionDenied):                    # one hides the socket
        err = socket_access_error(path, uid, gids, dir_st, stat(path))
    if err is not None:
        raise err
