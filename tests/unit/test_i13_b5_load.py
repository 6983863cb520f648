"""Issue 13, bench B5 (load to ready): a stored blob is hashed once per Store while its file keeps
its identity (``Store.verify_blob`` / ``open_verified``), any change re-hashes it and a changed
content is refused as before; a reload reuses the tokenizer built for the same blob and the
model is built on the meta device without its random initialisation.  Counts calls, never times."""
from __future__ import annotations

import io
import json
import os

import pytest
import torch
from safetensors.torch import save

from conftest import train_bpe
from llmctl.errors import StoreCorrupt
from llmosd.models import loader
from llmosd.models.llama import Llama, LlamaConfig
from llmosd.store import store as store_mod
from llmosd.store.store import Store


@pytest.fixture
def hashes(monkeypatch):
    """The digests ``Store`` computed by reading a blob (a spy on its one hashing function)."""
    seen: list[str] = []
    real = store_mod._sha256_of

    def spy(f, keep):
        got = real(f, keep)
        seen.append(got[0])
        return got
    monkeypatch.setattr(store_mod, "_sha256_of", spy)
    return seen


@pytest.fixture
def store(tmp_path):
    s = Store(str(tmp_path / "store"))
    s.recover()
    return s


def test_i13_b5_verify_blob_hashes_once_while_the_file_is_unchanged(store, hashes):
    d, _ = store.put_blob(b"w" * 100_000)
    store.verify_blob(d)
    store.verify_blob(d)
    with store.open_verified(d) as f:
        assert f.read(3) == b"www"                  # at offset 0, the verified file itself
    assert hashes == [d]
    assert Store(store.root).verify_blob(d) is None and hashes == [d, d]   # per Store (daemon)


def next_clock_tick(path: str, tmp_path) -> None:
    """Return once the file system's clock (coarse: a few ms) has passed ``path``'s ctime, so
    that a change made now gives it another ctime (polls a scratch file; no fixed sleep)."""
    scratch = tmp_path / "tick"
    scratch.touch()
    while os.stat(scratch).st_ctime_ns <= os.stat(path).st_ctime_ns:
        os.utime(scratch)


@pytest.mark.parametrize("keep_mtime", [False, True])
def test_i13_b5_changed_blob_is_hashed_again_and_refused(store, hashes, keep_mtime, tmp_path):
    d, _ = store.put_blob(b"a" * 4096)
    store.verify_blob(d)
    path = store.blob_path(d)
    st = os.stat(path)
    next_clock_tick(path, tmp_path)
    with open(path, "r+b") as f:                    # same size, other bytes
        f.write(b"b")
    if keep_mtime:                                  # mtime put back: ctime still moved
        os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    else:
        os.utime(path)                              # touched
    for _ in range(2):                              # refused every time, never remembered
        with pytest.raises(StoreCorrupt, match="is corrupt"):
            store.verify_blob(d)
    assert len(hashes) == 3
    with open(path, "r+b") as f:                    # put right again: verified (hashed) again
        f.write(b"a")
    store.verify_blob(d)
    assert len(hashes) == 4


def test_i13_b5_replaced_or_missing_blob_is_checked_again(store, hashes):
    d, _ = store.put_blob(b"c" * 4096)
    store.verify_blob(d)
    path = store.blob_path(d)
    tmp = path + ".new"
    with open(tmp, "wb") as f:                      # another inode, same name and content
        f.write(b"c" * 4096)
    os.replace(tmp, path)
    store.verify_blob(d)
    assert len(hashes) == 2
    os.unlink(path)
    with pytest.raises(StoreCorrupt, match="missing"):
        store.verify_blob(d)
    os.symlink("/dev/null", path)
    with pytest.raises(StoreCorrupt, match="symbolic link"):
        store.verify_blob(d)


def tiny_manifest(store: Store) -> tuple[dict, Llama]:
    """A created model's manifest (blobs in ``store``) and the model it stores."""
    cfg = LlamaConfig(vocab_size=300, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    m = Llama(cfg)
    m.init_weights(seed=0)

    def put(data: bytes) -> dict:
        d, n = store.put_blob(io.BytesIO(data))
        return {"digest": d, "size": n}
    tok = json.dumps({"tokenizer_json": train_bpe(300).to_str()}).encode()
    return {"schema": 1, "architecture": "llama", "config": put(json.dumps(cfg.to_dict()).encode()),
            "tokenizer": {**put(tok), "type": "hf-tokenizers"},
            "weights": {**put(save(m.state_dict_for_save())), "format": "safetensors"}}, m


def test_i13_b5_reload_hashes_no_weights_and_reuses_the_tokenizer(store, hashes, monkeypatch):
    man, ref = tiny_manifest(store)
    monkeypatch.setattr(loader, "_TOKENIZERS", loader._TokenizerCache())
    m1, t1 = loader.load_model(store, man, torch.device("cpu"))
    m2, t2 = loader.load_model(store, man, torch.device("cpu"))
    w, tok = man["weights"]["digest"], man["tokenizer"]["digest"]
    assert hashes.count(w) == 1 and hashes.count(tok) == 1
    assert t2 is t1
    ids = torch.tensor([[1, 2, 3, 4]])
    with torch.no_grad():
        assert torch.equal(m2(ids), ref.eval()(ids))      # the stored weights, not an init
    other = {**man, "chat_template": "{{ messages }}"}     # built from other settings: its own
    assert loader.load_model(store, other, torch.device("cpu"))[1] is not t1


def test_i13_b5_tokenizer_cache_is_bounded(store):
    man, _ = tiny_manifest(store)
    cache = loader._TokenizerCache(size=2)
    toks = [cache.get(store, {**man, "chat_template": str(i)}) for i in range(3)]
    assert len(cache.entries) == 2
    assert cache.get(store, {**man, "chat_template": "2"}) is toks[2]
    assert cache.get(store, {**man, "chat_template": "0"}) is not toks[0]   # the oldest went


def test_i13_b5_meta_build_skips_only_meta_initialisation():
    with torch.device("meta"), loader._NoMetaInit():
        lin = torch.nn.Linear(8, 8)
        real = torch.nn.init.ones_(torch.empty(3, device="cpu"))   # a real tensor: initialised
    assert lin.weight.is_meta and torch.equal(real, torch.ones(3))
