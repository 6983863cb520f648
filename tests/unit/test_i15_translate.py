"""Issue 15: the gateway's pure translations (OpenAI and Ollama bodies <-> the protocol), its
error statuses and listen/key checks, and (in process, with a fake Client) its backpressure and
cancel-on-disconnect.  No daemon, no network."""
from __future__ import annotations

import json

import pytest

from llmctl import errors
from llmctl.cli.http import check_exposure, is_loopback, parse_listen, read_keys
from llmctl.http import ollama, openai
from llmctl.http.fields import BadField, Unauthorized, status_of

MSG = [{"role": "user", "content": "Hi"}]

# -- OpenAI requests --------------------------------------------------------------------------
CHAT_OK = [
    ({"model": "m", "messages": MSG}, {"messages": MSG}, None),
    ({"model": "m", "messages": MSG, "temperature": 0, "top_p": 0.5, "max_tokens": 7, "seed": 3, "stop": "x"},
     {"messages": MSG, "temperature": 0.0, "top_p": 0.5, "max_tokens": 7, "seed": 3, "stop": ["x"]}, None),
    ({"model": "m", "messages": MSG, "max_completion_tokens": 5, "n": 1}, {"messages": MSG, "max_tokens": 5}, None),
    ({"model": "m", "messages": MSG, "logprobs": True}, {"messages": MSG, "logprobs": 1}, 0),
    ({"model": "m", "messages": MSG, "logprobs": True, "top_logprobs": 3}, {"messages": MSG, "logprobs": 3}, 3),
    ({"model": "m", "messages": [{"role": "developer", "content": [{"type": "text", "text": "a"},
                                                                    {"type": "text", "text": "b"}]}]},
     {"messages": [{"role": "system", "content": "ab"}]}, None),
    ({"model": "m", "messages": MSG, "presence_penalty": 0.5, "user": "u", "response_format": {"type": "text"}},
     {"messages": MSG}, None),
]


@pytest.mark.parametrize("body,args,top", CHAT_OK)
def test_i15_1_openai_chat_bodies_become_chat_calls(body, args, top):
    call = openai.chat_call(body)
    assert (call.kind, call.model, call.args, call.top_logprobs) == ("chat", "m", args, top)


def test_i15_1_openai_stream_options():
    call = openai.chat_call({"model": "m", "messages": MSG, "stream": True, "stream_options": {"include_usage": True}})
    assert call.stream and call.include_usage
    assert not openai.chat_call({"model": "m", "messages": MSG, "stream_options": {"include_usage": True}}).include_usage


BAD = [
    (openai.chat_call, {"messages": MSG}, "model"),
    (openai.chat_call, {"model": 1, "messages": MSG}, "model"),
    (openai.chat_call, {"model": "m", "messages": "hi"}, "messages"),
    (openai.chat_call, {"model": "m", "messages": []}, "messages"),
    (openai.chat_call, {"model": "m", "messages": [{"role": "wizard", "content": "x"}]}, "messages[0].role"),
    (openai.chat_call, {"model": "m", "messages": [{"role": "user", "content": [{"type": "image_url"}]}]},
     "messages[0].content"),
    (openai.chat_call, {"model": "m", "messages": MSG, "temperature": "hot"}, "temperature"),
    (openai.chat_call, {"model": "m", "messages": MSG, "temperature": 3}, "temperature"),
    (openai.chat_call, {"model": "m", "messages": MSG, "top_p": True}, "top_p"),
    (openai.chat_call, {"model": "m", "messages": MSG, "max_tokens": 0}, "max_tokens"),
    (openai.chat_call, {"model": "m", "messages": MSG, "seed": -1}, "seed"),
    (openai.chat_call, {"model": "m", "messages": MSG, "stop": [1]}, "stop"),
    (openai.chat_call, {"model": "m", "messages": MSG, "stop": ["a"] * 17}, "stop"),
    (openai.chat_call, {"model": "m", "messages": MSG, "n": 2}, "n"),
    (openai.chat_call, {"model": "m", "messages": MSG, "top_logprobs": 2}, "top_logprobs"),
    (openai.chat_call, {"model": "m", "messages": MSG, "logprobs": True, "top_logprobs": 21}, "top_logprobs"),
    (openai.chat_call, {"model": "m", "messages": MSG, "tools": [{"type": "function"}]}, "tools"),
    (openai.chat_call, {"model": "m", "messages": MSG, "response_format": {"type": "json_object"}}, "response_format"),
    (openai.chat_call, {"model": "m", "messages": MSG, "logit_bias": {"1": 5}}, "logit_bias"),
    (openai.chat_call, {"model": "m", "messages": MSG, "stream": "yes"}, "stream"),
    (openai.chat_call, [1, 2], None),
    (openai.completion_call, {"model": "m", "prompt": [1, 2]}, "prompt"),
    (openai.completion_call, {"model": "m", "prompt": ["a", "b"]}, "prompt"),
    (openai.completion_call, {"model": "m", "prompt": "x", "echo": True}, "echo"),
    (openai.completion_call, {"model": "m", "prompt": "x", "best_of": 2}, "best_of"),
    (openai.completion_call, {"model": "m", "prompt": "x", "logprobs": 50}, "logprobs"),
    (openai.embed_call, {"model": "m"}, "input"),
    (openai.embed_call, {"model": "m", "input": [[1, 2]]}, "input"),
    (openai.embed_call, {"model": "m", "input": "x", "encoding_format": "hex"}, "encoding_format"),
    (openai.embed_call, {"model": "m", "input": "x", "dimensions": 8}, "dimensions"),
    (ollama.chat_call, {"messages": MSG}, "model"),
    (ollama.chat_call, {"model": "m", "messages": [{"role": "user", "content": 5}]}, "messages[0].content"),
    (ollama.chat_call, {"model": "m", "messages": MSG, "format": "json"}, "format"),
    (ollama.chat_call, {"model": "m", "messages": [{"role": "user", "content": "x", "images": ["..."]}]},
     "messages[0].images"),
    (ollama.generate_call, {"model": "m", "prompt": "x", "options": {"temperature": "hot"}}, "options.temperature"),
    (ollama.generate_call, {"model": "m", "prompt": "x", "options": {"num_predict": 0}}, "options.num_predict"),
    (ollama.generate_call, {"model": "m", "prompt": "x", "options": "fast"}, "options"),
    (ollama.generate_call, {"model": "m", "prompt": "x", "keep_alive": "soon"}, "keep_alive"),
    (ollama.generate_call, {"model": "m", "prompt": "x", "keep_alive": True}, "keep_alive"),
    (ollama.generate_call, {"model": "m", "prompt": 3}, "prompt"),
    (ollama.generate_call, {"model": "m", "prompt": "x", "suffix": "y"}, "suffix"),
]


@pytest.mark.parametrize("fn,body,param", BAD, ids=[f"{f.__module__.rsplit('.', 1)[1]}.{f.__name__}-{i}"
                                                    for i, (f, _, _) in enumerate(BAD)])
def test_i15_5_bad_bodies_are_400_naming_the_field(fn, body, param):
    with pytest.raises(BadField) as e:
        fn(body)
    assert e.value.param == param and status_of(e.value) == 400 and str(e.value)


def test_i15_1_openai_completion_and_embed_calls():
    call = openai.completion_call({"model": "m", "prompt": ["Once"], "max_tokens": 3, "logprobs": 2})
    assert (call.kind, call.args, call.top_logprobs) == ("generate", {"prompt": "Once", "max_tokens": 3, "logprobs": 2}, 2)
    assert openai.embed_call({"model": "m", "input": "x"}) == openai.EmbedCall("m", ["x"], False)
    assert openai.embed_call({"model": "m", "input": ["x", "y"], "encoding_format": "base64"}).base64


# -- OpenAI responses -------------------------------------------------------------------------
LP = [{"id": 5, "token": "Hi", "logprob": -0.5, "top": [{"id": 5, "token": "Hi", "logprob": -0.5},
                                                        {"id": 6, "token": "Ho", "logprob": -1.5}]}]
STATS = {"finish_reason": "length", "prompt_tokens": 4, "generated_tokens": 2}


def test_i15_1_openai_stream_events_end_with_usage_and_done():
    call = openai.chat_call({"model": "m", "messages": MSG, "stream": True, "logprobs": True, "top_logprobs": 1,
                             "stream_options": {"include_usage": True}})
    s = openai.Streamer(call, "chatcmpl-1", 100)
    first = s.start()
    assert first[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""} and first[0]["usage"] is None
    assert s.chunk({"text": "", "token_ids": [], "loading": "m"}) is None
    ev = s.chunk({"text": "Hi", "token_ids": [5], "logprobs": LP})
    choice = ev["choices"][0]
    assert choice["delta"] == {"content": "Hi"} and choice["finish_reason"] is None
    assert choice["logprobs"]["content"] == [{"token": "Hi", "logprob": -0.5, "bytes": [72, 105],
                                              "top_logprobs": [{"token": "Hi", "logprob": -0.5, "bytes": [72, 105]}]}]
    end = s.end(STATS)
    assert end[0]["choices"][0]["finish_reason"] == "length"
    assert end[1]["choices"] == [] and end[1]["usage"] == {"prompt_tokens": 4, "completion_tokens": 2, "total_tokens": 6}
    assert end[2] == "[DONE]"
    assert openai.sse("[DONE]") == b"data: [DONE]\n\n"
    assert json.loads(openai.sse(end[0])[6:]) == end[0]


def test_i15_1_openai_whole_responses():
    got = openai.Collector()
    for ch in ({"text": "", "loading": "m"}, {"text": "Hi", "logprobs": LP}, {"text": "!", "logprobs": []}):
        got.add(ch)
    chat = openai.chat_response(openai.chat_call({"model": "m", "messages": MSG, "logprobs": True}),
                                "chatcmpl-1", 100, got, {**STATS, "finish_reason": "context"})
    assert chat["choices"][0]["message"] == {"role": "assistant", "content": "Hi!"}
    assert chat["choices"][0]["finish_reason"] == "length" and chat["object"] == "chat.completion"
    assert chat["choices"][0]["logprobs"]["content"][0]["top_logprobs"] == []       # logprobs without top
    comp = openai.completion_response(openai.completion_call({"model": "m", "prompt": "x", "logprobs": 2}),
                                      "cmpl-1", 100, got, {**STATS, "finish_reason": "stop"})
    assert comp["choices"][0]["text"] == "Hi!" and comp["choices"][0]["finish_reason"] == "stop"
    assert comp["choices"][0]["logprobs"] == {"tokens": ["Hi"], "token_logprobs": [-0.5],
                                              "top_logprobs": [{"Hi": -0.5, "Ho": -1.5}], "text_offset": [0]}


def test_i15_1_openai_embeddings_float_and_base64():
    import base64

    import numpy as np
    v = np.array([[1.0, -2.0], [0.5, 0.25]], dtype="<f4")
    plain = openai.embeddings_response(openai.EmbedCall("m", ["a", "b"]), v, 3)
    assert plain["data"][1] == {"object": "embedding", "index": 1, "embedding": [0.5, 0.25]}
    assert plain["usage"] == {"prompt_tokens": 3, "total_tokens": 3}
    b64 = openai.embeddings_response(openai.EmbedCall("m", ["a", "b"], True), v, 3)
    assert np.frombuffer(base64.b64decode(b64["data"][0]["embedding"]), "<f4").tolist() == [1.0, -2.0]
    models = openai.models_response([{"model": "m:latest", "modified": 12.5, "owner_name": "ann"}])
    assert models["data"] == [{"id": "m:latest", "object": "model", "created": 12, "owned_by": "ann"}]


# -- errors -----------------------------------------------------------------------------------
STATUS = [(errors.ModelNotFound("x"), 404), (errors.InvalidArgument("x"), 400), (errors.TooLarge("x"), 413),
          (errors.Busy("x"), 429), (errors.OutOfMemory("x"), 503), (errors.DaemonUnavailable("x"), 503),
          (errors.ShuttingDown("x"), 503), (errors.PermissionDenied("x"), 403), (Unauthorized("x"), 401),
          (errors.Timeout("x"), 504), (errors.Internal("x"), 500), (errors.LoadFailed("x"), 500)]


@pytest.mark.parametrize("err,status", STATUS, ids=[type(e).__name__ for e, _ in STATUS])
def test_i15_5_errors_have_http_statuses(err, status):
    assert status_of(err) == status


def test_i15_5_error_shapes():
    body = openai.error_body(404, "model x is not in the store", code="model_not_found", hint="llmctl ls")
    assert body["error"]["type"] == "invalid_request_error" and body["error"]["code"] == "model_not_found"
    assert openai.error_body(429, "busy")["error"]["type"] == "rate_limit_error"
    assert openai.error_body(401, "no key")["error"]["type"] == "authentication_error"
    assert openai.error_body(503, "down")["error"]["type"] == "server_error"
    assert ollama.error_body("model x not found") == {"error": "model x not found"}


# -- Ollama -----------------------------------------------------------------------------------
KEEP = [(None, None), (300, 300.0), (0, 0.0), ("5m", 300.0), ("1h30m", 5400.0), ("300ms", 0.3), ("90", 90.0),
        ("-1", -1.0), (-5, -1.0), ("-1m", -1.0), ("0s", 0.0), (1e12, float(ollama.MAX_KEEP_ALIVE))]


@pytest.mark.parametrize("given,secs", KEEP)
def test_i15_2_keep_alive_goes_to_the_daemon_in_seconds(given, secs):
    assert ollama.keep_alive(given) == secs


def test_i15_2_ollama_options():
    opts = ollama.options({"keep_alive": "10m", "options": {
        "temperature": 0, "top_k": 5, "top_p": 0.9, "min_p": 0.1, "repeat_penalty": 1.1, "seed": 7, "stop": ["\n"],
        "num_predict": 12, "num_ctx": 4096, "num_thread": 2}})
    assert opts == {"temperature": 0.0, "top_k": 5, "top_p": 0.9, "min_p": 0.1, "repetition_penalty": 1.1,
                    "seed": 7, "stop": ["\n"], "max_tokens": 12, "keep_alive": 600.0}
    assert ollama.options({"options": {"num_predict": -1, "seed": -1}}) == {}


def test_i15_2_ollama_generate_and_chat_calls():
    assert ollama.generate_call({"model": "m"}) == ollama.Call("load", "m", {}, True)
    assert ollama.generate_call({"model": "m", "keep_alive": 0}).kind == "unload"
    assert ollama.chat_call({"model": "m", "messages": [], "keep_alive": "1h"}) == \
        ollama.Call("load", "m", {"keep_alive": 3600.0}, True, True)
    raw = ollama.generate_call({"model": "m", "prompt": "x", "raw": True, "stream": False})
    assert raw == ollama.Call("generate", "m", {"prompt": "x"}, False)
    p = ollama.generate_call({"model": "m", "prompt": "x", "system": "be brief", "options": {"num_predict": 3}})
    assert p.kind == "prompt"
    assert ollama.resolve(p, True) == ollama.Call("chat", "m", {"messages": [
        {"role": "system", "content": "be brief"}, {"role": "user", "content": "x"}], "max_tokens": 3}, True)
    assert ollama.resolve(p, False) == ollama.Call("generate", "m", {"prompt": "be brief\n\nx", "max_tokens": 3}, True)
    chat = ollama.chat_call({"name": "m", "messages": MSG, "stream": False})
    assert chat == ollama.Call("chat", "m", {"messages": MSG}, False, True)
    assert ollama.embed_inputs({"model": "m", "input": "x", "keep_alive": "1m"}) == ("m", ["x"], 60.0)
    assert ollama.embed_inputs({"model": "m", "prompt": "x"}, legacy=True) == ("m", ["x"], None)


def test_i15_2_ollama_lines_and_listings():
    chat = ollama.chat_call({"model": "m", "messages": MSG})
    gen = ollama.generate_call({"model": "m", "prompt": "x", "raw": True})
    assert ollama.piece(chat, "Hi", "T") == {"model": "m", "created_at": "T",
                                            "message": {"role": "assistant", "content": "Hi"}, "done": False}
    assert ollama.piece(gen, "Hi", "T") == {"model": "m", "created_at": "T", "response": "Hi", "done": False}
    end = ollama.final(gen, "", {"finish_reason": "length", "total_ms": 30, "ttft_ms": 10, "load_ms": 5,
                                 "prompt_tokens": 4, "generated_tokens": 2}, "T")
    assert end["done"] and end["done_reason"] == "length" and end["eval_count"] == 2
    assert (end["total_duration"], end["prompt_eval_duration"], end["eval_duration"], end["load_duration"]) == \
        (30_000_000, 10_000_000, 20_000_000, 5_000_000)
    assert ollama.iso(0) == "1970-01-01T00:00:00.000000Z"
    row = {"model": "m:latest", "digest": "sha256:ab", "size": 10, "parameters": 134_515_008, "architecture": "llama",
           "modified": 0}
    tag = ollama.tags([row])["models"][0]
    assert (tag["name"], tag["digest"], tag["details"]["parameter_size"], tag["details"]["family"]) == \
        ("m:latest", "ab", "135M", "llama")
    inst = [{"model": "m:latest", "digest": "sha256:ab", "state": "ready", "device": "cuda:0", "tier": "device",
             "resident_bytes": 99, "expires_at": 0.5},
            {"model": "m:latest", "state": "failed"}]
    ps = ollama.ps(inst, [row])["models"]
    assert len(ps) == 1 and ps[0]["size_vram"] == 99 and ps[0]["expires_at"].startswith("1970-01-01T00:00:00.5")
    shown = ollama.show({"model": "m:latest", "manifest": {"architecture": "llama", "parameters": 5,
                                                           "chat_template": "{{x}}", "defaults": {"temperature": 0.2}},
                         "config": {"dim": 64}}, row)
    assert shown["template"] == "{{x}}" and shown["parameters"] == "temperature 0.2"
    assert shown["model_info"]["llama.dim"] == 64 and shown["details"]["parameter_size"] == "5"


# -- listen and keys ----------------------------------------------------------------------------
@pytest.mark.parametrize("text,want", [("127.0.0.1:11435", ("127.0.0.1", 11435)), ("[::1]:80", ("::1", 80)),
                                       ("0.0.0.0:0", ("0.0.0.0", 0)), ("localhost:1", ("localhost", 1))])
def test_i15_listen_addresses(text, want):
    assert parse_listen(text) == want


@pytest.mark.parametrize("text", ["11435", "host:", ":80", "a:99999", "a:b"])
def test_i15_bad_listen_addresses_are_config_errors(text):
    with pytest.raises(errors.ConfigError):
        parse_listen(text)


def test_i15_non_loopback_needs_keys(tmp_path):
    assert is_loopback("127.0.0.2") and is_loopback("::1") and is_loopback("localhost")
    assert not is_loopback("0.0.0.0") and not is_loopback("::") and not is_loopback("example.org")
    check_exposure("127.0.0.1", None)
    check_exposure("0.0.0.0", ["k"])
    with pytest.raises(errors.ConfigError) as e:
        check_exposure("0.0.0.0", None)
    assert e.value.exit_status == 78 and "--api-key-file" in e.value.hint
    f = tmp_path / "keys"
    f.write_text("# comment\n\n  one  \ntwo\n")
    f.chmod(0o600)
    assert read_keys(str(f)) == ["one", "two"]
    f.chmod(0o644)
    with pytest.raises(errors.ConfigError, match="readable by every user"):
        read_keys(str(f))
    f.write_text("# only a comment\n")
    f.chmod(0o600)
    with pytest.raises(errors.ConfigError, match="holds no key"):
        read_keys(str(f))
    with pytest.raises(errors.ConfigError, match="cannot read"):
        read_keys(str(tmp_path / "absent"))


# -- the ASGI app with a fake Client: backpressure and cancel on disconnect --------------------
class FakeGen:
    """A generation of ``n`` one-token chunks, all ready at once, that counts what was read
    from it; it is its own ``bridge`` source (get, fds, cancel, done, stats)."""

    def __init__(self, n: int):
        self.n, self.reads, self.cancelled = n, 0, False
        self.stats, self.done = None, False

    def get(self, timeout: float):
        from llmctl.http.bridge import END
        if self.reads >= self.n:
            self.done, self.stats = True, {"finish_reason": "length", "prompt_tokens": 1, "generated_tokens": self.n}
            return END
        self.reads += 1
        return {"text": "x", "token_ids": [1]}

    def fds(self):
        return []

    def cancel(self, wait: float) -> bool:
        self.cancelled = self.done = True
        return True


class FakeClient:
    def __init__(self, gen):
        self.gen = gen

    def chat(self, model, **kw):
        if model == "missing":
            raise errors.ModelNotFound("model missing is not in the store")
        return self.gen

    def close(self):
        pass


def _run_app(gen, body: dict, path="/v1/chat/completions", stall_after: int = 3, keys=None, headers=()):
    """Drive the app in process: the HTTP reader takes ``stall_after`` body messages and then
    stops reading; after a while it disconnects.  Returns (sent messages, reads seen at the stall)."""
    anyio = pytest.importorskip("anyio")
    pytest.importorskip("starlette", reason="the http extra: pip install 'llmosd[http]'")
    from llmctl.http.app import Gateway
    from llmctl.http.bridge import Pool

    pool = Pool("ipc:///nonexistent")
    pool.take = lambda: FakeClient(gen)
    pool.source = lambda client, g: g
    app = Gateway(pool, keys).app()
    scope = {"type": "http", "asgi": {"version": "3.0", "spec_version": "2.3"}, "http_version": "1.1",
             "method": "POST", "scheme": "http", "path": path, "raw_path": path.encode(), "query_string": b"",
             "root_path": "", "headers": [(b"content-type", b"application/json"), *headers],
             "client": ("127.0.0.1", 1), "server": ("127.0.0.1", 2)}
    sent, seen = [], []

    async def main():
        gone = anyio.Event()
        stalled = anyio.Event()
        requested = [False]

        async def receive():
            if not requested[0]:
                requested[0] = True
                return {"type": "http.request", "body": json.dumps(body).encode(), "more_body": False}
            await gone.wait()
            return {"type": "http.disconnect"}

        async def send(msg):
            sent.append(msg)
            if msg["type"] == "http.response.body" and not msg.get("more_body"):
                stalled.set()                        # the whole answer was sent
            if msg["type"] == "http.response.body" and msg.get("more_body") and \
                    sum(m["type"] == "http.response.body" for m in sent) >= stall_after:
                stalled.set()
                await anyio.sleep_forever()          # a reader that stopped reading

        async with anyio.create_task_group() as tg:
            tg.start_soon(app, scope, receive, send)
            with anyio.move_on_after(5):
                await stalled.wait()
            await anyio.sleep(0.3 if stall_after < 99 else 0)    # time to read ahead, if it would
            seen.append(gen.reads)
            gone.set()
    anyio.run(main)
    return sent, seen[0]


def test_i15_4_a_stalled_reader_holds_the_stream_back_and_its_disconnect_cancels():
    gen = FakeGen(10_000)
    sent, reads = _run_app(gen, {"model": "m", "messages": MSG, "stream": True})
    assert sent[0]["status"] == 200
    from llmctl.http.bridge import WINDOW
    assert reads <= 3 * WINDOW             # the three sends made (a window of waiting chunks each, the
    #                                        role event riding with the first); none while it stalls
    assert gen.cancelled                   # the disconnect cancelled the generation


def test_i15_5_app_errors_before_the_stream_are_statuses():
    sent, _ = _run_app(FakeGen(1), {"model": "missing", "messages": MSG, "stream": True}, stall_after=99)
    assert sent[0]["status"] == 404
    assert json.loads(sent[1]["body"])["error"]["code"] == "model_not_found"
    sent, _ = _run_app(FakeGen(1), {"model": "m", "messages": MSG}, keys=["k"], stall_after=99)
    assert sent[0]["status"] == 401 and (b"www-authenticate", b"Bearer") in sent[0]["headers"]
    sent, _ = _run_app(FakeGen(2), {"model": "m", "messages": MSG}, keys=["k"], stall_after=99,
                       headers=[(b"authorization", b"Bearer k")])
    assert sent[0]["status"] == 200 and json.loads(sent[1]["body"])["choices"][0]["message"]["content"] == "xx"
    sent, _ = _run_app(FakeGen(2), {"model": "m", "prompt": "x"}, path="/api/nothing", stall_after=99)
    assert sent[0]["status"] == 404 and "error" in json.loads(sent[1]["body"])


@pytest.mark.parametrize("weights,level", [("q4_1+q8_0", "Q4_1"), ("q8_0", "Q8_0"), ("int8", "Q8_0"),
                                           ("int4", "Q4_1"), ("float32", "F32"), ("bfloat16", "BF16"),
                                           (None, "")])
def test_i15_ollama_quantization_level_names_the_weights(weights, level):
    from llmctl.http import ollama
    assert ollama.details({"weights": weights})["quantization_level"] == level
