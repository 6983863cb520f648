"""Daemon limits and housekeeping seen from clients: upload slots (issue 7.4), re-imports that
send nothing, the loading notice and the audit log (issue 8.5, 8.7)."""
from __future__ import annotations

import json
import os
import resource
import time

import pytest
import torch

from conftest import Daemon, train_bpe
from llmctl import errors

HB_MS = 200


@pytest.fixture(scope="module")
def d(tmp_path_factory):
    dm = Daemon(tmp_path_factory.mktemp("limits"),
                env={"LLMOSD_HEARTBEAT_MS": str(HB_MS), "LLMOSD_MAX_UPLOADS": "12"})
    dm.outlives_test = True
    try:
        yield dm.start()
    finally:
        dm.stop()


def fake_digest() -> str:
    return "sha256:" + os.urandom(32).hex()


def uploads_on_disk(d: Daemon) -> list[str]:
    return [n for n in os.listdir(d.state / "store" / "tmp") if n.startswith("upload-")]


def wait_for(cond, timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(0.05)
    return cond()


def test_i7_4_upload_slots_are_limited(d):
    a, b = d.client(), d.client()
    try:
        for _ in range(8):
            assert a._call("upload", {"digest": fake_digest(), "size": 10})["have"] is False
        with pytest.raises(errors.Busy, match="limit 8 per client") as e:
            a._call("upload", {"digest": fake_digest(), "size": 10})
        assert e.value.hint
        for _ in range(4):                                 # another client is still served...
            b._call("upload", {"digest": fake_digest(), "size": 10})
        with pytest.raises(errors.Busy, match=r"12 uploads open \(limit 12\)"):   # ...up to the total
            b._call("upload", {"digest": fake_digest(), "size": 10})
        with d.client() as c:
            assert c.status()["pid"] == d.proc.pid
    finally:
        a.close()
        b.close()
    assert wait_for(lambda: not uploads_on_disk(d))


def test_i7_4_slots_freed_when_client_leaves(d):
    c = d.client()
    try:
        for _ in range(3):
            c._call("upload", {"digest": fake_digest(), "size": 1 << 20})
        assert len(uploads_on_disk(d)) == 3
    finally:
        c.close()                                          # no goodbye: the socket just goes
    assert wait_for(lambda: not uploads_on_disk(d), timeout=5 * HB_MS / 1000 + 2)


def test_i7_4_descriptor_reserve_keeps_status_answered(d):
    pid = d.proc.pid
    soft, hard = resource.prlimit(pid, resource.RLIMIT_NOFILE)
    used = len(os.listdir(f"/proc/{pid}/fd"))
    resource.prlimit(pid, resource.RLIMIT_NOFILE, (used + 64 + 3, hard))
    c = d.client()
    try:
        with pytest.raises(errors.Busy, match="file descriptors"):
            for _ in range(8):
                c._call("upload", {"digest": fake_digest(), "size": 10})
        with d.client() as other:                          # a new connection is still answered
            assert other.status()["pid"] == pid
    finally:
        c.close()
        resource.prlimit(pid, resource.RLIMIT_NOFILE, (soft, hard))
    assert wait_for(lambda: not uploads_on_disk(d))


def test_i7_4_refused_chunks_free_disk_at_once(d):
    data = b"x" * 100_000
    with d.client() as c:
        dg = fake_digest()                                 # the content will not match it
        c._call("upload", {"digest": dg, "size": len(data)})
        c._call("upload_chunk", {"digest": dg, "offset": 0, "data": data[:50_000]})
        assert len(uploads_on_disk(d)) == 1
        with pytest.raises(errors.InvalidArgument, match="does not match"):
            c._call("upload_chunk", {"digest": dg, "offset": 50_000, "data": data[50_000:]})
        assert uploads_on_disk(d) == []                   # at once, not at the next start
        c._call("upload", {"digest": dg, "size": 10})
        with pytest.raises(errors.InvalidArgument, match="longer"):
            c._call("upload_chunk", {"digest": dg, "offset": 0, "data": data})
        assert uploads_on_disk(d) == []


# -- import, re-import, loading notice, audit ------------------------------------------------

def make_hf_dir(path):
    """A tiny Llama checkpoint as a Hugging Face directory (random weights, BPE tokenizer)."""
    from safetensors.torch import save_file
    from llmosd.models.llama import Llama, LlamaConfig
    path.mkdir(parents=True)
    tk = train_bpe(300)
    tk.save(str(path / "tokenizer.json"))
    cfg = {"model_type": "llama", "vocab_size": tk.get_vocab_size(), "hidden_size": 32,
           "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2,
           "num_key_value_heads": 1, "max_position_embeddings": 64, "rms_norm_eps": 1e-5,
           "bos_token_id": 1, "eos_token_id": 2, "tie_word_embeddings": False}
    (path / "config.json").write_text(json.dumps(cfg))
    with torch.device("meta"):
        ref = Llama(LlamaConfig.from_dict(cfg)).state_dict_for_save()
    g = torch.Generator().manual_seed(0)
    save_file({k: torch.randn(t.shape, generator=g) * 0.02 for k, t in ref.items()},
              str(path / "model.safetensors"), metadata={"format": "pt"})


@pytest.fixture(scope="module")
def imported(d, tmp_path_factory):
    """The HF directory, imported once as 'hf1'; yields (dir, result, progress events)."""
    src = tmp_path_factory.mktemp("hf") / "m"
    make_hf_dir(src)
    events = []
    with d.client() as c:
        r = c.import_path(str(src), "hf1", progress=events.append)
    return src, r, events


def test_i8_5_reimport_sends_nothing(d, imported):
    src, first, events = imported
    assert any("file" in e and not e.get("skipped") for e in events)   # the first time: sent
    events = []
    with d.client() as c:
        sent = []
        call = c._call
        c._call = lambda t, body=None, **kw: (sent.append(t), call(t, body, **kw))[1]
        r = c.import_path(str(src), "hf2", progress=events.append)
        assert "upload_chunk" not in sent
        files = [e for e in events if "file" in e]
        assert files and all(e.get("skipped") for e in files)
        assert r["model"] == "hf2:latest" and r["digest"] == first["digest"]
        assert {m["model"] for m in c.ls()} >= {"hf1:latest", "hf2:latest"}
        # another dtype cannot reuse the model: the daemon refuses once ("not sent"), and the
        # client then sends the files and runs the job
        sent.clear()
        r3 = c.import_path(str(src), "hf3", dtype="float16")
        assert "upload_chunk" in sent and r3["digest"] != first["digest"]
        # a raw client sees the refusal itself, with its hint
        digest = c.upload_file(str(src / "config.json"))
        body = {"name": "hf4", "files": {"config.json": digest}, "format": "hf", "dtype": "bfloat16"}
        with pytest.raises(errors.InvalidArgument):
            c._run_job("import", body, None)
        c.rm("hf2")
        c.rm("hf3")


def test_i8_5_cold_generate_says_loading(d, imported):
    with d.client() as c:
        g = c.generate("hf1", "ROMEO:", max_tokens=2, temperature=0)
        g.text()
        assert g.chunks[0] == {"text": "", "token_ids": [], "loading": "hf1:latest", "wait": "load"}
        g = c.generate("hf1", "ROMEO:", max_tokens=2, temperature=0)   # warm: no notice
        g.text()
        assert not any("loading" in ch for ch in g.chunks)
        c.unload("hf1")


def test_i8_7_audit_log_has_uid(d, imported):
    uid = os.getuid()
    with d.client() as c:
        assert c.load("hf1")["already_loaded"] is False
        assert c.load("hf1")["already_loaded"] is True
        c.unload("hf1")
        assert c.unload("hf1") == {"unloaded": []}         # not loaded: nothing to do, no error
        c.tag("hf1", "audit")
        c.rm("audit")
    log = d.log.read_text()
    for line in (f"import hf1:latest by uid {uid}", f"load hf1:latest by uid {uid}",
                 f"unload hf1:latest by uid {uid}", f"tag hf1:latest as audit:latest by uid {uid}",
                 f"rm audit:latest by uid {uid} (freed 0 bytes)"):
        assert line in log, line
