import pytest
import torch

from llmosd.serve.sampling import (SamplingParams, apply_min_p, apply_repetition_penalty, apply_top_k,
                             apply_top_p, make_generator, sample, top_logprobs)


def test_greedy_is_argmax():
    logits = torch.tensor([0.1, 3.0, 2.9, -1.0])
    assert sample(logits, SamplingParams(temperature=0), None) == 1


def test_top_k_and_top_p_masks():
    logits = torch.tensor([4.0, 3.0, 2.0, 1.0])
    assert torch.isinf(apply_top_k(logits, 2)[2:]).all() and not torch.isinf(apply_top_k(logits, 2)[:2]).any()
    probs = logits.softmax(-1)          # ~[.64, .24, .09, .03]
    kept = ~torch.isinf(apply_top_p(logits, 0.8))
    assert kept.tolist() == [True, True, False, False]
    assert (~torch.isinf(apply_top_p(logits, 0.5))).tolist() == [True, False, False, False]
    assert probs.sum() == pytest.approx(1.0)


def test_seed_reproduces_and_distribution_is_right():
    logits = torch.log(torch.tensor([0.5, 0.3, 0.2]))
    p = SamplingParams(temperature=1.0, seed=5)
    a = [sample(logits, p, g) for g in [make_generator(5)] for _ in range(50)]
    g = make_generator(5)
    b = [sample(logits, p, g) for _ in range(50)]
    assert a == b
    g = make_generator(0)
    counts = torch.bincount(torch.tensor([sample(logits, p, g) for _ in range(4000)]), minlength=3)
    assert torch.allclose(counts / 4000, torch.tensor([0.5, 0.3, 0.2]), atol=0.03)


@pytest.mark.parametrize("kw", [{"temperature": -1}, {"top_k": -1}, {"top_p": 0.0}, {"top_p": 1.5}])
def test_validate(kw):
    with pytest.raises(ValueError):
        SamplingParams(**kw).validate()


def test_repetition_penalty_matches_hf_rule():
    logits = torch.tensor([2.0, -1.0, 0.5, 3.0])
    out = apply_repetition_penalty(logits, torch.tensor([0, 1, 1]), 2.0)
    assert out.tolist() == [1.0, -2.0, 0.5, 3.0]
    # greedy follows the penalised logits: token 3 stays best, then with it seen token 0 wins
    p = SamplingParams(temperature=0, repetition_penalty=4.0)
    assert sample(torch.tensor([2.0, 0.1, 0.5, 3.0]), p, None, torch.tensor([3])) == 0


def test_min_p_keeps_tokens_near_the_best():
    logits = torch.log(torch.tensor([0.5, 0.3, 0.15, 0.05]))
    kept = ~torch.isinf(apply_min_p(logits, 0.4))
    assert kept.tolist() == [True, True, False, False]
    g = make_generator(1)
    assert {sample(logits, SamplingParams(temperature=1.0, min_p=0.4), g) for _ in range(200)} == {0, 1}


def test_top_logprobs_are_the_model_distribution():
    logits = torch.log(torch.tensor([0.5, 0.3, 0.2]))
    lp, top = top_logprobs(logits, 1, 2)
    assert lp == pytest.approx(torch.log(torch.tensor(0.3)).item(), abs=1e-6)
    assert [i for i, _ in top] == [0, 1]


@pytest.mark.parametrize("kw", [{"min_p": 1.0}, {"min_p": -0.1}, {"repetition_penalty": 0}])
def test_validate_new_settings(kw):
    with pytest.raises(ValueError):
        SamplingParams(**kw).validate()


def test_i7_12_tiny_sampling_values_are_safe():
    """1e-320 (and other extremes validate lets through) give a token, never NaN or an error:
    a temperature below GREEDY_BELOW is greedy, a tiny top_p keeps the top token, an extreme
    repetition penalty is held to its range."""
    logits = torch.tensor([1.5, 3.0, -2.0, 2.9])
    seen = torch.tensor([1, 2])
    g = make_generator(0)
    assert sample(logits, SamplingParams(temperature=1e-320), g) == 1
    assert sample(logits, SamplingParams(temperature=1e-6), g) == 1
    assert sample(logits, SamplingParams(temperature=1.0, top_p=1e-320), g) == 1
    assert (~torch.isinf(apply_top_p(logits, 1e-320))).tolist() == [False, True, False, False]
    for penalty in (1e-320, 1e-30, 1e30):
        out = apply_repetition_penalty(logits, seen, penalty)
        assert torch.isfinite(out).all(), penalty
        for t in (0.0, 1e-320, 0.7, 100.0):
            tok = sample(logits, SamplingParams(temperature=t, repetition_penalty=penalty, top_p=1e-320,
                                                min_p=0.999), g, seen)
            assert 0 <= tok < 4
    # non-finite logits (an overflowed model) fall back to greedy instead of failing
    assert sample(torch.tensor([0.0, float("inf"), 1.0]), SamplingParams(temperature=1.0), g) == 1
    with pytest.raises(ValueError):
        SamplingParams(repetition_penalty=1e-320).validate()          # outside the protocol's range
    with pytest.raises(ValueError):
        SamplingParams(temperature=float("nan")).validate()
    SamplingParams(temperature=1e-320, top_p=1e-320, repetition_penalty=100.0).validate()


def test_i7_12_nil_max_tokens_and_logprobs_mean_unset():
    from llmctl.errors import InvalidArgument
    from llmosd.ops.serve import check_generate
    assert check_generate({"max_tokens": None, "logprobs": None, "stop": None}, 77) == \
        {"max_tokens": 77, "stops": [], "logprobs": 0}
    for body in ({"max_tokens": "5"}, {"max_tokens": 0}, {"max_tokens": True}, {"logprobs": 21},
                 {"logprobs": 1.5}, {"stop": "\n"}):
        with pytest.raises(InvalidArgument):
            check_generate(body, 77)
