"""Issue 13 (part E): quantized weights: stored forms, GGUF blocks kept bit for bit, kernels
against the float reference, model forms at load, LoRA on a quantized base, memory estimates,
the protocol's load/import fields.  Small tensors: seconds."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from llmctl import protocol
from llmctl.errors import InvalidArgument
from llmosd.mem.estimate import estimate_instance
from llmosd.models import quant as Q
from llmosd.models.llama import Llama, LlamaConfig
from llmosd.models.loader import build, float_weights, read_safetensors, resident_bytes

CFG = dict(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
           num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)


def _model(tied: bool) -> Llama:
    m = Llama(LlamaConfig(**CFG, tie_word_embeddings=tied))
    m.init_weights(3)
    return m.eval()


def _file(tmp_path, sd) -> str:
    from safetensors.torch import save_file
    p = str(tmp_path / "w.safetensors")
    save_file({k: v.contiguous() for k, v in sd.items()}, p, metadata={"format": "pt"})
    return p


def test_i13_3_pack_unpack_and_quantize_round_trip():
    q = torch.randint(0, 16, (6, 64), dtype=torch.uint8)
    assert torch.equal(Q.unpack4(Q.pack4(q)), q)
    w = torch.randn(6, 64)
    for bits, tol in ((8, 0.01), (4, 0.15)):
        t = Q.quantize(w, bits)
        err = (Q.dequantize(t["qweight"], t["scales"], t.get("mins")) - w).abs().max()
        assert err < tol * w.abs().max(), (bits, err)


@pytest.mark.parametrize("qtype", ["Q8_0", "Q4_0", "Q4_1"])
def test_i13_1_gguf_blocks_are_kept_bit_for_bit(qtype):
    gguf = pytest.importorskip("gguf")
    from llmosd.formats.gguf import packed
    w = np.random.default_rng(0).standard_normal((8, 96)).astype(np.float32)
    qt = gguf.GGMLQuantizationType[qtype]
    raw = gguf.quants.quantize(w, qt)
    ref = torch.from_numpy(gguf.quants.dequantize(raw, qt)).reshape(8, 96)
    t = packed(raw, qtype, (8, 96))
    assert t["qweight"].dtype == (torch.int8 if qtype == "Q8_0" else torch.uint8)
    assert torch.equal(Q.dequantize(t["qweight"], t["scales"], t.get("mins")), ref)
    assert Q.stored_kind(t) == qtype.lower()
    # the stored form takes the file's bytes: 34 (Q8_0), 20 (Q4_1) per block of 32
    assert sum(v.numel() * v.element_size() for v in t.values()) == (
        raw.nbytes if qtype != "Q4_0" else raw.nbytes + 8 * 3 * 2)


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("rows", [1, 3, 9])
def test_i13_3_qlinear_equals_float_linear_on_its_dequantized_weight(bits, rows):
    t = Q.quantize(torch.randn(48, 96), bits)
    lin = Q.QLinear(t["qweight"], t["scales"], t.get("mins"), torch.randn(48))
    x = torch.randn(2, rows, 96)
    with torch.inference_mode():
        y = lin(x)
    ref = F.linear(x, lin.dequantized(), lin.bias)
    ck = Q.KERNELS.ck
    if ck is not None and ck.int8_activations and 2 * rows <= Q.CK_ROWS:
        # the C kernel quantizes activations to int8 per group of 32 (as llama.cpp): its
        # documented bound is relative to the output's scale
        from llmosd.models.qkernels import TOLERANCE
        torch.testing.assert_close(y, ref, atol=TOLERANCE * float(ref.abs().max()), rtol=0)
    else:
        torch.testing.assert_close(y, ref, atol=1e-4, rtol=1e-4)
    assert Q.kernel_mode() in ("compiled", "eager")


@pytest.mark.parametrize("tied", [True, False])
def test_i13_3_quantize_model_ties_share_tensors_and_keep_logits_close(tied):
    m = _model(tied)
    x = torch.randint(0, 96, (1, 7))
    with torch.no_grad():
        ref = m(x)
        Q.quantize_model(m, 8)
        got = m(x)
    assert isinstance(m.lm_head, Q.QLinear) and isinstance(m.model.embed_tokens, Q.QEmbedding)
    assert (m.lm_head.qweight is m.model.embed_tokens.qweight) == tied
    assert Q.describe(m).startswith("int8")
    assert (got - ref).abs().max() < 0.05 * ref.abs().max()
    Q.dequantize_model(m)
    assert not Q.is_quantized(m) and Q.describe(m) == "float32"
    assert (m.lm_head.weight is m.model.embed_tokens.weight) == tied


def test_i13_3_load_forms_and_no_copy_of_float_weights(tmp_path):
    m = _model(True)
    sd = m.state_dict_for_save()
    cfg, cpu = m.config, torch.device("cpu")
    fpath = _file(tmp_path, sd)
    f = build(cfg, read_safetensors(fpath), cpu, torch.float32, "none")
    # memory-mapped: the float weights are the map's pages, counted by the tensors they hold
    assert resident_bytes(f) == sum(v.numel() * 4 for v in sd.values()) + f.inv_freq.numel() * 4
    x = torch.randint(0, 96, (1, 5))
    with torch.no_grad():
        ref = m(x)
        torch.testing.assert_close(f(x), ref)
        q4 = build(cfg, read_safetensors(fpath), cpu, torch.float32, "int4")
        assert Q.describe(q4).split(" ")[0] == "int4+int8"   # embedding/lm_head at 8 bits
        stored = Q.quantize_state_dict(sd, 4)
        qpath = tmp_path / "q"
        qpath.mkdir()
        qfile = _file(qpath, stored)
        back = float_weights(qfile)
        assert set(back) == set(sd)
        again = build(cfg, read_safetensors(qfile), cpu, torch.float32, "auto")
        if Q.kernel_mode() == "compiled":
            assert Q.describe(again) == "q4_1+q8_0"
            torch.testing.assert_close(again(x), q4(x), atol=1e-4, rtol=1e-4)
        none = build(cfg, read_safetensors(qfile), cpu, torch.float32, "none")
        assert not Q.is_quantized(none)
        want = none(x)                     # q4's few rows: int8 activations where VNNI runs
        ck = Q.KERNELS.ck
        tol = 0.02 * float(want.abs().max()) if ck is not None and ck.int8_activations else 1e-4
        torch.testing.assert_close(q4(x), want, atol=tol, rtol=1e-4)


def test_i13_3_lora_on_a_quantized_base():
    from llmosd.models.lora import LoraConfig, add_adapter, merge_adapter, set_active
    m = _model(False)
    Q.quantize_model(m, 4)
    x = torch.randint(0, 96, (1, 6))
    add_adapter(m, "a", LoraConfig(4, 8.0, targets=("q_proj", "v_proj")), seed=1)
    with torch.no_grad():
        for _, mod in m.named_modules():
            if hasattr(mod, "lora_B") and "a" in mod.lora_B:
                mod.lora_B["a"].normal_()
        base = m(x)
        set_active(m, "a")
        adapted = m(x)
    assert (adapted - base).abs().max() > 1e-3          # the adapter acts on the quantized base
    with pytest.raises(ValueError, match="quantized"):
        merge_adapter(m, "a")


def test_i13_3_estimate_knows_quantized_bytes():
    man = {"parameters": 1000, "weights": {"digest": "sha256:x", "size": 700, "quant": "q4_1"}}
    assert estimate_instance(man, 4) == 700 + 256
    assert estimate_instance(man, 4, quant="none") == 4000 + 256
    assert estimate_instance({"parameters": 1000, "weights": {"size": 4000}}, 4, quant="int8") == 1062 + 256
    assert estimate_instance({"parameters": 1000, "weights": {"size": 4000}}, 4) == 4000 + 256


def test_i13_5_protocol_load_and_import_fields():
    assert protocol.MINOR >= 9
    protocol.check_request(protocol.request(1, "load", {"model": "m", "dtype": "bfloat16", "quant": "int4"}))
    protocol.check_request(protocol.request(1, "import", {"name": "m", "files": {"a": "b"}, "dtype": "int8"}))
    for body in ({"model": "m", "quant": "int3"}, {"model": "m", "dtype": "int8"}):
        with pytest.raises(InvalidArgument):
            protocol.check_request(protocol.request(1, "load", body))
