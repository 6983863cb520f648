"""Issue 10: ``check_train_spec`` (torch-free, run at submit): every key typed and ranged,
unknown keys refused, the data parsed (a bad JSONL line named with its number), too little data
refused, architecture keys refused when training continues from a stored model."""
from __future__ import annotations

import json

import pytest

from llmosd.train.spec import check_train_spec, min_tokens

TEXT = {"a.txt": b"To be, or not to be, that is the question.\n" * 200}     # 8,800 characters
PARENT = {"name": "shakes:latest", "digest": "sha256:" + "1" * 64,
          "config": {"digest": "sha256:" + "2" * 64, "size": 10}}


def test_i10_spec_defaults_are_filled():
    s = check_train_spec({"max_steps": 50}, TEXT)
    assert s["tokenizer"] == "bpe" and s["vocab_size"] == 1024 and s["kv_heads"] == s["heads"] == 4
    assert s["min_lr"] == pytest.approx(s["lr"] / 10) and s["warmup"] == 5
    assert s["eval_every"] == s["checkpoint_every"] == 50 and s["nproc"] == 1
    assert s["device"] == "auto" and s["dtype"] == "auto" and s["dropout"] == 0.0
    assert check_train_spec({"tokenizer": "char", "lr": 1}, TEXT)["vocab_size"] is None


@pytest.mark.parametrize("spec, message", [
    ({"epochs": 3}, "unknown train spec key 'epochs'"),
    ({"_parent": {}}, "unknown train spec key '_parent'"),
    ({"layers": "4"}, "layers must be an integer"),
    ({"layers": True}, "layers must be an integer"),
    ({"max_steps": 2.0}, "max_steps must be an integer"),
    ({"layers": 0}, "layers must be between 1 and 256"),
    ({"vocab_size": 100}, "vocab_size must be between 300"),
    ({"batch_size": 1 << 20}, "batch_size must be between"),
    ({"lr": 0}, "lr must be greater than 0"),
    ({"lr": "fast"}, "lr must be a number"),
    ({"lr": float("nan")}, "lr must be a number"),
    ({"dropout": 0.99}, "dropout must be at least 0 and at most 0.95"),
    ({"weight_decay": -1}, "weight_decay must be at least 0"),
    ({"lr": 1e-4, "min_lr": 1e-3}, r"min_lr \(0.001\) must not exceed lr \(0.0001\)"),
    ({"max_steps": 10, "warmup": 20}, r"warmup \(20\) must not exceed max_steps \(10\)"),
    ({"tokenizer": "wordpiece"}, "tokenizer must be one of bpe, unigram, char"),
    ({"tokenizer": "char", "vocab_size": 512}, "vocab_size does not apply to the char tokenizer"),
    ({"dtype": "float8"}, "dtype must be one of auto, float32, bfloat16"),
    ({"device": "tpu"}, "device must be auto, cpu, cuda or cuda:N"),
    ({"dim": 100, "heads": 3}, r"dim \(100\) must be divisible by heads \(3\)"),
    ({"dim": 96, "heads": 32}, "head size dim/heads = 3 must be even"),
    ({"heads": 4, "kv_heads": 3}, r"heads \(4\) must be a multiple of kv_heads \(3\)"),
    ({"nproc": 0}, "nproc must be between 1 and 256"),
    ({"seed": -1}, "seed must be between 0"),
    ({"data": ["a.txt"]}, "data must map file names to blob digests"),
])
def test_i10_invalid_spec_refused(spec, message):
    with pytest.raises(ValueError, match=message):
        check_train_spec(spec, TEXT)


def test_i10_invalid_spec_bad_jsonl_line_is_named():
    lines = [json.dumps({"text": "fine"}), "", json.dumps({"text": "also fine"}), "{not json"]
    with pytest.raises(ValueError, match=r"^docs.jsonl line 4: not valid JSON"):
        check_train_spec({}, {**TEXT, "docs.jsonl": "\n".join(lines).encode()})
    with pytest.raises(ValueError, match=r"^docs.jsonl line 2: each line must be a JSON object with "
                                         r"a string \"text\" field"):
        check_train_spec({}, {**TEXT, "docs.jsonl": b'{"text": "ok"}\n{"txt": "no"}\n'})


def test_i10_invalid_spec_data_files():
    with pytest.raises(ValueError, match="no data files"):
        check_train_spec({}, {})
    with pytest.raises(ValueError, match="bin.dat is not UTF-8 text"):
        check_train_spec({}, {**TEXT, "bin.dat": b"\xff\xfe\x00binary"})
    with pytest.raises(ValueError, match="must be a plain file name"):
        check_train_spec({}, {"../etc/passwd": b"x" * 10_000})


def test_i10_invalid_spec_too_little_data():
    need = min_tokens(128)
    assert need == 1281                   # 129 tokens in the last tenth, 1,152 before it
    # each document ends with an end-of-text token, counted with its characters
    enough = {"a.txt": b"x" * (need - 1)}
    assert check_train_spec({"block_size": 128}, enough)["block_size"] == 128
    with pytest.raises(ValueError, match=r"the data has 1,280 characters: too little for one training "
                                         r"block and one validation batch with block_size 128 .* "
                                         r"at least 1,281 are needed\); add data or lower block_size"):
        check_train_spec({"block_size": 128}, {"a.txt": b"x" * (need - 2)})
    with pytest.raises(ValueError, match="too little"):
        check_train_spec({"block_size": 8}, {"empty.jsonl": b"\n\n"})


def test_i10_invalid_spec_architecture_keys_of_an_existing_model():
    for key, value in (("layers", 2), ("dim", 64), ("heads", 2), ("kv_heads", 1),
                       ("vocab_size", 512), ("tokenizer", "char")):
        with pytest.raises(ValueError, match=f"{key} cannot be set when training continues from "
                                             "shakes:latest: its architecture and tokenizer are kept"):
            check_train_spec({key: value, "max_steps": 10}, TEXT, PARENT)
    s = check_train_spec({"max_steps": 10, "lr": 1e-4}, TEXT, PARENT)
    assert s["layers"] is None and s["tokenizer"] is None and s["lr"] == 1e-4
    with_ctx = {**PARENT, "context": 64}
    assert check_train_spec({}, TEXT, with_ctx)["block_size"] == 64
    with pytest.raises(ValueError, match=r"block_size \(128\) exceeds the context of shakes:latest \(64\)"):
        check_train_spec({"block_size": 128}, TEXT, with_ctx)


def test_i10_spec_check_is_torch_free():
    import subprocess
    import sys
    code = ("import sys; from llmosd.train.spec import check_train_spec; "
            "check_train_spec({}, {'a.txt': b'x' * 2000}); "
            "assert 'torch' not in sys.modules and 'numpy' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_i10_spec_takes_data_as_text_too():
    """The daemon may hand the data over decoded: text is taken as it is."""
    s = check_train_spec({"block_size": 8}, {"a.txt": "\ufeff" + "x" * 200, "b.jsonl": '{"text": "y"}'})
    assert s["block_size"] == 8
    with pytest.raises(ValueError, match="b.jsonl line 1: not valid JSON"):
        check_train_spec({"block_size": 8}, {"a.txt": "x" * 200, "b.jsonl": "{"})


def test_i10_spec_check_is_idempotent():
    """The normalized spec checks to itself (a resumed job compares it with its checkpoint's)."""
    for spec, parent in (({"tokenizer": "char", "max_steps": 30}, None), ({"lr": 3e-4}, None),
                         ({"max_steps": 10}, PARENT)):
        once = check_train_spec(spec, TEXT, parent)
        assert check_train_spec(once, TEXT, parent) == once


def test_i10_continuing_takes_the_parents_context_as_block_size():
    """Review: a model trained at block 32 continued without --block-size trains at 32 (not
    the default 128, which the worker would refuse after queueing); more than its context is
    refused at submit."""
    parent = {**PARENT, "context": 32}
    assert check_train_spec({"max_steps": 10}, TEXT, parent)["block_size"] == 32
    assert check_train_spec({"max_steps": 10, "block_size": 16}, TEXT, parent)["block_size"] == 16
    with pytest.raises(ValueError, match=r"block_size \(64\) exceeds the context of shakes:latest \(32\)"):
        check_train_spec({"max_steps": 10, "block_size": 64}, TEXT, parent)


@pytest.mark.parametrize("spec, message", [
    ({"nproc": 64}, "nproc 64 is more than the"),
    ({"device": "cuda"}, "no CUDA device"),
])
def test_i10_devices_checked_at_submit(spec, message):
    """Review: what the devices cannot run is refused when the job is submitted."""
    torch = pytest.importorskip("torch")
    if spec.get("device") == "cuda" and torch.cuda.is_available():
        pytest.skip("this machine has a CUDA device")
    from llmosd.ops.jobs import check_train
    with pytest.raises(ValueError, match=message):
        check_train({"max_steps": 10, **spec}, TEXT, None)
