"""export: a stored model written as a Hugging Face directory that transformers loads as it is."""
import json

import pytest
import torch

transformers = pytest.importorskip("transformers", reason="transformers is the test oracle (pip install transformers)")


def test_export_sentencepiece_model_round_trips(shared_daemon, tmp_path):
    import sentencepiece as spm
    d = tmp_path / "tiny-hf"
    r = json.loads(shared_daemon.cli("export", "tiny", str(d), "--json").stdout)
    assert "tokenizer.model" in r["files"]
    assert not [p.name for p in d.iterdir() if p.name.startswith(".")]      # no temp files left
    hf = transformers.LlamaForCausalLM.from_pretrained(str(d)).eval()
    from llmosd.models.loader import load_model
    from llmosd.store.store import Store
    store = Store(str(shared_daemon.state / "store"))
    _, man, _ = store.get("tiny")
    ours, tok = load_model(store, man, torch.device("cpu"))
    x = torch.tensor([tok.encode("ROMEO: hark")])
    with torch.no_grad():
        torch.testing.assert_close(hf(x).logits, ours(x), atol=1e-4, rtol=1e-4)
    sp = spm.SentencePieceProcessor(model_file=str(d / "tokenizer.model"))
    assert [sp.bos_id()] + sp.encode("ROMEO: hark") == tok.encode("ROMEO: hark")
    tcfg = json.loads((d / "tokenizer_config.json").read_text())
    assert tcfg["bos_token"] == "<s>" and tcfg["add_bos_token"] is True
    # importing the export gives back the very same weights
    shared_daemon.cli("import", str(d), "tiny-rt")
    a, b = (json.loads(shared_daemon.cli("show", m, "--json").stdout)["manifest"] for m in ("tiny", "tiny-rt"))
    assert a["weights"]["digest"] == b["weights"]["digest"]
    assert a["tokenizer"]["digest"] == b["tokenizer"]["digest"]
    shared_daemon.cli("rm", "tiny-rt")


def test_export_refuses_a_file_and_unknown_models(shared_daemon, tmp_path):
    f = tmp_path / "file"
    f.write_text("x")
    r = shared_daemon.cli("export", "tiny", str(f), check=False)
    assert r.returncode != 0
    r = shared_daemon.cli("export", "nosuch", str(tmp_path / "x"), check=False)
    assert r.returncode == 66 and not (tmp_path / "x").exists()
