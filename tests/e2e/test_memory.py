"""Issue 12: the memory manager through a real daemon with small budgets sized from the tiny
models' real sizes: LRU eviction, pins and refusals (1), swapping to the host tier (2),
keep-alive (3) and estimates against measured bytes (4).

One store is made in-process once (the tiny base, its adapters and classifier of
``test_adapters_serve``, and two more names of the base, so three models of one known size)
and copied for each daemon."""
from __future__ import annotations

import importlib.util
import json
import shutil
import time
from pathlib import Path

import pytest
import torch

from conftest import Daemon
from llmctl import errors
from test_adapters_serve import build_store

PROMPT = "First Citizen:"
MODELS = ["m1:latest", "m2:latest", "m3:latest"]


POOL_BLOCKS = 8      # each instance's KV pool (issue 13: charged with it): max_kv_bytes of 8 blocks


@pytest.fixture(scope="module")
def template(tmp_path_factory):
    """(state directory to copy, bytes one of the three models holds: its weights and its KV
    pool of POOL_BLOCKS blocks, as the runner allocates it, max_kv_bytes)."""
    from llmosd.models.loader import load_model, resident_bytes
    from llmosd.serve.runner import Runner
    from llmosd.store.store import Store
    state = tmp_path_factory.mktemp("memtemplate") / "state"
    build_store(state)
    store = Store(str(state / "store"))
    _, man, _ = store.get("tiny")
    for name in MODELS:
        store.write_manifest(name.split(":")[0], man)
    model, tok = load_model(store, man, torch.device("cpu"))
    runner = Runner(model, tok, torch.device("cpu"), num_blocks=POOL_BLOCKS, block_size=16)
    return state, resident_bytes(model) + runner.pool_bytes, POOL_BLOCKS * runner.block_bytes


def start(tmp_path, template, *flags) -> Daemon:
    state, _, kv = template
    d = Daemon(tmp_path / "d", env={"LLMOSD_MAX_KV_BYTES": str(kv), "LLMOSD_KV_BLOCK_SIZE": "16"})
    shutil.copytree(state, d.state)
    return d.start(*flags)


def ps(c) -> dict:
    return c._call("ps")


def loaded(c) -> dict:
    """model -> its instance row (the live ones)."""
    return {i["model"]: i for i in ps(c)["instances"] if i["state"] != "unloading"}


def greedy(c, model, **kw):
    g = c.generate(model, PROMPT, max_tokens=8, temperature=0, **kw)
    g.text()
    return [t for ch in g.chunks for t in ch["token_ids"]], g.stats


def wait_for(pred, timeout=10.0, every=0.05):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(every)
    return pred()


def test_i12_1_lru_eviction_pins_and_refusal(tmp_path, template):
    size = template[1]
    d = start(tmp_path, template, "--budget", f"cpu={int(size * 2.5)}")
    try:
        with d.client() as c:
            c.load("m1")
            c.load("m2")
            greedy(c, "m1")                                  # m2 is now the least recently used
            r3 = c.load("m3")
            assert set(loaded(c)) == {"m1:latest", "m3:latest"}
            assert [(e["model"], e["to"], e["reason"]) for e in r3["evicted"]] == \
                [("m2:latest", "store", "room for m3:latest")] and r3["paused_jobs"] == []   # review 8
            ev = ps(c)["evicted"][-1]
            assert (ev["model"], ev["to"]) == ("m2:latest", "store") and "m3:latest" in ev["reason"]
            c.pin("m1")                                      # m1 is the LRU one, but pinned
            c.load("m2")
            assert set(loaded(c)) == {"m1:latest", "m2:latest"} and loaded(c)["m1:latest"]["pinned"]
            c.pin("m2")
            with pytest.raises(errors.OutOfMemory) as e:
                c.load("m3")
            msg = str(e.value)
            assert "needs" in msg and "free of" in msg and "held by" in msg
            assert "m1:latest" in msg and "m2:latest" in msg and "pinned" in msg and "uid" in msg
            assert "unpin" in e.value.hint
            devices = c.status()["devices"]
            cpu = next(r for r in devices if r["device"] == "cpu")
            assert cpu["budget"] == int(size * 2.5) and cpu["instances"] == 2 * size
            assert cpu["free"] == cpu["budget"] - 2 * size
            c.unpin("m2")                                    # the daemon carries on
            c.load("m3")
            assert set(loaded(c)) == {"m1:latest", "m3:latest"}
        log = d.log.read_text()
        assert "evicting instance" in log and "room for m3:latest" in log
    finally:
        d.stop()


def test_i12_2_swap_in_is_faster_than_a_load(tmp_path, template):
    size = template[1]
    d = start(tmp_path, template, "--budget", f"cpu={int(size * 2.5)}", "--budget",
              f"host={int(size * 1.5)}")
    try:
        with d.client() as c:
            c.load("m1")
            before, _ = greedy(c, "m1")
            c.load("m2")
            c.load("m3")                                     # m1 (LRU) goes to the host tier
            row = loaded(c)["m1:latest"]
            assert (row["tier"], row["state"], row["swaps"]) == ("host", "swapped", 1)
            assert ps(c)["evicted"][-1]["to"] == "host"
            cpu = next(r for r in c.status()["devices"] if r["device"] == "cpu")
            assert cpu["host_used"] == size - row["kv_bytes"] and cpu["instances"] == 2 * size   # no pool swapped
            after, stats = greedy(c, "m1")                  # swapped back in, transparently
            assert after == before and stats["swap_in_ms"] is not None
            row = loaded(c)["m1:latest"]
            assert row["tier"] == "device" and row["state"] in ("ready", "busy")
            assert row["swap_in_ms"] < row["load_ms"], row
            assert len(loaded(c)) == 3 and sum(r["tier"] == "device" for r in loaded(c).values()) == 2
    finally:
        d.stop()


def test_i12_3_keep_alive(tmp_path, template):
    d = start(tmp_path, template)
    try:
        with d.client() as c:
            t0 = time.monotonic()
            c.load("m1", keep_alive=1)
            c.load("m3", keep_alive=1, pin=True)
            assert loaded(c)["m1:latest"]["expires_at"] is not None
            assert loaded(c)["m3:latest"]["expires_at"] is None
            greedy(c, "m2", keep_alive=0)                    # unloads as the request ends
            assert wait_for(lambda: "m2:latest" not in loaded(c), 3)
            assert wait_for(lambda: "m1:latest" not in loaded(c), 5)
            assert time.monotonic() - t0 >= 1.0
            time.sleep(0.6)
            assert "m3:latest" in loaded(c)                  # pinned: stays
            reasons = [e["reason"] for e in ps(c)["evicted"]]
            assert any("keep-alive 0" in r for r in reasons) and any("expired" in r for r in reasons)
    finally:
        d.stop()


def _oracle(name):
    """A module of tests/oracle (its helpers make tiny HF directories and GGUF files)."""
    path = Path(__file__).resolve().parent.parent / "oracle" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"_oracle_{name}", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_i12_4_estimates_within_10_percent(tmp_path, template):
    pytest.importorskip("transformers")
    hf_mod = _oracle("test_import_hf")
    hf_mod.make_hf_model(tmp_path / "hf", tied=True)
    names = ["tiny", "hf"]
    d = start(tmp_path, template)
    try:
        d.cli("import", str(tmp_path / "hf"), "hf", "--json")
        try:
            gg = _oracle("test_import_gguf")
            hf = gg.hf_model(len(gg.bpe_vocab()[0]))
            gg.write_gguf(tmp_path / "m.gguf", hf, "F32")
            d.cli("import", str(tmp_path / "m.gguf"), "gg", "--json")
            names.append("gg")
        except pytest.skip.Exception:
            pass                                             # no gguf package: HF and created only
        with d.client() as c:
            for name in names:
                c.load(name)
            c.load("ad1")
            c.load("clf")
            rows = {r["model"]: r for r in ps(c)["instances"]}
        assert set(rows) >= {f"{n}:latest" for n in names}
        checked = []
        for r in rows.values():
            for row in [r] + r["adapters"]:
                est, got = row["estimate_bytes"], row["resident_bytes"]
                assert got > 0 and abs(est - got) <= 0.1 * got, (row["model"], est, got)
                checked.append(row["model"])
        assert {"ad1:latest", "clf:latest"} <= set(checked) and len(checked) == len(names) + 2
    finally:
        d.stop()
