"""Issue 13, bench B3 (prefill): a 4-bit layer's GEMMs for a float32 prefill chunk (>=
``BF16_ROWS`` rows) run in bfloat16 on CPUs that multiply it natively (float32 sums; the output
rounded to bf16), within a stated tolerance of the float32 path; fewer rows, 8-bit and float32
weights and ``LLMOSD_PREFILL_BF16=off`` stay float32.  Small tensors: seconds."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from llmosd.models import quant as Q
from llmosd.models.llama import Llama, LlamaConfig

# x and W rounded to bf16 (relative 2^-9 each) and the output too: ~3e-3 relative (rms) measured
# on random layers of SmolLM2's shapes; 1e-2 leaves room, and float32 misses it by 4 orders.
REL_TOL = 1e-2


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def _spy(monkeypatch) -> list:
    """The compute dtypes ``_mm_tiled`` is called with, in order.  Kernels not yet chosen: eager
    (the same tiling; torch.compile's warm-up would cost this file most of its time)."""
    monkeypatch.setattr(Q.KERNELS, "mode", Q.KERNELS.mode or "eager")
    calls, real = [], Q._mm_tiled

    def spy(x, qweight, scales, mins, deq, cdt=None):
        calls.append(cdt or x.dtype)
        return real(x, qweight, scales, mins, deq, cdt)
    monkeypatch.setattr(Q, "_mm_tiled", spy)
    return calls


def test_i13_b3_1_bf16_prefill_gemm_within_tolerance_of_float32(monkeypatch):
    monkeypatch.setattr(Q, "TILE", 200 * 576)                   # several tiles, a ragged last one
    calls = _spy(monkeypatch)
    g = torch.Generator().manual_seed(0)
    for bits, (N, K) in ((4, (1536, 576)), (4, (576, 1536)), (8, (576, 1536))):
        w = Q.quantize(torch.randn(N, K, generator=g) * 0.05, bits)
        args = w["qweight"], w["scales"], w.get("mins")
        bias = torch.randn(N, generator=g)
        x = torch.randn(2, Q.BF16_ROWS, K, generator=g)
        ref = F.linear(x, Q.dequantize(*args), bias)
        with torch.inference_mode():
            monkeypatch.setattr(Q.KERNELS, "bf16", True)
            got = Q.qmatmul(x, *args, bias)
            monkeypatch.setattr(Q.KERNELS, "bf16", False)
            f32 = Q.qmatmul(x, *args, bias)
        assert got.dtype == torch.float32 and got.shape == ref.shape
        assert (0 < _rel(got, ref) < REL_TOL) if bits == 4 else _rel(got, ref) < 1e-5, (bits, _rel(got, ref))
        assert _rel(f32, ref) < 1e-5, (bits, _rel(f32, ref))
    assert calls == [torch.bfloat16, torch.float32] * 2 + [torch.float32] * 2     # 8 bits: float32


def test_i13_b3_2_few_rows_and_8_bit_or_float32_weights_never_take_bf16(monkeypatch):
    monkeypatch.setattr(Q.KERNELS, "bf16", True)
    calls = _spy(monkeypatch)
    cfg = LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    m = Llama(cfg)
    m.init_weights(seed=3, std=0.3)
    m.eval()
    x = torch.randint(0, 96, (1, 2 * Q.BF16_ROWS), generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        ref = m(x)
        monkeypatch.setattr(Q.KERNELS, "bf16", False)
        assert torch.equal(m(x), ref)                          # float32 weights: the same path
        assert calls == []
        monkeypatch.setattr(Q.KERNELS, "bf16", True)
        Q.quantize_model(m, 4)
        m(x[:, :Q.BF16_ROWS - 1])                              # fewer rows: float32
        assert calls and set(calls) == {torch.float32}
        calls.clear()
        m(x)                                                   # every layer (and the head) 4-bit
        assert calls and set(calls) == {torch.bfloat16}


def test_i13_b3_3_env_turns_bf16_off(monkeypatch):
    monkeypatch.setenv("LLMOSD_PREFILL_BF16", "off")
    assert Q._Kernels().bf16 is False


def test_i13_b3_4_evaluations_keep_float32_gemms():
    """score/embed/classify run inside ``float32_gemms``: their many-row GEMMs stay float32
    (the figures transformers computes), while generation prefill may take bf16."""
    w = Q.quantize(torch.randn(96, 128), 4)
    x = torch.randn(Q.BF16_ROWS + 8, 128)
    want = F.linear(x, Q.dequantize(w["qweight"], w["scales"], w["mins"]))
    with torch.inference_mode(), Q.float32_gemms():
        got = Q.qmatmul(x, w["qweight"], w["scales"], w["mins"])
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
