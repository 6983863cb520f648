"""One-shot model evaluations the engine runs between generation steps: score, embed, classify
(zero-shot, from the language model's next-token probabilities) and classify_head (a trained
classifier's head: the runner passes the installed ``head`` and its ``trained`` labels).

Each is a plain function ``(model, tokenizer, device, *, should_stop=None, **args) -> result
dict`` raising ``ValueError`` for input the model cannot take (the engine turns it into
InvalidArgument) and ``Stopped`` when ``should_stop()`` turns true between two windows or
inputs (the engine is stopping: shutdown waits for one forward pass, not the whole call).
Replies stay well under the protocol's message limit: score refuses texts over
MAX_SCORE_TOKENS and embed batches over MAX_EMBED_BYTES up front, saying how to split them.
Shapes: T tokens, C model width, V vocabulary, L labels.
"""
from __future__ import annotations

import math
from typing import Callable

import numpy as np
import torch

from llmosd.models.classifier import head_logits
from llmosd.serve.request import check_head_labels

CHUNK = 512        # positions per lm_head call: bounds the (T, V) logits held at once
MAX_SCORE_TOKENS = 65_536     # ~40 bytes of reply per token: ~2.6 MB, far below 16 MiB
MAX_EMBED_BYTES = 8 << 20     # float32 vectors in one embed reply

StopCheck = Callable[[], bool] | None


class Stopped(Exception):
    """The engine is stopping; the call was abandoned."""


def _check(should_stop: StopCheck) -> None:
    if should_stop is not None and should_stop():
        raise Stopped()

DEFAULT_CLASSIFY_TEMPLATE = ("Classify the text into one of these labels: {labels}.\n"
                             "Text: {text}\nLabel:")


def _ids(model, tok, text: str, add_bos: bool) -> list[int]:
    ids = tok.encode(text, add_bos=add_bos)
    ctx = model.config.max_position_embeddings
    if len(ids) > ctx:
        raise ValueError(f"the text is {len(ids)} tokens, more than the model's context of {ctx}")
    return ids


def _logprobs_of(model, h: torch.Tensor, targets: torch.Tensor, should_stop: StopCheck = None) -> torch.Tensor:
    """h (T, C) hidden states, targets (T,) ids -> (T,) log p(target | position) in float32."""
    out = []
    for s in range(0, h.shape[0], CHUNK):
        _check(should_stop)
        logits = model.lm_head(model.model.norm(h[s:s + CHUNK])).float()      # (t, V)
        out.append(logits.log_softmax(-1).gather(1, targets[s:s + CHUNK, None])[:, 0])
    return torch.cat(out) if out else torch.zeros(0)


def score(model, tok, device, *, text: str, add_bos: bool = True, should_stop: StopCheck = None) -> dict:
    """Per-token log-probabilities of ``text`` and its perplexity (exp of the mean negative
    log-likelihood of every token after the first, as Hugging Face computes it).

    Text longer than the context is scored in windows of the context's length that overlap
    by half (Hugging Face's strided perplexity): each token is scored once, with at least
    half a context of the text before it in view.  At most MAX_SCORE_TOKENS tokens: the reply
    lists every one."""
    ids = tok.encode(text, add_bos=add_bos)
    n, ctx = len(ids), model.config.max_position_embeddings
    if n < 2:
        raise ValueError("the text must be at least two tokens long to be scored")
    if n > MAX_SCORE_TOKENS:
        raise ValueError(f"the text is {n:,} tokens; score takes at most {MAX_SCORE_TOKENS:,} tokens "
                         f"per request (the reply lists every token): split the text into parts "
                         f"of at most {MAX_SCORE_TOKENS:,} tokens and score each")
    lp, start, done, windows = [], 0, 1, 0         # done: index of the next token to score
    while done < n:
        _check(should_stop)
        end = min(n, start + ctx)
        x = torch.tensor([ids[start:end]], device=device)
        h = model.hidden(x)[0, done - start - 1:-1]                # predicts ids[done:end]
        lp += _logprobs_of(model, h, x[0, done - start:], should_stop).cpu().tolist()
        done, start, windows = end, max(0, end - ctx // 2), windows + 1
    nll = -sum(lp) / len(lp)
    tokens = [{"id": ids[0], "text": tok.decode([ids[0]]), "logprob": None}]
    tokens += [{"id": i, "text": tok.decode([i]), "logprob": v} for i, v in zip(ids[1:], lp)]
    return {"tokens": tokens, "scored_tokens": len(lp), "logprob": sum(lp), "mean_nll": nll,
            "perplexity": math.exp(nll), "windows": windows}


def embed(model, tok, device, *, inputs: list[str], pooling: str = "mean",
          normalize: bool = True, should_stop: StopCheck = None) -> dict:
    """One vector per input: the final normalized hidden states pooled over the input's tokens
    (``mean``: average over every token; ``last``: the last token's state), L2-normalized
    unless ``normalize`` is false.  Returned as float32 little-endian rows."""
    if pooling not in ("mean", "last"):
        raise ValueError(f"pooling must be 'mean' or 'last', got {pooling!r}")
    size = len(inputs) * model.config.hidden_size * 4
    if size > MAX_EMBED_BYTES:
        most = max(1, MAX_EMBED_BYTES // (model.config.hidden_size * 4))
        raise ValueError(f"{len(inputs)} vectors of {model.config.hidden_size} floats make a reply of "
                         f"{size:,} bytes, more than {MAX_EMBED_BYTES:,}: embed at most {most} inputs per request")
    rows, counts = [], []
    for text in inputs:
        _check(should_stop)
        ids = _ids(model, tok, text, True)
        if not ids:
            raise ValueError("an input is empty; every line needs at least one token")
        h = model.model.norm(model.hidden(torch.tensor([ids], device=device)))[0].float()   # (T, C)
        v = h.mean(0) if pooling == "mean" else h[-1]
        if normalize:
            v = v / v.norm().clamp_min(1e-12)
        rows.append(v.cpu())
        counts.append(len(ids))
    arr = torch.stack(rows).numpy().astype("<f4") if rows else np.zeros((0, model.config.hidden_size), "<f4")
    return {"count": len(rows), "dim": int(arr.shape[1]), "dtype": "float32", "data": arr.tobytes(),
            "tokens": counts, "pooling": pooling, "normalized": normalize}


def classify(model, tok, device, *, inputs: list[str], labels: list[str],
             template: str | None = None, should_stop: StopCheck = None) -> dict:
    """Zero-shot: each input gets the label whose tokens are most likely after the prompt
    ``template`` (with {text} and {labels}); ``scores`` are the labels' summed log-probs,
    ``probs`` their softmax over the labels."""
    template = template or DEFAULT_CLASSIFY_TEMPLATE
    if "{text}" not in template:
        raise ValueError("the classification template must contain {text}")
    if len(set(labels)) != len(labels) or len(labels) < 2:
        raise ValueError("give at least two distinct labels")
    label_ids = [tok.encode(" " + lab.strip(), add_bos=False) for lab in labels]
    results = []
    for text in inputs:
        _check(should_stop)
        prompt = template.replace("{labels}", ", ".join(labels)).replace("{text}", text)
        prefix = _ids(model, tok, prompt, True)
        longest = max(map(len, label_ids))
        if len(prefix) + longest > model.config.max_position_embeddings:
            raise ValueError("an input is too long for the model's context")
        # (L, P + longest), right-padded: causal attention keeps padding out of real positions
        rows = [prefix + ids + [0] * (longest - len(ids)) for ids in label_ids]
        x = torch.tensor(rows, device=device)
        logits = model(x)[:, len(prefix) - 1:-1].log_softmax(-1)               # (L, longest, V)
        scores = []
        for j, ids in enumerate(label_ids):
            t = torch.tensor(ids, device=device)
            scores.append(float(logits[j, torch.arange(len(ids), device=device), t].sum()))
        probs = torch.tensor(scores).softmax(0).tolist()
        best = max(range(len(labels)), key=lambda j: scores[j])
        results.append({"label": labels[best], "scores": dict(zip(labels, scores)),
                        "probs": dict(zip(labels, probs))})
    return {"results": results}


def classify_head(model, tok, device, *, head: torch.Tensor, trained: list[str], inputs: list[str],
                  labels: list[str] | None = None, max_len: int | None = None,
                  should_stop: StopCheck = None) -> dict:
    """A trained classifier: each input's logits from ``head`` on the final normalized hidden
    state of its last token (``classifier.head_logits``), one input at a time so that the
    result equals the fine-tuning job's validation predictions.  The input is encoded as the
    job encodes it (the tokenizer's default BOS) and cut to ``max_len`` tokens (the job's
    block size; default the context).  ``scores`` are the logits, ``probs`` their softmax;
    the label is the first of the highest (in trained order), as argmax picks it."""
    order = check_head_labels(trained, labels)
    limit = min(max_len or model.config.max_position_embeddings, model.config.max_position_embeddings)
    results = []
    for text in inputs:
        _check(should_stop)
        ids = tok.encode(text)[:limit]
        if not ids:
            raise ValueError("an input is empty; every line needs at least one token")
        logits = head_logits(model, head, [ids], device)[0].float().cpu()          # (L,)
        probs = logits.softmax(0)
        best = int(logits.argmax())
        j = {lab: i for i, lab in enumerate(trained)}
        results.append({"label": trained[best], "scores": {lab: float(logits[j[lab]]) for lab in order},
                        "probs": {lab: float(probs[j[lab]]) for lab in order}})
    return {"results": results}


FUNCTIONS = {"score": score, "embed": embed, "classify": classify, "classify_head": classify_head}
