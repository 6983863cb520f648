"""Issue 11's acceptance, end to end through a real daemon and the command line, as a user runs
it: a LoRA fine-tune learns a made-up mapping (1), its PEFT export loads in transformers + peft
with the same logits (2), a classifier beats the majority baseline and ``llmctl classify``
reproduces its validation predictions (4), and a LoRA fine-tune killed with the daemon (kill
-9) resumes to the very adapter an uninterrupted run stores (6).  Points 3 and 5 are tested in
test_adapters_serve.py and the sft unit tests.

The base is made in-process before the daemon starts (fixed seeds): a random 2-layer Llama of
width 32 on a character tokenizer, initialised with std 0.3 (a std-0.02 output layer, frozen
under LoRA, could not make confident logits), written to the daemon's store as ``base``."""
from __future__ import annotations

import json
import os
import random
import time

import pytest

from conftest import Daemon

LETTERS = "abcdefgh"
ALPHABET = LETTERS + ":=ABCDEFGH0123456789 \n"
_RNG = random.Random(0)
WORDS = sorted({"".join(_RNG.choice(LETTERS) for _ in range(3)) for _ in range(400)})
_RNG.shuffle(WORDS)
# The made-up mapping: a word's code is the digit of its last letter (a table the random base
# cannot know); the held-out words are new words, whose last letters the training words used.
CODE = dict(zip(LETTERS, "73058214"))
QUICK = ["--device", "cpu", "--seed", "1", "--warmup", "0", "--block-size", "16"]
LORA = ["--method", "lora", "--rank", "8", "--targets", "all-linear", "--lr", "1e-2", "--batch-size", "16"]
FINISHED = ("succeeded", "failed", "cancelled")


def make_base(state) -> None:
    """The tiny base, stored as ``base`` in the store of a daemon whose state dir is ``state``."""
    from safetensors.torch import save

    from llmosd.models.llama import Llama, LlamaConfig
    from llmosd.models.tokenizer import SentencePieceTokenizer, train_sentencepiece
    from llmosd.store.manifest import Blob, Lineage, Manifest
    from llmosd.store.store import Store
    os.makedirs(state / "store", mode=0o700, exist_ok=True)
    os.chmod(state, 0o700)
    store = Store(str(state / "store"))
    sp = train_sentencepiece(ALPHABET * 20 + "\n".join(WORDS), 0, 1, "char")
    tok = SentencePieceTokenizer(sp)
    cfg = LlamaConfig(vocab_size=tok.vocab_size, hidden_size=32, intermediate_size=64,
                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=64, rms_norm_eps=1e-5, bos_token_id=tok.bos_id,
                      eos_token_id=tok.eos_id)
    model = Llama(cfg)
    model.init_weights(5, std=0.3)
    man = Manifest(parameters=model.param_count(),
                   config=Blob(*store.put_blob(json.dumps(cfg.to_dict()).encode())),
                   tokenizer=Blob(*store.put_blob(sp)), tokenizer_type="sentencepiece",
                   vocab_size=tok.vocab_size, weights=Blob(*store.put_blob(save(model.state_dict_for_save()))),
                   weights_dtype="float32", lineage=Lineage("create"), add_bos=False).to_dict()
    store.write_manifest("base", man)


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def code_task(words):
    return [{"prompt": w + "=", "completion": CODE[w[-1]]} for w in words]


@pytest.fixture(scope="module")
def d(tmp_path_factory):
    """One daemon for the module, its store holding ``base``."""
    dm = Daemon(tmp_path_factory.mktemp("accept"))
    dm.outlives_test = True
    try:
        make_base(dm.state)
        dm.start()
        yield dm
    finally:
        dm.stop()


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    return {"train": write_jsonl(root / "train.jsonl", code_task(WORDS[:160])),
            "val": write_jsonl(root / "val.jsonl", code_task(WORDS[160:200])), "root": root}


def cli_json(d: Daemon, *args, timeout: float = 300):
    return json.loads(d.cli(*args, "--json", timeout=timeout).stdout)


def manifest(d: Daemon, name: str) -> dict:
    return cli_json(d, "show", name)["manifest"]


def read_blob(d: Daemon, digest: str) -> bytes:
    from llmosd.store.store import Store
    return Store(str(d.state / "store")).read_blob(digest)


def score(d: Daemon, model: str, text: str) -> list[dict]:
    return cli_json(d, "score", model, text)["tokens"]


@pytest.fixture(scope="module")
def ft(d, files):
    """The LoRA fine-tune of point 1 (``ft``), run once through ``llmctl finetune --wait``;
    returns its reports (one per line of --json) and the base's evaluation before it."""
    before = cli_json(d, "eval", "base", "--data", str(files["val"]), "--device", "cpu")
    r = d.cli("finetune", "base", "ft", "--data", str(files["train"]), "--val-data", str(files["val"]),
              *LORA, *QUICK, "--max-steps", "200", "--eval-every", "100", "--eval-samples", "40",
              "--wait", "--json", timeout=600)
    lines = [json.loads(line) for line in r.stdout.splitlines()]
    return {"before": before, "first": lines[0], "reports": lines[1:-1], "last": lines[-1]}


PROMPTS = ["abc=", "hgf=4", "bad=3\ncab=7"]


def test_i11_1_lora_finetune_learns_a_made_up_mapping(d, files, ft):
    import torch
    from safetensors.torch import load
    before, last = ft["before"], ft["last"]
    assert ft["first"]["kind"] == "finetune" and ft["first"]["model"] == "ft:latest"
    assert last["state"] == "succeeded" and last["step"] == 200, last
    assert before["metrics"]["exact_match"] == 0.0
    evals = [m for m in ft["reports"] if m.get("val_loss") is not None]
    assert [m["step"] for m in evals] == [100, 200]
    assert evals[-1]["val_loss"] <= 0.5 * before["metrics"]["loss"], (before, evals)
    assert evals[-1]["exact_match"] >= 0.9, evals[-1]

    man = manifest(d, "ft")
    final = man["lineage"]["final"]
    assert final["metrics"]["exact_match"] >= 0.9 and final["val_loss"] <= 0.5 * before["metrics"]["loss"]
    # llmctl eval of the adapter on the validation file agrees
    after = cli_json(d, "eval", "ft", "--data", str(files["val"]), "--device", "cpu", "--eval-samples", "40")
    assert after["examples"] == 40 and after["metrics"]["exact_match"] >= 0.9, after
    assert after["metrics"]["loss"] <= 0.5 * before["metrics"]["loss"], (before, after)

    # the stored adapter holds only adapter weights: lora_A/lora_B of every target, tiny
    assert man["kind"] == "adapter" and "weights" not in man
    assert man["base"]["model"] == "base:latest"
    assert man["base"]["weights"] == manifest(d, "base")["weights"]["digest"]
    tensors = load(read_blob(d, man["adapter"]["digest"]))
    targets = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    want = {f"base_model.model.model.layers.{i}.{'self_attn' if t[0] in 'qkvo' else 'mlp'}.{t}.lora_{ab}.weight"
            for i in range(2) for t in targets for ab in "AB"}
    assert set(tensors) == want
    assert all(t.shape[0 if ".lora_A." in k else 1] == 8 for k, t in tensors.items())
    # its blob is those tensors and a header: no base weight travels with it (rank 8 on every
    # linear layer of a 32-wide model is still less than half of it)
    nbytes = sum(t.numel() * 4 for t in tensors.values())
    assert all(t.dtype == torch.float32 for t in tensors.values())
    assert nbytes < man["adapter"]["size"] < nbytes + 4096
    assert man["adapter"]["size"] < manifest(d, "base")["weights"]["size"] / 2

    # merged: a standalone model whose log-probabilities equal the adapter's within 1e-5
    d.cli("merge", "ft", "ft-merged", timeout=300)
    merged = manifest(d, "ft-merged")
    assert "base" not in merged and merged["weights"]["digest"] != manifest(d, "base")["weights"]["digest"]
    for text in PROMPTS:
        a, m, b = score(d, "ft", text), score(d, "ft-merged", text), score(d, "base", text)
        assert [t["id"] for t in a] == [t["id"] for t in m]
        diff = max(abs(x["logprob"] - y["logprob"]) for x, y in zip(a[1:], m[1:]))
        assert diff <= 1e-5, (text, diff)
        assert max(abs(x["logprob"] - y["logprob"]) for x, y in zip(a[1:], b[1:])) > 1e-2
    # and the same greedy answers (the held-out prompt's code)
    for w in WORDS[160:163]:
        outs = {m: d.cli("generate", m, w + "=", "--temperature", "0", "--max-tokens", "2").stdout.strip()
                for m in ("ft", "ft-merged")}
        assert outs["ft"] == outs["ft-merged"] and outs["ft"].startswith(CODE[w[-1]]), outs


def test_i11_2_exported_peft_adapter_matches_in_transformers(d, ft, tmp_path):
    pytest.importorskip("transformers")
    pytest.importorskip("peft", reason="peft (a test-only oracle) is not installed")
    import torch
    from peft import PeftModel
    from safetensors.torch import load
    from transformers import AutoModelForCausalLM
    d.cli("export", "base", str(tmp_path / "base"), timeout=300)
    d.cli("export", "ft", str(tmp_path / "adapter"), timeout=300)
    assert sorted(os.listdir(tmp_path / "adapter")) == ["adapter_config.json", "adapter_model.safetensors"]
    model = AutoModelForCausalLM.from_pretrained(str(tmp_path / "base"), dtype=torch.float32)
    model = PeftModel.from_pretrained(model, str(tmp_path / "adapter")).eval()
    for text in PROMPTS:
        ours = score(d, "ft", text)
        ids = torch.tensor([[t["id"] for t in ours]])
        with torch.no_grad():
            logp = torch.log_softmax(model(ids).logits[0].float(), dim=-1)
        theirs = logp[torch.arange(len(ours) - 1), ids[0, 1:]]
        diff = max(abs(t["logprob"] - v) for t, v in zip(ours[1:], theirs.tolist()))
        assert diff <= 1e-4, (text, diff)
    # with the adapter disabled, peft gives the base's (the adapter is what changed them)
    with torch.no_grad(), model.disable_adapter():
        plain = torch.log_softmax(model(ids).logits[0].float(), dim=-1)[torch.arange(len(ours) - 1), ids[0, 1:]]
    base = score(d, "base", text)
    assert max(abs(t["logprob"] - v) for t, v in zip(base[1:], plain.tolist())) <= 1e-4

    # imported back as an adapter of base: the same tensors
    d.cli("import", str(tmp_path / "adapter"), "re-imported", "--base", "base", timeout=300)
    man, again = manifest(d, "ft"), manifest(d, "re-imported")
    assert again["kind"] == "adapter" and again["base"] == man["base"]
    a, b = load(read_blob(d, man["adapter"]["digest"])), load(read_blob(d, again["adapter"]["digest"]))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert {k: again["adapter"][k] for k in ("rank", "alpha", "targets")} == \
        {k: man["adapter"][k] for k in ("rank", "alpha", "targets")}


def label_task(n: int, seed: int) -> list[dict]:
    """Two-word texts; the label follows from the last word's last letter: "rare" for f, g, h,
    "common" for the five others (a majority baseline near 5/8)."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        text = " ".join(rng.choice(WORDS) for _ in range(2))
        rows.append({"text": text, "label": "rare" if text[-1] in "fgh" else "common"})
    return rows


def test_i11_4_classifier_beats_majority_and_classify_reproduces_validation(d, tmp_path):
    train, val = label_task(200, 1), label_task(60, 2)
    tr, va = write_jsonl(tmp_path / "train.jsonl", train), write_jsonl(tmp_path / "val.jsonl", val)
    r = d.cli("finetune", "base", "sorter", "--data", str(tr), "--val-data", str(va), "--method", "classify",
              "--labels", "common,rare", "--rank", "8", "--targets", "all-linear", "--lr", "1e-2",
              "--batch-size", "16", *QUICK, "--max-steps", "60", "--eval-every", "60",
              "--wait", "--json", timeout=600)
    lines = [json.loads(line) for line in r.stdout.splitlines()]
    job, last = lines[0]["job_id"], lines[-1]
    assert last["state"] == "succeeded", last
    majority = max(sum(x["label"] == lab for x in val) for lab in ("common", "rare")) / len(val)
    assert 0.55 <= majority <= 0.7
    final = manifest(d, "sorter")["lineage"]["final"]["metrics"]
    assert final["accuracy"] >= max(0.9, majority + 0.25), (final, majority)
    assert final["f1"] >= 0.85, final

    preds = [json.loads(line) for line in
             (d.state / "jobs" / str(job) / "val_predictions.jsonl").read_text().splitlines()]
    assert [p["input"] for p in preds] == [x["text"] for x in val]
    assert [p["gold"] for p in preds] == [x["label"] for x in val]
    assert sum(p["pred"] == p["gold"] for p in preds) / len(preds) == pytest.approx(final["accuracy"])
    out = d.cli("classify", "sorter", *[x["text"] for x in val], "--json").stdout
    got = [json.loads(line) for line in out.splitlines()]
    assert [g["label"] for g in got] == [p["pred"] for p in preds]


def wait_row(d: Daemon, job_id: int, cond, timeout: float = 240.0) -> dict:
    """Poll the job's row (a fresh connection each time: the daemon may restart) until
    ``cond(row)`` or the timeout; returns the last row."""
    deadline = time.monotonic() + timeout
    while True:
        with d.client() as c:
            r = c.job(job_id)["job"]
        if cond(r) or time.monotonic() > deadline:
            return r
        time.sleep(0.1)


def test_i11_6_kill9_during_lora_finetune_resumes_bitwise(d, files):
    # dropout and accumulation: the resumed run must restore the RNG and the batch order too
    args = ["--data", str(files["train"]), "--val-data", str(files["val"]), *LORA, *QUICK,
            "--lora-dropout", "0.1", "--grad-accum", "2", "--max-steps", "300", "--eval-every", "150",
            "--checkpoint-every", "10", "--eval-samples", "4"]
    r = d.cli("finetune", "base", "whole", *args, "--wait", timeout=600)
    assert "succeeded" in r.stdout, r.stdout
    job = json.loads(d.cli("finetune", "base", "killed", *args, "--json").stdout)["job_id"]
    row = wait_row(d, job, lambda r: (r["checkpoint_step"] or 0) >= 10 or r["state"] in FINISHED)
    assert row["state"] == "running" and row["checkpoint_step"] < 300, \
        "the job ended before it could be interrupted"
    d.kill9()
    d.start()                                         # the job is queued again and resumes
    row = wait_row(d, job, lambda r: r["state"] in FINISHED)
    assert row["state"] == "succeeded" and row["step"] == 300, row
    with d.client() as c:
        logs = [x.get("line", "") for x in c.job_logs(job)]
    assert any("from the checkpoint of step" in line for line in logs), logs
    whole, killed = manifest(d, "whole"), manifest(d, "killed")
    assert killed["adapter"]["digest"] == whole["adapter"]["digest"]
    assert killed["lineage"]["final"] == whole["lineage"]["final"]
