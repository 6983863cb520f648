"""Imports check declared shapes before building or allocating anything (issue 7.6) and refuse
configs of the wrong type or range by key (issue 7.12), as invalid input, never ``internal``.

The checkpoints are tiny and hand-made (our own Llama's tensors, a byte-level vocabulary) so
each refusal takes a second; the one that declares two million layers would have driven the
import worker past 4.7 GiB before the fix."""
from __future__ import annotations

import json
import os
import time

import numpy as np
import pytest

from conftest import Daemon, train_bpe
from llmctl import errors
from llmosd.formats.common import CheckpointError, check_shapes
from llmosd.formats.hf import hf_config
from llmosd.models.llama import Llama, LlamaConfig, check_config, expected_shapes

gguf = pytest.importorskip("gguf")

SMALL = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=128)


@pytest.fixture(scope="module")
def d(tmp_path_factory):
    dm = Daemon(tmp_path_factory.mktemp("bounds")).start()
    yield dm
    dm.stop()


@pytest.fixture(scope="module")
def bpe():
    return train_bpe()


def refused(d: Daemon, path, needle: str) -> None:
    """Importing ``path`` fails as invalid input with ``needle`` in the message, and leaves
    the store (models, blobs, temp files) as it was."""
    root = d.state / "store"

    def files():
        return sorted(os.listdir(root / "blobs")), sorted(os.listdir(root / "tmp"))
    with d.client() as c:
        before, before_files = c.ls(), files()
        with pytest.raises(errors.InvalidArgument) as e:
            c.import_path(str(path), "bad")
        assert needle in str(e.value), str(e.value)
        assert c.ls() == before and files() == before_files    # (ls first: cleanup is done)


def tiny_weights(vocab: int) -> dict[str, np.ndarray]:
    m = Llama(LlamaConfig(vocab_size=vocab, **SMALL))
    m.init_weights(seed=0)
    return {k: v.numpy() for k, v in m.state_dict_for_save().items()}


# -- Hugging Face directories -----------------------------------------------------------------

def hf_dir(path, bpe, **config):
    """A HF directory of SMALL's tensors whose config.json says ``config`` (over SMALL)."""
    from safetensors.numpy import save_file
    path.mkdir()
    bpe.save(str(path / "tokenizer.json"))
    vocab = bpe.get_vocab_size()
    save_file(tiny_weights(vocab), str(path / "model.safetensors"), metadata={"format": "pt"})
    cfg = {"model_type": "llama", "vocab_size": vocab, "rms_norm_eps": 1e-5, **SMALL, **config}
    (path / "config.json").write_text(json.dumps(cfg))
    return path


def test_i7_6_hf_config_2M_layers_refused(d, bpe, tmp_path):
    t0 = time.monotonic()
    refused(d, hf_dir(tmp_path / "m", bpe, num_hidden_layers=2_000_000),
            "num_hidden_layers is 2000000; llmosd takes 1 to 1,024")
    assert time.monotonic() - t0 < 30
    (tmp_path / "m" / "config.json").write_text(json.dumps(
        {"model_type": "llama", "vocab_size": bpe.get_vocab_size(), **SMALL, "num_hidden_layers": 3}))
    refused(d, tmp_path / "m", "model.layers.2.self_attn.q_proj.weight is missing from the weights "
                               "(config.json declares 3 layers)")


def test_declared_shapes_checked_against_the_tensors():
    cfg = LlamaConfig(vocab_size=50, **SMALL)
    shapes = expected_shapes(cfg)
    assert check_shapes(cfg, shapes) == list(shapes)
    with pytest.raises(CheckpointError, match="unexpected tensor model.layers.1.input_layernorm.weight"):
        check_shapes(LlamaConfig(vocab_size=50, **{**SMALL, "num_hidden_layers": 1}), shapes)
    with pytest.raises(CheckpointError, match=r"gate_proj.weight has shape \(96, 64\), but x implies \(60000, 64\)"):
        check_shapes(LlamaConfig(vocab_size=50, **{**SMALL, "intermediate_size": 60_000}), shapes, "x")


def test_i7_12_hf_config_list_or_string_numbers(d, bpe, tmp_path):
    m = hf_dir(tmp_path / "m", bpe)
    good = json.loads((m / "config.json").read_text())
    for cfg, needle in [([good], "config.json must be a JSON object ({...}), but it holds a list"),
                        ({**good, "hidden_size": "64"},
                         "hidden_size must be an integer, got '64' (write it as a number, without quotes)")]:
        (m / "config.json").write_text(json.dumps(cfg))
        refused(d, m, needle)
    (m / "config.json").write_text(json.dumps(good))
    (m / "generation_config.json").write_text("[1, 2]")
    refused(d, m, "generation_config.json must be a JSON object")
    # the other range checks, straight through hf_config (what the worker runs)
    for change, needle in [
        ({"rms_norm_eps": 0}, "rms_norm_eps must be a finite number greater than 0, got 0"),
        ({"rope_theta": float("inf")}, "rope_theta must be a finite number greater than 0, got inf"),
        ({"num_key_value_heads": 0}, "num_key_value_heads is 0; llmosd takes 1"),
        ({"num_key_value_heads": 3}, "num_attention_heads (4) must be a multiple of num_key_value_heads (3)"),
        ({"max_position_embeddings": 0}, "max_position_embeddings is 0"),
        ({"tie_word_embeddings": "yes"}, "tie_word_embeddings must be true or false"),
        ({"vocab_size": 2.5}, "vocab_size must be an integer, got 2.5"),
    ]:
        with pytest.raises(CheckpointError) as e:
            hf_config({**good, **change}, {})
        assert needle in str(e.value)
    with pytest.raises(CheckpointError, match="eos_token_id must be a token id"):
        hf_config(good, {"eos_token_id": "2"})


def test_check_config_is_pure_and_names_the_source_keys():
    with pytest.raises(ValueError, match="llama.block_count is 2000000"):
        check_config({"num_hidden_layers": 2_000_000}, {"num_hidden_layers": "llama.block_count"})
    with pytest.raises(ValueError, match="must be a finite number"):
        check_config({"rms_norm_eps": float("nan")})
    with pytest.raises(ValueError, match="JSON object"):
        check_config([1, 2])
    check_config({**SMALL, "head_dim": 8, "eos_token_id": [1, 2]})     # explicit head size: fine


# -- GGUF -----------------------------------------------------------------------------------

_GGUF_NAMES = {"input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
               "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
               "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
               "mlp.down_proj": "ffn_down"}


def gguf_file(path, bpe, *, layers=2, hidden=64, heads=4):
    """A float32 GGUF of SMALL's tensors (a valid byte-level vocabulary) whose metadata declares
    ``layers`` blocks, ``hidden`` width and ``heads`` heads."""
    spec = json.loads(bpe.to_str())["model"]
    tokens = [None] * bpe.get_vocab_size()
    for t, i in spec["vocab"].items():
        tokens[i] = t
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_context_length(128)
    w.add_embedding_length(hidden)
    w.add_block_count(layers)
    w.add_feed_forward_length(96)
    w.add_head_count(heads)
    w.add_head_count_kv(2)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_tokenizer_model("gpt2")
    w.add_token_list(tokens)
    w.add_token_types([3 if i < 3 else 1 for i in range(len(tokens))])
    w.add_token_merges([" ".join(m) if isinstance(m, list) else m for m in spec["merges"]])
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    for name, a in tiny_weights(len(tokens)).items():
        p = name.split(".")
        g = ({"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
              "lm_head.weight": "output.weight"}.get(name)
             or f"blk.{p[2]}.{_GGUF_NAMES['.'.join(p[3:-1])]}.{p[-1]}")
        w.add_tensor(g, np.ascontiguousarray(a, dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_i7_6_gguf_declaring_huge_model_refused_fast(d, bpe, tmp_path):
    path = gguf_file(tmp_path / "huge.gguf", bpe, layers=2_000_000)
    assert path.stat().st_size < 2 << 20
    t0 = time.monotonic()
    refused(d, path, "llama.block_count is 2000000; llmosd takes 1 to 1,024")
    assert time.monotonic() - t0 < 30


@pytest.mark.parametrize("kw,needle", [
    ({"layers": 900}, "tensor model.layers.2.self_attn.q_proj.weight is missing from the weights "
                      "(the GGUF metadata declares 900 layers)"),
    ({"hidden": 60_000}, "model.embed_tokens.weight has shape"),
])
def test_i7_6_gguf_declared_shapes_checked_against_the_tensors(d, bpe, tmp_path, kw, needle):
    refused(d, gguf_file(tmp_path / "bad.gguf", bpe, **kw), needle)


def test_i7_12_gguf_head_count_zero(d, bpe, tmp_path):
    refused(d, gguf_file(tmp_path / "zero.gguf", bpe, heads=0),
            "llama.attention.head_count is 0; llmosd takes 1 to 1,024")


def test_a_good_small_gguf_and_hf_dir_still_import(d, bpe, tmp_path):
    with d.client() as c:
        c.import_path(str(gguf_file(tmp_path / "ok.gguf", bpe)), "ok-gguf")
        c.import_path(str(hf_dir(tmp_path / "ok", bpe)), "ok-hf")
        g = c.generate("ok-hf", "ROMEO:", max_tokens=3, temperature=0)
        g.text()
        assert g.stats["generated_tokens"] >= 1
        c.unload("ok-hf")
        c.rm("ok-gguf")
        c.rm("ok-hf")
