"""Next-token choice from logits: small pure functions (gpt-fast style).

All take ``logits`` of shape (V,) in float32.  Order, as in Hugging Face: repetition penalty,
then temperature, top-k, top-p, min-p.  A temperature below ``GREEDY_BELOW`` (as vLLM) is greedy
(argmax, ties to the lowest id, like torch.argmax) after the repetition penalty.  Sampling draws
from a per-request ``torch.Generator`` so a seed reproduces the output exactly.

Any value ``validate`` lets through is safe, however extreme (1e-320, 100): the penalty is
held to the protocol's range, top-p always keeps the most likely token, and a distribution
that still came out non-finite falls back to greedy instead of failing.  ``SamplingParams`` and
its pure ``validate`` live in the torch-free ``request.py``; they are re-exported here.
"""
from __future__ import annotations

import torch

from llmosd.serve.request import GREEDY_BELOW, PENALTY_RANGE, SamplingParams  # noqa: F401 (re-exported)


def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """CTRL/HF penalty: every token id in ``seen`` (prompt and output so far) is made less
    likely: positive logits divided by ``penalty``, negative ones multiplied.  ``penalty`` is
    held to PENALTY_RANGE so the result stays finite."""
    if penalty == 1.0 or seen.numel() == 0:
        return logits
    penalty = min(max(penalty, PENALTY_RANGE[0]), PENALTY_RANGE[1])
    got = logits.gather(0, seen)
    return logits.scatter(0, seen, torch.where(got > 0, got / penalty, got * penalty))


def apply_min_p(logits: torch.Tensor, p: float) -> torch.Tensor:
    """Drop tokens less likely than ``p`` times the most likely one."""
    if p <= 0.0:
        return logits
    probs = logits.softmax(-1)
    return logits.masked_fill(probs < p * probs.max(), float("-inf"))


def apply_top_k(logits: torch.Tensor, k: int) -> torch.Tensor:
    if k <= 0 or k >= logits.numel():
        return logits
    kth = torch.topk(logits, k).values[-1]
    return logits.masked_fill(logits < kth, float("-inf"))


def apply_top_p(logits: torch.Tensor, p: float) -> torch.Tensor:
    """Keep the smallest set of most likely tokens whose probability reaches ``p`` (always at
    least the most likely one, however small ``p``)."""
    if p >= 1.0:
        return logits
    sorted_logits, idx = torch.sort(logits, descending=True)
    cum = sorted_logits.softmax(-1).cumsum(-1)
    drop = cum - sorted_logits.softmax(-1) >= p      # tokens entirely past the nucleus
    drop[0] = False
    sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
    return torch.empty_like(logits).scatter_(0, idx, sorted_logits)


def sample(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None,
           seen: torch.Tensor | None = None) -> int:
    """One token id.  ``seen``: (N,) int64 ids on logits' device, for the repetition penalty."""
    if seen is not None:
        logits = apply_repetition_penalty(logits, seen, params.repetition_penalty)
    if params.temperature < GREEDY_BELOW:
        return int(torch.argmax(logits))
    scaled = apply_top_p(apply_top_k(logits / params.temperature, params.top_k), params.top_p)
    # The generator lives on the CPU so a seed gives the same draw on any device.
    probs = apply_min_p(scaled, params.min_p).softmax(-1).cpu()
    if not bool(torch.isfinite(probs).all()):     # e.g. inf logits: no distribution to draw from
        return int(torch.argmax(logits))
    return int(torch.multinomial(probs, 1, generator=generator))


def make_generator(seed: int | None) -> torch.Generator:
    g = torch.Generator()
    g.manual_seed(seed if seed is not None else int(torch.randint(0, 2**62, (1,))))
    return g


def top_logprobs(logits: torch.Tensor, token: int, k: int) -> tuple[float, list[tuple[int, float]]]:
    """The chosen token's log-probability under the model's own distribution (before any
    sampling setting) and the ``k`` most likely (id, logprob) pairs."""
    lp = logits.float().log_softmax(-1)
    top = torch.topk(lp, k) if k > 0 else None
    pairs = list(zip(top.indices.tolist(), top.values.tolist())) if top is not None else []
    return float(lp[token]), pairs
