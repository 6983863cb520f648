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
    ({"v": 1, "id": 1, "type": "classify", "body": {"model": "m", "inputs": ["a"], "labels": "a"}},
     errors.InvalidArgument, "labels"),       # optional since 1.6 (classifiers), still typed
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


def _man_entries() -> dict[str, str]:
    """{message type: its entry in llmosd-protocol(7)} (the .B line and its paragraph)."""
    import re
    from pathlib import Path
    page = (Path(__file__).resolve().parents[2] / "man" / "llmosd-protocol.7").read_text()
    out = {}
    for block in page.split("\n.TP\n")[1:]:
        head, _, text = block.partition("\n")
        for name in re.findall(r"(?:^\.B |, )([a-z_]+) \{", head):
            out[name] = head + "\n" + text.split("\n.SH ")[0]
    return out


def test_i11_every_message_and_field_is_documented():
    """Each message type of SCHEMAS has its entry in the man page naming each of its fields
    (chat's sampling fields are generate's, which the entry says)."""
    import re
    entries = _man_entries()
    missing = []
    for mtype, fields in protocol.SCHEMAS.items():
        text = entries.get(mtype)
        if text is None:
            missing.append(mtype)
            continue
        for f in fields:
            shared = mtype == "chat" and f in protocol._GEN and "sampling fields" in text
            if not shared and not re.search(rf"\b{f}\b", text):
                missing.append(f"{mtype}.{f}")
    assert not missing, f"not documented in man/llmosd-protocol.7: {missing}"


def test_i11_protocol_1_6_fine_tuning_messages():
    for body in ({"base": "b", "name": "n", "data": {"a.jsonl": "sha256:x"}, "spec": {}},
                 {"base": "b", "name": "n", "data": {}, "val_data": {"v.jsonl": "d"}, "spec": {"method": "lora"},
                  "priority": 3, "force": True}):
        protocol.check_request(protocol.request(1, "finetune", body))
    protocol.check_request(protocol.request(1, "eval", {"model": "m", "data": {"a.jsonl": "d"}}))
    protocol.check_request(protocol.request(1, "merge", {"adapter": "a", "name": "m", "force": True}))
    protocol.check_request(protocol.request(1, "import", {"name": "a", "files": {}, "format": "peft",
                                                          "base": "b"}))
    protocol.check_request(protocol.request(1, "rm", {"model": "m", "force": True}))
    protocol.check_request(protocol.request(1, "classify", {"model": "m", "inputs": ["x"]}))
    with pytest.raises(errors.InvalidArgument, match="needs the field 'base'"):
        protocol.check_request(protocol.request(1, "finetune", {"name": "n", "data": {}, "spec": {}}))
    assert protocol.MINOR >= 6 and {"finetune", "eval", "merge"} <= set(protocol.JOB_KINDS)
    assert {"eval", "merge"} <= protocol.STREAMING and "finetune" not in protocol.STREAMING


def test_i12_protocol_1_7_memory_fields():
    """Minor 7: load's keep_alive/priority/pin, keep_alive on every request that runs a model,
    pin/unpin, train/finetune preemptible; each typed and ranged."""
    assert protocol.MINOR >= 7
    for mtype, body in (("load", {"model": "m", "keep_alive": 300.0, "priority": -3, "pin": True}),
                        ("load", {"model": "m", "keep_alive": -1}),
                        ("generate", {"model": "m", "prompt": "p", "keep_alive": 0}),
                        ("chat", {"model": "m", "messages": [], "keep_alive": 2.5}),
                        ("score", {"model": "m", "text": "t", "keep_alive": 60}),
                        ("embed", {"model": "m", "inputs": ["a"], "keep_alive": 60}),
                        ("classify", {"model": "m", "inputs": ["a"], "keep_alive": 60}),
                        ("pin", {"target": "m"}), ("unpin", {"target": "3"}),
                        ("train", {"name": "n", "data": {}, "spec": {}, "preemptible": True}),
                        ("finetune", {"base": "b", "name": "n", "data": {}, "spec": {}, "preemptible": False})):
        protocol.check_request(protocol.request(1, mtype, body))
    for mtype, body, needle in (("load", {"model": "m", "keep_alive": -2}, "keep_alive"),
                                ("load", {"model": "m", "keep_alive": "5m"}, "keep_alive"),
                                ("load", {"model": "m", "priority": 1001}, "priority"),
                                ("load", {"model": "m", "pin": 1}, "pin"),
                                ("generate", {"model": "m", "prompt": "p", "keep_alive": 1e12}, "keep_alive"),
                                ("pin", {}, "target"),
                                ("train", {"name": "n", "data": {}, "spec": {}, "preemptible": "yes"},
                                 "preemptible")):
        with pytest.raises(errors.InvalidArgument, match=needle):
            protocol.check_request(protocol.request(1, mtype, body))
