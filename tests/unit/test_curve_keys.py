"""Issue 14.3: loading CURVE keys (client and daemon) and the errors when they are missing."""
from __future__ import annotations

import dataclasses
import os
import stat

import pytest

from llmctl import curve
from llmctl.cli.common import OutputError
from llmctl.cli.keygen import write_pair
from llmctl.errors import EX_CONFIG, ConfigError
from llmosd.config import Config
from llmosd.main import curve_keys
from llmosd.server import Peer, load_server_keys


@pytest.fixture
def pairs(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "xdg"))
    for var in ("LLMCTL_CLIENT_KEY", "LLMOSD_SERVER_KEY"):
        monkeypatch.delenv(var, raising=False)
    server = write_pair(str(tmp_path / "srv"), "server")
    client = write_pair(curve.key_dir(), "client")
    return server, client


def tcp_cfg(tmp_path, **kw) -> Config:
    return dataclasses.replace(Config(), socket="tcp://127.0.0.1:5555", state_dir=str(tmp_path),
                               config_file=str(tmp_path / "etc" / "llmosd.toml"), **kw)


def test_i14_3_keygen_writes_a_private_secret_and_refuses_to_overwrite(pairs):
    (public, secret), _ = pairs
    assert stat.S_IMODE(os.stat(secret).st_mode) == 0o600
    assert stat.S_IMODE(os.stat(public).st_mode) == 0o644
    with pytest.raises(OutputError, match="exists already"):
        write_pair(os.path.dirname(public), "server")


def test_i14_3_client_keys_from_the_default_place_and_the_server_key_from_env(pairs, monkeypatch):
    (spub, _), (cpub, _) = pairs
    with pytest.raises(ConfigError, match="daemon's public key") as e:
        curve.load_keys()                         # no server.key anywhere yet
    assert "keygen" in e.value.hint
    monkeypatch.setenv("LLMOSD_SERVER_KEY", spub)                     # a path
    pub, sec, server = curve.load_keys()
    assert pub and sec and server in open(spub).read().encode()
    z85 = server.decode()
    monkeypatch.setenv("LLMOSD_SERVER_KEY", z85)                      # the key itself
    assert curve.server_key() == server
    monkeypatch.setenv("LLMOSD_SERVER_KEY", "x" * 39 + "\x7f")
    with pytest.raises(ConfigError):
        curve.server_key()


def test_i14_3_a_public_key_is_not_a_client_secret(pairs, monkeypatch):
    _, (cpub, _) = pairs
    monkeypatch.setenv("LLMCTL_CLIENT_KEY", cpub)
    with pytest.raises(ConfigError, match="no secret key"):
        curve.client_keys()
    monkeypatch.setenv("LLMCTL_CLIENT_KEY", cpub + ".missing")
    with pytest.raises(ConfigError, match="cannot load this client's CURVE key"):
        curve.client_keys()


def test_i14_3_ipc_needs_no_keys(tmp_path):
    assert curve_keys(dataclasses.replace(Config(), socket="ipc:///tmp/x.sock")) is None


def test_i14_3_tcp_without_keys_is_a_config_error_naming_the_fix(tmp_path):
    with pytest.raises(ConfigError) as e:
        curve_keys(tcp_cfg(tmp_path))
    assert e.value.exit_status == EX_CONFIG == 78
    assert str(tmp_path / "etc" / "curve" / "server.key_secret") in str(e.value)   # the default
    assert "llmctl keygen --server" in e.value.hint


def test_i14_3_tcp_with_no_authorized_client_is_refused(tmp_path, pairs):
    (_, secret), (cpub, _) = pairs
    auth = tmp_path / "auth"
    cfg = tcp_cfg(tmp_path, curve_server_key=secret, curve_authorized_dir=str(auth))
    with pytest.raises(ConfigError, match="cannot be read"):
        curve_keys(cfg)
    auth.mkdir()
    with pytest.raises(ConfigError, match="no client key is authorized"):
        curve_keys(cfg)
    (auth / "alice.key").write_bytes(open(cpub, "rb").read())
    assert curve_keys(cfg) == (secret, str(auth))


def test_i14_3_server_key_errors(pairs, tmp_path):
    (public, secret), _ = pairs
    assert load_server_keys(secret)[1]
    with pytest.raises(ConfigError, match="holds no secret key"):
        load_server_keys(public)
    with pytest.raises(ConfigError, match="cannot load the CURVE server key"):
        load_server_keys(str(tmp_path / "nope"))


def test_i14_3_a_tcp_peer_is_known_by_its_key():
    from llmosd.access import is_admin, may
    from llmosd.server import REMOTE_UID
    p = Peer(b"\0\1", "127.0.0.1", key="abc")
    assert p.uid == REMOTE_UID and "key=abc" in repr(p)
    # a remote client is nobody's administrator: it may not touch a local user's things
    assert not is_admin(p.uid) and may(p.uid, "unload", 1000) is not None
