"""Issue 10: the pieces of the training loop that need no run: the LR schedule, AdamW's weight
decay groups, dropout (training only; old configs still load), checkpoints (atomic, RNG states,
the spec they belong to) and the train lineage (kept through an exported run's import)."""
from __future__ import annotations

import os
import random

import numpy as np
import pytest
import torch

from llmosd.models.llama import Llama, LlamaConfig, check_config
from llmosd.store.manifest import Lineage, imported_lineage, train_lineage
from llmosd.train import checkpoint
from llmosd.train.pretrain import lr_at

SCHED = {"lr": 1e-3, "min_lr": 1e-4, "warmup": 10, "max_steps": 110}


def test_i10_lr_warmup_then_cosine_to_min_lr():
    lrs = [lr_at(i, SCHED) for i in range(110)]
    assert lrs[0] == pytest.approx(1e-3 / 11) and lrs[9] == pytest.approx(1e-3 * 10 / 11)
    assert all(a < b for a, b in zip(lrs[:10], lrs[1:11]))            # linear warmup
    assert lrs[10] == pytest.approx(1e-3)                              # the peak
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:]))             # then only down
    assert lrs[60] == pytest.approx((1e-3 + 1e-4) / 2)                 # cosine midpoint
    assert lrs[-1] == pytest.approx(1e-4, rel=1e-2) and lr_at(500, SCHED) == pytest.approx(1e-4)
    assert lr_at(0, {**SCHED, "warmup": 0}) == pytest.approx(1e-3)


def tiny(**kw) -> LlamaConfig:
    return LlamaConfig(vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                       num_attention_heads=4, max_position_embeddings=64, **kw)


def test_i10_dropout_is_training_only():
    plain, dropped = Llama(tiny()), Llama(tiny(dropout=0.5))
    plain.init_weights(1)
    dropped.load_state_dict(plain.state_dict())
    x = torch.randint(0, 50, (2, 12))
    state = torch.get_rng_state()
    with torch.no_grad():
        ref = plain.eval()(x)
        assert torch.equal(dropped.eval()(x), ref)                     # inference: unchanged
        assert torch.equal(torch.get_rng_state(), state)               # and draws nothing
        assert torch.equal(plain.train()(x), ref)                      # p = 0: nothing dropped
        assert not torch.equal(dropped.train()(x), ref)
    old = {k: v for k, v in tiny().to_dict().items() if k != "dropout"}
    check_config(old)
    assert LlamaConfig.from_dict(old).dropout == 0.0                   # stored configs load
    with pytest.raises(ValueError, match="dropout must be a number from 0 to below 1"):
        check_config({**old, "dropout": "0.1"})


def test_i10_checkpoint_is_atomic_and_restores_random_states(tmp_path):
    path = str(tmp_path / "last.pt")
    assert checkpoint.load(path) is None
    torch.manual_seed(5), np.random.seed(6), random.seed(7)
    state = checkpoint.rng_state()
    want = (torch.rand(3), np.random.rand(3), random.random())
    spec = {"lr": 1e-3, "device": "cpu"}
    checkpoint.save(path, {"version": checkpoint.VERSION, "step": 4, "spec": spec, "rng": state,
                           "tokenizer": b"\x00bytes"})
    assert os.listdir(tmp_path) == ["last.pt"]                         # no temporary left
    ck = checkpoint.load(path)
    checkpoint.set_rng_state(ck["rng"])
    got = (torch.rand(3), np.random.rand(3), random.random())
    assert torch.equal(got[0], want[0]) and (got[1] == want[1]).all() and got[2] == want[2]
    assert ck["tokenizer"] == b"\x00bytes" and ck["step"] == 4
    checkpoint.check_resumable(ck, {**spec, "device": "cuda"})         # where it runs may change
    with pytest.raises(ValueError, match=r"checkpoint at step 4 was made with another spec \(lr"):
        checkpoint.check_resumable(ck, {**spec, "lr": 2e-3})


def test_i10_adamw_decays_matrices_only(tmp_path):
    from conftest import SHAKESPEARE
    from llmosd.train.pretrain import Trainer
    from llmosd.train.spec import check_train_spec

    class Quiet:
        job_id, job_dir = 1, str(tmp_path)

        def __getattr__(self, name):
            return lambda *a: None
    data = {"s.txt": SHAKESPEARE.read_bytes()[:5000]}
    s = check_train_spec({"tokenizer": "char", "layers": 1, "dim": 32, "heads": 2, "block_size": 16,
                          "max_steps": 2, "weight_decay": 0.2, "device": "cpu"}, data)
    t = Trainer(s, data, None, str(tmp_path), Quiet())
    decay, other = t.opt.param_groups
    assert decay["weight_decay"] == 0.2 and other["weight_decay"] == 0.0
    assert all(p.dim() == 2 for p in decay["params"]) and all(p.dim() == 1 for p in other["params"])
    assert len(decay["params"]) + len(other["params"]) == len(list(t.raw.parameters()))
    assert t.cfg.max_position_embeddings == 16 and t.amp is None       # CPU: float32 by default


def test_i10_train_lineage_and_its_import():
    parent = {"name": "base:latest", "digest": "sha256:" + "a" * 64}
    spec = {"lr": 1e-3, "data": {"t.txt": "sha256:" + "b" * 64}, "_parent": parent}
    final = {"step": 10, "loss": 2.0, "val_loss": 2.1, "best_val_loss": 2.05}
    lin = train_lineage(spec, spec["data"], parent, 7, final).to_dict()
    assert lin == {"method": "train", "parent": "base:latest", "job": 7, "final": final,
                   "args": {"lr": 1e-3, "parent_digest": parent["digest"], "sources": spec["data"]}}
    back = Lineage.of({"lineage": lin})
    assert back.job == 7 and back.final == final and back.sources == spec["data"]
    imported = imported_lineage(lin, "hf", {"config.json": "sha256:" + "c" * 64}, "auto").to_dict()
    assert imported["method"] == "train" and imported["final"] == final
    assert imported["args"]["imported"]["format"] == "hf" and imported["parent"] == "base:latest"
    plain = imported_lineage(None, "hf", {"config.json": "sha256:" + "c" * 64}, "auto").to_dict()
    assert plain["method"] == "import" and "job" not in plain and "final" not in plain
