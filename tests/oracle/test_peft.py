"""Issue 11: LoRA adapters in PEFT's format (formats/peft.py), with peft and transformers as the
oracles: our adapter loaded by ``peft`` gives our logits, peft's adapter read by llmosd gives
peft's; classifier heads give LlamaForSequenceClassification's logits.  The import job's
refusals need neither oracle."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save, save_file

from llmctl.errors import InvalidArgument
from llmosd.formats import peft as fpeft
from llmosd.models import classifier, lora
from llmosd.models.llama import Llama, LlamaConfig
from llmosd.store.manifest import base_of
from llmosd.store.store import Store

DIMS = dict(vocab_size=101, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
            rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=False)


def oracles():
    tf = pytest.importorskip("transformers", reason="transformers is the test oracle (pip install transformers)")
    pf = pytest.importorskip("peft", reason="peft is the test oracle (pip install peft)")
    return tf, pf


def hf_model(tf, cls="LlamaForCausalLM", **kw):
    torch.manual_seed(0)
    return getattr(tf, cls)(tf.LlamaConfig(**DIMS, **kw)).float().eval()


def ours_from(hf) -> Llama:
    m = Llama(LlamaConfig(**DIMS))
    m.init_weights(seed=1)
    sd = {k: v for k, v in hf.state_dict().items() if not k.endswith("rotary_emb.inv_freq")}
    m.load_weights(sd)
    return m.eval()


def ids(n=9, seed=4):
    return torch.randint(3, DIMS["vocab_size"], (2, n), generator=torch.Generator().manual_seed(seed))


def manifest_for(lcfg: lora.LoraConfig) -> dict:
    d = {"digest": "sha256:" + "0" * 64, "size": 1, "format": "peft-lora", **lcfg.to_dict()}
    return {"kind": "adapter", "adapter": d,
            "base": {"model": "tiny:latest", "manifest": "sha256:" + "1" * 64, "weights": "sha256:" + "2" * 64}}


@pytest.mark.parametrize("lcfg", [lora.LoraConfig(4, 8.0, targets=("q_proj", "v_proj")),
                                  lora.LoraConfig(2, 3.0, 0.1, lora.TARGETS, rslora=True)],
                         ids=["q_v", "all_linear_rslora"])
def test_i11_2_peft_loads_our_adapter_with_same_logits(tmp_path, lcfg):
    tf, pf = oracles()
    hf = hf_model(tf)
    ours = ours_from(hf)
    x = ids()
    with torch.no_grad():
        torch.testing.assert_close(ours(x), hf(x).logits, atol=1e-4, rtol=1e-4)   # same base
    lora.add_adapter(ours, "a", lcfg, seed=3)
    g = torch.Generator().manual_seed(9)
    with torch.no_grad():
        for p in lora.adapter_parameters(ours, "a"):
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    lora.set_active(ours, "a")
    with torch.no_grad():
        want = ours(x)
    # the export: adapter_files' config bytes, and the blob as lora.adapter_tensors writes it
    d = tmp_path / "adapter"
    d.mkdir()
    entries = fpeft.adapter_files(manifest_for(lcfg))
    assert [e["name"] for e in entries] == ["adapter_config.json", "adapter_model.safetensors"]
    (d / "adapter_config.json").write_bytes(entries[0]["data"])
    assert json.loads(entries[0]["data"]) == fpeft.adapter_config(manifest_for(lcfg), "tiny:latest")
    save_file(lora.adapter_tensors(ours, "a"), str(d / "adapter_model.safetensors"), metadata={"format": "pt"})
    pm = pf.PeftModel.from_pretrained(hf, str(d)).eval()
    with torch.no_grad():
        got = pm(x).logits
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    with torch.no_grad(), pm.disable_adapter():
        assert (pm(x).logits - got).abs().max() > 1e-3        # the adapter mattered


@pytest.mark.parametrize("targets,rslora", [(["q_proj", "v_proj"], False), ("all-linear", True)])
def test_i11_2_peft_adapter_read_by_llmosd_gives_peft_logits(tmp_path, targets, rslora):
    tf, pf = oracles()
    hf = hf_model(tf)
    ours = ours_from(hf)
    x = ids(seed=5)
    pm = pf.get_peft_model(hf, pf.LoraConfig(r=4, lora_alpha=16, target_modules=targets, use_rslora=rslora,
                                             task_type="CAUSAL_LM", init_lora_weights=False)).eval()
    with torch.no_grad():
        want = pm(x).logits
    pm.save_pretrained(str(tmp_path / "p"))
    paths = {p.name: str(p) for p in (tmp_path / "p").iterdir()}
    lcfg, tensors = fpeft.read_peft_dir(paths, ours.config)
    assert lcfg == lora.LoraConfig(4, 16.0, 0.0, lora.resolve_targets(targets), rslora)
    lora.add_adapter(ours, "p", lcfg, tensors)
    lora.set_active(ours, "p")
    with torch.no_grad():
        torch.testing.assert_close(ours(x), want, atol=1e-4, rtol=1e-4)


def test_i11_4_head_logits_equal_llama_for_sequence_classification():
    tf, _ = oracles()
    hf = hf_model(tf, "LlamaForSequenceClassification", num_labels=3, pad_token_id=0)
    ours = Llama(LlamaConfig(**DIMS))
    ours.init_weights(seed=1)
    own = ours.state_dict()
    with torch.no_grad():
        for k, v in hf.state_dict().items():
            if k.startswith("model.") and k in own:
                own[k].copy_(v)
    head = hf.score.weight.detach().clone()
    batch = [[5, 6, 7, 8, 9, 10, 11], [3, 4], [12, 13, 14, 15]]     # no pad id inside any input
    x = torch.zeros(3, 7, dtype=torch.long)
    for i, s in enumerate(batch):
        x[i, :len(s)] = torch.tensor(s)
    with torch.no_grad():
        want = hf(input_ids=x).logits
        got = classifier.head_logits(ours.eval(), head, batch, torch.device("cpu"))
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


# -- the import job (no oracle needed) ---------------------------------------------------------------
def tiny_base(store: Store) -> tuple[dict, Llama]:
    m = Llama(LlamaConfig(**DIMS))
    m.init_weights(seed=2)
    cd, cs = store.put_blob(json.dumps(m.config.to_dict()).encode())
    wd, ws = store.put_blob(b"weights")
    man = {"schema": 1, "architecture": "llama", "parameters": m.param_count(),
           "config": {"digest": cd, "size": cs, "media": "application/json"},
           "tokenizer": {"digest": cd, "size": cs, "type": "hf-tokenizers", "vocab_size": 101},
           "weights": {"digest": wd, "size": ws, "format": "safetensors", "dtype": "float32"},
           "chat_template": None, "defaults": {}, "lineage": {"method": "create", "parent": None, "args": {}}}
    return man, m


PEFT_CFG = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": 4, "lora_alpha": 8, "lora_dropout": 0.05,
            "target_modules": ["q_proj", "v_proj"], "bias": "none", "fan_in_fan_out": False,
            "use_dora": False, "use_rslora": False, "modules_to_save": None, "layers_to_transform": None,
            "layers_pattern": None, "rank_pattern": {}, "alpha_pattern": {}, "lora_bias": False,
            "base_model_name_or_path": "someone/tiny"}


def run_import(store, base_man, cfg=None, tensors=None, *, raw=None, name="adapter_model.safetensors"):
    files = {}
    body = raw if raw is not None else json.dumps(cfg).encode()
    files["adapter_config.json"] = store.put_blob(body)[0]
    if tensors is not None:
        files[name] = store.put_blob(save(tensors) if isinstance(tensors, dict) else tensors)[0]
    spec = {"files": files, "_base": {"name": "tiny:latest", "digest": "sha256:" + "9" * 64, "manifest": base_man}}
    seen = []
    return fpeft.import_adapter(spec, store.root, seen.append), files


def adapter_of(m: Llama, lcfg: lora.LoraConfig, dtype=torch.float32) -> dict:
    lora.add_adapter(m, "x", lcfg, seed=1)
    t = {k: v.to(dtype) for k, v in lora.adapter_tensors(m, "x").items()}
    lora.remove_adapter(m, "x")
    return t


def test_i11_import_peft_adapter_makes_an_adapter_manifest(tmp_path):
    store = Store(str(tmp_path / "store"))
    base, m = tiny_base(store)
    t = adapter_of(m, lora.LoraConfig(4, 8.0, targets=("q_proj", "v_proj")), torch.bfloat16)
    man, files = run_import(store, base, PEFT_CFG, t)
    assert man["kind"] == "adapter" and base_of(man) == {"model": "tiny:latest", "manifest": "sha256:" + "9" * 64,
                                                         "weights": base["weights"]["digest"]}
    assert "weights" not in man and man["config"] == base["config"]
    a = man["adapter"]
    assert (a["rank"], a["alpha"], a["dropout"], a["targets"], a["rslora"]) == \
        (4, 8.0, 0.05, ["q_proj", "v_proj"], False)
    assert man["parameters"] == sum(v.numel() for v in t.values())
    lin = man["lineage"]
    assert lin["method"] == "import" and lin["parent"] == "tiny:latest"
    assert lin["args"]["format"] == "peft" and lin["args"]["sources"] == files
    ad = lora.read_adapter(store, man, "k")                  # stored as float32, PEFT names
    assert all(v.dtype == torch.float32 for v in ad.tensors.values())
    assert all(torch.equal(ad.tensors[k], t[k].float()) for k in t)
    # and the export of what was imported is the same tensors and settings
    out = fpeft.adapter_files(man)
    cfg = json.loads(out[0]["data"])
    assert (cfg["r"], cfg["lora_alpha"], cfg["target_modules"], cfg["base_model_name_or_path"]) == \
        (4, 8, ["q_proj", "v_proj"], "tiny:latest")
    assert out[1]["digest"] == a["digest"]


@pytest.mark.parametrize("change,needle", [
    ({"peft_type": "IA3"}, "peft_type is 'IA3'"),
    ({"use_dora": True}, "DoRA"),
    ({"bias": "all"}, "bias is 'all'.*bias=\"none\""),
    ({"fan_in_fan_out": True}, "fan_in_fan_out"),
    ({"modules_to_save": ["lm_head"]}, "modules_to_save"),
    ({"layers_to_transform": [0]}, "layers_to_transform"),
    ({"layers_to_transform": 0}, "layers_to_transform"),
    ({"rank_pattern": {"q_proj": 8}}, "rank_pattern"),
    ({"task_type": "SEQ_CLS"}, "task_type is 'SEQ_CLS'"),
    ({"target_modules": ["q_proj", "c_attn"]}, "no linear layer named 'c_attn'"),
    ({"target_modules": ["q_proj", "v_proj", "k_proj"]}, "k_proj.lora_A.weight is missing"),
    ({"r": 8}, "has shape .*rank 8"),
    ({"r": "4"}, "r must be an integer"),
    ({"lora_alpha": -1}, "lora_alpha must be"),
])
def test_i11_import_refuses_what_llmosd_cannot_apply(tmp_path, change, needle):
    store = Store(str(tmp_path / "store"))
    base, m = tiny_base(store)
    t = adapter_of(m, lora.LoraConfig(4, 8.0, targets=("q_proj", "v_proj")))
    with pytest.raises(ValueError, match=needle):
        run_import(store, base, {**PEFT_CFG, **change}, t)


def test_i11_import_refuses_bad_files(tmp_path):
    store = Store(str(tmp_path / "store"))
    base, m = tiny_base(store)
    t = adapter_of(m, lora.LoraConfig(4, 8.0, targets=("q_proj", "v_proj")))
    with pytest.raises(ValueError, match="adapter_model.bin is a pickled.*safe_serialization=True"):
        run_import(store, base, PEFT_CFG, b"pickle", name="adapter_model.bin")
    with pytest.raises(ValueError, match="no adapter_model.safetensors"):
        run_import(store, base, PEFT_CFG)
    with pytest.raises(ValueError, match="not a readable safetensors file"):
        run_import(store, base, PEFT_CFG, save(t)[:50])
    with pytest.raises(ValueError, match="not valid JSON"):
        run_import(store, base, raw=b"{nope", tensors=t)
    other = Llama(LlamaConfig(**{**DIMS, "hidden_size": 32}))        # trained on another model
    with pytest.raises(ValueError, match="does not fit the base model.*has shape"):
        run_import(store, base, PEFT_CFG, adapter_of(other, lora.LoraConfig(4, 8.0)))
    # a regular expression as target_modules: the tensors say which layers
    man, _ = run_import(store, base, {**PEFT_CFG, "target_modules": r".*\.(q_proj|v_proj)"}, t)
    assert man["adapter"]["targets"] == ["q_proj", "v_proj"]


def test_i11_export_refuses_classifiers_and_full_models():
    with pytest.raises(InvalidArgument, match="classifier.*PEFT"):
        fpeft.adapter_files({"kind": "classifier", "head": {"digest": "sha256:" + "0" * 64}})
    with pytest.raises(InvalidArgument, match="not a LoRA adapter"):
        fpeft.adapter_files({"weights": {"digest": "sha256:" + "0" * 64}})
