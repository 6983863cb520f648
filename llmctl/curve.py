"""CURVE keys of the client, for ``tcp://`` endpoints (ipc:// needs none).

The client's key pair: ``LLMCTL_CLIENT_KEY`` (a ``.key_secret`` file), else
``~/.config/llmctl/curve/client.key_secret`` (``$XDG_CONFIG_HOME`` honoured), as written by
``llmctl keygen``.  The daemon's public key: ``LLMOSD_SERVER_KEY`` (a path to its ``.key``
file, or the 40-character Z85 key itself), else ``~/.config/llmctl/curve/server.key``.
Problems are ``ConfigError`` naming the file and the fix.
"""
from __future__ import annotations

import os
import re

import zmq
from zmq.utils import z85

from .errors import ConfigError, DaemonUnavailable

HINT = ("make a key pair with 'llmctl keygen', have the daemon's administrator copy the public "
        "key it prints into the daemon's authorized directory, and get the daemon's public key "
        "(server.key) into ~/.config/llmctl/curve/ or LLMOSD_SERVER_KEY")


def key_dir() -> str:
    """``~/.config/llmctl/curve`` (``$XDG_CONFIG_HOME/llmctl/curve`` when set)."""
    base = os.environ.get("XDG_CONFIG_HOME") or os.path.join(os.path.expanduser("~"), ".config")
    return os.path.join(base, "llmctl", "curve")


def _load(path: str, what: str) -> tuple[bytes, bytes | None]:
    import zmq.auth
    try:
        return zmq.auth.load_certificate(path)
    except (OSError, ValueError) as e:
        raise ConfigError(f"cannot load {what} {path}: {getattr(e, 'strerror', None) or e}",
                          hint=HINT) from None


def client_keys() -> tuple[bytes, bytes]:
    """(public, secret) Z85 keys of this client."""
    path = os.environ.get("LLMCTL_CLIENT_KEY") or os.path.join(key_dir(), "client.key_secret")
    public, secret = _load(path, "this client's CURVE key")
    if not secret:
        raise ConfigError(f"{path} holds no secret key (the .key_secret file is needed)", hint=HINT)
    return public, secret


def server_key() -> bytes:
    """The daemon's Z85 public key: LLMOSD_SERVER_KEY (key or path), else server.key."""
    env = os.environ.get("LLMOSD_SERVER_KEY", "").strip()
    if len(env) == 40 and not os.path.exists(env):
        try:
            z85.decode(env)
        except (ValueError, KeyError, IndexError):
            raise ConfigError("LLMOSD_SERVER_KEY is neither a file nor a Z85 public key",
                              hint=HINT) from None
        return env.encode()
    public, _ = _load(env or os.path.join(key_dir(), "server.key"), "the daemon's public key")
    return public


_TCP = re.compile(r"^tcp://(\[[0-9A-Fa-f:.]+\]|[^\s/:\[\]]+):[0-9]{1,5}$")


def check_endpoint(url: str) -> None:
    """DaemonUnavailable for a tcp:// endpoint that cannot be connected to at all (checked
    before the keys are read, so a typo is reported as a typo, not as missing keys)."""
    if not _TCP.match(url):
        raise DaemonUnavailable(f"cannot connect to {url!r}: not tcp://HOST:PORT",
                                hint="--socket / LLMOSD_SOCKET takes a path, unix:///path, "
                                     "ipc:///path or tcp://host:port")


def keys_for(url: str) -> tuple[bytes, bytes, bytes] | None:
    """``load_keys`` for a tcp:// endpoint (after ``check_endpoint``); None for any other."""
    if not url.startswith("tcp://"):
        return None
    check_endpoint(url)
    return load_keys()


def load_keys() -> tuple[bytes, bytes, bytes]:
    """(client public, client secret, server public) Z85 keys, or ConfigError."""
    return (*client_keys(), server_key())


def setup_tcp(sock: zmq.Socket, keys: tuple[bytes, bytes, bytes]) -> None:
    """Ready a DEALER for a tcp:// daemon (before it connects): kernel keepalives, so a
    vanished host is noticed, and the CURVE ``keys`` from ``load_keys``."""
    for opt, value in ((zmq.TCP_KEEPALIVE, 1), (zmq.TCP_KEEPALIVE_IDLE, 30),
                       (zmq.TCP_KEEPALIVE_INTVL, 10), (zmq.TCP_KEEPALIVE_CNT, 3)):
        sock.setsockopt(opt, value)
    sock.curve_publickey, sock.curve_secretkey, sock.curve_serverkey = keys


def unanswered(url: str, timeout: float) -> DaemonUnavailable:
    """The error for a tcp daemon that did not answer ``hello``: with CURVE, a refused key
    (ZAP denial) and a daemon that is down look the same to the client."""
    return DaemonUnavailable(f"no answer on {url} within {timeout:g}s: the daemon refused this "
                             "client's key or does not answer", hint=HINT)
