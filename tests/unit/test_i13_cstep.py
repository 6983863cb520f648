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
    # the eager path's few-row matmuls are the same C kernels: float32 rounding only
    torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(twin.k, kv.k, atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(twin.v, kv.v, atol=2e-5, rtol=1e-4)


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
