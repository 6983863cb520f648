"""Issue 13 follow-up: ``llmctl export`` of a model stored quantized writes a Hugging Face
directory with float32 weights, dequantized exactly (``hf_export.write_float_weights``, numpy),
which transformers loads with our dequantized model's logits.  The float32 file is made in the
daemon's ``<state dir>/exports`` for the client that asked, and removed once downloaded, when
that client goes away, when it asks for another export, or at the daemon's next start."""
from __future__ import annotations

import hashlib
import json
import os
import stat
import time
import types

import pytest
import torch

from llmctl import errors, protocol
from llmosd.formats import hf_export
from llmosd.models import quant
from llmosd.ops.export import ExportOps
from llmosd.ops.store import StoreOps
from llmosd.store.store import Store


def gone(path, timeout=5.0) -> bool:
    """Whether directory ``path`` is empty (or absent) within ``timeout`` s: files are unlinked
    on a short thread, and a dead client is noticed at the next heartbeat."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not os.path.isdir(path) or not os.listdir(path):
            return True
        time.sleep(0.05)
    return False


def quantized_tensors(seed=0) -> dict[str, torch.Tensor]:
    """A stored form with an int4 and an int8 layer, a bf16 norm, an f16 and an f32 tensor."""
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for name, bits in (("model.layers.0.self_attn.q_proj", 4), ("model.embed_tokens", 8)):
        for k, v in quant.quantize(torch.randn(48, 96, generator=g), bits).items():
            sd[f"{name}.{k}"] = v
    sd["model.norm.weight"] = torch.randn(96, generator=g).to(torch.bfloat16)
    sd["model.layers.0.input_layernorm.weight"] = torch.randn(96, generator=g).to(torch.float16)
    sd["lm_head.weight"] = torch.randn(48, 96, generator=g)
    return sd


def want_float(sd) -> dict[str, torch.Tensor]:
    """What the export must hold: ``models.quant.dequantize`` of each layer, floats widened."""
    out = {k: v.float() for k, v in sd.items() if not k.endswith(quant.QSUFFIXES)}
    for path, grp in quant.stored_groups(sd).items():
        out[path + ".weight"] = quant.dequantize(grp["qweight"], grp["scales"], grp.get("mins"))
    return out


def test_i13_export_quant_float_weights_are_quant_dequantize_bit_for_bit(tmp_path):
    from safetensors import safe_open
    from safetensors.torch import save_file
    sd = quantized_tensors()
    save_file(sd, str(tmp_path / "q.safetensors"))
    src = os.open(tmp_path / "q.safetensors", os.O_RDONLY)
    try:
        with open(tmp_path / "f.safetensors", "wb") as out:
            digest, size = hf_export.write_float_weights(src, out)
    finally:
        os.close(src)
    data = (tmp_path / "f.safetensors").read_bytes()
    assert size == len(data) and digest == "sha256:" + hashlib.sha256(data).hexdigest()
    with safe_open(str(tmp_path / "f.safetensors"), "pt") as f:
        assert f.metadata() == {"format": "pt"}                  # transformers requires it
        got = {k: f.get_tensor(k) for k in f.keys()}
    want = want_float(sd)
    assert sorted(got) == sorted(want)
    for k in want:
        assert got[k].dtype == torch.float32 and torch.equal(got[k], want[k]), k
    # a layer whose triple does not fit together is a corrupt store, named
    bad = dict(sd)
    bad["model.layers.0.self_attn.q_proj.mins"] = bad["model.layers.0.self_attn.q_proj.mins"][:, :1].clone()
    save_file(bad, str(tmp_path / "bad.safetensors"))
    src = os.open(tmp_path / "bad.safetensors", os.O_RDONLY)
    try:
        with pytest.raises(errors.StoreCorrupt, match="q_proj"), open(tmp_path / "x", "wb") as out:
            hf_export.write_float_weights(src, out)
    finally:
        os.close(src)


# -- the temporary file's life, in process (the control loop faked) -----------------------------
TOKENIZER_JSON = json.dumps({"model": {"type": "BPE", "vocab": {"<s>": 0, "</s>": 1}}, "added_tokens": []})


def put_quantized_model(store) -> None:
    from safetensors.torch import save
    cfg = {"hidden_size": 96, "max_position_embeddings": 64, "bos_token_id": 0, "eos_token_id": 1}
    bundle = {"tokenizer_json": TOKENIZER_JSON, "bos_token_id": 0, "eos_token_ids": [1]}
    (cd, cs), (td, ts) = (store.put_blob(json.dumps(x).encode()) for x in (cfg, bundle))
    wd, ws = store.put_blob(save(quantized_tensors(), metadata={"format": "pt"}))
    store.write_manifest("q", {"schema": 1, "parameters": 1, "config": {"digest": cd, "size": cs},
                               "tokenizer": {"digest": td, "size": ts, "type": "hf-tokenizers"},
                               "weights": {"digest": wd, "size": ws, "dtype": "float32", "quant": "q4_1+q8_0"}})


class Loop:
    """The bits of ``Server`` the handlers use: post runs at once; known peers; the hooks."""

    def __init__(self):
        self.peers, self.on_peer_gone = {}, []

    def post(self, fn, *args):
        fn(*args)

    def peer(self, ident: bytes):
        p = types.SimpleNamespace(ident=ident, holds=set())
        self.peers[ident] = p
        return p

    def leave(self, peer):
        self.peers.pop(peer.ident)
        for hook in self.on_peer_gone:
            hook(peer)


def call(handler, loop, peer, body):
    replies = []
    ctx = types.SimpleNamespace(body=body, server=loop, peer=peer, ok=lambda b: replies.append(("ok", b)),
                                error=lambda e: replies.append(("error", e)))
    try:
        handler(ctx)
    except errors.LlmosdError as e:
        replies.append(("error", e))
    deadline = time.monotonic() + 30                 # export answers from its thread
    while not replies and time.monotonic() < deadline:
        time.sleep(0.01)
    return replies


def weights_entry(files) -> dict:
    return next(f for f in files if f["name"] == "model.safetensors")


def test_i13_export_quant_temp_file_is_held_for_its_client_and_removed(tmp_path):
    store = Store(str(tmp_path / "state" / "store"))
    put_quantized_model(store)
    exports = tmp_path / "state" / "exports"
    loop, ops = Loop(), ExportOps(store)
    downloads = StoreOps(store, None, None, None, None)
    alice, bob = loop.peer(b"a"), loop.peer(b"b")
    [(kind, body)] = call(ops.op_export, loop, alice, {"model": "q"})
    assert kind == "ok", body
    entry = weights_entry(body["files"])
    assert entry["digest"] != store.get("q")[1]["weights"]["digest"]
    assert json.loads(body["files"][0]["data"])["torch_dtype"] == "float32"
    [f] = os.listdir(exports)                                    # one file, private
    assert stat.S_IMODE(os.lstat(exports).st_mode) == 0o700
    assert stat.S_IMODE(os.lstat(exports / f).st_mode) == 0o600
    assert ops.peer_gone in loop.on_peer_gone and len(alice.holds) == 1
    # only the client it was made for can read it
    [(kind, err)] = call(downloads.op_download, loop, bob, {"digest": entry["digest"], "offset": 0, "size": 10})
    assert kind == "error" and isinstance(err, errors.ModelNotFound)
    # read to the end (in two pieces): then it is gone
    data, offset = b"", 0
    while True:
        [(kind, r)] = call(downloads.op_download, loop, alice,
                           {"digest": entry["digest"], "offset": offset, "size": 1000 if not offset else 1 << 20})
        data, offset = data + r["data"], offset + len(r["data"])
        if offset >= r["total"]:
            break
        assert os.listdir(exports) == [f]
    assert len(data) == entry["size"] and "sha256:" + hashlib.sha256(data).hexdigest() == entry["digest"]
    assert not alice.holds and gone(exports)
    from safetensors.torch import load
    got, want = load(data), want_float(quantized_tensors())
    assert sorted(got) == sorted(want) and all(torch.equal(got[k], want[k]) for k in want)

    # another export by the same client replaces its file; a client that leaves takes its file
    call(ops.op_export, loop, alice, {"model": "q"})
    call(ops.op_export, loop, alice, {"model": "q"})
    assert len(os.listdir(exports)) == 1 and len(alice.holds) == 1
    call(ops.op_export, loop, bob, {"model": "q"})
    assert len(os.listdir(exports)) == 2
    loop.leave(alice)
    loop.leave(bob)
    assert not alice.holds and not bob.holds and gone(exports)

    # a client gone before its file was made gets none (and no reply)
    carol = types.SimpleNamespace(ident=b"c", holds=set())      # not among the loop's peers
    replies = []
    ops.op_export(types.SimpleNamespace(body={"model": "q"}, server=loop, peer=carol, ok=replies.append,
                                        error=replies.append))
    deadline = time.monotonic() + 30
    while ops.building and time.monotonic() < deadline:
        time.sleep(0.01)
    assert ops.building == 0 and replies == [] and not carol.holds and gone(exports)
    # the daemon's next start removes what a crash left
    (exports / "weights-x.safetensors").write_bytes(b"left over")
    ExportOps(store)
    assert os.listdir(exports) == []


def test_i13_export_quant_exports_dir_never_followed(tmp_path):
    store = Store(str(tmp_path / "state" / "store"))
    put_quantized_model(store)
    loop, ops = Loop(), ExportOps(store)
    target = tmp_path / "elsewhere"
    target.mkdir()
    os.symlink(target, tmp_path / "state" / "exports")
    [(kind, err)] = call(ops.op_export, loop, loop.peer(b"a"), {"model": "q"})
    assert kind == "error" and isinstance(err, errors.StoreCorrupt) and "symbolic link" in str(err) and err.hint
    assert os.listdir(target) == []
    ExportOps(store)                                   # the next start removes the link itself
    assert not os.path.lexists(tmp_path / "state" / "exports") and target.is_dir()
    protocol.check_request(protocol.request(1, "download", {"digest": "sha256:" + "0" * 64, "offset": 0,
                                                            "size": 1}))


# -- the real SmolLM2 (Q4_1 GGUF import, kept quantized), end to end ---------------------------
@pytest.fixture(scope="module")
def smol_q(shared_daemon):
    pytest.importorskip("transformers", reason="transformers is the test oracle")
    from test_smollm2 import GGUF
    shared_daemon.cli("import", GGUF, "smollm2-xq", timeout=300)
    yield shared_daemon
    shared_daemon.cli("rm", "smollm2-xq", check=False)


def test_i13_export_quant_smollm2_loads_in_transformers_with_our_logits(smol_q, tmp_path):
    import transformers

    from llmosd.models.loader import load_model
    store = Store(str(smol_q.state / "store"))
    _, man, _ = store.get("smollm2-xq")
    assert man["weights"].get("quant")                                  # stored quantized
    exports = smol_q.state / "exports"
    d = tmp_path / "hf"
    r = json.loads(smol_q.cli("export", "smollm2-xq", str(d), "--json").stdout)
    assert "model.safetensors" in r["files"] and gone(exports)          # downloaded, then removed
    assert json.loads((d / "config.json").read_text())["torch_dtype"] == "float32"
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(d)).eval()
    tok = transformers.AutoTokenizer.from_pretrained(str(d))
    ours, _ = load_model(store, man, torch.device("cpu"), torch.float32, quant="none")
    x = torch.tensor([tok("The capital of France is")["input_ids"]])
    with torch.no_grad():
        torch.testing.assert_close(hf(x).logits, ours(x), atol=1e-4, rtol=1e-4)
    # a client that asks and goes away without downloading leaves nothing behind
    with smol_q.client() as c:
        w = weights_entry(c.hf_files("smollm2-xq")["files"])
        assert len(os.listdir(exports)) == 1
        assert c.download(w["digest"], 0, 16)["total"] == w["size"]
    assert gone(exports, timeout=10)
