"""Issue 11: LoRA adapters on the Llama decoder (models/lora.py) and classification heads
(models/classifier.py).  Tiny models, fixed seeds, CPU."""
from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import save

from llmctl.errors import LoadFailed
from llmosd.models import classifier, lora
from llmosd.models.llama import Llama, LlamaConfig
from llmosd.models.loader import resident_bytes
from llmosd.store.manifest import AdapterManifest, Blob, Lineage
from llmosd.store.store import Store

V = 97


def tiny(**kw) -> Llama:
    cfg = LlamaConfig(vocab_size=V, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128, **kw)
    m = Llama(cfg)
    m.init_weights(seed=0)
    return m.eval()


def tokens(n=12, seed=1, batch=2):
    return torch.randint(0, V, (batch, n), generator=torch.Generator().manual_seed(seed))


def randomize(model, name, seed=3, std=0.05):
    """Non-zero A and B (a trained adapter), reproducibly."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in lora.adapter_parameters(model, name):
            p.copy_(torch.randn(p.shape, generator=g) * std)


def logits(model, x, name=None):
    lora.set_active(model, name)
    with torch.no_grad():
        return model(x)


CFG = lora.LoraConfig(rank=4, alpha=8.0, targets=("q_proj", "v_proj"))


# -- acceptance 1 ----------------------------------------------------------------------------
@pytest.mark.parametrize("targets", [("q_proj", "v_proj"), lora.TARGETS])
def test_i11_1_fresh_adapter_leaves_logits_unchanged_exactly(targets):
    m, x = tiny(), tokens()
    with torch.no_grad():
        base = m(x)
    lora.add_adapter(m, "a", lora.LoraConfig(8, 16.0, targets=targets), seed=5)
    assert torch.equal(logits(m, x, None), base)            # installed, inactive: the base exactly
    assert torch.equal(logits(m, x, "a"), base)             # active, B = 0: nothing changes
    assert any(p.abs().sum() > 0 for p in lora.adapter_parameters(m, "a")[::2])   # A is not zero


@pytest.mark.parametrize("rslora", [False, True])
def test_i11_1_merged_and_unmerged_logits_agree(rslora):
    m, x = tiny(), tokens()
    lora.add_adapter(m, "a", lora.LoraConfig(4, 8.0, targets=lora.TARGETS, rslora=rslora))
    randomize(m, "a")
    with torch.no_grad():
        base = m(x)
    unmerged = logits(m, x, "a")
    assert (unmerged - base).abs().max() > 1e-3              # the adapter does something
    lora.merge_adapter(m, "a")
    with torch.no_grad():
        merged = m(x)
    torch.testing.assert_close(merged, unmerged, atol=1e-5, rtol=1e-5)
    assert not any(len(mod.lora_A) for _, mod in lora._lora_modules(m))   # merged away


def test_i11_1_adapter_tensors_are_only_adapter_weights(tmp_path):
    m = tiny()
    before = {k: v.data_ptr() for k, v in m.state_dict().items()}
    q = m.model.layers[0].self_attn.q_proj.weight
    bytes_before = resident_bytes(m)
    lora.add_adapter(m, "a", CFG)
    randomize(m, "a")
    # the base is shared, not copied: same Parameters, same names, same storage
    assert m.model.layers[0].self_attn.q_proj.weight is q
    assert isinstance(m.model.layers[0].self_attn.q_proj, torch.nn.Linear)
    sd = m.state_dict()
    assert {k: sd[k].data_ptr() for k in before} == before
    extra = set(sd) - set(before)
    assert extra and all(".lora_A.a" in k or ".lora_B.a" in k for k in extra)
    t = lora.adapter_tensors(m, "a")
    assert len(t) == 2 * 2 * 2                              # A and B x 2 targets x 2 layers
    assert all(k.startswith("base_model.model.model.layers.") and k.endswith((".lora_A.weight", ".lora_B.weight"))
               for k in t)
    assert t["base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight"].shape == (32, 4)
    assert t["base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"].shape == (4, 64)
    n = sum(v.numel() for v in t.values())
    assert n == 2 * (4 * 64 + 64 * 4) + 2 * (4 * 64 + 32 * 4)
    assert resident_bytes(m) - bytes_before == 4 * n           # float32 adapter bytes, nothing else
    # the stored blob (what a manifest's "adapter" points to) reads back as these tensors only
    store = Store(str(tmp_path / "store"))
    man = adapter_manifest(store, m, t, CFG)
    ad = lora.read_adapter(store, man, "sha256:" + "0" * 64)
    assert set(ad.tensors) == set(t) and all(torch.equal(ad.tensors[k], t[k]) for k in t)
    assert ad.lora == CFG and ad.head is None and ad.nbytes() == 4 * n
    # removing it gives back the base state dict exactly
    lora.remove_adapter(m, "a")
    assert set(m.state_dict()) == set(before) and resident_bytes(m) == bytes_before


def adapter_manifest(store, m, tensors, cfg, head=None, labels=None) -> dict:
    c = Blob(*store.put_blob(json.dumps(m.config.to_dict()).encode()))
    base = {"config": {"digest": c.digest, "size": c.size}, "tokenizer": {"digest": c.digest, "size": 1},
            "weights": {"digest": "sha256:" + "1" * 64, "size": 1}}
    a = Blob(*store.put_blob(save(tensors))) if tensors is not None else None
    h = Blob(*store.put_blob(save({"score.weight": head}))) if head is not None else None
    return AdapterManifest(base, "base:latest", "sha256:" + "2" * 64, Lineage("finetune", "base:latest"),
                           1, adapter=a, lora=cfg.to_dict() if a else None, head=h, labels=labels).to_dict()


def test_i11_read_adapter_refuses_blobs_that_do_not_fit(tmp_path):
    m, store = tiny(), Store(str(tmp_path / "store"))
    lora.add_adapter(m, "a", CFG)
    t = lora.adapter_tensors(m, "a")
    t.pop("base_model.model.model.layers.1.self_attn.q_proj.lora_B.weight")
    with pytest.raises(LoadFailed, match="layers.1.self_attn.q_proj.lora_B.weight is missing"):
        lora.read_adapter(store, adapter_manifest(store, m, t, CFG), "k")
    man = adapter_manifest(store, m, None, CFG, head=torch.zeros(3, 64), labels=["x", "y"])
    with pytest.raises(LoadFailed, match="2 labels"):
        lora.read_adapter(store, man, "k")
    man = adapter_manifest(store, m, None, CFG, head=torch.ones(2, 64), labels=["x", "y"])
    ad = lora.read_adapter(store, man, "k")
    assert ad.lora is None and ad.labels == ["x", "y"] and torch.equal(ad.head, torch.ones(2, 64))


# -- targets, shapes, names --------------------------------------------------------------------
def test_i11_targets_resolve_and_unknown_ones_are_named():
    assert lora.resolve_targets("all-linear") == lora.TARGETS == lora.resolve_targets(["all-linear"])
    assert lora.resolve_targets("v_proj, q_proj") == ("q_proj", "v_proj")
    assert lora.resolve_targets(["down_proj", "q_proj"]) == ("q_proj", "down_proj")
    with pytest.raises(ValueError, match="no linear layer named 'c_attn'.*q_proj, k_proj"):
        lora.resolve_targets(["q_proj", "c_attn"])
    with pytest.raises(ValueError, match="no LoRA target"):
        lora.resolve_targets("")
    with pytest.raises(ValueError, match="targets must be"):
        lora.resolve_targets(5)
    with pytest.raises(ValueError, match="'lm_head'"):
        lora.add_adapter(tiny(), "a", lora.LoraConfig(4, 8.0, targets=("lm_head",)))


def test_i11_lora_config_round_trips_and_scales():
    c = lora.LoraConfig(8, 16.0, 0.1, ("q_proj", "v_proj"), False)
    assert lora.LoraConfig.from_dict(c.to_dict()) == c and c.scale == 2.0
    assert lora.LoraConfig(16, 8.0, rslora=True).scale == 8.0 / math.sqrt(16)
    assert c.to_dict() == {"rank": 8, "alpha": 16.0, "dropout": 0.1, "targets": ["q_proj", "v_proj"],
                           "rslora": False}


def test_i11_shape_check_names_the_key():
    m = tiny()
    lora.add_adapter(m, "a", CFG)
    t = lora.adapter_tensors(m, "a")
    k = "base_model.model.model.layers.0.self_attn.v_proj.lora_B.weight"
    bad = dict(t, **{k: torch.zeros(64, 4)})
    with pytest.raises(ValueError, match=k.replace(".", r"\.") + r" has shape \(64, 4\).*\(32, 4\)"):
        lora.add_adapter(m, "b", CFG, bad)
    bad = {x: v for x, v in t.items() if x != k}
    with pytest.raises(ValueError, match=k.replace(".", r"\.") + " is missing"):
        lora.add_adapter(m, "b", CFG, bad)
    extra = "base_model.model.model.layers.0.mlp.up_proj.lora_A.weight"
    with pytest.raises(ValueError, match="unexpected tensor " + extra.replace(".", r"\.")):
        lora.add_adapter(m, "b", CFG, dict(t, **{extra: torch.zeros(4, 64)}))
    with pytest.raises(ValueError, match="rank 8"):        # right keys, another rank
        lora.add_adapter(m, "b", lora.LoraConfig(8, 8.0), t)
    with pytest.raises(ValueError, match="already has an adapter"):
        lora.add_adapter(m, "a", CFG)
    # nothing half-installed by the refusals
    assert [n for _, mod in lora._lora_modules(m) for n in mod.lora_A] == ["a"] * 4


def test_i11_digest_keys_are_adapter_names():
    assert lora.adapter_name("sha256:" + "ab" * 32) == "a" + "ab" * 8
    assert lora.adapter_name("x1") == "x1"
    with pytest.raises(ValueError):
        lora.adapter_name("no good")


# -- several adapters on one model -------------------------------------------------------------
def test_i11_3_two_adapters_each_give_their_own_logits():
    m, x = tiny(), tokens()
    with torch.no_grad():
        base = m(x)
    ka, kb = "sha256:" + "a" * 64, "sha256:" + "b" * 64
    lora.add_adapter(m, ka, CFG)
    randomize(m, ka, seed=1)
    cb = lora.LoraConfig(2, 4.0, targets=("o_proj", "down_proj", "q_proj"))
    lora.add_adapter(m, kb, cb)
    randomize(m, kb, seed=2)
    la, lb = logits(m, x, ka), logits(m, x, kb)
    assert torch.equal(logits(m, x, None), base)
    assert not torch.allclose(la, base) and not torch.allclose(lb, base) and not torch.allclose(la, lb)
    # each equals a model carrying that adapter alone
    for key, want in ((ka, la), (kb, lb)):
        other = tiny()
        src = lora.adapter_tensors(m, key)
        lora.add_adapter(other, key, CFG if key == ka else cb, src)
        assert torch.equal(logits(other, x, key), want)
    lora.remove_adapter(m, ka)
    assert torch.equal(logits(m, x, kb), lb) and torch.equal(logits(m, x, None), base)
    with pytest.raises(KeyError):
        lora.set_active(m, ka)
    lora.uninstall(m, ka)                                       # gone already: nothing to do


def test_i11_install_an_adapter_read_from_the_store(tmp_path):
    m, x, store = tiny(), tokens(), Store(str(tmp_path / "store"))
    src = tiny()
    lora.add_adapter(src, "a", CFG)
    randomize(src, "a")
    want = logits(src, x, "a")
    key = "sha256:" + "c" * 64
    ad = lora.read_adapter(store, adapter_manifest(store, src, lora.adapter_tensors(src, "a"), CFG), key)
    lora.install(m, ad, torch.device("cpu"))
    assert torch.equal(logits(m, x, key), want)
    lora.uninstall(m, key)
    assert torch.equal(logits(m, x, None), logits(src, x, None))


# -- training: gradients and dropout ------------------------------------------------------------
def test_i11_trainable_adapter_gets_the_gradients():
    m, x = tiny(), tokens()
    for p in m.parameters():
        p.requires_grad_(False)
    lora.add_adapter(m, "a", lora.LoraConfig(4, 8.0, dropout=0.1), trainable=True)
    lora.add_adapter(m, "b", CFG)                                # frozen: requires_grad False
    assert all(p.requires_grad for p in lora.adapter_parameters(m, "a"))
    assert not any(p.requires_grad for p in lora.adapter_parameters(m, "b"))
    lora.set_active(m, "a")
    m.train()
    m(x).logsumexp(-1).mean().backward()
    grads = [p.grad for p in lora.adapter_parameters(m, "a")]
    assert all(g is not None for g in grads) and any(g.abs().sum() > 0 for g in grads[1::2])  # B learns
    assert [n for n, p in m.named_parameters() if p.grad is not None] == \
        [n for n, p in m.named_parameters() if ".lora_A.a" in n or ".lora_B.a" in n]


def test_i11_lora_dropout_only_in_training_and_seeded():
    m, x = tiny(), tokens()
    lora.add_adapter(m, "a", lora.LoraConfig(4, 8.0, dropout=0.5))
    randomize(m, "a")
    lora.set_active(m, "a")
    with torch.no_grad():
        ev = [m(x) for _ in range(2)]
        assert torch.equal(ev[0], ev[1])                          # eval: no dropout
        m.train()
        runs = []
        for _ in range(2):
            torch.manual_seed(7)
            runs.append(m(x))
        torch.manual_seed(8)
        other = m(x)
    assert torch.equal(runs[0], runs[1]) and not torch.equal(runs[0], ev[0])
    assert not torch.equal(other, runs[0])


# -- classifier heads ----------------------------------------------------------------------------
def test_i11_4_pooled_is_the_last_real_token_whatever_the_padding():
    m = tiny()
    ids = [[5, 6, 7, 8, 9, 10, 11], [3, 4], [1]]
    head = classifier.new_head(64, 3, seed=0)
    assert head.shape == (3, 64) and head.dtype == torch.float32 and abs(head.std() - 0.02) < 0.005
    with torch.no_grad():
        batch = classifier.head_logits(m, head, ids, torch.device("cpu"))
        alone = torch.cat([classifier.head_logits(m, head, [x], "cpu") for x in ids])
        direct = m.model.norm(m.hidden(torch.tensor([ids[1]])))[:, -1].float() @ head.T
    assert batch.shape == (3, 3) and batch.dtype == torch.float32
    torch.testing.assert_close(batch, alone, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(batch[1:2], direct, atol=1e-6, rtol=1e-6)
    with pytest.raises(ValueError, match="at least one token"):
        classifier.pooled(m, [[1], []], "cpu")


# -- code review of the serving of adapters ----------------------------------------------------
def test_i11_review_1_a_failed_add_adapter_leaves_the_model_as_it_was():
    m = tiny()
    src = tiny()
    lora.add_adapter(src, "a", CFG, seed=2)
    good = lora.adapter_tensors(src, "a")
    last_b = [k for k in good if "lora_B" in k][-1]
    broken = dict(good, **{last_b: torch.empty(good[last_b].shape, device="meta")})
    before, nbytes = dict(m.state_dict()), resident_bytes(m)
    with pytest.raises(NotImplementedError):                    # the last layer's copy fails
        lora.add_adapter(m, "a", CFG, broken)
    assert lora._lora_modules(m) == [] and resident_bytes(m) == nbytes
    assert set(m.state_dict()) == set(before)
    lora.add_adapter(m, "a", CFG, good)                         # the name is free: a retry works
    assert all(torch.equal(v, good[k]) for k, v in lora.adapter_tensors(m, "a").items())


def test_i11_review_5_read_adapter_refuses_a_head_of_the_wrong_width(tmp_path):
    m, store = tiny(), Store(str(tmp_path / "store"))
    man = adapter_manifest(store, m, None, CFG, head=torch.ones(2, 32), labels=["x", "y"])
    with pytest.raises(LoadFailed, match=r"shape \(2, 32\).*hidden size 64 need \(2, 64\)"):
        lora.read_adapter(store, man, "k")
