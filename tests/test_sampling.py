import pytest
import torch

from llmosd.sampling import SamplingParams, apply_top_k, apply_top_p, make_generator, sample


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
