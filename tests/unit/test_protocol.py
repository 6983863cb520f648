import msgpack
import pytest

from llmctl import errors, protocol


def test_roundtrip_and_reply_shapes():
    msg = protocol.request(7, "generate", {"model": "m", "prompt": "p"})
    back = protocol.decode(protocol.encode(msg))
    assert back == msg
    protocol.check_request(back)
    r = protocol.reply(7, "chunk", {"text": "x"}, seq=3)
    assert r["seq"] == 3 and r["type"] == "chunk"


@pytest.mark.parametrize("data,cls", [
    (b"\xc1", errors.BadRequest),
    (msgpack.packb("text"), errors.BadRequest),
    (msgpack.packb({"v": 1, "type": "ping"}), errors.BadRequest),
    (msgpack.packb({"v": 1, "id": "1", "type": "ping"}), errors.BadRequest),
    (msgpack.packb({"v": 1, "id": 1, "type": "ping", "body": []}), errors.BadRequest),
])
def test_decode_rejects(data, cls):
    with pytest.raises(cls):
        protocol.decode(data)


def test_oversize_names_limit_and_keeps_id():
    data = protocol.encode(protocol.request(42, "generate", {"model": "m", "prompt": "x" * 500}))
    with pytest.raises(errors.TooLarge) as e:
        protocol.decode(data, max_size=100)
    assert e.value.rid == 42 and "100" in str(e.value)


@pytest.mark.parametrize("msg,cls,needle", [
    ({"v": 2, "id": 1, "type": "ping", "body": {}}, errors.UnsupportedVersion, "version"),
    ({"v": 1, "id": 1, "type": "nope", "body": {}}, errors.UnknownType, "nope"),
    ({"v": 1, "id": 1, "type": "show", "body": {}}, errors.InvalidArgument, "model"),
    ({"v": 1, "id": 1, "type": "show", "body": {"model": 3}}, errors.InvalidArgument, "str"),
    ({"v": 1, "id": 1, "type": "unload", "body": {"target": "x", "force": 1}}, errors.InvalidArgument, "force"),
    ({"v": 1, "id": 1, "type": "ping", "body": {"extra": 1}}, errors.InvalidArgument, "extra"),
    ({"v": 1, "id": 1, "type": "chat", "body": {"model": "m"}}, errors.InvalidArgument, "messages"),
    ({"v": 1, "id": 1, "type": "chat", "body": {"model": "m", "messages": "hi"}}, errors.InvalidArgument, "list"),
    ({"v": 1, "id": 1, "type": "generate", "body": {"model": "m", "prompt": "p", "min_p": "0.1"}},
     errors.InvalidArgument, "min_p"),
    ({"v": 1, "id": 1, "type": "score", "body": {"model": "m"}}, errors.InvalidArgument, "text"),
    ({"v": 1, "id": 1, "type": "embed", "body": {"model": "m", "inputs": ["a"], "pooling": 1}},
     errors.InvalidArgument, "pooling"),
    ({"v": 1, "id": 1, "type": "classify", "body": {"model": "m", "inputs": ["a"]}}, errors.InvalidArgument, "labels"),
    ({"v": 1, "id": 1, "type": "download", "body": {"digest": "d", "offset": 0}}, errors.InvalidArgument, "size"),
    ({"v": 1, "id": 1, "type": "import", "body": {"name": "n", "files": {}, "dtype": 16}},
     errors.InvalidArgument, "dtype"),
])
def test_check_request(msg, cls, needle):
    with pytest.raises(cls) as e:
        protocol.check_request(msg)
    assert needle in str(e.value)


def test_error_codes_are_stable_and_unique():
    codes = [c.code for c in errors.all_errors()]
    assert len(codes) == len(set(codes))
    assert errors.ModelNotFound.code == 10 and errors.ModelNotFound.exit_status == 66
    e = errors.from_wire(errors.Busy("x", hint="h").to_wire())
    assert isinstance(e, errors.Busy) and e.hint == "h"
    unknown = errors.from_wire({"code": 999, "name": "future", "message": "m"})
    assert type(unknown) is errors.LlmosdError and unknown.code == 999
