"""End-to-end acceptance of the daemon core: real llmosd subprocess, real client and CLI."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time

import pytest
import torch

from conftest import SHAKESPEARE, TINY, Daemon
from llmctl import errors


def wait_for(pred, timeout=15.0, step=0.05):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        v = pred()
        if v:
            return v
        time.sleep(step)
    raise AssertionError("condition not met in time")


def first_token(g) -> None:
    """Read ``g`` up to its first generated token (past the ``loading`` chunk of a cold start)."""
    while not (g.chunks and g.chunks[-1]["token_ids"]):
        next(g)


def test_create_load_ps_generate_unload(daemon):
    r = daemon.cli("create", "tiny", *TINY, "--vocab-from", str(SHAKESPEARE), "--json")
    made = json.loads(r.stdout)
    assert made["model"] == "tiny:latest" and made["digest"].startswith("sha256:")
    from llmosd.store.store import Store
    from safetensors.torch import load as load_st
    store = Store(str(daemon.state / "store"))
    weights = load_st(store.read_blob(store.get("tiny")[1]["weights"]["digest"]))
    assert made["parameters"] == sum(t.numel() for t in weights.values()) > 0
    daemon.cli("load", "tiny")
    ps = json.loads(daemon.cli("ps", "--json").stdout)["instances"]
    assert len(ps) == 1 and ps[0]["state"] == "ready" and ps[0]["resident_bytes"] > 0
    assert ps[0]["model"] == "tiny:latest" and ps[0]["uid"] == os.getuid()
    table = daemon.cli("ps").stdout
    assert "tiny:latest" in table and "ready" in table and "RESIDENT" in table
    out = daemon.cli("generate", "tiny", "ROMEO:", "--max-tokens", "20", "--seed", "1").stdout
    assert len(out) > 0
    daemon.cli("unload", "tiny")
    assert json.loads(daemon.cli("ps", "--json").stdout)["instances"] == []


def test_seeded_output_is_reproducible_and_greedy_matches_forward(shared_daemon):
    args = ("generate", "tiny", "First Citizen:", "--max-tokens", "24", "--temperature", "0.9",
            "--seed", "1234")
    a, b = shared_daemon.cli(*args).stdout, shared_daemon.cli(*args).stdout
    assert a == b and a
    c = shared_daemon.cli(*args[:-1], "99").stdout
    assert c != a          # another seed, another sample (24 tokens: a collision is implausible)

    with shared_daemon.client() as cl:
        gen = cl.generate("tiny", "First Citizen:", max_tokens=24, temperature=0)
        text = gen.text()
        ids = [t for ch in gen.chunks for t in ch["token_ids"]]
    # the same weights, straight from the store, greedy without any cache
    from llmosd.models.loader import load_model
    from llmosd.store.store import Store
    store = Store(str(shared_daemon.state / "store"))
    _, man, _ = store.get("tiny")
    model, tok = load_model(store, man, torch.device("cpu"))
    seq = tok.encode("First Citizen:")
    ref = []
    with torch.no_grad():
        for _ in range(24):
            nxt = int(model(torch.tensor([seq]))[0, -1].argmax())
            if nxt in tok.eos_ids():
                break
            ref.append(nxt)
            seq.append(nxt)
    assert ids == ref
    assert text == tok.decode(ref)


def test_pipe_json_and_ps_fields(shared_daemon):
    r = shared_daemon.cli("generate", "tiny", "--max-tokens", "8", "--json", "--temperature", "0",
                          input="To be, or not to be\n")
    lines = [json.loads(ln) for ln in r.stdout.splitlines()]
    assert lines[-1]["done"] is True and lines[-1]["generated_tokens"] == 8
    assert lines[-1]["prompt_tokens"] > 3 and lines[-1]["finish_reason"] == "length"
    assert all("text" in ln for ln in lines[:-1])
    r2 = shared_daemon.cli("generate", "tiny", "-", "--max-tokens", "8", "--temperature", "0",
                           input="To be, or not to be\n")
    assert r2.stdout == "".join(ln["text"] for ln in lines[:-1])
    ps = json.loads(shared_daemon.cli("ps", "--json").stdout)["instances"]
    for field in ("id", "model", "digest", "state", "device", "resident_bytes", "active_requests",
                  "tokens_served", "loaded_at", "last_used", "uid"):
        assert field in ps[0]
    # other tests add models to the shared daemon: look 'tiny' up, whatever else is listed
    assert "tiny:latest" in [m["model"] for m in json.loads(shared_daemon.cli("ls", "--json").stdout)]
    assert json.loads(shared_daemon.cli("status", "--json").stdout)["instances"] >= 1


def test_first_generate_autoloads_and_says_so(daemon):
    daemon.cli("create", "auto", *TINY, "--vocab-from", str(SHAKESPEARE))
    lines = daemon.cli("generate", "auto", "Hi", "--max-tokens", "3", "--json").stdout.splitlines()
    assert json.loads(lines[-1])["loaded"] is True
    lines = daemon.cli("generate", "auto", "Hi", "--max-tokens", "3", "--json").stdout.splitlines()
    assert json.loads(lines[-1])["loaded"] is False


def test_eight_concurrent_clients(shared_daemon):
    prompts = [f"Prompt number {i}:" for i in range(8)]
    results, errors_ = {}, []

    def run(i):
        try:
            with shared_daemon.client() as c:
                g = c.generate("tiny", prompts[i], max_tokens=40, temperature=0)
                results[i] = (g.text(), g.stats)
        except Exception as e:  # noqa: BLE001 - reported below
            errors_.append(e)
    threads = [threading.Thread(target=run, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors_ and len(results) == 8
    with shared_daemon.client() as c:   # each equals the same prompt run alone
        for i in range(8):
            alone = c.generate("tiny", prompts[i], max_tokens=40, temperature=0).text()
            assert results[i][0] == alone
            assert results[i][1]["generated_tokens"] == 40
        assert all(i["active_requests"] == 0 for i in c.ps())


def test_killed_client_frees_its_generation(tmp_path):
    d = Daemon(tmp_path / "d").start()
    try:
        d.cli("create", "long", *TINY, "--context", "100000", "--vocab-from", str(SHAKESPEARE))
        d.cli("load", "long")
        script = ("import sys; from llmctl import Client\n"
                  f"c = Client({d.sock!r}).connect()\n"
                  "g = c.generate('long', 'Once', max_tokens=90000, temperature=0)\n"
                  "for i, _ in enumerate(g):\n"
                  "    if i == 5: print('streaming', flush=True)\n")
        p = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
        assert p.stdout.readline().strip() == "streaming"
        with d.client() as c:
            assert c.ps()[0]["active_requests"] == 1
            p.kill()
            p.wait()
            wait_for(lambda: c.ps()[0]["active_requests"] == 0, timeout=10)
            assert c.ps()[0]["tokens_served"] < 90000
            # and the instance still serves
            g = c.generate("long", "Hi", max_tokens=3, temperature=0)
            g.text()
            assert g.stats["generated_tokens"] == 3 and g.stats["finish_reason"] == "length"
    finally:
        assert d.stop() == 0


def test_bad_messages_get_errors_and_daemon_carries_on(tmp_path):
    import msgpack
    import zmq
    d = Daemon(tmp_path / "d", env={"LLMOSD_MAX_MESSAGE_BYTES": "65536"}).start()
    try:
        s = zmq.Context.instance().socket(zmq.DEALER)
        s.setsockopt(zmq.LINGER, 0)
        s.connect(d.sock)

        def ask(frames):
            s.send_multipart(frames)
            assert s.poll(5000), "no reply"
            return msgpack.unpackb(s.recv())

        pk = lambda m: msgpack.packb(m, use_bin_type=True)   # noqa: E731
        assert ask([b"\xc1\xff garbage"])["body"]["name"] == "bad_request"
        assert ask([pk([1, 2, 3])])["body"]["name"] == "bad_request"
        assert ask([pk({"v": 1, "id": 1})])["body"]["name"] == "bad_request"
        assert ask([pk({"v": 1, "id": 2, "type": "ping"}), b"x"])["body"]["name"] == "bad_request"
        r = ask([pk({"v": 1, "id": 3, "type": "frobnicate", "body": {}})])
        assert r["id"] == 3 and r["body"]["name"] == "unknown_type" and r["body"]["code"] == 3
        r = ask([pk({"v": 1, "id": 4, "type": "generate", "body": {"model": 7, "prompt": "x"}})])
        assert r["body"]["name"] == "invalid_argument" and "model" in r["body"]["message"]
        r = ask([pk({"v": 1, "id": 5, "type": "generate", "body": {"model": "x", "prompt": "p",
                                                                    "max_tokens": "many"}})])
        assert r["body"]["name"] == "invalid_argument" and "max_tokens" in r["body"]["message"]
        r = ask([pk({"v": 9, "id": 6, "type": "ping", "body": {}})])
        assert r["body"]["name"] == "unsupported_version"
        r = ask([pk({"v": 1, "id": 7, "type": "generate",
                     "body": {"model": "x", "prompt": "y" * 100_000}})])
        assert r["id"] == 7 and r["body"]["name"] == "too_large"
        r = ask([pk({"v": 1, "id": 8, "type": "show", "body": {"model": "Bad Name!"}})])
        assert r["body"]["name"] == "invalid_argument"
        r = ask([pk({"v": 1, "id": 9, "type": "generate", "body": {"model": "nope", "prompt": "y"}})])
        assert r["body"]["name"] == "model_not_found" and r["body"]["hint"]
        assert ask([pk({"v": 1, "id": 10, "type": "ping"})])["type"] == "ok"
        s.close()
        # a second daemon on the same socket refuses to start, and the first keeps serving
        second = Daemon(tmp_path / "d2")
        second.sock, second.env["LLMOSD_SOCKET"] = d.sock, d.sock
        second.start(wait=False)
        assert second.proc.wait(30) != 0
        assert "already running" in second.log.read_text()
        with d.client() as c:
            assert c.ping()
    finally:
        assert d.stop() == 0


def test_sigterm_during_stream(tmp_path):
    d = Daemon(tmp_path / "d").start()
    try:
        d.cli("create", "long", *TINY, "--context", "100000", "--vocab-from", str(SHAKESPEARE))
        with d.client() as c:
            g = c.generate("long", "Once", max_tokens=90000, temperature=0)
            first_token(g)
            d.proc.send_signal(signal.SIGTERM)
            with pytest.raises(errors.ShuttingDown):
                for _ in g:
                    pass
        assert d.proc.wait(15) == 0
        assert os.listdir(d.rundir) == []          # socket and lock gone; the directory stays
        assert "Traceback" not in d.log.read_text()
    finally:
        d.stop()                                   # whatever happened above: nothing left running


def test_kill9_during_create_leaves_only_complete_models(tmp_path):
    d = Daemon(tmp_path / "d").start()
    p = None
    try:
        d.cli("create", "done", *TINY, "--vocab-from", str(SHAKESPEARE))
        big = ["--layers", "12", "--dim", "768", "--heads", "12", "--vocab-size", "4000"]
        p = subprocess.Popen([sys.executable, "-m", "llmctl.cli", "create", "half", *big,
                              "--vocab-from", str(SHAKESPEARE)], env=d.env,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        with d.client() as c:
            job = wait_for(lambda: (c._call("ps")["jobs"] or [None])[0], timeout=30)
        time.sleep(1.0)                                  # let it get into training/writing
        d.kill9()
        p.wait(30)                                       # the client notices at once, not after a timeout
        assert p.returncode == errors.EX_UNAVAILABLE and "closed the connection" in p.stderr.read()
        # the worker died with the daemon (no orphan still writing into the store)
        wait_for(lambda: not os.path.exists(f"/proc/{job['pid']}") or
                 open(f"/proc/{job['pid']}/stat").read().split()[2] == "Z", timeout=10)
        d.start()
        models = json.loads(d.cli("ls", "--json").stdout)
        assert [m["model"] for m in models] == ["done:latest"]
        store = d.state / "store"
        assert os.listdir(store / "tmp") == []
        from llmosd.store.store import Store
        st = Store(str(store))
        _, man, _ = st.get("done")
        assert sorted(os.listdir(store / "blobs")) == sorted(x.replace(":", "-") for x in st.blob_digests(man))
        assert d.cli("generate", "done", "Hi", "--max-tokens", "3").returncode == 0
        assert d.stop() == 0
    finally:
        if p is not None and p.poll() is None:
            p.kill()
            p.wait()
        d.stop()


def test_unload_refused_while_busy_and_forced(tmp_path):
    d = Daemon(tmp_path / "d").start()
    try:
        d.cli("create", "long", *TINY, "--context", "100000", "--vocab-from", str(SHAKESPEARE))
        c = d.client()
        g = c.generate("long", "Once", max_tokens=90000, temperature=0)
        first_token(g)
        r = d.cli("unload", "long", check=False)
        assert r.returncode == errors.EX_TEMPFAIL and "active request" in r.stderr
        assert d.cli("rm", "long", check=False).returncode == errors.EX_TEMPFAIL
        d.cli("unload", "long", "--force")
        with pytest.raises(errors.Cancelled):
            for _ in g:
                pass
        assert json.loads(d.cli("ps", "--json").stdout)["instances"] == []
        d.cli("rm", "long")
        assert json.loads(d.cli("ls", "--json").stdout) == []
    finally:
        assert d.stop() == 0


def test_socket_modes_and_sd_notify(tmp_path):
    import socket as pysocket
    import stat
    ns = tmp_path / "notify.sock"
    rx = pysocket.socket(pysocket.AF_UNIX, pysocket.SOCK_DGRAM)
    rx.bind(str(ns))
    rx.settimeout(60)
    d = Daemon(tmp_path / "d", env={"NOTIFY_SOCKET": str(ns)}).start()
    try:
        assert "READY=1" in rx.recv(4096).decode()
        sock_path = d.sock[len("ipc://"):]
        assert stat.S_IMODE(os.stat(sock_path).st_mode) == 0o660
        assert stat.S_IMODE(os.stat(d.rundir).st_mode) == 0o750
    finally:
        assert d.stop() == 0
    assert "STOPPING=1" in rx.recv(4096).decode()
    rx.close()


def _read_stream(s, rid: int) -> tuple[list[list[int]], dict]:
    """Read request ``rid``'s chunks (checking they come in order, none lost) up to its end."""
    import msgpack
    ids, end = [], None
    while end is None:
        assert s.poll(20000), "the stream stopped without an end"
        m = msgpack.unpackb(s.recv())
        if m.get("id") != rid:
            continue                                   # e.g. the ok to a cancel
        if m["type"] == "chunk":
            assert m["seq"] == len(ids)
            ids.append(m["body"]["token_ids"])
        elif m["type"] == "end":
            end = m["body"]
        else:
            raise AssertionError(m)
    return ids, end


def test_slow_reader_is_held_back_and_does_not_stall_others(tmp_path):
    """A client that stops reading: its generation pauses once ``send_hwm`` messages wait in the
    socket and ``stream_buffer`` more chunks in the daemon, while another client is served; when
    it reads again, nothing is lost.  Counted in engine steps, not seconds: an unpaused generation
    gets a token in every step of the other client's, so it would pass FAST tokens meanwhile."""
    import zmq
    from llmctl import protocol
    fast_tokens = 1500                    # far above 8 + 8 + what the kernel's socket buffer holds
    d = Daemon(tmp_path / "d", env={"LLMOSD_SEND_HWM": "8", "LLMOSD_STREAM_BUFFER": "8"}).start()
    s = zmq.Context.instance().socket(zmq.DEALER)
    try:
        d.cli("create", "long", *TINY, "--context", "100000", "--vocab-from", str(SHAKESPEARE))
        d.cli("load", "long")
        s.setsockopt(zmq.RCVHWM, 1)
        s.setsockopt(zmq.LINGER, 0)
        s.connect(d.sock)
        s.send(protocol.encode(protocol.request(1, "generate", {"model": "long", "prompt": "Slow",
                                                                "max_tokens": 90000, "temperature": 0})))
        with d.client() as c:                          # not reading s; another client is served
            wait_for(lambda: c.ps()[0]["active_requests"] == 1)
            fast = c.generate("long", "Fast", max_tokens=fast_tokens, temperature=0)
            fast.text()
            assert fast.stats["generated_tokens"] == fast_tokens
            s.send(protocol.encode(protocol.request(2, "cancel", {"target": 1})))
            ids, end = _read_stream(s, 1)              # everything that was held, then the end
            held = [t for x in ids for t in x]
            assert end["finish_reason"].startswith("cancelled") and len(held) == end["generated_tokens"]
            assert 0 < len(held) < fast_tokens, "the slow client's generation was not paused"
            ref = c.generate("long", "Slow", max_tokens=len(held), temperature=0)
            ref.text()
            assert [t for ch in ref.chunks for t in ch["token_ids"]] == held
            assert c.ps()[0]["active_requests"] == 0
    finally:
        s.close()
        d.stop()
