"""Issue 9: one typed builder (``store/manifest.py``) makes every manifest; its JSON is exactly
what create and import wrote before it (stores written then still load), lineage included."""
from __future__ import annotations

import json

import pytest

from conftest import SHAKESPEARE, train_bpe
from llmosd.store.manifest import Blob, Lineage, Manifest, Serving, import_sources
from llmosd.store.store import Store

C, T, W = Blob("sha256:" + "c" * 64, 10), Blob("sha256:" + "d" * 64, 20), Blob("sha256:" + "e" * 64, 30)


def old_create(created, params, cfg, tok, w, vocab, args) -> dict:
    """The manifest ``create`` built by hand before the builder (copied from it)."""
    return {
        "schema": 1, "architecture": "llama", "created": created,
        "parameters": params,
        "config": {"digest": cfg.digest, "size": cfg.size, "media": "application/json"},
        "tokenizer": {"digest": tok.digest, "size": tok.size, "type": "sentencepiece",
                      "vocab_size": vocab},
        "weights": {"digest": w.digest, "size": w.size, "format": "safetensors", "dtype": "float32"},
        "lineage": {"parent": None, "method": "create", "args": args},
    }


def old_import(created, params, cfg, tok, w, kind, vocab, add_bos, dtypes, template, defaults,
               fmt, files: dict, dtype) -> dict:
    """The manifest the import worker built by hand, with what ops added to its lineage."""
    return {
        "schema": 1, "architecture": "llama", "created": created,
        "parameters": params,
        "config": {"digest": cfg.digest, "size": cfg.size, "media": "application/json"},
        "tokenizer": {"digest": tok.digest, "size": tok.size, "type": kind,
                      "vocab_size": vocab, "add_bos": add_bos},
        "weights": {"digest": w.digest, "size": w.size, "format": "safetensors", "dtype": dtypes},
        "chat_template": template,
        "defaults": defaults,
        "lineage": {"parent": None, "method": "import",
                    "args": {"format": fmt, "files": sorted(files), "sources": dict(files), "dtype": dtype}},
    }


def test_i9_3_builder_writes_todays_json():
    args = {"layers": 2, "dim": 64, "text_chars": 5}
    made = Manifest(parameters=7, config=C, tokenizer=T, tokenizer_type="sentencepiece", vocab_size=300,
                    weights=W, weights_dtype="float32", lineage=Lineage("create", args=args),
                    created="2025-01-02T03:04:05Z").to_dict()
    assert made == old_create("2025-01-02T03:04:05Z", 7, C, T, W, 300, args)
    files = {"config.json": "sha256:" + "1" * 64, "model.safetensors": "sha256:" + "2" * 64}
    made = Manifest(parameters=9, config=C, tokenizer=T, tokenizer_type="hf-tokenizers", vocab_size=400,
                    weights=W, weights_dtype="bfloat16,float32", add_bos=False,
                    serving=Serving(None, {"temperature": 0.7}), created="2025-01-02T03:04:05Z",
                    lineage=Lineage("import", args={"format": "hf", "files": sorted(files), "dtype": "auto"},
                                    sources=files)).to_dict()
    assert made == old_import("2025-01-02T03:04:05Z", 9, C, T, W, "hf-tokenizers", 400, False,
                              "bfloat16,float32", None, {"temperature": 0.7}, "hf", files, "auto")
    assert import_sources(made) == files and Lineage.of(made).method == "import"
    assert import_sources(old_create("x", 1, C, T, W, 3, {})) == {}
    assert Lineage.of({}) == Lineage("")                     # odd or old manifests: what they have


def test_i9_3_create_job_manifest_is_unchanged(tmp_path):
    from llmosd.train.create import create
    spec = {"layers": 1, "dim": 32, "heads": 4, "kv_heads": 2, "vocab_size": 400, "seed": 3,
            "text": SHAKESPEARE.read_text()[:20_000]}
    man = create(spec, str(tmp_path), lambda p: None)
    blob = {k: Blob(man[k]["digest"], man[k]["size"]) for k in ("config", "tokenizer", "weights")}
    args = {k: spec.get(k) for k in ("layers", "dim", "heads", "kv_heads", "vocab_size", "seed",
                                     "hidden_dim", "context", "rope_theta", "tie_embeddings")}
    args["text_chars"] = len(spec["text"])
    vocab = json.loads(Store(str(tmp_path)).read_blob(blob["config"].digest))["vocab_size"]
    assert man == old_create(man["created"], man["parameters"], blob["config"], blob["tokenizer"],
                             blob["weights"], vocab, args)


@pytest.mark.parametrize("dtype", [None, "bfloat16"])
def test_i9_3_import_job_manifest_is_unchanged(tmp_path, dtype):
    from safetensors.numpy import save as save_np

    from llmosd.formats.importer import import_model
    from llmosd.models.llama import Llama, LlamaConfig
    store = Store(str(tmp_path))
    bpe = train_bpe()
    cfg = LlamaConfig(vocab_size=bpe.get_vocab_size(), hidden_size=32, intermediate_size=48,
                      num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=64)
    model = Llama(cfg)
    model.init_weights(seed=0)
    raw = {"config.json": json.dumps({"model_type": "llama", **cfg.to_dict()}).encode(),
           "tokenizer.json": bpe.to_str().encode(),
           "tokenizer_config.json": json.dumps({"chat_template": "{{ messages }}"}).encode(),
           "generation_config.json": json.dumps({"temperature": 0.6, "top_p": 0.9}).encode(),
           "model.safetensors": save_np({k: v.numpy() for k, v in model.state_dict_for_save().items()})}
    files = {name: store.put_blob(data)[0] for name, data in raw.items()}
    man = import_model({"files": files, "format": "hf", "dtype": dtype}, str(tmp_path), lambda p: None)
    blob = {k: Blob(man[k]["digest"], man[k]["size"]) for k in ("config", "tokenizer", "weights")}
    assert man == old_import(man["created"], man["parameters"], blob["config"], blob["tokenizer"],
                             blob["weights"], "hf-tokenizers", cfg.vocab_size, man["tokenizer"]["add_bos"],
                             "bfloat16" if dtype else "float32", "{{ messages }}",
                             {"temperature": 0.6, "top_p": 0.9}, "hf", files, dtype or "auto")
