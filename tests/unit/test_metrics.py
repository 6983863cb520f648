"""Issue 14 (metrics): the registry fed by fake events and a fake daemon state; the text parses."""
from __future__ import annotations

import types
import urllib.request

from prometheus_client.parser import text_string_to_metric_families

from llmosd.metrics import JOB_KEEP_S, Metrics, request_type, result_label


def samples(text: str) -> dict:
    """{(name, frozenset(labels.items())): value} of every sample in ``text``."""
    out = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out[(s.name, frozenset(s.labels.items()))] = s.value
    return out


def value(text: str, name: str, **labels) -> float | None:
    return samples(text).get((name, frozenset(labels.items())))


def state(now: float) -> dict:
    inst = {"id": 3, "model": "tiny:latest", "state": "ready", "resident_bytes": 1000,
            "active_requests": 1, "queued_requests": 2}
    dev = {"device": "cpu", "budget": 10_000, "instances": 1000, "jobs": 500, "reserved": 100,
           "free": 8400, "host_budget": 4000, "host_used": 0}
    jobs = [{"job_id": 1, "kind": "train", "model": "a:latest", "state": "running", "step": 7,
             "loss": 2.5, "val_loss": None, "finished": None},
            {"job_id": 2, "kind": "train", "model": "b:latest", "state": "queued", "step": None,
             "loss": None, "val_loss": None, "finished": None},
            {"job_id": 3, "kind": "finetune", "model": "c:latest", "state": "succeeded", "step": 9,
             "loss": 1.0, "val_loss": 1.5, "finished": now - 60},
            {"job_id": 4, "kind": "train", "model": "old:latest", "state": "failed", "step": 1,
             "loss": 9.0, "val_loss": None, "finished": now - JOB_KEEP_S - 1}]
    return {"instances": [inst], "devices": [dev], "jobs": jobs}


def test_i14_metrics_requests_tokens_and_histograms_move():
    m = Metrics(clock=lambda: 1000.0)
    m.reply("generate", "ok", {"prompt_tokens": 5, "generated_tokens": 8, "ttft_ms": 30.0,
                               "tokens_per_s": 50.0})
    m.reply("generate", "busy")
    m.reply("ping", "ok", {"time": 1.0})
    m.reply("nope", "bad_request")              # unknown types and results stay bounded
    m.reply(None, "made-up error name")
    m.reply("chat", "disconnected")
    t = m.render()
    assert value(t, "llmosd_requests_total", type="generate", result="ok") == 1
    assert value(t, "llmosd_requests_total", type="generate", result="busy") == 1
    assert value(t, "llmosd_requests_total", type="ping", result="ok") == 1
    assert value(t, "llmosd_requests_total", type="invalid", result="bad_request") == 1
    assert value(t, "llmosd_requests_total", type="invalid", result="other") == 1
    assert value(t, "llmosd_requests_total", type="chat", result="disconnected") == 1
    assert value(t, "llmosd_prompt_tokens_total") == 5
    assert value(t, "llmosd_generated_tokens_total") == 8
    assert value(t, "llmosd_time_to_first_token_seconds_count") == 1
    assert value(t, "llmosd_time_to_first_token_seconds_sum") == 0.03
    assert value(t, "llmosd_time_to_first_token_seconds_bucket", le="0.025") == 0
    assert value(t, "llmosd_time_to_first_token_seconds_bucket", le="0.05") == 1
    assert value(t, "llmosd_time_per_output_token_seconds_count") == 1
    assert abs(value(t, "llmosd_time_per_output_token_seconds_sum") - 0.02) < 1e-9
    assert "_created" not in t


def test_i14_metrics_missing_stats_are_not_observed():
    m = Metrics()
    m.reply("generate", "ok", {"prompt_tokens": 2, "generated_tokens": 1, "ttft_ms": None,
                               "tokens_per_s": None})
    m.reply("score", "ok", {"prompt_tokens": 100})       # not a generation: no tokens counted
    t = m.render()
    assert value(t, "llmosd_time_to_first_token_seconds_count") == 0
    assert value(t, "llmosd_time_per_output_token_seconds_count") == 0
    assert value(t, "llmosd_prompt_tokens_total") == 2


def test_i14_metrics_labels_are_bounded():
    assert request_type("generate") == "generate"
    assert request_type("x" * 1000) == "invalid" and request_type(3) == "invalid"
    assert result_label("model_not_found") == "model_not_found" and result_label("free text") == "other"


def test_i14_metrics_gauges_from_the_daemon_state():
    now = 50_000.0
    m = Metrics(clock=lambda: now)
    m.bind(lambda: state(now))
    t = m.render()
    assert value(t, "llmosd_uptime_seconds") == 0
    assert value(t, "llmosd_instances_loaded") == 1
    assert value(t, "llmosd_instances", state="ready") == 1
    assert value(t, "llmosd_active_requests") == 1
    assert value(t, "llmosd_queued_requests") == 2
    assert value(t, "llmosd_instance_resident_bytes", instance="3", model="tiny:latest") == 1000
    for kind, n in (("budget", 10_000), ("instances", 1000), ("jobs", 500), ("reserved", 100),
                    ("free", 8400)):
        assert value(t, "llmosd_device_memory_bytes", device="cpu", kind=kind) == n
    assert value(t, "llmosd_host_tier_bytes", kind="budget") == 4000
    assert value(t, "llmosd_queued_jobs") == 1
    assert value(t, "llmosd_jobs", state="running") == 1
    assert value(t, "llmosd_job_step", job="1", kind="train", model="a:latest") == 7
    assert value(t, "llmosd_job_loss", job="1", kind="train", model="a:latest") == 2.5
    assert value(t, "llmosd_job_val_loss", job="3", kind="finetune", model="c:latest") == 1.5
    assert "old:latest" not in t            # finished more than an hour ago: its series are gone
    assert ("llmosd_job_step", frozenset({"job": "2", "kind": "train", "model": "b:latest"}.items())) \
        not in samples(t)                   # no step reported yet: no sample
    assert value(t, "process_resident_memory_bytes") > 0


def test_i14_metrics_a_failing_state_does_not_break_the_text():
    m = Metrics()
    m.bind(lambda: 1 / 0)
    m.reply("ping", "ok")
    t = m.render()
    assert value(t, "llmosd_requests_total", type="ping", result="ok") == 1
    assert value(t, "llmosd_uptime_seconds") is not None


def test_i14_metrics_http_serves_the_same_text_through_the_loop():
    m = Metrics()
    m.reply("ping", "ok")
    posted = []

    def post(fn, *args):               # the loop: here, at once, but counted
        posted.append(fn)
        fn(*args)
    port = m.serve_http(0, post)
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
            assert r.status == 200 and r.headers["Content-Type"].startswith("text/plain")
            t = r.read().decode()
        assert value(t, "llmosd_requests_total", type="ping", result="ok") == 1
        assert posted, "the text must be made on the loop"
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/other", timeout=10)
            raise AssertionError("expected 404")
        except urllib.error.HTTPError as e:
            assert e.code == 404
    finally:
        m.stop_http()


def test_i14_metrics_http_answers_503_when_the_loop_is_stuck():
    m = Metrics()
    port = m.serve_http(0, lambda fn, *a: None, timeout=0.2)    # the loop never runs it
    try:
        urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10)
        raise AssertionError("expected 503")
    except urllib.error.HTTPError as e:
        assert e.code == 503
    finally:
        m.stop_http()


def test_i14_metrics_server_counts_replies_streams_and_refusals():
    """The server's hooks: ok replies, stream ends with statistics, refusals before any
    handler, and streams of a client that went away."""
    from llmosd.server import Ctx, Peer, Server, Stream
    sent = []
    server = types.SimpleNamespace(metrics=Metrics(), send=lambda peer, msg, *a: sent.append(msg),
                                   forget_if_idle=lambda p: None)
    server.count = lambda *a: Server.count(server, *a)
    peer = Peer(b"x", None)
    ctx = Ctx(server, peer, {"id": 1, "type": "ping", "body": {}})
    peer.open_ids.add(1)
    ctx.ok({"time": 0})
    gen = Ctx(server, peer, {"id": 2, "type": "generate", "body": {}})
    s = gen.stream(lambda reason: None)
    assert isinstance(s, Stream)
    s.chunk({"text": "a"})
    s.end({"prompt_tokens": 3, "generated_tokens": 2, "ttft_ms": 5.0, "tokens_per_s": 100.0})
    t = server.metrics.render()
    assert value(t, "llmosd_requests_total", type="ping", result="ok") == 1
    assert value(t, "llmosd_requests_total", type="generate", result="ok") == 1
    assert value(t, "llmosd_generated_tokens_total") == 2


def test_i14_metrics_ops_renders_over_the_socket(tmp_path):
    """``op_metrics``: {"text": ...} with the table, devices and jobs gauges of the daemon."""
    from llmosd.ops import Ops
    from llmosd.store.store import Store
    from llmosd.store.uploads import Uploads
    from llmosd.table import ModelTable

    store = Store(tmp_path / "store")
    cfg = types.SimpleNamespace(max_uploads=64, max_uploads_per_client=8, default_max_tokens=64)
    memory = types.SimpleNamespace(usage_rows=lambda by: [state(0)["devices"][0]])
    manager = types.SimpleNamespace(table=ModelTable(), tasks={}, memory=memory, holders=lambda: [])
    jobs = types.SimpleNamespace(jobs={})
    ops = Ops(cfg, store, manager, jobs, Uploads(store, post=lambda fn, *a: fn(*a)))
    out = {}
    server = types.SimpleNamespace(metrics=Metrics(), post=lambda fn, *a: fn(*a))
    ctx = types.SimpleNamespace(server=server, ok=lambda body: out.update(body))
    ops.op_metrics(ctx)
    t = out["text"]
    assert value(t, "llmosd_instances_loaded") == 0
    assert value(t, "llmosd_device_memory_bytes", device="cpu", kind="budget") == 10_000
    assert value(t, "llmosd_queued_jobs") == 0


def test_i14_metrics_port_from_the_config_serves_http(tmp_path):
    """``metrics_port`` in the config: ``Ops.attach`` serves the registry on 127.0.0.1."""
    import socket
    from llmosd.ops import Ops
    from llmosd.store.store import Store
    from llmosd.store.uploads import Uploads
    from llmosd.table import ModelTable

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    store = Store(tmp_path / "store")
    cfg = types.SimpleNamespace(max_uploads=64, max_uploads_per_client=8, default_max_tokens=64,
                                metrics_port=port)
    manager = types.SimpleNamespace(table=ModelTable(), tasks={})
    ops = Ops(cfg, store, manager, types.SimpleNamespace(jobs={}),
              Uploads(store, post=lambda fn, *a: fn(*a)))
    server = types.SimpleNamespace(metrics=Metrics(), post=lambda fn, *a: fn(*a))
    server.metrics.reply("ping", "ok")
    ops.attach(server)
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
            t = r.read().decode()
        assert value(t, "llmosd_requests_total", type="ping", result="ok") == 1
    finally:
        server.metrics.stop_http()
