"""Hugging Face directory import, checked against transformers on the same weights."""
from __future__ import annotations

import json
import shutil

import pytest
import torch

from conftest import assert_refused_store_unchanged, train_bpe

transformers = pytest.importorskip("transformers", reason="transformers is the test oracle (pip install transformers)")


def make_tokenizer(d):
    from tokenizers import processors
    tk = train_bpe()
    tk.post_processor = processors.ByteLevel(trim_offsets=False)
    tk.save(str(d / "tokenizer.json"))
    (d / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": "<|im_start|>", "eos_token": "<|im_end|>", "add_bos_token": False,
         "chat_template": "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"}))
    return tk.get_vocab_size()


def make_hf_model(d, *, kv_heads=2, tied=False, shards=False):
    d.mkdir(parents=True, exist_ok=True)
    vocab = make_tokenizer(d)
    cfg = transformers.LlamaConfig(vocab_size=vocab, hidden_size=64, intermediate_size=176,
                                   num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=kv_heads, max_position_embeddings=256,
                                   rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=tied,
                                   bos_token_id=1, eos_token_id=2)
    torch.manual_seed(0)
    m = transformers.LlamaForCausalLM(cfg).eval()
    m.save_pretrained(d, safe_serialization=True, max_shard_size="100KB" if shards else "10GB")
    return m


@pytest.mark.parametrize("kv_heads,tied,shards", [(2, False, False), (4, True, False), (1, False, True)])
def test_logits_match_transformers(shared_daemon, tmp_path, kv_heads, tied, shards):
    hf = make_hf_model(tmp_path / "m", kv_heads=kv_heads, tied=tied, shards=shards)
    if shards:
        assert (tmp_path / "m" / "model.safetensors.index.json").exists()
    name = f"hf-{kv_heads}-{int(tied)}-{int(shards)}"
    r = json.loads(shared_daemon.cli("import", str(tmp_path / "m"), name, "--json").stdout)
    assert r["model"] == f"{name}:latest"
    from llmosd.models.loader import load_model
    from llmosd.store.store import Store
    store = Store(str(shared_daemon.state / "store"))
    _, man, _ = store.get(name)
    ours, tok = load_model(store, man, torch.device("cpu"))
    for n in (1, 7, 33):
        x = torch.randint(0, hf.config.vocab_size, (1, n), generator=torch.Generator().manual_seed(n))
        with torch.no_grad():
            torch.testing.assert_close(ours(x), hf(x).logits.float(), atol=1e-4, rtol=1e-4)
    # greedy generation through the daemon equals transformers' greedy generate
    prompt = "ROMEO: What light"
    ids = tok.encode(prompt)
    with shared_daemon.client() as c:
        g = c.generate(name, prompt, max_tokens=16, temperature=0)
        g.text()
    got = [t for ch in g.chunks for t in ch["token_ids"]]
    with torch.no_grad():
        ref = hf.generate(torch.tensor([ids]), max_new_tokens=16, do_sample=False,
                          eos_token_id=sorted(tok.eos_ids()))[0, len(ids):].tolist()
    ref = [t for t in ref if t not in tok.eos_ids()]
    assert got == ref[:len(got)] and len(got) == g.stats["generated_tokens"] - (g.stats["finish_reason"] == "stop")
    # the raw uploads are gone: only the model's own blobs remain for it
    shared_daemon.cli("unload", name)
    shared_daemon.cli("rm", name)


@pytest.mark.parametrize("breakage,needle", [
    ("arch", "architecture 'gpt2'"),
    ("missing", "model.norm.weight is missing"),
    ("shape", "has shape"),
    ("truncated", "not a readable safetensors file"),
    ("notok", "no tokenizer.json or tokenizer.model"),
    ("noconfig", "no config.json"),
])
def test_malformed_imports_are_refused_and_store_unchanged(shared_daemon, tmp_path, breakage, needle):
    from safetensors.torch import load_file, save_file
    d = tmp_path / "m"
    make_hf_model(d)
    w = d / "model.safetensors"
    if breakage == "arch":
        cfg = json.loads((d / "config.json").read_text())
        cfg["model_type"] = "gpt2"
        (d / "config.json").write_text(json.dumps(cfg))
    elif breakage in ("missing", "shape"):
        sd = load_file(str(w))
        if breakage == "missing":
            sd.pop("model.norm.weight")
        else:
            sd["model.norm.weight"] = torch.ones(3)
        save_file(sd, str(w), metadata={"format": "pt"})
    elif breakage == "truncated":
        data = w.read_bytes()
        w.write_bytes(data[: len(data) // 2])
    elif breakage == "notok":
        (d / "tokenizer.json").unlink()
    elif breakage == "noconfig":
        (d / "config.json").unlink()
    assert_refused_store_unchanged(shared_daemon, ("import", str(d), "broken"), needle)


def test_chat_template_from_tokenizer_config_and_long_history_trimmed(shared_daemon, tmp_path):
    make_hf_model(tmp_path / "m")                  # context 256, ChatML template, eos <|im_end|>
    shared_daemon.cli("import", str(tmp_path / "m"), "hf-chat")
    long = [{"role": r, "content": "ROMEO: But soft, what light through yonder window breaks? " * 2}
            for _ in range(20) for r in ("user", "assistant")] + [{"role": "user", "content": "hello"}]
    with shared_daemon.client() as c:
        g = c.chat("hf-chat", long, max_tokens=8, temperature=0)
        g.text()
        assert g.stats["dropped_messages"] > 0 and g.stats["prompt_tokens"] <= 256 - 8
        g = c.chat("hf-chat", [{"role": "user", "content": "hi"}], max_tokens=4, temperature=0)
        g.text()
        assert g.stats["dropped_messages"] == 0
    # the rendered prompt is the template's, token for token
    from llmosd.models.loader import build_tokenizer
    from llmosd.store.store import Store
    store = Store(str(shared_daemon.state / "store"))
    _, man, _ = store.get("hf-chat")
    tok = build_tokenizer(man["tokenizer"]["type"], store.read_blob(man["tokenizer"]["digest"]), man)
    assert g.stats["prompt_tokens"] == len(tok.encode("<|im_start|>user\nhi<|im_end|>\n", add_bos=False))
    shared_daemon.cli("unload", "hf-chat")
    shared_daemon.cli("rm", "hf-chat")
