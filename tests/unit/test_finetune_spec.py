"""Issue 11: ``check_finetune_spec`` and ``check_eval_spec`` (torch-free, run at submit): method
defaults, the data checked against the method and the base, every refusal with a clear message."""
from __future__ import annotations

import json

import pytest

from llmosd.train.ftspec import FINETUNE_KEYS, check_eval_spec, check_finetune_spec

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
BASE = {"name": "smol:latest", "context": 256, "has_template": True, "targets_known": TARGETS}


def jsonl(*objs) -> bytes:
    return "".join(json.dumps(o) + "\n" for o in objs).encode()


QA = {"qa.jsonl": jsonl(*({"prompt": f"Q{i}?", "completion": f"A{i}"} for i in range(40)))}
LABELS = {"l.jsonl": jsonl(*({"text": f"t{i}", "label": "pos" if i % 3 else "neg"} for i in range(30)))}
CHAT = {"c.jsonl": jsonl(*({"messages": [{"role": "user", "content": f"hi {i}"},
                                         {"role": "assistant", "content": f"hello {i}"}]} for i in range(10)))}


def test_i11_finetune_spec_defaults_per_method():
    s = check_finetune_spec({}, QA, None, BASE)
    assert s["method"] == "lora" and s["kind"] == "completion" and s["labels"] is None
    assert (s["rank"], s["alpha"], s["lora_dropout"], s["targets"]) == (8, 16.0, 0.0, ["q_proj", "v_proj"])
    assert s["lr"] == 3e-4 and s["min_lr"] == pytest.approx(3e-5) and s["weight_decay"] == 0.0
    assert s["block_size"] == 256 and s["batch_size"] == 8 and s["eval_samples"] == 32
    # 40 examples -> 36 train -> 5 steps of 8 for one epoch
    assert s["epochs"] == 1.0 and s["max_steps"] == 5 and s["eval_every"] == s["checkpoint_every"] == 5
    assert all(s[k] is None for k in ("tokenizer", "vocab_size", "layers", "dim", "heads", "kv_heads"))
    s = check_finetune_spec({"method": "full", "epochs": 3, "batch_size": 4}, QA, None, BASE)
    assert s["lr"] == 2e-5 and s["weight_decay"] == 0.1 and s["rank"] is None and s["targets"] is None
    assert s["max_steps"] == 27 and s["eval_every"] == 9
    s = check_finetune_spec({"method": "classify", "head_only": True, "max_steps": 3}, LABELS, None, BASE)
    assert s["lr"] == 1e-3 and s["labels"] == ["neg", "pos"] and s["kind"] == "label"
    assert s["epochs"] is None and s["max_steps"] == 3 and s["eval_every"] == 3 and s["rank"] is None
    s = check_finetune_spec({"method": "classify", "labels": "pos,neg", "targets": "all-linear", "rank": 4},
                            LABELS, None, {**BASE, "context": 2048})
    assert s["labels"] == ["pos", "neg"] and s["targets"] == list(TARGETS) and s["alpha"] == 8.0
    assert s["block_size"] == 512 and s["lr"] == 3e-4
    s = check_finetune_spec({"data": {"qa.jsonl": "sha256:" + "0" * 64}}, QA,
                            {"v.jsonl": jsonl({"prompt": "x", "completion": "y"})}, BASE)
    assert s["max_steps"] == 5     # all 40 train: val data given


def test_i11_finetune_spec_takes_chat_data_with_a_template():
    assert check_finetune_spec({}, CHAT, None, BASE)["kind"] == "chat"


def test_i11_refuses_labels_missing_from_the_data():
    with pytest.raises(ValueError, match="label 'neutral' of --labels has no example in the data; add "
                                         "examples of it or leave it out of --labels"):
        check_finetune_spec({"method": "classify", "labels": ["pos", "neg", "neutral"]}, LABELS, None, BASE)
    only = {"l.jsonl": jsonl({"text": "a", "label": "pos"}, {"text": "b", "label": "pos"})}
    with pytest.raises(ValueError, match="a classifier needs at least 2 labels; the data has only 'pos'"):
        check_finetune_spec({"method": "classify"}, only, None, BASE)
    with pytest.raises(ValueError, match="'pos' is given twice in labels"):
        check_finetune_spec({"method": "classify", "labels": ["pos", "neg", "pos"]}, LABELS, None, BASE)


def test_i11_refuses_a_data_label_not_in_labels_with_its_line():
    with pytest.raises(ValueError, match=r"l.jsonl line 1: label 'neg' is not one of --labels pos, other"):
        check_finetune_spec({"method": "classify", "labels": ["pos", "other"]}, LABELS, None, BASE)
    val = {"v.jsonl": jsonl({"text": "a", "label": "pos"}, {"text": "b", "label": "huh"})}
    with pytest.raises(ValueError, match=r"v.jsonl line 2: label 'huh' is not one of the training labels"):
        check_finetune_spec({"method": "classify"}, LABELS, val, BASE)


def test_i11_refuses_classify_method_with_non_label_data():
    with pytest.raises(ValueError, match=r"--method classify needs labelled examples .* prompt/completion"):
        check_finetune_spec({"method": "classify"}, QA, None, BASE)


def test_i11_refuses_label_data_without_classify():
    for method in ("lora", "full"):
        with pytest.raises(ValueError, match=r"l.jsonl line 1\): they train a classifier; use --method classify"):
            check_finetune_spec({"method": method}, LABELS, None, BASE)
    with pytest.raises(ValueError, match="labels apply to --method classify only"):
        check_finetune_spec({"labels": ["a", "b"]}, QA, None, BASE)


def test_i11_refuses_chat_data_with_no_chat_template():
    with pytest.raises(ValueError, match=r"c.jsonl line 1\) but the model has no chat template"):
        check_finetune_spec({}, CHAT, None, {**BASE, "has_template": False})


@pytest.mark.parametrize("spec, message", [
    ({"epoch": 2}, r"unknown finetune spec key 'epoch'; known keys: .*epochs"),
    ({"_base": {}}, "unknown finetune spec key '_base'"),
    ({"layers": 4}, "layers cannot be set for a fine-tune"),
    ({"tokenizer": "bpe"}, "tokenizer cannot be set for a fine-tune"),
])
def test_i11_refuses_unknown_key(spec, message):
    with pytest.raises(ValueError, match=message):
        check_finetune_spec(spec, QA, None, BASE)


def test_i11_refuses_epochs_and_max_steps_both():
    with pytest.raises(ValueError, match=r"give epochs \(2\) or max_steps \(10\), not both"):
        check_finetune_spec({"epochs": 2, "max_steps": 10}, QA, None, BASE)


def test_i11_refuses_block_size_over_the_context():
    with pytest.raises(ValueError, match=r"block_size \(512\) exceeds the context of smol:latest \(256\)"):
        check_finetune_spec({"block_size": 512}, QA, None, BASE)


def test_i11_refuses_too_few_examples():
    one = {"one.jsonl": jsonl({"prompt": "a", "completion": "b"})}
    with pytest.raises(ValueError, match="the data has 1 example: fine-tuning needs at least 2"):
        check_finetune_spec({}, one, None, BASE)
    assert check_finetune_spec({}, one, one, BASE)["max_steps"] == 1     # with --val-data: fine
    with pytest.raises(ValueError, match="hold no examples"):
        check_finetune_spec({}, {"e.jsonl": b"\n"}, None, BASE)


@pytest.mark.parametrize("spec, message", [
    ({"method": "qlora"}, "method must be one of full, lora, classify"),
    ({"rank": 0}, "rank must be between 1 and 1,024"),
    ({"rank": 2.0}, "rank must be an integer"),
    ({"alpha": 0}, "alpha must be greater than 0"),
    ({"lora_dropout": 1.0}, "lora_dropout must be at least 0 and at most 0.95"),
    ({"epochs": 0}, "epochs must be greater than 0"),
    ({"epochs": "two"}, "epochs must be a number"),
    ({"head_only": "yes"}, "head_only must be true or false"),
    ({"head_only": True}, "head_only applies to --method classify only"),
    ({"method": "full", "rank": 4}, "rank sets up LoRA, which --method full does not use"),
    ({"targets": ["q_proj", "foo"]}, r"the model has no linear layer named 'foo'; .*q_proj, k_proj"),
    ({"targets": []}, "targets must be a non-empty list"),
    ({"targets": ["all-linear", "q_proj"]}, "all-linear stands alone"),
    ({"eval_samples": -1}, "eval_samples must be between 0 and 100,000"),
    ({"val_data": ["a"]}, "val_data must map file names to blob digests"),
    ({"lr": 0}, "lr must be greater than 0"),
    ({"max_steps": 10, "warmup": 20}, r"warmup \(20\) must not exceed max_steps \(10\)"),
])
def test_i11_finetune_spec_refuses_bad_values(spec, message):
    with pytest.raises(ValueError, match=message):
        check_finetune_spec(spec, QA, None, BASE)


def test_i11_finetune_spec_refuses_bad_lines_and_mixed_val_data():
    with pytest.raises(ValueError, match=r"qa.jsonl line 2: not valid JSON"):
        check_finetune_spec({}, {"qa.jsonl": b'{"text": "a"}\n{oops\n'}, None, BASE)
    with pytest.raises(ValueError, match=r"v.jsonl line 1: the validation data holds text examples"):
        check_finetune_spec({}, QA, {"v.jsonl": jsonl({"text": "a"})}, BASE)
    with pytest.raises(ValueError, match="must be a plain file name"):
        check_finetune_spec({}, {"../x.jsonl": b""}, None, BASE)
    assert "method" in FINETUNE_KEYS and "layers" not in FINETUNE_KEYS and "data" in FINETUNE_KEYS


# ---- eval ------------------------------------------------------------------------------------

MODEL = {"kind": "model", "labels": None, "has_template": True, "context": 128}


def test_i11_eval_spec_defaults_to_every_metric_the_data_allows():
    s = check_eval_spec({}, QA, MODEL)
    assert s["metrics"] == ["loss", "perplexity", "exact_match", "chrf"] and s["kind"] == "completion"
    assert s["eval_samples"] == 100 and s["block_size"] == 128 and s["batch_size"] == 8
    assert s["device"] == "auto" and s["seed"] == 0 and s["labels"] is None
    assert check_eval_spec(None, {"t.jsonl": jsonl({"text": "a"})}, MODEL)["metrics"] == ["loss", "perplexity"]
    s = check_eval_spec({"metrics": ["f1"]}, LABELS, {**MODEL, "kind": "classifier", "labels": ["neg", "pos"]})
    assert s["metrics"] == ["f1"] and s["labels"] == ["neg", "pos"]
    assert check_eval_spec({}, LABELS, MODEL)["labels"] == ["neg", "pos"]     # zero-shot: the data's
    assert check_eval_spec({"metrics": "chrf", "eval_samples": 5}, CHAT, MODEL)["eval_samples"] == 5


@pytest.mark.parametrize("spec, data, model, message", [
    ({"metrics": ["bleu"]}, QA, MODEL, "unknown metric 'bleu'; metrics are loss, perplexity"),
    ({"metrics": ["accuracy"]}, QA, MODEL, r"metric 'accuracy' does not apply to completion data .* allows loss"),
    ({"metrics": ["chrf"]}, LABELS, MODEL, "metric 'chrf' does not apply to label data"),
    ({"samples": 3}, QA, MODEL, "unknown eval spec key 'samples'"),
    ({"eval_samples": 0}, QA, MODEL, "eval_samples must be an integer between 1"),
    ({"block_size": 512}, QA, MODEL, r"block_size \(512\) exceeds the context"),
    ({}, CHAT, {**MODEL, "has_template": False}, "has no chat template"),
    ({}, QA, {**MODEL, "kind": "classifier", "labels": ["a", "b"]}, "is a classifier: evaluate it on labelled"),
    ({}, LABELS, {**MODEL, "kind": "classifier", "labels": ["pos", "x"]}, r"l.jsonl line 1: label 'neg' is not one of"),
    ({}, {"l.jsonl": jsonl({"text": "a", "label": "x"})}, MODEL, "needs at least 2 labels"),
    ({}, {"l.jsonl": b"nope\n"}, MODEL, "l.jsonl line 1: not valid JSON"),
])
def test_i11_eval_spec_refusals(spec, data, model, message):
    with pytest.raises(ValueError, match=message):
        check_eval_spec(spec, data, model)


# ---- code review of issue 11 ---------------------------------------------------------------------

def test_i11_review_eval_batches_is_refused_for_a_finetune():
    """FineTuner's validation covers every validation example: eval_batches did nothing."""
    assert "eval_batches" not in FINETUNE_KEYS
    with pytest.raises(ValueError, match="eval_batches does not apply to a fine-tune: .*every validation "
                                         "example; eval_samples caps"):
        check_finetune_spec({"eval_batches": 4}, QA, None, BASE)
    assert "eval_batches" not in check_finetune_spec({}, QA, None, BASE)


@pytest.mark.parametrize("spec, data, val", [
    ({}, QA, None),
    ({"epochs": 3, "batch_size": 4}, QA, None),
    ({"max_steps": 7, "method": "full"}, QA, None),
    ({"method": "classify", "labels": "pos,neg", "targets": "all-linear", "rank": 4}, LABELS, None),
    ({"method": "classify", "head_only": True, "nproc": 2, "epochs": 0.5}, LABELS, None),
    ({"data": {"c.jsonl": "sha256:" + "0" * 64}, "val_data": {"v.jsonl": "sha256:" + "1" * 64}},
     CHAT, {"v.jsonl": CHAT["c.jsonl"]}),
])
def test_i11_review_finetune_check_is_idempotent(spec, data, val):
    once = check_finetune_spec(spec, data, val, BASE)
    assert check_finetune_spec(once, data, val, BASE) == once
    assert check_finetune_spec(dict(once), data, val, BASE) == once          # and again


def test_i11_review_finetune_recheck_verifies_kind_and_derived_steps():
    once = check_finetune_spec({"epochs": 2}, QA, None, BASE)
    with pytest.raises(ValueError, match="checked for 'chat' data, but the data .* holds completion"):
        check_finetune_spec({**once, "kind": "chat"}, QA, None, BASE)
    with pytest.raises(ValueError, match=r"give epochs \(2\) or max_steps .*, not both"):
        check_finetune_spec({**once, "max_steps": once["max_steps"] + 1}, QA, None, BASE)
    with pytest.raises(ValueError, match="unknown finetune spec key 'kinds'"):
        check_finetune_spec({"kinds": "chat"}, QA, None, BASE)


@pytest.mark.parametrize("spec, data, model", [
    ({}, QA, MODEL),
    ({"metrics": "chrf", "eval_samples": 5, "device": "cpu"}, CHAT, MODEL),
    ({}, LABELS, MODEL),
    ({"metrics": ["f1"]}, LABELS, {**MODEL, "kind": "classifier", "labels": ["pos", "neg"]}),
    (None, {"t.jsonl": jsonl({"text": "a"})}, MODEL),
])
def test_i11_review_eval_check_is_idempotent(spec, data, model):
    once = check_eval_spec(spec, data, model)
    assert check_eval_spec(once, data, model) == once
    with pytest.raises(ValueError, match="checked for 'label' data|checked for 'text' data"):
        check_eval_spec({**once, "kind": "text" if once["kind"] == "label" else "label"}, data, model)


def test_i11_review_eval_recheck_verifies_labels():
    once = check_eval_spec({}, LABELS, MODEL)
    with pytest.raises(ValueError, match=r"labels \['pos', 'neg'\] are not the ones .* \(neg, pos\)"):
        check_eval_spec({**once, "labels": ["pos", "neg"]}, LABELS, MODEL)


def test_i11_review_eval_docstring_says_what_eval_samples_caps():
    doc = " ".join(check_eval_spec.__doc__.split())
    assert "greedy answers for exact_match and chrf are generated for at most that many" in doc
    assert "at most that many examples are evaluated" not in doc


class _Checked(Exception):
    """Raised by the patched checks: the worker did check the spec."""


def _recorder(calls):
    def check(spec, *args):
        calls.append(dict(spec))
        raise _Checked
    return check


def test_i11_review_workers_always_check_the_spec_again(tmp_path, monkeypatch):
    """finetune.run, metrics.run_eval and entry.prepare check a spec the daemon checked (it
    has kind) again, instead of trusting it."""
    from llmosd.store.store import Store
    from llmosd.train import entry, finetune, ftspec as spec_mod, metrics
    store = Store(str(tmp_path / "store"))
    cfg = {"max_position_embeddings": 256}
    cd, cs = store.put_blob(json.dumps(cfg).encode())
    dd, _ = store.put_blob(QA["qa.jsonl"])
    base = {"name": "smol:latest", "digest": "sha256:" + "2" * 64, "config": {"digest": cd, "size": cs}}
    checked = check_finetune_spec({}, QA, None, BASE)
    calls = []
    monkeypatch.setattr(spec_mod, "check_finetune_spec", _recorder(calls))
    monkeypatch.setattr(spec_mod, "check_eval_spec", _recorder(calls))

    class Ctl:
        job_id, job_dir = 1, str(tmp_path / "job")

        def progress(self, p):
            pass

    with pytest.raises(_Checked):
        finetune.run({**checked, "data": {"qa.jsonl": dd}, "_base": base}, store.root, Ctl())
    assert calls[-1]["kind"] == "completion" and "_base" not in calls[-1]
    echecked = check_eval_spec({}, QA, MODEL)
    with pytest.raises(_Checked):
        metrics.run_eval({**echecked, "model": "smol:latest", "data": {"qa.jsonl": dd}, "_model": base,
                          "_base": None}, store.root, Ctl())
    assert calls[-1]["kind"] == "completion" and "model" not in calls[-1]
    run_dir = tmp_path / "run"
    (run_dir / "data").mkdir(parents=True)
    (run_dir / "data" / "qa.jsonl").write_bytes(QA["qa.jsonl"])
    with pytest.raises(_Checked):
        entry.prepare(str(run_dir), {**checked, "data": ["qa.jsonl"]}, {**base, "config": cfg})
    assert calls[-1]["kind"] == "completion" and calls[-1]["data"]["qa.jsonl"].startswith("sha256:")
    assert len(calls) == 3
