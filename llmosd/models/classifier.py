"""Classification heads on the Llama decoder, by Hugging Face LlamaForSequenceClassification's
rule: logits = score(norm(hidden)) at each input's last token.

A head is a (labels, hidden) float32 tensor, stored as ``{"score.weight": head}``.  Inputs of a
batch are right-padded; causal attention keeps the padding out of every real position, so the
last real token's state is the same as the input's alone.
"""
from __future__ import annotations

import torch


def pad_right(ids: list[list[int]], device, pad: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(tokens (B, T) right-padded with ``pad``, lengths (B,)); ValueError for an empty input."""
    if not ids or any(len(x) == 0 for x in ids):
        raise ValueError("every input to classify must have at least one token")
    T = max(len(x) for x in ids)
    tokens = torch.full((len(ids), T), pad, dtype=torch.long)
    for i, x in enumerate(ids):
        tokens[i, :len(x)] = torch.tensor(x, dtype=torch.long)
    return tokens.to(device), torch.tensor([len(x) for x in ids], device=device)


def pooled(model, ids: list[list[int]], device) -> torch.Tensor:
    """(B, C): the final normed hidden state at each input's last token, in the model's dtype.
    Differentiable (the trainer uses it); call under torch.no_grad() to serve."""
    tokens, lengths = pad_right(ids, device)
    h = model.hidden(tokens)                                         # (B, T, C)
    last = h[torch.arange(h.shape[0], device=h.device), lengths - 1]  # (B, C)
    return model.model.norm(last)


def head_logits(model, head: torch.Tensor, ids: list[list[int]], device) -> torch.Tensor:
    """(B, L) float32 logits of head (L, C) on each input."""
    return pooled(model, ids, device).float() @ head.to(device, torch.float32).T


def new_head(hidden: int, labels: int, seed: int) -> torch.Tensor:
    """A fresh (labels, hidden) float32 head, normal(0, 0.02) from ``seed`` (as HF inits score)."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn((labels, hidden), generator=g) * 0.02
