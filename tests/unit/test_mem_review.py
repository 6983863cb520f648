"""Issue 12 review: one ledger for CUDA devices whatever they are called, budgets for every
CUDA device, listeners woken by a charge that shrinks, cpu + host within the RAM of a
CPU-only machine, and the man pages agreeing with the code.  No GPU needed: CUDA is faked."""
from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from llmctl.errors import ConfigError, InvalidArgument
from llmosd import config
from llmosd.jobs.queue import mem_device
from llmosd.mem import devices
from llmosd.mem.manager import MemoryManager, budgets_from_config

GiB = 1 << 30
MAN = Path(__file__).resolve().parents[2] / "man"


def cfg_with(flags=None, **env):
    c, _ = config.load("/dev/null", dict(flags or {}), environ=env)
    return c


def two_gpus(name):
    if name in ("cuda:0", "cuda:1"):
        return 80 * GiB
    raise RuntimeError("invalid device ordinal")


@pytest.fixture
def fake_cuda(monkeypatch):
    """Two CUDA devices, the current one cuda:0 (torch is never asked for a real one)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)


# -- 1: a GPU daemon's instances and jobs share one ledger, under budgets that exist ------------
def test_i12_review_1_resolve_device_is_always_indexed(fake_cuda):
    assert str(devices.resolve_device("cuda")) == "cuda:0"
    assert str(devices.resolve_device("auto")) == "cuda:0"
    assert str(devices.resolve_device("cuda:1")) == "cuda:1"
    assert str(devices.resolve_device("cpu")) == "cpu"
    with pytest.raises(InvalidArgument, match="has 2 CUDA devices"):
        devices.resolve_device("cuda:2")
    # an instance's device (str of the resolved device) is the job's (mem_device) and has a budget
    budgets, _ = budgets_from_config(cfg_with(), two_gpus, 64 * GiB, 2)
    mm = MemoryManager(budgets, 0)
    for name in ("cuda", "auto"):
        dev = str(devices.resolve_device(name))
        assert dev == mem_device("cuda") and mm.budget(dev) == int(80 * GiB * 0.9)
        assert mm.plan(GiB, dev, 0, [], for_what="loading smol:latest").ok


def test_i12_review_1_every_cuda_device_has_a_default_budget():
    budgets, _ = budgets_from_config(cfg_with(), two_gpus, 64 * GiB, 2)
    assert budgets == {"cpu": 48 * GiB, "cuda:0": int(80 * GiB * 0.9), "cuda:1": int(80 * GiB * 0.9)}
    c = cfg_with(LLMOSD_BUDGET="cuda1=50%")
    assert budgets_from_config(c, two_gpus, 64 * GiB, 2)[0]["cuda:1"] == 40 * GiB
    assert set(budgets_from_config(cfg_with(), two_gpus, 64 * GiB, True)[0]) == {"cpu", "cuda:0"}
    assert set(budgets_from_config(cfg_with(), two_gpus, 64 * GiB, 0)[0]) == {"cpu"}


def test_i12_review_1_cuda_without_index_is_cuda0_everywhere():
    mm = MemoryManager({"cpu": 10 * GiB, "cuda:0": 8 * GiB}, 0)
    assert mm.budget("cuda") == 8 * GiB
    mm.charge(("instance", 1), "cuda", GiB)              # an old caller's name: the same ledger
    mm.charge(("job", 2), "cuda:0", GiB)
    assert mm.used("cuda:0") == mm.used("cuda") == 2 * GiB
    p = mm.plan(7 * GiB, "cuda", 0, [], for_what="loading big:latest")
    assert not p.ok and "cuda:0" in p.message and "6.4 GB free" in p.message
    # the refusal's hint names a key --budget takes, and `--budget cuda=SIZE` is cuda:0's
    p = mm.plan(9 * GiB, "cuda", 0, [], for_what="loading huge:latest")
    hint = p.error().hint
    key = re.search(r"--budget (\S+)=SIZE", hint).group(1)
    assert key == "cuda0"
    for flag in ("cuda=50%", "cuda0=50%", "cuda:0=50%"):
        c = cfg_with({"budget": [flag]})
        assert budgets_from_config(c, two_gpus, 64 * GiB, 1)[0]["cuda:0"] == 40 * GiB


# -- 3: a charge that shrinks wakes whoever waits for room ---------------------------------------
def test_i12_review_3_a_shrinking_charge_runs_the_listeners():
    mm, calls = MemoryManager({"cpu": 1000}, 500), []
    mm.on_freed(lambda: calls.append(1))
    mm.charge(("instance", 1), "cpu", 600)              # an estimate while it loads
    mm.charge(("instance", 1), "cpu", 700)              # grows: nothing freed
    assert calls == []
    mm.charge(("instance", 1), "cpu", 400)              # measured below the estimate
    assert calls == [1]
    mm.charge(("instance", 1), "cpu", 400, tier="host")   # swapped: the device has room
    assert calls == [1, 1]
    mm.charge(("instance", 1), "cpu", 300, tier="host")   # the host tier only: nothing on a device
    mm.charge(("instance", 1), "cpu", 400)              # swapped back in
    assert calls == [1, 1] and mm.used("cpu") == 400


# -- 4: on a CPU-only machine the host tier is the same RAM as the cpu budget ------------------
def test_i12_review_4_cpu_and_host_must_fit_in_ram_without_cuda():
    ram = 16 * GiB
    # a default cpu budget is lowered by the host budget: together they keep the system's share
    assert budgets_from_config(cfg_with(LLMOSD_BUDGET="host=4GiB"), two_gpus, ram, 0) == \
        ({"cpu": 8 * GiB}, 4 * GiB)
    with pytest.raises(ConfigError, match=r"devices.cpu.budget \(env LLMOSD_BUDGET\) = 15.0 GB "
                                          r"plus devices.host.budget .* = 4.3 GB is 19.3 GB, more "
                                          r"than this machine has \(17.2 GB of RAM\)") as e:
        budgets_from_config(cfg_with(LLMOSD_BUDGET="cpu=14GiB,host=4GiB"), two_gpus, ram, 0)
    assert "host=0" in e.value.hint
    with pytest.raises(ConfigError, match=r"devices.host.budget \(flag --budget\) = 12.9 GB leaves "
                                          r"nothing of the default cpu budget"):
        budgets_from_config(cfg_with({"budget": ["host=12GiB"]}), two_gpus, ram, 0)
    # with CUDA the host tier is the pinned RAM beside the devices' memory: no such rule
    assert budgets_from_config(cfg_with(LLMOSD_BUDGET="cpu=14GiB,host=4GiB"), two_gpus, ram, 1)[0]["cpu"] \
        == 14 * GiB
    text = config.render(*config.load("/dev/null", {"budget": ["host=4GiB"]}, environ={}))
    cpu_line = text.split("[devices.cpu]\n")[1].splitlines()[0]
    assert "lowered by the host budget" in cpu_line
    plain = config.render(*config.load("/dev/null", {}, environ={}))
    assert "lowered" not in plain


# -- 5: the man pages say what the code does ------------------------------------------------------
def test_i12_review_5_man_pages_document_budgets_and_job_memory():
    daemon = (MAN / "llmosd.8").read_text()
    for word in (r"\-\-budget", "LLMOSD_BUDGET", "[devices.cpu]", "[devices.host]", "keep_alive",
                 "budget:"):
        assert word in daemon, word
    proto = (MAN / "llmosd-protocol.7").read_text()
    train = proto.split(".B train {")[1].split("\n.TP\n")[0]
    assert "whole budget" in train and "invalid_argument" in train.split("whole budget")[1]
    assert "out_of_memory" not in train
    row = proto.split("A job row: {")[1].split("unknown values are nil")[0]
    for field in ("preemptible", "estimate_bytes", "mem_bytes"):
        assert re.search(rf"\b{field}\b", row), field
