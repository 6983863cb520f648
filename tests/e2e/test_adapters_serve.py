"""Issue 11, serving: adapters and classifiers run on their base's loaded instance, the way
forked processes share their parent's pages (acceptance 3), and classify uses a classifier's
head and trained labels.

The store is made in-process before the daemon starts: a tiny base (``train.create``), two LoRA
adapters with random B (so each changes the output) and a head-only classifier, written as a
fine-tuning job would publish them (``AdapterManifest``)."""
from __future__ import annotations

import io
import json
import os
import threading

import pytest
import torch

from conftest import SHAKESPEARE, Daemon
from llmctl import errors

PROMPT = "First Citizen:"
LABELS = ["calm", "angry", "sad"]


def _store(state):
    from llmosd.store.store import Store
    os.makedirs(state / "store", mode=0o700, exist_ok=True)
    os.chmod(state, 0o700)
    return Store(str(state / "store"))


def _adapter_blob(model, seed: int):
    """PEFT-keyed float32 LoRA tensors (rank 4 on q/v/down) with a random B, and their config."""
    from llmosd.models import lora
    cfg = lora.LoraConfig(rank=4, alpha=8.0, targets=("q_proj", "v_proj", "down_proj"))
    lora.add_adapter(model, "x", cfg, seed=seed)
    tensors = lora.adapter_tensors(model, "x")
    lora.remove_adapter(model, "x")
    g = torch.Generator().manual_seed(seed)
    for k in tensors:
        if "lora_B" in k:
            tensors[k] = torch.randn(tensors[k].shape, generator=g) * 0.5
    return tensors, cfg


def build_store(state) -> dict:
    """The tiny base and its adapters/classifier in the store at ``state``; returns what the
    test needs to check: each adapter's tensor bytes, the classifier head."""
    from safetensors.torch import save
    from llmosd.models.loader import load_model
    from llmosd.models.classifier import new_head
    from llmosd.store.manifest import AdapterManifest, Blob, Lineage
    from llmosd.train.create import create
    store = _store(state)
    spec = {"text": SHAKESPEARE.read_text()[:200_000], "layers": 2, "dim": 64, "heads": 4,
            "kv_heads": 2, "vocab_size": 512, "seed": 0}
    store.write_manifest("tiny", create(spec, str(state / "store"), lambda m: None))
    canon, man, digest = store.get("tiny")
    model, _ = load_model(store, man, torch.device("cpu"))
    out = {"bytes": {}}

    def publish(name, **kw):
        am = AdapterManifest(base=man, base_name=canon, base_digest=digest,
                             lineage=Lineage("finetune", canon, {"block_size": 64}), **kw)
        store.write_manifest(name, am.to_dict())
    for name, seed in (("ad1", 1), ("ad2", 2)):
        tensors, cfg = _adapter_blob(model, seed)
        out["bytes"][name] = sum(t.numel() * t.element_size() for t in tensors.values())
        blob = Blob(*store.put_blob(io.BytesIO(save(tensors))))
        publish(name, parameters=sum(t.numel() for t in tensors.values()), adapter=blob,
                lora=cfg.to_dict())
    head = new_head(64, len(LABELS), seed=3) * 100           # big enough to tell inputs apart
    out["head"] = head
    blob = Blob(*store.put_blob(io.BytesIO(save({"score.weight": head.contiguous()}))))
    publish("clf", parameters=head.numel(), head=blob, labels=LABELS)
    return out


@pytest.fixture(scope="module")
def adapters_daemon(tmp_path_factory):
    d = Daemon(tmp_path_factory.mktemp("adapters"))
    d.outlives_test = True
    try:
        made = build_store(d.state)
        d.start()
        yield d, made
    finally:
        d.stop()


def _greedy(c, model, n=16):
    g = c.generate(model, PROMPT, max_tokens=n, temperature=0)
    g.text()
    return [t for ch in g.chunks for t in ch["token_ids"]], g.stats


def test_i11_3_two_adapters_share_one_base_instance(adapters_daemon):
    d, made = adapters_daemon
    with d.client() as c:
        base_alone, _ = _greedy(c, "tiny")
        (inst,) = c.ps()
        base_bytes = inst["resident_bytes"]
        r1 = c.load("ad1")
        assert r1["id"] == inst["id"] and r1["adapter"]["model"] == "ad1:latest"
        assert r1["adapter"]["resident_bytes"] == made["bytes"]["ad1"] and not r1["already_loaded"]
        assert c.load("ad1")["already_loaded"]
        alone = {m: _greedy(c, m)[0] for m in ("ad1", "ad2")}       # ad2 attaches on first use
        rows = c.ps()
        assert len(rows) == 1 and rows[0]["id"] == inst["id"]
        ads = {a["model"]: a for a in rows[0]["adapters"]}
        assert set(ads) == {"ad1:latest", "ad2:latest"}
        assert rows[0]["resident_bytes"] == base_bytes + made["bytes"]["ad1"] + made["bytes"]["ad2"]
        assert ads["ad2:latest"]["resident_bytes"] == made["bytes"]["ad2"]
        assert ads["ad1:latest"]["requests_served"] == 1 and ads["ad1:latest"]["state"] == "ready"
    # the adapters do change the output, each in its own way
    assert alone["ad1"] != base_alone and alone["ad2"] != base_alone and alone["ad1"] != alone["ad2"]

    # concurrent requests, each with its own adapter (or none), give what each gave alone
    results, failures = {}, []

    def worker(model, i):
        try:
            with d.client() as cc:
                results[(model, i)] = _greedy(cc, model)
        except Exception as e:              # reported below, in the test's thread
            failures.append(e)
    threads = [threading.Thread(target=worker, args=(m, i)) for i in range(2) for m in ("ad1", "ad2", "tiny")]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not failures, failures
    want = {"ad1": alone["ad1"], "ad2": alone["ad2"], "tiny": base_alone}
    for (model, _), (ids, stats) in results.items():
        assert ids == want[model], model
        assert stats["model"] == f"{model}:latest" and stats["instance"] == inst["id"]

    # llmctl ps draws the adapters under their base; --json carries them
    out = d.cli("ps").stdout.splitlines()
    i = next(n for n, line in enumerate(out) if "tiny:latest" in line)
    assert {out[i + 1].split()[0], out[i + 2].split()[0]} == {"`-"}
    assert {out[i + 1].split()[1], out[i + 2].split()[1]} == {"ad1:latest", "ad2:latest"}
    assert len(json.loads(d.cli("ps", "--json").stdout)["instances"][0]["adapters"]) == 2

    # unload ADAPTER detaches it; the base and the other adapter stay
    r = d.cli("unload", "ad1")
    assert "unloaded ad1:latest from instance" in r.stdout
    with d.client() as c:
        (row,) = c.ps()
        assert [a["model"] for a in row["adapters"]] == ["ad2:latest"]
        assert row["resident_bytes"] == base_bytes + made["bytes"]["ad2"]
        assert _greedy(c, "tiny")[0] == base_alone
        assert c.unload("tiny")["unloaded"] == [inst["id"]]     # the base takes its adapters along
        assert c.ps() == []


def test_i11_4_classify_uses_a_classifiers_head_and_trained_labels(adapters_daemon):
    from llmosd.models.classifier import head_logits
    from llmosd.models.loader import load_model
    from llmosd.store.store import Store
    d, made = adapters_daemon
    texts = ["What say you?", "Speak, speak.", "We are accounted poor citizens"]
    with d.client() as c:
        got = c.classify("clf", texts)
        assert [sorted(r["scores"]) for r in got] == [sorted(LABELS)] * 3
        again = c.classify("clf", texts, ["sad", "calm", "angry"])     # the same labels, any order
        assert [r["label"] for r in again] == [r["label"] for r in got]
        with pytest.raises(errors.InvalidArgument, match="trained on the labels calm, angry, sad"):
            c.classify("clf", texts, ["yes", "no"])
        with pytest.raises(errors.InvalidArgument, match="no classification head: give --labels"):
            c.classify("tiny", texts)
        (row,) = [i for i in c.ps() if i["model"] == "tiny:latest"]
        assert [a["kind"] for a in row["adapters"]] == ["classifier"]
    # the scores are the head's logits on the last token's normed hidden state
    store = Store(str(d.state / "store"))
    model, tok = load_model(store, store.get("tiny")[1], torch.device("cpu"))
    with torch.no_grad():
        for text, r in zip(texts, got):
            want = head_logits(model, made["head"], [tok.encode(text)], torch.device("cpu"))[0]
            assert [r["scores"][lab] for lab in LABELS] == pytest.approx(want.tolist(), abs=1e-4)
            assert r["label"] == LABELS[int(want.argmax())]
            assert sum(r["probs"].values()) == pytest.approx(1.0)
    r = d.cli("classify", "clf", texts[0])
    assert r.stdout.split("\t")[0] == got[0]["label"]


def test_i11_review_4_a_second_tag_of_a_loaded_adapter_is_unloaded_and_named(adapters_daemon):
    d, _ = adapters_daemon
    with d.client() as c:
        c.tag("ad1", "ad1b")
        try:
            c.load("ad1")
            r = c.load("ad1b")                          # the same adapter: already attached
            assert r["already_loaded"] and r["adapter"]["model"] == "ad1b:latest"
            assert _greedy(c, "ad1b", n=4)[1]["model"] == "ad1b:latest"
            assert _greedy(c, "ad1", n=4)[1]["model"] == "ad1:latest"
            got = c.unload("ad1b")
            assert got["detached"] == [r["id"]] and got["unloaded"] == []
            (row,) = [i for i in c.ps() if i["id"] == r["id"]]
            assert "ad1:latest" not in [a["model"] for a in row["adapters"]]
        finally:
            c.unload("tiny", force=True)
