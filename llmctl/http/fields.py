"""Checking the fields of a JSON request body, and the HTTP status of every error (pure).

A bad field is ``BadField`` (an ``InvalidArgument``, HTTP 400) naming the field, so that both
APIs can say which argument was wrong (OpenAI's error ``param``).
"""
from __future__ import annotations

from ..errors import (AlreadyExists, BadRequest, Busy, Cancelled, DaemonUnavailable, InstanceNotFound,
                      InvalidArgument, InvalidState, JobNotFound, LlmosdError, ModelNotFound,
                      OutOfMemory, PermissionDenied, ShuttingDown, Timeout, TooLarge, UnknownType,
                      UnsupportedVersion)

MISSING = object()


class BadField(InvalidArgument):
    """A request field of the wrong type, range or shape; ``param`` names it."""

    def __init__(self, param: str | None, message: str, hint: str | None = None):
        super().__init__(message, hint=hint)
        self.param = param


class Unauthorized(PermissionDenied):
    """No API key, or one not in the gateway's key file (HTTP 401).  Never crosses the wire."""
    default_hint = "send the header 'Authorization: Bearer KEY' with a key from the gateway's --api-key-file"


class NotFound(ModelNotFound):
    """An HTTP path the gateway does not serve (HTTP 404)."""
    default_hint = "the gateway serves /v1/chat/completions, /v1/completions, /v1/embeddings, " \
                   "/v1/models and Ollama's /api/generate, /api/chat, /api/tags, /api/ps, /api/show, /api/embed"


# Most specific first: the first class the error is an instance of gives its status.
STATUSES: tuple[tuple[type[LlmosdError], int], ...] = (
    (Unauthorized, 401), (PermissionDenied, 403),
    (ModelNotFound, 404), (InstanceNotFound, 404), (JobNotFound, 404),
    (TooLarge, 413), (InvalidArgument, 400), (BadRequest, 400), (UnknownType, 400),
    (AlreadyExists, 409), (InvalidState, 409),
    (Busy, 429), (OutOfMemory, 503), (ShuttingDown, 503), (DaemonUnavailable, 503),
    (Cancelled, 503), (Timeout, 504), (UnsupportedVersion, 502),
)


def status_of(err: LlmosdError) -> int:
    """The HTTP status for ``err``: 4xx for what the caller can fix, 429/503 for busy or
    unavailable (retry later), 500 for the rest."""
    for cls, status in STATUSES:
        if isinstance(err, cls):
            return status
    return 500


def get(body: dict, key: str, kind: str, *, required: bool = False, lo: float | None = None,
        hi: float | None = None, choices: tuple | None = None, max_len: int | None = None,
        where: str = ""):
    """``body[key]`` checked as ``kind`` ("str", "int", "float", "bool", "list", "dict"), or
    None when absent (or JSON null) and not ``required``.  Numbers in [lo, hi]; strings and
    lists at most ``max_len`` long; ``choices`` the allowed values.  BadField otherwise.
    ``where`` prefixes the field's name (e.g. "options.")."""
    name = where + key
    value = body.get(key) if isinstance(body, dict) else None
    if value is None:
        if required:
            raise BadField(name, f"'{name}' is required")
        return None
    ok = {"str": isinstance(value, str),
          "int": isinstance(value, int) and not isinstance(value, bool),
          "float": isinstance(value, (int, float)) and not isinstance(value, bool),
          "bool": isinstance(value, bool),
          "list": isinstance(value, list),
          "dict": isinstance(value, dict)}[kind]
    if not ok:
        raise BadField(name, f"'{name}' must be {_ARTICLE[kind]}, not {_json_type(value)}")
    if kind == "float":
        value = float(value)
        if value != value or value in (float("inf"), float("-inf")):
            raise BadField(name, f"'{name}' must be a finite number")
    if lo is not None and value < lo or hi is not None and value > hi:
        raise BadField(name, f"'{name}' must be between {_num(lo)} and {_num(hi)}, not {_num(value)}")
    if max_len is not None and len(value) > max_len:
        raise BadField(name, f"'{name}' is too long ({len(value)} > {max_len})")
    if choices is not None and value not in choices:
        raise BadField(name, f"'{name}' must be one of {', '.join(map(repr, choices))}, not {value!r}")
    return value


def strings(value, name: str, max_items: int) -> list[str]:
    """A string or a list of strings (OpenAI's ``stop``, ``input``...) as a list; BadField
    for anything else."""
    if isinstance(value, str):
        return [value]
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        if len(value) > max_items:
            raise BadField(name, f"'{name}' has {len(value)} items; at most {max_items} are allowed")
        return list(value)
    raise BadField(name, f"'{name}' must be a string or a list of strings")


def clean(d: dict) -> dict:
    """``d`` without its None values (the daemon applies its defaults to those)."""
    return {k: v for k, v in d.items() if v is not None}


_ARTICLE = {"str": "a string", "int": "an integer", "float": "a number", "bool": "a boolean",
            "list": "an array", "dict": "an object"}


def _json_type(v) -> str:
    for t, n in ((bool, "a boolean"), (int, "an integer"), (float, "a number"), (str, "a string"),
                 (list, "an array"), (dict, "an object")):
        if isinstance(v, t):
            return n
    return type(v).__name__


def _num(v) -> str:
    return "any" if v is None else f"{v:g}" if isinstance(v, float) else str(v)
