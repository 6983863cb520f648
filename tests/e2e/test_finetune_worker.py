"""Issue 11: the fine-tuning, eval and merge job functions run in-process against a real store
(no daemon): a tiny base made here with fixed seeds, a made-up task it cannot know."""
from __future__ import annotations

import json
import os
import random

import pytest
import torch
from safetensors.torch import load as load_safetensors

from llmosd.store.manifest import Blob, Lineage, Manifest, Serving
from llmosd.store.store import Store
from llmosd.train import finetune, merge, metrics
from llmosd.train.pretrain import Paused

_RNG = random.Random(0)
WORDS = ["".join(_RNG.choice("abcdefgh") for _ in range(3)) for _ in range(200)]
ALPHABET = "abcdefgh:=ABCDEFGH0123456789 \n"


class FakeCtl:
    """The worker's ctl, recorded; ``stop_at``: ask for ``stop`` once that step is reported;
    ``crash_at``: raise (as a killed worker stops) once that step is reported."""

    def __init__(self, job_dir, stop_at=None, stop="pause", crash_at=None):
        self.job_id, self.job_dir = 3, str(job_dir)
        os.makedirs(self.job_dir, exist_ok=True)
        self.stop_at, self.stop, self.crash_at = stop_at, stop, crash_at
        self.metrics_seen, self.lines, self.checkpoints = [], [], []

    def progress(self, p):
        pass

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


CHATML = ("{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def make_base(store: Store, chat: bool = False) -> dict:
    """A random 2-layer Llama, stored, with a character tokenizer (``chat``: a byte-level BPE
    with ChatML specials and template, end of text its EOS); returns the daemon's ``_base``
    (name, digest and the manifest's entries)."""
    from safetensors.torch import save

    from llmosd.models.llama import Llama, LlamaConfig
    from llmosd.models.loader import build_tokenizer
    from llmosd.models.tokenizer import hf_bundle, train_sentencepiece
    if chat:
        from conftest import train_bpe
        kind, blob = "hf-tokenizers", hf_bundle(train_bpe(300).to_str(), {"eos_token": "<|endoftext|>"}, {})
    else:
        kind, blob = "sentencepiece", train_sentencepiece(ALPHABET * 20 + "\n".join(WORDS), 0, 1, "char")
    tok = build_tokenizer(kind, blob, {"tokenizer": {"add_bos": False}})
    cfg = LlamaConfig(vocab_size=tok.vocab_size, hidden_size=32, intermediate_size=64,
                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=256 if chat else 64, rms_norm_eps=1e-5, bos_token_id=tok.bos_id,
                      eos_token_id=tok.eos_id)
    model = Llama(cfg)
    model.init_weights(5, std=0.3)      # a frozen head of std 0.02 could not make confident logits
    w = Blob(*store.put_blob(save(model.state_dict_for_save())))
    man = Manifest(parameters=model.param_count(),
                   config=Blob(*store.put_blob(json.dumps(cfg.to_dict()).encode())),
                   tokenizer=Blob(*store.put_blob(blob)), tokenizer_type=kind,
                   vocab_size=tok.vocab_size, weights=w, weights_dtype="float32",
                   lineage=Lineage("create"), add_bos=False,
                   serving=Serving(CHATML, {}) if chat else None).to_dict()
    return {"name": "base:latest", "digest": "sha256:" + "b" * 64, **man}


def jsonl(rows) -> bytes:
    return "".join(json.dumps(r) + "\n" for r in rows).encode()


def reverse_task(words):
    # a made-up mapping: the last letter in capitals, twice
    return [{"prompt": w + "=", "completion": (w[-1] * 2).upper()} for w in words]


def label_task(words):
    # the label is a property of the last letter: what the head reads
    return [{"text": w, "label": "early" if w[-1] in "abcd" else "late"} for w in words]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models: threads only contend on a busy machine (and one thread is deterministic)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("ft")
    store = Store(str(root / "store"))
    base = make_base(store)
    put = lambda rows: store.put_blob(jsonl(rows))[0]  # noqa: E731
    return {"root": root, "store": store, "store_root": str(root / "store"), "base": base,
            "train": {"train.jsonl": put(reverse_task(WORDS[:180]))},
            "val": {"val.jsonl": put(reverse_task(WORDS[180:]))},
            "labels": {"labels.jsonl": put(label_task(WORDS))}}


LORA = {"method": "lora", "rank": 8, "targets": "all-linear", "lr": 3e-2, "batch_size": 16,
        "block_size": 16, "warmup": 0, "device": "cpu", "eval_samples": 20}


def lora_spec(env, **kw):
    return {**LORA, "data": env["train"], "val_data": env["val"], "_base": env["base"], **kw}


@pytest.fixture(scope="module")
def lora_run(env):
    ctl = FakeCtl(env["root"] / "lora")
    man = finetune.run(lora_spec(env, max_steps=120, eval_every=60), env["store_root"], ctl)
    return man, ctl


def test_i11_1_lora_finetune_loss_falls_and_stores_only_the_adapter(env, lora_run):
    man, ctl = lora_run
    vals = [m["val_loss"] for m in ctl.metrics_seen if "val_loss" in m]
    before = metrics.run_eval({"model": "base:latest", "_model": env["base"], "data": env["val"],
                               "block_size": 16, "device": "cpu"}, env["store_root"],
                              FakeCtl(env["root"] / "base-eval"))["metrics"]
    assert len(vals) == 2 and vals[-1] < 0.5 * before["loss"], (before, vals)
    assert man["lineage"]["final"]["metrics"]["exact_match"] >= 0.9
    assert {"val_ppl", "exact_match", "chrf"} <= set(ctl.metrics_seen[-1])
    assert man["kind"] == "adapter" and "weights" not in man
    assert man["base"] == {"model": "base:latest", "manifest": env["base"]["digest"],
                           "weights": env["base"]["weights"]["digest"]}
    assert man["adapter"]["rank"] == 8 and man["adapter"]["alpha"] == 16.0
    assert man["lineage"]["method"] == "finetune" and man["lineage"]["parent"] == "base:latest"
    final = man["lineage"]["final"]
    assert final["step"] == 120 and set(final["metrics"]) == {"loss", "perplexity", "exact_match", "chrf"}
    sd = load_safetensors(env["store"].read_blob(man["adapter"]["digest"]))
    assert all(".lora_A.weight" in k or ".lora_B.weight" in k for k in sd)
    assert len(sd) == 2 * 7 * 2 and all(t.dtype == torch.float32 for t in sd.values())
    lines = (env["root"] / "lora" / "val_predictions.jsonl").read_text().splitlines()
    assert len(lines) == 20 and set(json.loads(lines[0])) == {"input", "gold", "pred"}


def test_i11_eval_job_reproduces_the_final_validation_figures(env, lora_run):
    man, _ = lora_run
    spec = {"model": "ft:latest", "_model": man, "_base": env["base"], "data": env["val"],
            "block_size": 16, "batch_size": 16, "eval_samples": 20, "device": "cpu"}
    got = metrics.run_eval(spec, env["store_root"], FakeCtl(env["root"] / "eval"))
    assert got["examples"] == 20
    assert got["metrics"] == man["lineage"]["final"]["metrics"]
    preds = (env["root"] / "eval" / "predictions.jsonl").read_text()
    assert preds == (env["root"] / "lora" / "val_predictions.jsonl").read_text()


def test_i11_1_merge_gives_the_logits_of_base_plus_adapter(env, lora_run):
    from llmosd.models import lora
    from llmosd.models.loader import load_model
    man, _ = lora_run
    spec = {"_adapter": man, "_adapter_name": "ft:latest", "_adapter_digest": "sha256:" + "c" * 64,
            "_base": env["base"]}
    merged = merge.run(spec, env["store_root"], FakeCtl(env["root"] / "merge"))
    assert "base" not in merged and merged["lineage"]["method"] == "merge"
    assert merged["lineage"]["parent"] == "ft:latest"
    cpu = torch.device("cpu")
    whole, _ = load_model(env["store"], merged, cpu)
    base, _ = load_model(env["store"], env["base"], cpu)
    lora.install(base, lora.read_adapter(env["store"], man, "x"), cpu)
    lora.set_active(base, "x")
    x = torch.tensor([[1, 5, 7, 9, 3, 4, 12, 2]])
    with torch.no_grad():
        a, b = whole(x), base(x)
    # float32 rounding of W + s*B@A against W x + s*B(A x): logits here reach ~5
    assert torch.allclose(a, b, rtol=1e-5, atol=1e-5), (a - b).abs().max()


def test_i11_6_lora_resume_is_bitwise(env):
    spec = lora_spec(env, max_steps=12, eval_every=6, checkpoint_every=4, grad_accum=2,
                     lora_dropout=0.1, eval_samples=2)
    whole = finetune.run(spec, env["store_root"], FakeCtl(env["root"] / "r-a"))
    ctl = FakeCtl(env["root"] / "r-b", stop_at=5)
    with pytest.raises(Paused):
        finetune.run(spec, env["store_root"], ctl)
    assert ctl.checkpoints[-1] == 5
    ck = torch.load(env["root"] / "r-b" / "last.pt", weights_only=True)
    assert set(ck["model"]) == set(load_safetensors(env["store"].read_blob(whole["adapter"]["digest"])))
    paused = finetune.run(spec, env["store_root"], FakeCtl(env["root"] / "r-b"))
    ctl = FakeCtl(env["root"] / "r-c", crash_at=7)        # killed: resumes from step 4's checkpoint
    with pytest.raises(KeyboardInterrupt):
        finetune.run(spec, env["store_root"], ctl)
    again = FakeCtl(env["root"] / "r-c")
    killed = finetune.run(spec, env["store_root"], again)
    assert any("resuming from the checkpoint at step 4" in line for line in again.lines)
    a, b, c = (load_safetensors(env["store"].read_blob(m["adapter"]["digest"])) for m in (whole, paused, killed))
    assert all(torch.equal(a[k], b[k]) and torch.equal(a[k], c[k]) for k in a)
    assert paused["lineage"]["final"] == whole["lineage"]["final"]


def test_i11_4_classifier_beats_the_majority_baseline(env):
    spec = {"method": "classify", "data": env["labels"], "_base": env["base"], "device": "cpu",
            "lr": 3e-2, "max_steps": 40, "batch_size": 8, "block_size": 8, "warmup": 0,
            "eval_every": 40}
    ctl = FakeCtl(env["root"] / "cls")
    man = finetune.run(spec, env["store_root"], ctl)
    assert man["kind"] == "classifier" and man["head"]["labels"] == ["early", "late"]
    assert "adapter" in man
    final = man["lineage"]["final"]["metrics"]
    base_line = next(line for line in ctl.lines if "majority baseline" in line)
    baseline = float(base_line.rsplit("accuracy ", 1)[1])
    assert final["accuracy"] >= baseline + 0.2 and final["accuracy"] >= 0.75, (final, baseline)
    # the eval job: the same predictions, one example at a time
    val = [json.loads(line) for line in (env["root"] / "cls" / "val_predictions.jsonl").read_text().splitlines()]
    digest = env["store"].put_blob(jsonl({"text": p["input"], "label": p["gold"]} for p in val))[0]
    got = metrics.run_eval({"model": "cls:latest", "_model": man, "_base": env["base"],
                            "data": {"v.jsonl": digest}, "block_size": 8, "device": "cpu"},
                           env["store_root"], FakeCtl(env["root"] / "cls-eval"))
    # the same figures as the job's validation (a classifier's loss is its head's cross entropy)
    assert {k: got["metrics"][k] for k in ("accuracy", "f1")} == {"accuracy": final["accuracy"], "f1": final["f1"]}
    assert set(got["metrics"]) <= {"accuracy", "f1", "loss", "perplexity"}
    # merged: own weights, the head kept, the same predictions
    merged = merge.run({"_adapter": man, "_adapter_name": "cls:latest", "_base": env["base"]},
                       env["store_root"], FakeCtl(env["root"] / "cls-merge"))
    assert merged["kind"] == "classifier" and merged["head"] == man["head"] and "base" not in merged
    again = metrics.run_eval({"model": "m:latest", "_model": merged, "data": {"v.jsonl": digest},
                              "block_size": 8, "device": "cpu"}, env["store_root"],
                             FakeCtl(env["root"] / "cls-merge-eval"))
    # the same predictions; the loss only to float rounding (merged weights round differently)
    assert {k: again["metrics"][k] for k in ("accuracy", "f1")} == {k: got["metrics"][k] for k in ("accuracy", "f1")}
    assert again["metrics"]["loss"] == pytest.approx(got["metrics"]["loss"], rel=1e-4)
    # head only: the base frozen, no adapter stored
    ho = finetune.run({**spec, "head_only": True, "max_steps": 4, "eval_every": 4},
                      env["store_root"], FakeCtl(env["root"] / "cls-ho"))
    assert "adapter" not in ho and ho["kind"] == "classifier"


def test_i11_full_finetune_publishes_a_model(env):
    from llmosd.models.loader import load_model
    spec = {"method": "full", "data": env["train"], "_base": env["base"], "device": "cpu",
            "max_steps": 6, "batch_size": 8, "block_size": 16, "lr": 1e-3, "warmup": 0,
            "eval_samples": 2}
    man = finetune.run(spec, env["store_root"], FakeCtl(env["root"] / "full"))
    assert "kind" not in man and man["weights"]["dtype"] == "float32"
    assert man["config"] == env["base"]["config"] and man["tokenizer"] == env["base"]["tokenizer"]
    assert man["lineage"]["method"] == "finetune" and man["lineage"]["args"]["method"] == "full"
    model, _ = load_model(env["store"], man, torch.device("cpu"))
    base, _ = load_model(env["store"], env["base"], torch.device("cpu"))
    assert not torch.equal(model.lm_head.weight, base.lm_head.weight)


def adapter(env, man) -> dict:
    return load_safetensors(env["store"].read_blob(man["adapter"]["digest"]))


def test_i11_lora_two_ranks_equal_one_on_the_doubled_batch(env):
    """nproc 2 (gloo ranks spawned through train.distributed and train.entry, the base and
    its chat template carried in the run directory) ends where one process ends with the
    doubled batch (every example has as many answer tokens: the means agree)."""
    spec = lora_spec(env, max_steps=4, eval_every=4, eval_samples=2, lr=3e-3)
    one = finetune.run({**spec, "batch_size": 16}, env["store_root"], FakeCtl(env["root"] / "n1"))
    ctl = FakeCtl(env["root"] / "n2")
    two = finetune.run({**spec, "batch_size": 8, "nproc": 2}, env["store_root"], ctl)
    a, b = adapter(env, one), adapter(env, two)
    assert a.keys() == b.keys()
    # other batches would differ by ~lr (3e-3) per step; float sums in another order, by ~1e-6
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-5
    assert ctl.checkpoints[-1] == 4 and ctl.metrics_seen[-1]["exact_match"] is not None
    meta = json.loads((env["root"] / "n2" / "run" / "parent" / "meta.json").read_text())
    assert meta["weights_digest"] == env["base"]["weights"]["digest"]
    assert two["lineage"]["final"]["metrics"].keys() == one["lineage"]["final"]["metrics"].keys()


def test_i11_exported_lora_run_writes_a_peft_dir_that_imports(env, tmp_path):
    """The torchrun entry point run by hand on a fine-tune (no daemon): output/ is a PEFT
    adapter directory that formats.peft.import_adapter takes back, tensors unchanged."""
    import subprocess
    import sys

    from conftest import ROOT
    from llmosd.formats.peft import import_adapter
    store, base = env["store"], env["base"]
    run = tmp_path / "run"
    (run / "parent").mkdir(parents=True)
    (run / "train.jsonl").write_bytes(store.read_blob(env["train"]["train.jsonl"]))
    for name, key in (("config.json", "config"), ("tokenizer.bin", "tokenizer"),
                      ("model.safetensors", "weights")):
        (run / "parent" / name).write_bytes(store.read_blob(base[key]["digest"]))
    (run / "parent" / "meta.json").write_text(json.dumps(
        {"name": "base:latest", "digest": base["digest"], "tokenizer_type": "sentencepiece",
         "add_bos": False}))
    (run / "spec.json").write_text(json.dumps({**LORA, "max_steps": 3, "eval_samples": 1,
                                               "data": ["train.jsonl"]}))
    env_vars = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    for k in ("RANK", "WORLD_SIZE", "LLMOSD_RELAY", "LLMOSD_CHECKPOINT_DIR"):
        env_vars.pop(k, None)
    out = subprocess.run([sys.executable, "-m", "llmosd.train.entry", str(run)], env=env_vars,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "--base base:latest" in out.stdout
    files = sorted(os.listdir(run / "output"))
    assert files == ["adapter_config.json", "adapter_model.safetensors", "llmosd_lineage.json"]
    blobs = {n: store.put_blob((run / "output" / n).read_bytes())[0] for n in files}
    bman = {k: v for k, v in base.items() if k not in ("name", "digest")}
    man = import_adapter({"files": blobs, "_base": {"name": "base:latest", "digest": base["digest"],
                                                    "manifest": bman}},
                         env["store_root"], lambda p: None)
    mine = load_safetensors((run / "output" / "adapter_model.safetensors").read_bytes())
    got = adapter(env, man)
    assert man["adapter"]["rank"] == 8 and all(torch.equal(mine[k], got[k]) for k in mine)


def test_i11_chat_finetune_stops_at_the_end_of_turn(env, tmp_path):
    """Chat data on a base with a ChatML template: the template comes with the base, greedy
    answers stop at <|im_end|> (found from the template, not the EOS), predictions show the
    user's turn; and zero-shot eval of a model without a head on labelled data."""
    from llmosd.models.loader import build_tokenizer
    from llmosd.models.llama import LlamaConfig
    store = Store(str(tmp_path / "store"))
    base = make_base(store, chat=True)
    tok = build_tokenizer(base["tokenizer"]["type"], store.read_blob(base["tokenizer"]["digest"]), base)
    cfg = LlamaConfig.from_dict(json.loads(store.read_blob(base["config"]["digest"])))
    assert tok.eos_ids() == {0} and metrics.stop_ids(tok, cfg) == {0, 2}
    rows = [{"messages": [{"role": "user", "content": w}, {"role": "assistant", "content": w[-1] * 2}]}
            for w in WORDS[:40]]
    digest = store.put_blob(jsonl(rows))[0]
    spec = {**LORA, "max_steps": 3, "eval_samples": 3, "block_size": 32, "data": {"chat.jsonl": digest},
            "_base": base}
    man = finetune.run(spec, str(tmp_path / "store"), FakeCtl(tmp_path / "job"))
    assert man["chat_template"] == CHATML
    preds = [json.loads(line) for line in (tmp_path / "job" / "val_predictions.jsonl").read_text().splitlines()]
    assert len(preds) == 3 and all(p["input"] in WORDS and p["gold"] == p["input"][-1] * 2 for p in preds)
    labelled = {"labels.jsonl": store.put_blob(jsonl(label_task(WORDS[:10])))[0]}
    zero = metrics.run_eval({"model": "base:latest", "_model": base, "data": labelled,
                             "device": "cpu"}, str(tmp_path / "store"), FakeCtl(tmp_path / "zero"))
    assert set(zero["metrics"]) == {"accuracy", "f1"} and zero["examples"] == 10
