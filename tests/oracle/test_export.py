"""export: a stored model written as a Hugging Face directory that transformers loads as it is.

The daemon makes the files (``formats.hf_export`` through ``ops.export``); llmctl writes them
(``llmctl.export``).  The round trips use transformers as the oracle."""
import json
import threading
import types

import pytest

from llmctl import errors, protocol
from llmctl.export import export_model
from llmosd.ops.export import ExportOps
from llmosd.store.store import Store


def oracle():
    return pytest.importorskip("transformers", reason="transformers is the test oracle (pip install transformers)")


def test_export_sentencepiece_model_round_trips(shared_daemon, tmp_path):
    transformers = oracle()
    import sentencepiece as spm
    import torch
    d = tmp_path / "tiny-hf"
    r = json.loads(shared_daemon.cli("export", "tiny", str(d), "--json").stdout)
    assert "tokenizer.model" in r["files"]
    assert not [p.name for p in d.iterdir() if p.name.startswith(".")]      # no temp files left
    hf = transformers.LlamaForCausalLM.from_pretrained(str(d)).eval()
    from llmosd.models.loader import load_model
    store = Store(str(shared_daemon.state / "store"))
    _, man, _ = store.get("tiny")
    ours, tok = load_model(store, man, torch.device("cpu"))
    x = torch.tensor([tok.encode("ROMEO: hark")])
    with torch.no_grad():
        torch.testing.assert_close(hf(x).logits, ours(x), atol=1e-4, rtol=1e-4)
    sp = spm.SentencePieceProcessor(model_file=str(d / "tokenizer.model"))
    assert [sp.bos_id()] + sp.encode("ROMEO: hark") == tok.encode("ROMEO: hark")
    tcfg = json.loads((d / "tokenizer_config.json").read_text())
    assert tcfg["bos_token"] == "<s>" and tcfg["add_bos_token"] is True
    # importing the export gives back the very same weights
    shared_daemon.cli("import", str(d), "tiny-rt")
    a, b = (json.loads(shared_daemon.cli("show", m, "--json").stdout)["manifest"] for m in ("tiny", "tiny-rt"))
    assert a["weights"]["digest"] == b["weights"]["digest"]
    assert a["tokenizer"]["digest"] == b["tokenizer"]["digest"]
    shared_daemon.cli("rm", "tiny-rt")


def test_export_refuses_a_file_and_unknown_models(shared_daemon, tmp_path):
    f = tmp_path / "file"
    f.write_text("x")
    r = shared_daemon.cli("export", "tiny", str(f), check=False)
    assert r.returncode != 0
    r = shared_daemon.cli("export", "nosuch", str(tmp_path / "x"), check=False)
    assert r.returncode == 66 and not (tmp_path / "x").exists()


# -- issue 9: the daemon makes the files, llmctl writes them -----------------------------
TOKENIZER_JSON = json.dumps({"model": {"type": "BPE", "vocab": {"<s>": 0, "</s>": 1, "a": 2}},
                             "added_tokens": [{"id": 3, "content": "<|im_end|>"}]})


def put_hf_model(store, *, tok_type="hf-tokenizers", rope_scaling=None):
    """A stored model with an hf-tokenizers bundle, greedy defaults and a chat template."""
    cfg = {"hidden_size": 8, "max_position_embeddings": 64, "bos_token_id": 0, "eos_token_id": 3,
           "rope_scaling": rope_scaling}
    bundle = {"tokenizer_json": TOKENIZER_JSON, "bos_token_id": 0, "eos_token_ids": [3],
              "add_bos_token": True, "chat_template": "from the bundle"}
    blobs = [store.put_blob(json.dumps(x).encode()) for x in (cfg, bundle)] + [store.put_blob(b"weights")]
    (cd, cs), (td, ts), (wd, ws) = blobs
    store.write_manifest("m", {"schema": 1, "parameters": 1, "chat_template": "{{ messages }}",
                               "defaults": {"temperature": 0, "top_k": 5, "seed": 7},
                               "config": {"digest": cd, "size": cs},
                               "tokenizer": {"digest": td, "size": ts, "type": tok_type},
                               "weights": {"digest": wd, "size": ws, "dtype": "bfloat16"}})
    return wd


def export_call(store, body):
    """Run op_export as the control loop would; returns ("ok"|"error", body)."""
    done, replies = threading.Event(), []

    def post(fn, *args):                          # the loop: run it and note the reply
        fn(*args)
        done.set()
    ctx = types.SimpleNamespace(body=body, server=types.SimpleNamespace(post=post),
                                ok=lambda b: replies.append(("ok", b)),
                                error=lambda e: replies.append(("error", e)))
    ExportOps(store).op_export(ctx)
    assert done.wait(30)
    return replies[0]


def test_i9_export_files_are_made_by_the_daemon(tmp_path):
    store = Store(str(tmp_path))
    weights = put_hf_model(store)
    kind, body = export_call(store, {"model": "m"})
    assert kind == "ok" and body["model"] == "m:latest" and body["digest"] == store.get("m")[2]
    files = body["files"]
    assert [f["name"] for f in files] == ["config.json", "model.safetensors", "tokenizer.json",
                                          "tokenizer_config.json", "generation_config.json"]
    data = {f["name"]: f["data"] for f in files if "data" in f}
    assert files[1] == {"name": "model.safetensors", "digest": weights, "size": 7}
    assert data["tokenizer.json"] == TOKENIZER_JSON.encode()
    cfg = json.loads(data["config.json"])
    assert cfg["architectures"] == ["LlamaForCausalLM"] and cfg["torch_dtype"] == "bfloat16"
    assert "rope_scaling" not in cfg                                   # None fields are left out
    tcfg = json.loads(data["tokenizer_config.json"])
    assert tcfg == {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>",
                    "eos_token": "<|im_end|>", "add_bos_token": True,
                    "chat_template": "{{ messages }}", "model_max_length": 64}
    gen = json.loads(data["generation_config.json"])
    assert gen == {"bos_token_id": 0, "eos_token_id": 3, "top_k": 5, "do_sample": False}
    # the message is part of the protocol: its body is checked like every other
    protocol.check_request(protocol.request(1, "export", {"model": "m"}))
    with pytest.raises(errors.InvalidArgument):
        protocol.check_request(protocol.request(1, "export", {"model": 5}))


def test_i9_export_refusals_come_from_the_daemon(tmp_path):
    store = Store(str(tmp_path))
    put_hf_model(store)
    with pytest.raises(errors.ModelNotFound) as e:            # on the loop, with a hint
        ExportOps(store).op_export(types.SimpleNamespace(body={"model": "n"}))
    assert "did you mean m?" in e.value.hint
    store = Store(str(tmp_path / "odd"))
    put_hf_model(store, tok_type="tiktoken")
    kind, err = export_call(store, {"model": "m"})
    assert kind == "error" and isinstance(err, errors.InvalidArgument) and "tiktoken" in str(err)
    store = Store(str(tmp_path / "rope"))
    put_hf_model(store, rope_scaling={"rope_type": "factors"})
    kind, err = export_call(store, {"model": "m"})
    assert kind == "error" and isinstance(err, errors.InvalidArgument) and "rope_freqs" in str(err)


class FakeClient:
    """hf_files and download as a daemon would answer them."""

    def __init__(self, files, blobs):
        self.files, self.blobs = files, blobs

    def hf_files(self, model):
        return {"model": model + ":latest", "digest": "sha256:" + "0" * 64, "files": self.files}

    def download(self, digest, offset, size=3):
        return {"data": self.blobs[digest][offset:offset + size], "total": len(self.blobs[digest])}


def test_i9_export_client_writes_what_the_daemon_sends(tmp_path):
    import hashlib
    blob = b"safetensors bytes"
    digest = "sha256:" + hashlib.sha256(blob).hexdigest()
    c = FakeClient([{"name": "config.json", "data": b"{}\n"},
                    {"name": "model.safetensors", "digest": digest, "size": len(blob)}], {digest: blob})
    seen = []
    r = export_model(c, "m", str(tmp_path / "out"), progress=seen.append)
    assert r["files"] == ["config.json", "model.safetensors"] and r["model"] == "m:latest"
    assert (tmp_path / "out" / "model.safetensors").read_bytes() == blob
    assert (tmp_path / "out" / "config.json").read_bytes() == b"{}\n"
    assert seen[-1] == {"file": "model.safetensors", "sent": len(blob), "size": len(blob)}
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["config.json", "model.safetensors"]
    for bad in ("../x", ".hidden", "a/b"):                     # a name never leaves the directory
        c.files = [{"name": bad, "data": b"x"}]
        with pytest.raises(errors.StoreCorrupt):
            export_model(c, "m", str(tmp_path / "bad"), force=True)
    assert not (tmp_path / "x").exists() and list((tmp_path / "bad").iterdir()) == []


def test_i9_export_hf_tokenizers_model_round_trips(shared_daemon, tmp_path):
    transformers = oracle()
    from conftest import train_bpe
    src = tmp_path / "src"
    src.mkdir()
    tk = train_bpe()
    tk.save(str(src / "tokenizer.json"))
    (src / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<|im_start|>",
                                                           "eos_token": "<|im_end|>"}))
    cfg = transformers.LlamaConfig(vocab_size=tk.get_vocab_size(), hidden_size=32, intermediate_size=64,
                                   num_hidden_layers=1, num_attention_heads=2,
                                   max_position_embeddings=64, bos_token_id=1, eos_token_id=2)
    transformers.LlamaForCausalLM(cfg).save_pretrained(src, safe_serialization=True)
    shared_daemon.cli("import", str(src), "bpe-x", "--force")
    try:
        out = tmp_path / "out"
        r = json.loads(shared_daemon.cli("export", "bpe-x", str(out), "--json").stdout)
        assert r["files"] == ["config.json", "model.safetensors", "tokenizer.json",
                              "tokenizer_config.json", "generation_config.json"]
        hf_tok = transformers.AutoTokenizer.from_pretrained(str(out))
        assert hf_tok.eos_token == "<|im_end|>"
        assert hf_tok("To be, or not")["input_ids"] == tk.encode("To be, or not").ids
        assert (out / "tokenizer.json").read_text() == (src / "tokenizer.json").read_text()
    finally:
        shared_daemon.cli("rm", "bpe-x", check=False)
