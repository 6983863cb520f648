"""OpenAI's API <-> the daemon's protocol: request bodies to calls, replies to response bodies
(pure; no I/O, no clock, no randomness: ids and times are passed in).

Served: ``/v1/chat/completions``, ``/v1/completions``, ``/v1/embeddings``, ``/v1/models``.
Honoured: temperature, top_p, max_tokens (or max_completion_tokens), stop, seed, n=1,
logprobs/top_logprobs, stream with stream_options.include_usage.  Accepted and ignored:
presence/frequency_penalty, user, metadata, store, parallel_tool_calls, service_tier.
Refused with 400 (rather than silently wrong): n > 1, tools, logit_bias, response_format other
than text, echo, suffix, best_of > 1, token-array prompts or inputs, images and audio.
"""
from __future__ import annotations

import base64
import json
from dataclasses import dataclass, field

import numpy as np

from .fields import BadField, clean, get, strings

FINISH = {"stop": "stop", "length": "length", "context": "length", "cancelled": "stop"}
ROLES = ("system", "developer", "user", "assistant", "tool")
MAX_STOP = 16              # the protocol's bound (OpenAI's is 4)
MAX_INPUTS = 2048          # OpenAI's bound on embedding inputs per request


@dataclass(frozen=True)
class Call:
    """One generation asked of the daemon: ``kind`` is the Client method ("chat" or
    "generate"), ``args`` its keyword arguments besides the model (messages or prompt and the
    sampling settings).  ``top_logprobs`` is None without logprobs, else how many alternatives
    each token reports (the daemon is asked for at least 1: its 0 means none)."""
    kind: str
    model: str
    args: dict
    stream: bool = False
    include_usage: bool = False
    top_logprobs: int | None = None


@dataclass(frozen=True)
class EmbedCall:
    model: str
    inputs: list
    base64: bool = False


# -- requests -------------------------------------------------------------------------------
def chat_call(body) -> Call:
    """A /v1/chat/completions body as a daemon ``chat`` call; BadField for what is wrong."""
    _object(body)
    model = get(body, "model", "str", required=True, max_len=512)
    raw = get(body, "messages", "list", required=True)
    if not raw:
        raise BadField("messages", "'messages' must hold at least one message")
    messages = [_message(m, i) for i, m in enumerate(raw)]
    top = get(body, "top_logprobs", "int", lo=0, hi=20)
    wants = get(body, "logprobs", "bool")
    if top is not None and not wants:
        raise BadField("top_logprobs", "'top_logprobs' needs 'logprobs': true")
    if body.get("tools") or body.get("functions"):
        raise BadField("tools", "tools and function calling are not supported by llmosd")
    fmt = get(body, "response_format", "dict")
    if fmt is not None and fmt.get("type", "text") != "text":
        raise BadField("response_format", f"response_format {fmt.get('type')!r} is not supported; only text is")
    max_tokens = get(body, "max_completion_tokens", "int", lo=1, hi=1_000_000)
    opts = _sampling(body, max_tokens)
    k = (top or 0) if wants else None
    stream, usage = _stream(body)
    return Call("chat", model, {"messages": messages, **opts, **_lp_arg(k)}, stream, usage, k)


def completion_call(body) -> Call:
    """A /v1/completions body as a daemon ``generate`` call."""
    _object(body)
    model = get(body, "model", "str", required=True, max_len=512)
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]
    if not isinstance(prompt, str):
        raise BadField("prompt", "'prompt' must be a string (one prompt per request; token arrays "
                                 "are not supported)")
    if get(body, "echo", "bool"):
        raise BadField("echo", "'echo' is not supported")
    if get(body, "suffix", "str"):
        raise BadField("suffix", "'suffix' (fill in the middle) is not supported")
    if (get(body, "best_of", "int", lo=1) or 1) != 1:
        raise BadField("best_of", "only best_of=1 is supported")
    k = get(body, "logprobs", "int", lo=0, hi=20)
    opts = _sampling(body, None)
    stream, usage = _stream(body)
    return Call("generate", model, {"prompt": prompt, **opts, **_lp_arg(k)}, stream, usage, k)


def embed_call(body) -> EmbedCall:
    """A /v1/embeddings body: the inputs as strings, and whether the client wants base64."""
    _object(body)
    model = get(body, "model", "str", required=True, max_len=512)
    if "input" not in body or body["input"] is None:
        raise BadField("input", "'input' is required")
    inputs = strings(body["input"], "input", MAX_INPUTS)
    if not inputs:
        raise BadField("input", "'input' must hold at least one string")
    enc = get(body, "encoding_format", "str", choices=("float", "base64")) or "float"
    if body.get("dimensions") is not None:
        raise BadField("dimensions", "'dimensions' is not supported: the vectors have the model's width")
    return EmbedCall(model, inputs, enc == "base64")


def _object(body) -> None:
    if not isinstance(body, dict):
        raise BadField(None, "the request body must be a JSON object")


def _message(m, i: int) -> dict:
    where = f"messages[{i}]"
    if not isinstance(m, dict):
        raise BadField(where, f"'{where}' must be an object with 'role' and 'content'")
    role = get(m, "role", "str", required=True, choices=ROLES, where=where + ".")
    if m.get("tool_calls"):
        raise BadField(where + ".tool_calls", "tool calls are not supported by llmosd")
    return {"role": "system" if role == "developer" else role, "content": _content(m.get("content"), where)}


def _content(c, where: str) -> str:
    """A message's content: a string, or text parts joined (other part types are refused)."""
    if c is None:
        return ""
    if isinstance(c, str):
        return c
    if isinstance(c, list):
        out = []
        for part in c:
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                kind = part.get("type") if isinstance(part, dict) else type(part).__name__
                raise BadField(where + ".content", f"only text content parts are supported, not {kind!r}")
            out.append(part["text"])
        return "".join(out)
    raise BadField(where + ".content", f"'{where}.content' must be a string or an array of text parts")


def _sampling(body: dict, max_tokens: int | None) -> dict:
    n = get(body, "n", "int", lo=1, hi=128)
    if n not in (None, 1):
        raise BadField("n", "only n=1 is supported", hint="send n separate requests (with different seeds)")
    if body.get("logit_bias"):
        raise BadField("logit_bias", "'logit_bias' is not supported")
    for k in ("presence_penalty", "frequency_penalty"):
        get(body, k, "float", lo=-2, hi=2)             # checked, then ignored
    stop = body.get("stop")
    return clean({
        "temperature": get(body, "temperature", "float", lo=0, hi=2),
        "top_p": get(body, "top_p", "float", lo=0, hi=1),
        "max_tokens": get(body, "max_tokens", "int", lo=1, hi=1_000_000) or max_tokens,
        "seed": get(body, "seed", "int", lo=0, hi=2 ** 64 - 1),
        "stop": strings(stop, "stop", MAX_STOP) or None if stop is not None else None,
    })


def _lp_arg(k: int | None) -> dict:
    return {} if k is None else {"logprobs": max(k, 1)}


def _stream(body: dict) -> tuple[bool, bool]:
    stream = bool(get(body, "stream", "bool"))
    so = get(body, "stream_options", "dict") or {}
    usage = bool(get(so, "include_usage", "bool", where="stream_options."))
    return stream, stream and usage


# -- responses --------------------------------------------------------------------------------
def usage(stats: dict | None) -> dict:
    p, c = (stats or {}).get("prompt_tokens", 0), (stats or {}).get("generated_tokens", 0)
    return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}


def finish_reason(stats: dict | None) -> str:
    return FINISH.get((stats or {}).get("finish_reason"), "stop")


def chat_logprob(entry: dict, k: int) -> dict:
    """A daemon logprob entry {id, token, logprob, top} as OpenAI's chat token logprob."""
    def one(e):
        return {"token": e["token"], "logprob": e["logprob"], "bytes": list(e["token"].encode("utf-8"))}
    return {**one(entry), "top_logprobs": [one(t) for t in entry.get("top", [])[:k]]}


class Collector:
    """The text and logprob entries of a whole generation, for the non-streamed replies."""

    def __init__(self):
        self.pieces: list[str] = []
        self.lps: list[dict] = []

    def add(self, chunk: dict) -> None:
        self.pieces.append(chunk.get("text", ""))
        self.lps.extend(chunk.get("logprobs") or [])

    @property
    def text(self) -> str:
        return "".join(self.pieces)


def chat_response(call: Call, cid: str, created: int, got: Collector, stats: dict) -> dict:
    lp = None if call.top_logprobs is None else {"content": [chat_logprob(e, call.top_logprobs) for e in got.lps]}
    return {"id": cid, "object": "chat.completion", "created": created, "model": call.model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": got.text},
                         "logprobs": lp, "finish_reason": finish_reason(stats)}],
            "usage": usage(stats), "system_fingerprint": None}


def completion_logprobs(entries: list[dict], k: int, offset: int = 0) -> dict:
    """Legacy completions' logprobs: tokens, token_logprobs, top_logprobs ({token: logprob}),
    text_offset (each token's offset in the generated text, from ``offset``)."""
    offsets, at = [], offset
    for e in entries:
        offsets.append(at)
        at += len(e["token"])
    return {"tokens": [e["token"] for e in entries], "token_logprobs": [e["logprob"] for e in entries],
            "top_logprobs": [{t["token"]: t["logprob"] for t in e.get("top", [])[:k]} for e in entries],
            "text_offset": offsets}


def completion_response(call: Call, cid: str, created: int, got: Collector, stats: dict) -> dict:
    lp = None if call.top_logprobs is None else completion_logprobs(got.lps, call.top_logprobs)
    return {"id": cid, "object": "text_completion", "created": created, "model": call.model,
            "choices": [{"index": 0, "text": got.text, "logprobs": lp, "finish_reason": finish_reason(stats)}],
            "usage": usage(stats), "system_fingerprint": None}


@dataclass
class Streamer:
    """The SSE events of one streamed completion: ``start()`` once, ``chunk(body)`` per
    daemon chunk (None for chunks with nothing to say, like the loading notice), ``end(stats)``
    last (the finish, the usage when asked for, ``[DONE]``).  Each event is the JSON object of
    one ``data:`` line, or the string "[DONE]"."""
    call: Call
    cid: str
    created: int
    chat: bool = True
    _offset: int = field(default=0)

    def _base(self, choices: list) -> dict:
        obj = "chat.completion.chunk" if self.chat else "text_completion"
        out = {"id": self.cid, "object": obj, "created": self.created, "model": self.call.model,
               "choices": choices, "system_fingerprint": None}
        if self.call.include_usage:
            out["usage"] = None
        return out

    def _choice(self, text: str | None, lps: list | None, finish: str | None, role: bool = False) -> dict:
        k = self.call.top_logprobs
        if self.chat:
            delta = ({"role": "assistant", "content": ""} if role else
                     {} if text is None else {"content": text})
            lp = None if k is None or lps is None else {"content": [chat_logprob(e, k) for e in lps]}
            return {"index": 0, "delta": delta, "logprobs": lp, "finish_reason": finish}
        lp = None if k is None or lps is None else completion_logprobs(lps, k, self._offset)
        return {"index": 0, "text": text or "", "logprobs": lp, "finish_reason": finish}

    def start(self) -> list:
        return [self._base([self._choice(None, None, None, role=True)])] if self.chat else []

    def chunk(self, body: dict) -> dict | None:
        text, lps = body.get("text", ""), body.get("logprobs") or None
        if not text and not lps:
            return None
        event = self._base([self._choice(text, lps or [], None)])
        self._offset += len(text)
        return event

    def end(self, stats: dict | None) -> list:
        events = [self._base([self._choice(None, None, finish_reason(stats))])]
        if self.call.include_usage:
            events.append({**self._base([]), "usage": usage(stats)})
        return events + ["[DONE]"]


def sse(event) -> bytes:
    """One server-sent event: ``data: JSON`` (or ``data: [DONE]``) and a blank line."""
    data = event if isinstance(event, str) else json.dumps(event, ensure_ascii=False, separators=(",", ":"))
    return f"data: {data}\n\n".encode()


def embeddings_response(call: EmbedCall, vectors, tokens: int) -> dict:
    """``vectors`` (count x dim float32) as OpenAI's embedding list; base64 is the little-endian
    float32 bytes, as the official clients decode it."""
    rows = np.asarray(vectors, dtype="<f4")
    data = [{"object": "embedding", "index": i,
             "embedding": base64.b64encode(r.tobytes()).decode() if call.base64 else r.tolist()}
            for i, r in enumerate(rows)]
    return {"object": "list", "data": data, "model": call.model,
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}


def models_response(rows: list[dict]) -> dict:
    """``ls`` rows as /v1/models."""
    return {"object": "list", "data": [model_row(r) for r in rows]}


def model_row(r: dict) -> dict:
    return {"id": r["model"], "object": "model", "created": int(r.get("modified") or 0),
            "owned_by": r.get("owner_name") or "llmosd"}


def error_body(status: int, message: str, *, param: str | None = None, code: str | None = None,
               hint: str | None = None) -> dict:
    """OpenAI's error shape; ``type`` by status as OpenAI's API sets it."""
    kind = ("invalid_request_error" if status < 500 and status not in (401, 403, 429)
            else "authentication_error" if status == 401 else "permission_error" if status == 403
            else "rate_limit_error" if status == 429 else "server_error")
    err = {"message": message, "type": kind, "param": param, "code": code}
    if hint:
        err["hint"] = hint
    return {"error": err}
