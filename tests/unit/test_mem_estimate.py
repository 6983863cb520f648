"""Issue 12 (acceptance 4): memory estimates (llmosd/mem/estimate.py, torch-free) against the
bytes a loaded model's tensors really hold (models.loader.resident_bytes), for a created model,
an imported Hugging Face model and an adapter; and the estimator's correction."""
from __future__ import annotations

import io
import json

import pytest
import torch
from safetensors.torch import save

from conftest import train_bpe
from llmosd.mem.estimate import Estimator, estimate_instance, estimate_job, parameter_count
from llmosd.models import lora
from llmosd.models.llama import Llama, LlamaConfig
from llmosd.models.loader import load_model, resident_bytes
from llmosd.store.store import Store

DTYPE_BYTES = {torch.float32: 4, torch.bfloat16: 2}


@pytest.fixture(scope="module")
def tokenizer_json():
    return train_bpe(300).to_str().encode()


def tiny(tied=False, seed=0) -> Llama:
    cfg = LlamaConfig(vocab_size=300, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                      tie_word_embeddings=tied)
    m = Llama(cfg)
    m.init_weights(seed=seed)
    return m


def put(store, data: bytes) -> dict:
    d, n = store.put_blob(io.BytesIO(data))
    return {"digest": d, "size": n}


def created_manifest(store, model, tok) -> dict:
    """What the create job publishes (parameters = param_count), blobs in ``store``."""
    return {"schema": 1, "architecture": "llama", "parameters": model.param_count(),
            "config": put(store, json.dumps(model.config.to_dict()).encode()),
            "tokenizer": {**put(store, json.dumps({"tokenizer_json": tok.decode()}).encode()),
                          "type": "hf-tokenizers", "vocab_size": 300},
            "weights": {**put(store, save(model.state_dict_for_save())), "format": "safetensors",
                        "dtype": "float32"}}


def within(estimate, measured, tol=0.10):
    assert abs(estimate - measured) <= tol * measured, (estimate, measured)


@pytest.mark.parametrize("tied", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_i12_4_created_model_estimate_within_10_percent(tmp_path, tokenizer_json, tied, dtype):
    store = Store(str(tmp_path / "store"))
    man = created_manifest(store, tiny(tied), tokenizer_json)
    model, _ = load_model(store, man, torch.device("cpu"), dtype)
    measured = resident_bytes(model)
    within(estimate_instance(man, DTYPE_BYTES[dtype]), measured)
    cfg = model.config.to_dict()
    assert estimate_instance(man, DTYPE_BYTES[dtype], cfg) == measured     # exact with the config
    assert parameter_count(cfg) == model.param_count()


@pytest.mark.parametrize("import_dtype", ["auto", "bfloat16"])
def test_i12_4_imported_hf_model_estimate_within_10_percent(tmp_path, tokenizer_json, import_dtype):
    from llmosd.formats.importer import import_model
    store = Store(str(tmp_path / "store"))
    m = tiny(tied=True, seed=3)
    cfg = m.config.to_dict()
    files = {"config.json": put(store, json.dumps(cfg).encode())["digest"],
             "model.safetensors": put(store, save(m.state_dict_for_save()))["digest"],
             "tokenizer.json": put(store, tokenizer_json)["digest"]}
    man = import_model({"files": files, "format": "hf", "dtype": import_dtype}, store.root, lambda _: None)
    for dtype in (torch.float32, torch.bfloat16):
        model, _ = load_model(store, man, torch.device("cpu"), dtype)
        within(estimate_instance(man, DTYPE_BYTES[dtype]), resident_bytes(model))


@pytest.mark.parametrize("targets", [("q_proj", "v_proj"), lora.TARGETS])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_i12_4_adapter_estimate_within_10_percent(targets, dtype):
    model = tiny().to(dtype)
    before = resident_bytes(model)
    cfg = lora.LoraConfig(rank=4, alpha=8.0, targets=targets)
    lora.add_adapter(model, "a", cfg, seed=1)
    n = sum(p.numel() for p in lora.adapter_parameters(model, "a"))
    man = {"kind": "adapter", "parameters": n, "base": {"model": "tiny:latest"}}
    within(estimate_instance(man, DTYPE_BYTES[dtype]), resident_bytes(model) - before)
    spec = {"method": "lora", "rank": 4, "targets": list(targets), "batch_size": 1, "block_size": 16}
    assert estimate_job(model.config.to_dict(), spec) > estimate_job(model.config.to_dict(), spec, trainable=0)


def test_i12_4_job_estimate_counts_optimizer_and_activations():
    cfg = tiny().config.to_dict()
    p = parameter_count(cfg)
    full = {"method": "full", "batch_size": 4, "block_size": 64}
    base = estimate_job(cfg, full, trainable=0)
    assert estimate_job(cfg, full) - base == p * 4 * 3       # grads + two AdamW states, float32
    assert estimate_job(cfg, {**full, "batch_size": 8}) > estimate_job(cfg, full)
    lo = {"method": "lora", "rank": 8, "targets": "all-linear", "batch_size": 4, "block_size": 64}
    assert estimate_job(cfg, lo) < estimate_job(cfg, full)
    head = {"method": "classify", "head_only": True, "labels": ["a", "b"], "batch_size": 4, "block_size": 64}
    assert estimate_job(cfg, head) < estimate_job(cfg, lo)


def test_i12_4_estimator_learns_a_ratio_per_key():
    e = Estimator(alpha=0.5)
    k, other = ("instance", "float32"), ("instance", "bfloat16")
    assert e.correct(k, 1000) == 1000                         # nothing learned yet
    e.learn(k, 1000, 1200)
    assert e.correct(k, 2000) == 2400 and e.correct(other, 2000) == 2000
    e.learn(k, 1000, 1000)                                    # exponential average of 1.2 and 1.0
    assert e.correct(k, 1000) == 1100
    e.learn(k, 0, 500)                                        # teaches nothing
    e.learn(k, 1000, -1)
    assert e.correct(k, 1000) == 1100
    e.learn(other, 1, 10 ** 9)                                # absurd: clamped
    assert e.correct(other, 1000) == 8000
    e.learn_oom(k, 1000, free=3000)                           # it did not fit in 3000
    assert e.correct(k, 1000) > 3000
