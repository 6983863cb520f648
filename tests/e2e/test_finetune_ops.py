"""Issue 11, the daemon's side through the client and a real daemon: adapters and classifiers
in ls (kind, base, own size), rm of a base refused unless --force removes its dependents too,
export of an adapter as PEFT and refusal of a classifier, an adapter whose base is gone; a
finetune job resumed after kill -9 of the daemon, an eval job failed by it."""
from __future__ import annotations

import json
import time

import pytest

from conftest import SHAKESPEARE, TINY, Daemon
from llmctl import errors
from llmosd.store.manifest import AdapterManifest, Blob, Lineage
from llmosd.store.store import Store

FINISHED = ("succeeded", "failed", "cancelled")


def put_model(store: Store, name: str, seed: bytes = b"m") -> dict:
    """A hand-written full model (its blobs are placeholders: nothing here loads it)."""
    cfg = store.put_blob(json.dumps({"max_position_embeddings": 64, "seed": seed.decode()}).encode())
    tok, w = store.put_blob(b"tok" + seed), store.put_blob(b"weights" + seed * 10)
    man = {"schema": 1, "architecture": "llama", "parameters": 100,
           "config": {"digest": cfg[0], "size": cfg[1], "media": "application/json"},
           "tokenizer": {"digest": tok[0], "size": tok[1], "type": "sentencepiece", "vocab_size": 10},
           "weights": {"digest": w[0], "size": w[1], "format": "safetensors", "dtype": "float32"},
           "lineage": {"method": "create", "parent": None, "args": {}}}
    store.write_manifest(name, man)
    return man


def put_adapter(store: Store, name: str, base: str, classifier: bool = False) -> dict:
    bcanon, bman, bdigest = store.get(base)
    blob = Blob(*store.put_blob(b"lora of " + name.encode()))
    kw = ({"head": blob, "labels": ["neg", "pos"]} if classifier else
          {"adapter": blob, "lora": {"rank": 2, "alpha": 4, "targets": ["q_proj", "v_proj"]}})
    man = AdapterManifest(base=bman, base_name=bcanon, base_digest=bdigest,
                          lineage=Lineage("finetune", bcanon), parameters=8, **kw).to_dict()
    store.write_manifest(name, man)
    return man


@pytest.fixture
def stocked(tmp_path):
    """A daemon whose store holds base (with adapter ad and classifier cls), other, and an
    adapter orphan whose base is gone."""
    d = Daemon(tmp_path / "d")
    store = Store(str(d.state / "store"))
    mans = {"base": put_model(store, "base"), "other": put_model(store, "other", b"o")}
    mans["ad"] = put_adapter(store, "ad", "base")
    mans["cls"] = put_adapter(store, "cls", "base", classifier=True)
    put_model(store, "gone", b"g")
    mans["orphan"] = put_adapter(store, "orphan", "gone")
    store.remove("gone")
    try:
        d.start()
        yield d, mans
    finally:
        d.stop()


def test_i11_ls_rm_force_export_through_the_daemon(stocked, tmp_path):
    d, mans = stocked
    with d.client() as c:
        rows = {r["model"]: r for r in c.ls()}
        assert (rows["base:latest"]["kind"], rows["base:latest"]["base"]) == ("model", None)
        assert (rows["ad:latest"]["kind"], rows["ad:latest"]["base"]) == ("adapter", "base:latest")
        assert (rows["cls:latest"]["kind"], rows["cls:latest"]["base"]) == ("classifier", "base:latest")
        assert rows["ad:latest"]["size"] == mans["ad"]["adapter"]["size"]

        # export: an adapter as a PEFT directory; a classifier refused
        r = c.hf_files("ad")
        assert r["kind"] == "adapter"
        assert [f["name"] for f in r["files"]] == ["adapter_config.json", "adapter_model.safetensors"]
        assert r["files"][1]["digest"] == mans["ad"]["adapter"]["digest"]
        assert json.loads(r["files"][0]["data"])["base_model_name_or_path"] == "base:latest"
        with pytest.raises(errors.InvalidArgument, match="cls:latest is a classifier"):
            c.hf_files("cls")

        # an adapter whose base is gone: merge (and load) say so
        with pytest.raises(errors.ModelNotFound, match="the base model gone:latest of orphan:latest is gone"):
            c.merge("orphan", "merged")

        # rm of the base: refused naming its dependents, nothing removed; --force removes them too
        with pytest.raises(errors.InvalidArgument, match="ad:latest, cls:latest") as e:
            c.rm("base")
        assert "--force" in e.value.hint and {r["model"] for r in c.ls()} >= {"base:latest", "ad:latest"}
        r = c.rm("base", force=True)
        assert r["model"] == "base:latest" and r["removed"] == ["ad:latest", "cls:latest"]
        assert r["freed_bytes"] == sum(mans["base"][k]["size"] for k in ("config", "tokenizer", "weights")) \
            + mans["ad"]["adapter"]["size"] + mans["cls"]["head"]["size"]
        assert sorted(r["model"] for r in c.ls()) == ["orphan:latest", "other:latest"]
        assert "removed" not in c.rm("other")              # nothing else went with it


def wait_row(d: Daemon, job_id: int, cond, timeout: float = 120.0) -> dict:
    """Poll the job's row (a fresh connection each time: the daemon may restart)."""
    deadline = time.monotonic() + timeout
    while True:
        with d.client() as c:
            r = c.job(job_id)["job"]
        if cond(r) or time.monotonic() > deadline:
            return r
        time.sleep(0.2)


def test_i11_finetune_job_resumes_after_kill9(tmp_path):
    pytest.importorskip("llmosd.train.finetune")
    d = Daemon(tmp_path / "d")
    data = tmp_path / "qa.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"w{i}=", "completion": f"{i * 7 % 10}"}) + "\n"
                            for i in range(40)))
    spec = {"method": "lora", "rank": 4, "max_steps": 200, "eval_every": 100, "checkpoint_every": 5,
            "batch_size": 4, "block_size": 16, "device": "cpu", "seed": 1, "warmup": 0, "eval_samples": 2}
    try:
        d.start()
        d.cli("create", "base", *TINY, "--context", "64", "--vocab-from", str(SHAKESPEARE), "--seed", "1")
        with d.client() as c:
            job = c.finetune("base", "ft", [str(data)], spec)
        assert job["kind"] == "finetune"
        first = wait_row(d, job["job_id"], lambda r: (r["checkpoint_step"] or 0) >= 5)["checkpoint_step"]
        assert first and first < 200, "the job ended before it could be interrupted"
        d.kill9()
        d.start()                                           # queued again, resumed by itself
        r = wait_row(d, job["job_id"], lambda r: r["state"] in FINISHED, timeout=240)
        assert r["state"] == "succeeded" and r["step"] == 200, r
        with d.client() as c:
            rows = {m["model"]: m for m in c.ls()}
            assert rows["ft:latest"]["kind"] == "adapter" and rows["ft:latest"]["base"] == "base:latest"
            logs = [x.get("line", "") for x in c.job_logs(job["job_id"])]
        assert any("queued again, to resume" in line for line in logs)
        assert any("from the checkpoint of step" in line for line in logs)
    finally:
        d.stop()
