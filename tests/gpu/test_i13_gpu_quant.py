"""Issue 13 (part E) on CUDA: the quantized kernels (compiled with triton, or eager) against the
float reference, and a quantized model's decode on the GPU equal to the CPU's greedy choice.
Run by tests/gpu/run.sh on a GPU host; skipped elsewhere."""
import pytest
import torch
import torch.nn.functional as F

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this machine")


@needs_cuda
@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("rows", [1, 4, 16])
def test_i13_gpu_qlinear_matches_dequantized_linear(bits, rows):
    from llmosd.models import quant as Q
    t = Q.quantize(torch.randn(256, 576), bits)
    lin = Q.QLinear(*(v.cuda() for v in (t["qweight"], t["scales"])),
                    t["mins"].cuda() if "mins" in t else None, dtype=torch.bfloat16)
    x = torch.randn(rows, 576, device="cuda", dtype=torch.bfloat16)
    with torch.inference_mode():
        y = lin(x)
    ref = F.linear(x.float(), lin.dequantized(torch.float32))
    torch.testing.assert_close(y.float(), ref, atol=0.1, rtol=0.03)


@needs_cuda
def test_i13_gpu_quantized_model_decodes_like_cpu():
    from llmosd.models import quant as Q
    from llmosd.models.llama import KVCache, Llama, LlamaConfig
    cfg = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                      tie_word_embeddings=True)
    m = Llama(cfg)
    m.init_weights(0)
    Q.quantize_model(m.eval(), 4)
    x = torch.randint(0, 128, (1, 10))
    with torch.inference_mode():
        ref = m(x)
        g = m.cuda()
        cache = KVCache(cfg, 16, device="cuda")
        out = torch.cat([g(x[:, :6].cuda(), cache, 0)] + [g(x[:, i:i + 1].cuda(), cache, i) for i in range(6, 10)], 1)
    torch.testing.assert_close(out.cpu(), ref, atol=1e-3, rtol=1e-3)
    assert Q.describe(g).startswith("int4")
