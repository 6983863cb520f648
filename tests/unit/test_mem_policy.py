"""Issue 12: admission and eviction decisions (llmosd/mem/policy.py) and the memory manager's
ledger (llmosd/mem/manager.py): tables of holders in, decisions out.  No torch, no daemon."""
from __future__ import annotations

import pytest

from llmctl.errors import ConfigError, InvalidArgument, OutOfMemory
from llmosd import config
from llmosd.mem.manager import MemoryManager, budgets_from_config
from llmosd.mem.policy import Holder, expired, plan_admission, size_text, usage

MiB, GiB = 1 << 20, 1 << 30


def inst(id, bytes, last_used=0.0, **kw):
    return Holder("instance", id, kw.pop("name", f"m{id}:latest"), kw.pop("device", "cpu"),
                  kw.pop("tier", "device"), bytes, last_used=last_used, **kw)


def job(id, bytes, **kw):
    return Holder("job", id, f"j{id}:latest", "cpu", "device", bytes, **kw)


def plan(need, holders, budget=1000, priority=0, host_budget=0, host_used=0):
    return plan_admission(need, "cpu", priority, holders, budget, host_budget, host_used,
                          for_what="loading new:latest")


def victims(p):
    return [(a.kind, a.holder.kind, a.holder.id) for a in p.actions]


# -- acceptance 1: who leaves ----------------------------------------------------------------
def test_i12_1_fits_without_actions():
    p = plan(300, [inst(1, 400), inst(2, 200)])
    assert p.ok and p.actions == () and p.free == 400 and p.need == 300 and p.budget == 1000


def test_i12_1_least_recently_used_idle_unpinned_instance_goes_first():
    hs = [inst(1, 400, last_used=30), inst(2, 400, last_used=10), inst(3, 100, last_used=20)]
    p = plan(300, hs)              # 100 free: one 400-byte instance must go, the oldest
    assert p.ok and victims(p) == [("unload", "instance", 2)]
    assert "room for loading new:latest" in p.actions[0].reason
    p = plan(700, hs)              # all three must go: by last use
    assert victims(p) == [("unload", "instance", 2), ("unload", "instance", 3), ("unload", "instance", 1)]


def test_i12_1_lower_priority_first_and_never_a_higher_one():
    hs = [inst(1, 400, last_used=1, priority=5), inst(2, 400, last_used=9, priority=0),
          inst(3, 100, last_used=0, priority=9)]
    p = plan(300, hs, priority=5)
    assert victims(p) == [("unload", "instance", 2)]      # priority class before recency
    p = plan(700, hs, priority=5)
    assert victims(p) == [("unload", "instance", 2), ("unload", "instance", 1)]
    p = plan(950, hs, priority=5)                          # instance 3 (priority 9) never goes
    assert not p.ok and p.actions == ()
    p = plan(300, hs, priority=0)                          # only priority <= 0
    assert victims(p) == [("unload", "instance", 2)]
    assert not plan(600, hs, priority=0).ok


def test_i12_1_pinned_and_busy_instances_are_never_chosen():
    hs = [inst(1, 400, last_used=0, pinned=True), inst(2, 400, last_used=1, idle=False),
          inst(3, 100, last_used=5)]
    p = plan(200, hs)
    assert p.ok and victims(p) == [("unload", "instance", 3)]
    assert not plan(300, hs).ok


def test_i12_1_preemptible_jobs_only_after_instances():
    hs = [job(7, 500, preemptible=True, idle=True), inst(1, 200, last_used=50),
          job(8, 200, preemptible=False, idle=False)]
    p = plan(300, hs)              # 100 free + instance 200 = 300
    assert victims(p) == [("unload", "instance", 1)]
    p = plan(500, hs)
    assert victims(p) == [("unload", "instance", 1), ("pause", "job", 7)]
    assert p.actions[1].reason.startswith("preempted: room for loading new:latest")
    assert not plan(900, hs).ok    # the non-preemptible job stays


def test_i12_1_swap_when_the_host_tier_has_room_else_unload():
    hs = [inst(1, 400, last_used=1), inst(2, 400, last_used=2)]
    p = plan(900, hs, host_budget=500, host_used=50)       # 450 host free: one fits there
    assert victims(p) == [("swap", "instance", 1), ("unload", "instance", 2)]
    p = plan(900, hs, host_budget=0)                       # CPU-only default: no swapping
    assert victims(p) == [("unload", "instance", 1), ("unload", "instance", 2)]
    # what is already on the host tier does not count against the device
    hs.append(inst(3, 999, tier="host"))
    assert plan(200, hs).ok and plan(200, hs).actions == ()


def test_i12_1_every_resident_pinned_is_refused_naming_bytes_and_holders(monkeypatch):
    from llmosd.mem import policy
    monkeypatch.setattr(policy, "_user_name", {1000: "alice"}.get)
    hs = [inst(3, 2100 * MiB, pinned=True, uid=1000, name="smol:latest"),
          job(7, 1400 * MiB, uid=1001), inst(4, 5 * GiB, device="cuda:0")]
    p = plan_admission(1200 * MiB, "cpu", 0, hs, 4 * GiB, 0, 0, for_what="loading big:latest")
    assert not p.ok and p.actions == ()
    m = p.message
    assert m.startswith("loading big:latest needs 1.3 GB on cpu, 625.0 MB free of 4.3 GB; held by: ")
    assert "instance 3 smol:latest 2.2 GB (alice, uid 1000, pinned)" in m
    assert "job 7 j7:latest 1.5 GB (uid 1001, a job, not preemptible)" in m
    assert "instance 4" not in m                           # another device's
    assert "unpin" in p.hint and "unload" in p.hint and "llmosd --budget cpu=SIZE" in p.hint
    e = p.error()
    assert isinstance(e, OutOfMemory) and e.message == m and e.hint == p.hint


def test_i12_1_more_than_the_whole_budget_is_refused_at_once():
    hs = [inst(1, 400, last_used=1)]                       # evictable, yet no use
    p = plan(1001, hs)
    assert not p.ok and p.actions == ()
    assert "more than the whole budget of cpu (1000 B): it can never fit" in p.message
    assert "--budget cpu=SIZE" in p.hint and "dtype" in p.hint
    assert p.never and isinstance(p.error(), InvalidArgument)


def test_i12_1_ties_are_deterministic():
    hs = [inst(5, 400, last_used=1), inst(2, 400, last_used=1)]
    assert victims(plan(300, hs)) == [("unload", "instance", 2)]


# -- keep-alive, usage -----------------------------------------------------------------------
def test_i12_3_expired_by_keep_alive():
    hs = [inst(1, 1, last_used=100), inst(2, 1, last_used=100, pinned=True),
          inst(3, 1, last_used=100, idle=False), inst(4, 1, last_used=50, tier="host"),
          inst(5, 1, last_used=100), inst(6, 1, last_used=150), inst(7, 1, last_used=0)]
    ka = {1: 60, 2: 1, 3: 1, 4: 60, 5: -1, 6: 0}           # 7: no entry, never
    assert expired(hs, ka, now=200) == [4, 1, 6]
    assert expired(hs, ka, now=159) == [4, 6]


def test_i12_usage_row():
    hs = [inst(1, 100), job(2, 50), Holder("kv", 9, "", "cpu", "device", 30), inst(3, 70, tier="host"),
          inst(4, 5, device="cuda:0")]
    assert usage("cpu", hs, 1000, 500) == {"device": "cpu", "budget": 1000, "instances": 100,
                                           "jobs": 50, "reserved": 30, "free": 820,
                                           "host_budget": 500, "host_used": 70}


def test_size_text():
    # as llmctl's tables write sizes (llmctl.format.size): decimal units
    assert [size_text(n) for n in (0, 999, 1000, 1536 * MiB, 16 * 10**6)] == \
        ["0 B", "999 B", "1.0 KB", "1.6 GB", "16.0 MB"]


# -- the manager: ledger, plans on it, listeners, evictions ------------------------------------
def test_i12_manager_ledger_and_plans():
    t = [1000.0]
    mm = MemoryManager({"cpu": 1000}, 300, clock=lambda: t[0])
    freed = []
    mm.on_freed(lambda: freed.append(1))
    mm.charge(("instance", 1), "cpu", 400)
    mm.charge(("instance", 2), "cpu", 300)
    mm.charge(("load", 5), "cpu", 200)                     # a load in progress: nobody's to evict
    assert mm.used("cpu") == 900 and mm.budget("cpu") == 1000 and mm.host_budget == 300
    hs = [inst(1, 0, last_used=5), inst(2, 0, last_used=1)]    # bytes come from the ledger
    p = mm.plan(300, "cpu", 0, hs, "loading x:latest")
    assert p.ok and victims(p) == [("swap", "instance", 2)] and p.free == 100
    mm.charge(("instance", 2), "cpu", 300, tier="host")    # carried out: swapped
    assert freed == [1]                                    # room on the device: listeners run
    freed.clear()
    assert mm.used("cpu") == 600 and mm.used("cpu", "host") == 300 and mm.host_used() == 300
    p = mm.plan(800, "cpu", 0, hs, "loading y:latest")
    assert p.ok and victims(p) == [("unload", "instance", 1)]     # host tier full now
    p = mm.plan(900, "cpu", 0, hs, "loading y:latest")
    assert not p.ok and "load 5" in p.message
    rows = mm.usage_rows({"cpu": hs})
    assert rows == [{"device": "cpu", "budget": 1000, "instances": 400, "jobs": 0, "reserved": 200,
                     "free": 400, "host_budget": 300, "host_used": 300}]
    mm.uncharge(("instance", 9))                           # nothing held: no listener call
    assert freed == []
    mm.uncharge(("instance", 1))
    assert freed == [1] and mm.used("cpu") == 200
    with pytest.raises(ValueError):
        mm.charge(("instance", 1), "cpu", 1, tier="disk")


def test_i12_manager_listener_failure_does_not_stop_others():
    mm, calls = MemoryManager({"cpu": 10}, 0), []
    mm.on_freed(lambda: 1 / 0)
    mm.on_freed(lambda: calls.append("ok"))
    mm.charge(("job", 1), "cpu", 5)
    mm.uncharge(("job", 1))
    assert calls == ["ok"]


def test_i12_manager_keeps_the_last_20_evictions():
    t = [5.0]
    mm = MemoryManager({"cpu": 10}, 0, clock=lambda: t[0])
    for i in range(25):
        mm.note_eviction({"model": f"m{i}:latest", "instance": i, "reason": "keep-alive", "to": "store"})
    rows = mm.recent_evictions()
    assert len(rows) == 20 and rows[0]["instance"] == 5 and rows[-1]["at"] == 5.0


# -- budgets from the config -------------------------------------------------------------------
def cfg_with(**env):
    c, _ = config.load("/dev/null", {}, environ=env)
    return c


def dev_mem(name):
    if name == "cuda:0":
        return 80 * GiB
    raise RuntimeError("invalid device ordinal")


def test_i12_budget_defaults():
    assert budgets_from_config(cfg_with(), dev_mem, 16 * GiB, False) == ({"cpu": 12 * GiB}, 0)
    assert budgets_from_config(cfg_with(), dev_mem, 4 * GiB, False) == ({"cpu": 2 * GiB}, 0)
    assert budgets_from_config(cfg_with(), dev_mem, 256 * GiB, True) == \
        ({"cpu": 192 * GiB, "cuda:0": int(80 * GiB * 0.9)}, 32 * GiB)
    assert budgets_from_config(cfg_with(), dev_mem, 64 * GiB, True)[1] == 16 * GiB


def test_i12_budgets_sizes_and_percentages():
    c = cfg_with(LLMOSD_BUDGET="cpu=8GiB,cuda0=50%,host=25%")
    assert budgets_from_config(c, dev_mem, 16 * GiB, True) == ({"cpu": 8 * GiB, "cuda:0": 40 * GiB}, 4 * GiB)
    # a CUDA section on a machine without CUDA is ignored: one file serves both
    assert budgets_from_config(c, dev_mem, 16 * GiB, False) == ({"cpu": 8 * GiB}, 4 * GiB)
    assert budgets_from_config(cfg_with(LLMOSD_BUDGET="host=0"), dev_mem, 16 * GiB, True)[1] == 0


@pytest.mark.parametrize("env,needle", [
    ("cpu=0", r"devices.cpu.budget \(env LLMOSD_BUDGET\) = '0' is 0 bytes"),
    ("cpu=32GiB", r"devices.cpu.budget \(env LLMOSD_BUDGET\) = '32GiB' \(34.4 GB\) is more than this "
                  r"machine has 17.2 GB of RAM"),
    ("cuda0=100GiB", r"devices.cuda0.budget .* is more than cuda:0 has 85.9 GB"),
    ("cuda1=1GiB", r"devices.cuda1.budget .*no device cuda:1"),
    ("host=17GiB", r"devices.host.budget .* is more than this machine has 17.2 GB"),
])
def test_i12_bad_budgets_are_refused_with_the_numbers(env, needle):
    with pytest.raises(ConfigError, match=needle):
        budgets_from_config(cfg_with(LLMOSD_BUDGET=env), dev_mem, 16 * GiB, True)


class _Reserved(Holder):
    """As the instance side's KV-cache holder: a reservation named for people."""

    def label(self) -> str:
        return "KV cache of running requests"


def test_i12_4_a_refusal_names_no_owner_for_reservations():
    """Holders that are neither instances nor jobs (the KV cache of running requests, a load
    in progress) have no owner: the refusal says why they stay, and nothing of a uid."""
    mm = MemoryManager({"cpu": 1000}, 0)
    mm.charge(("kv", 0), "cpu", 500)
    mm.charge(("load", 7), "cpu", 200)                 # no holder row names it
    p = mm.plan(400, "cpu", 0, [_Reserved("kv", 0, "", "cpu", "device", 500, idle=False),
                                inst(3, 200, uid=None, idle=False)], for_what="loading new:latest")
    held = p.message.split("held by: ")[1]
    kv, rest = held.split(", ", 1)
    assert kv == "KV cache of running requests 500 B (in use)"
    assert "load 7 200 B (in use)" in rest and "instance 3 m3:latest 200 B (owner unknown, busy)" in rest
    assert "uid" not in p.message and "?" not in p.message


def test_i12_3_every_cuda_device_gets_a_budget(monkeypatch):
    """The daemon builds its budgets for as many CUDA devices as torch counts (not 1 for
    "CUDA is available"): a machine with two GPUs has cuda:0 and cuda:1 budgets."""
    torch = pytest.importorskip("torch")
    from types import SimpleNamespace

    from llmosd import main
    from llmosd.mem import devices
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(devices, "device_memory",
                        lambda d: 80 * GiB if torch.device(d).type == "cuda" else 64 * GiB)
    mm = main.memory_manager(SimpleNamespace(budgets={}, budget_sources={}))
    assert sorted(mm.budgets) == ["cpu", "cuda:0", "cuda:1"]
    assert mm.budget("cuda:1") == mm.budget("cuda:0") == int(0.9 * 80 * GiB)
