"""Issue 13 (B8, B2, B3): the performance paths keep their results.  The KV pool is not
resident before it is used (lazily committed zeros), and the many-row quantized matmul
(dequantized a tile of output rows at a time) equals dequantize + F.linear.  Small: seconds."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from llmosd.models import quant as Q
from llmosd.models.llama import LlamaConfig, PagedKV, lazy_zeros


def _rss_kib() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS"))


def test_i13_b8_kv_pool_is_not_resident_until_written():
    cfg = LlamaConfig(vocab_size=64, hidden_size=256, intermediate_size=512, num_hidden_layers=4,
                      num_attention_heads=4, num_key_value_heads=4)
    before = _rss_kib()
    kv = PagedKV(cfg, num_blocks=4096, block_size=16)          # 2 x 256 MiB
    grew = _rss_kib() - before
    assert kv.nbytes() == 2 * 4 * 4096 * 16 * 256 * 4
    assert grew < kv.nbytes() // 1024 // 8, f"the pool became resident at once (+{grew} KiB)"
    assert kv.k.is_contiguous() and kv.k.dtype == torch.float32
    assert not kv.k[:, :8].any() and not kv.v[:, -8:].any()   # zeros, not garbage
    kc, _ = kv.slots(1)
    kc[5] = 1.0                                                # writable, a view of the pool
    assert kv.k[1].reshape(-1, 4, 64)[5].eq(1).all()


def test_i13_b8_lazy_zeros_any_float_dtype():
    for dt in (torch.float32, torch.bfloat16, torch.float16):
        t = lazy_zeros((3, 5, 7), "cpu", dt)
        assert t.shape == (3, 5, 7) and t.dtype == dt and not t.any()


def test_i13_b2_many_row_qmatmul_tiled_equals_dequantized_linear(monkeypatch):
    monkeypatch.setattr(Q, "TILE", 40 * 64)                    # several tiles, a ragged last one
    for bits in (8, 4):
        w = Q.quantize(torch.randn(100, 64), bits)
        x = torch.randn(Q.CK_ROWS + 3, 64)          # past the few-row kernels: the tiles
        want = F.linear(x, Q.dequantize(w["qweight"], w["scales"], w.get("mins")))
        with torch.inference_mode():
            got = Q.qmatmul(x, w["qweight"], w["scales"], w.get("mins"))
        assert got.shape == (Q.CK_ROWS + 3, 100)
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
        eager = Q._mm_tiled(x, w["qweight"], w["scales"], w.get("mins"), Q._dequant)
        torch.testing.assert_close(eager, want, atol=1e-4, rtol=1e-4)


def _atol(want: torch.Tensor) -> float:
    """The few-row C kernel quantizes activations to int8 per group of 32 where the CPU has
    VNNI (as llama.cpp): its bound is relative to the output's scale; otherwise float32."""
    ck = Q.KERNELS.ck if Q.kernel_mode() else None
    return 0.02 * float(want.abs().max()) if ck is not None and ck.int8_activations else 1e-4


def test_i13_b3_prefill_rows_with_bias_and_grad_path():
    w = Q.quantize(torch.randn(48, 64), 4)
    bias = torch.randn(48)
    x = torch.randn(2, 5, 64)
    want = F.linear(x, Q.dequantize(w["qweight"], w["scales"], w["mins"]), bias)
    with torch.inference_mode():
        got = Q.qmatmul(x, w["qweight"], w["scales"], w["mins"], bias)
    torch.testing.assert_close(got, want, atol=_atol(want), rtol=1e-4)
    torch.testing.assert_close(Q.qmatmul(x, w["qweight"], w["scales"], w["mins"], bias), want,
                               atol=1e-4, rtol=1e-4)           # grad mode: the plain path


def test_i13_b1_c_kernel_equals_dequantized_linear_and_serves_decode_rows():
    """The AVX-512 C kernel (where the CPU and a C compiler allow it) gives x @ W.T for 4 and
    8 bits, any row count (chunks of 8), and qmatmul routes a few rows through it."""
    import pytest
    from llmosd.models import qkernels
    k = qkernels.load(Q.quantize, Q.dequantize)
    if k is None:
        pytest.skip("no AVX-512 or no C compiler here")
    for bits in (4, 8):
        w = Q.quantize(torch.randn(70, 160), bits)
        ref_w = Q.dequantize(w["qweight"], w["scales"], w.get("mins"))
        for rows in (1, 5, 8, 17):
            x = torch.randn(rows, 160)
            want = F.linear(x, ref_w)
            torch.testing.assert_close(k.mm(x, w["qweight"], w["scales"], w.get("mins")), want,
                                       atol=_atol(want), rtol=1e-4)
        x = torch.randn(3, 160)[:, :]                          # a view: taken as it is
        calls = []
        orig = k.mm
        try:
            k.mm = lambda *a: calls.append(1) or orig(*a)
            Q.kernel_mode()
            if Q.KERNELS.ck is k:
                with torch.inference_mode():
                    got = Q.qmatmul(x, w["qweight"], w["scales"], w.get("mins"))
                want = F.linear(x, ref_w)
                torch.testing.assert_close(got, want, atol=_atol(want), rtol=1e-4)
                assert calls, "a decode-sized matmul did not use the C kernel"
        finally:
            k.mm = orig
