"""Protocol v1: the wire contract between llmosd and its clients (see llmosd-protocol(7)).

Transport: ZeroMQ, DEALER (client) to ROUTER (daemon).  Every message is one frame holding one
msgpack map::

    {"v": 1, "id": <int>, "type": <str>, "body": <map>}            client -> daemon
    {"v": 1, "id": <int>, "type": "ok"|"error"|"chunk"|"end"|"beat",
     "seq": <int, chunk/end only>, "body": <map>}                  daemon -> client

``id`` is chosen by the client and echoed on every reply to that request.  A streamed request
gets zero or more ``chunk`` replies numbered from 0 by ``seq`` and then exactly one ``end`` (or
one ``error``).  ``beat`` (id 0) is sent by the daemon to a client with streams open but idle:
clients ignore it; its failure to be delivered tells the daemon the client is gone.

This module imports neither torch nor zmq: it is pure data handling shared by both sides.
"""
from __future__ import annotations

import msgpack

from .errors import BadRequest, InvalidArgument, TooLarge, UnknownType, UnsupportedVersion

VERSION = 1            # protocol major version: a mismatch is refused in ``hello``
MINOR = 2              # additions that old peers can ignore bump only this
DEFAULT_MAX_MESSAGE = 16 * 1024 * 1024

REPLY_TYPES = ("ok", "error", "chunk", "end", "beat")

# Request body schemas: field -> (accepted python types, required).  int fields accept bool? no.
_S, _I, _F, _B, _L, _Y = (str,), (int,), (int, float), (bool,), (list,), (bytes, str)
_GEN = {"max_tokens": (_I, False), "temperature": (_F, False), "top_k": (_I, False),
        "top_p": (_F, False), "min_p": (_F, False), "repetition_penalty": (_F, False),
        "seed": (_I, False), "stop": (_L, False), "logprobs": (_I, False)}
SCHEMAS: dict[str, dict[str, tuple[tuple[type, ...], bool]]] = {
    "hello": {"client": (_S, False), "version": (_I, True)},
    "ping": {},
    "status": {},
    "ps": {},
    "ls": {},
    "show": {"model": (_S, True)},
    "create": {
        "name": (_S, True), "layers": (_I, True), "dim": (_I, True), "heads": (_I, True),
        "kv_heads": (_I, False), "vocab_size": (_I, False), "text": (_Y, True),
        "seed": (_I, False), "hidden_dim": (_I, False), "context": (_I, False),
        "rope_theta": (_F, False), "tie_embeddings": (_B, False), "force": (_B, False),
    },
    "rm": {"model": (_S, True)},
    "tag": {"source": (_S, True), "target": (_S, True), "force": (_B, False)},
    "load": {"model": (_S, True)},
    "unload": {"target": (_S, True), "force": (_B, False)},
    "generate": {"model": (_S, True), "prompt": (_S, True), **_GEN, "add_bos": (_B, False)},
    "chat": {"model": (_S, True), "messages": (_L, True), **_GEN},
    "score": {"model": (_S, True), "text": (_S, True), "add_bos": (_B, False)},
    "embed": {"model": (_S, True), "inputs": (_L, True), "pooling": (_S, False),
              "normalize": (_B, False)},
    "classify": {"model": (_S, True), "inputs": (_L, True), "labels": (_L, True),
                 "template": (_S, False)},
    "cancel": {"target": (_I, True)},
    "upload": {"digest": (_S, True), "size": (_I, True)},
    "upload_chunk": {"digest": (_S, True), "offset": (_I, True), "data": ((bytes,), True)},
    "download": {"digest": (_S, True), "offset": (_I, True), "size": (_I, True)},
    "import": {"name": (_S, True), "files": ((dict,), True), "format": (_S, False),
               "force": (_B, False), "dtype": (_S, False)},
}
STREAMING = frozenset({"create", "generate", "chat", "import"})
UPLOAD_CHUNK = 4 * 1024 * 1024     # bytes per upload_chunk the client sends


def encode(msg: dict) -> bytes:
    return msgpack.packb(msg, use_bin_type=True)


def request(rid: int, type_: str, body: dict | None = None) -> dict:
    return {"v": VERSION, "id": rid, "type": type_, "body": body or {}}


def reply(rid: int, type_: str, body: dict | None = None, seq: int | None = None) -> dict:
    msg = {"v": VERSION, "id": rid, "type": type_, "body": body or {}}
    if seq is not None:
        msg["seq"] = seq
    return msg


def decode(data: bytes, max_size: int = DEFAULT_MAX_MESSAGE) -> dict:
    """Decode one frame into an envelope map; raises BadRequest/TooLarge naming the problem."""
    if len(data) > max_size:
        err = TooLarge(f"message of {len(data)} bytes exceeds the limit of {max_size} bytes",
                       hint="send large content in pieces, or raise max_message_bytes in llmosd.toml")
        err.rid = _peek_id(data)
        raise err
    try:
        msg = msgpack.unpackb(data, raw=False, strict_map_key=True)
    except Exception as e:  # msgpack raises several unrelated types
        raise BadRequest(f"message is not valid msgpack: {e.__class__.__name__}: {e}",
                         hint="each frame must be one msgpack map; see llmosd-protocol(7)") from None
    if not isinstance(msg, dict):
        raise BadRequest(f"message must be a msgpack map, got {type(msg).__name__}")
    for key, types in (("v", (int,)), ("id", (int,)), ("type", (str,))):
        if key not in msg:
            raise BadRequest(f"message lacks the '{key}' field")
        if not isinstance(msg[key], types) or isinstance(msg[key], bool):
            raise BadRequest(f"field '{key}' must be {types[0].__name__}, got {type(msg[key]).__name__}")
    if "body" not in msg:
        msg["body"] = {}
    if not isinstance(msg["body"], dict):
        raise BadRequest(f"field 'body' must be a map, got {type(msg['body']).__name__}")
    return msg


def _peek_id(data: bytes) -> int:
    """The request id of an oversize message, so its error can be matched (0 if unknown)."""
    try:
        up = msgpack.Unpacker(raw=False)
        up.feed(data)
        n = up.read_map_header()
        for _ in range(n):
            key = up.unpack()
            if key == "id":
                rid = up.unpack()
                return rid if isinstance(rid, int) else 0
            up.skip()
    except Exception:
        pass
    return 0


def check_request(msg: dict) -> None:
    """Validate a decoded request envelope and its body against SCHEMAS."""
    if msg["v"] != VERSION:
        raise UnsupportedVersion(f"protocol version {msg['v']} is not supported (daemon speaks {VERSION})")
    schema = SCHEMAS.get(msg["type"])
    if schema is None:
        raise UnknownType(f"unknown message type {msg['type']!r}",
                          hint="known types: " + ", ".join(sorted(SCHEMAS)))
    body = msg["body"]
    for field, (types, required) in schema.items():
        if field not in body or body[field] is None:
            if required:
                raise InvalidArgument(f"'{msg['type']}' needs the field '{field}'")
            continue
        val = body[field]
        if not isinstance(val, types) or (isinstance(val, bool) and bool not in types):
            want = " or ".join(t.__name__ for t in types)
            raise InvalidArgument(f"field '{field}' of '{msg['type']}' must be {want}, "
                                  f"got {type(val).__name__}")
    extra = set(body) - set(schema)
    if extra:
        raise InvalidArgument(f"unknown field(s) for '{msg['type']}': {', '.join(sorted(map(str, extra)))}")
