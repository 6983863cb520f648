"""The access policy (issue 14, llmosd.access): uids and config in, decisions out."""
import os
import types

import pytest

from llmctl import errors
from llmosd import access, config

DAEMON = 999          # the daemon's own uid in these tables
ALICE, BOB, CAROL = 1001, 1002, 1003     # CAROL is in the admin group "llmadm"


@pytest.fixture(autouse=True)
def groups(monkeypatch):
    """Group membership and names without the real passwd/group databases."""
    member = {ALICE: {"alice", "llmos"}, BOB: {"bob", "llmos", "big"}, CAROL: {"carol", "llmadm"}}
    names = {ALICE: "alice", BOB: "bob", CAROL: "carol", DAEMON: "llmosd", 0: "root"}
    monkeypatch.setattr(access, "_groups_of", lambda uid: member.get(uid, set()))
    monkeypatch.setattr(access.pwd, "getpwuid", lambda uid: types.SimpleNamespace(pw_name=names[uid])
                        if uid in names else (_ for _ in ()).throw(KeyError(uid)))


def cfg(**kw):
    return types.SimpleNamespace(**{"admin_group": "llmadm", "shared_inference": True, "quotas": {}, **kw})


# (uid, action, owner, shared_inference) -> allowed
TABLE = [
    (ALICE, "unload", ALICE, True, True),         # one's own
    (ALICE, "unload", BOB, True, False),          # another's
    (ALICE, "detach", BOB, True, False),
    (ALICE, "cancel", BOB, True, False),
    (ALICE, "pause", BOB, True, False),
    (ALICE, "resume", BOB, True, False),
    (ALICE, "job_rm", BOB, True, False),
    (ALICE, "rm", BOB, True, False),
    (ALICE, "tag", BOB, True, False),
    (ALICE, "pin", BOB, True, False),
    (ALICE, "rm", DAEMON, True, False),           # a model from before owners: the daemon's
    (0, "rm", BOB, True, True),                   # root
    (DAEMON, "cancel", BOB, True, True),          # the daemon's own user
    (CAROL, "unload", BOB, True, True),           # the admin group
    (CAROL, "rm", DAEMON, True, True),
    (None, "rm", BOB, True, True),                # no credentials (in-process): not checked
    (ALICE, "unload", None, True, True),          # owner not recorded: anyone's
    (ALICE, "infer", BOB, True, True),            # shared inference on
    (ALICE, "infer", BOB, False, False),          # ...and off
    (ALICE, "infer", ALICE, False, True),
    (CAROL, "infer", BOB, False, True),
]


@pytest.mark.parametrize("uid,action,owner,shared,allowed", TABLE)
def test_i14_2_policy_table(uid, action, owner, shared, allowed):
    err = access.may(uid, action, owner, cfg(shared_inference=shared), thing="job 7", daemon_uid=DAEMON)
    assert (err is None) == allowed
    if err is not None:
        assert isinstance(err, errors.PermissionDenied) and err.exit_status == 77
        assert err.name == "permission_denied"
        name = {BOB: "bob", DAEMON: "llmosd"}[owner]
        assert f"job 7 belongs to uid {owner} ({name})" in err.message


def test_i14_2_no_admin_group_means_root_only():
    assert access.may(CAROL, "unload", BOB, cfg(admin_group=""), daemon_uid=DAEMON) is not None
    assert access.may(CAROL, "unload", BOB, None, daemon_uid=DAEMON) is not None
    assert access.may(0, "unload", BOB, None, daemon_uid=DAEMON) is None


def test_i14_2_unknown_owner_is_named_by_uid():
    err = access.may(ALICE, "rm", 4242, cfg(), thing="model m:latest", daemon_uid=DAEMON)
    assert "model m:latest belongs to uid 4242:" in err.message


def test_i14_2_model_owner():
    assert access.model_owner({"owner": BOB}, DAEMON) == BOB
    assert access.model_owner({}, DAEMON) == DAEMON                 # made before owners
    assert access.model_owner({}, DAEMON, legacy=False) is None
    assert access.model_owner({"owner": True}, DAEMON) == DAEMON    # not a uid
    assert access.model_owner({}) == os.getuid()


def test_i14_quotas_parse_and_pick():
    q = access.parse_quotas({"users": {"alice": {"max_instances": 1, "max_device_bytes": "1KiB"}},
                             "groups": {"llmos": {"max_jobs": 2, "max_instances": 5}, "big": {"max_jobs": 9}}})
    c = cfg(quotas=q)
    assert access.quota(ALICE, "max_instances", c, DAEMON) == 1          # the user's own wins
    assert access.quota(ALICE, "max_device_bytes", c, DAEMON) == 1024
    assert access.quota(ALICE, "max_jobs", c, DAEMON) == 2               # from a group
    assert access.quota(BOB, "max_jobs", c, DAEMON) == 9                 # the largest group's
    assert access.quota(BOB, "max_queued_requests", c, DAEMON) is None
    assert access.quota(0, "max_jobs", c, DAEMON) is None                # root: none
    assert access.quota(DAEMON, "max_jobs", c, DAEMON) is None


def test_i14_quotas_refuse_with_the_numbers():
    c = cfg(quotas=access.parse_quotas({"users": {"alice": {"max_instances": 2, "max_device_bytes": 1000}}}))
    assert access.over_quota(ALICE, "max_instances", 1, 1, c, daemon_uid=DAEMON) is None
    err = access.over_quota(ALICE, "max_instances", 2, 1, c, daemon_uid=DAEMON)
    assert isinstance(err, errors.PermissionDenied)
    assert "quota exceeded for uid 1001 (alice): instances: 2 in use + 1 asked > quota 2" in err.message
    err = access.over_quota(ALICE, "max_device_bytes", 600, 500, c, daemon_uid=DAEMON)
    assert "device bytes" in err.message and "quota" in err.message


@pytest.mark.parametrize("bad", [{"people": {}}, {"users": {"a": {"max_gpus": 1}}},
                                 {"users": {"a": {"max_jobs": -1}}}, {"users": {"a": {"max_jobs": "x"}}},
                                 {"users": ["a"]}])
def test_i14_quotas_bad_tables_are_config_errors(bad):
    with pytest.raises(errors.ConfigError):
        access.parse_quotas(bad)


def test_i14_config_keys(tmp_path):
    f = tmp_path / "llmosd.toml"
    f.write_text('admin_group = "llmadm"\nshared_inference = false\n'
                 '[quotas.users.alice]\nmax_instances = 2\nmax_device_bytes = "1GiB"\n'
                 '[quotas.groups.llmos]\nmax_jobs = 1\n')
    c, _ = config.load(str(f), environ={})
    assert c.admin_group == "llmadm" and c.shared_inference is False
    assert c.quotas == {"users": {"alice": {"max_instances": 2, "max_device_bytes": 1 << 30}},
                        "groups": {"llmos": {"max_jobs": 1}}}
    f.write_text('[quotas.users.alice]\nmax_cpus = 2\n')
    with pytest.raises(errors.ConfigError, match="max_cpus|may hold only"):
        config.load(str(f), environ={})
