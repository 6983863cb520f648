import pytest
import torch

from llmosd.models.llama import KVCache, Llama, LlamaConfig


def tiny(**kw):
    cfg = LlamaConfig(vocab_size=97, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=kw.pop("kv", 2),
                      max_position_embeddings=128, **kw)
    m = Llama(cfg)
    m.init_weights(seed=0)
    return m.eval()


@pytest.mark.parametrize("kw", [{}, {"kv": 4}, {"kv": 1, "tie_word_embeddings": True},
                                {"rope_theta": 500000.0, "rope_scaling": {"rope_type": "llama3", "factor": 8.0,
                                 "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                 "original_max_position_embeddings": 32}}])
def test_cached_decode_equals_full_forward(kw):
    m = tiny(**kw)
    x = torch.randint(0, 97, (1, 20), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        full = m(x)
        cache = KVCache(m.config, 32)
        parts = [m(x[:, :8], cache, 0), m(x[:, 8:13], cache, 8)]      # chunked prefill
        parts += [m(x[:, i:i + 1], cache, i) for i in range(13, 20)]  # one token at a time
    torch.testing.assert_close(torch.cat(parts, 1), full, atol=1e-5, rtol=1e-5)


def test_causality():
    m = tiny()
    x = torch.randint(0, 97, (1, 10))
    y = x.clone()
    y[0, 7] = (y[0, 7] + 1) % 97
    with torch.no_grad():
        a, b = m(x), m(y)
    torch.testing.assert_close(a[:, :7], b[:, :7])
    assert not torch.allclose(a[:, 7:], b[:, 7:])


def test_tied_weights_share_storage_and_save_without_duplicate():
    m = tiny(tie_word_embeddings=True)
    assert m.lm_head.weight.data_ptr() == m.model.embed_tokens.weight.data_ptr()
    sd = m.state_dict_for_save()
    assert "lm_head.weight" not in sd and "model.embed_tokens.weight" in sd
    m2 = tiny(tie_word_embeddings=True)
    m2.init_weights(seed=9)
    m2.load_weights(sd)
    x = torch.randint(0, 97, (1, 5))
    with torch.no_grad():
        torch.testing.assert_close(m(x), m2(x))


def test_load_weights_names_the_problem():
    m = tiny()
    sd = m.state_dict_for_save()
    bad = dict(sd)
    bad.pop("model.norm.weight")
    with pytest.raises(ValueError, match="model.norm.weight"):
        m.load_weights(bad)
    bad = dict(sd)
    bad["model.norm.weight"] = torch.ones(3)
    with pytest.raises(ValueError, match="shape"):
        m.load_weights(bad)


def test_gqa_requires_divisible_heads():
    with pytest.raises(ValueError):
        LlamaConfig(hidden_size=64, num_attention_heads=4, num_key_value_heads=3)


def test_hf_config_names_roundtrip():
    cfg = tiny().config
    again = LlamaConfig.from_dict({**cfg.to_dict(), "unknown_key": 1})
    assert again == cfg and cfg.head_dim == 16


def test_rope_factors_reproduce_llama3_scaling():
    """GGUF stores Llama 3.1 rope scaling as per-frequency divisors (rope_freqs.weight)."""
    from llmosd.models.llama import rope_inv_freq
    l3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 64}
    base = LlamaConfig(hidden_size=512, num_attention_heads=4, rope_theta=500000.0)
    scaled = LlamaConfig(hidden_size=512, num_attention_heads=4, rope_theta=500000.0, rope_scaling=l3)
    factors = (rope_inv_freq(base).double() / rope_inv_freq(scaled).double()).tolist()
    as_gguf = LlamaConfig(hidden_size=512, num_attention_heads=4, rope_theta=500000.0,
                          rope_scaling={"rope_type": "factors", "factors": factors})
    torch.testing.assert_close(rope_inv_freq(as_gguf), rope_inv_freq(scaled))
    assert not torch.allclose(rope_inv_freq(base), rope_inv_freq(scaled))


def test_i9_4_one_weight_check_for_loading_and_importing():
    """Loading and importing refuse the same weights with the same words (one check), the
    import as CheckpointError, the one error of every checkpoint format."""
    from llmosd.formats import gguf_vocab
    from llmosd.formats.common import CheckpointError, check_shapes
    m = tiny()
    sd = m.state_dict_for_save()
    for bad in ({k: v for k, v in sd.items() if k != "model.norm.weight"},
                {**sd, "model.norm.weight": torch.ones(3)},
                {**sd, "model.layers.9.mlp.up_proj.weight": torch.ones(3)}):
        with pytest.raises(ValueError) as loading:
            m.load_weights(bad)
        with pytest.raises(CheckpointError) as importing:
            check_shapes(m.config, {k: tuple(v.shape) for k, v in bad.items()}, "the config")
        assert str(loading.value) == str(importing.value)
    with pytest.raises(CheckpointError, match="no tokenizer"):
        gguf_vocab.from_gguf({})


def test_i9_7_one_dtype_table():
    from llmctl.protocol import DTYPES
    from llmosd.formats import gguf
    from llmosd.models.loader import DTYPES as TORCH_DTYPES
    assert set(TORCH_DTYPES) == set(DTYPES) - {"auto"}
    assert gguf.DTYPES is TORCH_DTYPES                   # the formats convert with the same table
