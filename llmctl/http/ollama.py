"""Ollama's API <-> the daemon's protocol: request bodies to calls, replies to response bodies
(pure: times are passed in).

Served: ``/api/generate``, ``/api/chat`` (NDJSON streams; ``stream`` defaults to true, as
Ollama's), ``/api/tags``, ``/api/ps``, ``/api/show``, ``/api/embed`` (and the older
``/api/embeddings``).  ``keep_alive`` (seconds, or a duration such as "5m"; negative: forever)
goes to the daemon's keep_alive, so the memory manager honours it.  options honoured:
temperature, top_k, top_p, min_p, repeat_penalty, seed, stop, num_predict; the others (num_ctx,
num_thread...) are ignored, as Ollama ignores options that do not apply.  An empty prompt (or
no messages) loads the model, and with keep_alive 0 unloads it, as Ollama does.  Refused with
400: images, tools, format (JSON mode), suffix, template.
"""
from __future__ import annotations

import re
import time
from dataclasses import dataclass

import numpy as np

from .fields import BadField, clean, get, strings

MAX_KEEP_ALIVE = 10 * 365 * 86400          # the protocol's bound
ROLES = ("system", "user", "assistant", "tool")
_UNITS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1, "m": 60, "h": 3600}
_PART = r"(\d+(?:\.\d*)?|\.\d+)(ns|us|µs|ms|s|m|h)"


@dataclass(frozen=True)
class Call:
    """What a request asks of the daemon.  ``kind``: "chat" or "generate" (``args``: the
    Client method's keyword arguments besides the model), "prompt" (a generate request whose
    prompt goes through the model's chat template when it has one: see ``resolve``), "load"
    or "unload" (an empty prompt)."""
    kind: str
    model: str
    args: dict
    stream: bool = True
    chat: bool = False                 # answer in /api/chat's shape (message) vs /api/generate's


def keep_alive(value, name: str = "keep_alive") -> float | None:
    """Ollama's keep_alive as the daemon's seconds: a number of seconds or a Go duration
    ("5m", "1h30m", "300ms", "-1m"); negative means forever (-1); None when absent."""
    if value is None:
        return None
    if isinstance(value, bool):
        raise BadField(name, f"'{name}' must be a duration like \"5m\" or a number of seconds")
    if isinstance(value, (int, float)):
        secs = float(value)
    elif isinstance(value, str):
        s = value.strip()
        neg, body = s.startswith("-"), s.lstrip("+-")
        if re.fullmatch(r"\d+(\.\d+)?", body):
            secs = float(body)
        elif body and re.fullmatch(f"(?:{_PART})+", body):
            secs = sum(float(n) * _UNITS[u] for n, u in re.findall(_PART, body))
        else:
            raise BadField(name, f"'{name}' {value!r} is not a duration: use \"5m\", \"1h\", \"30s\", "
                                 f"a number of seconds, 0 (unload when done) or -1 (forever)")
        secs = -secs if neg else secs
    else:
        raise BadField(name, f"'{name}' must be a duration like \"5m\" or a number of seconds")
    if secs != secs:
        raise BadField(name, f"'{name}' must be a number")
    if secs < 0:
        return -1.0
    return min(secs, MAX_KEEP_ALIVE)


def options(body: dict) -> dict:
    """``options`` (and ``keep_alive``) as the daemon's sampling settings."""
    opts = get(body, "options", "dict") or {}
    w = "options."
    n = get(opts, "num_predict", "int", lo=-2, hi=1_000_000, where=w)
    if n == 0:
        raise BadField("options.num_predict", "'options.num_predict' 0 generates nothing; use a "
                                              "positive number, or -1 for no limit")
    seed = get(opts, "seed", "int", lo=-(2 ** 63), hi=2 ** 64 - 1, where=w)
    stop = opts.get("stop")
    return clean({
        "temperature": get(opts, "temperature", "float", lo=0, hi=100, where=w),
        "top_k": get(opts, "top_k", "int", lo=0, hi=1_000_000, where=w),
        "top_p": get(opts, "top_p", "float", lo=0, hi=1, where=w),
        "min_p": get(opts, "min_p", "float", lo=0, hi=1, where=w),
        "repetition_penalty": get(opts, "repeat_penalty", "float", lo=0.01, hi=100, where=w),
        "seed": seed if seed is not None and seed >= 0 else None,      # negative: random
        "max_tokens": n if n is not None and n > 0 else None,          # -1, -2: no limit
        "stop": strings(stop, "options.stop", 16) or None if stop is not None else None,
        "keep_alive": keep_alive(body.get("keep_alive")),
    })


def model_of(body) -> str:
    """The model a body names: ``model`` (or, as older Ollama clients send it, ``name``)."""
    if not isinstance(body, dict):
        raise BadField(None, "the request body must be a JSON object")
    model = get(body, "model", "str", max_len=512) or get(body, "name", "str", max_len=512)
    if not model:
        raise BadField("model", "'model' is required")
    return model


def _common(body) -> tuple[str, bool, dict]:
    model = model_of(body)
    if body.get("format") not in (None, ""):
        raise BadField("format", "'format' (JSON output) is not supported by llmosd")
    if body.get("images"):
        raise BadField("images", "images are not supported by llmosd")
    if body.get("tools"):
        raise BadField("tools", "tools are not supported by llmosd")
    stream = get(body, "stream", "bool")
    return model, True if stream is None else stream, options(body)


def _loading(model: str, stream: bool, opts: dict, chat: bool) -> Call:
    """An empty request loads the model (keep_alive 0: unloads it), as Ollama does."""
    ka = opts.get("keep_alive")
    if ka == 0:
        return Call("unload", model, {}, stream, chat)
    return Call("load", model, clean({"keep_alive": ka}), stream, chat)


def generate_call(body) -> Call:
    """A /api/generate body.  Not ``raw``: kind "prompt" (see ``resolve``)."""
    model, stream, opts = _common(body)
    prompt = get(body, "prompt", "str") or ""
    system = get(body, "system", "str")
    raw = bool(get(body, "raw", "bool"))
    if get(body, "suffix", "str"):
        raise BadField("suffix", "'suffix' (fill in the middle) is not supported by llmosd")
    if get(body, "template", "str"):
        raise BadField("template", "'template' is not supported: llmosd renders the model's own chat template")
    if not prompt and system is None:
        return _loading(model, stream, opts, False)
    if raw:
        return Call("generate", model, {"prompt": prompt, **opts}, stream)
    return Call("prompt", model, clean({"prompt": prompt, "system": system, **opts}), stream)


def resolve(call: Call, has_template: bool) -> Call:
    """A "prompt" call made concrete: through the chat template when the model has one (as
    Ollama renders /api/generate's prompt with the model's template), else plain text with the
    system message (if any) before it."""
    if call.kind != "prompt":
        return call
    args = dict(call.args)
    prompt, system = args.pop("prompt"), args.pop("system", None)
    if has_template:
        msgs = ([{"role": "system", "content": system}] if system is not None else []) + \
               [{"role": "user", "content": prompt}]
        return Call("chat", call.model, {"messages": msgs, **args}, call.stream)
    text = prompt if system is None else f"{system}\n\n{prompt}"
    return Call("generate", call.model, {"prompt": text, **args}, call.stream)


def chat_call(body) -> Call:
    """A /api/chat body as a daemon ``chat`` call (empty messages: load or unload)."""
    model, stream, opts = _common(body)
    raw = get(body, "messages", "list") or []
    if not raw:
        return _loading(model, stream, opts, True)
    msgs = []
    for i, m in enumerate(raw):
        where = f"messages[{i}]"
        if not isinstance(m, dict):
            raise BadField(where, f"'{where}' must be an object with 'role' and 'content'")
        if m.get("images"):
            raise BadField(where + ".images", "images are not supported by llmosd")
        if m.get("tool_calls"):
            raise BadField(where + ".tool_calls", "tool calls are not supported by llmosd")
        msgs.append({"role": get(m, "role", "str", required=True, choices=ROLES, where=where + "."),
                     "content": get(m, "content", "str", where=where + ".") or ""})
    return Call("chat", model, {"messages": msgs, **opts}, stream, chat=True)


def embed_inputs(body, legacy: bool = False) -> tuple[str, list[str], float | None]:
    """/api/embed's (model, inputs, keep_alive); ``legacy``: /api/embeddings' one ``prompt``."""
    model = model_of(body)
    if legacy:
        inputs = [get(body, "prompt", "str", required=True)]
    else:
        if body.get("input") is None:
            raise BadField("input", "'input' is required")
        inputs = strings(body["input"], "input", 2048)
        if not inputs:
            raise BadField("input", "'input' must hold at least one string")
    if body.get("dimensions") is not None:
        raise BadField("dimensions", "'dimensions' is not supported: the vectors have the model's width")
    return model, inputs, keep_alive(body.get("keep_alive"))


# -- responses --------------------------------------------------------------------------------
def iso(t: float | None) -> str:
    """A Unix time as Ollama writes times (RFC 3339, UTC, microseconds)."""
    t = time.time() if t is None else float(t)
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(t)) + f".{int(t % 1 * 1e6):06d}Z"


def _ns(ms) -> int:
    return int((ms or 0) * 1e6)


def durations(stats: dict | None) -> dict:
    """The daemon's end statistics as Ollama's counts and nanosecond durations."""
    s = stats or {}
    total, ttft = s.get("total_ms") or 0, s.get("ttft_ms") or 0
    return {"total_duration": _ns(total), "load_duration": _ns(s.get("load_ms")),
            "prompt_eval_count": s.get("prompt_tokens", 0), "prompt_eval_duration": _ns(ttft),
            "eval_count": s.get("generated_tokens", 0), "eval_duration": _ns(max(total - ttft, 0))}


def done_reason(stats: dict | None) -> str:
    r = (stats or {}).get("finish_reason")
    return "length" if r in ("length", "context") else "stop"


def piece(call: Call, text: str, now: str) -> dict:
    """One streamed line with ``text``."""
    base = {"model": call.model, "created_at": now}
    if call.chat:
        return {**base, "message": {"role": "assistant", "content": text}, "done": False}
    return {**base, "response": text, "done": False}


def final(call: Call, text: str, stats: dict | None, now: str) -> dict:
    """The last line of a stream (``text`` ""), or the whole answer when not streamed."""
    return {**piece(call, text, now), "done": True, "done_reason": done_reason(stats), **durations(stats)}


def loaded(call: Call, now: str) -> dict:
    """The answer to an empty request: done_reason "load" or "unload"."""
    return {**piece(call, "", now), "done": True, "done_reason": call.kind}


def parameter_size(n) -> str:
    if not n:
        return ""
    for unit, div in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= div:
            return f"{n / div:.3g}{unit}".replace(".0" + unit, unit)
    return str(n)


def details(row: dict) -> dict:
    arch = row.get("architecture") or ""
    return {"parent_model": row.get("parent") or row.get("base") or "", "format": "llmosd",
            "family": arch, "families": [arch] if arch else [],
            "parameter_size": parameter_size(row.get("parameters")),
            "quantization_level": quantization_level(row.get("weights"))}


def quantization_level(weights: str | None) -> str:
    """Ollama's name of how the weights are held: the main form of llmosd's ("q4_1+q8_0" ->
    "Q4_1", "int8" -> "Q8_0", "int4" -> "Q4_1": group-32 forms; "float32" -> "F32")."""
    if not weights:
        return ""
    main = weights.split("+")[0].split(",")[-1].strip().lower()
    names = {"int8": "Q8_0", "int4": "Q4_1", "float32": "F32", "float16": "F16", "bfloat16": "BF16"}
    return names.get(main, main.upper())


def _digest(d: str | None) -> str:
    return (d or "").split(":", 1)[-1]


def tags(rows: list[dict]) -> dict:
    """``ls`` rows as /api/tags."""
    return {"models": [{"name": r["model"], "model": r["model"], "modified_at": iso(r.get("modified") or 0),
                        "size": r.get("size") or 0, "digest": _digest(r.get("digest")), "details": details(r)}
                       for r in rows]}


LIVE = ("loading", "ready", "busy", "swapped")


def ps(instances: list[dict], models: list[dict]) -> dict:
    """``ps`` instances (with the ``ls`` rows for their details) as /api/ps.  An instance kept
    forever (or in use) expires, as Ollama says, far in the future."""
    by_name = {m["model"]: m for m in models}
    out = []
    for i in instances:
        if i.get("state") not in LIVE:
            continue
        row = by_name.get(i["model"], {})
        size = i.get("resident_bytes") or i.get("estimate_bytes") or 0
        on_gpu = str(i.get("device", "")).startswith("cuda") and i.get("tier", "device") == "device"
        out.append({"name": i["model"], "model": i["model"], "size": size, "digest": _digest(i.get("digest")),
                    "details": details({**row, "weights": i.get("weights") or row.get("weights")}),
                    "expires_at": iso(i.get("expires_at") or 4102444800),
                    "size_vram": size if on_gpu else 0})
    return {"models": out}


def _stored_form(man: dict) -> str | None:
    w = man.get("weights")
    return (w.get("quant") or w.get("dtype")) if isinstance(w, dict) else None


def show(reply: dict, row: dict | None = None) -> dict:
    """``show``'s reply as /api/show: template, parameters (the model's sampling defaults,
    one "name value" per line), details and model_info (its config, keys prefixed with the
    architecture as GGUF's)."""
    man = reply.get("manifest") or {}
    arch = man.get("architecture") or "llama"
    info = {"general.architecture": arch, "general.parameter_count": man.get("parameters")}
    info.update({f"{arch}.{k}": v for k, v in (reply.get("config") or {}).items()
                 if isinstance(v, (int, float, str, bool))})
    params = "\n".join(f"{k} {v}" for k, v in sorted((man.get("defaults") or {}).items()))
    caps = ["completion", "embedding"]
    return {"license": "", "modelfile": "", "parameters": params, "template": man.get("chat_template") or "",
            "details": details({**(row or {}), "architecture": arch, "parameters": man.get("parameters"),
                                "weights": (row or {}).get("weights") or _stored_form(man)}),
            "model_info": info, "capabilities": caps,
            "modified_at": iso((row or {}).get("modified") or 0)}


def embed_response(model: str, vectors, tokens: int, total_ms: float, legacy: bool = False) -> dict:
    rows = np.asarray(vectors, dtype="<f4").tolist()
    if legacy:
        return {"embedding": rows[0]}
    return {"model": model, "embeddings": rows, "total_duration": _ns(total_ms), "load_duration": 0,
            "prompt_eval_count": tokens}


def error_body(message: str, hint: str | None = None) -> dict:
    """Ollama's error shape: {"error": message} (the hint, when any, as an extra key)."""
    return {"error": message, **({"hint": hint} if hint else {})}
