"""Where the daemon's socket lives by default (shared by llmosd's config and the client).

System mode (root, or a system service): ``ipc:///run/llmosd/llmosd.sock``.
User mode: ``ipc://$XDG_RUNTIME_DIR/llmosd/llmosd.sock`` (``/tmp/llmosd-$UID`` without XDG).
"""
from __future__ import annotations

import os

SYSTEM_SOCKET = "ipc:///run/llmosd/llmosd.sock"
SYSTEM_STATE_DIR = "/var/lib/llmosd"
SYSTEM_CONFIG = "/etc/llmosd/llmosd.toml"


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


def client_default_socket() -> str:
    """LLMOSD_SOCKET, else the user-mode socket if it exists (or we are not root), else system."""
    env = os.environ.get("LLMOSD_SOCKET")
    if env:
        return normalize_socket(env)
    user = user_socket()
    if os.path.exists(ipc_path(user)):
        return user
    if os.path.exists(ipc_path(SYSTEM_SOCKET)) or os.getuid() == 0:
        return SYSTEM_SOCKET
    return user
