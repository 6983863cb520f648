"""Who may do what (issue 14): ownership and quotas, as pure functions of uids and the config.

Instances, jobs and store models record their owner's uid (``Instance.uid``, ``Job.owner``,
a manifest's top-level ``owner``).  A user may unload, detach, pin, cancel, pause, resume,
remove (``job_rm``, ``rm``) and replace (``tag --force``) only what is theirs; root, the
daemon's own user and members of the config's ``admin_group`` may act on everything.  A model
published before owners were recorded belongs to the daemon's own user (``model_owner``).
Inference (``infer``) on another user's model or instance is allowed while
``shared_inference`` is on (the default).  A uid of None (a peer without credentials: the
daemon itself, or a transport that has none) is not checked, as before.

Quotas: ``[quotas.users.NAME]`` and ``[quotas.groups.NAME]`` tables with ``max_instances``,
``max_device_bytes``, ``max_jobs`` and ``max_queued_requests``.  A user's own table wins per
key; else the most generous of the tables of the groups they are in.  Root and the daemon's
own user have none.  Nothing here imports torch or touches the daemon's state.
"""
from __future__ import annotations

import grp
import os
import pwd

from llmctl.errors import ConfigError, PermissionDenied

# what each action is called in a refusal ("only its owner may ...")
ACTIONS = {"unload": "unload", "detach": "detach", "pin": "pin", "unpin": "unpin",
           "hold": "hold memory on", "cancel": "cancel", "pause": "pause", "resume": "resume",
           "job_rm": "remove", "rm": "remove", "tag": "replace", "infer": "run requests on"}
QUOTA_KEYS = ("max_instances", "max_device_bytes", "max_jobs", "max_queued_requests")


def user_name(uid: int | None) -> str:
    """``uid 1001 (alice)``, or ``uid 1001`` when the passwd database has no such user."""
    if uid is None:
        return "an unknown user"
    try:
        return f"uid {uid} ({pwd.getpwuid(uid).pw_name})"
    except KeyError:
        return f"uid {uid}"


def _groups_of(uid: int) -> set[str]:
    """Names of the groups ``uid`` is in (primary and supplementary); empty if unknown."""
    try:
        pw = pwd.getpwuid(uid)
        gids = os.getgrouplist(pw.pw_name, pw.pw_gid)
    except (KeyError, OSError):
        return set()
    out = set()
    for g in gids:
        try:
            out.add(grp.getgrgid(g).gr_name)
        except KeyError:
            pass
    return out


def is_admin(uid: int | None, cfg=None, daemon_uid: int | None = None) -> bool:
    """Whether ``uid`` may act on everything: None (no credentials), root, the daemon's own
    user (``daemon_uid``, default this process's), or a member of ``cfg.admin_group``."""
    if uid is None or uid == 0 or uid == (os.getuid() if daemon_uid is None else daemon_uid):
        return True
    group = getattr(cfg, "admin_group", "") or ""
    return bool(group) and group in _groups_of(uid)


def model_owner(manifest: dict, daemon_uid: int | None = None, legacy: bool = True) -> int | None:
    """The uid that owns a stored model: its manifest's ``owner``; for a model published
    before owners were recorded, the daemon's own user (``legacy``; None, anyone's, without:
    handlers built without a config, as in tests that drive them directly)."""
    owner = manifest.get("owner") if isinstance(manifest, dict) else None
    if isinstance(owner, int) and not isinstance(owner, bool):
        return owner
    if not legacy:
        return None
    return os.getuid() if daemon_uid is None else daemon_uid


def may(uid: int | None, action: str, owner: int | None, cfg=None, *, thing: str = "it",
        daemon_uid: int | None = None) -> PermissionDenied | None:
    """None when ``uid`` may ``action`` (a key of ``ACTIONS``) a thing ``owner`` owns; else
    the PermissionDenied to raise, naming ``thing`` and its owner (name and uid).  An owner
    of None (not recorded) is anyone's."""
    if owner is None or uid == owner:
        return None
    if action == "infer" and getattr(cfg, "shared_inference", True):
        return None
    if is_admin(uid, cfg, daemon_uid):
        return None
    verb = ACTIONS.get(action, action)
    group = getattr(cfg, "admin_group", "") or ""
    admins = f"root or a member of group {group}" if group else "root"
    hint = (f"ask its owner or an administrator ({admins})" if action != "infer" else
            "load your own copy, or ask an administrator to set shared_inference = true")
    return PermissionDenied(f"{thing} belongs to {user_name(owner)}: only its owner or an "
                            f"administrator may {verb} it", hint=hint)


def check(uid: int | None, action: str, owner: int | None, cfg=None, *, thing: str = "it") -> None:
    """Raise ``may``'s PermissionDenied, if any."""
    err = may(uid, action, owner, cfg, thing=thing)
    if err is not None:
        raise err


# -- quotas -----------------------------------------------------------------------------------
def parse_quotas(table, where: str = "config") -> dict:
    """{"users": {name: {key: int}}, "groups": {...}} from a config's ``quotas`` table;
    ConfigError naming the bad key.  Sizes (``max_device_bytes``) may be text ("8GiB")."""
    from llmosd.mem.budgets import parse_size
    if table is None or table == {}:
        return {}
    if not isinstance(table, dict) or set(table) - {"users", "groups"}:
        raise ConfigError(f"{where}: 'quotas' must hold [quotas.users.NAME] and [quotas.groups.NAME] tables",
                          hint="e.g. [quotas.users.alice] max_instances = 2")
    out: dict = {}
    for kind in ("users", "groups"):
        names = table.get(kind, {})
        if not isinstance(names, dict):
            raise ConfigError(f"{where}: quotas.{kind} must be tables like [quotas.{kind}.NAME]")
        for name, limits in names.items():
            if not isinstance(limits, dict) or set(limits) - set(QUOTA_KEYS):
                raise ConfigError(f"{where}: [quotas.{kind}.{name}] may hold only {', '.join(QUOTA_KEYS)}")
            got = {}
            for k, v in limits.items():
                try:
                    n = parse_size(v) if k == "max_device_bytes" and isinstance(v, str) else v
                    if not isinstance(n, int) or isinstance(n, bool) or n < 0:
                        raise ValueError(v)
                except (TypeError, ValueError):
                    raise ConfigError(f"{where}: quotas.{kind}.{name}.{k} must be a whole number "
                                      f">= 0{' or a size (8GiB)' if k == 'max_device_bytes' else ''}, "
                                      f"got {v!r}") from None
                got[k] = n
            out.setdefault(kind, {})[str(name)] = got
    return out


def quota(uid: int | None, key: str, cfg=None, daemon_uid: int | None = None) -> int | None:
    """The limit ``key`` (of ``QUOTA_KEYS``) for ``uid``, None for none: the user's own table,
    else the largest of their groups' tables; root, the daemon's user and None have none."""
    quotas = getattr(cfg, "quotas", None) or {}
    if not quotas or uid is None or uid == 0 or uid == (os.getuid() if daemon_uid is None else daemon_uid):
        return None
    try:
        name = pwd.getpwuid(uid).pw_name
    except KeyError:
        name = str(uid)
    own = (quotas.get("users") or {}).get(name) or (quotas.get("users") or {}).get(str(uid)) or {}
    if key in own:
        return own[key]
    found = [t[key] for g, t in (quotas.get("groups") or {}).items() if key in t and g in _groups_of(uid)]
    return max(found) if found else None


def over_quota(uid: int | None, key: str, used: int, adding: int, cfg=None, *,
               daemon_uid: int | None = None) -> PermissionDenied | None:
    """None when ``used`` + ``adding`` stays within ``uid``'s ``key`` quota; else the error,
    with the numbers (a refusal: exit 77, like the other limits set by an administrator)."""
    limit = quota(uid, key, cfg, daemon_uid)
    if limit is None or used + adding <= limit:
        return None
    what = key.removeprefix("max_").replace("_", " ")
    if key == "max_device_bytes":
        from llmosd.mem.policy import size_text
        nums = f"{size_text(used)} in use + {size_text(adding)} asked > quota {size_text(limit)}"
    else:
        nums = f"{used} in use + {adding} asked > quota {limit}"
    return PermissionDenied(f"quota exceeded for {user_name(uid)}: {what}: {nums}",
                            hint="free some first (llmctl ps; llmctl jobs; llmctl unload/cancel), "
                                 "or ask an administrator to raise the quota ([quotas.users.NAME])")
