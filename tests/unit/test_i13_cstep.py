"""The fused C decode step (``models/cstep.py``) against the eager paged forward pass: the
same logits and the same K/V written to the pool, for float32, int8 and int4 weights, with
grouped-query attention, biases, block tables crossing blocks and more than 8 rows; each row
the same whatever rows run beside it; the models it must refuse."""
from __future__ import annotations

import pytest
import torch

from llmosd.models import cstep, quant, qkernels
from llmosd.models.llama import Llama, LlamaConfig, PagedKV, paged_batch

BS = 4                      # small blocks: the tables cross several


def _ck():
    ck = qkernels.load(quant.quantize, quant.dequantize)
    if ck is None:
        pytest.skip("no AVX-512 CPU or no C compiler here: decodes run eagerly")
    return ck


def _model(bits=None, bias=False, seed=0):
    cfg = LlamaConfig.from_dict(dict(vocab_size=320, hidden_size=64, intermediate_size=96,
                                     num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                     max_position_embeddings=128, tie_word_embeddings=bits is not None,
                                     attention_bias=bias))
    m = Llama(cfg)
    m.init_weights(seed, std=0.1)
    if bias:
        with torch.no_grad():
            for n, p in m.named_parameters():
                if n.endswith(".bias"):
                    p.normal_(0, 0.1)
    m.eval()
    return quant.quantize_model(m, bits) if bits else m


def _prefilled(m, prompts, tables):
    """A pool holding the prompts' K/V (eager prefill), and a copy of it."""
    kv = PagedKV(m.config, 40, BS)
    pb, _ = paged_batch([(p, 0, t) for p, t in zip(prompts, tables)], BS, "cpu", scratch=39)
    m.forward_paged(pb, kv)
    twin = PagedKV(m.config, 40, BS)
    twin.k.copy_(kv.k)
    twin.v.copy_(kv.v)
    return kv, twin


def _rows(n):
    g = torch.Generator().manual_seed(n)
    prompts = [torch.randint(1, 320, (int(torch.randint(1, 11, (1,), generator=g)),), generator=g).tolist()
               for _ in range(n)]
    tables = [[3 * i, 3 * i + 1, 3 * i + 2] for i in range(n)]          # 12 positions each
    return prompts, tables


@pytest.mark.parametrize("bits,bias", [(None, False), (None, True), (8, False), (4, False), (4, True)])
@pytest.mark.parametrize("n", [1, 3, 11])
def test_i13_4_fused_step_equals_the_eager_paged_forward(bits, bias, n):
    ck = _ck()
    m = _model(bits, bias)
    prompts, tables = _rows(n)
    kv, twin = _prefilled(m, prompts, tables)
    nxt = [7 + i for i in range(n)]
    starts = [len(p) for p in prompts]
    plan = cstep.Plan.build(ck.lib, m, twin)
    assert plan is not None
    with torch.inference_mode():
        pb, _ = paged_batch([([t], s, tb) for t, s, tb in zip(nxt, starts, tables)], BS, "cpu", scratch=39)
        want = m.forward_paged(pb, kv)
        got = plan.run(nxt, starts, tables)
    # the eager path's few-row matmuls are the same C kernels: float32 rounding only, but with
    # int8 activations a rounding-level difference may move one activation by a quantization
    # step (the kernels' documented bound, relative to the output's scale)
    exact = bits is None or not ck.int8_activations
    for a, b in ((got, want), (twin.k, kv.k), (twin.v, kv.v)):
        tol = 2e-5 if exact else qkernels.TOLERANCE * float(b.abs().max())
        torch.testing.assert_close(a, b, atol=tol, rtol=1e-4)


@pytest.mark.parametrize("bits", [None, 4])
def test_i13_2_fused_rows_do_not_depend_on_their_batch(bits):
    """Greedy output is the same batched as alone: a row's logits are bit-for-bit the same
    whatever rows (and how many) run beside it."""
    ck = _ck()
    m = _model(bits)
    prompts, tables = _rows(10)
    _, kv = _prefilled(m, prompts, tables)
    nxt, starts = [5] * 10, [len(p) for p in prompts]
    plan = cstep.Plan.build(ck.lib, m, kv)
    with torch.inference_mode():
        together = plan.run(nxt, starts, tables)
        for i in (0, 4, 9):
            alone = plan.run(nxt[i:i + 1], starts[i:i + 1], tables[i:i + 1])
            assert torch.equal(alone[0], together[i])


def test_i13_4_fused_step_refuses_what_it_does_not_do():
    ck = _ck()
    m = _model()
    prompts, tables = _rows(1)
    kv, _ = _prefilled(m, prompts, tables)
    assert cstep.Plan.build(ck.lib, m, None) is None                      # no pool
    bf = _model().to(torch.bfloat16)
    assert cstep.Plan.build(ck.lib, bf, PagedKV(bf.config, 4, BS, dtype=torch.bfloat16)) is None
    odd = Llama(LlamaConfig.from_dict(dict(vocab_size=64, hidden_size=40, intermediate_size=64,
                                           num_hidden_layers=1, num_attention_heads=4,
                                           num_key_value_heads=2)))
    assert cstep.Plan.build(ck.lib, odd, PagedKV(odd.config, 4, BS)) is None  # head_dim 10


def test_i13_4_runner_decodes_through_the_fused_step_unless_compile_is_off(monkeypatch):
    from llmosd.serve.runner import Runner, SeqWork
    _ck()
    m = _model(4)

    class Tok:
        def eos_ids(self):
            return set()

    used = []
    real = cstep.Plan.run
    monkeypatch.setattr(cstep.Plan, "run", lambda self, *a: used.append(len(a[0])) or real(self, *a))
    outs = {}
    for mode in ("auto", "off"):
        r = Runner(m, Tok(), torch.device("cpu"), num_blocks=8, block_size=BS, compile=mode)
        with r.session():
            r.run([SeqWork("a", [1, 2, 3, 4, 5], 0, [0, 1])])
            outs[mode] = [r.run([SeqWork("a", [9], 5, [0, 1])])[0].token]
    assert used == [1]                       # the prefill is eager; "off": no fused step
    assert all(0 <= t[0] < m.config.vocab_size for t in outs.values())


def _emulated(x, w):
    """x quantized per group of 32 to int8 as the kernel does (d = max|x| / 127, round to
    nearest even), times the dequantized weight, in float64."""
    M, K = x.shape
    xg = x.reshape(M, K // 32, 32)
    amax = xg.abs().amax(-1, keepdim=True)
    inv = torch.where(amax > 0, 127.0 / amax, torch.zeros_like(amax))
    xq = torch.round(xg * inv).clamp(-128, 127).double() * (amax / 127).double()
    W = quant.dequantize(w["qweight"], w["scales"], w.get("mins")).double()
    return xq.reshape(M, K) @ W.t()


@pytest.mark.parametrize("bits", [4, 8])
def test_i13_4_int8_activations_are_exactly_the_quantized_dot_products(bits):
    """``activations = "int8"``: the VNNI kernel computes exactly the dot product of the
    dequantized weight with per-group int8 activations (odd group counts and > 8 rows too)."""
    ck = _ck()
    if not ck.set_int8_activations(True):
        pytest.skip("this CPU has no AVX-512 VNNI: activations stay float32")
    try:
        g = torch.Generator().manual_seed(bits)
        for K in (96, 160, 576):
            w = quant.quantize(torch.randn(40, K, generator=g), bits)
            for M in (1, 7, 11):
                x = torch.randn(M, K, generator=g)
                got = ck.mm(x, w["qweight"], w["scales"], w.get("mins")).double()
                want = _emulated(x, w)
                assert float((got - want).abs().max()) <= 1e-5 * float(want.abs().max()), (K, M)
                ref = (x @ quant.dequantize(w["qweight"], w["scales"], w.get("mins")).t()).double()
                assert float((got - ref).abs().max()) <= qkernels.TOLERANCE * float(ref.abs().max())
    finally:
        ck.set_int8_activations(False)
    x = torch.randn(3, 96)
    w = quant.quantize(torch.randn(40, 96), bits)
    torch.testing.assert_close(ck.mm(x, w["qweight"], w["scales"], w.get("mins")),
                               x @ quant.dequantize(w["qweight"], w["scales"], w.get("mins")).t(),
                               atol=1e-4, rtol=1e-4)             # back to float32 activations


def test_i13_4_kernel_cache_takes_only_this_users_private_files(tmp_path, monkeypatch):
    """A compiled library is code: the cache directory and the file must be this user's,
    writable by no one else, and never a symlink."""
    import os
    import stat
    d = tmp_path / "cache"
    monkeypatch.setenv("LLMOSD_KERNEL_CACHE", str(d))
    assert qkernels._cache_dir() == str(d) and stat.S_IMODE(os.stat(d).st_mode) == 0o700
    os.chmod(d, 0o777)
    assert qkernels._cache_dir() is None                     # others could have written there
    os.chmod(d, 0o700)
    f = d / "qk-x.so"
    f.write_bytes(b"\x7fELF")
    os.chmod(f, 0o600)
    assert qkernels._private(str(f), stat.S_ISREG)
    os.chmod(f, 0o664)
    assert not qkernels._private(str(f), stat.S_ISREG)
    link = d / "qk-y.so"
    link.symlink_to(f)
    os.chmod(f, 0o600)
    assert not qkernels._private(str(link), stat.S_ISREG)    # a link is never followed
    elsewhere = tmp_path / "real"
    elsewhere.mkdir(mode=0o700)
    (tmp_path / "linked").symlink_to(elsewhere)
    monkeypatch.setenv("LLMOSD_KERNEL_CACHE", str(tmp_path / "linked"))
    assert qkernels._cache_dir() is None
    monkeypatch.setenv("LLMOSD_KERNEL_CACHE", "off")
    assert qkernels._cache_dir() is None


def test_i13_4_activations_setting_is_checked(tmp_path):
    from llmctl.errors import ConfigError
    from llmosd import config
    f = tmp_path / "llmosd.toml"
    f.write_text('activations = "int4"\n')
    with pytest.raises(ConfigError, match="line 1: activations must be float32 or int8"):
        config.load(str(f), {}, environ={})
    f.write_text('activations = "int8"\n')
    assert config.load(str(f), {}, environ={})[0].activations == "int8"
