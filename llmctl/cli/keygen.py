"""``llmctl keygen``: CURVE key pairs for tcp:// (remote) access to llmosd."""
from __future__ import annotations

import os

import click

from .. import curve
from .common import OutputError


def write_pair(directory: str, name: str) -> tuple[str, str]:
    """Write ``name.key`` (public) and ``name.key_secret`` (mode 0600) in ``directory``
    (made 0700 if missing); refuse to overwrite an existing pair.  Returns both paths."""
    import zmq.auth
    public = os.path.join(directory, name + ".key")
    secret = public + "_secret"
    for path in (public, secret):
        if os.path.lexists(path):
            raise OutputError(path, "it exists already; remove it first to make a new key pair")
    try:
        os.makedirs(directory, mode=0o700, exist_ok=True)
        old = os.umask(0o077)               # the secret file is never readable by others
        try:
            zmq.auth.create_certificates(directory, name)
        finally:
            os.umask(old)
        os.chmod(secret, 0o600)
        os.chmod(public, 0o644)             # the public half is meant to be copied
    except OSError as e:
        raise OutputError(e.filename or directory, e) from None
    return public, secret


@click.command("keygen")
@click.option("--dir", "directory", metavar="DIR", help="where to write the key pair "
              "(default ~/.config/llmctl/curve)")
@click.option("--server", is_flag=True, help="make the daemon's key pair (server.key, "
              "server.key_secret) instead of this client's (client.key, client.key_secret)")
def keygen(directory, server):
    """Make a CURVE key pair for tcp:// access (ipc:// sockets need none).

    A client's pair goes to ~/.config/llmctl/curve/client.key{,_secret}; its public
    client.key is then copied, under any name ending in .key, into the daemon's
    curve_authorized_dir.  The daemon's pair (--server, e.g. --dir /etc/llmosd/curve) is
    named by curve_server_key; its public server.key goes to each client's
    ~/.config/llmctl/curve/ (or LLMOSD_SERVER_KEY).  Secret files are mode 0600.
    """
    name = "server" if server else "client"
    public, secret = write_pair(directory or curve.key_dir(), name)
    with open(public) as f:
        key = next((line.split("=", 1)[1].strip().strip('"') for line in f
                    if line.strip().startswith("public-key")), "")
    click.echo(f"wrote {secret} (secret: keep it here, mode 0600)\nwrote {public} (public key {key})")
    if server:
        click.echo(f"daemon: set curve_server_key = \"{secret}\" (or keep the default location)\n"
                   f"clients: copy {public} to ~/.config/llmctl/curve/server.key, "
                   f"or set LLMOSD_SERVER_KEY='{key}'")
    else:
        click.echo(f"daemon: copy {public} into its curve_authorized_dir (e.g. "
                   f"/etc/llmosd/curve/authorized/{os.environ.get('USER', 'me')}.key) and restart it")


COMMANDS = [keygen]
