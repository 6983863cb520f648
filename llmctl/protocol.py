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

import math
import threading

import msgpack

from .errors import BadRequest, InvalidArgument, TooLarge, UnknownType, UnsupportedVersion

VERSION = 1            # protocol major version: a mismatch is refused in ``hello``
MINOR = 9              # additions that old peers can ignore bump only this
DEFAULT_MAX_MESSAGE = 16 * 1024 * 1024
UPLOAD_CHUNK = 4 * 1024 * 1024     # bytes per upload_chunk the client sends

REPLY_TYPES = ("ok", "error", "chunk", "end", "beat")

U64 = (1 << 64) - 1
NAME_MAX = 300            # 'namespace/name:tag' is at most 256 characters; a little slack


class Field:
    """One body field: accepted types, whether required, and its range.  ``lo``/``hi`` bound
    numbers, ``max_len`` bounds str/bytes/list/dict lengths, ``choices`` lists legal strings,
    ``items`` is the type every list element (or dict key and value) must have."""

    __slots__ = ("types", "required", "lo", "hi", "max_len", "choices", "items")

    def __init__(self, types, required=False, *, lo=None, hi=None, max_len=None, choices=None,
                 items=None):
        self.types, self.required = types, required
        self.lo, self.hi, self.max_len, self.choices, self.items = lo, hi, max_len, choices, items

    def check(self, mtype: str, name: str, val) -> None:
        """Raise InvalidArgument naming the field, the message type and what is legal."""
        where = f"field '{name}' of '{mtype}'"
        if not isinstance(val, self.types) or (isinstance(val, bool) and bool not in self.types):
            want = " or ".join(t.__name__ for t in self.types)
            raise InvalidArgument(f"{where} must be {want}, got {type(val).__name__}")
        if isinstance(val, float) and not math.isfinite(val):
            raise InvalidArgument(f"{where} must be a finite number, got {val}")
        if isinstance(val, (int, float)) and not isinstance(val, bool):
            if (self.lo is not None and val < self.lo) or (self.hi is not None and val > self.hi):
                raise InvalidArgument(f"{where} must be between {self.lo} and {self.hi}, got {_short(val)}")
        if self.max_len is not None and isinstance(val, (str, bytes, list, dict)) and len(val) > self.max_len:
            raise InvalidArgument(f"{where} is too long ({len(val)} > {self.max_len})")
        if self.choices is not None and val not in self.choices:
            raise InvalidArgument(f"{where} must be one of {', '.join(self.choices)}, got {_short(val)}")
        if self.items is not None and isinstance(val, list):
            for i, x in enumerate(val):
                if not isinstance(x, self.items) or isinstance(x, bool):
                    raise InvalidArgument(f"{where}: item {i} must be {self.items[0].__name__}, "
                                          f"got {type(x).__name__}")
        if self.items is not None and isinstance(val, dict):
            for k, v in val.items():
                if not isinstance(k, str) or not isinstance(v, self.items):
                    raise InvalidArgument(f"{where}: every key and value must be "
                                          f"{self.items[0].__name__}")


def _short(val, n: int = 80) -> str:
    """repr of a value for an error message, cut so that echoed input stays small."""
    r = repr(val)
    return r if len(r) <= n else r[:n] + f"... ({len(r) - n} more characters)"


_S, _I, _F, _B, _L, _Y = (str,), (int,), (int, float), (bool,), (list,), (bytes, str)


def _name(required=True):
    return Field(_S, required, max_len=NAME_MAX)


# keep_alive (1.7): seconds an instance stays loaded after its last request; -1 forever, 0 none
_KEEP = Field(_F, lo=-1, hi=10 * 365 * 86400)
_GEN = {"keep_alive": _KEEP, "max_tokens": Field(_I, lo=1, hi=1_000_000), "temperature": Field(_F, lo=0, hi=100),
        "top_k": Field(_I, lo=0, hi=1_000_000), "top_p": Field(_F, lo=0, hi=1),
        "min_p": Field(_F, lo=0, hi=1), "repetition_penalty": Field(_F, lo=0.01, hi=100),
        "seed": Field(_I, lo=0, hi=U64), "stop": Field(_L, max_len=16, items=(str,)),
        "logprobs": Field(_I, lo=0, hi=20)}
SAMPLING_KEYS = ("temperature", "top_k", "top_p", "min_p", "repetition_penalty")   # model defaults may set these
_DIGEST = Field(_S, True, max_len=80)
DTYPES = ("auto", "float32", "float16", "bfloat16")
IMPORT_DTYPES = DTYPES + ("int8", "int4")     # 1.9: int8/int4 store quantized weights
QUANTS = ("auto", "none", "int8", "int4")     # 1.9: load's weight form
_JOB = Field(_I, True, lo=1, hi=U64)
# Job states (1.5): queued -> running -> succeeded | failed | cancelled, running -> pausing ->
# paused -> queued (resume); see llmosd-protocol(7) for every legal move.
JOB_STATES = ("queued", "running", "pausing", "paused", "succeeded", "failed", "cancelled")
JOB_KINDS = ("create", "import", "train", "finetune", "eval", "merge")   # the last three: 1.6

# Request body schemas: one per message type, every field typed and ranged (see Field).
SCHEMAS: dict[str, dict[str, Field]] = {
    "hello": {"client": Field(_S, max_len=256), "version": Field(_I, True, lo=0, hi=1 << 31)},
    "ping": {},
    "status": {},
    "ps": {},
    "ls": {},
    "show": {"model": _name()},
    "create": {
        "name": _name(), "layers": Field(_I, True, lo=1, hi=1024),
        "dim": Field(_I, True, lo=1, hi=65536), "heads": Field(_I, True, lo=1, hi=1024),
        "kv_heads": Field(_I, lo=1, hi=1024), "vocab_size": Field(_I, lo=1, hi=4_000_000),
        "text": Field(_Y, True), "seed": Field(_I, lo=0, hi=U64),
        "hidden_dim": Field(_I, lo=1, hi=1 << 20), "context": Field(_I, lo=1, hi=1 << 20),
        "rope_theta": Field(_F, lo=1e-6, hi=1e12), "tie_embeddings": Field(_B),
        "force": Field(_B),
    },
    "rm": {"model": _name(), "force": Field(_B)},
    "tag": {"source": _name(), "target": _name(), "force": Field(_B)},
    # memory (1.7): keep_alive in seconds (-1 forever, 0 unload when idle), priority, pins
    "load": {"model": _name(), "keep_alive": _KEEP, "priority": Field(_I, lo=-1000, hi=1000),
             "pin": Field(_B), "dtype": Field(_S, choices=DTYPES), "quant": Field(_S, choices=QUANTS)},
    "unload": {"target": _name(), "force": Field(_B)},
    # memory (1.7): pin/unpin a model's instances (target: a model name or an instance id)
    "pin": {"target": _name()},
    "unpin": {"target": _name()},
    "generate": {"model": _name(), "prompt": Field(_S, True), **_GEN, "add_bos": Field(_B)},
    "chat": {"model": _name(), "messages": Field(_L, True, max_len=100_000, items=(dict,)), **_GEN},
    "score": {"model": _name(), "text": Field(_S, True), "add_bos": Field(_B), "keep_alive": _KEEP},
    "embed": {"model": _name(), "inputs": Field(_L, True, max_len=256, items=(str,)),
              "pooling": Field(_S, choices=("mean", "last")), "normalize": Field(_B),
              "keep_alive": _KEEP},
    "classify": {"model": _name(), "inputs": Field(_L, True, max_len=256, items=(str,)),
                 "keep_alive": _KEEP,
                 "labels": Field(_L, max_len=64, items=(str,)),      # optional since 1.6
                 "template": Field(_S, max_len=65536)},
    "cancel": {"target": Field(_I, True, lo=0, hi=U64)},
    "upload": {"digest": _DIGEST, "size": Field(_I, True, lo=0, hi=1 << 40)},
    "upload_chunk": {"digest": _DIGEST, "offset": Field(_I, True, lo=0, hi=1 << 40),
                     "data": Field((bytes,), True, max_len=UPLOAD_CHUNK)},
    "export": {"model": _name()},
    "download": {"digest": _DIGEST, "offset": Field(_I, True, lo=0, hi=1 << 40),
                 "size": Field(_I, True, lo=1, hi=UPLOAD_CHUNK)},
    "import": {"name": _name(), "files": Field((dict,), True, max_len=1000, items=(str,)),
               "format": Field(_S, choices=("hf", "gguf", "peft")), "force": Field(_B),
               "dtype": Field(_S, choices=IMPORT_DTYPES), "base": _name(False)},
    # jobs (1.5): the spec's keys and values are checked by the daemon against the data
    "train": {"name": _name(), "data": Field((dict,), True, max_len=1000, items=(str,)),
              "spec": Field((dict,), True, max_len=64), "priority": Field(_I, lo=-1000, hi=1000),
              "force": Field(_B), "preemptible": Field(_B)},
    # fine-tuning (1.6): finetune answers with the job's row like train; eval and merge stream
    "finetune": {"base": _name(), "name": _name(),
                 "data": Field((dict,), True, max_len=1000, items=(str,)),
                 "val_data": Field((dict,), max_len=1000, items=(str,)),
                 "spec": Field((dict,), True, max_len=64), "priority": Field(_I, lo=-1000, hi=1000),
                 "force": Field(_B), "preemptible": Field(_B)},
    "eval": {"model": _name(), "data": Field((dict,), True, max_len=1000, items=(str,)),
             "spec": Field((dict,), max_len=64)},
    "merge": {"adapter": _name(), "name": _name(), "force": Field(_B)},
    "jobs": {"all": Field(_B)},
    "job": {"job": _JOB},
    "job_rm": {"job": _JOB},
    "job_cancel": {"job": _JOB},
    "job_pause": {"job": _JOB},
    "job_resume": {"job": _JOB},
    "job_logs": {"job": _JOB, "follow": Field(_B)},
    # operations (1.8): check the store (and with repair remove what nobody needs)
    "fsck": {"repair": Field(_B)},
    # operations (1.8): the Prometheus text exposition, {"text": str}
    "metrics": {},
}
STREAMING = frozenset({"create", "generate", "chat", "import", "job_logs", "eval", "merge"})


_packers = threading.local()      # one Packer per thread: packb makes a new one per message
_PACKER_KEEP = 1 << 20            # a packer whose buffer grew past this is not kept


def encode(msg: dict) -> bytes:
    try:
        packer = _packers.packer
    except AttributeError:
        packer = _packers.packer = msgpack.Packer(use_bin_type=True)
    data = packer.pack(msg)
    if len(data) > _PACKER_KEEP:     # its buffer holds as much: let it go with the packer
        del _packers.packer
    return data


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
    if _well_formed(msg):
        if "body" not in msg:
            msg["body"] = {}
        return msg
    if not isinstance(msg, dict):
        raise BadRequest(f"message must be a msgpack map, got {type(msg).__name__}")
    rid = msg.get("id")
    try:
        for key, types in (("v", (int,)), ("id", (int,)), ("type", (str,))):
            if key not in msg:
                raise BadRequest(f"message lacks the '{key}' field")
            if not isinstance(msg[key], types) or isinstance(msg[key], bool):
                raise BadRequest(f"field '{key}' must be {types[0].__name__}, got {type(msg[key]).__name__}")
        if not 0 <= msg["id"] <= U64:
            raise BadRequest(f"field 'id' must be between 0 and {U64}")
        if "body" not in msg:
            msg["body"] = {}
        if not isinstance(msg["body"], dict):
            raise BadRequest(f"field 'body' must be a map, got {type(msg['body']).__name__}")
    except BadRequest as e:      # echo the id when there is one, so the client can match it
        e.rid = rid if isinstance(rid, int) and not isinstance(rid, bool) and 0 <= rid <= U64 else 0
        raise
    return msg


def _well_formed(msg) -> bool:
    """The checks of ``decode`` at once, for the usual envelope (msgpack makes plain dicts and
    ints, so ``type(x) is int`` is ``isinstance`` less bool); anything else takes the checks
    one by one, which name the problem."""
    if type(msg) is not dict:
        return False
    rid, body = msg.get("id"), msg.get("body", _NO_BODY)
    return (type(msg.get("v")) is int and type(msg.get("type")) is str and type(rid) is int
            and 0 <= rid <= U64 and (body is _NO_BODY or type(body) is dict))


_NO_BODY = object()


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
    """Validate a decoded request envelope and its body against SCHEMAS (types, ranges,
    lengths, choices) so that handlers only ever see well-formed values."""
    if msg["v"] != VERSION:
        raise UnsupportedVersion(f"protocol version {_short(msg['v'])} is not supported (daemon speaks {VERSION})")
    schema = SCHEMAS.get(msg["type"])
    if schema is None:
        raise UnknownType(f"unknown message type {_short(msg['type'])}",
                          hint="known types: " + ", ".join(sorted(SCHEMAS)))
    if not msg["body"]:       # ping, status, ps...: only a required field can be missing
        for name, f in schema.items():
            if f.required:
                raise InvalidArgument(f"'{msg['type']}' needs the field '{name}'")
        return
    # nil means "not given" for every optional field: handlers never see None
    body = msg["body"] = {k: v for k, v in msg["body"].items() if v is not None}
    for name, f in schema.items():
        if name not in body or body[name] is None:
            if f.required:
                raise InvalidArgument(f"'{msg['type']}' needs the field '{name}'")
            continue
        f.check(msg["type"], name, body[name])
    extra = set(body) - set(schema)
    if extra:
        raise InvalidArgument(f"unknown field(s) for '{msg['type']}': "
                              + _short(", ".join(sorted(map(str, extra)))))
