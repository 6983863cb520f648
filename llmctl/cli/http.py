"""``llmctl serve-http``: the HTTP gateway (OpenAI and Ollama APIs) in the foreground.

The gateway is a client of the daemon like any other (``llmctl.http``); it listens on the
loopback interface unless told otherwise, and anywhere else only with API keys.
"""
from __future__ import annotations

import ipaddress
import os
import socket
import stat

import click

from ..errors import ConfigError

DEFAULT_LISTEN = "127.0.0.1:11435"


def parse_listen(text: str) -> tuple[str, int]:
    """HOST:PORT ("127.0.0.1:11435", "[::1]:11435", "0.0.0.0:8080"; port 0: any free one) as
    (host, port); ConfigError naming the problem otherwise."""
    host, sep, port = str(text).strip().rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port.isdigit() or int(port) > 65535:
        raise ConfigError(f"--listen {text!r} is not HOST:PORT",
                          hint=f"for example --listen {DEFAULT_LISTEN} or --listen [::1]:11435")
    return host, int(port)


def is_loopback(host: str) -> bool:
    """Whether ``host`` is only reachable from this machine (127.0.0.0/8, ::1, localhost)."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False                       # a host name: it may resolve to anything


def read_keys(path: str) -> list[str]:
    """The API keys in ``path``: one per line; blank lines and lines starting with # skipped.
    ConfigError when it cannot be read, holds no key, or other users may read it."""
    try:
        st = os.stat(path)
        with open(path, encoding="utf-8") as f:
            lines = f.read().splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"cannot read the API key file {path}: {getattr(e, 'strerror', None) or e}",
                          hint="--api-key-file takes a file with one key per line") from None
    if st.st_mode & stat.S_IROTH:
        raise ConfigError(f"the API key file {path} is readable by every user",
                          hint=f"chmod o-r {path} (e.g. chmod 600, or 640 for a group)")
    keys = [ln.strip() for ln in lines if ln.strip() and not ln.strip().startswith("#")]
    if not keys:
        raise ConfigError(f"the API key file {path} holds no key",
                          hint="write one key per line, e.g. from: python3 -c 'import secrets; print(secrets.token_urlsafe(32))'")
    return keys


def check_exposure(host: str, keys: list[str] | None) -> None:
    """Refuse to listen beyond the loopback interface without API keys."""
    if not keys and not is_loopback(host):
        raise ConfigError(f"listening on {host} (not loopback) requires API keys",
                          hint="pass --api-key-file FILE (one key per line; clients send "
                               "'Authorization: Bearer KEY'), or listen on 127.0.0.1")


def bind(host: str, port: int) -> socket.socket:
    """The listening socket (bound here, so that a busy port is one clear error)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    s = socket.socket(family, socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        s.bind((host, port))
    except OSError as e:
        s.close()
        raise ConfigError(f"cannot listen on {host}:{port}: {e.strerror or e}",
                          hint="choose another --listen address or port") from None
    s.listen(2048)
    s.set_inheritable(True)
    return s


@click.command("serve-http")
@click.option("--listen", default=DEFAULT_LISTEN, show_default=True, metavar="HOST:PORT",
              help="Address to serve HTTP on (port 0: any free port, printed at start).  Anything "
                   "but loopback requires --api-key-file.")
@click.option("--api-key-file", metavar="FILE", type=click.Path(dir_okay=False),
              help="Require 'Authorization: Bearer KEY' with one of the keys in FILE (one per line).")
@click.pass_context
def serve_http(ctx, listen, api_key_file):
    """Serve the OpenAI and Ollama HTTP APIs, forwarding to the daemon.

    \b
    OpenAI:  POST /v1/chat/completions, /v1/completions, /v1/embeddings; GET /v1/models
    Ollama:  POST /api/generate, /api/chat, /api/show, /api/embed; GET /api/tags, /api/ps
    \b
    Examples:
      llmctl serve-http
      curl http://127.0.0.1:11435/v1/chat/completions -H 'Content-Type: application/json' \\
        -d '{"model": "smollm2", "messages": [{"role": "user", "content": "Hi"}]}'
      llmctl serve-http --listen 0.0.0.0:11435 --api-key-file /etc/llmosd/http-keys
    """
    host, port = parse_listen(listen)
    keys = read_keys(api_key_file) if api_key_file else None
    check_exposure(host, keys)
    try:
        import uvicorn
        from ..http.app import create_app
    except ImportError as e:
        raise ConfigError(f"serve-http needs the http extra ({e.name} is not installed)",
                          hint="pip install 'llmosd[http]'") from None
    obj = ctx.find_root().obj
    sock = bind(host, port)
    app = create_app(obj.get("socket"), keys=keys, timeout=obj.get("timeout", 60.0))
    shown = f"[{host}]" if ":" in host else host
    click.echo(f"llmctl serve-http: listening on http://{shown}:{sock.getsockname()[1]} "
               f"(OpenAI API under /v1, Ollama API under /api; "
               f"{'API keys required' if keys else 'no API key'})", err=True)
    config = uvicorn.Config(app, log_level="warning", access_log=False, lifespan="off",
                            timeout_graceful_shutdown=5)
    try:
        uvicorn.Server(config).run(sockets=[sock])
    finally:
        app.state.pool.close()
        sock.close()


COMMANDS = [serve_http]
