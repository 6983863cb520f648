"""Issue 14 (metrics): a real daemon's Prometheus text over the socket (and its HTTP port)."""
from __future__ import annotations

import socket
import urllib.request

from prometheus_client.parser import text_string_to_metric_families

from conftest import SHAKESPEARE, TINY, Daemon


def samples(text: str) -> dict:
    """{(name, frozenset(labels.items())): value}; raises if the text does not parse."""
    out = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out[(s.name, frozenset(s.labels.items()))] = s.value
    return out


def get(found: dict, name: str, **labels):
    return found.get((name, frozenset(labels.items())))


def test_i14_metrics_after_a_generate(daemon):
    daemon.cli("create", "tiny", *TINY, "--vocab-from", str(SHAKESPEARE))
    daemon.cli("generate", "tiny", "ROMEO:", "--max-tokens", "5", "--seed", "1")
    r = daemon.cli("metrics")
    assert r.returncode == 0, r.stderr
    found = samples(r.stdout)
    assert get(found, "llmosd_requests_total", type="generate", result="ok") == 1
    assert get(found, "llmosd_requests_total", type="create", result="ok") == 1
    assert get(found, "llmosd_generated_tokens_total") >= 1
    assert get(found, "llmosd_prompt_tokens_total") >= 1
    assert get(found, "llmosd_time_to_first_token_seconds_count") == 1
    assert get(found, "llmosd_device_memory_bytes", device="cpu", kind="budget") > 0
    assert get(found, "llmosd_device_memory_bytes", device="cpu", kind="instances") > 0
    assert get(found, "llmosd_instances_loaded") == 1
    assert get(found, "llmosd_queued_requests") == 0 and get(found, "llmosd_queued_jobs") == 0
    assert get(found, "llmosd_uptime_seconds") > 0
    inst = [k for k in found if k[0] == "llmosd_instance_resident_bytes"]
    assert [dict(k[1])["model"] for k in inst] == ["tiny:latest"]
    # a refusal is counted by its error name; the metrics request itself too
    assert daemon.cli("generate", "nope", "x", check=False).returncode == 66
    with daemon.client() as c:
        found = samples(c.metrics())
    assert get(found, "llmosd_requests_total", type="generate", result="model_not_found") == 1
    assert get(found, "llmosd_requests_total", type="metrics", result="ok") == 1


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_i14_metrics_http_port(tmp_path):
    port = _free_port()
    d = Daemon(tmp_path / "d", env={"LLMOSD_METRICS_PORT": str(port)})
    try:
        d.start()
        with d.client() as c:
            c.ping()
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=20) as r:
            found = samples(r.read().decode())
        assert get(found, "llmosd_requests_total", type="ping", result="ok") >= 1   # start-up pings too
    finally:
        d.stop()
