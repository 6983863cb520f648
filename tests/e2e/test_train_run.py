"""Issue 10: pretraining runs for real (in-process with a fake ctl, and as spawned ranks):
the loss falls, resume is bitwise, two gloo ranks equal one process on the doubled batch, and
the torchrun entry point writes a Hugging Face directory that imports with its lineage."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load as load_safetensors

from conftest import ROOT, SHAKESPEARE
from llmosd.store.store import Store
from llmosd.train import pretrain

TINY = {"tokenizer": "char", "layers": 1, "dim": 32, "heads": 2, "block_size": 16, "batch_size": 4,
        "lr": 3e-3, "warmup": 2, "eval_batches": 2}


class FakeCtl:
    """The daemon's ctl, recorded; ``stop_at``: ask for ``stop`` once that step is reported;
    ``crash_at``: raise (as a killed worker would stop) once that step is reported."""

    def __init__(self, job_dir, stop_at=None, stop="pause", crash_at=None):
        self.job_id, self.job_dir = 7, str(job_dir)
        os.makedirs(self.job_dir, exist_ok=True)
        self.stop_at, self.stop, self.crash_at = stop_at, stop, crash_at
        self.metrics_seen, self.lines, self.checkpoints, self.stages = [], [], [], []

    def progress(self, p):
        self.stages.append(p.get("stage"))

    __call__ = progress

    def metrics(self, m):
        self.metrics_seen.append(m)

    def log(self, line):
        self.lines.append(line)

    def checkpoint_saved(self, step):
        self.checkpoints.append(step)

    def stop_requested(self):
        step = self.metrics_seen[-1]["step"] if self.metrics_seen else 0
        if self.crash_at is not None and step >= self.crash_at:
            raise KeyboardInterrupt("worker killed")
        return self.stop if self.stop_at is not None and step >= self.stop_at else None


@pytest.fixture
def store_root(tmp_path):
    return str(tmp_path / "store")


def spec_for(store_root, chars: int, **kw) -> dict:
    digest, _ = Store(store_root).put_blob(SHAKESPEARE.read_bytes()[:chars])
    return {"data": {"shakespeare.txt": digest}, **kw}


def weights(store_root, manifest) -> dict:
    return load_safetensors(Store(store_root).read_blob(manifest["weights"]["digest"]))


def test_i10_1_pretrain_loss_falls_below_unigram_entropy(tmp_path, store_root):
    from llmosd.models.loader import load_model
    spec = spec_for(store_root, 200_000, tokenizer="char", layers=2, dim=64, heads=4, block_size=32,
                    batch_size=16, max_steps=200, lr=3e-3, warmup=20, eval_every=100, eval_batches=10)
    ctl = FakeCtl(tmp_path / "job")
    man = pretrain.run(spec, store_root, ctl)
    final = man["lineage"]["final"]
    assert final["val_loss"] < 2.6 < 3.31, final             # unigram entropy: 3.31 nats
    assert final["step"] == 200 and final["best_val_loss"] <= final["val_loss"]
    assert man["lineage"]["method"] == "train" and man["lineage"]["job"] == 7
    assert man["lineage"]["args"]["sources"] == spec["data"]
    vals = [m["val_loss"] for m in ctl.metrics_seen if "val_loss" in m]
    assert len(vals) == 2 and vals[1] < vals[0]
    assert {"step", "loss", "lr", "tokens_per_s", "eta_s", "time"} <= set(ctl.metrics_seen[-1])
    assert ctl.checkpoints[-1] == 200 and os.path.exists(tmp_path / "job" / "best.pt")
    model, tok = load_model(Store(store_root), man, torch.device("cpu"))
    assert tok.vocab_size == man["tokenizer"]["vocab_size"] < 80       # characters + specials
    assert model.config.max_position_embeddings == 32            # the context is the block
    ids = tok.encode("ROMEO:\n")
    with torch.no_grad():
        while len(ids) < 32:
            ids.append(int(model(torch.tensor([ids]))[0, -1].argmax()))
    assert len(tok.decode(ids)) == 32 and tok.decode(ids).startswith("ROMEO:\n")


def test_i10_2_resume_is_bitwise(tmp_path, store_root):
    spec = spec_for(store_root, 20_000, **TINY, max_steps=24, grad_accum=2, dropout=0.1,
                    eval_every=6, checkpoint_every=5)
    whole = pretrain.run(spec, store_root, FakeCtl(tmp_path / "a"))
    # pause at step 9: checkpoint, Paused; run again: resumes from it
    ctl = FakeCtl(tmp_path / "b", stop_at=9)
    with pytest.raises(pretrain.Paused):
        pretrain.run(spec, store_root, ctl)
    assert ctl.checkpoints[-1] == 9
    paused = pretrain.run(spec, store_root, FakeCtl(tmp_path / "b"))
    # a worker killed at step 13 resumes from its last periodic checkpoint (step 10)
    ctl = FakeCtl(tmp_path / "c", crash_at=13)
    with pytest.raises(KeyboardInterrupt):
        pretrain.run(spec, store_root, ctl)
    assert ctl.checkpoints == [5, 10]
    again = FakeCtl(tmp_path / "c")
    killed = pretrain.run(spec, store_root, again)
    assert any("resuming from the checkpoint at step 10" in line for line in again.lines)
    assert paused["weights"]["digest"] == killed["weights"]["digest"] == whole["weights"]["digest"]
    assert paused["lineage"]["final"] == whole["lineage"]["final"]
    # cancel: no checkpoint, Cancelled
    ctl = FakeCtl(tmp_path / "d", stop_at=3, stop="cancel")
    with pytest.raises(pretrain.Cancelled):
        pretrain.run(spec, store_root, ctl)
    assert ctl.checkpoints == []


def test_i10_4_ddp_two_ranks_equal_doubled_batch(tmp_path, store_root):
    base = {**TINY, "max_steps": 5, "eval_every": 5, "checkpoint_every": 5, "device": "cpu"}
    one = pretrain.run(spec_for(store_root, 20_000, **{**base, "batch_size": 8}), store_root,
                       FakeCtl(tmp_path / "one"))
    ctl = FakeCtl(tmp_path / "two")
    two = pretrain.run(spec_for(store_root, 20_000, **base, nproc=2), store_root, ctl)
    a, b = weights(store_root, one), weights(store_root, two)
    assert a.keys() == b.keys()
    diff = max((a[k] - b[k]).abs().max().item() for k in a)
    assert diff < 1e-6, diff
    assert ctl.checkpoints[-1] == 5 and ctl.metrics_seen[-1]["step"] == 5   # rank 0 relayed
    assert two["lineage"]["args"]["nproc"] == 2


def test_i10_5_entry_writes_importable_output(tmp_path):
    """The torchrun entry point run by hand (one rank, no daemon): plain progress lines, then
    RUN_DIR/output/ as a Hugging Face directory with llmosd_lineage.json, which the importer's
    reader accepts and whose lineage comes back."""
    from llmosd.formats.hf import hf_lineage, read_hf
    run = tmp_path / "run"
    run.mkdir()
    (run / "tiny.txt").write_bytes(SHAKESPEARE.read_bytes()[:20_000])
    (run / "spec.json").write_text(json.dumps({**TINY, "max_steps": 4, "data": ["tiny.txt"]}))
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    for k in ("RANK", "WORLD_SIZE", "LLMOSD_RELAY", "LLMOSD_CHECKPOINT_DIR"):
        env.pop(k, None)
    out = subprocess.run([sys.executable, "-m", "llmosd.train.entry", str(run)], env=env,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "step 4/4" in out.stdout and "llmctl import" in out.stdout
    files = sorted(os.listdir(run / "output"))
    assert {"config.json", "model.safetensors", "tokenizer.model", "llmosd_lineage.json"} <= set(files)
    store = Store(str(tmp_path / "store"))
    blobs = {n: store.put_blob((run / "output" / n).read_bytes())[0] for n in files}
    cfg, sd, tok, _ = read_hf(store, blobs, lambda p: None)
    assert cfg.num_hidden_layers == 1 and tok["type"] == "sentencepiece"
    lin = hf_lineage(store, blobs)
    assert lin["method"] == "train" and lin["final"]["step"] == 4
    assert lin["args"]["sources"] == {"tiny.txt": store.put_blob((run / "tiny.txt").read_bytes())[0]}


def test_i10_2_ddp_pause_resume_is_bitwise(tmp_path, store_root):
    """Two ranks paused (the worker signals rank 0, which broadcasts the stop) and resumed
    end with the weights of the uninterrupted two-rank run."""
    spec = spec_for(store_root, 20_000, **TINY, max_steps=100, eval_every=50, checkpoint_every=50,
                    device="cpu", nproc=2)
    whole = pretrain.run(spec, store_root, FakeCtl(tmp_path / "a"))
    ctl = FakeCtl(tmp_path / "b", stop_at=0)           # pause as soon as rank 0 can take it
    with pytest.raises(pretrain.Paused):
        pretrain.run(spec, store_root, ctl)
    assert ctl.checkpoints and ctl.checkpoints[-1] < 100
    again = FakeCtl(tmp_path / "b")
    resumed = pretrain.run(spec, store_root, again)
    assert any("resuming from the checkpoint" in line for line in again.lines)
    assert resumed["weights"]["digest"] == whole["weights"]["digest"]


def test_i10_continue_training_a_stored_model(tmp_path, store_root):
    """With ``_parent`` (what the daemon passes for an existing name) training starts from the
    parent's weights and keeps its tokenizer and architecture; the lineage names the parent."""
    spec = spec_for(store_root, 20_000, **TINY, max_steps=6, eval_every=6)
    base = pretrain.run(spec, store_root, FakeCtl(tmp_path / "a"))
    parent = {"name": "tiny:latest", "digest": "sha256:" + "e" * 64,
              **{k: base[k] for k in ("config", "tokenizer", "weights")}}
    more = {"data": spec["data"], "max_steps": 2, "lr": 1e-7, "min_lr": 0.0, "warmup": 0,
            "block_size": 16, "batch_size": 2, "eval_batches": 1, "_parent": parent}
    ctl = FakeCtl(tmp_path / "b")
    child = pretrain.run(more, store_root, ctl)
    assert child["tokenizer"]["digest"] == base["tokenizer"]["digest"]
    assert child["tokenizer"]["add_bos"] is False
    a, b = weights(store_root, base), weights(store_root, child)
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-5   # a tiny lr: barely moved
    assert child["lineage"]["parent"] == "tiny:latest"
    assert child["lineage"]["args"]["parent_digest"] == parent["digest"]
    assert child["lineage"]["args"]["lr"] == 1e-7 and "_parent" not in child["lineage"]["args"]
    with pytest.raises(ValueError, match="layers cannot be set when training continues from tiny:latest"):
        pretrain.run({**more, "layers": 2}, store_root, FakeCtl(tmp_path / "c"))
    with pytest.raises(ValueError, match=r"block_size \(64\) exceeds the context of tiny:latest \(16\)"):
        pretrain.run({**more, "block_size": 64}, store_root, FakeCtl(tmp_path / "d"))
