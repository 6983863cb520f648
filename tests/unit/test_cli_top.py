"""Issue 12, client side: ``llmctl top`` frames from fixed status/ps replies, tokens/s from
deltas, ``--once --json``, the memory columns of ps/status/free, pin/unpin, --keep-alive
durations and the flags reaching the client, OutOfMemory's exit status (fake clients: no
daemon)."""
from __future__ import annotations

import io
import json

import pytest

from llmctl import Client, protocol
from llmctl.cli import main, top
from llmctl.cli.common import parse_duration
from llmctl.cli.table import PS_HEADERS, eviction_line, keep_alive_text, ps_rows
from llmctl.errors import EX_TEMPFAIL, EX_USAGE, OutOfMemory, UnsupportedVersion

NOW = 1_800_000_000.0
GiB = 1 << 30
DEVICES = [{"device": "cpu", "budget": 8 * GiB, "instances": 2 * GiB, "jobs": GiB, "reserved": 0,
            "free": 5 * GiB, "host_budget": 4 * GiB, "host_used": GiB}]
INSTANCES = [
    {"id": 1, "model": "smol:latest", "digest": "sha256:a", "state": "ready", "device": "cpu",
     "resident_bytes": 2_000_000_000, "estimate_bytes": 1_900_000_000, "active_requests": 0,
     "queued_requests": 0, "tokens_served": 1000, "requests_served": 4, "loaded_at": NOW - 600,
     "last_used": NOW - 60, "uid": 1000, "reason": None, "tier": "device", "pinned": False,
     "priority": 0, "keep_alive": 300, "expires_at": NOW + 240, "load_ms": 1200.0, "swap_in_ms": None,
     "swaps": 0, "adapters": [{"model": "qa:latest", "digest": "sha256:q", "state": "ready",
                               "resident_bytes": 64_000, "estimate_bytes": 60_000, "active_requests": 0,
                               "tokens_served": 10, "requests_served": 1, "loaded_at": NOW - 500,
                               "last_used": NOW - 100, "uid": 1000}]},
    {"id": 3, "model": "tiny:latest", "digest": "sha256:t", "state": "swapped", "device": "cpu",
     "resident_bytes": 1_000_000_000, "estimate_bytes": 990_000_000, "active_requests": 0,
     "queued_requests": 0, "tokens_served": 50, "requests_served": 1, "loaded_at": NOW - 900,
     "last_used": NOW - 400, "uid": 1001, "reason": None, "tier": "host", "pinned": True, "priority": 2,
     "keep_alive": -1, "expires_at": None, "load_ms": 900.0, "swap_in_ms": 80.0, "swaps": 1, "adapters": []},
    {"id": 4, "model": "big:latest", "digest": "sha256:b", "state": "busy", "device": "cpu",
     "resident_bytes": 3_000_000_000, "estimate_bytes": 3_100_000_000, "active_requests": 2,
     "queued_requests": 1, "tokens_served": 5000, "requests_served": 9, "loaded_at": NOW - 100,
     "last_used": NOW - 1, "uid": 1000, "reason": None, "tier": "device", "pinned": False, "priority": 0,
     "keep_alive": 0, "expires_at": None, "load_ms": 3000.0, "swap_in_ms": None, "swaps": 0, "adapters": []},
]
EVICTED = [{"model": "tiny:latest", "instance": 3, "reason": "room for big:latest", "at": NOW - 120, "to": "host"},
           {"model": "old:latest", "instance": 2, "reason": "keep-alive expired", "at": NOW - 30, "to": "store"}]
JOBS = [{"job_id": 7, "kind": "train", "model": "tiny-char:latest", "state": "paused",
         "reason": "preempted: room for big:latest", "step": 40, "max_steps": 200},
        {"job_id": 8, "kind": "finetune", "model": "qa2:latest", "state": "queued",
         "reason": "waiting for memory: needs 2.0 GB on cpu, 1.0 GB free", "step": None, "max_steps": None}]


class FakeClient:
    """Answers status and ps like a 1.7 daemon (``old``: like 1.6, no memory fields); records
    every call."""

    def __init__(self, old=False, refuse=None):
        self.calls, self.old, self.refuse = [], old, refuse

    def status(self):
        self.calls.append(("status",))
        s = {"version": "0.1.0", "pid": 42, "protocol": [1, 6 if self.old else 7], "socket": "ipc:///x",
             "state_dir": "/s", "device": "cpu", "dtype": "float32", "threads": 1, "uptime_s": 5.0,
             "models": 3, "instances": 3, "resident_bytes": 6 * 10**9, "active_requests": 2,
             "tokens_served": 6050, "rss_bytes": 10**9, "jobs": JOBS}
        return s if self.old else {**s, "devices": DEVICES}

    def _call(self, type_, body=None, timeout=None):
        self.calls.append((type_, body))
        assert type_ == "ps"
        if self.old:
            return {"instances": [{k: v for k, v in i.items() if k not in ("tier", "pinned", "keep_alive")}
                                  for i in INSTANCES], "jobs": JOBS}
        return {"instances": INSTANCES, "jobs": JOBS, "evicted": EVICTED}

    def load(self, model, **mem):
        self.calls.append(("load", model, mem))
        if self.refuse:
            raise self.refuse
        return {**INSTANCES[0], "already_loaded": False, "keep_alive": mem.get("keep_alive", 300)}

    def pin(self, target):
        self.calls.append(("pin", target))
        return {"pinned": [1]}

    def unpin(self, target):
        self.calls.append(("unpin", target))
        return {"unpinned": []}

    def generate(self, model, prompt, **opts):
        self.calls.append(("generate", model, opts))
        return FakeGeneration()

    def score(self, model, text, **opts):
        self.calls.append(("score", model, opts))
        return {"tokens": [], "scored_tokens": 0, "logprob": 0.0, "perplexity": 1.0}

    def train(self, name, data_paths, spec, priority=0, force=False, progress=None, **kw):
        self.calls.append(("train", name, kw))
        return {"job_id": 9, "state": "queued", "model": name}


class FakeGeneration:
    stats, chunks = {"generated_tokens": 1, "finish_reason": "length"}, [{"text": "x"}]

    def __iter__(self):
        return iter(["x"])


def run(client, *args):
    return main(list(args), obj={"client": client})


# -- top: the frame, tokens/s, --once --json ------------------------------------------------------
def test_i12_6_top_frame_shows_devices_instances_adapters_evictions_and_jobs():
    snap = {"devices": DEVICES, "instances": INSTANCES, "evicted": EVICTED, "jobs": JOBS}
    lines = top.render(snap, {1: 12.5, 3: None, 4: 100.0}, NOW)
    text = "\n".join(lines)
    assert lines[0].startswith("llmosd top - ") and "3 instance(s), 2 active request(s), 2 job(s)" in lines[0]
    dev = next(ln.split() for ln in lines if ln.startswith("cpu "))
    assert dev[:6] == ["cpu", "8.6", "GB", "3.2", "GB", "(38%)"]           # budget, used = 2+1+0 GiB
    host = next(ln for ln in lines if ln.startswith("host "))
    assert "4.3 GB" in host and "1.1 GB (25%)" in host and "3.2 GB" in host
    rows = {ln.split()[0]: ln.split() for ln in lines if ln[:1].isdigit()}
    assert rows["1"][:7] == ["1", "smol:latest", "device", "ready", "0", "0", "12.5"]
    assert rows["1"][-3:] == ["GB", "4m00s", "-"]                           # keep-alive left, not pinned
    assert rows["3"][2:4] == ["host", "swapped"] and rows["3"][-2:] == ["pinned", "yes"]
    assert rows["4"][4:7] == ["2", "1", "100.0"] and rows["4"][-3:] == ["0s", "idle", "-"]
    adapter = lines[next(n for n, ln in enumerate(lines) if ln.startswith("1 ")) + 1]
    assert adapter.split()[:3] == ["`-", "qa:latest", "ready"]
    assert "evicted 2 minutes ago: tiny:latest (instance 3) to host: room for big:latest" in text
    assert "old:latest (instance 2) to store: keep-alive expired" in text
    job = next(ln for ln in lines if ln.startswith("7 "))
    assert job.split()[:5] == ["7", "train", "tiny-char:latest", "paused", "40/200"]
    assert job.endswith("preempted: room for big:latest")
    assert any(ln.startswith("8 ") and ln.endswith("waiting for memory: needs 2.0 GB on cpu, 1.0 GB free")
               for ln in lines)


def test_i12_6_top_frame_fits_the_window():
    snap = {"devices": DEVICES, "instances": INSTANCES, "evicted": EVICTED, "jobs": JOBS}
    lines = top.render(snap, {}, NOW, width=40, height=10)
    assert len(lines) == 10 and all(len(ln) <= 40 for ln in lines)
    assert lines[-1].startswith("... ") and "more line(s)" in lines[-1]


def test_i12_6_top_tokens_per_second_come_from_deltas_between_refreshes():
    r = top.Rates()
    assert r.update(INSTANCES, 10.0) == {1: None, 3: None, 4: None}
    later = [{**INSTANCES[0], "tokens_served": 1250}, {**INSTANCES[2], "tokens_served": 5000}]
    assert r.update(later, 12.0) == {1: 125.0, 4: 0.0}
    assert r.update([{**INSTANCES[0], "tokens_served": 1250}], 12.0) == {1: None}   # no time passed


def test_i12_6_top_once_json_carries_what_the_table_shows(capsys):
    c = FakeClient()
    assert run(c, "top", "--once", "--json") == 0
    got = json.loads(capsys.readouterr().out)
    assert list(got) == ["devices", "instances", "evicted", "jobs"]
    assert got == {"devices": DEVICES, "instances": INSTANCES, "evicted": EVICTED, "jobs": JOBS}
    assert run(c, "top", "--once") == 0
    out = capsys.readouterr().out.splitlines()
    for i in INSTANCES:
        assert any(ln.split()[:2] == [str(i["id"]), i["model"]] for ln in out), i["model"]
    assert any(ln.startswith("cpu ") for ln in out) and any(ln.startswith("7 ") for ln in out)


def test_i12_6_top_once_json_of_an_older_daemon_has_empty_lists(capsys):
    assert run(FakeClient(old=True), "top", "--once", "--json") == 0
    got = json.loads(capsys.readouterr().out)
    assert got["devices"] == [] and got["evicted"] == [] and len(got["instances"]) == 3
    assert run(FakeClient(old=True), "top", "--once") == 0
    out = capsys.readouterr().out
    assert "smol:latest" in out and "DEVICE" not in out


def test_i12_6_top_needs_a_terminal_or_once(capsys):
    assert run(FakeClient(), "top") == EX_USAGE                 # captured stdout is no terminal
    assert "--once" in capsys.readouterr().err
    capsys.readouterr()


def test_i12_review_12_top_json_implies_once(capsys):
    assert run(FakeClient(), "top", "--json") == 0                # no terminal needed, no --once
    assert list(json.loads(capsys.readouterr().out)) == ["devices", "instances", "evicted", "jobs"]


class KeyScreen(top.Screen):
    """A Screen whose keys come from a list (the last one raising, if it is an exception)."""
    keys: list = []

    def key(self, timeout):
        k = self.keys.pop(0)
        if isinstance(k, BaseException):
            raise k
        return k


@pytest.mark.parametrize("keys", [[None, "x", "q"], [None, KeyboardInterrupt()]])
def test_i12_6_top_q_or_ctrl_c_quits_and_restores_the_screen(monkeypatch, keys):
    monkeypatch.setattr(top, "Screen", KeyScreen)
    KeyScreen.keys = list(keys)
    out, c = io.StringIO(), FakeClient()
    try:
        top.live(c, 0.01, out=out, inp=io.StringIO())
    except KeyboardInterrupt:
        assert isinstance(keys[-1], KeyboardInterrupt)
    s = out.getvalue()
    assert s.startswith("\x1b[?1049h\x1b[?25l") and s.endswith("\x1b[?25h\x1b[?1049l")
    assert s.count("llmosd top - ") == len(keys) and not KeyScreen.keys
    assert [k for k, *_ in c.calls].count("status") == len(keys)


# -- durations ------------------------------------------------------------------------------------
@pytest.mark.parametrize("text,secs", [("300", 300), ("2.5", 2.5), ("30s", 30), ("5m", 300), ("1h", 3600),
                                       ("1h30m", 5400), ("1d", 86400), ("0", 0), ("-1", -1), ("-5m", -1),
                                       (" 10M ", 600), ("-0", 0)])
def test_i12_3_durations_as_ollama_takes_them(text, secs):
    assert parse_duration(text) == secs


@pytest.mark.parametrize("text", ["", "five", "5x", "1.2.3", "m5", "5m-1", "--1", "11000d"])
def test_i12_3_bad_durations_are_usage_errors(text, capsys):
    with pytest.raises(ValueError):
        parse_duration(text)
    assert run(FakeClient(), "load", "smol", "--keep-alive", text) == EX_USAGE
    assert "--keep-alive" in capsys.readouterr().err


# -- flags reach the client ------------------------------------------------------------------------
def test_i12_3_load_keep_alive_priority_pin_reach_the_client(capsys):
    c = FakeClient()
    assert run(c, "load", "smol", "--keep-alive", "5m", "--priority", "3", "--pin") == 0
    assert c.calls[-1] == ("load", "smol", {"keep_alive": 300.0, "priority": 3, "pin": True})
    assert run(c, "load", "smol") == 0 and c.calls[-1] == ("load", "smol", {})
    assert run(c, "generate", "smol", "hi", "--keep-alive", "0") == 0
    assert c.calls[-1] == ("generate", "smol", {**c.calls[-1][2], "keep_alive": 0.0})
    assert run(c, "generate", "smol", "hi") == 0 and "keep_alive" not in c.calls[-1][2]
    assert run(c, "score", "smol", "hi", "--keep-alive", "-1") == 0
    assert c.calls[-1] == ("score", "smol", {"add_bos": None, "keep_alive": -1.0})


def test_i12_1_pin_and_unpin(capsys):
    c = FakeClient()
    assert run(c, "pin", "smol") == 0 and c.calls[-1] == ("pin", "smol")
    assert capsys.readouterr().out == "pinned instance 1\n"
    assert run(c, "unpin", "3") == 0 and c.calls[-1] == ("unpin", "3")
    assert capsys.readouterr().out == "3 is not loaded\n"


def test_i12_5_train_preemptible_reaches_the_client(tmp_path):
    data = tmp_path / "s.txt"
    data.write_text("First Citizen:\nBefore we proceed any further, hear me speak.\n" * 50)
    c = FakeClient()
    assert run(c, "train", "tiny", "--data", str(data), "--preemptible") == 0
    assert c.calls[-1] == ("train", "tiny", {"preemptible": True})
    assert run(c, "train", "tiny", "--data", str(data)) == 0 and c.calls[-1] == ("train", "tiny", {})


def test_i12_1_out_of_memory_prints_the_daemons_numbers_and_exits_75(capsys):
    msg = ("needs 1.2 GiB on cpu, 300 MiB free of 4 GiB; held by: instance 3 smol:latest 2.1 GiB "
           "(uid 1000, pinned)")
    c = FakeClient(refuse=OutOfMemory(msg, hint="unpin smol:latest ('llmctl unpin smol')"))
    assert run(c, "load", "big") == EX_TEMPFAIL
    err = capsys.readouterr().err
    assert f"llmctl: out_of_memory: {msg}\n" in err and "hint: unpin smol:latest" in err


# -- ps, status, free ------------------------------------------------------------------------------
def test_i12_1_ps_shows_tier_estimate_measured_keep_alive_and_evictions(capsys):
    rows = ps_rows(INSTANCES, NOW)
    cols = dict(zip(PS_HEADERS, rows[0]))
    assert cols["RESIDENT"] == "2.0 GB" and cols["EST"] == "1.9 GB" and cols["TIER"] == "device"
    assert cols["KEEP-ALIVE"] == "4m00s" and rows[1][1] == "`- qa:latest"
    assert dict(zip(PS_HEADERS, rows[2]))["KEEP-ALIVE"] == "pinned"
    assert keep_alive_text({"keep_alive": -1}) == "forever" and keep_alive_text({}) == "-"
    assert eviction_line(EVICTED[0], NOW) == \
        "evicted 2 minutes ago: tiny:latest (instance 3) to host: room for big:latest"
    assert run(FakeClient(), "ps") == 0
    out = capsys.readouterr().out
    assert "TIER" in out and "KEEP-ALIVE" in out and "(instance 2) to store: keep-alive expired" in out
    assert run(FakeClient(old=True), "ps") == 0                  # a 1.6 daemon's rows still print
    assert "evicted" not in capsys.readouterr().out


def test_i12_1_status_and_free_show_the_devices_table(capsys):
    assert run(FakeClient(), "status") == 0
    out = capsys.readouterr().out
    assert "DEVICE   BUDGET   INSTANCES   JOBS     RESERVED   FREE" in out
    assert run(FakeClient(), "free") == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["DEVICE", "BUDGET", "INSTANCES", "JOBS", "RESERVED", "FREE", "OTHER"]
    assert lines[1].split() == ["cpu", "8.6", "GB", "2.1", "GB", "1.1", "GB", "0", "B", "5.4", "GB", "-"]
    assert lines[2].split() == ["host", "4.3", "GB", "1.1", "GB", "-", "-", "3.2", "GB", "-"]
    assert run(FakeClient(), "free", "--json") == 0
    assert json.loads(capsys.readouterr().out) == {"devices": DEVICES}
    assert run(FakeClient(old=True), "status") == 0 and "DEVICE" not in capsys.readouterr().out
    assert run(FakeClient(old=True), "free") == 76


# -- the client library ---------------------------------------------------------------------------
class WireClient(Client):
    """A Client whose wire is a list: records what it would send."""

    def __init__(self, minor=7):
        super().__init__("ipc:///nonexistent/llmosd.sock")
        self.sent, self.daemon_info = [], {"protocol": [1, minor]}

    def _call(self, type_, body=None, timeout=None):
        protocol.check_request(protocol.request(1, type_, body))       # what the daemon checks first
        self.sent.append((type_, body))
        return {"results": []}


def test_i12_client_sends_the_1_7_fields_and_refuses_them_to_older_daemons():
    c = WireClient()
    c.load("smol", keep_alive=300.0, priority=-2, pin=True)
    c.load("tiny")
    c.score("smol", "x", keep_alive=0)
    c.classify("smol", ["a"], ["p", "n"], keep_alive=-1)
    assert c.sent == [("load", {"model": "smol", "keep_alive": 300.0, "priority": -2, "pin": True}),
                      ("load", {"model": "tiny"}),
                      ("score", {"model": "smol", "text": "x", "keep_alive": 0}),
                      ("classify", {"model": "smol", "labels": ["p", "n"], "keep_alive": -1, "inputs": ["a"]})]
    old = WireClient(minor=6)
    old.load("tiny")
    with pytest.raises(UnsupportedVersion, match="needs protocol 1.7; this llmosd speaks 1.6"):
        old.load("tiny", pin=True)
    with pytest.raises(UnsupportedVersion):
        old.pin("tiny")


# -- the manual pages ------------------------------------------------------------------------------
def test_i12_man_page_names_every_memory_command_and_flag():
    import re
    from pathlib import Path

    from llmctl.cli import cli
    page = (Path(__file__).resolve().parents[2] / "man" / "llmctl.1").read_text()
    for name in ("status", "free", "ps", "top", "load", "unload", "pin", "unpin"):
        assert re.search(rf"^\.B {name}\b", page, re.M), name
        for p in cli.commands[name].params:
            for opt in p.opts:
                if opt.startswith("--") and opt != "--help":
                    assert "\\-\\-" + opt[2:].replace("-", "\\-") in page, (name, opt)
    for name in ("run", "generate", "chat", "score", "classify", "embed"):
        assert "--keep-alive" in [o for p in cli.commands[name].params for o in p.opts], name
        assert re.search(rf"^\.B {name} .*\\-\\-keep\\-alive DURATION", page, re.M), name
    for name in ("train", "finetune"):
        assert "--preemptible" in [o for p in cli.commands[name].params for o in p.opts], name
        assert re.search(rf"^\.B {name} .*\\-\\-preemptible", page, re.M), name
    assert ".SH DURATIONS" in page


def test_i12_man_pages_lint_clean():
    import shutil
    import subprocess
    from pathlib import Path
    if shutil.which("mandoc") is None:
        pytest.skip("mandoc is not installed")
    man = Path(__file__).resolve().parents[2] / "man"
    r = subprocess.run(["mandoc", "-T", "lint", "-W", "warning", str(man / "llmctl.1"),
                        str(man / "llmosd-protocol.7")], capture_output=True, text=True)
    assert r.returncode == 0 and not (r.stdout + r.stderr).strip(), r.stdout + r.stderr


def test_i12_2_the_stats_line_shows_a_swap_in():
    from llmctl.cli.infer import stats_line
    s = {"prompt_tokens": 3, "generated_tokens": 5, "finish_reason": "length", "swap_in_ms": 80.0}
    assert stats_line(s).endswith("swapped back in 0.08s")
    assert "swapped" not in stats_line({**s, "swap_in_ms": None})
