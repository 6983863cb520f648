"""Issue 14: a tcp client's CURVE key maps to the local user its key file is named after."""
import os
import pwd

import zmq.auth

from llmosd.server import REMOTE_UID, Peer, key_uids


def test_i14_3_key_named_after_a_user_acts_as_that_user(tmp_path):
    keys = tmp_path / "keys"
    keys.mkdir()
    auth = tmp_path / "authorized"
    auth.mkdir()
    made = {}
    for who in ("nobody", "root", "no-such-user-here", "linked"):
        pub, _ = zmq.auth.create_certificates(str(keys), who)
        made[who] = zmq.auth.load_certificate(pub)[0].decode()
    for who in ("nobody", "root", "no-such-user-here"):
        (auth / f"{who}.key").write_bytes(open(keys / f"{who}.key", "rb").read())
    os.symlink(keys / "linked.key", auth / "daemon.key")      # links are never followed
    got = key_uids(str(auth))
    assert got == {made["nobody"]: pwd.getpwnam("nobody").pw_uid}     # never root, never unknown
    assert Peer(b"a", None, made["nobody"], got).uid == pwd.getpwnam("nobody").pw_uid
    assert Peer(b"b", None, made["root"], got).uid == REMOTE_UID
    assert Peer(b"c", None, made["no-such-user-here"], got).uid == REMOTE_UID
