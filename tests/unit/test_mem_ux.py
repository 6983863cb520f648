"""Issue 12, a user's review of the memory manager's messages: "can never fit" is an invalid
argument (not "try again"), sizes read as llmctl's tables write them, a refusal says why each
holder stayed (priority too) and whose it is, --print-config refuses what the daemon would and
shows what "auto"/"50%" come to, and the README shows --budget.  Pure: no daemon, no torch."""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from llmctl import errors
from llmctl import format as fmt
from llmosd import config
from llmosd.jobs.memory import JobMemory, job_fix
from llmosd.jobs.queue import Job
from llmosd.mem import policy
from llmosd.mem.manager import MemoryManager
from llmosd.mem.policy import Holder, plan_admission, size_text

GiB = 1 << 30
ROOT = Path(__file__).resolve().parents[2]


def inst(i, nbytes, **kw):
    kw.setdefault("name", f"t{i}:latest")
    return Holder("instance", i, kw.pop("name"), kw.pop("device", "cpu"), "device", nbytes, **kw)


# -- 1: more than the whole budget can never fit: invalid_argument (65), not out_of_memory (75) --
def test_i12_ux_1_more_than_the_whole_budget_is_an_invalid_argument():
    p = plan_admission(7_000_000, "cpu", 0, [inst(1, 500_000)], 1_500_000, 0, 0,
                       for_what="loading big:latest")
    e = p.error()
    assert type(e) is errors.InvalidArgument and e.exit_status == errors.EX_DATAERR
    assert "more than the whole budget of cpu (1.5 MB): it can never fit" in e.message
    assert "--budget cpu=SIZE" in e.hint and "dtype" in e.hint
    # not fitting *now* stays OutOfMemory: try again later
    p = plan_admission(1_200_000, "cpu", 0, [inst(1, 500_000, pinned=True)], 1_500_000, 0, 0,
                       for_what="loading big:latest")
    assert type(p.error()) is errors.OutOfMemory and p.error().exit_status == errors.EX_TEMPFAIL
    # the manager's plan is the same
    mm = MemoryManager({"cpu": 1000}, 0)
    assert type(mm.plan(1001, "cpu", 0, [], for_what="loading x:latest").error()) is errors.InvalidArgument


def test_i12_ux_1_a_jobs_refusal_hints_at_its_own_commands_flags():
    mem = JobMemory()
    mem.memory = MemoryManager({"cpu": 1000}, 0)
    train = Job(1, "train", "tiny:latest", 1000, device="cpu", mem_estimate=5000)
    with pytest.raises(errors.InvalidArgument) as e:
        mem._check_budget(train)
    assert "needs about 5.0 KB on cpu, more than the whole budget of cpu (1.0 KB)" in e.value.message
    assert "--method" not in e.value.hint                      # train has no --method
    assert "--batch-size" in e.value.hint and "--block-size" in e.value.hint and "--budget cpu=" in e.value.hint
    full = Job(2, "finetune", "ft:latest", 1000, spec={"method": "full"}, device="cpu", mem_estimate=5000)
    assert "--method lora" in job_fix(full)
    lora = Job(3, "finetune", "ft:latest", 1000, spec={"method": "lora"}, device="cpu", mem_estimate=5000)
    assert "--method" not in job_fix(lora) and "--batch-size" in job_fix(lora)


# -- 2: the units of llmctl's tables ------------------------------------------------------------
def test_i12_ux_2_sizes_read_as_llmctls_tables_write_them():
    for n in (0, 1, 999, 1000, 1023, 1024, 16 * 10**6, 16 << 20, 7_234_567, GiB, 11 * GiB, 3 << 40, 5 * 10**15):
        assert size_text(n) == fmt.size(n), n
    p = plan_admission(7_234_567, "cpu", 0, [inst(3, 14_000_000, pinned=True)], 15_300_000, 0, 0,
                       for_what="loading t4:latest")
    assert "needs 7.2 MB on cpu, 1.3 MB free of 15.3 MB" in p.message
    assert "14.0 MB" in p.message and "MiB" not in p.message + p.hint
    # two different numbers that would read the same are written in bytes
    p = plan_admission(1001, "cpu", 0, [], 1000, 0, 0, for_what="loading x:latest")
    assert "needs 1001 B on cpu, more than the whole budget of cpu (1000 B)" in p.message


# -- 3: a refusal says why each holder stayed, and whose it is --------------------------------
def test_i12_ux_3_a_refusal_by_priority_says_so_and_how_to_displace(monkeypatch):
    monkeypatch.setattr(policy, "_user_name", {1000: "alice"}.get)
    t3 = inst(3, 10_000_000, uid=1000, priority=0)            # idle, unpinned: only its priority keeps it
    p = plan_admission(8_000_000, "cpu", -1, [t3], 15_000_000, 0, 0, for_what="loading t4:latest")
    assert not p.ok
    assert "instance 3 t3:latest 10.0 MB (alice, uid 1000, priority 0, above the requested -1)" in p.message
    assert "load with --priority 0 or higher to displace instance 3 t3:latest" in p.hint
    assert "unpin" not in p.hint                               # nothing is pinned
    # with a pinned one, a busy one and a job: each reason, and the matching hints
    hs = [inst(1, 3_000_000, uid=4242, pinned=True), inst(2, 3_000_000, uid=1000, idle=False),
          Holder("job", 7, "j:latest", "cpu", "device", 3_000_000, uid=1000)]
    p = plan_admission(8_000_000, "cpu", 0, hs, 10_000_000, 0, 0, for_what="loading t4:latest")
    assert "instance 1 t1:latest 3.0 MB (uid 4242, pinned)" in p.message     # no name: the uid
    assert "instance 2 t2:latest 3.0 MB (alice, uid 1000, busy)" in p.message
    assert "job 7 j:latest 3.0 MB (alice, uid 1000, a job, not preemptible)" in p.message
    assert "unpin t1:latest" in p.hint and "busy" in p.hint and "pause or cancel job 7" in p.hint
    assert "--priority" not in p.hint
    # an evictable holder is marked so (what leaving it would free is said)
    p = plan_admission(8_000_000, "cpu", 0, [inst(5, 2_000_000), inst(6, 3_000_000, pinned=True)],
                       10_000_000, 0, 0, for_what="loading t4:latest")
    assert "instance 5 t5:latest 2.0 MB (owner unknown, evictable)" in p.message
    assert "would free only 7.0 MB" in p.message


def test_i12_ux_3_owner_names_come_from_the_system():
    import pwd
    me = os.getuid()
    try:
        name = pwd.getpwuid(me).pw_name
    except KeyError:
        name = None
    assert policy.owner_text(me) == (f"{name}, uid {me}" if name else f"uid {me}")
    assert policy.owner_text(2**31 - 7) == f"uid {2**31 - 7}"   # no such user: the uid alone
    assert policy.owner_text(None) == "owner unknown"


# -- 4: --print-config refuses what the daemon would, and resolves auto/percentages ------------
def print_config(*args, env=None):
    return subprocess.run([sys.executable, "-m", "llmosd", "--config", "/dev/null", "--print-config", *args],
                          capture_output=True, text=True, timeout=60,
                          env={"PATH": os.environ.get("PATH", "/usr/bin:/bin"), **(env or {})})


def test_i12_ux_4_print_config_refuses_bad_budgets_like_the_daemon():
    for flag, needle in (("cpu=0", "is 0 bytes"), ("cpu=50TiB", "is more than this machine has")):
        r = print_config("--budget", flag)
        assert r.returncode == errors.EX_CONFIG, (flag, r.stdout)
        assert needle in r.stderr and "hint:" in r.stderr and r.stdout == ""
    r = print_config(env={"LLMOSD_BUDGET": "host=50TiB"})
    assert r.returncode == errors.EX_CONFIG and "devices.host.budget (env LLMOSD_BUDGET)" in r.stderr


def test_i12_ux_4_print_config_shows_what_auto_and_percentages_come_to():
    ram = config.machine()[0]
    r = print_config("--budget", "cpu=50%")
    assert r.returncode == 0, r.stderr
    assert f'budget = "50%"  # = {size_text(int(ram * 0.5))}; flag --budget' in r.stdout
    r = print_config("--budget", "cpu=1GiB")
    assert 'budget = "1GiB"  # flag --budget' in r.stdout      # a size says itself
    import tomllib
    assert tomllib.loads(r.stdout)["devices"]["cpu"]["budget"] == "1GiB"


def test_i12_ux_4_budget_checks_on_given_hardware():
    def load(flag, hardware):
        return config.load("/dev/null", {"budget": [flag]}, environ={}, hardware=hardware)
    cpu_only, maybe_cuda = (16 * GiB, 0), (16 * GiB, None)
    with pytest.raises(errors.ConfigError, match="is more than this machine has 17.2 GB of RAM"):
        load("cpu=17GiB", cpu_only)
    with pytest.raises(errors.ConfigError, match="is more than this machine has"):
        load("cpu=17GiB", maybe_cuda)                          # the RAM is known either way
    with pytest.raises(errors.ConfigError, match="devices.cuda0.budget .* is 0 bytes"):
        load("cuda0=0", maybe_cuda)
    assert load("cuda0=100GiB", maybe_cuda)[0].budgets == {"cuda0": "100GiB"}   # only torch knows
    assert load("cuda0=0", cpu_only)[0].budgets == {"cuda0": "0"}     # ignored without CUDA, as at start
    with pytest.raises(errors.ConfigError, match="cpu.budget .* plus .*host.budget"):
        config.load("/dev/null", {"budget": ["cpu=12GiB", "host=8GiB"]}, environ={}, hardware=cpu_only)
    # an environ given and no hardware: the form only (settings read for another machine)
    assert config.load("/dev/null", {"budget": ["cpu=50TiB"]}, environ={})[0].budgets == {"cpu": "50TiB"}
    text = config.render(*config.load("/dev/null", {"budget": ["cpu=50TiB"]}, environ={}),
                         hardware=cpu_only)
    assert "# refused at start: devices.cpu.budget (flag --budget) = '50TiB'" in text
    text = config.render(*config.load("/dev/null", {}, environ={}), hardware=cpu_only)
    assert f'budget = "auto"  # = {size_text(12 * GiB)}; default' in text


# -- 5: the README ---------------------------------------------------------------------------
def test_i12_ux_5_readme_shows_budget_free_and_top():
    text = (ROOT / "README.md").read_text()
    synopsis = text.split("## The daemon")[1].split("\n- Settings")[0]
    assert "--budget DEVICE=SIZE" in synopsis
    memory = text.split("## Memory")[1].split("\n## ")[0]
    assert re.search(r"^llmosd --budget cpu=\S+", memory, re.M)
    assert re.search(r"^llmctl free\b", memory, re.M) and re.search(r"^llmctl top\b", memory, re.M)
